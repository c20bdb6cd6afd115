"""What the trainable reads: item protocol (uint8 images), fixed NSD split, voxel lookup,
decoding a split into memory."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from references import imagenet, nsd
from references.datasets import (
    ImageFolderDataset,
    NSDDataset,
    VoxelResponses,
    imagefolder_bundle,
    nsd_split,
    simulated_nsd_bundle,
    simulated_single_label_bundle,
)
from references.simulated import generate_nsd_like, generate_single_label
from trainable.data import IMAGENET_MEAN, IMAGENET_STD, decode, normalize

SMALL_NSD = dict(image_size=32, n_images=100, n_subjects=2, n_categories=6,
                 trials_per_session=80, seed=1)


@pytest.fixture(scope="module")
def sim():
    return generate_nsd_like(**SMALL_NSD)


@pytest.fixture(scope="module")
def table(sim):
    return nsd.prepare_cached(sim.nsd_root, sim.coco_annotations, sim.subjects, "V1",
                              progress=False)


@pytest.fixture(scope="module")
def folder():
    return generate_single_label(image_size=32, n_categories=3, n_train_per_class=4,
                                 n_val_per_class=2, seed=2)


def test_the_simulated_world_is_seen_as_drawn_not_centre_cropped():
    """Its scenes are drawn at the size they are trained at: both splits read each image
    whole (resized where the sizes differ), where the ImageNet view (resize to 256/224 of
    the size, centre crop) upscaled a 64 px scene to 73 px and cut 4-5 px of each border."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    kw = dict(n_categories=3, n_train_per_class=4, n_val_per_class=2, seed=2)
    for size in (32, 16):
        bundle = simulated_single_label_bundle(image_size=size, render_size=32, **kw)
        for split in (bundle.train, bundle.val):
            img = split[1][0]
            with Image.open(split.index.path(1)) as f:
                drawn = TF.pil_to_tensor(f.convert("RGB"))
            if size == 32:
                assert torch.equal(img, drawn)
            else:  # torchvision's uint8 resize rounds within 1 of the float one
                want = TF.resize(drawn.float(), [size, size], antialias=True)
                assert float((img.float() - want).abs().max()) <= 1.0


def test_voxel_lookup_groups_mixed_subjects():
    y1 = torch.arange(3 * 4, dtype=torch.float32).view(3, 4)
    y3 = -torch.arange(2 * 2, dtype=torch.float32).view(2, 2) - 1
    vr = VoxelResponses({3: (torch.tensor([5, 7]), y3), 1: (torch.tensor([2, 5, 9]), y1)})
    assert vr.subjects == (1, 3) and vr.n_voxels == {1: 4, 3: 2}
    groups = vr.lookup(torch.tensor([7, 2, 100, 5]))
    assert len(groups) == 2
    (rows1, got1), (rows3, got3) = groups
    assert rows1.tolist() == [1, 3] and rows1.dtype == torch.int64
    assert torch.equal(got1, y1[[0, 1]])  # ids 2 and 5
    assert rows3.tolist() == [0, 3]
    assert torch.equal(got3, y3[[1, 0]])  # ids 7 and 5
    assert list(vr.groups(torch.tensor([9, 9]))) == [1]  # duplicates are fine
    assert vr.lookup(torch.tensor([100, 0, 6])) == []  # nobody saw these
    assert vr.lookup(torch.tensor([], dtype=torch.int64)) == []
    with pytest.raises(ValueError, match="strictly ascending"):
        VoxelResponses({1: (torch.tensor([3, 2]), torch.zeros(2, 1))})


def test_voxel_responses_from_table_match_rows(table):
    t = pq.read_table(table)
    vr = VoxelResponses.from_table(table, subjects=[2])
    assert vr.subjects == (2,) and vr.roi == "V1"
    rows = [r for r in t.to_pylist() if r["subject"] == 2]
    some = torch.tensor([rows[4]["nsd_id"], rows[0]["nsd_id"]])
    [(idx, y)] = vr.lookup(some)
    assert idx.tolist() == [0, 1]
    np.testing.assert_array_equal(y.numpy(), np.array([rows[4]["response"], rows[0]["response"]],
                                                      np.float32))
    with pytest.raises(ValueError, match=r"subjects \[5\] not in the table; available: \[1, 2\]"):
        VoxelResponses.from_table(table, subjects=[5])


