"""The sweep service end to end: a real local Ray cluster, a real SQLite MLflow store, the real
trainable on the simulated world (`python sweeps/run.py NAME --smoke-test`)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from records import TrialKey

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "sweeps" / "run.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    work = tmp_path_factory.mktemp("smoke")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    proc = run_cli("nsd_conv1_v1", "--smoke-test", "--mlflow-uri", uri,
                   "--storage", str(work / "ray_results"), cwd=work)
    return work, uri, proc


def _children(uri: str, experiment: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def test_smoke_sweep_runs_every_direction_into_nested_mlflow_runs(smoke):
    work, uri, proc = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "simulated" in proc.stdout.splitlines()[0]
    # Tune's default output ignores a progress reporter: passing one said so in every run
    assert "ProgressReporter" not in proc.stdout + proc.stderr
    client, parents, children = _children(uri, "nsd_conv1_v1-smoke")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent_id = parents[0].info.run_id
    assert len(children) == 3
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent_id}
    assert sorted(r.data.tags["direction"] for r in children) == ["max", "min", "none"]
    # the parent says how the sweep ran: its search, seeds, Ray, run folder and code
    parent_tags = parents[0].data.tags
    assert (parent_tags["search"], parent_tags["seeds"], parent_tags["trials"]) == (
        "grid", "1", "3")
    assert parent_tags["ray"] == "local (started by the driver)"
    run_folder = Path(parent_tags["run_folder"])
    assert run_folder.parent == work / "ray_results" and (run_folder / "manifest.jsonl").is_file()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    if head.returncode == 0:  # a git checkout (CI's clean clone is one)
        assert parent_tags["mlflow.source.git.commit"] == head.stdout.strip()
        assert parent_tags["code_modified"] in ("true", "false")
    # and, git or not, a digest of its code, which each trial checked its own copy against
    from sweeps.execute import code_digest

    assert parent_tags["code_sha256"] == code_digest()
    # params are every setting as the trial ran it (defaults included), here and in the
    # manifest, so a default changed later does not rewrite what ran
    import dataclasses
    import json

    from trainable.config import TrialConfig

    every = {f.name for f in dataclasses.fields(TrialConfig)}
    manifest = [json.loads(line)
                for line in (run_folder / "manifest.jsonl").read_text().splitlines()]
    assert all(set(entry["config"]) == every for entry in manifest)
    for run in children:
        tags, params = run.data.tags, run.data.params
        assert run.info.status == "FINISHED"
        assert tags["condition"] == "nsd_conv1_v1" and tags["data"] == "demo"
        assert float(params["alpha"]) == float(tags["alpha"])
        assert params["layer"] == "conv1" and params["reference"] == "nsd"
        assert set(params) == every and params["ridge_rel"] == str(TrialConfig.ridge_rel)
        # what the trial resolved: the machine's share, device, precision, its data, voxels
        assert (tags["ran.device"], tags["ran.precision"]) == ("cpu", "float32")
        assert float(tags["ran.cpus"]) == float(params["threads"])
        assert tags["ran.gpus"] == "0" and tags["ran.reference"].startswith("voxels of V1 (")
        assert tags["ran.train_split"].endswith(("in memory", "streamed"))
        history = client.get_metric_history(run.info.run_id, "val_alignment")
        assert [m.step for m in history] == [0]
        for key in ("val_performance", "val_cka", "val_rsa", "task_loss", "epoch_seconds"):
            assert key in run.data.metrics, key
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "conv1_filters.png" in artifacts and "val_predictions.npz" in artifacts
    # the end of the run says where the results are and how to browse them
    # as a command that runs where it was printed (no bare `mlflow`: the venv is not on PATH)
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("browse them: ")]
    assert line.endswith(f" -m mlflow ui --backend-store-uri {uri}"), line
    python = shlex.split(line.removeprefix("browse them: "))[0]
    assert Path(work, python).resolve() == Path(sys.executable).resolve(), line


def test_resume_of_a_finished_sweep_adds_no_runs(smoke):
    work, uri, proc = smoke
    assert proc.returncode == 0
    again = run_cli("nsd_conv1_v1", "--smoke-test", "--resume", "--mlflow-uri", uri,
                    "--storage", str(work / "ray_results"), cwd=work)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    _, parents, children = _children(uri, "nsd_conv1_v1-smoke")
    assert len(parents) == 1
    assert len(children) == 3


def test_optuna_search_samples_both_directions_and_the_baseline(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli("nsd_conv1_v1", "--smoke-test", "--search", "optuna", "--num-samples", "2",
                   "--mlflow-uri", uri, "--storage", str(tmp_path / "ray"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _, parents, children = _children(uri, "nsd_conv1_v1-smoke")
    assert len(parents) == 1
    by_direction = {r.data.tags["direction"]: r for r in children}
    assert sorted(by_direction) == ["max", "min", "none"] and len(children) == 3
    # the sides share the cluster's two slots with the baseline: trials ran at once (run as one
    # Tune experiment per condition and side, each of the three ran alone, a slot idle)
    # (each trial's span from its last Tune result: the MLflow runs' own start and end times
    # span about a second each here, not the trials' time)
    last = [json.loads(f.read_text().splitlines()[-1])
            for f in (tmp_path / "ray").glob("*/*/result.json")]
    spans = sorted((r["timestamp"] - r["time_total_s"], r["timestamp"]) for r in last)
    # (Tune's timestamps are whole seconds: an overlap of more than one)
    assert len(spans) == 3 and any(b[0] < a[1] - 1 for a, b in zip(spans, spans[1:])), spans
    for direction, sign in (("max", 1), ("min", -1)):
        alpha = float(by_direction[direction].data.params["alpha"])
        # sampled log-uniformly within the grid's |alpha| range {0.1 .. 0.8}
        assert sign * alpha > 0 and 0.1 <= abs(alpha) <= 0.8
        key = TrialKey.parse(by_direction[direction].data.tags["trial_id"])
        assert key.sample is not None and key.signed_alpha == pytest.approx(alpha, rel=1e-3)
    # Regression: the dashboards' Ray source found no trial of an Optuna sweep (its folders
    # and ids matched none of its patterns); it reads the driver's manifest now.
    from dashboards.pareto import postprocess_ray

    report = postprocess_ray("nsd_conv1_v1", tmp_path / "ray", out=tmp_path / "from-ray")
    import pyarrow.parquet as pq

    rows = pq.read_table(report.parent / "results.parquet").to_pylist()
    assert sorted(r["trial_id"] for r in rows) == sorted(
        r.data.tags["trial_id"] for r in children)
    assert all(r["status"] == "FINISHED" for r in rows)
    # the manifest keeps each sample's alpha as trained, not its key's 4 significant digits
    trained = {r.data.tags["trial_id"]: float(r.data.params["alpha"]) for r in children}
    assert {r["trial_id"]: r["alpha"] for r in rows} == trained
    # Tune's progress table and result folders are named by the trials' keys
    for r in children:
        assert r.data.tags["trial_id"] in proc.stdout
        assert list((tmp_path / "ray").glob(f"*/{r.data.tags['trial_id']}"))
