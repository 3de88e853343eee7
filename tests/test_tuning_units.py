"""The driver's decisions without a cluster: sizing, end states, tracking checks and outages,
checkpoint selection, CLI overrides."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tuning.cli import build_parser, overrides
from tuning.experiment import ResourceError, max_concurrent, trial_demand
from tuning.space import load_spec
from tuning.backend import TrackingError, check_tracking, resolve_tracking_uri
from tuning.checkpoints import best_and_last, find_checkpoints
from tuning.tracking import FAILED, MLflowTracker, end_state, training_metrics

QUICK = ROOT / "search_spaces/quickstart.yaml"


def spec_with(**o):
    return load_spec(QUICK, {f"train.scaling.{k}": v for k, v in o.items()})


@pytest.mark.parametrize("scaling,cluster,memory,expected", [
    ({"num_workers": 2, "cpus_per_worker": 0.5}, {"CPU": 2}, None, 1),     # 0.25 + 2 x 0.5 = 1.25 CPU
    ({"num_workers": 2, "cpus_per_worker": 0.5}, {"CPU": 8}, None, 6),
    ({"num_workers": 2, "cpus_per_worker": 0.5}, {"CPU": 8}, 8.0, 2),      # memory: 0.5 + 2 x 1.5 GB each
    ({"num_workers": 1, "cpus_per_worker": 0.5}, {"CPU": 2}, None, 4),     # in-process trial: no driver share
    ({"num_workers": 4, "use_gpu": True, "gpus_per_worker": 1, "cpus_per_worker": 1}, {"CPU": 64, "GPU": 8}, None, 2),
])
def test_max_concurrent_fits_full_worker_groups(scaling, cluster, memory, expected):
    assert max_concurrent(spec_with(**scaling), cluster, memory) == expected


def test_max_concurrent_uses_the_largest_sampled_worker_group():
    spec = load_spec(QUICK, {"space.scaling.num_workers": {"choice": [1, 4]}, "train.scaling.cpus_per_worker": 1})
    assert trial_demand(spec.base.with_updates({"scaling.num_workers": 4}))["CPU"] == 4.25
    assert max_concurrent(spec, {"CPU": 10}, None) == 2


def test_max_concurrent_combines_searched_worker_counts_and_sizes():
    # The largest group is 4 workers x 2 CPUs (+ 0.25 for the trial driver) = 8.25 CPU: a combination
    # of two searched keys, which neither key's extremes reach alone (4 x 0.5 + 0.25, 2 x 2 + 0.25).
    spec = load_spec(QUICK, {"space.scaling.num_workers": {"choice": [1, 4]},
                             "space.scaling.cpus_per_worker": {"choice": [0.5, 2]}})
    assert max_concurrent(spec, {"CPU": 17}, None) == 2
    with pytest.raises(ResourceError, match="8.25 CPU"):
        max_concurrent(spec, {"CPU": 8}, None)


def test_progress_counts_every_grid_point_as_a_trial():
    from tuning.progress import ProgressPrinter

    spec = load_spec(QUICK, {"experiment.num_samples": 2, "space.optim.base_lr": {"grid": [0.1, 0.01, 0.001]}})
    lines: list[str] = []
    ProgressPrinter(spec, lines.append)._line([])
    assert "0/6 done" in lines[0]


def test_a_trial_that_cannot_fit_is_an_error_naming_resources():
    with pytest.raises(ResourceError) as e:
        max_concurrent(spec_with(num_workers=4, cpus_per_worker=1), {"CPU": 2}, None)
    assert "4.25 CPU" in str(e.value) and "cluster has 2 CPU" in str(e.value)
    # an autoscaling cluster may grow: admit one, the worker group waits (bounded) for nodes
    assert max_concurrent(spec_with(num_workers=4, cpus_per_worker=1), {"CPU": 2}, None, autoscaling=True) == 1


@pytest.mark.parametrize("last,errored,expected", [
    ({"epoch": 6}, False, "completed"),
    ({"epoch": 2}, False, "stopped by ASHA at epoch 2"),
    ({"epoch": 6, "diverged": 1.0}, False, "diverged"),
    ({"epoch": 3}, True, "failed"),
])
def test_end_state(last, errored, expected):
    assert end_state(last, errored, epochs=6, scheduler="asha") == expected


def test_training_metrics_drop_bookkeeping_and_non_finite():
    r = {"val_acc": 0.9, "epoch": 3, "timestamp": 1, "val_loss": float("inf"), "config": {}, "done": False,
         "lr": 0.1}
    assert training_metrics(r) == {"val_acc": 0.9, "lr": 0.1}


def test_tracking_down_at_start_is_a_clear_error(tmp_path):
    from tuning.cluster import free_ports

    uri = f"http://127.0.0.1:{free_ports(1)[0]}"
    with pytest.raises(TrackingError, match=f"cannot reach the MLflow tracking server at {uri}"):
        check_tracking(uri, timeout_s=2)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(TrackingError, match=f"{tmp_path}/a-file is not a writable directory"):
        check_tracking(f"sqlite:///{tmp_path}/a-file/sub/mlflow.db")
    check_tracking(f"sqlite:///{tmp_path}/mlflow.db")
    check_tracking(f"sqlite:///{tmp_path}/not/yet/mlflow.db")        # MLflow makes the directories
    assert not (tmp_path / "not").exists()                          # the check itself makes nothing


def test_cli_refuses_an_unreachable_tracking_server_before_ray(tmp_path):
    from tuning.cluster import free_ports

    p = subprocess.run([sys.executable, "-m", "tuning.cli", "tune", str(QUICK), "--smoke", "--tracking-uri",
                        f"http://127.0.0.1:{free_ports(1)[0]}", "--storage", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 2 and "cannot reach the MLflow tracking server" in p.stderr
    assert "Traceback" not in p.stderr and "Ray cluster" not in p.stdout


def test_default_tracking_uri_is_absolute_sqlite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert resolve_tracking_uri(None) == "http://mlflow:5000"


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

    import tuning.tracking as tracking

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


def test_cli_flags_become_dotted_overrides():
    args = build_parser().parse_args(["tune", "f.yaml", "--smoke", "--workers", "3", "--gpus-per-worker", "0.5",
                                      "--name", "x", "--set", "train.optim.base_lr=0.05", "--set",
                                      "train.schedule={name: cosine}"])
    assert overrides(args) == {"experiment.num_samples": 2, "train.epochs": 2, "train.scaling.num_workers": 3,
                               "train.scaling.use_gpu": True, "train.scaling.gpus_per_worker": 0.5,
                               "experiment.name": "x", "train.optim.base_lr": 0.05,
                               "train.schedule": {"name": "cosine"}}


@pytest.mark.parametrize("argv", [["tune", "f.yaml", "--workers", "0"], ["tune", "f.yaml", "--set", "novalue"],
                                  ["tune"], ["bogus"]])
def test_cli_usage_errors_exit_2(argv):
    p = subprocess.run([sys.executable, "-m", "tuning.cli", *argv], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "usage: schedtune" in p.stderr


def test_help_lists_every_command():
    p = subprocess.run([sys.executable, "-m", "tuning.cli", "--help"], capture_output=True, text=True, timeout=60)
    for cmd in ("tune", "validate", "runs", "submit", "jobs", "stop"):
        assert cmd in p.stdout


def test_unwritable_or_full_storage_is_a_clear_error_at_start(tmp_path, monkeypatch):
    from tuning import storage
    from tuning.storage import StorageError, resolve_storage

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match=f"results storage {blocker}/results is not writable"):
        resolve_storage(str(blocker / "results"))
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda p: type("U", (), {"free": 10 * 1024 * 1024})())
    with pytest.raises(StorageError, match="is full .10 MB free"):
        resolve_storage(str(tmp_path / "ok"))
    monkeypatch.undo()
    assert resolve_storage(str(tmp_path / "ok")) == str(tmp_path / "ok")
    # a URI gets the same check, through pyarrow's filesystems (S3, GCS, file://, ...)
    assert resolve_storage(f"file://{tmp_path}/uri/") == f"file://{tmp_path}/uri"
    assert (tmp_path / "uri").is_dir() and not list((tmp_path / "uri").iterdir())   # the probe is gone
    with pytest.raises(StorageError, match=f"results storage file://{blocker}/results is not writable"):
        resolve_storage(f"file://{blocker}/results")


@pytest.mark.parametrize("uri", [False, True])
def test_resume_finds_the_latest_restorable_run_locally_and_under_a_uri(tmp_path, uri):
    from tuning.storage import latest_run_dir

    for run, restorable in (("20261101-000000", True), ("20261102-000000", True), ("20261103-000000", False)):
        (tmp_path / "exp" / run).mkdir(parents=True)
        if restorable:
            (tmp_path / "exp" / run / "tuner.pkl").write_bytes(b"x")
    storage = f"file://{tmp_path}" if uri else str(tmp_path)
    assert latest_run_dir(storage, "exp") == f"{storage}/exp/20261102-000000"
    assert latest_run_dir(storage, "other") is None


def test_cli_storage_error_exits_2_before_ray(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    p = subprocess.run([sys.executable, "-m", "tuning.cli", "tune", str(QUICK), "--smoke", "--storage",
                        str(blocker / "r"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 2 and "is not writable" in p.stderr and "Traceback" not in p.stderr
    assert "Ray cluster" not in p.stdout


def test_asha_rungs_survive_a_restore_through_the_callback_state():
    """Tune pickles the scheduler and the callbacks together when the experiment starts (empty
    rungs) and checkpoints only the callbacks' state as it runs: ASHAState carries the rungs."""
    import pickle
    from types import SimpleNamespace

    from tuning.schedulers import ASHAState, make_scheduler

    spec = load_spec(QUICK, {"train.epochs": 9, "experiment.scheduler": {"name": "asha", "grace_period": 1,
                                                                          "reduction_factor": 3}})
    asha, callbacks = make_scheduler(spec)
    assert [type(c) for c in callbacks] == [ASHAState]
    assert callbacks[0].get_state() is None                            # nothing to save yet
    pickled_at_start = pickle.dumps((asha, callbacks))
    bracket = asha._brackets[0]
    for trial_id, acc in [("a", 0.9), ("b", 0.5), ("c", 0.8)]:
        bracket.on_result(SimpleNamespace(trial_id=trial_id), 1, acc)   # rung at epoch 1
    state = pickle.loads(pickle.dumps(callbacks[0].get_state()))
    assert state["rungs"][0][-1] == (1, {"a": 0.9, "b": 0.5, "c": 0.8})

    restored_asha, restored_callbacks = pickle.loads(pickled_at_start)
    fresh = restored_asha._brackets[0]
    assert fresh.on_result(SimpleNamespace(trial_id="x"), 1, 0.1) == "CONTINUE"   # empty rungs: passes
    restored_asha, restored_callbacks = pickle.loads(pickled_at_start)
    restored_callbacks[0].set_state(state)
    bracket = restored_asha._brackets[0]
    assert bracket.on_result(SimpleNamespace(trial_id="x"), 1, 0.1) == "STOP"     # judged against a, b, c
    assert bracket.on_result(SimpleNamespace(trial_id="y"), 1, 0.95) == "CONTINUE"


