"""The simulated world: formats, determinism, caching, and voxels with real signal and noise."""

from __future__ import annotations

import time

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.io
from PIL import Image
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score

from references import nsd, simulated
from references.cache import ENV_VAR
from references.simulated import generate_nsd_like, generate_single_label

SMALL_SINGLE = dict(image_size=32, n_categories=4, n_train_per_class=6, n_val_per_class=2)
SMALL_NSD = dict(image_size=32, n_images=80, n_subjects=2, n_categories=6,
                 trials_per_session=70)


def _png_arrays(root):
    return {p.relative_to(root).as_posix(): np.asarray(Image.open(p))
            for p in sorted(root.rglob("*.png"))}


def _nsd_arrays(sim):
    with h5py.File(sim.stimuli) as f:
        out = {"imgBrick": f["imgBrick"][:]}
    for s in sim.subjects:
        for path in nsd.session_files(sim.nsd_root, s):
            with h5py.File(path) as f:
                out[f"{s}/{path.name}"] = f["betas"][:]
    return out


def test_single_label_tree():
    root = generate_single_label(seed=0, **SMALL_SINGLE)
    for split, n in (("train", 6), ("val", 2)):
        classes = sorted(p.name for p in (root / split).iterdir())
        assert len(classes) == 4 and [c[:3] for c in classes] == ["00_", "01_", "02_", "03_"]
        for c in classes:
            files = sorted((root / split / c).glob("*.png"))
            assert len(files) == n
            img = Image.open(files[0])
            assert img.mode == "RGB" and img.size == (32, 32)


def test_same_seed_same_data_different_seed_different(tmp_path, monkeypatch):
    first_single = _png_arrays(generate_single_label(seed=3, **SMALL_SINGLE))
    first_nsd = _nsd_arrays(generate_nsd_like(seed=3, **SMALL_NSD))
    monkeypatch.setenv(ENV_VAR, str(tmp_path))  # a cold cache: everything is rebuilt
    before = dict(simulated.BUILD_COUNTS)
    again_single = _png_arrays(generate_single_label(seed=3, **SMALL_SINGLE))
    again_nsd = _nsd_arrays(generate_nsd_like(seed=3, **SMALL_NSD))
    assert simulated.BUILD_COUNTS["single_label"] == before.get("single_label", 0) + 1
    assert simulated.BUILD_COUNTS["nsd_like"] == before.get("nsd_like", 0) + 1
    for first, again in ((first_single, again_single), (first_nsd, again_nsd)):
        assert first.keys() == again.keys()
        for key in first:
            np.testing.assert_array_equal(first[key], again[key], err_msg=key)
    other = _png_arrays(generate_single_label(seed=4, **SMALL_SINGLE))
    assert not all(np.array_equal(a, b) for a, b in zip(other.values(), first_single.values()))
    other_nsd = _nsd_arrays(generate_nsd_like(seed=4, **SMALL_NSD))
    assert not np.array_equal(other_nsd["imgBrick"], first_nsd["imgBrick"])


def test_second_call_reuses_the_cache():
    root = generate_single_label(seed=5, **SMALL_SINGLE)
    sim = generate_nsd_like(seed=5, **SMALL_NSD)
    counts = dict(simulated.BUILD_COUNTS)
    mtimes = (root.stat().st_mtime_ns, sim.stimuli.stat().st_mtime_ns)
    assert generate_single_label(seed=5, **SMALL_SINGLE) == root
    again = generate_nsd_like(seed=5, **SMALL_NSD)
    assert again.nsd_root == sim.nsd_root
    assert dict(simulated.BUILD_COUNTS) == counts
    assert (root.stat().st_mtime_ns, sim.stimuli.stat().st_mtime_ns) == mtimes
    np.testing.assert_array_equal(again.noise_ceilings[1]["V1"], sim.noise_ceilings[1]["V1"])
    # Any parameter change is a different entry.
    assert generate_single_label(seed=5, **{**SMALL_SINGLE, "n_val_per_class": 3}) != root


