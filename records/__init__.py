"""What a sweep writes, in one place: the on-disk and in-MLflow contract between the driver
(``sweeps``), which writes through this module, and the post-processor (``dashboards``), which
reads through it and MLflow. It imports no project package (MLflow,
SQLAlchemy and filelock only inside the helpers that use them), so every layer may import it.

The layering (lower never imports higher, through any chain, function-level imports
included; ``tests/test_layers.py`` checks it)::

    records      names, keys, files            (standard library)
    trainable    the one trainable             (records)
    references   references and data           (trainable, records)
    sweeps       plan, Ray Tune, MLflow        (references, trainable, records)
    dashboards   tables, fronts, report        (references, trainable, records)

``sweeps`` and ``dashboards`` never import each other: the driver runs the post-processor as
its own process (``python -m dashboards.pareto``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from records.errors import one_line

__all__ = [
    "ARTIFACTS_DIR", "CONTROL_SUFFIX", "DIRECTIONS", "ERROR_TAG", "FACTS_FILE",
    "FILTERS_ARTIFACT", "FINAL_METRICS_ARTIFACT", "FINGERPRINT_FILE", "INTERRUPTED_TAG",
    "JOURNAL_FILE", "MANIFEST_FILE", "ManifestEntry", "NETWORK_REFERENCES", "PARENT_FILE", "PARENT_TAG", "ParentPointer",
    "PREDICTIONS_ARTIFACT", "RESUME_POINTER_SUFFIX", "SCALE_SUFFIXES", "SweepRunTags",
    "TRIAL_ID_TAG", "TrialKey", "TrialRunTags", "control_name", "controlled_by", "error_summary", "experiment_name",
    "fmt_number", "format_overrides", "is_trial_run", "parse_experiment", "parse_overrides",
    "parse_run_folder", "read_json_object", "read_manifest", "run_folder_name",
    "write_manifest",
]

# -------------------------------------------------------------------------- the vocabulary
# One source for each enumeration every layer shares (the registries that build the things
# named here check their keys against these: tests/test_registry.py).

#: Reference kinds (``references.REFERENCES``): an oracle Gabor bank, a frozen pretrained
#: network, voxel responses.
REFERENCE_KINDS = ("gabor", "pretrained", "nsd")
#: Reference kinds that are a network tapped as the trainee is (``rectify`` applies to them as
#: to the layer: post-ReLU against post-ReLU). A Gabor bank's and voxels' responses are never
#: rectified.
NETWORK_REFERENCES = ("pretrained",)
#: Tasks: ImageNet-style single-label (top-1), COCO-style multi-label (mAP).
TASKS = ("single_label", "multi_label")
#: NSD regions of interest (``references.nsd.ROIS`` says which labels of which file).
ROIS = ("V1", "VVS")
#: The scales of a sweep file.
SCALES = ("paper", "demo")
#: Data kinds (``references.DATASETS``) -> the task they serve, at paper and at demo scale.
PAPER_DATA = {"imagenet": "single_label", "nsd": "multi_label"}
DEMO_DATA = {"simulated_single_label": "single_label", "simulated_nsd": "multi_label"}
#: Data kinds that carry voxel responses (what an NSD reference needs).
VOXEL_DATA = ("nsd", "simulated_nsd")

# -------------------------------------------------------------------------- names and files

#: "max": alpha > 0 (promoting alignment), "min": alpha < 0 (suppressing), "none": baseline.
DIRECTIONS = ("max", "min", "none")
#: Experiment name suffixes: the scale a sweep ran at (smoke: the shrunk demo).
SCALE_SUFFIXES = ("demo", "smoke", "paper")
#: A condition's negative control is ``<condition>_shuffled`` (reference shuffled).
CONTROL_SUFFIX = "_shuffled"

#: In Ray's storage: ``<storage>/<experiment>.latest`` names the latest run folder.
RESUME_POINTER_SUFFIX = ".latest"
#: In a run folder: the MLflow parent run of the invocation (URI redacted).
PARENT_FILE = "mlflow_parent.json"
#: In a run folder: what --resume checks (sweep files' content, seeds, overrides, store).
FINGERPRINT_FILE = "sweep_fingerprint.json"
#: In a run folder: one JSON line per trial (``ManifestEntry``), written by the driver.
MANIFEST_FILE = "manifest.jsonl"

#: A trial's artifacts (MLflow artifacts of its child run, and ``<checkpoint>/artifacts/``).
ARTIFACTS_DIR = "artifacts"
FILTERS_ARTIFACT = "conv1_filters.png"
FINAL_METRICS_ARTIFACT = "final_metrics.json"
PREDICTIONS_ARTIFACT = "val_predictions.npz"
#: In every checkpoint: each epoch's metrics reported so far (the tracking journal).
JOURNAL_FILE = "tracking_journal.json"
#: In every checkpoint: what the trial resolved where it ran (its child run's ``ran.*`` tags),
#: with each change from a restored attempt on (``sweeps.execute.merge_facts``).
FACTS_FILE = "trial_facts.json"

#: What every trial reports each epoch (MLflow metrics with step = epoch, Ray's result rows),
#: besides the counter "epoch": the trainable writes these names, the post-processor reads
#: them. val_performance is the number the fronts use (val_top1 or val_map); val_alignment is
#: the alignment they use: the trial's metric (the loss's), val_linear (the paper's) by default.
#: train_images, val_alignment_images and layer_units say what was measured where a setting
#: asks for more than the data hold (steps_per_epoch, val_images, pool above the layer's map);
#: align_steps of train_steps, on how many steps the alignment term applied (a small voxel
#: batch where no subject holds the rows the held-out score needs trains on the task alone).
EPOCH_METRICS = ("task_loss", "align_loss", "batch_alignment", "val_performance", "val_top1",
                 "val_top5", "val_map", "val_alignment", "val_linear", "val_alignment_nc",
                 "val_cka", "val_rsa", "dead_units", "epoch_seconds", "images_per_second",
                 "data_wait_seconds", "train_images", "train_steps", "align_steps",
                 "val_alignment_images", "layer_units")

#: MLflow's tag holding the description the UI shows for an experiment or a run.
NOTE_TAG = "mlflow.note.content"

#: MLflow's tag that nests a trial's run under the sweep's parent run.
PARENT_TAG = "mlflow.parentRunId"

#: A trial's child run's tag holding what ended its last failed attempt (one line,
#: ``error_summary``'s form).
ERROR_TAG = "error"


_QUALIFIED_ERROR = re.compile(r"^(?:[A-Za-z_]\w*\.)+(?P<type>[A-Za-z_]\w*): (?P<message>.*)$")
#: The retry marker's exception (``sweeps.execute.RepeatedFailure``): its message is the first
#: attempt's ``Type: message``.
REPEATED_FAILURE = "RepeatedFailure"


def error_summary(line: str) -> str:
    """A trial error's last traceback line as MLflow's ``error`` tag has it: ``Type: message``
    with the type unqualified (a traceback writes ``trainable.train.TrialDiverged: ...``), a
    retry's ``RepeatedFailure`` unwrapped to the first attempt's error it carries."""
    line = line.strip()
    m = _QUALIFIED_ERROR.match(line)
    if m:
        line = f"{m['type']}: {m['message']}"
    prefix = f"{REPEATED_FAILURE}: "
    return line[len(prefix):] if line.startswith(prefix) else line


def fmt_number(x: float) -> str:
    """Short, exact-enough number for keys and tables: 1.0 -> '1', 0.05 -> '0.05'."""
    return f"{x:.10g}"


def control_name(condition: str) -> str:
    """The name of ``condition``'s negative control."""
    return f"{condition}{CONTROL_SUFFIX}"


