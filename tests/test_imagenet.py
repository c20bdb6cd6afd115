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
import struct
import tarfile
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.utils.data
import torchvision
import torchvision.datasets.imagenet as tv_imagenet
from imagenet_tree import DEVKIT_ARCHIVE, LAYOUTS, tree_truth, val_name, write_imagenet_tree
from PIL import Image

from references.datasets import ImageFolderDataset, imagefolder_bundle, imagenet_index
from references.imagenet import (
    IMAGE_EXTENSIONS,
    ImageIndex,
    ImageNetFormatError,
    describe,
    index_imagenet,
    index_split,
    read_rgb,
    skipped_note,
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


def test_an_extracted_devkit_folder_gives_the_same_index(tmp_path):
    """The devkit kept extracted (ILSVRC2012_devkit_t12/ beside train/ and val/) was reported
    as no devkit at all."""
    tree = write_imagenet_tree(tmp_path / "t", layout="torchvision_flat_val", sizes=SMALL)
    from_archive = index_imagenet(tree)
    with tarfile.open(tree / DEVKIT_ARCHIVE) as tar:
        tar.extractall(tree, filter="data")
    (tree / DEVKIT_ARCHIVE).unlink()
    assert describe(tree) == "torchvision ImageNet layout (ILSVRC2012_devkit_t12, flat val)"
    assert index_imagenet(tree) == from_archive
    (tree / "ILSVRC2012_devkit_t12" / "data" / "ILSVRC2012_validation_ground_truth.txt").unlink()
    with pytest.raises(ImageNetFormatError, match=r"cannot read devkit folder .*"
                                                  r"ILSVRC2012_devkit_t12 \(.*\); expected the "
                                                  r"official .* or the folder it extracts to"):
        index_imagenet(tree)


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
            f"{t / DEVKIT_ARCHIVE} (or torchvision's meta.bin, or Kaggle's LOC_val_solution.csv) "
            "to label them"]


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


def test_empty_root_is_refused_not_read_as_the_working_folder(tmp_path, monkeypatch):
    # A working folder that is itself an ImageNet tree: "" must not silently become it.
    monkeypatch.chdir(write_imagenet_tree(tmp_path / "cwd", sizes=SMALL))
    for call in (index_imagenet, lambda r: index_split(r, "train"), describe,
                 lambda r: ImageFolderDataset(r, split="val")):
        with pytest.raises(ImageNetFormatError, match="ImageNet root '' is empty; expected the "
                                                      "path of a folder with train/ and val/"):
            call("")


# --------------------------------------------------------------------------------------------
# Entries a lab's tree carries besides the images: hidden files and folders, symbolic links


def _apple_double(path: Path) -> None:
    """The '._NAME' resource-fork file a copy from macOS leaves beside NAME (AppleDouble v2
    header, no image data)."""
    path.write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00" + b"Mac OS X        " + b"\x00\x02"
                     + bytes(4070))


def _hidden_folders(t: Path) -> None:
    for split in SPLITS:  # empty, beside the classes (flat val: beside the images)
        (t / split / ".ipynb_checkpoints").mkdir()


def _hidden_folder_with_image(t: Path) -> None:
    (t / "train" / ".trash").mkdir()  # would be a class sorting first, and not in val
    shutil.copy(next((t / "train" / "n00000000").iterdir()), t / "train" / ".trash" / "a.JPEG")


def _hidden_subfolder_of_a_class(t: Path) -> None:
    (t / "train" / "n00000002" / ".thumbs").mkdir()
    shutil.copy(next((t / "train" / "n00000000").iterdir()),
                t / "train" / "n00000002" / ".thumbs" / "a.JPEG")


def _apple_double_files(t: Path) -> None:
    for f in [*(t / "train").glob("*/*.JPEG"), *(t / "val").rglob("*.JPEG")]:
        _apple_double(f.with_name("._" + f.name))
    for split in SPLITS:
        (t / split / ".DS_Store").write_bytes(bytes(64))


def _hidden_broken_link(t: Path) -> None:
    os.symlink(t / "gone.JPEG", t / "train" / "n00000001" / ".n00000001_9.JPEG")


HIDDEN = [_hidden_folders, _hidden_folder_with_image, _hidden_subfolder_of_a_class,
          _apple_double_files, _hidden_broken_link]


@pytest.mark.parametrize("hide", HIDDEN, ids=lambda f: f.__name__.lstrip("_"))
def test_hidden_entries_are_skipped_at_every_level(hide, layout, tmp_path):
    tree = write_imagenet_tree(tmp_path / "imagenet", layout=layout, sizes=SMALL)
    expected = index_imagenet(tree), describe(tree)
    hide(tree)
    assert index_imagenet(tree) == expected[0]
    assert describe(tree) == expected[1]


def test_files_that_are_not_images_are_left_out_and_counted(layout, tmp_path):
    """As torchvision's ImageFolder, files whose extension it does not read are no samples;
    unlike it, the index says how many there were and names one (hidden ones not counted,
    nor files beside the class folders, which are no class's)."""
    tree = write_imagenet_tree(tmp_path / "imagenet", layout=layout, sizes=SMALL)
    expected = index_imagenet(tree)
    assert [i.skipped for i in expected] == [0, 0] and skipped_note(*expected) == ""
    (tree / "train" / "n00000001" / ".DS_Store").write_bytes(bytes(64))  # hidden: uncounted
    (tree / "train" / "n00000001" / "n00000001_7.heic").write_bytes(b"x")
    (tree / "train" / "n00000002" / "sub").mkdir()
    (tree / "train" / "n00000002" / "sub" / "notes.txt").write_text("x")
    (tree / "train" / "README").write_text("beside the classes: no class's file")
    val_dir = (tree / "val" / "n00000000") if layout != "torchvision_flat_val" else tree / "val"
    (val_dir / "labels.json").write_text("{}")
    train, val = index_imagenet(tree)
    assert (train, val) == expected  # the samples are the same
    assert (train.skipped, val.skipped) == (2, 1)
    assert train.skipped_example == os.path.join("n00000001", "n00000001_7.heic")
    note = skipped_note(train, val)
    assert note.startswith(f"; 3 other files skipped, as torchvision skips them (e.g. "
                           f"{tree / 'train' / 'n00000001' / 'n00000001_7.heic'}; accepted "
                           f"image extensions: ")
    assert skipped_note(val) == (f"; 1 other file skipped, as torchvision skips them (e.g. "
                                 f"{val_dir / 'labels.json'}; accepted image extensions: "
                                 f"{', '.join(IMAGE_EXTENSIONS)}, any case)")
    # torchvision's own ImageFolder makes the same samples of the sorted splits
    if layout == "imagefolder":
        assert len(torchvision.datasets.ImageFolder(tree / "train")) == len(train)


