"""``schedtune runs NAME``: an experiment's trials as MLflow has them, best first (the Pareto front's
members of a multi-objective experiment marked ``*``)."""
from __future__ import annotations

import argparse
import sys

from tuning.cli.args import add_tracking_uri_arg


def configure_runs(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help="experiment name")
    add_tracking_uri_arg(p)


def run_runs(args) -> int:
    return print_runs(args.name, args.tracking_uri)


def print_runs(name: str, tracking_uri=None, out=print) -> int:
    """The table of ``schedtune runs NAME``; 2 when there is no such experiment."""
    from tuning.tracking import schema
    from tuning.tracking.backend import resolve_tracking_uri
    from tuning.tracking.reads import client_for, experiment_metric, ranked_runs, trial_runs

    uri = resolve_tracking_uri(tracking_uri)
    parent, children = trial_runs(name, uri)
    if parent is None:
        print(f"schedtune runs: no schedtune experiment named {name!r} at {uri}", file=sys.stderr)
        return 2
    metric, mode = experiment_metric(parent)
    front = [r for r in children if r.data.tags.get(schema.PARETO_FRONT) == "true"]
    out(f"{name}: run {parent.info.run_id} ({parent.info.status}), {len(children)} trials, metric {metric}"
        + (f", {len(front)} on the Pareto front (*)" if front else ""))
    out(f"{'trial':<18} {'status':<32} {'best ' + metric:>14}  {'front  ' if front else ''}run id")
    for run, v in ranked_runs(client_for(uri), children, metric, mode):
        tags = run.data.tags
        mark = ("  *    " if tags.get(schema.PARETO_FRONT) == "true" else "       ") if front else ""
        out(f"{tags.get(schema.TRIAL_ID, '?'):<18} {tags.get(schema.STATUS, '?'):<32} "
            f"{'-' if v is None else f'{v:.4f}':>14}  {mark}{run.info.run_id}")
    return 0
