"""Sweep files, their expansion into trials, the plan and the command line (no Ray started)."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sweeps.plan import UsageError, check_services, make_plan
from sweeps.run import build_parser
from sweeps.spec import SWEEP_DIR, SweepFileError, fmt_number, list_sweeps, load_sweep
from trainable.config import TrialConfig

REPO = Path(__file__).resolve().parents[1]

# The paper's table (issue 5): trials per sweep at one seed.
COUNTS = {"gabor_conv1": 33, "pretrained_conv1": 9, "pretrained_conv5": 9, "nsd_conv1_v1": 9,
          "nsd_fc1_vvs": 13, "nsd_resnet18_block1_v1": 3, "nsd_resnet18_block4_vvs": 3,
          "paper": 79}
# Negative controls run beside a condition at demo scale (not in the paper): trials per sweep.
CONTROLS = {"nsd_conv1_v1": 3, "paper": 3}
# name: (model, layer, reference, roi, task, alphas, betas, paper epochs)
PAPER = {
    "gabor_conv1": ("alexnet", "conv1", "gabor", None, "single_label", (1, 2, 4, 8),
                    (1, 2, 4, 8), 50),
    "pretrained_conv1": ("alexnet", "conv1", "pretrained", None, "single_label", (1, 2, 4, 8),
                         (1,), 50),
    "pretrained_conv5": ("alexnet", "conv5", "pretrained", None, "single_label", (1, 2, 4, 8),
                         (1,), 50),
    "nsd_conv1_v1": ("alexnet", "conv1", "nsd", "V1", "multi_label", (0.1, 0.2, 0.4, 0.8),
                     (1,), 100),
    "nsd_fc1_vvs": ("alexnet", "fc1", "nsd", "VVS", "multi_label",
                    (0.01, 0.02, 0.04, 0.08, 0.1, 0.2), (1,), 100),
    "nsd_resnet18_block1_v1": ("resnet18", "block1", "nsd", "V1", "multi_label", (0.05,), (1,),
                               100),
    "nsd_resnet18_block4_vvs": ("resnet18", "block4", "nsd", "VVS", "multi_label", (0.05,),
                                (1,), 100),
}


@pytest.fixture(scope="module")
def paper_sweep():
    return load_sweep("paper")


def parse(*argv):
    return build_parser().parse_args(list(argv))


# --------------------------------------------------------------------------------------------
# Sweep files


def test_the_sweep_files_are_the_papers_table():
    assert list_sweeps() == sorted(COUNTS)


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_every_sweep_loads_with_the_papers_trial_count(name):
    sweep = load_sweep(name)
    mains = [c for c in sweep.conditions if c.control_of is None]
    assert sweep.name == name and sum(len(c.grid) for c in mains) == COUNTS[name]
    assert len(sweep.trials(scale="paper")) == COUNTS[name]
    assert len(sweep.trials(scale="demo")) == COUNTS[name] + CONTROLS.get(name, 0)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_grid_and_settings_are_verbatim(name):
    model, layer, reference, roi, task, alphas, betas, epochs = PAPER[name]
    cond = load_sweep(name).conditions[0]
    assert cond.name == name and cond.control_of is None
    assert (cond.model, cond.layer, cond.reference, cond.roi, cond.task, cond.metric) == (
        model, layer, reference, roi, task, "linear")
    assert cond.grid.alphas == alphas and cond.grid.betas == betas
    p = cond.paper
    assert (p.epochs, p.lr, p.batch_size, p.image_size, p.width) == (epochs, 1e-4, 1000, 224, 1.0)
    assert p.data == ("nsd" if reference == "nsd" else "imagenet")
    assert cond.demo.data == ("simulated_nsd" if reference == "nsd" else "simulated_single_label")


def test_paper_composes_every_condition(paper_sweep):
    assert [c.name for c in paper_sweep.conditions if c.control_of is None] == [
        n for n in COUNTS if n != "paper"]
    by_condition = {}
    for t in paper_sweep.trials(scale="paper"):
        by_condition[t.condition] = by_condition.get(t.condition, 0) + 1
    assert by_condition == {n: c for n, c in COUNTS.items() if n != "paper"}


def test_seeds_repeat_every_configuration(paper_sweep):
    trials = paper_sweep.trials(seeds=3, scale="paper")
    assert len(trials) == 3 * 79
    assert sorted({t.seed for t in trials}) == [0, 1, 2]
    for seed in range(3):
        assert sum(t.seed == seed for t in trials) == 79
    assert len({t.trial_id for t in trials}) == len(trials)
    with pytest.raises(ValueError, match="seeds=0"):
        paper_sweep.trials(seeds=0)


@pytest.mark.parametrize("scale", ["demo", "paper"])
def test_directions_signs_and_the_baseline(paper_sweep, scale):
    trials = paper_sweep.trials(scale=scale)
    for t in trials:
        assert t.direction in ("max", "min", "none")
        assert (t.alpha > 0) == (t.direction == "max") and (t.alpha < 0) == (t.direction == "min")
        assert t.config["alpha"] == t.alpha and t.config["beta"] == t.beta
    for cond in paper_sweep.conditions:
        if scale not in cond.scales:  # the demo's negative control
            continue
        mine = [t for t in trials if t.condition == cond.name]
        baselines = [t for t in mine if t.direction == "none"]
        assert [(t.alpha, t.beta) for t in baselines] == [(0.0, 1.0)]
        plus = sorted((t.alpha, t.beta) for t in mine if t.direction == "max")
        minus = sorted((-t.alpha, t.beta) for t in mine if t.direction == "min")
        assert plus == minus == sorted((a, b) for a in cond.grid.alphas for b in cond.grid.betas)


def test_trial_ids_are_unique_and_readable(paper_sweep):
    ids = [t.trial_id for t in paper_sweep.trials(seeds=2)]
    assert len(set(ids)) == len(ids)
    assert "nsd_conv1_v1-max-a0.4-b1-s0" in ids and "gabor_conv1-min-a8-b2-s1" in ids
    assert "nsd_fc1_vvs-none-a0-b1-s1" in ids
    pattern = re.compile(r"[a-z0-9_]+-(max|min|none)-a[0-9.]+-b[0-9.]+-s\d+")
    assert all(pattern.fullmatch(i) for i in ids)


@pytest.mark.parametrize("scale", ["demo", "paper"])
def test_every_trial_config_validates(paper_sweep, scale):
    for t in paper_sweep.trials(scale=scale):
        cfg = TrialConfig.from_dict(t.config)
        assert (cfg.alpha, cfg.beta, cfg.seed) == (t.alpha, t.beta, t.seed)
        assert cfg.threads == t.resources.threads
        if scale == "paper":
            assert (cfg.lr, cfg.batch_size, cfg.image_size, cfg.width) == (1e-4, 1000, 224, 1.0)
        else:
            assert cfg.image_size == 64 and cfg.width < 1


def test_smoke_keeps_every_direction_on_tiny_data(paper_sweep):
    trials = paper_sweep.trials(smoke=True)
    assert not [t for t in trials if t.condition.endswith("_shuffled")]  # controls: not in smoke
    for cond in (c for c in paper_sweep.conditions if c.control_of is None):
        mine = [t for t in trials if t.condition == cond.name]
        assert sorted(t.direction for t in mine) == ["max", "min", "none"]
        assert {abs(t.alpha) for t in mine if t.direction != "none"} == {max(cond.grid.alphas)}
        src = cond.data_source("demo", smoke=True)
        assert src.simulated and src.image_size == 64
    for t in trials:
        cfg = TrialConfig.from_dict(t.config)
        assert (cfg.epochs, cfg.image_size) == (1, 64) and cfg.batch_size <= 32
    with pytest.raises(ValueError, match="smoke"):
        paper_sweep.trials(scale="paper", smoke=True)


def test_the_negative_control_is_the_condition_against_a_shuffled_reference():
    """nsd_conv1_v1's [control]: the same condition, named <name>_shuffled, with
    reference_shuffle on, a baseline and +-0.8, at demo scale only; same data source, so the
    run prepares it once."""
    sweep = load_sweep("nsd_conv1_v1")
    assert not sweep.composite
    main, control = sweep.conditions
    assert (control.name, control.control_of, control.scales) == (
        "nsd_conv1_v1_shuffled", "nsd_conv1_v1", ("demo",))
    assert (control.model, control.layer, control.reference, control.roi) == (
        main.model, main.layer, main.reference, main.roi)
    assert control.grid.alphas == (0.8,) and control.grid.betas == main.grid.betas
    assert control.data_source("demo") == main.data_source("demo")
    trials = control.trials(scale="demo")
    assert [(t.direction, t.alpha) for t in trials] == [("none", 0.0), ("max", 0.8),
                                                        ("min", -0.8)]
    assert all(t.config["reference_shuffle"] is True for t in trials)
    assert all("reference_shuffle" not in t.config for t in main.trials(scale="demo"))
    assert control.trials(scale="paper") == [] and control.trials(smoke=True) == []
    assert [t.trial_id for t in trials][0] == "nsd_conv1_v1_shuffled-none-a0-b1-s0"


@pytest.mark.parametrize("table, match", [
    ("[control]\nalphas = [-0.8]\n", r"alphas=\[-0.8\] in \[control\]"),
    ("[control]\nalphas = [0.8]\nscales = [\"tiny\"]\n", r"scales=\['tiny'\] in \[control\]"),
    ("[control]\nalphas = [0.8]\nbetas = [1]\n", r"unknown key 'betas' in \[control\]"),
    ("[control]\nscales = [\"demo\"]\n", r"alphas"),
])
def test_a_malformed_control_names_the_file_and_the_key(tmp_path, table, match):
    folder = tmp_path / "conditions"
    shutil.copytree(SWEEP_DIR, folder)
    path = folder / "pretrained_conv1.toml"  # a condition without a control of its own
    text = path.read_text()
    path.write_text(text.replace("[demo]", table + "\n[demo]", 1))
    with pytest.raises(SweepFileError, match=match) as info:
        load_sweep("pretrained_conv1", folder)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_the_optuna_dry_run_counts_each_conditions_baseline():
    """Regression: --search optuna launches per condition its baseline and N samples; the
    dry run said N per condition (one baseline short each)."""
    plan = make_plan(parse("paper", "--search", "optuna", "--num-samples", "4"))
    assert plan.n_trials == (4 + 1) * len(plan.conditions)
    proc = run_cli("nsd_conv1_v1", "--search", "optuna", "--num-samples", "4", "--dry-run")
    # its negative control is left out: the sampler draws the condition's alphas afresh, so
    # the control's would never meet one to compare (it had sampled the control on its own)
    assert proc.stdout.strip().splitlines()[-1] == "5 trials", proc.stdout  # 1 + 4
    assert "left out: nsd_conv1_v1_shuffled (a negative control runs with --search grid " \
        "only" in proc.stdout, proc.stdout
    plan = make_plan(parse("nsd_conv1_v1", "--search", "optuna", "--num-samples", "4"))
    assert plan.conditions == ("nsd_conv1_v1",) and plan.left_out == ("nsd_conv1_v1_shuffled",)
    assert {t.condition for t in plan.trials} == {"nsd_conv1_v1"}
    proc = run_cli("nsd_conv1_v1", "--smoke-test",
                   "--search", "optuna", "--num-samples", "4", "--dry-run")
    assert "smoke test on tiny simulated data: 5 trials per condition" in proc.stdout, \
        proc.stdout  # it said 3, the grid's smoke count
    # the beta the samples train at, not the grid's list (it had said "beta in {1, 2, 4, 8}"
    # for gabor_conv1, whose samples all train at 1)
    proc = run_cli("gabor_conv1", "--search", "optuna", "--num-samples", "3", "--dry-run")
    # (it said "the first 2 and 2 at random" of sides of 2 and 1 samples)
    assert ("gabor_conv1: 3 samples (2 promoting, 1 suppressing; all at random: too few for "
            "TPE to model), alpha = +-[1, 8] log-uniform, beta = 1 (the grid's first), "
            "cpus 1, gpus 0") in proc.stdout.splitlines(), proc.stdout
    proc = run_cli("gabor_conv1", "--search", "optuna", "--num-samples", "20", "--dry-run")
    assert ("gabor_conv1: 20 samples (10 promoting, 10 suppressing; the first 3 and 3 at "
            "random, the rest by TPE), alpha = +-[1, 8] log-uniform, beta = 1 (the grid's "
            "first), cpus 1, gpus 0") in proc.stdout.splitlines(), proc.stdout


def test_each_side_of_an_optuna_search_adapts_after_its_random_start():
    """NSGA-II drew every side at random: the same alphas as a random sampler of that seed,
    whatever the trials scored (its generations were 50, and its mutation redraws the one
    parameter in every child). A side now draws a quarter of its samples at random, and
    the rest where the finished trials' scores point."""
    import optuna

    from sweeps.plan import optuna_startup
    from sweeps.search import optuna_sampler

    assert [optuna_startup(n) for n in (1, 2, 8, 9, 16, 400)] == [2, 2, 2, 3, 4, 100]
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def alphas(sampler, n=16) -> list[float]:
        # the promoting side's two objectives on a toy front: performance falls and
        # alignment rises with |alpha|
        study = optuna.create_study(directions=["maximize", "maximize"], sampler=sampler)
        study.optimize(lambda t: (-t.suggest_float("a", 0.1, 0.8, log=True) ** 2,
                                  t.params["a"] if "a" in t.params else 0.0), n_trials=n)
        return [t.params["a"] for t in study.trials]

    adaptive = alphas(optuna_sampler(16, seed=0))
    drawn = alphas(optuna.samplers.RandomSampler(seed=0))
    first = optuna_startup(16)
    assert adaptive[:first] == drawn[:first]  # the start: the random draw
    assert adaptive[first:] != drawn[first:]  # then: where the scores point


def test_the_optuna_searcher_runs_every_side_at_once_and_models_only_finished_trials():
    """The search is one Tune experiment (it was one per condition and side, run one after
    another, most of a cluster idle while a side's last trials ran): the searcher hands out
    every baseline, then each condition's sides in turn, within each side's |alpha| range,
    and tells each side's study only its own trials; an errored trial or one without finite
    scores is a failure the sampler leaves out."""
    import optuna
    from ray.tune.search import Searcher

    from sweeps.plan import optuna_bounds
    from sweeps.search import SideSearch

    plan = make_plan(parse("paper", "--search", "optuna", "--num-samples", "3"))
    search = SideSearch(plan)
    n = len(plan.conditions)
    assert plan.n_trials == 4 * n  # Tune's num_samples: what the searcher hands out
    configs = [search.suggest(f"t{i}") for i in range(plan.n_trials)]
    assert search.suggest("one-more") == Searcher.FINISHED
    baselines = [t.trial_id for t in plan.trials if t.direction == "none"]
    assert configs[:n] == [{"trial_id": b} for b in baselines]
    by_id = {t.trial_id: t for t in plan.trials}
    sides = [(by_id[c["trial_id"]].condition, by_id[c["trial_id"]].direction)
             for c in configs[n:]]
    # one sample from each side in turn: every side had one before any had a second
    order = [(c, d) for c in plan.conditions for d in ("max", "min")]
    assert sides[:2 * n] == order
    assert sides[2 * n:] == [(c, "max") for c in plan.conditions]  # the odd third: promoting
    for c in configs[n:]:
        lo, hi, _ = optuna_bounds(plan.spec.condition(by_id[c["trial_id"]].condition)
                                  .grid.alphas)
        assert lo <= c["alpha_mag"] <= hi
    # the first condition's promoting side: its two samples are t{n} and t{3n}
    first = search._sides[0]["study"]
    search.on_trial_complete(f"t{n}", {"val_performance": 0.5, "val_alignment": 0.3})
    search.on_trial_complete(f"t{3 * n}", {"val_performance": float("nan"),
                                           "val_alignment": 0.3})
    search.on_trial_complete(f"t{n + 1}", None, error=True)  # its suppressing side
    search.on_trial_complete(baselines[0], {"val_performance": 0.9})  # not a sample: ignored
    states = [t.state for t in first.trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]
    assert first.trials[0].values == [0.5, 0.3]
    assert [t.state for t in search._sides[1]["study"].trials] == [
        optuna.trial.TrialState.FAIL]
    assert search._sides[1]["study"].directions[1] == optuna.study.StudyDirection.MINIMIZE


def test_a_restored_optuna_search_draws_what_the_uninterrupted_one_draws(tmp_path):
    """A search could not be resumed: its searcher saved nothing, so `--resume` was refused
    and an interrupted search was run again from its first trial. Its state now goes with
    Tune's: a searcher restored from it hands out the same samples as one never stopped,
    its studies knowing every trial told before; a trial that errored (told as failed) and
    that the resume ran again is told with its scores when it finishes."""
    import optuna

    from sweeps.search import SideSearch

    plan = make_plan(parse("paper", "--search", "optuna", "--num-samples", "6"))
    n = len(plan.conditions)

    def scores(config: dict) -> dict:  # a toy front: performance falls with |alpha|
        a = config["alpha_mag"]
        return {"val_performance": 1 - a / 100, "val_alignment": a / 10}

    def run(search: SideSearch, ids: range, configs: dict, unfinished=()) -> None:
        for i in ids:
            configs[f"t{i}"] = search.suggest(f"t{i}")
        for i in ids:
            if "alpha_mag" in configs[f"t{i}"] and i not in unfinished:
                search.on_trial_complete(f"t{i}", scores(configs[f"t{i}"]))

    whole, configs = SideSearch(plan), {}
    # the first sample errors; the last two are still running when the search stops
    run(whole, range(3 * n), configs, unfinished=(n, 3 * n - 2, 3 * n - 1))
    whole.on_trial_complete(f"t{n}", None, error=True)
    whole.save(str(tmp_path / "searcher.pkl"))
    again = SideSearch(plan)
    again.restore(str(tmp_path / "searcher.pkl"))
    rest, rest_again = {}, {}
    for search, drawn in ((whole, rest), (again, rest_again)):
        for i in (3 * n - 2, 3 * n - 1):  # the resume ran them on from their checkpoints
            search.on_trial_complete(f"t{i}", scores(configs[f"t{i}"]))
        run(search, range(3 * n, plan.n_trials), drawn)
    assert rest_again == rest and len(rest) == plan.n_trials - 3 * n
    assert [c["alpha_mag"] for c in rest.values()] != [c["alpha_mag"] for c in
                                                       list(configs.values())[n:3 * n]]
    for side, side_again in zip(whole._sides, again._sides):
        assert [(t.state, t.values) for t in side_again["study"].trials] == \
            [(t.state, t.values) for t in side["study"].trials]
    # the errored sample, run again by the resume, finishes: its scores reach its study
    study = again._sides[0]["study"]
    (failed,) = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    again.on_trial_complete(f"t{n}", scores(configs[f"t{n}"]))
    last = study.trials[-1]
    assert last.state == optuna.trial.TrialState.COMPLETE
    assert last.params == {"alpha_mag": configs[f"t{n}"]["alpha_mag"]} == failed.params
    assert last.values == list(scores(configs[f"t{n}"]).values())


