"""The Gabor oracle: the paper's 108-filter bank and its responses as a reference representation.

Bank (``gabor_bank()``: (108, 3, 11, 11), orientation-major, index = 9 * i_theta + i_freq):

* orientations theta = 0, 15, ..., 165 degrees (12). theta is the direction of the carrier's
  wave vector in image coordinates (x = column to the right, y = row downwards):
  theta = 0 gives vertical bars, theta = 90 horizontal bars.
* spatial frequencies f: 9 values **log-spaced** from 0.05 to 2.0 cycles/pixel
  (``np.geomspace(0.05, 2.0, 9)``: 0.050, 0.079, 0.126, 0.199, 0.316, 0.501, 0.795, 1.261,
  2.000; ratio 40**(1/8) = 1.585 between neighbours), the paper's range. Frequencies above
  0.5 cycles/pixel (the Nyquist limit of the pixel grid) ALIAS: point-sampled on integer pixel
  positions, a carrier of frequency f is indistinguishable from one of frequency f - 1 (and
  f = 1.0 or 2.0 along the pixel axes is a constant). The top four frequencies are therefore
  aliased versions of lower ones; at f = 2.0 the theta = 0 and theta = 90 filters alias to DC
  and become the same isotropic centre-surround filter. We keep the paper's values on purpose
  (the reference must be the paper's reference) rather than silently clipping them.

Each filter (before the colour step) is an even-phase (cosine) Gabor::

    g(x, y) = exp(-(x^2 + y^2) / (2 sigma^2)) * cos(2 pi f (x cos theta + y sin theta))

sampled at integer offsets x, y in -5..5 from the centre, then the mean over the 11x11 window
is subtracted (zero mean: a uniform image gives no response) and the result is scaled to unit
L2 norm. Envelope: sigma = 0.56 / f pixels (a one-octave half-magnitude bandwidth, the same
formula as skimage's ``gabor_kernel`` with bandwidth=1), clipped to [1, 5] px: above 5 px the
11x11 window truncates the envelope anyway, below 1 px it would shrink to a single pixel and the
filter would stop being a grating detector. Phase: cosine (even) for every filter; a sine-phase
filter sampled on the grid is identically zero at f = 2.0, theta = 0 or 90 (no unit norm
possible), whereas the cosine phase is defined everywhere.

Colour: the same luminance filter is applied to all three channels, each channel weighted
1/sqrt(3), so the whole (3, 11, 11) filter has zero mean and unit norm; on normalised images
the response is that of the (scaled) channel sum, a luminance proxy.

Reference representation (``GaborReference``): the bank convolved with the batch using AlexNet
conv1's geometry (11x11, stride 4, padding 2): images (n, 3, H, W) -> (n, 108, H', W') with
H' = floor((H + 4 - 11) / 4) + 1 (55 at 224 px, 15 at 64 px), the same grid as AlexNet's conv1
tap, without gradient.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from references.base import ImageReference

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

ORIENTATIONS_DEG: tuple[float, ...] = tuple(15.0 * i for i in range(12))
#: cycles/pixel, log-spaced over the paper's range; values above NYQUIST alias (see above).
FREQUENCIES: tuple[float, ...] = tuple(float(f) for f in np.geomspace(0.05, 2.0, 9))
NYQUIST = 0.5
KERNEL_SIZE = 11
#: AlexNet conv1 geometry, so the responses sit on the conv1 tap's grid.
STRIDE = 4
PADDING = 2
SIGMA_PER_WAVELENGTH = 0.56  # sigma = 0.56 / f: one-octave bandwidth
SIGMA_RANGE = (1.0, 5.0)


def gabor_sigma(frequency: float) -> float:
    """Envelope standard deviation in pixels: clip(0.56 / f, 1, 5)."""
    return float(np.clip(SIGMA_PER_WAVELENGTH / frequency, *SIGMA_RANGE))


def gabor_kernel(theta_deg: float, frequency: float, size: int = KERNEL_SIZE) -> np.ndarray:
    """One luminance filter: (size, size) float64, zero mean, unit L2 norm (formula above)."""
    if not (frequency > 0 and math.isfinite(frequency)):
        raise ValueError(f"frequency must be > 0 cycles/pixel, got {frequency!r}")
    r = np.arange(size) - (size - 1) / 2
    y, x = np.meshgrid(r, r, indexing="ij")
    theta = math.radians(theta_deg)
    sigma = gabor_sigma(frequency)
    carrier = np.cos(2 * math.pi * frequency * (x * math.cos(theta) + y * math.sin(theta)))
    k = np.exp(-(x**2 + y**2) / (2 * sigma**2)) * carrier
    k -= k.mean()
    return k / np.linalg.norm(k)


def bank_index(orientation: int, frequency: int) -> int:
    """Row of the bank holding orientation index ``orientation`` (0..11) and frequency index
    ``frequency`` (0..8): orientation-major, ``9 * orientation + frequency``."""
    if not (0 <= orientation < len(ORIENTATIONS_DEG) and 0 <= frequency < len(FREQUENCIES)):
        raise ValueError(f"(orientation, frequency) index ({orientation}, {frequency}) out of "
                         f"range: accepted 0..{len(ORIENTATIONS_DEG) - 1} and "
                         f"0..{len(FREQUENCIES) - 1}")
    return len(FREQUENCIES) * orientation + frequency


@functools.cache
def _bank64() -> np.ndarray:
    lum = np.stack([gabor_kernel(t, f) for t in ORIENTATIONS_DEG for f in FREQUENCIES])
    bank = np.repeat(lum[:, None], 3, axis=1) / math.sqrt(3)
    bank.setflags(write=False)
    return bank


def gabor_bank(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The paper's bank: (108, 3, 11, 11), orientation-major (row = 9 * i_theta + i_freq),
    each filter zero mean and unit L2 norm over its 3 x 11 x 11 values. A fresh CPU tensor."""
    return torch.tensor(_bank64(), dtype=dtype)


def response_size(image_size: int) -> int:
    """Side of the response grid for a square image: floor((S + 2*2 - 11) / 4) + 1, the same as
    AlexNet's conv1 (55 at 224 px, 15 at 64 px)."""
    return (image_size + 2 * PADDING - KERNEL_SIZE) // STRIDE + 1


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


def bank_png(path: str | os.PathLike) -> Path:
    """Write the bank as a PNG grid: one row per orientation (0..165 deg, top to bottom), one
    column per frequency (0.05..2.0 cycles/pixel, left to right). Returns the path."""
    from trainable.models import filter_grid_png

    return filter_grid_png(gabor_bank(), path, ncols=len(FREQUENCIES))
