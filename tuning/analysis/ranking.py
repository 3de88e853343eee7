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
