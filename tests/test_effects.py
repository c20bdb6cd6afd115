"""dashboards.effects: each side's drop from the baseline with a paired bootstrap interval over
validation images (and seeds), and the negative control beside its condition."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from dashboards.effects import (
    Predictions,
    direction_effects,
    performance,
    resample_counts,
)
from trainable.average_precision import mean_average_precision, weighted_mean_average_precision

N_IMAGES, N_CLASSES = 240, 8


def _world(seed: int = 0):
    rng = np.random.default_rng(seed)
    targets = rng.random((N_IMAGES, N_CLASSES)) < 0.25
    targets[np.arange(N_CLASSES), np.arange(N_CLASSES)] = True  # every class has a positive
    return rng, targets


def _scores(rng, targets, skill: float) -> np.ndarray:
    """Scores whose separation of positives from negatives grows with ``skill``."""
    return np.round(skill * targets + rng.normal(0, 1, targets.shape), 3)


# ----------------------------------------------------------------------------- performance


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_map_equals_map_of_the_resampled_images(seed):
    """Known answer: mAP under bootstrap counts is the plain mAP of the images repeated that
    many times (scikit-learn's rule, tied scores one threshold), and unit weights give the
    trial's own number."""
    rng, targets = _world(seed)
    scores = np.round(_scores(rng, targets, 1.0), 1)  # coarse: many ties
    ids = np.array([f"{i:04d}" for i in range(N_IMAGES)])
    pred = Predictions(ids, scores=scores, targets=targets)
    counts = rng.multinomial(N_IMAGES, np.full(N_IMAGES, 1 / N_IMAGES), 3)
    got = performance(pred, np.vstack([np.ones(N_IMAGES), counts]))
    assert got[0] == pytest.approx(mean_average_precision(scores, targets), abs=1e-12)
    for k, w in enumerate(counts):
        idx = np.repeat(np.arange(N_IMAGES), w)
        assert got[k + 1] == pytest.approx(mean_average_precision(scores[idx], targets[idx]),
                                           abs=1e-12)


@pytest.mark.parametrize("seed", range(12))
def test_the_weighted_map_is_scikit_learns_with_sample_weights(seed):
    """The trials' weighted mAP (binned thresholds, one sparse product a class: the paper's
    NSD bootstrap had taken 52 minutes a seed) against scikit-learn's average precision with
    the weights as sample weights, class by class: ties, classes without a positive,
    weightings that draw none of a class's positives (that class left out) and zero weights
    included; float64 weights and the float32 counts the bootstrap uses."""
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(5, 200)), int(rng.integers(1, 6))
    targets = rng.random((n, k)) < rng.uniform(0.02, 0.5)
    if seed % 4 == 0:
        targets[:, 0] = False  # a class without a positive
    scores = np.round(targets + rng.standard_normal((n, k)), int(rng.integers(0, 3)))
    counts = rng.multinomial(n, np.full(n, 1 / n), int(rng.integers(1, 30))).astype(float)
    if seed % 3 == 0:
        counts[:, : n // 2] = 0  # half the images never drawn
    w = np.vstack([np.ones(n), counts])
    want = []
    for row in w:
        aps = [average_precision_score(targets[:, c], scores[:, c], sample_weight=row)
               for c in range(k) if (row * targets[:, c]).sum() > 0]
        want.append(np.mean(aps) if aps else np.nan)
    for weights in (w, w.astype(np.float32)):
        got = weighted_mean_average_precision(scores, targets, weights)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_resample_counts_are_one_multinomial_draw_in_chunks():
    """The counts drawn a chunk at a time (float32, (n, 1 + B): no int64 (B, n) draw beside a
    float64 copy, 2.6 GB at ImageNet's 50,000 images) are the numbers of one draw."""
    n, n_boot = 300, 700
    counts = resample_counts(np.random.default_rng(5), n, n_boot)
    assert counts.dtype == np.float32 and counts.shape == (n, 1 + n_boot)
    one = np.random.default_rng(5).multinomial(n, np.full(n, 1 / n), n_boot)
    np.testing.assert_array_equal(counts[:, 0], 1)
    np.testing.assert_array_equal(counts[:, 1:].T, one)
    hits = np.random.default_rng(6).random(n)
    ids = np.array([f"{i:04d}" for i in range(n)])  # in the order Predictions sorts them
    np.testing.assert_allclose(performance(Predictions(ids, hits=hits),
                                           counts.T),
                               np.r_[hits.mean(), one @ hits / n], rtol=1e-13)


def test_weighted_top1_is_the_weighted_hit_rate():
    hits = np.array([1, 0, 1, 1, 0], float)
    pred = Predictions(np.arange(5).astype(str), hits=hits)
    got = performance(pred, np.array([[1, 1, 1, 1, 1], [0, 2, 0, 0, 3], [5, 0, 0, 0, 0]]))
    np.testing.assert_allclose(got, [0.6, 0.0, 1.0])


def test_predictions_with_a_repeated_image_id_are_refused(tmp_path):
    """Rows are paired across trials by image id: a repeat (5010 written as 5011) paired one
    trial's prediction for one image with the others' for another, and left 5010 out."""
    path = tmp_path / "p.npz"
    np.savez(path, image_ids=np.array([5009, 5011, 5011]), top1=np.array([True, False, True]),
             top5=np.array([True, True, True]))
    with pytest.raises(ValueError, match=r"^1 repeated image id\(s\) \(e\.g\. 5011\); "
                                         r"accepted: each image once"):
        Predictions.load(path)


def test_predictions_load_orders_rows_by_image_id(tmp_path):
    path = tmp_path / "p.npz"
    np.savez(path, image_ids=np.array([30, 10, 20]), top1=np.array([True, False, True]),
             top5=np.array([True, True, True]))
    pred = Predictions.load(path)
    assert pred.image_ids.tolist() == ["10", "20", "30"]
    assert pred.hits.tolist() == [0.0, 1.0, 1.0]
    sub = pred.rows(np.array(["30", "10"]))
    assert sub.image_ids.tolist() == ["10", "30"] and sub.hits.tolist() == [0.0, 1.0]


# ----------------------------------------------------------------------------- effects


def _sweep(skills: dict[tuple[str, str, float, int], float], seed: int = 0):
    """A results table and per-trial predictions: keys (condition, direction, |alpha|, seed)
    -> skill of that trial's scores."""
    rng, targets = _world(seed)
    rows, preds = [], {}
    ids = np.array([f"{i:04d}" for i in range(N_IMAGES)])
    for (cond, direction, a, s), skill in skills.items():
        sign = {"max": 1.0, "min": -1.0, "none": 0.0}[direction]
        tid = f"{cond}-{direction}-a{a:g}-b1-s{s}"
        pred = Predictions(ids, scores=_scores(rng, targets, skill), targets=targets)
        preds[tid] = pred
        rows.append({"trial_id": tid, "condition": cond, "direction": direction,
                     "alpha": sign * a, "beta": 1.0, "seed": s, "status": "FINISHED",
                     "performance": float(performance(pred, np.ones((1, N_IMAGES)))[0]),
                     "performance_metric": "map",
                     "alignment": {"max": 0.3, "min": -0.1, "none": 0.0}[direction]})
    return pa.Table.from_pylist(rows), preds


def test_a_real_cost_has_an_interval_that_excludes_zero_and_none_includes_it():
    """Suppressing trials that are much worse than the baseline: a positive drop whose
    interval excludes zero; promoting trials exactly as good (the baseline's own scores): an
    interval around zero. The point value equals the results table's numbers."""
    skills = {("c", "none", 0.0, 0): 2.0, ("c", "min", 0.4, 0): 0.3, ("c", "min", 0.8, 0): 0.2,
              ("c", "max", 0.4, 0): 2.0, ("c", "max", 0.8, 0): 2.0}
    results, preds = _sweep(skills)
    base = preds["c-none-a0-b1-s0"]
    preds["c-max-a0.4-b1-s0"] = preds["c-max-a0.8-b1-s0"] = base  # exactly the baseline
    out = direction_effects(results, preds.get, n_boot=400)["c"]
    rows = {r["trial_id"]: r["performance"] for r in results.to_pylist()}
    want = 100 * (rows["c-none-a0-b1-s0"]
                  - (rows["c-min-a0.4-b1-s0"] + rows["c-min-a0.8-b1-s0"]) / 2)
    assert out["min"]["drop"] == pytest.approx(want, abs=1e-9)
    assert out["min"]["low"] > 0 and out["min"]["excludes_zero"] is True
    assert out["min"]["low"] < out["min"]["drop"] < out["min"]["high"]
    assert out["max"]["drop"] == pytest.approx(0.0, abs=1e-9)
    assert out["max"]["low"] == pytest.approx(0.0, abs=1e-9)  # paired: identical trials
    assert out["min"]["alignment_change"] == pytest.approx(-0.1)
    assert out["validation_images"] == N_IMAGES and "one seed" in out["over"]
    assert "message" not in out
    # one trial's outcomes cut to fewer images: every trial is scored on the shared ones, and
    # the effects say so (the point values then differ from the logged performances)
    cut = preds["c-min-a0.8-b1-s0"]
    preds["c-min-a0.8-b1-s0"] = cut.rows(cut.image_ids[: N_IMAGES - 50])
    out = direction_effects(results, preds.get, n_boot=50)["c"]
    assert out["validation_images"] == N_IMAGES - 50
    assert out["message"] == (
        f"the trials' per-image outcomes cover different images: effects and intervals over "
        f"the {N_IMAGES - 50} all of them share (of up to {N_IMAGES}), so they may differ "
        f"from the logged performances")


def test_control_beside_its_condition_gives_the_specific_part_of_the_cost():
    """The condition's suppressing side costs more than its control's: the difference is
    positive and excludes zero; a control that costs as much gives a difference around 0."""
    skills = {("c", "none", 0.0, 0): 2.0, ("c", "min", 0.8, 0): 0.2,
              ("c_shuffled", "none", 0.0, 0): 2.0, ("c_shuffled", "min", 0.8, 0): 1.6}
    results, preds = _sweep(skills)
    out = direction_effects(results, preds.get, controls={"c": "c_shuffled"}, n_boot=400)
    v = out["c"]["versus_control"]
    assert v["control"] == "c_shuffled"
    assert v["min"]["drop_difference"] == pytest.approx(
        out["c"]["min"]["drop"] - out["c_shuffled"]["min"]["drop"])
    assert v["min"]["low"] > 0 and v["min"]["excludes_zero"] is True
    assert v["max"]["drop_difference"] is None  # no promoting trials
    # a control as costly as the condition: the difference's interval holds zero
    preds["c_shuffled-min-a0.8-b1-s0"] = preds["c-min-a0.8-b1-s0"]
    preds["c_shuffled-none-a0-b1-s0"] = preds["c-none-a0-b1-s0"]
    out = direction_effects(results, preds.get, controls={"c": "c_shuffled"}, n_boot=400)
    v = out["c"]["versus_control"]["min"]
    assert v["low"] == pytest.approx(0.0, abs=1e-9) and v["high"] == pytest.approx(0.0, abs=1e-9)


def test_control_is_compared_like_with_like():
    """The condition runs alphas 0.4 and 0.8, its control only 0.8: the difference is over the
    shared configuration (alpha 0.8) alone, not the condition's mean over both alphas."""
    skills = {("c", "none", 0.0, 0): 2.0, ("c", "min", 0.4, 0): 0.2, ("c", "min", 0.8, 0): 1.5,
              ("c_shuffled", "none", 0.0, 0): 2.0, ("c_shuffled", "min", 0.8, 0): 1.5}
    results, preds = _sweep(skills)
    out = direction_effects(results, preds.get, controls={"c": "c_shuffled"}, n_boot=200)
    perf = {r["trial_id"]: r["performance"] for r in results.to_pylist()}
    want = 100 * ((perf["c-none-a0-b1-s0"] - perf["c-min-a0.8-b1-s0"])
                  - (perf["c_shuffled-none-a0-b1-s0"] - perf["c_shuffled-min-a0.8-b1-s0"]))
    v = out["c"]["versus_control"]["min"]
    assert v["configurations"] == 1
    assert v["drop_difference"] == pytest.approx(want, abs=1e-9)


def test_seeds_widen_the_interval_and_are_named():
    """With two seeds per configuration that disagree, resampling seeds adds their spread:
    the interval is wider than with either seed alone."""
    one = {("c", "none", 0.0, 0): 2.0, ("c", "min", 0.8, 0): 1.0}
    two = {**one, ("c", "none", 0.0, 1): 2.0, ("c", "min", 0.8, 1): 1.9}
    r1, p1 = _sweep(one)
    r2, p2 = _sweep(two)
    a = direction_effects(r1, p1.get, n_boot=600)["c"]
    b = direction_effects(r2, p2.get, n_boot=600)["c"]
    assert b["seeds"] == 2 and "seeds of each configuration (2)" in b["over"]
    assert b["min"]["high"] - b["min"]["low"] > a["min"]["high"] - a["min"]["low"]


def test_a_side_missing_a_seed_is_compared_with_its_own_seeds_baseline():
    """Two baseline seeds far apart, the suppressing side finished for seed 0 only (an
    interrupted run): its drop is against seed 0's baseline, as results.parquet's
    degradation is, not against the mean of both seeds (which passed seed 1's training
    noise off as an effect). Balanced seeds give the baselines' mean minus the side's."""
    skills = {("c", "none", 0.0, 0): 2.0, ("c", "none", 0.0, 1): 0.4,
              ("c", "min", 0.8, 0): 1.8, ("c", "max", 0.8, 0): 2.2, ("c", "max", 0.8, 1): 0.6}
    results, preds = _sweep(skills)
    perf = {r["trial_id"]: r["performance"] for r in results.to_pylist()}
    out = direction_effects(results, preds.get, n_boot=300)["c"]
    want = 100 * (perf["c-none-a0-b1-s0"] - perf["c-min-a0.8-b1-s0"])
    assert out["min"]["drop"] == pytest.approx(want, abs=1e-9)
    pooled = 100 * ((perf["c-none-a0-b1-s0"] + perf["c-none-a0-b1-s1"]) / 2
                    - perf["c-min-a0.8-b1-s0"])
    assert abs(want - pooled) > 5  # the old number, far from the paired one
    both = (perf["c-none-a0-b1-s0"] + perf["c-none-a0-b1-s1"]
            - perf["c-max-a0.8-b1-s0"] - perf["c-max-a0.8-b1-s1"]) / 2
    assert out["max"]["drop"] == pytest.approx(100 * both, abs=1e-9)
    assert out["min"]["low"] <= out["min"]["drop"] <= out["min"]["high"]
    assert "seeds of each configuration (1 to 2), each trial against the baseline of its own " \
        "seed" in out["over"]
    # the alignment change is paired the same way (all alignments equal here: exact)
    assert out["min"]["alignment_change"] == pytest.approx(-0.1)


def test_missing_predictions_give_point_values_and_say_so():
    results, preds = _sweep({("c", "none", 0.0, 0): 2.0, ("c", "min", 0.8, 0): 0.5})
    del preds["c-min-a0.8-b1-s0"]
    out = direction_effects(results, preds.get, n_boot=100)["c"]
    assert out["min"]["drop"] > 0 and out["min"]["low"] is None
    assert out["min"]["excludes_zero"] is None
    assert "c-min-a0.8-b1-s0" in out["message"]


def test_no_baseline_no_drop():
    results, preds = _sweep({("c", "min", 0.8, 0): 0.5, ("c", "max", 0.8, 0): 1.0})
    out = direction_effects(results, preds.get, n_boot=100)["c"]
    assert out["min"]["drop"] is None and "no finished baseline" in out["message"]


def test_console_lines_bracket_the_number_they_print():
    """A gain is printed as a positive number: its interval is the drop's, negated (it used to
    be printed unnegated, so 'gains 7.4 (95 % CI -14.4 to -1.7)' excluded its own point)."""
    from dashboards.effects import summary_lines

    effects = {"c": {"performance_metric": "map",
                     "min": {"drop": 0.5, "low": -0.25, "high": 1.25},
                     "max": {"drop": -7.4, "low": -14.4, "high": -1.7}}}
    (line,) = summary_lines(effects)
    assert line == ("c: suppressing alignment costs 0.5 mAP points (95 % CI -0.2 to 1.2); "
                    "promoting alignment gains 7.4 mAP points (95 % CI 1.7 to 14.4)")
