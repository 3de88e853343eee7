"""Plug-ins: the user's models and datasets named in a config, and their resolution before anything starts.

``model.name`` (training.models builds them):

- ``timm:<architecture>``: ``timm.create_model(arch, num_classes=<data>, in_chans=<data channels>,
  drop_rate=model.dropout, drop_path_rate=regularization.stochastic_depth, **model.args)`` (the two
  rates only when > 0; ``img_size=(H, W)`` too when the data's size is not the architecture's
  default and the architecture takes it, e.g. ViTs). Stages: timm's ``feature_info`` blocks, head
  ``get_classifier()``.
- ``torchvision:<architecture>``: ``torchvision.models.get_model(arch, weights=None,
  num_classes=<data>, **model.args)`` (plus ``dropout=model.dropout`` and
  ``stochastic_depth_prob=regularization.stochastic_depth`` when > 0, for the builders that take
  them; ``image_size=H`` for square inputs where the builder takes it, e.g. ViTs). Inputs of other
  than 3 channels: the first Conv2d is rebuilt for them (freshly initialized). Any of torchvision's classification models (``list_models(module=torchvision.models)``).
- ``package.module:callable``: the user's factory, called as ``factory(**model.args,
  [num_classes=<int>], [input_shape=<tuple, one sample, e.g. (3, 32, 32)>])``, the bracketed ones
  only when its signature names them. It returns an ``nn.Module`` mapping a float32 batch
  ``(N, *input_shape)`` to ``(N, num_classes)`` logits. A ``training.models.StagedModel`` is used
  as is; any other module gets stages from its top-level children and its head from
  ``get_classifier()`` or its last ``nn.Linear``. ``model.dropout`` and
  ``regularization.stochastic_depth`` must stay 0: give the factory its own arguments instead
  (``model.args.<key>``, each searchable like any config field).

Every plug-in model is wrapped as a ``training.models.PluginModel`` (state_dict keys under
``net.``); ``model.pretrained`` loads either that model's checkpoint or the bare module's own
state_dict; ``model.transfer`` (linear_probe, finetune_last_n, backbone_lr_mult) works on its stages.

``data.name`` (training.data loads them):

- ``torchvision:<Dataset>``: a torchvision dataset that keeps its images in memory as uint8
  (``.data`` and ``.targets``/``.labels``: MNIST, FashionMNIST, KMNIST, EMNIST, QMNIST, CIFAR10,
  CIFAR100, SVHN, STL10, USPS, ...), read from ``data.root``; its train split trains, its test
  split validates; ``**data.args`` go to the dataset class (e.g. EMNIST's ``split``). Nothing is
  downloaded unless ``data.download: true``. Standardized per channel with the train split's statistics.
- ``package.module:callable``: ``factory(**data.args, [root=], [download=], [val_fraction=],
  [seed=], [num_samples=], [image_size=])``, each bracketed data.* field only when the signature
  names it. It returns one of
    * a ``training.data.DataBundle``;
    * a ``(train, val)`` pair of torch Datasets; the classes are read from ``train.classes`` (names)
      or from the labels (``TensorDataset`` tensors, or ``.targets``), the input shape from the first
      sample; no normalization is recorded;
    * a dict ``{"train", "val"[, "classes"][, "input_shape"][, "mean", "std"]}``: ``classes`` a list
      of names or their number, ``mean``/``std`` the per-channel (images) or per-feature
      standardization the samples went through (lets an exported model take raw inputs).
  Samples are ``(x, y)``: ``x`` a float32 tensor of the input shape, ``y`` an int (or an int64
  scalar tensor) in ``[0, num_classes)``; the datasets must be picklable for loader workers.
  Without a ``num_samples`` parameter, ``data.num_samples`` caps the training set to a seeded random subset.

Before anything starts, ``check_resolvable(cfg)`` resolves every plug-in name of a TrainConfig
without building a model or loading data, and raises ``ConfigError`` naming the key
(``model.name``, ``data.name``, ``model.args.<key>``, ``data.args.<key>``, ``data.root``,
``regularization.stochastic_depth``) with the closest valid names for typos. Inside a trial, a
plug-in that raises or returns the wrong thing raises ``PluginError``, whose message names the
plug-in and carries its own error (``model.name 'mypkg.models:make': ValueError: width must be even``).

Importing this module imports no torch: timm, torchvision and the user's module are imported only
when a name needs them, and resolutions are cached per process.
"""
from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import pkgutil
from typing import Any, Callable, Optional