def test_broken_image_link_is_refused_and_other_links_are_followed(tmp_path):
    tree = write_imagenet_tree(tmp_path / "imagenet", sizes=SMALL)
    expected = index_imagenet(tree)
    kept = tree / "train" / "n00000001" / "n00000001_2.JPEG"
    (tmp_path / "store").mkdir()
    kept.rename(tmp_path / "store" / kept.name)
    os.symlink(tmp_path / "store" / kept.name, kept)  # a link to an image is that image
    os.symlink(tmp_path / "gone.txt", tree / "train" / "n00000001" / "notes.txt")  # not an image
    assert index_imagenet(tree) == expected
    link = tree / "train" / "n00000001" / "n00000001_9.JPEG"
    os.symlink(tmp_path / "gone" / "x.JPEG", link)
    with pytest.raises(ImageNetFormatError, match=re.escape(
            f"broken symbolic link {link} -> {tmp_path / 'gone' / 'x.JPEG'} (No such file or "
            "directory); expected images and folders, or links to existing ones -- fix or "
            "remove the link")) as err:
        index_imagenet(tree)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("splits", [("train", "val"), ("train",)])
def test_a_dangling_link_to_a_class_folder_is_refused_not_left_out(tmp_path, splits):
    """A subset (ImageNet-100 style) linking class folders from the full tree, one link
    mistyped or its target not mounted: the class was left out of both splits without a word,
    or, broken in train alone, val's class was reported missing from a train/ that shows it."""
    full = write_imagenet_tree(tmp_path / "full", n_classes=4, sizes=SMALL)
    subset = tmp_path / "subset"
    for split in ("train", "val"):
        (subset / split).mkdir(parents=True)
        for wnid in ("n00000000", "n00000001", "n00000002"):
            typo = wnid.replace("00002", "OOO02") if split in splits else wnid
            (subset / split / wnid).symlink_to(full / split / typo)
    link = subset / "train" / "n00000002"
    with pytest.raises(ImageNetFormatError, match=re.escape(
            f"broken symbolic link {link} -> {full / 'train' / 'n000OOO02'} (No such file or "
            "directory); expected images and folders, or links to existing ones")) as err:
        index_imagenet(subset)
    assert "\n" not in str(err.value)
    (subset / "train" / "n00000002").unlink()
    (subset / "train" / "n00000002").symlink_to(full / "train" / "n00000002")
    if splits == ("train",):
        assert index_imagenet(subset)[0].classes == ("n00000000", "n00000001", "n00000002")


def test_a_nas_s_thumbnail_folders_and_a_zip_s_macos_folder_are_not_data(tmp_path):
    """A Synology NAS keeps thumbnails in @eaDir folders (<image>.JPEG/SYNOFILE_THUMB_M.jpg):
    they were read as a class of their own and as images of every class; a zip made on macOS
    extracts __MACOSX/ beside the data, which was read as a class."""
    tree = write_imagenet_tree(tmp_path / "imagenet", sizes=SMALL)
    expected = index_imagenet(tree)
    for split in ("train", "val"):
        for cls in [tree / split, *sorted((tree / split).iterdir())]:
            for image in sorted(cls.glob("*.JPEG"))[:2]:
                thumbs = cls / "@eaDir" / image.name
                thumbs.mkdir(parents=True)
                shutil.copyfile(image, thumbs / "SYNOFILE_THUMB_M.jpg")
        macos = tree / split / "__MACOSX" / "n00000000"
        macos.mkdir(parents=True)
        (macos / "._n00000000_0.JPEG").write_bytes(b"\x00\x05\x16\x07")
        shutil.copyfile(next((tree / split / "n00000000").glob("*.JPEG")), macos / "x.JPEG")
    assert index_imagenet(tree) == expected
    assert [i.skipped for i in index_imagenet(tree)] == [0, 0]


def _tar_of(folder: Path, archive: Path) -> None:
    with tarfile.open(archive, "w") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)


def test_the_official_archives_not_yet_extracted_are_named(tmp_path):
    """The download as it comes (ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar), val's
    archive left unextracted in val/, and val extracted into a folder of the archive's name:
    refused as a missing train/, "no image files in 0 class folders" and "class folders ...
    are not leaf synsets (ILSVRC2012_img_val)", without a word on the archives."""
    tree = write_imagenet_tree(tmp_path / "t", layout="torchvision_flat_val", sizes=SMALL)
    download = tmp_path / "download"
    download.mkdir()
    for split in ("train", "val"):
        _tar_of(tree / split, download / f"ILSVRC2012_img_{split}.tar")
    shutil.copy(tree / DEVKIT_ARCHIVE, download)
    with pytest.raises(ImageNetFormatError, match=re.escape(
            f"missing folder {download / 'train'}; expected {download} to hold train/ and val/ "
            f"-- extract ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar there first")):
        index_imagenet(download)

    val = tree / "val"
    packed = download / "ILSVRC2012_img_val.tar"
    shutil.rmtree(val)
    val.mkdir()
    shutil.copy(packed, val)
    with pytest.raises(ImageNetFormatError, match=re.escape(
            f"{val} holds no image files in 0 class folders; expected val/<class>/<images> (")
            + r".* -- it holds ILSVRC2012_img_val\.tar: extract it there$"):
        index_imagenet(tree)
    (val / packed.name).unlink()
    deep = val / "ILSVRC2012_img_val"
    deep.mkdir()
    with tarfile.open(packed) as tar:
        tar.extractall(deep, filter="data")
    with pytest.raises(ImageNetFormatError, match=re.escape(
            f"{val} holds only ILSVRC2012_img_val/: the archive extracted into a folder of its "
            f"name, one level too deep; expected val/<class>/<images> (or a flat val) -- move "
            f"its contents up into {val}")) as err:
        index_imagenet(tree)
    assert "\n" not in str(err.value)


