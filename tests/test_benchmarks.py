"""The benchmark scripts keep working: each runs in its --quick form and ends with its summary
line. Timing is not asserted here (that is what the scripts print, measured side by side);
what is asserted is that they run end to end, print every key, and -- for the alignment
benchmark -- that ridge_cv_r2 equals scikit-learn's pipeline on the shapes it times."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "tests" / "benchmarks"


def run_bench(script: str, *args: str, timeout: int = 600) -> dict[str, float]:
    proc = subprocess.run([sys.executable, str(BENCH / script), "--quick", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    values = dict(item.split("=", 1) for item in last.split())
    return {k: float(v) for k, v in values.items()}


def test_bench_alignment_quick_matches_sklearn():
    out = run_bench("bench_alignment.py")
    assert set(out) == {"speedup_vs_sklearn", "max_abs_diff"}
    assert out["speedup_vs_sklearn"] > 0
    assert out["max_abs_diff"] <= 1e-6


def test_bench_trainable_quick_prints_every_ratio():
    out = run_bench("bench_trainable.py")
    assert set(out) == {"plain_loop_ratio", "align_overhead_gabor",
                        "align_overhead_pretrained", "align_overhead_nsd"}
    assert all(math.isfinite(v) and v > 0 for v in out.values()), out


def test_bench_sweep_quick_measures_a_real_sweep():
    out = run_bench("bench_sweep.py", "--trials", "3", "--epochs", "1")
    assert set(out) == {"sweep_efficiency", "trial_startup_s"}
    assert 0 < out["sweep_efficiency"] <= 1.0 + 1e-6, out
    assert out["trial_startup_s"] >= 0, out


def test_bench_data_quick_prints_memory_growth_and_loader_ratio():
    out = run_bench("bench_data.py")
    assert set(out) == {"rss_growth_mb", "loader_ratio"}
    assert math.isfinite(out["rss_growth_mb"]) and out["loader_ratio"] > 0, out


def test_bench_paper_shape_quick_checks_the_definition_and_prints_each_overhead():
    """Quick form: one condition per reference kind at 224 px, full width, batch 16. The script
    exits non-zero when the fast loss form differs from its float64 definition beyond the
    stated tolerance, so a passing run is also that check at the paper's geometry."""
    proc = subprocess.run([sys.executable, str(BENCH / "bench_paper_shape.py"), "--quick"],
                          cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert sum("-> ok" in line for line in lines) == 3, proc.stdout[-3000:]
    values = dict(item.split("=", 1) for item in lines[-1].split())
    assert values.pop("device") == "cpu"
    assert set(values) == {"align_overhead_paper_gabor", "align_overhead_paper_pretrained",
                           "align_overhead_paper_nsd"}
    assert all(math.isfinite(float(v)) and float(v) > 0 for v in values.values()), values
    # the breakdown names every part it was asked for
    for part in ("network forward", "network backward", "reference on the batch", "Grams",
                 "solves", "backward of the term", "explicit-residual form"):
        assert part in proc.stdout, part


def test_bench_paper_shape_refuses_an_unknown_condition():
    proc = subprocess.run([sys.executable, str(BENCH / "bench_paper_shape.py"), "--quick",
                           "--conditions", "gabor_conv9"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert "unknown condition(s) ['gabor_conv9']; accepted: gabor_conv1" in proc.stderr
    assert "Traceback" not in proc.stderr