def controlled_by(name: str) -> str | None:
    """The condition whose negative control ``name`` is (``control_name``'s inverse), or None
    when ``name`` is not a control's name."""
    if name.endswith(CONTROL_SUFFIX) and len(name) > len(CONTROL_SUFFIX):
        return name[: -len(CONTROL_SUFFIX)]
    return None


def experiment_name(sweep: str, scale: str) -> str:
    """The MLflow experiment (and Ray run-folder prefix) of ``sweep`` at ``scale``."""
    if scale not in SCALE_SUFFIXES:
        raise ValueError(f"scale={scale!r}; accepted: {', '.join(SCALE_SUFFIXES)}")
    return f"{sweep}-{scale}"


def parse_experiment(name: str) -> tuple[str, str | None]:
    """``experiment_name``'s inverse: (sweep, scale); scale None for a foreign name."""
    sweep, _, suffix = name.rpartition("-")
    if sweep and suffix in SCALE_SUFFIXES:
        return sweep, suffix
    return name, None


_RUN_FOLDER = re.compile(r"^(?P<experiment>.+)_(?P<stamp>\d{8}-\d{6})(?:-(?P<n>\d+))?$")


def run_folder_name(experiment: str, stamp: str, n: int = 1) -> str:
    """``<experiment>_<YYYYmmdd-HHMMSS>``, then ``-2``, ``-3`` for more in the same second."""
    return f"{experiment}_{stamp}" + (f"-{n}" if n > 1 else "")