def test_a_devkit_saved_as_matlab_v7_3_is_one_line(tmp_path):
    """A meta.mat re-saved as MATLAB v7.3 (HDF5): scipy raises NotImplementedError, which went
    through as an unexpected error (exit 1, a traceback file)."""
    import h5py

    tree = write_imagenet_tree(tmp_path / "t", layout="torchvision_flat_val", sizes=SMALL)
    with tarfile.open(tree / DEVKIT_ARCHIVE) as tar:
        tar.extractall(tree, filter="data")
    (tree / DEVKIT_ARCHIVE).unlink()
    meta = tree / "ILSVRC2012_devkit_t12" / "data" / "meta.mat"
    meta.unlink()
    with h5py.File(meta, "w", userblock_size=512) as f:  # as MATLAB writes v7.3
        f["synsets"] = np.zeros(3)
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, HDF5 schema 1.00 .".ljust(116)
    with open(meta, "r+b") as fh:
        fh.write(header + b"\x00" * 8 + b"\x00\x02IM")
    with pytest.raises(ImageNetFormatError, match=re.escape(
            f"cannot read devkit folder {tree / 'ILSVRC2012_devkit_t12'} (NotImplementedError: "
            "Please use HDF reader for matlab v7.3 files")) as err:
        index_imagenet(tree)
    assert "\n" not in str(err.value)


@malformed("imagefolder")
def link_loop_in_a_class(t):
    os.symlink("again", t / "train" / "n00000001" / "again")  # not an image name: still refused
    return [f"broken symbolic link {t / 'train' / 'n00000001' / 'again'} -> again (Too many "
            "levels of symbolic links); expected images and folders, or links to existing ones"]


@malformed("torchvision_flat_val")
def image_link_loop_in_flat_val(t):
    (t / "val" / val_name(2)).unlink()
    os.symlink(val_name(2), t / "val" / val_name(2))  # a link to itself
    return [f"broken symbolic link {t / 'val' / val_name(2)} -> {val_name(2)} (Too many levels "
            "of symbolic links); expected images and folders, or links to existing ones"]


# --------------------------------------------------------------------------------------------
# Decoding: bad files are named in one line (also across DataLoader workers); 16-bit grey


