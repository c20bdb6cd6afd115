"""Benchmark: trainable.alignment against the scikit-learn pipeline it must equal, side by side.

    python tests/benchmarks/bench_alignment.py [--quick]

For each shape (n, p, q) it times ``ridge_cv_r2`` and
``cross_val_score(RidgeCV(alphas), X, Y, cv=KFold(5), scoring="r2").mean()`` on the same float64
data in one process, and prints the time ratio and the absolute difference. Then it measures the
training-loss form on AlexNet conv1 features (batch 256, 64 px) against one AlexNet
forward+backward on that batch. The last line is
``speedup_vs_sklearn=<min over shapes> max_abs_diff=<max over shapes>``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torchvision
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import KFold, cross_val_score

from trainable.alignment import linear_alignment_heldout, ridge_cv_r2

SHAPES = [(2000, 20000, 500), (1000, 2000, 2000)]
QUICK_SHAPES = [(400, 4000, 100), (300, 600, 600)]


def _data(n: int, p: int, q: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two noisy views of 20 shared latent factors (like a layer and voxels seeing the same
    stimuli), so R^2 is well inside (0, 1) and the best alpha is interior."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 20))
    x = z @ rng.standard_normal((20, p)) + 3.0 * rng.standard_normal((n, p))
    y = z @ rng.standard_normal((20, q)) + 3.0 * rng.standard_normal((n, q))
    return x, y


def _best_of(fn, repeats: int) -> tuple[float, float]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_ridge(shapes, alphas, repeats: int) -> tuple[float, float]:
    speedups, diffs = [], []
    for n, p, q in shapes:
        x, y = _data(n, p, q, seed=n + p + q)
        t_ours, ours = _best_of(lambda x=x, y=y: ridge_cv_r2(x, y, alphas=alphas, folds=5),
                                repeats)
        t_skl, ref = _best_of(
            lambda x=x, y=y: cross_val_score(
                RidgeCV(alphas=alphas), x, y, cv=KFold(5), scoring="r2"
            ).mean(),
            repeats,
        )
        diff = abs(float(ours) - float(ref))
        speedups.append(t_skl / t_ours)
        diffs.append(diff)
        print(
            f"ridge_cv_r2 n={n} p={p} q={q}: ours {t_ours:.2f} s, sklearn {t_skl:.2f} s, "
            f"speedup {t_skl / t_ours:.1f}x, r2 {float(ours):.6f} vs {float(ref):.6f}, "
            f"abs diff {diff:.2e}",
            flush=True,
        )
    return min(speedups), max(diffs)


def bench_loss_form(batch: int, size: int, repeats: int) -> None:
    torch.manual_seed(0)
    model = torchvision.models.alexnet(weights=None, num_classes=80)
    images = torch.randn(batch, 3, size, size)
    labels = torch.randint(0, 80, (batch,))
    conv1 = model.features[0]
    target = torch.randn(batch, 108, 15, 15)  # a Gabor-bank-sized reference, conv1 geometry

    def step_plain():
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images), labels).backward()

    def align_only():
        feats = conv1(images)  # the tapped activations; conv1's own cost is in step_plain
        feats = feats.detach().requires_grad_(True)
        score = linear_alignment_heldout(feats, target)
        (-score).backward()

    step_plain()
    align_only()
    t_step, _ = _best_of(step_plain, repeats)
    t_align, _ = _best_of(align_only, repeats)
    print(
        f"loss form on conv1 (batch {batch}, {size} px, features {64 * 15 * 15}): "
        f"{t_align * 1e3:.1f} ms vs AlexNet forward+backward {t_step * 1e3:.1f} ms, "
        f"ratio {t_align / t_step:.2f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (seconds, for CI)")
    args = parser.parse_args()
    alphas = np.logspace(-2, 5, 10)
    print(f"torch threads: {torch.get_num_threads()}", flush=True)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    speedup, diff = bench_ridge(shapes, alphas, repeats=1 if not args.quick else 3)
    bench_loss_form(batch=256, size=64, repeats=3)
    print(f"speedup_vs_sklearn={speedup:.1f} max_abs_diff={diff:.1e}")


if __name__ == "__main__":
    main()
