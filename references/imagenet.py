"""ImageNet as labs keep it on disk, indexed compactly so DataLoader workers stream it by index.

Three layouts are read (:func:`describe` says which one a root has):

* **ImageFolder layout**: ``root/train/<class>/**/<image>`` and ``root/val/<class>/**/<image>``,
  no devkit. Class names are the folder names (or, where Kaggle's files below are found and
  every class folder is a wnid of its ``LOC_synset_mapping.txt``, the mapping's names).
* **torchvision ImageNet layout** (what ``torchvision.datasets.ImageNet(root)`` reads): the devkit
  archive ``root/ILSVRC2012_devkit_t12.tar.gz`` or torchvision's parsed ``root/meta.bin`` (which
  wins when both are present, as in torchvision) beside ``train/<wnid>/*.JPEG`` and ``val/``.
  ``val/`` is either sorted into wnid folders (what torchvision's ``parse_val_archive`` leaves)
  or flat, the 50,000 ``ILSVRC2012_val_XXXXXXXX.JPEG`` of the official tar directly in it,
  labelled as ``parse_val_archive`` labels them: sorted file names zipped with the devkit's
  ground-truth wnids. ``class_names`` are the devkit's first synonym ("tench" for n01440764);
  they are not unique (ImageNet has two "crane" and two "maillot" classes), ``classes`` are.

* **Kaggle's ImageNet layout** (its imagenet-object-localization-challenge download):
  ``--imagenet-root .../ILSVRC/Data/CLS-LOC`` holding ``train/<wnid>/*.JPEG`` and a flat
  ``val/``, labelled by ``LOC_val_solution.csv`` (found in the root or up to three folders
  above it, above the root as given -- made absolute, not resolved, so a ``CLS-LOC`` that is a
  symbolic link finds the files beside the link; each image id's first wnid, an id repeated
  with another wnid refused), class names from ``LOC_synset_mapping.txt`` beside it (else the
  wnids). A devkit or meta.bin in the root wins over it. The CSV labels only a val with images
  directly in it: a val sorted into class folders is the ImageFolder layout, which files found
  by this upward search never make fail (their names are used only if they fit every folder).

Samples are ordered as torchvision's ``ImageFolder`` orders them (``make_dataset``): by class
(sorted folder names), then within a class folder by the sorted walk of its subfolders
(followlinks=True), file names sorted within each folder; image files are those whose name ends
in one of torchvision's ``IMG_EXTENSIONS``, case-insensitively. Names are sorted as the str
torchvision sees (``os.fsdecode``: bytes that are not UTF-8 become surrogates, which sort after
most non-ASCII text), so class indices match ``ImageFolder.class_to_idx``. A flat val is ordered
as the sorted tree it would become. A split folder holding ``.tar`` archives that have no class
folder of their name (``ILSVRC2012_img_train.tar`` extracted one level) is refused.

Hidden entries are skipped at every level, unlike torchvision's ``ImageFolder``: a folder or file
whose name starts with "." is not a class, not searched and not an image (``.ipynb_checkpoints/``,
``.Trash-1000/``, ``.DS_Store``, the ``._n01440764_10026.JPEG`` AppleDouble files of a copy from
macOS); so are the folders tools leave beside data, ``@eaDir`` (a Synology NAS's thumbnails,
``<image>.JPEG/SYNOFILE_THUMB_*.jpg``, which would be read as images and as a class) and
``__MACOSX`` (a zip made on macOS). Symbolic links are followed; a dangling one named as an
image, one in a split folder (a class linked from elsewhere whose target is gone), or a link
loop, is refused at index time (``broken symbolic link PATH ...``); a dangling one with
another name inside a class folder is ignored like any non-image.

Decoding (:func:`read_rgb`, what ``ImageFolderDataset`` calls in the DataLoader workers): an
image Pillow cannot open or decode (corrupt, truncated, zero bytes, a decompression bomb) is an
:class:`ImageNetFormatError` naming the file, never skipped. Pixels become 8-bit RGB with
Pillow's ``convert("RGB")`` (RGBA: alpha dropped, not composited), except integer grey images
wider than 8 bits, which ``convert`` would clip at 255: 16-bit ("I;16*", and "I" -- how Pillow
opens 16-bit PGM and 32-bit TIFF -- holding values in 0..65535) are scaled by 255/65535
(``round(v / 257)``); an "I" image with values outside 0..65535 is refused, and so is a float
("F") image, whose scale (0..1 or 0..255) the file does not tell (``convert`` would clip it).

What is read: directory listings (``os.scandir``, no per-file ``stat`` on file systems that report
entry types), ``meta.bin`` or two members of the devkit archive (``data/meta.mat`` and
``data/ILSVRC2012_validation_ground_truth.txt``, extracted with tarfile's "data" filter into a
temporary folder that is removed afterwards; a symbolic link costs one ``stat``, which also tells
a broken one), Kaggle's ``LOC_val_solution.csv`` (for a flat val) and ``LOC_synset_mapping.txt``.
Image files are never opened by indexing. Nothing is ever
written under the root (lab mounts are read-only; torchvision's ``parse_devkit_archive`` would
write ``meta.bin`` there), and the split folders are never reorganised.

Memory: an :class:`ImageIndex` holds no per-sample Python object -- one ``bytes`` blob of the
UTF-8 (file-system encoded) relative paths, int64 offsets (N + 1) and int64 targets (N), i.e.
``len(relative path) + 16`` bytes per sample: about 46 B for ImageNet train
("n01440764/n01440764_10026.JPEG", 59 MB for 1.28 M images) against roughly 180 B and two
objects per sample for ``ImageFolder.samples``. Forked DataLoader workers therefore touch no
refcounts per sample (no copy-on-read of the parent's pages), and the index pickles as three
buffers, small and fast, for Ray's object store.
"""

