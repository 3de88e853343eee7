"""``schedtune report NAME``: the plots and the learning-curve diagnosis of an experiment's latest run,
read back from MLflow."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tuning.cli.args import add_tracking_uri_arg


def configure_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help="experiment name")
    p.add_argument("--out", help="directory for the PNGs (default ./schedtune_report/NAME)")
    add_tracking_uri_arg(p)


def run_report(args) -> int:
    from tuning.analysis.plots import experiment_plots, run_plots
    from tuning.analysis.report import diagnosis_table
    from tuning.tracking.reads import load_experiment

    exp = load_experiment(args.name, args.tracking_uri)
    if exp is None:
        print(f"schedtune report: no schedtune experiment named {args.name!r}", file=sys.stderr)
        return 2
    out = Path(args.out or Path("schedtune_report") / args.name)
    for t in exp.trials:
        run_plots(out / t.trial_id, t.history, t.trace)
    if exp.space is not None:
        ordered = sorted(exp.trials, key=lambda t: t.start_time)
        experiment_plots(out, [t.sampled for t in ordered], [t.metric for t in ordered], exp.space,
                         exp.metric, exp.mode)
    print(f"{args.name}: run {exp.parent_run_id}, {len(exp.trials)} trials, metric {exp.metric}")
    print(diagnosis_table(exp))
    print(f"plots: {out}")
    return 0
