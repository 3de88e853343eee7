"""Learning-rate schedules as pure functions of (schedule config, step, total_steps).

Everything here is in optimizer steps. ``plan_steps`` is the one place that turns epochs
into steps (steps per epoch depend on the global batch). A schedule returns a multiplier of
the peak LR (``peak_lr``: the large-batch rule applied to ``optim.base_lr``); the loop wraps
``lr_multiplier`` once in ``torch.optim.lr_scheduler.LambdaLR``.

Warmup is a composition, not a flag inside each schedule: for ``step < W`` the warmup ramp
applies, and the main schedule runs over the remaining ``T - W`` steps with its own clock
``t = step - W`` (so step milestones are fractions of the post-warmup phase, ``T - W`` steps:
milestone ``m`` is at step ``W + round(m * (T - W))``; this is torch's
``SequentialLR([warmup, MultiStepLR], milestones=[W])``).

- linear warmup: ``start + (1 - start) * step / W``; the peak (1.0) is reached exactly at step W.
- constant warmup: ``start`` for every step < W, then a jump to the main schedule (Goyal et al.).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Union

from training.config import OptimConfig, ScheduleConfig, TrainConfig

ScheduleLike = Union[ScheduleConfig, Mapping[str, Any]]


def _constant(s: ScheduleConfig, t: int, T: int) -> float:
    return 1.0


def _step(s: ScheduleConfig, t: int, T: int) -> float:
    """gamma ** (number of milestones passed); milestone k is at ``t = round(m_k * T)``, where ``t``
    and ``T`` count post-warmup steps (see lr_multiplier)."""
    return s.gamma ** sum(t >= round(m * T) for m in s.milestones)


def _cosine(s: ScheduleConfig, t: int, T: int) -> float:
    """alpha_t = alpha_0 / 2 * (1 + cos(t * pi / T)), floored at min_factor."""
    return s.min_factor + (1 - s.min_factor) * 0.5 * (1 + math.cos(math.pi * t / T))


def _linear(s: ScheduleConfig, t: int, T: int) -> float:
    """alpha_t = alpha_0 * (1 - t / T), floored at min_factor."""
    return s.min_factor + (1 - s.min_factor) * (1 - t / T)


def _wsd(s: ScheduleConfig, t: int, T: int) -> float:
    """Warmup-stable-decay: the peak until the last ``decay_fraction`` of the post-warmup phase
    (D = max(1, round(decay_fraction * T)) steps), then linear to min_factor over those D steps
    (1.0 at ``t = T - D``, as ``_linear`` at its start). The decay is a cooldown appended to a
    constant run, so a run stopped anywhere can be finished by one (training.cooldown's fork is
    that estimate); decay_fraction 1 is ``linear``."""
    D = max(1, round(s.decay_fraction * T))
    if t < T - D:
        return 1.0
    return s.min_factor + (1 - s.min_factor) * (T - t) / D


def _cyclic_cosine(s: ScheduleConfig, t: int, T: int) -> float:
    """SGDR: ``cycles`` equal cosine cycles of length T / cycles, each restarting at the peak."""
    cycle = T / s.cycles
    return _cosine(s, t % cycle if cycle >= 1 else 0, max(cycle, 1))


SCHEDULES: dict[str, Callable[[ScheduleConfig, int, int], float]] = {
    "constant": _constant,
    "step": _step,
    "cosine": _cosine,
    "linear": _linear,
    "cyclic_cosine": _cyclic_cosine,
    "wsd": _wsd,
    # inverse_sqrt needs the warmup length: see lr_multiplier
}


def _as_config(schedule: ScheduleLike) -> ScheduleConfig:
    if isinstance(schedule, ScheduleConfig):
        return schedule
    return ScheduleConfig.from_dict(dict(schedule), "schedule")


def warmup_steps(schedule: ScheduleLike, steps_per_epoch: int | None = None) -> int:
    """Warmup length in steps: ``warmup_steps`` if set, else ``warmup_epochs * steps_per_epoch``."""
    s = _as_config(schedule)
    if s.warmup == "none":
        return 0
    if s.warmup_steps is not None:
        return s.warmup_steps
    if s.warmup_epochs == 0:
        return 0
    if steps_per_epoch is None:
        raise ValueError("schedule.warmup_epochs needs steps_per_epoch (or set schedule.warmup_steps)")
    return round(s.warmup_epochs * steps_per_epoch)


def lr_multiplier(schedule: ScheduleLike, step: int, total_steps: int,
                  steps_per_epoch: int | None = None) -> float:
    """Multiplier of the peak LR at optimizer ``step`` (0-based) of a ``total_steps`` run.

    ``steps_per_epoch`` is needed only when warmup is given in epochs.
    """
    s = _as_config(schedule)
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= step:
        raise ValueError(f"step must be >= 0, got {step}")
    W = min(warmup_steps(s, steps_per_epoch), total_steps - 1)
    if step < W:
        if s.warmup == "constant":
            return s.warmup_start_factor
        return s.warmup_start_factor + (1 - s.warmup_start_factor) * step / W
    t, T = step - W, total_steps - W
    t = min(t, T)  # past the end (an extra step), hold the final value
    if s.name == "inverse_sqrt":
        # alpha_0 / sqrt(t) with t in units of the warmup length (fairseq's sqrt(W / step)),
        # continuous at the end of warmup; without warmup the unit is one step.
        tau = max(W, 1)
        return math.sqrt(tau / (tau + t))
    return SCHEDULES[s.name](s, t, T)


SCHEDULE_NAMES = tuple(SCHEDULES) + ("inverse_sqrt",)


def peak_lr(optim: OptimConfig, global_batch: int) -> float:
    """The large-batch rule: the LR reached after warmup, from ``base_lr`` per ``reference_batch``.

    linear (Goyal et al. 2017): base_lr * global_batch / reference_batch;
    sqrt: base_lr * sqrt(global_batch / reference_batch); none: base_lr.
    """
    k = global_batch / optim.reference_batch
    return optim.base_lr * {"linear": k, "sqrt": math.sqrt(k), "none": 1.0}[optim.lr_scaling]


@dataclass(frozen=True)
class StepPlan:
    """How a run's epochs map to optimizer steps (the only epochs->steps conversion)."""
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    peak_lr: float


def plan_steps(cfg: TrainConfig, train_size: int) -> StepPlan:
    """Steps per epoch for ``train_size`` samples split across workers (partial batches dropped)."""
    sc = cfg.scaling
    per_worker = train_size // sc.num_workers  # disjoint equal shards (the sampler drops the remainder)
    spe = per_worker // sc.batch_per_worker // sc.grad_accum_steps
    if spe < 1:
        raise ValueError(
            f"scaling: global batch {sc.global_batch} (batch_per_worker {sc.batch_per_worker} x "
            f"num_workers {sc.num_workers} x grad_accum_steps {sc.grad_accum_steps}) is larger than "
            f"the training set ({train_size} samples): not one optimizer step per epoch")
    total = spe * cfg.epochs
    return StepPlan(sc.global_batch, spe, total, min(warmup_steps(cfg.schedule, spe), total - 1),
                    peak_lr(cfg.optim, sc.global_batch))


def lambda_lr(optimizer, cfg: TrainConfig, plan: StepPlan):
    """The schedule wrapped once in LambdaLR (param groups' ``lr`` must hold their peak LR)."""
    import torch

    s = cfg.schedule
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(s, step, plan.total_steps, plan.steps_per_epoch))
