"""The Gabor oracle bank: its layout and normalisation, orientation tuning measured with
drifting gratings, the response geometry, and the PNG."""

import math

import matplotlib.image
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from references.gabor import (
    FREQUENCIES,
    NYQUIST,
    ORIENTATIONS_DEG,
    GaborReference,
    bank_index,
    bank_png,
    gabor_bank,
    gabor_kernel,
    response_size,
)
from trainable.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_shape_and_parameters():
    bank = gabor_bank()
    assert bank.shape == (108, 3, 11, 11) and bank.dtype == torch.float32
    assert ORIENTATIONS_DEG == tuple(range(0, 180, 15))
    assert len(FREQUENCIES) == 9
    assert FREQUENCIES[0] == pytest.approx(0.05) and FREQUENCIES[-1] == pytest.approx(2.0)
    # log spacing: constant ratio between neighbours
    np.testing.assert_allclose(np.diff(np.log(FREQUENCIES)), math.log(40) / 8, rtol=1e-12)


def test_zero_mean_and_unit_norm():
    bank = gabor_bank(torch.float64)
    torch.testing.assert_close(bank.mean(dim=(1, 2, 3)), torch.zeros(108, dtype=torch.float64),
                               rtol=0, atol=1e-15)
    # zero mean holds per channel too: a uniform colour patch gives no response
    assert bank.mean(dim=(2, 3)).abs().max() < 1e-15
    torch.testing.assert_close(bank.flatten(1).norm(dim=1), torch.ones(108, dtype=torch.float64),
                               rtol=0, atol=1e-12)


def test_orientation_major_order_and_same_filter_on_each_channel():
    bank = gabor_bank(torch.float64)
    for i, theta in enumerate(ORIENTATIONS_DEG):
        for j, f in enumerate(FREQUENCIES):
            row = bank_index(i, j)
            assert row == 9 * i + j
            expected = torch.from_numpy(gabor_kernel(theta, f)) / math.sqrt(3)
            for c in range(3):
                torch.testing.assert_close(bank[row, c], expected, rtol=0, atol=1e-15)
    # theta = 0 is vertical bars (varies along x, i.e. along a row), theta = 90 its transpose
    for j in range(len(FREQUENCIES)):
        torch.testing.assert_close(bank[bank_index(6, j), 0], bank[bank_index(0, j), 0].T,
                                   rtol=0, atol=1e-12)
    vertical = bank[bank_index(0, 4), 0]
    assert vertical.diff(dim=1).abs().sum() > 3 * vertical.diff(dim=0).abs().sum()
    with pytest.raises(ValueError, match=r"\(12, 0\) out of range"):
        bank_index(12, 0)


def _grating_amplitudes(kernels: torch.Tensor, angles_deg: np.ndarray,
                        frequency: float) -> torch.Tensor:
    """Peak |response| of each filter to drifting gratings: a luminance cosine (the same on the
    3 channels) of each orientation at the given frequency, 8 phases, 48 px, filtered at every
    valid position; max over phase and position. kernels (k, 3, 11, 11) -> (k, n_angles)."""
    yy, xx = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    t = torch.tensor(np.radians(angles_deg), dtype=torch.float32)
    phases = torch.arange(8) * (2 * math.pi / 8)
    arg = 2 * math.pi * frequency * (xx * torch.cos(t)[:, None, None]
                                     + yy * torch.sin(t)[:, None, None])
    frames = torch.cos(arg[:, None] + phases[None, :, None, None])  # (angles, phases, 48, 48)
    images = frames.reshape(-1, 1, 48, 48).expand(-1, 3, -1, -1)
    out = F.conv2d(images, kernels.float())  # (angles * phases, k, 38, 38)
    return out.abs().reshape(len(angles_deg), -1, len(kernels), 38 * 38).amax(dim=(1, 3)).T


