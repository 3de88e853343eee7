"""``schedtune submit FILE``, ``jobs``, ``logs ID`` and ``stop ID``: experiments as Ray jobs
(a thin layer over ``tuning.submit`` and tuning.driver.submit).

``--address`` defaults to ``$RAY_API_SERVER_ADDRESS``, then ``$RAY_ADDRESS``, as ``ray job`` does."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable

from tuning.cli.args import EXIT_BAD_INPUT, add_experiment_args, add_tracking_args, load, overrides


def _address_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="the cluster's job API, e.g. http://HEAD:8265 (default "
                                     "$RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS, as `ray job` reads them)")


def configure_submit(p: argparse.ArgumentParser) -> None:
    add_experiment_args(p)   # --working-dir: shipped as the job's working_dir (default: FILE's directory)
    add_tracking_args(p)
    _address_arg(p)
    p.add_argument("--py-modules", action="append", default=[], metavar="DIR",
                   help="a package of yours (a directory) shipped with the job and importable on every "
                        "worker (repeatable)")
    p.add_argument("--no-wait", action="store_true", help="print the submission id and return at once")
    p.add_argument("--pip", action="append", default=[], metavar="REQ",
                   help="extra pip requirement for the job's runtime environment (repeatable)")
    p.add_argument("--entrypoint-num-cpus", type=float, default=1.0, help="CPUs reserved for the tuning driver")


def configure_jobs(p: argparse.ArgumentParser) -> None:
    _address_arg(p)
    p.add_argument("--json", action="store_true",
                   help="one JSON list of {id, status, experiment, user, start_time (Unix seconds)}")


def configure_logs(p: argparse.ArgumentParser) -> None:
    p.add_argument("submission_id", metavar="ID")
    _address_arg(p)
    p.add_argument("--follow", "-f", action="store_true",
                   help="keep streaming until the job ends (exit 0 if it succeeded, 1 if not)")


def configure_stop(p: argparse.ArgumentParser) -> None:
    p.add_argument("submission_id", metavar="ID")
    _address_arg(p)


def _cli(command: str, fn: Callable[[], int]) -> int:
    from tuning.driver.submit import SubmitError

    try:
        return fn()
    except SubmitError as e:
        print(f"schedtune {command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _exit_status(status: str) -> int:
    """0 when the job succeeded, 1 when it ended otherwise, 130 when it is still running (interrupted)."""
    from tuning.driver.submit import TERMINAL

    return 0 if status == "SUCCEEDED" else 1 if status in TERMINAL else 130


def run_submit(args) -> int:
    """``schedtune submit``: 0 when the job succeeded (or was only submitted), 1 when it did not,
    130 when the user interrupted and left it running."""
    import tuning
    from tuning.driver.submit import _interrupted
    from tuning.tracking import schema

    def run() -> int:
        # `-`: the spec read from stdin travels whole; a file travels in the working dir, the flags as --set
        source, sets = (load(args), {}) if args.file == "-" else (args.file, overrides(args))
        job = tuning.submit(source, address=args.address, working_dir=args.working_dir,
                            py_modules=args.py_modules, overrides=sets, storage=args.storage,
                            tracking_uri=args.tracking_uri, pip=args.pip or None,
                            entrypoint_num_cpus=args.entrypoint_num_cpus)
        say = (lambda s: print(s, file=sys.stderr)) if args.no_wait else print
        say(f"submitted job {job.job_id} ({job.metadata[schema.JOB_EXPERIMENT]}) to {job.address}")
        if args.no_wait:
            print(job.job_id)   # alone on stdout: ID=$(schedtune submit ... --no-wait)
            return 0
        try:
            status = job.wait(out=print)
        except KeyboardInterrupt:
            status = _interrupted(job.client, job.job_id, job.address, print)
        return _exit_status(status)

    return _cli("submit", run)


def run_jobs(args) -> int:
    """``schedtune jobs``: a table (or ``--json``) of the cluster's schedtune jobs, oldest first."""
    from tuning.driver.submit import job_address, list_jobs

    def run() -> int:
        address = job_address(args.address)
        rows = list_jobs(address)
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        if not rows:
            print(f"no schedtune jobs on {address}")
            return 0
        w = max(len(r["id"]) for r in rows)
        print(f"{'ID':<{w}}  {'STATUS':<9}  {'EXPERIMENT':<24}  {'USER':<12}  START")
        for r in rows:
            start = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["start_time"])) if r["start_time"] else "-"
            print(f"{r['id']:<{w}}  {r['status']:<9}  {r['experiment']:<24}  {r['user']:<12}  {start}")
        return 0

    return _cli("jobs", run)


def run_logs(args) -> int:
    """``schedtune logs ID``: what the job printed so far; ``--follow``: until it ends."""
    from tuning.driver.submit import job

    def run() -> int:
        handle = job(args.submission_id, args.address)
        if args.follow:
            return _exit_status(handle.wait(out=print))
        sys.stdout.write(handle.logs())
        return 0

    return _cli("logs", run)


def run_stop(args) -> int:
    """``schedtune stop ID``."""
    from tuning.driver.submit import stop_job

    def run() -> int:
        stopped = stop_job(args.address, args.submission_id)
        print(f"stopping job {args.submission_id}" if stopped else f"job {args.submission_id} had already ended")
        return 0

    return _cli("stop", run)
