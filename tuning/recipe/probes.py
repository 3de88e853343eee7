"""The recipe's first three steps: short pure-PyTorch probes of one training config.

1. ``initial_loss``: the data loss at initialization with weight decay off, against ln(C).
2. ``overfit_small``: can the model reach 100% training accuracy on a few minibatches, with every
   regularizer off, within a step budget? If not, is the loss flat (LR too low / bad init) or
   exploding (LR too high)?
3. ``lr_sweep``: which learning rate makes the loss fall fastest in ~100 steps without diverging.

They run in the calling process (``training.loop.build_run`` / ``train_one_epoch`` on one worker,
the config's global batch kept), take seconds on small data, and return a ``StepResult``. The
verdict functions are pure so they can be checked on crafted curves. Learning rates are in
``optim.base_lr`` units (before the large-batch scaling rule), the quantity the search space
samples. Nothing here knows about Ray or MLflow.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from training.config import TrainConfig
from tuning.analysis.diagnose import exploded, moving_average

# --- thresholds (each says why)
# Initial loss: a softmax classifier at a sane init starts within ~2% of ln C (mlp, small_cnn and
# resnet18 on digits measured 2.31-2.35 vs 2.303); 10% still flags logits with std ~0.7 (the
# expected loss grows ~ std^2 / 2) before they cost anything.
INIT_LOSS_TOL = 0.10
INIT_BATCHES = 10                  # minibatches averaged for the initial loss (noise ~1%)
# Overfit: "the loss is not falling" when it lost less than 10% of its initial value over the budget
# (a flat loss at ln C moves ~0%; a working LR on 5 batches drops >90%).
MIN_DROP = 0.10
OVERFIT_BATCHES, OVERFIT_MAX_STEPS = 5, 300
# LR sweep: 100 steps from the same init per LR (the lecture's "~100 iterations"); the loss after
# them is the mean of the last 10% of steps (one minibatch is noisy).
SWEEP_STEPS, SWEEP_TAIL = 100, 0.10

# Every regularizer off (the overfit probe) and a constant LR (both probes).
REGULARIZATION_OFF = {"optim.weight_decay": 0.0, "model.dropout": 0.0, "data.augment": False,
                      "regularization": {"label_smoothing": 0.0, "mixup_alpha": 0.0, "cutmix_alpha": 0.0,
                                         "cutout": 0, "stochastic_depth": 0.0, "ema_decay": 0.0}}
CONSTANT_LR = {"schedule": {"name": "constant", "warmup": "none"}}


@dataclass
class StepResult:
    """What one recipe step found: a verdict (ok | warn | fail), a one-line summary, numbers."""
    step: str
    verdict: str
    summary: str
    evidence: dict[str, float] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)      # curves and picks (JSON-ready)
    plots: list[str] = field(default_factory=list)          # PNG paths

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def probe_config(cfg: TrainConfig, updates: Optional[dict] = None) -> TrainConfig:
    """``cfg`` on one process with the same global batch (so the same peak LR), plus ``updates``."""
    s = cfg.scaling
    return cfg.with_updates({"scaling.num_workers": 1, "scaling.batch_per_worker": s.batch_per_worker * s.num_workers,
                             **(updates or {})})


def _limit_steps(run, steps_per_epoch: int) -> None:
    run.plan = dataclasses.replace(run.plan, steps_per_epoch=max(1, min(run.plan.steps_per_epoch, steps_per_epoch)))


# ----------------------------------------------------------------------------- 1. initial loss

def initial_loss_verdict(loss: float, num_classes: int, *, l2_term: float = 0.0, labels_in_range: bool = True,
                         pretrained: bool = False) -> tuple[str, str]:
    """(verdict, cause) for the initial data loss against ln C."""
    expected = math.log(num_classes)
    rel = loss / expected - 1
    if not labels_in_range:
        return "fail", f"label problems: labels outside [0, {num_classes}) (the model has {num_classes} outputs)"
    if not math.isfinite(loss):
        return "fail", "bad initialization: the initial loss is not finite"
    if rel > INIT_LOSS_TOL:
        return "fail", ("bad initialization: the initial logits are too large (a softmax with small logits gives "
                        "ln C); scale the initial weights of the last layer down")
    if rel < -INIT_LOSS_TOL and not pretrained:
        return "fail", ("label problems: below chance before any training means the labels are predictable from "
                        "the init (leaked into the inputs, mostly one class, or a wrong number of classes)")
    if l2_term > INIT_LOSS_TOL * expected:
        return "warn", (f"weight decay on: the L2 term 0.5*wd*|w|^2 adds {l2_term:.3g} ({l2_term / expected:.0%} of "
                        "ln C) to the initial objective; the data loss is fine, the weight decay is likely too large")
    return "ok", "pretrained weights: below ln C as expected" if rel < -INIT_LOSS_TOL else ""


def initial_loss(cfg: TrainConfig, batches: int = INIT_BATCHES) -> StepResult:
    """Step 1: the data loss of ``cfg``'s freshly initialized model (eval mode, weight decay off)."""
    import torch
    from torch.utils.data import DataLoader

    from training.loop import build_run
    from training.regularizers import no_decay_names

    run = build_run(probe_config(cfg, {"optim.weight_decay": 0.0}))
    C = run.data.num_classes
    loader = DataLoader(run.data.train, batch_size=run.plan.global_batch, shuffle=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    run.model.eval()
    loss_sum = count = 0.0
    logit_sq, in_range = 0.0, True
    with torch.no_grad():
        for x, y in itertools.islice(loader, batches):
            x, y = x.to(run.device), y.to(run.device)
            in_range &= bool(((y >= 0) & (y < C)).all())
            logits = run.model(x)
            logit_sq += logits.float().var(dim=-1).sum().item()
            if in_range:
                loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
            count += len(y)
        skip = set() if cfg.optim.decay_norm_and_bias else no_decay_names(run.core)
        sq = sum(p.pow(2).sum().item() for n, p in run.core.named_parameters() if p.requires_grad and n not in skip)
    loss = loss_sum / max(count, 1) if in_range else math.nan
    l2 = 0.5 * cfg.optim.weight_decay * sq
    verdict, cause = initial_loss_verdict(loss, C, l2_term=l2, labels_in_range=in_range,
                                          pretrained=bool(cfg.model.pretrained))
    expected = math.log(C)
    ev = {"initial_loss": loss, "ln_num_classes": expected, "relative_error": loss / expected - 1,
          "num_classes": C, "logit_std": math.sqrt(logit_sq / max(count, 1)), "l2_term": l2,
          "samples": int(count)}
    summary = f"data loss at init {loss:.4g} vs ln({C}) = {expected:.4g} ({loss / expected - 1:+.1%})"
    return StepResult("initial-loss", verdict, summary + (f": {cause}" if cause else ""), ev)


# ----------------------------------------------------------------------------- 2. overfit a small sample

def overfit_verdict(losses: Sequence[float], reached_step: Optional[int], diverged: bool,
                    num_classes: Optional[int] = None) -> tuple[str, str]:
    """(verdict, what it looks like) for the overfit probe's per-step loss curve."""
    if reached_step is not None:
        return "ok", f"100% training accuracy after {reached_step} steps"
    chance = math.log(num_classes) if num_classes else None
    boom = exploded(list(losses), chance)
    if diverged or boom is not None:
        how = "became Inf/NaN" if diverged or (boom and "nonfinite_at" in boom) else f"exploded (x{boom['ratio']:.3g})"
        return "fail", f"the loss {how}: LR too high"
    smooth = moving_average(list(losses), 5)
    if not smooth or smooth[-1] > (1 - MIN_DROP) * smooth[0]:
        return "fail", "the loss is not falling: LR too low / bad initialization"
    return "warn", (f"the loss falls ({smooth[0]:.3g} -> {smooth[-1]:.3g}) but 100% was not reached in the budget: "
                    "LR too low (or a model too small to memorize)")


def overfit_small(cfg: TrainConfig, batches: int = OVERFIT_BATCHES, max_steps: int = OVERFIT_MAX_STEPS) -> StepResult:
    """Step 2: train on ``batches`` minibatches with every regularizer off until the model gets them
    all right (eval mode) or ``max_steps`` optimizer steps have run."""
    import torch
    from torch.utils.data import Subset

    from training.loop import Diverged, build_run, evaluate, train_one_epoch

    run = build_run(probe_config(cfg, {**REGULARIZATION_OFF, **CONSTANT_LR}))
    n = min(len(run.data.train), batches * run.plan.global_batch)
    pick = torch.randperm(len(run.data.train), generator=torch.Generator().manual_seed(cfg.seed))[:n]
    small = Subset(run.data.train, pick.tolist())
    run.data = dataclasses.replace(run.data, train=small, val=small)   # "val" = the sample, in eval mode
    _limit_steps(run, n // run.plan.global_batch)
    reached, diverged, acc, epoch = None, False, 0.0, 0
    try:
        while run.step < max_steps:
            train_one_epoch(run, epoch)
            epoch += 1
            acc = evaluate(run.model, run)["val_acc"]
            if acc >= 1.0:
                reached = run.step
                break
    except Diverged:
        diverged = True
    losses = list(run.trace["loss"])
    verdict, what = overfit_verdict(losses + ([math.inf] if diverged else []), reached, diverged,
                                    run.data.num_classes)
    ev = {"samples": n, "batches": n // run.plan.global_batch, "steps": run.step, "max_steps": max_steps,
          "train_acc": acc, "reached_100": int(reached is not None), "peak_lr": run.plan.peak_lr,
          "base_lr": cfg.optim.base_lr, "initial_loss": losses[0] if losses else math.nan,
          "final_loss": losses[-1] if losses else math.nan}
    summary = f"{n} samples, regularization off, lr {cfg.optim.base_lr:.3g}: {what}"
    return StepResult("overfit", verdict, summary, ev, {"loss": losses})


# ----------------------------------------------------------------------------- 3. LR sweep

def default_lrs(low: float, high: float) -> list[float]:
    """Half-decade geometric LRs spanning [low, high] (both included, rounded to 2 digits)."""
    n = max(2, round(2 * math.log10(high / low)) + 1)
    return [float(f"{low * (high / low) ** (i / (n - 1)):.2g}") for i in range(n)]


def pick_lr(lrs: Sequence[float], curves: Sequence[Sequence[float]], num_classes: Optional[int] = None) -> dict:
    """The LR whose loss fell the most within the sweep's steps, among those that did not diverge.

    Returns {"lr", "index", "final": [...], "drop": [...], "diverged": [bool...]}; "lr" is None
    when every LR diverged.
    """
    chance = math.log(num_classes) if num_classes else None
    finals, drops, bad = [], [], []
    for curve in curves:
        curve = list(curve)
        tail = curve[-max(1, round(SWEEP_TAIL * len(curve))):] if curve else [math.inf]
        final = sum(tail) / len(tail)
        start = chance or (curve[0] if curve else math.inf)
        diverged = (not curve or not math.isfinite(final) or exploded(curve, chance) is not None
                    or final > start)
        finals.append(final)
        drops.append(1 - final / start if math.isfinite(final) and start else -math.inf)
        bad.append(diverged)
    ok = [i for i in range(len(lrs)) if not bad[i]]
    best = min(ok, key=lambda i: finals[i]) if ok else None
    return {"lr": lrs[best] if best is not None else None, "index": best, "final": finals, "drop": drops,
            "diverged": bad}


def lr_sweep(cfg: TrainConfig, lrs: Sequence[float], steps: int = SWEEP_STEPS) -> StepResult:
    """Step 3: ``steps`` steps at each LR in ``lrs`` (base_lr units), from the same initialization and
    batch order, constant LR; picks the LR at which the loss falls fastest without diverging.

    (A single run with an exponentially growing LR, Smith's range test, confounds time with LR:
    on digits its steepest-descent point moved 2x with the step count and sat 3-10x below the LR a
    grid finds best; one short run per LR does not.)
    """
    from training.loop import Diverged, build_run, train_one_epoch

    curves, num_classes = [], None
    for lr in lrs:
        run = build_run(probe_config(cfg, {**CONSTANT_LR, "optim.base_lr": float(lr), "epochs": 1}))
        num_classes = run.data.num_classes
        _limit_steps(run, steps)
        epoch = 0
        try:
            while run.step < steps:
                train_one_epoch(run, epoch)
                epoch += 1
            curves.append(list(run.trace["loss"][:steps]))
        except Diverged:
            curves.append(list(run.trace["loss"]) + [math.inf])
    pick = pick_lr(lrs, curves, num_classes)
    lr, i = pick["lr"], pick["index"]
    ev = {"lr_min": min(lrs), "lr_max": max(lrs), "num_lrs": len(lrs), "steps": steps}
    data = {"lrs": list(lrs), "curves": [[v if math.isfinite(v) else None for v in c] for c in curves], **pick,
            "final": [v if math.isfinite(v) else None for v in pick["final"]],
            "drop": [v if math.isfinite(v) else None for v in pick["drop"]]}
    if lr is None:
        return StepResult("lr-find", "fail", f"every LR in [{min(lrs):.3g}, {max(lrs):.3g}] diverged: lower the range",
                          ev, data)
    first_bad = next((x for x, b in zip(lrs, pick["diverged"]) if b and x > lr), None)
    ev.update({"lr": lr, "loss_drop": pick["drop"][i], "final_loss": pick["final"][i]})
    if first_bad is not None:
        ev["diverges_at"] = first_bad
    verdict = "ok" if pick["drop"][i] >= MIN_DROP else "warn"
    summary = (f"base_lr {lr:.3g}: the loss falls {pick['drop'][i]:.0%} in {steps} steps"
               + (f"; diverges from {first_bad:.3g}" if first_bad is not None else "")
               + ("" if verdict == "ok" else ": no LR makes the loss fall significantly (see the overfit step)"))
    return StepResult("lr-find", verdict, summary, ev, data)
