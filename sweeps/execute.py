"""Run a validated sweep ``Plan`` on Ray Tune, tracked in MLflow.

The data flows one way: each distinct data source is indexed and each condition's reference
is prepared ONCE here on the driver and put in Ray's object store (small things only: split
indices over files every node sees, label and voxel tables, a reference's weights; no image is
decoded here); Ray Tune launches one trial per grid point of the ONE shared trainable
(``trainable.train.train``), each fetching only its own condition's data index and reference
from the store and streaming its images itself (``trainable.data``); per-epoch metrics and checkpoints go to Ray Tune
and to the trial's nested MLflow run. All Ray imports of the project live in ``sweeps/``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweeps import tracking
from sweeps.plan import Plan, check_services
from sweeps.spec import Resources, TrialSpec, format_overrides

# `ray start` (2.60) turns token authentication on by default, but a driver only presents its
# token (RAY_AUTH_TOKEN, or ~/.ray/auth_token) when RAY_AUTH_MODE says so, and Ray reads that
# when it is first imported: set it before any Ray import. Authentication stays on; a cluster
# started with it disabled needs RAY_AUTH_MODE=disabled in the environment.
os.environ.setdefault("RAY_AUTH_MODE", "token")
# With CheckpointConfig(num_to_keep=2) Tune snapshots its experiment state whenever a trial has
# saved two checkpoints since the last snapshot, so the state never names a deleted checkpoint.
# At demo scale an epoch takes seconds, so that is every few seconds, and Tune prints a
# three-line warning each time; the snapshot itself is small (~20 ms). Silence the warning only.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

PARENT_FILE = "mlflow_parent.json"
LATEST_FILE = "latest"
PROGRESS_METRICS = ("epoch", "val_performance", "val_alignment", "batch_alignment", "task_loss")


@dataclass(frozen=True)
class Payload:
    """What every trial receives through ``tune.with_parameters`` (small: object references,
    not the data itself, so a trial fetches only its own condition's data)."""

    specs: dict[str, TrialSpec]
    data_refs: dict[str, Any]  # condition -> ObjectRef of TrialData (split indices, no images)
    reference_refs: dict[str, Any]  # condition -> ObjectRef of the reference
    mlflow_uri: str
    parent_run_id: str
    run_tags: dict[str, str]


class RayHooks:
    """``trainable.train.Hooks`` for a trial running under Ray Tune with an MLflow child run.

    Artifacts (the conv1 filter grid, the final metrics) are written to a private temporary
    folder, logged to the MLflow run when the trial ends, and copied into every checkpoint
    reported after they appear (``<checkpoint>/artifacts/``), so Ray persists them to the
    trial's storage folder with its own checkpoint mechanism. Tune's ``get_trial_dir()`` is
    not used for them: with reused actors it names a local working folder that Tune never
    copies to storage.
    """

    ARTIFACTS = "artifacts"

    def __init__(self, run: tracking.TrialRun) -> None:
        from ray import tune

        self._tune = tune
        self.run = run
        self._restored: tempfile.TemporaryDirectory | None = None
        self._artifacts = tempfile.TemporaryDirectory(prefix="trial-artifacts-")

    def report(self, metrics: dict[str, float], checkpoint_dir: Path) -> None:
        self.run.log_epoch(metrics, int(metrics["epoch"]))
        art = self.artifact_dir()
        if any(art.iterdir()):
            shutil.copytree(art, Path(checkpoint_dir) / self.ARTIFACTS, dirs_exist_ok=True)
        # Ray persists the checkpoint directory to the run's storage before report returns.
        self._tune.report(dict(metrics),
                          checkpoint=self._tune.Checkpoint.from_directory(str(checkpoint_dir)))

    def restore(self) -> Path | None:
        ckpt = self._tune.get_checkpoint()
        if ckpt is None:
            return None
        self._restored = tempfile.TemporaryDirectory(prefix="restore-")
        return Path(ckpt.to_directory(self._restored.name))

    def artifact_dir(self) -> Path:
        return Path(self._artifacts.name)

    def close(self) -> None:
        self._artifacts.cleanup()
        if self._restored is not None:
            self._restored.cleanup()


def run_trial(config: dict[str, Any], *, payload: Payload) -> None:
    """The Ray Tune function trainable: one grid point, by its trial id."""
    import ray

    from trainable.train import train

    # Ray's storage module logs "Checkpoint successfully created at: ..." at INFO for every
    # report (every epoch of every trial), which buries the progress table; warnings still show.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    spec = _trial_spec(config, payload)
    data = ray.get(payload.data_refs[spec.condition])
    reference = ray.get(payload.reference_refs[spec.condition])
    run = tracking.TrialRun(payload.mlflow_uri, payload.parent_run_id, spec.trial_id,
                            params=spec.config, tags={**payload.run_tags, **spec.tags()})
    hooks = RayHooks(run)
    # Where it ran (multi-node checks) and which process to signal (fault-injection tests).
    run.set_tags({"ray_node_id": ray.get_runtime_context().get_node_id(),
                  "worker_pid": str(os.getpid())})
    try:
        train(spec.config, data=data, reference=reference, hooks=hooks)
        run.log_artifacts(hooks.artifact_dir())
    except BaseException as exc:
        run.set_tags({"error": f"{type(exc).__name__}: {exc}"[:5000]})
        run.finish("FAILED")
        raise
    finally:
        hooks.close()
    run.finish("FINISHED")


def _trial_spec(config: dict[str, Any], payload: Payload) -> TrialSpec:
    """The grid trial named by ``trial_id``, or, for adaptive search, a trial of the given
    condition and direction at the sampled |alpha| (``alpha_mag``), derived from that
    direction's grid trial so every other setting is the sweep file's."""
    if "alpha_mag" not in config:
        return payload.specs[config["trial_id"]]
    from dataclasses import replace

    from ray import tune

    base = payload.specs[config["trial_id"]]
    sign = 1.0 if base.direction == "max" else -1.0
    alpha = sign * float(config["alpha_mag"])
    trial_id = f"{base.condition}-{base.direction}-a{abs(alpha):.4g}-optuna-{tune.get_context().get_trial_id()}"
    return replace(base, trial_id=trial_id, alpha=alpha, config={**base.config, "alpha": alpha})


# ----------------------------------------------------------------------------- driver


def _say(msg: str) -> None:
    print(msg, flush=True)


def _prepare(plan: Plan) -> tuple[dict[str, Any], dict[str, Any]]:
    """Index each distinct data source once and build each condition's reference once
    (driver). Nothing here decodes a split: trials stream their own images."""
    from references import build_reference
    from trainable.data import TrialData

    bundles: dict[Any, Any] = {}
    datas: dict[Any, TrialData] = {}
    per_condition_data, per_condition_ref = {}, {}
    running = {t.condition for t in plan.trials}
    for name in (c for c in plan.conditions if c in running):  # a plan narrowed to fewer
        source = plan.data[name]
        cond = plan.spec.condition(name)
        if source not in bundles:
            t0 = time.perf_counter()
            bundles[source] = source.build(progress=True)
            datas[source] = TrialData.from_bundle(bundles[source], source.describe())
            d = datas[source]
            _say(f"data ready: {source.describe()}: {len(d.train)} train / {len(d.val)} "
                 f"validation images indexed ({time.perf_counter() - t0:.1f} s); each trial "
                 f"reads its own")
        t0 = time.perf_counter()
        reference = build_reference(
            cond.reference, bundle=bundles[source], model=cond.model, layer=cond.layer,
            width=next(t.config["width"] for t in plan.trials if t.condition == name),
            image_size=source.image_size,
            weights="auto" if source.simulated else "torchvision",
            dataset_key=source.describe(),
        )
        _say(f"reference ready for {name}: {cond.reference} "
             f"({time.perf_counter() - t0:.1f} s)")
        per_condition_data[name] = datas[source]
        per_condition_ref[name] = reference
    return per_condition_data, per_condition_ref


def _init_ray(plan: Plan) -> None:
    import ray


    if plan.address is None:
        # A local Ray sized to this machine; an explicit object store keeps two Ray nodes on one
        # machine from each claiming all of its memory.
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=True,
                 object_store_memory=int(os.environ.get("ALIGNSWEEP_OBJECT_STORE", 1 << 30)),
                 runtime_env={"env_vars": _worker_env()})
    else:
        ray.init(address=plan.address, runtime_env={"env_vars": _worker_env()},
                 **_loopback_node(plan.address))


