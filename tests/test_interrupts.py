"""Interrupts and failures a sweep's driver must end honestly, with real processes: a signal
at each step of the driver, Ctrl-C and SIGTERM to an Optuna search or the driver's whole
process group, a second driver of the same experiment, a trial that diverges, a trial too
large for any node, data found malformed only when read in full, Tune itself failing. Split
from test_reliability.py (its helpers are shared from there) so that the two halves run on
different workers of the README's command."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_reliability import REPO, SWEEP, _runs_in, _smoke, run_cli


def test_a_second_driver_of_the_same_experiment_is_refused_while_the_first_runs(tmp_path):
    """Two real drivers, one experiment, one storage: the second is refused in one line that
    names the first (its pid), starts nothing and records nothing; the first finishes."""
    first = subprocess.Popen([sys.executable, str(REPO / "sweeps" / "run.py"),
                              *_smoke("--set", "epochs=3", tmp=tmp_path)], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    holder = tmp_path / "ray" / f"{SWEEP}-smoke.driver.json"
    deadline = time.monotonic() + 120
    while not holder.is_file():
        assert first.poll() is None, first.communicate()[0][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    second = run_cli(*_smoke(tmp=tmp_path), cwd=tmp_path)
    out, _ = first.communicate(timeout=600)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
    assert second.stderr.strip().count("\n") == 0
    assert f"another driver is running {SWEEP}-smoke" in second.stderr
    assert f"pid {first.pid}" in second.stderr
    assert first.returncode == 0, out[-3000:]
    runs = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(
        [MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_experiment_by_name(
            f"{SWEEP}-smoke").experiment_id])
    assert len([r for r in runs if "mlflow.parentRunId" not in r.data.tags]) == 1
    assert len(list((tmp_path / "ray").glob(f"{SWEEP}-smoke_*"))) == 1
    assert not holder.exists()  # released


def test_a_trial_larger_than_any_node_is_refused_before_anything_starts(tmp_path):
    """--cpus-per-trial above what the (local) cluster's largest node has used to leave every
    trial PENDING forever: now one line, exit 2, no MLflow run."""
    cpus = (os.cpu_count() or 1) + 1
    proc = run_cli(*_smoke("--cpus-per-trial", str(cpus), tmp=tmp_path), cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]  # Ray's INFO apart
    assert f"asks for {cpus} CPUs but the largest node of the Ray cluster has" in line
    assert _runs_in(tmp_path / "mlflow.db") == []


def test_a_data_file_found_malformed_only_when_read_in_full_records_nothing(tmp_path):
    """The dry run reads NSD headers only, not the COCO annotation files (hundreds of MB).
    One of those found malformed while the run prepares its data: one line naming the file,
    exit 2, no traceback file, and no MLflow run (the data is prepared before the parent run
    is created)."""
    import shutil

    from references.simulated import generate_nsd_like

    sim = generate_nsd_like(n_images=30, n_subjects=1, n_categories=4, repeats=2)
    coco = tmp_path / "coco"
    shutil.copytree(sim.coco_annotations, coco)
    train = coco / "instances_train2017.json"
    data = json.loads(train.read_text())
    data["images"] = data["images"][1:]  # an image the stim info puts in train2017
    train.write_text(json.dumps(data))
    argv = [SWEEP, "--data", "nsd", "--nsd-root", str(sim.nsd_root), "--coco-annotations",
            str(coco), "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--storage",
            str(tmp_path / "ray"), "--set", "epochs=1", "--set", "steps_per_epoch=1",
            "--set", "batch_size=8", "--set", "val_folds=2",  # a 30-image release
            "--only", f"{SWEEP}-none-*", "--cpus-per-trial", "1", "--gpus-per-trial", "0"]
    env = {**os.environ, "ALIGNSWEEP_CACHE": str(tmp_path / "cache")}  # nothing prepared yet
    dry = subprocess.run([sys.executable, str(REPO / "sweeps" / "run.py"), *argv, "--dry-run"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert dry.returncode == 0, dry.stderr[-2000:]
    proc = subprocess.run([sys.executable, str(REPO / "sweeps" / "run.py"), *argv],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]  # Ray's INFO apart
    assert line.startswith(f"error: {train}: 1 image(s) that nsd_stim_info_merged.csv puts in "
                           f"train2017 are not in its 'images'"), line
    assert "full traceback" not in line
    assert _runs_in(tmp_path / "mlflow.db") == []


def test_a_run_whose_tune_fails_ends_its_records_and_says_how_to_continue(tmp_path):
    """Tune itself failing once the records are made (probed at stop 37: its state written
    to a storage disk that filled, then read back cut short) ended the parent run FAILED but
    said nothing more than the error: no resume line. The driver now says the run stopped,
    the parent's state and the command that continues it, then the error's one line."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import sweeps.execute\n"
        "def _fit(*args, **kwargs):\n"
        "    raise EOFError('Ran out of input')\n"
        "sweeps.execute._fit = _fit\n")
    proc = subprocess.run([sys.executable, str(REPO / "sweeps" / "run.py"), *_smoke(tmp=tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": f"{inject}{os.pathsep}{REPO}"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    (said,) = [x for x in proc.stdout.splitlines() if x.startswith("sweep stopped by")]
    assert said.startswith("sweep stopped by the error below; the parent run is FAILED and "
                           "the trials that finished keep their records. Continue with: ")
    assert said.endswith(f"sweeps/run.py {shlex.join(_smoke(tmp=tmp_path))} --resume")
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: EOFError: Ran out of input (full traceback: ")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (parent,) = client.search_runs([client.get_experiment_by_name(f"{SWEEP}-smoke")
                                    .experiment_id])
    assert parent.info.status == "FAILED"


def test_the_trials_import_the_copy_of_the_code_the_driver_runs(tmp_path):
    """A copy of the project (an export, another checkout) run by its path from another
    folder: sweeps/run.py put the copy on the driver's path only, so each trial either
    failed ("No module named 'sweeps'", 370 lines of Ray tracebacks) or, beside an installed
    copy (this venv's editable install of the repository), silently trained with that
    copy's code. The trials now import the driver's copy."""
    copy = tmp_path / "export"
    for package in ("sweeps", "trainable", "references", "records", "dashboards"):
        shutil.copytree(REPO / package, copy / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    marker = tmp_path / "imports.txt"
    with (copy / "trainable" / "__init__.py").open("a") as fh:
        fh.write(f"\nimport sys as _s\nwith open({str(marker)!r}, 'a') as _fh:\n"
                 f"    _fh.write(f'{{_s.argv[0]}}\\n')\n")
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(copy / "sweeps" / "run.py"),
         *_smoke("--only", f"{SWEEP}-none-*", tmp=tmp_path)],
        cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert "No module named" not in out + err
    # the driver and the post-processor run the copy's scripts; a Ray worker is the trial
    workers = [line for line in marker.read_text().splitlines()
               if not line.startswith(str(copy))]
    assert workers, "no trial process imported the copy's code"


def test_code_edited_after_the_driver_started_is_refused_by_its_trials(tmp_path):
    """The trials import the driver's folder, but a node where it does not exist imports its
    own copy, and a folder on a shared file system can be edited while a sweep runs: the
    trials trained with other code than the run recorded, and nothing said so. Each trial now
    compares a digest of the code it imports with the driver's (the parent's ``code_sha256``)
    and refuses, naming both. Here a copy of the project is edited after the driver has
    read it and before its trials start."""
    import socket

    copy = tmp_path / "export"
    for package in ("sweeps", "trainable", "references", "records", "dashboards"):
        shutil.copytree(REPO / package, copy / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    go = tmp_path / "go"
    popen = subprocess.Popen(
        [sys.executable, "-c", _PAUSED_DRIVER, "sweeps.execute", "_quiet_tune_advice",
         str(copy / "sweeps" / "run.py"), *_smoke("--only", f"{SWEEP}-none-*", tmp=tmp_path)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(copy), "TEST_GO_FILE": str(go)})
    lines = _until_paused(popen)
    target = copy / "trainable" / "alignment.py"
    target.write_text(target.read_text() + "\n# edited while the sweep runs\n")
    go.touch()
    out = "".join(lines) + popen.communicate(timeout=600)[0]
    assert popen.returncode == 1, out[-3000:]
    key = f"{SWEEP}-none-a0-b1-s0"
    (line,) = [x for x in out.splitlines() if x.startswith(f"{key}: ")]
    host = socket.gethostname()
    assert line.startswith(f"{key}: CodeMismatch: node {host} imports this project from "
                           f"{copy}, whose code (sha256 "), line
    assert f"is not the driver's ({copy} on {host}, sha256 " in line, line
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (parent,) = [r for r in client.search_runs(
        [client.get_experiment_by_name(f"{SWEEP}-smoke").experiment_id])
        if "mlflow.parentRunId" not in r.data.tags]
    assert re.fullmatch(r"[0-9a-f]{64}", parent.data.tags["code_sha256"])
    assert f"sha256 {parent.data.tags['code_sha256'][:12]})" in line


def test_a_trial_that_diverges_is_not_trained_again_by_tunes_retries(tmp_path):
    """Tune retries a failed trial twice (for lost nodes). A divergence repeats itself: the
    retries now end at once with the first attempt's error, which the summary shows, and
    the trial's MLflow run keeps it."""
    proc = run_cli(*_smoke("--set", "lr=1000", "--only", f"{SWEEP}-none-*", tmp=tmp_path),
                   cwd=tmp_path, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    key = f"{SWEEP}-none-a0-b1-s0"
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith(f"{key}: ")]
    assert line.startswith(f"{key}: TrialDiverged: non-finite loss"), line
    (folder,) = (tmp_path / "ray").glob(f"{SWEEP}-smoke_*/{key}")
    assert (folder / "failed_for_good.txt").read_text() == line.removeprefix(f"{key}: ")
    # the last attempt's error is the retry's, raised before training
    assert "RepeatedFailure: TrialDiverged: non-finite loss" in (folder / "error.txt").read_text()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(f"{SWEEP}-smoke").experiment_id])
    (child,) = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert child.info.status == "FAILED"
    assert child.data.tags["error"].startswith("TrialDiverged: non-finite loss")
    # Tune printed each attempt's traceback above that one line (three of them, 150 lines)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]


# The driver, with a pause injected into one of its steps (the first call only): a signal
# sent while it waits lands in that step, as a Ctrl-C or `docker stop` a second later would.
# With TEST_GO_FILE in its environment the pause ends when that file exists.
_PAUSED_DRIVER = """\
import importlib, os, runpy, sys, time
module, name, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
owner = importlib.import_module(module)
step = getattr(owner, name)
calls = []
def paused(*args, **kwargs):
    if not calls:
        calls.append(1)
        print(f"TEST: paused in {name}", flush=True)
        go, until = os.environ.get("TEST_GO_FILE"), time.time() + 120
        while time.time() < until and not (go and os.path.exists(go)):
            time.sleep(0.1)
    return step(*args, **kwargs)
setattr(owner, name, paused)
sys.argv = [argv[0], *argv[1:]]
runpy.run_path(argv[0], run_name="__main__")
"""


def _until_paused(popen: subprocess.Popen) -> list[str]:
    """The paused driver's output lines up to its pause."""
    lines = []
    for line in popen.stdout:
        lines.append(line)
        if line.startswith("TEST: paused in"):
            break
    return lines


def _signal_a_paused_driver(tmp_path: Path, module: str, name: str):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "ray"
    popen = subprocess.Popen(
        [sys.executable, "-c", _PAUSED_DRIVER, module, name, str(REPO / "sweeps" / "run.py"),
         "gabor_conv1", "--smoke-test", "--mlflow-uri", uri, "--storage", str(storage)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = _until_paused(popen)
    popen.send_signal(signal.SIGTERM)  # a scheduler's kill: the driver ends it as Ctrl-C
    out = "".join(lines) + popen.communicate(timeout=300)[0]
    client = MlflowClient(uri)
    parents = client.search_runs([client.get_experiment_by_name(
        "gabor_conv1-smoke").experiment_id], filter_string="tags.sweep = 'gabor_conv1'")
    (parent,) = [r for r in parents if "mlflow.parentRunId" not in r.data.tags]
    return popen.returncode, out, client, parent, storage


@pytest.mark.parametrize("module, name, phase", [
    ("sweeps.tracking", "replay_journal", "replay"),
    ("sweeps.execute", "_point_at", "records"),
])
def test_a_signal_after_the_trials_or_before_them_leaves_a_run_resume_can_end(
        tmp_path, module, name, phase):
    """SIGTERM (or Ctrl-C) once Tune had ended, while the driver replayed the trials'
    journals: the driver died without a word (SIGTERM) or said only "interrupted" (Ctrl-C),
    the parent run stayed RUNNING and no report or resume line came. Right after the parent
    run was made, the resume pointer was never written: --resume could not find the run.
    Now the step in progress is what stops; the parent is ended KILLED and tagged, the
    resume line printed, the report built and the pointer names the run."""
    code, out, client, parent, storage = _signal_a_paused_driver(tmp_path, module, name)
    assert code == 130, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert parent.info.status == "KILLED" and parent.data.tags["interrupted"] == "true", out
    # the command to paste, with the run's own options (it said "... gabor_conv1 --resume (and
    # the same options)", and the options it meant were for the user to find)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert (f"Continue with: {sys.executable} {REPO / 'sweeps' / 'run.py'} gabor_conv1 "
            f"--smoke-test --mlflow-uri {uri} --storage {storage} --resume\n") in out, out[-3000:]
    run_dir = storage / (storage / "gabor_conv1-smoke.latest").read_text().strip()
    assert json.loads((run_dir / "mlflow_parent.json").read_text())["run_id"] == \
        parent.info.run_id
    if phase == "replay":  # the trials had ended: their runs are finished, the report built
        assert "replay interrupted:" in out and "sweep interrupted: after its trials ended" \
            in out, out[-3000:]
        children = client.search_runs([parent.info.experiment_id],
                                      filter_string=f"tags.`mlflow.parentRunId` = "
                                                    f"'{parent.info.run_id}'")
        assert len(children) == 3 and {r.info.status for r in children} == {"FINISHED"}
        report = Path(out.rsplit("report: ", 1)[1].split()[0])
        assert "PARTIAL (interrupted)" in report.read_text()
    else:
        assert "sweep interrupted before its trials started" in out, out[-3000:]


def _signalled_at_first_checkpoint(argv: list[str], cwd: Path, storage: Path, *,
                                   group: bool) -> tuple[int, str]:
    """Run the driver ``argv`` and send it SIGTERM once a trial wrote its first checkpoint
    under ``storage``: to the driver alone, or to its whole process group (``group``: the
    driver leads a session of its own). Returns its exit status and output."""
    popen = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=group)
    try:
        deadline = time.monotonic() + 300
        while not list(storage.glob("*/*/checkpoint_000000")):
            assert popen.poll() is None, popen.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no trial reached a checkpoint"
            time.sleep(0.3)
        if group:
            os.killpg(popen.pid, signal.SIGTERM)
        else:
            popen.send_signal(signal.SIGTERM)
        out = popen.communicate(timeout=300)[0]
    finally:
        if popen.poll() is None:
            if group:
                os.killpg(popen.pid, signal.SIGKILL)
            else:
                popen.kill()
            popen.wait()
    return popen.returncode, out


def test_a_signal_stops_an_optuna_search_and_resume_continues_it(tmp_path):
    """An adaptive search ran one Tune experiment per condition and side (the baseline, then
    each direction's samples). SIGTERM (or Ctrl-C) during the baseline stopped that
    experiment, and the driver went on to start the next ones and ran them to their end:
    every condition of `paper`, hours of a cluster after the user asked it to stop. The
    search is one experiment now, and the first signal ends it: exit 130, no trial run to its
    end after the signal, the parent KILLED. And it could not be resumed (its studies were
    not saved; --resume was refused): run again, from its first trial. --resume now trains
    the stopped trials on from their checkpoints under the same parent run, then draws the
    samples not yet drawn from studies that know every trial before them."""
    import dataclasses
    import pickle

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "ray"
    argv = [sys.executable, str(REPO / "sweeps" / "run.py"), SWEEP, "--smoke-test", "--search",
            "optuna", "--num-samples", "4", "--set", "epochs=4", "--mlflow-uri", uri,
            "--storage", str(storage)]
    # a scheduler's kill: the driver ends it as Ctrl-C
    returncode, out = _signalled_at_first_checkpoint(argv, tmp_path, storage, group=False)
    assert returncode == 130, out[-3000:]
    # one experiment for the whole search; 4 epochs each, none of the 3 trials reached its end
    assert [p.name for p in storage.iterdir() if p.is_dir()] == [
        next(storage.glob(f"{SWEEP}-smoke_*")).name], out[-3000:]
    # the samples not yet drawn are counted too (it said "3 trial(s) did not finish" where
    # the report then counted 2 stopped and 3 never started)
    said = re.search(r"sweep interrupted: ([1-3]) trial\(s\) did not finish \([^)]*\)(, and "
                     r"([1-4]) samples? (?:were|was) not drawn yet)?;", out)
    assert said, out[-3000:]
    # together they are what the report's note counts (a drawn trial whose worker had not
    # yet made its run is one the driver stopped and the report never saw start)
    unfinished, never = (re.search(rf"(\d+) of 5 trials {what}", out)
                         for what in ("unfinished", r"have no run \(never started\)"))
    assert int(said.group(1)) + int(said.group(3) or 0) == sum(
        int(m.group(1)) for m in (unfinished, never) if m), out[-3000:]
    assert f"Continue with: {sys.executable} {REPO / 'sweeps' / 'run.py'} {SWEEP} " \
           f"--smoke-test --search optuna --num-samples 4 --set epochs=4 --mlflow-uri {uri} " \
           f"--storage {storage} --resume\n" in out, out[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(f"{SWEEP}-smoke").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "KILLED", out[-3000:]
    # the baseline and the first side shared the two slots; the other side had none yet
    children = [r for r in runs if r is not parent]
    assert {r.data.tags["direction"] for r in children} <= {"none", "max"}, out[-3000:]
    assert children and all(r.info.status != "FINISHED" for r in children), out[-3000:]
    assert json.loads(parent.data.tags["planned"]) == {SWEEP: 5}  # per condition: baseline + 4
    # the partial report's resume line is the run's own command: it named --search and
    # --num-samples but left out --set, --weights, --cpus-per-trial (rebuilt from tags)
    stats = json.loads((tmp_path / "outputs" / f"{SWEEP}-smoke" / parent.info.run_id
                        / "statistics.json").read_text())
    (note,) = [m for m in stats["messages"] if m.startswith("PARTIAL")]
    assert note.endswith(f"Continue it with sweeps/run.py {SWEEP} --smoke-test --search optuna "
                         f"--num-samples 4 --set epochs=4 --mlflow-uri {uri} --storage "
                         f"{storage} --resume"), note
    # a search has its own pointer: it leaves a grid run's to that run
    run_dir = next(storage.glob(f"{SWEEP}-smoke_*"))
    assert (storage / f"{SWEEP}-smoke.optuna.latest").read_text() == run_dir.name
    assert not (storage / f"{SWEEP}-smoke.latest").exists()

    dry = subprocess.run([*argv, "--resume", "--dry-run"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert re.search(rf"^resume: {re.escape(str(run_dir))}: 0 of 5 trials finished there; the "
                     rf"resume runs the other 5 \(.*{SWEEP}-none-a0-b1-s0.*, then (1 sample|"
                     rf"[23] samples) not yet drawn\)$", dry.stdout,
                     re.M), dry.stdout + dry.stderr
    # A driver killed outright (SIGKILL) after a sample's worker made its run but before Tune
    # next saved its state (every 10 s or more) left a run the resumed search never knew (it
    # drew the sample again): RUNNING for good, and the finished sweep's report was PARTIAL.
    from records import TrialKey

    lost = TrialKey(SWEEP, "max", 0.3, 1.0, 0, sample="lost_00099").format()
    orphan = client.create_run(parent.info.experiment_id, run_name=lost, tags={
        "mlflow.parentRunId": parent.info.run_id, "trial_id": lost, "condition": SWEEP,
        "direction": "max"})
    proc = subprocess.run([*argv, "--resume"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert f"resuming {run_dir}: only unfinished trials run, then the samples not yet " \
           f"drawn" in proc.stdout, proc.stdout[-3000:]
    assert (f"{lost}: its MLflow run {orphan.info.run_id} was made before the driver was "
            f"killed, but Tune's saved state never knew the trial") in proc.stdout, \
        proc.stdout[-3000:]
    gone = client.get_run(orphan.info.run_id).info
    assert (gone.status, gone.lifecycle_stage) == ("KILLED", "deleted")
    stats = json.loads((tmp_path / "outputs" / f"{SWEEP}-smoke" / parent.info.run_id
                        / "statistics.json").read_text())
    assert not [m for m in stats["messages"] if m.startswith("PARTIAL")], stats["messages"]
    runs = client.search_runs([parent.info.experiment_id])
    assert [r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags] == [
        parent.info.run_id]  # the same parent run, now finished
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    # each trial one run, the stopped ones trained on in theirs: the baseline and 4 samples
    children = [r for r in runs if r.info.run_id != parent.info.run_id]
    assert sorted(r.data.tags["direction"] for r in children) == [
        "max", "max", "min", "min", "none"], proc.stdout[-3000:]
    assert all(r.info.status == "FINISHED" for r in children), proc.stdout[-3000:]
    # the studies as Tune saved them last: each side's two samples, told their scores
    (state,) = sorted(run_dir.glob("searcher-state-*.pkl"))[-1:]
    sides = pickle.loads(state.read_bytes())["sides"]
    told = sorted(tuple(t.values) for side in sides for t in side["study"].trials)
    assert [len(side["study"].trials) for side in sides] == [2, 2]
    assert told == sorted((r.data.metrics["val_performance"], r.data.metrics["val_alignment"])
                          for r in children if r.data.tags["direction"] != "none")
    # A driver killed outright (SIGKILL, a lost machine) never updates the manifest it wrote
    # at its start, every trial "pending": the dry run said no trial had finished. The count
    # comes from Ray Tune's state, which the resume restores.
    from records import read_manifest, write_manifest

    write_manifest(run_dir, [dataclasses.replace(e, state="pending")
                             for e in read_manifest(run_dir)],
                   write_text=lambda path, text: Path(path).write_text(text))
    dry = subprocess.run([*argv, "--resume", "--dry-run"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert (f"resume: {run_dir}: 5 of 5 trials finished there; the resume runs the other 0 "
            f"(0 samples not yet drawn)\n") in dry.stdout, dry.stdout + dry.stderr


def test_a_sigterm_to_the_drivers_whole_process_group_ends_the_run_as_ctrl_c_does(tmp_path):
    """coreutils `timeout` and `kill -TERM -- -PGID` signal the driver's whole process group.
    The local Ray's GCS server and raylet were in it: Ray blocks SIGINT in them, not SIGTERM,
    so they died with the driver's SIGTERM; Tune's stop then waited on the dead GCS
    (``remove_placement_group``) until Ray aborted the driver 60 s later (exit 1): the parent
    run and a trial's run left RUNNING, no resume line, no report. They now have process
    groups of their own: SIGTERM to the group ends the run as Ctrl-C does (SIGINT to the
    group did, before and after), and --resume finishes it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "ray"
    argv = [sys.executable, str(REPO / "sweeps" / "run.py"), "gabor_conv1", "--smoke-test",
            "--set", "epochs=4", "--mlflow-uri", uri, "--storage", str(storage)]
    returncode, out = _signalled_at_first_checkpoint(argv, tmp_path, storage, group=True)
    assert returncode == 130, out[-3000:]
    assert "Failed to connect to GCS" not in out, out[-3000:]
    assert (f"the parent run is KILLED and the report is partial. Continue with: "
            f"{' '.join(argv)} --resume\n") in out, out[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(
        "gabor_conv1-smoke").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "KILLED" and parent.data.tags["interrupted"] == "true"
    children = [r for r in runs if r is not parent]
    assert children and "RUNNING" not in {r.info.status for r in children}, out[-3000:]
    report = Path(out.rsplit("report: ", 1)[1].split()[0])
    assert "PARTIAL (interrupted)" in report.read_text()

    proc = subprocess.run([*argv, "--resume"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    runs = client.search_runs([parent.info.experiment_id])
    assert [r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags] == [
        parent.info.run_id]
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    children = [r for r in runs if r.info.run_id != parent.info.run_id]
    assert len(children) == 3 and {r.info.status for r in children} == {"FINISHED"}, \
        proc.stdout[-3000:]


def test_a_sigterm_as_ray_connects_the_driver_ends_it_as_ctrl_c_does(tmp_path):
    """A SIGTERM right after Ray's "Started a local Ray instance" line lands while the driver
    connects: Ray's core worker has installed abseil's failure-signal handler, which dumps
    the stack and arms alarm(3) with an aborting SIGALRM handler. Three seconds into the
    driver's orderly stop the process aborted (exit 134, "Aborted"). The signal is now acted
    on once Ray has started (no SystemExit inside the connection) and the alarm cancelled:
    exit 130, the driver's own last lines, no Ray left running."""
    argv = [sys.executable, str(REPO / "sweeps" / "run.py"), SWEEP, "--smoke-test",
            "--only", f"{SWEEP}-none-*", "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}",
            "--storage", str(tmp_path / "ray")]
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "Started a local Ray instance" in line:
                time.sleep(0.1)  # into the connection (the line comes just before it)
                proc.send_signal(signal.SIGTERM)
                break
        out = "".join(lines) + proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-3000:]
    assert out.rstrip().endswith("sweep interrupted before its records were made: this run "
                                 "has nothing to resume; run it again\ninterrupted"), out[-3000:]
