"""The pretrained-network reference: a frozen network's activations at a named layer.

Weights come from one of three places (the ``weights`` spec):

* ``"torchvision"`` (paper scale): torchvision's ImageNet file in the local torch hub cache,
  ``torch.hub.get_dir()/checkpoints/`` (``alexnet-owt-7be5be79.pth``,
  ``resnet18-f37072fd.pth``; ``$TORCH_HOME/hub/checkpoints`` when TORCH_HOME is set);
* a file path: a state dict (torchvision's keys, or a :class:`~trainable.models.TappedModel`'s
  with the ``net.`` prefix, or either under a ``"state_dict"``/``"model"`` key);
* ``"auto"`` (offline / demo scale): the project trains its own reference network on the
  sweep's dataset, task only, with its own seed (:func:`train_reference_network`), caches it
  under ``cache_root()/reference-networks/`` by a content hash of everything that determines it,
  and reuses it. A file lock (``build_once``) makes concurrent trials or drivers train it once.

Files are read with ``torch.load(weights_only=True)``; nothing is ever downloaded. With no
weights available :class:`WeightsNotFoundError` (a ValueError) says in one line how to supply
them. The number of classes and the width multiplier are read off the state dict (head rows and
conv1 channels), so a 1000-class ImageNet file and a 10-class demo network load the same way.

Every reference kind answers ``targets(images, image_ids) -> [(rows, Y)]``; the pretrained one
returns a single group with every row.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import time
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from records.errors import exception_line
from references.base import ImageReference
from references.cache import (
    DamagedCacheEntry,
    build_once,
    cache_root,
    content_hash,
    damaged_entry,
)
from references.hub import TORCHVISION_WEIGHT_FILES, hub_checkpoints_dir
from trainable.data import flip_mask, normalize
from trainable.models import TappedModel, _scaled, build_model, get_model_spec

__all__ = [
    "TORCHVISION_WEIGHT_FILES",
    "PretrainedReference",
    "ReferenceTraining",
    "WeightsNotFoundError",
    "auto_reference_network",
    "dataset_fingerprint",
    "find_weights",
    "hub_checkpoints_dir",
    "load_network",
    "pretrained_reference",
    "train_reference_network",
]

_CACHE_SUBDIR = "reference-networks"
_WEIGHTS_FILE = "weights.pt"
_META_FILE = "meta.json"
# Bump when train_reference_network changes what it produces, so old cache entries are not
# mistaken for new ones. 2: uint8 items normalised per batch; "flip" datasets flipped per batch.
_RECIPE_VERSION = 3  # 3: the simulated world seen whole (not 256/224 centre-cropped)


class WeightsNotFoundError(ValueError):
    """No weights where the spec pointed; the message says how to supply them."""


def find_weights(model_name: str, weights: str | os.PathLike = "torchvision") -> Path:
    """Resolve a weights spec ("torchvision" or a file path) to an existing file.

    Raises WeightsNotFoundError naming the expected file and the --weights option.
    """
    get_model_spec(model_name)
    if str(weights) == "auto":
        raise ValueError("find_weights resolves files; 'auto' is handled by "
                         "pretrained_reference / auto_reference_network")
    if str(weights) == "torchvision":
        if model_name not in TORCHVISION_WEIGHT_FILES:
            raise WeightsNotFoundError(
                f"torchvision has no ImageNet weights file for {model_name!r} here "
                f"(known: {', '.join(sorted(TORCHVISION_WEIGHT_FILES))}); pass --weights PATH "
                f"or --weights auto")
        path = hub_checkpoints_dir() / TORCHVISION_WEIGHT_FILES[model_name]
        if not path.is_file():
            raise WeightsNotFoundError(
                f"no ImageNet weights for {model_name}: put {path.name} in {path.parent} "
                f"(torch.hub.get_dir()/checkpoints), or pass --weights PATH to a state dict, "
                f"or --weights auto to train the project's own reference network")
        return path
    path = Path(weights).expanduser()
    if path.is_dir():
        raise WeightsNotFoundError(
            f"weights {str(path)!r} for {model_name} is a folder; pass --weights PATH to a "
            f"state dict file (torch.save(model.state_dict(), PATH)), --weights torchvision or "
            f"--weights auto")
    if not path.is_file():
        raise WeightsNotFoundError(
            f"weights file {str(path)!r} for {model_name} does not exist; pass --weights PATH "
            f"to a state dict, --weights torchvision (expects "
            f"{TORCHVISION_WEIGHT_FILES.get(model_name, '<none>')} in {hub_checkpoints_dir()}), "
            f"or --weights auto")
    return path


#: Key prefixes a wrapper puts on a network's state dict: a TappedModel (``net.``),
#: DataParallel / DistributedDataParallel (``module.``), a LightningModule holding the network
#: as ``self.model`` (``model.``). Stripped while every key has one, in any nesting.
_WRAPPER_PREFIXES = ("net.", "module.", "model.", "_orig_mod.")
#: Path components a wrapper puts inside keys: DataParallel around one submodule
#: (pytorch/examples' ImageNet script wraps AlexNet's ``features``:
#: ``features.module.0.weight``) and torch.compile (``_orig_mod``). Dropped when the network's
#: keys are found only without them.
_WRAPPER_PARTS = frozenset({"module", "_orig_mod"})
_SAVE_HINT = "save the network's weights with torch.save(model.state_dict(), PATH)"


#: Objects a training checkpoint carries beside its weights (Lightning's hyper_parameters: an
#: argparse.Namespace of the script's arguments, numpy scalars and arrays) that only hold data:
#: weights_only refuses them by default, and a file whose only such objects are these is read
#: with them allowed (anything else, e.g. a whole pickled model, is still refused).
_DATA_GLOBALS = re.compile(r"argparse\.Namespace|numpy\.(?:_core|core)\.multiarray\."
                           r"(?:scalar|_reconstruct)|numpy\.ndarray|numpy\.dtype|"
                           r"numpy\.dtypes\.\w+DType")


def _load_allowing_data(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # not a zip checkpoint: the first error says what it is
            raise exc from None
        data = [n for n in names if _DATA_GLOBALS.fullmatch(n)]
        if not data:
            raise
        # Loaded again with them allowed: anything else is refused as before, and named as
        # the first such object the file holds (not the allowed one met first).
        allowed = []
        for name in data:
            module, _, attr = name.rpartition(".")
            allowed.append(getattr(importlib.import_module(module), attr))
        if any(n.startswith("numpy.") for n in data):  # a scalar's dtype class, met only
            allowed += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)


def _is_torchscript(path: Path) -> bool:
    """A ``torch.jit.save`` archive (a zip holding ``constants.pkl``, as torch.load tells)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.rsplit("/", 1)[-1] == "constants.pkl"
                       for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _clipped(text: str, limit: int = 300) -> str:
    """``text`` at most ``limit`` characters, cut at a word with "..." (not mid-word)."""
    if len(text) <= limit:
        return text
    return text[: limit - 3].rsplit(" ", 1)[0].rstrip(" ,;:") + "..."


