"""The sweep's figures, as matplotlib ``Figure`` objects (Agg canvas, no pyplot: no global
figure state shared between calls, threads or tests), saved as PNG and SVG.

* ``front_figure``: the drop from the condition's mean baseline against achieved alignment,
  coloured by direction, sized by |alpha|, each configuration's mean over its seeds, both
  Pareto fronts drawn through those means, above the points; one panel per condition (the
  paper's Figures 1b and 2a-d).
* ``epochs_figure``: validation performance per epoch (integer epoch ticks), one line per trial
  coloured by direction, the mean of each direction bold (Figure A.1).
* ``filters_figure``: conv1 filter grids of the maximally aligned, minimally aligned and
  baseline models beside the reference bank; one row per condition (Figure 1c). Only the Gabor
  reference is a filter bank; for the others the panel says so.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from dashboards.fronts import FINISHED, front_line
from dashboards.tables import POINTS, mean_interval
from references.cache import atomic_write_bytes

__all__ = [
    "COLORS",
    "FilterPanel",
    "FilterRow",
    "epochs_figure",
    "filters_figure",
    "front_figure",
    "save_figure",
]

COLORS = {"max": "#c0392b", "min": "#2471a3", "none": "#1b1b1b"}
LABELS = {"max": "max (alpha > 0)", "min": "min (alpha < 0)", "none": "baseline (alpha = 0)"}
PERF_NAMES = {"top1": "top-1 accuracy", "map": "mAP", None: "performance"}
# Fronts: lines through their points, with open markers so a one-point front still shows.
FRONT_STYLE = {
    "up": {"color": "#6c3483", "ls": "-", "lw": 1.6, "marker": "o", "ms": 11, "mfc": "none"},
    "down": {"color": "#117a65", "ls": "--", "lw": 1.6, "marker": "s", "ms": 13, "mfc": "none"},
}


#: a panel title's line width in characters: a condition's name may be 100 bytes, and three
#: unwrapped titles in a row ran into each other
TITLE_WIDTH = 44
#: every text that can hold a name or a path is shown as written: matplotlib reads the part
#: between two ``$`` as TeX (``budget_$1k_vs_$2k`` raised a parse error and the sweep got no
#: report; ``cost $5-$10`` showed as "cost 5 - 10"). Set per text, not in the process-wide
#: rcParams, which other threads' figures share.
AS_WRITTEN = {"parse_math": False}


def _title(name: str) -> str:
    """A condition's name (or a trial's caption) wrapped to the panel's width."""
    return "\n".join(textwrap.wrap(name, TITLE_WIDTH, break_on_hyphens=False)) or name


def _figure(n_panels: int, *, panel: tuple[float, float], ncols: int = 3):
    ncols = max(1, min(ncols, n_panels))
    nrows = max(1, math.ceil(n_panels / ncols))
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes


def _column(table: pa.Table, name: str) -> np.ndarray:
    values = table.column(name).to_pylist()
    if pa.types.is_floating(table.schema.field(name).type):
        return np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    return np.array(values, dtype=object)


def _conditions(table: pa.Table) -> list[str]:
    return list(dict.fromkeys(table.column("condition").to_pylist()))


def _empty(ax, text: str, width: int = 36) -> None:
    ax.text(0.5, 0.5, textwrap.fill(text, width), ha="center", va="center", fontsize=9,
            **AS_WRITTEN,
            transform=ax.transAxes, color="#555555")
    ax.set_xticks([])
    ax.set_yticks([])


def _perf_name(rows: pa.Table) -> str:
    names = [n for n in rows.column("performance_metric").to_pylist() if n]
    return PERF_NAMES.get(names[0] if names else None, "performance")


def _baseline(rows: pa.Table) -> tuple[float | None, int]:
    """The condition's mean baseline and how many trials it averages: the mean performance
    of its finished alpha = 0 trials (the pool ``dashboards.tables.baselines`` falls back on);
    (None, 0) without one."""
    perf = _column(rows, "performance")
    ok = (_column(rows, "direction") == "none") & (_column(rows, "status") == FINISHED)
    ok &= np.isfinite(perf)
    return (float(perf[ok].mean()) if ok.any() else None), int(ok.sum())


