"""The front and epochs figures' plotted data (matplotlib objects) and the report's text, on
results tables built by dashboards.tables from trials made here (no store needed): repeated
seeds with a failed one, a one-point front, integer epoch ticks, and the report saying what
the statistics and the front flags are over."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest
from matplotlib.collections import PathCollection

from dashboards import figures, report, statistics, tables
from dashboards.sources import SweepRecord, Trial


def trial(direction, alpha, seed, perf, align, *, condition="c", status="FINISHED"):
    """A trial as dashboards.sources reads it; ``perf`` and ``align`` one value per epoch."""
    history = {"val_performance": tuple(enumerate(perf)), "val_map": tuple(enumerate(perf)),
               "val_alignment": tuple(enumerate(align))}
    return Trial(run_id=f"r-{condition}-{direction}{alpha}-{seed}",
                 trial_id=f"{condition}-{direction}-a{abs(alpha)}-b1-s{seed}",
                 condition=condition, direction=direction, alpha=alpha, beta=1.0, seed=seed,
                 status=status, config={"metric": "linear"}, history=history)


def record(trials):
    return SweepRecord("c", "c-smoke", "test", None, "FINISHED", {}, tuple(trials),
                       fetch=lambda *a: None)


# Baselines 0.9 (seed 0) and 0.1 (seed 1), mean 0.5; max 0.5 finished seed 0 only (0.5),
# max 0.1 has 0.45 in both: on performance_mean, max 0.5 is the whole (up) front.
LONE_SEED = [trial("none", 0.0, 0, [0.9], [0.1]), trial("none", 0.0, 1, [0.1], [0.1]),
             trial("max", 0.5, 0, [0.5], [0.6]),
             trial("max", 0.5, 1, [0.05], [0.6], status="FAILED"),
             trial("max", 0.1, 0, [0.45], [0.3]), trial("max", 0.1, 1, [0.45], [0.3])]


@pytest.fixture(scope="module")
def lone_seed():
    results = tables.results_table(record(LONE_SEED))
    rows = {r["trial_id"]: r for r in results.to_pylist()}
    assert rows["c-max-a0.5-b1-s0"]["front_up"] and not rows["c-max-a0.1-b1-s0"]["front_up"]
    return results


def front_lines(ax, gid):
    """The lines drawn in a front's style (``gid``: front_up or front_down)."""
    color = figures.FRONT_STYLE[gid.removeprefix("front_")]["color"]
    return [line for line in ax.get_lines() if line.get_color() == color]


def test_front_figure_plots_configurations_against_the_mean_baseline(lone_seed):
    """The front point used to be drawn at its seed's own drop (+40) above a configuration it
    dominates (+5, the mean of -35 and +45): every point is now 100 * (mean baseline -
    performance), a configuration's at its performance_mean, as the fronts order them."""
    ax = figures.front_figure(lone_seed).axes[0]
    (up,) = front_lines(ax, "front_up")
    assert up.get_xdata() == pytest.approx([0.6])
    assert up.get_ydata() == pytest.approx([0.0])
    (down,) = front_lines(ax, "front_down")
    # both baseline seeds are flagged, at their configuration's one point
    assert set(zip(down.get_xdata(), down.get_ydata())) == {(0.1, 0.0)}
    dots = sorted(map(tuple, np.vstack([c.get_offsets() for c in ax.collections
                                        if isinstance(c, PathCollection)])))
    # the failed seed is not drawn; the baseline seeds at -40 and +40, max 0.1 at +5
    assert np.allclose(dots, [(0.1, -40.0), (0.1, 40.0), (0.3, 5.0), (0.3, 5.0), (0.6, 0.0)])
    means = [line for line in ax.get_lines() if line.get_marker() == "D"]
    assert np.allclose([(m.get_xdata()[0], m.get_ydata()[0]) for m in means],
                       [(0.1, 0.0), (0.3, 5.0)])  # the configurations with two seeds
    assert "mean baseline" in ax.get_ylabel()


def test_a_one_point_front_is_drawn_above_the_points_and_means(lone_seed):
    ax = figures.front_figure(lone_seed).axes[0]
    (up,) = front_lines(ax, "front_up")
    assert len(up.get_xdata()) == 1 and up.get_marker() == "o"
    below = [a.get_zorder() for a in ax.collections]
    below += [line.get_zorder() for line in ax.get_lines()
              if line.get_color() not in {s["color"] for s in figures.FRONT_STYLE.values()}]
    assert below and up.get_zorder() > max(below)


def test_front_figure_without_table_means_averages_the_drawn_seeds(lone_seed):
    """A results table without the configuration columns (an older results.parquet): the
    means are computed from the trials drawn, to the same points."""
    drop = [c for c in lone_seed.column_names if c.endswith(("_mean", "_low", "_high"))]
    ax = figures.front_figure(lone_seed.drop_columns(drop)).axes[0]
    (up,) = front_lines(ax, "front_up")
    assert up.get_ydata() == pytest.approx([0.0])
    means = [line for line in ax.get_lines() if line.get_marker() == "D"]
    assert np.allclose([(m.get_xdata()[0], m.get_ydata()[0]) for m in means],
                       [(0.1, 0.0), (0.3, 5.0)])  # the configurations with two seeds


def test_epochs_figure_has_integer_epoch_ticks():
    rec = record([trial("none", 0.0, 0, [0.3, 0.4, 0.5], [0.1, 0.2, 0.3]),
                  trial("max", 0.5, 0, [0.2, 0.3, 0.35], [0.2, 0.4, 0.6])])
    fig = figures.epochs_figure(tables.epochs_table(rec), tables.results_table(rec))
    fig.canvas.draw()
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert len(ticks) >= 2 and all(t == int(t) for t in ticks), ticks


