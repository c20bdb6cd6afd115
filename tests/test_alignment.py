"""trainable.alignment against independent references (scikit-learn, scipy, brute force)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist
from scipy.stats import ortho_group, pearsonr
from sklearn.linear_model import Ridge, RidgeCV
from sklearn.model_selection import KFold, cross_val_score

from trainable.alignment import (
    METRICS,
    _fold_bounds,
    get_metric,
    linear_alignment,
    linear_alignment_heldout,
    linear_alignment_heldout_definition,
    linear_alignment_scaled,
    linear_cka,
    relative_alphas,
    ridge_cv_r2,
    rsa,
)

ALPHAS = np.logspace(-2, 4, 7)


def sklearn_cv_r2(x, y, alphas=ALPHAS, folds=5):
    return cross_val_score(RidgeCV(alphas=alphas), x, y, cv=KFold(folds), scoring="r2").mean()


def linear_data(n, p, q, seed, rank=5, noise=1.0):
    """Y depends on a rank-`rank` part of X plus noise: R^2 is interior, alphas interior."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, p))
    rank = min(rank, p)
    y = x[:, :rank] @ rng.standard_normal((rank, q)) + noise * rng.standard_normal((n, q))
    return x, y


# ----------------------------------------------------------------------------- ridge_cv_r2


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "n,p,q",
    [
        (60, 200, 5),  # p >> n: dual form
        (40, 1500, 30),  # p >> n, many targets
        (60, 10, 7),  # p < n: primal form
        (100, 30, 50),  # q > p
        (83, 400, 2),  # n not divisible by the folds
        (50, 5, 1),  # a single target
    ],
)
def test_ridge_cv_r2_equals_sklearn_float64(n, p, q, seed):
    x, y = linear_data(n, p, q, seed)
    assert ridge_cv_r2(x, y, alphas=ALPHAS) == pytest.approx(sklearn_cv_r2(x, y), abs=1e-6)


@pytest.mark.parametrize("folds", [2, 3, 10])
def test_ridge_cv_r2_equals_sklearn_other_folds(folds):
    x, y = linear_data(70, 120, 4, seed=folds)
    got = ridge_cv_r2(x, y, alphas=ALPHAS, folds=folds)
    assert got == pytest.approx(sklearn_cv_r2(x, y, folds=folds), abs=1e-6)


def test_ridge_cv_r2_shape_at_paper_scale_dual_form():
    # AlexNet conv1 at 224 px has 193,600 features; keep n small so the test stays fast.
    rng = np.random.default_rng(3)
    x = rng.standard_normal((30, 193_600)).astype(np.float64)
    y = x[:, :4] @ rng.standard_normal((4, 3)) + rng.standard_normal((30, 3))
    alphas = np.logspace(2, 7, 6)
    assert ridge_cv_r2(x, y, alphas=alphas) == pytest.approx(
        sklearn_cv_r2(x, y, alphas=alphas), abs=1e-6
    )


@pytest.mark.parametrize("n,p,q", [(60, 200, 5), (100, 30, 50)])
def test_ridge_cv_r2_float32(n, p, q):
    # float32 runs the Gram matrix, eigendecomposition and solves in float32 (scikit-learn
    # always promotes to float64). Rounding of ~6e-8 per operation is amplified by the
    # condition number of (K + alpha I), ~1e3 at the small alphas here, and by summing over
    # ~n*p terms, so agreement is ~1e-4; 2e-3 leaves margin without hiding a wrong formula
    # (a wrong alpha or fold costs > 1e-2 on this data).
    x, y = linear_data(n, p, q, seed=5)
    got = ridge_cv_r2(x.astype(np.float32), y.astype(np.float32), alphas=ALPHAS)
    assert got == pytest.approx(sklearn_cv_r2(x, y), abs=2e-3)


def test_ridge_cv_r2_torch_in_torch_out_and_flattening():
    x, y = linear_data(40, 48, 6, seed=0)
    xt = torch.from_numpy(x).reshape(40, 3, 4, 4)
    yt = torch.from_numpy(y)
    got = ridge_cv_r2(xt, yt, alphas=ALPHAS)
    assert isinstance(got, torch.Tensor) and got.ndim == 0 and got.dtype == torch.float64
    assert float(got) == pytest.approx(sklearn_cv_r2(x, y), abs=1e-6)


def test_constant_test_fold_columns_follow_sklearn_rule():
    """A column constant within a test fold scores 1.0 when predicted exactly, else 0.0
    (scikit-learn's r2_score, force_finite=True)."""
    x, y = linear_data(50, 80, 3, seed=7)
    y = np.column_stack([y, np.full(50, 2.5), y[:, 0].copy()])
    y[:10, 4] = 1.0  # constant inside the first test fold only, predicted imperfectly
    got = ridge_cv_r2(x, y, alphas=ALPHAS)
    assert got == pytest.approx(sklearn_cv_r2(x, y), abs=1e-6)
    # the all-constant column is predicted exactly (the training mean) -> exactly 1 per fold
    only_const = ridge_cv_r2(x, np.full((50, 1), 2.5), alphas=ALPHAS)
    assert only_const == 1.0
    # the column constant only in fold 0 gets 0 there
    fold0 = KFold(5).split(x).__next__()
    model = RidgeCV(alphas=ALPHAS).fit(x[fold0[0]], y[fold0[0], 4])
    assert np.ptp(y[fold0[1], 4]) == 0 and np.abs(model.predict(x[fold0[1]]) - 1.0).max() > 0


