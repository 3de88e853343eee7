"""Tune's trial schedulers as schedtune configures them, and ASHA's memory across ``--resume``.

Tune checkpoints the search algorithm and the callbacks with the experiment, but not the
scheduler (ray-project/ray#30838): a restored experiment rebuilds ASHA from the copy pickled when
the experiment started, with empty rungs. Every trial that resumed would then pass each rung
as if it were the first to reach it, whatever the trials before the interruption scored.
``ASHAState`` is a callback, so Tune checkpoints it, that carries the rung results over.
"""
from __future__ import annotations

from typing import Optional

from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from tuning.spec import ExperimentSpec


def make_scheduler(spec: ExperimentSpec) -> tuple[TrialScheduler, list[Callback]]:
    """The scheduler of ``spec`` and the callbacks it needs on the Tuner's RunConfig."""
    s = spec.options.scheduler
    if s.name == "fifo":
        return FIFOScheduler(), []
    asha = ASHAScheduler(time_attr="epoch", max_t=spec.base.epochs, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor)
    return asha, [ASHAState(asha)]


class ASHAState(Callback):
    """Checkpoints ``asha``'s rung results with the experiment and puts them back on restore.
    It holds the scheduler itself: Tune pickles the tuner's config and callbacks together, so
    after a restore this is still the scheduler Tune runs."""

    def __init__(self, asha: ASHAScheduler):
        self.asha = asha

    def get_state(self) -> Optional[dict]:
        rungs = [[(milestone, dict(recorded)) for milestone, recorded in b._rungs] for b in self.asha._brackets]
        if not any(recorded for bracket in rungs for _, recorded in bracket):
            return None
        return {"rungs": rungs, "num_stopped": self.asha._num_stopped}

    def set_state(self, state: dict) -> None:
        for bracket, saved in zip(self.asha._brackets, state["rungs"]):
            for (milestone, recorded), (saved_milestone, saved_recorded) in zip(bracket._rungs, saved):
                if milestone == saved_milestone:
                    recorded.update(saved_recorded)
        self.asha._num_stopped = state["num_stopped"]
