"""Transfer-learning modes (model.transfer): which stages train, and the backbone/head split of parameters."""
from __future__ import annotations

from torch import nn

from training.config import ConfigError, ModelConfig
from training.models.base import StagedModel


def apply_transfer(model: StagedModel, cfg: ModelConfig) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Freeze stages per ``cfg.transfer``; return (trainable backbone params, head params).

    full: every stage trains. finetune_last_n: the last ``cfg.finetune_last_n`` stages train (head
    included). linear_probe: only the head trains. Frozen parameters get ``requires_grad=False`` and
    frozen stages stay in eval mode under ``model.train()`` (see StagedModel.train). The loop gives
    backbone params ``cfg.effective_backbone_lr_mult`` times the head's learning rate.
    """
    stages = model.stages()
    n_trainable = {"full": len(stages), "linear_probe": 1,
                   "finetune_last_n": cfg.finetune_last_n}[cfg.transfer]
    if n_trainable > len(stages):
        raise ConfigError("model.finetune_last_n", n_trainable,
                          f"<= {len(stages)}, the number of stages of {cfg.name} (head included)")
    first_trainable = len(stages) - n_trainable
    for p in model.parameters():
        p.requires_grad_(False)
    for stage in stages[first_trainable:]:
        for p in stage.parameters():
            p.requires_grad_(True)
    model._frozen_stages = tuple(range(first_trainable))
    model.train(model.training)   # puts the frozen stages in eval mode now
    head = list(stages[-1].parameters())
    head_ids = {id(p) for p in head}
    backbone = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    return backbone, head
