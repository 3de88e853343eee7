"""The per-worker training loop: ``fit(cfg, report)``.

Runs on one process, or on every worker of a data-parallel group when a
``torch.distributed`` process group exists (the caller creates it; Ray Train does). The step
body is tiny (forward, backward, clip, step, schedule); evaluation, checkpointing and
reporting happen once per epoch. Metrics are aggregated across workers (sums all-reduced),
so every worker reports the same numbers. Nothing here knows about Ray.

Around it: the input pipeline (training.pipeline), precision and kernels (training.precision),
and the per-epoch cost figures (training.measure).
"""
from __future__ import annotations

import contextlib
import itertools
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, DistributedSampler

from training import checkpoint as ckpt
from training import cooldown, measure, pipeline
from training.config import TrainConfig
from training.data import DataBundle, load_data
from training.divergence import Diverged, grad_norm, poisoned
from training.ensemble import cycle_end_steps, snapshot, snapshot_ensemble
from training.models import apply_transfer, build_model
from training.optim import build_optimizer
from training.precision import Precision, compiled, has_conv2d
from training.regularizers import augment_images, mix_batch, param_groups, soft_cross_entropy
from training.schedules import StepPlan, lambda_lr, plan_steps

# report(metrics, checkpoint_dir): checkpoint_dir is a directory to persist, or None.
Reporter = Callable[[dict[str, float], Optional[str]], None]


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)   # one metrics dict per epoch
    trace: dict[str, list] = field(default_factory=dict)            # see Trace: the run's curves
    best: Optional[dict[str, float]] = None                         # metrics of the best epoch
    best_checkpoint: Optional[str] = None
    last_checkpoint: Optional[str] = None
    plan: Optional[StepPlan] = None


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sum(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    """Sum ``values`` over all workers (or reduce them with ``op``, "max"; identity on one process)."""
    if _world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op.upper()))
    return t.tolist()


def default_device(cfg: TrainConfig) -> torch.device:
    if cfg.scaling.use_gpu and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass
class _Run:
    """Everything one fit() call builds; the functions below share it."""
    cfg: TrainConfig
    data: DataBundle
    plan: StepPlan
    model: nn.Module          # what the step calls: DDP-wrapped where distributed, compiled where asked
    core: nn.Module           # the bare model (for checkpoints, EMA, snapshots)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: Optional[torch.optim.swa_utils.AveragedModel]
    gen: torch.Generator      # mixing stream (per worker, CPU: mixup/cutmix draw host scalars)
    device: torch.device
    precision: Precision
    aug_gen: torch.Generator  # augmentation stream on the device (``gen`` itself on CPU)
    channels_last: bool = False   # inputs in NHWC (train.channels_last, for a model with 2-D convolutions)
    ddp: Optional[nn.parallel.DistributedDataParallel] = None   # for no_sync under accumulation
    loaders: pipeline.Loaders = field(default_factory=pipeline.Loaders)
    step: int = 0
    trace: dict[str, list] = field(default_factory=lambda: {"loss": [], "lr": [], "layer_update_ratio": []})
    # trace (kept in every checkpoint, for plots and diagnosis): "loss" and "lr" per optimizer step
    # (this worker's micro-batch mean loss; the head group's LR); "layer_update_ratio" one
    # {layer: ||dW|| / ||W||} per epoch, measured on its last step.
    snapshot_steps: frozenset[int] = frozenset()   # cyclic_cosine: steps done when a cycle ends
    snapshots: list[dict[str, torch.Tensor]] = field(default_factory=list)   # weights at those steps


