"""An MLflow experiment in schedtune's layout without Ray: ``training.loop.fit`` per trial, logged
with ``mlflow.MlflowClient`` the way tuning.tracking.callback logs a Tune run (parent run tagged
``schedtune.role = experiment`` with the metric/mode params; a child run per trial with per-epoch
metrics, ``schedtune.trial_id`` / ``schedtune.status`` tags and ``checkpoints/best`` + ``checkpoints/last``
artifacts; ``schedtune.best_run_id`` on the parent). For the after-training commands' tests.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from training.config import TrainConfig
from training.loop import FitResult, fit


@dataclass
class Trial:
    run_id: str
    trial_id: str
    cfg: TrainConfig
    result: FitResult
    status: str


def log_experiment(uri: str, name: str, cfgs: list[TrainConfig], workdir: Path, *, metric: str = "val_acc",
                   mode: str = "max", statuses: list[str] | None = None) -> tuple[str, list[Trial]]:
    """Train ``cfgs`` and log them as one experiment invocation; returns (parent run id, trials)."""
    import mlflow
    from mlflow.entities import Metric, Param

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    # artifacts beside the runs (a sqlite store's default is ./mlruns in the working directory)
    exp_id = exp.experiment_id if exp else client.create_experiment(name, artifact_location=str(workdir / "artifacts"))
    parent = client.create_run(exp_id, run_name=f"{name}-fake", tags={"schedtune.role": "experiment"}).info.run_id
    client.log_batch(parent, params=[Param("metric", metric), Param("mode", mode)])
    trials = []
    for i, cfg in enumerate(cfgs):
        status = (statuses or [])[i] if i < len(statuses or []) else "completed"
        trial_id = f"fake_{i:05d}"
        result = fit(cfg, workdir=workdir / trial_id)
        run_id = client.create_run(exp_id, run_name=trial_id, tags={
            "mlflow.parentRunId": parent, "schedtune.trial_id": trial_id}).info.run_id
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, int(m["epoch"])) for m in result.history
                                          for k, v in m.items() if k not in ("epoch", "step")])
        client.log_artifacts(run_id, result.best_checkpoint, "checkpoints/best")
        client.log_artifacts(run_id, result.last_checkpoint, "checkpoints/last")
        client.set_tag(run_id, "schedtune.status", status)
        client.set_terminated(run_id, "FINISHED")
        trials.append(Trial(run_id, trial_id, cfg, result, status))
    sign = 1 if mode == "max" else -1
    ok = [t for t in trials if t.status == "completed"]
    best = max(ok, key=lambda t: sign * t.result.best[metric])
    client.set_tag(parent, "schedtune.best_run_id", best.run_id)
    client.set_terminated(parent, "FINISHED")
    return parent, trials
