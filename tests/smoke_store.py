"""A finished smoke sweep for the dashboards tests, run once per pytest session.

tests/test_dashboards.py and tests/test_browser.py both need a real sweep in a real MLflow store
(`python sweeps/run.py nsd_conv1_v1 --smoke-test`, about 1.5 minutes on two cores). A fixture
in one test module cannot be shared with another without a conftest, so each module's fixture
calls ``finished_smoke_sweep``, which runs the sweep into the session's base temporary folder
the first time and afterwards reads back what that run recorded there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SWEEP = "nsd_conv1_v1"
EXPERIMENT = f"{SWEEP}-smoke"


@dataclass(frozen=True)
class SmokeSweep:
    """work : the folder the sweep ran in; uri : its SQLite MLflow store; storage : Ray Tune's
    results; parent_run_id : the sweep's MLflow parent run; stdout : what run.py printed."""

    work: Path
    uri: str
    storage: Path
    parent_run_id: str
    stdout: str


def finished_smoke_sweep(tmp_path_factory: pytest.TempPathFactory) -> SmokeSweep:
    work = tmp_path_factory.getbasetemp() / "dashboards-smoke-sweep"
    record = work / "smoke_sweep.json"
    if record.is_file():
        data = json.loads(record.read_text())
        return SmokeSweep(**{**data, "work": Path(data["work"]),
                             "storage": Path(data["storage"])})
    work.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    storage = work / "ray_results"
    cmd = [sys.executable, str(REPO / "sweeps" / "run.py"), SWEEP, "--smoke-test",
           "--mlflow-uri", uri, "--storage", str(storage)]
    try:  # below pytest-timeout's 600 s, so that what the sweep printed is shown
        proc = subprocess.run(cmd, check=False, cwd=work, capture_output=True, text=True,
                              timeout=540)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the smoke sweep did not finish in {exc.timeout} s:\n"
                    f"{(exc.stdout or b'')[-4000:]!r}")
    if proc.returncode != 0:
        pytest.fail(f"the smoke sweep failed (exit {proc.returncode}):\n"
                    f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    parents = sorted(storage.glob(f"{EXPERIMENT}_*/mlflow_parent.json"))
    if not parents:
        pytest.fail(f"the smoke sweep left no mlflow_parent.json under {storage}")
    sweep = SmokeSweep(work, uri, storage, json.loads(parents[-1].read_text())["run_id"],
                       proc.stdout)
    record.write_text(json.dumps({**asdict(sweep), "work": str(work),
                                  "storage": str(storage)}))
    return sweep
