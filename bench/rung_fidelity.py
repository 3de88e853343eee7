"""Does ASHA rank trials at its rungs as they end, and do cooldown forks make it rank them better?

Part 1, fidelity: FIFO histories of the shipped spaces that fit on a CPU (quickstart: digits, an
MLP and a choice of five schedules; regularization: digits, a small CNN; large_batch: MNIST-1D, an
MLP, global batches 64-1024), ``--samples`` random configs for each of ``--seeds`` searcher seeds
(drawn from the spec's own Tune domains, tuning.driver.search.to_tune), every one trained to the
end with ``training.loop.fit`` in-process (no Ray) and cooldown forks (training.cooldown, the
shipped ``train.rung_eval``) at the rung epochs the space's own ASHA settings give. Spearman and
Kendall of each rung's value with the final val_acc, plain (val_acc at the rung) and cooldown
(the fork's rung_val_acc), pooled over seeds; the top-1 regret of trusting a rung; and, per
schedule, how far the rung value sits below the final one (the bias the issue is about).

Part 2, end to end: for each seed, the same configs run through ASHA and through cooldown-ASHA:
the schedulers schedtune builds (tuning.driver.trial_schedulers.make_scheduler, the real Tune
classes) are fed the recorded histories epoch by epoch, ``--concurrency`` trials at a time in
sample order (as Tune would, with equal epoch times), and stop trials as they would in a run.
Regret: FIFO's best trial score (tuning.analysis.ranking.trial_score: a trial's best epoch) minus
the best among what the scheduler ran, in val_acc points; compute: epochs trained, plus the
forks' steps in epochs (fork_steps / steps per epoch). Goal: cooldown-ASHA's mean regret <= half
of ASHA's at <= 1.15x ASHA's compute.

Trials run on one process with the spaces' global batch (num_workers 1, grad_accum_steps = the
file's num_workers: the same steps and LRs, one process). A diverged run reports the worst value
at its last epoch, as a trial does, and is left out of the correlations.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any

from common import ROOT, Report, mean_std, parse_args, pick
from processes import map_single_threaded

NAME = "rung_fidelity"
SPACES = ("quickstart", "regularization", "large_batch")
MAIN_FRACTION = 0.1
GOAL_REGRET_RATIO, GOAL_COMPUTE_RATIO = 0.5, 1.15


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spaces", default=",".join(SPACES), help="comma-separated shipped spaces")
    p.add_argument("--seeds", type=int, help="searcher seeds (>= 5 for the end-to-end figures)")
    p.add_argument("--samples", type=int, help="configs per seed (default: per space)")
    p.add_argument("--epochs", type=int, help="epochs of every run (default: per space)")
    p.add_argument("--fractions", help="extra cooldown fractions for the fidelity table, comma-separated "
                                       f"(the end-to-end runs use {MAIN_FRACTION})")
    p.add_argument("--concurrency", type=int, default=2, help="trials at once in the scheduler replay")
    p.add_argument("--jobs", type=int, help="processes, one thread each (default 2 where there are 2 cores)")
    p.add_argument("--dump", help="also write every run's history and sampled config to this JSON file")


# (epochs, samples) per space and mode; quickstart gets 27 epochs in full (rungs 1, 3, 9), as bench/asha.py.
SIZES = {"quickstart": {"full": (27, 27), "quick": (9, 8), "smoke": (3, 2)},
         "regularization": {"full": (15, 16), "quick": (8, 6), "smoke": (3, 2)},
         "large_batch": {"full": (12, 12), "quick": (8, 6), "smoke": (3, 2)}}


def space_spec(args: argparse.Namespace, name: str, scheduler: str = "asha", rung_eval: str = "plain"):
    """The shipped space ``name`` as this bench runs it (see the module docstring), under ``scheduler``
    (fifo, or asha with the file's grace period and reduction factor) and ``rung_eval``."""
    from tuning.spec import load_spec

    path = ROOT / "search_spaces" / f"{name}.yaml"
    shipped = load_spec(path)
    epochs, samples = SIZES[name][args.mode]
    sched = {"name": "fifo"} if scheduler == "fifo" else {
        "name": "asha", "grace_period": shipped.options.scheduler.grace_period,
        "reduction_factor": shipped.options.scheduler.reduction_factor, "rung_eval": rung_eval,
        "cooldown_fraction": MAIN_FRACTION}
    return load_spec(path, {"train.epochs": args.epochs or epochs, "experiment.num_samples": args.samples or samples,
                            "experiment.scheduler": sched, "train.scaling.num_workers": 1,
                            "train.scaling.grad_accum_steps": shipped.base.scaling.num_workers,
                            "train.scaling.cpus_per_worker": 1.0})


def samples_of(spec, seed: int) -> list[dict]:
    """``num_samples`` random draws from the spec's Tune domains (tuning.driver.search.to_tune)."""
    import numpy as np

    from tuning.driver.search import to_tune

    rs = np.random.RandomState(seed)
    domains = to_tune(spec)
    return [{k: d.sample(random_state=rs) for k, d in domains.items()} for _ in range(spec.options.num_samples)]


# ----------------------------------------------------------------------------- one run

KEPT = ("epoch", "step", "val_acc", "val_loss", "rung_val_acc", "rung_val_loss", "fork_steps")


def run_one(job: tuple[dict, list[int], float]) -> dict[str, Any]:
    """fit() one trial config with forks of ``fraction`` at ``rung_epochs``: its per-epoch history
    (up to a divergence), steps per epoch, and the epoch it diverged in (None)."""
    from training.config import TrainConfig
    from training.loop import Diverged, fit
    from training.schedules import plan_steps

    cfg_dict, rung_epochs, fraction = job
    cfg = TrainConfig.from_dict(cfg_dict).with_updates(
        {"rung_eval": {"epochs": rung_epochs, "cooldown_fraction": fraction}})
    history: list[dict] = []
    t = time.perf_counter()
    diverged = None
    try:
        fit(cfg, lambda m, _: history.append({k: m[k] for k in KEPT if k in m}))
    except Diverged:
        diverged = len(history) + 1
    if history:
        spe = history[0]["step"]
    else:   # diverged in its first epoch
        from training.data import load_data

        spe = plan_steps(cfg, len(load_data(cfg.data).train)).steps_per_epoch
    return {"history": history, "diverged": diverged, "spe": spe, "s": time.perf_counter() - t}


# ----------------------------------------------------------------------------- part 1: fidelity

def rank_correlations(x: list[float], y: list[float]) -> tuple[float, float]:
    """Spearman's rho and Kendall's tau-b (NaN with fewer than 3 points or a constant side)."""
    from scipy.stats import kendalltau, spearmanr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return math.nan, math.nan
    return float(spearmanr(x, y).statistic), float(kendalltau(x, y).statistic)


def rung_value(trial: dict, epoch: int, key: str) -> float:
    return trial["history"][epoch - 1][key]


def final(trial: dict) -> float:
    return trial["history"][-1]["val_acc"]


def final_score(trial: dict) -> float:
    """The trial's score (its best epoch's val_acc, tuning.analysis.ranking's rule); diverged: -inf."""
    return -math.inf if trial["diverged"] is not None else max(m["val_acc"] for m in trial["history"])


def top1_regret(groups: list[list[dict]], epoch: int, key: str) -> float:
    """Mean over seeds of (best final val_acc - final val_acc of the config best at the rung), points."""
    out = []
    for trials in groups:
        ok = [t for t in trials if t["diverged"] is None]
        if ok:
            chosen = max(ok, key=lambda t: rung_value(t, epoch, key))
            out.append(100 * (max(final(t) for t in ok) - final(chosen)))
    return mean_std(out)[0]


# ----------------------------------------------------------------------------- part 2: replay

def results_of(trial: dict, epochs: int) -> list[dict]:
    """What the trial reports, epoch by epoch; a diverged one ends with the worst value (as run_trial_body)."""
    from tuning.analysis.ranking import worst_value

    out = [dict(m) for m in trial["history"]]
    if trial["diverged"] is not None:
        out.append({"epoch": epochs, "diverged": 1.0, "val_acc": worst_value("max")})
    return out


def replay(spec, trials: list[dict], concurrency: int) -> dict[str, Any]:
    """Feed the recorded results to ``spec``'s scheduler as Tune would; what it ran and its best."""
    from types import SimpleNamespace

    from tuning.analysis.ranking import trial_score
    from tuning.driver.trial_schedulers import make_scheduler

    o = spec.options
    scheduler, _ = make_scheduler(spec)
    scheduler.set_search_properties(o.metric, o.mode)
    fifo = o.scheduler.name == "fifo"
    pending = list(enumerate(trials))
    running: list[list] = []     # [trial id, trial, results, next index]
    ran: dict[int, list[dict]] = {}
    while pending or running:
        while pending and len(running) < concurrency:
            i, t = pending.pop(0)
            tid = SimpleNamespace(trial_id=str(i))
            if not fifo:
                scheduler.on_trial_add(None, tid)
            running.append([tid, t, results_of(t, spec.base.epochs), 0])
        for slot in list(running):
            tid, t, results, n = slot
            result = results[n]
            slot[3] = n + 1
            ran.setdefault(int(tid.trial_id), []).append(result)
            action = "CONTINUE" if fifo else scheduler.on_trial_result(None, tid, result)
            if action == "STOP" or slot[3] == len(results):
                if not fifo:
                    scheduler.on_trial_complete(None, tid, result)
                running.remove(slot)
    scores, epochs, fork_epochs, fork_steps = [], 0, 0.0, 0
    for i, results in ran.items():
        diverged = any(r.get("diverged") for r in results)
        scores.append(trial_score([r.get(o.metric) for r in results], "diverged" if diverged else None, o.mode))
        done = [r for r in results if not r.get("diverged")]
        epochs += len(done) if not diverged else trials[i]["diverged"]
        if o.scheduler.rung_eval == "cooldown":
            steps = sum(int(r.get("fork_steps", 0)) for r in done)
            fork_steps += steps
            fork_epochs += steps / trials[i]["spe"]
    best = max((s for s in scores if s is not None), default=math.nan)
    return {"best": best, "epochs": epochs, "fork_steps": fork_steps, "compute": epochs + fork_epochs,
            "ran": {i: len(results) for i, results in ran.items()}}


def _short(sample: dict) -> str:
    """A sampled config in a table cell."""
    def v(x):
        if isinstance(x, dict):
            return "/".join(str(a) for a in x.values())
        return f"{x:.3g}" if isinstance(x, float) else str(x)
    return ", ".join(f"{k.rsplit('.', 1)[-1]} {v(x)}" for k, x in sample.items())


# ----------------------------------------------------------------------------- main

def main() -> None:
    args = parse_args(__doc__.splitlines()[0], configure)
    args.jobs = args.jobs or pick(args, min(2, os.cpu_count() or 1), min(2, os.cpu_count() or 1), 1)
    seeds = args.seeds or pick(args, 5, 5, 1)
    spaces = [s for s in args.spaces.split(",") if s]
    extra = [float(f) for f in (args.fractions or pick(args, "0.05,0.2,0.5", "", "")).split(",") if f]
    fractions = [MAIN_FRACTION] + [f for f in extra if f != MAIN_FRACTION]
    rep = Report(NAME, args, "Rung fidelity: plain vs cooldown-fork rung evaluation for ASHA")

    jobs, keys, specs = [], [], {}
    for name in spaces:
        spec = specs[name] = space_spec(args, name)
        rungs = spec.options.scheduler.rung_epochs(spec.base.epochs)
        for seed in range(seeds):
            for i, sample in enumerate(samples_of(spec, seed)):
                cfg = spec.trial_config(sample).to_dict()
                for f in fractions if (name == spaces[0] or args.fractions) else [MAIN_FRACTION]:
                    jobs.append((cfg, rungs, f))
                    keys.append((name, seed, i, f, sample))
    print(f"{len(jobs)} fit runs on {args.jobs} processes", flush=True)
    t = time.monotonic()
    results = map_single_threaded(run_one, jobs, args.jobs)
    print(f"done in {time.monotonic() - t:.0f} s", flush=True)
    trials: dict[tuple, dict] = {}
    for (name, seed, i, f, sample), r in zip(keys, results):
        trials[(name, seed, i, f)] = {**r, "sample": sample}
    if args.dump:
        import json

        with open(args.dump, "w") as fh:
            json.dump([{"space": k[0], "seed": k[1], "index": k[2], "fraction": k[3], **t} for k, t in trials.items()],
                      fh, default=str)

    rep.note(f"{seeds} searcher seeds; forks of {MAIN_FRACTION} x the steps so far (also "
             f"{', '.join(f'{f:g}' for f in fractions[1:]) or 'no other fraction'} on {spaces[0]}"
             f"{'' if not args.fractions else ' and every space'}); {len(jobs)} fit runs, one thread each; "
             f"replay concurrency {args.concurrency}.")
    values: dict[str, Any] = {"seeds": seeds}
    overall = {"asha": [], "cooldown": [], "asha_compute": [], "cooldown_compute": []}
    for name in spaces:
        spec = specs[name]
        rungs = spec.options.scheduler.rung_epochs(spec.base.epochs)
        n = spec.options.num_samples
        main = {s: [trials[(name, s, i, MAIN_FRACTION)] for i in range(n)] for s in range(seeds)}
        pooled = [t for s in range(seeds) for t in main[s] if t["diverged"] is None]
        diverged = sum(t["diverged"] is not None for s in range(seeds) for t in main[s])
        s = spec.options.scheduler
        rep.section(f"{name}: {spec.base.epochs} epochs, {n} configs x {seeds} seeds, ASHA grace {s.grace_period} "
                    f"reduction {s.reduction_factor:g} -> rungs {rungs}",
                    f"{len(pooled)} runs pooled ({diverged} diverged, left out). Final val_acc: mean "
                    f"{100 * mean_std([final(t) for t in pooled])[0]:.2f}%.")
        rows = []
        for e in rungs:
            for label, f, key in [("plain", MAIN_FRACTION, "val_acc")] + [
                    (f"cooldown {f:g}", f, "rung_val_acc") for f in fractions
                    if (name, 0, 0, f) in trials]:
                group = {sd: [trials[(name, sd, i, f)] for i in range(n)] for sd in range(seeds)}
                ok = [t for sd in range(seeds) for t in group[sd] if t["diverged"] is None]
                rho, tau = rank_correlations([rung_value(t, e, key) for t in ok], [final(t) for t in ok])
                rows.append([e, label, rho, tau, top1_regret(list(group.values()), e, key)])
                if f == MAIN_FRACTION:
                    tag = "plain" if key == "val_acc" else "cooldown"
                    values[f"{name}_spearman_{tag}_r{e}"] = rho
                    values[f"{name}_kendall_{tag}_r{e}"] = tau
        rep.table(["rung epoch", "rung value", "Spearman", "Kendall", "top-1 regret (points)"], rows,
                  "Rung value vs final val_acc, pooled over seeds:")
        by_schedule: dict[str, list[dict]] = {}
        for t in pooled:
            by_schedule.setdefault(spec.trial_config(t["sample"]).schedule.name, []).append(t)
        rows = []
        for sched, ts in sorted(by_schedule.items()):
            row: list[Any] = [sched, len(ts)]
            for e in rungs:
                row += [100 * mean_std([final(t) - rung_value(t, e, "val_acc") for t in ts])[0],
                        100 * mean_std([final(t) - rung_value(t, e, "rung_val_acc") for t in ts])[0]]
            rows.append(row)
        rep.table(["schedule", "runs"] + [f"{k} r{e}" for e in rungs for k in ("final - plain", "final - fork")],
                  rows, "Per schedule: how far the rung value sits below the final val_acc (points; "
                        "a spread across schedules is what reorders the rung ranking):")

        e2e = {k: [] for k in ("fifo", "asha", "cooldown")}
        for sd in range(seeds):
            for label, sched_name, rung_eval in (("fifo", "fifo", "plain"), ("asha", "asha", "plain"),
                                                 ("cooldown", "asha", "cooldown")):
                e2e[label].append(replay(space_spec(args, name, sched_name, rung_eval), main[sd], args.concurrency))
        fifo_best = [r["best"] for r in e2e["fifo"]]
        winners = [max(range(n), key=lambda i: final_score(main[sd][i])) for sd in range(seeds)]
        rows, lost = [], []
        for label in ("fifo", "asha", "cooldown"):
            regrets = [100 * (fb - r["best"]) for fb, r in zip(fifo_best, e2e[label])]
            m, sdv = mean_std(regrets)
            ep = mean_std([r["epochs"] for r in e2e[label]])[0]
            fs = mean_std([r["fork_steps"] for r in e2e[label]])[0]
            comp = mean_std([r["compute"] for r in e2e[label]])[0]
            cut = [(sd, r["ran"][w]) for sd, (r, w) in enumerate(zip(e2e[label], winners))
                   if r["ran"][w] < spec.base.epochs]
            lost += [(label, sd, e, regrets[sd]) for sd, e in cut]
            rows.append([{"fifo": "FIFO", "asha": "ASHA", "cooldown": "cooldown-ASHA"}[label], m, sdv, ep, fs, comp,
                         f"{len(cut)}/{seeds}"])
            values[f"{name}_{label}_regret"] = m
            values[f"{name}_{label}_compute"] = comp
            if label != "fifo":
                overall[label] += regrets
                overall[f"{label}_compute"] += [r["compute"] for r in e2e[label]]
        rep.table(["scheduler", "regret to FIFO's best (points, mean)", "std", "epochs", "fork steps",
                   "compute (epochs + fork epochs)", "FIFO's best stopped"], rows,
                  f"End to end, {seeds} seeds x {n} configs (the same configs for each scheduler):")
        if lost:
            rep.table(["scheduler", "seed", "stopped at epoch", "regret (points)", "FIFO's best config",
                       "its plain / fork rung values"],
                      [[lab, sd, e, rg, _short(main[sd][winners[sd]]["sample"]),
                        " ; ".join(f"r{r}: {100 * rung_value(main[sd][winners[sd]], r, 'val_acc'):.1f} / "
                                   f"{100 * rung_value(main[sd][winners[sd]], r, 'rung_val_acc'):.1f}"
                                   for r in rungs if r <= e)]
                       for lab, sd, e, rg in lost],
                      "Where FIFO's best config was stopped (why a scheduler lost it):")

    asha_regret, cool_regret = mean_std(overall["asha"])[0], mean_std(overall["cooldown"])[0]
    compute_ratio = sum(overall["cooldown_compute"]) / max(sum(overall["asha_compute"]), 1e-9)
    met = cool_regret <= GOAL_REGRET_RATIO * asha_regret and compute_ratio <= GOAL_COMPUTE_RATIO
    rep.section("Goal", f"cooldown-ASHA's mean regret <= {GOAL_REGRET_RATIO:g} x ASHA's at <= "
                        f"{GOAL_COMPUTE_RATIO:g}x its compute, over every space and seed: ASHA "
                        f"{asha_regret:.2f} points, cooldown-ASHA {cool_regret:.2f} points, compute ratio "
                        f"{compute_ratio:.3f}: {'met' if met else 'not met'}.")
    rep.finish({**values, "asha_regret": asha_regret, "cooldown_regret": cool_regret,
                "compute_ratio": compute_ratio, "goal_met": met})


if __name__ == "__main__":
    main()
