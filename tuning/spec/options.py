"""How to search: the ``experiment`` section of a search-space file (searcher, metric, scheduler,
concurrency), as typed config sections validated like TrainConfig's."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

from training.config import ConfigError, Section


@dataclass(kw_only=True)
class SchedulerConfig(Section):
    """Early stopping: ASHA (time_attr = epoch, max_t = train.epochs) or FIFO (run to the end)."""
    name: Literal["asha", "fifo"] = "asha"
    grace_period: int = 1          # epochs every trial gets before it can be stopped
    reduction_factor: float = 3.0  # keep the top 1/reduction_factor at each rung

    def _validate(self):
        if self.grace_period < 1:
            raise ConfigError("grace_period", self.grace_period, ">= 1")
        if self.reduction_factor <= 1:
            raise ConfigError("reduction_factor", self.reduction_factor, "> 1")


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

    def _validate(self):
        if self.num_samples < 1:
            raise ConfigError("num_samples", self.num_samples, ">= 1")
        if self.max_concurrent_trials != "auto" and self.max_concurrent_trials < 1:
            raise ConfigError("max_concurrent_trials", self.max_concurrent_trials, "'auto' or >= 1")
        if not self.name or any(c in self.name for c in "/\\"):
            raise ConfigError("name", self.name, "a non-empty name without slashes")
