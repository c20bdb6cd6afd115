"""From parsed command-line arguments to a validated, frozen ``Plan``, without starting Ray.

``make_plan(args)`` checks everything a real run would check before its first trial: the sweep
file, the seeds and search settings, per-trial resources, every explicitly given data path
(an explicit path that is wrong is an error, never a silent fall back to the demo), the Ray
address and MLflow URI syntax, the storage folder and what --resume needs. ``check_services``
then asks the Ray head and the MLflow server given on the command line whether they answer
(a TCP connect and an HTTP GET: nothing is started). Every problem is a ``UsageError`` with a
one-line message naming the bad value and what is accepted; ``sweeps/run.py`` prints it as
``error: <message>`` and exits 2.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import re
import shlex
import socket
import tempfile
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from records import (
    FINGERPRINT_FILE,
    PARENT_FILE,
    RESUME_POINTER_SUFFIX,
    ParentPointer,
    control_name,
    experiment_name,
    parse_run_folder,
    read_json_object,
    read_manifest,
)
from records.errors import exception_line, one_line
from records.stores import (
    first_open_lock,
    first_open_lock_path,
    sqlite_path,
    sqlite_store_problem,
)
from records.uris import (
    databricks_credentials_missing,
    expand_user,
    redact,
    tracking_refuses,
    tracking_unreachable,
    tracking_uri,
)
from references.cache import ENV_VAR as CACHE_ENV
from references.cache import file_sha256, owner_name, unwritable
from sweeps.spec import (
    PAPER_DATA,
    DataSource,
    Resources,
    Sweep,
    TrialSpec,
    apply_overrides,
    check_amount,
    data_kwarg_defaults,
    list_sweeps,
    load_sweep,
    other_unicode_form,
    parse_override,
    select_trials,
)

if TYPE_CHECKING:
    import numpy as np

DATA_CHOICES = ("demo", "imagenet", "nsd", "paper")
SEARCH_CHOICES = ("grid", "optuna")
NSD_SUBJECTS = range(1, 9)
DEFAULT_STORAGE = "ray_results"
def _address_accepted(source: str) -> str:
    """What an address accepts, for one that came by ``source`` (--address or RAY_ADDRESS:
    the way to a local Ray is to omit the one, or unset the other)."""
    return (f"auto, HOST:PORT of a Ray head (e.g. ray-head:6379) or ray://HOST:PORT; "
            f"{_omit(source)} to start a local Ray")


class UsageError(ValueError):
    """A bad command line or input: one line naming the value and what is accepted (exit 2)."""


@dataclass(frozen=True)
class Plan:
    """Everything a sweep run needs, validated.

    sweep : the name given; spec : the loaded sweep; conditions : its condition names.
    scale : "demo" | "paper"; smoke : the smoke test (tiny simulated data, 1 epoch, 3 trials
        per condition; scale is then "demo").
    seeds : repeats of every configuration (seed 0..seeds-1).
    data_kind : the --data value ("demo" | "imagenet" | "nsd" | "paper").
    data : condition -> DataSource (hashable: prepare each distinct one once).
    data_description : the run's first line, e.g. "demo scale on the simulated world (no real
        data configured)".
    trials : the grid's trials, CLI resource overrides applied (for --search optuna: the grid
        the sampler's ranges come from).
    resources : condition -> per-trial Resources after overrides.
    search : "grid" | "optuna"; num_samples : optuna trials per condition (None for grid).
    address : None = start a local Ray; "auto", "HOST:PORT" or "ray://HOST:PORT" = join.
    mlflow_uri : tracking URI (sqlite paths made absolute, so workers share the file).
    resume : continue the latest run of this experiment (``resume_pointer``), running only
        what did not finish. storage : absolute folder (or a cloud URI) for Ray Tune's results.
    experiment : the Ray experiment folder name and the MLflow experiment name:
        "<sweep>-<scale>" or "<sweep>-smoke", so demo, smoke and paper results never mix.
    overrides : --set KEY=VALUE settings applied to every trial (in each trial's config, so in
        its MLflow params, and as the ``overrides`` tag).
    only : --only patterns; trials are then the matching ones, conditions those they belong
        to. n_grid : trials before the selection.
    """

    sweep: str
    spec: Sweep
    conditions: tuple[str, ...]
    scale: str
    smoke: bool
    seeds: int
    data_kind: str
    data: dict[str, DataSource] = field(hash=False)
    data_description: str
    trials: tuple[TrialSpec, ...]
    resources: dict[str, Resources] = field(hash=False)
    search: str
    num_samples: int | None
    address: str | None
    mlflow_uri: str
    resume: bool
    storage: str
    experiment: str
    overrides: dict = field(default_factory=dict, hash=False)
    only: tuple[str, ...] = ()
    n_grid: int = 0
    weights: str | None = None  # --weights (pretrained conditions); None: the scale's default
    # where address and mlflow_uri came from, as errors name them: the flag, or the
    # environment variable read in its absence (RAY_ADDRESS, MLFLOW_TRACKING_URI)
    address_from: str = "--address"
    mlflow_from: str = "--mlflow-uri"
    # negative controls the plan leaves out: under --search optuna the sampler draws the
    # condition's alphas afresh, so a control's fixed alphas would never meet one to compare
    left_out: tuple[str, ...] = ()
    # the command line's words after sweeps/run.py, as given: what the resume line repeats
    # (a resume is refused under other settings); () where a plan is built in code
    argv: tuple[str, ...] = ()

    @property
    def planned(self) -> dict[str, int]:
        """Trials the run will launch per condition (a search: its baseline, then the
        samples)."""
        if self.search == "optuna":
            return {c: self.num_samples + 1 for c in self.conditions}
        counts: dict[str, int] = {}
        for t in self.trials:
            counts[t.condition] = counts.get(t.condition, 0) + 1
        return counts

    @property
    def n_trials(self) -> int:
        """Trials the run will launch."""
        return sum(self.planned.values())

    @property
    def nsd_subjects(self) -> tuple[int, ...]:
        """The NSD subjects a paper-scale run reads (every NSD condition's); () otherwise."""
        if self.scale != "paper":
            return ()
        return tuple(sorted({s for src in self.data.values() if src.kind == "nsd"
                             for s in src.subjects or ()}))

    @property
    def resume_pointer(self) -> str:
        """The file in which a run records its Ray Tune experiment folder, so that --resume
        finds the latest one (``resume_pointer``; written by sweeps.execute, checked by
        make_plan)."""
        return str(resume_pointer(self.storage, self.experiment, self.search))


def resume_pointer(storage: str | Path, experiment: str, search: str) -> Path:
    """``<storage>/<experiment>.latest`` for a grid run, ``<experiment>.optuna.latest`` for an
    adaptive search: each kind resumes its own latest run (one pointer for both let a search
    take it from an interrupted grid run, which could then no longer be resumed)."""
    kind = "" if search == "grid" else f".{search}"
    return Path(str(storage).rstrip("/") or "/") / f"{experiment}{kind}{RESUME_POINTER_SUFFIX}"


# --------------------------------------------------------------------------------------------
# Pieces, each validating one argument


def _amount(flag: str, value: str | None) -> float | None:
    """A --cpus-per-trial / --gpus-per-trial value (spec.check_amount's rules)."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = None
    try:
        return check_amount(flag, number, gpu=flag == "--gpus-per-trial")
    except ValueError as exc:
        reason = str(exc).split("; ", 1)[1]
        raise UsageError(f"{flag}={value!r}; {reason}") from None


def _check_dir(flag: str, value: str) -> Path:
    if not value.strip():  # Path("") is the working folder
        raise UsageError(f"{flag} {value!r}: an empty path; accepted: a directory")
    path = _expand_user(value, flag)
    if not path.is_dir():
        what = "not a directory" if path.exists() else "no such directory"
        raise UsageError(f"{flag} {value}: {what}")
    # Absolute (trials run in other folders) but not resolved: a data folder reached through a
    # symbolic link keeps the path given, so what sits beside or above it there (Kaggle's
    # LOC_*.csv above Data/CLS-LOC) is found where the user put it, and messages name that path.
    return Path(os.path.abspath(path))


def check_imagenet_root(value: str) -> Path:
    """An ImageNet tree as the run will read it (``references.imagenet``: any of its layouts, both
    splits indexed, images present, the same classes in train and val)."""
    from references import datasets, imagenet

    root = _check_dir("--imagenet-root", value)
    try:
        datasets.imagenet_index(root)
    except imagenet.ImageNetFormatError as exc:
        raise UsageError(f"--imagenet-root {value}: {exc}") from None
    return root


def split_size_problem(t, n_train: int, n_val: int, what: str) -> str | None:
    """Why trial ``t``'s settings cannot be met by splits of ``n_train`` / ``n_val`` images
    (``what`` names the data), or None: a batch larger than the training split (it would
    train on the whole split while MLflow recorded the batch asked for), or validation folds
    the validation split cannot fill (every trial failed after its first epoch). Asked by
    the plan of an ImageNet tree (its index is built by the dry run) and by the driver of
    every data source once it is prepared."""
    from trainable.config import TrialConfig

    cfg = TrialConfig.from_dict(t.config)  # the sweep's values, or the defaults
    if cfg.batch_size > n_train:
        return (f"trial {t.trial_id}: batch_size={cfg.batch_size} but the training split of "
                f"{what} holds {n_train} images; accepted: batch_size <= {n_train} "
                f"(--set batch_size=N)")
    if 2 * cfg.val_folds > n_val:
        return (f"trial {t.trial_id}: val_folds={cfg.val_folds} needs {2 * cfg.val_folds} "
                f"validation images but the validation split of {what} holds {n_val}; "
                f"accepted: val_folds <= {n_val // 2} (--set val_folds=N)")
    return None


def validation_groups_problem(t, counts: dict[int, int], n_val: int) -> str | None:
    """Why trial ``t`` cannot score a voxel reference on its fixed validation subset, or None.

    A voxel reference scores each subject on its own images of that subset
    (``trainable.train.validation_indices``: ``val_images`` of the ``n_val`` validation images),
    and a subject with fewer than 2 x val_folds of them is left out; where none has that many,
    every trial failed after its first epoch. ``counts``: subject -> its images in the subset.
    Asked by the dry run (from the release's design) and by the driver (from the prepared
    table)."""
    from trainable.config import TrialConfig

    cfg = TrialConfig.from_dict(t.config)
    need = 2 * cfg.val_folds
    most = max(counts.values(), default=0)
    if most >= need:
        return None
    per_subject = ", ".join(f"subject {s}: {n}" for s, n in sorted(counts.items())) or "none"
    taken = (f"val_images={cfg.val_images} of the {n_val} validation images"
             if cfg.val_images < n_val else f"all {n_val} validation images")
    larger = (" or a larger val_images (--set val_images=N)"
              if cfg.val_images < n_val else "")
    return (f"trial {t.trial_id}: val_folds={cfg.val_folds} needs {need} validation images of "
            f"one subject, but the fixed validation subset ({taken}) gives {per_subject}; "
            f"accepted: val_folds <= {most // 2} (--set val_folds=N){larger}")


def check_trials_fit(trials, data, reference) -> None:
    """Settings the prepared data of one condition cannot meet, refused (``UsageError``)
    before anything is recorded: the splits' sizes (``split_size_problem``), each subject's
    share of the validation subset (``prepared_validation_groups_problem``), a voxel
    reliability threshold that keeps no voxel (it failed every trial after its first epoch)
    and a loss no batch of a trial's first epoch can apply (``first_epoch_groups_problem``).
    ``data``: a ``trainable.data.TrialData``; ``reference``: the condition's reference (None:
    one computed from the images, which bounds none of these). Asked by the driver of every
    data source it prepares, and by the dry run of the simulated NSD-like world."""
    from trainable.config import TrialConfig
    from trainable.train import first_epoch_groups_problem

    n_train, n_val = len(data.train), len(data.val)
    for t in trials:
        problem = (split_size_problem(t, n_train, n_val, data.description)
                   or prepared_validation_groups_problem(t, data, reference))
        if problem:
            raise UsageError(problem)
        cfg = TrialConfig.from_dict(t.config)
        threshold = cfg.voxel_ncsnr_min
        if threshold > 0 and hasattr(reference, "select_voxels"):
            try:
                reference.select_voxels(threshold)
            except ValueError as exc:
                raise UsageError(f"trial {t.trial_id}: {exc}") from None
        # the trial's own first-epoch check, asked before any trial starts: it failed each
        # trial after Ray had scheduled it (Tune's error table, exit 1)
        problem = first_epoch_groups_problem(getattr(data.train, "image_ids", None),
                                             reference, cfg)
        if problem:
            raise UsageError(f"trial {t.trial_id}: {problem}")


def prepared_validation_groups_problem(t, data, reference) -> str | None:
    """``validation_groups_problem`` from prepared data: each subject's images of the
    trial's fixed validation subset, as the voxel reference groups them. None for an
    image-computed reference (every image has a response: the split's size,
    ``split_size_problem``, is what bounds it) or a split without image ids."""
    ids = getattr(data.val, "image_ids", None)
    if ids is None or not hasattr(reference, "groups"):
        return None
    import torch

    from trainable.config import TrialConfig
    from trainable.train import validation_indices

    cfg = TrialConfig.from_dict(t.config)
    subset = torch.as_tensor(ids)[validation_indices(len(data.val), cfg.val_images)]
    counts = {s: int(rows.numel()) for s, (rows, _) in reference.groups(subset).items()}
    return validation_groups_problem(t, counts, len(data.val))


def _check_splits(trials, data: dict, conditions, nsd_seen: dict[int, np.ndarray]) -> None:
    """The splits' sizes (``split_size_problem``) and, for a voxel reference, each subject's
    share of the validation subset (``validation_groups_problem``), refused in the dry run:
    an ImageNet tree from the index the root's check built (kept for the process), an NSD
    release from the images its sessions show (``nsd_seen``: subject -> nsdIds, from
    ``references.nsd.check_release``), split as the trials will split them. At paper scale
    the driver would otherwise find these only after preparing the whole release."""
    import numpy as np

    from references import datasets

    voxel = {c.name for c in conditions if c.reference == "nsd"}
    nsd_splits = None
    for t in trials:
        src = data.get(t.condition)
        if src is None or src.kind not in ("imagenet", "nsd", "simulated_single_label"):
            continue
        if src.kind == "simulated_single_label":  # the sizes follow from its arguments
            n_train, n_val, what = _single_label_sizes(dict(src.options))
            problem = split_size_problem(t, n_train, n_val, what)
        elif src.kind == "imagenet":
            train, val = datasets.imagenet_index(src.imagenet_root)
            problem = split_size_problem(t, len(train), len(val),
                                         f"--imagenet-root {src.imagenet_root}")
        else:
            if nsd_splits is None:
                shown = [nsd_seen[s] for s in src.subjects]
                nsd_splits = datasets.nsd_split(np.concatenate(shown) if shown else
                                                np.zeros(0, np.int64),
                                                seed=datasets.NSD_SPLIT_SEED)
            train, val = nsd_splits
            what = (f"--nsd-root {src.nsd_root} (subject"
                    f"{'s' if len(src.subjects) > 1 else ''} "
                    f"{', '.join(map(str, src.subjects))})")
            problem = split_size_problem(t, len(train), len(val), what)
            if problem is None and t.condition in voxel:
                problem = validation_groups_problem(
                    t, _validation_counts(t, val, {s: nsd_seen[s] for s in src.subjects}),
                    len(val))
        if problem:
            raise UsageError(problem)
    _check_simulated_nsd(trials, data, conditions)


def _check_simulated_nsd(trials, data: dict, conditions) -> None:
    """``check_trials_fit`` of the simulated NSD-like world, as the driver asks it: which
    images each subject saw, their split and the voxels' reliability follow from the world
    itself, so it is made here (cached: about 4 s the first time, then read) with its ROI
    table. The dry run refused none of these; the run did, once Ray had started."""
    from trainable.data import TrialData

    refs = {c.name: c.reference for c in conditions}
    prepared: dict[Any, Any] = {}
    for name in dict.fromkeys(t.condition for t in trials):
        src = data.get(name)
        if src is None or src.kind != "simulated_nsd":
            continue
        if src not in prepared:
            bundle = src.build(progress=False)
            prepared[src] = (bundle, TrialData.from_bundle(bundle, src.describe()))
        bundle, prepared_data = prepared[src]
        check_trials_fit([t for t in trials if t.condition == name], prepared_data,
                         bundle.responses if refs.get(name) == "nsd" else None)


def _single_label_sizes(options: dict) -> tuple[int, int, str]:
    """(train, val, description) of the simulated single-label world these generator
    arguments make, without making it: categories x images per class, each split."""
    kw = data_kwarg_defaults("simulated_single_label") | options
    k = int(kw["n_categories"])
    return (k * int(kw["n_train_per_class"]), k * int(kw["n_val_per_class"]),
            f"the simulated single-label world ({k} categories)")


def _validation_counts(t, val: np.ndarray, seen: dict[int, np.ndarray]) -> dict[int, int]:
    """Per subject, how many images of trial ``t``'s fixed validation subset of the ascending
    validation ids ``val`` it saw (``seen``: subject -> nsdIds)."""
    import numpy as np

    from trainable.config import TrialConfig
    from trainable.train import validation_indices

    cfg = TrialConfig.from_dict(t.config)
    subset = val[validation_indices(len(val), cfg.val_images).numpy()]
    counts = {s: int(np.isin(subset, ids).sum()) for s, ids in seen.items()}
    return {s: n for s, n in counts.items() if n}


def check_nsd_root(value: str, subjects: tuple[int, ...] | None, rois: set[str]
                   ) -> tuple[Path, tuple[int, ...], dict[int, np.ndarray]]:
    """The files of an NSD release that preparing ``rois`` for ``subjects`` reads, checked from
    their headers (``references.nsd.check_release``); ``subjects`` None = every subject present
    in the release. Returns (root, subjects, the nsdIds each subject's sessions show)."""
    from references import nsd

    root = _check_dir("--nsd-root", value)
    needed = [nsd.EXPDESIGN, nsd.STIM_INFO, nsd.STIMULI]
    for rel in needed:
        if not (root / rel).is_file():
            raise UsageError(f"--nsd-root {value}: missing {rel}; accepted: the root of an NSD "
                             f"release (nsddata/, nsddata_betas/, nsddata_stimuli/)")
    try:
        if subjects is None:
            subjects = nsd.subjects_in_release(root)
        seen = nsd.check_release(root, subjects, sorted(rois))  # every ROI and session
    except nsd.NSDFormatError as exc:
        raise UsageError(f"--nsd-root {value}: {exc}") from None
    return root, tuple(subjects), seen


def _weights(value: str | None, conditions) -> str | None:
    """--weights: the pretrained conditions' frozen network ("torchvision", "auto" or a state
    dict file, made absolute: trials run in other folders); None = the scale's default
    (torchvision's file at paper scale, the project's own trained network at demo scale)."""
    if value is None:
        return None
    if not any(c.reference == "pretrained" for c in conditions):
        raise UsageError(f"--weights {value} but no selected condition has a pretrained "
                         f"reference; accepted: --weights with a pretrained_* condition")
    if value in ("torchvision", "auto"):
        return value
    if not value.strip():
        raise UsageError(f"--weights {value!r}: an empty path; accepted: a state dict file, "
                         f"torchvision or auto")
    return str(_expand_user(value, "--weights").resolve())


def weights_spec(weights: str | None, *, simulated: bool) -> str:
    """The pretrained reference's weights: --weights, else torchvision's ImageNet file for
    real data and the project's own trained network ("auto") for the simulated world."""
    if weights is not None:
        return weights
    return "auto" if simulated else "torchvision"


def check_pretrained_weights(conditions, weights: str | None, scale: str) -> None:
    """A pretrained reference's weights file (torchvision's in the local torch hub cache at
    paper scale, never downloaded; or --weights PATH) must be there and load as a state dict
    of the condition's model before anything starts: it is read, as the run will read it."""
    from references.pretrained import load_network

    spec = weights_spec(weights, simulated=scale != "paper")
    if spec == "auto":
        return
    loaded: set[str] = set()
    for cond in conditions:
        if cond.reference != "pretrained" or cond.model in loaded:
            continue
        try:
            load_network(cond.model, spec)
        except ValueError as exc:  # WeightsNotFoundError included
            raise UsageError(f"condition {cond.name}: {one_line(exc)}") from None
        loaded.add(cond.model)


def check_coco_annotations(value: str) -> Path:
    """A folder holding instances_train2017.json and instances_val2017.json (directly or in
    annotations/, the layout of COCO's zip)."""
    from references import nsd

    root = _check_dir("--coco-annotations", value)
    for split, name in nsd.COCO_FILES.items():
        if not nsd._coco_path(root, split).is_file():
            raise UsageError(f"--coco-annotations {value}: missing {name}; accepted: a folder "
                             f"with {' and '.join(nsd.COCO_FILES.values())}")
    return root


def _address(value: str | None) -> str | None:
    """--address, else ``RAY_ADDRESS`` (what `ray job submit` sets for the job it runs): a
    job submitted to a cluster joins it instead of starting a Ray of its own."""
    flag = _source("--address", value, "RAY_ADDRESS")
    if flag == "RAY_ADDRESS":
        value = os.environ["RAY_ADDRESS"]
    if value == "local":  # Ray's own word for a new local instance, as with no address
        return None
    if value is None or value == "auto":
        return value
    hostport = value[len("ray://"):] if value.startswith("ray://") else value
    _host_port(flag, value, hostport, _address_accepted(flag))
    if value.startswith("ray://") and importlib.util.find_spec("grpc") is None:
        # Ray Client needs ray[client] (grpcio): the README's install has Ray Tune only, and
        # the run failed after the dry run had passed (ValueError, exit 1)
        raise UsageError(f"{flag} {value!r}: a Ray Client address, but this install lacks "
                         f"Ray Client (pip install 'ray[client]'); accepted: HOST:PORT of the "
                         f"cluster's head (ray start --head's address), auto, or Ray Client "
                         f"installed")
    return value


def _expand_user(value: str, what: str | None = None) -> Path:
    """``records.uris.expand_user`` with its refusal a UsageError."""
    try:
        return expand_user(value, what)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _source(flag: str, value: str | None, env: str) -> str:
    """The name a setting came by: ``flag`` when given, else ``env`` when that is set (what
    ``_address`` and ``records.uris.tracking_uri`` read in the flag's absence)."""
    return env if value is None and os.environ.get(env) else flag


#: How the tracking URI is named where neither --mlflow-uri nor MLFLOW_TRACKING_URI gave it.
DEFAULT_STORE_SOURCE = "the default tracking store (no --mlflow-uri, no MLFLOW_TRACKING_URI)"


def _mlflow_source(value: str | None) -> str:
    """What the tracking URI came by: the flag, the variable, or the default store."""
    source = _source("--mlflow-uri", value, "MLFLOW_TRACKING_URI")
    return DEFAULT_STORE_SOURCE if value is None and source.startswith("--") else source


def _omit(source: str) -> str:
    """How to drop a setting that came by ``source``: omit the flag, or unset the variable."""
    return f"omit {source}" if source.startswith("--") else f"unset {source}"


def _host_port(flag: str, value: str, hostport: str, accepted: str) -> tuple[str, int]:
    m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})", hostport)
    if not m or not 1 <= int(m.group(2)) <= 65535:
        raise UsageError(f"{flag} {value!r}; accepted: {accepted}")
    return m.group(1).strip("[]"), int(m.group(2))


