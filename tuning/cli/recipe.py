"""``schedtune recipe FILE``: the step-by-step recipe for choosing hyperparameters."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tuning.cli.args import add_experiment_args, add_tracking_args, load, positive_float, positive_int
from tuning.recipe.recipe import COARSE_EPOCHS, STEPS, TOP_K


def configure_recipe(p: argparse.ArgumentParser) -> None:
    add_experiment_args(p)
    add_tracking_args(p)
    p.add_argument("--step", choices=STEPS, action="append",
                   help="run only this step (repeatable); later steps read earlier results from --out")
    p.add_argument("--top-k", type=positive_int, default=TOP_K, help=f"coarse configs to refine (default {TOP_K})")
    p.add_argument("--out", help="directory for the step results, plots and derived files "
                                 "(default ./schedtune_recipe/NAME)")
    p.add_argument("--lr", type=positive_float, help="base_lr for the coarse step (default: the LR sweep's pick)")
    p.add_argument("--coarse-epochs", type=positive_int, default=COARSE_EPOCHS,
                   help="epochs of the coarse search (1-5)")
    p.add_argument("--refine-epochs", type=positive_int,
                   help="epochs of the refine runs (default max(10, train.epochs))")
    p.add_argument("--address", help="join this Ray cluster instead of starting a private local one per search")
    p.add_argument("--num-cpus", type=positive_int, help="CPUs of the local cluster (default: this machine's)")


def run_recipe(args) -> int:
    from tuning.recipe.recipe import Recipe

    spec = load(args)
    steps = [s for s in STEPS if s in (args.step or STEPS)]
    recipe = Recipe(spec, args.out or Path("schedtune_recipe") / spec.options.name, tracking_uri=args.tracking_uri,
                    storage=args.storage, address=args.address, num_cpus=args.num_cpus, top_k=args.top_k,
                    coarse_epochs=args.coarse_epochs, refine_epochs=args.refine_epochs or (4 if args.smoke else None),
                    lr=args.lr)
    results = recipe.run(steps)
    if recipe.recommendation is not None:
        print(f"\nrecommendation: {recipe.recommendation}  (run it again: schedtune tune {recipe.recommendation})")
    failed = results[steps[-1]].verdict == "fail"
    if failed:
        print(f"schedtune recipe: step {steps[-1]} failed: {results[steps[-1]].summary}", file=sys.stderr)
    return 1 if failed else 0
