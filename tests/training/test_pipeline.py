"""The input pipeline and the per-epoch cost figures: data wait measured (a slow dataset is input
bound, an in-memory one is not), loaders built once per fit with persistent workers and the
per-epoch shuffle kept, loader workers sized from the worker's CPUs, pinned memory on GPU only."""
import dataclasses
import os
import resource
import time

import pytest
import torch
from torch.utils.data import Dataset, DistributedSampler, TensorDataset

from training import loop, pipeline
from training.config import TrainConfig
from training.data import load_data
from training.loop import fit

BASE = {"epochs": 2, "seed": 0, "data": {"name": "digits"}, "model": {"name": "mlp", "hidden": [32]},
        "optim": {"name": "sgd", "base_lr": 0.1, "momentum": 0.9}, "scaling": {"batch_per_worker": 32}}
FIGURES = ("data_wait_fraction", "samples_per_s", "samples_per_s_total", "step_time_s", "peak_memory_mb")


def cfg_with(**updates) -> TrainConfig:
    return TrainConfig.from_dict(BASE).with_updates(updates)


class Slow(Dataset):
    """``ds``, each item ``delay`` seconds late (a decoder that cannot keep up)."""

    def __init__(self, ds: Dataset, delay: float):
        self.ds, self.delay = ds, delay

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        time.sleep(self.delay)
        return self.ds[i]


def _fit_on(monkeypatch, cfg: TrainConfig, wrap=lambda ds: ds):
    bundle = load_data(cfg.data)
    monkeypatch.setattr(loop, "load_data", lambda data_cfg: dataclasses.replace(bundle, train=wrap(bundle.train)))
    return fit(cfg)


def test_a_slow_dataset_is_input_bound_and_an_in_memory_one_is_not(monkeypatch):
    # 10 steps of 32 an epoch, by a model whose step costs more than indexing a batch in memory
    cfg = cfg_with(**{"data.num_samples": 320, "model.hidden": [256]})
    slow = _fit_on(monkeypatch, cfg, lambda ds: Slow(ds, 0.01)).history
    fast = _fit_on(monkeypatch, cfg).history
    for h in slow + fast:
        assert set(FIGURES) <= set(h)
        assert h["samples_per_s_total"] == h["samples_per_s"] > 0      # one worker
        assert h["step_time_s"] > 0
    print("data_wait_fraction slow", [(h["data_wait_fraction"], h["step_time_s"]) for h in slow],
          "fast", [(h["data_wait_fraction"], h["step_time_s"]) for h in fast])
    assert all(h["data_wait_fraction"] > 0.5 for h in slow)
    assert all(h["data_wait_fraction"] < 0.25 for h in fast)
    # every sample makes the loop wait 10 ms: fewer than 100 samples a second
    assert all(h["samples_per_s"] < 1 / 0.01 for h in slow)


def test_the_figures_add_up():
    """step_time_s x steps + the wait = the step loop's time = samples / samples_per_s."""
    h = fit(cfg_with(epochs=1)).history[0]
    steps = h["step"]
    loop_s = steps * 32 / h["samples_per_s"]
    assert steps * h["step_time_s"] + h["data_wait_fraction"] * loop_s == pytest.approx(loop_s, rel=1e-9)
    assert loop_s <= h["epoch_time_s"]                                  # the epoch also evaluates
    # on CPU the peak is the process's peak RSS (getrusage, KiB on Linux), in MiB
    assert h["peak_memory_mb"] == pytest.approx(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rel=0.5)


class WorkerPids(Dataset):
    """Items (index, pid of the process that loaded it)."""

    def __len__(self):
        return 96

    def __getitem__(self, i):
        return torch.tensor(float(i)), torch.tensor(os.getpid())


def test_loaders_are_built_once_and_their_workers_persist_across_epochs():
    """Epoch after epoch the same loader and the same worker process serve the batches, in
    DistributedSampler's order for that epoch (set_epoch still reshuffles)."""
    cfg = cfg_with(**{"data.loader_workers": 1, "scaling.batch_per_worker": 8})
    loaders, ds = pipeline.Loaders(), WorkerPids()
    first = loaders.train(ds, cfg, 0, 2, torch.device("cpu"), 0)
    pids, orders = set(), []
    for epoch in range(3):
        loader = loaders.train(ds, cfg, 0, 2, torch.device("cpu"), epoch)
        assert loader is first
        batches = list(loader)
        pids |= {int(p) for _, y in batches for p in y}
        orders.append([int(i) for x, _ in batches for i in x])
        ref = DistributedSampler(ds, num_replicas=2, rank=0, shuffle=True, seed=0, drop_last=True)
        ref.set_epoch(epoch)
        assert orders[-1] == list(ref), epoch
    assert len(pids) == 1 and os.getpid() not in pids             # one loader process, all three epochs
    assert orders[0] != orders[1] != orders[2]
    assert loaders.train(ds, cfg.with_updates({"data.loader_workers": 0}), 0, 2, torch.device("cpu"), 0) is not first
    loaders.close()


