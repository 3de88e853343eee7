"""What runs inside a trial: the Tune function trainable and the Train worker function.

With ``scaling.num_workers > 1`` a trial is a ``TorchTrainer`` run (Train V2, DDP over gloo on
CPU / nccl on GPU) whose reports reach Tune through ``TuneReportCallback``; the Train run is
named by trial id so a restarted trial resumes in place. With one worker the trial runs
``fit`` in its own process (Train adds ~14 s of start-up and nothing else for one worker).
A diverged run reports itself as such (flag, step, LR, worst metric) and ends normally, so the
experiment goes on and the trial never counts as best.

Under PBT, a multi-worker trial hands its checkpoints to Tune itself (``_CheckpointsToTune``): Train
V2's ``TuneReportCallback`` gives Tune the metrics and only the checkpoint's path, so Tune holds no
checkpoint of the trial, and PBT skips every exploit ("no checkpoint for trial ..."). Each start of
such a trial is a Train run of its own, from the checkpoint Tune gives it (another trial's after an
exploit): a run named by trial id alone would resume in place from its own latest checkpoint.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Callable, Optional

import ray.train

from training.config import TrainConfig
from tuning.analysis.ranking import worst_value
from tuning.spec import ExperimentSpec
from tuning.tracking.registry import MLFLOW_PREFIX
from tuning.tracking.system_metrics import Target, node_metrics, node_roles

FAILURE_CONTROLLER_LIMIT = 2  # a worker group that cannot start fails the trial after 2 tries


class WorkerGroupStartError(RuntimeError):
    """A trial's Train worker group could not get its resources: says what it needed and what was free."""


def _train_worker(loop_config: dict) -> None:
    """Runs on every Train worker: the trial body with Train's checkpoints, reports and device."""
    import ray.train
    import ray.train.torch

    def report(metrics: dict, checkpoint: Optional[str]) -> None:
        ckpt = ray.train.Checkpoint.from_directory(checkpoint) if checkpoint else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"epoch_{metrics['epoch']:04d}")

    cfg = TrainConfig.from_dict(loop_config["train"])
    # This run's own latest checkpoint (a worker group restarted), else the one the trial started from.
    checkpoint = ray.train.get_checkpoint() or loop_config.get("start_checkpoint")
    data = None
    if loop_config.get("ingest") is not None:   # data.name: raydata: this worker's Ray Data shards
        from tuning.driver import ingest

        data = ingest.shard_data(cfg, loop_config["ingest"])
    run_trial_body(cfg, loop_config["metric"], loop_config["mode"], checkpoint=checkpoint,
                   report=report, device=ray.train.torch.get_device(),
                   run_name=f"rank{ray.train.get_context().get_world_rank()}",
                   system_metrics=_sampled_here(loop_config.get("system_metrics")), data=data)


def _node() -> str:
    """This process's node, as its system metrics' tag says it: address and Ray node id."""
    return f"{ray.util.get_node_ip_address()}, Ray node {ray.get_runtime_context().get_node_id()}"


def _sampled_here(target: Optional[Target]) -> Optional[Target]:
    """On a Train worker: ``target`` labelled with this worker's node if it is the one that samples
    it (the lowest rank there: one sampler per node), else None. Ranks are grouped by Ray node, not
    by Train's local rank (by IP: two Ray nodes of one machine would share one)."""
    if target is None:
        return None
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    nodes: list = [None] * dist.get_world_size()
    # node ids are strings: gathered over gloo, whatever the training backend (nccl would need CUDA tensors)
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    dist.all_gather_object(nodes, node, group=group)
    label = node_roles(nodes).get(dist.get_rank())
    return target.on_node(label, _node()) if label else None


def run_trial_body(cfg: TrainConfig, metric: str, mode: str, *, checkpoint, report: Callable[[dict, Optional[str]], None],
                   device, run_name: str, system_metrics: Optional[Target] = None, data=None) -> None:
    """What every trial runs, on its one process or on each Train worker: ``fit`` from the restored
    ``checkpoint`` (a Tune/Train Checkpoint or None), reporting through ``report(metrics, directory)``,
    on ``data`` (a DataBundle of Ray Data shards: tuning.driver.ingest), else on ``cfg.data``'s.
    A diverged run reports itself as such (flag, step, LR, worst metric) and ends normally.
    ``system_metrics``: this node's sampled into the trial's run meanwhile (tuning.tracking.system_metrics)."""
    from training.loop import Diverged, fit

    _set_threads(cfg)
    with tempfile.TemporaryDirectory(prefix="schedtune-trial-") as work:
        resume = _restored(checkpoint, work)
        cfg = _local_pretrained(cfg, work)
        try:
            with node_metrics(system_metrics):
                fit(cfg, report, workdir=Path(work) / run_name, resume_from=resume, device=device, data=data)
        except Diverged as e:
            report(_diverged_metrics(e, cfg, metric, mode), None)


