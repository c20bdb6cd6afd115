"""The post-processor: a sweep's runs -> Parquet tables, Pareto fronts, statistics, figures and
one self-contained HTML report, logged as artifacts of the sweep's MLflow parent run.

    python -m dashboards.pareto NAME                      latest parent run of sweep NAME
    python -m dashboards.pareto NAME --parent-run ID      one invocation
    python -m dashboards.pareto NAME --experiment NAME-paper
    python -m dashboards.pareto NAME --ray-results ray_results   read Ray Tune's result files
    python -m dashboards.pareto NAME --out DIR            where the files go

Which run: by default the latest parent run (by start time) among the MLflow experiments
``NAME-demo``, ``NAME-smoke`` and ``NAME-paper``; ``--experiment`` restricts to one experiment,
``--parent-run`` names the run. The store: ``--mlflow-uri``, else $MLFLOW_TRACKING_URI, else
sqlite:///mlflow.db in the current folder (as ``sweeps/run.py``). With ``--ray-results DIR``
(Ray's storage folder or one run's folder inside it) MLflow is not read, and nothing is logged
unless ``--parent-run`` is given too.

Files (in ``--out``, default outputs/<experiment>/<parent run id or Ray folder>/):
results.parquet, epochs.parquet, statistics.json, front.{png,svg}, epochs.{png,svg},
filters.{png,svg}, report.html. The command prints the report's path last. The files are
built in a hidden ``.building-*`` folder inside ``--out`` and moved into place once all are
written (``build_outputs``): a step that fails leaves the previous set as it was; each file
is written atomically (``references.cache.atomic_write_bytes``): rerunning into the same
folder, or being killed, leaves the previous version or the new one, never a truncated file
(a kill mid-build can leave the hidden folder behind; the next build into that folder on the
same host deletes it). A figure that raises is the one exception to all-or-nothing: the
report, tables and statistics are written without it, the note names the traceback's file,
and the command exits 3 after printing the report's path.

Degenerate sweeps (no baseline, failed trials, one direction, one trial, no trials) still get
every file; what could not be computed is said in the report's notes and printed. Missing
results (no such store, experiment or run) are one line, ``error: <message>``, exit status 2.
The store is only read (and the files logged to the parent run, unless ``--no-log``): a
``sqlite:`` file that is not an MLflow store of this MLflow's schema is refused that way,
before MLflow would create or migrate its tables in it (``sources.mlflow_client``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run by its path: its folder is sys.path[0], where
    # dashboards/statistics.py hid the standard library's statistics, which MLflow imports
    # (every read of a store failed with an ImportError); the repository's root instead
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from references.cache import quiet_interrupts  # noqa: E402

if __name__ == "__main__":  # before the imports below (2 s): Ctrl-C in them is one line
    quiet_interrupts()

import pyarrow as pa

from dashboards import effects, figures, paper, report, sources, statistics, tables
from dashboards.fronts import FINISHED
from dashboards.sources import (
    RAY_SOURCE,
    SourceError,
    SweepRecord,
    Trial,
    load_mlflow,
    load_ray,
    mlflow_client,
    quiet_artifacts,
    sweep_parent_run,
)
from records import NOTE_TAG, PREDICTIONS_ARTIFACT, controlled_by
from records.errors import exception_line, one_line
from records.scratch import new_held, remove_stale_held
from records.uris import expand_user, not_utf8, redact, tracking_uri
from references.cache import atomic_write_text, stdout_survives_its_reader, unwritable

__all__ = ["build_outputs", "diagnose", "main", "postprocess", "postprocess_ray"]

FILES = ("report.html", "results.parquet", "epochs.parquet", "effects.parquet",
         "statistics.json", "front.png",
         "front.svg", "epochs.png", "epochs.svg", "filters.png", "filters.svg")


def diagnose(record: SweepRecord, results: pa.Table) -> list[str]:
    """Plain-language notes on what is degenerate about a sweep (empty list: nothing)."""
    notes = list(record.notes)
    rows = results.to_pylist()
    if not rows:
        notes.append(f"{record.source}: no trial runs: nothing to tabulate or plot (did the "
                     f"sweep start any trial?)")
        return notes
    unfinished = [r for r in rows if r["status"] != FINISHED]
    if unfinished:
        by_status: dict[str, list[str]] = {}
        for r in unfinished:
            by_status.setdefault(r["status"], []).append(r["trial_id"])
        what = "; ".join(f"{s}: {', '.join(ids)}" for s, ids in sorted(by_status.items()))
        notes.append(f"{len(unfinished)} of {len(rows)} trials did not finish ({what}); they "
                     f"are listed in results.parquet with their last metrics but left out of "
                     f"fronts, statistics and the front figure")
    for cond in dict.fromkeys(r["condition"] for r in rows):
        done = [r for r in rows if r["condition"] == cond and r["status"] == FINISHED]
        if not done:
            notes.append(f"condition {cond}: no finished trial")
            continue
        if not any(r["direction"] == "none" for r in done):
            notes.append(f"condition {cond}: no finished baseline (alpha = 0) trial, so "
                         f"baseline_performance, performance_change and degradation are empty "
                         f"and the front figure "
                         f"shows raw performance")
        based = {r["seed"] for r in done if r["direction"] == "none"
                 and r["performance"] is not None}
        unpaired = sorted({r["seed"] for r in done if r["direction"] != "none"} - based,
                          key=str)
        if based and unpaired:
            notes.append(f"condition {cond}: no finished baseline of seed(s) "
                         f"{', '.join(map(str, unpaired))}: their trials' degradation is from "
                         f"the mean baseline of seed(s) "
                         f"{', '.join(map(str, sorted(based, key=str)))}, not paired by seed")
        directions = sorted({r["direction"] for r in done} - {"none"})
        if not directions:
            notes.append(f"condition {cond}: only the baseline finished: no perturbed trial, "
                         f"no front beyond one point")
        elif len(directions) == 1:
            other = "min" if directions[0] == "max" else "max"
            has_base = any(r["direction"] == "none" for r in done)
            notes.append(f"condition {cond}: finished trials in one direction only "
                         f"({directions[0]}); no {other} trial, so that side of the front has "
                         + ("only the baseline" if has_base else "no point"))
        if len(done) == 1:
            notes.append(f"condition {cond}: one finished trial ({done[0]['trial_id']}): "
                         f"fronts are that point, statistics are undefined")
        no_perf = [r["trial_id"] for r in done if r["performance"] is None]
        if no_perf:
            notes.append(f"condition {cond}: finished without a final validation performance "
                         f"(NaN or infinite at the last epoch): {', '.join(no_perf)}; off the "
                         f"fronts and statistics")
        no_align = [r["trial_id"] for r in done if r["alignment"] is None]
        if no_align:
            notes.append(f"condition {cond}: finished without a validation alignment: "
                         f"{', '.join(no_align)}; off the fronts and statistics")
    return notes


def _pick_filter_trials(trials: list[Trial], results: pa.Table, cond: str) -> list[tuple[str, Trial | None, str]]:
    """(role, trial or None, note) for max-aligned, min-aligned and baseline of a condition:
    the perturbed (alpha != 0) finished trials with the highest and lowest achieved alignment
    (all finished trials when none is perturbed), and the lowest-seed finished baseline."""
    by_id = {t.trial_id: t for t in trials}
    rows = [r for r in results.to_pylist() if r["condition"] == cond
            and r["status"] == FINISHED and r["alignment"] is not None]
    rows = [r for r in rows if r["direction"] != "none"] or rows
    out: list[tuple[str, Trial | None, str]] = []
    if rows:
        hi = max(rows, key=lambda r: (r["alignment"], r["trial_id"]))
        lo = min(rows, key=lambda r: (r["alignment"], r["trial_id"]))
        out.append(("max-aligned", by_id[hi["trial_id"]], ""))
        out.append(("min-aligned", by_id[lo["trial_id"]],
                    "the same trial: one finished trial" if lo is hi else ""))
    else:
        out += [("max-aligned", None, "no finished trial with an alignment"),
                ("min-aligned", None, "no finished trial with an alignment")]
    base = sorted((t for t in trials if t.condition == cond and t.direction == "none"
                   and t.status == FINISHED), key=lambda t: (t.seed, t.trial_id))
    out.append(("baseline", base[0] if base else None,
                "" if base else "no finished baseline (alpha = 0) trial"))
    return out


def _filter_rows(record: SweepRecord, results: pa.Table, workdir: Path) -> list[figures.FilterRow]:
    trials = list(record.trials)
    align = {r["trial_id"]: r["alignment"] for r in results.to_pylist()}
    rows = []
    for cond in dict.fromkeys(t.condition for t in trials):
        panels = []
        for role, trial, note in _pick_filter_trials(trials, results, cond):
            if trial is None:
                panels.append(figures.FilterPanel(role, "", None, note))
                continue
            png = record.fetch_filters(trial, workdir / trial.run_id)
            a = align.get(trial.trial_id)
            caption = f"{trial.trial_id}" + (f"\nalignment {a:.3f}" if a is not None else "")
            panels.append(figures.FilterPanel(role, caption, png,
                                              note if png else "no conv1_filters.png artifact"))
        reference = next(t.config.get("reference") for t in trials if t.condition == cond)
        rows.append(figures.FilterRow(cond, tuple(panels), _reference_panels(reference, workdir)))
    return rows


def _reference_panels(reference: str | None, workdir: Path) -> tuple[figures.FilterPanel, ...]:
    """The paper's Figure 1c references beside every condition's grids: the pretrained
    AlexNet's conv1 filters (torchvision's ImageNet weights, when the file is in the local
    torch hub cache; never downloaded) and the Gabor bank; then, for a reference that is not a
    filter bank, a note saying what it is."""
    from references.gabor_bank import FREQUENCIES, ORIENTATIONS_DEG, bank_png

    panels = [_pretrained_alexnet_panel(workdir)]
    png = bank_png(workdir / "gabor_bank.png")
    panels.append(figures.FilterPanel(
        "Gabor bank" + (" (the reference)" if reference == "gabor" else ""),
        f"{len(ORIENTATIONS_DEG) * len(FREQUENCIES)} filters: rows {len(ORIENTATIONS_DEG)} "
        f"orientations,\ncolumns {len(FREQUENCIES)} frequencies", png))
    what = {"nsd": "NSD voxel responses", "pretrained": "a pretrained network's activations"}
    if reference != "gabor":
        panels.append(figures.FilterPanel(
            f"reference: {reference}", "", None,
            f"the reference is {what.get(reference, reference)}, not a filter bank"))
    return tuple(panels)


def _pretrained_alexnet_panel(workdir: Path) -> figures.FilterPanel:
    from references.hub import TORCHVISION_WEIGHT_FILES, hub_checkpoints_dir

    role = "pretrained AlexNet conv1"
    path = hub_checkpoints_dir() / TORCHVISION_WEIGHT_FILES["alexnet"]
    if not path.is_file():
        return figures.FilterPanel(role, "", None, (
            f"not shown: {path.name} is not in {path.parent} (torchvision's ImageNet weights; "
            f"never downloaded)"))
    # torch only to read the file: a post-processing without it imports no torch (4 s here)
    import torch

    from trainable.models import get_model_spec
    from trainable.pictures import filter_grid_png

    spec = get_model_spec("alexnet")
    key = f"{spec.taps[spec.conv1].path}.weight"
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
        weight = sd[key]
    except Exception as exc:  # an unreadable file is a note in the figure, not a failure
        return figures.FilterPanel(
            role, "", None, f"not shown: {path} has no readable {key} ({type(exc).__name__})")
    png = filter_grid_png(weight.float(), workdir / "pretrained_alexnet_conv1.png")
    return figures.FilterPanel(role, f"{weight.shape[0]} filters, torchvision ImageNet\n"
                                     f"({path.name})", png)


def _controls(record: SweepRecord) -> dict[str, str]:
    """condition -> its negative control's condition, for the controls in ``record``: a
    condition whose trials have ``reference_shuffle`` and whose name is another condition's
    plus the control suffix (``records.control_name``)."""
    conds = {t.condition for t in record.trials}
    shuffled = {t.condition for t in record.trials if t.config.get("reference_shuffle")}
    return {controlled_by(c): c for c in sorted(shuffled) if controlled_by(c) in conds}


def _effects(record: SweepRecord, results: pa.Table,
             workdir: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """The sides' effects (``effects.direction_effects``) and trial_id -> why its per-image
    outcome could not be read (the file and its fault)."""
    trials = {t.trial_id: t for t in record.trials}
    unreadable: dict[str, str] = {}

    def load(trial_id: str) -> effects.Predictions | None:
        trial = trials[trial_id]
        folder = workdir / "predictions" / trial.run_id
        path = record.fetch(trial, PREDICTIONS_ARTIFACT, folder)
        try:
            return effects.Predictions.load(path) if path is not None else None
        except effects.UNREADABLE as exc:  # unreadable: the condition says so, naming it
            # a downloaded copy's path is gone once the report is built: name the run's
            where = (f"{PREDICTIONS_ARTIFACT} of run {trial.run_id}"
                     if path.is_relative_to(workdir) else str(path))
            why = one_line(exc)[:160]
            unreadable[trial_id] = f"{where} ({type(exc).__name__}{f': {why}' if why else ''})"
            return None

    sides = effects.direction_effects(results, load, controls=_controls(record),
                                      unreadable=unreadable)
    return sides, unreadable


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def build_outputs(record: SweepRecord, out: str | Path,
                  still_true: Callable[[], str | None] | None = None) -> Path:
    """Every file of the post-processor for ``record`` into ``out``; returns report.html.

    The files are built in a hidden folder inside ``out`` and moved into place only once all
    of them are written (report.html last): a step that fails leaves ``out`` as it was, not
    new tables beside an older report. A figure that cannot be drawn is the exception: the
    report, tables and statistics are still written, say so (``FIGURES_NOT_DRAWN`` in
    statistics.json) and that figure's older files are removed from ``out`` rather than left
    beside a report they no longer match. A stage folder a killed post-processor left behind
    is deleted (``records.scratch.remove_stale_held``). ``still_true``, when given, is asked
    once the files are built and before they replace anything: a reason (the run changed
    since it was read) is a ``SourceError`` and ``out`` stays as it was."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_held(out, _STAGE_PREFIX)
    stage, lock = new_held(out, _STAGE_PREFIX)
    try:
        with lock:
            _build_outputs(record, stage)
            stale = still_true() if still_true is not None else None
            if stale:
                raise SourceError(stale)
            for name in sorted(FILES, key=lambda n: n == "report.html"):
                if (stage / name).is_file():
                    os.replace(stage / name, out / name)
                elif name in FIGURE_FILES:  # not drawn this time: an older one would mislead
                    (out / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out / "report.html"


#: The hidden folder a post-processor builds its files in: ``.building-<host>-<random>``, held
#: (``records.scratch.new_held``) for as long as its build runs.
_STAGE_PREFIX = ".building-"


def _build_outputs(record: SweepRecord, out: Path) -> Path:
    results = tables.results_table(record)
    epochs = tables.epochs_table(record)
    tables.write_parquet(results, out / "results.parquet")
    tables.write_parquet(epochs, out / "epochs.parquet")
    stats = statistics.sweep_statistics(results, planned=_planned_per_condition(record))
    config = tables.sweep_config(record)
    messages = diagnose(record, results)
    partial = _partial_note(record)  # (title, note) or None
    if partial:  # first, in the report, statistics.json and on the console
        messages = [partial[1], *messages]
    terms = paper.paper_terms(results, stats, record.scale, paper.differences(record.run))
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=out) as tmp:  # in the held stage
        sides, unreadable = _effects(record, results, Path(tmp))
    messages += [f"trial {tid}: unreadable per-image validation outcome, {why}; its "
                 f"condition's effects have point values only, no interval"
                 for tid, why in unreadable.items()]
    tables.write_parquet(effects.effects_table(sides), out / "effects.parquet")
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=out) as tmp:  # in the held stage
        embedded, not_drawn = _figures(record, results, epochs, stats, out, Path(tmp))
    messages += [note for _, note in not_drawn]
    atomic_write_text(out / "statistics.json", json.dumps(
        _json_safe({"sweep": record.sweep, "experiment": record.experiment,
                    "parent_run_id": record.parent_run_id,
                    "search": paper.search_line(record.run), "conditions": stats,
                    "effects": sides, "paper": terms, "messages": messages,
                    FIGURES_NOT_DRAWN: [stem for stem, _ in not_drawn]}),
        indent=2) + "\n")
    meta = {"sweep": record.sweep, "experiment": record.experiment, "source": record.source,
            "parent run": f"{record.parent_run_id or '(none)'} {record.parent_status}".strip(),
            "data": record.run.data_description,
            "configurations": paper.search_line(record.run)}
    return report.write_report(
        out / "report.html", title=(f"PARTIAL ({partial[0]}) " if partial else "")
        + f"Sweep {record.sweep}: Pareto fronts of performance against alignment", meta=meta, messages=messages, statistics=stats,
        figures=embedded, results=results, config=config, paper=terms, effects=sides,
        files=[f for f in FILES[1:] if f not in {f"{stem}.{ext}" for stem, _ in not_drawn
                                                  for ext in ("png", "svg")}])


