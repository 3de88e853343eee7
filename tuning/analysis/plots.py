"""Plots of runs and experiments as PNG files (matplotlib, Agg; no pyplot state, thread-safe).

Per run (from ``fit``'s history and trace): the loss per step as a scatter with a moving average,
train and val accuracy per epoch, the LR schedule actually applied, the update/weight ratio per
layer over time. Per experiment: the metric of every trial against each sampled hyperparameter
(log axes for log-uniform ones) and the best-so-far curve; a multi-objective one its Pareto front.
The recipe adds the LR sweep.

``*_figure`` functions build a Figure (tests count its series); ``run_plots`` / ``experiment_plots``
write the PNGs and return their paths (``schedtune report`` writes them for a run read back from MLflow).
An experiment that searches the batch size also gets the k-sweep (error vs global batch, with and
without the linear scaling rule: Goyal et al.'s Figure 1).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from tuning.analysis.diagnose import moving_average
from tuning.analysis.ranking import better

UPDATE_RATIO_TARGET = 1e-3     # the rule of thumb: ||dW|| / ||W|| ~ 1e-3 per step


def _figure(ncols: int = 1, width: float = 6.0, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def save(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (parents created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=90)
    return path


def _finite(values: Sequence[Any]) -> list[tuple[int, float]]:
    return [(i, float(v)) for i, v in enumerate(values)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


# ----------------------------------------------------------------------------- one run

def loss_figure(losses: Sequence[float], title: str = "training loss per step"):
    """Scatter of the per-step loss and its moving average (window ~2% of the steps, >= 5)."""
    fig, (ax,) = _figure()
    pts = _finite(losses)
    xs, ys = [i for i, _ in pts], [v for _, v in pts]
    ax.scatter(xs, ys, s=4, alpha=0.35, label="loss (one step)")
    window = max(5, len(ys) // 50) | 1
    ax.plot(xs, moving_average(ys, window), color="C1", label=f"moving average ({window} steps)")
    if ys and min(ys) > 0 and max(ys) / min(ys) > 100:
        ax.set_yscale("log")
    ax.set(xlabel="optimizer step", ylabel="loss", title=title)
    ax.legend()
    return fig


def accuracy_figure(history: Sequence[Mapping[str, Any]]):
    """Train and validation accuracy per epoch (one line each)."""
    fig, (ax,) = _figure()
    for key in ("train_acc", "val_acc"):
        pts = [(h.get("epoch", i + 1), h[key]) for i, h in enumerate(history) if _finite([h.get(key)])]
        ax.plot([e for e, _ in pts], [v for _, v in pts], marker="o", label=key)
    ax.set(xlabel="epoch", ylabel="accuracy", title="train / val accuracy")
    ax.legend()
    return fig


def lr_figure(lrs: Sequence[float]):
    """The learning rate applied at every optimizer step (head parameter group)."""
    fig, (ax,) = _figure()
    ax.plot(range(len(lrs)), lrs, label="lr")
    ax.set(xlabel="optimizer step", ylabel="learning rate", title="LR schedule (as applied)")
    return fig


def update_ratio_figure(ratios: Sequence[Mapping[str, float]]):
    """||dW|| / ||W|| per weight matrix, one line per layer over epochs, and the ~1e-3 target."""
    fig, (ax,) = _figure()
    layers = list(dict.fromkeys(k for r in ratios for k in r))
    for name in layers:
        pts = [(i + 1, r[name]) for i, r in enumerate(ratios) if name in r and r[name] > 0]
        ax.plot([e for e, _ in pts], [v for _, v in pts], marker=".", label=name)
    ax.axhline(UPDATE_RATIO_TARGET, color="grey", linestyle="--", label="1e-3 (rule of thumb)")
    ax.set_yscale("log")
    ax.set(xlabel="epoch (last step)", ylabel="update / weight", title="update/weight ratio per layer")
    ax.legend(fontsize="small")
    return fig


def run_plots(out_dir: str | Path, history: Sequence[Mapping[str, Any]],
              trace: Optional[Mapping[str, Any]] = None) -> list[Path]:
    """The per-run PNGs (those the data allows) in ``out_dir``: loss, accuracy, lr, update_ratio."""
    out, trace = Path(out_dir), trace or {}
    paths = []
    if trace.get("loss"):
        paths.append(save(loss_figure(trace["loss"]), out / "loss.png"))
    if any("train_acc" in h or "val_acc" in h for h in history):
        paths.append(save(accuracy_figure(history), out / "accuracy.png"))
    if trace.get("lr"):
        paths.append(save(lr_figure(trace["lr"]), out / "lr.png"))
    if trace.get("layer_update_ratio"):
        paths.append(save(update_ratio_figure(trace["layer_update_ratio"]), out / "update_ratio.png"))
    return paths


# ----------------------------------------------------------------------------- experiments

def _label(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}={x}" for k, x in v.items())
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def hyperparameter_figure(samples: Sequence[Mapping[str, Any]], metrics: Sequence[Optional[float]],
                          space: Mapping[str, Any], metric: str):
    """One panel per searched key: each trial's ``metric`` against its sampled value. ``space``
    maps key -> tuning.spec.Dist: log x for loguniform, categories for choice/grid."""
    keys = list(space) or ["(none)"]
    fig, axes = _figure(ncols=len(keys), width=4.0)
    for ax, key in zip(axes, keys):
        dist = space.get(key)
        pts = [(s.get(key), m) for s, m in zip(samples, metrics) if m is not None and math.isfinite(m) and key in s]
        if dist is not None and dist.kind in ("choice", "grid"):
            labels = [_label(a) for a in dist.args]
            xs = [labels.index(_label(v)) if _label(v) in labels else -1 for v, _ in pts]
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize="small")
        else:
            xs = [float(v) for v, _ in pts]
            if dist is not None and dist.kind == "loguniform":
                ax.set_xscale("log")
        ax.scatter(xs, [m for _, m in pts])
        ax.set(xlabel=key, ylabel=metric)
    fig.suptitle(f"{metric} per trial against each sampled hyperparameter")
    return fig


def best_so_far_figure(metrics: Sequence[Optional[float]], mode: str, metric: str):
    """Each trial's metric in start order (scatter) and the best so far (a step line)."""
    fig, (ax,) = _figure()
    pts = [(i + 1, m) for i, m in enumerate(metrics) if m is not None and math.isfinite(m)]
    ax.scatter([i for i, _ in pts], [m for _, m in pts], label="trial")
    best, xs, ys = None, [], []
    for i, m in pts:
        best = m if better(m, best, mode) else best
        xs.append(i)
        ys.append(best)
    ax.step(xs, ys, where="post", color="C1", label="best so far")
    ax.set(xlabel="trial (start order)", ylabel=metric, title=f"best {metric} so far")
    ax.legend()
    return fig


