"""The input pipeline of one worker: which samples each step gets, how they are loaded, and how
they reach the device.

- Shards (``sampler``): a disjoint shard of the training set per worker, reshuffled every epoch
  (``DistributedSampler.set_epoch``), the same batches with or without loader worker processes.
- Loaders are built once per fit (``Loaders``) and kept while their dataset and settings stay the
  same: loader worker processes (``data.loader_workers``) live across epochs
  (``data.persistent_workers``) with ``data.prefetch_factor`` batches ready each; a new epoch only
  re-seeds the sampler (the sampler runs in this process, so its epoch reaches every worker).
- In-memory datasets (``BATCH_INDEXED``) are indexed a whole batch at a time; uint8 images are read
  as uint8 (``Uint8Images.raw``) and standardized on the device after the copy (``to_device``), where
  the augmentation then runs too (training.regularizers.augment_images).
- On a GPU the loader pins its batches and the copies are ``non_blocking``; on CPU neither applies.
- Streamed splits (``Streamed``: Ray Data shards that tuning.driver.ingest hands ``fit`` in a
  DataBundle) arrive sharded, shuffled and batched: the loaders pass their batches through.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Iterable, Optional

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, TensorDataset

from training.config import TrainConfig
from training.data import Uint8Images

# In-memory datasets whose ``ds[list_of_indices]`` is the whole batch, equal to stacking the items.
BATCH_INDEXED = (TensorDataset, Uint8Images)
VAL_BATCH = 256    # validation batches are at least this large (no gradients: memory allows it)


Batch = tuple[torch.Tensor, torch.Tensor]


class Streamed:
    """A split that arrives as batches from outside this process (a Ray Data shard, handed in by
    tuning.driver.ingest; nothing here knows Ray): ``len`` is the whole split's samples, every
    worker's together (steps_per_epoch is planned from it, as for an in-memory split), and
    ``epoch_batches(epoch)`` this worker's batches of ``epoch``, already sharded, shuffled for that
    epoch and batched: ``scaling.batch_per_worker`` samples each with partial batches dropped for
    training, so every worker has the same number (DistributedSampler's drop_last); the validation
    split whole across the workers, each sample once."""

    def __init__(self, size: int, epoch_batches: Callable[[int], Iterable[Batch]]):
        self.size, self.epoch_batches = size, epoch_batches

    def __len__(self) -> int:
        return self.size


def sampler(ds: Dataset, seed: int, rank: int, world: int, epoch: int) -> DistributedSampler:
    """Worker ``rank``'s shard of ``ds`` for ``epoch``: disjoint across workers (no padding repeats),
    a new permutation every epoch."""
    s = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    s.set_epoch(epoch)
    return s


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # macOS
        return os.cpu_count() or 1


def loader_workers(cfg: TrainConfig, ds: Dataset) -> int:
    """Loader worker processes for ``ds``: ``data.loader_workers``, or for "auto" none where a batch
    is one index op into memory (processes would only add a copy through shared memory), else the
    worker's CPUs (``scaling.cpus_per_worker``, at most what this process may use) less the one
    that trains."""
    if cfg.data.loader_workers != "auto":
        return cfg.data.loader_workers
    if isinstance(ds, BATCH_INDEXED):
        return 0
    return max(min(math.floor(cfg.scaling.cpus_per_worker), available_cpus()) - 1, 0)


def batches(ds: Dataset, indices, batch_size: int, drop_last: bool, workers: int, *, pin: bool = False,
            prefetch_factor: int = 2, persistent: bool = False) -> DataLoader:
    """A loader of ``ds`` at the indices ``indices`` (a sampler or a range) yields, ``batch_size`` at
    a time, in order.

    A BATCH_INDEXED dataset is indexed once per batch (``ds[indices]``) instead of once per sample
    and collated: the same samples in the same order, without the per-sample Python work
    (measured on synthetic data, batch 128: 3.0 -> 0.7 us of CPU per sample). Uint8Images are read
    raw (uint8): ``to_device`` standardizes them.
    """
    if isinstance(ds, Streamed):   # cooldown forks and the recipe's probes re-read the training set by index
        raise TypeError("a streamed split (data.name: raydata) is read once per epoch, in the order its source "
                        "shuffled it: it cannot be re-read by index (rung_eval cooldown forks, the recipe's probes)")
    if isinstance(ds, Uint8Images):
        ds = ds.raw
    more = {"prefetch_factor": prefetch_factor, "persistent_workers": persistent} if workers > 0 else {}
    if isinstance(ds, BATCH_INDEXED):
        return DataLoader(ds, batch_size=None, sampler=BatchSampler(indices, batch_size, drop_last),
                          num_workers=workers, pin_memory=pin, **more)
    return DataLoader(ds, batch_size=batch_size, sampler=indices, drop_last=drop_last, num_workers=workers,
                      pin_memory=pin, **more)


def to_device(batch: tuple[torch.Tensor, torch.Tensor], ds: Dataset,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A loaded batch of ``ds`` on ``device``, as the model takes it: a uint8 batch of Uint8Images is
    copied as uint8 and standardized there. Copies are non_blocking on a GPU, where the loader
    pinned the batch (from pageable memory non_blocking would do nothing)."""
    x, y = batch
    non_blocking = device.type == "cuda"
    x, y = x.to(device, non_blocking=non_blocking), y.to(device, non_blocking=non_blocking)
    if isinstance(ds, Uint8Images):
        x = ds.normalize(x)
    return x, y


class Loaders:
    """One worker's train and val loaders, each built on first use and kept while its dataset and
    settings stay the same (a caller may swap ``run.data``: the recipe's probes do)."""

    def __init__(self) -> None:
        self._built: dict[str, tuple[Dataset, tuple, DataLoader, Optional[DistributedSampler]]] = {}

    def _get(self, role: str, ds: Dataset, key: tuple, build) -> tuple[DataLoader, Optional[DistributedSampler]]:
        held = self._built.get(role)
        if held is None or held[0] is not ds or held[1] != key:
            self._built.pop(role, None)   # its worker processes end with it
            held = self._built[role] = (ds, key, *build())
        return held[2], held[3]

    def _settings(self, cfg: TrainConfig, ds: Dataset, device: torch.device) -> dict:
        return {"workers": loader_workers(cfg, ds), "pin": device.type == "cuda",
                "prefetch_factor": cfg.data.prefetch_factor, "persistent": cfg.data.persistent_workers}

    def train(self, ds: Dataset, cfg: TrainConfig, rank: int, world: int, device: torch.device,
              epoch: int) -> Iterable[Batch]:
        """This worker's shard of ``ds`` for ``epoch``, ``scaling.batch_per_worker`` at a time
        (partial batches dropped). A Streamed split's batches of ``epoch`` as they come."""
        if isinstance(ds, Streamed):
            return ds.epoch_batches(epoch)
        settings = self._settings(cfg, ds, device)
        key = (rank, world, cfg.seed, cfg.scaling.batch_per_worker, tuple(sorted(settings.items())))

        def build():
            s = sampler(ds, cfg.seed, rank, world, 0)
            return batches(ds, s, cfg.scaling.batch_per_worker, True, **settings), s
        loader, shard = self._get("train", ds, key, build)
        shard.set_epoch(epoch)
        return loader

    def val(self, ds: Dataset, cfg: TrainConfig, rank: int, world: int, device: torch.device) -> Iterable[Batch]:
        """``ds`` in order, each worker taking a contiguous shard (a Streamed split: its share)."""
        if isinstance(ds, Streamed):
            return ds.epoch_batches(0)
        settings = self._settings(cfg, ds, device)
        size = max(cfg.scaling.batch_per_worker, VAL_BATCH)
        key = (rank, world, size, tuple(sorted(settings.items())))
        n = len(ds)
        shard = range(rank * n // world, (rank + 1) * n // world)
        return self._get("val", ds, key, lambda: (batches(ds, shard, size, False, **settings), None))[0]

    def close(self) -> None:
        """Drop the loaders (and with them their worker processes)."""
        self._built.clear()
