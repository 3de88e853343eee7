"""How much of a trial's time went to waiting for its data: the per-epoch ``data_wait_fraction``
(training.measure: the time the step loop waited for its next batch over the step loop's time)
read from its history, and when that makes the trial input bound. Plain data, no torch.

The diagnosis (tuning.analysis.diagnose) calls a trial ``input_bound`` from these numbers; the final
table (tuning.analysis.report) shows ``data_wait`` for every trial.
"""
from __future__ import annotations

from typing import Optional, Sequence

from tuning.analysis.ranking import is_finite_number

WAIT_KEY = "data_wait_fraction"
# Input bound: waiting 20% of the time, the accelerator idles a fifth of every epoch, and feeding it
# would make each trial 1.25x faster; that is 4x the 5% bench/gpu.py sets as the goal with enough
# loader workers, so it is not the residue of a pipeline that keeps up.
INPUT_BOUND_WAIT = 0.20
# ... and only where the waiting adds up: fewer than 1 s per epoch is no time to win, and it is what
# OS scheduling alone makes of a sub-second epoch on a busy CPU (in-memory digits, 0.1 s epochs on a
# loaded 2-core machine: 3-18% measured with nothing to fix). The wait per epoch is estimated as the
# fraction x ``epoch_time_s`` (an upper bound: the epoch also evaluates); without epoch times the
# fraction alone decides.
MIN_WAIT_S_PER_EPOCH = 1.0

ADVICE = ("the training step waited for its next batch {wait:.0%} of the time (the accelerator idle; fed, the step "
          "loop would take {faster:.0%} of its time): more loader worker processes where samples are decoded or "
          "augmented on the CPU (data.loader_workers, up to the worker's CPUs, scaling.cpus_per_worker; an in-memory "
          "dataset is fastest with auto, which uses none), decoding and preprocessing on Ray Data's CPU workers "
          "(data on shared or object storage), or cheaper per-sample CPU augmentation (data.augment runs on the "
          "device)")


def _values(history: Sequence[dict], key: str) -> list[float]:
    return [float(h[key]) for h in history if isinstance(h, dict) and is_finite_number(h.get(key))]


def data_wait(history: Sequence[dict]) -> Optional[float]:
    """The mean ``data_wait_fraction`` over the epochs that report it (None when none does)."""
    waits = _values(history, WAIT_KEY)
    return sum(waits) / len(waits) if waits else None


def input_bound_evidence(history: Sequence[dict]) -> Optional[dict[str, float]]:
    """Evidence that the trial was input bound (its mean data wait above INPUT_BOUND_WAIT, and at
    least MIN_WAIT_S_PER_EPOCH seconds an epoch where epoch times are known), else None."""
    wait = data_wait(history)
    if wait is None or wait <= INPUT_BOUND_WAIT:
        return None
    ev = {WAIT_KEY: wait, "epochs": float(len(_values(history, WAIT_KEY))), "speedup_if_fed": 1 / max(1 - wait, 1e-9)}
    times = [float(h["epoch_time_s"]) * float(h[WAIT_KEY]) for h in history if isinstance(h, dict)
             and is_finite_number(h.get("epoch_time_s")) and is_finite_number(h.get(WAIT_KEY))]
    if times:
        ev["wait_s_per_epoch"] = sum(times) / len(times)
        if ev["wait_s_per_epoch"] < MIN_WAIT_S_PER_EPOCH:
            return None
    rates = _values(history, "samples_per_s")
    if rates:
        ev["samples_per_s"] = rates[-1]
    return ev


def advice(evidence: dict[str, float]) -> str:
    """What to do about an input-bound trial, with its numbers."""
    wait = evidence[WAIT_KEY]
    return ADVICE.format(wait=wait, faster=1 - wait)