def experiment_plots(out_dir: str | Path, samples: Sequence[Mapping[str, Any]], metrics: Sequence[Optional[float]],
                     space: Mapping[str, Any], metric: str, mode: str) -> list[Path]:
    """hyperparameters.png and best_so_far.png in ``out_dir``; trials in start order."""
    out = Path(out_dir)
    return [save(hyperparameter_figure(samples, metrics, space, metric), out / "hyperparameters.png"),
            save(best_so_far_figure(metrics, mode, metric), out / "best_so_far.png")]


# ----------------------------------------------------------------------------- multi-objective

def pareto_figure(points: Sequence[Mapping[str, float]], on_front: Sequence[bool], names: Sequence[str]):
    """The first objective against each other one (a panel each): every trial's point, the front's
    marked (``points``: {objective: value} per trial; tuning.analysis.pareto)."""
    others = list(names[1:]) or list(names)
    fig, axes = _figure(len(others), width=5.0)
    for ax, other in zip(axes, others):
        for member, color, label in ((False, "C0", "dominated"), (True, "C3", "Pareto front")):
            pts = [(p[other], p[names[0]]) for p, f in zip(points, on_front) if f == member]
            if pts:
                ax.scatter([x for x, _ in pts], [y for _, y in pts], color=color, label=label,
                           marker="*" if member else "o", s=90 if member else 30)
        ax.set(xlabel=other, ylabel=names[0])
        ax.legend()
    fig.suptitle(f"Pareto front over {', '.join(names)} (at each trial's best epoch by {names[0]})")
    return fig


# ----------------------------------------------------------------------------- the large-batch k-sweep

BATCH_KEY = "scaling.batch_per_worker"   # an experiment that searches it gets the k-sweep plot


def follows_scaling_rule(cfg) -> bool:
    """Goyal et al.'s rule: the LR scaled linearly with the global batch, reached by a gradual warmup
    (``cfg``: a training.config.TrainConfig)."""
    s = cfg.schedule
    gradual = s.warmup == "linear" and (s.warmup_steps if s.warmup_steps is not None else s.warmup_epochs) > 0
    return cfg.optim.lr_scaling == "linear" and gradual


