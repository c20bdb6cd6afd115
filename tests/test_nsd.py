"""The NSD loader against a tiny tree written here in the release's native layout, with known
betas, so the expected table is computed independently (explicit loops, no loader code)."""

from __future__ import annotations

import contextlib
import csv
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.io

from references import nsd
from references.nsd import (
    NSDFormatError,
    check_release,
    noise_ceiling,
    prepare,
    subjects_in_release,
)

REPO = Path(__file__).resolve().parents[1]

# Subject 1: sessions of 7 and 5 trials (the last may be shorter); subject 2: a single session
# of 8 trials. masterordering has 20 trials, so trials 13..20 (subject 1) and 9..20 (subject 2)
# are ignored.
TRIALS = {1: [7, 5], 2: [8]}
# Volumes (x, y, z), different per subject and never symmetric.
VOLUME = {1: (4, 3, 2), 2: (3, 5, 2)}
N_IMAGES = 12
# 1-based positions into a subject's image list (6 images each).
MASTERORDERING = np.array([1, 2, 3, 1, 4, 2, 5, 1, 3, 2, 6, 4, 5, 6, 3, 5, 6, 4, 6, 5])
SUBJECTIM = np.array([[4, 1, 8, 6, 10, 2],  # 1-based nsdIds
                      [4, 1, 3, 5, 9, 7],
                      *[[1, 2, 3, 4, 5, 6]] * 6])
# 80 category ids, not contiguous, listed out of order in the JSON.
CATEGORY_IDS = sorted(
    np.random.default_rng(7).choice(np.arange(1, 200), 80, replace=False).tolist())


def _mask_volumes(subject: int) -> tuple[np.ndarray, np.ndarray]:
    """prf-visualrois and streams label volumes (x, y, z)."""
    shape = VOLUME[subject]
    rng = np.random.default_rng(100 + subject)
    prf = rng.choice([-1, 0, 1, 2, 3], size=shape).astype(np.int16)
    prf[0, 0, 0], prf[-1, -1, -1] = 1, 2  # at least one V1 voxel in each corner
    streams = rng.choice([0, 1, 5, 6], size=shape).astype(np.int16)
    streams[0, -1, 0] = 5
    return prf, streams


def _betas(subject: int, session: int, n_trials: int) -> np.ndarray:
    """Known betas (trials, z, y, x) int16: random, with per-voxel offsets and scales."""
    x, y, z = VOLUME[subject]
    rng = np.random.default_rng(1000 * subject + session)
    base = rng.normal(0, 1, (n_trials, z, y, x)) * rng.uniform(0.5, 3, (z, y, x)) \
        + rng.normal(0, 5, (z, y, x))
    return np.rint(base * 300).astype(np.int16)


