"""Declarative sweep files -> validated, frozen sweeps -> trials.

A sweep file is TOML (``sweeps/conditions/<name>.toml``, read with the standard library's
``tomllib``: comments document each demo-scale choice next to its value, which JSON cannot).
Two kinds:

A condition (one paper condition, one Pareto front)::

    description = "..."
    model = "alexnet"            # a registered model (trainable/models.py)
    layer = "conv1"              # one of its taps
    reference = "nsd"            # "gabor" | "pretrained" | "nsd"
    roi = "V1"                   # NSD data only (its table is prepared per ROI): "V1" | "VVS"
    metric = "linear"            # alignment metric of the loss (trainable/alignment.py)
    task = "multi_label"         # "single_label" (ImageNet) | "multi_label" (COCO-80 on NSD)

    [grid]                       # the paper's grid, verbatim
    alphas = [0.1, 0.2, 0.4, 0.8]    # magnitudes: each a runs as +a ("max") and -a ("min")
    betas = [1]                      # crossed with every alpha; plus ONE alpha = 0, beta = 1
                                     # baseline ("none"): 2 * len(alphas) * len(betas) + 1 trials

    [paper]                      # the paper's scale
    data = "nsd"                 # "imagenet" | "nsd"; the paths come from the command line
    epochs = 100
    lr = 1e-4
    batch_size = 1000
    image_size = 224
    width = 1.0                  # 1.0 = torchvision's architecture exactly
    resources = { cpus = 4, gpus = 0.25 }   # per trial; fractional gpus share a GPU
    trial = { pool = 0 }         # optional: any other TrialConfig key (trainable/config.py)

    [demo]                       # the simulated world, no download; same keys as [paper] plus
    data = "simulated_nsd"       # "simulated_single_label" | "simulated_nsd"
    data_kwargs = { n_images = 1000 }   # generator arguments (references/simulated.py)

    [control]                    # optional: the negative control, run beside the condition
    alphas = [0.8]               # magnitudes: a baseline and +-a for each, against the
    scales = ["demo"]            # reference shuffled across images; scales it runs at
                                 # (default both; never in the smoke test). It is the
                                 # condition <name>_shuffled.

A composite (``paper``) holds only ``description`` and ``includes`` (condition names).

Loading validates once: unknown keys are errors naming the key and the file, and every scale's
trial config is checked by ``TrialConfig`` itself (one place of validation), so a bad model,
layer, learning rate or width is reported with the file it came from.

The smoke test (``Sweep.trials(smoke=True)``) is the same sweep shrunk: per condition the
baseline plus the largest |alpha| of each direction with the first beta, one epoch of the
``SMOKE`` settings on the tiny ``SMOKE_DATA`` worlds below.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import inspect
import math
import re
import tomllib
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from records import (  # noqa: F401  (re-exported: the sweep file's vocabulary)
    CONTROL_SUFFIX,
    DEMO_DATA,
    DIRECTIONS,
    PAPER_DATA,
    REFERENCE_KINDS,
    ROIS,
    SCALES,
    TASKS,
    VOXEL_DATA,
    TrialKey,
    TrialRunTags,
    control_name,
    fmt_number,
    format_overrides,
)
from trainable.config import UPPER

SWEEP_DIR = Path(__file__).resolve().with_name("conditions")


def sweep_dir() -> Path:
    """The project's sweep files (``--sweep-dir`` passes another folder explicitly)."""
    return SWEEP_DIR


# data kind -> task it serves; "responses": whether it carries voxel responses (NSD reference)

# The smoke test: one short epoch of a narrow network on tiny simulated worlds, through every
# real component. Sizes are the smallest that still exercise each code path:
# - batch 16: several batches per epoch, and >= 3 rows per subject in a batch for the
#   leave-one-out alignment loss;
# - width 0.125: AlexNet conv1 has 8 filters, fc 512 units;
# - simulated_single_label: 4 categories x (16 train + 8 val) = 64 + 32 images;
# - simulated_nsd: 200 images, 2 subjects (per-subject grouping is exercised), 2 repeats; the
#   20 % test split keeps >= 10 images per subject, what 5-fold validation alignment needs.
SMOKE = {"epochs": 1, "batch_size": 16, "image_size": 64, "width": 0.125}
SMOKE_DATA = {
    "simulated_single_label": {"n_categories": 4, "n_train_per_class": 16,
                               "n_val_per_class": 8, "seed": 0},
    "simulated_nsd": {"n_images": 200, "n_subjects": 2, "n_categories": 10, "repeats": 2,
                      "seed": 0},
}

_CONDITION_KEYS = ("description", "model", "layer", "reference", "roi", "metric", "task",
                   "grid", "paper", "demo", "control")
_CONTROL_KEYS = ("alphas", "scales")
# A condition's negative control is the condition ``<name>_shuffled`` (records.control_name):
# the same trials against the reference shuffled across images (``reference_shuffle``).
_COMPOSITE_KEYS = ("description", "includes")
_GRID_KEYS = ("alphas", "betas")
_SCALE_KEYS = ("data", "data_kwargs", "epochs", "lr", "batch_size", "image_size", "width",
               "resources", "trial")
_RESOURCE_KEYS = ("cpus", "gpus")
# TrialConfig keys a sweep sets itself; a scale's `trial` table may set any other one.
_SWEEP_SET = ("model", "layer", "reference", "metric", "alpha", "beta", "seed", "epochs", "lr",
              "batch_size", "image_size", "width", "threads")


class SweepFileError(ValueError):
    """A sweep file is malformed; the one-line message names the file and the key or value."""


class FloatRangeError(ValueError):
    """A number as written lies outside float64's range (it would read as 0.0 or inf)."""


