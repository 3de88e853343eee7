"""The cost of MLflow logging per epoch, against a local sqlite store and a local `mlflow server`.

Part 1 (no Ray): tuning.tracking.callback.MLflowTracker driven directly with the metrics one epoch of the
quickstart reports (from a real fit() epoch): the time on_trial_result takes on Tune's loop (it only
buffers), the time the tracker's sender thread takes to send one epoch alone (what a >=
FLUSH_EVERY_S epoch costs it) and to send the epochs that pile up in FLUSH_EVERY_S when epochs are
short (the quickstart's digits epoch). Each as a fraction of an epoch: the quickstart's measured
epoch and a 10 s (GPU-sized) epoch.

Part 2 (Ray): what is on the trial's critical path? The tracker runs in the Tune driver, but a
function trainable's report() waits until the driver has processed the previous result
(callbacks included) and asks for the next one. The same 1-worker quickstart trial (the shipped
tuning.driver.trial.trial_fn) is run without a tracker and with the tracker against each backend, sending
at the shipped cadence and every 50 ms (about every epoch); the trial's epoch period (time between
consecutive results reaching the driver) and how long its report() blocked are compared.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

from common import ROOT, Report, median, parse_args, pick
from processes import address_option, ray_cluster
from ray_trials import run_trial

NAME = "tracking"
GOAL_FRACTION = 0.01
GPU_EPOCH_S = 10.0
EVERY_EPOCH_S = 0.05   # the "about every epoch" sender cadence of part 2 (the quickstart's period is ~50 ms)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, help="logged epochs per measurement")
    p.add_argument("--backends", nargs="+", choices=["sqlite", "server"], default=["sqlite", "server"])
    p.add_argument("--skip-ray", action="store_true", help="part 1 only")
    address_option(p)


def quickstart_spec(epochs: int):
    """The shipped quickstart with 1-worker trials (fit runs in the trial process)."""
    from tuning.spec import load_spec

    return load_spec(ROOT / "search_spaces" / "quickstart.yaml", {
        "experiment.name": "bench-tracking", "experiment.num_samples": 1, "train.epochs": epochs,
        "train.scaling.num_workers": 1, "train.scaling.cpus_per_worker": 1.0})


def one_epoch_metrics(spec) -> tuple[dict[str, float], float]:
    """The metrics dict fit reports for an epoch of the quickstart, and its epoch time (the
    second epoch's: the first pays for warm-up)."""
    import torch

    from training.loop import fit

    torch.set_num_threads(1)
    hist = fit(spec.base.with_updates({"epochs": 3})).history
    return dict(hist[-1]), median([h["epoch_time_s"] for h in hist[1:]])


@contextlib.contextmanager
def mlflow_server(root: Path) -> Iterator[str]:
    """A real `mlflow server` (sqlite backend, local artifacts) in its own process group."""
    from tuning.driver.cluster import free_ports

    port = free_ports(1)[0]
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{root}/server.db", "--serve-artifacts",
                             "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("mlflow server did not answer /health within 180 s")
            time.sleep(0.5)
        yield uri
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()


# ----------------------------------------------------------------------------- part 1

def tune_result(metrics: dict[str, float], epoch: int) -> dict[str, Any]:
    """What Tune hands on_trial_result: the trial's metrics plus Tune's own keys."""
    return {**metrics, "epoch": epoch, "training_iteration": epoch, "time_this_iter_s": metrics["epoch_time_s"],
            "time_total_s": epoch * metrics["epoch_time_s"], "timestamp": int(time.time()), "pid": os.getpid(),
            "done": False, "trial_id": "bench"}


def direct(spec, uri: str, work: Path, metrics: dict[str, float], epochs: int, per_flush: int) -> dict[str, Any]:
    """MLflowTracker without Tune: set-up, a trial's start, results buffered on the caller's thread,
    sends of one epoch and of per_flush epochs (the sender thread's work, timed here inline)."""
    import tuning.tracking.callback as tracking

    tracker = tracking.MLflowTracker(spec, uri, str(work / f"run-{abs(hash(uri))}"), str(work / "train"))
    t = time.perf_counter()
    tracker.setup()
    setup_s = time.perf_counter() - t
    tracker._stop.set()    # its sender thread: this function does the sending, to time it
    tracker._sender.join()
    trial = SimpleNamespace(trial_id="bench0001", config={}, path=str(work / "trial"), error_file=None)
    t = time.perf_counter()
    tracker.on_trial_start(0, [], trial)
    start_s = time.perf_counter() - t
    each, buffered, flushes = [], [], []
    for e in range(1, epochs + 1):           # epochs >= FLUSH_EVERY_S: every send carries one epoch
        tracker.on_trial_result(0, [], trial, tune_result(metrics, e))
        t = time.perf_counter()
        tracker._send_metrics()
        each.append(time.perf_counter() - t)
    e0 = epochs
    for _ in range(max(3, epochs // per_flush)):   # short epochs: per_flush of them, then one send
        for e in range(e0 + 1, e0 + per_flush + 1):
            t = time.perf_counter()
            tracker.on_trial_result(0, [], trial, tune_result(metrics, e))
            buffered.append(time.perf_counter() - t)
        e0 += per_flush
        t = time.perf_counter()
        tracker._send_metrics()
        flushes.append(time.perf_counter() - t)
    if tracker.lost or any(tracker._buffer.values()):
        raise RuntimeError(f"metrics were not sent to {uri}")
    each.sort()
    return {"setup_s": setup_s, "trial_start_s": start_s, "epoch_ms": 1000 * median(each),
            "epoch_p90_ms": 1000 * each[int(0.9 * (len(each) - 1))], "buffer_ms": 1000 * median(buffered),
            "flush_ms": 1000 * median(flushes), "metrics_per_epoch": len(tracking.training_metrics(tune_result(metrics, 1)))}


# ----------------------------------------------------------------------------- part 2

def trial_period(spec, work: Path, uri: str | None, flush_every_s: float, label: str) -> dict[str, float]:
    """One shipped 1-worker trial, with or without the tracker: the epoch period (between
    results at the driver; median), how long the trial's report() blocked and the driver's time
    in the tracker's on_trial_result (means), in ms, over the epochs after the first. The sender
    thread sends every ``flush_every_s``."""
    import tuning.tracking.callback as tracking

    in_tracker: list[float] = []

    class TimedTracker(tracking.MLflowTracker):
        def on_trial_result(self, *a, **kw):
            t = time.perf_counter()
            super().on_trial_result(*a, **kw)
            in_tracker.append(1000 * (time.perf_counter() - t))

    callbacks = [TimedTracker(spec, uri, str(work / f"run-{label}"), str(work / "train"))] if uri else []
    saved, tracking.FLUSH_EVERY_S = tracking.FLUSH_EVERY_S, flush_every_s
    try:
        run = run_trial(spec, work, label, callbacks=callbacks)
    finally:
        tracking.FLUSH_EVERY_S = saved
    ends = [t for t, _ in run.arrivals]
    gaps = [b - a for a, b in zip(ends, ends[1:])][1:]   # the first gap includes warm-up
    blocked = run.results("bench_report_ms")   # [i]: how long the report() of result i - 1 blocked
    waits = [w for w in blocked[2:] if math.isfinite(w)]
    out = {"period_ms": 1000 * median(gaps), "report_ms": sum(waits) / len(waits), "tracker_ms": 0.0,
           "tracker_max_ms": 0.0}
    if in_tracker:
        tracked = in_tracker[1:]
        out.update(tracker_ms=sum(tracked) / len(tracked), tracker_max_ms=max(tracked))
    return out


def critical_path(args: argparse.Namespace, spec, work: Path, uris: dict[str, str]) -> dict[str, list[dict]]:
    """Part 2: the same trial without a tracker and with one per backend, flushing at the shipped
    cadence and about every epoch, in rounds A B C .. then .. C B A (drift on a busy machine averages out)."""
    import tuning.tracking.callback as tracking

    every = tracking.FLUSH_EVERY_S
    periods: dict[str, list[dict]] = {}
    with ray_cluster(num_cpus=2, address=args.address):
        if args.mode != "smoke":
            trial_period(spec, work, None, every, "warm-up")   # not counted
        variants = [("no tracker", None, every)]
        for name, uri in uris.items():
            variants += [(f"{name}, flush every {every:g} s", uri, every),
                         (f"{name}, flush every {EVERY_EPOCH_S:g} s", uri, EVERY_EPOCH_S)]
        for r in range(pick(args, 2, 1, 1)):
            for label, uri, flush_s in (variants if r % 2 == 0 else variants[::-1]):
                p = trial_period(spec, work, uri, flush_s, f"{label}-{r}".replace(" ", "_").replace(",", ""))
                periods.setdefault(label, []).append(p)
                print(f"trial with {label}: {p['period_ms']:.1f} ms per epoch, report() blocked "
                      f"{p['report_ms']:.1f} ms, tracker {p['tracker_ms']:.1f} ms", flush=True)
    return periods


def report_critical_path(rep: Report, periods: dict[str, list[dict]], values: dict[str, Any]) -> None:
    def avg(xs):
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else None

    mean = {k: {f: avg([p[f] for p in ps]) for f in ps[0]} for k, ps in periods.items()}
    rep.section("On the trial's critical path? (Tune trial of the quickstart, the shipped trial_fn)",
                "The tracker runs in the Tune driver, but a function trainable's report() returns only when the "
                "driver asks for the next result, after it has run every callback on this one. So the driver's "
                "time in on_trial_result shows up as time the trial's report() blocks; the sender thread's does not, "
                "except through the driver's CPU and GIL.")
    base = mean["no tracker"]["period_ms"]
    rep.table(["tracker", "epoch period ms (median)", "x no tracker", "report() blocked ms (mean)",
               "driver in tracker ms (mean)", "driver in tracker ms (max)", "tracker / epoch period"],
              [[k, v["period_ms"], v["period_ms"] / base, v["report_ms"], v["tracker_ms"], v["tracker_max_ms"],
                v["tracker_ms"] / v["period_ms"]] for k, v in mean.items()],
              f"Over a trial's epochs after the first; {len(periods['no tracker'])} trial(s) per row (averaged).")
    for k, v in mean.items():
        if k != "no tracker":
            key = k.replace(", flush every ", "_every_").replace(" s", "s").replace(".", "_")
            values[f"trial_tracker_ms_{key}"] = v["tracker_ms"]
            values[f"trial_tracker_fraction_{key}"] = v["tracker_ms"] / v["period_ms"]
            values[f"trial_period_ratio_{key}"] = v["period_ms"] / base
    values["trial_period_ms"] = mean["no tracker"]["period_ms"]


# ----------------------------------------------------------------------------- main

def main() -> None:
    args = parse_args(__doc__.splitlines()[0], configure)
    rep = Report(NAME, args, "MLflow logging cost per epoch")
    epochs = args.epochs or pick(args, 200, 40, 4)
    spec = quickstart_spec(pick(args, 300, 120, 3))
    import tuning.tracking.callback as tracking

    metrics, epoch_s = one_epoch_metrics(spec)
    per_flush = max(1, round(tracking.FLUSH_EVERY_S / epoch_s))
    rep.note(f"The quickstart's epoch (digits, MLP [128], batch 32, one thread): {1000 * epoch_s:.0f} ms; at "
             f"FLUSH_EVERY_S = {tracking.FLUSH_EVERY_S:g} s a flush carries {per_flush} such epochs. "
             f"{epochs} epochs logged per measurement.")
    direct_rows, values, periods = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-tracking-") as tmp:
        work = Path(tmp)
        server = mlflow_server(work) if "server" in args.backends else contextlib.nullcontext()
        with server as server_uri:
            uris = {}
            if "sqlite" in args.backends:
                uris["sqlite"] = f"sqlite:///{work}/direct.db"
            if server_uri:
                uris["server"] = server_uri
            for name, uri in uris.items():
                d = direct(spec, uri, work, metrics, epochs, per_flush)
                sender_short = d["flush_ms"] / per_flush   # the sender's share per short epoch
                direct_rows.append([name, d["metrics_per_epoch"], d["setup_s"], d["trial_start_s"], d["buffer_ms"],
                                    d["buffer_ms"] / (1000 * epoch_s), d["buffer_ms"] / (1000 * GPU_EPOCH_S),
                                    d["epoch_ms"], d["epoch_p90_ms"], d["flush_ms"], sender_short,
                                    sender_short / (1000 * epoch_s), d["epoch_ms"] / (1000 * GPU_EPOCH_S)])
                values.update({f"{name}_on_result_ms": d["buffer_ms"], f"{name}_send_one_epoch_ms": d["epoch_ms"],
                               f"{name}_send_batch_ms": d["flush_ms"],
                               f"{name}_fraction_quickstart": d["buffer_ms"] / (1000 * epoch_s),
                               f"{name}_fraction_10s": d["buffer_ms"] / (1000 * GPU_EPOCH_S),
                               f"{name}_sender_fraction_quickstart": sender_short / (1000 * epoch_s),
                               f"{name}_sender_fraction_10s": d["epoch_ms"] / (1000 * GPU_EPOCH_S)})
                print(f"{name}: on_trial_result {d['buffer_ms']:.3f} ms; sender {d['epoch_ms']:.1f} ms per epoch sent "
                      f"alone, {d['flush_ms']:.1f} ms per {per_flush}-epoch send", flush=True)
            if not args.skip_ray:
                periods = critical_path(args, spec, work, uris)
    rep.section("Logging one trial's epochs, no Ray (MLflowTracker against each backend)")
    rep.table(["backend", "metrics/epoch", "set-up s", "trial start s", "on_trial_result ms (Tune's loop)",
               f"x quickstart epoch ({1000 * epoch_s:.0f} ms)", f"x {GPU_EPOCH_S:g} s epoch",
               "sender: one epoch alone ms", "p90 ms", f"sender: {per_flush} epochs ms", "sender per short epoch ms",
               "sender x quickstart epoch", f"sender x {GPU_EPOCH_S:g} s epoch"], direct_rows,
              "set-up: experiment + parent run (once per experiment); trial start: child run + params (once per "
              "trial); on_trial_result: what Tune's loop (and so the trial's report()) waits for per result; the "
              "sender thread's time is off that path but uses the driver's CPU.")
    if periods:
        report_critical_path(rep, periods, values)
    rows = []
    for suffix, what in (("_fraction_10s", f"a {GPU_EPOCH_S:g} s epoch"),
                         ("_fraction_quickstart", f"the quickstart's {1000 * epoch_s:.0f} ms epoch")):
        worst = max((v for k, v in values.items() if k.endswith(suffix) and "sender" not in k
                     and k.split("_")[0] in ("sqlite", "server")), default=math.nan)
        met = worst < GOAL_FRACTION
        values[f"goal{suffix}"] = met
        rows.append([f"logging < {GOAL_FRACTION:.0%} of {what}", worst, met])
    rep.section("Goal")
    rep.table(["goal", "worst backend's fraction", "met"], rows,
              "Logging on the trial's path: the driver's on_trial_result per result (Tune waits for it). "
              "The sender thread's share of the driver's CPU is in the first table.")
    rep.finish({"quickstart_epoch_ms": 1000 * epoch_s, "epochs_per_flush": per_flush, **values})


if __name__ == "__main__":
    main()
