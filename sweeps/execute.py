"""Run a validated sweep ``Plan`` on Ray Tune, tracked in MLflow.

The data flows one way: each distinct data source is indexed and each condition's reference
is prepared ONCE here on the driver and put in Ray's object store (small things only: split
indices over files every node sees, label and voxel tables, a reference's weights; no image is
decoded here); Ray Tune launches one trial per grid point of the ONE shared trainable
(``trainable.train.train``), each fetching only its own condition's data index and reference
from the store and streaming its images itself (``trainable.data``); per-epoch metrics and checkpoints go to Ray Tune
and to the trial's nested MLflow run. All Ray imports of the project live in ``sweeps.ray_glue``.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from records import (
    ARTIFACTS_DIR,
    ERROR_TAG,
    FACTS_FILE,
    FINGERPRINT_FILE,
    INTERRUPTED_TAG,
    JOURNAL_FILE,
    PARENT_FILE,
    TRIAL_ID_TAG,
    ManifestEntry,
    ParentPointer,
    SweepRunTags,
    TrialKey,
    child_runs,
    fmt_number,
    read_manifest,
    run_folder_name,
    write_manifest,
)
from records.errors import exception_line, one_line
from records.scratch import scratch_dir
from records.uris import redact
from references.cache import ENV_VAR as CACHE_ENV
from references.cache import (
    SHARED_LOCK_MODE,
    atomic_write_text,
    cache_root,
    env_default,
    file_sha256,
)
from sweeps import tracking
from sweeps.plan import (
    DEFAULT_FLUSH_S,
    FLUSH_ENV,
    Plan,
    UsageError,
    _object_store_bytes,
    _tune_trials,
    check_checkpoints,
    check_services,
    check_trials_fit,
    check_tune_state,
    fingerprint,
    flush_seconds,
    lock_file_problem,
    ray_address,
    read_run_json,
    resume_choice,
    run_states,
    run_unfinished,
    sweep_files,
    temp_socket_problem,
    weights_spec,
)
from sweeps.spec import Resources, TrialSpec

# RAY_AUTH_MODE=token is set by the package (sweeps/__init__.py), before any Ray import.
# With CheckpointConfig(num_to_keep=2) Tune snapshots its experiment state whenever a trial has
# saved two checkpoints since the last snapshot, so the state never names a deleted checkpoint.
# At demo scale an epoch takes seconds, so that is every few seconds, and Tune prints a
# three-line warning each time; the snapshot itself is small (~20 ms). Silence the warning only.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def _quiet_tune_advice() -> None:
    """Tune's line that contradicts the driver's own: on an interrupt it advises
    ``Tuner.restore(...)``, where the driver prints the ``--resume`` command."""
    tracking.drop_log_records("ray.tune.tune", "Experiment has been interrupted")


@contextlib.contextmanager
def _no_tensorboard_logger():
    """Around a run's ``fit()``: Tune adds a TensorBoard logger to every run and then tells
    the user to run `tensorboard`, which the project does not install (MLflow holds the
    metrics). Its CSV and JSON loggers (what a run folder is read by) are in the run's
    config (``_run_config``). Around a restored run's only where its saved config has them
    (``_keeps_its_own_loggers``: a run started before stop 35 has none, and Tune then adds
    every logger it lacks). A user's own TUNE_DISABLE_AUTO_CALLBACK_LOGGERS is left as it
    is."""
    with env_default("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1"):
        yield


def _keeps_its_own_loggers(tuner) -> bool:
    """Whether a restored Tuner's saved run config gives Tune's CSV and JSON loggers itself
    (``_run_config``, since stop 35), so that ``_no_tensorboard_logger`` can go around its
    fit too; False for an older run's config (Tune then adds each logger it lacks) or a Ray
    whose Tuner keeps its config elsewhere."""
    from sweeps.ray_glue import tune

    try:
        callbacks = tuner._local_tuner.get_run_config().callbacks or []
    except AttributeError:
        return False
    return (any(isinstance(c, tune.logger.CSVLoggerCallback) for c in callbacks)
            and any(isinstance(c, tune.logger.JsonLoggerCallback) for c in callbacks))


def _restore(run_dir: Path, trainable):
    """``Tuner.restore`` of ``run_dir`` (unfinished and errored trials), with the context its
    ``fit()`` runs in: without Tune's TensorBoard logger where its saved config has the CSV
    and JSON ones (every resume printed a `tensorboard` command and wrote event files).
    Tune's warning that it found no metrics of the trials that never started (each pending,
    without a folder yet: one line per trial on every resume) is dropped for those trials;
    a started trial's missing results are still named."""
    from sweeps.ray_glue import tune

    pending = {str(t) for t in (_tune_trials(run_dir) or []) if t.status == "PENDING"}
    _drop_fetch_warnings(pending)
    tuner = tune.Tuner.restore(str(run_dir), trainable=trainable, resume_unfinished=True,
                               resume_errored=True)
    quiet = _no_tensorboard_logger() if _keeps_its_own_loggers(tuner) else \
        contextlib.nullcontext()
    return tuner, quiet


class _NotStartedFetches(logging.Filter):
    """Tune's "Failed to fetch metrics for N trial(s):" less the lines of ``names``' missing
    files (trials that never started); the record is dropped when nothing is left."""

    PREFIX = "Failed to fetch metrics for"

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record that does not format: Tune's to show
            return True
        if not message.startswith(self.PREFIX):
            return True
        lines = message.split("\n")[1:]
        kept = [line for line in lines if not any(
            line.startswith(f"- {name}: FileNotFoundError(") for name in self.names)]
        if len(kept) == len(lines):
            return True
        if not kept:
            return False
        record.msg, record.args = "\n".join(
            [f"{self.PREFIX} {len(kept)} trial(s):", *kept]), ()
        return True


def _drop_fetch_warnings(names: set[str]) -> None:
    log = logging.getLogger("ray.tune.analysis.experiment_analysis")
    mine = next((f for f in log.filters if isinstance(f, _NotStartedFetches)), None)
    if mine is None:
        mine = _NotStartedFetches()
        log.addFilter(mine)
    mine.names = set(names)


#: The folder holding this copy of the project's packages (what the trials must import).
CODE_ROOT = Path(__file__).resolve().parent.parent

#: The packages a trial imports; their Python files are what ``code_digest`` hashes.
CODE_PACKAGES = ("records", "references", "sweeps", "trainable")


@functools.cache
def code_digest(root: Path = CODE_ROOT) -> str:
    """sha256 of the project's code under ``root`` (every ``.py`` file of ``CODE_PACKAGES``,
    by relative path and content), the same for two copies holding the same files, git or
    not. The driver tags its parent run with it (``code_sha256``) and every trial compares
    its own copy's with it before it starts (``code_mismatch``). Once per process, as it
    starts (the driver's ``execute``, a trial's first ``run_trial``): the code it imported.
    A reused worker keeps its first trial's digest, as it keeps the code it imported."""
    h = hashlib.sha256()
    for package in CODE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix().encode()
            data = path.read_bytes()
            h.update(b"%d:%s:%d:" % (len(rel), rel, len(data)))
            h.update(data)
    return h.hexdigest()


def code_mismatch(payload: Payload) -> str | None:
    """Why this trial's copy of the code is not the driver's, or None. The workers' path puts
    the driver's folder first (``_worker_env``), but a node where that folder does not exist
    (a driver run from a laptop's checkout against a cluster whose nodes have their own
    copy, or an older image) imports its own copy: its trials trained with other code than
    the run recorded, silently."""
    if not payload.code_sha256 or code_digest() == payload.code_sha256:
        return None
    return (f"node {socket.gethostname()} imports this project from {CODE_ROOT}, whose code "
            f"(sha256 {code_digest()[:12]}) is not the driver's ({payload.code_root} on "
            f"{payload.code_host}, sha256 {payload.code_sha256[:12]}); accepted: the driver's "
            f"code on every node (its folder on a shared file system at the same path, or "
            f"the same image)")


class CodeMismatch(RuntimeError):
    """A trial whose node imports other code than the driver's (``code_mismatch``). Not one
    of ``_repeating_errors``: Tune's retry may land on a node with the driver's code."""

PROGRESS_METRICS = ("epoch", "val_performance", "val_alignment", "batch_alignment", "task_loss")


@dataclass(frozen=True)
class Payload:
    """What every trial receives through ``tune.with_parameters`` (small: object references,
    not the data itself, so a trial fetches only its own condition's data)."""

    specs: dict[str, TrialSpec]
    data_refs: dict[str, Any]  # condition -> ObjectRef of TrialData (split indices, no images)
    reference_refs: dict[str, Any]  # condition -> ObjectRef of the reference
    mlflow_uri: str
    parent_run_id: str
    run_tags: dict[str, str]
    datasets: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    code_sha256: str = ""  # the driver's ``code_digest``: "" checks nothing
    code_root: str = ""
    code_host: str = ""


class RayHooks:
    """``trainable.train.Hooks`` for a trial running under Ray Tune with an MLflow child run.

    Artifacts (the conv1 filter grid, the final metrics) are written to a private temporary
    folder, logged to the MLflow run when the trial ends, and copied into every checkpoint
    reported after they appear (``<checkpoint>/artifacts/``), so Ray persists them to the
    trial's storage folder with its own checkpoint mechanism. Tune's ``get_trial_dir()`` is
    not used for them: with reused actors it names a local working folder that Tune never
    copies to storage.
    """

    def __init__(self, run: tracking.TrialRun, placed: Mapping[str, str] | None = None) -> None:
        from sweeps.ray_glue import tune

        self._tune = tune
        self.run = run
        self.journal: dict[int, dict[str, float]] = {}
        # the child run's ran.* tags as the checkpoints carry them (a restored attempt on
        # another share of the node adds to them, ``merge_facts``); ``placed``: Ray's share
        self.facts: dict[str, list] = {}
        self._placed = dict(placed or {})
        self._restored: tempfile.TemporaryDirectory | None = None
        self._artifacts = tempfile.TemporaryDirectory(prefix="trial-artifacts-",
                                                      dir=scratch_dir())

    def report(self, metrics: dict[str, float], checkpoint_dir: Path) -> None:
        epoch = int(metrics["epoch"])
        self.journal[epoch] = {k: float(v) for k, v in metrics.items()}
        # The journal travels with the checkpoint: a restored trial (or the driver, at the
        # end) knows every epoch it reported and sends MLflow only what it lacks.
        (Path(checkpoint_dir) / JOURNAL_FILE).write_text(json.dumps(self.journal))
        (Path(checkpoint_dir) / FACTS_FILE).write_text(json.dumps(self.facts))
        art = self.artifact_dir()
        if any(art.iterdir()):
            shutil.copytree(art, Path(checkpoint_dir) / ARTIFACTS_DIR, dirs_exist_ok=True)
        # Ray persists the checkpoint directory to the run's storage before report returns;
        # the metrics then go to MLflow in the background (tracking.TrialRun).
        # Tune's progress table shows the first four metrics of a result: the ones that say
        # how the trial goes (PROGRESS_METRICS; _run_config's CLIReporter is for the old output)
        shown = {k: metrics[k] for k in PROGRESS_METRICS if k in metrics and k != "epoch"}
        self._tune.report({**shown, **metrics},
                          checkpoint=self._tune.Checkpoint.from_directory(str(checkpoint_dir)))
        self.run.log_epoch(metrics, epoch)

    def restore(self) -> Path | None:
        ckpt = self._tune.get_checkpoint()
        if ckpt is None:
            return None
        self._restored = tempfile.TemporaryDirectory(prefix="restore-", dir=scratch_dir())
        path = Path(ckpt.to_directory(self._restored.name))
        self.journal = read_journal(path)
        self.facts = read_facts(path)
        self.run.reconcile(self.journal)
        return path

    def artifact_dir(self) -> Path:
        return Path(self._artifacts.name)

    def describe(self, facts: dict[str, str]) -> None:
        """``trainable.train.trial_facts`` and Ray's share of the node as the child run's
        ``ran.*`` tags; a restored attempt's changes are added from the epoch it starts at
        (``merge_facts``), not written over the first attempt's."""
        since = max(self.journal) + 1 if self.journal else 0
        now = {f"{FACT_TAG_PREFIX}{k}": v for k, v in {**facts, **self._placed}.items()}
        self.facts = merge_facts(self.facts, now, since)
        self.run.set_tags(facts_tags(self.facts))

    def close(self) -> None:
        self._artifacts.cleanup()
        if self._restored is not None:
            self._restored.cleanup()


