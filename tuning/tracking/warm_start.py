"""Warm start: an earlier experiment's best completed trials, read from MLflow, as the first points
of a new search (``experiment.warm_start: {from: NAME, top_k: K}``).

Optuna is told each point's results (Tune's ``evaluated_rewards``: the study starts with them and
does not rerun them); random search runs the points first (``points_to_evaluate``). A point is the
value of every key of the *new* space, read from the earlier trial's flattened-config params, so
the two experiments may differ in everything else: above all the cluster. ``optim.base_lr`` is the
LR per ``optim.reference_batch`` (the linear scaling rule gives each trial its peak LR from its own
global batch), so an LR found on 2 workers starts a 4-worker search at the same per-reference
value, which the 4-worker trials scale to their own batch.

The space must fit: each key of it must be in the earlier trials' configs (else the earlier
experiment says nothing about it), and a point whose value lies outside the new range or choice is
left out, with the reason; no point left is an error. Errors name the file and the key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from tuning.spec import ExperimentSpec, SpaceError
from tuning.tracking import schema
from tuning.tracking.reads import best_metric_key, experiment_metric, sampled_values, trial_runs

KEY = "experiment.warm_start.from"


@dataclass
class WarmStart:
    source: str                       # the earlier experiment's name
    points: list[dict[str, Any]]      # {space key: value as the searcher samples it}, best first
    rewards: list[Any]                # each point's objective value (a list of them: multi-objective)
    trial_ids: list[str]              # the earlier trials they come from
    dropped: list[str] = field(default_factory=list)   # points left out, and why

    def describe(self) -> str:
        return (f"warm start: {len(self.points)} completed trial{'s' if len(self.points) != 1 else ''} of "
                f"experiment {self.source!r} ({', '.join(self.trial_ids)})")


def fits(dist, value: Any) -> bool:
    """``value`` is one ``dist`` (a tuning.spec.Dist) can take."""
    if dist.kind in ("choice", "grid"):
        return any(value == a for a in dist.args)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    if dist.kind == "int" and value != int(value):
        return False
    low, high = dist.args
    return low <= value <= high


def _objective(run, name: str, source_metric: str) -> Optional[float]:
    """A trial run's value of objective ``name``: its score when that is the earlier experiment's
    metric (best over its epochs), else the metric's last value."""
    metrics = run.data.metrics
    if name == source_metric and best_metric_key(name) in metrics:
        return metrics[best_metric_key(name)]
    return metrics.get(name)


def _has_key(params: dict[str, str], key: str) -> bool:
    return key in params or any(k.startswith(key + ".") for k in params)


def load_warm_start(spec: ExperimentSpec, tracking_uri: str) -> Optional[WarmStart]:
    """The warm start of ``spec`` (None without ``warm_start.from``); SpaceError when it cannot be."""
    ws = spec.options.warm_start
    if ws.from_ is None:
        return None
    parent, children = trial_runs(ws.from_, tracking_uri)
    if parent is None:
        raise SpaceError(spec.file, KEY, ws.from_, f"an earlier schedtune experiment in MLflow at {tracking_uri} "
                                                   "(there is none of that name)")
    completed = [r for r in children if r.data.tags.get(schema.STATUS) == "completed"]
    if not completed:
        raise SpaceError(spec.file, KEY, ws.from_, f"an experiment with completed trials (its newest run "
                                                   f"{parent.info.run_id} has {len(children)} trials, none completed)")
    for key in spec.space:
        if not any(_has_key(r.data.params, key) for r in completed):
            raise SpaceError(spec.file, f"space.{key}", key, f"a key the trials of experiment {ws.from_!r} were "
                                                             "configured with (their params have none: the space does not fit)")
    source_metric, _ = experiment_metric(parent)
    objectives = spec.options.objectives
    first = objectives[0]
    sign = 1.0 if first.mode == "max" else -1.0
    scored = [(r, _objective(r, first.name, source_metric)) for r in completed]
    missing = [r for r, v in scored if v is None]
    scored = sorted(((r, v) for r, v in scored if v is not None), key=lambda rv: -sign * rv[1])
    dropped = [f"trial {_trial_id(r)}: no {first.name} logged" for r in missing]
    out = WarmStart(ws.from_, [], [], [], dropped)
    for run, score in scored:
        if len(out.points) == ws.top_k:
            break
        values = sampled_values(spec.space, run.data.params)
        outside = next((k for k, v in values.items() if not fits(spec.space[k], v)), None)
        if outside is not None:
            out.dropped.append(f"trial {_trial_id(run)}: {outside} = {values[outside]!r} is outside "
                               f"{spec.space[outside].describe()}")
            continue
        rewards = [score] + [_objective(run, m.name, source_metric) for m in objectives[1:]]
        if any(v is None for v in rewards):
            out.dropped.append(f"trial {_trial_id(run)}: no {objectives[rewards.index(None)].name} logged")
            continue
        out.points.append({k: spec.space[k].args.index(v) if k in spec.indexed_choices else v
                           for k, v in values.items()})
        out.rewards.append(rewards if len(objectives) > 1 else score)
        out.trial_ids.append(_trial_id(run))
    if not out.points:
        raise SpaceError(spec.file, KEY, ws.from_, "an experiment with a completed trial inside this space ("
                                                   + "; ".join(out.dropped) + ")")
    return out


def _trial_id(run) -> str:
    return run.data.tags.get(schema.TRIAL_ID, run.info.run_name)