def _configurations(rows: pa.Table) -> np.ndarray:
    """Per row, a label of its configuration (everything but the seed)."""
    return np.array([repr(k) for k in zip(*(rows.column(c).to_pylist()
                                            for c in ("direction", "alpha", "beta")))])


def _configuration_means(rows: pa.Table, ok: np.ndarray) -> dict[str, np.ndarray]:
    """Per row, its configuration's across-seed mean and interval of performance and
    alignment: the table's columns (what the fronts use) when it has them, else computed here
    over the ``ok`` rows (``mean_interval``, as ``dashboards.tables`` does)."""
    names = [f"{m}_{k}" for m in ("performance", "alignment") for k in ("mean", "low", "high")]
    if set(names) <= set(rows.column_names):
        return {n: _column(rows, n) for n in names}
    keys = _configurations(rows)
    out = {n: np.full(rows.num_rows, np.nan) for n in names}
    for k in set(keys[ok]):
        sel = keys == k
        for m in ("performance", "alignment"):
            stats = mean_interval(_column(rows, m)[sel & ok].tolist())
            for name, v in zip(("mean", "low", "high"), stats):
                out[f"{m}_{name}"][sel] = np.nan if v is None else v
    return out


def front_figure(results: pa.Table, statistics: Mapping[str, Mapping] | None = None) -> Figure:
    """Degradation vs alignment per condition, with both fronts.

    results : a results table (``dashboards.tables.RESULTS_SCHEMA``). Only FINISHED trials with
    finite alignment and performance are drawn. The y axis is the drop from the condition's
    mean baseline (``_baseline``) in points, the same baseline for every trial and seed, so a
    configuration's point, 100 * (mean baseline - performance_mean), is the mean of its seeds'
    and orders the configurations as the fronts do (on performance_mean, alignment_mean).
    Without a baseline it is the raw performance (and says so). statistics : condition ->
    ``sweep_statistics`` entry; its Spearman rho and interval go in the panel title.
    """
    conds = _conditions(results) or ["(no trials)"]
    fig, axes = _figure(len(conds), panel=(5.4, 4.4))
    for ax, cond in zip(axes, conds):
        ax.set_title(_title(cond), fontsize=10, **AS_WRITTEN)
        if cond == "(no trials)":
            _empty(ax, "no trials in this sweep")
            continue
        rows = results.filter(pc.equal(results.column("condition"), cond))
        status = _column(rows, "status")
        align = _column(rows, "alignment")
        base, n_base = _baseline(rows)
        has_base = base is not None

        def to_y(perf, base=base):
            return POINTS * (base - perf) if base is not None else perf

        y = to_y(_column(rows, "performance"))
        ok = (status == FINISHED) & np.isfinite(align) & np.isfinite(y)
        if not ok.any():
            _empty(ax, "no finished trial with alignment and performance")
            continue
        direction = _column(rows, "direction")
        alpha = np.abs(_column(rows, "alpha"))
        top = np.nanmax(alpha[ok]) if np.isfinite(alpha[ok]).any() else 0.0
        sizes = 30 + 170 * (alpha / top if top > 0 else np.zeros_like(alpha))
        for d in ("max", "min", "none"):
            sel = ok & (direction == d)
            if sel.any():
                ax.scatter(align[sel], y[sel], s=160 if d == "none" else sizes[sel],
                           c=COLORS[d], marker="*" if d == "none" else "o", alpha=0.85,
                           edgecolors="white", linewidths=0.6, zorder=3)
        # A configuration with several seeds: its mean with its 95% interval on both axes. The
        # fronts (computed on the means, dashboards.fronts) go through every one's mean.
        means = _configuration_means(rows, ok)
        fx_all, fy_all = means["alignment_mean"], to_y(means["performance_mean"])
        keys, seen = _configurations(rows), set()
        for i in np.flatnonzero(ok & np.isfinite(means["performance_low"])
                                & np.isfinite(means["alignment_low"])):
            if keys[i] in seen:
                continue
            seen.add(keys[i])
            xm, ym = fx_all[i], fy_all[i]
            ys = sorted(to_y(np.array([means["performance_low"][i],
                                       means["performance_high"][i]])))
            ax.errorbar([xm], [ym], xerr=[[xm - means["alignment_low"][i]],
                                          [means["alignment_high"][i] - xm]],
                        yerr=[[ym - ys[0]], [ys[1] - ym]], fmt="D", ms=4,
                        color=COLORS[direction[i]], ecolor=COLORS[direction[i]], elinewidth=1,
                        capsize=2, zorder=4)
        for key, col in (("up", "front_up"), ("down", "front_down")):
            mask = np.array(rows.column(col).to_pylist(), dtype=bool) & ok
            if mask.any():  # above the points and means: a one-point front stays visible
                fx, fy = front_line(fx_all, fy_all, mask)
                ax.plot(fx, fy, zorder=5, gid=col, **FRONT_STYLE[key])
        if has_base:
            ax.axhline(0.0, color="#999999", lw=0.8, zorder=1)
        perf_name = _perf_name(rows)
        metrics = sorted({m for m in rows.column("metric").to_pylist() if m} or {"linear"})
        ax.set_xlabel(f"achieved alignment (validation, {', '.join(metrics)})")
        ax.set_ylabel(f"drop from {'mean ' if n_base > 1 else ''}baseline\n({perf_name} "
                      f"points; + = worse)" if has_base
                      else f"{perf_name} (no baseline: not relative)")
        stats = (statistics or {}).get(cond, {}).get("spearman") or {}
        rho = stats.get("rho", math.nan)
        if rho is not None and math.isfinite(rho):
            lo, hi = stats.get("low", math.nan), stats.get("high", math.nan)
            ci = (f" [{lo:.2f}, {hi:.2f}]" if lo is not None and math.isfinite(lo) else "")
            ax.set_title(f"{_title(cond)}\nSpearman rho = {rho:.2f}{ci}", fontsize=10,
                         **AS_WRITTEN)
        ax.grid(alpha=0.25)
    handles = [Line2D([], [], marker="*" if d == "none" else "o", ls="", color=COLORS[d],
                      markersize=10 if d == "none" else 7, label=LABELS[d])
               for d in ("max", "min", "none")]
    handles += [Line2D([], [], label="front (performance up, alignment up)",
                       **{**FRONT_STYLE["up"], "ms": 8}),
                Line2D([], [], label="front (performance up, alignment down)",
                       **{**FRONT_STYLE["down"], "ms": 8})]
    fig.legend(handles=handles, loc="outside lower center", ncols=2 if len(conds) == 1 else 3,
               fontsize=8, frameon=False, title="marker area grows with |alpha|",
               title_fontsize=8)
    return fig


