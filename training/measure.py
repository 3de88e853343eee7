"""What an epoch's step loop costs, measured on the host without adding a device sync:

- ``data_wait_fraction``: the time the step loop waited for its next batch (``next()`` on the
  loader, worker start-up included) over the step loop's time (from asking for the first batch to
  the epoch's last step having run on the device). Near 1 the worker is input bound.
- ``samples_per_s``: samples over the step loop's time, per worker (the mean over workers);
  ``samples_per_s_total``: summed over the workers.
- ``step_time_s``: the mean time of an optimizer step, data wait excluded (forward, backward and
  update of its micro-batches), so that ``step_time_s * steps + wait = step loop time``.
- ``peak_memory_mb``: on a GPU the epoch's peak of memory held by tensors
  (``torch.cuda.max_memory_allocated``, reset every epoch); on CPU the process's peak resident set
  size so far (``getrusage``'s ``ru_maxrss``, which cannot be reset, and leaves out loader worker
  processes). The maximum over workers.
"""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

import torch

T = TypeVar("T")


class DataWait(Iterator[T]):
    """Iterates ``items``, adding the host time each ``next()`` takes (and ``iter()``'s: a loader
    may start its worker processes there) to ``seconds``."""

    def __init__(self, items: Iterable[T]):
        t = time.perf_counter()
        self._it = iter(items)
        self.seconds = time.perf_counter() - t

    def __next__(self) -> T:
        t = time.perf_counter()
        try:
            return next(self._it)
        finally:
            self.seconds += time.perf_counter() - t


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """See the module docstring: accelerator memory on a GPU, the process's peak RSS elsewhere (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10   # bytes on macOS, KiB on Linux


def worker_figures(samples: float, steps: int, loop_s: float, wait_s: float) -> list[float]:
    """This worker's [samples/s, data-wait fraction, step time], to be summed over the workers
    (``epoch_figures`` turns the sums into the reported metrics)."""
    loop_s = max(loop_s, 1e-9)
    return [samples / loop_s, wait_s / loop_s, (loop_s - wait_s) / max(steps, 1)]


def epoch_figures(summed: list[float], world: int, peak_mb: float) -> dict[str, float]:
    """The reported figures from ``worker_figures`` summed over ``world`` workers and the largest
    ``peak_memory_mb`` among them."""
    rate, wait, step = summed
    return {"samples_per_s": rate / world, "samples_per_s_total": rate, "data_wait_fraction": wait / world,
            "step_time_s": step / world, "peak_memory_mb": peak_mb}
