"""training.data: one contract over every DATASETS entry and torchvision: datasets, plus splits, caps and errors."""
from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from training.config import ConfigError, DataConfig
from training.data import DATASETS, channel_stats, load_data, split_indices

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_fake_cifar10(root, per_batch: int = 8, seed: int = 0) -> None:
    """A tiny CIFAR-10 in torchvision's python-pickle layout (5 train batches, a test batch, meta)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
                 "labels": [int(c) for c in rng.integers(0, 10, size=per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": CIFAR_CLASSES}))


def write_fake_imagefolder(root, classes=("cat", "dog", "owl"), per_class: int = 6, size=(12, 10)) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")


def write_fake_mnist(root, dataset: str = "MNIST", n_train: int = 12, n_test: int = 6, side: int = 8,
                     seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny MNIST-family dataset in its raw idx format under root/<dataset>/raw (what torchvision reads;
    it checks only that the files exist). Returns the images and labels written, by split."""
    rng = np.random.default_rng(seed)
    raw = root / dataset / "raw"
    raw.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, side, side), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">iiii", 0x803, n, side, side) + images.tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 0x801, n) + labels.tobytes())
        out[split] = (images, labels)
    return out


def use_fake_cifar10(root, monkeypatch):
    """Write a fake CIFAR-10 under ``root`` and let torchvision read it.

    torchvision md5-checks every CIFAR-10 file (data batches and batches.meta) on every load, not
    only when downloading, so a fake can only be read with the checksum check switched off.
    """
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    write_fake_cifar10(root)
    return root


@pytest.fixture
def fake_cifar10(tmp_path, monkeypatch):
    return use_fake_cifar10(tmp_path, monkeypatch)


def config_for(name: str, tmp_path, monkeypatch, **overrides) -> DataConfig:
    """A small, fast config for each registry entry (fakes on disk where the data is local)."""
    base = {"name": name}
    if name == "cifar10":
        base["root"] = str(use_fake_cifar10(tmp_path, monkeypatch))
    elif name == "imagefolder":
        write_fake_imagefolder(tmp_path)
        base.update(root=str(tmp_path), image_size=8)
    elif name == "mnist1d":
        base["num_samples"] = 400
    elif name == "torchvision:MNIST":
        write_fake_mnist(tmp_path)
        base["root"] = str(tmp_path)
    elif name == "torchvision:CIFAR10":
        base["root"] = str(use_fake_cifar10(tmp_path, monkeypatch))
    return DataConfig.from_dict({**base, **overrides})


def build(cfg: DataConfig):
    return DATASETS[cfg.name](cfg) if cfg.name in DATASETS else load_data(cfg)


def stack(ds) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.stack(ys)


@pytest.mark.parametrize("name", [*sorted(DATASETS), "torchvision:MNIST", "torchvision:CIFAR10"])
def test_every_dataset_obeys_the_contract(name, tmp_path, monkeypatch):
    bundle = build(config_for(name, tmp_path, monkeypatch))

    assert len(bundle.train) > 0 and len(bundle.val) > 0
    assert bundle.num_classes == len(bundle.class_names) >= 2
    assert bundle.is_image == (len(bundle.input_shape) == 3)
    x, y = bundle.train[0]
    assert x.dtype == torch.float32 and tuple(x.shape) == bundle.input_shape
    assert y.dtype == torch.int64 and y.dim() == 0
    for split in (bundle.train, bundle.val):
        xs, ys = stack(split)
        assert torch.isfinite(xs).all()
        assert 0 <= ys.min() and ys.max() < bundle.num_classes
    xb, yb = next(iter(DataLoader(bundle.train, batch_size=4)))
    assert xb.shape == (4, *bundle.input_shape) and xb.dtype == torch.float32
    assert yb.shape == (4,) and yb.dtype == torch.int64

    if name != "imagefolder":  # imagefolder uses the fixed ImageNet mean/std (for pretrained backbones)
        mean, std = channel_stats(stack(bundle.train)[0])
        torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-4, rtol=0)
        torch.testing.assert_close(std, torch.ones_like(std), atol=1e-4, rtol=0)


def rows(ds) -> set[bytes]:
    return {x.numpy().tobytes() for x, _ in (ds[i] for i in range(len(ds)))}