def merge_facts(before: Mapping[str, list], now: Mapping[str, str],
                since: int) -> dict[str, list]:
    """A trial's ``ran.*`` facts after an attempt that starts at epoch ``since`` resolved
    ``now``: per tag the values in force and the epoch each took over from, ``[[value,
    epoch], ...]``; a value that changed is appended, not written over (``facts_tags``
    renders them). Threads set the order of float reductions, so a trial resumed on another
    CPU share is no longer bit-equal to one that never stopped, and its record says so."""
    merged = {k: [list(step) for step in v] for k, v in before.items()}
    for key, value in now.items():
        history = merged.get(key)
        if not history or since == 0:
            merged[key] = [[value, 0]]
        elif history[-1][0] != value:
            history.append([value, since])
    return merged


def facts_tags(facts: Mapping[str, list]) -> dict[str, str]:
    """The child run's ``ran.*`` tags: one value, or ``"1, then 2 from epoch 3"``."""
    return {k: ", then ".join(str(v) if i == 0 else f"{v} from epoch {e}"
                              for i, (v, e) in enumerate(history))
            for k, history in facts.items() if history}


def read_facts(checkpoint_dir: Path) -> dict[str, list]:
    """A checkpoint's ``ran.*`` facts (``merge_facts``; {} for one written before they were
    kept)."""
    path = Path(checkpoint_dir) / FACTS_FILE
    if not path.is_file():
        return {}
    value = json.loads(path.read_text())
    if not isinstance(value, dict):
        return {}
    return {str(k): [[str(v), int(e)] for v, e in h] for k, h in value.items()
            if isinstance(h, list) and all(isinstance(x, list) and len(x) == 2 for x in h)}


def read_journal(checkpoint_dir: Path) -> dict[int, dict[str, float]]:
    """A checkpoint's metrics journal ({} when it has none)."""
    path = Path(checkpoint_dir) / JOURNAL_FILE
    if not path.is_file():
        return {}
    return {int(e): m for e, m in json.loads(path.read_text()).items()}


def _flush_timeout() -> float:
    """How long a finished trial waits for MLflow to take what it queued
    (``ALIGNSWEEP_TRACKING_FLUSH_S``, default 900 s: an outage of minutes loses nothing).
    Never raises (it runs in the trial's ``finally``): the driver refused a bad value before
    starting (``plan.flush_seconds``); one set otherwise on a node is warned about and the
    default used."""
    try:
        return flush_seconds(os.environ.get(FLUSH_ENV))
    except ValueError as exc:
        logging.getLogger(__name__).warning("%s; waiting the default %.0f s", exc,
                                            DEFAULT_FLUSH_S)
        return DEFAULT_FLUSH_S


def keep_exit_signals() -> None:
    """In a trial's worker process: a SIGTERM whose handler's SystemExit lands inside a
    callback Python cannot raise from (a weakref or ``__del__`` run by the garbage collector)
    is delivered again, not lost. Ray's worker handler raises SystemExit wherever the main
    thread is; there Python printed "Exception ignored in ... SystemExit: 1", a traceback in
    the log of a run that went well, and the worker went on until Ray killed it. Installed
    once per process; every other unraisable exception goes to the hook in place before."""
    import threading

    previous = sys.unraisablehook
    if getattr(previous, "_alignsweep", False):
        return

    def hook(unraisable) -> None:
        handler = signal.getsignal(signal.SIGTERM)
        if (unraisable.exc_type is not None and issubclass(unraisable.exc_type, SystemExit)
                and threading.current_thread() is threading.main_thread()
                and callable(handler)):
            # sent again a moment later, from another thread: the handler then runs once
            # the main thread is out of the callback (sent from here, it ran inside this
            # hook, where its exception is lost as well); lost again, it comes back here
            timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM))
            timer.daemon = True
            timer.start()
            return
        previous(unraisable)

    hook._alignsweep = True
    sys.unraisablehook = hook


def refuse_before_training(payload: Payload | None) -> None:
    """A trial's first steps, before it fetches, records or trains anything: the driver's
    settings Ray could not pass as they are (``apply_driver_env``), then a refusal where this
    node does not see the run's storage or has a TMPDIR its data loading would hang on, where
    an earlier attempt met an error that repeats, or where this node's code is not the
    driver's (``payload``; None checks no code)."""
    apply_driver_env()
    unseen = storage_problem()
    if unseen:  # before anything is trained that could not be kept
        raise StorageUnreachable(unseen)
    sockets = temp_socket_problem()  # this node's TMPDIR (the driver checks only its own)
    if sockets:
        raise NodeUnfit(f"node {socket.gethostname()}: {sockets}")
    failed = failed_for_good()
    if failed is not None:  # Tune's retry of a trial whose error repeats itself: end at once
        raise RepeatedFailure(failed)
    mismatch = code_mismatch(payload) if payload is not None else None
    if mismatch:
        raise CodeMismatch(mismatch)


def run_trial(config: dict[str, Any], *, payload: Payload) -> None:
    """The Ray Tune function trainable: one grid point, by its trial id. Tracking goes through
    a background queue (``tracking.TrialRun``): an unreachable MLflow never stalls or fails the
    trial, and a failure's own error is what the trial raises."""
    from sweeps.ray_glue import ray, tune
    from trainable.train import train

    # Ray's storage module logs "Checkpoint successfully created at: ..." at INFO for every
    # report (every epoch of every trial), which buries the progress table; warnings still show.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    keep_exit_signals()
    refuse_before_training(payload)
    spec = _trial_spec(config, payload)
    data = ray.get(payload.data_refs[spec.condition])
    reference = ray.get(payload.reference_refs[spec.condition])
    run = tracking.TrialRun(payload.mlflow_uri, payload.parent_run_id, spec.trial_id,
                            params=resolved_config(spec.config),
                            tags={**payload.run_tags,
                                  **_own_data(payload.datasets.get(spec.condition)),
                                  **spec.tags()},
                            dataset=payload.datasets.get(spec.condition))
    # Where it ran (multi-node checks), which process to signal (fault-injection tests), and
    # the share of the node Ray gave it (a GPU request is dropped on a cluster without one).
    context = ray.get_runtime_context()
    assigned = context.get_assigned_resources()
    if assigned.get("GPU", 0.0) == 0:
        # Ray 2.60 no longer hides a node's GPUs from a task given none (it set
        # CUDA_VISIBLE_DEVICES="" before): device=auto then took GPU 0 of a GPU node, a GPU Ray
        # had not given it, in bf16 (every demo trial on a GPU machine). Hidden here, before
        # the trial starts CUDA; a trial given a GPU sees the one Ray chose.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    placed = {"cpus": fmt_number(assigned.get("CPU", 0.0)),
              "gpus": fmt_number(assigned.get("GPU", 0.0)),
              "visible_gpus": os.environ.get("CUDA_VISIBLE_DEVICES", "all") or "none"}
    hooks = RayHooks(run, placed=placed)
    run.set_tags({"ray_node_id": context.get_node_id(), "worker_pid": str(os.getpid()),
                  # at once for a trial that fails before it describes itself; a restored
                  # one's are merged with its earlier attempts' (RayHooks.describe)
                  **({f"{FACT_TAG_PREFIX}{k}": v for k, v in placed.items()}
                     if tune.get_checkpoint() is None else {})})
    try:
        train(spec.config, data=data, reference=reference, hooks=hooks)
        run.log_artifacts(hooks.artifact_dir())
        run.finish("FINISHED")
    except (KeyboardInterrupt, SystemExit):  # Tune stopping the trial (Ctrl-C): no error
        run.finish("KILLED")
        raise
    except BaseException as exc:
        run.set_tags({ERROR_TAG: error_line(exc)})  # one line, redacted, as the replay writes
        run.finish("FAILED")
        if isinstance(exc, _repeating_errors()):
            mark_failed_for_good(error_line(exc))
        raise
    finally:
        run.close(_flush_timeout())  # queued operations only: nothing here can mask `exc`
        hooks.close()


#: A child run's tags for what the trial resolved when it started (``trial_facts``).
FACT_TAG_PREFIX = "ran."

#: In a trial's folder of the run's storage: the error of an attempt that would fail the
#: same way again.
FAILED_MARKER = "failed_for_good.txt"


def _failure_marker() -> tuple[Any, str]:
    """(pyarrow file system, path) of the running trial's ``FAILED_MARKER``: in its folder of
    the run's storage (``--storage``), which every attempt reads, on whichever node and in
    whichever worker it runs. It was in Tune's ``get_trial_dir()``, a node-local staging
    folder that also depends on the worker: a fresh one's is ``driver_artifacts/<trial>``, a
    reused one's ``working_dirs/<trial>``. A retry on another node, or one whose first
    attempt ran in a reused worker and which got a fresh one, did not see the marker and
    trained again."""
    from sweeps.ray_glue import trial_storage

    storage = trial_storage()
    return storage.storage_filesystem, f"{storage.trial_fs_path}/{FAILED_MARKER}"


def failed_for_good() -> str | None:
    """In a trial: the error line an earlier attempt left in ``FAILED_MARKER``, or None."""
    fs, path = _failure_marker()
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read().decode("utf-8", "replace").strip()
    except OSError:  # none (FileNotFoundError), or unreadable: this attempt trains
        return None


def mark_failed_for_good(line: str) -> None:
    """In a trial that failed with an error its retry would meet again: leave ``line`` in
    ``FAILED_MARKER`` (written whole, then renamed), so Tune's retries end at once. Best
    effort: where the storage cannot be written, the retries train again and fail as this
    attempt did."""
    fs, path = _failure_marker()
    part = f"{path}.{socket.gethostname()}-{os.getpid()}.part"
    try:
        fs.create_dir(path.rpartition("/")[0])
        with fs.open_output_stream(part) as stream:
            stream.write(line.encode("utf-8"))
        fs.move(part, path)
    except OSError as exc:
        print(f"warning: cannot leave {path} ({one_line(exc)}); Tune's retries of this trial "
              "will train again", file=sys.stderr, flush=True)


class NodeUnfit(RuntimeError):
    """A trial's node set up so that the trial would fail or hang there (a TMPDIR too long
    for its data-loading sockets): raised before it trains; a RuntimeError, so Tune's retries
    may land on another node."""


class StorageUnreachable(RuntimeError):
    """A trial on a node that does not see the run's storage folder (``--storage``): none
    of its checkpoints, results or failure markers could be kept. Raised before the trial
    trains (Ray itself finds out only when it persists the first checkpoint, an epoch in,
    in a paragraph); a RuntimeError, so Tune's retries may land on a node that sees it."""


def storage_problem() -> str | None:
    """In a trial: why its node does not see the run's storage folder, or None. The driver's
    Ray leaves ``STORAGE_MARKER`` in that folder as the run starts (and again on --resume);
    a node that has the folder on a shared mount sees it, one that made a local folder of
    the same name does not."""
    from pyarrow.fs import FileType

    from sweeps.ray_glue import STORAGE_MARKER, trial_storage

    storage = trial_storage()
    folder = storage.experiment_fs_path
    try:
        info = storage.storage_filesystem.get_file_info(f"{folder}/{STORAGE_MARKER}")
        if info.type != FileType.NotFound:
            return None
        why = f"no {STORAGE_MARKER} there, which the driver's Ray wrote"
    except OSError as exc:
        why = one_line(exc)
    return (f"node {socket.gethostname()} does not see the run's storage folder {folder} "
            f"({why}); expected --storage on a folder every node mounts at the same path")