# ----------------------------------------------------------------------------- known answers


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_linear_alignment_perfect_for_orthogonal_affine_transform(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((200, 20))
    q = ortho_group.rvs(20, random_state=seed)
    y = 3.7 * x @ q + rng.standard_normal(20)
    assert linear_alignment_scaled(x, y) > 0.99
    assert linear_alignment(x, y, alphas=[1e-3, 1e-2]) > 0.999
    assert linear_cka(x, y) == pytest.approx(1.0, abs=1e-10)
    assert linear_alignment_heldout(x, y, rel=1e-4) > 0.99


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_independent_noise_scores_near_zero(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((400, 10))
    y = rng.standard_normal((400, 8))
    assert abs(linear_alignment_scaled(x, y)) < 0.05
    assert abs(linear_cka(x, y)) < 0.1
    assert abs(rsa(x, y)) < 0.05


def test_heldout_form_is_not_in_sample_when_p_exceeds_n():
    # In-sample R^2 with p > n is ~1 for any target; held-out predictions of noise are not.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 2000))
    y = rng.standard_normal((64, 1000))
    assert linear_alignment_heldout(x, y) < 0.05
    assert linear_alignment_heldout(x, y, folds=4) < 0.05


def test_heldout_loo_equals_brute_force_ridge_refits():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((30, 50))
    y = x[:, :5] @ rng.standard_normal((5, 7)) + rng.standard_normal((30, 7))
    rel = 0.3

    def brute(a, b, folds):
        n = len(a)
        ac = a - a.mean(0)
        lam_full = rel * np.trace(ac @ ac.T) / n
        resid = np.zeros_like(b)
        bounds = [(i, i + 1) for i in range(n)] if folds is None else _fold_bounds(n, folds)
        for lo, hi in bounds:
            tr = np.r_[0:lo, hi:n]
            if folds is None:  # exact LOO keeps the batch's penalty
                lam = lam_full
            else:  # k-fold: each fold's own relative penalty
                atc = a[tr] - a[tr].mean(0)
                lam = rel * np.trace(atc @ atc.T) / len(tr)
            resid[lo:hi] = b[lo:hi] - Ridge(alpha=lam).fit(a[tr], b[tr]).predict(a[lo:hi])
        return (resid**2).sum(0), ((b - b.mean(0)) ** 2).sum(0)

    for folds in (None, 3, 5):
        sse_y, sst_y = brute(x, y, folds)  # predicting the reference: uniform over columns
        sse_x, sst_x = brute(y, x, folds)  # predicting the units: pooled, weights = variance
        expect = ((1 - sse_y / sst_y).mean() + (1 - sse_x.sum() / sst_x.sum())) / 2
        got = linear_alignment_heldout(x, y, rel=rel, folds=folds)
        assert got == pytest.approx(expect, abs=1e-9), folds


# ----------------------------------------------------------------------------- Gram-only form


def _mixed_pair(seed, n=40, p=300, q=90, dead=0):
    """A layer (dead units, a common offset, mixed scales) and a reference (flat columns)."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 4, dtype=torch.float64, generator=g)
    x = latent @ torch.randn(4, p, dtype=torch.float64, generator=g)
    x = x + 0.5 * torch.randn(n, p, dtype=torch.float64, generator=g)
    x = torch.relu(x * torch.linspace(0.1, 3, p, dtype=torch.float64) + 0.3) + 5.0
    x[:, :dead] = 0.25
    y = latent @ torch.randn(4, q, dtype=torch.float64, generator=g)
    y = y + torch.randn(n, q, dtype=torch.float64, generator=g)
    y[:, :3] = -1.5  # voxels that never move in this batch
    return x, y


@pytest.mark.parametrize("folds", [None, 4])
@pytest.mark.parametrize("dead", [0, 60])
@pytest.mark.parametrize("seed", [0, 1])
def test_gram_only_form_equals_the_explicit_residual_definition(folds, dead, seed):
    """Score and gradient of the Gram-only form (what the trainable runs) equal the
    explicit-residual definition in float64, dead units and flat voxels included."""
    x, y = _mixed_pair(seed, dead=dead)
    grads = []
    scores = []
    for fn in (linear_alignment_heldout, linear_alignment_heldout_definition):
        xg = x.clone().requires_grad_(True)
        score = fn(xg, y, folds=folds)
        score.backward()
        scores.append(float(score.detach()))
        grads.append(xg.grad)
    assert scores[0] == pytest.approx(scores[1], abs=1e-10)
    assert 0.05 < scores[0] < 0.95  # an interior score, not a degenerate one
    scale = float(grads[1].abs().max())
    assert scale > 0
    assert float((grads[0] - grads[1]).abs().max()) <= 1e-9 * scale
    if dead:
        assert float(grads[0][:, :dead].abs().max()) <= 1e-12 * scale  # no push, to rounding


def test_gram_only_form_in_float32_stays_within_tolerance_of_float64():
    """The trainable's precision: float32 layer and reference, Grams in float32, solves in
    float64. Stated tolerance: 1e-5 on the score, 1e-3 relative on the gradient."""
    x, y = _mixed_pair(3, n=64, p=2000, q=400, dead=100)
    exact = linear_alignment_heldout_definition(x.clone().requires_grad_(True), y)
    x64 = x.clone().requires_grad_(True)
    linear_alignment_heldout_definition(x64, y).backward()
    x32 = x.float().requires_grad_(True)
    got = linear_alignment_heldout(x32, y.float())
    got.backward()
    assert float(got.detach()) == pytest.approx(float(exact.detach()), abs=1e-5)
    err = (x32.grad.double() - x64.grad).norm() / x64.grad.norm()
    assert float(err) <= 1e-3


def _tf32(t: torch.Tensor) -> torch.Tensor:
    """``t`` (float32) rounded as a tensor core's TF32 input: 10 mantissa bits, to nearest
    even."""
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x0FFF + ((bits >> 13) & 1)) & ~0x1FFF).view(torch.float32)


def test_tf32_products_on_cuda_keep_the_gradient_within_tolerance(monkeypatch):
    """On CUDA the Gram products run in TF32 (``GRAM_TF32_ON_CUDA``), which rounds both
    operands to 10 mantissa bits: emulated here by rounding every float32 product's operands
    inside ``_gram_products``. The layer's backward product took the raw layer, so a rectified
    layer's mean (3x its spread here) carried its rounding into the gradient: 1.1e-3 relative
    against the float64 definition, over bench_paper_shape's tolerance of 1e-3. On centred
    column chunks it is the zero-mean layer's 4e-4 (the forward's TF32 Grams are most of it)."""
    import contextlib

    from torch.overrides import TorchFunctionMode

    import trainable.alignment as alignment

    class Tf32(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if (getattr(func, "__name__", "") in ("__matmul__", "__rmatmul__", "matmul", "mm")
                    and all(isinstance(a, torch.Tensor) and a.dtype == torch.float32
                            for a in args[:2])):
                args = (_tf32(args[0]), _tf32(args[1]), *args[2:])
            return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def emulated(device):
        with Tf32():
            yield

    monkeypatch.setattr(alignment, "_gram_products", emulated)
    monkeypatch.setattr(alignment, "_tf32", lambda device: True, raising=False)
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(128, 1500, generator=g) + 3.0)
    y = torch.randn(128, 800, generator=g)
    x64 = x.double().requires_grad_(True)
    exact = linear_alignment_heldout_definition(x64, y.double(), rel=0.1)
    exact.backward()
    x32 = x.clone().requires_grad_(True)
    got = linear_alignment_heldout(x32, y, rel=0.1)
    got.backward()
    assert float(got.detach()) == pytest.approx(float(exact.detach()), abs=1e-5)
    err = float((x32.grad.double() - x64.grad).norm() / x64.grad.norm())
    assert 1e-5 < err < 6e-4  # rounded (the emulation took), and within 6e-4


@pytest.mark.parametrize("weighted", [False, True])
def test_the_validation_forms_chunked_targets_give_the_one_block_numbers(monkeypatch, weighted):
    """Without gradient the validation forms read the targets in column chunks and sum the
    predictor's Gram over column chunks (at the paper's shape each fold's centred targets,
    their projection and its QR were 2.1 GB each in float64): the numbers are those of the
    one-block computation, which the gradient path still runs, with dead units, a flat
    column and chunks of 7 and 5 columns (the selection's triangular factor reduced as
    chunks come)."""
    import trainable.alignment as alignment

    x, y = _mixed_pair(5, n=60, p=300, q=200, dead=20)
    x[:, :20] = 1.7  # dead units, and a flat reference column, at values whose float mean
    y[:, 3] = 0.1  # depends on how the sum is blocked (a dyadic one's would not)
    if weighted:
        expect = [float(v.detach()) for v in linear_alignment_scaled(
            x.clone().requires_grad_(True), y, parts=True)]
    else:
        expect = [float(ridge_cv_r2(t.clone().requires_grad_(True), u,
                                    alphas=[0.1, 1.0, 10.0]).detach()) for t, u in ((x, y), (y, x))]
    monkeypatch.setattr(alignment, "TARGET_CHUNK_BYTES", 48 * 8 * 7)  # 7 of 48 training rows
    monkeypatch.setattr(alignment, "GRAM64_CHUNK_BYTES", 60 * 8 * 5)
    assert len(alignment._chunks(48, 200, 8, alignment.TARGET_CHUNK_BYTES)) == 29
    with torch.no_grad():
        if weighted:
            got = [float(v) for v in linear_alignment_scaled(x, y, parts=True)]
        else:
            got = [float(ridge_cv_r2(x, y, alphas=[0.1, 1.0, 10.0])),
                   float(ridge_cv_r2(y, x, alphas=[0.1, 1.0, 10.0]))]
    assert got == pytest.approx(expect, abs=1e-12)
    assert x.requires_grad is False and float(y[0, 3]) == 0.1  # the inputs untouched


def test_a_flat_target_column_scores_alike_however_the_targets_are_chunked(monkeypatch):
    """A column constant over the training rows is predicted by its mean, and scores 1 on its
    test fold only if predicted exactly (scikit-learn's rule): the float mean of 18 values of
    1.7 differed by an ulp between a block of 4 columns and one of 50, and the score moved by
    0.024. The mean of a flat column is now its value, in every path."""
    import trainable.alignment as alignment

    g = torch.Generator().manual_seed(5)
    x = torch.randn(23, 60, dtype=torch.float64, generator=g)
    y = x[:, :10] @ torch.randn(10, 50, dtype=torch.float64, generator=g) + 0.5 * torch.randn(
        23, 50, dtype=torch.float64, generator=g)
    y[:, :3] = 1.7
    alphas = [1e-2, 1.0, 1e2, 1e4]
    one = float(ridge_cv_r2(x, y, alphas=alphas))
    graded = float(ridge_cv_r2(x.clone().requires_grad_(True), y, alphas=alphas).detach())
    monkeypatch.setattr(alignment, "TARGET_CHUNK_BYTES", 8 * 20 * 4)  # 4 columns a chunk
    assert float(ridge_cv_r2(x, y, alphas=alphas)) == pytest.approx(one, abs=1e-12)
    assert graded == pytest.approx(one, abs=1e-12)


def test_column_chunks_change_nothing(monkeypatch):
    """Chunked Grams (the memory bound at the paper's shape) give the unchunked numbers."""
    import trainable.alignment as alignment

    x, y = _mixed_pair(4, dead=10)
    expect_x = x.clone().requires_grad_(True)
    expect = linear_alignment_heldout(expect_x, y)
    expect.backward()
    monkeypatch.setattr(alignment, "GRAM_CHUNK_BYTES", 40 * 8 * 7)  # 7 columns a chunk
    assert len(alignment._column_chunks(x)) == -(-x.shape[1] // 7)
    got_x = x.clone().requires_grad_(True)
    got = linear_alignment_heldout(got_x, y)
    got.backward()
    assert float(got.detach()) == pytest.approx(float(expect.detach()), abs=1e-12)
    assert torch.allclose(got_x.grad, expect_x.grad, rtol=1e-10, atol=1e-14)


def test_loss_form_refuses_non_finite_input_with_the_count():
    x, y = _mixed_pair(5)
    x[3, 4] = float("nan")
    x[5, 6] = float("inf")
    with pytest.raises(ValueError, match="X contains 2 NaN or inf values"):
        linear_alignment_heldout(x, y)
    big = torch.full((6, 5), 1e307, dtype=torch.float64)  # the sum overflows; every entry finite
    big[:, 0] = torch.arange(6.0)
    assert np.isfinite(float(linear_alignment_heldout(big, torch.randn(6, 3).double())))


# ----------------------------------------------------------------------------- symmetry, scale


@pytest.mark.parametrize("seed", [0, 1])
def test_symmetric_forms_are_symmetric(seed):
    x, y = linear_data(60, 30, 12, seed)
    assert linear_alignment(x, y, alphas=ALPHAS) == pytest.approx(
        linear_alignment(y, x, alphas=ALPHAS), abs=1e-12
    )
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), abs=1e-12)
    assert rsa(x, y) == pytest.approx(rsa(y, x), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_reported_forms_are_symmetric_when_every_column_has_the_same_variance(seed):
    """Both forms weigh the reference's columns equally and the network's units by variance:
    with equal-variance columns on both sides the two weightings agree, and so do the orders."""
    x, y = linear_data(60, 30, 12, seed)
    x, y = ((a - a.mean(0)) / a.std(0) for a in (x, y))
    assert linear_alignment_heldout(x, y) == pytest.approx(linear_alignment_heldout(y, x),
                                                           abs=1e-12)
    assert linear_alignment_scaled(x, y) == pytest.approx(linear_alignment_scaled(y, x),
                                                          abs=1e-12)


# ----------------------------------------------------------------------------- dead units


def _with_constant_units(x, count, value):
    return np.hstack([x, np.full((x.shape[0], count), value)])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("count,value", [(24, 0.0), (24, 0.7), (5, -3.0), (200, 0.0)])
def test_dead_or_constant_units_never_raise_the_score(seed, count, value):
    """A layer that silences units into constants cannot gain alignment: appending constant
    columns to the network's side leaves both reported forms unchanged (under scikit-learn's
    per-column rule each would score R^2 = 1 in the reference -> layer direction)."""
    rng = np.random.default_rng(seed)
    n, p, q = 90, 48, 20
    x = rng.standard_normal((n, p))
    y = x[:, :6] @ rng.standard_normal((6, q)) + 2.0 * rng.standard_normal((n, q))
    xd = _with_constant_units(x, count, value)
    for form in (linear_alignment_scaled,
                 lambda a, b: linear_alignment_heldout(a, b),
                 lambda a, b: linear_alignment_heldout(a, b, folds=5)):
        base, dead = form(x, y), form(xd, y)
        assert dead <= base + 1e-9 and dead == pytest.approx(base, abs=1e-9), (base, dead)
    if value == 0.0:  # scikit-learn's rule: a zero column is "predicted exactly", R^2 = 1
        yx_sklearn = ridge_cv_r2(y, xd, alphas=relative_alphas(y))
        assert yx_sklearn > ridge_cv_r2(y, x, alphas=relative_alphas(y)) + 0.1


@pytest.mark.parametrize("seed", [0, 1])
def test_known_answer_half_of_the_units_dead(seed):
    """X: half its units carry a signal unrelated to Y, half are dead (zero). Independent of Y,
    so the alignment is ~0 in both forms; the old per-column rule gave the dead half R^2 = 1,
    i.e. ~0.25 overall."""
    rng = np.random.default_rng(seed)
    n = 400
    x = _with_constant_units(rng.standard_normal((n, 24)), 24, 0.0)
    y = rng.standard_normal((n, 16))
    assert abs(linear_alignment_scaled(x, y)) < 0.05
    # the loss form's fixed penalty overfits pure noise a little: slightly negative
    assert abs(linear_alignment_heldout(x, y)) < 0.1
    old_rule = (ridge_cv_r2(x, y, alphas=relative_alphas(x))
                + ridge_cv_r2(y, x, alphas=relative_alphas(y))) / 2
    assert old_rule > 0.2
    # a layer whose half is dead and whose live half is Y exactly: perfectly aligned
    live = rng.standard_normal((n, 24))
    x2 = _with_constant_units(live, 24, 0.0)
    y2 = live @ ortho_group.rvs(24, random_state=seed)
    assert linear_alignment_scaled(x2, y2) > 0.99
    assert linear_alignment_heldout(x2, y2, rel=1e-4) > 0.99


def test_pooled_ridge_cv_r2_equals_sklearn_refits():
    """column_weights: per fold 1 - sum w SSE / sum w SST of scikit-learn RidgeCV's held-out
    predictions."""
    x, y = linear_data(70, 40, 6, seed=3)
    w = np.array([1.0, 0.0, 2.5, 0.3, 1.0, 4.0])
    scores = []
    for tr, te in KFold(5).split(x):
        pred = RidgeCV(alphas=ALPHAS).fit(x[tr], y[tr]).predict(x[te])
        sse = ((y[te] - pred) ** 2).sum(0)
        sst = ((y[te] - y[te].mean(0)) ** 2).sum(0)
        scores.append(1 - (w * sse).sum() / (w * sst).sum())
    got = ridge_cv_r2(x, y, alphas=ALPHAS, column_weights=w)
    assert got == pytest.approx(np.mean(scores), abs=1e-8)
    for bad in (-1.0, np.nan, np.inf):  # NaN was accepted, and the score was NaN
        with pytest.raises(ValueError, match=r"column_weights must be 6 finite numbers >= 0"):
            ridge_cv_r2(x, y, alphas=ALPHAS, column_weights=[1.0, bad, 1, 1, 1, 1])
    # half precision has no eigh in torch: computed in float32 ("NotImplementedError:
    # linalg_eigh_cpu not implemented for 'Half'")
    for dtype in (torch.float16, torch.bfloat16):
        half = ridge_cv_r2(torch.from_numpy(x).to(dtype), torch.from_numpy(y).to(dtype),
                           alphas=ALPHAS)
        assert half == pytest.approx(sklearn_cv_r2(x, y), abs=0.02)
    # CKA of 2 stimuli is 1 whatever the data: refused like too few stimuli elsewhere
    with pytest.raises(ValueError, match=r"got n=2 stimuli; CKA needs at least 3"):
        linear_cka(x[:2], y[:2])


@pytest.mark.parametrize("folds", [None, 4])
@pytest.mark.parametrize("cx,cy", [(1e-3, 1.0), (1.0, 250.0), (40.0, 1e-2)])
def test_loss_form_is_scale_invariant(folds, cx, cy):
    x, y = linear_data(48, 100, 20, seed=2)
    base = linear_alignment_heldout(x, y, folds=folds)
    assert linear_alignment_heldout(cx * x, cy * y, folds=folds) == pytest.approx(base, abs=1e-9)


def test_scaled_validation_form_is_scale_invariant():
    x, y = linear_data(60, 40, 10, seed=4)
    assert linear_alignment_scaled(1e3 * x, 1e-2 * y) == pytest.approx(
        linear_alignment_scaled(x, y), abs=1e-9
    )
    assert relative_alphas(2 * x, [1.0])[0] == pytest.approx(4 * relative_alphas(x, [1.0])[0])
    # float64 at any scale: the alphas' float32 screen over- or underflowed from ~1e17 and
    # ~1e-20 ("torch.cat(): expected a non-empty list of Tensors")
    for cx, cy in ((1e17, 1.0), (1e-20, 1.0), (1.0, 1e-30), (1e150, 1e-150)):
        assert linear_alignment_scaled(cx * x, cy * y) == pytest.approx(
            linear_alignment_scaled(x, y), abs=1e-9)
    tiny = torch.from_numpy(x * 1e-20).float()
    with pytest.raises(ValueError, match=r"^the ridge's leave-one-out errors are NaN or infinite "
                                         r"for every alpha \(9\): the inputs' values are "
                                         r"beyond float32's range"):
        linear_alignment_scaled(tiny, torch.from_numpy(y).float())


@pytest.mark.parametrize("folds", [None, 4])
def test_a_constant_input_to_the_loss_form_is_an_undefined_score_not_a_factorisation_error(folds):
    """A constant X or Y has a zero Gram and so a zero penalty: torch's LinAlgError from the
    Cholesky, naming neither. ``batch_alignment`` skips the group either way."""
    from trainable.alignment import UndefinedScore

    x, y = linear_data(20, 5, 4, seed=0)
    flat = np.full_like(x, 3.0)
    for a, b, name in ((flat, y, "X"), (x, flat, "Y")):
        with pytest.raises(UndefinedScore, match=rf"^{name} is constant across the 20 stimuli: "
                                                 rf"its held-out alignment is undefined$"):
            linear_alignment_heldout(a, b, folds=folds)


def test_scaled_validation_form_stays_differentiable():
    """"torch stays differentiable": the z-scoring divided in place, which autograd refused
    ("modified by an inplace operation") for a layer that requires grad. The alpha grid is
    set from the inputs' scale without gradient (``relative_alphas``), so the gradient is
    that of the score with its grid held: it differs from the finite difference at 1e-3."""
    x, y = (torch.from_numpy(a) for a in linear_data(30, 6, 4, seed=5))
    x.requires_grad_()
    score = linear_alignment_scaled(x, y)
    (grad,) = torch.autograd.grad(score, x)
    direction = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(0))
    eps = 1e-6
    with torch.no_grad():
        numeric = (linear_alignment_scaled(x + eps * direction, y)
                   - linear_alignment_scaled(x - eps * direction, y)) / (2 * eps)
    assert float((grad * direction).sum()) == pytest.approx(float(numeric), rel=1e-2)


# ----------------------------------------------------------------------------- CKA, RSA refs


def test_cka_matches_feature_space_formula():
    x, y = linear_data(50, 30, 20, seed=6)
    xc, yc = x - x.mean(0), y - y.mean(0)
    expect = np.linalg.norm(yc.T @ xc) ** 2 / (
        np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)
    )
    assert linear_cka(x, y) == pytest.approx(expect, abs=1e-12)


