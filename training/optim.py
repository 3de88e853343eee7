"""Optimizer registry. LARS and LAMB come from timm (maintained), not written by hand.

Each builder takes parameter groups (training.regularizers.param_groups: each group's ``lr``
is already its peak LR and carries its own ``weight_decay``) and the optim section.
"""
from __future__ import annotations

from typing import Callable

import torch

from training.config import OptimConfig


def _sgd(groups: list[dict], o: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=o.momentum, nesterov=o.nesterov)


def _adamw(groups: list[dict], o: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=groups[0]["lr"], betas=tuple(o.betas), eps=o.eps)


def _lars(groups: list[dict], o: OptimConfig) -> torch.optim.Optimizer:
    from timm.optim import Lars

    return Lars(groups, lr=groups[0]["lr"], momentum=o.momentum, nesterov=o.nesterov, eps=o.eps)


def _lamb(groups: list[dict], o: OptimConfig) -> torch.optim.Optimizer:
    from timm.optim import Lamb

    # max_grad_norm=None: clipping is the loop's job (optim.grad_clip), applied once.
    return Lamb(groups, lr=groups[0]["lr"], betas=tuple(o.betas), eps=o.eps, max_grad_norm=None)


OPTIMIZERS: dict[str, Callable[[list[dict], OptimConfig], torch.optim.Optimizer]] = {
    "sgd": _sgd, "adamw": _adamw, "lars": _lars, "lamb": _lamb,
}


def build_optimizer(groups: list[dict], optim: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``optim.name`` over ``groups`` (which must not be empty)."""
    if not groups:
        raise ValueError("no trainable parameters: every layer is frozen (check model.transfer)")
    return OPTIMIZERS[optim.name](groups, optim)