def parse_float(text: str) -> float:
    """A TOML (or typed) float, refused where float64 cannot hold it: ``1e-400`` reads as 0.0
    and ``1e400`` as inf, and a refusal of the value read named a number nobody wrote. TOML's
    own ``inf`` and ``nan`` are read as written (the settings' ranges refuse them)."""
    value = float(text)
    digits = text.replace("_", "").lstrip("+-").lower()
    if digits in ("inf", "nan", "infinity"):
        return value
    if value == 0 and re.search(r"[1-9]", re.split(r"[eE]", digits)[0]):
        raise FloatRangeError(f"{text} is too small for a float64 and reads as 0.0; accepted: "
                              f"a number of magnitude 5e-324 or more, or 0")
    if math.isinf(value):
        raise FloatRangeError(f"{text} is too large for a float64 and reads as {value}; "
                              f"accepted: a number of magnitude below 1.8e308")
    return value


# --------------------------------------------------------------------------------------------
# Small frozen pieces


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_amount(name: str, value: Any, *, gpu: bool = False) -> float:
    """A per-trial resource amount, Ray 2.60's rules: a finite number >= 0 with at most four
    decimals of precision; for GPUs a fraction of one GPU below 1 (0.25: four trials share a
    GPU) and whole GPUs above 1 (Ray cannot hand out 1.5 GPUs)."""
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value!r}; accepted: a number >= 0"
                         + (" (fractions below 1, e.g. 0.25, share a GPU)" if gpu else ""))
    if 0 < value < 1e-4:
        raise ValueError(f"{name}={value!r}; accepted: 0 or at least 0.0001 (Ray's precision)")
    if not gpu and value > UPPER["threads"]:  # a trial's torch threads follow its CPU share
        raise ValueError(f"{name}={value!r}; accepted: a number from 0 to {UPPER['threads']}")
    if gpu and value > 1 and not float(value).is_integer():
        raise ValueError(f"{name}={value!r}; accepted: a fraction below 1 or a whole number "
                         f"(Ray cannot split more than one GPU)")
    return float(value)


@dataclass(frozen=True)
class Resources:
    """What one trial asks Ray for: cpus, gpus, each checked by ``check_amount``."""

    cpus: float
    gpus: float

    def __post_init__(self) -> None:
        for name in ("cpus", "gpus"):
            value = check_amount(name, getattr(self, name), gpu=name == "gpus")
            object.__setattr__(self, name, value)

    @property
    def threads(self) -> int:
        """Torch threads for a trial with this CPU share (at least 1)."""
        return max(1, int(self.cpus))


@dataclass(frozen=True)
class Grid:
    """alphas : magnitudes > 0, each run as +a ("max") and -a ("min"); betas : task weights
    >= 0 crossed with every alpha. The baseline (alpha 0, beta 1, "none") is always added."""

    alphas: tuple[float, ...]
    betas: tuple[float, ...]

    def points(self) -> list[tuple[str, float, float]]:
        """(direction, signed alpha, beta): the baseline, then every "max", then every "min"."""
        out = [("none", 0.0, 1.0)]
        for direction, sign in (("max", 1.0), ("min", -1.0)):
            out += [(direction, sign * a, b) for a in self.alphas for b in self.betas]
        return out

    def smoke_points(self) -> list[tuple[str, float, float]]:
        """The baseline plus the largest |alpha| of each direction with the first beta."""
        a, b = max(self.alphas), self.betas[0]
        return [("none", 0.0, 1.0), ("max", a, b), ("min", -a, b)]

    def __len__(self) -> int:
        return 2 * len(self.alphas) * len(self.betas) + 1


@dataclass(frozen=True)
class Scale:
    """One scale of a condition ([paper] or [demo])."""

    data: str
    epochs: int
    lr: float
    batch_size: int
    image_size: int
    width: float
    resources: Resources
    data_kwargs: tuple[tuple[str, Any], ...] = ()
    trial: tuple[tuple[str, Any], ...] = ()

    def config(self) -> dict[str, Any]:
        """The TrialConfig keys this scale sets."""
        return {"epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size,
                "image_size": self.image_size, "width": self.width, **dict(self.trial)}


@dataclass(frozen=True)
class DataSource:
    """Where one condition's data comes from; frozen and hashable, so a run prepares each
    distinct source once (``{plan.data[c] for c in plan.conditions}``).

    kind : "simulated_single_label" | "simulated_nsd" (demo, smoke) | "imagenet" | "nsd".
    image_size : pixels the trials train at.
    roi : "V1" | "VVS" for voxel data, else None.
    options : generator keyword arguments of a simulated world, as sorted (key, value) pairs.
    imagenet_root : a folder with train/ and val/ class folders (kind "imagenet").
    nsd_root, coco_annotations, subjects : the NSD release, the COCO annotation folder and the
        subjects to prepare (kind "nsd").
    """

    kind: str
    image_size: int
    roi: str | None = None
    options: tuple[tuple[str, Any], ...] = ()
    imagenet_root: str | None = None
    nsd_root: str | None = None
    coco_annotations: str | None = None
    subjects: tuple[int, ...] | None = None

    @property
    def task(self) -> str:
        return {**PAPER_DATA, **DEMO_DATA}[self.kind]

    @property
    def simulated(self) -> bool:
        return self.kind in DEMO_DATA

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options)
        opts = f" ({opts})" if opts else ""
        px = f"{self.image_size} px"
        if self.kind == "simulated_single_label":
            return f"simulated single-label world{opts} at {px}"
        if self.kind == "simulated_nsd":
            return f"simulated NSD-like world, ROI {self.roi}{opts} at {px}"
        if self.kind == "imagenet":
            return f"ImageNet folder {self.imagenet_root} at {px}"
        subjects = ", ".join(map(str, self.subjects or ()))
        return (f"NSD release {self.nsd_root}, ROI {self.roi}, subjects {subjects}, "
                f"COCO annotations {self.coco_annotations} at {px}")

    def index_note(self) -> str:
        """For an ImageNet folder: what its index holds (classes, images per split: a class
        left out, or a folder read as one, shows here) and what it left out (files that are
        not images torchvision reads, ``references.imagenet.skipped_note``), from the cached
        index; '' for other data."""
        if self.kind != "imagenet":
            return ""
        from references import datasets, imagenet

        train, val = datasets.imagenet_index(self.imagenet_root)
        return (f": {len(train.classes)} classes, {len(train)} train / {len(val)} val images"
                f"{imagenet.skipped_note(train, val)}")

    def skipped_note(self) -> str:
        """For an ImageNet folder: '' or what its index left out (``index_note``'s end)."""
        if self.kind != "imagenet":
            return ""
        from references import datasets, imagenet

        return imagenet.skipped_note(*datasets.imagenet_index(self.imagenet_root))

    def build(self, *, progress: bool = True):
        """Generate / prepare (cached) and open the data: a ``references.datasets.DataBundle``,
        built by the data registry (``references.DATASETS``) from this source's fields."""
        from references import build_dataset

        opts: dict[str, Any] = {"image_size": self.image_size, **dict(self.options)}
        if self.kind == "simulated_nsd":
            opts["roi"] = self.roi
        elif self.kind == "imagenet":
            opts["root"] = self.imagenet_root
        elif self.kind == "nsd":
            opts.update(nsd_root=self.nsd_root, coco_annotations=self.coco_annotations,
                        roi=self.roi, subjects=self.subjects, progress=progress)
        return build_dataset(self.kind, **opts)


