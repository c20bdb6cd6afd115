"""The datasets the trainable reads, with one item protocol for all of them
(``trainable.data``): ``dataset[i] -> (image uint8 (3, S, S), target, image_id)``.

* target : int64 scalar class index (single-label) or float32 (80,) COCO multi-hot
  (multi-label, columns by ascending COCO category id);
* image_id : int64 scalar -- the nsdId for NSD, the index within the split for ImageFolder.

A dataset object is an index over files (paths or ids and labels), small enough to go through
Ray's object store and to be inherited by DataLoader worker processes; images are read and
decoded in the worker, one item at a time. Nothing here holds a decoded split.

Datasets:

* :class:`ImageFolderDataset`: ImageNet as labs have it, either the ImageFolder layout
  ``root/{train,val}/<class>/*`` or torchvision's ``ImageNet(root)`` layout (devkit archive
  beside the split folders, val flat or sorted; ``references.imagenet``), through torchvision's
  classification pipeline: train ``augment="crop_flip"`` (RandomResizedCrop + horizontal flip,
  in the worker), evaluation: resize to image_size * 256/224 then centre crop. With
  ``augment="flip"`` or ``"none"`` every split yields the evaluation view (the trainable flips
  batches for "flip"). The simulated single-label set goes through it with "flip".
* :class:`NSDDataset`: a table written by ``python -m references.nsd prepare`` plus
  nsd_stimuli.hdf5 (each stimulus read by index in the worker, resized to image_size, never
  cropped or flipped: a voxel responded to the image as shown), with a fixed 80/20 train/test
  split by seed over the table's unique images; :class:`VoxelResponses` says which subject has
  which response (kept in the bundle, not in the datasets).

:class:`DataBundle` and the ``*_bundle`` builders put a train split, a validation split and (for
NSD) the voxel responses together for the reference registry.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from torch.utils.data import Dataset

from records.errors import one_line
from references import imagenet, nsd
from references.cache import unreachable_data
from references.imagenet import ImageIndex
from trainable.data import AUGMENTATIONS

# torchvision's reference evaluates at crop 224 of a 256 resize.
EVAL_CROP_RATIO = 224 / 256


def resize_center(images: torch.Tensor, size: int, crop_ratio: float = 1.0) -> torch.Tensor:
    """Resize (antialiased bilinear) so the shorter side is ``round(size / crop_ratio)``, then
    centre-crop to (size, size). uint8 (..., 3, H, W) -> uint8 (..., 3, size, size)."""
    resized = TF.resize(images, [round(size / crop_ratio)], antialias=True)
    return TF.center_crop(resized, [size, size])


# --------------------------------------------------------------------------------------------
# ImageFolder (ImageNet layout)


def _check_split(split: str, accepted: tuple[str, ...]) -> None:
    if split not in accepted:
        raise ValueError(f"split={split!r}; accepted: {', '.join(accepted)}")


def _check_size(image_size: int) -> None:
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size={image_size!r}; accepted: an int >= 8")


def _check_augment(augment: str) -> None:
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment={augment!r}; accepted: {', '.join(AUGMENTATIONS)}")


class ImageFolderDataset(Dataset):
    """One split of an ImageNet-layout tree (``references.imagenet``) through torchvision's
    classification pipeline.

    Items: (uint8 (3, S, S), int64 class index, int64 index in this split). Classes are the
    sorted folder names / wnids (``classes``; ``class_names`` the devkit's words where there
    is a devkit). ``augment`` (default "crop_flip" for "train", "none" for "val"): "crop_flip"
    = RandomResizedCrop(S) + RandomHorizontalFlip here; otherwise resize to S * 256/224 and
    centre-crop. Augmentation draws from torch's global RNG (each DataLoader worker seeds its
    own). ``index``: an already built ``ImageIndex`` of the split (the driver builds it once).
    Images are decoded by ``references.imagenet.read_rgb`` (8-bit RGB, 16-bit grey scaled; a
    corrupt file is an ``ImageNetFormatError`` naming it).
    """

    def __init__(self, root: str | os.PathLike, *, split: str = "train", image_size: int = 224,
                 augment: str | None = None, index: ImageIndex | None = None,
                 whole: bool = False) -> None:
        _check_split(split, ("train", "val"))
        _check_size(image_size)
        augment = ("crop_flip" if split == "train" else "none") if augment is None else augment
        _check_augment(augment)
        self.root, self.split, self.image_size = Path(root), split, image_size
        self.augment = augment
        self.index = index if index is not None else imagenet.index_split(root, split)
        self.classes: list[str] = list(self.index.classes)
        self.class_names: tuple[str, ...] = tuple(self.index.class_names)
        # whole: images made at the size they are seen at (the simulated world) are seen as
        # made, resized to S but not cropped; the 256/224 view upscaled a 64 px scene to 73
        # and cut 4-5 px of each border (objects at the edge, gratings 1.14x finer)
        self._eval = ((lambda img: resize_center(img, image_size)) if whole else
                      T.Compose([T.Resize(round(image_size / EVAL_CROP_RATIO)),
                                 T.CenterCrop(image_size)]))
        self._train = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # A file Pillow cannot decode is a one-line ImageNetFormatError naming it, never skipped.
        img = TF.pil_to_tensor(imagenet.read_rgb(self.index.path(index)))
        img = (self._train if self.augment == "crop_flip" else self._eval)(img)
        return (img, torch.tensor(self.index.target(index), dtype=torch.int64),
                torch.tensor(index, dtype=torch.int64))


# --------------------------------------------------------------------------------------------
# NSD


def _largest_threshold(ncsnr: torch.Tensor, digits: int = 3) -> float:
    """The largest ``digits``-significant-digit threshold that keeps a voxel of ``ncsnr`` as
    ``select_voxels`` compares (in the tensor's precision): its largest value rounded down,
    so a printed limit still holds (.3g prints 0.6 for 0.5996); 0 when none is positive."""
    top = float(ncsnr.max()) if ncsnr.numel() else 0.0
    if not top > 0:
        return 0.0
    scale = 10.0 ** (math.floor(math.log10(top)) - digits + 1)
    near = float(f"{top:.{digits}g}")
    for c in (near, float(f"{near - scale:.{digits}g}")):
        if c > 0 and bool((ncsnr >= c).any()):
            return c
    return 0.0


class VoxelResponses:
    """Voxel responses of several subjects, keyed by nsdId.

    ``per_subject`` maps subject -> (ids (n,) int64 ascending, Y (n, n_voxels) float32); subjects
    may differ in n (images seen) and n_voxels (their own ROI masks).
    ``ncsnr`` (optional) maps subject -> (n_voxels,) the release's noise-ceiling SNR per voxel;
    ``repeats`` (optional) subject -> (n,) how many trials each response averages. With both,
    :meth:`noise_ceilings` gives each voxel's ceiling for a set of images.
    """

    def __init__(self, per_subject: dict[int, tuple[torch.Tensor, torch.Tensor]],
                 roi: str = "", *, ncsnr: dict[int, torch.Tensor] | None = None,
                 repeats: dict[int, torch.Tensor] | None = None) -> None:
        if not per_subject:
            raise ValueError("VoxelResponses needs at least one subject")
        self._data: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for s in sorted(per_subject):
            ids, y = per_subject[s]
            ids = torch.as_tensor(ids, dtype=torch.int64).contiguous()
            y = torch.as_tensor(y, dtype=torch.float32).contiguous()
            if ids.ndim != 1 or y.ndim != 2 or y.shape[0] != ids.shape[0]:
                raise ValueError(f"subject {s}: ids must be (n,) and Y (n, voxels), got "
                                 f"{tuple(ids.shape)} and {tuple(y.shape)}")
            if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
                raise ValueError(f"subject {s}: ids must be strictly ascending")
            self._data[int(s)] = (ids, y)
        self.roi = roi
        self.ncsnr = {int(s): torch.as_tensor(v, dtype=torch.float32)
                      for s, v in (ncsnr or {}).items() if v is not None}
        self.repeats = {int(s): torch.as_tensor(v, dtype=torch.float32)
                        for s, v in (repeats or {}).items()}
        for s, v in self.ncsnr.items():
            if s not in self._data or v.shape != (self._data[s][1].shape[1],):
                raise ValueError(f"subject {s}: ncsnr must have one value per voxel "
                                 f"({self._data.get(s, (None, torch.empty(0, 0)))[1].shape[1]})"
                                 f", got shape {tuple(v.shape)}")

    @classmethod
    def from_table(cls, table: pa.Table | str | os.PathLike,
                   subjects: Sequence[int] | None = None) -> VoxelResponses:
        """From a prepared NSD table (or its path); ``subjects`` None = all in the table."""
        if not isinstance(table, pa.Table):
            table, _ = nsd.read_prepared(table)
        meta = nsd.prepared_metadata(table)
        available = sorted(meta["n_voxels"])
        chosen = available if subjects is None else sorted({int(s) for s in subjects})
        missing = [s for s in chosen if s not in available]
        if missing or not chosen:
            raise ValueError(f"subjects {missing or chosen} not in the table; available: "
                             f"{available}")
        per_subject, repeats = {}, {}
        for s in chosen:
            rows = table.filter(pc.equal(table["subject"], s)).sort_by("nsd_id")
            n_vox = meta["n_voxels"][s]
            values = pc.list_flatten(rows["response"]).to_numpy()
            per_subject[s] = (torch.from_numpy(rows["nsd_id"].to_numpy().copy()),
                              torch.from_numpy(values.reshape(rows.num_rows, n_vox).copy()))
            repeats[s] = torch.from_numpy(rows["n_repeats"].to_numpy().astype(np.float32))
        ncsnr = {s: meta["ncsnr"].get(s) for s in chosen}
        return cls(per_subject, roi=meta["roi"], ncsnr=ncsnr, repeats=repeats)

    def noise_ceilings(self, subject: int, image_ids: torch.Tensor) -> torch.Tensor | None:
        """(n_voxels,) float64: each voxel's noise ceiling for the subject's responses to
        ``image_ids`` (``references.nsd.ceiling_from_ncsnr`` with their repeat counts), or
        None without an ncsnr for the subject."""
        if subject not in self.ncsnr or subject not in self.repeats:
            return None
        ids, _ = self._data[subject]
        query = torch.as_tensor(image_ids, dtype=torch.int64).to(ids.device)
        pos = torch.searchsorted(ids, query).clamp_(max=ids.numel() - 1)
        pos = pos[ids[pos] == query]
        if pos.numel() == 0:
            return None
        n = self.repeats[subject].to(pos.device)[pos].cpu().numpy()
        return torch.from_numpy(nsd.ceiling_from_ncsnr(self.ncsnr[subject].cpu().numpy(), n))

    def select_voxels(self, ncsnr_min: float) -> VoxelResponses:
        """The voxels whose ncsnr is at least ``ncsnr_min``, per subject; an error when the
        data has no ncsnr or a subject keeps no voxel."""
        if set(self.ncsnr) != set(self._data):
            raise ValueError(f"voxel_ncsnr_min={ncsnr_min!r} needs each voxel's ncsnr, but "
                             f"subjects {sorted(set(self._data) - set(self.ncsnr))} have none "
                             f"(the release has no ncsnr.nii.gz); accepted: 0 (all voxels)")
        data, ncsnr = {}, {}
        for s, (ids, y) in self._data.items():
            keep = self.ncsnr[s].to(y.device) >= ncsnr_min
            if not bool(keep.any()):
                top = float(self.ncsnr[s].max()) if self.ncsnr[s].numel() else float("nan")
                # every subject keeps a voxel up to the smallest of their largest ncsnr
                most = min(_largest_threshold(v) for v in self.ncsnr.values())
                accepted = f"0 (all voxels) to {most:g}" if most > 0 else "0 (all voxels)"
                raise ValueError(f"voxel_ncsnr_min={ncsnr_min!r} keeps no voxel of subject {s} "
                                 f"(its largest ncsnr is {top:.3g}); accepted: {accepted}")
            data[s], ncsnr[s] = (ids, y[:, keep]), self.ncsnr[s][keep.cpu()]
        return VoxelResponses(data, roi=self.roi, ncsnr=ncsnr, repeats=self.repeats)

    @property
    def subjects(self) -> tuple[int, ...]:
        return tuple(self._data)

    @property
    def n_voxels(self) -> dict[int, int]:
        return {s: y.shape[1] for s, (_, y) in self._data.items()}

    def image_ids(self, subject: int) -> torch.Tensor:
        """(n,) int64 ascending nsdIds with a response from ``subject``."""
        return self._data[subject][0]

    def responses(self, subject: int) -> torch.Tensor:
        """(n, n_voxels) float32, rows aligned with :meth:`image_ids`."""
        return self._data[subject][1]

    def groups(self, image_ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """subject -> (rows, Y) for each subject with a response to some of ``image_ids``.

        image_ids : (B,) int64. rows : (k,) int64 positions in the batch, ascending;
        Y : (k, n_voxels) float32, Y[j] the subject's response to image_ids[rows[j]].
        Tensors are on the stored device (see :meth:`to`).
        """
        out = {}
        for s, (pos, seen) in self._matches(image_ids).items():
            rows = torch.nonzero(seen).squeeze(1)
            if rows.numel():
                out[s] = (rows, self._data[s][1][pos[rows]])
        return out

    def group_sizes(self, image_ids: torch.Tensor) -> dict[int, int]:
        """subject -> how many of ``image_ids`` it has a response to (as :meth:`groups`
        would give them, without gathering the responses)."""
        sizes = {s: int(seen.sum()) for s, (_, seen) in self._matches(image_ids).items()}
        return {s: k for s, k in sizes.items() if k}

    def _matches(self, image_ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """subject -> (pos, seen) for ``image_ids`` (B,): ``seen`` (B,) bool, whether the
        subject has a response to each id; ``pos`` (B,) where it is in the subject's rows."""
        image_ids = torch.as_tensor(image_ids, dtype=torch.int64)
        out = {}
        for s, (ids, _) in self._data.items():
            query = image_ids.to(ids.device)
            pos = torch.searchsorted(ids, query).clamp_(max=ids.numel() - 1)
            out[s] = (pos, ids[pos] == query)
        return out

    def targets(self, images: torch.Tensor, image_ids: torch.Tensor
                ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The reference protocol the trainable calls: voxel responses depend only on the
        image ids (``images`` is unused), grouped per subject (:meth:`groups`)."""
        return self.groups(image_ids)

    def lookup(self, image_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`groups` as a list of (rows, Y), in ascending subject order; images without a
        response from any of the subjects appear in no group."""
        return list(self.groups(image_ids).values())

    def to(self, device: torch.device | str) -> VoxelResponses:
        return VoxelResponses({s: (i.to(device), y.to(device)) for s, (i, y) in
                               self._data.items()}, roi=self.roi, ncsnr=self.ncsnr,
                              repeats=self.repeats)


class _Stimuli:
    """Lazy reader of nsd_stimuli.hdf5 ``imgBrick`` (images, H, W, 3) uint8; reopens after a
    fork/pickle so DataLoader workers each hold their own handle."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.n_images = nsd.stimuli_shape(self.path)[0]
        self._file: h5py.File | None = None
        self._pid = -1

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None, "_pid": -1}

    def _dataset(self) -> h5py.Dataset:
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._file[nsd.STIMULI_DATASET]

    def read(self, ids: np.ndarray) -> torch.Tensor:
        """ids (k,) strictly ascending nsdIds -> uint8 (k, 3, H, W)."""
        ids = np.asarray(ids)
        try:
            block = self._dataset()[ids]
        except (OSError, RuntimeError) as exc:
            raise self._unreadable(ids, exc) from None
        return torch.from_numpy(block).permute(0, 3, 1, 2)

    def read_one(self, nsd_id: int) -> torch.Tensor:
        """One stimulus -> uint8 (3, H, W) (a plain slice: no fancy-index overhead)."""
        try:
            image = self._dataset()[int(nsd_id)]
        except (OSError, RuntimeError) as exc:
            raise self._unreadable(np.array([nsd_id]), exc) from None
        return torch.from_numpy(image).permute(2, 0, 1)

    def _unreadable(self, ids: np.ndarray, exc: BaseException) -> OSError | nsd.NSDFormatError:
        """A read h5py failed (a corrupt or truncated chunk, a filter it lacks): the file and
        the images, as a format error, which a trial's retry would meet again (Tune retried
        an OSError twice, and the summary named neither). A file this node cannot reach
        (not there, no permission, a stale mount: ``references.cache.unreachable_data``) is no
        format error: Tune's retry may run where it is."""
        away = unreachable_data(self.path, exc)
        if away is not None:
            return away
        shown = ", ".join(str(int(i)) for i in ids[:5]) + (", ..." if len(ids) > 5 else "")
        why = one_line(exc) or type(exc).__name__
        return nsd.NSDFormatError(
            f"{self.path}: cannot read '{nsd.STIMULI_DATASET}' image(s) nsdId {shown} ({why}); "
            f"expected a complete HDF5 file -- copy it again from the release, then rerun with "
            f"--resume")


#: the seed of :func:`nsd_split` a run's NSD data is opened with (``references._nsd_release``,
#: :func:`simulated_nsd_bundle`), so a dry run sizes the splits the trials will get
NSD_SPLIT_SEED = 0


def nsd_split(image_ids: np.ndarray, *, seed: int, test_fraction: float = 0.2) -> tuple[
        np.ndarray, np.ndarray]:
    """Split unique nsdIds into (train, test), both ascending: a seeded permutation of the sorted
    ids, the first ``round(test_fraction * n)`` of it is test. Depends only on the id set and
    the seed."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction!r}; accepted: strictly between 0 and 1")
    ids = np.unique(np.asarray(image_ids, np.int64))
    perm = np.random.default_rng(seed).permutation(ids.size)
    n_test = int(round(test_fraction * ids.size))
    return np.sort(ids[perm[n_test:]]), np.sort(ids[perm[:n_test]])


class NSDDataset(Dataset):
    """A split of a prepared NSD table, images from nsd_stimuli.hdf5.

    Items: (uint8 (3, S, S), float32 (80,) multi-hot, int64 nsdId); each stimulus is read by
    index and resized to S (never cropped beyond the square stimulus, never flipped). The split
    is :func:`nsd_split` over all unique images of the table (whatever ``subjects`` selects), so
    the same table and seed always give the same split; the dataset then holds the images of
    that split seen by at least one selected subject, ascending by nsdId. ``subjects`` (tuple)
    and ``subject_mask`` (N, n_subjects) bool say which selected subject saw which image.
    ``responses``: the :class:`VoxelResponses` of the table for ``subjects`` when the caller
    has it (it is read from the table otherwise); the dataset does not keep it, so what goes
    to DataLoader workers and through the object store is ids and labels only.
    """

    augment = "none"

    def __init__(self, table: str | os.PathLike, stimuli: str | os.PathLike, *,
                 split: Literal["train", "test"] = "train", image_size: int = 224,
                 seed: int = 0, subjects: Sequence[int] | None = None,
                 test_fraction: float = 0.2, responses: VoxelResponses | None = None) -> None:
        _check_split(split, ("train", "test"))
        _check_size(image_size)
        tab, meta = nsd.read_prepared(table)
        self.table_path, self.split = Path(table), split
        self.image_size, self.seed = image_size, seed
        self.roi: str = meta["roi"]
        self.category_ids: tuple[int, ...] = tuple(meta["category_ids"])
        self.category_names: tuple[str, ...] = tuple(meta["category_names"])
        if responses is None:
            responses = VoxelResponses.from_table(tab, subjects)
        self.subjects: tuple[int, ...] = responses.subjects
        train, test = nsd_split(tab["nsd_id"].to_numpy(), seed=seed, test_fraction=test_fraction)
        keep = train if split == "train" else test
        seen = np.unique(np.concatenate([responses.image_ids(s).numpy()
                                         for s in responses.subjects]))
        ids = np.intersect1d(keep, seen)
        first = tab.sort_by("nsd_id")
        all_ids = first["nsd_id"].to_numpy()
        row = np.searchsorted(all_ids, ids)  # first row of each id (labels equal across subjects)
        labels = pc.list_flatten(first["labels"]).to_numpy().reshape(-1, nsd.N_COCO_CATEGORIES)
        self.image_ids = torch.from_numpy(ids.copy())
        self.labels = torch.from_numpy(labels[row].astype(np.float32))
        self.subject_mask = torch.stack(
            [torch.from_numpy(np.isin(ids, responses.image_ids(s).numpy()))
             for s in responses.subjects], dim=1)
        self.stimuli = _Stimuli(Path(stimuli))
        if ids.size and ids.max() >= self.stimuli.n_images:
            raise nsd.NSDFormatError(f"{self.stimuli.path}: holds {self.stimuli.n_images} images "
                                     f"but the table uses nsdId {int(ids.max())}")

    def __len__(self) -> int:
        return self.image_ids.numel()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        nsd_id = self.image_ids[index]
        img = resize_center(self.stimuli.read_one(int(nsd_id)), self.image_size)
        return img, self.labels[index], nsd_id


# --------------------------------------------------------------------------------------------
# Bundles for the registry


@dataclass(frozen=True)
class DataBundle:
    """What a sweep's data section resolves to.

    train, val : datasets with the item protocol above (for NSD, val is the test split).
    task : "single_label" (cross-entropy, top-1) or "multi_label" (BCE, mAP over 80 columns;
        categories without positives in a split have no AP).
    image_size : S of the items. augment : the training split's augmentation
        ("crop_flip", "flip" or "none", ``trainable.data``).
    responses : voxel responses for NSD data, else None.
    """

    train: Dataset
    val: Dataset
    task: Literal["single_label", "multi_label"]
    num_classes: int
    class_names: tuple[str, ...]
    image_size: int
    augment: str = "none"
    responses: VoxelResponses | None = None


def content_identity(bundle: DataBundle) -> str:
    """A digest of what ``bundle`` holds, cheap to compute (no image is read): for each split,
    its kind, where it lives (resolved: a simulated world's cache folder is named by the
    generator's version and arguments, a prepared NSD table by its sources) and its samples
    (an image folder's file list and labels; an NSD split's image ids and labels, and the
    size and time of its table and stimuli files). What a cached reference network trained
    on the data is keyed by, so other data at the same path (a regenerated world, an ImageNet
    copy with other files or labels) trains another."""
    h = hashlib.sha256()
    for split in (bundle.train, bundle.val):
        h.update(type(split).__name__.encode())
        if isinstance(split, ImageFolderDataset):
            h.update(os.fsencode(os.path.realpath(split.index.root)))
            h.update(split.index.content())
        elif isinstance(split, NSDDataset):
            for path in (split.table_path, split.stimuli.path):
                st = path.stat()
                h.update(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
            h.update(split.image_ids.numpy().tobytes())
            h.update(split.labels.numpy().tobytes())
        else:  # in-memory data (tests, user code): by content
            from references.pretrained import dataset_fingerprint

            h.update(dataset_fingerprint(split).encode())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=4)
def _imagenet_index(root: str) -> tuple[ImageIndex, ImageIndex]:
    return imagenet.index_imagenet(root)


def imagenet_index(root: str | os.PathLike) -> tuple[ImageIndex, ImageIndex]:
    """``references.imagenet.index_imagenet`` of ``root``, kept for the process (the dry run's
    check and the run's data preparation scan a large tree once). Keyed by ``root`` made
    absolute but not resolved: Kaggle's files are searched above the root as given, so a root
    that is a symbolic link finds them beside the link, not above its target."""
    root = os.fspath(root)
    # "" stays "" (refused by index_imagenet, not read as the working folder)
    return _imagenet_index(os.path.abspath(os.path.expanduser(root)) if root else root)


def imagefolder_bundle(root: str | os.PathLike, *, image_size: int,
                       augment: str = "crop_flip", whole: bool = False) -> DataBundle:
    """An ImageNet tree in any of its layouts (``references.imagenet.index_imagenet``: both splits
    indexed once, classes checked equal): train with ``augment``, val with the evaluation view
    (``whole``: each image resized to the trained size, not centre-cropped).
    """
    _check_augment(augment)
    train_index, val_index = imagenet_index(root)
    train = ImageFolderDataset(root, split="train", image_size=image_size, augment=augment,
                               index=train_index, whole=whole)
    val = ImageFolderDataset(root, split="val", image_size=image_size, index=val_index,
                             whole=whole)
    return DataBundle(train, val, "single_label", len(train.classes), train.class_names,
                      image_size, augment)


def nsd_bundle(table: str | os.PathLike, stimuli: str | os.PathLike, *, image_size: int,
               seed: int = 0, subjects: Sequence[int] | None = None,
               test_fraction: float = 0.2) -> DataBundle:
    """A prepared NSD table: train and test splits; one :class:`VoxelResponses` for both."""
    responses = VoxelResponses.from_table(table, subjects)
    kw = dict(image_size=image_size, seed=seed, subjects=subjects, test_fraction=test_fraction,
              responses=responses)
    train = NSDDataset(table, stimuli, split="train", **kw)
    test = NSDDataset(table, stimuli, split="test", **kw)
    return DataBundle(train, test, "multi_label", nsd.N_COCO_CATEGORIES, train.category_names,
                      image_size, "none", responses)


def simulated_single_label_bundle(*, image_size: int, render_size: int = 64,
                                  augment: str = "flip", **generate_kwargs) -> DataBundle:
    """The simulated single-label world (rendered at ``render_size``, cached) read through the
    ImageFolder path at ``image_size``; its training split is augmented by horizontal flips
    only (the scenes are drawn at the size they are trained at: a random crop would cut the
    objects). ``generate_kwargs`` go to :func:`references.simulated.generate_single_label`
    (n_categories, seed, ...)."""
    from references.simulated import generate_single_label

    root = generate_single_label(image_size=render_size, **generate_kwargs)
    return imagefolder_bundle(root, image_size=image_size, augment=augment, whole=True)


def simulated_nsd_bundle(*, roi: str, image_size: int, render_size: int = 64,
                         split_seed: int = NSD_SPLIT_SEED,
                         subjects: Sequence[int] | None = None,
                         **generate_kwargs) -> DataBundle:
    """The simulated NSD-like world: generate (cached), prepare the ROI table (cached), read it.
    ``generate_kwargs`` go to :func:`references.simulated.generate_nsd_like` (n_images, seed,
    ...); ``subjects`` None = every simulated subject."""
    from references.simulated import generate_nsd_like

    sim = generate_nsd_like(image_size=render_size, **generate_kwargs)
    chosen = sim.subjects if subjects is None else subjects
    table = nsd.prepare_cached(sim.nsd_root, sim.coco_annotations, chosen, roi, progress=False)
    return nsd_bundle(table, sim.stimuli, image_size=image_size, seed=split_seed,
                      subjects=chosen)
