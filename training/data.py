"""Dataset registry: each entry turns a ``DataConfig`` into a ``DataBundle`` of train/val datasets.

Contract of every entry (tests/training/test_data.py checks it over all of ``DATASETS``): items are
``(x, y)`` with ``x`` a float32 tensor of ``input_shape`` and ``y`` an int64 scalar tensor in
``[0, num_classes)``; ``x`` is already standardized per channel (images, dim 0 of a sample) or per
feature (vectors) with statistics of the train split only. The one exception is ``imagefolder``,
which uses the fixed ImageNet mean/std so that ImageNet-pretrained backbones see the input
distribution they were trained on.

``cfg.seed`` seeds the train/val split only; generated datasets (mnist1d, synthetic) are drawn
with a fixed seed, so changing the split seed never changes the underlying data.
Nothing is downloaded except CIFAR-10 and ``torchvision:<Dataset>`` when ``cfg.download`` is true.
Plug-ins (``torchvision:<Dataset>``, ``package.module:callable``; contracts in training.plugins)
are loaded by ``load_data`` like the registry's entries.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import random
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import Subset, TensorDataset

import training.plugins as plugins
from training.bundle import DataBundle, Uint8Images  # noqa: F401  (the registry's face: imported from here)
from training.config import DATA_PLUGINS, ConfigError, DataConfig, plugin_form
from training.user_data import as_bundle, factory_dataset  # noqa: F401  (as_bundle: part of the face)

IMAGENET_MEAN = (0.485, 0.456, 0.406)   # on the [0, 1] pixel scale
IMAGENET_STD = (0.229, 0.224, 0.225)
MNIST1D_SEED = 42                      # the seed of the published MNIST-1D dataset
SYNTHETIC_SEED = 1234


# ---------------------------------------------------------------------------- shared helpers

def split_indices(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train_idx, val_idx) over ``range(len(labels))``, stratified by class where possible.

    Both are in a seeded random order, so ``train_idx[:n]`` is a random class-mixed subset.
    Falls back to a plain seeded permutation split when stratification is impossible
    (a class with a single sample, or fewer validation slots than classes).
    """
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    try:
        train, val = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=labels)
    except ValueError:
        train, val = train_test_split(idx, test_size=val_fraction, random_state=seed)
    return np.asarray(train), np.asarray(val)


def channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of ``x`` (N, C, ...) over every dim but dim 1, shaped to broadcast onto one sample.

    Per channel for images ((C, 1, 1)), per feature for vectors ((F,)). Accumulated in float64 in
    chunks of ``chunk`` samples so uint8 data is never converted whole. A constant channel gets
    std 1 (it stays constant instead of becoming NaN).
    """
    dims = [0] + list(range(2, x.dim()))
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for part in x.split(chunk):
        part = part.to(torch.float64)
        total += part.sum(dims)
        total_sq += (part * part).sum(dims)
    count = x.numel() // x.shape[1]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
    std = torch.where(std > 1e-6 * (1 + mean.abs()), std, torch.ones_like(std))
    shape = (x.shape[1],) + (1,) * (x.dim() - 2)
    return mean.view(shape), std.view(shape)


def _tensor_bundle(x: np.ndarray, y: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray, *,
                   cap: Optional[int], class_names: list[str], is_image: bool) -> DataBundle:
    """In-memory float32 TensorDatasets standardized with the (uncapped) train split's statistics.

    ``cap`` keeps the first ``cap`` training indices (used to overfit a small subset); the
    statistics stay those of the whole train split, as in the full run.
    """
    xt = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    yt = torch.as_tensor(np.asarray(y), dtype=torch.int64)
    mean, std = channel_stats(xt[torch.as_tensor(train_idx)])
    if cap is not None:
        train_idx = train_idx[:cap]

    def part(idx: np.ndarray) -> TensorDataset:
        idx = torch.as_tensor(idx)
        return TensorDataset(((xt[idx] - mean) / std).float(), yt[idx])

    return DataBundle(part(train_idx), part(val_idx), num_classes=len(class_names),
                      input_shape=tuple(xt.shape[1:]), class_names=class_names, is_image=is_image,
                      mean=mean.float(), std=std.float())


@contextlib.contextmanager
def _global_rng_preserved():
    """mnist1d seeds the global ``random`` / ``numpy.random`` state; give the caller theirs back."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _int64_label(y: int) -> torch.Tensor:
    return torch.tensor(y, dtype=torch.int64)


# ---------------------------------------------------------------------------- registry entries