from training.config import RESERVED_ARGS, ConfigError, DataConfig, ModelConfig, TrainConfig, plugin_form


class PluginError(RuntimeError):
    """A plug-in failed inside a trial: names the config key and the plug-in, and carries its own error."""

    def __init__(self, key: str, name: str, error: "BaseException | str"):
        self.key, self.name = key, name
        self.detail = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        super().__init__(f"{key} {name!r}: {self.detail}")

    def __reduce__(self):   # picklable across processes (Ray workers), message intact
        return PluginError, (self.key, self.name, self.detail)


def _hint(word: str, candidates, n: int = 3, fmt: Callable[[str], str] = str) -> str:
    near = difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.6)
    return f" (did you mean {', '.join(repr(fmt(m)) for m in near)}?)" if near else ""


# ---------------------------------------------------------------------------- resolution (cached)

@functools.lru_cache(maxsize=None)
def _timm_names() -> frozenset[str]:
    import timm

    return frozenset(timm.list_models())


def check_timm_architecture(name: str, arch: str) -> None:
    """``arch`` (optionally with a ``.tag``) is one of ``timm.list_models()``."""
    base = arch.split(".", 1)[0]
    names = _timm_names()
    if base not in names:
        raise ConfigError("model.name", name, "a timm architecture (one of timm.list_models())"
                          + _hint(base, names, fmt=lambda m: f"timm:{m}"))


@functools.lru_cache(maxsize=None)
def _torchvision_models() -> frozenset[str]:
    import torchvision.models

    return frozenset(torchvision.models.list_models(module=torchvision.models))   # classification only


def torchvision_builder(name: str, arch: str) -> Callable:
    """torchvision's builder function for the classification model ``arch``."""
    names = _torchvision_models()
    if arch not in names:
        raise ConfigError("model.name", name, "a torchvision classification model (one of "
                          "torchvision.models.list_models(module=torchvision.models))"
                          + _hint(arch, names, fmt=lambda m: f"torchvision:{m}"))
    import torchvision.models

    return torchvision.models.get_model_builder(arch)


def torchvision_dataset(name: str, dataset: str) -> tuple[type, bool]:
    """``(the torchvision.datasets class, whether it takes train=)``; without ``train=`` it takes
    ``split='train' / 'test'``."""
    import torchvision.datasets as tvd
    from torchvision.datasets import MNIST, VisionDataset

    classes = sorted(n for n in tvd.__all__ if isinstance(getattr(tvd, n, None), type)
                     and issubclass(getattr(tvd, n), VisionDataset))
    if dataset not in classes:
        raise ConfigError("data.name", name, "a torchvision dataset class (torchvision.datasets)"
                          + _hint(dataset, classes, fmt=lambda m: f"torchvision:{m}"))
    cls = getattr(tvd, dataset)
    params = inspect.signature(cls).parameters
    takes_train = "train" in params or issubclass(cls, MNIST)   # EMNIST/QMNIST pass train= through **kwargs
    if not takes_train and "split" not in params:
        raise ConfigError("data.name", name, "a torchvision dataset with a train and a test split (train= or "
                          "split=), e.g. torchvision:MNIST, torchvision:CIFAR10, torchvision:SVHN")
    return cls, takes_train


