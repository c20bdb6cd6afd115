"""Write docker/constraints.txt: the exact version of every package the image installs.

Run from the repository root with the project's environment:

    .venv/bin/python docker/freeze_constraints.py

Two parts, both exact (==) pins:

1. Everything pyproject.toml's dependencies and build backend need, at the versions installed
   in the environment this script runs in: the environment the tests ran against is the one
   the image gets.
   torch's CUDA-only requirements (nvidia-*, cuda-*, triton) are left out: the image installs
   the CPU wheels, which do not need them, and a CUDA build brings its own. torch's pin has no
   local label (2.14.1, not 2.14.1+cu130), so it matches the CPU index's 2.14.1+cpu.
2. The test tools (pyproject's ``test`` extra: pytest, pytest-timeout, ruff) and what they
   need beyond part 1, as installed here: CI (`.ci/run`) installs the same extra under these
   pins, so a new pytest or ruff release cannot change what CI runs. The image does not
   install them; pins of packages not installed are harmless to pip.
3. What only the image adds, ray[default] (the dashboard) and mlflow[auth] (the basic-auth app),
   resolved by pip against the pins of part 1 for this interpreter and platform (Python 3.11 on
   Linux x86_64, as the default base image). This part asks the package index.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "docker" / "constraints.txt"
# Extras the image installs on top of pyproject's dependencies (the Dockerfile names the same).
IMAGE_EXTRAS = ("ray[default]", "mlflow[auth]")
CUDA_ONLY = re.compile(r"^(nvidia-|cuda-|triton$)")
IMAGE_ONLY_HEADER = "# Image only:"
TEST_HEADER = "# Test tools:"
TEST_EXTRA = "test"


def dependency_closure(roots: list[str]) -> dict[str, str]:
    """{canonical name: installed version} of ``roots`` and everything they require here
    (markers evaluated for this interpreter, extras followed), less torch's CUDA-only packages.
    A requirement that is not installed raises PackageNotFoundError."""
    versions: dict[str, str] = {}
    done: set[tuple[str, frozenset[str]]] = set()
    todo = [Requirement(r) for r in roots]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        key = (name, frozenset(req.extras))
        if key in done or CUDA_ONLY.match(name):
            continue
        done.add(key)
        # The public version: a local label such as torch's +cu130 names one build, and a pin
        # without it matches every build of that version (the CPU index's +cpu too).
        versions[name] = Version(metadata.version(name)).public
        for line in metadata.requires(name) or []:
            sub = Requirement(line)
            # A requirement counts when its marker holds for the base install or for one of
            # the extras asked for ("extra" is the only marker variable that varies here).
            if sub.marker is None or any(sub.marker.evaluate({"extra": e})
                                         for e in ("", *req.extras)):
                todo.append(sub)
    return versions


_PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
_PROJECT = _PYPROJECT["project"]["name"]


def project_dependencies() -> list[str]:
    """pyproject.toml's dependencies and its build backend (setuptools builds the image's
    editable install, and the Dockerfile constrains that build too)."""
    return [*_PYPROJECT["project"]["dependencies"], *_PYPROJECT["build-system"]["requires"]]


def test_tools(pins: dict[str, str]) -> dict[str, str]:
    """The test extra's packages and their requirements not already in ``pins``, at the
    versions installed here."""
    extra = _PYPROJECT["project"]["optional-dependencies"][TEST_EXTRA]
    return {n: v for n, v in dependency_closure(list(extra)).items() if n not in pins}


def _resolve_image_extras(pins: dict[str, str]) -> dict[str, str]:
    """The packages IMAGE_EXTRAS add to ``pins``, resolved by pip. Every package installed
    here constrains the resolution, so a package this environment has gets its version."""
    installed = {canonicalize_name(d.metadata["Name"]): d.version
                 for d in metadata.distributions()}
    installed.pop(canonicalize_name(_PROJECT), None)  # the editable install itself
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text("".join(f"{n}=={v}\n" for n, v in sorted(installed.items())))
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run",
                        "--ignore-installed", "--report", str(report), "-c", str(constraints),
                        *IMAGE_EXTRAS], check=True)
        installs = json.loads(report.read_text())["install"]
    resolved = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
                for i in installs}
    return {n: v for n, v in resolved.items() if n not in pins and not CUDA_ONLY.match(n)}


def main() -> None:
    pins = dependency_closure(project_dependencies())
    tools = test_tools(pins)
    extras = _resolve_image_extras(pins)
    lines = [
        "# Generated by docker/freeze_constraints.py; do not edit by hand, run it again.",
        "# Exact versions for every pip install in docker/Dockerfile. First, everything",
        "# pyproject.toml's dependencies and build backend need, as installed in the environment",
        "# the tests ran in (torch's CUDA-only packages left out: the image installs CPU wheels).",
        *(f"{n}=={v}" for n, v in sorted(pins.items())),
        f"{TEST_HEADER} the {TEST_EXTRA} extra (CI's linter and test runner) adds these, as "
        f"installed here.",
        *(f"{n}=={v}" for n, v in sorted(tools.items())),
        f"{IMAGE_ONLY_HEADER} {' and '.join(IMAGE_EXTRAS)} add these, resolved by pip against",
        "# the pins above.",
        *(f"{n}=={v}" for n, v in sorted(extras.items())),
    ]
    CONSTRAINTS.write_text("\n".join(lines) + "\n")
    print(f"{CONSTRAINTS.relative_to(REPO)}: {len(pins)} from the environment, "
          f"{len(tools)} test tools, {len(extras)} image only")


if __name__ == "__main__":
    main()
