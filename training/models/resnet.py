"""The registry's ResNets (resnet18, resnet50): torchvision's, with stages for transfer learning,
stochastic depth on the residual branches, a head dropout, a small-image stem; state_dict-compatible
with torchvision. Imported only when a ResNet is built (training.models.registry): torchvision costs
1.6 s of imports (torch._dynamo) that an MLP never needs, in every trial and Train worker."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.ops import StochasticDepth

from training.config import ModelConfig
from training.models.base import StagedModel, image_shape


class BasicBlock(tv_resnet.BasicBlock):
    """torchvision's BasicBlock with stochastic depth on the residual branch; same state_dict keys."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.drop_path = StochasticDepth(0.0, "row")   # p set by ResNet; no parameters or buffers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(self.drop_path(out) + identity)


class Bottleneck(tv_resnet.Bottleneck):
    """torchvision's Bottleneck with stochastic depth on the residual branch; same state_dict keys."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.drop_path = StochasticDepth(0.0, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(self.drop_path(out) + identity)


class ResNet(StagedModel, tv_resnet.ResNet):
    """torchvision's ResNet (state_dict-compatible with it) plus stages, stochastic depth and a head dropout.

    ``small_stem``: 3x3 stride-1 conv1 and no max-pool, for 32x32 inputs. Any input channel count
    (conv1 is rebuilt when it differs from 3). Stochastic depth (Huang et al. 2016): residual block
    l of L is dropped per sample with probability ``stochastic_depth * l / L`` in training.
    Stages: stem, layer1..layer4, fc.
    """

    def __init__(self, block: type, layers: list[int], *, num_classes: int, in_channels: int,
                 small_stem: bool, dropout: float, stochastic_depth: float):
        super().__init__(block, layers, num_classes=num_classes)
        if small_stem or in_channels != 3:
            kernel, stride, padding = (3, 1, 1) if small_stem else (7, 2, 3)
            self.conv1 = nn.Conv2d(in_channels, 64, kernel, stride, padding, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision
        if small_stem:
            self.maxpool = nn.Identity()
        self.dropout = nn.Dropout(dropout)
        blocks = self.residual_blocks()
        for i, b in enumerate(blocks, start=1):
            b.drop_path.p = stochastic_depth * i / len(blocks)

    def residual_blocks(self) -> list[nn.Module]:
        return [b for layer in (self.layer1, self.layer2, self.layer3, self.layer4) for b in layer]

    def stages(self) -> list[nn.Module]:
        stem = nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool)  # a view; not registered
        return [stem, self.layer1, self.layer2, self.layer3, self.layer4, self.fc]

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:  # torchvision's, plus dropout before fc
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


_LAYERS = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet50": (Bottleneck, [3, 4, 6, 3])}


def build(cfg: ModelConfig, num_classes: int, input_shape: tuple[int, ...], stochastic_depth: float) -> ResNet:
    """The registry entry ``cfg.name`` (resnet18 / resnet50) for (C, H, W) inputs."""
    block, layers = _LAYERS[cfg.name]
    c, _, _ = image_shape(cfg, input_shape)
    return ResNet(block, layers, num_classes=num_classes, in_channels=c, small_stem=cfg.small_stem,
                  dropout=cfg.dropout, stochastic_depth=stochastic_depth)
