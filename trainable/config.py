"""The trial configuration: one frozen, validated dataclass built once at the trial's entry.

Unknown keys and bad values are rejected with the value named; ``asdict(cfg)`` becomes the
MLflow params of the trial's run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from records import REFERENCE_KINDS  # one source: records

DEVICES = ("auto", "cpu", "cuda")
FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32
PRECISIONS = ("auto", "fp32", "bf16")
#: The smallest ridge_rel accepted. The batch score plateaus as ridge_rel falls (1e-5 and
#: 1e-7 give the same score to 3 decimals at n = 16..256); from 1e-8 the leave-one-out
#: residuals cancel (float32 and float64 disagree), and by 1e-10 they read 0: a score of
#: exactly 1.0 on unrelated random data, recorded as perfect alignment.
RIDGE_REL_MIN = 1e-6


# Upper bounds: far beyond any real run, low enough that a typo (epochs 2**63, a batch of
# 1e12, a 100000-px image) is refused in one line instead of hanging or exhausting memory.
UPPER = {"batch_size": 65536, "epochs": 100_000, "image_size": 4096, "val_folds": 100,
         "val_images": 1_000_000, "align_batch_every": 1_000_000, "seed": 2**31 - 1,
         "pool": 4096, "threads": 1024, "steps_per_epoch": 10_000_000,
         "in_memory_mb": 1 << 22, "lr": 1000.0, "alpha": 1e6, "beta": 1e6,
         "loader_workers": 1024,
         # parameters grow with width squared: AlexNet at 4 has 0.93 G (15 GB with gradients
         # and Adam's state, one large GPU), at 16 it had 14.6 G (a 36 GB first allocation)
         "width": 4.0,
         # the penalty is ridge_rel * trace(K) / n: far above 1 every prediction is ~0 and the
         # score 0; from ~1e200 the score overflows to NaN, failing the trial as "diverged"
         "ridge_rel": 1e6}


@dataclass(frozen=True)
class TrialConfig:
    """Everything one trial needs besides its data and reference.

    model, layer : a registered model and one of its taps (``trainable.models``).
    reference : "gabor", "pretrained" or "nsd": which reference the trial's data carries.
    metric : alignment metric name (``trainable.alignment.METRICS``) used in the loss.
    alpha : signed weight of L_align = -score (alpha > 0 promotes alignment, < 0 suppresses).
    beta : weight of the task loss.
    lr, batch_size, epochs, seed : Adam learning rate, batch size, epochs, seed (init, order).
    image_size : input size in pixels; width : channel multiplier (1.0 = torchvision exactly;
        other values are for the demo scale only).
    ridge_rel : relative ridge penalty of the loss form (lambda = ridge_rel * trace(K) / n).
    loss_folds : 0 = exact leave-one-out inside the batch, k >= 2 = contiguous k-fold.
    val_folds : folds of the validation alignment (cross-validated ridge, 5 in the paper).
    val_images : size of the fixed held-out image set for validation alignment, CKA and RSA.
    pool : 0 = align the full layer; k > 0 = adaptive-average-pool each spatial map (of the
        layer and of a spatial reference) to k x k before alignment. Pooling cuts the cost of
        the n x p Gram matrices by (H*W)/k^2 but discards spatial layout finer than H/k, so the
        default is 0 and the paper's conditions keep it.
    rectify : align ReLU(layer) instead of the layer's tap (taps are the linear stage, e.g.
        AlexNet conv1 before its ReLU; rectified, an AlexNet tap is exactly its post-ReLU
        activation. ResNet-18's conv1 is tapped before its batch norm, so ReLU of it is not
        an activation the network computes; its blocks are post-ReLU already, and rectify
        changes nothing there).
        A pretrained reference (a network tapped as the trainee is) is rectified with it:
        post-ReLU against post-ReLU. Default false: the Gabor bank and a network's layer are
        linear responses like the pre-ReLU tap. Voxel responses pool rectified activity over a receptive field (a
        contrast-energy-like signal, which no linear readout of a linear stage predicts), so
        the NSD conditions set it true.
    device : "auto" (CUDA when visible, else CPU), "cpu" or "cuda".
    precision : "auto" (bf16 autocast on a CUDA GPU of compute capability 8.0 or later, such
        as A100 and H100; fp32 on older GPUs, which only emulate bf16, and on CPU), "fp32" or
        "bf16".
    threads : torch intra-op threads; 0 = leave as is (the sweep sets it from the trial's CPU
        share, since Ray sets OMP_NUM_THREADS=1 in workers).
    align_batch_every : for alpha == 0 the batch alignment is only measured (no gradient) on
        every k-th step of an epoch (steps 0, k, 2k, ...), so the baseline does not pay for a
        loss it does not use; 0 = never (the epoch's batch_alignment and align_loss are then
        NaN; the validation alignment is measured as always).
    steps_per_epoch : 0 = a whole pass over the training split per epoch; k > 0 = at most k
        steps (to try real data quickly: ``--set epochs=1 --set steps_per_epoch=20``).
    in_memory_mb : a split whose decoded uint8 images take at most this many MiB (and whose
        augmentation needs no original file) is decoded once into the trial's memory; larger
        ones stream from disk every epoch (``trainable.data``). 0 = always stream.
    loader_workers : DataLoader worker processes per trial; -1 = from the CPU share
        (``trainable.data.loader_workers``), 0 = load in the trial process.
    voxel_ncsnr_min : voxel references only: keep the voxels whose noise-ceiling SNR (the
        release's ncsnr) is at least this; 0 = every voxel of the ROI.
    reference_shuffle : the negative control: every response of the reference is paired with
        another image of the same batch and group (``trainable.train.ShuffledReference``), in
        training and validation alike, for any reference.
    """

    model: str = "alexnet"
    layer: str = "conv1"
    reference: str = "gabor"
    metric: str = "linear"
    alpha: float = 0.0
    beta: float = 1.0
    lr: float = 1e-4
    batch_size: int = 1000
    epochs: int = 50
    seed: int = 0
    image_size: int = 224
    width: float = 1.0
    ridge_rel: float = 0.1
    loss_folds: int = 0
    val_folds: int = 5
    val_images: int = 1000
    pool: int = 0
    rectify: bool = False
    device: str = "auto"
    precision: str = "auto"
    threads: int = 0
    align_batch_every: int = 10
    steps_per_epoch: int = 0
    in_memory_mb: int = 1024
    loader_workers: int = -1
    voxel_ncsnr_min: float = 0.0
    reference_shuffle: bool = False

    def __post_init__(self) -> None:
        from trainable.models import get_model_spec, model_layers

        def bad(name: str, accepted: str) -> ValueError:
            return ValueError(f"{name}={getattr(self, name)!r}; accepted: {accepted}")

        def one_of(name: str) -> None:
            if getattr(self, name) not in _choices(name):
                raise bad(name, ", ".join(_choices(name)))

        one_of("model")
        if self.layer not in model_layers(self.model):
            raise bad("layer", f"for {self.model}: {', '.join(model_layers(self.model))}")
        one_of("reference")
        one_of("metric")
        for name in ("alpha", "beta"):
            if not math.isfinite(getattr(self, name)):
                raise bad(name, "a finite number")
        if self.beta < 0:
            raise bad("beta", "a number >= 0")
        if not (math.isfinite(self.voxel_ncsnr_min) and self.voxel_ncsnr_min >= 0):
            raise bad("voxel_ncsnr_min", "a number >= 0 (0 = every voxel)")
        if self.voxel_ncsnr_min > 0 and self.reference != "nsd":
            raise bad("voxel_ncsnr_min", f"0 with reference={self.reference!r} (it selects "
                                         f"voxels of an NSD reference)")
        if self.alpha == 0 and self.beta == 0:
            raise ValueError("alpha=0 and beta=0: the loss would be zero; set either")
        for name in ("lr", "ridge_rel", "width"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise bad(name, "a positive number")
        if self.ridge_rel < RIDGE_REL_MIN:
            raise bad("ridge_rel", f"a number >= {RIDGE_REL_MIN:g} (below it the held-out "
                                   f"score loses its precision and reads 1.0 on any data)")
        if self.metric != "linear":  # the held-out ridge's settings: other losses have none
            for name in ("loss_folds", "ridge_rel"):
                default = TrialConfig.__dataclass_fields__[name].default
                if getattr(self, name) != default:
                    raise bad(name, f"{default!r} with metric={self.metric!r} (it sets the "
                                    f"linear metric's held-out ridge; the {self.metric} loss "
                                    f"has none)")
        for name, low in (("batch_size", 4), ("epochs", 1), ("image_size", 16),
                          ("val_folds", 2), ("val_images", 10)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= UPPER[name]:
                raise bad(name, f"an integer in {low}..{UPPER[name]}")
        smallest = get_model_spec(self.model).min_image_size
        if self.image_size < smallest:  # the first forward pass would fail, in every retry
            raise bad("image_size", f"an integer in {max(16, smallest)}..{UPPER['image_size']} "
                                    f"for {self.model} (its smallest input)")
        for name in ("seed", "pool", "threads", "steps_per_epoch", "in_memory_mb",
                     "align_batch_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= UPPER[name]:
                raise bad(name, f"an integer in 0..{UPPER[name]}")
        for name in ("lr", "width", "alpha", "beta", "ridge_rel"):
            if abs(getattr(self, name)) > UPPER[name]:
                raise bad(name, f"a number of magnitude <= {UPPER[name]:g}")
        if self.lr < FLOAT32_TINY:  # Adam's step in float32: a subnormal rate barely trains
            raise bad("lr", f"a number in {FLOAT32_TINY:.4g}..{UPPER['lr']:g} (float32's "
                            f"normal range: the weights' precision)")
        for name in ("alpha", "beta"):
            # the loss is float32 (or bf16): a smaller weight multiplies as a subnormal of a
            # few bits or as 0, running the term (nearly) off while the records call the
            # trial promoting or suppressing
            if 0 < abs(getattr(self, name)) < FLOAT32_TINY:
                raise bad(name, f"0 or a number of magnitude {FLOAT32_TINY:.4g}..{UPPER[name]:g} "
                                f"(float32's normal range: the loss's precision)")
        if (isinstance(self.loader_workers, bool) or not isinstance(self.loader_workers, int)
                or not -1 <= self.loader_workers <= UPPER["loader_workers"]):
            raise bad("loader_workers", f"-1 (from the CPU share) or an integer in "
                                        f"0..{UPPER['loader_workers']}")
        for name in ("rectify", "reference_shuffle"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false")
        if (isinstance(self.loss_folds, bool) or self.loss_folds == 1 or self.loss_folds < 0
                or 2 * self.loss_folds > self.batch_size):
            # k folds of a batch need 2k rows (a fold's model is fitted on the rest)
            raise bad("loss_folds", f"0 (exact leave-one-out) or an integer in "
                                    f"2..batch_size/2 = {self.batch_size // 2}")
        if self.val_images < 2 * self.val_folds:
            raise bad("val_images", f"at least 2 * val_folds = {2 * self.val_folds}")
        one_of("device")
        one_of("precision")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrialConfig:
        """Build from a plain dict (a Ray Tune config); unknown keys are an error. Integral
        floats are accepted for integer fields (search spaces produce floats)."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(
                f"unknown trial config keys {unknown}; accepted: {', '.join(sorted(known))}"
            )
        coerced = {}
        for key, value in values.items():
            coerced[key] = _coerce(key, value, known[key].default)
        return cls(**coerced)

    def asdict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _choices(key: str) -> tuple[str, ...] | None:
    """The values a text setting accepts, None where any text is (one source for the check of
    the value and for a value of another type, ``precision=16``)."""
    if key == "metric":
        from trainable.alignment import METRICS

        return tuple(sorted(METRICS))
    if key == "model":
        from trainable.models import MODELS

        return tuple(sorted(MODELS))
    return {"device": DEVICES, "precision": PRECISIONS, "reference": REFERENCE_KINDS}.get(key)


def _coerce(key: str, value: Any, default: Any) -> Any:
    """``value`` as the type of the field's default: integral floats become ints for integer
    fields (search spaces produce floats), ints become floats for float fields; any other type
    mismatch (a string where a number belongs, a number for a flag) is a one-line error.
    NumPy scalars (a search space or a user's grid built with numpy) count as the Python
    numbers and flags they hold."""
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        value = value.item()
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{key}={value!r}; accepted: true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}={value!r}; accepted: an integer")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key}={value!r}; accepted: a number")
        return float(value)
    if isinstance(default, str) and not isinstance(value, str):
        choices = _choices(key)
        raise ValueError(f"{key}={value!r}; accepted: "
                         f"{', '.join(choices) if choices else 'a string'}")
    return value
