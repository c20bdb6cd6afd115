"""The shared trainable: metrics, config, grouping, resume, divergence, and the mechanism."""

from __future__ import annotations

import json
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from references.datasets import (
    VoxelResponses,
    simulated_nsd_bundle,
    simulated_single_label_bundle,
)
from references.gabor import GaborReference
from trainable.alignment import linear_alignment_heldout
from trainable.config import TrialConfig
from trainable.data import BatchFeed, TrialData, decode, flip_mask, normalize
from trainable.models import build_model
from trainable.train import (
    PREDICTIONS_ARTIFACT,
    LocalHooks,
    TrialDiverged,
    accuracy,
    alignment_loss_fn,
    batch_alignment,
    mean_average_precision,
    train,
    train_one_epoch,
    training_schedule,
    validation_alignment,
)

TINY = dict(model="alexnet", layer="conv1", image_size=64, width=0.25, batch_size=32,
            epochs=1, val_images=40, val_folds=4, threads=2, lr=1e-3)


@pytest.fixture(scope="module")
def single_label() -> TrialData:
    bundle = simulated_single_label_bundle(image_size=64, n_categories=4, n_train_per_class=40,
                                           n_val_per_class=15, seed=3)
    return TrialData.from_bundle(bundle, "simulated single-label (test)")


@pytest.fixture(scope="module")
def nsd_like():
    bundle = simulated_nsd_bundle(roi="V1", image_size=64, n_images=240, n_subjects=2,
                                  trials_per_session=120, seed=4)
    return TrialData.from_bundle(bundle, "simulated NSD (test)"), bundle.responses


# ----------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_map_equals_sklearn_macro_average_precision(seed):
    rng = np.random.default_rng(seed)
    targets = (rng.random((60, 12)) < 0.2).astype(np.float32)
    targets[:, 5] = 0  # a class absent from the evaluation set is left out
    scores = np.round(rng.random((60, 12)), 1)  # coarse scores: many ties
    present = targets.sum(0) > 0
    expect = average_precision_score(targets[:, present], scores[:, present], average="macro")
    assert mean_average_precision(scores, targets) == pytest.approx(expect, abs=1e-6)


def test_map_without_positives_is_an_error():
    with pytest.raises(ValueError, match="no class has a positive"):
        mean_average_precision(np.random.rand(5, 3), np.zeros((5, 3)))


def test_map_of_nan_scores_or_mismatched_shapes_is_an_error_not_a_number():
    """NaN scores on every positive gave an mAP of 1.0 (scikit-learn refuses them); a 1-D or
    mismatched pair failed with an IndexError."""
    rng = np.random.default_rng(0)
    targets = (rng.random((100, 5)) < 0.3).astype(float)
    scores = rng.standard_normal((100, 5))
    scores[targets > 0] = np.nan
    with pytest.raises(ValueError, match=r"^scores hold 1\d\d NaN or infinite values; "
                                         r"expected finite scores"):
        mean_average_precision(scores, targets)
    with pytest.raises(ValueError, match=r"^scores \(100,\) and targets \(100, 5\): expected "
                                         r"two \(n_images, n_classes\) arrays of one shape"):
        mean_average_precision(scores[:, 0], targets)


def test_topk_accuracy():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5]])
    acc = accuracy(logits, torch.tensor([1, 2, 1]), (1, 2))
    assert acc == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3)}


def test_topk_counts_tied_logits_at_chance_whatever_the_class_order():
    """torch.topk picks among tied logits by position: a constant network scored top-1 0.03
    or 0.57 on a set whose majority class sat at one index or another, where chance is 0.1.
    Ties now count in expectation (the target's share of the places the tie takes)."""
    targets = torch.tensor([9] * 8 + [0, 3])
    flat = torch.zeros(10, 10)
    acc = accuracy(flat, targets, (1, 5, 20))
    assert acc == {1: pytest.approx(0.1), 5: pytest.approx(0.5), 20: pytest.approx(1.0)}
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0],   # target 1 tied with 2 others, 1 above
                           [2.0, 2.0, 5.0, 0.0, 0.0]])  # target 0 tied with 1, 1 above
    acc = accuracy(logits, torch.tensor([1, 0]), (1, 2, 3))
    assert acc == {1: 0.0, 2: pytest.approx((1 / 3 + 1 / 2) / 2), 3: pytest.approx((2 / 3 + 1) / 2)}


class _Lookup(torch.nn.Module):
    """Outputs ``table[i]`` for the image whose first two pixels encode i (base 256)."""

    def __init__(self, table) -> None:
        super().__init__()
        self.table = torch.as_tensor(table, dtype=torch.float32)
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        from trainable.data import IMAGENET_MEAN, IMAGENET_STD

        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        raw = torch.round((x.float() * std + mean) * 255)
        return self.table[(raw[:, 0, 0, 0] * 256 + raw[:, 1, 0, 0]).long()] + 0 * self.p


def _evaluate_table(table, targets, task):
    import types

    from trainable.data import BatchFeed, TensorSplit, sequential_schedule
    from trainable.train import evaluate

    n = len(table)
    images = torch.zeros((n, 3, 2, 2), dtype=torch.uint8)
    images[:, 0, 0, 0], images[:, 1, 0, 0] = torch.arange(n) // 256, torch.arange(n) % 256
    split = TensorSplit(images, torch.as_tensor(targets), torch.arange(n))
    feed = BatchFeed(split, schedule=sequential_schedule(n, 7), workers=0,
                     device=torch.device("cpu"), image_size=2)
    record: dict = {}
    out = evaluate(_Lookup(table), feed, 0, task, types.SimpleNamespace(precision="fp32"),
                   torch.device("cpu"), record)
    return out, record


def test_map_ranks_the_logits_not_their_saturated_sigmoid():
    """float32 sigmoid is 1.0 for every logit above about 17: logits 40, 30, 20, -5 with
    positives at 40 and -5 scored mAP 0.42 (three tied at 1.0) where their ranking gives
    0.75; the saved predictions carried the same ties."""
    from dashboards.effects import Predictions, performance

    table = np.array([[40.0], [30.0], [20.0], [-5.0]])
    targets = np.array([[1.0], [0.0], [0.0], [1.0]])
    out, record = _evaluate_table(table, targets, "multi_label")
    assert out["val_map"] == pytest.approx(0.75)
    assert mean_average_precision(table, targets) == pytest.approx(0.75)
    predictions = Predictions(record["image_ids"], scores=record["scores"],
                              targets=record["targets"])
    assert float(performance(predictions, np.ones((1, 4)))[0]) == pytest.approx(0.75)


