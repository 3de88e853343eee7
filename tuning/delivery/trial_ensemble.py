"""`schedtune ensemble NAME --top-k K`: the top-K trials of an experiment as one model.

Loads the best checkpoint of each of the K best trials (by the experiment's metric, diverged and
failed trials excluded) from MLflow, each with the better of its raw and EMA weights
(tuning.tracking.registry), averages their predicted probabilities on the validation split of the data
the trials were trained on, and prints each member's metric beside the ensemble's. The result is
logged as an MLflow run in the same experiment, tagged ``schedtune.role = ensemble`` with the
members' run ids as tags (not nested under the experiment run, so it is never taken for a trial).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import Optional

from tuning.tracking import schema

_SPLIT_ONLY_KEYS = ("augment", "loader_workers", "prefetch_factor", "persistent_workers")   # never change the val split


@dataclass
class Member:
    run_id: str
    trial_id: str
    logged: float                  # the trial's best value of the experiment's metric, from MLflow
    weights: str = "raw"           # raw | ema (tuning.tracking.registry.choose_weights)
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


def _val_split_key(data: dict) -> dict:
    return {k: v for k, v in data.items() if k not in _SPLIT_ONLY_KEYS}


def ensemble_experiment(name: str, top_k: int, tracking_uri: Optional[str] = None, *, batch_size: int = 512,
                        log: bool = True) -> EnsembleReport:
    """Evaluate (and log to MLflow) the ensemble of the top ``top_k`` trials of experiment ``name``."""
    from training.config import DataConfig
    from training.data import load_data
    from training.ensemble import evaluate_ensemble
    from tuning.tracking.ensemble_log import log_ensemble
    from tuning.tracking.reads import client_for, experiment_metric, ranked_runs, trial_runs
    from tuning.tracking.registry import trial_model

    from tuning.tracking.backend import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    parent, children = trial_runs(name, uri)
    if parent is None:
        raise FileNotFoundError(f"no schedtune experiment named {name!r} at {uri}")
    client = client_for(uri)
    metric, mode = experiment_metric(parent)
    ranked = ranked_runs(client, children, metric, mode, usable_only=True)
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
            members.append(Member(run.info.run_id, run.data.tags.get(schema.TRIAL_ID, "?"), value,
                                  meta["model_weights"]))
    bundle = load_data(DataConfig.from_dict(data))
    result = evaluate_ensemble(models, bundle.val, batch_size=batch_size)
    for m, metrics in zip(members, result.members):
        m.metrics = metrics
    report = EnsembleReport(name, metric, mode, len(ranked), members, result.ensemble, len(bundle.val))
    if log:
        report.run_id = log_ensemble(client, parent, report)
    return report