@dataclass(frozen=True)
class TrialSpec:
    """One trial of a sweep.

    trial_id : "<condition>-<direction>-a<|alpha|>-b<beta>-s<seed>", unique within a sweep.
    condition : the condition sweep it belongs to (its own name for a single condition).
    direction : "max" (alpha > 0), "min" (alpha < 0) or "none" (the alpha = 0 baseline).
    alpha : signed; beta : task weight; seed : 0..seeds-1.
    config : TrialConfig keys (validated by ``TrialConfig.from_dict``): what the trainable gets.
    resources : what the trial asks Ray for (config["threads"] follows its cpus).
    """

    trial_id: str
    condition: str
    direction: str
    alpha: float
    beta: float
    seed: int
    config: dict[str, Any] = field(hash=False)
    resources: Resources

    def tags(self) -> dict[str, str]:
        """MLflow tags of the trial (the run adds scale and data)."""
        sample = TrialKey.parse(self.trial_id).sample
        return TrialRunTags.of(TrialKey.of(self.condition, self.alpha, self.beta, self.seed,
                                           sample)).format()

    def with_resources(self, resources: Resources) -> TrialSpec:
        """The same trial asking for ``resources`` (torch threads follow the CPU share)."""
        return replace(self, resources=resources,
                       config={**self.config, "threads": resources.threads})


@dataclass(frozen=True)
class Condition:
    """One paper condition: a model layer against one reference, one grid, two scales."""

    name: str
    path: Path
    description: str
    model: str
    layer: str
    reference: str
    roi: str | None
    metric: str
    task: str
    grid: Grid
    paper: Scale
    demo: Scale
    control_of: str | None = None  # the condition this one is the shuffled control of
    scales: tuple[str, ...] = SCALES  # the scales it runs at (a control may run at fewer)

    def scale(self, scale: str) -> Scale:
        if scale not in SCALES:
            raise ValueError(f"scale={scale!r}; accepted: {', '.join(SCALES)}")
        return self.paper if scale == "paper" else self.demo

    def base_config(self, scale: str, *, smoke: bool = False) -> dict[str, Any]:
        """TrialConfig keys shared by every trial of this condition at ``scale``."""
        s = self.scale(scale)
        cfg = {"model": self.model, "layer": self.layer, "reference": self.reference,
               "metric": self.metric, **s.config(), "threads": s.resources.threads}
        if self.control_of is not None:
            cfg["reference_shuffle"] = True
        if smoke:
            cfg.update(SMOKE)
        return cfg

    def data_source(self, scale: str, *, smoke: bool = False, imagenet_root: str | None = None,
                    nsd_root: str | None = None, coco_annotations: str | None = None,
                    subjects: Sequence[int] | None = None) -> DataSource:
        """The data this condition trains on. Demo and smoke: its simulated world (smoke: the
        tiny one); paper: its dataset at the given paths (checked by ``sweeps.plan``)."""
        if smoke:
            return DataSource(self.demo.data, SMOKE["image_size"], self.roi,
                              tuple(sorted(SMOKE_DATA[self.demo.data].items())))
        s = self.scale(scale)
        if scale == "demo":
            return DataSource(s.data, s.image_size, self.roi, s.data_kwargs)
        if s.data == "imagenet":
            return DataSource("imagenet", s.image_size, imagenet_root=imagenet_root)
        return DataSource("nsd", s.image_size, self.roi, nsd_root=nsd_root,
                          coco_annotations=coco_annotations,
                          subjects=tuple(sorted(set(subjects or (1,)))))

    def trials(self, *, scale: str = "demo", seeds: int = 1, smoke: bool = False,
               check: bool = True) -> list[TrialSpec]:
        """The condition's trials; ``check=False`` skips TrialConfig's validation (no torch
        import: ids and counts only)."""
        return _expand(self, scale, seeds, smoke, check)


def _expand(cond: Condition, scale: str, seeds: int, smoke: bool,
            check: bool = True) -> list[TrialSpec]:
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds={seeds!r}; accepted: an integer >= 1")
    if smoke and scale != "demo":
        raise ValueError("the smoke test runs on tiny simulated data; accepted: scale='demo'")
    if scale not in cond.scales or (smoke and cond.control_of is not None):
        return []  # a control runs at its scales, never in the smoke test (no new component)
    base = cond.base_config(scale, smoke=smoke)
    points = cond.grid.smoke_points() if smoke else cond.grid.points()
    out = []
    for seed in range(seeds):
        for direction, alpha, beta in points:
            config = {**base, "alpha": alpha, "beta": beta, "seed": seed}
            if check:  # the trainable's own validation, once per trial
                from trainable.config import TrialConfig

                TrialConfig.from_dict(config)
            trial_id = TrialKey(cond.name, direction, abs(alpha), beta, seed).format()
            out.append(TrialSpec(trial_id, cond.name, direction, alpha, beta, seed, config,
                                 cond.scale(scale).resources))
    return out


