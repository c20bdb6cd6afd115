"""The post-processor on damaged inputs: a trial's per-image outcome file that cannot be read,
a result.json or mlflow_parent.json cut short by a kill, a file: tracking URI MLflow refuses,
a default output folder that cannot be made, trials without a final performance; and a step
that fails midway leaving the previous outputs as they were. Each case was a traceback, a
refusal of the whole report or a silent omission before."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_dashboards import _record, write_ray_run

from dashboards import pareto, report, tables
from dashboards.sources import SourceError, load_ray
from records import ARTIFACTS_DIR, PARENT_FILE, PREDICTIONS_ARTIFACT
from records.scratch import host_tag
from records.uris import tracking_uri

SWEEP = "gabor_conv1"
RUN = f"{SWEEP}-demo_20260102-000000"
TRIALS = [(f"{SWEEP}-none-a0-b1-s0", "done", [0.3, 0.5]),
          (f"{SWEEP}-max-a8-b1-s0", "done", [0.3, 0.45]),
          (f"{SWEEP}-min-a8-b1-s0", "done", [0.2, 0.3])]
CONFIG = {"model": "alexnet", "layer": "conv1", "reference": "gabor", "epochs": 2}


def _hits(p, n=120):
    return (np.arange(n) < round(p * n)).astype(np.float32)


def _ray_run(tmp_path, *, predictions=True):
    """A finished three-trial run folder; each trial's final checkpoint holds its
    val_predictions.npz (top-1 hits on the same 120 images) when ``predictions``."""
    run = tmp_path / "ray_results" / RUN
    write_ray_run(run, TRIALS, CONFIG)
    if predictions:
        for tid, _, perf in TRIALS:
            art = run / tid / "checkpoint_000001" / ARTIFACTS_DIR
            art.mkdir(parents=True)
            np.savez_compressed(art / PREDICTIONS_ARTIFACT, image_ids=np.arange(120),
                                top1=_hits(perf[-1]))
    return run


def _damage(path, how):
    if how == "truncated":  # a copy cut short: np.load raised BadZipFile
        path.write_bytes(path.read_bytes()[:200])
    elif how == "unequal_lengths":  # IndexError in Predictions.rows
        np.savez_compressed(path, image_ids=np.arange(120), top1=_hits(0.3, n=60))
    elif how == "nan_hits":  # a hand-made file: NaN ranked above every value in the effects
        hits = _hits(0.3)
        hits[7] = np.nan
        np.savez_compressed(path, image_ids=np.arange(120), top1=hits)
    elif how == "no_common_images":  # ZeroDivisionError building the resample weights
        np.savez_compressed(path, image_ids=np.arange(5000, 5120), top1=_hits(0.3))


@pytest.mark.parametrize("how", ["truncated", "unequal_lengths", "nan_hits",
                                 "no_common_images"])
def test_an_unreadable_predictions_file_is_a_note_naming_it_and_the_report_is_built(
        tmp_path, capsys, how):
    run = _ray_run(tmp_path)
    bad = run / TRIALS[2][0] / "checkpoint_000001" / ARTIFACTS_DIR / PREDICTIONS_ARTIFACT
    _damage(bad, how)
    out = tmp_path / "out"
    assert pareto.main([SWEEP, "--ray-results", str(run), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    summary = json.loads((out / "statistics.json").read_text())
    effect = summary["effects"][SWEEP]
    assert effect["min"]["drop"] == pytest.approx(100 * (0.5 - 0.3))  # point values kept
    assert effect["min"]["low"] is None
    if how == "no_common_images":
        assert "share no image id" in effect["message"]
    else:
        assert str(bad) in effect["message"]
        assert f"note: trial {TRIALS[2][0]}: unreadable per-image validation outcome, " \
               f"{bad}" in captured.out
    if how == "nan_hits":
        assert "1 non-finite hits value(s) (e.g. nan for image 7); accepted: finite values" \
            in effect["message"]
    assert (out / "report.html").read_text().rstrip().endswith("</html>")
    assert sorted(p.name for p in out.iterdir()) == sorted(pareto.FILES)


def test_non_finite_scores_are_refused_not_ranked():
    """mAP scores with NaN or infinity (a hand-made file: trials end as diverged on
    non-finite logits) ranked NaN above every score in the effects' mAP and below every
    score in the trial's own: refused, as unreadable."""
    from dashboards.effects import UNREADABLE, Predictions

    scores = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.4]])
    targets = np.array([[0, 1], [1, 0], [0, 1]])
    Predictions(np.arange(3), scores=scores, targets=targets)  # finite: accepted
    for value in (np.nan, np.inf, -np.inf):
        bad = scores.copy()
        bad[2, 1] = value
        with pytest.raises(UNREADABLE, match=rf"1 non-finite scores value\(s\) \(e\.g\. "
                                             rf"{value} for image 2\); accepted: finite"):
            Predictions(np.arange(3), scores=bad, targets=targets)


