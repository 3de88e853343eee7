"""The semantic checks (tuning.spec.checks): each error names the file, the key and what was
expected; each warning says why; every config the space can produce is checked. Most are asserted
on load_spec; the CLI runs as a real process once per kind of outcome (exit 2 and no Ray; a
warning and exit 0), and `schedtune validate` of the quickstart imports no torch."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import yaml

from training.config import apply_dotted
from tuning import cli
from tuning.spec import SpaceError, load_spec
from tuning.spec.checks import PEAK_LR_BOUND, TPE_STARTUP_TRIALS

# digits: 1797 samples, 1437 to train (sklearn holds out ceil(0.2 * 1797) = 360): 44 steps of 32 per epoch.
BASE = {"experiment": {"name": "t", "metric": "val_acc", "mode": "max", "num_samples": 4,
                       "scheduler": {"name": "asha", "grace_period": 1}},
        "train": {"epochs": 5, "data": {"name": "digits"}, "model": {"name": "mlp", "hidden": [16]},
                  "optim": {"name": "sgd", "base_lr": 0.1},
                  "schedule": {"name": "cosine", "warmup": "linear", "warmup_epochs": 1},
                  "scaling": {"num_workers": 1, "batch_per_worker": 32}},
        "space": {"optim.base_lr": {"loguniform": [1e-3, 1.0]}}}


def doc_with(sets: dict | None = None, space: dict | None = None) -> dict:
    doc = apply_dotted(copy.deepcopy(BASE), sets or {})
    if space is not None:
        doc["space"] = space
    return doc


def spec_of(tmp_path, sets=None, space=None, name="s.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc_with(sets, space), sort_keys=False))
    return load_spec(path)


def error(tmp_path, sets=None, space=None) -> SpaceError:
    with pytest.raises(SpaceError) as e:
        spec_of(tmp_path, sets, space)
    assert e.value.file == str(tmp_path / "s.yaml")
    return e.value


def warnings(tmp_path, sets=None, space=None) -> dict[str, str]:
    """{key: why} of the spec's warnings."""
    return {w.key: w.why for w in spec_of(tmp_path, sets, space).warnings}


def test_the_base_and_every_shipped_file_load_without_a_warning(tmp_path):
    from tests.conftest import ROOT

    assert spec_of(tmp_path).warnings == []
    for path in sorted((ROOT / "search_spaces").glob("*.yaml")):
        assert load_spec(path).warnings == [], path.name


# ----------------------------------------------------------------------------- errors


def test_a_metric_the_loop_never_reports(tmp_path):
    e = error(tmp_path, {"experiment.metric": "val_f1"})
    assert e.key == "experiment.metric" and e.value == "val_f1"
    assert "reports every epoch" in e.expected and "samples_per_s" in e.expected and "'val_acc'" in e.expected
    e = error(tmp_path, {"train.checkpoint.metric": "val_accuracy"})
    assert e.key == "train.checkpoint.metric" and "(did you mean 'val_acc'?)" in e.expected


def test_a_metric_of_the_last_epoch_only(tmp_path):
    e = error(tmp_path, {"experiment.metric": "snapshot_ensemble_val_acc", "train.schedule.name": "cyclic_cosine"})
    assert e.key == "experiment.metric" and "last epoch only" in e.expected
    assert error(tmp_path, {"experiment.metric": "snapshot_ensemble_val_acc"}).key == "experiment.metric"


def test_an_ema_metric_needs_ema_in_every_trial(tmp_path):
    e = error(tmp_path, {"experiment.metric": "ema_val_acc"})
    assert e.key == "experiment.metric" and "train.regularization.ema_decay = 0.0" in e.expected
    on = {"experiment.metric": "ema_val_acc", "train.regularization.ema_decay": 0.99}
    e = error(tmp_path, on, {"regularization.ema_decay": {"choice": [0.0, 0.99]}})   # one of its values turns EMA off
    assert "space.regularization.ema_decay = 0.0" in e.expected
    assert spec_of(tmp_path, {**on, "train.checkpoint.metric": "ema_val_acc"},
                   {"regularization.ema_decay": {"uniform": [0.9, 0.999]}}).warnings == []