def test_rsa_matches_scipy():
    x, y = linear_data(40, 25, 15, seed=8)
    expect = pearsonr(pdist(x, "correlation"), pdist(y, "correlation")).statistic
    assert rsa(x, y) == pytest.approx(expect, abs=1e-12)
    # invariant to a per-stimulus affine change of the response pattern
    assert rsa(x, 3.0 * x + 2.0) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cka_and_rsa_in_float32_match_the_float64_reference(seed):
    """STYLE: every numerical function again in float32 at a stated, looser tolerance. Both
    reduce through n x n Grams or correlation distances of O(1) values, so float32's unit
    roundoff (6e-8) grows with the p- or q-term sums (here 30-200 terms) and the n^2 pairs,
    to well under 1e-5 on a score in [-1, 1]; 1e-5 is what is asserted. The Grams themselves
    are float64 downstream of the products (``_centred_gram``), so CKA stays closer."""
    for n, p, q in ((40, 30, 200), (60, 120, 25)):
        x, y = linear_data(n, p, q, seed=seed)
        x = x + 0.5 * np.random.default_rng(seed).standard_normal(x.shape)
        x32, y32 = x.astype(np.float32), y.astype(np.float32)
        cka_ref = linear_cka(x32.astype(np.float64), y32.astype(np.float64))
        rsa_ref = pearsonr(pdist(x32.astype(np.float64), "correlation"),
                           pdist(y32.astype(np.float64), "correlation")).statistic
        cka32 = linear_cka(torch.from_numpy(x32), torch.from_numpy(y32))
        rsa32 = rsa(torch.from_numpy(x32), torch.from_numpy(y32))
        assert cka32.dtype == rsa32.dtype == torch.float32
        assert float(cka32) == pytest.approx(cka_ref, abs=1e-5)
        assert float(rsa32) == pytest.approx(rsa_ref, abs=1e-5)
        assert 0.05 < abs(rsa_ref) < 0.999 and 0.05 < cka_ref < 0.999  # not a trivial answer