#: statistics.json's list of the figures that could not be drawn (their notes are in
#: "messages"); the command line then ends with exit status 3 (``INCOMPLETE``) after writing
#: everything else.
FIGURES_NOT_DRAWN = "figures_not_drawn"

#: The command line's exit status for a report written without some figure.
INCOMPLETE = 3

FIGURE_FILES = tuple(f"{stem}.{ext}" for stem in ("front", "epochs", "filters")
                     for ext in ("png", "svg"))


def _figures(record: SweepRecord, results: pa.Table, epochs: pa.Table, stats, out: Path,
             tmp: Path) -> tuple[list[tuple[Path, str, str]], list[tuple[str, str]]]:
    """Draw and save the three figures into ``out``: ``(embedded, not_drawn)``, the
    (png, alt text, caption) of each one drawn and the (stem, note) of each one that raised.
    A figure is drawn from tables already written: its failure (a bug, a font, a name
    matplotlib cannot set) costs that figure only, with its traceback in a file."""
    from references.cache import traceback_file

    figs = [
        ("front", lambda: figures.front_figure(results, stats),
         ("Degradation (the drop from the condition's mean baseline, the mean over its "
          "alpha = 0 trials, in points; positive = worse) against achieved alignment "
          "(validation, by the trials' metric), coloured by direction, marker area by "
          "|alpha|; with several seeds each configuration's mean is drawn with its 95 % "
          "interval and the fronts go through those means; lines: the two Pareto fronts "
          "(performance up with alignment up, and with alignment down).")),
        ("epochs", lambda: figures.epochs_figure(epochs, results),
         ("Validation performance per epoch: thin lines one trial each (dotted: did not "
          "finish), bold lines the mean of each direction.")),
        ("filters", lambda: figures.filters_figure(_filter_rows(record, results, tmp)),
         ("conv1 filters of the maximally aligned, minimally aligned and baseline models, "
          "beside the pretrained AlexNet's conv1 filters (when torchvision's weights are "
          "in the local torch hub cache) and the Gabor bank, as in the paper's Figure "
          "1c.")),
    ]
    embedded, not_drawn = [], []
    for stem, draw, caption in figs:
        try:
            png, _ = figures.save_figure(draw(), out, stem)
        except Exception as exc:  # one figure's failure is that figure's alone
            for ext in ("png", "svg"):
                (out / f"{stem}.{ext}").unlink(missing_ok=True)
            log = traceback_file(exc)
            not_drawn.append((stem, f"the {stem} figure could not be drawn ({exception_line(exc)}"
                                    f"; traceback: {log}); the tables, statistics and "
                                    f"other figures are complete"))
            continue
        embedded.append((png, f"{stem} figure", caption))
    return embedded, not_drawn