def parse_run_folder(name: str) -> tuple[str, str, int] | None:
    """(experiment, stamp, n) of a run folder's name, or None."""
    m = _RUN_FOLDER.match(name)
    return (m["experiment"], m["stamp"], int(m["n"] or 1)) if m else None


# -------------------------------------------------------------------------- trial keys


_KEY = re.compile(r"^(?P<condition>.+?)-(?P<direction>max|min|none)-a(?P<alpha>[0-9.e+-]+?)"
                  r"-b(?P<beta>[0-9.e+-]+?)-s(?P<seed>\d+)(?:-o(?P<sample>[A-Za-z0-9_]+))?$")


@dataclass(frozen=True, order=True)
class TrialKey:
    """A trial's identity: its condition, direction, |alpha|, beta, seed and, for a trial an
    adaptive search sampled, the sample's id. ``format()`` is what runs, folders and tables
    are named by (``nsd_conv1_v1-max-a0.4-b1-s0``; a sample: ``...-s0-o<id>``)."""

    condition: str
    direction: str
    alpha: float  # the magnitude; the sign comes from the direction
    beta: float
    seed: int
    sample: str | None = None

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction={self.direction!r}; accepted: {', '.join(DIRECTIONS)}")
        if self.alpha < 0:
            raise ValueError(f"alpha={self.alpha!r}; accepted: a magnitude >= 0")

    @property
    def signed_alpha(self) -> float:
        return {"max": 1.0, "min": -1.0, "none": 0.0}[self.direction] * self.alpha

    def format(self) -> str:
        alpha = f"{self.alpha:.4g}" if self.sample is not None else fmt_number(self.alpha)
        out = (f"{self.condition}-{self.direction}-a{alpha}-b{fmt_number(self.beta)}"
               f"-s{self.seed}")
        return out + (f"-o{self.sample}" if self.sample is not None else "")

    def __str__(self) -> str:
        return self.format()

    @classmethod
    def parse(cls, text: str) -> TrialKey:
        """``format()``'s inverse; ValueError naming the text and the accepted form."""
        m = _KEY.match(text)
        if not m:
            raise ValueError(f"{text!r} is not a trial key; accepted: <condition>-<max|min|none>"
                             f"-a<|alpha|>-b<beta>-s<seed>[-o<sample>]")
        return cls(m["condition"], m["direction"], float(m["alpha"]), float(m["beta"]),
                   int(m["seed"]), m["sample"])

    @classmethod
    def of(cls, condition: str, alpha: float, beta: float, seed: int,
           sample: str | None = None) -> TrialKey:
        """The key of a trial at signed ``alpha``."""
        direction = "max" if alpha > 0 else "min" if alpha < 0 else "none"
        return cls(condition, direction, abs(float(alpha)), float(beta), int(seed), sample)


# -------------------------------------------------------------------------- run-folder files


