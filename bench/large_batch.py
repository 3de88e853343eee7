"""The large-batch table (Goyal et al. 2017) at small scale, a k-sweep, and random vs grid search at equal budget.

The default regime is one where the linear scaling rule is expected to hold: enough steps per
epoch at k*n (40 000 MNIST-1D samples, n = 32, k = 8: 125 steps per epoch at batch 256, 20 epochs)
and a baseline LR well inside the stable range (0.05: 0.02-0.2 are stable at batch 32). The old
default (10 000 samples, k = 16: 15 steps per epoch) is one where it is expected to fail: a 4.2-point
gap (``--samples 10000 --k 16 --epochs 30 --lr 0.1`` reruns it).

Table: MNIST-1D (generated offline), an MLP, SGD with momentum, a step schedule, the same number
of epochs for every row. A baseline batch n with its tuned learning rate, then batch k*n with
(i) the same LR, (ii) sqrt scaling, (iii) linear scaling without warmup, (iv) linear scaling
with constant warmup (LR/k for the warmup epochs, then the peak), (v) linear scaling with gradual
warmup (LR/k rising linearly to k*LR over the warmup epochs). Every row is training.loop.fit
with the shipped config knobs (optim.lr_scaling with reference_batch = n; schedule.warmup,
warmup_epochs, warmup_start_factor = 1/k): pure PyTorch, no Ray. Validation error is the
final epoch's, mean +- std over seeds; a diverged run counts as chance (90%).

Paper's ordering: gradual warmup closest to the baseline; the unscaled LR far worse (Goyal et al.
Table 1 / Fig. 2: at 8k, gradual warmup 23.74% vs baseline 23.60%; no warmup 24.84%, constant
warmup 25.88%). Goal here: gap (v) - baseline <= 0.3 points at k = 8.

k-sweep (Goyal et al. Figure 1): k = 1 ... 64 at the same epochs, with the rule (linear scaling and
gradual warmup from LR/k) and without (the baseline's LR at every batch, no warmup); the steps per
epoch at each k, and the largest k whose gradual-warmup error stays within 1 point of the
baseline. The plot (tuning.analysis.plots.k_sweep_figure, as ``schedtune report`` draws it for an
experiment that searches scaling.batch_per_worker) goes to ``OUT/large_batch_k_sweep.png``.

Random vs grid (Bergstra and Bengio 2012): the same budget of trials over (LR, weight decay),
log-uniform, where only the LR matters much: a 3x3 grid of log-spaced cell centres against
random samples (several draws); the best validation error each finds.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from common import Report, mean_std, parse_args, pick
from processes import map_single_threaded

NAME = "large_batch"
CHANCE_ERROR = 90.0   # 10 balanced classes
K_SWEEP = "1,2,4,8,16,32,64"
LR_SWEEP = (0.02, 0.05, 0.1, 0.2)   # the full mode's baseline LRs at batch n
GOAL_GAP_POINTS = 0.3   # gradual warmup vs baseline at k = 8
WITHIN_POINTS = 1.0     # the k-sweep: "the rule holds" while gradual warmup is within this of the baseline


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=32, help="the baseline batch n")
    p.add_argument("--k", type=int, default=8, help="the large batch is k*n")
    p.add_argument("--lr", type=float, default=0.05,
                   help="the baseline's LR at batch n (0.05: inside the stable 0.02-0.2 of the full mode's sweep)")
    p.add_argument("--ks", help="the k-sweep's k values, comma-separated (default 1,2,4,...,64; '' for none)")
    p.add_argument("--sweep-seeds", type=int, help="seeds per k-sweep point")
    p.add_argument("--epochs", type=int, help="epochs, every row")
    p.add_argument("--warmup-epochs", type=float,
                   help="warmup of the large-batch rows (default: a quarter of the epochs, 5 of 20 in full mode)")
    p.add_argument("--seeds", type=int, help="seeds per row")
    p.add_argument("--samples", type=int, help="MNIST-1D size (80%% train)")
    p.add_argument("--search-budget", type=int, default=9, help="trials per search (a square: the grid's side^2)")
    p.add_argument("--search-draws", type=int, help="independent random searches")
    p.add_argument("--jobs", type=int, help="processes, one thread each (default: 2 where there are 2 cores; 1 in --smoke)")


def base_config(args: argparse.Namespace) -> dict[str, Any]:
    return {"epochs": args.epochs or pick(args, 20, 10, 2),
            "data": {"name": "mnist1d", "num_samples": args.samples or pick(args, 40000, 20000, 1000)},
            "model": {"name": "mlp", "hidden": [256, 256]},
            "optim": {"name": "sgd", "base_lr": args.lr, "momentum": 0.9, "weight_decay": 5e-4,
                      "lr_scaling": "none", "reference_batch": args.batch},
            "schedule": {"name": "step", "milestones": [0.5, 0.75], "gamma": 0.1, "warmup": "none"},
            "scaling": {"batch_per_worker": args.batch}}


def gradual_warmup(args: argparse.Namespace, k: int) -> dict:
    """The rule at batch k*n: linear scaling, and a gradual warmup from LR/k over the warmup epochs
    (k = 1 is the baseline itself)."""
    if k == 1:
        return {}
    return {"scaling.batch_per_worker": k * args.batch, "optim.lr_scaling": "linear", "schedule.warmup": "linear",
            "schedule.warmup_epochs": args.warmup_epochs, "schedule.warmup_start_factor": 1.0 / k}


def same_lr(args: argparse.Namespace, k: int) -> dict:
    """Batch k*n at the baseline's LR, no warmup (without the rule)."""
    return {"scaling.batch_per_worker": k * args.batch} if k > 1 else {}


