"""The ONE shared trainable: every configuration of every sweep runs ``train``.

``train(config, *, data, reference, hooks=None)`` trains a model with
``L_total = alpha * L_align + beta * L_task`` (``L_align = -score(layer, reference)`` on the
batch) and after every epoch reports task loss, alignment loss, batch alignment, validation
performance (top-1 or mAP), validation linear alignment / CKA / RSA on a fixed held-out image set,
epoch seconds and images per second, with a checkpoint. It is a plain function: Ray Tune calls it
through ``sweeps`` (which injects hooks that report to Ray), tests and benchmarks call it
directly with ``LocalHooks``. No Ray import here.

Data arrives as ``TrialData`` (the split datasets: indices over files every node sees); the
trial reads its own batches through ``trainable.data.BatchFeed`` (streamed by a DataLoader with
worker processes, or decoded once into memory when the split is small); references expose ``targets(images, image_ids) -> [(rows, Y)]``,
one group per subject for voxel data and one group for image-computable references.
"""

from __future__ import annotations

import contextlib
import json
import math
import pickle
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from records import (
    ARTIFACTS_DIR,
    FILTERS_ARTIFACT,
    FINAL_METRICS_ARTIFACT,
    NETWORK_REFERENCES,
    PREDICTIONS_ARTIFACT,
)
from records.errors import exception_line, one_line
from records.scratch import scratch_dir
from trainable.alignment import (
    UndefinedScore,
    constant_columns,
    get_metric,
)
from trainable.average_precision import mean_average_precision
from trainable.config import TrialConfig
from trainable.data import (
    BatchFeed,
    Schedule,
    TensorSplit,
    TrialData,
    decode,
    fix_mmap_threshold,
    flip_mask,
    loader_workers,
    normalize,
    sequential_schedule,
    steps_in_epoch,
    train_batches,
)
from trainable.models import TappedModel, build_model, conv1_weight, get_model_spec
from trainable.pictures import filter_grid_png

CHECKPOINT_FILE = "checkpoint.pt"


class TrialDiverged(RuntimeError):
    """The loss became NaN or inf; the message names the epoch and step."""


class Reference(Protocol):
    def targets(
        self, images: torch.Tensor, image_ids: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]: ...


class Hooks(Protocol):
    """How a trial talks to whoever runs it (Ray Tune or plain Python). ``describe`` (optional:
    train() calls it when present) receives ``trial_facts``, what the trial resolved when it
    started."""

    def report(self, metrics: dict[str, float], checkpoint_dir: Path) -> None: ...

    def restore(self) -> Path | None: ...

    def artifact_dir(self) -> Path: ...


@dataclass
class LocalHooks:
    """Hooks for plain Python: keep every report, keep checkpoints under ``workdir``."""

    workdir: Path
    resume_from: Path | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)
    facts: dict[str, str] = field(default_factory=dict)

    def describe(self, facts: dict[str, str]) -> None:
        self.facts.update(facts)

    def report(self, metrics: dict[str, float], checkpoint_dir: Path) -> None:
        self.history.append(dict(metrics))
        keep = Path(self.workdir) / f"checkpoint_{int(metrics['epoch']):04d}"
        keep.mkdir(parents=True, exist_ok=True)
        for f in Path(checkpoint_dir).iterdir():
            (keep / f.name).write_bytes(f.read_bytes())
        self.checkpoints.append(keep)

    def restore(self) -> Path | None:
        return self.resume_from

    def artifact_dir(self) -> Path:
        path = Path(self.workdir) / ARTIFACTS_DIR
        path.mkdir(parents=True, exist_ok=True)
        return path


# ----------------------------------------------------------------------------- metrics


def topk_correct(logits: torch.Tensor, targets: torch.Tensor,
                 topk: tuple[int, ...] = (1, 5)) -> dict[int, torch.Tensor]:
    """Per row, whether its target is among the k highest logits: {k: (n,) float in [0, 1]}.

    Ties are broken at random, in expectation: with a classes above the target's logit and t
    equal to it (the target included), the hit is ``clamp(k - a, 0, t) / t``. ``torch.topk``
    picks among tied logits by position, so a network that outputs a constant (dead, or bf16
    rounding) scored 0.03 or 0.57 top-1 on a set whose majority class sits at the wrong or
    the right index, where chance is 0.1."""
    k_max = logits.shape[1]
    target = logits.gather(1, targets[:, None])
    above = (logits > target).sum(1)
    tied = (logits == target).sum(1)
    return {k: (min(k, k_max) - above).clamp(min=0).minimum(tied).double() / tied
            for k in topk}


