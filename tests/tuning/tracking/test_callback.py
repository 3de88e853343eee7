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
