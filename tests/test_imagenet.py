"""ImageNet indexing: both on-disk layouts agree with torchvision's own readers, the index is
compact and pickles without per-sample objects, and every malformed tree gets a one-line
ImageNetFormatError naming the path."""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torchvision
import torchvision.datasets.imagenet as tv_imagenet
from imagenet_tree import DEVKIT_ARCHIVE, LAYOUTS, tree_truth, val_name, write_imagenet_tree
from PIL import Image

from references.imagenet import (
    IMAGE_EXTENSIONS,
    ImageIndex,
    ImageNetFormatError,
    describe,
    index_imagenet,
    index_split,
)

SIZES = ((500, 375), (375, 500), (320, 240))
SPLITS = ("train", "val")
SMALL = ((32, 24),)  # error cases only need files that exist


@pytest.fixture(scope="module", params=LAYOUTS)
def layout(request):
    return request.param


@pytest.fixture(scope="module")
def tree(layout, tmp_path_factory):
    return write_imagenet_tree(tmp_path_factory.mktemp(layout) / "imagenet", layout=layout,
                               sizes=SIZES)


@pytest.fixture(scope="module")
def indices(tree):
    return index_imagenet(tree)


def _relpaths(index: ImageIndex) -> list[str]:
    return [os.path.relpath(index.path(i), index.root) for i in range(len(index))]


def _torchvision_reading(tree: Path, layout: str, split: str, scratch: Path):
    """(classes, class_names, [(path relative to the split folder, target)]) as torchvision
    reads the split: ImageFolder without a devkit; else torchvision.datasets.ImageNet end to
    end (parse_devkit_archive, and for a flat val parse_val_archive from a val tar), in a
    scratch root because torchvision writes meta.bin and sorts val in place."""
    if layout == "imagefolder":
        ds = torchvision.datasets.ImageFolder(tree / split)
        return ds.classes, ds.classes, [(os.path.relpath(p, tree / split), t)
                                        for p, t in ds.samples]
    scratch.mkdir()
    shutil.copy(tree / DEVKIT_ARCHIVE, scratch / DEVKIT_ARCHIVE)
    if layout == "torchvision_flat_val" and split == "val":
        with tarfile.open(scratch / tv_imagenet.ARCHIVE_META["val"][0], "w") as tar:
            for f in sorted((tree / "val").iterdir()):
                tar.add(f, arcname=f.name)
    else:
        os.symlink(tree / split, scratch / split)
    with pytest.MonkeyPatch.context() as mp:
        # The md5 check only accepts the official archives; everything after it is real.
        mp.setattr(tv_imagenet, "_verify_archive", lambda *args, **kwargs: None)
        ds = torchvision.datasets.ImageNet(scratch, split=split)
    return (ds.wnids, [synonyms[0] for synonyms in ds.classes],
            [(os.path.relpath(p, scratch / split), t) for p, t in ds.samples])


# --------------------------------------------------------------------------------------------
# Agreement with torchvision and with what the tree builder wrote


@pytest.mark.parametrize("split", ["train", "val"])
def test_index_matches_torchvision(tree, layout, indices, split, tmp_path):
    index = indices[SPLITS.index(split)]
    classes, names, samples = _torchvision_reading(tree, layout, split, tmp_path / "tv")
    assert index.classes == tuple(classes)
    assert index.class_names == tuple(names)
    ours = _relpaths(index)
    if layout == "torchvision_flat_val" and split == "val":
        # Same order and labels as the tree torchvision sorts it into, minus the wnid folder.
        samples = [(os.path.basename(p), t) for p, t in samples]
        assert all(os.sep not in p for p in ours)
    assert list(zip(ours, index.targets.tolist())) == samples
    assert [index.target(i) for i in range(len(index))] == index.targets.tolist()
    assert index.root == str(tree / split)


def test_labels_and_names_match_the_written_tree(tree, layout, indices):
    """Independent of torchvision: the builder's own record of what it wrote."""
    truth = tree_truth()
    train, val = indices
    assert train.classes == val.classes == truth.wnids
    expected_names = truth.wnids if layout == "imagefolder" else ("thing 0", "thing 1", "thing 2")
    assert train.class_names == val.class_names == expected_names
    assert len(train) == 3 * 4 and len(val) == 3 * 2
    assert {os.path.basename(val.path(i)): val.classes[val.target(i)]
            for i in range(len(val))} == truth.val_labels
    # The val labels are shuffled, so file order alone cannot produce them.
    assert [truth.val_labels[val_name(j)] for j in range(6)] != sorted(truth.val_labels.values())


def test_every_path_opens_as_a_jpeg(indices):
    seen = set()
    for index in indices:
        for i in range(len(index)):
            with Image.open(index.path(i)) as img:
                assert img.format == "JPEG"
                img.load()
                seen.add(img.size)
    assert seen == set(SIZES)