#: how long a plan waits for another driver making a new SQLite store (seconds: MLflow makes
#: one in about 2 s here)
FIRST_OPEN_WAIT_S = 120


def _mlflow_uri(value: str | None) -> str:
    """The tracking URI (``records.uris.tracking_uri``) or a UsageError. A ``sqlite:`` file
    that exists must already be an MLflow store of this MLflow's schema (or be empty):
    MLflow would otherwise add its tables to another program's database, or migrate an old
    store, on the run's first write (``records.stores``)."""
    try:
        uri = tracking_uri(value)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    db = sqlite_path(uri) if uri.startswith("sqlite:") else None
    flag = _mlflow_source(value)
    if db is not None and db.is_file() and db.stat().st_size > 0:
        problem = sqlite_store_problem(db)
        if problem is not None and first_open_lock_path(db).exists():
            from filelock import Timeout

            try:  # a driver may be making it: wait for it (seconds), then look again
                with first_open_lock(db, timeout=FIRST_OPEN_WAIT_S):
                    problem = sqlite_store_problem(db)
            except Timeout:
                raise UsageError(f"{flag} {redact(uri)}: a driver has held "
                                 f"{first_open_lock_path(db)} for {FIRST_OPEN_WAIT_S} s while "
                                 f"making this store (stopped, or stuck?); accepted: a store no "
                                 f"driver is making (end that driver, or wait for it)") from None
        if problem is not None:
            raise UsageError(f"{flag} {redact(uri)}: {problem}; accepted: a new or empty "
                             f"file, or a store this MLflow ({_mlflow_version()}) wrote")
    if db is not None:  # SQLite writes the file and its journal beside it: found after Ray
        # started (MLflow retried for two minutes, then exit 1)
        problem = unwritable(db.parent)
        if problem is None and db.is_file():
            try:  # append mode changes nothing; it fails on a read-only or immutable file
                with open(db, "ab"):
                    pass
            except OSError as exc:
                problem = f"{db} cannot be written ({exc.strerror or type(exc).__name__})"
        if problem is not None:
            raise UsageError(f"{flag} {redact(uri)}: {problem}; accepted: a SQLite file in a "
                             f"folder this user can write")
    return uri


