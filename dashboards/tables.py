"""The sweep as two Parquet tables with explicit schemas: one row per trial, one per epoch.

``results_table(record)`` (results.parquet), one row per trial:
    sweep, experiment, parent_run_id, run_id, trial_id, condition, model, layer, reference,
    metric, direction ("max" | "min" | "none"), alpha (signed), beta, seed, status,
    epochs_completed, performance_metric ("top1" | "map"), performance (final validation top-1
    or mAP), best_performance and best_epoch, alignment (final validation alignment by the
    trial's metric: linear by default), linear, alignment_nc, cka, rsa, dead_units,
    baseline_performance, performance_change (= performance - baseline_performance,
    positive = better), degradation (the paper's
    y axis: the drop from the baseline in points, 100 * (baseline_performance - performance),
    top-1 percentage points or mAP points, positive = worse), front_up, front_down
    (``dashboards.fronts``), error.
``epochs_table(record)`` (epochs.parquet), one row per trial and epoch: the trial's keys, then
    every metric in ``EPOCH_METRICS`` (null where a trial did not report it).

Baseline: per condition, the finished alpha = 0 trial of the same seed; without one, the mean
over the condition's finished alpha = 0 trials of other seeds; without any, null (and
performance_change and degradation with it). Missing numbers are nulls in Parquet (NaN in pandas).

Both files carry the sweep's resolved config as JSON under the schema metadata key
``alignsweep.config`` (``sweep_config(record)``), and a description of every column in its
field metadata.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy import stats

from dashboards.fronts import FINISHED, front_masks
from dashboards.sources import SweepRecord, Trial
from records import EPOCH_METRICS
from references.cache import atomic_write_bytes

__all__ = [
    "CONFIG_KEY",
    "EPOCHS_SCHEMA",
    "EPOCH_METRICS",
    "RESULTS_SCHEMA",
    "baselines",
    "epochs_table",
    "read_config",
    "results_table",
    "sweep_config",
    "write_parquet",
]

CONFIG_KEY = b"alignsweep.config"
SCHEMA_VERSION = "1"


def _f(name: str, dtype: pa.DataType, description: str, nullable: bool = True) -> pa.Field:
    return pa.field(name, dtype, nullable=nullable, metadata={"description": description})


_TRIAL_KEYS = [
    _f("sweep", pa.string(), "sweep name given on the command line", False),
    _f("experiment", pa.string(), "MLflow experiment / Ray folder: <sweep>-<scale>", False),
    _f("parent_run_id", pa.string(), "the sweep invocation's MLflow parent run"),
    _f("run_id", pa.string(), "the trial's MLflow child run (Ray source: Ray's trial id)", False),
    _f("trial_id", pa.string(), "<condition>-<direction>-a<|alpha|>-b<beta>-s<seed>", False),
    _f("condition", pa.string(), "paper condition (one Pareto front each)", False),
]
_DESIGN = [
    _f("direction", pa.string(), "max (alpha > 0), min (alpha < 0), none (baseline)", False),
    _f("alpha", pa.float64(), "signed weight of the alignment loss"),
    _f("beta", pa.float64(), "weight of the task loss"),
    _f("seed", pa.int64(), "trial seed"),
    _f("status", pa.string(), "FINISHED, FAILED, RUNNING or KILLED", False),
]

RESULTS_SCHEMA = pa.schema([
    *_TRIAL_KEYS,
    _f("model", pa.string(), "model name"),
    _f("layer", pa.string(), "aligned layer"),
    _f("reference", pa.string(), "gabor, pretrained or nsd"),
    _f("metric", pa.string(), "alignment metric of the loss"),
    *_DESIGN,
    _f("epochs_completed", pa.int64(), "epochs reported"),
    _f("performance_metric", pa.string(), "top1 (single-label) or map (multi-label)"),
    _f("performance", pa.float64(), "final validation top-1 accuracy or mAP"),
    _f("best_performance", pa.float64(), "best validation performance over epochs"),
    _f("best_epoch", pa.int64(), "epoch of best_performance"),
    _f("alignment", pa.float64(), "final validation alignment by the trial's metric (the "
                                  "loss's; linear, the paper's cross-validated ridge, by "
                                  "default): what the fronts use"),
    _f("linear", pa.float64(), "final validation linear alignment (cross-validated ridge)"),
    _f("cka", pa.float64(), "final validation linear CKA"),
    _f("rsa", pa.float64(), "final validation RSA"),
    _f("alignment_nc", pa.float64(), "final model -> voxel R^2 over the voxels' noise "
                                     "ceiling (voxel references with ncsnr; else null)"),
    _f("dead_units", pa.float64(), "final fraction of the layer's units constant over the "
                                   "validation set (they get no alignment credit)"),
    _f("seeds_in_configuration", pa.int64(),
       "finished trials (seeds) of this configuration (condition, direction, alpha, beta) "
       "with both a performance and an alignment: the ones its means average"),
    *[_f(f"{m}_{k}", pa.float64(), f"{what} of the configuration's finished seeds")
      for m in ("performance", "alignment")
      for k, what in (("mean", "mean " + m), ("low", f"95% t-interval low of the mean {m}"),
                      ("high", f"95% t-interval high of the mean {m}"))],
    _f("baseline_performance", pa.float64(), "performance of the condition's alpha = 0 trial"),
    _f("performance_change", pa.float64(),
       "performance - baseline_performance (fraction; positive = better)"),
    _f("degradation", pa.float64(),
       "drop from the baseline in points, 100 * (baseline_performance - performance): top-1 "
       "percentage points or mAP points; positive = worse (the paper's y axis)"),
    _f("front_up", pa.bool_(), "on the (performance up, alignment up) front", False),
    _f("front_down", pa.bool_(), "on the (performance up, alignment down) front", False),
    _f("error", pa.string(), "failure message of a failed trial"),
])

#: performance is a fraction (top-1, mAP); the paper states drops in points (x 100)
POINTS = 100.0

#: metrics per epoch (trainable.train reports them; val_top1/top5 or val_map by task)

EPOCHS_SCHEMA = pa.schema([
    *_TRIAL_KEYS,
    *_DESIGN,
    _f("epoch", pa.int64(), "epoch (0-based; MLflow step)", False),
    *[_f(m, pa.float64(), f"{m} reported after this epoch") for m in EPOCH_METRICS],
])


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _performance_metric(trial: Trial) -> str | None:
    if "val_map" in trial.history:
        return "map"
    if "val_top1" in trial.history:
        return "top1"
    return None


def baselines(trials: tuple[Trial, ...]) -> dict[str, float]:
    """trial_id -> baseline performance (see the module docstring), for trials that have one."""
    finished = [t for t in trials if t.direction == "none" and t.status == FINISHED
                and math.isfinite(t.final("val_performance"))]
    out = {}
    for t in trials:
        same = [b.final("val_performance") for b in finished
                if b.condition == t.condition and b.seed == t.seed]
        pool = same or [b.final("val_performance") for b in finished
                        if b.condition == t.condition]
        if pool:
            out[t.trial_id] = float(np.mean(pool))
    return out


def _with_metadata(table: pa.Table, config: Mapping[str, Any]) -> pa.Table:
    meta = dict(table.schema.metadata or {})
    meta[CONFIG_KEY] = json.dumps(config, sort_keys=True, default=str).encode()
    meta[b"alignsweep.schema_version"] = SCHEMA_VERSION.encode()
    return table.replace_schema_metadata(meta)


def mean_interval(values, level: float = 0.95) -> tuple[float | None, float | None,
                                                        float | None]:
    """(mean, low, high): the mean of finite ``values`` and its t-interval (Student's t with
    n - 1 degrees of freedom); (value, None, None) for one value, Nones for none."""
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return None, None, None
    mean = float(v.mean())
    if v.size == 1:
        return mean, None, None
    half = float(stats.t.ppf(0.5 + level / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return mean, mean - half, mean + half


def configuration_key(row: Mapping[str, Any]) -> tuple:
    """What makes trials repeats of one configuration: everything but the seed."""
    return (row["condition"], row["direction"], row["alpha"], row["beta"])


def _add_configuration_means(rows: list[dict]) -> None:
    """Per configuration (``configuration_key``), the across-seed mean and 95% interval of
    performance and alignment over its FINISHED trials that have both (the trials the fronts
    and statistics use: one without an alignment would move only the performance mean),
    written into every row of it."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(configuration_key(row), []).append(row)
    for members in groups.values():
        done = [r for r in members if r["status"] == FINISHED
                and r["performance"] is not None and r["alignment"] is not None]
        summary = {"seeds_in_configuration": len(done)}
        for m in ("performance", "alignment"):
            mean, low, high = mean_interval([r[m] for r in done])
            summary.update({f"{m}_mean": mean, f"{m}_low": low, f"{m}_high": high})
        for r in members:
            r.update(summary)


