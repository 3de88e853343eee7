"""What each trial costs: worker-seconds, CPU-hours and GPU-hours, the resources it holds (its Train
workers and the trial's own process) times its wall time, start-up included (from the start of its
process to its last result, summed over its starts when a scheduler pauses and resumes it)."""
from __future__ import annotations

import time
from typing import Callable, Optional

from ray.tune import Callback

from tuning.driver.sizing import TRIAL_DRIVER_CPU
from tuning.spec import ExperimentSpec
from tuning.tracking import schema

COSTS = ("worker_seconds", "cpu_hours", "gpu_hours")
TAGS = {"worker_seconds": schema.COST_WORKER_SECONDS, "cpu_hours": schema.COST_CPU_HOURS,
        "gpu_hours": schema.COST_GPU_HOURS}


def held(spec: ExperimentSpec, config: dict) -> dict[str, float]:
    """What one trial of ``config`` holds while it runs: workers, CPUs, GPUs (tuning.driver.sizing's rule)."""
    s = spec.trial_config(config).scaling
    driver = 0.0 if s.num_workers == 1 else TRIAL_DRIVER_CPU   # one worker runs in the trial's process
    return {"workers": s.num_workers, "cpus": s.num_workers * s.cpus_per_worker + driver,
            "gpus": s.num_workers * s.gpus_per_worker if s.use_gpu else 0.0}


def cost_of(holds: dict[str, float], seconds: float) -> dict[str, float]:
    return {"worker_seconds": holds["workers"] * seconds, "cpu_hours": holds["cpus"] * seconds / 3600,
            "gpu_hours": holds["gpus"] * seconds / 3600}


def cost_tags(cost: dict[str, float]) -> dict[str, str]:
    return {TAGS[k]: f"{cost[k]:.6g}" for k in COSTS}


class CostMeter(Callback):
    """Measures each trial's wall time on the driver, from Tune's events; checkpointed with the
    experiment. ``on_cost(trial_id, tags)`` gets a trial's cost tags so far at each of its results and
    when it ends (the tracker's add_trial_tags: put this callback before the tracker)."""

    def __init__(self, spec: ExperimentSpec, on_cost: Optional[Callable[[str, dict], None]] = None,
                 clock: Callable[[], float] = time.time):
        self.spec, self.on_cost, self.clock = spec, on_cost, clock
        self.seconds: dict[str, float] = {}              # trial -> closed segments
        self.open: dict[str, tuple[float, float]] = {}   # trial -> (start, last event) of the running segment
        self.holds: dict[str, dict[str, float]] = {}

    def _close(self, trial_id: str, end: Optional[float] = None) -> None:
        if trial_id in self.open:
            start, last = self.open.pop(trial_id)
            self.seconds[trial_id] = self.seconds.get(trial_id, 0.0) + max((end or last) - start, 0.0)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._close(trial.trial_id)   # an earlier start (paused since): it ran until its last result
        self.holds[trial.trial_id] = held(self.spec, trial.config)
        now = self.clock()
        self.open[trial.trial_id] = (now, now)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if trial.trial_id in self.open:
            self.open[trial.trial_id] = (self.open[trial.trial_id][0], self.clock())
        self._tell(trial.trial_id)   # a trial stopped with the experiment gets no end event of its own

    def _tell(self, trial_id: str) -> None:
        if self.on_cost is not None and trial_id in self.holds:
            self.on_cost(trial_id, cost_tags(self.trial_cost(trial_id)))

    def _end(self, trial) -> None:
        self._close(trial.trial_id, self.clock())
        self._tell(trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial)

    def _seconds(self, trial_id: str) -> float:
        """Wall time so far (a running trial: up to now)."""
        running = self.clock() - self.open[trial_id][0] if trial_id in self.open else 0.0
        return self.seconds.get(trial_id, 0.0) + running

    def on_experiment_end(self, trials, **info):
        for trial_id in list(self.open):   # stopped with the experiment: it held its resources until now
            self._close(trial_id, self.clock())
            self._tell(trial_id)

    def trial_cost(self, trial_id: str) -> dict[str, float]:
        return cost_of(self.holds.get(trial_id, {"workers": 0, "cpus": 0.0, "gpus": 0.0}), self._seconds(trial_id))

    def spent(self) -> dict[str, float]:
        """The experiment's cost so far: every trial's, the running ones' up to now."""
        costs = [self.trial_cost(t) for t in self.holds]
        return {k: sum(c[k] for c in costs) for k in COSTS}

    def get_state(self) -> Optional[dict]:
        return {"seconds": {t: self._seconds(t) for t in self.holds}, "holds": self.holds}

    def set_state(self, state: dict) -> None:   # running segments end at the interruption
        self.seconds, self.holds, self.open = dict(state["seconds"]), dict(state["holds"]), {}