def build_run(cfg: TrainConfig, device: torch.device | None = None, data: DataBundle | None = None) -> _Run:
    """Data (``data``, else ``load_data(cfg.data)``), model, optimizer, scheduler and EMA for ``cfg`` on this worker."""
    rank, world = _world()
    device = device or default_device(cfg)
    torch.manual_seed(cfg.seed)  # identical initial weights on every worker
    data = load_data(cfg.data) if data is None else data
    plan = plan_steps(cfg, len(data.train))
    core, head = _build_model(cfg, data, world)
    channels_last = cfg.channels_last and has_conv2d(core)
    core.to(device, memory_format=torch.channels_last) if channels_last else core.to(device)
    ddp = None
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(core, device_ids=[device.index] if device.type == "cuda" else None)
    model = compiled(core if ddp is None else ddp, cfg.compile)   # once per worker; core stays uncompiled
    groups = param_groups(core, cfg.optim, plan.peak_lr, {id(p) for p in head},
                          cfg.model.effective_backbone_lr_mult)
    optimizer = build_optimizer(groups, cfg.optim)
    scheduler = lambda_lr(optimizer, cfg, plan)
    ema = None
    if cfg.regularization.ema_decay > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        ema = AveragedModel(core, multi_avg_fn=get_ema_multi_avg_fn(cfg.regularization.ema_decay), use_buffers=True)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    aug_gen = gen if device.type == "cpu" else torch.Generator(device).manual_seed(cfg.seed * 1000 + rank)
    run = _Run(cfg, data, plan, model, core, optimizer, scheduler, ema, gen, device, Precision(cfg.precision, device),
               aug_gen, channels_last, ddp)
    if cfg.schedule.name == "cyclic_cosine":
        run.snapshot_steps = frozenset(cycle_end_steps(plan.total_steps, plan.warmup_steps, cfg.schedule.cycles))
    return run


def _build_model(cfg: TrainConfig, data: DataBundle, world: int) -> tuple[nn.Module, list[nn.Parameter]]:
    """The bare model (transfer mode applied) and its head's parameters. BN statistics stay per
    worker unless ``scaling.sync_batchnorm`` (GPU only) and there is more than one worker."""
    core = build_model(cfg.model, data.num_classes, data.input_shape,
                       stochastic_depth=cfg.regularization.stochastic_depth)
    _, head = apply_transfer(core, cfg.model)
    if cfg.scaling.sync_batchnorm and world > 1:
        core = nn.SyncBatchNorm.convert_sync_batchnorm(core)
    return core, head


def _sampler(run: _Run, epoch: int) -> DistributedSampler:
    """This worker's shard of the training set for ``epoch`` (see pipeline.sampler)."""
    return pipeline.sampler(run.data.train, run.cfg.seed, *_world(), epoch)


def _loader(run: _Run, epoch: int) -> DataLoader:
    """This worker's train loader, built once per fit, at ``epoch``'s shuffle."""
    return run.loaders.train(run.data.train, run.cfg, *_world(), run.device, epoch)


def _val_loader(run: _Run) -> DataLoader:
    """The validation set in order, each worker taking a contiguous shard."""
    return run.loaders.val(run.data.val, run.cfg, *_world(), run.device)


