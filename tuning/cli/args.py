"""Argument helpers every command shares: number types, the experiment overrides (FILE, --smoke,
--set KEY=VALUE, ...), the tracking and storage flags, and the spec they load."""
from __future__ import annotations

import argparse
from typing import Any

EXIT_BAD_INPUT = 2   # bad input or an environment that cannot run it, before anything started


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {v}")
    return v


def set_pair(text: str) -> tuple[str, Any]:
    """``--set KEY=VALUE``: a dotted key under experiment., train. or space., and a YAML value."""
    from tuning.spec.overrides import parse_set

    try:
        return parse_set(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_experiment_args(p: argparse.ArgumentParser) -> None:
    """The overrides shared by tune, validate, submit and recipe."""
    p.add_argument("file", metavar="FILE", help="search-space YAML (see search_spaces/); - reads it from stdin")
    p.add_argument("--working-dir", metavar="DIR",
                   help="where package.module:callable plug-ins import from, put on every worker's path "
                        "(default: the directory holding FILE; the current one for -)")
    p.add_argument("--num-samples", type=positive_int, help="trials to sample (experiment.num_samples)")
    p.add_argument("--workers", type=positive_int, help="Train workers per trial (train.scaling.num_workers)")
    p.add_argument("--gpus-per-worker", type=positive_float,
                   help="GPUs per worker; turns train.scaling.use_gpu on")
    p.add_argument("--name", help="experiment name (experiment.name; the MLflow experiment)")
    p.add_argument("--smoke", action="store_true",
                   help="a seconds-long run: 2 trials of 2 epochs, 1 worker unless --workers is given")
    p.add_argument("--set", dest="sets", action="append", type=set_pair, default=[], metavar="KEY=VALUE",
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


STDIN_FILE = "<stdin>"   # what errors and MLflow call FILE given as -


def load(args: argparse.Namespace):
    """The validated spec of FILE (``-``: standard input) with the flags applied: every input error
    surfaces here."""
    import tuning

    if args.file != "-":
        return tuning.load_spec(args.file, overrides(args), code_dir=args.working_dir)
    import sys
    import tempfile

    from tuning.spec import load_spec

    # Read as a file is, so that its errors name lines and the text is logged as written.
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", encoding="utf-8") as f:
        f.write(sys.stdin.read())
        f.flush()
        return load_spec(f.name, overrides(args), code_dir=args.working_dir or ".", file=STDIN_FILE)
