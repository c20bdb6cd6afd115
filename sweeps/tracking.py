"""MLflow bookkeeping of a sweep: one experiment per sweep, one parent run per invocation, one
nested child run per trial (tag ``mlflow.parentRunId``), params = the resolved trial config,
metrics per epoch with ``step = epoch``.

The driver creates (or, on ``--resume``, reuses) the parent run; each trial finds or creates its
child run by its ``trial_id`` tag under that parent, so a trial retried from its checkpoint, or
a resumed sweep, logs into the same run and never duplicates it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import queue
import threading
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, TypeVar

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from records import (
    ERROR_TAG,
    NOTE_TAG,
    PARENT_TAG,
    RETIRED_TAG,
    TRIAL_ID_TAG,
    child_runs,
    is_trial_run,
)
from records.errors import exception_line
from records.stores import first_open_lock, sqlite_path, sqlite_store_problem
from records.uris import redact

T = TypeVar("T")


def _retry(fn: Callable[[], T], attempts: int = 5, delay: float = 0.5) -> T:
    """Concurrent trials write one SQLite file; a write can meet 'database is locked'.
    Retry a few times with backoff before giving up (the error then surfaces as is)."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as exc:  # mlflow wraps sqlalchemy's OperationalError in MlflowException
            if i == attempts - 1 or "locked" not in str(exc).lower():
                raise
            time.sleep(delay * (2**i))
    raise AssertionError("unreachable")


