"""The sweep command line: ``python sweeps/run.py NAME [options]`` (or ``python -m sweeps.run``).

    python sweeps/run.py --list                       the sweeps and their trial counts
    python sweeps/run.py nsd_conv1_v1 --dry-run       validate everything, print the trials
    python sweeps/run.py nsd_conv1_v1                 demo scale on the simulated world
    python sweeps/run.py nsd_conv1_v1 --smoke-test    3 trials, 1 epoch, tiny simulated data
    python sweeps/run.py nsd_conv1_v1 --data nsd --nsd-root DIR --coco-annotations DIR
    python sweeps/run.py gabor_conv1 --data imagenet --imagenet-root DIR \
        --set epochs=1 --set steps_per_epoch=20 --only 'gabor_conv1-none-*'   try real data
    python sweeps/run.py paper --data paper --imagenet-root DIR --nsd-root DIR \\
        --coco-annotations DIR --address auto --gpus-per-trial 0.25

Bad input is one line, ``error: <message>``, on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from references.cache import (  # noqa: E402
    integer_arg,
    quiet_interrupts,
    stdout_survives_its_reader,
)

if __name__ == "__main__":  # before the imports below: Ctrl-C in them is one line
    quiet_interrupts()

from records.errors import one_line
from records.uris import expand_user, not_utf8  # noqa: E402
from sweeps.plan import (  # noqa: E402
    DATA_CHOICES,
    MAX_SAMPLES,
    MAX_SEEDS,
    SEARCH_CHOICES,
    Plan,
    UsageError,
    check_services,
    make_plan,
    optuna_bounds,
    optuna_split,
    optuna_startup,
    redact,
)
from sweeps.spec import (  # noqa: E402
    fmt_number,
    format_overrides,
    list_sweeps,
    load_sweep,
)


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing usage and exiting, so every bad
    command line ends the same way: one line, exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if message.startswith("unrecognized arguments"):
            message += "; accepted: the options python sweeps/run.py --help lists"
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python sweeps/run.py",
                description="Run a representational-perturbation sweep on Ray Tune, tracked in "
                            "MLflow.")
    p.add_argument("sweep", nargs="?", help="sweep name (see --list)")
    p.add_argument("--list", action="store_true", help="list the sweeps and exit")
    p.add_argument("--sweep-dir", metavar="DIR",
                   help="read sweep files from DIR instead of sweeps/conditions (same format)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate everything, print the trials, start nothing")
    p.add_argument("--smoke-test", action="store_true",
                   help="the same sweep shrunk: baseline + largest |alpha| per direction, one "
                        "short epoch on tiny simulated data")
    p.add_argument("--seeds", type=integer_arg(f"an integer in 1..{MAX_SEEDS}"), default=1,
                   metavar="N",
                   help="repeat every configuration N times (seeds 0..N-1)")
    p.add_argument("--data", choices=DATA_CHOICES, default="demo",
                   help="demo: the simulated world (default); imagenet / nsd: the paper's data "
                        "(paths below); paper: each condition on its own paper dataset")
    p.add_argument("--imagenet-root", metavar="DIR",
                   help="ImageNet-layout folder with train/ and val/ class folders")
    p.add_argument("--nsd-root", metavar="DIR", help="root of the NSD release")
    p.add_argument("--coco-annotations", metavar="DIR",
                   help="folder with instances_train2017.json and instances_val2017.json")
    p.add_argument("--subject", type=integer_arg("an NSD subject's number, 1..8 in the "
                                              "release"), action="append", metavar="N",
                   help="NSD subject (repeatable; default: every subject in the release)")
    p.add_argument("--address", metavar="ADDR",
                   help="join a running Ray cluster: auto or HOST:PORT (default: RAY_ADDRESS "
                        "when set, else start a local Ray)")
    p.add_argument("--gpus-per-trial", metavar="X",
                   help="override the sweep file's share for every condition (fractions "
                        "share a GPU, e.g. 0.25)")
    p.add_argument("--cpus-per-trial", metavar="X", help="override the sweep file")
    p.add_argument("--mlflow-uri", metavar="URI",
                   help="tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db "
                        "in the current folder)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep: run only the trials that did not finish")
    p.add_argument("--search", choices=SEARCH_CHOICES, default="grid",
                   help="grid: the sweep file's grid (default); optuna: sample signed alpha "
                        "with a multi-objective sampler")
    p.add_argument("--num-samples", type=integer_arg(f"an integer in 2..{MAX_SAMPLES}"),
                   metavar="N",
                   help="trials sampled per condition with --search optuna")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", dest="set",
                   help="override a trial setting for every trial of this run (repeatable), "
                        "e.g. --set epochs=1 --set steps_per_epoch=20; recorded in the MLflow "
                        "params and the 'overrides' tag")
    p.add_argument("--only", action="append", metavar="GLOB",
                   help="run only the trials whose id matches (shell pattern, repeatable), "
                        "e.g. --only 'nsd_conv1_v1-max-a0.8-*'")
    p.add_argument("--weights", metavar="PATH",
                   help="pretrained conditions: the frozen network's weights, a state dict "
                        "file (a checkpoint holding one loads too), 'torchvision' (its ImageNet "
                        "file in the torch hub cache; the paper-scale default) or 'auto' (the "
                        "project trains its own; the demo default)")
    p.add_argument("--storage", metavar="DIR",
                   help="folder for Ray Tune's results (default: ./ray_results)")
    return p


def list_lines(directory: str | None = None,
               errors: list[str] | None = None) -> list[str]:
    """One line per sweep. A sweep file that does not load is left out of the list and its
    one-line error appended to ``errors`` (raised when ``errors`` is None): one bad file in a
    folder does not hide the others."""
    out = []
    for name in list_sweeps(directory):
        try:
            sweep = load_sweep(name, directory, check_configs=False)
        except ValueError as exc:
            if errors is None:
                raise
            errors.append(one_line(exc))
            continue
        mains = [c for c in sweep.conditions if c.control_of is None]
        extra = (f" ({len(mains)} condition{'s' if len(mains) != 1 else ''})"
                 if sweep.composite else "")
        # (a control runs at the scales its [control] table names: the paper's too)
        controls = {scale: sweep.control_size(scale) for scale in ("demo", "paper")}
        if controls["demo"] and controls["demo"] == controls["paper"]:
            extra += f" (+{controls['demo']} negative-control trials, demo and paper)"
        else:
            extra += "".join(f" (+{n} negative-control trials {where})" for n, where in
                             ((controls["demo"], "in the demo"),
                              (controls["paper"], "at paper scale")) if n)
        out.append(f"{name:<26}{sweep.grid_size():>4} trials  {sweep.description}{extra}")
    return out


def data_lines(plan: Plan) -> list[str]:
    """One line per distinct data source, naming the conditions of a composite using it."""
    lines = []
    seen = []
    for src in plan.data.values():
        if src not in seen:
            seen.append(src)
            users = [c for c, s in plan.data.items() if s == src]
            who = f" [{', '.join(users)}]" if len(plan.data) > 1 else ""
            lines.append(f"data: {src.describe()}{who}{src.index_note()}")
    return lines


def service_lines(plan: Plan) -> list[str]:
    ray = ("local Ray, started by this run" if plan.address is None
           else f"Ray cluster at {plan.address}")
    search = (f"optuna, {plan.num_samples} samples per condition" if plan.search == "optuna"
              else "grid")
    return [f"ray: {ray}",
            f"mlflow: {redact(plan.mlflow_uri)} (experiment {plan.experiment})",
            f"storage: {plan.storage}"
            f"{' (resuming the newest unfinished run of this command)' if plan.resume else ''}",
            f"search: {search}",
            *([f"overrides: {format_overrides(plan.overrides)}"] if plan.overrides else []),
            *([f"weights: {plan.weights} (pretrained conditions)"] if plan.weights else []),
            *([f"selected: {len(plan.trials)} of {plan.n_grid} trials by --only "
               f"{' '.join(plan.only)}"] if plan.only else []),
            *([f"left out: {', '.join(plan.left_out)} (a negative control runs with --search "
               f"grid only: the sampler draws the condition's alphas afresh, so none would "
               f"meet the control's to compare)"] if plan.left_out else [])]


def fit_lines(plan: Plan) -> list[str]:
    """For a run on a local Ray: whether this machine holds its trials, as the run checks once
    Ray started (``execute.check_fits``, here against this machine's CPUs and GPUs). The dry
    run of a paper sweep (4 CPUs a trial) said nothing on a 2-core machine, and the run was
    then refused; said, not refused, since a dry run also checks data for a cluster run."""
    if plan.address is not None:
        return []
    import torch

    from sweeps.execute import check_fits

    cpus, gpus = os.cpu_count() or 1, torch.cuda.device_count()
    try:
        check_fits(plan, [{"Alive": True, "Resources": {"CPU": cpus, "GPU": gpus}}])
    except UsageError as exc:
        return [f"note: run on this machine (a local Ray of {cpus} CPUs and {gpus} GPUs) it "
                f"would be refused: {exc} -- or give --address of a cluster that holds it"]
    return []


def trial_table(plan: Plan) -> list[str]:
    """trial_id, direction, alpha, beta, seed, cpus, gpus: one row per trial."""
    num = fmt_number
    rows = [(t.trial_id, t.direction, num(t.alpha), num(t.beta), str(t.seed),
             num(t.resources.cpus), num(t.resources.gpus)) for t in plan.trials]
    head = ("trial_id", "direction", "alpha", "beta", "seed", "cpus", "gpus")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows]]


def resume_lines(plan: Plan) -> list[str]:
    """What a --resume continues: the run folder and how many trials finished there and which
    the resume runs, from Ray Tune's state there (what the resume restores), else from the
    run's manifest. (The dry run listed every trial of the plan, as if none had run; and the
    manifest alone, which a driver killed outright never updates from its start, called
    every trial of such a run unfinished.)"""
    if not plan.resume:
        return []
    from sweeps.plan import resume_choice

    run_dir, other = resume_choice(plan)
    if other:
        return [f"resume: {other}", *_resume_lines(plan, run_dir)]
    return _resume_lines(plan, run_dir)


def _resume_lines(plan: Plan, run_dir: Path) -> list[str]:
    from records import read_manifest
    from sweeps.plan import tune_states

    states = tune_states(run_dir)
    if states is None:
        entries = read_manifest(run_dir)
        if not entries:
            return [f"resume: {run_dir} (no manifest: its driver ended before writing one; "
                    f"the resume runs every trial Ray Tune's state there has not finished)"]
        states = {e.key: e.state for e in entries}
    if plan.search == "optuna":  # the baselines and the samples drawn so far
        drawn = [key for key, state in states.items() if state != "done"]
        done = len(states) - len(drawn)
        shown = ", ".join(drawn[:10]) + (", ..." if len(drawn) > 10 else "")
        return [f"resume: {run_dir}: {done} of {plan.n_trials} trials finished there; the "
                f"resume runs the other {plan.n_trials - done}"
                + (f" ({shown}, then " if drawn else " (")
                + _count(max(0, plan.n_trials - len(states)), "sample") + " not yet drawn)"]
    left = [t.trial_id for t in plan.trials if states.get(t.trial_id) != "done"]
    shown = ", ".join(left[:10]) + (", ..." if len(left) > 10 else "")
    return [f"resume: {run_dir}: {plan.n_trials - len(left)} of {plan.n_trials} trials "
            f"finished there; the resume runs {len(left)}" + (f" ({shown})" if left else "")]


def optuna_lines(plan: Plan) -> list[str]:
    num = fmt_number
    out = []
    split = optuna_split(plan.num_samples)
    for name in plan.conditions:  # those that run at this scale (a demo-only control is not)
        cond = plan.spec.condition(name)
        lo, hi, widened = optuna_bounds(cond.grid.alphas)
        around = (f" (around the grid's one alpha {num(cond.grid.alphas[0])}: a/4 to 4a)"
                  if widened else "")
        # each side's samples train at the beta of its first grid trial (sweeps.search.
        # SideSearch): say that one, not the grid's list
        beta = next((t.config["beta"] for t in plan.trials
                     if t.condition == name and t.direction != "none"), cond.grid.betas[0])
        res = plan.resources[name]
        out.append(f"{name}: {plan.num_samples} samples ({split['max']} promoting, "
                   f"{split['min']} suppressing; {_random_part(split)}), "
                   f"alpha = +-[{num(lo)}, {num(hi)}] "
                   f"log-uniform{around}, beta = {num(beta)} (the grid's first), cpus "
                   f"{num(res.cpus)}, gpus {num(res.gpus)}")
    return out


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _random_part(split: dict[str, int]) -> str:
    """How many of each side's samples are drawn at random before TPE models the rest."""
    first = {side: min(n, optuna_startup(n)) for side, n in split.items()}
    if all(first[side] == n for side, n in split.items()):
        return "all at random: too few for TPE to model"
    return f"the first {first['max']} and {first['min']} at random, the rest by TPE"


