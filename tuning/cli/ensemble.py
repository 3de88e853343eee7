"""``schedtune ensemble NAME --top-k K``: the top-K trials of an experiment as one model."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from tuning.cli.args import add_tracking_uri_arg, positive_int


def configure_ensemble(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help="experiment name")
    p.add_argument("--top-k", type=positive_int, default=3, help="how many of the best trials (default 3)")
    add_tracking_uri_arg(p)
    p.add_argument("--batch-size", type=positive_int, default=512, help="evaluation batch size")
    p.add_argument("--no-log", action="store_true", help="print only; log no MLflow run")


def run_ensemble(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    from tuning.delivery.trial_ensemble import ensemble_experiment

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")   # a bar per checkpoint file
    try:
        report = ensemble_experiment(args.name, args.top_k, args.tracking_uri, batch_size=args.batch_size,
                                     log=not args.no_log)
    except ValueError as e:
        print(f"schedtune ensemble: error: {e}", file=sys.stderr)
        return 2
    out(report.table())
    if report.run_id:
        out(f"logged as MLflow run {report.run_id} (schedtune.role = ensemble)")
    return 0
