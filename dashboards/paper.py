"""The seed paper's headline numbers and the comparisons it draws, beside what a sweep measured.

One owner for the paper's claims: each ``Headline`` names its condition, what the paper reports
and how the same number is measured on a results table (``dashboards.tables.RESULTS_SCHEMA``),
in points (x 100: top-1 percentage points or mAP points). ``COMPARISONS`` are the pairs of
conditions the paper sets against each other. At demo scale (the simulated world, shrunk
networks) every number is marked not comparable: the demo shows the mechanism, not the
paper's magnitudes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from dashboards.fronts import FINISHED
from dashboards.tables import POINTS, configuration_key
from records import SweepRunTags, format_overrides


def _rows(results: pa.Table, condition: str) -> list[dict]:
    return [r for r in results.to_pylist()
            if r["condition"] == condition and r["status"] == FINISHED
            and r["performance"] is not None and math.isfinite(r["performance"])]


def configurations(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """One row per configuration (``dashboards.tables.configuration_key``: everything but the
    seed) with its direction and the means over its seeds of performance, alignment and
    degradation (over the seeds with both a performance and an alignment, as the tables'
    means; all of them where none has both; None where none has the number). With one seed per
    configuration these are the trials' own numbers. The headlines read these, as the fronts
    and rho do: a maximum or minimum over single seeds would pick one seed's noise (and a
    baseline seed, whose drop is 0 by definition, could be "the least aligned")."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(configuration_key(r), []).append(r)

    def mean(members, name):
        v = [m[name] for m in members if m.get(name) is not None and math.isfinite(m[name])]
        return float(np.mean(v)) if v else None

    def both(members):  # the seeds the tables' and fronts' means use (tables.py)
        return [m for m in members if all(m.get(k) is not None and math.isfinite(m[k])
                                          for k in ("performance", "alignment"))] or members

    return [{"direction": members[0]["direction"], "seeds": len(both(members)),
             **{name: mean(both(members), name) for name in ("performance", "alignment",
                                                             "degradation")}}
            for members in groups.values()]


def largest_drop_when_suppressing(rows: Sequence[Mapping[str, Any]]) -> float | None:
    """The largest drop from the baseline (points) among the suppressing configurations (mean
    over seeds)."""
    drops = [c["degradation"] for c in configurations(rows)
             if c["direction"] == "min" and c["degradation"] is not None]
    return float(max(drops)) if drops else None


def drop_at_least_alignment(rows: Sequence[Mapping[str, Any]]) -> float | None:
    """The drop from the baseline (points) of the least aligned suppressing configuration
    (means over seeds): "complete misalignment" is what suppressing reaches, so the baseline
    and promoting trials are not candidates."""
    have = [c for c in configurations(rows) if c["direction"] == "min"
            and c["degradation"] is not None and c["alignment"] is not None]
    return float(min(have, key=lambda c: c["alignment"])["degradation"]) if have else None


def promoting_minus_suppressing(rows: Sequence[Mapping[str, Any]]) -> float | None:
    """Mean performance of the promoting configurations minus that of the suppressing ones
    (points; each configuration its mean over seeds, so an unbalanced seed count weighs no
    configuration more); positive: promoting alignment beats suppressing it."""
    confs = configurations(rows)
    up = [c["performance"] for c in confs if c["direction"] == "max"]
    down = [c["performance"] for c in confs if c["direction"] == "min"]
    if not up or not down:
        return None
    return float(POINTS * (np.mean(up) - np.mean(down)))


@dataclass(frozen=True)
class Headline:
    condition: str
    paper: str
    measured_as: str
    measure: Callable[[Sequence[Mapping[str, Any]]], float | None]


