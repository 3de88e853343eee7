"""The small registry models: ``mlp`` (any input shape) and ``small_cnn`` ((C, H, W) images)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from training.config import ModelConfig
from training.models.base import StagedModel, image_shape, no_stochastic_depth

_NO_RESIDUALS = "stochastic depth needs residual blocks: resnet18, resnet50, timm: or torchvision: models"


class MLP(StagedModel):
    """Flatten, then Linear-ReLU-Dropout per hidden width, then a Linear head."""

    def __init__(self, in_features: int, hidden: list[int], num_classes: int, dropout: float):
        super().__init__()
        blocks = []
        for width in hidden:
            blocks.append(nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Dropout(dropout)))
            in_features = width
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(in_features, num_classes)

    def stages(self) -> list[nn.Module]:
        return [*self.blocks, self.head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class SmallCNN(StagedModel):
    """Conv3x3-BN-ReLU per width, 2x2 max-pool between blocks while the side is >= 4, GAP, dropout, head.

    On 8x8 digits with widths [32, 64]: 8x8 -> pool -> 4x4 -> global average pool.
    """

    def __init__(self, in_channels: int, side: int, channels: list[int], num_classes: int, dropout: float):
        super().__init__()
        blocks = []
        for i, width in enumerate(channels):
            layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                                       nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            if i < len(channels) - 1 and side >= 4:
                layers.append(nn.MaxPool2d(2))
                side //= 2
            blocks.append(nn.Sequential(*layers))
            in_channels = width
        self.blocks = nn.ModuleList(blocks)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(in_channels, num_classes)

    def stages(self) -> list[nn.Module]:
        return [*self.blocks, self.head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(self.dropout(F.adaptive_avg_pool2d(x, 1).flatten(1)))


def build_mlp(cfg: ModelConfig, num_classes: int, input_shape: tuple[int, ...], stochastic_depth: float) -> MLP:
    no_stochastic_depth(cfg, stochastic_depth, _NO_RESIDUALS)
    return MLP(math.prod(input_shape), cfg.hidden, num_classes, cfg.dropout)


def build_small_cnn(cfg: ModelConfig, num_classes: int, input_shape: tuple[int, ...],
                    stochastic_depth: float) -> SmallCNN:
    no_stochastic_depth(cfg, stochastic_depth, _NO_RESIDUALS)
    c, h, w = image_shape(cfg, input_shape)
    return SmallCNN(c, min(h, w), cfg.channels, num_classes, cfg.dropout)