def _loopback_node(address: str) -> dict[str, str]:
    """A cluster on this machine's loopback (e.g. ``127.0.0.2:6379``, what the tests start) is
    joined on that address: otherwise Ray 2.60 takes the machine's outward interface address as
    the driver's node address and looks for a local raylet there."""
    import ipaddress

    host = address.removeprefix("ray://").rsplit(":", 1)[0].strip("[]")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        return {}
    return {"_node_ip_address": host} if loopback and not address.startswith("ray://") else {}


def _worker_env() -> dict[str, str]:
    """Settings trials must share with the driver (the cache of generated data)."""
    keep = ("ALIGNSWEEP_CACHE", "MLFLOW_TRACKING_URI")
    return {k: os.environ[k] for k in keep if k in os.environ}


def _run_dir(plan: Plan) -> Path:
    """Each invocation gets its own Ray Tune experiment folder (nothing earlier is overwritten);
    ``--resume`` continues the latest one, recorded in ``<storage>/<experiment>.latest``."""
    storage = Path(plan.storage)
    pointer = storage / f"{plan.experiment}.{LATEST_FILE}"
    if plan.resume:
        if not pointer.is_file():
            raise ValueError(f"--resume: no earlier run of {plan.experiment} under {storage}")
        return Path(pointer.read_text().strip())
    storage.mkdir(parents=True, exist_ok=True)
    run_dir = storage / f"{plan.experiment}_{time.strftime('%Y%m%d-%H%M%S')}"
    pointer.write_text(str(run_dir))
    return run_dir