def k_sweep_points(trials: Sequence[Any], base, metric: str) -> list[tuple[int, float, bool]]:
    """(global batch, y, rule) per trial with a score: ``trials`` are TrialRecords (their sampled
    values applied onto ``base``, the experiment's TrainConfig, give the global batch and whether the
    scaling rule holds); y is the error in % for an accuracy metric (``*_acc``), else the score."""
    out = []
    for t in trials:
        if t.metric is None or not math.isfinite(t.metric):
            continue
        cfg = base.with_updates(t.sampled)
        y = 100 * (1 - t.metric) if metric.endswith("acc") else t.metric
        out.append((cfg.scaling.global_batch, y, follows_scaling_rule(cfg)))
    return out


def k_sweep_figure(points: Sequence[tuple[int, float, bool]], ylabel: str = "val error %",
                   baseline_batch: Optional[int] = None):
    """Goyal et al.'s Figure 1: the error against the global batch (log2 x), with the linear scaling
    rule and gradual warmup and without; every run a point, the best run at each batch a line."""
    fig, (ax,) = _figure()
    for rule, color, label in ((True, "C0", "linear scaling + gradual warmup"), (False, "C3", "without the rule")):
        pts = sorted((b, y) for b, y, r in points if r == rule)
        if not pts:
            continue
        ax.scatter([b for b, _ in pts], [y for _, y in pts], color=color, alpha=0.4, s=14)
        best: dict[int, float] = {}
        for b, y in pts:
            best[b] = min(best.get(b, y), y)
        ax.plot(list(best), list(best.values()), color=color, marker="o", label=label)
    if baseline_batch is not None:
        ax.axvline(baseline_batch, color="grey", linestyle=":", label=f"baseline batch {baseline_batch}")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="global batch (k x n)", ylabel=ylabel, title="error vs global batch (k-sweep)")
    ax.legend()
    return fig


def k_sweep_plot(out_dir: str | Path, trials: Sequence[Any], space: Mapping[str, Any], base,
                 metric: str) -> Optional[Path]:
    """k_sweep.png in ``out_dir`` for an experiment that searches ``scaling.batch_per_worker``; else None."""
    if BATCH_KEY not in space:
        return None
    ylabel = f"{metric.removesuffix('acc').replace('_', ' ')}error %" if metric.endswith("acc") else metric
    return save(k_sweep_figure(k_sweep_points(trials, base, metric), ylabel), Path(out_dir) / "k_sweep.png")


def lr_sweep_figure(lrs: Sequence[float], curves: Sequence[Sequence[Optional[float]]], picked: Optional[float]):
    """Left: the loss per step at each LR (one line per LR). Right: the loss after the sweep's
    steps against the LR (log x), the pick marked."""
    fig, (ax, ax2) = _figure(ncols=2)
    from matplotlib import colormaps

    finals, cmap = [], colormaps["viridis"]
    for k, (lr, curve) in enumerate(zip(lrs, curves)):
        pts = _finite([v for v in curve])
        ax.plot([i for i, _ in pts], moving_average([v for _, v in pts], 5), label=f"{lr:.2g}",
                color=cmap(k / max(1, len(lrs) - 1)))
        tail = [v for _, v in pts[-max(1, len(curve) // 10):]] if len(pts) == len(curve) else []
        finals.append(sum(tail) / len(tail) if tail else math.nan)
    top = max((v for c in curves for v in c if v is not None and math.isfinite(v)), default=1.0)
    ax.set_ylim(0, min(top, 3 * max((c[0] for c in curves if c and c[0] is not None), default=top)))
    ax.set(xlabel="step", ylabel="loss (5-step average)", title="loss per step at each base_lr")
    ax.legend(fontsize="x-small", ncols=2)
    ok = [(lr, f) for lr, f in zip(lrs, finals) if math.isfinite(f)]
    ax2.plot([lr for lr, _ in ok], [f for _, f in ok], marker="o", label="loss after the sweep")
    if picked is not None:
        ax2.axvline(picked, color="C3", linestyle="--", label=f"picked {picked:.3g}")
    ax2.set_xscale("log")
    ax2.set(xlabel="base_lr", ylabel="loss at the end", title="LR sweep")
    ax2.legend()
    return fig