def _train_inputs(run: _Run, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch on the device, standardized and augmented there."""
    x, y = pipeline.to_device(batch, run.data.train, run.device)
    return augment_images(x, run.cfg.data, run.cfg.regularization, run.aug_gen), y


def _forward(run: _Run, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` in the run's precision and memory format; fp32 logits."""
    if run.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with run.precision.autocast():
        return model(x).float()


def _update_ratios(run: _Run, before: dict[str, torch.Tensor]) -> dict[str, float]:
    """||w_after - w_before|| / ||w_before|| per weight matrix (the lecture: want ~1e-3)."""
    weights = _weights(run)
    return {name: ((weights[name].detach() - b).norm() / (b.norm() + 1e-12)).item() for name, b in before.items()}


def _weights(run: _Run) -> dict[str, torch.Tensor]:
    return {n: p for n, p in run.core.named_parameters() if p.requires_grad and p.dim() > 1}


def train_one_epoch(run: _Run, epoch: int) -> dict[str, float]:
    """One pass over this worker's shard; returns aggregated train metrics and the epoch's cost
    figures (training.measure: data wait, throughput, step time, peak memory)."""
    cfg, accum = run.cfg, run.cfg.scaling.grad_accum_steps
    distributed = _world()[1] > 1
    run.model.train()
    measure.reset_peak_memory(run.device)
    loss_sum = count = norm_sum = micro_loss = 0.0
    correct = torch.zeros((), dtype=torch.long, device=run.device)   # summed on device: no sync per step
    n_steps, ratio, lr = 0, 0.0, 0.0
    params = [p for p in run.core.parameters() if p.requires_grad]
    start = time.perf_counter()
    batches = measure.DataWait(itertools.islice(_loader(run, epoch), run.plan.steps_per_epoch * accum))
    for i, batch in enumerate(batches):
        x, y = _train_inputs(run, batch)
        xm, target = mix_batch(x, y, cfg.regularization, run.data.num_classes, run.gen)
        last_micro = (i + 1) % accum == 0
        skip_sync = accum > 1 and not last_micro and run.ddp is not None
        with run.ddp.no_sync() if skip_sync else contextlib.nullcontext():
            logits = _forward(run, run.model, xm)
            loss = soft_cross_entropy(logits, target, cfg.regularization.label_smoothing)
            run.precision.backward((poisoned(loss) if distributed else loss) / accum)
        batch_loss = loss.item()     # the per-step trace needs it anyway: one sync for all its uses
        loss_sum += batch_loss * len(y)
        correct += (logits.argmax(-1) == y).sum()
        count += len(y)
        micro_loss += batch_loss / accum
        if not last_micro:
            continue
        lr = run.optimizer.param_groups[-1]["lr"]
        run.precision.unscale(run.optimizer)
        norm = grad_norm(params, cfg.optim.grad_clip)
        _check_finite(run, micro_loss, norm, lr)   # this step's loss: the mean over its micro-batches
        measure_ratio = n_steps == run.plan.steps_per_epoch - 1
        before = {n: w.detach().clone() for n, w in _weights(run).items()} if measure_ratio else None
        run.precision.step(run.optimizer)
        run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()
        _average(run)
        if before is not None:
            layers = _update_ratios(run, before)
            run.trace["layer_update_ratio"].append(layers)
            ratio = float(torch.tensor(list(layers.values())).median()) if layers else 0.0
        run.trace["loss"].append(micro_loss)
        run.trace["lr"].append(lr)
        micro_loss = 0.0
        run.step += 1
        n_steps += 1
        norm_sum += norm
    correct = correct.item()   # waits for the device: the step loop's time below includes its work
    figures = measure.worker_figures(count, n_steps, time.perf_counter() - start, batches.seconds)
    loss_sum, correct, count, *figures = _all_sum([loss_sum, correct, count, *figures], run.device)
    (peak_mb,) = _all_sum([measure.peak_memory_mb(run.device)], run.device, "max")
    train_loss = loss_sum / max(count, 1)
    if not math.isfinite(train_loss):
        raise Diverged(run.step, run.optimizer.param_groups[-1]["lr"], train_loss, "train loss")
    return {"train_loss": train_loss, "train_acc": correct / max(count, 1), "lr": lr,
            "grad_norm": norm_sum / max(n_steps, 1), "update_ratio": ratio,
            **measure.epoch_figures(figures, _world()[1], peak_mb)}


def _check_finite(run: _Run, loss: float, norm: float, lr: float) -> None:
    """Raise Diverged for a step whose loss or gradient norm is not finite, except, under fp16, a
    gradient overflow with finite losses on every worker: the scaler skips that step and backs
    off. Workers tell the two apart with one all-reduce on such steps only (the gradients are
    all-reduced, so every worker sees the non-finite norm at the same step: none waits alone)."""
    if math.isfinite(loss) and math.isfinite(norm):
        return
    if run.precision.skips_overflow and _all_sum([float(not math.isfinite(loss))], run.device)[0] == 0:
        return
    if not math.isfinite(loss):
        raise Diverged(run.step, lr, loss, "loss")
    raise Diverged(run.step, lr, norm)   # grads are all-reduced: every worker stops at the same step


def _average(run: _Run) -> None:
    """After every optimizer step: the EMA update, and a snapshot of the weights where a
    cyclic_cosine cycle ends (``run.step`` still counts the steps before this one)."""
    if run.ema is not None:
        run.ema.update_parameters(run.core)
    if run.step + 1 in run.snapshot_steps:
        run.snapshots.append(snapshot(run.core))


@torch.no_grad()
def evaluate(model: nn.Module, run: _Run) -> dict[str, float]:
    """Validation loss/accuracy over the whole val set, each worker taking a contiguous shard."""
    model.eval()
    loss_sum = correct = count = 0.0
    for batch in _val_loader(run):
        x, y = pipeline.to_device(batch, run.data.val, run.device)
        logits = _forward(run, model, x)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        count += len(y)
    loss_sum, correct, count = _all_sum([loss_sum, correct, count], run.device)
    return {"val_loss": loss_sum / max(count, 1), "val_acc": correct / max(count, 1)}


def _snapshot_metrics(run: _Run) -> dict[str, float]:
    """The val metrics of the ensemble of the cycle-end snapshots (their mean probabilities)."""
    m = evaluate(snapshot_ensemble(run.core, run.snapshots), run)
    return {**{f"snapshot_ensemble_{k}": v for k, v in m.items()}, "snapshot_ensemble_size": len(run.snapshots)}


def _state(run: _Run, epoch: int, best: Optional[dict]) -> dict[str, Any]:
    """Everything a resume needs, as plain data (checkpoint.load reads it weights-only). The
    schedule is kept as its step only: on restore the LR comes from the config (_restore_optimizer)."""
    return {"model": run.core.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": {"last_epoch": run.scheduler.last_epoch}, "scaler": run.precision.state_dict(),
            "ema": run.ema.state_dict() if run.ema else None,
            "rng": ckpt.rng_state(run.gen, _device_gen(run)), "epoch": epoch, "step": run.step, "best": best,
            "trace": run.trace, "snapshots": run.snapshots}


def _device_gen(run: _Run) -> Optional[torch.Generator]:
    return None if run.aug_gen is run.gen else run.aug_gen


def _restore(run: _Run, path: str | Path) -> tuple[int, Optional[dict]]:
    state = ckpt.load(path)
    ckpt.load_model_state(run.core, path, state)
    _restore_optimizer(run, path, state["optimizer"], state["scheduler"]["last_epoch"])
    run.precision.load_state_dict(state.get("scaler"))
    if run.ema is not None and state.get("ema") is not None:
        run.ema.load_state_dict(state["ema"])
    ckpt.set_rng_state(state["rng"], run.gen, _device_gen(run))
    run.step = state["step"]
    run.trace = state.get("trace") or run.trace
    run.snapshots = state.get("snapshots") or []
    return state["epoch"], state.get("best")


def _restore_optimizer(run: _Run, path: str | Path, saved: dict, step: int) -> None:
    """The saved optimizer state (momentum buffers, Adam moments) under this run's hyperparameters.

    A checkpoint keeps the step, not LR values: every param group's settings (its peak LR from
    optim.base_lr through the scaling rule and model.backbone_lr_mult, its weight decay, momentum,
    betas) come from the config being restored, and its LR is the schedule's at ``step``. So a run
    restored under another base_lr (PBT's exploit) trains at that LR from its next step.
    """
    settings = [{k: v for k, v in g.items() if k != "params"} for g in run.optimizer.param_groups]
    try:
        run.optimizer.load_state_dict(saved)
    except ValueError as e:   # another grouping of the parameters (a transfer mode, decay_norm_and_bias)
        raise ckpt.CheckpointError(f"{ckpt.state_file(path)}: its optimizer state does not fit this config's "
                                   f"parameter groups ({e})") from e
    for group, own in zip(run.optimizer.param_groups, settings):
        group.update(own, lr=own["initial_lr"])   # initial_lr: the group's peak LR (LambdaLR's base)
    # A scheduler that starts at ``step``: LambdaLR sets every group's LR to its base x the multiplier there.
    run.scheduler = LambdaLR(run.optimizer, run.scheduler.lr_lambdas, last_epoch=step - 1)


def _better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def fit(cfg: TrainConfig, report: Reporter | None = None, *, workdir: str | Path | None = None,
        resume_from: str | Path | None = None, device: torch.device | None = None,
        data: DataBundle | None = None) -> FitResult:
    """Train ``cfg.epochs`` epochs (or what remains after ``resume_from``) on ``data``, reporting each epoch.

    Every worker calls ``report(metrics, checkpoint_dir)``; only rank 0 passes a directory, on the
    epochs it saves one (every ``checkpoint.every_epochs``, the last, and every new best).
    ``workdir``: the ``latest`` and ``best`` checkpoints (a temp dir when None). ``data``: load_data(cfg.data) if None.
    Raises ``Diverged`` on a NaN/Inf loss or gradient.
    """
    run = build_run(cfg, device, data)
    result = FitResult(plan=run.plan, trace=run.trace)
    workdir = Path(workdir or tempfile.mkdtemp(prefix="schedtune-fit-"))
    start_epoch, best = _restore(run, resume_from) if resume_from else (0, None)
    if resume_from and start_epoch >= cfg.epochs and report is not None:
        # Resumed at the very end (the run finished, its caller did not hear of it): say so again.
        report(ckpt.read_meta(resume_from)["metrics"], None)
    try:
        _epochs(run, result, start_epoch, best, report, workdir)
    finally:
        run.loaders.close()   # the loader worker processes end with the fit
    return result


def _epochs(run: _Run, result: FitResult, start_epoch: int, best: Optional[dict], report: Reporter | None,
            workdir: Path) -> None:
    """fit's epochs from ``start_epoch``: train, evaluate, checkpoint, report."""
    cfg, rank = run.cfg, _world()[0]
    key, mode = cfg.checkpoint.metric, cfg.checkpoint.mode
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        tr = train_one_epoch(run, epoch)
        metrics = {"epoch": epoch + 1, "step": run.step, **tr, **evaluate(run.model, run)}
        if run.ema is not None:
            metrics.update({f"ema_{k}": v for k, v in evaluate(run.ema, run).items()})
        if epoch + 1 == cfg.epochs and run.snapshots:
            metrics.update(_snapshot_metrics(run))
        if epoch + 1 in cfg.rung_eval.epochs:   # a cooldown fork (training.cooldown); its time counts in the epoch's
            metrics.update(cooldown.run_fork(run, epoch + 1, *_world(), lambda b: _train_inputs(run, b),
                                             lambda m, x: _forward(run, m, x), lambda m: evaluate(m, run)))
        metrics["epoch_time_s"] = time.perf_counter() - t0
        metrics["num_params"] = float(sum(p.numel() for p in run.core.parameters()))   # an objective: model size
        is_best = key in metrics and (best is None or _better(metrics[key], best[key], mode))
        if is_best:
            best = dict(metrics)
        directory = None
        # A checkpoint every checkpoint.every_epochs, at the end, and at every new best: the best is
        # in best/ and among the reported checkpoints, whatever every_epochs says.
        due = (epoch + 1) % cfg.checkpoint.every_epochs == 0 or epoch + 1 == cfg.epochs
        if rank == 0 and (due or is_best):
            meta = {"epoch": epoch + 1, "step": run.step, "metrics": metrics, "is_best": is_best,
                    "config": cfg.to_dict(), "class_names": run.data.class_names,
                    "num_classes": run.data.num_classes, "input_shape": list(run.data.input_shape)}
            directory = str(ckpt.save(workdir / "latest", _state(run, epoch + 1, best), meta))
            result.last_checkpoint = directory
            if is_best:
                result.best_checkpoint = str(ckpt.copy(directory, workdir / "best"))
        result.history.append(metrics)
        if report is not None:
            report(metrics, directory)
    result.best, result.trace = best, run.trace
