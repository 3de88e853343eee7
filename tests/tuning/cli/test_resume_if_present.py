"""``schedtune tune --resume-if-present`` (what a retried RayJob runs): with no run of the experiment
it starts one; after that run is killed mid-way it resumes it (same results directory, same MLflow
parent run, finished trials not rerun); ``--resume`` with nothing to resume is still exit 2."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT
from tuning import cli

NAME, SAMPLES, EPOCHS = "it-if-present", 3, 2


def _cmd(address: str, tmp_path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tuning.cli", "tune", str(ROOT / "search_spaces/quickstart.yaml"),
            "--address", address, "--storage", str(tmp_path / "results"),
            "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--name", NAME, "--num-samples", str(SAMPLES),
            "--workers", "1", "--set", f"train.epochs={EPOCHS}", "--set", "experiment.scheduler={name: fifo}",
            "--set", "experiment.max_concurrent_trials=1",
            # big enough that a trial takes seconds: the kill lands between the first trial's end and the last's
            "--set", "train.data={name: synthetic, num_samples: 20000}", "--set", "train.model.hidden=[512, 512]",
            *extra]


def _results_dir(out: str) -> str:
    found = re.search(rf"{NAME}: \d+ trials, \d+ at a time, results in (\S+),", out)
    assert found, out[-3000:]
    return found.group(1)


def test_resume_with_nothing_to_resume_exits_2_and_starts_nothing(tmp_path, capsys):
    code = cli.main(["tune", str(ROOT / "search_spaces/quickstart.yaml"), "--resume", "--name", NAME,
                     "--storage", str(tmp_path / "results"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
                     "--address", "127.0.0.1:9"])   # nothing listens there: never reached
    err = capsys.readouterr().err
    assert code == 2 and err == (f"schedtune tune: error: nothing to resume: no interrupted run of {NAME!r} under "
                                 f"{tmp_path / 'results'}/{NAME}\n"), err


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_if_present_starts_a_run_then_resumes_it_after_a_kill(ray_cluster, tmp_path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")

    def trial_runs():
        exp = client.get_experiment_by_name(NAME) if (tmp_path / "mlflow.db").exists() else None
        return client.search_runs([exp.experiment_id], "tags.`schedtune.trial_id` != ''") if exp else []

    # No run yet: --resume-if-present starts one. Killed once a trial has completed.
    proc = subprocess.Popen(_cmd(ray_cluster.address, tmp_path, "--resume-if-present"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    done_before: set[str] = set()
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline and proc.poll() is None and not done_before:
            done_before = {r.data.tags["schedtune.trial_id"] for r in trial_runs()
                           if r.data.tags.get("schedtune.status") == "completed"}
            time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        first = proc.communicate(timeout=60)[0]
    assert done_before and len(done_before) < SAMPLES, first[-3000:]
    started = _results_dir(first)
    assert started.startswith(f"{tmp_path / 'results'}/{NAME}/")

    # Present now: the same flag resumes that run.
    p = subprocess.run(_cmd(ray_cluster.address, tmp_path, "--resume-if-present"), capture_output=True, text=True,
                       cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert _results_dir(p.stdout) == started
    runs = trial_runs()
    assert len(runs) == SAMPLES and all(r.data.tags["schedtune.status"] == "completed" for r in runs)
    parents = client.search_runs([runs[0].info.experiment_id], "tags.`schedtune.role` = 'experiment'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    for r in runs:   # a trial that had completed is not rerun: every epoch logged once
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_acc")]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), (r.data.tags["schedtune.trial_id"], steps)
