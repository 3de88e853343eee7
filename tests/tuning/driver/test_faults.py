"""Faults on a real local Ray cluster: a diverging trial, a worker group that cannot start, a killed
Train worker, an MLflow outage."""
from __future__ import annotations

import pytest

from tests.conftest import ROOT, sqlite_store

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]


def test_a_diverged_trial_is_tagged_and_never_best(ray_cluster, tmp_path):
    import mlflow

    from tuning.driver.experiment import run_experiment
    from tuning.spec import load_spec

    spec = load_spec(ROOT / "search_spaces/quickstart.yaml", {
        "experiment.name": "it-diverge", "experiment.num_samples": 1, "experiment.scheduler": {"name": "fifo"},
        "train.epochs": 2, "train.scaling.num_workers": 1, "train.schedule": {"name": "constant", "warmup": "none"},
        "space.optim.base_lr": {"grid": [1.0e6, 0.05]}, "space.schedule": {"choice": [{"name": "constant"}]}})
    uri = sqlite_store(tmp_path / "mlflow.db")
    result = run_experiment(spec, storage=str(tmp_path / "r"), tracking_uri=uri, address=ray_cluster.address,
                            out=lambda line: None)
    by_lr = {r.params["optim.base_lr"]: r for r in result.rows}
    assert by_lr[1.0e6].status == "diverged" and by_lr[1.0e6].metric is None
    assert by_lr[0.05].status == "completed" and by_lr[0.05].metric > 0.8
    assert result.best is by_lr[0.05]
    assert result.rows[-1] is by_lr[1.0e6]                     # diverged trials sort last

    client = mlflow.MlflowClient(uri)
    run = client.get_run(by_lr[1.0e6].run_id)
    assert run.data.tags["schedtune.status"] == "diverged"
    assert float(run.data.tags["schedtune.diverged_lr"]) == pytest.approx(1.0e6 * 32 / 64)  # linear rule, ref 64
    assert 0 <= int(run.data.tags["schedtune.diverged_step"]) < 100
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["schedtune.best_run_id"] == by_lr[0.05].run_id


def test_a_worker_group_that_cannot_start_fails_its_trial_saying_what_is_missing(tmp_path, monkeypatch):
    """A 1-CPU cluster joined by address (so schedtune cannot rule the trial out up front, as it does
    for a local cluster): the trial's driver takes 0.25 CPU, its 2 workers x 0.5 CPU never fit."""
    from tuning.driver.cluster import LocalCluster
    from tuning.driver.experiment import run_experiment
    from tuning.spec import load_spec

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    spec = load_spec(ROOT / "search_spaces/quickstart.yaml", {
        "experiment.name": "it-nostart", "experiment.num_samples": 1, "experiment.scheduler": {"name": "fifo"},
        "train.epochs": 1, "train.scaling.num_workers": 2, "train.scaling.cpus_per_worker": 0.5})
    env = {"RAY_AUTH_MODE": "disabled", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "3"}
    with LocalCluster(num_cpus=1, env=env) as cluster:
        result = run_experiment(spec, storage=str(tmp_path / "r"), tracking_uri=sqlite_store(tmp_path / "mlflow.db"),
                                address=cluster.address, out=lambda line: None)
    [row] = result.rows
    assert row.status == "failed" and result.best is None
    assert row.error.startswith("WorkerGroupStartError: the trial's worker group could not start within 3 s")
    assert "2 workers x 0.5 CPU = 1 CPU at once" in row.error and "missing 0.25 CPU" in row.error


def _tune_cmd(ray_cluster, tmp_path, name, tracking_uri, *sets):
    import sys

    cmd = [sys.executable, "-m", "tuning.cli", "tune", str(ROOT / "search_spaces/quickstart.yaml"),
           "--address", ray_cluster.address, "--storage", str(tmp_path / "results"), "--tracking-uri", tracking_uri,
           "--name", name, "--set", "experiment.scheduler={name: fifo}",
           # epochs of a second or so, so a fault lands mid-run
           "--set", "train.data={name: synthetic, num_samples: 16000}", "--set", "train.model.hidden=[256, 256]"]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _val_steps(client, run_id):
    return sorted(m.step for m in client.get_metric_history(run_id, "val_acc"))


