"""How to search: the ``experiment`` section of a search-space file (searcher, metric, scheduler,
concurrency, when to stop, what it may spend), as typed config sections validated like TrainConfig's.

Each rule here reads the experiment section alone; ``check_against_space`` holds the rules that need
the ``space`` section too (which keys PBT may perturb)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from training.config import ConfigError, Section, is_field_path


@dataclass(kw_only=True)
class SchedulerConfig(Section):
    """Early stopping and population training, time in epochs (max_t = train.epochs):
    ASHA, HyperBand (synchronous; pauses trials at its rungs), the median stopping rule, PBT, or FIFO."""
    name: Literal["asha", "fifo", "pbt", "hyperband", "median"] = "asha"
    grace_period: int = 1          # asha, median: epochs every trial gets before it can be stopped
    reduction_factor: float = 3.0  # asha, hyperband: keep the top 1/reduction_factor at each rung
    min_samples_required: int = 3  # median: trials that must have reached an epoch before it stops one there
    # pbt: every perturbation_interval epochs, a trial in the bottom `quantile` restarts from the
    # checkpoint of one in the top `quantile`, with that trial's values perturbed: a range's value
    # times one of perturbation_factors (clipped to the range), a choice's shifted to a neighbour,
    # or either resampled from the space with resample_probability.
    perturbation_interval: int = 1
    quantile: float = 0.25
    resample_probability: float = 0.25
    perturbation_factors: list[float] = field(default_factory=lambda: [1.2, 0.8])
    hyperparam_mutations: list[str] = field(default_factory=list)   # space keys; [] = every key of the space
    synch: bool = False            # pbt: perturb only when every trial has reached the interval
    # asha: what a trial is judged on at a rung epoch: its metric there ("plain"), or the metric of a
    # cooldown fork (training.cooldown: a copy of the run trained cooldown_fraction x its steps so far
    # with the LR falling linearly to 0), which the trial reports as rung_<metric> at exactly ASHA's
    # rung epochs (rung_epochs) while the run itself goes on untouched; the forks' steps are reported
    # (fork_steps) and their time counts in the epoch's.
    rung_eval: Literal["plain", "cooldown"] = "plain"
    cooldown_fraction: float = 0.1

    def _validate(self):
        if self.grace_period < 1:
            raise ConfigError("grace_period", self.grace_period, ">= 1")
        if self.reduction_factor <= 1:
            raise ConfigError("reduction_factor", self.reduction_factor, "> 1")
        if self.min_samples_required < 1:
            raise ConfigError("min_samples_required", self.min_samples_required, ">= 1")
        if self.perturbation_interval < 1:
            raise ConfigError("perturbation_interval", self.perturbation_interval, ">= 1 (epochs)")
        if not 0 < self.quantile <= 0.5:
            raise ConfigError("quantile", self.quantile, "in (0, 0.5] (the top and bottom fractions of the population)")
        if not 0 <= self.resample_probability <= 1:
            raise ConfigError("resample_probability", self.resample_probability, "in [0, 1]")
        if not self.perturbation_factors or any(f <= 0 for f in self.perturbation_factors):
            raise ConfigError("perturbation_factors", self.perturbation_factors, "a non-empty list of numbers > 0")
        for i, key in enumerate(self.hyperparam_mutations):
            if not is_field_path(key):
                raise ConfigError(f"hyperparam_mutations[{i}]", key, "a dotted path into train (a key of space)")
        if self.rung_eval == "cooldown" and self.name != "asha":
            raise ConfigError("rung_eval", self.rung_eval, f"plain with name: {self.name} (cooldown forks are "
                                                           "what ASHA decides on at its rungs)")
        if not 0 < self.cooldown_fraction <= 1:
            raise ConfigError("cooldown_fraction", self.cooldown_fraction,
                              "a number in (0, 1] (a fork's steps as a fraction of the steps so far)")

    def rung_epochs(self, epochs: int) -> list[int]:
        """The epochs before the last at which ASHA (max_t = ``epochs``) records a trial: Ray's rungs
        (ray.tune.schedulers.async_hyperband._Bracket, one bracket) are the milestones grace_period x
        reduction_factor^k for k < int(log(epochs / grace_period) / log(reduction_factor) + 1), and a
        trial reporting every epoch is recorded at the first epoch >= a milestone. At the last epoch
        the trial ends anyway (ASHA stops it at max_t), so no fork runs there."""
        n = int(math.log(epochs / self.grace_period) / math.log(self.reduction_factor) + 1)
        milestones = (math.ceil(self.grace_period * self.reduction_factor ** k) for k in range(n))
        return sorted({e for e in milestones if e < epochs})

    def rung_eval_updates(self, epochs: int) -> dict[str, Any]:
        """The ``train.rung_eval`` every trial runs with (dotted updates onto its config): ASHA's rung
        epochs and the fork length under ``rung_eval: cooldown``; nothing otherwise."""
        if self.rung_eval != "cooldown":
            return {}
        return {"rung_eval": {"epochs": self.rung_epochs(epochs), "cooldown_fraction": self.cooldown_fraction}}


COOLDOWN_METRICS = ("val_acc", "val_loss")   # what a cooldown fork measures (training.cooldown.METRICS)


def rung_metric(metric: str) -> str:
    """The name a trial reports the cooldown fork's ``metric`` under at a rung epoch."""
    return f"rung_{metric}"