HEADLINES: tuple[Headline, ...] = (
    Headline("gabor_conv1", "misalignment costs up to 8 points of top-1",
             "largest drop from the baseline among suppressing configurations (points; "
             "means over seeds)",
             largest_drop_when_suppressing),
    Headline("nsd_conv1_v1", "about 7 mAP points below the baseline at complete misalignment",
             "drop from the baseline of the least aligned suppressing configuration "
             "(points; means over seeds)",
             drop_at_least_alignment),
    Headline("nsd_fc1_vvs", "nearly 20 mAP points below the baseline at complete misalignment",
             "drop from the baseline of the least aligned suppressing configuration "
             "(points; means over seeds)",
             drop_at_least_alignment),
    Headline("pretrained_conv1", "promoting beats suppressing (more so than at conv5)",
             "mean performance, promoting minus suppressing configurations (points; "
             "means over seeds)",
             promoting_minus_suppressing),
    Headline("pretrained_conv5", "promoting beats suppressing (less so than at conv1)",
             "mean performance, promoting minus suppressing configurations (points; "
             "means over seeds)",
             promoting_minus_suppressing),
)

#: pairs of conditions the paper compares: (first, second, what the comparison shows)
COMPARISONS: tuple[tuple[str, str, str], ...] = (
    ("pretrained_conv1", "pretrained_conv5", "pretrained reference: conv1 against conv5"),
    ("nsd_conv1_v1", "nsd_fc1_vvs", "brain reference: conv1-V1 against fc1-VVS"),
    ("nsd_resnet18_block1_v1", "nsd_resnet18_block4_vvs",
     "brain reference, ResNet-18: block1-V1 against block4-VVS"),
)


def differences(tags: SweepRunTags) -> list[str]:
    """How a paper-scale run (its parent run's tags) departs from the paper's settings:
    settings overridden (``--set``), trials selected (``--only``), an Optuna search instead of
    the paper's grid (sampled alphas at the grid's first beta), fewer NSD subjects than the
    paper's eight. A run with any of them was marked comparable all the same."""
    out = []
    if tags.search == "optuna":
        out.append(f"an Optuna search ({search_line(tags)}) instead of the paper's grid")
    if tags.overrides:
        out.append(f"settings changed ({format_overrides(tags.overrides)})")
    if tags.only:
        out.append(f"a selection of trials ({' '.join(tags.only)})")
    if tags.subjects and len(tags.subjects) < 8:
        out.append(f"NSD subjects {', '.join(map(str, tags.subjects))} of the paper's 8")
    return out


def search_line(tags: SweepRunTags) -> str:
    """How a run (its parent run's tags) chose its configurations, in words."""
    if tags.search != "optuna":
        return "the sweep file's grid"
    n = tags.num_samples
    return ((f"{n} samples per condition" if n is not None else "samples") + ": alphas drawn "
            "by Optuna (log-uniform, then TPE) at the grid's first beta, not the grid's")


def paper_terms(results: pa.Table, statistics: Mapping[str, Mapping], scale: str,
                differs: Sequence[str] = ()) -> dict:
    """The headline rows and comparisons present in this sweep (plain dicts, for JSON and the
    report): per headline its condition, the paper's claim, how it is measured, this run's
    number and whether it is comparable (paper scale only); per comparison of two conditions
    both present, each one's gap between the most and the least aligned configuration
    (``dashboards.statistics.alignment_gap``) and their difference."""
    conditions = set(results.column("condition").to_pylist()) if results.num_rows else set()
    comparable = scale == "paper" and not differs
    if scale != "paper":
        why = f"not comparable: {scale or 'unknown'} scale"
    elif differs:
        why = f"not comparable: {'; '.join(differs)}"
    else:
        why = ""
    missing = "not comparable: no number (no trial of a side it needs finished)"
    headlines = []
    for h in HEADLINES:
        if h.condition not in conditions:
            continue
        measured = h.measure(_rows(results, h.condition))
        headlines.append({"condition": h.condition, "paper": h.paper,
                          "measured_as": h.measured_as, "measured": measured,
                          "comparable": comparable and measured is not None,
                          "note": why if measured is not None or not comparable else missing})
    comparisons = []
    for a, b, what in COMPARISONS:
        if a in conditions and b in conditions:
            ga = (statistics.get(a, {}).get("gap") or {}).get("points")
            gb = (statistics.get(b, {}).get("gap") or {}).get("points")
            diff = ga - gb if ga is not None and gb is not None else None
            comparisons.append({"first": a, "second": b, "what": what, "first_gap": ga,
                                "second_gap": gb, "difference": diff,
                                "comparable": comparable and diff is not None,
                                "note": why if diff is not None or not comparable
                                else missing})
    return {"scale": scale, "headlines": headlines, "comparisons": comparisons}