#: Trial states of a sweep that has not run to its end (interrupted, crashed, or running).
_UNFINISHED = ("RUNNING", "SCHEDULED", "KILLED")


def _planned_trials(record: SweepRecord) -> int:
    """The trials the run launches (the driver's ``trials`` tag on the parent run), 0 when
    not recorded (a Ray run folder, a store written before the tag existed)."""
    return max(0, record.run.trials or 0)


def _planned_per_condition(record: SweepRecord) -> dict[str, int]:
    """The trials the run launches per condition (the driver's ``planned`` tag), {} when not
    recorded or unreadable."""
    return dict(record.run.planned)


def _run_command(record: SweepRecord, optuna: bool = False) -> str:
    """``sweeps/run.py SWEEP`` with the options the parent run's tags record that a resume
    must repeat: --data, --smoke-test, --seeds, --set, --only, and an
    Optuna search's --search and --num-samples. (The note said only ``sweeps/run.py SWEEP
    --resume``: pasted after a smoke test, it answered "nothing to resume".)"""
    import shlex

    tags = record.run
    words = ["sweeps/run.py", record.sweep]
    if tags.data not in ("", "demo"):
        words += ["--data", tags.data]
    if tags.smoke:
        words.append("--smoke-test")
    if tags.seeds != 1:
        words += ["--seeds", str(tags.seeds)]
    for key, value in tags.overrides.items():
        words += ["--set", f"{key}={value}"]
    for glob in tags.only:
        words += ["--only", glob]
    if optuna:
        words += ["--search", "optuna"]
        if tags.num_samples is not None:
            words += ["--num-samples", str(tags.num_samples)]
    return " ".join(shlex.quote(w) for w in words)