def test_a_fit_builds_its_loaders_once(monkeypatch):
    built = []
    real = pipeline.DataLoader
    monkeypatch.setattr(pipeline, "DataLoader", lambda *a, **k: built.append(k) or real(*a, **k))
    fit(cfg_with(epochs=3))
    assert len(built) == 2                                  # train and val, not one per epoch


@pytest.mark.parametrize("setting,cpus_per_worker,kind,expected", [
    ("auto", 4.0, "per_item", 3),       # the worker's CPUs less the one that trains
    ("auto", 2.5, "per_item", 1),
    ("auto", 1.0, "per_item", 0),
    ("auto", 32.0, "per_item", 7),      # at most what this process may run on (8 here)
    ("auto", 8.0, "in_memory", 0),      # a batch is one index op: no processes
    (3, 1.0, "in_memory", 3),           # what is set, is used
])
def test_loader_workers_are_sized_from_the_workers_cpus(monkeypatch, setting, cpus_per_worker, kind, expected):
    monkeypatch.setattr(pipeline, "available_cpus", lambda: 8)
    cfg = cfg_with(**{"data.loader_workers": setting, "scaling.cpus_per_worker": cpus_per_worker})
    ds = TensorDataset(torch.zeros(4)) if kind == "in_memory" else WorkerPids()
    assert pipeline.loader_workers(cfg, ds) == expected


def test_memory_is_pinned_for_a_gpu_only():
    cfg, ds = cfg_with(**{"data.loader_workers": 2, "data.prefetch_factor": 3}), WorkerPids()
    cpu = pipeline.Loaders().train(ds, cfg, 0, 1, torch.device("cpu"), 0)
    gpu = pipeline.Loaders().train(ds, cfg, 0, 1, torch.device("cuda", 0), 0)   # built, not iterated
    assert (cpu.pin_memory, gpu.pin_memory) == (False, True)
    assert (gpu.num_workers, gpu.prefetch_factor, gpu.persistent_workers) == (2, 3, True)


def test_streamed_splits_train_exactly_as_the_in_memory_ones():
    """The seam Ray Data ingest uses (tuning.driver.ingest): a DataBundle whose splits are
    ``pipeline.Streamed`` (a size and one iterator of batches per epoch). Streams that replay the
    in-memory sampler's batches train to the same numbers, epoch after epoch; the loop asks each
    for epochs 0.. in order, takes steps_per_epoch batches of a longer stream, and reads the
    validation stream once per evaluation. A stream cannot be re-read by index (cooldown forks)."""
    cfg = cfg_with(epochs=3)
    memory = load_data(cfg.data)
    asked = []

    def train_batches(epoch):
        asked.append(("train", epoch))
        shard = pipeline.sampler(memory.train, cfg.seed, 0, 1, epoch)
        yield from pipeline.batches(memory.train, shard, 32, True, 0)
        yield torch.full((32, 1, 8, 8), float("nan")), torch.zeros(32, dtype=torch.long)   # past the plan: never read

    def val_batches(epoch):
        asked.append(("val", epoch))
        return pipeline.batches(memory.val, range(len(memory.val)), 256, False, 0)

    streamed = dataclasses.replace(memory, train=pipeline.Streamed(len(memory.train), train_batches),
                                   val=pipeline.Streamed(len(memory.val), val_batches))
    got, want = fit(cfg, data=streamed), fit(cfg)
    keys = ("train_loss", "train_acc", "val_loss", "val_acc", "step", "lr", "grad_norm")
    assert [[h[k] for k in keys] for h in got.history] == [[h[k] for k in keys] for h in want.history]
    assert got.history[-1]["step"] == 3 * (len(memory.train) // 32)
    assert asked == [("train", 0), ("val", 0), ("train", 1), ("val", 0), ("train", 2), ("val", 0)]
    with pytest.raises(TypeError, match="cannot be re-read by index"):
        pipeline.batches(streamed.train, range(4), 2, True, 0)