def read_json_object(path: Path) -> dict:
    """A JSON object the driver wrote in a run folder (``FINGERPRINT_FILE``, ``PARENT_FILE``);
    ValueError with the reason in one line where the file cannot be read (OSError's text),
    does not parse (a kill mid-write, an edit gone wrong) or holds another JSON value. The
    driver refuses such a file, the post-processor reads it as absent and says so."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(one_line(exc)) from None
    if not isinstance(value, dict):
        raise ValueError(f"a JSON {type(value).__name__}, not an object")
    return value


@dataclass(frozen=True)
class ParentPointer:
    """``PARENT_FILE``: the MLflow parent run of a run folder's invocation, and the tracking
    URI it lives in, redacted (as the console shows it; never a secret on disk)."""

    run_id: str | None
    mlflow_uri: str | None = None

    def format(self) -> str:
        return json.dumps({"run_id": self.run_id, "mlflow_uri": self.mlflow_uri})

    @classmethod
    def parse(cls, value: Mapping[str, Any]) -> ParentPointer:
        """From ``read_json_object``'s dict; a field missing or not a non-empty string is
        None."""
        def text(key: str) -> str | None:
            v = value.get(key)
            return v if isinstance(v, str) and v else None

        return cls(text("run_id"), text("mlflow_uri"))

    @classmethod
    def read(cls, path: Path) -> ParentPointer:
        """``parse(read_json_object(path))``: ValueError as that raises it."""
        return cls.parse(read_json_object(path))


# -------------------------------------------------------------------------- the manifest


@dataclass(frozen=True)
class ManifestEntry:
    """One trial of a run as the driver saw it end: its key, state ("done", "ERROR",
    "stopped at epoch k of n", "no epoch finished"; "not started" in manifests written before
    stop 29), its Ray trial folder (relative to the run
    folder, None when it never started), its MLflow child run id (None when it has none),
    and the resolved trial config."""

    key: str
    state: str
    folder: str | None
    run_id: str | None
    config: dict

    def trial_key(self) -> TrialKey:
        return TrialKey.parse(self.key)


def write_manifest(run_dir: Path, entries: Iterable[ManifestEntry], *, write_text) -> Path:
    """``<run_dir>/manifest.jsonl``, written with ``write_text(path, text)`` (atomic)."""
    text = "".join(json.dumps(asdict(e), sort_keys=True, default=str) + "\n" for e in entries)
    path = Path(run_dir) / MANIFEST_FILE
    write_text(path, text)
    return path


_MANIFEST_TYPES = {"key": str, "state": str, "folder": (str, type(None)),
                   "run_id": (str, type(None)), "config": dict}


def read_manifest(run_dir: Path) -> list[ManifestEntry]:
    """The entries of ``<run_dir>/manifest.jsonl`` ([] when the run wrote none yet); a line
    that is not one is a ValueError naming the file and line."""
    path = Path(run_dir) / MANIFEST_FILE
    if not path.is_file():
        return []
    entries = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = ManifestEntry(**json.loads(line))
            # each field of the type the driver writes (a hand edit's "config": null failed
            # later, as a TypeError with a traceback file)
            for name, kinds in _MANIFEST_TYPES.items():
                if not isinstance(getattr(entry, name), kinds):
                    raise TypeError(f"'{name}' is {getattr(entry, name)!r}")
        except (ValueError, TypeError) as exc:  # a truncated copy, an edit gone wrong
            raise ValueError(f"{path} line {n}: not a manifest entry "
                             f"({one_line(exc)}); accepted: the file as the "
                             f"driver wrote it, one JSON object per trial") from None
        entries.append(entry)
    return entries


# -------------------------------------------------------------------------- MLflow


#: The tag a run retired by the driver carries (``sweeps.tracking.retire_unknown_children``):
#: deleted by it, not by a user, so no report counts it as a trial's run deleted.
RETIRED_TAG = "retired"


def format_overrides(overrides: Mapping[str, Any]) -> str:
    """``--set`` overrides as one tag value: ``epochs=1,steps_per_epoch=20`` (sorted): the
    parent run's ``overrides`` tag, and what a report's resume line repeats
    (``parse_overrides`` reads it back)."""
    return ",".join(f"{k}={v}" for k, v in sorted(overrides.items()))


#: a comma that starts the next ``key=``: a value may hold commas (a path), a key never does
_NEXT_OVERRIDE = re.compile(r",(?=[A-Za-z_]\w*=)")


def parse_overrides(text: str) -> dict[str, str]:
    """``format_overrides``'s tag value back into {key: value as written}; "" -> {}."""
    out = {}
    for item in filter(None, _NEXT_OVERRIDE.split(text)):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"overrides tag {text!r}: {item!r} is not key=value")
        out[key] = value
    return out