from __future__ import annotations

import os
import stat
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import scipy.io
import torch
from PIL import Image
from torchvision.datasets import imagenet as tv_imagenet
from torchvision.datasets.folder import IMG_EXTENSIONS

from records.errors import exception_line

IMAGE_EXTENSIONS: tuple[str, ...] = tuple(IMG_EXTENSIONS)
SPLITS = ("train", "val")
DEVKIT_ARCHIVE = tv_imagenet.ARCHIVE_META["devkit"][0]  # "ILSVRC2012_devkit_t12.tar.gz"
META_FILE = tv_imagenet.META_FILE  # "meta.bin"
DEVKIT_FOLDER = "ILSVRC2012_devkit_t12"
#: Kaggle's ImageNet download (imagenet-object-localization-challenge): ground truth by image id
KAGGLE_SOLUTION = "LOC_val_solution.csv"
KAGGLE_SYNSETS = "LOC_synset_mapping.txt"
META_MAT = "data/meta.mat"
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"

# Directory entries are scanned as bytes: no decode/encode per file, and names that are not
# valid UTF-8 survive (os.fsdecode maps them back to the str the OS gives torchvision).
_IMAGE_EXTENSIONS_B = tuple(os.fsencode(e) for e in IMAGE_EXTENSIONS)
_SEP = os.fsencode(os.sep)


class ImageNetFormatError(ValueError):
    """The tree on disk is not an ImageNet layout this module reads; the one-line message names
    the offending path and says what was expected."""


def _accepted() -> str:
    return f"accepted image extensions: {', '.join(IMAGE_EXTENSIONS)}, any case"


def _reason(e: BaseException) -> str:
    """An exception as one short line for a message."""
    return exception_line(e, first_line=True)


def _few(names, k: int = 3) -> str:
    """The first ``k`` names, sorted; a name that would not read as itself (spaces at its
    ends, characters outside ASCII: café as NFC and as NFD printed the same) in quotes with
    escapes, as ``ascii`` writes it."""
    names = sorted(names)
    shown = [n if n.isascii() and n == n.strip() and n.isprintable() else ascii(n)
             for n in names[:k]]
    return ", ".join(shown) + (", ..." if len(names) > k else "")


# --------------------------------------------------------------------------------------------
# The index


@dataclass(frozen=True, eq=False, repr=False)
class ImageIndex:
    """One split: sample i is ``path(i)`` with class ``target(i)``.

    root : absolute split folder; classes : (n_classes,) sorted class folder names (wnids);
    class_names : (n_classes,) human-readable names (devkit first synonym, else the folder name).
    skipped : how many other files were found beside the images (not hidden, not folders, not
    ``.tar`` archives) and left out as torchvision leaves them; skipped_example : one of them.
    Storage (private): ``_paths`` the relative paths concatenated, ``_offsets`` (N + 1,) int64
    so that path i is ``_paths[_offsets[i]:_offsets[i + 1]]``, ``_targets`` (N,) int64.
    """

    root: str
    classes: tuple[str, ...]
    class_names: tuple[str, ...]
    _paths: bytes = field(repr=False)
    _offsets: np.ndarray = field(repr=False)
    _targets: np.ndarray = field(repr=False)
    #: files found among the images that are not images torchvision reads (by extension), and
    #: one of them (a path relative to ``root``), so a user learns what was left out
    skipped: int = 0
    skipped_example: str = ""

    def __post_init__(self) -> None:
        n = len(self._targets)
        if len(self.class_names) != len(self.classes):
            raise ValueError(f"{len(self.class_names)} class_names for {len(self.classes)} "
                             "classes; expected one name per class")
        for name, a, shape in (("_offsets", self._offsets, (n + 1,)),
                               ("_targets", self._targets, (n,))):
            if not isinstance(a, np.ndarray) or a.dtype != np.int64 or a.shape != shape:
                raise ValueError(f"{name} must be an int64 array of shape {shape}, got "
                                 f"{getattr(a, 'dtype', type(a))} {getattr(a, 'shape', '')}")
        if (self._offsets[0] != 0 or self._offsets[-1] != len(self._paths)
                or np.any(np.diff(self._offsets) <= 0)):
            raise ValueError(f"_offsets must rise strictly from 0 to len(_paths)="
                             f"{len(self._paths)}")
        if n and (self._targets.min() < 0 or self._targets.max() >= len(self.classes)):
            raise ValueError(f"_targets must lie in 0..{len(self.classes) - 1}")

    def __len__(self) -> int:
        return len(self._targets)

    def path(self, i: int) -> str:
        """Absolute path of sample i."""
        rel = self._paths[self._offsets[i]:self._offsets[i + 1]]
        return os.path.join(self.root, os.fsdecode(rel))

    def content(self) -> bytes:
        """What the index holds, as bytes to hash: every path and every label (no file is
        read). A digest of it names the split's samples (``datasets.content_identity``, a
        run's fingerprint)."""
        return self._paths + self._targets.astype(np.int64).tobytes()

    def target(self, i: int) -> int:
        return int(self._targets[i])

    @property
    def targets(self) -> np.ndarray:
        """(N,) int64 class indices, a read-only view."""
        view = self._targets.view()
        view.flags.writeable = False
        return view

    @property
    def nbytes(self) -> int:
        """Bytes held by the per-sample storage (paths blob, offsets, targets)."""
        return len(self._paths) + self._offsets.nbytes + self._targets.nbytes

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ImageIndex):
            return NotImplemented
        return (self.root == other.root and self.classes == other.classes
                and self.class_names == other.class_names and self._paths == other._paths
                and np.array_equal(self._offsets, other._offsets)
                and np.array_equal(self._targets, other._targets))

    def __hash__(self) -> int:
        return hash((self.root, self.classes, len(self)))

    def __repr__(self) -> str:
        return (f"ImageIndex(root={self.root!r}, samples={len(self)}, "
                f"classes={len(self.classes)}, nbytes={self.nbytes})")