def test_digits_split_is_disjoint_stratified_and_seeded():
    bundle = DATASETS["digits"](DataConfig(name="digits", val_fraction=0.2, seed=0))
    assert (len(bundle.train), len(bundle.val)) == (1437, 360)   # 1797 samples, none duplicated
    assert rows(bundle.train).isdisjoint(rows(bundle.val))
    val_counts = np.bincount(stack(bundle.val)[1].numpy(), minlength=10)
    assert val_counts.min() >= 35 and val_counts.max() <= 37      # stratified: ~36 per class

    again = DATASETS["digits"](DataConfig(name="digits", seed=0))
    other = DATASETS["digits"](DataConfig(name="digits", seed=1))
    assert torch.equal(stack(again.val)[0], stack(bundle.val)[0])
    assert rows(other.val) != rows(bundle.val)


@pytest.mark.parametrize("name", ["digits", "mnist1d", "synthetic"])
def test_split_seed_changes_the_split_not_the_data(name):
    def split(seed):
        b = DATASETS[name](DataConfig(name=name, seed=seed, num_samples=None if name == "digits" else 200))
        return rows(b.train), rows(b.val)

    (tr0, va0), (tr0b, va0b), (tr1, va1) = split(0), split(0), split(1)
    assert (tr0, va0) == (tr0b, va0b)
    assert va0 != va1 and tr0.isdisjoint(va0) and tr1.isdisjoint(va1)
    assert len(tr0 | va0) == len(tr1 | va1)


def test_split_indices_partition_and_fallback():
    labels = np.repeat(np.arange(4), 5)
    train, val = split_indices(labels, 0.2, seed=3)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(20))
    assert np.bincount(labels[val], minlength=4).tolist() == [1, 1, 1, 1]
    train, val = split_indices(np.array([0, 1, 1, 1, 1]), 0.4, seed=0)  # class 0 has one sample
    assert len(train) == 3 and len(val) == 2


@pytest.mark.parametrize("name", ["digits", "cifar10", "imagefolder"])
def test_num_samples_caps_the_training_set_only(name, tmp_path, monkeypatch):
    full = DATASETS[name](config_for(name, tmp_path / "a", monkeypatch))
    capped = DATASETS[name](config_for(name, tmp_path / "b", monkeypatch, num_samples=5))
    assert len(capped.train) == 5 and len(capped.val) == len(full.val)
    assert rows(capped.train) <= rows(full.train)


def test_num_samples_is_the_size_of_generated_datasets():
    assert len(DATASETS["synthetic"](DataConfig(name="synthetic", num_samples=500, val_fraction=0.2)).val) == 100
    b = DATASETS["mnist1d"](DataConfig(name="mnist1d", num_samples=300, val_fraction=0.2))
    assert (len(b.train), len(b.val), b.input_shape) == (240, 60, (40,))


def test_mnist1d_leaves_global_rng_alone():
    np.random.seed(7)
    expected = np.random.rand()
    np.random.seed(7)
    DATASETS["mnist1d"](DataConfig(name="mnist1d", num_samples=100))
    assert np.random.rand() == expected


