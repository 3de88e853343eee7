"""The ``schedtune`` command line.

Exit status: 0 success; 1 the experiment ran but no trial produced a valid metric; 2 bad input
or an environment that cannot run it (named file, key and expectation), before anything started.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import signal
import sys
from typing import Any, Optional

EXIT_BAD_INPUT = 2


def _set_pair(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. train.optim.base_lr=0.05), got {text!r}")
    import yaml

    from tuning.space import SECTIONS, load_yaml

    key, value = text.split("=", 1)
    key = key.strip()
    if key.split(".", 1)[0] not in SECTIONS:   # anything else would be silently ignored
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY under experiment., train. or space. "
                                         f"(e.g. train.optim.base_lr=0.05), got key {key!r}")
    try:
        return key, load_yaml(value)
    except (yaml.YAMLError, ValueError, RecursionError) as e:   # ValueError: e.g. a date 2001-13-45
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with VALUE in YAML, got {value!r} ({problem})") from None


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {v}")
    return v


def add_experiment_args(p: argparse.ArgumentParser) -> None:
    """The overrides shared by tune, validate and submit."""
    p.add_argument("file", metavar="FILE", help="search-space YAML (see search_spaces/)")
    p.add_argument("--num-samples", type=_positive_int, help="trials to sample (experiment.num_samples)")
    p.add_argument("--workers", type=_positive_int, help="Train workers per trial (train.scaling.num_workers)")
    p.add_argument("--gpus-per-worker", type=_positive_float,
                   help="GPUs per worker; turns train.scaling.use_gpu on")
    p.add_argument("--name", help="experiment name (experiment.name; the MLflow experiment)")
    p.add_argument("--smoke", action="store_true",
                   help="a seconds-long run: 2 trials of 2 epochs, 1 worker unless --workers is given")
    p.add_argument("--set", dest="sets", action="append", type=_set_pair, default=[], metavar="KEY=VALUE",
                   help="override any dotted key of the file, e.g. --set train.optim.base_lr=0.05 (repeatable)")


def add_tracking_uri_arg(p: argparse.ArgumentParser) -> None:
    """``--tracking-uri``, as every command that reads or writes MLflow takes it."""
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")


def add_tracking_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", help="results directory or URI (default ./schedtune_results; "
                                     "shared storage such as s3://bucket/path on a cluster)")
    add_tracking_uri_arg(p)


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """CLI flags as dotted-path overrides of the search-space file."""
    o: dict[str, Any] = {}
    if args.smoke:
        o.update({"experiment.num_samples": 2, "train.epochs": 2, "train.scaling.num_workers": 1})
    if args.num_samples:
        o["experiment.num_samples"] = args.num_samples
    if args.workers:
        o["train.scaling.num_workers"] = args.workers
    if args.gpus_per_worker:
        o.update({"train.scaling.use_gpu": True, "train.scaling.gpus_per_worker": args.gpus_per_worker})
    if args.name:
        o["experiment.name"] = args.name
    o.update(dict(args.sets))
    return o


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="schedtune",
        description="Tune deep-learning training recipes: Ray Tune over Ray Train trials, ASHA early "
                    "stopping, every trial in MLflow.",
        epilog="Start with: schedtune tune search_spaces/quickstart.yaml")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("tune", help="run an experiment (local Ray cluster unless --address)",
                       description="Run the experiment a search-space file describes.")
    add_experiment_args(t)
    add_tracking_args(t)
    t.add_argument("--address", help="join this Ray cluster (host:port of its GCS, or 'auto') instead of "
                                     "starting a private local one")
    t.add_argument("--num-cpus", type=_positive_int, help="CPUs of the local cluster (default: this machine's)")
    t.add_argument("--resume", action="store_true",
                   help="continue the latest interrupted run of this experiment (finished trials are kept)")

    v = sub.add_parser("validate", help="check a search-space file and print the resolved space",
                       description="Validate a search-space file without starting anything.")
    add_experiment_args(v)

    r = sub.add_parser("runs", help="list an experiment's trials from MLflow")
    r.add_argument("name", metavar="NAME", help="experiment name")
    add_tracking_uri_arg(r)

    s = sub.add_parser("submit", help="submit an experiment as a Ray job to a cluster",
                       description="Submit `schedtune tune FILE` as a Ray job (token auth: RAY_AUTH_MODE=token "
                                   "and RAY_AUTH_TOKEN or a token file).")
    add_experiment_args(s)
    add_tracking_args(s)
    s.add_argument("--address", required=True, help="the cluster's job API, e.g. http://HEAD:8265")
    s.add_argument("--no-wait", action="store_true", help="print the submission id and return at once")
    s.add_argument("--pip", action="append", default=[], metavar="REQ",
                   help="extra pip requirement for the job's runtime environment (repeatable)")
    s.add_argument("--entrypoint-num-cpus", type=float, default=1.0, help="CPUs reserved for the tuning driver")

    j = sub.add_parser("jobs", help="list the schedtune jobs of a cluster")
    j.add_argument("--address", required=True, help="the cluster's job API, e.g. http://HEAD:8265")

    k = sub.add_parser("stop", help="stop a submitted job")
    k.add_argument("submission_id", metavar="ID")
    k.add_argument("--address", required=True, help="the cluster's job API, e.g. http://HEAD:8265")
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return p


def _load(args: argparse.Namespace):
    from tuning.space import load_spec

    return load_spec(args.file, overrides(args))


def cmd_validate(args) -> int:
    spec = _load(args)
    print(f"{spec.file}: OK")
    print(spec.describe())
    return 0


def cmd_tune(args) -> int:
    spec = _load(args)  # every input error surfaces here, before Ray starts
    from tuning.experiment import run_experiment
    from tuning.report import summary

    result = run_experiment(spec, storage=args.storage, tracking_uri=args.tracking_uri, address=args.address,
                            resume=args.resume, num_cpus=args.num_cpus)
    print()
    print(summary(result, spec))
    return 0 if result.best else 1


def cmd_runs(args) -> int:
    from tuning.runs import print_runs

    return print_runs(args.name, args.tracking_uri)


def cmd_submit(args) -> int:
    from tuning.submit import cli_submit

    return cli_submit(args, _load(args))


def cmd_jobs(args) -> int:
    from tuning.submit import cli_jobs

    return cli_jobs(args)


def cmd_stop(args) -> int:
    from tuning.submit import cli_stop

    return cli_stop(args)


# Commands that live with their concept: each module has register(subparsers), which adds its
# parser with set_defaults(handler=...). Keep their heavy imports inside the handlers.
COMMAND_MODULES = tuple(m for m in ("tuning.recipe", "tuning.plots", "tuning.ensemble", "tuning.export")
                        if importlib.util.find_spec(m) is not None)

COMMANDS = {"tune": cmd_tune, "validate": cmd_validate, "runs": cmd_runs, "submit": cmd_submit,
            "jobs": cmd_jobs, "stop": cmd_stop}


def _terminate(signum, frame):
    raise KeyboardInterrupt


def main(argv: Optional[list[str]] = None) -> int:
    from training.config import ConfigError
    from tuning.backend import TrackingError
    from tuning.experiment import ResourceError
    from tuning.space import SpaceError
    from tuning.storage import StorageError

    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)  # run the finally blocks that stop what we started
    try:
        handler = getattr(args, "handler", None) or COMMANDS[args.command]
        return handler(args)
    except (SpaceError, ConfigError, ResourceError, StorageError, TrackingError, FileNotFoundError) as e:
        print(f"schedtune {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"schedtune {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `schedtune validate FILE | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