@dataclass(frozen=True)
class Sweep:
    """A loaded sweep file: one condition, or several for a composite (``paper``)."""

    name: str
    path: Path
    description: str
    conditions: tuple[Condition, ...]

    @property
    def composite(self) -> bool:
        mains = [c for c in self.conditions if c.control_of is None]
        return len(mains) != 1 or mains[0].name != self.name

    def condition(self, name: str) -> Condition:
        for cond in self.conditions:
            if cond.name == name:
                return cond
        raise ValueError(f"sweep {self.name} has no condition {name!r}; accepted: "
                         f"{', '.join(c.name for c in self.conditions)}")

    def grid_size(self) -> int:
        """Trials of one seed of the full grid (the paper's conditions; controls apart)."""
        return sum(len(c.grid) for c in self.conditions if c.control_of is None)

    def control_size(self, scale: str = "demo") -> int:
        """Trials of one seed of the negative controls at ``scale`` ("demo" or "paper")."""
        return sum(len(c.grid) for c in self.conditions
                   if c.control_of is not None and scale in c.scales)

    def trials(self, *, scale: str = "demo", seeds: int = 1,
               smoke: bool = False) -> list[TrialSpec]:
        """Every trial: per condition, per seed, the baseline then "max" then "min" points
        (smoke: 3 per condition). trial_ids are unique (checked)."""
        out = [t for c in self.conditions for t in c.trials(scale=scale, seeds=seeds,
                                                            smoke=smoke)]
        ids = [t.trial_id for t in out]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"sweep {self.name}: duplicate trial ids {dup[:3]}")
        return out


# --------------------------------------------------------------------------------------------
# Command-line overrides and selection

# Keys a --set override may not change: they define the grid point or the condition (a trial's
# identity: the condition's name, its fronts and its report state its model, layer, reference
# and metric), or follow from its resources (threads: use --cpus-per-trial). The same keys a
# sweep file's `trial` table may not set (spec._SWEEP_SET), less the scale's own settings.
# reference_shuffle is refused by the plan where the sweep file has a [control] (it tells the
# two apart).
OVERRIDE_FORBIDDEN = ("model", "layer", "reference", "metric", "alpha", "beta", "seed",
                      "threads")
#: Forbidden keys that runs started before stop 36 could set: their ``--resume`` repeats them
#: (the run's fingerprint then holds that the value is the one it started with).
OVERRIDE_FORBIDDEN_SINCE = ("metric",)


def parse_override(text: str, *, resume: bool = False) -> tuple[str, Any]:
    """``KEY=VALUE`` -> (key, value). VALUE is read as a TOML value, as in a sweep file
    (``0.001``, ``20``, ``true``, ``"cpu"``); a bare word that is not TOML is a string
    (``device=cpu``). The key must be a TrialConfig key a sweep lets a user change; the value's
    type and range are checked with every trial it applies to (``apply_overrides``)."""
    from trainable.config import TrialConfig

    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    accepted = sorted(f.name for f in dataclasses.fields(TrialConfig)
                      if f.name not in OVERRIDE_FORBIDDEN)
    if not sep or not key or not raw:
        raise ValueError(f"--set {text!r}; accepted: KEY=VALUE, e.g. --set epochs=1")
    if "\n" in raw or "\r" in raw:  # TOML would read the first line and drop the rest
        raise ValueError(f"--set {text!r}: a value of several lines; accepted: one KEY=VALUE "
                         f"per --set, its value on one line")
    if key in OVERRIDE_FORBIDDEN and not (resume and key in OVERRIDE_FORBIDDEN_SINCE):
        how = ("follows --cpus-per-trial" if key == "threads"
               else "is set by the sweep's grid and condition")
        raise ValueError(f"--set {key}: {key} {how}; accepted keys: {', '.join(accepted)}")
    if key not in accepted and key not in OVERRIDE_FORBIDDEN:
        raise ValueError(f"--set {key}: unknown trial setting; accepted keys: "
                         f"{', '.join(accepted)}")
    try:
        value = tomllib.loads(f"v = {raw}", parse_float=parse_float)["v"]
    except FloatRangeError as exc:
        raise ValueError(f"--set {text!r}: {exc}") from None
    except tomllib.TOMLDecodeError:
        try:  # numbers TOML refuses but Python and shells write: .001, 1., 5E-4
            value = parse_float(raw)
        except FloatRangeError as exc:
            raise ValueError(f"--set {text!r}: {exc}") from None
        except ValueError:
            value = None
        if value is None or not math.isfinite(value):
            if not raw.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"--set {text!r}: {raw!r} is not a value; accepted: a number, "
                                 f"true/false or a word") from None
            value = raw
    if isinstance(value, (dict, list)):
        raise ValueError(f"--set {text!r}; accepted: a single number, true/false or a word")
    default = next(f.default for f in dataclasses.fields(TrialConfig) if f.name == key)
    if (isinstance(value, float) and value.is_integer() and isinstance(default, int)
            and not isinstance(default, bool)):
        value = int(value)  # epochs=1.0 is epochs=1: recorded, and compared on --resume, alike
    return key, value


def apply_overrides(trials: Sequence[TrialSpec], overrides: Mapping[str, Any]) -> list[TrialSpec]:
    """Every trial with ``overrides`` merged into its config, each validated by TrialConfig
    (a bad value names the key and what is accepted, and the condition when there are
    several)."""
    from trainable.config import TrialConfig

    if not overrides:
        return list(trials)
    several = len({t.condition for t in trials}) > 1
    out = []
    for t in trials:
        config = {**t.config, **overrides}
        try:
            TrialConfig.from_dict(config)
        except ValueError as exc:
            where = f" (condition {t.condition})" if several else ""
            raise ValueError(f"--set: {exc}{where}") from None
        out.append(replace(t, config=config))
    return out