def results_table(record: SweepRecord) -> pa.Table:
    """One row per trial (RESULTS_SCHEMA), fronts marked, config in the metadata."""
    base = baselines(record.trials)
    rows = []
    for t in record.trials:
        perf = [ev for ev in t.history.get("val_performance", ()) if math.isfinite(ev[1])]
        best = max(perf, key=lambda ev: ev[1]) if perf else None  # NaN epochs never best
        performance = _num(t.final("val_performance"))
        baseline = base.get(t.trial_id)
        rows.append({
            "sweep": record.sweep, "experiment": record.experiment,
            "parent_run_id": record.parent_run_id, "run_id": t.run_id,
            "trial_id": t.trial_id, "condition": t.condition,
            "model": t.config.get("model"), "layer": t.config.get("layer"),
            "reference": t.config.get("reference"), "metric": t.config.get("metric"),
            "direction": t.direction, "alpha": _num(t.alpha), "beta": _num(t.beta),
            "seed": t.seed, "status": t.status, "epochs_completed": t.epochs_completed,
            "performance_metric": _performance_metric(t), "performance": performance,
            "best_performance": _num(best[1]) if best else None,
            "best_epoch": best[0] if best else None,
            "alignment": _num(t.final("val_alignment")),
            # runs from before val_linear existed had val_alignment linear whatever the metric
            "linear": _num(t.final("val_alignment") if math.isnan(t.final("val_linear"))
                           else t.final("val_linear")),
            "cka": _num(t.final("val_cka")),
            "rsa": _num(t.final("val_rsa")), "dead_units": _num(t.final("dead_units")),
            "alignment_nc": _num(t.final("val_alignment_nc")),
            "baseline_performance": baseline,
            "performance_change": (performance - baseline
                                   if performance is not None and baseline is not None
                                   else None),
            "degradation": (POINTS * (baseline - performance)
                            if performance is not None and baseline is not None else None),
            "front_up": False, "front_down": False, "error": t.error,
        })
    _add_configuration_means(rows)
    table = pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA)
    up, down = front_masks(table)  # on the configurations' means (dashboards.fronts)
    table = table.set_column(table.schema.get_field_index("front_up"),
                             RESULTS_SCHEMA.field("front_up"), pa.array(up, pa.bool_()))
    table = table.set_column(table.schema.get_field_index("front_down"),
                             RESULTS_SCHEMA.field("front_down"), pa.array(down, pa.bool_()))
    return _with_metadata(table, sweep_config(record))