class RepeatedFailure(RuntimeError):
    """Tune retries a failed trial (``FailureConfig(max_failures=2)``: a lost node, a killed
    worker). A trial that diverged, or met a malformed file, missing weights or a setting its
    data cannot meet (``_repeating_errors``), would fail the same way at the same cost: its
    retry ends at once with this, whose message is the first attempt's error (``error_line``
    shows that). ``--resume`` clears the marker (the user fixed the cause)."""


def _repeating_errors() -> tuple[type[BaseException], ...]:
    """What a trial raises that its retry would raise again: a divergence, bad input (a
    malformed file, missing weights, a setting the data cannot meet: ValueError and its
    kin), a failed solve. Not retried-away transients: OSError (a flaky mount), MemoryError
    and other RuntimeErrors (CUDA out of memory beside another trial) keep Tune's retries."""
    import torch

    from trainable.train import TrialDiverged

    return (TrialDiverged, ValueError, TypeError, ArithmeticError, LookupError,
            NotImplementedError, AssertionError, torch.linalg.LinAlgError)


def _clear_failure_markers(run_dir: Path) -> None:
    """--resume reruns errored trials: forget which errors were thought permanent."""
    for marker in run_dir.glob(f"**/{FAILED_MARKER}"):
        marker.unlink(missing_ok=True)


def resolved_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """What a trial records (MLflow params, the manifest): every TrialConfig setting as the
    trial runs it, the sweep's and --set's values over the defaults, so a record read after a
    default has changed still says what ran."""
    from trainable.config import TrialConfig

    return TrialConfig.from_dict(dict(config)).asdict()


def _trial_spec(config: dict[str, Any], payload: Payload) -> TrialSpec:
    """The grid trial named by ``trial_id``, or, for adaptive search, a trial of the given
    condition and direction at the sampled |alpha| (``alpha_mag``), derived from that
    direction's grid trial so every other setting is the sweep file's."""
    if "alpha_mag" not in config:
        return payload.specs[config["trial_id"]]
    from dataclasses import replace

    from sweeps.ray_glue import tune

    base = payload.specs[config["trial_id"]]
    sign = 1.0 if base.direction == "max" else -1.0
    alpha = sign * float(config["alpha_mag"])
    trial_id = _optuna_trial_id(base, abs(alpha), tune.get_context().get_trial_id())
    return replace(base, trial_id=trial_id, alpha=alpha, config={**base.config, "alpha": alpha})


def _optuna_trial_id(base: TrialSpec, alpha_mag: float, tune_trial_id: str) -> str:
    """A sampled trial's key: its grid direction's, at the sampled |alpha|, with the sample's
    id (Tune's trial id) so that samples never share a name."""
    return TrialKey(base.condition, base.direction, float(f"{alpha_mag:.4g}"), base.beta,
                    base.seed, sample=tune_trial_id).format()


# ----------------------------------------------------------------------------- driver


def _say(msg: str) -> None:
    print(msg, flush=True)


#: Seconds the driver waits for every node's answer to ``node_problems``.
NODE_CHECK_S = 60.0


def _files_trials_read(run_dir: Path, datas) -> list[str]:
    """What every trial reads or writes outside Ray, one file each: the run's folder in
    ``--storage`` (its fingerprint), and each split's first image file or its stimuli file."""
    files = {str(run_dir / FINGERPRINT_FILE): None}
    for data in datas:
        for split in (data.train, data.val):
            index = getattr(split, "index", None)
            stimuli = getattr(split, "stimuli", None)
            if index is not None and len(index):
                files[str(index.path(0))] = None
            elif stimuli is not None:
                files[str(stimuli.path)] = None
    return list(files)


def _look_around(files: list[str]) -> tuple[str, list[str], str | None]:
    """On one node (a task of ``node_problems``; the node imports this module for it, so a
    node without the project's code says so there): its name, why it cannot read each of
    ``files``, and why its TMPDIR cannot hold the trials' data-loading sockets
    (``temp_socket_problem``) or None."""
    problems = []
    for path in files:
        try:
            with open(path, "rb") as fh:
                fh.read(1)
        except OSError as exc:
            problems.append(f"cannot read {path} ({exc.strerror or type(exc).__name__})")
    return socket.gethostname(), problems, temp_socket_problem()


def node_problems(run_dir: Path, datas) -> list[str]:
    """On a cluster of several nodes: one line for each node that cannot run the trials as
    this machine set them up, each found by a zero-CPU task on that node before any trial
    starts. A node without the data's mount, or ``--storage``'s, or with a TMPDIR its data
    loading hangs on, failed each trial it was given: its slots freed first, so it took
    trial after trial and Tune's retries too (each trial then says so itself:
    ``refuse_before_training``, ``references.cache.unreachable_data``). A node that does not
    answer within ``NODE_CHECK_S`` is not judged. Empty on one node."""
    from sweeps.ray_glue import NodeAffinitySchedulingStrategy, ray

    nodes = [n for n in ray.nodes() if n.get("Alive") and any(
        n.get("Resources", {}).get(kind, 0) for kind in ("CPU", "GPU"))]  # where trials run
    if len(nodes) < 2:
        return []
    files = _files_trials_read(run_dir, datas)
    _, here, _ = _look_around(files)  # what the trials find themselves, on every node
    look = ray.remote(num_cpus=0, max_retries=0)(_look_around)
    asked = {look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote(files): n for n in nodes}
    ready, _ = ray.wait(list(asked), num_returns=len(asked), timeout=NODE_CHECK_S)
    out = []
    for ref in ready:
        address = asked[ref].get("NodeManagerAddress", "?")
        try:
            host, problems, sockets = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 -- a node that cannot run a task says why
            host, sockets = asked[ref].get("NodeManagerHostname", "?"), None
            problems = [f"cannot run the driver's check ({error_line(exc)})"]
        node = f"node {host} ({address})"
        out += [f"{node} {problem}; accepted: the data and --storage at the same path on "
                f"every node as on this machine (a shared mount), or --address of a cluster "
                f"without that node" for problem in problems if problem not in here]
        if sockets:
            out.append(f"{node}: {sockets}")
    return out


def _prepare(plan: Plan) -> tuple[dict[str, Any], dict[str, Any]]:
    """Index each distinct data source once and build each condition's reference once
    (driver). Nothing here decodes a split: trials stream their own images."""
    from references import build_reference
    from references.datasets import content_identity
    from trainable.data import TrialData

    bundles: dict[Any, Any] = {}
    datas: dict[Any, TrialData] = {}
    per_condition_data, per_condition_ref = {}, {}
    running = {t.condition for t in plan.trials}
    for name in (c for c in plan.conditions if c in running):  # a plan narrowed to fewer
        source = plan.data[name]
        cond = plan.spec.condition(name)
        if source not in bundles:
            t0 = time.perf_counter()
            bundles[source] = source.build(progress=True)
            datas[source] = TrialData.from_bundle(bundles[source], source.describe())
            d = datas[source]
            _say(f"data ready: {source.describe()}: {len(d.train)} train / {len(d.val)} "
                 f"validation images indexed ({time.perf_counter() - t0:.1f} s); each trial "
                 f"reads its own{source.skipped_note()}")
        t0 = time.perf_counter()
        reference = build_reference(
            cond.reference, bundle=bundles[source], model=cond.model, layer=cond.layer,
            width=next(t.config["width"] for t in plan.trials if t.condition == name),
            image_size=source.image_size,
            weights=weights_spec(plan.weights, simulated=source.simulated),
            # the content too: a regenerated world or another copy at the same path has
            # the same description, and a network trained on the old one was reused
            dataset_key={"data": source.describe(),
                         "content": content_identity(bundles[source])},
        )
        _say(f"reference ready for {name}: {cond.reference} "
             f"({time.perf_counter() - t0:.1f} s)")
        per_condition_data[name] = datas[source]
        per_condition_ref[name] = reference
        check_trials_fit([t for t in plan.trials if t.condition == name], datas[source],
                         reference)
    return per_condition_data, per_condition_ref


def _input_errors() -> tuple[type[BaseException], ...]:
    """What preparing the data and references raises for bad input (a malformed file, missing
    weights): the user's to fix, so one line and exit 2 like the plan's own checks."""
    from references.cache import DamagedCacheEntry
    from references.imagenet import ImageNetFormatError
    from references.nsd import NSDFormatError
    from references.pretrained import WeightsNotFoundError

    return (UsageError, ImageNetFormatError, NSDFormatError, WeightsNotFoundError,
            DamagedCacheEntry)


def _init_ray(plan: Plan) -> None:
    from sweeps.ray_glue import ray


    if plan.address is None:
        # A local Ray sized to this machine; an explicit object store keeps two Ray nodes on one
        # machine from each claiming all of its memory.
        # address="local": a new instance even when another Ray runs on this machine (with
        # no address, ray.init joins the latest cluster started here, e.g. a `ray start`).
        with _ray_processes_in_their_own_group():
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                     log_to_driver=True,
                     object_store_memory=_object_store_bytes(),
                     runtime_env={"env_vars": _worker_env()})
    else:
        # "auto" as the plan checked it (``ray_address``): ray.init's own "auto" would also
        # join any Ray process running here, another driver's among them
        address = ray_address(plan)
        try:
            ray.init(address=address, runtime_env={"env_vars": _worker_env()},
                     **_loopback_node(address))
        except ConnectionError as exc:
            # check_services found the head's port open: what refuses a driver then is its
            # token (Ray 2.60's authentication) or another Ray version
            raise UsageError(
                f"{plan.address_from} {plan.address}: the Ray cluster there did not let this "
                f"driver join "
                f"({exception_line(exc)}); accepted: the cluster's token in "
                f"RAY_AUTH_TOKEN (token authentication is on by default) and Ray "
                f"{ray.__version__} on both sides") from None


def _cancel_failure_alarm() -> None:
    """Ray's core worker installs abseil's failure-signal handler for SIGTERM while
    ``ray.init`` connects the driver. A SIGTERM landing then is dumped (its stack, on stderr)
    and passed on to ours, but the handler also arms ``alarm(3)`` with an aborting SIGALRM
    handler, "in case this code hangs": three seconds later, in the middle of the driver's
    orderly wrap-up, the process aborted (exit 134). The alarm is cancelled and SIGALRM's
    action made the default again; the driver sets no alarm of its own."""
    signal.alarm(0)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)


@contextlib.contextmanager
def _ray_keeps_our_sigterm():
    """Within the block, ``ray.init`` leaves the SIGTERM handler as it is: it installs its own
    (``sys.exit``) first thing, through ``ray._private.utils.set_sigterm_handler``."""
    from sweeps.ray_glue import private_utils as ray_utils

    setter = getattr(ray_utils, "set_sigterm_handler", None)
    if setter is None:  # another Ray: its own handler, replaced after ray.init as before
        yield
        return
    ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = setter


@contextlib.contextmanager
def _ray_processes_in_their_own_group():
    """The processes ``ray.init`` starts for a local Ray (its GCS server, raylet, dashboard,
    monitors; the raylet's workers and agents are its children) each in a process group of
    its own. They were in the driver's group, and a signal to the group (coreutils
    ``timeout``, ``kill -TERM -- -PGID``) killed the GCS and raylet with the driver: Tune's
    stop then waited on the dead GCS in ``remove_placement_group`` until Ray aborted the
    driver after 60 s (exit 1, no resume line, the parent run left RUNNING). Ray blocks
    SIGINT in them for the same reason, not SIGTERM. Only where Ray ties them to the
    driver's life in the kernel (``PR_SET_PDEATHSIG``, what Ray's ``kernel_fate_share``
    uses): without it Ray's reaper cleans up by killing the driver's group, which they must
    then stay in. Ray does the same on Windows (``CREATE_NEW_PROCESS_GROUP`` in
    ``ConsolePopen``)."""
    from sweeps.ray_glue import private_services as services
    from sweeps.ray_glue import private_utils as utils

    base = getattr(services, "ConsolePopen", None)  # Ray's internals: another Ray may differ
    if (base is None or not sys.platform.startswith("linux")
            or not utils.detect_fate_sharing_support()):
        yield
        return

    class OwnGroupPopen(base):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("process_group", 0)
            super().__init__(*args, **kwargs)

    services.ConsolePopen = OwnGroupPopen
    try:
        yield
    finally:
        services.ConsolePopen = base


