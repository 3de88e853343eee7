"""The Tune driver: a validated ExperimentSpec in, a finished (or resumed) experiment out.

``run_experiment`` sizes concurrency to what the cluster can give full worker groups, starts
(or joins) Ray, runs the Tuner with the searcher and scheduler the spec names, logs everything
to MLflow (tuning.tracking) and registers the best trial's model. The code that runs inside a
trial is in tuning.trial.
"""
from __future__ import annotations

import itertools
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from training.config import TrainConfig
from tuning.space import ExperimentSpec, to_tune, total_trials
from tuning.storage import latest_run_dir, resolve_storage

TRIAL_DRIVER_CPU = 0.25      # the Tune trial process of a Train run mostly waits on its workers
WORKER_MEMORY_GB = 1.5       # a torch worker process (the CUDA build) on CPU, measured ~1 GB


def trial_demand(cfg: TrainConfig) -> dict[str, float]:
    """Resources one trial holds while it runs (driver + worker group)."""
    s = cfg.scaling
    if s.num_workers == 1:
        return {"CPU": s.cpus_per_worker, "GPU": s.gpus_per_worker if s.use_gpu else 0.0,
                "memory_gb": WORKER_MEMORY_GB}
    return {"CPU": TRIAL_DRIVER_CPU + s.num_workers * s.cpus_per_worker,
            "GPU": s.num_workers * s.gpus_per_worker if s.use_gpu else 0.0,
            "memory_gb": 0.5 + s.num_workers * WORKER_MEMORY_GB}


def _extreme_configs(spec: ExperimentSpec) -> list[TrainConfig]:
    """The base config and every combination of the space's scaling extremes (for sizing: the
    most workers with the most CPUs per worker is a combination of two keys)."""
    keys = [k for k in spec.space if k == "scaling" or k.startswith("scaling.")]
    combos = itertools.product(*(spec.space[k].extremes() for k in keys))
    return [spec.base, *(spec.base.with_updates(dict(zip(keys, values))) for values in combos if keys)]


class ResourceError(RuntimeError):
    """The cluster cannot run even one trial of this experiment."""


def max_concurrent(spec: ExperimentSpec, cluster: dict[str, float], memory_gb: Optional[float],
                   autoscaling: bool = False) -> int:
    """How many trials can hold a full worker group at once (``max_concurrent_trials: auto``).

    ``cluster`` is ``ray.cluster_resources()``; ``memory_gb`` the machine's available memory for
    a local cluster (None: not limiting). On a cluster that autoscales, a shortfall is not an
    error: one trial is admitted and its worker group waits (bounded) for new nodes.
    """
    demand = max((trial_demand(c) for c in _extreme_configs(spec)), key=lambda d: (d["GPU"], d["CPU"]))
    fits = []
    for res, need in (("CPU", demand["CPU"]), ("GPU", demand["GPU"])):
        if need > 0:
            fits.append(math.floor(cluster.get(res, 0.0) / need + 1e-9))
    if memory_gb is not None:
        fits.append(math.floor(memory_gb / demand["memory_gb"]))
    n = min(fits) if fits else 1
    if n < 1:
        if autoscaling:
            return 1
        have = {k: cluster.get(k, 0.0) for k in ("CPU", "GPU")}
        raise ResourceError(
            f"one trial needs {demand['CPU']:g} CPU, {demand['GPU']:g} GPU and ~{demand['memory_gb']:g} GB "
            f"(scaling.num_workers x cpus_per_worker/gpus_per_worker, plus the trial driver) but the "
            f"cluster has {have['CPU']:g} CPU, {have['GPU']:g} GPU"
            + (f", {memory_gb:.1f} GB free memory" if memory_gb is not None else "")
            + ": lower scaling.num_workers or cpus_per_worker, or add nodes")
    return n


# ----------------------------------------------------------------------------- the driver

@dataclass
class TrialRow:
    trial_id: str
    status: str                 # completed | stopped by ASHA at epoch N | diverged | failed
    epochs: int
    metric: Optional[float]     # best value of the experiment's metric over the trial's epochs
    params: dict[str, Any]
    run_id: Optional[str] = None
    error: Optional[str] = None
    diagnosis: Optional[str] = None   # tuning.diagnose kind of its learning curves (diverged, overfitting, ...)


@dataclass
class ExperimentResult:
    name: str
    path: str                   # where Tune keeps this invocation (what --resume restores)
    rows: list[TrialRow]        # best first; diverged and failed trials last
    tracking_uri: str
    experiment_id: Optional[str] = None
    parent_run_id: Optional[str] = None
    model_version: Optional[str] = None
    lost_metrics: int = 0

    @property
    def best(self) -> Optional[TrialRow]:
        ok = [r for r in self.rows if r.metric is not None and r.status not in ("diverged", "failed")]
        return ok[0] if ok else None


