"""Polyak averaging (EMA of weights): the closed form, the loop's wiring, and which weights a trial's model gets."""
import json

import pytest
import torch

import training.loop as loop
from training import checkpoint as ckpt
from training.config import TrainConfig
from training.loop import fit
from tuning.tracking.registry import choose_weights, ema_state_dict, model_from_checkpoint

BASE = {"epochs": 2, "seed": 0, "data": {"name": "digits"}, "model": {"name": "mlp", "hidden": [16]},
        "optim": {"name": "sgd", "base_lr": 0.1, "momentum": 0.9},
        "schedule": {"name": "cosine"}, "regularization": {"ema_decay": 0.9},
        "scaling": {"batch_per_worker": 64}}


def closed_form_ema(trajectory: list[torch.Tensor], decay: float) -> torch.Tensor:
    """AveragedModel's EMA after n updates with weights w_1..w_n (its first update copies w_1):
    decay^(n-1) w_1 + (1 - decay) * sum_{k=2..n} decay^(n-k) w_k."""
    n = len(trajectory)
    out = decay ** (n - 1) * trajectory[0].double()
    for k in range(2, n + 1):
        out = out + (1 - decay) * decay ** (n - k) * trajectory[k - 1].double()
    return out


def test_ema_of_a_toy_parameter_is_the_closed_form():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = torch.nn.Linear(1, 1, bias=False)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    values = [3.0, -1.0, 2.0, 0.5]
    for v in values:
        with torch.no_grad():
            model.weight.fill_(v)
        ema.update_parameters(model)
    # 0.9^3 * 3 + 0.1 * (0.9^2 * -1 + 0.9 * 2 + 0.5)
    assert ema.module.weight.item() == pytest.approx(0.9 ** 3 * 3 + 0.1 * (0.81 * -1 + 0.9 * 2 + 0.5), abs=1e-6)


def test_loop_keeps_the_closed_form_average_of_its_weights(monkeypatch, tmp_path):
    """The loop updates the EMA once per optimizer step with the post-step weights."""
    trajectory: dict[str, list[torch.Tensor]] = {}
    original = loop._average

    def recording(run):
        for name, p in run.core.named_parameters():
            trajectory.setdefault(name, []).append(p.detach().clone())
        original(run)

    monkeypatch.setattr(loop, "_average", recording)
    cfg = TrainConfig.from_dict(BASE)
    result = fit(cfg, workdir=tmp_path)
    state = ckpt.load(result.last_checkpoint)
    ema = ema_state_dict(state["ema"])
    assert int(state["ema"]["n_averaged"]) == result.plan.total_steps
    for name, weights in trajectory.items():
        assert len(weights) == result.plan.total_steps
        torch.testing.assert_close(ema[name].double(), closed_form_ema(weights, 0.9), atol=1e-5, rtol=1e-5)
    assert not torch.equal(ema["head.weight"], state["model"]["head.weight"])   # it is an average, not a copy
    assert {"ema_val_acc", "ema_val_loss", "val_acc"} <= set(result.history[-1])


def test_the_better_of_raw_and_ema_is_the_trials_model(tmp_path):
    result = fit(TrainConfig.from_dict(BASE), workdir=tmp_path)
    directory = result.last_checkpoint
    state = ckpt.load(directory)
    meta_file = ckpt.read_meta(directory)

    def with_metrics(**metrics):
        (tmp_path / "latest" / "meta.json").write_text(json.dumps({**meta_file, "metrics": metrics}))
        return model_from_checkpoint(directory)

    model, meta = with_metrics(val_acc=0.90, ema_val_acc=0.95)
    assert meta["model_weights"] == "ema"
    assert torch.equal(model.state_dict()["head.weight"], ema_state_dict(state["ema"])["head.weight"])
    model, meta = with_metrics(val_acc=0.95, ema_val_acc=0.90)
    assert meta["model_weights"] == "raw"
    assert torch.equal(model.state_dict()["head.weight"], state["model"]["head.weight"])
    # the experiment's metric decides when it is given (val_loss: lower is better)
    model, meta = with_metrics(val_acc=0.95, ema_val_acc=0.90, val_loss=0.3, ema_val_loss=0.2)
    assert model_from_checkpoint(directory, "val_loss", "min")[1]["model_weights"] == "ema"


@pytest.mark.parametrize("metrics,has_ema,metric,mode,expected", [
    ({"val_acc": 0.9, "ema_val_acc": 0.91}, True, "val_acc", "max", "ema"),
    ({"val_acc": 0.9, "ema_val_acc": 0.9}, True, "val_acc", "max", "raw"),          # a tie keeps the raw weights
    ({"val_acc": 0.9, "ema_val_acc": 0.99}, False, "val_acc", "max", "raw"),        # no EMA state saved
    ({"val_acc": 0.9}, True, "val_acc", "max", "raw"),
    ({"val_loss": 0.5, "ema_val_loss": 0.4}, True, "val_loss", "min", "ema"),
    ({"val_acc": 0.9, "ema_val_acc": 0.95}, True, "ema_val_acc", "max", "ema"),     # metric named by its ema_ form
])
def test_choose_weights(metrics, has_ema, metric, mode, expected):
    assert choose_weights(metrics, has_ema, metric, mode) == expected


def test_checkpoint_without_ema_loads_raw_weights(tmp_path):
    cfg = TrainConfig.from_dict(BASE).with_updates({"regularization.ema_decay": 0.0, "epochs": 1})
    result = fit(cfg, workdir=tmp_path)
    model, meta = model_from_checkpoint(result.best_checkpoint)
    assert meta["model_weights"] == "raw" and "ema_val_acc" not in meta["metrics"]