def _partial_note(record: SweepRecord) -> tuple[str, str] | None:
    """(title word, note) that label a report partial, or None: the parent run KILLED or tagged
    interrupted by the driver, or trials left unfinished (stopped, never started, still
    running: a driver that crashed or was killed hard ends its parent FAILED or not at all,
    and a Ray run folder has no parent status, only its manifest)."""
    optuna = record.run.search == "optuna"
    command = record.run.command
    again = (f"Continue it with sweeps/run.py {command} --resume" if command else
             f"Continue it (with its data, tracking and storage options) with "
             f"{_run_command(record, optuna=optuna)} --resume")
    planned = _planned_trials(record)
    if record.parent_status == "RUNNING":
        # read while the sweep runs: trials not yet started have no run at all, so the
        # trials' states alone could call it complete ("no trial runs" for its first minute)
        ended = [t.status for t in record.trials if t.status not in _UNFINISHED]
        done = ended.count(FINISHED)
        failed = f" ({len(ended) - done} more failed)" if len(ended) > done else ""
        what = ("its driver has not ended the run (its manifest still lists trials as "
                "pending: the sweep is running, or its driver was stopped without ending it)"
                if record.source.startswith(RAY_SOURCE) else
                "the parent run is still RUNNING (the sweep is running, or its driver stopped "
                "without ending it)")
        return ("running", f"PARTIAL: {what}; the report covers the "
                           f"{done} trial(s) finished so far{failed}, of the "
                           f"{len(record.trials)} started"
                           + (f" ({planned} planned)" if planned > len(record.trials) else "")
                           + ". Post-process it again when the "
                           f"sweep has ended; if its driver is gone: {again}")
    unfinished = [t for t in record.trials if t.status in _UNFINISHED]
    interrupted = (record.parent_status == "KILLED"
                   or bool(record.run.interrupted))
    deleted = record.deleted
    # trials that never started have no run; a deleted run is not counted among them
    never = max(0, planned - len(record.trials) - len(deleted))
    if not (interrupted or unfinished or never or deleted):
        return None
    total = len(record.trials) + never + len(deleted)
    restore = (f"{len(deleted)} of {total} trials' runs are deleted in MLflow, e.g. "
               f"{deleted[0][0]} -- restore one with: mlflow runs restore --run-id "
               f"{deleted[0][1]}" if deleted else "")
    if not (interrupted or unfinished or never):  # the sweep ran to its end
        return ("deleted", f"PARTIAL: {restore}; the report covers the others.")
    why = [f"parent run {record.parent_status or 'interrupted'}"] if interrupted else []
    if unfinished:
        why.append(f"{len(unfinished)} of {total} trials unfinished, e.g. "
                   f"{unfinished[0].trial_id} {unfinished[0].status}")
    if never:  # (or failed before their run was made)
        why.append(f"{never} of {total} trials have no run (never started)")
    elif record.run.trials is None and not record.source.startswith(RAY_SOURCE):
        # a parent made by an older version: its trials that never started have no run, and
        # nothing says how many there were ("2/4 trials finished" of 12)
        why.append("trials that never started are not counted: the number the run planned "
                   "is not recorded (a run made by an older version; a --resume records it)")
    if deleted:
        why.append(restore)
    return ("interrupted" if interrupted else "unfinished",
            f"PARTIAL: this sweep did not run to its end ({'; '.join(why)}); the report "
            f"covers the trials that finished. {again}")


