"""Precision and kernels: how a worker's model runs on its device.

- ``train.precision``: forward passes under ``torch.autocast`` in bf16 or fp16; weights, optimizer
  state and the loss stay fp32. fp16's narrow range needs a gradient scaler (``torch.amp.GradScaler``):
  the loss is scaled up before backward, the gradients unscaled before clipping, and a step whose
  gradients overflowed is skipped while the scale backs off (its state is in every checkpoint).
  bf16 has fp32's range and needs none. Both also run on CPU (fp16 slowly: CPUs lack fp16 matmul
  units; it is there to exercise the GPU path).
- ``train.channels_last``: NHWC weights and inputs for models with 2-D convolutions (the layout
  cuDNN's and oneDNN's fast kernels read); a no-op for other models.
- ``train.compile``: ``torch.compile`` with that mode, once per worker, around the module the step
  calls (the DDP wrapper where there is one, so DDP's bucketed all-reduce stays overlapped with
  backward). Checkpoints, EMA, snapshots and exports use the uncompiled module: no ``_orig_mod.`` keys.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from training.config import ConfigError

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """Autocast and the fp16 gradient scaler of one worker. With fp32 every method is the plain
    operation (a disabled GradScaler passes through), so the fp32 path is unchanged bit for bit."""

    def __init__(self, precision: str, device: torch.device):
        if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("precision", precision, "fp16 or fp32 on this GPU (it has no bf16 support)")
        self.dtype = DTYPES[precision]
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context forward passes run in."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    @property
    def skips_overflow(self) -> bool:
        """Whether a non-finite gradient is an overflow the scaler handles (fp16), not a divergence."""
        return self.scaler.is_enabled()

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Gradients back to their true scale (before the norm and clipping)."""
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer step (skipped by the scaler if the gradients overflowed), then the scale update."""
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state (plain numbers), {} without a scaler."""
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """A saved scaler state; none (fp32/bf16 checkpoints) leaves a fresh scaler."""
        if state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state)


def has_conv2d(model: nn.Module) -> bool:
    """Whether ``train.channels_last`` applies to ``model`` (it has a 2-D convolution)."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def compiled(model: nn.Module, mode: str) -> nn.Module:
    """``model`` compiled with ``train.compile``'s mode (compilation happens at its first call)."""
    if mode == "off":
        return model
    return torch.compile(model, mode=None if mode == "default" else mode)
