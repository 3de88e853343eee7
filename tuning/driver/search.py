"""The search: the Tune param space of a spec, the search algorithm it names (random, grid,
Optuna TPE or NSGA-II over one or several objectives; ``experiment.repeats`` of each config; a
warm start's first points), and ``FixedSamples``, a searcher that runs exactly the given samples, in order.

The recipe's refine step retrains the coarse search's top-k configs: k joint samples of several
keys, which neither a grid (it would cross the keys) nor random sampling can express. Each sample
maps a search-space key to its value (structured values such as whole sections included: Tune
merges a suggestion over the param space as is, where ``points_to_evaluate`` would split it).
"""
from __future__ import annotations

import copy
import os
import pickle
from typing import TYPE_CHECKING, Any, Optional

from ray.tune.search import ConcurrencyLimiter, Repeater, Searcher

from tuning.spec import ExperimentSpec
from tuning.spec.options import REPEAT_INDEX

if TYPE_CHECKING:
    from tuning.tracking.warm_start import WarmStart


PAUSING_SCHEDULERS = ("pbt", "hyperband")   # they pause trials and hold all but `limit` of them


class FixedSamples(Searcher):
    def __init__(self, samples: list[dict[str, Any]], metric: Optional[str] = None, mode: Optional[str] = None):
        super().__init__(metric=metric, mode=mode)
        self.samples = [dict(s) for s in samples]
        self.next = 0

    def set_search_properties(self, metric: Optional[str], mode: Optional[str], config: dict, **spec) -> bool:
        self._metric, self._mode = metric or self._metric, mode or self._mode
        return True   # the param space's domains are overridden key by key by each sample

    def suggest(self, trial_id: str):
        if self.next >= len(self.samples):
            return Searcher.FINISHED
        self.next += 1
        return copy.deepcopy(self.samples[self.next - 1])

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        pass

    def get_state(self) -> dict:
        return {"samples": self.samples, "next": self.next}

    def set_state(self, state: dict) -> None:
        self.samples, self.next = state["samples"], state["next"]

    def save(self, checkpoint_path: str) -> None:   # Tune saves the searcher with the experiment (resume)
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))


class _SavesItsOwnState:
    """A searcher wrapper (Tune's Repeater, ConcurrencyLimiter) that keeps its own state across
    ``--resume``: Ray's save only the searcher they wrap, so a restored Repeater fails on the first
    repeat that ends (its group is unknown) and a restored ConcurrencyLimiter drops the results of
    the trials that were running (they are not among its live trials): the searcher never hears them."""

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)
        with open(checkpoint_path, "rb") as f:
            inner = f.read()
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"searcher": inner, "wrapper": self.get_state()}, f)

    def restore(self, checkpoint_path: str) -> None:
        import tempfile

        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        with tempfile.TemporaryDirectory() as tmp:   # nothing left beside Tune's own files
            inner = os.path.join(tmp, "searcher.pkl")
            with open(inner, "wb") as f:
                f.write(state["searcher"])
            self.searcher.restore(inner)
        self.set_state(state["wrapper"])


class ResumableRepeater(_SavesItsOwnState, Repeater):
    """Repeats of each suggestion (``experiment.repeats``), their mean told to the searcher."""


class ResumableLimiter(_SavesItsOwnState, ConcurrencyLimiter):
    """At most ``max_concurrent`` trials of the searcher at once."""


