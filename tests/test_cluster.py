"""The sweep service on real Ray clusters started with `ray start`: fractional GPUs, two nodes,
a killed trial worker, an interrupted driver. Every cluster is a `ray start --block` process
group of this test's own (own temp dir and ports), stopped by the test; nothing else on the
machine is touched."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
# `ray start` turns token authentication on by default and does not make a token: on a machine
# where no Ray has run (no ~/.ray/auth_token) the head exited at once ("no authentication token
# was found"), which only a fresh CI machine showed. The clusters here get their token as the
# README's cluster by hand does, in RAY_AUTH_TOKEN on every node and the driver.
ENV = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
# Every test cluster lives on loopback. Not 127.0.0.1: Ray 2.60 rewrites that address to the
# machine's outward interface address (services.resolve_ip_for_localhost), for `ray start` and
# `ray.init` alike, so a "127.0.0.1" cluster really listened and was joined on the external
# interface, and a client once waited 150 s for the GCS there. 127.0.0.2 is loopback too (Linux
# routes 127/8 to lo) and Ray leaves it alone; the driver joins on it (sweeps.execute).
LOOPBACK = "127.0.0.2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _node_ports() -> list[str]:
    ports = [free_port() for _ in range(6)]
    low = free_port()
    return ["--node-manager-port", str(ports[0]), "--object-manager-port", str(ports[1]),
            "--metrics-export-port", str(ports[2]), "--dashboard-agent-listen-port",
            str(ports[3]), "--dashboard-agent-grpc-port", str(ports[4]),
            "--runtime-env-agent-port", str(ports[5]),
            "--min-worker-port", str(low + 1000 if low < 50000 else 20000),
            "--max-worker-port", str((low + 1000 if low < 50000 else 20000) + 200)]


def _wait_for(address: str, cpus: float, timeout: float = 90) -> None:
    code = (f"import ray, time\nray.init(address={address!r}, logging_level='ERROR', "
            f"_node_ip_address={LOOPBACK!r})\n"
            f"t=time.time()\n"
            f"while ray.cluster_resources().get('CPU', 0) < {cpus} and time.time()-t < {timeout}:\n"
            f"    time.sleep(0.5)\n"
            f"print(ray.cluster_resources().get('CPU', 0))")
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True,
                         text=True, timeout=timeout + 60)
    assert out.returncode == 0 and float(out.stdout.split()[-1]) >= cpus, out.stderr[-2000:]


def _start_head(head_cpus: int, head_gpus: int, tmp: str, attempts: int = 3):
    """Start the head node; returns ``(process, address)`` once its GCS port accepts
    connections. The ports are picked free just before ``ray start`` binds them, so another
    process can take one in between (seen once in a full suite run: the GCS never came up and
    a client waited 150 s); a head that exits before its GCS listens is restarted on fresh
    ports, and one that neither exits nor listens fails the test with its log's tail."""
    for attempt in range(attempts):
        port = free_port()
        log = Path(tmp) / f"head-{attempt}.log"
        cmd = [RAY, "start", "--head", "--block", "--port", str(port),
               "--node-ip-address", LOOPBACK, "--num-cpus", str(head_cpus),
               "--num-gpus", str(head_gpus), "--object-store-memory", str(200 << 20),
               "--include-dashboard", "false", "--temp-dir", f"{tmp}/head{attempt}",
               *_node_ports()]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, env=ENV, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            with socket.socket() as s:
                s.settimeout(1)
                if s.connect_ex((LOOPBACK, port)) == 0:
                    return proc, f"{LOOPBACK}:{port}"
            time.sleep(0.5)
        if proc.poll() is None:  # alive but not listening: not a port race; stop and report
            _stop([proc])
            raise AssertionError(f"ray head on port {port} did not listen within 120 s: "
                                 f"{log.read_text(errors='replace')[-2000:]}")
        print(f"ray head on port {port} exited ({proc.returncode}) before listening; "
              f"retrying on fresh ports: {log.read_text(errors='replace')[-500:]}")
    raise AssertionError(f"ray head failed to start {attempts} times")


