"""Where a sweep's results are read from: its MLflow parent run, or Ray Tune's result folder.

Both give the same ``SweepRecord``: one ``Trial`` per trial with its tags, resolved config,
status and per-epoch metric history, and a way to fetch its conv1 filter grid.

MLflow (what ``sweeps.tracking`` writes): experiment ``<sweep>-<scale>`` (demo, smoke, paper),
one parent run per invocation (tags sweep, scale, data, data_description, smoke), one child run
per trial (tag ``mlflow.parentRunId``; tags condition, direction, alpha, beta, seed, trial_id;
params = the trial config; metrics per epoch with step = epoch; artifact conv1_filters.png).
By default the latest parent run (by start time, whatever its status: the post-processor also
runs at the end of a sweep, while the parent is still RUNNING) among the experiments
``<sweep>-demo``, ``<sweep>-smoke`` and ``<sweep>-paper``; ``experiment`` picks one of them (or
any name), ``parent_run_id`` one run. A ``sqlite:`` store is checked before MLflow opens it
(``mlflow_client``): reading never creates or migrates a database.

Ray (what ``sweeps.execute`` writes under ``--storage``, default ./ray_results):
``<experiment>_<YYYYmmdd-HHMMSS>/`` with the driver's ``manifest.jsonl`` (each trial's key,
state, Ray folder, MLflow run and config; Ray's private state is never read), one folder per
trial (result.json: one JSON line per epoch; the final checkpoint holds the trial's
artifacts/), and mlflow_parent.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from records import (
    ARTIFACTS_DIR,
    ERROR_TAG,
    FILTERS_ARTIFACT,
    FINGERPRINT_FILE,
    MANIFEST_FILE,
    PARENT_FILE,
    PARENT_TAG,
    RETIRED_TAG,
    SCALE_SUFFIXES,
    TRIAL_ID_TAG,
    ParentPointer,
    SweepRunTags,
    TrialRunTags,
    child_runs,
    error_summary,
    experiment_name,
    is_trial_run,
    parse_experiment,
    parse_run_folder,
    read_json_object,
    read_manifest,
)
from records.errors import one_line
from records.stores import sqlite_path, sqlite_store_problem
from records.uris import expand_user, redact, tracking_refuses, tracking_unreachable
from references.cache import env_default

__all__ = [
    "RAY_SOURCE",
    "SourceError",
    "SweepRecord",
    "Trial",
    "load_mlflow",
    "load_ray",
    "mlflow_client",
    "resolve_config",
]



class SourceError(ValueError):
    """The results cannot be found or read; the one-line message says what was looked for and
    what would be accepted."""


@dataclass(frozen=True)
class Trial:
    """One trial as stored.

    run_id : the MLflow child run id (Ray source: Ray's trial id).
    trial_id, condition, direction ("max" | "min" | "none"), alpha (signed), beta, seed : the
        trial's tags.
    status : "FINISHED", "FAILED", "RUNNING" or "KILLED" (Ray's TERMINATED / ERROR are mapped
        to FINISHED / FAILED; its other states to RUNNING).
    config : the resolved trial config (every TrialConfig key, typed).
    history : metric -> ((epoch, value), ...) sorted by epoch.
    error : the failure message when known.
    """

    run_id: str
    trial_id: str
    condition: str
    direction: str
    alpha: float
    beta: float
    seed: int
    status: str
    config: dict[str, Any] = field(hash=False)
    history: dict[str, tuple[tuple[int, float], ...]] = field(hash=False)
    error: str | None = None

    def final(self, metric: str) -> float:
        """The metric at the trial's last reported epoch: NaN when it was not reported then
        (never, or NaN that epoch: the tracker does not log NaN), not an older epoch's."""
        values, epochs = self.history.get(metric, ()), self.epochs
        last = epochs[-1] if epochs else None
        return values[-1][1] if values and values[-1][0] == last else math.nan

    @property
    def epochs(self) -> tuple[int, ...]:
        """The epochs the trial reported, in order: the steps of its ``epoch`` metric (the
        trainable logs it every epoch), else of every metric. A lab's own metric logged into
        the run per training step (step 0..N) made step N the "last epoch", at which no
        epoch metric exists: every final value read as missing."""
        own = self.history.get("epoch")
        steps = {e for e, _ in own} if own else {e for v in self.history.values()
                                                  for e, _ in v}
        return tuple(sorted(steps))

    @property
    def epochs_completed(self) -> int:
        return len(self.epochs)


@dataclass(frozen=True)
class SweepRecord:
    """A sweep invocation's trials and where they came from.

    sweep : the sweep name (a condition, or a composite such as ``paper``).
    experiment : ``<sweep>-<scale>``; source : a human line naming the store and run.
    parent_run_id, parent_status, parent_tags : the MLflow parent run (Ray source: from
        mlflow_parent.json when present, else None / "" / derived tags).
    fetch : (trial, artifact name, folder) -> path of that artifact of the trial (downloaded
        into ``folder`` when it is remote), or None when the trial has none
        (``fetch_filters``: its conv1_filters.png).
    label : names this invocation in folder names (the parent run id; Ray: the run folder).
    notes : what could not be read as expected (shown in the report).
    deleted : (trial id, run id) of the trials whose run is deleted in MLflow.
    """

    sweep: str
    experiment: str
    source: str
    parent_run_id: str | None
    parent_status: str
    parent_tags: dict[str, str]
    trials: tuple[Trial, ...]
    fetch: Callable[[Trial, str, Path], Path | None] = field(repr=False, compare=False)
    label: str = ""
    notes: tuple[str, ...] = ()
    #: (trial id, run id) of trials whose only run is deleted in MLflow (soft delete)
    deleted: tuple[tuple[str, str], ...] = ()
    #: the parent run's end time (ms) when it was read; None while it runs, or from Ray
    parent_end_time: int | None = None

    @property
    def scale(self) -> str:
        return self.run.scale

    @property
    def run(self) -> SweepRunTags:
        """The parent run's tags as the driver wrote them (``records.SweepRunTags``)."""
        return SweepRunTags.parse(self.parent_tags)

    def fetch_filters(self, trial: Trial, folder: Path) -> Path | None:
        """The trial's conv1_filters.png (in ``folder`` when downloaded), or None."""
        return self.fetch(trial, FILTERS_ARTIFACT, folder)


# --------------------------------------------------------------------------------------------
# The resolved config


def resolve_config(values: Mapping[str, Any]) -> dict[str, Any]:
    """Every ``TrialConfig`` key: ``values`` (MLflow params are strings; they are parsed by the
    field's default's type) over the dataclass defaults. Keys TrialConfig does not know are
    kept as given (a store written by a newer version still reads)."""
    from trainable.config import TrialConfig  # dataclass only: no torch import here

    out: dict[str, Any] = {}
    for f in dataclasses.fields(TrialConfig):
        default = f.default
        value = values.get(f.name, default)
        if isinstance(value, str) and not isinstance(default, str):
            value = _parse_like(value, default)
        out[f.name] = value
    for key, value in values.items():
        if key not in out:
            out[key] = value
    return out


def _parse_like(text: str, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            return text.strip().lower() == "true"
        if isinstance(default, int):
            number = float(text)
            return int(number) if number.is_integer() else number
        if isinstance(default, float):
            return float(text)
    except ValueError:
        pass
    return text


def _number(text: str | None, default: float = math.nan) -> float:
    try:
        return float(text) if text is not None else default
    except ValueError:
        return default


def _integer(text: str | None, default: int = 0) -> int:
    value = _number(text)
    return int(value) if math.isfinite(value) else default


# --------------------------------------------------------------------------------------------
# MLflow


@contextlib.contextmanager
def quiet_artifacts():
    """No tqdm bar per artifact transfer (MLflow reads this variable at each transfer), unless
    the user set MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR."""
    with env_default("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"):
        yield


#: What the tracking URI the messages below name came by: the flag, or the variable read in
#: its absence (``dashboards.pareto`` sets it per invocation).
URI_FROM = "--mlflow-uri"

_STORE_ACCEPTED = ("accepted: the store a sweep wrote (sqlite:///PATH/mlflow.db), a tracking "
                   "server (http://HOST:PORT), or --ray-results DIR")


def mlflow_client(uri: str):
    """The MLflow client of the store at ``uri``; a ``sqlite:`` store is checked first
    (``_check_sqlite_store``), so that reading never creates or migrates one."""
    from mlflow.tracking import MlflowClient

    if uri.split(":", 1)[0].split("+", 1)[0].lower() == "sqlite":
        _check_sqlite_store(uri)
    why = tracking_unreachable(uri)  # MLflow's client would retry for minutes
    if why is not None:
        raise SourceError(f"{URI_FROM} {redact(uri)}: tracking server unreachable ({why}); "
                          f"start it, or name a store that answers ({_STORE_ACCEPTED})")
    refused = tracking_refuses(uri)
    if refused is not None and refused.server_failing:
        raise SourceError(f"{URI_FROM} {redact(uri)}: the tracking server answers /health but "
                          f"fails its API ({refused}; its log says why); {_STORE_ACCEPTED}")
    if refused is not None:
        raise SourceError(f"{URI_FROM} {redact(uri)}: the tracking server refuses this client "
                          f"({refused}); accepted: its user's MLFLOW_TRACKING_USERNAME and "
                          f"MLFLOW_TRACKING_PASSWORD, through a host it allows (--allowed-hosts)")
    return MlflowClient(uri)


def _check_sqlite_store(uri: str) -> None:
    """Refuse a ``sqlite:`` URI that does not name an MLflow store of this MLflow's schema:
    no file (MLflow would silently create an empty store), or a file that is not such a store
    (``records.stores.sqlite_store_problem``: opening it would write)."""
    db = sqlite_path(uri)
    if db is None:
        raise SourceError(f"{URI_FROM} {uri}: not a SQLite file path; {_STORE_ACCEPTED}")
    if not db.is_file():  # MLflow would silently create an empty store
        raise SourceError(f"{URI_FROM} {uri}: no such SQLite file; {_STORE_ACCEPTED}")
    problem = sqlite_store_problem(db)
    if problem is None:
        return
    if "another schema" in problem:
        raise SourceError(f"{URI_FROM} {uri}: {problem}; accepted: a store of this MLflow "
                          f"version (upgrade a copy with `mlflow db upgrade sqlite:///COPY`), "
                          f"or read it with the MLflow that wrote it")
    raise SourceError(f"{URI_FROM} {uri}: {problem}; {_STORE_ACCEPTED}")


def _experiments(client, sweep: str, experiment: str | None) -> list:
    names = [experiment] if experiment else [experiment_name(sweep, s) for s in SCALE_SUFFIXES]
    found = [e for e in (client.get_experiment_by_name(n) for n in names) if e is not None]
    if not found:
        known = sorted(e.name for e in client.search_experiments())
        raise SourceError(f"no MLflow experiment {' or '.join(names)}; experiments in this "
                          f"store: {', '.join(known) or '(none)'}")
    return found


def _latest_parent(client, experiments: list, sweep: str) -> Any:
    """The newest run of ``experiments`` that is a parent run of sweep ``sweep``: no
    ``mlflow.parentRunId``, and its ``sweep`` tag is the sweep's name. Another tool's run in
    the experiment (a notebook's evaluation) is no parent: taken for one, the report said "no
    trial runs" and was logged into that run, over its description."""
    token = None
    others = 0
    while True:
        page = client.search_runs([e.experiment_id for e in experiments],
                                  order_by=["attributes.start_time DESC"], max_results=1000,
                                  page_token=token)
        for run in page:  # a parent starts before its children: at most one page of them first
            if PARENT_TAG not in run.data.tags:
                if run.data.tags.get("sweep") == sweep:
                    return run
                others += 1
        token = page.token
        if not token:
            names = ", ".join(e.name for e in experiments)
            also = (f" ({others} other top-level run(s), without tag sweep={sweep}, are not "
                    f"this sweep's)" if others else "")
            gone = _deleted_parent(client, experiments, sweep)
            if gone is not None:  # "run the sweep first" would send a finished sweep back
                also += (f"; its parent run {gone} is deleted -- restore it with: mlflow runs "
                         f"restore --run-id {gone}")
            raise SourceError(f"experiment {names} has no parent run of sweep {sweep!r}{also}; "
                              f"run the sweep first")


def _deleted_parent(client, experiments: list, sweep: str) -> str | None:
    """The newest deleted parent run of ``sweep`` in ``experiments``, or None."""
    from mlflow.entities import ViewType

    for run in client.search_runs([e.experiment_id for e in experiments],
                                  filter_string=f"tags.sweep = '{sweep}'",
                                  run_view_type=ViewType.DELETED_ONLY,
                                  order_by=["attributes.start_time DESC"], max_results=50):
        if PARENT_TAG not in run.data.tags:
            return run.info.run_id
    return None


def sweep_parent_run(client, parent_run_id: str, sweep: str, mlflow_uri: str):
    """``--parent-run``: the parent run of a ``sweep`` invocation in the store, else a
    SourceError (no such run, a trial's run, another sweep's run or no sweep's). Asked before
    anything is read from it or logged into it (a report logged into another sweep's parent
    replaced that sweep's report)."""
    from mlflow.exceptions import MlflowException

    try:
        parent = client.get_run(parent_run_id)
    except MlflowException as exc:  # RESOURCE_DOES_NOT_EXIST
        raise SourceError(f"--parent-run {parent_run_id}: no such run in {redact(mlflow_uri)} "
                          f"({one_line(exc)[:200]})") from None
    if parent.info.lifecycle_stage == "deleted":
        raise SourceError(f"--parent-run {parent_run_id} is deleted in {redact(mlflow_uri)}; "
                          f"accepted: an active run -- restore it with: mlflow runs restore "
                          f"--run-id {parent_run_id}")
    if PARENT_TAG in parent.data.tags:
        raise SourceError(f"--parent-run {parent_run_id} is a trial run (its parent is "
                          f"{parent.data.tags[PARENT_TAG]}); accepted: a sweep's parent run")
    _check_sweep_parent(parent, sweep)
    return parent


def _check_sweep_parent(parent, sweep: str) -> None:
    tags = parent.data.tags
    if "sweep" not in tags:
        raise SourceError(f"--parent-run {parent.info.run_id} has no tag 'sweep': not the "
                          f"parent run of a sweep; accepted: a run sweeps/run.py started")
    if tags["sweep"] != sweep:
        raise SourceError(f"parent run {parent.info.run_id} belongs to sweep {tags['sweep']!r}, "
                          f"not {sweep!r}; accepted: the sweep name the run was started with")


def load_mlflow(sweep: str, *, mlflow_uri: str, parent_run_id: str | None = None,
                experiment: str | None = None) -> SweepRecord:
    """The trials of one sweep invocation from MLflow (see the module docstring for which)."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client(mlflow_uri)
    if parent_run_id:
        parent = sweep_parent_run(client, parent_run_id, sweep, mlflow_uri)
    else:
        parent = _latest_parent(client, _experiments(client, sweep, experiment), sweep)
        _check_sweep_parent(parent, sweep)
    tags = dict(parent.data.tags)
    exp_name = client.get_experiment(parent.info.experiment_id).name
    runs = child_runs(client, parent.info.run_id)
    # runs another tool nested under the parent (an evaluation a lab groups with the sweep)
    # are no trials: without the trial's tags they became a condition named ""
    foreign = [r for r in runs if not is_trial_run(r.data.tags)]
    kept, repeated = _one_run_per_trial([r for r in runs if r not in foreign])
    trials = tuple(sorted((_mlflow_trial(client, run) for run in kept), key=_order))
    notes = ((f"{len(foreign)} run(s) nested under the parent run are not trials of the sweep "
              f"(no trial_id / condition tags) and are left out: "
              f"{', '.join(r.info.run_name or r.info.run_id for r in foreign[:5])}"
              f"{', ...' if len(foreign) > 5 else ''}",) if foreign else ())
    notes += repeated
    # A trial's run deleted in MLflow (the UI, `mlflow runs delete`): not a trial that never
    # started, which a --resume would run (it called a finished sweep partial, with that
    # advice). Runs the driver retired itself are no trial's.
    present = {t.trial_id for t in trials}
    deleted = tuple(sorted({
        r.data.tags[TRIAL_ID_TAG]: r.info.run_id
        for r in child_runs(client, parent.info.run_id, deleted=True)
        if is_trial_run(r.data.tags) and RETIRED_TAG not in r.data.tags
        and r.data.tags[TRIAL_ID_TAG] not in present}.items()))

    listed: dict[str, set[str]] = {}

    def fetch(trial: Trial, name: str, folder: Path) -> Path | None:
        try:
            if trial.run_id not in listed:
                listed[trial.run_id] = {a.path for a in client.list_artifacts(trial.run_id)}
            if name not in listed[trial.run_id]:
                return None
            folder.mkdir(parents=True, exist_ok=True)
            with quiet_artifacts():
                return Path(client.download_artifacts(trial.run_id, name, str(folder)))
        except (MlflowException, OSError):  # unreachable artifacts: the figure says so
            return None

    return SweepRecord(sweep=sweep, experiment=exp_name,
                       source=f"MLflow {redact(mlflow_uri)}, experiment {exp_name}, parent "
                              f"run {parent.info.run_id}",
                       parent_run_id=parent.info.run_id, parent_status=parent.info.status,
                       parent_tags=tags, trials=trials, fetch=fetch,
                       label=parent.info.run_id, notes=notes, deleted=deleted,
                       parent_end_time=parent.info.end_time)


def _one_run_per_trial(runs: list) -> tuple[list, tuple[str, ...]]:
    """One run per trial_id, and a note per trial that has several under the parent (a
    trial re-run by hand, a copy of a run): they were counted as that many seeds of its
    configuration, while the effects read one predictions file for all of them. The run kept
    is the newest FINISHED one, else the newest."""
    by_trial: dict[str, list] = {}
    for run in runs:
        by_trial.setdefault(run.data.tags[TRIAL_ID_TAG], []).append(run)
    kept, notes = [], []
    for trial_id, group in by_trial.items():
        group.sort(key=lambda r: (r.info.status == "FINISHED", r.info.start_time or 0))
        kept.append(group[-1])
        if len(group) > 1:
            notes.append(f"trial {trial_id} has {len(group)} runs under the parent run; the "
                         f"newest {'finished ' if group[-1].info.status == 'FINISHED' else ''}"
                         f"one ({group[-1].info.run_id}) is read, the others left out: "
                         f"{', '.join(r.info.run_id for r in group[:-1])}")
    return kept, tuple(notes)


def _mlflow_trial(client, run) -> Trial:
    tags = run.data.tags
    history = {}
    for key in sorted(run.data.metrics):
        points = client.get_metric_history(run.info.run_id, key)
        by_step = {}
        for m in sorted(points, key=lambda m: (m.step, m.timestamp)):
            by_step[int(m.step)] = _stored(m.value)  # a retried epoch: the last value wins
        history[key] = tuple(sorted(by_step.items()))
    config = resolve_config(run.data.params)
    # the param is the alpha as trained (repr of the float); the tag is rounded for display
    named = TrialRunTags.parse(tags)
    alpha = _number(run.data.params.get("alpha"), _number(named.alpha))
    return Trial(
        run_id=run.info.run_id,
        trial_id=named.trial_id or run.info.run_name or run.info.run_id,
        condition=named.condition or tags.get("sweep", ""),
        direction=named.direction or _direction(alpha),
        alpha=alpha,
        beta=_number(named.beta, _number(str(config.get("beta")))),
        seed=_integer(named.seed, int(config["seed"])),
        status=run.info.status,
        config=config,
        history=history,
        error=tags.get(ERROR_TAG),
    )


def _stored(value: float) -> float:
    """A metric as MLflow's SQL store gives it back: infinity is kept as the largest float
    (+-1.8e308), which read as a finite value put a trial with an infinite alignment on the
    fronts and into the statistics. Read as infinity, it is missing like NaN."""
    value = float(value)
    return math.copysign(math.inf, value) if abs(value) >= sys.float_info.max else value


def _direction(alpha: float) -> str:
    return "max" if alpha > 0 else "min" if alpha < 0 else "none"


def _order(t: Trial) -> tuple:
    return (t.condition, t.alpha, t.beta, t.seed, t.trial_id)


# --------------------------------------------------------------------------------------------
# Ray Tune's result folder


def _ray_run_dir(directory: Path, sweep: str, experiment: str | None) -> Path:
    """``directory`` itself when it is one run's folder, else the newest ``<experiment>_<stamp>``
    folder in it for this sweep (any of its scales, or ``experiment``)."""
    if not directory.is_dir():
        raise SourceError(f"--ray-results {directory}: no such directory")
    if (directory / MANIFEST_FILE).is_file() or parse_run_folder(directory.name):
        return directory
    wanted = {experiment} if experiment else {experiment_name(sweep, s) for s in SCALE_SUFFIXES}
    runs = []
    for sub in directory.iterdir():
        parsed = parse_run_folder(sub.name)
        if sub.is_dir() and parsed and parsed[0] in wanted:
            runs.append(((parsed[1], parsed[2]), sub))
    if not runs:
        raise SourceError(f"--ray-results {directory}: no run folder of {' or '.join(sorted(wanted))}"
                          f" (<experiment>_<YYYYmmdd-HHMMSS>); accepted: Ray's storage folder "
                          f"(--storage of the sweep, default ./ray_results) or one run's folder")
    return max(runs)[1]


def _ray_history(folder: Path, notes: list[str]) -> dict[str, tuple[tuple[int, float], ...]]:
    """metric -> ((epoch, value), ...) from a trial's result.json (one JSON object per
    reported epoch). Its last line cut short (a kill mid-write) is an epoch not reported, said
    in ``notes``; a broken line before it is a SourceError naming the file and line."""
    by_metric: dict[str, dict[int, float]] = {}
    path = folder / "result.json"
    if not path.is_file():
        return {}
    lines = [(n, line) for n, line in enumerate(
        path.read_text(errors="replace").splitlines(), 1) if line.strip()]
    for n, line in lines:
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"a JSON {type(row).__name__}, not an object")
        except ValueError as exc:  # json.JSONDecodeError is one
            if n == lines[-1][0]:
                notes.append(f"{path}: its last line ({n}) is cut short or not a result "
                             f"({exc}), as a trial killed mid-write leaves it; read as not "
                             f"reported, the trial's earlier epochs are kept")
                break
            raise SourceError(f"{path} line {n}: not a Ray result ({exc}); accepted: one JSON "
                              f"object per line, as Ray Tune writes it (only the last line may "
                              f"be cut short)") from None
        if "epoch" not in row:
            continue
        epoch = int(row["epoch"])
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                by_metric.setdefault(key, {})[epoch] = float(value)
    return {k: tuple(sorted(v.items())) for k, v in by_metric.items()}


def _recorded(run_dir: Path) -> dict:
    """The fingerprint a run folder recorded when it started (``records.FINGERPRINT_FILE``);
    {} without a readable one."""
    try:
        return read_json_object(run_dir / FINGERPRINT_FILE)
    except ValueError:
        return {}


def _recorded_experiment(run_dir: Path) -> str | None:
    """The experiment of a run folder whose name is not ``<experiment>_<stamp>`` (a copy kept
    under another name): the sweep and scale its fingerprint recorded; None without them."""
    recorded = _recorded(run_dir)
    try:
        scale = "smoke" if recorded.get("smoke") else recorded["scale"]
        return experiment_name(str(recorded["sweep"]), scale)
    except (KeyError, TypeError, ValueError):
        return None


def _trial_folder(run_dir: Path, recorded: str | None) -> Path | None:
    """A trial's folder from the manifest's ``<folder>/<trial folder>`` (relative to the
    storage folder): inside ``run_dir`` when it is there, so a copy kept under another name
    reads its own trial folders, not those of the folder it was copied from; else as
    recorded, beside it (an Optuna search run before stop 29 kept its trials in sibling
    folders ``<run folder>-<condition>-<side>``)."""
    if not recorded:
        return None
    parts = Path(recorded).parts
    inside = run_dir.joinpath(*parts[1:]) if len(parts) > 1 else None
    if inside is not None and parts[0] != run_dir.name and inside.is_dir():
        return inside
    return run_dir.parent / recorded


_RAY_BOOKKEEPING = {"timestamp", "training_iteration", "time_this_iter_s", "time_total_s", "pid",
                    "time_since_restore", "iterations_since_restore", "done",
                    "should_checkpoint"}


def _real_folder(path: Path) -> Path:
    """``path`` resolved (links followed: an Optuna run's trial folders are found beside the
    real run folder), unless the real name is not UTF-8: a UTF-8 link the user named to a
    folder named in another encoding (the README's remedy) then stays the link, made absolute
    and normalised, which the report can write (it failed to encode the resolved name)."""
    try:
        real = path.resolve()
    except (RuntimeError, OSError) as exc:  # a loop of links (RuntimeError before 3.13)
        raise SourceError(f"--ray-results {path}: cannot be resolved ({exc}); accepted: a "
                          f"folder, or a symbolic link to one") from None
    try:
        str(real).encode("utf-8")
    except UnicodeEncodeError:
        return Path(os.path.abspath(path))
    return real


#: How a record read from Ray Tune's result folder names its source (``SweepRecord.source``)
RAY_SOURCE = "Ray Tune results"


def load_ray(directory: str | os.PathLike, sweep: str, *,
             experiment: str | None = None) -> SweepRecord:
    """The trials of one sweep invocation from Ray Tune's result folder (module docstring):
    the driver's manifest (``records.MANIFEST_FILE``: every trial's key, state, folder, MLflow
    run and config) and each trial folder's ``result.json``; never Ray's private state."""
    run_dir = _ray_run_dir(_real_folder(expand_user(directory, "--ray-results")), sweep,
                           experiment)
    parsed_dir = parse_run_folder(run_dir.name)
    exp_name = parsed_dir[0] if parsed_dir else _recorded_experiment(run_dir)
    if exp_name is None:
        raise SourceError(f"--ray-results {run_dir}: which sweep ran here is unknown (the name "
                          f"is not <experiment>_<YYYYmmdd-HHMMSS> and there is no "
                          f"{FINGERPRINT_FILE}); accepted: a run folder the driver wrote, "
                          f"under any name")
    name, suffix = parse_experiment(exp_name)
    smoke = suffix == "smoke"
    scale = "paper" if suffix == "paper" else "demo"
    if name != sweep:
        raise SourceError(f"--ray-results {run_dir} holds sweep {name!r}, not {sweep!r}")
    notes = []
    parent = _ray_parent(run_dir / PARENT_FILE, notes)
    entries = read_manifest(run_dir)
    if not entries:
        notes.append(f"{run_dir / MANIFEST_FILE} "
                     + ("lists no trial" if (run_dir / MANIFEST_FILE).is_file() else
                        "does not exist (the driver writes it when it starts its trials)")
                     + ": no trials to read")
    trials = []
    folders: dict[str, Path | None] = {}
    for entry in entries:
        try:
            key = entry.trial_key()
        except ValueError:
            notes.append(f"trial {entry.key} in {run_dir}: not a sweep trial key "
                         f"(<condition>-<direction>-a<|alpha|>-b<beta>-s<seed>); skipped")
            continue
        folder = _trial_folder(run_dir, entry.folder)
        present = folder is not None and folder.is_dir()
        history = ({k: v for k, v in _ray_history(folder, notes).items()
                    if k not in _RAY_BOOKKEEPING} if present else {})
        error_file = folder / "error.txt" if present else None
        lines = (error_file.read_text(errors="replace").strip().splitlines()
                 if error_file is not None and error_file.is_file() else [])
        error = error_summary(lines[-1]) if lines else None
        if entry.state == "done" and not history and error is None:
            # the driver saw it finish, but its results are not where the manifest says
            where = folder if folder is not None else "(no folder recorded)"
            error = (f"results not found: {where} holds no complete line in result.json"
                     if present and (folder / "result.json").is_file() else
                     f"results not found: {where} holds no result.json (moved or deleted?)")
            notes.append(f"trial {entry.key}: {error}; counted as failed")
        # an Optuna sample's key rounds its alpha; the manifest's config has it as trained
        alpha = key.signed_alpha
        if key.sample is not None:
            alpha = _number(str(entry.config.get("alpha")), alpha)
        trials.append(Trial(
            run_id=entry.run_id or entry.key,
            trial_id=entry.key, condition=key.condition, direction=key.direction,
            alpha=alpha, beta=key.beta, seed=key.seed,
            status=_manifest_status(entry.state, history, error, entry.config),
            config=resolve_config({**entry.config, "alpha": alpha,
                                   "beta": key.beta, "seed": key.seed}),
            history=history, error=error))
        folders[entry.key] = folder if present else None

    def fetch(trial: Trial, name: str, folder: Path) -> Path | None:
        # sweeps.execute copies the artifacts into the checkpoints reported after they are
        # written (the last epoch's); the newest checkpoint that has them wins.
        trial_dir = folders.get(trial.trial_id)
        if trial_dir is None:
            return None
        found = sorted(trial_dir.glob(f"checkpoint_*/{ARTIFACTS_DIR}/{name}"))
        found += [p for p in [trial_dir / ARTIFACTS_DIR / name] if p.is_file()]
        return found[-1] if found else None

    recorded = _recorded(run_dir)  # as the driver tags its parent run: what a resume repeats
    # (the note's command lacked --set, which the driver then refused as "started with a
    # different --set overrides")

    def given(key: str, kind: type) -> Any:
        value = recorded.get(key)
        return value if isinstance(value, kind) and not isinstance(value, bool) else None

    tags = SweepRunTags(
        sweep=sweep, scale=scale, smoke=smoke, data=given("data", str) or "",
        search=given("search", str) or "grid", num_samples=given("num_samples", int),
        seeds=given("seeds", int) or 1,
        overrides={str(k): str(v) for k, v in (given("overrides", dict) or {}).items()},
        only=tuple(map(str, given("only", list) or ())),
        # what the driver tags its parent run when it stops ("not started": what manifests
        # said before stop 29)
        interrupted=any(e.state in ("no epoch finished", "not started")
                        or e.state.startswith("stopped at") for e in entries) or None,
    ).format()
    # a manifest that still lists trials as pending was written when the driver started its
    # trials, and not yet rewritten at its end: the run is in progress (or its driver was
    # killed outright), as a RUNNING parent run is in MLflow
    running = any(e.state == "pending" for e in entries)
    return SweepRecord(sweep=sweep, experiment=exp_name, source=f"{RAY_SOURCE} {run_dir}",
                       parent_run_id=parent.run_id, parent_status="RUNNING" if running else "",
                       parent_tags=tags, trials=tuple(sorted(trials, key=_order)),
                       fetch=fetch, label=run_dir.name, notes=tuple(notes))


def _ray_parent(path: Path, notes: list[str]) -> ParentPointer:
    """The driver's mlflow_parent.json (it only names the MLflow parent run): no run when it
    is absent, as when it is unreadable (a kill mid-write), which ``notes`` then says."""
    if not path.is_file():
        return ParentPointer(None)
    try:
        return ParentPointer.read(path)
    except ValueError as exc:
        notes.append(f"{path}: unreadable ({exc}); read as absent: no MLflow parent run is "
                     f"named")
        return ParentPointer(None)


def _manifest_status(state: str, history: Mapping[str, tuple], error: str | None,
                     config: Mapping[str, Any]) -> str:
    """A manifest state as an MLflow run status: "done" FINISHED, "ERROR" FAILED, stopped
    KILLED; "pending" (the driver has not ended) FINISHED once the trial reported its last
    epoch (``config``'s epochs), RUNNING once it reported any, else SCHEDULED; a trial folder
    with error.txt FAILED whatever the manifest says. (A pending trial that had finished read
    as RUNNING: a report of a live sweep counted 0 trials finished.)"""
    if error is not None or state == "ERROR":
        return "FAILED"
    if state == "done":
        return "FINISHED"
    if state == "pending":
        if not history:
            return "SCHEDULED"
        last = max((epoch for epoch, _ in history.get("epoch", ())), default=-1)
        epochs = config.get("epochs")
        trained = (isinstance(epochs, int) and not isinstance(epochs, bool)
                   and last + 1 >= epochs)
        return "FINISHED" if trained else "RUNNING"
    return "KILLED"
