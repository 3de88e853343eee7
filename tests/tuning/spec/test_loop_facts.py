"""tuning.spec.loop_facts against training/ itself: the metrics a real fit() reports, the fields a
config ignores (two fits that differ only there train alike; where it is read, they do not), the
registry datasets' sizes and input kinds, which models need images or residual blocks. A change in
the loop that these facts miss fails here, naming the fact."""
from __future__ import annotations

import pytest

from training.config import MODEL_NAMES, ConfigError, DataConfig, TrainConfig
from tuning.spec import loop_facts as facts

TINY = {"epochs": 2, "seed": 0, "data": {"name": "digits", "num_samples": 128}, "model": {"name": "mlp", "hidden": [8]},
        "optim": {"name": "sgd", "base_lr": 0.1, "momentum": 0.9},
        "schedule": {"name": "cosine", "warmup": "linear", "warmup_epochs": 0.5},
        "scaling": {"num_workers": 1, "batch_per_worker": 32}}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one torch thread is fastest, and immune to other processes on the cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cfg_with(**updates) -> TrainConfig:
    return TrainConfig.from_dict(TINY).with_updates({k.replace("__", "."): v for k, v in updates.items()})


def reports(cfg: TrainConfig) -> list[set[str]]:
    """The metric names of each report a real fit() makes."""
    from training.loop import fit

    seen: list[set[str]] = []
    fit(cfg, lambda metrics, directory: seen.append(set(metrics)))
    return seen


@pytest.mark.parametrize("updates", [{}, {"regularization__ema_decay": 0.9, "schedule__name": "cyclic_cosine",
                                          "schedule__cycles": 2}], ids=["plain", "ema+snapshots"])
def test_the_reported_metrics_are_what_fit_reports(updates):
    cfg = cfg_with(**updates)
    every, last = facts.reported(cfg)
    seen = reports(cfg)
    assert len(seen) == cfg.epochs
    assert seen[0] == every, (seen[0] ^ every)
    assert seen[-1] == every | last, (seen[-1] ^ (every | last))
    assert bool(last) == bool(updates) and (set(facts.EMA_METRICS) <= every) == bool(updates)


def test_directions():
    assert [facts.direction(m) for m in ("val_loss", "ema_val_acc", "samples_per_s", "epoch_time_s", "lr")] == \
        ["min", "max", "max", "min", None]


@pytest.mark.parametrize("data", [{"name": "digits"}, {"name": "digits", "val_fraction": 0.3},
                                  {"name": "digits", "num_samples": 100}, {"name": "mnist1d", "num_samples": 500},
                                  {"name": "synthetic"}, {"name": "synthetic", "num_samples": 1000, "val_fraction": 0.25}],
                         ids=lambda d: "-".join(f"{v}" for v in d.values()))
def test_train_sizes_are_the_loaders(data):
    from training.data import load_data

    cfg = DataConfig.from_dict(data)
    bundle = load_data(cfg)
    assert len(bundle.train) == facts.train_size(cfg)
    assert (len(bundle.input_shape) == 1) == (cfg.name in facts.VECTOR_DATA)
    assert facts.train_size(DataConfig.from_dict({"name": "imagefolder", "root": "/x"})) is None


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_which_models_need_images_and_residual_blocks(name):
    from training.models import MODELS, build_model

    if name == "resnet50":   # the same builder as resnet18, only its layer counts differ (saves building 25M weights)
        assert MODELS["resnet50"] is MODELS["resnet18"]
        return
    m = TrainConfig.from_dict({"model": {"name": name}}).model
    build_model(m, 10, (1, 8, 8))
    if name in facts.IMAGE_MODELS:
        with pytest.raises(ConfigError, match="model.name"):
            build_model(m, 10, (64,))
    else:
        build_model(m, 10, (64,))
    if name in facts.NO_STOCHASTIC_DEPTH:
        with pytest.raises(ConfigError, match="regularization.stochastic_depth"):
            build_model(m, 10, (1, 8, 8), stochastic_depth=0.1)
    else:
        build_model(m, 10, (1, 8, 8), stochastic_depth=0.1)


VECTORS = {"data__name": "synthetic", "data__num_samples": 160}
# field -> (a config that ignores it, one that reads it, two values)
IGNORED = {
    "model.hidden": ({"model__name": "small_cnn"}, {}, [8], [16]),
    "model.channels": ({}, {"model__name": "small_cnn"}, [4], [8]),
    "model.small_stem": ({}, {"model__name": "resnet18", "epochs": 1}, False, True),
    "model.finetune_last_n": ({"model__hidden": [8, 8]}, {"model__hidden": [8, 8], "model__transfer": "finetune_last_n"},
                              1, 2),
    "model.backbone_lr_mult": ({"model__transfer": "linear_probe"}, {}, 0.1, 1.0),
    "optim.momentum": ({"optim__name": "adamw", "optim__base_lr": 0.01}, {}, 0.5, 0.9),
    "optim.nesterov": ({"optim__name": "adamw", "optim__base_lr": 0.01}, {}, False, True),
    "optim.betas": ({}, {"optim__name": "adamw", "optim__base_lr": 0.01}, [0.9, 0.999], [0.5, 0.9]),
    "optim.eps": ({}, {"optim__name": "adamw", "optim__base_lr": 0.01}, 1e-8, 0.1),
    "optim.reference_batch": ({}, {"optim__lr_scaling": "linear"}, 32, 256),
    "schedule.milestones": ({}, {"schedule__name": "step"}, [0.3], [0.6]),
    "schedule.gamma": ({}, {"schedule__name": "step"}, 0.1, 0.5),
    "schedule.cycles": ({}, {"schedule__name": "cyclic_cosine"}, 1, 2),
    "schedule.min_factor": ({"schedule__name": "step"}, {}, 0.0, 0.5),
    "schedule.warmup_epochs": ({"schedule__warmup": "none"}, {}, 0.5, 1.0),
    "schedule.warmup_steps": ({"schedule__warmup": "none"}, {}, 1, 3),
    "schedule.warmup_start_factor": ({"schedule__warmup": "none"}, {}, 0.1, 0.5),
    "data.augment": (VECTORS, {}, False, True),
    "regularization.cutout": (VECTORS, {}, 0, 4),
}


def fingerprint(cfg: TrainConfig) -> tuple:
    """What a run learned: its per-step losses and its validation metrics, every epoch."""
    from training.loop import fit

    r = fit(cfg)
    return tuple(r.trace["loss"]), tuple((h["val_loss"], h["val_acc"]) for h in r.history)


def test_every_used_when_entry_is_tested():
    assert set(IGNORED) == set(facts.USED_WHEN)


@pytest.mark.parametrize("field", sorted(IGNORED))
def test_an_ignored_field_changes_nothing_and_a_read_one_does(field):
    ignoring, reading, a, b = IGNORED[field]
    used = facts.USED_WHEN[field][0]
    key = field.replace(".", "__")
    off_a, off_b = cfg_with(**ignoring, **{key: a}), cfg_with(**ignoring, **{key: b})
    on_a, on_b = cfg_with(**reading, **{key: a}), cfg_with(**reading, **{key: b})
    assert not used(off_a) and not used(off_b) and used(on_a) and used(on_b)
    assert fingerprint(off_a) == fingerprint(off_b)
    assert fingerprint(on_a) != fingerprint(on_b)
