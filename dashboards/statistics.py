"""The paper's claim as numbers: does achieved alignment go with task performance?

Per condition, over its finished trials:

* ``spearman_ci``: Spearman's rho between achieved alignment and performance, with a
  percentile bootstrap 95 % interval (trials resampled with replacement; where a
  configuration has several seeds, rho is over the configurations' means and the seeds are
  resampled within each configuration).
* ``monotonicity``: whether performance is monotone in signed alpha (mean over betas and seeds
  at each alpha), and Spearman's rho between signed alpha and performance.

Undefined cases (too few trials, a constant variable) give NaN and a ``message`` saying why,
never an exception: a sweep with one trial still gets a report.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from dashboards.fronts import FINISHED

__all__ = ["MIN_INTERVAL", "MIN_TRIALS", "Monotonicity", "Spearman", "monotonicity", "spearman_ci",
           "sweep_statistics"]

#: Spearman's rho of fewer points is not worth a number (two points give +-1 by construction).
MIN_TRIALS = 3
#: Points (trials, or configurations with seeds) below which rho gets no bootstrap interval:
#: resamples of 3 or 4 points repeat one so often that the rhos they give are few and mostly
#: +-1 (3 points: 22 % of resamples hold all three; the interval then read "[1.000, 1.000]").
MIN_INTERVAL = 5


@dataclass(frozen=True)
class Spearman:
    """rho : Spearman correlation of the n points; low, high : bootstrap percentile interval at
    ``level``; p_value : scipy's two-sided p; n_boot_valid : resamples with a defined rho (a
    resample that repeats one point is constant and has none); message : why a value is NaN."""

    rho: float
    low: float
    high: float
    p_value: float
    n: int
    level: float
    n_boot: int
    n_boot_valid: int
    message: str = ""

    def asdict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Monotonicity:
    """alphas : distinct signed alphas, ascending; mean_performance : mean performance at each;
    trend : "increasing" (non-decreasing, not constant), "decreasing", "constant", "neither"
    or "undefined" (fewer than two alphas); monotone : trend is increasing, decreasing or
    constant (None when undefined); rho_alpha : Spearman's rho between signed alpha and
    performance over the trials (NaN when undefined); message : why something is undefined."""

    alphas: tuple[float, ...]
    mean_performance: tuple[float, ...]
    trend: str
    monotone: bool | None
    rho_alpha: float
    message: str = ""

    def asdict(self) -> dict:
        return asdict(self)


def _finite_pairs(x, y) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-d of one length, got shapes {x.shape} and "
                         f"{y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def _rank_rows(a: np.ndarray) -> np.ndarray:
    """Average ranks along axis 1 (ties share the mean rank, as Spearman's rho needs)."""
    return stats.rankdata(a, axis=1)


def _rho_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row pair (b, n), (b, n) -> (b,); NaN where a row is constant."""
    rx, ry = _rank_rows(x), _rank_rows(y)
    rx = rx - rx.mean(axis=1, keepdims=True)
    ry = ry - ry.mean(axis=1, keepdims=True)
    den = np.sqrt((rx * rx).sum(axis=1) * (ry * ry).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(axis=1) / np.where(den > 0, den, 1.0), np.nan)


def _spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about small n; the message says so
        res = stats.spearmanr(x, y)
    return float(res.statistic), float(res.pvalue)


def spearman_ci(x, y, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0,
                groups=None) -> Spearman:
    """Spearman's rho between x and y (e.g. alignment, performance) with a percentile bootstrap
    interval.

    x, y : (n,) floats; pairs with a NaN are left out. n_boot : bootstrap resamples (pairs drawn
    with replacement, numpy Generator seeded with ``seed``, so the interval is reproducible).
    level : coverage of the interval, in (0, 1). Resamples whose x or y is constant have no rho
    and are left out; if fewer than half of the resamples are usable the interval is NaN.
    groups : (n,) configuration labels, when some configuration has several seeds: rho is then
    computed on the configurations' means, and each resample is two-stage: configurations
    drawn with replacement, then each drawn configuration's seeds drawn with replacement,
    recomputing its mean (with one seed per configuration this is the pairs bootstrap above).
    Redrawing only the seeds within fixed configurations gave a point interval ([0.8, 0.8])
    as soon as one configuration had a second seed, wherever seed noise never swapped two
    configurations' ranks: more data made rho look certain.
    """
    if not 0 < level < 1:
        raise ValueError(f"level={level!r}; accepted: a number in (0, 1), e.g. 0.95")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot={n_boot!r}; accepted: an integer >= 1")
    n_in = np.asarray(x).size
    x, y, g = _finite_triples(x, y, range(n_in) if groups is None else groups)
    labels = list(dict.fromkeys(g.tolist()))
    members = [np.flatnonzero(g == lab) for lab in labels]
    k = len(labels)
    by_trial = k == g.size  # one seed per configuration: the points are the trials
    unit = "trials" if by_trial else "configurations"
    mx = np.array([x[m].mean() for m in members])
    my = np.array([y[m].mean() for m in members])
    nan = math.nan
    if k < MIN_TRIALS:
        return Spearman(nan, nan, nan, nan, k, level, n_boot, 0,
                        f"Spearman's rho needs at least {MIN_TRIALS} "
                        f"{'finished trials' if by_trial else unit} with alignment and "
                        f"performance; there are {k}")
    rho, p = _spearman(mx, my)
    if math.isnan(rho):
        which = "alignment" if np.ptp(mx) == 0 else "performance"
        return Spearman(nan, nan, nan, nan, k, level, n_boot, 0,
                        f"{which} is the same for all {k} {unit}: Spearman's rho is undefined")
    if k < MIN_INTERVAL:
        return Spearman(rho, nan, nan, p, k, level, n_boot, 0,
                        ("" if by_trial else f"rho over {k} configuration means; ")
                        + f"no bootstrap interval over {k} {unit}: their resamples give only "
                          f"a few distinct rhos (an interval needs at least {MIN_INTERVAL})")
    rng = np.random.default_rng(seed)
    if by_trial:  # pairs drawn with replacement
        idx = rng.integers(0, k, size=(n_boot, k))
        return _with_interval(rho, p, k, _rho_rows(mx[idx], my[idx]), level, n_boot,
                              "(too few distinct trials)")
    drawn = rng.integers(0, k, size=(n_boot, k))  # configurations, with replacement
    bx, by = np.empty((n_boot, k)), np.empty((n_boot, k))
    for j, m in enumerate(members):  # each draw of configuration j redraws its seeds
        at = np.nonzero(drawn == j)
        pick = m[rng.integers(0, m.size, size=(at[0].size, m.size))]
        bx[at], by[at] = x[pick].mean(1), y[pick].mean(1)
    return _with_interval(rho, p, k, _rho_rows(bx, by), level, n_boot,
                          "(too few distinct configurations)",
                          f"rho over {k} configuration means; configurations and their seeds "
                          f"resampled")


def _with_interval(rho: float, p: float, n: int, boot: np.ndarray, level: float, n_boot: int,
                   why_few: str, message: str = "") -> Spearman:
    """A Spearman result with the percentile interval of the resampled rhos ``boot`` (those
    defined); none when fewer than half of the resamples have a rho."""
    valid = boot[np.isfinite(boot)]
    if valid.size < n_boot / 2:
        return Spearman(rho, math.nan, math.nan, p, n, level, n_boot, int(valid.size),
                        f"only {valid.size} of {n_boot} bootstrap resamples have a defined rho "
                        f"{why_few}; no interval")
    tail = (1 - level) / 2
    low, high = np.quantile(valid, [tail, 1 - tail])
    return Spearman(rho, float(low), float(high), p, n, level, n_boot, int(valid.size), message)


def _finite_triples(x, y, g) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``_finite_pairs`` carrying a label per pair (labels made hashable and comparable)."""
    g = np.array([repr(v) for v in g], dtype=object)
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if g.shape != x.shape:
        raise ValueError(f"groups must give one label per pair, got {g.shape} for {x.shape}")
    fx, fy = _finite_pairs(x, y)  # validates the shapes
    keep = np.isfinite(x) & np.isfinite(y)
    return fx, fy, g[keep]


def monotonicity(alpha, performance) -> Monotonicity:
    """Is performance monotone in signed alpha?

    alpha : (n,) signed alphas of the trials; performance : (n,) their final performance (NaN
    rows are left out). Trials sharing an alpha (other betas, seeds) are averaged first; the
    trend is read from consecutive differences of those means (ties allowed: non-decreasing
    counts as increasing).
    """
    a, p = _finite_pairs(alpha, performance)
    levels = np.unique(a)
    means = np.array([p[a == v].mean() for v in levels])
    alphas, mean_perf = tuple(float(v) for v in levels), tuple(float(m) for m in means)
    if levels.size < 2:
        return Monotonicity(alphas, mean_perf, "undefined", None, math.nan,
                            f"monotonicity in alpha needs at least 2 distinct alphas among "
                            f"finished trials; there are {levels.size}")
    d = np.diff(means)
    if np.all(d == 0):
        trend = "constant"
    elif np.all(d >= 0):
        trend = "increasing"
    elif np.all(d <= 0):
        trend = "decreasing"
    else:
        trend = "neither"
    rho_alpha, _ = _spearman(a, p) if a.size >= MIN_TRIALS else (math.nan, math.nan)
    message = "" if a.size >= MIN_TRIALS else (
        f"rho(alpha, performance) needs at least {MIN_TRIALS} trials; there are {a.size}")
    return Monotonicity(alphas, mean_perf, trend, trend != "neither", rho_alpha, message)


def _at(values: list, rows: list[int]) -> np.ndarray:
    """values[rows] as floats, None -> NaN."""
    return np.array([np.nan if values[i] is None else values[i] for i in rows], dtype=np.float64)


def alignment_gap(alignment, performance, groups=None) -> dict:
    """The performance of the most aligned trial minus that of the most misaligned one, in
    points (x 100: top-1 percentage points or mAP points), over trials with both numbers:
    the paper's per-condition summary of what alignment buys. Positive: the most aligned
    trial performs better. None-valued when fewer than two trials have both.

    groups : (n,) configuration labels, as for ``spearman_ci``: with several seeds per
    configuration the gap is between configurations' means (one seed's noise would otherwise
    pick the ends; a baseline seed could be "the most misaligned")."""
    a, p, g = _finite_triples(alignment, performance,
                              range(np.asarray(alignment).size) if groups is None else groups)
    members = [np.flatnonzero(g == lab) for lab in dict.fromkeys(g.tolist())]
    a = np.array([a[m].mean() for m in members])
    p = np.array([p[m].mean() for m in members])
    if a.size < 2:
        return {"points": None, "most_aligned": None, "most_misaligned": None,
                "alignment_range": None}
    hi, lo = int(np.argmax(a)), int(np.argmin(a))
    return {"points": float(100.0 * (p[hi] - p[lo])), "most_aligned": float(p[hi]),
            "most_misaligned": float(p[lo]),
            "alignment_range": [float(a[lo]), float(a[hi])]}


def sweep_statistics(results, *, n_boot: int = 2000, seed: int = 0,
                     planned: Mapping[str, int] | None = None) -> dict[str, dict]:
    """Per condition of a results table (``dashboards.tables.RESULTS_SCHEMA``), over its
    FINISHED trials: counts, Spearman's rho between alignment and performance with its
    bootstrap interval, monotonicity of performance in signed alpha, and the gap between the
    most aligned and the most misaligned trial (``alignment_gap``; configurations' means where
    a configuration has several seeds, as rho) (plain dicts, ready for JSON). ``planned``:
    trials the run launched per condition (the parent run's ``planned`` tag): a trial that
    never started has no row, and counts "trials" all the same (a condition none of whose
    trials started is listed with 0 finished)."""
    planned = dict(planned or {})
    cols = {name: results.column(name).to_pylist()
            for name in ("condition", "status", "alpha", "alignment", "performance",
                         "performance_metric")}
    has_beta = "beta" in results.column_names and "direction" in results.column_names
    configs = ([(d, a, b) for d, a, b in zip(results.column("direction").to_pylist(),
                                              cols["alpha"], results.column("beta").to_pylist())]
               if has_beta else None)
    out: dict[str, dict] = {}
    for cond in dict.fromkeys([*cols["condition"], *planned]):
        rows = [i for i, c in enumerate(cols["condition"]) if c == cond]
        done = [i for i in rows if cols["status"][i] == FINISHED]

        metric = next((cols["performance_metric"][i] for i in done
                       if cols["performance_metric"][i]), None)
        out[cond] = {
            "trials": max(len(rows), int(planned.get(cond, 0))),
            "finished": len(done),
            "performance_metric": metric,
            "spearman": spearman_ci(_at(cols["alignment"], done), _at(cols["performance"], done),
                                    n_boot=n_boot, seed=seed,
                                    groups=[configs[i] for i in done] if configs else None
                                    ).asdict(),
            "monotonicity": monotonicity(_at(cols["alpha"], done),
                                         _at(cols["performance"], done)).asdict(),
            "gap": alignment_gap(_at(cols["alignment"], done), _at(cols["performance"], done),
                                 groups=[configs[i] for i in done] if configs else None),
        }
    return out