def select_trials(trials: Sequence[TrialSpec], patterns: Sequence[str]) -> list[TrialSpec]:
    """The trials whose id matches any of the shell-style ``patterns`` (``fnmatch``: ``*``,
    ``?``, ``[...]``), in their order; all of them when ``patterns`` is empty. A pattern that
    matches nothing as written but does with its ``[`` read literally (a sweep named
    ``a[1]``) is read so; one that matches nothing either way is an error that shows some
    ids."""
    if not patterns:
        return list(trials)
    chosen = []
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(t.trial_id, pattern) for t in trials):
            # A sweep named with brackets (a[1].toml): '[' read literally, as the user meant
            literal = pattern.replace("[", "[[]")
            if "[" in pattern and any(fnmatch.fnmatchcase(t.trial_id, literal) for t in trials):
                pattern = literal
            else:
                ids = [t.trial_id for t in trials]
                more = f", ... ({len(ids)} in all)" if len(ids) > 4 else ""
                raise ValueError(f"--only {pattern!r} matches no trial; trial ids look like "
                                 f"{', '.join(ids[:4])}{more} (see --dry-run)")
        chosen.append(pattern)
    return [t for t in trials if any(fnmatch.fnmatchcase(t.trial_id, p) for p in chosen)]


# --------------------------------------------------------------------------------------------
# Loading


#: The longest sweep (file) name: names are parts of folder names (run folders, trial keys).
MAX_NAME_BYTES = 100


def list_sweeps(directory: str | Path | None = None) -> list[str]:
    """Names of the sweep files in ``directory`` (default ``sweeps/conditions``), sorted."""
    folder = Path(directory) if directory is not None else sweep_dir()
    # hidden files are an editor's or a copy's (Emacs' .#NAME.toml lock links, macOS' ._NAME.toml
    # AppleDouble files), never sweeps
    return sorted(p.stem for p in folder.glob("*.toml") if not p.name.startswith("."))


#: format characters that scripts write with (Persian, Indic, emoji sequences): allowed
JOINERS = frozenset("\u200c\u200d")  # zero-width non-joiner, zero-width joiner


def _check_name(name: str, path: Path) -> None:
    """A sweep's name names its run folders (NAME-demo_YYYYmmdd-HHMMSS), its conditions' trials
    and Ray's trial folders: at most MAX_NAME_BYTES (a file system allows 255 bytes a name),
    and no control characters (a newline or tab broke the dry run's table) nor invisible
    format characters other than the joiners scripts need (``JOINERS``): a right-to-left
    override showed ``rtl\u202eevil`` as "rtllive" in the figures and the console, and
    ``a\u200bb`` (a zero-width space) looked like ``ab``, a different condition."""
    if len(name.encode()) > MAX_NAME_BYTES:
        raise SweepFileError(f"{path}: the name {name[:40]!r}... is {len(name.encode())} bytes; "
                             f"accepted: a sweep file name of at most {MAX_NAME_BYTES} bytes")
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        raise SweepFileError(f"{path}: the name {name!r} holds a control character; accepted: "
                             f"a sweep file name of printable characters")
    hidden = sorted({f"U+{ord(ch):04X}" for ch in name if unicodedata.category(ch) == "Cf"
                     and ch not in JOINERS})
    if hidden:
        raise SweepFileError(f"{path.parent}: the file {path.name!r}: the name {name!r} holds "
                             f"invisible format character(s) "
                             f"{', '.join(hidden)} (text direction, zero width); accepted: a "
                             f"sweep file name of visible characters")


def other_unicode_form(name: str, known: list[str]) -> str | None:
    """Why ``name``, not among the sweep files' names ``known``, still looks like one of them:
    the file spells it in another Unicode form (a file named on macOS is NFD, a name typed is
    NFC), said with what is accepted; None when no known name is the same text."""
    same = [k for k in known if unicodedata.normalize("NFC", k)
            == unicodedata.normalize("NFC", name)]
    if not same:
        return None
    return (f"the file {same[0]}.toml spells it in another Unicode form ({_form(same[0])} "
            f"against {_form(name)}); accepted: the name as the file spells it, or the file "
            f"renamed to the name as typed")


def _form(text: str) -> str:
    """The Unicode normal form ``text`` is in (NFC, NFD, or mixed)."""
    for form in ("NFC", "NFD"):
        if unicodedata.is_normalized(form, text):
            return form
    return "mixed"


def load_sweep(name: str, directory: str | Path | None = None, *,
               check_configs: bool = True) -> Sweep:
    """Read and validate sweep ``name`` from ``directory`` (default ``sweeps/conditions``).

    Unknown names raise ValueError listing the known ones; malformed files raise
    ``SweepFileError`` naming the file and the key or value. ``check_configs=False`` skips
    the checks that import torch (TrialConfig, registries): for listing only.
    """
    folder = Path(directory) if directory is not None else sweep_dir()
    known = list_sweeps(folder)
    if name not in known:
        raise ValueError(f"unknown sweep {name!r}; known: {', '.join(known) or '(none)'}")
    path = folder / f"{name}.toml"
    _check_name(name, path)
    raw = _read(path)
    if "includes" in raw:
        _check_keys(raw, _COMPOSITE_KEYS, path, "")
        includes = raw["includes"]
        if (not isinstance(includes, list) or not includes
                or not all(isinstance(i, str) for i in includes)):
            raise SweepFileError(f"{path}: includes={includes!r}; accepted: a non-empty list "
                                 f"of condition names")
        conditions = []
        for inc in includes:
            other = other_unicode_form(inc, known) if inc not in known else None
            if other:
                raise SweepFileError(f"{path}: includes {inc!r}: {other}")
            if inc not in known:
                raise SweepFileError(f"{path}: includes {inc!r}, not a sweep; known: "
                                     f"{', '.join(known)}")
            sub = folder / f"{inc}.toml"
            try:  # a member's own error, and which composite read it
                _check_name(inc, sub)  # its conditions name trials and folders as its own
                sub_raw = _read(sub)
                nested = "includes" in sub_raw
                if not nested:
                    conditions += _with_control(_parse_condition(inc, sub, sub_raw,
                                                                 check_configs),
                                                sub_raw, check_configs)
            except SweepFileError as exc:
                raise SweepFileError(f"{exc} (included by {path})") from None
            if nested:
                raise SweepFileError(f"{path}: includes {inc!r}, itself a composite; "
                                     f"accepted: condition sweeps only")
        if len({c.name for c in conditions}) != len(conditions):
            twice = sorted({c.name for c in conditions
                            if sum(d.name == c.name for d in conditions) > 1})
            clash = [c for c in conditions if c.name in twice and c.control_of]
            if len(set(includes)) == len(includes) and clash:  # a member's [control] is named
                # as another member: nothing was included twice
                raise SweepFileError(
                    f"{path}: {clash[0].control_of}'s [control] is the condition "
                    f"{clash[0].name}, and {clash[0].name}.toml is included too; accepted: "
                    f"one of them (rename {clash[0].name}.toml, or drop its include)")
            raise SweepFileError(f"{path}: includes a condition twice: {includes}")
        return Sweep(name, path, _description(raw, path), tuple(conditions))
    cond = _parse_condition(name, path, raw, check_configs)
    return Sweep(name, path, cond.description, tuple(_with_control(cond, raw, check_configs)))


