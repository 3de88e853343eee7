"""MLflow tracking as a Tune callback on the driver.

Layout (what a person sees in the MLflow UI): one MLflow experiment per experiment name; one
parent run per invocation (``--resume`` reuses it); one child run per trial
(``mlflow.parentRunId``) with the trial's flattened TrainConfig as params, per-epoch metrics
(step = epoch), a tag saying how the trial ended, and its best and last checkpoints as
artifacts. Runs are found again by tags (``schedtune.run_dir``, ``schedtune.trial_id``), so a
resumed experiment never duplicates them. Metrics are buffered and sent in batches by a thread of
their own, every ``FLUSH_EVERY_S``: Tune runs callbacks on its event loop, and a function trainable's
``report()`` waits until the driver has run them, so a send on that path would stall every trial
(measured in bench/tracking.py); the same thread makes the trials' runs (a trial's run appears at
the first flush after its start) and ends them (uploads, plots, tags), so neither a slow tracking
server nor an upload that takes minutes holds Tune up (bench/scale.py). Once a trial's run has
ended, the tracker keeps only what the driver reads at the end (its run id, diagnosis, lost files,
tags), so its memory does not grow with the trials that have finished. A tracking server that goes
away is retried at the next flush and never fails a trial. Uploads have a timeout and retries of
their own; files that still do not get in are counted (``schedtune.lost_artifacts``) and said
(tuning.tracking.uploads).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from collections import Counter
from typing import Any, Optional

from ray.tune import Callback

from tuning.analysis.results import training_metrics, trial_error_line
from tuning.spec import ExperimentSpec
from tuning.tracking import schema
from tuning.tracking.backend import experiment_id
from tuning.tracking.entities import metric as _metric, param as _param, tag as _tag
from tuning.tracking.reads import best_metric_key
from tuning.tracking.run_files import (best_metric, create_parent_run, diagnose_and_plot, end_tags, log_checkpoints,
                                      log_experiment_plots, log_text, open_trial_runs)
from tuning.tracking.trial_files import find_checkpoints
from tuning.tracking.uploads import Uploader

FLUSH_EVERY_S = 2.0
FINAL_RETRY_S = 30.0   # at the end, how long a tracking server that is down gets to come back

FAILED = object()  # what MLflowTracker._safe returns when the call raised
PARENT = ""        # MLflowTracker.lost_artifacts' key for the parent run's own files
_ENDED = ("TERMINATED", "ERROR")   # Tune's Trial.status of a trial that will report nothing more
_THREAD_STATE = ("_lock", "_sending", "_starting", "_stop", "_wake", "_sender", "_uploader")


class MLflowTracker(Callback):
    """Logs an experiment to MLflow from the Tune driver (see the module docstring)."""

    def __init__(self, spec: ExperimentSpec, tracking_uri: str, run_dir: str, train_storage: str):
        self.spec, self.uri, self.run_dir, self.train_storage = spec, tracking_uri, run_dir, train_storage
        self._client = self._uploader = None    # made on first use (Tune pickles this object)
        self.experiment_id: Optional[str] = None
        self.parent_run_id: Optional[str] = None
        self._children: dict[str, str] = {}
        self._logged_upto: dict[str, int] = {}   # trial -> last epoch already in MLflow (resume)
        self._final: set[str] = set()            # trials whose run ended before an interruption
        self._buffer: dict[str, list] = {}
        self._trials: dict[str, Any] = {}          # trial id -> Tune Trial, started and not yet ended in MLflow
        self._pending_end: dict[str, tuple] = {}   # trial id -> (trial, errored): ended, its run not yet
        self._last: dict[str, dict] = {}
        self._history: dict[str, list[dict]] = {}  # trial -> per-epoch metrics (diagnosis); kept once ended if it errored
        self._fresh = False                        # the parent run is new in this process: no trial run to find
        self.diagnoses: dict[str, Any] = {}        # trial -> tuning.analysis.diagnose.Diagnosis, set when it ends
        self.trial_tags: dict[str, dict[str, str]] = {}   # trial -> tags other callbacks add (PBT, cost), sent as it ends
        self._warned = False
        self.lost_artifacts: Counter[str] = Counter()   # trial id (PARENT: the parent run) -> files not uploaded
        self.lost: dict[str, int] = {}             # read by bench/tracking.py
        self._lock = threading.Lock()       # guards _buffer, _pending_end, _trials: Tune's loop adds, the sender takes
        self._sending = threading.RLock()   # one send at a time (the sender thread, or the driver's flush)
        self._starting = threading.Lock()   # one run per trial: the sender and the driver's last flush may both make it
        self._stop, self._wake = threading.Event(), threading.Event()   # _wake: a trial ended, send now
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

    def lost_artifact_count(self) -> int:
        """Files (checkpoints, plots, tables) that are not in MLflow after every retry."""
        return sum(self.lost_artifacts.values())

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

    @property
    def uploader(self) -> Uploader:
        """Artifact uploads: their own timeout and retries ($SCHEDTUNE_ARTIFACT_TIMEOUT_S, _RETRIES)."""
        if self._uploader is None:
            self._uploader = Uploader(self.client, self.uri)
        return self._uploader

    def __getstate__(self):  # Tune pickles callbacks with the experiment state
        state = {k: v for k, v in self.__dict__.items() if k not in _THREAD_STATE}
        with self._lock:
            state["_buffer"] = {k: list(v) for k, v in self._buffer.items()}
        return {**state, "_client": None, "_trials": {}, "_pending_end": {}, "_fresh": False}

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
        for wait in (2.0, 4.0, None):   # nothing runs yet: a server slow to answer at first gets 3 tries
            try:
                return self._setup()
            except Exception:
                if wait is None:
                    raise
                time.sleep(wait)

    def _setup(self) -> None:
        name = self.spec.options.name
        self.experiment_id = experiment_id(self.client, self.uri, name)
        self.parent_run_id = self._find_run({schema.RUN_DIR: self.run_dir})
        if self.parent_run_id is None:
            self.parent_run_id = create_parent_run(self.client, self.experiment_id, self.spec, self.run_dir)
            self._fresh = True
            self._log_parent_text(self.spec.text, schema.SEARCH_SPACE_ARTIFACT)
        self._start_sender()

    def _log_parent_text(self, text: str, name: str) -> None:
        self.lost_artifacts[PARENT] += log_text(self.uploader.upload_counted, self.parent_run_id, text, name)

    def _start_sender(self) -> None:
        if self._sender is None or not self._sender.is_alive():
            self._stop.clear()
            self._sender = threading.Thread(target=self._send_loop, name="schedtune-mlflow", daemon=True)
            self._sender.start()

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(FLUSH_EVERY_S)
            self._wake.clear()
            if not self._stop.is_set():
                self.flush()

    def _send_metrics(self) -> bool:
        """Make the runs of trials that started, then send the buffered metrics; False when MLflow is
        down (the rest stays, in order)."""
        with self._sending:
            if not self._start_runs():
                return False
            with self._lock:
                trial_ids = list(self._buffer)
            for trial_id in trial_ids:
                run_id = self._children.get(trial_id)
                if run_id is None:
                    continue   # it reported after this flush made the runs: the next flush sends it
                with self._lock:
                    metrics = self._buffer.pop(trial_id, [])
                # Reported before the trial's run was found again on --resume: what the run has is never sent twice.
                upto = self._logged_upto.get(trial_id, 0)
                metrics = [m for m in metrics if m.step > upto]
                if metrics:
                    self._final.discard(trial_id)   # it reports anew: its ending is still to come
                while metrics:  # 1000 per call: MLflow's log_batch limit
                    if self._safe("log metrics", self.client.log_batch, run_id, metrics=metrics[:1000]) is FAILED:
                        with self._lock:
                            self._buffer[trial_id] = metrics + self._buffer.get(trial_id, [])
                        return False
                    del metrics[:1000]
            return True

    def on_trial_start(self, iteration, trials, trial, **info):
        """Note the trial; the sender thread makes (or, on resume, finds) its run at its next flush."""
        with self._lock:
            self._trials.setdefault(trial.trial_id, trial)
        if self._sender is None and self.parent_run_id:   # restored by --resume: set-up may not have run
            self._start_sender()

    def _start_runs(self) -> bool:
        """Make the runs of the trials that started since the last flush, in start order."""
        with self._lock:
            starting = [t for trial_id, t in self._trials.items() if trial_id not in self._children]
        return all(self._start_run(t) for t in starting)

    def _start_run(self, trial) -> bool:
        """Make (or find again) the trial's run; False while MLflow is down (tried again at the next flush)."""
        with self._starting:
            return trial.trial_id in self._children or self._make_run(trial)

    def _make_run(self, trial) -> bool:
        tags = {schema.PARENT_RUN_ID: self.parent_run_id, schema.TRIAL_ID: trial.trial_id}
        # A parent run made by this process has no trial runs but those made here: nothing to find.
        run_id = None if self._fresh else self._safe("find a trial run", self._find_run, tags)
        if run_id is FAILED:
            return False
        if run_id is not None:  # resumed: carry on after what the run already has
            self._safe("read a trial run", self._remember_logged, trial.trial_id, run_id)
        else:
            cfg = self.spec.trial_config(trial.config)
            run = self._safe("create a trial run", self.client.create_run, self.experiment_id,
                             run_name=trial.trial_id, tags={**tags, schema.STATUS: schema.STATUS_RUNNING})
            if run is FAILED:
                return False
            run_id = run.info.run_id
            self._safe("log params", self.client.log_batch, run_id,
                       params=[_param(k, v) for k, v in cfg.flat().items()])
        self._children[trial.trial_id] = run_id
        return True

    def _remember_logged(self, trial_id: str, run_id: str) -> None:
        run = self.client.get_run(run_id)
        history = self.client.get_metric_history(run_id, self.spec.options.metric)
        self._logged_upto[trial_id] = max((m.step for m in history), default=0)
        if run.data.tags.get(schema.STATUS, schema.STATUS_RUNNING) != schema.STATUS_RUNNING:
            self._final.add(trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from mlflow.entities import Metric

        self._last[trial.trial_id] = result
        with self._lock:
            self._trials.setdefault(trial.trial_id, trial)
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
            self._start_sender()   # it sends them, and makes the run of a trial that started during an outage

    def flush(self) -> None:
        """Send everything now (the sender thread; the driver at the end): the runs of trials that
        started (in start order), metrics, trial endings."""
        with self._sending:
            with self._lock:
                ended = list(self._pending_end.values())
            if not self._send_metrics():
                return  # still down: the rest stays buffered for the next flush
            for trial, errored in ended:   # trials that ended since, or during an outage
                if not self._finish_trial(trial, errored):
                    return

    def _end_trial(self, trial, errored: bool) -> None:
        """Queue the trial's ending for the sender thread (its metrics first, then the uploads and
        the tags); nothing here waits for MLflow."""
        with self._lock:
            self._trials.setdefault(trial.trial_id, trial)
            self._pending_end[trial.trial_id] = (trial, errored)
        if self._sender is None and self.parent_run_id:
            self._start_sender()
        self._wake.set()

    def _finish_trial(self, trial, errored: bool) -> bool:
        """Tag, upload and close a trial's run; False (still pending) while MLflow is down."""
        self._start_run(trial)
        run_id = self._children.get(trial.trial_id)
        if run_id is None or trial.trial_id in self._final or self._buffer.get(trial.trial_id):
            # no run yet / metrics still unsent: retry at the next flush; ended before an interruption: done
            done = trial.trial_id in self._final
            if done:
                self._release(trial.trial_id, errored)
            return done
        o, history, upload = self.spec.options, self._history.get(trial.trial_id, []), self.uploader.upload_counted
        last = self._last.get(trial.trial_id) or getattr(trial, "last_result", None) or {}
        tags = {**end_tags(last, errored, getattr(trial, "error_file", None), self.spec,
                           trial_error_line(trial) if errored else None),
                **self.trial_tags.get(trial.trial_id, {})}
        found = find_checkpoints(self._trial_dir(trial)) + find_checkpoints(f"{self.train_storage}/train-{trial.trial_id}")
        logged = self._safe("log checkpoints", log_checkpoints, self.client, upload, run_id, trial.trial_id, found,
                            o.metric, o.mode)
        if logged is FAILED:
            return False
        trace, meta, lost = logged
        diagnosed = self._safe("diagnose a trial", diagnose_and_plot, upload, run_id, trial.trial_id, history,
                               trace, meta)
        if diagnosed is not FAILED and diagnosed[0] is not None:
            self.diagnoses[trial.trial_id] = diagnosed[0]
            tags.update(diagnosed[1])
            lost += diagnosed[2]
        if lost:
            tags[schema.LOST_ARTIFACTS] = str(lost)
        # The status tag goes last: once a run has it, its checkpoints are in, or counted in
        # schedtune.lost_artifacts (resume relies on it).
        best = self._safe("read a trial's metric", best_metric, self.client, run_id, history, o.metric, o.mode)
        if best is FAILED or self._safe("tag a trial", self.client.log_batch, run_id, metrics=best,
                      tags=[_tag(k, v) for k, v in tags.items()]) is FAILED:
            return False
        if self._safe("end a trial run", self.client.set_terminated, run_id,
                      "FAILED" if errored else "FINISHED") is FAILED:
            return False
        self.lost_artifacts.pop(trial.trial_id, None)   # set, not added: a retried ending counts once
        if lost:
            self.lost_artifacts[trial.trial_id] = lost
        self._release(trial.trial_id, errored)
        return True

    def _release(self, trial_id: str, errored: bool) -> None:
        """The trial's run has ended: drop what only its ending needed (its Trial, last result,
        buffer; its history unless it errored, as ``--resume`` may run it again). Kept: its run id,
        diagnosis, lost files, tags."""
        with self._lock:
            self._pending_end.pop(trial_id, None)
            self._trials.pop(trial_id, None)
            if not self._buffer.get(trial_id):
                self._buffer.pop(trial_id, None)
        self._last.pop(trial_id, None)
        if not errored:
            self._history.pop(trial_id, None)

    def _trial_dir(self, trial) -> str:
        """The Tune trial's directory as a path or URI: ``trial.path`` is a path on Tune's storage
        filesystem, without its scheme (``bucket/prefix/...`` for s3://), so it is rebuilt from the run
        directory, which has it."""
        name = getattr(getattr(trial, "storage", None), "trial_dir_name", None)
        return f"{self.run_dir}/{name}" if name else trial.path

    def log_experiment_plots(self, rows: list) -> None:
        """Metric against each sampled hyperparameter and the best-so-far curve (trials in start
        order) as PNGs under plots/ on the parent run. ``rows``: tuning.analysis.results.TrialRow."""
        order = {t: i for i, t in enumerate(self.trial_order())}
        rows = sorted(rows, key=lambda r: order.get(r.trial_id, len(order)))
        lost = self._safe("log experiment plots", log_experiment_plots, self.uploader.upload_counted,
                          self.parent_run_id, self.spec, rows)
        self.lost_artifacts[PARENT] += 0 if lost is FAILED else lost

    def add_trial_tags(self, trial_id: str, tags: dict[str, str]) -> None:
        """Tags for a trial's run, sent with the tags of how it ended (its PBT perturbations, its cost)."""
        self.trial_tags.setdefault(trial_id, {}).update(tags)

    def tag_parent(self, tags: dict[str, str]) -> None:
        """Tags on the experiment's run (the experiment's cost, what ended it)."""
        self._safe("tag the experiment run", self.client.log_batch, self.parent_run_id,
                   tags=[_tag(k, v) for k, v in tags.items()])

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end_trial(trial, errored=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end_trial(trial, errored=True)

    def on_experiment_end(self, trials, **info):
        """Tune is done: end the runs of trials whose ending never reached MLflow (the driver was killed in
        between; Tune restores them as ended, silently), and send everything before ``fit()`` returns."""
        with self._lock:
            ended = {t.trial_id: t for t in trials if t.status in _ENDED and t.trial_id not in self._pending_end}
        open_runs = self._safe("find open trial runs", open_trial_runs, self.client, self.experiment_id,
                               self.parent_run_id) if ended else {}
        for trial_id, run_id in ({} if open_runs is FAILED else open_runs).items():
            if trial_id in ended:
                self._children.setdefault(trial_id, run_id)
                self._end_trial(ended[trial_id], errored=ended[trial_id].status == "ERROR")
        self.settle()

    def settle(self) -> None:
        """Stop the sender thread, send what is left; a server that is down gets ``FINAL_RETRY_S`` to come back."""
        deadline = time.monotonic() + FINAL_RETRY_S
        self._stop.set()
        self._wake.set()
        if self._sender is not None:
            self._sender.join()
        self.flush()
        while (self._pending_end or any(self._buffer.values())) and time.monotonic() < deadline:
            time.sleep(2.0)
            self.flush()

    def finish(self, table_md: str, best: Optional[dict], model_version: Optional[str]) -> None:
        """Close the parent run: results table, best trial, registered model, what is lost."""
        self.settle()
        pending = self.unsent_metrics()
        if pending or self._pending_end:
            print(f"[schedtune] MLflow at {self.uri}: {pending} metric values and {len(self._pending_end)} "
                  f"trial endings could not be sent", file=sys.stderr)
            self._safe("tag lost metrics", self.client.set_tag, self.parent_run_id,
                       schema.LOST_METRICS, str(pending))
        self._safe("log the results table", self._log_parent_text, table_md, schema.RESULTS_ARTIFACT)
        tags = {schema.LOST_ARTIFACTS: str(self.lost_artifact_count())} if self.lost_artifact_count() else {}
        tags.update({schema.BEST_TRIAL_ID: best["trial_id"], schema.BEST_RUN_ID: best["run_id"]} if best else {})
        tags.update({schema.MODEL_VERSION: model_version} if model_version else {})
        self._safe("tag the experiment run", self.client.log_batch, self.parent_run_id,
                   tags=[_tag(k, v) for k, v in tags.items()],
                   metrics=[_metric(best_metric_key(self.spec.options.metric), best["metric"])] if best else [])
        self._safe("end the experiment run", self.client.set_terminated, self.parent_run_id, "FINISHED")