class _Tally:
    """The files found beside the images, kept as a count and the least name (as torchvision
    sorts, by ``os.fsdecode``) rather than a list, so a tree with millions of them costs no
    memory while it is indexed. ``prefix`` is prepended to every name appended."""

    __slots__ = ("count", "least", "_key", "prefix")

    def __init__(self, prefix: bytes = b"") -> None:
        self.count = 0
        self.least = b""
        self._key: str | None = None
        self.prefix = prefix

    def append(self, name: bytes) -> None:
        name = self.prefix + name
        self.count += 1
        key = os.fsdecode(name)
        if self._key is None or key < self._key:
            self.least, self._key = name, key


def _pack(root: str, classes: tuple[str, ...], class_names: tuple[str, ...],
          rel_paths: list[bytes], targets: list[int],
          others: _Tally | None = None) -> ImageIndex:
    lengths = np.fromiter(map(len, rel_paths), dtype=np.int64, count=len(rel_paths))
    offsets = np.zeros(len(rel_paths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    count, example = (others.count, os.fsdecode(others.least)) if others is not None else (0, "")
    return ImageIndex(root, classes, class_names, b"".join(rel_paths), offsets,
                      np.asarray(targets, dtype=np.int64).reshape(-1), count, example)


def skipped_note(*indices: ImageIndex) -> str:
    """'' or '; N other files skipped (e.g. PATH; accepted image extensions: ...)' for
    split indices whose folders held files that are not images torchvision reads."""
    total = sum(i.skipped for i in indices)
    if not total:
        return ""
    first = next(i for i in indices if i.skipped)
    example = os.path.join(first.root, first.skipped_example)
    return (f"; {total} other file{'s' if total > 1 else ''} skipped, as torchvision skips "
            f"them (e.g. {example}; {_accepted()})")


# --------------------------------------------------------------------------------------------
# Devkit metadata


class _Meta(NamedTuple):
    source: str  # the file read: meta.bin, the devkit archive or Kaggle's LOC_val_solution.csv
    wnid_to_classes: dict[str, tuple[str, ...]]
    val_wnids: list[str]  # ground truth, one per val image in sorted file-name order
    # Kaggle's ground truth is by image id (the file name without its extension) instead:
    # image id -> (wnid, line of the CSV)
    val_by_id: dict[str, tuple[str, int]] | None = None
    # the file wnid_to_classes comes from, where it is not source (Kaggle's synset mapping)
    names_source: str | None = None

    @property
    def names_from(self) -> str:
        return self.names_source or self.source

    def unknown_wnids(self, what: str, unknown) -> str:
        """The end of a message: ``what`` (wnids ``unknown``) is not among the classes."""
        if self.names_from.endswith(KAGGLE_SYNSETS):
            return (f"{what} not listed in {self.names_from} ({_few(unknown)}); expected one of "
                    f"the {len(self.wnid_to_classes)} wnids it lists")
        if self.names_from.endswith(KAGGLE_SOLUTION):  # (no synset mapping: the CSV's classes)
            return (f"{what} not among the classes of the val images {self.names_from} labels "
                    f"({_few(unknown)}); expected wnids of its {len(self.wnid_to_classes)} "
                    f"classes (val then has images of every class)")
        return (f"{what} not leaf synsets of {self.names_from} ({_few(unknown)}); expected "
                f"wnids of its {len(self.wnid_to_classes)} classes")


def _parse_meta_mat(devkit_root: str) -> tuple[dict[int, str], dict[str, tuple[str, ...]]]:
    """torchvision's parse_meta_mat: leaf synsets (num_children == 0) of data/meta.mat ->
    ({ILSVRC2012_ID: wnid}, {wnid: synonyms}). torchvision (0.24-0.29) defines it inside
    parse_devkit_archive, which cannot be called without writing meta.bin into the root, so
    the same reading is repeated here (tests check both agree on the same archive)."""
    synsets = scipy.io.loadmat(os.path.join(devkit_root, META_MAT), squeeze_me=True)["synsets"]
    leaves = [s for s in np.atleast_1d(synsets) if int(s["num_children"]) == 0]
    idx_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in leaves}
    wnid_to_classes = {str(s["WNID"]): tuple(str(s["words"]).split(", ")) for s in leaves}
    return idx_to_wnid, wnid_to_classes


def _parse_val_groundtruth_txt(devkit_root: str) -> list[int]:
    """torchvision's parse_val_groundtruth_txt: one ILSVRC2012_ID per line."""
    with open(os.path.join(devkit_root, GROUND_TRUTH)) as f:
        return [int(line) for line in f.read().split()]


def _read_devkit(archive: str) -> _Meta:
    """The devkit's labels, from the archive or from the folder it extracts to
    (``ILSVRC2012_devkit_t12/``, kept by many labs instead of the archive)."""
    members = [f"{DEVKIT_FOLDER}/{META_MAT}", f"{DEVKIT_FOLDER}/{GROUND_TRUTH}"]
    what = "devkit folder" if os.path.isdir(archive) else "devkit archive"
    try:
        if os.path.isdir(archive):
            idx_to_wnid, wnid_to_classes = _parse_meta_mat(archive)
            val_idcs = _parse_val_groundtruth_txt(archive)
        else:
            idx_to_wnid, wnid_to_classes, val_idcs = _extract_devkit(archive, members)
    except ImageNetFormatError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error, scipy.io.matlab.MatReadError,
            NotImplementedError, ValueError, KeyError, TypeError, IndexError) as e:
        # corrupt gzip/tar, unparsable meta.mat (NotImplementedError: one re-saved as MATLAB
        # v7.3, which is HDF5) or ground truth
        raise ImageNetFormatError(f"cannot read {what} {archive} ({_reason(e)}); "
                                  f"expected the official {DEVKIT_ARCHIVE} (tar.gz with "
                                  f"{DEVKIT_FOLDER}/{META_MAT} and {GROUND_TRUTH}) or the "
                                  f"folder it extracts to") from e
    unknown = sorted({i for i in val_idcs if i not in idx_to_wnid})
    if unknown:
        raise ImageNetFormatError(
            f"{what} {archive}: ground truth uses {len(unknown)} ILSVRC2012_IDs that are "
            f"not leaf synsets of {META_MAT} ({_few(map(str, unknown))}); expected ids of the "
            f"{len(idx_to_wnid)} leaf synsets")
    return _Meta(archive, wnid_to_classes, [idx_to_wnid[i] for i in val_idcs])


