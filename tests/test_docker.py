"""docker/: the compose file validates, and everything it and the Dockerfile use exists."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sweeps.plan import make_plan
from sweeps.run import build_parser

yaml = pytest.importorskip("yaml")  # PyYAML comes with mlflow and ray

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker" / "compose.yaml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
SERVICES = {"mlflow", "ray-head", "ray-worker", "sweep"}
VENV_BIN = Path(sys.executable).parent


def _compose_cli() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"],
                                                 capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


def _interpolate(text: str) -> str:
    """Compose's ${VAR:-default} / ${VAR:?error} with no variable set: the default, or a
    placeholder for required ones."""
    text = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", text)
    return re.sub(r"\$\{[A-Z_]+:\?[^}]*\}", "placeholder", text)


def _services() -> dict:
    return yaml.safe_load(_interpolate(COMPOSE.read_text()))["services"]


def _commands(service: dict) -> list[list[str]]:
    """The programs a service runs, as argv lists (a `sh -c` script split at &&)."""
    command = service["command"]
    if isinstance(command, list) and command[:2] == ["sh", "-c"]:
        return [shlex.split(part) for part in command[2].split("&&")]
    return [command if isinstance(command, list) else shlex.split(command)]


def test_compose_config_validates(tmp_path):
    cli = _compose_cli()
    if cli is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose); "
                    "CI installs it")
    env = {**os.environ, "RAY_AUTH_TOKEN": "test-token"}
    out = subprocess.run([*cli, "-f", str(COMPOSE), "config"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    config = yaml.safe_load(out.stdout)
    assert set(config["services"]) == SERVICES
    for name, service in config["services"].items():
        for port in service.get("ports", []):  # published on the loopback only
            host_ip = port["host_ip"] if isinstance(port, dict) else str(port).split(":")[0]
            assert host_ip == "127.0.0.1", (name, port)
        if name.startswith("ray") or name == "sweep":
            assert service["environment"]["RAY_AUTH_MODE"] == "token"
            assert service["environment"]["RAY_AUTH_TOKEN"] == "test-token"
    # Ray's token is required: without it compose refuses, naming the variable.
    env.pop("RAY_AUTH_TOKEN")
    empty = tmp_path / "empty.env"  # not the developer's docker/.env
    empty.write_text("")
    out = subprocess.run([*cli, "--env-file", str(empty), "-f", str(COMPOSE), "config"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode != 0 and "RAY_AUTH_TOKEN" in out.stderr


def test_health_checks_and_start_order():
    services = _services()
    assert set(services) == SERVICES
    for name in ("mlflow", "ray-head"):
        assert services[name]["healthcheck"]["test"][0] == "CMD"
    assert services["sweep"]["depends_on"] == {"mlflow": {"condition": "service_healthy"},
                                               "ray-head": {"condition": "service_healthy"}}
    assert services["ray-worker"]["depends_on"]["ray-head"]["condition"] == "service_healthy"
    assert "container_name" not in services["ray-worker"]  # --scale needs unnamed containers
    assert "ports" not in services["ray-worker"]


def test_the_sweep_command_is_accepted_by_run_py():
    runs = [argv for argv in _commands(_services()["sweep"]) if "sweeps/run.py" in argv]
    assert len(runs) == 1
    argv = runs[0][runs[0].index("sweeps/run.py") + 1:]
    assert (REPO / "sweeps" / "run.py").is_file()
    args = build_parser().parse_args(argv)
    assert (args.sweep, args.address, args.mlflow_uri) == ("nsd_conv1_v1", "ray-head:6379",
                                                           "http://mlflow:5000")
    plan = make_plan(args)  # the sweep, the address, the URI and the storage all validate
    assert plan.n_trials == 9 and plan.storage == "/ray_results"


def test_every_program_and_option_the_compose_file_runs_exists():
    """ray and mlflow are the project's own console scripts; each --option used is one that
    their installed versions document."""
    wanted: dict[tuple[str, ...], set[str]] = {}
    for service in _services().values():
        for argv in _commands(service):
            argv = argv[1:] if argv[0] == "exec" else argv
            if argv[0] == "python":
                continue  # checked by test_the_sweep_command_is_accepted_by_run_py
            assert (VENV_BIN / argv[0]).is_file(), f"{argv[0]} is not installed by the project"
            sub = tuple(argv[:2])
            wanted.setdefault(sub, set()).update(
                a.split("=", 1)[0] for a in argv if a.startswith("--"))
        test = service.get("healthcheck", {}).get("test", [])
        if test[1:3] == ["python", "-c"]:
            compile(test[3], "healthcheck", "exec")
        elif test:
            assert (VENV_BIN / test[1]).is_file(), test
            wanted.setdefault(tuple(test[1:3]), set()).update(
                a for a in test if a.startswith("--"))
    assert set(wanted) == {("ray", "start"), ("ray", "status"), ("mlflow", "server")}
    procs = {sub: subprocess.Popen([str(VENV_BIN / sub[0]), *sub[1:], "--help"],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for sub in wanted}
    for sub, proc in procs.items():
        help_text, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, help_text
        for option in wanted[sub]:
            assert re.search(rf"{re.escape(option)}\b", help_text), (sub, option)


def test_dockerfile_copies_what_exists_and_pins_what_pyproject_allows():
    from packaging.requirements import Requirement

    text = DOCKERFILE.read_text()
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    copies = re.findall(r"^COPY\s+(?!--from)(.+)$", text, flags=re.M)
    assert copies
    for line in copies:
        *sources, _dest = line.split()
        for src in sources:
            assert (REPO / src).exists(), f"COPY {src}: no such path in the repository"
            assert src.rstrip("/") not in ignored, f"COPY {src} is excluded by .dockerignore"
    import tomllib

    deps = {Requirement(d).name: Requirement(d)
            for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
                "dependencies"]}
    for name, version in re.findall(r"\b(torch|torchvision)==([\w.]+)", text):
        assert deps[name].specifier.contains(version), (name, version)
    args = set(re.findall(r"^ARG\s+(\w+)", text, flags=re.M))
    for service in _services().values():
        assert set(service["build"]["args"]) <= args