def test_rsa_over_column_chunks_gives_the_one_block_number(monkeypatch):
    """RSA reads each input through a Gram of its rows built over column chunks (at the
    paper's shape the validation's row-centred and unit-norm copies of the layer and the
    reference were 2.5x the trial's float32 inputs): with chunks of 3 columns, dead units
    inside chunks and silent stimuli, in float64 and float32, and with a gradient, the
    numbers are scipy's and the one-chunk ones."""
    import trainable.alignment as alignment

    g = torch.Generator().manual_seed(3)
    x = torch.relu(torch.randn(30, 40, generator=g, dtype=torch.float64))
    x[:, 5:9] = 0.0  # dead units
    x[4] = 0.0  # a stimulus the layer is silent on
    y = x[:, :10] @ torch.randn(10, 25, generator=g, dtype=torch.float64) + torch.randn(
        30, 25, generator=g, dtype=torch.float64)
    keep = [i for i in range(30) if i != 4]
    xs, ys = x[keep].numpy(), y[keep].numpy()
    expect = pearsonr(pdist(xs[:, np.ptp(xs, 0) > 0], "correlation"),
                      pdist(ys, "correlation")).statistic
    one = float(rsa(x, y))
    x32 = x.float().requires_grad_(True)
    one32 = rsa(x32, y.float())
    one32.backward()
    monkeypatch.setattr(alignment, "TARGET_CHUNK_BYTES", 30 * 8 * 3)
    assert len(alignment._chunks(30, 40, 8, alignment.TARGET_CHUNK_BYTES)) == 14
    assert float(rsa(x, y)) == pytest.approx(expect, abs=1e-12)
    assert one == pytest.approx(expect, abs=1e-12)
    c32 = x.float().requires_grad_(True)
    chunked32 = rsa(c32, y.float())
    chunked32.backward()
    assert float(chunked32.detach()) == pytest.approx(float(one32.detach()), abs=1e-6)
    assert torch.allclose(c32.grad, x32.grad, atol=1e-6) and float(c32.grad.abs().max()) > 0


