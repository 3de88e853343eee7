"""The cost of the framework: the same model, data, global batch and thread count, timed per epoch.

  (a)  a plain PyTorch loop (DataLoader, SGD) in a bare process
  (a0) the same loop slicing tensors instead of a DataLoader (what the DataLoader costs)
  (b)  training.loop.fit in a bare process; again while the Ray cluster runs idle (is a trial slower
       because it runs inside Ray, or because Ray runs beside it?)
  (c)  a schedtune 1-worker trial: tuning.driver.trial.trial_fn in a Tune trial (fit runs in the trial process)
  (c1) a 1-worker Ray Train TorchTrainer in a Tune trial (what (c) would cost through Train)
  (d)  a schedtune 2-worker trial: tuning.driver.trial.trial_fn -> TorchTrainer, DDP over gloo
  (e)  the 2-worker config as 2 local processes (torch.multiprocessing fork, gloo), no Ray: what
       a worker group costs without Train's actors
  with --preload-torch: (d) on a cluster whose idle Ray workers import torch ahead of time

samples/s is fit's own figure (the training pass of an epoch, no eval), the median over the
epochs after the first (warm-up); the plain loops time the same pass. Every process computes
with one thread (torch.set_num_threads(1); Ray gives a worker with cpus_per_worker=1
OMP_NUM_THREADS=1). Start-up is the time from the trial's start (Tune's on_trial_start, once its
actor is up) to the start of its first epoch; the breakdown follows the trial through its function,
its workers' entry and fit's set-up. Memory is the peak over the trial of the summed RSS (and
PSS) of its processes: the Tune trial actor, the Train controller and the Train workers.

The trials are the shipped code (tuning.driver.trial.trial_fn) with two timing hooks: the report
function is wrapped to note wall-clock times, and (d)'s Train worker function is wrapped to note
when it starts. Both cost microseconds.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bare import import_costs
from common import Report, diffs, median, parse_args, pick
from processes import ray_cluster, run_child
from ray_trials import run_trial

NAME = "overhead"
GOAL_RATIO, GOAL_STARTUP_S, GOAL_RSS_GB = 0.97, 10.0, 4.0


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", type=int, help="synthetic dataset size (80%% train)")
    p.add_argument("--hidden", type=int, nargs="+", default=[512, 512], help="MLP hidden widths")
    p.add_argument("--batch", type=int, default=128, help="global batch (every variant)")
    p.add_argument("--epochs", type=int, help="epochs after the warm-up epoch")
    p.add_argument("--rounds", type=int, help="rounds of the bare-process variants (alternating order)")
    p.add_argument("--skip-ray", action="store_true", help="only the bare-process variants (a), (a0), (b), (e)")
    p.add_argument("--py-spy", type=float, default=0.0, metavar="SECONDS",
                   help="py-spy (--gil) the training process of (c) and of (d)'s rank 0 for SECONDS after their first "
                        "epoch (it costs those epochs a few percent)")
    p.add_argument("--preload-torch", action="store_true",
                   help="also run (d) on a cluster whose idle workers import torch ahead (RAY_preload_python_modules)")


def train_config(args: argparse.Namespace, num_workers: int) -> dict[str, Any]:
    """The TrainConfig (as a dict) every variant trains: only the worker layout differs."""
    samples = args.samples or pick(args, 40000, 40000, 2000)
    epochs = 1 + (args.epochs or pick(args, 6, 3, 1))
    return {"epochs": epochs, "seed": 0,
            "data": {"name": "synthetic", "num_samples": samples, "val_fraction": 0.2},
            "model": {"name": "mlp", "hidden": list(args.hidden)},
            "optim": {"name": "sgd", "base_lr": 0.05, "momentum": 0.9, "lr_scaling": "none"},
            "schedule": {"name": "constant"},
            "scaling": {"num_workers": num_workers, "batch_per_worker": args.batch // num_workers,
                        "cpus_per_worker": 1.0}}


# ----------------------------------------------------------------------------- bare processes (bench/bare.py)

def bare(args: argparse.Namespace, kind: str) -> dict:
    cfg = json.dumps(train_config(args, 1))
    return run_child([str(Path(__file__).resolve().parent / "bare.py"), kind, cfg], env={"OMP_NUM_THREADS": "1"})


# ----------------------------------------------------------------------------- Ray trials

def make_spec(cfg_dict: dict):
    from training.config import TrainConfig
    from tuning.spec import ExperimentOptions, ExperimentSpec

    return ExperimentSpec(file="<bench/overhead.py>", options=ExperimentOptions(name="bench-overhead"),
                          base=TrainConfig.from_dict(cfg_dict), space={}, text="")


def ray_trial(args: argparse.Namespace, cluster, label: str, num_workers: int, through_train: bool,
              work: Path) -> dict:
    """One Tune trial of the benchmark config on ``cluster``: per-epoch figures, start-up and its
    breakdown, peak memory of the trial's processes, Ray's task events up to the first epoch."""
    run = run_trial(make_spec(train_config(args, num_workers)), work, label,
                    train_workers=1 if through_train and num_workers == 1 else 0, cluster=cluster, sample=True,
                    profile_s=args.py_spy if label in ("c", "d") else 0.0)
    first = run.notes.get("rank0") or run.notes["trial"]
    workers, epoch_start = run.workers, run.first_epoch_start
    breakdown = {"launch -> trial start": run.start - run.launched,
                 "trial start -> trial fn": first["fn_entry"] - run.start}
    if workers:
        entered = max(w["worker_entry"] for w in workers)
        breakdown["trial fn -> train worker fn (controller, worker group, torch, gloo)"] = entered - first["fn_entry"]
        breakdown["worker fn -> first epoch (fit set-up)"] = epoch_start - entered
    else:
        breakdown["trial fn -> first epoch (fit set-up)"] = epoch_start - first["fn_entry"]
    breakdown["first epoch report -> driver"] = run.arrivals[0][0] - first["report_wall"]
    ends = [t for t, _ in run.arrivals]
    mem = run.sampler
    world = max(1, len(workers))   # rank 0's training thread, times the workers: the trial's CPU per epoch
    return {"tasks": run.tasks, "profile": run.profile, "samples_per_s": run.results("samples_per_s"),
            "cpu_s": [world * c for c in diffs(run.results("bench_thread_cpu_s"))],
            "epoch_time_s": run.results("epoch_time_s"), "period_s": diffs(ends),
            "startup_s": epoch_start - run.start, "breakdown": breakdown,
            "threads": sorted({n["threads"] for n in run.notes.values()}),
            "peak_rss_mb": mem.peak_rss / 2**20, "pss_mb": mem.peak_pss / 2**20,
            "by_role": {r: {k: v / 2**20 for k, v in m.items()} | {"count": mem.max_count[r]}
                        for r, m in mem.peak_by_role.items()},
            "ray_processes_seen": sorted(mem.names),
            "background_cores": mem.background_cores(ends[1], ends[-1]) if len(ends) > 2 else None}


def ray_variants(args: argparse.Namespace, report_line) -> dict[str, dict]:
    cpus = max(3, os.cpu_count() or 1)   # a 2-worker trial holds 2 x 1 CPU + 0.25 for its trial actor
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as work:
        t = time.monotonic()
        with ray_cluster(num_cpus=cpus) as cluster:
            report_line(f"local Ray cluster up in {time.monotonic() - t:.1f} s ({cpus} logical CPUs)")
            if args.mode != "smoke":   # is a trial slower because it runs in Ray, or because Ray runs?
                out["b_up"] = bare(args, "fit")["b"]
                report_line(f"(b_up) done: {steady(out['b_up']):.0f} samples/s")
            for label, n, train in (("c", 1, False), ("c1", 1, True), ("d", 2, False)):
                if args.mode == "smoke" and label == "c1":
                    continue
                out[label] = ray_trial(args, cluster, label, n, train, Path(work))
                report_line(f"({label}) done: start-up {out[label]['startup_s']:.1f} s")
        if args.preload_torch:
            with ray_cluster(num_cpus=cpus, env={"RAY_preload_python_modules": "torch"}) as cluster:
                time.sleep(5)   # let the pre-started idle workers finish importing torch
                out["d_preload"] = ray_trial(args, cluster, "d_preload", 2, False, Path(work))
                report_line(f"(d_preload) done: start-up {out['d_preload']['startup_s']:.1f} s")
    return out


# ----------------------------------------------------------------------------- the report

LABELS = {"a": "(a) plain PyTorch loop, bare process",
          "a0": "(a0) plain loop without DataLoader (tensor slicing)",
          "b": "(b) training.loop.fit, bare process",
          "b_up": "(b) again, bare process, while the (idle) Ray cluster runs",
          "c": "(c) schedtune 1-worker trial (fit in the Tune trial process)",
          "c1": "(c1) 1-worker Ray Train TorchTrainer in a Tune trial",
          "d": "(d) schedtune 2-worker trial (TorchTrainer, DDP/gloo)",
          "d_preload": "(d) with torch pre-imported by idle Ray workers",
          "e": "(e) 2 forked local processes, DDP/gloo, no Ray"}


def merge(vs: list[dict]) -> dict:
    """Repeated bare runs as one: every run's timed epochs, the median start-up, the peak memory."""
    out = dict(vs[0])
    out["samples_per_s"] = vs[0]["samples_per_s"][:1] + [x for v in vs for x in v["samples_per_s"][1:]]
    out["period_s"] = [x for v in vs for x in v["period_s"]]
    out["cpu_s"] = [x for v in vs for x in v["cpu_s"]]
    starts = [v["startup_s"] for v in vs if v.get("startup_s") is not None]
    out["startup_s"] = median(starts) if starts else None
    out["peak_rss_mb"], out["pss_mb"] = max(v["peak_rss_mb"] for v in vs), max(v["pss_mb"] for v in vs)
    return out


