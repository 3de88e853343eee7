"""The driver at scale: many trials through schedtune's driver and tracker, against plain Ray Tune
running the same trials on the same cluster.

Part 1, trivial trials: each reports ``--epochs`` results over ``--trial-s`` seconds (a sleep; no
torch), as Ray's own scalability release tests do ("bookkeeping overhead": 10,000 one-second trials
on 16 CPUs, acceptance under 800 s against an ideal of 625 s, i.e. under 28%; Ray's docs aim for
under 20%).
  (s) schedtune: ``tuning.driver.experiment.run_experiment`` with the trial body swapped for the
      trivial one; everything else is the shipped driver: the spec's random searcher (seeded), FIFO,
      sizing (``max_concurrent_trials: auto``), the MLflowTracker on a sqlite store, the progress
      printer; model registration off.
  (p) plain Ray Tune: a Tuner with the same trainable body, param space, seed, per-trial resources
      and concurrency, ``verbose=0``, no callbacks but a counter of finished trials.
  Per-trial overhead: (tuning wall time - ideal) / trials, where ideal = waves x trial-s and waves =
  ceil(trials / concurrency); tuning wall time runs from the Tuner's start to its last trial's end.
Part 2, one-epoch fit trials of the quickstart (digits, 1 worker): schedtune's own trial
(run_experiment unchanged) against a plain Tune function that calls ``training.loop.fit`` with
``tune.report`` (checkpoints included). Per-trial time is tuning wall time / trials.

Every variant runs in a fresh Python process (its memory is the driver's own), alternating s and p,
on one private Ray cluster (or the running one ``--address`` names; ``--cpus`` then says its CPUs).
Driver memory: that process's RSS sampled every 0.5 s with the number of finished trials; its
growth per 100 finished trials is the least-squares slope over the second half of the run (the
first half holds start-up and imports). MLflow write time: the time spent in the
tracker's Tune hooks (on Tune's event loop: what delays every trial) and in its sender thread (making
the trials' runs, sending metrics, ending the runs: uploads, plots, tags).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

from common import ROOT, Report, parse_args, pick
from processes import address_option, ray_cluster, run_child

NAME = "scale"
GOAL_OVERHEAD_RATIO = 1.1     # schedtune's per-trial overhead <= 1.1 x plain Tune's
GOAL_GROWTH_MB = 1.0          # driver memory: at most 1 MB per 100 finished trials more than plain Tune's
RAY_RELEASE_OVERHEAD = 0.20   # Ray's target overhead over the ideal time
CPU_PER_TRIAL = 0.25          # a trivial trial; the cluster's CPUs / this = concurrency
DONE = re.compile(r"(\d+)/(\d+) done")


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trivial", type=int, help="trivial trials (part 1)")
    p.add_argument("--fit", type=int, help="one-epoch fit trials (part 2); 0 skips it")
    p.add_argument("--trial-s", type=float, default=1.0, help="a trivial trial's length, s")
    p.add_argument("--epochs", type=int, default=2, help="results a trivial trial reports")
    p.add_argument("--cpus", type=int, help="the cluster's logical CPUs (default: this machine's cores)")
    address_option(p)


# ----------------------------------------------------------------------------- the trials

METRICS = {"train_loss": 0.5, "val_loss": 0.6, "val_acc": 0.8, "lr": 0.1, "samples_per_s": 1000.0}


def trivial_body(config: dict, trial_s: float, epochs: int) -> None:
    """What a trivial trial does, in both variants: ``epochs`` reports spread over ``trial_s``."""
    from ray import tune

    for epoch in range(1, epochs + 1):
        time.sleep(trial_s / epochs)
        tune.report({**METRICS, "epoch": epoch, "val_acc": METRICS["val_acc"] + 0.01 * epoch})


def make_spec(kind: str, trials: int, epochs: int, cpus_per_trial: float):
    """The quickstart, FIFO, 1-worker trials; ``kind`` "trivial" or "fit" (one epoch)."""
    from tuning.spec import load_spec

    return load_spec(ROOT / "search_spaces" / "quickstart.yaml", {
        "experiment.name": f"bench-scale-{kind}", "experiment.num_samples": trials,
        "experiment.scheduler": {"name": "fifo"}, "train.epochs": epochs if kind == "trivial" else 1,
        "train.scaling.num_workers": 1, "train.scaling.cpus_per_worker": cpus_per_trial})


# ----------------------------------------------------------------------------- measurements (child side)

class MemorySampler(threading.Thread):
    """This process's RSS every ``interval_s``, with the finished-trial count at that moment."""

    def __init__(self, interval_s: float = 0.5):
        super().__init__(daemon=True)
        self.interval_s, self.finished, self.samples = interval_s, 0, []
        self._stop_event = threading.Event()

    def run(self) -> None:
        from common import psutil_module

        me = psutil_module().Process()
        t0 = time.monotonic()
        while not self._stop_event.is_set():
            self.samples.append((time.monotonic() - t0, self.finished, me.memory_info().rss / 2**20))
            self._stop_event.wait(self.interval_s)

    def stop(self) -> list[tuple[float, int, float]]:
        self._stop_event.set()
        self.join(timeout=5)
        return self.samples


