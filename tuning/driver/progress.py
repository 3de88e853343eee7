"""Live progress on the terminal: trials running / done / stopped, and the best so far."""
from __future__ import annotations

import time
from typing import Callable

from ray.tune import Callback

from tuning.analysis.ranking import better, is_finite_number
from tuning.analysis.results import end_state
from tuning.spec import ExperimentSpec, total_trials


class ProgressPrinter(Callback):
    """One line whenever a trial ends, and at most every ``every_s`` seconds on results."""

    def __init__(self, spec: ExperimentSpec, out: Callable[[str], None] = print, every_s: float = 10.0):
        self.spec, self.out, self.every_s = spec, out, every_s
        self.t0 = time.monotonic()
        self._last_line = 0.0
        self.best: tuple[float, str, int] | None = None
        self.ended: dict[str, str] = {}

    def __getstate__(self):
        return {**self.__dict__, "out": print}

    def _line(self, trials, note: str = "") -> None:
        self._last_line = time.monotonic()
        running = sum(t.status == "RUNNING" for t in trials)
        pending = sum(t.status == "PENDING" for t in trials)
        stopped = sum("stopped" in s for s in self.ended.values())
        o = self.spec.options
        best = (f"best {o.metric} {self.best[0]:.4f} ({self.best[1]}, epoch {self.best[2]})"
                if self.best else f"best {o.metric} -")
        elapsed = time.monotonic() - self.t0
        self.out(f"[{elapsed:6.0f}s] {running} running, {pending} pending, {len(self.ended)}/{total_trials(self.spec)} done "
                 f"({stopped} stopped early) | {best}{' | ' + note if note else ''}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        o = self.spec.options
        v = result.get(o.metric)
        if is_finite_number(v) and not result.get("diverged"):
            if better(v, self.best and self.best[0], o.mode):
                self.best = (float(v), trial.trial_id, int(result.get("epoch", 0)))
        if time.monotonic() - self._last_line >= self.every_s:
            self._line(trials)

    def _ended(self, trials, trial, errored: bool) -> None:
        state = end_state(trial.last_result or {}, errored, self.spec.base.epochs, self.spec.options.scheduler.name)
        self.ended[trial.trial_id] = state
        self._line(trials, f"{trial.trial_id} {state}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trials, trial, False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trials, trial, True)
