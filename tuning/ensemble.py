"""`schedtune ensemble NAME --top-k K`: the top-K trials of an experiment as one model.

Loads the best checkpoint of each of the K best trials (by the experiment's metric, diverged and
failed trials excluded) from MLflow, each with the better of its raw and EMA weights
(tuning.register), averages their predicted probabilities on the validation split of the data
the trials were trained on, and prints each member's metric beside the ensemble's. The result is
logged as an MLflow run in the same experiment, tagged ``schedtune.role = ensemble`` with the
members' run ids as tags (not nested under the experiment run, so it is never taken for a trial).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Optional

from tuning.cli import _positive_int

EXCLUDED_STATUSES = ("diverged", "failed", "running")   # no usable best checkpoint
_SPLIT_ONLY_KEYS = ("augment", "loader_workers")         # data keys that never change the val split


@dataclass
class Member:
    run_id: str
    trial_id: str
    logged: float                  # the trial's best value of the experiment's metric, from MLflow
    weights: str = "raw"           # raw | ema (tuning.register.choose_weights)
    metrics: dict[str, float] = field(default_factory=dict)   # val_acc / val_loss recomputed here


@dataclass
class EnsembleReport:
    name: str
    metric: str
    mode: str
    eligible: int                  # trials that could be members
    members: list[Member]
    ensemble: dict[str, float]     # val_acc / val_loss of the mean of the members' probabilities
    val_samples: int
    run_id: Optional[str] = None   # the MLflow run it was logged as

    def table(self) -> str:
        lines = [f"{self.name}: ensemble of the top {len(self.members)} of {self.eligible} trials by "
                 f"{self.metric} ({self.mode}), on {self.val_samples} validation samples",
                 f"{'member':<8}{'trial':<22}{'run id':<34}{'weights':<9}{'logged ' + self.metric:>16}"
                 f"{'val_acc':>9}{'val_loss':>10}"]
        for i, m in enumerate(self.members, 1):
            lines.append(f"{i:<8}{m.trial_id:<22}{m.run_id:<34}{m.weights:<9}{m.logged:>16.4f}"
                         f"{m.metrics['val_acc']:>9.4f}{m.metrics['val_loss']:>10.4f}")
        lines.append(f"{'ensemble (mean of probabilities)':<89}{self.ensemble['val_acc']:>9.4f}"
                     f"{self.ensemble['val_loss']:>10.4f}")
        return "\n".join(lines)


def ranked_trials(client, children, metric: str, mode: str) -> list[tuple[object, float]]:
    """(run, best value of ``metric``) of every trial with a usable best checkpoint, best first.

    The value is the best over the run's history (what its best checkpoint holds), not the last
    logged one; diverged, failed and unfinished trials are left out.
    """
    sign = 1 if mode == "max" else -1
    out = []
    for run in children:
        if run.data.tags.get("schedtune.status", "running") in EXCLUDED_STATUSES:
            continue
        values = [m.value for m in client.get_metric_history(run.info.run_id, metric) if math.isfinite(m.value)]
        if values:
            out.append((run, max(values) if mode == "max" else min(values)))
    out.sort(key=lambda rv: -sign * rv[1])
    return out


def _val_split_key(data: dict) -> dict:
    return {k: v for k, v in data.items() if k not in _SPLIT_ONLY_KEYS}


def ensemble_experiment(name: str, top_k: int, tracking_uri: Optional[str] = None, *, batch_size: int = 512,
                        log: bool = True) -> EnsembleReport:
    """Evaluate (and log to MLflow) the ensemble of the top ``top_k`` trials of experiment ``name``."""
    import mlflow

    from training.config import DataConfig
    from training.data import load_data
    from training.ensemble import evaluate_ensemble
    from tuning.register import trial_model
    from tuning.runs import trial_runs
    from tuning.backend import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    parent, children = trial_runs(name, uri)
    if parent is None:
        raise FileNotFoundError(f"no schedtune experiment named {name!r} at {uri}")
    client = mlflow.MlflowClient(uri)
    metric, mode = parent.data.params.get("metric", "val_acc"), parent.data.params.get("mode", "max")
    ranked = ranked_trials(client, children, metric, mode)
    if not ranked:
        raise FileNotFoundError(f"experiment {name!r} has no finished trial with a {metric} and a checkpoint")
    members, models, data = [], [], None
    with tempfile.TemporaryDirectory(prefix="schedtune-ensemble-") as tmp:
        for i, (run, value) in enumerate(ranked[:top_k]):
            model, meta = trial_model(client, run.info.run_id, f"{tmp}/{i}")
            member_data = _val_split_key(meta["config"]["data"])
            if data is not None and member_data != data:
                raise ValueError(f"trial run {run.info.run_id} was validated on other data ({member_data}) than "
                                 f"the first member ({data}): an ensemble needs one validation set")
            data = member_data
            models.append(model)
            members.append(Member(run.info.run_id, run.data.tags.get("schedtune.trial_id", "?"), value,
                                  meta["model_weights"]))
    bundle = load_data(DataConfig.from_dict(data))
    result = evaluate_ensemble(models, bundle.val, batch_size=batch_size)
    for m, metrics in zip(members, result.members):
        m.metrics = metrics
    report = EnsembleReport(name, metric, mode, len(ranked), members, result.ensemble, len(bundle.val))
    if log:
        report.run_id = log_ensemble(client, parent, report)
    return report


def log_ensemble(client, parent, report: EnsembleReport) -> str:
    """The ensemble as an MLflow run beside the experiment's: members as tags, metrics for all."""
    import time

    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    tags = {"schedtune.role": "ensemble", "schedtune.experiment_run_id": parent.info.run_id,
            "schedtune.members": ",".join(m.run_id for m in report.members),
            "schedtune.member_trials": ",".join(m.trial_id for m in report.members),
            **{f"schedtune.member.{i}": m.run_id for i, m in enumerate(report.members, 1)}}
    run = client.create_run(parent.info.experiment_id, run_name=f"{report.name}-ensemble-top{len(report.members)}",
                            tags=tags)
    values = dict(report.ensemble)
    for i, m in enumerate(report.members, 1):
        values.update({f"member_{i}_{k}": v for k, v in m.metrics.items()})
    accs = [m.metrics["val_acc"] for m in report.members]
    values.update(best_member_val_acc=max(accs), worst_member_val_acc=min(accs))
    params = {"top_k": len(report.members), "metric": report.metric, "mode": report.mode,
              "member_weights": ",".join(m.weights for m in report.members)}
    client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in values.items()],
                     params=[Param(k, str(v)) for k, v in params.items()])
    client.log_text(run.info.run_id, report.table() + "\n", "ensemble.txt")
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def cmd_ensemble(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")   # a bar per checkpoint file
    try:
        report = ensemble_experiment(args.name, args.top_k, args.tracking_uri, batch_size=args.batch_size,
                                     log=not args.no_log)
    except ValueError as e:
        print(f"schedtune ensemble: error: {e}", file=sys.stderr)
        return 2
    out(report.table())
    if report.run_id:
        out(f"logged as MLflow run {report.run_id} (schedtune.role = ensemble)")
    return 0


def register(subparsers) -> None:
    from tuning.cli import add_tracking_uri_arg

    p = subparsers.add_parser(
        "ensemble", help="evaluate the ensemble of an experiment's top-K trials (mean of probabilities)",
        description="Load the best checkpoints of the top-K trials from MLflow, average their predicted "
                    "probabilities on the validation split, print each member's metric beside the "
                    "ensemble's, and log the ensemble as an MLflow run.")
    p.add_argument("name", metavar="NAME", help="experiment name")
    p.add_argument("--top-k", type=_positive_int, default=3, help="how many of the best trials (default 3)")
    add_tracking_uri_arg(p)
    p.add_argument("--batch-size", type=_positive_int, default=512, help="evaluation batch size")
    p.add_argument("--no-log", action="store_true", help="print only; log no MLflow run")
    p.set_defaults(handler=cmd_ensemble)