def _extract_devkit(archive: str, members: list[str]):
    """({ILSVRC2012_ID: wnid}, {wnid: synonyms}, val ids) from the two members of the devkit
    archive, extracted to a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="imagenet-devkit-") as tmp:
        with tarfile.open(archive, "r:*") as tar:
            names = set(tar.getnames())
            missing = [m for m in members if m not in names]
            if missing:
                raise ImageNetFormatError(f"devkit archive {archive} lacks {_few(missing)}; "
                                          f"expected the official {DEVKIT_ARCHIVE}")
            # "data" filter: no absolute paths, no escaping links, no device files.
            tar.extractall(tmp, members=[tar.getmember(m) for m in members], filter="data")
        devkit_root = os.path.join(tmp, DEVKIT_FOLDER)
        idx_to_wnid, wnid_to_classes = _parse_meta_mat(devkit_root)
        return idx_to_wnid, wnid_to_classes, _parse_val_groundtruth_txt(devkit_root)


def _read_meta_bin(path: str) -> _Meta:
    try:
        wnid_to_classes, val_wnids = torch.load(path, weights_only=True)
        wnid_to_classes = {str(w): tuple(str(c) for c in cls)
                           for w, cls in dict(wnid_to_classes).items()}
        val_wnids = [str(w) for w in val_wnids]
    except Exception as e:  # torch.load raises many types on a corrupt or foreign file
        raise ImageNetFormatError(
            f"cannot read {path} ({_reason(e)}); expected torchvision's meta.bin, "
            "torch.save((wnid_to_classes, val_wnids)) -- delete it to use the devkit "
            "archive instead") from e
    return _Meta(path, wnid_to_classes, val_wnids)


def _read_kaggle(path: str) -> _Meta:
    """Kaggle's ImageNet download: ``LOC_val_solution.csv`` (``ImageId,PredictionString``, the
    string's first token the image's wnid) and, beside it, ``LOC_synset_mapping.txt``
    (``<wnid> <words>`` per line; without it the class names are the wnids)."""
    import csv

    by_id: dict[str, tuple[str, int]] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, [])
            if "ImageId" not in header or "PredictionString" not in header:
                raise ImageNetFormatError(
                    f"{path}: header {','.join(header)!r}; expected Kaggle's "
                    f"ImageId,PredictionString")
            col_id, col_pred = header.index("ImageId"), header.index("PredictionString")
            for row in reader:
                if not row:
                    continue
                tokens = row[col_pred].split() if len(row) > max(col_id, col_pred) else []
                if not tokens or not row[col_id]:
                    raise ImageNetFormatError(
                        f"{path}: line {reader.line_num} ({','.join(row)[:80]!r}) has no "
                        f"ImageId or no wnid; expected ImageId,<wnid> <box> ...")
                image_id, wnid, line = row[col_id], tokens[0], reader.line_num
                seen = by_id.setdefault(image_id, (wnid, line))
                if seen[0] != wnid:  # a later row would silently relabel the image
                    raise ImageNetFormatError(
                        f"{path}: ImageId {image_id} has wnid {seen[0]} on line {seen[1]} and "
                        f"{wnid} on line {line}; expected one wnid per image -- remove the "
                        "wrong row")
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ImageNetFormatError(f"cannot read {path} ({_reason(e)}); expected Kaggle's "
                                  f"{KAGGLE_SOLUTION}") from e
    mapping = os.path.join(os.path.dirname(path), KAGGLE_SYNSETS)
    if os.path.isfile(mapping):
        return _Meta(path, _read_synset_mapping(mapping), [], by_id, mapping)
    # names are the wnids
    return _Meta(path, {w: (w,) for w in sorted({w for w, _ in by_id.values()})}, [], by_id)


def _read_synset_mapping(mapping: str) -> dict[str, tuple[str, ...]]:
    """Kaggle's ``LOC_synset_mapping.txt``: {wnid: synonyms}."""
    wnid_to_classes: dict[str, tuple[str, ...]] = {}
    try:
        with open(mapping, encoding="utf-8-sig") as fh:
            for line in fh:
                wnid, _, words = line.strip().partition(" ")
                if wnid:
                    wnid_to_classes[wnid] = tuple(w.strip() for w in words.split(",")
                                                  if w.strip()) or (wnid,)
    except (OSError, UnicodeDecodeError) as e:
        raise ImageNetFormatError(f"cannot read {mapping} ({_reason(e)}); expected "
                                  f"Kaggle's <wnid> <words> lines") from e
    return wnid_to_classes


def _kaggle_source(root: str) -> str | None:
    """Kaggle's ground truth for a root inside its download (``--imagenet-root
    .../ILSVRC/Data/CLS-LOC``, the CSV three folders up), or beside train/ and val/. Searched
    above ``root`` as given (absolute, not resolved): a CLS-LOC that is a symbolic link finds
    the files beside the link, not above its target."""
    folder = root
    for _ in range(4):
        candidate = os.path.join(folder, KAGGLE_SOLUTION)
        if os.path.isfile(candidate):
            return candidate
        folder = os.path.dirname(folder)
    return None