def write_tree(root: Path, *, skip=()) -> tuple[Path, Path]:
    """A miniature release under root/nsd and COCO files under root/coco. ``skip`` names parts
    to leave out or break (for the error tests)."""
    nsd_root, coco = root / "nsd", root / "coco"
    exp = nsd_root / "nsddata/experiments/nsd"
    exp.mkdir(parents=True)
    design = {"masterordering": MASTERORDERING[None].astype(np.float64),
              "subjectim": SUBJECTIM.astype(np.float64),
              "sharedix": np.array([[4, 1]], np.float64)}
    if "zero_based" in skip:
        design["masterordering"] = design["masterordering"] - 1
    if "no_subjectim" in skip:
        del design["subjectim"]
    if "expdesign" not in skip:
        scipy.io.savemat(str(exp / "nsd_expdesign.mat"), design)

    rng = np.random.default_rng(3)
    coco_ids = rng.choice(np.arange(1, 10**6), N_IMAGES, replace=False)
    splits = ["train2017" if i % 3 else "val2017" for i in range(N_IMAGES)]
    with open(exp / "nsd_stim_info_merged.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        cols = ["", "cocoId", "cocoSplit", "cropBox", "nsdId", "shared1000"]
        if "csv_column" in skip:
            cols[2] = "split"
        w.writerow(cols)
        for i in range(N_IMAGES):
            w.writerow([i, int(coco_ids[i]), splits[i], "(0, 0, 0, 0)", i, i in (0, 3)])

    stim = nsd_root / "nsddata_stimuli/stimuli/nsd"
    stim.mkdir(parents=True)
    # Drawn whatever the break, so the rest of the tree stays the same.
    img_brick = rng.integers(0, 256, (N_IMAGES, 10, 10, 3), dtype=np.uint8)
    img_brick = {"stim_ndim": img_brick[..., 0],  # grayscale (images, H, W)
                 "stim_rgba": np.concatenate([img_brick, img_brick[..., :1]], axis=3),
                 "stim_float": img_brick.astype(np.float32),
                 "stim_few": img_brick[:9],  # subjectim uses nsdIds up to 10 (1-based)
                 "stim_exact": img_brick[:10],
                 }.get(next((k for k in skip if k.startswith("stim_")), None), img_brick)
    if "stim_missing" not in skip:
        with h5py.File(stim / "nsd_stimuli.hdf5", "w") as f:
            f["imgBrick"] = img_brick

    for subject, trials in TRIALS.items():
        roi_dir = nsd_root / f"nsddata/ppdata/subj{subject:02d}/func1pt8mm/roi"
        roi_dir.mkdir(parents=True)
        prf, streams = _mask_volumes(subject)
        if "roi_empty" in skip and subject == 1:
            prf = np.where(np.isin(prf, (1, 2)), 3, prf).astype(np.int16)  # no V1 label left
        if "roi_4d" in skip and subject == 1:
            prf = np.stack([prf, prf], axis=3)
        if not ("roi" in skip and subject == 1):
            nib.save(nib.Nifti1Image(prf, np.eye(4)), str(roi_dir / "prf-visualrois.nii.gz"))
        nib.save(nib.Nifti1Image(streams, np.eye(4)), str(roi_dir / "streams.nii.gz"))
        bdir = (nsd_root / f"nsddata_betas/ppdata/subj{subject:02d}/func1pt8mm"
                / "betas_fithrf_GLMdenoise_RR")
        bdir.mkdir(parents=True)
        for session, n in enumerate(trials, start=1):
            if "gap" in skip and subject == 1 and session == 1:
                continue
            if "no_betas" in skip or ("no_betas_2" in skip and subject == 2):
                continue
            betas = _betas(subject, session, n)
            if "xyz_order" in skip and subject == 1:
                betas = betas.transpose(0, 3, 2, 1)  # (trials, x, y, z): the NIfTI order
            if "too_many_trials" in skip and subject == 2:
                betas = np.concatenate([betas] * 3)
            name = "data" if "dataset_name" in skip and subject == 2 else "betas"
            with h5py.File(bdir / f"betas_session{session:02d}.hdf5", "w") as f:
                f[name] = betas
        (bdir / "R2_session01.nii.gz").write_bytes(b"")  # other files in the folder: ignored

    coco.mkdir()
    cats = [{"id": c, "name": f"cat{c}", "supercategory": "x"} for c in CATEGORY_IDS]
    rng.shuffle(cats)
    if "categories" in skip:
        cats = cats[:79]
    ann_rng = np.random.default_rng(11)
    for split in ("train2017", "val2017"):
        images, anns = [], []
        for i in range(N_IMAGES):
            if splits[i] != split:
                continue
            images.append({"id": int(coco_ids[i]), "file_name": "x.jpg", "height": 10,
                           "width": 10})
            for c in ann_rng.choice(CATEGORY_IDS, ann_rng.integers(1, 4)):
                anns.append({"id": len(anns) + 1, "image_id": int(coco_ids[i]),
                             "category_id": int(c), "iscrowd": 0})
        if not ("coco_val" in skip and split == "val2017"):
            (coco / f"instances_{split}.json").write_text(json.dumps(
                {"images": images, "annotations": anns, "categories": cats}))
    return nsd_root, coco


def expected_rows(nsd_root: Path, coco: Path, subject: int, roi: str) -> dict[int, dict]:
    """The table ``prepare`` must write, computed with explicit loops."""
    label_set = {"V1": (1, 2), "VVS": (5,)}[roi]
    prf, streams = _mask_volumes(subject)
    mask = np.isin(prf if roi == "V1" else streams, label_set)
    voxels = [(x, y, z) for x in range(mask.shape[0]) for y in range(mask.shape[1])
              for z in range(mask.shape[2]) if mask[x, y, z]]  # C order of (x, y, z)
    per_image: dict[int, list[np.ndarray]] = {}
    trial = 0
    for session, n in enumerate(TRIALS[subject], start=1):
        betas = _betas(subject, session, n).astype(np.float64) / 300
        cols = np.stack([betas[:, z, y, x] for x, y, z in voxels], axis=1)
        z_scored = (cols - cols.mean(0)) / cols.std(0)
        for t in range(n):
            nsd_id = SUBJECTIM[subject - 1][MASTERORDERING[trial] - 1] - 1
            per_image.setdefault(nsd_id, []).append(z_scored[t])
            trial += 1
    coco_labels: dict[int, set[int]] = {}
    for split in ("train2017", "val2017"):
        data = json.loads((coco / f"instances_{split}.json").read_text())
        for a in data["annotations"]:
            coco_labels.setdefault(a["image_id"], set()).add(a["category_id"])
    with open(nsd_root / "nsddata/experiments/nsd/nsd_stim_info_merged.csv") as fh:
        coco_of = {int(r["nsdId"]): int(r["cocoId"]) for r in csv.DictReader(fh)}
    out = {}
    for nsd_id, reps in per_image.items():
        present = coco_labels.get(coco_of[nsd_id], set())
        out[nsd_id] = {"coco_id": coco_of[nsd_id], "n_repeats": len(reps),
                       "response": np.mean(reps, axis=0),
                       "labels": [int(c in present) for c in sorted(CATEGORY_IDS)]}
    return out


@pytest.fixture()
def tree(tmp_path):
    return write_tree(tmp_path)


@pytest.mark.parametrize("roi", ["V1", "VVS"])
def test_prepare_matches_independent_computation(tree, tmp_path, roi):
    nsd_root, coco = tree
    out = prepare(nsd_root, coco, [2, 1], roi, tmp_path / "out.parquet", progress=False)
    table = pq.read_table(out)
    assert table.schema.field("subject").type == pa.int32()
    assert table.schema.field("nsd_id").type == pa.int64()
    assert table.schema.field("coco_id").type == pa.int64()
    assert table.schema.field("response").type == pa.list_(pa.float32())
    assert table.schema.field("labels").type == pa.list_(pa.uint8())
    meta = nsd.prepared_metadata(table)
    assert meta["roi"] == roi and meta["subjects"] == [1, 2]
    assert meta["category_ids"] == sorted(CATEGORY_IDS)
    rows = table.to_pylist()
    assert [(r["subject"], r["nsd_id"]) for r in rows] == sorted(
        (r["subject"], r["nsd_id"]) for r in rows)
    for subject in (1, 2):
        want = expected_rows(nsd_root, coco, subject, roi)
        got = {r["nsd_id"]: r for r in rows if r["subject"] == subject}
        assert sorted(got) == sorted(want)
        assert meta["n_voxels"][subject] == len(next(iter(want.values()))["response"])
        for nsd_id, w in want.items():
            g = got[nsd_id]
            assert g["coco_id"] == w["coco_id"]
            assert g["n_repeats"] == w["n_repeats"]
            assert g["labels"] == w["labels"]
            # float32 storage of float64 z-scores
            np.testing.assert_allclose(g["response"], w["response"], rtol=1e-6, atol=1e-6)


def test_prepare_covers_the_cases_the_tree_was_built_for(tree, tmp_path):
    """Guards the fixture itself: repeats are averaged, an image appears only via trials past the
    sessions on disk (and is skipped), and labels use non-contiguous ids."""
    nsd_root, coco = tree
    table = pq.read_table(prepare(nsd_root, coco, [1, 2], "V1", tmp_path / "o.parquet",
                                  progress=False)).to_pylist()
    assert max(r["n_repeats"] for r in table) >= 2
    assert min(r["n_repeats"] for r in table) == 1
    subj2 = {r["nsd_id"] for r in table if r["subject"] == 2}
    in_list = set(SUBJECTIM[1] - 1)
    assert subj2 < in_list  # nsdId 6 (position 6) is only shown after trial 8
    assert 6 not in subj2
    assert CATEGORY_IDS != list(range(CATEGORY_IDS[0], CATEGORY_IDS[0] + 80))


def test_prepare_subset_of_subjects_and_cli(tree, tmp_path):
    nsd_root, coco = tree
    out = tmp_path / "cli.parquet"
    proc = subprocess.run(
        [sys.executable, "-m", "references.nsd", "prepare", "--nsd-root", str(nsd_root),
         "--coco-annotations", str(coco), "--subject", "2", "--roi", "VVS", "--out", str(out),
         "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    table = pq.read_table(out)
    assert set(table["subject"].to_pylist()) == {2}


@pytest.mark.parametrize("broken, match", [
    ("expdesign", r"missing file .*nsd_expdesign\.mat"),
    ("no_subjectim", r"nsd_expdesign\.mat: no variable 'subjectim'"),
    ("zero_based", r"masterordering.* 1-based"),
    ("csv_column", r"nsd_stim_info_merged\.csv: missing column\(s\) cocoSplit"),
    ("gap", r"missing file .*subj01.*betas_session01\.hdf5"),
    ("dataset_name", r"subj02.*betas_session01\.hdf5: no dataset 'betas' \(found: data\)"),
    ("xyz_order", r"betas_session01\.hdf5: betas shape \(7, 4, 3, 2\) does not match ROI mask "
                  r".*prf-visualrois\.nii\.gz"),
    ("roi", r"missing file .*subj01.*prf-visualrois\.nii\.gz"),
    ("too_many_trials", r"subj02.*betas_session01\.hdf5: .*24 trials but 'masterordering' has "
                        r"only 20"),
    ("coco_val", r"missing file .*instances_val2017\.json"),
    ("categories", r"instances_\w+2017\.json: 79 categories, expected 80"),
])
def test_malformed_tree_names_the_file(tmp_path, broken, match):
    nsd_root, coco = write_tree(tmp_path, skip={broken})
    with pytest.raises(NSDFormatError, match=match):
        prepare(nsd_root, coco, [1, 2], "V1", tmp_path / "o.parquet", progress=False)
    assert not (tmp_path / "o.parquet").exists()


def test_bad_arguments(tree, tmp_path):
    nsd_root, coco = tree
    with pytest.raises(NSDFormatError, match=r"unknown ROI 'V4'; accepted: V1, VVS"):
        prepare(nsd_root, coco, [1], "V4", tmp_path / "o.parquet")
    with pytest.raises(NSDFormatError, match=r"subject 9 not in 'subjectim' \(rows 1\.\.8\)"):
        prepare(nsd_root, coco, [9], "V1", tmp_path / "o.parquet")
    with pytest.raises(NSDFormatError, match=r"missing directory .*subj03.*\(no betas for "
                                             r"subject 3\)"):
        prepare(nsd_root, coco, [3], "V1", tmp_path / "o.parquet")


def test_cli_error_is_one_line_exit_2(tmp_path):
    nsd_root, coco = write_tree(tmp_path, skip={"gap"})
    proc = subprocess.run(
        [sys.executable, "-m", "references.nsd", "prepare", "--nsd-root", str(nsd_root),
         "--coco-annotations", str(coco), "--subject", "1", "--roi", "V1",
         "--out", str(tmp_path / "o.parquet")], cwd=REPO, capture_output=True, text=True,
        timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: missing file ") and "betas_session01.hdf5" in lines[0]


def test_zscore_within_session_removes_session_scale():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4))
    z = nsd.zscore_session(7.0 * x + 3.0)
    np.testing.assert_allclose(z, (x - x.mean(0)) / x.std(0), atol=1e-12)
    assert np.all(nsd.zscore_session(np.ones((5, 2))) == 0)  # constant voxel: 0, not NaN


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noise_ceiling_known_answer(seed):
    """Signal std s and unit noise: after z-scoring, NC = s^2 / (s^2 + 1/3) for 3-trial means."""
    rng = np.random.default_rng(seed)
    levels = np.array([0.0, 0.3, 0.7, 1.5])
    s = np.repeat(levels, 25)  # 25 voxels per level: the check is on the level's mean
    n_img, reps = 6000, 3
    signal = rng.normal(size=(n_img, s.size)) * s
    image = np.repeat(np.arange(n_img), reps)
    trials = signal[image] + rng.normal(size=(image.size, s.size))
    z = nsd.zscore_session(trials)
    nc = noise_ceiling(z, image, n_average=reps)
    assert np.all((nc >= 0) & (nc < 1))
    # Tolerance: the noise-variance estimate has SE sqrt(2 / 12000) ~ 0.013 per voxel, and
    # clipping 1 - sigma_n^2 at 0 biases the s = 0 level upwards by ~0.015.
    np.testing.assert_allclose(nc.reshape(4, 25).mean(1), levels**2 / (levels**2 + 1 / reps),
                               atol=0.025)
    # Images with a single trial carry no noise information and must not change the estimate.
    nc_extra = noise_ceiling(np.concatenate([z, rng.normal(size=(200, s.size)) * 5]),
                             np.concatenate([image, n_img + np.arange(200)]), n_average=reps)
    np.testing.assert_allclose(nc_extra, nc, atol=1e-12)
    with pytest.raises(ValueError, match=">= 2 trials"):
        noise_ceiling(z[:5], np.arange(5), n_average=3)


# --------------------------------------------------------------------------------------------
# subjects_in_release, check_release


def _one_line(exc: pytest.ExceptionInfo) -> None:
    assert "\n" not in str(exc.value), str(exc.value)


def test_subjects_in_release_needs_betas_and_a_subjectim_row(tmp_path):
    nsd_root, _ = write_tree(tmp_path)
    assert subjects_in_release(nsd_root) == (1, 2)
    # subj03: a folder with no session file; subj09: betas but no row in subjectim (8).
    nsd.betas_dir(nsd_root, 3).mkdir(parents=True)
    (nsd.betas_dir(nsd_root, 3) / "meanbeta_session01.nii.gz").write_bytes(b"")
    nsd.betas_dir(nsd_root, 9).mkdir(parents=True)
    nsd.session_file(nsd_root, 9, 1).write_bytes(b"")
    assert subjects_in_release(nsd_root) == (1, 2)


def test_subjects_in_release_subset(tmp_path):
    # Subject 2 keeps its (empty of sessions) betas folder and a non-session file in it.
    nsd_root, _ = write_tree(tmp_path, skip={"no_betas_2"})
    assert nsd.betas_dir(nsd_root, 2).is_dir()
    assert subjects_in_release(nsd_root) == (1,)


def test_subjects_in_release_none_present(tmp_path):
    nsd_root, _ = write_tree(tmp_path, skip={"no_betas"})
    with pytest.raises(NSDFormatError, match=r"nsddata_betas/ppdata: no subject has betas; "
                                             r"expected e\.g\. .*subj01.*betas_session01\.hdf5 "
                                             r"for a subject in 1\.\.8") as exc:
        subjects_in_release(nsd_root)
    _one_line(exc)
    with pytest.raises(NSDFormatError, match=r"missing directory .*nowhere"):
        subjects_in_release(tmp_path / "nowhere")


def test_prepare_without_subjects_takes_those_in_the_release(tmp_path):
    nsd_root, coco = write_tree(tmp_path, skip={"no_betas_2"})
    out = prepare(nsd_root, coco, None, "V1", tmp_path / "all.parquet", progress=False)
    assert nsd.prepared_metadata(pq.read_schema(out))["subjects"] == [1]
    assert pq.read_table(out).equals(pq.read_table(
        prepare(nsd_root, coco, [1], "V1", tmp_path / "one.parquet", progress=False)))
    # Resolved before keying the cache, so both calls share one entry.
    assert nsd.prepare_cached(nsd_root, coco, None, "V1", progress=False) == \
        nsd.prepare_cached(nsd_root, coco, [1], "V1", progress=False)


@pytest.mark.parametrize("broken", ["", "stim_exact"])
def test_check_release_passes_on_a_good_tree(tmp_path, broken):
    """"stim_exact": imgBrick holds exactly as many images as the largest nsdId (10)."""
    nsd_root, _ = write_tree(tmp_path, skip={broken})
    # it returns the images each subject's sessions show, in trial order (what a prepared
    # table holds, so a dry run can size the splits): the design's, for the trials on disk
    expected = {s: SUBJECTIM[s - 1][MASTERORDERING[:sum(TRIALS[s])] - 1] - 1 for s in TRIALS}
    for seen in (check_release(nsd_root, [1, 2], ["V1", "VVS"]),
                 check_release(nsd_root, None, "VVS")):
        assert sorted(seen) == [1, 2]
        for s in TRIALS:
            np.testing.assert_array_equal(seen[s], expected[s])


def test_check_release_accepts_a_subset_copy(tmp_path):
    nsd_root, _ = write_tree(tmp_path, skip={"no_betas_2"})
    check_release(nsd_root, [1], ["V1"])
    check_release(nsd_root, None, ["V1"])


def test_check_release_agrees_with_the_simulated_release():
    """generate_nsd_like writes the release layout too (subjects 4..8 have subjectim rows but no
    betas): the two writers and the check must agree."""
    from references.simulated import generate_nsd_like

    sim = generate_nsd_like(image_size=16, n_images=20, n_subjects=3, n_categories=4,
                            trials_per_session=10)
    assert subjects_in_release(sim.nsd_root) == sim.subjects == (1, 2, 3)
    check_release(sim.nsd_root, None, ["V1", "VVS"])


def test_check_release_reads_headers_only(tmp_path):
    """Betas and images whose data cannot be read (external storage to a missing file) but whose
    headers are right pass: the check never touches the data."""
    nsd_root, _ = write_tree(tmp_path)
    paths = [(nsd_root / nsd.STIMULI, "imgBrick")] + [
        (nsd.session_file(nsd_root, s, k), "betas")
        for s, trials in TRIALS.items() for k in range(1, len(trials) + 1)]
    for path, name in paths:
        with h5py.File(path, "r") as f:
            shape, dtype = f[name].shape, f[name].dtype
        path.unlink()
        with h5py.File(path, "w") as f:
            f.create_dataset(name, shape=shape, dtype=dtype,
                             external=[("nowhere.bin", 0, h5py.h5f.UNLIMITED)])
    with h5py.File(paths[-1][0], "r") as f, pytest.raises(OSError):
        f["betas"][0]  # the data really is unreadable
    check_release(nsd_root, [1, 2], ["V1", "VVS"])


BROKEN_RELEASES = [
    ("stim_ndim", [1, 2], r"nsd_stimuli\.hdf5: 'imgBrick' must be \(images, H, W, 3\) uint8, "
                          r"got shape \(12, 10, 10\) uint8"),
    ("stim_rgba", [1, 2], r"nsd_stimuli\.hdf5: 'imgBrick' must be .* got shape "
                          r"\(12, 10, 10, 4\) uint8"),
    ("stim_float", [1, 2], r"nsd_stimuli\.hdf5: 'imgBrick' must be .* got shape "
                           r"\(12, 10, 10, 3\) float32"),
    ("stim_few", [1, 2], r"nsd_stimuli\.hdf5: 'imgBrick' holds 9 images but 'subjectim' in "
                         r".*nsd_expdesign\.mat uses nsdIds up to 10 \(1-based\); expected at "
                         r"least 10 images"),
    ("stim_missing", [1, 2], r"missing file .*nsd_stimuli\.hdf5"),
    ("expdesign", [1, 2], r"missing file .*nsd_expdesign\.mat"),
    ("csv_column", [1, 2], r"nsd_stim_info_merged\.csv: missing column\(s\) cocoSplit"),
    ("xyz_order", [1, 2], r"subj01.*betas_session01\.hdf5: betas shape \(7, 4, 3, 2\) does not "
                          r"match ROI mask .*streams\.nii\.gz of shape \(x, y, z\) = "
                          r"\(4, 3, 2\); expected \(trials, z, y, x\) = \(trials, 2, 3, 4\)"),
    ("dataset_name", [1, 2], r"subj02.*betas_session01\.hdf5: no dataset 'betas'"),
    ("too_many_trials", [1, 2], r"subj02.*betas_session01\.hdf5: .*24 trials but "
                                r"'masterordering' has only 20"),
    ("roi_4d", [1, 2], r"subj01.*prf-visualrois\.nii\.gz: ROI mask must be a 3-D \(x, y, z\) "
                       r"volume, got shape \(4, 3, 2, 2\)"),
    ("roi_empty", [1, 2], r"subj01.*prf-visualrois\.nii\.gz: no voxel carries the V1 "
                          r"label\(s\) \[1, 2\]"),
    ("no_betas_2", [1, 2], r"subj02.*betas_fithrf_GLMdenoise_RR: no betas_sessionSS\.hdf5 \(or \.nii\.gz / \.nii\) for "
                           r"subject 2; subjects present: 1$"),
    ("", [1, 3], r"subj03.*betas_fithrf_GLMdenoise_RR: no betas_sessionSS\.hdf5 \(or \.nii\.gz / \.nii\) for subject 3; "
                 r"subjects present: 1, 2$"),
    # (its betas on disk or not: there is no image list for it; the message said "no betas"
    # of a subject whose betas it named)
    ("", [9], r"^subject 9 not in 'subjectim' of .*nsd_expdesign\.mat \(rows 1\.\.8\); "
              r"subjects present: 1, 2$"),
]


@pytest.mark.parametrize("broken, subjects, match", BROKEN_RELEASES,
                         ids=[b or f"absent_subject_{s[-1]}" for b, s, _ in BROKEN_RELEASES])
def test_check_release_names_the_file(tmp_path, broken, subjects, match):
    nsd_root, _ = write_tree(tmp_path, skip={broken})
    with pytest.raises(NSDFormatError, match=match) as exc:
        check_release(nsd_root, subjects, ["VVS", "V1"])
    _one_line(exc)


# --------------------------------------------------------------------------------------------
# Files as a lab's copy may hold them: ncsnr, uncompressed NIfTI, session names, stim info rows


def _write_ncsnr(nsd_root: Path, subject: int, *, suffix: str = ".nii.gz",
                 shape: tuple[int, ...] | None = None) -> np.ndarray:
    """The release's ncsnr volume (x, y, z) float32 beside the subject's betas, NaN at one
    voxel (outside the brain); returns it."""
    vol = np.random.default_rng(500 + subject).uniform(0, 1.5, shape or VOLUME[subject])
    vol = vol.astype(np.float32)
    vol[0, 1, 0] = np.nan
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(nsd.betas_dir(nsd_root, subject)
                                                  / f"ncsnr{suffix}"))
    return vol


def _uncompress(path: Path) -> Path:
    """Store the NIfTI file NAME.nii.gz as NAME.nii (the same bytes, uncompressed) instead."""
    plain = path.with_suffix("")
    plain.write_bytes(gzip.decompress(path.read_bytes()))
    path.unlink()
    return plain


def _unreadable_betas(nsd_root: Path) -> None:
    """Every session file keeps its header but its data points to a missing external file, so
    streaming any session fails (as in test_check_release_reads_headers_only)."""
    for s, trials in TRIALS.items():
        for k in range(1, len(trials) + 1):
            path = nsd.session_file(nsd_root, s, k)
            with h5py.File(path, "r") as f:
                shape, dtype = f["betas"].shape, f["betas"].dtype
            path.unlink()
            with h5py.File(path, "w") as f:
                f.create_dataset("betas", shape=shape, dtype=dtype,
                                 external=[("nowhere.bin", 0, h5py.h5f.UNLIMITED)])


def _bad_ncsnr(nsd_root: Path, how: str) -> None:
    path = nsd.betas_dir(nsd_root, 1) / "ncsnr.nii.gz"
    if how == "shape":
        _write_ncsnr(nsd_root, 1, shape=VOLUME[2])
        return
    _write_ncsnr(nsd_root, 1)
    data = path.read_bytes()
    path.write_bytes({"garbage": b"not a NIfTI volume " * 20, "empty": b"",
                      "truncated": data[:len(data) // 2]}[how])


BAD_NCSNR = [
    ("garbage", r"cannot read as NIfTI \(.*not a gzip file.*\); expected the release's ncsnr "
                r"volume \(x, y, z\) = \(4, 3, 2\)"),
    ("empty", r"cannot read as NIfTI \(.*[Ee]mpty file"),
    ("truncated", r"cannot read as NIfTI \("),
    ("shape", r"ncsnr volume of shape \(3, 5, 2\) does not match the ROI mask's \(x, y, z\) = "
              r"\(4, 3, 2\)"),
]


@pytest.mark.parametrize("how, match", BAD_NCSNR, ids=[h for h, _ in BAD_NCSNR])
def test_check_release_refuses_a_bad_ncsnr(tmp_path, how, match):
    """The dry run reads each subject's ncsnr (as small as a mask), so a bad one fails before any
    MLflow run exists, not after every session was streamed."""
    nsd_root, _ = write_tree(tmp_path)
    _write_ncsnr(nsd_root, 2)
    check_release(nsd_root, [1, 2], ["V1"])
    _bad_ncsnr(nsd_root, how)
    with pytest.raises(NSDFormatError, match=r"subj01.*ncsnr\.nii\.gz: " + match) as exc:
        check_release(nsd_root, [1, 2], ["V1", "VVS"])
    _one_line(exc)
    check_release(nsd_root, [2], ["V1"])  # subject 2's own ncsnr is fine


def test_prepare_reads_ncsnr_before_streaming(tmp_path):
    """Streaming would fail on the betas' data; the bad ncsnr must be found first."""
    nsd_root, coco = write_tree(tmp_path)
    _bad_ncsnr(nsd_root, "garbage")
    _unreadable_betas(nsd_root)
    with pytest.raises(NSDFormatError, match=r"subj01.*ncsnr\.nii\.gz: cannot read as NIfTI"):
        prepare(nsd_root, coco, [1, 2], "V1", tmp_path / "o.parquet", progress=False)


def _edit_stim_info(nsd_root: Path, edit) -> None:
    """Rewrite nsd_stim_info_merged.csv: ``edit`` gets its rows (lists, the header first) and
    returns rows, a str being written as a raw line."""
    path = nsd_root / nsd.STIM_INFO
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    with open(path, "w", newline="") as fh:
        for row in edit(rows):
            if isinstance(row, str):
                fh.write(row + "\n")
            else:
                csv.writer(fh).writerow(row)


def _set(rows: list, line: int, column: str, value: str) -> list:
    rows[line - 1][rows[0].index(column)] = value
    return rows


BAD_STIM_INFO = {  # the header is line 1, nsdId i on line i + 2 (12 images: lines 2..13)
    "truncated_last_line": (lambda r: r + ["12"],
                            r"line 14 has 1 field\(s\), expected 6 as in its header"),
    "columns_missing": (lambda r: r[:-1] + [f"11,{r[-1][1]}"],
                        r"line 13 has 2 field\(s\), expected 6 as in its header"),
    "extra_field": (lambda r: r[:4] + [r[4] + ["x"]] + r[5:],
                    r"line 5 has 7 field\(s\), expected 6 as in its header"),
    "not_integer": (lambda r: _set(r, 4, "cocoId", "abc"),
                    r"line 4: cocoId 'abc' is not an integer; expected an integer"),
    "infinite": (lambda r: _set(r, 4, "cocoId", "inf"), r"line 4: cocoId 'inf' is not an "
                                                          r"integer"),
    "fractional": (lambda r: _set(r, 5, "nsdId", "3.5"), r"line 5: nsdId '3\.5' is not an "
                                                           r"integer"),
    "duplicate": (lambda r: _set(r, 6, "nsdId", "2"), r"line 6: nsdId 2 already on line 4; "
                                                        r"expected each once"),
    "negative": (lambda r: _set(r, 3, "nsdId", "-1"), r"line 3: nsdId -1; expected a 0-based "
                                                        r"index"),
    "not_utf8": (None, r"cannot read as CSV \("),  # a byte \xff in a cropBox
}


@pytest.mark.parametrize("broken", sorted(BAD_STIM_INFO))
def test_malformed_stim_info_row_names_the_line(tmp_path, broken):
    nsd_root, coco = write_tree(tmp_path)
    edit, match = BAD_STIM_INFO[broken]
    if edit is None:
        path = nsd_root / nsd.STIM_INFO
        path.write_bytes(path.read_bytes().replace(b"(0, 0, 0, 0)", b"(0, 0, 0, \xff)", 1))
    else:
        _edit_stim_info(nsd_root, edit)
    match = r"nsd_stim_info_merged\.csv: " + match
    with pytest.raises(NSDFormatError, match=match) as exc:
        check_release(nsd_root, [1, 2], ["V1"])  # the dry run reads the whole file
    _one_line(exc)
    with pytest.raises(NSDFormatError, match=match):
        prepare(nsd_root, coco, [1, 2], "V1", tmp_path / "o.parquet", progress=False)


def test_stim_info_ids_written_as_floats_still_read(tmp_path):
    """12.0 for 12 (a float-writing tool's way): the same table as integers give."""
    nsd_root, coco = write_tree(tmp_path)
    want = pq.read_table(prepare(nsd_root, coco, [1], "V1", tmp_path / "a.parquet",
                                 progress=False))
    _edit_stim_info(nsd_root, lambda rows: rows[:1] + [
        [f"{float(v)}" if i in (1, 4) else v for i, v in enumerate(r)] for r in rows[1:]])
    assert "5.0" in (nsd_root / nsd.STIM_INFO).read_text()
    got = pq.read_table(prepare(nsd_root, coco, [1], "V1", tmp_path / "b.parquet",
                                progress=False))
    assert got.equals(want)


def _cli_prepare(nsd_root: Path, coco: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "references.nsd", "prepare", "--nsd-root", str(nsd_root),
         "--coco-annotations", str(coco), "--subject", "1", "--roi", "V1", "--out", str(out),
         "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("broken, match", [
    ("ncsnr", r"^error: .*subj01.*ncsnr\.nii\.gz: cannot read as NIfTI \(.*not a gzip file"),
    ("stim_info", r"^error: .*nsd_stim_info_merged\.csv: line 14 has 1 field\(s\), expected 6"),
])
def test_cli_bad_file_is_one_line_exit_2(tmp_path, broken, match):
    nsd_root, coco = write_tree(tmp_path)
    if broken == "ncsnr":
        _bad_ncsnr(nsd_root, "garbage")
    else:
        _edit_stim_info(nsd_root, BAD_STIM_INFO["truncated_last_line"][0])
    proc = _cli_prepare(nsd_root, coco, tmp_path / "o.parquet")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert re.search(match, lines[0]), lines[0]
    assert not (tmp_path / "o.parquet").exists()


def test_run_dry_run_refuses_a_malformed_stim_info_row(tmp_path):
    """Through sweeps/run.py: the dry run names the file and line, exit status 2."""
    nsd_root, coco = write_tree(tmp_path)
    _edit_stim_info(nsd_root, BAD_STIM_INFO["columns_missing"][0])
    proc = subprocess.run(
        [sys.executable, str(REPO / "sweeps" / "run.py"), "nsd_conv1_v1", "--data", "nsd",
         "--nsd-root", str(nsd_root), "--coco-annotations", str(coco), "--dry-run",
         "--storage", str(tmp_path / "ray")], cwd=tmp_path, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert re.search(r"^error: .*nsd_stim_info_merged\.csv: line 13 has 2 field\(s\), "
                     r"expected 6", lines[0]), lines[0]


def test_uncompressed_nifti_files_give_the_same_table(tmp_path):
    """Masks and ncsnr stored as .nii read as their .nii.gz do: the same table, bit for bit, and
    the ncsnr of the mask's voxels (NaN -> 0), each float32 exactly as the release holds it."""
    gz_root, coco = write_tree(tmp_path / "gz")
    nii_root, _ = write_tree(tmp_path / "nii")
    vols = {s: _write_ncsnr(gz_root, s) for s in TRIALS}
    for s in TRIALS:
        _write_ncsnr(nii_root, s, suffix=".nii")
        for roi in nsd.ROIS:
            _uncompress(nsd.roi_file(nii_root, s, roi))
    check_release(nii_root, [1, 2], ["V1", "VVS"])
    for roi in nsd.ROIS:
        want = pq.read_table(prepare(gz_root, coco, [1, 2], roi, tmp_path / "gz.parquet",
                                     progress=False))
        got = pq.read_table(prepare(nii_root, coco, [1, 2], roi, tmp_path / "nii.parquet",
                                    progress=False))
        assert got.equals(want)
        meta = nsd.prepared_metadata(got)
        assert meta["ncsnr"] == nsd.prepared_metadata(want)["ncsnr"]
        for s in TRIALS:
            prf, streams = _mask_volumes(s)
            labels = np.where(np.isin(prf if roi == "V1" else streams,
                                      {"V1": (1, 2), "VVS": (5,)}[roi]))
            expected = [0.0 if np.isnan(vols[s][v]) else float(vols[s][v])
                        for v in zip(*labels)]  # np.where is C order, as the responses
            np.testing.assert_array_equal(np.float32(meta["ncsnr"][s]), np.float32(expected))
    cached = nsd.prepare_cached(nii_root, coco, [1], "V1", progress=False)
    assert nsd.prepared_metadata(pq.read_schema(cached))["ncsnr"][1] is not None


@pytest.mark.parametrize("which", ["roi", "ncsnr"])
def test_nifti_stored_both_ways_is_refused(tmp_path, which):
    nsd_root, coco = write_tree(tmp_path)
    if which == "roi":
        gz = nsd.roi_file(nsd_root, 1, "V1")
    else:
        gz = nsd.betas_dir(nsd_root, 1) / "ncsnr.nii.gz"
        _write_ncsnr(nsd_root, 1)
    gz.with_suffix("").write_bytes(gzip.decompress(gz.read_bytes()))
    name = re.escape(gz.name[:-3])
    match = rf"both .*subj01.*{name}\.gz and .*subj01.*{name} present; expected one of them"
    with pytest.raises(NSDFormatError, match=match) as exc:
        check_release(nsd_root, [1, 2], ["V1"])
    _one_line(exc)
    with pytest.raises(NSDFormatError, match=match):
        prepare(nsd_root, coco, [1], "V1", tmp_path / "o.parquet", progress=False)


@pytest.mark.parametrize("extra, match", [
    ("betas_session1.hdf5", r"subj01.*betas_session01\.hdf5 and betas_session1\.hdf5: both are "
                            r"session 1; expected one file per session"),
    ("betas_session002.hdf5", r"subj01.*betas_session002\.hdf5 and betas_session02\.hdf5: both "
                              r"are session 2"),
    ("betas_session00.hdf5", r"subj01.*betas_session00\.hdf5: session 0; sessions are numbered "
                             r"from 1"),
])
def test_session_file_named_twice_is_refused(tmp_path, extra, match):
    """Which file is read must not depend on the directory listing's order."""
    nsd_root, coco = write_tree(tmp_path)
    folder = nsd.betas_dir(nsd_root, 1)
    (folder / extra).write_bytes((folder / "betas_session01.hdf5").read_bytes())
    with pytest.raises(NSDFormatError, match=match) as exc:
        check_release(nsd_root, [1, 2], ["V1"])
    _one_line(exc)
    with pytest.raises(NSDFormatError, match=match):
        prepare(nsd_root, coco, [1], "V1", tmp_path / "o.parquet", progress=False)


def test_coco_infinite_id_is_a_format_error(tmp_path):
    """json reads Infinity; int() of it is an OverflowError, which must not escape."""
    nsd_root, coco = write_tree(tmp_path)
    path = coco / "instances_val2017.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["category_id"] = float("inf")
    path.write_text(json.dumps(data))
    with pytest.raises(NSDFormatError, match=r"instances_val2017\.json: malformed annotation"):
        prepare(nsd_root, coco, [1, 2], "V1", tmp_path / "o.parquet", progress=False)


def test_cli_usage_errors_and_an_output_folder_are_one_line(tmp_path):
    """The prepare command's own usage errors (argparse printed its usage block) and an --out
    that is a folder (found only after hours of streaming, naming a temporary file) are one
    line, exit 2, before anything is read."""
    nsd_root, coco = write_tree(tmp_path)
    proc = _cli_prepare(nsd_root, coco, tmp_path)
    assert proc.returncode == 2 and proc.stderr == (
        f"error: --out {tmp_path}: a folder; accepted: the path of the .parquet file to "
        f"write\n"), proc.stderr
    for argv, match in ((["prepare", "--nsd-root", str(nsd_root)], r"the following arguments "
                         r"are required: --coco-annotations"),
                        (["prepare", "--nsd-root", str(nsd_root), "--coco-annotations", str(coco),
                          "--subject", "one", "--roi", "V1", "--out", "x.parquet"],
                         r"argument --subject: 'one'; accepted: a subject's number, 1\.\.8")):
        proc = subprocess.run([sys.executable, "-m", "references.nsd", *argv], cwd=REPO,
                              capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert re.match(rf"error: python -m references.nsd prepare: {match}", proc.stderr)


def test_cli_out_naming_a_file_of_the_inputs_is_refused(tmp_path):
    """`--out .../nsd_expdesign.mat` replaced the design file with Parquet (the next check then
    failed on it); an input's file is refused before anything is read, and kept."""
    nsd_root, coco = write_tree(tmp_path)
    for target in (nsd_root / nsd.EXPDESIGN, coco / "instances_val2017.json"):
        before = target.read_bytes()
        proc = _cli_prepare(nsd_root, coco, target)
        assert proc.returncode == 2 and proc.stderr == (
            f"error: --out {target}: a file of the release or the COCO annotations, which it "
            f"would replace; accepted: the path of a new .parquet file (or a table prepared "
            f"before)\n"), proc.stderr
        assert target.read_bytes() == before
    again = tmp_path / "nsd" / "v1.parquet"  # a table inside the root, prepared twice: fine
    assert _cli_prepare(nsd_root, coco, again).returncode == 0
    assert _cli_prepare(nsd_root, coco, again).returncode == 0


def test_stim_info_row_order_and_huge_unseen_ids_change_nothing(tmp_path):
    """Rows out of order, and a row for an nsdId far beyond the release (no subject saw it):
    the same table, and no array sized by the largest id (1e15 would need petabytes)."""
    nsd_root, coco = write_tree(tmp_path)
    want = pq.read_table(prepare(nsd_root, coco, [1, 2], "V1", tmp_path / "a.parquet",
                                 progress=False))
    _edit_stim_info(nsd_root, lambda rows: rows[:1] + rows[:0:-1]
                    + [["99", "123", "val2017", "(0, 0, 0, 0)", str(10**15), "False"]])
    check_release(nsd_root, [1, 2], ["V1"])
    got = pq.read_table(prepare(nsd_root, coco, [1, 2], "V1", tmp_path / "b.parquet",
                                progress=False))
    assert got.equals(want)


def test_stim_info_without_a_seen_image_names_the_id(tmp_path):
    nsd_root, coco = write_tree(tmp_path)
    # nsdId 9 (0-based) is subject 2's only image not shared; subject 1 never sees it
    _edit_stim_info(nsd_root, lambda rows: [r for r in rows if r[4] != "8"])
    prepare(nsd_root, coco, [1], "V1", tmp_path / "a.parquet", progress=False)
    with pytest.raises(NSDFormatError, match=r"no row for nsdId 8 \(seen by subject 2\)"):
        prepare(nsd_root, coco, [1, 2], "V1", tmp_path / "b.parquet", progress=False)


def _rewrite_session(nsd_root: Path, subject: int, session: int, edit, **create) -> Path:
    path = nsd.session_file(nsd_root, subject, session)
    with h5py.File(path, "r") as f:
        betas = f["betas"][()]
    with h5py.File(path, "w") as f:
        f.create_dataset("betas", data=edit(betas), **create)
    return path


def test_nan_betas_in_the_roi_are_refused_naming_the_file(tmp_path):
    """Float betas with a NaN in one V1 voxel: z-scoring used to zero that voxel's whole
    session silently. A NaN outside the ROI is never read and changes nothing."""
    nsd_root, coco = write_tree(tmp_path)
    want = pq.read_table(prepare(nsd_root, coco, [1], "V1", tmp_path / "a.parquet",
                                 progress=False))
    prf, _ = _mask_volumes(1)
    x, y, z = np.argwhere(~np.isin(prf, (1, 2)))[0]

    def outside(b):
        b = b.astype(np.float32)
        b[2, z, y, x] = np.nan
        return b
    _rewrite_session(nsd_root, 1, 2, outside)
    got = pq.read_table(prepare(nsd_root, coco, [1], "V1", tmp_path / "b.parquet",
                                progress=False))
    assert got.equals(want)

    x, y, z = np.argwhere(np.isin(prf, (1, 2)))[1]

    def inside(b):
        b[3, z, y, x] = np.inf
        return b
    path = _rewrite_session(nsd_root, 1, 2, inside)
    with pytest.raises(NSDFormatError, match=(
            re.escape(f"{path}: 1 ROI voxel(s) hold NaN or infinite betas (first: trial 3, "
                      f"voxel ({x}, {y}, {z}) in (x, y, z)); expected finite betas"))) as exc:
        prepare(nsd_root, coco, [1], "V1", tmp_path / "c.parquet", progress=False)
    _one_line(exc)
    assert not (tmp_path / "c.parquet").exists()


def test_a_corrupt_chunk_mid_session_names_the_file_and_trials(tmp_path):
    """The header reads (the dry run passes) but one compressed chunk is garbage: h5py's
    error is raised while streaming, and must name the session file."""
    nsd_root, coco = write_tree(tmp_path)
    path = _rewrite_session(nsd_root, 1, 2, lambda b: b, chunks=(1, *VOLUME[1][::-1]),
                            compression="gzip")
    with h5py.File(path, "r") as f:
        info = f["betas"].id.get_chunk_info(4)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset)
        fh.write(b"\xff" * info.size)
    check_release(nsd_root, [1], ["V1"])
    with pytest.raises(NSDFormatError, match=(
            re.escape(f"{path}: cannot read 'betas' trials 0..4 (") + r".*\); expected a "
            r"complete HDF5 file")) as exc:
        prepare(nsd_root, coco, [1], "V1", tmp_path / "o.parquet", progress=False)
    _one_line(exc)


def test_a_session_cut_short_in_the_middle_is_refused(tmp_path):
    """Subject 1's sessions hold 7 and 5 trials (the last may be shorter). A first session cut
    to 4 would shift every trial of the second onto another image: refused by the dry run and
    by prepare, naming the short session (of two differing sessions, the shorter)."""
    nsd_root, coco = write_tree(tmp_path)
    path = _rewrite_session(nsd_root, 1, 1, lambda b: b[:4])  # 4 and 5
    match = re.escape(f"{path}: 4 trials where the subject's other sessions hold 5; expected "
                      f"every session to hold the same number (750 in the release), the last "
                      f"at most as many")
    with pytest.raises(NSDFormatError, match=match) as exc:
        check_release(nsd_root, [1], ["V1"])
    _one_line(exc)
    with pytest.raises(NSDFormatError, match=match):
        prepare(nsd_root, coco, [1], "V1", tmp_path / "o.parquet", progress=False)


def test_a_last_session_longer_than_the_others_is_refused(tmp_path):
    nsd_root, _ = write_tree(tmp_path)
    _rewrite_session(nsd_root, 1, 1, lambda b: b[:5])  # sessions of 5 and 5: accepted
    check_release(nsd_root, [1], ["V1"])
    path = nsd.session_file(nsd_root, 1, 3)
    with h5py.File(path, "w") as f:  # sessions of 5, 5 and 6
        f["betas"] = _betas(1, 3, 6)
    with pytest.raises(NSDFormatError, match=re.escape(
            f"{path}: 6 trials where the subject's other sessions hold 5;")):
        check_release(nsd_root, [1], ["V1"])


@pytest.mark.parametrize("value, accepted", [(2.0005, True), (2.5, False), (1.2, False)])
def test_roi_labels_between_integers_are_refused(tmp_path, value, accepted):
    """A label volume resampled with interpolation: 2.5 used to round to 2 (V1) and 0.5 to 0.
    Float storage of integer labels (within 1e-3) still reads."""
    nsd_root, _ = write_tree(tmp_path)
    path = nsd.roi_file(nsd_root, 1, "V1")
    prf, _ = _mask_volumes(1)
    want = nsd.load_roi_mask(nsd_root, 1, "V1")
    data = prf.astype(np.float32)
    x, y, z = np.argwhere(prf == 3)[0]
    data[prf == 2] = 2.0001
    data[x, y, z] = value
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    if accepted:
        got = nsd.load_roi_mask(nsd_root, 1, "V1")
        assert got.sum() == want.sum() + 1 and got[x, y, z]
        return
    with pytest.raises(NSDFormatError, match=re.escape(
            f"{path}: 1 voxel(s) hold non-integer labels (e.g. {np.float32(value):g} at "
            f"(x, y, z) = ({x}, {y}, {z})); expected an integer label volume")) as exc:
        check_release(nsd_root, [1], ["V1"])
    _one_line(exc)


def test_unsigned_betas_are_refused(tmp_path):
    """int16 betas reinterpreted as uint16: negatives would wrap to ~65000."""
    nsd_root, _ = write_tree(tmp_path)
    path = _rewrite_session(nsd_root, 2, 1, lambda b: b.view(np.uint16))
    with pytest.raises(NSDFormatError, match=re.escape(
            f"{path}: 'betas' must be signed numbers (int16 in the release, or float), "
            f"got uint16")):
        check_release(nsd_root, [2], ["V1"])


def test_a_partly_written_session_is_refused_from_its_chunk_index(tmp_path):
    """A writer that stopped after 3 of 8 trials: the other chunks read as the fill value (0)
    without a word. The chunk index tells, so the dry run refuses it."""
    nsd_root, coco = write_tree(tmp_path)
    path = nsd.session_file(nsd_root, 2, 1)
    with h5py.File(path, "r") as f:
        betas = f["betas"][()]
    with h5py.File(path, "w") as f:
        d = f.create_dataset("betas", shape=betas.shape, dtype=betas.dtype,
                             chunks=(1, *betas.shape[1:]))
        d[:3] = betas[:3]
    with pytest.raises(NSDFormatError, match=re.escape(
            f"{path}: 'betas' was never written in full (5 of its 8 chunks hold no data)")):
        check_release(nsd_root, [2], ["V1"])
    with pytest.raises(NSDFormatError, match="was never written in full"):
        prepare(nsd_root, coco, [2], "V1", tmp_path / "o.parquet", progress=False)
    with h5py.File(path, "a") as f:
        f["betas"][3:] = betas[3:]
    check_release(nsd_root, [2], ["V1"])


def test_stim_info_with_a_byte_order_mark_before_nsd_id(tmp_path):
    """Saved by a spreadsheet with nsdId as its first column and a UTF-8 BOM: the same table."""
    nsd_root, coco = write_tree(tmp_path)
    want = pq.read_table(prepare(nsd_root, coco, [1], "V1", tmp_path / "a.parquet",
                                 progress=False))
    _edit_stim_info(nsd_root, lambda rows: [[r[4], *r[:4], *r[5:]] for r in rows])
    path = nsd_root / nsd.STIM_INFO
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert path.read_text(encoding="utf-8").startswith("\ufeffnsdId,")
    got = pq.read_table(prepare(nsd_root, coco, [1], "V1", tmp_path / "b.parquet",
                                progress=False))
    assert got.equals(want)


def test_cli_check_and_prepare_without_subject(tree, tmp_path):
    nsd_root, coco = tree
    cli = [sys.executable, "-m", "references.nsd"]
    proc = subprocess.run([*cli, "check", "--nsd-root", str(nsd_root)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{nsd_root}: ok (subjects 1, 2; ROI V1, VVS)"
    out = tmp_path / "all.parquet"
    proc = subprocess.run([*cli, "prepare", "--nsd-root", str(nsd_root), "--coco-annotations",
                           str(coco), "--roi", "V1", "--out", str(out), "--no-progress"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert set(pq.read_table(out)["subject"].to_pylist()) == {1, 2}
    _rewrite_session(nsd_root, 1, 2, lambda b: b.astype(np.uint16))
    proc = subprocess.run([*cli, "check", "--nsd-root", str(nsd_root), "--subject", "1",
                           "--roi", "V1"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "got uint16" in proc.stderr, proc.stderr


def _as_nifti(path: Path, suffix: str = ".nii.gz", edit=None, keep: bool = False,
              image=nib.Nifti1Image) -> Path:
    """Store the session file ``path`` (HDF5, (trials, z, y, x)) as the release's NIfTI
    (x, y, z, trials) beside it, of kind ``image``; the HDF5 file is removed unless ``keep``."""
    with h5py.File(path, "r") as f:
        betas = f["betas"][()].transpose(3, 2, 1, 0)
    img = image(betas if edit is None else edit(betas), np.eye(4))
    out = path.with_name(path.name.replace(".hdf5", suffix))
    nib.save(img, str(out))
    if not keep:
        path.unlink()
    return out


@pytest.mark.parametrize("form", [".nii.gz", ".nii", "mixed"])
def test_sessions_stored_as_nifti_give_the_same_table(tmp_path, form):
    """The release ships every session as .hdf5 and as .nii.gz; a copy holding only the NIfTI
    files (what nsd_access reads) gives the same table, bit for bit. A subject with only NIfTI
    sessions was left out of "every subject" without a word."""
    h5_root, coco = write_tree(tmp_path / "h5")
    ni_root, _ = write_tree(tmp_path / "ni")
    for s, trials in TRIALS.items():
        for k in range(1, len(trials) + 1):
            if form != "mixed" or (s, k) == (1, 2):
                _as_nifti(nsd.session_file(ni_root, s, k), ".nii" if form == ".nii" else ".nii.gz")
    assert subjects_in_release(ni_root) == (1, 2)
    check_release(ni_root, None, ["V1", "VVS"])
    for roi in nsd.ROIS:
        want = pq.read_table(prepare(h5_root, coco, None, roi, tmp_path / "h5.parquet",
                                     progress=False))
        got = pq.read_table(prepare(ni_root, coco, None, roi, tmp_path / "ni.parquet",
                                    progress=False))
        assert got.num_rows > 0 and got.equals(want)


def test_a_session_in_both_forms_is_read_from_its_hdf5(tmp_path):
    """As the release ships it: both files per session. The HDF5 one is read (the ROI's box
    alone); the NIfTI beside it, here holding other numbers, changes nothing."""
    nsd_root, coco = write_tree(tmp_path / "both")
    plain, _ = write_tree(tmp_path / "plain")
    for s, trials in TRIALS.items():
        for k in range(1, len(trials) + 1):
            _as_nifti(nsd.session_file(nsd_root, s, k), edit=lambda b: b // 2, keep=True)
    assert nsd.session_files(nsd_root, 1) == [nsd.session_file(nsd_root, 1, k) for k in (1, 2)]
    want = pq.read_table(prepare(plain, coco, None, "V1", tmp_path / "a.parquet", progress=False))
    got = pq.read_table(prepare(nsd_root, coco, None, "V1", tmp_path / "b.parquet",
                                progress=False))
    assert got.equals(want)


def _scaled(betas):
    """Percent signal change saved as int16 with nibabel's own scaling (scl_slope)."""
    img = nib.Nifti1Image(betas / 300.0, np.eye(4))
    img.set_data_dtype(np.int16)
    return img


BAD_NIFTI_SESSIONS = {
    "scaled": (lambda p: _scaled(_read_nifti(p)),
               r"betas_session02\.nii\.gz: NIfTI scaling scl_slope=\S+ scl_inter=\S+; "
               r"expected none \(the release's betas are stored as int16"),
    "hdf5_order": (lambda p: nib.Nifti1Image(_read_nifti(p).transpose(3, 2, 1, 0), np.eye(4)),
                   r"betas_session02\.nii\.gz: betas shape \(5, 2, 3, 4\) does not match ROI "
                   r"mask .*prf-visualrois\.nii\.gz of shape \(x, y, z\) = \(4, 3, 2\); "
                   r"expected \(x, y, z, trials\) = \(4, 3, 2, trials\)"),
    "unsigned": (lambda p: nib.Nifti1Image(_read_nifti(p).astype(np.uint16), np.eye(4)),
                 r"betas_session02\.nii\.gz: betas must be signed numbers .* got uint16"),
    "not_nifti": (lambda p: p.write_bytes(b"not a nifti file") and None,
                  r"betas_session02\.nii\.gz: cannot read as NIfTI"),
}


def _read_nifti(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


@pytest.mark.parametrize("broken", BAD_NIFTI_SESSIONS, ids=str)
def test_a_malformed_nifti_session_is_refused_naming_it(tmp_path, broken):
    nsd_root, coco = write_tree(tmp_path)
    path = _as_nifti(nsd.session_file(nsd_root, 1, 2))
    make, match = BAD_NIFTI_SESSIONS[broken]
    img = make(path)
    if img is not None:
        nib.save(img, str(path))
    with pytest.raises(NSDFormatError, match=match) as exc:
        check_release(nsd_root, None, ["V1"])
    _one_line(exc)
    with pytest.raises(NSDFormatError, match=match):
        prepare(nsd_root, coco, [1], "V1", tmp_path / "o.parquet", progress=False)


def _reoriented(path: Path) -> None:
    """The ROI mask as a lab's tool re-saves it in another orientation: x flipped in the data
    and in the affine, the same world position for every voxel, the same shape."""
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)[::-1].copy()
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = data.shape[0] - 1
    nib.save(nib.Nifti1Image(data, img.affine @ flip), str(path))


@pytest.mark.parametrize("betas", ["hdf5_with_ncsnr", "nifti"])
def test_an_roi_mask_on_another_voxel_grid_is_refused(tmp_path, betas):
    """A V1 mask re-oriented by another tool (x flipped, so the shape is the betas') selected
    the mirror-image voxels without a word. Its affine is compared with the betas' folder's
    NIfTI volumes (the ncsnr volume beside HDF5 sessions; NIfTI sessions) by the dry run and
    the preparation alike. A mask whose header states no affine, or the same affine to float
    rounding, is accepted."""
    nsd_root, coco = write_tree(tmp_path)
    if betas == "hdf5_with_ncsnr":
        _write_ncsnr(nsd_root, 1)
        other = r"ncsnr\.nii\.gz"
    else:
        for k in (1, 2):
            _as_nifti(nsd.session_file(nsd_root, 1, k))
        other = r"betas_session01\.nii\.gz"
    roi = nsd.roi_file(nsd_root, 1, "V1")
    kept = roi.read_bytes()
    _reoriented(roi)
    match = (r"prf-visualrois\.nii\.gz: its voxel axes \(orientation LAS, voxel \(1, 1, 1\) "
             r"mm\) differ from the betas' in .*" + other + r" \(orientation RAS, voxel "
             r"\(1, 1, 1\) mm\); expected the ROI in the betas' func1pt8mm space, voxel for voxel")
    with pytest.raises(NSDFormatError, match=match) as exc:
        check_release(nsd_root, [1], ["V1"])
    _one_line(exc)
    with pytest.raises(NSDFormatError, match=match):
        prepare(nsd_root, coco, [1], "V1", tmp_path / "o.parquet", progress=False)

    roi.write_bytes(kept)  # the same grid to float32 rounding: accepted
    img = nib.load(str(roi))
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine + 1e-6), str(roi))
    check_release(nsd_root, [1], ["V1"])
    shifted = img.affine.copy()  # another tool's origin convention: no voxel moves
    shifted[:3, 3] = [-2.7, 3.6, -1.8]
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), shifted), str(roi))
    check_release(nsd_root, [1], ["V1"])
    _reoriented(roi)  # a header stating no affine (sform and qform codes 0): not comparable
    nib.save(nib.Nifti1Image(np.asanyarray(nib.load(str(roi)).dataobj), None), str(roi))
    assert nsd._stated_affine(roi) is None
    check_release(nsd_root, [1], ["V1"])


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_a_nifti_session_cut_short_is_refused_naming_it(tmp_path, suffix):
    """A copy that stopped part-way: an uncompressed file is told from its size before any run;
    a gzip one when it is read, naming the trials."""
    nsd_root, coco = write_tree(tmp_path)
    path = _as_nifti(nsd.session_file(nsd_root, 1, 1), suffix)
    if suffix == ".nii.gz":  # stored blocks: the header stays readable, as in a large file
        path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()), compresslevel=0))
    path.write_bytes(path.read_bytes()[:-40])
    if suffix == ".nii":
        with pytest.raises(NSDFormatError, match=r"betas_session01\.nii: \d+ bytes where its "
                                                 r"header needs \d+; expected a complete file"):
            check_release(nsd_root, None, ["V1"])
    else:
        check_release(nsd_root, None, ["V1"])  # headers only: the gzip stream is not read
    want = (r"cannot read betas trials 0\.\.6 \(.*\); expected a complete NIfTI file"
            if suffix == ".nii.gz" else r"\d+ bytes where")
    with pytest.raises(NSDFormatError, match=rf"betas_session01{re.escape(suffix)}: {want}"
                       ) as exc:
        prepare(nsd_root, coco, [1], "V1", tmp_path / "o.parquet", progress=False)
    _one_line(exc)


@pytest.mark.parametrize("where", ["func1mm/betas_fithrf_GLMdenoise_RR",
                                   "func1pt8mm/betas_fithrf"])
def test_a_subject_with_betas_only_in_another_space_or_glm_is_named(tmp_path, where):
    """"Every subject" left such a subject out without a word (the paper pools all eight)."""
    nsd_root, coco = write_tree(tmp_path)
    moved = nsd_root / nsd.BETAS_ROOT / "subj02" / where
    moved.parent.mkdir(parents=True, exist_ok=True)
    nsd.betas_dir(nsd_root, 2).rename(moved)
    match = (rf"subject 2 has betas only in .*subj02/{where}; expected them in "
             r".*subj02/func1pt8mm/betas_fithrf_GLMdenoise_RR \(the space of the ROI masks")
    with pytest.raises(NSDFormatError, match=match) as exc:
        subjects_in_release(nsd_root)
    _one_line(exc)
    with pytest.raises(NSDFormatError, match=match):
        check_release(nsd_root, None, ["V1"])
    check_release(nsd_root, [1], ["V1"])  # named subjects: the others are not asked for
    with pytest.raises(NSDFormatError, match=rf"no betas_sessionSS.* for subject 2 \(its "
                                             rf"betas are in .*subj02/{where}\); subjects "
                                             r"present: 1$"):
        check_release(nsd_root, [2], ["V1"])
    with pytest.raises(NSDFormatError, match=rf"missing directory .* \(no betas for subject 2; "
                                             rf"its betas are in .*subj02/{where}\)"):
        prepare(nsd_root, coco, [2], "V1", tmp_path / "o.parquet", progress=False)
    assert pq.read_table(prepare(nsd_root, coco, [1], "V1", tmp_path / "o.parquet",
                                 progress=False)).num_rows > 0


def test_a_damaged_prepared_table_in_the_cache_is_named_with_the_way_out(tmp_path, monkeypatch):
    """A cached prepared.parquet cut short gave a raw ArrowInvalid; deleted, it pointed at
    `python -m references.nsd prepare`, which does not rebuild the entry."""
    monkeypatch.setenv("ALIGNSWEEP_CACHE", str(tmp_path / "cache"))
    nsd_root, coco = write_tree(tmp_path)
    table = nsd.prepare_cached(nsd_root, coco, [1], "V1", progress=False)
    whole = table.read_bytes()
    for damage in (lambda: table.write_bytes(whole[: len(whole) // 2]),
                   lambda: table.write_bytes(b""), table.unlink):
        damage()
        with pytest.raises(NSDFormatError, match=rf"^cache entry {re.escape(str(table.parent))} "
                                                 r"is damaged \(prepared\.parquet: .*\); delete "
                                                 r"it to rebuild it: rm -r") as exc:
            nsd.prepare_cached(nsd_root, coco, [1], "V1", progress=False)
        _one_line(exc)
    import shutil

    shutil.rmtree(table.parent)
    assert nsd.prepare_cached(nsd_root, coco, [1], "V1", progress=False).read_bytes() == whole


def test_a_session_as_nii_and_nii_gz_is_refused_as_masks_are(tmp_path):
    nsd_root, _ = write_tree(tmp_path)
    gz = _as_nifti(nsd.session_file(nsd_root, 1, 2))
    gz.with_suffix("").write_bytes(gzip.decompress(gz.read_bytes()))
    with pytest.raises(NSDFormatError, match=r"both .*subj01.*betas_session02\.nii\.gz and "
                                             r".*subj01.*betas_session02\.nii present; "
                                             r"expected one of them") as exc:
        check_release(nsd_root, None, ["V1"])
    _one_line(exc)


def test_nifti_sessions_read_in_many_chunks_give_the_same_table(tmp_path, monkeypatch):
    """Chunks of one volume each (the release's sessions are read in about 16): the same
    table as the HDF5 files', and the .nii.gz is decompressed once, not once per chunk."""
    import nibabel.openers

    h5_root, coco = write_tree(tmp_path / "h5")
    ni_root, _ = write_tree(tmp_path / "ni")
    for s, trials in TRIALS.items():
        for k in range(1, len(trials) + 1):
            _as_nifti(nsd.session_file(ni_root, s, k))
    x, y, z = nsd.load_roi_mask(ni_root, 1, "V1").shape
    monkeypatch.setattr(nsd, "_READ_CHUNK_BYTES", x * y * z * 2)  # one int16 volume
    opened = []
    real = nibabel.openers.Opener.__init__

    def counting(self, fileish, *args, **kwargs):
        opened.append(str(fileish))
        real(self, fileish, *args, **kwargs)

    monkeypatch.setattr(nibabel.openers.Opener, "__init__", counting)
    got = pq.read_table(prepare(ni_root, coco, [1], "V1", tmp_path / "n.parquet",
                                progress=False))
    session = str(nsd.session_file(ni_root, 1, 1).with_suffix(".nii.gz"))
    # its header when checked, and when read, then its data once: not once per volume (7)
    assert 1 <= opened.count(session) <= 3, opened.count(session)
    want = pq.read_table(prepare(h5_root, coco, [1], "V1", tmp_path / "h.parquet",
                                 progress=False))
    assert got.equals(want)


# --------------------------------------------------------------------------------------------
# A lab's copy read silently wrong, or refused without a name (probed at stop 30)


def _rewrite_stimuli(nsd_root: Path, write) -> Path:
    """nsd_stimuli.hdf5 rewritten by ``write(file, images)``; returns its path."""
    path = nsd_root / nsd.STIMULI
    with h5py.File(path, "r") as f:
        images = f["imgBrick"][()]
    with h5py.File(path, "w") as f:
        write(f, images)
    return path


def test_a_part_written_stimulus_file_is_refused(tmp_path):
    """A copy of nsd_stimuli.hdf5 that stopped after 4 of 12 images passed the dry run, and
    every image after them was read as black: a run trained on them and finished (exit 0)."""
    nsd_root, _ = write_tree(tmp_path)

    def first_four(f, images):
        d = f.create_dataset("imgBrick", shape=images.shape, dtype=images.dtype,
                             chunks=(1, *images.shape[1:]))
        d[:4] = images[:4]
    path = _rewrite_stimuli(nsd_root, first_four)
    with pytest.raises(NSDFormatError, match=re.escape(
            f"{path}: 'imgBrick' was never written in full (8 of its 12 chunks hold no data); "
            f"reading it would give black images")) as exc:
        check_release(nsd_root, [1, 2], ["V1"])
    _one_line(exc)


@pytest.mark.parametrize("shape, said", [((12, 10, 8, 3), "10 x 8"), ((12, 0, 0, 3), "0 x 0")])
def test_stimuli_that_are_not_square_images_are_refused(tmp_path, shape, said):
    """A 0 x 0 brick passed (each trial then failed dividing by zero); a non-square one was
    centre-cropped, though a voxel responded to the whole image."""
    nsd_root, _ = write_tree(tmp_path)
    path = _rewrite_stimuli(nsd_root, lambda f, images: f.create_dataset(
        "imgBrick", data=np.zeros(shape, np.uint8)))
    with pytest.raises(NSDFormatError, match=re.escape(
            f"{path}: 'imgBrick' images are {said} pixels; expected square images")):
        check_release(nsd_root, [1, 2], ["V1"])


def test_a_one_based_stim_info_is_refused(tmp_path):
    """nsdId written 1-based (a MATLAB export): every image took the cocoId and labels of the
    next, and the dry run passed (only a subject that saw nsdId 0 would have shown it)."""
    nsd_root, _ = write_tree(tmp_path)
    _edit_stim_info(nsd_root, lambda rows: [rows[0]] + [
        [*r[:4], str(int(r[4]) + 1), *r[5:]] for r in rows[1:]])
    with pytest.raises(NSDFormatError, match=(
            r"nsd_stim_info_merged\.csv: nsdId runs 1\.\.12 but 'imgBrick' in .*nsd_stimuli"
            r"\.hdf5 holds 12 images \(nsdId 0\.\.11\); expected the release's 0-based nsdId")):
        check_release(nsd_root, [1], ["V1"])


def test_betas_never_written_are_refused_even_where_the_file_looks_complete(tmp_path):
    """Chunks a parallel writer allocated early, and a virtual dataset whose source file is
    gone, read as the fill value: each such trial became a z-scored response of 0 (and
    counted as a repeat), the dry run and prepare passing."""
    nsd_root, coco = write_tree(tmp_path)
    path = nsd.session_file(nsd_root, 1, 2)
    with h5py.File(path, "r") as f:
        betas = f["betas"][()]
    path.unlink()
    with h5py.File(path, "w") as f:  # every chunk allocated at creation, 2 of 5 trials written
        space = h5py.h5s.create_simple(betas.shape)
        plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        plist.set_chunk((1, *betas.shape[1:]))
        plist.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        h5py.h5d.create(f.id, b"betas", h5py.h5t.STD_I16LE, space, plist)
        f["betas"][:2] = betas[:2]
    check_release(nsd_root, [1], ["V1"])  # the chunk index says all is stored
    with pytest.raises(NSDFormatError, match=re.escape(
            f"{path}: 3 trial(s) hold one value in every ROI voxel (first: trial 2, value 0); "
            f"expected measured betas")) as exc:
        prepare(nsd_root, coco, [1], "V1", tmp_path / "a.parquet", progress=False)
    _one_line(exc)

    source = tmp_path / "source.h5"
    with h5py.File(source, "w") as f:
        f["betas"] = betas
    path.unlink()
    layout = h5py.VirtualLayout(shape=betas.shape, dtype=betas.dtype)
    layout[:] = h5py.VirtualSource(str(source), "betas", shape=betas.shape)
    with h5py.File(path, "w") as f:
        f.create_virtual_dataset("betas", layout)
    check_release(nsd_root, [1], ["V1"])  # its source is there: read through it
    source.unlink()
    with pytest.raises(NSDFormatError, match=re.escape(
            f"{path}: 'betas' was never written in full (it is a virtual dataset whose source "
            f"file {source} is missing)")):
        check_release(nsd_root, [1], ["V1"])


@pytest.mark.parametrize("subject", [1, 2])
def test_a_session_still_being_copied_is_refused(tmp_path, subject):
    """aws s3 cp names a file it is writing betas_session01.hdf5.<random>: a subject with only
    that was left out of "every subject" without a word, and one whose last session was still
    copying was read with one session fewer."""
    nsd_root, _ = write_tree(tmp_path)
    last = nsd.session_file(nsd_root, subject, len(TRIALS[subject]))
    partial = last.with_name(last.name + ".6fA3b1c2")
    last.rename(partial)
    with pytest.raises(NSDFormatError, match=re.escape(
            f"{partial}: an unfinished copy of subject {subject}'s session "
            f"{len(TRIALS[subject])}; expected {last.name} -- finish the copy")) as exc:
        check_release(nsd_root, None, ["V1"])
    _one_line(exc)


@pytest.mark.parametrize("subject, name", [(1, "betas_session02.h5"),
                                           (1, "betas_session02.HDF5"),
                                           (2, "betas_session01.h5")])
def test_a_session_under_another_name_is_refused_not_left_out(tmp_path, subject, name):
    """A session saved as .h5 (or .HDF5) was not read, and nothing said so: subject 1 was read
    with its last session missing, and subject 2, whose one session it was, was left out of
    "every subject" (check said ok)."""
    nsd_root, coco = write_tree(tmp_path)
    session = int(name[len("betas_session"):][:2])
    path = nsd.session_file(nsd_root, subject, session)
    renamed = path.rename(path.with_name(name))
    match = re.escape(f"{renamed}: not a name the release gives a session file, so subject "
                      f"{subject}'s session {session} would not be read; expected "
                      f"{path.name} (accepted: ")
    for subjects in (None, [subject]):
        with pytest.raises(NSDFormatError, match=match) as exc:
            check_release(nsd_root, subjects, ["V1"])
        _one_line(exc)
    with pytest.raises(NSDFormatError, match=match):
        prepare(nsd_root, coco, [subject], "V1", tmp_path / "o.parquet", progress=False)


def test_a_checksum_beside_its_session_is_ignored_and_one_without_it_named(tmp_path):
    """betas_session01.hdf5.md5 (as md5sum writes it beside a download) was refused as "an
    unfinished copy" of a session that was complete, with the advice to finish the copy."""
    nsd_root, coco = write_tree(tmp_path)
    path = nsd.session_file(nsd_root, 1, 2)
    for suffix in (".md5", ".sha256", ".bak"):
        path.with_name(path.name + suffix).write_text("0123456789abcdef  " + path.name + "\n")
    seen = check_release(nsd_root, None, ["V1"])
    plain = check_release(write_tree(tmp_path / "plain")[0], None, ["V1"])
    assert seen.keys() == plain.keys() == {1, 2}
    for s in seen:
        np.testing.assert_array_equal(seen[s], plain[s])
    prepare(nsd_root, coco, [1], "V1", tmp_path / "o.parquet", progress=False)
    path.unlink()  # the checksum stays: the session it stands for is missing
    with pytest.raises(NSDFormatError, match=re.escape(
            f"{path.with_name(path.name + '.bak')}: a checksum or backup of subject 1's "
            f"session 2, whose {path.name} is not in {path.parent}; expected the session file "
            f"beside it")) as exc:
        check_release(nsd_root, None, ["V1"])
    _one_line(exc)


def test_nibabel_prints_nothing_of_its_own(tmp_path):
    """nibabel logs header problems to stderr itself: a NIfTI-2 session (read correctly)
    printed "sizeof_hdr should be 348; set sizeof_hdr to 348" on every run, and a gzipped file
    named .nii put three such lines above the one-line refusal."""
    nsd_root, coco = write_tree(tmp_path)
    want = pq.read_table(prepare(nsd_root, coco, [1], "V1", tmp_path / "h5.parquet",
                                 progress=False))
    _as_nifti(nsd.session_file(nsd_root, 1, 2), image=nib.Nifti2Image)
    check = [sys.executable, "-m", "references.nsd", "check", "--nsd-root", str(nsd_root),
             "--subject", "1"]
    proc = subprocess.run(check, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stderr) == (0, "")
    proc = _cli_prepare(nsd_root, coco, tmp_path / "nii2.parquet")
    assert (proc.returncode, proc.stderr) == (0, "")
    assert pq.read_table(tmp_path / "nii2.parquet").equals(want)

    gz = _as_nifti(nsd.session_file(nsd_root, 1, 1))
    misnamed = gz.rename(gz.with_suffix(""))  # betas_session01.nii, still gzipped
    proc = subprocess.run(check, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {misnamed}: cannot read as NIfTI"), proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr


def test_the_pickled_stim_info_and_a_coco_file_are_named_for_what_they_are(tmp_path):
    """A release holding only nsd_stim_info_merged.pkl was told the .csv is missing, without
    a word on the .pkl beside it; --coco-annotations given one of its JSON files was told
    ".../instances_val2017.json/instances_train2017.json" is missing."""
    nsd_root, coco = write_tree(tmp_path)
    given = coco / "instances_val2017.json"
    with pytest.raises(NSDFormatError, match=re.escape(
            f"--coco-annotations {given}: a file; expected the folder holding "
            f"instances_train2017.json and instances_val2017.json")) as exc:
        prepare(nsd_root, given, [1], "V1", tmp_path / "o.parquet", progress=False)
    _one_line(exc)
    csv_path = nsd_root / nsd.STIM_INFO
    csv_path.rename(csv_path.with_suffix(".pkl"))  # its content does not matter here
    with pytest.raises(NSDFormatError, match=re.escape(
            f"missing file {csv_path} (nsd_stim_info_merged.pkl beside it is not read")):
        check_release(nsd_root, [1], ["V1"])


def test_a_session_name_that_is_no_file_is_refused_not_waited_on(tmp_path):
    """A FIFO named as a session hung the dry run."""
    nsd_root, _ = write_tree(tmp_path)
    fifo = nsd.session_file(nsd_root, 2, 2)
    os.mkfifo(fifo)
    with pytest.raises(NSDFormatError, match=re.escape(
            f"{fifo}: not a regular file (a FIFO, socket or device)")):
        check_release(nsd_root, [2], ["V1"])


def test_an_index_beyond_exact_floats_is_one_line_without_a_warning(tmp_path):
    nsd_root, _ = write_tree(tmp_path)
    path = nsd_root / nsd.EXPDESIGN
    design = scipy.io.loadmat(str(path))
    design["subjectim"] = design["subjectim"] * 1e30
    scipy.io.savemat(str(path), {k: v for k, v in design.items() if not k.startswith("__")})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "invalid value encountered in cast"
        with pytest.raises(NSDFormatError, match=(
                r"nsd_expdesign\.mat: 'subjectim' holds 1e\+31; expected 1-based indices")):
            check_release(nsd_root, [1], ["V1"])


def test_a_corrupt_stimulus_chunk_names_the_file_and_images(tmp_path):
    """h5py's bare OSError ("filter returned failure during read") reached the summary with
    neither the file nor the image, and Tune retried the trial twice."""
    from references.datasets import _Stimuli
    from sweeps.execute import _repeating_errors

    nsd_root, _ = write_tree(tmp_path)
    path = _rewrite_stimuli(nsd_root, lambda f, images: f.create_dataset(
        "imgBrick", data=images, chunks=(1, *images.shape[1:]), compression="gzip"))
    with h5py.File(path, "r") as f:
        chunk = f["imgBrick"].id.get_chunk_info(5)
    with open(path, "r+b") as fh:
        fh.seek(chunk.byte_offset)
        fh.write(b"\xff" * chunk.size)
    stimuli = _Stimuli(path)
    stimuli.read_one(4)
    for read in (lambda: stimuli.read_one(5), lambda: stimuli.read(np.array([3, 5, 7]))):
        with pytest.raises(NSDFormatError, match=re.escape(
                f"{path}: cannot read 'imgBrick' image(s) nsdId ") + r"[0-9, ]+ \(.*\); expected "
                r"a complete HDF5 file") as exc:
            read()
        _one_line(exc)
        assert isinstance(exc.value, _repeating_errors())  # not retried by Tune


def test_a_stimuli_file_this_node_cannot_reach_is_retryable_not_a_format_error(tmp_path):
    """nsd_stimuli.hdf5 not there when a trial opens it (a node without the NSD mount, or
    the file moved since the driver read its shape) read as "cannot read 'imgBrick' ... copy
    it again from the release", a format error that ends the trial for good on every node.
    It is a DataUnreachable naming the node and the file, which Tune retries."""
    import socket

    from records.errors import DataUnreachable
    from references.datasets import _Stimuli
    from sweeps.execute import _repeating_errors

    nsd_root, _ = write_tree(tmp_path)
    path = nsd_root / nsd.STIMULI
    stimuli = _Stimuli(path)  # the driver's look at the file
    moved = path.rename(path.with_name("elsewhere.hdf5"))
    for read in (lambda: stimuli.read_one(5), lambda: stimuli.read(np.array([3, 5, 7]))):
        with pytest.raises(DataUnreachable) as exc:
            read()
        assert str(exc.value) == (
            f"node {socket.gethostname()} cannot open {path} (No such file or directory), "
            "which the driver found as it planned the run; expected the data at the same path "
            "on every node (a shared mount), unchanged while the run lasts")
        assert not isinstance(exc.value, _repeating_errors())
    moved.rename(path)
    assert stimuli.read_one(5).shape[0] == 3


def test_a_release_this_user_may_not_read_is_one_line_naming_the_path(tmp_path):
    """An unreadable CSV, betas folder or subject folder went through as an unexpected error
    (exit 1, a traceback file). Run as a user the permissions bind (root reads anything)."""
    import stat
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="nsd-perm-"))
    try:
        nsd_root, _ = write_tree(base)
        for p in [base, *base.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if p.is_dir() else 0))
        blocked = [nsd_root / nsd.STIM_INFO, nsd.betas_dir(nsd_root, 1),
                   nsd_root / "nsddata_betas/ppdata/subj02"]
        for path in blocked:
            mode = path.stat().st_mode
            path.chmod(0)
            try:
                prefix = ([] if os.geteuid() else
                          ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"])
                proc = subprocess.run(
                    [*prefix, sys.executable, "-c",
                     "import sys; from references import nsd\n"
                     "try:\n nsd.check_release(sys.argv[1], None, ['V1'])\n"
                     "except nsd.NSDFormatError as e:\n print(e); sys.exit(2)",
                     str(nsd_root)], cwd=REPO, capture_output=True, text=True, timeout=120,
                    env={**os.environ, "PYTHONPATH": str(REPO)})
            finally:
                path.chmod(mode)
            assert proc.returncode == 2, proc.stdout + proc.stderr
            # (the path, or the first one below it that could not be reached)
            assert re.fullmatch(rf"{re.escape(str(path))}(/\S+)?: permission denied to user "
                                rf"\S+; "
                                rf"accepted: a release \(and output folder\) this user may "
                                rf"read \(and write\)\n", proc.stdout), proc.stdout + proc.stderr
    finally:
        for p in [base, *base.rglob("*")]:
            with contextlib.suppress(OSError):
                p.chmod(0o700)
        shutil.rmtree(base, ignore_errors=True)


def test_a_subject_behind_a_dangling_link_or_misnamed_is_named_not_left_out(tmp_path):
    """A lab keeps a subject's betas on another disk behind a link: with the disk not mounted,
    "every subject" left that subject out without a word (check said ok for subject 1, the
    table held subject 1 alone), as it did a folder named subj2, and a dangling ncsnr link
    read as "the release has no ncsnr"."""
    nsd_root, coco = write_tree(tmp_path)
    subj02 = nsd_root / nsd.BETAS_ROOT / "subj02"
    subj02.rename(tmp_path / "elsewhere")
    subj02.symlink_to(tmp_path / "not-mounted" / "subj02")
    with pytest.raises(NSDFormatError, match=rf"^{re.escape(str(subj02))} is a link to "
                                             rf".*not-mounted/subj02, which is not there") as exc:
        subjects_in_release(nsd_root)
    _one_line(exc)
    with pytest.raises(NSDFormatError, match="is a link to"):
        check_release(nsd_root, None, ["V1"])
    check_release(nsd_root, [1], ["V1"])  # named subjects: the others are not asked for
    subj02.unlink()
    (tmp_path / "elsewhere").rename(nsd_root / nsd.BETAS_ROOT / "subj2")
    with pytest.raises(NSDFormatError, match=r"subj2: a subject folder named subj2; expected "
                                             r"the release's name subj02 -- rename it$"):
        check_release(nsd_root, None, ["V1"])
    (nsd_root / nsd.BETAS_ROOT / "subj2").rename(subj02)
    # a second name beside the release's own takes nothing away: a BIDS-style link to a
    # subject's folder, an empty leftover, a file
    (nsd_root / nsd.BETAS_ROOT / "sub-01").symlink_to(nsd_root / nsd.BETAS_ROOT / "subj01")
    (nsd_root / nsd.BETAS_ROOT / "subject2").mkdir()
    (nsd_root / nsd.BETAS_ROOT / "subj3").write_text("notes")
    assert subjects_in_release(nsd_root) == (1, 2)
    ncsnr = nsd.ncsnr_file(nsd_root, 1)
    ncsnr.unlink(missing_ok=True)
    ncsnr.symlink_to(tmp_path / "not-mounted" / "ncsnr.nii.gz")
    with pytest.raises(NSDFormatError, match=r"ncsnr\.nii\.gz is a link to .*, which is not "
                                             r"there"):
        check_release(nsd_root, [1], ["V1"])


def test_hdf5_a_link_that_does_not_resolve_or_a_filter_h5py_lacks_is_named(tmp_path):
    """The stimuli as an external link to an unmounted file was a KeyError traceback; a
    session repacked with a compression filter this h5py lacks (Blosc, through hdf5plugin)
    passed the check, then failed after streaming the sessions before it, saying "copy it
    again from the release"."""
    nsd_root, coco = write_tree(tmp_path)
    stimuli = nsd_root / nsd.STIMULI
    stimuli.rename(tmp_path / "stimuli.hdf5")
    with h5py.File(stimuli, "w") as f:
        f[nsd.STIMULI_DATASET] = h5py.ExternalLink(str(tmp_path / "gone.hdf5"), "/imgBrick")
    with pytest.raises(NSDFormatError, match=r"'imgBrick' is a link to .*gone\.hdf5:/imgBrick "
                                             r"that does not resolve") as exc:
        check_release(nsd_root, [1], ["V1"])
    _one_line(exc)
    stimuli.unlink()
    (tmp_path / "stimuli.hdf5").rename(stimuli)
    session = nsd.session_file(nsd_root, 2, 1)
    with h5py.File(session) as f:
        betas = f["betas"][:]
    assert not h5py.h5z.filter_avail(32001)  # Blosc: not part of h5py's own HDF5
    with h5py.File(session, "w") as f:
        d = f.create_dataset("betas", betas.shape, betas.dtype, chunks=(1, *betas.shape[1:]),
                             compression=32001, allow_unknown_filter=True)
        for i in range(betas.shape[0]):
            d.id.write_direct_chunk((i, 0, 0, 0), betas[i].tobytes())
    match = (r"betas_session01\.hdf5: 'betas' is compressed with HDF5 filter 32001.*, which "
             r"this h5py cannot decode; accepted: the filter's plugin installed")
    with pytest.raises(NSDFormatError, match=match):
        check_release(nsd_root, None, ["V1"])
    with pytest.raises(NSDFormatError, match=match):
        prepare(nsd_root, coco, None, "V1", tmp_path / "o.parquet", progress=False)
    # an optional filter the writer could not apply left the data plain: it reads
    with h5py.File(session, "w") as f:
        f.create_dataset("betas", data=betas, chunks=(1, *betas.shape[1:]), compression=32001,
                         allow_unknown_filter=True)
    check_release(nsd_root, None, ["V1"])


def test_cli_prepare_refuses_an_unwritable_out_before_streaming_and_ends_on_ctrl_c(tmp_path):
    """--out in a folder that is a file, or that cannot be written, failed with a raw errno
    (naming a hidden temporary file) after every session was streamed; Ctrl-C printed a
    traceback. A check of a release holding only the V1 masks said "missing file streams"
    without the option that checks V1 alone; --nsd-root naming a file said "missing
    directory"."""
    import signal

    nsd_root, coco = write_tree(tmp_path)
    (tmp_path / "notes.txt").write_text("notes")
    proc = _cli_prepare(nsd_root, coco, tmp_path / "notes.txt" / "v1.parquet")
    assert proc.returncode == 2 and proc.stderr == (
        f"error: --out {tmp_path / 'notes.txt' / 'v1.parquet'}: {tmp_path / 'notes.txt'} is "
        f"not a folder; accepted: the path of a .parquet file in a folder this user can "
        f"write\n"), proc.stderr
    if os.geteuid() != 0:  # root writes anywhere: a read-only mount is what refuses it
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        proc = _cli_prepare(nsd_root, coco, locked / "v1.parquet")
        assert proc.returncode == 2 and re.fullmatch(
            r"error: --out .*locked/v1\.parquet: .*locked is not writable; accepted: .*\n",
            proc.stderr), proc.stderr
    for roi in nsd_root.glob("nsddata/ppdata/subj*/func1pt8mm/roi/streams.nii.gz"):
        roi.unlink()
    check = [sys.executable, "-m", "references.nsd", "check", "--nsd-root"]
    proc = subprocess.run([*check, str(nsd_root)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.endswith(
        "streams.nii) (needed for ROI VVS only; --roi V1 checks the release without it)\n")
    assert subprocess.run([*check, str(nsd_root), "--roi", "V1"], cwd=REPO,
                          capture_output=True, timeout=120).returncode == 0
    design = nsd_root / nsd.EXPDESIGN
    proc = subprocess.run([*check, str(design)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith(
        f"error: --nsd-root {design}: a file, not a folder; accepted: the root folder"), \
        proc.stderr
    # Ctrl-C while the COCO annotations are read (a large file): one line, 130, no table
    big = coco / "instances_train2017.json"
    data = json.loads(big.read_text())
    data["images"] += [{"id": 10**7 + i} for i in range(300_000)]
    data["annotations"] += [{"id": 10**7 + i, "image_id": 10**7 + i, "category_id": 1,
                             "bbox": [1.0, 2.0, 3.0, 4.0]} for i in range(600_000)]
    big.write_text(json.dumps(data))
    out = tmp_path / "v1.parquet"
    proc = subprocess.Popen(
        [sys.executable, "-m", "references.nsd", "prepare", "--nsd-root", str(nsd_root),
         "--coco-annotations", str(coco), "--roi", "V1", "--out", str(out), "--no-progress"],
        cwd=REPO, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert (proc.returncode, err) == (130, "interrupted; nothing written\n"), err
    assert not out.exists() and not list(tmp_path.glob(".v1.parquet*"))