@pytest.mark.parametrize("metric,mode,key", [("val_loss", "max", "experiment.mode"), ("val_acc", "min", "experiment.mode"),
                                             ("samples_per_s", "min", "experiment.mode")])
def test_a_mode_against_the_metrics_direction(tmp_path, metric, mode, key):
    e = error(tmp_path, {"experiment.metric": metric, "experiment.mode": mode,
                         "train.checkpoint": {"metric": metric, "mode": "min" if mode == "max" else "max"}})
    assert e.key == key and e.value == mode and "rank the worst trial best" in e.expected
    e = error(tmp_path, {"train.checkpoint.mode": "min"})   # val_acc, the default checkpoint metric
    assert e.key == "train.checkpoint.mode"
    # a metric without a direction: the checkpoint must still agree with the experiment
    e = error(tmp_path, {"experiment.metric": "grad_norm", "experiment.mode": "min",
                         "train.checkpoint": {"metric": "grad_norm", "mode": "max"}})
    assert e.key == "train.checkpoint.mode" and "worst epoch" in e.expected


def test_an_asha_grace_period_beyond_max_t_and_epochs_searched_past_it(tmp_path):
    e = error(tmp_path, {"experiment.scheduler.grace_period": 6})
    assert (e.key, e.value) == ("experiment.scheduler.grace_period", 6) and "at most train.epochs (5)" in e.expected
    e = error(tmp_path, space={"epochs": {"choice": [3, 8]}})
    assert (e.key, e.value) == ("space.epochs", 8) and "stops every trial at epoch 5" in e.expected
    fifo = spec_of(tmp_path, {"experiment.scheduler": {"name": "fifo"}, "experiment.num_samples": 2},
                   {"epochs": {"choice": [3, 8]}})
    assert fifo.warnings == []


def test_a_global_batch_larger_than_the_training_set(tmp_path):
    e = error(tmp_path, {"train.scaling.batch_per_worker": 1438})
    assert (e.key, e.value) == ("train.scaling.batch_per_worker", 1438) and "the 1437 training samples" in e.expected
    spec_of(tmp_path, {"train.scaling.batch_per_worker": 1437})   # one step per epoch: valid
    e = error(tmp_path, {"train.scaling.batch_per_worker": 256}, {"scaling.num_workers": {"choice": [1, 8]}})
    assert (e.key, e.value) == ("space.scaling.num_workers", 8) and "256 x 8 x 1 = 2048" in e.expected
    e = error(tmp_path, {"train.data": {"name": "synthetic", "num_samples": 100}, "train.scaling.batch_per_worker": 81})
    assert "the 80 training samples of synthetic" in e.expected


def test_values_valid_alone_but_not_together(tmp_path):
    e = error(tmp_path, space={"optim.momentum": {"choice": [0.0, 0.9]}, "optim.nesterov": {"choice": [False, True]}})
    assert (e.key, e.value) == ("space.optim.nesterov", True)
    assert "space.optim.momentum = 0.0" in e.expected and "nesterov needs momentum" in e.expected


def test_a_model_that_cannot_take_the_data_or_the_regularizer(tmp_path):
    e = error(tmp_path, {"train.data.name": "synthetic", "train.model.name": "small_cnn"})
    assert (e.key, e.value) == ("train.model.name", "small_cnn") and "(C, H, W) images" in e.expected
    e = error(tmp_path, {"train.data.name": "mnist1d"}, {"model.name": {"choice": ["mlp", "resnet18"]}})
    assert (e.key, e.value) == ("space.model.name", "resnet18")
    e = error(tmp_path, space={"regularization.stochastic_depth": {"choice": [0.0, 0.1]}})
    assert (e.key, e.value) == ("space.regularization.stochastic_depth", 0.1) and "residual blocks" in e.expected


