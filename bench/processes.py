"""The processes a benchmark runs and measures: a child Python process, a Ray cluster (a private
one, or a running one with ``--address``), a sampler of a process tree's memory and CPU, this
process's own memory, and a pool of single-threaded worker processes for many small runs."""
from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from common import ROOT, psutil_module


def run_child(argv: list[str], timeout_s: float = 600.0, env: Optional[dict[str, str]] = None) -> dict:
    """Run ``python argv...`` in a fresh process; its last stdout line is JSON (returned)."""
    import json

    cmd = [sys.executable, *argv]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT,
                       env={**os.environ, **(env or {})})
    if p.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited with {p.returncode}:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def address_option(p: argparse.ArgumentParser) -> None:
    """``--address HOST:PORT``: run on that running Ray cluster instead of a private one (the
    default); it must have the CPUs the script asks for free, and this process's RAY_AUTH_MODE
    (and token) must be the cluster's."""
    p.add_argument("--address", help="a running Ray cluster's GCS address (default: start a private local cluster)")


@dataclass
class AttachedCluster:
    """A running cluster this process did not start (``--address``): never stopped here."""
    address: str


@contextlib.contextmanager
def ray_cluster(num_cpus: int, connect: bool = True, env: Optional[dict[str, str]] = None,
                address: Optional[str] = None) -> Iterator[Any]:
    """A private ``tuning.driver.cluster.LocalCluster`` (auth off: it is private to this process),
    connected to when ``connect``; stopped by PID afterwards. With ``address`` (``--address``):
    that running cluster instead, as an ``AttachedCluster``, left running; this connection's Ray
    workers get bench/ on their PYTHONPATH through its runtime environment (``env`` is the private
    cluster's only)."""
    # Ray workers import this directory's modules (functions of the scripts pickled by reference).
    path = os.pathsep.join(p for p in (str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")) if p)
    own = None
    if address is None:
        os.environ["RAY_AUTH_MODE"] = "disabled"
        from tuning.driver.cluster import LocalCluster

        own = LocalCluster(num_cpus=num_cpus, env={"RAY_AUTH_MODE": "disabled", "PYTHONPATH": path, **(env or {})})
        own.start()
    cluster = own if own is not None else AttachedCluster(address)
    try:
        if connect:
            import ray

            runtime_env = None if own is not None else {"env_vars": {"PYTHONPATH": path}}
            ray.init(address=cluster.address, runtime_env=runtime_env, log_to_driver=False, logging_level="ERROR")
        yield cluster
    finally:
        if connect:
            import ray

            ray.shutdown()
        if own is not None:
            own.stop()


class TreeSampler(threading.Thread):
    """Samples, every ``interval_s``, the descendants of ``root_pid`` (a Ray cluster's processes):

    - memory: the RSS and PSS of those whose command line starts with one of ``roles`` (e.g.
      "ray::ImplicitFunc"); keeps the peak of their sum and of each role's sum. PSS splits shared
      pages (the torch libraries every process maps) between the processes sharing them, so summed
      PSS does not count them twice;
    - CPU: the cumulative CPU seconds of the others (the cluster's own processes: raylet, GCS,
      dashboard, agents) plus this process (the Tune driver), as (wall clock, seconds) samples:
      ``background_cores(t0, t1)`` is how many cores they used between two moments.
    """

    def __init__(self, root_pid: int, roles: Sequence[str], interval_s: float = 0.3):
        super().__init__(daemon=True)
        self.root_pid, self.roles, self.interval_s = root_pid, tuple(roles), interval_s
        self.peak_rss = self.peak_pss = 0
        self.peak_by_role: dict[str, dict[str, int]] = {}
        self.max_count: dict[str, int] = {}
        self.names: set[str] = set()       # every ray:: command line seen (to check the roles)
        self.background: list[tuple[float, float]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        psutil = psutil_module()
        try:
            root, me = psutil.Process(self.root_pid), psutil.Process()
        except psutil.NoSuchProcess:
            return
        while not self._stop_event.is_set():
            try:
                children = root.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            rss = pss = 0
            cpu = sum(me.cpu_times()[:2]) + sum(root.cpu_times()[:2])
            by_role: dict[str, list[int]] = {}
            for p in children:
                try:
                    cmd = " ".join(p.cmdline())
                    if cmd.startswith("ray::"):
                        self.names.add(cmd.split(" ")[0])
                    role = next((r for r in self.roles if cmd.startswith(r)), None)
                    if role is None:
                        if not cmd.startswith("ray::IDLE"):
                            cpu += sum(p.cpu_times()[:2])
                        continue
                    mem = p.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                rss, pss = rss + mem.rss, pss + getattr(mem, "pss", mem.rss)
                r = by_role.setdefault(role, [0, 0, 0])
                r[0], r[1], r[2] = r[0] + mem.rss, r[1] + getattr(mem, "pss", mem.rss), r[2] + 1
            self.background.append((time.time(), cpu))
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            for role, (r_rss, r_pss, n) in by_role.items():
                peak = self.peak_by_role.setdefault(role, {"rss": 0, "pss": 0})
                peak["rss"], peak["pss"] = max(peak["rss"], r_rss), max(peak["pss"], r_pss)
                self.max_count[role] = max(self.max_count.get(role, 0), n)
            self._stop_event.wait(self.interval_s)

    def stop(self) -> "TreeSampler":
        self._stop_event.set()
        self.join(timeout=10)
        return self

    def background_cores(self, t0: float, t1: float) -> Optional[float]:
        """Cores used by the cluster's own processes and the driver between wall-clock t0 and t1
        (the samples nearest inside the window); None if the window holds fewer than 2 samples."""
        inside = [(t, c) for t, c in self.background if t0 <= t <= t1]
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return None
        (ta, ca), (tb, cb) = inside[0], inside[-1]
        return max(0.0, cb - ca) / (tb - ta)


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM) in MB. Not ru_maxrss: on Linux that keeps the high-water
    mark of the process before exec, so a child of a big parent would report the parent's."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def self_memory() -> dict[str, float]:
    """This process's peak RSS and its current RSS and PSS, in MB."""
    mem = psutil_module().Process().memory_full_info()
    return {"peak_rss_mb": peak_rss_mb(), "rss_mb": mem.rss / 2**20, "pss_mb": getattr(mem, "pss", mem.rss) / 2**20}


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def map_single_threaded(fn: Callable[[Any], Any], jobs: Sequence[Any], processes: int, every_s: float = 30.0,
                        out: Callable[[str], None] = print) -> list[Any]:
    """``[fn(j) for j in jobs]`` on ``processes`` spawned processes, one torch thread each (in this
    process where ``processes`` <= 1), in order; a progress line every ``every_s`` seconds (runs done,
    elapsed, an estimate of what is left) and one at the end. ``fn`` must be importable (a module's
    top-level function)."""
    import multiprocessing as mp

    t0, last, results = time.monotonic(), time.monotonic(), [None] * len(jobs)

    def tell(done: int, force: bool = False) -> None:
        nonlocal last
        now = time.monotonic()
        if force or now - last >= every_s:
            left = (now - t0) / done * (len(jobs) - done) if done else float("nan")
            out(f"{done}/{len(jobs)} runs done, {now - t0:.0f} s elapsed, ~{left:.0f} s left")
            last = now

    if processes <= 1 or len(jobs) == 1:
        _one_thread()
        for i, job in enumerate(jobs):
            results[i] = fn(job)
            tell(i + 1, i + 1 == len(jobs))
        return results
    with mp.get_context("spawn").Pool(processes, initializer=_one_thread) as pool:
        for done, (i, r) in enumerate(pool.imap_unordered(_indexed, [(fn, i, j) for i, j in enumerate(jobs)]), 1):
            results[i] = r
            tell(done, done == len(jobs))
    return results


def _indexed(item: tuple[Callable[[Any], Any], int, Any]) -> tuple[int, Any]:
    fn, i, job = item
    return i, fn(job)
