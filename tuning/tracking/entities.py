"""MLflow's entities (Param, RunTag, Metric) built the one way schedtune logs them, for log_batch."""
from __future__ import annotations

import json
import time
from typing import Any, Optional


def param(k: str, v: Any):
    """A param; lists and dicts as JSON (what ``schedtune report`` reads back as YAML)."""
    from mlflow.entities import Param

    return Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))


def tag(k: str, v: str):
    from mlflow.entities import RunTag

    return RunTag(k, v)


def metric(k: str, v: float, step: int = 0, timestamp_ms: Optional[int] = None):
    from mlflow.entities import Metric

    return Metric(k, float(v), int(time.time() * 1000) if timestamp_ms is None else timestamp_ms, step)