@pytest.mark.parametrize("sets,key,near", [({"train.data.name": "digitz"}, "train.data.name", "'digits'"),
                                           ({"train.model.name": "resnet34"}, "train.model.name", "'resnet")])
def test_a_registry_name_that_does_not_exist(tmp_path, sets, key, near):
    e = error(tmp_path, sets)
    assert e.key == key and f"(did you mean {near}" in e.expected


def test_plugin_names_resolve_in_every_combination(tmp_path):
    """Each value alone resolves (tuning.spec.code); together, model.args.width reaches a factory without it."""
    (tmp_path / "mymodels.py").write_text("def wide(width=8, num_classes=10):\n    pass\n\n"
                                          "def plain(num_classes=10):\n    pass\n")
    space = {"model.name": {"choice": ["mymodels:plain", "mymodels:wide"]}, "model.args.width": {"choice": [4, 8]}}
    e = error(tmp_path, {"train.model": {"name": "mymodels:wide", "hidden": [16]}}, space)
    assert (e.key, e.value) == ("space.model.args.width", 4) and "a keyword argument of mymodels:plain" in e.expected
    ok = spec_of(tmp_path, {"train.model": {"name": "mymodels:wide", "hidden": [16]}, "experiment.num_samples": 2},
                 {"model.args.width": {"choice": [4, 8]}})
    assert ok.warnings == [] and ok.code_dir == str(tmp_path)


# ----------------------------------------------------------------------------- warnings


def test_warmup_as_long_as_training(tmp_path):
    w = warnings(tmp_path, space={"schedule.warmup_epochs": {"uniform": [0.5, 10]}})   # 10 of 5 epochs
    assert "(440 steps) as long as training (220 steps)" in w["space.schedule.warmup_epochs"]
    assert warnings(tmp_path, space={"schedule.warmup_epochs": {"uniform": [0.5, 4.9]}}) == {}
    w = warnings(tmp_path, {"train.schedule.warmup_steps": 220})   # in steps: 5 epochs x 44
    assert "warmup (220 steps) as long as training (220 steps)" in w["train.schedule.warmup_steps"]
    assert warnings(tmp_path, {"train.schedule.warmup_steps": 219}) == {}
    w = warnings(tmp_path, {"train.epochs": 1})   # warmup_epochs 1 of the base
    assert "train.schedule.warmup_epochs" in w
    # a dataset of unknown size: read in epochs
    folder = {"train.data": {"name": "imagefolder", "root": str(tmp_path)}, "train.schedule.warmup_epochs": 5}
    assert "(5 epochs) as long as training (5 epochs)" in warnings(tmp_path, folder)["train.schedule.warmup_epochs"]
    w = warnings(tmp_path, {"train.schedule.warmup": "none", "train.schedule.warmup_epochs": 2})
    assert "is ignored: schedule.warmup is none" in w["train.schedule.warmup_epochs"]


def test_an_asha_grace_period_at_the_last_epoch(tmp_path):
    w = warnings(tmp_path, {"experiment.scheduler.grace_period": 5})
    assert "stops nothing early" in w["experiment.scheduler.grace_period"]
    w = warnings(tmp_path, {"experiment.scheduler.grace_period": 2}, {"epochs": {"choice": [2, 5]},
                                                                      "optim.base_lr": {"loguniform": [1e-3, 1.0]}})
    assert "the shortest trial (2)" in w["experiment.scheduler.grace_period"]
    assert warnings(tmp_path, {"experiment.scheduler.grace_period": 4}) == {}


def test_a_checkpoint_metric_other_than_the_experiments(tmp_path):
    w = warnings(tmp_path, {"experiment.metric": "val_loss", "experiment.mode": "min"})   # checkpoint: val_acc
    assert "trials are ranked by val_loss, but each keeps" in w["train.checkpoint.metric"]
    both = {"experiment.metric": "val_loss", "experiment.mode": "min",
            "train.checkpoint": {"metric": "val_loss", "mode": "min"}}
    assert warnings(tmp_path, both) == {}
    w = warnings(tmp_path, {"experiment.metric": "train_loss", "experiment.mode": "min",
                            "train.checkpoint": {"metric": "train_loss", "mode": "min"}})
    assert "prefers the configs that overfit" in w["experiment.metric"]