def steady(v: dict, key: str = "samples_per_s") -> float:
    """Median over the epochs after the warm-up epoch."""
    xs = v.get(key) or []
    rest = xs[1:] if key == "samples_per_s" else xs
    return median(rest or xs)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], configure)
    rep = Report(NAME, args, "Framework overhead: plain PyTorch vs fit vs Tune/Train trials")
    cfg = train_config(args, 1)
    rep.note(f"Workload: synthetic data, {cfg['data']['num_samples']} samples (80% train), MLP "
             f"{cfg['model']['hidden']}, global batch {args.batch}, SGD; 1 warm-up epoch + {cfg['epochs'] - 1} "
             f"timed epochs; one compute thread per process.")
    runs: dict[str, dict] = {}
    kinds = ["plain", "fit"] + (["ddp"] if args.mode != "smoke" else [])
    rounds = args.rounds or pick(args, 3, 1, 1)
    repeats: dict[str, list[dict]] = {}
    for r in range(rounds):   # a b e, e b a, ...: drift on a busy machine hits every variant alike
        for kind in (kinds if r % 2 == 0 else kinds[::-1]):
            for k, v in bare(args, kind).items():
                repeats.setdefault(k, []).append(v)
                print(f"({k}) round {r + 1}: {steady(v):.0f} samples/s", flush=True)
    runs.update({k: merge(vs) for k, vs in repeats.items()})
    imports = import_costs() if args.mode != "smoke" else {}
    if not args.skip_ray:
        runs.update(ray_variants(args, lambda s: print(s, flush=True)))

    rep.finish(report(rep, {k: runs[k] for k in LABELS if k in runs}, imports))