def test_cifar10_reads_the_python_layout(fake_cifar10):
    bundle = DATASETS["cifar10"](DataConfig(name="cifar10", root=str(fake_cifar10)))
    assert (len(bundle.train), len(bundle.val)) == (40, 8)          # 5 x 8 train, official test split
    assert bundle.class_names == CIFAR_CLASSES and bundle.input_shape == (3, 32, 32)
    batch = pickle.loads((fake_cifar10 / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    raw = torch.from_numpy(batch["data"][0].reshape(3, 32, 32)).double()   # CHW rows in the file
    x, y = bundle.train[0]
    torch.testing.assert_close(x.double() * bundle.train.std + bundle.train.mean, raw, atol=1e-3, rtol=0)
    assert y.item() == batch["labels"][0]


@pytest.mark.parametrize("make_root", ["none", "missing", "empty"])
def test_cifar10_without_files_names_data_root(make_root, tmp_path):
    root = {"none": None, "missing": str(tmp_path / "nope"), "empty": str(tmp_path)}[make_root]
    with pytest.raises(ConfigError, match="data.download: true") as err:
        DATASETS["cifar10"](DataConfig(name="cifar10", root=root))
    assert err.value.key == "data.root"


def test_imagefolder_uses_train_and_val_folders(tmp_path):
    write_fake_imagefolder(tmp_path / "train", per_class=4)
    write_fake_imagefolder(tmp_path / "val", per_class=2)
    bundle = DATASETS["imagefolder"](DataConfig(name="imagefolder", root=str(tmp_path), image_size=8))
    assert (len(bundle.train), len(bundle.val)) == (12, 6)
    assert bundle.class_names == ["cat", "dog", "owl"] and bundle.input_shape == (3, 8, 8)


@pytest.mark.parametrize("make_root", ["none", "missing", "no_class_folders"])
def test_imagefolder_errors_name_data_root(make_root, tmp_path):
    root = {"none": None, "missing": str(tmp_path / "nope"), "no_class_folders": str(tmp_path)}[make_root]
    with pytest.raises(ConfigError) as err:
        DATASETS["imagefolder"](DataConfig(name="imagefolder", root=root))
    assert err.value.key == "data.root"


def test_load_data_caches_per_config_and_rejects_unknown_names():
    a = load_data(DataConfig(name="synthetic", num_samples=100))
    assert load_data(DataConfig(name="synthetic", num_samples=100)) is a
    assert load_data(DataConfig(name="synthetic", num_samples=100, seed=1)) is not a
    with pytest.raises(ConfigError, match="one of") as err:
        load_data(DataConfig(name="mnist"))
    assert err.value.key == "data.name"


# ---------------------------------------------------------------------------- torchvision:<Dataset>

@pytest.mark.parametrize("dataset", ["MNIST", "FashionMNIST", "KMNIST"])
def test_torchvision_mnist_family_reads_its_raw_files(dataset, tmp_path):
    written = write_fake_mnist(tmp_path, dataset)
    bundle = load_data(DataConfig(name=f"torchvision:{dataset}", root=str(tmp_path)))
    assert (len(bundle.train), len(bundle.val), bundle.input_shape) == (12, 6, (1, 8, 8))   # test split is val
    import torchvision.datasets

    assert bundle.class_names == getattr(torchvision.datasets, dataset).classes and bundle.num_classes == 10
    for split, ds in (("train", bundle.train), ("t10k", bundle.val)):
        images, labels = written[split]
        x, y = ds[3]
        torch.testing.assert_close(x.double() * ds.std + ds.mean, torch.from_numpy(images[3][None]).double(),
                                   atol=1e-3, rtol=0)
        assert y.item() == labels[3]
    capped = load_data(DataConfig(name=f"torchvision:{dataset}", root=str(tmp_path), num_samples=5))
    assert (len(capped.train), len(capped.val)) == (5, 6)


def test_torchvision_cifar10_is_the_cifar10_entry(fake_cifar10):
    ours = DATASETS["cifar10"](DataConfig(name="cifar10", root=str(fake_cifar10)))
    theirs = load_data(DataConfig(name="torchvision:CIFAR10", root=str(fake_cifar10)))
    assert ours.class_names == theirs.class_names == CIFAR_CLASSES
    assert torch.equal(stack(ours.train)[0], stack(theirs.train)[0])
    assert torch.equal(stack(ours.val)[1], stack(theirs.val)[1])


def test_torchvision_datasets_download_only_with_data_download(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    def fake_download(self):   # what MNIST.download() leaves on disk, without the network
        calls.append(self.train)
        if not (tmp_path / "MNIST").exists():
            write_fake_mnist(tmp_path)

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", fake_download)
    for root in (None, str(tmp_path / "missing"), str(tmp_path)):
        with pytest.raises(ConfigError, match="set data.download: true") as err:
            load_data(DataConfig(name="torchvision:MNIST", root=root))
        assert err.value.key == "data.root"
    assert calls == []                                    # never implicitly
    bundle = load_data(DataConfig(name="torchvision:MNIST", root=str(tmp_path), download=True))
    assert calls == [True, False] and len(bundle.train) == 12
    assert (tmp_path / ".mnist.lock").exists()            # concurrent workers on one machine download once


def test_torchvision_dataset_without_in_memory_images_names_data_name(tmp_path):
    write_fake_imagefolder(tmp_path / "train")
    with pytest.raises(ConfigError, match="a train and a test split") as err:
        load_data(DataConfig.from_dict({"name": "torchvision:ImageFolder", "root": str(tmp_path)}))
    assert err.value.key == "data.name"
