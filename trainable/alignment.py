"""Alignment metrics between two representations of the same stimuli.

Every function takes numpy arrays or torch tensors of shape ``(n_stimuli, ...)``; anything after
the first axis is flattened to features, so ``X : (n, p)`` and ``Y : (n, q)``. Torch tensors stay
on their device and in their dtype, and the computation stays differentiable; numpy arrays are
wrapped without a copy. Scores come back as 0-d tensors for tensor inputs and floats for numpy.

The paper's metric is linear predictivity (``linear_alignment``): cross-validated ridge R^2 of
X -> Y and of Y -> X, averaged. ``ridge_cv_r2`` is the validation form (equal to scikit-learn's
``cross_val_score(RidgeCV(alphas), X, Y, cv=KFold(folds), scoring="r2").mean()``);
``linear_alignment_heldout`` is the training-loss form (held-out predictions inside the batch,
relative ridge penalty, scale invariant). ``linear_cka`` and ``rsa`` are the other two
differentiable metrics, and ``METRICS`` is the name -> metric registry the trainable and the
sweep files use.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trainable.registry import Registry

__all__ = [
    "METRICS",
    "Metric",
    "get_metric",
    "linear_alignment",
    "linear_alignment_heldout",
    "linear_alignment_heldout_definition",
    "linear_alignment_scaled",
    "constant_columns",
    "linear_cka",
    "relative_alphas",
    "ridge_cv_r2",
    "rsa",
]

#: Ridge penalties for validation, relative to the predictor's mean centred sample energy
#: trace(K)/n (see ``relative_alphas``): scale-free, so a layer's activation scale cannot
#: change the grid the cross-validation searches.
DEFAULT_RELATIVE_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-4, 4, 9))

#: Relative ridge penalty of the training-loss form: lambda = rel * trace(K) / n.
DEFAULT_LOSS_REL = 1e-1


# ----------------------------------------------------------------------------- validation


def _as_tensor(a: Any, name: str, check_finite: bool = True) -> tuple[torch.Tensor, bool]:
    """Return ``(tensor (n, features), was_numpy)``; validate rank and (unless the caller checks
    it more cheaply later, ``check_finite=False``) finiteness."""
    was_numpy = not isinstance(a, torch.Tensor)
    if was_numpy:
        arr = np.asarray(a)
        if not np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(np.float64)
        t = torch.from_numpy(np.ascontiguousarray(arr))
    else:
        t = a if a.is_floating_point() else a.to(torch.float64)
    if t.ndim < 1:
        raise ValueError(f"{name} must have shape (n_stimuli, ...), got a scalar")
    if t.ndim == 1:
        t = t[:, None]
    t = t.reshape(t.shape[0], -1)
    if t.shape[1] == 0:
        raise ValueError(f"{name} has shape {tuple(t.shape)}: it needs at least one feature")
    # One reduction instead of an elementwise test: a sum is finite when every entry is
    if check_finite and not bool(torch.isfinite(t.detach().sum())):
        _check_finite(t, name)
    return t, was_numpy


def _check_finite(t: torch.Tensor, name: str) -> None:
    """Raise if ``t`` holds NaN or inf: called once a cheap reduction over it (a sum, a Gram's
    trace) came out non-finite, which an overflowing reduction of finite values also does
    (then nothing is raised here)."""
    bad = int((~torch.isfinite(t.detach())).sum())
    if bad:
        raise ValueError(f"{name} contains {bad} NaN or inf values; all entries must be "
                         f"finite")


def _check_gram_finite(t: torch.Tensor, name: str) -> None:
    """``t``'s Gram came out non-finite: NaN or inf in ``t`` (``_check_finite``), or finite
    values whose squares summed over a row overflow its dtype (float32 from about 1e18 a
    value), which a Cholesky factorisation would otherwise report as "not positive-definite"."""
    _check_finite(t, name)
    biggest = float(t.detach().abs().max())
    raise ValueError(f"{name} holds values up to {biggest:.3g}, whose squares summed over a row "
                     f"overflow {str(t.dtype).removeprefix('torch.')} in its Gram matrix; "
                     f"expected values of magnitude far below 1e18")


class UndefinedScore(ValueError):
    """The score is undefined for these inputs (every stimulus the same, too few stimuli with
    a correlation distance): a training batch skips the group, validation reports NaN."""


def _pair(X: Any, Y: Any, min_n: int, why: str,
          check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor, bool]:
    x, x_np = _as_tensor(X, "X", check_finite)
    y, y_np = _as_tensor(Y, "Y", check_finite)
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"X and Y must have the same number of stimuli (first axis), got X {tuple(x.shape)} "
            f"and Y {tuple(y.shape)}"
        )
    if x.shape[0] < min_n:
        raise ValueError(f"got n={x.shape[0]} stimuli; {why} needs at least {min_n}")
    if x.device != y.device:
        raise ValueError(f"X is on {x.device} and Y on {y.device}; put both on one device")
    dtype = torch.promote_types(x.dtype, y.dtype)
    return x.to(dtype), y.to(dtype), x_np and y_np


def _check_alphas(alphas: Sequence[float] | np.ndarray | torch.Tensor) -> list[float]:
    vals = [float(a) for a in np.asarray(alphas, dtype=np.float64).reshape(-1)]
    if not vals:
        raise ValueError("alphas is empty; give at least one positive ridge penalty")
    bad = [a for a in vals if not (a > 0 and math.isfinite(a))]
    if bad:
        raise ValueError(f"alphas must be positive and finite, got {bad}")
    return vals


def _check_folds(folds: int, name: str = "folds") -> int:
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ValueError(f"{name} must be an integer >= 2, got {folds!r}")
    return int(folds)


def _out(score: torch.Tensor, as_float: bool) -> torch.Tensor | float:
    return float(score.detach()) if as_float else score


def _fold_bounds(n: int, folds: int) -> list[tuple[int, int]]:
    """Contiguous folds exactly as ``sklearn.model_selection.KFold(folds)`` (no shuffle): the
    first ``n % folds`` folds get one extra sample."""
    sizes = [n // folds + (1 if i < n % folds else 0) for i in range(folds)]
    bounds, start = [], 0
    for s in sizes:
        bounds.append((start, start + s))
        start += s
    return bounds


# ----------------------------------------------------------------------------- ridge CV


def _r2_columns(y_true: torch.Tensor, y_pred: torch.Tensor) -> torch.Tensor:
    """R^2 per column, scikit-learn's ``r2_score`` rule for constant columns.

    A column that is constant in ``y_true`` scores 1.0 when it is predicted exactly and 0.0
    otherwise (``force_finite=True``), so one flat voxel or a dead unit in a test fold neither
    poisons the mean with inf/NaN nor rewards a wrong prediction. Constant means all values
    equal (max == min), not "SST == 0": the mean of n equal floats can differ from them by an
    ulp, leaving SST ~1e-32 and an R^2 of -1e29 for a column that is in fact flat.
    This is the one place where the result departs from scikit-learn (which tests SST == 0
    and returns that -1e29); everywhere else ``ridge_cv_r2`` equals its pipeline.
    """
    sse = ((y_true - y_pred) ** 2).sum(0)
    sst = ((y_true - y_true.mean(0)) ** 2).sum(0)
    const = y_true.amax(0) == y_true.amin(0)
    safe = torch.where(const, torch.ones_like(sst), sst)
    r2 = 1.0 - sse / safe
    return torch.where(const, (sse == 0).to(r2.dtype), r2)


def _pooled_r2(y_true: torch.Tensor, y_pred: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """R^2 pooled over columns with weights w (q,) >= 0: ``1 - sum_j w_j SSE_j / sum_j w_j
    SST_j`` (SST about the mean of ``y_true``). With w_j = 1/SST_j of a fixed target set this
    is the uniform mean of per-column R^2; with w = 1 each column weighs its variance. A
    weighted set with no variance at all scores 0 (nothing to explain, nothing explained):
    "no variance" means every weighted column holds one value (``constant_columns``), not a
    float SST of zero -- a column of equal values whose float mean is one ulp off has an SST
    of ~1e-32, and dividing by it scored a fold of silent units -7e31."""
    return _pooled_from(*_pooled_parts(y_true, y_pred, weights), y_true.dtype, y_true.device)


def _pooled_parts(y_true: torch.Tensor, y_pred: torch.Tensor,
                  weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``_pooled_r2``'s sums over a block of columns: (sum w SSE, sum w SST, whether a
    weighted column varies); blocks of columns add up."""
    sse = ((y_true - y_pred) ** 2).sum(0)
    sst = ((y_true - y_true.mean(0)) ** 2).sum(0)
    varying = (weights > 0) & ~constant_columns(y_true)
    return (weights * sse).sum(), (weights * sst).sum(), bool(varying.any())