def experiment_id(client: MlflowClient, name: str,
                  say: Callable[[str], None] | None = None) -> str:
    """The experiment ``name`` (restored if deleted, which ``say`` tells; created if missing).
    A SQLite store's new
    experiment keeps its artifacts beside the database, in ``mlruns/<name>`` of the database's
    folder: MLflow's default, ``./mlruns/<id>`` of whichever folder the first run started in,
    mixed the artifacts of every store used from that folder."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage != "active":
            client.restore_experiment(exp.experiment_id)
            if say is not None:  # its deleted runs stay deleted; its others reappear with it
                say(f"MLflow: experiment {name} had been deleted; restored, with the runs it "
                    f"held (delete those in the UI, or use another --mlflow-uri, to keep this "
                    f"run apart from them)")
        return exp.experiment_id
    from mlflow.exceptions import MlflowException

    db = sqlite_path(client.tracking_uri) if client.tracking_uri.startswith("sqlite:") else None
    # a file: URI, percent-encoded: MLflow reads a plain path as a URI and decodes it, so a
    # name with %41 stored its files under "A", and one with %2e%2e%2f outside mlruns/
    where = {} if db is None else {"artifact_location": (db.parent / "mlruns" / name).as_uri()}
    try:
        return client.create_experiment(name, **where)
    except MlflowException as exc:
        # another driver (a colleague's, on a shared server) made it since the look above
        made = (client.get_experiment_by_name(name)
                if exc.error_code == "RESOURCE_ALREADY_EXISTS" else None)
        if made is None:
            raise
        return made.experiment_id


#: What the MLflow UI shows a sweep's experiment as: model training, not a GenAI app (MLflow
#: 3.17 opens an untagged experiment on an empty "Traces" overview).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


RESUMES_TAG = "resumes"
RESUMES_KEPT = 20  # the latest lines, within RESUMES_CHARS
RESUMES_CHARS = 4000  # a tag value is capped (5,000 characters in older stores; MLflow 3
#                       truncates longer ones, losing the newest line)
# what a resume may change (the fingerprint holds the settings, --set and --only, equal)
_RESUME_KEYS = ("mlflow.source.git.commit", "code_modified", "code_sha256", "ray")


def resume_entry(tags: Mapping[str, str]) -> str:
    """One line of the parent's ``resumes`` tag: when a resume started (UTC) and the tags of
    the invocation that it would otherwise lose (commit, modified code, the code's digest,
    cluster)."""
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    said = ", ".join(f"{k.rsplit('.', 1)[-1]}={tags[k]}" for k in _RESUME_KEYS if k in tags)
    return f"{when} {said}".strip()


@contextlib.contextmanager
def _first_open(uri: str):
    """``records.stores.first_open_lock`` held while a driver first reaches a SQLite store
    that is not yet a complete MLflow store: MLflow creates (or migrates) a new store's tables
    on that first call, and two drivers starting at once on one new file collided in it
    ("table _alembic_tmp_experiments already exists"; a driver arriving while the file was
    non-empty but half made: "Online migration expected to match one row"; the second died,
    exit 1). A complete store is opened without the lock. Nothing for a server or a database
    server."""
    db = sqlite_path(uri) if uri.lower().startswith("sqlite:") else None
    if db is None or (db.is_file() and db.stat().st_size > 0
                      and sqlite_store_problem(db) is None):
        yield
        return
    with first_open_lock(db):
        yield


def start_parent(uri: str, experiment: str, tags: Mapping[str, str],
                 reuse_run_id: str | None = None, description: str | None = None,
                 say: Callable[[str], None] | None = None,
                 fill: Collection[str] = ()) -> str:
    """The sweep's parent run: ``reuse_run_id`` when resuming (set back to RUNNING; of
    ``tags``, those named in ``fill`` that it lacks are added), else a new run tagged with
    ``tags``. The experiment is tagged as model training and, like the run, described by
    ``description``. Returns the run id."""
    with _first_open(uri):  # (the client opens the store as it is made)
        client = MlflowClient(uri)
        exp_id = experiment_id(client, experiment, say)
    for key, value in {**EXPERIMENT_KIND, **({NOTE_TAG: description} if description else {})
                       }.items():
        _retry(lambda k=key, v=value: client.set_experiment_tag(exp_id, k, v))
    if reuse_run_id:
        run = client.get_run(reuse_run_id)
        if run.info.experiment_id != exp_id:
            raise ValueError(f"run {reuse_run_id} belongs to another experiment")
        client.update_run(reuse_run_id, status="RUNNING")
        # The run keeps the tags of the invocation that created it; each resume says what
        # ran it (its commit may differ) in one more line of ``resumes``. Of the ``fill``
        # tags, those it lacks (a run made by an older version: no ``trials`` or
        # ``planned``, so its report counted only the trials that had a run) are the
        # resuming command's: the same sweep, settings and selection, as the fingerprint the
        # resume checked says (not its commit or cluster, which ``resumes`` records).
        missing = {k: tags[k] for k in fill if k in tags and k not in run.data.tags}
        if missing:
            from mlflow.entities import RunTag

            _retry(lambda: client.log_batch(
                reuse_run_id, tags=[RunTag(k, str(v)) for k, v in missing.items()]))
        entry = resume_entry(tags)
        lines = [*filter(None, run.data.tags.get(RESUMES_TAG, "").split("\n")),
                 entry[:RESUMES_CHARS]][-RESUMES_KEPT:]
        while len("\n".join(lines)) > RESUMES_CHARS:
            lines.pop(0)  # the oldest
        _retry(lambda: client.set_tag(reuse_run_id, RESUMES_TAG, "\n".join(lines)))
        return reuse_run_id
    note = {NOTE_TAG: description} if description else {}
    run = client.create_run(exp_id, tags={**tags, **note,
                                          "mlflow.runName": tags.get("sweep", "sweep")})
    return run.info.run_id


def run_lifecycle(uri: str, run_id: str) -> str | None:
    """``run_id``'s lifecycle stage in the store ("active", "deleted"), None when the store
    has no such run."""
    from mlflow.exceptions import MlflowException

    db = sqlite_path(uri) if uri.lower().startswith("sqlite:") else None
    if db is not None and not db.is_file():  # no store there (opening it would make one)
        return None
    try:
        return _retry(lambda: MlflowClient(uri).get_run(run_id)).info.lifecycle_stage
    except MlflowException as exc:
        if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def finish(uri: str, run_id: str, status: str, tags: Mapping[str, str] | None = None) -> None:
    client = MlflowClient(uri)
    if tags:
        _retry(lambda: client.log_batch(run_id, tags=[RunTag(k, str(v))
                                                      for k, v in tags.items()]))
    _retry(lambda: client.set_terminated(run_id, status=status))


def end_running_children(uri: str, parent_run_id: str) -> list[str]:
    """End the parent's child runs still RUNNING as KILLED; returns their trial ids. For a
    driver stopped before Tune reported its trials' outcomes (a second Ctrl-C): their workers
    are gone (Ray is shut down first), and nothing else would end their runs."""
    client = MlflowClient(uri)
    ended = []
    for run in child_runs(client, parent_run_id):
        if run.info.status == "RUNNING":
            _retry(lambda run=run: client.set_terminated(run.info.run_id, status="KILLED"))
            ended.append(run.data.tags.get(TRIAL_ID_TAG, run.info.run_name or run.info.run_id))
    return sorted(ended)


def retire_unknown_children(uri: str, parent_run_id: str,
                            known: set[str]) -> list[tuple[str, str]]:
    """End KILLED and delete (MLflow's soft delete) the parent's child runs still RUNNING whose
    trial is none of ``known``; returns (trial id, run id) of each.

    For a resumed search that ran to its end (``known``: the trials of Tune's restored
    experiment): a sample's worker makes its run when it starts, and Tune saves its experiment
    state every 10 s or more. A driver killed outright in between (SIGKILL, a lost machine)
    left a run whose trial Tune's saved state never knew: the resumed search drew that sample
    again as another trial, and the run stayed RUNNING for good, so the finished sweep's
    report called itself partial. ``mlflow runs restore`` brings a deleted run back. Runs
    without a trial's tags (another tool's, nested under the parent) are left alone."""
    client = MlflowClient(uri)
    retired = []
    for run in child_runs(client, parent_run_id):
        tags = run.data.tags
        if (run.info.status != "RUNNING" or not is_trial_run(tags)
                or tags[TRIAL_ID_TAG] in known):
            continue
        _retry(lambda run=run: client.set_terminated(run.info.run_id, status="KILLED"))
        _retry(lambda run=run: client.set_tag(
            run.info.run_id, RETIRED_TAG, "a sample the resumed search never knew (drawn "
            "again as another trial)"))
        _retry(lambda run=run: client.delete_run(run.info.run_id))
        retired.append((tags[TRIAL_ID_TAG], run.info.run_id))
    return retired


class TrialRun:
    """A trial's child run, written by a background thread so that tracking never stalls or
    fails the trial (issue 12): every call only queues an operation; the thread finds or
    creates the run (by ``trial_id`` under the parent), logs params, metrics, tags and
    artifacts in order, and retries each operation with backoff (0.5 s doubling to 30 s)
    while the store is unreachable, for as long as the trial lives. An operation the store
    refuses for good (``permanent_refusal``: the run deleted in the UI, a value it rejects) is
    said once and dropped, so the trial does not wait out the flush on it.

    Each (metric, step) is logged exactly once: after a failed attempt (the server may have
    stored the batch before the connection broke) the batch is resent without what the store
    already has; a run found in the store (an earlier attempt's) keeps what it holds, and an
    epoch trained again is not logged again; a restored trial passes the journal of epochs it
    had reported (``reconcile``) and only what the store lacks is sent. ``close(timeout)``
    waits for the queue to drain and says what could not be delivered; the journal stays in
    the trial's checkpoint for the driver to replay (``replay_journal``).
    """

    BACKOFF_MAX = 30.0

    def __init__(self, uri: str, parent_run_id: str, trial_id: str,
                 params: Mapping[str, Any], tags: Mapping[str, str],
                 *, say: Callable[[str], None] = print, create: bool = True,
                 reopen: bool = True, dataset: Mapping[str, str] | None = None) -> None:
        self.uri = uri
        self._create = create
        self._reopen = reopen
        self.created = False  # whether "open" made the run
        self._dataset = dict(dataset) if dataset else None
        self.parent_run_id = parent_run_id
        self.trial_id = trial_id
        self.run_id: str | None = None
        self._params = dict(params)
        self._tags = dict(tags)
        self._say = say
        self._queue: queue.Queue = queue.Queue()
        self._pending = 0
        self._idle = threading.Condition()
        self._logged: set[tuple[str, int]] = set()  # confirmed in the store
        self._outage_since: float | None = None
        self._refused = 0  # operations the store refused for good (permanent_refusal)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"mlflow-{trial_id}",
                                        daemon=True)
        _quiet_store_tracebacks()
        self._put(("open",))
        self._thread.start()

    # -- the trial's side: never blocks on the store, never raises because of it

    def log_epoch(self, metrics: Mapping[str, float], epoch: int) -> None:
        self._put(("metrics", {epoch: _defined(metrics)}))

    def reconcile(self, journal: Mapping[int, Mapping[str, float]]) -> None:
        """A restored trial's reported epochs: send whatever of them the store lacks (NaN is
        never logged, as by ``log_epoch``: the journal keeps every value the trial reported,
        the store only the defined ones, whichever path they take)."""
        if journal:
            self._put(("metrics", {int(e): _defined(m) for e, m in journal.items()}, True))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._put(("tags", {k: str(v) for k, v in tags.items()}))

    def log_artifacts(self, directory: Path) -> None:
        """Queue ``directory``'s files; the caller keeps the folder until ``close``."""
        if Path(directory).is_dir() and any(Path(directory).iterdir()):
            self._put(("artifacts", str(directory)))

    def log_missing_artifacts(self, directory: Path) -> None:
        """Queue ``directory``'s files that the run lacks (a replay's rule: a run its trial
        made may hold them already; one whose trial's upload was cut off by an outage, or
        that the replay creates, does not). Compared by top-level name."""
        if Path(directory).is_dir() and any(Path(directory).iterdir()):
            self._put(("missing_artifacts", str(directory)))

    def finish(self, status: str, *, if_open: bool = False) -> None:
        """End the run with ``status``; with ``if_open``, only a run this object created or
        one still RUNNING/SCHEDULED (a replay's rule)."""
        self._put(("finish", status, False, if_open))

    def close(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for every queued operation; True when none is left
        undelivered for want of time (an operation the store refused for good,
        ``permanent_refusal``, is dropped at once and said, not waited for).
        What is left is dropped (and said), and the thread ends: Tune reuses a trial's worker
        process for the next trial, and a thread left waiting on its queue kept its MLflow
        client and its C heap (60-120 MB a trial) for the life of the worker."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending and time.monotonic() < deadline:
                self._idle.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            left = self._pending
        self._stop.set()  # ends a retry's back-off at once
        self._queue.put(None)  # after what is queued: the thread skips that, then returns
        self._thread.join(timeout=5.0)
        if left:
            self._say(f"tracking: {left} operation(s) of trial {self.trial_id} not delivered "
                      f"to {redact(self.uri)} within {timeout:.0f} s; its metrics journal is "
                      f"in its checkpoint (the driver replays it)")
        if self._refused > 1:
            self._say(f"tracking: {self._refused} operation(s) of trial {self.trial_id} "
                      f"refused by {redact(self.uri)} in all (the first is named above)")
        return left == 0

    # -- the background thread

    def _put(self, op: tuple) -> None:
        with self._idle:
            self._pending += 1
        self._queue.put(op)

    def _loop(self) -> None:
        client = MlflowClient(self.uri)
        while True:
            op = self._queue.get()
            if op is None:  # close()
                return
            delay, doubtful = 0.5, len(op) > 2 and op[2]
            while not self._stop.is_set():
                try:
                    self._apply(client, op, doubtful)
                    if self._outage_since is not None:
                        self._say(f"tracking: {redact(self.uri)} reachable again after "
                                  f"{time.monotonic() - self._outage_since:.0f} s; trial "
                                  f"{self.trial_id} catches up")
                        self._outage_since = None
                    break
                except Exception as exc:  # any failure of the store: retry, never raise
                    refusal = permanent_refusal(exc)
                    if refusal is not None:  # the store answered "never": drop, go on
                        self._refused += 1
                        if self._refused == 1:
                            self._say(f"tracking: {redact(self.uri)} refused trial "
                                      f"{self.trial_id}'s {_WHAT.get(op[0], op[0])} "
                                      f"({refusal}); not retried, as it would be refused "
                                      f"again; the trial goes on (its metrics journal is in "
                                      f"its checkpoint)")
                        break
                    if self._outage_since is None:
                        self._outage_since = time.monotonic()
                        self._say(f"tracking: {redact(self.uri)} failed for trial "
                                  f"{self.trial_id} ({exception_line(exc)}); the trial "
                                  f"goes on, retrying in the background")
                    doubtful = True  # the store may have applied part of it
                    self._stop.wait(delay)
                    delay = min(self.BACKOFF_MAX, delay * 2)
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()

    def _apply(self, client: MlflowClient, op: tuple, doubtful: bool) -> None:
        kind = op[0]
        if kind == "open":
            self.run_id, self.created = _find_or_create(
                client, self.parent_run_id, self.trial_id, self._params, self._tags,
                create=self._create, reopen=self._reopen)
            if self.run_id is not None and not self.created:
                # A run an earlier attempt made: what it holds is logged already. A trial
                # restored from a checkpoint older than its last report (the driver killed
                # between a report and Tune's next snapshot) trains those epochs again, and
                # each (metric, step) was logged twice.
                for key in client.get_run(self.run_id).data.metrics:
                    self._logged |= {(key, h.step)
                                     for h in client.get_metric_history(self.run_id, key)}
            if self.run_id is not None and self._dataset:
                _log_dataset(client, self.run_id, self._dataset)
            return
        if self.run_id is None:  # create=False and the trial never made its run
            return
        if kind == "metrics":
            batch = self._unlogged(client, op[1], doubtful)
            now = int(time.time() * 1000)
            metrics = [Metric(k, v, now, e) for e, m in sorted(batch.items())
                       for k, v in sorted(m.items())]
            for i in range(0, len(metrics), 900):  # MLflow's log_batch takes <= 1000
                client.log_batch(self.run_id, metrics=metrics[i:i + 900])
            self._logged |= {(m.key, m.step) for m in metrics}
        elif kind == "tags":
            client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in op[1].items()])
        elif kind == "artifacts":
            client.log_artifacts(self.run_id, op[1])
        elif kind == "missing_artifacts":
            held = set() if self.created else {
                a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(self.run_id)}
            for entry in sorted(Path(op[1]).iterdir()):
                if entry.name in held:
                    continue
                if entry.is_dir():
                    client.log_artifacts(self.run_id, str(entry), artifact_path=entry.name)
                else:
                    client.log_artifact(self.run_id, str(entry))
        elif kind == "finish":
            run = client.get_run(self.run_id)
            if op[3] and not self.created and run.info.status not in ("RUNNING", "SCHEDULED"):
                # a replay after the trial ended: close only a run left open (its worker was
                # stopped, or the store missed its end), never reopen or re-time a closed one
                return
            if op[1] == "FINISHED" and ERROR_TAG in run.data.tags:
                client.delete_tag(self.run_id, ERROR_TAG)  # an earlier attempt's error
            client.set_terminated(self.run_id, status=op[1])

    def _unlogged(self, client: MlflowClient, epochs: Mapping[int, Mapping[str, float]],
                  doubtful: bool) -> dict[int, dict[str, float]]:
        """``epochs`` less what is known (or, when ``doubtful``, found) to be in the store."""
        present = set(self._logged)
        if doubtful:
            keys = {k for m in epochs.values() for k in m}
            for key in keys:
                present |= {(key, h.step) for h in client.get_metric_history(self.run_id, key)}
            self._logged |= present & {(k, e) for e, m in epochs.items() for k in m}
        return {e: {k: v for k, v in m.items() if (k, e) not in present}
                for e, m in epochs.items()}