def _devkit_source(root: str) -> str | None:
    for name in (META_FILE, DEVKIT_ARCHIVE):  # meta.bin first, as torchvision does
        if os.path.isfile(os.path.join(root, name)):
            return os.path.join(root, name)
    folder = os.path.join(root, DEVKIT_FOLDER)  # the archive extracted in place
    if os.path.isfile(os.path.join(folder, META_MAT)):
        return folder
    return None


def _val_form(root: str) -> str:
    """"flat val", "half-sorted val", "sorted val" or "no val/" (one listing of root/val)."""
    val = os.path.join(root, "val")
    if not os.path.isdir(val):
        return "no val/"
    dirs, images = _listdir(os.fsencode(val), classes=True)
    return "half-sorted val" if dirs and images else "flat val" if images else "sorted val"


def _kaggle_names(root: str, solution: str) -> _Meta | None:
    """For a root whose val/ holds no images directly in it (an ImageFolder tree): the class
    names of Kaggle's ``LOC_synset_mapping.txt`` beside ``solution``, found by the upward search,
    only if every class folder of train/ and val/ is a wnid it lists (else None: the folder
    names). Its labels are not needed, and a file found above an unrelated tree (or unreadable)
    must not make that tree fail."""
    mapping = os.path.join(os.path.dirname(solution), KAGGLE_SYNSETS)
    if not os.path.isfile(mapping):
        return None
    try:
        wnid_to_classes = _read_synset_mapping(mapping)
    except ImageNetFormatError:
        return None
    for split in SPLITS:
        folder = os.path.join(root, split)
        if os.path.isdir(folder):
            dirs, _ = _listdir(os.fsencode(folder), classes=True)
            if not all(os.fsdecode(d) in wnid_to_classes for d in dirs):
                return None
    return _Meta(mapping, wnid_to_classes, [])


def _load_meta(root: str) -> _Meta | None:
    source = _devkit_source(root)
    if source is not None:
        return _read_meta_bin(source) if source.endswith(META_FILE) else _read_devkit(source)
    solution = _kaggle_source(root)
    if solution is None:
        return None
    if _val_form(root) in ("flat val", "half-sorted val"):  # the CSV labels val
        return _read_kaggle(solution)
    return _kaggle_names(root, solution)


# --------------------------------------------------------------------------------------------
# Scanning


def _is_image(name: bytes) -> bool:
    return name.lower().endswith(_IMAGE_EXTENSIONS_B)


#: Folders that tools put beside the data, never classes nor images: a Synology NAS's
#: thumbnails (``@eaDir/<image>.JPEG/SYNOFILE_THUMB_*.jpg``), macOS's zip metadata.
_TOOL_FOLDERS = (b"@eaDir", b"__MACOSX")


def _listdir(folder: bytes, archives: list[bytes] | None = None,
             others: _Tally | None = None, *, classes: bool = False
             ) -> tuple[list[bytes], list[bytes]]:
    """(sub-folder names, image file names) of one folder, unsorted; hidden entries (name
    starting with ".") and tools' folders (``_TOOL_FOLDERS``) skipped, symlinks followed (a
    broken one refused, unless it is dangling, not named as an image and not in a split folder
    (``classes``: where a dangling link is a class folder whose target is gone):
    ``_link_target_is_dir``). Names of files ending in ".tar" (any case) are appended to
    ``archives`` when given, the names of other files to ``others``. Plain entries cost no
    ``stat`` (``DirEntry`` types from the listing); a symlink costs one."""
    dirs, images = [], []
    try:
        with os.scandir(folder) as it:
            for entry in it:
                name = entry.name
                if name.startswith(b".") or name in _TOOL_FOLDERS:
                    continue
                if entry.is_symlink():
                    is_dir = _link_target_is_dir(entry, dangling_ok=not classes)
                    if is_dir is None:  # broken, and not named as an image: ignored
                        continue
                else:
                    is_dir = entry.is_dir()
                if is_dir:
                    dirs.append(name)
                elif _is_image(name):
                    if not entry.is_file():  # (the listing's type: no stat) a FIFO named as
                        # an image hung the DataLoader worker that opened it
                        raise ImageNetFormatError(
                            f"{os.fsdecode(os.path.join(folder, name))}: not a regular file (a "
                            f"FIFO, socket or device); expected an image file")
                    images.append(name)
                elif archives is not None and name.lower().endswith(b".tar"):
                    archives.append(name)
                elif others is not None and not name.lower().endswith(b".tar"):
                    others.append(name)
    except OSError as e:
        raise ImageNetFormatError(f"cannot list {os.fsdecode(folder)} ({e.strerror}); expected "
                                  "a readable folder") from e
    return dirs, images


def _link_target_is_dir(entry: os.DirEntry, *, dangling_ok: bool = True) -> bool | None:
    """Whether a symlink leads to a folder. None for a dangling one not named as an image
    (ignored like any non-image, as ``DirEntry.is_dir`` does) where ``dangling_ok``; a dangling
    one named as an image (it would fail only when a worker decodes it), one in a split folder
    (not ``dangling_ok``: a class linked from a subset such as ImageNet-100, whose target is
    mistyped or not mounted, would be left out without a word), a link loop or a target that
    cannot be stat'ed is an error."""
    try:
        return stat.S_ISDIR(entry.stat().st_mode)
    except OSError as e:
        if isinstance(e, FileNotFoundError) and dangling_ok and not _is_image(entry.name):
            return None
        try:
            target = os.fsdecode(os.readlink(entry.path))
        except OSError:
            target = "?"
        raise ImageNetFormatError(
            f"broken symbolic link {os.fsdecode(entry.path)} -> {target} ({e.strerror}); "
            "expected images and folders, or links to existing ones -- fix or remove the "
            "link") from e


