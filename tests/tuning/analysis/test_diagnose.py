"""Learning-curve diagnosis: each kind on crafted histories, then on real short digits runs made
to show it (LR 10, zero init, a tiny training set without regularization, ...)."""
from __future__ import annotations

import json
import math

import pytest

from tests.conftest import sqlite_store
from tuning.analysis.diagnose import (EXPLODE_FACTOR, IMPROVING_RATE, KINDS, Diagnosis, diagnose, exploded, moving_average,
                             series, trend)


def h(train_loss, val_loss, train_acc, val_acc):
    """A history from per-epoch columns."""
    return [{"epoch": i + 1, "train_loss": a, "val_loss": b, "train_acc": c, "val_acc": d}
            for i, (a, b, c, d) in enumerate(zip(train_loss, val_loss, train_acc, val_acc))]


FLAT = [0.30, 0.30, 0.30, 0.30, 0.30, 0.30]
CRAFTED = {
    "diverged": [{"epoch": 1, "train_loss": 1.0, "val_loss": 0.9, "train_acc": 0.6, "val_acc": 0.7},
                 {"epoch": 6, "diverged": 1.0, "diverged_step": 57.0, "diverged_lr": 3.0, "val_acc": -math.inf}],
    "plateau_at_start": h([2.303, 2.302, 2.303, 2.301], [2.303] * 4, [0.1] * 4, [0.1] * 4),
    "no_learning": h([2.25], [2.28], [0.12], [0.10]),           # ASHA stopped it after 1 epoch, at chance
    "too_short": h([1.0, 0.6], [0.9, 0.55], [0.6, 0.8], [0.65, 0.82]),   # left chance; 2 epochs: no trend yet
    "overfitting": h([1.0, 0.5, 0.2, 0.05, 0.01, 0.005], [1.0, 0.6, 0.5, 0.55, 0.62, 0.70],
                     [0.7, 0.85, 0.95, 0.99, 1.0, 1.0], [0.7, 0.8, 0.84, 0.84, 0.83, 0.82]),
    "still_improving": h([2.0, 1.6, 1.2, 0.9], [1.9, 1.4, 1.0, 0.7], [0.4, 0.6, 0.75, 0.85], [0.45, 0.65, 0.8, 0.86]),
    "underfitting": h([1.5, 1.2, 1.1, 1.1, 1.1, 1.1], [1.5, 1.2, 1.1, 1.1, 1.1, 1.1],
                      [0.5, 0.6, 0.62, 0.62, 0.62, 0.62], [0.5, 0.6, 0.61, 0.62, 0.61, 0.61]),
    "healthy": h([0.5, 0.2, 0.1, 0.05, 0.05, 0.05], [0.4, 0.2, 0.12, 0.1, 0.1, 0.1],
                 [0.85, 0.95, 0.97, 0.99, 0.99, 0.99], [0.88, 0.94, 0.96, 0.97, 0.97, 0.97]),
}


def waiting(history, fractions, epoch_time_s=None):
    """``history`` with a data_wait_fraction (and an epoch time) per epoch."""
    return [{**e, "data_wait_fraction": w, **({} if epoch_time_s is None else {"epoch_time_s": epoch_time_s})}
            for e, w in zip(history, fractions)]


# healthy curves, and the step waited 40-60% of 10 s epochs for its batches
CRAFTED["input_bound"] = waiting(CRAFTED["healthy"], [0.6, 0.5, 0.5, 0.4, 0.5, 0.5], epoch_time_s=10.0)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_on_a_crafted_history(kind):
    d = diagnose(CRAFTED[kind], num_classes=10)
    assert d.kind == kind, d.describe()
    assert d.advice and d.evidence
    assert all(isinstance(v, (int, float)) for v in d.evidence.values())


