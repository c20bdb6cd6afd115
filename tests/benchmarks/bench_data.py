"""Benchmark: the streaming data path -- memory stays flat as the data grows, and streaming
feeds the step loop as fast as in-memory tensors.

    python tests/benchmarks/bench_data.py [--quick] [--n 300] [--steps 6] [--repeats 3]
        [--mmap-threshold BYTES] [--rounds 5] [--epochs 4] [--workdir DIR]

1. Memory. An ImageNet-layout tree of real JPEGs (``tests/imagenet_tree.py``, 4 classes, small
   images of three shapes) is written at two sizes, N and 10N images per split (``--n``; 300,
   quick 40). For each, a child process (``bench_data.py --child ROOT``) does what the driver
   and one trial do: indexes the tree (``imagefolder_bundle(root, image_size=224)``), wraps it in
   a ``TrialData``, pickles and unpickles it (what ``ray.put`` / ``ray.get`` do to it; its size
   is printed), then runs ``train()``: AlexNet width 0.25, conv1, Gabor reference, 224 px,
   batch 32, one epoch of ``--steps`` steps (training crops stream: ``crop_flip``), evaluation
   over the whole val split, ``in_memory_mb=0`` (val streams too: the point is that nothing
   grows with the data), one loader worker, one thread. The fixed validation-alignment set is
   the smallest the config allows (``val_images=10``, ``val_folds=2``): its cost does not
   depend on N, but at 40 images of 224 px the Gabor targets in float64 make a transient of
   about 600 MB that sets the peak at both sizes and hides whatever grows with the data.
   This process samples the memory of the child and all its descendants (the DataLoader
   workers) every 50 ms from /proc: PSS (``/proc/<pid>/smaps_rollup``, so pages a forked
   worker shares with the trial are counted once; RSS from ``/proc/<pid>/status`` where
   smaps_rollup is unreadable), summed over the process tree; the peak of the sum is
   reported, with the trial process's own VmHWM (kernel-exact peak RSS) beside it. Each size
   runs ``--repeats`` times (3, quick 1), interleaved: glibc's heap makes the peak of one run
   vary by up to a few hundred MB. rss_growth_mb = median peak(10N) - median peak(N). The
   old in-memory path held every decoded training image: it grew by 9N x 3 x 224^2 bytes.
   Goal: rss_growth_mb < 150. ``--mmap-threshold BYTES`` runs the children with
   ``MALLOC_MMAP_THRESHOLD_`` fixed (a diagnostic: large tensors then never stay in the heap).
2. Loader. At the demo shape (the simulated single-label world: 1000 PNGs at 64 px, flip
   augmentation; AlexNet width 0.25, batch 50, 20 steps an epoch, one thread, alpha 0, Gabor
   reference) the same trial runs with ``in_memory_mb=1024`` (decoded once into memory) and
   with ``in_memory_mb=0`` (streamed every epoch by the DataLoader, ``loader_workers`` auto =
   one worker for one thread), in one process, interleaved rounds, same seed (same batches).
   The number compared is the ``images_per_second`` the trial reports (training steps only,
   evaluation excluded), the first epoch of each run discarded (worker start, decode once);
   medians over the other epochs of all rounds. loader_ratio = streaming / in-memory
   images/s = in-memory step time / streaming step time. Goal: >= 0.95. The streaming runs'
   ``data_wait_seconds`` (time the step loop waited for a batch) is printed beside it, split
   into the wait for an epoch's first batch and for each later one (``BatchFeed.batches``
   wrapped with a clock for the part; nothing else changes), and the step time without it.

The trees go to a temporary folder under ``--workdir`` (default: a new temporary folder) and
are removed at the end; ``ALIGNSWEEP_CACHE`` is pointed at a temporary folder when unset (the
simulated world is generated there). The last line is
``rss_growth_mb=<x> loader_ratio=<x>``.

``peak_memory_mb(root, steps=...)`` (part 1 for one tree) is importable for tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
TESTS = REPO / "tests"

N_CLASSES = 4
JPEG_SIZES = ((256, 192), (192, 256), (320, 240))
RSS_GOAL_MB = 150.0
RATIO_GOAL = 0.95
DEMO = {"model": "alexnet", "layer": "conv1", "reference": "gabor", "metric": "linear",
        "alpha": 0.0, "beta": 1.0, "lr": 1e-4, "batch_size": 50, "image_size": 64,
        "width": 0.25, "seed": 0, "device": "cpu", "threads": 1, "loader_workers": -1}
CHILD_TAG = "BENCH_DATA_CHILD "


# ----------------------------------------------------------------------------- process memory


def _descendants(pid: int) -> list[int]:
    """pid and every live descendant. Uses /proc/<pid>/task/<tid>/children where the kernel
    has it (CONFIG_PROC_CHILDREN), else the parent pid of every process in /proc."""
    tasks = Path(f"/proc/{pid}/task")
    try:
        first = next(tasks.iterdir(), None)
    except OSError:
        return []
    if first is not None and (first / "children").exists():
        out, todo = [], [pid]
        while todo:
            p = todo.pop()
            out.append(p)
            try:
                for task in Path(f"/proc/{p}/task").iterdir():
                    todo.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                continue
        return out
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def _process_kb(pid: int) -> int | None:
    """PSS of a process in kB (smaps_rollup), else its RSS (status); None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def tree_memory_kb(pid: int) -> tuple[int, int, int]:
    """(sum of PSS/RSS over pid and its descendants, pid's own, processes counted) in kB."""
    total = own = count = 0
    for p in _descendants(pid):
        kb = _process_kb(p)
        if kb is None:
            continue
        total += kb
        count += 1
        if p == pid:
            own = kb
    return total, own, count