def _walk_images(class_dir: bytes, others: _Tally | None = None) -> list[bytes]:
    """Image paths under class_dir relative to it, in make_dataset's order: folders by sorted
    full path (os.walk roots sorted), file names sorted within each folder, both as the str
    torchvision sees (``os.fsdecode``). Other files' paths (relative to class_dir, after
    ``others.prefix``) are tallied in ``others`` when given."""
    found: list[tuple[bytes, list[bytes]]] = []
    base = others.prefix if others is not None else b""
    stack = [(b"", frozenset())]
    while stack:
        rel, ancestors = stack.pop()
        folder = class_dir + _SEP + rel if rel else class_dir
        try:
            st = os.stat(folder)
        except OSError as e:
            raise ImageNetFormatError(f"cannot read {os.fsdecode(folder)} ({e.strerror}); "
                                      "expected a readable folder") from e
        key = (st.st_dev, st.st_ino)
        if key in ancestors:  # os.walk(followlinks=True) would recurse forever
            raise ImageNetFormatError(f"symlink loop at {os.fsdecode(folder)}; expected class "
                                      "folders without links to their own ancestors")
        if others is not None:
            others.prefix = base + rel + _SEP if rel else base
        dirs, images = _listdir(folder, others=others)
        found.append((rel, sorted(images, key=os.fsdecode)))
        stack.extend((rel + _SEP + d if rel else d, ancestors | {key}) for d in dirs)
    if others is not None:
        others.prefix = base
    found.sort(key=lambda item: os.fsdecode(item[0]))
    return [rel + _SEP + name if rel else name for rel, names in found for name in names]


def _check_root(root: str | os.PathLike) -> str:
    if isinstance(root, str) and not root:  # abspath("") would be the working folder
        raise ImageNetFormatError(f"ImageNet root {root!r} is empty; expected the path of a "
                                  "folder with train/ and val/")
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if not os.path.exists(root):
        raise ImageNetFormatError(f"ImageNet root {root} does not exist; expected a folder with "
                                  "train/ and val/")
    if not os.path.isdir(root):
        raise ImageNetFormatError(f"ImageNet root {root} is not a directory; expected a folder "
                                  "with train/ and val/")
    return root


