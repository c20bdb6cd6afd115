"""docker/: the compose file validates, everything it and the Dockerfile use exists, no value
reaches a shell, MLflow asks for credentials, every container has a memory limit, and the
image's base and packages are pinned to what the tests ran against."""

import ast
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from tools import missing

from sweeps.plan import make_plan
from sweeps.run import build_parser

yaml = pytest.importorskip("yaml")  # PyYAML comes with mlflow and ray

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker" / "compose.yaml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
CONSTRAINTS = REPO / "docker" / "constraints.txt"
ENV_EXAMPLE = REPO / "docker" / ".env.example"
SERVICES = {"mlflow", "ray-head", "ray-worker", "sweep"}
MLFLOW_CLIENTS = {"ray-head", "ray-worker", "sweep"}  # the driver, and trials on every node
SECRETS = {"RAY_AUTH_TOKEN": "test-token", "MLFLOW_TRACKING_USERNAME": "test-user",
           "MLFLOW_TRACKING_PASSWORD": "test-password-0123",
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-csrf-key"}
VENV_BIN = Path(sys.executable).parent
SHELLS = {"sh", "bash", "dash", "ash", "zsh", "/bin/sh", "/bin/bash", "/usr/bin/env"}
IMAGE_ROOT = "/app"  # the Dockerfile's WORKDIR: docker/x in the repository is /app/docker/x


def _load(name: str):
    """A script of docker/ as a module (docker/ is no package: the image copies single files)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "docker" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ON_RAY_NODE = _load("on_ray_node")
FREEZE = _load("freeze_constraints")


def _compose_cli() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"],
                                                 capture_output=True, check=False).returncode == 0:
        return ["docker", "compose"]
    return None


def _compose_config(tmp_path, **env: str) -> subprocess.CompletedProcess:
    """`compose config` with exactly ``env`` as the variables (never the developer's
    docker/.env): the file as compose itself reads it."""
    cli = _compose_cli()
    if cli is None:
        missing("docker-compose is not installed (apt-get install docker-compose); "
                "CI installs it")
    empty = tmp_path / "empty.env"
    empty.write_text("")
    base = {k: v for k, v in os.environ.items() if k not in SECRETS}
    return subprocess.run([*cli, "--env-file", str(empty), "-f", str(COMPOSE), "config"],
                          capture_output=True, text=True, env={**base, **env}, timeout=120,
                          check=False)


def _rendered(tmp_path, **env: str) -> dict:
    out = _compose_config(tmp_path, **{**SECRETS, **env})
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)["services"]


def _interpolate(text: str) -> str:
    """Compose's ${VAR:-default} / ${VAR:?error} with no variable set: the default, or a
    placeholder for required ones."""
    text = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", text)
    return re.sub(r"\$\{[A-Z_]+:\?[^}]*\}", "placeholder", text)


def _services() -> dict:
    return yaml.safe_load(_interpolate(COMPOSE.read_text()))["services"]


def _argv(service: dict) -> list[str]:
    """What a container runs: the entrypoint, then the command (the image has no ENTRYPOINT)."""
    def as_list(value) -> list[str]:
        return value if isinstance(value, list) else shlex.split(value) if value else []
    return as_list(service.get("entrypoint")) + as_list(service.get("command"))


def _commands(service: dict) -> list[list[str]]:
    """The programs a service runs, as argv lists: docker/on_ray_node.py runs `ray start`
    with the options before its `--`, then the program after it."""
    argv = _argv(service)
    if argv[:2] == ["python", "docker/on_ray_node.py"]:
        options, program = ON_RAY_NODE.split_argv(argv[2:])
        return [["ray", "start", *options], program]
    return [argv]


def _bytes(size: str) -> int:
    """A compose size ("2g", "2gb", "512m", "1000000000") in bytes (binary multiples)."""
    match = re.fullmatch(r"(\d+)([kmgt]?)b?", str(size).strip().lower())
    assert match, f"not a compose size: {size!r}"
    return int(match[1]) * 1024 ** " kmgt".index(match[2] or " ")


def _image_path(path: str) -> Path:
    """The repository file that the image holds at ``path``."""
    assert path.startswith(IMAGE_ROOT + "/"), path
    return REPO / path.removeprefix(IMAGE_ROOT + "/")


def test_compose_config_validates(tmp_path):
    config = _rendered(tmp_path)
    assert set(config) == SERVICES
    for name, service in config.items():
        for port in service.get("ports", []):  # published on the loopback only
            host_ip = port["host_ip"] if isinstance(port, dict) else str(port).split(":")[0]
            assert host_ip == "127.0.0.1", (name, port)
        if name.startswith("ray") or name == "sweep":
            assert service["environment"]["RAY_AUTH_MODE"] == "token"
            assert service["environment"]["RAY_AUTH_TOKEN"] == "test-token"


@pytest.mark.parametrize("name", sorted(SECRETS))
def test_every_secret_is_required(tmp_path, name):
    """Without it compose refuses, naming the variable; an empty value counts as unset."""
    for value in (None, ""):
        env = {k: v for k, v in SECRETS.items() if k != name}
        if value is not None:
            env[name] = value
        out = _compose_config(tmp_path, **env)
        assert out.returncode != 0 and name in out.stderr, (name, value, out.stderr)


def test_env_example_lists_every_required_variable_and_its_one_liner_fills_them():
    required = set(re.findall(r"\$\{([A-Z_]+):\?", COMPOSE.read_text()))
    assert required == set(SECRETS)
    example = ENV_EXAMPLE.read_text()
    listed = dict(re.findall(r"^([A-Z_]+)=(.*)$", example, flags=re.MULTILINE))
    assert required <= set(listed)
    for name in required & {"RAY_AUTH_TOKEN", "MLFLOW_TRACKING_PASSWORD",
                            "MLFLOW_FLASK_SERVER_SECRET_KEY"}:
        assert listed[name] == "", f"{name}: a copied example must not carry a known secret"
    # The generator in .env.example is the one the compose header shows, and it writes every
    # required variable, with a password MLflow accepts (>= 12 characters).
    generators = re.findall(r"^#\s+(python3 -c .*) > docker/\.env$", example, flags=re.MULTILINE)
    assert len(generators) == 1 and generators[0] in COMPOSE.read_text()
    assert f"{generators[0]} > docker/.env" in (REPO / "README.md").read_text()
    _python3, *args = shlex.split(generators[0])
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=True)
    written = dict(line.split("=", 1) for line in out.stdout.splitlines())
    assert set(written) == required | {"COMPOSE_PROJECT_NAME"} and all(written.values())
    assert len(written["MLFLOW_TRACKING_PASSWORD"]) >= 12
    # the project's name prefixes its volumes: not "docker" (the compose file's folder), which
    # any other project kept in a docker/ folder would share
    assert written["COMPOSE_PROJECT_NAME"] == listed["COMPOSE_PROJECT_NAME"] == "alignsweep"


def test_env_example_names_every_variable_the_compose_files_read():
    """Each ${VAR} of compose.yaml and compose.gpu.yaml is in .env.example (set or in a
    comment), and .env.example names no variable the files do not read (compose's own
    COMPOSE_PROJECT_NAME apart)."""
    text = COMPOSE.read_text() + (REPO / "docker" / "compose.gpu.yaml").read_text()
    read = set(re.findall(r"\$\{([A-Z_]+)", text))
    example = ENV_EXAMPLE.read_text()
    named = set(re.findall(r"^#?\s?([A-Z][A-Z_]+)=", example, flags=re.MULTILINE))
    assert read - named == set(), "not in .env.example"
    assert named - read == {"COMPOSE_PROJECT_NAME"}, "in .env.example, read by nothing"


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


def test_no_service_runs_a_shell():
    """Exec form everywhere: a string command would be split by compose, and `sh -c` would run
    whatever shell code a variable or an argument holds."""
    assert not re.search(r"^\s*ENTRYPOINT", DOCKERFILE.read_text(), flags=re.MULTILINE)
    for name, service in _services().items():
        for key in ("entrypoint", "command"):
            assert isinstance(service.get(key, []), list), f"{name}.{key} is not exec form"
        for argv in _commands(service):
            assert argv[0] not in SHELLS and "-c" not in argv[:2], (name, argv)


def test_a_hostile_value_stays_one_argument(tmp_path):
    """What compose substitutes lands in one argv element, as given; nothing else changes."""
    hostile = "1; touch /tmp/pwned && `id`"  # no $: `config` prints $ as $$, its own escape
    plain = _rendered(tmp_path)
    config = _rendered(tmp_path, RAY_OBJECT_STORE_MEMORY=hostile,
                       MLFLOW_TRACKING_PASSWORD="`touch /tmp/pwned`; x")
    for name in ("ray-head", "ray-worker", "sweep"):
        before, after = _argv(plain[name]), _argv(config[name])
        assert len(after) == len(before), name
        changed = [(b, a) for b, a in zip(before, after) if b != a]
        assert changed == [("--object-store-memory=1000000000",
                            f"--object-store-memory={hostile}")], name
    assert config["sweep"]["environment"]["MLFLOW_TRACKING_PASSWORD"] == "`touch /tmp/pwned`; x"


def _fake_ray(tmp_path, status: int) -> dict[str, str]:
    """A `ray` on PATH that records its arguments and exits with ``status``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ray = bin_dir / "ray"
    ray.write_text(f"#!{sys.executable}\nimport json, sys\n"
                   f"open({str(tmp_path / 'ray.json')!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
                   f"sys.exit({status})\n")
    ray.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def test_the_sweep_entrypoint_passes_user_arguments_through_unchanged(tmp_path):
    """`run --rm sweep ARGS` appends ARGS to the entrypoint: on_ray_node.py joins Ray with the
    compose file's options, then execs the program with ARGS as given (a stand-in for
    sweeps/run.py here, which prints its argv)."""
    argv = _argv(_services()["sweep"])
    assert argv[:2] == ["python", "docker/on_ray_node.py"]
    options, _program = ON_RAY_NODE.split_argv(argv[2:])
    pwned = tmp_path / "pwned"
    user_args = [f"x; touch {pwned}", f"$(touch {pwned})", "--seeds", "2", "--", "-c"]
    echo = [sys.executable, "-c", "import json, sys; print(json.dumps(sys.argv[1:]))"]
    cmd = [sys.executable, str(REPO / "docker" / "on_ray_node.py"), *options, "--", *echo,
           *user_args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_fake_ray(tmp_path, 0),
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == user_args
    assert json.loads((tmp_path / "ray.json").read_text()) == ["start", *options]
    assert not pwned.exists()


def test_the_sweep_does_not_start_when_ray_start_fails(tmp_path):
    marker = tmp_path / "ran"
    cmd = [sys.executable, str(REPO / "docker" / "on_ray_node.py"), "--address=nowhere:1",
           "--", sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_fake_ray(tmp_path, 3),
                         timeout=60, check=False)
    assert out.returncode != 0 and "exited with 3" in out.stderr
    assert not marker.exists()
    with pytest.raises(SystemExit, match="no `--` before the program"):
        ON_RAY_NODE.split_argv(["--address=x", "python"])
    with pytest.raises(SystemExit, match="no program after"):
        ON_RAY_NODE.split_argv(["--address=x", "--"])


def test_the_sweep_command_is_accepted_by_run_py():
    runs = [argv for argv in _commands(_services()["sweep"]) if "sweeps/run.py" in argv]
    assert len(runs) == 1
    argv = runs[0][runs[0].index("sweeps/run.py") + 1:]
    assert (REPO / "sweeps" / "run.py").is_file()
    args = build_parser().parse_args(argv)
    assert (args.sweep, args.address, args.mlflow_uri) == ("nsd_conv1_v1", "ray-head:6379",
                                                           "http://mlflow:5000")
    plan = make_plan(args)  # the sweep, the address, the URI and the storage all validate
    assert plan.storage == "/ray_results"
    # The cluster options change where the sweep runs, not what it runs.
    assert plan.n_trials == make_plan(build_parser().parse_args(["nsd_conv1_v1"])).n_trials
    # What the README shows: the user's arguments replace the default command.
    user = build_parser().parse_args([*argv[:-1], "nsd_conv1_v1", "--seeds", "2"])
    assert (user.sweep, user.seeds, user.address) == ("nsd_conv1_v1", 2, "ray-head:6379")


def test_every_program_and_option_the_compose_file_runs_exists():
    """ray and mlflow are the project's own console scripts; each --option used is one that
    their installed versions document."""
    wanted: dict[tuple[str, ...], set[str]] = {}
    for service in _services().values():
        for argv in _commands(service):
            if argv[0] == "python":
                continue  # checked by test_the_sweep_command_is_accepted_by_run_py
            assert (VENV_BIN / argv[0]).is_file(), f"{argv[0]} is not installed by the project"
            sub = tuple(argv[:2])
            wanted.setdefault(sub, set()).update(
                a.split("=", 1)[0] for a in argv if a.startswith("--") and a != "--")
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
        if sub == ("mlflow", "server"):  # the app is one this mlflow offers
            assert re.search(r"--app-name \[[^]]*\bbasic-auth\b", help_text), help_text


# mlflow.server.auth's own reader of the config file and the environment, loaded from its files:
# importing the package runs the app module, which needs Flask-WTF (only the image has it).
_READ_AUTH_CONFIG = """
import importlib.util, json, sys
from pathlib import Path
import mlflow
auth = Path(mlflow.__file__).parent / "server" / "auth"
def load(name):
    spec = importlib.util.spec_from_file_location(f"auth_{name}", auth / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
config = load("config").read_auth_config()
load("permissions").get_permission(config.default_permission)  # KeyError if not one
print(json.dumps(config._asdict()))
"""


def test_mlflow_asks_for_credentials_that_every_client_has(tmp_path):
    services = _rendered(tmp_path)
    mlflow = services["mlflow"]
    argv = _argv(mlflow)
    assert argv[argv.index("--app-name") + 1] == "basic-auth"
    assert argv[argv.index("--workers") + 1] == "1" and "--allowed-hosts" in argv
    env = mlflow["environment"]
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    # The basic-auth app of the pinned MLflow refuses to start without its CSRF key (read from
    # the installed source, as below: the app itself needs Flask-WTF, which only the image
    # has); the stack never started while compose did not set it.
    auth_source = (Path(importlib.util.find_spec("mlflow").origin).parent / "server" / "auth"
                   / "__init__.py").read_text()
    assert "A static secret key needs to be set" in auth_source
    assert "MLFLOW_FLASK_SERVER_SECRET_KEY" in auth_source
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == SECRETS["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    # The server's admin is the user the clients log in as, both from docker/.env.
    assert (env["MLFLOW_AUTH_ADMIN_USERNAME"], env["MLFLOW_AUTH_ADMIN_PASSWORD"]) == (
        SECRETS["MLFLOW_TRACKING_USERNAME"], SECRETS["MLFLOW_TRACKING_PASSWORD"])
    for name in MLFLOW_CLIENTS:
        client = services[name]["environment"]
        assert {k: client.get(k) for k in ("MLFLOW_TRACKING_USERNAME",
                                           "MLFLOW_TRACKING_PASSWORD")} == {
            k: SECRETS[k] for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}, name
    # The auth config is a checked-in file the image holds, with no secret in it.
    config = _image_path(env["MLFLOW_AUTH_CONFIG_PATH"])
    assert config.is_file()
    assert not re.search(r"^\s*admin_(username|password)\s*=", config.read_text(),
                         flags=re.MULTILINE)
    dockerfile = DOCKERFILE.read_text()
    assert re.search(rf"^COPY .*\s{re.escape(str(config.relative_to(REPO)))}$", dockerfile,
                     flags=re.MULTILINE)
    assert '"mlflow[auth]"' in dockerfile  # Flask-WTF: the basic-auth app imports it
    # MLflow itself reads the file and the environment as compose sets them: the admin comes
    # from the environment, the user store sits on the mlflow-data volume.
    out = subprocess.run([sys.executable, "-c", _READ_AUTH_CONFIG], capture_output=True,
                         text=True, timeout=120, check=False,
                         env={**os.environ, **env, "MLFLOW_AUTH_CONFIG_PATH": str(config)})
    assert out.returncode == 0, out.stderr
    read = json.loads(out.stdout)
    assert (read["admin_username"], read["admin_password"]) == (
        SECRETS["MLFLOW_TRACKING_USERNAME"], SECRETS["MLFLOW_TRACKING_PASSWORD"])
    volume = next(v.split(":")[1] for v in mlflow["volumes"] if v.startswith("mlflow-data:"))
    assert read["database_uri"].startswith(f"sqlite:///{volume}/"), read["database_uri"]


def test_the_health_check_needs_no_credentials():
    """The basic-auth app leaves /health open (read from the installed source: importing the
    app needs Flask-WTF, which only the image installs)."""
    test = _services()["mlflow"]["healthcheck"]["test"]
    assert re.search(r"http://localhost:5000/health\b", test[3])
    # find_spec of the top-level package imports nothing; mlflow.server would import a lot.
    mlflow_dir = Path(importlib.util.find_spec("mlflow").origin).parent
    source = (mlflow_dir / "server" / "auth" / "__init__.py").read_text()
    prefixes = re.search(r"^_UNPROTECTED_PATH_PREFIXES = (\(.*?\))$", source, flags=re.MULTILINE)
    assert prefixes and "/health" in ast.literal_eval(prefixes[1])


def test_every_container_has_a_configurable_memory_limit_that_holds_its_object_store(tmp_path):
    raw = yaml.safe_load(COMPOSE.read_text())["services"]
    for name, service in raw.items():
        assert re.fullmatch(r"\$\{[A-Z_]+_MEM_LIMIT:-[0-9]+[kmg]b?\}",
                            str(service.get("mem_limit"))), (name, service.get("mem_limit"))
    config = _rendered(tmp_path)
    for name, service in config.items():
        limit = _bytes(service["mem_limit"])
        assert limit >= 1 << 30, (name, service["mem_limit"])
        starts = [argv for argv in _commands(service) if argv[:2] == ["ray", "start"]]
        for argv in starts:
            store = int(next(a for a in argv if a.startswith("--object-store-memory="))
                        .split("=", 1)[1])
            # The object store lives in /dev/shm, which the container's limit also counts.
            assert store < _bytes(service["shm_size"]) < limit, (name, store, service)
            assert limit - store >= 2 << 30, f"{name}: < 2 GiB besides the object store"
    assert _bytes(_rendered(tmp_path, MLFLOW_MEM_LIMIT="1g")["mlflow"]["mem_limit"]) == 1 << 30


def test_the_base_image_is_pinned_by_version_and_digest():
    dockerfile = DOCKERFILE.read_text()
    default = re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, flags=re.MULTILINE)[1]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", default)
    froms = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.MULTILINE)
    assert froms == ["${BASE_IMAGE}"]
    # Compose always passes the argument, so its default must be the same pinned image.
    args = yaml.safe_load(_interpolate(COMPOSE.read_text()))["x-image"]["build"]["args"]
    assert args["BASE_IMAGE"] == default


def _pins(test_tools: dict[str, str] | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """docker/constraints.txt as (from the environment, image only): {name: version}; the
    test tools' section into ``test_tools`` when given."""
    env: dict[str, str] = {}
    image_only: dict[str, str] = {}
    tools: dict[str, str] = {} if test_tools is None else test_tools
    current = env
    for line in CONSTRAINTS.read_text().splitlines():
        if line.startswith(FREEZE.IMAGE_ONLY_HEADER):
            current = image_only
        if line.startswith(FREEZE.TEST_HEADER):
            current = tools
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.]+)", line)
        assert match, f"constraints.txt: {line!r} is not an exact pin NAME==VERSION"
        name = canonicalize_name(match[1])
        assert name not in env and name not in image_only and name not in tools, \
            f"{name} pinned twice"
        current[name] = match[2]
    assert env and image_only
    return env, image_only