class HookTimes:
    """Wall time spent in the MLflowTracker's methods, by method (thread-safe)."""
    HOOKS = ("setup", "on_trial_start", "on_trial_result", "on_trial_complete", "on_trial_error", "_send_metrics",
             "_make_run", "_finish_trial", "diagnose_and_plot", "finish")

    def __init__(self):
        self.total: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()

    def install(self) -> None:
        from tuning.tracking.callback import MLflowTracker

        import tuning.tracking.callback as tracking

        for name in self.HOOKS:
            if hasattr(MLflowTracker, name):   # a method; else a function the tracker calls by its module's name
                setattr(MLflowTracker, name, self._timed(name, getattr(MLflowTracker, name)))
            else:
                setattr(tracking, name, self._timed(name, getattr(tracking, name)))

    def _timed(self, name: str, original):
        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                with self._lock:
                    self.total[name] = self.total.get(name, 0.0) + time.perf_counter() - t
                    self.calls[name] = self.calls.get(name, 0) + 1
        return timed


def run_schedtune(kind: str, trials: int, trial_s: float, epochs: int, cpus: float, address: str,
                  work: str) -> dict[str, Any]:
    import tuning.driver.trial as trial_module
    from tuning.driver.experiment import run_experiment

    if kind == "trivial":
        def trivial_trial(config: dict, spec, storage: str, **_) -> None:   # the driver's other keywords unused
            trivial_body(config, trial_s, epochs)
        trial_module.trial_fn = trivial_trial   # what _tune wraps (it imports trial_fn at call time)
    hooks = HookTimes()
    hooks.install()
    memory = MemorySampler()
    lines: list[tuple[float, str]] = []

    def out(line: str) -> None:
        lines.append((time.monotonic(), line))
        m = DONE.search(line)
        if m:
            memory.finished = int(m.group(1))

    memory.start()
    t0 = time.monotonic()
    result = run_experiment(make_spec(kind, trials, epochs, cpus), storage=f"{work}/results",
                            tracking_uri=f"sqlite:///{work}/mlflow.db", address=address, out=out,
                            register_model=False)
    wall = time.monotonic() - t0
    samples = memory.stop()
    start = next(t for t, s in lines if " at a time" in s)
    limit = int(re.search(r"(\d+) at a time", next(s for _, s in lines if " at a time" in s)).group(1))
    ends = [t for t, s in lines if DONE.search(s)]
    return {"tuning_s": ends[-1] - start, "wall_s": wall, "limit": limit, "memory": samples,
            "statuses": sorted({r.status for r in result.rows}), "trials": len(result.rows),
            "runs": sum(1 for r in result.rows if r.run_id), "hooks": hooks.total, "hook_calls": hooks.calls}


