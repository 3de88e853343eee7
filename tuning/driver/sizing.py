"""How many trials a cluster can run at once without starving a Train worker group, and the
resources each trial asks Tune for (``max_concurrent_trials: auto``)."""
from __future__ import annotations

import itertools
import math
from typing import Callable, Optional

from training.config import TrainConfig
from tuning.spec import ExperimentSpec

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


def trial_resources(spec: ExperimentSpec) -> Callable[[dict], dict]:
    def resources(config: dict) -> dict:
        s = spec.trial_config(config).scaling
        if s.num_workers == 1:
            return {"cpu": s.cpus_per_worker, "gpu": s.gpus_per_worker if s.use_gpu else 0}
        return {"cpu": TRIAL_DRIVER_CPU}
    return resources
