"""``--search optuna`` as one Tune experiment: ``SideSearch``, the searcher that asks each
condition's two sides, each an Optuna study of its own, for the next |alpha| in turn.

Run as one experiment per condition and side (until stop 29), a search used one side's
trials at a time and left a cluster's other slots idle while that side's last trials ran;
here every side draws from the same slots. Imports Ray: the driver imports this module only
when a search starts."""

from __future__ import annotations

import math
import pickle

import optuna

from sweeps.plan import Plan, optuna_bounds, optuna_split, optuna_startup
from sweeps.ray_glue import Searcher

OBJECTIVES = ("val_performance", "val_alignment")


class SideSearch(Searcher):
    """Tune's searcher for ``--search optuna``. The baselines come first (one trial each, in
    the plan's order), then one sample from each condition's sides in turn (max, min of the
    first condition, then the next's), so every side progresses at once. Each side is an
    Optuna study with ``optuna_sampler(n, seed)`` (seed 0 promoting, 1 suppressing), with
    |alpha| log-uniform in the grid's range (``optuna_bounds``) and two objectives: the
    trial's last ``val_performance`` up, its ``val_alignment`` up on the promoting side and
    down on the suppressing one. A trial that errored, or whose scores are missing or not
    finite, is told as failed, so the sampler does not model it. A suggestion is the
    trainable's config: ``{"trial_id": <the side's grid trial>, "alpha_mag": |alpha|}``
    (``{"trial_id": <baseline>}`` for a baseline). It hands out ``Plan.n_trials`` trials,
    then says it is finished; Tune's ``num_samples`` is that count.

    Its state (the studies, what each is still owed, whose turn it is) is saved with Tune's
    experiment state (``save``), so ``--resume`` continues the search where it stopped: a
    trial stopped mid-way trains on from its checkpoint and is then told to its study, and
    the samples not yet drawn are drawn from studies that know every trial finished before."""

    def __init__(self, plan: Plan) -> None:
        super().__init__(metric=None, mode=None)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self._baselines = [t.trial_id for t in plan.trials if t.direction == "none"]
        self._sides: list[dict] = []
        for name in plan.conditions:
            lo, hi, _ = optuna_bounds(plan.spec.condition(name).grid.alphas)
            trials = [t for t in plan.trials if t.condition == name]
            for seed, (direction, n) in enumerate(optuna_split(plan.num_samples).items()):
                base = next(t for t in trials if t.direction == direction)
                study = optuna.create_study(
                    directions=["maximize", "maximize" if direction == "max" else "minimize"],
                    sampler=optuna_sampler(n, seed))
                self._sides.append({"trial_id": base.trial_id, "left": n, "study": study,
                                    "space": optuna.distributions.FloatDistribution(
                                        lo, hi, log=True)})
        # Tune's trial id -> (side, its trial's number in the side's study, |alpha|)
        self._asked: dict[str, tuple[int, int, float]] = {}
        self._turn = 0

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # the space is the plan's: Tune's metric, mode and config are not used

    def suggest(self, trial_id: str) -> dict | str:
        if self._baselines:
            return {"trial_id": self._baselines.pop(0)}
        count = len(self._sides)
        order = [(self._turn + k) % count for k in range(count)]
        i = next((i for i in order if self._sides[i]["left"]), None)
        if i is None:
            return Searcher.FINISHED
        side = self._sides[i]
        self._turn = i + 1
        side["left"] -= 1
        trial = side["study"].ask({"alpha_mag": side["space"]})
        alpha_mag = trial.params["alpha_mag"]
        self._asked[trial_id] = (i, trial.number, alpha_mag)
        return {"trial_id": side["trial_id"], "alpha_mag": alpha_mag}

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        asked = self._asked.get(trial_id)
        if asked is None:  # a baseline
            return
        i, number, alpha_mag = asked
        values = [_finite((result or {}).get(key)) for key in OBJECTIVES]
        ok = not error and None not in values
        side = self._sides[i]
        study = side["study"]
        if study.get_trials(deepcopy=False)[number].state.is_finished():
            # an errored trial that --resume ran again (told as failed then): its scores now
            if ok:
                study.add_trial(optuna.trial.create_trial(
                    params={"alpha_mag": alpha_mag},
                    distributions={"alpha_mag": side["space"]}, values=values))
        elif ok:
            study.tell(number, values)
        else:
            study.tell(number, state=optuna.trial.TrialState.FAIL)

    def save(self, checkpoint_path: str) -> None:
        """The search's state, written by Tune beside its experiment state each time it saves
        that (both in one step, so they agree): a --resume continues the search from it."""
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))

    def get_state(self) -> dict:
        return {"baselines": self._baselines, "sides": self._sides, "asked": self._asked,
                "turn": self._turn}

    def set_state(self, state: dict) -> None:
        self._baselines, self._sides = state["baselines"], state["sides"]
        self._asked, self._turn = state["asked"], state["turn"]


def optuna_sampler(n: int, seed: int):
    """A side's sampler for its ``n`` samples: Optuna's multi-objective TPE, the first
    ``optuna_startup(n)`` samples drawn at random, the rest where the finished trials' two
    scores point (pending ones counted as "constant liars", so parallel trials spread out).
    NSGA-II, used before, was a random draw here: its mutation redraws the one parameter
    (|alpha|) at random in every child, and its default generation of 50 was random anyway."""
    return optuna.samplers.TPESampler(n_startup_trials=optuna_startup(n), seed=seed,
                                      constant_liar=True)


def _finite(value) -> float | None:
    """``value`` as a float if it is a finite number, else None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