# ----------------------------------------------------------------------------- part 1: memory


@dataclass
class TreeRun:
    """One child run over one tree."""

    peak_mb: float  # peak over samples of the process tree's summed PSS
    trial_peak_mb: float  # peak of the child (driver + trial) process alone
    max_processes: int
    samples: int
    pickled_bytes: int  # the TrialData as ray.put would serialise it
    n_train: int
    n_val: int
    seconds: float  # child wall time, start to exit
    index_seconds: float
    train_seconds: float
    trial_hwm_mb: float  # the trial process's own peak RSS (VmHWM), exact but RSS not PSS


def run_tree(root: str | os.PathLike, *, steps: int, image_size: int = 224,
             batch_size: int = 32, width: float = 0.25, val_images: int = 10,
             val_folds: int = 2, workers: int = 1, interval: float = 0.05,
             timeout: float = 600.0, env: dict[str, str] | None = None) -> TreeRun:
    """Run the driver + trial path over ``root`` in a child process while sampling its
    process tree's memory every ``interval`` seconds (module docstring, part 1); ``env``:
    extra environment variables for the child (e.g. ``MALLOC_MMAP_THRESHOLD_``)."""
    cmd = [sys.executable, str(HERE), "--child", str(root), "--steps", str(steps),
           "--image-size", str(image_size), "--batch-size", str(batch_size),
           "--width", str(width), "--val-images", str(val_images),
           "--val-folds", str(val_folds), "--workers", str(workers)]
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="bench-data-child-") as tmp:
        out_path, err_path = Path(tmp, "stdout"), Path(tmp, "stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err)
            peak = own_peak = procs = samples = 0
            try:
                while proc.poll() is None:
                    if time.perf_counter() - t0 > timeout:
                        raise TimeoutError(f"child over {root} ran past {timeout:.0f} s")
                    total, own, count = tree_memory_kb(proc.pid)
                    if count:
                        samples += 1
                        peak, own_peak = max(peak, total), max(own_peak, own)
                        procs = max(procs, count)
                    time.sleep(interval)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            seconds = time.perf_counter() - t0
        stdout, stderr = out_path.read_text(), err_path.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"child over {root} exited {proc.returncode}:\n{stdout[-2000:]}\n"
                           f"{stderr[-3000:]}")
    info = next((json.loads(line[len(CHILD_TAG):]) for line in reversed(stdout.splitlines())
                 if line.startswith(CHILD_TAG)), None)
    if info is None:
        raise RuntimeError(f"child over {root} printed no result:\n{stdout[-2000:]}")
    return TreeRun(peak_mb=peak / 1024, trial_peak_mb=own_peak / 1024, max_processes=procs,
                   samples=samples, pickled_bytes=info["pickled_bytes"],
                   n_train=info["n_train"], n_val=info["n_val"], seconds=seconds,
                   index_seconds=info["index_seconds"], train_seconds=info["train_seconds"],
                   trial_hwm_mb=info["vm_hwm_kb"] / 1024)


def peak_memory_mb(root: str | os.PathLike, *, steps: int, image_size: int = 224,
                   **options) -> tuple[float, int]:
    """(peak MB of the driver + trial + loader workers over ``root``, pickled TrialData bytes);
    ``options`` as :func:`run_tree`."""
    run = run_tree(root, steps=steps, image_size=image_size, **options)
    return run.peak_mb, run.pickled_bytes