#: The tag ``sweeps.tracking.finish`` sets on a parent run as it ends: "true" when the run
#: was interrupted (Ctrl-C, SIGTERM), else "false".
INTERRUPTED_TAG = "interrupted"

#: The NSD subjects of a paper-scale run as the paper-data line wrote them, for runs recorded
#: before the parent run had a ``subjects`` tag (``SweepRunTags.parse``)
_LEGACY_SUBJECTS = re.compile(r", subjects ((?:\d+, )*\d+), COCO annotations ")


@dataclass(frozen=True)
class SweepRunTags:
    """The tags of a sweep invocation's MLflow parent run that the post-processor reads: the
    driver writes them (``format``), the post-processor reads them (``parse``); a Ray-results
    source builds one from the run folder's fingerprint. The fields a trial's child run also
    carries are ``TRIAL_RUN_FIELDS``.

    sweep, scale ("demo" | "paper"), smoke; data : the --data value ("demo", "imagenet", "nsd",
    "paper"); data_description : the run's data line; subjects : the NSD subjects of a
    paper-scale run (() otherwise); overrides : ``--set`` as {key: value as written}; only :
    ``--only`` globs; search : "grid" | "optuna"; num_samples : an Optuna search's samples per
    condition; seeds; trials : the trials the run launches (None: not recorded); planned :
    {condition: trials}; command : the driver's command words (shell-quoted), None when not
    recorded; interrupted : the run was interrupted (None: not ended, or not recorded).
    """

    sweep: str
    scale: str = ""
    smoke: bool = False
    data: str = ""
    data_description: str = ""
    subjects: tuple[int, ...] = ()
    overrides: Mapping[str, str] = field(default_factory=dict)
    only: tuple[str, ...] = ()
    search: str = "grid"
    num_samples: int | None = None
    seeds: int = 1
    trials: int | None = None
    planned: Mapping[str, int] = field(default_factory=dict)
    command: str | None = None
    interrupted: bool | None = None

    #: what every trial's child run carries as well (the run's data and its changes)
    TRIAL_RUN_FIELDS: ClassVar[tuple[str, ...]] = (
        "sweep", "scale", "data", "data_description", "smoke", "overrides", "only")

    def format(self) -> dict[str, str]:
        """The tags, every value a string; empty fields (no data line, no overrides, no --only,
        ...) left out."""
        tags = {"sweep": self.sweep, "scale": self.scale, "smoke": str(self.smoke).lower(),
                "search": self.search, "seeds": str(self.seeds)}
        if self.data:
            tags["data"] = self.data
        if self.data_description:
            tags["data_description"] = self.data_description
        if self.subjects:
            tags["subjects"] = ",".join(map(str, self.subjects))
        if self.overrides:
            tags["overrides"] = format_overrides(self.overrides)
        if self.only:
            tags["only"] = " ".join(self.only)
        if self.num_samples is not None:
            tags["num_samples"] = str(self.num_samples)
        if self.trials is not None:
            tags["trials"] = str(self.trials)
        if self.planned:
            tags["planned"] = json.dumps(dict(self.planned), sort_keys=True)
        if self.command is not None:
            tags["command"] = self.command
        if self.interrupted is not None:
            tags[INTERRUPTED_TAG] = str(self.interrupted).lower()
        return tags

    def trial_run_tags(self) -> dict[str, str]:
        """The subset of ``format()`` every trial's child run carries."""
        return {k: v for k, v in self.format().items() if k in self.TRIAL_RUN_FIELDS}

    @classmethod
    def parse(cls, tags: Mapping[str, str]) -> SweepRunTags:
        """A parent run's tags (any others are ignored). Lenient, as a report must be on a
        store a user edited: a value that does not read is taken as not recorded."""
        def number(key: str) -> int | None:
            try:
                return int(tags[key])
            except (KeyError, TypeError, ValueError):
                return None

        try:
            overrides = parse_overrides(tags.get("overrides", ""))
        except ValueError:
            overrides = {}
        try:
            planned = json.loads(tags.get("planned", "{}"))
            planned = ({str(k): v for k, v in planned.items()
                        if isinstance(v, int) and not isinstance(v, bool) and v >= 0}
                       if isinstance(planned, dict) else {})
        except (TypeError, ValueError):
            planned = {}
        if "subjects" in tags:
            subjects = tuple(int(s) for s in tags["subjects"].split(",")
                             if s.strip().isdecimal() and s.strip().isascii())
        else:  # recorded before the tag existed: the data line named them
            found = _LEGACY_SUBJECTS.search(tags.get("data_description", ""))
            subjects = tuple(int(s) for s in found.group(1).split(", ")) if found else ()
        flag = tags.get(INTERRUPTED_TAG)
        return cls(
            sweep=tags.get("sweep", ""), scale=tags.get("scale", ""),
            smoke=tags.get("smoke") == "true", data=tags.get("data", ""),
            data_description=tags.get("data_description", ""), subjects=subjects,
            overrides=overrides, only=tuple(tags.get("only", "").split()),
            search=tags.get("search") or "grid", num_samples=number("num_samples"),
            seeds=number("seeds") or 1, trials=number("trials"), planned=planned,
            command=tags.get("command"),
            interrupted=None if flag is None else flag == "true")


