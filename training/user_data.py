"""The user's dataset factory (``data.name: package.module:callable``): what it may return, and how
that becomes a ``DataBundle`` the loop can use (contracts in training.plugins)."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import Subset, TensorDataset

import training.plugins as plugins
from training.bundle import DataBundle
from training.config import DataConfig

_PARTS = ("train", "val", "classes", "input_shape", "mean", "std")


def factory_dataset(cfg: DataConfig) -> DataBundle:
    """``package.module:callable`` called per the contract in training.plugins, its result as a DataBundle."""
    factory = plugins.resolve_callable("data.name", cfg.name)
    kwargs = plugins.factory_kwargs("data", cfg.name, factory, cfg.args, plugins.data_provided(cfg))
    bundle = as_bundle(cfg.name, plugins.call_plugin("data.name", cfg.name, factory, kwargs))
    if cfg.num_samples is not None and "num_samples" not in kwargs:   # the factory did not cap it itself
        keep = np.random.default_rng(cfg.seed).permutation(len(bundle.train))[:cfg.num_samples]
        bundle = dataclasses.replace(bundle, train=Subset(bundle.train, keep.tolist()))
    return bundle


def as_bundle(name: str, obj: Any) -> DataBundle:
    """What the dataset factory ``name`` returned (a DataBundle, a (train, val) pair, or a dict of
    training.plugins' contract) as a checked DataBundle; a PluginError naming it says what is wrong."""
    def fail(why: str) -> plugins.PluginError:
        return plugins.PluginError("data.name", name, why)

    if isinstance(obj, DataBundle):
        bundle = obj
    else:
        if isinstance(obj, Mapping) and {"train", "val"} <= set(obj) and set(obj) <= set(_PARTS):
            parts = dict(obj)
        elif isinstance(obj, (tuple, list)) and len(obj) == 2:
            parts = {"train": obj[0], "val": obj[1]}
        else:
            got = f"a dict with keys {sorted(obj)}" if isinstance(obj, Mapping) else f"{type(obj).__name__} {obj!r:.80}"
            raise fail(f"returned {got}, expected a training.data.DataBundle, a (train, val) pair of datasets, "
                       f"or a dict with train, val and optionally {', '.join(_PARTS[2:])}")
        bundle = _bundle_from_parts(parts, fail)
    for split in ("train", "val"):
        ds = getattr(bundle, split)
        if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")) or len(ds) == 0:
            raise fail(f"returned a {split} split {type(ds).__name__} {ds!r:.60}, expected a non-empty torch Dataset")
    if bundle.num_classes < 2 or len(bundle.class_names) != bundle.num_classes:
        raise fail(f"has {bundle.num_classes} classes named {bundle.class_names[:5]}, expected 2 or more, one name each")
    for split in ("train", "val"):
        _check_sample(getattr(bundle, split), split, bundle, fail)
    return bundle


def _bundle_from_parts(parts: dict, fail: Callable[[str], Exception]) -> DataBundle:
    train, val = parts["train"], parts["val"]
    first = train[0] if hasattr(train, "__getitem__") and hasattr(train, "__len__") and len(train) else None
    if not (isinstance(first, (tuple, list)) and len(first) == 2 and isinstance(first[0], torch.Tensor)):
        raise fail(f"returned a train split whose first sample is {type(first).__name__}, expected (x, y) "
                   "with x a float32 tensor")
    classes = parts.get("classes")
    if classes is None:
        classes = _classes_of(train)
    if classes is None:
        labels = [_labels_of(ds) for ds in (train, val)]
        if any(lab is None for lab in labels):
            raise fail("returned datasets whose classes cannot be told without reading every sample (no "
                       ".classes, .targets or TensorDataset labels): return a dict with train, val and classes")
        classes = int(max(int(lab.max()) for lab in labels)) + 1
    names = [str(c) for c in range(classes)] if isinstance(classes, int) else [str(c) for c in classes]
    input_shape = tuple(parts.get("input_shape") or first[0].shape)

    def stat(key: str) -> Optional[torch.Tensor]:
        v = parts.get(key)
        if v is None:
            return None
        t = torch.as_tensor(v, dtype=torch.float32)
        return t.view(-1, 1, 1) if len(input_shape) == 3 and t.dim() == 1 else t

    return DataBundle(train, val, num_classes=len(names), input_shape=input_shape, class_names=names,
                      is_image=len(input_shape) == 3, mean=stat("mean"), std=stat("std"))


def _classes_of(ds) -> Optional[list]:
    while ds is not None:   # a Subset's classes are its dataset's
        if getattr(ds, "classes", None) is not None:
            return list(ds.classes)
        ds = getattr(ds, "dataset", None) if isinstance(ds, Subset) else None
    return None


def _labels_of(ds) -> Optional[torch.Tensor]:
    if isinstance(ds, TensorDataset) and len(ds.tensors) == 2:
        return ds.tensors[1]
    targets = getattr(ds, "targets", None)
    return None if targets is None else torch.as_tensor(np.asarray(targets))


def _check_sample(ds, split: str, bundle: DataBundle, fail: Callable[[str], Exception]) -> None:
    """The first sample of ``ds`` is (float32 x of the input shape, an integer class)."""
    sample = ds[0]
    ok = isinstance(sample, (tuple, list)) and len(sample) == 2
    x, y = sample if ok else (None, None)
    if not (ok and isinstance(x, torch.Tensor) and x.dtype == torch.float32 and tuple(x.shape) == bundle.input_shape):
        got = (f"x of {x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else
               f"{type(sample).__name__}" if not ok else f"x of type {type(x).__name__}")
        raise fail(f"{split}[0] is {got}, expected (x, y) with x a float32 tensor of shape {bundle.input_shape}")
    label = y.item() if isinstance(y, torch.Tensor) and y.dim() == 0 and not y.is_floating_point() else y
    if not (isinstance(label, (int, np.integer)) and not isinstance(label, bool) and 0 <= label < bundle.num_classes):
        raise fail(f"{split}[0] has label {y!r:.40}, expected an integer class in [0, {bundle.num_classes})")