def test_constraints_pin_exactly_what_the_tested_environment_has():
    """Every package pyproject's dependencies need is pinned at the version installed here (a
    new dependency, or an upgrade, without `python docker/freeze_constraints.py` fails)."""
    tools: dict[str, str] = {}
    env, image_only = _pins(tools)
    closure = FREEZE.dependency_closure(FREEZE.project_dependencies())
    assert set(env) == set(closure), (set(env) ^ set(closure))
    assert env == closure
    # CI's pytest and ruff are pinned too (a new release cannot change what CI runs)
    assert tools == FREEZE.test_tools(env) and {"pytest", "ruff"} <= set(tools)
    for name, version in {**env, **image_only}.items():
        assert not FREEZE.CUDA_ONLY.match(name), f"{name}: CUDA build only"
        try:
            installed = Version(importlib.metadata.version(name)).public
        except importlib.metadata.PackageNotFoundError:
            assert name in image_only, f"{name} is pinned but not installed here"
            continue
        assert installed == version, (name, version, installed)
    deps = {canonicalize_name(Requirement(d).name): Requirement(d)
            for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
                "dependencies"]}
    for name, requirement in deps.items():
        assert requirement.specifier.contains(env[name]), (name, env[name])
    # The CPU index names its builds 2.14.1+cpu: a pin without a local label matches them.
    assert "+" not in env["torch"] and "+" not in env["torchvision"]


