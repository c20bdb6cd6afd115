"""The Gabor oracle's filter bank: the paper's 108 filters, defined in numpy.

Bank (``bank_array()``, and ``references.gabor.gabor_bank()`` as a tensor): (108, 3, 11, 11),
orientation-major, index = 9 * i_theta + i_freq:

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

This module is numpy alone (the post-processor draws the bank without torch);
``references.gabor`` holds the bank as a torch tensor and the reference computed with it.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import numpy as np

__all__ = [
    "FREQUENCIES",
    "KERNEL_SIZE",
    "NYQUIST",
    "ORIENTATIONS_DEG",
    "PADDING",
    "STRIDE",
    "bank_array",
    "bank_index",
    "bank_png",
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
def bank_array() -> np.ndarray:
    """The bank, (108, 3, 11, 11) float64, orientation-major, read-only (one array per process)."""
    lum = np.stack([gabor_kernel(t, f) for t in ORIENTATIONS_DEG for f in FREQUENCIES])
    bank = np.repeat(lum[:, None], 3, axis=1) / math.sqrt(3)
    bank.setflags(write=False)
    return bank


def response_size(image_size: int) -> int:
    """Side of the response grid for a square image: floor((S + 2*2 - 11) / 4) + 1, the same as
    AlexNet's conv1 (55 at 224 px, 15 at 64 px)."""
    return (image_size + 2 * PADDING - KERNEL_SIZE) // STRIDE + 1


def bank_png(path: str | os.PathLike) -> Path:
    """Write the bank as a PNG grid: one row per orientation (0..165 deg, top to bottom), one
    column per frequency (0.05..2.0 cycles/pixel, left to right). Returns the path."""
    from trainable.pictures import filter_grid_png

    return filter_grid_png(bank_array(), path, ncols=len(FREQUENCIES))
