"""Benchmark: how busy a demo sweep keeps Ray Tune's trial slots, and each trial's start-up time.

    python tests/benchmarks/bench_sweep.py [--quick] [--sweep nsd_conv1_v1] [--trials 8]
        [--epochs N] [--keep DIR] [--verbose]

The plan is the one ``python sweeps/run.py SWEEP`` builds at demo scale (``build_parser`` ->
``make_plan``), cut to its first ``--trials`` trials (8; ``--epochs`` overrides the sweep
file's epochs), with Ray Tune's storage and a SQLite MLflow store in a temporary folder. The
data and references are prepared once beforehand so the measured run hits the cache. Then
``sweeps.execute.execute(plan)`` runs it, unchanged; the only instrumentation is timing
wrappers around ``sweeps.execute._prepare``, ``sweeps.execute._init_ray`` and ``Tuner.fit``.

Definitions (all times from ``time.time()``, Ray's clock too):

- wall : from just before ``Tuner.fit`` starts to its return. It includes Tune's set-up,
  actor creation, every trial, and the end of the last trial; it excludes data and reference
  preparation, ``ray.init``, ``ray.put`` of the data, the MLflow parent run and
  ``ray.shutdown`` (printed separately, with execute()'s total).
- concurrency : trials Ray can run at once: the cluster's CPUs (and GPUs) divided by what a
  trial asks for, capped at the number of trials.
- busy : a trial's ``time_total_s`` (last line of its result.json). For a function trainable
  Tune measures it from the actor's first ``train`` call, so it holds the trial's in-function
  start-up (imports inside the trainable, ``ray.get`` of data and reference, the MLflow child
  run, the model build) but not the worker/actor start before it.
- sweep_efficiency = sum(busy) / (concurrency x wall).
- slot handover gap : from the moment a trial's slot became free (the previous trial on it
  sent its last report, or ``Tuner.fit`` started) to Tune marking this trial's actor started
  (``start_time`` in experiment_state): the previous trial's tail (artifacts, finishing its
  MLflow run), actor stop, worker start, imports, unpickling the trainable.
- in-trial start-up : actor started -> first epoch began = first report time - start_time -
  the first epoch's own time (``epoch_seconds``, measured by the trainable) - the per-epoch
  report overhead (median over later epochs of ``time_this_iter_s - epoch_seconds``: MLflow
  metrics, checkpoint save and persist). Tune's ``time_this_iter_s`` of the first epoch cannot
  serve as "the epoch's own time": it contains the start-up.
- trial_startup_s : mean over trials of handover gap + in-trial start-up.

Both numbers depend on what else runs on the machine (start-up is mostly CPU-bound imports), so
the run prints the load average before and after. The sweep's own output (Tune's status
tables, worker logs) goes to ``execute.log`` in the work folder; Ray's own INFO lines still
reach the terminal.

Slot-seconds (concurrency x wall) are split exactly into: epochs (train + validation),
per-epoch reporting, in-trial start-up, handover gaps, actor-start-to-first-train and
inter-report gaps, and idle slots at the end of the fit. The last line is
``sweep_efficiency=<x> trial_startup_s=<x>``. Goal (issue 5): efficiency >= 0.8.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import heapq
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from sweeps.plan import Plan, make_plan
from sweeps.run import build_parser

QUICK_TRIALS, QUICK_EPOCHS = 4, 2


@dataclasses.dataclass
class TrialTiming:
    """One trial as Tune recorded it (epoch times in seconds, clock times from time.time())."""

    trial_id: str
    start: float  # Tune marked the actor started
    last_report: float
    busy: float  # time_total_s of the last report
    epoch_seconds: list[float]
    iter_seconds: list[float]  # time_this_iter_s per report
    failures: int
    handover_gap: float = 0.0

    @property
    def report_overhead(self) -> float:
        """Per-epoch cost around the epoch itself (MLflow log, checkpoint), median over the
        epochs after the first (0 when there is only one)."""
        rest = [i - e for i, e in zip(self.iter_seconds[1:], self.epoch_seconds[1:])]
        return statistics.median(rest) if rest else 0.0

    @property
    def first_report(self) -> float:
        # Only the last report's clock time is recorded precisely; Tune's counters give the rest.
        return self.last_report - (self.busy - self.iter_seconds[0])

    @property
    def in_trial_startup(self) -> float:
        return (self.first_report - self.start - self.epoch_seconds[0]
                - self.report_overhead)

    @property
    def startup(self) -> float:
        return self.handover_gap + self.in_trial_startup

    @property
    def span(self) -> float:
        return self.last_report - self.start


@contextlib.contextmanager
def timed(owner: Any, name: str, spans: dict[str, list[tuple[float, float]]], key: str,
          after=None):
    """Replace ``owner.name``, for the ``with`` block, by a wrapper recording (start, end) of
    each call under ``key``; ``after(result)``, if given, then sees each call's return value
    (outside the recorded span). Behaviour is unchanged: this only reads the clock."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        t0 = time.time()
        try:
            out = original(*args, **kwargs)
        finally:
            spans.setdefault(key, []).append((t0, time.time()))
        if after is not None:
            after(out)
        return out

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, original)


