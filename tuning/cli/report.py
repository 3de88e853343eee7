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
    from tuning.analysis.plots import BATCH_KEY, experiment_plots, k_sweep_plot, run_plots
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
        if BATCH_KEY in exp.space:   # the k-sweep: error vs global batch, with and without the scaling rule
            k_sweep_plot(out, exp.trials, exp.space, _base_config(exp.parent_run_id, args.tracking_uri), exp.metric)
    print(f"{args.name}: run {exp.parent_run_id}, {len(exp.trials)} trials, metric {exp.metric}")
    print(diagnosis_table(exp))
    print(f"plots: {out}")
    return 0


def _base_config(parent_run_id: str, tracking_uri):
    """The base TrainConfig of an experiment run: its search-space file, as logged on the run."""
    import tempfile

    from tuning.spec import load_spec
    from tuning.tracking import schema
    from tuning.tracking.reads import client_for

    with tempfile.TemporaryDirectory() as tmp:
        client = client_for(tracking_uri)
        return load_spec(client.download_artifacts(parent_run_id, schema.SEARCH_SPACE_ARTIFACT, tmp)).base