def _set_threads(cfg: TrainConfig) -> None:
    """One compute thread per CPU the worker was given. Ray sets OMP_NUM_THREADS to match, but a
    torch imported before that (a preloaded module, a setup hook) keeps one thread per core, and
    every worker of the node would use them all."""
    import torch

    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))


def _restored(checkpoint, work: str) -> Optional[str]:
    if checkpoint is None:
        return None
    return checkpoint.to_directory(str(Path(work) / "restored"))


def resolve_pretrained(cfg: TrainConfig, storage: str, tracking_uri: Optional[str] = None) -> TrainConfig:
    """``model.pretrained: mlflow:<model-uri>`` (a model an earlier experiment registered) -> its
    weights as a file under ``storage``/pretrained, which every worker of the trial can read on
    any node (shared storage). Any other value is left as is. ``tracking_uri``: the experiment's
    (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)."""
    p = cfg.model.pretrained
    if not (p and p.startswith(MLFLOW_PREFIX)):
        return cfg
    from tuning.tracking.registry import fetch_pretrained
    from tuning.tracking.backend import resolve_tracking_uri

    path = fetch_pretrained(p[len(MLFLOW_PREFIX):], resolve_tracking_uri(tracking_uri), f"{storage}/pretrained")
    return cfg.with_updates({"model.pretrained": path})


def _local_pretrained(cfg: TrainConfig, work: str) -> TrainConfig:
    """A pretrained file on object storage (s3://...) copied into ``work``: torch reads local files."""
    p = cfg.model.pretrained
    if not (p and "://" in p):
        return cfg
    import pyarrow.fs as pafs

    local = str(Path(work) / Path(p).name)
    pafs.copy_files(p, local)
    return cfg.with_updates({"model.pretrained": local})


def _diverged_metrics(e, cfg: TrainConfig, metric: str, mode: str) -> dict[str, float]:
    """What a diverged trial reports last: flagged, with the step and LR, and the worst metric
    (so ASHA stops it and it never counts as best)."""
    return {"epoch": cfg.epochs, "diverged": 1.0, "diverged_step": float(e.step), "diverged_lr": e.lr,
            metric: worst_value(mode)}