@dataclass(kw_only=True)
class StopConfig(Section):
    """When the experiment is done before its num_samples: the metric reaches a target (the one
    that fits the mode), or the best-so-far stops improving by min_delta over `patience` ended trials."""
    metric_at_least: Optional[float] = None   # mode: max
    metric_at_most: Optional[float] = None    # mode: min
    patience: Optional[int] = None            # ended trials without an improvement of the best
    min_delta: float = 0.0                    # the least change of the best that counts as one

    def _validate(self):
        if self.patience is not None and self.patience < 1:
            raise ConfigError("patience", self.patience, ">= 1 (ended trials)")
        if self.min_delta < 0:
            raise ConfigError("min_delta", self.min_delta, ">= 0")


@dataclass(kw_only=True)
class BudgetConfig(Section):
    """What the experiment may spend, as resources x wall time of its trials (start-up included):
    once spent, it ends (running trials stop at their last epoch; no trial starts)."""
    gpu_hours: Optional[float] = None
    cpu_hours: Optional[float] = None

    def _validate(self):
        for key in ("gpu_hours", "cpu_hours"):
            v = getattr(self, key)
            if v is not None and v <= 0:
                raise ConfigError(key, v, "> 0")


@dataclass(kw_only=True)
class ExperimentOptions(Section):
    name: str = "schedtune"
    metric: str = "val_acc"
    mode: Literal["max", "min"] = "max"
    num_samples: int = 8
    search: Literal["random", "optuna_tpe", "grid"] = "random"
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    max_concurrent_trials: Union[int, Literal["auto"]] = "auto"
    seed: int = 0                  # the searcher's seed: a rerun samples the same configs
    time_budget_s: Optional[float] = None   # wall-clock seconds of the whole search
    stop: StopConfig = field(default_factory=StopConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)

    def _validate(self):
        if self.num_samples < 1:
            raise ConfigError("num_samples", self.num_samples, ">= 1")
        if self.max_concurrent_trials != "auto" and self.max_concurrent_trials < 1:
            raise ConfigError("max_concurrent_trials", self.max_concurrent_trials, "'auto' or >= 1")
        if not self.name or any(c in self.name for c in "/\\"):
            raise ConfigError("name", self.name, "a non-empty name without slashes")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ConfigError("time_budget_s", self.time_budget_s, "> 0 (seconds)")
        wrong = "metric_at_most" if self.mode == "max" else "metric_at_least"
        if getattr(self.stop, wrong) is not None:
            right = "metric_at_least" if self.mode == "max" else "metric_at_most"
            raise ConfigError(f"stop.{wrong}", getattr(self.stop, wrong), f"stop.{right} with mode: {self.mode}")
        if self.scheduler.rung_eval == "cooldown" and self.metric not in COOLDOWN_METRICS:
            raise ConfigError("scheduler.rung_eval", "cooldown", f"plain with metric: {self.metric} (a cooldown "
                                                                 f"fork measures {' or '.join(COOLDOWN_METRICS)})")
        if self.scheduler.name == "pbt" and self.search not in ("random", "grid"):
            raise ConfigError("scheduler.name", "pbt", "search: random or grid with pbt (PBT chooses the next "
                                                       "values itself, and Tune runs no searcher beside it)")


def check_against_space(file: str, options: ExperimentOptions, space: dict[str, Any]) -> None:
    """The experiment section's rules that need the space (``space``: key -> tuning.spec.Dist):
    PBT perturbs keys of the space, each one a range or a choice."""
    from tuning.spec.errors import SpaceError

    s = options.scheduler
    if s.name != "pbt":
        return
    if not space:
        raise SpaceError(file, "experiment.scheduler.name", "pbt", "a space to perturb (PBT over no key is FIFO)")
    for i, key in enumerate(s.hyperparam_mutations):
        if key not in space:
            raise SpaceError(file, f"experiment.scheduler.hyperparam_mutations[{i}]", key,
                             f"a key of space ({', '.join(space)})")
