"""An experiment's latest run read back from MLflow with its curves: what ``schedtune report`` plots.

Per trial: the per-epoch metric history (MLflow steps are epochs), the sampled hyperparameters
(recovered from the flattened-config params and the search-space file on the parent run), the
run trace (``checkpoints/last/trace.json``) and the diagnosis of its learning curves.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from tuning.diagnose import Diagnosis, diagnose
from tuning.space import load_yaml

HISTORY_KEYS = ("train_loss", "val_loss", "train_acc", "val_acc", "update_ratio", "lr", "diverged")


@dataclass
class TrialRecord:
    trial_id: str
    run_id: str
    status: str
    start_time: int
    sampled: dict[str, Any]
    history: list[dict[str, float]]
    trace: Optional[dict] = None
    num_classes: Optional[int] = None
    metric: Optional[float] = None          # best over the epochs (None: diverged / failed / no value)
    diagnosis: Optional[Diagnosis] = None


@dataclass
class ExperimentRecord:
    name: str
    parent_run_id: str
    metric: str
    mode: str
    space: Optional[dict] = None            # key -> tuning.space.Dist (None: no search-space file)
    trials: list[TrialRecord] = field(default_factory=list)


def _value(text: str) -> Any:
    try:
        return load_yaml(text)
    except yaml.YAMLError:
        return text


def sampled_values(space: dict, params: dict[str, str]) -> dict[str, Any]:
    """The sampled value of each searched key, from a run's flattened-config params. A choice over a
    section (e.g. ``schedule``) is matched back to the choice it came from."""
    out: dict[str, Any] = {}
    for key, dist in space.items():
        if key in params:
            out[key] = _value(params[key])
            continue
        sub = {k[len(key) + 1:]: _value(v) for k, v in params.items() if k.startswith(key + ".")}
        match = next((a for a in dist.args if isinstance(a, dict) and all(sub.get(k) == v for k, v in a.items())), None)
        out[key] = match if match is not None else sub.get("name", sub)
    return out


def _artifact_json(client, run_id: str, path: str) -> Optional[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, path, tmp)
            return json.loads(Path(local).read_text())
        except Exception:   # no checkpoint (diverged in epoch 1, failed): plot what the metrics allow
            return None


def _history(client, run_id: str, keys: tuple[str, ...]) -> list[dict[str, float]]:
    by_epoch: dict[int, dict[str, float]] = {}
    for key in keys:
        for m in client.get_metric_history(run_id, key):
            by_epoch.setdefault(int(m.step), {"epoch": int(m.step)})[key] = m.value
    return [by_epoch[e] for e in sorted(by_epoch)]


def load_experiment(name: str, tracking_uri: Optional[str] = None) -> Optional[ExperimentRecord]:
    """The newest invocation of experiment ``name`` with every trial's curves and diagnosis."""
    import mlflow

    from tuning.runs import trial_runs
    from tuning.space import load_spec
    from tuning.backend import resolve_tracking_uri

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")   # a bar per small file otherwise
    uri = resolve_tracking_uri(tracking_uri)
    parent, children = trial_runs(name, uri)
    if parent is None:
        return None
    client = mlflow.MlflowClient(uri)
    metric, mode = parent.data.params.get("metric", "val_acc"), parent.data.params.get("mode", "max")
    exp = ExperimentRecord(name, parent.info.run_id, metric, mode)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            exp.space = load_spec(client.download_artifacts(parent.info.run_id, "search_space.yaml", tmp)).space
        except Exception:  # a run without a (valid) search-space file: no hyperparameter plot
            exp.space = None
    keys = tuple(dict.fromkeys(HISTORY_KEYS + (metric,)))
    for run in children:
        tags = run.data.tags
        history = _history(client, run.info.run_id, keys)
        status = tags.get("schedtune.status", "?")
        if status == "diverged" and not any(h.get("diverged") for h in history):
            history.append({"diverged": 1.0})
        trace = _artifact_json(client, run.info.run_id, "checkpoints/last/trace.json")
        meta = _artifact_json(client, run.info.run_id, "checkpoints/last/meta.json") or {}
        values = [h[metric] for h in history if metric in h and math.isfinite(h[metric])]
        ok = values and status not in ("diverged", "failed")
        best = (max(values) if mode == "max" else min(values)) if ok else None
        t = TrialRecord(tags.get("schedtune.trial_id", run.info.run_name), run.info.run_id, status,
                        run.info.start_time or 0, sampled_values(exp.space or {}, run.data.params), history,
                        trace, meta.get("num_classes"), best)
        if history:
            t.diagnosis = diagnose(history, step_losses=(trace or {}).get("loss"), num_classes=t.num_classes)
        exp.trials.append(t)
    sign = -1 if mode == "max" else 1
    exp.trials.sort(key=lambda t: (t.metric is None, sign * (t.metric or 0.0)))
    return exp


def diagnosis_table(exp: ExperimentRecord) -> str:
    """Markdown table, best first: trial, status, metric, diagnosis, evidence; then the advice per kind."""
    lines = [f"| trial | status | {exp.metric} | diagnosis | evidence |", "|---|---|---|---|---|"]
    advice: dict[str, str] = {}
    for t in exp.trials:
        d = t.diagnosis
        lines.append(f"| {t.trial_id} | {t.status} | {'-' if t.metric is None else f'{t.metric:.4f}'} | "
                     f"{d.kind if d else '-'} | {d.evidence_json(200) if d else ''} |")
        if d:
            advice.setdefault(d.kind, d.advice)
    lines.append("")
    lines += [f"{kind}: {text}" for kind, text in advice.items()]
    return "\n".join(lines)