def test_the_dockerfile_installs_everything_under_the_constraints():
    text = DOCKERFILE.read_text()
    workdir = re.search(r"^WORKDIR\s+(\S+)$", text, flags=re.MULTILINE)[1]
    assert workdir == IMAGE_ROOT
    copy = re.search(r"^COPY\s+docker/constraints\.txt\s+(\S+)$", text, flags=re.MULTILINE)
    assert copy, "the Dockerfile does not copy docker/constraints.txt"
    in_image = f"{workdir}/{copy[1]}"
    # PIP_CONSTRAINT, unlike `pip install -c`, also reaches pip's isolated build environment.
    env = re.search(r"^ENV\s[^\n]*?(?:\\\n[^\n]*?)*\bPIP_CONSTRAINT=(\S+)", text,
                    flags=re.MULTILINE)
    assert env and env[1] == in_image
    installs = [m.start() for m in re.finditer(r"^[ \t]*(?:&&[ \t]*)?pip install\b", text,
                                               flags=re.MULTILINE)]
    assert installs and min(installs) > copy.start()
    # The extras the image adds are the ones the constraints were resolved with.
    extras = re.findall(r'"([a-z]+\[[a-z]+\])"', text)
    assert sorted(extras) == sorted(FREEZE.IMAGE_EXTRAS)
    assert len(installs) == 2 and not re.search(r"pip install\b[^\n]*==", text), \
        "pins belong in constraints.txt"