def _truncated_jpeg(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def _bomb_png(path: Path) -> None:
    """A valid 4x4 PNG whose header claims 30000 x 30000 pixels (CRC fixed): Pillow refuses it
    on open, before any pixel is decoded."""
    buf = io.BytesIO()
    Image.new("L", (4, 4)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", 30000, 30000)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


BAD_IMAGES = {
    "zero_bytes": (lambda p: p.write_bytes(b""), "UnidentifiedImageError"),
    "html_page": (lambda p: p.write_text("<html>404 Not Found</html>"), "UnidentifiedImageError"),
    "truncated_jpeg": (_truncated_jpeg, "OSError"),
    "decompression_bomb": (_bomb_png, "DecompressionBombError"),
}


@pytest.mark.parametrize("kind", BAD_IMAGES)
def test_undecodable_image_is_one_line_naming_it_also_from_a_worker(kind, tmp_path):
    tree = write_imagenet_tree(tmp_path / "imagenet", sizes=SIZES)
    bad = tree / "train" / "n00000001" / "n00000001_2.JPEG"
    spoil, reason = BAD_IMAGES[kind]
    spoil(bad)
    train, _ = index_imagenet(tree)  # indexing never opens images
    ds = ImageFolderDataset(tree, split="train", image_size=16, index=train)
    i = [train.path(k) for k in range(len(train))].index(str(bad))
    ds[i - 1]  # its neighbours read fine
    message = (f"cannot decode image {bad} ({reason}: ", "); expected an image file Pillow can "
               "read -- replace it with a readable copy of the image, then rerun with --resume "
               "(removing it changes the data, which --resume refuses: then start a new run)")
    with pytest.raises(ImageNetFormatError, match=".*".join(map(re.escape, message))) as err:
        ds[i]
    line = str(err.value)
    assert "\n" not in line
    assert line.count(str(bad)) == 1  # Pillow's "cannot identify image file '<path>'" too
    # torch re-raises the worker's error as the same type, its traceback first: the message
    # survives intact as the last line.
    kind, text = _worker_error(torch.utils.data.Subset(ds, [i - 1, i]))
    assert kind is ImageNetFormatError
    assert text.splitlines()[-1] == f"references.imagenet.ImageNetFormatError: {line}"


def test_an_image_this_node_cannot_reach_is_retryable_not_a_format_error(tmp_path):
    """An image that is not there when a trial reads it (a node where the ImageNet mount is
    missing or stale, a file removed since the driver indexed it) read as "cannot decode
    image ... replace it with a readable copy", a format error: a ValueError, which ends the
    trial for good, so on a cluster one node without the mount failed its trials on every
    node. It is a DataUnreachable (an OSError Tune retries) naming the node and the path,
    also from a DataLoader worker; an image that is there and broken stays a format error."""
    import socket

    from records.errors import DataUnreachable
    from sweeps.execute import _repeating_errors

    tree = write_imagenet_tree(tmp_path / "imagenet", sizes=SIZES)
    train, _ = index_imagenet(tree)
    ds = ImageFolderDataset(tree, split="train", image_size=16, index=train)
    paths = [train.path(k) for k in range(len(train))]
    gone = tree / "train" / "n00000001" / "n00000001_2.JPEG"
    gone.unlink()
    folder = tree / "train" / "n00000002"  # a whole class folder not mounted
    shutil.rmtree(folder)
    for path in (gone, Path(paths[-1])):
        assert path == gone or path.parent == folder
        with pytest.raises(DataUnreachable) as err:
            ds[paths.index(str(path))]
        assert str(err.value) == (
            f"node {socket.gethostname()} cannot open {path} (No such file or directory), "
            "which the driver found as it planned the run; expected the data at the same path "
            "on every node (a shared mount), unchanged while the run lasts")
        assert err.value.errno == 2 and not isinstance(err.value, _repeating_errors())
    i = paths.index(str(gone))
    kind, text = _worker_error(torch.utils.data.Subset(ds, [i - 1, i]))
    assert kind is DataUnreachable and issubclass(kind, OSError)
    assert text.splitlines()[-1].endswith(f"cannot open {gone} (No such file or directory), "
                                          "which the driver found as it planned the run; "
                                          "expected the data at the same path on every node "
                                          "(a shared mount), unchanged while the run lasts")
    _truncated_jpeg(Path(paths[1]))
    with pytest.raises(ImageNetFormatError, match="cannot decode image") as err:
        ds[1]
    assert isinstance(err.value, _repeating_errors())


def _worker_error(dataset) -> tuple[type, str]:
    """(type, message) of the error a DataLoader with one worker process raises reading
    ``dataset``; the loader's workers are shut down before it returns."""
    batches = iter(torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=1))
    try:
        for _ in batches:
            pass
    except Exception as e:  # noqa: BLE001 -- the caller checks the type
        # The re-raised error's traceback is a reference cycle that holds the iterator: break it
        # so that the iterator's worker is shut down below, not by some later garbage collection
        # (which takes 5 s, or leaves the worker to the next test's fork).
        e.__traceback__ = None
        return type(e), str(e)
    finally:
        del batches
    return type(None), ""


def _grey16(shape=(24, 32)) -> np.ndarray:
    """(H, W) uint16 covering the range, with the values where clipping or a wrong scale shows."""
    values = np.linspace(0, 65535, shape[0] * shape[1]).round().astype(np.uint16)
    values[:6] = [0, 128, 129, 257, 32768, 65535]
    return values.reshape(shape)


@pytest.mark.parametrize("ext, mode", [(".png", "I;16"), (".pgm", "I"), (".tif", "I;16")])
def test_16_bit_grey_is_scaled_to_8_bits_not_clipped(ext, mode, tmp_path):
    tree = write_imagenet_tree(tmp_path / "imagenet", sizes=SMALL)
    path = tree / "train" / "n00000000" / f"deep{ext}"
    grey = _grey16()
    Image.fromarray(grey).save(path)
    with Image.open(path) as img:
        assert img.mode == mode  # as Pillow reads it back
    expected = np.floor(grey / 257 + 0.5).astype(np.uint8)  # round(v * 255 / 65535)
    assert expected[0, :6].tolist() == [0, 0, 1, 1, 128, 255]
    rgb = read_rgb(str(path))
    assert rgb.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(rgb), np.repeat(expected[..., None], 3, axis=2))
    # Through the dataset: a uniform 16-bit image stays uniform at its scaled value.
    Image.fromarray(np.full((40, 50), 40000, np.uint16)).save(path)
    train, _ = index_imagenet(tree)
    ds = ImageFolderDataset(tree, split="train", image_size=16, index=train)
    item = ds[[train.path(k) for k in range(len(train))].index(str(path))][0]
    assert item.shape == (3, 16, 16) and set(item.unique().tolist()) == {round(40000 / 257)}


@pytest.mark.parametrize("ext, dtype, mode", [(".png", np.uint16, "I;16"),
                                               (".tif", np.uint16, "I;16"),
                                               (".tif", np.int32, "I")])
def test_8_bit_values_in_a_wider_integer_file_are_read_as_they_are(ext, dtype, mode, tmp_path):
    """numpy's or OpenCV's uint16 / int32 arrays of 0..255 saved as PNG or TIFF: as torchvision
    reads them (convert("RGB") clips nothing there), not scaled by 1/257 to a black 0..1."""
    tree = write_imagenet_tree(tmp_path / "imagenet", sizes=SMALL)
    path = tree / "train" / "n00000000" / f"eight{ext}"
    grey = (np.arange(40 * 60).reshape(40, 60) % 256).astype(dtype)
    Image.fromarray(grey).save(path)
    with Image.open(path) as img:
        assert img.mode == mode
        torchvision_reads = np.asarray(img.convert("RGB"))
    rgb = np.asarray(read_rgb(str(path)))
    np.testing.assert_array_equal(rgb, np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2))
    np.testing.assert_array_equal(rgb, torchvision_reads)
    # one value above 255 makes it a 16-bit image: scaled, 65535 to 255
    grey[0, 0] = 256
    Image.fromarray(grey).save(path)
    scaled = np.floor(grey / 257 + 0.5).astype(np.uint8)
    assert set(np.unique(scaled).tolist()) == {0, 1}
    np.testing.assert_array_equal(np.asarray(read_rgb(str(path)))[..., 0], scaled)


def test_32_bit_integer_image_beyond_16_bits_is_refused(tmp_path):
    tree = write_imagenet_tree(tmp_path / "imagenet", sizes=SMALL)
    path = tree / "train" / "n00000000" / "wide.tif"
    Image.fromarray(np.array([[0, 70000], [5, 6]], np.int32)).save(path)
    with pytest.raises(ImageNetFormatError, match=re.escape(
            f"image {path} is 'I' (integer grey) with values in 0..70000; expected 8-bit "
            "images or 16-bit grey (0..65535) -- convert it to 8 bits, or replace it with a "
            "readable copy of the image, then rerun with --resume")):
        read_rgb(str(path))