def test_index_split_equals_index_imagenet(tree, indices):
    assert (index_split(tree, "train"), index_split(str(tree), "val")) == indices


def test_describe(tree, layout):
    assert describe(tree) == {
        "imagefolder": "ImageFolder layout",
        "torchvision": f"torchvision ImageNet layout ({DEVKIT_ARCHIVE}, sorted val)",
        "torchvision_flat_val": f"torchvision ImageNet layout ({DEVKIT_ARCHIVE}, flat val)",
    }[layout]



# --------------------------------------------------------------------------------------------
# Compact storage


def test_pickle_round_trip_keeps_everything(indices):
    for index in indices:
        back = pickle.loads(pickle.dumps(index))
        assert back == index
        assert back is not index
        assert (back.root, back.classes, back.class_names) == (index.root, index.classes,
                                                                index.class_names)
        assert [back.path(i) for i in range(len(back))] == [index.path(i)
                                                             for i in range(len(index))]
        np.testing.assert_array_equal(back.targets, index.targets)
        assert back.targets.dtype == np.int64


def _empty_file_tree(root: Path, n_classes: int, per_class: int) -> Path:
    """A train split of empty .JPEG files: indexing never opens images."""
    for c in range(n_classes):
        folder = root / "train" / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            os.close(os.open(folder / f"n{c:08d}_{i:05d}.JPEG", os.O_CREAT | os.O_WRONLY))
    return root


def _opcodes(data: bytes) -> int:
    """Pickle instructions, less the FRAME markers protocol 4+ adds every 64 KiB."""
    return sum(1 for op, _, _ in pickletools.genops(data) if op.name != "FRAME")


def test_pickle_is_small_and_has_no_per_sample_objects(tmp_path):
    small = index_split(_empty_file_tree(tmp_path / "s", 10, 10), "train")
    large = index_split(_empty_file_tree(tmp_path / "l", 10, 100), "train")
    data = pickle.dumps(large)
    path_bytes = sum(len(os.fsencode(os.path.relpath(large.path(i), large.root)))
                     for i in range(len(large)))
    assert large.nbytes == path_bytes + 16 * len(large) + 8
    # Paths blob + 16 B per sample of offsets/targets + a fixed header, nothing per sample:
    # within 2x the path bytes (30 B paths here), and well under ImageFolder's samples list.
    assert len(data) < large.nbytes + 2048
    assert len(data) < 2 * path_bytes
    assert len(data) < 0.75 * len(pickle.dumps(torchvision.datasets.ImageFolder(
        tmp_path / "l" / "train").samples))
    # 10x the samples, the same pickle program: no object is pickled per sample.
    assert _opcodes(data) == _opcodes(pickle.dumps(small))


def test_targets_are_read_only(indices):
    with pytest.raises(ValueError, match="read-only"):
        indices[0].targets[0] = 1


@pytest.mark.parametrize("bad, match", [
    (dict(_offsets=np.array([0, 3, 5], np.int64)), r"_offsets must rise strictly from 0"),
    (dict(_offsets=np.array([0, 3, 6], np.int32)), r"_offsets must be an int64 array"),
    (dict(_targets=np.array([0, 2], np.int64)), r"_targets must lie in 0\.\.1"),
    (dict(class_names=("a",)), r"1 class_names for 2 classes"),
])
def test_index_construction_is_checked(bad, match):
    fields = dict(root="/r", classes=("a", "b"), class_names=("a", "b"), _paths=b"a/1b/2",
                  _offsets=np.array([0, 3, 6], np.int64), _targets=np.array([0, 1], np.int64))
    assert len(ImageIndex(**fields)) == 2
    with pytest.raises(ValueError, match=match):
        ImageIndex(**{**fields, **bad})


# --------------------------------------------------------------------------------------------
# Walk order and file selection, on the cases where a naive sort would differ from ImageFolder


def test_walk_order_and_extensions_match_imagefolder(tmp_path):
    root = tmp_path / "nested"
    files = ["a/z.JPEG", "a/b/x.jpg", "a/b-c/y.PNG", "a/b/deeper/w.Jpeg", "a/B/v.webp",
             "a/notes.txt", "a/b/README", "a/é/u.jpeg", "b/only.tif", "b/x.TIFF",
             "c/sub/i.bmp"]
    for f in files:
        (root / "train" / f).parent.mkdir(parents=True, exist_ok=True)
        (root / "train" / f).touch()
    (root / "outside").mkdir()
    (root / "outside" / "linked.jpg").touch()
    os.symlink(root / "outside", root / "train" / "c" / "link")  # followlinks=True
    index = index_split(root, "train")
    ds = torchvision.datasets.ImageFolder(root / "train")
    assert [(index.path(i), index.target(i)) for i in range(len(index))] == ds.samples
    assert len(index) == 10  # the .txt and README are not images
    # make_dataset's order: folders by sorted path, then names; a plain sort of the relative
    # paths would put a/z.JPEG last and a/b/deeper/ before a/b-c/.
    assert _relpaths(index)[:6] == ["a/z.JPEG", "a/B/v.webp", "a/b/x.jpg", "a/b-c/y.PNG",
                                    "a/b/deeper/w.Jpeg", "a/é/u.jpeg"]
    assert IMAGE_EXTENSIONS == torchvision.datasets.folder.IMG_EXTENSIONS