def run_plain(kind: str, trials: int, trial_s: float, epochs: int, cpus: float, address: str, work: str,
              limit: int) -> dict[str, Any]:
    import ray
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from tuning.driver.search import to_tune

    spec = make_spec(kind, trials, epochs, cpus)
    memory = MemorySampler()

    class Finished(tune.Callback):
        def __init__(self, sampler: MemorySampler):
            self.sampler = sampler

        def __getstate__(self):   # Tune pickles its callbacks with the experiment state: the sampler's thread stays here
            return {}

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.sampler.finished += 1

        on_trial_error = on_trial_complete

    if kind == "trivial":
        def trainable(config: dict) -> None:
            trivial_body(config, trial_s, epochs)
    else:
        def trainable(config: dict) -> None:
            from training.loop import fit

            def report(metrics: dict, checkpoint: Optional[str]) -> None:
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint) if checkpoint else None)

            with tempfile.TemporaryDirectory() as tmp:
                fit(spec.trial_config(config), report, workdir=Path(tmp) / "run")

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")   # as schedtune runs Tune: its legacy, silent reporter
    memory.start()
    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    try:
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": cpus}), param_space=to_tune(spec),
            tune_config=tune.TuneConfig(num_samples=trials, search_alg=BasicVariantGenerator(
                random_state=spec.options.seed, max_concurrent=limit)),
            run_config=tune.RunConfig(name="plain", storage_path=f"{work}/results", verbose=0,
                                      callbacks=[Finished(memory)]))
        t0 = time.monotonic()
        grid = tuner.fit()
        tuning_s = time.monotonic() - t0
    finally:
        ray.shutdown()
    return {"tuning_s": tuning_s, "wall_s": tuning_s, "limit": limit, "memory": memory.stop(),
            "statuses": sorted({"error" if r.error else "completed" for r in grid}), "trials": len(grid)}


def child_main(argv: list[str]) -> None:
    """``scale.py --child JSON``: one variant, its figures as JSON on the last line."""
    a = json.loads(argv[0])
    fn = run_schedtune if a.pop("variant") == "s" else run_plain
    print(json.dumps(fn(**a)), flush=True)


# ----------------------------------------------------------------------------- figures (parent side)

def growth_per_100(samples: list[list[float]]) -> Optional[float]:
    """MB of driver RSS per 100 finished trials: least-squares slope over the second half of the run."""
    half = [(f, rss) for _, f, rss in samples if f >= max(f for _, f, _ in samples) / 2]
    if len({f for f, _ in half}) < 2:
        return None
    n = len(half)
    mf, mr = sum(f for f, _ in half) / n, sum(r for _, r in half) / n
    var = sum((f - mf) ** 2 for f, _ in half)
    return 100 * sum((f - mf) * (r - mr) for f, r in half) / var


def rss_at(samples: list[list[float]], fraction: float) -> Optional[float]:
    """Driver RSS (MB) when ``fraction`` of the trials had finished (the first sample at or past it)."""
    total = max(f for _, f, _ in samples)
    return next((rss for _, f, rss in samples if f >= fraction * total), None)


