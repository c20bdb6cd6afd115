"""The post-processor: fronts against brute force, statistics against scipy, tables and files
from MLflow stores written here in the exact structure sweeps/tracking.py writes, degenerate
sweeps, stores that are only read (never created or migrated), outputs replaced whole or not
at all, and a real smoke sweep read from MLflow and from Ray's result folder."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import matplotlib.image
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from faults import HalfThenFull
from mlflow.tracking import MlflowClient
from scipy import stats
from scipy import stats as scipy_stats
from smoke_store import EXPERIMENT, REPO, SWEEP, finished_smoke_sweep

from dashboards import pareto, statistics, tables
from dashboards.fronts import front_masks, pareto_mask
from dashboards.sources import SourceError, load_mlflow
from records import SweepRunTags
from sweeps.tracking import PARENT_TAG

# --------------------------------------------------------------------------------- fronts


def brute_force_front(perf, align, *, alignment_up):
    """O(n^2) straight from the definition: i is on the front unless some j is >= in both
    (alignment read downwards for the down front) and > in one; NaN points take no part."""
    perf, align = np.asarray(perf, float), np.asarray(align, float)
    a = align if alignment_up else -align
    ok = np.isfinite(perf) & np.isfinite(align)
    out = np.zeros(len(perf), bool)
    for i in np.flatnonzero(ok):
        out[i] = not any(
            perf[j] >= perf[i] and a[j] >= a[i] and (perf[j] > perf[i] or a[j] > a[i])
            for j in np.flatnonzero(ok) if j != i)
    return out


def random_points(rng):
    """Points on a coarse grid (many ties), some rows repeated (duplicates), some NaN."""
    n = int(rng.integers(0, 25))
    perf = rng.integers(0, 5, n) / 4.0
    align = rng.integers(-3, 4, n) / 3.0
    if n:
        dup = rng.integers(0, n, int(rng.integers(0, 4)))
        perf, align = np.r_[perf, perf[dup]], np.r_[align, align[dup]]
        nan = rng.random(perf.size) < 0.1
        perf[nan & (rng.random(perf.size) < 0.5)] = np.nan
        align[nan & ~np.isnan(perf)] = np.nan
    return perf, align


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("up", [True, False], ids=["alignment_up", "alignment_down"])
def test_pareto_mask_equals_brute_force_with_ties_duplicates_and_nan(seed, up):
    rng = np.random.default_rng(seed)
    for _ in range(60):
        perf, align = random_points(rng)
        got = pareto_mask(perf, align, alignment_up=up)
        np.testing.assert_array_equal(got, brute_force_front(perf, align, alignment_up=up))


def test_pareto_mask_known_answer():
    #            a     b     c     d     e     f (dup of a)  g (nan)
    perf = [0.9, 0.8, 0.8, 0.5, 0.9, 0.9, np.nan]
    align = [0.1, 0.5, 0.4, 0.9, 0.0, 0.1, 0.9]
    # up: a and its duplicate f (best perf at its alignment), b (more aligned, next best), d
    # (most aligned); c is dominated by b (same perf, less aligned), e by a.
    assert pareto_mask(perf, align, alignment_up=True).tolist() == [
        True, True, False, True, False, True, False]
    # down: e (best perf, least aligned) dominates a and f (same perf, more aligned).
    assert pareto_mask(perf, align, alignment_up=False).tolist() == [
        False, False, False, False, True, False, False]


def test_pareto_mask_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"shapes \(3,\) and \(2,\)"):
        pareto_mask([1, 2, 3], [1, 2], alignment_up=True)


def test_front_masks_are_per_condition_and_skip_unfinished_trials():
    table = pa.table({
        "condition": ["a", "a", "b", "a"],
        "status": ["FINISHED", "FINISHED", "FINISHED", "FAILED"],
        "performance": [0.5, 0.4, 0.9, 0.99],
        "alignment": [0.1, 0.2, 0.9, 0.99],
    })
    up, down = front_masks(table)
    # b's point would dominate all of a's; the failed a-trial would too: neither counts.
    assert up.tolist() == [True, True, True, False]
    assert down.tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match=r"needs columns \['status'\]"):
        front_masks(table.drop_columns(["status"]))


# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("seed", range(4))
def test_spearman_and_bootstrap_match_a_loop_over_scipy(seed):
    rng = np.random.default_rng(seed)
    x = np.round(rng.normal(size=25), 1)  # rounding makes ties
    y = np.round(0.5 * x + rng.normal(size=25), 1)
    res = statistics.spearman_ci(x, y, n_boot=300, seed=seed)
    ref = stats.spearmanr(x, y)
    warnings.simplefilter("ignore", stats.ConstantInputWarning)  # constant resamples: NaN
    assert res.rho == pytest.approx(ref.statistic, abs=1e-12)
    assert res.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    # the same resamples, each through scipy
    idx = np.random.default_rng(seed).integers(0, 25, size=(300, 25))
    boots = [stats.spearmanr(x[i], y[i]).statistic for i in idx]
    boots = np.array([b for b in boots if np.isfinite(b)])
    assert res.n_boot_valid == boots.size
    assert (res.low, res.high) == pytest.approx(tuple(np.quantile(boots, [0.025, 0.975])),
                                                abs=1e-12)
    assert res.low <= res.rho <= res.high


def test_spearman_interval_separates_correlated_from_independent_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    strong = statistics.spearman_ci(x, x + 0.2 * rng.normal(size=40))
    independent = statistics.spearman_ci(x, rng.normal(size=40))
    assert strong.low > 0.7
    assert independent.low < 0 < independent.high


@pytest.mark.parametrize("x, y, match", [
    ([1.0, 2.0], [3.0, 4.0], "at least 3 finished trials"),
    ([1.0, 2.0, np.nan, 4.0], [1.0, np.nan, 3.0, 4.0], "there are 2"),
    ([1.0, 2.0, 3.0], [0.5, 0.5, 0.5], "performance is the same for all 3"),
    ([0.1, 0.1, 0.1], [0.5, 0.6, 0.7], "alignment is the same for all 3"),
])
def test_spearman_undefined_cases_say_why(x, y, match):
    res = statistics.spearman_ci(x, y)
    assert np.isnan(res.rho) and np.isnan(res.low) and np.isnan(res.high)
    assert match in res.message


def test_spearman_over_fewer_than_five_points_has_no_interval():
    """Resamples of 3 points hold all three only 22 % of the time; the rest give +-1 or
    nothing, and the interval of a perfectly ordered control read "[1.000, 1.000]"."""
    three = statistics.spearman_ci([0.1, 0.2, 0.3], [0.5, 0.6, 0.7], n_boot=500)
    assert three.rho == pytest.approx(1.0) and np.isnan(three.low) and np.isnan(three.high)
    assert three.message.startswith("no bootstrap interval over 3 trials")
    five = statistics.spearman_ci([0.1, 0.2, 0.3, 0.4, 0.5], [0.5, 0.7, 0.6, 0.9, 0.8],
                                  n_boot=500)
    assert five.low < five.rho and five.message == ""


def test_spearman_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"level=1\.5; accepted: a number in \(0, 1\)"):
        statistics.spearman_ci([1, 2, 3], [1, 2, 3], level=1.5)
    with pytest.raises(ValueError, match="n_boot=0"):
        statistics.spearman_ci([1, 2, 3], [1, 2, 3], n_boot=0)


@pytest.mark.parametrize("alpha, perf, trend", [
    ([-1, 0, 1, 1], [0.1, 0.2, 0.3, 0.5], "increasing"),
    ([-1, 0, 0, 1], [0.5, 0.4, 0.4, 0.4], "decreasing"),
    ([-1, 0, 1], [0.5, 0.6, 0.4], "neither"),
    ([-1, 0, 1], [0.5, 0.5, 0.5], "constant"),
    ([0, 0], [0.5, 0.6], "undefined"),
])
def test_monotonicity_in_signed_alpha(alpha, perf, trend):
    res = statistics.monotonicity(alpha, perf)
    assert res.trend == trend
    assert res.monotone is {"neither": False, "undefined": None}.get(trend, True)
    if trend == "undefined":
        assert "at least 2 distinct alphas" in res.message


def test_monotonicity_averages_trials_sharing_an_alpha():
    # alpha 1 has betas with 0.2 and 0.6: mean 0.4 > 0.3 at alpha 0, so increasing
    res = statistics.monotonicity([0, 1, 1, -1], [0.3, 0.2, 0.6, 0.1])
    assert res.alphas == (-1.0, 0.0, 1.0)
    assert res.mean_performance == pytest.approx((0.1, 0.3, 0.4))
    assert res.trend == "increasing"


# --------------------------------------------------- MLflow stores written like a real sweep


def fake_trial(direction, alpha, *, perf, align, beta=1.0, seed=0, status="FINISHED",
               filters=True, condition=None, predictions=None, config=None):
    return {"direction": direction, "alpha": alpha, "beta": beta, "seed": seed,
            "status": status, "perf": perf, "align": align, "filters": filters,
            "condition": condition, "predictions": predictions, "config": config or {}}


def write_sweep(client, sweep, trials, *, scale="smoke", start=None, reference="nsd",
                multi_label=True, tmp=None, parent_tags=None):
    """A parent run and one child per trial, written by the driver's own writer
    (sweeps.tracking: start_parent, TrialRun, finish), named by records. Returns the parent
    run id. ``start`` is ignored (runs are ordered by when they are written)."""
    from records import TrialKey, TrialRunTags, experiment_name
    from sweeps import tracking

    uri = client.tracking_uri
    tags = {"sweep": sweep, "scale": "demo", "data": "demo", "smoke": "true",
            "data_description": "fake store written by the test"}
    parent = tracking.start_parent(uri, experiment_name(sweep, scale),
                                   {**tags, **(parent_tags or {})},
                                   description=f"test sweep {sweep}")
    png = Path(tmp) / "conv1_filters.png"
    matplotlib.image.imsave(png, np.random.default_rng(0).random((24, 24, 3)))
    for t in trials:
        key = TrialKey.of(t["condition"] or sweep, t["alpha"], t["beta"], t["seed"])
        config = {"model": "alexnet", "layer": "conv1", "reference": reference,
                  "metric": "linear", "alpha": t["alpha"], "beta": t["beta"],
                  "seed": t["seed"], "epochs": len(t["perf"]), "lr": 1e-4,
                  "batch_size": 16, "image_size": 64, "width": 0.125, "threads": 1,
                  **t.get("config", {})}
        run = tracking.TrialRun(uri, parent, key.format(), params=config,
                                tags={**tags, **TrialRunTags.of(key).format()}, say=lambda _: None)
        perf_key = "val_map" if multi_label else "val_top1"
        for epoch, (p, a) in enumerate(zip(t["perf"], t["align"])):
            values = {"val_performance": p, perf_key: p, "val_cka": 0.3, "val_rsa": 0.1,
                      "task_loss": 1.0 - p, "epoch": float(epoch)}
            if a is not None:
                values["val_alignment"] = a
            run.log_epoch(values, epoch)
        if t["status"] == "FAILED":
            run.set_tags({"error": "TrialDiverged: non-finite loss"})
        art = Path(tempfile.mkdtemp(prefix="artifacts-", dir=tmp))
        if t["filters"]:
            shutil.copy(png, art / "conv1_filters.png")
        if t.get("predictions") is not None:  # as trainable.train writes it
            np.savez_compressed(art / "val_predictions.npz", **t["predictions"])
        run.log_artifacts(art)
        run.finish(t["status"])
        assert run.close(60), key
    tracking.finish(uri, parent, "FINISHED")
    return parent


FULL = [
    fake_trial("none", 0.0, perf=[0.30, 0.40, 0.50], align=[0.10, 0.20, 0.30]),
    fake_trial("max", 0.1, perf=[0.30, 0.45, 0.44], align=[0.20, 0.40, 0.50]),
    fake_trial("max", 0.8, perf=[0.20, 0.30, 0.35], align=[0.30, 0.60, 0.70]),
    fake_trial("min", -0.1, perf=[0.30, 0.50, 0.52], align=[0.00, -0.10, -0.10]),
    fake_trial("min", -0.8, perf=[0.20, 0.30, 0.40], align=[-0.10, -0.30, -0.40]),
]

# a composite sweep: two conditions (one front each), seeds with and without a baseline
COMPOSITE = [
    *[{**t, "condition": "cond_a"} for t in FULL],
    fake_trial("none", 0.0, perf=[0.6], align=[0.1], condition="cond_b", seed=0),
    fake_trial("none", 0.0, perf=[0.2], align=[0.1], condition="cond_b", seed=1),
    fake_trial("max", 1.0, perf=[0.5], align=[0.3], condition="cond_b", seed=1),
    fake_trial("max", 1.0, perf=[0.45], align=[0.2], condition="cond_b", seed=2),
]


def _multi_label_outcome(skill, seed, n=160, classes=6):
    """A trial's val_predictions.npz content: mAP grows with ``skill``; the same images and
    targets for every trial (targets from seed 0), scores from ``seed``."""
    targets = np.random.default_rng(0).random((n, classes)) < 0.3
    scores = skill * targets + np.random.default_rng(seed).normal(0, 1, (n, classes))
    return {"image_ids": np.arange(1000, 1000 + n), "scores": scores.astype(np.float32),
            "targets": targets.astype(np.uint8)}


def _controlled():
    """A condition and its negative control, with per-image outcomes: suppressing costs much
    in the condition, little in the control."""
    from dashboards.effects import Predictions, performance

    out = []
    for cond, shuffle, skills in (("ctl", False, {"none": 2.5, "max": 2.4, "min": 0.4}),
                                  ("ctl_shuffled", True, {"none": 2.5, "max": 2.3, "min": 2.2})):
        for k, (direction, alpha) in enumerate((("none", 0.0), ("max", 0.8), ("min", -0.8))):
            pred = _multi_label_outcome(skills[direction], seed=10 * k + 1 + 100 * shuffle)
            perf = float(performance(Predictions(pred["image_ids"], scores=pred["scores"],
                                                 targets=pred["targets"] > 0),
                                     np.ones((1, 160)))[0])
            out.append(fake_trial(direction, alpha, perf=[perf], align=[0.1 * k],
                                  condition=cond, predictions=pred,
                                  config={"reference_shuffle": shuffle}))
    return out


DEGENERATE = {
    "no_baseline": ([t for t in FULL if t["direction"] != "none"], "no finished baseline"),
    "failed": ([*FULL[:3], fake_trial("min", -0.8, perf=[0.2], align=[0.1], status="FAILED")],
               "1 of 4 trials did not finish (FAILED"),
    "one_direction": (FULL[:3], "one direction only (max)"),
    "one_trial": (FULL[:1], "one finished trial"),
    "no_alignment": ([*FULL[:2], fake_trial("min", -0.5, perf=[0.4], align=[None])],
                     "finished without a validation alignment"),
    "no_trials": ([], "no trial runs"),
}


@pytest.fixture(scope="module")
def fake_store(tmp_path_factory):
    """One SQLite store (creating one costs seconds) holding every fake sweep of this module:
    sweep name -> parent run id."""
    tmp = tmp_path_factory.mktemp("fake-store")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    parents = {"full": write_sweep(client, "full", FULL, tmp=tmp)}
    for name, (trials, _) in DEGENERATE.items():
        parents[name] = write_sweep(client, name, trials, tmp=tmp)
    parents["gabor"] = write_sweep(client, "gabor", FULL[:3], reference="gabor",
                                   multi_label=False, tmp=tmp)
    parents["paper"] = write_sweep(client, "paper", COMPOSITE, tmp=tmp)
    parents["ctl"] = write_sweep(client, "ctl", _controlled(), tmp=tmp)
    # two invocations of one sweep at two scales: the later one is the default. The later is
    # at the scale listed first (demo, smoke, paper), so "the newest run" and "the last scale
    # that has runs" pick different ones
    t0 = int(time.time() * 1000)
    parents["older"] = write_sweep(client, "twice", FULL[:2], scale="smoke", start=t0 - 60_000,
                                   tmp=tmp)
    parents["newer"] = write_sweep(client, "twice", FULL[:3], scale="demo", start=t0, tmp=tmp)
    # another tool's runs in a sweep's experiment, after the sweep: a notebook's top-level run
    # and an evaluation nested under the sweep's parent run
    # a trial run twice under one parent (re-run by hand, outside the driver, which would
    # reopen the trial's run): the newer finished run is read
    parents["rerun"] = write_sweep(client, "rerun", FULL[:3], tmp=tmp)
    first = [r for r in client.search_runs(
        [client.get_run(parents["rerun"]).info.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parents['rerun']}'")
        if float(r.data.params["alpha"]) == FULL[2]["alpha"]][0]
    again = client.create_run(first.info.experiment_id, run_name=first.info.run_name,
                              tags=dict(first.data.tags))
    for key, value in first.data.params.items():
        client.log_param(again.info.run_id, key, value)
    for epoch, p in enumerate([0.2, 0.3, 0.61]):
        for key, value in (("val_performance", p), ("val_map", p), ("val_alignment", 0.7),
                           ("epoch", float(epoch))):
            client.log_metric(again.info.run_id, key, value, step=epoch)
    client.set_terminated(again.info.run_id)
    parents["lab"] = write_sweep(client, "lab", FULL[:3], tmp=tmp)
    parents["searched"] = write_sweep(client, "searched", FULL[:3], tmp=tmp, parent_tags={
        "search": "optuna", "num_samples": "2"})
    lab = client.get_experiment_by_name("lab-smoke").experiment_id
    for name, tags in (("notebook-eval", {}),
                       ("eval on held-out", {"mlflow.parentRunId": parents["lab"]})):
        run = client.create_run(lab, run_name=name, tags=tags)
        client.log_metric(run.info.run_id, "accuracy", 0.5)
        client.set_terminated(run.info.run_id)
        parents[name] = run.info.run_id
    return uri, parents


def read_results(path):
    return pq.read_table(Path(path).parent / "results.parquet")


def png_is_not_blank(path):
    img = matplotlib.image.imread(str(path))[..., :3]
    return img.std() > 0.05 and len(np.unique(img.reshape(-1, 3), axis=0)) > 50


@pytest.fixture(scope="module")
def full_report(fake_store, tmp_path_factory):
    """The full fake sweep post-processed once (and logged to its parent run)."""
    uri, _ = fake_store
    return pareto.postprocess("full", mlflow_uri=uri, out=tmp_path_factory.mktemp("full"))


def test_results_table_of_a_full_sweep(full_report):
    report = full_report
    table = read_results(report)
    assert table.schema.equals(tables.RESULTS_SCHEMA, check_metadata=False)
    rows = {r["direction"] + str(r["alpha"]): r for r in table.to_pylist()}
    assert len(rows) == 5
    base = rows["none0.0"]
    assert base["performance"] == 0.5 and base["baseline_performance"] == 0.5
    strong = rows["max0.8"]
    assert strong["performance"] == pytest.approx(0.35)  # final epoch, not the best
    assert strong["best_performance"] == pytest.approx(0.35) and strong["best_epoch"] == 2
    weak = rows["max0.1"]
    assert weak["best_performance"] == pytest.approx(0.45) and weak["best_epoch"] == 1
    assert weak["performance_change"] == pytest.approx(0.44 - 0.5)
    assert weak["degradation"] == pytest.approx(100 * (0.5 - 0.44))  # points, + = worse
    assert strong["alignment"] == pytest.approx(0.7)
    assert strong["performance_metric"] == "map" and strong["model"] == "alexnet"
    perf = np.array(table.column("performance").to_pylist())
    align = np.array(table.column("alignment").to_pylist())
    for col, up in (("front_up", True), ("front_down", False)):
        assert table.column(col).to_pylist() == brute_force_front(
            perf, align, alignment_up=up).tolist()
    # the fronts of this sweep, by hand: up = min-0.1 (best perf), baseline, max-0.1, max-0.8
    assert {r["trial_id"] for r in table.to_pylist() if r["front_up"]} == {
        "full-min-a0.1-b1-s0", "full-none-a0-b1-s0", "full-max-a0.1-b1-s0",
        "full-max-a0.8-b1-s0"}
    epochs = pq.read_table(report.parent / "epochs.parquet")
    assert epochs.schema.equals(tables.EPOCHS_SCHEMA, check_metadata=False)
    assert epochs.num_rows == 15
    assert sorted(set(epochs.column("epoch").to_pylist())) == [0, 1, 2]


def test_parquet_metadata_holds_the_resolved_config(fake_store, full_report, tmp_path):
    _, parents = fake_store
    report = full_report
    for name in ("results.parquet", "epochs.parquet"):
        config = tables.read_config(report.parent / name)
        assert config["sweep"] == "full" and config["parent_run_id"] == parents["full"]
        cond = config["conditions"]["full"]
        assert cond["alphas"] == [-0.8, -0.1, 0.0, 0.1, 0.8]
        assert cond["config"]["batch_size"] == 16  # typed, from the string param
        assert cond["config"]["lr"] == 1e-4
        assert cond["config"]["val_folds"] == 5  # a TrialConfig default, resolved
        assert config["parent_tags"]["data_description"] == "fake store written by the test"
    with pytest.raises(ValueError, match="no alignsweep.config"):
        pq.write_table(pa.table({"x": [1]}), tmp_path / "plain.parquet")
        tables.read_config(tmp_path / "plain.parquet")


def test_every_file_is_written_and_logged_to_the_parent_run(fake_store, full_report):
    uri, parents = fake_store
    report, out = full_report, full_report.parent
    assert report.name == "report.html"
    for name in pareto.FILES:
        assert (out / name).is_file(), name
    for stem in ("front", "epochs", "filters"):
        assert png_is_not_blank(out / f"{stem}.png"), stem
        assert ET.parse(out / f"{stem}.svg").getroot().tag.endswith("svg")
    html = report.read_text()
    assert html.count('<img src="data:image/png;base64,') == 3
    assert "http://" not in html.replace("http://www.w3.org", "")  # nothing fetched from outside
    logged = {a.path for a in MlflowClient(uri).list_artifacts(parents["full"])}
    assert set(pareto.FILES) <= logged


def test_no_pyplot_state_is_left_behind(full_report):
    if "matplotlib.pyplot" in sys.modules:
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []


@pytest.mark.parametrize("name", list(DEGENERATE))
def test_degenerate_sweeps_get_every_file_and_a_clear_message(fake_store, tmp_path, name):
    uri, _ = fake_store
    _, message = DEGENERATE[name]
    report = pareto.postprocess(name, mlflow_uri=uri, out=tmp_path, log=False)
    for file in pareto.FILES:
        assert (tmp_path / file).is_file(), file
    summary = json.loads((tmp_path / "statistics.json").read_text())
    assert any(message in m for m in summary["messages"]), summary["messages"]
    assert message in report.read_text().replace("&#x27;", "'")
    table = read_results(report)
    if name == "no_baseline":
        assert set(table.column("degradation").to_pylist()) == {None}
        assert set(table.column("performance_change").to_pylist()) == {None}
        assert png_is_not_blank(tmp_path / "front.png")
    if name == "failed":
        failed = [r for r in table.to_pylist() if r["status"] == "FAILED"]
        assert len(failed) == 1 and not failed[0]["front_up"] and not failed[0]["front_down"]
        assert failed[0]["error"] == "TrialDiverged: non-finite loss"
        assert summary["conditions"]["failed"]["finished"] == 3
    if name == "one_trial":
        sp = summary["conditions"]["one_trial"]["spearman"]
        assert sp["rho"] is None and "at least 3" in sp["message"]
    if name == "no_trials":
        assert table.num_rows == 0 and summary["conditions"] == {}


def test_filter_grids_beside_the_gabor_bank_or_a_note(fake_store, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))  # no AlexNet weights
    uri, _ = fake_store
    for sweep, reference in (("gabor", "gabor"), ("full", "nsd")):
        record = load_mlflow(sweep, mlflow_uri=uri)
        rows = pareto._filter_rows(record, tables.results_table(record), tmp_path / sweep)
        (row,) = rows
        assert [p.role for p in row.panels] == ["max-aligned", "min-aligned", "baseline"]
        assert all(p.png is not None and p.png.is_file() for p in row.panels)
        # extremes of achieved alignment among the perturbed trials
        assert [p.caption.split()[0] for p in row.panels] == {
            "gabor": ["gabor-max-a0.8-b1-s0", "gabor-max-a0.1-b1-s0", "gabor-none-a0-b1-s0"],
            "full": ["full-max-a0.8-b1-s0", "full-min-a0.8-b1-s0", "full-none-a0-b1-s0"],
        }[sweep]
        alexnet, bank, *rest = row.references  # Figure 1c: pretrained AlexNet, Gabor bank
        assert alexnet.role == "pretrained AlexNet conv1"
        assert alexnet.png is None and "alexnet-owt-7be5be79.pth is not in" in alexnet.note
        assert bank.png is not None and bank.png.is_file() and "108 filters" in bank.caption
        if reference == "gabor":
            assert bank.role == "Gabor bank (the reference)" and rest == []
        else:
            (note,) = rest
            assert note.png is None and "not a filter bank" in note.note


def test_pretrained_alexnet_conv1_beside_the_grids_when_its_weights_are_cached(
        fake_store, tmp_path, monkeypatch):
    """Figure 1c: with torchvision's AlexNet file in the torch hub cache, its 64 conv1
    filters are drawn beside the trials' grids (here a file of the real shapes, saved by the
    test: the real weights cannot be downloaded here)."""
    import torch

    from trainable.models import build_model

    home = tmp_path / "torch"
    monkeypatch.setenv("TORCH_HOME", str(home))
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    net = build_model("alexnet", num_classes=1000, seed=0).net
    torch.save(net.state_dict(), checkpoints / "alexnet-owt-7be5be79.pth")
    uri, _ = fake_store
    record = load_mlflow("gabor", mlflow_uri=uri)
    (row,) = pareto._filter_rows(record, tables.results_table(record), tmp_path / "out")
    alexnet = row.references[0]
    assert alexnet.png is not None and alexnet.png.is_file(), alexnet.note
    assert alexnet.caption.startswith("64 filters")
    import matplotlib.image

    grid = matplotlib.image.imread(str(alexnet.png))
    assert grid.shape[0] > 8 * 11 and grid.std() > 0  # 64 tiles of 11 x 11, not blank


def test_each_side_costs_with_an_interval_beside_its_negative_control(fake_store, tmp_path):
    """Trials that logged their per-image outcome get each side's drop with a paired
    bootstrap interval, in statistics.json and the report, and the condition is set beside
    its control (<name>_shuffled, reference_shuffle on): suppressing costs far more than in
    the control, an interval that excludes zero."""
    uri, parents = fake_store
    report = pareto.postprocess("ctl", mlflow_uri=uri, out=tmp_path)
    stats = json.loads((report.parent / "statistics.json").read_text())
    ctl = stats["effects"]["ctl"]
    rows = {r["trial_id"]: r["performance"] for r in read_results(report).to_pylist()}
    assert ctl["min"]["drop"] == pytest.approx(
        100 * (rows["ctl-none-a0-b1-s0"] - rows["ctl-min-a0.8-b1-s0"]), abs=1e-6)
    assert ctl["min"]["low"] > 0 and ctl["min"]["excludes_zero"] is True
    assert ctl["validation_images"] == 160 and "one seed" in ctl["over"]
    versus = ctl["versus_control"]
    assert versus["control"] == "ctl_shuffled" and versus["min"]["low"] > 0
    assert "versus_control" not in stats["effects"]["ctl_shuffled"]
    # the same numbers in effects.parquet and as metrics of the parent MLflow run
    table = pq.read_table(report.parent / "effects.parquet")
    row = next(r for r in table.to_pylist() if r["condition"] == "ctl" and r["side"] == "min")
    assert (row["drop"], row["drop_low"], row["control"]) == (
        ctl["min"]["drop"], ctl["min"]["low"], "ctl_shuffled")
    assert row["drop_minus_control"] == versus["min"]["drop_difference"]
    parent = MlflowClient(uri).get_run(parents["ctl"])
    logged = parent.data.metrics
    # the parent run's description shows the front figure and says where the report is
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("test sweep ctl")
    assert f"get-artifact?path=front.png&run_uuid={parents['ctl']}" in note
    assert str(report.resolve()) in note
    assert logged["effect/ctl/min/drop"] == pytest.approx(ctl["min"]["drop"])
    assert logged["effect/ctl/min/drop_minus_control_low"] == pytest.approx(versus["min"]["low"])
    gap = stats["conditions"]["ctl"]["gap"]["points"]
    assert logged["stat/ctl/gap_points"] == pytest.approx(gap)
    html = report.read_text()
    assert 'id="effects"' in html and 'id="versus-control"' in html
    assert "suppressing (alpha &lt; 0)" in html and "ctl_shuffled" in html


def test_a_sweep_is_post_processed_without_importing_torch(fake_store, tmp_path):
    """The post-processor reads the records, bootstraps the per-image mAP and draws the filter
    grids and the Gabor bank in numpy: a report costs no torch or torchvision import (4 s of
    a 10 s post-processing here). Only a cached AlexNet weights file is read with torch."""
    uri, _ = fake_store
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "no-weights")}
    code = ("import sys; from dashboards import pareto; rc = pareto.main(sys.argv[1:]); "
            "print([m for m in ('torch', 'torchvision') if m in sys.modules]); sys.exit(rc)")
    for sweep in ("ctl",):  # multi-label with per-image outcomes (top-1's need no torch)
        out = tmp_path / sweep
        proc = subprocess.run([sys.executable, "-c", code, sweep, "--mlflow-uri", uri,
                               "--out", str(out), "--no-log"],
                              capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines()[-1] == "[]", proc.stdout
        stats = json.loads((out / "statistics.json").read_text())
        assert stats["figures_not_drawn"] == [] and png_is_not_blank(out / "filters.png")
        if sweep == "ctl":  # the mAP bootstrap ran
            assert stats["effects"]["ctl"]["min"]["excludes_zero"] is True


def test_the_report_says_how_the_configurations_were_chosen(full_report, fake_store, tmp_path):
    """A search's report read like a grid's: its sides average Optuna's sampled alphas, and
    nothing above the collapsed config said so."""
    stats = json.loads((full_report.parent / "statistics.json").read_text())
    assert stats["search"] == "the sweep file's grid"
    uri, _ = fake_store
    report = pareto.postprocess("searched", mlflow_uri=uri, out=tmp_path, log=False)
    line = ("2 samples per condition: alphas drawn by Optuna (log-uniform, then TPE) at the "
            "grid's first beta, not the grid's")
    assert json.loads((report.parent / "statistics.json").read_text())["search"] == line
    assert line.replace("'", "&#x27;") in report.read_text()


def test_without_per_image_outcomes_the_sides_have_no_interval(full_report):
    stats = json.loads((full_report.parent / "statistics.json").read_text())
    full = stats["effects"]["full"]
    assert full["min"]["drop"] == pytest.approx(100 * (0.5 - (0.52 + 0.40) / 2))
    assert full["min"]["low"] is None and "no per-image validation outcome" in full["message"]


def test_composite_sweep_has_a_front_a_baseline_and_statistics_per_condition(fake_store,
                                                                            tmp_path):
    uri, _ = fake_store
    report = pareto.postprocess("paper", mlflow_uri=uri, out=tmp_path, log=False)
    rows = {r["trial_id"]: r for r in read_results(report).to_pylist()}
    # the same seed's baseline when there is one, else the mean over the condition's seeds
    assert rows["cond_b-max-a1-b1-s1"]["baseline_performance"] == pytest.approx(0.2)
    assert rows["cond_b-max-a1-b1-s1"]["performance_change"] == pytest.approx(0.3)
    assert rows["cond_b-max-a1-b1-s1"]["degradation"] == pytest.approx(-30.0)
    assert rows["cond_b-max-a1-b1-s2"]["baseline_performance"] == pytest.approx(0.4)
    assert rows["cond_a-none-a0-b1-s0"]["baseline_performance"] == pytest.approx(0.5)
    # per condition, on the configurations' across-seed means: cond_b's baseline is
    # (0.4, 0.1) over seeds 0 and 1, its max configuration (0.475, 0.25) over seeds 1 and 2,
    # which dominates it; both of its seeds carry the front flag. cond_a has one seed.
    assert {t for t, r in rows.items() if r["front_up"]} == {
        "cond_a-min-a0.1-b1-s0", "cond_a-none-a0-b1-s0", "cond_a-max-a0.1-b1-s0",
        "cond_a-max-a0.8-b1-s0", "cond_b-max-a1-b1-s1", "cond_b-max-a1-b1-s2"}
    mx = rows["cond_b-max-a1-b1-s2"]
    assert mx["seeds_in_configuration"] == 2
    assert mx["performance_mean"] == pytest.approx(0.475)
    half = scipy_stats.t.ppf(0.975, 1) * np.std([0.5, 0.45], ddof=1) / np.sqrt(2)
    assert mx["performance_low"] == pytest.approx(0.475 - half)
    assert mx["performance_high"] == pytest.approx(0.475 + half)
    assert mx["alignment_mean"] == pytest.approx(0.25)
    one = rows["cond_a-max-a0.8-b1-s0"]
    assert one["seeds_in_configuration"] == 1 and one["performance_low"] is None
    assert one["performance_mean"] == one["performance"]
    summary = json.loads((tmp_path / "statistics.json").read_text())
    assert list(summary["conditions"]) == ["cond_a", "cond_b"]
    assert summary["conditions"]["cond_b"]["finished"] == 4
    # with repeated seeds rho counts configurations (cond_b has two: too few for a rho)
    assert summary["conditions"]["cond_b"]["spearman"]["n"] == 2
    # cond_a and cond_b are none of the paper's conditions: the section says so
    assert summary["paper"]["headlines"] == [] and summary["paper"]["comparisons"] == []
    assert "None of the paper's headline conditions" in report.read_text()
    config = tables.read_config(tmp_path / "results.parquet")
    assert config["conditions"]["cond_b"]["seeds"] == [0, 1, 2]
    assert png_is_not_blank(tmp_path / "front.png")


def write_ray_run(folder, trials, config=None):
    """A run folder as sweeps/execute.py leaves it, through the writer it uses
    (``records.write_manifest``: key, state, folder, run id, config per trial), with trial
    folders named by key holding Ray's result.json lines, error.txt for a failed one."""
    from records import ManifestEntry, write_manifest
    from references.cache import atomic_write_text

    folder.mkdir(parents=True)
    (folder / "mlflow_parent.json").write_text(json.dumps({"run_id": "p123", "mlflow_uri": "x"}))
    entries = []
    for k, (tid, state, perf) in enumerate(trials):
        trial_dir = folder / tid
        trial_dir.mkdir()
        (trial_dir / "result.json").write_text("".join(
            json.dumps({"epoch": float(e), "val_performance": p, "val_top1": p,
                        "val_alignment": 0.1 * e + k, "training_iteration": e + 1}) + "\n"
            for e, p in enumerate(perf)))
        if state == "ERROR":
            (trial_dir / "error.txt").write_text("Traceback...\nTrialDiverged: non-finite loss")
        entries.append(ManifestEntry(tid, state, f"{folder.name}/{tid}", None,
                                     dict(config or {})))
    write_manifest(folder, entries, write_text=atomic_write_text)