def _start_worker(address: str, cpus: int, total: float, tmp: str, attempts: int = 3,
                  env: dict[str, str] | None = None):
    """Start a worker node and wait until the cluster counts ``total`` CPUs. Like the head, a
    worker whose freshly picked ports were taken meanwhile exits before it joins (a full suite
    run once waited out the join with the worker's output discarded): it is restarted on fresh
    ports; one that stays up without joining fails the test with its log's tail."""
    for attempt in range(attempts):
        log = Path(tmp) / f"worker-{attempt}.log"
        cmd = [RAY, "start", "--address", address, "--block", "--node-ip-address", LOOPBACK,
               "--num-cpus", str(cpus), "--num-gpus", "0", "--object-store-memory",
               str(200 << 20), *_node_ports()]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, env={**ENV, **(env or {})}, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for(address, total, timeout=120)
            return proc
        except AssertionError as exc:
            if proc.poll() is None:  # up but not joined: not a port race; stop and report
                _stop([proc])
                raise AssertionError(f"ray worker did not join {address} within 120 s "
                                     f"({exc}); its log: "
                                     f"{log.read_text(errors='replace')[-2000:]}") from None
            print(f"ray worker exited ({proc.returncode}) before joining; retrying on fresh "
                  f"ports: {log.read_text(errors='replace')[-500:]}")
    raise AssertionError(f"ray worker failed to join {attempts} times")


def _stop(procs, grace: float = 5) -> None:
    """Stop each `ray start --block` process group: SIGTERM, then SIGKILL to what is left of
    the group after ``grace`` seconds. Ray's own processes (GCS, raylet, agents) exit on the
    SIGTERM within seconds, but `ray start` itself then spends ~30 s reaping them and its log
    monitor; that wait was the longest part of a small cluster test."""
    for p in reversed(procs):
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        try:  # a group id is not reused while any member lives; an empty group: ESRCH
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


@contextmanager
def ray_cluster(*, head_cpus: int, head_gpus: int = 0, worker_cpus: int = 0,
                worker_env: dict[str, str] | None = None):
    """A head node (and optionally one worker node, with ``worker_env`` over the test's
    environment) on this machine, each a blocking `ray start` process with its own temp dir,
    ports and object store size."""
    procs = []
    with tempfile.TemporaryDirectory(prefix="rt", dir="/tmp") as tmp:
        try:
            head, address = _start_head(head_cpus, head_gpus, tmp)
            procs.append(head)
            _wait_for(address, head_cpus)
            if worker_cpus:
                procs.append(_start_worker(address, worker_cpus, head_cpus + worker_cpus, tmp,
                                           env=worker_env))
            yield address
        finally:
            _stop(procs)


def run_cli(args, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "sweeps" / "run.py"), *args], cwd=cwd,
                          env=ENV, capture_output=True, text=True, timeout=timeout)


def trial_dirs(storage: Path) -> list[Path]:
    return sorted(p.parent for p in storage.glob("*/*/params.json"))


def spans(storage: Path, experiment: str = "") -> list[tuple[float, float]]:
    """(start, end) of every trial as Tune recorded them in its experiment state (file times
    are useless: Ray copies trial folders to storage): the trial's actor started, its last
    report arrived. ``experiment``: that one's run, where the storage holds several."""
    (state_file,) = storage.glob(f"{experiment}*/experiment_state-*.json")
    state = json.loads(state_file.read_text())
    metas = [json.loads(meta) for _, meta in state["trial_data"]]
    return [(float(m["start_time"]), float(m["last_result_time"])) for m in metas]