def threads(v: dict) -> str:
    return ",".join(str(t) for t in (v["threads"] if isinstance(v["threads"], list) else [v["threads"]]))


def report(rep: Report, runs: dict[str, dict], imports: dict[str, dict]) -> dict[str, Any]:
    """The tables; returns the RESULT values."""
    a, a_cpu = steady(runs["a"]), median(runs["a"]["cpu_s"])
    rep.section("Throughput, start-up, memory")
    rep.table(["variant", "samples/s", "x (a)", "CPU s/epoch", "x (a) by CPU", "epoch period s", "start-up s",
               "peak RSS GB", "peak PSS GB", "threads", "Ray + driver cores"],
              [[LABELS[k], steady(v), steady(v) / a, median(v["cpu_s"]), a_cpu / median(v["cpu_s"]),
                steady(v, "period_s"), v.get("startup_s"), v["peak_rss_mb"] / 1024, v["pss_mb"] / 1024, threads(v),
                v.get("background_cores")] for k, v in runs.items()],
              "samples/s: training pass, median of the timed epochs (bare variants: of all rounds). CPU s/epoch: CPU "
              "time of the training thread(s) per epoch (train + eval + checkpoint; all workers), which load from "
              "other processes does not inflate: on a busy machine, compare by CPU. epoch period: wall time between "
              "consecutive epoch ends. start-up: process start (bare) or trial start (Ray) to the first epoch. "
              "Memory: bare = the process's (or processes') peak RSS and PSS; Ray = peak over the trial of the sum "
              "over its processes. Ray + driver cores: CPU the cluster's own processes (raylet, GCS, dashboard, "
              "agents, Train's helper actors) and the Tune driver used during the timed epochs, in cores: what "
              "the trial competes with on this machine.")
    for k in ("c", "c1", "d", "d_preload", "e"):
        if k not in runs:
            continue
        v = runs[k]
        rep.section(f"Start-up breakdown {LABELS[k]}")
        start = "process start" if k == "e" else "trial start"
        rep.table(["phase", "s"], list(v["breakdown"].items()) + [[f"total: {start} -> first epoch", v["startup_s"]]])
        if v.get("tasks"):
            rep.table(["actor (__init__) or task", "asked for at s", "waited for a process s", "ran s"], v["tasks"],
                      f"Ray's task events of this trial up to its first epoch: "
                      f"{sum(t[0].endswith('__init__') for t in v['tasks'])} actors created, each a Python process; "
                      "times from the trial's start.")
        if v.get("profile"):
            rep.table(["thread", "function (leaf)", "share of GIL samples"], v["profile"],
                      "py-spy --gil of the training process after its first epoch: which threads hold the "
                      "interpreter, and where the Python time of a step goes.")
        if v.get("by_role"):
            rep.table(["process", "count", "peak RSS GB", "peak PSS GB"],
                      [[r, m["count"], m["rss"] / 1024, m["pss"] / 1024] for r, m in v["by_role"].items()])
    if imports:
        rep.section("Import costs (a fresh Python process)")
        rep.table(["import", "s", "peak RSS MB"], [[m, v["s"], v["rss_mb"]] for m, v in imports.items()],
                  "`json` is the bare interpreter. Every process of a trial that imports torch pays the torch row.")
    values: dict[str, Any] = {f"{k}_samples_per_s": steady(v) for k, v in runs.items()}
    values.update({f"ratio_{k}_a": steady(v) / a for k, v in runs.items() if k != "a"})
    values.update({f"cpu_ratio_{k}_a": a_cpu / median(v["cpu_s"]) for k, v in runs.items() if k != "a"})
    values.update({f"startup_{k}_s": v["startup_s"] for k, v in runs.items() if k[0] in "bcde"})
    values.update({f"rss_{k}_gb": v["peak_rss_mb"] / 1024 for k, v in runs.items() if k[0] in "cde"})
    values.update({f"pss_{k}_gb": v["pss_mb"] / 1024 for k, v in runs.items() if k[0] in "cde"})
    values.update({f"ray_cores_{k}": v["background_cores"] for k, v in runs.items() if v.get("background_cores")})
    if "c" in runs:
        d = runs["d"]
        goals = {"goal_ratio_c_a": values["ratio_c_a"] >= GOAL_RATIO,
                 "goal_cpu_ratio_c_a": values["cpu_ratio_c_a"] >= GOAL_RATIO,
                 "goal_startup_d": d["startup_s"] <= GOAL_STARTUP_S,
                 "goal_rss_d": d["peak_rss_mb"] / 1024 <= GOAL_RSS_GB}
        rep.section("Goals")
        rep.table(["goal", "measured", "met"],
                  [[f"c/a >= {GOAL_RATIO} (samples/s)", values["ratio_c_a"], goals["goal_ratio_c_a"]],
                   [f"c/a >= {GOAL_RATIO} (by CPU time)", values["cpu_ratio_c_a"], goals["goal_cpu_ratio_c_a"]],
                   [f"2-worker start-up <= {GOAL_STARTUP_S:g} s", d["startup_s"], goals["goal_startup_d"]],
                   [f"2-worker trial RSS <= {GOAL_RSS_GB:g} GB", d["peak_rss_mb"] / 1024, goals["goal_rss_d"]]])
        rep.note("Ray processes seen during (d): " + ", ".join(d["ray_processes_seen"]))
        values.update(goals)
    return values


if __name__ == "__main__":
    main()