def _listed(values: Sequence[float], most: int = 8) -> str:
    """Numbers for a message: the first ``most``, then how many more."""
    shown = ", ".join(fmt_number(v) for v in values[:most])
    return shown + (f", ... ({len(values) - most} more)" if len(values) > most else "")


def _with_control(cond: Condition, raw: dict[str, Any], check_configs: bool) -> list[Condition]:
    """``[cond]``, plus its negative control when the file has a ``[control]`` table: the same
    condition with ``reference_shuffle = true``, the control's alphas, the condition's betas."""
    if "control" not in raw:
        return [cond]
    path = cond.path
    table = _table(raw, "control", path, "")
    _check_keys(table, _CONTROL_KEYS, path, " in [control]")
    _require(table, ("alphas",), path, " in [control]")
    alphas = _numbers(table, "alphas", path, positive=True, where="control")
    scales = table.get("scales", list(SCALES))
    if (not isinstance(scales, list) or not scales
            or not all(isinstance(x, str) and x in SCALES for x in scales)):
        raise SweepFileError(f"{path}: scales={scales!r} in [control]; accepted: a non-empty "
                             f"list of {', '.join(repr(x) for x in SCALES)}")
    foreign = [a for a in alphas if not any(math.isclose(a, g, rel_tol=1e-12)
                                            for g in cond.grid.alphas)]
    if foreign:  # the control is read beside the condition at the same alpha (effects)
        raise SweepFileError(f"{path}: alphas=[{', '.join(map(fmt_number, foreign))}] in "
                             f"[control] are not alphas of [grid] "
                             f"({_listed(cond.grid.alphas)}); "
                             f"accepted: alphas of the grid, with which the control is "
                             f"compared")
    for scale in SCALES:
        if dict(cond.scale(scale).trial).get("reference_shuffle"):
            raise SweepFileError(f"{path}: [control] with trial.reference_shuffle = true in "
                                 f"[{scale}]: the condition itself is shuffled; accepted: "
                                 f"[control] on an unshuffled condition")
    control = replace(cond, name=control_name(cond.name),
                      description=f"negative control of {cond.name}: {cond.description}, the "
                                  f"reference shuffled across images",
                      grid=Grid(alphas, cond.grid.betas), control_of=cond.name,
                      scales=tuple(x for x in SCALES if x in scales))
    if check_configs:
        _check_configs(control)
    return [cond, control]


