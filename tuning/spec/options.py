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


REPEAT_INDEX = "__trial_index__"   # a repeat's index in its trial's config (ray.tune.search.repeater.TRIAL_INDEX)
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
class ObjectiveConfig(Section):
    """One objective of a multi-objective search: a metric the trials report, and its direction."""
    name: str = ""
    mode: Optional[Literal["max", "min"]] = None   # required: null only as the unset default

    def _validate(self):
        if not self.name:
            raise ConfigError("name", self.name, "a metric the trials report every epoch")
        if self.mode is None:
            raise ConfigError("mode", self.mode, "one of 'max', 'min'")


@dataclass(kw_only=True)
class WarmStartConfig(Section):
    """Start from an earlier experiment's trials (tuning.tracking.warm_start): the ``top_k`` best of
    experiment ``from``'s newest invocation that completed, read from MLflow. Optuna is told their
    configs and results (they are not rerun); random search runs their configs first."""
    from_: Optional[str] = None    # written ``from`` in a file (a Python keyword)
    top_k: int = 10

    KEYS = ("from", "top_k")

    @classmethod
    def from_dict(cls, d: Any, prefix: str = ""):
        if isinstance(d, dict):
            unknown = sorted(set(d) - {*cls.KEYS, "from_"})   # from_: the field's name, as to_dict of the tree writes it
            if unknown:
                raise ConfigError(f"{prefix}.{unknown[0]}" if prefix else unknown[0], d[unknown[0]],
                                  f"one of the keys {list(cls.KEYS)}")
            d = {("from_" if k == "from" else k): v for k, v in d.items()}
        return super().from_dict(d, prefix)

    def _validate(self):
        if self.from_ is not None and (not self.from_ or any(c in self.from_ for c in "/\\")):
            raise ConfigError("from", self.from_, "the name of an earlier experiment (no slashes)")
        if self.top_k < 1:
            raise ConfigError("top_k", self.top_k, ">= 1 (trials to start from)")


@dataclass(kw_only=True)
class ExperimentOptions(Section):
    name: str = "schedtune"
    metric: str = "val_acc"
    mode: Literal["max", "min"] = "max"
    # Multi-objective: the objectives (the first is `metric`/`mode`, what early stopping, the best
    # trial and the registered model go by); the parent run gets their Pareto front.
    metrics: list[ObjectiveConfig] = field(default_factory=list)
    num_samples: int = 8
    search: Literal["random", "optuna_tpe", "optuna_nsga2", "grid"] = "random"
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    max_concurrent_trials: Union[int, Literal["auto"]] = "auto"
    seed: int = 0                  # the searcher's seed: a rerun samples the same configs
    time_budget_s: Optional[float] = None   # wall-clock seconds of the whole search
    stop: StopConfig = field(default_factory=StopConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    repeats: int = 1               # seeds per sampled config (train.seed, +1, ...); ranked by their mean

    @classmethod
    def from_dict(cls, d: Any, prefix: str = ""):
        """``metric`` and ``mode`` are the first objective's when ``metrics`` is given: written
        beside it, they must say the same."""
        obj = super().from_dict(d, prefix)
        if obj.metrics and isinstance(d, dict):
            first = obj.metrics[0]
            for key, value in (("metric", first.name), ("mode", first.mode)):
                if key in d and d[key] != value:
                    raise ConfigError(f"{prefix}.{key}" if prefix else key, d[key],
                                      f"{value!r} (the first of metrics) or unset")
        return obj

    @property
    def objectives(self) -> list[ObjectiveConfig]:
        """What the search optimizes: ``metrics``, else the one ``metric``."""
        return self.metrics or [ObjectiveConfig(name=self.metric, mode=self.mode)]

    @property
    def multi_objective(self) -> bool:
        return len(self.metrics) > 1

    def _validate(self):
        if self.metrics:
            self.metric, self.mode = self.metrics[0].name, self.metrics[0].mode
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
        names = [m.name for m in self.metrics]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ConfigError(f"metrics[{i}].name", name, "a metric not already in metrics")
        if self.multi_objective and self.scheduler.name == "pbt":
            raise ConfigError("metrics", names, "one metric with scheduler pbt (PBT exploits the trials that "
                                                "rank best by one metric)")
        if self.repeats < 1:
            raise ConfigError("repeats", self.repeats, ">= 1 (seeds per sampled config)")
        if self.repeats > 1 and self.scheduler.name == "pbt":
            raise ConfigError("repeats", self.repeats, "1 with scheduler pbt (PBT copies weights across trials: the "
                                                       "repeats of a config would not stay that config)")
        if self.repeats > 1 and self.multi_objective:
            raise ConfigError("repeats", self.repeats, "1 with several metrics (repeats rank configs by the mean "
                                                       "of one metric)")
        if self.warm_start.from_ is not None:
            if self.search == "grid":
                raise ConfigError("warm_start.from", self.warm_start.from_, "unset with search: grid (a grid "
                                                                            "enumerates its points; nothing to start from)")
            if self.warm_start.from_ == self.name:
                raise ConfigError("warm_start.from", self.warm_start.from_, "another experiment than this one (name: "
                                                                            f"{self.name}; --resume continues this one)")


def check_against_space(file: str, options: ExperimentOptions, space: dict[str, Any]) -> None:
    """The experiment section's rules that need the space (``space``: key -> tuning.spec.Dist):
    repeats set the seed, which the space cannot also search; PBT perturbs keys of the space."""
    from tuning.spec.errors import SpaceError

    if options.repeats > 1 and "seed" in space:
        raise SpaceError(file, "space.seed", space["seed"].kind, "no seed in space with experiment.repeats > 1 "
                                                                  "(each repeat sets train.seed itself)")
    s = options.scheduler
    if s.name != "pbt":
        return
    if not space:
        raise SpaceError(file, "experiment.scheduler.name", "pbt", "a space to perturb (PBT over no key is FIFO)")
    for i, key in enumerate(s.hyperparam_mutations):
        if key not in space:
            raise SpaceError(file, f"experiment.scheduler.hyperparam_mutations[{i}]", key,
                             f"a key of space ({', '.join(space)})")