def test_evidence_numbers():
    d = diagnose(CRAFTED["overfitting"])
    assert d.evidence["acc_gap"] == pytest.approx(0.18)
    assert d.evidence["best_val_loss_epoch"] == 3
    assert d.evidence["val_loss_rise"] == pytest.approx(0.70 / 0.5 - 1)
    d = diagnose(CRAFTED["diverged"])
    assert d.evidence["diverged_step"] == 57 and d.evidence["diverged_lr"] == 3.0
    d = diagnose(CRAFTED["still_improving"])
    assert d.evidence["val_loss_change_per_epoch"] < -0.01 and d.evidence["window_epochs"] == 3


def test_input_bound_thresholds_and_evidence():
    """Above 20% data wait (the mean over the epochs) and at least 1 s of it an epoch; the evidence says
    how much faster a fed step loop would be."""
    from tuning.analysis.data_wait import data_wait

    d = diagnose(CRAFTED["input_bound"], num_classes=10)
    assert d.evidence["data_wait_fraction"] == pytest.approx(0.5) and d.evidence["epochs"] == 6
    assert d.evidence["speedup_if_fed"] == pytest.approx(2.0) and d.evidence["wait_s_per_epoch"] == pytest.approx(5.0)
    assert "waited for its next batch 50% of the time" in d.advice and "data.loader_workers" in d.advice
    assert "Ray Data" in d.advice and d.advice.endswith("Its learning curves alone: healthy: converged with a small "
                                                        "train/val gap: nothing to fix")
    healthy = CRAFTED["healthy"]
    for fractions, epoch_s, kind in [([0.19] * 6, 10.0, "healthy"),        # at most 20%: not input bound
                                     ([0.21] * 6, 10.0, "input_bound"),
                                     ([0.1, 0.3] * 3, 10.0, "healthy"),    # the mean (20%) decides, not an epoch
                                     ([0.9] * 6, 1.0, "don't care"),       # 0.9 s an epoch: no time to win
                                     ([0.5] * 6, 0.1, "healthy"),          # a busy CPU's noise on 0.1 s epochs
                                     ([0.3] * 6, None, "input_bound")]:    # no epoch times: the fraction decides
        got = diagnose(waiting(healthy, fractions, epoch_s), num_classes=10)
        assert got.kind == (kind if kind != "don't care" else "healthy"), (fractions, epoch_s, got.describe())
    assert data_wait(waiting(healthy, [0.2, 0.4, math.nan, 0.6, 0.2, 0.4])) == pytest.approx(0.36)
    assert data_wait(healthy) is None and data_wait([]) is None


def test_the_results_table_shows_each_trials_data_wait():
    from tests.conftest import ROOT
    from tuning.analysis.report import results_table
    from tuning.analysis.results import ExperimentResult, TrialRow
    from tuning.spec import load_spec

    spec = load_spec(ROOT / "search_spaces/quickstart.yaml")
    rows = [TrialRow("a_00000", "completed", 6, 0.97, {}, diagnosis="input_bound", data_wait=0.625),
            TrialRow("a_00001", "failed", 0, None, {})]                      # no epoch: no figure
    table = results_table(ExperimentResult("q", "/r", rows, "sqlite:///x.db"), spec).splitlines()
    head = [c.strip() for c in table[0].strip("|").split("|")]
    assert head[:7] == ["trial", "status", "epochs", "val_acc", "diagnosis", "data wait", "worker-s"]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:4]]
    assert (cells[0][4], cells[0][5]) == ("input_bound", "62%") and cells[1][5] == "-"


def test_input_bound_comes_after_the_broken_kinds_and_before_the_trends():
    """A diverged, flat-from-the-start or at-chance trial keeps its verdict however long it waited;
    the trend verdicts give way to input_bound, and its advice ends with theirs."""
    for kind in ("diverged", "plateau_at_start", "no_learning"):
        assert diagnose(waiting(CRAFTED[kind], [0.9] * 6, 10.0), num_classes=10).kind == kind
    for kind in ("too_short", "overfitting", "still_improving", "underfitting", "healthy"):
        d = diagnose(waiting(CRAFTED[kind], [0.9] * 6, 10.0), num_classes=10)
        assert d.kind == "input_bound" and f"Its learning curves alone: {kind}: " in d.advice, kind
        assert d.evidence["data_wait_fraction"] == pytest.approx(0.9)