def _mlflow_version() -> str:
    import mlflow

    return mlflow.__version__


OBJECT_STORE_ENV = "ALIGNSWEEP_OBJECT_STORE"
_MIN_OBJECT_STORE = 75 * 2**20  # Ray refuses less


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not on this platform
        return None


def _object_store_bytes() -> int:
    """The local Ray's object store size: ``$ALIGNSWEEP_OBJECT_STORE`` bytes (default 1 GiB),
    at least Ray's minimum and at most this machine's memory."""
    text = os.environ.get(OBJECT_STORE_ENV, str(1 << 30))
    try:
        value = int(text)
    except ValueError:
        value = -1
    ram = _physical_memory()
    if value < _MIN_OBJECT_STORE or (ram is not None and value > ram):
        raise UsageError(f"{OBJECT_STORE_ENV}={text!r}; accepted: an integer number of bytes "
                         f">= {_MIN_OBJECT_STORE}"
                         + (f" and <= this machine's memory ({ram})" if ram else ""))
    return value


FLUSH_ENV = "ALIGNSWEEP_TRACKING_FLUSH_S"
DEFAULT_FLUSH_S = 900.0
MAX_FLUSH_S = 7 * 24 * 3600.0


def flush_seconds(text: str | None) -> float:
    """``$ALIGNSWEEP_TRACKING_FLUSH_S``: how long a finished trial waits for MLflow to take
    what it queued (default 900 s). ValueError (one line) for anything but a number of
    seconds in 0..one week."""
    if text is None:
        return DEFAULT_FLUSH_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= MAX_FLUSH_S:
        raise UsageError(f"{FLUSH_ENV}={text!r}; accepted: a number of seconds from 0 to "
                         f"{MAX_FLUSH_S:.0f} (default {DEFAULT_FLUSH_S:.0f})")
    return value


def _storage(value: str | None) -> str:
    """--storage as a local folder path. ``file:///PATH`` is that folder. Cloud URIs
    (``s3://``, ``gs://``, ...) are refused: the run's lock, resume pointer and parent-run
    file are written with local file operations, which would turn ``s3://b`` into a local
    folder ``s3:/b``; use a shared file system mounted on every node instead."""
    if value is not None and "://" in value:
        parts = urlsplit(value)
        if parts.scheme.lower() != "file":
            raise UsageError(f"--storage {redact(value)}: {parts.scheme}:// storage is not "
                             f"supported; accepted: a folder path (a shared file system on a "
                             f"cluster) or file:///PATH")
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise UsageError(f"--storage {value}: a file URI is file:///ABSOLUTE/PATH")
        value = parts.path
    elif value is not None and value.lower().startswith("file:"):  # file:relative, file:/x
        raise UsageError(f"--storage {value}: a file URI is file:///ABSOLUTE/PATH; accepted: "
                         f"that, or a folder path")
    if value is not None and not value.strip():  # Path("") is the working folder
        raise UsageError(f"--storage {value!r}: an empty path; accepted: a folder path")
    path = (_expand_user(value, "--storage") if value is not None
            else Path(DEFAULT_STORAGE)).resolve()
    if path.exists() and not path.is_dir():
        raise UsageError(f"--storage {value}: not a directory")
    problem = unwritable(path)
    if problem:
        raise UsageError(f"--storage {value if value is not None else path}: {problem}; "
                         f"accepted: a folder this user can create or write")
    return str(path)


#: The longest path of a socket Ray makes under its temporary folder's ``ray`` folder, less
#: that folder and the pid: ``/session_<YYYY-MM-DD_HH-MM-SS_ffffff>_<pid>/sockets/plasma_store``.
RAY_SOCKET_SUFFIX = len("/session_2026-12-07_11-02-45_540189_/sockets/plasma_store")


def _pid_digits() -> int:
    """The most digits a pid has here (Linux's pid_max; 7 where it cannot be read)."""
    try:
        return len(str(int(Path("/proc/sys/kernel/pid_max").read_text()) - 1))
    except (OSError, ValueError):
        return 7
#: A multiprocessing socket's path less its temporary folder: ``/pymp-XXXXXXXX/listener-XXXXXXXX``.
MULTIPROCESSING_SOCKET_SUFFIX = len("/pymp-12345678/listener-12345678")
#: Linux's limit on a Unix socket's path (108 bytes with its terminating NUL).
UNIX_SOCKET_PATH_MAX = 107