def test_ray_results_folder_statuses_config_and_newest_run(tmp_path):
    storage = tmp_path / "ray_results"
    config = {"model": "alexnet", "layer": "conv1", "reference": "gabor", "width": 0.25,
              "epochs": 10}
    write_ray_run(storage / "gabor_conv1-demo_20260101-000000",
                  [("gabor_conv1-none-a0-b1-s0", "done", [0.3])], config)
    write_ray_run(storage / "gabor_conv1-demo_20260102-000000", [
        ("gabor_conv1-none-a0-b1-s0", "done", [0.3, 0.4]),
        ("gabor_conv1-max-a8-b2-s0", "done", [0.2, 0.35]),
        ("gabor_conv1-min-a8-b2-s0", "ERROR", [0.1]),
        ("gabor_conv1-min-a4-b1-s0", "pending", [0.2]),
        ("gabor_conv1-min-a2-b1-s0", "stopped at epoch 1 of 10", [0.2]),
        ("not-a-sweep-trial", "done", [0.5]),
    ], config)
    from dashboards.sources import load_ray

    record = load_ray(storage, "gabor_conv1")
    assert record.label == "gabor_conv1-demo_20260102-000000"  # the newest run folder
    assert record.parent_run_id == "p123"
    by_id = {t.trial_id: t for t in record.trials}
    assert by_id["gabor_conv1-max-a8-b2-s0"].status == "FINISHED"
    assert by_id["gabor_conv1-max-a8-b2-s0"].alpha == 8.0
    assert by_id["gabor_conv1-max-a8-b2-s0"].beta == 2.0
    assert by_id["gabor_conv1-min-a8-b2-s0"].alpha == -8.0
    assert by_id["gabor_conv1-min-a8-b2-s0"].status == "FAILED"
    assert by_id["gabor_conv1-min-a8-b2-s0"].error == "TrialDiverged: non-finite loss"
    assert by_id["gabor_conv1-min-a4-b1-s0"].status == "RUNNING"  # the driver has not ended
    assert by_id["gabor_conv1-min-a2-b1-s0"].status == "KILLED"  # an interrupted run
    assert by_id["gabor_conv1-none-a0-b1-s0"].history["val_performance"] == ((0, 0.3), (1, 0.4))
    # the config is the one the driver recorded in its manifest
    config = by_id["gabor_conv1-max-a8-b2-s0"].config
    assert (config["reference"], config["width"], config["epochs"]) == ("gabor", 0.25, 10)
    assert any("not-a-sweep-trial" in n and "skipped" in n for n in record.notes)
    with pytest.raises(SourceError, match="holds sweep 'gabor_conv1', not 'nsd_conv1_v1'"):
        load_ray(storage / "gabor_conv1-demo_20260101-000000", "nsd_conv1_v1")


