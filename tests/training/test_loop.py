"""The per-worker loop: accuracy on digits, initial loss, exact resume, divergence, the best
checkpoint, batched loading, nesterov, DDP (metrics, shards, lockstep divergence, batch norm)."""
import dataclasses
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Subset

from training import checkpoint as ckpt
from training import loop, pipeline
from training.config import TrainConfig
from training.data import Uint8Images
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


CONSTANT_LR = {"schedule.name": "constant", "schedule.warmup": "none"}   # lr 0.1 at every step


def _bad_loss_at(call: int, make_bad, rank: int | None = None):
    """soft_cross_entropy, with ``make_bad(loss)`` at its ``call``-th call (on ``rank`` only, if given)."""
    real, calls = loop.soft_cross_entropy, []

    def loss_fn(logits, target, smoothing):
        loss = real(logits, target, smoothing)
        calls.append(1)
        mine = rank is None or dist.get_rank() == rank
        return make_bad(loss) if mine and len(calls) == call else loss
    return loss_fn


@pytest.mark.parametrize("bad,value", [
    (lambda loss: loss * math.nan, "nan"),    # NaN loss and NaN gradients: it was "gradient norm is nan"
    (lambda loss: loss + math.inf, "inf"),    # Inf loss, finite gradients: it was caught only at epoch end
])
def test_a_nonfinite_loss_stops_training_at_its_step(monkeypatch, bad, value):
    monkeypatch.setattr(loop, "soft_cross_entropy", _bad_loss_at(6, bad))
    with pytest.raises(Diverged) as e:
        fit(cfg_with(epochs=1, **CONSTANT_LR))
    assert (e.value.step, e.value.what, e.value.lr) == (5, "loss", pytest.approx(0.1))
    assert str(e.value) == f"diverged at step 5 (lr 0.1): loss is {value}"


def test_the_best_epoch_is_saved_between_checkpoint_epochs(tmp_path):
    """every_epochs 2 over 5 epochs saves at epochs 2, 4 and 5, and at every new best: mode max on
    the val loss makes epoch 1 (the highest loss) the best, an odd epoch that is saved all the same."""
    cfg = cfg_with(epochs=5, **{"checkpoint.every_epochs": 2, "checkpoint.metric": "val_loss",
                                "checkpoint.mode": "max"})
    reports = []
    result = fit(cfg, lambda m, d: reports.append((m["epoch"], d)), workdir=tmp_path)
    assert result.best["epoch"] == 1
    assert [d is not None for _, d in reports] == [True, True, False, True, True]   # epoch 3: neither
    meta = ckpt.read_meta(tmp_path / "best")
    assert result.best_checkpoint == str(tmp_path / "best")
    assert (meta["epoch"], meta["is_best"], meta["metrics"]) == (1, True, result.best)
    assert ckpt.read_meta(result.last_checkpoint)["epoch"] == 5
    run = build_run(cfg)                                  # best/ holds epoch 1's weights: same val loss again
    ckpt.load_model_state(run.core, tmp_path / "best")
    assert evaluate(run.model, run)["val_loss"] == pytest.approx(result.best["val_loss"], rel=1e-9)
    resumed = fit(cfg, workdir=tmp_path / "again", resume_from=tmp_path / "best")
    assert [m["epoch"] for m in resumed.history] == [2, 3, 4, 5]    # and it resumes like any checkpoint


def _reference_batches(ds, sampler, batch_size, drop_last):
    """The per-sample path: ds[i] for every index, collated."""
    return list(DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=drop_last))


def _same_batches(a, b) -> bool:
    return len(a) == len(b) > 0 and all(
        xa.dtype == xb.dtype and ya.dtype == yb.dtype and torch.equal(xa, xb) and torch.equal(ya, yb)
        for (xa, ya), (xb, yb) in zip(a, b))


def _on_device(loader, ds):
    """The batches as the step sees them: on the device (CPU here), uint8 images standardized there."""
    return [pipeline.to_device(b, ds, torch.device("cpu")) for b in loader]


