"""Write a miniature ImageNet tree on disk, in any layout ``references.imagenet`` reads.

Used by tests/test_imagenet.py and by benchmarks (a few thousand small images in seconds).
Images are real JPEGs of smooth random content (they compress like photos, not like noise or
flat colour). Class folders are wnid-like (``n00000000``, ``n00000001``, ...). Val files are
named as in the official tar, ``ILSVRC2012_val_00000001.JPEG`` onwards, and their classes are
shuffled so the flat layout's labels depend on the ground truth, not on file order.

The torchvision layouts carry a devkit ``ILSVRC2012_devkit_t12.tar.gz`` shaped like the
official one: ``data/meta.mat`` (struct array ``synsets`` with the official fields, leaf
synsets first with ILSVRC2012_IDs in an order unrelated to the sorted wnids, then one
non-leaf synset whose children are the leaves) and ``data/ILSVRC2012_validation_ground_truth.txt``
(one ILSVRC2012_ID per sorted val file).
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.io
from PIL import Image

LAYOUTS = ("imagefolder", "torchvision", "torchvision_flat_val")
DEVKIT_ARCHIVE = "ILSVRC2012_devkit_t12.tar.gz"
SYNSET_FIELDS = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children",
                 "wordnet_height", "num_train_images")


class TreeTruth(NamedTuple):
    """What a written tree holds, independently of any reader: wnids in class order, the devkit
    names (first synonym first), and per sorted val file name its wnid."""

    wnids: tuple[str, ...]
    words: tuple[str, ...]
    val_labels: dict[str, str]
    ids: tuple[int, ...]  # ILSVRC2012_ID of each wnid


def wnid(k: int) -> str:
    return f"n{k:08d}"


def tree_truth(*, n_classes: int = 3, n_val: int = 2, seed: int = 0) -> TreeTruth:
    """The labels write_imagenet_tree(...) with the same arguments writes."""
    rng = np.random.default_rng([seed, 0])
    wnids = tuple(wnid(k) for k in range(n_classes))
    # ILSVRC2012_IDs 1..n in shuffled order: class index != ID - 1, as a wrong reader would assume.
    ids = tuple(int(i) + 1 for i in rng.permutation(n_classes))
    words = tuple(f"thing {k}, alias {k}, other name {k}" for k in range(n_classes))
    labels = rng.permutation(np.repeat(np.arange(n_classes), n_val))
    val_labels = {val_name(j): wnids[c] for j, c in enumerate(labels)}
    return TreeTruth(wnids, words, val_labels, ids)


def val_name(j: int) -> str:
    """Official val file name of the j-th (0-based) val image."""
    return f"ILSVRC2012_val_{j + 1:08d}.JPEG"


def _smooth_image(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """(width, height) RGB: a coarse random grid upsampled bicubically, plus mild grain."""
    w, h = size
    coarse = rng.integers(0, 256, size=(max(2, h // 32), max(2, w // 32), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC),
                     dtype=np.int16)
    img += rng.integers(-6, 7, size=img.shape, dtype=np.int16)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def write_devkit(path: Path, truth: TreeTruth) -> Path:
    """The devkit archive for ``truth`` at ``path``."""
    n = len(truth.wnids)
    synsets = np.zeros((n + 1,), dtype=[(f, object) for f in SYNSET_FIELDS])
    for k in range(n):
        synsets[k] = (np.uint16(truth.ids[k]), truth.wnids[k], truth.words[k],
                      f"gloss of {truth.wnids[k]}", np.uint16(0), np.zeros((0,), np.uint16),
                      np.uint16(0), np.uint16(1300))
    # A non-leaf synset: the parser must drop it (its wnid is not a class).
    synsets[n] = (np.uint16(n + 1), "n99999999", "entity, whole", "that which exists",
                  np.uint16(n), np.array(sorted(truth.ids), np.uint16), np.uint16(1),
                  np.uint16(0))
    mat = io.BytesIO()
    scipy.io.savemat(mat, {"synsets": synsets})
    wnid_to_id = dict(zip(truth.wnids, truth.ids))
    gt = "".join(f"{wnid_to_id[truth.val_labels[name]]}\n" for name in sorted(truth.val_labels))
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for name, data in (("data/meta.mat", mat.getvalue()),
                           ("data/ILSVRC2012_validation_ground_truth.txt", gt.encode())):
            info = tarfile.TarInfo(f"ILSVRC2012_devkit_t12/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_imagenet_tree(root: str | os.PathLike, *, layout: str = "imagefolder",
                        n_classes: int = 3, n_train: int = 4, n_val: int = 2,
                        sizes: tuple[tuple[int, int], ...] = ((500, 375), (375, 500), (320, 240)),
                        seed: int = 0, quality: int = 85) -> Path:
    """Write an ImageNet tree at ``root`` (created; must be empty) and return it.

    layout : "imagefolder" (train/ and val/ in class folders, no devkit), "torchvision" (devkit
        beside train/ and val/ sorted into wnid folders, as torchvision's parse_val_archive
        leaves it) or "torchvision_flat_val" (devkit, val/ flat as in the official tar).
    n_train, n_val : images per class; sizes : (width, height) cycled over all images.
    Train files are ``train/<wnid>/<wnid>_<i>.JPEG``. tree_truth(n_classes=, n_val=, seed=)
    returns the labels written.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; accepted: {', '.join(LAYOUTS)}")
    if n_classes < 1 or n_train < 1 or n_val < 1:
        raise ValueError(f"n_classes={n_classes}, n_train={n_train}, n_val={n_val}; accepted: "
                         ">= 1 each")
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; write_imagenet_tree needs an empty folder")
    truth = tree_truth(n_classes=n_classes, n_val=n_val, seed=seed)
    rng = np.random.default_rng([seed, 1])
    count = 0

    def save(path: Path) -> None:
        nonlocal count
        _smooth_image(rng, sizes[count % len(sizes)]).save(path, "JPEG", quality=quality)
        count += 1

    for w in truth.wnids:
        (root / "train" / w).mkdir(parents=True)
        for i in range(n_train):
            save(root / "train" / w / f"{w}_{i}.JPEG")
    (root / "val").mkdir()
    for name in sorted(truth.val_labels):
        folder = root / "val"
        if layout != "torchvision_flat_val":
            folder = folder / truth.val_labels[name]
            folder.mkdir(exist_ok=True)
        save(folder / name)
    if layout != "imagefolder":
        write_devkit(root / DEVKIT_ARCHIVE, truth)
    return root