def test_dockerfile_copies_what_exists():
    text = DOCKERFILE.read_text()
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    copies = re.findall(r"^COPY\s+(?!--from)(.+)$", text, flags=re.MULTILINE)
    assert copies
    for line in copies:
        *sources, _dest = line.split()
        for src in sources:
            assert (REPO / src).exists(), f"COPY {src}: no such path in the repository"
            assert src.rstrip("/") not in ignored, f"COPY {src} is excluded by .dockerignore"
    args = set(re.findall(r"^ARG\s+(\w+)", text, flags=re.MULTILINE))
    for service in _services().values():
        assert set(service["build"]["args"]) <= args


def test_the_image_holds_every_package_the_project_installs():
    """records/ was added after the Dockerfile's last change: the image had no such package,
    so every compose sweep failed on its first import. Each package setuptools finds is an
    empty package before the dependency install (so the editable install maps it) and is
    copied in afterwards."""
    from setuptools import find_packages

    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]["find"]["include"]
    top = sorted({p.split(".")[0] for p in find_packages(str(REPO), include=include)})
    assert "records" in top and "sweeps" in top
    text = DOCKERFILE.read_text()
    loop = re.search(r"for p in ([\w ]+); do", text)[1].split()
    assert sorted(loop) == top
    for name in top:
        assert re.search(rf"^COPY {name}/ {name}/$", text, flags=re.MULTILINE), name


