"""The model registry (MODELS) and build_model, the one entry point for registry keys and plug-ins.

Order of use (training.loop): ``build_model`` (constructs, applies ``cfg.init``, loads
``cfg.pretrained``) -> ``apply_transfer`` (freezes stages, returns backbone/head parameters).
"""
from __future__ import annotations

from typing import Callable

import torch

from training.config import MODEL_NAMES, MODEL_PLUGINS, ConfigError, ModelConfig, plugin_form
from training.models.base import StagedModel
from training.models.external import build_callable, build_timm, build_torchvision, check_logits
from training.models.pretrained import load_pretrained
from training.models.small import build_mlp, build_small_cnn

# (model config, num_classes, per-sample input_shape, regularization.stochastic_depth) -> a fresh model
ModelBuilder = Callable[[ModelConfig, int, tuple[int, ...], float], StagedModel]


def _resnet(cfg: ModelConfig, num_classes: int, input_shape: tuple[int, ...], stochastic_depth: float) -> StagedModel:
    # torchvision: 1.6 s of imports (torch._dynamo) that an MLP never needs, in every trial and Train worker
    from training.models.resnet import build

    return build(cfg, num_classes, input_shape, stochastic_depth)


MODELS: dict[str, ModelBuilder] = {   # keys: training.config.MODEL_NAMES (a contract test keeps them equal)
    "mlp": build_mlp,
    "small_cnn": build_small_cnn,
    "resnet18": _resnet,
    "resnet50": _resnet,
}


def _plugin(cfg: ModelConfig, num_classes: int, input_shape: tuple[int, ...], stochastic_depth: float) -> StagedModel:
    kind, target = plugin_form(cfg.name)   # type: ignore[misc]
    if kind == "timm":
        return build_timm(cfg, target, num_classes, input_shape, stochastic_depth)
    if kind == "torchvision":
        return build_torchvision(cfg, target, num_classes, input_shape, stochastic_depth)
    model = build_callable(cfg, num_classes, input_shape, stochastic_depth)
    check_logits(cfg, model, num_classes, input_shape)   # a factory's module maps the data to logits
    return model


def build_model(cfg: ModelConfig, num_classes: int, input_shape: tuple[int, ...], *,
                stochastic_depth: float = 0.0) -> StagedModel:
    """A fresh model for ``num_classes`` and per-sample ``input_shape``, with ``cfg.init`` applied and
    ``cfg.pretrained`` (a local state_dict file) loaded. Transfer modes are not applied here.

    ``cfg.name``: a MODELS key or a plug-in (``timm:``, ``torchvision:``, ``package.module:callable``;
    contracts in training.plugins). ``stochastic_depth``: drop probability of the last residual
    block (regularization.stochastic_depth). A plug-in that raises or returns the wrong thing:
    training.plugins.PluginError naming it.
    """
    form = plugin_form(cfg.name)
    if cfg.name in MODELS:
        builder = MODELS[cfg.name]
    elif form is not None and form[0] in MODEL_PLUGINS:
        builder = _plugin
    else:
        raise ConfigError("model.name", cfg.name, f"one of {list(MODEL_NAMES)}, or a plug-in (timm:<architecture>, "
                          "torchvision:<architecture>, package.module:callable)")
    model = builder(cfg, num_classes, tuple(input_shape), stochastic_depth)
    if cfg.init == "zero":   # a known-bad init: the loss plateaus at log(num_classes)
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
    if cfg.pretrained:
        load_pretrained(model, cfg.pretrained)
    return model