@functools.lru_cache(maxsize=None)
def _resolve(key: str, name: str, target: str) -> Callable:
    module_path, _, attr_path = target.partition(":")
    obj: Any = _import(key, name, module_path, attr_path)
    attrs = attr_path.split(".")
    for i, attr in enumerate(attrs):
        if not hasattr(obj, attr):
            where = ".".join([module_path, *attrs[:i]])
            public = [a for a in dir(obj) if not a.startswith("_")]
            raise ConfigError(key, name, f"an attribute of {where}: it has no {attr!r}" + _hint(
                attr, public, fmt=lambda m: f"{module_path}:{'.'.join([*attrs[:i], m])}"))
        obj = getattr(obj, attr)
    if not callable(obj):
        raise ConfigError(key, name, f"a callable (a function or class): {module_path}.{attr_path} is a "
                          f"{type(obj).__name__} ({obj!r:.60})")
    return obj


def resolve_callable(key: str, name: str) -> Callable:
    """The callable ``package.module:attr`` names (``name`` the config value, ``key`` its dotted key).

    ConfigError when the module does not import (with the closest module names) or the attribute
    is missing (closest names in ``dir(module)``) or not callable. Cached per process.
    """
    form = plugin_form(name)
    assert form is not None and form[0] == "callable", name   # the config validated the syntax
    return _resolve(key, name, form[1])


def _import(key: str, name: str, module_path: str, attr_path: str):
    try:
        return importlib.import_module(module_path)
    except ModuleNotFoundError as e:
        missing = e.name or module_path
        if not (module_path == missing or module_path.startswith(missing + ".")):   # one of its imports is missing
            raise ConfigError(key, name, f"a module that imports: importing {module_path} raised "
                              f"ModuleNotFoundError: {e}") from None
        parent, _, leaf = missing.rpartition(".")
        try:
            found = [m.name for m in pkgutil.iter_modules(importlib.import_module(parent).__path__ if parent else None)]
        except Exception:   # the parent is a module, not a package: nothing to list
            found = []
        rest = module_path[len(missing):]   # the submodules below the missing one
        raise ConfigError(key, name, f"an importable module: there is no module {missing!r} on the path "
                          "(on a cluster: ship it with --working-dir or --py-modules)" + _hint(
                              leaf, found, fmt=lambda m: f"{parent + '.' if parent else ''}{m}{rest}:{attr_path}")) from None
    except Exception as e:   # the user's module raises on import: a SyntaxError, a failing import inside it
        raise ConfigError(key, name, f"a module that imports: importing {module_path} raised "
                          f"{type(e).__name__}: {e}") from None


def _parameters(factory: Callable) -> tuple[Optional[frozenset[str]], frozenset[str]]:
    """(keyword parameter names, or None when it takes **kwargs or has no readable signature; required ones)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):   # some builtins and C extensions
        return None, frozenset()
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = frozenset(p.name for p in params if p.kind in keyword)
    required = frozenset(p.name for p in params if p.kind in keyword and p.default is inspect.Parameter.empty)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None, required
    return names, required


def factory_kwargs(section: str, name: str, factory: Callable, args: dict[str, Any],
                   provided: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments ``factory`` gets: ``args`` (``<section>.args``) plus those of ``provided``
    (what the data and config say) that its signature names. ConfigError on ``<section>.args.<key>``
    for a key it does not take (unless it takes ``**kwargs``) or a required parameter nobody gives."""
    names, required = _parameters(factory)
    _check_arg_names(section, name, args, names, set(provided))
    kwargs = dict(args)
    kwargs.update({k: v for k, v in provided.items() if names is not None and k in names})
    for p in sorted(required - set(kwargs)):
        raise ConfigError(f"{section}.args.{p}", None, f"a value: {name} requires the argument {p!r}")
    return kwargs