def optuna_search(spec: ExperimentSpec, warm: Optional["WarmStart"] = None):
    """OptunaSearch with the spec's sampler (TPE, or NSGA-II with its population), objectives and seed;
    ``warm``: an earlier experiment's trials, told to the study as already evaluated (not rerun)."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from tuning.driver.optuna_samplers import NSGAIISampler
    from tuning.spec.checks import nsga2_population

    o = spec.options
    sampler = (NSGAIISampler(population_size=nsga2_population(o.num_samples), seed=o.seed)
               if o.search == "optuna_nsga2" else optuna.samplers.TPESampler(seed=o.seed))
    names, modes = [m.name for m in o.objectives], [m.mode for m in o.objectives]
    warm_args = {"points_to_evaluate": warm.points, "evaluated_rewards": warm.rewards} if warm else {}
    if len(names) == 1:
        return OptunaSearch(metric=names[0], mode=modes[0], sampler=sampler, **warm_args)

    class MultiObjectiveOptuna(OptunaSearch):
        """Tune hands every searcher the TuneConfig's one metric (the first objective, which the
        scheduler needs); this one keeps its list."""

        def set_search_properties(self, metric, mode, config, **spec_):
            return super().set_search_properties(None, None, config, **spec_)

    return MultiObjectiveOptuna(metric=names, mode=modes, sampler=sampler, **warm_args)


def searcher(spec: ExperimentSpec, limit: int, points: Optional[list[dict]] = None,
             warm: Optional["WarmStart"] = None):
    """The search algorithm, holding at most ``limit`` trials at once. (Tune applies
    TuneConfig.max_concurrent_trials only to Searchers it wraps, and silently ignores it for a
    BasicVariantGenerator passed in: the limit must be set on the generator itself.)
    ``points``: run exactly these samples instead of searching (the recipe's refine step).
    ``warm``: an earlier experiment's best trials (tuning.tracking.warm_start): Optuna is told their
    results, random search runs their configs first. ``experiment.repeats``: Optuna's suggestions are
    repeated by Tune's Repeater (which tells Optuna each config's mean), a random or grid search
    crosses its samples with a grid over the repeat index (to_tune), holding each sample's values."""
    o = spec.options
    if points:
        return ResumableLimiter(FixedSamples(points, metric=o.metric, mode=o.mode), max_concurrent=limit)
    pausing = o.scheduler.name in PAUSING_SCHEDULERS
    if o.search.startswith("optuna"):
        search = optuna_search(spec, warm)
        if o.repeats > 1:
            search = ResumableRepeater(search, repeat=o.repeats, set_index=True)
        if pausing:   # TPE + HyperBand: the BOHB-like pair
            return search
        return ResumableLimiter(search, max_concurrent=limit)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Schedulers that pause trials get every trial at once (max_concurrent 0: no limit) and run `limit`
    # of them (tuning.driver.trial_schedulers.RunningLimit): a paused trial counts against this limit.
    return BasicVariantGenerator(random_state=o.seed, max_concurrent=0 if pausing else limit,
                                 points_to_evaluate=warm.points if warm else None,
                                 constant_grid_search=o.repeats > 1)


def tune_num_samples(spec: ExperimentSpec) -> int:
    """TuneConfig.num_samples: a searcher's suggestions times the Repeater's repeats (Tune counts
    the repeats as samples); a grid's points, the repeat index's included, are not counted."""
    o = spec.options
    return o.num_samples * (o.repeats if o.search.startswith("optuna") else 1)


def to_tune(spec: ExperimentSpec) -> dict[str, Any]:
    """The Ray Tune param space: {dotted path: tune distribution} (grid crosses with samples)."""
    from ray import tune

    out: dict[str, Any] = {}
    o = spec.options
    if o.repeats > 1 and not o.search.startswith("optuna"):   # Optuna's repeats: the Repeater's index
        out[REPEAT_INDEX] = tune.grid_search(list(range(o.repeats)))
    for key, d in spec.space.items():
        if d.kind == "loguniform":
            out[key] = tune.loguniform(*d.args)
        elif d.kind == "uniform":
            out[key] = tune.uniform(*d.args)
        elif d.kind == "int":
            out[key] = tune.randint(d.args[0], d.args[1] + 1)   # inclusive high
        elif key in spec.indexed_choices:
            out[key] = tune.choice(list(range(len(d.args))))
        elif d.kind == "grid" or spec.options.search == "grid":
            out[key] = tune.grid_search(list(d.args))
        else:
            out[key] = tune.choice(list(d.args))
    return out