def _digits(cfg: DataConfig) -> DataBundle:
    """scikit-learn's 8x8 digits (1797 samples, shipped with sklearn: offline), as (1, 8, 8) images."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images[:, None]                    # (N, 1, 8, 8), intensities 0..16
    train, val = split_indices(d.target, cfg.val_fraction, cfg.seed)
    return _tensor_bundle(x, d.target, train, val, cap=cfg.num_samples,
                          class_names=[str(c) for c in d.target_names], is_image=True)


def _mnist1d(cfg: DataConfig) -> DataBundle:
    """MNIST-1D (Greydanus 2020) generated in-process: (40,) signals, 10 classes.

    ``num_samples`` is the total size (default 4000; mnist1d makes ``num_samples // 10`` per class),
    generated with the published seed; ``mnist1d.get_dataset`` is never called (it downloads).
    """
    from mnist1d.data import get_dataset_args, make_dataset

    n = 4000 if cfg.num_samples is None else cfg.num_samples
    if n < 10:
        raise ConfigError("data.num_samples", n, ">= 10 for mnist1d (it makes num_samples // 10 per class)")
    args = get_dataset_args()
    args.num_samples, args.seed = n, MNIST1D_SEED
    with _global_rng_preserved():
        d = make_dataset(args)
    x = np.concatenate([d["x"], d["x_test"]])     # re-split below with cfg.seed and cfg.val_fraction
    y = np.concatenate([d["y"], d["y_test"]])
    train, val = split_indices(y, cfg.val_fraction, cfg.seed)
    return _tensor_bundle(x, y, train, val, cap=None, class_names=[str(c) for c in range(10)], is_image=False)


def _synthetic(cfg: DataConfig, num_classes: int = 10, dim: int = 64, separation: float = 0.35) -> DataBundle:
    """A Gaussian mixture for benchmarks: class means ~ N(0, separation^2 I), unit-variance noise.

    With the defaults logistic regression reaches about 84% validation accuracy: learnable, not trivial.
    ``num_samples`` is the total size (default 4096), classes balanced.
    """
    n = 4096 if cfg.num_samples is None else cfg.num_samples
    rng = np.random.default_rng(SYNTHETIC_SEED)
    means = rng.normal(0.0, separation, size=(num_classes, dim))
    y = rng.permutation(np.arange(n) % num_classes)
    x = means[y] + rng.normal(0.0, 1.0, size=(n, dim))
    train, val = split_indices(y, cfg.val_fraction, cfg.seed)
    return _tensor_bundle(x, y, train, val, cap=None, class_names=[str(c) for c in range(num_classes)],
                          is_image=False)


def _cifar10(cfg: DataConfig) -> DataBundle:
    """CIFAR-10 from ``cfg.root`` (torchvision's python-pickle layout); the official test split is val.
    The same loader as ``torchvision:CIFAR10`` (see _torchvision_images)."""
    return _torchvision_images(cfg, "CIFAR10")


def _torchvision_images(cfg: DataConfig, dataset: str) -> DataBundle:
    """A torchvision dataset that keeps uint8 images in memory (MNIST family, CIFAR, SVHN, STL10, ...),
    read from ``cfg.root``: its train split trains, its test split validates; ``cfg.args`` go to the class.

    Downloads only when ``cfg.download`` is true (under a file lock, so concurrent workers on one
    machine download once). ``num_samples`` caps the training set to a seeded random subset.
    Standardized per channel with the train split's statistics (``Uint8Images``).
    """
    cls, takes_train = plugins.torchvision_dataset(cfg.name, dataset)
    extra = plugins.torchvision_dataset_kwargs(cfg, cls, takes_train)
    root = cfg.root
    folder = getattr(cls, "base_folder", None)
    files = f"{folder}/" if isinstance(folder, str) else f"torchvision's {dataset} files"
    need = f"a directory holding {files}: put {dataset} under {{}} or set data.download: true"
    if root is None:
        raise ConfigError("data.root", root, need.format("a local directory (data.root)"))
    if not cfg.download and not os.path.isdir(root):
        raise ConfigError("data.root", root, need.format(root))
    from filelock import FileLock   # a torch dependency

    def split(train: bool):
        which = {"train": train} if takes_train else {"split": "train" if train else "test"}
        return cls(root, download=cfg.download, **which, **extra)

    try:
        if cfg.download:
            os.makedirs(root, exist_ok=True)
            with FileLock(os.path.join(root, f".{dataset.lower()}.lock")):
                train, val = split(True), split(False)
        else:
            train, val = split(True), split(False)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted" (CIFAR md5-checks every file)
        raise ConfigError("data.root", root, need.format(root) + f" ({e})") from e

    x_train, y_train = _uint8_images(cfg.name, train)
    x_val, y_val = _uint8_images(cfg.name, val)
    classes = getattr(train, "classes", None)
    class_names = ([str(c) for c in classes] if classes else
                   [str(c) for c in range(int(max(y_train.max(), y_val.max())) + 1)])   # SVHN: no names
    mean, std = channel_stats(x_train)
    if cfg.num_samples is not None:
        keep = torch.as_tensor(np.random.default_rng(cfg.seed).permutation(len(y_train))[:cfg.num_samples])
        x_train, y_train = x_train[keep], y_train[keep]
    return DataBundle(Uint8Images(x_train, y_train, mean, std), Uint8Images(x_val, y_val, mean, std),
                      num_classes=len(class_names), input_shape=tuple(x_train.shape[1:]),
                      class_names=class_names, is_image=True, mean=mean.float(), std=std.float())


def _uint8_images(name: str, ds) -> tuple[torch.Tensor, torch.Tensor]:
    """A torchvision dataset's in-memory images as uint8 (N, C, H, W) and its labels as int64 (N,)."""
    data = getattr(ds, "data", None)
    labels = next((getattr(ds, a) for a in ("targets", "labels") if getattr(ds, a, None) is not None), None)
    images = None if data is None else torch.as_tensor(np.asarray(data))
    if images is not None and images.dtype == torch.uint8:
        if images.dim() == 3:                                       # MNIST family: (N, H, W)
            images = images[:, None]
        elif images.dim() == 4 and images.shape[1] not in (1, 3) and images.shape[3] in (1, 3):
            images = images.permute(0, 3, 1, 2)                     # CIFAR: HWC -> CHW
        elif not (images.dim() == 4 and images.shape[1] in (1, 3)):   # SVHN, STL10: already CHW
            images = None
    if images is None or labels is None:
        found = "no .data" if data is None else f".data of {type(data).__name__} {tuple(getattr(data, 'shape', ()))}"
        raise ConfigError("data.name", name, "a torchvision dataset that keeps uint8 images in memory (.data and "
                          f".targets or .labels), e.g. MNIST, FashionMNIST, CIFAR10, CIFAR100, SVHN ({found})")
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if y.dim() == 2:   # QMNIST: the class, then writer and index columns
        y = y[:, 0]
    return images.contiguous(), y


def _imagefolder(cfg: DataConfig) -> DataBundle:
    """torchvision ImageFolder on ``cfg.root`` (one folder per class), decoded lazily per item.

    Uses ``root/train`` and ``root/val`` when both exist, else a seeded stratified split of ``root``.
    Resize + center-crop to ``cfg.image_size``, RGB, ImageNet mean/std.
    """
    root = cfg.root
    layout = "a directory of class folders (root/<class>/<image>, or root/train/<class>/ and root/val/<class>/)"
    if root is None or not os.path.isdir(root):
        raise ConfigError("data.root", root, layout)
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    tf = transforms.Compose([transforms.Resize(cfg.image_size), transforms.CenterCrop(cfg.image_size),
                             transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def folder(path: str) -> ImageFolder:
        try:
            return ImageFolder(path, transform=tf, target_transform=_int64_label)
        except (FileNotFoundError, OSError) as e:   # no class folders, or no image files in one
            raise ConfigError("data.root", root, f"{layout} ({e})") from e

    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    rng = np.random.default_rng(cfg.seed)
    if os.path.isdir(train_dir) and os.path.isdir(val_dir):
        full_train, val = folder(train_dir), folder(val_dir)
        if val.classes != full_train.classes:
            raise ConfigError("data.root", root, f"the same class folders under train/ and val/, got "
                              f"{full_train.classes} and {val.classes}")
        train_idx = rng.permutation(len(full_train))
    else:
        full_train = folder(root)
        train_idx, val_idx = split_indices(np.asarray(full_train.targets), cfg.val_fraction, cfg.seed)
        val = Subset(full_train, val_idx.tolist())
    if cfg.num_samples is not None:
        train_idx = train_idx[:cfg.num_samples]
    return DataBundle(Subset(full_train, train_idx.tolist()), val, num_classes=len(full_train.classes),
                      input_shape=(3, cfg.image_size, cfg.image_size), class_names=list(full_train.classes),
                      is_image=True, mean=torch.tensor(IMAGENET_MEAN).view(3, 1, 1),
                      std=torch.tensor(IMAGENET_STD).view(3, 1, 1))


DATASETS: dict[str, Callable[[DataConfig], DataBundle]] = {   # keys: training.config.DATASET_NAMES
    "digits": _digits,
    "mnist1d": _mnist1d,
    "cifar10": _cifar10,
    "imagefolder": _imagefolder,
    "synthetic": _synthetic,
}


def load_data(cfg: DataConfig) -> DataBundle:
    """The bundle for ``cfg``, built once per process (every epoch and every caller share it).

    ``cfg.name``: a DATASETS key, ``torchvision:<Dataset>`` or ``package.module:callable``
    (contracts in training.plugins). A factory that raises or returns the wrong thing:
    training.plugins.PluginError naming it.
    """
    form = plugin_form(cfg.name)
    if cfg.name not in DATASETS and (form is None or form[0] not in DATA_PLUGINS):
        raise ConfigError("data.name", cfg.name, f"one of {sorted(DATASETS)}, or a plug-in "
                          "(torchvision:<Dataset>, package.module:callable)")
    return _load_cached(json.dumps(cfg.to_dict(), sort_keys=True))


@functools.lru_cache(maxsize=4)
def _load_cached(key: str) -> DataBundle:
    cfg = DataConfig.from_dict(json.loads(key))
    if cfg.name in DATASETS:
        return DATASETS[cfg.name](cfg)
    kind, target = plugin_form(cfg.name)   # type: ignore[misc]
    return _torchvision_images(cfg, target) if kind == "torchvision" else factory_dataset(cfg)