def test_a_run_folder_copied_under_another_name_reads_its_own_trials(tmp_path):
    import shutil

    from dashboards.sources import load_ray

    original = tmp_path / "ray_results" / "gabor_conv1-demo_20260102-000000"
    write_ray_run(original, [("gabor_conv1-none-a0-b1-s0", "done", [0.3, 0.4]),
                             ("gabor_conv1-max-a8-b2-s0", "done", [0.2, 0.35])],
                  {"model": "alexnet", "epochs": 2})
    (original / "sweep_fingerprint.json").write_text(json.dumps(
        {"sweep": "gabor_conv1", "scale": "demo", "smoke": False}))
    copy = tmp_path / "ray_results" / "kept for the paper"
    shutil.copytree(original, copy)
    # the original moves on after the copy (a resume): the copy must not read its trials
    (original / "gabor_conv1-none-a0-b1-s0" / "result.json").write_text("")
    record = load_ray(copy, "gabor_conv1")
    assert record.label == "kept for the paper" and record.experiment == "gabor_conv1-demo"
    by_id = {t.trial_id: t for t in record.trials}
    assert by_id["gabor_conv1-none-a0-b1-s0"].history["val_performance"] == ((0, 0.3), (1, 0.4))
    assert by_id["gabor_conv1-max-a8-b2-s0"].status == "FINISHED"
    with pytest.raises(SourceError, match="holds sweep 'gabor_conv1', not 'nsd_conv1_v1'"):
        load_ray(copy, "nsd_conv1_v1")
    # a smoke run's fingerprint names its experiment too
    (copy / "sweep_fingerprint.json").write_text(json.dumps(
        {"sweep": "gabor_conv1", "scale": "demo", "smoke": True}))
    assert load_ray(copy, "gabor_conv1").experiment == "gabor_conv1-smoke"
    # without the fingerprint nothing says which sweep ran: refused, saying so
    (copy / "sweep_fingerprint.json").unlink()
    with pytest.raises(SourceError, match="which sweep ran here is unknown"):
        load_ray(copy, "gabor_conv1")


def test_an_optuna_runs_trials_in_sibling_folders_are_read_and_lost_ones_said(tmp_path):
    """An adaptive search run before stop 29 kept each side's trials in sibling folders
    (<run folder>-<condition>-<side>/<trial>, as the manifest records them; they are still
    read); a trial the
    manifest says is done but whose folder is gone is a failure saying so, not a FINISHED
    trial without numbers."""
    from dashboards.sources import load_ray
    from records import ManifestEntry, write_manifest
    from references.cache import atomic_write_text

    run = tmp_path / "ray_results" / "gabor_conv1-smoke_20260102-000000"
    run.mkdir(parents=True)
    entries = []
    for side, key in (("baseline", "gabor_conv1-none-a0-b1-s0"),
                      ("max", "gabor_conv1-max-a2.5-b1-s0-o0001"),
                      ("min", "gabor_conv1-min-a3-b1-s0-o0002")):
        folder = run.parent / f"{run.name}-gabor_conv1-{side}" / key
        if side != "min":  # the suppressing sample's folder was deleted
            folder.mkdir(parents=True)
            (folder / "result.json").write_text(json.dumps(
                {"epoch": 0.0, "val_performance": 0.4, "val_alignment": 0.2}) + "\n")
        entries.append(ManifestEntry(key, "done", str(folder.relative_to(run.parent)), None,
                                     {"alpha": 0.0 if side == "baseline" else 2.5}))
    write_manifest(run, entries, write_text=atomic_write_text)
    record = load_ray(run, "gabor_conv1")
    by_id = {t.trial_id: t for t in record.trials}
    assert by_id["gabor_conv1-none-a0-b1-s0"].history["val_performance"] == ((0, 0.4),)
    assert by_id["gabor_conv1-max-a2.5-b1-s0-o0001"].status == "FINISHED"
    lost = by_id["gabor_conv1-min-a3-b1-s0-o0002"]
    assert lost.status == "FAILED" and lost.error.startswith("results not found: ")
    assert any("gabor_conv1-min-a3-b1-s0-o0002" in n and "counted as failed" in n
               for n in record.notes)


@pytest.mark.parametrize("last_line, summary", [
    ("trainable.train.TrialDiverged: non-finite loss (alpha=8.0: stopped)",
     "TrialDiverged: non-finite loss (alpha=8.0: stopped)"),
    # a retry that ended at once carries the first attempt's error
    ("sweeps.execute.RepeatedFailure: ValueError: loss_folds=16 needs 32 rows",
     "ValueError: loss_folds=16 needs 32 rows"),
    ("ValueError: bad: value", "ValueError: bad: value"),
    ("ray.exceptions.RayTaskError(OSError): ray::run_trial()", "ray.exceptions.RayTaskError("
     "OSError): ray::run_trial()"),
])
def test_a_ray_error_line_reads_as_mlflows_error_tag(last_line, summary):
    from records import REPEATED_FAILURE, error_summary
    from sweeps.execute import RepeatedFailure, error_line

    assert error_summary(last_line) == summary
    assert RepeatedFailure.__name__ == REPEATED_FAILURE
    # what the driver tags in MLflow for the same exception
    if last_line.startswith("sweeps.execute.RepeatedFailure"):
        assert error_line(RepeatedFailure("ValueError: loss_folds=16 needs 32 rows")) == summary


def test_nan_reaches_the_store_by_neither_path(fake_store):
    """A trial's NaN (no alignment measured that epoch) is not logged live, nor when a
    restored trial or the driver replays its journal."""
    from records import experiment_name
    from sweeps import tracking

    uri, _ = fake_store
    parent = tracking.start_parent(uri, experiment_name("nan_paths", "demo"), {"sweep": "x"})
    client = MlflowClient(uri)
    for i, send in enumerate([lambda r, m: r.log_epoch(m, 0), lambda r, m: r.reconcile({0: m})]):
        run = tracking.TrialRun(uri, parent, f"x-none-a0-b1-s{i}", params={}, tags={},
                                say=lambda _: None)
        send(run, {"align_loss": float("nan"), "task_loss": 1.5, "epoch": 0.0})
        run.finish("FINISHED")
        assert run.close(60)
        metrics = client.get_run(run.run_id).data.metrics
        assert metrics == {"task_loss": 1.5, "epoch": 0.0}, i


