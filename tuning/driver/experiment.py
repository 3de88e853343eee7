"""The Tune driver: a validated ExperimentSpec in, a finished (or resumed) experiment out.

``run_experiment`` sizes concurrency to what the cluster can give full worker groups, starts
(or joins) Ray, runs the Tuner with the searcher and scheduler the spec names, logs everything
to MLflow (tuning.tracking.callback) and registers the best trial's model. The code that runs inside a
trial is in tuning.driver.trial.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from tuning.analysis.ranking import rank, trial_score
from tuning.analysis.results import ExperimentResult, TrialRow, end_state, error_summary
from tuning.driver.search import searcher, to_tune
from tuning.driver.sizing import max_concurrent, trial_resources
from tuning.driver.storage import latest_run_dir, resolve_storage
from tuning.spec import ExperimentSpec, total_trials


IF_PRESENT = "if-present"   # resume=IF_PRESENT: continue the latest run when there is one, else start one


def check_pretrained_models(spec: ExperimentSpec, uri: str) -> None:
    """Every ``mlflow:`` model the trials would start from exists (the fixed one, and each value a
    searched ``model.pretrained`` can take): an error now, not a failure in every trial."""
    from tuning.tracking.registry import check_pretrained

    check_pretrained(spec.base.model.pretrained, uri)
    dist = spec.space.get("model.pretrained")
    if dist is not None and dist.kind in ("choice", "grid"):
        for value in dist.args:
            check_pretrained(value, uri, key="space.model.pretrained")


def run_experiment(spec: ExperimentSpec, *, storage: Optional[str] = None, tracking_uri: Optional[str] = None,
                   address: Optional[str] = None, resume: bool | str = False, num_cpus: Optional[int] = None,
                   out: Callable[[str], None] = print, points: Optional[list[dict]] = None,
                   register_model: bool = True) -> ExperimentResult:
    """Run ``spec`` to the end on a private local Ray cluster (or the one at ``address``).
    ``resume``: True continues the latest interrupted run (an error when there is none); ``IF_PRESENT``
    continues it when there is one and starts a new run otherwise (a RayJob that is retried after its
    head restarted, which must neither start over nor fail).
    ``points``: exactly these samples ({space key: value}) are run, instead of searching the space.
    ``register_model``: register the best trial's model (off for the recipe's intermediate searches).

    Everything that can be wrong is checked before Ray starts: the tracking backend, the
    storage, the cluster's room for one trial (after Ray starts, before any trial).
    """
    from tuning.tracking.backend import check_tracking, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    check_tracking(uri)
    check_pretrained_models(spec, uri)
    storage = resolve_storage(storage)
    name = spec.options.name
    run_dir = latest_run_dir(storage, name) if resume else None
    if resume and run_dir is None and resume != IF_PRESENT:
        raise FileNotFoundError(f"nothing to resume: no interrupted run of {name!r} under {storage}/{name}")
    resume = run_dir is not None
    if run_dir is None:
        run_dir = f"{storage}/{name}/{time.strftime('%Y%m%d-%H%M%S')}"
    cluster = None
    import ray

    try:
        if address is None:
            from tuning.driver.cluster import LocalCluster

            cluster = LocalCluster(num_cpus=num_cpus or os.cpu_count() or 1).start()
            address = cluster.address
            out(f"started a local Ray cluster ({cluster.num_cpus} CPUs, dashboard {cluster.dashboard_url})")
        from tuning.driver.cluster import refresh_ray_auth

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

    from tuning.driver.progress import ProgressPrinter
    from tuning.driver.trial import trial_fn
    from tuning.driver.trial_schedulers import make_scheduler
    from tuning.tracking.callback import MLflowTracker

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
        trial_resources(spec))
    out(f"{o.name}: {total_trials(spec)} trials, {limit} at a time, results in {run_dir}, MLflow {uri}")
    if resume:
        tuner = tune.Tuner.restore(run_dir, trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=to_tune(spec))
    else:
        scheduler, scheduler_callbacks = make_scheduler(spec)
        tuner = tune.Tuner(
            trainable, param_space=to_tune(spec),
            tune_config=tune.TuneConfig(metric=o.metric, mode=o.mode, num_samples=o.num_samples,
                                        search_alg=searcher(spec, limit, points), scheduler=scheduler),
            run_config=tune.RunConfig(
                name=Path(run_dir).name, storage_path=str(Path(run_dir).parent) if "://" not in run_dir
                else run_dir.rsplit("/", 1)[0], callbacks=[tracker, progress, *scheduler_callbacks], verbose=0,
                failure_config=tune.FailureConfig(max_failures=1),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=o.metric,
                                                        checkpoint_score_order=o.mode)))
    grid = tuner.fit()
    tracker = MLflowTracker.for_run_dir(run_dir) or tracker   # after a restore: the one Tune unpickled
    rows = _rows(spec, grid, tracker)
    tracker.log_experiment_plots(rows)
    result = ExperimentResult(o.name, run_dir, rows, uri, tracker.experiment_id, tracker.parent_run_id)
    if register_model and result.best and result.best.run_id:
        result.model_version = register_best(uri, result.best.run_id, o.name, out)
    from tuning.analysis.report import results_table

    best = result.best
    tracker.finish(results_table(result, spec), {"trial_id": best.trial_id, "run_id": best.run_id or "",
                                                 "metric": best.metric} if best else None, result.model_version)
    result.lost_metrics = tracker.unsent_metrics()
    return result


def _rows(spec: ExperimentSpec, grid, tracker) -> list[TrialRow]:
    o = spec.options
    rows = []
    for r in grid:
        trial_id = (r.metrics or {}).get("trial_id") or Path(r.path).name
        history = r.metrics_dataframe
        values = history[o.metric].tolist() if history is not None and o.metric in history else []
        last = r.metrics or {}
        status = end_state(last, r.error is not None, spec.base.epochs, o.scheduler.name)
        params = {k: v for k, v in (r.config or {}).items() if k in spec.space}
        rows.append(TrialRow(trial_id, status, int(last.get("epoch", 0)), trial_score(values, status, o.mode), params,
                             tracker.run_id(trial_id), error_summary(r.error) if r.error else None,
                             _diagnosis(tracker, trial_id, history)))
    return rank(rows, lambda row: row.metric, o.mode)


def _diagnosis(tracker, trial_id: str, history) -> Optional[str]:
    """The tracker's diagnosis of the trial (made when it ended), else one from Tune's history."""
    from tuning.analysis.diagnose import diagnose

    d = tracker.diagnosis(trial_id)
    if d is None and history is not None and len(history):
        records = [{k: v for k, v in rec.items() if not (isinstance(v, float) and math.isnan(v))}
                   for rec in history.to_dict("records")]
        d = diagnose(records)
    return d.kind if d is not None else None


def register_best(uri: str, run_id: str, name: str, out: Callable[[str], None]) -> Optional[str]:
    """Register the best trial's model in the MLflow Model Registry (in a subprocess, so the
    driver never imports torch). Returns the model version, or None with the reason printed."""
    cmd = [sys.executable, "-m", "tuning.tracking.registry", "--tracking-uri", uri, "--run-id", run_id, "--name", name]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        out(f"could not register the best model: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
        return None
    return p.stdout.strip().splitlines()[-1]
