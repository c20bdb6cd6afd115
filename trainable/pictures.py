"""Filter banks as pictures (the paper's Figure 1c style), without importing torch.

The trials write their conv1 filters with it (``trainable.train``); the post-processor draws the
reference panels (the Gabor bank, torchvision's AlexNet conv1) with it, and so needs no torch.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["filter_grid_png"]


def filter_grid_png(weights: Any, path: str | os.PathLike, *,
                    ncols: int | None = None, scale: int = 8) -> Path:
    """Write a filter bank as a PNG grid (the paper's Figure 1c style); returns the path.

    weights : (k, 3, h, w), a numpy array or a torch tensor (on any device). Each filter is
    shown as RGB, scaled on its own: ``0.5 + w / (2 max|w|)`` (mid grey = 0), so shape not
    magnitude is compared across filters.
    ncols : filters per row (default ceil(sqrt(k))); ``scale`` : screen pixels per filter pixel.
    """
    # imsave writes the RGB array itself: no figure, no GUI backend, no pyplot global state.
    import matplotlib.image

    if hasattr(weights, "detach"):  # a torch tensor, read without importing torch here
        weights = weights.detach().cpu().double().numpy()
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 4 or w.shape[1] != 3 or w.shape[0] < 1:
        raise ValueError(f"filter_grid_png expects weights (k, 3, h, w) with k >= 1, got shape "
                         f"{w.shape}")
    k, _, h, wd = w.shape
    ncols = ncols or math.ceil(math.sqrt(k))
    nrows = math.ceil(k / ncols)
    pad = 1
    grid = np.ones((nrows * (h + pad) + pad, ncols * (wd + pad) + pad, 3))
    peak = np.abs(w).reshape(k, -1).max(axis=1)
    peak[peak == 0] = 1.0
    tiles = 0.5 + w / (2 * peak[:, None, None, None])
    for i in range(k):
        r, c = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + c * (wd + pad)
        grid[y:y + h, x:x + wd] = tiles[i].transpose(1, 2, 0)
    grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    matplotlib.image.imsave(path, np.clip(grid, 0, 1))
    return path
