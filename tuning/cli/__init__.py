"""The ``schedtune`` command line: one table of commands, each a thin layer over the library.

To add a command: write ``configure_<name>(parser)`` and ``run_<name>(args) -> int`` in a module of
this package and add a row to ``COMMANDS``. Nothing outside this package imports it; command modules
keep their heavy imports (Ray, MLflow, torch) inside ``run_*``, so ``schedtune --help`` stays fast.

Exit status: 0 success; 1 the experiment ran but no trial produced a valid metric (or a check
failed); 2 bad input or an environment that cannot run it (named file, key and expectation),
before anything started; 130 interrupted.
"""
from __future__ import annotations

import argparse
import signal
import sys
from typing import Callable, NamedTuple, Optional

from tuning.cli import ensemble, experiment, export, jobs, recipe, report, runs
from tuning.cli.args import EXIT_BAD_INPUT


class Command(NamedTuple):
    help: str
    description: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {
    "tune": Command("run an experiment (a private local Ray cluster unless --address or RAY_ADDRESS)",
                    "Run the experiment a search-space file describes.",
                    experiment.configure_tune, experiment.run_tune),
    "validate": Command("check a search-space file and print the resolved space",
                        "Validate a search-space file without starting anything.",
                        experiment.configure_validate, experiment.run_validate),
    "runs": Command("list an experiment's trials from MLflow",
                    "List the trials of an experiment's latest run, best first, as MLflow has them.",
                    runs.configure_runs, runs.run_runs),
    "report": Command("plots and learning-curve diagnosis of an experiment's latest run",
                      "Read an experiment's latest run back from MLflow: write the per-trial and experiment "
                      "plots as PNGs and print each trial's diagnosis.",
                      report.configure_report, report.run_report),
    "recipe": Command("choose hyperparameters step by step: initial loss, overfit a sample, LR sweep, coarse "
                      "search, refine",
                      "Run the hyperparameter recipe on an experiment's base config and space; each step prints "
                      "its verdict and is a nested MLflow run of one recipe run.",
                      recipe.configure_recipe, recipe.run_recipe),
    "ensemble": Command("evaluate the ensemble of an experiment's top-K trials (mean of probabilities)",
                        "Load the best checkpoints of the top-K trials from MLflow, average their predicted "
                        "probabilities on the validation split, print each member's metric beside the "
                        "ensemble's, and log the ensemble as an MLflow run.",
                        ensemble.configure_ensemble, ensemble.run_ensemble),
    "export": Command("export the best model (or a run's) as TorchScript or ONNX, checked against PyTorch",
                      "Write an experiment's best model (or a trial run's) with its preprocessing and class "
                      "names, then run the exported file on validation inputs: exit 1 if its outputs differ "
                      "from PyTorch's beyond --tolerance (with --quantize int8: report the accuracy change).",
                      export.configure_export, export.run_export),
    "submit": Command("submit an experiment as a Ray job to a cluster",
                      "Submit `schedtune tune FILE` as a Ray job (token auth: RAY_AUTH_MODE=token and "
                      "RAY_AUTH_TOKEN or a token file).",
                      jobs.configure_submit, jobs.run_submit),
    "jobs": Command("list the schedtune jobs of a cluster", "List the schedtune jobs of a Ray cluster.",
                    jobs.configure_jobs, jobs.run_jobs),
    "logs": Command("print (or --follow) a submitted job's log",
                    "Print what a submitted schedtune job has written so far; --follow streams it until the "
                    "job ends.", jobs.configure_logs, jobs.run_logs),
    "stop": Command("stop a submitted job", "Ask the cluster to stop a submitted schedtune job.",
                    jobs.configure_stop, jobs.run_stop),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="schedtune",
        description="Tune deep-learning training recipes: Ray Tune over Ray Train trials, ASHA early "
                    "stopping, every trial in MLflow.",
        epilog="Start with: schedtune tune search_spaces/quickstart.yaml")
    p.add_argument("--version", action="version", version=f"schedtune {version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, c in COMMANDS.items():
        c.configure(sub.add_parser(name, help=c.help, description=c.description))
    return p


def version() -> str:
    """The installed distribution's version (its metadata), as pip shows it."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("schedtune")
    except PackageNotFoundError:
        return "(not installed: run pip install -e .)"


def _terminate(signum, frame):
    raise KeyboardInterrupt


def main(argv: Optional[list[str]] = None) -> int:
    from training.config import ConfigError
    from tuning.driver.sizing import ResourceError
    from tuning.driver.storage import StorageError
    from tuning.spec import SpaceError
    from tuning.tracking.backend import TrackingError

    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)  # run the finally blocks that stop what we started
    try:
        return COMMANDS[args.command].run(args)
    except (SpaceError, ConfigError, ResourceError, StorageError, TrackingError, FileNotFoundError) as e:
        print(f"schedtune {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"schedtune {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `schedtune validate FILE | head`
        return 0
