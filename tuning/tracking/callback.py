"""MLflow tracking as a Tune callback on the driver.

Layout (what a person sees in the MLflow UI): one MLflow experiment per experiment name; one
parent run per invocation (``--resume`` reuses it); one child run per trial
(``mlflow.parentRunId``) with the trial's flattened TrainConfig as params, per-epoch metrics
(step = epoch), a tag saying how the trial ended, and its best and last checkpoints as
artifacts. Runs are found again by tags (``schedtune.run_dir``, ``schedtune.trial_id``), so a
resumed experiment never duplicates them. Metrics are buffered and sent in batches by a thread of
their own, every ``FLUSH_EVERY_S``: Tune runs callbacks on its event loop, and a function trainable's
``report()`` waits until the driver has run them, so a send on that path would stall every trial
(measured in bench/tracking.py). A tracking server that goes away is retried at the next flush and
never fails a trial.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

from ray.tune import Callback

from tuning.analysis.ranking import best_of
from tuning.analysis.results import end_state, training_metrics
from tuning.spec import ExperimentSpec
from tuning.tracking import schema
from tuning.tracking.backend import experiment_id
from tuning.tracking.entities import metric as _metric, param as _param, tag as _tag
from tuning.tracking.reads import best_metric_key
from tuning.tracking.trial_files import best_and_last, find_checkpoints

FLUSH_EVERY_S = 2.0
FINAL_RETRY_S = 30.0   # at the end, how long a tracking server that is down gets to come back


FAILED = object()  # what MLflowTracker._safe returns when the call raised
TRACE_FILE = "trace.json"   # training.checkpoint.TRACE_FILE (not imported: that module imports torch)


class MLflowTracker(Callback):
    """Logs an experiment to MLflow from the Tune driver (see the module docstring)."""

    def __init__(self, spec: ExperimentSpec, tracking_uri: str, run_dir: str, train_storage: str):
        self.spec, self.uri, self.run_dir, self.train_storage = spec, tracking_uri, run_dir, train_storage
        self._client = None
        self.experiment_id: Optional[str] = None
        self.parent_run_id: Optional[str] = None
        self._children: dict[str, str] = {}
        self._logged_upto: dict[str, int] = {}   # trial -> last epoch already in MLflow (resume)
        self._final: set[str] = set()            # trials whose run ended before an interruption
        self._buffer: dict[str, list] = {}
        self._trials: dict[str, Any] = {}          # trial id -> Tune Trial (to create a run late)
        self._pending_end: dict[str, tuple] = {}   # trial id -> (trial, errored): ended during an outage
        self._last: dict[str, dict] = {}
        self._history: dict[str, list[dict]] = {}  # trial -> per-epoch metrics (learning-curve diagnosis)
        self.diagnoses: dict[str, Any] = {}        # trial -> tuning.analysis.diagnose.Diagnosis, set when it ends
        self._last_flush = 0.0
        self._warned = False
        self.lost: dict[str, int] = {}
        self._lock = threading.Lock()       # guards _buffer: Tune's loop appends, the sender takes
        self._sending = threading.RLock()   # one send at a time (the sender thread, or the driver's flush)
        self._stop = threading.Event()
        self._sender: Optional[threading.Thread] = None
        MLflowTracker._live[run_dir] = self

    # -- what the driver reads
    _live: dict[str, "MLflowTracker"] = {}   # run_dir -> the tracker Tune runs (a restore unpickles a new one)

    @classmethod
    def for_run_dir(cls, run_dir: str) -> Optional["MLflowTracker"]:
        """The tracker of the invocation at ``run_dir`` made last in this process: after
        ``Tuner.restore`` it is the one Tune unpickled with the experiment state, not the one the
        driver built."""
        return cls._live.get(run_dir)

    def run_id(self, trial_id: str) -> Optional[str]:
        """The MLflow run of ``trial_id``: known from this invocation, else found by its tags (a
        trial that finished before an interruption, which a restored tracker may not have seen)."""
        if trial_id not in self._children and self.parent_run_id:
            found = self._safe("find a trial run", self._find_run,
                               {schema.PARENT_RUN_ID: self.parent_run_id, schema.TRIAL_ID: trial_id})
            if found not in (None, FAILED):
                self._children[trial_id] = found
        return self._children.get(trial_id)

    def trial_order(self) -> list[str]:
        """Trial ids in the order their runs were made (start order)."""
        return list(self._children)

    def diagnosis(self, trial_id: str):
        """The tuning.analysis.diagnose.Diagnosis made when the trial ended, or None."""
        return self.diagnoses.get(trial_id)

    def unsent_metrics(self) -> int:
        """Metric values still buffered (not in MLflow)."""
        with self._lock:
            return sum(len(v) for v in self._buffer.values())

    # -- plumbing
    @property
    def client(self):
        if self._client is None:
            import mlflow

            # Fail fast: MLflow's own retries (with backoff) would stall Tune's event loop while
            # the server is down; flush() retries on its own schedule instead.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
            self._client = mlflow.MlflowClient(self.uri)
        return self._client

    def __getstate__(self):  # Tune pickles callbacks with the experiment state
        state = {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_sending", "_stop", "_sender")}
        with self._lock:
            state["_buffer"] = {k: list(v) for k, v in self._buffer.items()}
        return {**state, "_client": None, "_trials": {}, "_pending_end": {}}

    def __setstate__(self, state):  # state pickled before a field existed resumes with its default
        self.__init__(state["spec"], state["uri"], state["run_dir"], state["train_storage"])
        self.__dict__.update(state)

    def _safe(self, what: str, fn, *a, **kw):
        try:
            value = fn(*a, **kw)
        except Exception as e:  # the tracking server is down: training goes on
            if not self._warned:
                print(f"[schedtune] MLflow at {self.uri} failed to {what} ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200]}); training continues, retrying", file=sys.stderr)
                self._warned = True
            return FAILED
        if self._warned:
            print(f"[schedtune] MLflow at {self.uri} is reachable again", file=sys.stderr)
            self._warned = False
        return value

    def _find_run(self, tags: dict[str, str]) -> Optional[str]:
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([self.experiment_id], filter_string=query, max_results=1)
        return runs[0].info.run_id if runs else None

    # -- Tune hooks
    def setup(self, **info):
        name = self.spec.options.name
        self.experiment_id = experiment_id(self.client, self.uri, name)
        self.parent_run_id = self._find_run({schema.RUN_DIR: self.run_dir})
        if self.parent_run_id is None:
            run = self.client.create_run(self.experiment_id, run_name=f"{name}-{Path(self.run_dir).name}", tags={
                schema.RUN_DIR: self.run_dir, schema.ROLE: schema.ROLE_EXPERIMENT,
                schema.SPACE_FILE: self.spec.file, schema.SPACE_SHA256: self.spec.sha256})
            self.parent_run_id = run.info.run_id
            o = self.spec.options
            self.client.log_batch(self.parent_run_id, params=[_param(k, v) for k, v in {
                "search": o.search, "num_samples": o.num_samples, "metric": o.metric, "mode": o.mode,
                "scheduler": o.scheduler.name, "seed": o.seed}.items()])
            self.client.log_text(self.parent_run_id, self.spec.text, schema.SEARCH_SPACE_ARTIFACT)
        self._start_sender()

    def _start_sender(self) -> None:
        if self._sender is None or not self._sender.is_alive():
            self._stop.clear()
            self._sender = threading.Thread(target=self._send_loop, name="schedtune-mlflow", daemon=True)
            self._sender.start()

    def _send_loop(self) -> None:
        while not self._stop.wait(FLUSH_EVERY_S):
            self._send_metrics()

    def _send_metrics(self) -> bool:
        """Send every buffered metric of the trials that have a run; False when MLflow is down
        (what was not sent stays buffered, in order, for the next try)."""
        with self._sending:
            with self._lock:
                trial_ids = list(self._buffer)
            for trial_id in trial_ids:
                run_id = self._children.get(trial_id)
                if run_id is None:
                    continue   # no run yet (it started during an outage): the driver creates it
                with self._lock:
                    metrics = self._buffer.pop(trial_id, [])
                while metrics:  # 1000 per call: MLflow's log_batch limit
                    if self._safe("log metrics", self.client.log_batch, run_id, metrics=metrics[:1000]) is FAILED:
                        with self._lock:
                            self._buffer[trial_id] = metrics + self._buffer.get(trial_id, [])
                        return False
                    del metrics[:1000]
            return True

    def on_trial_start(self, iteration, trials, trial, **info):
        if trial.trial_id in self._children:
            return
        tags = {schema.PARENT_RUN_ID: self.parent_run_id, schema.TRIAL_ID: trial.trial_id}
        run_id = self._safe("find a trial run", self._find_run, tags)
        if run_id is FAILED:
            return
        if run_id is not None:  # resumed: carry on after what the run already has
            self._safe("read a trial run", self._remember_logged, trial.trial_id, run_id)
        else:
            cfg = self.spec.trial_config(trial.config)
            run = self._safe("create a trial run", self.client.create_run, self.experiment_id,
                             run_name=trial.trial_id, tags={**tags, schema.STATUS: schema.STATUS_RUNNING})
            if run is FAILED:
                return
            run_id = run.info.run_id
            self._safe("log params", self.client.log_batch, run_id,
                       params=[_param(k, v) for k, v in cfg.flat().items()])
        self._children[trial.trial_id] = run_id

    def _remember_logged(self, trial_id: str, run_id: str) -> None:
        run = self.client.get_run(run_id)
        history = self.client.get_metric_history(run_id, self.spec.options.metric)
        self._logged_upto[trial_id] = max((m.step for m in history), default=0)
        if run.data.tags.get(schema.STATUS, schema.STATUS_RUNNING) != schema.STATUS_RUNNING:
            self._final.add(trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from mlflow.entities import Metric

        self._last[trial.trial_id] = result
        self._trials[trial.trial_id] = trial
        entry = {**{k: result[k] for k in ("epoch", "diverged_step") if k in result}, **training_metrics(result)}
        self._history[trial.trial_id] = [h for h in self._history.get(trial.trial_id, [])
                                         if h.get("epoch") != entry.get("epoch")] + [entry]
        step, now = int(result.get("epoch", result.get("training_iteration", 0))), int(time.time() * 1000)
        if step <= self._logged_upto.get(trial.trial_id, 0):
            return  # logged before an interruption: never twice
        self._final.discard(trial.trial_id)
        metrics = [Metric(k, v, now, step) for k, v in training_metrics(result).items()]
        with self._lock:
            self._buffer.setdefault(trial.trial_id, []).extend(metrics)
        if self._sender is None and self.parent_run_id:   # restored by --resume: set-up may not have run
            self._start_sender()
        # The sender thread sends it. Only what needs the driver waits here for a flush: a run to
        # create for a trial that started while MLflow was down, trial endings that fell in an outage.
        if ((self._pending_end or trial.trial_id not in self._children)
                and time.monotonic() - self._last_flush >= FLUSH_EVERY_S):
            self.flush()

    def flush(self) -> None:
        """Send everything now, from the driver: late trial runs, metrics, pending trial endings."""
        self._last_flush = time.monotonic()
        with self._sending:
            with self._lock:
                waiting = [t for t, m in self._buffer.items() if m]
            for trial_id in waiting:
                if trial_id not in self._children and trial_id in self._trials:
                    self.on_trial_start(0, [], self._trials[trial_id])  # it started while MLflow was down
            if not self._send_metrics():
                return  # still down: the rest stays buffered for the next flush
            for trial, errored in list(self._pending_end.values()):  # ends that fell in an outage
                if not self._finish_trial(trial, errored):
                    return

    def _end_trial(self, trial, errored: bool) -> None:
        self._trials[trial.trial_id] = trial
        self._pending_end[trial.trial_id] = (trial, errored)
        self.flush()  # sends the trial's metrics, then finishes it (or leaves it pending)

    def _finish_trial(self, trial, errored: bool) -> bool:
        """Tag, upload and close a trial's run; False (still pending) while MLflow is down."""
        if trial.trial_id not in self._children:
            self.on_trial_start(0, [], trial)
        run_id = self._children.get(trial.trial_id)
        if run_id is None or trial.trial_id in self._final or self._buffer.get(trial.trial_id):
            # no run yet / metrics still unsent: retry at the next flush; ended before an interruption: done
            done = trial.trial_id in self._final
            if done:
                self._pending_end.pop(trial.trial_id, None)
            return done
        last = self._last.get(trial.trial_id, {})
        state = end_state(last, errored, self.spec.base.epochs, self.spec.options.scheduler.name)
        tags = {schema.STATUS: state, schema.END_EPOCH: str(int(last.get("epoch", 0)))}
        if last.get("diverged"):
            tags.update({schema.DIVERGED_STEP: str(int(last["diverged_step"])),
                         schema.DIVERGED_LR: f"{last['diverged_lr']:.6g}"})
        if errored and getattr(trial, "error_file", None):
            tags[schema.ERROR_FILE] = str(trial.error_file)
        last_ckpt = self._safe("log checkpoints", self._log_checkpoints, trial, run_id)
        if last_ckpt is FAILED:
            return False
        diagnosis = self._safe("diagnose a trial", self._diagnose, trial.trial_id, run_id, last_ckpt)
        tags.update({} if diagnosis is FAILED else diagnosis)
        # The status tag goes last: once a run has it, its checkpoints are in (resume relies on it).
        o = self.spec.options
        score = best_of((h.get(o.metric) for h in self._history.get(trial.trial_id, [])), o.mode)
        best = [] if score is None else [_metric(best_metric_key(o.metric), score)]   # what `runs` ranks by
        if self._safe("tag a trial", self.client.log_batch, run_id, metrics=best,
                      tags=[_tag(k, v) for k, v in tags.items()]) is FAILED:
            return False
        if self._safe("end a trial run", self.client.set_terminated, run_id,
                      "FAILED" if errored else "FINISHED") is FAILED:
            return False
        self._pending_end.pop(trial.trial_id, None)
        return True

    def _log_checkpoints(self, trial, run_id: str) -> tuple[dict, dict]:
        """Log the best and last checkpoints; return the last one's (trace, meta), {} where none."""
        import pyarrow.fs as pafs

        found = find_checkpoints(trial.path) + find_checkpoints(f"{self.train_storage}/train-{trial.trial_id}")
        best, last = best_and_last(found, self.spec.options.metric, self.spec.options.mode)
        trace: dict = {}
        for label, ckpt in (("best", best), ("last", last)):
            if ckpt is None:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                pafs.copy_files(ckpt[0], tmp)
                if label == "last" and (Path(tmp) / TRACE_FILE).exists():
                    trace = json.loads((Path(tmp) / TRACE_FILE).read_text())
                self.client.log_artifacts(run_id, tmp, f"{schema.CHECKPOINTS_DIR}/{label}")
            self.client.set_tag(run_id, schema.checkpoint_epoch_tag(label), str(ckpt[1]["epoch"]))
        return trace, (last[1] if last else {})

    def _diagnose(self, trial_id: str, run_id: str, last_ckpt: tuple[dict, dict]) -> dict[str, str]:
        """Diagnose the trial's learning curves (returned as tags) and log its plots under plots/."""
        from tuning.analysis.diagnose import diagnose

        trace, meta = last_ckpt
        history = self._history.get(trial_id, [])
        if not history:   # failed before its first report: nothing to read
            return {}
        d = diagnose(history, step_losses=trace.get("loss"), num_classes=meta.get("num_classes"))
        self.diagnoses[trial_id] = d
        self._safe("log plots", self._log_plots, run_id, history, trace)
        return {schema.DIAGNOSIS: d.kind, schema.DIAGNOSIS_EVIDENCE: d.evidence_json()}

    def _log_plots(self, run_id: str, history: list[dict], trace: dict) -> None:
        from tuning.analysis.plots import run_plots

        with tempfile.TemporaryDirectory() as tmp:
            if run_plots(tmp, history, trace):
                self.client.log_artifacts(run_id, tmp, schema.PLOTS_DIR)

    def log_experiment_plots(self, rows: list) -> None:
        """Metric against each sampled hyperparameter and the best-so-far curve (trials in start
        order) as PNGs under plots/ on the parent run. ``rows``: tuning.driver.experiment.TrialRow."""
        from tuning.analysis.plots import experiment_plots

        order = {t: i for i, t in enumerate(self.trial_order())}
        rows = sorted(rows, key=lambda r: order.get(r.trial_id, len(order)))
        o = self.spec.options

        def log():
            with tempfile.TemporaryDirectory() as tmp:
                experiment_plots(tmp, [self.spec.decode(r.params) for r in rows], [r.metric for r in rows],
                                 self.spec.space, o.metric, o.mode)
                self.client.log_artifacts(self.parent_run_id, tmp, schema.PLOTS_DIR)
        self._safe("log experiment plots", log)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end_trial(trial, errored=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end_trial(trial, errored=True)

    def finish(self, table_md: str, best: Optional[dict], model_version: Optional[str]) -> None:
        """Close the parent run: results table, best trial, registered model. A server that is
        down gets ``FINAL_RETRY_S`` to come back before anything is reported lost."""
        deadline = time.monotonic() + FINAL_RETRY_S
        self._stop.set()
        if self._sender is not None:
            self._sender.join()
        self.flush()
        while (self._pending_end or any(self._buffer.values())) and time.monotonic() < deadline:
            time.sleep(2.0)
            self.flush()
        pending = self.unsent_metrics()
        if pending or self._pending_end:
            print(f"[schedtune] MLflow at {self.uri}: {pending} metric values and {len(self._pending_end)} "
                  f"trial endings could not be sent", file=sys.stderr)
            self._safe("tag lost metrics", self.client.set_tag, self.parent_run_id,
                       schema.LOST_METRICS, str(pending))
        self._safe("log the results table", self.client.log_text, self.parent_run_id, table_md, schema.RESULTS_ARTIFACT)
        if best:
            self._safe("tag the best trial", self.client.log_batch, self.parent_run_id, tags=[
                _tag(schema.BEST_TRIAL_ID, best["trial_id"]), _tag(schema.BEST_RUN_ID, best["run_id"])],
                metrics=[_metric(best_metric_key(self.spec.options.metric), best["metric"])])
        if model_version:
            self._safe("tag the model", self.client.set_tag, self.parent_run_id, schema.MODEL_VERSION, model_version)
        self._safe("end the experiment run", self.client.set_terminated, self.parent_run_id, "FINISHED")

