"""Benchmark: what the alignment term costs at the paper's shape, part by part, with its FLOPs.

    python tests/benchmarks/bench_paper_shape.py [--quick] [--batch N] [--device auto|cpu|cuda]
        [--conditions gabor_conv1,...] [--rounds R] [--threads T]

The paper's seven conditions at their own geometry, read from ``sweeps/conditions/*.toml``
([paper]: 224 px, full-width torchvision AlexNet or ResNet-18, the condition's tap and trial
options such as ``rectify``), each with its reference kind: the Gabor bank, a frozen network
of the same architecture (a freshly initialised one saved as a state-dict file and loaded
through the reference registry: the per-step cost does not depend on the weights), or
voxel-like responses (``VoxelResponses`` of one subject who saw every image: the whole batch
is one group, the most expensive case; ``--v1-voxels`` / ``--vvs-voxels`` voxels).

On a CUDA device the batch is the paper's (1000) and the trainable's own precision applies
(bf16 autocast for the network and an image-computed reference, TF32 Gram products,
float64 solves). On a CPU the default batch is 128. Images and labels are random (uint8,
224 px): only the step's cost is measured.

For each condition, in one process:

1. Is the fast loss form the score's definition? On one batch, the score and its gradient
   with respect to the layer, as the trainable computes them (the layer and reference in
   their training precision), against ``linear_alignment_heldout_definition`` (explicit
   held-out residuals) on float64 copies. Stated tolerance: 1e-4 absolute on the score, 1e-3
   relative (L2) on the gradient; the script exits non-zero if a condition exceeds it.
2. The per-part breakdown of one step, each part timed on its own (best of a few), with its
   FLOP model beside it: network forward and backward (task only; FLOPs from PyTorch's
   FlopCounterMode), the reference on the batch, the Gram matrices (Kx of the layer, Ky and
   Kw of the reference: 2 n^2 (p + 2q)), the float64 solves (held-out operators and their
   contractions: ~6 n^3), the backward of the term (Kx's one product 2 n^2 p, and the solves'
   own), and -- for comparison, on the same batch -- the previous explicit-residual form in
   the inputs' dtype (two more (n, n) x (n, p|q) products forward and two backward).
3. Side by side: the trainable's own epoch loop (``train_one_epoch``) with the alignment
   term (alpha = 1) and without it (alpha = 0, batch alignment never measured), rounds
   interleaved, best round kept (median printed too).

The last line is
``align_overhead_paper_gabor=<x> align_overhead_paper_pretrained=<x> align_overhead_paper_nsd=<x> device=<cpu|cuda>``
where each value is the largest overhead (step with the term / step without) among the
measured conditions of that reference kind.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from references.datasets import VoxelResponses  # noqa: E402
from references.gabor import GaborReference  # noqa: E402
from references.pretrained import pretrained_reference  # noqa: E402
from trainable import alignment as A  # noqa: E402
from trainable.config import TrialConfig  # noqa: E402
from trainable.data import BatchFeed, TensorSplit, fix_mmap_threshold, normalize  # noqa: E402
from trainable.models import build_model  # noqa: E402
from trainable.train import (  # noqa: E402
    _autocast,
    _layer_features,
    _reference_features,
    reference_groups,
    task_loss,
    train_one_epoch,
    training_schedule,
)

CONDITIONS_DIR = REPO / "sweeps" / "conditions"
KINDS = ("gabor", "pretrained", "nsd")
NUM_CLASSES = {"single_label": 1000, "multi_label": 80}  # ImageNet; COCO-80
SCORE_TOL, GRAD_TOL = 1e-4, 1e-3


# ----------------------------------------------------------------------------- set-up


@dataclass
class Condition:
    name: str
    model: str
    layer: str
    reference: str
    task: str
    roi: str
    image_size: int
    width: float
    trial: dict

    @classmethod
    def read(cls, path: Path) -> Condition:
        spec = tomllib.loads(path.read_text())
        paper = spec["paper"]
        return cls(path.stem, spec["model"], spec["layer"], spec["reference"], spec["task"],
                   spec.get("roi", ""), int(paper["image_size"]), float(paper["width"]),
                   dict(paper.get("trial", {})))


def paper_conditions() -> dict[str, Condition]:
    files = [p for p in sorted(CONDITIONS_DIR.glob("*.toml")) if p.stem != "paper"]  # "paper": all
    return {c.name: c for c in map(Condition.read, files)}


def random_split(n: int, size: int, task: str, seed: int) -> TensorSplit:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    if task == "single_label":
        targets = torch.randint(0, NUM_CLASSES[task], (n,), generator=g)
    else:
        targets = (torch.rand(n, NUM_CLASSES[task], generator=g) < 0.05).float()
    return TensorSplit(images, targets, torch.arange(n))


def build_reference(cond: Condition, n_images: int, voxels: dict[str, int], tmp: Path,
                    device: torch.device):
    if cond.reference == "gabor":
        return GaborReference()
    if cond.reference == "pretrained":
        net = build_model(cond.model, num_classes=NUM_CLASSES[cond.task], width=cond.width,
                          seed=10_000)
        path = tmp / f"{cond.name}-reference.pt"
        torch.save(net.net.state_dict(), path)
        return pretrained_reference(cond.model, cond.layer, str(path), device=device)
    q = voxels[cond.roi]
    g = torch.Generator().manual_seed(1)
    responses = VoxelResponses({1: (torch.arange(n_images), torch.randn(n_images, q, generator=g))},
                               roi=cond.roi)
    return responses.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Best of ``repeats`` timings (s) after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def flops_of(fn: Callable[[], object]) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


# ----------------------------------------------------------------------------- the term's parts


def explicit_residual_form(x: torch.Tensor, y: torch.Tensor, rel: float) -> torch.Tensor:
    """The loss form as it was computed before the Gram-only form (for the breakdown's
    comparison row): autograd's own Gram rule, and each direction's held-out residuals
    ``R @ target`` as an (n, n) x (n, p|q) product in the inputs' dtype."""

    def gram(a):
        ac = a - a.mean(0)
        return (ac @ ac.T).to(torch.float64)

    def r2(k, target, uniform):
        resid = A._heldout_operator(k, rel, None).to(target.dtype) @ target
        sse = (resid**2).sum(0)
        sst = ((target - target.mean(0)) ** 2).sum(0)
        if uniform:
            live = ~A.constant_columns(target)
            return (1.0 - sse[live] / sst[live]).mean()
        return 1.0 - sse.sum() / sst.sum()

    return (r2(gram(x), y, True) + r2(gram(y), x, False)) / 2