@pytest.mark.parametrize("kind", ["tensors", "uint8_images"])
def test_batched_loading_gives_the_per_sample_batches(monkeypatch, kind):
    """In-memory datasets are indexed a whole batch at a time: the same samples, in the same order,
    as ds[i] + collate, for every epoch and both ranks of a 2-worker run (so results and resume
    are unchanged), and the same validation shards. Uint8 images travel as uint8 and are
    standardized after the copy, to exactly the numbers ds[i] gives."""
    run = build_run(cfg_with(**{"scaling.batch_per_worker": 24}))
    if kind == "uint8_images":
        g = torch.Generator().manual_seed(0)
        images = lambda n: torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)  # noqa: E731
        labels = lambda n: torch.randint(0, 10, (n,), generator=g)  # noqa: E731
        mean, std = torch.full((3, 1, 1), 120.0), torch.full((3, 1, 1), 70.0)
        run.data = dataclasses.replace(run.data, train=Uint8Images(images(301), labels(301), mean, std),
                                       val=Uint8Images(images(97), labels(97), mean, std))
    train, val = run.data.train, run.data.val
    for rank in (0, 1):
        monkeypatch.setattr(loop, "_world", lambda: (rank, 2))
        for epoch in (0, 1, 2):
            loader = loop._loader(run, epoch)
            assert loader.batch_size is None and isinstance(loader.sampler, BatchSampler)   # the batched path
            ref = DistributedSampler(train, num_replicas=2, rank=rank, shuffle=True, seed=0, drop_last=True)
            ref.set_epoch(epoch)
            if kind == "uint8_images":
                assert next(iter(loader))[0].dtype == torch.uint8
            assert _same_batches(_on_device(loader, train), _reference_batches(train, ref, 24, True)), (rank, epoch)
        n = len(val)
        shard = range(rank * n // 2, (rank + 1) * n // 2)
        assert _same_batches(_on_device(loop._val_loader(run), val),
                             _reference_batches(Subset(val, shard), None, 256, False))
    run.cfg = run.cfg.with_updates({"data.loader_workers": 1})      # batches made in a worker process
    ref = DistributedSampler(train, num_replicas=2, rank=1, shuffle=True, seed=0, drop_last=True)
    assert _same_batches(_on_device(loop._loader(run, 0), train), _reference_batches(train, ref, 24, True))


@pytest.mark.parametrize("nesterov,factor", [(True, 1.9), (False, 1.0)])
def test_nesterov_sgd_is_used(nesterov, factor):
    """One SGD step from zero momentum with gradient g moves a weight by -lr (1 + momentum) g with
    nesterov, -lr g without."""
    run = build_run(cfg_with(**{"optim.nesterov": nesterov, "optim.weight_decay": 0.0, **CONSTANT_LR}))
    assert isinstance(run.optimizer, torch.optim.SGD)
    assert all(g["nesterov"] is nesterov and g["momentum"] == 0.9 for g in run.optimizer.param_groups)
    before = [p.detach().clone() for p in run.core.parameters()]
    for p in run.core.parameters():
        p.grad = torch.ones_like(p)
    run.optimizer.step()
    for b, p in zip(before, run.core.parameters()):
        assert torch.allclose(p.detach() - b, torch.full_like(b, -0.1 * factor), atol=1e-7)


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


def _ddp_worker(rank, world, port, scenario, cfg_dict, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out[rank] = globals()[scenario](rank, cfg_dict)
    finally:
        dist.destroy_process_group()


def _spawn(scenario: str, cfg: TrainConfig) -> dict:
    """Run ``scenario(rank, cfg_dict)`` on 2 gloo processes; its return values by rank."""
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, _free_port(), scenario, cfg.to_dict(), out), nprocs=2, join=True)
    return dict(out)


def _fit_and_shards(rank, cfg_dict):
    cfg = TrainConfig.from_dict(cfg_dict)
    run = build_run(cfg)
    shards = [sorted(loop._sampler(run, e)) for e in (0, 1)]
    result = fit(cfg)
    return {"history": result.history, "shards": shards, "n": len(run.data.train)}