def test_float_image_is_refused_not_clipped(tmp_path):
    """A 0..1 float TIFF: convert("RGB") would make it black. Refused, naming the range."""
    tree = write_imagenet_tree(tmp_path / "imagenet", sizes=SMALL)
    path = tree / "train" / "n00000000" / "float.tif"
    Image.fromarray(np.array([[0.0, 0.25], [0.5, 1.0]], np.float32)).save(path)
    with Image.open(path) as img:
        assert img.mode == "F" and np.asarray(img.convert("RGB")).max() <= 1  # the clipping
    with pytest.raises(ImageNetFormatError, match=re.escape(
            f"image {path} is 'F' (32-bit float, values 0..1), whose scale (0..1 or 0..255) is "
            "ambiguous; expected 8-bit images or 16-bit grey -- convert it to 8 bits, or replace "
            "it with a readable copy of the image, then rerun with --resume")):
        read_rgb(str(path))


@pytest.mark.parametrize("mode, ext", [("L", ".png"), ("LA", ".png"), ("P", ".png"),
                                       ("RGBA", ".png"), ("CMYK", ".jpg"), ("1", ".png"),
                                       ("RGB", ".JPEG")])
def test_8_bit_modes_convert_as_pillow_does(mode, ext, tmp_path):
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (24, 32, 4), np.uint8), "RGBA")
    path = tmp_path / f"x{ext}"
    (rgba if mode == "RGBA" else rgba.convert("RGB").convert(mode)).save(path)
    with Image.open(path) as img:
        assert img.mode == mode
        expected = np.asarray(img.convert("RGB"))
    np.testing.assert_array_equal(np.asarray(read_rgb(str(path))), expected)
    if mode == "RGBA":  # alpha is dropped, not composited over a background
        np.testing.assert_array_equal(expected, np.asarray(rgba)[..., :3])


def _kaggle_tree(tmp_path: Path, *, mapping: bool = True) -> tuple[Path, Path]:
    """The same images as the torchvision flat-val tree, arranged as Kaggle's download:
    ILSVRC/Data/CLS-LOC/{train,val} with a flat val, LOC_val_solution.csv and
    LOC_synset_mapping.txt at the top. Returns (the torchvision tree, the CLS-LOC root)."""
    tv = write_imagenet_tree(tmp_path / "tv", layout="torchvision_flat_val", sizes=SMALL)
    truth = tree_truth()
    kaggle = tmp_path / "kaggle"
    root = kaggle / "ILSVRC" / "Data" / "CLS-LOC"
    root.mkdir(parents=True)
    shutil.copytree(tv / "train", root / "train")
    shutil.copytree(tv / "val", root / "val")
    rows = ["ImageId,PredictionString"] + [
        f"{name.rsplit('.', 1)[0]},{wnid} 10 20 30 40 {wnid} 1 2 3 4 "
        for name, wnid in reversed(sorted(truth.val_labels.items()))]  # any row order
    (kaggle / "LOC_val_solution.csv").write_text("\r\n".join(rows) + "\r\n")
    if mapping:
        (kaggle / "LOC_synset_mapping.txt").write_text("".join(
            f"{w} {words}\n" for w, words in zip(truth.wnids, truth.words)))
    return tv, root


def test_kaggle_layout_indexes_as_the_torchvision_one(tmp_path):
    """Kaggle's download labels its flat val by image id in LOC_val_solution.csv, three
    folders above the root a lab passes: the same classes, names, samples and targets as the
    same images in torchvision's layout."""
    tv, root = _kaggle_tree(tmp_path)
    for a, b in zip(index_imagenet(tv), index_imagenet(root)):
        assert (a.classes, a.class_names) == (b.classes, b.class_names)
        assert [os.path.relpath(a.path(i), a.root) for i in range(len(a))] == \
            [os.path.relpath(b.path(i), b.root) for i in range(len(b))]
        assert np.array_equal(a.targets, b.targets)
    assert describe(root) == (f"Kaggle ImageNet layout "
                              f"({tmp_path / 'kaggle' / 'LOC_val_solution.csv'}, flat val)")
    # without the synset mapping the class names are the wnids
    _, bare = _kaggle_tree(tmp_path / "bare", mapping=False)
    train, val = index_imagenet(bare)
    assert train.class_names == train.classes == val.classes
    # an image without a row, and a malformed row, are one line naming them
    extra = root / "val" / "ILSVRC2012_val_99999999.JPEG"
    shutil.copyfile(next((root / "val").iterdir()), extra)
    with pytest.raises(ImageNetFormatError, match=r"1 of 7 images in .*val have no row in "
                                                  r".*LOC_val_solution.csv \(ILSVRC2012_val_"
                                                  r"99999999.JPEG\); expected an ImageId row"):
        index_imagenet(root)
    extra.unlink()
    csv = tmp_path / "kaggle" / "LOC_val_solution.csv"
    csv.write_text(csv.read_text() + "ILSVRC2012_val_00000042,\r\n")
    with pytest.raises(ImageNetFormatError, match=r"LOC_val_solution.csv: line 8 "
                                                  r"\('ILSVRC2012_val_00000042,'\) has no "
                                                  r"ImageId or no wnid"):
        index_imagenet(root)



def _same_reading(a: tuple[ImageIndex, ImageIndex], b: tuple[ImageIndex, ImageIndex]) -> None:
    """Both (train, val) pairs hold the same classes, names, relative paths and targets."""
    for x, y in zip(a, b, strict=True):
        assert (x.classes, x.class_names) == (y.classes, y.class_names)
        assert _relpaths(x) == _relpaths(y)
        assert np.array_equal(x.targets, y.targets)


def _kaggle_files(tmp_path: Path) -> tuple[Path, Path]:
    """(LOC_val_solution.csv, LOC_synset_mapping.txt) of a _kaggle_tree(tmp_path)."""
    return (tmp_path / "kaggle" / "LOC_val_solution.csv",
            tmp_path / "kaggle" / "LOC_synset_mapping.txt")