def test_nsd_like_release_reads_with_the_nsd_loader(tmp_path):
    sim = generate_nsd_like(seed=0, **SMALL_NSD)
    assert sim.subjects == (1, 2)
    assert sim.sessions[2] == sim.sessions[1] - 1  # the later subject has fewer sessions
    design = nsd.load_expdesign(sim.nsd_root)
    assert design.subjectim.shape[0] == 8
    mat = scipy.io.loadmat(str(sim.nsd_root / nsd.EXPDESIGN))
    assert mat["masterordering"].shape[0] == 1 and mat["masterordering"].min() == 1
    out = nsd.prepare(sim.nsd_root, sim.coco_annotations, sim.subjects, "VVS",
                      tmp_path / "vvs.parquet", progress=False)
    table = pq.read_table(out)
    meta = nsd.prepared_metadata(table)
    assert meta["category_ids"] == list(simulated.COCO_CATEGORY_IDS)  # all 80, non-contiguous
    labels = np.array(table["labels"].to_pylist())
    assert labels.shape[1] == 80
    assert set(labels.sum(1)) <= {1, 2, 3} and {1, 2, 3} <= set(labels.sum(1))  # 1-3 objects
    used = [simulated.COCO_CATEGORY_IDS.index(c) for c in sim.category_ids]
    assert set(np.flatnonzero(labels.sum(0))) == set(used)
    for s in sim.subjects:
        assert meta["n_voxels"][s] == sim.noise_ceilings[s]["VVS"].size
    repeats = np.array(table["n_repeats"].to_pylist())
    subject = np.array(table["subject"].to_pylist())
    assert np.all(repeats[subject == 1] == 3)
    assert np.any(repeats[subject == 2] < 3)  # its missing session dropped some repeats


def test_demo_size_generation_and_noise_ceilings():
    """Demo-size generation stays well under a minute; measured noise ceilings lie between 0 and
    1 and track the simulated ones (so both signal and noise are real)."""
    start = time.perf_counter()
    sim = generate_nsd_like(seed=0)
    single = generate_single_label(seed=0)
    elapsed = time.perf_counter() - start
    assert elapsed < 60, f"demo-size generation took {elapsed:.1f} s"
    assert sum(1 for _ in single.rglob("*.png")) == 1250
    for s in sim.subjects:
        for roi in ("V1", "VVS"):
            nc, true = sim.noise_ceilings[s][roi], sim.true_noise_ceilings[s][roi]
            assert 100 <= nc.size <= 1000
            assert np.all((nc >= 0) & (nc < 1))
            assert 0.2 < nc.mean() < 0.9
            assert np.corrcoef(nc, true)[0, 1] > 0.9


def _heldout_r2(x: np.ndarray, y: np.ndarray) -> float:
    """R^2 (mean over voxels) of a ridge fit on the first 80% of images, scored on the rest."""
    x = (x - x.mean(0)) / (x.std(0) + 1e-9)
    n = int(0.8 * len(x))
    return r2_score(y[n:], Ridge(alpha=100.0).fit(x[:n], y[:n]).predict(x[n:]))


def test_voxels_carry_their_roi_signal():
    """V1-like responses follow Gabor energy and not categories; VVS-like ones follow
    categories and much less Gabor energy: the dissociation the references rely on."""
    sim = generate_nsd_like(seed=0)
    r2 = {}
    for roi in ("V1", "VVS"):
        table = pq.read_table(nsd.prepare_cached(sim.nsd_root, sim.coco_annotations, [1], roi,
                                                 progress=False))
        y = np.array(table["response"].to_pylist())
        labels = np.array(table["labels"].to_pylist(), float)
        r2[roi, "labels"] = _heldout_r2(labels, y)
        n = 300  # enough images for a clear answer at a fraction of the cost
        with h5py.File(sim.stimuli) as f:
            images = f["imgBrick"][:][np.array(table["nsd_id"].to_pylist())[:n]]
        energy = simulated._gabor_energy(images, pool=4).reshape(n, -1)
        r2[roi, "gabor"] = _heldout_r2(energy, y[:n])
    assert r2["V1", "gabor"] > 0.25, r2
    assert r2["V1", "labels"] < 0.05, r2
    assert r2["VVS", "labels"] > 0.15, r2
    assert r2["VVS", "gabor"] < r2["V1", "gabor"] - 0.2, r2


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_categories=81), r"n_categories=81; accepted: an integer in 2\.\.80"),
    (dict(n_subjects=9), r"n_subjects=9; accepted: an integer in 1\.\.8"),
    (dict(repeats=1), r"repeats=1; accepted: an integer in 2\.\.10"),
    (dict(image_size=8), r"image_size=8; accepted: an integer in 16\.\.1024"),
])
def test_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_nsd_like(**{**SMALL_NSD, **kwargs})
