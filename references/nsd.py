"""Natural Scenes Dataset: native release -> prepared Parquet table.

Reads the release exactly as published (paths relative to ``--nsd-root``)::

    nsddata/experiments/nsd/nsd_expdesign.mat        masterordering (1, trials), 1-based indices
                                                     into a subject's image list; subjectim
                                                     (8, images), 1-based nsdIds; sharedix
    nsddata/experiments/nsd/nsd_stim_info_merged.csv nsdId (0-based), cocoId, cocoSplit, ...
    nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5     imgBrick (images, H, W, 3) uint8
    nsddata_betas/ppdata/subjNN/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_sessionSS.hdf5
                                                     betas (trials, z, y, x) int16 = % signal x 300
                                                     (or betas_sessionSS.nii.gz, as the release
                                                     also ships them: (x, y, z, trials))
    nsddata/ppdata/subjNN/func1pt8mm/roi/prf-visualrois.nii.gz   (x, y, z); V1 = labels 1, 2
    nsddata/ppdata/subjNN/func1pt8mm/roi/streams.nii.gz          (x, y, z); VVS = label 5

plus ``instances_train2017.json`` / ``instances_val2017.json`` in ``--coco-annotations``. Each
NIfTI file (ncsnr.nii.gz beside the betas too) may be stored uncompressed, as ``.nii``; both
forms at once are refused, since which one is meant cannot be told.

What is fixed by the release is checked strictly (dataset names, axis order, 1-based indices);
what legitimately varies is read from disk: image size, trials per session (a file's first
dimension, 750 in the release), how many sessions a subject has (the files present, which must
be numbered 1..N without gaps), which subjects exist (rows of ``subjectim``); a copy may hold a
subset of the eight (:func:`subjects_in_release`). :func:`check_release` validates a release
from file headers before any run starts.

Output: one row per (subject, image) with ``subject``, ``nsd_id`` (0-based), ``coco_id``,
``n_repeats``, ``response`` (float32 per voxel: betas z-scored per voxel within each session, then
averaged over the image's repeats present on disk; voxels in C order of the ROI mask's (x, y, z)
nonzero entries) and ``labels`` (uint8, 80 COCO categories ordered by ascending category id).

    python -m references.nsd prepare --nsd-root DIR --coco-annotations DIR \\
        --subject 1 --subject 2 --roi V1 --out nsd_v1.parquet
    python -m references.nsd check --nsd-root DIR [--subject N] [--roi V1]   # headers only

Memory: one session's ROI voxels are read at a time, as trial chunks of the ROI's bounding box
(at most ``_READ_CHUNK_BYTES``); the running per-image sums of one subject are float64,
(images seen, voxels) -- 10,000 images x 5,000 voxels is 400 MB. The COCO JSON files are parsed
whole (instances_train2017.json takes a few GB of RAM for a few tens of seconds).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import functools
import getpass
import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from records.errors import one_line
from records.uris import expand_user
from references.cache import (
    OneLineParser,
    build_once,
    cache_root,
    content_hash,
    damaged_entry,
    integer_arg,
    unwritable,
)


class NSDFormatError(ValueError):
    """A file of the NSD release (or the COCO annotations) is missing or malformed.

    The message is one line and names the offending file.
    """


def _permission_named(fn):
    """``fn`` with a PermissionError (a folder or file of the release this user may not read:
    raised from an ``open``, a folder listing, even an ``is_file``) turned into an
    NSDFormatError naming the path; it went through as an unexpected error (exit 1)."""
    @functools.wraps(fn)
    def named(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PermissionError as exc:
            try:
                user = getpass.getuser()
            except Exception:  # no name for this uid
                user = f"uid {os.getuid()}"
            raise NSDFormatError(f"{exc.filename or exc}: permission denied to user {user}; "
                                 f"accepted: a release (and output folder) this user may read "
                                 f"(and write)") from None
    return named


@contextlib.contextmanager
def _quiet_nibabel() -> Iterator[None]:
    """nibabel prints the header problems it meets to stderr through its own logger
    (``data code 26004 not recognized; not attempting fix``, ``sizeof_hdr should be 540``):
    before it raises on a file that is no NIfTI, and while a NIfTI-2 file is first tried as
    NIfTI-1. This module names every file it cannot read itself, in one line, so those lines
    are noise above it (or beside a file read correctly)."""
    logger = logging.getLogger("nibabel.global")
    was = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = was


# --------------------------------------------------------------------------------------------
# Layout of the release

EXPDESIGN = Path("nsddata/experiments/nsd/nsd_expdesign.mat")
STIM_INFO = Path("nsddata/experiments/nsd/nsd_stim_info_merged.csv")
STIMULI = Path("nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5")
STIMULI_DATASET = "imgBrick"
BETAS_ROOT = Path("nsddata_betas/ppdata")
BETAS_DATASET = "betas"
BETAS_SCALE = 300.0  # int16 betas are percent signal change x 300
COCO_FILES = {"train2017": "instances_train2017.json", "val2017": "instances_val2017.json"}
N_COCO_CATEGORIES = 80

_SESSION_RE = re.compile(r"^betas_session(\d+)\.(hdf5|nii\.gz|nii)$")
#: A session stored in several forms is read from the first of these: HDF5 reads the ROI's
#: bounding box alone, a .nii.gz must be decompressed whole.
SESSION_FORMATS = ("hdf5", "nii", "nii.gz")
SESSION_NAMES = "betas_sessionSS.hdf5 (or .nii.gz / .nii)"
#: A session file still being copied: aws s3 cp's betas_session01.hdf5.6fA3b1c2, rsync's
#: .betas_session01.hdf5.Xq3z9a, a browser's .part / .crdownload, an editor's ~.
_UNFINISHED_RE = re.compile(r"^\.?betas_session(\d+)\.(hdf5|nii\.gz|nii)(\..+|~)$")
#: Files that sit beside a finished session file without being a copy of it: a checksum, a
#: backup. Ignored where that session file is there.
_SIDECAR_SUFFIXES = (".md5", ".md5sum", ".sha1", ".sha256", ".sha256sum", ".sha512", ".bak",
                     ".orig")
#: A session file under a name the release does not use (another HDF5 extension, another
#: case): it would not be read, and its session would be missing without a word.
_MISNAMED_RE = re.compile(r"^betas_session(\d+)\.(h5|hdf|hdf5|he5|nii|nii\.gz)$", re.IGNORECASE)
# Upper bound on one h5py read (a trial chunk of the ROI bounding box); keeps VVS, whose bounding
# box is large, from pulling hundreds of MB of int16 at once.
_READ_CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class ROISpec:
    """A region of interest: which mask file and which integer labels in it select the voxels."""

    name: str
    filename: str
    labels: tuple[int, ...]


ROIS: dict[str, ROISpec] = {
    "V1": ROISpec("V1", "prf-visualrois.nii.gz", (1, 2)),  # V1v, V1d
    "VVS": ROISpec("VVS", "streams.nii.gz", (5,)),  # ventral stream
}


def subject_dir(subject: int) -> str:
    return f"subj{subject:02d}"


def betas_dir(nsd_root: Path, subject: int) -> Path:
    return (Path(nsd_root) / BETAS_ROOT / subject_dir(subject)
            / "func1pt8mm/betas_fithrf_GLMdenoise_RR")


#: the release's per-voxel noise-ceiling SNR, beside the session files (x, y, z) float
NCSNR = "ncsnr.nii.gz"


def ncsnr_file(nsd_root: Path, subject: int) -> Path:
    return betas_dir(nsd_root, subject) / NCSNR


def load_ncsnr(nsd_root: Path, subject: int, mask: np.ndarray) -> np.ndarray | None:
    """The subject's ncsnr at the ROI's voxels (C order of the mask's nonzero entries, as the
    responses), float32, or None when the release has no ncsnr.nii.gz (or uncompressed
    ncsnr.nii) for the subject. A file nibabel cannot read, or a volume of another shape than
    the mask, is an NSDFormatError naming the file; NaN (outside the brain) is 0."""
    import nibabel as nib

    path = _nifti_on_disk(ncsnr_file(nsd_root, subject))
    if path is None:
        return None
    try:
        with _quiet_nibabel():
            img = nib.load(str(path))
        shape = tuple(img.shape)
        if shape[:3] != tuple(mask.shape) or any(d != 1 for d in shape[3:]):
            raise NSDFormatError(f"{path}: ncsnr volume of shape {shape} does not match the ROI "
                                 f"mask's (x, y, z) = {tuple(mask.shape)}")
        vol = np.asarray(img.dataobj, dtype=np.float64).reshape(mask.shape)
    except NSDFormatError:
        raise
    except Exception as exc:  # nibabel's ImageFileError derives from Exception, not OSError
        raise NSDFormatError(f"{path}: cannot read as NIfTI ({one_line(exc)}); expected the "
                             f"release's ncsnr volume (x, y, z) = {tuple(mask.shape)}") from None
    return np.nan_to_num(vol[mask], nan=0.0).astype(np.float32)


def ceiling_from_ncsnr(ncsnr: np.ndarray, n_repeats: np.ndarray) -> np.ndarray:
    """Noise ceiling (fraction of variance, 0..1) of responses averaged over repeats, from the
    release's ncsnr: ``NC = ncsnr^2 / (ncsnr^2 + mean_i(1 / n_i))`` over the images i of the
    target set, each an average of n_i trials (NSD's formula, with its A/3 + B/2 + C/1 mix of
    image counts written as the mean of 1/n). ncsnr : (voxels,); n_repeats : (images,)."""
    inv = float(np.mean(1.0 / np.asarray(n_repeats, np.float64)))
    snr2 = np.asarray(ncsnr, np.float64) ** 2
    return snr2 / (snr2 + inv)


def session_file(nsd_root: Path, subject: int, session: int) -> Path:
    return betas_dir(nsd_root, subject) / f"betas_session{session:02d}.hdf5"


def roi_file(nsd_root: Path, subject: int, roi: str) -> Path:
    return (Path(nsd_root) / "nsddata/ppdata" / subject_dir(subject) / "func1pt8mm/roi"
            / roi_spec(roi).filename)


def _nifti_on_disk(path: Path) -> Path | None:
    """The NIfTI volume ``path`` (``NAME.nii.gz``, the release's name) as stored: ``NAME.nii.gz``
    or uncompressed ``NAME.nii``, or None when neither is a file. Both present is an
    NSDFormatError naming the two: which one is meant cannot be told."""
    plain = path.with_suffix("")  # NAME.nii.gz -> NAME.nii
    for p in (path, plain):
        _refuse_dangling_link(p)
    found = [p for p in (path, plain) if p.is_file()]
    if len(found) == 2:
        raise _stored_both_ways(path, plain)
    return found[0] if found else None


def _refuse_dangling_link(path: Path, stop: Path | None = None) -> None:
    """An NSDFormatError when ``path``, or a folder above it below ``stop``, is a symbolic
    link whose target is not there (a disk not mounted): such a file or subject would
    otherwise read as absent, and be left out without a word."""
    for p in (path, *path.parents):
        if stop is not None and p == stop:
            return
        if p.is_symlink() and not p.exists():
            raise NSDFormatError(f"{p} is a link to {os.readlink(p)}, which is not there (a "
                                 f"disk not mounted?); expected it to resolve -- mount or "
                                 f"restore its target, or remove the link")
        if stop is None:
            return


def _stored_both_ways(gz: Path, plain: Path) -> NSDFormatError:
    """A NIfTI volume present as NAME.nii.gz and NAME.nii: which one is meant cannot be told."""
    return NSDFormatError(f"both {gz} and {plain} present; expected one of them (the same "
                          f"volume gzip-compressed or not): remove the other")


def _nifti_required(path: Path) -> Path:
    """:func:`_nifti_on_disk`, with a missing file an NSDFormatError."""
    found = _nifti_on_disk(path)
    if found is None:
        raise NSDFormatError(f"missing file {path} (or uncompressed {path.with_suffix('').name})")
    return found


def roi_spec(roi: str) -> ROISpec:
    try:
        return ROIS[roi]
    except KeyError:
        raise NSDFormatError(f"unknown ROI {roi!r}; accepted: {', '.join(ROIS)}") from None


# --------------------------------------------------------------------------------------------
# Readers, each validating one file


@dataclass(frozen=True)
class ExpDesign:
    """The experimental design, converted to 0-based indices.

    masterordering : (trials,) int64, index into a subject's image list (row of subjectim)
    subjectim : (subjects, images) int64, nsdIds (0-based)
    sharedix : (n_shared,) int64, nsdIds (0-based) of the images every subject saw
    """

    masterordering: np.ndarray
    subjectim: np.ndarray
    sharedix: np.ndarray

    def images_of_trials(self, subject: int, n_trials: int) -> np.ndarray:
        """nsdIds (0-based) of the first ``n_trials`` trials of ``subject``: (n_trials,) int64."""
        return self.subjectim[subject - 1, self.masterordering[:n_trials]]


def _as_index_array(value: np.ndarray, path: Path, name: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "iuf" or arr.size == 0:
        raise NSDFormatError(f"{path}: '{name}' must be a non-empty numeric array, "
                             f"got dtype {arr.dtype} shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise NSDFormatError(f"{path}: '{name}' must hold integers (1-based indices)")
        if np.abs(arr).max() >= 2**53:  # beyond exact floats: the cast would wrap
            raise NSDFormatError(f"{path}: '{name}' holds {float(np.abs(arr).max()):g}; "
                                 f"expected 1-based indices (integers below 2**53)")
    return arr.astype(np.int64)


def _loadmat(path: Path) -> dict[str, np.ndarray]:
    import scipy.io

    try:
        return scipy.io.loadmat(str(path))
    except NotImplementedError:  # scipy's answer to MATLAB v7.3 (HDF5) files
        raise NSDFormatError(f"{path}: MATLAB v7.3 file; expected the release's format, which "
                             f"scipy.io.loadmat reads") from None
    except Exception as exc:  # scipy raises a zoo of types for a corrupt file
        raise NSDFormatError(f"{path}: cannot read as a MATLAB file ({one_line(exc)})") from None


def load_expdesign(nsd_root: Path) -> ExpDesign:
    """Read nsd_expdesign.mat. ``loadmat`` returns 2-D arrays: masterordering (1, trials),
    subjectim (8, images), sharedix (1, n_shared), all 1-based."""
    path = Path(nsd_root) / EXPDESIGN
    if not path.is_file():
        raise NSDFormatError(f"missing file {path}")
    mat = _loadmat(path)
    for key in ("masterordering", "subjectim"):
        if key not in mat:
            found = sorted(k for k in mat if not k.startswith("__"))
            raise NSDFormatError(f"{path}: no variable '{key}' (found: {', '.join(found)})")
    order = _as_index_array(mat["masterordering"], path, "masterordering")
    if order.ndim != 2 or 1 not in order.shape:
        raise NSDFormatError(f"{path}: 'masterordering' must be (1, trials), got shape "
                             f"{order.shape}")
    subjectim = _as_index_array(mat["subjectim"], path, "subjectim")
    if subjectim.ndim != 2:
        raise NSDFormatError(f"{path}: 'subjectim' must be (subjects, images), got shape "
                             f"{subjectim.shape}")
    order = order.reshape(-1)
    n_list = subjectim.shape[1]
    if order.min() < 1 or order.max() > n_list:
        raise NSDFormatError(f"{path}: 'masterordering' values must be 1-based indices in "
                             f"1..{n_list} (subjectim columns), got {order.min()}..{order.max()}")
    if subjectim.min() < 1:
        raise NSDFormatError(f"{path}: 'subjectim' must hold 1-based nsdIds (>= 1), got min "
                             f"{subjectim.min()}")
    shared = mat.get("sharedix")
    shared = (_as_index_array(shared, path, "sharedix").reshape(-1) - 1 if shared is not None
              else np.zeros(0, np.int64))
    return ExpDesign(order - 1, subjectim - 1, shared)


@dataclass(frozen=True)
class StimInfo:
    """nsd_stim_info_merged.csv, one entry per row sorted by nsdId: nsd_id (rows,) int64
    ascending, coco_id (rows,) int64, coco_split (rows,) str. Looked up by nsdId with
    :meth:`rows_of`, so a sparse or very large nsdId costs nothing (no array sized by the
    largest id)."""

    nsd_id: np.ndarray
    coco_id: np.ndarray
    coco_split: np.ndarray

    def rows_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, known) for each nsdId in ``ids``: ``known`` is False where the file has no row
        for that id (and ``row`` is then meaningless)."""
        ids = np.asarray(ids, np.int64)
        row = np.minimum(np.searchsorted(self.nsd_id, ids), self.nsd_id.size - 1)
        return row, self.nsd_id[row] == ids


def _csv_int(path: Path, line: int, column: str, text: str) -> int:
    """One integer cell of the stim info (``12``, or ``12.0`` as a float-writing tool puts it)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (np.isfinite(value) and value == int(value)):
        raise NSDFormatError(f"{path}: line {line}: {column} {text!r} is not an integer; "
                             f"expected an integer in column {column}")
    return int(value)


def load_stim_info(nsd_root: Path) -> StimInfo:
    """Read nsd_stim_info_merged.csv: every row must have as many fields as the header, with
    integer nsdId (unique, >= 0) and cocoId; a malformed row is an NSDFormatError naming its
    line."""
    path = Path(nsd_root) / STIM_INFO
    if not path.is_file():
        pickled = path.with_suffix(".pkl")
        raise NSDFormatError(f"missing file {path}" + (
            f" ({pickled.name} beside it is not read: a pickle runs code when loaded; copy the "
            f"release's .csv, which holds the same table)" if pickled.is_file() else ""))
    needed = ("nsdId", "cocoId", "cocoSplit")
    nsd, coco, split = [], [], []
    first_line: dict[int, int] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, [])
            missing = [c for c in needed if c not in header]
            if missing:
                raise NSDFormatError(f"{path}: missing column(s) {', '.join(missing)} "
                                     f"(need {', '.join(needed)})")
            col = {c: header.index(c) for c in needed}
            line = reader.line_num + 1  # where the next record starts
            for row in reader:
                if row:  # a blank line is no row (as csv.DictReader has it)
                    if len(row) != len(header):
                        raise NSDFormatError(
                            f"{path}: line {line} has {len(row)} field(s), expected "
                            f"{len(header)} as in its header ({', '.join(needed)} among them); "
                            f"truncated or malformed row")
                    nsd_id = _csv_int(path, line, "nsdId", row[col["nsdId"]])
                    if nsd_id < 0:
                        raise NSDFormatError(f"{path}: line {line}: nsdId {nsd_id}; expected a "
                                             f"0-based index (>= 0)")
                    if nsd_id in first_line:
                        raise NSDFormatError(f"{path}: line {line}: nsdId {nsd_id} already on "
                                             f"line {first_line[nsd_id]}; expected each once")
                    first_line[nsd_id] = line
                    nsd.append(nsd_id)
                    coco.append(_csv_int(path, line, "cocoId", row[col["cocoId"]]))
                    split.append(row[col["cocoSplit"]])
                line = reader.line_num + 1
    except (UnicodeDecodeError, csv.Error) as exc:
        raise NSDFormatError(f"{path}: cannot read as CSV ({one_line(exc)})") from None
    if not nsd:
        raise NSDFormatError(f"{path}: no rows; expected one per image (nsdId 0..)")
    nsd_arr = np.array(nsd, np.int64)
    order = np.argsort(nsd_arr, kind="stable")
    return StimInfo(nsd_arr[order], np.array(coco, np.int64)[order],
                    np.array(split, object)[order])


def load_roi_mask(nsd_root: Path, subject: int, roi: str) -> np.ndarray:
    """Boolean ROI mask (x, y, z) of ``subject`` in its func1pt8mm space."""
    import nibabel as nib

    spec = roi_spec(roi)
    path = _nifti_required(roi_file(nsd_root, subject, roi))
    try:
        with _quiet_nibabel():
            img = nib.load(str(path))
    except Exception as exc:  # nibabel's ImageFileError derives from Exception
        raise NSDFormatError(f"{path}: cannot read as NIfTI ({one_line(exc)})") from None
    # The shape comes from the header, so a wrong volume fails before its data is decoded.
    shape = tuple(int(n) for n in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise NSDFormatError(f"{path}: ROI mask must be a 3-D (x, y, z) volume, got shape "
                             f"{tuple(img.shape)}")
    try:
        data = np.asanyarray(img.dataobj).reshape(shape)
        labels = np.rint(np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0))
    except Exception as exc:  # truncated data, or a dtype that holds no numbers (RGB)
        raise NSDFormatError(f"{path}: cannot read as a NIfTI label volume "
                             f"({one_line(exc)})") from None
    if data.dtype.kind == "f":
        # A label volume resampled with interpolation holds values between labels (2.5 between
        # V1d and V2v): rounding would move those voxels into a neighbouring label. Values
        # within 1e-3 of an integer (float storage of integer labels) are accepted.
        off = np.abs(np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0) - labels) > 1e-3
        if off.any():
            x, y, z = (int(v) for v in np.argwhere(off)[0])
            raise NSDFormatError(
                f"{path}: {int(off.sum())} voxel(s) hold non-integer labels (e.g. "
                f"{float(data[x, y, z]):g} at (x, y, z) = ({x}, {y}, {z})); expected an integer "
                f"label volume, as the release's -- resample label volumes with nearest "
                f"neighbour, not interpolation")
    mask = np.isin(labels.astype(np.int64), spec.labels)
    if not mask.any():
        raise NSDFormatError(f"{path}: no voxel carries the {spec.name} label(s) "
                             f"{list(spec.labels)}")
    return mask


def session_files(nsd_root: Path, subject: int) -> list[Path]:
    """The subject's session files on disk, in session order (1..N, no gaps): per session its
    betas_sessionSS.hdf5, else its .nii.gz or .nii (uncompressed; both is an NSDFormatError)
    (the release ships the .hdf5 and the .nii.gz of every session side by side; either may
    be all a copy holds).
    Two names for one session in one form (betas_session01.hdf5 beside betas_session1.hdf5)
    is an NSDFormatError: which is meant cannot be told."""
    folder = betas_dir(nsd_root, subject)
    if not folder.is_dir():
        elsewhere = _betas_elsewhere(nsd_root, subject)
        raise NSDFormatError(f"missing directory {folder} (no betas for subject {subject}"
                             f"{f'; its betas are in {elsewhere}' if elsewhere else ''})")
    _refuse_stray_session_files(folder, subject)
    forms: dict[int, dict[str, Path]] = {}
    for p in sorted(folder.iterdir()):
        m = _SESSION_RE.match(p.name)
        if not m:
            continue
        s, form = int(m.group(1)), m.group(2)
        if p.exists() and not p.is_file() and not p.is_dir():  # reading a FIFO hangs
            raise NSDFormatError(f"{p}: not a regular file (a FIFO, socket or device); expected "
                                 f"session {s}'s data file")
        if s == 0:  # would otherwise be read silently as the first session
            raise NSDFormatError(f"{p}: session 0; sessions are numbered from 1 "
                                 f"(betas_session01.hdf5 .. betas_sessionNN.hdf5)")
        held = forms.setdefault(s, {})
        if form in held:  # betas_session01.hdf5 and betas_session1.hdf5: which is meant?
            raise NSDFormatError(f"{held[form]} and {p.name}: both are session {s}; expected "
                                 f"one file per session (betas_session{s:02d}.{form})")
        held[form] = p
    for held in forms.values():
        if "nii" in held and "nii.gz" in held:  # as _nifti_on_disk: which is meant?
            raise _stored_both_ways(held["nii.gz"], held["nii"])
    found = {s: held[next(f for f in SESSION_FORMATS if f in held)]
             for s, held in forms.items()}
    if not found:
        raise NSDFormatError(f"missing file {session_file(nsd_root, subject, 1)} "
                             f"(no {SESSION_NAMES} in {folder})")
    for s in range(1, max(found) + 1):
        if s not in found:
            # Trials are located by summing earlier sessions' lengths, so a gap is unreadable.
            raise NSDFormatError(f"missing file {session_file(nsd_root, subject, s)} (sessions "
                                 f"present: {sorted(found)}; they must run 1..N without gaps)")
    return [found[s] for s in sorted(found)]


def _refuse_stray_session_files(folder: Path, subject: int) -> None:
    """An NSDFormatError naming a file of ``folder`` that holds a session of ``subject`` but
    would not be read as one: a copy still being made (or left behind by a copy that stopped),
    a checksum or backup whose session file is not there, or a session file under a name the
    release does not use (``betas_session05.h5``, ``betas_session05.HDF5``). Each session would
    be missing, and a subject with no other session, or its last sessions, left out without a
    word. A checksum or backup beside its session file is ignored."""
    if not folder.is_dir():
        return
    for p in sorted(folder.iterdir()):
        if _SESSION_RE.match(p.name):  # (betas_session01.nii + ".gz": finished)
            continue
        misnamed = _MISNAMED_RE.match(p.name)
        if misnamed:
            s, form = int(misnamed.group(1)), misnamed.group(2).lower()
            form = {"h5": "hdf5", "hdf": "hdf5", "he5": "hdf5"}.get(form, form)
            raise NSDFormatError(
                f"{p}: not a name the release gives a session file, so subject {subject}'s "
                f"session {s} would not be read; expected betas_session{s:02d}.{form} "
                f"(accepted: {SESSION_NAMES}, in lower case) -- rename it")
        m = _UNFINISHED_RE.match(p.name)
        if not m:
            continue
        s, form, suffix = int(m.group(1)), m.group(2), m.group(3)
        session = f"betas_session{m.group(1)}.{form}"
        if suffix.lower() in _SIDECAR_SUFFIXES:
            if (folder / session).is_file():
                continue
            raise NSDFormatError(
                f"{p}: a checksum or backup of subject {subject}'s session {s}, whose {session} "
                f"is not in {folder}; expected the session file beside it -- copy it (or "
                f"remove the file, and pass --subject for the subjects to use)")
        raise NSDFormatError(
            f"{p}: an unfinished copy of subject {subject}'s session {s}; "
            f"expected betas_session{s:02d}.{form} -- finish the copy "
            f"(or remove the file, and pass --subject for the subjects to use)")


@contextlib.contextmanager
def _h5_dataset(path: Path, name: str) -> Iterator:
    """The object ``name`` of the HDF5 file ``path`` (open for the block), or an
    NSDFormatError naming the file: not HDF5, or no such entry (listing what it holds)."""
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise NSDFormatError(f"{path}: cannot read as HDF5 ({one_line(exc)})") from None
    with f:
        if name not in f:
            raise NSDFormatError(f"{path}: no dataset '{name}' "
                                 f"(found: {', '.join(sorted(f.keys())) or 'nothing'})")
        try:
            d = f[name]
        except (KeyError, OSError) as exc:  # ``in`` is True for a soft or external link
            link = f.get(name, getlink=True)
            where = (f" to {link.filename}:{link.path}" if isinstance(link, h5py.ExternalLink)
                     else f" to {link.path}" if isinstance(link, h5py.SoftLink) else "")
            raise NSDFormatError(f"{path}: '{name}' is a link{where} that does not resolve "
                                 f"({one_line(exc)}); expected the dataset itself, or a link "
                                 f"to one that is there") from None
        undecodable = _undecodable(d) if isinstance(d, h5py.Dataset) else ""
        if undecodable:
            raise NSDFormatError(f"{path}: '{name}' is compressed with {undecodable}, which "
                                 f"this h5py cannot decode; accepted: the filter's plugin "
                                 f"installed (e.g. pip install hdf5plugin, then HDF5_PLUGIN_PATH"
                                 f"=$(python -c 'import hdf5plugin; print(hdf5plugin.PLUGIN_PATH)'"
                                 f")), or the file saved again without it (h5repack -f NONE)")
        yield d


def _undecodable(d) -> str:
    """The HDF5 filters of dataset ``d`` this h5py cannot apply (a lab may repack the release
    with Blosc or Zstd through hdf5plugin), as "filter 32001 (blosc)"; "" when it can read
    every one. h5py opens such a file and reads its headers; only reading data fails."""
    plist = d.id.get_create_plist()
    missing = []
    for i in range(plist.get_nfilters()):
        code, flags, _, name = plist.get_filter(i)
        if h5py.h5z.filter_avail(code):
            continue
        if flags & h5py.h5z.FLAG_OPTIONAL and _skipped_in_first_chunk(d, i):
            continue  # an optional filter the writer could not apply: the data is plain
        label = name.decode(errors="replace").strip() if isinstance(name, bytes) else name
        missing.append(f"HDF5 filter {code}" + (f" ({label})" if label else ""))
    return ", ".join(missing)


def _skipped_in_first_chunk(d, i: int) -> bool:
    """Whether filter ``i`` of chunked dataset ``d`` was left out of its first stored chunk
    (an optional filter is skipped where the writer could not apply it); True for a dataset
    with no chunk stored (nothing to decode)."""
    try:
        if d.chunks is None or d.id.get_num_chunks() == 0:
            return True
        return bool(d.id.get_chunk_info(0).filter_mask & (1 << i))
    except (AttributeError, OSError, ValueError):  # an h5py without chunk queries
        return False


def _unwritten(d) -> str:
    """What of the HDF5 dataset ``d`` has no storage ("" when all of it has): a writer that
    stopped part-way leaves chunks (or a contiguous block) unallocated, and h5py reads those as
    the fill value without a word. Read from the file's index; no data is decoded."""
    layout = d.id.get_create_plist().get_layout()
    if layout == h5py.h5d.VIRTUAL:  # its data is other files': each must be there
        here = Path(d.file.filename).parent
        for src in d.virtual_sources():
            name = src.file_name
            if name != "." and not (here / name).is_file() and not Path(name).is_file():
                return f"it is a virtual dataset whose source file {name} is missing"
        return ""
    if d.size == 0 or layout not in (h5py.h5d.CONTIGUOUS, h5py.h5d.CHUNKED):
        return ""  # compact data lives in the header
    if layout == h5py.h5d.CONTIGUOUS:
        if not d.external and d.id.get_storage_size() == 0:
            return "its data block is unallocated"
        return ""
    per_axis = [-(-n // c) for n, c in zip(d.shape, d.chunks)]
    expected = int(np.prod(per_axis))
    stored = d.id.get_num_chunks()
    if stored < expected:
        return f"{expected - stored} of its {expected} chunks hold no data"
    return ""


def _stated_affine(path: Path) -> np.ndarray | None:
    """The voxel-to-world affine ``path``'s NIfTI header states, or None when it states none
    or cannot be read (its own reader names it)."""
    import nibabel as nib

    for kind in (nib.Nifti1Image, nib.Nifti2Image):  # by suffix, no sniffing (as _nifti_betas)
        try:
            with _quiet_nibabel():
                return _header_affine(kind.from_filename(str(path)).header)
        except Exception:  # nibabel's errors derive from Exception, not OSError
            continue
    return None


def _header_affine(header) -> np.ndarray | None:
    """A NIfTI header's sform, else its qform; None when both codes are 0 (the grid cannot be
    told from the header)."""
    for stated in (header.get_sform, header.get_qform):
        affine, code = stated(coded=True)
        if affine is not None and int(code) > 0:
            return np.asarray(affine, dtype=np.float64)
    return None


def _check_grid(mask_path: Path, mine: np.ndarray | None, path: Path,
                theirs: np.ndarray | None) -> None:
    """The ROI mask must lie on the betas' voxel grid, voxel for voxel: a mask re-oriented
    (LPI to RAS flips two axes and keeps the shape) or resampled by another tool has the
    betas' shape and selects other voxels, without a word. The axes of its affine ``mine``
    (direction and voxel size: the 3 x 3 part) are compared with those of each NIfTI volume of
    the betas' folder (``path``: the ncsnr volume, a NIfTI session; HDF5 sessions state none).
    The origin is not compared: tools write it by different conventions, and on one grid with
    one shape it moves no voxel. A header stating no affine is not compared."""
    if mine is None or theirs is None or np.allclose(mine[:3, :3], theirs[:3, :3], rtol=0,
                                                     atol=1e-3):
        return
    import nibabel as nib

    def grid(a: np.ndarray) -> str:
        axes = "".join(c or "?" for c in nib.aff2axcodes(a))
        return f"orientation {axes}, voxel {_mm(np.linalg.norm(a[:3, :3], axis=0))}"

    raise NSDFormatError(
        f"{mask_path}: its voxel axes ({grid(mine)}) differ from the betas' in {path} "
        f"({grid(theirs)}); expected the ROI in the betas' func1pt8mm space, voxel for voxel, "
        f"as the release's -- a mask re-oriented or resampled elsewhere selects other voxels")


def _mm(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{float(v):g}" for v in values) + ") mm"


def _is_nifti(path: Path) -> bool:
    return path.name.endswith((".nii", ".nii.gz"))


def _nifti_betas(path: Path):
    """The session's NIfTI image (header read, data not), or an NSDFormatError naming the
    file. Its data scaling must be the identity: the betas are read as stored (int16 =
    percent signal change x 300), as from the HDF5 files. The file is kept open between
    reads: a .nii.gz opened anew for every chunk of volumes is decompressed from its start
    each time (8x the work for a 750-trial session read in 16 chunks)."""
    import nibabel as nib

    img, first = None, None
    for kind in (nib.Nifti1Image, nib.Nifti2Image):  # named by suffix: no sniffing (which
        try:                                           # reads past the header of a cut file)
            with _quiet_nibabel():
                img = kind.from_filename(str(path), keep_file_open=True)
            break
        except Exception as exc:  # nibabel's errors derive from Exception, not OSError
            first = first or exc
    if img is None:
        raise NSDFormatError(f"{path}: cannot read as NIfTI ({one_line(first)}); expected the "
                             f"release's betas volume (x, y, z, trials)")
    # loaded images keep their scaling in the proxy (the header's fields are reset to NaN)
    slope, inter = float(img.dataobj.slope), float(img.dataobj.inter)
    if slope != 1.0 or inter != 0.0:
        raise NSDFormatError(f"{path}: NIfTI scaling scl_slope={slope} scl_inter={inter}; "
                             f"expected none (the release's betas are stored as int16 = "
                             f"percent signal change x {BETAS_SCALE:g})")
    return img


def _nifti_betas_shape(path: Path, mask_shape: tuple[int, ...], mask_path: Path,
                       grid: np.ndarray | None = None) -> int:
    img = _nifti_betas(path)
    shape, dtype = tuple(img.shape), img.get_data_dtype()
    if len(shape) != 4:
        raise NSDFormatError(f"{path}: betas must be 4-D (x, y, z, trials), got shape {shape}")
    if dtype.kind not in "if":
        raise NSDFormatError(f"{path}: betas must be signed numbers (int16 in the release, or "
                             f"float), got {dtype}")
    if shape[:3] != tuple(mask_shape):
        raise NSDFormatError(
            f"{path}: betas shape {shape} does not match ROI mask {mask_path} of shape "
            f"(x, y, z) = {tuple(mask_shape)}; expected (x, y, z, trials) = "
            f"({', '.join(map(str, mask_shape))}, trials)")
    if shape[3] == 0:
        raise NSDFormatError(f"{path}: betas hold no trials")
    _check_grid(mask_path, grid, path, _header_affine(img.header))
    if path.name.endswith(".nii"):  # uncompressed: a copy cut short is told from its size
        need = int(img.dataobj.offset) + int(np.prod(shape)) * dtype.itemsize
        size = path.stat().st_size
        if size < need:
            raise NSDFormatError(f"{path}: {size} bytes where its header needs {need}; "
                                 f"expected a complete file -- copy it again from the release")
    return int(shape[3])


def _betas_shape(path: Path, mask_shape: tuple[int, ...], mask_path: Path,
                 grid: np.ndarray | None = None) -> int:
    """Validate one session file against the ROI mask (``grid``: the mask's stated affine,
    which a NIfTI session's must equal); return its number of trials."""
    if _is_nifti(path):
        return _nifti_betas_shape(path, mask_shape, mask_path, grid)
    with _h5_dataset(path, BETAS_DATASET) as d:
        if not isinstance(d, h5py.Dataset) or d.ndim != 4:
            raise NSDFormatError(f"{path}: '{BETAS_DATASET}' must be 4-D (trials, z, y, x), got "
                                 f"shape {getattr(d, 'shape', None)}")
        if d.dtype.kind not in "if":
            # unsigned betas are not the release's encoding (percent signal change x 300 is
            # signed): most likely int16 data reinterpreted, whose negatives would wrap
            raise NSDFormatError(f"{path}: '{BETAS_DATASET}' must be signed numbers (int16 in "
                                 f"the release, or float), got {d.dtype}")
        missing = _unwritten(d)
        if missing:
            raise NSDFormatError(f"{path}: '{BETAS_DATASET}' was never written in full ({missing}"
                                 f"); reading it would give the fill value for those trials -- "
                                 f"copy the file again from the release")
        expected = tuple(mask_shape[::-1])
        if tuple(d.shape[1:]) != expected:
            raise NSDFormatError(
                f"{path}: betas shape {tuple(d.shape)} does not match ROI mask {mask_path} of "
                f"shape (x, y, z) = {tuple(mask_shape)}; expected (trials, z, y, x) = "
                f"(trials, {', '.join(map(str, expected))})")
        if d.shape[0] == 0:
            raise NSDFormatError(f"{path}: '{BETAS_DATASET}' holds no trials")
        return int(d.shape[0])


def stimuli_shape(path: str | os.PathLike) -> tuple[int, int, int]:
    """(images, H, W) of nsd_stimuli.hdf5's ``imgBrick`` (images, H, W, 3) uint8, read from the
    HDF5 header (no image is decoded)."""
    path = Path(path)
    if not path.is_file():
        raise NSDFormatError(f"missing file {path}")
    with _h5_dataset(path, STIMULI_DATASET) as d:
        shape, dtype = getattr(d, "shape", None), getattr(d, "dtype", None)
        if (not isinstance(d, h5py.Dataset) or d.ndim != 4 or d.shape[3] != 3
                or d.dtype != np.uint8):
            raise NSDFormatError(f"{path}: '{STIMULI_DATASET}' must be (images, H, W, 3) uint8, "
                                 f"got shape {shape} {dtype}")
        if shape[1] != shape[2] or shape[1] == 0:
            # resized to the trial's size, never cropped: a voxel responded to all of it
            raise NSDFormatError(f"{path}: '{STIMULI_DATASET}' images are {shape[1]} x "
                                 f"{shape[2]} pixels; expected square images (425 x 425 in "
                                 f"the release)")
        missing = _unwritten(d)
        if missing:
            raise NSDFormatError(f"{path}: '{STIMULI_DATASET}' was never written in full "
                                 f"({missing}); reading it would give black images -- copy "
                                 f"the file again from the release")
        return int(shape[0]), int(shape[1]), int(shape[2])


def _has_sessions(folder: Path) -> bool:
    return folder.is_dir() and any(_SESSION_RE.match(p.name) for p in folder.iterdir())


def _subjects_present(nsd_root: Path, design: ExpDesign, *, every: bool = False
                      ) -> tuple[int, ...]:
    """Subjects with a row in ``subjectim`` and at least one session file, ascending. For
    ``every`` subject to be used, one whose betas are only in another space or GLM version is
    an NSDFormatError naming it (it would be left out without a word)."""
    n_rows = design.subjectim.shape[0]
    present = tuple(s for s in range(1, n_rows + 1) if _has_sessions(betas_dir(nsd_root, s)))
    if every:
        _refuse_misnamed_subjects(nsd_root)
    for s in range(1, n_rows + 1) if every else ():
        if s not in present:  # "every subject" would leave it out without a word
            _refuse_dangling_link(betas_dir(nsd_root, s), stop=Path(nsd_root))
            _refuse_stray_session_files(betas_dir(nsd_root, s), s)
        elsewhere = None if s in present else _betas_elsewhere(nsd_root, s)
        if elsewhere is not None:  # "every subject" would leave it out without a word
            raise NSDFormatError(
                f"subject {s} has betas only in {elsewhere}; expected them in "
                f"{betas_dir(nsd_root, s)} (the space of the ROI masks, func1pt8mm, and the "
                f"GLM read, betas_fithrf_GLMdenoise_RR) -- add them there, or pass --subject "
                f"for the subjects to use")
    if not present:
        raise NSDFormatError(f"{nsd_root / BETAS_ROOT}: no subject has betas; expected e.g. "
                             f"{session_file(nsd_root, 1, 1)} for a subject in 1..{n_rows} "
                             f"(rows of 'subjectim')")
    return present


#: a subject's folder as a lab may have named it: subj2, subj002, sub-02, subject02
_SUBJECT_FOLDER = re.compile(r"^(?:subj|sub-|subject)0*(?P<n>\d+)$", re.IGNORECASE)


def _refuse_misnamed_subjects(nsd_root: Path) -> None:
    """An NSDFormatError naming a subject folder of the betas or the masks that is not the
    release's ``subjNN`` (``subj2``, ``sub-02``): its subject would otherwise read as absent."""
    for top in (Path(nsd_root) / BETAS_ROOT, Path(nsd_root) / "nsddata/ppdata"):
        if not top.is_dir():
            continue
        for p in sorted(top.iterdir()):
            m = _SUBJECT_FOLDER.match(p.name)
            if not m or int(m["n"]) == 0 or p.name == subject_dir(int(m["n"])):
                continue
            proper = top / subject_dir(int(m["n"]))
            # a second name beside the release's own (a BIDS-style link to it, an empty
            # leftover) takes nothing away: only a folder standing in for a missing one
            if p.is_dir() and not p.is_symlink() and not proper.exists() and any(p.iterdir()):
                raise NSDFormatError(f"{p}: a subject folder named {p.name}; expected the "
                                     f"release's name {proper.name} -- rename it")


def _betas_elsewhere(nsd_root: Path, subject: int) -> Path | None:
    """A folder of the subject's betas in another space or GLM version than the one read
    (``subjNN/<space>/<version>/`` holding session files: func1mm, betas_fithrf, ...), or None."""
    top = Path(nsd_root) / BETAS_ROOT / subject_dir(subject)
    if not top.is_dir():
        return None
    for space in sorted(p for p in top.iterdir() if p.is_dir()):
        for version in sorted(p for p in space.iterdir() if p.is_dir()):
            if _has_sessions(version):
                return version
    return None


@_permission_named
def subjects_in_release(nsd_root: str | os.PathLike) -> tuple[int, ...]:
    """The subjects a release holds, ascending: those with a row in nsd_expdesign.mat's
    ``subjectim`` whose betas folder (:func:`betas_dir`) holds at least one
    session file (betas_sessionSS.hdf5, .nii.gz or .nii). The published release has all eight; a lab's copy may hold a subset.
    Only file names and the small design file are read."""
    nsd_root = _release_root(nsd_root)
    return _subjects_present(nsd_root, load_expdesign(nsd_root), every=True)


def _release_root(nsd_root: str | os.PathLike) -> Path:
    nsd_root = Path(nsd_root)
    if not nsd_root.is_dir():
        raise NSDFormatError(f"missing directory {nsd_root} (--nsd-root)")
    return nsd_root


def _subject_list(nsd_root: Path, subjects: Sequence[int] | None) -> list[int]:
    """``subjects`` sorted and deduplicated; ``None`` means every subject in the release."""
    if subjects is None:
        return list(subjects_in_release(nsd_root))
    subjects = sorted({int(s) for s in subjects})
    if not subjects:
        raise NSDFormatError("no subject given; pass at least one (e.g. 1)")
    return subjects


def read_session_roi(path: Path, mask: np.ndarray) -> np.ndarray:
    """ROI voxels of one session, in percent signal change: (trials, n_voxels) float64.

    ``mask`` is (x, y, z); an HDF5 file's betas are (trials, z, y, x), of which only the ROI's
    bounding box is read, in chunks of trials; a NIfTI file's are (x, y, z, trials), read in
    chunks of whole volumes. The voxels are picked in C order of the mask's nonzero entries.
    A read that fails part-way (a truncated or corrupt file: h5py's OSError) and a NaN or
    infinite ROI value (float betas; the release's int16 have none) are NSDFormatErrors naming
    the file: z-scoring would otherwise turn the voxel's whole session into zeros unannounced.
    """
    xi, yi, zi = np.nonzero(mask)
    if _is_nifti(path):
        out = _read_nifti_roi(path, xi, yi, zi)
    else:
        out = _read_hdf5_roi(path, xi, yi, zi)
    bad = ~np.isfinite(out)
    if bad.any():
        trial, voxel = np.argwhere(bad)[0]
        raise NSDFormatError(
            f"{path}: {int(bad.any(axis=0).sum())} ROI voxel(s) hold NaN or infinite betas "
            f"(first: trial {int(trial)}, voxel ({xi[voxel]}, {yi[voxel]}, {zi[voxel]}) in (x, y, z)"
            f"); expected finite betas -- leave the voxel out of the ROI mask, or fill it")
    if out.shape[1] >= 2:
        # A measured trial never holds one value in every voxel of an ROI; the fill value of
        # storage never written does (chunks allocated early by a parallel writer, a virtual
        # dataset whose source could not be read), and z-scoring made it a real response.
        flat = np.flatnonzero(out.max(axis=1) == out.min(axis=1))
        if flat.size:
            raise NSDFormatError(
                f"{path}: {flat.size} trial(s) hold one value in every ROI voxel (first: trial "
                f"{int(flat[0])}, value {out[flat[0], 0]:g}); expected measured betas -- storage "
                f"never written reads as its fill value: copy the file again from the release")
    return out / BETAS_SCALE


def _read_nifti_roi(path: Path, xi: np.ndarray, yi: np.ndarray, zi: np.ndarray) -> np.ndarray:
    """(trials, voxels) float64 of a NIfTI session (x, y, z, trials), read in chunks of whole
    volumes (a .nii.gz is decompressed once, front to back)."""
    img = _nifti_betas(path)
    n_trials = int(img.shape[3])
    frame_bytes = int(np.prod(img.shape[:3])) * img.get_data_dtype().itemsize
    step = max(1, _READ_CHUNK_BYTES // max(frame_bytes, 1))
    out = np.empty((n_trials, len(xi)), np.float64)
    t0 = 0
    try:
        for t0 in range(0, n_trials, step):
            block = np.asarray(img.dataobj[..., t0:t0 + step])
            out[t0:t0 + step] = block[xi, yi, zi, :].T
    except Exception as exc:  # gzip's EOFError / BadGzipFile, zlib.error, a short .nii
        raise NSDFormatError(
            f"{path}: cannot read betas trials {t0}..{min(t0 + step, n_trials) - 1} "
            f"({one_line(exc) or type(exc).__name__}); expected a complete NIfTI file -- copy "
            f"it again from the release") from None
    return out


def _read_hdf5_roi(path: Path, xi: np.ndarray, yi: np.ndarray, zi: np.ndarray) -> np.ndarray:
    """(trials, voxels) float64 of an HDF5 session (trials, z, y, x): trial chunks of the ROI's
    bounding box."""
    lo = (zi.min(), yi.min(), xi.min())
    hi = (zi.max() + 1, yi.max() + 1, xi.max() + 1)
    rz, ry, rx = zi - lo[0], yi - lo[1], xi - lo[2]
    with _h5_dataset(path, BETAS_DATASET) as d:
        n_trials = d.shape[0]
        box_bytes = int(np.prod(np.subtract(hi, lo))) * d.dtype.itemsize
        step = max(1, _READ_CHUNK_BYTES // max(box_bytes, 1))
        out = np.empty((n_trials, len(xi)), np.float64)
        t0 = 0
        try:
            for t0 in range(0, n_trials, step):
                block = d[t0:t0 + step, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
                out[t0:t0 + step] = block[:, rz, ry, rx]
        except (OSError, RuntimeError) as exc:  # h5py: bad chunk, truncated file, filter
            raise NSDFormatError(
                f"{path}: cannot read '{BETAS_DATASET}' trials {t0}..{min(t0 + step, n_trials) - 1}"
                f" ({one_line(exc)}); expected a complete HDF5 file -- copy it again from the "
                f"release") from None
    return out


def zscore_session(values: np.ndarray) -> np.ndarray:
    """Z-score each voxel (column) over the session's trials (rows), population std (ddof=0).

    values : (trials, voxels). A voxel constant within the session (e.g. zero outside the brain)
    becomes 0 rather than NaN.
    """
    mean = values.mean(axis=0)
    std = values.std(axis=0)
    safe = np.where(std > 0, std, 1.0)
    return np.where(std > 0, (values - mean) / safe, 0.0)


def noise_ceiling(responses: np.ndarray, image_of_trial: np.ndarray, *,
                  n_average: float) -> np.ndarray:
    """NSD-style noise ceiling per voxel, as a fraction in [0, 1).

    responses : (trials, voxels), betas z-scored per voxel within session (so total variance ~1).
    image_of_trial : (trials,) image key of each trial. Images with >= 2 trials give the noise
    variance sigma_n^2 = pooled within-image variance (ddof=1). Then
    ncsnr = sqrt(max(0, 1 - sigma_n^2)) / sigma_n and NC = ncsnr^2 / (ncsnr^2 + 1 / n_average),
    the fraction of variance explainable in responses averaged over ``n_average`` trials
    (for images averaged over different numbers n_i: 1 / mean(1/n_i)).
    """
    responses = np.asarray(responses, np.float64)
    _, inverse, counts = np.unique(image_of_trial, return_inverse=True, return_counts=True)
    keep = counts[inverse] >= 2
    if not keep.any():
        raise ValueError("noise_ceiling needs at least one image with >= 2 trials")
    inv = inverse[keep]
    x = responses[keep]
    n_img = counts.size
    sums = np.zeros((n_img, x.shape[1]))
    np.add.at(sums, inv, x)
    means = sums / np.maximum(counts, 1)[:, None]
    ss = ((x - means[inv]) ** 2).sum(axis=0)
    dof = (counts[counts >= 2] - 1).sum()
    noise_var = ss / dof
    ncsnr = np.sqrt(np.maximum(0.0, 1.0 - noise_var)) / np.sqrt(np.maximum(noise_var, 1e-12))
    return ncsnr**2 / (ncsnr**2 + 1.0 / n_average)


def _coco_path(coco_annotations: Path, split: str) -> Path:
    if Path(coco_annotations).is_file():
        raise NSDFormatError(f"--coco-annotations {coco_annotations}: a file; expected the folder "
                             f"holding {' and '.join(COCO_FILES.values())} (or annotations/ "
                             f"with them, as the COCO zip extracts)")
    name = COCO_FILES[split]
    direct = Path(coco_annotations) / name
    nested = Path(coco_annotations) / "annotations" / name  # the layout of the COCO zip
    return nested if not direct.is_file() and nested.is_file() else direct


@dataclass(frozen=True)
class CocoLabels:
    """category_ids : (80,) ascending COCO ids; names : (80,); labels : coco_id -> (80,) uint8."""

    category_ids: tuple[int, ...]
    names: tuple[str, ...]
    labels: dict[int, np.ndarray]


def _read_coco(path: Path) -> tuple[dict, dict[int, str]]:
    """One COCO instances file and its categories {id: name}, validated."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise NSDFormatError(f"{path}: cannot read as JSON ({one_line(exc)})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise NSDFormatError(f"{path}: no '{key}' list (a COCO instances file has images, "
                                 f"annotations, categories)")
    try:  # OverflowError: an id of Infinity (json reads it)
        cats = {int(c["id"]): str(c.get("name", c["id"])) for c in data["categories"]}
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise NSDFormatError(f"{path}: malformed 'categories' ({one_line(exc)})") from None
    if len(cats) != N_COCO_CATEGORIES:
        raise NSDFormatError(f"{path}: {len(cats)} categories, expected {N_COCO_CATEGORIES} "
                             f"(COCO-80)")
    return data, cats


def load_coco_labels(coco_annotations: Path, wanted: dict[str, set[int]]) -> CocoLabels:
    """Multi-hot labels for the COCO images in ``wanted`` (split -> set of cocoIds).

    Both instances files must exist; only the splits with wanted images are parsed (the train
    file when none are). Columns follow ascending category id; ids need not be contiguous.
    """
    paths = {split: _coco_path(coco_annotations, split) for split in COCO_FILES}
    for path in paths.values():
        if not path.is_file():
            raise NSDFormatError(f"missing file {path}")
    splits = [s for s in COCO_FILES if wanted.get(s)] or ["train2017"]
    parsed = {s: _read_coco(paths[s]) for s in splits}
    categories = parsed[splits[0]][1]
    for s in splits[1:]:
        if set(parsed[s][1]) != set(categories):
            raise NSDFormatError(f"{paths[s]}: category ids differ from those in "
                                 f"{paths[splits[0]]}")
    ids = tuple(sorted(categories))
    column = {cid: i for i, cid in enumerate(ids)}
    labels: dict[int, np.ndarray] = {}
    for split, (data, _) in parsed.items():
        want = wanted.get(split, set())
        try:
            present = {int(im["id"]) for im in data["images"]} & want
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise NSDFormatError(f"{paths[split]}: malformed 'images' ({one_line(exc)})") from None
        if present != want:
            absent = sorted(want - present)
            raise NSDFormatError(f"{paths[split]}: {len(absent)} image(s) that "
                                 f"nsd_stim_info_merged.csv puts in {split} are not in its "
                                 f"'images', e.g. cocoId {absent[0]}")
        for coco_id in want:
            labels[coco_id] = np.zeros(N_COCO_CATEGORIES, np.uint8)
        for ann in data["annotations"]:
            try:
                image_id, cid = int(ann["image_id"]), int(ann["category_id"])
            except (KeyError, TypeError, ValueError, OverflowError) as exc:
                raise NSDFormatError(f"{paths[split]}: malformed annotation "
                                     f"({one_line(exc)})") from None
            if image_id in want:
                if cid not in column:
                    raise NSDFormatError(f"{paths[split]}: annotation {ann.get('id')} has "
                                         f"category_id {cid}, not in its 'categories'")
                labels[image_id][column[cid]] = 1
    return CocoLabels(ids, tuple(categories[i] for i in ids), labels)


# --------------------------------------------------------------------------------------------
# prepare


PREPARED_SCHEMA = pa.schema([
    pa.field("subject", pa.int32(), nullable=False),
    pa.field("nsd_id", pa.int64(), nullable=False),
    pa.field("coco_id", pa.int64(), nullable=False),
    pa.field("n_repeats", pa.int32(), nullable=False),
    pa.field("response", pa.list_(pa.float32()), nullable=False),
    pa.field("labels", pa.list_(pa.uint8()), nullable=False),
])
_META_KEY = b"alignsweep.nsd"


@dataclass
class _SubjectPlan:
    subject: int
    mask: np.ndarray
    sessions: list[Path]
    trials: list[int]


def _check_session_lengths(sessions: list[Path], trials: list[int]) -> None:
    """Every session holds the same number of trials (750 in the release), the last at most
    that many (a copy cut short at its end). Trials are located by summing earlier sessions'
    lengths, so one short session in the middle would shift every later trial onto another
    image: refused, naming the session that differs from the others (with two sessions of
    equal standing, the shorter)."""
    counts = collections.Counter(trials)
    usual = max(counts, key=lambda n: (counts[n], n))
    for i, (p, n) in enumerate(zip(sessions, trials)):
        last = i == len(sessions) - 1
        if n > usual or (n < usual and not last):
            raise NSDFormatError(
                f"{p}: {n} trials where the subject's other sessions hold {usual}; expected "
                f"every session to hold the same number (750 in the release), the last at most "
                f"as many -- a session cut short would shift every later trial's image")


def _plan_subject(nsd_root: Path, design: ExpDesign, subject: int, roi: str) -> _SubjectPlan:
    if not 1 <= subject <= design.subjectim.shape[0]:
        raise NSDFormatError(f"{Path(nsd_root) / EXPDESIGN}: subject {subject} not in "
                             f"'subjectim' (rows 1..{design.subjectim.shape[0]})")
    sessions = session_files(nsd_root, subject)
    mask = load_roi_mask(nsd_root, subject, roi)
    mask_path = _nifti_on_disk(roi_file(nsd_root, subject, roi))  # the file the mask came from
    grid = _stated_affine(mask_path)
    trials = [_betas_shape(p, mask.shape, mask_path, grid) for p in sessions]
    ncsnr = _nifti_on_disk(ncsnr_file(nsd_root, subject))
    if ncsnr is not None:  # (a file that cannot be read is named by load_ncsnr)
        _check_grid(mask_path, grid, ncsnr, _stated_affine(ncsnr))
    _check_session_lengths(sessions, trials)
    total = 0
    for p, n in zip(sessions, trials):
        total += n
        if total > design.masterordering.size:
            raise NSDFormatError(f"{p}: sessions up to this one hold {total} trials but "
                                 f"'masterordering' has only {design.masterordering.size}")
    return _SubjectPlan(subject, mask, sessions, trials)


@_permission_named
def prepare(nsd_root: str | os.PathLike, coco_annotations: str | os.PathLike,
            subjects: Sequence[int] | None, roi: str, out: str | os.PathLike, *,
            progress: bool = True) -> Path:
    """Prepare the NSD table for ``subjects`` and ``roi`` and write it to ``out`` (Parquet).
    ``subjects=None`` means every subject in the release (:func:`subjects_in_release`).

    Every file is validated before the first session is streamed, so a malformed tree fails
    fast with an :class:`NSDFormatError` naming the file. Rows are ordered by (subject, nsd_id);
    images a subject never saw in the sessions on disk are absent; trials of
    ``masterordering`` beyond those sessions are ignored. The schema metadata key
    ``alignsweep.nsd`` holds JSON: roi, subjects, n_voxels per subject, ncsnr per subject (the
    ROI's voxels, from the release's ncsnr.nii.gz or ncsnr.nii; null where it has none),
    category_ids, names.
    """
    nsd_root = expand_user(nsd_root, "--nsd-root")
    coco_annotations = expand_user(coco_annotations, "--coco-annotations")
    out = expand_user(out, "--out")
    subjects = _subject_list(nsd_root, subjects)
    spec = roi_spec(roi)
    _release_root(nsd_root)
    design = load_expdesign(nsd_root)
    info = load_stim_info(nsd_root)
    plans = [_plan_subject(nsd_root, design, s, spec.name) for s in subjects]
    seen = {p.subject: _images_seen(nsd_root, design, info, p) for p in plans}
    coco = load_coco_labels(coco_annotations, _coco_wanted(nsd_root, info, seen))
    ncsnr = {}  # read before streaming, so a bad ncsnr file fails in seconds, not hours
    for p in plans:
        v = load_ncsnr(nsd_root, p.subject, p.mask)
        # each float32 as its shortest exact decimal: read back as float32 it is the release's
        # value, so voxel_ncsnr_min keeps the voxels the release's ncsnr would
        ncsnr[str(p.subject)] = None if v is None else [float(str(x)) for x in v]

    parts = []
    bar = tqdm(total=sum(len(p.sessions) for p in plans), desc=f"NSD {spec.name} sessions",
               unit="session", disable=not progress)
    with bar:
        for plan in plans:
            parts.append(_average_repeats(plan, seen[plan.subject], bar))
    meta = {"roi": spec.name, "subjects": subjects,
            "n_voxels": {str(p.subject): int(p.mask.sum()) for p in plans},
            "ncsnr": ncsnr,
            "category_ids": list(coco.category_ids), "category_names": list(coco.names),
            "nsd_root": str(nsd_root.resolve())}
    table = _to_table(parts, info, coco, meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _images_seen(nsd_root: Path, design: ExpDesign, info: StimInfo,
                 plan: _SubjectPlan) -> np.ndarray:
    """nsdIds (0-based) of the subject's trials on disk, in trial order: (trials,) int64."""
    ids = design.images_of_trials(plan.subject, sum(plan.trials))
    _, known = info.rows_of(ids)
    if not known.all():
        raise NSDFormatError(f"{nsd_root / STIM_INFO}: no row for nsdId "
                             f"{int(ids[~known][0])} (seen by subject {plan.subject})")
    return ids


def _coco_wanted(nsd_root: Path, info: StimInfo,
                 seen: dict[int, np.ndarray]) -> dict[str, set[int]]:
    """cocoIds per COCO split of every image any subject saw."""
    rows, _ = info.rows_of(np.unique(np.concatenate(list(seen.values()))))
    wanted: dict[str, set[int]] = {split: set() for split in COCO_FILES}
    for split, coco_id in zip(info.coco_split[rows], info.coco_id[rows]):
        if split not in wanted:
            raise NSDFormatError(f"{nsd_root / STIM_INFO}: cocoSplit {split!r} for cocoId "
                                 f"{coco_id}; accepted: {', '.join(COCO_FILES)}")
        wanted[split].add(int(coco_id))
    return wanted


@dataclass
class _SubjectPart:
    subject: int
    nsd_ids: np.ndarray  # (images,) ascending
    n_repeats: np.ndarray  # (images,)
    response: np.ndarray  # (images, voxels) float32


def _average_repeats(plan: _SubjectPlan, trial_ids: np.ndarray, bar: tqdm) -> _SubjectPart:
    """Stream the subject's sessions: z-score each, then average each image's repeats."""
    uniq, inverse = np.unique(trial_ids, return_inverse=True)
    sums = np.zeros((uniq.size, int(plan.mask.sum())), np.float64)
    counts = np.bincount(inverse, minlength=uniq.size)
    start = 0
    for path, n in zip(plan.sessions, plan.trials):
        bar.set_postfix_str(f"subj{plan.subject:02d} {path.name}")
        np.add.at(sums, inverse[start:start + n], zscore_session(read_session_roi(path, plan.mask)))
        start += n
        bar.update(1)
    return _SubjectPart(plan.subject, uniq, counts,
                        (sums / counts[:, None]).astype(np.float32))


def _to_table(parts: list[_SubjectPart], info: StimInfo, coco: CocoLabels,
              meta: dict) -> pa.Table:
    nsd_ids = np.concatenate([p.nsd_ids for p in parts])
    coco_ids = info.coco_id[info.rows_of(nsd_ids)[0]]
    labels = np.stack([coco.labels[int(c)] for c in coco_ids])
    lengths = np.concatenate([np.full(p.nsd_ids.size, p.response.shape[1], np.int64)
                              for p in parts])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    if offsets[-1] > np.iinfo(np.int32).max:  # list<float32> has int32 offsets
        raise NSDFormatError(f"{offsets[-1]} response values exceed one list<float32> column; "
                             f"prepare fewer subjects per table")
    label_offsets = np.arange(nsd_ids.size + 1) * N_COCO_CATEGORIES
    schema = PREPARED_SCHEMA.with_metadata({_META_KEY: json.dumps(meta).encode()})
    return pa.Table.from_arrays([
        pa.array(np.concatenate([np.full(p.nsd_ids.size, p.subject) for p in parts]),
                 pa.int32()),
        pa.array(nsd_ids, pa.int64()),
        pa.array(coco_ids, pa.int64()),
        pa.array(np.concatenate([p.n_repeats for p in parts]), pa.int32()),
        pa.ListArray.from_arrays(pa.array(offsets, pa.int32()),
                                 pa.array(np.concatenate([p.response.reshape(-1)
                                                          for p in parts]), pa.float32())),
        pa.ListArray.from_arrays(pa.array(label_offsets, pa.int32()),
                                 pa.array(labels.reshape(-1), pa.uint8())),
    ], schema=schema)


def prepared_metadata(table: pa.Table | pa.Schema) -> dict:
    """The JSON metadata ``prepare`` stores: roi, subjects, n_voxels {subject: n}, ncsnr
    {subject: [per voxel] or None} ({} for tables written before it), category_ids,
    category_names."""
    schema = table.schema if isinstance(table, pa.Table) else table
    raw = (schema.metadata or {}).get(_META_KEY)
    if raw is None:
        raise NSDFormatError("table has no 'alignsweep.nsd' metadata; write it with "
                             "`python -m references.nsd prepare`")
    meta = json.loads(raw)
    meta["n_voxels"] = {int(k): v for k, v in meta["n_voxels"].items()}
    meta["ncsnr"] = {int(k): v for k, v in meta.get("ncsnr", {}).items()}
    return meta


def read_prepared(path: str | os.PathLike) -> tuple[pa.Table, dict]:
    """Read a prepared table and its metadata, checking the columns ``prepare`` writes."""
    path = Path(path)
    if not path.is_file():
        raise NSDFormatError(f"missing file {path} (run `python -m references.nsd prepare`)")
    table = pq.read_table(path)
    for field in PREPARED_SCHEMA:
        if (field.name not in table.column_names
                or table.schema.field(field.name).type != field.type):
            raise NSDFormatError(f"{path}: column {field.name!r} missing or not {field.type}")
    return table, prepared_metadata(table)


def _fingerprint(paths: Iterable[Path]) -> list[list]:
    out = []
    for p in paths:
        st = p.stat()
        out.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return out


def _prepare_inputs(nsd_root: Path, coco_annotations: Path, subjects: Sequence[int],
                    roi: str) -> list[Path]:
    """The files ``prepare`` reads for ``subjects`` and ``roi``."""
    inputs = [nsd_root / EXPDESIGN, nsd_root / STIM_INFO]
    for s in subjects:
        inputs += [_nifti_required(roi_file(nsd_root, s, roi))]
        inputs += session_files(nsd_root, s)
        ncsnr = _nifti_on_disk(ncsnr_file(nsd_root, s))
        if ncsnr is not None:
            inputs.append(ncsnr)
    return inputs + [_coco_path(coco_annotations, split) for split in COCO_FILES]


@_permission_named
def release_files(nsd_root: str | os.PathLike, coco_annotations: str | os.PathLike,
                  subjects: Sequence[int] | None, roi: str) -> dict[str, list[int]]:
    """What a run reads of the release, as {path relative to the root (or the COCO file's
    name): [size, mtime_ns]}: the files ``prepare`` reads and the stimuli. What a ``--resume``
    compares, so that resumed trials do not train on a release changed in place since the
    run's other trials (sweeps.plan.fingerprint)."""
    nsd_root, coco_annotations = Path(nsd_root), Path(coco_annotations)
    inputs = _prepare_inputs(nsd_root, coco_annotations, _subject_list(nsd_root, subjects), roi)
    out = {}
    for p in [*inputs, nsd_root / STIMULI]:
        st = p.stat()
        try:
            name = str(p.relative_to(nsd_root))
        except ValueError:  # the COCO annotations
            name = f"COCO {p.name}"
        out[name] = [st.st_size, st.st_mtime_ns]
    return out


def prepare_cached(nsd_root: str | os.PathLike, coco_annotations: str | os.PathLike,
                   subjects: Sequence[int] | None, roi: str, *, progress: bool = True) -> Path:
    """``prepare`` into the shared cache, keyed by the arguments and the size and mtime of every
    input file, so concurrent callers prepare once and a changed release is re-read.
    ``subjects=None`` means every subject in the release, resolved before keying."""
    nsd_root, coco_annotations = Path(nsd_root), Path(coco_annotations)
    subjects = _subject_list(nsd_root, subjects)
    inputs = _prepare_inputs(nsd_root, coco_annotations, subjects, roi)
    missing = [p for p in inputs if not p.is_file()]
    if missing:
        raise NSDFormatError(f"missing file {missing[0]}")
    key = content_hash({"kind": "nsd-prepared", "version": 2, "roi": roi, "subjects": subjects,
                        "inputs": _fingerprint(inputs)})
    final = cache_root() / "nsd_prepared" / f"{roi}-{key}"
    with build_once(final) as tmp:
        if tmp is not None:
            prepare(nsd_root, coco_annotations, subjects, roi, tmp / "prepared.parquet",
                    progress=progress)
    table = final / "prepared.parquet"
    try:  # the footer (at the file's end) and the metadata: a cut or emptied file fails here
        prepared_metadata(pq.read_schema(table))
        pq.read_metadata(table)
    except Exception as exc:  # pyarrow's ArrowInvalid, OSError, a missing file, bad metadata
        raise NSDFormatError(damaged_entry(final, f"{table.name}: {exc}")) from None
    return table


# --------------------------------------------------------------------------------------------
# Checking a release before a run


@_permission_named
def check_release(nsd_root: str | os.PathLike, subjects: Sequence[int] | None,
                  rois: str | Sequence[str]) -> dict[int, np.ndarray]:
    """Validate the release as :func:`prepare` and the stimulus reader will read it, from file
    headers only, so a malformed copy fails before any run starts.

    Checks: nsd_expdesign.mat and nsd_stim_info_merged.csv (read whole; they are small);
    nsd_stimuli.hdf5's ``imgBrick`` header is (images, H, W, 3) uint8 with more images than the
    largest nsdId in ``subjectim``; every subject asked for (``None``: all present, see
    :func:`subjects_in_release`) is present; per subject and ROI, the ROI NIfTI (``.nii.gz`` or
    ``.nii``, not both) is a 3-D volume with at least one voxel of the ROI's labels (the mask is
    small and is read), and every session file (one per session number, numbered 1..N) has a
    ``betas`` header that is 4-D, signed integer or float, with spatial shape (z, y, x) = the
    mask's (x, y, z) reversed, every chunk written (from the file's chunk index), as many
    trials as the subject's other sessions (the last at most as many) and no more trials in
    total than ``masterordering``; per subject, its ncsnr NIfTI,
    when present, is readable with the mask's shape (read whole: it is as small as a mask); the
    stim info has a row, with a known cocoSplit, for every image the sessions on disk show.

    Not checked: betas values, image pixels, the COCO annotation files.
    Raises NSDFormatError, one line naming the file, on the first problem found. Returns, per
    subject checked, the nsdIds (0-based) its sessions on disk show, in trial order: the
    images a table prepared from this release holds (so a dry run can size the splits).
    """
    nsd_root = _release_root(nsd_root)
    specs = [roi_spec(r) for r in ([rois] if isinstance(rois, str) else rois)]
    if not specs:
        raise NSDFormatError(f"no ROI given; accepted: {', '.join(ROIS)}")
    if subjects is not None:
        subjects = _subject_list(nsd_root, subjects)
    design = load_expdesign(nsd_root)
    info = load_stim_info(nsd_root)
    stimuli = nsd_root / STIMULI
    n_images = stimuli_shape(stimuli)[0]
    n_needed = int(design.subjectim.max()) + 1  # largest 1-based nsdId in the design
    if n_images < n_needed:
        raise NSDFormatError(f"{stimuli}: '{STIMULI_DATASET}' holds {n_images} images but "
                             f"'subjectim' in {nsd_root / EXPDESIGN} uses nsdIds up to "
                             f"{n_needed} (1-based); expected at least {n_needed} images")
    if info.nsd_id[0] > 0 and info.nsd_id[-1] >= n_images:
        # 1..N: a 1-based column (a MATLAB export) would give each image the cocoId and
        # labels of the next, which no other check sees
        raise NSDFormatError(
            f"{nsd_root / STIM_INFO}: nsdId runs {info.nsd_id[0]}..{info.nsd_id[-1]} but "
            f"'{STIMULI_DATASET}' in {stimuli} holds {n_images} images (nsdId 0.."
            f"{n_images - 1}); expected the release's 0-based nsdId (subtract 1 from a "
            f"1-based column)")
    present = _subjects_present(nsd_root, design, every=subjects is None)
    subjects = present if subjects is None else subjects
    for s in subjects:
        if s > design.subjectim.shape[0]:  # (its betas may be on disk: no image list)
            raise NSDFormatError(f"subject {s} not in 'subjectim' of {nsd_root / EXPDESIGN} "
                                 f"(rows 1..{design.subjectim.shape[0]}); subjects present: "
                                 f"{', '.join(map(str, present))}")
        if s not in present:
            _refuse_stray_session_files(betas_dir(nsd_root, s), s)  # names what is there
            elsewhere = _betas_elsewhere(nsd_root, s)
            raise NSDFormatError(f"{betas_dir(nsd_root, s)}: no {SESSION_NAMES} for "
                                 f"subject {s}"
                                 f"{f' (its betas are in {elsewhere})' if elsewhere else ''}"
                                 f"; subjects present: "
                                 f"{', '.join(map(str, present))}")
    seen = {}
    for s in subjects:
        for spec in specs:
            plan = _plan_subject(nsd_root, design, s, spec.name)
        # The sessions, hence the trials, are the subject's whatever the ROI, and every mask has
        # the betas' volume: any plan will do.
        seen[s] = _images_seen(nsd_root, design, info, plan)
        load_ncsnr(nsd_root, s, plan.mask)
    _coco_wanted(nsd_root, info, seen)
    return seen


# --------------------------------------------------------------------------------------------
# CLI


_SUBJECT_ARG = integer_arg("a subject's number, 1..8 in the release")


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m references.nsd",
                           description="NSD native release -> prepared Parquet table")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="z-score, average repeats, select ROI voxels, attach "
                                       "COCO-80 labels; write Parquet")
    p.add_argument("--nsd-root", required=True, type=Path, help="root of the NSD release")
    p.add_argument("--coco-annotations", required=True, type=Path,
                   help="folder with instances_train2017.json and instances_val2017.json")
    p.add_argument("--subject", type=_SUBJECT_ARG, action="append",
                   help="subject number (1..8); repeat for several (default: every subject "
                        "in the release)")
    p.add_argument("--roi", required=True, choices=sorted(ROIS))
    p.add_argument("--out", required=True, type=Path, help="output .parquet file")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    c = sub.add_parser("check", help="validate the release from file headers, as a sweep's "
                                     "dry run does (reads no betas or COCO annotations)")
    c.add_argument("--nsd-root", required=True, type=Path, help="root of the NSD release")
    c.add_argument("--subject", type=_SUBJECT_ARG, action="append",
                   help="subject number (1..8); repeat for several (default: every subject "
                        "in the release)")
    c.add_argument("--roi", choices=sorted(ROIS), action="append",
                   help="ROI to check; repeat for several (default: all)")
    return parser


def _inside_inputs(out: Path, *roots: Path) -> bool:
    """Whether ``out`` is an existing file (not a Parquet table) under one of the input
    folders: writing it would replace part of the release, e.g. nsd_expdesign.mat."""
    if not out.is_file() or out.suffix.lower() == ".parquet":
        return False
    target = out.resolve()
    return any(target.is_relative_to(expand_user(r).resolve()) for r in roots)


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: every error one line on stderr and a non-zero status; Ctrl-C ends it with
    "interrupted" and 130 (a prepare streams for hours at the release's size)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # prepare writes --out only once every session is read, through a temporary file
        print("interrupted; nothing written", file=sys.stderr)
        return 130


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    try:  # ~name naming no user of this machine: one line, as any bad path
        for name in ("nsd_root", "coco_annotations", "out"):
            if getattr(args, name, None) is not None:
                setattr(args, name, expand_user(getattr(args, name),
                                                "--" + name.replace("_", "-")))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        a_file = args.nsd_root.exists() and not args.nsd_root.is_dir()
    except OSError:  # a folder this user cannot enter: named by the readers below
        a_file = False
    if a_file:
        print(f"error: --nsd-root {args.nsd_root}: a file, not a folder; accepted: the root "
              f"folder of the NSD release (holding nsddata/ and nsddata_betas/)",
              file=sys.stderr)
        return 2
    if args.command == "check":
        try:
            check_release(args.nsd_root, args.subject, args.roi or sorted(ROIS))
        except (NSDFormatError, OSError) as exc:
            hint = ""
            if not args.roi and str(exc).startswith("missing file "):
                # every ROI is checked by default: a release holding one ROI's masks (all a
                # V1 sweep needs) is refused, so say which option checks just that
                for spec in ROIS.values():
                    if str(exc).split()[2].endswith(spec.filename):
                        others = [r for r in sorted(ROIS) if r != spec.name]
                        hint = (f" (needed for ROI {spec.name} only; --roi "
                                f"{' --roi '.join(others)} checks the release without it)")
            print(f"error: {one_line(exc)}{hint}", file=sys.stderr)
            return 2
        subjects = args.subject or subjects_in_release(args.nsd_root)
        print(f"{args.nsd_root}: ok (subjects {', '.join(map(str, subjects))}; ROI "
              f"{', '.join(args.roi or sorted(ROIS))})")
        return 0
    if args.out.is_dir() or not str(args.out).strip():
        print(f"error: --out {args.out}: a folder; accepted: the path of the .parquet file to "
              f"write", file=sys.stderr)
        return 2
    if _inside_inputs(args.out, args.nsd_root, args.coco_annotations):
        print(f"error: --out {args.out}: a file of the release or the COCO annotations, which "
              f"it would replace; accepted: the path of a new .parquet file (or a table "
              f"prepared before)", file=sys.stderr)
        return 2
    why = unwritable(args.out.absolute().parent)
    if why:  # found now, not after hours of streaming
        print(f"error: --out {args.out}: {why}; accepted: the path of a .parquet file in a "
              f"folder this user can write", file=sys.stderr)
        return 2
    try:
        out = prepare(args.nsd_root, args.coco_annotations, args.subject, args.roi, args.out,
                      progress=not args.no_progress)
    except (NSDFormatError, OSError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    meta = prepared_metadata(pq.read_schema(out))
    rows = pq.read_metadata(out).num_rows
    print(f"wrote {out}: {rows} rows, ROI {meta['roi']}, voxels per subject "
          f"{meta['n_voxels']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