def _read(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise SweepFileError(f"{path}: a folder, not a sweep file; accepted: a TOML file")
    if path.exists() and not path.is_file():  # reading a FIFO waited for a writer for ever
        raise SweepFileError(f"{path}: not a regular file (a FIFO, socket or device); accepted: "
                             f"a TOML file")
    try:
        # utf-8-sig: a UTF-8 byte-order mark (Windows editors, PowerShell's Out-File) is not
        # part of the TOML; CRLF line ends are TOML's own
        return tomllib.loads(path.read_bytes().decode("utf-8-sig"), parse_float=parse_float)
    except FloatRangeError as exc:
        raise SweepFileError(f"{path}: the number {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SweepFileError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise SweepFileError(f"{path}: not UTF-8 text; accepted: a TOML file") from None
    except OSError as exc:
        raise SweepFileError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _check_keys(table: Mapping[str, Any], accepted: Sequence[str], path: Path,
                where: str) -> None:
    for key in table:
        if key not in accepted:
            raise SweepFileError(f"{path}: unknown key {key!r}{where}; accepted: "
                                 f"{', '.join(accepted)}")


def _require(table: Mapping[str, Any], keys: Sequence[str], path: Path, where: str) -> None:
    for key in keys:
        if key not in table:
            raise SweepFileError(f"{path}: missing key {key!r}{where}")


def _description(raw: Mapping[str, Any], path: Path) -> str:
    desc = raw.get("description", "")
    if not isinstance(desc, str):
        raise SweepFileError(f"{path}: description={desc!r}; accepted: a string")
    # one line wherever it is shown (--list, the dry run, the parent run's description): a
    # multi-line TOML string's breaks and tabs are spaces; an escape sequence or other control
    # character (it recoloured the terminal in --list) is refused
    desc = " ".join(desc.split())
    bad = next((ch for ch in desc if unicodedata.category(ch) == "Cc"), None)
    if bad is not None:
        raise SweepFileError(f"{path}: the description holds the control character "
                             f"U+{ord(bad):04X}; accepted: text (line breaks and tabs become "
                             f"spaces)")
    # a text-direction override reorders what --list and the dry run print after it (as in
    # names, _check_name); the joiners scripts need stay
    hidden = sorted({f"U+{ord(ch):04X}" for ch in desc if unicodedata.category(ch) == "Cf"
                     and ch not in JOINERS})
    if hidden:
        raise SweepFileError(f"{path}: the description holds invisible format character(s) "
                             f"{', '.join(hidden)} (text direction, zero width); accepted: "
                             f"visible text")
    return desc


def _string(raw: Mapping[str, Any], key: str, path: Path, accepted: Sequence[str] | None = None,
            where: str = "") -> str:
    value = raw[key]
    if not isinstance(value, str) or (accepted is not None and value not in accepted):
        what = ", ".join(accepted) if accepted is not None else "a string"
        raise SweepFileError(f"{path}: {key}={value!r}{where}; accepted: {what}")
    return value


def _table(raw: Mapping[str, Any], key: str, path: Path, where: str) -> dict[str, Any]:
    value = raw[key]
    if not isinstance(value, dict):
        raise SweepFileError(f"{path}: {key}={value!r}{where}; accepted: a table")
    return value


def _numbers(raw: Mapping[str, Any], key: str, path: Path, *, positive: bool,
             where: str = "grid") -> tuple[float, ...]:
    value = raw[key]
    ok = isinstance(value, list) and value and all(
        _is_number(v) and math.isfinite(v) and (v > 0 if positive else v >= 0) for v in value)
    if not ok or len(set(value)) != len(value):
        what = "> 0 (magnitudes: the sign comes from the direction)" if positive else ">= 0"
        raise SweepFileError(f"{path}: {key}={value!r} in [{where}]; accepted: a non-empty list "
                             f"of distinct numbers {what}")
    shown: dict[str, float] = {}
    for v in value:  # trial ids name each value by fmt_number: two may not print alike
        twin = shown.setdefault(fmt_number(v), v)
        if twin != v:
            raise SweepFileError(f"{path}: {key} {twin!r} and {v!r} in [{where}] are the same "
                                 f"to 10 significant digits, as trial ids name them; accepted: "
                                 f"values that differ there")
    return tuple(float(v) for v in value)


def _parse_condition(name: str, path: Path, raw: dict[str, Any],
                     check_configs: bool) -> Condition:
    _check_keys(raw, _CONDITION_KEYS, path, "")
    _require(raw, ("model", "layer", "reference", "metric", "task", "grid", "paper", "demo"),
             path, "")
    reference = _string(raw, "reference", path, REFERENCE_KINDS)
    task = _string(raw, "task", path, TASKS)
    grid_raw = _table(raw, "grid", path, "")
    _check_keys(grid_raw, _GRID_KEYS, path, " in [grid]")
    _require(grid_raw, _GRID_KEYS, path, " in [grid]")
    grid = Grid(_numbers(grid_raw, "alphas", path, positive=True),
                _numbers(grid_raw, "betas", path, positive=False))
    scales = {s: _parse_scale(s, _table(raw, s, path, ""), path, reference, task)
              for s in SCALES}
    # NSD data (and the simulated NSD-like world) is prepared per ROI, whichever reference
    # the condition aligns to: a Gabor bank or a pretrained network on NSD's images and COCO
    # labels reads the table of that ROI (shared with the NSD conditions of the same ROI)
    voxel_data = [s for s in SCALES if scales[s].data in VOXEL_DATA]
    roi = None
    if reference == "nsd" or voxel_data:
        why = (" (an NSD reference needs it)" if reference == "nsd" else
               f" (data={scales[voxel_data[0]].data!r} in [{voxel_data[0]}] is prepared per "
               f"ROI, whichever the reference)")
        _require(raw, ("roi",), path, why)
        roi = _string(raw, "roi", path, ROIS)
    elif "roi" in raw:
        raise SweepFileError(f"{path}: roi={raw['roi']!r} but no scale's data has voxel "
                             f"responses; accepted: roi only with NSD data (data = "
                             f"\"nsd\" or \"simulated_nsd\")")
    cond = Condition(name, path, _description(raw, path),
                     _string(raw, "model", path), _string(raw, "layer", path), reference, roi,
                     _string(raw, "metric", path), task, grid, scales["paper"], scales["demo"])
    if check_configs:
        _check_configs(cond)
    return cond


def _parse_scale(scale: str, raw: dict[str, Any], path: Path, reference: str,
                 task: str) -> Scale:
    where = f" in [{scale}]"
    _check_keys(raw, _SCALE_KEYS, path, where)
    _require(raw, ("data", "epochs", "lr", "batch_size", "image_size", "width", "resources"),
             path, where)
    kinds = PAPER_DATA if scale == "paper" else DEMO_DATA
    data = _string(raw, "data", path, tuple(kinds), where)
    if kinds[data] != task:
        raise SweepFileError(f"{path}: data={data!r}{where} serves task {kinds[data]!r} but "
                             f"task={task!r}; accepted: "
                             f"{', '.join(k for k, t in kinds.items() if t == task)}")
    if reference == "nsd" and data not in VOXEL_DATA:
        raise SweepFileError(f"{path}: data={data!r}{where} has no voxel responses for "
                             f"reference = \"nsd\"; accepted: "
                             f"{', '.join(k for k in kinds if k in VOXEL_DATA)}")
    data_kwargs: dict[str, Any] = {}
    if "data_kwargs" in raw:
        if scale == "paper":
            raise SweepFileError(f"{path}: data_kwargs{where}; accepted: only in [demo] (the "
                                 f"paper's data comes from the command line)")
        data_kwargs = _table(raw, "data_kwargs", path, where)
    res = _table(raw, "resources", path, where)
    _check_keys(res, _RESOURCE_KEYS, path, f" in [{scale}.resources]")
    _require(res, _RESOURCE_KEYS, path, f" in [{scale}.resources]")
    try:
        resources = Resources(res["cpus"], res["gpus"])
    except ValueError as exc:
        raise SweepFileError(f"{path}: {exc} (in [{scale}.resources])") from None
    trial = _table(raw, "trial", path, where) if "trial" in raw else {}
    for key in trial:
        if key in _SWEEP_SET:
            raise SweepFileError(f"{path}: trial.{key}{where} is set by the sweep itself; "
                                 f"accepted in trial: other TrialConfig keys")
    return Scale(data, raw["epochs"], raw["lr"], raw["batch_size"], raw["image_size"],
                 raw["width"], resources, tuple(sorted(data_kwargs.items())),
                 tuple(sorted(trial.items())))


def _data_kwarg_names(kind: str) -> tuple[str, ...]:
    """Keyword arguments a simulated world accepts in data_kwargs: its generator's and its
    bundle builder's, less those the sweep sets (image size, ROI, subjects, progress)."""
    from references import datasets, simulated

    builder, generator = {
        "simulated_single_label": (datasets.simulated_single_label_bundle,
                                   simulated.generate_single_label),
        "simulated_nsd": (datasets.simulated_nsd_bundle, simulated.generate_nsd_like),
    }[kind]
    names = set()
    for fn in (builder, generator):
        names |= {p.name for p in inspect.signature(fn).parameters.values()
                  if p.kind == p.KEYWORD_ONLY}
    return tuple(sorted(names - {"image_size", "roi", "subjects", "progress"}))


def data_kwarg_defaults(kind: str) -> dict[str, Any]:
    """A simulated world's generator and bundle-builder keyword defaults (``kind``: its
    data name): what its ``data_kwargs`` fall back to."""
    from references import datasets, simulated

    out: dict[str, Any] = {}
    for fn in {"simulated_single_label": (datasets.simulated_single_label_bundle,
                                          simulated.generate_single_label),
               "simulated_nsd": (datasets.simulated_nsd_bundle,
                                 simulated.generate_nsd_like)}[kind]:
        out.update({p.name: p.default for p in inspect.signature(fn).parameters.values()
                    if p.kind == p.KEYWORD_ONLY and p.default is not p.empty})
    return out


def _probe_data_kwargs(kind: str, kwargs: dict[str, Any]) -> None:
    """Run the generator's and the bundle builder's argument checks on ``kwargs`` (ValueError
    naming the key as written): the generator renders at ``render_size`` (its image_size), the
    single-label world is augmented by ``augment``, the NSD-like world split by
    ``split_seed``."""
    from references import simulated
    from trainable.data import AUGMENTATIONS

    check = {"simulated_single_label": simulated.check_single_label_args,
             "simulated_nsd": simulated.check_nsd_like_args}[kind]
    defaults = data_kwarg_defaults(kind)  # the generator's own, the one source
    merged = {**defaults, **kwargs}
    simulated.check_arg("render_size", merged["render_size"], *simulated.RENDER_SIZES)
    if "split_seed" in merged:
        simulated.check_arg("split_seed", merged["split_seed"], 0, simulated.MAX_SEED)
    if "augment" in merged and merged["augment"] not in AUGMENTATIONS:
        raise ValueError(f"augment={merged['augment']!r}; accepted: "
                         f"{', '.join(AUGMENTATIONS)}")
    check(**{k: merged["render_size"] if k == "image_size" else merged[k]
             for k in inspect.signature(check).parameters})


def _check_configs(cond: Condition) -> None:
    """Everything that needs the project's registries: the ROI against references.nsd, the
    demo's generator arguments, and each scale's trial config through TrialConfig."""
    from references import nsd
    from trainable.config import TrialConfig

    path = cond.path
    if cond.roi is not None and cond.roi not in nsd.ROIS:
        raise SweepFileError(f"{path}: roi={cond.roi!r}; accepted: {', '.join(nsd.ROIS)}")
    accepted = _data_kwarg_names(cond.demo.data)
    defaults = data_kwarg_defaults(cond.demo.data)
    for key, value in cond.demo.data_kwargs:
        if key not in accepted:
            raise SweepFileError(f"{path}: unknown key {key!r} in [demo.data_kwargs] for "
                                 f"{cond.demo.data}; accepted: {', '.join(accepted)}")
        default = defaults.get(key)
        if isinstance(default, int) and not isinstance(default, bool) and (
                isinstance(value, bool) or not isinstance(value, int)):
            raise SweepFileError(f"{path}: {key}={value!r} in [demo.data_kwargs]; accepted: "
                                 f"an integer")
    try:  # the generator's own range checks, before anything is generated
        _probe_data_kwargs(cond.demo.data, dict(cond.demo.data_kwargs))
    except ValueError as exc:
        raise SweepFileError(f"{path}: [demo.data_kwargs]: {exc}") from None
    # the file's top-level keys first, alone, so that their errors are not reported as the
    # first scale table's ("[paper]: layer='conv9'" for a top-level layer)
    try:
        TrialConfig.from_dict({"model": cond.model, "layer": cond.layer,
                               "reference": cond.reference, "metric": cond.metric,
                               "alpha": 1.0, "beta": 1.0, "seed": 0})
    except ValueError as exc:
        raise SweepFileError(f"{path}: {exc}") from None
    for scale in SCALES:  # each scale's settings, at alpha = beta = 1 (any grid's point)
        for smoke in (False, True) if scale == "demo" else (False,):
            probe = {**cond.base_config(scale, smoke=smoke), "alpha": 1.0, "beta": 1.0,
                     "seed": 0}
            try:
                TrialConfig.from_dict(probe)
            except ValueError as exc:
                where = "smoke settings of [demo]" if smoke else f"[{scale}]"
                raise SweepFileError(f"{path}: {where}: {exc}") from None
    # then the grid's own values, named as the table that holds them (an alpha out of range
    # was reported as the [paper] table's)
    table = "[control]" if cond.control_of is not None else "[grid]"
    for alpha in cond.grid.alphas:
        try:
            TrialConfig.from_dict({**probe, "alpha": alpha})
        except ValueError as exc:
            raise SweepFileError(f"{path}: {table} alphas: {exc}") from None
    for beta in cond.grid.betas:
        try:
            TrialConfig.from_dict({**probe, "beta": beta})
        except ValueError as exc:
            raise SweepFileError(f"{path}: [grid] betas: {exc}") from None