def _log_or_say(mlflow_uri: str, run_id: str, out: Path, path: Path) -> None:
    """``_log``; a store this user may read but not write (a colleague's) is one line saying
    the report is written and how to skip the logging, not an internal temporary file's
    name."""
    try:
        _log(mlflow_uri, run_id, out)
    except PermissionError as exc:
        raise SourceError(
            f"report written ({path.resolve()}), but {sources.URI_FROM} {redact(mlflow_uri)} "
            f"refused this user its logging to run {run_id} ({exc.strerror or exc}); "
            f"accepted: --no-log, or a store this user may write") from None


def _log(mlflow_uri: str, run_id: str, out: Path) -> None:
    from mlflow.entities import Metric

    # Logging writes by design, but only into an existing store: a file that is not one (or
    # one of another MLflow schema) is refused before MLflow would create or migrate it.
    client = mlflow_client(mlflow_uri)
    with quiet_artifacts():
        for name in FILES:
            if (out / name).is_file():
                client.log_artifact(run_id, str(out / name))
    stats = json.loads((out / "statistics.json").read_text())
    now = int(time.time() * 1000)
    values = effects.effects_metrics(stats.get("effects") or {})
    for cond, st in (stats.get("conditions") or {}).items():
        for key, value in (("spearman_rho", st["spearman"]["rho"]),
                           ("spearman_low", st["spearman"]["low"]),
                           ("spearman_high", st["spearman"]["high"]),
                           ("gap_points", st["gap"]["points"])):
            if value is not None and math.isfinite(value):
                values[f"stat/{cond}/{key}"] = float(value)
    metrics = [Metric(_metric_name(k), v, now, 0) for k, v in values.items()]
    if metrics:
        client.log_batch(run_id, metrics=metrics)
    client.set_tag(run_id, NOTE_TAG, _described(client.get_run(run_id).data.tags.get(NOTE_TAG),
                                                run_id, out))