def _trial_resources(trials: tuple[TrialSpec, ...], gpus_available: float) -> dict[str, Resources]:
    """Per-trial resources; on a cluster without GPUs, GPU requests become 0 (trials then run
    on CPU: the trainable picks CUDA only when Ray made a GPU visible)."""
    out = {}
    for t in trials:
        r = t.resources
        if r.gpus > 0 and gpus_available == 0:
            r = Resources(cpus=r.cpus, gpus=0.0)
        out[t.trial_id] = r
    return out


def execute(plan: Plan) -> int:
    """Run the plan; returns the process exit code (0: every trial finished)."""
    import ray
    from ray import tune

    check_services(plan)
    run_dir = _run_dir(plan)
    parent_file = run_dir / PARENT_FILE
    reuse = json.loads(parent_file.read_text())["run_id"] if plan.resume and parent_file.is_file() else None
    run_tags = {"sweep": plan.sweep, "scale": plan.scale, "data": plan.data_kind,
                "data_description": plan.data_description, "smoke": str(plan.smoke).lower()}
    if plan.overrides:
        run_tags["overrides"] = format_overrides(plan.overrides)
    if plan.only:
        run_tags["only"] = " ".join(plan.only)
    parent_id = tracking.start_parent(plan.mlflow_uri, plan.experiment, run_tags, reuse)
    run_dir.mkdir(parents=True, exist_ok=True)
    parent_file.write_text(json.dumps({"run_id": parent_id, "mlflow_uri": plan.mlflow_uri}))
    _say(f"MLflow: experiment {plan.experiment}, parent run {parent_id} ({plan.mlflow_uri})")

    status = "FAILED"
    try:
        datas, references = _prepare(plan)
        _init_ray(plan)
        gpus = float(ray.cluster_resources().get("GPU", 0))
        if gpus == 0 and any(t.resources.gpus > 0 for t in plan.trials):
            _say("no GPU in the Ray cluster: trials run on CPU (gpus per trial set to 0)")
        resources = _trial_resources(plan.trials, gpus)
        # Conditions on one data source share its TrialData: put it in the store once.
        stored: dict[int, Any] = {}
        for d in datas.values():
            if id(d) not in stored:
                stored[id(d)] = ray.put(d)
        data_refs = {c: stored[id(d)] for c, d in datas.items()}
        payload = Payload(
            specs={t.trial_id: t for t in plan.trials},
            data_refs=data_refs,
            reference_refs={c: ray.put(r) for c, r in references.items()},
            mlflow_uri=plan.mlflow_uri, parent_run_id=parent_id, run_tags=run_tags,
        )
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, payload=payload),
            lambda config: tune.PlacementGroupFactory(
                [{"CPU": resources[config["trial_id"]].cpus,
                  "GPU": resources[config["trial_id"]].gpus}]),
        )
        if plan.resume and tune.Tuner.can_restore(str(run_dir)):
            _say(f"resuming {run_dir}: only unfinished trials run")
            tuner = tune.Tuner.restore(str(run_dir), trainable=trainable,
                                       resume_unfinished=True, resume_errored=True)
            results = list(tuner.fit())
        elif plan.search == "optuna":
            results = _optuna_fits(plan, trainable, run_dir)
        else:
            grid = [t.trial_id for t in plan.trials]
            results = list(_tuner(trainable, run_dir, {"trial_id": tune.grid_search(grid)}).fit())
        failed = [r for r in results if r.error is not None]
        _summary(plan, results, run_dir, parent_id)
        status = "FINISHED" if not failed else "FAILED"
    finally:
        tracking.finish(plan.mlflow_uri, parent_id, status)
        if ray.is_initialized():
            ray.shutdown()
    _report(plan, parent_id)
    return 0 if not failed else 1