def test_a_sqlite_store_keeps_its_artifacts_beside_the_database(tmp_path, monkeypatch):
    """Not MLflow's default ./mlruns of whatever directory the command ran in."""
    import mlflow

    from tuning.backend import experiment_id

    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    (tmp_path / "store").mkdir()
    client = mlflow.MlflowClient(uri)
    exp = experiment_id(client, uri, "beside")
    assert experiment_id(client, uri, "beside") == exp                  # found, not created twice
    run = client.create_run(exp)
    (tmp_path / "a.txt").write_text("x")
    client.log_artifact(run.info.run_id, str(tmp_path / "a.txt"))
    assert (tmp_path / "store" / "mlruns" / run.info.run_id / "artifacts" / "a.txt").exists()
    assert list(elsewhere.iterdir()) == []


def test_a_failed_trials_error_is_its_own_exception_not_rays_wrapper():
    from tuning.experiment import error_summary

    wrapped = RuntimeError("ray::ImplicitFunc.train() (pid=1, ip=127.0.0.1)\n  File \"trial.py\", line 3, in fit\n"
                           "    raise X\ntuning.trial.WorkerGroupStartError: it needs 2 workers x 0.5 CPU: missing 0.25 CPU")
    assert error_summary(wrapped) == "WorkerGroupStartError: it needs 2 workers x 0.5 CPU: missing 0.25 CPU"
    assert error_summary(ValueError("no type prefix here")) == "no type prefix here"


def test_runs_ranks_trials_by_their_best_epoch_and_broken_ones_last(tmp_path):
    import mlflow
    from mlflow.entities import Metric, Param

    from tuning.runs import print_runs

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


def test_optuna_tpe_with_the_same_seed_suggests_the_same_configs():
    from tuning.experiment import _searcher
    from tuning.space import to_tune

    def suggestions(seed):
        spec = load_spec(QUICK, {"experiment.search": "optuna_tpe", "experiment.seed": seed})
        searcher = _searcher(spec, 4)
        searcher.set_search_properties(spec.options.metric, spec.options.mode, to_tune(spec))
        return [searcher.suggest(f"trial_{i}") for i in range(3)]

    first = suggestions(3)
    assert all(isinstance(s, dict) and "optim.base_lr" in s for s in first)
    assert first == suggestions(3) and first != suggestions(4)