def _metric_name(key: str) -> str:
    """``<kind>/<condition>/<rest>`` as MLflow accepts a metric name (letters and digits of
    any script, ``_ - . / :`` and spaces). A condition's name with other characters (an
    emoji, ``$``, ``<``: sweep files may hold them) had its every metric refused; those become
    ``_``, followed by a short digest of the name as written, so two conditions that differ
    only there (``v1_$``, ``v1_%``) keep a metric each. statistics.json keeps the names as
    they are."""
    kind, condition, rest = key.split("/", 2)
    safe = re.sub(r"[^\w\-. :]", "_", condition)
    if safe != condition or safe in ("", ".", ".."):
        safe = f"{safe}-{hashlib.sha256(condition.encode()).hexdigest()[:8]}"
    return f"{kind}/{safe}/{rest}"


def _described(note: str | None, run_id: str, out: Path) -> str:
    """The parent run's description with the front figure (shown by the MLflow UI from the
    run's own artifact) and where the report is; said once however often the run is
    post-processed."""
    base = (note or "").split(REPORT_MARK)[0].rstrip()
    figure = (f"![Pareto fronts](get-artifact?path=front.png&run_uuid={run_id})\n\n"
              if (out / "front.png").is_file() else "")  # not drawn: the report says why
    return (f"{base}\n\n{REPORT_MARK}\n\n{figure}The report: report.html in this run's "
            f"artifacts (and {(out / 'report.html').resolve()} where it was written)."
            ).lstrip()


#: Where the post-processor's part of a parent run's description starts.
REPORT_MARK = "**Pareto fronts of this invocation**"


def _default_out(record: SweepRecord) -> Path:
    """outputs/<experiment>/<run> under the working folder, or a SourceError when it cannot
    be made (a file named outputs there, a folder this user cannot write): checked as --out
    is, before anything is written."""
    out = Path("outputs") / _component(record.experiment) / _component(record.label)
    problem = _out_problem(out)
    if problem:
        raise SourceError(f"output folder {out.absolute()} (the default, outputs/<experiment>/"
                          f"<run> in the working folder): {problem}; accepted: a folder this "
                          f"user can create or write (name one with --out DIR)")
    return out


def _component(name: str) -> str:
    """``name`` as one folder name: an experiment renamed in MLflow to a path-like name
    (``/srv/x``, ``a/../..``) sent the default output outside outputs/."""
    safe = re.sub(r"[/\\\x00]", "_", name)
    return "_" + safe[1:] if safe.startswith(".") else safe or "_"


def _out_problem(out: Path) -> str | None:
    """Why the output folder ``out`` cannot be used, or None."""
    out = expand_user(out, "--out").absolute()
    if out.exists() and not out.is_dir():
        return f"{out} is not a folder"
    return unwritable(out)


