"""The k-sweep plot (Goyal et al.'s Figure 1): each trial's error at its global batch, split by
whether it follows the linear scaling rule with gradual warmup, the best at each batch a line."""
from __future__ import annotations

import pytest

from tests.tuning.analysis.test_plots import assert_png, labelled_lines
from training.config import TrainConfig
from tuning.analysis import plots
from tuning.analysis.results import TrialRecord
from tuning.spec import Dist

BASE = TrainConfig.from_dict({"optim": {"lr_scaling": "linear"}, "scaling": {"num_workers": 2},
                              "schedule": {"warmup": "linear", "warmup_epochs": 2}})
SPACE = {"scaling.batch_per_worker": Dist("choice", (32, 128)), "schedule.warmup": Dist("choice", ("linear", "none"))}


def trial(i, batch, warmup, acc):
    return TrialRecord(str(i), f"run{i}", "completed", i, {"scaling.batch_per_worker": batch, "schedule.warmup": warmup},
                       [], metric=acc)


TRIALS = [trial(0, 32, "linear", 0.90), trial(1, 32, "linear", 0.80), trial(2, 128, "linear", 0.85),
          trial(3, 128, "none", 0.60), trial(4, 32, "none", None)]    # no score: left out


def test_points_carry_the_global_batch_the_error_and_the_rule():
    assert plots.k_sweep_points(TRIALS, BASE, "val_acc") == [
        (64, pytest.approx(10.0), True), (64, pytest.approx(20.0), True), (256, pytest.approx(15.0), True),
        (256, pytest.approx(40.0), False)]
    unscaled = BASE.with_updates({"optim.lr_scaling": "none"})
    assert {r for _, _, r in plots.k_sweep_points(TRIALS, unscaled, "val_acc")} == {False}
    assert plots.k_sweep_points(TRIALS[:1], BASE, "val_loss") == [(64, 0.90, True)]   # not an accuracy: as is


def test_the_figure_draws_the_best_per_batch_for_each_series(tmp_path):
    fig = plots.k_sweep_figure(plots.k_sweep_points(TRIALS, BASE, "val_acc"), baseline_batch=64)
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in labelled_lines(ax)}
    rule = lines["linear scaling + gradual warmup"]
    assert list(rule.get_xdata()) == [64, 256] and list(rule.get_ydata()) == pytest.approx([10.0, 15.0])
    assert list(lines["without the rule"].get_ydata()) == pytest.approx([40.0])
    assert "baseline batch 64" in lines and ax.get_xscale() == "log"
    assert sum(len(c.get_offsets()) for c in ax.collections) == 4      # every scored trial a point
    assert_png(plots.save(fig, tmp_path / "k.png"))


def test_k_sweep_plot_only_for_an_experiment_that_searches_the_batch(tmp_path):
    path = plots.k_sweep_plot(tmp_path, TRIALS, SPACE, BASE, "val_acc")
    assert path == tmp_path / "k_sweep.png"
    assert_png(path)
    assert plots.k_sweep_plot(tmp_path / "none", TRIALS, {"optim.base_lr": Dist("loguniform", (0.01, 1.0))},
                              BASE, "val_acc") is None
    assert not (tmp_path / "none").exists()
