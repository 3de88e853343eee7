"""Cooldown forks: what a run would score if its learning rate cooled down to 0 from here.

ASHA compares trials at rung epochs, while their schedules have not decayed yet: a config whose
LR is still high looks worse than it will end, a constant-LR one better. A fork is the run's
any-time estimate (the idea behind warmup-stable-decay schedules: a short decay appended
anywhere finishes a run): copies of the model and of the optimizer state train ``fork_steps``
optimizer steps (a fraction of the steps so far) with every parameter group's LR falling
linearly from where the run is to 0, and the copy is evaluated on the validation split.

The run itself is left exactly as it was: its weights, its optimizer state, its gradient scaler,
its loaders and every random stream (torch's CPU and CUDA generators, numpy's and Python's
global ones, and the generators the caller names: the loop's mixing and augmentation streams)
are the same after a fork, so its trajectory is bit-identical with and without forks
(tests/training/test_cooldown.py, on 1 and 2 workers).

Under data parallelism every worker forks at the same step (the same number of steps and
collectives on each): the fork's gradients are averaged with one all-reduce per step (the fork
is not wrapped in a second DDP), and its buffers (BN statistics) are broadcast from rank 0 before
the evaluation, so every worker evaluates the same model on its shard of the validation set.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import math
import random
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from training import pipeline
from training.config import ScheduleConfig, TrainConfig
from training.divergence import grad_norm
from training.precision import Precision
from training.regularizers import mix_batch, soft_cross_entropy
from training.schedules import lr_multiplier

# The fork's schedule: 1 - step / steps (the linear schedule, no warmup): the first fork step at the
# run's current LR, the last at 1/steps of it.
_COOLDOWN = ScheduleConfig(name="linear")
METRICS = ("rung_val_acc", "rung_val_loss", "fork_steps")   # what a fork adds to its epoch's report


def fork_steps(steps_so_far: int, fraction: float) -> int:
    """Optimizer steps of a fork taken after ``steps_so_far`` steps: ``round(fraction * steps_so_far)``,
    at least one."""
    return max(1, round(fraction * steps_so_far))


def fork_batches(ds: Dataset, cfg: TrainConfig, rank: int, world: int, first_epoch: int) -> Iterator:
    """This worker's training micro-batches for a fork, as its loader yields them (before they reach
    the device): its shards of epochs ``first_epoch``, ``first_epoch + 1``, ... (the shuffles the run
    itself sees next), ``scaling.batch_per_worker`` at a time, loaded in this process, so the run's
    own loaders (and their worker processes) are never touched."""
    for epoch in itertools.count(first_epoch):
        shard = pipeline.sampler(ds, cfg.seed, rank, world, epoch)
        yield from pipeline.batches(ds, shard, cfg.scaling.batch_per_worker, True, 0)


@contextlib.contextmanager
def preserved_rng(*generators: Optional[torch.Generator]) -> Iterator[None]:
    """Every random stream as it was on entry, again on exit: torch's global CPU generator and its
    CUDA ones (where CUDA is in use), numpy's and Python's global generators, and ``generators``."""
    gens = list({id(g): g for g in generators if g is not None}.values())
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    saved = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None, np.random.get_state(),
             random.getstate(), [g.get_state() for g in gens])
    try:
        yield
    finally:
        cpu, cuda_states, np_state, py_state, gen_states = saved
        torch.set_rng_state(cpu)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        np.random.set_state(np_state)
        random.setstate(py_state)
        for g, s in zip(gens, gen_states):
            g.set_state(s)


def copy_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, fork: nn.Module) -> torch.optim.Optimizer:
    """An optimizer of ``optimizer``'s class over ``fork``'s parameters (copies of ``model``'s, in the
    same order) holding a copy of its state: momentum buffers, moments, step counts, and every
    group's settings and current LR. Not ``copy.deepcopy(optimizer)``: an LR scheduler replaces an
    optimizer's ``step`` with a wrapper that calls back into the original, which a deep copy keeps."""
    twin = {id(p): q for p, q in zip(model.parameters(), fork.parameters())}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [twin[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    accepted = inspect.signature(type(optimizer)).parameters   # defaults may hold keys __init__ does not take
    out = type(optimizer)(groups, **{k: v for k, v in optimizer.defaults.items() if k in accepted and k != "params"})
    out.load_state_dict(copy.deepcopy(optimizer.state_dict()))   # load_state_dict alone would share the tensors
    return out


def _mean_gradients(params: list[nn.Parameter]) -> None:
    """Average the gradients over the workers (one all-reduce per tensor; a no-op on one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def _same_buffers(model: nn.Module) -> None:
    """Every worker's buffers (BN running statistics) set to rank 0's, as DDP's broadcast_buffers does."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for b in model.buffers():
            dist.broadcast(b, 0)


def rung_metrics(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator,
                 loss: Callable[[nn.Module, Any], torch.Tensor], evaluate: Callable[[nn.Module], dict[str, float]],
                 *, steps: int, accum: int = 1, grad_clip: Optional[float] = None, precision: Any = None,
                 generators: tuple[Optional[torch.Generator], ...] = ()) -> dict[str, float]:
    """Fork ``model`` and ``optimizer`` (the bare model: not a DDP or compiled wrapper), train the fork
    ``steps`` optimizer steps of ``accum`` micro-batches from ``batches`` with every group's LR decaying
    linearly from its current value to 0, evaluate it, and return ``rung_val_acc``, ``rung_val_loss``
    (inf where the fork diverged, so a scheduler minimizing it stops the trial) and ``fork_steps``.

    ``loss(model, batch)``: a micro-batch's training loss (the run's inputs, mixing, precision);
    ``evaluate(model)``: ``{"val_loss", "val_acc"}`` on the validation split (aggregated over workers);
    ``precision``: the run's training.precision.Precision (copied: the run's gradient scaler is never
    stepped; None: fp32); ``generators``: the random streams ``loss`` draws from besides the global ones. Every one
    of them, and the global streams, are restored on return (see ``preserved_rng``)."""
    if steps < 1 or accum < 1:
        raise ValueError(f"a fork needs steps >= 1 and accum >= 1, got steps={steps}, accum={accum}")
    with preserved_rng(*generators):
        fork = copy.deepcopy(model)
        fork_opt = copy_optimizer(optimizer, model, fork)
        scaler = copy.deepcopy(precision) if precision is not None else Precision("fp32", torch.device("cpu"))
        start = [g["lr"] for g in fork_opt.param_groups]
        params = [p for p in fork.parameters() if p.requires_grad]
        fork.train()
        for step in range(steps):
            factor = lr_multiplier(_COOLDOWN, step, steps)
            for group, lr in zip(fork_opt.param_groups, start):
                group["lr"] = lr * factor
            for _ in range(accum):
                scaler.backward(loss(fork, next(batches)) / accum)
            _mean_gradients(params)
            scaler.unscale(fork_opt)
            grad_norm(params, grad_clip)   # clips where optim.grad_clip is set, as the run's steps do
            scaler.step(fork_opt)          # fp32/bf16: the plain step (a disabled scaler passes through)
            fork_opt.zero_grad(set_to_none=True)
        _same_buffers(fork)
        m = evaluate(fork)
    val_loss = m["val_loss"] if math.isfinite(m["val_loss"]) else math.inf
    return {"rung_val_acc": m["val_acc"], "rung_val_loss": val_loss, "fork_steps": steps}


def run_fork(run: Any, first_epoch: int, rank: int, world: int, inputs: Callable[[Any], tuple],
             forward: Callable[[nn.Module, torch.Tensor], torch.Tensor],
             evaluate: Callable[[nn.Module], dict[str, float]]) -> dict[str, float]:
    """``rung_metrics`` for the training loop's run (training.loop's ``_Run``: its bare model, optimizer,
    config, data, precision, step and random streams) after ``first_epoch`` epochs: a fork of
    ``train.rung_eval.cooldown_fraction`` x the steps so far, on the shuffles the run sees next, with the
    run's own ``inputs(batch) -> (x, y)`` on the device, mixing, label smoothing and ``forward(model, x)``."""
    cfg = run.cfg
    reg = cfg.regularization

    def loss(model: nn.Module, batch) -> torch.Tensor:
        x, y = inputs(batch)
        xm, target = mix_batch(x, y, reg, run.data.num_classes, run.gen)
        return soft_cross_entropy(forward(model, xm), target, reg.label_smoothing)

    return rung_metrics(run.core, run.optimizer, fork_batches(run.data.train, cfg, rank, world, first_epoch), loss,
                        evaluate, steps=fork_steps(run.step, cfg.rung_eval.cooldown_fraction),
                        accum=cfg.scaling.grad_accum_steps, grad_clip=cfg.optim.grad_clip, precision=run.precision,
                        generators=(run.gen, run.aug_gen))