def _vm_hwm_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def child_main(args: argparse.Namespace) -> None:
    """The driver and the trial in one process: index, wrap, pickle round trip, train."""
    from references.datasets import imagefolder_bundle
    from references.gabor import GaborReference
    from trainable.data import TrialData
    from trainable.train import LocalHooks, train

    t0 = time.perf_counter()
    bundle = imagefolder_bundle(args.child, image_size=args.image_size)
    data = TrialData.from_bundle(bundle, f"bench tree {args.child}")
    blob = pickle.dumps(data, protocol=5)  # what ray.put serialises
    del data, bundle
    data = pickle.loads(blob)  # what the trial's ray.get gives it
    index_seconds = time.perf_counter() - t0
    cfg = {"model": "alexnet", "layer": "conv1", "reference": "gabor", "alpha": 0.0,
           "image_size": args.image_size, "width": args.width, "batch_size": args.batch_size,
           "epochs": 1, "steps_per_epoch": args.steps, "in_memory_mb": 0,
           "loader_workers": args.workers, "val_images": args.val_images,
           "val_folds": args.val_folds, "threads": 1, "device": "cpu", "seed": 0}
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-data-trial-") as tmp:
        metrics = train(cfg, data=data, reference=GaborReference(), hooks=LocalHooks(Path(tmp)))
    info = {"pickled_bytes": len(blob), "n_train": len(data.train), "n_val": len(data.val),
            "index_seconds": index_seconds, "train_seconds": time.perf_counter() - t1,
            "images_per_second": metrics["images_per_second"], "vm_hwm_kb": _vm_hwm_kb()}
    print(CHILD_TAG + json.dumps(info), flush=True)


def write_tree(root: Path, n: int, seed: int = 0) -> Path:
    """An ImageNet-layout JPEG tree with n images per split over N_CLASSES classes."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    from imagenet_tree import write_imagenet_tree

    per_class = max(1, n // N_CLASSES)
    return write_imagenet_tree(root, layout="imagefolder", n_classes=N_CLASSES,
                               n_train=per_class, n_val=per_class, sizes=JPEG_SIZES, seed=seed)


def memory_part(workdir: Path, n: int, steps: int, repeats: int,
                env: dict[str, str] | None = None) -> float:
    """Part 1 at N and 10N, ``repeats`` child runs of each, interleaved; returns rss_growth_mb
    (median peak at 10N minus median peak at N)."""
    decoded = 3 * 224 ** 2
    print(f"memory: ImageNet-layout JPEG trees ({N_CLASSES} classes, sizes {JPEG_SIZES}), "
          f"N = {n} and 10N = {10 * n} images per split; 224 px, batch 32, {steps} training "
          f"steps (crop_flip, streamed), evaluation over the whole val split, in_memory_mb=0, "
          f"1 loader worker, 1 thread, val_images 10; {repeats} run(s) of each size, "
          f"interleaved"
          + (f"; child environment {env}" if env else ""), flush=True)
    roots = {}
    for size in (n, 10 * n):
        t0 = time.perf_counter()
        roots[size] = write_tree(workdir / f"tree-{size}", size)
        mb = sum(f.stat().st_size for f in roots[size].rglob("*.JPEG")) / 2**20
        print(f"  wrote {2 * size} JPEGs ({mb:.0f} MB) in {time.perf_counter() - t0:.1f} s",
              flush=True)
    runs: dict[int, list[TreeRun]] = {n: [], 10 * n: []}
    for _ in range(repeats):
        for size in (n, 10 * n):
            run = run_tree(roots[size], steps=steps, env=env)
            runs[size].append(run)
            print(f"  {run.n_train:>5} train + {run.n_val:>5} val: peak PSS {run.peak_mb:7.1f} MB "
                  f"over up to {run.max_processes} processes (trial process alone: sampled "
                  f"{run.trial_peak_mb:.0f} MB, VmHWM {run.trial_hwm_mb:.0f} MB; "
                  f"{run.samples} samples); pickled TrialData {run.pickled_bytes / 1024:.1f} "
                  f"KiB; child {run.seconds:.1f} s (index + pickle {run.index_seconds:.2f} s, "
                  f"train() {run.train_seconds:.1f} s)", flush=True)
    for root in roots.values():
        shutil.rmtree(root, ignore_errors=True)
    peaks = {size: [r.peak_mb for r in rs] for size, rs in runs.items()}
    med = {size: statistics.median(p) for size, p in peaks.items()}
    small, big = runs[n][0], runs[10 * n][0]
    growth = med[10 * n] - med[n]
    old = (big.n_train - small.n_train) * decoded / 2**20
    old_val = (big.n_val - small.n_val) * decoded / 2**20
    added = big.n_train + big.n_val - small.n_train - small.n_val
    for size in (n, 10 * n):
        print(f"  peak at {size:>5}: median {med[size]:.1f} MB (runs: "
              f"{', '.join(f'{p:.0f}' for p in peaks[size])})")
    print(f"  rss growth N -> 10N: {growth:+.1f} MB (goal < {RSS_GOAL_MB:.0f}); the in-memory "
          f"path would have grown by 9N x 3 x 224^2 = {old:.0f} MB for the training split "
          f"alone ({old + old_val:.0f} MB with val); pickled TrialData grew by "
          f"{(big.pickled_bytes - small.pickled_bytes) / 1024:.1f} KiB "
          f"({(big.pickled_bytes - small.pickled_bytes) / max(1, added):.0f} bytes per added "
          f"image: the path index)", flush=True)
    if old <= RSS_GOAL_MB:
        print(f"  (N = {n} is too small for the old path to break the goal: quick mode only)")
    return growth


# ----------------------------------------------------------------------------- part 2: loader


@contextlib.contextmanager
def _first_batch_waits(n_train: int):
    """Record, for every pass over the training split (a feed of ``n_train`` images), how long
    each batch took to arrive, by wrapping ``BatchFeed.epoch`` for the ``with`` block. It only
    reads the clock around ``next()``: what the step loop's own ``data_wait_seconds`` sums."""
    from trainable.data import BatchFeed

    original = BatchFeed.epoch
    passes: list[list[float]] = []

    def epoch(self, number):
        inner = original(self, number)
        if len(self) != n_train:
            yield from inner
            return
        waits: list[float] = []
        passes.append(waits)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(inner)
            except StopIteration:
                return
            waits.append(time.perf_counter() - t0)
            yield item

    BatchFeed.epoch = epoch
    try:
        yield passes
    finally:
        BatchFeed.epoch = original