def temp_socket_problem() -> str | None:
    """Why this process's temporary folder (TMPDIR, TEMP or TMP) cannot hold a trial's
    data-loading sockets (multiprocessing's ``pymp-XXXXXXXX/listener-XXXXXXXX``), or None.
    Asked by the driver of a local Ray, and by each trial of its own node (a cluster's
    nodes have their own TMPDIR): there a trial hung for ever on "AF_UNIX path too long" in
    its workers' logs, nothing on the console."""
    python_tmp = tempfile.gettempdir()
    longest = len(os.fsencode(python_tmp)) + MULTIPROCESSING_SOCKET_SUFFIX
    if longest <= UNIX_SOCKET_PATH_MAX:
        return None
    return (f"the temporary folder {python_tmp} (TMPDIR): the trials' data-loading processes "
            f"make sockets under it of up to {longest} bytes, over the {UNIX_SOCKET_PATH_MAX} "
            f"Linux allows; accepted: a TMPDIR of at most "
            f"{UNIX_SOCKET_PATH_MAX - MULTIPROCESSING_SOCKET_SUFFIX} bytes (e.g. /tmp)")


def _check_local_ray_folders() -> None:
    """What a local Ray writes outside the run's own folders, checked before it starts (each
    passed the dry run, and the run then failed in ray.init: exit 1, "an unexpected error"):
    its temporary folder (RAY_TMPDIR, else TMPDIR, else /tmp, as Ray picks it), whose socket
    paths must fit Linux's 107 bytes and whose name Ray's core worker reads as ASCII; and,
    with token authentication on (sweeps/__init__.py), the token file it writes to
    ~/.ray/auth_token where no token is given."""
    # as Ray picks it (ray._common.utils.get_default_system_temp_dir): RAY_TMPDIR when set,
    # even empty, else TMPDIR when set, else /tmp
    for name in ("RAY_TMPDIR", "TMPDIR"):
        if name in os.environ:
            where, text = f"{name}={os.environ[name]}", os.environ[name]
            break
    else:
        where, text = "the temporary folder /tmp", "/tmp"
    ray_dir = os.path.join(text, "ray")
    extra = len(os.fsencode(ray_dir)) - len(os.fsencode(text))  # "/ray", or "ray" after a "/"
    fits = UNIX_SOCKET_PATH_MAX - RAY_SOCKET_SUFFIX - _pid_digits() - extra
    if not text.isascii():
        problem = "Ray's core worker cannot read a folder name with non-ASCII characters"
    elif len(os.fsencode(text)) > fits:
        longest = len(os.fsencode(ray_dir)) + RAY_SOCKET_SUFFIX + _pid_digits()
        problem = (f"Ray's socket paths under it would be up to {longest} bytes, over the "
                   f"{UNIX_SOCKET_PATH_MAX} Linux allows")
    else:
        problem = unwritable(Path(ray_dir).absolute())
    if problem:
        raise UsageError(f"{where}: {problem}; accepted: a writable folder with an ASCII name "
                         f"of at most {fits} bytes for a local Ray's files (RAY_TMPDIR or "
                         f"TMPDIR, e.g. /tmp), or --address of a running cluster")
    # Python's own temporary folder (TMPDIR, TEMP or TMP), where the trials' data-loading
    # processes make their sockets (multiprocessing: pymp-XXXXXXXX/listener-XXXXXXXX): with
    # RAY_TMPDIR short and TMPDIR long, Ray started, and each trial hung for ever on
    # "AF_UNIX path too long" in its workers' logs, nothing on the console
    problem = temp_socket_problem()
    if problem:
        raise UsageError(f"{problem}, or --address of a running cluster")
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token" or os.environ.get(
            "RAY_AUTH_TOKEN"):
        return
    given = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if given:  # Ray reads the token there and makes none
        try:
            empty = not Path(given).expanduser().read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = f"cannot be read ({getattr(exc, 'strerror', None) or type(exc).__name__})"
        else:
            why = "is empty" if empty else None
        if why:
            raise UsageError(f"RAY_AUTH_TOKEN_PATH={given}: {why}, and Ray reads the cluster's "
                             f"token from it; accepted: a file holding the token (any secret "
                             f"text), or RAY_AUTH_TOKEN")
        return
    home = os.environ.get("HOME")
    try:
        token = Path.home() / ".ray" / "auth_token"
    except (RuntimeError, KeyError):  # no HOME and no entry in the user database
        token, problem = None, "no home folder is known for this user"
    else:
        try:
            problem = (None if token.is_file() and os.access(token, os.R_OK) else
                       f"{token} cannot be read" if token.is_file() else
                       unwritable(token.parent))
        except OSError as exc:  # a HOME this user may not enter (sudo -u without -H)
            problem = f"{token.parent.parent} cannot be entered ({exc.strerror or exc})"
    if problem:
        raise UsageError(f"HOME={home if home is not None else '(unset)'}: a local Ray keeps "
                         f"its cluster token in ~/.ray/auth_token, and {problem}; accepted: a "
                         f"HOME this user can write, or the token given in RAY_AUTH_TOKEN (any "
                         f"secret text) or in a file named by RAY_AUTH_TOKEN_PATH")


def _check_report_folder() -> None:
    """The sweep's report goes to outputs/ in the working folder (the post-processor's
    default): a working folder this user cannot write passed the dry run, the sweep ran,
    and its report was "not written", exit 0, with a retry line that failed the same way."""
    try:
        here = Path.cwd()
    except OSError:  # a working folder deleted under the shell: the run's own refusals say it
        return
    problem = unwritable(here / "outputs")
    if problem:
        raise UsageError(f"the working folder {here}: the sweep's report goes to outputs/ "
                         f"there, and {problem}; accepted: running from a folder this user "
                         f"can write")


def _check_shared_storage(storage: Path, experiment: str, search: str) -> None:
    """A --storage folder shared by users: another user's driver lock that this user cannot
    open (made before lock files were made writable to all); and, in a folder with the
    sticky bit (mode 1777, as /tmp), where a file can be replaced only by its owner (or
    the folder's) and filelock takes a lock file only as its owner, another user's lock or
    resume pointer. Each failed this user's run after Ray started (exit 1)."""
    import stat

    lock = storage / f"{experiment}.lock"
    if lock.is_file() and not os.access(lock, os.R_OK | os.W_OK):
        raise UsageError(lock_file_problem(lock))
    uid = os.getuid()
    try:
        folder = storage.stat()
    except OSError:
        return
    if not folder.st_mode & stat.S_ISVTX or uid in (0, folder.st_uid):
        return
    pointer = resume_pointer(storage, experiment, search)
    for path in (lock, pointer):
        try:
            owner = path.stat().st_uid
        except OSError:  # none yet: this run makes its own
            continue
        if owner == uid:
            continue
        if path == lock:
            raise UsageError(lock_file_problem(lock))
        raise UsageError(f"--storage {storage}: a sticky folder (mode "
                         f"{stat.S_IMODE(folder.st_mode):o}), where {pointer.name}, another "
                         f"user's, cannot be replaced by this user; accepted: a --storage "
                         f"folder of your own, or a shared folder without the sticky bit "
                         f"(a group's, mode 2775)")


def lock_file_problem(lock: Path) -> str:
    """The refusal of a driver lock file this user cannot open: another user's, made before
    lock files were made writable to all (``references.cache.SHARED_LOCK_MODE``) in a
    storage folder they share."""
    import stat

    whose = f"{owner_name(lock)}'s"
    try:
        sticky = bool(lock.parent.stat().st_mode & stat.S_ISVTX)
    except OSError:
        sticky = False
    if sticky:  # (a lock there opens only for its owner, whatever its mode)
        return (f"--storage {lock.parent}: a sticky folder, where its driver lock {lock.name} "
                f"is {whose} and cannot be taken by this user; accepted: a --storage folder "
                f"of your own, or a shared folder without the sticky bit (a group's, mode "
                f"2775)")
    return (f"--storage {lock.parent}: its driver lock {lock.name} is {whose} and this user "
            f"cannot open it; accepted: a --storage folder of your own, or the lock made "
            f"writable to the users who share the folder (chmod a+rw {lock}) while no driver "
            f"of it runs")


def _check_cache() -> None:
    """``$ALIGNSWEEP_CACHE`` (the generated worlds, logs): a folder that can be written. Read
    by the driver and every trial, so refused here rather than by each of them."""
    text = os.environ.get(CACHE_ENV)
    if not text:
        return
    folder = _expand_user(text, CACHE_ENV).resolve()
    if folder.exists() and not folder.is_dir():
        problem: str | None = f"{folder} is not a folder"
    else:
        problem = unwritable(folder)
    if problem:
        raise UsageError(f"{CACHE_ENV}={text!r}: {problem}; accepted: a folder this user can "
                         f"create or write (default ~/.cache/alignsweep)")


def _paper_data_line(data: dict[str, DataSource]) -> str:
    parts = []
    for src in dict.fromkeys(data.values()):
        if src.kind == "imagenet":
            part = f"ImageNet ({src.imagenet_root})"
        else:
            part = (f"NSD ({src.nsd_root}, subjects {', '.join(map(str, src.subjects))}, "
                    f"COCO annotations {src.coco_annotations})")
        if part not in parts:
            parts.append(part)
    return "paper scale on " + " and ".join(parts)


# --------------------------------------------------------------------------------------------
# The plan