def _loopback_node(address: str) -> dict[str, str]:
    """A cluster on this machine's loopback (e.g. ``127.0.0.2:6379``, what the tests start) is
    joined on that address: otherwise Ray 2.60 takes the machine's outward interface address as
    the driver's node address and looks for a local raylet there."""
    host = address.removeprefix("ray://").rsplit(":", 1)[0].strip("[]")
    # an address only: Ray takes no name there
    loopback = _loopback_ip(host)
    return {"_node_ip_address": host} if loopback and not address.startswith("ray://") else {}


def _loopback_ip(host: str) -> bool:
    """Whether ``host`` is a loopback IP address (a name is not)."""
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


#: The driver's settings whose values hold a "$", as base64 of their JSON: Ray expands $NAME
#: and ${NAME} in a runtime env's variables from each node's environment and drops ${NAME}
#: where NAME is unset (``update_envs``), which changed a password or a folder holding one
#: (``pa$HOME`` arrived as ``pa/root``). A trial sets them itself (``apply_driver_env``).
DRIVER_ENV = "ALIGNSWEEP_DRIVER_ENV"


def _worker_env() -> dict[str, str]:
    """Settings trials must share with the driver (the cache of generated data, tracking
    credentials and TLS settings). MLflow's HTTP client retries a request for minutes by
    default; a trial's tracking thread does its own backoff, so each request fails fast
    instead."""
    from mlflow.utils.credentials import read_mlflow_creds

    # every MLFLOW_TRACKING_* setting (credentials, and the TLS ones: a server certificate's
    # path, INSECURE_TLS, a client certificate, AUTH, AWS_SIGV4): a trial on another node has
    # only its own node's environment, and without them each of its writes was an outage
    keep = (CACHE_ENV, FLUSH_ENV)
    env = {k: v for k, v in os.environ.items()
           if k in keep or k.startswith("MLFLOW_TRACKING_")}
    # and the credentials the driver's MLflow reads from ~/.mlflow/credentials, which other
    # nodes (or other users' homes) need not hold
    creds = read_mlflow_creds()
    for key, value in (("MLFLOW_TRACKING_USERNAME", creds.username),
                       ("MLFLOW_TRACKING_PASSWORD", creds.password)):
        if value and key not in env:
            env[key] = value
    if env.get(CACHE_ENV):  # as the driver resolved it: a trial runs in its own folder
        env[CACHE_ENV] = str(cache_root(create=False))
    # The trials import the driver's copy of the code: a copy run by its path from another
    # folder (sweeps/run.py puts it on the driver's path only) failed every trial with
    # "No module named 'sweeps'", or, beside an installed copy, silently trained with that
    # one's code. First on the workers' path (on other nodes where it is absent, ignored),
    # before each node's own PYTHONPATH: Ray sets a runtime env's variables, it does not
    # merge them, and expands ${NAME} from the node's environment.
    env["PYTHONPATH"] = f"{CODE_ROOT}{os.pathsep}${{PYTHONPATH}}"
    env.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                   os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"))
    env.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT",
                   os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "15"))
    held = {k: v for k, v in env.items() if "$" in v and k != "PYTHONPATH"}
    if held:  # not as they are: Ray would expand them (DRIVER_ENV)
        env = {k: v for k, v in env.items() if k not in held}
        env[DRIVER_ENV] = base64.b64encode(json.dumps(held).encode()).decode("ascii")
    return env


def apply_driver_env() -> None:
    """In a trial, first: the driver's settings ``_worker_env`` could not give Ray as they are
    (values holding a "$", ``DRIVER_ENV``), set in this process."""
    held = os.environ.get(DRIVER_ENV)
    if held:
        os.environ.update(json.loads(base64.b64decode(held)))


def _run_dir(plan: Plan) -> Path:
    """Each invocation gets its own Ray Tune experiment folder (nothing earlier is overwritten;
    two in one second get ``-2``, ``-3``: the driver lock serialises them); ``--resume``
    continues the latest one, recorded in ``plan.resume_pointer``, after checking
    that it was started by the same sweep (``resume_choice``: the fingerprint)."""
    storage = Path(plan.storage)
    if plan.resume:
        if not Path(plan.resume_pointer).is_file():
            raise UsageError(f"--resume: no earlier run of {plan.experiment} under {storage}")
        run_dir, other = resume_choice(plan)  # one this command started
        check_tune_state(run_dir)
        check_checkpoints(run_dir)
        if other:
            _say(f"resume: {other}")
        return run_dir
    _say_if_an_earlier_run_is_unfinished(plan)
    storage.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir, k = storage / run_folder_name(plan.experiment, stamp), 1
    while run_dir.exists():
        k += 1
        run_dir = storage / run_folder_name(plan.experiment, stamp, k)
    run_dir.mkdir(parents=True)
    atomic_write_text(run_dir / FINGERPRINT_FILE, json.dumps(fingerprint(plan), indent=1))
    return run_dir


def _say_if_an_earlier_run_is_unfinished(plan: Plan) -> None:
    """A new run beside an earlier run of the same command that did not finish says so, and
    which run --resume will take (``resume_choice``: the newest unfinished run the command
    started, which this new run is while it runs)."""
    if not Path(plan.resume_pointer).is_file():
        return
    try:
        earlier, _ = resume_choice(plan)
    except UsageError:  # no run of this command here
        return
    if not run_unfinished(plan, earlier):
        return
    states = run_states(earlier) or {}
    left = sum(state != "done" for state in states.values())
    count = f" ({left} of {len(states)} trials)" if states else ""
    _say(f"note: {earlier.name}, an earlier run of this command, did not finish{count}; this "
         f"starts a new run beside it. --resume takes the newest unfinished run of a command: "
         f"this new one if it stops early, else {earlier.name}")


def _point_at(plan: Plan, run_dir: Path) -> None:
    """``plan.resume_pointer`` names ``run_dir``: the run ``--resume`` continues (a grid run
    and an adaptive search each have their own). Written once the run's records exist, so a
    new run refused at its start (a trial no node holds, data found malformed, a store that
    refuses the user) leaves the pointer on the run it had: a ``--resume`` after it
    continued that empty folder, a whole new sweep under a new parent run, and the
    interrupted run's trials were never resumed."""
    if not plan.resume:  # relative: the storage folder may move
        atomic_write_text(Path(plan.resume_pointer), run_dir.name)


def _forget_run_dir(plan: Plan, run_dir: Path) -> None:
    """A new run refused before its records were made: its folder holds only the
    fingerprint; remove it (anything more, e.g. a parent-run file, stays)."""
    if plan.resume:
        return
    try:
        if [p.name for p in run_dir.iterdir()] == [FINGERPRINT_FILE]:
            shutil.rmtree(run_dir)
    except OSError:
        pass


@contextlib.contextmanager
def driver_lock(plan: Plan):
    """One driver per experiment and storage at a time: a second one is refused in one line
    naming the holder (its pid, host and start), never interleaved with the first."""
    from filelock import FileLock, Timeout

    storage = Path(plan.storage)
    storage.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(storage / f"{plan.experiment}.lock"), mode=SHARED_LOCK_MODE)
    holder = storage / f"{plan.experiment}.driver.json"
    try:
        lock.acquire(timeout=0)
    except PermissionError:  # another user's lock file, made before locks were shared
        raise UsageError(lock_file_problem(Path(lock.lock_file))) from None
    except Timeout:
        try:
            who = json.loads(holder.read_text())
            said = (f"pid {who.get('pid')} on {who.get('host')} since {who.get('since')}")
        except (OSError, ValueError):
            said = "a process that has not written its name yet"
        raise UsageError(f"another driver is running {plan.experiment} with storage {storage}: "
                         f"{said} (lock {lock.lock_file}); wait for it to end, or stop it "
                         f"and use --resume") from None
    try:
        atomic_write_text(holder, json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "sweep": plan.sweep}))
        yield
    finally:
        with contextlib.suppress(OSError):
            holder.unlink()
        lock.release()


def check_fits(plan: Plan, nodes: list[dict]) -> None:
    """Refuse, in one line, a plan that the cluster cannot run: a trial asking for more CPUs
    or GPUs than any one alive node has (Ray would keep it PENDING forever), a trial set to
    device=cuda where no node has a GPU (GPU requests are dropped there, and every trial would
    fail as it starts), or a SQLite tracking store with trials on other machines (each would
    write its own node's file)."""
    from trainable.config import TrialConfig

    alive = [n for n in nodes if n.get("Alive", n.get("alive", True))]
    shapes = [(float(n.get("Resources", {}).get("CPU", 0)),
               float(n.get("Resources", {}).get("GPU", 0))) for n in alive]
    most_cpu = max((c for c, _ in shapes), default=0.0)
    most_gpu = max((g for _, g in shapes), default=0.0)
    for t in plan.trials:
        r = t.resources
        if r.cpus > most_cpu:
            raise UsageError(f"trial {t.trial_id} asks for {r.cpus:g} CPUs but the largest "
                             f"node of the Ray cluster has {most_cpu:g}; accepted: "
                             f"--cpus-per-trial <= {most_cpu:g}")
        if TrialConfig.from_dict(t.config).device == "cuda" and most_gpu == 0:
            raise UsageError(f"trial {t.trial_id} sets device=cuda but no node of the Ray "
                             f"cluster has a GPU; accepted: device=auto (a trial's GPU when "
                             f"it has one, else the CPU) or cpu, or a cluster with GPUs")
        if r.cpus == 0 and most_gpu == 0:  # its GPUs are dropped: nothing left to run on
            raise UsageError(f"trial {t.trial_id} asks for 0 CPUs and {r.gpus:g} GPUs, but no "
                             f"node of the Ray cluster has a GPU (trials run on CPU there); "
                             f"accepted: --cpus-per-trial > 0, or a cluster with GPUs")
        if r.gpus > 0 and most_gpu > 0 and r.gpus > most_gpu:
            raise UsageError(f"trial {t.trial_id} asks for {r.gpus:g} GPUs but the largest "
                             f"node has {most_gpu:g}; accepted: --gpus-per-trial <= "
                             f"{most_gpu:g}")
        # one node must hold both at once (the GPUs asked for are dropped where no node has
        # one: _trial_resources): CPUs on one node and the GPU on another left every trial
        # PENDING for ever
        gpus = r.gpus if most_gpu > 0 else 0.0
        if not any(c >= r.cpus and g >= gpus for c, g in shapes):
            have = ", ".join(f"{c:g} CPUs + {g:g} GPUs" for c, g in sorted(set(shapes))[:6])
            fit = max((c for c, g in shapes if g >= gpus), default=0.0)
            raise UsageError(f"trial {t.trial_id} asks for {r.cpus:g} CPUs and {gpus:g} GPUs "
                             f"on one node, but no node of the Ray cluster has both (nodes: "
                             f"{have}); accepted: --cpus-per-trial <= {fit:g} with "
                             f"--gpus-per-trial {gpus:g}, or fewer GPUs per trial")
    hosts = {n.get("NodeManagerAddress") for n in alive}
    if plan.mlflow_uri.startswith("sqlite:") and len(hosts) > 1:
        raise UsageError(f"{plan.mlflow_from} {plan.mlflow_uri} is a SQLite file on this machine but "
                         f"the Ray cluster spans {len(hosts)} machines "
                         f"({', '.join(sorted(map(str, hosts))[:4])}): trials elsewhere would "
                         f"write their own copy; accepted: an MLflow server (--mlflow-uri "
                         f"http://HOST:PORT) reachable from every node")
    server = urlsplit(plan.mlflow_uri).hostname if plan.mlflow_uri.startswith(
        ("http://", "https://")) else None
    if (server and _loopback_name(server) and len(hosts) > 1
            and not all(_loopback_name(str(h)) for h in hosts)):
        # each trial elsewhere reached its own machine's port: every write an outage, each
        # trial holding its slot for the flush timeout (900 s) after training, its records
        # left to the driver's replay
        raise UsageError(f"{plan.mlflow_from} {redact(plan.mlflow_uri)} names this machine's "
                         f"loopback but the Ray cluster spans {len(hosts)} machines "
                         f"({', '.join(sorted(map(str, hosts))[:4])}): trials elsewhere would "
                         f"reach their own machine; accepted: the server's address as every "
                         f"node reaches it (--mlflow-uri http://HOST:PORT)")


