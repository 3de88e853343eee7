"""The one ranking rule of trials, and the one comparison by mode.

A trial's score is the best finite value of the experiment's metric over its epochs (what its best
checkpoint holds, and what ASHA saw at its rungs), not the last one. A diverged or failed trial has
no score, and trials without a score rank last. Every table, the best trial, the ensemble's members
and ``schedtune runs`` rank with these functions.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Sequence, TypeVar

T = TypeVar("T")
BROKEN_STATUSES = ("diverged", "failed")   # a trial that ended like this never counts as best


def is_finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def better(a: float, b: Optional[float], mode: str) -> bool:
    """``a`` strictly beats ``b`` under ``mode`` (``max`` | ``min``); anything beats None."""
    if b is None:
        return True
    return a > b if mode == "max" else a < b


def worst_value(mode: str) -> float:
    """A value every finite one beats under ``mode`` (what a diverged trial reports, so ASHA stops it)."""
    return -math.inf if mode == "max" else math.inf


def best_of(values: Iterable, mode: str) -> Optional[float]:
    """The best finite value of ``values`` under ``mode``; None when there is none."""
    finite = [float(v) for v in values if is_finite_number(v)]
    if not finite:
        return None
    return max(finite) if mode == "max" else min(finite)


def trial_score(values: Iterable, status: Optional[str], mode: str) -> Optional[float]:
    """A trial's score: the best of its per-epoch values, None for a diverged or failed trial."""
    return None if status in BROKEN_STATUSES else best_of(values, mode)


def rank(items: Sequence[T], score: Callable[[T], Optional[float]], mode: str) -> list[T]:
    """``items`` best first by ``score``; those without a score last, in their given order."""
    sign = -1.0 if mode == "max" else 1.0
    return sorted(items, key=lambda item: (score(item) is None, sign * (score(item) or 0.0)))


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (0 for one value) of ``values``."""
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def rank_by_mean(items: Sequence[T], group: Callable[[T], object], score: Callable[[T], Optional[float]],
                 mode: str) -> tuple[list[T], dict[object, tuple[float, float, int]]]:
    """``items`` grouped by ``group`` (a config's repeats), the groups best first by the mean of their
    members' scores, each group's members best first: (the items in that order, {group: (mean, std,
    members with a score)}). A group without a scored member ranks last; so does an unscored member."""
    members: dict[object, list[T]] = {}
    for item in items:
        members.setdefault(group(item), []).append(item)
    stats = {}
    for key, its in members.items():
        scores = [s for s in (score(i) for i in its) if s is not None]
        if scores:
            mean, std = mean_and_std(scores)
            stats[key] = (mean, std, len(scores))
    order = rank(list(members), lambda key: stats[key][0] if key in stats else None, mode)
    return [item for key in order for item in rank(members[key], score, mode)], stats