def _wait_for(predicate, timeout_s, proc, what):
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the experiment ended before {what}: {proc.stdout.read()[-3000:]}")
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _children(client, name):
    exp = client.get_experiment_by_name(name)
    return client.search_runs([exp.experiment_id], "tags.`schedtune.trial_id` != ''") if exp else []


def test_a_killed_train_worker_resumes_from_the_last_checkpoint(ray_cluster, tmp_path):
    """SIGKILL one worker of a 2-worker trial mid-run: Train restarts the group from the last
    checkpoint (FailureConfig), the trial completes, every epoch is reported once (none redone
    from scratch), and its MLflow run continues (no second run)."""
    import csv
    import os
    import signal
    import subprocess

    import mlflow
    from ray.util.state import list_actors

    epochs = 8
    uri = sqlite_store(tmp_path / "mlflow.db")
    proc = subprocess.Popen(_tune_cmd(ray_cluster, tmp_path, "it-kill-worker", uri, "experiment.num_samples=1",
                                      f"train.epochs={epochs}", "train.scaling.num_workers=2",
                                      "train.scaling.cpus_per_worker=0.5"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    client = mlflow.MlflowClient(uri)
    try:
        def two_epochs_logged():
            runs = _children(client, "it-kill-worker")
            return runs and len(_val_steps(client, runs[0].info.run_id)) >= 2
        # metrics reach MLflow in batches: by then the trial is a few epochs in, not at its end
        _wait_for(two_epochs_logged, 300, proc, "two epochs")
        workers = list_actors(address=ray_cluster.dashboard_url, filters=[("class_name", "=", "RayTrainWorker"),
                                                                           ("state", "=", "ALIVE")])
        assert len(workers) == 2
        os.kill(workers[0]["pid"], signal.SIGKILL)
        out = proc.communicate(timeout=400)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    (run,) = _children(client, "it-kill-worker")
    assert run.data.tags["schedtune.status"] == "completed"
    assert _val_steps(client, run.info.run_id) == list(range(1, epochs + 1))
    started = list_actors(address=ray_cluster.dashboard_url, filters=[("class_name", "=", "RayTrainWorker")],
                          limit=1000)
    assert len(started) >= 4                       # the group was started again after the kill
    (progress,) = (tmp_path / "results" / "it-kill-worker").glob("*/trial_fn_*/progress.csv")
    reported = [int(float(r["epoch"])) for r in csv.DictReader(progress.open())]
    assert reported == list(range(1, epochs + 1))  # resumed from the checkpoint, not from epoch 1


def test_mlflow_outage_mid_experiment_loses_nothing(ray_cluster, tmp_path):
    """Stop the tracking server mid-trial and bring it back: training goes on, the terminal says
    so, and every epoch's metrics reach MLflow once it is back."""
    import subprocess
    import time

    import mlflow

    from tests.conftest import MlflowServer
    from tuning.driver.cluster import free_ports

    epochs, port = 12, free_ports(1)[0]
    server = MlflowServer(tmp_path / "server", port).wait()
    proc = subprocess.Popen(_tune_cmd(ray_cluster, tmp_path, "it-outage", server.uri, "experiment.num_samples=2",
                                      f"train.epochs={epochs}", "train.scaling.num_workers=1",
                                      "experiment.max_concurrent_trials=1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    client = mlflow.MlflowClient(server.uri)
    try:
        _wait_for(lambda: any(len(_val_steps(client, r.info.run_id)) >= 1 for r in _children(client, "it-outage")),
                  300, proc, "the first epoch in MLflow")
        server.stop()
        time.sleep(8)                                 # a few epochs happen while it is down
        server = MlflowServer(tmp_path / "server", port).wait()
        out = proc.communicate(timeout=400)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
    assert proc.returncode == 0, out[-3000:]
    assert "training continues" in out
    client = mlflow.MlflowClient(server.uri)
    server = MlflowServer(tmp_path / "server", port).wait()
    try:
        runs = _children(client, "it-outage")
        assert len(runs) == 2
        for run in runs:
            assert run.data.tags["schedtune.status"] == "completed"
            assert _val_steps(client, run.info.run_id) == list(range(1, epochs + 1))
    finally:
        server.stop()
