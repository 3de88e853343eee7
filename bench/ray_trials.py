"""One timed Tune trial of the shipped trial code, for the benchmarks that need a real trial.

``run_trial`` runs ``tuning.driver.trial.trial_fn`` (or, for comparison, the same worker function through
a plain ``train_workers``-worker TorchTrainer) as the only trial of a Tuner on an already
connected Ray cluster, and returns what it saw:

- when the trial started (Tune's ``on_trial_start``: its actor is up) and when each result
  reached the driver;
- wall-clock notes the trial process and every Train worker write at their first report
  (``ray.tune.report`` / ``ray.train.report`` are wrapped in those processes: microseconds):
  when the trial function and the worker function were entered, when the first report was
  made, the epoch's own duration, the compute threads;
- how long each ``ray.tune.report`` call in the trial blocked (``bench_report_ms`` on the next
  result): a function trainable's report() returns only when the driver asks for more;
- the CPU time of the training thread at each report (``bench_thread_cpu_s``; rank 0's in a
  Train run): per-epoch CPU that other work on the machine does not inflate;
- optionally (``sample``) the peak memory of the trial's processes and the CPU the cluster's own
  processes and the driver used meanwhile (common.TreeSampler), and Ray's task events up to the
  first epoch (which actors the trial created, how long each waited for a process and ran __init__).
"""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from processes import TreeSampler

ROLES = ("ray::ImplicitFunc", "ray::TrainController", "ray::RayTrainWorker")   # a trial's processes