def test_kaggle_repeated_image_id_must_agree(tmp_path):
    """A second row for an image id would relabel it (the last row won): refused naming both
    rows; a repeated row that agrees changes nothing."""
    _, root = _kaggle_tree(tmp_path)
    csv, _ = _kaggle_files(tmp_path)
    expected = index_imagenet(root)
    text = csv.read_bytes().decode()
    first = text.split("\r\n")[1]  # line 2: ILSVRC2012_val_00000006
    image_id, wnid = first.split(",")[0], first.split(",")[1].split()[0]
    other = next(w for w in tree_truth().wnids if w != wnid)
    csv.write_text(text + first + "\r\n")
    assert index_imagenet(root) == expected
    csv.write_text(text + f"{image_id},{other} 1 2 3 4\r\n")
    with pytest.raises(ImageNetFormatError, match=re.escape(
            f"{csv}: ImageId {image_id} has wnid {wnid} on line 2 and {other} on line 8; "
            "expected one wnid per image -- remove the wrong row")) as err:
        index_imagenet(root)
    assert "\n" not in str(err.value)


def test_kaggle_files_are_found_above_the_root_as_given_not_its_link_target(tmp_path,
                                                                             monkeypatch):
    """/home/lab/imagenet/CLS-LOC -> /mnt/fast/CLS-LOC with the CSV and the mapping in
    /home/lab/imagenet: found above the link, through every entry point, also relative."""
    tv, root = _kaggle_tree(tmp_path)
    lab, fast = tmp_path / "home" / "lab" / "imagenet", tmp_path / "mnt" / "fast"
    lab.mkdir(parents=True)
    fast.mkdir(parents=True)
    root.rename(fast / "CLS-LOC")
    for f in _kaggle_files(tmp_path):
        f.rename(lab / f.name)
    link = lab / "CLS-LOC"
    os.symlink(fast / "CLS-LOC", link)
    expected = index_imagenet(tv)
    bundle = imagefolder_bundle(link, image_size=8)
    monkeypatch.chdir(lab)
    for got in (index_imagenet(link), imagenet_index(link), imagenet_index("CLS-LOC"),
                (bundle.train.index, bundle.val.index)):
        _same_reading(got, expected)
        assert got[0].root == str(link / "train")
    assert describe(link) == f"Kaggle ImageNet layout ({lab / 'LOC_val_solution.csv'}, flat val)"
    assert bundle.class_names == ("thing 0", "thing 1", "thing 2")


def _rename_classes(tree: Path, names: dict[str, str]) -> None:
    for split in SPLITS:
        for old, new in names.items():
            (tree / split / old).rename(tree / split / new)


def test_kaggle_files_above_a_sorted_val_only_name_classes_they_list(tmp_path):
    """Kaggle's files found by the upward search label a flat val; a val sorted into class
    folders is an ImageFolder tree, which they never make fail: they name its classes only
    when every class folder is a wnid of the synset mapping."""
    labdata = tmp_path / "labdata"
    labdata.mkdir()
    csv = labdata / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n09999999 1 2 3 4\n")
    mapping = labdata / "LOC_synset_mapping.txt"
    truth = tree_truth()
    mapping.write_text("".join(f"{w} {words}\n" for w, words in zip(truth.wnids, truth.words)))
    # an unrelated subset: cat/dog/fox folders, not wnids
    subset = write_imagenet_tree(labdata / "subsets" / "animals", sizes=SMALL)
    plain = write_imagenet_tree(tmp_path / "plain", sizes=SMALL)
    for tree in (subset, plain):
        _rename_classes(tree, dict(zip(truth.wnids, ("cat", "dog", "fox"))))
    train, val = index_imagenet(subset)
    assert train.classes == val.classes == train.class_names == ("cat", "dog", "fox")
    _same_reading((train, val), index_imagenet(plain))
    assert index_split(subset, "val") == val
    assert describe(subset) == "ImageFolder layout"
    # one class folder of many not in the mapping: the mapping is ignored, nothing refused
    _rename_classes(plain, {"cat": truth.wnids[0], "dog": truth.wnids[1]})
    shutil.move(plain, labdata / "subsets" / "mixed")
    train, _ = index_imagenet(labdata / "subsets" / "mixed")
    assert train.class_names == train.classes == ("fox", *truth.wnids[:2])
    assert describe(labdata / "subsets" / "mixed") == "ImageFolder layout"
    # every class folder a wnid of the mapping: its names (the CSV's labels are not read)
    sorted_kaggle = write_imagenet_tree(labdata / "ILSVRC" / "Data" / "CLS-LOC", sizes=SMALL)
    train, val = index_imagenet(sorted_kaggle)
    assert train.class_names == val.class_names == ("thing 0", "thing 1", "thing 2")
    assert train.classes == truth.wnids
    assert describe(sorted_kaggle) == f"ImageFolder layout (class names from {mapping})"
    # ... and without a mapping, the folder names
    mapping.unlink()
    assert index_imagenet(sorted_kaggle)[0].class_names == truth.wnids
    assert describe(sorted_kaggle) == "ImageFolder layout"


def test_kaggle_mapping_lacking_wnids_is_named(tmp_path):
    """A synset mapping without some wnids is the file named, with its own count."""
    _, root = _kaggle_tree(tmp_path)
    csv, mapping = _kaggle_files(tmp_path)
    mapping.write_text("n00000000 thing 0, alias 0\n")
    with pytest.raises(ImageNetFormatError, match=re.escape(
            f"2 class folders of {root / 'train'} are not listed in {mapping} (n00000001, "
            "n00000002); expected one of the 1 wnids it lists")):
        index_imagenet(root)
    # val alone: the first image (by name) whose wnid the mapping lacks, with its CSV line (the
    # rows are in reverse name order)
    labels = tree_truth().val_labels
    first = next(j for j in range(6) if labels[val_name(j)] != "n00000000")
    with pytest.raises(ImageNetFormatError, match=re.escape(
            f"{csv} line {7 - first} labels {root / 'val' / val_name(first)} "
            f"{labels[val_name(first)]}, which {mapping} does not list (3 more images have wnids "
            "it lacks: n00000001, n00000002); expected one of the 1 wnids it lists")):
        index_split(root, "val")