def test_ddp_metrics_are_aggregated_and_shards_disjoint():
    out = _spawn("_fit_and_shards", cfg_with(**{"epochs": 2, "scaling.num_workers": 2}))
    h0, h1 = out[0]["history"], out[1]["history"]
    for m0, m1 in zip(h0, h1):  # every worker reports the same, globally aggregated numbers
        for k in ("train_loss", "val_loss", "val_acc", "train_acc", "samples_per_s_total", "data_wait_fraction",
                  "step_time_s", "peak_memory_mb"):
            assert m0[k] == m1[k], k
        assert m0["samples_per_s_total"] == pytest.approx(2 * m0["samples_per_s"])   # the mean per worker
    assert h0[-1]["val_acc"] > 0.85
    for epoch in (0, 1):
        a, b = set(out[0]["shards"][epoch]), set(out[1]["shards"][epoch])
        assert not a & b and len(a | b) == out[0]["n"] - out[0]["n"] % 2
    assert out[0]["shards"][0] != out[0]["shards"][1]  # reshuffled every epoch


def _inf_loss_on_rank_1(rank, cfg_dict):
    """Rank 1's loss becomes Inf (finite gradients) at its 4th step; rank 0's stays finite."""
    loop.soft_cross_entropy = _bad_loss_at(4, lambda loss: loss + math.inf, rank=1)
    try:
        fit(TrainConfig.from_dict(cfg_dict))
    except Diverged as e:
        return {"step": e.step, "what": e.what, "lr": e.lr}
    return {"step": None}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_ddp_workers_stop_together_when_one_loss_is_not_finite(precision):
    """The worker with the Inf loss raises for its loss, the other for its (all-reduced, NaN)
    gradients, at the same step: no worker is left in a collective (a trial would hang). Under
    fp16, where a non-finite gradient alone is an overflow to skip, they agree it is a divergence."""
    out = _spawn("_inf_loss_on_rank_1", cfg_with(**{"epochs": 1, "scaling.num_workers": 2, "precision": precision,
                                                    **CONSTANT_LR}))
    assert out[1] == {"step": 3, "what": "loss", "lr": pytest.approx(0.1)}
    assert out[0] == {"step": 3, "what": "gradient norm", "lr": pytest.approx(0.1)}


def _batch_norm(rank, cfg_dict):
    """The default: a train-mode forward of rank-shifted inputs through the DDP model."""
    run = build_run(TrainConfig.from_dict(cfg_dict))
    bns = [m for m in run.core.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    seen = {}
    bns[0].register_forward_hook(lambda m, i, o: seen.update(mean=o.mean((0, 2, 3))))
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(rank)) + 3.0 * rank
    run.model.train()
    run.model(x)
    return {"types": sorted({type(m).__name__ for m in bns}), "n": len(bns),
            "out_mean": seen["mean"].abs().max().item(), "running_mean": bns[0].running_mean.clone()}


def test_ddp_batch_norm_statistics_stay_per_worker_by_default():
    out = _spawn("_batch_norm", cfg_with(**{"scaling.num_workers": 2, "model.name": "small_cnn"}))
    for rank in (0, 1):
        assert out[rank]["types"] == ["BatchNorm2d"] and out[rank]["n"] == 2
        assert out[rank]["out_mean"] < 1e-5        # each worker normalizes its batch by its own statistics
    # ... and keeps its own running statistics (rank 1's inputs are shifted by 3)
    assert not torch.allclose(out[0]["running_mean"], out[1]["running_mean"], atol=1e-3)


def test_sync_batchnorm_converts_every_bn_layer_under_ddp():
    """scaling.sync_batchnorm: every BN layer becomes a SyncBatchNorm when there are several
    workers, none with one. (Its forward and DDP's wrapping need GPUs: the config requires use_gpu.)"""
    cfg = cfg_with(**{"model.name": "small_cnn", "scaling.use_gpu": True, "scaling.sync_batchnorm": True})
    data = build_run(cfg_with(**{"model.name": "small_cnn"})).data

    def bn_types(core):
        return [type(m).__name__ for m in core.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bn_types(loop._build_model(cfg, data, world=2)[0]) == ["SyncBatchNorm"] * 2
    assert bn_types(loop._build_model(cfg, data, world=1)[0]) == ["BatchNorm2d"] * 2
    off = cfg.with_updates({"scaling.sync_batchnorm": False})
    assert bn_types(loop._build_model(off, data, world=2)[0]) == ["BatchNorm2d"] * 2