def epochs_figure(epochs: pa.Table, results: pa.Table) -> Figure:
    """Validation performance per epoch by direction, one panel per condition.

    epochs : an epochs table (``EPOCHS_SCHEMA``); results : the results table (for the
    conditions and the performance name). Each trial is a thin line (dotted if it did not
    finish), each direction's mean over its finished trials a bold line.
    """
    conds = _conditions(results) or ["(no trials)"]
    fig, axes = _figure(len(conds), panel=(5.4, 4.0))
    for ax, cond in zip(axes, conds):
        ax.set_title(_title(cond), fontsize=10, **AS_WRITTEN)
        rows = (epochs.filter(pc.equal(epochs.column("condition"), cond))
                if epochs.num_rows else epochs)
        if rows.num_rows == 0:
            _empty(ax, "no epoch was reported")
            continue
        trial = _column(rows, "trial_id")
        epoch = np.array(rows.column("epoch").to_pylist(), dtype=np.int64)
        perf = _column(rows, "val_performance")
        direction = _column(rows, "direction")
        status = _column(rows, "status")
        single = len(np.unique(epoch)) == 1
        for tid in dict.fromkeys(trial.tolist()):
            sel = (trial == tid) & np.isfinite(perf)
            if not sel.any():
                continue
            d = direction[sel][0]
            order = np.argsort(epoch[sel])
            ax.plot(epoch[sel][order], perf[sel][order], color=COLORS.get(d, "gray"),
                    alpha=0.35, lw=0.9, marker="o" if single or sel.sum() == 1 else None, ms=4,
                    ls="-" if status[sel][0] == FINISHED else ":")
        for d in ("max", "min", "none"):
            sel = (direction == d) & (status == FINISHED) & np.isfinite(perf)
            if not sel.any():
                continue
            xs = np.unique(epoch[sel])
            ys = [perf[sel & (epoch == e)].mean() for e in xs]
            ax.plot(xs, ys, color=COLORS[d], lw=2.4, marker="o" if single else None,
                    label=f"{LABELS[d]}, mean of {len(set(trial[sel]))}")
        ax.set_xlabel("epoch")
        cond_results = results.filter(pc.equal(results.column("condition"), cond))
        ax.set_ylabel(f"validation {_perf_name(cond_results)}")
        if single:
            ax.set_xticks(np.unique(epoch))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.25)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    return fig