@dataclass
class Breakdown:
    rows: list[tuple[str, float, float]] = field(default_factory=list)  # (part, s, flops)

    def add(self, part: str, seconds: float, flops: float) -> None:
        self.rows.append((part, seconds, flops))

    def print(self) -> None:
        for part, s, fl in self.rows:
            rate = f"{fl / s / 1e9:8.1f} GFLOP/s" if fl > 0 and s > 0 else ""
            print(f"    {part:<44} {s * 1e3:9.1f} ms {fl / 1e9:10.2f} GFLOP {rate}", flush=True)


def check_and_break_down(cond: Condition, cfg: TrialConfig, model, reference,
                         split: TensorSplit, device: torch.device, repeats: int) -> bool:
    """Equality with the definition (printed, returned) and the per-part breakdown."""
    n = cfg.batch_size
    images = normalize(split.images[:n].to(device))
    ids = split.image_ids[:n].to(device)
    targets = split.targets[:n].to(device)
    model.train()

    def forward():
        with _autocast(cfg, device):
            logits, taps = model(images, taps=(cfg.layer,))
            return task_loss(logits, targets, cond.task), taps[cfg.layer]

    def forward_backward():
        model.zero_grad(set_to_none=True)
        loss, _ = forward()
        loss.backward()

    def reference_on_batch():
        with _autocast(cfg, device):
            return [(rows, _reference_features(y, cfg))
                    for rows, y in reference_groups(reference, images, ids).values()]

    with torch.no_grad():
        _, tap = forward()
    feats = _layer_features(tap, cfg).flatten(1).detach()
    groups = [(rows, y.flatten(1)) for rows, y in reference_on_batch()]

    # 1. the fast form against the definition, float64
    ok = True
    for rows, y in groups:
        x = feats[rows].clone().requires_grad_(True)
        fast = A.linear_alignment_heldout(x, y, rel=cfg.ridge_rel)
        fast.backward()
        x64 = feats[rows].double().requires_grad_(True)
        exact = A.linear_alignment_heldout_definition(x64, y.double(), rel=cfg.ridge_rel)
        exact.backward()
        d_score = abs(float(fast.detach()) - float(exact.detach()))
        d_grad = float((x.grad.double() - x64.grad).norm() / x64.grad.norm())
        good = d_score <= SCORE_TOL and d_grad <= GRAD_TOL
        ok &= good
        print(f"  equal to the definition (float64): score {float(exact.detach()):+.6f}, "
              f"|diff| {d_score:.1e} (tol {SCORE_TOL:g}); gradient relative L2 error "
              f"{d_grad:.1e} (tol {GRAD_TOL:g}) -> {'ok' if good else 'EXCEEDS THE TOLERANCE'}",
              flush=True)
        del x64, exact

    # 2. parts, each timed on its own
    out = Breakdown()
    t_fwd = best_time(lambda: forward(), device, repeats)
    t_fb = best_time(forward_backward, device, repeats)
    fl_fb = flops_of(forward_backward)
    fl_f = flops_of(lambda: forward())
    out.add("network forward (+ task loss)", t_fwd, fl_f)
    out.add("network backward (task only)", t_fb - t_fwd, fl_fb - fl_f)
    out.add("reference on the batch", best_time(reference_on_batch, device, repeats),
            flops_of(reference_on_batch))

    p = feats.shape[1]
    fl_gram = fl_solve = fl_back = fl_old = 0.0
    t_gram = t_solve = t_total = t_old = 0.0
    for rows, y in groups:
        m, q = rows.numel(), y.shape[1]
        x_in = feats[rows]
        fl_gram += 2 * m * m * (p + 2 * q)
        fl_solve += 6 * m**3
        fl_back += 2 * m * m * p + 6 * m**3
        fl_old += 2 * m * m * (p + q) + 2 * m * m * (2 * p + q) + 2 * m * m * 2 * p + 12 * m**3

        def grams(x_in=x_in, y=y):
            return A._centred_gram(x_in), A._target_grams(y)

        kx, (ky, kw, live) = grams()

        def solves(kx=kx, ky=ky, kw=kw, live=live):
            return (A._heldout_r2_from_grams(kx, kw, float(live), cfg.ridge_rel, None)
                    + A._heldout_r2_from_grams(ky, kx, torch.diagonal(kx).sum(),
                                               cfg.ridge_rel, None))

        def whole(x_in=x_in, y=y):
            x = x_in.detach().requires_grad_(True)
            A.linear_alignment_heldout(x, y, rel=cfg.ridge_rel).backward()

        def old(x_in=x_in, y=y):
            x = x_in.detach().requires_grad_(True)
            explicit_residual_form(x, y, cfg.ridge_rel).backward()

        t_gram += best_time(grams, device, repeats)
        t_solve += best_time(solves, device, repeats)
        t_total += best_time(whole, device, repeats)
        t_old += best_time(old, device, repeats)
    out.add("Grams Kx, Ky, Kw (forward)", t_gram, fl_gram)
    out.add("solves + contractions (float64, forward)", t_solve, fl_solve)
    out.add("backward of the term", max(0.0, t_total - t_gram - t_solve), fl_back)
    out.add("= the term, forward + backward", t_total, fl_gram + fl_solve + fl_back)
    out.add("  before: explicit-residual form, fwd + bwd", t_old, fl_old)
    out.print()
    print(f"    the term is {t_total / t_fb:.1%} of the network's forward + backward by time, "
          f"{(fl_gram + fl_solve + fl_back) / fl_fb:.1%} by FLOPs; {t_old / t_total:.2f}x "
          f"faster than the explicit-residual form", flush=True)
    return ok