def test_a_step_that_fails_leaves_the_previous_outputs_not_half_new(tmp_path, monkeypatch):
    """The tables were written first: a failure in the report left new results.parquet
    beside the previous report, statistics and figures."""
    out = tmp_path / "out"
    pareto.build_outputs(_record([("none", 0.0, 0, [0.5], [0.1]),
                                  ("max", 0.5, 0, [0.4], [0.3])]), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == sorted(pareto.FILES)

    def broken(**kwargs):
        raise RuntimeError("the report failed")

    monkeypatch.setattr(report, "render_report", broken)
    changed = _record([("none", 0.0, 0, [0.6], [0.1]), ("min", -0.5, 0, [0.2], [-0.3])])
    with pytest.raises(RuntimeError, match="the report failed"):
        pareto.build_outputs(changed, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing else left
    monkeypatch.undo()
    path = pareto.build_outputs(changed, out)
    assert path == out / "report.html"
    assert pq.read_table(out / "results.parquet").column("trial_id").to_pylist() == \
        tables.results_table(changed).column("trial_id").to_pylist()
    assert sorted(p.name for p in out.iterdir()) == sorted(pareto.FILES)


def _figure_fails(stem):
    """Fault injection: ``dashboards.figures.<stem>_figure`` raises, as a figure that hits a
    matplotlib error on some name or value would."""
    def broken(*args, **kwargs):
        raise ValueError(f"cannot draw {stem} here")
    return broken


def test_a_figure_that_cannot_be_drawn_costs_that_figure_alone(tmp_path, capsys, monkeypatch):
    """One figure raising failed the whole report: the tables, statistics and the other
    figures, all computed, were thrown away with the staging folder. Now they are written,
    the report and statistics.json say which figure is missing and where its traceback is,
    that figure's older files are removed (they would no longer match), and the command line
    exits 3 after printing the report's path."""
    run = _ray_run(tmp_path)
    out = tmp_path / "out"
    assert pareto.main([SWEEP, "--ray-results", str(run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(pareto.FILES)
    capsys.readouterr()
    old_front = (out / "front.png").read_bytes()

    monkeypatch.setattr(pareto.figures, "epochs_figure", _figure_fails("epochs"))
    # new results: a finished trial's last epoch changed, so the tables must be the new ones
    trial = run / TRIALS[1][0]
    lines = (trial / "result.json").read_text().splitlines()
    last = json.loads(lines[-1])
    last["val_map"] = last["val_performance"] = 0.41
    (trial / "result.json").write_text("\n".join([*lines[:-1], json.dumps(last)]) + "\n")
    assert pareto.main([SWEEP, "--ray-results", str(run), "--out", str(out)]) == 3
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: figure(s) not drawn: epochs (") and \
        str((out / "report.html").resolve()) in err[0], captured.err
    assert f"report: {(out / 'report.html').resolve()}" in captured.out
    assert sorted(p.name for p in out.iterdir()) == sorted(
        set(pareto.FILES) - {"epochs.png", "epochs.svg"})  # the old epochs figure is gone
    results = pq.read_table(out / "results.parquet").to_pylist()
    assert {r["trial_id"]: r["performance"] for r in results}[TRIALS[1][0]] == \
        pytest.approx(0.41)
    stats = json.loads((out / "statistics.json").read_text())
    assert stats[pareto.FIGURES_NOT_DRAWN] == ["epochs"]
    (note,) = [m for m in stats["messages"] if "figure could not be drawn" in m]
    assert note.startswith("the epochs figure could not be drawn (ValueError: cannot draw "
                           "epochs here; traceback: ")
    log = Path(note.split("traceback: ")[1].split(")")[0])
    assert "cannot draw epochs here" in log.read_text()
    assert f"note: {note}" in captured.out
    html = (out / "report.html").read_text()
    assert "the epochs figure could not be drawn" in html
    # the Files list links what was written, not the figure that was not
    assert 'href="front.png"' in html and 'href="epochs.png"' not in html \
        and 'href="epochs.svg"' not in html
    assert html.count("data:image/png;base64,") == 2  # front and filters
    assert (out / "front.png").read_bytes() != old_front  # drawn anew from the new results
    assert not list(out.glob(".building-*"))


def test_a_stage_folder_left_by_a_killed_build_is_removed_by_the_next(tmp_path):
    """A post-processor killed mid-build left its hidden .building-* folder in --out for
    good. The next build removes a stage folder of this host whose lock no process holds; a
    live build's (its lock held, here by another process), a folder without a lock file and
    another host's (a shared file system) are left."""
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    host = host_tag()
    stale, running, bare = (out / f".building-{host}-{name}" for name in ("a1", "b2", "c3"))
    other = out / ".building-elsewhere.example-d4"
    for folder in (stale, other):
        folder.mkdir()
        (folder / ".lock").write_text("")
    bare.mkdir()
    (bare / "results.parquet").write_text("")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"os.mkdir({str(running)!r})\n"
         f"fh = open({str(running / '.lock')!r}, 'w')\n"
         "fcntl.flock(fh, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        pareto.build_outputs(_record([("none", 0.0, 0, [0.5], [0.1]),
                                      ("max", 0.5, 0, [0.4], [0.3])]), out)
        assert not stale.exists()
        assert running.is_dir() and bare.is_dir() and other.is_dir()
    finally:
        holder.kill()
        holder.wait()
    pareto.build_outputs(_record([("none", 0.0, 0, [0.5], [0.1])]), out)  # its holder died
    assert not running.exists() and bare.is_dir() and other.is_dir()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        sorted(pareto.FILES)


def test_a_result_json_cut_short_on_its_last_line_keeps_the_earlier_epochs(tmp_path, capsys):
    run = _ray_run(tmp_path, predictions=False)
    result = run / TRIALS[1][0] / "result.json"
    result.write_text(result.read_text() + '{"epoch": 2.0, "val_performance": 0.4, "val_al')
    record = load_ray(run, SWEEP)
    trial = {t.trial_id: t for t in record.trials}[TRIALS[1][0]]
    assert trial.status == "FINISHED"
    assert trial.history["val_performance"] == ((0, 0.3), (1, 0.45))
    assert any(n.startswith(f"{result}: its last line (3) is cut short") for n in record.notes)
    out = tmp_path / "out"
    assert pareto.main([SWEEP, "--ray-results", str(run), "--out", str(out)]) == 0
    assert f"note: {result}: its last line (3)" in capsys.readouterr().out


def test_a_broken_line_inside_result_json_is_one_line_naming_the_file_and_line(tmp_path,
                                                                                capsys):
    run = _ray_run(tmp_path, predictions=False)
    result = run / TRIALS[1][0] / "result.json"
    lines = result.read_text().splitlines()
    result.write_text(lines[0][:30] + "\n" + lines[1] + "\n")
    with pytest.raises(SourceError, match=rf"^{result} line 1: not a Ray result \("):
        load_ray(run, SWEEP)
    assert pareto.main([SWEEP, "--ray-results", str(run), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {result} line 1: not a Ray result") and err.count("\n") == 1


def test_a_cut_mlflow_parent_json_reads_as_absent_and_says_so(tmp_path):
    run = _ray_run(tmp_path, predictions=False)
    assert load_ray(run, SWEEP).parent_run_id == "p123"
    (run / PARENT_FILE).write_text('{"run_id": "p1')
    record = load_ray(run, SWEEP)
    assert record.parent_run_id is None and len(record.trials) == 3
    assert any(n.startswith(f"{run / PARENT_FILE}: unreadable (") for n in record.notes)
    (run / PARENT_FILE).unlink()  # absent: the same, without a note
    record = load_ray(run, SWEEP)
    assert record.parent_run_id is None and not record.notes


def test_a_file_tracking_uri_that_mlflow_refuses_is_one_line_with_its_way_out(
        tmp_path, capsys, monkeypatch):
    """MLflow 3 refuses its file store: an MlflowException traceback file and exit 1, its
    advice (MLFLOW_ALLOW_FILE_STORE=true) cut off, for a URI listed as accepted."""
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = f"file://{tmp_path / 'mlruns'}"
    assert pareto.main([SWEEP, "--mlflow-uri", uri, "--no-log"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: --mlflow-uri {uri!r}: MLflow's file store is in maintenance mode "
                   f"and refused unless MLFLOW_ALLOW_FILE_STORE=true is set; accepted: "
                   f"sqlite:///PATH.db or http(s)://HOST:PORT (move a file store's runs into "
                   f"one with `mlflow migrate-filestore`), or set MLFLOW_ALLOW_FILE_STORE=true\n")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's own way out still works
    assert tracking_uri(uri) == uri


def test_a_default_output_folder_that_cannot_be_made_is_one_line(tmp_path, capsys,
                                                                  monkeypatch):
    run = _ray_run(tmp_path, predictions=False)
    work = tmp_path / "work"
    work.mkdir()
    (work / "outputs").write_text("keep me\n")
    monkeypatch.chdir(work)
    assert pareto.main([SWEEP, "--ray-results", str(run)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: output folder {work}/outputs/{SWEEP}-demo/{RUN} (the default, "
                   f"outputs/<experiment>/<run> in the working folder): {work}/outputs is not "
                   f"a folder; accepted: a folder this user can create or write (name one "
                   f"with --out DIR)\n")
    assert (work / "outputs").read_text() == "keep me\n"


def test_a_full_disk_under_the_output_folder_is_named_in_the_one_line(tmp_path, capsys):
    """--out on a file system that is full (probed at stop 37 on a 300 KB tmpfs): the line was
    `error: OSError: [Errno 28] No space left on device (full traceback: ...)`, naming no
    folder. It now names the full one and what to do; the earlier files stay as they were.
    A real full file system: a small tmpfs (mounting needs root; skipped without it)."""
    run = _ray_run(tmp_path, predictions=False)
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("a tmpfs cannot be mounted here (not root)")
    try:
        out = disk / "report"
        out.mkdir()
        (out / "report.html").write_text("the earlier report")
        with open(disk / "filler", "wb", buffering=0) as fh:  # every block of the disk
            with contextlib.suppress(OSError):
                while True:
                    fh.write(b"\0" * 4096)
        assert pareto.main([SWEEP, "--ray-results", str(run), "--out", str(out)]) == 1
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert re.fullmatch(
            rf"error: OSError: \[Errno 28\] No space left on device \(full traceback: \S+\); "
            rf"no space left on --out {re.escape(str(out))} \(\d+ bytes free\): free space "
            rf"there \(or give another folder\), then run it again", err), err
        assert (out / "report.html").read_text() == "the earlier report"
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_an_unexpected_failure_from_a_full_disk_says_so_without_a_full_folder():
    """A full disk whose space came back before the line was written (a cache builder's
    temporary folder removed: h5py's ENOSPC message was clipped before it said so), or a
    cut-short file's reader's error raised from one, still says what happened."""
    import errno

    from references.cache import unexpected_error_line

    try:
        try:
            raise OSError(errno.ENOSPC, "Can't synchronously write data " + "x" * 400)
        except OSError as full:
            raise EOFError("Ran out of input") from full
    except EOFError as exc:
        line = unexpected_error_line(exc, {})
    assert line.startswith("error: EOFError: Ran out of input (full traceback: ")
    assert line.endswith("); no space left on a disk it writes to: free space there (or give "
                         "another folder), then run it again")
    assert "no space" not in unexpected_error_line(EOFError("Ran out of input"), {})


def test_the_unexpected_error_line_survives_folders_it_cannot_look_at(tmp_path, monkeypatch):
    """The full-disk note must never cost the line itself (the review of stop 37: a folder
    under one the user may not search, or a working folder deleted, raised inside the CLIs'
    last handler, a traceback instead of one line): such folders are left out."""
    from references.cache import low_space, unexpected_error_line

    (tmp_path / "file").write_text("")
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()

    def folders():
        return {"the working folder": Path.cwd()}  # FileNotFoundError

    line = unexpected_error_line(RuntimeError("a bug"), folders)
    assert line.startswith("error: RuntimeError: a bug (full traceback: ") and line.endswith(")")
    assert low_space({"under a file": tmp_path / "file" / "x", "none": None,
                      "relative": Path("ray_results")}) == []


def test_a_seed_without_its_baseline_is_said_to_be_unpaired():
    """Seed 1's baseline did not finish: its trials' degradation falls back on seed 0's
    baseline, silently (the effects and the tables pair by seed elsewhere)."""
    record = _record([("none", 0.0, 0, [0.5], [0.1]), ("min", -0.5, 0, [0.3], [-0.2]),
                      ("min", -0.5, 1, [0.35], [-0.1]), ("max", 0.5, 1, [0.45], [0.3])])
    notes = pareto.diagnose(record, tables.results_table(record))
    assert ("condition c: no finished baseline of seed(s) 1: their trials' degradation is "
            "from the mean baseline of seed(s) 0, not paired by seed") in notes
    paired = _record([("none", 0.0, 0, [0.5], [0.1]), ("min", -0.5, 0, [0.3], [-0.2])])
    assert not [n for n in pareto.diagnose(paired, tables.results_table(paired))
                if "not paired" in n]


def test_finished_trials_without_a_final_performance_are_said_to_be_left_out():
    nan, inf = float("nan"), float("inf")
    record = _record([("none", 0.0, 0, [0.5], [0.1]), ("max", 0.5, 0, [0.4, nan], [0.2, 0.3]),
                      ("min", -0.5, 0, [0.3, -inf], [0.0, -0.2]),
                      ("min", -0.8, 0, [0.3], [-0.3])])
    notes = pareto.diagnose(record, tables.results_table(record))
    assert ("condition c: finished without a final validation performance (NaN or infinite "
            "at the last epoch): c-max-a0.5-b1-s0, c-min-a0.5-b1-s0; off the fronts and "
            "statistics") in notes


@pytest.mark.parametrize("state, title", [
    ("stopped at epoch 1 of 2", "interrupted"), ("no epoch finished", "interrupted"),
    ("not started", "interrupted"), ("done", None)])
def test_a_ray_run_that_did_not_reach_its_end_is_labelled_partial(tmp_path, capsys, state,
                                                                    title):
    """Read from the run folder, an interrupted sweep's report was titled as complete, with no
    --resume hint (only the MLflow parent's KILLED status labelled it); the note now also
    reaches statistics.json and the console."""
    run = tmp_path / "ray_results" / RUN
    write_ray_run(run, [*TRIALS[:2], (TRIALS[2][0], state, [0.2])], CONFIG)
    assert pareto.main([SWEEP, "--ray-results", str(run), "--out", str(tmp_path / "out")]) == 0
    html = (tmp_path / "out" / "report.html").read_text()
    messages = json.loads((tmp_path / "out" / "statistics.json").read_text())["messages"]
    printed = capsys.readouterr().out
    if title is None:
        assert "PARTIAL" not in html and not any("PARTIAL" in m for m in messages)
        return
    assert f"PARTIAL ({title}) Sweep {SWEEP}" in html
    (note,) = [m for m in messages if m.startswith("PARTIAL")]
    assert f"1 of 3 trials unfinished, e.g. {TRIALS[2][0]} " in note
    assert note.endswith(f"Continue it (with its data, tracking and storage options) with "
                         f"sweeps/run.py {SWEEP} --resume")
    assert f"note: {note}" in printed
    # an Optuna search (its fingerprint says so) resumes with its search options, which its
    # fingerprint recorded (without them, --resume looks for a grid run)
    (run / "sweep_fingerprint.json").write_text(json.dumps({"sweep": SWEEP, "search": "optuna",
                                                            "num_samples": 6}))
    assert pareto.main([SWEEP, "--ray-results", str(run), "--out", str(tmp_path / "o2")]) == 0
    messages = json.loads((tmp_path / "o2" / "statistics.json").read_text())["messages"]
    (note,) = [m for m in messages if m.startswith("PARTIAL")]
    assert note.endswith(f"Continue it (with its data, tracking and storage options) with "
                         f"sweeps/run.py {SWEEP} --search optuna --num-samples 6 --resume"), note
    # and a grid run's --set, --seeds, --only and --data, which a resume must repeat (the
    # command lacked them, and the driver refused it: "started with a different --set")
    (run / "sweep_fingerprint.json").write_text(json.dumps(
        {"sweep": SWEEP, "search": "grid", "num_samples": None, "seeds": 2, "data": "paper",
         "overrides": {"steps_per_epoch": "20", "epochs": "4"}, "only": [f"{SWEEP}-max-*"]}))
    assert pareto.main([SWEEP, "--ray-results", str(run), "--out", str(tmp_path / "o3")]) == 0
    messages = json.loads((tmp_path / "o3" / "statistics.json").read_text())["messages"]
    (note,) = [m for m in messages if m.startswith("PARTIAL")]
    assert note.endswith(f"Continue it (with its data, tracking and storage options) with "
                         f"sweeps/run.py {SWEEP} --data paper --seeds 2 --set epochs=4 --set "
                         f"steps_per_epoch=20 --only '{SWEEP}-max-*' --resume"), note


def test_a_ray_run_whose_driver_has_not_ended_counts_the_trials_finished_so_far(tmp_path,
                                                                                 capsys):
    """Read from the run folder while the sweep runs (probed at stop 37), every trial was
    RUNNING, finished ones included (the manifest written at the start says "pending" until
    the driver ends), and the report said the sweep did not run to its end, 0 trials
    finished, with a --resume of the live run. A pending trial that reported its last epoch
    is finished; the run is labelled running, as a RUNNING parent run is in MLflow."""
    from dashboards.sources import load_ray

    run = tmp_path / "ray_results" / RUN
    write_ray_run(run, [(TRIALS[0][0], "pending", [0.3, 0.5]),  # trained both epochs
                        (TRIALS[1][0], "pending", [0.3]),  # one of two
                        (TRIALS[2][0], "done", [0.2, 0.3])], CONFIG)
    record = load_ray(run, SWEEP)
    assert {t.trial_id: t.status for t in record.trials} == {
        TRIALS[0][0]: "FINISHED", TRIALS[1][0]: "RUNNING", TRIALS[2][0]: "FINISHED"}
    assert record.parent_status == "RUNNING"
    assert pareto.main([SWEEP, "--ray-results", str(run), "--out", str(tmp_path / "out")]) == 0
    html = (tmp_path / "out" / "report.html").read_text()
    (note,) = [m for m in json.loads((tmp_path / "out" / "statistics.json").read_text())
               ["messages"] if m.startswith("PARTIAL")]
    assert f"PARTIAL (running) Sweep {SWEEP}" in html
    assert note.startswith("PARTIAL: its driver has not ended the run (its manifest still lists "
                           "trials as pending: the sweep is running, or its driver was stopped "
                           "without ending it); the report covers the 2 trial(s) finished so "
                           "far, of the 3 started. Post-process it again when the sweep has "
                           "ended"), note
    assert f"{SWEEP}: 2/3 trials finished" in capsys.readouterr().out


def test_an_mlflow_sweep_whose_driver_crashed_is_labelled_partial(tmp_path):
    """A FAILED parent (the driver crashed) with trials left RUNNING was reported as a
    complete sweep."""
    record = _record([("none", 0, 0, [0.5], [0.0]), ("max", 0.5, 0, [0.4], [0.3]),
                      ("min", -0.5, 0, [0.3], [-0.3])])
    trials = list(record.trials)
    trials[2] = dataclasses.replace(trials[2], status="RUNNING")
    record = dataclasses.replace(record, trials=tuple(trials), parent_status="FAILED")
    title, note = pareto._partial_note(record)
    assert title == "unfinished" and "parent run" not in note
    assert f"1 of 3 trials unfinished, e.g. {trials[2].trial_id} RUNNING" in note
    done = dataclasses.replace(record, trials=tuple(
        dataclasses.replace(t, status="FINISHED") for t in trials), parent_status="FINISHED")
    assert pareto._partial_note(done) is None
    killed = dataclasses.replace(done, parent_status="KILLED")
    assert pareto._partial_note(killed)[0] == "interrupted"
    assert pareto._partial_note(killed)[1].endswith("--resume")
    # an Optuna search resumes with its search options (--resume alone finds no grid run)
    searched = dataclasses.replace(killed, parent_tags={"search": "optuna",
                                                        "num_samples": "4"})
    assert pareto._partial_note(searched)[1].endswith(
        "--search optuna --num-samples 4 --resume")


def test_a_store_or_run_folder_this_user_may_not_open_is_one_line_exit_2(tmp_path, capsys,
                                                                         monkeypatch):
    """Post-processing a colleague's results: a store or run folder made under a 077 umask,
    or a store readable but not writable (the report built, then logging it refused), was
    "an unexpected error" (exit 1, a traceback file). It is bad input: one line naming the
    file and the ways on (the owner's chmod, --no-log), exit 2. The operating system's own
    refusal stands in for the colleague's file at the point where the store is read
    (writing /sys/kernel/notes is refused even to root)."""
    run = _ray_run(tmp_path, predictions=False)

    def refused(*args, **kwargs):
        with open("/sys/kernel/notes", "w"):
            pass

    monkeypatch.setattr(pareto, "postprocess_ray", refused)
    assert pareto.main([SWEEP, "--ray-results", str(run), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: /sys/kernel/notes: this user may not open it \(Permission "
                        r"denied\); accepted: a tracking store and run folders this user can "
                        r"read \(their owner can grant it: chmod -R a\+rX\), and --no-log "
                        r"where the store is not yours to write\n", err), err


def test_a_store_that_refuses_the_logging_says_the_report_is_written(tmp_path, monkeypatch):
    """A colleague's store this user may read but not write: the report was built, then the
    line named an internal temporary file of MLflow's upload and did not say the report
    was there. It says so now, with --no-log as the way on (exit 2, as before)."""
    def refused(*args, **kwargs):
        with open("/sys/kernel/notes", "w"):  # the system's refusal, even to root
            pass

    from dashboards import sources

    monkeypatch.setattr(pareto, "_log", refused)
    monkeypatch.setattr(sources, "URI_FROM", "--mlflow-uri")  # (as main sets it per call)
    path = tmp_path / "o" / "report.html"
    with pytest.raises(SourceError, match="^" + re.escape(
            f"report written ({path}), but --mlflow-uri sqlite:///x.db refused this user its "
            f"logging to run abc (Permission denied); accepted: --no-log, or a store this "
            f"user may write") + "$"):
        pareto._log_or_say("sqlite:///x.db", "abc", tmp_path / "o", path)