def variant(args: argparse.Namespace, which: str, kind: str, trials: int, address: str, work: Path,
            limit: int = 0) -> dict[str, Any]:
    cpus = CPU_PER_TRIAL if kind == "trivial" else 1.0
    a = {"variant": which, "kind": kind, "trials": trials, "trial_s": args.trial_s, "epochs": args.epochs,
         "cpus": cpus, "address": address, "work": str(work / f"{kind}-{which}")}
    if which == "p":
        a["limit"] = limit
    print(f"({which}) {kind}: {trials} trials ...", flush=True)
    r = run_child([str(Path(__file__).resolve()), "--child", json.dumps(a)], timeout_s=7200,
                  env={"RAY_AUTH_MODE": "disabled", "PYTHONPATH": os.pathsep.join(
                      p for p in (str(ROOT / "bench"), str(ROOT), os.environ.get("PYTHONPATH", "")) if p)})
    if r["statuses"] != ["completed"] or r["trials"] != trials:
        raise RuntimeError(f"({which}) {kind}: {r['trials']} trials ended {r['statuses']}")
    r["per_trial_s"] = r["tuning_s"] / trials
    if kind == "trivial":
        ideal = math.ceil(trials / r["limit"]) * args.trial_s
        r["ideal_s"], r["overhead_s"] = ideal, (r["tuning_s"] - ideal) / trials
        r["overhead_fraction"] = r["tuning_s"] / ideal - 1
    r["growth_mb_per_100"] = growth_per_100(r["memory"])
    print(f"({which}) {kind}: {r['tuning_s']:.0f} s tuning, {r['limit']} at a time", flush=True)
    return r


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child_main(sys.argv[2:])
    args = parse_args(__doc__.splitlines()[0], configure)
    rep = Report(NAME, args, "The driver at scale: schedtune's driver and tracker vs plain Ray Tune")
    n_trivial = args.trivial or pick(args, 1000, 200, 4)
    n_fit = args.fit if args.fit is not None else pick(args, 200, 20, 1)
    cpus = args.cpus or os.cpu_count() or 2
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as work, ray_cluster(num_cpus=cpus, connect=False,
                                                                                   address=args.address) as c:
        runs["s_trivial"] = variant(args, "s", "trivial", n_trivial, c.address, Path(work))
        runs["p_trivial"] = variant(args, "p", "trivial", n_trivial, c.address, Path(work), runs["s_trivial"]["limit"])
        if n_fit:   # p first this time: drift on a busy machine hits both alike
            s_limit = int(cpus // 1.0)
            runs["p_fit"] = variant(args, "p", "fit", n_fit, c.address, Path(work), s_limit)
            runs["s_fit"] = variant(args, "s", "fit", n_fit, c.address, Path(work))
            if runs["s_fit"]["limit"] != s_limit:
                raise RuntimeError(f"plain Tune ran {s_limit} fit trials at a time, schedtune {runs['s_fit']['limit']}")
    rep.finish(report(rep, args, runs, cpus))


def report(rep: Report, args: argparse.Namespace, runs: dict[str, dict], cpus: int) -> dict[str, Any]:
    s, p = runs["s_trivial"], runs["p_trivial"]
    rep.note(f"Cluster: one private Ray node of {cpus} logical CPUs. Trivial trials: {args.epochs} results over "
             f"{args.trial_s:g} s, {CPU_PER_TRIAL} CPU each, {s['limit']} at a time (schedtune's sizing; plain Tune "
             f"given the same). Fit trials: the quickstart (digits, MLP), 1 worker, 1 CPU, one epoch. MLflow: a "
             f"sqlite store in a temporary directory.")
    label = {"s_trivial": "(s) schedtune, trivial", "p_trivial": "(p) plain Tune, trivial",
             "s_fit": "(s) schedtune, 1-epoch fit", "p_fit": "(p) plain Tune, 1-epoch fit"}

    def cost(r: dict) -> float:   # what "x plain" compares: overhead per trivial trial, time per fit trial
        return r.get("overhead_s", r["per_trial_s"])

    rep.section("Per-trial cost")
    rep.table(["variant", "trials", "at a time", "tuning s", "ideal s", "overhead s/trial", "overhead vs ideal",
               "s per trial", "x plain"],
              [[label[k], r["trials"], r["limit"], r["tuning_s"], r.get("ideal_s"), r.get("overhead_s"),
                f"{100 * r['overhead_fraction']:.0f}%" if "overhead_fraction" in r else None, r["per_trial_s"],
                cost(r) / cost(runs["p" + k[1:]]) if k.startswith("s") else None] for k, r in runs.items()],
              "x plain: trivial trials by overhead per trial, fit trials by time per trial.")
    rep.section("Driver memory", "RSS of the driver process (MB) when a share of the trials had finished, and its "
                                 "growth per 100 finished trials over the second half of the run.")
    fractions = (0.0, 0.25, 0.5, 0.75, 1.0)
    rep.table(["variant"] + [f"{int(f * 100)}% done" for f in fractions] + ["MB per 100 trials"],
              [[label[k]] + [rss_at(r["memory"], f) for f in fractions] + [r["growth_mb_per_100"]]
               for k, r in runs.items()])
    hooks, calls = s["hooks"], s["hook_calls"]
    loop = sum(v for k, v in hooks.items() if k.startswith("on_trial"))
    rep.section(f"MLflow writes for {s['trials']} child runs (schedtune, trivial trials)",
                "Time inside the MLflowTracker: its Tune hooks (on_trial_*) run on Tune's event loop (the driver's "
                "critical path); the rest on the tracker's own thread (and the driver's last flush): _send_metrics "
                "makes the trials' runs (_make_run, inside it) and sends metrics; _finish_trial ends a run "
                "(diagnose_and_plot, inside it: the learning-curve plots).")
    rep.table(["method", "calls", "total s", "ms per trial"],
              [[k, calls.get(k, 0), v, 1000 * v / s["trials"]]
               for k, v in sorted(hooks.items(), key=lambda kv: -kv[1])])
    ratio = s["overhead_s"] / p["overhead_s"] if p["overhead_s"] > 0 else None
    growth = (s["growth_mb_per_100"] - p["growth_mb_per_100"]
              if s["growth_mb_per_100"] is not None and p["growth_mb_per_100"] is not None else None)
    goals = {"goal_overhead": ratio is not None and ratio <= GOAL_OVERHEAD_RATIO,
             "goal_memory_flat": growth is not None and growth <= GOAL_GROWTH_MB,
             "within_ray_release_overhead": s["overhead_fraction"] <= RAY_RELEASE_OVERHEAD}
    rep.section("Goals")
    rep.table(["goal", "measured", "met"],
              [[f"schedtune's per-trial overhead <= {GOAL_OVERHEAD_RATIO} x plain Tune's (trivial)", ratio,
                goals["goal_overhead"]],
               [f"driver memory growth <= plain Tune's + {GOAL_GROWTH_MB:g} MB per 100 trials", growth,
                goals["goal_memory_flat"]],
               [f"schedtune's overhead vs ideal <= {RAY_RELEASE_OVERHEAD:.0%} (Ray's release target)",
                f"{100 * s['overhead_fraction']:.0f}%", goals["within_ray_release_overhead"]]])
    values: dict[str, Any] = {"trivial_trials": s["trials"], "concurrency": s["limit"]}
    for k, r in runs.items():
        values[f"{k}_tuning_s"] = r["tuning_s"]
        values[f"{k}_per_trial_s"] = r["per_trial_s"]
        values[f"{k}_growth_mb_per_100"] = r["growth_mb_per_100"]
        if "overhead_s" in r:
            values[f"{k}_overhead_s"] = r["overhead_s"]
            values[f"{k}_overhead_fraction"] = r["overhead_fraction"]
    if "s_fit" in runs:
        values["fit_ratio"] = runs["s_fit"]["per_trial_s"] / runs["p_fit"]["per_trial_s"]
    values.update({"overhead_ratio": ratio, "memory_growth_vs_plain_mb_per_100": growth,
                   "tracker_loop_ms_per_trial": 1000 * loop / s["trials"],
                   "tracker_send_s": hooks.get("_send_metrics", 0.0),
                   "tracker_sender_ms_per_trial": 1000 * (hooks.get("_send_metrics", 0.0) + hooks.get("_finish_trial", 0.0))
                   / s["trials"], **goals})
    return values


if __name__ == "__main__":
    main()
