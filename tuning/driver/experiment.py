"""The Tune driver: a validated ExperimentSpec in, a finished (or resumed) experiment out.

``run_experiment`` sizes concurrency to what the cluster can give full worker groups, starts
(or joins) Ray, runs the Tuner with the searcher and scheduler the spec names, logs everything
to MLflow (tuning.tracking.callback) and registers the best trial's model. The code that runs inside a
trial is in tuning.driver.trial.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from tuning.analysis.data_wait import data_wait
from tuning.analysis.pareto import front, point_at_best_epoch
from tuning.analysis.ranking import BROKEN_STATUSES, rank, rank_by_mean, trial_score
from tuning.analysis.results import ExperimentResult, TrialRow, end_state, error_summary
from tuning.driver.search import searcher, to_tune, tune_num_samples
from tuning.driver.sizing import max_concurrent, trial_resources
from tuning.driver.storage import latest_run_dir, resolve_storage
from tuning.spec import ExperimentSpec, total_trials
from tuning.spec.options import REPEAT_INDEX


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
    """Run ``spec`` to the end on the Ray cluster at ``address``, else the one ``$RAY_ADDRESS``
    names, else a private local one (``address="local"``: private whatever the environment says).
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
    from tuning.tracking.warm_start import load_warm_start

    warm = None if resume else load_warm_start(spec, uri)   # a resumed search has its points already
    if warm is not None:
        out(warm.describe())
        for line in warm.dropped:
            out(f"warm start: left out {line}")
    cluster = None
    import ray

    from tuning.driver.address import cluster_to_join
    from tuning.driver.progress import tune_output_off
    from tuning.driver.user_code import driver_environ, scoped_environ, trial_runtime_env

    address, chosen_by = cluster_to_join(address)   # --address, else $RAY_ADDRESS, else a private cluster
    # The user's code (spec.code_dir) on the path of the workers and of this process's children;
    # Tune's own terminal output off (tuning.driver.progress prints ours).
    with tune_output_off(), scoped_environ(driver_environ(spec.code_dir)):
        try:
            if address is None:
                from tuning.driver.cluster import LocalCluster

                cluster = LocalCluster(num_cpus=num_cpus or os.cpu_count() or 1).start()
                address = cluster.address
                out(f"started a local Ray cluster ({cluster.num_cpus} CPUs, dashboard {cluster.dashboard_url})")
            elif chosen_by == "RAY_ADDRESS":
                out(f"joining the Ray cluster at {address} (RAY_ADDRESS; --address local starts a private one)")
            from tuning.driver.cluster import refresh_ray_auth

            # Ray caches the auth mode per process: an earlier connection made with token auth (e.g. a
            # `submit` from this process) would otherwise make this driver refuse the raylet's calls,
            # and every actor it owns would be cancelled as if the driver had died.
            refresh_ray_auth()
            ray.init(address=address, runtime_env=trial_runtime_env(spec.code_dir), log_to_driver=False,
                     logging_level="ERROR", configure_logging=True)
            return _tune(spec, storage, run_dir, uri, resume, local=cluster is not None, out=out, points=points,
                         register_model=register_model, warm=warm)
        finally:
            if ray.is_initialized():
                ray.shutdown()
            if cluster is not None:
                cluster.stop()


