"""`schedtune runs NAME`: an experiment's trials as MLflow has them."""
from __future__ import annotations

import math
import sys
from typing import Optional

from tuning.backend import resolve_tracking_uri


def trial_runs(name: str, tracking_uri: Optional[str] = None):
    """(parent run, [child runs]) of the newest invocation of experiment ``name``."""
    import mlflow

    client = mlflow.MlflowClient(resolve_tracking_uri(tracking_uri))
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return None, []
    parents = client.search_runs([exp.experiment_id], "tags.`schedtune.role` = 'experiment'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        return None, []
    parent = parents[0]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                  max_results=10000)
    return parent, children


def print_runs(name: str, tracking_uri: Optional[str] = None, out=print) -> int:
    parent, children = trial_runs(name, tracking_uri)
    if parent is None:
        print(f"schedtune runs: no schedtune experiment named {name!r} at {resolve_tracking_uri(tracking_uri)}",
              file=sys.stderr)
        return 2
    metric = parent.data.params.get("metric", "val_acc")
    mode = parent.data.params.get("mode", "max")
    out(f"{name}: run {parent.info.run_id} ({parent.info.status}), {len(children)} trials, metric {metric}")
    import mlflow

    client = mlflow.MlflowClient(resolve_tracking_uri(tracking_uri))
    pick = max if mode == "max" else min
    best = {}
    for r in children:   # the best epoch's value, as the final table ranks trials; none for a broken trial
        values = [m.value for m in client.get_metric_history(r.info.run_id, metric) if math.isfinite(m.value)]
        ok = values and r.data.tags.get("schedtune.status") not in ("diverged", "failed")
        best[r.info.run_id] = pick(values) if ok else None
    sign = -1 if mode == "max" else 1
    children.sort(key=lambda r: (best[r.info.run_id] is None, sign * (best[r.info.run_id] or 0.0)))
    out(f"{'trial':<18} {'status':<32} {'best ' + metric:>14}  run id")
    for r in children:
        v = best[r.info.run_id]
        out(f"{r.data.tags.get('schedtune.trial_id', '?'):<18} {r.data.tags.get('schedtune.status', '?'):<32} "
            f"{'-' if v is None else f'{v:.4f}':>14}  {r.info.run_id}")
    return 0