def test_exploding_loss_without_nan_is_diverged():
    # per-step: the loss jumps from ~ln C to 30x it and comes back down within the epoch
    steps = [2.3, 2.2, 2.1, 50.0, 70.0, 60.0, 20.0, 5.0, 3.0, 2.5, 2.4, 2.4]
    hist = h([4.0, 2.35], [2.4, 2.3], [0.1, 0.1], [0.1, 0.1])
    assert diagnose(hist).kind != "diverged"        # the epoch means alone cannot see it
    d = diagnose(hist, step_losses=steps, num_classes=10)
    assert d.kind == "diverged" and d.evidence["ratio"] > EXPLODE_FACTOR
    # per epoch: a training loss above 3 ln C (the loss at init) is an explosion
    assert diagnose(h([7.5, 3.0], [3.0, 2.5], [0.1, 0.1], [0.1, 0.1]), num_classes=10).kind == "diverged"
    # non-finite losses and NaN steps
    assert diagnose(h([1.0, math.nan], [1.0, 1.0], [0.5, 0.5], [0.5, 0.5])).kind == "diverged"
    assert exploded([2.3, 2.2, math.inf]) == {"nonfinite_at": 2}
    assert exploded([2.3, 2.0, 1.5, 1.0]) is None


def test_underfitting_needs_both_loss_curves_flat():
    """Close curves and train_acc < 0.9 are underfitting only while neither loss moves IMPROVING_RATE
    per epoch at the end; a validation loss rising 3.7%/epoch with a 2-point gap is not."""
    settled = [1.5, 1.2, 1.1, 1.1, 1.1, 1.1]          # the training loss fell, then flat
    rising = h(settled, [1.10, 1.10, 1.12, 1.16, 1.20, 1.25], [0.62] * 6, [0.60] * 6)
    rate, _ = trend(series(rising, "val_loss"))
    assert rate == pytest.approx(0.045 / (3.61 / 3)) and rate > IMPROVING_RATE
    d = diagnose(rising)
    assert d.kind not in ("underfitting", "overfitting", "still_improving")
    assert d.evidence["val_loss_rise"] == pytest.approx(1.25 / 1.10 - 1) and "nothing to fix" not in d.advice
    creeping = h(settled, [1.100, 1.100, 1.100, 1.105, 1.110, 1.115], [0.62] * 6, [0.60] * 6)   # 0.45%/epoch
    d = diagnose(creeping)
    assert d.kind == "underfitting" and 0 < d.evidence["val_loss_change_per_epoch"] < IMPROVING_RATE
    assert d.evidence["train_loss_change_per_epoch"] == 0.0
    train_falls = h([1.3, 1.25, 1.2, 1.15, 1.1, 1.05], [1.1] * 6, [0.62] * 6, [0.60] * 6)   # ~4%/epoch
    assert diagnose(train_falls).kind != "underfitting"


def test_helpers():
    assert moving_average([1, 2, 3, 4, 5], 3) == [1.5, 2, 3, 4, 4.5]
    assert trend([1.0, 1.0, 1.0, 1.0]) == (0.0, 3)
    rate, window = trend([10.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0])
    assert window == 3 and rate == pytest.approx(-1 / 4)        # slope -1 over a mean of 4
    assert series([{"a": 1}, {"a": math.nan}, {"b": 2}, {"a": 3.0}], "a") == [1.0, 3.0]


