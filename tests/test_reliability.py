"""Faults a sweep must survive honestly (issue 12), with real processes: a real `mlflow
server` stopped mid-sweep and started again, secrets on the command line, storage URIs."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from smoke_store import SWEEP as SMOKE_SWEEP
from smoke_store import finished_smoke_sweep

from sweeps.plan import UsageError, make_plan
from sweeps.run import build_parser

REPO = Path(__file__).resolve().parents[1]
SWEEP = "nsd_conv1_v1"
EPOCHS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The server's processes (the `mlflow` CLI and the uvicorn it starts) import this from
# PYTHONPATH: a bind of the server's port waits until the given time. Nothing listens on the
# port before then: a client's connection is refused, as when no server runs at all.
_LISTEN_GATE = """\
import os, socket, time

_port, _, _at = os.environ.get("ALIGNSWEEP_TEST_LISTEN_AT", "").partition("@")
if _at:
    _bind = socket.socket.bind

    def bind(self, address, _port=int(_port), _at=float(_at)):
        if isinstance(address, tuple) and len(address) >= 2 and address[1] == _port:
            time.sleep(max(0.0, _at - time.time()))
        return _bind(self, address)

    socket.socket.bind = bind
"""


class MlflowServer:
    """`mlflow server` on 127.0.0.1:port over a SQLite file; stop() and start() again on the
    same port and store, as an operator restarting it would."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.extra: list[str] = []  # more `mlflow server` options
        self.db = work / "server.db"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 120) -> None:
        self.launch()
        self.wait_ready(timeout)

    def launch(self, listen_at: float | None = None) -> None:
        """Start the server process. With ``listen_at`` (a ``time.time()``), the process takes
        its port no earlier than then (``_LISTEN_GATE``): it imports meanwhile, so the server
        answers right at that moment instead of its start-up time (~8 s here) later."""
        mlflow = Path(sys.executable).with_name("mlflow")
        cmd = [str(mlflow)] if mlflow.exists() else [sys.executable, "-m", "mlflow"]
        self.starts += 1
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        if listen_at is not None:
            gate = self.work / "listen-gate"
            gate.mkdir(exist_ok=True)
            (gate / "sitecustomize.py").write_text(_LISTEN_GATE)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(gate),
                                                              env.get("PYTHONPATH")]))
            env["ALIGNSWEEP_TEST_LISTEN_AT"] = f"{self.port}@{listen_at!r}"
        log = open(self.work / f"server-{self.starts}.log", "w")
        self.proc = subprocess.Popen(
            [*cmd, "server", "--backend-store-uri", f"sqlite:///{self.db}",
             "--default-artifact-root", str(self.work / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1", *self.extra],
            cwd=self.work, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env=env)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.work / f"server-{self.starts}.log").read_text()
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        raise AssertionError(f"mlflow server did not answer within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()


def _reported_epochs(db: Path) -> int:
    """Validation metrics rows in the store (read straight from the file while the server
    may be down)."""
    import sqlite3

    if not db.is_file():
        return 0
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        try:
            return con.execute("select count(*) from metrics where key = 'val_map'"
                               ).fetchone()[0]
        except sqlite3.OperationalError:
            return 0


def _stop_at_the_first_epoch(server: MlflowServer, popen: subprocess.Popen) -> None:
    """Stop ``server`` once a trial of the sweep ``popen`` runs has logged its first epoch."""
    deadline = time.monotonic() + 300
    while _reported_epochs(server.db) < 1:
        assert popen.poll() is None, popen.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no epoch reached MLflow"
        time.sleep(0.5)
    server.stop()


def test_a_tracking_outage_fails_no_trial_and_loses_no_metric(tmp_path):
    """The MLflow server goes down after the first epochs are logged and comes back 25 s
    later, while the trials train on: the sweep exits 0, every trial is FINISHED, and every
    metric of every epoch is in the store exactly once (no gap, no duplicate step)."""
    server = MlflowServer(tmp_path)
    server.start()
    env = {**os.environ, "ALIGNSWEEP_TRACKING_FLUSH_S": "300"}
    popen = subprocess.Popen(
        [sys.executable, str(REPO / "sweeps" / "run.py"), SWEEP, "--smoke-test",
         "--set", f"epochs={EPOCHS}", "--mlflow-uri", server.url,
         "--storage", str(tmp_path / "ray")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _stop_at_the_first_epoch(server, popen)
        back = time.time() + 25
        server.launch(listen_at=back)  # takes its port 25 s from now, not ~8 s after that
        time.sleep(max(0.0, back - 1 - time.time()))  # the trials train on while nothing answers
        with socket.socket() as probe:  # (the restarted server waited for its time)
            assert probe.connect_ex(("127.0.0.1", server.port)) != 0, "it came back early"
        time.sleep(max(0.0, back - time.time()))
        assert popen.poll() is None, "the sweep ended during the outage: it did not wait"
        server.wait_ready()
        out, _ = popen.communicate(timeout=600)
    finally:
        if popen.poll() is None:
            popen.kill()
        server.stop()
    assert popen.returncode == 0, out[-4000:]
    assert "tracking:" in out and "retrying in the background" in out, out[-4000:]
    # the server is the UI (`mlflow ui --backend-store-uri http://...` serves nothing)
    assert f"browse them: open {server.url}/#/experiments in a browser" in out, out[-2000:]
    client = MlflowClient(f"sqlite:///{server.db}")
    exp = client.get_experiment_by_name(f"{SWEEP}-smoke")
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 3, [r.data.tags.get("trial_id") for r in children]
    for run in children:
        assert run.info.status == "FINISHED", run.data.tags["trial_id"]
        assert "error" not in run.data.tags
        for key in ("val_map", "val_alignment", "task_loss", "epoch_seconds", "dead_units"):
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert steps == list(range(EPOCHS)), (run.data.tags["trial_id"], key, steps)
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
            "conv1_filters.png", "val_predictions.npz"}
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FINISHED"


def test_a_server_gone_at_the_end_is_exit_1_with_the_resume_that_completes_the_records(
        tmp_path):
    """The MLflow server goes down while the trials train and is still down when they end:
    the driver sat silent for ~10 minutes (MLflow's default HTTP retries on the manifest's
    query, the replay and the parent's end), then exited 0 with the parent run RUNNING, a
    trial's run missing and no resume line. It now says the records are incomplete in one
    line with the command that completes them, within a few minutes, and exits 1; that
    command, once the server is back, leaves every run FINISHED with every epoch and its
    artifacts."""
    server = MlflowServer(tmp_path)
    server.start()
    env = {**os.environ, "ALIGNSWEEP_TRACKING_FLUSH_S": "5"}
    env.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
    cmd = [sys.executable, str(REPO / "sweeps" / "run.py"), SWEEP, "--smoke-test",
           "--only", f"{SWEEP}-max-*", "--set", "epochs=3", "--mlflow-uri", server.url,
           "--storage", str(tmp_path / "ray")]
    popen = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        _stop_at_the_first_epoch(server, popen)
        gone = time.monotonic()
        out, _ = popen.communicate(timeout=600)
        waited = time.monotonic() - gone
    finally:
        if popen.poll() is None:
            popen.kill()
    assert popen.returncode == 1, out[-4000:]
    assert waited < 240, (waited, out[-3000:])  # the trial's own run takes under a minute
    (line,) = [x for x in out.splitlines() if "its MLflow records are incomplete" in x]
    resume = line.split("complete them with: ", 1)[1]
    assert resume.endswith(" --resume") and f"--mlflow-uri {server.url}" in resume, line
    server.start()
    try:
        again = subprocess.run(shlex.split(resume), cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=600)
    finally:
        server.stop()
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    client = MlflowClient(f"sqlite:///{server.db}")
    runs = client.search_runs([client.get_experiment_by_name(f"{SWEEP}-smoke").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 1, [r.data.tags.get("trial_id") for r in children]
    for run in children:
        assert run.info.status == "FINISHED", run.data.tags["trial_id"]
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_map"))
        assert steps == [0, 1, 2], (run.data.tags["trial_id"], steps)
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
            "conv1_filters.png", "val_predictions.npz"}, run.data.tags["trial_id"]
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FINISHED"


# ----------------------------------------------------------------------------- secrets


def run_cli(*args: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "sweeps" / "run.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def _refused_before_ray_starts(uri: str, said: str) -> None:
    """The dry run, the run and the post-processor each stop at ``uri`` with the one line
    ``error: --mlflow-uri URI: <said>...``, exit 2, before Ray starts."""
    for argv in (["sweeps/run.py", "gabor_conv1", "--smoke-test", "--dry-run"],
                 ["sweeps/run.py", "gabor_conv1", "--smoke-test"],
                 ["-m", "dashboards.pareto", "gabor_conv1"]):
        proc = subprocess.run([sys.executable, *argv, "--mlflow-uri", uri], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith(f"error: --mlflow-uri {uri}: {said}"), proc.stderr
        assert len(proc.stderr.splitlines()) == 1 and "Ray" not in proc.stdout


def test_a_server_that_refuses_this_client_is_one_line_before_ray_starts(tmp_path):
    """A server whose /health answers but whose API refuses the Host header this URI sends
    (started without --allowed-hosts naming it): the run had started Ray, then died with a
    403 traceback and exit 1. The dry run, the run and the post-processor refuse it in one
    line saying what the server needs; the allowed name passes. Then its store is broken
    under it (a 5xx to every API call): refused in one line too."""
    server = MlflowServer(tmp_path)
    server.extra = ["--allowed-hosts", f"localhost:{server.port}"]  # not 127.0.0.1:port
    server.start()
    try:
        _refused_before_ray_starts(f"http://127.0.0.1:{server.port}",
                                   "the tracking server refuses this client (HTTP 403: Invalid "
                                   "Host header")
        from records.uris import tracking_refuses

        allowed = f"http://localhost:{server.port}"
        assert tracking_refuses(allowed) is None
        # The same server with its SQLite store emptied under it: /health still answers (it
        # touches no store) and every API call fails (503). The run had started Ray and the
        # parent run's creation waited through MLflow's retries (minutes); the post-processor
        # the same. Now one line naming the server's own reason.
        server.db.write_bytes(b"")
        _refused_before_ray_starts(allowed, "the tracking server answers /health but fails its "
                                   "API (HTTP 503: (sqlite3.OperationalError) no such table: ")
    finally:
        server.stop()


def test_the_refusal_check_sends_the_credentials_mlflows_client_sends(monkeypatch):
    """A password with '@' or ':' is written percent-encoded in --mlflow-uri, and MLflow's
    client decodes it; the check sent it encoded and was refused where the run would have
    been let in. A server that accepts only the decoded pair, and refuses anything else."""
    import base64
    import http.server
    import threading

    from records.uris import tracking_refuses

    want = "Basic " + base64.b64encode(b"alice:p@ss:w%rd").decode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            ok = self.headers.get("Authorization") == want
            self.send_response(200 if ok else 401)
            self.end_headers()
            self.wfile.write(b"{}" if ok else b"You are not authenticated.")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                     "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_AUTH"):
            monkeypatch.delenv(name, raising=False)
        assert tracking_refuses(f"http://alice:p%40ss%3Aw%25rd@127.0.0.1:{port}") is None
        assert str(tracking_refuses(f"http://alice:wrong@127.0.0.1:{port}")) == (
            "HTTP 401: You are not authenticated.")
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "p@ss:w%rd")
        assert tracking_refuses(f"http://127.0.0.1:{port}") is None
    finally:
        server.shutdown()


def test_a_user_the_server_denies_the_experiment_is_one_line_and_nothing_recorded(tmp_path,
                                                                                monkeypatch):
    """A valid user of an MLflow basic-auth server without permission on the sweep's
    experiment (the server's default for others' experiments is none, or read): the run died
    with MLflow's 403 traceback, exit 1. A server that answers as the basic-auth app does for
    such a user ("Permission denied", 403) on every experiment call."""
    import http.server
    import threading

    from sweeps.execute import _start_records

    class Handler(http.server.BaseHTTPRequestHandler):
        def _deny(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
            self.send_response(403)
            self.end_headers()
            self.wfile.write(b"Permission denied")

        do_GET = do_POST = do_PATCH = _deny  # noqa: N815 (http.server's names)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "bob-password-0123")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        plan = make_plan(build_parser().parse_args(
            [SWEEP, "--smoke-test", "--mlflow-uri", uri, "--storage", str(tmp_path / "ray")]))
        run_dir = tmp_path / "ray" / "run"
        with pytest.raises(UsageError, match=rf"^--mlflow-uri {re.escape(uri)}: the tracking "
                                             rf"server denies user bob the experiment "
                                             rf"{SWEEP}-smoke \(HTTP 403: Permission denied\); "
                                             rf"accepted: MLFLOW_TRACKING_USERNAME of a user "
                                             rf"with EDIT or MANAGE permission"):
            _start_records(plan, run_dir)
        assert not run_dir.exists()
    finally:
        server.shutdown()


@pytest.mark.parametrize("uri", [
    "postgresql://sweeper:hunter2pass@db.example:5432/mlflow",
    "http://alice:hunter2pass@127.0.0.1:9/",
])
def test_a_password_in_the_tracking_uri_is_never_printed(tmp_path, uri):
    """The dry run prints the store, an unreachable server is one error line: neither shows
    the password (user names stay, they help)."""
    proc = run_cli(SWEEP, "--dry-run", "--mlflow-uri", uri, cwd=tmp_path)
    text = proc.stdout + proc.stderr
    assert "hunter2pass" not in text, text
    assert ":***@" in text
    if uri.startswith("http"):  # the dry run asks the server, which is not there
        assert proc.returncode == 2 and "tracking server unreachable" in proc.stderr


def test_the_parent_run_file_holds_no_secret(tmp_path):
    from sweeps.plan import redact

    assert redact("mysql+pymysql://u:p4ss@h/db?ssl_key=abc&password=x") == (
        "mysql+pymysql://u:***@h/db?ssl_key=***&password=***")
    assert redact("s3://b/k?X-Amz-Signature=s1g&X-Amz-Credential=c") == (
        "s3://b/k?X-Amz-Signature=***&X-Amz-Credential=***")
    assert redact("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    text = json.dumps({"mlflow_uri": redact("http://u:pw@host:5000")})
    assert "pw" not in text.replace("http", "")


# ----------------------------------------------------------------------------- storage


def test_file_uri_storage_is_that_folder_and_cloud_uris_are_refused(tmp_path):
    folder = tmp_path / "results"
    proc = run_cli(SWEEP, "--dry-run", "--storage", f"file://{folder}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"storage: {folder}" in proc.stdout
    proc = run_cli(SWEEP, "--dry-run", "--storage", "s3://bucket/results", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert "--storage s3://bucket/results: s3:// storage is not supported" in proc.stderr
    assert not (tmp_path / "s3:").exists()


# ----------------------------------------------------------------------------- scratch


_SCRATCH_OWNER = """
import sys, time
from records.scratch import scratch_dir
d = scratch_dir()
(d / "ckpt-x").mkdir()
(d / "ckpt-x" / "checkpoint.pt").write_bytes(bytes(1 << 20))
print(d, flush=True)
time.sleep(float(sys.argv[1]))
"""


def test_a_trial_killed_outright_leaves_no_scratch_for_the_next_to_find(tmp_path):
    """A trial SIGKILLed (the OOM killer) ran no cleanup: its checkpoint folder (hundreds of
    MB at paper scale), its artifacts and a restored checkpoint stayed in /tmp for good, one
    set per kill. Each process's temporary files now live in one folder it holds locked; the
    next process to make its own removes those of processes that are gone, and leaves a live
    one's, another host's and a folder without a lock file. A normal exit removes its own."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    owners = [subprocess.Popen([sys.executable, "-c", _SCRATCH_OWNER, "120"], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        killed, live = (Path(p.stdout.readline().strip()) for p in owners)
        owners[0].send_signal(signal.SIGKILL)
        owners[0].wait()
        assert (killed / "ckpt-x" / "checkpoint.pt").is_file()  # what a kill left
        other_host = tmp_path / "alignsweep-scratch-elsewhere.example-ab12"
        other_host.mkdir()
        (other_host / ".lock").write_text("")
        from records.scratch import SCRATCH_PREFIX, host_tag

        unlocked = tmp_path / f"{SCRATCH_PREFIX}{host_tag()}-cd34"  # still being made
        unlocked.mkdir()
        # its maker killed before it locked it (a few per test suite, probed at stop 37):
        # empty, or with the lock file being made, unchanged for longer than the grace
        abandoned = [tmp_path / f"{SCRATCH_PREFIX}{host_tag()}-{k}" for k in ("gh78", "ij90")]
        unheld_in_use = tmp_path / f"{SCRATCH_PREFIX}{host_tag()}-kl12"  # no flock: in use
        for folder in (*abandoned, unheld_in_use):
            folder.mkdir()
        (abandoned[1] / ".lock.new").write_text("")
        (unheld_in_use / "ckpt-z").mkdir()
        hour_ago = time.time() - 3600
        for folder in (*abandoned, unheld_in_use):
            os.utime(folder, (hour_ago, hour_ago))
        # a cleaner killed part-way through a killed owner's folder: renamed before deletion,
        # so the next cleaner knows it for garbage (it had lost its lock file and stayed)
        half = tmp_path / f".{SCRATCH_PREFIX}{host_tag()}-ef56.removing"
        (half / "ckpt-y").mkdir(parents=True)
        (half / "ckpt-y" / "checkpoint.pt").write_bytes(bytes(1 << 10))
        nxt = subprocess.run([sys.executable, "-c", _SCRATCH_OWNER, "0"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=60)
        assert nxt.returncode == 0, nxt.stderr
        own = Path(nxt.stdout.strip())
        assert not killed.exists() and not half.exists()
        assert not list(tmp_path.glob(".*.removing"))
        assert live.is_dir() and other_host.is_dir() and unlocked.is_dir()
        assert not any(folder.exists() for folder in abandoned) and unheld_in_use.is_dir()
        assert own.parent == tmp_path and not own.exists()  # removed at its exit
    finally:
        for p in owners:
            p.kill()
            p.wait()


def test_a_temporary_folder_without_locks_still_takes_a_trials_scratch(tmp_path, monkeypatch):
    """On a file system whose flock fails (Lustre without -o flock, some FUSE mounts) the
    scratch folder is made unheld, as a plain temporary folder was, instead of failing every
    trial; a later cleaner leaves it (no lock file), as it leaves a folder being made."""
    import errno
    import tempfile

    import records.scratch as scratch

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(scratch, "_scratch", None)
    monkeypatch.setattr(scratch.fcntl, "flock", no_locks)
    folder = scratch.scratch_dir()
    assert folder.parent == tmp_path and folder.is_dir() and not list(folder.iterdir())
    (folder / "ckpt-1").mkdir()
    scratch.remove_stale_held(tmp_path, scratch.SCRATCH_PREFIX)
    assert (folder / "ckpt-1").is_dir()
    monkeypatch.setattr(scratch.fcntl, "flock", lambda *a: (_ for _ in ()).throw(
        OSError(errno.EIO, "I/O error")))  # any other failure is still an error
    with pytest.raises(OSError, match="I/O error"):
        scratch.new_held(tmp_path, "other-")
    assert not list(tmp_path.glob("other-*"))


# ----------------------------------------------------------------------------- drivers


def _runs_in(db: Path) -> list[str]:
    """Every run of every experiment in the SQLite store ``db`` (none when it was never made),
    as "experiment/run name": what a refused run must not have left, whatever its experiment
    is called (a sweep's experiment carries its scale, e.g. nsd_conv1_v1-paper)."""
    if not db.exists():
        return []
    client = MlflowClient(f"sqlite:///{db}")
    return [f"{e.name}/{r.info.run_name}" for e in client.search_experiments()
            for r in client.search_runs([e.experiment_id])]


def _smoke(*extra: str, tmp: Path) -> list[str]:
    return [SWEEP, "--smoke-test", "--mlflow-uri", f"sqlite:///{tmp / 'mlflow.db'}",
            "--storage", str(tmp / "ray"), *extra]


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory):
    """The session's finished ``SWEEP --smoke-test`` run (tests/smoke_store.py), made once and
    read by test_dashboards and test_browser too: only refused and dry runs touch it here."""
    return finished_smoke_sweep(tmp_path_factory)


def test_the_post_processor_goes_on_when_its_standard_outputs_reader_ends(tmp_path,
                                                                          smoke_sweep):
    """`python -m dashboards.pareto ... | head -1`: the whole report was written, then the
    command failed "unexpectedly" (BrokenPipeError, exit 1). It says once on standard error
    that standard output closed, its lines go there, and it ends as it would have (exit 0)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dashboards.pareto", SWEEP, "--mlflow-uri", smoke_sweep.uri,
         "--parent-run", smoke_sweep.parent_run_id, "--out", str(tmp_path / "o"), "--no-log"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, err
    assert err.count("note: standard output was closed (its reader ended); the "
                     "post-processor goes on, its lines on standard error") == 1, err
    assert "report: " in err and "BrokenPipeError" not in err, err
    assert (tmp_path / "o" / "report.html").is_file()


def test_resume_refuses_a_run_started_with_other_settings(tmp_path, smoke_sweep):
    """--resume continues the latest run only with the same sweep file, seeds, overrides and
    tracking store: anything else is one line naming what differs."""
    # the run to resume: `SWEEP --smoke-test` into its own store, finished (exit 0; checked
    # where it is made)
    assert smoke_sweep.work.is_dir() and SWEEP == SMOKE_SWEEP
    started = [SWEEP, "--smoke-test", "--mlflow-uri", smoke_sweep.uri,
               "--storage", str(smoke_sweep.storage)]
    # the run and the dry run refuse alike (both plans check the fingerprint): each setting
    # in one of them, the tracking store in both
    for dry, extra, what in (([], ["--seeds", "2"], "--seeds"),
                             (["--dry-run"], ["--set", "epochs=2"], "--set overrides")):
        proc = run_cli(*started, "--resume", *extra, *dry, cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert f"was started with a different {what}" in proc.stderr
    for dry in ([], ["--dry-run"]):
        other = f"sqlite:///{tmp_path / 'other.db'}"
        proc = run_cli(SWEEP, "--smoke-test", "--resume", "--mlflow-uri", other, "--storage",
                       str(smoke_sweep.storage), *dry, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        # both stores named (redacted), not hidden: the user must see which one to pass
        assert (f"different tracking URI (--mlflow-uri) ({smoke_sweep.uri}, "
                f"now {other})") in proc.stderr, proc.stderr
        assert not (tmp_path / "other.db").exists()
    proc = run_cli(*started, "--resume", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # what the resume would run (it listed every trial, as if none had run)
    assert ": 3 of 3 trials finished there; the resume runs 0\n" in proc.stdout, proc.stdout


def test_an_unexpected_failure_is_one_line_naming_its_traceback_file(tmp_path):
    """An environment fault nobody validates (the data cache's folder of generated worlds is
    a file; the cache folder itself is checked by the plan since): one line with the exception
    and where its full traceback was written; exit 1."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "simulated").write_text("")
    proc = subprocess.run([sys.executable, str(REPO / "sweeps" / "run.py"),
                           *_smoke(tmp=tmp_path)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "ALIGNSWEEP_CACHE": str(cache)})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]  # Ray's INFO apart
    assert proc.stderr.strip().endswith(line)
    assert line.startswith("error: FileExistsError") and "full traceback: " in line
    log = Path(line.rsplit("full traceback: ", 1)[1].rstrip(")"))
    assert log.is_file() and "Traceback (most recent call last)" in log.read_text()


@pytest.mark.parametrize("name", ["exp one", "run #2 (50%41?)", "%2e%2e%2f%2e%2e%2fescaped"])
def test_a_sqlite_store_keeps_its_artifacts_beside_it(tmp_path, monkeypatch, name):
    """Two stores used from one folder used to share ./mlruns/<id> of that folder (MLflow's
    default); each store's experiments now keep theirs in mlruns/<experiment> beside the
    database, named as the experiment is: MLflow decoded %xx in a plain path, so "50%41"
    wrote under "50A" and "%2e%2e%2f..." outside mlruns/ (sweep names may hold both)."""
    from sweeps import tracking

    monkeypatch.chdir(tmp_path)
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        uri = f"sqlite:///{tmp_path / folder / 'x.db'}"
        run_id = tracking.start_parent(uri, name, {"sweep": "s"})
        client = MlflowClient(uri)
        client.log_text(run_id, "hello", "note.txt")
        exp = client.get_experiment_by_name(name)
        assert exp.artifact_location == (tmp_path / folder / "mlruns" / name).as_uri()
        assert (tmp_path / folder / "mlruns" / name / run_id / "artifacts" /
                "note.txt").read_text() == "hello"
        assert [p.name for p in (tmp_path / folder / "mlruns").iterdir()] == [name]
    # nothing anywhere else: not in the working folder's mlruns/, not above the stores
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_dir() and "mlruns" not in
                  p.relative_to(tmp_path).parts) == ["a", "b"]


def test_a_resumed_parent_keeps_its_tags_and_records_each_resume(tmp_path):
    """The parent keeps the tags of the invocation that created it; each resume adds a line
    naming its own commit and cluster to ``resumes`` (the latest RESUMES_KEPT lines)."""
    from sweeps import tracking

    uri = f"sqlite:///{tmp_path / 'x.db'}"
    first = {"sweep": "s", "mlflow.source.git.commit": "aaa", "ray": "local"}
    run_id = tracking.start_parent(uri, "exp", first)
    client = MlflowClient(uri)
    assert tracking.RESUMES_TAG not in client.get_run(run_id).data.tags
    for k in range(tracking.RESUMES_KEPT + 2):
        again = {**first, "mlflow.source.git.commit": f"c{k}", "code_modified": "true",
                 "ray": "10.0.0.1:6379"}
        assert tracking.start_parent(uri, "exp", again, reuse_run_id=run_id) == run_id
        tags = client.get_run(run_id).data.tags
        assert tags["mlflow.source.git.commit"] == "aaa" and tags["ray"] == "local"
        lines = tags[tracking.RESUMES_TAG].split("\n")
        assert len(lines) == min(k + 1, tracking.RESUMES_KEPT)
        assert re.fullmatch(rf"\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ commit=c{k}, "
                            rf"code_modified=true, ray=10\.0\.0\.1:6379", lines[-1]), lines[-1]
    assert lines[0].split(" ", 1)[1].startswith("commit=c2,")


def test_a_sweep_goes_on_when_its_standard_outputs_reader_ends(tmp_path):
    """`run.py ... | head -20`, or a log pipe that dies: the driver was ended at its next
    line, exit 1, the parent run FAILED and nothing said on standard error. It now says so
    there once and the sweep runs to its end, its lines on standard error."""
    proc = subprocess.Popen([sys.executable, str(REPO / "sweeps" / "run.py"),
                             *_smoke("--only", f"{SWEEP}-none-*", tmp=tmp_path)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    first = proc.stdout.readline()
    proc.stdout.close()  # the reader goes away after the first line
    err = proc.stderr.read()
    assert proc.wait(timeout=600) == 0, err[-3000:]
    assert first.startswith(f"{SWEEP}: smoke test"), first
    assert err.count("note: standard output was closed (its reader ended); the sweep goes "
                     "on, its lines on standard error") == 1, err[-3000:]
    assert "report: " in err and "Traceback" not in err, err[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (parent,) = [r for r in client.search_runs(
        [client.get_experiment_by_name(f"{SWEEP}-smoke").experiment_id])
        if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FINISHED"


def test_the_driver_lock_of_a_shared_storage_folder_opens_for_every_user(tmp_path):
    """One --storage folder shared by a lab: the first user's driver made the experiment's
    lock under its umask, and every other user's run of the sweep died opening it ("an
    unexpected error", exit 1). The lock is made rw for all; one made before that, which
    this user cannot open, is refused in one line naming it, its owner and the way on."""
    import pwd
    import stat
    import types

    from sweeps.execute import driver_lock
    from sweeps.plan import lock_file_problem

    plan = types.SimpleNamespace(storage=str(tmp_path), experiment="s-demo", sweep="s")
    old = os.umask(0o077)
    try:
        with driver_lock(plan):
            pass
    finally:
        os.umask(old)
    lock = tmp_path / "s-demo.lock"
    assert stat.S_IMODE(lock.stat().st_mode) == 0o666
    me = pwd.getpwuid(os.getuid()).pw_name
    assert lock_file_problem(lock) == (
        f"--storage {tmp_path}: its driver lock s-demo.lock is user {me}'s and this user "
        f"cannot open it; accepted: a --storage folder of your own, or the lock made "
        f"writable to the users who share the folder (chmod a+rw {lock}) while no driver "
        f"of it runs")


def test_a_resume_drops_tunes_missing_metrics_warning_of_trials_that_never_started():
    """Every --resume of a run interrupted before all its trials started printed Tune's
    "Failed to fetch metrics for N trial(s):" with one FileNotFoundError line per pending
    trial (its folder is made when it starts). Those lines go; a started trial's missing
    results are still named, and a warning naming only them is unchanged."""
    import logging

    from sweeps import execute

    log = logging.getLogger("ray.tune.analysis.experiment_analysis")
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    log.addHandler(handler)
    try:
        execute._drop_fetch_warnings({"s-max-a1-b1-s0", "s-min-a1-b1-s0"})

        def warn(*names):
            lines = [f"- {n}: FileNotFoundError('Could not fetch metrics for {n}: both "
                     f"result.json and progress.csv were not found at /x/{n}')" for n in names]
            log.warning("Failed to fetch metrics for %d trial(s):\n%s", len(names),
                        "\n".join(lines))

        warn("s-max-a1-b1-s0", "s-min-a1-b1-s0")  # only trials that never started: dropped
        warn("s-max-a1-b1-s0", "s-none-a0-b1-s0")  # one started trial's lost results: kept
        warn("s-none-a0-b1-s0")
        log.warning("something else")
    finally:
        log.removeHandler(handler)
        execute._drop_fetch_warnings(set())
    lost = ("- s-none-a0-b1-s0: FileNotFoundError('Could not fetch metrics for "
            "s-none-a0-b1-s0: both result.json and progress.csv were not found at "
            "/x/s-none-a0-b1-s0')")
    assert seen == [f"Failed to fetch metrics for 1 trial(s):\n{lost}"] * 2 + ["something else"]


def test_a_resume_fills_in_the_plan_tags_an_older_parent_lacks(tmp_path):
    """A parent made by an older version had no ``trials`` / ``planned`` tags: its report,
    and the report of every later --resume, counted only the trials that had a run ("4/6
    trials finished" of 9, the control condition unnamed). The resume adds the plan's tags
    the run lacks, and only those: the original's values stay, and its commit is not
    replaced by the resuming one's."""
    from records import SweepRunTags
    from sweeps import tracking

    uri = f"sqlite:///{tmp_path / 'x.db'}"
    old = {"sweep": "s", "scale": "demo", "mlflow.source.git.commit": "aaa", "seeds": "1"}
    run_id = tracking.start_parent(uri, "exp", old)
    plan_tags = SweepRunTags("s", scale="demo", seeds=2, trials=12,
                             planned={"s": 9, "s_shuffled": 3}, command="s --seeds 2").format()
    now = {**plan_tags, "mlflow.source.git.commit": "bbb", "code_modified": "true"}
    tracking.start_parent(uri, "exp", now, reuse_run_id=run_id, fill=plan_tags)
    tags = MlflowClient(uri).get_run(run_id).data.tags
    parsed = SweepRunTags.parse(tags)
    assert (parsed.trials, dict(parsed.planned)) == (12, {"s": 9, "s_shuffled": 3})
    assert parsed.command == "s --seeds 2" and tags["smoke"] == "false"
    assert tags["seeds"] == "1"  # recorded by the run's own start: kept
    assert tags["mlflow.source.git.commit"] == "aaa" and "code_modified" not in tags


def test_the_resumes_tag_stays_within_a_tag_values_length(tmp_path):
    """Capped by line count only, long lines (a cluster's address) overflowed the older
    stores' 5,000 characters, and MLflow 3 truncates a long value at its end: the newest
    line was the one lost."""
    from sweeps import tracking

    uri = f"sqlite:///{tmp_path / 'x.db'}"
    tags = {"sweep": "s", "mlflow.source.git.commit": "a" * 40}
    run_id = tracking.start_parent(uri, "exp", tags)
    for k in range(12):
        again = {**tags, "ray": f"cluster-{k}-" + "x" * 900}
        tracking.start_parent(uri, "exp", again, reuse_run_id=run_id)
        value = MlflowClient(uri).get_run(run_id).data.tags[tracking.RESUMES_TAG]
        assert len(value) <= tracking.RESUMES_CHARS
        assert f"ray=cluster-{k}-" in value.split("\n")[-1]


def test_drivers_starting_at_once_on_one_new_sqlite_store_all_open_it(tmp_path):
    """Two sweeps started together on one new SQLite file (MLflow creates its tables on the
    first call): the second died in the first's migration ("table _alembic_tmp_experiments
    already exists", exit 1). Three drivers' first calls, at once, each in its own process."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = ("import sys; from sweeps import tracking; "
            "print(tracking.start_parent(sys.argv[1], sys.argv[2], {'sweep': sys.argv[2]}))")
    procs = [subprocess.Popen([sys.executable, "-c", code, uri, f"sweep{i}-demo"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-1500:] for _, err in outs]
    client = MlflowClient(uri)
    for i, (out, _) in enumerate(outs):
        run = client.get_run(out.split()[-1])
        assert client.get_experiment(run.info.experiment_id).name == f"sweep{i}-demo"
    # Drivers arriving while the first is making the store (the file is there, not empty,
    # its tables half made): they took no lock and died ("Online migration expected to match
    # one row"), and a driver's plan called the store "another schema". Each waits, ready
    # (imported), for the file to appear, then opens it at once.
    late = tmp_path / "late.db"
    waiting = ("import pathlib, sys, time\n"
               "from sweeps import plan, tracking\n"
               "db = pathlib.Path(sys.argv[2])\n"
               "pathlib.Path(sys.argv[4]).touch()\n"
               "while not (db.is_file() and db.stat().st_size > 0): time.sleep(0.001)\n"
               "if sys.argv[3] == 'plan': print(plan._mlflow_uri(sys.argv[1]))\n"
               "else: print(tracking.start_parent(sys.argv[1], sys.argv[3], {'sweep': 'x'}))\n")
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    early = [subprocess.Popen([sys.executable, "-c", waiting, f"sqlite:///{late}", str(late),
                               what, str(flag)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for what, flag in zip(("late-demo", "plan"), ready)]
    deadline = time.time() + 120
    while not all(f.exists() for f in ready) and time.time() < deadline:
        time.sleep(0.05)
    first = subprocess.Popen([sys.executable, "-c", code, f"sqlite:///{late}", "first-demo"],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outs = [p.communicate(timeout=300) for p in (first, *early)]
    assert [p.returncode for p in (first, *early)] == [0, 0, 0], [e[-1500:] for _, e in outs]
    late_client = MlflowClient(f"sqlite:///{late}")
    assert {late_client.get_experiment(late_client.get_run(out.split()[-1]).info
                                       .experiment_id).name
            for out, _ in outs[:2]} == {"first-demo", "late-demo"}
    assert outs[2][0].strip() == f"sqlite:///{late}"
    # a store made already is opened without the lock (another user's lock file there must
    # not stand in the way of a shared store)
    from sweeps import tracking

    made = tmp_path / "shared" / "mlflow.db"
    made.parent.mkdir()
    MlflowClient(f"sqlite:///{made}").search_experiments()
    tracking.start_parent(f"sqlite:///{made}", "shared-demo", {"sweep": "shared"})
    assert not (made.parent / ".mlflow.db.lock").exists()


def test_an_artifact_store_this_machine_cannot_write_is_found_before_any_trial(tmp_path):
    """An experiment whose artifact location this machine cannot write (here one made
    elsewhere, under /proc): each trial found it, waited out the tracking flush (900 s by
    default) and the run ended 'FINISHED' without artifacts or report. The driver's first
    write, the sweep's files to the parent run, finds it: one line, the parent FAILED."""
    from sweeps.execute import _start_records

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_experiment(f"{SWEEP}-smoke", artifact_location="/proc/alignsweep-artifacts")
    plan = make_plan(build_parser().parse_args(
        [SWEEP, "--smoke-test", "--mlflow-uri", uri, "--storage", str(tmp_path / "ray")]))
    with pytest.raises(UsageError, match=rf"^--mlflow-uri {re.escape(uri)}: the artifact store "
                                         rf"of experiment {SWEEP}-smoke \(/proc/alignsweep-"
                                         rf"artifacts/.*\) cannot be written from this machine "
                                         rf"\(.*accepted: a server that serves artifacts"):
        _start_records(plan, tmp_path / "ray" / "run")
    (parent,) = client.search_runs([client.get_experiment_by_name(f"{SWEEP}-smoke")
                                    .experiment_id])
    assert parent.info.status == "FAILED"
    # where it can be written, the parent holds the sweep's file
    ok = make_plan(build_parser().parse_args(
        ["paper", "--smoke-test", "--mlflow-uri", uri, "--storage", str(tmp_path / "ray")]))
    parent_id, _ = _start_records(ok, tmp_path / "ray" / "run2")
    listed = {a.path for a in client.list_artifacts(parent_id, "sweep")}
    assert {"sweep/paper.toml", f"sweep/{SWEEP}.toml", "sweep/gabor_conv1.toml"} <= listed


def test_a_deleted_experiment_restored_by_a_new_run_is_said(tmp_path):
    """MLflow deletes an experiment's runs with it and restores them with it: a sweep run
    into an experiment deleted in the UI brought its old runs back without a word."""
    from sweeps import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    old = tracking.start_parent(uri, f"{SWEEP}-demo", {"sweep": SWEEP})
    client = MlflowClient(uri)
    client.delete_experiment(client.get_experiment_by_name(f"{SWEEP}-demo").experiment_id)
    said: list[str] = []
    tracking.start_parent(uri, f"{SWEEP}-demo", {"sweep": SWEEP}, say=said.append)
    assert said == [f"MLflow: experiment {SWEEP}-demo had been deleted; restored, with the runs "
                    f"it held (delete those in the UI, or use another --mlflow-uri, to keep "
                    f"this run apart from them)"]
    assert client.get_run(old).info.lifecycle_stage == "active"
    said.clear()
    tracking.start_parent(uri, f"{SWEEP}-demo", {"sweep": SWEEP}, say=said.append)
    assert said == []  # an active experiment: nothing to say


def test_an_experiment_another_driver_creates_meanwhile_is_used(tmp_path):
    """Two users' drivers making one new experiment on a shared store: between a driver's
    lookup (none yet) and its create, the other created it, and the create failed with
    RESOURCE_ALREADY_EXISTS (exit 1; 5 times in 7 at once). The driver now takes the one
    made. The other driver's create is made to land in that window: its lookup is the real
    one, answered before the other wrote."""
    from sweeps import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    lookup = client.get_experiment_by_name
    before = lookup("shared-demo")
    assert before is None
    theirs = MlflowClient(uri).create_experiment("shared-demo")
    looked = []

    class Late(MlflowClient):
        def get_experiment_by_name(self, name):  # the first lookup as it was answered
            looked.append(name)
            return before if len(looked) == 1 else lookup(name)

    assert tracking.experiment_id(Late(uri), "shared-demo") == theirs
    assert looked == ["shared-demo", "shared-demo"]  # looked, created (refused), looked again
    with pytest.raises(Exception, match="RESOURCE_ALREADY_EXISTS|already exists") as other:
        MlflowClient(uri).create_experiment("shared-demo")  # what the driver met
    assert "shared-demo" in str(other.value)


def test_address_auto_joins_only_a_cluster_started_to_be_shared(tmp_path, monkeypatch):
    """--address auto took Ray's legacy fallback, any Ray process running on this machine:
    a driver joined another driver's own local Ray, its trials queued behind that driver's
    and died when it ended (exit 1, no summary, the parent run left RUNNING). It now joins
    RAY_ADDRESS or the cluster the last `ray start` here announced, and otherwise names the
    instances it found and refuses."""
    from sweeps.plan import resolve_auto_address

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # where `ray start` writes its address
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code = ("import ray, sys, time\n"
            "ray.init(address='local', num_cpus=1, include_dashboard=False, "
            "object_store_memory=100_000_000)\n"
            "print(ray.get_runtime_context().gcs_address, flush=True)\n"
            "time.sleep(300)\n")
    other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True,
                             env={**os.environ, "RAY_TMPDIR": "/tmp"})
    try:
        gcs = other.stdout.readline().strip()
        assert gcs, "the other program's Ray did not start"
        with pytest.raises(UsageError, match=rf"^--address auto: no Ray cluster announced by "
                                             rf"`ray start` on this machine .*"
                                             rf"{re.escape(str(tmp_path))}/ray/ray_current_"
                                             rf"cluster\); Ray instance\(s\) running here that "
                                             rf"none announced: .*{re.escape(gcs)}"):
            resolve_auto_address()
    finally:
        other.kill()
        other.wait()
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("10.1.2.3:6379\n")  # `ray start`'s
    assert resolve_auto_address() == "10.1.2.3:6379"
    monkeypatch.setenv("RAY_ADDRESS", "10.9.9.9:6379")
    assert resolve_auto_address("RAY_ADDRESS") == "10.9.9.9:6379"


def test_a_plan_waits_for_a_driver_making_the_store_but_not_for_ever(tmp_path, monkeypatch):
    """A half-made store whose lock a driver holds: the plan waits (the driver may finish it),
    up to FIRST_OPEN_WAIT_S, then one line naming the lock (a stopped driver kept it: the dry
    run hung with no word)."""
    from filelock import FileLock

    from records.stores import first_open_lock_path
    from sweeps import plan as plan_module

    db = tmp_path / "mlflow.db"
    db.write_bytes(b"SQLite format 3\x00" + bytes(100))  # begun, not a store yet
    monkeypatch.setattr(plan_module, "FIRST_OPEN_WAIT_S", 1)
    held = FileLock(str(first_open_lock_path(db)))  # another driver's (another descriptor)
    held.acquire()
    try:
        t0 = time.monotonic()
        with pytest.raises(UsageError, match=rf"^--mlflow-uri sqlite:///{re.escape(str(db))}: a "
                                             rf"driver has held {re.escape(str(tmp_path))}/"
                                             r"\.mlflow\.db\.lock for 1 s while making this "
                                             r"store \(stopped, or stuck\?\)"):
            plan_module._mlflow_uri(f"sqlite:///{db}")
        assert 1 <= time.monotonic() - t0 < 30
    finally:
        held.release()
    with pytest.raises(UsageError, match="not a SQLite database|cannot be read"):
        plan_module._mlflow_uri(f"sqlite:///{db}")  # no one holds it: judged at once