def _read_weights(path: Path) -> object:
    """``torch.load(path, weights_only=True)`` (a checkpoint's data-only objects allowed:
    ``_DATA_GLOBALS``); whatever it raises (a truncated or empty file, a text file, a whole
    pickled model, which weights_only refuses) is a ValueError in one line naming the file.
    A TorchScript archive is refused before torch.load (which warns about it on stderr)."""
    if _is_torchscript(path):
        raise ValueError(f"{path}: a TorchScript archive (torch.jit.save), whose code is never "
                         f"run here; {_SAVE_HINT}")
    try:
        return _load_allowing_data(path)
    except Exception as exc:
        text = str(exc)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", text, re.S)
        if found:
            why = (f"it holds pickled Python objects ({found.group(1)}: e.g. a whole model "
                   f"saved with torch.save(model)), which are never unpickled here")
        elif "Weights only load failed" in text:
            why = ("not a file torch.save wrote"
                   + (f": {' '.join(detail.group(1).split())}" if detail else ""))
        else:
            why = exception_line(exc, None, first_line=True)
            if isinstance(exc, EOFError) or path.stat().st_size == 0:
                why = f"empty or truncated file ({why})"
        raise ValueError(f"{path}: cannot read as a state dict ({_clipped(why)}); "
                         f"{_SAVE_HINT}") from None