def postprocess(sweep: str, *, mlflow_uri: str, parent_run_id: str | None = None,
                out: Path | None = None, experiment: str | None = None,
                log: bool = True) -> Path:
    """Post-process one sweep invocation read from MLflow; returns the report's path.

    sweep : the sweep name (as given to sweeps/run.py). mlflow_uri : the tracking store.
    parent_run_id : the invocation (default: the latest parent run of the sweep, see the
    module docstring). out : output folder (default outputs/<experiment>/<parent run id>).
    experiment : restrict the search for the latest parent run to this experiment.
    log : log the files as artifacts of the parent run.
    Raises ``SourceError`` when the store, experiment or run cannot be found.
    """
    record = load_mlflow(sweep, mlflow_uri=mlflow_uri, parent_run_id=parent_run_id,
                         experiment=experiment)
    out = Path(out) if out is not None else _default_out(record)
    was = (record.parent_status, record.parent_end_time)
    path = build_outputs(record, out, lambda: _parent_changed(
        mlflow_uri, record.parent_run_id, was, record.sweep, replaced=False))
    if log:
        stale = _parent_changed(mlflow_uri, record.parent_run_id, was, record.sweep,
                                replaced=True)
        if stale:
            raise SourceError(stale)
        _log_or_say(mlflow_uri, record.parent_run_id, out, path)
    return path


def _parent_state(mlflow_uri: str, run_id: str) -> tuple[str, int | None] | None:
    """(status, end time) of a parent run now; None where the store does not answer."""
    try:
        info = mlflow_client(mlflow_uri).get_run(run_id).info
    except Exception:  # unreachable or refused: nothing to compare, nothing claimed
        return None
    return info.status, info.end_time


def _parent_changed(mlflow_uri: str, run_id: str, was: tuple[str, int | None] | None,
                    sweep: str, *, replaced: bool) -> str | None:
    """Why files built from what was read while the parent run ``run_id`` stood at ``was``
    (status, end time) would now misdescribe its run, or None: it ended, or was reopened by
    a --resume, since. A post-processor started while the sweep ran (or before a resume
    ended it) finished after the driver's own build, and its PARTIAL report, tables and
    metrics replaced the final ones (the metrics as the latest values). A store that does
    not answer here cannot tell; the log step says so. ``replaced``: the files are already
    in place (the check before logging), which the line then says."""
    now = _parent_state(mlflow_uri, run_id)
    if was is None or now is None or now == was:
        return None
    change = (f"{was[0]} when read, {now[0]} now" if now[0] != was[0] else
              f"{now[0]}, ended again since it was read")
    done = ("its files were written but nothing was logged" if replaced else
            "nothing was replaced or logged")
    return (f"the sweep's parent run {run_id} changed while this report was built ({change}: "
            f"the sweep ended or was resumed meanwhile); {done}; post-process it again: "
            f"python -m dashboards.pareto {sweep} --parent-run {run_id}")


def postprocess_ray(sweep: str, ray_results: str | Path, *, out: Path | None = None,
                    experiment: str | None = None, mlflow_uri: str | None = None,
                    parent_run_id: str | None = None) -> Path:
    """The same from Ray Tune's result folder; logs to MLflow only when ``parent_run_id`` and
    ``mlflow_uri`` are both given. Returns the report's path."""
    logs = bool(parent_run_id and mlflow_uri)
    was = _parent_state(mlflow_uri, parent_run_id) if logs else None  # before the folder
    record = load_ray(ray_results, sweep, experiment=experiment)
    if parent_run_id and mlflow_uri:  # checked before anything is built or logged
        sweep_parent_run(mlflow_client(mlflow_uri), parent_run_id, sweep, mlflow_uri)
        if record.parent_run_id and record.parent_run_id != parent_run_id:
            raise SourceError(f"--parent-run {parent_run_id}, but {record.label} is the run of "
                              f"parent run {record.parent_run_id} (its mlflow_parent.json); "
                              f"accepted: --parent-run {record.parent_run_id}")
    out = Path(out) if out is not None else _default_out(record)
    if not logs:
        return build_outputs(record, out)
    path = build_outputs(record, out, lambda: _parent_changed(
        mlflow_uri, parent_run_id, was, sweep, replaced=False))
    stale = _parent_changed(mlflow_uri, parent_run_id, was, sweep, replaced=True)
    if stale:
        raise SourceError(stale)
    _log_or_say(mlflow_uri, parent_run_id, out, path)
    return path


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise SourceError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m dashboards.pareto",
                description="Pareto fronts, statistics, figures and an HTML report of a sweep.")
    p.add_argument("sweep", help="sweep name, as given to sweeps/run.py")
    p.add_argument("--mlflow-uri", metavar="URI",
                   help="tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db "
                        "in the current folder)")
    p.add_argument("--experiment", metavar="NAME",
                   help="MLflow experiment (or Ray run prefix) to take the latest run from "
                        "(default: any of NAME-demo, NAME-smoke, NAME-paper)")
    p.add_argument("--parent-run", metavar="ID", help="the sweep's MLflow parent run id "
                                                      "(default: the latest)")
    p.add_argument("--ray-results", metavar="DIR",
                   help="read Ray Tune's result folder instead of MLflow (the sweep's "
                        "--storage, default ray_results, or one run's folder)")
    p.add_argument("--out", metavar="DIR",
                   help="output folder (default outputs/<experiment>/<run>)")
    p.add_argument("--no-log", action="store_true",
                   help="do not log the files as artifacts of the parent run")
    return p