def test_rsa_gives_dead_units_no_credit():
    """DESIGN: no averaging rule may let a network raise its score by silencing units. Units
    constant over the stimuli (at 0, or any value) are left out of the RDMs; kept, 24 silent
    units appended to a 48-unit layer raised the score from 0.125 to 0.138."""
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(32, 48, generator=g, dtype=torch.float64))
    y = x[:, :10] @ torch.randn(10, 20, generator=g, dtype=torch.float64) + torch.randn(
        32, 20, generator=g, dtype=torch.float64)
    base = float(rsa(x, y))
    for value in (0.0, 3.0):
        padded = torch.cat([x, torch.full((32, 24), value, dtype=x.dtype)], 1)
        assert float(rsa(padded, y)) == pytest.approx(base, abs=1e-12)
        assert float(rsa(y, padded)) == pytest.approx(base, abs=1e-12)
    # the loss keeps its gradient to the varying units and gives the constant ones none
    padded = torch.cat([x, torch.zeros(32, 24, dtype=x.dtype)], 1).requires_grad_()
    (grad,) = torch.autograd.grad(get_metric("rsa").loss(padded, y), padded)
    assert float(grad[:, 48:].abs().max()) == 0 and float(grad[:, :48].abs().max()) > 0


# ----------------------------------------------------------------------------- gradients