def test_a_bf16_trial_is_evaluated_on_its_heads_float32_outputs():
    """Under bf16 autocast the classifier's outputs keep 8 significant bits: every score the
    predictions artifact saved was a bf16 value, and mAP ranked their ties. The head now runs
    in float32 at evaluation (from the same bf16 features); float32 trials are unchanged."""
    import types

    from trainable.data import BatchFeed, TensorSplit, sequential_schedule
    from trainable.models import build_model
    from trainable.train import evaluate

    torch.manual_seed(0)
    n, classes = 48, 12
    images = torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8)
    targets = (torch.rand(n, classes) < 0.3).to(torch.uint8)
    split = TensorSplit(images, targets, torch.arange(n))
    feed = BatchFeed(split, schedule=sequential_schedule(n, 16), workers=0,
                     device=torch.device("cpu"), image_size=64)
    model = build_model("alexnet", num_classes=classes, width=0.25, seed=0)

    def scores(precision, epoch):
        record: dict = {}
        evaluate(model, feed, epoch, "multi_label", types.SimpleNamespace(precision=precision),
                 torch.device("cpu"), record)
        return torch.from_numpy(record["scores"])

    bf16 = scores("bf16", 0)
    exact_in_bf16 = (bf16.to(torch.bfloat16).float() == bf16).float().mean()
    assert exact_in_bf16 < 0.2, f"{float(exact_in_bf16):.0%} of the scores are bf16 values"
    fp32 = scores("fp32", 1)
    assert torch.allclose(bf16, fp32, rtol=0.05, atol=0.05)  # the same network
    with model.head_in_float32():
        plain = model(torch.zeros(2, 3, 64, 64))
    assert torch.equal(plain, model(torch.zeros(2, 3, 64, 64)))  # float32: no change


def test_non_finite_outputs_are_a_diverged_trial_not_a_score():
    """Weights turned NaN by the last step (the loss before it was finite) gave top-1 1.0 (topk
    takes NaN as the largest) or a row-order-dependent mAP."""
    table = np.zeros((6, 4))
    table[2, 1] = np.nan
    for task, targets in (("single_label", np.arange(6) % 4),
                          ("multi_label", np.eye(4)[np.arange(6) % 4])):
        with pytest.raises(TrialDiverged, match=r"non-finite outputs on the validation images "
                                                r"after epoch 0"):
            _evaluate_table(table, targets, task)


# ----------------------------------------------------------------------------- config


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match=r"unknown trial config keys \['lerning_rate'\]"):
        TrialConfig.from_dict({"lerning_rate": 0.1})
    with pytest.raises(ValueError, match=r"layer='conv9'; accepted: for alexnet: conv1, conv2"):
        TrialConfig(layer="conv9")
    with pytest.raises(ValueError, match=r"lr=-0.1; accepted: a positive number"):
        TrialConfig(lr=-0.1)
    with pytest.raises(ValueError, match=r"loss_folds=1; accepted: 0 \(exact leave-one-out\)"):
        TrialConfig(loss_folds=1)
    with pytest.raises(ValueError, match=r"reference='fmri'; accepted: gabor, pretrained, nsd"):
        TrialConfig(reference="fmri")
    with pytest.raises(ValueError, match=r"rectify='yes'; accepted: true or false"):
        TrialConfig(rectify="yes")
    with pytest.raises(ValueError, match=r"align_batch_every=-1; accepted: an integer in "
                                         r"0\.\.1000000"):
        TrialConfig(align_batch_every=-1)
    assert TrialConfig.from_dict({"epochs": 3.0, "alpha": 1}).epochs == 3
    # the held-out ridge's settings: a penalty too small to compute, and settings that other
    # metrics' losses ignore (they were accepted and recorded as if applied)
    with pytest.raises(ValueError, match=r"ridge_rel=1e-07; accepted: a number >= 1e-06 "):
        TrialConfig(ridge_rel=1e-7)
    assert TrialConfig(ridge_rel=1e-6).ridge_rel == 1e-6
    with pytest.raises(ValueError, match=r"^loss_folds=4; accepted: 0 with metric='cka' "):
        TrialConfig(metric="cka", loss_folds=4)
    with pytest.raises(ValueError, match=r"^ridge_rel=0\.5; accepted: 0\.1 with metric='rsa' "):
        TrialConfig(metric="rsa", ridge_rel=0.5)
    assert TrialConfig(metric="cka").loss_folds == 0


@pytest.mark.parametrize("name", ["alpha", "beta"])
def test_a_weight_the_float32_loss_would_multiply_as_zero_is_refused(name):
    """A weight below float32's normal range is 0 (or a few bits) in the float32 loss: the
    trial would run the baseline while its records call it promoting or suppressing."""
    tiny = float(np.finfo(np.float32).tiny)
    assert float(torch.tensor(1e-320, dtype=torch.float32)) == 0  # what refusing it avoids
    for value in (1e-320, tiny / 2 if name == "beta" else -tiny / 2):
        with pytest.raises(ValueError, match=rf"{name}={value!r}; accepted: 0 or a number of "
                                             r"magnitude 1\.175e-38\.\.1e\+06"):
            TrialConfig(**{name: value, ("beta" if name == "alpha" else "alpha"): 1.0})
    for value in (tiny, -tiny, 1e-30):
        if name == "beta" and value < 0:
            continue
        assert getattr(TrialConfig(**{name: value}), name) == value


# ----------------------------------------------------------------------------- grouping


def test_mixed_subject_batch_averages_per_subject_scores():
    g = torch.Generator().manual_seed(0)
    ids = torch.arange(40)
    # subject 1 saw the even images, subject 2 images 0..29; voxel counts differ
    per_subject = {
        1: (ids[::2], torch.randn(20, 7, generator=g)),
        2: (ids[:30], torch.randn(30, 11, generator=g)),
    }
    responses = VoxelResponses(per_subject)
    batch_ids = torch.tensor([3, 0, 35, 8, 2, 12, 31, 14, 6, 20, 5, 10, 22, 4, 18, 16])
    feats = torch.randn(len(batch_ids), 6, 3, 3, generator=g)
    cfg = TrialConfig(reference="nsd")
    groups = list(responses.targets(None, batch_ids).values())
    got = batch_alignment(feats, groups, alignment_loss_fn(cfg), cfg)
    expect = []
    for sid, y in per_subject.values():
        rows = [i for i, b in enumerate(batch_ids.tolist()) if b in sid.tolist()]
        yy = y[[sid.tolist().index(int(batch_ids[r])) for r in rows]]
        expect.append(linear_alignment_heldout(feats[rows].flatten(1), yy))
    assert float(got) == pytest.approx(float(torch.stack(expect).mean()), abs=1e-6)
    # the gradient reaches every row once per group holding it (images 0, 2, ... are in both
    # groups), as indexing each group gives it
    leaf = feats.clone().requires_grad_(True)
    batch_alignment(leaf, groups, alignment_loss_fn(cfg), cfg).backward()
    ref = feats.clone().requires_grad_(True)
    torch.stack([linear_alignment_heldout(ref[rows].flatten(1), y)
                 for rows, y in groups]).mean().backward()
    assert leaf.grad.abs().sum() > 0
    torch.testing.assert_close(leaf.grad, ref.grad, rtol=1e-5, atol=1e-7)
    # a subject with too few images in the batch is skipped, not scored on 2 samples
    few = list(responses.targets(None, torch.tensor([0, 2, 31, 33])).values())
    assert batch_alignment(feats[:4], few, alignment_loss_fn(cfg), cfg) is None