def main(argv: list[str] | None = None) -> int:
    """The CLI: bad input is one line and exit 2; any other failure one line naming the file
    that holds its traceback, exit 1 (``references.cache.traceback_file``); a report written
    without some figure, exit 3 (``INCOMPLETE``)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except PermissionError as exc:  # another user's store or run folder (umask 077), or a
        # store this user may read but not log to: bad input, not a fault of this program
        where = exc.filename or "(a file)"
        print(f"error: {where}: this user may not open it ({exc.strerror or exc}); accepted: "
              f"a tracking store and run folders this user can read (their owner can "
              f"grant it: chmod -R a+rX), and --no-log where the store is not yours to "
              f"write", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug or an environment fault: one line, traceback to a file
        from references.cache import unexpected_error_line

        def folders() -> dict[str, Path]:  # what it raises leaves the line without its note
            return {"--out": Path(build_parser().parse_known_args(argv)[0].out or "outputs")}

        print(unexpected_error_line(exc, folders), file=sys.stderr)
        return 1


def _main(argv: list[str] | None) -> int:
    stdout_survives_its_reader("the post-processor goes on")  # (`... | head -1`)
    try:
        problem = not_utf8(sys.argv[1:] if argv is None else list(argv))
        if problem:  # the files were written, then the run's description failed to encode
            raise SourceError(problem)
        args = build_parser().parse_args(argv)
        if args.parent_run is not None and not re.fullmatch(r"[0-9A-Za-z_-]{1,64}",
                                                            args.parent_run):
            raise SourceError(f"--parent-run {args.parent_run!r}: not an MLflow run id; "
                              f"accepted: a run id, letters and digits (the driver prints its "
                              f"parent run's)")
        if args.out is not None:
            expand_user(args.out, "--out")  # ~name naming no user: one line, exit 2
        if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
            raise SourceError(f"--out {args.out}: not a folder; accepted: a folder for the "
                              f"report (created when missing)")
        if args.out is not None:  # checked before the store is read, not after
            problem = unwritable(expand_user(args.out).absolute())
            if problem:
                raise SourceError(f"--out {args.out}: {problem}; accepted: a folder this user "
                                  f"can create or write")
        if args.ray_results:
            uri = _uri(args.mlflow_uri) if args.parent_run and not args.no_log else None
            path = postprocess_ray(args.sweep, args.ray_results, out=args.out,
                                   experiment=args.experiment, mlflow_uri=uri,
                                   parent_run_id=args.parent_run)
        else:
            path = postprocess(args.sweep, mlflow_uri=_uri(args.mlflow_uri),
                               parent_run_id=args.parent_run, out=args.out,
                               experiment=args.experiment, log=not args.no_log)
    except (SourceError, ValueError) as exc:  # ValueError: a malformed --mlflow-uri
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    stats = json.loads((path.parent / "statistics.json").read_text())
    for message in stats["messages"]:
        print(f"note: {message}")
    for cond, s in stats["conditions"].items():
        sp = s["spearman"]
        rho = "undefined" if sp["rho"] is None else (
            f"{sp['rho']:.3f}" + (f" [{sp['low']:.3f}, {sp['high']:.3f}]"
                                  if sp["low"] is not None else ""))
        print(f"{cond}: {s['finished']}/{s['trials']} trials finished, Spearman rho(alignment, "
              f"performance) = {rho}, performance in signed alpha: "
              f"{s['monotonicity']['trend']}")
    for line in effects.summary_lines(stats.get("effects") or {}):
        print(line)
    print(f"report: {path.resolve()}")
    if stats.get(FIGURES_NOT_DRAWN):  # everything else is written (and logged): say it, exit 3
        print(f"error: figure(s) not drawn: {', '.join(stats[FIGURES_NOT_DRAWN])} (the notes "
              f"above name the tracebacks); the report, tables and statistics were written "
              f"without them: {path.resolve()}", file=sys.stderr)
        return INCOMPLETE
    return 0


def _uri(value: str | None) -> str:
    # records.uris is the one place the project resolves a tracking URI (ValueError: one line)
    sources.URI_FROM = (
        "--mlflow-uri" if value is not None
        # the driver's own run of it: the URI as the driver's user gave it
        else os.environ.get("ALIGNSWEEP_URI_FROM") or "MLFLOW_TRACKING_URI"
        if os.environ.get("MLFLOW_TRACKING_URI")
        else "the default tracking store (no --mlflow-uri, no MLFLOW_TRACKING_URI)")
    return tracking_uri(value)


if __name__ == "__main__":
    sys.exit(main())