def _loopback_name(host: str) -> bool:
    """Whether ``host`` (a name or an address) is the loopback of whichever machine uses it."""
    name = host.strip("[]").lower().rstrip(".")
    return name == "localhost" or name.endswith(".localhost") or _loopback_ip(name)


def _trial_resources(trials: tuple[TrialSpec, ...], gpus_available: float) -> dict[str, Resources]:
    """Per-trial resources; on a cluster without GPUs, GPU requests become 0 (trials then run
    on CPU: the trainable picks CUDA only when Ray made a GPU visible)."""
    out = {}
    for t in trials:
        r = t.resources
        if r.gpus > 0 and gpus_available == 0:
            r = Resources(cpus=r.cpus, gpus=0.0)
        out[t.trial_id] = r
    return out


def execute(plan: Plan) -> int:
    """Run the plan; returns the process exit code (0: every trial finished, 1: a trial
    failed, 130: interrupted). One driver per experiment at a time (``driver_lock``)."""
    code_digest()  # the code this process imported, before data preparation's minutes
    check_services(plan)
    with driver_lock(plan):
        return _execute(plan)


def code_version(repo: Path | None = None) -> dict[str, str]:
    """MLflow's tags for the code that ran: the git commit of this checkout
    (``mlflow.source.git.commit``) and whether its tracked files (in the project's folder)
    differed from it; {} outside a git checkout (an installed copy, an image without .git)
    and where the project's files are not tracked by the repository around them (a copy
    unpacked inside a lab's monorepo or a $HOME kept in git: that repository's commit was
    recorded as this code's, "unmodified")."""
    repo = repo or Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return {}
        tracked = subprocess.run(["git", "-C", str(repo), "ls-files", "--", "."],
                                 capture_output=True, text=True, timeout=30)
        if tracked.returncode != 0 or not tracked.stdout.strip():
            return {}
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain",
                                "--untracked-files=no", "--", "."], capture_output=True,
                               text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out = {"mlflow.source.git.commit": head.stdout.strip()}
    if dirty.returncode == 0:
        out["code_modified"] = str(bool(dirty.stdout.strip())).lower()
    return out


def _weights_tags(references: dict[str, Any]) -> dict[str, str]:
    """``reference_weights``: each pretrained condition's network file (with its sha256, so a
    file replaced at the same path is told apart) or cache entry."""
    lines = []
    for name, ref in references.items():
        source = str(getattr(ref, "source", "") or "")
        if not source:
            continue
        path = Path(source)
        if not source.startswith("auto:") and path.is_file():
            source = f"{source} (sha256 {file_sha256(path)})"
        lines.append(f"{name}: {source}")
    return {"reference_weights": "; ".join(lines)} if lines else {}


def sweep_run_tags(plan: Plan) -> SweepRunTags:
    """What the parent run records of the invocation for the post-processor (its report's
    terms, its resume line)."""
    return SweepRunTags(
        sweep=plan.sweep, scale=plan.scale, smoke=plan.smoke, data=plan.data_kind,
        data_description=plan.data_description, subjects=plan.nsd_subjects,
        overrides={k: str(v) for k, v in plan.overrides.items()}, only=tuple(plan.only),
        search=plan.search, num_samples=plan.num_samples or None, seeds=plan.seeds,
        # what the run launches, in all and per condition: a partial report counts the
        # trials that never started (they have no run of their own to count)
        trials=plan.n_trials, planned=plan.planned,
        # the command's words, so a partial report's resume line repeats every option:
        # --weights, --cpus-per-trial, the data paths
        command=shlex.join(_command_words(plan)) if plan.argv else None)


def _ray_cluster(plan: Plan) -> str:
    """The parent's ``ray`` tag: the cluster joined, by the address it answered at."""
    if plan.address is None:
        return "local (started by the driver)"
    try:
        from sweeps.ray_glue import ray

        gcs = ray.get_runtime_context().gcs_address
    except Exception:  # not connected (a test calling this without Ray): what was asked
        return plan.address
    return gcs if gcs == plan.address else f"{plan.address} ({gcs})"


def _start_records(plan: Plan, run_dir: Path,
                   references: dict[str, Any] | None = None) -> tuple[str, dict[str, str]]:
    """The sweep's parent run (reused on --resume), its pointer file and the manifest:
    ``(parent run id, the tags every run of the sweep carries)``. The parent alone also
    carries the sweep's own settings: search, seeds, where Ray and its results are, the
    code's commit and the pretrained networks' files."""
    parent_file = run_dir / PARENT_FILE
    reuse, resumed = None, []
    if plan.resume:  # the run folder's records are read before the parent run is reopened
        if parent_file.is_file():
            reuse = ParentPointer.parse(read_run_json(parent_file,
                                                      "the run's MLflow parent")).run_id
            if reuse is None:
                raise UsageError(f"{parent_file}: no run_id of the MLflow parent run; "
                                 f"accepted: the file as the driver wrote it -- restore it, or "
                                 f"start a new run without --resume")
        try:
            resumed = read_manifest(run_dir)
        except ValueError as exc:
            raise UsageError(f"{exc} -- restore it, or start a new run without --resume") \
                from None
    recorded = sweep_run_tags(plan)
    run_tags = recorded.trial_run_tags()
    parent_tags = {**recorded.format(), "ray": _ray_cluster(plan),
                   "run_folder": str(run_dir), **code_version(),
                   "code_sha256": code_digest(),
                   **_weights_tags(references or {})}
    about = (f"{plan.spec.description} ({plan.scale} scale; sweep file "
             f"{plan.spec.path.name}). Trials are the nested runs, named by their keys "
             f"(condition-direction-alpha-beta-seed). When the sweep ends, its report "
             f"(Pareto fronts, statistics, figures) is in this run's artifacts (report.html) "
             f"and under outputs/{plan.experiment}/ where the driver ran.")
    # Creating a new SQLite store runs MLflow's migrations: a signal in their middle left a
    # half-migrated store every later run refused. Ctrl-C / SIGTERM wait for them (a second
    # one is not needed: they are acted on right after), and nothing slower is held back.
    parent_id = None
    try:
        if reuse is not None:  # MLflow refuses to reopen a deleted run (exit 1 after Ray
            # started)
            stage = tracking.run_lifecycle(plan.mlflow_uri, reuse)
            if stage == "deleted":
                raise UsageError(f"--resume: the parent run {reuse} of {run_dir} is deleted in "
                                 f"{redact(plan.mlflow_uri)}; accepted: the run restored "
                                 f"(mlflow runs restore --run-id {reuse}) and --resume, or a "
                                 f"new run without --resume")
            if stage is None:
                raise UsageError(f"--resume: the parent run {reuse} of {run_dir} is not in "
                                 f"{redact(plan.mlflow_uri)} (removed for good, e.g. by mlflow "
                                 f"gc, or the store replaced); accepted: a new run without "
                                 f"--resume")
        with _signals_deferred(enabled=plan.mlflow_uri.lower().startswith("sqlite:")):
            parent_id = tracking.start_parent(plan.mlflow_uri, plan.experiment, parent_tags,
                                              reuse, description=about, say=_say,
                                              fill=recorded.format())
        _log_sweep_files(plan, parent_id)
        return _record_run_folder(plan, run_dir, parent_id, resumed), run_tags
    except BaseException as exc:
        if parent_id is None and _permission_denied(exc):
            # a user of the server without permission on this experiment (its default for
            # other users' experiments is none or read): exit 1 with MLflow's 403 traceback
            user = os.environ.get("MLFLOW_TRACKING_USERNAME") or urlsplit(
                plan.mlflow_uri).username or "(none given)"
            raise UsageError(f"{plan.mlflow_from} {redact(plan.mlflow_uri)}: the tracking "
                             f"server denies user {user} the experiment {plan.experiment} "
                             f"(HTTP 403: Permission denied); accepted: "
                             f"MLFLOW_TRACKING_USERNAME of a user with EDIT or MANAGE "
                             f"permission on it (its creator or an admin grants it)") from None
        if parent_id is not None:  # interrupted (or failed) right after the parent opened
            with contextlib.suppress(Exception):
                tracking.finish(plan.mlflow_uri, parent_id,
                                "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED",
                                {INTERRUPTED_TAG: str(isinstance(exc, KeyboardInterrupt)).lower()})
        raise


def _log_sweep_files(plan: Plan, parent_id: str) -> None:
    """The sweep's files (the file named, and a composite's members) as the parent run's
    ``sweep/`` artifacts: what ran, beside its results, and the first write to the artifact
    store, made before any trial. A store this machine cannot write (a server started with
    --no-serve-artifacts and a root only it can reach, an experiment whose artifact location
    is elsewhere) was found by each trial instead: each waited out the tracking flush (900 s
    by default) and the run ended 'FINISHED' without artifacts or a report."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(plan.mlflow_uri)
    where = client.get_run(parent_id).info.artifact_uri  # (a failure here: the store's own)
    try:
        for path in (p for p in sweep_files(plan) if p.is_file()):
            client.log_artifact(parent_id, str(path), "sweep")
    except Exception as exc:  # the artifact store's error, whatever its kind
        raise UsageError(f"{plan.mlflow_from} {redact(plan.mlflow_uri)}: the artifact store of "
                         f"experiment {plan.experiment} ({redact(where)}) cannot be written "
                         f"from this machine ({exception_line(exc)}); accepted: a server that "
                         f"serves artifacts (mlflow server --serve-artifacts) or an artifact "
                         f"location every Ray node can write (this checks the driver's machine; "
                         f"a server error that passes, retry)") from None


def _permission_denied(exc: BaseException) -> bool:
    """Whether ``exc`` is an MLflow server's refusal of this user (HTTP 403 "Permission
    denied", what its basic-auth app answers)."""
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and (
        getattr(exc, "error_code", "") == "PERMISSION_DENIED"
        or ("403" in str(exc) and "permission denied" in str(exc).lower()))


def _record_run_folder(plan: Plan, run_dir: Path, parent_id: str, resumed: list) -> str:
    """The run folder's pointer to its parent run, and a new run's pending manifest."""
    parent_file = run_dir / PARENT_FILE
    run_dir.mkdir(parents=True, exist_ok=True)
    # Secrets never reach a file or the console: the URI is written and shown redacted.
    atomic_write_text(parent_file, ParentPointer(parent_id, redact(plan.mlflow_uri)).format())
    _say(f"MLflow: experiment {plan.experiment}, parent run {parent_id} "
         f"({redact(plan.mlflow_uri)})")
    if not resumed:
        _write_manifest(plan, run_dir, parent_id, [])
    return parent_id