def test_a_store_whose_disk_fills_is_one_line_not_a_traceback_per_retry(tmp_path):
    """A SQLite store whose disk filled mid-sweep (probed at stop 37 on a small tmpfs): MLflow
    logged each failed write's whole traceback at ERROR, and the trial's tracking thread
    retried for as long as the disk stayed full: 2,800 lines in 14 minutes. Now the outage
    is the tracking thread's one line, and every epoch lands once space returns. A file-size
    limit makes the store's writes fail as a full disk does (SQLite's disk I/O error)."""
    import textwrap

    script = textwrap.dedent("""
        import os, resource, signal, sys, time
        from mlflow import MlflowClient
        from sweeps import tracking

        db = sys.argv[1]
        uri = "sqlite:///" + db
        parent = tracking.start_parent(uri, "full-demo", {"sweep": "full"})
        run = tracking.TrialRun(uri, parent, "full-none-a0-b1-s0", params={}, tags={})
        run.log_epoch({"epoch": 0.0}, 0)
        assert run.close(60)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(db), resource.RLIM_INFINITY))
        run = tracking.TrialRun(uri, parent, "full-none-a0-b1-s0", params={}, tags={})
        for epoch in range(1, 30):
            metrics = {f"m{k}": float(k) for k in range(40)}
            run.log_epoch({**metrics, "epoch": float(epoch)}, epoch)
        time.sleep(4)  # retries at 0.5, 1 and 2 s
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        assert run.close(120)
        steps = MlflowClient(uri).get_metric_history(run.run_id, "m39")
        print("epochs", sorted(m.step for m in steps) == list(range(1, 30)))
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "mlflow.db")],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "epochs True" in proc.stdout
    said = [line for line in proc.stdout.splitlines() if line.startswith("tracking: ")]
    assert len(said) == 2, proc.stdout  # the outage, then its end
    assert "failed for trial full-none-a0-b1-s0 (MlflowException: " in said[0]
    assert "reachable again after" in said[1]
    assert "Traceback" not in proc.stderr and "SQLAlchemy database error" not in proc.stderr


def test_a_closed_trial_run_ends_its_thread(fake_store, monkeypatch):
    """Tune reuses a trial's worker process for the next trial. close() used to leave the
    tracking thread waiting on its queue for the life of the process (a reused actor kept one
    thread, its client and 60-120 MB of C heap per trial run in it). Now it ends, both after
    a delivered run and while a dead store's retries are backing off."""
    import threading

    from records import experiment_name
    from sweeps import tracking

    def threads():
        return {t for t in threading.enumerate() if t.name.startswith("mlflow-")}

    before = threads()
    uri, _ = fake_store
    parent = tracking.start_parent(uri, experiment_name("threads", "demo"), {"sweep": "x"})
    for i in range(3):
        run = tracking.TrialRun(uri, parent, f"x-none-a0-b1-s{i}", params={}, tags={},
                                say=lambda _: None)
        run.log_epoch({"epoch": 0.0}, 0)
        run.finish("FINISHED")
        assert run.close(60)
    assert threads() == before
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # as trials set it: 1 (execute)
    dead = tracking.TrialRun("http://127.0.0.1:9", parent, "x-none-a0-b1-s9", params={},
                             tags={}, say=lambda _: None)
    dead.log_epoch({"epoch": 0.0}, 0)
    t0 = time.monotonic()
    assert not dead.close(2.0)
    assert threads() == before and time.monotonic() - t0 < 6


def test_a_run_deleted_in_the_ui_mid_trial_is_refused_once_not_waited_on(fake_store,
                                                                          tmp_path):
    """A user deletes a trial's child run in the MLflow UI while it trains: every later write
    is refused ("must be in the 'active' state", HTTP 400). The tracking thread retried each
    refusal as an outage until the flush timeout (900 s by default) at the trial's end. Now a
    refusal is said once, dropped, and close() returns at once; an outage (no connection)
    is still retried, and an artifact folder gone from under the trial is a refusal too."""
    from records import experiment_name
    from sweeps import tracking

    uri, _ = fake_store
    parent = tracking.start_parent(uri, experiment_name("deleted", "demo"), {"sweep": "x"})
    said: list[str] = []
    again = tracking.TrialRun(uri, parent, "x-max-a1-b1-s1", params={"lr": 0.1}, tags={},
                              say=said.append)
    again.log_epoch({"val_alignment": 0.0}, 0)
    client = MlflowClient(uri)
    deadline = time.monotonic() + 60
    while again.run_id is None or not client.get_metric_history(again.run_id,
                                                                "val_alignment"):
        assert time.monotonic() < deadline, "the run was not made"
        time.sleep(0.1)
    assert not said
    client.delete_run(again.run_id)  # deleted after its first epoch, while it trains on
    for epoch in range(1, 4):
        again.log_epoch({"val_alignment": 0.1 * epoch}, epoch)
    again.set_tags({"ran.cpus": "1"})
    again.finish("FINISHED")
    t0 = time.monotonic()
    assert again.close(60)
    assert time.monotonic() - t0 < 10
    (first, total) = said
    assert first.startswith(f"tracking: {uri} refused trial x-max-a1-b1-s1's metrics "
                            f"(INVALID_PARAMETER_VALUE: The run {again.run_id} must be in the "
                            f"'active' state"), first
    assert "not retried" in first and "journal" in first
    assert total == (f"tracking: 5 operation(s) of trial x-max-a1-b1-s1 refused by {uri} in "
                     f"all (the first is named above)")

    import requests
    from mlflow.exceptions import MlflowException
    from mlflow.utils.rest_utils import verify_rest_response

    def answered(status: int, body: str) -> Exception:
        """The exception MLflow's REST client raises for this reply."""
        reply = requests.models.Response()
        reply.status_code, reply._content = status, body.encode()
        with pytest.raises(MlflowException) as raised:
            verify_rest_response(reply, "/api/2.0/mlflow/runs/log-batch")
        return raised.value

    def mlflow_json(code: str, message: str) -> str:
        return json.dumps({"error_code": code, "message": message})

    # MLflow's own JSON answers that the request will never pass
    assert tracking.permanent_refusal(answered(400, mlflow_json(
        "INVALID_PARAMETER_VALUE", "The run r1 must be in the 'active' state.")))
    assert tracking.permanent_refusal(answered(404, mlflow_json(
        "RESOURCE_DOES_NOT_EXIST", "Run with id=r1 not found")))
    # what a restart or a proxy may answer for a while: retried
    for status, body in ((404, "404 page not found"),  # a proxy with no route to it yet
                         (400, "<html><body>Bad Request</body></html>"),
                         (403, "<html>Forbidden</html>"), (401, "Unauthorized"), (499, ""),
                         (502, "Bad Gateway"),
                         (400, mlflow_json("BAD_REQUEST", "(psycopg2.InterfaceError) "
                                                          "connection already closed")),
                         (503, mlflow_json("TEMPORARILY_UNAVAILABLE", "database is locked"))):
        assert tracking.permanent_refusal(answered(status, body)) is None, (status, body)
    assert tracking.permanent_refusal(FileNotFoundError(2, "gone", str(tmp_path / "x")))
    assert tracking.permanent_refusal(PermissionError(13, "denied"))
    assert tracking.permanent_refusal(OSError(28, "No space left on device")) is None
    assert tracking.permanent_refusal(MlflowException(
        "API request to http://h/api failed with exception ConnectionError")) is None
    assert tracking.permanent_refusal(MlflowException(
        "busy", error_code="REQUEST_LIMIT_EXCEEDED")) is None
    assert tracking.permanent_refusal(MlflowException(
        "database is locked", error_code="TEMPORARILY_UNAVAILABLE")) is None


def test_a_trial_the_store_never_saw_gets_its_run_from_the_replay(fake_store):
    """An outage over a trial's whole life: it trained, its journal is in its checkpoint,
    but it never made its child run. The driver's replay (and --resume's) used to drop the
    journal; it now makes the run, with its params and tags, and sends every epoch once. A
    trial that reported nothing still gets no run."""
    from records import child_runs, experiment_name
    from sweeps import tracking

    uri, _ = fake_store
    parent = tracking.start_parent(uri, experiment_name("outage", "demo"), {"sweep": "outage"})
    journal = {0: {"val_alignment": 0.1, "epoch": 0.0}, 1: {"val_alignment": 0.2, "epoch": 1.0}}
    params = {"alpha": 0.8, "epochs": 2}
    tags = {"sweep": "outage", "condition": "outage", "error": "ValueError: x"}
    for _ in range(2):  # the second replay (a --resume) finds the run: nothing twice
        assert tracking.replay_journal(uri, parent, "outage-max-a0.8-b1-s0", journal,
                                       status="FAILED", say=lambda _: None, params=params,
                                       tags=tags)
    assert tracking.replay_journal(uri, parent, "outage-min-a0.8-b1-s0", {}, status="KILLED",
                                   say=lambda _: None, params=params, tags=tags)
    client = MlflowClient(uri)
    (run,) = child_runs(client, parent)
    assert run.data.tags["trial_id"] == "outage-max-a0.8-b1-s0" and run.info.status == "FAILED"
    assert run.data.params == {"alpha": "0.8", "epochs": "2"}
    assert run.data.tags["error"] == "ValueError: x"
    history = client.get_metric_history(run.info.run_id, "val_alignment")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.1), (1, 0.2)]


def test_a_driver_stopped_before_the_outcomes_ends_its_trials_runs_and_names_them(fake_store):
    """A second Ctrl-C while Tune stopped the trials: the driver had no outcomes to replay,
    so the stopped trials' runs (their workers gone with Ray) stayed RUNNING and went
    unnamed. The driver now ends the parent's runs still RUNNING as KILLED, and only them."""
    from sweeps import tracking

    uri, _ = fake_store
    client = MlflowClient(uri)
    exp = client.create_experiment("stopped-before-the-outcomes")  # no other test's sweep
    parent = client.create_run(exp, run_name="stopped-sweep").info.run_id
    runs = {}
    for trial_id in ("s-max-a1-b1-s0", "s-none-a0-b1-s0", "s-min-a1-b1-s0"):
        runs[trial_id] = client.create_run(exp, run_name=trial_id, tags={
            "mlflow.parentRunId": parent, "trial_id": trial_id}).info.run_id
    client.set_terminated(runs["s-none-a0-b1-s0"], status="FINISHED")
    assert tracking.end_running_children(uri, parent) == ["s-max-a1-b1-s0", "s-min-a1-b1-s0"]
    assert {t: client.get_run(r).info.status for t, r in runs.items()} == {
        "s-max-a1-b1-s0": "KILLED", "s-none-a0-b1-s0": "FINISHED", "s-min-a1-b1-s0": "KILLED"}
    assert client.get_run(parent).info.status == "RUNNING"  # the driver ends it itself
    assert tracking.end_running_children(uri, parent) == []


def test_the_replay_closes_only_runs_left_open_and_gives_each_run_its_missing_artifacts(
        fake_store, tmp_path):
    """The end-of-run replay sees every trial's journal: a run its trial closed keeps its
    status and end time (it had reopened each one and re-timed it to the sweep's end); a run
    a stopped worker left RUNNING is closed; every run gets the checkpoint's artifacts it
    lacks: one the replay creates, and one whose trial's upload an outage cut off (they
    never reached MLflow, even after --resume), while a file the trial uploaded is kept."""
    from records import child_runs, experiment_name
    from sweeps import tracking

    uri, _ = fake_store
    parent = tracking.start_parent(uri, experiment_name("replayed", "demo"), {"sweep": "x"})
    journal = {0: {"val_alignment": 0.1, "epoch": 0.0}}
    quiet = dict(say=lambda _: None)
    closed = tracking.TrialRun(uri, parent, "replayed-none-a0-b1-s0", params={}, tags={},
                               **quiet)
    closed.log_epoch(journal[0], 0)
    own = tmp_path / "uploaded"
    own.mkdir()
    (own / "val_predictions.npz").write_bytes(b"the trial's own")
    closed.log_artifacts(own)  # the trial's upload got this far
    closed.finish("FINISHED")
    assert closed.close(60)
    left_open = tracking.TrialRun(uri, parent, "replayed-max-a1-b1-s0", params={}, tags={},
                                  **quiet)
    left_open.log_epoch(journal[0], 0)
    assert left_open.close(60)  # a worker stopped before its end: RUNNING
    client = MlflowClient(uri)
    before = client.get_run(closed.run_id).info
    art = tmp_path / "artifacts"
    art.mkdir()
    (art / "val_predictions.npz").write_bytes(b"x")
    (art / "final_metrics.json").write_text("{}")
    for trial_id, status in (("replayed-none-a0-b1-s0", "FINISHED"),
                             ("replayed-max-a1-b1-s0", "KILLED"),
                             ("replayed-min-a1-b1-s0", "FINISHED")):
        assert tracking.replay_journal(uri, parent, trial_id, journal, status=status,
                                       params={"alpha": 1.0}, tags={}, artifacts=art, **quiet)
    runs = {r.data.tags["trial_id"]: r for r in child_runs(client, parent)}
    after = runs["replayed-none-a0-b1-s0"].info
    assert (after.status, after.end_time) == (before.status, before.end_time) == (
        "FINISHED", before.end_time)
    assert runs["replayed-max-a1-b1-s0"].info.status == "KILLED"
    assert runs["replayed-min-a1-b1-s0"].info.status == "FINISHED"
    listed = {r: {a.path for a in client.list_artifacts(runs[r].info.run_id)} for r in runs}
    assert listed == dict.fromkeys(runs, {"val_predictions.npz", "final_metrics.json"})
    kept = client.download_artifacts(closed.run_id, "val_predictions.npz", str(tmp_path))
    assert Path(kept).read_bytes() == b"the trial's own"


def test_a_trial_restored_from_an_older_checkpoint_logs_no_epoch_twice(fake_store):
    """The driver killed (SIGKILL) between a trial's report and Tune's next snapshot: --resume
    restored the trial from the checkpoint before, it trained that epoch again, and its run
    held step 1 twice for every metric (another epoch_seconds the second time). The store
    keeps each (metric, step) once: the first attempt's."""
    from records import experiment_name
    from sweeps import tracking

    uri, _ = fake_store
    parent = tracking.start_parent(uri, experiment_name("restored", "demo"), {"sweep": "x"})
    quiet = dict(say=lambda _: None)
    first = tracking.TrialRun(uri, parent, "restored-max-a1-b1-s0", params={}, tags={}, **quiet)
    for epoch in (0, 1):
        first.log_epoch({"val_performance": 0.5 + epoch, "epoch_seconds": 0.4}, epoch)
    assert first.close(60)  # killed here: the last snapshot holds epoch 0 only
    again = tracking.TrialRun(uri, parent, "restored-max-a1-b1-s0", params={}, tags={}, **quiet)
    for epoch in (1, 2):
        again.log_epoch({"val_performance": 0.5 + epoch, "epoch_seconds": 1.5}, epoch)
    again.finish("FINISHED")
    assert again.close(60)
    assert again.run_id == first.run_id and not again.created
    client = MlflowClient(uri)
    for key, want in (("val_performance", [(0, 0.5), (1, 1.5), (2, 2.5)]),
                      ("epoch_seconds", [(0, 0.4), (1, 0.4), (2, 1.5)])):
        history = client.get_metric_history(again.run_id, key)
        assert sorted((m.step, m.value) for m in history) == want, key


