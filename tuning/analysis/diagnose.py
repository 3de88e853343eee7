"""Learning-curve diagnosis: a trial's per-epoch history in, one verdict with its evidence out.

Pure functions over plain data (no Ray, no MLflow, no torch), shared by ``schedtune tune`` (the
tracker tags every trial's MLflow run), ``schedtune report`` and ``schedtune recipe``.

``history`` is the list of per-epoch metric dicts as ``training.loop.fit`` returns them and Tune
reports them (``epoch``, ``train_loss``, ``val_loss``, ``train_acc``, ``val_acc``, ``update_ratio``,
``data_wait_fraction``, ``epoch_time_s``;
a diverged trial's last entry has ``diverged: 1``). ``step_losses`` (optional) is the run's
per-step training loss (``trace["loss"]``); it is the only way to see a loss that exploded and came
back down within one epoch. The checks run in this order; the first that fires is the verdict:

1. diverged        loss Inf/NaN, the loop's divergence flag, or the loss exploding
2. plateau_at_start the loss did not move from its initial value for the first epochs
3. no_learning     the validation accuracy still at chance at the end (a run of SHORT_EPOCHS or more:
                   the training accuracy too); a short run without an accuracy: its validation loss at ln C
4. input_bound     the step waited for data more than INPUT_BOUND_WAIT of the time (``data_wait_fraction``,
                   tuning.analysis.data_wait); its advice ends with what checks 5-9 say of the curves
5. too_short       a short run (fewer than SHORT_EPOCHS epochs: ASHA stops most trials at their first
                   rung) that left chance: overfitting, still improving and underfitting are trends
                   over SHORT_EPOCHS epochs, and one or two epochs have none to read
6. overfitting     a large train/val accuracy gap that grows (or a rising validation loss)
7. still_improving the validation loss still falls at the end
8. underfitting    both loss curves flat (|trend| < IMPROVING_RATE) and the accuracies close, and
                   the model does not fit its training set
9. healthy         none of the above

Why input_bound sits there: checks 1-3 find a trial whose results mean nothing (a wrong LR or init);
its speed is moot and the config is the fix. Checks 5-9 read how to tune a recipe whose epochs were
spent training; a trial that idled its accelerator a fifth of the time or more pays that in every
epoch of every trial sharing its input pipeline, which the curves cannot show, and the fix is a
config key (no new search). So it comes first among those, with their verdict kept in its advice.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from tuning.analysis.data_wait import advice as input_bound_advice, input_bound_evidence

KINDS = ("diverged", "plateau_at_start", "no_learning", "input_bound", "too_short", "overfitting", "still_improving",
         "underfitting", "healthy")

# --- thresholds (each says why)
# Exploding: a loss 3x the one at initialization (~ln C for a softmax over C classes) is far outside
# the noise of minibatch losses and means the optimizer is throwing the weights around.
EXPLODE_FACTOR = 3.0
# The per-step loss is smoothed over this many steps before the explosion check, so one bad
# minibatch is not a divergence.
STEP_SMOOTHING = 5
# Plateau: an epoch whose mean training loss is within 1% of the first epoch's has learned nothing
# measurable (the zero-init MLP on digits moves 0.1%; a healthy run drops >50% in its 2nd epoch).
PLATEAU_REL = 0.01
PLATEAU_MIN_EPOCHS = 2          # epochs flat from the start before it counts (one could be noise)
# A run shorter than that (ASHA stops most trials at their first rung) is read from its per-step
# losses: smoothed over STEP_SMOOTHING steps, the last quarter of at least PLATEAU_MIN_STEPS steps
# within 5% of the first steps' loss (minibatch noise is ~2% after smoothing; a healthy first epoch
# on digits falls > 30%).
PLATEAU_MIN_STEPS, PLATEAU_STEP_REL = 12, 0.05
# ... and only near chance: a flat loss below half of ln C is a model that already learned (a
# pretrained backbone, a resumed run), not an initialization problem.
PLATEAU_BELOW_CHANCE = 0.5
# Overfitting: 5 accuracy points between train and val is beyond the sampling noise of a val split
# of a few hundred examples (~2 points at n = 360) and beyond what a healthy run shows (digits: 2).
GAP_LARGE = 0.05
GAP_GROWTH = 0.02               # the gap grew this much since the epoch of the best val loss ...
VAL_LOSS_RISE = 0.10            # ... or the val loss rose 10% above its minimum
# Still improving: at 1% lower val loss per epoch, 10 more epochs would gain ~10%: worth training
# longer. The trend is the least-squares slope over the last quarter of the run (>= 3 epochs).
IMPROVING_RATE = 0.01
TREND_FRACTION, TREND_MIN_POINTS = 0.25, 3
# Underfitting: a model with enough capacity and little regularization fits its training set
# (nearly) perfectly; below 90% train accuracy once the curves are flat (both loss trends within
# IMPROVING_RATE per epoch, falling or rising), it does not.
UNDERFIT_TRAIN_ACC = 0.90
# Short: fewer epochs than the trend window above; what one or two epochs can show is whether the
# model left chance. At chance: a validation accuracy less than CHANCE_MARGIN of the way from
# chance (1/C) to perfect, and less than CHANCE_MAX_RATIO x chance (where C is large, a few points
# are already several times chance). At C = 10 that is 14.5%: a random classifier on a val split
# of 360 (digits) scores 10% +- 1.6 points, so 4.5 points is ~3 sigma. Without an accuracy, a
# validation loss within PLATEAU_STEP_REL of ln C is a near-uniform prediction.
SHORT_EPOCHS = TREND_MIN_POINTS
CHANCE_MARGIN, CHANCE_MAX_RATIO = 0.05, 1.5


@dataclass(frozen=True)
class Diagnosis:
    """One verdict: ``kind`` (one of KINDS), ``evidence`` (numbers), ``advice`` (what to do)."""
    kind: str
    evidence: dict[str, float] = field(default_factory=dict)
    advice: str = ""

    def evidence_json(self, max_chars: int = 480) -> str:
        """The evidence as short JSON (4 significant digits): fits an MLflow tag."""
        text = json.dumps({k: _round(v) for k, v in self.evidence.items()}, separators=(",", ":"))
        return text if len(text) <= max_chars else text[:max_chars - 3] + "..."

    def describe(self) -> str:
        nums = ", ".join(f"{k} {_round(v)}" for k, v in self.evidence.items())
        return f"{self.kind} ({nums}): {self.advice}"


def _round(v: Any) -> Any:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return float(f"{v:.4g}") if math.isfinite(v) else str(v)
    return str(v)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def series(history: Sequence[dict], key: str) -> list[float]:
    """The finite values of ``key`` over the epochs that report it."""
    return [float(h[key]) for h in history if _finite(h.get(key))]


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Centered moving average (edges use the available neighbours): no lag, same length."""
    n, half = len(values), max(window, 1) // 2
    out = []
    for i in range(n):
        chunk = values[max(0, i - half):i + half + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def exploded(losses: Sequence[float], initial: Optional[float] = None) -> Optional[dict[str, float]]:
    """Evidence that a per-step (or per-epoch) loss curve diverged, or None.

    Diverged: a non-finite value, or the smoothed loss above EXPLODE_FACTOR x ``initial``
    (default: the first value, the loss at initialization; ln C where the caller knows C, since
    an LR high enough can blow the loss up within the first few steps).
    """
    if not losses:
        return None
    bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
    if bad is not None:
        return {"nonfinite_at": bad}
    smooth = moving_average(list(losses), STEP_SMOOTHING if len(losses) >= 2 * STEP_SMOOTHING else 1)
    ref = initial or losses[0]
    peak = max(smooth)
    if ref > 0 and peak > EXPLODE_FACTOR * ref:
        return {"initial_loss": ref, "max_loss": peak, "ratio": peak / ref, "at": smooth.index(peak)}
    return None


def trend(values: Sequence[float]) -> tuple[float, int]:
    """(relative change per epoch, epochs in the window) of the last part of a curve: the
    least-squares slope over its last max(TREND_MIN_POINTS, TREND_FRACTION of it) points divided by
    their mean; negative means falling."""
    n = len(values)
    k = min(n, max(TREND_MIN_POINTS, math.ceil(TREND_FRACTION * n)))
    if k < 2:
        return 0.0, k
    ys = values[-k:]
    xm, ym = (k - 1) / 2, sum(ys) / k
    slope = sum((i - xm) * (y - ym) for i, y in enumerate(ys)) / sum((i - xm) ** 2 for i in range(k))
    return (slope / abs(ym) if ym else 0.0), k


def diagnose(history: Sequence[dict], *, step_losses: Optional[Sequence[float]] = None,
             num_classes: Optional[int] = None) -> Diagnosis:
    """The verdict on one run's learning curves (see the module docstring for the order)."""
    history = [h for h in history if isinstance(h, dict)]
    chance = math.log(num_classes) if num_classes and num_classes > 1 else None
    for check in (_diverged, _plateau, _no_learning):
        found = check(history, step_losses, chance)
        if found is not None:
            return found
    curves = next((found for check in (_too_short, _overfitting, _still_improving, _underfitting)
                   if (found := check(history, step_losses, chance)) is not None), None) or _healthy(history)
    bound = input_bound_evidence(history)
    if bound is None:
        return curves
    return Diagnosis("input_bound", bound, f"{input_bound_advice(bound)}. Its learning curves alone: {curves.kind}: "
                     f"{curves.advice}")


def _diverged(history, step_losses, chance) -> Optional[Diagnosis]:
    advice = ("lower the learning rate (3-10x), or add warmup (schedule.warmup) or gradient clipping "
              "(optim.grad_clip)")
    flagged = next((h for h in history if _finite(h.get("diverged")) and h["diverged"]), None)
    if flagged is not None:
        ev = {k: float(flagged[k]) for k in ("diverged_step", "diverged_lr", "epoch") if _finite(flagged.get(k))}
        return Diagnosis("diverged", {"nonfinite": 1, **ev}, "the loss or gradient became Inf/NaN: " + advice)
    for key in ("train_loss", "val_loss"):
        if any(key in h and not _finite(h[key]) for h in history):
            return Diagnosis("diverged", {"nonfinite": 1, "key_" + key: 1}, f"{key} became Inf/NaN: " + advice)
    if step_losses:
        ev = exploded([float(v) for v in step_losses], chance)
        if ev is not None:
            ev = {("step_" + k if k in ("at", "nonfinite_at") else k): v for k, v in ev.items()}
            return Diagnosis("diverged", ev, "the per-step loss exploded: " + advice)
    losses = series(history, "train_loss")
    if losses:  # the epoch means: against ln C where known (the loss at init), else the first epoch
        ref, later = (chance, losses) if chance else (losses[0], losses[1:])
        worst = max(later, default=0.0)
        if ref > 0 and worst > EXPLODE_FACTOR * ref:
            return Diagnosis("diverged", {"initial_loss": ref, "max_train_loss": worst, "ratio": worst / ref},
                             "the training loss exploded: " + advice)
    return None


def _plateau_in_steps(step_losses, chance) -> Optional[dict[str, float]]:
    """Evidence that the per-step loss stayed at its initial value (None when it moved or is too short)."""
    steps = [float(v) for v in step_losses or [] if _finite(v)]
    if len(steps) < PLATEAU_MIN_STEPS:
        return None
    first = sum(steps[:STEP_SMOOTHING]) / STEP_SMOOTHING
    tail = steps[-max(STEP_SMOOTHING, len(steps) // 4):]
    last = sum(tail) / len(tail)
    if (chance and first < PLATEAU_BELOW_CHANCE * chance) or last < (1 - PLATEAU_STEP_REL) * first:
        return None
    return {"steps": len(steps), "first_steps_loss": first, "last_steps_loss": last}


def _plateau(history, step_losses, chance) -> Optional[Diagnosis]:
    losses = series(history, "train_loss")
    if len(losses) < PLATEAU_MIN_EPOCHS:
        ev = _plateau_in_steps(step_losses, chance)
        if ev is None:
            return None
        return Diagnosis("plateau_at_start", {**ev, **({"ln_num_classes": chance} if chance else {})},
                         _PLATEAU_ADVICE)
    if chance and losses[0] < PLATEAU_BELOW_CHANCE * chance:
        return None
    flat = 0
    for v in losses:
        if v < (1 - PLATEAU_REL) * losses[0]:
            break
        flat += 1
    if flat < PLATEAU_MIN_EPOCHS:
        return None
    ev = {"flat_epochs": flat, "epochs": len(losses), "first_train_loss": losses[0], "train_loss": losses[flat - 1]}
    if chance:
        ev["ln_num_classes"] = chance
    ratios = series(history, "update_ratio")
    if ratios:
        ev["update_ratio"] = ratios[0]
    return Diagnosis("plateau_at_start", ev, _PLATEAU_ADVICE)


_PLATEAU_ADVICE = ("the loss did not move from its initial value: bad initialization (a zero or constant init "
                   "makes every unit identical and gradients vanish; use the default init, model.init: default) "
                   "or a learning rate far too low; the update/weight ratio should be ~1e-3")


def _epochs(history) -> int:
    return len([h for h in history if _finite(h.get("train_loss")) or _finite(h.get("val_loss"))])


def _last(history) -> dict[str, float]:
    """The epochs and the last value of each of the curves, as evidence."""
    ev: dict[str, float] = {"epochs": _epochs(history)}
    for key in ("val_acc", "val_loss", "train_acc", "train_loss"):
        s = series(history, key)
        if s:
            ev[key] = s[-1]
    return ev


def _at_chance(acc: float, chance_acc: float) -> bool:
    return acc < min(chance_acc + CHANCE_MARGIN * (1 - chance_acc), CHANCE_MAX_RATIO * chance_acc)


def _no_learning(history, step_losses, chance) -> Optional[Diagnosis]:
    """The validation accuracy at chance at the end (a run of any length; one of SHORT_EPOCHS or
    more also at chance on its training set, else it is overfitting). Without an accuracy, a short
    run's validation loss still at ln C."""
    if not chance:
        return None
    ev = _last(history)
    acc = 1 / round(math.exp(chance))   # 1 / C, C back from ln C (exact for the integer it came from)
    short = ev["epochs"] < SHORT_EPOCHS
    if "val_acc" in ev:
        at_chance = _at_chance(ev["val_acc"], acc) and (short or _at_chance(ev.get("train_acc", 0.0), acc))
    else:
        at_chance = short and "val_loss" in ev and ev["val_loss"] >= (1 - PLATEAU_STEP_REL) * chance
    if not at_chance:
        return None
    n = ev["epochs"]
    return Diagnosis("no_learning", {**ev, "chance_acc": acc, "ln_num_classes": chance},
                     _NO_LEARNING_ADVICE.format(epochs=n, s="" if n == 1 else "s"))


def _too_short(history, step_losses, chance) -> Optional[Diagnosis]:
    """A run of fewer than SHORT_EPOCHS epochs that left chance (or whose chance is unknown)."""
    ev = _last(history)
    n = ev["epochs"]
    if n >= SHORT_EPOCHS:
        return None
    if n == 0:
        return Diagnosis("too_short", ev, "no epoch reported: nothing to judge")
    left = ""
    if chance and "val_acc" in ev:
        ev.update(chance_acc=1 / round(math.exp(chance)), ln_num_classes=chance)
        left = f"it left chance ({ev['val_acc']:.1%} against {ev['chance_acc']:.1%}): "
    return Diagnosis("too_short", ev, f"{n} epoch{' shows' if n == 1 else 's show'} no trend (overfitting, still "
                     f"improving and underfitting are read over {SHORT_EPOCHS} epochs): {left}judge it against the "
                     "trials that ran longer, or give every trial more epochs before the first ASHA rung "
                     "(experiment.scheduler.grace_period)")


_NO_LEARNING_ADVICE = ("no better than chance after {epochs} epoch{s}: a learning rate far too low or too high, or a "
                       "broken initialization (steps 1-3 of schedtune recipe check these). If the other trials left "
                       "chance in as many epochs, this config is the problem; if none did, the first ASHA rung comes "
                       "too early for this model (experiment.scheduler.grace_period, or a shorter warmup)")


def _gap(history) -> list[float]:
    return [float(h["train_acc"]) - float(h["val_acc"]) for h in history
            if _finite(h.get("train_acc")) and _finite(h.get("val_acc"))]


def _val_loss_rise(val: list[float]) -> float:
    """How far the last validation loss is above the lowest one, relative to it (0 when unknown)."""
    return (val[-1] / min(val) - 1) if val and min(val) > 0 else 0.0


def _overfitting(history, step_losses, chance) -> Optional[Diagnosis]:
    gaps, val = _gap(history), series(history, "val_loss")
    if len(gaps) < 2 or gaps[-1] < GAP_LARGE:
        return None
    best = val.index(min(val)) if len(val) == len(gaps) else len(gaps) - 1
    growth = gaps[-1] - gaps[best]
    rise = _val_loss_rise(val)
    if growth < GAP_GROWTH and rise < VAL_LOSS_RISE:
        return None
    ev = {"acc_gap": gaps[-1], "gap_growth": growth, "val_loss_rise": rise, "best_val_loss_epoch": best + 1,
          "train_acc": series(history, "train_acc")[-1], "val_acc": series(history, "val_acc")[-1]}
    return Diagnosis("overfitting", ev,
                     "the model fits the training set far better than validation: more regularization "
                     "(optim.weight_decay, model.dropout, data.augment, mixup) or more data; early stopping keeps "
                     f"the best epoch ({best + 1})")


def _still_improving(history, step_losses, chance) -> Optional[Diagnosis]:
    key = "val_loss" if series(history, "val_loss") else "train_loss"
    values = series(history, key)
    if len(values) < 2:
        return None
    rate, window = trend(values)
    if -rate < IMPROVING_RATE:
        return None
    return Diagnosis("still_improving", {f"{key}_change_per_epoch": rate, "window_epochs": window,
                                         key: values[-1], "epochs": len(values)},
                     f"{key} still falls {-rate:.1%} per epoch at the end: train longer (more epochs), "
                     "or raise the learning rate")


def _underfitting(history, step_losses, chance) -> Optional[Diagnosis]:
    gaps, train_acc = _gap(history), series(history, "train_acc")
    if len(train_acc) < 2 or train_acc[-1] >= UNDERFIT_TRAIN_ACC or (gaps and abs(gaps[-1]) >= GAP_LARGE):
        return None
    # "Flat": neither curve moves IMPROVING_RATE per epoch at the end, either way (a falling one is
    # still improving, a rising one is not a model at its capacity).
    curves = {key: series(history, key) for key in ("train_loss", "val_loss")}
    rates = {key: trend(values) for key, values in curves.items() if len(values) >= 2}
    if not rates or any(abs(rate) >= IMPROVING_RATE for rate, _ in rates.values()):
        return None
    ev = {"train_acc": train_acc[-1], "acc_gap": gaps[-1] if gaps else 0.0}
    ev.update({f"{key}_change_per_epoch": rate for key, (rate, _) in rates.items()})
    ev["window_epochs"] = max(window for _, window in rates.values())
    return Diagnosis("underfitting", ev,
                     "train and validation curves are flat and close but the model does not fit its own training "
                     "set: a bigger model (model.hidden / model.channels) or less regularization "
                     "(optim.weight_decay, model.dropout, mixup, label smoothing)")


def _healthy(history) -> Diagnosis:
    ev: dict[str, float] = {"epochs": len(history)}
    for key in ("val_acc", "val_loss", "train_acc"):
        s = series(history, key)
        if s:
            ev[key] = s[-1]
    gaps = _gap(history)
    if gaps:
        ev["acc_gap"] = gaps[-1]
    val = series(history, "val_loss")
    rise = _val_loss_rise(val)
    if rise >= VAL_LOSS_RISE:   # not overfitting (the gap is small), but not converged either
        best = val.index(min(val)) + 1
        ev.update(val_loss_rise=rise, best_val_loss_epoch=best)
        return Diagnosis("healthy", ev, f"a small train/val gap, but the validation loss rose {rise:.0%} above its "
                         f"best (epoch {best}) without the gap growing: the learning rate is likely too high at the "
                         "end (a decaying schedule, or a lower optim.base_lr); the best epoch's checkpoint is kept")
    return Diagnosis("healthy", ev, "converged with a small train/val gap: nothing to fix")