def _execute(plan: Plan) -> int:
    # `docker stop`, a scheduler's kill: SIGTERM ends the run as Ctrl-C does, from before Ray
    # starts to the driver's last line (while Ray started, and from the replay on, it killed
    # the driver without a word and left the parent run RUNNING).
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _sigterm_as_sigint)
    saved = {k: os.environ.get(k) for k in _FAIL_FAST}
    try:
        # unless the user set it: each failed attempt of a trial printed its whole traceback
        # (50 lines, three times for Tune's retries) above the driver's one-line summary of
        # the trial's error; the traceback stays in Tune's error file (its path is printed)
        # and in the trial's MLflow run. TUNE_PRINT_ALL_TRIAL_ERRORS=1 shows them again.
        with env_default("TUNE_PRINT_ALL_TRIAL_ERRORS", "0"):
            return _execute_run(plan)
    finally:
        signal.signal(signal.SIGTERM, previous)
        for key, value in saved.items():  # _fail_fast_tracking's, for this run only
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _execute_run(plan: Plan) -> int:
    from sweeps.ray_glue import ray

    run_dir = _run_dir(plan)
    # Ray, the data and the references before anything is recorded: a trial no node can hold,
    # or a data file found malformed only once it is read in full (a COCO annotation file, a
    # session's betas), is refused in one line with no parent run left behind. Until the main
    # block below owns them, any failure shuts Ray down here.
    previous_int = signal.getsignal(signal.SIGINT)
    parent_id = None
    try:
        # Ctrl-C and SIGTERM while Ray starts are acted on once it has, not as Ray's handler's
        # SystemExit inside the driver's connection; a SIGTERM there also meets abseil's
        # handler, whose alarm aborted the driver after its last line (_cancel_failure_alarm)
        with _signals_deferred(), _ray_keeps_our_sigterm():
            _init_ray(plan)
        # ray.init installs its own SIGTERM handler (sys.exit: the run then ended FAILED, its
        # trials' runs left RUNNING, and Ray aborted with exit 134): ours again
        signal.signal(signal.SIGTERM, _sigterm_as_sigint)
        check_fits(plan, ray.nodes())
        datas, references = _prepare(plan)
        problems = node_problems(run_dir, datas.values())
        if problems:
            raise UsageError(problems[0] + (f" (and {len(problems) - 1} more)"
                                            if len(problems) > 1 else ""))
        parent_id, run_tags = _start_records(plan, run_dir, references)
        _point_at(plan, run_dir)
    except BaseException as exc:
        if isinstance(exc, SystemExit) and exc.code == signal.SIGTERM:  # Ray's handler's
            exc = KeyboardInterrupt()
        if isinstance(exc, KeyboardInterrupt):
            _cancel_failure_alarm()
        _interrupted(_shutdown_ray)  # also a Ray stopped while it started
        if (run_dir / PARENT_FILE).is_file():  # the records were made: a run --resume finds
            if parent_id is not None:  # (an earlier failure ends it in _start_records)
                stopped = isinstance(exc, KeyboardInterrupt)
                _interrupted(lambda: _end_parent(plan, parent_id,
                                                 "KILLED" if stopped else "FAILED", stopped))
            _interrupted(lambda: _point_at(plan, run_dir))
            if isinstance(exc, KeyboardInterrupt):
                _say(f"sweep interrupted before its trials started; the parent run is KILLED. "
                     f"Continue with: {resume_command(plan)}")
        else:
            _forget_run_dir(plan, run_dir)
            if isinstance(exc, KeyboardInterrupt) and not plan.resume:
                _say("sweep interrupted before its records were made: this run has nothing "
                     "to resume; run it again")
        if isinstance(exc, KeyboardInterrupt):
            raise exc from None
        if isinstance(exc, _input_errors()) and not isinstance(exc, UsageError):
            raise UsageError(one_line(exc)) from None
        raise
    status, failed = "FAILED", []
    outcomes: list[Outcome] = []
    interrupted = crashed = False
    replayed = parent_ended = False
    _fail_fast_tracking()
    try:
        results, interrupted = _fit(plan, run_dir, datas, references, parent_id, run_tags)
        # Tune leaves its SIGINT handler installed after fit() returns (it only sets an event
        # nobody reads any more): a Ctrl-C in the summary or the report was swallowed
        signal.signal(signal.SIGINT, previous_int)
        outcomes = [_outcome(plan, r) for r in results]
        failed = [o for o in outcomes if o.state == "ERROR"]
        _summary(plan, outcomes, run_dir, parent_id)
        _write_manifest(plan, run_dir, parent_id, outcomes)
        status = "FINISHED" if not failed else "FAILED"
    except KeyboardInterrupt:  # a second Ctrl-C, or one after Tune let go of the signal
        interrupted = True
        _say("interrupted")
    except Exception:  # Tune itself failed (its state on a disk that filled): the records
        crashed = True  # are ended below, and the way on is said before the error's line
        raise
    finally:
        signal.signal(signal.SIGINT, previous_int)
        # The wrap-up: a Ctrl-C (or SIGTERM) ends the step it lands in, not the ones that
        # keep the records true (the parent's end, the stopped trials' runs, the resume line).
        # Ray first: no trial worker may write to MLflow after the driver's last word.
        if _interrupted(_shutdown_ray):
            interrupted = True
            _interrupted(_shutdown_ray)  # what the interrupted call had not stopped

        def replay() -> None:
            nonlocal replayed
            replayed = _replay_or_say(plan, outcomes, parent_id, run_tags, run_dir)

        if _interrupted(replay):
            interrupted = True
            _say(f"replay interrupted: the trials' metrics journals stay in their checkpoints "
                 f"under {run_dir} (a --resume of the run replays them)")
        # A trial that is neither finished nor errored did not run to its end: Tune stopped
        # on Ctrl-C / SIGTERM (or a trial was never scheduled). The sweep is incomplete.
        stopped = [o.trial_id for o in outcomes if o.state not in ("done", "ERROR")]
        if plan.resume and plan.search == "optuna" and outcomes and not (interrupted or stopped):
            if _interrupted(lambda: _retire_unknown_children_or_say(plan, parent_id, outcomes)):
                interrupted = True
        if interrupted and not outcomes:  # stopped before Tune reported the trials: their
            # runs were left RUNNING (their workers stopped with Ray), and went unnamed
            _interrupted(lambda: stopped.extend(
                _end_running_children_or_say(plan, parent_id)))
        if interrupted or stopped:
            status = "KILLED"

        def end_parent(interrupted_now: Any) -> None:
            nonlocal parent_ended
            parent_ended = _end_parent(plan, parent_id, status, interrupted_now)

        if _interrupted(lambda: end_parent(interrupted or stopped)):
            interrupted = True  # once more: it is one call when the store answers
            if _interrupted(lambda: end_parent(True)):
                _say(f"the parent run {parent_id} may be left RUNNING: "
                     f"{resume_command(plan)} ends it")
        if crashed:
            way = f"Continue with: {resume_command(plan)}"
            try:  # a state Tune left cut short: --resume would refuse it (check_tune_state)
                check_tune_state(run_dir)
            except UsageError:
                way = (f"Ray Tune's state in {run_dir} cannot be read, so --resume cannot "
                       f"continue it: run the trials that did not finish as a new run "
                       f"(--only)")
            except Exception:  # Tune's own reading failing: the advice stays the same
                pass
            _say(f"sweep stopped by the error below; the parent run is "
                 f"{'FAILED' if parent_ended else 'not ended (MLflow shows it RUNNING)'} and "
                 f"the trials that finished keep their records. {way}")
    _say_how_it_ended(plan, run_dir, outcomes, stopped, interrupted=interrupted,
                      replayed=replayed, parent_ended=parent_ended)
    if _report(plan, parent_id):
        interrupted = True
    if interrupted or stopped:
        return 130  # the shell's code for a run ended by SIGINT
    return 0 if not failed and replayed and parent_ended else 1


def _fit(plan: Plan, run_dir: Path, datas: dict, references: dict, parent_id: str,
         run_tags: dict[str, str]) -> tuple[list, bool]:
    """The trials on Ray Tune: a new run's grid, a restored run's unfinished trials, or an
    Optuna search (``_optuna_fits``). ``(Tune's results, interrupted)``; only a search
    reports an interrupt itself (a grid's Ctrl-C ends its fit with the trials stopped)."""
    from sweeps.ray_glue import ray, tune

    gpus = float(ray.cluster_resources().get("GPU", 0))
    if gpus == 0 and any(t.resources.gpus > 0 for t in plan.trials):
        _say("no GPU in the Ray cluster: trials run on CPU (gpus per trial set to 0)")
    resources = _trial_resources(plan.trials, gpus)
    # Conditions on one data source share its TrialData: put it in the store once.
    stored: dict[int, Any] = {}
    for d in datas.values():
        if id(d) not in stored:
            stored[id(d)] = ray.put(d)
    data_refs = {c: stored[id(d)] for c, d in datas.items()}
    payload = Payload(
        specs={t.trial_id: t for t in plan.trials},
        data_refs=data_refs,
        reference_refs={c: ray.put(r) for c, r in references.items()},
        mlflow_uri=plan.mlflow_uri, parent_run_id=parent_id, run_tags=run_tags,
        datasets={c: _dataset(plan.data[c]) for c in plan.conditions},
        code_sha256=code_digest(), code_root=str(CODE_ROOT), code_host=socket.gethostname(),
    )
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, payload=payload),
        lambda config: tune.PlacementGroupFactory(
            [{"CPU": resources[config["trial_id"]].cpus,
              "GPU": resources[config["trial_id"]].gpus}]),
    )
    _quiet_tune_advice()
    restore = plan.resume and tune.Tuner.can_restore(str(run_dir))
    if restore:
        _say(f"resuming {run_dir}: only unfinished trials run"
             + (", then the samples not yet drawn" if plan.search == "optuna" else ""))
        _clear_failure_markers(run_dir)
    if plan.search == "optuna":
        return _optuna_fits(plan, trainable, run_dir, TrialNamer(payload.specs), restore)
    if restore:
        tuner, quiet = _restore(run_dir, trainable)
        with quiet:
            return list(tuner.fit()), False
    grid = [t.trial_id for t in plan.trials]
    with _no_tensorboard_logger():
        return list(_tuner(trainable, run_dir, {"trial_id": tune.grid_search(grid)},
                           namer=TrialNamer(payload.specs)).fit()), False


def _say_how_it_ended(plan: Plan, run_dir: Path, outcomes: list[Outcome], stopped: list[str],
                      *, interrupted: bool, replayed: bool, parent_ended: bool) -> None:
    """The driver's closing line where the run is not simply complete: interrupted (what did
    not finish, the parent's state, the resume command), or records the store did not take."""
    if interrupted or stopped:
        again = f"Continue with: {resume_command(plan)}"
        what = (f"{len(stopped)} trial(s) did not finish ({', '.join(stopped[:10])}"
                f"{', ...' if len(stopped) > 10 else ''})" if stopped else
                "after its trials ended" if outcomes else
                "before the trials' outcomes were collected")
        undrawn = plan.n_trials - len(outcomes) if plan.search == "optuna" and outcomes else 0
        if undrawn > 0:  # a search's samples not yet drawn: no trial of theirs exists
            what += (f", and {undrawn} sample{'s were' if undrawn > 1 else ' was'} not drawn "
                     f"yet")
        parent = ("the parent run is KILLED" if parent_ended else
                  "the parent run could not be ended (MLflow shows it RUNNING)")
        _say(f"sweep interrupted: {what}; {parent} and the report is partial. {again}")
    elif not (replayed and parent_ended):
        # The trials ran to their end, but the store did not take what the driver owed it
        # (a server gone at the end of the sweep): exit 0 read as a recorded sweep.
        missed = "the trials' journals" if not replayed else "the parent run's end"
        _say(f"sweep ran, but its MLflow records are incomplete ({redact(plan.mlflow_uri)} "
             f"did not take {missed}); every result is in the trials' checkpoints under "
             f"{run_dir}. Once the store answers, complete them with: {resume_command(plan)}")


def _interrupted(step: Callable[[], Any]) -> bool:
    """Run ``step``; True if Ctrl-C (or a SIGTERM, turned into one) ended it."""
    try:
        step()
        return False
    except KeyboardInterrupt:
        return True


