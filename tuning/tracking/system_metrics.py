"""System metrics of a trial's nodes in its MLflow child run: each node's CPU utilization and memory,
and the utilization and memory of the trial's GPUs there, sampled every ``interval_s`` (default 10 s,
``$SCHEDTUNE_SYSTEM_METRICS_INTERVAL_S`` on the driver; 0 turns it off) by a thread of one process per
Ray node of the trial: the trial's own process for one worker, else the Train worker of lowest rank
on each node. Never the driver, and never on the training step's path (a thread that sleeps between
samples and sends them itself).

Keys are MLflow's own, so the UI shows them in the run's System metrics tab:
``system/cpu_utilization_percentage``, ``system/system_memory_usage_megabytes`` and ``_percentage``,
``system/gpu_<i>_utilization_percentage``, ``system/gpu_<i>_memory_usage_megabytes`` and ``_percentage``,
``system/gpu_<i>_power_usage_watts`` and ``_percentage`` (``i``: the GPU's index on its node). A
multi-worker trial's node k (in the order of its workers' ranks) writes ``system/node_<k>/...``, so
nodes never overwrite each other, and tags ``schedtune.system_metrics.node_<k>`` with where it is. The
step is seconds since the run started: nodes, and a trial's restarts, line up. CPU and memory are the
whole node's (psutil reads /proc: in a container, the host's); GPUs are those the trial's workers were
given there (``CUDA_VISIBLE_DEVICES``), read through NVML (the ``nvidia-ml-py`` package: without it, none).

mlflow.system_metrics.SystemMetricsMonitor (mlflow 3.17, read in its source) is not used as is: its
thread ends for good at the first failed request (a ``get_run`` before every sample, a ``log_batch``
after), so one blip of the tracking server would end a trial's system metrics for the rest of the
trial; the MLFLOW_SYSTEM_METRICS_* environment variables override its arguments on whichever node
has them set; its first CPU sample is 0 (psutil's ``cpu_percent`` measures since its previous call).
Its collectors are used (``CPUMonitor``, ``GPUMonitor``); the loop, finding the run and the retries
are here. A sample that cannot be sent is kept (up to MAX_BUFFERED) and sent with the next one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

from tuning.tracking import schema

INTERVAL_ENV = "SCHEDTUNE_SYSTEM_METRICS_INTERVAL_S"
DEFAULT_INTERVAL_S = 10.0
FIND_RUN_EVERY_S = 2.0    # the driver makes the trial's run when Tune starts it: the trial may look first
MAX_BUFFERED = 10_000     # metric values kept while MLflow is unreachable (~2 h of one node at 10 s)
STOP_TIMEOUT_S = 10.0     # how long the trial's end waits for the last send (a hung server never holds it)


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a sampler logs: the experiment's MLflow store and parent run (found by its run_dir tag),
    the trial (its child run, by trial id), the node's label (None: one node, plain ``system/`` keys)."""
    tracking_uri: str
    experiment: str
    run_dir: str
    interval_s: float = DEFAULT_INTERVAL_S
    trial_id: Optional[str] = None
    node: Optional[str] = None
    where: str = ""            # the node, for its tag (address, Ray node id)

    def for_trial(self, trial_id: str) -> "Target":
        return dataclasses.replace(self, trial_id=trial_id)

    def on_node(self, node: Optional[str], where: str) -> "Target":
        return dataclasses.replace(self, node=node, where=where)

    @property
    def prefix(self) -> str:
        return "system/" + (f"{self.node}/" if self.node else "")


def target(tracking_uri: str, experiment: str, run_dir: str,
           environ: Mapping[str, str] = os.environ) -> Optional[Target]:
    """The experiment's Target, its interval from ``$SCHEDTUNE_SYSTEM_METRICS_INTERVAL_S`` (seconds,
    default 10; 0: no system metrics, None returned). Read on the driver, so one setting holds for
    every node."""
    text = environ.get(INTERVAL_ENV, "").strip()
    try:
        interval = float(text) if text else DEFAULT_INTERVAL_S
    except ValueError:
        interval = -1.0
    if not (interval >= 0 and interval < float("inf")):
        raise ValueError(f"{INTERVAL_ENV}: got {text!r}, expected seconds between samples (a number >= 0; "
                         f"0 turns system metrics off; default {DEFAULT_INTERVAL_S:g})")
    return Target(tracking_uri, experiment, run_dir, interval) if interval > 0 else None


def node_roles(node_ids: Sequence[str]) -> dict[int, str]:
    """World rank -> node label (``node_<k>``) for the rank that samples each node: the lowest rank
    on it; ``k`` numbers the nodes in the order of their first rank. ``node_ids``: each rank's node."""
    first: dict[str, int] = {}
    for rank, node in enumerate(node_ids):
        first.setdefault(node, rank)
    return {rank: f"node_{k}" for k, rank in enumerate(first.values())}


def visible_gpus(environ: Mapping[str, str] = os.environ) -> Optional[set[int]]:
    """The NVML indices of the GPUs this process was given (``CUDA_VISIBLE_DEVICES`` as Ray sets it:
    integer ids; empty: none); None (all of the node's) when unset or not integer ids (UUIDs, MIG)."""
    text = environ.get("CUDA_VISIBLE_DEVICES")
    if text is None:
        return None
    ids = [p.strip() for p in text.split(",") if p.strip()]
    if not all(p.isdigit() for p in ids):
        return None
    return {int(p) for p in ids}


def only_gpus(metrics: Mapping[str, float], gpus: Optional[set[int]]) -> dict[str, float]:
    """``metrics`` without the ``gpu_<i>_...`` values of GPUs outside ``gpus`` (None: keep all)."""
    def keep(key: str) -> bool:
        if gpus is None or not key.startswith("gpu_"):
            return True
        index = key.split("_", 2)[1]
        return index.isdigit() and int(index) in gpus
    return {k: v for k, v in metrics.items() if keep(k)}