def test_nsd_split_is_fixed_by_seed():
    ids = np.arange(0, 300, 3)
    train, test = nsd_split(ids, seed=0)
    again = nsd_split(ids[::-1].copy(), seed=0)  # order of the input does not matter
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    assert len(test) == 20 and len(train) == 80
    assert not set(train) & set(test) and set(train) | set(test) == set(ids)
    assert not np.array_equal(nsd_split(ids, seed=1)[1], test)
    with pytest.raises(ValueError, match=r"test_fraction=1\.5; accepted"):
        nsd_split(ids, seed=0, test_fraction=1.5)


def test_nsd_dataset_items_and_split(sim, table):
    train = NSDDataset(table, sim.stimuli, split="train", image_size=24, seed=0)
    test = NSDDataset(table, sim.stimuli, split="test", image_size=24, seed=0)
    ids = set(pq.read_table(table)["nsd_id"].to_pylist())
    assert not set(train.image_ids.tolist()) & set(test.image_ids.tolist())
    assert set(train.image_ids.tolist()) | set(test.image_ids.tolist()) == ids
    assert len(test) == round(0.2 * len(ids))
    again = NSDDataset(table, sim.stimuli, split="test", image_size=24, seed=0)
    assert torch.equal(again.image_ids, test.image_ids)
    other = NSDDataset(table, sim.stimuli, split="test", image_size=24, seed=1)
    assert not torch.equal(other.image_ids, test.image_ids)

    image, target, image_id = train[3]
    assert image.shape == (3, 24, 24) and image.dtype == torch.uint8
    assert target.shape == (80,) and target.dtype == torch.float32
    assert set(target.unique().tolist()) <= {0.0, 1.0} and 1 <= target.sum() <= 3
    assert image_id.dtype == torch.int64 and image_id.ndim == 0
    row = next(r for r in pq.read_table(table).to_pylist() if r["nsd_id"] == int(image_id))
    assert target.tolist() == [float(v) for v in row["labels"]]
    # Every image has a response from a subject who saw it, and subject_mask agrees.
    responses = VoxelResponses.from_table(table)
    assert train.subjects == responses.subjects
    for i in range(len(train)):
        saw = [s for s in responses.subjects
               if int(train.image_ids[i]) in set(responses.image_ids(s).tolist())]
        assert saw and train.subject_mask[i].tolist() == [s in saw for s in responses.subjects]


def test_nsd_decode_matches_items_and_survives_pickling(sim, table):
    ds = NSDDataset(table, sim.stimuli, split="test", image_size=20, seed=0, subjects=[1])
    assert ds.subjects == (1,)
    ts = decode(ds, batch=7)
    assert ts.images.dtype == torch.uint8 and ts.images.shape == (len(ds), 3, 20, 20)
    assert ts.nbytes == len(ds) * (3 * 20 * 20 + 80 * 4 + 8)
    blob = pickle.dumps(ds)  # what a DataLoader worker or the object store receives
    assert len(blob) < 50_000 + len(ds) * 80 * 4 * 2, len(blob)  # ids and labels, no images
    clone = pickle.loads(blob)
    for i in (0, len(ds) - 1):
        image, target, image_id = clone[i]
        assert torch.equal(ts.images[i], image)
        assert torch.equal(ts.targets[i], target) and ts.image_ids[i] == image_id


def test_normalize_uses_imagenet_statistics():
    white = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = normalize(white)
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out[1, :, 2, 2], expected)


