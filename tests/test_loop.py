"""The per-worker loop: accuracy on digits, initial loss, exact resume, divergence, DDP."""
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training import checkpoint as ckpt
from training.config import TrainConfig
from training.loop import Diverged, build_run, evaluate, fit

BASE = {"epochs": 6, "seed": 0, "data": {"name": "digits"}, "model": {"name": "mlp", "hidden": [64]},
        "optim": {"name": "sgd", "base_lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
        "schedule": {"name": "cosine", "warmup": "linear", "warmup_epochs": 1},
        "scaling": {"batch_per_worker": 32}}


def cfg_with(**updates) -> TrainConfig:
    return TrainConfig.from_dict(BASE).with_updates(updates)


def test_digits_mlp_reaches_095(tmp_path):
    reports = []
    result = fit(cfg_with(), lambda m, d: reports.append((m, d)), workdir=tmp_path)
    assert result.best["val_acc"] >= 0.95
    assert [m["epoch"] for m, _ in reports] == list(range(1, 7))
    keys = {"train_loss", "val_loss", "val_acc", "lr", "samples_per_s", "epoch_time_s", "grad_norm", "update_ratio"}
    assert keys <= set(reports[-1][0])
    assert all(d is not None for _, d in reports)           # a checkpoint every epoch
    assert ckpt.read_meta(result.best_checkpoint)["metrics"]["val_acc"] == result.best["val_acc"]
    assert 1e-5 < reports[0][0]["update_ratio"] < 1e-1       # the lecture's "~1e-3" ballpark
    trace = result.trace
    assert len(trace["loss"]) == len(trace["lr"]) == result.plan.total_steps
    assert trace["lr"][result.plan.warmup_steps] == pytest.approx(result.plan.peak_lr)
    assert len(trace["layer_update_ratio"]) == 6 and set(trace["layer_update_ratio"][0]) == {
        n for n, p in build_run(cfg_with()).core.named_parameters() if p.dim() > 1}
    assert (tmp_path / "latest" / "trace.json").exists()


def test_initial_loss_is_log_num_classes():
    run = build_run(cfg_with(**{"optim.weight_decay": 0.0}))
    loss = evaluate(run.model, run)["val_loss"]
    assert abs(loss - math.log(10)) < 0.1


def test_lr_follows_schedule_and_scaling_rule():
    cfg = cfg_with(**{"optim.lr_scaling": "linear", "optim.reference_batch": 64, "schedule.name": "constant",
                      "schedule.warmup": "none", "epochs": 1})
    result = fit(cfg)
    assert result.plan.peak_lr == pytest.approx(0.1 * 32 / 64)
    assert result.history[0]["lr"] == pytest.approx(0.05)


class _Stop(Exception):
    pass


def _stop_after(n):
    def report(metrics, directory):
        if metrics["epoch"] == n:
            raise _Stop
    return report




def test_resume_from_interrupted_run(tmp_path):
    """A run killed after epoch 2 and resumed ends with the same weights as an uninterrupted one."""
    cfg = cfg_with(**{"epochs": 4, "model.dropout": 0.2, "regularization.mixup_alpha": 0.2})
    full = fit(cfg, workdir=tmp_path / "full")
    with pytest.raises(_Stop):
        fit(cfg, _stop_after(2), workdir=tmp_path / "cut")
    assert ckpt.read_meta(tmp_path / "cut" / "latest")["epoch"] == 2
    resumed = fit(cfg, workdir=tmp_path / "cut", resume_from=tmp_path / "cut" / "latest")
    a, b = ckpt.load(full.last_checkpoint), ckpt.load(resumed.last_checkpoint)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert resumed.trace["loss"] == full.trace["loss"]      # the curves continue where they stopped
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()


def test_divergence_names_step_and_lr():
    with pytest.raises(Diverged) as e:
        fit(cfg_with(**{"optim.base_lr": 1e6, "schedule.warmup": "none", "epochs": 2}))
    assert e.value.lr == pytest.approx(1e6, rel=0.5)
    assert e.value.step < 50
    assert "diverged at step" in str(e.value) and "lr" in str(e.value)


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    run = fit(cfg_with(epochs=1), workdir=tmp_path)
    f = ckpt.state_file(run.last_checkpoint)
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match=str(f)):
        fit(cfg_with(epochs=2), resume_from=run.last_checkpoint)


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    run = fit(cfg_with(epochs=1), workdir=tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="does not fit this model"):
        fit(cfg_with(epochs=2, **{"model.hidden": [32]}), resume_from=run.last_checkpoint)


# ------------------------------------------------------------------ data parallel (2 gloo processes)

def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _ddp_worker(rank, world, port, cfg_dict, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from training.loop import _loader

        cfg = TrainConfig.from_dict(cfg_dict)
        run = build_run(cfg)
        shards = [sorted(_loader(run, e).sampler) for e in (0, 1)]
        result = fit(cfg)
        out[rank] = {"history": result.history, "shards": shards, "n": len(run.data.train)}
    finally:
        dist.destroy_process_group()


def test_ddp_metrics_are_aggregated_and_shards_disjoint():
    cfg = cfg_with(**{"epochs": 2, "scaling.num_workers": 2})
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg.to_dict(), out), nprocs=2, join=True)
    h0, h1 = out[0]["history"], out[1]["history"]
    for m0, m1 in zip(h0, h1):  # every worker reports the same, globally aggregated numbers
        for k in ("train_loss", "val_loss", "val_acc", "train_acc"):
            assert m0[k] == m1[k], k
    assert h0[-1]["val_acc"] > 0.85
    for epoch in (0, 1):
        a, b = set(out[0]["shards"][epoch]), set(out[1]["shards"][epoch])
        assert not a & b and len(a | b) == out[0]["n"] - out[0]["n"] % 2
    assert out[0]["shards"][0] != out[0]["shards"][1]  # reshuffled every epoch
