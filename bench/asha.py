"""What ASHA saves: the same sampled configs run once with ASHA and once with FIFO to the end.

The experiment is the shipped quickstart (search_spaces/quickstart.yaml: digits, an MLP, random
log-uniform search over LR and weight decay, dropout, a choice of schedules) with 1-worker
trials (fit runs in the trial process), more epochs and more samples, run through
``tuning.driver.experiment.run_experiment`` on one private Ray cluster, MLflow in a temporary sqlite
file, no model registration (the same for both, and not what is compared). The searcher's seed is
the same for both runs, so both see the same configs (checked). Reported: total epochs trained,
wall time (the whole run_experiment call, and the tuning part alone: from the Tuner's start to the
last trial's end), and the best val_acc of each.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from common import ROOT, Report, fmt, parse_args, pick
from processes import address_option, ray_cluster

NAME = "asha"
GOAL_EPOCH_FRACTION, GOAL_POINTS = 0.25, 0.5


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", type=int, help="configs sampled (num_samples)")
    p.add_argument("--epochs", type=int, help="epochs of a trial run to the end (ASHA's max_t)")
    p.add_argument("--reduction-factor", type=float, default=3.0)
    p.add_argument("--grace-period", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="the searcher's seed (both runs)")
    p.add_argument("--file", type=Path, default=ROOT / "search_spaces" / "quickstart.yaml")
    p.add_argument("--repeats", type=int, help="runs of each scheduler, in the order A B B A ... (wall times "
                                                "drift on a busy machine); figures are means")
    address_option(p)


def make_spec(args: argparse.Namespace, scheduler: str):
    from tuning.spec import load_spec

    sched = ({"name": "fifo"} if scheduler == "fifo" else
             {"name": "asha", "grace_period": args.grace_period, "reduction_factor": args.reduction_factor})
    return load_spec(args.file, {
        "experiment.name": f"bench-asha-{scheduler}",
        "experiment.num_samples": args.samples or pick(args, 27, 9, 3),
        "experiment.seed": args.seed,
        "experiment.scheduler": sched,
        "train.epochs": args.epochs or pick(args, 27, 27, 3),
        "train.scaling.num_workers": 1, "train.scaling.cpus_per_worker": 1.0})


def run(args: argparse.Namespace, scheduler: str, address: str, work: Path) -> dict[str, Any]:
    from tuning.driver.experiment import run_experiment

    spec = make_spec(args, scheduler)
    lines: list[tuple[float, str]] = []
    t0 = time.monotonic()
    result = run_experiment(spec, storage=str(work / "results"), tracking_uri=f"sqlite:///{work}/mlflow-{scheduler}.db",
                            address=address, out=lambda s: lines.append((time.monotonic(), s)), register_model=False)
    wall = time.monotonic() - t0
    starts = [t for t, s in lines if " at a time" in s]
    progress = [t for t, s in lines if s.startswith("[")]
    tuning_s = (progress[-1] - starts[0]) if starts and progress else None
    failed = [r for r in result.rows if r.status == "failed"]
    if failed:
        raise RuntimeError(f"{scheduler}: {len(failed)} trials failed, e.g. {failed[0].error}")
    return {"spec": spec, "result": result, "wall_s": wall, "tuning_s": tuning_s,
            "epochs": sum(r.epochs for r in result.rows),
            "best": result.best.metric if result.best else None}


def mean_run(rs: list[dict]) -> dict[str, Any]:
    """The first run's result (configs, per-trial rows) with the figures averaged over repeats."""
    def avg(key):
        xs = [r[key] for r in rs if r[key] is not None]
        return sum(xs) / len(xs) if xs else None

    return {**rs[0], **{k: avg(k) for k in ("wall_s", "tuning_s", "epochs", "best")}, "repeats": len(rs)}