def test_the_sweep_writes_its_report_where_its_user_may_write_and_it_is_kept():
    """The driver runs in /app (root's, from WORKDIR) as the image's unprivileged user, and
    the post-processor writes to outputs/ beside it: the report was never written ("report
    not written", exit 0). /app/outputs is made and owned by that user, and a named volume
    keeps it after `run --rm`."""
    text = DOCKERFILE.read_text()
    user = re.search(r"^USER\s+(\S+)$", text, flags=re.MULTILINE)[1]
    owned = re.search(rf"chown {user}:{user} ([^\n]+)$", text, flags=re.MULTILINE)[1].split()
    sweep = _services()["sweep"]
    assert sweep.get("working_dir", IMAGE_ROOT) == IMAGE_ROOT
    named_volumes = set(yaml.safe_load(COMPOSE.read_text())["volumes"])
    mounts = {v.split(":")[1]: v.split(":")[0] for v in sweep["volumes"]
              if v.split(":")[0] in named_volumes}  # not the read-only bind mount of /data
    assert f"{IMAGE_ROOT}/outputs" in mounts and f"{IMAGE_ROOT}/outputs" in owned
    # every named volume of the sweep mounts on a folder that user owns
    assert set(mounts) <= set(owned), set(mounts) - set(owned)
    # the post-processor's default folder is relative to the driver's: /app/outputs/...
    from types import SimpleNamespace

    from dashboards.pareto import _default_out

    out = _default_out(SimpleNamespace(experiment="nsd_conv1_v1-demo", label="run"))
    assert not out.is_absolute() and out.parts[0] == "outputs"


