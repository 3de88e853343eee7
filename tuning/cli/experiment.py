"""``schedtune tune FILE`` and ``schedtune validate FILE``."""
from __future__ import annotations

import argparse
import sys

from tuning.cli.args import add_experiment_args, add_tracking_args, load, positive_int


def configure_tune(p: argparse.ArgumentParser) -> None:
    add_experiment_args(p)
    add_tracking_args(p)
    p.add_argument("--address", help="join this Ray cluster (host:port of its GCS, or 'auto'); default "
                                     "$RAY_ADDRESS when set, else a private local cluster ('local' forces one)")
    p.add_argument("--num-cpus", type=positive_int, help="CPUs of the local cluster (default: this machine's)")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true",
                        help="continue the latest interrupted run of this experiment (finished trials are kept); "
                             "an error when there is none")
    resume.add_argument("--resume-if-present", action="store_true",
                        help="continue the latest interrupted run when there is one, else start a new run "
                             "(what a retried Ray job wants)")


def run_tune(args) -> int:
    """``tuning.run`` on the file's spec: 0 when a trial finished with a valid metric, else 1."""
    spec = load(args)  # every input error surfaces here, before Ray starts
    print_warnings(spec, args.command)
    import tuning
    from tuning.analysis.report import summary
    from tuning.driver.experiment import IF_PRESENT

    result = tuning.run(spec, address=args.address, storage=args.storage, tracking_uri=args.tracking_uri,
                        resume=IF_PRESENT if args.resume_if_present else args.resume, num_cpus=args.num_cpus)
    print()
    print(summary(result.experiment, spec))
    return 0 if result.ok else 1


def configure_validate(p: argparse.ArgumentParser) -> None:
    add_experiment_args(p)


def run_validate(args) -> int:
    spec = load(args)
    print_warnings(spec, args.command)
    print(f"{spec.file}: OK")
    print(spec.describe())
    if spec.code_dir:
        print(f"plug-ins import from {spec.code_dir}")
    return 0


def print_warnings(spec, command: str) -> None:
    """The spec's warnings (legal values that are surely a mistake, tuning.spec.checks) on stderr, one a line."""
    for w in spec.warnings:
        print(f"schedtune {command}: warning: {w}", file=sys.stderr)