def _searcher(spec: ExperimentSpec, limit: int, points: Optional[list[dict]] = None):
    """The search algorithm, holding at most ``limit`` trials at once. (Tune applies
    TuneConfig.max_concurrent_trials only to Searchers it wraps, and silently ignores it for a
    BasicVariantGenerator passed in: the limit must be set on the generator itself.)
    ``points``: run exactly these samples instead of searching (the recipe's refine step)."""
    o = spec.options
    if points:
        from ray.tune.search import ConcurrencyLimiter

        from tuning.fixed_search import FixedSamples

        return ConcurrencyLimiter(FixedSamples(points, metric=o.metric, mode=o.mode), max_concurrent=limit)
    if o.search == "optuna_tpe":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(metric=o.metric, mode=o.mode, seed=o.seed), max_concurrent=limit)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=o.seed, max_concurrent=limit)


def _trial_resources(spec: ExperimentSpec) -> Callable[[dict], dict]:
    def resources(config: dict) -> dict:
        s = spec.trial_config(config).scaling
        if s.num_workers == 1:
            return {"cpu": s.cpus_per_worker, "gpu": s.gpus_per_worker if s.use_gpu else 0}
        return {"cpu": TRIAL_DRIVER_CPU}
    return resources


def check_pretrained_models(spec: ExperimentSpec, uri: str) -> None:
    """Every ``mlflow:`` model the trials would start from exists (the fixed one, and each value a
    searched ``model.pretrained`` can take): an error now, not a failure in every trial."""
    from tuning.register import check_pretrained

    check_pretrained(spec.base.model.pretrained, uri)
    dist = spec.space.get("model.pretrained")
    if dist is not None and dist.kind in ("choice", "grid"):
        for value in dist.args:
            check_pretrained(value, uri, key="space.model.pretrained")


def run_experiment(spec: ExperimentSpec, *, storage: Optional[str] = None, tracking_uri: Optional[str] = None,
                   address: Optional[str] = None, resume: bool = False, num_cpus: Optional[int] = None,
                   out: Callable[[str], None] = print, points: Optional[list[dict]] = None,
                   register_model: bool = True) -> ExperimentResult:
    """Run ``spec`` to the end on a private local Ray cluster (or the one at ``address``).
    ``points``: exactly these samples ({space key: value}) are run, instead of searching the space.
    ``register_model``: register the best trial's model (off for the recipe's intermediate searches).

    Everything that can be wrong is checked before Ray starts: the tracking backend, the
    storage, the cluster's room for one trial (after Ray starts, before any trial).
    """
    from tuning.backend import check_tracking, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    check_tracking(uri)
    check_pretrained_models(spec, uri)
    storage = resolve_storage(storage)
    name = spec.options.name
    if resume:
        run_dir = latest_run_dir(storage, name)
        if run_dir is None:
            raise FileNotFoundError(f"nothing to resume: no interrupted run of {name!r} under {storage}/{name}")
    else:
        run_dir = f"{storage}/{name}/{time.strftime('%Y%m%d-%H%M%S')}"
    cluster = None
    import ray

    try:
        if address is None:
            from tuning.cluster import LocalCluster

            cluster = LocalCluster(num_cpus=num_cpus or os.cpu_count() or 1).start()
            address = cluster.address
            out(f"started a local Ray cluster ({cluster.num_cpus} CPUs, dashboard {cluster.dashboard_url})")
        from tuning.cluster import refresh_ray_auth

        # Ray caches the auth mode per process: an earlier connection made with token auth (e.g. a
        # `submit` from this process) would otherwise make this driver refuse the raylet's calls,
        # and every actor it owns would be cancelled as if the driver had died.
        refresh_ray_auth()
        ray.init(address=address, log_to_driver=False, logging_level="ERROR", configure_logging=True)
        return _tune(spec, storage, run_dir, uri, resume, local=cluster is not None, out=out, points=points,
                     register_model=register_model)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.stop()


