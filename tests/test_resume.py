"""`schedtune tune --resume` after the tuning process is killed mid-experiment."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

NAME, SAMPLES, EPOCHS = "it-resume", 4, 8


def _cmd(ray_cluster, tmp_path, *extra):
    return [sys.executable, "-m", "tuning.cli", "tune", str(ROOT / "search_spaces/quickstart.yaml"),
            "--address", ray_cluster.address, "--storage", str(tmp_path / "results"),
            "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--name", NAME,
            "--num-samples", str(SAMPLES), "--workers", "1",
            "--set", f"train.epochs={EPOCHS}", "--set", "experiment.scheduler={name: fifo}",
            "--set", "experiment.max_concurrent_trials=1",
            # big enough that a trial takes seconds: the kill lands between trials' ends
            "--set", "train.data={name: synthetic, num_samples: 20000}", "--set", "train.model.hidden=[512, 512]",
            *extra]


def _children(client):
    exp = client.get_experiment_by_name(NAME)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], "tags.`schedtune.trial_id` != ''")


def test_resume_after_kill_completes_without_rerunning(ray_cluster, tmp_path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    proc = subprocess.Popen(_cmd(ray_cluster, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=tmp_path)
    done_before: dict[str, int] = {}
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            runs = _children(client) if (tmp_path / "mlflow.db").exists() else []
            done = [r for r in runs if r.data.tags.get("schedtune.status") == "completed"]
            if done:
                done_before = {r.data.tags["schedtune.trial_id"]: r.info.end_time for r in done}
                break
            time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)   # no cleanup at all: what a crash or OOM kill leaves
        out = proc.communicate(timeout=60)[0]
    assert done_before, f"no trial completed before the deadline:\n{out[-3000:]}"
    assert len(done_before) < SAMPLES, "the experiment finished before it could be interrupted"

    p = subprocess.run(_cmd(ray_cluster, tmp_path, "--resume"), capture_output=True, text=True, cwd=tmp_path,
                       timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    table = [line for line in p.stdout.splitlines() if line.startswith("| ") and "_0000" in line]
    assert len(table) == SAMPLES and all("| completed |" in line for line in table), p.stdout

    runs = _children(client)
    assert len(runs) == SAMPLES                                # no MLflow run duplicated
    assert len({r.data.tags["schedtune.trial_id"] for r in runs}) == SAMPLES
    parents = client.search_runs([runs[0].info.experiment_id], "tags.`schedtune.role` = 'experiment'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    for r in runs:
        trial = r.data.tags["schedtune.trial_id"]
        assert r.data.tags["schedtune.status"] == "completed"
        if trial in done_before:                               # finished trials were not rerun
            assert r.info.end_time == done_before[trial]
            steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_acc")]
            assert sorted(steps) == list(range(1, EPOCHS + 1))