def make_plan(args: argparse.Namespace) -> Plan:
    """Validate the parsed command line (``sweeps.run.build_parser``) into a ``Plan``, in
    named steps. Cheap checks come first (names, numbers, paths), the sweep's full validation
    (which imports torch for TrialConfig) last, so most usage errors are instant."""
    folder = getattr(args, "sweep_dir", None)  # --sweep-dir (None: the default folder)
    _check_sweep_name(args.sweep, list_sweeps(folder))
    cpus = _amount("--cpus-per-trial", args.cpus_per_trial)
    gpus = _amount("--gpus-per-trial", args.gpus_per_trial)
    _check_search(args)
    roots = _check_data_flags(args)
    asked = tuple(sorted(set(args.subject or ())))
    only = tuple(args.only or ())
    overrides = _overrides(args.set or (), resume=bool(args.resume))
    address = _address(args.address)
    mlflow_uri = _mlflow_uri(args.mlflow_uri)
    storage = _storage(args.storage)
    _check_report_folder()

    scale = "demo" if args.data == "demo" else "paper"
    shallow, chosen = _chosen_conditions(args, folder, scale, only)
    paths, subjects, nsd_seen = (_paper_paths(args, shallow, chosen, roots, asked)
                                 if scale == "paper" else ({}, asked or (1,), {}))
    sweep, trials, n_grid = _trials(args, folder, scale, overrides, only)
    conditions = tuple(c for c in sweep.conditions if c.name in chosen)
    left_out: tuple[str, ...] = ()
    if args.search == "optuna":  # (Plan.left_out)
        left_out = tuple(c.name for c in conditions if c.control_of is not None)
        conditions = tuple(c for c in conditions if c.name not in left_out)
        trials = [t for t in trials if t.condition not in left_out]
        # the cap the grid has, on Plan.n_trials' count, before the data is looked at
        planned = len(conditions) * (args.num_samples + 1)
        if planned > MAX_TRIALS:
            raise UsageError(f"--num-samples {args.num_samples} over {len(conditions)} "
                             f"condition(s) plans {planned} trials (with the baselines); "
                             f"accepted: at most {MAX_TRIALS} in one invocation")
    controlled = sorted(c.control_of or c.name for c in sweep.conditions
                        if c.control_of is not None and (c.name in chosen
                                                         or c.control_of in chosen))
    if "reference_shuffle" in overrides and controlled:
        # one value for every trial would train the control against the real reference
        # (false) or shuffle the condition (true), and both would still be reported as such
        where = (f"a grid search runs it as {control_name(controlled[0])}; --search optuna "
                 f"leaves it out" if args.search == "optuna" else
                 f"the control here runs as {control_name(controlled[0])}")
        raise UsageError(f"--set reference_shuffle with {controlled[0]}, whose sweep file runs "
                         f"its shuffled negative control ([control]); accepted: --set "
                         f"reference_shuffle with a sweep that has no [control] ({where})")
    weights = _weights(getattr(args, "weights", None), conditions)
    check_pretrained_weights(conditions, weights, scale)
    resources = _resources(conditions, scale, cpus, gpus)
    if address is None:
        _object_store_bytes()
        _check_local_ray_folders()
    flush_seconds(os.environ.get(FLUSH_ENV))  # read by every trial when it ends
    _check_cache()
    from trainable.config import TrialConfig

    trials = [t.with_resources(resources[t.condition]) for t in trials]
    for t in trials:
        if TrialConfig.from_dict(t.config).device == "cuda" and t.resources.gpus == 0:
            # Ray would give the trial no GPU: it would fail when it starts
            raise UsageError(f"condition {t.condition}: device=cuda with 0 GPUs per trial; "
                             f"accepted: --gpus-per-trial > 0 with device=cuda, or device=auto "
                             f"(the trial's GPU when it has one) or cpu")
    data = {c.name: c.data_source(scale, smoke=args.smoke_test, subjects=subjects, **paths)
            for c in conditions}
    if "image_size" in overrides:  # the data is read at the size the trials train at
        data = {c: replace(src, image_size=overrides["image_size"]) for c, src in data.items()}
    _check_splits(trials, data, conditions, nsd_seen)
    experiment, line = _experiment(args, scale, trials, conditions, data)
    _check_resume(args.resume, storage, experiment, args.search)
    _check_shared_storage(Path(storage), experiment, args.search)
    plan = Plan(
        sweep=args.sweep, spec=sweep, conditions=tuple(c.name for c in conditions),
        scale=scale, smoke=bool(args.smoke_test), seeds=args.seeds, data_kind=args.data,
        data=data, data_description=line, trials=tuple(trials), resources=resources,
        search=args.search, num_samples=args.num_samples, address=address,
        mlflow_uri=mlflow_uri, resume=bool(args.resume), storage=storage,
        experiment=experiment, overrides=overrides, only=only, n_grid=n_grid, weights=weights,
        address_from=_source("--address", args.address, "RAY_ADDRESS"),
        mlflow_from=_mlflow_source(args.mlflow_uri),
        left_out=left_out,
    )
    _check_resumed_run(plan)
    return plan


def _check_sweep_name(name: str | None, known: list[str]) -> None:
    if not name:
        raise UsageError(f"no sweep given; known: {', '.join(known)} (python sweeps/run.py "
                         f"NAME, or --list)")
    if name not in known:
        other = other_unicode_form(name, known)
        if other:  # e.g. a file named on macOS (NFD), the name typed (NFC): they look alike
            raise UsageError(f"unknown sweep {name!r}: {other}")
        path = Path(name).expanduser()
        if os.sep not in name and path.suffix == ".toml" and path.stem in known:
            raise UsageError(f"unknown sweep {name!r}: a sweep is named without .toml: "
                             f"{path.stem}")
        if name.endswith(".toml") or os.sep in name:  # a lab's own file, given as its path
            hint = (f"; for this file: --sweep-dir {shlex.quote(str(path.parent))} "
                    f"{shlex.quote(path.stem)}" if path.suffix == ".toml" else "")
            raise UsageError(f"unknown sweep {name!r}: a sweep is named by its file's name "
                             f"without .toml, in sweeps/conditions or the folder --sweep-dir "
                             f"gives{hint}")
        raise UsageError(f"unknown sweep {name!r}; known: {', '.join(known) or '(none)'}")


#: Far beyond any real sweep (the paper's 79 configurations x 1,000 seeds is 79,000 trials),
#: low enough that a typo is refused at once rather than planning millions of trials.
MAX_SEEDS = 1000
#: Trials one invocation may plan (grid x seeds): the paper's 79 configurations are far below;
#: a sweep file of 1000 alphas x 1000 betas took minutes just to plan.
MAX_TRIALS = 10_000
MAX_SAMPLES = 100_000


def optuna_bounds(alphas) -> tuple[float, float, bool]:
    """The |alpha| range an adaptive search samples log-uniformly for a grid's alphas:
    ``(lo, hi, widened)``, the grid's smallest and largest, or, for a one-point grid a,
    [a/4, 4a] (``widened`` True): a search over one point would be no search."""
    lo, hi = min(alphas), max(alphas)
    if lo == hi:  # within what a trial accepts (a sample beyond it failed when it started)
        from trainable.config import FLOAT32_TINY, UPPER

        return max(lo / 4, FLOAT32_TINY), min(hi * 4, UPPER["alpha"]), True
    return lo, hi, False