def child_runs(uri: str, experiment: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def test_fractional_gpus_run_four_trials_at_once_on_cpu(tmp_path):
    """Ray declares 1 GPU; --gpus-per-trial 0.25 lets 4 trials share it. There is no CUDA
    here, so each trial falls back to the CPU, but all four must be scheduled together. A
    trial given no GPU on that node sees none (Ray 2.60 left the node's GPUs visible to it,
    and device=auto would have taken GPU 0)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with ray_cluster(head_cpus=4, head_gpus=1) as address:
        # four trials (of the six two seeds make): as many as share the GPU
        proc = run_cli(["nsd_conv1_v1", "--smoke-test", "--seeds", "2", "--only", "*-s0",
                        "--only", "*-none-*", "--address", address,
                        "--gpus-per-trial", "0.25", "--cpus-per-trial", "1",
                        "--mlflow-uri", uri, "--storage", str(tmp_path / "ray")], cwd=tmp_path)
        cpu_only = run_cli(["gabor_conv1", "--smoke-test", "--only", "*-none-*", "--address",
                            address, "--gpus-per-trial", "0", "--cpus-per-trial", "1",
                            "--mlflow-uri", uri, "--storage", str(tmp_path / "ray")],
                           cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert cpu_only.returncode == 0, cpu_only.stdout[-3000:] + cpu_only.stderr[-3000:]
    shared = child_runs(uri, "nsd_conv1_v1-smoke")
    assert len(shared) == 4 and {(r.data.tags["ran.gpus"], r.data.tags["ran.visible_gpus"])
                                 for r in shared} == {("0.25", "0")}
    (alone,) = child_runs(uri, "gabor_conv1-smoke")
    assert (alone.data.tags["ran.gpus"], alone.data.tags["ran.visible_gpus"],
            alone.data.tags["ran.device"]) == ("0", "none", "cpu"), alone.data.tags
    assert len(trial_dirs(tmp_path / "ray")) == 5
    times = spans(tmp_path / "ray", "nsd_conv1_v1-smoke")
    assert len(times) == 4
    most = max(sum(s <= t < e for s, e in times) for t, _ in times)
    assert most >= 4, times
    assert "no GPU" not in proc.stdout  # the cluster has one; trials just cannot use CUDA


def test_two_node_cluster_runs_trials_on_both_nodes(tmp_path):
    """Three one-CPU trials on two one-CPU nodes: two run at once, one on each node."""
    with ray_cluster(head_cpus=1, worker_cpus=1) as address:
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        proc = run_cli(["nsd_conv1_v1", "--smoke-test", "--address", address,
                        "--cpus-per-trial", "1", "--mlflow-uri", uri,
                        "--storage", str(tmp_path / "ray")], cwd=tmp_path)
        # a driver with another token (Ray's authentication is on): one line, exit 2, naming
        # the token, instead of a ConnectionError traceback that blamed a crashed instance
        refused = subprocess.run(
            [sys.executable, str(REPO / "sweeps" / "run.py"), "gabor_conv1", "--smoke-test",
             "--address", address, "--mlflow-uri", f"sqlite:///{tmp_path / 'other.db'}",
             "--storage", str(tmp_path / "other")], cwd=tmp_path, capture_output=True,
            text=True, timeout=300,
            # (Ray's window for reaching the GCS, ~20 s by default, shortened for the test)
            env={**ENV, "RAY_AUTH_TOKEN": "0" * 64, "RAY_gcs_server_port_wait_time_s": "2"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    nodes = {r.data.tags["ray_node_id"] for r in child_runs(uri, "nsd_conv1_v1-smoke")}
    assert len(nodes) == 2, nodes
    parent_tags = [r for r in MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("nsd_conv1_v1-smoke").experiment_id])
                   if "mlflow.parentRunId" not in r.data.tags][0].data.tags
    assert parent_tags["ray"].startswith(address)  # the cluster joined, as it answered
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
    # (before it, Ray's own C++ log lines of its connection attempts, which it writes itself)
    last = refused.stderr.splitlines()[-1]
    assert last.startswith(f"error: --address {address}: the Ray cluster there did not let "
                           f"this driver join ("), refused.stderr[-2000:]
    assert "RAY_AUTH_TOKEN" in last and "Traceback" not in refused.stderr


def test_a_node_that_cannot_run_the_trials_is_named_before_any_starts(tmp_path):
    """A node whose trials would fail or hang (here its TMPDIR, too long for the trials'
    data-loading sockets; on machines of their own also a missing data or --storage mount)
    failed each trial it was given, and its slots, freed first, took trial after trial and
    Tune's retries too. The driver now asks every node with a zero-CPU task before any trial
    starts and refuses in one line naming the node, before any record is made."""
    long_tmp = Path(tempfile.mkdtemp(dir="/tmp")) / ("t" * 70)
    long_tmp.mkdir()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        with ray_cluster(head_cpus=1, worker_cpus=1,
                         worker_env={"TMPDIR": str(long_tmp), "RAY_TMPDIR": "/tmp"}) as address:
            proc = run_cli(["gabor_conv1", "--smoke-test", "--address", address,
                            "--cpus-per-trial", "1", "--mlflow-uri", uri,
                            "--storage", str(tmp_path / "ray")], cwd=tmp_path)
    finally:
        long_tmp.rmdir()
        long_tmp.parent.rmdir()
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    longest = len(str(long_tmp)) + 32
    assert proc.stderr.splitlines()[-1] == (
        f"error: node {socket.gethostname()} ({LOOPBACK}): the temporary folder {long_tmp} "
        f"(TMPDIR): the trials' data-loading processes make sockets under it of up to "
        f"{longest} bytes, over the 107 Linux allows; accepted: a TMPDIR of at most 75 bytes "
        f"(e.g. /tmp)"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not trial_dirs(tmp_path / "ray")
    experiment = MlflowClient(uri).get_experiment_by_name("gabor_conv1-smoke")
    assert experiment is None or not MlflowClient(uri).search_runs([experiment.experiment_id])


FAULT_SWEEP = textwrap.dedent("""
    description = "one trial, several epochs: fault-injection tests"
    model = "alexnet"
    layer = "conv1"
    reference = "gabor"
    metric = "linear"
    task = "single_label"

    [grid]
    alphas = [1.0]
    betas = [1]

    [paper]
    data = "imagenet"
    epochs = 4
    lr = 1e-4
    batch_size = 1000
    image_size = 224
    width = 1.0
    resources = { cpus = 1, gpus = 0 }

    [demo]
    data = "simulated_single_label"
    data_kwargs = { n_categories = 4, n_train_per_class = 40, n_val_per_class = 10, seed = 0 }
    epochs = 4
    lr = 1e-3
    batch_size = 32
    image_size = 64
    width = 0.125
    resources = { cpus = 1, gpus = 0 }
""")


@pytest.fixture()
def fault_sweep(tmp_path) -> Path:
    folder = tmp_path / "sweeps"
    folder.mkdir()
    (folder / "faults.toml").write_text(FAULT_SWEEP)
    return folder


def _final_metrics(uri: str, experiment: str) -> dict[str, dict[str, float]]:
    return {r.data.tags["trial_id"]: r.data.metrics for r in child_runs(uri, experiment)}


def _wait_for_checkpoint(storage: Path, trial_glob: str, popen, timeout: float = 300,
                         index: int = 0):
    """The folder of a trial matching ``trial_glob`` once its checkpoint ``index`` is in the
    storage (index 1: by then Tune has taken the first one's result, and its state records
    that checkpoint, an epoch's training later)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        hits = [p.parent for p in storage.glob(f"*/*{trial_glob}*/checkpoint_{index:06d}")]
        if hits:
            return hits[0]
        assert popen.poll() is None, popen.communicate()[0][-3000:]
        time.sleep(0.5)
    raise AssertionError("no trial reached its first checkpoint")


def _reported_epochs(trial_dir: Path) -> list[float]:
    """The epochs a trial reported to Tune, every attempt's, in order (its result.json)."""
    return [json.loads(line)["epoch"]
            for line in (trial_dir / "result.json").read_text().splitlines()]


def test_killed_trial_worker_resumes_from_checkpoint_with_the_same_result(tmp_path,
                                                                          fault_sweep):
    args = ["faults", "--sweep-dir", str(fault_sweep)]
    ref_uri = f"sqlite:///{tmp_path / 'ref.db'}"
    ref = run_cli([*args, "--mlflow-uri", ref_uri, "--storage", str(tmp_path / "ref")],
                  cwd=tmp_path)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "ray"
    popen = subprocess.Popen([sys.executable, str(REPO / "sweeps" / "run.py"), *args,
                              "--mlflow-uri", uri, "--storage", str(storage)],
                             cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    trial = _wait_for_checkpoint(storage, "max-a1", popen)
    # the trial's worker process, as its MLflow run records it (trial folders reach storage
    # only at checkpoints and at the end)
    (run,) = [r for r in child_runs(uri, "faults-demo")
              if r.data.tags["trial_id"].startswith("faults-max-a1")]
    os.kill(int(run.data.tags["worker_pid"]), signal.SIGKILL)  # mid-training
    out, _ = popen.communicate(timeout=600)
    assert popen.returncode == 0, out[-3000:]

    # the retried attempt went on from the checkpoint: a retry that trained anew from epoch
    # 0 ends with the same numbers on the CPU (deterministic), but reports epoch 0 again
    epochs = _reported_epochs(trial)
    assert epochs[-1] == 3.0 and epochs.count(0.0) == 1 and epochs == sorted(epochs), epochs
    got, want = _final_metrics(uri, "faults-demo"), _final_metrics(ref_uri, "faults-demo")
    assert got.keys() == want.keys()
    for tid in want:
        for key in ("val_performance", "val_alignment", "task_loss", "batch_alignment"):
            assert got[tid][key] == want[tid][key], (tid, key)
    assert len(child_runs(uri, "faults-demo")) == 3  # the retried trial kept its one run
    # the checkpoints carry the ran.* tags; the restored attempt ran on the same share, so
    # they read as one value each (a changed one would say from which epoch)
    (kept,) = [r for r in child_runs(uri, "faults-demo")
               if r.data.tags["trial_id"].startswith("faults-max-a1")]
    last = sorted(trial.glob("checkpoint_*"))[-1]
    from sweeps.execute import facts_tags, read_facts

    facts = facts_tags(read_facts(last))
    assert facts["ran.cpus"] == kept.data.tags["ran.cpus"] == "1", facts
    assert {k: v for k, v in kept.data.tags.items() if k.startswith("ran.")} == facts


def test_interrupted_driver_resumes_only_missing_trials(tmp_path, fault_sweep):
    args = ["faults", "--sweep-dir", str(fault_sweep)]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "ray"
    popen = subprocess.Popen([sys.executable, str(REPO / "sweeps" / "run.py"), *args,
                              "--mlflow-uri", uri, "--storage", str(storage)],
                             cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    _wait_for_checkpoint(storage, "a1", popen, index=1)
    # `docker stop` or a scheduler's kill, which the driver turns into a Ctrl-C (Tune saves its
    # state and stops). ray.init used to replace that handler with its own (sys.exit): the
    # driver then aborted (exit 134), the parent FAILED and the stopped trials' runs stayed
    # RUNNING.
    popen.send_signal(signal.SIGTERM)
    out, _ = popen.communicate(timeout=300)
    # the trials that ran every epoch, as the driver recorded them (Ray 2.60's result.json
    # never says "done": true, so this was always empty, and the dry run's count below was
    # expected to be 0 even when the baseline had finished before the signal)
    from records import read_manifest

    (run_folder,) = {d.parent for d in trial_dirs(storage)}
    done_before = {e.key for e in read_manifest(run_folder) if e.state == "done"}
    assert len(done_before) < 3, out[-3000:]
    # An honest end state: exit 130, the parent run KILLED and tagged, the unfinished trials
    # named and their child runs KILLED, the report built from what finished and marked so.
    assert popen.returncode == 130, out[-3000:]
    assert "sweep interrupted:" in out and "--resume" in out, out[-3000:]
    # and no advice of Tune's that contradicts it: Tuner.restore(...) instead of --resume,
    # a `tensorboard` command the project does not install
    for advice in ("Tuner.restore", "tensorboard --logdir"):
        assert advice not in out, out[-3000:]
    client = MlflowClient(uri)
    (parent,) = [r for r in client.search_runs(
        [client.get_experiment_by_name("faults-demo").experiment_id])
                 if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "KILLED" and parent.data.tags.get("interrupted") == "true"
    stopped = [r for r in child_runs(uri, "faults-demo") if r.info.status != "FINISHED"]
    assert stopped and all(r.info.status == "KILLED" for r in stopped), [
        (r.data.tags["trial_id"], r.info.status) for r in stopped]
    for r in stopped:
        assert r.data.tags["trial_id"] in out
    report = Path(out.rsplit("report: ", 1)[1].split()[0])
    assert "PARTIAL (interrupted)" in report.read_text()

    # A new run refused after Ray started (no node holds its trials) leaves the resume
    # pointer on the interrupted run: it used to point --resume at its own empty folder, and
    # the resume then ran the whole sweep anew under a new parent run.
    pointer = storage / "faults-demo.latest"
    before = (pointer.read_text(), sorted(p.name for p in storage.iterdir()))
    refused = run_cli([*args, "--cpus-per-trial", "1024", "--mlflow-uri", uri, "--storage",
                       str(storage)], cwd=tmp_path)
    assert refused.returncode == 2 and "1024" in refused.stderr, refused.stderr[-2000:]
    assert (pointer.read_text(), sorted(p.name for p in storage.iterdir())) == before
    # A trial folder deleted from the storage: Tune would restore the trial from its missing
    # checkpoint and fail it at every --resume (the parent run was left RUNNING). Refused
    # in one line naming the trial, before anything is reopened.
    # a trial Tune's state says to restore from a checkpoint (one whose checkpoint folder was
    # written but whose result Tune had not taken when it stopped restarts from scratch)
    from ray.tune import ExperimentAnalysis

    recorded = {Path(t.checkpoint.path).parent.name
                for t in ExperimentAnalysis(str(run_folder)).trials
                if t.checkpoint is not None and t.status != "TERMINATED"}
    lost = next(d for d in trial_dirs(storage) if d.name in recorded)
    aside = tmp_path / "aside"
    lost.rename(aside)
    gone = run_cli([*args, "--resume", "--mlflow-uri", uri, "--storage", str(storage)],
                   cwd=tmp_path)
    assert gone.returncode == 2 and "Traceback" not in gone.stderr, gone.stderr[-2000:]
    assert f"no longer holds trial {lost.name}'s checkpoint" in gone.stderr, gone.stderr
    assert len(gone.stderr.strip().splitlines()) == 1, gone.stderr  # no Ray warning either
    dry = run_cli([*args, "--resume", "--dry-run", "--mlflow-uri", uri, "--storage",
                   str(storage)], cwd=tmp_path)
    assert dry.returncode == 2 and dry.stderr == gone.stderr, dry.stdout + dry.stderr
    assert MlflowClient(uri).get_run(parent.info.run_id).info.status == "KILLED"
    aside.rename(lost)
    dry = run_cli([*args, "--resume", "--dry-run", "--mlflow-uri", uri, "--storage",
                   str(storage)], cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert (f"{len(done_before)} of 3 trials finished there; the resume runs "
            f"{3 - len(done_before)} (") in dry.stdout, dry.stdout

    again = run_cli([*args, "--resume", "--mlflow-uri", uri, "--storage", str(storage)],
                    cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming" in again.stdout
    # the resume, too, without Tune's `tensorboard` command (every --resume printed it and
    # wrote event files: the restored run's fit kept Tune's automatic loggers)
    assert "tensorboard --logdir" not in again.stdout + again.stderr, again.stdout[-3000:]
    assert not list(storage.glob("**/events.out.tfevents*"))
    assert all((d / "result.json").is_file() for d in trial_dirs(storage))
    parent = MlflowClient(uri).get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED"  # the resumed invocation completed it
    runs = child_runs(uri, "faults-demo")
    assert len(runs) == 3  # one child run per trial, never duplicates
    assert all(r.info.status == "FINISHED" for r in runs)
    # a stopped trial is no error (Tune stops its actor with SystemExit: it was tagged
    # "SystemExit: 0", and the tag outlived the resumed trial's success)
    assert not [r.data.tags["error"] for r in runs if "error" in r.data.tags]
    for run in runs:
        epochs = MlflowClient(uri).get_metric_history(run.info.run_id, "val_alignment")
        assert sorted(m.step for m in epochs) == [0, 1, 2, 3]  # each epoch exactly once
    # the stopped trials went on from their checkpoints (MLflow keeps one value per epoch
    # whatever is logged again, so Tune's own record says it): none reported epoch 0 twice
    for d in trial_dirs(storage):
        epochs = _reported_epochs(d)
        assert epochs[-1] == 3.0 and epochs.count(0.0) == 1, (d.name, epochs)