def _check_arg_names(section: str, name: str, args: dict[str, Any], names: Optional[frozenset[str]],
                     own: set[str]) -> None:
    """Every key of ``args`` is one of ``names`` (None: the callable takes **kwargs); ``own`` are schedtune's."""
    if names is None:
        return
    takes = sorted(names - own)
    for k, v in args.items():
        if k not in names:
            raise ConfigError(f"{section}.args.{k}", v, f"a keyword argument of {name} (it takes "
                              f"{', '.join(takes) or 'no other arguments'})" + _hint(k, takes))


def call_plugin(key: str, name: str, factory: Callable, kwargs: dict[str, Any]) -> Any:
    """``factory(**kwargs)``; anything it raises becomes a PluginError naming ``key`` and ``name``."""
    try:
        return factory(**kwargs)
    except Exception as e:
        raise PluginError(key, name, e) from e


# ---------------------------------------------------------------------------- the check before anything starts

MODEL_PROVIDED = ("num_classes", "input_shape")   # what a model factory may take from the data


def data_provided(cfg: DataConfig) -> dict[str, Any]:
    """The data.* fields a dataset factory may take by name (training.config.RESERVED_ARGS)."""
    return {k: getattr(cfg, k) for k in RESERVED_ARGS[("data", "callable")]}


def check_resolvable(cfg: TrainConfig) -> None:
    """Resolve every plug-in name of ``cfg`` without building a model or loading data.

    Raises ``ConfigError`` naming the key: a timm/torchvision architecture or dataset that does not
    exist, a module that does not import, an attribute that is missing or not callable, a
    ``model.args.<key>`` / ``data.args.<key>`` the factory does not take (by signature, unless it
    takes ``**kwargs``) or a required one missing, ``regularization.stochastic_depth`` for a
    ``package.module:callable`` model, ``data.root`` unset for a torchvision dataset. Registry names
    were already checked by ``TrainConfig.from_dict``. Resolutions are cached: cheap for many configs.
    """
    _check_model(cfg.model, cfg.regularization.stochastic_depth)
    _check_data(cfg.data)


def _check_model(m: ModelConfig, stochastic_depth: float) -> None:
    form = plugin_form(m.name)
    if form is None:
        return
    kind, target = form
    if kind == "timm":
        check_timm_architecture(m.name, target)   # model.args go to the architecture's class via **kwargs
    elif kind == "torchvision":
        torchvision_builder(m.name, target)
    else:
        factory = resolve_callable("model.name", m.name)
        check_no_stochastic_depth(m.name, stochastic_depth)
        factory_kwargs("model", m.name, factory, m.args, dict.fromkeys(MODEL_PROVIDED))


def check_no_stochastic_depth(name: str, stochastic_depth: float) -> None:
    if stochastic_depth > 0:
        raise ConfigError("regularization.stochastic_depth", stochastic_depth,
                          f"0 for {name} (schedtune cannot place it in your model: give your factory its "
                          "own argument under model.args, searchable as model.args.<key>)")


def _check_data(d: DataConfig) -> None:
    form = plugin_form(d.name)
    if form is None:
        return
    kind, target = form
    if kind == "torchvision":
        cls, takes_train = torchvision_dataset(d.name, target)
        if d.root is None:
            raise ConfigError("data.root", None, f"a local directory for {d.name} (set data.download: true "
                              "to fetch it there)")
        torchvision_dataset_kwargs(d, cls, takes_train)
    else:
        factory_kwargs("data", d.name, resolve_callable("data.name", d.name), d.args, data_provided(d))


def torchvision_dataset_kwargs(d: DataConfig, cls: type, takes_train: bool) -> dict[str, Any]:
    """``data.args`` checked against the dataset class (``split`` is schedtune's where it picks train/test)."""
    if not takes_train and "split" in d.args:
        raise ConfigError("data.args.split", d.args["split"], f"not set: schedtune reads {d.name}'s "
                          "split='train' to train and split='test' to validate")
    names, _ = _parameters(cls)
    _check_arg_names("data", d.name, d.args, names, set(RESERVED_ARGS[("data", "torchvision")]))
    return dict(d.args)
