"""Ensembles: the mean of probabilities, snapshot ensembles in the loop, and `schedtune ensemble`
over the top-K trials of an experiment in MLflow (logged without Ray: tests/fake_experiment.py)."""
import pytest
import torch
import torch.nn.functional as F

import training.loop as loop
from tests.fake_experiment import log_experiment
from tests.conftest import sqlite_store
from training import checkpoint as ckpt
from training.config import ScheduleConfig, TrainConfig
from training.data import load_data
from training.ensemble import (ProbEnsemble, cycle_end_steps, evaluate_ensemble, mean_probs, metrics_from_probs,
                               predict_probs)
from training.loop import fit
from training.schedules import lr_multiplier

BASE = {"epochs": 2, "seed": 0, "data": {"name": "digits"}, "model": {"name": "mlp", "hidden": [32]},
        "optim": {"name": "sgd", "base_lr": 0.1, "momentum": 0.9},
        "schedule": {"name": "cosine"}, "scaling": {"batch_per_worker": 32}}


def cfg_with(**updates) -> TrainConfig:
    return TrainConfig.from_dict(BASE).with_updates(updates)


# ---------------------------------------------------------------------------- the mean of probabilities

def test_mean_probs_and_prob_ensemble():
    torch.manual_seed(0)
    logits = [torch.randn(5, 4) * 3 for _ in range(3)]
    expected = sum(F.softmax(l, -1) for l in logits) / 3
    torch.testing.assert_close(mean_probs(logits), expected)
    members = [torch.nn.Linear(6, 4) for _ in range(3)]
    x = torch.randn(5, 6)
    out = ProbEnsemble(members)(x)
    torch.testing.assert_close(out.exp(), mean_probs([m(x) for m in members]))
    # log-probabilities: cross_entropy on them is the ensemble's NLL
    y = torch.tensor([0, 1, 2, 3, 0])
    assert F.cross_entropy(out, y).item() == pytest.approx(metrics_from_probs(out.exp(), y)["val_loss"], rel=1e-5)
    with pytest.raises(ValueError, match="at least one member"):
        ProbEnsemble([])


@pytest.fixture(scope="module")
def digits_models(tmp_path_factory):
    """Three MLPs on digits, different seeds and learning rates (2 epochs each)."""
    work = tmp_path_factory.mktemp("members")
    models = []
    from tuning.tracking.registry import model_from_checkpoint

    for seed, lr in ((0, 0.1), (1, 0.02), (2, 0.005)):
        result = fit(cfg_with(seed=seed, **{"optim.base_lr": lr}), workdir=work / str(seed))
        models.append(model_from_checkpoint(result.best_checkpoint)[0])
    return models


def test_ensemble_probabilities_are_the_members_mean_and_beat_the_worst(digits_models):
    val = load_data(cfg_with().data).val
    result = evaluate_ensemble(digits_models, val)
    member_probs = [predict_probs(m, val)[0] for m in digits_models]
    torch.testing.assert_close(result.probs, torch.stack(member_probs).mean(0))
    accs = [m["val_acc"] for m in result.members]
    assert result.ensemble["val_acc"] >= min(accs)
    assert len(set(accs)) > 1                                  # the members really differ
    assert result.ensemble["val_acc"] == pytest.approx((result.probs.argmax(-1) == result.labels).float().mean().item())


# ---------------------------------------------------------------------------- snapshot ensembles

@pytest.mark.parametrize("total,warmup,cycles", [(36, 0, 3), (37, 5, 3), (100, 10, 4), (5, 0, 1)])
def test_cycle_ends_are_where_the_schedule_restarts(total, warmup, cycles):
    s = ScheduleConfig.from_dict({"name": "cyclic_cosine", "cycles": cycles, "warmup": "linear" if warmup else "none",
                                  "warmup_steps": warmup})
    ends = cycle_end_steps(total, warmup, cycles)
    assert len(ends) == cycles and ends[-1] == total
    lr = [lr_multiplier(s, step, total) for step in range(total)]
    for end in ends[:-1]:
        # the step after a snapshot is a restart: the LR jumps back up, never down
        assert lr[end] > lr[end - 1] and lr[end] > 0.9
    restarts = [t for t in range(warmup + 1, total) if lr[t] > lr[t - 1]]
    assert restarts == ends[:-1]