# ----------------------------------------------------------------------------- side by side


@dataclass
class Variant:
    name: str
    run: Callable[[], float]
    times: list[float] = field(default_factory=list)


def step_variant(name: str, cond: Condition, cfg: TrialConfig, reference, split: TensorSplit,
                 device: torch.device) -> Variant:
    """The trainable's epoch loop on ``split`` (whole batches), its own model and Adam."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_classes=NUM_CLASSES[cond.task], width=cfg.width).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps = len(split) // cfg.batch_size
    feed = BatchFeed(split, schedule=training_schedule(len(split), cfg), workers=0,
                     device=device, image_size=cfg.image_size)
    epoch = [0]

    def run() -> float:
        sync(device)
        t0 = time.perf_counter()
        train_one_epoch(model, optimizer, feed, reference, cfg, cond.task, epoch[0], device,
                        "flip")
        sync(device)
        epoch[0] += 1
        return (time.perf_counter() - t0) / steps

    return Variant(name, run)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="one condition per reference kind, batch 16, one round (for CI)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--batch", type=int, default=0,
                        help="batch size (default: 1000 on CUDA as the paper, 128 on CPU)")
    parser.add_argument("--conditions", default="",
                        help="comma-separated condition names (default: all seven)")
    parser.add_argument("--rounds", type=int, default=0, help="timed rounds (default 3)")
    parser.add_argument("--steps", type=int, default=0, help="steps per round (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    parser.add_argument("--no-breakdown", action="store_true",
                        help="only the side-by-side steps (no equality check, no breakdown)")
    parser.add_argument("--v1-voxels", type=int, default=2000,
                        help="voxels of a V1-like reference (one subject)")
    parser.add_argument("--vvs-voxels", type=int, default=8000,
                        help="voxels of a VVS-like reference (one subject)")
    args = parser.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible; accepted: auto, cpu", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    fix_mmap_threshold()  # as train() does in a trial process
    conditions = paper_conditions()
    chosen = [c for c in args.conditions.split(",") if c] or (
        ["gabor_conv1", "pretrained_conv1", "nsd_conv1_v1"] if args.quick else list(conditions))
    unknown = [c for c in chosen if c not in conditions]
    if unknown:
        print(f"unknown condition(s) {unknown}; accepted: {', '.join(conditions)}",
              file=sys.stderr)
        return 2
    batch = args.batch or (16 if args.quick else (1000 if device.type == "cuda" else 128))
    rounds = args.rounds or (1 if args.quick else 3)
    steps = args.steps or (1 if args.quick else 2)
    warmup = 1
    repeats = 1 if args.quick else 3
    voxels = {"V1": args.v1_voxels, "VVS": args.vvs_voxels}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__} on {name} ({device.type}), threads "
          f"{torch.get_num_threads()}; batch {batch}, {steps} steps a round, {rounds} rounds "
          f"after {warmup} warm-up; conditions: {', '.join(chosen)}", flush=True)

    overheads: dict[str, list[float]] = {k: [] for k in KINDS}
    all_ok = True
    with tempfile.TemporaryDirectory(prefix="bench-paper-") as tmp:
        for cname in chosen:
            cond = conditions[cname]
            base = dict(model=cond.model, layer=cond.layer, reference=cond.reference,
                        batch_size=batch, image_size=cond.image_size, width=cond.width,
                        lr=1e-4, seed=0, device=device.type, threads=0, **cond.trial)
            # the baseline never measures the batch alignment (0 = never; a large k would
            # still measure step 0 of every epoch, here every other step)
            cfg0 = TrialConfig(**base, alpha=0.0, align_batch_every=0)
            cfg1 = TrialConfig(**base, alpha=1.0)
            split = random_split(batch * steps, cond.image_size, cond.task, seed=0)
            if device.type == "cuda":
                # the batches are gathered on the GPU: a trial's loader workers prepare them
                # beside the step, but here the step would wait for a 144 MiB host gather and
                # an unpinned copy, the same in both variants (every ratio pulled towards 1)
                split = TensorSplit(split.images.to(device), split.targets.to(device),
                                    split.image_ids.to(device))
            reference = build_reference(cond, len(split), voxels, Path(tmp), device)
            print(f"\n{cname}: {cond.model} {cond.layer}, reference {cond.reference}"
                  f"{' ' + cond.roi + f' ({voxels[cond.roi]} voxels)' if cond.roi else ''}, "
                  f"{cond.image_size} px, width {cond.width:g}, trial options {cond.trial}",
                  flush=True)
            if not args.no_breakdown:
                torch.manual_seed(0)
                model = build_model(cond.model, num_classes=NUM_CLASSES[cond.task],
                                    width=cond.width).to(device)
                all_ok &= check_and_break_down(cond, cfg1, model, reference, split, device,
                                               repeats)
                del model
            pair = [step_variant("without the term", cond, cfg0, reference, split, device),
                    step_variant("with the term", cond, cfg1, reference, split, device)]
            for r in range(warmup + rounds):
                this = [v.run() for v in pair]
                if r >= warmup:
                    for v, t in zip(pair, this):
                        v.times.append(t)
            v0, v1 = pair
            ratio = min(v1.times) / min(v0.times)
            overheads[cond.reference].append(ratio)
            print(f"  step without the term {min(v0.times):.3f} s, with {min(v1.times):.3f} s "
                  f"(best of {rounds}; medians {statistics.median(v0.times):.3f} / "
                  f"{statistics.median(v1.times):.3f}): overhead {ratio:.3f}x", flush=True)
            del pair, reference, split
            if device.type == "cuda":
                torch.cuda.empty_cache()

    print("\noverhead per condition:")
    summary = {}
    for kind in KINDS:
        summary[kind] = max(overheads[kind]) if overheads[kind] else math.nan
        print(f"  {kind:<10} {', '.join(f'{x:.3f}' for x in overheads[kind]) or 'not measured'}")
    if not all_ok:
        print("the fast loss form differs from its definition beyond the stated tolerance",
              file=sys.stderr)
    print(" ".join(f"align_overhead_paper_{k}={summary[k]:.2f}" for k in KINDS)
          + f" device={device.type}", flush=True)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
