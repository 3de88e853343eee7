"""The search: the Tune param space of a spec, the search algorithm it names (random, grid,
Optuna TPE), and ``FixedSamples``, a searcher that runs exactly the given samples, in order.

The recipe's refine step retrains the coarse search's top-k configs: k joint samples of several
keys, which neither a grid (it would cross the keys) nor random sampling can express. Each sample
maps a search-space key to its value (structured values such as whole sections included: Tune
merges a suggestion over the param space as is, where ``points_to_evaluate`` would split it).
"""
from __future__ import annotations

import copy
import pickle
from typing import Any, Optional

from ray.tune.search import Searcher

from tuning.spec import ExperimentSpec


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


def searcher(spec: ExperimentSpec, limit: int, points: Optional[list[dict]] = None):
    """The search algorithm, holding at most ``limit`` trials at once. (Tune applies
    TuneConfig.max_concurrent_trials only to Searchers it wraps, and silently ignores it for a
    BasicVariantGenerator passed in: the limit must be set on the generator itself.)
    ``points``: run exactly these samples instead of searching (the recipe's refine step)."""
    o = spec.options
    if points:
        from ray.tune.search import ConcurrencyLimiter

        return ConcurrencyLimiter(FixedSamples(points, metric=o.metric, mode=o.mode), max_concurrent=limit)
    if o.search == "optuna_tpe":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        optuna = OptunaSearch(metric=o.metric, mode=o.mode, seed=o.seed)
        if o.scheduler.name in PAUSING_SCHEDULERS:   # TPE + HyperBand: the BOHB-like pair
            return optuna
        return ConcurrencyLimiter(optuna, max_concurrent=limit)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Schedulers that pause trials get every trial at once (max_concurrent 0: no limit) and run `limit`
    # of them (tuning.driver.trial_schedulers.RunningLimit): a paused trial counts against this limit.
    pausing = o.scheduler.name in PAUSING_SCHEDULERS
    return BasicVariantGenerator(random_state=o.seed, max_concurrent=0 if pausing else limit)


def to_tune(spec: ExperimentSpec) -> dict[str, Any]:
    """The Ray Tune param space: {dotted path: tune distribution} (grid crosses with samples)."""
    from ray import tune

    out: dict[str, Any] = {}
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
