"""Search methods side by side: random + FIFO, random + ASHA, TPE + ASHA, HyperBand and PBT on the
same shipped space, with the same number of configs and epochs per trial, over several searcher seeds.

The experiment is search_spaces/quickstart.yaml (digits, an MLP, log-uniform LR and weight decay,
dropout, a choice of schedules) with 1-worker trials, run through
``tuning.driver.experiment.run_experiment`` on one private 2-CPU Ray cluster, MLflow in one temporary
sqlite file for all the runs (creating a store takes seconds), no model registration. Each method
gets ``samples`` configs of at most ``epochs`` epochs (the budget: samples x epochs, what FIFO
spends); the early-stopping methods spend less, PBT spends it all but moves its population's values
as it goes. Reported per method, over the seeds: the best
trial's val_acc (mean ± sample std), the epochs trained and the worker-seconds spent (tuning.driver.cost:
resources x wall time, start-up and PBT's pauses included).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from common import ROOT, Report, mean_std, parse_args, pick
from processes import address_option, ray_cluster

NAME = "search"
METHODS = {   # name -> (search, scheduler)
    "random_fifo": ("random", {"name": "fifo"}),
    "random_asha": ("random", {"name": "asha", "grace_period": 1, "reduction_factor": 3}),
    "tpe_asha": ("optuna_tpe", {"name": "asha", "grace_period": 1, "reduction_factor": 3}),
    "hyperband": ("random", {"name": "hyperband", "reduction_factor": 3}),
    "pbt": ("random", {"name": "pbt", "quantile": 0.25, "hyperparam_mutations": ["optim.base_lr",
                                                                                  "optim.weight_decay"]}),
}


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", type=int, help="configs per method and seed (num_samples)")
    p.add_argument("--epochs", type=int, help="epochs of a trial run to the end")
    p.add_argument("--seeds", type=int, help="searcher seeds 0..N-1 (each method runs once per seed)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--file", type=Path, default=ROOT / "search_spaces" / "quickstart.yaml")
    address_option(p)


def make_spec(args: argparse.Namespace, method: str, seed: int):
    from tuning.spec import load_spec

    search, scheduler = METHODS[method]
    epochs = args.epochs or pick(args, 9, 3, 2)
    if scheduler["name"] == "pbt":   # four perturbations a trial at most
        scheduler = {**scheduler, "perturbation_interval": max(1, epochs // 4)}
    return load_spec(args.file, {
        "experiment.name": f"bench-search-{method}-{seed}", "experiment.search": search,
        "experiment.num_samples": args.samples or pick(args, 12, 3, 2), "experiment.seed": seed,
        "experiment.scheduler": scheduler, "experiment.max_concurrent_trials": 2, "train.epochs": epochs,
        "train.scaling.num_workers": 1, "train.scaling.cpus_per_worker": 1.0})


def run(args: argparse.Namespace, method: str, seed: int, address: str, work: Path) -> dict[str, Any]:
    from tuning.driver.experiment import run_experiment

    spec = make_spec(args, method, seed)
    result = run_experiment(spec, storage=str(work / "results"), tracking_uri=f"sqlite:///{work.parent}/mlflow.db",
                            address=address, out=lambda s: None, register_model=False)
    failed = [r for r in result.rows if r.status == "failed"]
    if failed:
        raise RuntimeError(f"{method} seed {seed}: {len(failed)} trials failed, e.g. {failed[0].error}")
    return {"best": result.best.metric if result.best else None, "epochs": sum(r.epochs for r in result.rows),
            "worker_s": result.cost.get("worker_seconds", 0.0), "trials": len(result.rows),
            "budget": spec.options.num_samples * spec.base.epochs}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], configure)
    rep = Report(NAME, args, "Search methods on the same space and budget")
    seeds = list(range(args.seeds or pick(args, 3, 1, 1)))
    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    with tempfile.TemporaryDirectory(prefix="bench-search-") as work, \
            ray_cluster(num_cpus=2, connect=False, address=args.address) as cluster:
        for seed in seeds:
            for method in args.methods:
                r = run(args, method, seed, cluster.address, Path(work) / f"{method}-{seed}")
                runs[method].append(r)
                print(f"{method} seed {seed}: best {r['best']}, {r['epochs']} epochs, {r['worker_s']:.0f} worker-s",
                      flush=True)
    spec = make_spec(args, args.methods[0], 0)
    rep.note(f"{len(seeds)} searcher seed(s) per method; {spec.options.num_samples} configs of at most "
             f"{spec.base.epochs} epochs each (budget {spec.options.num_samples * spec.base.epochs} epochs), "
             f"1-worker trials, 2 at a time on 2 CPUs; metric val_acc of the best trial (its best epoch).")
    summary: dict[str, dict[str, float]] = {}
    for method, rs in runs.items():
        best = mean_std([r["best"] for r in rs if r["best"] is not None])
        summary[method] = {"best": best[0], "best_std": best[1], "epochs": mean_std([r["epochs"] for r in rs])[0],
                           "worker_s": mean_std([r["worker_s"] for r in rs])[0]}
    rep.section("Per method", "Means over the seeds (± the sample standard deviation of the best val_acc).")
    rep.table(["method", "best val_acc", "± std", "epochs trained", "x budget", "worker-s"],
              [[m, s["best"], s["best_std"], s["epochs"], s["epochs"] / runs[m][0]["budget"], s["worker_s"]]
               for m, s in summary.items()])
    rep.section("Per seed")
    rep.table(["method", "seed", "trials", "best val_acc", "epochs", "worker-s"],
              [[m, seed, r["trials"], r["best"], r["epochs"], r["worker_s"]]
               for m, rs in runs.items() for seed, r in zip(seeds, rs)])
    rep.finish({"seeds": len(seeds), "samples": spec.options.num_samples, "epochs": spec.base.epochs,
                **{f"{m}_{k}": v for m, s in summary.items() for k, v in s.items()}})


if __name__ == "__main__":
    main()
