"""What an experiment produced, as plain data: its trials (from Tune, or read back from MLflow),
how each ended, and the numbers on which they are ranked. No Ray, MLflow or torch."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tuning.analysis.diagnose import Diagnosis
from tuning.analysis.ranking import BROKEN_STATUSES, is_finite_number

# Keys Tune adds to every result: not training metrics.
TUNE_KEYS = frozenset({"epoch", "step", "training_iteration", "timestamp", "time_this_iter_s", "time_total_s",
                       "time_since_restore", "iterations_since_restore", "pid", "done", "diverged_step"})


SCHEDULER_NAMES = {"asha": "ASHA", "hyperband": "HyperBand", "median": "the median stopping rule", "pbt": "PBT"}


def end_state(last: dict[str, Any], errored: bool, epochs: int, scheduler: str) -> str:
    """How a trial ended, from its last result: completed / stopped by ASHA (HyperBand, the median
    stopping rule) at epoch N / diverged / failed."""
    if errored:
        return "failed"
    if last.get("diverged"):
        return "diverged"
    epoch = int(last.get("epoch", 0))
    if epoch >= epochs:
        return "completed"
    return f"stopped by {SCHEDULER_NAMES.get(scheduler, 'the scheduler')} at epoch {epoch}"


def cut_short(epoch: int) -> str:
    """The status of a trial still running when a completion criterion ended the experiment."""
    return f"stopped at epoch {epoch}: the experiment ended"


def finite_numbers(values: dict[str, Any], exclude=frozenset()) -> dict[str, float]:
    """The finite numbers of ``values`` (what MLflow takes as metrics), but the keys in ``exclude``."""
    return {k: float(v) for k, v in values.items() if k not in exclude and is_finite_number(v)}


def training_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The numeric, finite training metrics of a Tune result."""
    return finite_numbers(result, TUNE_KEYS)


def error_summary(error: BaseException) -> str:
    """The line of a trial's error that says what went wrong: Ray wraps the trial's own exception in
    a traceback whose first line names only the actor, and whose last ``Type: message`` line is it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):
        m = re.match(r"^(?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*(?:Error|Exception)): (.+)", line)
        if m:
            return f"{m.group(1)}: {m.group(2)}"[:1000]
    return (lines[0] if lines else type(error).__name__)[:1000]


def trial_error_line(trial) -> Optional[str]:
    """``error_summary`` of a failed Tune trial's error: its error file, else what Tune kept of it."""
    error_file = getattr(trial, "error_file", None)
    readers = (lambda: Path(error_file).read_text() if error_file else None, getattr(trial, "get_error", lambda: None))
    for read in readers:
        try:
            text = read()
        except Exception:   # not written yet, or on storage this process cannot read
            text = None
        if text:
            return error_summary(text)
    return None


@dataclass
class TrialRow:
    """One trial of a finished invocation, as the driver saw it."""
    trial_id: str
    status: str                 # completed | stopped by ASHA at epoch N | diverged | failed
    epochs: int
    metric: Optional[float]     # the trial's score (tuning.analysis.ranking.trial_score)
    params: dict[str, Any]
    run_id: Optional[str] = None
    error: Optional[str] = None
    diagnosis: Optional[str] = None   # tuning.analysis.diagnose kind of its learning curves
    cost: Optional[dict[str, float]] = None   # worker_seconds, cpu_hours, gpu_hours (tuning.driver.cost)
    data_wait: Optional[float] = None   # mean data_wait_fraction of its epochs (tuning.analysis.data_wait)
    repeat: Optional[int] = None        # experiment.repeats: which repeat of its config (its seed: train.seed + it)
    group: Optional[tuple[float, float, int]] = None   # repeats: its config's (mean, std, repeats with a score)
    objectives: Optional[dict[str, float]] = None      # experiment.metrics: its point (tuning.analysis.pareto)
    on_front: bool = False                             # experiment.metrics: on the Pareto front


@dataclass
class ExperimentResult:
    name: str
    path: str                   # where Tune keeps this invocation (what --resume restores)
    rows: list[TrialRow]        # best first; diverged and failed trials last
    tracking_uri: str
    experiment_id: Optional[str] = None
    parent_run_id: Optional[str] = None
    model_version: Optional[str] = None
    champion: Optional[str] = None    # the registered version with the alias ``champion`` (after this run)
    lost_metrics: int = 0
    lost_artifacts: int = 0           # files (checkpoints, plots) not uploaded after every retry
    ended_by: Optional[str] = None    # the completion criterion that ended it (tuning.driver.stopping); None: none
    cost: dict[str, float] = field(default_factory=dict)   # the trials' costs summed (tuning.driver.cost)

    @property
    def best(self) -> Optional[TrialRow]:
        ok = [r for r in self.rows if r.metric is not None and r.status not in BROKEN_STATUSES]
        return ok[0] if ok else None


@dataclass
class TrialRecord:
    """One trial read back from MLflow with its curves (what ``schedtune report`` plots)."""
    trial_id: str
    run_id: str
    status: str
    start_time: int
    sampled: dict[str, Any]
    history: list[dict[str, float]]
    trace: Optional[dict] = None
    num_classes: Optional[int] = None
    metric: Optional[float] = None          # the trial's score (None: diverged / failed / no value)
    diagnosis: Optional[Diagnosis] = None


@dataclass
class ExperimentRecord:
    name: str
    parent_run_id: str
    metric: str
    mode: str
    space: Optional[dict] = None            # key -> tuning.spec.Dist (None: no search-space file)
    trials: list[TrialRecord] = field(default_factory=list)