def test_the_optuna_dry_run_of_a_one_point_grid_and_a_control_that_does_not_run():
    """A one-point grid is searched from a/4 to 4a (the range the search uses, from the one
    helper both call); a sweep whose [control] does not run at this scale (the smoke test)
    is planned, not a KeyError."""
    from sweeps.plan import optuna_bounds, optuna_split

    assert optuna_bounds([2.0]) == (0.5, 8.0, True)
    assert optuna_bounds([0.5, 8.0, 2.0]) == (0.5, 8.0, False)
    assert optuna_split(5) == {"max": 3, "min": 2}
    proc = run_cli("nsd_conv1_v1", "--smoke-test",
                   "--search", "optuna", "--num-samples", "2", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert [line.split(":")[0] for line in proc.stdout.splitlines()
            if " samples (" in line] == ["nsd_conv1_v1"]
    one_point = make_plan(parse("nsd_resnet18_block1_v1"))
    alphas = one_point.spec.condition("nsd_resnet18_block1_v1").grid.alphas
    assert len(alphas) == 1
    proc = run_cli("nsd_resnet18_block1_v1", "--search", "optuna", "--num-samples", "2",
                   "--dry-run")
    a = fmt_number(alphas[0])
    assert (f"alpha = +-[{fmt_number(alphas[0] / 4)}, {fmt_number(alphas[0] * 4)}] log-uniform "
            f"(around the grid's one alpha {a}: a/4 to 4a)") in proc.stdout, proc.stdout


def test_a_sweep_file_that_is_a_folder_is_one_error(tmp_path):
    (tmp_path / "odd.toml").mkdir()
    with pytest.raises(SweepFileError, match=r"odd.toml: a folder, not a sweep file"):
        load_sweep("odd", tmp_path)


def test_a_sweep_file_that_is_a_fifo_is_one_error_not_a_wait(tmp_path):
    """A FIFO named like a sweep file hung --list --sweep-dir, waiting for a writer."""
    os.mkfifo(tmp_path / "pipe.toml")
    with pytest.raises(SweepFileError, match=r"pipe.toml: not a regular file \(a FIFO, socket "
                                             r"or device\); accepted: a TOML file"):
        load_sweep("pipe", tmp_path)


def test_a_description_is_one_line_of_text(tmp_path):
    """A description with a line break, a tab and an escape sequence was printed raw by
    --list: across two lines, recolouring the terminal."""
    body = (REPO / "sweeps" / "conditions" / "nsd_conv1_v1.toml").read_text().replace(
        'description = "AlexNet conv1 vs NSD V1; COCO-80 multi-label on NSD images"', "@D@")
    (tmp_path / "multi.toml").write_text(body.replace(
        "@D@", 'description = """line one\n\tline two"""'))
    (tmp_path / "esc.toml").write_text(body.replace(
        "@D@", 'description = "red \\u001b[31m text"'))
    assert load_sweep("multi", tmp_path, check_configs=False).description == \
        "line one line two"
    with pytest.raises(SweepFileError, match=r"esc\.toml: the description holds the control "
                                             r"character U\+001B; accepted: text"):
        load_sweep("esc", tmp_path, check_configs=False)


def test_a_control_named_as_another_included_condition_is_said_so(tmp_path):
    """A composite of ctrl_ok (with a [control], so ctrl_ok_shuffled) and a file called
    ctrl_ok_shuffled.toml was refused as 'includes a condition twice', which it did not."""
    text = (REPO / "sweeps" / "conditions" / "nsd_conv1_v1.toml").read_text()
    (tmp_path / "ctrl_ok.toml").write_text(text)
    head, control = text.split("\n[control]")
    (tmp_path / "ctrl_ok_shuffled.toml").write_text(
        head + "\n[demo]" + control.split("\n[demo]", 1)[1])
    (tmp_path / "comp.toml").write_text('includes = ["ctrl_ok", "ctrl_ok_shuffled"]\n')
    (tmp_path / "twice.toml").write_text('includes = ["ctrl_ok", "ctrl_ok"]\n')
    with pytest.raises(SweepFileError, match=(
            r"comp\.toml: ctrl_ok's \[control\] is the condition ctrl_ok_shuffled, and "
            r"ctrl_ok_shuffled\.toml is included too; accepted: one of them")):
        load_sweep("comp", tmp_path, check_configs=False)
    with pytest.raises(SweepFileError, match=r"twice\.toml: includes a condition twice"):
        load_sweep("twice", tmp_path, check_configs=False)


def test_unknown_sweep_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown sweep 'nope'; known: gabor_conv1, "):
        load_sweep("nope")


@pytest.mark.parametrize("edit, match", [
    (lambda s: s.replace('metric = "linear"', 'metric = "linear"\ncolour = "red"'),
     r"unknown key 'colour'"),
    (lambda s: s.replace("[demo]\n", "[demo]\nepochz = 3\n"), r"unknown key 'epochz' in \[demo\]"),
    (lambda s: s.replace("betas = [1]", "betas = [1]\ngamma = [2]"),
     r"unknown key 'gamma' in \[grid\]"),
    (lambda s: s.replace("alphas = [0.1,", "alphas = [-0.1,"), r"alphas=\[-0.1"),
    # a top-level key is named as the file's, not as its first scale table's ("[paper]")
    (lambda s: s.replace('layer = "conv1"', 'layer = "conv9"'),
     r"nsd_conv1_v1.toml: layer='conv9'; accepted: for alexnet: conv1"),
    (lambda s: s.replace('metric = "linear"', 'metric = "cka2"'),
     r"nsd_conv1_v1.toml: metric='cka2'; accepted: cka, linear, rsa"),
    (lambda s: s.replace("n_images = 1000", "n_imagez = 1000"),
     r"unknown key 'n_imagez' in \[demo.data_kwargs\]"),
    (lambda s: s.replace("gpus = 0.25", "gpus = -1"), r"gpus=-1"),
    (lambda s: s.replace("trial = { rectify = true }", "trial = { rectify = true, epochs = 3 }",
                         1), r"trial.epochs"),
    (lambda s: s.replace('roi = "V1"', 'roi = "V4"'), r"roi='V4'"),
    # NSD data is prepared per ROI whatever the reference: a Gabor bank on NSD's images was
    # refused with a roi, and without one failed after Ray had started ("unknown ROI None")
    (lambda s: s.replace('reference = "nsd"', 'reference = "gabor"').replace('roi = "V1"\n', ""),
     r"nsd_conv1_v1.toml: missing key 'roi' \(data='nsd' in \[paper\] is prepared per ROI, "
     r"whichever the reference\)"),
    (lambda s: s.replace("[grid]", "[grid"), r"not valid TOML"),
    (lambda s: s.replace("n_images = 1000", 'n_images = "1000"'),
     r"n_images='1000' in \[demo.data_kwargs\]; accepted: an integer"),
    (lambda s: s.replace("n_images = 1000", "n_images = 10000000000"),
     r"\[demo.data_kwargs\]: n_images=10000000000; accepted: an integer in 10..1000000"),
    (lambda s: s.replace("epochs = 25", "epochs = 9223372036854775807"),
     r"epochs=9223372036854775807; accepted: an integer in 1..100000"),
    (lambda s: s.replace('lr = 2e-3', 'lr = "0.002"'), r"lr='0.002'; accepted: a number"),
    (lambda s: s.replace("alphas = [0.1,", "alphas = [0.10000000001, 0.1,"),
     r"alphas 0.10000000001 and 0.1 in \[grid\] are the same to 10 significant digits"),
    (lambda s: s.replace("betas = [1]", "betas = [1, 1e9]"),
     r"\[grid\] betas: beta=1000000000.0; accepted"),
    (lambda s: s.replace("repeats = 3, seed = 0", "repeats = 3, seed = -1"),
     r"\[demo.data_kwargs\]: seed=-1; accepted: an integer in 0..4294967295"),
    # the bundle builder's keys, checked as the generator's are (they passed the dry run and
    # failed after Ray had started, exit 1; render_size was named as image_size)
    (lambda s: s.replace("repeats = 3, seed = 0", "repeats = 3, seed = 0, render_size = 0"),
     r"\[demo.data_kwargs\]: render_size=0; accepted: an integer in 16..1024"),
    (lambda s: s.replace("repeats = 3, seed = 0", "repeats = 3, seed = 0, split_seed = -1"),
     r"\[demo.data_kwargs\]: split_seed=-1; accepted: an integer in 0..4294967295"),
    # a value of the grid is named as the grid's, not as a scale's table
    (lambda s: s.replace("alphas = [0.1, 0.2, 0.4, 0.8]", "alphas = [0.1, 0.2, 0.4, 0.8, 1e300]"),
     r"\[grid\] alphas: alpha=1e\+300; accepted"),
    # a control is read beside its condition at the same alpha: one the grid lacks is never
    # compared (it was run, and silently missing from the effects)
    (lambda s: s.replace("alphas = [0.8]", "alphas = [5.0]"),
     r"alphas=\[5\] in \[control\] are not alphas of \[grid\] \(0.1, 0.2, 0.4, 0.8\)"),
    # a number out of float64's range read as 0.0 or inf, and the refusal named that
    (lambda s: s.replace("lr = 2e-3", "lr = 2e-400"),
     r"nsd_conv1_v1.toml: the number 2e-400 is too small for a float64 and reads as 0\.0; "
     r"accepted: a number of magnitude 5e-324 or more, or 0"),
    (lambda s: s.replace("lr = 2e-3", "lr = -1_0e400"),
     r"the number -1_0e400 is too large for a float64 and reads as -inf; accepted: a number "
     r"of magnitude below 1\.8e308"),
    (lambda s: s.replace("cpus = 4, gpus = 0.25", "cpus = 1e9, gpus = 0.25"),
     r"cpus=1000000000.0; accepted: a number from 0 to 1024 \(in \[paper.resources\]\)"),
])
def test_a_malformed_sweep_file_names_the_file_and_the_key(tmp_path, edit, match):
    folder = tmp_path / "conditions"
    shutil.copytree(SWEEP_DIR, folder)
    path = folder / "nsd_conv1_v1.toml"
    path.write_text(edit(path.read_text()))
    with pytest.raises(SweepFileError, match=match) as info:
        load_sweep("nsd_conv1_v1", folder)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(SweepFileError, match=match):  # and through the composite
        load_sweep("paper", folder)


def test_an_image_reference_on_nsd_data_reads_the_rois_table_and_a_roi_needs_nsd_data(tmp_path):
    """A Gabor bank (or a pretrained network) aligned on NSD's images and COCO labels: the
    condition names the ROI whose prepared table it reads (its voxel responses unused); a
    roi on a condition without NSD data is refused, naming what takes one."""
    folder = tmp_path / "conditions"
    shutil.copytree(SWEEP_DIR, folder)
    path = folder / "nsd_conv1_v1.toml"
    text = path.read_text().replace('reference = "nsd"', 'reference = "gabor"')
    path.write_text(text.replace("trial = { rectify = true }", "trial = { }")
                    .replace("trial = { rectify = true, pool = 8 }", "trial = { pool = 8 }"))
    cond = load_sweep("nsd_conv1_v1", folder).conditions[0]
    assert (cond.reference, cond.roi, cond.demo.data) == ("gabor", "V1", "simulated_nsd")
    gabor = folder / "gabor_conv1.toml"
    gabor.write_text(gabor.read_text().replace('reference = "gabor"',
                                               'reference = "gabor"\nroi = "V1"'))
    with pytest.raises(SweepFileError, match=r"gabor_conv1.toml: roi='V1' but no scale's data "
                                             r"has voxel responses; accepted: roi only with NSD "
                                             r"data"):
        load_sweep("gabor_conv1", folder)


# --------------------------------------------------------------------------------------------
# The plan


def test_plan_of_a_demo_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    plan = make_plan(parse("nsd_conv1_v1"))
    assert (plan.scale, plan.smoke, plan.search, plan.address, plan.resume) == (
        "demo", False, "grid", None, False)
    assert plan.data_description == "demo scale on the simulated world (no real data configured)"
    assert plan.data["nsd_conv1_v1"].kind == "simulated_nsd"
    assert plan.data["nsd_conv1_v1"].roi == "V1"
    assert plan.mlflow_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert plan.storage == str(tmp_path / "ray_results")
    assert plan.experiment == "nsd_conv1_v1-demo" and plan.n_trials == 9 + 3  # + control
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlflow.db").exists()


def test_cli_overrides_resources_and_env_sets_mlflow(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    plan = make_plan(parse("paper", "--gpus-per-trial", "0.25", "--cpus-per-trial", "2",
                           "--seeds", "2"))
    assert plan.mlflow_uri == "http://tracking.example:5000"
    assert len(plan.trials) == 2 * (79 + 3)  # two seeds, with the demo's control
    assert {(t.resources.cpus, t.resources.gpus) for t in plan.trials} == {(2.0, 0.25)}
    assert {t.config["threads"] for t in plan.trials} == {2}
    assert set(plan.resources) == set(plan.conditions)
    plan = make_plan(parse("nsd_conv1_v1", "--cpus-per-trial", "1.5"))  # CPUs split freely
    assert {(t.resources.cpus, t.config["threads"]) for t in plan.trials} == {(1.5, 1)}


def test_plan_of_a_smoke_test():
    plan = make_plan(parse("paper", "--smoke-test"))
    assert (plan.scale, plan.smoke, plan.experiment, len(plan.trials)) == (
        "demo", True, "paper-smoke", 21)
    assert plan.data_description.startswith("smoke test on tiny simulated data: 3 trials")
    assert {src.kind for src in plan.data.values()} == {"simulated_single_label",
                                                        "simulated_nsd"}
    assert len(set(plan.data.values())) == 3  # single-label, NSD-like V1, NSD-like VVS
    assert {t.config["epochs"] for t in plan.trials} == {1}


@pytest.mark.parametrize("argv, match", [
    (["nope"], r"unknown sweep 'nope'; known: gabor_conv1, nsd_conv1_v1, "),
    # a lab's own file given as its path, or a sweep with its extension
    (["my sweeps/vgg test.toml"], r"unknown sweep 'my sweeps/vgg test.toml': a sweep is named "
     r"by its file's name without \.toml, in sweeps/conditions or the folder --sweep-dir "
     r"gives; for this file: --sweep-dir 'my sweeps' 'vgg test'$"),
    (["nsd_conv1_v1.toml"], r"unknown sweep 'nsd_conv1_v1.toml': a sweep is named without "
     r"\.toml: nsd_conv1_v1$"),
    ([], r"no sweep given; known: gabor_conv1"),
    (["nsd_conv1_v1", "--gpus-per-trial", "-1"], r"--gpus-per-trial='-1'; accepted: a number >= 0"),
    (["nsd_conv1_v1", "--cpus-per-trial", "abc"], r"--cpus-per-trial='abc'; accepted: a number"),
    (["nsd_conv1_v1", "--gpus-per-trial", "1.5"], r"--gpus-per-trial='1.5'; accepted: a fraction"),
    (["nsd_conv1_v1", "--gpus-per-trial", "nan"], r"--gpus-per-trial='nan'"),
    (["nsd_conv1_v1", "--cpus-per-trial", "0.00001"], r"at least 0.0001"),
    (["nsd_conv1_v1", "--seeds", "0"], r"--seeds 0; accepted: an integer in 1\.\.1000"),
    (["nsd_conv1_v1", "--seeds", "1000000"], r"--seeds 1000000; accepted: an integer in 1\.\."),
    (["nsd_conv1_v1", "--search", "optuna", "--num-samples", "1000000000000"],
     r"--num-samples 1000000000000; accepted: an integer in 2\.\.100000"),
    (["nsd_conv1_v1", "--search", "optuna", "--num-samples", "1"],
     r"--num-samples 1; accepted: an integer in 2\.\.100000 \(split between the promoting "
     r"and the suppressing side: 1 would sample only the promoting one\)"),
    (["nsd_conv1_v1", "--set", "loader_workers=1000000000000"],
     r"loader_workers=1000000000000; accepted: -1 \(from the CPU share\) or an integer in"),
    (["nsd_conv1_v1", "--set", "loss_folds=1000000000000"],
     r"loss_folds=1000000000000; accepted: 0 \(exact leave-one-out\) or an integer in "
     r"2\.\.batch_size/2 = 16"),
    (["nsd_conv1_v1", "--mlflow-uri", "http://[::1"], r"--mlflow-uri 'http://\[::1': not a URI "
     r"\(Invalid IPv6 URL\); accepted: sqlite"),
    (["nsd_conv1_v1", "--data", "nsd", "--nsd-root", "/no/such/nsd", "--coco-annotations",
      "/no/such/coco"], r"--nsd-root /no/such/nsd: no such directory"),
    (["nsd_conv1_v1", "--data", "nsd"], r"--nsd-root DIR is required"),
    (["gabor_conv1", "--data", "imagenet", "--imagenet-root", "/no/such/imagenet"],
     r"--imagenet-root /no/such/imagenet: no such directory"),
    (["gabor_conv1", "--data", "nsd"], r"condition gabor_conv1 .* trains on imagenet"),
    (["gabor_conv1", "--data", "imagenet", "--imagenet-root", ""],
     r"--imagenet-root '': an empty path; accepted: a directory"),
    (["nsd_conv1_v1", "--data", "nsd", "--nsd-root", " ", "--coco-annotations", "/tmp"],
     r"--nsd-root ' ': an empty path; accepted: a directory"),
    (["paper", "--data", "nsd"], r"accepted: --data paper"),
    (["nsd_conv1_v1", "--nsd-root", "/tmp"], r"--nsd-root is given but --data is demo"),
    (["nsd_conv1_v1", "--subject", "2"], r"--subject with --data demo"),
    (["nsd_conv1_v1", "--smoke-test", "--data", "nsd"], r"--smoke-test with --data nsd"),
    (["nsd_conv1_v1", "--address", "nohost"], r"--address 'nohost'; accepted: auto, HOST:PORT"),
    (["nsd_conv1_v1", "--address", "head:99999"], r"--address 'head:99999'"),
    (["nsd_conv1_v1", "--mlflow-uri", "mlflow.db"], r"a bare path is not a tracking URI"),
    (["nsd_conv1_v1", "--mlflow-uri", "sqlite:////no/such/dir/m.db"],
     r"folder /no/such/dir does not exist"),
    (["nsd_conv1_v1", "--mlflow-uri", "http://host:port"], r"port is not a number"),
    (["nsd_conv1_v1", "--mlflow-uri", "ftp://host/x"], r"unsupported scheme 'ftp'"),
    (["nsd_conv1_v1", "--search", "optuna"], r"--search optuna needs --num-samples"),
    (["nsd_conv1_v1", "--num-samples", "4"], r"--num-samples 4 with --search grid"),
    (["nsd_conv1_v1", "--search", "optuna", "--num-samples", "4", "--seeds", "2"],
     r"--seeds 2 with --search optuna"),
    (["nsd_conv1_v1", "--set", "lr"], r"--set 'lr'; accepted: KEY=VALUE"),
    (["nsd_conv1_v1", "--set", "lerning_rate=1"], r"--set lerning_rate: unknown trial setting"),
    (["nsd_conv1_v1", "--set", "alpha=2"], r"--set alpha: alpha is set by the sweep's grid"),
    # the condition's name and report said linear while every trial trained on CKA
    (["nsd_conv1_v1", "--set", "metric=cka"],
     r"--set metric: metric is set by the sweep's grid and condition; accepted keys: "),
    (["nsd_conv1_v1", "--set", "threads=2"], r"threads follows --cpus-per-trial"),
    (["nsd_conv1_v1", "--set", "lr=\"0.001\""], r"--set: lr='0.001'; accepted: a number"),
    # read as 0.0, the refusal named 0.0, which nobody typed
    (["nsd_conv1_v1", "--set", "lr=1e-400"],
     r"--set 'lr=1e-400': 1e-400 is too small for a float64 and reads as 0\.0; accepted: a "),
    # read as inf, the refusal named inf
    (["nsd_conv1_v1", "--set", "lr=1e400"],
     r"--set 'lr=1e400': 1e400 is too large for a float64 and reads as inf; accepted: a "),
    (["nsd_conv1_v1", "--set", "lr=.1e-400"], r"--set 'lr=\.1e-400': \.1e-400 is too small"),
    (["nsd_conv1_v1", "--set", "epochs=0"], r"--set: epochs=0; accepted: an integer in 1..100000"),
    (["nsd_conv1_v1", "--set", "epochs=9223372036854775807"],
     r"--set: epochs=9223372036854775807; accepted: an integer in 1..100000"),
    (["nsd_conv1_v1", "--set", "batch_size=1000000000000"], r"batch_size=1000000000000; accepted"),
    (["nsd_conv1_v1", "--set", "image_size=100000"], r"image_size=100000; accepted: an integer in"),
    # the trial used to fail at its first forward pass, three times (Tune's retries)
    (["gabor_conv1", "--set", "image_size=32"],
     r"--set: image_size=32; accepted: an integer in 63\.\.4096 for alexnet \(its smallest"),
    (["nsd_conv1_v1", "--storage", "s3://bucket/x"], r"s3:// storage is not supported"),
    # the working folder, and a folder literally named "file:relative", were used before
    (["nsd_conv1_v1", "--storage", ""], r"--storage '': an empty path; accepted: a folder"),
    (["nsd_conv1_v1", "--storage", "file:relative"],
     r"--storage file:relative: a file URI is file:///ABSOLUTE/PATH; accepted: that, or a"),
    (["nsd_conv1_v1", "--set", "rectify=yes"], r"rectify='yes'; accepted: true or false"),
    (["nsd_conv1_v1", "--set", "epochs=1", "--set", "epochs=2"], r"--set epochs given twice"),
    (["nsd_conv1_v1", "--only", "gabor*"], r"--only 'gabor\*' matches no trial; trial ids"),
    (["nsd_conv1_v1", "--only", "x", "--search", "optuna", "--num-samples", "2"],
     r"--only with --search optuna"),
    # the search leaves the control out: the refusal said it "runs as ..._shuffled"
    (["nsd_conv1_v1", "--search", "optuna", "--num-samples", "2", "--set",
      "reference_shuffle=true"],
     r"no \[control\] \(a grid search runs it as nsd_conv1_v1_shuffled; --search optuna "
     r"leaves it out\)$"),
    # the grid's cap applies to a search too (700,007 trials were accepted)
    (["paper", "--search", "optuna", "--num-samples", "100000"],
     r"^--num-samples 100000 over 7 condition\(s\) plans 700007 trials \(with the baselines\); "
     r"accepted: at most 10000 in one invocation$"),
])
def test_plan_errors_name_the_value(argv, match):
    with pytest.raises(UsageError, match=match) as info:
        make_plan(parse(*argv))
    assert "\n" not in str(info.value)


def test_the_smoke_tests_description_says_what_its_trials_run():
    """It said "1 epoch each" whatever --set epochs said, and "2 trials per condition" for a
    run whose --only left conditions 3 and 1 (the text is the parent run's data_description
    tag and the report's)."""
    plan = make_plan(parse("nsd_conv1_v1", "--smoke-test", "--set", "epochs=3"))
    assert plan.data_description == ("smoke test on tiny simulated data: 3 trials per "
                                      "condition, 3 epochs each (demo scale)")
    plan = make_plan(parse("paper", "--smoke-test", "--only", "gabor*", "--only",
                           "nsd_conv1_v1-none*"))
    assert plan.data_description == ("smoke test on tiny simulated data: 4 trials over 2 "
                                      "conditions, 1 epoch each (demo scale)")


def test_settings_are_checked_on_the_trials_only_chooses_and_name_their_condition():
    """--set voxel_ncsnr_min for the NSD conditions of the paper sweep, or a 32 px image for
    its ResNet-18 ones, was refused because of conditions --only leaves out, in a message
    naming none."""
    plan = make_plan(parse("paper", "--only", "nsd_*", "--set", "voxel_ncsnr_min=0.2"))
    assert plan.trials and {t.config["voxel_ncsnr_min"] for t in plan.trials} == {0.2}
    assert {t.condition for t in plan.trials} == {
        "nsd_conv1_v1", "nsd_conv1_v1_shuffled", "nsd_fc1_vvs", "nsd_resnet18_block1_v1",
        "nsd_resnet18_block4_vvs"}
    plan = make_plan(parse("paper", "--only", "nsd_resnet18*", "--set", "image_size=32"))
    assert {t.config["image_size"] for t in plan.trials} == {32}
    with pytest.raises(UsageError, match=r"^--set: voxel_ncsnr_min=0\.2; accepted: 0 with "
                                         r"reference='gabor' .* \(condition gabor_conv1\)$"):
        make_plan(parse("paper", "--set", "voxel_ncsnr_min=0.2"))


def test_resume_needs_an_experiment_to_resume(tmp_path):
    with pytest.raises(UsageError, match="--resume: nothing to resume"):
        make_plan(parse("nsd_conv1_v1", "--resume", "--storage", str(tmp_path)))
    pointer = tmp_path / "nsd_conv1_v1-demo.latest"
    pointer.write_text("nsd_conv1_v1-demo_20260101-000000")
    (tmp_path / "nsd_conv1_v1-demo_20260101-000000").mkdir()  # (a missing one is refused)
    plan = make_plan(parse("nsd_conv1_v1", "--resume", "--storage", str(tmp_path)))
    assert plan.resume and plan.resume_pointer == str(pointer)
    with pytest.raises(UsageError, match="nothing to resume"):  # the smoke test is apart
        make_plan(parse("nsd_conv1_v1", "--smoke-test", "--resume", "--storage", str(tmp_path)))
    # an adaptive search resumes its own latest run, never a grid run (nor one a grid run)
    search = ("--search", "optuna", "--num-samples", "4")
    with pytest.raises(UsageError, match=(
            r"^--resume: nothing to resume, no earlier search of nsd_conv1_v1-demo under .* "
            r"\(no nsd_conv1_v1-demo\.optuna\.latest; nsd_conv1_v1-demo\.latest is there: a "
            r"grid run resumes without --search; run without --resume first, or give the "
            r"--storage and --search it used\)$")):
        make_plan(parse("nsd_conv1_v1", *search, "--resume", "--storage", str(tmp_path)))
    # the .latest of an older version's search (one pointer for both kinds; searches could
    # not be resumed): "a grid run resumes without --search" sent the user to a refusal
    # over --search, which sent them back
    (tmp_path / "nsd_conv1_v1-demo_20260101-000000" / "sweep_fingerprint.json").write_text(
        json.dumps({"sweep": "nsd_conv1_v1", "search": "optuna"}))
    with pytest.raises(UsageError, match=(
            r"^--resume: nothing to resume, no earlier search of nsd_conv1_v1-demo under .* "
            r"that can be resumed \(nsd_conv1_v1-demo\.latest names an adaptive search "
            r"started by an older version, which cannot be resumed\); accepted: a new run "
            r"without --resume$")):
        make_plan(parse("nsd_conv1_v1", *search, "--resume", "--storage", str(tmp_path)))
    (tmp_path / "nsd_conv1_v1-demo_20260101-000000" / "sweep_fingerprint.json").unlink()
    (tmp_path / "nsd_conv1_v1-demo.optuna.latest").write_text("nsd_conv1_v1-demo_20260101-000001")
    (tmp_path / "nsd_conv1_v1-demo_20260101-000001").mkdir()
    plan = make_plan(parse("nsd_conv1_v1", *search, "--resume", "--storage", str(tmp_path)))
    assert plan.resume_pointer == str(tmp_path / "nsd_conv1_v1-demo.optuna.latest")
    assert make_plan(parse("nsd_conv1_v1", "--resume", "--storage", str(tmp_path))
                     ).resume_pointer == str(pointer)
    pointer.unlink()  # a grid --resume where only a search ran: said, not guessed
    with pytest.raises(UsageError, match=(
            r"^--resume: nothing to resume, no earlier run of nsd_conv1_v1-demo under .* \(no "
            r"nsd_conv1_v1-demo\.latest; nsd_conv1_v1-demo\.optuna\.latest is there: an "
            r"adaptive search resumes with its --search optuna --num-samples N; run without "
            r"--resume first, or give the --storage it used\)$")):
        make_plan(parse("nsd_conv1_v1", "--resume", "--storage", str(tmp_path)))


def test_a_resume_with_damaged_run_records_is_refused_before_the_parent_reopens(tmp_path):
    """A truncated manifest (or parent file) used to reopen the finished parent run as
    RUNNING, then fail with an unnamed JSONDecodeError, leaving it RUNNING for good; a
    truncated fingerprint failed unnamed too. Each is one line naming the file, and the
    parent run is left as it was."""
    import dataclasses
    import json

    from mlflow.tracking import MlflowClient

    from sweeps import tracking
    from sweeps.execute import _start_records
    from sweeps.plan import check_fingerprint, fingerprint

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    plan = make_plan(parse("nsd_conv1_v1", "--smoke-test", "--mlflow-uri", uri,
                           "--storage", str(tmp_path / "ray")))
    run_dir = tmp_path / "ray" / "nsd_conv1_v1-smoke_20260101-000000"
    run_dir.mkdir(parents=True)
    parent_id, _ = _start_records(plan, run_dir)  # the first invocation's records
    tracking.finish(uri, parent_id, "FINISHED")
    resumed = dataclasses.replace(plan, resume=True)
    accepted = "; accepted: the file as the driver wrote it"
    manifest = run_dir / "manifest.jsonl"
    whole = manifest.read_text()
    manifest.write_text(whole[:60])
    with pytest.raises(UsageError, match=rf"^{re.escape(str(manifest))} line 1: not a manifest "
                                         rf"entry \(.+\){accepted}.* -- restore it, or start a "
                                         rf"new run without --resume$"):
        _start_records(resumed, run_dir)
    # a hand edit: every field there, one of another type (a TypeError and a traceback file
    # when the report read it)
    first = json.loads(whole.splitlines()[0])
    manifest.write_text(json.dumps({**first, "config": None}) + "\n")
    with pytest.raises(UsageError, match=rf"^{re.escape(str(manifest))} line 1: not a manifest "
                                         rf"entry \('config' is None\){accepted}"):
        _start_records(resumed, run_dir)
    manifest.write_text(whole)
    parent_file = run_dir / "mlflow_parent.json"
    whole_parent = parent_file.read_text()
    parent_file.write_text('{"run_id": ')
    with pytest.raises(UsageError, match=rf"^{re.escape(str(parent_file))}: the run's MLflow "
                                         rf"parent cannot be read \(.+\){accepted}"):
        _start_records(resumed, run_dir)
    assert MlflowClient(uri).get_run(parent_id).info.status == "FINISHED"
    # the fingerprint: unreadable, then another copy of the data
    stamp = run_dir / "sweep_fingerprint.json"
    stamp.write_text('{"sweep": "nsd_c')
    with pytest.raises(UsageError, match=rf"^{re.escape(str(stamp))}: the run's fingerprint "
                                         rf"cannot be read"):
        check_fingerprint(plan, run_dir)
    recorded = fingerprint(plan)
    stamp.write_text(json.dumps({**recorded, "data_sources": ["ImageNet folder /a at 224 px"]}))
    with pytest.raises(UsageError, match=r"was started with a different data \(--imagenet-root"):
        check_fingerprint(plan, run_dir)
    del recorded["data_sources"]  # a run fingerprinted before data sources were recorded
    stamp.write_text(json.dumps(recorded))
    check_fingerprint(plan, run_dir)
    # the parent run deleted in the MLflow UI: MLflow refused to reopen it (exit 1, after Ray
    # had started); one line naming it and how to restore it, the run left as it was
    parent_file.write_text(whole_parent)
    client = MlflowClient(uri)
    client.delete_run(parent_id)
    with pytest.raises(UsageError, match=rf"^--resume: the parent run {parent_id} of "
                                         rf"{re.escape(str(run_dir))} is deleted in "
                                         rf".*accepted: the run restored \(mlflow runs restore "
                                         rf"--run-id {parent_id}\) and --resume"):
        _start_records(resumed, run_dir)
    assert client.get_run(parent_id).info.lifecycle_stage == "deleted"
    client.restore_run(parent_id)
    assert _start_records(resumed, run_dir)[0] == parent_id
    # a parent the store no longer holds (mlflow gc, a replaced store): nothing to restore
    parent_file.write_text(whole_parent.replace(parent_id, "0" * 32))
    with pytest.raises(UsageError, match=r"^--resume: the parent run 0{32} of .* is not in "
                                         r".*accepted: a new run without --resume$"):
        _start_records(resumed, run_dir)
    parent_file.write_text(whole_parent)


def test_resume_finds_its_run_in_a_moved_storage_folder_and_refuses_a_lost_one(tmp_path):
    """The pointer holds the run folder's name, resolved in the storage given now; an older
    absolute pointer into a moved storage folder finds the folder of that name there; a
    pointer to a folder that is gone is refused (the run would have started the whole
    grid outside --storage)."""
    from sweeps.plan import resumed_run_dir

    storage = tmp_path / "moved"
    (storage / "nsd_conv1_v1-demo_20260101-000000").mkdir(parents=True)
    pointer = storage / "nsd_conv1_v1-demo.latest"
    pointer.write_text("nsd_conv1_v1-demo_20260101-000000")
    plan = make_plan(parse("nsd_conv1_v1", "--resume", "--storage", str(storage)))
    assert resumed_run_dir(plan) == storage / "nsd_conv1_v1-demo_20260101-000000"
    pointer.write_text(str(tmp_path / "before" / "nsd_conv1_v1-demo_20260101-000000"))
    assert resumed_run_dir(plan) == storage / "nsd_conv1_v1-demo_20260101-000000"
    pointer.write_text("nsd_conv1_v1-demo_20250101-000000")
    with pytest.raises(UsageError, match=r"names nsd_conv1_v1-demo_20250101-000000, which is "
                                         r"not a run folder under "):
        resumed_run_dir(plan)


def test_resume_takes_the_newest_unfinished_run_its_command_started(tmp_path, capsys):
    """Probed at stop 37: a new run beside an interrupted one took the resume pointer, and
    --resume then reopened the new, finished run; the interrupted one could never be resumed.
    In a shared storage folder another user's newer run made everyone else's --resume a
    refusal. --resume now takes the latest run when its command started it and it did not
    finish, else the newest such other run; a new run beside an unfinished one says so."""
    import json
    import shutil

    from records import ManifestEntry, write_manifest
    from references.cache import atomic_write_text
    from sweeps import execute
    from sweeps.plan import fingerprint, resume_choice
    from sweeps.run import resume_lines

    storage = tmp_path / "ray_results"
    new = make_plan(parse("nsd_conv1_v1", "--storage", str(storage)))
    keys = [t.trial_id for t in new.trials]

    def run(stamp, states, **differs):
        folder = storage / f"nsd_conv1_v1-demo_{stamp}"
        folder.mkdir(parents=True)
        (folder / "sweep_fingerprint.json").write_text(json.dumps({**fingerprint(new),
                                                                   **differs}))
        write_manifest(folder, [ManifestEntry(k, state, None, None, {})
                                for k, state in zip(keys, states)], write_text=atomic_write_text)
        (storage / "nsd_conv1_v1-demo.latest").write_text(folder.name)
        return folder

    done = ["done"] * len(keys)
    interrupted = run("20260101-000000", ["done", "stopped at epoch 1 of 2", *done[2:]])
    said = (f"note: {interrupted.name}, an earlier run of this command, did not finish (1 of "
            f"{len(keys)} trials); this starts a new run beside it. --resume takes the newest "
            f"unfinished run of a command: this new one if it stops early, else "
            f"{interrupted.name}")
    execute._say_if_an_earlier_run_is_unfinished(new)
    assert capsys.readouterr().out.strip() == said
    finished = run("20260102-000000", done)
    execute._say_if_an_earlier_run_is_unfinished(new)  # the latest finished: still said
    assert capsys.readouterr().out.strip() == said
    resume = make_plan(parse("nsd_conv1_v1", "--resume", "--storage", str(storage)))
    assert resume_choice(resume) == (interrupted, (
        f"{interrupted.name}, the newest unfinished run this command started (the latest run "
        f"here, {finished.name}, is not resumed: it finished)"))
    assert resume_lines(resume)[:2] == [
        f"resume: {resume_choice(resume)[1]}",
        f"resume: {interrupted}: {len(keys) - 1} of {len(keys)} trials finished there; the "
        f"resume runs 1 ({keys[1]})"]
    # another user's newer run in the shared storage (their own store): ours is still found
    theirs = run("20260103-000000", ["no epoch finished"] * len(keys),
                 tracking_uri_sha256="0" * 64)
    assert resume_choice(resume) == (interrupted, (
        f"{interrupted.name}, the newest unfinished run this command started (the latest run "
        f"here, {theirs.name}, is not resumed: another command started it)"))
    # ours finished too: the newest of ours (it resumes no trial), not a refusal over a
    # tracking URI this user never changed; and a new run has nothing to say
    write_manifest(interrupted, [ManifestEntry(k, "done", None, None, {}) for k in keys],
                   write_text=atomic_write_text)
    execute._say_if_an_earlier_run_is_unfinished(new)
    assert capsys.readouterr().out == ""
    assert resume_choice(resume) == (finished, (
        f"{finished.name}, the newest run this command started (the latest run here, "
        f"{theirs.name}, is not resumed: another command started it)"))
    # the latest run's folder deleted: ours are still found
    shutil.rmtree(theirs)
    assert resume_choice(resume)[0] == finished
    assert resume_choice(resume)[1].endswith(f"{theirs.name}, is not resumed: its folder is "
                                             f"gone)")
    # no run of this command at all: the latest run's own refusal, as before
    shutil.rmtree(interrupted)
    shutil.rmtree(finished)
    theirs = run("20260103-000000", done, tracking_uri_sha256="0" * 64)
    for ask in (lambda: resume_choice(resume),
                lambda: make_plan(parse("nsd_conv1_v1", "--resume", "--storage",
                                        str(storage)))):
        with pytest.raises(UsageError, match=rf"^--resume: {theirs.name} was started with a "
                                             rf"different tracking URI"):
            ask()
    finished = run("20260102-000000", done)
    # the latest run unfinished and ours: taken first, whatever older runs hold
    (storage / "nsd_conv1_v1-demo.latest").write_text(finished.name)
    write_manifest(finished, [ManifestEntry(k, "pending", None, None, {}) for k in keys],
                   write_text=atomic_write_text)
    assert resume_choice(resume) == (finished, None)


def test_two_runs_in_one_second_get_their_own_folders_and_the_newest_is_read(tmp_path,
                                                                              monkeypatch):
    """Two invocations in the same second: ``..._HHMMSS`` and ``..._HHMMSS-2`` (nothing
    earlier is overwritten), and the post-processor's Ray source takes the second as the
    newest, also past -9 (a string order would put -10 first)."""
    from dashboards.sources import _ray_run_dir
    from records import parse_run_folder
    from sweeps import execute

    monkeypatch.setattr(execute.time, "strftime", lambda fmt: "20260101-000000")
    plan = make_plan(parse("nsd_conv1_v1", "--smoke-test", "--storage", str(tmp_path)))
    made = [execute._run_dir(plan) for _ in range(10)]
    assert [parse_run_folder(d.name) for d in made] == [
        ("nsd_conv1_v1-smoke", "20260101-000000", k) for k in range(1, 11)]
    assert made[-1].name.endswith("_20260101-000000-10")
    assert _ray_run_dir(tmp_path, "nsd_conv1_v1", None) == made[-1]


def test_a_resume_takes_the_same_selection_in_any_order(tmp_path):
    """--only patterns given in another order select the same trials: the resume was
    refused ("started with a different --only"), as a differing selection still is."""
    import dataclasses
    import json

    from sweeps.plan import FINGERPRINT_FILE, check_fingerprint, fingerprint

    def plan_of(*only):
        return make_plan(parse("nsd_conv1_v1", "--smoke-test", "--storage",
                               str(tmp_path / "ray"), "--mlflow-uri",
                               f"sqlite:///{tmp_path / 'mlflow.db'}",
                               *[a for o in only for a in ("--only", o)]))

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = plan_of("*-none-*", "*-max-*")
    (run_dir / FINGERPRINT_FILE).write_text(json.dumps(fingerprint(first)))
    check_fingerprint(dataclasses.replace(plan_of("*-max-*", "*-none-*"), resume=True), run_dir)
    old = {**fingerprint(first), "only": ["*-none-*", "*-max-*"]}  # as runs recorded it
    (run_dir / FINGERPRINT_FILE).write_text(json.dumps(old))
    check_fingerprint(dataclasses.replace(plan_of("*-max-*", "*-none-*"), resume=True), run_dir)
    with pytest.raises(UsageError, match=r"was started with a different --only .*; accepted: "
                       r"the run's own --only \(the same sweep file, seeds, overrides, "
                       r"selection, search and tracking URI\), or a new run without --resume$"):
        check_fingerprint(dataclasses.replace(plan_of("*-max-*"), resume=True), run_dir)


def test_a_resume_after_a_sweep_file_changed_names_the_file(tmp_path):
    """A member of a composite sweep edited between the run and its resume: the refusal
    listed every file's sha256 (1,700 characters) and did not say which one changed."""
    import dataclasses
    import json

    from sweeps.plan import FINGERPRINT_FILE, check_fingerprint, fingerprint

    folder = tmp_path / "conditions"
    shutil.copytree(SWEEP_DIR, folder)

    def plan_of():
        return make_plan(parse("paper", "--smoke-test", "--sweep-dir", str(folder), "--storage",
                               str(tmp_path / "ray"), "--mlflow-uri",
                               f"sqlite:///{tmp_path / 'mlflow.db'}"))

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / FINGERPRINT_FILE).write_text(json.dumps(fingerprint(plan_of())))
    member = folder / "nsd_fc1_vvs.toml"
    member.write_text(member.read_text() + "\n# edited\n")
    with pytest.raises(UsageError) as info:
        check_fingerprint(dataclasses.replace(plan_of(), resume=True), run_dir)
    assert str(info.value) == (
        "--resume: run was started with a different sweep file content (changed since: "
        "nsd_fc1_vvs.toml); accepted: the sweep files as they were when it started, or a new "
        "run without --resume")


def test_a_trial_resumed_on_another_share_records_both(tmp_path):
    """Threads set the order of float reductions: a trial resumed with another CPU share is
    not bit-equal to one that never stopped. Its ran.* tags were overwritten by the last
    attempt's; they now say what changed and from which epoch (a restored attempt reads the
    facts its checkpoint carries). A value that itself reads like a history (a reference
    file path with ', then ') is not taken for one."""
    import json

    from mlflow.tracking import MlflowClient

    from records import experiment_name
    from sweeps import tracking
    from sweeps.execute import RayHooks, facts_tags, merge_facts, read_facts

    path = "AlexNet from /m/a, then b from epoch 3.pt"
    first = merge_facts({}, {"ran.threads": "1", "ran.reference": path}, 0)
    assert facts_tags(first) == {"ran.threads": "1", "ran.reference": path}
    second = merge_facts(first, {"ran.threads": "2", "ran.reference": path}, 3)
    assert facts_tags(second) == {"ran.threads": "1, then 2 from epoch 3", "ran.reference": path}
    assert merge_facts(second, {"ran.threads": "2", "ran.reference": path}, 5) == second
    third = merge_facts(second, {"ran.threads": "1", "ran.gpus": "0"}, 6)
    assert facts_tags(third)["ran.threads"] == "1, then 2 from epoch 3, then 1 from epoch 6"
    assert facts_tags(third)["ran.gpus"] == "0"
    # through a checkpoint, as a restored attempt reads it and describes itself
    (tmp_path / "trial_facts.json").write_text(json.dumps(first))
    assert read_facts(tmp_path) == first
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = tracking.start_parent(uri, experiment_name("facts", "demo"), {"sweep": "x"})
    run = tracking.TrialRun(uri, parent, "x-none-a0-b1-s0", params={}, tags={},
                            say=lambda _: None)
    hooks = RayHooks(run, placed={"cpus": "2"})
    hooks.journal, hooks.facts = {0: {}, 1: {}}, read_facts(tmp_path)
    hooks.describe({"threads": "2", "reference": path})
    assert run.close(60)
    tags = MlflowClient(uri).get_run(run.run_id).data.tags
    assert tags["ran.threads"] == "1, then 2 from epoch 2" and tags["ran.reference"] == path
    assert tags["ran.cpus"] == "2"  # a fact the first attempt's checkpoint did not carry
    hooks.close()
    (tmp_path / "trial_facts.json").write_text(json.dumps({"ran.threads": "1"}))  # not ours
    assert read_facts(tmp_path) == {}


def test_set_and_only_apply_to_the_plan():
    plan = make_plan(parse("paper", "--set", "epochs=2", "--set", "steps_per_epoch=5",
                           "--set", "device=cpu", "--only", "nsd_conv1_v1-max-*",
                           "--only", "*-none-*"))
    ids = [t.trial_id for t in plan.trials]
    assert "nsd_conv1_v1-max-a0.8-b1-s0" in ids and "gabor_conv1-none-a0-b1-s0" in ids
    assert not any("-min-" in i for i in ids) and len(ids) == 4 + 7 + 1  # + the control baseline
    assert plan.n_grid == 79 + 3 and plan.overrides == {"epochs": 2, "steps_per_epoch": 5,
                                                    "device": "cpu"}
    assert all(t.config["epochs"] == 2 and t.config["device"] == "cpu" for t in plan.trials)
    assert set(plan.conditions) == {t.condition for t in plan.trials}
    # a paper run of NSD conditions only needs no --imagenet-root
    with pytest.raises(UsageError, match=r"--nsd-root DIR is required"):
        make_plan(parse("paper", "--data", "paper", "--only", "nsd_*"))


def test_set_reads_numbers_as_written_and_records_integers_alike():
    """.001 (refused by TOML) is a number; epochs=1.0 is epochs=1, so a --resume with
    --set epochs=1 is the same override."""
    plan = make_plan(parse("nsd_conv1_v1", "--set", "lr=.001", "--set", "epochs=1.0",
                           "--set", "val_images=5E1"))
    assert plan.overrides == {"lr": 0.001, "epochs": 1, "val_images": 50}
    assert type(plan.overrides["epochs"]) is int
    assert {(t.config["lr"], t.config["epochs"]) for t in plan.trials} == {(0.001, 1)}


@pytest.mark.parametrize("value", ["true", "false"])
def test_set_cannot_change_which_trials_are_the_negative_control(value):
    """One reference_shuffle for every trial made the control a copy of the condition (false)
    or the condition a control (true), and the report still called them condition and
    control."""
    match = re.escape("--set reference_shuffle with nsd_conv1_v1, whose sweep file runs its "
                      "shuffled negative control ([control]); accepted: --set reference_shuffle "
                      "with a sweep that has no [control] (the control here runs as "
                      "nsd_conv1_v1_shuffled)")
    for only in ([], ["--only", "nsd_conv1_v1_shuffled-*"], ["--only", "nsd_conv1_v1-*"]):
        with pytest.raises(UsageError, match=match):
            make_plan(parse("nsd_conv1_v1", *only, "--set", f"reference_shuffle={value}"))
    # a sweep without a control may be run shuffled as a whole (README: negative control)
    plan = make_plan(parse("gabor_conv1", "--set", f"reference_shuffle={value}"))
    assert {t.config["reference_shuffle"] for t in plan.trials} == {value == "true"}


def test_imagenet_root_is_checked_as_the_run_reads_it(tmp_path):
    """The dry run indexes the tree the way the trials will read it: one line naming the path
    and what was expected, before anything starts."""
    from imagenet_tree import write_imagenet_tree

    root = tmp_path / "imagenet"
    (root / "train" / "n01").mkdir(parents=True)
    argv = ("gabor_conv1", "--data", "imagenet", "--imagenet-root", str(root), "--dry-run")
    with pytest.raises(UsageError, match=r"missing folder .*imagenet/val"):
        make_plan(parse(*argv))
    (root / "val" / "n01").mkdir(parents=True)
    with pytest.raises(UsageError, match=r"--imagenet-root .*train holds no image files"):
        make_plan(parse(*argv))
    good = write_imagenet_tree(tmp_path / "good", n_classes=2, n_train=2, n_val=1)
    (good / "val" / sorted(p.name for p in (good / "val").iterdir())[0]).rename(
        good / "val" / "n99999999")
    with pytest.raises(UsageError, match=r"val.*classes.*differ|differ.*classes"):
        make_plan(parse("gabor_conv1", "--data", "imagenet", "--imagenet-root", str(good)))
    # A val split smaller than the validation alignment's folds need (2 * val_folds = 10 by
    # default) used to fail every trial after its first epoch.
    small = write_imagenet_tree(tmp_path / "small", n_classes=2, n_train=2, n_val=4,
                                sizes=((32, 24),))
    argv = ("gabor_conv1", "--data", "imagenet", "--imagenet-root", str(small))
    where = f"the training split of --imagenet-root {small}"
    # the paper's batch of 1000 on a 4-image subset: the dry run says so
    with pytest.raises(UsageError, match=re.escape(
            f"trial gabor_conv1-none-a0-b1-s0: batch_size=1000 but {where} holds 4 images; "
            f"accepted: batch_size <= 4 (--set batch_size=N)")):
        make_plan(parse(*argv))
    with pytest.raises(UsageError, match=re.escape(
            f"trial gabor_conv1-none-a0-b1-s0: val_folds=5 needs 10 validation images but the "
            f"validation split of --imagenet-root {small} holds 8; accepted: val_folds <= 4 "
            f"(--set val_folds=N)")):
        make_plan(parse(*argv, "--set", "batch_size=4"))
    make_plan(parse(*argv, "--set", "batch_size=4", "--set", "val_folds=4"))
    tree = write_imagenet_tree(tmp_path / "tree", n_classes=2, n_train=2, n_val=5)
    plan = make_plan(parse("gabor_conv1", "--data", "imagenet", "--imagenet-root", str(tree),
                           "--set", "batch_size=4"))
    assert plan.scale == "paper" and plan.data["gabor_conv1"].imagenet_root == str(tree)
    assert plan.data_description.startswith("paper scale on ImageNet")
    assert {t.config["image_size"] for t in plan.trials} == {224}


def test_nsd_paths_are_checked_against_a_release(tmp_path):
    """The simulated world writes the native NSD layout: a valid release passes, and removing
    any one file the run reads (or the COCO folder) is an error naming it."""
    from references.simulated import generate_nsd_like

    sim = generate_nsd_like(n_images=30, n_subjects=1, n_categories=4, repeats=2)
    # (the paper's batch of 1000 and 5 folds are refused for this 30-image release)
    nsd_argv = ("nsd_conv1_v1", "--data", "nsd", "--nsd-root", str(sim.nsd_root),
                "--set", "batch_size=8", "--set", "val_folds=2")
    with pytest.raises(UsageError, match="--coco-annotations DIR is required"):
        make_plan(parse(*nsd_argv))
    plan = make_plan(parse(*nsd_argv, "--coco-annotations", str(sim.coco_annotations)))
    src = plan.data["nsd_conv1_v1"]
    assert (src.kind, src.roi, src.subjects, src.nsd_root) == ("nsd", "V1", (1,),
                                                              str(sim.nsd_root))
    with pytest.raises(UsageError, match="--coco-annotations .*: missing instances_train2017"):
        make_plan(parse(*nsd_argv, "--coco-annotations", str(tmp_path)))
    with pytest.raises(UsageError, match="subject 2"):
        make_plan(parse(*nsd_argv, "--coco-annotations", str(sim.coco_annotations),
                        "--subject", "2"))
    with pytest.raises(UsageError, match="missing nsddata/experiments/nsd/nsd_expdesign.mat"):
        make_plan(parse("nsd_conv1_v1", "--data", "nsd", "--nsd-root", str(tmp_path),
                        "--coco-annotations", str(sim.coco_annotations)))
    # the paper sweep with every path, --only narrowing it to NSD trials: the ImageNet path
    # is not used (it was refused: "sweep paper does not train on ImageNet")
    plan = make_plan(parse("paper", "--data", "paper", "--nsd-root", str(sim.nsd_root),
                           "--coco-annotations", str(sim.coco_annotations), "--imagenet-root",
                           str(tmp_path / "nowhere"), "--only", "nsd_conv1_v1-*",
                           "--set", "batch_size=8", "--set", "val_folds=2"))
    assert {src.kind for src in plan.data.values()} == {"nsd"}
    with pytest.raises(UsageError, match="--imagenet-root is given but sweep nsd_conv1_v1 does "
                                         "not train on ImageNet"):
        make_plan(parse(*nsd_argv, "--coco-annotations", str(sim.coco_annotations),
                        "--imagenet-root", str(tmp_path)))


def test_the_dry_run_sizes_an_nsd_releases_splits_as_the_trials_will(tmp_path):
    """A batch larger than an NSD release's training split, or validation folds no subject's
    share of the validation subset can fill, passed the dry run: the driver found them only
    after preparing the whole release (hours at NSD's size). The dry run now splits the
    images the sessions show as the prepared table is split, and gives the driver's message
    with the same numbers."""
    import dataclasses

    from references.simulated import generate_nsd_like
    from sweeps.execute import _prepare
    from sweeps.plan import prepared_validation_groups_problem

    # three sessions of subject 1, two of subject 2: the images a subject saw are those of
    # its sessions on disk, not of its row of the design
    sim = generate_nsd_like(n_images=90, n_subjects=2, n_categories=4, repeats=2,
                            trials_per_session=40)
    argv = ("nsd_conv1_v1", "--data", "nsd", "--nsd-root", str(sim.nsd_root),
            "--coco-annotations", str(sim.coco_annotations), "--subject", "1", "--subject", "2")
    plan = make_plan(parse(*argv, "--set", "batch_size=8", "--set", "val_folds=2"))
    # the parent run records the subjects (the report's "NSD subjects 1, 2 of the paper's 8")
    from dashboards.paper import differences
    from records import SweepRunTags
    from sweeps.execute import sweep_run_tags

    assert sweep_run_tags(plan).subjects == (1, 2)
    assert "NSD subjects 1, 2 of the paper's 8" in differences(
        SweepRunTags.parse(sweep_run_tags(plan).format()))
    data, refs = _prepare(plan)  # what the trials get, from the prepared table
    n_train, n_val = len(data["nsd_conv1_v1"].train), len(data["nsd_conv1_v1"].val)
    assert 0 < n_val < n_train
    where = f"--nsd-root {sim.nsd_root} (subjects 1, 2)"
    with pytest.raises(UsageError, match="^" + re.escape(
            f"trial nsd_conv1_v1-none-a0-b1-s0: batch_size={n_train + 1} but the training split "
            f"of {where} holds {n_train} images; accepted: batch_size <= {n_train} "
            f"(--set batch_size=N)") + "$"):
        make_plan(parse(*argv, "--set", f"batch_size={n_train + 1}", "--set", "val_folds=2"))
    folds = n_val // 2 + 1
    with pytest.raises(UsageError, match="^" + re.escape(
            f"trial nsd_conv1_v1-none-a0-b1-s0: val_folds={folds} needs {2 * folds} validation "
            f"images but the validation split of {where} holds {n_val}; accepted: val_folds <= "
            f"{n_val // 2} (--set val_folds=N)") + "$"):
        make_plan(parse(*argv, "--set", f"batch_size={n_train}", "--set",
                        f"val_folds={folds}"))
    # each subject is scored on its own images of the validation subset: the dry run's counts
    # are the driver's, from the prepared table's voxel reference
    t = next(t for t in plan.trials if t.direction == "none")
    for folds in range(2, n_val // 2 + 1):
        bad = dataclasses.replace(t, config={**t.config, "val_folds": folds})
        driver = prepared_validation_groups_problem(bad, data["nsd_conv1_v1"], refs["nsd_conv1_v1"])
        if driver is None:
            make_plan(parse(*argv, "--set", f"batch_size={n_train}", "--set",
                            f"val_folds={folds}"))
            continue
        with pytest.raises(UsageError, match="^" + re.escape(driver) + "$"):
            make_plan(parse(*argv, "--set", f"batch_size={n_train}", "--set",
                            f"val_folds={folds}"))
        break
    else:
        raise AssertionError("no val_folds the split can hold leaves a subject short")


def test_a_resume_refuses_a_release_changed_in_place(tmp_path):
    """A session rewritten in place (same shape, same path) between a run and its --resume was
    not noticed: the prepared table's cache key changed, so the resumed trials trained on
    other data than the run's finished ones."""
    import shutil

    from references import nsd
    from references.simulated import generate_nsd_like
    from sweeps.plan import FINGERPRINT_FILE, check_fingerprint, fingerprint

    sim = generate_nsd_like(n_images=30, n_subjects=1, n_categories=4, repeats=2)
    nsd_root = tmp_path / "nsd"
    shutil.copytree(sim.nsd_root, nsd_root)
    plan = make_plan(parse("nsd_conv1_v1", "--data", "nsd", "--nsd-root", str(nsd_root),
                           "--coco-annotations", str(sim.coco_annotations),
                           "--set", "batch_size=8", "--set", "val_folds=2"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    recorded = fingerprint(plan)
    (run_dir / FINGERPRINT_FILE).write_text(json.dumps(recorded))
    check_fingerprint(plan, run_dir)
    session = nsd.session_file(nsd_root, 1, 1)
    st = session.stat()
    session.write_bytes(session.read_bytes())  # the same bytes, written again
    os.utime(session, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    rel = session.relative_to(nsd_root)
    with pytest.raises(UsageError, match=(
            r"^--resume: run was started on data that has changed since \(NSD .*: "
            + re.escape(f"{rel} changed (size or time)); accepted: the data as it was when the "
                        f"run started, or a new run without --resume") + "$")):
        check_fingerprint(plan, run_dir)
    del recorded["data_files"]  # a run started before the files were recorded: not compared
    (run_dir / FINGERPRINT_FILE).write_text(json.dumps(recorded))
    check_fingerprint(plan, run_dir)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_services_are_reported():
    port = _closed_port()
    plan = make_plan(parse("nsd_conv1_v1", "--address", f"127.0.0.1:{port}"))
    with pytest.raises(UsageError, match=f"no Ray cluster answers at 127.0.0.1:{port}"):
        check_services(plan, timeout=2)
    plan = make_plan(parse("nsd_conv1_v1", "--mlflow-uri", f"http://127.0.0.1:{port}"))
    with pytest.raises(UsageError, match="tracking server unreachable"):
        check_services(plan, timeout=2)
    check_services(make_plan(parse("nsd_conv1_v1")))  # local Ray, SQLite: nothing to contact


# --------------------------------------------------------------------------------------------
# The command line, as users run it


def run_cli(*argv, module=False):
    cmd = [sys.executable, *(["-m", "sweeps.run"] if module else ["sweeps/run.py"]), *argv]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("module", [False, True])
def test_cli_list(module):
    out = run_cli("--list", module=module)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split()[0] for line in lines] == sorted(COUNTS)
    for line in lines:
        assert f"{COUNTS[line.split()[0]]} trials" in line


def test_list_counts_the_negative_controls_at_each_scale_they_run(tmp_path):
    """A [control] at paper scale only was not counted by --list (only the demo's were), and a
    composite of one condition read "(1 conditions)"."""
    from sweeps.run import list_lines

    text = (SWEEP_DIR / "nsd_conv1_v1.toml").read_text()
    assert 'scales = ["demo"]' in text
    for scales, want in (('["paper"]', "(+3 negative-control trials at paper scale)"),
                         ('["demo", "paper"]', "(+3 negative-control trials, demo and paper)"),
                         ('["demo"]', "(+3 negative-control trials in the demo)")):
        (tmp_path / "lab.toml").write_text(text.replace('scales = ["demo"]', f"scales = {scales}"))
        (tmp_path / "one.toml").write_text('description = "x"\nincludes = ["lab"]\n')
        lines = {line.split()[0]: line for line in list_lines(str(tmp_path))}
        assert lines["lab"].endswith(want), lines["lab"]
        assert lines["one"].endswith(f"x (1 condition) {want}"), lines["one"]


def test_a_dry_run_says_when_this_machine_cannot_hold_a_local_runs_trials():
    """A paper sweep's trials ask for 4 CPUs: on a 2-core machine the dry run said nothing and
    the run was refused after Ray started. The dry run says it (and still exits 0: it also
    checks data before a cluster run); with --address the cluster is asked when the run
    starts."""
    cpus = os.cpu_count()
    out = run_cli("nsd_conv1_v1", "--dry-run", "--cpus-per-trial", str(cpus + 1))
    assert out.returncode == 0, out.stderr
    (note,) = [line for line in out.stdout.splitlines() if line.startswith("note: run on")]
    assert note.startswith(f"note: run on this machine (a local Ray of {cpus} CPUs and ")
    assert (f"it would be refused: trial nsd_conv1_v1-none-a0-b1-s0 asks for {cpus + 1} CPUs "
            f"but the largest node of the Ray cluster has {cpus}; accepted: --cpus-per-trial "
            f"<= {cpus} -- or give --address of a cluster that holds it") in note, note
    fits = run_cli("nsd_conv1_v1", "--dry-run", "--cpus-per-trial", str(cpus))
    assert fits.returncode == 0 and "note: run on" not in fits.stdout, fits.stdout


@pytest.mark.parametrize("name", ["nsd_conv1_v1", "paper"])
def test_cli_dry_run_ends_with_the_trial_count(name):
    out = run_cli(name, "--dry-run", "--gpus-per-trial", "0.25")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"{name}: demo scale on the simulated world (no real data configured)"
    assert lines[1].split() == ["trial_id", "direction", "alpha", "beta", "seed", "cpus", "gpus"]
    assert lines[-1] == f"{COUNTS[name] + CONTROLS.get(name, 0)} trials"
    rows = [line.split() for line in lines[2:2 + COUNTS[name]]]
    assert {r[-1] for r in rows} == {"0.25"}
    assert any(line.startswith("data: simulated NSD-like world, ROI V1") for line in lines)
    if name == "nsd_conv1_v1":
        assert ["nsd_conv1_v1-min-a0.4-b1-s0", "min", "-0.4", "1", "0", "1", "0.25"] in rows


@pytest.mark.parametrize("argv, match", [
    (["nope", "--dry-run"], "unknown sweep 'nope'; known: gabor_conv1"),
    (["nsd_conv1_v1", "--dry-run", "--gpus-per-trial", "-1"], "--gpus-per-trial='-1'"),
    (["nsd_conv1_v1", "--dry-run", "--cpus-per-trial", "two"], "--cpus-per-trial='two'"),
    (["nsd_conv1_v1", "--dry-run", "--data", "nsd", "--nsd-root", "/no/such/nsd",
      "--coco-annotations", "/no/such/coco"], "--nsd-root /no/such/nsd: no such directory"),
    (["nsd_conv1_v1", "--seeds", "x"], "argument --seeds: 'x'; accepted: an integer in 1..1000"),
    (["nsd_conv1_v1", "--data", "imagenett"], "argument --data: invalid choice"),
])
def test_cli_errors_are_one_line_with_exit_2(argv, match):
    out = run_cli(*argv)
    assert out.returncode == 2
    assert out.stdout == ""
    assert "Traceback" not in out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], out.stderr


def test_environment_settings_are_checked_before_anything_starts(monkeypatch):
    """Settings read from the environment by the driver or by every trial are refused in one
    line by the plan (the dry run too), not found bad by each trial after it has trained."""
    from sweeps.execute import _flush_timeout
    from sweeps.plan import DEFAULT_FLUSH_S

    for text in ("abc", "-1", "nan", "inf", "1e9"):
        monkeypatch.setenv("ALIGNSWEEP_TRACKING_FLUSH_S", text)
        with pytest.raises(UsageError, match=rf"ALIGNSWEEP_TRACKING_FLUSH_S='{text}'; "
                                             r"accepted: a number of seconds from 0 to 604800"):
            make_plan(parse("nsd_conv1_v1", "--dry-run"))
        # a trial that still meets one (set on a node) waits the default; it never raises
        assert _flush_timeout() == DEFAULT_FLUSH_S
    monkeypatch.setenv("ALIGNSWEEP_TRACKING_FLUSH_S", "30")
    make_plan(parse("nsd_conv1_v1", "--dry-run"))
    assert _flush_timeout() == 30.0
    monkeypatch.setenv("ALIGNSWEEP_OBJECT_STORE", str(10**20))
    with pytest.raises(UsageError, match=r"ALIGNSWEEP_OBJECT_STORE='100000000000000000000'; "
                                         r"accepted: .* and <= this machine's memory"):
        make_plan(parse("nsd_conv1_v1", "--dry-run"))


def test_an_existing_sqlite_file_must_be_an_mlflow_store(tmp_path):
    """MLflow would add its tables to any SQLite file it opens (another program's database)
    or fail on a non-database after Ray started: the plan refuses such a file and leaves it
    as it was; a new file, an empty one and a store MLflow wrote are accepted."""
    import sqlite3

    other = tmp_path / "labnotes.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE labnotes (day TEXT, note TEXT)")
    con.commit()
    con.close()
    image = tmp_path / "photo.db"
    image.write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))
    for path, why in ((other, r"is a SQLite database but not an MLflow store \(tables: "
                              r"labnotes"),
                      (image, r"is not a SQLite database")):
        before = path.read_bytes()
        with pytest.raises(UsageError, match=rf"--mlflow-uri sqlite:///{re.escape(str(path))}: "
                                             rf"{re.escape(str(path))} {why}.*accepted: a new "
                                             r"or empty file, or a store this MLflow"):
            make_plan(parse("nsd_conv1_v1", "--mlflow-uri", f"sqlite:///{path}"))
        assert path.read_bytes() == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["labnotes.db", "photo.db"]
    empty = tmp_path / "empty.db"
    empty.touch()
    for path in (tmp_path / "new.db", empty):
        plan = make_plan(parse("nsd_conv1_v1", "--mlflow-uri", f"sqlite:///{path}"))
        assert plan.mlflow_uri == f"sqlite:///{path}"
    store = tmp_path / "store.db"
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{store}").search_experiments()  # MLflow creates its schema
    assert make_plan(parse("nsd_conv1_v1", "--mlflow-uri", f"sqlite:///{store}")).mlflow_uri
    # MLflow's name for the default Databricks profile is a tracking URI
    assert make_plan(parse("nsd_conv1_v1", "--mlflow-uri", "databricks")).mlflow_uri == \
        "databricks"