def test_kaggle_row_with_an_unknown_wnid_names_the_image_and_line(tmp_path):
    _, root = _kaggle_tree(tmp_path)
    csv, mapping = _kaggle_files(tmp_path)
    lines = csv.read_bytes().decode().split("\r\n")
    assert lines[4].startswith("ILSVRC2012_val_00000003,")  # line 5
    lines[4] = "ILSVRC2012_val_00000003,n99999999 1 2 3 4"
    csv.write_text("\r\n".join(lines))
    for call in (index_imagenet, lambda r: index_split(r, "val")):
        with pytest.raises(ImageNetFormatError, match=re.escape(
                f"{csv} line 5 labels {root / 'val' / val_name(2)} n99999999, which {mapping} "
                "does not list; expected one of the 3 wnids it lists")) as err:
            call(root)
        assert "\n" not in str(err.value)


def test_meta_bin_label_of_an_unknown_synset_names_the_image(tmp_path):
    tree = write_imagenet_tree(tmp_path / "t", layout="torchvision_flat_val", sizes=SMALL)
    truth = tree_truth()
    wnid_to_classes = {w: (words.split(", ")[0],) for w, words in zip(truth.wnids, truth.words)}
    val_wnids = [truth.val_labels[name] for name in sorted(truth.val_labels)]
    val_wnids[3] = "n99999999"
    torch.save((wnid_to_classes, val_wnids), tree / "meta.bin")
    with pytest.raises(ImageNetFormatError, match=re.escape(
            f"{tree / 'meta.bin'} (ground truth entry 4) labels {tree / 'val' / val_name(3)} "
            f"n99999999, which {tree / 'meta.bin'} does not list; expected one of the 3 wnids "
            "it lists")):
        index_split(tree, "val")


@pytest.mark.parametrize("below", ["ILSVRC", "ILSVRC/Data", "."])
def test_root_above_kaggle_cls_loc_points_to_it(below, tmp_path):
    _, root = _kaggle_tree(tmp_path)
    given = (tmp_path / "kaggle" / below).resolve()
    for split, call in (("train", index_imagenet), ("val", lambda r: index_split(r, "val"))):
        with pytest.raises(ImageNetFormatError, match=re.escape(
                f"missing folder {given / split}; expected {given} to hold train/ and val/ -- "
                f"pass {root} instead (Kaggle's CLS-LOC folder below it, which holds them)")):
            call(given)


@pytest.mark.parametrize("split", SPLITS)
def test_root_at_a_split_folder_points_to_its_parent(split, tmp_path):
    tree = write_imagenet_tree(tmp_path / "imagenet", sizes=SMALL)
    given = tree / split
    with pytest.raises(ImageNetFormatError, match=re.escape(
            f"missing folder {given / 'train'}; expected {given} to hold train/ and val/ -- "
            f"{given} is itself a split folder: pass its parent {tree}")):
        index_imagenet(given)
    with pytest.raises(ImageNetFormatError, match=re.escape(
            f"hold train/ and val/ -- {given / 'n00000000'} is a class folder of the split "
            f"folder {given}: pass {tree}")):
        index_imagenet(given / "n00000000")


def test_train_of_unextracted_class_archives_is_refused(tmp_path):
    """ILSVRC2012_img_train.tar extracted one level leaves one .tar per class in train/."""
    tree = write_imagenet_tree(tmp_path / "imagenet", sizes=SMALL)
    expected = index_imagenet(tree)
    train = tree / "train"
    for folder in sorted(train.iterdir()):
        with tarfile.open(folder.with_suffix(".tar"), "w") as tar:
            for f in sorted(folder.iterdir()):
                tar.add(f, arcname=f.name)
    (train / "n00000000.tar").rename(train / "n00000000.TAR")
    extracted = {f: f.read_bytes() for f in train.rglob("*.JPEG")}
    for folder in [f for f in train.iterdir() if f.is_dir()]:
        shutil.rmtree(folder)
    message = (f"{train} holds 3 .tar archives not extracted into class folders (n00000000.TAR, "
               "n00000001.tar, n00000002.tar); expected train/<class>/<images> -- extract each "
               "archive into a folder of its name (ILSVRC2012_img_train.tar holds one per class)")
    for call in (index_imagenet, lambda r: index_split(r, "train")):
        with pytest.raises(ImageNetFormatError, match=re.escape(message)):
            call(tree)
    # half done: the archives left are named; an extracted one kept beside its folder is fine
    for f, data in extracted.items():
        if f.parent.name == "n00000000":
            f.parent.mkdir(exist_ok=True)
            f.write_bytes(data)
    with pytest.raises(ImageNetFormatError, match=re.escape(
            f"{train} holds 2 .tar archives not extracted into class folders (n00000001.tar, "
            "n00000002.tar)")):
        index_imagenet(tree)
    for f, data in extracted.items():
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(data)
    (train / "ILSVRC2012_img_train.tar").write_bytes(b"")  # the download itself, kept
    assert index_imagenet(tree) == expected
    # a flat val with its archive kept among the images is not a tree of class archives
    flat = write_imagenet_tree(tmp_path / "flat", layout="torchvision_flat_val", sizes=SMALL)
    expected = index_imagenet(flat)
    (flat / "val" / "val_images.tar").write_bytes(b"")
    assert index_imagenet(flat) == expected