def _report(plan: Plan, parent_id: str) -> None:
    """Post-process the finished sweep (tables, fronts, figures, HTML report, logged to the
    parent run). A failure here is reported in one line and does not fail the sweep: every
    trial's results are already in MLflow and `python -m dashboards.pareto` can be rerun."""
    from dashboards.pareto import postprocess

    try:
        path = postprocess(plan.sweep, mlflow_uri=plan.mlflow_uri, parent_run_id=parent_id,
                           experiment=plan.experiment)
    except Exception as exc:  # the sweep itself succeeded; say why the report did not
        _say(f"report not written: {type(exc).__name__}: {exc}".splitlines()[0])
        _say(f"retry with: python -m dashboards.pareto {plan.sweep} --mlflow-uri "
             f"{plan.mlflow_uri} --parent-run {parent_id}")
        return
    from dashboards.effects import summary_lines

    stats = json.loads((Path(path).parent / "statistics.json").read_text())
    for line in summary_lines(stats.get("effects") or {}):
        _say(line)
    _say(f"report: {Path(path).resolve()}")


def _run_config(run_dir: Path):
    from ray import tune

    reporter = tune.CLIReporter(metric_columns=list(PROGRESS_METRICS),
                                parameter_columns=["trial_id"], max_report_frequency=30)
    return tune.RunConfig(
        name=run_dir.name, storage_path=str(run_dir.parent),
        failure_config=tune.FailureConfig(max_failures=2),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        progress_reporter=reporter, verbose=1,
    )


def _tuner(trainable, run_dir: Path, param_space: dict, **tune_kwargs):
    """A Tuner over ``param_space``. Actors are reused between trials (Tune restarts the
    trainable function in the same worker process): a fresh worker first pays ~7-10 s of
    imports (torch, torchvision, MLflow) on a small machine, which at demo scale is as long as
    a trial's training, so reuse is what keeps the trial slots busy (bench_sweep.py)."""
    from ray import tune

    return tune.Tuner(trainable, param_space=param_space, run_config=_run_config(run_dir),
                      tune_config=tune.TuneConfig(reuse_actors=True, **tune_kwargs))


def _optuna_fits(plan: Plan, trainable, run_dir: Path) -> list:
    """Adaptive search: per condition, the alpha = 0 baseline, then num_samples trials split
    between the two directions, each side sampled by Optuna (NSGA-II) with |alpha| log-uniform
    in the grid's range and two objectives: performance up and alignment down on the
    suppressing side, both up on the promoting side. Each side traces its own front with
    fewer trials than the grid."""
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    results = []
    for name in plan.conditions:
        cond = plan.spec.condition(name)
        trials = [t for t in plan.trials if t.condition == name]
        baseline = [t.trial_id for t in trials if t.direction == "none"]
        sub = run_dir.parent / f"{run_dir.name}-{name}"
        results += list(_tuner(trainable, sub.with_name(sub.name + "-baseline"),
                               {"trial_id": tune.grid_search(baseline)}).fit())
        lo, hi = min(cond.grid.alphas), max(cond.grid.alphas)
        if lo == hi:  # a one-point grid: sample around it
            lo, hi = lo / 4, hi * 4
        for i, direction in enumerate(("max", "min")):
            n = plan.num_samples // 2 + (plan.num_samples % 2 if direction == "max" else 0)
            if n == 0:
                continue
            base = next(t for t in trials if t.direction == direction)
            search = OptunaSearch(
                metric=["val_performance", "val_alignment"],
                mode=["max", "max" if direction == "max" else "min"],
                sampler=optuna.samplers.NSGAIISampler(seed=i),
            )
            space = {"trial_id": base.trial_id, "alpha_mag": tune.loguniform(lo, hi)}
            tuner = _tuner(trainable, sub.with_name(f"{sub.name}-{direction}"), space,
                           search_alg=search, num_samples=n)
            results += list(tuner.fit())
    return results


def _summary(plan: Plan, results, run_dir: Path, parent_id: str) -> None:
    rows = []
    for r in results:
        m = r.metrics or {}
        cfg = r.config or {}
        tid = cfg.get("trial_id", "?")
        if "alpha_mag" in cfg:
            tid = f"{tid.split('-a')[0]}-a{cfg['alpha_mag']:.4g} (optuna)"
        state = "ERROR" if r.error is not None else "done"
        rows.append((tid, state, m.get("val_performance", float("nan")),
                     m.get("val_alignment", float("nan"))))
    rows.sort()
    width = max(len(r[0]) for r in rows) if rows else 10
    _say("")
    _say(f"{'trial':<{width}}  state  performance  alignment")
    for tid, state, perf, align in rows:
        _say(f"{tid:<{width}}  {state:<5}  {perf:11.4f}  {align:9.4f}")
    _say("")
    where = f"{run_dir}-*" if plan.search == "optuna" else str(run_dir)
    _say(f"Ray Tune results: {where}")
    _say(f"MLflow: {plan.mlflow_uri} (experiment {plan.experiment}, parent run {parent_id})")
    _say(f"browse them: mlflow ui --backend-store-uri {plan.mlflow_uri}")