def epochs_table(record: SweepRecord) -> pa.Table:
    """One row per trial and reported epoch (EPOCHS_SCHEMA), config in the metadata."""
    rows = []
    for t in record.trials:
        epochs = t.epochs
        by_metric = {m: dict(t.history.get(m, ())) for m in EPOCH_METRICS}
        for epoch in epochs:
            row = {"sweep": record.sweep, "experiment": record.experiment,
                   "parent_run_id": record.parent_run_id, "run_id": t.run_id,
                   "trial_id": t.trial_id, "condition": t.condition, "direction": t.direction,
                   "alpha": _num(t.alpha), "beta": _num(t.beta), "seed": t.seed,
                   "status": t.status, "epoch": epoch}
            for m in EPOCH_METRICS:
                v = by_metric[m].get(epoch)
                row[m] = _num(v) if v is not None else None
            rows.append(row)
    return _with_metadata(pa.Table.from_pylist(rows, schema=EPOCHS_SCHEMA),
                          sweep_config(record))


_PER_TRIAL = ("alpha", "beta", "seed")


def sweep_config(record: SweepRecord) -> dict[str, Any]:
    """The sweep's resolved config: where it came from, the parent run's tags, and per
    condition the trial config shared by its trials (every TrialConfig key), the signed alphas,
    betas and seeds run, and the keys that differ between its trials (besides those)."""
    conditions: dict[str, Any] = {}
    for cond in dict.fromkeys(t.condition for t in record.trials):
        trials = [t for t in record.trials if t.condition == cond]
        keys = dict.fromkeys(k for t in trials for k in t.config if k not in _PER_TRIAL)
        shared, varying = {}, []
        for k in keys:
            values = {json.dumps(t.config.get(k), default=str) for t in trials}
            if len(values) == 1:
                shared[k] = trials[0].config.get(k)
            else:
                varying.append(k)
        conditions[cond] = {
            "config": shared,
            "varying": varying,
            "alphas": sorted({t.alpha for t in trials}),
            "betas": sorted({t.beta for t in trials}),
            "seeds": sorted({t.seed for t in trials}),
            "trials": len(trials),
        }
    return {
        "sweep": record.sweep,
        "experiment": record.experiment,
        "source": record.source,
        "parent_run_id": record.parent_run_id,
        "parent_status": record.parent_status,
        "parent_tags": {k: v for k, v in sorted(record.parent_tags.items())
                        if not k.startswith("mlflow.")},
        "conditions": conditions,
    }


def write_parquet(table: pa.Table, path: str | Path) -> Path:
    """Write ``table`` as Parquet (schema and metadata as built), atomically: a reader, or a
    kill mid-write, sees the previous file or this one, never a truncated one (Parquet keeps
    its footer at the end, so a truncated file is unreadable). Returns the path."""
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    return atomic_write_bytes(path, buffer.getvalue().to_pybytes())


def read_config(path: str | Path) -> dict[str, Any]:
    """The resolved config stored in a results / epochs Parquet file's metadata."""
    meta = pq.read_schema(path).metadata or {}
    if CONFIG_KEY not in meta:
        raise ValueError(f"{path}: no {CONFIG_KEY.decode()} in the Parquet metadata; accepted: "
                         f"a results.parquet or epochs.parquet written by dashboards")
    return json.loads(meta[CONFIG_KEY])
