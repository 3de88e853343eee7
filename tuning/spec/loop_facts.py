"""What training/ does, written out without torch, for the checks of a search-space file
(tuning.spec.checks): the metrics ``training.loop.fit`` reports, the fields each model, optimizer,
schedule and dataset reads, the registry datasets' sizes and input kinds.

The driver and ``schedtune validate`` never import torch, so these cannot be read from the loop
itself. Each one is checked against training/ by a test that runs it (tests/tuning/spec/
test_loop_facts.py: a real fit()'s report keys, two fits that differ only in an ignored field, the
datasets' real sizes): change the loop, and that test says which line here to change.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

from training.config import DataConfig, TrainConfig

# ---------------------------------------------------------------------------- the reported metrics

TRAIN_METRICS = ("train_loss", "train_acc", "lr", "grad_norm", "update_ratio")   # train_one_epoch
COST_METRICS = ("samples_per_s", "samples_per_s_total", "data_wait_fraction", "step_time_s",
                "peak_memory_mb")                                              # training.measure.epoch_figures
VAL_METRICS = ("val_loss", "val_acc")                                          # evaluate
EVERY_EPOCH = ("epoch", "step", *TRAIN_METRICS, *COST_METRICS, *VAL_METRICS, "epoch_time_s",
               "num_params")   # the model's parameters (every one, trainable or frozen): a size objective
EMA_METRICS = tuple(f"ema_{k}" for k in VAL_METRICS)          # every epoch when regularization.ema_decay > 0
SNAPSHOT_METRICS = tuple(f"snapshot_ensemble_{k}" for k in VAL_METRICS) + ("snapshot_ensemble_size",)
# ... at the last epoch only, with schedule.name cyclic_cosine (the ensemble of its cycle-end snapshots)


def reported(cfg: TrainConfig) -> tuple[frozenset[str], frozenset[str]]:
    """(the metrics fit() reports at every epoch of ``cfg``, those it reports at the last epoch only)."""
    every = set(EVERY_EPOCH) | (set(EMA_METRICS) if cfg.regularization.ema_decay > 0 else set())
    last = set(SNAPSHOT_METRICS) if cfg.schedule.name == "cyclic_cosine" else set()
    return frozenset(every), frozenset(last)


# Which way is better, for the metrics that have a direction (a loss, an accuracy, a cost).
_DIRECTIONS = {"samples_per_s": "max", "samples_per_s_total": "max", "data_wait_fraction": "min",
               "step_time_s": "min", "peak_memory_mb": "min", "epoch_time_s": "min", "num_params": "min"}


def direction(metric: str) -> Optional[str]:
    """"min" for a loss or a cost, "max" for an accuracy or a throughput, None where either can be meant."""
    if metric.endswith("_loss"):
        return "min"
    if metric.endswith("_acc"):
        return "max"
    return _DIRECTIONS.get(metric)


# ---------------------------------------------------------------------------- the datasets

VECTOR_DATA = ("mnist1d", "synthetic")       # 1-D samples: no image augmentation, no convolutional model
IMAGE_MODELS = ("small_cnn", "resnet18", "resnet50")   # registry models that need (C, H, W) inputs
NO_STOCHASTIC_DEPTH = ("mlp", "small_cnn")   # registry models without residual blocks (they refuse it)
# Total samples of the registry datasets whose size the config fixes (others: a local directory or a plug-in).
_TOTAL: dict[str, Callable[[DataConfig], int]] = {
    "digits": lambda d: 1797,                          # scikit-learn's load_digits
    "mnist1d": lambda d: d.num_samples or 4000,        # generated: num_samples in all
    "synthetic": lambda d: d.num_samples or 4096,
}


def train_size(d: DataConfig) -> Optional[int]:
    """Training samples of a registry dataset of known size, else None. The split is scikit-learn's
    ``train_test_split``, which holds out ``ceil(val_fraction * n)``; digits' num_samples caps the
    training set."""
    if d.name not in _TOTAL:
        return None
    n = _TOTAL[d.name](d)
    train = n - math.ceil(d.val_fraction * n)
    return min(train, d.num_samples) if d.name == "digits" and d.num_samples else train


# ---------------------------------------------------------------------------- fields a config ignores

def _optim(*names: str) -> Callable[[TrainConfig], bool]:
    return lambda c: c.optim.name in names


def _schedule(*names: str) -> Callable[[TrainConfig], bool]:
    return lambda c: c.schedule.name in names


def _warmup(c: TrainConfig) -> bool:
    return c.schedule.warmup != "none"


def _images(c: TrainConfig) -> bool:   # a plug-in's data may be images: only known vectors are excluded
    return c.data.name not in VECTOR_DATA


# field -> (whether a config reads it, which fields decide that, who reads it, as a sentence). A field searched
# where no config the space can produce reads it changes nothing but the trial's name.
USED_WHEN: dict[str, tuple[Callable[[TrainConfig], bool], tuple[str, ...], str]] = {
    "model.hidden": (lambda c: c.model.name == "mlp", ("model.name",), "only mlp reads it"),
    "model.channels": (lambda c: c.model.name == "small_cnn", ("model.name",), "only small_cnn reads it"),
    "model.small_stem": (lambda c: c.model.name in ("resnet18", "resnet50"), ("model.name",),
                         "only resnet18 and resnet50 read it"),
    "model.finetune_last_n": (lambda c: c.model.transfer == "finetune_last_n", ("model.transfer",),
                              "only model.transfer: finetune_last_n reads it"),
    "model.backbone_lr_mult": (lambda c: c.model.transfer != "linear_probe", ("model.transfer",),
                               "model.transfer: linear_probe trains the head only"),
    "optim.momentum": (_optim("sgd", "lars"), ("optim.name",), "only sgd and lars read it"),
    "optim.nesterov": (_optim("sgd", "lars"), ("optim.name",), "only sgd and lars read it"),
    "optim.betas": (_optim("adamw", "lamb"), ("optim.name",), "only adamw and lamb read it"),
    "optim.eps": (_optim("adamw", "lamb", "lars"), ("optim.name",), "only adamw, lamb and lars read it"),
    "optim.reference_batch": (lambda c: c.optim.lr_scaling != "none", ("optim.lr_scaling",),
                              "only optim.lr_scaling linear or sqrt reads it"),
    "schedule.milestones": (_schedule("step"), ("schedule.name",), "only schedule.name: step reads it"),
    "schedule.gamma": (_schedule("step"), ("schedule.name",), "only schedule.name: step reads it"),
    "schedule.cycles": (_schedule("cyclic_cosine"), ("schedule.name",), "only schedule.name: cyclic_cosine reads it"),
    "schedule.min_factor": (_schedule("cosine", "linear", "cyclic_cosine"), ("schedule.name",),
                            "only schedule.name cosine, linear and cyclic_cosine read it"),
    "schedule.warmup_epochs": (lambda c: _warmup(c) and c.schedule.warmup_steps is None,
                               ("schedule.warmup", "schedule.warmup_steps"),
                               "only a warmup (schedule.warmup linear or constant) without schedule.warmup_steps reads it"),
    "schedule.warmup_steps": (_warmup, ("schedule.warmup",), "only schedule.warmup linear or constant reads it"),
    "schedule.warmup_start_factor": (_warmup, ("schedule.warmup",), "only schedule.warmup linear or constant reads it"),
    "data.augment": (_images, ("data.name",), f"only image data reads it, not {' or '.join(VECTOR_DATA)}"),
    "regularization.cutout": (_images, ("data.name",), f"only image data reads it, not {' or '.join(VECTOR_DATA)}"),
}