def _small_pair(seed=0, n=12, p=7, q=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, dtype=torch.float64, generator=g)
    y = x[:, :3] @ torch.randn(3, q, dtype=torch.float64, generator=g)
    y = y + 0.5 * torch.randn(n, q, dtype=torch.float64, generator=g)
    return x.requires_grad_(True), y.requires_grad_(True)


@pytest.mark.parametrize(
    "fn",
    [
        lambda x, y: linear_alignment_heldout(x, y),
        lambda x, y: linear_alignment_heldout(x, y, folds=3),
        linear_cka,
        rsa,
    ],
    ids=["heldout-loo", "heldout-3fold", "cka", "rsa"],
)
def test_gradcheck_float64(fn):
    x, y = _small_pair()
    assert torch.autograd.gradcheck(fn, (x, y), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dead", [0, 2])
def test_gradcheck_float64_reference_without_gradient(dead):
    """The training step's case (a reference without gradient) has its leave-one-out gradient
    written out (``_LeaveOneOutScore``): checked against finite differences."""
    x, y = _small_pair(seed=3)
    y = y.detach().clone()
    y[:, :dead] = 0.5  # flat voxels
    assert torch.autograd.gradcheck(lambda a: linear_alignment_heldout(a, y), (x,), eps=1e-6,
                                    atol=1e-6)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_gradient_ascent_step_raises_score(name):
    """One step along the gradient of the loss form on X raises the score: the signal the
    trainable's alpha > 0 follows (and alpha < 0 the reverse)."""
    metric = get_metric(name)
    x, y = _small_pair(seed=3, n=40, p=30, q=10)
    y = y.detach()
    score = metric.loss(x, y)
    (grad,) = torch.autograd.grad(score, x)
    step = 1e-2 * x.detach().norm() / grad.norm()
    up = metric.loss(x.detach() + step * grad, y)
    down = metric.loss(x.detach() - step * grad, y)
    assert float(up) > float(score.detach()) > float(down)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_registry_entries_keep_device_dtype_and_return_floats_for_numpy(name):
    metric = get_metric(name)
    x, y = _small_pair(seed=1, n=30, p=12, q=6)
    out = metric.loss(x.float(), y.float())
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert out.device == x.device and out.requires_grad
    val = metric.validate(x.detach().numpy(), y.detach().numpy())
    assert isinstance(val, float) and -1.5 < val <= 1.0


# ----------------------------------------------------------------------------- errors


def test_error_different_n():
    with pytest.raises(ValueError, match=r"same number of stimuli.*\(20, 3\).*\(21, 3\)"):
        ridge_cv_r2(np.ones((20, 3)), np.ones((21, 3)), alphas=[1.0])


def test_error_too_few_samples_for_folds():
    x, y = linear_data(9, 3, 2, seed=0)
    with pytest.raises(ValueError, match=r"n=9 stimuli; 5-fold ridge CV needs at least 10"):
        ridge_cv_r2(x, y, alphas=[1.0], folds=5)
    with pytest.raises(ValueError, match=r"n=9.*at least 10"):
        linear_alignment_heldout(x, y, folds=5)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["X", "Y"])
def test_error_nan_inf(bad, where):
    x, y = linear_data(20, 4, 3, seed=0)
    (x if where == "X" else y)[3, 1] = bad
    with pytest.raises(ValueError, match=rf"{where} contains 1 NaN or inf values"):
        ridge_cv_r2(x, y, alphas=[1.0])
    with pytest.raises(ValueError, match=rf"{where} contains 1 NaN or inf"):
        linear_cka(x, y)
    # the loss form checks on its Grams' traces instead of a pass over the inputs: every path
    # (the training step's, k-fold, a reference with gradient) still names the bad input
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for kwargs, y_grad in (({}, False), ({"folds": 4}, False), ({}, True)):
        with pytest.raises(ValueError, match=rf"{where} contains 1 NaN or inf values"):
            linear_alignment_heldout(xt.clone().requires_grad_(), yt.clone().requires_grad_(y_grad),
                                     **kwargs)