def test_an_alpha_is_read_as_trained_not_as_its_rounded_tag(fake_store, tmp_path):
    """An Optuna sample's alpha (1/3 here): the tag shows 10 digits, the param is exact; the
    tables from MLflow and from Ray's folder must agree."""
    from dashboards.sources import load_mlflow

    uri, _ = fake_store
    write_sweep(MlflowClient(uri), "thirds", [fake_trial("max", 1 / 3, perf=[0.3], align=[0.2])],
                tmp=tmp_path)
    record = load_mlflow("thirds", mlflow_uri=uri)
    assert [t.alpha for t in record.trials] == [1 / 3]


def test_latest_parent_run_by_default_or_the_one_asked_for(fake_store):
    uri, parents = fake_store
    newest = load_mlflow("twice", mlflow_uri=uri)
    assert newest.parent_run_id == parents["newer"] and newest.experiment == "twice-demo"
    older = load_mlflow("twice", mlflow_uri=uri, experiment="twice-smoke")
    assert older.parent_run_id == parents["older"] and len(older.trials) == 2
    assert load_mlflow("twice", mlflow_uri=uri,
                       parent_run_id=parents["older"]).experiment == "twice-smoke"


def test_another_tools_runs_in_the_experiment_are_not_the_sweeps(fake_store):
    """A notebook's run started after the sweep in its experiment was taken as the sweep's
    parent: the report said "no trial runs" and was logged into the notebook's run. A run
    another tool nested under the parent became a condition named "". Both are left out now,
    the nested one named in a note, and neither can be asked for as the parent."""
    uri, parents = fake_store
    record = load_mlflow("lab", mlflow_uri=uri)
    assert record.parent_run_id == parents["lab"]
    assert len(record.trials) == 3 and {t.condition for t in record.trials} == {"lab"}
    (note,) = [n for n in record.notes if "not trials of the sweep" in n]
    assert note.startswith("1 run(s) nested under the parent run") and "eval on held-out" in note
    with pytest.raises(SourceError, match=r"has no tag 'sweep': not the parent run of a sweep"):
        load_mlflow("lab", mlflow_uri=uri, parent_run_id=parents["notebook-eval"])


@pytest.mark.parametrize("args, match", [
    (["nosuch"], "no MLflow experiment nosuch-demo or nosuch-smoke or nosuch-paper"),
    (["full", "--experiment", "full-paper"], "no MLflow experiment full-paper"),
    (["full", "--parent-run", "0123"], "--parent-run 0123: no such run"),
    (["twice", "--parent-run", "{full}"], "belongs to sweep 'full', not 'twice'"),
    (["full", "--ray-results", "/nonexistent"], "--ray-results /nonexistent: no such directory"),
    (["full", "--mlflow-uri", "sqlite:///{tmp}/none.db"], "none.db: no such SQLite file"),
    (["full", "--mlflow-uri", "ftp://x"], "accepted: sqlite:///PATH.db"),
])
def test_cli_errors_are_one_line_and_exit_2(fake_store, capsys, tmp_path, args, match):
    uri, parents = fake_store
    args = [a.format(**parents, tmp=tmp_path) for a in args]
    if "--mlflow-uri" not in args:
        args += ["--mlflow-uri", uri]
    assert pareto.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert match in err


def test_a_trial_with_two_runs_is_read_once_and_named(fake_store):
    """Two child runs of one trial_id were counted as two seeds of its configuration (and the
    effects read one predictions file for both), without a word."""
    uri, _ = fake_store
    record = load_mlflow("rerun", mlflow_uri=uri)
    assert len(record.trials) == 3
    assert len({t.trial_id for t in record.trials}) == 3
    (twice,) = [t for t in record.trials if t.alpha == FULL[2]["alpha"]]
    (note,) = [n for n in record.notes if "runs under the parent run" in n]
    assert note.startswith(f"trial {twice.trial_id} has 2 runs under the parent run; the newest "
                           f"finished one ({twice.run_id}) is read, the others left out: ")
    assert twice.final("val_performance") == pytest.approx(0.61)


def test_trial_run_is_not_taken_for_a_parent(fake_store):
    uri, parents = fake_store
    child = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("full-smoke").experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parents['full']}'")[0]
    with pytest.raises(SourceError, match=f"is a trial run \\(its parent is {parents['full']}"):
        load_mlflow("full", mlflow_uri=uri, parent_run_id=child.info.run_id)


# ------------------------------------------- a store is only read; outputs are replaced whole


def _not_a_store(kind, folder):
    """A file a user may point --mlflow-uri at by mistake, alone in a folder."""
    import sqlite3

    path = folder / "store" / f"{kind}.db"
    path.parent.mkdir()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("experiment_id,name\n0,Default\n")
    else:  # another program's SQLite database
        con = sqlite3.connect(path)
        con.execute("CREATE TABLE measurements (t REAL, value REAL)")
        con.execute("INSERT INTO measurements VALUES (0.0, 1.5)")
        con.commit()
        con.close()
    os.utime(path, (1_000_000_000, 1_000_000_000))  # an mtime a write would move
    return path


def _snapshot(path):
    """(bytes, mtime) of ``path`` and the names of its folder (a -journal file, a new db)."""
    return path.read_bytes(), path.stat().st_mtime_ns, sorted(p.name for p in path.parent.iterdir())


NOT_A_STORE = {"empty": "is an empty file, so not an MLflow store",
               "text": "is not a SQLite database (no SQLite header)",
               "sqlite": "is a SQLite database but not an MLflow store (tables: measurements"}


@pytest.mark.parametrize("kind", list(NOT_A_STORE))
def test_a_file_that_is_not_an_mlflow_store_is_refused_and_left_as_it_is(kind, tmp_path):
    # Before, MLflow created its tables in the empty file and in the other program's database
    # (about 950 kB each), and read the text file with a SQLAlchemy traceback.
    path = _not_a_store(kind, tmp_path)
    before = _snapshot(path)
    proc = subprocess.run(
        [sys.executable, "-m", "dashboards.pareto", "full", "--mlflow-uri", f"sqlite:///{path}",
         "--out", str(tmp_path / "out"), "--no-log"],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert f"{path} {NOT_A_STORE[kind]}" in proc.stderr and "accepted: " in proc.stderr
    assert _snapshot(path) == before
    with pytest.raises(SourceError, match=re.escape(NOT_A_STORE[kind])):
        load_mlflow("full", mlflow_uri=f"sqlite:///{path}")
    assert _snapshot(path) == before


@pytest.fixture
def store_copy(fake_store, tmp_path):
    """A copy of the fake store's file (its artifacts stay where they are), with an old mtime."""
    uri, parents = fake_store
    copy = tmp_path / "store" / "copy.db"
    copy.parent.mkdir()
    shutil.copyfile(uri[len("sqlite:///"):], copy)
    os.utime(copy, (1_000_000_000, 1_000_000_000))
    return copy, parents


def test_reading_a_store_writes_nothing_to_it(store_copy, tmp_path):
    copy, parents = store_copy
    before = _snapshot(copy)
    report = pareto.postprocess("full", mlflow_uri=f"sqlite:///{copy}", out=tmp_path / "out",
                                log=False)
    assert read_results(report).column("parent_run_id").to_pylist() == [parents["full"]] * 5
    assert _snapshot(copy) == before


@pytest.mark.parametrize("change, match", [
    ("UPDATE alembic_version SET version_num = '0a8213491aaa'",
     "of another schema (revision 0a8213491aaa; MLflow"),
    ("DROP TABLE webhooks", "lacks tables webhooks"),
])
def test_a_store_of_another_mlflow_schema_is_refused_not_migrated(store_copy, change, match):
    import sqlite3

    copy, _ = store_copy
    con = sqlite3.connect(copy)
    con.execute(change)  # what a store written by an older MLflow looks like to this one
    con.commit()
    con.close()
    os.utime(copy, (1_000_000_000, 1_000_000_000))
    before = _snapshot(copy)
    with pytest.raises(SourceError, match=re.escape(match)):
        load_mlflow("full", mlflow_uri=f"sqlite:///{copy}")
    assert _snapshot(copy) == before


def test_logging_from_ray_results_refuses_a_file_that_is_not_a_store(tmp_path, capsys):
    path = _not_a_store("sqlite", tmp_path)
    storage = tmp_path / "ray_results"
    (storage / "full-smoke_20260101-000000").mkdir(parents=True)
    before = _snapshot(path)
    assert pareto.main(["full", "--ray-results", str(storage), "--parent-run", "0123",
                        "--mlflow-uri", f"sqlite:///{path}", "--out", str(tmp_path / "out")]) == 2
    assert "is a SQLite database but not an MLflow store" in capsys.readouterr().err
    assert _snapshot(path) == before


def assert_complete(folder):
    """Every output file in ``folder`` parses to its end; no temporary file is left."""
    for name in ("results.parquet", "epochs.parquet", "effects.parquet"):
        pq.read_table(folder / name)  # the footer is at the end: a truncated file fails
    json.loads((folder / "statistics.json").read_text())
    for stem in ("front", "epochs", "filters"):
        assert (folder / f"{stem}.png").read_bytes().endswith(b"IEND\xaeB`\x82"), stem
        matplotlib.image.imread(str(folder / f"{stem}.png"))
        ET.parse(folder / f"{stem}.svg")
    assert (folder / "report.html").read_text().rstrip().endswith("</html>")
    assert sorted(p.name for p in folder.iterdir()) == sorted(pareto.FILES)


@pytest.mark.parametrize("failing", ["results.parquet", "statistics.json", "front.png",
                                     "filters.svg", "report.html"])
def test_an_output_write_that_fails_midway_leaves_the_previous_file(fake_store, full_report,
                                                                    tmp_path, monkeypatch,
                                                                    failing):
    from references import cache

    uri, _ = fake_store
    out = tmp_path / "out"
    shutil.copytree(full_report.parent, out)  # the previous run's files
    assert_complete(out)  # build_outputs' own files are whole
    previous = (out / failing).read_bytes()
    record = load_mlflow("full", mlflow_uri=uri)
    new_sibling, fdopen, doomed = cache._new_sibling, os.fdopen, set()

    def tracking_sibling(path):
        fd, tmp = new_sibling(path)
        if path.name == failing:
            doomed.add(fd)
        return fd, tmp

    monkeypatch.setattr(cache, "_new_sibling", tracking_sibling)
    monkeypatch.setattr(cache.os, "fdopen", lambda fd, *args, **kwargs: HalfThenFull(
        fdopen(fd, *args, **kwargs)) if fd in doomed else fdopen(fd, *args, **kwargs))
    with pytest.raises(OSError, match="No space left on device"):
        pareto.build_outputs(record, out)
    assert doomed, f"{failing} was never written"
    assert (out / failing).read_bytes() == previous
    assert_complete(out)  # the files before it new, after it old: each one whole


# ---------------------------------------------------------------------- a real smoke sweep


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return finished_smoke_sweep(tmp_path_factory)


@pytest.fixture(scope="module")
def smoke_report(smoke, tmp_path_factory):
    """The real smoke sweep post-processed from MLflow (and logged to its parent run)."""
    return pareto.postprocess(SWEEP, mlflow_uri=smoke.uri,
                              out=tmp_path_factory.mktemp("smoke-report"))


def test_real_smoke_sweep_from_mlflow(smoke, smoke_report):
    table = read_results(smoke_report)
    assert table.num_rows == 3
    assert set(table.column("status").to_pylist()) == {"FINISHED"}
    assert sorted(table.column("direction").to_pylist()) == ["max", "min", "none"]
    # the table's numbers are the runs' final metrics, read here independently
    client = MlflowClient(smoke.uri)
    for row in table.to_pylist():
        metrics = client.get_run(row["run_id"]).data.metrics
        assert row["performance"] == metrics["val_performance"] == metrics["val_map"]
        assert row["alignment"] == metrics["val_alignment"]
        assert row["parent_run_id"] == smoke.parent_run_id
        assert row["performance_change"] == pytest.approx(row["performance"]
                                                          - row["baseline_performance"])
        assert row["degradation"] == pytest.approx(-100 * row["performance_change"])
    base = next(r for r in table.to_pylist() if r["direction"] == "none")
    assert base["degradation"] == 0.0 and base["performance_change"] == 0.0
    assert any(table.column("front_up").to_pylist())
    assert any(table.column("front_down").to_pylist())
    logged = {a.path for a in client.list_artifacts(smoke.parent_run_id)}
    assert set(pareto.FILES) <= logged
    for stem in ("front", "epochs", "filters"):
        assert png_is_not_blank(smoke_report.parent / f"{stem}.png"), stem


def test_real_smoke_sweep_from_ray_results_matches_mlflow(smoke, smoke_report, tmp_path):
    from_mlflow = read_results(smoke_report)
    from_ray = read_results(pareto.postprocess_ray(SWEEP, smoke.storage, out=tmp_path / "ray"))
    assert from_ray.column("parent_run_id").to_pylist() == [smoke.parent_run_id] * 3
    for name in from_mlflow.column_names:
        if name != "run_id":  # Ray's trial ids, not MLflow's run ids
            assert from_ray.column(name).to_pylist() == from_mlflow.column(name).to_pylist(), name
    assert (tables.read_config(tmp_path / "ray" / "results.parquet")["conditions"]
            == tables.read_config(smoke_report.parent / "results.parquet")["conditions"])
    # Every trial's artifacts reach Ray's storage inside its final checkpoint, also for the
    # trial that ran on a reused actor (3 trials, 2 slots), and the filter figure uses them.
    trial_dirs = [p.parent for p in smoke.storage.glob("*/*/params.json")]
    assert len(trial_dirs) == 3
    for trial_dir in trial_dirs:
        assert list(trial_dir.glob("checkpoint_*/artifacts/conv1_filters.png")), trial_dir
    from dashboards.sources import load_ray

    record = load_ray(smoke.storage, SWEEP)
    for trial in record.trials:
        assert record.fetch_filters(trial, tmp_path) is not None, trial.trial_id


def test_a_resume_of_a_run_whose_tune_state_a_full_disk_cut_short_is_one_line(smoke,
                                                                            tmp_path, capsys):
    """Tune writes its experiment state in place: a storage disk that filled mid-write left
    it cut short (probed at stop 37 on a small tmpfs), and a full temporary folder, where Tune
    stages it, left none. Every --resume then had Tune start the run over without its trials
    and the driver died at once (KeyError: 'trial_id', exit 1). The dry run (and the run:
    the same check) now refuses it in one line naming the file, and says what is kept."""
    from sweeps.run import main

    storage = tmp_path / "ray_results"
    shutil.copytree(smoke.storage, storage)
    (run_dir,) = [p for p in storage.iterdir() if p.is_dir()]
    args = [SWEEP, "--smoke-test", "--mlflow-uri", smoke.uri, "--storage", str(storage),
            "--resume", "--dry-run"]
    assert main(args) == 0, capsys.readouterr().err  # the run as it was: nothing to refuse
    capsys.readouterr()
    (state,) = run_dir.glob("experiment_state-*.json")
    text = state.read_text()
    state.write_text(text[:len(text) // 2])
    for why in (rf"{state.name}: JSONDecodeError: ",
                r"no experiment_state-\*\.json beside its tuner\.pkl"):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and re.match(
            rf"error: --resume: {re.escape(str(run_dir))}: Ray Tune's saved state cannot be "
            rf"read \({why}.*; a disk that filled while Tune wrote it leaves it so\), and Tune "
            rf"would start the run over without its trials; the trials that finished keep "
            rf"their results \(in MLflow and their folders\); accepted: a new run without "
            rf"--resume", err), err
        state.unlink(missing_ok=True)


def test_a_trials_data_tag_names_its_own_data(smoke):
    """Every child run carried the parent's data_description, the whole sweep's data (a Gabor
    trial of `paper` was tagged with the NSD release): each now names its condition's."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(smoke.uri)
    parent = client.get_run(smoke.parent_run_id)
    assert parent.data.tags["data_description"].startswith("smoke test on tiny simulated data")
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`{PARENT_TAG}` = '{smoke.parent_run_id}'")
    assert len(children) == 3
    for run in children:
        assert run.data.tags["data_description"].startswith(
            "simulated NSD-like world, ROI V1"), run.data.tags["data_description"]


def test_a_report_from_ray_results_is_logged_only_into_its_own_parent_run(smoke, tmp_path,
                                                                          capsys):
    """--ray-results with --parent-run of a trial's run, another sweep's parent run or
    another invocation of the sweep logged the report there (exit 0), replacing that run's
    report; an unknown id failed with MLflow's traceback after the outputs were built. Each
    is refused in one line, exit 2, before anything is built or logged."""
    import shutil

    from mlflow.tracking import MlflowClient

    db = tmp_path / "copy.db"  # a copy: the shared store stays as the smoke sweep left it
    shutil.copy(smoke.uri.removeprefix("sqlite:///"), db)
    uri = f"sqlite:///{db}"
    client = MlflowClient(uri)
    parent = client.get_run(smoke.parent_run_id)
    exp = parent.info.experiment_id
    trial = client.search_runs([exp], filter_string=f"tags.`{PARENT_TAG}` = "
                                                    f"'{smoke.parent_run_id}'")[0].info.run_id
    other_sweep = client.create_run(exp, tags={"sweep": "gabor_conv1"}).info.run_id
    other_run = client.create_run(exp, tags={"sweep": SWEEP}).info.run_id
    run_folder = next(smoke.storage.glob(f"{EXPERIMENT}_*")).name
    for run_id, said in [
            (trial, f"--parent-run {trial} is a trial run (its parent is "
                    f"{smoke.parent_run_id}); accepted: a sweep's parent run"),
            (other_sweep, f"parent run {other_sweep} belongs to sweep 'gabor_conv1', not "
                          f"{SWEEP!r}"),
            (other_run, f"--parent-run {other_run}, but {run_folder} is the run of parent run "
                        f"{smoke.parent_run_id} (its mlflow_parent.json); accepted: "
                        f"--parent-run {smoke.parent_run_id}"),
            ("0" * 32, f"--parent-run {'0' * 32}: no such run in {uri}")]:
        before = [a.path for a in client.list_artifacts(run_id)] if run_id != "0" * 32 else []
        out = tmp_path / f"out-{run_id}"
        assert pareto.main([SWEEP, "--ray-results", str(smoke.storage), "--parent-run", run_id,
                            "--mlflow-uri", uri, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {said}") and err.count("\n") == 1, err
        assert not out.exists()
        if run_id != "0" * 32:
            assert [a.path for a in client.list_artifacts(run_id)] == before
            assert not [k for k in client.get_run(run_id).data.metrics
                        if k.startswith(("stat/", "effect/"))]


@pytest.mark.parametrize("how", ["module", "path"])
def test_cli_on_the_real_smoke_sweep(smoke, tmp_path, how):
    """``python dashboards/pareto.py`` (by its path, from another folder) failed on every read
    of a store: its folder came first on sys.path, and dashboards/statistics.py hid the
    standard library's statistics, which MLflow imports."""
    how = (["-m", "dashboards.pareto"] if how == "module"
           else [str(REPO / "dashboards" / "pareto.py")])
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, *how, SWEEP, "--mlflow-uri", smoke.uri, "--out", str(out), "--no-log"],
        check=False, cwd=REPO if how[0] == "-m" else tmp_path, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last == f"report: {out / 'report.html'}"
    assert f"{SWEEP}: 3/3 trials finished, Spearman rho" in proc.stdout
    assert "Downloading artifacts" not in proc.stderr
    assert tables.read_config(out / "results.parquet")["experiment"] == EXPERIMENT


def test_the_driver_says_a_report_without_a_figure_is_incomplete_not_unwritten(
        tmp_path, monkeypatch, capsys):
    """The driver post-processes in a child process (sweeps.execute._report); a figure that
    raises there (injected by a sitecustomize on the child's PYTHONPATH) leaves the report
    written without it. The driver said "report not written"; it now says the report is
    incomplete, with the post-processor's line and the command to rerun, and the report, its
    notes and the other figures are on disk and logged to the parent run."""
    from types import SimpleNamespace

    from sweeps.execute import _report

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    parent = write_sweep(client, "figfail", FULL[:3], tmp=tmp_path)
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import dashboards.figures\n"
        "def _broken(*args, **kwargs):\n"
        "    raise ValueError('cannot draw the front here')\n"
        "dashboards.figures.front_figure = _broken\n")
    monkeypatch.setenv("PYTHONPATH", str(inject))
    monkeypatch.chdir(tmp_path)
    _report(SimpleNamespace(sweep="figfail", mlflow_uri=uri, experiment="figfail-smoke",
                            mlflow_from="--mlflow-uri"), parent)
    out = capsys.readouterr().out
    assert "report incomplete: error: figure(s) not drawn: front (" in out, out
    assert "report not written" not in out and "retry with: " in out
    assert "note: the front figure could not be drawn (ValueError: cannot draw the front " \
           "here; traceback: " in out
    folder = tmp_path / "outputs" / "figfail-smoke" / parent
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        set(pareto.FILES) - {"front.png", "front.svg"})
    logged = {a.path for a in client.list_artifacts(parent)}
    assert logged == set(pareto.FILES) - {"front.png", "front.svg"}
    # the run's description links no figure that is not there, and still names the report
    described = client.get_run(parent).data.tags["mlflow.note.content"]
    assert "front.png" not in described and "The report: report.html" in described
    # the child is given the URI in MLFLOW_TRACKING_URI (never on a command line): its
    # errors name it as the user gave it, not as that variable
    gone = f"sqlite:///{tmp_path / 'gone.db'}"
    _report(SimpleNamespace(sweep="figfail", mlflow_uri=gone, experiment="figfail-smoke",
                            mlflow_from="--mlflow-uri"), parent)
    out = capsys.readouterr().out
    assert f"report not written: error: --mlflow-uri {gone}: no such SQLite file" in out, out