def test_folders_and_devices_a_run_would_fail_on_are_refused_by_the_plan(tmp_path, monkeypatch):
    """What the dry run used to accept and a real run (or each trial) then tripped on."""
    a_file = tmp_path / "file"
    a_file.write_text("x")
    # (a folder without write permission is refused the same way; not testable as root)
    for storage, why in ((a_file / "results", rf"{re.escape(str(a_file))} is not a folder"),
                         (a_file / "a" / "b", rf"{re.escape(str(a_file))} is not a folder")):
        with pytest.raises(UsageError, match=rf"--storage {re.escape(str(storage))}: {why}; "
                                             r"accepted: a folder this user can create or write"):
            make_plan(parse("nsd_conv1_v1", "--storage", str(storage)))
    assert not (tmp_path / "new" / "results").exists()
    make_plan(parse("nsd_conv1_v1", "--storage", str(tmp_path / "new" / "results")))
    assert not (tmp_path / "new").exists()  # checking created nothing
    for cache, why in ((a_file, "is not a folder"), (a_file / "sub", "is not a folder")):
        monkeypatch.setenv("ALIGNSWEEP_CACHE", str(cache))
        with pytest.raises(UsageError, match=rf"ALIGNSWEEP_CACHE='{re.escape(str(cache))}': "
                                             rf".*{why}; accepted: a folder"):
            make_plan(parse("nsd_conv1_v1", "--dry-run"))
    monkeypatch.setenv("ALIGNSWEEP_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UsageError, match=r"condition nsd_conv1_v1: device=cuda with 0 GPUs per "
                                         r"trial; accepted: --gpus-per-trial > 0"):
        make_plan(parse("nsd_conv1_v1", "--set", "device=cuda"))
    plan = make_plan(parse("nsd_conv1_v1", "--set", "device=cuda", "--gpus-per-trial", "0.5"))
    assert {t.config["device"] for t in plan.trials} == {"cuda"}
    # ... and on a cluster without a GPU (nodes as ray.nodes() lists them), where GPU requests
    # are dropped: refused before any record, not every trial failing as it starts (exit 1)
    from sweeps.execute import check_fits

    node = {"Alive": True, "NodeManagerAddress": "10.0.0.1", "Resources": {"CPU": 8.0}}
    with pytest.raises(UsageError, match=r"trial nsd_conv1_v1-none-a0-b1-s0 sets device=cuda "
                                         r"but no node of the Ray cluster has a GPU; accepted: "
                                         r"device=auto"):
        check_fits(plan, [node])
    check_fits(plan, [{**node, "Resources": {"CPU": 8.0, "GPU": 1.0}}])
    check_fits(make_plan(parse("nsd_conv1_v1", "--gpus-per-trial", "0.5")), [node])  # auto
    # a GPU and no CPU, where no node has a GPU: Tune failed on a resource request of nothing
    # (exit 1, the parent run FAILED) after the dry run had passed
    gpu_only = make_plan(parse("nsd_conv1_v1", "--cpus-per-trial", "0", "--gpus-per-trial",
                               "0.5"))
    with pytest.raises(UsageError, match=r"asks for 0 CPUs and 0.5 GPUs, but no node of the "
                                         r"Ray cluster has a GPU \(trials run on CPU there\); "
                                         r"accepted: --cpus-per-trial > 0"):
        check_fits(gpu_only, [node])
    check_fits(gpu_only, [{**node, "Resources": {"CPU": 8.0, "GPU": 1.0}}])
    # the CPUs on one node and the GPU on another: no node holds a trial, which stayed
    # PENDING for ever (each was compared with the largest node separately)
    split = [{**node, "Resources": {"CPU": 2.0}},
             {**node, "NodeManagerAddress": "10.0.0.2", "Resources": {"CPU": 1.0, "GPU": 1.0}}]
    two = make_plan(parse("nsd_conv1_v1", "--cpus-per-trial", "2", "--gpus-per-trial", "1",
                          "--mlflow-uri", "http://tracking.example:5000"))
    with pytest.raises(UsageError, match=r"asks for 2 CPUs and 1 GPUs on one node, but no node "
                                         r"of the Ray cluster has both \(nodes: 1 CPUs \+ 1 "
                                         r"GPUs, 2 CPUs \+ 0 GPUs\); accepted: "
                                         r"--cpus-per-trial <= 1 with --gpus-per-trial 1"):
        check_fits(two, split)
    check_fits(make_plan(parse("nsd_conv1_v1", "--cpus-per-trial", "1", "--gpus-per-trial", "1",
                               "--mlflow-uri", "http://tracking.example:5000")), split)
    # a SQLite file with trials on several machines: each would write its own copy
    local = make_plan(parse("nsd_conv1_v1", "--mlflow-uri", f"sqlite:///{tmp_path}/m.db"))
    with pytest.raises(UsageError, match=rf"^--mlflow-uri sqlite:///{tmp_path}/m.db is a "
                                         rf"SQLite file on this machine but the Ray cluster "
                                         rf"spans 2 machines \(10.0.0.1, 10.0.0.2\).*accepted: "
                                         rf"an MLflow server"):
        check_fits(local, [node, {**node, "NodeManagerAddress": "10.0.0.2"}])
    check_fits(local, [node, node])  # two Ray nodes on one machine share the file
    # a server on this machine's loopback: trials on the other machines reached their own
    # (each write an outage, each trial waiting out the flush timeout after training)
    for uri in ("http://localhost:5000", "http://u:secret@127.0.0.1:5000", "https://[::1]:443"):
        loop = make_plan(parse("nsd_conv1_v1", "--mlflow-uri", uri))
        shown = uri.replace("u:secret@", "u:***@")
        with pytest.raises(UsageError, match=rf"^--mlflow-uri {re.escape(shown)} names this "
                                             rf"machine's loopback but the Ray cluster spans 2 "
                                             rf"machines \(10.0.0.1, 10.0.0.2\): .*accepted: "
                                             rf"the server's address as every node reaches it"):
            check_fits(loop, [node, {**node, "NodeManagerAddress": "10.0.0.2"}])
        check_fits(loop, [node, node])  # one machine
        check_fits(loop, [{**node, "NodeManagerAddress": "127.0.0.1"},
                          {**node, "NodeManagerAddress": "127.0.0.2"}])  # loopback nodes
    check_fits(make_plan(parse("nsd_conv1_v1", "--mlflow-uri", "http://mlflow-host:5000")),
               [node, {**node, "NodeManagerAddress": "10.0.0.2"}])
    # a SQLite store where it cannot be written: MLflow retried for two minutes after Ray had
    # started, then exit 1
    with pytest.raises(UsageError, match=r"--mlflow-uri sqlite:////proc/alignsweep.db: /proc "
                                         r"does not take files .*accepted: a SQLite file in a "
                                         r"folder this user can write"):
        make_plan(parse("nsd_conv1_v1", "--mlflow-uri", "sqlite:////proc/alignsweep.db"))
    frozen = tmp_path / "frozen.db"
    frozen.touch()
    if subprocess.run(["chattr", "+i", str(frozen)], capture_output=True).returncode == 0:
        try:  # immutable: even root cannot write it
            with pytest.raises(UsageError, match=rf"{re.escape(str(frozen))} cannot be written"):
                make_plan(parse("nsd_conv1_v1", "--mlflow-uri", f"sqlite:///{frozen}"))
        finally:
            subprocess.run(["chattr", "-i", str(frozen)], check=True)