@pytest.mark.parametrize("where", ["X", "Y"])
def test_values_whose_gram_overflows_are_named_not_a_failed_factorisation(where):
    """Finite float32 values near 1e20 (a frozen network with weights far too large) overflow
    the Gram's row sums: the loss form failed in its Cholesky ("not positive-definite"),
    naming neither input nor cause. Inputs with fewer columns than rows have their Grams built
    in float64, where such values do not overflow: they score as at any other scale."""
    x, y = (torch.from_numpy(a).float() for a in linear_data(20, 40, 30, seed=0))
    (x if where == "X" else y).mul_(1e20)
    assert torch.isfinite(x).all() and torch.isfinite(y).all()
    for kwargs in ({}, {"folds": 4}):
        with pytest.raises(ValueError, match=rf"^{where} holds values up to .*e\+2\d, whose "
                                             rf"squares summed over a row overflow float32"):
            linear_alignment_heldout(x.clone().requires_grad_(), y, **kwargs)
    x, y = (torch.from_numpy(a).float() for a in linear_data(20, 4, 3, seed=0))
    unscaled = float(linear_alignment_heldout(x, y))
    (x if where == "X" else y).mul_(1e20)
    assert float(linear_alignment_heldout(x, y)) == pytest.approx(unscaled, abs=1e-5)


def test_error_alphas():
    x, y = linear_data(20, 4, 3, seed=0)
    with pytest.raises(ValueError, match="alphas is empty"):
        ridge_cv_r2(x, y, alphas=[])
    with pytest.raises(ValueError, match=r"alphas must be positive and finite, got \[0.0, -1.0\]"):
        ridge_cv_r2(x, y, alphas=[1.0, 0.0, -1.0])
    with pytest.raises(ValueError, match=r"rel \(relative ridge penalty\).*got -0.5"):
        linear_alignment_heldout(x, y, rel=-0.5)


def test_error_folds_and_metric_name_and_degenerate_inputs():
    x, y = linear_data(20, 4, 3, seed=0)
    with pytest.raises(ValueError, match=r"folds must be an integer >= 2, got 1"):
        ridge_cv_r2(x, y, alphas=[1.0], folds=1)
    with pytest.raises(ValueError, match=r"unknown alignment metric 'pearson'; accepted: cka, linear, rsa"):
        get_metric("pearson")
    flat = x.copy()
    flat[2] = 1.0
    # a stimulus with constant features has no correlation distance: left out of both RDMs
    assert rsa(flat, y) == pytest.approx(rsa(np.delete(x, 2, 0), np.delete(y, 2, 0)), abs=1e-12)
    flat[3:] = 0.0
    with pytest.raises(ValueError, match=r"18 of 20 stimuli have constant features: RSA needs 3"):
        rsa(flat, y)
    with pytest.raises(ValueError, match="X is constant across stimuli"):
        linear_cka(np.ones((20, 4)), y)
    with pytest.raises(ValueError, match=r"X has shape \(20, 0\)"):
        ridge_cv_r2(np.ones((20, 0)), y, alphas=[1.0])


def test_flat_test_fold_column_is_constant_even_when_its_mean_rounds():
    """Ten copies of 0.41925483421092963 have a float64 mean one ulp off, so SST is 3e-32,
    not 0; the column is still flat and must score by the constant-column rule, not as
    1 - SSE / 3e-32 (about -1e29 before the rule looked at max == min)."""
    value = 0.41925483421092963
    flat = torch.full((10,), value, dtype=torch.float64)
    assert float(flat.mean()) != value  # the premise: the mean rounds
    x, y = linear_data(50, 80, 2, seed=9)
    y = np.column_stack([y, np.full(50, value)])
    y[10:, 2] += np.random.default_rng(0).standard_normal(40)  # flat only in test fold 0
    got = ridge_cv_r2(x, y, alphas=ALPHAS)
    assert -1.0 < got < 1.0
    # The one documented departure from scikit-learn, whose r2_score tests SST == 0 and so
    # scores this fold at about -5e29.
    assert sklearn_cv_r2(x, y) < -1e20


def test_gram_products_switch_to_tf32_on_cuda_only_and_restore_the_setting():
    """The TF32 switch is scoped: a CPU tensor changes nothing; a CUDA device sets TF32 for the
    block and restores the process's own setting after it (a flag, settable without a GPU)."""
    import trainable.alignment as alignment

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    with alignment._gram_products(torch.device("cpu")):
        assert matmul.fp32_precision == before
    with alignment._gram_products(torch.device("cuda")):
        assert matmul.fp32_precision == "tf32"
    assert matmul.fp32_precision == before


def test_a_fold_of_units_silent_but_for_one_image_scores_no_absurd_r2():
    """Units flat on every image but one (a collapsing suppressing trial): the four test folds
    without that image have units of one value whose float SST is ~1e-32, not 0, and the
    pooled R^2 divided by it (-6.8e31 seen in a trial). Such a fold has nothing to explain."""
    from trainable.alignment import linear_alignment_scaled

    g = torch.Generator().manual_seed(0)
    y = torch.randn(25, 30, dtype=torch.float64, generator=g)
    x = torch.full((25, 4), 1.1585, dtype=torch.float64)
    x[3] = 7.4479
    score, x_to_y, y_to_x = linear_alignment_scaled(x, y, folds=5, parts=True)
    assert -1.0 <= float(y_to_x) <= 1.0 and -1.0 <= float(score) <= 1.0
    # the four silent folds score 0; the fold holding image 3 its own (negative) R^2
    assert float(y_to_x) < 0


@pytest.mark.parametrize("score", [rsa, linear_cka], ids=["rsa", "cka"])
def test_every_stimulus_the_same_is_undefined_not_rounding_noise(score):
    """A layer whose units are all dead gives every image its bias: centring leaves ulp noise,
    which RSA scored as about -0.003 (and -1 in a trial on constant images) and CKA as 1."""
    bias = np.random.default_rng(0).standard_normal((1, 205)) * 0.05
    x = np.repeat(bias, 40, axis=0)
    y = np.random.default_rng(1).standard_normal((40, 30))
    for a, b, name in ((x, y, "X"), (y, x, "Y"), (x, 2 * x, "X")):
        with pytest.raises(ValueError, match=rf"{name} (is constant across stimuli|gives every pair of "
                                             r"stimuli the same correlation distance)"):
            score(a, b)