#: What each queued operation of a ``TrialRun`` is, in its messages.
_WHAT = {"open": "run", "metrics": "metrics", "tags": "tags", "artifacts": "artifacts",
         "missing_artifacts": "artifacts", "finish": "end of run"}

#: MLflow's own answers that the same request will never pass: the run or experiment is not
#: active (deleted in the UI) or is gone, or a value is refused.
_PERMANENT_CODES = ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST")

#: Local errors (a file store's artifact copy) that the same call would meet again.
_PERMANENT_ERRNO = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR,
                    errno.ENAMETOOLONG, errno.ENOENT}


def permanent_refusal(exc: BaseException) -> str | None:
    """Why ``exc`` from a store means the operation will never succeed, or None when it may
    pass on a retry. Permanent: MLflow's own answer (a JSON error from its server, or the
    local store's) INVALID_PARAMETER_VALUE or RESOURCE_DOES_NOT_EXIST (a run or experiment
    deleted in the UI: "must be in the 'active' state"; a value the store refuses), and a
    local file error a retry meets again (a permission, a read-only file system, a missing
    folder, copying artifacts). Everything else is an outage and retried: no connection, any
    reply that is not MLflow's JSON (a proxy's 404 while a restarted server has no route
    yet, its 400, 401, 403 or 499 pages), BAD_REQUEST (the server's database errors, e.g. a
    closed connection after a restart or a full pool), 5xx, "database is locked", a full disk."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        # (a reply that is not MLflow's JSON is classed by its HTTP status alone, never as one
        # of these codes: verify_rest_response)
        if exc.error_code in _PERMANENT_CODES:
            return f"{exc.error_code}: {redact(' '.join(str(exc.message).split()))[:200]}"
        return None
    if isinstance(exc, OSError) and exc.errno in _PERMANENT_ERRNO:
        return exception_line(exc)
    return None


class _DropPrefix(logging.Filter):
    """Drops the records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def drop_log_records(logger: str, prefix: str) -> None:
    """From now on in this process, ``logger`` drops its records whose message starts with
    ``prefix`` (added once however often it is asked)."""
    log = logging.getLogger(logger)
    if not any(isinstance(f, _DropPrefix) and f.prefix == prefix for f in log.filters):
        log.addFilter(_DropPrefix(prefix))