#: Where a training checkpoint keeps the network's state dict: Lightning's and most scripts'
#: "state_dict", PyTorch's tutorial "model_state_dict", "model".
_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")


def _unwrap_state_dict(obj: object, path: Path,
                       wanted: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The network's state dict inside what a file holds: itself, or under one of
    ``_CHECKPOINT_KEYS`` (a training checkpoint), wrapper prefixes stripped. When the keys
    ``wanted`` are found only under a wrapper prefix that some keys lack (a Lightning module
    holding the network as ``self.model`` beside a loss's buffer), the prefixed entries are
    the network's and the others are left out."""
    if isinstance(obj, Mapping):
        for key in _CHECKPOINT_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
        else:
            if any(isinstance(v, Mapping) for v in obj.values()):  # a checkpoint's nesting
                raise ValueError(
                    f"{path}: a checkpoint without the network's state dict under any of "
                    f"{', '.join(map(repr, _CHECKPOINT_KEYS))} (its keys: "
                    f"{', '.join(map(str, list(obj)[:5]))}); {_SAVE_HINT}")
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got "
                         f"{type(obj).__name__}; {_SAVE_HINT}")
    key = next((k for k in obj if not isinstance(k, str)), None)
    if key is not None:  # (torch.save({1: ...}): the prefix search met it as a name)
        raise ValueError(f"{path}: expected a state dict (name -> tensor), but key {key!r} is "
                         f"a {type(key).__name__}; {_SAVE_HINT}")
    other = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
    if other is not None:
        raise ValueError(f"{path}: expected a state dict (name -> tensor), but entry "
                         f"{other!r} is a {type(obj[other]).__name__}; {_SAVE_HINT}")
    sd = dict(obj)
    while sd:
        prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in sd)), None)
        if prefix is None:
            if wanted and not all(k in sd for k in wanted):
                prefix = next((p for p in _WRAPPER_PREFIXES
                               if all(p + k in sd for k in wanted)), None)
            if prefix is None:
                break
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if wanted and not all(k in sd for k in wanted):
        bare = {".".join(p for p in k.split(".") if p not in _WRAPPER_PARTS): v
                for k, v in sd.items()}
        if len(bare) == len(sd) and all(k in bare for k in wanted):
            sd = bare
    return sd


def _mismatch(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor]) -> str:
    """What differs between a model's state dict and a file's, in a few words."""
    def some(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    shapes = sorted(k for k in set(expected) & set(got) if expected[k].shape != got[k].shape)
    parts = []
    if missing:
        parts.append(f"missing {some(missing)}")
    if extra:
        parts.append(f"unexpected {some(extra)}")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} shape(s) differ, e.g. {k}: file {tuple(got[k].shape)}, "
                     f"model {tuple(expected[k].shape)}")
    return "; ".join(parts) or "the values do not load"


def _infer_width(model_name: str, sd: Mapping[str, torch.Tensor], classes: int,
                 guess: float) -> float:
    """The width multiplier whose layers have the file's channel counts: every scaled output
    dimension (one that differs between the model at width 1 and 0.5) of width-1 size c holds
    ``max(1, round(c * w))`` channels in the file. conv1 alone (``guess``) does not round-trip:
    width 0.3 gives conv1 round(19.2) = 19 channels, read back as 0.296875, which gives conv2
    57 channels where the file has round(57.6) = 58. Returns ``guess`` when it fits, else the
    shortest decimal that fits every layer, else ``guess`` (the load then says what differs)."""
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        one = build_model(model_name, num_classes=classes, width=1.0).net.state_dict()
        half = build_model(model_name, num_classes=classes, width=0.5).net.state_dict()
    pairs = []  # (width-1 channels, the file's)
    for key, t in one.items():
        got = sd.get(key)
        if got is None or got.dim() != t.dim():
            continue
        # output channels / units only: an input size can be derived (AlexNet's fc1 takes
        # round(256 w) x 36 inputs, not round(9216 w))
        if t.dim() and half[key].shape[0] != t.shape[0]:
            pairs.append((t.shape[0], got.shape[0]))

    def fits(w: float) -> bool:
        return w > 0 and all(_scaled(c, w) == f for c, f in pairs)

    if not pairs or fits(guess):
        return guess
    lo = max((f - 0.5) / c if f > 1 else 0.0 for c, f in pairs)
    hi = min((f + 0.5) / c for c, f in pairs)
    for digits in range(1, 9):
        for w in (round((lo + hi) / 2, digits), round(lo, digits), round(hi, digits)):
            if fits(w):
                return w
    return guess