def _replay_or_say(plan: Plan, outcomes: list[Outcome], parent_id: str,
                   run_tags: Mapping[str, str], run_dir: Path) -> bool:
    """``_replay``; False (and one line) when the store did not take every journal."""
    try:
        return _replay(plan, outcomes, parent_id, run_tags)
    except Exception as exc:  # an unreachable store: say so in one line, lose nothing
        _say(f"could not update the MLflow runs ({redact(plan.mlflow_uri)}): "
             f"{exception_line(exc, 300)}; the "
             f"trials' metrics journals stay in their checkpoints under {run_dir}")
        return False


def _end_running_children_or_say(plan: Plan, parent_id: str) -> list[str]:
    try:
        return tracking.end_running_children(plan.mlflow_uri, parent_id)
    except Exception as exc:
        _say(f"could not end the stopped trials' MLflow runs ({redact(plan.mlflow_uri)}): "
             f"{exception_line(exc, 300)}; "
             f"--resume ends them")
        return []


def _retire_unknown_children_or_say(plan: Plan, parent_id: str,
                                    outcomes: list[Outcome]) -> None:
    """A resumed search that ran to its end: a sample's child run that the killed driver's
    Tune state never knew is ended and deleted (``tracking.retire_unknown_children``), and
    each is named."""
    try:
        retired = tracking.retire_unknown_children(plan.mlflow_uri, parent_id,
                                                   {o.trial_id for o in outcomes})
    except Exception as exc:
        _say(f"could not look for child runs the resumed search never knew "
             f"({redact(plan.mlflow_uri)}): {exception_line(exc, 300)}")
        return
    for trial_id, run_id in retired:
        _say(f"{trial_id}: its MLflow run {run_id} was made before the driver was killed, but "
             f"Tune's saved state never knew the trial, and the resumed search drew its sample "
             f"again; the run is ended KILLED and deleted (mlflow runs restore --run-id "
             f"{run_id} brings it back)")


def _end_parent(plan: Plan, parent_id: str, status: str, interrupted: Any) -> bool:
    """The parent run ended whatever the replay met (it stayed RUNNING for good); False (and
    one line) when the store did not take it."""
    try:
        tracking.finish(plan.mlflow_uri, parent_id, status,
                        {INTERRUPTED_TAG: "true" if interrupted else "false"})
        return True
    except Exception as exc:
        _say(f"could not end the parent run {parent_id} ({redact(plan.mlflow_uri)}): "
             f"{exception_line(exc, 300)}; --resume of "
             f"the run ends it")
        return False


def _fail_fast_tracking() -> None:
    """The driver's own MLflow calls once the records are made (it makes none while the
    trials run; then the manifest, the replay, the parent's end) fail within seconds, as the
    trials' do (``_worker_env``), unless the user set MLflow's HTTP retries: with MLflow's
    default (7 retries, minutes a call) a server gone at the end of a sweep kept the driver
    silent for about 10 minutes over the manifest's query, the replay and the parent's end.
    Every one of them says what it could not do; ``--resume`` completes the records."""
    for key, value in _FAIL_FAST.items():
        os.environ.setdefault(key, value)


#: MLflow's HTTP settings for the driver's calls from the trials' end (``_fail_fast_tracking``)
_FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


def pasteable(*words: str, module: bool = False) -> str:
    """A command line the user can paste where they ran the driver: this interpreter (a venv's
    ``.venv/bin/python``, relative to the working folder where it lies below it; a bare
    ``python`` or ``mlflow`` is not on a PATH the README never activates) and this
    repository's ``sweeps/run.py`` the same way, or ``-m MODULE`` with ``module``."""
    def here(path: str) -> str:
        rel = os.path.relpath(path)
        return rel if not rel.startswith("..") else path

    script = [] if module else [here(str(Path(__file__).resolve().parent / "run.py"))]
    return " ".join(shlex.quote(w) for w in [here(sys.executable or "python"), *script, *words])


def resume_command(plan: Plan) -> str:
    """The command that resumes this run, to paste where it was started: the run's own words
    (``Plan.argv``; a resume is refused under other settings) with ``--resume``, any secret in
    a URI among them redacted. A plan built in code has no words: its sweep's name then, and
    "(and the same options)"."""
    if not plan.argv:
        return f"{pasteable(plan.sweep, '--resume')} (and the same options)"
    return pasteable(*_command_words(plan), "--resume")


def _command_words(plan: Plan) -> list[str]:
    """The run's own words after sweeps/run.py, without --resume, any secret in a URI among
    them redacted: what the resume line (and the parent's ``command`` tag) repeats."""
    return [redact(w) for w in plan.argv if w != "--resume"]