def test_an_exception_is_one_line_with_its_type_and_no_secret():
    """records.errors is the one way a cause is written into a message: whitespace runs as one
    space, URIs' secrets redacted, clipped after redaction, the type alone for no message,
    and the first non-empty line alone where later lines are advice."""
    from records.errors import exception_line, one_line

    exc = OSError("cannot reach\n  http://ann:s3cret@host:5000/api\t(timed out)")
    assert one_line(exc) == "cannot reach http://ann:s3cret@host:5000/api (timed out)"
    assert exception_line(exc) == "OSError: cannot reach http://ann:***@host:5000/api (timed out)"
    assert exception_line(exc, 30) == "OSError: cannot reach http://ann:***@ho"
    assert exception_line(KeyError()) == "KeyError"
    assert exception_line(ValueError(" \n ")) == "ValueError"
    torch_like = RuntimeError("\nPytorchStreamReader failed reading zip archive\nUse torch.save")
    assert exception_line(torch_like, None, first_line=True) == (
        "RuntimeError: PytorchStreamReader failed reading zip archive")
    assert exception_line(torch_like, 12, first_line=True) == "RuntimeError: PytorchStrea"


def test_an_errored_trial_is_named_with_its_error_in_one_line():
    """The driver's summary names each errored trial's error by its innermost Type: message,
    through the wrappers a real failure comes in: a DataLoader worker's, then Ray's."""
    import importlib

    import torch

    from sweeps.execute import error_line

    ray = importlib.import_module("ray")  # after sweeps.execute, which sets Ray's auth mode

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise ValueError(f"cannot decode /data/train/n01/{i}.JPEG (truncated); replace it")

    loader = torch.utils.data.DataLoader(Broken(), num_workers=1)
    with pytest.raises(ValueError) as info:
        next(iter(loader))
    assert "\n" in str(info.value)  # the worker's traceback is the message
    assert error_line(info.value) == ("ValueError: cannot decode /data/train/n01/0.JPEG "
                                      "(truncated); replace it")
    assert error_line(RuntimeError("two\nlines")) == "RuntimeError: two lines"
    assert error_line(KeyError()) == "KeyError"

    ray.init(num_cpus=1, include_dashboard=False, object_store_memory=80 * 2**20,
             log_to_driver=False)
    try:
        @ray.remote
        def trial():
            raise ZeroDivisionError("lr=1000 diverged; store http://ann:s3cret@host:5000")

        with pytest.raises(ZeroDivisionError) as info:
            ray.get(trial.remote())
        assert error_line(info.value) == ("ZeroDivisionError: lr=1000 diverged; store "
                                          "http://ann:***@host:5000")
    finally:
        ray.shutdown()