def test_a_labs_own_per_step_metric_in_a_trial_run_moves_no_epoch(tmp_path):
    """A lab logs its own metric into a trial's run once per training step (MLflow's habit:
    step = global step, here 0..99). The last epoch was the largest step of any metric, so
    the trial's final performance and alignment read as missing (no front, no baseline) and
    the epochs table grew a row per step. The epochs are now the trainable's own."""
    from mlflow.entities import Metric

    from dashboards.sources import load_mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    parent = write_sweep(client, "steps", FULL[:3], tmp=tmp_path)
    exp = client.get_experiment_by_name("steps-smoke").experiment_id
    before = load_mlflow("steps", mlflow_uri=uri, parent_run_id=parent)
    for child in client.search_runs([exp]):
        if child.data.tags.get("mlflow.parentRunId") == parent:
            client.log_batch(child.info.run_id, metrics=[
                Metric("lab/lr", 0.1 / (1 + step), 0, step) for step in range(100)])
    record = load_mlflow("steps", mlflow_uri=uri, parent_run_id=parent)
    assert [t.epochs for t in record.trials] == [(0, 1, 2)] * 3
    rows = tables.results_table(record).to_pylist()
    assert sorted(r["performance"] for r in rows) == sorted(t["perf"][-1] for t in FULL[:3])
    assert rows == tables.results_table(before).to_pylist()  # every column as without it
    assert tables.epochs_table(record).to_pylist() == tables.epochs_table(before).to_pylist()
    assert sorted({r["epoch"] for r in tables.epochs_table(record).to_pylist()}) == [0, 1, 2]


def test_gap_between_the_most_and_the_least_aligned_trial_is_in_points():
    import pyarrow as pa

    from dashboards.statistics import sweep_statistics

    t = pa.table({"condition": ["c"] * 5, "status": ["FINISHED"] * 4 + ["FAILED"],
                  "alpha": [0.0, 0.5, -0.5, 0.1, 1.0],
                  "alignment": [0.1, 0.6, -0.2, None, 0.9],
                  "performance": [0.5, 0.45, 0.40, 0.9, 0.9],
                  "performance_metric": ["top1"] * 5})
    gap = sweep_statistics(t, n_boot=50)["c"]["gap"]
    # most aligned finished trial 0.6 -> 0.45, least -0.2 -> 0.40; the failed trial and the
    # one without alignment do not count
    assert gap["points"] == pytest.approx(5.0)
    assert gap["alignment_range"] == pytest.approx([-0.2, 0.6])
    lone = sweep_statistics(t.slice(0, 1), n_boot=50)["c"]["gap"]
    assert lone["points"] is None


def test_configurations_and_their_seeds_are_resampled():
    """With repeated seeds, Spearman's rho is over the configurations' means and its interval
    is a two-stage bootstrap: configurations drawn with replacement, then each drawn one's
    seeds (checked resample by resample against a loop over scipy); one seed per
    configuration keeps the trials bootstrap. Redrawing only seeds within fixed
    configurations gave a point interval once a configuration had a second seed."""
    import pyarrow as pa

    from dashboards.statistics import spearman_ci, sweep_statistics

    rng = np.random.default_rng(0)
    alphas = [-0.8, -0.4, 0.0, 0.4, 0.8]
    rows = []
    for a in alphas:
        for _ in range(3):
            # seed noise about as large as the configurations' spacing in performance: the
            # means can swap order in a resample, so the interval has a width to check
            rows.append({"condition": "c", "status": "FINISHED", "alpha": a, "beta": 1.0,
                         "direction": "max" if a > 0 else "min" if a < 0 else "none",
                         "alignment": a + 0.05 * rng.standard_normal(),
                         "performance": 0.5 + 0.1 * a + 0.06 * rng.standard_normal(),
                         "performance_metric": "top1"})
    t = pa.Table.from_pylist(rows)
    n_boot = 300
    sp = sweep_statistics(t, n_boot=n_boot)["c"]["spearman"]
    al = np.array([r["alignment"] for r in rows])
    pe = np.array([r["performance"] for r in rows])
    members = [np.flatnonzero([r["alpha"] == a for r in rows]) for a in alphas]
    expect = scipy_stats.spearmanr([al[m].mean() for m in members],
                                   [pe[m].mean() for m in members]).statistic
    assert sp["n"] == 5 and sp["rho"] == pytest.approx(expect)
    assert "configurations and their seeds resampled" in sp["message"]
    # the same resamples: configurations drawn, then each draw's seeds, through scipy
    draw = np.random.default_rng(0)
    drawn = draw.integers(0, len(members), size=(n_boot, len(members)))
    seeds = np.empty(drawn.shape, dtype=object)
    for j, m in enumerate(members):
        at = np.nonzero(drawn == j)
        for b, slot, pick in zip(*at, m[draw.integers(0, m.size, size=(at[0].size, m.size))]):
            seeds[b, slot] = pick
    boots = np.array([scipy_stats.spearmanr([al[p].mean() for p in seeds[b]],
                                            [pe[p].mean() for p in seeds[b]]).statistic
                      for b in range(n_boot)])
    boots = boots[np.isfinite(boots)]
    assert (sp["low"], sp["high"]) == pytest.approx(
        tuple(np.quantile(boots, [0.025, 0.975])), abs=1e-12)
    assert sp["high"] - sp["low"] > 0.1  # the seeds' noise reaches the interval
    assert sp["low"] <= sp["rho"] <= sp["high"]
    # redrawing trials instead of seeds within configurations gives another interval
    trials = spearman_ci(al, pe, n_boot=n_boot)
    assert (trials.low, trials.high) != pytest.approx((sp["low"], sp["high"]), abs=1e-3)
    single = spearman_ci([r["alignment"] for r in rows], [r["performance"] for r in rows],
                         n_boot=300, groups=list(range(len(rows))))
    assert single.n == len(rows) and single.message == ""
    # configurations whose seeds never swap ranks: the interval still has a width (it was
    # [0.8, 0.8] once one configuration had a second seed)
    a = np.arange(9.0)
    p = np.array([.3, .1, .5, .2, .6, .4, .8, .9, .7])
    one = spearman_ci(a, p)
    extra = spearman_ci(np.r_[a, 8.0], np.r_[p, .71], groups=[*range(9), 8])
    assert extra.rho == pytest.approx(one.rho) and extra.high - extra.low > 0.3