def _split_folder(root: str, split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; accepted: {', '.join(SPLITS)}")
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise ImageNetFormatError(f"missing folder {folder}; expected {root} to hold train/ and "
                                  f"val/ {_root_hint(root)}")
    return folder


def _root_hint(root: str) -> str:
    """How to fix a root without a split folder: the root to pass where it can be told."""
    parent = os.path.dirname(root)
    for below in ("CLS-LOC", os.path.join("Data", "CLS-LOC"),
                  os.path.join("ILSVRC", "Data", "CLS-LOC")):  # Kaggle's download
        if os.path.isdir(os.path.join(root, below)):
            return (f"-- pass {os.path.join(root, below)} instead (Kaggle's CLS-LOC folder "
                    "below it, which holds them)")
    if os.path.basename(root) in SPLITS:
        return f"-- {root} is itself a split folder: pass its parent {parent}"
    if os.path.basename(parent) in SPLITS:
        return (f"-- {root} is a class folder of the split folder {parent}: pass "
                f"{os.path.dirname(parent)}")
    tars = [f"ILSVRC2012_img_{s}.tar" for s in SPLITS
            if os.path.isfile(os.path.join(root, f"ILSVRC2012_img_{s}.tar"))]
    if tars:  # the official download, not yet extracted
        return (f"-- extract {' and '.join(tars)} there first (train/ holds one n*.tar per "
                f"class: extract each into a folder of its name; val/ takes the 50,000 images "
                f"flat, labelled by the devkit)")
    return (f"(ImageFolder layout, or torchvision's with {DEVKIT_ARCHIVE} or {META_FILE} beside "
            "them)")


def _index_split(root: str, split: str, meta: _Meta | None) -> ImageIndex:
    folder = _split_folder(root, split)
    folder_b = os.fsencode(folder)
    archives: list[bytes] = []
    others = _Tally()
    dirs, top_images = _listdir(folder_b, archives, others, classes=True)
    # ILSVRC2012_img_train.tar extracted one level: one n01440764.tar per class, whose classes
    # would be missing. Fine: an archive kept beside its extracted folder, the official
    # ILSVRC2012_img_*.tar themselves (not per class), archives among a flat val's images.
    unextracted = [os.fsdecode(a) for a in archives
                   if a[:-4] not in dirs and not a.startswith(b"ILSVRC")]
    if unextracted and not top_images:
        raise ImageNetFormatError(
            f"{folder} holds {len(unextracted)} .tar archives not extracted into class folders "
            f"({_few(unextracted)}); expected {split}/<class>/<images> -- extract each archive "
            "into a folder of its name (ILSVRC2012_img_train.tar holds one per class)")
    if top_images and split == "train":
        raise ImageNetFormatError(f"{folder} holds {len(top_images)} images directly in it; "
                                  "expected train/<class>/<images>")
    if not top_images and [os.fsdecode(d) for d in dirs] in (
            [f"ILSVRC2012_img_{s}"] for s in SPLITS):  # an archive extracted into its own folder
        raise ImageNetFormatError(
            f"{folder} holds only {os.fsdecode(dirs[0])}/: the archive extracted into a folder "
            f"of its name, one level too deep; expected {split}/<class>/<images> (or a flat "
            f"val) -- move its contents up into {folder}")
    if top_images and dirs:
        raise ImageNetFormatError(
            f"{folder} holds both {len(dirs)} class folders and {len(top_images)} images "
            "directly in it (a half-sorted val?); expected class folders only, or (with a "
            "devkit) images only")
    # Names are sorted as torchvision sorts them, as str: bytes that are not UTF-8 decode to
    # surrogates (U+DC80..U+DCFF), which sort after most non-ASCII text, unlike their bytes.
    if top_images:
        return _index_flat_val(root, folder, sorted(top_images, key=os.fsdecode), meta, others)

    classes_b = sorted(dirs, key=os.fsdecode)
    others = _Tally()  # files beside the class folders are no class's (torchvision ignores them)
    rel_paths: list[bytes] = []
    targets: list[int] = []
    empty: list[str] = []
    for k, cls in enumerate(classes_b):
        others.prefix = cls + _SEP
        rels = _walk_images(folder_b + _SEP + cls, others)
        if not rels:
            empty.append(os.fsdecode(cls))
        rel_paths.extend(cls + _SEP + r for r in rels)
        targets.extend([k] * len(rels))
    if not rel_paths:
        packed = [os.fsdecode(a) for a in archives]
        raise ImageNetFormatError(
            f"{folder} holds no image files in {len(classes_b)} class folders; expected "
            f"{split}/<class>/<images> ({_accepted()})"
            + (f" -- it holds {_few(packed)}: extract {'it' if len(packed) == 1 else 'them'} "
               f"there" if packed else ""))
    if empty:
        raise ImageNetFormatError(
            f"class folder {os.path.join(folder, empty[0])} holds no image files"
            f"{f' (nor do {len(empty) - 1} others: {_few(empty[1:])})' if len(empty) > 1 else ''}; "
            f"expected at least one image per class ({_accepted()})")
    classes = tuple(os.fsdecode(c) for c in classes_b)
    return _pack(folder, classes, _class_names(classes, meta, folder), rel_paths, targets,
                 others)


def _index_flat_val(root: str, folder: str, names: list[bytes], meta: _Meta | None,
                    others: _Tally | None = None) -> ImageIndex:
    if meta is None:
        raise ImageNetFormatError(
            f"{folder} is flat ({len(names)} images, no class folders) and {root} has no "
            f"devkit; expected {os.path.join(root, DEVKIT_ARCHIVE)} (or torchvision's "
            f"{META_FILE}, or Kaggle's {KAGGLE_SOLUTION}) to label them, or "
            f"val/<class>/<images>")
    if meta.val_by_id is not None:
        wnids, lines = _wnids_by_id(folder, names, meta)
        where = [f"{meta.source} line {line}" for line in lines]
    elif len(meta.val_wnids) != len(names):
        raise ImageNetFormatError(
            f"{meta.source} has ground truth for {len(meta.val_wnids)} val images but {folder} "
            f"holds {len(names)}; expected one label per image (sorted file names are zipped "
            "with the ground truth)")
    else:  # as parse_val_archive: the k-th sorted file name gets the k-th ground-truth wnid
        wnids = meta.val_wnids
        where = [f"{meta.source} (ground truth entry {k + 1})" for k in range(len(names))]
    unknown = [k for k, w in enumerate(wnids) if w not in meta.wnid_to_classes]
    if unknown:
        k = unknown[0]
        others = {wnids[j] for j in unknown[1:]}
        raise ImageNetFormatError(
            f"{where[k]} labels {os.path.join(folder, os.fsdecode(names[k]))} {wnids[k]}, which "
            f"{meta.names_from} does not list"
            + (f" ({len(unknown) - 1} more images have wnids it lacks: {_few(others)})"
               if others else "")
            + f"; expected one of the {len(meta.wnid_to_classes)} wnids it lists")
    classes = tuple(sorted(set(wnids)))
    class_to_idx = {c: k for k, c in enumerate(classes)}
    labels = np.fromiter((class_to_idx[w] for w in wnids), dtype=np.int64, count=len(names))
    order = np.argsort(labels, kind="stable")  # names are sorted: order by (class, name)
    return _pack(folder, classes, _class_names(classes, meta, folder),
                 [names[i] for i in order], labels[order], others)


def _wnids_by_id(folder: str, names: list[bytes], meta: _Meta) -> tuple[list[str], list[int]]:
    """A flat val labelled by image id (Kaggle): each file's name without its extension is
    looked up; the ground truth may name more images than the folder holds, never fewer.
    Returns the wnid and the CSV line of each image."""
    ids = [os.fsdecode(n).rsplit(".", 1)[0] for n in names]
    unlabelled = [os.fsdecode(n) for n, i in zip(names, ids) if i not in meta.val_by_id]
    if unlabelled:
        raise ImageNetFormatError(
            f"{len(unlabelled)} of {len(names)} images in {folder} have no row in "
            f"{meta.source} ({_few(unlabelled)}); expected an ImageId row for every image")
    rows = [meta.val_by_id[i] for i in ids]
    return [wnid for wnid, _ in rows], [line for _, line in rows]


def _class_names(classes: tuple[str, ...], meta: _Meta | None, folder: str) -> tuple[str, ...]:
    if meta is None:
        return classes
    # (a flat val's classes are its labels, already checked against the metadata)
    unknown = [c for c in classes if c not in meta.wnid_to_classes]
    if unknown:
        raise ImageNetFormatError(
            meta.unknown_wnids(f"{len(unknown)} class folders of {folder} are", unknown))
    return tuple(meta.wnid_to_classes[c][0] for c in classes)


# --------------------------------------------------------------------------------------------
# Public entry points


def index_split(root: str | os.PathLike, split: str) -> ImageIndex:
    """Index one split ("train" or "val") of an ImageNet root in any layout the module reads (module doc).
    Checks the split alone; :func:`index_imagenet` also checks the splits agree."""
    root = _check_root(root)
    _split_folder(root, split)
    return _index_split(root, split, _load_meta(root))


def index_imagenet(root: str | os.PathLike) -> tuple[ImageIndex, ImageIndex]:
    """(train, val) indices of an ImageNet root in any layout the module reads, checked: both folders exist,
    every class has images, val has exactly train's classes (so targets mean the same)."""
    root = _check_root(root)
    train_folder, val_folder = (_split_folder(root, s) for s in SPLITS)
    meta = _load_meta(root)
    train = _index_split(root, "train", meta)
    val = _index_split(root, "val", meta)
    if val.classes != train.classes:
        only_train = set(train.classes) - set(val.classes)
        only_val = set(val.classes) - set(train.classes)
        raise ImageNetFormatError(
            f"val classes differ from train classes: {len(only_train)} of {len(train.classes)} "
            f"train classes missing from {val_folder} ({_few(only_train) or '-'}), "
            f"{len(only_val)} of {len(val.classes)} val classes missing from {train_folder} "
            f"({_few(only_val) or '-'}); expected the same classes in both")
    return train, val


def describe(root: str | os.PathLike) -> str:
    """Which layout ``root`` has, from directory listings (no image, devkit or CSV is read;
    Kaggle's synset mapping is, for a tree whose val is not flat): "ImageFolder layout",
    "ImageFolder layout (class names from <LOC_synset_mapping.txt>)", "torchvision ImageNet
    layout (<devkit file>, flat val | sorted val)" or "Kaggle ImageNet layout (<CSV>, flat val)".
    """
    root = _check_root(root)
    val_form = _val_form(root)
    source = _devkit_source(root)
    if source is not None:
        return f"torchvision ImageNet layout ({os.path.basename(source)}, {val_form})"
    solution = _kaggle_source(root)
    if solution is not None and val_form in ("flat val", "half-sorted val"):
        return f"Kaggle ImageNet layout ({solution}, {val_form})"
    notes = [] if val_form == "sorted val" else [val_form]
    names = _kaggle_names(root, solution) if solution is not None else None
    if names is not None:
        notes.append(f"class names from {names.source}")
    return "ImageFolder layout" + (f" ({', '.join(notes)})" if notes else "")


# --------------------------------------------------------------------------------------------
# Decoding one sample (in DataLoader workers)

#: A removed file changes the index every trial reads, which ``--resume`` refuses (the run's
#: data fingerprint): a resume needs the file back, readable.
_FIX_IMAGE = ("replace it with a readable copy of the image, then rerun with --resume (removing "
              "it changes the data, which --resume refuses: then start a new run)")


def read_rgb(path: str) -> Image.Image:
    """The image at ``path`` decoded as 8-bit RGB (module doc: Pillow's ``convert("RGB")``,
    16-bit grey scaled by 255/65535). Any failure to open or decode it is an
    :class:`ImageNetFormatError` naming the file: a plain ValueError subclass, so it crosses a
    DataLoader worker's pickling with its type and message (torch prefixes the worker's
    traceback; the message is its last line). A file this node cannot reach (not there, no
    permission, a stale mount; ``references.cache.unreachable_data``) is a
    ``records.errors.DataUnreachable`` instead, an OSError: no format error, which would end
    the trial for good on every node."""
    try:
        with Image.open(path) as img:
            img.load()
            return _to_rgb(img, path)
    except ImageNetFormatError:
        raise
    except Exception as e:  # Pillow raises many types on bad data (OSError, ValueError,
        # SyntaxError, DecompressionBombError, struct.error, ...); the reason names it
        from references.cache import cache_entry_of, damaged_entry, unreachable_data

        away = unreachable_data(path, e)
        if away is not None:  # not this file's content: this node cannot reach it
            raise away from e

        entry = cache_entry_of(path)
        if entry is not None:  # a generated world's file: rebuilt, not edited by hand
            raise ImageNetFormatError(
                damaged_entry(entry, f"cannot decode image {path}: {_reason(e)}")) from e
        # Pillow repeats the path in some reasons ("cannot identify image file '/...'"): once
        # is enough, and it would push the remedy past the driver's summary line.
        reason = _reason(e).replace(f" '{path}'", "").replace(f" {path}", "")
        raise ImageNetFormatError(f"cannot decode image {path} ({reason}); expected an image "
                                  f"file Pillow can read -- {_FIX_IMAGE}") from e


def _to_rgb(img: Image.Image, path: str) -> Image.Image:
    if img.mode == "I" or img.mode.startswith("I;16"):
        # convert("RGB") clips these at 255 (a 16-bit photo turns almost white). 8-bit values
        # saved in a wider integer file (numpy's or OpenCV's uint16 / int32 written as PNG or
        # TIFF) are kept as they are: scaled by 1/257 they read as 0..1, a black image. A file
        # whose largest value is at most 255 is read so (a true 16-bit image that dark would
        # be black at 8 bits anyway); any other is scaled, 65535 to 255.
        grey = np.asarray(img)
        lo, hi = (int(grey.min()), int(grey.max())) if grey.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise ImageNetFormatError(
                f"image {path} is {img.mode!r} (integer grey) with values in {lo}..{hi}; "
                f"expected 8-bit images or 16-bit grey (0..65535) -- convert it to 8 bits, "
                f"or {_FIX_IMAGE}")
        img = Image.fromarray(grey.astype(np.uint8) if hi <= 255 else
                              ((grey.astype(np.uint32) + 128) // 257).astype(np.uint8))
    elif img.mode == "F":
        # convert("RGB") truncates and clips at 0..255, so a float image scaled 0..1 (the
        # usual) turns black; which scale a file means cannot be told from it.
        grey = np.asarray(img)
        lo, hi = (float(np.nanmin(grey)), float(np.nanmax(grey))) if grey.size else (0.0, 0.0)
        raise ImageNetFormatError(
            f"image {path} is 'F' (32-bit float, values {lo:g}..{hi:g}), whose scale (0..1 or "
            f"0..255) is ambiguous; expected 8-bit images or 16-bit grey -- convert it to 8 "
            f"bits, or {_FIX_IMAGE}")
    return img.convert("RGB")