def main(argv: list[str] | None = None) -> int:
    """The CLI: every error ends as one line on stderr and a non-zero status, never a
    traceback on the console (an unexpected one is written to a log file the line names)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`... --list | head`): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:  # a bug or an environment fault: one line, traceback to a file
        from references.cache import unexpected_error_line

        print(unexpected_error_line(exc, lambda: _written_folders(argv)), file=sys.stderr)
        return 1


def _written_folders(argv: list[str] | None) -> dict[str, Path | None]:
    """The folders a run writes to, as its command line names them (defaults where it does not
    parse), beside the cache and the temporary folder: what a full disk is looked for in when
    the run fails unexpectedly (``unexpected_error_line``)."""
    from records.stores import sqlite_path
    from records.uris import tracking_uri

    def get(find: Callable[[], Path | None]) -> Path | None:
        try:  # a working folder deleted, no usable temporary folder, a bad setting: left out
            return find()
        except Exception:
            return None

    args = get(lambda: build_parser().parse_known_args(argv)[0])
    store = get(lambda: sqlite_path(tracking_uri(args.mlflow_uri)))
    return {"--storage": get(lambda: Path(args.storage or "ray_results")),
            "the tracking store's folder": store and store.parent,
            "the working folder": get(Path.cwd)}


def _check_utf8(argv: list[str]) -> None:
    problem = not_utf8(argv)
    if problem:
        raise UsageError(problem)


def _main(argv: list[str] | None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    try:
        _check_utf8(words)
        args = build_parser().parse_args(words)
        if args.sweep_dir is not None:
            if not args.sweep_dir.strip():  # Path("") is the working folder
                raise UsageError(f"--sweep-dir {args.sweep_dir!r}: an empty path; accepted: "
                                 f"a folder of sweep .toml files")
            folder = expand_user(args.sweep_dir, "--sweep-dir")
            if not folder.is_dir():
                what = "not a directory" if folder.exists() else "no such directory"
                raise UsageError(f"--sweep-dir {args.sweep_dir}: {what}; accepted: "
                                 f"a folder of sweep .toml files")
            if not any(folder.glob("*.toml")):  # --list printed an empty line, exit 0
                raise UsageError(f"--sweep-dir {args.sweep_dir}: no .toml file in it; "
                                 f"accepted: a folder of sweep .toml files (the format: "
                                 f"sweeps/spec.py)")
            args.sweep_dir = str(folder.resolve())  # passed down, never through os.environ
        if args.list:
            errors: list[str] = []
            print("\n".join(list_lines(args.sweep_dir, errors)))
            for line in errors:
                print(f"error: {line}", file=sys.stderr)
            return 2 if errors else 0
        plan = dataclasses.replace(make_plan(args), argv=tuple(words))
        check_services(plan)
    except ValueError as exc:  # UsageError, a malformed sweep file, any validation
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    if not args.dry_run:
        stdout_survives_its_reader("the sweep goes on")
    # The first line says which scale and data the run is on.
    print(f"{plan.sweep}: {plan.data_description}", flush=True)
    if args.dry_run:
        body = optuna_lines(plan) if plan.search == "optuna" else trial_table(plan)
        print("\n".join([*body, *data_lines(plan), *service_lines(plan), *fit_lines(plan),
                         *resume_lines(plan), f"{plan.n_trials} trials"]))
        return 0
    print("\n".join([*data_lines(plan), *service_lines(plan)]), flush=True)
    from sweeps.execute import execute

    try:
        return execute(plan)
    except UsageError as exc:  # found once services are contacted (e.g. a refused address)
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
