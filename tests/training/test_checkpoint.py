"""Checkpoints keep the step and the optimizer's moments, not LR values (the LR comes from the
config being restored), and are loaded weights-only: a file naming any object is refused unrun."""
import pytest
import torch

from training import checkpoint as ckpt
from training import loop
from training.config import TrainConfig
from training.loop import build_run, fit
from training.schedules import lr_multiplier

BASE = {"epochs": 2, "seed": 0, "data": {"name": "digits"}, "model": {"name": "mlp", "hidden": [32, 16]},
        "optim": {"name": "sgd", "base_lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
        "schedule": {"name": "cosine", "warmup": "linear", "warmup_epochs": 0.5},
        "scaling": {"batch_per_worker": 64}}


def cfg_with(**updates) -> TrainConfig:
    return TrainConfig.from_dict(BASE).with_updates(updates)


class _Stop(Exception):
    pass


def _stop_after(n):
    def report(metrics, directory):
        if metrics["epoch"] == n:
            raise _Stop
    return report


def _epoch_1_checkpoint(cfg: TrainConfig, workdir) -> str:
    with pytest.raises(_Stop):
        fit(cfg, _stop_after(1), workdir=workdir)
    return str(workdir / "latest")


def test_a_restore_under_another_base_lr_trains_at_the_new_lr_from_its_next_step(tmp_path):
    """PBT's exploit: a checkpoint taken at base_lr 0.1, restored under base_lr 0.03. The first step
    after the restore runs at 0.03 x the schedule's multiplier at that step (not at 0.1 x, which a
    restored scheduler state or optimizer group LR would give); the steps before it are the old run's."""
    old = cfg_with()
    path = _epoch_1_checkpoint(old, tmp_path / "old")
    new = old.with_updates({"optim.base_lr": 0.03})
    resumed = fit(new, workdir=tmp_path / "new", resume_from=path)
    plan = resumed.plan
    s = plan.steps_per_epoch                          # the first step after the restore
    mult = lr_multiplier(new.schedule, s, plan.total_steps, plan.steps_per_epoch)
    assert 0.5 < mult < 1.0                           # mid-schedule: a number that says which LR it is
    assert resumed.trace["lr"][s] == pytest.approx(0.03 * mult, rel=1e-12)
    assert resumed.trace["lr"][s - 1] == pytest.approx(
        0.1 * lr_multiplier(old.schedule, s - 1, plan.total_steps, plan.steps_per_epoch), rel=1e-12)
    assert resumed.history[0]["lr"] == pytest.approx(
        0.03 * lr_multiplier(new.schedule, plan.total_steps - 1, plan.total_steps, plan.steps_per_epoch), rel=1e-12)


def test_restore_takes_every_group_setting_from_the_config_and_keeps_the_moments(tmp_path):
    """A fine-tuning run (backbone at a multiple of the head's LR) restored under another base_lr,
    backbone multiplier, weight decay and momentum: each group gets the new config's values (peak LR
    through the scaling rule), at the schedule's multiplier for the restored step; the momentum
    buffers are the saved ones."""
    old = cfg_with(**{"model.transfer": "finetune_last_n", "model.finetune_last_n": 2,
                      "model.backbone_lr_mult": 0.1, "optim.lr_scaling": "linear", "optim.reference_batch": 128})
    path = _epoch_1_checkpoint(old, tmp_path)
    new = old.with_updates({"optim.base_lr": 0.4, "model.backbone_lr_mult": 0.25, "optim.weight_decay": 3e-3,
                            "optim.momentum": 0.8})
    run = build_run(new)
    loop._restore(run, path)
    plan, step = run.plan, ckpt.load(path)["step"]
    assert step == plan.steps_per_epoch and run.scheduler.last_epoch == step
    peak = 0.4 * 64 / 128                                        # the linear scaling rule
    lr = peak * lr_multiplier(new.schedule, step, plan.total_steps, plan.steps_per_epoch)
    groups = {g["name"]: g for g in run.optimizer.param_groups}
    assert set(groups) == {"head_decay", "head_no_decay", "backbone_decay", "backbone_no_decay"}
    for name, g in groups.items():
        assert g["lr"] == pytest.approx(lr * (1.0 if name.startswith("head") else 0.25), rel=1e-12), name
        assert g["initial_lr"] == pytest.approx(peak * (1.0 if name.startswith("head") else 0.25), rel=1e-12)
        assert g["weight_decay"] == (0.0 if name.endswith("no_decay") else 3e-3), name
        assert g["momentum"] == 0.8
    saved = ckpt.load(path)["optimizer"]["state"]
    state = run.optimizer.state_dict()["state"]
    assert saved.keys() == state.keys() and len(saved) > 0
    assert all(torch.equal(saved[k]["momentum_buffer"], state[k]["momentum_buffer"]) for k in saved)


def test_the_saved_schedule_is_its_step_only(tmp_path):
    result = fit(cfg_with(epochs=1), workdir=tmp_path)
    state = ckpt.load(result.last_checkpoint)
    assert state["scheduler"] == {"last_epoch": result.plan.total_steps}


class _Payload:
    """What a tampered checkpoint could carry: unpickling it would run code (write ``marker``)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_a_checkpoint_carrying_a_pickled_payload_is_refused_unrun(tmp_path):
    result = fit(cfg_with(epochs=1), workdir=tmp_path / "run")
    f = ckpt.state_file(result.last_checkpoint)
    marker = tmp_path / "payload_ran"
    state = torch.load(f, weights_only=True)
    state["trace"]["note"] = _Payload(marker)
    torch.save(state, f)
    with pytest.raises(ckpt.CheckpointError) as e:
        fit(cfg_with(epochs=2), workdir=tmp_path / "again", resume_from=result.last_checkpoint)
    assert str(e.value).startswith(f"{f}: refused: it holds an object that is not plain data (Unsupported global")
    assert "exec" in str(e.value)
    assert not marker.exists()
    with pytest.raises(ckpt.CheckpointError, match="refused"):
        ckpt.load(result.last_checkpoint)
    assert not marker.exists()


def test_every_kind_of_state_loads_weights_only_and_resumes(tmp_path):
    """EMA, snapshots (cyclic_cosine), the fp16 scaler, AdamW's moments: plain data, no allow-list."""
    cfg = cfg_with(epochs=2, **{"optim.name": "adamw", "optim.base_lr": 1e-3, "regularization.ema_decay": 0.9,
                                "schedule": {"name": "cyclic_cosine", "cycles": 2}, "precision": "fp16"})
    result = fit(cfg, workdir=tmp_path)
    state = ckpt.load(result.last_checkpoint)       # weights_only=True inside
    assert state["ema"] is not None and len(state["snapshots"]) == 2 and state["scaler"]["scale"] > 0
    assert all("exp_avg" in s for s in state["optimizer"]["state"].values())
    resumed = fit(cfg.with_updates({"epochs": 3}), workdir=tmp_path / "more", resume_from=result.last_checkpoint)
    assert [m["epoch"] for m in resumed.history] == [3]
