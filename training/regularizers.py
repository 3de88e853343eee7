"""Regularizers: weight-decay parameter groups, label smoothing, mixup/cutmix, cutout, and
random crop/flip augmentation on image batches.

Batch-level functions take an explicit ``torch.Generator`` so a resumed run draws the same
augmentations as an uninterrupted one. Dropout lives in the models, stochastic depth in the
residual blocks (training.models), weight decay in the optimizer (training.optim).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.config import DataConfig, OptimConfig, RegularizationConfig

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of parameters that get no weight decay: biases and normalization-layer params."""
    names = set()
    for mod_name, mod in model.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(mod, _NORM_TYPES) or p_name == "bias":
                names.add(full)
    return names


def param_groups(model: nn.Module, optim: OptimConfig, peak_lr: float,
                 head_params: set[int] | None = None, backbone_lr_mult: float = 1.0) -> list[dict]:
    """Optimizer parameter groups for the trainable parameters of ``model``.

    Splits decay / no-decay (biases and norm layers get no weight decay unless
    ``optim.decay_norm_and_bias``) and head / backbone (the backbone's LR is
    ``peak_lr * backbone_lr_mult``; ``head_params`` holds ``id(p)`` of head parameters —
    None means every parameter counts as head). Frozen parameters are left out, so they
    get no optimizer state. Each group's ``lr`` is its peak LR (LambdaLR multiplies it).
    """
    skip = set() if optim.decay_norm_and_bias else no_decay_names(model)
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = head_params is None or id(p) in head_params
        buckets.setdefault((is_head, name not in skip), []).append(p)
    groups = []
    for (is_head, decay), params in sorted(buckets.items()):
        lr = peak_lr if is_head else peak_lr * backbone_lr_mult
        groups.append({"params": params, "lr": lr, "weight_decay": optim.weight_decay if decay else 0.0,
                       "name": f"{'head' if is_head else 'backbone'}_{'decay' if decay else 'no_decay'}"})
    return groups


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy against integer labels or soft (mixed) targets, with label smoothing."""
    if target.dtype in (torch.int64, torch.int32):
        return F.cross_entropy(logits, target, label_smoothing=label_smoothing)
    n = logits.shape[-1]
    target = target * (1 - label_smoothing) + label_smoothing / n
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


def _beta(alpha: float, gen: torch.Generator) -> float:
    """A Beta(alpha, alpha) draw reproducible from ``gen`` (torch's Beta takes no generator)."""
    seed = int(torch.randint(2**62, (1,), generator=gen))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def mix_batch(x: torch.Tensor, y: torch.Tensor, reg: RegularizationConfig, num_classes: int,
              gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix (one picked at random when both are on); returns soft targets.

    With both alphas 0 the batch is returned unchanged with integer labels.
    """
    modes = [m for m, a in (("mixup", reg.mixup_alpha), ("cutmix", reg.cutmix_alpha)) if a > 0]
    if not modes:
        return x, y
    mode = modes[int(torch.randint(len(modes), (1,), generator=gen))]
    perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
    onehot = F.one_hot(y, num_classes).to(x.dtype)
    if mode == "mixup":
        lam = _beta(reg.mixup_alpha, gen)
        x = lam * x + (1 - lam) * x[perm]
    else:
        if x.dim() != 4:
            raise ValueError("regularization.cutmix_alpha: cutmix needs image batches (N, C, H, W)")
        lam = _beta(reg.cutmix_alpha, gen)
        y0, y1, x0, x1 = _box(x.shape[2], x.shape[3], 1 - lam, gen)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (x.shape[2] * x.shape[3])  # the area actually pasted
    return x, lam * onehot + (1 - lam) * onehot[perm]


def _box(h: int, w: int, area_frac: float, gen: torch.Generator) -> tuple[int, int, int, int]:
    """A random box covering about ``area_frac`` of an h x w image, clipped at the borders."""
    rh, rw = int(h * area_frac ** 0.5), int(w * area_frac ** 0.5)
    cy, cx = (int(torch.randint(n, (1,), generator=gen)) for n in (h, w))
    return max(cy - rh // 2, 0), min(cy + rh // 2 + rh % 2, h), max(cx - rw // 2, 0), min(cx + rw // 2 + rw % 2, w)


def augment_images(x: torch.Tensor, data: DataConfig, reg: RegularizationConfig,
                   gen: torch.Generator) -> torch.Tensor:
    """Random crop (zero-pad by 1/8 of the side, then crop back) + horizontal flip when
    ``data.augment``; a zeroed ``reg.cutout`` x ``reg.cutout`` square per image when > 0.
    Non-image batches pass through unchanged.

    Runs where ``x`` is: the random offsets are drawn on ``gen``'s device, so a generator on the
    batch's GPU makes the whole augmentation device work, with no host copy or sync per step
    (the loop passes one; a CPU generator works with any batch)."""
    if x.dim() != 4 or (not data.augment and reg.cutout == 0):
        return x
    n, _, h, w = x.shape

    def draw(high: int, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randint(high, shape, generator=gen, device=gen.device).to(x.device)

    if data.augment:
        pad = max(h // 8, 1)
        padded = F.pad(x, (pad, pad, pad, pad))
        dy, dx = draw(2 * pad + 1, (n,)), draw(2 * pad + 1, (n,))
        rows = dy[:, None] + torch.arange(h, device=x.device)[None]          # (n, h)
        cols = dx[:, None] + torch.arange(w, device=x.device)[None]          # (n, w)
        x = padded[torch.arange(n, device=x.device)[:, None, None, None],
                   torch.arange(x.shape[1], device=x.device)[None, :, None, None],
                   rows[:, None, :, None], cols[:, None, None, :]]
        flip = (torch.rand(n, generator=gen, device=gen.device) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if reg.cutout > 0:
        cy, cx = draw(h, (n, 1, 1)), draw(w, (n, 1, 1))
        yy = torch.arange(h, device=x.device)[None, :, None]
        xx = torch.arange(w, device=x.device)[None, None, :]
        half = reg.cutout / 2
        inside = ((yy - cy).abs() < half) & ((xx - cx).abs() < half)
        x = x * (~inside)[:, None].to(x.dtype)
    return x
