"""The Pareto front of a multi-objective experiment (``experiment.metrics``): which trials no other
trial beats on every objective at once. No Ray, MLflow or torch.

A trial's point is its objectives' values at its best epoch by the first objective (the epoch its
best checkpoint holds: the model that would be registered or exported), so every point on the front
is a model that exists. Diverged and failed trials, and trials missing an objective, have no point.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from tuning.analysis.ranking import better, is_finite_number


def dominates(a: Sequence[float], b: Sequence[float], modes: Sequence[str]) -> bool:
    """``a`` is at least as good as ``b`` on every objective and better on one."""
    no_worse = all(not better(y, x, m) for x, y, m in zip(a, b, modes))
    return no_worse and any(better(x, y, m) for x, y, m in zip(a, b, modes))


def front(points: Sequence[Optional[Sequence[float]]], modes: Sequence[str]) -> list[bool]:
    """For each point, whether it is on the Pareto front of ``points`` (None: no point, never on it).
    Equal points are all on it."""
    return [p is not None and not any(q is not None and dominates(q, p, modes) for q in points) for p in points]


def point_at_best_epoch(history: Sequence[Mapping[str, Any]], names: Sequence[str],
                        modes: Sequence[str]) -> Optional[dict[str, float]]:
    """The objectives' values at the epoch where the first objective is best; None when no epoch
    has every objective as a finite number."""
    best: Optional[Mapping[str, Any]] = None
    for record in history:
        if not all(is_finite_number(record.get(n)) for n in names):
            continue
        if best is None or better(record[names[0]], best[names[0]], modes[0]):
            best = record
    return None if best is None else {n: float(best[n]) for n in names}


def front_table(rows: Sequence[Any], names: Sequence[str]) -> str:
    """Markdown table of the front's trials (``rows``: TrialRow with ``objectives`` and ``on_front``),
    in the order given, then how many trials had a point."""
    lines = ["| trial | " + " | ".join(names) + " | run id |", "|---|" + "---|" * len(names) + "---|"]
    on = [r for r in rows if r.on_front]
    for r in on:
        lines.append(f"| {r.trial_id} | " + " | ".join(f"{r.objectives[n]:.6g}" for n in names)
                     + f" | {r.run_id or '-'} |")
    with_point = sum(1 for r in rows if r.objectives is not None)
    lines += ["", f"{len(on)} of {with_point} trials with every objective are on the Pareto front"
              + (f" ({len(rows) - with_point} without a point: diverged, failed or missing one)"
                 if with_point < len(rows) else "")]
    return "\n".join(lines)


def front_json(rows: Sequence[Any], objectives: Sequence[Any]) -> dict:
    """The front as data: objectives (name, mode) and every trial's point and membership."""
    return {"objectives": [{"name": o.name, "mode": o.mode} for o in objectives],
            "trials": [{"trial_id": r.trial_id, "run_id": r.run_id, "on_front": r.on_front,
                        "values": r.objectives} for r in rows if r.objectives is not None]}

