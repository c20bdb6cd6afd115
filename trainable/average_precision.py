"""Average precision of multi-label scores (the NSD conditions' COCO task), in numpy alone.

The trials report ``mean_average_precision`` (``trainable.train``); the post-processor's
effects bootstrap it with ``weighted_mean_average_precision`` (``dashboards.effects``), which
therefore imports neither torch nor the trainable.
"""

from __future__ import annotations

import numpy as np

__all__ = ["mean_average_precision", "weighted_mean_average_precision"]


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Macro average precision over the classes with at least one positive.

    scores, targets : (n, c). Per class, AP = sum_k (R_k - R_{k-1}) P_k over distinct score
    thresholds (tied scores form one threshold), scikit-learn's ``average_precision_score``;
    classes without positives in the evaluation set are left out (their AP is undefined).
    """
    m = float(weighted_mean_average_precision(scores, targets, np.ones((1, len(scores))))[0])
    if not np.isfinite(m):
        raise ValueError("no class has a positive in the evaluation set: mAP is undefined")
    return m


def _checked(scores, targets) -> tuple[np.ndarray, np.ndarray]:
    """(n, c) scores and targets of one shape, every score finite: a NaN score sorts as no
    threshold does (NaN scores on every positive gave an mAP of 1.0)."""
    scores, targets = np.asarray(scores), np.asarray(targets)
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape}: expected two "
                         f"(n_images, n_classes) arrays of one shape")
    if not np.isfinite(scores).all():
        bad = int((~np.isfinite(scores)).sum())
        raise ValueError(f"scores hold {bad} NaN or infinite values; expected finite scores "
                         f"(a model's logits or probabilities)")
    return scores, targets


def weighted_mean_average_precision(scores: np.ndarray, targets: np.ndarray,
                                    weights: np.ndarray) -> np.ndarray:
    """``mean_average_precision`` with each image counted ``weights[b, i]`` times, for B
    weightings at once (bootstrap counts: dashboards.effects). (n, c), (n, c), (B, n) ->
    (B,); NaN for a weighting under which no class has a positive.

    Per class only the thresholds holding a positive matter (elsewhere recall does not step).
    Each image falls in the bin of the highest such threshold at or below its score; one
    sparse product sums every weighting's counts per bin, and cumulative sums over the bins
    give each threshold's seen and true-positive weight. Reordering and cumsumming the (B, n)
    weights per class instead took 1.4 s a class at 14,000 images x 2,001 weightings (52
    minutes for the paper's NSD trials' bootstrap). ``weights`` given as the transpose of a
    C-ordered (n, B) array (``dashboards.effects.resample_counts``) is read without a copy."""
    from scipy import sparse

    scores, targets = _checked(scores, targets)
    wt = np.ascontiguousarray(np.asarray(weights).T)  # (n, B)
    n, n_w = wt.shape
    if n != scores.shape[0]:
        raise ValueError(f"weights cover {n} images, scores {scores.shape[0]}; expected one "
                         f"weight per image in each weighting")
    y_all = np.asarray(targets) > 0.5
    aps = np.full((n_w, scores.shape[1]), np.nan)
    for c in range(scores.shape[1]):
        y = y_all[:, c]
        if not y.any():
            continue
        s = scores[:, c]
        thresholds = np.unique(s[y])  # ascending
        bins = np.searchsorted(thresholds, s, side="right") - 1  # -1: below every positive

        def per_bin(mask: np.ndarray, bins=bins, k=thresholds.size) -> np.ndarray:
            """(k, B) weight of the images in ``mask`` per bin, highest threshold first."""
            cols = np.flatnonzero(mask)
            summing = sparse.csr_matrix((np.ones(cols.size, wt.dtype), (bins[cols], cols)),
                                        shape=(k, n))
            return np.asarray(summing @ wt)[::-1]

        above = bins >= 0
        seen = np.cumsum(per_bin(above), axis=0, dtype=np.float64)  # score >= the threshold
        tp = np.cumsum(per_bin(above & y), axis=0, dtype=np.float64)
        total = tp[-1:]
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(seen > 0, tp / seen, 0.0)
            recall = tp / total
            steps = np.diff(np.concatenate([np.zeros_like(total), recall]), axis=0)
            ap = np.sum(steps * precision, axis=0)
        aps[:, c] = np.where(total[0] > 0, ap, np.nan)
    counted = np.isfinite(aps).sum(1)
    return np.where(counted > 0, np.nansum(aps, 1) / np.maximum(counted, 1), np.nan)