def demo_plan(sweep: str, n_trials: int, epochs: int | None, workdir: Path) -> Plan:
    """The demo plan of ``sweep`` as the CLI builds it, cut to its first ``n_trials`` trials."""
    args = build_parser().parse_args([
        sweep, "--storage", str(workdir / "ray_results"),
        "--mlflow-uri", f"sqlite:///{workdir / 'mlflow.db'}",
    ])
    plan = make_plan(args)
    if n_trials > len(plan.trials):
        raise SystemExit(f"--trials {n_trials}: sweep {sweep} has {len(plan.trials)} trials; "
                         f"accepted: 1..{len(plan.trials)}")
    trials = plan.trials[:n_trials]
    if epochs is not None:
        trials = tuple(dataclasses.replace(t, config={**t.config, "epochs": epochs})
                       for t in trials)
    return dataclasses.replace(plan, trials=trials)


def concurrency_of(plan: Plan, cluster: dict[str, float]) -> int:
    """Trials the cluster runs at once: its CPUs (and GPUs) over one trial's request, capped
    at the number of trials (the demo's trials all ask for the same)."""
    fits = []
    for t in plan.trials:
        n = int(cluster.get("CPU", 0) // t.resources.cpus) if t.resources.cpus else len(plan.trials)
        if t.resources.gpus and cluster.get("GPU", 0):  # no GPU: execute runs trials on CPU
            n = min(n, int(cluster.get("GPU", 0) // t.resources.gpus))
        fits.append(n)
    return max(1, min(min(fits), len(plan.trials)))


def read_trials(run_dir: Path) -> list[TrialTiming]:
    """Per-trial timings from Tune's experiment state (actor start, last report time) and each
    trial's result.json (one line per epoch)."""
    states = sorted(run_dir.glob("experiment_state-*.json"))
    if not states:
        raise SystemExit(f"no experiment_state-*.json in {run_dir}: did Tune run?")
    state = json.loads(states[-1].read_text())
    out = []
    for trial_json, meta_json in state["trial_data"]:
        trial, meta = json.loads(trial_json), json.loads(meta_json)
        lines = (run_dir / trial["relative_logdir"] / "result.json").read_text().splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
        if not rows or meta.get("start_time") is None:
            raise SystemExit(f"trial {trial['config']['trial_id']} reported nothing "
                             f"(status {trial.get('status')}); see the log")
        out.append(TrialTiming(
            trial_id=trial["config"]["trial_id"], start=meta["start_time"],
            last_report=meta["last_result_time"], busy=rows[-1]["time_total_s"],
            epoch_seconds=[r["epoch_seconds"] for r in rows],
            iter_seconds=[r["time_this_iter_s"] for r in rows],
            failures=meta.get("num_failures", 0)))
    return out


def assign_slots(trials: list[TrialTiming], concurrency: int, fit_start: float,
                 fit_end: float) -> float:
    """Set each trial's handover gap (its slot freed -> its actor started), placing trials in
    start order on the slot that freed first. Returns the slot-seconds idle at the end of the
    fit (last report on each slot -> Tuner.fit returned)."""
    free = [fit_start] * concurrency
    for t in sorted(trials, key=lambda t: t.start):
        slot_free = heapq.heappop(free)
        t.handover_gap = max(0.0, t.start - slot_free)
        heapq.heappush(free, t.last_report)
    return sum(fit_end - f for f in free)


def max_overlap(trials: list[TrialTiming]) -> int:
    events = sorted([(t.start, 1) for t in trials] + [(t.last_report, -1) for t in trials])
    run = best = 0
    for _, step in events:
        run += step
        best = max(best, run)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_TRIALS} trials of {QUICK_EPOCHS} epochs (a few minutes)")
    parser.add_argument("--sweep", default="nsd_conv1_v1",
                        help="a demo sweep (default nsd_conv1_v1, the README's main command)")
    parser.add_argument("--trials", type=int, help="first N trials of the sweep (default 8)")
    parser.add_argument("--epochs", type=int,
                        help="epochs per trial (default: the sweep file's demo epochs)")
    parser.add_argument("--keep", metavar="DIR",
                        help="work in DIR and keep it (Ray results, MLflow db, execute.log)")
    parser.add_argument("--verbose", action="store_true",
                        help="show the sweep's own output instead of writing it to execute.log")
    args = parser.parse_args()
    n_trials = args.trials or (QUICK_TRIALS if args.quick else 8)
    epochs = args.epochs or (QUICK_EPOCHS if args.quick else None)

    with contextlib.ExitStack() as stack:
        if args.keep:
            workdir = Path(args.keep).resolve()
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-sweep-")))
        run(args, n_trials, epochs, workdir)


def run(args: argparse.Namespace, n_trials: int, epochs: int | None, workdir: Path) -> None:
    # As sweeps.execute does on import: Ray reads RAY_AUTH_MODE when it is first imported, and
    # the import sorter puts `import ray` first.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray
    from ray import tune

    import sweeps.execute as ex

    plan = demo_plan(args.sweep, n_trials, epochs, workdir)
    load = os.getloadavg()
    print(f"{plan.sweep}: {plan.data_description}; {len(plan.trials)} trials x "
          f"{plan.trials[0].config['epochs']} epochs, cpus {plan.trials[0].resources.cpus:g} / "
          f"gpus {plan.trials[0].resources.gpus:g} per trial; machine: {os.cpu_count()} CPUs, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} before the run "
          f"(other jobs share these CPUs)", flush=True)

    # Warm the data cache first, so the measured run's own preparation is the cached path.
    t0 = time.perf_counter()
    log = workdir / "execute.log"
    with open(log, "a") as sink, _quiet(sink, args.verbose):
        ex._prepare(plan)
    print(f"warm-up: data and references prepared in {time.perf_counter() - t0:.1f} s",
          flush=True)

    spans: dict[str, list[tuple[float, float]]] = {}
    cluster: dict[str, float] = {}
    t_exec = time.time()
    with contextlib.ExitStack() as stack:
        stack.enter_context(timed(ex, "_prepare", spans, "prepare"))
        stack.enter_context(timed(ex, "_init_ray", spans, "init_ray",
                                  after=lambda _: cluster.update(ray.cluster_resources())))
        stack.enter_context(timed(tune.Tuner, "fit", spans, "fit"))
        sink = stack.enter_context(open(log, "a"))
        stack.enter_context(_quiet(sink, args.verbose))
        code = ex.execute(plan)
    exec_seconds = time.time() - t_exec
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise SystemExit(f"execute() returned {code}; last lines of {log}:\n{tail}")

    (fit_start, fit_end), = spans["fit"]
    wall = fit_end - fit_start
    concurrency = concurrency_of(plan, cluster)
    # the pointer names the run folder inside the storage folder (an older one: its path)
    run_dir = Path(plan.storage) / Path(plan.resume_pointer).read_text().strip()
    trials = read_trials(run_dir)
    end_idle = assign_slots(trials, concurrency, fit_start, fit_end)

    print(f"\n{'trial':<32} {'start':>7} {'end':>7} {'busy':>7} {'epochs':>7} "
          f"{'report':>7} {'gap':>6} {'in-trial':>8} {'startup':>8}")
    for t in sorted(trials, key=lambda t: t.start):
        print(f"{t.trial_id:<32} {t.start - fit_start:7.1f} {t.last_report - fit_start:7.1f} "
              f"{t.busy:7.1f} {sum(t.epoch_seconds):7.1f} "
              f"{t.report_overhead * len(t.epoch_seconds):7.1f} {t.handover_gap:6.1f} "
              f"{t.in_trial_startup:8.1f} {t.startup:8.1f}"
              + (f"  ({t.failures} failures)" if t.failures else ""))
    print("(seconds; start/end: actor started / last report, from Tuner.fit start; busy: "
          "time_total_s; epochs: sum of epoch_seconds; report: per-epoch reporting x epochs; "
          "gap: slot free -> actor started; in-trial: actor started -> first epoch began)")

    slot_seconds = concurrency * wall
    busy = sum(t.busy for t in trials)
    parts = {
        "epochs (train + validation)": sum(sum(t.epoch_seconds) for t in trials),
        "per-epoch reporting (MLflow, checkpoint)": sum(
            t.report_overhead * len(t.epoch_seconds) for t in trials),
        "in-trial start-up": sum(t.in_trial_startup for t in trials),
        "slot handover gaps": sum(t.handover_gap for t in trials),
        "actor start -> first train, between reports": sum(t.span - t.busy for t in trials),
        "idle slots at the end of the fit": end_idle,
    }
    # The first three add up to busy up to the epoch-to-epoch spread of the reporting cost.
    parts["per-epoch reporting (MLflow, checkpoint)"] += busy - sum(list(parts.values())[:3])
    print(f"\nslot-seconds: concurrency {concurrency} x wall {wall:.1f} s = {slot_seconds:.1f} "
          f"(cluster {cluster.get('CPU', 0):g} CPU, {cluster.get('GPU', 0):g} GPU; at most "
          f"{max_overlap(trials)} trials seen running at once)")
    for name, value in parts.items():
        print(f"  {name:<46} {value:8.1f}  {value / slot_seconds:6.1%}")
    print(f"  {'(sum)':<46} {sum(parts.values()):8.1f}  {sum(parts.values()) / slot_seconds:6.1%}")

    prepare = sum(b - a for a, b in spans.get("prepare", []))
    init_ray = sum(b - a for a, b in spans.get("init_ray", []))
    print(f"\nexecute() {exec_seconds:.1f} s = data/reference preparation (cached) {prepare:.1f} s "
          f"+ ray.init {init_ray:.1f} s + Tuner.fit {wall:.1f} s + the rest (MLflow parent, "
          f"ray.put, summary, ray.shutdown) {exec_seconds - prepare - init_ray - wall:.1f} s")
    efficiency = busy / slot_seconds
    train_only = parts["epochs (train + validation)"] / slot_seconds
    load = os.getloadavg()
    print(f"efficiency on epochs alone: {train_only:.2f}; load average after the run "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; goal sweep_efficiency >= 0.8")
    startup = statistics.mean(t.startup for t in trials)
    print(f"sweep_efficiency={efficiency:.2f} trial_startup_s={startup:.2f}")


@contextlib.contextmanager
def _quiet(sink, verbose: bool):
    """The sweep's own output (progress tables, worker logs) goes to ``sink`` unless verbose."""
    if verbose:
        yield
        return
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


if __name__ == "__main__":
    main()