def timed_trial(config: dict, spec, storage: str, timing_dir: str, train_workers: int = 0) -> None:
    """The Tune function trainable: tuning.driver.trial.trial_fn with the timing hooks above.
    ``train_workers`` > 0: a plain TorchTrainer of that many workers over the same (wrapped)
    worker function instead (what a 1-worker trial would cost through Train)."""
    fn_entry = time.time()
    import ray.train
    import ray.tune

    import tuning.driver.trial as trial

    def note(where: str, metrics: dict, **extra: Any) -> None:
        path = Path(timing_dir) / f"{where}.json"
        if not path.exists():   # the first report of this process: what start-up needs
            import torch

            path.write_text(json.dumps({"fn_entry": fn_entry, "report_wall": time.time(), "pid": os.getpid(),
                                        "epoch_time_s": metrics.get("epoch_time_s"),
                                        "threads": torch.get_num_threads(), **extra}))

    real_tune_report, real_worker, blocked = ray.tune.report, trial._train_worker, [float("nan")]

    def tune_report(metrics, *a, **kw):
        note("trial", metrics)
        t = time.perf_counter()
        out = real_tune_report({"bench_thread_cpu_s": time.thread_time(), **metrics, "bench_report_ms": blocked[0]},
                               *a, **kw)
        blocked[0] = 1000 * (time.perf_counter() - t)
        return out

    def timed_worker(loop_config: dict) -> None:
        worker_entry = time.time()
        import ray.train

        real_train_report = ray.train.report

        def train_report(metrics, *a, **kw):
            note(f"rank{ray.train.get_context().get_world_rank()}", metrics, worker_entry=worker_entry)
            return real_train_report({**metrics, "bench_thread_cpu_s": time.thread_time()}, *a, **kw)

        ray.train.report = train_report
        real_worker(loop_config)

    ray.tune.report, trial._train_worker = tune_report, timed_worker
    if not train_workers:
        return trial.trial_fn(config, spec, storage)
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = spec.trial_config(config)
    TorchTrainer(timed_worker, train_loop_config={"train": cfg.to_dict(), "metric": spec.options.metric,
                                                  "mode": spec.options.mode},
                 scaling_config=ray.train.ScalingConfig(num_workers=train_workers,
                                                        resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
                 run_config=ray.train.RunConfig(name=f"train-{ray.tune.get_context().get_trial_id()}",
                                                storage_path=storage, callbacks=[TuneReportCallback()])).fit()


@dataclass
class TrialRun:
    launched: float                                   # Tuner.fit() called (wall clock)
    start: float                                      # on_trial_start
    arrivals: list[tuple[float, dict]]                # (wall clock at the driver, result)
    notes: dict[str, dict]                            # "trial", "rank0", "rank1", ...: see timed_trial
    sampler: Optional[TreeSampler] = None
    tasks: list[list] = field(default_factory=list)   # task_timeline rows
    profile: list[list] = field(default_factory=list)  # GilProfile.summary

    @property
    def workers(self) -> list[dict]:
        return [v for k, v in sorted(self.notes.items()) if k.startswith("rank")]

    @property
    def first_epoch_start(self) -> float:
        """When the last of the trial's workers (or the trial itself) started its first epoch."""
        return max(n["report_wall"] - n["epoch_time_s"] for n in (self.workers or [self.notes["trial"]]))

    def results(self, key: str) -> list[Any]:
        return [r[key] for _, r in self.arrivals if key in r]


def run_trial(spec, work: Path, label: str, *, train_workers: int = 0, callbacks: Sequence = (),
              cluster=None, sample: bool = False, profile_s: float = 0.0) -> TrialRun:
    """``spec.base`` as the only trial of a Tuner (resources as tuning.driver.experiment gives them);
    ``cluster`` (a LocalCluster) for the sampler and the task events; ``profile_s`` > 0: py-spy
    the training process (the trial, or rank 0) for that long once its first epoch is reported."""
    from ray import tune

    from tuning.driver.sizing import TRIAL_DRIVER_CPU, trial_resources as _trial_resources

    timing = work / f"timing-{label}"
    timing.mkdir(parents=True)
    resources = {"cpu": TRIAL_DRIVER_CPU} if train_workers else _trial_resources(spec)
    trainable = tune.with_parameters(timed_trial, spec=spec, storage=str(work / "train"), timing_dir=str(timing),
                                     train_workers=train_workers)
    seen: dict[str, Any] = {"start": None, "arrivals": []}

    class Clock(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            seen["start"] = time.time()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            seen["arrivals"].append((time.time(), dict(result)))

    sampler = TreeSampler(cluster.proc.pid, ROLES) if sample and cluster is not None else None
    if sampler:
        sampler.start()
    profiler = GilProfile(timing, profile_s) if profile_s > 0 else None
    if profiler:
        profiler.start()
    launched = time.time()
    try:
        grid = tune.Tuner(tune.with_resources(trainable, resources), tune_config=tune.TuneConfig(num_samples=1),
                          run_config=tune.RunConfig(name=label, storage_path=str(work / "tune"),
                                                    callbacks=[Clock(), *callbacks], verbose=0)).fit()
    finally:
        if sampler:
            sampler.stop()
        if profiler:
            profiler.join(timeout=profile_s + 30)
    if grid.errors:
        raise RuntimeError(f"trial {label} failed: {grid.errors[0]}")
    run = TrialRun(launched, seen["start"], seen["arrivals"],
                   {p.stem: json.loads(p.read_text()) for p in timing.glob("*.json")}, sampler)
    if cluster is not None and run.workers:
        run.tasks = task_timeline(cluster.dashboard_url, run.start, run.first_epoch_start)
    run.profile = profiler.summary if profiler else []
    return run


class GilProfile(threading.Thread):
    """``py-spy record --gil`` of the trial's training process (the pid its first report noted:
    rank 0's in a Train run) for ``seconds``; ``summary``: [thread, function, share of the samples
    in which a thread held the GIL], largest first. Shows whether anything but the training thread
    competes for the interpreter, and where the training thread spends its Python time."""

    def __init__(self, timing_dir: Path, seconds: float, top: int = 12):
        super().__init__(daemon=True)
        self.timing_dir, self.seconds, self.top = timing_dir, seconds, top
        self.summary: list[list] = []

    def run(self) -> None:
        import subprocess
        from collections import Counter

        deadline = time.time() + 600
        while time.time() < deadline:   # rank 0 where there is one, else the trial process
            notes = [self.timing_dir / "rank0.json", self.timing_dir / "trial.json"]
            found = [json.loads(n.read_text()) for n in notes if n.exists()]
            if found:
                break
            time.sleep(0.5)
        else:
            return
        out = self.timing_dir / "py-spy.txt"
        subprocess.run(["py-spy", "record", "--pid", str(found[0]["pid"]), "--duration", str(int(self.seconds)),
                        "--rate", "200", "--gil", "--threads", "--format", "raw", "-o", str(out)],
                       capture_output=True, timeout=self.seconds + 60)
        counts: Counter = Counter()
        for line in out.read_text().splitlines() if out.exists() else []:
            stack, n = line.rsplit(" ", 1)
            frames = stack.split(";")
            counts[(frames[0].split(": ", 1)[-1], frames[-1].split(" (")[0])] += int(n)
        total = sum(counts.values()) or 1
        self.summary = [[t, f, n / total] for (t, f), n in counts.most_common(self.top)]


def task_timeline(dashboard_url: str, trial_start: float, first_epoch: float) -> list[list]:
    """The actors Ray created for a trial before its first epoch, from Ray's task events: when
    each was asked for, how long it waited for a worker process, how long its __init__ ran; and
    the worker group's set-up tasks. [name, asked for at, waited, ran], s after the trial's start."""
    from ray.util.state import list_tasks

    time.sleep(2.0)   # task events reach the GCS about once a second
    rows = []
    keep = ("RayTrainWorker.init_train_context", "execute._setup_torch_process_group", "RayTrainWorker.run_train_fn")
    for t in list_tasks(address=dashboard_url, detail=True, limit=10000, raise_on_missing_output=False):
        created, started, ended = (getattr(t, k) for k in ("creation_time_ms", "start_time_ms", "end_time_ms"))
        if not created or not started:
            continue
        created, started = created / 1000 - trial_start, started / 1000 - trial_start
        ended = ended / 1000 - trial_start if ended else None
        if created < -1.0 or created > first_epoch - trial_start:
            continue
        if "ACTOR_CREATION" in str(t.type) or t.name in keep:
            rows.append([t.name.split(":")[-1], created, started - created, (ended - started) if ended else None])
    return sorted(rows, key=lambda r: (r[1], r[0]))
