"""Plug-in models (``timm:``, ``torchvision:``, ``package.module:callable``) as StagedModels.

The contracts are in training.plugins' docstring. Each module is wrapped unchanged in a
:class:`PluginModel`, whose stages are views onto the module's own blocks, found once at
construction: timm's ``feature_info`` blocks where it has them, else the top-level children (see
:func:`default_boundaries`); the head is ``get_classifier()`` or the last ``nn.Linear``.
timm and torchvision are imported only when such a model is built.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Optional

import torch
from torch import nn

import training.plugins as plugins
from training.config import ConfigError, ModelConfig
from training.models.base import StagedModel, image_shape

_UNEXPECTED = re.compile(r"unexpected keyword argument '(\w+)'")


class _StageView(nn.Module):
    """One stage as an unregistered view: whole modules, plus loose tensors of modules split across stages."""

    def __init__(self, modules: list[nn.Module], params: list[nn.Parameter], buffers: list[torch.Tensor]):
        super().__init__()
        self.parts = nn.ModuleList(modules)
        for i, p in enumerate(params):
            self.register_parameter(f"p{i}", p)
        for i, b in enumerate(buffers):
            self.register_buffer(f"b{i}", b)

    def forward(self, *args):   # a view of a stage, never called on its own
        raise RuntimeError("a stage view is not callable: call the model")


Plan = list[tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]]   # per stage: modules, params, buffers


class PluginModel(StagedModel):
    """A timm, torchvision or user ``nn.Module`` (``self.net``, run unchanged) with stages for transfer learning.

    ``boundaries``: module paths of ``net`` that end a stage, in order (timm's ``feature_info``);
    default :func:`default_boundaries`. Everything registered up to a boundary (and after the
    previous one) is that stage; what follows the last boundary joins the last backbone stage; the
    head (``get_classifier()``, else the last ``nn.Linear``) is the last stage. Stages without
    parameters merge into the next one. ``wrapped_prefix``: the state_dict keys' prefix, so that
    training.models.load_pretrained also reads the bare module's own state_dict.
    """

    wrapped_prefix = "net."

    def __init__(self, net: nn.Module, boundaries: Optional[list[str]] = None):
        super().__init__()
        self.net = net
        head = find_head(net)
        self._plan: Plan = stage_plan(net, default_boundaries(net, head) if boundaries is None else boundaries, head)

    def stages(self) -> list[nn.Module]:
        # Views are rebuilt from module paths on every call, so they follow module swaps
        # (SyncBatchNorm conversion) and copies (EMA's deepcopy) of the wrapped net.
        net = self.net
        return [_StageView([net.get_submodule(m) for m in mods], [net.get_parameter(p) for p in params],
                           [net.get_buffer(b) for b in buffers]) for mods, params, buffers in self._plan]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def find_head(net: nn.Module) -> str:
    """The path of ``net``'s classifier: ``get_classifier()`` (timm, and any module that defines it),
    else the last ``nn.Linear``, else the last module holding parameters."""
    paths = {id(m): n for n, m in net.named_modules()}
    get_classifier = getattr(net, "get_classifier", None)
    if callable(get_classifier):
        head = get_classifier()
        if isinstance(head, nn.Module) and id(head) in paths and any(True for _ in head.parameters()):
            return paths[id(head)]
    linears = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1]
    holders = [n for n, m in net.named_modules() if any(True for _ in m.parameters(recurse=False))]
    if not holders:
        raise ValueError(f"{type(net).__name__} has no parameters")
    return holders[-1]


def _n_params(net: nn.Module, path: str, head: str) -> int:
    return sum(p.numel() for n, p in net.get_submodule(path).named_parameters(prefix=path)
               if not _under(n.rpartition(".")[0], head))


def _under(path: str, ancestor: str) -> bool:
    return ancestor == "" or path == ancestor or path.startswith(ancestor + ".")


def _units(module: nn.Module, prefix: str) -> list[str]:
    """Boundaries among ``module``'s children: each child with children of its own ends a stage; a run of
    single layers (a stem's conv, norm, activation, pool) ends at its last one."""
    out, run = [], None
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if any(True for _ in child.children()):
            if run is not None:
                out.append(run)
                run = None
            out.append(path)
        else:
            run = path
    if run is not None:
        out.append(run)
    return out


def default_boundaries(net: nn.Module, head: str) -> list[str]:
    """Stage boundaries of a module without timm's ``feature_info``: its top-level children (a run of
    single layers merged), and while fewer than 3 of them hold parameters besides the head, the
    largest split one level further (a ``features`` Sequential into its blocks; at most 2 levels).

    torchvision's ResNets get stem, layer1..4 (as the registry's ResNets); MobileNets/EfficientNets
    their ``features`` blocks, then the classifier's hidden layer.
    """
    units = _units(net, "")
    for _ in range(2):
        sizes = {u: _n_params(net, u, head) for u in units}
        if sum(1 for n in sizes.values() if n) >= 3:
            break
        largest = max(units, key=lambda u: sizes[u])
        inner = _units(net.get_submodule(largest), largest)
        if len(inner) <= 1:
            break
        i = units.index(largest)
        units = units[:i] + inner + units[i + 1:]
    return units


def stage_plan(net: nn.Module, boundaries: list[str], head: str) -> Plan:
    """Partition ``net``'s modules (in registration order) into stages at ``boundaries`` plus the ``head``.

    Returns per stage the paths of the maximal modules wholly inside it, and the loose parameters and
    buffers of modules split across stages (e.g. a ViT's ``cls_token`` on the root module).
    """
    names = [n for n, _ in net.named_modules()]
    modules = dict(net.named_modules())
    pos = {n: i for i, n in enumerate(names)}
    parent = [-1] * len(names)
    end = list(range(len(names)))          # the last position of each module's subtree
    stack: list[int] = []
    for i, n in enumerate(names):
        while stack and not _under(n, names[stack[-1]]):
            stack.pop()
        parent[i] = stack[-1] if stack else -1
        for j in stack:
            end[j] = i
        stack.append(i)
    bounds = sorted(pos[b] for b in dict.fromkeys(boundaries) if b in pos and not _under(b, head))
    head_stage = len(bounds) if bounds else 1

    def stage_of(i: int) -> int:
        if _under(names[i], head):
            return head_stage
        for k, b in enumerate(bounds):
            if i <= end[b]:
                return k
        return max(len(bounds) - 1, 0)

    stage = [stage_of(i) for i in range(len(names))]
    # Stages without parameters merge into the next backbone stage (the last one into the previous).
    counts = [0] * (head_stage + 1)
    for i, n in enumerate(names):
        counts[stage[i]] += sum(1 for _ in modules[n].parameters(recurse=False))
    kept = [k for k in range(head_stage) if counts[k]] or [0]
    remap = {k: next((j for j in kept if j >= k), kept[-1]) for k in range(head_stage)}
    remap[head_stage] = head_stage
    order = {k: r for r, k in enumerate([*kept, head_stage])}
    stage = [order[remap[s]] for s in stage]

    uniform = [True] * len(names)
    for i in reversed(range(len(names))):
        if parent[i] >= 0 and (not uniform[i] or stage[i] != stage[parent[i]]):
            uniform[parent[i]] = False
    plan: Plan = []
    for s in range(len(order)):
        whole = tuple(n for i, n in enumerate(names)
                      if stage[i] == s and uniform[i] and (parent[i] < 0 or not uniform[parent[i]]))
        split = [i for i, n in enumerate(names) if stage[i] == s and not uniform[i]]
        prefix = lambda n: f"{n}." if n else ""   # noqa: E731
        params = tuple(prefix(names[i]) + k for i in split for k, _ in modules[names[i]].named_parameters(recurse=False))
        buffers = tuple(prefix(names[i]) + k for i in split for k, b in modules[names[i]].named_buffers(recurse=False)
                        if b is not None)
        plan.append((whole, params, buffers))
    return plan


# ---------------------------------------------------------------------------- builders

def _create(cfg: ModelConfig, builder: Callable, kwargs: dict[str, Any], owners: dict[str, str],
            optional: tuple[str, ...] = ()) -> nn.Module:
    """``builder(**kwargs)`` as an nn.Module. A keyword it does not take is dropped when ``optional``
    (the input size, which only transformers take), else a ConfigError on the key that set it
    (``owners``: kwarg -> config key; model.args keys are their own); anything else it raises, or a
    result that is no nn.Module, a PluginError naming model.name."""
    try:
        net = builder(**kwargs)
    except TypeError as e:
        m = _UNEXPECTED.search(str(e))
        if m and m.group(1) in kwargs:
            arg = m.group(1)
            if arg in optional:   # raised while binding the constructor's arguments: nothing was built yet
                return _create(cfg, builder, {k: v for k, v in kwargs.items() if k != arg}, owners, optional)
            key = owners.get(arg, f"model.args.{arg}")
            expected = (f"a keyword argument of {cfg.name}'s constructor ({e})" if key.startswith("model.args.")
                        else f"0 for {cfg.name}: its constructor takes no {arg!r} ({e})")
            raise ConfigError(key, kwargs[arg], expected) from e
        raise plugins.PluginError("model.name", cfg.name, e) from e
    except (ConfigError, plugins.PluginError):
        raise
    except Exception as e:
        raise plugins.PluginError("model.name", cfg.name, e) from e
    if not isinstance(net, nn.Module):
        raise plugins.PluginError("model.name", cfg.name, f"returned {type(net).__name__} {net!r:.80}, "
                                  "expected a torch.nn.Module")
    return net


def build_timm(cfg: ModelConfig, arch: str, num_classes: int, input_shape: tuple[int, ...],
               stochastic_depth: float) -> PluginModel:
    """``timm.create_model`` for the data; stages from timm's ``feature_info``."""
    plugins.check_timm_architecture(cfg.name, arch)
    import timm
    from timm.models import get_pretrained_cfg

    c, h, w = image_shape(cfg, input_shape)
    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": c, **cfg.args}
    if cfg.dropout > 0:
        kwargs["drop_rate"] = cfg.dropout
    if stochastic_depth > 0:
        kwargs["drop_path_rate"] = stochastic_depth
    owners = {"drop_rate": "model.dropout", "drop_path_rate": "regularization.stochastic_depth"}
    default = getattr(get_pretrained_cfg(arch.split(".", 1)[0]), "input_size", None)
    if default is not None and tuple(default[1:]) != (h, w):
        kwargs["img_size"] = (h, w)   # transformers size their position embeddings by it; CNNs do not take it
    build = lambda **kw: timm.create_model(arch, pretrained=False, **kw)   # noqa: E731
    net = _create(cfg, build, kwargs, owners, optional=("img_size",))
    info = getattr(net, "feature_info", None)
    boundaries = [f.get("module") for f in info] if isinstance(info, list) and info else None
    modules = dict(net.named_modules())
    if boundaries and not all(b in modules for b in boundaries):   # not module paths: the generic rule
        boundaries = None
    return PluginModel(net, boundaries)


def build_torchvision(cfg: ModelConfig, arch: str, num_classes: int, input_shape: tuple[int, ...],
                      stochastic_depth: float) -> PluginModel:
    """torchvision's builder (no weights) for the data; the first Conv2d rebuilt for non-RGB inputs;
    ``image_size`` for square inputs where the builder takes it (ViTs) and model.args does not set it."""
    builder = plugins.torchvision_builder(cfg.name, arch)
    c, h, w = image_shape(cfg, input_shape)
    kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes, **cfg.args}
    if cfg.dropout > 0:
        kwargs["dropout"] = cfg.dropout
    if stochastic_depth > 0:
        kwargs["stochastic_depth_prob"] = stochastic_depth
    optional = ()
    if h == w and "image_size" not in kwargs:   # torchvision's ViTs size their position embeddings by it
        kwargs["image_size"], optional = h, ("image_size",)
    net = _create(cfg, builder, kwargs, {"dropout": "model.dropout",
                                         "stochastic_depth_prob": "regularization.stochastic_depth"}, optional)
    if c != 3:
        _rebuild_first_conv(net, c, cfg.name)
    return PluginModel(net)


def _rebuild_first_conv(net: nn.Module, channels: int, name: str) -> None:
    path, conv = next(((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)), ("", None))
    if conv is None or conv.in_channels != 3 or conv.groups != 1:
        raise ConfigError("model.name", name, f"a torchvision model whose first layer is a Conv2d over 3 channels, "
                          f"to rebuild for the data's {channels}-channel inputs (or data with 3 channels)")
    new = nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode)
    net.set_submodule(path, new)   # freshly initialized: nothing to carry over from RGB filters