def test_imagefolder_items_and_tensors(folder):
    val = ImageFolderDataset(folder, split="val", image_size=24)
    assert len(val) == 6 and val.classes[0].startswith("00_")
    image, target, image_id = val[3]
    assert image.shape == (3, 24, 24) and image.dtype == torch.uint8
    assert target.dtype == torch.int64 and target.ndim == 0 and int(target) == 1
    assert image_id.dtype == torch.int64 and int(image_id) == 3
    ts = decode(val, workers=1)
    assert ts.images.shape == (6, 3, 24, 24) and ts.images.dtype == torch.uint8
    assert ts.targets.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(ts.images[3], image)

    train = ImageFolderDataset(folder, split="train", image_size=24)
    torch.manual_seed(0)
    a = train[0][0]
    torch.manual_seed(0)
    assert torch.equal(a, train[0][0])  # augmentation is reproducible given the torch seed
    assert not torch.equal(a, train[0][0])  # ... and does augment


def test_bundles(folder):
    single = imagefolder_bundle(folder, image_size=16)
    assert single.task == "single_label" and single.num_classes == 3
    assert single.responses is None and single.augment == "crop_flip"
    assert single.train.augment == "crop_flip" and single.val.augment == "none"
    multi = simulated_nsd_bundle(roi="VVS", image_size=16, render_size=32,
                                 **{k: v for k, v in SMALL_NSD.items() if k != "image_size"})
    assert multi.task == "multi_label" and multi.num_classes == 80
    assert multi.augment == "none" and not hasattr(multi.train, "responses")
    assert multi.responses.roi == "VVS" and multi.responses.subjects == (1, 2)
    assert not set(multi.train.image_ids.tolist()) & set(multi.val.image_ids.tolist())


def test_dataset_errors(tmp_path, sim, table):
    with pytest.raises(imagenet.ImageNetFormatError, match="missing folder"):
        ImageFolderDataset(tmp_path, split="train", image_size=32)
    with pytest.raises(ValueError, match=r"split='valid'; accepted: train, val"):
        ImageFolderDataset(tmp_path, split="valid", image_size=32)
    with pytest.raises(ValueError, match=r"split='val'; accepted: train, test"):
        NSDDataset(table, sim.stimuli, split="val")
    with pytest.raises(nsd.NSDFormatError, match=r"missing file .*nope\.parquet"):
        NSDDataset(tmp_path / "nope.parquet", sim.stimuli)
    with pytest.raises(nsd.NSDFormatError, match=r"missing file .*nope\.hdf5"):
        NSDDataset(table, tmp_path / "nope.hdf5")


def test_prepared_table_carries_the_release_ncsnr_and_its_noise_ceilings(sim, table):
    """The simulated release writes each subject's true ncsnr as ncsnr.nii.gz, as NSD does;
    prepare keeps the ROI's voxels and VoxelResponses turns them into noise ceilings for a set
    of images (subject 1 saw every image the full number of times: the true ceilings)."""
    responses = VoxelResponses.from_table(table)
    assert set(responses.ncsnr) == set(sim.subjects)
    ids = responses.image_ids(1)
    assert bool((responses.repeats[1] == responses.repeats[1][0]).all())
    got = responses.noise_ceilings(1, ids).numpy()
    np.testing.assert_allclose(got, sim.true_noise_ceilings[1]["V1"], rtol=1e-4)
    # and the ceilings measured from the written betas agree with the truth on average
    assert abs(got.mean() - sim.noise_ceilings[1]["V1"].mean()) < 0.1
    assert responses.noise_ceilings(1, torch.tensor([10**6])) is None  # nobody saw it
    # every subject's stated true ceilings are those of the responses it has: a subject with
    # fewer sessions saw some images fewer times (they assumed the full number)
    for s in sim.subjects:
        ids = responses.image_ids(s)
        np.testing.assert_allclose(responses.noise_ceilings(s, ids).numpy(),
                                   sim.true_noise_ceilings[s]["V1"], rtol=1e-4)
    assert bool((responses.repeats[2] < responses.repeats[1].max()).any())