def _tune(spec: ExperimentSpec, storage: str, run_dir: str, uri: str, resume: bool, local: bool,
          out: Callable[[str], None], points: Optional[list[dict]] = None,
          register_model: bool = True, warm=None) -> ExperimentResult:
    import ray
    from ray import tune

    from tuning.driver.cost import CostMeter
    from tuning.driver.progress import ProgressPrinter
    from tuning.driver.stopping import Completion
    from tuning.driver.trial import trial_fn
    from tuning.driver.trial_schedulers import make_scheduler, pbt_spec
    from tuning.tracking.callback import MLflowTracker

    spec = pbt_spec(spec)   # PBT's trials checkpoint every epoch it may perturb at
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
    meter = CostMeter(spec, on_cost=tracker.add_trial_tags)   # before the tracker: a trial's cost is in its end tags
    completion = Completion(spec, run_dir, meter, on_cut=tracker.add_trial_tags)
    from tuning.tracking.system_metrics import target as system_metrics_target

    trainable = tune.with_resources(
        tune.with_parameters(trial_fn, spec=spec, storage=train_storage, tracking_uri=uri,  # uri: mlflow: pretrained
                             system_metrics=system_metrics_target(uri, o.name, run_dir)),   # sampled on the trials' nodes
        trial_resources(spec))
    out(f"{o.name}: {total_trials(spec)} trials, {limit} at a time, results in {run_dir}, MLflow {uri}")
    if resume:
        tuner = tune.Tuner.restore(run_dir, trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=to_tune(spec))
    else:
        scheduler, scheduler_callbacks = make_scheduler(spec, limit, on_perturbation=tracker.add_trial_tags)
        tuner = tune.Tuner(
            trainable, param_space=to_tune(spec),
            tune_config=tune.TuneConfig(metric=o.metric, mode=o.mode, num_samples=tune_num_samples(spec),
                                        search_alg=searcher(spec, limit, points, warm), scheduler=scheduler),
            run_config=tune.RunConfig(
                name=Path(run_dir).name, storage_path=str(Path(run_dir).parent) if "://" not in run_dir
                else run_dir.rsplit("/", 1)[0], stop=completion, verbose=0,
                callbacks=[*scheduler_callbacks, meter, completion, tracker, progress],
                failure_config=tune.FailureConfig(max_failures=1),
                # PBT: a trial may be exploited from any checkpoint its donor reported; keep them all.
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None if o.scheduler.name == "pbt" else 2,
                                                        checkpoint_score_attribute=o.metric,
                                                        checkpoint_score_order=o.mode)))
    grid = tuner.fit()
    tracker = MLflowTracker.for_run_dir(run_dir) or tracker   # after a restore: the one Tune unpickled
    completion = Completion.for_run_dir(run_dir) or completion
    rows = _rows(spec, grid, tracker, completion)
    tracker.log_experiment_plots(rows)
    if o.multi_objective:
        from tuning.tracking.front_files import log_front

        log_front(tracker, spec, rows)
    result = ExperimentResult(o.name, run_dir, rows, uri, tracker.experiment_id, tracker.parent_run_id,
                              ended_by=completion.ended_by, cost=completion.meter.spent())
    tracker.tag_parent(experiment_tags(result))
    if register_model and result.best and result.best.run_id:
        result.model_version, result.champion = register_best(uri, result.best.run_id, o.name, out)
    from tuning.analysis.report import results_table

    best = result.best
    tracker.finish(results_table(result, spec), {"trial_id": best.trial_id, "run_id": best.run_id or "",
                                                 "metric": best.metric} if best else None, result.model_version)
    result.lost_metrics = tracker.unsent_metrics()
    result.lost_artifacts = tracker.lost_artifact_count()
    return result


def experiment_tags(result: ExperimentResult) -> dict[str, str]:
    """The parent run's tags of what the experiment spent and what ended it."""
    from tuning.driver.cost import cost_tags
    from tuning.tracking import schema

    return {**cost_tags(result.cost), schema.ENDED_BY: result.ended_by or "every trial ended"}


def _rows(spec: ExperimentSpec, grid, tracker, completion) -> list[TrialRow]:
    o = spec.options
    rows = []
    for r in grid:
        trial_id = (r.metrics or {}).get("trial_id") or Path(r.path).name
        history = r.metrics_dataframe
        values = history[o.metric].tolist() if history is not None and o.metric in history else []
        last = r.metrics or {}
        status = end_state(last, r.error is not None, spec.base.epochs, o.scheduler.name)
        if status.startswith("stopped") and trial_id in completion.cut:
            status = completion.cut[trial_id]   # running when a completion criterion ended the experiment
        params = {k: v for k, v in (r.config or {}).items() if k in spec.space}
        records = history.to_dict("records") if history is not None else []
        rows.append(TrialRow(trial_id, status, int(last.get("epoch", 0)), trial_score(values, status, o.mode), params,
                             tracker.run_id(trial_id), error_summary(r.error) if r.error else None,
                             _diagnosis(tracker, trial_id, history), cost=completion.meter.trial_cost(trial_id),
                             data_wait=data_wait(records) if history is not None else None,
                             repeat=(r.config or {}).get(REPEAT_INDEX)))
        if o.multi_objective and status not in BROKEN_STATUSES:
            rows[-1].objectives = point_at_best_epoch(records, [m.name for m in o.objectives],
                                                      [m.mode for m in o.objectives])
    if o.multi_objective:
        for row, on in zip(rows, front([list(r.objectives.values()) if r.objectives else None for r in rows],
                                       [m.mode for m in o.objectives])):
            row.on_front = on
    if o.repeats > 1:   # noise-aware: configs rank by the mean over their repeats
        def config_of(row: TrialRow) -> str:
            return json.dumps(spec.decode(row.params), sort_keys=True, default=str)

        rows, groups = rank_by_mean(rows, config_of, lambda row: row.metric, o.mode)
        for row in rows:
            row.group = groups.get(config_of(row))
        return rows
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


def register_best(uri: str, run_id: str, name: str,
                  out: Callable[[str], None]) -> tuple[Optional[str], Optional[str]]:
    """Register the best trial's model in the MLflow Model Registry, servable without schedtune
    (tuning.delivery.export.publish_model, in a subprocess, so that the driver never imports torch).
    Returns (the model version, the version with the alias ``champion``), or (None, None) with the
    reason printed."""
    import json

    cmd = [sys.executable, "-m", "tuning.delivery.export", "--tracking-uri", uri, "--run-id", run_id, "--name", name]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        out(f"could not register the best model: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
        return None, None
    done = json.loads(p.stdout.strip().splitlines()[-1])
    return done["version"], done["champion"]