def build_callable(cfg: ModelConfig, num_classes: int, input_shape: tuple[int, ...],
                   stochastic_depth: float) -> StagedModel:
    """The user's factory (training.plugins); a StagedModel it returns is used as is."""
    factory = plugins.resolve_callable("model.name", cfg.name)
    plugins.check_no_stochastic_depth(cfg.name, stochastic_depth)
    provided = {"num_classes": num_classes, "input_shape": tuple(input_shape)}
    net = _create(cfg, factory, plugins.factory_kwargs("model", cfg.name, factory, cfg.args, provided), {})
    if isinstance(net, StagedModel):
        return net
    try:
        return PluginModel(net)
    except ValueError as e:   # no parameters at all
        raise plugins.PluginError("model.name", cfg.name, e) from e


def check_logits(cfg: ModelConfig, model: nn.Module, num_classes: int, input_shape: tuple[int, ...]) -> None:
    """One forward pass on 2 zero samples: (2, num_classes) logits, or a PluginError saying what came out."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape))
    except Exception as e:
        raise plugins.PluginError("model.name", cfg.name, e) from e
    finally:
        model.train(was)
    if not (isinstance(out, torch.Tensor) and tuple(out.shape) == (2, num_classes)):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise plugins.PluginError("model.name", cfg.name, f"maps a batch of shape {(2, *input_shape)} to {got}, "
                                  f"expected logits of shape {(2, num_classes)}")

