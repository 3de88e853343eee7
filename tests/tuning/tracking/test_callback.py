"""callback: moved from the former test_tuning_units.py grab-bag."""
from __future__ import annotations

import json


from tests.conftest import ROOT
from tuning.spec import load_spec
from tuning.tracking.trial_files import best_and_last, find_checkpoints
from tuning.tracking.callback import FAILED, MLflowTracker

QUICK = ROOT / "search_spaces/quickstart.yaml"
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

    uri = f"sqlite:///{tmp_path}/mlflow.db"
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
    tracker.on_trial_start(0, [], trial)         # finding / making the run: on the loop, fast-failing
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
    assert {name for name, _ in calls[:on_loop]} == {threading.current_thread().name}
    after = calls[on_loop:]
    assert ("schedtune-mlflow", "upload checkpoints/best") in after and ("schedtune-mlflow", "log_batch") in after
    assert {name for name, _ in after} == {"schedtune-mlflow"}, after
    assert after[-1] == ("schedtune-mlflow", "set_terminated") and tracker.lost_artifact_count() == 0


def test_a_restored_tracker_finds_the_runs_of_trials_that_ended_before_the_interruption(tmp_path):
    """Tune restores callbacks as pickled when the experiment started: a trial that ended before a
    kill is unknown to the tracker of the resumed invocation, and its run is found by its tags
    (the results table, the best run id and the registered model need it: issue 18, item 6)."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
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
