"""What each side of a sweep does to performance, with intervals, and what its control shows.

Per condition and direction ("min": alpha < 0, suppressing alignment; "max": promoting it):

* ``drop``: the paper's degradation of that side, 100 * (baseline performance - mean
  performance of the side's trials), in top-1 percentage points or mAP points (positive =
  the side performs worse than the baseline), with a 95 % percentile bootstrap interval.
  Each trial is compared with the baseline of its own seed (else the baselines' mean, as
  ``dashboards.tables`` does), a configuration's drop is its trials' mean and the side's the
  mean over configurations: with balanced seeds, the baselines' mean minus the side's;
* ``alignment_change``: the side's validation alignment minus the baseline's, paired the
  same way.

The interval is a paired bootstrap over the validation images: every trial of a condition
(and of its control) is scored on the same resample of images, so what is resampled is the
evaluation set, the same for all, as in a paired comparison of classifiers. With several
seeds each configuration's seeds are resampled too (within the configuration), so the
interval then also covers training noise; with one seed it cannot, and says so (``over``).
Performance on a resample is computed from each trial's per-image outcome, the
``val_predictions.npz`` artifact (``records.PREDICTIONS_ARTIFACT``): top-1 hits, or
sigmoid scores and targets for mAP (average precision with weights: scikit-learn's rule with
each image counted as often as the resample draws it).

A condition with a negative control (``<name>_shuffled``, the same trials against the
reference shuffled across images) also gets ``versus_control``: per direction, over the
configurations both ran (the same alphas and betas), the condition's drop minus the control's,
with its interval from the same resamples: the part of the cost that the reference's
image-specific content explains.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from dashboards.fronts import FINISHED
from trainable.average_precision import weighted_mean_average_precision

__all__ = ["EFFECTS_SCHEMA", "UNREADABLE", "Predictions", "direction_effects", "effects_metrics",
           "effects_table", "performance", "performances", "resample_counts", "summary_lines"]

LEVEL = 0.95
N_BOOT = 2000
SIDES = ("min", "max")

#: What ``Predictions.load`` raises for a file that is not a readable val_predictions.npz
#: (np.load: BadZipFile for a truncated archive, EOFError / zlib.error for a cut or corrupt
#: member, ValueError for a pickled or malformed array, KeyError for a missing one).
UNREADABLE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error)


@dataclass(frozen=True)
class Predictions:
    """One trial's per-image validation outcome, rows ordered by ``image_ids`` (as strings;
    sorted on construction).

    hits : (n,) float top-1 hits (single-label), or None; scores, targets : (n, c) (multi-label)
    or None."""

    image_ids: np.ndarray
    hits: np.ndarray | None = None
    scores: np.ndarray | None = None
    targets: np.ndarray | None = None

    def __post_init__(self) -> None:
        ids = np.asarray(self.image_ids).astype(str)
        if ids.ndim != 1:
            raise ValueError(f"image_ids of shape {ids.shape}; accepted: one id per image (n,)")
        # one row per image in every array (else the rows taken below raise IndexError, or
        # silently pair the wrong images)
        shapes = {name: np.shape(getattr(self, name)) for name in ("hits", "scores", "targets")
                  if getattr(self, name) is not None}
        if any(len(shape) < 1 or shape[0] != ids.size for shape in shapes.values()) or (
                "scores" in shapes and shapes["scores"] != shapes.get("targets")):
            raise ValueError(f"{ids.size} image ids but arrays of shapes "
                             f"{', '.join(f'{k} {v}' for k, v in shapes.items())}; accepted: "
                             f"hits (n,), or scores and targets (n, classes)")
        for name in ("hits", "scores"):
            # a non-finite score had a rank of its own (NaN above every score here, below
            # every score in the trial's mAP): a trial never writes one (non-finite logits end
            # it as diverged), so such a file is refused, not ranked
            value = getattr(self, name)
            bad = None if value is None else ~np.isfinite(np.asarray(value, np.float64))
            if bad is not None and bad.any():
                at = np.argwhere(bad)[0]
                raise ValueError(f"{int(bad.sum())} non-finite {name} value(s) (e.g. "
                                 f"{float(np.asarray(value)[tuple(at)])} for image "
                                 f"{ids[at[0]]}); accepted: finite values, as trials write them")
        order = np.argsort(ids, kind="stable")
        repeated = ids[order][1:][ids[order][1:] == ids[order][:-1]]
        if repeated.size:  # rows are paired across trials by id: a repeat pairs the wrong ones
            raise ValueError(f"{repeated.size} repeated image id(s) (e.g. {repeated[0]}); "
                             f"accepted: each image once, as trials write them")
        object.__setattr__(self, "image_ids", ids[order])
        for name in ("hits", "scores", "targets"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, np.asarray(value)[order])

    @classmethod
    def load(cls, path) -> Predictions:
        """Read a trial's ``val_predictions.npz``. A file that is not one raises one of
        ``UNREADABLE`` (a truncated zip, a bad compressed stream, a missing array, arrays of
        unequal length)."""
        z = np.load(path)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an .npz archive")
        with z:
            if "top1" in z:
                return cls(z["image_ids"], hits=np.asarray(z["top1"], np.float64))
            return cls(z["image_ids"], scores=np.asarray(z["scores"], np.float64),
                       targets=np.asarray(z["targets"]) > 0)

    def rows(self, ids: np.ndarray) -> Predictions:
        """The outcome on ``ids`` (each in ``image_ids``), rows sorted by id."""
        pos = np.searchsorted(self.image_ids, ids)
        take = (lambda a: None if a is None else a[pos])
        return Predictions(ids, take(self.hits), take(self.scores), take(self.targets))


def performance(pred: Predictions, weights: np.ndarray) -> np.ndarray:
    """Performance of one trial under image weights (B, n) (bootstrap counts; ones = the
    plain score): top-1 accuracy, or mAP over the classes with a positive of nonzero weight
    (``weighted_mean_average_precision``, the trials' own mAP). Returns (B,).
    ``direction_effects`` passes the transpose of an (n, B) array (``resample_counts``), which
    is read without a copy."""
    return performances({"trial": pred}, weights)["trial"]


def performances(preds: Mapping[str, Predictions], weights: np.ndarray) -> dict[str, np.ndarray]:
    """``performance`` of every trial in ``preds`` (rows of the same images) under the same
    weights: the top-1 trials' in one pass over the counts, each block of images converted
    to float64 once for all of them (per trial, the conversion alone took 0.2 s at 50,000
    images x 2,001 resamples)."""
    wt = np.ascontiguousarray(np.asarray(weights).T)  # (n, B)
    out: dict[str, np.ndarray] = {}
    top1 = [k for k, p in preds.items() if p.hits is not None]
    if top1:
        hits = np.stack([preds[k].hits for k in top1], axis=1)  # (n, trials)
        acc = np.zeros((wt.shape[1], len(top1)))
        total = np.zeros(wt.shape[1])
        for lo in range(0, wt.shape[0], _BLOCK):  # float64 sums, a block of images at a time
            w = wt[lo:lo + _BLOCK].astype(np.float64)
            acc += w.T @ hits[lo:lo + _BLOCK]
            total += w.sum(0)
        out.update({k: acc[:, j] / total for j, k in enumerate(top1)})
    if len(top1) < len(preds):
        for k, p in preds.items():
            if p.hits is None:
                out[k] = weighted_mean_average_precision(p.scores, p.targets, wt.T)
    return out


#: Images converted to float64 at a time (top-1), resamples drawn at a time (counts).
_BLOCK, _CHUNK = 4096, 256


def resample_counts(rng: np.random.Generator, n: int, n_boot: int) -> np.ndarray:
    """(n, 1 + n_boot) float32 image counts: column 0 ones (the plain score), then n_boot
    multinomial resamples of the n images, drawn a chunk at a time from ``rng`` (the same
    numbers as one (n_boot, n) draw, without its int64 array: 0.8 GB for ImageNet's 50,000
    images, with a float64 copy beside it). float32 holds every count and every sum of them
    exactly (below 2**24)."""
    if n >= 1 << 24:
        raise ValueError(f"{n} validation images; accepted: fewer than {1 << 24} (counts are "
                         f"float32)")
    counts = np.empty((n, 1 + n_boot), np.float32)
    counts[:, 0] = 1
    p = np.full(n, 1 / n)
    for lo in range(0, n_boot, _CHUNK):
        k = min(_CHUNK, n_boot - lo)
        # (converted first: a transposed int64 view written to float32 took 1 s a chunk)
        counts[:, 1 + lo:1 + lo + k] = rng.multinomial(n, p, k).astype(np.float32).T
    return counts


def _configurations(rows: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in sorted(rows, key=lambda r: (r["direction"], r["alpha"], r["beta"], r["seed"])):
        out.setdefault((r["direction"], r["alpha"], r["beta"]), []).append(r)
    return out


def _interval(draws: np.ndarray) -> tuple[float | None, float | None]:
    finite = draws[np.isfinite(draws)]
    if finite.size < 2:
        return None, None
    tail = 100 * (1 - LEVEL) / 2
    return float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail))


def direction_effects(results, load: Callable[[str], Predictions | None], *,
                      controls: Mapping[str, str] | None = None, n_boot: int = N_BOOT,
                      seed: int = 0, unreadable: Mapping[str, str] | None = None
                      ) -> dict[str, dict]:
    """Per condition of ``results`` (``dashboards.tables.RESULTS_SCHEMA``), over its FINISHED
    trials with a final performance (a NaN last epoch has none): each side's drop and alignment change against the baseline, with the paired
    bootstrap interval (module docstring).

    load : trial_id -> its Predictions, or None when the trial has no per-image outcome (the
    condition then gets point values without an interval, and a message).
    controls : condition -> its negative control's condition (``versus_control``).
    unreadable : trial_id -> why ``load`` gave None for it (the file and its fault), said in
    the condition's message.
    """
    rows = [r for r in results.to_pylist()
            if r["status"] == FINISHED and r["performance"] is not None]
    by_cond: dict[str, list[dict]] = {}
    for r in rows:
        by_cond.setdefault(r["condition"], []).append(r)
    controls = dict(controls or {})
    rng = np.random.default_rng(seed)
    out: dict[str, dict] = {}
    draws: dict[str, dict] = {}
    # Conditions that are compared share one set of image resamples.
    families: list[list[str]] = []
    for cond in by_cond:
        if any(cond in f for f in families):
            continue
        fam = [cond] + [c for c in (controls.get(cond),) if c in by_cond]
        fam += [m for m, c in controls.items() if c == cond and m in by_cond and m not in fam]
        families.append(fam)
    for fam in families:
        loaded = {r["trial_id"]: load(r["trial_id"]) for c in fam for r in by_cond[c]}
        complete = all(p is not None for p in loaded.values())
        weights = ids = None
        disjoint = False
        if complete and loaded:
            common = None
            for p in loaded.values():
                common = p.image_ids if common is None else np.intersect1d(common, p.image_ids)
            disjoint = common.size == 0  # nothing to pair (outcomes of different val sets)
            if not disjoint:
                ids = common
                raw, loaded = loaded, {k: p.rows(ids) for k, p in loaded.items()}
                # (1 + B, n): a view of (n, 1 + B) counts, read as such by performance()
                weights = resample_counts(rng, ids.size, n_boot).T
        usable = complete and not disjoint
        for cond in fam:
            out[cond], draws[cond] = _condition_effects(
                by_cond[cond], loaded if usable else None, weights, rng, n_boot)
            if not complete:
                missing = sorted(k for k, p in loaded.items() if p is None)
                bad = [f"{k}: {unreadable[k]}" for k in missing if k in (unreadable or {})]
                out[cond]["message"] = (
                    f"no per-image validation outcome for {len(missing)} trial(s) "
                    f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): point "
                    f"values only, no interval"
                    + (f"; unreadable: {'; '.join(bad)}" if bad else ""))
            elif disjoint:
                out[cond]["message"] = (
                    f"the per-image validation outcomes of its {len(loaded)} trial(s) share "
                    f"no image id (scored on different validation sets?): point values only, "
                    f"no interval")
            elif ids is not None:
                out[cond]["validation_images"] = int(ids.size)
                most = max(p.image_ids.size for p in raw.values())
                if ids.size < most:  # the point values then differ from the logged ones
                    out[cond]["message"] = "; ".join(m for m in (out[cond].get("message"), (
                        f"the trials' per-image outcomes cover different images: effects and "
                        f"intervals over the {ids.size} all of them share (of up to {most}), "
                        f"so they may differ from the logged performances")) if m)
    for cond, control in controls.items():
        if cond in out and control in out:
            out[cond]["versus_control"] = _versus(by_cond[cond], by_cond[control], control,
                                                  draws.get(cond, {}), draws.get(control, {}))
    return out


def _versus(rows: list[dict], control_rows: list[dict], control: str, draws: dict,
            control_draws: dict) -> dict:
    """Per side, the condition's drop minus its control's over the configurations both ran
    (like against like: the same alphas and betas), each against its own baseline, trial by
    trial as in ``_condition_effects``."""
    mine, theirs = _configurations(rows), _configurations(control_rows)
    out: dict = {"control": control}
    for side in SIDES:
        shared = sorted(k for k in mine if k[0] == side and k in theirs)
        entry: dict = {"configurations": len(shared), "drop_difference": None, "low": None,
                       "high": None, "excludes_zero": None}
        b_mine = _baseline_rows(mine)
        b_theirs = _baseline_rows(theirs)
        if shared and b_mine and b_theirs:
            def drop(configs, base, shared=shared):
                return 100 * np.mean([_paired_mean(configs[k], base, "performance")
                                      for k in shared])

            entry["drop_difference"] = float(drop(mine, b_mine) - drop(theirs, b_theirs))
            if all(("diff", k) in draws and ("diff", k) in control_draws for k in shared):
                def drop_draws(d, shared=shared):
                    return 100 * np.mean([d[("diff", k)] for k in shared], axis=0)

                diff = drop_draws(draws) - drop_draws(control_draws)
                entry["drop_difference"] = float(diff[0])
                entry["low"], entry["high"] = _interval(diff[1:])
                entry["excludes_zero"] = _excludes_zero(entry["low"], entry["high"])
        out[side] = entry
    return out


def _baseline_rows(configs: dict[tuple, list[dict]]) -> list[dict]:
    """The baseline trials (alpha = 0): beta 1's, else any beta's."""
    return configs.get(("none", 0.0, 1.0)) or [r for k, v in configs.items()
                                                 if k[0] == "none" for r in v]


def _paired_mean(trials: list[dict], base: list[dict], key: str) -> float | None:
    """Mean over a configuration's trials of (its baseline's ``key`` - the trial's): each
    trial against the baseline of its own seed (the same initialisation and data order),
    else the mean of the baselines' (``dashboards.tables``' rule). None when no trial or no
    baseline has the value. Balanced seeds: the baselines' mean minus the trials' mean."""
    base_vals = {r["seed"]: r[key] for r in base if r[key] is not None}
    if not base_vals:
        return None
    fallback = float(np.mean(list(base_vals.values())))
    diffs = [base_vals.get(r["seed"], fallback) - r[key] for r in trials if r[key] is not None]
    return float(np.mean(diffs)) if diffs else None


def _excludes_zero(low: float | None, high: float | None) -> bool | None:
    if low is None or high is None:
        return None
    return bool(low > 0 or high < 0)


def _condition_effects(rows: list[dict], loaded: dict[str, Predictions] | None,
                       weights: np.ndarray | None, rng: np.random.Generator,
                       n_boot: int) -> tuple[dict, dict]:
    """One condition's sides. Each trial is compared with the baseline of its own seed (the
    same initialisation and data order; the mean baseline when its seed has none, as
    ``dashboards.tables`` does), each configuration's drop is the mean of its trials', and a
    side's is the mean over its configurations: with seeds missing on one side (an
    interrupted run, a failed trial) no seed's training noise is passed off as an effect.
    The bootstrap resamples the images (all trials alike) and, within each configuration,
    its trials, each with its own baseline."""
    configs = _configurations(rows)
    counts = sorted({len(v) for k, v in configs.items()})
    seeds = counts[-1] if counts else 0
    metric = next((r["performance_metric"] for r in rows if r["performance_metric"]), None)
    entry: dict = {"performance_metric": metric, "seeds": seeds}
    n_images = None if weights is None else weights.shape[1]
    span = f"{counts[0]} to {seeds}" if len(counts) > 1 else f"{seeds}"
    entry["over"] = (
        "no interval (per-image outcomes missing)" if weights is None else
        f"{n_images} validation images, paired across trials" + (
            f", and the seeds of each configuration ({span}), each trial against the "
            f"baseline of its own seed" if seeds > 1 else
            "; one seed: training noise is not in the interval"))
    base = _baseline_rows(configs)
    side_draws: dict = {}  # ("diff", config) -> baseline - performance draws (1 + B)
    if weights is not None and base:
        perf = performances({r["trial_id"]: loaded[r["trial_id"]] for r in rows}, weights)
        base_by_seed = {r["seed"]: perf[r["trial_id"]] for r in base}
        base_mean = np.mean(list(base_by_seed.values()), axis=0)
        seed_pick = rng.integers(0, 1 << 31, size=1)[0]

        def diff_draws(trials: list[dict], salt: int) -> np.ndarray:
            stack = np.vstack([base_by_seed.get(r["seed"], base_mean) - perf[r["trial_id"]]
                               for r in trials])  # (trials, 1 + B)
            if len(trials) == 1:
                return stack[0]
            pick = np.random.default_rng([int(seed_pick), salt]).integers(
                0, len(trials), (n_boot, len(trials)))
            boot = stack[:, 1:][pick, np.arange(n_boot)[:, None]].mean(1)
            return np.concatenate([[stack[:, 0].mean()], boot])

    for side in SIDES:
        keys = [k for k in configs if k[0] == side]
        e: dict = {"configurations": len(keys), "drop": None, "low": None, "high": None,
                   "alignment_change": None}
        if keys and base:
            e["drop"] = float(100 * np.mean([_paired_mean(configs[k], base, "performance")
                                             for k in keys]))
            aligned = [a for a in (_paired_mean(configs[k], base, "alignment") for k in keys)
                       if a is not None]
            if aligned:
                e["alignment_change"] = -float(np.mean(aligned))
            if weights is not None:
                per = {k: diff_draws(configs[k], i + 1) for i, k in enumerate(keys)}
                d = 100 * np.mean(list(per.values()), axis=0)
                side_draws.update({("diff", k): v for k, v in per.items()})
                e["drop"] = float(d[0])  # the same number, from the per-image outcomes
                e["low"], e["high"] = _interval(d[1:])
        e["excludes_zero"] = _excludes_zero(e["low"], e["high"])
        entry[side] = e
    if not base:
        entry["message"] = "no finished baseline (alpha = 0) trial: no drop"
    return entry, side_draws


def summary_lines(effects: Mapping[str, Mapping]) -> list[str]:
    """One line per condition (both sides' drops with intervals) and one per control
    comparison, for the console: "nsd_conv1_v1: suppressing alignment costs 16.8 mAP points
    (95 % CI 13.8 to 20.4); promoting costs 3.4 (0.1 to 7.2)"."""
    lines = []
    for cond, entry in effects.items():
        unit = "mAP points" if entry.get("performance_metric") == "map" else "top-1 points"
        parts = []
        for side in SIDES:
            e = entry.get(side) or {}
            if e.get("drop") is None:
                continue
            verb = "suppressing" if side == "min" else "promoting"
            # A gain is the negated drop, and so is its interval (bounds swapped): the
            # interval always brackets the number printed beside it.
            sign, what = (1, "costs") if e["drop"] >= 0 else (-1, "gains")
            ci = "" if e.get("low") is None else (
                f" (95 % CI {min(sign * e['low'], sign * e['high']):.1f} to "
                f"{max(sign * e['low'], sign * e['high']):.1f})")
            parts.append(f"{verb} alignment {what} {sign * e['drop']:.1f} {unit}{ci}")
        if parts:
            lines.append(f"{cond}: " + "; ".join(parts))
        versus = entry.get("versus_control") or {}
        for side in SIDES:
            v = versus.get(side) or {}
            if v.get("drop_difference") is None:
                continue
            verb = "suppressing" if side == "min" else "promoting"
            ci = "" if v.get("low") is None else f" (95 % CI {v['low']:.1f} to {v['high']:.1f})"
            lines.append(f"{cond} against its control {versus['control']}, {verb} at the same "
                         f"alphas: drop minus the control's = {v['drop_difference']:.1f} "
                         f"{unit}{ci}")
    return lines


def _field(name: str, dtype: pa.DataType, description: str) -> pa.Field:
    return pa.field(name, dtype, metadata={"description": description})


#: effects.parquet: one row per condition and side.
EFFECTS_SCHEMA = pa.schema([
    _field("condition", pa.string(), "the condition"),
    _field("side", pa.string(), "min (alpha < 0, suppressing) or max (alpha > 0, promoting)"),
    _field("configurations", pa.int64(), "(alpha, beta) configurations of the side"),
    _field("performance_metric", pa.string(), "top1 or map"),
    _field("drop", pa.float64(), "100 * (baseline - mean performance of the side), points; "
                                 "positive = worse"),
    _field("drop_low", pa.float64(), "95 % paired bootstrap interval of drop, low end"),
    _field("drop_high", pa.float64(), "95 % paired bootstrap interval of drop, high end"),
    _field("excludes_zero", pa.bool_(), "the interval excludes 0"),
    _field("alignment_change", pa.float64(), "mean validation alignment of the side minus "
                                             "the baseline's"),
    _field("over", pa.string(), "what the interval resamples"),
    _field("control", pa.string(), "the condition's negative control, if any"),
    _field("drop_minus_control", pa.float64(), "drop minus the control's drop over the "
                                               "configurations both ran, points"),
    _field("drop_minus_control_low", pa.float64(), "its 95 % interval, low end"),
    _field("drop_minus_control_high", pa.float64(), "its 95 % interval, high end"),
])


def effects_table(effects: Mapping[str, Mapping]) -> pa.Table:
    """``direction_effects`` output as rows (``EFFECTS_SCHEMA``)."""
    rows = []
    for cond, entry in effects.items():
        versus = entry.get("versus_control") or {}
        for side in SIDES:
            e, v = entry.get(side) or {}, versus.get(side) or {}
            rows.append({
                "condition": cond, "side": side, "configurations": e.get("configurations"),
                "performance_metric": entry.get("performance_metric"), "drop": e.get("drop"),
                "drop_low": e.get("low"), "drop_high": e.get("high"),
                "excludes_zero": e.get("excludes_zero"),
                "alignment_change": e.get("alignment_change"), "over": entry.get("over"),
                "control": versus.get("control"),
                "drop_minus_control": v.get("drop_difference"),
                "drop_minus_control_low": v.get("low"),
                "drop_minus_control_high": v.get("high")})
    return pa.Table.from_pylist(rows, schema=EFFECTS_SCHEMA)


def effects_metrics(effects: Mapping[str, Mapping]) -> dict[str, float]:
    """The numbers as MLflow metrics of the sweep's parent run:
    ``effect/<condition>/<side>/drop`` (and ``drop_low``, ``drop_high``,
    ``alignment_change``, ``drop_minus_control`` and its ends); undefined ones left out."""
    out: dict[str, float] = {}
    for row in effects_table(effects).to_pylist():
        for key in ("drop", "drop_low", "drop_high", "alignment_change", "drop_minus_control",
                    "drop_minus_control_low", "drop_minus_control_high"):
            value = row[key]
            if value is not None and np.isfinite(value):
                out[f"effect/{row['condition']}/{row['side']}/{key}"] = float(value)
    return out