def test_each_ray_node_offers_its_own_share_of_the_host(tmp_path):
    """Every container of one host sees all its cores, and `ray start` counts them per node:
    a head and two workers offered three times the host's CPUs to the trials. Each node
    offers what docker/.env gives it; workers never offer GPUs."""
    def ray_start(config, name):
        (argv,) = [a for a in _commands(config[name]) if a[:2] == ["ray", "start"]]
        return argv

    config = _rendered(tmp_path)
    assert "--num-cpus=2" in ray_start(config, "ray-head")
    assert {"--num-cpus=2", "--num-gpus=0"} <= set(ray_start(config, "ray-worker"))
    assert {"--num-cpus=0", "--num-gpus=0"} <= set(ray_start(config, "sweep"))  # the driver
    config = _rendered(tmp_path, RAY_HEAD_CPUS="16", RAY_WORKER_CPUS="4")
    assert "--num-cpus=16" in ray_start(config, "ray-head")
    assert "--num-cpus=4" in ray_start(config, "ray-worker")
    for name in ("ray-head", "ray-worker"):
        assert len([a for a in ray_start(config, name) if a.startswith("--num-cpus")]) == 1


def test_real_data_is_at_the_same_path_on_every_node(tmp_path):
    """The driver checks --nsd-root / --imagenet-root / --weights where it runs, and the
    trials read them on every node: one host folder (ALIGNSWEEP_DATA) is /data, read-only, in
    the sweep job and every Ray node, and torch's hub cache (torchvision's weight files at
    paper scale) is its torch/ folder."""
    def at_data(service):
        return [v for v in service.get("volumes", [])
                if (v["target"] if isinstance(v, dict) else v.split(":")[1]) == "/data"]

    for env, source in (({}, str(REPO / "data")), ({"ALIGNSWEEP_DATA": str(tmp_path)},
                                                   str(tmp_path))):
        config = _rendered(tmp_path, **env)
        for name in ("ray-head", "ray-worker", "sweep"):
            (mount,) = at_data(config[name])
            if isinstance(mount, dict):
                assert mount["source"] == source and mount.get("read_only"), (name, mount)
            else:
                assert mount == f"{source}:/data:ro", (name, mount)
            assert config[name]["environment"]["TORCH_HOME"] == "/data/torch", name
        assert at_data(config["mlflow"]) == []