@pytest.mark.parametrize("j", [j for j, f in enumerate(FREQUENCIES) if f <= NYQUIST])
def test_low_frequency_filters_peak_at_their_own_orientation(j):
    """Below Nyquist, each filter's grating response (max over phase and position) at its own
    frequency peaks at the filter's orientation among the bank's 12, lies within 7.5 deg of it
    on a 3-deg sweep, and the orthogonal grating gives less than half the peak."""
    bank = gabor_bank()
    f = FREQUENCIES[j]
    angles = np.arange(0, 180, 3)  # contains the bank's 12 orientations
    amp = _grating_amplitudes(bank[[bank_index(i, j) for i in range(12)]], angles, f)
    coarse = amp[:, angles % 15 == 0]
    assert torch.equal(coarse.argmax(dim=1), torch.arange(12)), coarse
    for i, theta in enumerate(ORIENTATIONS_DEG):
        best = angles[int(amp[i].argmax())]
        assert min(abs(best - theta), 180 - abs(best - theta)) <= 7.5, (theta, f, best)
        orthogonal = amp[i, angles == (theta + 90) % 180]
        assert orthogonal.item() < 0.5 * amp[i].max(), (theta, f)


def test_aliased_top_frequency_is_still_a_unit_filter():
    """f = 2.0 cycles/pixel aliases to DC along the pixel axes (documented): the filter is
    isotropic there, but defined, zero-mean and unit-norm, and theta = 0 and 90 coincide."""
    bank = gabor_bank(torch.float64)
    a, b = bank[bank_index(0, 8)], bank[bank_index(6, 8)]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    torch.testing.assert_close(a[0], a[0].T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("size", [64, 224])
def test_response_geometry_equals_alexnet_conv1(size):
    images = torch.randn(2, 3, size, size)
    y = GaborReference().representation(images)
    conv1 = build_model("alexnet", num_classes=2, width=0.125).eval().features(images, ("conv1",))
    assert y.shape == (2, 108, response_size(size), response_size(size))
    assert y.shape[2:] == conv1["conv1"].shape[2:]
    assert response_size(224) == 55 and response_size(64) == 15


def test_reference_is_the_fixed_convolution_without_gradient():
    ref = GaborReference()
    images = torch.randn(3, 3, 64, 64, dtype=torch.float64, requires_grad=True)
    y = ref.representation(images)
    assert not y.requires_grad and y.dtype == torch.float64 and y.device == images.device
    expected = F.conv2d(images.detach(), gabor_bank(torch.float64), stride=4, padding=2)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)
    # computed as one luminance channel (the bank's structure): in float32 the same numbers as
    # the (108, 3, 11, 11) convolution in float64, to float32 rounding
    y32 = ref.representation(images.detach().float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), expected, rtol=0, atol=1e-5)
    # the channel sum is taken by two additions: bit for bit ``sum(1)`` in float32, and
    # reduced-precision images keep ``sum(1)`` (one rounding)
    x32 = images.detach().float()
    lum = gabor_bank(torch.float32)[:, :1]
    assert torch.equal(y32, F.conv2d(x32.sum(1, keepdim=True), lum, stride=4, padding=2))
    x16 = x32.bfloat16()
    assert torch.equal(ref.representation(x16), F.conv2d(
        x16.sum(1, keepdim=True), lum.bfloat16(), stride=4, padding=2))
    # a uniform image (any colour) gives zero response away from the zero-padded border
    flat = torch.ones(1, 3, 64, 64) * torch.tensor([0.3, -1.0, 2.0]).view(1, 3, 1, 1)
    assert ref.representation(flat)[..., 1:-1, 1:-1].abs().max() < 1e-5


def test_targets_protocol():
    ref = GaborReference()
    images = torch.randn(4, 3, 64, 64)
    groups = ref.targets(images, torch.arange(10, 14))
    assert len(groups) == 1
    rows, y = groups[0]
    assert rows.dtype == torch.int64 and torch.equal(rows, torch.arange(4))
    torch.testing.assert_close(y, ref.representation(images))
    with pytest.raises(ValueError, match="image_ids has 3 entries for 4 images"):
        ref.targets(images, torch.arange(3))
    with pytest.raises(ValueError, match=r"float images \(n, 3, H, W\).*\(4, 1, 64, 64\)"):
        ref.representation(images[:, :1])


def test_reference_pickles():
    import pickle

    ref = GaborReference()
    ref.representation(torch.randn(1, 3, 64, 64))
    clone = pickle.loads(pickle.dumps(ref))
    assert torch.equal(clone.bank, ref.bank)


def test_bank_png(tmp_path):
    path = bank_png(tmp_path / "gabor_bank.png")
    img = matplotlib.image.imread(path)
    # 12 rows (orientations) x 9 columns (frequencies) of 11 px tiles, 1 px borders, x8
    assert img.shape[:2] == ((12 * 12 + 1) * 8, (9 * 12 + 1) * 8)
    assert img[..., :3].std() > 0.05