def render(results):
    stats = statistics.sweep_statistics(results, n_boot=50)
    html = report.render_report(title="t", meta={}, messages=[], statistics=stats,
                                figures=[], results=results, config={}, files=[])
    return html, stats


def intro(html):
    start = html.index("<h2>Statistics</h2>")
    return html[start:html.index("</p>", start)]


def trials_table(html):
    """The Trials table: header names, and trial_id -> (row class, column -> cell text)."""
    part = html[html.index("<h2>Trials</h2>"):html.index("<h2>Files</h2>")]
    table = ET.fromstring(part[part.index("<table>"):part.index("</table>") + 8])
    head = [th.text for th in table.iter("th")]
    rows = {}
    for tr in table.find("tbody"):
        cells = dict(zip(head, (td.text or "" for td in tr)))
        rows[cells["trial_id"]] = (tr.get("class"), cells)
    return head, rows, part


def test_report_says_seeds_are_resampled_and_shows_the_means_the_fronts_use(lone_seed):
    html, stats = render(lone_seed)
    # three configurations: rho over their means, too few for a bootstrap interval
    assert stats["c"]["spearman"]["message"].startswith("rho over 3 configuration means; no "
                                                        "bootstrap interval over 3")
    text = intro(html)
    assert "seeds resampled within configurations" in text
    assert "trials resampled" not in text
    head, rows, part = trials_table(html)
    i = head.index("front_up")
    assert head[i - 3:i] == ["seeds_in_configuration", "performance_mean", "alignment_mean"]
    cls, front = rows["c-max-a0.5-b1-s0"]
    assert cls == "front" and front["performance_mean"] == "0.5"
    cls, failed = rows["c-max-a0.5-b1-s1"]
    assert cls == "failed" and failed["performance"] == "0.05"
    assert failed["performance_mean"] == "0.5" and failed["seeds_in_configuration"] == "1"
    # the baseline of seed 0 is shaded (down front) at the baselines' mean, not its own 0.9
    cls, base = rows["c-none-a0.0-b1-s0"]
    assert cls == "front" and (base["performance"], base["performance_mean"]) == ("0.9", "0.5")
    assert "configuration's means are on a front" in part


def test_report_with_one_seed_per_configuration_resamples_trials():
    results = tables.results_table(record([trial("none", 0.0, 0, [0.5], [0.1]),
                                           trial("max", 0.5, 0, [0.4], [0.6]),
                                           trial("min", -0.5, 0, [0.45], [-0.2])]))
    html, stats = render(results)
    assert stats["c"]["spearman"]["message"].startswith("no bootstrap interval over 3 trials")
    text = intro(html)
    assert "(trials resampled)" in text and "within configurations" not in text
    head, rows, part = trials_table(html)
    assert "performance_mean" not in head and "Rows on a front are shaded" in part


def test_report_names_the_conditions_whose_seeds_are_resampled():
    single = [trial(d, a, 0, [p], [x], condition="one")
              for d, a, p, x in (("none", 0.0, 0.5, 0.1), ("max", 0.5, 0.4, 0.6),
                                 ("min", -0.5, 0.45, -0.2))]
    repeated = [trial(d, a, s, [p + 0.01 * s], [x], condition="two")
                for d, a, p, x in (("none", 0.0, 0.5, 0.1), ("max", 0.5, 0.4, 0.6),
                                   ("min", -0.5, 0.45, -0.2)) for s in (0, 1)]
    html, stats = render(tables.results_table(record(single + repeated)))
    # three points each: no interval, but "two" is over its configurations' means
    assert stats["one"]["spearman"]["message"].startswith("no bootstrap interval over 3 trials")
    assert stats["two"]["spearman"]["message"].startswith("rho over 3 configuration means")
    text = intro(html)
    assert "several seeds (two)" in text
    assert "trials resampled, or seeds resampled within configurations" in text


@pytest.mark.parametrize("name", ["budget_$1k_vs_$2k", "cost $5-$10", "a" * 60 + "_" + "b" * 39])
def test_a_condition_name_is_shown_as_written(name, tmp_path):
    """Sweep files may name a condition with dollar signs (the loader accepts them): matplotlib
    read the text between two ``$`` as TeX, so ``budget_$1k_vs_$2k`` raised a parse error and
    the sweep got no report, and ``cost $5-$10`` was drawn as "cost 5 - 10". A name of up to
    100 bytes is wrapped to its panel. Every figure is drawn and saved."""
    rec = record([trial("none", 0.0, 0, [0.3, 0.4], [0.1, 0.2], condition=name),
                  trial("max", 0.5, 0, [0.2, 0.3], [0.2, 0.6], condition=name),
                  trial("min", 0.5, 0, [0.25, 0.2], [0.0, -0.1], condition=name)])
    results = tables.results_table(rec)
    row = figures.FilterRow(name, (figures.FilterPanel("max-aligned", f"{name}-max", None,
                                                       "no image"),), ())
    made = [figures.front_figure(results, statistics.sweep_statistics(results, n_boot=20)),
            figures.epochs_figure(tables.epochs_table(rec), results),
            figures.filters_figure([row])]
    for i, fig in enumerate(made):
        figures.save_figure(fig, tmp_path, f"f{i}")  # draws every text
        texts = [t for ax in fig.axes for t in (ax.title, ax.yaxis.label) if t.get_text()]
        shown = "".join("".join(t.get_text().split("\n")) for t in texts)
        assert name in shown, (i, [t.get_text() for t in texts])
        # drawn as written: a text read as TeX would lose its dollar signs when drawn
        for t in texts:
            assert not t._preprocess_math(t.get_text())[1], t.get_text()
        assert all(len(line) <= figures.TITLE_WIDTH for t in texts
                   for line in t.get_text().split("\n") if name[:10] in line), i