@dataclass(frozen=True)
class FilterPanel:
    """One image of the filters figure: role ("max-aligned", ...), its caption, and the PNG
    (None: missing, with ``note`` saying why)."""

    role: str
    caption: str
    png: Path | None
    note: str = ""


@dataclass(frozen=True)
class FilterRow:
    """One condition's row: the trials' grids, then the reference panels (Figure 1c: the
    pretrained AlexNet's conv1, the Gabor bank, a note on the condition's own reference)."""

    condition: str
    panels: tuple[FilterPanel, ...]
    references: tuple[FilterPanel, ...]


def _image(ax, panel: FilterPanel) -> None:
    import matplotlib.image

    ax.set_title(f"{panel.role}\n{_title(panel.caption)}" if panel.caption else panel.role,
                 fontsize=8, **AS_WRITTEN)
    if panel.png is None:
        _empty(ax, panel.note or "no image")
        return
    ax.imshow(matplotlib.image.imread(str(panel.png)), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if panel.note:
        ax.set_xlabel(panel.note, fontsize=7, **AS_WRITTEN)


def filters_figure(rows: Sequence[FilterRow]) -> Figure:
    """conv1 filter grids beside the reference, one row per condition (Figure 1c)."""
    rows = list(rows)
    if not rows:
        fig, axes = _figure(1, panel=(6, 2))
        _empty(axes[0], "no trials: no filters to show")
        return fig
    n_trials = max(len(r.panels) for r in rows)
    ncols = n_trials + max(len(r.references) for r in rows)
    fig = Figure(figsize=(3.2 * ncols, 3.6 * len(rows)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for r, row in enumerate(rows):
        cells = list(row.panels) + [None] * (n_trials - len(row.panels)) + list(row.references)
        for c in range(ncols):
            if c < len(cells) and cells[c] is not None:
                _image(axes[r, c], cells[c])
            else:
                axes[r, c].set_visible(False)
        axes[r, 0].set_ylabel(_title(row.condition), fontsize=9, **AS_WRITTEN)
    return fig


def save_figure(fig: Figure, folder: str | Path, stem: str) -> tuple[Path, Path]:
    """Write ``<stem>.png`` (110 dpi) and ``<stem>.svg`` (no timestamp: reproducible files),
    each atomically (rendered in memory, then ``atomic_write_bytes``): never a truncated
    image under the final name."""
    folder = Path(folder)
    png, svg = folder / f"{stem}.png", folder / f"{stem}.svg"
    for path, kwargs in ((png, {"format": "png", "dpi": 110, "metadata": {"Software": None}}),
                         (svg, {"format": "svg", "metadata": {"Date": None}})):
        buffer = io.BytesIO()
        fig.savefig(buffer, **kwargs)
        atomic_write_bytes(path, buffer.getvalue())
    return png, svg
