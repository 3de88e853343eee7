"""``schedtune submit FILE``, ``schedtune jobs`` and ``schedtune stop ID``: experiments as Ray jobs."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

from tuning.cli.args import EXIT_BAD_INPUT, add_experiment_args, add_tracking_args, load, overrides
from tuning.driver.submit import TERMINAL, SubmitError, list_jobs, stop_job, submit_experiment


def _address_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", required=True, help="the cluster's job API, e.g. http://HEAD:8265")


def configure_submit(p: argparse.ArgumentParser) -> None:
    add_experiment_args(p)
    add_tracking_args(p)
    _address_arg(p)
    p.add_argument("--no-wait", action="store_true", help="print the submission id and return at once")
    p.add_argument("--pip", action="append", default=[], metavar="REQ",
                   help="extra pip requirement for the job's runtime environment (repeatable)")
    p.add_argument("--entrypoint-num-cpus", type=float, default=1.0, help="CPUs reserved for the tuning driver")


def configure_jobs(p: argparse.ArgumentParser) -> None:
    _address_arg(p)


def configure_stop(p: argparse.ArgumentParser) -> None:
    p.add_argument("submission_id", metavar="ID")
    _address_arg(p)


def _cli(command: str, fn: Callable[[], int]) -> int:
    try:
        return fn()
    except SubmitError as e:
        print(f"schedtune {command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


def run_submit(args) -> int:
    """``schedtune submit``: 0 when the job succeeded (or was only submitted), 1 when it did not,
    130 when the user interrupted and left it running."""
    spec = load(args)

    def run() -> int:
        say = (lambda s: print(s, file=sys.stderr)) if args.no_wait else print
        r = submit_experiment(args.file, args.address, overrides=overrides(args), storage=args.storage,
                              tracking_uri=args.tracking_uri, wait=not args.no_wait, pip=args.pip or None,
                              entrypoint_num_cpus=args.entrypoint_num_cpus, out=say, spec=spec)
        if args.no_wait:
            print(r.submission_id)   # alone on stdout: ID=$(schedtune submit ... --no-wait)
            return 0
        return 0 if r.status == "SUCCEEDED" else 1 if r.status in TERMINAL else 130

    return _cli("submit", run)


def run_jobs(args) -> int:
    """``schedtune jobs``: a table of the cluster's schedtune jobs."""
    def run() -> int:
        rows = list_jobs(args.address)
        if not rows:
            print(f"no schedtune jobs on {args.address}")
            return 0
        w = max(len(r["id"]) for r in rows)
        print(f"{'ID':<{w}}  {'STATUS':<9}  {'EXPERIMENT':<24}  {'USER':<12}  START")
        for r in rows:
            start = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["start_time"])) if r["start_time"] else "-"
            print(f"{r['id']:<{w}}  {r['status']:<9}  {r['experiment']:<24}  {r['user']:<12}  {start}")
        return 0

    return _cli("jobs", run)


def run_stop(args) -> int:
    """``schedtune stop ID``."""
    def run() -> int:
        stopped = stop_job(args.address, args.submission_id)
        print(f"stopping job {args.submission_id}" if stopped else f"job {args.submission_id} had already ended")
        return 0

    return _cli("stop", run)