def trial_fn(config: dict, spec: ExperimentSpec, storage: str, tracking_uri: Optional[str] = None,
             system_metrics: Optional[Target] = None) -> None:
    """The Tune function trainable: one trial of ``spec`` with the sampled ``config``; ``system_metrics``:
    where its nodes' system metrics go (None: not sampled)."""
    from ray import tune

    cfg = resolve_pretrained(spec.trial_config(config), storage, tracking_uri)
    metric, mode = spec.options.metric, spec.options.mode
    trial_id = tune.get_context().get_trial_id()
    system_metrics = system_metrics.for_trial(trial_id) if system_metrics is not None else None
    if cfg.scaling.num_workers == 1:
        return _trial_in_process(cfg, metric, mode, system_metrics and system_metrics.on_node(None, _node()))
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from tuning.driver.cluster import TRAIN_ENV_DEFAULTS

    for k, v in TRAIN_ENV_DEFAULTS.items():   # Train hands them from this process to its controller,
        os.environ.setdefault(k, v)           # also on a cluster schedtune did not start: a bounded wait
    s = cfg.scaling
    per_worker = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}
    queue, start, name = None, None, f"train-{trial_id}"
    from tuning.driver import ingest

    streamed = ingest.build(cfg) if ingest.is_streamed(cfg) else None   # read and decoded by Ray Data's tasks
    if spec.options.scheduler.name == "pbt":
        from ray.util.queue import Queue

        queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
        start = tune.get_checkpoint()
        if start is not None:
            name += "-" + hashlib.sha1(start.path.encode()).hexdigest()[:8]
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"train": cfg.to_dict(), "metric": metric, "mode": mode, "start_checkpoint": start,
                           "system_metrics": system_metrics,
                           "ingest": ingest.facts_dict(streamed.facts) if streamed else None},
        **(ingest.trainer_args(streamed) if streamed else {}),
        scaling_config=ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                               resources_per_worker=per_worker,
                                               placement_strategy=s.placement.upper()),   # PACK | SPREAD
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            callbacks=[_CheckpointsToTune(queue) if queue is not None else TuneReportCallback()],
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=metric, checkpoint_score_order=mode),
            failure_config=ray.train.FailureConfig(max_failures=1,
                                                   controller_failure_limit=FAILURE_CONTROLLER_LIMIT),
        ),
    )
    try:
        _fit_reporting_checkpoints(trainer, queue) if queue is not None else trainer.fit()
    except ray.train.ControllerError as e:
        from ray.train.v2._internal.exceptions import (InsufficientClusterResourcesError,
                                                       WorkerGroupStartupTimeoutError)

        if not isinstance(e.controller_failure, (WorkerGroupStartupTimeoutError, InsufficientClusterResourcesError)):
            raise
        raise WorkerGroupStartError(startup_failure(
            s.num_workers, per_worker, ray.available_resources(), ray.cluster_resources(),
            float(os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"]))) from None


_FIT_DONE = "schedtune:fit-done"


class _CheckpointsToTune(ray.train.UserCallback):
    """On the Train controller: each report's metrics (rank 0's) and checkpoint, to the trial's queue."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        self.queue.put((dict(metrics[0]), checkpoint))


def _fit_reporting_checkpoints(trainer, queue) -> None:
    """``trainer.fit()`` on a thread while this one (the trial's) reports what ``_CheckpointsToTune``
    queues, checkpoint included, with ``tune.report`` (which copies it into the trial's directory).
    The queue holds one report: Train waits for Tune to take each, as with TuneReportCallback."""
    from ray import tune

    outcome: dict[str, BaseException] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:   # raised again on the trial's thread
            outcome["error"] = e
        finally:
            queue.put(_FIT_DONE)

    thread = threading.Thread(target=fit, name="schedtune-train-fit", daemon=True)
    thread.start()
    while (item := queue.get()) != _FIT_DONE:
        metrics, checkpoint = item
        tune.report(metrics, checkpoint=checkpoint)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]


def startup_failure(num_workers: int, per_worker: dict[str, float], free: dict[str, float],
                    total: dict[str, float], timeout_s: float) -> str:
    """Why a worker group did not start, in numbers: what it needs at once, what the cluster has free."""
    def fmt(d: dict[str, float]) -> str:
        return ", ".join(f"{v:g} {k}" for k, v in d.items())

    need = {k: v * num_workers for k, v in per_worker.items()}
    missing = {k: v - free.get(k, 0.0) for k, v in need.items() if v > free.get(k, 0.0) + 1e-9}
    return (f"the trial's worker group could not start within {timeout_s:g} s per attempt "
            f"(up to {FAILURE_CONTROLLER_LIMIT + 1} attempts): it needs {num_workers} workers x {fmt(per_worker)} = {fmt(need)} "
            f"at once; the cluster has {fmt({k: free.get(k, 0.0) for k in need})} free of "
            f"{fmt({k: total.get(k, 0.0) for k in need})}"
            + (f", missing {fmt(missing)}" if missing else " now (it was taken while the group waited)")
            + ". Lower scaling.num_workers, cpus_per_worker or gpus_per_worker, run fewer trials at once "
              "(experiment.max_concurrent_trials), add nodes, or raise RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S "
              "for an autoscaling cluster")


def _trial_in_process(cfg: TrainConfig, metric: str, mode: str, system_metrics: Optional[Target] = None) -> None:
    import torch
    from ray import tune

    from tuning.driver import ingest

    def report(metrics: dict, checkpoint: Optional[str]) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint) if checkpoint else None)

    device = torch.device("cuda") if cfg.scaling.use_gpu and torch.cuda.is_available() else None
    data = None
    if ingest.is_streamed(cfg):   # Ray Data's tasks read and decode; this process iterates the datasets whole
        streamed = ingest.build(cfg)
        data = ingest.worker_data(cfg, streamed.facts, streamed.datasets["train"], streamed.datasets["val"], 0, device)
    run_trial_body(cfg, metric, mode, checkpoint=tune.get_checkpoint(), report=report, device=device, run_name="run",
                   system_metrics=system_metrics, data=data)