# --------------------------------------------------------------------------------------------
# torchvision's meta.bin, and nothing written under the root


def test_meta_bin_alone_gives_the_same_index(tmp_path):
    tree = write_imagenet_tree(tmp_path / "t", layout="torchvision_flat_val", sizes=SMALL)
    from_devkit = index_imagenet(tree)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tv_imagenet, "_verify_archive", lambda *args, **kwargs: None)
        tv_imagenet.parse_devkit_archive(str(tree))  # torchvision writes root/meta.bin
    (tree / DEVKIT_ARCHIVE).unlink()
    assert describe(tree) == "torchvision ImageNet layout (meta.bin, flat val)"
    assert index_imagenet(tree) == from_devkit


def test_indexing_writes_nothing(tmp_path, monkeypatch):
    tree = write_imagenet_tree(tmp_path / "t", layout="torchvision_flat_val", sizes=SMALL)
    before = {p: p.stat().st_mtime_ns for p in tree.rglob("*")}
    made = []

    class Recording(tempfile.TemporaryDirectory):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(Path(self.name))

    monkeypatch.setattr(tempfile, "TemporaryDirectory", Recording)
    index_imagenet(tree)
    describe(tree)
    assert {p: p.stat().st_mtime_ns for p in tree.rglob("*")} == before
    assert made and not any(tree in p.parents for p in made)  # the devkit went elsewhere
    assert not any(p.exists() for p in made)  # and is removed


# --------------------------------------------------------------------------------------------
# Malformed trees


MALFORMED = {}


def malformed(layout: str):
    """Register a malformation of a fresh ``layout`` tree: fn(tree) mutates it and returns the
    literal fragments the message must contain, in order."""
    def register(fn):
        MALFORMED[fn.__name__] = (layout, fn)
        return fn
    return register


def _hide_images(folder: Path) -> None:
    for f in folder.glob("*.JPEG"):
        f.rename(f.with_suffix(".txt"))