def test_short_histories_and_json():
    one = diagnose(h([1.0], [0.9], [0.6], [0.65]), num_classes=10)
    assert one.kind == "too_short" and "1 epoch shows no trend" in one.advice and "it left chance (65.0%" in one.advice
    assert diagnose(h([1.0], [0.9], [0.6], [0.65])).kind == "too_short"   # without C: nothing to compare with chance
    assert diagnose([]).kind == "too_short" and diagnose([]).evidence == {"epochs": 0}
    # two epochs that fall: too short for a trend (a third makes one: still improving)
    assert diagnose(CRAFTED["still_improving"][:2], num_classes=10).kind == "too_short"
    assert diagnose(CRAFTED["still_improving"][:3], num_classes=10).kind == "still_improving"


def test_a_short_trial_at_chance_is_no_learning():
    """At C = 10: chance is 10%, and 'at chance' ends at 10% + 5% of the way to 100% = 14.5% (~3 sigma of
    a random classifier on 360 validation samples); at C = 2, at 52.5%; at C = 100, at 1.5x chance = 1.5%."""
    d = diagnose(CRAFTED["no_learning"], num_classes=10)
    assert d.kind == "no_learning" and "after 1 epoch" in d.advice
    assert d.evidence["chance_acc"] == pytest.approx(0.1) and d.evidence["val_acc"] == 0.10
    assert d.evidence["ln_num_classes"] == pytest.approx(math.log(10))
    for acc, c, kind in [(0.144, 10, "no_learning"), (0.146, 10, "too_short"), (0.52, 2, "no_learning"),
                         (0.53, 2, "too_short"), (0.0149, 100, "no_learning"), (0.0151, 100, "too_short")]:
        assert diagnose(h([2.0], [2.0], [acc], [acc]), num_classes=c).kind == kind, (acc, c)
    # without an accuracy: a validation loss within 5% of ln C (2.19 at C = 10) is a near-uniform prediction
    assert diagnose([{"epoch": 1, "train_loss": 2.3, "val_loss": 2.25}], num_classes=10).kind == "no_learning"
    assert diagnose([{"epoch": 1, "train_loss": 2.3, "val_loss": 2.1}], num_classes=10).kind == "too_short"
    # two epochs at chance
    assert diagnose(h([2.30, 2.25], [2.29, 2.27], [0.1, 0.11], [0.1, 0.12]), num_classes=10).kind == "no_learning"
    # 3 epochs: at chance on both splits (the loss fell 2%, not a plateau) was "healthy" before
    assert diagnose(h([2.30, 2.27, 2.25], [2.29, 2.27, 2.25], [0.1] * 3, [0.1] * 3), num_classes=10).kind == "no_learning"
    # ... but a model that fits its training set and not validation is not "no learning" once it is long enough
    memorized = h([1.5, 0.8, 0.3], [2.3, 2.4, 2.6], [0.5, 0.8, 0.95], [0.1, 0.1, 0.1])
    assert diagnose(memorized, num_classes=10).kind == "overfitting"
    assert diagnose(memorized[:2], num_classes=10).kind == "no_learning"   # short: validation decides


def test_a_trial_stopped_after_one_epoch_is_read_from_its_steps():
    """ASHA stops most trials at their first rung: one epoch, but 20+ per-step losses."""
    one = h([2.29], [2.29], [0.11], [0.10])
    flat = [2.303 - 0.0005 * i for i in range(22)]            # 0.5% down over the epoch: LR far too low
    d = diagnose(one, step_losses=flat, num_classes=10)
    assert d.kind == "plateau_at_start"
    assert d.evidence["steps"] == 22 and d.evidence["first_steps_loss"] == pytest.approx(2.302)
    learned = h([1.2], [0.9], [0.7], [0.75])
    learning = [2.3 * 0.95 ** i for i in range(22)]              # falls 66%: a healthy first epoch
    assert diagnose(learned, step_losses=learning, num_classes=10).kind == "too_short"
    # too few steps to read, and the history alone is at chance (the 1-epoch trial at 10%)
    assert diagnose(one, step_losses=flat[:8], num_classes=10).kind == "no_learning"
    pretrained = [0.5] * 22                                   # flat but far below ln C: already learned
    assert diagnose(h([0.5], [0.5], [0.85], [0.84]), step_losses=pretrained, num_classes=10).kind == "too_short"
    d = Diagnosis("x", {"a": 0.123456789, "n": 3, "inf": math.inf})
    assert json.loads(d.evidence_json()) == {"a": 0.1235, "n": 3, "inf": "inf"}
    assert len(Diagnosis("x", {f"k{i}": 1.0 for i in range(200)}).evidence_json()) <= 480