def test_a_peak_lr_beyond_what_the_optimizer_trains_at(tmp_path):
    linear = {"train.optim.lr_scaling": "linear", "train.optim.reference_batch": 32, "train.scaling.batch_per_worker": 256}
    w = warnings(tmp_path, linear)   # base_lr up to 1.0 x 256 / 32 = 8 > 3.2
    assert PEAK_LR_BOUND["sgd"] == 3.2
    assert "gives a peak LR of 8 (base_lr 1 x global batch 256 / reference_batch 32), above 3.2" in w["space.optim.base_lr"]
    assert warnings(tmp_path, {**linear, "train.optim.lr_scaling": "sqrt"}) == {}   # 1.0 x sqrt(8) = 2.83
    w = warnings(tmp_path, {"train.optim.name": "adamw"}, {"optim.base_lr": {"loguniform": [1e-4, 3.0]}})
    assert "peak LR of 3 (base_lr 3), above 1" in w["space.optim.base_lr"]
    assert warnings(tmp_path, {"train.optim.name": "lars"}, {"optim.base_lr": {"loguniform": [1e-4, 30.0]}}) == {}


def test_trials_that_can_only_repeat_a_config(tmp_path):
    w = warnings(tmp_path, {"experiment.search": "grid"}, {"optim.base_lr": {"grid": [0.01, 0.1]}})
    assert "4 gives 8 trials over at most 2 different configs: 6 repeat" in w["experiment.num_samples"]
    assert "at most 1 different config: 3 repeat" in warnings(tmp_path, space={})["experiment.num_samples"]
    w = warnings(tmp_path, space={"model.hidden": {"choice": [[8], [16]]}})
    assert "at most 2 different configs" in w["experiment.num_samples"]
    assert warnings(tmp_path, {"experiment.num_samples": 2}, {"model.hidden": {"choice": [[8], [16]]}}) == {}
    assert warnings(tmp_path, space={"epochs": {"int": [2, 5]}}) == {}   # 4 values, 4 samples


def test_a_tpe_search_too_short_to_leave_its_random_start(tmp_path):
    n = TPE_STARTUP_TRIALS
    w = warnings(tmp_path, {"experiment.search": "optuna_tpe", "experiment.num_samples": n})
    assert "first 10 trials at random" in w["experiment.search"]
    assert warnings(tmp_path, {"experiment.search": "optuna_tpe", "experiment.num_samples": n + 1}) == {}


def test_a_searched_key_that_changes_nothing(tmp_path):
    w = warnings(tmp_path, {"experiment.num_samples": 1}, {"optim.base_lr": {"choice": [0.1]}})
    assert w == {"space.optim.base_lr": "searches nothing: every value gives the same config as train's "
                                        "(set it in train instead)"}
    w = warnings(tmp_path, {"experiment.num_samples": 1}, {"model.dropout": {"choice": [0.2, 0.2]}})
    assert w["space.model.dropout"].startswith("searches nothing: every value gives the same config (")
    w = warnings(tmp_path, {"train.optim.name": "adamw"}, {"optim.momentum": {"uniform": [0.5, 0.9]}})
    assert "no trial reads it (only sgd and lars read it; every trial has optim.name 'adamw')" in w["space.optim.momentum"]
    either = {"optim.momentum": {"uniform": [0.5, 0.9]}, "optim.name": {"choice": ["adamw", "sgd"]}}
    assert warnings(tmp_path, space=either) == {}
    w = warnings(tmp_path, {"train.model.name": "small_cnn"}, {"model.hidden": {"choice": [[8], [16]]},
                                                               "optim.base_lr": {"loguniform": [1e-3, 1.0]}})
    assert "only mlp reads it" in w["space.model.hidden"]


# ----------------------------------------------------------------------------- the CLI


