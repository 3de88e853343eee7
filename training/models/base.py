"""What every model shares: the StagedModel contract and the input-shape and stochastic-depth checks.

A :class:`StagedModel`'s ``stages()`` lists its top-level blocks from input to output, the last one
being the classifier head, and together the stages hold every parameter exactly once. Transfer
learning (training.models.transfer) and pretrained loading (training.models.pretrained) only ever
look at stages.
"""
from __future__ import annotations

from torch import nn

from training.config import ConfigError, ModelConfig


class StagedModel(nn.Module):
    """Base of every model: ordered stages, and a ``train()`` that keeps frozen stages in eval.

    ``apply_transfer`` records the frozen stages; from then on ``model.train()`` leaves their
    BatchNorm (running statistics untouched) and Dropout in eval mode: a frozen stage is a fixed
    feature extractor.
    """

    _frozen_stages: tuple[int, ...] = ()   # indices into stages(), set by apply_transfer

    def stages(self) -> list[nn.Module]:
        raise NotImplementedError

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self._frozen_stages:
            stages = self.stages()
            for i in self._frozen_stages:
                stages[i].eval()
        return self


def image_shape(cfg: ModelConfig, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``input_shape`` as (C, H, W), or a ConfigError on model.name for a model that needs images."""
    if len(input_shape) != 3:
        raise ConfigError("model.name", cfg.name, f"a model for inputs of shape {input_shape} "
                          f"({cfg.name} needs (C, H, W) images; mlp takes any shape)")
    return input_shape  # type: ignore[return-value]


def no_stochastic_depth(cfg: ModelConfig, stochastic_depth: float, why: str) -> None:
    """Refuse regularization.stochastic_depth > 0 for a model that cannot apply it (``why`` says what can)."""
    if stochastic_depth > 0:
        raise ConfigError("regularization.stochastic_depth", stochastic_depth, f"0 for {cfg.name} ({why})")