class _SeenImages(GaborReference):
    """The Gabor reference, keeping a copy of every batch of images it is shown."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def representation(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append(images.detach().clone())
        return super().representation(images)


def _one_epoch_seen(data: TrialData, cfg: TrialConfig, epoch: int = 2):
    """One epoch of train_one_epoch with augment "flip" (epoch ``epoch``); returns the
    reference that saw its images, the epoch's index batches and the epoch's metrics."""
    train_split = decode(data.train)
    reference = _SeenImages()
    model = build_model("alexnet", num_classes=data.num_classes, width=cfg.width, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    schedule = training_schedule(len(train_split), cfg)
    feed = BatchFeed(train_split, schedule=schedule, workers=0, device=torch.device("cpu"),
                     image_size=cfg.image_size, first_epoch=epoch)
    metrics = train_one_epoch(model, optimizer, feed, reference, cfg, data.task, epoch,
                              torch.device("cpu"), "flip")
    return reference, train_split, schedule(epoch)[0], metrics


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_flip_augmentation_flips_exactly_the_masked_images(single_label, alpha):
    """What the network and an image-computed reference see under augment "flip": the
    epoch's batches, normalised, with exactly ``flip_mask``'s rows mirrored left-right."""
    cfg = TrialConfig(**{**TINY, "reference": "gabor", "alpha": alpha, "align_batch_every": 1})
    reference, train_split, batches, _ = _one_epoch_seen(single_label, cfg)
    assert len(reference.seen) == len(batches) > 1
    flipped = 0
    for step, (idx, seen) in enumerate(zip(batches, reference.seen, strict=True)):
        expect = normalize(train_split.images[idx])
        mask = flip_mask(len(idx), cfg.seed, 2, step)
        expect[mask] = expect[mask].flip(-1)
        assert torch.equal(seen, expect)
        flipped += int(mask.sum())
    assert 0 < flipped < sum(len(i) for i in batches)


@pytest.mark.parametrize("every", [0, 1, 2, 1000])
def test_alpha_zero_measures_the_batch_alignment_on_every_kth_step_of_an_epoch(single_label,
                                                                            every):
    """At alpha = 0 the reference is computed (and the batch alignment measured) on steps
    0, k, 2k, ... of each epoch; k = 0 never (the epoch's batch_alignment is then NaN)."""
    cfg = TrialConfig(**{**TINY, "reference": "gabor", "alpha": 0.0, "batch_size": 16,
                         "align_batch_every": every})
    reference, _, batches, metrics = _one_epoch_seen(single_label, cfg)
    measured = [] if every == 0 else list(range(0, len(batches), every))
    assert len(batches) >= 4 and len(reference.seen) == len(measured)
    for step, seen in zip(measured, reference.seen, strict=True):
        assert seen.shape[0] == len(batches[step])
    assert np.isnan(metrics["batch_alignment"]) == (every == 0)
    assert np.isnan(metrics["align_loss"]) == (every == 0)


def test_rectify_aligns_the_relu_of_the_layer_and_pool_averages_it():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(24, 6, 15, 15, generator=g, requires_grad=True)
    y = torch.randn(24, 9, generator=g)
    groups = [(torch.arange(24), y)]
    plain = TrialConfig(reference="nsd")
    rect = TrialConfig(reference="nsd", rectify=True, pool=8)
    score = alignment_loss_fn(plain)
    got = batch_alignment(feats, groups, score, rect)
    with torch.no_grad():
        relu_pooled = torch.nn.functional.adaptive_avg_pool2d(torch.relu(feats), 8)
        expected = float(score(relu_pooled.flatten(1), y))
        unrectified = float(batch_alignment(feats, groups, score, plain))
    assert float(got.detach()) == pytest.approx(expected, abs=1e-6)
    assert float(got.detach()) != pytest.approx(unrectified, abs=1e-3)
    got.backward()  # still differentiable, and only through the units ReLU lets pass
    assert feats.grad is not None and float(feats.grad[feats < 0].abs().max()) == 0.0
    assert float(feats.grad[feats > 0].abs().max()) > 0.0


@pytest.mark.parametrize("kind", ["pretrained", "gabor", "nsd"])
def test_rectify_rectifies_a_network_reference_with_the_layer_and_nothing_else(kind):
    """A pretrained reference is a network tapped as the trainee is: with rectify, ReLU of the
    trainee's tap was aligned against the frozen network's pre-ReLU tap (60 % of its values
    negative at AlexNet conv5). Now post-ReLU against post-ReLU, in training and in the
    validation's targets; a Gabor bank's or voxels' responses stay as they are."""
    from trainable.train import _reference_features

    g = torch.Generator().manual_seed(2)
    feats = torch.randn(24, 6, 5, 5, generator=g)
    y = torch.randn(24, 4, 5, 5, generator=g)
    cfg = TrialConfig(reference=kind, rectify=True)
    score = alignment_loss_fn(cfg)
    got = float(batch_alignment(feats, [(torch.arange(24), y)], score, cfg))
    want_y = torch.relu(y) if kind == "pretrained" else y
    assert got == pytest.approx(float(score(torch.relu(feats).flatten(1),
                                            want_y.flatten(1))), abs=1e-6)
    assert torch.equal(_reference_features(y, cfg), want_y)
    assert torch.equal(_reference_features(y, TrialConfig(reference=kind)), y)


# ----------------------------------------------------------------------------- the trial


def _run(config, data, reference, tmp_path, resume_from=None):
    hooks = LocalHooks(tmp_path, resume_from=resume_from)
    final = train(config, data=data, reference=reference, hooks=hooks)
    return final, hooks


def test_the_steps_a_small_voxel_batch_trains_on_the_task_alone_are_counted(nsd_like, tmp_path):
    """With NSD and a batch of 4, a step where no subject has the 3 rows the held-out score
    needs trains on the task alone (the alignment is averaged over the groups that can be
    scored). Nothing said how many: align_steps of train_steps says it, per epoch."""
    from trainable.train import reference_groups, training_schedule

    data, responses = nsd_like
    ids = data.train.image_ids

    def scorable(batches):
        return [any(rows.numel() >= 3 for rows, _ in
                    reference_groups(responses, None, ids[b]).values()) for b in batches]

    for seed in range(50):  # a seed whose first batch can be scored (else it is refused)
        cfg = TrialConfig(**{**TINY, "reference": "nsd", "alpha": 0.5, "batch_size": 4,
                             "seed": seed})
        batches, _ = training_schedule(len(data.train), cfg)(0)
        ok = scorable(batches)
        if ok[0]:
            break
    scored = sum(ok)
    assert 0 < scored < len(batches)  # the case: some steps carry the term, some do not
    final, _ = _run(cfg.asdict(), data, responses, tmp_path)
    assert (final["train_steps"], final["align_steps"]) == (len(batches), scored)
    # alpha = 0 measures one step in align_batch_every (10): those are the ones counted
    final, _ = _run({**cfg.asdict(), "alpha": 0.0, "batch_size": 32}, data, responses,
                    tmp_path / "baseline")
    assert final["align_steps"] == -(-final["train_steps"] // 10)


def test_a_first_batch_no_group_can_score_refuses_the_trial_only_if_the_whole_epoch_cannot(
        nsd_like, tmp_path):
    """The trial was judged by its first batch alone, so the same settings failed or trained
    by seed (loss_folds=10: seed 6 refused, seeds 0-5 trained on 18-23 of 25 steps). For voxel
    data the first epoch's batches are judged: refused only when none can be scored."""
    from trainable.train import reference_groups, training_schedule

    data, responses = nsd_like
    ids = data.train.image_ids
    for seed in range(200):  # a seed whose first batch cannot be scored, but some later one
        cfg = TrialConfig(**{**TINY, "reference": "nsd", "alpha": 0.5, "batch_size": 4,
                             "seed": seed, "steps_per_epoch": 12})
        batches, _ = training_schedule(len(data.train), cfg)(0)
        ok = [any(rows.numel() >= 3 for rows, _ in
                  reference_groups(responses, None, ids[b]).values()) for b in batches]
        if not ok[0] and any(ok):
            break
    final, _ = _run(cfg.asdict(), data, responses, tmp_path)
    assert (final["train_steps"], final["align_steps"]) == (len(batches), sum(ok))
    # no batch of the epoch holds a group of 2 * 8 rows (at most 14 here): refused before
    # the first step
    with pytest.raises(ValueError, match=r"^loss_folds=8 needs 16 rows of a reference group "
                                         r"\(subject\) in a batch, but the first epoch's 12 "
                                         r"batches' groups hold at most 1\d rows \(batch_size="
                                         r"16\): the alignment term would apply to no group of "
                                         r"batches like them; accepted: loss_folds=0"):
        _run({**cfg.asdict(), "batch_size": 16, "loss_folds": 8}, data, responses,
             tmp_path / "refused")


def test_a_metric_undefined_on_every_batch_of_the_first_epoch_refuses_the_trial(
        single_label, tmp_path):
    """RSA of a layer pooled to one unit has no value on any batch: a promoting trial trained
    on the task alone and finished "done" with align_steps 0. Refused after the first epoch,
    naming why."""
    from references import build_reference

    cfg = {**TINY, "reference": "gabor", "metric": "rsa", "alpha": 0.5, "width": 0.01,
           "pool": 1, "steps_per_epoch": 2}
    with pytest.raises(ValueError, match=r"^alpha=0.5: the alignment term applied to no step "
                                         r"of the first epoch \(2 steps; the last skipped: "
                                         r".*\); accepted: a layer, pool and metric \(rsa\)"):
        _run(cfg, single_label, build_reference("gabor"), tmp_path)


def test_nsd_trial_reports_every_metric_and_writes_filters(nsd_like, tmp_path):
    data, responses = nsd_like
    cfg = dict(TINY, reference="nsd", alpha=0.5, epochs=2)
    final, hooks = _run(cfg, data, responses, tmp_path)
    assert [m["epoch"] for m in hooks.history] == [0.0, 1.0]
    for key in ("task_loss", "align_loss", "batch_alignment", "val_performance", "val_map",
                "val_alignment", "val_cka", "val_rsa", "epoch_seconds", "images_per_second",
                "dead_units", "data_wait_seconds", "val_alignment_nc"):
        assert key in final and np.isfinite(final[key]), key
    assert 0.0 <= final["dead_units"] <= 1.0
    assert 0.0 < final["val_map"] <= 1.0
    # images of the fixed validation subset, not subject-image pairs (subjects share images)
    from trainable.train import validation_subset

    groups = responses.groups(validation_subset(data.val, 40).image_ids).values()
    counted = [rows for rows, _ in groups if rows.numel() >= 2 * TINY["val_folds"]]
    assert final["val_alignment_images"] == torch.unique(torch.cat(counted)).numel()
    assert final["val_alignment_images"] <= 40 < sum(r.numel() for r in counted)
    # what the trial resolved, beside its params (Ray's trials tag their MLflow run with it)
    subjects = ", ".join(f"subject {s}: {n}" for s, n in responses.n_voxels.items())
    assert hooks.facts["reference"] == f"voxels of V1 ({subjects})"
    assert (hooks.facts["device"], hooks.facts["precision"]) == ("cpu", "float32")
    assert hooks.facts["threads"] == "2" and hooks.facts["val_split"].startswith(
        f"{len(data.val)} images, ")
    # what the trainable reports is what records names (and the post-processor reads)
    import records

    assert set(final) - {"epoch"} <= set(records.EPOCH_METRICS), set(final) - set(
        records.EPOCH_METRICS)
    png = tmp_path / "artifacts" / "conv1_filters.png"
    assert png.stat().st_size > 1000
    assert json.loads((tmp_path / "artifacts" / "final_metrics.json").read_text()) == final
    # the per-image outcome behind the report's paired intervals reproduces the reported mAP
    with np.load(tmp_path / "artifacts" / PREDICTIONS_ARTIFACT) as z:
        assert z["scores"].shape == z["targets"].shape == (len(data.val), z["scores"].shape[1])
        assert len(set(z["image_ids"].tolist())) == len(data.val)
        assert mean_average_precision(z["scores"], z["targets"]) == pytest.approx(
            final["val_map"], abs=1e-12)


def test_each_epoch_reports_what_it_measured_where_settings_ask_for_more(single_label,
                                                                         tmp_path):
    """val_images above the validation split, steps_per_epoch below the split's steps, pool
    above conv1's 15 x 15 map: the params say what was asked, the metrics what ran."""
    cfg = dict(TINY, reference="gabor", val_images=1000, steps_per_epoch=3, pool=64)
    final, _ = _run(cfg, single_label, GaborReference(), tmp_path)
    assert len(single_label.val) == 60 and len(single_label.train) // 32 > 3
    assert final["train_images"] == 3 * 32  # three steps of 32, not the split's five
    assert final["val_alignment_images"] == 60  # the whole split, not 1000
    assert final["layer_units"] == 16 * 15 * 15  # width 0.25: 16 channels, unpooled


def test_resume_is_bit_exact(nsd_like, tmp_path):
    """2 epochs straight == 1 epoch, checkpoint, restore, 1 epoch (CPU)."""
    data, responses = nsd_like
    cfg = dict(TINY, reference="nsd", alpha=0.5, epochs=2)
    straight, hooks_a = _run(cfg, data, responses, tmp_path / "a")
    _, hooks_b = _run(dict(cfg, epochs=1), data, responses, tmp_path / "b")
    resumed, hooks_c = _run(cfg, data, responses, tmp_path / "c",
                            resume_from=hooks_b.checkpoints[-1])
    assert [m["epoch"] for m in hooks_c.history] == [1.0]
    timing = ("epoch_seconds", "images_per_second", "data_wait_seconds")
    assert {k: v for k, v in resumed.items() if k not in timing} == {
        k: v for k, v in straight.items() if k not in timing
    }
    a = torch.load(hooks_a.checkpoints[-1] / "checkpoint.pt", weights_only=False)["model"]
    c = torch.load(hooks_c.checkpoints[-1] / "checkpoint.pt", weights_only=False)["model"]
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)


def test_a_trials_checkpoint_is_written_in_the_process_scratch_folder(nsd_like, tmp_path):
    """Each epoch's checkpoint is written where a killed trial's is found and removed by the
    next one (records.scratch): inside this process's held scratch folder, not loose in /tmp."""
    from records.scratch import scratch_dir

    data, responses = nsd_like
    seen: list[Path] = []

    class Seen(LocalHooks):
        def report(self, metrics, checkpoint_dir):
            seen.append(Path(checkpoint_dir))
            super().report(metrics, checkpoint_dir)

    train(dict(TINY, reference="nsd", alpha=0.5, epochs=1), data=data, reference=responses,
          hooks=Seen(tmp_path))
    assert [p.parent for p in seen] == [scratch_dir()] and not seen[0].exists()


def test_resume_refuses_a_checkpoint_of_another_config(nsd_like, tmp_path):
    data, responses = nsd_like
    cfg = dict(TINY, reference="nsd", alpha=0.5)
    _, hooks = _run(cfg, data, responses, tmp_path / "a")
    with pytest.raises(ValueError, match=r"different config \(differs in \['alpha'\]\)"):
        _run(dict(cfg, alpha=-0.5), data, responses, tmp_path / "b",
             resume_from=hooks.checkpoints[-1])


def test_divergence_stops_with_epoch_and_step_and_reports_nothing(single_label, tmp_path):
    # Adam moves every weight by ~lr per step: lr=1000 (the largest accepted) makes the logits
    # overflow on step 1.
    hooks = LocalHooks(tmp_path)
    with pytest.raises(TrialDiverged, match=r"non-finite loss \(nan\) at epoch 0 step 1"):
        train(dict(TINY, reference="gabor", lr=1000.0), data=single_label,
              reference=GaborReference(), hooks=hooks)
    assert hooks.history == [] and hooks.checkpoints == []


def test_a_float32_trial_on_cuda_convolves_in_ieee_float32():
    """cuDNN's default runs float32 convolutions in TF32: a trial that asked for fp32 on an
    A100 or H100 was recorded as float32 and was not. The setting is made per trial (a reused
    worker runs bf16 trials too); on the CPU nothing is touched. Checked without a GPU: the
    device is only named, and the flags are torch's own, which its CUDA kernels read.

    Every float32 matmul is IEEE in either kind of trial, the Gram block's TF32 included
    once the block ends, whatever ran before in the worker: the trial set only cuDNN's
    backend-wide setting, which matmuls inherit (a bf16 trial's float32 head ran in TF32),
    and the Gram block wrote the inherited "tf32" back as the matmul setting, so an fp32
    trial after a bf16 one ran its linear layers in TF32."""
    import trainable.alignment as alignment
    from trainable.train import _float32_convolutions

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = (cudnn.fp32_precision, cudnn.conv.fp32_precision, matmul.fp32_precision)
    cuda = torch.device("cuda")
    try:
        _float32_convolutions(TrialConfig(precision="fp32"), torch.device("cpu"))
        assert (cudnn.fp32_precision, cudnn.conv.fp32_precision,
                matmul.fp32_precision) == before
        _float32_convolutions(TrialConfig(precision="fp32"), cuda)
        assert (cudnn.conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
        for first, second in (("bf16", "fp32"), ("fp32", "bf16"), ("bf16", "bf16")):
            _float32_convolutions(TrialConfig(precision=first), cuda)
            with alignment._gram_products(cuda):
                assert matmul.fp32_precision == "tf32"
            assert matmul.fp32_precision == "ieee"
            _float32_convolutions(TrialConfig(precision=second), cuda)
            assert cudnn.conv.fp32_precision == ("tf32" if second == "bf16" else "ieee")
            assert matmul.fp32_precision == "ieee", (first, second)
    finally:
        cudnn.fp32_precision = "none"
        cudnn.conv.fp32_precision, matmul.fp32_precision = before[1], before[2]
        cudnn.fp32_precision = before[0]


def test_data_prepared_at_another_size_is_refused(single_label):
    with pytest.raises(ValueError, match=r"prepared at 64 px but the config asks image_size=96"):
        train(dict(TINY, image_size=96), data=single_label, reference=GaborReference())


def test_alignment_perturbation_moves_validation_alignment(tmp_path):
    """The mechanism: with the Gabor reference at conv1, a strongly promoting alpha ends with
    higher validation alignment than alpha = 0, and a strongly suppressing alpha with lower.

    Measured on this data (10 steps of batch 32): about -0.03 / 0.08 / 0.26 for
    alpha = -20 / 0 / +20. The suppressed value sits at the floor of cross-validated R^2
    (shrinking to the training mean), which is why its margin is smaller. CKA, which the loss
    does not push, falls with the suppressing alpha (0.30 to 0.11, checked); at +20 it stays
    where it was (0.29 against 0.30 here, 0.01 either way as the world's view changed)."""
    data = TrialData.from_bundle(simulated_single_label_bundle(image_size=64)).subset(320, 250)
    base = dict(TINY, reference="gabor", epochs=1, beta=1.0, seed=0, val_images=200,
                val_folds=5)
    result = {}
    for alpha in (-20.0, 0.0, 20.0):
        final, _ = _run(dict(base, alpha=alpha), data, GaborReference(), tmp_path / str(alpha))
        result[alpha] = (final["val_alignment"], final["val_cka"])
    (lin_min, cka_min), (lin_0, cka_0), (lin_max, cka_max) = (result[a] for a in (-20, 0, 20))
    assert lin_max > lin_0 + 0.05, result
    assert lin_min < lin_0 - 0.01, result
    assert cka_0 > cka_min + 0.1, result


def test_validation_reports_the_fraction_of_dead_units_and_gives_them_no_credit():
    g = torch.Generator().manual_seed(3)
    live = torch.randn(60, 4, 3, 3, generator=g)
    dead = torch.zeros(60, 4, 3, 3)
    dead[:, 1] = 0.7  # constant but not zero: dead all the same
    feats = torch.cat([live, dead], dim=1)  # half of the 72 units constant
    y = torch.randn(60, 10, generator=g)
    groups = [(torch.arange(60), y)]
    cfg = TrialConfig(reference="nsd", val_folds=5, val_images=60)
    with_dead = validation_alignment(feats, groups, cfg)
    alone = validation_alignment(live, groups, cfg)
    assert with_dead["dead_units"] == 0.5 and alone["dead_units"] == 0.0
    assert with_dead["val_alignment"] == pytest.approx(alone["val_alignment"], abs=1e-9)


class _Payload:
    """Unpickling this runs a shell command: what a crafted checkpoint.pt would hold."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_keeps_only_its_own_devices_generator(tmp_path):
    """All visible GPUs' generator states were saved, and restoring them where fewer GPUs are
    visible raised IndexError (counted as permanent: the trial failed for good). A CPU trial
    saves none; a checkpoint in the old form (a list) still loads."""
    from trainable.train import CHECKPOINT_FILE, load_checkpoint, save_checkpoint

    cfg = TrialConfig()
    model = build_model("alexnet", num_classes=3, width=0.25, seed=0).net
    opt = torch.optim.Adam(model.parameters())
    save_checkpoint(tmp_path, model, opt, 2, cfg)
    state = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert state["cuda_rng"] is None
    state["cuda_rng"] = [torch.zeros(16, dtype=torch.uint8)] * 3  # written with 3 GPUs
    torch.save(state, tmp_path / CHECKPOINT_FILE)
    assert load_checkpoint(tmp_path, model, opt, cfg) == 3


@pytest.mark.parametrize("saved", ["one", "list", "empty list", "none"])
def test_a_cuda_trial_restores_one_generator_state_from_any_checkpoint_form(tmp_path,
                                                                            monkeypatch, saved):
    """On a CUDA trial the restore sets its own device's generator, once: from the state
    saved, or from the first of an older checkpoint's list of every visible GPU's states
    (restoring all of them where fewer GPUs are visible raised IndexError); nothing when none
    was saved. The branch runs here without a GPU: the model's device is reported as cuda:1
    and the generator setter recorded."""
    import trainable.train as train_mod

    cfg = TrialConfig()
    model = build_model("alexnet", num_classes=3, width=0.25, seed=0).net
    opt = torch.optim.Adam(model.parameters())
    train_mod.save_checkpoint(tmp_path, model, opt, 4, cfg)
    path = tmp_path / train_mod.CHECKPOINT_FILE
    state = torch.load(path, weights_only=True)
    first, other = torch.full((16,), 7, dtype=torch.uint8), torch.zeros(16, dtype=torch.uint8)
    state["cuda_rng"] = {"one": first, "list": [first, other, other], "empty list": [],
                         "none": None}[saved]
    torch.save(state, path)
    calls = []
    monkeypatch.setattr(train_mod, "_trial_device", lambda m: torch.device("cuda", 1))
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda s, device="cuda": calls.append((s.clone(), device)))
    assert train_mod.load_checkpoint(tmp_path, model, opt, cfg) == 5
    if saved in ("one", "list"):
        assert len(calls) == 1
        assert torch.equal(calls[0][0], first) and calls[0][1] == torch.device("cuda", 1)
    else:
        assert calls == []


def test_a_damaged_checkpoint_or_fewer_epochs_than_it_holds_are_one_line(tmp_path):
    """A truncated or empty checkpoint raised torch's RuntimeError (or a bare EOFError)
    naming no file; resuming with fewer epochs than the checkpoint holds returned {} having
    reported nothing. Equal epochs (a finished trial resumed) start past the end."""
    from trainable.train import CHECKPOINT_FILE, load_checkpoint, save_checkpoint

    cfg = TrialConfig(epochs=5)
    model = build_model("alexnet", num_classes=3, width=0.25, seed=0).net
    opt = torch.optim.Adam(model.parameters())
    save_checkpoint(tmp_path, model, opt, 2, cfg)
    path = tmp_path / CHECKPOINT_FILE
    with pytest.raises(ValueError, match=r"^epochs=2 but checkpoint .* holds 3 epochs already; "
                                         r"accepted: epochs >= 3$"):
        load_checkpoint(tmp_path, model, opt, TrialConfig(epochs=2))
    assert load_checkpoint(tmp_path, model, opt, TrialConfig(epochs=3)) == 3
    whole = path.read_bytes()
    for damaged in (whole[: len(whole) // 2], b""):
        path.write_bytes(damaged)
        with pytest.raises(ValueError, match=rf"^checkpoint {re.escape(str(path))} cannot be "
                                             rf"read \(.+\): a damaged or truncated copy "
                                             rf"\({len(damaged)} bytes\)$") as info:
            load_checkpoint(tmp_path, model, opt, cfg)
        assert "\n" not in str(info.value)


def test_a_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    from trainable.models import build_model
    from trainable.train import CHECKPOINT_FILE, load_checkpoint

    marker = tmp_path / "pwned"
    torch.save({"model": _Payload(marker)}, tmp_path / CHECKPOINT_FILE)
    model = build_model("alexnet", num_classes=4, width=0.125)
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="holds more than tensors and plain data; refused"):
        load_checkpoint(tmp_path, model, opt, TrialConfig())
    assert not marker.exists()
    # the same file unpickled the unsafe way would have run it: the test can fail
    torch.load(tmp_path / CHECKPOINT_FILE, weights_only=False)
    assert marker.exists()


def test_a_silent_stimulus_is_left_out_of_rsa_not_the_trial():
    """A stimulus whose units are all silent (seen in a suppressing NSD trial) has no
    correlation distance: RSA leaves it out of both RDMs. It made RSA NaN (and, with
    metric = rsa and rectify, failed the trial's training step); the linear score and CKA
    were and are reported."""
    from trainable.alignment import rsa

    g = torch.Generator().manual_seed(4)
    feats = torch.relu(torch.randn(60, 8, 2, 2, generator=g))
    feats[7] = 0.0
    y = torch.randn(60, 10, generator=g)
    groups = [(torch.arange(60), y)]
    cfg = TrialConfig(reference="nsd", val_folds=5, val_images=60)
    out = validation_alignment(feats, groups, cfg)
    keep = torch.arange(60) != 7
    assert out["val_rsa"] == pytest.approx(float(rsa(feats[keep].double().flatten(1),
                                                     y[keep].double())), abs=1e-12)
    assert np.isfinite(out["val_alignment"]) and np.isfinite(out["val_cka"])
    rcfg = TrialConfig(reference="nsd", metric="rsa", rectify=True, alpha=-0.5, batch_size=8)
    batch = torch.randn(8, 8, 2, 2, generator=g, requires_grad=True)
    with torch.no_grad():
        batch[2] = -1.0  # rectified: silent on image 2
    score = batch_alignment(batch, [(torch.arange(8), y[:8])], alignment_loss_fn(rcfg), rcfg)
    assert torch.isfinite(score)
    score.backward()
    assert torch.isfinite(batch.grad).all()


@pytest.mark.parametrize("metric", ["linear", "cka", "rsa"])
def test_validation_alignment_is_the_trials_own_metric(metric):
    """A sweep whose loss pushes CKA (or RSA) is judged by it: val_alignment, which the
    fronts, statistics and Optuna use, was linear R^2 whatever the loss. The paper's linear
    score is val_linear, always reported beside CKA and RSA."""
    from trainable.alignment import linear_alignment_scaled

    g = torch.Generator().manual_seed(5)
    feats = torch.randn(60, 6, 2, 2, generator=g)
    y = feats.flatten(1)[:, :10] @ torch.randn(10, 12, generator=g) \
        + 0.5 * torch.randn(60, 12, generator=g)
    cfg = TrialConfig(reference="nsd", metric=metric, val_folds=5, val_images=60)
    out = validation_alignment(feats, [(torch.arange(60), y)], cfg)
    x64, y64 = feats.double().flatten(1), y.double()
    assert out["val_linear"] == pytest.approx(float(
        linear_alignment_scaled(x64, y64, folds=5)), abs=1e-12)
    assert out["val_alignment"] == out[f"val_{metric}"]
    assert len({out["val_linear"], out["val_cka"], out["val_rsa"]}) == 3  # the test can fail


def test_known_answer_a_model_of_the_generating_features_reaches_the_noise_ceiling():
    """Voxels = ncsnr x signal + trial noise, averaged over 3 repeats, signal a linear function
    of 10 features. A model whose layer IS those features explains what the noise allows:
    model -> voxel R^2 / noise ceiling ~ 1; a model of unrelated features ~ 0."""
    rng = np.random.default_rng(0)
    n, v, repeats = 600, 30, 3
    feats = rng.standard_normal((n, 10))
    signal = feats @ rng.standard_normal((10, v))
    signal = (signal - signal.mean(0)) / signal.std(0)
    ncsnr = rng.uniform(0.5, 1.5, v)
    noise = rng.standard_normal((repeats, n, v)).mean(0)
    y = ncsnr * signal + noise
    ids = torch.arange(n)
    responses = VoxelResponses({1: (ids, torch.tensor(y, dtype=torch.float32))}, roi="V1",
                               ncsnr={1: torch.tensor(ncsnr)},
                               repeats={1: torch.full((n,), float(repeats))})
    cfg = TrialConfig(reference="nsd", val_folds=5, val_images=n)
    groups = [(ids, responses.responses(1))]
    nc = [responses.noise_ceilings(1, ids)]
    expected_nc = ncsnr**2 / (ncsnr**2 + 1 / repeats)
    np.testing.assert_allclose(nc[0].numpy(), expected_nc, rtol=1e-5)
    seen = validation_alignment(torch.tensor(feats), groups, cfg, nc)
    assert 0.9 < seen["val_alignment_nc"] < 1.1, seen
    blind = validation_alignment(torch.randn(n, 10, generator=torch.Generator().manual_seed(1)),
                                 groups, cfg, nc)
    assert abs(blind["val_alignment_nc"]) < 0.1, blind
    assert "val_alignment_nc" not in validation_alignment(torch.tensor(feats), groups, cfg)
    # voxels constant over the images (outside the brain: betas 0, ncsnr 0) have no weight in
    # the R^2 and none in the ceiling (averaged in, 10 such voxels of 40 raised the score by
    # a third)
    dead = torch.cat([groups[0][1], torch.zeros(n, 10)], 1)
    dead_nc = torch.cat([nc[0], torch.zeros(10)])
    with_dead = validation_alignment(torch.tensor(feats), [(ids, dead)], cfg, [dead_nc])
    assert with_dead["val_linear"] == pytest.approx(seen["val_linear"], abs=1e-9)
    assert with_dead["val_alignment_nc"] == pytest.approx(seen["val_alignment_nc"], abs=1e-9)
    # the negative control's ceilings are its reference's
    from trainable.train import ShuffledReference, _group_ceilings

    keyed = [(1, ids, responses.responses(1))]
    val = types.SimpleNamespace(image_ids=ids)
    for ref in (responses, ShuffledReference(responses, seed=3)):
        (got,) = _group_ceilings(ref, keyed, val)
        torch.testing.assert_close(got, nc[0])


def test_voxel_selection_by_ncsnr():
    ids = torch.arange(8)
    y = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    vr = VoxelResponses({2: (ids, y)}, ncsnr={2: torch.tensor([0.1, 0.5, 0.9, 0.3])},
                        repeats={2: torch.full((8,), 3.0)})
    kept = vr.select_voxels(0.4)
    assert kept.n_voxels == {2: 2} and torch.equal(kept.responses(2), y[:, [1, 2]])
    assert kept.ncsnr[2].tolist() == pytest.approx([0.5, 0.9])
    with pytest.raises(ValueError, match=r"voxel_ncsnr_min=2\.0 keeps no voxel of subject 2 "
                       r"\(its largest ncsnr is 0\.9\); accepted: 0 \(all voxels\) to 0\.9$"):
        vr.select_voxels(2.0)
    # the accepted limit is the smallest subject's largest ncsnr, rounded down so that the
    # printed value keeps a voxel of every subject (.3g would print 0.6 for 0.5996)
    two = VoxelResponses({1: (ids, y), 2: (ids, y)},
                         ncsnr={1: torch.tensor([0.1, 0.5996, 0.2, 0.3]),
                                2: torch.tensor([0.1, 0.5, 0.9, 0.3])},
                         repeats={1: torch.full((8,), 3.0), 2: torch.full((8,), 3.0)})
    with pytest.raises(ValueError, match=r"keeps no voxel of subject 1 \(its largest ncsnr is "
                       r"0\.6\); accepted: 0 \(all voxels\) to 0\.599$"):
        two.select_voxels(0.7)
    assert two.select_voxels(0.599).n_voxels == {1: 1, 2: 1}
    with pytest.raises(ValueError, match=r"needs each voxel's ncsnr, but subjects \[2\] have none"):
        VoxelResponses({2: (ids, y)}).select_voxels(0.4)
    with pytest.raises(ValueError, match=r"voxel_ncsnr_min=0.2; accepted: 0 with reference"):
        TrialConfig(reference="gabor", voxel_ncsnr_min=0.2)


def test_shuffled_reference_pairs_every_image_with_another_ones_response():
    from trainable.train import ShuffledReference

    g = torch.Generator().manual_seed(4)
    ids = torch.arange(40)
    y = torch.randn(40, 6, generator=g)
    voxels = VoxelResponses({1: (ids[::2], y[::2]), 2: (ids, y)})
    shuffled = ShuffledReference(voxels, seed=3)
    batch = torch.tensor([5, 0, 17, 8, 2, 30, 11, 4])
    plain, mixed = voxels.targets(None, batch), shuffled.targets(None, batch)
    assert plain.keys() == mixed.keys()
    for key in plain:
        (rows, y0), (rows1, y1) = plain[key], mixed[key]
        assert torch.equal(rows, rows1)
        # every response is still one of the group's, and none stays with its own image
        assert sorted(map(tuple, y1.tolist())) == sorted(map(tuple, y0.tolist()))
        assert not bool((y1 == y0).all(1).any())
    again = ShuffledReference(voxels, seed=3).targets(None, batch)
    assert all(torch.equal(again[k][1], mixed[k][1]) for k in mixed)  # the same batch, the same
    other = ShuffledReference(voxels, seed=4).targets(None, batch)
    assert any(not torch.equal(other[k][1], mixed[k][1]) for k in mixed)


def test_the_controls_validation_pairing_is_drawn_over_each_whole_group():
    """The validation set's responses are computed in chunks of images: the control shuffled
    each chunk alone, and a subject with one image in a chunk kept its own response there,
    inside a group large enough to be scored. The pairing is now the group's, whatever the
    chunk size."""
    from trainable.data import TensorSplit
    from trainable.train import ShuffledReference, _reference_targets

    g = torch.Generator().manual_seed(5)
    ids = torch.arange(37)
    y = torch.randn(37, 6, generator=g)
    # subject 1 saw one image in every chunk of 8, subject 2 all of them
    voxels = VoxelResponses({1: (ids[::8], y[::8]), 2: (ids, y)})
    subset = TensorSplit(torch.zeros(37, 3, 4, 4, dtype=torch.uint8), torch.zeros(37), ids)
    cfg = TrialConfig(reference="nsd")
    plain = {k: y0 for k, _, y0 in _reference_targets(voxels, subset, cfg, "cpu")}
    whole = _reference_targets(ShuffledReference(voxels, 0), subset, cfg, "cpu")
    chunked = _reference_targets(ShuffledReference(voxels, 0), subset, cfg, "cpu", batch=8)
    for (k, rows, y_whole), (k1, rows1, y_chunked) in zip(whole, chunked):
        assert k == k1 and torch.equal(rows, rows1) and torch.equal(y_whole, y_chunked)
        assert not bool((y_whole == plain[k]).all(1).any()), k  # nobody keeps its own


def test_shuffled_reference_trial_loses_its_alignment(single_label, tmp_path):
    """The negative control end to end: with the Gabor reference shuffled across images the
    validation alignment of a promoting trial is at or below zero (held-out predictions of
    unrelated targets), below the real reference's (measured: -0.11 against -0.004 after one
    short epoch here)."""
    cfg = dict(TINY, reference="gabor", alpha=5.0, val_images=60, val_folds=5)
    real, _ = _run(cfg, single_label, GaborReference(), tmp_path / "real")
    null, _ = _run(dict(cfg, reference_shuffle=True), single_label, GaborReference(),
                   tmp_path / "null")
    assert null["val_alignment"] < real["val_alignment"] - 0.05, (null, real)
    assert null["val_alignment"] < 0.05, null
    # single-label trials record per-image hits that reproduce the reported top-1 / top-5
    with np.load(tmp_path / "real" / "artifacts" / PREDICTIONS_ARTIFACT) as z:
        assert z["top1"].dtype == np.float32 and z["top1"].shape == (len(single_label.val),)
        assert z["top1"].mean() == pytest.approx(real["val_top1"])
        assert z["top5"].mean() == pytest.approx(real["val_top5"])
        assert np.all(z["top5"] >= z["top1"])


@pytest.mark.parametrize("metric", ["linear", "cka", "rsa"])
def test_a_layer_silent_on_every_image_is_no_alignment_not_a_failed_trial(metric):
    """A suppressing trial can silence its layer: the layer's Gram is then zero, so was the
    ridge penalty, and the Cholesky solve failed the trial (retried twice); validation raised
    'X is constant across stimuli'. The batch now feeds only the task term and validation
    reports no alignment (NaN, not logged) with dead_units = 1."""
    cfg = TrialConfig(reference="nsd", metric=metric, val_folds=5, val_images=40, alpha=-1.0)
    g = torch.Generator().manual_seed(6)
    feats = torch.zeros(40, 8, 3, 3, requires_grad=True)
    groups = [(torch.arange(40), torch.randn(40, 12, generator=g))]
    assert batch_alignment(feats, groups, alignment_loss_fn(cfg), cfg) is None
    out = validation_alignment(feats.detach(), groups, cfg)
    assert out["dead_units"] == 1.0
    assert all(np.isnan(out[k]) for k in ("val_linear", "val_cka", "val_rsa", "val_alignment"))
    # a layer that is not silent still fails loudly on a bad input
    with pytest.raises(ValueError, match=r"^X contains 2880 NaN or inf values; all entries"):
        batch_alignment(torch.full((40, 8, 3, 3), float("nan")), groups,
                        alignment_loss_fn(cfg), cfg)


@pytest.mark.parametrize("metric", ["linear", "cka", "rsa"])
def test_a_reference_constant_over_the_images_is_no_alignment_not_a_failed_trial(metric):
    """Responses equal on every image: even the alpha = 0 measurement failed the trial with a
    raw LinAlgError, and validation blamed 'X' (the layer). Like a silent layer: the batch
    feeds only the task term, validation reports no alignment."""
    cfg = TrialConfig(reference="nsd", metric=metric, val_folds=5, val_images=40, alpha=-1.0)
    g = torch.Generator().manual_seed(7)
    feats = torch.randn(40, 8, 3, 3, generator=g, requires_grad=True)
    groups = [(torch.arange(40), torch.full((40, 12), 2.0))]
    assert batch_alignment(feats, groups, alignment_loss_fn(cfg), cfg) is None
    out = validation_alignment(feats.detach(), groups, cfg)
    assert out["dead_units"] == 0.0
    assert all(np.isnan(out[k]) for k in ("val_linear", "val_cka", "val_rsa", "val_alignment"))
    from trainable.alignment import linear_alignment_scaled
    with pytest.raises(ValueError, match=r"Y \(the reference\) is constant across stimuli"):
        linear_alignment_scaled(feats.detach().flatten(1).double(), groups[0][1].double())


def test_numpy_scalars_are_the_numbers_they_hold():
    """A grid built with numpy: 'alpha=np.float32(0.1); accepted: a number' said a number was
    not one."""
    cfg = TrialConfig.from_dict({"alpha": np.float64(0.1), "batch_size": np.int64(8),
                                 "rectify": np.bool_(True), "epochs": np.float32(3.0)})
    assert (cfg.alpha, cfg.batch_size, cfg.rectify, cfg.epochs) == (0.1, 8, True, 3)
    assert type(cfg.batch_size) is int and type(cfg.rectify) is bool
    with pytest.raises(ValueError, match=r"rectify=1; accepted: true or false"):
        TrialConfig.from_dict({"rectify": np.int64(1)})


def test_loss_folds_no_subject_group_can_hold_is_refused_on_the_first_step():
    """Two subjects in a batch of 16 with loss_folds=8 (16 rows per group needed): every
    group was skipped on every step, so alpha = +-0.8 trained like the baseline, silently."""
    from trainable.train import check_groups_usable

    cfg = TrialConfig(reference="nsd", batch_size=16, loss_folds=8, alpha=0.8)
    groups = [(torch.arange(0, 9), torch.randn(9, 5)), (torch.arange(9, 16), torch.randn(7, 5))]
    with pytest.raises(ValueError, match=re.escape(
            "loss_folds=8 needs 16 rows of a reference group (subject) in a batch, but the "
            "first batch's groups hold [9, 7] (batch_size=16): the alignment term would apply "
            "to no group of batches like it; accepted: loss_folds=0 (exact leave-one-out, 3 "
            "rows) or 2..4 or a larger batch_size")):
        check_groups_usable(groups, cfg)
    # the advice fits the setting: never the value that failed, nor loss_folds for CKA
    small = [(torch.arange(0, 2), torch.randn(2, 5)), (torch.arange(2, 4), torch.randn(2, 5))]
    for kw, what in (({}, "the linear loss (exact leave-one-out)"),
                     ({"metric": "cka"}, "the cka loss")):
        with pytest.raises(ValueError, match=re.escape(
                f"{what} needs 3 rows of a reference group (subject) in a batch, but the first "
                f"batch's groups hold [2, 2] (batch_size=8): the alignment term would apply to "
                f"no group of batches like it; accepted: a larger batch_size")):
            check_groups_usable(small, TrialConfig(reference="nsd", batch_size=8, alpha=0.8,
                                                   **kw))
    check_groups_usable(groups, TrialConfig(reference="nsd", batch_size=16, loss_folds=4,
                                            alpha=0.8))


def test_an_rsa_group_left_with_fewer_than_3_images_is_skipped_not_the_trial():
    """An NSD subject's group of 3 images, one of which the rectified layer is silent on: RSA
    has no value there, and the step failed with 'ValueError: 1 of 3 stimuli have constant
    features'. The group is skipped like a group too small."""
    cfg = TrialConfig(reference="nsd", metric="rsa", rectify=True, alpha=-0.5, batch_size=8)
    g = torch.Generator().manual_seed(9)
    feats = torch.randn(8, 4, 2, 2, generator=g, requires_grad=True)
    with torch.no_grad():
        feats[1] = -1.0  # rectified: silent
    groups = [(torch.tensor([0, 1, 2]), torch.randn(3, 6, generator=g))]
    assert batch_alignment(feats, groups, alignment_loss_fn(cfg), cfg) is None
    groups.append((torch.arange(3, 8), torch.randn(5, 6, generator=g)))
    assert torch.isfinite(batch_alignment(feats, groups, alignment_loss_fn(cfg), cfg))


@pytest.mark.parametrize("capability, precision, bf16", [
    ((9, 0), "auto", True), ((8, 0), "auto", True),  # H100, A100: native bf16
    ((7, 0), "auto", False), ((7, 5), "auto", False),  # V100, T4: emulated, slower than fp32
    ((7, 0), "bf16", True), ((9, 0), "fp32", False),  # asked for: as asked
])
def test_auto_precision_is_bf16_only_on_gpus_that_compute_it(monkeypatch, capability,
                                                               precision, bf16):
    """precision=auto chose bf16 on any CUDA device; pre-Ampere GPUs emulate bf16 (torch's
    is_bf16_supported says yes there), slower than float32. No GPU here: the device's
    compute capability is what the test sets."""
    from trainable.train import _uses_bf16

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cfg = TrialConfig(precision=precision)
    assert _uses_bf16(cfg, torch.device("cuda")) is bf16
    assert _uses_bf16(cfg, torch.device("cpu")) is (precision == "bf16")
