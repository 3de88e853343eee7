"""Plots: each figure has the expected series; the files are valid PNGs; `schedtune report`
against a real experiment in a real mlflow server writes them and prints the diagnosis table."""
from __future__ import annotations

import math

import pytest
from PIL import Image

from tuning.analysis import plots
from tuning.spec import Dist


def labelled_lines(ax):
    return [line for line in ax.get_lines() if not line.get_label().startswith("_")]


def assert_png(path, min_side=200):
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
    with Image.open(path) as im:
        assert min(im.size) >= min_side


HISTORY = [{"epoch": e, "train_acc": 0.5 + 0.1 * e, "val_acc": 0.55 + 0.08 * e, "train_loss": 1 / e,
            "val_loss": 1.1 / e} for e in range(1, 5)]
TRACE = {"loss": [2.3 * 0.98 ** i for i in range(80)], "lr": [0.1 * min(1, (i + 1) / 20) for i in range(80)],
         "layer_update_ratio": [{"net.0.weight": 2e-3 / e, "net.3.weight": 1e-3 / e, "head.weight": 5e-4}
                                for e in range(1, 5)]}


def test_run_figures_have_one_series_each():
    ax = plots.loss_figure(TRACE["loss"]).axes[0]
    assert len(ax.collections) == 1 and len(ax.collections[0].get_offsets()) == 80    # the scatter
    assert len(labelled_lines(ax)) == 1                                              # its moving average
    ax = plots.accuracy_figure(HISTORY).axes[0]
    assert [line.get_label() for line in labelled_lines(ax)] == ["train_acc", "val_acc"]
    assert list(labelled_lines(ax)[1].get_ydata()) == pytest.approx([h["val_acc"] for h in HISTORY])
    ax = plots.lr_figure(TRACE["lr"]).axes[0]
    assert len(ax.get_lines()) == 1 and max(ax.get_lines()[0].get_ydata()) == pytest.approx(0.1)
    ax = plots.update_ratio_figure(TRACE["layer_update_ratio"]).axes[0]
    names = [line.get_label() for line in labelled_lines(ax)]
    assert names == ["net.0.weight", "net.3.weight", "head.weight", "1e-3 (rule of thumb)"]   # 3 layers + target
    assert ax.get_yscale() == "log"


def test_run_plots_write_valid_pngs(tmp_path):
    paths = plots.run_plots(tmp_path, HISTORY, TRACE)
    assert [p.name for p in paths] == ["loss.png", "accuracy.png", "lr.png", "update_ratio.png"]
    for p in paths:
        assert_png(p)
    # a run that diverged before its first checkpoint: no trace, the accuracy plot alone
    assert [p.name for p in plots.run_plots(tmp_path / "b", HISTORY[:1], None)] == ["accuracy.png"]


SPACE = {"optim.base_lr": Dist("loguniform", (1e-3, 1.0)), "model.dropout": Dist("uniform", (0.0, 0.5)),
         "schedule": Dist("choice", ({"name": "cosine"}, {"name": "step", "milestones": [0.5]}))}
SAMPLES = [{"optim.base_lr": 0.01, "model.dropout": 0.1, "schedule": {"name": "cosine"}},
           {"optim.base_lr": 0.3, "model.dropout": 0.4, "schedule": {"name": "step", "milestones": [0.5]}},
           {"optim.base_lr": 0.1, "model.dropout": 0.2, "schedule": {"name": "cosine"}},
           {"optim.base_lr": 2e-3, "model.dropout": 0.0, "schedule": {"name": "cosine"}}]
METRICS = [0.90, 0.95, None, 0.97]     # the third diverged: no point


def test_hyperparameter_figure_one_panel_per_key_log_axes_for_loguniform():
    fig = plots.hyperparameter_figure(SAMPLES, METRICS, SPACE, "val_acc")
    axes = fig.axes
    assert [ax.get_xlabel() for ax in axes] == list(SPACE)
    assert [ax.get_xscale() for ax in axes] == ["log", "linear", "linear"]
    for ax in axes:
        assert len(ax.collections) == 1 and len(ax.collections[0].get_offsets()) == 3
    assert [t.get_text() for t in axes[2].get_xticklabels()] == ["name=cosine", "name=step, milestones=[0.5]"]
    assert list(axes[2].collections[0].get_offsets()[:, 0]) == [0, 1, 0]


def test_best_so_far_figure():
    ax = plots.best_so_far_figure(METRICS, "max", "val_acc").axes[0]
    assert len(ax.collections) == 1 and len(labelled_lines(ax)) == 1
    assert list(labelled_lines(ax)[0].get_ydata()) == [0.90, 0.95, 0.97]
    ax = plots.best_so_far_figure([0.5, 0.3, 0.4], "min", "val_loss").axes[0]
    assert list(labelled_lines(ax)[0].get_ydata()) == [0.5, 0.3, 0.3]


def test_experiment_plots_and_lr_sweep_figure(tmp_path):
    for p in plots.experiment_plots(tmp_path, SAMPLES, METRICS, SPACE, "val_acc", "max"):
        assert_png(p)
    lrs = [1e-3, 1e-2, 1e-1, 1.0]
    curves = [[2.3 - 0.001 * i for i in range(20)], [2.3 - 0.05 * i for i in range(20)],
              [2.3 * 0.8 ** i for i in range(20)], [2.3, 9.0, None]]
    fig = plots.lr_sweep_figure(lrs, curves, 0.1)
    left, right = fig.axes
    assert len(labelled_lines(left)) == 4                        # one curve per LR
    assert [line.get_label() for line in labelled_lines(right)] == ["loss after the sweep", "picked 0.1"]
    assert right.get_xscale() == "log" and len(labelled_lines(right)[0].get_xdata()) == 3   # diverged: no point
    assert_png(plots.save(fig, tmp_path / "lr.png"))


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_report_command_against_a_real_experiment(experiment, mlflow_server, tmp_path, capsys):
    from tuning.cli import main

    spec, result, _ = experiment
    out = tmp_path / "report"
    assert main(["report", "it-asha", "--out", str(out), "--tracking-uri", mlflow_server.uri]) == 0
    printed = capsys.readouterr().out
    for name in ("hyperparameters.png", "best_so_far.png"):
        assert_png(out / name)
    for row in result.rows:
        files = {p.name for p in (out / row.trial_id).iterdir()}
        assert files == {"loss.png", "accuracy.png", "lr.png", "update_ratio.png"}, row.trial_id
        for f in files:
            assert_png(out / row.trial_id / f)
        line = next(line for line in printed.splitlines() if line.startswith(f"| {row.trial_id} "))
        assert f"| {row.diagnosis} |" in line            # the same verdict as at the end of the tune run
    assert "| trial | status | val_acc | diagnosis | evidence |" in printed
    assert main(["report", "no-such-experiment", "--tracking-uri", mlflow_server.uri]) == 2


def test_loss_figure_log_scale_for_an_exploding_curve():
    ax = plots.loss_figure([2.3, 2.0, 500.0, math.inf, 3.0]).axes[0]
    assert ax.get_yscale() == "log" and len(ax.collections[0].get_offsets()) == 4   # inf left out
