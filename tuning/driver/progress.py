"""Live progress on the terminal: trials running / done / stopped, the best so far and, on a
terminal, a bar with an estimate of the time left. Tune's own output is off (``TUNE_OUTPUT_OFF``)."""
from __future__ import annotations

import logging
import shutil
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, TextIO

from ray.tune import Callback

from tuning.analysis.ranking import better, is_finite_number
from tuning.analysis.results import end_state, trial_error_line
from tuning.spec import ExperimentSpec, total_trials

# Tune's own terminal output, off the supported way. Its default reporter prints a "Configuration
# for experiment" box and a TensorBoard hint (into the run's staging dir, which a private cluster
# deletes) at every verbosity, even RunConfig(verbose=0) (ray/tune/experimental/output.py,
# TuneTerminalReporter.experiment_started). RAY_AIR_NEW_OUTPUT=0 selects its legacy reporter, which
# prints nothing at verbose=0. The TensorBoard event files are still written into each trial's
# directory on the results storage, where they outlive the run.
TUNE_OUTPUT_OFF = {"RAY_AIR_NEW_OUTPUT": "0"}
# Tune logs a failed trial's whole traceback ("Trial task failed for trial ...") at ERROR; ours is
# the trial's own error line (below, and in the final table); the traceback stays in its error.txt.
TUNE_CONTROLLER_LOGGER = "ray.tune.execution.tune_controller"


@contextmanager
def tune_output_off() -> Iterator[None]:
    """Tune prints nothing on the terminal while the block runs (environment and logger restored)."""
    from tuning.driver.user_code import scoped_environ

    logger = logging.getLogger(TUNE_CONTROLLER_LOGGER)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with scoped_environ(TUNE_OUTPUT_OFF):
            yield
    finally:
        logger.setLevel(level)

BAR_EVERY_S = 0.5    # the bar is redrawn at most this often


def _fmt_duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class ProgressPrinter(Callback):
    """One line whenever a trial ends. Between ends: on a terminal (``out`` is ``print`` and stdout
    a TTY, or ``stream`` a TTY) a bar redrawn in place; otherwise a line at most every ``every_s``
    seconds on results."""

    def __init__(self, spec: ExperimentSpec, out: Callable[[str], None] = print, every_s: float = 10.0,
                 stream: Optional[TextIO] = None):
        self.spec, self.out, self.every_s, self.stream = spec, out, every_s, stream
        self.t0 = time.monotonic()
        self._last_line = 0.0
        self.best: tuple[float, str, int] | None = None
        self.ended: dict[str, str] = {}
        self.epochs: dict[str, int] = {}        # trial -> last epoch reported
        self._start_fraction = 0.0              # progress when this invocation started (--resume)
        self._bar_shown = False

    def __getstate__(self):   # Tune pickles callbacks with the experiment state
        return {**self.__dict__, "out": print, "stream": None, "_bar_shown": False}

    # -- what the terminal shows
    def _terminal(self) -> Optional[TextIO]:
        """The stream the bar is drawn on, or None for plain lines."""
        stream = self.stream if self.stream is not None else (sys.stdout if self.out is print else None)
        isatty = getattr(stream, "isatty", None)
        return stream if isatty is not None and isatty() else None

    def fraction(self) -> float:
        """How much of the experiment is done, in trial-epochs: an ended trial counts whole."""
        total = total_trials(self.spec) * self.spec.base.epochs
        done = sum(self.spec.base.epochs if t in self.ended else e for t, e in self.epochs.items())
        done += self.spec.base.epochs * sum(t not in self.epochs for t in self.ended)
        return min(1.0, done / total) if total else 1.0

    def eta_s(self) -> Optional[float]:
        """Seconds left at this invocation's pace so far; None before there is a pace."""
        f, elapsed = self.fraction(), time.monotonic() - self.t0
        gained = f - self._start_fraction
        if gained <= 0 or elapsed <= 0:
            return None
        return elapsed / gained * (1.0 - f)

    def _best_text(self) -> str:
        o = self.spec.options
        return (f"best {o.metric} {self.best[0]:.4f} ({self.best[1]}, epoch {self.best[2]})"
                if self.best else f"best {o.metric} -")

    def _line(self, trials, note: str = "") -> None:
        self._last_line = time.monotonic()
        running = sum(t.status == "RUNNING" for t in trials)
        pending = sum(t.status == "PENDING" for t in trials)
        stopped = sum("stopped" in s for s in self.ended.values())
        elapsed = time.monotonic() - self.t0
        self._emit(f"[{elapsed:6.0f}s] {running} running, {pending} pending, {len(self.ended)}/{total_trials(self.spec)} "
                   f"done ({stopped} stopped early) | {self._best_text()}{' | ' + note if note else ''}")

    def bar(self, trials, width: int = 100) -> str:
        """The bar's text: done/total trials, running, the best so far, the estimate; fits ``width``."""
        f, eta = self.fraction(), self.eta_s()
        running = sum(t.status == "RUNNING" for t in trials)
        tail = (f" {len(self.ended)}/{total_trials(self.spec)} trials, {running} running | {self._best_text()} | "
                f"ETA {'-' if eta is None else _fmt_duration(eta)}")
        cells = max(10, min(30, width - len(tail) - 2))
        filled = int(round(f * cells))
        text = f"[{'#' * filled}{'-' * (cells - filled)}]{tail}"
        return text if len(text) <= width else text[:width - 1] + "~"

    def _draw(self, trials) -> None:
        term = self._terminal()
        width = shutil.get_terminal_size((100, 24)).columns - 1
        term.write("\r\x1b[K" + self.bar(trials, width))
        term.flush()
        self._bar_shown = True
        self._last_line = time.monotonic()

    def _emit(self, line: str) -> None:
        """A line that stays: on a terminal, written above the bar."""
        term = self._terminal()
        if term is not None and self._bar_shown:
            term.write("\r\x1b[K")
            self._bar_shown = False
        self.out(line)

    # -- Tune hooks
    def setup(self, **info):
        self.t0 = time.monotonic()
        self._start_fraction = self.fraction()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        o = self.spec.options
        v = result.get(o.metric)
        self.epochs[trial.trial_id] = int(result.get("epoch", self.epochs.get(trial.trial_id, 0)))
        if is_finite_number(v) and not result.get("diverged"):
            if better(v, self.best and self.best[0], o.mode):
                self.best = (float(v), trial.trial_id, int(result.get("epoch", 0)))
        if self._terminal() is not None:
            if time.monotonic() - self._last_line >= BAR_EVERY_S:
                self._draw(trials)
        elif time.monotonic() - self._last_line >= self.every_s:
            self._line(trials)

    def _ended(self, trials, trial, errored: bool) -> None:
        state = end_state(trial.last_result or {}, errored, self.spec.base.epochs, self.spec.options.scheduler.name)
        self.ended[trial.trial_id] = state
        error = trial_error_line(trial) if errored else None
        self._line(trials, f"{trial.trial_id} {state}{': ' + error if error else ''}")
        if self._terminal() is not None:
            self._draw(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trials, trial, False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trials, trial, True)

    def on_experiment_end(self, trials, **info):
        term = self._terminal()
        if term is not None and self._bar_shown:
            term.write("\n")   # the last bar stays, the summary goes below it
            term.flush()
            self._bar_shown = False