def _tune(spec: ExperimentSpec, storage: str, run_dir: str, uri: str, resume: bool, local: bool,
          out: Callable[[str], None], points: Optional[list[dict]] = None,
          register_model: bool = True) -> ExperimentResult:
    import ray
    from ray import tune

    from tuning.progress import ProgressPrinter
    from tuning.schedulers import make_scheduler
    from tuning.tracking import MLflowTracker
    from tuning.trial import trial_fn

    o = spec.options
    memory_gb = None
    if local:
        import psutil

        memory_gb = psutil.virtual_memory().available / 1e9
    limit = max_concurrent(spec, ray.cluster_resources(), memory_gb, autoscaling=not local)
    if o.max_concurrent_trials != "auto":
        limit = min(limit, o.max_concurrent_trials) if local else o.max_concurrent_trials
    train_storage = f"{run_dir}/train"
    tracker = MLflowTracker(spec, uri, run_dir, train_storage)
    progress = ProgressPrinter(spec, out)
    trainable = tune.with_resources(
        tune.with_parameters(trial_fn, spec=spec, storage=train_storage, tracking_uri=uri),  # uri: mlflow: pretrained
        _trial_resources(spec))
    out(f"{o.name}: {total_trials(spec)} trials, {limit} at a time, results in {run_dir}, MLflow {uri}")
    if resume:
        tuner = tune.Tuner.restore(run_dir, trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=to_tune(spec))
    else:
        scheduler, scheduler_callbacks = make_scheduler(spec)
        tuner = tune.Tuner(
            trainable, param_space=to_tune(spec),
            tune_config=tune.TuneConfig(metric=o.metric, mode=o.mode, num_samples=o.num_samples,
                                        search_alg=_searcher(spec, limit, points), scheduler=scheduler),
            run_config=tune.RunConfig(
                name=Path(run_dir).name, storage_path=str(Path(run_dir).parent) if "://" not in run_dir
                else run_dir.rsplit("/", 1)[0], callbacks=[tracker, progress, *scheduler_callbacks], verbose=0,
                failure_config=tune.FailureConfig(max_failures=1),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=o.metric,
                                                        checkpoint_score_order=o.mode)))
    grid = tuner.fit()
    tracker = next((c for c in _callbacks(tuner) if isinstance(c, MLflowTracker)), tracker)
    rows = _rows(spec, grid, tracker)
    tracker.log_experiment_plots(rows)
    result = ExperimentResult(o.name, run_dir, rows, uri, tracker.experiment_id, tracker.parent_run_id)
    if register_model and result.best and result.best.run_id:
        result.model_version = register_best(uri, result.best.run_id, o.name, out)
    from tuning.report import results_table

    best = result.best
    tracker.finish(results_table(result, spec), {"trial_id": best.trial_id, "run_id": best.run_id or "",
                                                 "metric": best.metric} if best else None, result.model_version)
    result.lost_metrics = sum(len(v) for v in tracker._buffer.values())
    return result


def _callbacks(tuner) -> list:
    try:
        return list(tuner._local_tuner.get_run_config().callbacks or [])
    except AttributeError:
        return []


def _rows(spec: ExperimentSpec, grid, tracker) -> list[TrialRow]:
    from tuning.tracking import end_state

    o = spec.options
    rows = []
    for r in grid:
        trial_id = (r.metrics or {}).get("trial_id") or Path(r.path).name
        history = r.metrics_dataframe
        values = []
        if history is not None and o.metric in history:
            values = [v for v in history[o.metric].tolist() if isinstance(v, (int, float)) and math.isfinite(v)]
        last = r.metrics or {}
        status = end_state(last, r.error is not None, spec.base.epochs, o.scheduler.name)
        best = (max(values) if o.mode == "max" else min(values)) if values and status not in ("diverged", "failed") else None
        params = {k: v for k, v in (r.config or {}).items() if k in spec.space}
        rows.append(TrialRow(trial_id, status, int(last.get("epoch", 0)), best, params,
                             tracker._children.get(trial_id), error_summary(r.error) if r.error else None,
                             _diagnosis(tracker, trial_id, history)))
    sign = -1 if o.mode == "max" else 1
    rows.sort(key=lambda r: (r.metric is None, sign * (r.metric or 0.0)))
    return rows


def error_summary(error: BaseException) -> str:
    """The line of a trial's error that says what went wrong: Ray wraps the trial's own exception in
    a traceback whose first line names only the actor, and whose last ``Type: message`` line is it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):
        m = re.match(r"^(?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*(?:Error|Exception)): (.+)", line)
        if m:
            return f"{m.group(1)}: {m.group(2)}"[:1000]
    return (lines[0] if lines else type(error).__name__)[:1000]


def _diagnosis(tracker, trial_id: str, history) -> Optional[str]:
    """The tracker's diagnosis of the trial (made when it ended), else one from Tune's history."""
    from tuning.diagnose import diagnose

    d = tracker.diagnoses.get(trial_id)
    if d is None and history is not None and len(history):
        records = [{k: v for k, v in rec.items() if not (isinstance(v, float) and math.isnan(v))}
                   for rec in history.to_dict("records")]
        d = diagnose(records)
    return d.kind if d is not None else None


def register_best(uri: str, run_id: str, name: str, out: Callable[[str], None]) -> Optional[str]:
    """Register the best trial's model in the MLflow Model Registry (in a subprocess, so the
    driver never imports torch). Returns the model version, or None with the reason printed."""
    cmd = [sys.executable, "-m", "tuning.register", "--tracking-uri", uri, "--run-id", run_id, "--name", name]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        out(f"could not register the best model: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
        return None
    return p.stdout.strip().splitlines()[-1]