def test_the_gpu_override_gives_the_head_the_gpus_and_cuda_wheels(tmp_path):
    """compose.yaml alone gives no container a GPU (Ray then sees none and the driver runs
    trials on the CPU); docker/compose.gpu.yaml on top of it reserves the host's GPUs for the
    Ray head alone (every container of a host would see the same GPUs, and Ray count each
    once per node) and builds the image from the same pinned base with CUDA wheels."""
    cli = _compose_cli()
    if cli is None:
        missing("docker-compose is not installed (apt-get install docker-compose); "
                "CI installs it")
    env_file = tmp_path / "secrets.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in SECRETS.items()))
    base = {k: v for k, v in os.environ.items() if k not in SECRETS}
    out = subprocess.run([*cli, "--env-file", str(env_file), "-f", str(COMPOSE), "-f",
                          str(REPO / "docker" / "compose.gpu.yaml"), "config"],
                         capture_output=True, text=True, env=base, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    assert set(services) == SERVICES
    pinned = re.search(r"^ARG BASE_IMAGE=(\S+)$", DOCKERFILE.read_text(), flags=re.MULTILINE)[1]
    for name, service in services.items():
        devices = (service.get("deploy") or {}).get("resources", {}).get(
            "reservations", {}).get("devices", [])
        if name == "ray-head":
            assert devices and devices[0]["driver"] == "nvidia", name
            assert devices[0]["count"] == "all" and "gpu" in devices[0]["capabilities"]
            assert service["environment"]["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
        else:
            assert not devices, name
        assert service["build"]["args"]["BASE_IMAGE"] == pinned
        assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+",
                            service["build"]["args"]["TORCH_INDEX_URL"])
    # the GPU wheels' index has its own variable: a TORCH_INDEX_URL set for the CPU image in
    # docker/.env does not replace it
    out = subprocess.run([*cli, "--env-file", str(env_file), "-f", str(COMPOSE), "-f",
                          str(REPO / "docker" / "compose.gpu.yaml"), "config"],
                         capture_output=True, text=True, timeout=120, check=False,
                         env={**base, "TORCH_INDEX_URL": "https://example.org/cpu"})
    head = yaml.safe_load(out.stdout)["services"]["ray-head"]
    assert "/whl/cu" in head["build"]["args"]["TORCH_INDEX_URL"]
    plain = _rendered(tmp_path)
    assert not any((s.get("deploy") or {}).get("resources", {}).get("reservations")
                   for s in plain.values())
    # The GPU head's own memory defaults: one GPU's four paper-scale trials hold about 18 GiB
    # of prefetched batches in /dev/shm (compose.yaml's CPU defaults, 4gb in an 8g limit,
    # ended them with a bus error), besides the trials' processes; the other containers keep
    # compose.yaml's.
    head = services["ray-head"]
    shm, limit = _bytes(head["shm_size"]), _bytes(head["mem_limit"])
    assert shm >= 18 << 30 and limit >= shm + (16 << 30), (shm, limit)
    for name in SERVICES - {"ray-head"}:
        for key in ("shm_size", "mem_limit"):
            if key in plain[name]:
                assert _bytes(services[name][key]) == _bytes(plain[name][key]), (name, key)
    out = subprocess.run([*cli, "--env-file", str(env_file), "-f", str(COMPOSE), "-f",
                          str(REPO / "docker" / "compose.gpu.yaml"), "config"],
                         capture_output=True, text=True, timeout=120, check=False,
                         env={**base, "GPU_HEAD_SHM_SIZE": "48gb", "GPU_HEAD_MEM_LIMIT": "128g",
                              "RAY_SHM_SIZE": "2gb"})
    head = yaml.safe_load(out.stdout)["services"]["ray-head"]
    assert (_bytes(head["shm_size"]), _bytes(head["mem_limit"])) == (48 << 30, 128 << 30)


def test_the_default_data_folder_is_never_build_context():
    """ALIGNSWEEP_DATA defaults to data/ in the repository, the build context: NSD and
    ImageNet there would be sent to the Docker daemon at every build (hundreds of GB)."""
    default = re.search(r"\$\{ALIGNSWEEP_DATA:-([^}]+)\}", COMPOSE.read_text())[1]
    folder = (COMPOSE.parent / default).resolve().relative_to(REPO)
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert str(folder) in ignored or f"/{folder}" in ignored, (folder, ignored)