def test_validate_and_tune_print_the_warnings_and_go_on(tmp_path, capsys, monkeypatch):
    import signal

    monkeypatch.setattr(signal, "signal", lambda *a: None)   # cli.main's SIGTERM handler stays out of pytest
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(doc_with({"experiment.scheduler.grace_period": 5})))
    assert cli.main(["validate", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{path}: OK")
    assert err.startswith(f"schedtune validate: warning: {path}: experiment.scheduler.grace_period: 5 is at or beyond")
    assert err.count("\n") == 1

    from tuning.driver import experiment

    class Started(Exception):
        pass

    def start(spec, **kw):
        raise Started(spec.warnings)

    monkeypatch.setattr(experiment, "run_experiment", start)
    with pytest.raises(Started):
        cli.main(["tune", str(path), "--storage", str(tmp_path / "r"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    assert capsys.readouterr().err.startswith("schedtune tune: warning: ")


def test_tune_on_each_kind_of_error_exits_2_and_no_ray_process_starts(tmp_path):
    from tests.tuning.cli.test_bad_input import _ray_dirs, run_harness

    cases = {"metric": ({"experiment.metric": "val_f1"}, None, "experiment.metric", "reports every epoch"),
             "mode": ({"experiment.metric": "val_loss"}, None, "experiment.mode", "min for val_loss"),
             "grace": ({"experiment.scheduler.grace_period": 9}, None, "experiment.scheduler.grace_period", "at most"),
             "batch": ({"train.scaling.batch_per_worker": 4096}, None, "train.scaling.batch_per_worker", "fits the"),
             "together": ({}, {"optim.momentum": {"choice": [0.0, 0.9]}, "optim.nesterov": {"choice": [True]}},
                          "space.optim.nesterov", "valid together"),
             "name": ({"train.data.name": "digitz"}, None, "train.data.name", "did you mean 'digits'")}
    tracking = ["--storage", str(tmp_path / "results"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    argv = []
    for stem, (sets, space, _, _) in cases.items():
        (tmp_path / f"{stem}.yaml").write_text(yaml.safe_dump(doc_with(sets, space)))
        argv.append(["tune", str(tmp_path / f"{stem}.yaml"), *tracking])
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(BASE))
    argv.append(["tune", str(good), *tracking, "--set", "train.model.name=resnet34"])
    argv.append(["validate", str(tmp_path / "warn.yaml")])
    (tmp_path / "warn.yaml").write_text(yaml.safe_dump(doc_with({"experiment.scheduler.grace_period": 5})))
    code, out, names = run_harness(argv, tmp_path)
    assert code == 0, out.get("ray_launch", out)
    assert not names & {"raylet", "gcs_server", "ray"} and out["children"] == []
    expect = [(f"{tmp_path / stem}.yaml", key, said) for stem, (_, _, key, said) in cases.items()]
    expect.append((str(good), "train.model.name", "did you mean 'resnet"))
    *errors, warned = out["results"]
    for r, (file, key, said) in zip(errors, expect, strict=True):
        assert r["code"] == 2 and "Traceback" not in r["stderr"], r
        assert r["stderr"].startswith(f"schedtune tune: error: {file}: {key}: got ") and said in r["stderr"], r
        assert [s for s in r["seen"] if "launch" in s] == [] and _ray_dirs(r["seen"]) == [], r
    assert warned["code"] == 0 and "schedtune validate: warning: " in warned["stderr"], warned
    assert not (tmp_path / "results").exists() and not (tmp_path / "m.db").exists()


def test_validating_the_quickstart_imports_no_torch():
    from tests.conftest import ROOT

    code = ("import sys, json; from tuning.cli import main; rc = main(['validate', sys.argv[1]]); "
            "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules}))")
    p = subprocess.run([sys.executable, "-c", code, str(ROOT / "search_spaces/quickstart.yaml")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert json.loads(p.stdout.splitlines()[-1]) == {"rc": 0, "torch": False}, p.stderr