def test_cycle_end_steps_values():
    assert cycle_end_steps(36, 0, 3) == [12, 24, 36]
    assert cycle_end_steps(37, 5, 3) == [16, 27, 37]         # 32 post-warmup steps: cycles of 10.67
    assert cycle_end_steps(4, 0, 10) == [1, 2, 3, 4]          # more cycles than steps collapse


def test_loop_snapshots_every_cycle_and_reports_their_ensemble(monkeypatch, tmp_path):
    weights_at = {}
    original = loop._average

    def recording(run):
        original(run)
        weights_at[run.step + 1] = {k: v.clone() for k, v in run.core.state_dict().items()}

    monkeypatch.setattr(loop, "_average", recording)
    cfg = cfg_with(epochs=3, **{"schedule.name": "cyclic_cosine", "schedule.cycles": 3})
    result = fit(cfg, workdir=tmp_path)
    last = result.history[-1]
    assert last["snapshot_ensemble_size"] == 3
    assert 0.8 < last["snapshot_ensemble_val_acc"] <= 1.0 and last["snapshot_ensemble_val_loss"] > 0
    assert all("snapshot_ensemble_val_acc" not in m for m in result.history[:-1])
    snapshots = ckpt.load(result.last_checkpoint)["snapshots"]
    ends = cycle_end_steps(result.plan.total_steps, result.plan.warmup_steps, 3)
    assert ends == [result.plan.steps_per_epoch * k for k in (1, 2, 3)]   # 3 epochs, 3 cycles: epoch ends
    for end, snap in zip(ends, snapshots):
        assert all(torch.equal(snap[k], weights_at[end][k]) for k in snap)
    # the reported number is the ensemble of exactly those weights
    from tuning.tracking.registry import model_from_checkpoint

    members = []
    for snap in snapshots:
        model, _ = model_from_checkpoint(result.last_checkpoint)
        model.load_state_dict(snap)
        members.append(model)
    val = load_data(cfg.data).val
    assert evaluate_ensemble(members, val).ensemble["val_acc"] == pytest.approx(last["snapshot_ensemble_val_acc"])