def variants(args: argparse.Namespace) -> dict[str, dict]:
    """Row label -> dotted updates onto base_config."""
    k, big = args.k, args.k * args.batch
    warm = {"schedule.warmup_epochs": args.warmup_epochs, "schedule.warmup_start_factor": 1.0 / k}
    return {f"baseline: batch {args.batch}, LR {args.lr:g}": {},
            f"(i) batch {big}, same LR": same_lr(args, k),
            f"(ii) batch {big}, sqrt scaling (x{math.sqrt(k):g})": {"scaling.batch_per_worker": big,
                                                                     "optim.lr_scaling": "sqrt"},
            f"(iii) batch {big}, linear scaling (x{k}), no warmup": {"scaling.batch_per_worker": big,
                                                                     "optim.lr_scaling": "linear"},
            f"(iv) batch {big}, linear, constant warmup": {"scaling.batch_per_worker": big, "optim.lr_scaling": "linear",
                                                          "schedule.warmup": "constant", **warm},
            f"(v) batch {big}, linear, gradual warmup": gradual_warmup(args, k)}


# ----------------------------------------------------------------------------- one run

def run_one(job: tuple[dict, dict]) -> dict[str, Any]:
    """fit() one config (base dict + dotted updates); final and best val error in %."""
    from training.config import TrainConfig
    from training.loop import Diverged, fit

    base, updates = job
    cfg = TrainConfig.from_dict(base).with_updates(updates)
    t = time.perf_counter()
    try:
        hist = fit(cfg).history
    except Diverged:
        return {"final": CHANCE_ERROR, "best": CHANCE_ERROR, "diverged": True, "s": time.perf_counter() - t}
    return {"final": 100 * (1 - hist[-1]["val_acc"]), "best": 100 * (1 - max(h["val_acc"] for h in hist)),
            "diverged": False, "s": time.perf_counter() - t, "spe": hist[0]["step"]}


# ----------------------------------------------------------------------------- searches

def grid_points(budget: int, space: dict[str, tuple[float, float]]) -> list[dict[str, float]]:
    """A side^2 grid of log-spaced cell centres (side = sqrt(budget)) over a 2-D log box."""
    side = round(math.sqrt(budget))
    if side * side != budget or len(space) != 2:
        raise ValueError(f"the grid needs a square budget over 2 dimensions, got {budget} over {list(space)}")
    axes = {key: [math.exp(math.log(lo) + (i + 0.5) * (math.log(hi) - math.log(lo)) / side) for i in range(side)]
            for key, (lo, hi) in space.items()}
    (ka, va), (kb, vb) = axes.items()
    return [{ka: a, kb: b} for a in va for b in vb]