def child_runs(client: Any, parent_run_id: str, *, deleted: bool = False) -> list:
    """Every child run of a parent (all pages), with an ``MlflowClient``; the deleted ones
    (MLflow's soft delete) instead where ``deleted``."""
    from mlflow.entities import ViewType

    parent = client.get_run(parent_run_id)
    runs, token = [], None
    while True:
        page = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                                  run_view_type=(ViewType.DELETED_ONLY if deleted
                                                 else ViewType.ACTIVE_ONLY),
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


#: The tag naming a trial's child run by its key (``TrialKey.format``): MLflow searches
#: filter on it (``tags.trial_id = '...'``).
TRIAL_ID_TAG = "trial_id"


@dataclass(frozen=True)
class TrialRunTags:
    """The tags that name a trial's child run: the driver writes them (``of(key).format()``),
    the driver's bookkeeping and the post-processor read them (``parse``). A field the run
    lacks is None (another tool's run under the parent, or a run written before the field).

    trial_id : the key as formatted; condition, direction; alpha : the signed alpha as
    ``fmt_number`` rounds it for display (the run's ``alpha`` param is the alpha trained);
    beta, seed : as written.
    """

    trial_id: str | None = None
    condition: str | None = None
    direction: str | None = None
    alpha: str | None = None
    beta: str | None = None
    seed: str | None = None

    _TAGS: ClassVar[dict[str, str]] = {
        "trial_id": TRIAL_ID_TAG, "condition": "condition", "direction": "direction",
        "alpha": "alpha", "beta": "beta", "seed": "seed"}

    @classmethod
    def of(cls, key: TrialKey) -> TrialRunTags:
        return cls(trial_id=key.format(), condition=key.condition, direction=key.direction,
                   alpha=fmt_number(key.signed_alpha), beta=fmt_number(key.beta),
                   seed=str(key.seed))

    def format(self) -> dict[str, str]:
        """The tags, the fields that are set."""
        return {tag: getattr(self, name) for name, tag in self._TAGS.items()
                if getattr(self, name) is not None}

    @classmethod
    def parse(cls, tags: Mapping[str, str]) -> TrialRunTags:
        return cls(**{name: tags.get(tag) for name, tag in cls._TAGS.items()})

    @property
    def is_trial(self) -> bool:
        """Whether the run is a trial's, not another tool's run nested under the parent."""
        return self.trial_id is not None and self.condition is not None


def is_trial_run(tags: Mapping[str, str]) -> bool:
    """Whether a child run's ``tags`` are a trial's (``TrialRunTags``)."""
    return TrialRunTags.parse(tags).is_trial
