"""Experiments read back from MLflow: the newest invocation's runs, each trial's score, its curves.

What ``schedtune runs``, ``report``, ``ensemble`` and ``export`` read. Reads never create a store:
a sqlite database that does not exist is an experiment that does not exist (MLflow would otherwise
create an empty ~1 MB database in whatever directory the command ran in). A trial's score comes
with the run from ``search_runs`` (the ``best_<metric>`` metric its tracker logs when it ends); only
a run without one (still running, or logged by an older version) costs a metric-history request.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import yaml

from tuning.analysis.diagnose import diagnose
from tuning.analysis.ranking import rank, trial_score
from tuning.analysis.results import ExperimentRecord, TrialRecord
from tuning.spec import load_yaml
from tuning.tracking import schema
from tuning.tracking.backend import resolve_tracking_uri, store_exists

HISTORY_KEYS = ("train_loss", "val_loss", "train_acc", "val_acc", "update_ratio", "lr", "diverged",
                "data_wait_fraction", "epoch_time_s")   # the last two: the input_bound diagnosis reads them
EXCLUDED_STATUSES = ("diverged", "failed", schema.STATUS_RUNNING)   # no usable best checkpoint
MAX_TRIAL_RUNS = 10000


def client_for(tracking_uri: Optional[str] = None):
    """An MlflowClient for ``tracking_uri`` (resolved as every command resolves it)."""
    import mlflow

    return mlflow.MlflowClient(resolve_tracking_uri(tracking_uri))


def trial_runs(name: str, tracking_uri: Optional[str] = None):
    """(parent run, [child runs]) of the newest invocation of experiment ``name``; (None, []) when
    there is none (or no store at all: nothing is created)."""
    uri = resolve_tracking_uri(tracking_uri)
    if not store_exists(uri):
        return None, []
    client = client_for(uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return None, []
    parents = client.search_runs([exp.experiment_id], f"tags.`{schema.ROLE}` = '{schema.ROLE_EXPERIMENT}'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        return None, []
    parent = parents[0]
    children = client.search_runs([exp.experiment_id], f"tags.`{schema.PARENT_RUN_ID}` = '{parent.info.run_id}'",
                                  max_results=MAX_TRIAL_RUNS)
    return parent, children


def experiment_metric(parent) -> tuple[str, str]:
    """(metric, mode) an experiment run was ranked by (its params)."""
    params = parent.data.params
    return params.get(schema.PARAM_METRIC, "val_acc"), params.get(schema.PARAM_MODE, "max")


def best_metric_key(metric: str) -> str:
    """The metric a trial run carries its score in once it has ended."""
    return f"best_{metric}"


def run_score(client, run, metric: str, mode: str) -> Optional[float]:
    """A trial run's score (tuning.analysis.ranking.trial_score): from the run itself when it has
    ended, else from its metric history."""
    status = run.data.tags.get(schema.STATUS)
    logged = run.data.metrics.get(best_metric_key(metric))
    if logged is not None:
        return trial_score([logged], status, mode)
    return trial_score([m.value for m in client.get_metric_history(run.info.run_id, metric)], status, mode)


def ranked_runs(client, children, metric: str, mode: str, *, usable_only: bool = False) -> list[tuple[Any, Optional[float]]]:
    """(run, score) of every trial run, best first (unscored last). ``usable_only``: only trials with
    a usable best checkpoint (not diverged, failed or still running) and a score."""
    scored = [(run, run_score(client, run, metric, mode)) for run in children]
    if usable_only:
        scored = [(r, v) for r, v in scored if v is not None
                  and r.data.tags.get(schema.STATUS, schema.STATUS_RUNNING) not in EXCLUDED_STATUSES]
    return rank(scored, lambda rv: rv[1], mode)


def resolve_run(client, target: str, uri: str) -> tuple[str, str]:
    """(run id, what it is) of an experiment name (its best trial) or a run id."""
    parent, children = trial_runs(target, uri)
    if parent is not None:
        best = parent.data.tags.get(schema.BEST_RUN_ID)
        if not best:   # an experiment that did not finish: its best trial so far
            ranked = ranked_runs(client, children, *experiment_metric(parent), usable_only=True)
            if not ranked:
                raise FileNotFoundError(f"experiment {target!r} has no finished trial with a checkpoint")
            best = ranked[0][0].info.run_id
        return best, f"the best trial of experiment {target!r}"
    from mlflow.exceptions import MlflowException

    if not store_exists(uri):
        raise FileNotFoundError(f"{target!r} is neither a schedtune experiment nor a run id: there is no "
                                f"MLflow store at {uri}")
    try:
        client.get_run(target)
    except MlflowException:
        raise FileNotFoundError(f"{target!r} is neither a schedtune experiment nor a run id at {uri}") from None
    return target, f"run {target}"


# ----------------------------------------------------------------------------- curves (schedtune report)

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


def artifact_json(client, run_id: str, path: str) -> Optional[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, path, tmp)
            return json.loads(Path(local).read_text())
        except Exception:   # no checkpoint (diverged in epoch 1, failed): plot what the metrics allow
            return None


def metric_histories(client, run_id: str, keys: tuple[str, ...]) -> list[dict[str, float]]:
    """Per-epoch records {epoch, key: value} of a run (MLflow steps are epochs)."""
    by_epoch: dict[int, dict[str, float]] = {}
    for key in keys:
        for m in client.get_metric_history(run_id, key):
            by_epoch.setdefault(int(m.step), {"epoch": int(m.step)})[key] = m.value
    return [by_epoch[e] for e in sorted(by_epoch)]


def load_experiment(name: str, tracking_uri: Optional[str] = None) -> Optional[ExperimentRecord]:
    """The newest invocation of experiment ``name`` with every trial's curves and diagnosis."""
    from tuning.spec import load_spec

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")   # a bar per small file otherwise
    uri = resolve_tracking_uri(tracking_uri)
    parent, children = trial_runs(name, uri)
    if parent is None:
        return None
    client = client_for(uri)
    metric, mode = experiment_metric(parent)
    exp = ExperimentRecord(name, parent.info.run_id, metric, mode)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            exp.space = load_spec(client.download_artifacts(parent.info.run_id, schema.SEARCH_SPACE_ARTIFACT, tmp)).space
        except Exception:  # a run without a (valid) search-space file: no hyperparameter plot
            exp.space = None
    keys = tuple(dict.fromkeys(HISTORY_KEYS + (metric,)))
    for run in children:
        tags = run.data.tags
        history = metric_histories(client, run.info.run_id, keys)
        status = tags.get(schema.STATUS, "?")
        if status == "diverged" and not any(h.get("diverged") for h in history):
            history.append({"diverged": 1.0})
        trace = artifact_json(client, run.info.run_id, schema.LAST_TRACE)
        meta = artifact_json(client, run.info.run_id, schema.LAST_META) or {}
        t = TrialRecord(tags.get(schema.TRIAL_ID, run.info.run_name), run.info.run_id, status,
                        run.info.start_time or 0, sampled_values(exp.space or {}, run.data.params), history,
                        trace, meta.get("num_classes"), trial_score((h.get(metric) for h in history), status, mode))
        if history:
            t.diagnosis = diagnose(history, step_losses=(trace or {}).get("loss"), num_classes=t.num_classes)
        exp.trials.append(t)
    exp.trials = rank(exp.trials, lambda t: t.metric, mode)
    return exp