def _pooled_from(num: torch.Tensor, den: torch.Tensor, varying: bool, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    if float(den.detach()) <= 0 or not varying:
        return torch.zeros((), dtype=dtype, device=device)
    return 1.0 - num / den


def ridge_cv_r2(
    X: Any,
    Y: Any,
    *,
    alphas: Sequence[float] | np.ndarray,
    folds: int = 5,
    column_weights: Any = None,
) -> torch.Tensor | float:
    """Cross-validated ridge R^2 of X predicting Y.

    Parameters
    ----------
    X : (n, p) predictor, any (n, ...) flattened.
    Y : (n, q) targets, any (n, ...) flattened.
    alphas : positive ridge penalties (absolute, as in scikit-learn's ``RidgeCV``).
    folds : number of contiguous folds (``KFold(folds)``, no shuffle).

    On each training fold (size m) X and Y are centred with the training-fold means and one
    alpha is chosen by efficient leave-one-out squared error summed over all targets
    (``RidgeCV(alphas, alpha_per_target=False)``); the fitted model predicts the test fold,
    scored as R^2 averaged uniformly over target columns (constant test columns: see
    ``_r2_columns``). Returns the mean over folds, so in float64 it equals
    ``cross_val_score(RidgeCV(alphas=alphas), X, Y, cv=KFold(folds), scoring="r2").mean()``.
    ``column_weights`` (q,) >= 0 replaces that uniform mean by R^2 pooled over the columns
    with these weights (``_pooled_r2``): what the trials report (``linear_alignment_scaled``),
    where a dead or constant unit must add nothing.

    Differentiable through torch's ``eigh``, whose gradient is NaN where a fold's kernel or
    covariance has repeated eigenvalues (two or more dead units): the loss form
    (``linear_alignment_heldout``) is what trials differentiate.

    Cost: with p > m the dual (kernel) form is used: one n x n Gram matrix for all folds
    (computed once on globally centred X; each fold's centred kernel is a double-centred
    sub-block), one eigendecomposition per fold shared by every alpha, and predictions through
    the kernel, never forming the p x q coefficients. With p <= m the primal form
    eigendecomposes the p x p covariance instead.
    """
    x, y, as_float = _pair(X, Y, 2 * _check_folds(folds), f"{folds}-fold ridge CV")
    if x.dtype in (torch.float16, torch.bfloat16):  # torch has no eigh in these: float32
        x, y = x.float(), y.float()
    alpha_list = _check_alphas(alphas)
    weights = None
    if column_weights is not None:
        weights = torch.as_tensor(column_weights, dtype=y.dtype, device=y.device).flatten()
        if weights.numel() != y.shape[1] or not bool(((weights >= 0)
                                                      & torch.isfinite(weights)).all()):
            raise ValueError(f"column_weights must be {y.shape[1]} finite numbers >= 0 (one per "
                             f"column of Y), got shape {tuple(weights.shape)}")
    return _out(_ridge_cv(x, y, alpha_list, folds, weights), as_float)


def _ridge_cv(x: torch.Tensor, y: torch.Tensor, alpha_list: list[float], folds: int,
              weights: torch.Tensor | None,
              standardize: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``ridge_cv_r2``'s computation on checked tensors. ``standardize`` = (centre, scale),
    (q,) each: the targets are ``(y - centre) / scale``, column by column (what
    ``linear_alignment_scaled`` scores), applied where each block of Y is read instead of to
    a copy of Y. Without gradient, the dual form reads Y in column chunks
    (``_ridge_cv_dual_chunked``): the same numbers, within a bounded memory."""
    n, p = x.shape
    bounds = _fold_bounds(n, folds)
    max_train = n - min(b - a for a, b in bounds)
    dual = p > max_train
    if dual and not (torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)):
        return _ridge_cv_dual_chunked(x, y, alpha_list, bounds, weights, standardize)
    if standardize is not None:
        y = (y - standardize[0]) / standardize[1]
    # Translation does not change any fold's fit (each fold re-centres); centring globally
    # first keeps the Gram matrix well conditioned when features have a large common offset.
    xg = x - x.mean(0)
    gram = _gram(xg) if dual else None
    if dual:  # every fold reads the Gram, not X: its centred copy (as large as X) goes
        del xg
    scores = []
    for lo, hi in bounds:
        tr = torch.cat([torch.arange(0, lo), torch.arange(hi, n)]).to(x.device)
        m = tr.numel()
        y_te = y[lo:hi]
        yc = y[tr]  # a copy (rows gathered), centred in place: one (m, q) array, not two
        y_mean = _fold_mean(yc)
        yc -= y_mean
        if dual:
            k_tt, k_et = _fold_kernels(gram, tr, lo, hi)
            evals, basis = _eigh_without_constant(k_tt)
            proj = basis.T @ yc
            del yc  # (m, q): the selection and the predictions need only proj
            a = alpha_list[_select_dual(basis, evals, proj, alpha_list)]
            # k_et (K + aI)^-1 Yc, multiplied from the left: (n_te, m) @ (m, r) first, so the
            # (m, q) dual coefficients are never formed (the cheaper order when n_te < m).
            pred = y_mean + (k_et @ basis) @ (proj / (evals + a)[:, None])
        else:
            mu = xg[tr].mean(0)
            xc = xg[tr] - mu
            evals, vecs = torch.linalg.eigh(xc.T @ xc)
            scores_tr = xc @ vecs  # (m, p): X in the eigenbasis
            w = scores_tr.T @ yc  # (p, q)
            a = alpha_list[_select_primal(scores_tr, evals, w, yc, alpha_list, m)]
            pred = y_mean + (xg[lo:hi] - mu) @ (vecs @ (w / (evals + a)[:, None]))
        scores.append(_r2_columns(y_te, pred).mean() if weights is None
                      else _pooled_r2(y_te, pred, weights))
    return torch.stack(scores).mean()


#: The dual form without gradient reads the targets in column chunks of at most this many
#: bytes (training rows x chunk columns x itemsize): at the paper's shape the validation's
#: targets are 1000 images x 326,700 Gabor responses, and each fold's centred copy, its
#: projection and their QR were 2.1 GB each in float64, on the trial's share of a GPU.
TARGET_CHUNK_BYTES = 64 << 20
#: The dual form's Gram is summed over column chunks of at most this many bytes (numpy's syrk
#: on each centred chunk on the CPU), instead of one centred copy of the whole predictor.
GRAM64_CHUNK_BYTES = 64 << 20


def _chunks(n_rows: int, cols: int, itemsize: int, limit: int) -> list[slice]:
    """Column slices of at most ``limit`` bytes for ``n_rows`` rows, as few as that allows and
    of equal width (no small tail chunk: at the demo shape, 2 x 12,150 columns instead of
    20,971 + 3,329 saves the loss form 0.1 ms a step)."""
    width = max(1, limit // max(1, n_rows * itemsize))
    width = -(-cols // -(-cols // width))  # the same number of chunks, balanced
    return [slice(lo, min(cols, lo + width)) for lo in range(0, cols, width)]


def _centred_gram64(x: torch.Tensor) -> torch.Tensor:
    """``Xc Xc^T`` (n, n) in x's dtype, X centred by its column means, without gradient and
    without a centred copy of the whole of X: summed over column chunks of
    ``GRAM64_CHUNK_BYTES`` (numpy's syrk on the CPU, ``_gram``), in the process's own matmul
    precision (not the loss form's TF32, ``_gram_products``: the validation's products are
    what the one-block form computed)."""
    mean = x.mean(0)
    k = None
    for cols in _chunks(x.shape[0], x.shape[1], x.element_size(), GRAM64_CHUNK_BYTES):
        part = _gram(x[:, cols] - mean[cols])
        k = part if k is None else k.add_(part)
    return k


def _ridge_cv_dual_chunked(x: torch.Tensor, y: torch.Tensor, alphas: list[float],
                           bounds: list[tuple[int, int]], weights: torch.Tensor | None,
                           standardize: tuple[torch.Tensor, torch.Tensor] | None
                           ) -> torch.Tensor:
    """The dual form of ``_ridge_cv`` without gradient, reading Y's columns in chunks
    (``TARGET_CHUNK_BYTES``): per fold, the projections ``basis^T Yc`` of each chunk are
    reduced to their (r, r) triangular factor as they come (a QR of the factor so far stacked
    on the chunk's: the same row norms, which are all the alpha selection reads), and the
    predictions are scored chunk by chunk (per-column R^2 summed, or the pooled sums). The
    same numbers as the one-block computation, to summation order; with one chunk, its
    operations."""
    n = x.shape[0]
    gram = _centred_gram64(x)
    q = y.shape[1]
    max_train = n - min(b - a for a, b in bounds)
    chunks = _chunks(max_train, q, y.element_size(), TARGET_CHUNK_BYTES)

    def block(rows: torch.Tensor | slice, cols: slice) -> torch.Tensor:
        t = y[:, cols][rows]  # the chunk's rows only (a view for a slice of rows)
        if standardize is not None:
            t = (t - standardize[0][cols]) / standardize[1][cols]
        return t

    def projected(tr: torch.Tensor, cols: slice,
                  basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(training mean, basis^T Yc) of a chunk's training rows."""
        yc = block(tr, cols)
        y_mean = _fold_mean(yc)
        yc -= y_mean
        return y_mean, basis.T @ yc

    scores = []
    for lo, hi in bounds:
        tr = torch.cat([torch.arange(0, lo), torch.arange(hi, n)]).to(x.device)
        k_tt, k_et = _fold_kernels(gram, tr, lo, hi)
        evals, basis = _eigh_without_constant(k_tt)
        r = basis.shape[1]
        kept: list[tuple[torch.Tensor, torch.Tensor]] = []  # one chunk: reused for predictions
        stacked = None
        for cols in chunks:
            y_mean, proj = projected(tr, cols, basis)
            if len(chunks) == 1:
                kept.append((y_mean, proj))
            stacked = proj.T if stacked is None else torch.cat([stacked, proj.T])
            if len(chunks) > 1 and stacked.shape[0] > r:
                stacked = torch.linalg.qr(stacked, mode="r").R
        a = alphas[_select_dual(basis, evals, stacked.T, alphas)]
        kb = k_et @ basis
        r2_sum = num = den = None
        varying = False
        for cols in chunks:
            y_mean, proj = kept[0] if kept else projected(tr, cols, basis)
            pred = y_mean + kb @ (proj / (evals + a)[:, None])
            y_te = block(slice(lo, hi), cols)
            if weights is None:
                part = _r2_columns(y_te, pred).sum()
                r2_sum = part if r2_sum is None else r2_sum + part
            else:
                n_, d_, v_ = _pooled_parts(y_te, pred, weights[cols])
                num = n_ if num is None else num + n_
                den = d_ if den is None else den + d_
                varying = varying or v_
        if weights is None:
            scores.append(r2_sum / q)
        else:
            scores.append(_pooled_from(num, den, varying, y.dtype, y.device))
    return torch.stack(scores).mean()


def _fold_mean(yc: torch.Tensor) -> torch.Tensor:
    """Column means of a fold's training targets, exactly the value of a column constant on
    them (a flat voxel, a dead unit): the float mean of equal values can be an ulp off, and
    whether such a column's test fold then scored 1 or 0 (``_r2_columns``: predicted exactly
    or not) depended on how the sum was blocked, i.e. on the number of target columns."""
    with torch.no_grad():
        flat = yc.amax(0) == yc.amin(0)
    return torch.where(flat, yc[0], yc.mean(0))


def _fold_kernels(gram: torch.Tensor, tr: torch.Tensor, lo: int,
                  hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fold's kernels from the Gram of globally centred rows: ``(K_tt, K_et)``, the training
    rows' Gram double-centred with the training mean, and the test rows (``lo:hi``) against
    the training rows, centred with it too."""
    g_tt = gram[tr][:, tr]
    row = g_tt.mean(1)
    k_tt = g_tt - row[:, None] - row[None, :] + row.mean()
    g_et = gram[lo:hi][:, tr]
    k_et = g_et - g_et.mean(1, keepdim=True) - row[None, :] + row.mean()
    return k_tt, k_et


def _eigh_without_constant(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition of a double-centred kernel ``k`` (m, m) restricted to the
    complement of the constant vector: returns ``(evals (m-1,), basis (m, m-1))`` with
    orthonormal columns orthogonal to 1 and ``k = basis diag(evals) basis^T``.

    The constant vector is an exact null vector of a centred kernel and carries the
    (unpenalised) intercept. Removing it algebraically, with the Householder reflection
    ``H = I - 2 v v^T / v^T v``, ``v = 1 + sqrt(m) e_1``, which maps 1 onto -sqrt(m) e_1, avoids
    two numerical traps of the textbook formula: the round-off eigenvalue (~1e-13) that eigh
    returns for it, and the cancellation of ``1/(a m)`` against itself at small alpha. Both
    perturb LOO errors at the 1e-7 level, enough to flip near-tied alphas.
    """
    m = k.shape[0]
    v = torch.ones(m, dtype=k.dtype, device=k.device)
    v[0] += math.sqrt(m)
    beta = 2.0 / (v @ v)
    kv = k @ v
    # H k H = k - beta (v kv^T + kv v^T) + beta^2 (v^T kv) v v^T
    hkh = k - beta * (v[:, None] * kv[None, :] + kv[:, None] * v[None, :])
    hkh = hkh + (beta * beta * (v @ kv)) * (v[:, None] * v[None, :])
    evals, vecs = torch.linalg.eigh(hkh[1:, 1:])
    # basis = H @ [0; vecs]
    padded = torch.cat([torch.zeros(1, m - 1, dtype=k.dtype, device=k.device), vecs])
    basis = padded - beta * v[:, None] * (v[None, 1:] @ vecs)
    return evals.clamp_min(0), basis


def _gram(x: torch.Tensor) -> torch.Tensor:
    """``x @ x.T`` (n, n). On the CPU without autograd numpy's matmul is used: it recognises
    the ``A @ A.T`` pattern and calls BLAS syrk, half the flops of a general product (this
    product is the largest single cost of ``ridge_cv_r2`` when p >> n)."""
    if x.device.type == "cpu" and not x.requires_grad:
        xn = x.numpy()
        return torch.from_numpy(xn @ xn.T)
    return x @ x.T


def _select_dual(
    basis: torch.Tensor, evals: torch.Tensor, proj: torch.Tensor, alphas: list[float]
) -> int:
    """Best alpha index by efficient leave-one-out error in the dual form.

    ``basis`` (m, r) and ``evals`` (r,) decompose the centred training kernel on the complement
    of the constant vector (``_eigh_without_constant``), ``proj = basis^T Yc`` (r, q). For ridge
    with an unpenalised intercept the LOO residuals are ``c_i / d_i`` with
    ``c = basis diag(1/(evals + a)) proj`` and ``d_i = sum_j basis_ij^2 / (evals_j + a)``
    (scikit-learn writes the same as ``[(K + aI)^-1]_ii - 1/(a m)``). The error summed over
    samples and targets picks the alpha; ties keep the first, as RidgeCV does.

    Only the row norms of c matter, so when q > r proj is replaced by the (r, r) triangular
    factor R^T of ``proj^T = Q R`` (same row norms, fewer columns). Float64 inputs are screened
    in float32 (twice the BLAS throughput on CPUs; each error is a sum of positive terms,
    accurate to ~1e-6 relative), then every alpha within 1e-3 of the float32 minimum is
    re-scored in float64, so the choice is exactly the float64 one.
    """
    if proj.shape[1] > proj.shape[0]:
        proj = torch.linalg.qr(proj.T, mode="r").R.T
    if basis.dtype == torch.float64:
        # The LOO residuals c_i / d_i do not change when evals and alphas are divided by one
        # number: divided by the largest, they stay inside float32's range whatever the
        # layer's scale (a layer at 1e17 or 1e-20 overflowed there, and no alpha was left).
        top = max(float(evals.max().detach()), max(alphas))
        scale = top if 0 < top < math.inf else 1.0
        rough = _loo_errors(basis.float(), (evals / scale).float(), proj.float(),
                            [a / scale for a in alphas])
        near = torch.nonzero(rough <= rough.min() * (1 + 1e-3)).flatten().tolist()
        if len(near) == 1:
            return near[0]
        near = near or list(range(len(alphas)))  # no finite screen: every alpha in float64
        exact = _loo_errors(basis, evals, proj, [alphas[i] for i in near])
        return near[_first_argmin(exact)]
    return _first_argmin(_loo_errors(basis, evals, proj, alphas))


def _loo_errors(
    basis: torch.Tensor, evals: torch.Tensor, proj: torch.Tensor, alphas: list[float]
) -> torch.Tensor:
    """Summed squared LOO residuals per alpha (see ``_select_dual``), (len(alphas),).

    Alphas are batched into one matrix product per chunk of ~64 MB."""
    m, q = basis.shape[0], proj.shape[1]
    sq = basis * basis
    a = torch.tensor(alphas, dtype=evals.dtype, device=evals.device)
    inv = 1.0 / (evals[None, :] + a[:, None])  # (A, r)
    d = inv @ sq.T  # (A, m)
    chunk = max(1, int(64e6 // (m * q * basis.element_size())))
    out = []
    for lo in range(0, len(alphas), chunk):
        c = basis @ (inv[lo : lo + chunk, :, None] * proj)  # (chunk, m, q)
        out.append(((c / d[lo : lo + chunk, :, None]) ** 2).sum((1, 2)))
    return torch.cat(out)


def _select_primal(
    xs: torch.Tensor,
    evals: torch.Tensor,
    w: torch.Tensor,
    yc: torch.Tensor,
    alphas: list[float],
    m: int,
) -> int:
    """Best alpha index by efficient LOO in the primal form.

    ``xs = Xc V`` with ``Xc^T Xc = V diag(evals) V^T`` (p x p) and ``w = xs^T Yc``. The hat
    matrix of ridge with an intercept is ``11^T/m + xs diag(1/(evals + a)) xs^T``; LOO
    residuals are ``(Yc - xs (w / (evals + a))) / (1 - h_ii)``.
    """
    sq = xs * xs
    errs = []
    for a in alphas:
        inv = 1.0 / (evals + a)
        resid = yc - xs @ (inv[:, None] * w)
        h = sq @ inv + 1.0 / m
        errs.append(((resid / (1.0 - h)[:, None]) ** 2).sum())
    return _first_argmin(errs)


def _first_argmin(errs: list[torch.Tensor] | torch.Tensor) -> int:
    vals = (errs if isinstance(errs, torch.Tensor) else torch.stack(errs)).detach()
    best = torch.nonzero(vals == vals.min())
    if not best.numel():
        raise ValueError(
            f"the ridge's leave-one-out errors are NaN or infinite for every alpha "
            f"({vals.numel()}): the inputs' values are beyond {str(vals.dtype).removeprefix('torch.')}"
            f"'s range at these penalties; expected values of ordinary magnitude (or float64)")
    return int(best[0, 0])


def linear_alignment(
    X: Any, Y: Any, *, alphas: Sequence[float] | np.ndarray, folds: int = 5
) -> torch.Tensor | float:
    """The paper's linear alignment: ``(ridge_cv_r2(X, Y) + ridge_cv_r2(Y, X)) / 2``.

    X : (n, p), Y : (n, q). Symmetric in X and Y by construction.
    """
    xy = ridge_cv_r2(X, Y, alphas=alphas, folds=folds)
    yx = ridge_cv_r2(Y, X, alphas=alphas, folds=folds)
    return (xy + yx) / 2


def relative_alphas(X: Any, rel: Sequence[float] = DEFAULT_RELATIVE_ALPHAS, *,
                    name: str = "X") -> list[float]:
    """Absolute ridge penalties ``rel * trace(Xc Xc^T) / n`` for predictor X : (n, p).

    trace(Xc Xc^T)/n is the mean squared norm of a centred sample; penalties proportional to
    it make a grid that moves with the representation's scale, so multiplying X by a constant
    selects the same effective penalty.
    """
    x, _ = _as_tensor(X, "X")
    xc = x - x.mean(0)
    energy = float((xc * xc).sum().detach()) / x.shape[0]
    if energy == 0:
        raise ValueError(f"{name} is constant across stimuli: its alignment is undefined")
    return [r * energy for r in _check_alphas(rel)]


def _column_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, mean squared deviation) of x's columns, (p,) each, over column chunks (no
    centred copy of the whole of x). Differentiable."""
    mean = x.mean(0)
    sq = torch.empty_like(mean)
    for cols in _chunks(x.shape[0], x.shape[1], x.element_size(), TARGET_CHUNK_BYTES):
        sq[cols] = (x[:, cols] - mean[cols]).pow(2).mean(0)
    return mean, sq


def _scale(sq: torch.Tensor) -> torch.Tensor:
    """The standard deviations of ``_column_moments`` that z-scoring divides by: 1 for a
    constant column (only centred)."""
    std = sq.sqrt()
    return torch.where(std > 0, std, torch.ones_like(std))


def _relative_alphas(sq: torch.Tensor, rel: Sequence[float], name: str) -> list[float]:
    """``relative_alphas`` from the predictor's column moments: trace(Xc Xc^T)/n is the sum
    of its columns' mean squared deviations (checked as ``relative_alphas``'s are: an energy
    beyond the dtype's range gives infinite alphas, refused)."""
    energy = float(sq.sum().detach())
    if energy == 0:
        raise ValueError(f"{name} is constant across stimuli: its alignment is undefined")
    return _check_alphas([r * energy for r in _check_alphas(rel)])


def constant_columns(x: torch.Tensor) -> torch.Tensor:
    """(q,) bool: the columns of ``x`` (n, q) whose values are all equal (a dead unit, a flat
    voxel). Exact equality: "nearly constant" is handled by the variance weights."""
    return x.amax(0) == x.amin(0)


def linear_alignment_scaled(
    X: Any, Y: Any, *, rel: Sequence[float] = DEFAULT_RELATIVE_ALPHAS, folds: int = 5,
    parts: bool = False,
) -> Any:
    """The validation form the trainable reports: the mean of X -> Y and Y -> X cross-validated
    ridge R^2, where X : (n, p) is the network's layer and Y : (n, q) the reference.

    - Each direction's alphas are relative to its predictor (``relative_alphas``), so a
      layer's activation scale cannot move the grid.
    - Each direction's target columns are z-scored for the alpha selection: summed LOO error
      then weighs every column equally. (Without it, a few high-variance units choose an alpha
      that overfits the many low-variance ones.)
    - The dead-unit rule: R^2 is pooled over target columns, ``1 - sum w SSE / sum w SST``,
      and a constant column has weight 0. Predicting the reference (X -> Y), its non-constant
      columns weigh equally (the paper's uniform mean over voxels or filters; the reference is
      fixed, so the network cannot change the weights): each is z-scored over the n stimuli
      and each fold's R^2 pooled over them, so within a fold a column weighs its share of the
      fold's variance (the per-fold uniform mean differs by ~0.04 at n = 50, ~0.005 at
      n = 200; pooling keeps a column nearly flat within one fold from dominating it).
      Predicting the network's units (Y -> X), each unit weighs its variance: a dead unit
      weighs nothing and a nearly silenced one nearly nothing, so silencing units into
      constants earns no credit (a constant target is trivially "predicted" and would score
      R^2 = 1 under scikit-learn's rule). Silencing a unit predicted worse than the layer's
      average still raises the pooled score, as it would any normalised average (README).
      The same rule holds in the training loss (``linear_alignment_heldout``). Not symmetric
      in X and Y, by design.

    ``parts=True`` returns ``(score, x_to_y, y_to_x)`` (the model -> reference R^2 is what a
    noise ceiling normalises). Differentiable, with the alpha grid held: it is set from the
    inputs' scale as numbers, so the gradient leaves out the grid's own dependence on X.
    """
    x, y, as_float = _pair(X, Y, 2 * _check_folds(folds), f"{folds}-fold ridge CV")
    folds = _check_folds(folds)
    y_live = (~constant_columns(y)).to(y.dtype)
    x_mean, x_sq = _column_moments(x)
    y_mean, y_sq = _column_moments(y)
    x_var = x_sq * (~constant_columns(x)).to(x.dtype)
    # Each direction's targets z-scored (``standardize``: applied where ``_ridge_cv`` reads
    # each block, so without gradient no copy of the layer or the reference is made); with
    # weights var_j, the pooled R^2 of the raw units (SSE and SST of a z-scored column are
    # the raw ones divided by var_j)
    xy = _ridge_cv(x, y, _relative_alphas(x_sq, rel, "X (the layer)"), folds, y_live,
                   standardize=(y_mean, _scale(y_sq)))
    yx = _ridge_cv(y, x, _relative_alphas(y_sq, rel, "Y (the reference)"), folds, x_var,
                   standardize=(x_mean, _scale(x_sq)))
    if parts:
        return _out((xy + yx) / 2, as_float), _out(xy, as_float), _out(yx, as_float)
    return _out((xy + yx) / 2, as_float)


# ----------------------------------------------------------------------------- loss form

#: The Gram matrices of the loss form are built over column chunks of at most this many bytes
#: (n rows x chunk columns x itemsize) on the CPU: a centred copy of the whole (n, p) layer or
#: (n, q) reference is never made (AlexNet conv1 at 224 px and batch 1000 is 0.8 GB, the Gabor
#: responses 1.3 GB), each chunk's temporaries stay in the CPU's cache (measured at batch 128
#: with the Gabor responses at 224 px: 4 MiB chunks 175 ms, 64 MiB chunks 302 ms), and each
#: chunk's partial Gram is added up in float64.
GRAM_CHUNK_BYTES = 4 << 20
#: The same bound on a GPU, where large products are what keeps it busy.
GRAM_CHUNK_BYTES_CUDA = 256 << 20


#: On a CUDA device the Gram products (forward and the layer's backward) run in TF32: the
#: network already runs in bf16 there, and float32 products without tensor cores would cost
#: more than the network (2.1 TFLOP for the Gabor term at batch 1000 against 4.1). TF32 rounds
#: each operand to 10 mantissa bits, so every TF32 product takes centred columns (the
#: forward's Grams always did; the backward's since stop 36: on the raw layer, a rectified
#: layer's mean carried that rounding into the gradient). Emulated on the CPU (operands
#: rounded to TF32; tests/test_alignment.py), n = 128 and 256: the score moves by at most
#: 5e-7 against the float64 definition, the gradient by 3.9e-4 to 4.1e-4 relative, with or
#: without an offset (the raw layer in the backward: up to 1.1e-3 with a rectified layer's
#: offset; the backward in IEEE float32 instead: 2.7e-4, the rest being the forward's TF32
#: Grams, at about 6x the product's time). The 7e-5 quoted until stop 35 came from an
#: emulation whose hook missed ``a @ b``. bench_paper_shape.py checks every condition against
#: the float64 definition (tolerance 1e-3 on the gradient).
GRAM_TF32_ON_CUDA = True


def _tf32(device: torch.device) -> bool:
    """Whether the Gram products on ``device`` run in TF32 (``GRAM_TF32_ON_CUDA``)."""
    return device.type == "cuda" and GRAM_TF32_ON_CUDA


@contextlib.contextmanager
def _gram_products(device: torch.device):
    """TF32 matmuls on CUDA while the Grams are built (``GRAM_TF32_ON_CUDA``), the
    process's setting restored afterwards; nothing elsewhere."""
    if not _tf32(device):
        yield
        return
    matmul = torch.backends.cuda.matmul
    try:
        before = matmul.fp32_precision
        matmul.fp32_precision = "tf32"
    except (AttributeError, RuntimeError):  # an older torch, or the process uses the legacy
        yield  # allow_tf32 flag (torch refuses to mix the two): its own setting then applies
        return
    try:
        yield
    finally:
        matmul.fp32_precision = before


def _column_chunks(x: torch.Tensor) -> list[slice]:
    """Column slices of x (n, cols) of at most the loss form's chunk bound
    (``GRAM_CHUNK_BYTES``, or ``GRAM_CHUNK_BYTES_CUDA`` on a GPU), as ``_chunks`` cuts them."""
    limit = GRAM_CHUNK_BYTES if x.device.type == "cpu" else GRAM_CHUNK_BYTES_CUDA
    return _chunks(x.shape[0], x.shape[1], x.element_size(), limit)


def _narrow(x: torch.Tensor) -> bool:
    """x (n, cols) has fewer columns than rows: its (n, n) Gram is rank-deficient, and the
    directions it does not span hold only the product's rounding. In float32 that rounding
    (about 1e-7 of the entries) outweighs a small ridge penalty there (``ridge_rel`` 1e-6 is
    1e-6 of the mean eigenvalue): the loss form's float32 score moved from -0.545 to -0.610
    at n = 1000, p = 512, or its Cholesky failed. Such Grams are built in float64; their
    products cost n^2 cols < n^3, what the float64 solves cost already."""
    return x.shape[1] < x.shape[0] and x.dtype != torch.float64


def _chunked_gram(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``(x - mean)(x - mean)^T`` (n, n) float64, products in x's dtype (float64 where x has
    fewer columns than rows, ``_narrow``), chunk by chunk."""
    if _narrow(x):
        x, mean = x.double(), mean.double()
    n = x.shape[0]
    chunks = _column_chunks(x)
    with _gram_products(x.device):
        if len(chunks) == 1:
            xc = x - mean
            return (xc @ xc.T).to(torch.float64)
        k = torch.zeros(n, n, dtype=torch.float64, device=x.device)
        for cols in chunks:
            xc = x[:, cols] - mean[cols]
            k += (xc @ xc.T).to(torch.float64)
    return k


def _gram_backward(s: torch.Tensor, x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """dL/dX = S X - (S 1) mean^T = S (X - 1 mean^T) for a Gram's double-centred, symmetrised
    gradient S (n, n) float64, in x's dtype: the one (n, n) x (n, p) product, in x's dtype,
    or in float64 where x has fewer columns than rows (``_narrow``: there S holds entries up
    to about 1/ridge_rel that cancel in the product; in float32 the gradient was 4 % off at
    ridge_rel = 1e-6). In TF32 (``_tf32``) on X's centred column chunks
    (``_centred_product``)."""
    if _narrow(x):
        return (s @ x.double()).addr_(s.sum(1), mean.double(), alpha=-1).to(x.dtype)
    s = s.to(x.dtype)
    if _tf32(x.device):
        return _centred_product(s, x, mean)
    return (s @ x).addr_(s.sum(1), mean, alpha=-1)


def _centred_product(s: torch.Tensor, x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``S (X - 1 mean^T)`` (n, p), column chunk by column chunk (``_column_chunks``): the
    TF32 products see the layer's spread, not its offset, and no centred copy of the whole
    layer is made."""
    out = torch.empty((s.shape[0], x.shape[1]), dtype=x.dtype, device=x.device)
    with _gram_products(x.device):
        for cols in _column_chunks(x):
            out[:, cols] = s @ (x[:, cols] - mean[cols])
    return out


class _CentredGram(torch.autograd.Function):
    """``K = Xc Xc^T`` (n, n, float64) for X (n, p), Xc = X minus its column means.

    Backward: with S = G + G^T and Sc = J S J (J the centring matrix), dL/dX = Sc X: one
    (n, n) x (n, p) product on X itself (Sc 1 = 0, so centring X first changes nothing; the
    rank-one term ``(Sc 1) mean^T`` is still subtracted, for Sc's rounding). Autograd's rule
    for ``xc @ xc.T`` would do two products and keep a centred copy of X."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(0)
        ctx.save_for_backward(x, mean)
        return _chunked_gram(x, mean)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, mean = ctx.saved_tensors
        return _gram_backward(_double_centre(grad + grad.T), x, mean)


def _centred_gram(x: torch.Tensor) -> torch.Tensor:
    """Centred Gram matrix ``Xc Xc^T`` (n, n) in float64, differentiable in x.

    The p-dimensional contraction (the expensive part) runs in x's own dtype: float32 rounding
    there is ~1e-7 relative per entry once centring has removed any common offset. Everything
    n x n downstream runs in float64, where the conditioning matters."""
    if x.requires_grad and torch.is_grad_enabled():
        return _CentredGram.apply(x)
    return _chunked_gram(x, x.mean(0))


def _target_grams(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """What the loss form needs of the reference Y (n, q), in one pass over its columns:
    ``(Ky, Kw, live)`` with Ky = Yc Yc^T, Kw = Yw Yw^T where Yw = Yc's non-constant columns
    each divided by its root SST (constant columns: zero), and ``live`` the number of
    non-constant columns. Both (n, n) float64. Differentiable in y when y requires grad.
    Products in y's dtype, or float64 where y has fewer columns than rows (``_narrow``)."""
    if _narrow(y):
        y = y.double()
    if y.requires_grad and torch.is_grad_enabled():  # the plain form: autograd's own rules
        yc = y - y.mean(0)
        live = ~constant_columns(y)
        sst = (yc * yc).sum(0)
        w = torch.where(live, torch.where(live, sst, torch.ones_like(sst)).rsqrt(),
                        torch.zeros_like(sst))
        yw = yc * w
        return ((yc @ yc.T).to(torch.float64), (yw @ yw.T).to(torch.float64),
                int(live.sum()))
    with torch.no_grad(), _gram_products(y.device):
        n = y.shape[0]
        mean = y.mean(0)
        # [Ky | Kw] = Yc [Yc ; Yc D]^T with D = diag(1/SST) on the live columns (0 on the
        # constant ones, whose SST may be ~1e-32): one product per chunk, against a stacked
        # (2n, chunk) buffer, instead of two and an in-place rescaling pass between them
        k = torch.zeros(n, 2 * n, dtype=torch.float64, device=y.device)
        live_total = torch.zeros((), dtype=torch.int64, device=y.device)
        for cols in _column_chunks(y):
            block = y[:, cols]
            live = block.amax(0) != block.amin(0)  # constant_columns, chunk-wise
            stacked = torch.empty((2 * n, block.shape[1]), dtype=y.dtype, device=y.device)
            yc, yd = stacked[:n], stacked[n:]
            torch.sub(block, mean[cols], out=yc)
            inv_sst = (yc * yc).sum(0).clamp_min_(torch.finfo(y.dtype).tiny).reciprocal_()
            torch.mul(yc, inv_sst.mul_(live), out=yd)
            k += (yc @ stacked.T).to(torch.float64)
            live_total += live.sum()
        ky, kw = k[:, :n], k[:, n:]
        # Kw's two halves differ by rounding only; made exactly symmetric, as Yw Yw^T is
        return ky, (kw + kw.T) / 2, int(live_total)


def _heldout_operator(kx: torch.Tensor, rel: float, folds: int | None) -> torch.Tensor:
    """The held-out residual operator R (n, n, float64) of kernel ridge (unpenalised
    intercept) with predictor Gram ``kx`` (n, n, float64): the held-out residuals of any
    target y are ``R @ y``. With lam = rel * trace(Kc)/n_train and A = Kc + lam I:

    - folds=None, exact leave-one-out: ``E_i = c_i / d_i`` with ``c = A^-1 Yc`` and
      ``d_i = (A^-1)_ii - 1/(lam n)`` (see ``_select_dual``); since A 1 = lam 1 for a centred
      kernel, ``A^-1 J = A^-1 - 11^T/(lam n)`` (J the centring matrix), so
      ``R = diag(1/d) (A^-1 - 11^T/(lam n))``.
    - folds=k, contiguous k-fold: each fold's model is fitted on the rest with its own
      centring and penalty; for test rows ``R[te, te] = I`` and
      ``R[te, tr] = -(11^T/m + K_et A_tt^-1 J_m)``.

    R annihilates constant vectors (R 1 = 0), so whether y is centred does not matter in exact
    arithmetic (``_heldout_r2`` centres it, for rounding's sake)."""
    n = kx.shape[0]
    if folds is None:
        a_inv, _, c, d = _loo_inverse(kx, rel)
        return (a_inv - c) / d[:, None]
    rows = []
    batch_energy = torch.diagonal(kx).sum() / n
    for lo, hi in _fold_bounds(n, folds):
        tr = torch.cat([torch.arange(0, lo), torch.arange(hi, n)]).to(kx.device)
        m = tr.numel()
        k_tt, k_et = _fold_kernels(kx, tr, lo, hi)
        energy = torch.diagonal(k_tt).sum() / m
        # A layer silent on the fold's training rows (not on the batch): K_tt is 0, or the
        # rounding noise the batch's centring leaves (1e-17 where the batch's energy is 1).
        # Any penalty then predicts the training mean; one of the noise's size gave scores of
        # -3.6e7. Such a fold gets the batch's penalty.
        silent = energy <= 1e-10 * batch_energy
        lam = rel * torch.where(silent, batch_energy, energy)
        eye = torch.eye(m, dtype=kx.dtype, device=kx.device)
        w = torch.linalg.solve(k_tt + lam * eye, k_et.T).T  # K_et A^-1, (n_te, m)
        w = w - w.mean(1, keepdim=True)  # @ J_m
        block = torch.zeros(hi - lo, n, dtype=kx.dtype, device=kx.device)
        block[:, tr] = -(w + 1.0 / m)
        block[:, lo:hi] = torch.eye(hi - lo, dtype=kx.dtype, device=kx.device)
        rows.append(block)
    return torch.cat(rows)


def _loo_inverse(k: torch.Tensor, rel: float):
    """The exact leave-one-out pieces of kernel ridge with Gram ``k`` (n, n, float64), or a
    stack of them (..., n, n): ``(B, lam, c, d)`` with Kc the double-centred kernel,
    lam = rel * trace(Kc)/n, B = (Kc + lam I)^-1, c = 1/(lam n) and d = diag(B) - c
    (``_heldout_operator``); lam and c have the stack's shape, d is (..., n)."""
    n = k.shape[-1]
    kc = _double_centre(k)
    diagonal = kc.diagonal(dim1=-2, dim2=-1)
    lam = diagonal.sum(-1) * (rel / n)
    diagonal.add_(lam[..., None])  # Kc + lam I, in Kc's own (fresh) buffer
    b = torch.cholesky_inverse(torch.linalg.cholesky(kc))
    c = 1.0 / (lam * n)
    return b, lam, c, b.diagonal(dim1=-2, dim2=-1) - c[..., None]


def _heldout_r2_from_grams(k_pred: torch.Tensor, k_target: torch.Tensor,
                           total: torch.Tensor | float, rel: float,
                           folds: int | None) -> torch.Tensor:
    """Pooled held-out R^2, ``1 - sum_j w_j SSE_j / total``, from Gram matrices alone.

    ``k_target = Z Z^T`` with Z the target columns, each already multiplied by sqrt(w_j): the
    weighted SSE is ``||R Z||_F^2 = <R^T R, k_target>_F``, so no (n, n) x (n, q) product is
    needed. ``total`` is sum_j w_j SST_j. A target set with nothing to explain scores 0."""
    if float(total.detach() if isinstance(total, torch.Tensor) else total) <= 0:
        return (k_pred * 0).sum() + (k_target * 0).sum()
    op = _heldout_operator(k_pred, rel, folds)
    return 1.0 - ((op @ k_target) * op).sum() / total


class _LeaveOneOutScore(torch.autograd.Function):
    """The exact leave-one-out score of both directions between the layer X (n, p) and a
    reference that has no gradient, given as its Grams ``ky`` and ``kw``
    (``_target_grams``): what every training step computes. The layer's Gram is built here
    (``_chunked_gram``) and the gradient with respect to X is written out, in float64 up to
    the one (n, n) x (n, p) product: the same numbers as autograd through
    ``_CentredGram`` and ``_heldout_r2_from_grams``, for a fraction of their operations (the
    step's fixed cost at small batches; tests/test_alignment.py compares both and checks it
    against finite differences).

    Predicting the reference (``kw``, ``live`` columns): with A = Kc + lam I, B = A^-1,
    c = 1/(lam n), P = B - c 11^T, d = diag(B) - c, the pooled SSE is
    f = sum_i (P Kw P)_ii / d_i^2; score_xy = 1 - f / live. Predicting the layer with R_y the
    reference's held-out operator (``_heldout_operator``): score_yx = 1 - <R_y^T R_y, Kx> /
    tr(Kx). Backward: G = dscore/dKx (symmetric), then dX = J (G + G^T) J X as in
    ``_CentredGram``, with the two double centrings (of Kc's gradient and of G) merged into
    one since J is idempotent."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, ky: torch.Tensor, kw: torch.Tensor, live: int,
                rel: float) -> torch.Tensor:
        mean = x.mean(0)
        kx = _chunked_gram(x, mean)
        t = kx.trace()
        t_value = float(t)  # one host sync for both uses
        if not math.isfinite(t_value):  # the trace is finite when every entry of x is
            _check_gram_finite(x, "X")
        # both leave-one-out inverses (the layer's and the reference's) in one batched pass
        b2, lam2, c2, d2 = _loo_inverse(torch.stack((kx, ky)), rel)
        b, lam, c, d = b2[0], lam2[0], c2[0], d2[0]
        op_y = (b2[1] - c2[1]) / d2[1][:, None]
        rtr_y = op_y.T @ op_y
        p = b - c
        wp = kw @ p
        q_diag = (p * wp).sum(0)  # diag(P Kw P), P symmetric
        xy = 1.0 - (q_diag / d**2).sum() / live if live > 0 else kx.new_zeros(())
        inner = torch.vdot(rtr_y.reshape(-1), kx.reshape(-1))
        yx = 1.0 - inner / t if t_value > 0 else kx.new_zeros(())
        ctx.save_for_backward(x, mean, b, p, d, wp, q_diag, rtr_y, lam, t, inner)
        ctx.live, ctx.rel, ctx.t_value = live, rel, t_value
        return ((xy + yx) / 2).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, mean, b, p, d, wp, q_diag, rtr_y, lam, t, inner = ctx.saved_tensors
        n = b.shape[0]
        # h = 2 dscore/dKx up to the double centring (J h J is the gradient; h symmetric)
        h = torch.zeros_like(b)
        if ctx.live > 0:  # f(Kc) above; score_xy = 1 - f / live
            e = d.pow(-2)
            m = wp * e[None, :]  # Kw P E; the gradient in P is M = Kw P E + E P Kw = m + m^T
            g_b = m + m.T
            g_b.diagonal().add_(q_diag * e / d * -2.0)  # the gradient in d
            h = b @ g_b @ b  # -df/dKc, but for lam's dependence on tr(Kc):
            h.diagonal().add_((ctx.rel / n) * (h.trace() - g_b.sum() / (lam * lam * n)))
            h /= ctx.live
        if ctx.t_value > 0:  # score_yx = 1 - <R_y^T R_y, Kx> / tr(Kx)
            h.sub_(rtr_y, alpha=1.0 / ctx.t_value).diagonal().add_(inner / (t * t))
        dx = _gram_backward(_double_centre(h).mul_(grad.to(h.dtype)), x, mean)
        return dx, None, None, None, None


def _heldout_r2(kx: torch.Tensor, y: torch.Tensor, rel: float, folds: int | None,
                uniform: bool) -> torch.Tensor:
    """The loss form's definition, with explicit residuals: predictive R^2 of kernel ridge
    from the centred Gram ``kx`` (n, n, float64) to ``y`` (n, q), every prediction held out
    (``_heldout_operator``), ``E = R @ y`` computed in float64.

    R^2 is pooled over target columns (residuals over the held-out samples, SST about the
    batch mean): ``1 - sum_j w_j SSE_j / sum_j w_j SST_j``. ``uniform`` (the reference's
    columns): w_j = 1/SST_j, the uniform mean of per-column R^2, over the columns that are not
    constant in the batch (w = 0 for those). Otherwise (the network's units): w = 1, each unit
    weighs its variance, so a dead unit adds nothing and no division by a vanishing SST ever
    happens (the gradient stays bounded as a unit dies). ``linear_alignment_scaled`` applies
    the same rule.

    Not what the trainable runs: ``linear_alignment_heldout`` computes the same number from
    Gram matrices alone (``_heldout_r2_from_grams``); this form is the reference the tests and
    ``tests/benchmarks/bench_paper_shape.py`` hold it to.
    """
    y = y.to(torch.float64)
    yc = y - y.mean(0)
    # R annihilates constants, so R y = R yc exactly; in floating point an offset far above a
    # column's spread would leave its rounding in the residuals (a nearly flat column of
    # 1 + 1e-12 noise scored 1e-3 off): centred first
    resid = _heldout_operator(kx, rel, folds) @ yc
    sse = (resid**2).sum(0)
    sst = (yc ** 2).sum(0)
    if uniform:
        live = ~constant_columns(y)
        if not bool(live.any()):  # nothing varies: nothing to explain
            return (sse * 0).sum()
        return (1.0 - sse[live] / sst[live]).mean()
    den = sst.sum()
    if float(den.detach()) <= 0:
        return (sse * 0).sum()
    return 1.0 - sse.sum() / den


def _double_centre(k: torch.Tensor) -> torch.Tensor:
    """J K J for K (..., n, n), J the centring matrix: a new tensor."""
    row = k.mean(-1)
    return k - row[..., :, None] - (row[..., None, :] - row.mean(-1)[..., None, None])


def _heldout_args(X: Any, Y: Any, rel: float, folds: int | None, check_finite: bool = True):
    if rel <= 0 or not math.isfinite(rel):
        raise ValueError(f"rel (relative ridge penalty) must be positive and finite, got {rel}")
    min_n = 3 if folds is None else 2 * _check_folds(folds)
    return _pair(X, Y, min_n, "the held-out alignment", check_finite)


def _check_finite_by_trace(k: torch.Tensor, t: torch.Tensor, name: str) -> torch.Tensor:
    """``k``, the centred Gram of ``t``: its trace (the sum of t's centred squares) is finite
    when every entry of t is, so the entrywise check runs only when it is not. Saves the
    loss form a pass over a reference that can be gigabytes at the paper's shape."""
    if not math.isfinite(float(k.detach().trace())):
        _check_gram_finite(t, name)
    return k


def linear_alignment_heldout(
    X: Any, Y: Any, *, rel: float = DEFAULT_LOSS_REL, folds: int | None = None
) -> torch.Tensor | float:
    """Training-loss form of the linear alignment: mean of the held-out R^2 of X -> Y and
    Y -> X on one batch.

    X : (n, p) the network's layer, Y : (n, q) the reference (n = batch size). The dead-unit
    rule of ``linear_alignment_scaled``: predicting Y, its non-constant columns weigh equally;
    predicting X, each unit weighs its variance (``_heldout_r2``, the definition).
    Predictions are always held out (exact leave-one-out when ``folds`` is None, else
    contiguous ``folds``-fold): with p > n, in-sample R^2 is ~1 whatever the network does.
    The ridge penalty is relative, lam = rel * trace(Kc)/n, so multiplying X or Y by a
    constant leaves the score unchanged. Gradients flow to X and Y.

    Cost: everything goes through three (n, n) Gram matrices -- Kx of the layer, and Ky and
    Kw (Y's columns weighted 1/SST) of the reference -- built over column chunks in the inputs'
    dtype. The held-out residual operators are (n, n) float64 (the numerically fragile part,
    cheap at batch sizes), and each direction's pooled SSE is ``<R^T R, K_target>``: exact
    for both directions because the reference's weights 1/SST_j do not depend on the network
    and the layer's units are weighted by their variance. So no (n, n) x (n, p|q) product is
    formed, and the backward pass is one (n, n) x (n, p) product for Kx (none for a reference
    without gradient). Equal to the explicit-residual definition to float rounding (tested in
    float64 to 1e-10, and in float32 against float64 in ``bench_paper_shape.py``).
    """
    # finiteness is checked on the Grams' traces (``_check_finite_by_trace``), not by a pass
    x, y, as_float = _heldout_args(X, Y, rel, folds, check_finite=False)
    try:
        return _heldout(x, y, rel, folds, as_float)
    except torch.linalg.LinAlgError:
        # a zero Gram has a zero penalty: its factorisation fails. Checked on failure only
        for name, t in (("X", x), ("Y", y)):
            if bool(constant_columns(t.detach()).all()):
                raise UndefinedScore(f"{name} is constant across the {t.shape[0]} stimuli: "
                                     f"its held-out alignment is undefined") from None
        raise


def _heldout(x: torch.Tensor, y: torch.Tensor, rel: float, folds: int | None,
             as_float: bool) -> torch.Tensor | float:
    ky, kw, live = _target_grams(y)
    _check_finite_by_trace(ky, y, "Y")
    if folds is None and not (ky.requires_grad or kw.requires_grad):  # every training step
        return _out(_LeaveOneOutScore.apply(x, ky, kw, live, rel), as_float)
    kx = _check_finite_by_trace(_centred_gram(x), x, "X")
    xy = _heldout_r2_from_grams(kx, kw, float(live), rel, folds)
    yx = _heldout_r2_from_grams(ky, kx, torch.diagonal(kx).sum(), rel, folds)
    return _out(((xy + yx) / 2).to(x.dtype), as_float)


def linear_alignment_heldout_definition(
    X: Any, Y: Any, *, rel: float = DEFAULT_LOSS_REL, folds: int | None = None
) -> torch.Tensor | float:
    """``linear_alignment_heldout`` by its definition: explicit held-out residuals of both
    directions in float64 (``_heldout_r2``). Slower (two (n, n) x (n, p|q) products and
    their backward); the reference the fast form is tested against."""
    x, y, as_float = _heldout_args(X, Y, rel, folds)
    xy = _heldout_r2(_centred_gram(x), y, rel, folds, uniform=True)
    yx = _heldout_r2(_centred_gram(y), x, rel, folds, uniform=False)
    return _out(((xy + yx) / 2).to(x.dtype), as_float)


# ----------------------------------------------------------------------------- CKA and RSA


def linear_cka(X: Any, Y: Any) -> torch.Tensor | float:
    """Linear CKA of centred features.

    X : (n, p), Y : (n, q).
    ``CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)``, computed through the n x n
    Gram matrices (``<Kx, Ky>_F / (||Kx||_F ||Ky||_F)`` with Kx = Xc Xc^T), which is cheaper
    whenever p or q exceeds n. In [0, 1]; invariant to isotropic scaling and orthogonal
    transforms; symmetric. Needs n >= 3: with 2 stimuli both centred Grams are multiples of
    one matrix and CKA is 1 whatever X and Y are.
    """
    x, y, as_float = _pair(X, Y, 3, "CKA")
    kx, ky = _centred_gram(x), _centred_gram(y)
    nx, ny = torch.linalg.norm(kx), torch.linalg.norm(ky)
    for name, v, norm in (("X", x, nx), ("Y", y, ny)):
        if _constant_across_stimuli(v, float(norm.detach())):
            raise UndefinedScore(f"{name} is constant across stimuli: CKA is undefined")
    return _out(((kx * ky).sum() / (nx * ny)).to(x.dtype), as_float)


def _constant_across_stimuli(v: torch.Tensor, gram_norm: float) -> bool:
    """Whether every stimulus (row) of ``v`` is the same (a layer whose units are all dead:
    each image gives its bias), given the norm of its centred Gram. Exact equality, as
    ``constant_columns``: centring identical rows leaves rounding noise that would score as
    a number. The pass over ``v`` is made only when the Gram is as small as that noise
    (relative to the first row's energy), not on every training step."""
    if gram_norm == 0:
        return True
    first = float((v[0] @ v[0]).detach())
    return gram_norm <= 1e-9 * v.shape[0] * first and bool((v == v[:1]).all())


def _row_gram(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What RSA reads of x (n, p): ``(G, silent)`` with G (n, n) float64 the Gram of x's rows
    centred over its varying columns (all of them when none varies; the dead-unit rule of
    ``rsa``), so that ``G_ij / sqrt(G_ii G_jj)`` is the correlation of stimuli i and j, and
    ``silent`` (n,) bool the stimuli whose features are all equal, to rounding (no correlation
    distance: a rectified layer silent on that image, or a row of its bias). Built over column
    chunks in float64: no copy of x, whole or without its constant columns, is made, and G
    of a subset of rows is G's sub-block (each row is centred on its own). Differentiable."""
    n, p = x.shape
    with torch.no_grad():
        varying = ~constant_columns(x)
    if not bool(varying.any()):
        varying = torch.ones_like(varying)
    chunks = _chunks(n, p, 8, TARGET_CHUNK_BYTES)

    def block(cols: slice) -> torch.Tensor:
        part = x[:, cols].to(torch.float64)
        keep = varying[cols]
        return part if bool(keep.all()) else part[:, keep]

    count = int(varying.sum())
    total = sum(block(cols).sum(1) for cols in chunks)
    mean = total / count
    g = None
    for cols in chunks:
        c = block(cols) - mean[:, None]
        g = c @ c.T if g is None else g + c @ c.T
    with torch.no_grad():
        scale = 64 * torch.finfo(torch.float64).eps * mean.abs() * count ** 0.5
        silent = g.diagonal().clamp_min(0).sqrt() <= scale
    return g, silent


def _rdm_from_gram(g: torch.Tensor) -> torch.Tensor:
    """Upper triangle (i < j) of the correlation-distance RDM ``1 - corr(x_i, x_j)`` from the
    row-centred Gram ``g`` (``_row_gram``) of rows none of which is silent,
    (n(n-1)/2,)."""
    inv = g.diagonal().rsqrt()
    rdm = 1.0 - g * inv[:, None] * inv[None, :]
    i, j = torch.triu_indices(g.shape[0], g.shape[0], offset=1, device=g.device)
    return rdm[i, j]


def rsa(X: Any, Y: Any) -> torch.Tensor | float:
    """RSA score: Pearson correlation of the upper triangles of the two correlation-distance
    RDMs. X : (n, p), Y : (n, q); RDM_ij = 1 - corr(x_i, x_j) across features. In [-1, 1],
    symmetric, differentiable; needs n >= 3. A stimulus whose features are all equal in X or
    in Y (a rectified layer silent on that image) has no correlation distance: it is left out
    of both RDMs (selected before any division, so no NaN reaches the gradient), and the
    score is undefined (``UndefinedScore``) when fewer than 3 stimuli remain or an RDM is the
    same for every pair (every stimulus the same).

    The dead-unit rule: a feature constant over the stimuli (a unit dead after a ReLU) is
    left out before the RDMs. Kept, it shifts every stimulus's pattern mean and so every
    correlation distance: appending 24 silent units to a 48-unit layer moved the score from
    0.125 to 0.138, i.e. a network could raise its RSA by silencing units."""
    x, y, as_float = _pair(X, Y, 3, "RSA")
    dtype = x.dtype
    (gx, silent_x), (gy, silent_y) = _row_gram(x), _row_gram(y)
    silent = silent_x | silent_y
    if bool(silent.any()):
        keep = ~silent
        if int(keep.sum()) < 3:
            raise UndefinedScore(f"{int(silent.sum())} of {x.shape[0]} stimuli have constant "
                                 f"features: RSA needs 3 with a correlation distance")
        gx, gy = gx[keep][:, keep], gy[keep][:, keep]
    dx, dy = _rdm_from_gram(gx), _rdm_from_gram(gy)
    for name, d in (("X", dx), ("Y", dy)):
        # RDM entries lie in [0, 2]: a spread at rounding's scale is every stimulus the same
        if float((d.max() - d.min()).detach()) <= 1e-12:
            raise UndefinedScore(f"{name} gives every pair of stimuli the same correlation "
                                 f"distance (constant across stimuli): RSA is undefined")
    dx, dy = dx - dx.mean(), dy - dy.mean()
    den = torch.linalg.norm(dx) * torch.linalg.norm(dy)
    return _out(((dx * dy).sum() / den).to(dtype), as_float)


# ----------------------------------------------------------------------------- registry


def _no_loss_options(ridge_rel: float, loss_folds: int) -> dict[str, Any]:
    return {}


def _three_rows(loss_folds: int) -> int:
    return 3


def _heldout_loss_options(ridge_rel: float, loss_folds: int) -> dict[str, Any]:
    return {"rel": ridge_rel, "folds": None if loss_folds == 0 else loss_folds}


def _heldout_min_rows(loss_folds: int) -> int:
    return 3 if loss_folds == 0 else 2 * loss_folds


@dataclass(frozen=True)
class Metric:
    """An alignment metric by name: ``loss`` scores one training batch (differentiable,
    higher = more aligned, the trainable minimises ``-loss``), ``validate`` scores a fixed
    held-out stimulus set.

    ``loss_options(ridge_rel, loss_folds)`` : the trial's loss settings as ``loss``'s keyword
    arguments (the linear form's relative penalty and held-out folds; none for CKA and RSA).
    ``min_rows(loss_folds)`` : the fewest stimuli of a group ``loss`` scores."""

    name: str
    loss: Callable[..., torch.Tensor]
    validate: Callable[..., torch.Tensor | float]
    description: str
    loss_options: Callable[[float, int], dict[str, Any]] = _no_loss_options
    min_rows: Callable[[int], int] = _three_rows

    def batch_loss(self, *, ridge_rel: float, loss_folds: int) -> Callable[..., torch.Tensor]:
        """``loss`` with a trial's settings bound: score(X, Y)."""
        options = self.loss_options(ridge_rel, loss_folds)
        return functools.partial(self.loss, **options) if options else self.loss


METRICS: Registry[Metric] = Registry("alignment metric")
METRICS.register("linear", Metric(
    "linear",
    loss=linear_alignment_heldout,
    validate=linear_alignment_scaled,
    description="symmetric cross-validated ridge R^2 (the paper's metric)",
    loss_options=_heldout_loss_options,
    min_rows=_heldout_min_rows,
))
METRICS.register("cka", Metric("cka", loss=linear_cka, validate=linear_cka,
                               description="linear CKA"))
METRICS.register("rsa", Metric("rsa", loss=rsa, validate=rsa,
                               description="Pearson correlation of correlation-distance RDMs"))


def get_metric(name: str) -> Metric:
    """Registry lookup; unknown names raise ValueError listing the accepted ones."""
    return METRICS.get(name)
