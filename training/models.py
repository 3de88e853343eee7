"""Model registry (mlp, small_cnn, torchvision resnets) and transfer-learning modes.

Every model is a :class:`StagedModel`: ``model.stages()`` lists its top-level blocks from input to
output, the last one being the classifier head (the final ``nn.Linear``), and together the stages
hold every parameter exactly once. Transfer learning only ever looks at stages.

Order of use (training.loop): ``build_model`` (constructs, applies ``cfg.init``, loads
``cfg.pretrained``) -> ``apply_transfer`` (freezes stages, returns backbone/head parameters).
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from training.config import ConfigError, ModelConfig


class StagedModel(nn.Module):
    """Base of every registry model: ordered stages, and a ``train()`` that keeps frozen stages in eval.

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


# ---------------------------------------------------------------------------- registry

ModelBuilder = Callable[[ModelConfig, int, tuple[int, ...], float], StagedModel]


def _image_shape(cfg: ModelConfig, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ConfigError("model.name", cfg.name, f"a model for inputs of shape {input_shape} "
                          f"({cfg.name} needs (C, H, W) images; mlp takes any shape)")
    return input_shape  # type: ignore[return-value]


def _no_stochastic_depth(cfg: ModelConfig, stochastic_depth: float) -> None:
    if stochastic_depth > 0:
        raise ConfigError("regularization.stochastic_depth", stochastic_depth,
                          f"0 for {cfg.name} (stochastic depth needs residual blocks: resnet18, resnet50)")


def _mlp(cfg: ModelConfig, num_classes: int, input_shape: tuple[int, ...], stochastic_depth: float) -> MLP:
    _no_stochastic_depth(cfg, stochastic_depth)
    return MLP(math.prod(input_shape), cfg.hidden, num_classes, cfg.dropout)


def _small_cnn(cfg: ModelConfig, num_classes: int, input_shape: tuple[int, ...],
               stochastic_depth: float) -> SmallCNN:
    _no_stochastic_depth(cfg, stochastic_depth)
    c, h, w = _image_shape(cfg, input_shape)
    return SmallCNN(c, min(h, w), cfg.channels, num_classes, cfg.dropout)


def _resnet(block: str, layers: list[int], cfg: ModelConfig, num_classes: int,
            input_shape: tuple[int, ...], stochastic_depth: float) -> StagedModel:
    from training import resnet   # torchvision: 1.6 s of imports (torch._dynamo) that an MLP never needs

    c, _, _ = _image_shape(cfg, input_shape)
    return resnet.ResNet(getattr(resnet, block), layers, num_classes=num_classes, in_channels=c,
                         small_stem=cfg.small_stem, dropout=cfg.dropout, stochastic_depth=stochastic_depth)


MODELS: dict[str, ModelBuilder] = {
    "mlp": _mlp,
    "small_cnn": _small_cnn,
    "resnet18": functools.partial(_resnet, "BasicBlock", [2, 2, 2, 2]),
    "resnet50": functools.partial(_resnet, "Bottleneck", [3, 4, 6, 3]),
}


def build_model(cfg: ModelConfig, num_classes: int, input_shape: tuple[int, ...], *,
                stochastic_depth: float = 0.0) -> StagedModel:
    """A fresh model for ``num_classes`` and per-sample ``input_shape``, with ``cfg.init`` applied and
    ``cfg.pretrained`` (a local state_dict file) loaded. Transfer modes are not applied here.

    ``stochastic_depth``: drop probability of the last residual block (regularization.stochastic_depth).
    """
    if cfg.name not in MODELS:
        raise ConfigError("model.name", cfg.name, f"one of {sorted(MODELS)}")
    model = MODELS[cfg.name](cfg, num_classes, tuple(input_shape), stochastic_depth)
    if cfg.init == "zero":   # a known-bad init: the loss plateaus at log(num_classes)
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
    if cfg.pretrained:
        load_pretrained(model, cfg.pretrained)
    return model


# ---------------------------------------------------------------------------- pretrained weights

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")   # DistributedDataParallel, torch.compile


def _head_keys(model: StagedModel) -> set[str]:
    head = model.stages()[-1]
    ids = {id(t) for t in (*head.parameters(), *head.buffers())}
    return {k for k, t in model.state_dict(keep_vars=True).items() if id(t) in ids}


def load_pretrained(model: StagedModel, path: str) -> list[str]:
    """Copy into ``model`` every tensor of the file whose name and shape match; return their names.

    The file is ``torch.save(model.state_dict())`` or a checkpoint dict holding it under ``"model"``.
    Head tensors of another shape (a different number of classes) are skipped; other skipped or
    missing tensors are warned about. Raises ``ValueError`` naming ``path`` when the file is
    unreadable, is no state_dict, or matches nothing besides the head.
    """
    def not_a_state_dict(reason: str) -> ValueError:
        return ValueError(f"{path}: not a schedtune/torch state_dict: {reason}")

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, truncated, not a torch file, or pickled non-tensor objects
        first_line = (str(e).strip().splitlines() or ["no details"])[0]   # weights_only errors run long
        if isinstance(e, EOFError):
            first_line = "the file ends early (truncated?)"
        raise not_a_state_dict(f"{type(e).__name__}: {first_line}") from e
    state = obj["model"] if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping) else obj
    if not (isinstance(state, Mapping) and state
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
        raise not_a_state_dict("expected a mapping of tensor names to tensors, "
                               "or a dict holding one under 'model'")
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}

    own = model.state_dict()
    head = _head_keys(model)
    loaded = [k for k, v in state.items() if k in own and own[k].shape == v.shape]
    if not any(k not in head for k in loaded):
        raise ValueError(f"{path}: no tensor besides the head matches this {type(model).__name__} "
                         f"(file has e.g. {list(state)[:3]}, the model has e.g. {list(own)[:3]})")
    mismatched = [k for k in state if k in own and k not in loaded and k not in head]
    missing = [k for k in own if k not in state and k not in head]
    if mismatched or missing:
        warnings.warn(f"{path}: loaded {len(loaded)} tensors; kept the fresh init for {len(mismatched)} of "
                      f"another shape {mismatched[:5]} and {len(missing)} absent from the file {missing[:5]}",
                      stacklevel=2)
    model.load_state_dict({k: state[k] for k in loaded}, strict=False)
    return loaded


# ---------------------------------------------------------------------------- transfer learning

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