def optuna_split(num_samples: int) -> dict[str, int]:
    """How many samples each side gets: the promoting one the odd one out."""
    return {"max": num_samples // 2 + num_samples % 2, "min": num_samples // 2}


def optuna_startup(n: int) -> int:
    """How many of a side's ``n`` samples are drawn at random before the sampler models the
    finished trials' scores: a quarter of them, at least 2 (``sweeps.search.optuna_sampler``;
    Optuna's default of 10 would leave a side of 10 samples a random draw)."""
    return max(2, -(-n // 4))


def _check_search(args: argparse.Namespace) -> None:
    """--seeds, --search, --num-samples and what an adaptive search excludes."""
    if not 1 <= args.seeds <= MAX_SEEDS:
        raise UsageError(f"--seeds {args.seeds}; accepted: an integer in 1..{MAX_SEEDS}")
    if args.search not in SEARCH_CHOICES:
        raise UsageError(f"--search {args.search!r}; accepted: {', '.join(SEARCH_CHOICES)}")
    if args.search == "optuna":
        if args.num_samples is None:
            raise UsageError("--search optuna needs --num-samples N (trials sampled per "
                             "condition)")
        if not 2 <= args.num_samples <= MAX_SAMPLES:
            raise UsageError(f"--num-samples {args.num_samples}; accepted: an integer in "
                             f"2..{MAX_SAMPLES} (split between the promoting and the "
                             f"suppressing side: 1 would sample only the promoting one)")
        if args.seeds != 1:
            raise UsageError(f"--seeds {args.seeds} with --search optuna; accepted: --seeds "
                             f"with --search grid (optuna samples alpha, each sample once)")
        if args.only:
            raise UsageError("--only with --search optuna; accepted: --only with --search grid "
                             "(a sampler chooses its own trials)")
    elif args.num_samples is not None:
        raise UsageError(f"--num-samples {args.num_samples} with --search grid; accepted: "
                         f"--num-samples with --search optuna (the grid runs every "
                         f"configuration)")


def _check_data_flags(args: argparse.Namespace) -> dict[str, str | None]:
    """--data, the data paths and --subject that go with it; returns flag -> path given."""
    if args.data not in DATA_CHOICES:
        raise UsageError(f"--data {args.data!r}; accepted: {', '.join(DATA_CHOICES)}")
    roots = {"--imagenet-root": args.imagenet_root, "--nsd-root": args.nsd_root,
             "--coco-annotations": args.coco_annotations}
    given = [flag for flag, value in roots.items() if value is not None]
    if args.smoke_test and args.data != "demo":
        raise UsageError(f"--smoke-test with --data {args.data}; accepted: --smoke-test alone "
                         f"(it runs on tiny simulated data)")
    if args.data == "demo" and given:
        raise UsageError(f"{given[0]} is given but --data is demo, which would ignore it; add "
                         f"--data imagenet, nsd or paper to train on real data")
    if args.subject and args.data not in ("nsd", "paper"):
        why = ("the demo uses every simulated subject" if args.data == "demo"
               else "ImageNet has no subjects")
        raise UsageError(f"--subject with --data {args.data}; accepted: --subject with --data "
                         f"nsd or paper ({why})")
    for s in sorted(set(args.subject or ())):
        if s not in NSD_SUBJECTS:
            raise UsageError(f"--subject {s}; accepted: NSD subjects 1..8")
    return roots


def _overrides(texts, resume: bool = False) -> dict:
    """--set KEY=VALUE, each key once."""
    overrides: dict = {}
    try:
        for text in texts:
            key, value = parse_override(text, resume=resume)
            if key in overrides and overrides[key] != value:
                raise UsageError(f"--set {key} given twice ({overrides[key]!r} and {value!r}); "
                                 f"accepted: each key once")
            overrides[key] = value
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return overrides


def _chosen_conditions(args: argparse.Namespace, folder, scale: str,
                       only: tuple[str, ...]):
    """The conditions with a trial the run will launch: --only narrows the conditions too, so a
    paper run of one condition needs only its data. Reads the sweep file's structure only:
    returns (that shallow sweep, the chosen condition names)."""
    try:
        shallow = load_sweep(args.sweep, folder, check_configs=False)
        planned = args.seeds * sum(len(c.grid) for c in shallow.conditions if scale in c.scales)
        if planned > MAX_TRIALS and not args.smoke_test:  # before any is built (1,000 x 1,000
            # took 20 s and 1.7 GB to expand, a limit of seeds ten times that)
            raise UsageError(
                f"sweep {args.sweep} with --seeds {args.seeds} plans {planned} trials at "
                f"{scale} scale; accepted: at most {MAX_TRIALS} in one invocation -- fewer "
                f"alphas, betas or seeds, or the conditions split over several sweep files")
        grid = [t for c in shallow.conditions for t in c.trials(
            scale=scale, seeds=args.seeds, smoke=args.smoke_test, check=False)]
        return shallow, {t.condition for t in select_trials(grid, only)}
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _paper_paths(args: argparse.Namespace, shallow, chosen: set[str],
                 roots: dict[str, str | None],
                 asked: tuple[int, ...]
                 ) -> tuple[dict[str, str], tuple[int, ...], dict[int, np.ndarray]]:
    """At paper scale: the data the chosen conditions train on, its paths checked as the
    trials will read them; returns the paths, the NSD subjects and the nsdIds each one's
    sessions show ({} without NSD)."""
    selected = [c for c in shallow.conditions if c.name in chosen]
    needs = {c.name: c.paper.data for c in selected}
    kinds = set(needs.values())
    for cond, kind in needs.items():
        if args.data in PAPER_DATA and kind != args.data:
            hint = "paper" if len(kinds) > 1 else kind
            raise UsageError(f"--data {args.data}: condition {cond} of sweep {args.sweep} "
                             f"trains on {kind}; accepted: --data {hint}")
    flags = {"imagenet": ["--imagenet-root"], "nsd": ["--nsd-root", "--coco-annotations"]}
    for kind in sorted(kinds):
        for flag in flags[kind]:
            if roots[flag] is None:
                raise UsageError(f"sweep {args.sweep} at paper scale trains on {kind}: "
                                 f"{flag} DIR is required")
    # a path for data only the conditions --only leaves out is not used (a lab's script that
    # passes every path may narrow the run): it was refused as if the sweep never trained on it
    swept = {c.paper.data for c in shallow.conditions if "paper" in c.scales}
    for flag in (f for f, v in roots.items() if v is not None):
        if not any(flag in flags[k] for k in swept):
            raise UsageError(f"{flag} is given but sweep {args.sweep} does not train on "
                             f"{'ImageNet' if flag == '--imagenet-root' else 'NSD'}")
    if args.subject and "nsd" not in swept:
        raise UsageError(f"--subject is given but sweep {args.sweep} does not train on NSD")
    paths: dict[str, str] = {}
    subjects = asked or (1,)
    seen: dict[int, np.ndarray] = {}
    if "imagenet" in kinds:
        paths["imagenet_root"] = str(check_imagenet_root(args.imagenet_root))
    if "nsd" in kinds:
        rois = {c.roi for c in selected if c.paper.data == "nsd"}
        root, subjects, seen = check_nsd_root(args.nsd_root, asked or None, rois)
        paths["nsd_root"] = str(root)
        paths["coco_annotations"] = str(check_coco_annotations(args.coco_annotations))
    return paths, subjects, seen


def _trials(args: argparse.Namespace, folder, scale: str, overrides: dict,
            only: tuple[str, ...]):
    """The sweep fully validated, its trials chosen by --only, with the overrides: (sweep,
    trials, trials before --only). The overrides are checked on the chosen trials only (a
    setting refused for a condition --only leaves out was refused for the run)."""
    try:
        sweep = load_sweep(args.sweep, folder)
        trials = sweep.trials(scale=scale, seeds=args.seeds, smoke=args.smoke_test)
        return sweep, apply_overrides(select_trials(trials, only), overrides), len(trials)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _resources(conditions, scale: str, cpus: float | None,
               gpus: float | None) -> dict[str, Resources]:
    """Per condition what a trial asks Ray for: the sweep file's, or the command line's."""
    resources: dict[str, Resources] = {}
    for cond in conditions:
        base = cond.scale(scale).resources
        res = Resources(base.cpus if cpus is None else cpus, base.gpus if gpus is None else gpus)
        if res.cpus == 0 and res.gpus == 0:
            raise UsageError(f"condition {cond.name}: 0 CPUs and 0 GPUs per trial; accepted: "
                             f"--cpus-per-trial > 0 (or --gpus-per-trial > 0)")
        # More CPUs than any node has is refused when the run meets its cluster
        # (sweeps.execute.check_fits): a dry run does not know where it will run.
        resources[cond.name] = res
    return resources


def _experiment(args: argparse.Namespace, scale: str, trials, conditions,
                data) -> tuple[str, str]:
    """The experiment's name and the line that says which scale and data the run is on."""
    if args.smoke_test:
        # as the trials run: --only can leave conditions different counts, --set other epochs
        counts = ({args.num_samples + 1} if args.search == "optuna"  # the baseline, samples
                  else set(Counter(t.condition for t in trials).values()))
        per = (f"{counts.pop()} trials per condition" if len(counts) == 1 else
               f"{len(trials)} trials over {len(conditions)} conditions")
        epochs = sorted({int(t.config["epochs"]) for t in trials})
        each = (f"{epochs[0]} epoch{'s' if epochs[0] != 1 else ''} each" if len(epochs) == 1
                else f"{epochs[0]} to {epochs[-1]} epochs")
        return (experiment_name(args.sweep, "smoke"),
                f"smoke test on tiny simulated data: {per}, {each} (demo scale)")
    line = ("demo scale on the simulated world (no real data configured)"
            if scale == "demo" else _paper_data_line(data))
    return experiment_name(args.sweep, scale), line


def _check_resume(resume: bool, storage: str, experiment: str, search: str) -> None:
    pointer = resume_pointer(storage, experiment, search)
    if resume and not pointer.is_file():
        what = "search" if search != "grid" else "run"
        other = resume_pointer(storage, experiment, "optuna" if search == "grid" else "grid")
        there = ((f"; {other.name} is there: an adaptive search resumes with its --search "
                  f"optuna --num-samples N" if search == "grid" else
                  f"; {other.name} is there: a grid run resumes without --search")
                 if other.is_file() else "")
        if search != "grid" and _pointed_search(other) == search:
            # an older version kept one pointer for both kinds, and could not resume a
            # search: "a grid run resumes without --search" sent the user to a refusal over
            # --search, which sent them back here
            raise UsageError(f"--resume: nothing to resume, no earlier search of {experiment} "
                             f"under {storage} that can be resumed ({other.name} names an "
                             f"adaptive search started by an older version, which cannot be "
                             f"resumed); accepted: a new run without --resume")
        raise UsageError(f"--resume: nothing to resume, no earlier {what} of {experiment} "
                         f"under {storage} (no {pointer.name}{there}; run without --resume "
                         f"first, or give the --storage{' and --search' if search != 'grid' else ''} "
                         f"it used)")


def _pointed_search(pointer: Path) -> str | None:
    """The --search of the run a resume pointer names, as its fingerprint records it; None
    when there is no such file or it does not say."""
    try:
        _, run_dir = _pointer_target(pointer, pointer.parent)
        was = json.loads((run_dir / FINGERPRINT_FILE).read_text())
    except (OSError, ValueError):
        return None
    search = was.get("search") if isinstance(was, dict) else None
    return search if isinstance(search, str) else None


def _check_resumed_run(plan: Plan) -> None:
    """The run --resume would continue was started as this plan would start it, and still
    holds the state and checkpoints Tune would restore its trials from."""
    if plan.resume:
        run_dir = resumed_run_dir(plan)  # one this command started (resume_choice)
        check_tune_state(run_dir)
        check_checkpoints(run_dir)


def check_tune_state(run_dir: Path) -> None:
    """A run whose Tune state Tune would try to restore (its ``tuner.pkl`` is there) must have
    a readable one. A disk that filled while Tune wrote it (Tune writes its
    ``experiment_state-*.json`` in place) left it cut short, or never written (a full
    temporary folder, where Tune stages it): Tune then restarted the run without its trials
    and the driver died at once (KeyError: 'trial_id', exit 1) at every --resume."""
    from sweeps.ray_glue import tune

    if not tune.Tuner.can_restore(str(run_dir)) or _tune_trials(run_dir) is not None:
        return
    states = sorted(run_dir.glob("experiment_state-*.json"))
    if (run_dir / "tuner.pkl").stat().st_size == 0:
        why = "tuner.pkl is empty"
    elif not states:
        why = "no experiment_state-*.json beside its tuner.pkl"
    else:
        try:
            json.loads(states[-1].read_text())
            why = f"{states[-1].name} does not describe its trials"
        except (OSError, ValueError) as exc:
            why = f"{states[-1].name}: {exception_line(exc, 120)}"
    raise UsageError(
        f"--resume: {run_dir}: Ray Tune's saved state cannot be read ({why}; a disk that "
        f"filled while Tune wrote it leaves it so), and Tune would start the run over without "
        f"its trials; the trials that finished keep their results (in MLflow and their "
        f"folders); accepted: a new run without --resume (--only can choose the trials that "
        f"did not finish)")


def check_checkpoints(run_dir: Path) -> None:
    """Each trial Tune would resume (not TERMINATED) from a checkpoint its experiment state
    records must still have it: a trial folder deleted from the storage made Tune fail that
    trial at every --resume (refused here in one line, naming it)."""
    lost = lost_checkpoints(run_dir)
    if lost:
        trial_id, path = lost[0]
        more = f" (and {len(lost) - 1} more trial(s))" if len(lost) > 1 else ""
        raise UsageError(
            f"--resume: {run_dir} no longer holds trial {trial_id}'s checkpoint {path}{more}, "
            f"which Tune would restore it from (and fail each time); put it back, or run the "
            f"sweep again without --resume")


def tune_states(run_dir: Path) -> dict[str, str] | None:
    """{trial key: "done" | Ray Tune's status (ERROR, RUNNING, PENDING, ...)} of the trials
    Tune's saved state in ``run_dir`` holds (a trial is named by its key, ``TrialNamer``), or
    None without a readable state."""
    trials = _tune_trials(run_dir)
    if trials is None:
        return None
    return {str(t): "done" if t.status == "TERMINATED" else t.status for t in trials}


def _tune_trials(run_dir: Path) -> list | None:
    """Ray Tune's trials as its saved state in ``run_dir`` holds them (``ExperimentAnalysis``:
    Tune's own reading of it), or None without a readable state. Kept for as long as the
    state files are unchanged: a --resume asks several times (which run, its state, its
    checkpoints; the plan, then the run), and each reading loads every trial's results."""
    try:
        key = (str(Path(run_dir).resolve()), tuple(
            (p.name, p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(Path(run_dir).glob("experiment_state-*.json"))))
    except OSError:
        return _read_tune_trials(run_dir)
    if key not in _TUNE_TRIALS:
        _TUNE_TRIALS[key] = _read_tune_trials(run_dir)
    return _TUNE_TRIALS[key]


_TUNE_TRIALS: dict[tuple, list | None] = {}


def _read_tune_trials(run_dir: Path) -> list | None:
    import logging

    from sweeps.ray_glue import ExperimentAnalysis

    # it also loads each trial's results, and warns about a deleted folder in two lines
    quiet = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return ExperimentAnalysis(str(run_dir)).trials
    except Exception:  # no (readable) Tune state
        return None
    finally:
        quiet.setLevel(level)


def lost_checkpoints(run_dir: Path) -> list[tuple[str, str]]:
    """(trial id, checkpoint path) of each trial Tune would resume from a checkpoint its
    state records (``ExperimentAnalysis``: Tune's own reading of it, paths resolved in the
    folder as it is now) but the storage no longer holds. [] without a Tune state."""
    trials = _tune_trials(run_dir)
    if trials is None:  # no (readable) Tune state: nothing it would restore from
        return []
    lost = []
    for trial in trials:
        ckpt = trial.checkpoint
        if (trial.status != "TERMINATED" and ckpt is not None
                and not Path(ckpt.path).exists()):  # the storage is a local folder
            lost.append((str(trial.config.get("trial_id", trial.trial_id)), ckpt.path))
    return lost


def resumed_run_dir(plan: Plan) -> Path:
    """The run folder --resume continues (``resume_choice``)."""
    return resume_choice(plan)[0]


def resume_choice(plan: Plan) -> tuple[Path, str | None]:
    """(run folder, why it is not the latest run) of --resume, always a run this command
    started (``fingerprint``): the latest run of the experiment in the storage folder
    (``plan.resume_pointer``) when this command started it and it did not finish; else the
    newest other such run that did not finish; else the newest such run (finished: the
    resume runs no trial). Without any, the latest run's own refusal (started otherwise,
    naming what differs; its folder gone). A new run beside an interrupted one took the
    pointer and --resume then reopened the new, finished run: the interrupted run could no
    longer be resumed; another user's newer run in a shared storage folder, or a latest run
    deleted, made everyone else's --resume a refusal (probed at stop 37)."""
    now = fingerprint(plan)
    try:
        latest: Path | None = _pointed_run_dir(plan)
        refusal = fingerprint_difference(plan, latest, now)
        latest_state = "another command started it" if refusal else "it finished"
    except UsageError as exc:  # the pointer unreadable, or its folder gone
        latest, refusal, latest_state = None, str(exc), "its folder is gone"
    try:
        latest_name = Path(Path(plan.resume_pointer).read_text(errors="replace").strip()).name
    except OSError:
        latest_name = ""
    latest_name = latest_name or "(unreadable)"
    if latest is not None and refusal is None and run_unfinished(plan, latest):
        return latest, None
    newest_own = latest if refusal is None else None
    for other in _other_runs(plan, latest):
        try:
            if fingerprint_difference(plan, other, now) is not None:
                continue
        except UsageError:  # its fingerprint is damaged: not a run to guess at
            continue
        if run_unfinished(plan, other):
            return other, _not_latest(other, "the newest unfinished run", latest_name,
                                      latest_state)
        newest_own = newest_own or other
    if newest_own is None:
        raise UsageError(refusal)
    if newest_own == latest:
        return latest, None
    return newest_own, _not_latest(newest_own, "the newest run", latest_name, latest_state)


def _not_latest(run_dir: Path, what: str, latest: str, latest_state: str) -> str:
    return (f"{run_dir.name}, {what} this command started (the latest run here, {latest}, is "
            f"not resumed: {latest_state})")


def _other_runs(plan: Plan, latest: Path | None) -> list[Path]:
    """The storage folder's run folders of ``plan.experiment`` other than ``latest`` that
    recorded their fingerprint, newest first."""
    runs = []
    try:
        found = list(Path(plan.storage).iterdir())
    except OSError:
        return []
    for folder in found:
        parsed = parse_run_folder(folder.name)
        if (parsed and parsed[0] == plan.experiment
                and (latest is None or folder.name != latest.name)
                and (folder / FINGERPRINT_FILE).is_file()):
            runs.append((parsed[1], parsed[2], folder))
    return [folder for *_, folder in sorted(runs, reverse=True)]


def run_unfinished(plan: Plan, run_dir: Path) -> bool:
    """Whether some trial ``plan`` runs did not finish in ``run_dir`` (an adaptive search also
    while samples are not all drawn): the run's manifest when it says every trial finished
    (written from Tune's results when the driver ended; cheap, for storage folders of many
    runs), else Ray Tune's saved state there (a driver killed outright never rewrote its
    manifest), else the manifest. A run with neither, or an unreadable manifest, counts as
    unfinished."""
    def left(states: dict[str, str]) -> bool:
        if plan.search == "optuna":
            return len(states) < plan.n_trials or any(v != "done" for v in states.values())
        return any(states.get(t.trial_id) != "done" for t in plan.trials)

    recorded = manifest_states(run_dir)
    if recorded and not left(recorded):
        return False
    states = run_states(run_dir)
    return not states or left(states)


def run_states(run_dir: Path) -> dict[str, str] | None:
    """{trial key: "done" or how it stands} in ``run_dir``: Ray Tune's saved state there
    (``tune_states``), else the run's manifest; None without either (or with an unreadable
    manifest)."""
    states = tune_states(run_dir)
    return states if states is not None else manifest_states(run_dir)


def manifest_states(run_dir: Path) -> dict[str, str] | None:
    """{trial key: state} of the run's manifest; None without one, or with an unreadable
    one."""
    try:
        entries = read_manifest(run_dir)
    except ValueError:
        return None
    return {e.key: e.state for e in entries} or None


def _pointer_target(pointer: Path, storage: Path) -> tuple[str, Path]:
    """(what resume ``pointer`` records, the run folder that names): a folder name resolved
    in ``storage`` as given now; an absolute path as older runs wrote it, or its name in
    ``storage`` where that path is gone (a storage folder since moved). OSError where the
    pointer cannot be read."""
    recorded = pointer.read_text().strip()
    run_dir = Path(recorded)
    if not run_dir.is_absolute():
        run_dir = storage / run_dir
    elif not run_dir.is_dir() and (storage / run_dir.name).is_dir():
        run_dir = storage / run_dir.name
    return recorded, run_dir


def _pointed_run_dir(plan: Plan) -> Path:
    """The run folder ``plan.resume_pointer`` names: a folder name, resolved in
    the storage folder as given now (so a storage folder moved or copied elsewhere resumes
    its own runs); an absolute path as older runs wrote it. A folder that is gone is
    refused: resuming it would start the whole grid again, outside --storage."""
    storage = Path(plan.storage)
    pointer = Path(plan.resume_pointer)
    try:
        recorded, run_dir = _pointer_target(pointer, storage)
    except OSError as exc:
        raise UsageError(f"--resume: {pointer} cannot be read ({exc.strerror}); accepted: a "
                         f"storage folder with an earlier run of {plan.experiment}") from None
    if not recorded or not run_dir.is_dir():
        raise UsageError(f"--resume: {pointer} names {recorded or '(nothing)'}, which is not a "
                         f"run folder under {storage}; accepted: a storage folder with its "
                         f"latest run of {plan.experiment}, or a new run without --resume")
    return run_dir


def sweep_files(plan: Plan) -> list[Path]:
    """The sweep's files: the one named, and a composite's members (sorted)."""
    return sorted({plan.spec.path, *(c.path for c in plan.spec.conditions)})


def fingerprint(plan: Plan) -> dict[str, Any]:
    """What a resumed run must share with the run it continues: the sweep files' content,
    seeds, scale, overrides, selection, search, and the tracking store (as a hash: the URI
    may hold a password)."""
    files = sweep_files(plan)
    return {
        "sweep": plan.sweep,
        "sweep_files": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files},
        "scale": plan.scale, "smoke": plan.smoke, "seeds": plan.seeds,
        "data": plan.data_kind, "overrides": {k: repr(v) for k, v in plan.overrides.items()},
        "only": sorted(set(plan.only)), "search": plan.search, "num_samples": plan.num_samples,
        "tracking_uri_sha256": hashlib.sha256(plan.mlflow_uri.encode()).hexdigest(),
        **({"weights": plan.weights} if plan.weights is not None else {}),
        # a file replaced at the same path (best.ckpt overwritten) is another reference
        **({"weights_sha256": digest} if (digest := _weights_digest(plan.weights)) else {}),
        # which data: the roots, annotations and subjects of real data, the generator's
        # arguments of the simulated world (a resume on another copy would mix two datasets)
        "data_sources": sorted({src.describe() for src in plan.data.values()}),
        # and what those files are now: a release changed in place (a session rewritten, an
        # image added) would have the resumed trials train on other data than the others
        "data_files": _data_files(plan),
    }


def _data_files(plan: Plan) -> dict[str, Any]:
    """Per real data source (its ``describe()``): an NSD release's files as
    ``nsd.release_files`` lists them (size, mtime), an ImageNet tree's index as a digest of
    its file list and labels (no file is stat'ed: there are 1.3 M)."""
    out: dict[str, Any] = {}
    for src in set(plan.data.values()):
        if src.kind == "nsd":
            from references import nsd

            try:
                out[src.describe()] = nsd.release_files(src.nsd_root, src.coco_annotations,
                                                        src.subjects, src.roi)
            except nsd.NSDFormatError as exc:  # (checked when the plan was made)
                raise UsageError(f"--nsd-root {src.nsd_root}: {exc}") from None
        elif src.kind == "imagenet":
            from references import datasets

            h = hashlib.sha256()
            for index in datasets.imagenet_index(src.imagenet_root):
                h.update(index.content())
            out[src.describe()] = {"index_sha256": h.hexdigest()}
    return out


def _changed_data(was: dict, now: dict) -> str:
    """Which data of a fingerprint's ``data_files`` differ now, in a few words."""
    parts = []
    for name in sorted(was.keys() | now.keys()):
        old, new = was.get(name), now.get(name)
        if old == new:
            continue
        if old is None or new is None:
            parts.append(f"{name}: {'not read then' if old is None else 'not read now'}")
            continue
        changed = sorted(k for k in old.keys() & new.keys() if old[k] != new[k])
        gone, added = sorted(old.keys() - new.keys()), sorted(new.keys() - old.keys())
        if "index_sha256" in changed:
            parts.append(f"{name}: other image files or labels")
            continue
        what = ([f"{changed[0]} changed (size or time)"] if changed else []) + \
               ([f"{gone[0]} no longer read"] if gone else []) + \
               ([f"{added[0]} now also read"] if added else [])
        more = len(changed) + len(gone) + len(added) - len(what)
        parts.append(f"{name}: {', '.join(what)}{f' (+{more} more)' if more > 0 else ''}")
    return "; ".join(parts)


def _weights_digest(weights: str | None) -> str | None:
    """sha256 of a --weights file (None for auto, torchvision, or no file there)."""
    if weights is None or weights in ("auto", "torchvision"):
        return None
    path = _expand_user(weights)
    return file_sha256(path) if path.is_file() else None


def read_run_json(path: Path, what: str) -> dict:
    """A JSON object the driver wrote in a run folder, or a one-line refusal naming the file
    (a truncated copy, an edit gone wrong) before anything is reopened or recorded."""
    try:
        return read_json_object(path)
    except ValueError as exc:
        raise UsageError(f"{path}: {what} cannot be read ({exc}); accepted: the file as the "
                         f"driver wrote it -- restore it, or start a new run without --resume"
                         ) from None


def check_fingerprint(plan: Plan, run_dir: Path) -> None:
    """--resume continues ``run_dir`` only with what started it (``fingerprint``); the dry run
    and the run both ask, so a refused resume is never reported as fine by --dry-run."""
    differs = fingerprint_difference(plan, run_dir)
    if differs:
        raise UsageError(differs)


def fingerprint_difference(plan: Plan, run_dir: Path,
                           now: dict[str, Any] | None = None) -> str | None:
    """Why ``plan`` did not start ``run_dir`` (the first of its fingerprint's keys that
    differs, as --resume's refusal), or None. ``now``: ``fingerprint(plan)``, when known."""
    path = run_dir / FINGERPRINT_FILE
    if not path.is_file():  # a run started before fingerprints existed: nothing to check
        return None
    was = read_run_json(path, "the run's fingerprint")
    now = fingerprint(plan) if now is None else now
    names = {"sweep_files": "sweep file content", "tracking_uri_sha256": "tracking URI (--mlflow-uri)",
             "only": "--only", "overrides": "--set overrides", "seeds": "--seeds",
             "data": "--data", "smoke": "--smoke-test", "search": "--search",
             "num_samples": "--num-samples", "scale": "scale", "sweep": "sweep",
             "weights": "--weights", "weights_sha256": "--weights file content (sha256)",
             "data_sources": "data (--imagenet-root, --nsd-root, --coco-annotations, "
                             "--subject)", "data_files": "data files"}
    for key, label in names.items():
        if key in ("data_sources", "weights_sha256", "data_files") and key not in was:
            continue  # recorded since these keys exist
        if key == "data_files" and was[key] != now[key]:
            changed = (_changed_data(was[key], now[key]) if isinstance(was[key], dict)
                       else "(not readable)")
            return (f"--resume: {run_dir.name} was started on data that has changed "
                    f"since ({changed}); accepted: the data as it was when the run "
                    f"started, or a new run without --resume")
        old = was.get(key)
        if key == "only" and isinstance(old, list):  # a selection, in any order (runs
            old = sorted(set(old))  # started before the fingerprint sorted it)
        if old != now.get(key):
            before, after = repr(was.get(key)), repr(now.get(key))
            if key == "sweep_files" and isinstance(old, dict) and isinstance(now.get(key), dict):
                # which files, not every file's hash (a composite's refusal was 1,700
                # characters of hashes that did not say which member changed)
                new = now[key]
                changed = sorted(n for n in old.keys() & new.keys() if old[n] != new[n])
                gone, added = sorted(old.keys() - new.keys()), sorted(new.keys() - old.keys())
                before = "; ".join(filter(None, [
                    f"changed since: {', '.join(changed)}" if changed else "",
                    f"no longer read: {', '.join(gone)}" if gone else "",
                    f"now also read: {', '.join(added)}" if added else ""]))
                return (f"--resume: {run_dir.name} was started with a different "
                        f"{label} ({before}); accepted: the sweep files as they were "
                        f"when it started, or a new run without --resume")
            if key == "tracking_uri_sha256":  # only a hash is kept; the parent file shows it
                try:  # redacted, as the console does
                    before = ParentPointer.read(run_dir / PARENT_FILE).mlflow_uri
                except ValueError:
                    before = None
                before = before or "(not recorded)"
                after = redact(plan.mlflow_uri)
            return (f"--resume: {run_dir.name} was started with a different {label} "
                    f"({before}, now {after}); accepted: the run's own {label} (the same "
                    f"sweep file, seeds, overrides, selection, search and tracking URI), or "
                    f"a new run without --resume")
    return None


# --------------------------------------------------------------------------------------------
# Reachability (no Ray started, nothing written)


def resolve_auto_address(source: str = "--address") -> str:
    """The cluster ``--address auto`` joins: RAY_ADDRESS when it names one, else the address
    the last `ray start` on this machine wrote (Ray's address file). Not Ray's legacy
    fallback, any Ray process found running here: that joined another driver's own local
    Ray, whose trials then queued behind that driver's, and died when it ended and took its
    Ray along (the driver exit 1, its parent run left RUNNING). A stale address file of a
    cluster since stopped is found by ``check_services`` (ray.init retried for ever).
    ``source``: where "auto" came from (the flag, or RAY_ADDRESS), as the error names it."""
    from sweeps.ray_glue import get_ray_address_file
    from sweeps.ray_glue import private_services as services

    env = os.environ.get("RAY_ADDRESS", "")
    if env and env != "auto":
        return env
    found = services.find_bootstrap_address(None)
    if found:
        return found
    none = "no `ray start` here" if source == "RAY_ADDRESS" else \
        "no RAY_ADDRESS, no `ray start` here"
    services.find_gcs_addresses.cache_clear()  # Ray caches a scan that found any
    others = sorted(set(services.find_gcs_addresses()))
    if others:
        raise UsageError(f"{source} auto: no Ray cluster announced by `ray start` on this "
                         f"machine ({none}, in {get_ray_address_file(None)}); Ray instance(s) "
                         f"running here that none announced: {', '.join(others)} (another "
                         f"driver's own local Ray, which ends with it, or a cluster started "
                         f"with --temp-dir); accepted: --address HOST:PORT of the cluster to "
                         f"join, or {_omit(source)} to start a local Ray")
    raise UsageError(f"{source} auto: no Ray cluster found on this machine ({none}); start "
                     f"one with `ray start --head` or {_omit(source)} to start a local Ray")


def ray_address(plan: Plan) -> str | None:
    """The Ray cluster a run joins: ``plan.address``, "auto" resolved
    (``resolve_auto_address``); None for a local Ray the driver starts."""
    if plan.address == "auto":
        return resolve_auto_address(plan.address_from)
    return plan.address


def check_services(plan: Plan, *, timeout: float = 5.0) -> None:
    """Ask the services named on the command line whether they answer: the Ray head's GCS
    port (TCP connect), an http(s) MLflow server (GET /health) and a database tracking store's
    server (TCP connect; ``records.uris.tracking_unreachable``). "auto" is resolved first
    (``resolve_auto_address``); a local Ray and SQLite files are not contacted."""
    if plan.address is not None:
        source = plan.address_from
        address = ray_address(plan)
        hostport = address.removeprefix("ray://")
        host, port = _host_port(source, address, hostport, _address_accepted(source))
        try:
            with socket.create_connection((host, port), timeout=timeout):
                pass
        except OSError as exc:
            said = f"{plan.address} ({address})" if address != plan.address else address
            raise UsageError(f"{source} {said}: no Ray cluster answers at "
                             f"{host}:{port} ({exc.strerror or exc}); start one with `ray start "
                             f"--head --port {port}` or {_omit(source)} to start a local Ray"
                             ) from None
    if databricks_credentials_missing(plan.mlflow_uri):
        raise UsageError(f"{plan.mlflow_from} {redact(plan.mlflow_uri)}: no Databricks "
                         f"credentials found; accepted: DATABRICKS_HOST and DATABRICKS_TOKEN in "
                         f"the environment, or a profile in ~/.databrickscfg "
                         f"(databricks://PROFILE) -- or {_omit(plan.mlflow_from)} for the local "
                         f"SQLite store")
    why = tracking_unreachable(plan.mlflow_uri, timeout=timeout)
    if why is not None:
        how = ("start it (mlflow server --port 5000)"
               if plan.mlflow_uri.lower().startswith("http") else "start the database server")
        raise UsageError(f"{plan.mlflow_from} {redact(plan.mlflow_uri)}: tracking server "
                         f"unreachable ({why}); {how} or {_omit(plan.mlflow_from)} for the local "
                         f"SQLite store")
    refused = tracking_refuses(plan.mlflow_uri, timeout=timeout)
    if refused is not None and refused.server_failing:
        raise UsageError(f"{plan.mlflow_from} {redact(plan.mlflow_uri)}: the tracking server "
                         f"answers /health but fails its API ({refused}); accepted: a server "
                         f"whose backend store answers (its log says why it fails), or "
                         f"{_omit(plan.mlflow_from)} for the local SQLite store")
    if refused is not None:
        host = urlsplit(plan.mlflow_uri).netloc.rsplit("@", 1)[-1]
        raise UsageError(f"{plan.mlflow_from} {redact(plan.mlflow_uri)}: the tracking server refuses "
                         f"this client ({refused}); accepted: a server started with "
                         f"--allowed-hosts naming {host} (and --host 0.0.0.0 to be reached "
                         f"from other machines), with MLFLOW_TRACKING_USERNAME and "
                         f"MLFLOW_TRACKING_PASSWORD of one of its users when it asks for them")