def config_key(spec, params: dict) -> str:
    """A sampled config as text (the join key between the two runs)."""
    sample = spec.decode(params)
    return ", ".join(f"{k}={fmt(v, 3) if isinstance(v, float) else v}" for k, v in sorted(sample.items()))


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], configure)
    rep = Report(NAME, args, "ASHA vs FIFO on the same sampled configs")
    repeats = args.repeats or pick(args, 2, 1, 1)
    order = [s for i in range(repeats) for s in (("asha", "fifo") if i % 2 == 0 else ("fifo", "asha"))]
    every: dict[str, list[dict]] = {"asha": [], "fifo": []}
    with tempfile.TemporaryDirectory(prefix="bench-asha-") as work, \
            ray_cluster(num_cpus=2, connect=False, address=args.address) as cluster:
        for i, scheduler in enumerate(order):
            r = run(args, scheduler, cluster.address, Path(work) / str(i))
            every[scheduler].append(r)
            print(f"{scheduler}: {r['epochs']} epochs in {r['wall_s']:.0f} s", flush=True)
    runs = {name: mean_run(rs) for name, rs in every.items()}
    asha, fifo = runs["asha"], runs["fifo"]
    spec = asha["spec"]
    o = spec.options
    rep.note(f"{repeats} run(s) of each scheduler; totals are means, the per-config table is from the first. "
             f"Experiment: {args.file.relative_to(ROOT) if args.file.is_relative_to(ROOT) else args.file}, "
             f"{o.num_samples} configs (searcher seed {o.seed}), {spec.base.epochs} epochs each at most, "
             f"1-worker trials; ASHA grace period {args.grace_period}, reduction factor {args.reduction_factor:g}; "
             f"metric {o.metric} (points = percentage points).")
    by_config = {name: {config_key(spec, r.params): r for r in v["result"].rows} for name, v in runs.items()}
    same = set(by_config["asha"]) == set(by_config["fifo"])
    frac = asha["epochs"] / fifo["epochs"]
    gap = (fifo["best"] - asha["best"]) * 100 if asha["best"] is not None and fifo["best"] is not None else None
    rep.section("Totals")
    rep.table(["scheduler", "trials", "epochs trained", "x FIFO epochs", "wall s (run_experiment)",
               "tuning s (Tuner)", f"best {o.metric}"],
              [[name, len(v["result"].rows), v["epochs"], v["epochs"] / fifo["epochs"], v["wall_s"], v["tuning_s"],
                v["best"]] for name, v in runs.items()])
    rep.section("Per config", "Sorted by FIFO's result; ASHA's epochs and how its trial ended.")
    rows = []
    for key, f in sorted(by_config["fifo"].items(), key=lambda kv: -(kv[1].metric or -1)):
        a = by_config["asha"].get(key)
        rows.append([key, f.metric, f.epochs, a.metric if a else None, a.epochs if a else None, a.status if a else "-"])
    rep.table(["config", f"FIFO best {o.metric}", "FIFO epochs", f"ASHA best {o.metric}", "ASHA epochs", "ASHA status"],
              rows)
    goals = {"goal_epochs": frac <= GOAL_EPOCH_FRACTION, "goal_best": gap is not None and gap <= GOAL_POINTS}
    rep.section("Goals")
    rep.table(["goal", "measured", "met"],
              [[f"ASHA epochs <= {GOAL_EPOCH_FRACTION:.0%} of FIFO's", frac, goals["goal_epochs"]],
               [f"best {o.metric} within {GOAL_POINTS} points of FIFO's", gap, goals["goal_best"]],
               ["both runs sampled the same configs", same, same]])
    rep.finish({"samples": o.num_samples, "max_epochs": spec.base.epochs,
                "fifo_epochs": fifo["epochs"], "asha_epochs": asha["epochs"], "epoch_fraction": frac,
                "fifo_wall_s": fifo["wall_s"], "asha_wall_s": asha["wall_s"],
                "fifo_tuning_s": fifo["tuning_s"], "asha_tuning_s": asha["tuning_s"],
                "fifo_best": fifo["best"], "asha_best": asha["best"], "best_gap_points": gap,
                "same_configs": same, **goals})


if __name__ == "__main__":
    main()
