"""The Gabor oracle as a reference representation.

``GaborReference`` convolves the paper's 108-filter bank (defined in ``references.gabor_bank``,
whose names this module re-exports; ``gabor_bank()`` is the bank as a tensor) with the batch
using AlexNet conv1's geometry (11x11, stride 4, padding 2), without gradient: images
(n, 3, H, W) -> (n, 108, H', W') with H' = floor((H + 4 - 11) / 4) + 1 (55 at 224 px, 15 at
64 px), the same grid as AlexNet's conv1 tap.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from references.base import ImageReference
from references.gabor_bank import (
    FREQUENCIES,
    KERNEL_SIZE,
    NYQUIST,
    ORIENTATIONS_DEG,
    PADDING,
    STRIDE,
    bank_array,
    bank_index,
    bank_png,
    gabor_kernel,
    gabor_sigma,
    response_size,
)

__all__ = [
    "FREQUENCIES",
    "GaborReference",
    "KERNEL_SIZE",
    "NYQUIST",
    "ORIENTATIONS_DEG",
    "bank_index",
    "bank_png",
    "gabor_bank",
    "gabor_kernel",
    "gabor_sigma",
    "response_size",
]


def gabor_bank(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The paper's bank: (108, 3, 11, 11), orientation-major (row = 9 * i_theta + i_freq),
    each filter zero mean and unit L2 norm over its 3 x 11 x 11 values. A fresh CPU tensor."""
    return torch.tensor(bank_array(), dtype=dtype)


class GaborReference(ImageReference):
    """The Gabor oracle as a reference: a fixed convolution, no parameters, no gradient.

    ``representation(images)`` : images (n, 3, H, W), normalised exactly as the model sees them
    -> (n, 108, H', W'), on the images' device; dtype = the images' (or the autocast dtype when
    called inside ``torch.autocast``: the trainable owns precision).
    ``targets(images, image_ids)`` : the reference protocol shared by every reference kind,
    ``[(rows, Y)]`` -- one group with every row: rows = arange(n) (int64, images' device),
    Y = representation(images). ``image_ids`` only has to match n.
    """

    name = "gabor"

    def __init__(self) -> None:
        # float64 master copy: casting down to the images' dtype is then exact
        self._bank = gabor_bank(torch.float64)
        self._moved: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def __getstate__(self) -> dict:  # the per-device copies are rebuilt where it lands
        return {"_bank": self._bank}

    def __setstate__(self, state: dict) -> None:
        self._bank = state["_bank"]
        self._moved = {}

    @property
    def bank(self) -> torch.Tensor:
        """(108, 3, 11, 11) float64 CPU."""
        return self._bank

    def _bank_on(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (device, dtype)
        if key not in self._moved:
            self._moved[key] = self._bank.to(device=device, dtype=dtype)
        return self._moved[key]

    def representation(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"GaborReference expects float images (n, 3, H, W), got "
                             f"{images.dtype} {tuple(images.shape)}")
        if min(images.shape[-2:]) < KERNEL_SIZE - 2 * PADDING:
            raise ValueError(f"images must be at least {KERNEL_SIZE - 2 * PADDING} px for the "
                             f"11x11 stride-4 bank, got {tuple(images.shape[-2:])}")
        with torch.no_grad():
            # Every filter applies the same luminance kernel to the three channels (weights
            # 1/sqrt(3)), so the response is that kernel on the channel sum: one input channel,
            # a third of the multiply-adds of the (108, 3, 11, 11) convolution, the same numbers
            # to float rounding (tests/test_gabor.py).
            lum = self._bank_on(images.device, images.dtype)[:, :1]
            if images.dtype in (torch.float32, torch.float64):
                # two additions in ``sum(1)``'s order: bit for bit the same on the CPU, at half
                # its time there (a reduction over the channel axis is slow)
                gray = torch.add(images[:, 0:1], images[:, 1:2]).add_(images[:, 2:3])
            else:  # reduced precision: sum(1) accumulates in float32, rounding once
                gray = images.sum(1, keepdim=True)
            return F.conv2d(gray, lum, stride=STRIDE, padding=PADDING)