def loader_part(rounds: int, epochs: int, val: int) -> float:
    """Part 2; returns loader_ratio."""
    import torch

    from references.datasets import simulated_single_label_bundle
    from references.gabor import GaborReference
    from trainable.config import TrialConfig
    from trainable.data import TrialData
    from trainable.train import LocalHooks, train

    t0 = time.perf_counter()
    bundle = simulated_single_label_bundle(image_size=64)
    data = TrialData.from_bundle(bundle, "simulated single-label").subset(len(bundle.train), val)
    batch = DEMO["batch_size"]
    steps = len(data.train) // batch
    print(f"\nloader: the demo's simulated single-label world ({len(data.train)} train PNGs, "
          f"val cut to {len(data.val)}; ready in {time.perf_counter() - t0:.1f} s); alexnet "
          f"width {DEMO['width']}, {DEMO['image_size']} px, batch {batch}, {steps} steps an "
          f"epoch, {epochs} epochs a run (the first discarded), {rounds} rounds; torch "
          f"{torch.__version__}", flush=True)
    base = dict(DEMO, epochs=epochs, val_images=min(val, 100), val_folds=5)
    modes = {"in memory": dict(base, in_memory_mb=1024), "streaming": dict(base, in_memory_mb=0)}
    ips: dict[str, list[float]] = {m: [] for m in modes}
    waits: dict[str, list[float]] = {m: [] for m in modes}
    compute_ms: dict[str, list[float]] = {m: [] for m in modes}  # per step, wait excluded
    first_ms: dict[str, list[float]] = {m: [] for m in modes}  # first batch of an epoch
    other_ms: dict[str, list[float]] = {m: [] for m in modes}  # every other batch
    round_ratios = []
    for r in range(rounds):
        this = {}
        # alternate which mode goes first, so neither always runs on a cooler machine
        for mode in (list(modes) if r % 2 == 0 else list(modes)[::-1]):
            cfg = TrialConfig(**modes[mode])
            with tempfile.TemporaryDirectory(prefix="bench-data-loader-") as tmp, \
                    _first_batch_waits(len(data.train)) as passes:
                hooks = LocalHooks(Path(tmp))
                train(cfg, data=data, reference=GaborReference(), hooks=hooks)
            kept = hooks.history[1:]
            this[mode] = statistics.median(m["images_per_second"] for m in kept)
            ips[mode].extend(m["images_per_second"] for m in kept)
            waits[mode].extend(m["data_wait_seconds"] for m in kept)
            compute_ms[mode].extend((steps * batch / m["images_per_second"]
                                     - m["data_wait_seconds"]) / steps * 1e3 for m in kept)
            for p in passes[1:]:
                first_ms[mode].append(p[0] * 1e3)
                other_ms[mode].extend(w * 1e3 for w in p[1:])
        round_ratios.append(this["streaming"] / this["in memory"])
        print(f"  round {r + 1}/{rounds}: in memory {this['in memory']:6.0f} images/s, "
              f"streaming {this['streaming']:6.0f} images/s, ratio {round_ratios[-1]:.3f}; "
              f"streaming waited {statistics.mean(waits['streaming'][-len(kept):]):.3f} s an "
              f"epoch for data", flush=True)
    med = {m: statistics.median(v) for m, v in ips.items()}
    ratio = med["streaming"] / med["in memory"]
    print(f"  median over {len(ips['streaming'])} epochs: in memory {med['in memory']:.0f} "
          f"images/s ({batch / med['in memory'] * 1e3:.1f} ms/step), streaming "
          f"{med['streaming']:.0f} images/s ({batch / med['streaming'] * 1e3:.1f} ms/step); "
          f"median of per-round ratios {statistics.median(round_ratios):.3f}")
    print(f"  data_wait_seconds an epoch ({steps} steps): streaming mean "
          f"{statistics.mean(waits['streaming']):.3f} s (median "
          f"{statistics.median(waits['streaming']):.3f}), in memory mean "
          f"{statistics.mean(waits['in memory']):.3f} s", flush=True)
    for mode in modes:
        print(f"  {mode:<9}: first batch of an epoch arrived after "
              f"{statistics.median(first_ms[mode]):.1f} ms, the others after "
              f"{statistics.median(other_ms[mode]):.2f} ms each (medians); step without the "
              f"wait {statistics.median(compute_ms[mode]):.1f} ms", flush=True)
    return ratio


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller trees, fewer rounds (about a minute, for CI)")
    parser.add_argument("--n", type=int, default=None,
                        help="images per split of the small tree (300; quick 40); the large "
                             "one has 10x")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps in the memory runs (6; quick 3)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="child runs of each tree size, interleaved (3; quick 1)")
    parser.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="run the memory children with MALLOC_MMAP_THRESHOLD_=BYTES (a "
                             "fixed glibc mmap threshold; diagnostic, not what trials run with)")
    parser.add_argument("--rounds", type=int, default=None, help="loader rounds (5; quick 1)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per loader run, the first discarded (4; quick 2)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the temporary trees go (default: a new temporary folder)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--image-size", type=int, default=224, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--width", type=float, default=0.25, help=argparse.SUPPRESS)
    parser.add_argument("--val-images", type=int, default=10, help=argparse.SUPPRESS)
    parser.add_argument("--val-folds", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child_main(args)
        return

    quick = args.quick
    n = args.n or (40 if quick else 300)
    steps = args.steps or (3 if quick else 6)
    repeats = args.repeats or (1 if quick else 3)
    rounds = args.rounds or (1 if quick else 5)
    epochs = args.epochs or (2 if quick else 4)
    if epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch of each run is discarded)")

    t_start = time.perf_counter()
    print(f"load average before: {_load()} ({os.cpu_count()} CPUs); both parts are timed on "
          f"the machine as it is, so other work running beside them moves the numbers",
          flush=True)
    made_cache = None
    if not os.environ.get("ALIGNSWEEP_CACHE"):
        made_cache = tempfile.mkdtemp(prefix="bench-data-cache-")
        os.environ["ALIGNSWEEP_CACHE"] = made_cache
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-data-", dir=args.workdir))
    try:
        env = ({"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)}
               if args.mmap_threshold is not None else None)
        growth = memory_part(workdir, n, steps, repeats, env)
        ratio = loader_part(rounds, epochs, val=100)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if made_cache:
            shutil.rmtree(made_cache, ignore_errors=True)

    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; load average after: {_load()}")
    print(f"rss growth N -> 10N {growth:.1f} MB (goal < {RSS_GOAL_MB:.0f}): "
          f"{'met' if growth < RSS_GOAL_MB else 'NOT met'}; loader ratio {ratio:.3f} "
          f"(goal >= {RATIO_GOAL}): {'met' if ratio >= RATIO_GOAL else 'NOT met'}")
    print(f"rss_growth_mb={growth:.1f} loader_ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
