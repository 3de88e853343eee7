"""The typed config tree: strict construction, errors naming key/value/expectation, round trips."""
import pytest

from training.config import ConfigError, TrainConfig, apply_dotted, field_paths


def test_defaults_round_trip():
    cfg = TrainConfig()
    d = cfg.to_dict()
    assert TrainConfig.from_dict(d) == cfg
    assert TrainConfig.from_dict(d).to_dict() == d


def test_design_example_parses_and_round_trips():
    d = {"epochs": 10,
         "data": {"name": "digits", "val_fraction": 0.2, "seed": 0},
         "model": {"name": "mlp", "hidden": [128], "dropout": 0.0},
         "optim": {"name": "sgd", "base_lr": 0.1, "momentum": 0.9, "weight_decay": 1.0e-4,
                   "lr_scaling": "linear", "reference_batch": 256},
         "schedule": {"name": "cosine", "warmup": "linear", "warmup_epochs": 1},
         "regularization": {"label_smoothing": 0.0, "mixup_alpha": 0.0},
         "scaling": {"num_workers": 2, "batch_per_worker": 32, "use_gpu": False}}
    cfg = TrainConfig.from_dict(d)
    assert cfg.scaling.global_batch == 64
    assert cfg.optim.weight_decay == 1e-4 and isinstance(cfg.schedule.warmup_epochs, float)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("d,key,expected", [
    ({"optim": {"base_lr": -1}}, "optim.base_lr", "> 0"),
    ({"optim": {"lr": 0.1}}, "optim.lr", "one of the keys"),
    ({"optim": {"name": "adam"}}, "optim.name", "one of 'sgd', 'adamw', 'lars', 'lamb'"),
    ({"schedule": {"name": "cosine", "milestones": [0.8, 0.2]}}, "schedule.milestones",
     "increasing fractions of the post-warmup phase"),
    ({"scaling": {"sync_batchnorm": True}}, "scaling.sync_batchnorm", "false unless use_gpu is true"),
    ({"schedule": {"warmup": "gradual"}}, "schedule.warmup", "one of 'none', 'linear', 'constant'"),
    ({"scaling": {"num_workers": 0}}, "scaling.num_workers", ">= 1"),
    ({"scaling": {"batch_per_worker": 3.5}}, "scaling.batch_per_worker", "an integer"),
    ({"scaling": {"use_gpu": "yes"}}, "scaling.use_gpu", "true or false"),
    ({"model": {"hidden": [128, "x"]}}, "model.hidden[1]", "an integer"),
    ({"model": {"dropout": 1.0}}, "model.dropout", "[0, 1)"),
    ({"regularization": {"label_smoothing": 1.5}}, "regularization.label_smoothing", "[0, 1)"),
    ({"epochs": 0}, "epochs", ">= 1"),
    ({"epochs": True}, "epochs", "an integer"),
    ({"optim": {"base_lr": float("nan")}}, "optim.base_lr", "finite"),
    ({"data": "digits"}, "data", "a mapping"),
    ({"bogus": 1}, "bogus", "one of the keys"),
])
def test_errors_name_key_value_and_expectation(d, key, expected):
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict(d)
    assert e.value.key == key
    assert expected in e.value.expected
    assert str(e.value).startswith(f"{key}: got ")
    assert isinstance(e.value, ValueError)


def test_flat_view_has_dotted_keys():
    flat = TrainConfig().flat()
    assert flat["optim.base_lr"] == 0.1
    assert flat["scaling.num_workers"] == 1
    top_level = ("epochs", "seed", "precision", "channels_last", "compile")
    assert "optim" not in flat and all("." in k or k in top_level for k in flat)


def test_with_updates_merges_sections_and_validates():
    base = TrainConfig.from_dict({"schedule": {"name": "cosine", "warmup": "linear", "warmup_epochs": 2}})
    cfg = base.with_updates({"optim.base_lr": 0.3, "schedule": {"name": "step", "gamma": 0.5}})
    assert cfg.optim.base_lr == 0.3
    assert (cfg.schedule.name, cfg.schedule.gamma, cfg.schedule.warmup) == ("step", 0.5, "linear")
    with pytest.raises(ConfigError, match="optim.lrr"):
        base.with_updates({"optim.lrr": 0.3})


def test_apply_dotted_does_not_mutate_base():
    base = {"optim": {"base_lr": 0.1}}
    out = apply_dotted(base, {"optim.base_lr": 0.5, "model.hidden": [4]})
    assert base == {"optim": {"base_lr": 0.1}}
    assert out == {"optim": {"base_lr": 0.5}, "model": {"hidden": [4]}}


def test_field_paths_cover_the_tree():
    paths = field_paths()
    assert "optim.base_lr" in paths and "schedule" in paths and "scaling.batch_per_worker" in paths
    assert "optim.lr" not in paths


def test_backbone_lr_mult_defaults_by_transfer_mode():
    assert TrainConfig.from_dict({"model": {"transfer": "finetune_last_n"}}).model.effective_backbone_lr_mult == 0.1
    assert TrainConfig.from_dict({"model": {"transfer": "full"}}).model.effective_backbone_lr_mult == 1.0
    assert TrainConfig.from_dict({"model": {"backbone_lr_mult": 0.5}}).model.effective_backbone_lr_mult == 0.5


@pytest.mark.parametrize("d,key,expected", [
    ({"precision": "fp8"}, "precision", "one of 'fp32', 'bf16', 'fp16'"),
    ({"precision": 16}, "precision", "one of 'fp32'"),
    ({"channels_last": "yes"}, "channels_last", "true or false"),
    ({"compile": "fast"}, "compile", "one of 'off', 'default', 'reduce-overhead', 'max-autotune'"),
    ({"data": {"loader_workers": -1}}, "data.loader_workers", "'auto' or >= 0"),
    ({"data": {"loader_workers": "many"}}, "data.loader_workers", "an integer or one of 'auto'"),
    ({"data": {"prefetch_factor": 0}}, "data.prefetch_factor", ">= 1"),
    ({"data": {"persistent_workers": 1}}, "data.persistent_workers", "true or false"),
])
def test_precision_kernel_and_pipeline_keys_are_validated(d, key, expected):
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict(d)
    assert e.value.key == key and expected in e.value.expected


def test_precision_kernel_and_pipeline_defaults_and_legal_combinations():
    cfg = TrainConfig()
    assert (cfg.precision, cfg.channels_last, cfg.compile) == ("fp32", False, "off")
    assert (cfg.data.loader_workers, cfg.data.prefetch_factor, cfg.data.persistent_workers) == ("auto", 2, True)
    # legal: channels_last on an MLP (a no-op), fp16 and compile without a GPU
    odd = TrainConfig.from_dict({"channels_last": True, "precision": "fp16", "compile": "reduce-overhead",
                                 "model": {"name": "mlp"}, "scaling": {"use_gpu": False},
                                 "data": {"loader_workers": 0}})
    assert TrainConfig.from_dict(odd.to_dict()) == odd