# ----------------------------------------------------------------------------- real runs

BASE = {"epochs": 6, "seed": 0, "data": {"name": "digits"}, "model": {"name": "mlp", "hidden": [64]},
        "optim": {"name": "sgd", "base_lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
        "schedule": {"name": "cosine", "warmup": "linear", "warmup_epochs": 1},
        "scaling": {"batch_per_worker": 32}}
CONSTANT = {"schedule.name": "constant", "schedule.warmup": "none"}
# Each run is made to show one diagnosis (measured: < 1 s each on one thread).
RUNS = {
    "diverged": {"optim.base_lr": 10.0, "epochs": 3},
    "plateau_at_start": {"model.init": "zero", "epochs": 4},
    # zero init: no gradient, so still at chance; batch 256 gives 5 steps, too few to read a plateau from
    "no_learning": {"model.init": "zero", "epochs": 1, "scaling.batch_per_worker": 256},
    "too_short": {"epochs": 1},                                    # a first epoch that learned (~90% val)
    "overfitting": {"data.num_samples": 100, "optim.weight_decay": 0.0, "epochs": 20, "schedule.name": "constant"},
    "still_improving": {"optim.base_lr": 0.003, "epochs": 3, **CONSTANT},
    "underfitting": {"optim.weight_decay": 0.3, "epochs": 25},      # far too much regularization
    "healthy": {"epochs": 20},
    # 256 training samples of a dataset whose every item comes 10 ms late (tests/training/test_pipeline.Slow),
    # through no loader process: the step waits ~2.6 s of each ~3 s epoch
    "input_bound": {"data.num_samples": 320, "model.hidden": [256], "epochs": 2},
}
SLOW_ITEM_S = {"input_bound": 0.01}


@pytest.fixture
def one_thread():
    """Tiny models: one torch thread is fastest, and immune to other processes on the cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def real_run(updates: dict, monkeypatch=None, slow_item_s: float = 0.0):
    """A real fit of BASE with ``updates``; its history and per-step losses. ``slow_item_s``: every
    training sample that late (the loop's data loading patched to wrap the training split)."""
    import dataclasses

    from training import loop
    from training.config import TrainConfig
    from training.data import load_data
    from training.loop import Diverged, fit

    cfg = TrainConfig.from_dict(BASE).with_updates(updates)
    if slow_item_s:
        from tests.training.test_pipeline import Slow

        bundle = load_data(cfg.data)
        slow = dataclasses.replace(bundle, train=Slow(bundle.train, slow_item_s))
        monkeypatch.setattr(loop, "load_data", lambda data_cfg: slow)
    try:
        r = fit(cfg)
    except Diverged as e:       # what a trial reports (tuning.driver.trial._diverged_metrics)
        return [{"epoch": cfg.epochs, "diverged": 1.0, "diverged_step": e.step, "diverged_lr": e.lr}], None
    return r.history, r.trace["loss"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_on_a_real_run(kind, one_thread, monkeypatch):
    history, steps = real_run(RUNS[kind], monkeypatch, SLOW_ITEM_S.get(kind, 0.0))
    d = diagnose(history, step_losses=steps, num_classes=10)
    assert d.kind == kind, d.describe()
    if kind == "diverged":       # LR 10 blows the loss up in the first epoch (no NaN: it comes back)
        assert d.evidence["max_loss"] > EXPLODE_FACTOR * math.log(10)
    if kind == "plateau_at_start":
        assert d.evidence["flat_epochs"] == 4 and d.evidence["update_ratio"] == 0.0   # zero init: no gradient
        assert d.evidence["train_loss"] == pytest.approx(math.log(10), abs=0.01)
    if kind == "overfitting":
        assert history[-1]["train_acc"] == 1.0 and d.evidence["acc_gap"] > 0.05
    if kind == "healthy":
        assert history[-1]["val_acc"] >= 0.97
    if kind == "no_learning":
        assert len(steps) == 5 and d.evidence["val_loss"] == pytest.approx(math.log(10), abs=0.01)
    if kind == "too_short":
        assert d.evidence["epochs"] == 1 and d.evidence["val_acc"] > 0.5
    if kind == "input_bound":   # the fit measured it (training.measure); 2 epochs that learned: too short for a trend
        assert all(e["data_wait_fraction"] > 0.5 for e in history) and d.evidence["wait_s_per_epoch"] > 1.0
        assert history[-1]["val_acc"] > 0.5 and "Its learning curves alone: too_short: " in d.advice
    else:                       # in-memory digits: its fraction may be anything on a busy CPU, its seconds are few
        assert "data_wait_fraction" in history[-1] or kind == "diverged"


def test_a_flat_loss_far_below_chance_is_not_an_init_plateau():
    frozen = h([0.30] * 4, [0.32] * 4, [0.95] * 4, [0.94] * 4)     # e.g. a linear probe on a pretrained backbone
    assert diagnose(frozen).kind == "plateau_at_start"             # without C it cannot tell
    assert diagnose(frozen, num_classes=10).kind == "healthy"


def test_the_tracker_tags_each_trial_with_its_diagnosis_and_logs_plots(tmp_path, one_thread):
    """MLflowTracker (no Ray needed): per-epoch results in, at the end a diagnosis tag, its evidence,
    and plots/ made from the last checkpoint's trace.json; a tracker pickled before these fields
    existed resumes with them."""
    import pickle
    from types import SimpleNamespace

    import mlflow

    from training.config import TrainConfig
    from training.loop import fit
    from tuning.spec import load_spec
    from tuning.tracking.callback import MLflowTracker
    from tests.conftest import ROOT

    uri = sqlite_store(tmp_path / "mlflow.db")
    tracker = MLflowTracker(load_spec(ROOT / "search_spaces/quickstart.yaml"), uri, str(tmp_path / "run"),
                            str(tmp_path / "run/train"))
    tracker.setup()
    trial = SimpleNamespace(trial_id="t0", config={}, path=str(tmp_path / "t0"), error_file=None)
    tracker.on_trial_start(0, [], trial)
    cfg = TrainConfig.from_dict(BASE).with_updates(RUNS["plateau_at_start"])
    for m in fit(cfg, workdir=trial.path).history:            # checkpoints (with trace.json) under trial.path
        tracker.on_trial_result(0, [], trial, {**m, "training_iteration": m["epoch"]})
    tracker.on_trial_complete(0, [], trial)
    tracker.settle()        # the tracker's thread ends trial runs; the driver's end waits for it the same way
    run = mlflow.MlflowClient(uri).get_run(tracker._children["t0"])
    assert run.data.tags["schedtune.diagnosis"] == "plateau_at_start" == tracker.diagnoses["t0"].kind
    assert json.loads(run.data.tags["schedtune.diagnosis_evidence"])["flat_epochs"] == 4
    plots = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/loss.png", "plots/accuracy.png", "plots/lr.png", "plots/update_ratio.png"}

    old = tracker.__getstate__()
    for k in ("_history", "diagnoses"):
        old.pop(k)
    restored = pickle.loads(pickle.dumps(old))
    fresh = MLflowTracker.__new__(MLflowTracker)
    fresh.__setstate__(restored)
    assert fresh._history == {} and fresh.diagnoses == {} and fresh._children == tracker._children


def test_the_recipe_says_what_to_do_next_for_every_kind_but_healthy():
    from tuning.recipe.recipe import NEXT

    assert set(NEXT) == set(KINDS) - {"healthy"}