def test_paper_terms_put_the_headline_numbers_beside_this_runs():
    import pyarrow as pa

    from dashboards.paper import paper_terms
    from dashboards.statistics import sweep_statistics

    def row(cond, direction, alpha, perf, align, degr):
        return {"condition": cond, "status": "FINISHED", "direction": direction,
                "alpha": alpha, "beta": 1.0, "performance": perf, "alignment": align,
                "degradation": degr, "performance_metric": "map"}

    rows = [row("nsd_conv1_v1", "none", 0.0, 0.30, 0.0, 0.0),
            row("nsd_conv1_v1", "min", -0.4, 0.25, -0.2, 5.0),
            row("nsd_conv1_v1", "min", -0.8, 0.27, -0.4, 3.0),
            row("nsd_conv1_v1", "max", 0.8, 0.31, 0.5, -1.0),
            row("nsd_fc1_vvs", "none", 0.0, 0.30, 0.1, 0.0),
            row("nsd_fc1_vvs", "min", -0.8, 0.10, -0.3, 20.0),
            row("nsd_fc1_vvs", "max", 0.8, 0.32, 0.6, -2.0)]
    t = pa.Table.from_pylist(rows)
    stats = sweep_statistics(t, n_boot=20)
    terms = paper_terms(t, stats, "paper")
    by = {h["condition"]: h for h in terms["headlines"]}
    assert set(by) == {"nsd_conv1_v1", "nsd_fc1_vvs"}
    assert by["nsd_conv1_v1"]["measured"] == 3.0  # the least aligned trial (-0.4), not the
    assert by["nsd_fc1_vvs"]["measured"] == 20.0  # largest drop (5.0)
    # a baseline (or promoting) trial less aligned than every suppressing one is no
    # "complete misalignment": its drop was read as the headline (0.0 for a baseline)
    low = t.set_column(t.schema.get_field_index("alignment"), "alignment",
                       pa.array([-0.9, -0.2, -0.4, 0.5, 0.1, -0.3, -0.8]))
    low_by = {h["condition"]: h for h in paper_terms(low, stats, "paper")["headlines"]}
    assert low_by["nsd_conv1_v1"]["measured"] == 3.0 and low_by["nsd_fc1_vvs"]["measured"] == 20.0
    assert by["nsd_fc1_vvs"]["comparable"] is True
    (cmp,) = terms["comparisons"]
    assert cmp["first_gap"] == pytest.approx(100 * (0.31 - 0.27))
    assert cmp["second_gap"] == pytest.approx(100 * (0.32 - 0.10))
    assert cmp["difference"] == pytest.approx(cmp["first_gap"] - cmp["second_gap"])
    demo = paper_terms(t, stats, "demo")
    assert all(not h["comparable"] and "demo scale" in h["note"] for h in demo["headlines"])
    # A paper-scale run at other settings, of a selection or of fewer subjects was marked
    # comparable all the same ("yes" beside 1 epoch at 64 px on 5 classes), and so was a
    # headline with no number (no suppressing trial selected).
    from dashboards.paper import differences

    def differs(tags: dict) -> list[str]:  # as the post-processor reads a parent run's tags
        return differences(SweepRunTags.parse(tags))

    tags = {"overrides": "epochs=1,width=0.25", "only": "nsd_fc1_vvs-*", "subjects": "2"}
    assert differs(tags) == ["settings changed (epochs=1,width=0.25)",
                             "a selection of trials (nsd_fc1_vvs-*)",
                             "NSD subjects 2 of the paper's 8"]
    assert differs({"subjects": "1,2,3,4,5,6,7,8"}) == []
    # a run recorded before the subjects tag: its data line names them
    assert differs({"data_description": "paper scale on NSD (/data/nsd, subjects 2, COCO "
                                        "annotations /data/coco) at 224 px"}) == [
        "NSD subjects 2 of the paper's 8"]
    assert differs({"data_description": "paper scale on NSD (/d, subjects 1, 2, 3, 4, 5, "
                                        "6, 7, 8, COCO annotations /c) at 224 px"}) == []
    # a search samples alphas at one beta: not the paper's grid (it was marked comparable)
    assert differs({"search": "optuna", "num_samples": "4"}) == [
        "an Optuna search (4 samples per condition: alphas drawn by Optuna (log-uniform, then "
        "TPE) at the grid's first beta, not the grid's) instead of the paper's grid"]
    assert differs({"search": "grid"}) == []
    # a release whose path holds "subjects 1" was read as a run of subject 1 alone
    assert differs({"data_description": "paper scale on NSD (/data/subjects 1-8/nsd, "
                                        "subjects 1, 2, 3, 4, 5, 6, 7, 8, COCO annotations "
                                        "/c) at 224 px"}) == []
    changed = paper_terms(t, stats, "paper", differs(tags))
    assert all(not h["comparable"] and h["note"] == (
        "not comparable: settings changed (epochs=1,width=0.25); a selection of trials "
        "(nsd_fc1_vvs-*); NSD subjects 2 of the paper's 8")
        for h in changed["headlines"] + changed["comparisons"])
    no_min = t.filter(pa.compute.not_equal(t.column("direction"), "min"))
    empty = {h["condition"]: h for h in paper_terms(no_min, sweep_statistics(no_min, n_boot=20),
                                                    "paper")["headlines"]}
    assert empty["nsd_fc1_vvs"]["measured"] is None
    assert empty["nsd_fc1_vvs"]["comparable"] is False
    assert empty["nsd_fc1_vvs"]["note"].startswith("not comparable: no number")


def test_with_seeds_the_paper_terms_and_the_gap_read_configuration_means():
    """Two seeds: a baseline seed happened to be the least aligned trial, and per trial the
    headline read its drop (0 by definition) as "complete misalignment"; the largest drop and
    the gap read single seeds' noise. They now read the suppressing configurations' (and, for
    the gap, every configuration's) means over seeds."""
    import pyarrow as pa

    from dashboards.paper import paper_terms
    from dashboards.statistics import sweep_statistics

    def row(cond, direction, alpha, seed, perf, align, degr):
        return {"condition": cond, "status": "FINISHED", "direction": direction,
                "alpha": alpha, "beta": 1.0, "seed": seed, "performance": perf,
                "alignment": align, "degradation": degr, "performance_metric": "map"}

    rows = []
    for cond in ("nsd_conv1_v1", "pretrained_conv1", "gabor_conv1"):
        rows += [row(cond, "none", 0.0, 0, 0.30, -0.50, 0.0),  # the least aligned trial
                 row(cond, "none", 0.0, 1, 0.32, 0.20, 0.0),
                 row(cond, "min", -0.8, 0, 0.26, -0.30, 4.0),
                 row(cond, "min", -0.8, 1, 0.30, -0.10, 2.0),
                 row(cond, "min", -0.4, 0, 0.21, -0.05, 9.0),   # the largest single drop
                 row(cond, "min", -0.4, 1, 0.31, -0.01, 1.0),
                 row(cond, "max", 0.8, 0, 0.33, 0.60, -3.0),
                 row(cond, "max", 0.8, 1, 0.35, 0.40, -3.0),
                 row(cond, "max", 0.8, 2, 0.20, 0.50, 12.0)]    # three seeds here
    t = pa.Table.from_pylist(rows)
    stats = sweep_statistics(t, n_boot=20)
    by = {h["condition"]: h["measured"] for h in paper_terms(t, stats, "paper")["headlines"]}
    assert by["nsd_conv1_v1"] == pytest.approx(3.0)      # alpha -0.8: mean alignment -0.2
    assert by["gabor_conv1"] == pytest.approx(5.0)       # alpha -0.4: mean drop 5, not 9
    up, down = np.mean([0.33, 0.35, 0.20]), np.mean([np.mean([0.26, 0.30]),
                                                     np.mean([0.21, 0.31])])
    assert by["pretrained_conv1"] == pytest.approx(100 * (up - down))
    gap = stats["nsd_conv1_v1"]["gap"]                    # most aligned: alpha 0.8 (0.5);
    assert gap["points"] == pytest.approx(100 * (up - 0.28))  # least: alpha -0.8 (-0.2)
    assert gap["alignment_range"] == pytest.approx([-0.2, 0.5])


