"""callback: moved from the former test_tuning_units.py grab-bag."""
from __future__ import annotations

import json


from tests.conftest import ROOT, sqlite_store
from tuning.spec import load_spec
from tuning.tracking.trial_files import best_and_last, find_checkpoints
from tuning.tracking.callback import FAILED, MLflowTracker

QUICK = ROOT / "search_spaces/quickstart.yaml"


class _DownClient:
    def __init__(self):
        self.down, self.batches = True, []

    def log_batch(self, run_id, metrics=(), **kw):
        if self.down:
            raise ConnectionError("connection refused")
        self.batches.append((run_id, list(metrics)))


class _Trial:
    trial_id = "t_00000"


def test_tracker_buffers_through_an_outage_and_sends_once_back(capsys):
    tracker = MLflowTracker(load_spec(QUICK), "http://127.0.0.1:9", "/tmp/x", "/tmp/x/train")
    tracker._client = client = _DownClient()
    tracker._children["t_00000"] = "run1"
    for epoch in (1, 2):
        tracker.on_trial_result(0, [], _Trial(), {"epoch": epoch, "val_acc": 0.5 + epoch / 10})
        tracker.flush()
    assert client.batches == [] and len(tracker._buffer["t_00000"]) == 2
    assert "training continues" in capsys.readouterr().err
    client.down = False
    tracker.flush()
    (run_id, metrics), = client.batches
    assert run_id == "run1" and sorted((m.step, m.value) for m in metrics) == [(1, 0.6), (2, 0.7)]
    assert not tracker._buffer.get("t_00000")
    assert tracker._safe("x", lambda: 1 / 0) is FAILED


def test_tracker_sends_metrics_from_its_own_thread_not_from_tunes_loop(monkeypatch):
    """Tune's report() waits for the driver's callbacks: a send there would stall every trial."""
    import threading
    import time

    import tuning.tracking.callback as tracking

    class Recorder:
        sends: list = []

        def log_batch(self, run_id, metrics=(), **kw):
            self.sends.append((threading.current_thread().name, run_id, [m.step for m in metrics]))

    monkeypatch.setattr(tracking, "FLUSH_EVERY_S", 0.05)
    tracker = MLflowTracker(load_spec(QUICK), "http://127.0.0.1:9", "/tmp/x", "/tmp/x/train")
    tracker._client = client = Recorder()
    tracker._children["t_00000"] = "run1"
    tracker._start_sender()
    try:
        for epoch in range(1, 21):
            tracker.on_trial_result(0, [], _Trial(), {"epoch": epoch, "val_acc": 0.5})
        deadline = time.monotonic() + 10
        while sum(len(steps) for *_, steps in client.sends) < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        tracker._stop.set()
    assert {(name, run) for name, run, _ in client.sends} == {("schedtune-mlflow", "run1")}
    assert sorted(step for *_, steps in client.sends for step in steps) == list(range(1, 21))   # each once


def test_best_and_last_checkpoints(tmp_path):
    for epoch, acc in ((1, 0.5), (2, 0.9), (3, 0.7)):
        d = tmp_path / f"checkpoint_{epoch:06d}"
        d.mkdir()
        (d / "meta.json").write_text(json.dumps({"epoch": epoch, "metrics": {"val_acc": acc}}))
    (tmp_path / "not_a_checkpoint").mkdir()
    found = find_checkpoints(str(tmp_path))
    assert len(found) == 3
    best, last = best_and_last(found, "val_acc", "max")
    assert (best[1]["epoch"], last[1]["epoch"]) == (2, 3)
    best, _ = best_and_last(found, "val_acc", "min")
    assert best[1]["epoch"] == 1
    assert best_and_last([], "val_acc", "max") == (None, None)