def _sigterm_as_sigint(signum, frame) -> None:
    """SIGTERM as Ctrl-C: sent on as SIGINT to the handler Python has for it (Tune's, during
    fit(), stops the trials as a first Ctrl-C does; ``_signals_deferred`` records it), or
    raised here as KeyboardInterrupt where SIGINT is ignored or at the OS default. A driver
    started in the background by a script (``cmd &``) inherits SIGINT ignored: the SIGINT sent
    on was dropped, and a SIGTERM outside fit() ended nothing (the report was built, exit 0)."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler is not signal.default_int_handler:
        os.kill(os.getpid(), signal.SIGINT)
        return
    raise KeyboardInterrupt


def _shutdown_ray() -> None:
    """``ray.shutdown()`` with SIGTERM kept ours all along, then ours again after it. Ray's
    C++ side resets SIGTERM's action to the default about 35 ms into the shutdown, for the
    rest of it (about a second; Python's ``signal.getsignal`` still names our handler): a
    SIGTERM then killed the driver without a word (exit 143, the parent run left RUNNING, no
    resume line). A thread puts the action back every millisecond while it runs."""
    from sweeps.ray_glue import ray

    try:
        with _os_signal_action_kept(signal.SIGTERM):
            ray.shutdown()
    finally:
        signal.signal(signal.SIGTERM, _sigterm_as_sigint)


@contextlib.contextmanager
def _os_signal_action_kept(signum: int, every_s: float = 0.001):
    """Within the block, ``signum``'s action at the OS level is put back every ``every_s`` to
    what it was when the block began (``sigaction`` through ctypes, from a thread: Python's
    ``signal.signal`` works only in the main thread, which the block occupies). Where libc's
    ``sigaction`` cannot be called, the block runs as it is."""
    import ctypes
    import threading

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        saved = ctypes.create_string_buffer(512)  # more than any libc's struct sigaction
        found = libc.sigaction(signum, None, saved) == 0
    except (OSError, AttributeError):
        found = False
    if not found:
        yield
        return
    stop = threading.Event()

    def keep() -> None:
        while not stop.wait(every_s):
            libc.sigaction(signum, saved, None)

    keeper = threading.Thread(target=keep, name="keep-sigterm", daemon=True)
    keeper.start()
    try:
        yield
    finally:
        stop.set()
        keeper.join()
        libc.sigaction(signum, saved, None)


@contextlib.contextmanager
def _signals_deferred(enabled: bool = True):
    """SIGINT and SIGTERM held back while the block runs (MLflow's store migrations), then
    acted on as Ctrl-C: KeyboardInterrupt once the block is done."""
    if not enabled:
        yield
        return
    caught: list[int] = []
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in before:
        signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    if caught:
        raise KeyboardInterrupt


@dataclass(frozen=True)
class Outcome:
    """How one trial of the run ended: state "done" (every epoch), "ERROR", or "stopped at
    epoch k of n" / "no epoch finished" (interrupted); its last metrics and checkpoint."""

    trial_id: str
    state: str
    metrics: dict
    checkpoint: Any
    folder: str | None = None  # the trial's Ray result folder
    error: str | None = None  # an errored trial's error, one line (``error_line``)
    alpha: float | None = None  # an Optuna sample's signed alpha, exact (its key rounds it)


def _outcome(plan: Plan, result) -> Outcome:
    cfg = result.config or {}
    metrics = result.metrics or {}
    # A trial that never started has no config in its result: its folder is named by its key
    # (TrialNamer), so it is still named in the summary and the manifest.
    folder = getattr(result, "path", None)
    trial_id = cfg.get("trial_id") or (Path(folder).name if folder else "?")
    spec = next((t for t in plan.trials if t.trial_id == trial_id), None)
    alpha = None
    if "alpha_mag" in cfg and spec is not None:  # an Optuna sample: its own id
        trial_id = _optuna_trial_id(spec, float(cfg["alpha_mag"]), str(metrics.get(
            "trial_id", "?")))
        alpha = float(cfg["alpha_mag"]) * (-1.0 if spec.direction == "min" else 1.0)
    epochs = int(spec.config["epochs"]) if spec is not None else None
    last = metrics.get("epoch")
    if result.error is not None:
        state = "ERROR"
    elif last is not None and epochs is not None and int(last) == epochs - 1:
        state = "done"
    elif last is None:  # never started, or stopped in its first epoch: Tune's result does
        state = "no epoch finished"  # not tell them apart (it said "not started" of both)
    else:
        state = f"stopped at epoch {int(last) + 1} of {epochs}"
    return Outcome(trial_id, state, dict(metrics), result.checkpoint,
                   getattr(result, "path", None),
                   error_line(result.error) if result.error is not None else None, alpha)


def _own_data(dataset: Mapping[str, str] | None) -> dict[str, str]:
    """A trial's ``data_description`` tag from its condition's ``_dataset``: its own data (the
    parent's names the whole sweep's: a Gabor trial of ``paper`` was tagged with the NSD
    release too)."""
    return {"data_description": dataset["name"]} if dataset else {}


#: An errored trial's line is cut here: long enough for a message that names a file on a
#: lab's mount (its path alone can be 150 characters) and ends with what to do.
ERROR_LINE_CHARS = 600


def error_line(error: BaseException) -> str:
    """What ended an errored trial, in one line: the innermost ``Type: message`` of the error
    as it reached the driver. Ray wraps a trial's exception (``cause``: the original), and a
    DataLoader re-raises a worker's with ``Caught X in DataLoader worker process 0`` and the
    worker's traceback as its text, whose last line is the original ``Type: message``."""
    cause = getattr(error, "cause", None)
    inner = cause if isinstance(cause, BaseException) else error
    if isinstance(inner, RepeatedFailure):  # its message is the first attempt's error line
        return str(inner)[:ERROR_LINE_CHARS]
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    if len(lines) > 1 and "Traceback (most recent call last)" in str(inner):
        line = lines[-1]
    else:
        line = exception_line(inner, None)
    return redact(line)[:ERROR_LINE_CHARS]


def _dataset(source) -> dict[str, str]:
    """A condition's data as an MLflow dataset input: its description, a digest of where it
    comes from, and that origin as JSON (paths of real data; generator arguments of the
    simulated world)."""
    origin = json.dumps(dataclasses.asdict(source), sort_keys=True, default=str)
    return {"name": source.describe()[:500], "source": origin, "source_type": "local",
            "digest": hashlib.sha256(origin.encode()).hexdigest()[:16]}


def _write_manifest(plan: Plan, run_dir: Path, parent_id: str,
                    outcomes: list[Outcome]) -> None:
    """``<run_dir>/manifest.jsonl`` (``records.ManifestEntry``): at the start every planned
    trial ("pending", its folder named by its key), at the end how each ended, its Ray folder
    (relative to the storage folder) and its MLflow child run. What the dashboards' Ray
    source reads; Ray's own experiment state is private to Ray."""
    run_ids: dict[str, str] = {}
    if outcomes:
        try:
            from mlflow.tracking import MlflowClient

            run_ids = {r.data.tags.get(TRIAL_ID_TAG): r.info.run_id
                       for r in child_runs(MlflowClient(plan.mlflow_uri), parent_id)}
        except Exception:  # an unreachable store: the manifest says None, nothing is lost
            run_ids = {}
    specs = {t.trial_id: t for t in plan.trials}
    previous = {e.key: e for e in read_manifest(run_dir)}
    entries = dict(previous)
    for key, spec in specs.items():
        # An adaptive search runs the baselines and samples it draws, not the grid's points.
        if plan.search == "optuna" and spec.direction != "none":
            continue
        if key not in entries:
            entries[key] = ManifestEntry(key, "pending", f"{run_dir.name}/{key}", None,
                                         resolved_config(spec.config))
    for o in outcomes:
        try:
            key = TrialKey.parse(o.trial_id)
        except ValueError:  # a result without its config: nothing to name
            continue
        spec = _outcome_spec(plan, o, specs)
        config = resolved_config(spec.config) if spec is not None else {}
        folder = (os.path.relpath(o.folder, run_dir.parent) if o.folder else None)
        entries[o.trial_id] = ManifestEntry(o.trial_id, o.state, folder,
                                            run_ids.get(o.trial_id), config)
    write_manifest(run_dir, entries.values(), write_text=atomic_write_text)


def _outcome_spec(plan: Plan, o: Outcome,
                  specs: Mapping[str, TrialSpec]) -> TrialSpec | None:
    """The trial an outcome ran (``specs``: the plan's, by trial id): its grid point, or an
    adaptive search's sample (its base spec with the sampled alpha, as ``_trial_spec`` builds
    it in the trial)."""
    if o.trial_id in specs:
        return specs[o.trial_id]
    try:
        key = TrialKey.parse(o.trial_id)
    except ValueError:
        return None
    base = next((t for t in plan.trials
                 if t.condition == key.condition and t.direction == key.direction), None)
    if base is None:
        return None
    alpha = o.alpha if o.alpha is not None else key.signed_alpha
    return dataclasses.replace(base, trial_id=o.trial_id, alpha=alpha,
                               config={**base.config, "alpha": alpha})


def _replay(plan: Plan, outcomes: list[Outcome], parent_id: str,
            run_tags: Mapping[str, str] | None = None) -> bool:
    """After the trials: send MLflow whatever of each trial's journal (in its last checkpoint)
    it lacks (a trial whose tracking could not drain before it ended; one whose child run
    was never made, the store being down for its whole life, gets it now), and mark the
    child runs of interrupted trials KILLED (their workers were stopped mid-run). A store
    that does not answer within a minute ends the replay (one line), instead of a minute per
    trial: the journals stay in the checkpoints, and a later --resume of the run replays
    them. True when every journal was delivered."""
    specs = {t.trial_id: t for t in plan.trials}
    for k, o in enumerate(outcomes):
        stopped = o.state not in ("done", "ERROR")
        journal, artifacts, facts = {}, None, {}
        # read in place: the storage is a local folder (plan._storage); a copy took the
        # whole checkpoint, weights and optimizer state (~700 MB for AlexNet at the
        # paper's size), per trial, to read a journal of kilobytes
        folder = Path(o.checkpoint.path) if o.checkpoint is not None else None
        if folder is not None and not folder.is_dir():
            _say(f"{o.trial_id}: its checkpoint {folder} is no longer in the storage "
                 f"(deleted?): nothing of it to replay to MLflow")
        elif folder is not None:
            journal, artifacts = read_journal(folder), folder / ARTIFACTS_DIR
            facts = read_facts(folder)
        spec = _outcome_spec(plan, o, specs) if journal else None
        dataset = None if spec is None else _dataset(plan.data[spec.condition])
        record = ({} if spec is None else dict(
            params=resolved_config(spec.config),
            tags={**(run_tags or {}), **_own_data(dataset), **spec.tags(), **facts_tags(facts),
                  **({ERROR_TAG: o.error} if o.state == "ERROR" and o.error
                     else {})},
            dataset=dataset, artifacts=artifacts))
        status = "KILLED" if stopped else ("FAILED" if o.state == "ERROR" else "FINISHED")
        if (journal or stopped) and not tracking.replay_journal(
                plan.mlflow_uri, parent_id, o.trial_id, journal,
                status=status if (stopped or spec is not None) else None, timeout=60.0,
                say=_say, **record):
            _say(f"tracking: {redact(plan.mlflow_uri)} does not answer; the journals of "
                 f"{len(outcomes) - k} trial(s) stay in their checkpoints")
            return False
    return True


def _report(plan: Plan, parent_id: str) -> bool:
    """Post-process the finished sweep (tables, fronts, figures, HTML report, logged to the
    parent run) with the post-processor's own CLI, in its own process: ``sweeps`` never
    imports ``dashboards`` (records/__init__.py). Its lines are relayed; a failure is one line
    and does not fail the sweep: every trial's results are already in MLflow and the same
    command can be rerun. True if Ctrl-C (or SIGTERM) stopped it: the post-processor is
    stopped with it (it ran on after a driver killed by SIGTERM)."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": plan.mlflow_uri,  # not on the command line
           # (so that its errors name where the user gave the URI, not this variable)
           "ALIGNSWEEP_URI_FROM": plan.mlflow_from,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(repo),
                                                       os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "dashboards.pareto", plan.sweep, "--parent-run", parent_id,
           "--experiment", plan.experiment]
    retry = pasteable("-m", "dashboards.pareto", plan.sweep, "--mlflow-uri",
                      redact(plan.mlflow_uri), "--parent-run", parent_id, module=True)
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    except KeyboardInterrupt:  # subprocess.run has stopped the post-processor
        _say("report not written: interrupted")
        _say(f"retry with: {retry}")
        return True
    except (OSError, subprocess.TimeoutExpired) as exc:
        _say(f"report not written: {exception_line(exc, None, first_line=True)}")
        _say(f"retry with: {retry}")
        return False
    for line in proc.stdout.splitlines():
        _say(line)
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        # 3: a figure could not be drawn, the rest of the report is written (dashboards.pareto
        # INCOMPLETE; sweeps never imports dashboards)
        written = proc.returncode == 3
        _say(f"report {'incomplete' if written else 'not written'}: {redact(why)}")
        _say(f"retry with: {retry}")
    return False


def _run_config(run_dir: Path):
    from sweeps.ray_glue import tune

    # Tune's default output (Ray 2.60) ignores a progress reporter, and said so in a WARNING
    # line of every run: its table shows a result's first metrics (RayHooks.report puts
    # PROGRESS_METRICS first). The reporter is for the older output, RAY_AIR_NEW_OUTPUT=0.
    old_output = os.environ.get("RAY_AIR_NEW_OUTPUT", "1") == "0"
    reporter = (tune.CLIReporter(metric_columns=list(PROGRESS_METRICS), parameter_columns=[],
                                 max_report_frequency=30) if old_output else None)
    return tune.RunConfig(
        name=run_dir.name, storage_path=str(run_dir.parent),
        failure_config=tune.FailureConfig(max_failures=2),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        progress_reporter=reporter, verbose=1,
        # these two, not TensorBoard's (``_no_tensorboard_logger``)
        callbacks=[tune.logger.CSVLoggerCallback(), tune.logger.JsonLoggerCallback()],
    )


def _tuner(trainable, run_dir: Path, param_space: dict, namer=None, **tune_kwargs):
    """A Tuner over ``param_space``. Actors are reused between trials (Tune restarts the
    trainable function in the same worker process): a fresh worker first pays ~7-10 s of
    imports (torch, torchvision, MLflow) on a small machine, which at demo scale is as long as
    a trial's training, so reuse is what keeps the trial slots busy (bench_sweep.py).
    ``namer`` (a Tune Trial -> its key) names the trials in Tune's progress table and their
    result folders (``TrialNamer``)."""
    from sweeps.ray_glue import tune

    names = {} if namer is None else {"trial_name_creator": namer,
                                      "trial_dirname_creator": namer}
    return tune.Tuner(trainable, param_space=param_space, run_config=_run_config(run_dir),
                      tune_config=tune.TuneConfig(reuse_actors=True, **names, **tune_kwargs))


class TrialNamer:
    """A Tune trial's key (``records.TrialKey``): ``nsd_conv1_v1-max-a0.4-b1-s0``, or for an
    adaptive sample its direction's key at the sampled |alpha| with ``-o<Tune's id>``; what
    Tune's progress table and the trial's result folder are called (picklable: Tune keeps it
    in its experiment state for --resume)."""

    def __init__(self, specs: dict[str, TrialSpec]) -> None:
        self.specs = specs

    def __call__(self, trial) -> str:
        cfg = trial.config
        spec = self.specs.get(cfg.get("trial_id"))
        if spec is None:
            return str(trial.trial_id)
        if "alpha_mag" in cfg:
            return _optuna_trial_id(spec, float(cfg["alpha_mag"]), str(trial.trial_id))
        return spec.trial_id


def _optuna_fits(plan: Plan, trainable, run_dir: Path, namer: TrialNamer,
                 restore: bool = False) -> tuple[list, bool]:
    """Adaptive search, one Tune experiment in ``run_dir`` driven by ``SideSearch``: every
    condition's alpha = 0 baseline, then per condition num_samples trials split between the
    two directions, each side sampled by its own Optuna study (``sweeps.search``) with |alpha|
    log-uniform in the grid's range and two objectives: performance up and alignment down on
    the suppressing side, both up on the promoting side. Each side traces its own front with
    fewer trials than the grid. The sides share the cluster's trial slots. ``restore``
    continues the search in ``run_dir`` (``--resume``): its unfinished and errored trials
    from their checkpoints, then the samples not yet drawn, from the studies as Tune last
    saved them beside its own state (``SideSearch.save``). Returns (results, interrupted)."""
    from sweeps.search import SideSearch

    before = signal.getsignal(signal.SIGINT)
    if restore:
        tuner, quiet = _restore(run_dir, trainable)
    else:
        tuner = _tuner(trainable, run_dir, {}, namer=namer, search_alg=SideSearch(plan),
                       num_samples=plan.n_trials)
        quiet = _no_tensorboard_logger()
    with quiet:
        results = list(tuner.fit())
    return results, _fit_interrupted(plan, before, results)


def _fit_interrupted(plan: Plan, before, results: list) -> bool:
    """Whether a Ctrl-C (or SIGTERM, turned into one) ended the Tune ``fit()`` that returned
    ``results``, the SIGINT handler being ``before`` when it started. Tune's handler puts
    back the one it found when a signal arrives (on a normal end its own stays installed),
    and a stopped experiment leaves trials neither finished nor errored."""
    if signal.getsignal(signal.SIGINT) is before:
        return True
    return any(_outcome(plan, r).state not in ("done", "ERROR") for r in results)


def _summary(plan: Plan, outcomes: list[Outcome], run_dir: Path, parent_id: str) -> None:
    rows = [(o.trial_id, o.state, o.metrics.get("val_performance", float("nan")),
             o.metrics.get("val_alignment", float("nan"))) for o in outcomes]
    rows.sort()
    width = max(len(r[0]) for r in rows) if rows else 10
    _say("")
    states = max([len(r[1]) for r in rows] + [5])
    _say(f"{'trial':<{width}}  {'state':<{states}}  performance  alignment")
    for tid, state, perf, align in rows:
        _say(f"{tid:<{width}}  {state:<{states}}  {perf:11.4f}  {align:9.4f}")
    errored = sorted((o.trial_id, o.error) for o in outcomes if o.error)
    if errored:
        _say("")
        for tid, why in errored:
            _say(f"{tid}: {why}")
    _say("")
    _say(f"Ray Tune results: {run_dir}")
    uri = redact(plan.mlflow_uri)
    _say(f"MLflow: {uri} (experiment {plan.experiment}, parent run {parent_id})")
    if uri.split(":", 1)[0].lower() in ("http", "https"):  # the server is the UI
        _say(f"browse them: open {uri.rstrip('/')}/#/experiments in a browser (the MLflow "
             f"server's own UI)")
    else:
        ui = pasteable("-m", "mlflow", "ui", "--backend-store-uri", uri, module=True)
        _say(f"browse them: {ui}")
