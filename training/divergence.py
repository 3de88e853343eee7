"""When training has diverged, and how data-parallel workers stop together.

A step diverges when its loss or its gradient norm is not finite (``Diverged`` names the step and
the LR). Under DDP every worker must stop at the same step, or the others wait forever in the next
collective: a worker whose own loss is not finite poisons its gradients (``poisoned``), and since
gradients are all-reduced every worker then sees a non-finite norm at that step (``grad_norm``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


class Diverged(RuntimeError):
    """The loss or gradient became NaN/Inf: training stopped at ``step`` with learning rate ``lr``."""

    def __init__(self, step: int, lr: float, value: float, what: str = "gradient norm"):
        self.step, self.lr, self.value, self.what = step, lr, value, what
        super().__init__(f"diverged at step {step} (lr {lr:.4g}): {what} is {value}")


def poisoned(loss: torch.Tensor) -> torch.Tensor:
    """``loss`` with NaN gradients where its value is not finite (an Inf loss can have finite
    gradients), and exactly ``loss`` (x 1.0) otherwise; no host sync. Under DDP the NaN gradients
    are all-reduced, so the workers whose own loss is finite stop at the same step (gradient
    norm NaN) as the one that raises Diverged for its loss: none is left waiting in a collective."""
    return loss * torch.where(torch.isfinite(loss.detach()), 1.0, math.nan)


def grad_norm(params: list[torch.Tensor], clip: Optional[float]) -> float:
    """The global gradient norm, clipped to ``clip`` where set. Without clipping only the norm is
    computed: clip_grad_norm_(..., inf) would also rescale every gradient by 1."""
    if clip:
        return nn.utils.clip_grad_norm_(params, clip).item()
    grads = [p.grad for p in params if p.grad is not None]
    return nn.utils.get_total_norm(grads).item() if grads else 0.0