def test_snapshots_survive_resume(tmp_path):
    cfg = cfg_with(epochs=3, **{"schedule.name": "cyclic_cosine", "schedule.cycles": 3})
    full = fit(cfg, workdir=tmp_path / "full")

    def stop_after_2(metrics, directory):
        if metrics["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(cfg, stop_after_2, workdir=tmp_path / "cut")
    assert len(ckpt.load(tmp_path / "cut" / "latest")["snapshots"]) == 2
    resumed = fit(cfg, workdir=tmp_path / "cut", resume_from=tmp_path / "cut" / "latest")
    a, b = full.history[-1], resumed.history[-1]
    assert b["snapshot_ensemble_size"] == 3
    assert b["snapshot_ensemble_val_acc"] == a["snapshot_ensemble_val_acc"]
    assert b["snapshot_ensemble_val_loss"] == pytest.approx(a["snapshot_ensemble_val_loss"], abs=1e-9)


def test_snapshot_ensemble_is_aggregated_across_ddp_workers():
    from tests.training.test_loop import _spawn

    cfg = cfg_with(epochs=2, **{"scaling.num_workers": 2, "schedule.name": "cyclic_cosine", "schedule.cycles": 2})
    out = _spawn("_fit_and_shards", cfg)   # fit() on 2 gloo workers; each rank's history
    last0, last1 = out[0]["history"][-1], out[1]["history"][-1]
    assert last0["snapshot_ensemble_size"] == 2
    for k in ("snapshot_ensemble_val_acc", "snapshot_ensemble_val_loss"):
        assert last0[k] == last1[k], k


def test_other_schedules_take_no_snapshots(tmp_path):
    result = fit(cfg_with(epochs=1), workdir=tmp_path)
    assert ckpt.load(result.last_checkpoint)["snapshots"] == []
    assert "snapshot_ensemble_val_acc" not in result.history[-1]


# ---------------------------------------------------------------------------- `schedtune ensemble`

@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """Five digits trials in a sqlite MLflow; the fourth diverged (it must never be a member)."""
    root = tmp_path_factory.mktemp("ensemble-mlflow")
    uri = sqlite_store(root / "mlflow.db")
    cfgs = [cfg_with(seed=s, **{"optim.base_lr": lr, "regularization.ema_decay": ema})
            for s, lr, ema in ((0, 0.1, 0.0), (1, 0.03, 0.9), (2, 0.01, 0.0), (3, 0.2, 0.0), (4, 0.003, 0.0))]
    parent, trials = log_experiment(uri, "ens-test", cfgs, root / "work",
                                    statuses=["completed", "completed", "completed", "diverged", "completed"])
    return uri, parent, trials


def test_top_k_ensemble_from_mlflow(logged, monkeypatch):
    import mlflow

    from tuning.delivery.trial_ensemble import ensemble_experiment

    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri, parent, trials = logged
    report = ensemble_experiment("ens-test", 3, uri)
    ok = sorted((t for t in trials if t.status == "completed"), key=lambda t: -t.result.best["val_acc"])
    assert [m.run_id for m in report.members] == [t.run_id for t in ok[:3]]
    assert report.eligible == 4                                   # the diverged trial is left out
    for m, t in zip(report.members, ok):
        assert m.logged == pytest.approx(t.result.best["val_acc"])
        key = "ema_val_acc" if m.weights == "ema" else "val_acc"
        assert m.metrics["val_acc"] == pytest.approx(t.result.best[key])   # recomputed = what the loop measured
    assert report.ensemble["val_acc"] >= min(m.metrics["val_acc"] for m in report.members)

    run = mlflow.MlflowClient(uri).get_run(report.run_id)
    tags, metrics = run.data.tags, run.data.metrics
    assert tags["schedtune.role"] == "ensemble" and "mlflow.parentRunId" not in tags
    assert tags["schedtune.members"].split(",") == [m.run_id for m in report.members]
    assert tags["schedtune.member.1"] == report.members[0].run_id
    assert metrics["val_acc"] == pytest.approx(report.ensemble["val_acc"])
    assert metrics["member_2_val_acc"] == pytest.approx(report.members[1].metrics["val_acc"])
    # the ensemble run is not a trial: `schedtune runs` still lists five
    from tuning.tracking.reads import trial_runs

    assert len(trial_runs("ens-test", uri)[1]) == 5


def test_ensemble_command(logged, capsys, monkeypatch):
    from tuning.cli import main

    uri = logged[0]
    assert main(["ensemble", "ens-test", "--top-k", "2", "--tracking-uri", uri, "--no-log"]) == 0
    out = capsys.readouterr().out
    assert "ensemble of the top 2 of 4 trials by val_acc (max)" in out and "mean of probabilities" in out
    assert main(["ensemble", "no-such-experiment", "--tracking-uri", uri]) == 2
    assert "no schedtune experiment named 'no-such-experiment'" in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.slow
def test_ensemble_of_a_real_tune_experiment(experiment, mlflow_server, monkeypatch):
    """The session's ASHA experiment (2-worker DDP trials, tracked by the real Tune callback)."""
    from tuning.delivery.trial_ensemble import ensemble_experiment

    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    _, result, _ = experiment
    report = ensemble_experiment("it-asha", 2, mlflow_server.uri)
    ranked = [r for r in result.rows if r.metric is not None]
    assert [m.logged for m in report.members] == pytest.approx([r.metric for r in ranked[:2]])
    assert report.members[0].run_id == result.best.run_id or report.members[0].logged == report.members[1].logged
    assert report.ensemble["val_acc"] >= min(m.metrics["val_acc"] for m in report.members)
    assert report.run_id
