"""Run a program on a Ray node of this container, without a shell.

    python docker/on_ray_node.py [ray start options] -- PROGRAM [ARGS...]

runs `ray start` with the options before the first `--`, then replaces itself with PROGRAM
(exec, so PROGRAM gets the container's signals and its exit status is the container's).

docker/compose.yaml's sweep service is this: a Ray driver must run on a node of the cluster,
so the job joins as a node that offers no CPUs or GPUs, then runs sweeps/run.py. A shell
script (`ray start ... && exec python sweeps/run.py $SWEEP ...`) would also run whatever shell
code a user's value holds; here every argument reaches its program as one argv element.
"""

from __future__ import annotations

import os
import subprocess
import sys

USAGE = "usage: on_ray_node.py [ray start options] -- PROGRAM [ARGS...]"


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(ray start options, program argv): split at the first ``--``; the program's own
    arguments may contain ``--`` again."""
    if "--" not in argv:
        raise SystemExit(f"on_ray_node.py: no `--` before the program in {argv!r}\n{USAGE}")
    cut = argv.index("--")
    options, program = argv[:cut], argv[cut + 1:]
    if not program:
        raise SystemExit(f"on_ray_node.py: no program after `--` in {argv!r}\n{USAGE}")
    return options, program


def main(argv: list[str] | None = None) -> None:
    options, program = split_argv(sys.argv[1:] if argv is None else argv)
    started = subprocess.run(["ray", "start", *options], check=False)
    if started.returncode != 0:
        raise SystemExit(f"on_ray_node.py: `ray start {' '.join(options)}` exited with "
                         f"{started.returncode}; not running {program[0]}")
    sys.stdout.flush()
    os.execvp(program[0], program)


if __name__ == "__main__":
    main()
