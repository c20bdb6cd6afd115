"""Vision models with named layer taps, by name (a timm-style registry).

``build_model("alexnet", num_classes=10)`` returns a :class:`TappedModel`: torchvision's network
(in ``model.net``, with torchvision's own state-dict keys) plus named taps that capture a layer's
output without changing the forward pass::

    logits = model(x)                                   # (n, num_classes)
    logits, taps = model(x, taps=("conv1", "fc1"))      # taps["conv1"]: (n, 64, H1, W1)
    taps = model.features(x, ("conv1",))                # stops after the last requested tap

Taps (``model_layers(name)``):

* ``alexnet``: ``conv1`` .. ``conv5`` are the outputs of the five Conv2d layers, and ``fc1``,
  ``fc2`` the outputs of the first two Linear layers of the classifier, all **before their
  ReLU**. Why pre-ReLU: the paper compares conv1 with Gabor filter responses, which are linear
  filters of the image, so the linear stage of each layer is the like-for-like quantity; every
  conv/fc tap follows the same rule so a layer's tap always means "the layer's linear output".
  (torchvision's ReLUs are in place, so these taps are copied at capture; see ``Tap.clone``.)
  conv1 is 11x11, stride 4, padding 2: at 224 px it is (n, 64, 55, 55), at 64 px (n, 64, 15, 15).
* ``resnet18``: ``conv1`` is the output of the stem convolution (7x7, stride 2), before its
  batch norm and ReLU -- the same "linear stage" rule; ``block1`` .. ``block4`` are the outputs
  of ``layer1`` .. ``layer4``, i.e. the residual stream after each stage's final ReLU (a
  residual stage has no pre-ReLU output that is the whole stage's output).

Image size: torchvision's AlexNet needs at least 63 px (its three 3x3/stride-2 max pools leave
nothing below that; the adaptive average pool then upsamples the 1x1 map to 6x6), so the demo
uses 64 px; ResNet-18 ends in an adaptive pool and accepts any size (32 px: block4 is 1x1).
Smaller inputs raise ValueError naming the minimum.

Width multiplier (demo scale only): ``width`` scales every hidden channel/unit count to
``max(1, round(c * width))`` -- AlexNet's conv channels (64, 192, 384, 256, 256) and fc units
(4096, 4096); ResNet-18's stage widths (64, 128, 256, 512) -- and leaves depth, kernel sizes,
strides and the forward pass unchanged. ``width=1.0`` is exactly torchvision's architecture and
initialisation (the paper scale).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from trainable.registry import Registry

__all__ = [
    "MODELS",
    "ModelSpec",
    "Tap",
    "TappedModel",
    "build_model",
    "conv1_weight",
    "get_model_spec",
    "model_layers",
    "register_model",
]


@dataclass(frozen=True)
class Tap:
    """Where a named tap reads: the output of the submodule at ``path`` (a dotted path inside
    the torchvision network). ``clone``: the next operation modifies that output in place
    (torchvision's ``ReLU(inplace=True)``), so the hook stores a copy; without it the tap would
    silently become post-ReLU. A registry entry that gets this wrong is caught at run time:
    a captured tensor whose version counter moves during the forward raises RuntimeError."""

    path: str
    clone: bool = False


@dataclass(frozen=True)
class ModelSpec:
    """A registered model.

    factory : (num_classes, width) -> torchvision nn.Module
    taps : tap name -> :class:`Tap`, in forward order
    conv1 : tap name of the first convolution (its weight is the filter-grid figure)
    head : dotted path of the final classification Linear (its out_features = num_classes)
    base_width : conv1 output channels at width 1.0 (lets a state dict reveal its width)
    min_image_size : smallest square input, in pixels, the architecture accepts
    """

    name: str
    factory: Callable[[int, float], nn.Module]
    taps: Mapping[str, Tap]
    conv1: str
    head: str
    base_width: int
    min_image_size: int
    description: str = ""
    layers: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.taps))


MODELS: Registry[ModelSpec] = Registry("model")


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` to :data:`MODELS` (names are unique)."""
    return MODELS.register(spec.name, spec)


def get_model_spec(name: str) -> ModelSpec:
    """Registry lookup; unknown names raise ValueError listing the accepted ones."""
    return MODELS.get(name)


def model_layers(name: str) -> tuple[str, ...]:
    """The tap names of model ``name``, in forward order."""
    return get_model_spec(name).layers


def _check_width(width: float) -> float:
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not (
        math.isfinite(width) and width > 0
    ):
        raise ValueError(f"width must be a finite number > 0 (1.0 = torchvision's "
                         f"architecture), got {width!r}")
    return float(width)


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


# ----------------------------------------------------------------------------- AlexNet

_ALEXNET_CONV = (64, 192, 384, 256, 256)
_ALEXNET_FC = 4096


def _alexnet(num_classes: int, width: float) -> nn.Module:
    """torchvision AlexNet; for width != 1 every Conv2d/Linear is replaced, at the same index
    and with the same geometry, by one with scaled channel counts (default PyTorch init, which
    is what torchvision's AlexNet uses), so the forward pass is torchvision's own."""
    import torchvision  # here, not at the top: reading a spec costs no torchvision import (2 s)

    net = torchvision.models.alexnet(weights=None, num_classes=num_classes)
    if width == 1.0:
        return net
    convs = [i for i, m in enumerate(net.features) if isinstance(m, nn.Conv2d)]
    in_ch = 3
    for i, base in zip(convs, _ALEXNET_CONV, strict=True):
        old = net.features[i]
        out_ch = _scaled(base, width)
        net.features[i] = nn.Conv2d(in_ch, out_ch, old.kernel_size, old.stride, old.padding)
        in_ch = out_ch
    pooled = net.avgpool.output_size
    fc = _scaled(_ALEXNET_FC, width)
    net.classifier[1] = nn.Linear(in_ch * pooled[0] * pooled[1], fc)
    net.classifier[4] = nn.Linear(fc, fc)
    net.classifier[6] = nn.Linear(fc, num_classes)
    return net


register_model(ModelSpec(
    name="alexnet",
    factory=_alexnet,
    taps={
        "conv1": Tap("features.0", clone=True),
        "conv2": Tap("features.3", clone=True),
        "conv3": Tap("features.6", clone=True),
        "conv4": Tap("features.8", clone=True),
        "conv5": Tap("features.10", clone=True),
        "fc1": Tap("classifier.1", clone=True),
        "fc2": Tap("classifier.4", clone=True),
    },
    conv1="conv1",
    head="classifier.6",
    base_width=_ALEXNET_CONV[0],
    min_image_size=63,
    description="torchvision AlexNet; conv/fc taps are pre-ReLU",
))


# ----------------------------------------------------------------------------- ResNet-18

_RESNET_STAGES = (64, 128, 256, 512)


def _resnet18(num_classes: int, width: float) -> nn.Module:
    """torchvision ResNet-18; for width != 1 the stem and the four stages are rebuilt with
    torchvision's own ``_make_layer`` at scaled widths and re-initialised exactly as
    ``ResNet.__init__`` does (Kaiming-normal fan_out convs, unit/zero batch norms)."""
    import torchvision

    net = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    if width == 1.0:
        return net
    block = torchvision.models.resnet.BasicBlock
    widths = [_scaled(c, width) for c in _RESNET_STAGES]
    net.inplanes = widths[0]
    net.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(widths[0])
    net.layer1 = net._make_layer(block, widths[0], 2)
    net.layer2 = net._make_layer(block, widths[1], 2, stride=2)
    net.layer3 = net._make_layer(block, widths[2], 2, stride=2)
    net.layer4 = net._make_layer(block, widths[3], 2, stride=2)
    net.fc = nn.Linear(widths[3] * block.expansion, num_classes)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    return net


register_model(ModelSpec(
    name="resnet18",
    factory=_resnet18,
    taps={
        "conv1": Tap("conv1"),
        "block1": Tap("layer1"),
        "block2": Tap("layer2"),
        "block3": Tap("layer3"),
        "block4": Tap("layer4"),
    },
    conv1="conv1",
    head="fc",
    base_width=_RESNET_STAGES[0],
    min_image_size=1,
    description="torchvision ResNet-18; conv1 pre-BN, blocks = stage outputs (post-ReLU)",
))


# ----------------------------------------------------------------------------- tapped model


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once every requested tap is captured."""


class TappedModel(nn.Module):
    """A registered torchvision network (``self.net``) with named taps.

    ``forward(x)`` -> logits (n, num_classes), exactly torchvision's forward.
    ``forward(x, taps=names)`` -> (logits, {name: activation}); activations keep their graph,
    so an alignment loss on them trains the network.
    ``features(x, names)`` -> {name: activation}, ending the pass after the last requested tap
    (a frozen reference network at conv1 never runs conv2..fc).

    x : (n, 3, H, W) float, H and W >= the model's ``min_image_size``.
    Taps are forward hooks registered for one call and removed after it, so the module holds no
    per-call state and the untapped forward is torchvision's, untouched. The state dict is
    ``net``'s with a ``net.`` prefix; load torchvision weights with ``model.net.load_state_dict``.
    """

    def __init__(self, spec: ModelSpec, net: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self.net = net

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def layers(self) -> tuple[str, ...]:
        return self.spec.layers

    @property
    def num_classes(self) -> int:
        return self.net.get_submodule(self.spec.head).out_features

    def check_layers(self, taps: Sequence[str]) -> tuple[str, ...]:
        """Validate tap names (a single name is accepted as a 1-tuple); returns them."""
        if isinstance(taps, str):
            taps = (taps,)
        taps = tuple(taps)
        for t in taps:
            if t not in self.spec.taps:
                raise ValueError(f"unknown layer {t!r} for model {self.name!r}; "
                                 f"accepted: {', '.join(self.spec.layers)}")
        return taps

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.name} expects images (n, 3, H, W), got shape "
                             f"{tuple(x.shape)}")
        size = min(x.shape[-2:])
        if size < self.spec.min_image_size:
            raise ValueError(f"{self.name} needs images of at least {self.spec.min_image_size} "
                             f"px, got {tuple(x.shape[-2:])}")

    def _run(self, x: torch.Tensor, taps: tuple[str, ...],
             stop_early: bool) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        self._check_input(x)
        captured: dict[str, torch.Tensor] = {}
        versions: dict[str, int] = {}
        handles = []

        def hook_for(name: str, tap: Tap) -> Callable:
            def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
                captured[name] = output.clone() if tap.clone else output
                if not captured[name].is_inference():
                    versions[name] = captured[name]._version
                if stop_early and len(captured) == len(set(taps)):
                    raise _StopForward
            return hook

        for name in dict.fromkeys(taps):
            tap = self.spec.taps[name]
            module = self.net.get_submodule(tap.path)
            handles.append(module.register_forward_hook(hook_for(name, tap)))
        logits = None
        try:
            logits = self.net(x)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        for name, v in versions.items():
            if captured[name]._version != v:
                raise RuntimeError(f"tap {name!r} of {self.name} was modified in place after "
                                   f"capture; its Tap needs clone=True")
        return logits, {name: captured[name] for name in taps}

    def forward(self, x: torch.Tensor, taps: Sequence[str] = ()
                ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        taps = self.check_layers(taps)
        if not taps:
            self._check_input(x)
            return self.net(x)
        logits, captured = self._run(x, taps, stop_early=False)
        return logits, captured

    @contextlib.contextmanager
    def head_in_float32(self) -> Iterator[None]:
        """Within: the final classification Linear computed in float32 under bf16 autocast too,
        from the same (bf16) features. Its bf16 outputs keep 8 significant bits, so an
        evaluation that ranks them ties logits the network told apart (mAP about 5e-4 lower
        on 80 labels; top-1 ties split in expectation). The Linear is recomputed, a small
        fraction of the forward; outside bf16 autocast nothing changes."""
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if output.dtype == torch.float32:
                return None
            with torch.autocast(output.device.type, enabled=False):
                bias = None if module.bias is None else module.bias.float()
                return F.linear(inputs[0].float(), module.weight.float(), bias)

        handle = self.net.get_submodule(self.spec.head).register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def features(self, x: torch.Tensor, taps: Sequence[str]) -> dict[str, torch.Tensor]:
        """Only the requested taps: the forward pass stops after the last of them."""
        taps = self.check_layers(taps)
        if not taps:
            raise ValueError(f"features() needs at least one layer of {self.name}; "
                             f"accepted: {', '.join(self.layers)}")
        return self._run(x, taps, stop_early=True)[1]


def build_model(name: str, *, num_classes: int, width: float = 1.0,
                seed: int | None = None) -> TappedModel:
    """Build registered model ``name`` with ``num_classes`` outputs.

    width : channel multiplier (see the module docstring); 1.0 = torchvision exactly.
    seed : if given, the weights are initialised from ``torch.manual_seed(seed)`` inside a forked
        RNG, so the caller's global RNG state is untouched; None uses the global RNG.
    """
    spec = get_model_spec(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    width = _check_width(width)
    if seed is None:
        net = spec.factory(num_classes, width)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = spec.factory(num_classes, width)
    return TappedModel(spec, net)


def conv1_weight(model: TappedModel) -> torch.Tensor:
    """The first convolution's filters, detached float32 CPU copy: (k, 3, h, w)
    (AlexNet (64, 3, 11, 11), ResNet-18 (64, 3, 7, 7) at width 1)."""
    path = model.spec.taps[model.spec.conv1].path
    return model.net.get_submodule(path).weight.detach().to("cpu", torch.float32).clone()
