"""MLflow bookkeeping of a sweep: one experiment per sweep, one parent run per invocation, one
nested child run per trial (tag ``mlflow.parentRunId``), params = the resolved trial config,
metrics per epoch with ``step = epoch``.

The driver creates (or, on ``--resume``, reuses) the parent run; each trial finds or creates its
child run by its ``trial_id`` tag under that parent, so a trial retried from its checkpoint, or
a resumed sweep, logs into the same run and never duplicates it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

T = TypeVar("T")
PARENT_TAG = "mlflow.parentRunId"


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


def experiment_id(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage != "active":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    return client.create_experiment(name)


def start_parent(uri: str, experiment: str, tags: Mapping[str, str],
                 reuse_run_id: str | None = None) -> str:
    """The sweep's parent run: ``reuse_run_id`` when resuming (set back to RUNNING), else a new
    run tagged with ``tags``. Returns its run id."""
    client = MlflowClient(uri)
    exp_id = experiment_id(client, experiment)
    if reuse_run_id:
        run = client.get_run(reuse_run_id)
        if run.info.experiment_id != exp_id:
            raise ValueError(f"run {reuse_run_id} belongs to another experiment")
        client.update_run(reuse_run_id, status="RUNNING")
        return reuse_run_id
    run = client.create_run(exp_id, tags={**tags, "mlflow.runName": tags.get("sweep", "sweep")})
    return run.info.run_id


def finish(uri: str, run_id: str, status: str) -> None:
    _retry(lambda: MlflowClient(uri).set_terminated(run_id, status=status))


def child_runs(uri: str, parent_run_id: str) -> list:
    """Every child run of a parent (all pages)."""
    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    runs, token = [], None
    while True:
        page = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


class TrialRun:
    """A trial's child run, found by ``trial_id`` under the parent or created once."""

    def __init__(self, uri: str, parent_run_id: str, trial_id: str,
                 params: Mapping[str, Any], tags: Mapping[str, str]) -> None:
        self.client = MlflowClient(uri)
        self.uri = uri
        parent = self.client.get_run(parent_run_id)
        exp_id = parent.info.experiment_id
        found = _retry(lambda: self.client.search_runs(
            [exp_id],
            filter_string=(f"tags.`{PARENT_TAG}` = '{parent_run_id}' and "
                           f"tags.trial_id = '{trial_id}'"),
            max_results=2))
        if found:
            self.run_id = found[0].info.run_id
            _retry(lambda: self.client.update_run(self.run_id, status="RUNNING"))
        else:
            all_tags = {**tags, PARENT_TAG: parent_run_id, "trial_id": trial_id,
                        "mlflow.runName": trial_id}
            run = _retry(lambda: self.client.create_run(exp_id, tags=all_tags))
            self.run_id = run.info.run_id
            params_list = [Param(k, str(v)) for k, v in sorted(params.items())]
            _retry(lambda: self.client.log_batch(self.run_id, params=params_list))

    def log_epoch(self, metrics: Mapping[str, float], epoch: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, epoch) for k, v in sorted(metrics.items())
                 if v == v]  # NaN (e.g. no alignment measured) is skipped, not logged as 0
        _retry(lambda: self.client.log_batch(self.run_id, metrics=batch))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        _retry(lambda: self.client.log_batch(
            self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]))

    def log_artifacts(self, directory: Path) -> None:
        if Path(directory).is_dir() and any(Path(directory).iterdir()):
            _retry(lambda: self.client.log_artifacts(self.run_id, str(directory)))

    def finish(self, status: str) -> None:
        finish(self.uri, self.run_id, status)
