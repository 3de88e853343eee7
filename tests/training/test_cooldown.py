"""Cooldown forks (training.cooldown): the fork's LR falls linearly to 0 from the run's, it starts
from a copy of the optimizer state, and the run itself is untouched: its trajectory (every
per-epoch metric but the time and memory figures, and the final weights and optimizer state) is
bit-identical with and without forks, on 1 worker and on 2 gloo workers."""
import copy
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.training.test_loop import _spawn
from training import checkpoint as ckpt
from training import cooldown, measure
from training.config import OptimConfig, TrainConfig
from training.loop import build_run, fit, train_one_epoch
from training.optim import OPTIMIZERS

BASE = {"epochs": 3, "seed": 0, "data": {"name": "digits"}, "model": {"name": "mlp", "hidden": [64], "dropout": 0.2},
        "optim": {"name": "sgd", "base_lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
        "schedule": {"name": "cosine", "warmup": "linear", "warmup_epochs": 1},
        "regularization": {"mixup_alpha": 0.2},     # dropout and mixup: the run draws from every stream it has
        "scaling": {"batch_per_worker": 32}}
FORKS = {"rung_eval": {"epochs": [1, 2], "cooldown_fraction": 0.5}}
# What an epoch costs (time, throughput, memory) differs between any two runs; everything else must not.
COST = {"epoch_time_s", *measure.epoch_figures([0.0, 0.0, 0.0], 1, 0.0)}


class _Scalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))


def _fork_of_scalar(optimizer, model, steps, grad=1.0):
    """A fork of ``model`` under loss = grad * w (constant gradient); its evaluation reports w."""
    return cooldown.rung_metrics(model, optimizer, iter(range(10 ** 6)), lambda m, batch: grad * m.w,
                                 lambda m: {"val_loss": m.w.item(), "val_acc": 0.5}, steps=steps)


def test_the_fork_lr_falls_linearly_to_zero_from_the_runs():
    """SGD, no momentum, gradient 1: 4 fork steps at 0.1 x (1, 3/4, 1/2, 1/4) move w by -0.25."""
    model = _Scalar()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    m = _fork_of_scalar(opt, model, steps=4)
    assert m == {"rung_val_loss": pytest.approx(-0.25), "rung_val_acc": 0.5, "fork_steps": 4}
    assert model.w.item() == 0.0 and opt.param_groups[0]["lr"] == 0.1 and opt.state_dict()["state"] == {}


def test_the_fork_continues_the_runs_momentum_and_leaves_it_alone():
    """After one run step (momentum buffer 1), a 2-step fork: buffers 1.9 then 2.71 at LR 0.1 and 0.05."""
    model = _Scalar()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.w.grad = torch.ones(())
    opt.step()
    w, buf = model.w.item(), opt.state[model.w]["momentum_buffer"].clone()
    m = _fork_of_scalar(opt, model, steps=2)
    assert m["rung_val_loss"] == pytest.approx(w - 0.1 * 1.9 - 0.05 * 2.71)
    assert model.w.item() == w and torch.equal(opt.state[model.w]["momentum_buffer"], buf)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_copy_optimizer_continues_exactly_like_the_original(name):
    """The copy over copied weights takes the step the original takes, bit for bit, and stepping it
    changes nothing of the original's (every registered optimizer: SGD, AdamW, LARS, LAMB)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = OPTIMIZERS[name]([{"params": list(model.parameters()), "lr": 0.01, "weight_decay": 1e-2}],
                           OptimConfig.from_dict({"name": name}))
    grads = [torch.randn_like(p) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    opt.step()                                     # state to copy: moments, step counts, buffers
    fork = copy.deepcopy(model)
    twin = cooldown.copy_optimizer(opt, model, fork)
    before = copy.deepcopy(opt.state_dict())
    for m in (fork, model):
        for p, g in zip(m.parameters(), grads):
            p.grad = 2 * g
    twin.step()
    assert torch.equal(_flat_state(opt.state_dict()), _flat_state(before))   # the original's state: untouched
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fork.parameters()))
    assert torch.equal(_flat_state(opt.state_dict()), _flat_state(twin.state_dict()))


def _flat_state(state: dict) -> torch.Tensor:
    """Every tensor and number of an optimizer state dict, in order, as one float64 vector."""
    out = []
    for _, s in sorted(state["state"].items()):
        for _, v in sorted(s.items()):
            out.append(torch.as_tensor(v, dtype=torch.float64).flatten())
    return torch.cat(out) if out else torch.zeros(0)


def test_fork_steps_are_a_fraction_of_the_steps_so_far_and_at_least_one():
    assert [cooldown.fork_steps(n, 0.1) for n in (0, 4, 45, 135, 405)] == [1, 1, 4, 14, 40]


def test_a_fork_restores_every_random_stream_and_the_run_state():
    """run_fork draws from torch's, numpy's and Python's global streams and the loop's generators
    (dropout, mixup, the fork's loader); afterwards each is where it was, and so are the weights,
    the optimizer state and the run's step."""
    from training import loop

    run = build_run(TrainConfig.from_dict({**BASE, **FORKS}))
    train_one_epoch(run, 0)
    np.random.seed(3)
    random.seed(3)
    streams = lambda: (torch.get_rng_state(), run.gen.get_state(), run.aug_gen.get_state(),   # noqa: E731
                       np.random.get_state()[1].copy(), random.getstate())
    before, weights = streams(), {k: v.clone() for k, v in run.core.state_dict().items()}
    optim_state = copy.deepcopy(run.optimizer.state_dict())
    m = cooldown.run_fork(run, 1, 0, 1, lambda b: loop._train_inputs(run, b), lambda mod, x: loop._forward(run, mod, x),
                          lambda mod: loop.evaluate(mod, run))
    after = streams()
    assert all(torch.equal(a, b) for a, b in zip(before[:3], after[:3]))
    assert (before[3] == after[3]).all() and before[4] == after[4]
    assert all(torch.equal(v, run.core.state_dict()[k]) for k, v in weights.items())
    assert torch.equal(_flat_state(optim_state), _flat_state(run.optimizer.state_dict()))
    assert m["fork_steps"] == cooldown.fork_steps(run.step, 0.5) == round(0.5 * run.plan.steps_per_epoch)
    assert 0.5 < m["rung_val_acc"] <= 1.0 and m["rung_val_loss"] > 0


def _without_cost(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in COST} for m in history]