def random_points(budget: int, space: dict[str, tuple[float, float]], seed: int) -> list[dict[str, float]]:
    """``budget`` log-uniform samples (as tuning.spec's loguniform draws them)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [{key: float(math.exp(rng.uniform(math.log(lo), math.log(hi)))) for key, (lo, hi) in space.items()}
            for _ in range(budget)]


SEARCH_SPACE = {"optim.base_lr": (3e-3, 1.0), "optim.weight_decay": (1e-6, 1e-3)}


def search_base(args: argparse.Namespace) -> dict[str, Any]:
    """Cheaper runs for the searches, as before the large-batch regime moved: 10 000 samples, batch 4n,
    10 epochs, step schedule (what is compared is the searchers, not the regime)."""
    return {**base_config(args), "epochs": pick(args, 10, 10, 2), "scaling": {"batch_per_worker": 4 * args.batch},
            "data": {"name": "mnist1d", "num_samples": pick(args, 10000, 10000, 1000)}}


# ----------------------------------------------------------------------------- the k-sweep

def k_sweep_section(args: argparse.Namespace, rep: Report, ks: list[int], seeds: int, pick_results) -> dict[str, Any]:
    """The k-sweep's table, its plot, and its RESULT values (the largest k that holds, steps per epoch)."""
    if not ks:
        return {}
    rows, points, values, ref = [], [], {}, None
    for k in ks:
        rule, plain = pick_results("rule", k), pick_results("same_lr", k)
        (rm, rs), (pm, ps) = mean_std([r["final"] for r in rule]), mean_std([r["final"] for r in plain])
        ref = rm if k == 1 else ref
        spe = next((r["spe"] for r in (*rule, *plain) if "spe" in r), None)
        within = ref is not None and rm - ref <= WITHIN_POINTS
        rows.append([k, k * args.batch, spe, rm, rs, sum(r["diverged"] for r in rule), pm, ps, within])
        points += [(k * args.batch, r["final"], with_rule) for with_rule, runs in ((True, rule), (False, plain))
                   for r in runs]
        values.update({f"k{k}_steps_per_epoch": spe, f"k{k}_rule_err": rm, f"k{k}_same_lr_err": pm})
    largest = None
    for row in rows:   # the largest k up to which every k stays within WITHIN_POINTS of k = 1
        if not row[-1]:
            break
        largest = row[0]
    rep.section("k-sweep (Goyal et al. Figure 1)",
                f"k = {', '.join(map(str, ks))} at {base_config(args)['epochs']} epochs, {seeds} seed(s) per point; "
                f"with the rule: linear scaling and gradual warmup from LR/k over {args.warmup_epochs:g} epochs; "
                f"without: the baseline LR {args.lr:g} at every batch, no warmup. k = 1 is the baseline.")
    rep.table(["k", "global batch", "steps/epoch", "rule: val error %", "std", "diverged", "same LR: val error %",
               "std", f"rule within {WITHIN_POINTS:g} point of k = 1"], rows)
    rep.note(f"Largest k whose gradual-warmup error stays within {WITHIN_POINTS:g} point of the baseline "
             f"(every smaller k too): {largest if largest is not None else 'none'}.")
    from tuning.analysis.plots import k_sweep_figure, save

    png = save(k_sweep_figure(points, baseline_batch=args.batch), Path(args.out) / f"{NAME}_k_sweep.png")
    rep.note(f"Plot: `{png.name}` (tuning.analysis.plots.k_sweep_figure, the figure `schedtune report` draws).")
    return {**values, "largest_k_within_1pt": largest}


# ----------------------------------------------------------------------------- main