def _quiet_store_tracebacks() -> None:
    """MLflow's SQL store logs every failed write at ERROR with its whole traceback (about 60
    lines: "SQLAlchemy database error. The following exception is caught."). A trial's
    tracking thread retries such a write until the store takes it (a disk that filled under
    a SQLite store: 2,800 lines in 14 minutes, through Ray's log forwarding, probed at stop
    37) and says the outage itself in one line; the store's exception reaches that line."""
    drop_log_records("mlflow.store.db.utils", "SQLAlchemy database error")


def _defined(metrics: Mapping[str, float]) -> dict[str, float]:
    """An epoch's metrics less NaN (a metric with no value that epoch: no alignment measured,
    a silent layer): MLflow would plot it as a point."""
    return {k: float(v) for k, v in metrics.items() if float(v) == float(v)}


def _find_or_create(client: MlflowClient, parent_run_id: str, trial_id: str,
                    params: Mapping[str, Any], tags: Mapping[str, str],
                    create: bool = True, reopen: bool = True) -> tuple[str | None, bool]:
    """``(run id, created)``: the child run tagged ``trial_id`` under the parent (set back to
    RUNNING when ``create`` and ``reopen``: a trial starting again), or a new one with the
    trial's params (None when there is none and ``create`` is False)."""
    parent = client.get_run(parent_run_id)
    exp_id = parent.info.experiment_id
    found = _retry(lambda: client.search_runs(
        [exp_id],
        filter_string=(f"tags.`{PARENT_TAG}` = '{parent_run_id}' and "
                       f"tags.{TRIAL_ID_TAG} = '{trial_id}'"),
        max_results=2))
    if found:
        run_id = found[0].info.run_id
        if create and reopen:
            _retry(lambda: client.update_run(run_id, status="RUNNING"))
        return run_id, False
    if not create:
        return None, False
    all_tags = {**tags, PARENT_TAG: parent_run_id, TRIAL_ID_TAG: trial_id,
                "mlflow.runName": trial_id}
    run_id = _retry(lambda: client.create_run(exp_id, tags=all_tags)).info.run_id
    params_list = [Param(k, str(v)) for k, v in sorted(params.items())]
    _retry(lambda: client.log_batch(run_id, params=params_list))
    return run_id, True


