"""When an experiment is done before its last sample: the completion criteria of the ``experiment``
section (``time_budget_s``, ``stop: {metric_at_least | metric_at_most, patience, min_delta}``,
``budget: {gpu_hours | cpu_hours}``) as one Tune stopper, which says which criterion ended it.

Tune checkpoints callbacks, not stoppers: ``Completion`` is both, so the time already spent, the
best so far and the plateau count survive ``--resume`` (Tune pickles the run config's stopper and
callbacks together, so they stay one object). When a criterion is met, Tune stops every running
trial at its last epoch (checkpoints kept) and starts no other.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

from ray.tune import Callback
from ray.tune.stopper import Stopper

from tuning.analysis.ranking import better, is_finite_number
from tuning.analysis.results import cut_short
from tuning.driver.cost import CostMeter
from tuning.spec import ExperimentSpec


class Completion(Callback, Stopper):
    """The experiment's completion criteria; ``ended_by`` says which one ended it (None: none did)."""

    _live: dict[str, "Completion"] = {}   # run_dir -> the one Tune runs (a restore unpickles a new one)

    def __init__(self, spec: ExperimentSpec, run_dir: str, meter: Optional[CostMeter] = None,
                 on_cut: Optional[Callable[[str, dict], None]] = None):
        """``on_cut(trial_id, tags)``: the status of each trial still running when a criterion is met."""
        o = spec.options
        self.run_dir, self.metric, self.mode, self.meter, self.on_cut = run_dir, o.metric, o.mode, meter, on_cut
        self.epochs = spec.base.epochs
        self.target = o.stop.metric_at_least if o.mode == "max" else o.stop.metric_at_most
        self.patience, self.min_delta = o.stop.patience, o.stop.min_delta
        self.time_budget_s = o.time_budget_s
        self.budget = {k: v for k, v in (("gpu_hours", o.budget.gpu_hours), ("cpu_hours", o.budget.cpu_hours))
                       if v is not None}
        self.elapsed_before = 0.0                 # seconds of the invocations before a --resume
        self.started: Optional[float] = None      # this invocation's start (monotonic)
        self.best: Optional[float] = None         # the experiment's best value so far
        self.trial_best: dict[str, float] = {}
        self.last_epoch: dict[str, int] = {}      # trial -> its last epoch reported
        self.ended: set[str] = set()              # trials that ended (completed, stopped, failed)
        self.cut: dict[str, str] = {}             # trial -> its status, for those running when it ended
        self.without_improvement = 0              # ended trials since the best last improved by min_delta
        self.ended_by: Optional[str] = None
        Completion._live[run_dir] = self

    @classmethod
    def for_run_dir(cls, run_dir: str) -> Optional["Completion"]:
        return cls._live.get(run_dir)

    def __setstate__(self, state):
        self.__dict__.update(state)
        Completion._live[self.run_dir] = self

    def elapsed(self) -> float:
        return self.elapsed_before + (time.monotonic() - self.started if self.started is not None else 0.0)

    def _end(self, why: str) -> None:
        if self.ended_by is not None:
            return
        self.ended_by = why
        from tuning.tracking import schema

        for trial_id in sorted(t for t in set(self.last_epoch) - self.ended if self.last_epoch[t] < self.epochs):
            self.cut[trial_id] = cut_short(self.last_epoch[trial_id])
            if self.on_cut is not None:
                self.on_cut(trial_id, {schema.STATUS: self.cut[trial_id]})

    # -- Stopper: a trial's results (the target), then the whole experiment (time, budget)
    def __call__(self, trial_id: str, result: dict) -> bool:
        self.last_epoch[trial_id] = int(result.get("epoch", 0))
        value = result.get(self.metric)
        if not is_finite_number(value) or result.get("diverged"):
            return False
        if trial_id not in self.trial_best or better(value, self.trial_best[trial_id], self.mode):
            self.trial_best[trial_id] = value
        if self.target is not None and not better(self.target, value, self.mode):
            word = "at least" if self.mode == "max" else "at most"
            self._end(f"target reached: {self.metric} {value:.4g} ({word} {self.target:g}) by trial {trial_id} "
                      f"at epoch {int(result.get('epoch', 0))}")
        return False

    def stop_all(self) -> bool:
        if self.started is None:
            self.started = time.monotonic()
        if self.time_budget_s is not None and self.elapsed() >= self.time_budget_s:
            self._end(f"time budget spent: {self.elapsed():.0f} s of experiment.time_budget_s {self.time_budget_s:g}")
        if self.meter is not None and self.budget:
            spent = self.meter.spent()
            for key, limit in self.budget.items():
                if spent[key] >= limit:
                    self._end(f"budget spent: {spent[key]:.4g} of experiment.budget.{key} {limit:g}")
        return self.ended_by is not None

    # -- Callback: the plateau is counted in ended trials
    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
        self.started = time.monotonic()

    def _trial_ended(self, trial_id: str) -> None:
        if trial_id in self.ended or self.ended_by is not None:
            return
        self.ended.add(trial_id)
        value = self.trial_best.get(trial_id)
        if value is None:
            return
        if self.best is None or (better(value, self.best, self.mode) and abs(value - self.best) > self.min_delta):
            self.best, self.without_improvement = value, 0
            return
        if better(value, self.best, self.mode):
            self.best = value   # better, by less than min_delta: the best moves, the plateau goes on
        self.without_improvement += 1
        if self.patience is not None and self.without_improvement >= self.patience:
            self._end(f"plateau: the best {self.metric} ({self.best:.4g}) improved by no more than "
                      f"{self.min_delta:g} over the last {self.without_improvement} ended trials")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._trial_ended(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._trial_ended(trial.trial_id)

    def get_state(self) -> Optional[dict]:
        return {"elapsed": self.elapsed(), "best": self.best, "trial_best": self.trial_best,
                "last_epoch": self.last_epoch, "ended": sorted(self.ended), "cut": self.cut,
                "without_improvement": self.without_improvement, "ended_by": self.ended_by}

    def set_state(self, state: dict) -> None:
        self.elapsed_before, self.started = state["elapsed"], time.monotonic()
        self.best, self.trial_best = state["best"], dict(state["trial_best"])
        self.last_epoch, self.ended, self.cut = dict(state["last_epoch"]), set(state["ended"]), dict(state["cut"])
        self.without_improvement, self.ended_by = state["without_improvement"], state["ended_by"]