def test_runs_ranks_trials_by_their_best_epoch_and_broken_ones_last(tmp_path):
    import mlflow
    from mlflow.entities import Metric, Param

    from tuning.cli.runs import print_runs

    uri = sqlite_store(tmp_path / "mlflow.db")
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("runs-test", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(exp, tags={"schedtune.role": "experiment"}).info.run_id
    client.log_batch(parent, params=[Param("metric", "val_acc"), Param("mode", "max")])
    for trial, status, curve in (("peaked", "completed", [0.5, 0.95, 0.80]), ("steady", "completed", [0.6, 0.9]),
                                 ("broken", "diverged", [0.99, float("nan")])):
        run = client.create_run(exp, tags={"mlflow.parentRunId": parent, "schedtune.trial_id": trial,
                                           "schedtune.status": status}).info.run_id
        client.log_batch(run, metrics=[Metric("val_acc", v, 0, e) for e, v in enumerate(curve, 1)])
    lines: list[str] = []
    assert print_runs("runs-test", uri, out=lines.append) == 0
    rows = [line.split() for line in lines[2:]]
    assert [(r[0], r[-2]) for r in rows] == [("peaked", "0.9500"), ("steady", "0.9000"), ("broken", "-")]


def test_trial_endings_upload_and_tag_on_the_sender_thread_not_on_tunes_loop(tmp_path, monkeypatch):
    """Tune's event loop only queues a trial's ending: the checkpoint uploads (which may take
    minutes, with retries), the plots and the final tags happen on the tracker's own thread."""
    import threading
    import time
    from types import SimpleNamespace

    import tuning.tracking.callback as tracking

    calls: list[tuple[str, str]] = []

    class Client:   # records which thread makes each MLflow call
        def __getattr__(self, name):
            def call(*a, **kw):
                calls.append((threading.current_thread().name, name))
                return SimpleNamespace(info=SimpleNamespace(run_id="run1")) if name == "create_run" else []
            return call

    class Uploads:
        def upload_counted(self, what, run_id, local_dir, artifact_path):
            calls.append((threading.current_thread().name, f"upload {artifact_path}"))
            return 0

    ckpt = tmp_path / "trial" / "checkpoint_000001"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"epoch": 1, "metrics": {"val_acc": 0.5}}))
    monkeypatch.setattr(tracking, "FLUSH_EVERY_S", 0.05)
    tracker = MLflowTracker(load_spec(QUICK), "http://127.0.0.1:9", str(tmp_path / "run"), str(tmp_path / "train"))
    tracker._client, tracker._uploader = Client(), Uploads()
    tracker.experiment_id, tracker.parent_run_id = "1", "parent"
    trial = SimpleNamespace(trial_id="t_00000", path=str(tmp_path / "trial"), status="RUNNING", error_file=None,
                            config={"optim.base_lr": 0.1, "optim.weight_decay": 1e-4, "model.dropout": 0.1,
                                    "schedule": {"name": "cosine"}})
    tracker.on_trial_start(0, [], trial)         # only noted: the sender thread makes the run
    on_loop = len(calls)
    tracker.on_trial_result(0, [], trial, {"epoch": 1, "val_acc": 0.5, "train_loss": 2.0, "val_loss": 2.1})
    tracker.on_trial_complete(0, [], trial)
    try:
        deadline = time.monotonic() + 60
        while ("schedtune-mlflow", "set_terminated") not in calls and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        tracker._stop.set()
        tracker._wake.set()
    assert on_loop == 0   # no MLflow call on Tune's loop, not even to make the trial's run
    after = calls[on_loop:]
    assert ("schedtune-mlflow", "create_run") in after
    assert ("schedtune-mlflow", "upload checkpoints/best") in after and ("schedtune-mlflow", "log_batch") in after
    assert {name for name, _ in after} == {"schedtune-mlflow"}, after
    assert after[-1] == ("schedtune-mlflow", "set_terminated") and tracker.lost_artifact_count() == 0