def test_an_output_folder_that_is_a_file_is_one_line(tmp_path):
    # Before: a 17-line FileExistsError traceback from build_outputs' mkdir.
    taken = tmp_path / "report.txt"
    taken.write_text("keep me\n")
    proc = subprocess.run(
        [sys.executable, "-m", "dashboards.pareto", "gabor_conv1", "--ray-results",
         str(tmp_path), "--out", str(taken)],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (f"error: --out {taken}: not a folder; accepted: a folder for the "
                           f"report (created when missing)\n")
    assert taken.read_text() == "keep me\n"
    # a folder below that file: a NotADirectoryError traceback file and exit 1, after the
    # whole store had been read
    proc = subprocess.run(
        [sys.executable, "-m", "dashboards.pareto", "gabor_conv1", "--ray-results",
         str(tmp_path), "--out", str(taken / "sub")],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr == (
        f"error: --out {taken / 'sub'}: {taken} is not a folder; accepted: a folder this user "
        f"can create or write\n"), proc.stderr
    # a folder whose permission bits say yes but which takes no file (root on /proc): a
    # FileNotFoundError traceback and exit 1, after the whole store had been read
    if Path("/proc/self").is_dir():
        from references.cache import unwritable

        # (as root: "does not take files (<the system's reason>)"; else "is not writable")
        assert (unwritable(Path("/proc/x")) or "").startswith("/proc ")
        assert unwritable(tmp_path / "new" / "deeper") is None and not (tmp_path / "new").exists()
    # a link to a share not mounted: exit 1 and "FileExistsError: File exists" after the
    # store had been read (mkdir of the dangling link)
    dangling = tmp_path / "reports"
    dangling.symlink_to(tmp_path / "unmounted" / "share")
    proc = subprocess.run(
        [sys.executable, "-m", "dashboards.pareto", "gabor_conv1", "--ray-results",
         str(tmp_path), "--out", str(dangling / "run1")],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr == (
        f"error: --out {dangling / 'run1'}: {dangling} is a symbolic link to "
        f"{tmp_path / 'unmounted' / 'share'}, which does not exist (a share not mounted?); "
        f"accepted: a folder this user can create or write\n"), proc.stderr
    # --ray-results a loop of links: a RuntimeError from Path.resolve, exit 1
    loop = tmp_path / "loop1"
    loop.symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(loop)
    proc = subprocess.run(
        [sys.executable, "-m", "dashboards.pareto", "gabor_conv1", "--ray-results", str(loop),
         "--no-log"], check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith(
        f"error: --ray-results {loop}: cannot be resolved (") and proc.stderr.count("\n") == 1, \
        proc.stderr
    # a malformed --parent-run was ignored with --ray-results and the report built anyway
    proc = subprocess.run(
        [sys.executable, "-m", "dashboards.pareto", "gabor_conv1", "--ray-results",
         str(tmp_path), "--parent-run", "zz!!", "--no-log"],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr == (
        "error: --parent-run 'zz!!': not an MLflow run id; accepted: a run id, letters and "
        "digits (the driver prints its parent run's)\n"), proc.stderr


def test_a_tracking_server_that_is_down_is_one_line_at_once(tmp_path):
    """MLflow's client retried a refused connection for about four minutes, then exit 1 with
    a traceback file. Now /health is asked first, as the driver does: one line, exit 2."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "dashboards.pareto", "gabor_conv1", "--mlflow-uri",
         f"http://u:secret@127.0.0.1:{port}", "--no-log"],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: --mlflow-uri http://u:***@127.0.0.1:{port}: tracking "
                                  f"server unreachable (Connection refused); start it")
    assert proc.stderr.count("\n") == 1 and "secret" not in proc.stderr
    assert time.monotonic() - t0 < 60
    # the same URI from the variable is named as the variable (it said --mlflow-uri, which
    # the user had not given), and the default store as the default
    proc = subprocess.run(
        [sys.executable, "-m", "dashboards.pareto", "gabor_conv1", "--no-log"],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})
    assert proc.stderr.startswith(f"error: MLFLOW_TRACKING_URI http://127.0.0.1:{port}: "
                                  f"tracking server unreachable"), proc.stderr
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(
        [sys.executable, "-m", "dashboards.pareto", "gabor_conv1", "--no-log"],
        check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.stderr.startswith(f"error: the default tracking store (no --mlflow-uri, no "
                                  f"MLFLOW_TRACKING_URI) sqlite:///{tmp_path}/mlflow.db: no "
                                  f"such SQLite file"), proc.stderr


# ------------------------------------------------------------- NaN epochs and lone seeds


def _record(trials):
    from dashboards.sources import SweepRecord, Trial

    made = []
    for i, (direction, alpha, seed, perf, align) in enumerate(trials):
        history = {"val_performance": tuple((e, v) for e, v in enumerate(perf)),
                   "val_map": tuple((e, v) for e, v in enumerate(perf)),
                   # the tracker does not log NaN: an epoch without it is simply missing
                   "val_alignment": tuple((e, v) for e, v in enumerate(align)
                                          if v is not None and v == v),
                   "task_loss": tuple((e, 1.0) for e in range(len(perf)))}
        history = {k: tuple(ev for ev in v if ev[1] == ev[1]) for k, v in history.items()}
        made.append(Trial(run_id=f"r{i}", trial_id=f"c-{direction}-a{abs(alpha)}-b1-s{seed}",
                          condition="c", direction=direction, alpha=alpha, beta=1.0,
                          seed=seed, status="FINISHED", config={"metric": "linear"},
                          history=history))
    return SweepRecord("c", "c-smoke", "test", None, "FINISHED", {}, tuple(made),
                       fetch=lambda *a: None)


def test_a_nan_last_epoch_is_no_value_and_not_an_older_epochs():
    """The tracker does not log NaN, so an older epoch's value used to stand in for the last
    epoch's (performance 0.30 beside the last epoch's alignment) and entered the effects;
    best_performance ignored every epoch after a leading NaN. A trial without a final
    performance then crashed the effects."""
    from dashboards.effects import direction_effects

    nan = float("nan")
    record = _record([("none", 0.0, 0, [0.4, 0.5], [0.1, 0.2]),
                      ("min", -0.4, 0, [0.3, nan], [0.0, -0.2]),
                      ("min", -0.8, 0, [nan, 0.4, 0.45], [0.0, -0.1, -0.3]),
                      ("max", 0.8, 0, [0.4, 0.44], [0.3, 0.5])])
    rows = {r["trial_id"]: r for r in tables.results_table(record).to_pylist()}
    stale = rows["c-min-a0.4-b1-s0"]
    assert stale["performance"] is None and stale["alignment"] == -0.2
    assert not stale["front_up"] and not stale["front_down"]
    late = rows["c-min-a0.8-b1-s0"]
    assert (late["best_performance"], late["best_epoch"]) == (0.45, 2)
    effects = direction_effects(tables.results_table(record), lambda _: None)
    assert effects["c"]["min"]["drop"] == pytest.approx(100 * (0.5 - 0.45))  # without 0.30


def test_a_seed_without_alignment_moves_no_configuration_mean_and_is_off_the_fronts():
    record = _record([("none", 0.0, 0, [0.5], [0.1]), ("none", 0.0, 1, [0.5], [0.1]),
                      ("max", 0.5, 0, [0.6], [None]), ("max", 0.5, 1, [0.2], [0.9])])
    rows = {r["trial_id"]: r for r in tables.results_table(record).to_pylist()}
    lone, kept = rows["c-max-a0.5-b1-s0"], rows["c-max-a0.5-b1-s1"]
    assert kept["performance_mean"] == 0.2 and kept["alignment_mean"] == 0.9
    assert kept["seeds_in_configuration"] == 1
    assert kept["front_up"] and not lone["front_up"] and not lone["front_down"]


def test_a_sweep_named_in_other_letters_logs_its_statistics(tmp_path):
    """A lab's sweep file nsd_çé_v1.toml: MLflow refused every effect/<condition>/... metric
    name, so the report was logged but no statistic, the run's note, nor the console lines
    (and the printed retry failed the same way). Letters of any script are kept as they are;
    characters MLflow refuses become "_" and a digest of the name, so conditions that differ
    only there keep one metric each (they were merged: one's rho overwrote the other's)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)

    def postprocess(sweep: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "dashboards.pareto", sweep, "--mlflow-uri", uri,
             "--out", str(tmp_path / sweep)],
            check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    parent = write_sweep(client, "nsd_çé_v1", FULL, tmp=tmp_path)
    assert "nsd_çé_v1: suppressing alignment" in postprocess("nsd_çé_v1")
    metrics = client.get_run(parent).data.metrics
    assert "effect/nsd_çé_v1/min/drop" in metrics and "stat/nsd_çé_v1/spearman_rho" in metrics
    # two conditions whose names differ only in characters MLflow refuses, opposite trends
    flipped = [{**t, "align": [-a for a in t["align"]]} for t in FULL]
    trials = ([{**t, "condition": "v1_$"} for t in FULL]
              + [{**t, "condition": "v1_%"} for t in flipped])
    parent = write_sweep(client, "both", trials, tmp=tmp_path)
    postprocess("both")
    stats = json.loads((tmp_path / "both" / "statistics.json").read_text())["conditions"]
    rhos = {k: v for k, v in client.get_run(parent).data.metrics.items()
            if k.endswith("/spearman_rho")}
    assert len(rhos) == 2 and all(k.startswith("stat/v1__-") for k in rhos), rhos
    assert sorted(rhos.values()) == sorted(stats[c]["spearman"]["rho"] for c in stats)
    assert stats["v1_$"]["spearman"]["rho"] == -stats["v1_%"]["spearman"]["rho"] != 0


def test_one_direction_without_a_baseline_is_not_said_to_have_one():
    record = _record([("max", 0.5, 0, [0.6], [0.3]), ("max", 0.8, 0, [0.5], [0.4])])
    notes = pareto.diagnose(record, tables.results_table(record))
    assert any("no finished baseline" in n for n in notes)
    (side,) = [n for n in notes if "one direction only" in n]
    assert side.endswith("no min trial, so that side of the front has no point"), side


@pytest.mark.parametrize("experiment", ["/srv/elsewhere/lab smoke", "../../up", "a\\b", ".hidden"])
def test_the_default_output_folder_stays_under_outputs(experiment, tmp_path, monkeypatch):
    """An experiment renamed in MLflow to a path-like name is one folder of outputs/."""
    from types import SimpleNamespace

    monkeypatch.chdir(tmp_path)
    out = pareto._default_out(SimpleNamespace(experiment=experiment, label="run"))
    assert out.parent.parent == Path("outputs") and out.name == "run"
    assert not out.parent.name.startswith(".") and "/" not in out.parent.name
    assert (tmp_path / out).resolve().is_relative_to(tmp_path / "outputs")


def test_a_folder_named_in_another_encoding_is_read_through_a_utf8_link(tmp_path, capsys):
    """Ray's storage in a folder named in Latin-1, reached through a UTF-8 link (the README's
    remedy): the link was resolved to the Latin-1 name, which the report could not encode
    ("'utf-8' codec can't encode character", no path named). A Latin-1 --out was written, then
    failed on the run's description: refused first, in one line, as sweeps/run.py does."""
    import os

    storage = tmp_path / os.fsdecode(b"caf\xe9 runs")
    write_ray_run(storage / "gabor_conv1-demo_20260102-000000",
                  [("gabor_conv1-none-a0-b1-s0", "done", [0.3, 0.4]),
                   ("gabor_conv1-max-a8-b2-s0", "done", [0.2, 0.35])],
                  {"model": "alexnet", "layer": "conv1", "reference": "gabor", "epochs": 2})
    link = tmp_path / "cafe"
    link.symlink_to(storage)
    out = tmp_path / "out"
    assert pareto.main(["gabor_conv1", "--ray-results", str(link), "--out", str(out),
                        "--no-log"]) == 0, capsys.readouterr().err
    assert str(link) in (out / "report.html").read_text()
    capsys.readouterr()
    bad = str(tmp_path / os.fsdecode(b"r\xe9sultats"))
    assert pareto.main(["gabor_conv1", "--ray-results", str(link), "--out", bad]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: argument '{tmp_path}/r\\xe9sultats' is not valid UTF-8 (a path "
                   f"named in another encoding?); accepted: UTF-8 arguments -- reach such a "
                   f"folder through a symbolic link with a UTF-8 name\n")
    assert not os.path.exists(bad)


def test_a_build_that_read_the_run_before_it_ended_replaces_nothing(tmp_path, monkeypatch,
                                                                     capsys):
    """A post-processor started while the sweep ran and finishing after the driver's own final
    build replaced the finished run's report and tables with its PARTIAL (running) ones, and
    logged its partial statistics as the parent's latest metrics (probed at stop 37). A build
    whose parent run changed since it was read now replaces and logs nothing: one line,
    exit 2, and the command to post-process again."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    parent = write_sweep(client, "live", FULL, tmp=tmp_path)
    client.update_run(parent, status="RUNNING")
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.html").write_text("the driver's final report")
    real = pareto._build_outputs

    def driver_ends_meanwhile(record, stage):
        path = real(record, stage)
        client.set_terminated(parent, "FINISHED")  # the sweep ends while this one builds
        return path

    monkeypatch.setattr(pareto, "_build_outputs", driver_ends_meanwhile)
    assert pareto.main(["live", "--mlflow-uri", uri, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"error: the sweep's parent run {parent} changed while this report was built "
                   f"(RUNNING when read, FINISHED now: the sweep ended or was resumed "
                   f"meanwhile); nothing was replaced or logged; post-process it again: "
                   f"python -m dashboards.pareto live --parent-run {parent}")
    assert (out / "report.html").read_text() == "the driver's final report"
    assert sorted(p.name for p in out.iterdir()) == ["report.html"]  # no stage left
    run = client.get_run(parent)
    assert not run.data.metrics and not [a for a in client.list_artifacts(parent)
                                         if a.path == "report.html"]
    monkeypatch.setattr(pareto, "_build_outputs", real)  # read again: the run as it ended
    assert pareto.main(["live", "--mlflow-uri", uri, "--out", str(out)]) == 0
    assert "PARTIAL" not in (out / "report.html").read_text()
    assert client.get_run(parent).data.metrics


def test_a_sweep_read_while_it_runs_is_labelled_partial(tmp_path, capsys):
    """The post-processor run on a live sweep: trials not started yet have no run, so the
    report was titled as complete over the trials that happened to exist (and, in a sweep's
    first minute, said only "no trial runs"). A RUNNING parent now labels it PARTIAL and says
    to post-process again; the same sweep once ended is complete."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    parent = write_sweep(client, "live", [*FULL[:2], {**FULL[2], "status": "FAILED"}],
                         tmp=tmp_path)
    client.update_run(parent, status="RUNNING")
    for out in (tmp_path / "during", tmp_path / "after"):
        assert pareto.main(["live", "--mlflow-uri", uri, "--out", str(out), "--no-log"]) == 0
        html = (out / "report.html").read_text()
        messages = json.loads((out / "statistics.json").read_text())["messages"]
        printed = capsys.readouterr().out
        if out.name == "after":
            assert "PARTIAL" not in html and not any("PARTIAL" in m for m in messages)
            break
        assert "PARTIAL (running) Sweep live" in html
        (note,) = [m for m in messages if m.startswith("PARTIAL")]
        assert note.startswith("PARTIAL: the parent run is still RUNNING (the sweep is running")
        assert "the 2 trial(s) finished so far (1 more failed), of the 3 started." in note
        assert note.endswith("if its driver is gone: Continue it (with its data, tracking "
                             "and storage options) with sweeps/run.py live --smoke-test "
                             "--resume")
        assert f"note: {note}" in printed
        client.set_tag(parent, "search", "optuna")  # resumed with its search options
        client.set_tag(parent, "num_samples", "2")
        assert pareto.main(["live", "--mlflow-uri", uri, "--out", str(tmp_path / "optuna"),
                            "--no-log"]) == 0
        (note,) = [m for m in json.loads((tmp_path / "optuna" / "statistics.json").read_text())
                   ["messages"] if m.startswith("PARTIAL")]
        assert note.endswith("Continue it (with its data, tracking and storage options) with "
                             "sweeps/run.py live --smoke-test --search optuna --num-samples 2 "
                             "--resume"), note
        # the options a resume must repeat, from the parent's tags (the note said only
        # `sweeps/run.py live --resume`: pasted after a smoke test, "nothing to resume")
        client.set_tag(parent, "search", "grid")
        for key, value in (("smoke", "true"), ("seeds", "2"), ("overrides", "epochs=3,lr=0.01"),
                           ("only", "live-max-* live-none-*"), ("data", "nsd")):
            client.set_tag(parent, key, value)
        assert pareto.main(["live", "--mlflow-uri", uri, "--out", str(tmp_path / "options"),
                            "--no-log"]) == 0
        (note,) = [m for m in json.loads((tmp_path / "options" / "statistics.json")
                                         .read_text())["messages"] if m.startswith("PARTIAL")]
        assert note.endswith("Continue it (with its data, tracking and storage options) with "
                             "sweeps/run.py live --data nsd --smoke-test --seeds 2 --set "
                             "epochs=3 --set lr=0.01 --only 'live-max-*' --only 'live-none-*' "
                             "--resume"), note
        for key, value in (("seeds", "1"), ("overrides", ""), ("only", ""), ("data", "demo"),
                           ("search", "optuna")):
            client.set_tag(parent, key, value)
        # the driver's count of the trials it launches: those without a run yet are said
        def partial_note(name):
            pareto.main(["live", "--mlflow-uri", uri, "--out", str(tmp_path / name), "--no-log"])
            (note,) = [m for m in json.loads((tmp_path / name / "statistics.json").read_text())
                       ["messages"] if m.startswith("PARTIAL")]
            return note

        client.set_tag(parent, "search", "grid")
        # a parent made before the driver counted its trials: the trials that never started
        # cannot be counted, and the note says so rather than calling them all (2/3)
        client.set_terminated(parent, "KILLED")
        assert ("; trials that never started are not counted: the number the run planned is "
                "not recorded (a run made by an older version; a --resume records it)); "
                in partial_note("unrecorded"))
        client.update_run(parent, "RUNNING")
        client.set_tag(parent, "trials", "5")
        assert "of the 3 started (5 planned). Post-process it again" in partial_note("planned")
        # interrupted before two of them started: they have no run to count, the tag does
        client.set_terminated(parent, "KILLED")
        note = partial_note("killed")
        assert note.startswith("PARTIAL: this sweep did not run to its end (parent run KILLED; "
                               "2 of 5 trials have no run (never started)); "), note
        # ended with every planned trial's run but two: partial even though none is unfinished
        client.set_terminated(parent, "FINISHED")
        client.set_tag(parent, "interrupted", "false")
        assert "(2 of 5 trials have no run (never started))" in partial_note("missing")
        # per condition too: its counts left out the trials that never started, and a
        # condition none of whose trials started was missing from the summary
        cond = json.loads((tmp_path / "missing" / "statistics.json").read_text())["conditions"]
        (name,) = cond
        client.set_tag(parent, "planned", json.dumps({name: 4, "later": 1}))
        capsys.readouterr()
        partial_note("per_condition")
        cond = json.loads((tmp_path / "per_condition" / "statistics.json").read_text()
                          )["conditions"]
        assert (cond[name]["trials"], cond[name]["finished"]) == (4, 2)
        assert (cond["later"]["trials"], cond["later"]["finished"]) == (1, 0)
        printed = capsys.readouterr().out
        assert f"{name}: 2/4 trials finished" in printed and "later: 0/1 trials finished" \
            in printed, printed
        client.set_tag(parent, "planned", "{}")
        client.set_tag(parent, "trials", "3")


def test_a_deleted_trial_run_is_named_as_deleted_and_a_deleted_parent_refused(store_copy,
                                                                               tmp_path):
    """A trial's run deleted in MLflow made a finished sweep's report say "1 of 5 trials have
    no run (never started)" with a --resume that would run nothing; a deleted parent given as
    --parent-run had the whole report built and half logged into it before MLflow refused
    (exit 1), and without it the store was said to hold no run of the sweep ("run the sweep
    first")."""
    from records import child_runs

    copy, parents = store_copy
    uri = f"sqlite:///{copy}"
    client = MlflowClient(uri)
    client.set_tag(parents["full"], "trials", "5")  # as the driver records it
    gone = child_runs(client, parents["full"])[0]
    client.delete_run(gone.info.run_id)
    pareto.postprocess("full", mlflow_uri=uri, out=tmp_path / "out", log=False)
    messages = json.loads((tmp_path / "out" / "statistics.json").read_text())["messages"]
    assert messages[0] == (f"PARTIAL: 1 of 5 trials' runs are deleted in MLflow, e.g. "
                           f"{gone.data.tags['trial_id']} -- restore one with: mlflow runs "
                           f"restore --run-id {gone.info.run_id}; the report covers the others.")
    assert not any("never started" in m or "--resume" in m for m in messages), messages

    client.delete_run(parents["full"])
    proc = subprocess.run(
        [sys.executable, "-m", "dashboards.pareto", "full", "--mlflow-uri", uri,
         "--parent-run", parents["full"], "--out", str(tmp_path / "out2")],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr == (f"error: --parent-run {parents['full']} is deleted in {uri}; "
                           f"accepted: an active run -- restore it with: mlflow runs restore "
                           f"--run-id {parents['full']}\n")
    assert not (tmp_path / "out2").exists()
    with pytest.raises(SourceError, match=re.escape(
            f"has no parent run of sweep 'full'; its parent run {parents['full']} is deleted "
            f"-- restore it with: mlflow runs restore --run-id {parents['full']}")):
        load_mlflow("full", mlflow_uri=uri)


def test_an_infinite_metric_is_missing_not_the_largest_float(store_copy, tmp_path):
    """MLflow's SQLite store keeps an infinite metric as 1.797e308: read back as that, the
    trial's alignment became 1.797693e+308 in results.parquet, on the fronts and in the
    statistics, where a NaN is left out."""
    from records import child_runs

    copy, parents = store_copy
    uri = f"sqlite:///{copy}"
    client = MlflowClient(uri)
    runs = child_runs(client, parents["full"])
    run = next(r for r in runs if r.info.status == "FINISHED")
    last = max(m.step for m in client.get_metric_history(run.info.run_id, "val_alignment"))
    client.log_metric(run.info.run_id, "val_alignment", float("inf"), step=last)
    assert client.get_metric_history(run.info.run_id, "val_alignment")[-1].value > 1e308
    report = pareto.postprocess("full", mlflow_uri=uri, out=tmp_path / "out", log=False)
    table = read_results(report).to_pylist()
    row = next(r for r in table if r["trial_id"] == run.data.tags["trial_id"])
    assert row["alignment"] is None or math.isnan(row["alignment"])
    assert all(r["alignment"] is None or abs(r["alignment"]) < 1e300 for r in table)