def load_network(model_name: str, weights: str | os.PathLike = "torchvision", *,
                 width: float | None = None) -> TappedModel:
    """A :class:`TappedModel` with the weights of a file ("torchvision" or a path), CPU,
    eval mode. num_classes is read from the head's rows; width (None) from the layers' channel
    counts (``_infer_width``)."""
    spec = get_model_spec(model_name)
    path = find_weights(model_name, weights)
    head_key = f"{spec.head}.weight"
    conv1_key = f"{spec.taps[spec.conv1].path}.weight"
    sd = _unwrap_state_dict(_read_weights(path), path, (head_key, conv1_key))
    if head_key not in sd or conv1_key not in sd:
        some = ", ".join(list(sd)[:3]) or "none"
        raise ValueError(f"{path} is not a state dict of {model_name}: missing {head_key!r} or "
                         f"{conv1_key!r} (its keys: {some}, ...)")
    for key, dims in ((head_key, 2), (conv1_key, 4)):
        if sd[key].dim() != dims or not sd[key].shape[0]:
            raise ValueError(f"{path}: {key} has shape {tuple(sd[key].shape)}; expected a "
                             f"{dims}-D weight of {model_name} with at least one "
                             f"{'class' if key == head_key else 'channel'}")
    given = width is not None
    classes = int(sd[head_key].shape[0])
    if width is None:
        width = _infer_width(model_name, sd, classes, sd[conv1_key].shape[0] / spec.base_width)
    try:
        model = build_model(model_name, num_classes=classes, width=width)
    except ValueError as e:
        raise ValueError(f"{path}: {conv1_key} has {sd[conv1_key].shape[0]} channels, width "
                         f"{width:g} of {model_name}: {e}") from None
    own = model.net.state_dict()
    for key, t in sd.items():  # load_state_dict casts: int weights, complex ones' real part
        if key in own and own[key].is_floating_point() and not t.is_floating_point():
            raise ValueError(f"{path}: {key} holds {t.dtype} values; expected floating-point "
                             f"weights (as torch.save(model.state_dict()) writes them)")
    try:
        model.net.load_state_dict(sd)
    except RuntimeError:
        raise ValueError(f"{path} does not fit {model_name} (width {width:g}"
                         f"{' as given' if given else ''}, {classes} classes, read off the "
                         f"file): "
                         f"{_mismatch(own, sd)}") from None
    bad = next((k for k, t in model.net.state_dict().items()
                if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:  # every trial failed in the reference's first ridge, naming no file
        raise ValueError(f"{path}: {bad} holds NaN or infinite values; expected finite weights "
                         f"(a network saved after it diverged?)")
    _check_activations(model.eval(), path)
    return model


def _check_activations(model: TappedModel, path: Path) -> None:
    """Finite weights can still give a layer no finite value (a BatchNorm's negative running
    variance gives NaN, weights 1e8 times too large overflow float32 a few layers in): every
    trial then failed in its first ridge, naming no file. Refused here, from the running
    variances and one forward pass of a fixed random 224 px image through every tap."""
    for key, t in model.net.state_dict().items():
        if key.endswith("running_var") and bool((t < 0).any()):
            raise ValueError(f"{path}: {key} holds negative values ({float(t.min()):.3g}); "
                             f"expected a BatchNorm's running variances (>= 0)")
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, taps = model(image, taps=model.layers)
    for name, t in (*taps.items(), ("the output", logits)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{path}: the network's {name} is NaN or infinite on a test image "
                             f"although every weight is finite (weights far too large?); "
                             f"expected a network whose activations are finite")


def _convolutions_to(network: TappedModel, layer: str) -> int:
    """How many convolutions the forward runs up to ``layer``'s tap, those inside the tapped
    module included: torchvision's AlexNet and ResNet register their modules in forward order
    (``named_modules`` walks them parents first)."""
    path = network.spec.taps[layer].path
    count, reached = 0, False
    for name, module in network.net.named_modules():
        if name == path or name.startswith(path + "."):
            reached = True
        elif reached:
            break
        count += isinstance(module, nn.Conv2d)
    return count


class PretrainedReference(ImageReference):
    """A frozen network's activations at ``layer`` as a reference.

    ``representation(images)`` : images (n, 3, H, W), normalised as the trainee sees them ->
    the layer's tap (e.g. AlexNet conv1 (n, 64, H', W'), fc1 (n, 4096)), computed in eval mode
    under ``torch.no_grad`` on the images' device (the network moves there on first use); the
    forward stops after the layer. dtype: the images' (or autocast's, inside torch.autocast).
    ``targets(images, image_ids)`` -> ``[(arange(n), representation(images))]``.

    The network's parameters have ``requires_grad=False`` and it is put back in eval mode before
    every call, so dropout is off and batch-norm running statistics never move. Where the
    forward to the layer runs more than one convolution (``channels_last``) it runs in
    channels-last memory layout (the layer comes back in it; its logical NCHW shape and values
    are unchanged, to float rounding): oneDNN and cuDNN convolve NHWC without reordering every
    layer, and on this 2-core CPU AlexNet's forward to conv5 at batch 128 and 224 px took 0.86 s
    against 1.10 s (tests/benchmarks/bench_paper_shape.py's "reference on the batch"). A layer
    at the first convolution (AlexNet's and ResNet's conv1) has nothing to gain and pays the
    images' reordering and the layer's flattening copy: at the demo shape (batch 50, 64 px)
    conv1 took 1.0 ms channels-last against 0.5 ms in the images' own layout.
    """

    name = "pretrained"

    def __init__(self, network: TappedModel, layer: str, *, source: str = "") -> None:
        network.check_layers((layer,))
        self.channels_last = _convolutions_to(network, layer) > 1
        self.network = network.eval().requires_grad_(False)
        if self.channels_last:
            self.network.to(memory_format=torch.channels_last)
        self.layer = layer
        self.source = source

    @property
    def model_name(self) -> str:
        return self.network.name

    def representation(self, images: torch.Tensor) -> torch.Tensor:
        if self.network.training:
            self.network.eval()
        first = next(self.network.parameters())
        if first.device != images.device:
            self.network.to(images.device)
        if images.dim() == 4 and self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            return self.network.features(images, (self.layer,))[self.layer]


# ----------------------------------------------------------------------------- "auto"


@dataclass(frozen=True)
class ReferenceTraining:
    """How ``"auto"`` trains the project's own reference network (task only, Adam).

    seed : its own seed, distinct from the trials' (the reference must be an independent
        network, not the trainee's twin).
    width : width multiplier of the reference network (demo scale may shrink it).
    """

    epochs: int = 10
    seed: int = 10_000
    lr: float = 1e-4
    batch_size: int = 128
    width: float = 1.0

    def __post_init__(self) -> None:
        for name in ("epochs", "seed", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "seed" else 1):
                raise ValueError(f"ReferenceTraining.{name} must be a "
                                 f"{'non-negative' if name == 'seed' else 'positive'} int, "
                                 f"got {v!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"ReferenceTraining.lr must be > 0, got {self.lr!r}")


DataLike = Dataset | tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _as_dataset(data: DataLike) -> Dataset:
    if isinstance(data, tuple):
        if len(data) != 3 or not all(isinstance(t, torch.Tensor) for t in data):
            raise ValueError("data as tensors must be (images (N, 3, H, W) float32, targets, "
                             f"image_ids), got a tuple of {len(data)}")
        return TensorDataset(*data)
    if not isinstance(data, Dataset):
        raise ValueError(f"data must be a torch Dataset or (images, targets, image_ids) "
                         f"tensors, got {type(data).__name__}")
    return data


def dataset_fingerprint(data: DataLike) -> str:
    """Content hash of in-memory data: a TensorDataset or (images, targets, image_ids) tensors
    (SHA-256 over every tensor's dtype, shape and bytes). Other datasets (files on disk, random
    augmentation) have no cheap content identity: pass ``dataset_key`` instead."""
    ds = _as_dataset(data)
    if not isinstance(ds, TensorDataset):
        raise ValueError(f"cannot fingerprint a {type(ds).__name__} by content; pass "
                         f"dataset_key= (a JSON-serialisable description of the dataset, e.g. "
                         f"the sweep's data section)")
    h = hashlib.sha256()
    for t in ds.tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def train_reference_network(
    model_name: str,
    data: DataLike,
    *,
    num_classes: int,
    multilabel: bool,
    epochs: int,
    seed: int,
    lr: float = 1e-4,
    batch_size: int,
    width: float,
    device: torch.device | str,
    image_size: int,
    num_workers: int = 0,
) -> TappedModel:
    """Train a network on the task alone: the "auto" reference network. Pure: no global state.

    data : a Dataset with the item protocol of ``trainable.data`` ``(image (3, S, S), target,
        image_id int64)``, image uint8 (normalised here per batch) or float32 already
        normalised, target int64 class (single-label) or float32 (num_classes,) multi-hot
        (multi-label); or those three as stacked tensors. S must equal ``image_size``. A
        dataset whose ``augment`` is "flip" has half of each batch flipped, as trials do.
    Loss: cross-entropy (single-label) or per-class BCE-with-logits (multi-label); Adam(lr);
    ``epochs`` passes in an order shuffled by ``seed``, each dropping its incomplete last batch
    (unless the dataset is smaller than one batch).
    Deterministic by ``seed``: initialisation, shuffling and any augmentation in the dataset
    (drawn from torch's global RNG) run inside a forked RNG seeded with ``seed``, so the
    caller's RNG state is untouched. Bit-identical on CPU; CUDA kernels may differ in the last
    bits between runs.
    Returns the network on ``device`` in eval mode.
    """
    device = torch.device(device)
    ds = _as_dataset(data)
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        model = build_model(model_name, num_classes=num_classes, width=width).to(device)
        # A ragged last batch is dropped (when there is a full one): a batch of one image
        # breaks batch norm on 1x1 maps (ResNet-18 block4 at 32 px) and adds a noisy step.
        loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                            generator=torch.Generator().manual_seed(seed),
                            drop_last=len(ds) >= batch_size, pin_memory=device.type == "cuda")
        loss_fn: nn.Module = nn.BCEWithLogitsLoss() if multilabel else nn.CrossEntropyLoss()
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        model.train()
        flip = getattr(ds, "augment", "none") == "flip"
        for epoch in range(epochs):
            for step, (images, targets, _ids) in enumerate(loader):
                if tuple(images.shape[1:]) != (3, image_size, image_size):
                    raise ValueError(f"reference training expects images (3, {image_size}, "
                                     f"{image_size}), got {tuple(images.shape[1:])}")
                images = images.to(device, non_blocking=True)
                if images.dtype == torch.uint8:
                    images = normalize(images)
                if flip:
                    m = flip_mask(images.shape[0], seed, epoch, step).to(device)
                    images = torch.where(m[:, None, None, None], images.flip(-1), images)
                targets = targets.to(device, non_blocking=True)
                targets = targets.float() if multilabel else targets.long()
                loss = loss_fn(model(images), targets)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"reference network loss is {loss.item()}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return model.eval()


def auto_reference_network(
    model_name: str,
    data: DataLike,
    *,
    num_classes: int,
    multilabel: bool,
    image_size: int,
    training: ReferenceTraining = ReferenceTraining(),
    dataset_key: object = None,
    device: torch.device | str = "cpu",
) -> tuple[TappedModel, Path]:
    """The project's own reference network, trained once and cached.

    Cache entry: ``cache_root()/reference-networks/<model>-<hash>/`` (weights.pt, meta.json),
    hash = content_hash of (recipe version, model, num_classes, multilabel, image_size,
    dataset identity, epochs, seed, lr, batch_size, width). The dataset identity is
    ``dataset_key`` when given (any JSON-serialisable description, e.g. the sweep's data
    section), else :func:`dataset_fingerprint` of in-memory data. The device is not part of the
    key: the first builder's device wins. Concurrent callers (trials, drivers, processes) wait on
    one file lock; exactly one trains. Returns (network on CPU in eval mode, entry directory).
    """
    spec = get_model_spec(model_name)
    identity = dataset_fingerprint(data) if dataset_key is None else dataset_key
    key = {
        "kind": "reference-network",
        "recipe": _RECIPE_VERSION,
        "model": spec.name,
        "num_classes": num_classes,
        "multilabel": bool(multilabel),
        "image_size": image_size,
        "dataset": identity,
        **asdict(training),
    }
    entry = cache_root() / _CACHE_SUBDIR / f"{spec.name}-{content_hash(key)}"
    with build_once(entry) as tmp:
        if tmp is not None:
            start = time.perf_counter()
            net = train_reference_network(
                model_name, data, num_classes=num_classes, multilabel=multilabel,
                epochs=training.epochs, seed=training.seed, lr=training.lr,
                batch_size=training.batch_size, width=training.width, device=device,
                image_size=image_size)
            torch.save({k: v.cpu() for k, v in net.net.state_dict().items()},
                       tmp / _WEIGHTS_FILE)
            meta = {"key": key, "train_seconds": time.perf_counter() - start,
                    "device": str(device), "torch": torch.__version__}
            (tmp / _META_FILE).write_text(json.dumps(meta, indent=1, default=str))
    try:
        return load_network(model_name, entry / _WEIGHTS_FILE, width=training.width), entry
    except ValueError as exc:  # the file a finished build wrote cannot be read back
        why = str(exc).replace(str(entry / _WEIGHTS_FILE), _WEIGHTS_FILE)
        raise DamagedCacheEntry(damaged_entry(entry, why)) from None


def pretrained_reference(
    model_name: str,
    layer: str,
    weights: str | os.PathLike = "torchvision",
    *,
    width: float | None = None,
    data: DataLike | None = None,
    num_classes: int | None = None,
    multilabel: bool = False,
    image_size: int | None = None,
    training: ReferenceTraining = ReferenceTraining(),
    dataset_key: object = None,
    device: torch.device | str = "cpu",
) -> PretrainedReference:
    """Build the pretrained-network reference for ``model_name`` at ``layer``.

    weights : "torchvision" (hub cache file), a state-dict path, or "auto".
    width : for a file, override the width read off conv1 (rarely needed).
    data, num_classes, multilabel, image_size, training, dataset_key, device : "auto" only --
        the sweep's training split and task, see :func:`auto_reference_network`.
    """
    spec = get_model_spec(model_name)
    if layer not in spec.taps:
        raise ValueError(f"unknown layer {layer!r} for model {model_name!r}; accepted: "
                         f"{', '.join(spec.layers)}")
    if str(weights) == "auto":
        missing = [n for n, v in (("data", data), ("num_classes", num_classes),
                                  ("image_size", image_size)) if v is None]
        if missing:
            raise ValueError(f"weights='auto' trains a reference network and needs "
                             f"{', '.join(missing)}")
        net, entry = auto_reference_network(
            model_name, data, num_classes=num_classes, multilabel=multilabel,
            image_size=image_size, training=training, dataset_key=dataset_key, device=device)
        return PretrainedReference(net, layer, source=f"auto:{entry}")
    path = find_weights(model_name, weights)
    return PretrainedReference(load_network(model_name, path, width=width), layer,
                               source=str(path))