def test_a_restored_tracker_finds_the_runs_of_trials_that_ended_before_the_interruption(tmp_path):
    """Tune restores callbacks as pickled when the experiment started: a trial that ended before a
    kill is unknown to the tracker of the resumed invocation, and its run is found by its tags
    (the results table, the best run id and the registered model need it: issue 18, item 6)."""
    import mlflow

    uri = sqlite_store(tmp_path / "mlflow.db")
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("restored", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(exp, tags={"schedtune.role": "experiment", "schedtune.run_dir": "/r"}).info.run_id
    other = client.create_run(exp, tags={"schedtune.role": "experiment", "schedtune.run_dir": "/other"}).info.run_id
    runs = {t: client.create_run(exp, tags={"mlflow.parentRunId": parent, "schedtune.trial_id": t}).info.run_id
            for t in ("t_00000", "t_00001")}
    client.create_run(exp, tags={"mlflow.parentRunId": other, "schedtune.trial_id": "t_00002"})
    tracker = MLflowTracker(load_spec(QUICK), uri, "/r", "/r/train")
    tracker.experiment_id, tracker.parent_run_id = exp, parent    # what setup() finds again on --resume
    assert tracker.trial_order() == []
    assert {t: tracker.run_id(t) for t in runs} == runs
    assert tracker.run_id("t_00002") is None                       # another invocation's trial: not this one's
    assert tracker.trial_order() == ["t_00000", "t_00001"]


class _RecordingClient:
    """An MLflow client that records its calls (name, args) and makes runs run0, run1, ..."""

    def __init__(self):
        self.calls: list[tuple[str, tuple]] = []

    def __getattr__(self, name):
        from types import SimpleNamespace

        def call(*a, **kw):
            self.calls.append((name, a))
            if name == "create_run":
                return SimpleNamespace(info=SimpleNamespace(run_id=f"run{sum(c == 'create_run' for c, _ in self.calls) - 1}"))
            return []
        return call


class _NoUploads:
    def upload_counted(self, what, run_id, local_dir, artifact_path):
        return 0


def _fake_trial(tmp_path, i: int):
    from types import SimpleNamespace

    return SimpleNamespace(trial_id=f"t_{i:05d}", path=str(tmp_path / f"trial{i}"), status="RUNNING", error_file=None,
                           config={"optim.base_lr": 0.1, "optim.weight_decay": 1e-4, "model.dropout": 0.1,
                                   "schedule": {"name": "cosine"}})


def _quiet_tracker(tmp_path, monkeypatch):
    """A tracker on a recording client, its sender thread not started (the test flushes), diagnoses stubbed."""
    import tuning.tracking.callback as tracking
    from tuning.analysis.diagnose import Diagnosis

    monkeypatch.setattr(tracking, "diagnose_and_plot",
                        lambda upload, run_id, trial_id, history, trace, meta: (Diagnosis("healthy"), {}, 0))
    tracker = MLflowTracker(load_spec(QUICK), "http://127.0.0.1:9", str(tmp_path / "run"), str(tmp_path / "train"))
    tracker._client, tracker._uploader = _RecordingClient(), _NoUploads()
    tracker.experiment_id, tracker.parent_run_id, tracker._fresh = "1", "parent", True
    tracker._sender = object()   # not None: the hooks do not start a thread; the test calls flush()
    return tracker


def test_trial_runs_are_made_by_the_sender_in_start_order_and_not_searched_under_a_new_parent(tmp_path, monkeypatch):
    tracker = _quiet_tracker(tmp_path, monkeypatch)
    trials = [_fake_trial(tmp_path, i) for i in range(3)]
    for t in trials:
        tracker.on_trial_start(0, [], t)
    assert tracker._client.calls == []            # Tune's loop: nothing sent
    tracker.flush()
    names = [c for c, _ in tracker._client.calls]
    assert names.count("create_run") == 3 and "search_runs" not in names   # a parent made here has no runs to find
    assert tracker.trial_order() == ["t_00000", "t_00001", "t_00002"]
    assert {t.trial_id: tracker.run_id(t.trial_id) for t in trials} == {"t_00000": "run0", "t_00001": "run1",
                                                                         "t_00002": "run2"}
    tracker.flush()
    assert [c for c, _ in tracker._client.calls].count("create_run") == 3   # one run per trial


def test_an_ended_trials_state_is_released_and_the_pickled_state_stays_flat(tmp_path, monkeypatch):
    """Once its run has ended, a trial leaves only its run id, diagnosis and tags behind: the tracker
    (and the experiment state Tune pickles it into) does not grow with the finished trials."""
    import pickle

    tracker = _quiet_tracker(tmp_path, monkeypatch)
    sizes = []
    for i in range(40):
        trial = _fake_trial(tmp_path, i)
        tracker.on_trial_start(0, [], trial)
        for epoch in (1, 2):
            tracker.on_trial_result(0, [], trial, {"epoch": epoch, "val_acc": 0.5 + epoch / 10, "pad": "x" * 5000,
                                                   "config": dict(trial.config)})
        if i == 0:
            tracker.add_trial_tags(trial.trial_id, {"schedtune.cost_cpu_s": "1.5"})
        trial.status = "TERMINATED"
        tracker.on_trial_complete(0, [], trial)
        tracker.flush()
        sizes.append(len(pickle.dumps(tracker)))
    for state in (tracker._trials, tracker._last, tracker._history, tracker._buffer, tracker._pending_end):
        assert state == {}
    assert tracker.lost_artifacts == {} and tracker.lost_artifact_count() == 0
    assert tracker.run_id("t_00007") == "run7" and tracker.diagnosis("t_00007").kind == "healthy"
    assert tracker.trial_tags == {"t_00000": {"schedtune.cost_cpu_s": "1.5"}}
    ended = [a for c, a in tracker._client.calls if c == "set_terminated"]
    assert [run for run, _ in ended] == [f"run{i}" for i in range(40)]
    # what stays per trial: its run id and diagnosis (well under 1 kB), never its results (over 10 kB here)
    assert (sizes[-1] - sizes[9]) / 30 < 1000, sizes


def test_an_errored_trial_keeps_its_history_for_a_resume_that_runs_it_again(tmp_path, monkeypatch):
    tracker = _quiet_tracker(tmp_path, monkeypatch)
    trial = _fake_trial(tmp_path, 0)
    tracker.on_trial_start(0, [], trial)
    tracker.on_trial_result(0, [], trial, {"epoch": 1, "val_acc": 0.5})
    trial.status = "ERROR"
    tracker.on_trial_error(0, [], trial)
    tracker.flush()
    assert ("set_terminated", ("run0", "FAILED")) in tracker._client.calls
    assert tracker._trials == {} and tracker._last == {} and [h["epoch"] for h in tracker._history["t_00000"]] == [1]


def test_a_restored_tracker_finds_a_run_made_after_the_state_was_saved_and_never_makes_a_second(tmp_path):
    """Resume never duplicates runs: Tune's experiment state may be older than a trial's run (made
    by the sender after the last save); the restored tracker finds that run by its tags."""
    import pickle

    import mlflow

    uri = sqlite_store(tmp_path / "mlflow.db")
    tracker = MLflowTracker(load_spec(QUICK), uri, str(tmp_path / "run"), str(tmp_path / "train"))
    tracker.setup()
    try:
        trial = _fake_trial(tmp_path, 0)
        tracker.on_trial_start(0, [], trial)
        saved = pickle.dumps(tracker)          # Tune saves its experiment state before the run exists
        tracker.on_trial_result(0, [], trial, {"epoch": 1, "val_acc": 0.5})
        tracker.flush()
        first = tracker.run_id(trial.trial_id)
    finally:
        tracker._stop.set()
        tracker._wake.set()
    restored = pickle.loads(saved)            # the driver is killed; --resume restores the state
    assert restored._fresh is False
    restored.setup()                          # finds the parent run: not fresh, trial runs are searched
    try:
        assert restored.parent_run_id == tracker.parent_run_id and not restored._fresh
        restored.on_trial_start(0, [], trial)
        restored.on_trial_result(0, [], trial, {"epoch": 1, "val_acc": 0.5})   # logged before: not again
        restored.on_trial_result(0, [], trial, {"epoch": 2, "val_acc": 0.6})
        restored.flush()
    finally:
        restored._stop.set()
        restored._wake.set()
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([tracker.experiment_id], f"tags.`schedtune.trial_id` = '{trial.trial_id}'")
    assert [r.info.run_id for r in runs] == [first] == [restored.run_id(trial.trial_id)]
    assert [(m.step, m.value) for m in client.get_metric_history(first, "val_acc")] == [(1, 0.5), (2, 0.6)]