def topk_hits(logits: torch.Tensor, targets: torch.Tensor,
              topk: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """How many rows have their target among the k highest logits, for each k (capped at the
    number of classes; ties counted in expectation, ``topk_correct``). logits (n, c),
    targets (n,)."""
    return {k: float(hit.sum()) for k, hit in topk_correct(logits, targets, topk).items()}


def accuracy(logits: torch.Tensor, targets: torch.Tensor, topk: tuple[int, ...] = (1, 5)):
    """Top-k accuracy for each k (capped at the number of classes). logits (n, c), targets (n,)."""
    return {k: h / logits.shape[0] for k, h in topk_hits(logits, targets, topk).items()}


# ----------------------------------------------------------------------------- pieces


def resolve_device(cfg: TrialConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def trial_facts(cfg: TrialConfig, device: torch.device, workers: int, train_feed: BatchFeed,
                val_feed: BatchFeed, reference) -> dict[str, str]:
    """What a trial resolved when it started, where its settings leave it to the machine or
    the data (``device``/``precision`` "auto", ``loader_workers`` -1, ``in_memory_mb``,
    ``voxel_ncsnr_min``, the reference's source): recorded beside its params (the MLflow
    run's ``ran.*`` tags)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    bf16 = _uses_bf16(cfg, device)
    return {
        "device": f"{device}{f' ({name})' if name else ''}",
        "precision": ("bf16 autocast (alignment math in float32/float64)" if bf16 else
                      "float32" + (" (IEEE convolutions)" if device.type == "cuda" else "")),
        "threads": str(torch.get_num_threads()),
        "loader_workers": str(workers),
        "train_split": f"{len(train_feed)} images, "
                       f"{'streamed' if train_feed.streaming else 'in memory'}",
        "val_split": f"{len(val_feed)} images, "
                     f"{'streamed' if val_feed.streaming else 'in memory'}",
        "reference": describe_reference(reference),
    }


def describe_reference(reference) -> str:
    """One line naming what a trial aligns with: the network file (or cache entry) of a
    pretrained reference, the voxels kept per subject of a voxel one."""
    if isinstance(reference, ShuffledReference):
        return f"shuffled across images: {describe_reference(reference.reference)}"
    if hasattr(reference, "n_voxels"):
        kept = ", ".join(f"subject {s}: {n}" for s, n in reference.n_voxels.items())
        roi = getattr(reference, "roi", "")
        return f"voxels{f' of {roi}' if roi else ''} ({kept})"
    source = getattr(reference, "source", "")
    layer = getattr(reference, "layer", "")
    what = getattr(reference, "name", type(reference).__name__)
    model = getattr(reference, "model_name", "")
    return " ".join(x for x in (what, model, layer, f"from {source}" if source else "") if x)


def _uses_bf16(cfg: TrialConfig, device: torch.device) -> bool:
    """The network (and an image-computed reference) in bf16 autocast: asked for, or "auto"
    on a CUDA GPU that computes bf16 natively (compute capability 8.0 on: A100, H100). Older
    GPUs (V100, T4) only emulate it, slower than float32, so "auto" keeps float32 there."""
    if cfg.precision == "bf16":
        return True
    return (cfg.precision == "auto" and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 8)


def _float32_convolutions(cfg: TrialConfig, device: torch.device) -> None:
    """On CUDA, cuDNN runs float32 convolutions in TF32 unless told otherwise (10 mantissa
    bits), so a float32 trial (``precision = "fp32"``; "auto" on a GPU without native bf16,
    which has no TF32 either) was not float32 while its facts said so: its convolutions run
    in IEEE float32. A bf16 trial keeps TF32 for the convolutions that run outside autocast.
    Every float32 matmul runs in IEEE float32, in either kind of trial, except the
    alignment's Gram products, which set their own (``trainable.alignment.GRAM_TF32_ON_CUDA``)
    and restore this one.

    Both settings are made explicitly, per operation, at each trial's start: they are
    process-wide and a reused worker runs trials of either kind. Until stop 41 only
    ``torch.backends.cudnn.fp32_precision`` was set, which (torch 2.14) is the whole CUDA
    backend's: matmuls inherited it (a bf16 trial ran its float32 head and every other
    float32 product in TF32), and the Gram block, restoring the inherited value it read,
    wrote ``"tf32"`` into the matmul setting for good, so an fp32 trial that followed a
    bf16 one in the same worker ran its linear layers in TF32."""
    if device.type != "cuda":
        return
    want = "tf32" if _uses_bf16(cfg, device) else "ieee"
    backends = torch.backends
    if hasattr(backends.cudnn, "conv") and hasattr(backends.cuda.matmul, "fp32_precision"):
        backends.cudnn.conv.fp32_precision = want
        backends.cuda.matmul.fp32_precision = "ieee"
    else:  # an older torch: the legacy flags
        backends.cudnn.allow_tf32 = want == "tf32"
        backends.cuda.matmul.allow_tf32 = False


def _autocast(cfg: TrialConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=_uses_bf16(cfg, device))


def _pooled(x: torch.Tensor, pool: int) -> torch.Tensor:
    """(n, C, H, W) -> (n, C, pool, pool) by adaptive average pooling when pool > 0 and the
    map is larger; anything else unchanged. Always returned in float32 (alignment math is
    never done in bf16)."""
    if pool > 0 and x.ndim == 4 and (x.shape[-1] > pool or x.shape[-2] > pool):
        x = F.adaptive_avg_pool2d(x.float(), pool)
    return x.float()


def _layer_features(x: torch.Tensor, cfg: TrialConfig) -> torch.Tensor:
    """The tapped layer as the alignment sees it: rectified when ``cfg.rectify``, then pooled
    (``_pooled``). Differentiable."""
    return _pooled(F.relu(x) if cfg.rectify else x, cfg.pool)


def _reference_features(y: torch.Tensor, cfg: TrialConfig) -> torch.Tensor:
    """A reference group's responses as the alignment sees them: pooled as the layer is, and
    rectified with it when the reference is a network tapped as the trainee is
    (``records.NETWORK_REFERENCES``: ReLU of the trainee's conv5 against ReLU of the frozen
    network's, not its pre-ReLU stage). A Gabor bank's or voxels' responses are never
    rectified."""
    rectify = cfg.rectify and cfg.reference in NETWORK_REFERENCES
    return _pooled(F.relu(y) if rectify else y, cfg.pool)


def _min_rows(cfg: TrialConfig) -> int:
    return get_metric(cfg.metric).min_rows(cfg.loss_folds)


def alignment_loss_fn(cfg: TrialConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The metric's loss form with the trial's options (score: higher = more aligned)."""
    return get_metric(cfg.metric).batch_loss(ridge_rel=cfg.ridge_rel, loss_folds=cfg.loss_folds)


def batch_alignment(
    feats: torch.Tensor,
    groups: list[tuple[torch.Tensor, torch.Tensor]],
    score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    cfg: TrialConfig,
    skipped: list[str] | None = None,
) -> torch.Tensor | None:
    """Mean alignment score over groups (one per subject for voxel data).

    feats : (n, ...) the tapped layer for the batch. groups : [(rows, Y)], rows index the
    batch. A group with too few rows for the held-out score is skipped; None when no group
    is usable (the batch then only feeds the task term). ``skipped`` (a list) receives why
    each group with enough rows was skipped.
    """
    feats = _layer_features(feats, cfg)
    groups = [(rows, y) for rows, y in groups if rows.numel() >= _min_rows(cfg)]
    scores = []
    for (_, y), x in zip(groups, _group_rows(feats, [rows for rows, _ in groups])):
        try:
            scores.append(score_fn(x, _reference_features(y, cfg)))
        except UndefinedScore as exc:
            # the metric has no value on this group (RSA: fewer than 3 images the layer is
            # not silent on): skipped like a group too small
            if skipped is not None:
                skipped.append(str(exc))
            continue
        except (torch.linalg.LinAlgError, ValueError):
            # A layer silent on every image of the group (a suppressing trial can drive it
            # there) has no alignment to measure or push: its Gram is zero, so the ridge
            # penalty is too, and the solve fails. Skipped like a group too small; anything
            # else is re-raised. Checked only on failure (a pass over the layer costs).
            # The same for a reference constant over the group (nothing to align with).
            if not (bool(constant_columns(x.detach().flatten(1)).all())
                    or bool(constant_columns(y.flatten(1)).all())):
                raise
            if skipped is not None:
                skipped.append("the layer or the reference is constant over the group")
    return torch.stack(scores).mean() if scores else None


def _group_rows(feats: torch.Tensor, rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """``[feats[r] for r in rows]``, the layer's rows of each group, by one gather and a split.

    Backward, the groups' gradients are concatenated and added into one (n, ...) buffer.
    Indexing each group would give each its own zero-filled (n, ...) gradient, written by a
    serial accumulating ``index_put_`` and summed by autograd: G buffers of the layer's size
    (at the paper's conv1, 0.8 GB each at batch 1000; NSD batches hold a group per subject),
    and 4x the time at 8 groups of a (256, 64, 55, 55) layer on this CPU (2x at the demo's
    two). One group holding the whole batch in order (image references) is the layer itself:
    no copy."""
    if len(rows) == 1 and rows[0].numel() == feats.shape[0] and bool(
            (rows[0] == torch.arange(rows[0].numel(), device=rows[0].device)).all()):
        return [feats]
    if not rows:
        return []
    gathered = feats.index_select(0, torch.cat(rows).to(feats.device))
    return list(gathered.split([int(r.numel()) for r in rows]))


def check_groups_usable(groups: list[tuple[torch.Tensor, torch.Tensor]],
                        cfg: TrialConfig) -> None:
    """On a trial's first step with alpha != 0: some reference group (one per subject for
    voxel data) must have the rows the held-out score needs, or the alignment term would be
    skipped on every batch without a word (loss_folds=8 with two subjects in a batch of 16).
    For references whose groups follow from the image ids (voxel data) the whole first epoch
    is judged instead (``check_epoch_groups_usable``)."""
    problem = _group_sizes_problem([[int(rows.numel()) for rows, _ in groups]], cfg,
                                   "the first batch's")
    if problem:
        raise ValueError(problem)


def check_epoch_groups_usable(feed: BatchFeed, reference, cfg: TrialConfig) -> bool:
    """Before a trial's first epoch with alpha != 0, for a reference whose groups follow from
    the image ids alone (``group_sizes``: voxel data, also under ``ShuffledReference``): some
    batch of the epoch must hold a group with the rows the held-out score needs. Judging by
    the first batch alone failed a trial for its seed (loss_folds=10: seed 6's first batch
    held [19, 19] while the other seeds' epochs applied the term on 18-23 steps of 25).
    Returns False where it cannot judge (the first step's groups are checked then). The
    driver runs the same check on every trial before any starts
    (``first_epoch_groups_problem``)."""
    ids = getattr(feed.dataset, "image_ids", None)
    judged, problem = _first_epoch_groups(ids, reference, cfg, feed.schedule)
    if problem:
        raise ValueError(problem)
    return judged


def first_epoch_groups_problem(train_ids, reference, cfg: TrialConfig) -> str | None:
    """``check_epoch_groups_usable`` as the driver asks it of a trial before Ray runs any:
    the refusal, or None (the term applies on some batch of the first epoch, alpha is 0, or
    the reference's groups do not follow from the image ids). ``train_ids``: the training
    split's image ids."""
    if cfg.alpha == 0 or train_ids is None:
        return None
    return _first_epoch_groups(train_ids, reference, cfg,
                               training_schedule(len(train_ids), cfg))[1]


def _first_epoch_groups(ids, reference, cfg: TrialConfig,
                        schedule: Schedule) -> tuple[bool, str | None]:
    """(judged, refusal or None) of the first epoch's batches under ``schedule``."""
    base = unshuffled(reference)
    if not hasattr(base, "group_sizes") or ids is None:
        return False, None
    need = _min_rows(cfg)
    batches, _ = schedule(0)
    sizes = []
    for idx in batches:
        these = list(base.group_sizes(ids[idx]).values())
        if any(n >= need for n in these):
            return True, None
        sizes.append(these)
    return True, _group_sizes_problem(sizes, cfg, "the first batch's" if len(sizes) == 1 else
                                      f"the first epoch's {len(sizes)} batches'")


def _group_sizes_problem(sizes: list[list[int]], cfg: TrialConfig, whose: str) -> str | None:
    """The refusal of ``check_groups_usable``, or None: ``sizes`` per batch, none large
    enough."""
    need = _min_rows(cfg)
    if not any(n >= need for batch in sizes for n in batch):
        most = max((n for batch in sizes for n in batch), default=0)
        what = (f"loss_folds={cfg.loss_folds}" if cfg.metric == "linear" and cfg.loss_folds
                else f"the {cfg.metric} loss" + (" (exact leave-one-out)"
                                                 if cfg.metric == "linear" else ""))
        fixes = ["a larger batch_size"]
        if cfg.metric == "linear" and cfg.loss_folds and most >= 3:
            fixes.insert(0, "loss_folds=0 (exact leave-one-out, 3 rows)"
                         + (f" or 2..{most // 2}" if most >= 4 else ""))
        held = (f"hold {sizes[0]}" if len(sizes) == 1 else
                f"hold at most {most} rows")
        return (f"{what} needs {need} rows of a reference group (subject) in a batch, but "
                f"{whose} groups {held} (batch_size={cfg.batch_size}): the alignment term "
                f"would apply to no group of batches like "
                f"{'it' if len(sizes) == 1 else 'them'}; accepted: {' or '.join(fixes)}")
    return None


def task_loss(logits: torch.Tensor, targets: torch.Tensor, task: str) -> torch.Tensor:
    if task == "single_label":
        return F.cross_entropy(logits.float(), targets)
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


def training_schedule(n: int, cfg: TrialConfig) -> Schedule:
    """Epoch -> (index batches, augmentation seed) of the training split: the permutation of
    (seed, epoch) in batches of cfg.batch_size; the last partial batch is dropped if smaller
    than the held-out score needs; at most cfg.steps_per_epoch steps when that is > 0."""
    steps = steps_in_epoch(n, cfg.batch_size, _min_rows(cfg), cfg.steps_per_epoch)
    if steps == 0:
        raise ValueError(
            f"the training split has {n} images, fewer than one batch can use "
            f"(batch_size={cfg.batch_size}); lower batch_size or add data"
        )
    return lambda epoch: (train_batches(n, cfg.batch_size, cfg.seed, epoch, steps),
                          cfg.seed * 1_000_003 + epoch)


def train_one_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    feed: BatchFeed,
    reference: Reference,
    cfg: TrialConfig,
    task: str,
    epoch: int,
    device: torch.device,
    augment: str = "none",
) -> dict[str, float]:
    """One epoch of the training split: ``feed`` serves the batches of its schedule
    (``training_schedule``). Returns means over steps.

    augment "flip": half of each batch is flipped here (``trainable.data.flip_mask``); other
    augmentation happened in the dataset. Image-computed references see the same images."""
    model.train()
    score_fn = alignment_loss_fn(cfg)
    first = epoch == 0 and cfg.alpha != 0
    judged = first and check_epoch_groups_usable(feed, reference, cfg)
    skipped: list[str] = []
    sums = {"task_loss": 0.0, "align_loss": 0.0, "batch_alignment": 0.0}
    n_steps = n_align = n_images = 0
    wait = 0.0
    t_wait = time.perf_counter()
    for step, (images, targets, ids) in enumerate(feed.epoch(epoch)):
        wait += time.perf_counter() - t_wait
        images = normalize(images)
        if augment == "flip":
            flip = flip_mask(images.shape[0], cfg.seed, epoch, step).nonzero()[:, 0].to(device)
            # in place, the flipped half only (``normalize`` made this buffer for the batch);
            # by row index rather than a boolean mask: 0.1 ms less a step at the demo's shape
            images.index_copy_(0, flip, images.index_select(0, flip).flip(-1))
        every = cfg.align_batch_every
        measure = cfg.alpha != 0 or (every > 0 and step % every == 0)
        with _autocast(cfg, device):
            # the tap only when this step measures (a tap costs a clone and two hooks)
            logits, taps = model(images, taps=(cfg.layer,)) if measure else (model(images), {})
            l_task = task_loss(logits, targets, task)
            # an image-computed reference (the Gabor bank, a frozen network) runs in the
            # network's precision (bf16 on CUDA by default); the alignment math after it does
            # not (``_pooled`` casts to float32)
            groups = list(reference_groups(reference, images, ids).values()) if measure else []
        score = None
        if measure:
            if first and step == 0 and not judged:
                check_groups_usable(groups, cfg)
            with torch.set_grad_enabled(cfg.alpha != 0):
                score = batch_alignment(taps[cfg.layer], groups, score_fn, cfg,
                                        skipped if first else None)
        loss = cfg.beta * l_task
        if score is not None and cfg.alpha != 0:
            loss = loss + cfg.alpha * (-score)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise TrialDiverged(
                f"non-finite loss ({loss_value}) at epoch {epoch} step {step} "
                f"(alpha={cfg.alpha}, beta={cfg.beta}, lr={cfg.lr}); trial stopped"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums["task_loss"] += float(l_task.detach())
        if score is not None:
            s = float(score.detach())
            sums["batch_alignment"] += s
            sums["align_loss"] += -s
            n_align += 1
        n_steps += 1
        n_images += images.shape[0]
        t_wait = time.perf_counter()
    if first and n_steps and not n_align:
        # the groups had the rows, but the metric had no value on any batch (RSA of a layer
        # pooled to one unit): a promoting or suppressing trial would train on the task alone
        why = skipped[-1] if skipped else "no batch had a usable reference group"
        raise ValueError(
            f"alpha={cfg.alpha:g}: the alignment term applied to no step of the first epoch "
            f"({n_steps} steps; the last skipped: {why}); accepted: a layer, pool and metric "
            f"({cfg.metric}) whose score is defined on the batches")
    # align_steps: the steps whose batch alignment was computed; with alpha != 0 the steps the
    # alignment term trained on (a voxel batch where no subject holds the rows the held-out
    # score needs trains on the task alone, as train_steps - align_steps says)
    out = {"task_loss": sums["task_loss"] / n_steps, "train_images": float(n_images),
           "train_steps": float(n_steps), "align_steps": float(n_align),
           "data_wait_seconds": wait}
    if n_align:
        out["align_loss"] = sums["align_loss"] / n_align
        out["batch_alignment"] = sums["batch_alignment"] / n_align
    else:
        out["align_loss"] = out["batch_alignment"] = float("nan")
    return out


@torch.no_grad()
def _forward_all(model, feed: BatchFeed, epoch: int, layer: str, cfg, device) -> torch.Tensor:
    """The tap as the alignment sees it (``_layer_features``) for every item of ``feed``'s
    epoch, in order (eval). The output is allocated once: growing lists of per-batch results
    interleaved with the batches' large temporaries fragment the heap, and the trial's memory
    then grows with the split (measured: tests/benchmarks/bench_data.py)."""
    model.eval()
    out, lo = None, 0
    for images, _, _ in feed.epoch(epoch):
        with _autocast(cfg, device):
            _, taps = model(normalize(images), taps=(layer,))
        f = _layer_features(taps[layer], cfg)
        if out is None:
            out = torch.empty((len(feed), *f.shape[1:]), dtype=f.dtype, device=f.device)
        out[lo:lo + f.shape[0]] = f
        lo += f.shape[0]
    return out


# The final epoch's per-image validation outcome (records.PREDICTIONS_ARTIFACT), an artifact
# of every trial: what lets a report put a paired bootstrap interval (over validation images)
# on a difference between trials (dashboards.effects).


@torch.no_grad()
def evaluate(model, feed: BatchFeed, epoch: int, task: str, cfg, device,
             record: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Validation performance over the whole validation split (streamed like training): top-1
    and top-5 accuracy counted batch by batch, or mAP from the (n, classes) scores, kept in one
    preallocated array. ``val_performance`` is the number the Pareto fronts use.

    record : when given, filled with the per-image outcome (``PREDICTIONS_ARTIFACT``):
    ``image_ids`` (n,) and, single-label, ``top1`` / ``top5`` (n,) float32 hits (1, 0, or
    the share of a tie: ``topk_correct``); multi-label, ``scores`` (n, classes) float32
    logits and ``targets`` (n, classes) uint8. mAP ranks the logits themselves: AP depends on
    the ranking alone, and float32 sigmoid scores of logits above about 17 are all 1.0, ties
    the network never made (mAP 0.42 where the logits rank at 0.75). For the same reason a
    bf16 trial's logits come from its head computed in float32 (``head_in_float32``).

    Outputs that are not finite (the last step's update turned the weights NaN: the loss
    before it was checked) are a ``TrialDiverged``: topk and the AP ranking would score them.
    """
    model.eval()
    n = len(feed)
    hits = {1: np.zeros(n, np.float32), 5: np.zeros(n, np.float32)}
    ids = np.empty(n, np.int64)
    scores = labels = None
    lo = 0
    head32 = model.head_in_float32 if isinstance(model, TappedModel) else contextlib.nullcontext
    for images, targets, image_ids in feed.epoch(epoch):
        with _autocast(cfg, device), head32():  # ranked: the head's outputs in float32
            logits = model(normalize(images)).float()
        if not bool(torch.isfinite(logits).all()):
            raise TrialDiverged(f"non-finite outputs on the validation images after epoch "
                                f"{epoch} (the weights became NaN or inf)")
        k = logits.shape[0]
        ids[lo:lo + k] = image_ids.reshape(-1).cpu().numpy()  # on the device (CUDA) too
        if task == "single_label":
            for topk, h in topk_correct(logits, targets, (1, 5)).items():
                hits[topk][lo:lo + k] = h.cpu().numpy()
        else:
            if scores is None:
                scores = np.empty((n, logits.shape[1]), np.float32)
                labels = np.empty((n, logits.shape[1]), np.float32)
            scores[lo:lo + k] = logits.cpu().numpy()
            labels[lo:lo + k] = targets.float().cpu().numpy()
        lo += k
    if record is not None:
        record["image_ids"] = ids[:lo]
        if task == "single_label":
            record["top1"], record["top5"] = hits[1][:lo], hits[5][:lo]
        else:
            record["scores"] = scores[:lo]
            record["targets"] = labels[:lo].astype(np.uint8)
    if task == "single_label":
        top1, top5 = float(hits[1][:lo].mean()), float(hits[5][:lo].mean())
        return {"val_top1": top1, "val_top5": top5, "val_performance": top1}
    m = mean_average_precision(scores, labels)
    return {"val_map": m, "val_performance": m}


def validation_indices(n_val: int, n: int) -> torch.Tensor:
    """The fixed validation-alignment subset: n of the n_val validation items, in random order
    (seed 0, the same for every trial of a sweep so their alignments are comparable).

    The order matters: the validation alignment uses contiguous folds, and splits are stored
    sorted (ImageFolder by class, NSD by nsdId); contiguous folds of a class-sorted set would
    test on unseen classes and measure distribution shift, not alignment."""
    return torch.randperm(n_val, generator=torch.Generator().manual_seed(0))[:n]


def validation_subset(val, n: int, workers: int = 0) -> TensorSplit:
    """The fixed validation-alignment subset (``validation_indices``) decoded into memory:
    bounded by cfg.val_images whatever the split's size."""
    idx = validation_indices(len(val), n)
    return decode(torch.utils.data.Subset(val, idx.tolist()), workers=workers)


class ShuffledReference:
    """The negative control (``reference_shuffle``): ``reference``'s responses, each paired
    with another image of the same group of the same batch.

    Within each group (rows, Y) of a call, the rows are put in a random cycle and every row
    takes the response of the next one: no row keeps its own response (a derangement), and
    the pairing is redrawn with every batch, so a network can neither align with the images'
    responses nor memorise a fixed wrong pairing. The cycle is drawn from (seed, the group's
    image ids), so the same batch always gets the same pairing (resume, the fixed validation
    set). Applies to every reference alike: image-computed ones cannot be recomputed for an
    image that is not in the batch, so "another image" means one of the batch.
    """

    def __init__(self, reference, seed: int) -> None:
        self.reference, self.seed = reference, seed

    def targets(self, images: torch.Tensor, image_ids: torch.Tensor):
        return {key: (rows, self.derange(image_ids[rows.to(image_ids.device)], y))
                for key, (rows, y) in reference_groups(self.reference, images,
                                                       image_ids).items()}

    def derange(self, ids: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The responses ``y`` of the images ``ids`` (one group), each moved to the next
        image of a random cycle drawn from (seed, ids); a group of one is left as it is
        (nothing to pair it with: too small to be scored)."""
        k = ids.numel()
        if k < 2:
            return y
        ids = ids.cpu().to(torch.float64)
        mix = int(((ids + 1) * (ids + 7)).sum().item()) % 1_000_003
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + mix)
        cycle = torch.randperm(k, generator=gen)
        source = torch.empty(k, dtype=torch.int64)
        source[cycle] = torch.roll(cycle, -1)
        return y[source.to(y.device)]


def unshuffled(reference):
    """The reference a negative control (``ShuffledReference``) pairs anew, or ``reference``:
    what its responses are and how reliable, which the pairing does not change."""
    return reference.reference if isinstance(reference, ShuffledReference) else reference


def reference_groups(reference, images, image_ids) -> dict[Any, tuple[torch.Tensor, torch.Tensor]]:
    """``reference.targets`` as a dict keyed by group (the subject for voxel data). References
    may return a dict or a list (a list's groups are keyed by position)."""
    out = reference.targets(images, image_ids)
    return dict(out) if isinstance(out, Mapping) else dict(enumerate(out))


def _reference_targets(reference, subset: TensorSplit, cfg, device, batch: int = 256):
    """Reference representation of the fixed validation set, one (key, rows, Y) per group
    (the key is the subject for voxel data), computed in chunks of ``batch`` images, in the
    trial's precision (``_autocast``, as training computes it; ``_pooled`` then casts to
    float32). The negative control's pairing is drawn over each whole group, not per chunk:
    a subject with one image in a chunk kept its own response there, inside a group large
    enough to score."""
    shuffled = reference if isinstance(reference, ShuffledReference) else None
    inner = shuffled.reference if shuffled is not None else reference
    device = torch.device(device)
    rows_by_key: dict[Any, list[torch.Tensor]] = {}
    ys_by_key: dict[Any, list[torch.Tensor]] = {}
    for lo in range(0, len(subset), batch):
        images = normalize(subset.images[lo : lo + batch].to(device))
        ids = subset.image_ids[lo : lo + batch].to(device)
        # in the network's precision, as in training (bf16 autocast on CUDA): the validation
        # layer is computed so too (``_forward_all``)
        with torch.no_grad(), _autocast(cfg, device):
            groups = reference_groups(inner, images, ids)
        for key, (rows, y) in groups.items():
            rows_by_key.setdefault(key, []).append(rows.to(device) + lo)
            ys_by_key.setdefault(key, []).append(_reference_features(y, cfg))
    keyed = [(k, torch.cat(rows_by_key[k]), torch.cat(ys_by_key[k])) for k in rows_by_key]
    if shuffled is not None:
        keyed = [(k, rows, shuffled.derange(subset.image_ids[rows.cpu()], y))
                 for k, rows, y in keyed]
    return keyed


def _group_ceilings(reference, keyed_groups, subset: TensorSplit) -> list[torch.Tensor | None]:
    """Per validation group, each voxel's noise ceiling for the group's images (a voxel
    reference with ncsnr: ``VoxelResponses.noise_ceilings``), else None. The negative
    control's (``ShuffledReference``) are its reference's: pairing responses with other
    images changes nothing about how reliable they are."""
    reference = unshuffled(reference)
    if not hasattr(reference, "noise_ceilings"):
        return [None] * len(keyed_groups)
    return [reference.noise_ceilings(key, subset.image_ids[rows.cpu()])
            for key, rows, _ in keyed_groups]


def _secondary(metric, x: torch.Tensor, y: torch.Tensor) -> float:
    """A reported-only metric (CKA, RSA); NaN where it is undefined (a stimulus whose units are
    all silent has no correlation distance): the trial goes on and the linear score stands."""
    try:
        return float(metric(x, y))
    except ValueError:
        return float("nan")


def _mean_defined(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def validation_alignment(feats: torch.Tensor, groups, cfg: TrialConfig,
                         ceilings: list | None = None) -> dict[str, float]:
    """Linear alignment (``val_linear``: cross-validated ridge, cfg.val_folds folds, penalties
    relative to each predictor's scale), CKA and RSA between the layer and the reference on
    the fixed validation set, in float64; averaged over groups (subjects) with enough images
    (CKA and RSA over the groups where they are defined, else NaN: see ``_secondary``).
    ``val_alignment``, what the fronts, statistics and searches use, is the trial's own metric
    (``cfg.metric``, the one its loss pushes): ``val_linear`` by default. ``dead_units``: the
    fraction of the layer's units (as the alignment sees them: rectified, pooled) that are
    constant over the whole validation set; the alignment gives them no weight
    (``trainable.alignment.linear_alignment_scaled``), this says how many there are.

    ``ceilings`` (per group, (n_voxels,) or None): for voxel references with a noise ceiling,
    ``val_alignment_nc`` = the model -> voxel R^2 (uniform over voxels) divided by the voxels'
    mean ceiling for those images, averaged over the groups that have one: the field's
    "fraction of explainable variance explained" (1 = as good as the data allow).
    """
    out: dict[str, list[float]] = {"val_linear": [], "val_cka": [], "val_rsa": []}
    own = f"val_{cfg.metric}" if f"val_{cfg.metric}" in out else None  # else a registered one
    own_values: list[float] = []
    normalised: list[float] = []
    ceilings = ceilings if ceilings is not None else [None] * len(groups)
    used = []
    for (rows, y), nc in zip(groups, ceilings):
        if rows.numel() < 2 * cfg.val_folds:
            continue
        used.append(rows)
        x64 = feats[rows].double().flatten(1)
        y64 = y.double().flatten(1)
        # The reported alignment is the paper's (linear) whatever metric the loss uses; CKA and
        # RSA beside it. Each is its registry entry's validation form (trainable.alignment).
        try:
            score, x_to_y, _ = get_metric("linear").validate(x64, y64, folds=cfg.val_folds,
                                                             parts=True)
        except ValueError:
            # a layer silent on every validation image (dead_units = 1), or a reference
            # constant over them: no alignment to report (NaN, as CKA and RSA), not a failed
            # trial
            if not (bool(constant_columns(x64).all()) or bool(constant_columns(y64).all())):
                raise
            score = x_to_y = float("nan")
        out["val_linear"].append(float(score))
        out["val_cka"].append(_secondary(get_metric("cka").validate, x64, y64))
        out["val_rsa"].append(_secondary(get_metric("rsa").validate, x64, y64))
        if own is None:
            own_values.append(_secondary(get_metric(cfg.metric).validate, x64, y64))
        if nc is not None and math.isfinite(float(x_to_y)):
            # over the voxels the R^2 weighs: a voxel constant over these images (outside the
            # brain: ncsnr 0, betas 0) has no weight there, and averaged in here its ceiling
            # of 0 doubled the score of a group where half the voxels were such
            ceiling = float(nc.to(y64.device)[~constant_columns(y64)].double().mean())
            if ceiling > 0:
                normalised.append(float(x_to_y) / ceiling)
    if not out["val_linear"]:
        sizes = ", ".join(str(rows.numel()) for rows, _ in groups) or "none"
        raise ValueError(
            f"no reference group has {2 * cfg.val_folds} validation images with responses "
            f"(val_folds={cfg.val_folds}); the fixed validation subset (val_images="
            f"{cfg.val_images}) gives the groups (NSD: subjects) {sizes}; accepted: val_folds "
            f"<= half the largest, or a larger val_images"
        )
    summary = {k: _mean_defined(v) for k, v in out.items()}
    # the alignment the fronts, statistics and searches use: the trial's own metric (the one
    # its loss pushes), the paper's linear score by default
    summary["val_alignment"] = summary[own] if own else _mean_defined(own_values)
    if normalised:
        summary["val_alignment_nc"] = float(np.mean(normalised))
    summary["dead_units"] = float(constant_columns(feats.flatten(1)).double().mean())
    # what was measured, where the settings asked for more than the data hold (val_images
    # above the split, a subject with too few images skipped, pool above the layer's map)
    # (images, not subject-image pairs: NSD subjects share images)
    summary["val_alignment_images"] = float(torch.unique(torch.cat(used)).numel())
    summary["layer_units"] = float(feats[0].numel())
    return summary


# ----------------------------------------------------------------------------- checkpoints


def _trial_device(model) -> torch.device:
    return next(model.parameters()).device


def save_checkpoint(directory: Path, model, optimizer, epoch: int, cfg: TrialConfig) -> Path:
    """Model, optimizer, the last finished epoch and RNG states, so a restored trial continues
    as one that never stopped (exactly on the CPU). The CUDA generator saved is the trial's
    own device's only: all visible GPUs' states could not be restored where fewer are
    visible, and a CPU trial does not start CUDA to save them."""
    device = _trial_device(model)
    state = {
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "config": cfg.asdict(),
    }
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / CHECKPOINT_FILE)
    return directory


def load_checkpoint(directory: Path, model, optimizer, cfg: TrialConfig) -> int:
    """Restore the state saved by ``save_checkpoint``; returns the epoch to start from."""
    path = Path(directory) / CHECKPOINT_FILE
    if not path.is_file():
        raise ValueError(f"no {CHECKPOINT_FILE} in checkpoint directory {directory}")
    try:  # shared storage (NFS, a bucket, a compose volume): never unpickle code
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"checkpoint {path} holds more than tensors and plain data; refused "
                         f"(weights_only): {one_line(exc)[:200]}") from None
    except (RuntimeError, EOFError, OSError) as exc:  # torch's zip reader names no file
        why = exception_line(exc, first_line=True)
        raise ValueError(f"checkpoint {path} cannot be read ({why}): a damaged or truncated "
                         f"copy ({path.stat().st_size} bytes)") from None
    # Settings that change how a trial runs but not what it computes may differ on resume.
    free = ("device", "threads", "epochs", "in_memory_mb", "loader_workers")
    saved = {k: v for k, v in state["config"].items() if k not in free}
    now = {k: v for k, v in cfg.asdict().items() if k not in free}
    if saved != now:
        diff = sorted(k for k in now if saved.get(k) != now[k])
        raise ValueError(f"checkpoint {path} was written by a different config (differs in {diff})")
    done = int(state["epoch"]) + 1
    if cfg.epochs < done:  # (equal: the trial had finished; the resume has nothing to run)
        raise ValueError(f"epochs={cfg.epochs} but checkpoint {path} holds {done} epochs "
                         f"already; accepted: epochs >= {done}")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    device = _trial_device(model)
    cuda_rng = state["cuda_rng"]
    if isinstance(cuda_rng, (list, tuple)):  # checkpoints before this: every visible GPU's
        cuda_rng = cuda_rng[0] if cuda_rng else None
    if cuda_rng is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda_rng, device)
    return done


# ----------------------------------------------------------------------------- the trial


def train(
    config: Mapping[str, Any] | TrialConfig,
    *,
    data: TrialData,
    reference: Reference,
    hooks: Hooks | None = None,
) -> dict[str, float]:
    """Run one trial; returns the final epoch's metrics (also reported through ``hooks``).

    config : a TrialConfig or a plain dict (Ray Tune's), validated here.
    data : the split datasets (``TrialData``); the trial streams them (``BatchFeed``).
    reference : the reference representation (``references.build_reference``).
    hooks : reporting, checkpoint restore and artifact location; default ``LocalHooks`` in a
        temporary directory, removed when the trial ends.
    """
    cfg = config if isinstance(config, TrialConfig) else TrialConfig.from_dict(dict(config))
    if data.image_size != cfg.image_size:
        raise ValueError(
            f"data was prepared at {data.image_size} px but the config asks image_size="
            f"{cfg.image_size}; prepare the data at the trial's image size"
        )
    own = None
    if hooks is None:  # a private folder for checkpoints and artifacts, removed at the end
        own = tempfile.TemporaryDirectory(prefix="alignsweep-trial-", dir=scratch_dir())
        hooks = LocalHooks(Path(own.name))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    fix_mmap_threshold()  # flat memory over many batches (trainable.data.fix_mmap_threshold)
    device = resolve_device(cfg)
    _float32_convolutions(cfg, device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_classes=data.num_classes, width=cfg.width).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    if cfg.voxel_ncsnr_min > 0:
        reference = reference.select_voxels(cfg.voxel_ncsnr_min)
    if hasattr(reference, "to"):
        reference = reference.to(device)
    if cfg.reference_shuffle:
        reference = ShuffledReference(reference, cfg.seed)

    start = 0
    restore = hooks.restore()
    if restore is not None:
        start = load_checkpoint(Path(restore), model, optimizer, cfg)

    workers = loader_workers(cfg.loader_workers, cfg.threads or torch.get_num_threads(), device)
    in_memory = cfg.in_memory_mb * 2**20
    common = dict(workers=workers, device=device, image_size=data.image_size,
                  in_memory_bytes=in_memory, first_epoch=start)
    feeds = [BatchFeed(data.train, schedule=training_schedule(len(data.train), cfg),
                       cacheable=data.augment != "crop_flip",
                       random_items=data.augment == "crop_flip", **common),
             BatchFeed(data.val, schedule=sequential_schedule(len(data.val), cfg.batch_size),
                       **common)]
    train_feed, val_feed = feeds
    try:
        for feed in feeds:
            feed.start()  # streaming workers decode while the validation subset is prepared
        val_subset = validation_subset(data.val, cfg.val_images, workers)
        subset_feed = BatchFeed(val_subset, schedule=sequential_schedule(len(val_subset), 256),
                                workers=0, device=device, image_size=data.image_size,
                                first_epoch=start)
        keyed = _reference_targets(reference, val_subset, cfg, device)
        if hasattr(hooks, "describe"):
            hooks.describe(trial_facts(cfg, device, workers, train_feed, val_feed, reference))
        val_ceilings = _group_ceilings(reference, keyed, val_subset)
        val_groups = [(r.to(device), y.to(device)) for _, r, y in keyed]

        metrics: dict[str, float] = {}
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            metrics = train_one_epoch(model, optimizer, train_feed, reference, cfg, data.task,
                                      epoch, device, data.augment)
            train_seconds = time.perf_counter() - t0
            last = epoch == cfg.epochs - 1
            predictions: dict[str, np.ndarray] | None = {} if last else None
            metrics.update(evaluate(model, val_feed, epoch, data.task, cfg, device,
                                    predictions))
            feats = _forward_all(model, subset_feed, epoch, cfg.layer, cfg, device)
            metrics.update(validation_alignment(feats, val_groups, cfg, val_ceilings))
            metrics["epoch"] = float(epoch)
            metrics["epoch_seconds"] = time.perf_counter() - t0
            metrics["images_per_second"] = metrics["train_images"] / train_seconds
            with tempfile.TemporaryDirectory(prefix="ckpt-", dir=scratch_dir()) as tmp:
                save_checkpoint(Path(tmp), model, optimizer, epoch, cfg)
                if last:
                    art = hooks.artifact_dir()
                    if get_model_spec(cfg.model).conv1:  # the registry knows its first conv
                        filter_grid_png(conv1_weight(model).detach().cpu(),
                                        art / FILTERS_ARTIFACT)
                    (art / FINAL_METRICS_ARTIFACT).write_text(json.dumps(metrics, indent=2))
                    np.savez_compressed(art / PREDICTIONS_ARTIFACT, **predictions)
                hooks.report(metrics, Path(tmp))
    finally:
        for feed in feeds:
            feed.close()
        if own is not None:
            own.cleanup()
    return metrics