def _write_devkit(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"ILSVRC2012_devkit_t12/data/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@malformed("imagefolder")
def missing_train(t):
    shutil.rmtree(t / "train")
    return [f"missing folder {t / 'train'}; expected {t} to hold train/ and val/"]


@malformed("torchvision")
def missing_val(t):
    shutil.rmtree(t / "val")
    return [f"missing folder {t / 'val'}; expected {t} to hold train/ and val/ (ImageFolder "
            f"layout, or torchvision's with {DEVKIT_ARCHIVE} or meta.bin beside them)"]


@malformed("imagefolder")
def split_with_only_non_images(t):
    for folder in (t / "train").iterdir():
        _hide_images(folder)
    return [f"{t / 'train'} holds no image files in 3 class folders; expected "
            "train/<class>/<images> (accepted image extensions: .jpg, .jpeg, .png"]


@malformed("imagefolder")
def split_without_class_folders(t):
    for folder in (t / "val").iterdir():
        shutil.rmtree(folder)
    return [f"{t / 'val'} holds no image files in 0 class folders; expected val/<class>/"]


@malformed("torchvision")
def empty_train_class(t):
    _hide_images(t / "train" / "n00000001")
    return [f"class folder {t / 'train' / 'n00000001'} holds no image files; expected at least "
            "one image per class"]


@malformed("imagefolder")
def val_classes_differ(t):
    (t / "val" / "n00000001").rename(t / "val" / "n00000042")
    return [f"val classes differ from train classes: 1 of 3 train classes missing from "
            f"{t / 'val'} (n00000001), 1 of 3 val classes missing from {t / 'train'} "
            "(n00000042); expected the same classes in both"]


@malformed("torchvision_flat_val")
def flat_val_without_devkit(t):
    (t / DEVKIT_ARCHIVE).unlink()
    return [f"{t / 'val'} is flat (6 images, no class folders) and {t} has no devkit; expected "
            f"{t / DEVKIT_ARCHIVE} (or torchvision's meta.bin) to label them"]


@malformed("torchvision_flat_val")
def ground_truth_count(t):
    (t / "val" / val_name(5)).unlink()
    return [f"{t / DEVKIT_ARCHIVE} has ground truth for 6 val images but {t / 'val'} holds 5; "
            "expected one label per image"]


@malformed("torchvision")
def corrupt_devkit(t):
    (t / DEVKIT_ARCHIVE).write_bytes(b"<html>404 Not Found</html>" * 40)
    return [f"cannot read devkit archive {t / DEVKIT_ARCHIVE} (ReadError", "); expected the "
            f"official {DEVKIT_ARCHIVE}"]


@malformed("torchvision_flat_val")
def truncated_devkit(t):
    (t / DEVKIT_ARCHIVE).write_bytes((t / DEVKIT_ARCHIVE).read_bytes()[:300])
    return [f"cannot read devkit archive {t / DEVKIT_ARCHIVE} (", "); expected the official"]


@malformed("torchvision")
def devkit_without_meta_mat(t):
    _write_devkit(t / DEVKIT_ARCHIVE, {"ILSVRC2012_validation_ground_truth.txt": b"1\n"})
    return [f"devkit archive {t / DEVKIT_ARCHIVE} lacks ILSVRC2012_devkit_t12/data/meta.mat; "
            f"expected the official {DEVKIT_ARCHIVE}"]


@malformed("torchvision")
def unparsable_meta_mat(t):
    _write_devkit(t / DEVKIT_ARCHIVE, {"meta.mat": b"not a mat file",
                                       "ILSVRC2012_validation_ground_truth.txt": b"1\n"})
    return [f"cannot read devkit archive {t / DEVKIT_ARCHIVE} (", "); expected the official"]


@malformed("torchvision_flat_val")
def ground_truth_of_unknown_synset(t):
    archive = t / DEVKIT_ARCHIVE
    with tarfile.open(archive) as tar:
        meta_mat = tar.extractfile("ILSVRC2012_devkit_t12/data/meta.mat").read()
    # ID 4 is the non-leaf synset: not a class.
    _write_devkit(archive, {"meta.mat": meta_mat,
                            "ILSVRC2012_validation_ground_truth.txt": b"1\n2\n3\n4\n1\n2\n"})
    return [f"devkit archive {archive}: ground truth uses 1 ILSVRC2012_IDs that are not leaf "
            "synsets of data/meta.mat (4); expected ids of the 3 leaf synsets"]


@malformed("torchvision_flat_val")
def corrupt_meta_bin(t):
    (t / "meta.bin").write_bytes(b"garbage")
    return [f"cannot read {t / 'meta.bin'} (", "); expected torchvision's meta.bin"]


@malformed("torchvision")
def train_wnid_not_in_devkit(t):
    for split in ("train", "val"):
        (t / split / "n00000077").mkdir()
        shutil.copy(next((t / split / "n00000000").iterdir()), t / split / "n00000077" / "a.JPEG")
    return [f"1 class folders of {t / 'train'} are not leaf synsets of {t / DEVKIT_ARCHIVE} "
            "(n00000077); expected wnids of its 3 classes"]


@malformed("torchvision")
def half_sorted_val(t):
    name = val_name(0)
    next((t / "val").glob(f"*/{name}")).rename(t / "val" / name)
    return [f"{t / 'val'} holds both 3 class folders and 1 images directly in it"]


@malformed("imagefolder")
def images_directly_in_train(t):
    shutil.copy(next((t / "train" / "n00000000").iterdir()), t / "train" / "x.JPEG")
    return [f"{t / 'train'} holds 1 images directly in it; expected train/<class>/<images>"]


@malformed("imagefolder")
def symlink_loop(t):
    os.symlink(t / "train" / "n00000001", t / "train" / "n00000001" / "again")
    return [f"symlink loop at {t / 'train' / 'n00000001' / 'again'}; expected class folders"]


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_tree_is_named_in_one_line(case, tmp_path):
    layout, mutate = MALFORMED[case]
    tree = write_imagenet_tree(tmp_path / "imagenet", layout=layout, sizes=SMALL)
    index_imagenet(tree)  # well-formed before the mutation
    fragments = mutate(tree)
    with pytest.raises(ImageNetFormatError, match=".*".join(map(re.escape, fragments))) as err:
        index_imagenet(tree)
    assert "\n" not in str(err.value)
    assert str(tree) in str(err.value)


@pytest.mark.parametrize("make", ["missing", "file"])
def test_bad_root(make, tmp_path):
    root = tmp_path / "imagenet"
    if make == "file":
        root.write_text("")
    expected = "does not exist" if make == "missing" else "is not a directory"
    for call in (index_imagenet, lambda r: index_split(r, "train"), describe):
        with pytest.raises(ImageNetFormatError,
                           match=f"ImageNet root {re.escape(str(root))} {expected}; expected a "
                                 "folder with train/ and val/"):
            call(root)


def test_unknown_split_is_a_value_error(tree):
    with pytest.raises(ValueError, match=r"split='test'; accepted: train, val"):
        index_split(tree, "test")