def _log_dataset(client: MlflowClient, run_id: str, dataset: Mapping[str, str]) -> None:
    """The data the trial read, as the run's dataset input (the runs table's Dataset column):
    ``dataset`` has name, digest, source (JSON) and source_type. Logged once per run."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    run = client.get_run(run_id)
    if run.inputs and run.inputs.dataset_inputs:
        return
    client.log_inputs(run_id, [DatasetInput(
        Dataset(name=dataset["name"], digest=dataset["digest"],
                source_type=dataset.get("source_type", "local"), source=dataset["source"]),
        tags=[InputTag("mlflow.data.context", "training")])])


def replay_journal(uri: str, parent_run_id: str, trial_id: str,
                   journal: Mapping[int, Mapping[str, float]], *, status: str | None = None,
                   timeout: float = 60.0, say: Callable[[str], None] = print,
                   params: Mapping[str, Any] | None = None,
                   tags: Mapping[str, str] | None = None,
                   dataset: Mapping[str, str] | None = None,
                   artifacts: Path | None = None) -> bool:
    """The driver's replay of a trial's journal (from its last checkpoint) after the trial
    ended: sends what the store lacks, and ends with ``status`` a run still open (a stopped
    worker's; one whose end the store missed): a closed run is never reopened or re-timed. A
    trial that reported epochs but never made its child run (the store was down for its whole
    life) gets one, with ``params``, ``tags`` and ``dataset``; a trial that reported nothing
    gets none. Of the checkpoint's ``artifacts`` the run gets those it lacks (its trial's
    upload may have been cut off by an outage). True when delivered."""
    run = TrialRun(uri, parent_run_id, trial_id, params=params or {}, tags=tags or {},
                   say=say, create=bool(journal) and params is not None, reopen=False,
                   dataset=dataset)
    run.reconcile(journal)
    if artifacts is not None:
        run.log_missing_artifacts(artifacts)
    if status:
        run.finish(status, if_open=True)
    return run.close(timeout)