def test_non_utf8_names_are_ordered_as_torchvision_orders_them(tmp_path):
    """torchvision sorts str names (os.fsdecode: undecodable bytes become surrogates
    U+DC80..U+DCFF), which orders them after most non-ASCII text, unlike their bytes."""
    tree = write_imagenet_tree(tmp_path / "imagenet", sizes=SMALL)
    names = [b"x\x80", "x\u4e2d".encode(), b"x\xe9t\xe9", "x\u00e9".encode()]
    assert sorted(names) != sorted(names, key=os.fsdecode)  # the case that differs
    image = next((tree / "train" / "n00000000").iterdir()).read_bytes()
    for split in SPLITS:
        for name in names:
            folder = os.path.join(os.fsencode(tree / split), name)
            os.mkdir(folder)
            for file_name in (b"a\x80.JPEG", "a\u4e2d.JPEG".encode(), b"a.JPEG"):
                with open(os.path.join(folder, file_name), "wb") as fh:
                    fh.write(image)
        sub = os.path.join(os.fsencode(tree / split), names[0], b"sub\x80")
        os.mkdir(sub)
        for file_name in (b"z.JPEG", "\u4e2d.JPEG".encode()):
            with open(os.path.join(sub, file_name), "wb") as fh:
                fh.write(image)
        os.mkdir(os.path.join(os.fsencode(tree / split), names[0], "sub\u4e2d".encode()))
        with open(os.path.join(os.fsencode(tree / split), names[0], "sub\u4e2d".encode(),
                               b"b.JPEG"), "wb") as fh:
            fh.write(image)
    for split, index in zip(SPLITS, index_imagenet(tree)):
        ds = torchvision.datasets.ImageFolder(str(tree / split))
        assert dict(zip(index.classes, range(len(index.classes)))) == ds.class_to_idx
        assert [(index.path(i), index.target(i)) for i in range(len(index))] == ds.samples


def test_skipped_files_are_counted_with_the_least_name_without_a_list(tmp_path):
    """The index keeps a count and the least path (as torchvision sorts: ``os.fsdecode``, so
    bytes that are not UTF-8 sort after text) of the files it leaves out, at any depth."""
    tree = write_imagenet_tree(tmp_path / "imagenet", sizes=SMALL)
    cls = tree / "train" / "n00000001"
    names = [b"zz.txt", b"sub/b.txt", b"sub/deeper/a.txt", b"\xff.txt", b"\xc3\xa9.txt"]
    for name in names:
        path = os.fsencode(cls) + b"/" + name
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"x")
    train, _ = index_imagenet(tree)
    assert train.skipped == len(names)
    rels = [os.fsdecode(b"n00000001/" + n) for n in names]
    assert train.skipped_example == min(rels) == os.path.join("n00000001", "sub", "b.txt")


def test_a_damaged_image_of_a_generated_world_names_its_cache_entry(tmp_path, monkeypatch):
    """A truncated PNG in the cached simulated world was advised to be replaced or removed by
    hand and the run resumed; it is a cache entry, rebuilt by deleting it."""
    from references.simulated import generate_single_label

    monkeypatch.setenv("ALIGNSWEEP_CACHE", str(tmp_path / "cache"))
    world = generate_single_label(image_size=32, n_categories=2, n_train_per_class=2,
                                  n_val_per_class=1, seed=0, progress=False)
    png = sorted(world.rglob("*.png"))[0]
    png.write_bytes(png.read_bytes()[:40])
    entry = os.path.realpath(world)
    with pytest.raises(ImageNetFormatError, match=rf"^cache entry {re.escape(entry)} is damaged "
                                                  rf"\(cannot decode image .*\); delete it to "
                                                  rf"rebuild it: rm -r '{re.escape(entry)}'$"):
        read_rgb(str(png))
    outside = tmp_path / "mine.png"  # a user's file: the advice stays the user's
    outside.write_bytes(png.read_bytes())
    with pytest.raises(ImageNetFormatError, match=r"replace it with a readable copy"):
        read_rgb(str(outside))
    # a file missing from an entry that is here is damage to the entry, rebuilt by deleting
    # it; the whole entry missing is a node without the cache (``DataUnreachable``, retried)
    gone = sorted(world.rglob("*.png"))[1]
    gone.unlink()
    with pytest.raises(ImageNetFormatError, match=rf"^cache entry {re.escape(entry)} is damaged "
                                                  rf"\(cannot decode image {re.escape(str(gone))}.*\); "
                                                  rf"delete it to rebuild it"):
        read_rgb(str(gone))
    from records.errors import DataUnreachable

    world.rename(world.with_name("elsewhere"))
    with pytest.raises(DataUnreachable, match=rf"cannot open {re.escape(str(png))} \(No such "):
        read_rgb(str(png))


def test_a_fifo_named_as_an_image_is_refused_when_indexed(tmp_path):
    """A FIFO called fifo.JPEG was indexed as an image; the DataLoader worker that opened it
    waited for a writer for ever."""
    root = write_imagenet_tree(tmp_path / "imagenet", sizes=SMALL)
    fifo = next((root / "train").iterdir()) / "fifo.JPEG"
    os.mkfifo(fifo)
    with pytest.raises(ImageNetFormatError, match=re.escape(
            f"{fifo}: not a regular file (a FIFO, socket or device); expected an image file")):
        index_imagenet(root)


def test_class_names_that_print_alike_are_told_apart(tmp_path):
    """train/café (NFC) and val/café (NFD), or a wnid with a trailing space: the refusal named
    two classes that printed the same."""
    import unicodedata

    root = write_imagenet_tree(tmp_path / "imagenet", sizes=SMALL)
    cls = sorted(p.name for p in (root / "train").iterdir())
    (root / "train" / cls[0]).rename(root / "train" / unicodedata.normalize("NFC", "café"))
    (root / "val" / cls[0]).rename(root / "val" / unicodedata.normalize("NFD", "café"))
    (root / "val" / cls[1]).rename(root / "val" / f"{cls[1]} ")
    with pytest.raises(ImageNetFormatError) as err:
        index_imagenet(root)
    assert (f"train classes missing from {root / 'val'} ('caf\\xe9', {cls[1]})" in str(err.value)
            and f"val classes missing from {root / 'train'} ('cafe\\u0301', '{cls[1]} ')"
            in str(err.value)), str(err.value)