def main() -> None:
    args = parse_args(__doc__.splitlines()[0], configure)
    args.jobs = args.jobs or pick(args, min(2, os.cpu_count() or 1), min(2, os.cpu_count() or 1), 1)
    if args.warmup_epochs is None:
        args.warmup_epochs = base_config(args)["epochs"] / 4
    rep = Report(NAME, args, "Large minibatches (Goyal et al.), a k-sweep, and random vs grid search "
                             "(Bergstra and Bengio)")
    base = base_config(args)
    seeds = args.seeds or pick(args, 5, 3, 1)
    rows_def = variants(args)
    ks = [int(k) for k in (pick(args, K_SWEEP, K_SWEEP, "1,2,8") if args.ks is None else args.ks).split(",") if k]
    sweep_seeds = args.sweep_seeds or pick(args, 3, 1, 1)
    jobs: list[tuple[dict, dict]] = []
    keys: list[tuple[tuple[str, Any], int]] = []   # (kind, key) -> index into jobs; a run shared by rows runs once
    index: dict[str, int] = {}

    def add(job: tuple[dict, dict], kind: str, key: Any = None) -> None:
        sig = json.dumps(job, sort_keys=True)
        if sig not in index:
            index[sig] = len(jobs)
            jobs.append(job)
        keys.append(((kind, key), index[sig]))

    if args.mode == "full":   # the stable range of the baseline LR at batch n
        for lr in LR_SWEEP:
            for seed in range(2):
                add(({**base, "seed": seed}, {"optim.base_lr": lr}), "sweep", lr)
    for label, updates in rows_def.items():
        for seed in range(seeds):
            add(({**base, "seed": seed}, updates), "table", label)
    for k in ks:
        for seed in range(sweep_seeds):
            add(({**base, "seed": seed}, gradual_warmup(args, k)), "rule", k)
            add(({**base, "seed": seed}, same_lr(args, k)), "same_lr", k)
    sbase = search_base(args)
    budget = args.search_budget if args.mode != "smoke" else 4
    draws = args.search_draws or pick(args, 10, 3, 1)
    for point in grid_points(budget, SEARCH_SPACE):
        add((sbase, point), "grid")
    for draw in range(draws):
        for point in random_points(budget, SEARCH_SPACE, seed=draw):
            add((sbase, point), "random", draw)
    print(f"{len(jobs)} fit runs on {args.jobs} processes", flush=True)
    t = time.monotonic()
    results = map_single_threaded(run_one, jobs, args.jobs)
    print(f"done in {time.monotonic() - t:.0f} s", flush=True)

    def pick_results(kind: str, key: Any = None) -> list[dict]:
        return [results[i] for (k, x), i in keys if k == kind and (key is None or x == key)]

    big = args.k * args.batch
    rep.note(f"Setting: MNIST-1D ({base['data']['num_samples']} samples, 80% train), MLP [256, 256], SGD momentum "
             f"0.9, weight decay 5e-4, step schedule (x0.1 at 50% and 75% of the post-warmup steps), "
             f"{base['epochs']} epochs every row; n = {args.batch}, k = {args.k} (k*n = {big}); warmup "
             f"{args.warmup_epochs:g} epochs from LR/k; {seeds} seeds per row. One thread per run.")
    if args.mode == "full":
        rep.section("Baseline LR sweep (batch n)")
        sweep = []
        for lr in LR_SWEEP:
            m, s = mean_std([r["final"] for r in pick_results("sweep", lr)])
            sweep.append([lr, m, s])
        rep.table(["LR", "val error % (mean)", "std"], sweep)
    stats = {}
    for label in rows_def:
        rs = pick_results("table", label)
        m, s = mean_std([r["final"] for r in rs])
        stats[label] = (m, s, sum(r["diverged"] for r in rs), len(rs), mean_std([r["best"] for r in rs])[0])
    labels = list(rows_def)
    base_err = stats[labels[0]][0]
    rep.section("Large-batch table")
    rep.table(["run", "final val error %", "std", "- baseline (points)", "diverged", "best-epoch val error %"],
              [[label, m, s, m - base_err, f"{d}/{n}", b] for label, (m, s, d, n, b) in stats.items()])
    err = {i: stats[labels[i]][0] for i in range(len(labels))}   # 0 = baseline, 1..5 = (i)..(v)
    gap_v = err[5] - base_err
    gradual_closest = all(err[5] <= err[i] for i in range(1, 5))
    unscaled_far_worse = err[1] - base_err >= max(2.0, 3 * gap_v)
    rep.note(f"Paper's ordering: gradual warmup closest to the baseline: {'yes' if gradual_closest else 'no'}; "
             f"the unscaled LR far worse (>= 2 points and >= 3x the gradual-warmup gap): "
             f"{'yes' if unscaled_far_worse else 'no'}. Gap (v) - baseline: {gap_v:+.2f} points "
             f"(goal <= {GOAL_GAP_POINTS:g} at k = 8: {'met' if gap_v <= GOAL_GAP_POINTS else 'not met'}).")
    sweep_values = k_sweep_section(args, rep, ks, sweep_seeds, pick_results)

    grid = pick_results("grid")
    grid_best = min(r["final"] for r in grid)
    rand_best = [min(r["final"] for r in pick_results("random", d)) for d in range(draws)]
    rm, rs = mean_std(rand_best)
    wins = sum(b <= grid_best for b in rand_best)
    side = round(math.sqrt(budget))
    rep.section("Random vs grid search at equal budget",
                f"{budget} trials per search over LR log-uniform {SEARCH_SPACE['optim.base_lr']} and weight decay "
                f"log-uniform {SEARCH_SPACE['optim.weight_decay']} (batch {4 * args.batch}, {sbase['epochs']} epochs, "
                f"no LR scaling); the grid is {side}x{side} log-spaced cell centres; {draws} independent random searches.")
    rep.table(["search", "distinct LRs tried", "best final val error %", "std over searches"],
              [[f"grid {side}x{side}", side, grid_best, None],
               [f"random ({draws} searches)", budget, rm, rs]])
    rep.note(f"Random search found a config at least as good as the grid's in {wins}/{draws} searches.")
    rep.finish({"k": args.k, "batch": args.batch, "big_batch": big, "seeds": seeds,
                "baseline_err": base_err, "same_lr_err": err[1], "sqrt_err": err[2], "linear_err": err[3],
                "constant_warmup_err": err[4], "gradual_warmup_err": err[5], "gap_gradual_points": gap_v,
                "gradual_closest": gradual_closest, "unscaled_far_worse": unscaled_far_worse,
                "ordering_holds": gradual_closest and unscaled_far_worse, "gap_goal_met": gap_v <= GOAL_GAP_POINTS,
                **sweep_values,
                "grid_best_err": grid_best, "random_best_err": rm, "random_wins": f"{wins}/{draws}"})


if __name__ == "__main__":
    main()