def test_weights_name_the_pretrained_conditions_network_and_are_read_by_the_dry_run(tmp_path):
    """--weights PATH (what the weights messages always told users to pass) selects the frozen
    network of the pretrained conditions; the plan reads the file as the run will, so an
    unreadable one is refused before Ray or MLflow start (only its existence was checked)."""
    import torch

    from trainable.models import build_model

    good = tmp_path / "lab_alexnet.ckpt"
    sd = build_model("alexnet", num_classes=10, width=0.5, seed=1).net.state_dict()
    torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3}, good)
    plan = make_plan(parse("pretrained_conv1", "--weights", str(good)))
    assert plan.weights == str(good)
    assert make_plan(parse("pretrained_conv1", "--weights", "auto")).weights == "auto"
    assert make_plan(parse("pretrained_conv1")).weights is None  # the demo default: "auto"
    empty = tmp_path / "empty.pt"
    empty.touch()
    with pytest.raises(UsageError, match=rf"condition pretrained_conv1: {re.escape(str(empty))}: "
                                         r"cannot read as a state dict \(empty or truncated"):
        make_plan(parse("pretrained_conv1", "--weights", str(empty)))
    resnet = tmp_path / "resnet.pt"
    torch.save(build_model("resnet18", num_classes=3, width=0.25).net.state_dict(), resnet)
    with pytest.raises(UsageError, match=r"condition pretrained_conv1: .*resnet.pt is not a state "
                                         r"dict of alexnet"):
        make_plan(parse("pretrained_conv1", "--weights", str(resnet)))
    with pytest.raises(UsageError, match=r"--weights .* but no selected condition has a "
                                         r"pretrained reference"):
        make_plan(parse("nsd_conv1_v1", "--weights", str(good)))
    # the same through the command line: one line, exit 2, and the dry run names the file
    proc = subprocess.run([sys.executable, "sweeps/run.py", "pretrained_conv1", "--dry-run",
                           "--weights", str(good)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0 and f"weights: {good} (pretrained conditions)" in proc.stdout


def test_sweep_files_from_other_editors_and_copies_load(tmp_path):
    """A UTF-8 byte-order mark (Windows editors) and CRLF line ends are not the TOML's; hidden
    files beside the sweeps (an Emacs lock link, a macOS AppleDouble file) are not sweeps."""
    folder = tmp_path / "conditions"
    shutil.copytree(SWEEP_DIR, folder)
    path = folder / "gabor_conv1.toml"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    (folder / ".#gabor_conv1.toml").symlink_to("root@host.1234:1700000000")  # dangling
    (folder / "._gabor_conv1.toml").write_bytes(b"\x00\x05\x16\x07" + bytes(60))
    assert list_sweeps(folder) == list_sweeps(SWEEP_DIR)
    assert load_sweep("gabor_conv1", folder).grid_size() == load_sweep(
        "gabor_conv1", SWEEP_DIR).grid_size()
    proc = subprocess.run([sys.executable, "sweeps/run.py", "--list", "--sweep-dir",
                           str(folder)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0 and proc.stdout.startswith("gabor_conv1"), proc.stderr
    # a name too long to become a run folder (NAME-demo_YYYYmmdd-HHMMSS, 255 bytes at most)
    long = "\u03b2" * 60
    shutil.copyfile(folder / "gabor_conv1.toml", folder / f"{long}.toml")
    with pytest.raises(SweepFileError, match=r"is 120 bytes; accepted: a sweep file name of at "
                                             r"most 100 bytes"):
        load_sweep(long, folder)
    # --list lists the sweeps that load and names the one that does not
    proc = subprocess.run([sys.executable, "sweeps/run.py", "--list", "--sweep-dir",
                           str(folder)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 2 and proc.stdout.startswith("gabor_conv1")
    assert len(proc.stdout.splitlines()) == len(list_sweeps(SWEEP_DIR))
    assert proc.stderr.count("\n") == 1 and "is 120 bytes" in proc.stderr


def test_a_utf8_path_under_an_ascii_locale_names_the_locale(tmp_path):
    """Under LC_ALL=C with PYTHONUTF8=0 (a cluster's bare environment) a UTF-8 path such as
    "résultats" was called "not valid UTF-8 (a path named in another encoding?)": the bytes
    are UTF-8, the locale is what reads them as ASCII. The line says so and names the way
    on; the post-processor gives the same."""
    folder = f"{tmp_path}/résultats"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG"))}
    env.update(LC_ALL="C", PYTHONUTF8="0", PYTHONIOENCODING="utf-8")
    said = (f"error: argument '{folder}' is UTF-8, but this Python reads arguments as ascii "
            f"(the locale: LC_ALL=C, PYTHONUTF8=0); accepted: a UTF-8 locale "
            f"(LC_ALL=C.UTF-8) or PYTHONUTF8=1\n")
    for argv in (["sweeps/run.py", "gabor_conv1", "--smoke-test", "--dry-run", "--storage"],
                 ["-m", "dashboards.pareto", "gabor_conv1", "--out"]):
        proc = subprocess.run([sys.executable, *argv, folder], cwd=REPO, capture_output=True,
                              env=env)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.decode("utf-8") == said


def test_a_path_not_in_utf8_is_refused_and_a_utf8_link_to_it_works(tmp_path):
    """A folder named in Latin-1: Python carries its bytes as surrogates, which Ray's start-up
    (and a strict UTF-8 console) failed to encode mid-run. Refused in one line; a symbolic
    link with a UTF-8 name is accepted and kept as given (not resolved back to the bytes)."""
    from imagenet_tree import write_imagenet_tree

    root = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9 data"))
    write_imagenet_tree(root, n_classes=2, n_train=2, n_val=5, sizes=((32, 24),))
    link = tmp_path / "imagenet"
    link.symlink_to(root)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}  # a strict UTF-8 console
    argv = ["gabor_conv1", "--data", "imagenet", "--dry-run", "--set", "batch_size=4",
            "--imagenet-root"]
    proc = subprocess.run([sys.executable, "sweeps/run.py", *argv, str(root)], cwd=REPO,
                          capture_output=True, text=True, env=env, errors="replace")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr == (f"error: argument '{tmp_path}/caf\\xe9 data' is not valid UTF-8 (a "
                           f"path named in another encoding?); accepted: UTF-8 arguments -- "
                           f"reach such a folder through a symbolic link with a UTF-8 name\n")
    stray = next((link / "train").iterdir()) / "notes.txt"  # no image: left out, and said
    stray.write_text("x")
    proc = subprocess.run([sys.executable, "sweeps/run.py", *argv, str(link)], cwd=REPO,
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (f"data: ImageNet folder {link} at 224 px: 2 classes, 4 train / 10 val images; 1 "
            f"other file skipped, as torchvision "
            f"skips them (e.g. {stray}; accepted image extensions: ") in proc.stdout


def test_a_symlinked_kaggle_cls_loc_is_planned_from_the_path_given(tmp_path):
    """Kaggle's CLS-LOC moved to fast storage and linked back beside its LOC_*.csv files: the
    plan keeps the link (the CSV three folders above it labels the flat val), as the library
    does. It used to resolve the link and refuse a 'flat val without a devkit'."""
    from test_imagenet import _kaggle_tree

    _, root = _kaggle_tree(tmp_path)
    fast = tmp_path / "fast" / "CLS-LOC"
    fast.parent.mkdir()
    root.rename(fast)
    root.symlink_to(fast)
    plan = make_plan(parse("gabor_conv1", "--data", "imagenet", "--imagenet-root", str(root),
                           "--set", "val_folds=2", "--set", "batch_size=8"))
    assert plan.data["gabor_conv1"].imagenet_root == str(root)


def test_database_tracking_stores_are_checked_before_anything_starts():
    """A postgresql:// store passed the plan, then failed on its missing driver after Ray had
    started and the data was prepared. Refused by the plan; a database that does not answer
    is refused by the service check (TCP connect to its port)."""
    import importlib.util

    from records.uris import tracking_unreachable

    if importlib.util.find_spec("pymssql") is None:
        with pytest.raises(UsageError, match=re.escape(
                "--mlflow-uri 'mssql+pymssql://u:***@db.example/x': its database driver is not "
                "installed (no module 'pymssql'); install it in this environment (and on every "
                "Ray node), e.g. pip install pymssql")):
            make_plan(parse("nsd_conv1_v1", "--mlflow-uri", "mssql+pymssql://u:pw@db.example/x"))
    port = _closed_port()
    assert tracking_unreachable(f"postgresql://u:pw@127.0.0.1:{port}/db",
                                timeout=2) == "Connection refused"
    assert tracking_unreachable("sqlite:////tmp/x.db") is None
    with pytest.raises(UsageError, match="in-memory store keeps nothing"):
        make_plan(parse("nsd_conv1_v1", "--mlflow-uri", "sqlite:///:memory:"))


def test_a_trial_that_never_started_is_named_by_its_folder(tmp_path):
    """Interrupted before a trial started, Tune's result for it has no config: the summary said
    '?'. Its folder is named by its key (TrialNamer), which names it now."""
    from types import SimpleNamespace

    from sweeps.execute import _outcome

    plan = make_plan(parse("nsd_conv1_v1", "--smoke-test"))
    key = "nsd_conv1_v1-min-a0.8-b1-s0"
    result = SimpleNamespace(config={}, metrics={}, path=str(tmp_path / key), error=None,
                             checkpoint=None)
    outcome = _outcome(plan, result)
    # (nor was it "not started", as it said: a trial stopped in its first epoch has no
    # metrics either)
    assert (outcome.trial_id, outcome.state) == (key, "no epoch finished")


def test_a_grid_too_large_to_run_is_refused_before_it_is_built(tmp_path):
    """1000 alphas x 1000 betas planned 2,002,002 trials over minutes; a plan above
    MAX_TRIALS is refused before its trials are built, counting the seeds (the smoke test
    runs 3 a condition)."""
    from sweeps.plan import MAX_TRIALS

    text = (SWEEP_DIR / "nsd_conv1_v1.toml").read_text()
    alphas = ", ".join(str(0.01 * (k + 1)) for k in range(200))
    betas = ", ".join(str(k + 1) for k in range(30))
    text = text.replace("alphas = [0.1, 0.2, 0.4, 0.8]\nbetas = [1]",
                        f"alphas = [{alphas}]\nbetas = [{betas}]")
    assert "betas = [1, 2," in text
    (tmp_path / "huge.toml").write_text(text)
    # 2 x 200 x 30 + 1, and the demo control's 2 x 1 x 30 + 1
    with pytest.raises(UsageError, match=(
            rf"^sweep huge with --seeds 1 plans 12062 trials at demo scale; accepted: at most "
            rf"{MAX_TRIALS} in one invocation -- fewer alphas, betas or seeds, or the "
            rf"conditions split over several sweep files$")):
        make_plan(parse("huge", "--sweep-dir", str(tmp_path)))
    # the paper's sweep with seeds up to the cap plans; the smoke test is never refused
    assert make_plan(parse("paper", "--seeds", str(MAX_TRIALS // 82))).n_trials <= MAX_TRIALS
    with pytest.raises(UsageError, match=r"plans 10086 trials at demo scale"):
        make_plan(parse("paper", "--seeds", "123"))
    assert len(make_plan(parse("huge", "--sweep-dir", str(tmp_path), "--smoke-test")).trials) == 3


def test_only_reads_brackets_of_a_sweep_name_literally(tmp_path):
    """A lab's sweep file a[1].toml: --only 'a[1]-none-*' read [1] as a character class and
    matched nothing; it is read literally when that is what matches. A class still works
    where it matches, and a pattern matching nothing either way is still refused."""
    shutil.copy(SWEEP_DIR / "gabor_conv1.toml", tmp_path / "a[1].toml")
    argv = ("a[1]", "--sweep-dir", str(tmp_path))
    plan = make_plan(parse(*argv, "--only", "a[1]-none-*"))
    assert [t.trial_id for t in plan.trials] == ["a[1]-none-a0-b1-s0"]
    plan = make_plan(parse(*argv, "--only", "a[1]-m??-a8-b1-*"))
    assert sorted(t.trial_id for t in plan.trials) == ["a[1]-max-a8-b1-s0", "a[1]-min-a8-b1-s0"]
    plan = make_plan(parse("gabor_conv1", "--only", "gabor_conv1-m[a]x-a8-b1-*"))  # a class
    assert [t.trial_id for t in plan.trials] == ["gabor_conv1-max-a8-b1-s0"]
    with pytest.raises(UsageError, match=r"--only 'a\[2\]-\*' matches no trial"):
        make_plan(parse(*argv, "--only", "a[2]-*"))


@pytest.mark.parametrize("argv, match", [
    (["nsd_conv1_v1", "--set", "voxel_ncsnr_min=50"],
     r"trial nsd_conv1_v1-none-a0-b1-s0: voxel_ncsnr_min=50\.0 keeps no voxel of subject 1 "
     r"\(its largest ncsnr is [\d.]+\); accepted: 0 \(all voxels\) to [\d.]+$"),
    # (the simulated single-label world's splits follow from its arguments: refused by the
    # plan already, test_the_dry_run_sizes_the_simulated_single_label_splits)
    # NSD: each subject is scored on its own images of the validation subset, and none of
    # the two subjects has 2 x val_folds of them (each trial failed after an epoch)
    (["nsd_conv1_v1", "--set", "val_folds=14"],
     r"trial nsd_conv1_v1-none-a0-b1-s0: val_folds=14 needs 28 validation images of one "
     r"subject, but the fixed validation subset \(all 40 validation images\) gives subject 1: "
     r"24, subject 2: 24; accepted: val_folds <= 12 \(--set val_folds=N\)$"),
    (["nsd_conv1_v1", "--set", "val_images=10"],
     r"val_folds=5 needs 10 validation images of one subject, but the fixed validation subset "
     r"\(val_images=10 of the 40 validation images\) gives subject 1: 6, subject 2: 6; "
     r"accepted: val_folds <= 3 \(--set val_folds=N\) or a larger val_images"),
    # a loss no batch of the first epoch can apply (two subjects share a batch of 16): each
    # promoting and suppressing trial failed once Ray had scheduled it (exit 1, Tune's table)
    (["nsd_conv1_v1", "--set", "batch_size=16", "--set", "loss_folds=8"],
     r"^trial nsd_conv1_v1-max-a0\.8-b1-s0: loss_folds=8 needs 16 rows of a reference group "
     r"\(subject\) in a batch, but the first epoch's \d+ batches' groups hold at most \d+ rows "
     r"\(batch_size=16\).*accepted: loss_folds=0 \(exact leave-one-out, 3 rows\) or 2\.\.\d+ "
     r"or a larger batch_size$"),
])
def test_settings_the_prepared_data_cannot_meet_are_refused_before_any_record(argv, match,
                                                                             monkeypatch):
    """Each passed the plan, then failed every trial after an epoch (three times over), or
    (batch_size) trained on the whole split while MLflow recorded 500. The driver prepares
    the data before it records anything, and checks them there (no Ray needed). Of the
    simulated NSD-like world, the dry run asks the same (it was refused only after Ray had
    started): the world and its ROI table are made there."""
    import sweeps.plan
    from sweeps.execute import _prepare

    with pytest.raises(UsageError, match=match):
        make_plan(parse(*argv, "--smoke-test"))
    # the driver's own check, of data the dry run cannot prepare (a real release's table)
    monkeypatch.setattr(sweeps.plan, "_check_simulated_nsd", lambda *args: None)
    plan = make_plan(parse(*argv, "--smoke-test"))
    with pytest.raises(UsageError, match=match):
        _prepare(plan)


@pytest.mark.parametrize("argv, match", [
    (["gabor_conv1", "--set", "batch_size=500"],
     r"batch_size=500 but the training split of the simulated single-label world \(4 "
     r"categories\) holds 64 images; accepted: batch_size <= 64"),
    (["gabor_conv1", "--set", "val_folds=20", "--set", "val_images=40"],
     r"val_folds=20 needs 40 validation images but the validation split of the simulated "
     r"single-label world \(4 categories\) holds 32; accepted: val_folds <= 16"),
])
def test_the_dry_run_sizes_the_simulated_single_label_splits(argv, match):
    """The default data's splits follow from the world's arguments (categories x images per
    class): the dry run accepted what the run then refused once the data was prepared. The
    prepared data are checked too, with the same rule (split_size_problem)."""
    from sweeps.execute import _prepare

    with pytest.raises(UsageError, match=match):
        make_plan(parse(*argv, "--smoke-test"))
    plan = make_plan(parse("gabor_conv1", "--smoke-test"))
    prepared, _ = _prepare(plan)  # the prepared world has the sizes the plan computed
    data = prepared["gabor_conv1"]
    assert (len(data.train), len(data.val)) == (64, 32)


def test_a_signal_while_the_first_records_are_written_is_acted_on_after_them():
    """A SIGINT or SIGTERM in the middle of MLflow's store migrations left a half-migrated
    store every later run refused (and a Ctrl-C there was swallowed): the driver holds both
    back while its first records are written, then acts on them as Ctrl-C, with the
    process's handlers as they were."""
    import signal

    from sweeps.execute import _signals_deferred

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    done = []
    with pytest.raises(KeyboardInterrupt):
        with _signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            done.append("the block ran to its end")
    assert done == ["the block ran to its end"]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    with _signals_deferred():  # no signal: nothing raised
        pass


def test_a_resume_refuses_a_weights_file_replaced_at_the_same_path(tmp_path):
    """Only --weights' path was fingerprinted: a best.ckpt overwritten between invocations
    gave the resumed trials another reference network than the finished ones."""
    import dataclasses
    import json

    from sweeps.plan import FINGERPRINT_FILE, check_fingerprint, fingerprint

    weights = tmp_path / "best.ckpt"
    weights.write_bytes(b"first network")
    plan = dataclasses.replace(
        make_plan(parse("pretrained_conv5", "--smoke-test", "--storage", str(tmp_path / "r"))),
        weights=str(weights))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / FINGERPRINT_FILE).write_text(json.dumps(fingerprint(plan)))
    check_fingerprint(plan, run_dir)
    weights.write_bytes(b"another network")
    with pytest.raises(UsageError, match=r"run was started with a different --weights file "
                                         r"content \(sha256\) \('[0-9a-f]{64}', now "
                                         r"'[0-9a-f]{64}'\)"):
        check_fingerprint(plan, run_dir)
    recorded = json.loads((run_dir / FINGERPRINT_FILE).read_text())
    del recorded["weights_sha256"]  # fingerprinted before the content was: not checked
    (run_dir / FINGERPRINT_FILE).write_text(json.dumps(recorded))
    check_fingerprint(plan, run_dir)


def test_a_home_of_no_user_and_an_environment_setting_are_named_as_given(tmp_path, monkeypatch):
    """``~name`` naming no user made pathlib raise RuntimeError: exit 1 with a traceback file,
    and with ALIGNSWEEP_CACHE so two tracebacks on the console. A setting read from the
    environment was blamed on the flag, with advice ("omit --address") that changed nothing."""
    from dashboards import pareto
    from references import nsd
    from references.cache import traceback_file

    nobody = "~alignsweep_no_such_user"
    for argv, flag in (([f"--storage={nobody}/r"], "--storage"),
                       ([f"--weights={nobody}/w.pt", "--dry-run"], "--weights"),
                       ([f"--mlflow-uri=sqlite:///{nobody}/m.db"], "--mlflow-uri")):
        name = "pretrained_conv1" if flag == "--weights" else "nsd_conv1_v1"
        with pytest.raises(UsageError, match=rf"^{flag} '?(sqlite:///)?{nobody}/.*names no "
                                             r"user of this machine"):
            make_plan(parse(name, *argv))
    monkeypatch.setenv("ALIGNSWEEP_CACHE", f"{nobody}/cache")
    with pytest.raises(UsageError, match=rf"^ALIGNSWEEP_CACHE {nobody}/cache: {nobody} names"):
        make_plan(parse("nsd_conv1_v1"))
    log = traceback_file(RuntimeError("boom"))  # falls back to the temporary folder
    assert log.is_file() and log.parent.name == f"alignsweep-logs-{os.getuid()}"  # the user's
    monkeypatch.delenv("ALIGNSWEEP_CACHE")
    assert pareto.main(["nsd_conv1_v1", "--out", f"{nobody}/report"]) == 2
    assert nsd.main(["prepare", "--nsd-root", f"{nobody}/nsd", "--coco-annotations",
                     str(tmp_path), "--roi", "V1", "--out", str(tmp_path / "t.parquet")]) == 2

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    plan = make_plan(parse("nsd_conv1_v1"))
    assert (plan.address_from, plan.mlflow_from) == ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")
    with pytest.raises(UsageError, match=r"^RAY_ADDRESS 127.0.0.1:1: no Ray cluster answers "
                                         r".* or unset RAY_ADDRESS to start a local Ray$"):
        check_services(plan, timeout=2)
    plan = make_plan(parse("nsd_conv1_v1", "--address", "127.0.0.1:1"))
    assert plan.address_from == "--address"
    with pytest.raises(UsageError, match=r"^--address 127.0.0.1:1: .* or omit --address"):
        check_services(plan, timeout=2)
    monkeypatch.setenv("RAY_ADDRESS", "local")  # Ray's word for a new local instance
    assert make_plan(parse("nsd_conv1_v1")).address is None
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(UsageError, match=r"^MLFLOW_TRACKING_URI http://127.0.0.1:1: tracking "
                                         r"server unreachable .*; start it \(mlflow server "
                                         r".* or unset MLFLOW_TRACKING_URI for the local"):
        check_services(make_plan(parse("nsd_conv1_v1")), timeout=2)
    with pytest.raises(UsageError, match=r"^--mlflow-uri HTTP://127.0.0.1:1: .*; start it "
                                         r"\(mlflow server"):  # the scheme in any case
        check_services(make_plan(parse("nsd_conv1_v1", "--mlflow-uri", "HTTP://127.0.0.1:1")),
                       timeout=2)


def test_sweep_names_a_lab_may_give_are_refused_or_found_as_written(tmp_path):
    """A file named in another Unicode form than the name typed (a Mac's NFD) was "unknown
    sweep 'café'; known: café"; an empty --sweep-dir was the working folder; a composite's
    member escaped the name-length limit; a control character broke the dry run's table;
    a grid past the trial cap was expanded (20 s, 1.7 GB) before being refused."""
    import unicodedata

    from sweeps.run import main

    text = (SWEEP_DIR / "gabor_conv1.toml").read_text()
    nfd = unicodedata.normalize("NFD", "café")
    (tmp_path / f"{nfd}.toml").write_text(text)
    with pytest.raises(UsageError, match=rf"unknown sweep 'café': the file {nfd}.toml spells it "
                                         r"in another Unicode form \(NFD against NFC\)"):
        make_plan(parse("café", "--sweep-dir", str(tmp_path)))
    assert make_plan(parse(nfd, "--sweep-dir", str(tmp_path))).n_trials == 33
    # a composite typing the name: "includes 'café', not a sweep; known: ..., café"
    (tmp_path / "both.toml").write_text('description = "x"\nincludes = ["café"]\n')
    with pytest.raises(SweepFileError, match=rf"both.toml: includes 'café': the file {nfd}.toml "
                                             r"spells it in another Unicode form \(NFD against "
                                             r"NFC\); accepted: the name as the file spells it"):
        load_sweep("both", tmp_path)
    (tmp_path / "both.toml").unlink()
    assert main(["--sweep-dir", "", "--list"]) == 2
    long = "m" * 101
    (tmp_path / f"{long}.toml").write_text(text)
    (tmp_path / "c.toml").write_text(f'description = "x"\nincludes = ["{long}"]\n')
    with pytest.raises(SweepFileError, match=rf"{long}.toml: the name 'm+'\.\.\. is 101 bytes"):
        load_sweep("c", tmp_path)
    (tmp_path / "tab\there.toml").write_text(text)
    with pytest.raises(SweepFileError, match=r"the name 'tab\\there' holds a control character"):
        load_sweep("tab\there", tmp_path)
    (tmp_path / "no\u00a0break.toml").write_text(text)  # printable or not, no control character
    assert load_sweep("no\u00a0break", tmp_path).name == "no\u00a0break"
    # invisible format characters: a right-to-left override showed "rtl\u202eevil" as
    # "rtllive"; a zero-width space made a name look like another's
    for name, code in (("rtl\u202eevil", "U+202E"), ("a\u200bb", "U+200B")):
        (tmp_path / f"{name}.toml").write_text(text)
        with pytest.raises(SweepFileError, match=r"holds invisible format character\(s\) "
                                                 rf"{re.escape(code)} \(text direction, zero "
                                                 r"width\)") as refused:
            load_sweep(name, tmp_path)
        assert name not in str(refused.value)  # shown escaped, not applied to the line
        (tmp_path / f"{name}.toml").unlink()
    persian = "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"  # the joiner a word is written with
    (tmp_path / f"{persian}.toml").write_text(text)
    assert load_sweep(persian, tmp_path).name == persian
    with pytest.MonkeyPatch.context() as mp:  # ~ in --sweep-dir, as in every path flag
        mp.setenv("HOME", str(tmp_path.parent))
        assert main(["--sweep-dir", f"~/{tmp_path.name}", "no\u00a0break", "--dry-run"]) == 0
    huge = (SWEEP_DIR / "nsd_conv1_v1.toml").read_text().replace(
        "alphas = [0.1, 0.2, 0.4, 0.8]\nbetas = [1]",
        f"alphas = [{', '.join(str((k + 1) / 10) for k in range(1000))}]\n"
        f"betas = [{', '.join(str(k + 1) for k in range(1000))}]")
    (tmp_path / "huge.toml").write_text(huge)
    from sweeps import spec

    def expanded(*args, **kwargs):
        raise AssertionError("the grid was expanded before the trial cap refused it")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(spec, "_expand", expanded)
        with pytest.raises(UsageError, match=r"plans 2002002 trials at demo scale"):
            make_plan(parse("huge", "--sweep-dir", str(tmp_path)))


def test_code_version_tells_a_clean_checkout_from_an_edited_one(tmp_path):
    """The parent run's ``code_modified`` tag: "false" on the commit as it is, "true" once a
    tracked file differs from it (untracked files do not count: a run's outputs land in the
    working folder), and no tags at all outside a git checkout."""
    from sweeps.execute import code_version

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), *args], check=True,
                              capture_output=True, text=True).stdout.strip()

    assert code_version(tmp_path) == {}
    git("init", "-q")
    (tmp_path / "train.py").write_text("alpha = 1\n")
    git("add", "train.py")
    git("-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-q", "-m", "one")
    commit = git("rev-parse", "HEAD")
    assert code_version(tmp_path) == {"mlflow.source.git.commit": commit,
                                      "code_modified": "false"}
    (tmp_path / "outputs.txt").write_text("a run's output\n")  # untracked
    assert code_version(tmp_path)["code_modified"] == "false"
    (tmp_path / "train.py").write_text("alpha = 2\n")
    assert code_version(tmp_path) == {"mlflow.source.git.commit": commit,
                                      "code_modified": "true"}
    # a copy unpacked inside another repository (a lab's monorepo, a $HOME kept in git),
    # untracked there: that repository's commit was recorded as this code's, "unmodified"
    copy = tmp_path / "vendor" / "alignsweep"
    copy.mkdir(parents=True)
    (copy / "run.py").write_text("alpha = 3\n")
    assert code_version(copy) == {}
    git("add", "vendor")  # tracked there: the monorepo's commit is the code's
    git("-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-q", "-m", "two")
    assert code_version(copy) == {"mlflow.source.git.commit": git("rev-parse", "HEAD"),
                                  "code_modified": "false"}  # (train.py is outside it)


def test_trials_get_every_tracking_setting_of_the_driver(monkeypatch):
    """A trial on another node has its node's environment, not the driver's: the tracking
    settings beyond the URI and credentials (a server certificate's path, INSECURE_TLS, a
    client certificate, MLFLOW_TRACKING_AUTH) did not reach it, and each of its writes was an
    outage (the trial then waited out the flush timeout, 900 s, after training). Every
    MLFLOW_TRACKING_* setting is passed; other variables are not."""
    from sweeps.execute import _worker_env

    given = {"MLFLOW_TRACKING_URI": "https://mlflow.lab:443",
             "MLFLOW_TRACKING_SERVER_CERT_PATH": "/etc/lab/ca.pem",
             "MLFLOW_TRACKING_INSECURE_TLS": "false",
             "MLFLOW_TRACKING_CLIENT_CERT_PATH": "/etc/lab/client.pem",
             "MLFLOW_TRACKING_AUTH": "basic-auth", "MLFLOW_TRACKING_USERNAME": "lab",
             "MLFLOW_TRACKING_PASSWORD": "secret"}
    for key, value in given.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("LAB_UNRELATED", "1")
    env = _worker_env()
    assert {k: env.get(k) for k in given} == given
    assert "LAB_UNRELATED" not in env


_TRIAL_ENV = """
import json, os, sys
from sweeps import execute  # first: it sets Ray's authentication mode before Ray is imported
from sweeps.ray_glue import ray

ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,
         object_store_memory=80 * 2**20, runtime_env={"env_vars": execute._worker_env()})


@ray.remote
def trial(keys):  # as run_trial begins
    execute.apply_driver_env()
    return {k: os.environ.get(k) for k in keys}


print(json.dumps(ray.get(trial.remote(sys.argv[1:]))))
"""


def test_a_trial_gets_the_drivers_settings_as_they_are_and_its_credentials_file(tmp_path):
    """Ray expands $NAME and ${NAME} in a runtime env's variables from each node's
    environment (and drops ${NAME} where NAME is unset): a tracking password or token, or a
    cache folder, holding a "$" reached the trials changed, and each write was refused by
    the server. The driver's ~/.mlflow/credentials, where MLflow also reads the user name
    and password, never reached trials on other nodes. Both now arrive as the driver has
    them, through a real local Ray."""
    home = tmp_path / "home"
    (home / ".mlflow").mkdir(parents=True)
    (home / ".mlflow" / "credentials").write_text(
        "[mlflow]\nmlflow_tracking_username = lab\nmlflow_tracking_password = pa$HOME${LAB_X}!\n")
    cache = tmp_path / "cache$USER"
    given = {"MLFLOW_TRACKING_TOKEN": "tok$PATH", "MLFLOW_TRACKING_SERVER_CERT_PATH": "/etc/ca.pem",
             "ALIGNSWEEP_CACHE": str(cache)}
    expected = {**given, "MLFLOW_TRACKING_USERNAME": "lab",
                "MLFLOW_TRACKING_PASSWORD": "pa$HOME${LAB_X}!"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    proc = subprocess.run([sys.executable, "-c", _TRIAL_ENV, *expected], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env={**env, **given, "HOME": str(home), "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == expected


def test_a_trial_refuses_code_other_than_the_drivers(tmp_path):
    """The driver tags its parent run with a digest of the project's code (``code_sha256``:
    every .py file of the packages trials import, git or not) and every trial compares its
    own copy's before it starts: a node where the driver's folder does not exist (a driver
    run from a laptop's checkout against nodes that hold an older copy) imported its own
    copy and trained with other code than the run recorded, silently. Here: a copy of the
    code hashes as the original, an edit to one file (or a file added) changes the digest,
    other files do not count, and the trial's refusal names both copies."""
    import socket as socket_module

    from sweeps import execute

    copy = tmp_path / "copy"
    for package in execute.CODE_PACKAGES:
        shutil.copytree(execute.CODE_ROOT / package, copy / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "README.md").write_text("not code\n")
    (copy / "sweeps" / "notes.txt").write_text("not code either\n")
    ours = execute.code_digest()
    assert re.fullmatch(r"[0-9a-f]{64}", ours)
    assert execute.code_digest(copy) == ours
    execute.code_digest.cache_clear()  # the copy changes below: no cached answers
    try:
        target = copy / "trainable" / "alignment.py"
        target.write_text(target.read_text() + "\n# a lab's edit\n")
        edited = execute.code_digest(copy)
        assert edited != ours
        (copy / "records" / "extra.py").write_text("")
        assert execute.code_digest.__wrapped__(copy) not in (ours, edited)
    finally:
        execute.code_digest.cache_clear()

    payload = execute.Payload(specs={}, data_refs={}, reference_refs={}, mlflow_uri="",
                              parent_run_id="", run_tags={})
    assert execute.code_mismatch(payload) is None  # an older driver's payload: no digest
    same = execute.Payload(**{**payload.__dict__, "code_sha256": ours})
    assert execute.code_mismatch(same) is None
    other = execute.Payload(**{**payload.__dict__, "code_sha256": edited,
                               "code_root": "/home/lab/alignsweep", "code_host": "laptop"})
    said = execute.code_mismatch(other)
    assert said == (f"node {socket_module.gethostname()} imports this project from "
                    f"{execute.CODE_ROOT}, whose code (sha256 {ours[:12]}) is not the driver's "
                    f"(/home/lab/alignsweep on laptop, sha256 {edited[:12]}); accepted: the "
                    f"driver's code on every node (its folder on a shared file system at the "
                    f"same path, or the same image)")
    assert issubclass(execute.CodeMismatch, RuntimeError)
    assert not issubclass(execute.CodeMismatch, execute._repeating_errors())  # retried


def test_ctrl_c_while_the_post_processor_still_imports_is_one_line(tmp_path):
    """A Ctrl-C in the post-processor's first seconds (its imports: MLflow, matplotlib,
    scipy) printed the imports' traceback; its own `except KeyboardInterrupt` did not exist
    yet. It is the one line `interrupted` now, as later. (The driver's own imports take a
    fraction of a second and are guarded the same way.)"""
    import signal

    command = ["-m", "dashboards.pareto", "gabor_conv1", "--mlflow-uri", "sqlite:///absent.db"]
    popen = subprocess.Popen([sys.executable, *command], cwd=tmp_path, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(REPO)},
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # the signal once the imports are loading: pyarrow's libraries mapped (it is imported
    # right after the hook, MLflow and matplotlib take 1-2 s more). A fixed 0.5 s sleep sent it
    # before the interpreter reached the hook on a loaded machine (a traceback, the test failed)
    deadline = time.monotonic() + 60
    while "libarrow" not in Path(f"/proc/{popen.pid}/maps").read_text():
        assert popen.poll() is None and time.monotonic() < deadline, popen.communicate()
        time.sleep(0.01)
    popen.send_signal(signal.SIGINT)
    _, err = popen.communicate(timeout=60)
    assert err == "interrupted\n" and popen.returncode in (130, -signal.SIGINT), err



def test_a_sigterm_while_ray_shuts_down_reaches_the_driver(tmp_path):
    """ray.shutdown() resets SIGTERM's action to the default at the OS level about 35 ms in,
    for the rest of its second (Python's signal.getsignal still names the driver's handler):
    a SIGTERM then, after the trials ended, killed the driver without a word (exit 143, the
    parent run RUNNING, no resume line). It now reaches the driver's handler."""
    import signal

    code = """
import os, signal, sys, threading
from sweeps import execute  # first: it sets Ray's authentication mode before Ray is imported
import ray
ray.init(address="local", num_cpus=1, include_dashboard=False, object_store_memory=80 * 2**20)
got = []
signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
execute._shutdown_ray()
print("got", got, signal.getsignal(signal.SIGTERM) is execute._sigterm_as_sigint)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.splitlines()[-1] == f"got [{int(signal.SIGTERM)}] True", proc.stdout


def test_a_sigterm_ends_a_driver_whose_sigint_is_ignored(tmp_path):
    """A driver started in the background by a script (``cmd &``) inherits SIGINT ignored:
    SIGTERM, sent on as SIGINT, was dropped outside Tune's fit() (the report was built and
    the driver exited 0). It is KeyboardInterrupt there; SIGINT's own handler, where Python
    has one, still receives it."""
    code = """
import os, signal, time
from sweeps import execute
signal.signal(signal.SIGTERM, execute._sigterm_as_sigint)
for sigint in (signal.SIG_IGN, signal.SIG_DFL, signal.default_int_handler, "own"):
    got = []
    signal.signal(signal.SIGINT, (lambda s, f: got.append(s)) if sigint == "own" else sigint)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)
        print("nothing", got)
    except KeyboardInterrupt:
        print("interrupted")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.splitlines() == ["interrupted"] * 3 + ["nothing [2]"], proc.stdout


def test_ctrl_c_that_an_extension_turns_into_its_own_error_is_one_line(tmp_path):
    """A Ctrl-C that lands in a C extension's initialisation comes back as that import's
    error (seen in the suite: matplotlib's ft2font raised `ImportError: initialization
    failed` from the KeyboardInterrupt), and it printed both tracebacks, then crashed the
    interpreter's shutdown ("Fatal Python error: PyThreadState_Get"). It is the one line
    `interrupted` and status 130 too. (Raised here as the extension raises it: the window
    of a real one is a few milliseconds.)"""
    code = ("from references.cache import quiet_interrupts; quiet_interrupts(); "
            "raise ImportError('initialization failed') from KeyboardInterrupt()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert (proc.stderr, proc.returncode) == ("interrupted\n", 130), proc.stderr
    # any other error keeps its traceback
    code = code.replace("from KeyboardInterrupt()", "from ValueError('other')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "ValueError: other" in proc.stderr and proc.returncode == 1, proc.stderr

_SIGNAL_IN_A_CALLBACK = """
import signal, sys, time, weakref

sys.path.insert(0, {repo!r})
if {hook}:
    from sweeps.execute import keep_exit_signals

    keep_exit_signals()


def sigterm_handler(signum, frame):  # a Ray worker's (ray/_private/worker.py main_loop)
    sys.exit(1)


signal.signal(signal.SIGTERM, sigterm_handler)


class Thing:
    pass


def collected(ref):  # run by the garbage collector: an exception here cannot propagate
    signal.raise_signal(signal.SIGTERM)  # the handler runs here, inside the callback
    for _ in range(100):
        pass
    {then}


thing = Thing()
ref = weakref.ref(thing, collected)
del thing
print("running on", flush=True)
time.sleep(3)
print("never stopped", flush=True)
"""


@pytest.mark.parametrize("hook", [False, True])
def test_a_sigterm_that_lands_in_a_collector_callback_still_ends_the_worker(tmp_path, hook):
    """Ray's worker SIGTERM handler raises SystemExit wherever the main thread is. Inside a
    weakref callback Python prints "Exception ignored in ... SystemExit: 1" and the worker goes
    on: a traceback relayed into the driver's output of a sweep that went well (seen in a
    smoke run). The trial worker's hook (``keep_exit_signals``) sends the signal again, so
    the worker ends as asked and nothing is printed; other lost exceptions are still shown."""
    script = tmp_path / "worker.py"
    script.write_text(_SIGNAL_IN_A_CALLBACK.format(repo=str(REPO), hook=hook, then="pass"))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60)
    if not hook:  # the defect, as Python has it
        assert proc.returncode == 0 and "never stopped" in proc.stdout, proc
        assert "Exception ignored in" in proc.stderr and "SystemExit: 1" in proc.stderr
        return
    assert proc.returncode == 1, proc
    assert proc.stdout == "running on\n" and proc.stderr == "", proc
    # an exception of another kind lost in a callback is reported as before
    script.write_text(_SIGNAL_IN_A_CALLBACK.format(
        repo=str(REPO), hook=hook, then="raise ValueError('lost in a callback')")
        .replace("signal.raise_signal(signal.SIGTERM)", "pass"))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "never stopped" in proc.stdout, proc
    assert "Exception ignored in" in proc.stderr and "ValueError: lost in a callback" in \
        proc.stderr, proc.stderr


def test_bad_inputs_probed_at_stop_32_are_one_line_naming_what_is_accepted(tmp_path, capsys,
                                                                           monkeypatch):
    """Each passed, or was refused without saying what is accepted: a --set value of two lines
    (TOML read the first, the second setting was dropped without a word); ridge_rel=1e308
    (the score overflowed and the trial failed as "diverged", naming lr); a subnormal lr; a
    number for a text setting ("accepted: a string"); a one-point grid widened past what a
    trial accepts (half the search's samples would fail when they started); a malformed
    RAY_ADDRESS (told to "omit --address"); argparse's "invalid int value"; an option that
    does not exist; a text-direction override in a description (it reordered --list); an
    empty --sweep-dir (--list printed an empty line, exit 0) and a file given as one ("no
    such directory"); --mlflow-uri databricks without credentials (the run failed after Ray
    had started, exit 1)."""
    from sweeps.plan import optuna_bounds
    from sweeps.run import main
    from trainable.config import FLOAT32_TINY

    def refused(*argv: str) -> str:
        assert main(["nsd_conv1_v1", "--dry-run", "--storage", str(tmp_path / "st"),
                     "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: "), err
        return err

    assert "a value of several lines; accepted: one KEY=VALUE per --set" in refused(
        "--set", "epochs=1\nlr=5")
    assert "ridge_rel=1e+308; accepted: a number of magnitude <= 1e+06" in refused(
        "--set", "ridge_rel=1e308")
    assert f"lr=1e-40; accepted: a number in {FLOAT32_TINY:.4g}..1000" in refused(
        "--set", "lr=1e-40")
    # width 16 was accepted: AlexNet's first allocation there is 36 GB, in every trial
    assert "width=16.0; accepted: a number of magnitude <= 4" in refused("--set", "width=16")
    assert "precision=16; accepted: auto, fp32, bf16" in refused("--set", "precision=16")
    assert "argument --seeds: '1.5'; accepted: an integer in 1..1000" in refused(
        "--seeds", "1.5")
    assert "unrecognized arguments: --foo; accepted: the options" in refused("--foo")
    # a Ray Client address where Ray Client is not installed (the README's install): the run
    # failed after Ray's import with "Ray Client requires pip package ray[client]", exit 1
    import importlib.util

    if importlib.util.find_spec("grpc") is None:
        assert ("--address 'ray://127.0.0.1:10001': a Ray Client address, but this install "
                "lacks Ray Client (pip install 'ray[client]'); accepted: HOST:PORT") in refused(
            "--address", "ray://127.0.0.1:10001")
    monkeypatch.setenv("RAY_ADDRESS", "garbage")
    assert "RAY_ADDRESS 'garbage'; accepted: auto, HOST:PORT" in refused()
    assert "unset RAY_ADDRESS to start a local Ray" in refused()
    monkeypatch.delenv("RAY_ADDRESS")
    assert optuna_bounds([1e6]) == (2.5e5, 1e6, True)
    assert optuna_bounds([2e-38])[0] == FLOAT32_TINY
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--list", "--sweep-dir", str(empty)]) == 2
    assert capsys.readouterr().err == (f"error: --sweep-dir {empty}: no .toml file in it; "
                                       f"accepted: a folder of sweep .toml files (the format: "
                                       f"sweeps/spec.py)\n")
    assert main(["--list", "--sweep-dir", str(SWEEP_DIR / "gabor_conv1.toml")]) == 2
    assert ": not a directory; accepted" in capsys.readouterr().err
    text = (SWEEP_DIR / "gabor_conv1.toml").read_text()
    described = re.sub(r'(?m)^description = ".*"$', 'description = "abc\\\\u202eevil"', text)
    assert described != text
    (empty / "rtl.toml").write_text(described)
    with pytest.raises(SweepFileError, match=r"the description holds invisible format "
                                             r"character\(s\) U\+202E"):
        load_sweep("rtl", empty)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.databrickscfg
    for var in ("DATABRICKS_HOST", "DATABRICKS_TOKEN", "DATABRICKS_CONFIG_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    assert ("--mlflow-uri databricks: no Databricks credentials found; accepted: "
            "DATABRICKS_HOST and DATABRICKS_TOKEN") in refused("--mlflow-uri", "databricks")
    assert not (tmp_path / "st").exists()


def test_a_composites_bad_member_is_named_with_the_composite(tmp_path):
    """A member's error named only the member's file: a paper run refused for a file it never
    named, and --list printed the same line twice (for the member and for the composite)."""
    text = (SWEEP_DIR / "gabor_conv1.toml").read_text()
    (tmp_path / "member.toml").write_text(re.sub(r"(?m)^alphas = .*$", "alphas = [0.1, 0.1]",
                                                 text))
    (tmp_path / "both.toml").write_text('description = "x"\nincludes = ["member"]\n')
    with pytest.raises(SweepFileError) as member:
        load_sweep("member", tmp_path)
    with pytest.raises(SweepFileError) as both:
        load_sweep("both", tmp_path)
    assert str(both.value) == f"{member.value} (included by {tmp_path / 'both.toml'})"


def test_a_run_that_set_its_metric_before_it_was_refused_can_still_resume():
    """--set metric was refused at stop 36 (the condition names its metric); a run started
    before with it repeats it on --resume, which accepts it there only (the run's fingerprint
    then holds it to the value the run started with)."""
    from sweeps.spec import parse_override

    with pytest.raises(ValueError, match=r"^--set metric: metric is set by the sweep's grid"):
        parse_override("metric=cka")
    assert parse_override("metric=cka", resume=True) == ("metric", "cka")
    with pytest.raises(ValueError, match=r"^--set alpha: alpha is set by the sweep's grid"):
        parse_override("alpha=2", resume=True)


def test_a_trials_run_tags_read_back_as_the_driver_wrote_them():
    """A trial's child-run tags have one owner (``records.TrialRunTags``): a trial's tags
    (an Optuna sample's included) read back as written, and a run another tool nested under
    the parent (no trial_id or condition) is not taken for a trial."""
    from records import TRIAL_ID_TAG, TrialKey, TrialRunTags, is_trial_run

    plan = make_plan(parse("nsd_conv1_v1", "--smoke-test"))
    for spec in plan.trials:
        tags = spec.tags()
        named = TrialRunTags.parse(tags)
        assert named.format() == tags and named.is_trial and is_trial_run(tags)
        assert TrialKey.parse(tags[TRIAL_ID_TAG]) == TrialKey.of(
            spec.condition, spec.alpha, spec.beta, spec.seed)
        assert float(named.alpha) == spec.alpha and int(named.seed) == spec.seed
    sample = TrialRunTags.of(TrialKey.of("c", -0.123456, 2.0, 3, sample="ab12"))
    assert sample == TrialRunTags(trial_id="c-min-a0.1235-b2-s3-oab12", condition="c",
                                  direction="min", alpha="-0.123456", beta="2", seed="3")
    assert TrialRunTags.parse(sample.format()) == sample
    assert not is_trial_run({"mlflow.runName": "notebook"})
    assert TrialRunTags.parse({TRIAL_ID_TAG: "x"}) == TrialRunTags(trial_id="x")


def test_the_run_folders_parent_pointer_reads_back_as_written(tmp_path):
    """mlflow_parent.json has one writer and one reader (``records.ParentPointer``); what is
    not an object with a run id reads as no run, and an unreadable file is one ValueError."""
    from records import PARENT_FILE, ParentPointer, read_json_object

    path = tmp_path / PARENT_FILE
    path.write_text(ParentPointer("abc123", "http://u:***@host:5000").format())
    assert ParentPointer.read(path) == ParentPointer("abc123", "http://u:***@host:5000")
    assert ParentPointer.parse({"run_id": 7, "mlflow_uri": ""}) == ParentPointer(None, None)
    for text, why in (('{"run_id": "a"', r"^Expecting|^Unterminated"),
                      ("[1]", r"^a JSON list, not an object$")):
        path.write_text(text)
        with pytest.raises(ValueError, match=why):
            read_json_object(path)
    with pytest.raises(ValueError, match="No such file"):
        ParentPointer.read(tmp_path / "gone.json")


def test_the_parent_runs_tags_read_back_as_the_driver_wrote_them():
    """The parent run's tags have one owner (``records.SweepRunTags``): what the driver
    writes of a run reads back the same, a ``--set`` value holding a comma included (the
    resume line split it into two --set words, the second refused), and the report's resume
    command repeats every option the tags record."""
    from dashboards.pareto import _run_command
    from dashboards.sources import SweepRecord
    from records import SweepRunTags, parse_overrides
    from sweeps.execute import sweep_run_tags

    plan = make_plan(parse("nsd_conv1_v1", "--smoke-test", "--seeds", "2", "--only",
                           "nsd_conv1_v1-max-*", "--set", "epochs=2",
                           "--set", "ridge_rel=1e-3"))
    recorded = sweep_run_tags(plan)
    tags = recorded.format()
    assert SweepRunTags.parse(tags) == recorded
    assert (tags["smoke"], tags["seeds"], tags["only"], tags["overrides"]) == (
        "true", "2", "nsd_conv1_v1-max-*", "epochs=2,ridge_rel=0.001")
    assert recorded.trials == plan.n_trials and recorded.planned == plan.planned
    assert recorded.subjects == ()  # the simulated world: no NSD subjects to compare
    assert set(recorded.trial_run_tags()) <= set(tags)
    # lenient on a store a user edited: what does not read is taken as not recorded
    assert SweepRunTags.parse({"sweep": "s", "subjects": "1,\u00b2", "planned": "[1]",
                               "seeds": "x"}) == SweepRunTags(sweep="s", subjects=(1,))
    # a value holding commas (a path) stays one override
    assert parse_overrides("a=/x,y/z.pt,epochs=2") == {"a": "/x,y/z.pt", "epochs": "2"}
    with pytest.raises(ValueError, match="is not key=value"):
        parse_overrides("epochs")
    record = SweepRecord(sweep=plan.sweep, experiment=plan.experiment, source="test",
                         parent_run_id=None, parent_status="KILLED",
                         parent_tags={**tags, "overrides": "weights=/w,1/a.pt,epochs=2"},
                         trials=(), fetch=lambda *a: None)
    assert _run_command(record) == (
        "sweeps/run.py nsd_conv1_v1 --smoke-test --seeds 2 --set weights=/w,1/a.pt "
        "--set epochs=2 --only 'nsd_conv1_v1-max-*'")


def test_a_local_rays_own_folders_are_checked_before_it_starts(tmp_path, monkeypatch):
    """What a local Ray writes outside the run's folders passed the dry run, and the run
    then failed in ray.init ("an unexpected error", exit 1): a TMPDIR too long for its
    socket paths (Linux's 107 bytes) or named in non-ASCII letters, a temporary folder that
    takes no files, a HOME where its token (~/.ray/auth_token) cannot be written. Each is
    now the plan's one line naming the variable; a token given in RAY_AUTH_TOKEN needs no
    HOME, and a cluster joined with --address needs none of them."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    from sweeps.plan import RAY_SOCKET_SUFFIX, UNIX_SOCKET_PATH_MAX, _pid_digits

    argv = ("gabor_conv1", "--smoke-test", "--storage", str(tmp_path / "r"))
    # the longest folder every pid's socket paths fit under (39 bytes where pids have 7
    # digits; a trailing "/" is not counted: Ray joins "ray" to it)
    most = UNIX_SOCKET_PATH_MAX - RAY_SOCKET_SUFFIX - _pid_digits() - len("/ray")
    fits = "/tmp/" + "a" * (most - len("/tmp/"))
    for value in (fits, fits + "/"):
        monkeypatch.setenv("TMPDIR", value)
        make_plan(parse(*argv))
    accepted = (rf"; accepted: a writable folder with an ASCII name of at most {most} bytes "
                r"for a local Ray's files \(RAY_TMPDIR or TMPDIR, e\.g\. /tmp\), or --address "
                r"of a running cluster$")
    for value, why in ((fits + "b", rf"Ray's socket paths under it would be up to "
                                    rf"{UNIX_SOCKET_PATH_MAX + 1} bytes, over the 107 Linux "
                                    rf"allows"),
                       ("/tmp/résultats", "Ray's core worker cannot read a folder name with "
                                          "non-ASCII characters"),
                       ("/proc/ray-tmp", r"/proc (does not take files \(.*\)|is not writable)")):
        monkeypatch.setenv("TMPDIR", value)
        with pytest.raises(UsageError, match="^" + re.escape(f"TMPDIR={value}: ") + why
                           + accepted):
            make_plan(parse(*argv))
    monkeypatch.setenv("RAY_TMPDIR", "/tmp")  # Ray's own variable comes first
    make_plan(parse(*argv))
    # ... but Python's own (TMPDIR) holds the trials' data-loading sockets: with RAY_TMPDIR
    # short and TMPDIR long, each trial hung for ever ("AF_UNIX path too long" in a log)
    import tempfile

    base = Path(tempfile.mkdtemp(dir="/tmp"))  # (tmp_path may be near 75 bytes itself)
    long = base / ("l" * (107 - 32 - len(str(base)) - 1))  # 75 bytes
    long.mkdir()
    monkeypatch.setenv("TMPDIR", str(long))
    monkeypatch.setattr(tempfile, "tempdir", None)  # (read once per process)
    make_plan(parse(*argv))
    longer = base / ("l" * (108 - 32 - len(str(base)) - 1))
    longer.mkdir()
    monkeypatch.setenv("TMPDIR", str(longer))
    monkeypatch.setattr(tempfile, "tempdir", None)
    with pytest.raises(UsageError, match="^" + re.escape(
            f"the temporary folder {longer} (TMPDIR): the trials' data-loading processes make "
            f"sockets under it of up to 108 bytes, over the 107 Linux allows; accepted: a "
            f"TMPDIR of at most 75 bytes (e.g. /tmp), or --address of a running cluster")
            + "$"):
        make_plan(parse(*argv))
    # a joined cluster's nodes have TMPDIRs of their own: each trial asks its node's, as
    # run_trial does before it trains (its trials hung there as well)
    from sweeps.plan import temp_socket_problem

    assert temp_socket_problem() == (
        f"the temporary folder {longer} (TMPDIR): the trials' data-loading processes make "
        f"sockets under it of up to 108 bytes, over the 107 Linux allows; accepted: a TMPDIR "
        f"of at most 75 bytes (e.g. /tmp)")
    monkeypatch.setenv("TMPDIR", str(long))
    monkeypatch.setattr(tempfile, "tempdir", None)
    assert temp_socket_problem() is None
    shutil.rmtree(base)
    monkeypatch.setenv("TMPDIR", "/tmp")
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setenv("HOME", "/proc/nobody")
    with pytest.raises(UsageError, match=(
            r"^HOME=/proc/nobody: a local Ray keeps its cluster token in ~/\.ray/auth_token, "
            r"and /proc (does not take files \(.*\)|is not writable); accepted: a HOME this "
            r"user can write, or "
            r"the token given in RAY_AUTH_TOKEN \(any secret text\) or in a file named by "
            r"RAY_AUTH_TOKEN_PATH$")):
        make_plan(parse(*argv))
    # a token file named by RAY_AUTH_TOKEN_PATH is read, never made: it must hold one
    token = tmp_path / "token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    for content, why in ((None, r"cannot be read \(No such file or directory\)"),
                         ("\n", "is empty")):
        if content is not None:
            token.write_text(content)
        with pytest.raises(UsageError, match=(
                rf"^RAY_AUTH_TOKEN_PATH={re.escape(str(token))}: {why}, and Ray reads the "
                rf"cluster's token from it; accepted: a file holding the token \(any secret "
                rf"text\), or RAY_AUTH_TOKEN$")):
            make_plan(parse(*argv))
    token.write_text("a secret\n")
    make_plan(parse(*argv))  # (HOME is not written then)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "a secret")
    make_plan(parse(*argv))


def test_a_working_folder_the_report_cannot_be_written_in_is_refused_by_the_dry_run(tmp_path):
    """The report goes to outputs/ in the working folder: a read-only one (--storage and the
    tracking store elsewhere) passed the dry run, the sweep trained, and its report was "not
    written", exit 0, with a retry line that failed the same way. A read-only bind mount
    (mounting needs root; skipped without it)."""
    work = tmp_path / "work"
    work.mkdir()
    if subprocess.run(["mount", "--bind", str(work), str(work)], capture_output=True).returncode:
        pytest.skip("a folder cannot be bind-mounted here (not root)")
    try:
        if subprocess.run(["mount", "-o", "remount,ro,bind", str(work)],
                          capture_output=True).returncode:
            pytest.skip("a bind mount cannot be made read-only here")
        proc = subprocess.run(
            [sys.executable, str(REPO / "sweeps" / "run.py"), "gabor_conv1", "--smoke-test",
             "--dry-run", "--storage", str(tmp_path / "r"), "--mlflow-uri",
             f"sqlite:///{tmp_path / 'm.db'}"], cwd=work, capture_output=True, text=True)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr == (f"error: the working folder {work}: the sweep's report goes to "
                               f"outputs/ there, and {work} is not writable; accepted: running "
                               f"from a folder this user can write\n")
        # the default store there is named as the default, not as an --mlflow-uri not given
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        proc = subprocess.run(
            [sys.executable, str(REPO / "sweeps" / "run.py"), "gabor_conv1", "--smoke-test",
             "--dry-run", "--storage", str(tmp_path / "r")], cwd=work, capture_output=True,
            text=True, env=env)
        assert proc.returncode == 2 and proc.stderr.startswith(
            f"error: the default tracking store (no --mlflow-uri, no MLFLOW_TRACKING_URI) "
            f"sqlite:///{work}/mlflow.db: {work} is not writable"), proc.stderr
    finally:
        subprocess.run(["umount", str(work)], capture_output=True)


_RETRIED_TRIALS = """
import json, sys, tempfile
from pathlib import Path
from sweeps import execute  # first: it sets Ray's authentication mode before Ray is imported
from sweeps.ray_glue import ray, tune

attempts, run_dir = Path(sys.argv[1]), Path(sys.argv[2])
ray.init(address="local", num_cpus=1, include_dashboard=False,
         object_store_memory=80 * 2**20, log_to_driver=False)


def trainable(config):  # run_trial's steps around training
    if config["case"] == "long tmp":  # as a node whose TMPDIR is longer than the driver's
        tempfile.tempdir = "/tmp/" + "l" * 71
    execute.refuse_before_training(None)
    with attempts.open("a") as f:  # an attempt that trains
        f.write(json.dumps([config["case"], tune.get_context().get_trial_dir()]) + "\\n")
    if config["case"] == "bad file":
        exc = ValueError("cannot decode image /data/n01/7.JPEG (truncated)")
        execute.mark_failed_for_good(execute.error_line(exc))
        raise exc
    tune.report({"done": 1})


def elsewhere(config):  # a node that does not see the run's folder: Ray's marker not there
    (run_dir.parent / "elsewhere" / ".validate_storage_marker").unlink(missing_ok=True)
    trainable(config)


out = {}
for name, function in (("run", trainable), ("elsewhere", elsewhere)):
    cases = ["fine", "bad file", "long tmp"] if name == "run" else ["fine"]
    results = execute._tuner(function, run_dir.parent / name,
                             {"case": tune.grid_search(cases)}).fit()
    out[name] = {r.config["case"]: r.error and [
        execute.error_line(r.error), isinstance(r.error, execute.RepeatedFailure)]
        for r in results}
print(json.dumps(out))
"""


def test_a_repeating_error_is_not_trained_again_whichever_worker_or_node_retries_it(tmp_path):
    """A trial whose error would repeat leaves it in its folder so Tune's retries
    (``max_failures=2``) end at once. The marker was in Tune's ``get_trial_dir()``, a
    node-local folder that also depends on the worker: ``driver_artifacts/`` in a fresh
    worker, ``working_dirs/`` in a reused one. A trial that failed in a worker reused from a
    trial that finished (the project reuses workers) was retried in a fresh one that did not
    see the marker, and trained twice more; a retry on another node never saw it. It is now
    in the trial's folder of the run's storage, which every attempt reads. A trial on a node
    that does not see that storage ends before it trains, naming the node."""
    from sweeps.execute import FAILED_MARKER

    attempts = tmp_path / "attempts.jsonl"
    proc = subprocess.run(
        [sys.executable, "-c", _RETRIED_TRIALS, str(attempts), str(tmp_path / "ray" / "run")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.splitlines()[-1])
    # a node that does not see the run's storage: refused before it trains, retryable (Ray
    # found out only when the trial persisted its first checkpoint, in a paragraph)
    assert errors.pop("elsewhere") == {"fine": [
        f"StorageUnreachable: node {socket.gethostname()} does not see the run's storage "
        f"folder {tmp_path / 'ray' / 'elsewhere'} (no .validate_storage_marker there, which "
        "the driver's Ray wrote); expected --storage on a folder every node mounts at the "
        "same path", False]}
    errors = errors["run"]
    # a node whose TMPDIR its trials' data loading would hang on (the driver checks only
    # its own): refused before it trains, retryable
    assert errors.pop("long tmp") == [
        f"NodeUnfit: node {socket.gethostname()}: the temporary folder /tmp/{'l' * 71} "
        "(TMPDIR): the trials' data-loading processes make sockets under it of up to 108 "
        "bytes, over the 107 Linux allows; accepted: a TMPDIR of at most 75 bytes (e.g. /tmp)",
        False]
    trained = [json.loads(line) for line in attempts.read_text().splitlines()]
    # the failing trial ran in the worker the finished one left (what the old marker missed)
    assert [case for case, _ in trained] == ["fine", "bad file"], trained
    assert "/working_dirs/" in trained[1][1], trained
    # the last attempt's error is a retry's, which trained nothing; the summary line shows
    # the first attempt's error (``error_line``)
    assert errors == {"fine": None, "bad file": [
        "ValueError: cannot decode image /data/n01/7.JPEG (truncated)", True]}
    (marker,) = (tmp_path / "ray" / "run").glob(f"*/{FAILED_MARKER}")
    assert marker.read_text() == "ValueError: cannot decode image /data/n01/7.JPEG (truncated)"
    assert not list((tmp_path / "ray").glob("**/*.part"))


def test_the_driver_asks_each_node_for_the_files_its_trials_read(tmp_path):
    """What ``node_problems`` has every node of a cluster read before any trial starts (two
    nodes on one machine share their files, so the cluster test varies only TMPDIR): the
    run's folder in --storage and each split's first file; a node that lacks one names it
    and the reason, and one that has them all says nothing."""
    from imagenet_tree import write_imagenet_tree

    from references.datasets import imagefolder_bundle
    from sweeps.execute import FINGERPRINT_FILE, _files_trials_read, _look_around
    from trainable.data import TrialData

    tree = write_imagenet_tree(tmp_path / "tree", n_classes=2, n_train=2, n_val=1)
    data = TrialData.from_bundle(imagefolder_bundle(tree, image_size=16), "tree")
    run_dir = tmp_path / "ray" / "run"
    run_dir.mkdir(parents=True)
    (run_dir / FINGERPRINT_FILE).write_text("{}")
    files = _files_trials_read(run_dir, [data, data])  # a source two conditions share: once
    assert files == [str(run_dir / FINGERPRINT_FILE), data.train.index.path(0),
                     data.val.index.path(0)]
    assert _look_around(files) == (socket.gethostname(), [], None)
    os.unlink(files[2])
    shutil.rmtree(run_dir)
    assert _look_around(files)[1] == [
        f"cannot read {files[0]} (No such file or directory)",
        f"cannot read {files[2]} (No such file or directory)"]