def test_kfold_loss_with_a_layer_silent_on_a_training_fold_is_finite():
    """Silent on the rows a fold trains on, not on the batch: the fold's penalty was 0 and the
    solve singular (LinAlgError), in the fast and the definition form alike. Any penalty
    predicts the fold's training mean there."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 6, dtype=torch.float64, generator=g)
    x[:4] = 0.0
    y = torch.randn(8, 5, dtype=torch.float64, generator=g)
    x.requires_grad_(True)
    fast = linear_alignment_heldout(x, y, folds=2)
    slow = linear_alignment_heldout_definition(x, y, folds=2)
    assert torch.isfinite(fast) and float(fast.detach()) == pytest.approx(float(slow), abs=1e-10)
    (gx,) = torch.autograd.grad(fast, x)
    assert torch.isfinite(gx).all()
    # a reference column that varies only in one test fold
    y3 = torch.zeros(9, 2, dtype=torch.float64)
    y3[0, 0] = 1.0
    x3 = torch.randn(9, 4, dtype=torch.float64, generator=g)
    assert torch.isfinite(linear_alignment_heldout(x3, y3, folds=3))


def test_definition_is_exact_for_a_nearly_flat_column_far_from_zero():
    """The tests' oracle applied R to the uncentred column: 1 + 1e-12 noise left its rounding
    in the residuals, and the definition read -1.2633 where the Gram form read -1.2643 (the
    column itself is the offset-free one quantised by float64, so both move a little)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 6, dtype=torch.float64, generator=g)
    y = torch.randn(12, 2, dtype=torch.float64, generator=g)
    noise = torch.randn(12, 1, dtype=torch.float64, generator=g)
    for offset in (0.0, 1.0, 1e3):
        shifted = torch.cat([offset + 1e-12 * noise, y], 1)
        assert float(linear_alignment_heldout_definition(x, shifted)) == pytest.approx(
            float(linear_alignment_heldout(x, shifted)), abs=1e-10)


def test_rsa_of_a_bias_row_and_of_identical_stimuli():
    """A stimulus given its bias only (a row of one nonzero value, whose centring leaves
    rounding noise) has no correlation distance either; every pair at the same distance is
    undefined, not a number."""
    from trainable.alignment import UndefinedScore

    x, y = linear_data(20, 6, 5, seed=2)
    biased = x.copy()
    biased[4] = 0.1 + 0.2  # 0.30000000000000004: its mean rounds
    assert rsa(biased, y) == pytest.approx(rsa(np.delete(x, 4, 0), np.delete(y, 4, 0)),
                                           abs=1e-12)
    with pytest.raises(UndefinedScore, match=r"X gives every pair of stimuli the same "
                                             r"correlation distance"):
        rsa(np.repeat(x[:1], 20, axis=0) + 0.0, y)


def test_kfold_loss_with_silent_training_folds_stays_bounded_over_seeds():
    """The fold's penalty was floored only at exactly 0: the rounding noise of the batch's
    centring (1e-17) passed as a penalty and gave scores of -3.6e7 and gradients of 5e19 for
    4 to 11 of 20 seeds in float64."""
    for folds, n in ((2, 20), (5, 50)):
        for seed in range(20):
            g = torch.Generator().manual_seed(seed)
            x = torch.relu(torch.randn(n, 300, dtype=torch.float64, generator=g) * 0.37
                           + 0.13 * (seed % 6))
            x[n // folds:] = 0.0
            y = torch.randn(n, 8, dtype=torch.float64, generator=g)
            x.requires_grad_(True)
            score = linear_alignment_heldout(x, y, folds=folds)
            (gx,) = torch.autograd.grad(score, x)
            assert -10 < float(score.detach()) < 1, (folds, seed, float(score.detach()))
            assert float(gx.abs().max()) < 1e3, (folds, seed)


@pytest.mark.parametrize("n, p, q", [(16, 1800, 368), (256, 1800, 368)])
def test_the_smallest_ridge_rel_accepted_still_scores_unrelated_data_as_unrelated(n, p, q):
    """Why ridge_rel has a floor (``trainable.config.RIDGE_REL_MIN``): the held-out score
    plateaus as the penalty falls, until its leave-one-out residuals cancel and unrelated
    random data read as perfectly aligned. At the floor the float32 score is the plateau's
    and the float64 definition's; far below it, 1.0."""
    from trainable.config import RIDGE_REL_MIN

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, p, generator=g), torch.randn(n, q, generator=g)
    at_floor = float(linear_alignment_heldout(x, y, rel=RIDGE_REL_MIN))
    assert at_floor < 0  # unrelated: no better than predicting the mean
    assert at_floor == pytest.approx(float(linear_alignment_heldout(x, y, rel=1e-4)), abs=0.01)
    assert at_floor == pytest.approx(float(linear_alignment_heldout_definition(
        x.double(), y.double(), rel=RIDGE_REL_MIN)), abs=1e-3)
    assert float(linear_alignment_heldout(x, y, rel=1e-12)) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("n,p,q", [(128, 16, 500), (256, 500, 8), (1000, 512, 2000)])
def test_fewer_units_than_images_score_in_float32_as_in_float64_at_the_smallest_ridge(n, p, q):
    """A layer or reference with fewer columns than the batch has rows (a pooled layer, a
    small ROI) has a rank-deficient Gram, whose empty directions hold only the product's
    rounding: built in float32 it outweighed ridge_rel = 1e-6 there (-0.61 against -0.54 at
    n = 1000, p = 512; at n = 256 a failed Cholesky). Checked in both directions, and the
    gradient, against the float64 definition."""
    from trainable.config import RIDGE_REL_MIN

    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(n, p, generator=g)) * torch.logspace(-1, 1, p)
    y = torch.randn(n, q, generator=g)
    for a, b in ((x, y), (y, x)):
        a = a.clone().requires_grad_()
        score = linear_alignment_heldout(a, b, rel=RIDGE_REL_MIN)
        (grad,) = torch.autograd.grad(score, a)
        a64 = a.detach().double().requires_grad_()
        exact = linear_alignment_heldout_definition(a64, b.double(), rel=RIDGE_REL_MIN)
        (grad64,) = torch.autograd.grad(exact, a64)
        assert float(score.detach()) == pytest.approx(float(exact.detach()), abs=1e-5)
        assert float((grad.double() - grad64).norm() / grad64.norm()) < 1e-3