def reachable(uri: str) -> bool:
    """Whether this node can log to ``uri``: a server, or a sqlite/file store that exists here (on
    another machine than the driver's, a local path would make a store of its own, seen by nobody)."""
    for scheme in ("sqlite:///", "file://"):
        if uri.startswith(scheme):
            return Path(uri[len(scheme):]).exists()
    return "://" in uri or Path(uri).exists()


class NodeSampler(threading.Thread):
    """Samples this node every ``target.interval_s`` into the trial's run (see the module docstring)."""

    def __init__(self, target: Target):
        super().__init__(name="schedtune-system-metrics", daemon=True)
        self.target = target
        self.sent = 0                  # metric values in MLflow (read by tests)
        self._stop_event = threading.Event()
        self._buffer: list = []
        self._tags: dict[str, str] = {}   # not sent yet
        self._warned = False

    def stop(self) -> None:
        """End the sampling; the last samples are sent within STOP_TIMEOUT_S or left."""
        self._stop_event.set()
        self.join(STOP_TIMEOUT_S)

    def _warn(self, what: str, e: Exception) -> None:
        if not self._warned:
            first = (str(e).splitlines() or [""])[0][:200]
            print(f"[schedtune] system metrics of trial {self.target.trial_id}: could not {what} at "
                  f"{self.target.tracking_uri} ({type(e).__name__}: {first}); training continues, retrying",
                  file=sys.stderr)
            self._warned = True

    def run(self) -> None:
        import mlflow

        client = mlflow.MlflowClient(self.target.tracking_uri)
        run, last_try = None, False
        while run is None and not last_try:   # until found; once more when the trial ends (its run exists by then)
            last_try = self._stop_event.is_set()
            try:
                run = _trial_run(client, self.target)
            except Exception as e:   # the server is down: the trial goes on, the sampler tries again
                self._warn("find the trial's run", e)
            if run is None and not last_try:
                self._stop_event.wait(min(FIND_RUN_EVERY_S, self.target.interval_s))
        if run is None:
            return
        run_id, started_ms = run
        self._tags[schema.system_metrics_node_tag(self.target.node)] = self.target.where
        self._send(client, run_id)
        collectors, gpus = _collectors(), visible_gpus()
        stopping = False
        while not stopping:   # a sample every interval, and one as the trial ends (a short trial has one)
            stopping = self._stop_event.wait(self.target.interval_s)
            values = {}
            for c in collectors:
                c.collect_metrics()
                values.update(c.aggregate_metrics())
                c.clear_metrics()
            now = int(time.time() * 1000)
            step = max(0, (now - started_ms) // 1000)   # another node's clock may run behind the driver's
            self._buffer += [_metric(self.target.prefix + k, v, now, step) for k, v in only_gpus(values, gpus).items()]
            del self._buffer[:-MAX_BUFFERED]
            self._send(client, run_id)

    def _send(self, client, run_id: str) -> None:
        """What is buffered, 1000 values a call (MLflow's log_batch limit); kept where a call fails."""
        from tuning.tracking.entities import tag

        try:
            while self._buffer or self._tags:
                client.log_batch(run_id, metrics=self._buffer[:1000], tags=[tag(k, v) for k, v in self._tags.items()])
                self.sent += len(self._buffer[:1000])
                del self._buffer[:1000]
                self._tags = {}
        except Exception as e:
            self._warn("send system metrics", e)


def _metric(key: str, value: float, timestamp_ms: int, step: int):
    from tuning.tracking.entities import metric

    return metric(key, value, step=step, timestamp_ms=timestamp_ms)


def _collectors() -> list:
    """MLflow's CPU collector, and its NVIDIA GPU one where NVML answers; psutil's CPU counter primed
    (its first reading is since the previous call)."""
    import psutil
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor

    psutil.cpu_percent()
    out: list = [CPUMonitor()]
    try:
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        out.append(GPUMonitor())
    except Exception:   # no nvidia-ml-py, or no GPU/driver on this node: CPU and memory only
        pass
    return out


def _trial_run(client, t: Target) -> Optional[tuple[str, int]]:
    """(run id, start time in ms) of the trial's child run, or None while there is none yet."""
    exp = client.get_experiment_by_name(t.experiment)
    if exp is None:
        return None
    parents = client.search_runs([exp.experiment_id], filter_string=f"tags.`{schema.RUN_DIR}` = '{t.run_dir}'",
                                 max_results=1)
    if not parents:
        return None
    query = (f"tags.`{schema.PARENT_RUN_ID}` = '{parents[0].info.run_id}' and "
             f"tags.`{schema.TRIAL_ID}` = '{t.trial_id}'")
    runs = client.search_runs([exp.experiment_id], filter_string=query, max_results=1)
    return (runs[0].info.run_id, runs[0].info.start_time) if runs else None


@contextlib.contextmanager
def node_metrics(target: Optional[Target]) -> Iterator[Optional[NodeSampler]]:
    """This node's system metrics sampled into the trial's run while the block runs (nothing for
    None, or where this node cannot reach the store: a note on stderr)."""
    if target is None:
        yield None
        return
    if not reachable(target.tracking_uri):
        print(f"[schedtune] no system metrics from {target.where or 'this node'}: the tracking store "
              f"{target.tracking_uri} is not on this machine (use a tracking server on a cluster)", file=sys.stderr)
        yield None
        return
    sampler = NodeSampler(target)
    sampler.start()
    try:
        yield sampler
    finally:
        sampler.stop()