def _same_trajectory(plain: list[dict], forked: list[dict], rung_epochs: list[int]) -> None:
    """Every metric of the plain run, exactly, in the forked one; the fork's metrics at rung epochs only."""
    plain, forked = _without_cost(plain), _without_cost(forked)
    assert len(plain) == len(forked)
    for p, f in zip(plain, forked):
        extra = set(cooldown.METRICS) if p["epoch"] in rung_epochs else set()
        assert set(f) == set(p) | extra, p["epoch"]
        assert {k: f[k] for k in p} == p, p["epoch"]


def _final_state_equal(a: dict, b: dict) -> bool:
    return (all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
            and torch.equal(_flat_state(a["optimizer"]), _flat_state(b["optimizer"])) and a["step"] == b["step"]
            and torch.equal(a["rng"]["torch"], b["rng"]["torch"]) and torch.equal(a["rng"]["aug"], b["rng"]["aug"]))


def test_the_run_is_bit_identical_with_and_without_forks(tmp_path):
    cfg = TrainConfig.from_dict(BASE)
    plain = fit(cfg, workdir=tmp_path / "plain")
    forked = fit(cfg.with_updates(FORKS), workdir=tmp_path / "forked")
    _same_trajectory(plain.history, forked.history, [1, 2])
    assert _final_state_equal(ckpt.load(plain.last_checkpoint), ckpt.load(forked.last_checkpoint))
    assert forked.history[1]["fork_steps"] == round(0.5 * forked.history[1]["step"])


def test_the_bit_identity_check_catches_a_fork_that_moves_a_random_stream(tmp_path, monkeypatch):
    """The control: a fork that does not restore the random streams changes the run's trajectory
    (dropout masks and mixup draws shift), and the comparison above sees it."""
    import contextlib

    monkeypatch.setattr(cooldown, "preserved_rng", lambda *gens: contextlib.nullcontext())
    cfg = TrainConfig.from_dict({**BASE, "epochs": 2})
    plain = fit(cfg, workdir=tmp_path / "plain")
    forked = fit(cfg.with_updates({"rung_eval": {"epochs": [1]}}), workdir=tmp_path / "forked")
    with pytest.raises(AssertionError):
        _same_trajectory(plain.history, forked.history, [1])
    assert not _final_state_equal(ckpt.load(plain.last_checkpoint), ckpt.load(forked.last_checkpoint))


def _last_checkpoint(tmp: Path) -> dict:
    """Rank 0's last checkpoint of a fit() run whose workdir was a temporary directory under ``tmp``."""
    (found,) = tmp.glob("schedtune-fit-*/latest")
    return ckpt.load(found)


def test_the_run_is_bit_identical_with_and_without_forks_on_2_gloo_workers(tmp_path, monkeypatch):
    """Both ranks fork at rung epochs (the fork's gradients all-reduced, the same collectives on each)
    and report the same fork metrics; the run's metrics and final weights are those of a run without
    forks. (fit's default workdir is a temporary directory: each run gets its own TMPDIR.)"""
    cfg = TrainConfig.from_dict({**BASE, "scaling": {"num_workers": 2, "batch_per_worker": 16}})
    runs = {}
    for label, c in (("plain", cfg), ("forked", cfg.with_updates(FORKS))):
        (tmp_path / label).mkdir()
        monkeypatch.setenv("TMPDIR", str(tmp_path / label))
        runs[label] = _spawn("_fit_and_shards", c)
    plain, forked = runs["plain"], runs["forked"]
    for rank in (0, 1):
        _same_trajectory(plain[rank]["history"], forked[rank]["history"], [1, 2])
    for epoch in (0, 1):
        assert {k: forked[0]["history"][epoch][k] for k in cooldown.METRICS} == \
               {k: forked[1]["history"][epoch][k] for k in cooldown.METRICS}
    assert _final_state_equal(_last_checkpoint(tmp_path / "plain"), _last_checkpoint(tmp_path / "forked"))
