"""Pareto fronts of a sweep: pure functions over arrays and over the results table.

Two fronts per condition (the paper's Figures 1b and 2a-d), both with performance up:

* ``front_up``: the non-dominated trials for (performance up, alignment up): no other trial is
  at least as good in both and strictly better in one.
* ``front_down``: the same for (performance up, alignment down).

Dominance with ties, exactly: point j dominates i when ``perf_j >= perf_i`` and
``align_j >= align_i`` (``<=`` for the down front) with at least one of the two strict. So
duplicates of a front point are all on the front (none is strictly better than its copy), and a
point tied with a front point in one coordinate and worse in the other is not. Points with a
NaN coordinate take no part: never on a front, never dominating.

Degradation (performance minus the baseline's) differs from performance by a constant per
condition, so both give the same fronts.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

__all__ = ["FINISHED", "front_line", "front_masks", "pareto_mask"]

FINISHED = "FINISHED"


def pareto_mask(performance, alignment, *, alignment_up: bool) -> np.ndarray:
    """Non-dominated points for (performance up, alignment up or down).

    performance, alignment : (n,) floats; NaN marks a point that takes no part.
    alignment_up : True for the (up, up) front, False for (performance up, alignment down).
    Returns (n,) bool: True on the front. O(n log n): sort by alignment (best first); a point
    is on the front iff its performance is the best of its alignment tie group and strictly
    above every performance seen at strictly better alignment.
    """
    p = np.asarray(performance, dtype=np.float64)
    a = np.asarray(alignment, dtype=np.float64)
    if p.ndim != 1 or p.shape != a.shape:
        raise ValueError(f"performance and alignment must be 1-d of one length, got shapes "
                         f"{p.shape} and {a.shape}")
    out = np.zeros(p.shape, dtype=bool)
    valid = np.flatnonzero(np.isfinite(p) & np.isfinite(a))
    if valid.size == 0:
        return out
    key = -a[valid] if alignment_up else a[valid]  # ascending key = best alignment first
    order = valid[np.lexsort((-p[valid], key))]
    keys = (-a if alignment_up else a)[order]
    best_before = -np.inf  # best performance at strictly better alignment
    start = 0
    while start < order.size:
        stop = start
        while stop < order.size and keys[stop] == keys[start]:
            stop += 1
        group = order[start:stop]
        top = p[group[0]]  # sorted by performance descending within the group
        if top > best_before:
            out[group[p[group] == top]] = True
        best_before = max(best_before, top)
        start = stop
    return out


def _floats(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name)
    return np.array([np.nan if v is None else float(v) for v in col.to_pylist()],
                    dtype=np.float64)


def front_masks(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(front_up, front_down) for every row of a results table, each (n_rows,) bool.

    table : needs columns ``condition``, ``status``, ``performance``, ``alignment``. Fronts are
    computed per condition over the FINISHED rows with finite performance and alignment; any
    other row is on neither front. With ``performance_mean`` and ``alignment_mean`` (the
    across-seed means of each row's configuration, ``dashboards.tables``) the fronts are
    computed on those: the seeds of a configuration share one point and one front flag.
    """
    missing = {"condition", "status", "performance", "alignment"} - set(table.column_names)
    if missing:
        raise ValueError(f"front_masks needs columns {sorted(missing)}; the table has "
                         f"{table.column_names}")
    means = {"performance_mean", "alignment_mean"} <= set(table.column_names)
    perf = _floats(table, "performance_mean" if means else "performance")
    align = _floats(table, "alignment_mean" if means else "alignment")
    ok = np.array([s == FINISHED for s in table.column("status").to_pylist()], dtype=bool)
    if means:  # a row is flagged only if it is itself one of the trials its point averages
        ok &= np.isfinite(_floats(table, "performance")) & np.isfinite(
            _floats(table, "alignment"))
    perf = np.where(ok, perf, np.nan)
    conditions = np.array(table.column("condition").to_pylist(), dtype=object)
    up = np.zeros(table.num_rows, dtype=bool)
    down = np.zeros(table.num_rows, dtype=bool)
    for cond in dict.fromkeys(conditions.tolist()):
        rows = np.flatnonzero(conditions == cond)
        up[rows] = pareto_mask(perf[rows], align[rows], alignment_up=True)
        down[rows] = pareto_mask(perf[rows], align[rows], alignment_up=False)
    return up, down


def front_line(x, y, mask) -> tuple[np.ndarray, np.ndarray]:
    """The front's points in drawing order (by x, then y): (x[mask], y[mask]) sorted."""
    x = np.asarray(x, dtype=np.float64)[np.asarray(mask, dtype=bool)]
    y = np.asarray(y, dtype=np.float64)[np.asarray(mask, dtype=bool)]
    order = np.lexsort((y, x))
    return x[order], y[order]
