"""`schedtune tune --resume-if-present` (what a retried RayJob runs) twice: with no run of the
experiment it starts one; after the tuning process is killed mid-experiment the same command resumes
that run (its results directory, its MLflow parent run) and finishes with everything a run that was
never interrupted has (one run per trial, the best run id, the registered model with its alias, the
results table, the plots); no trial is run twice. (Plain ``--resume``: tests/tuning/driver/
test_object_storage.py, on S3; with nothing to resume: tests/tuning/cli/test_resume_nothing.py.)"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, sqlite_store

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

NAME, EPOCHS = "it-resume", 8
# One sample of a 4-point LR grid, in this order, one trial at a time under ASHA (rungs at epochs 1
# and 3): the first trial completes, the two hopeless ones are stopped by ASHA at epoch 1, the last
# one runs on. The kill lands after at least one of each, before the end.
LRS = [0.05, 1.0e-6, 1.0e-6, 0.05]
SAMPLES = len(LRS)


def _cmd(ray_cluster, tmp_path, uri, *extra):
    return [sys.executable, "-m", "tuning.cli", "tune", str(ROOT / "search_spaces/quickstart.yaml"),
            "--address", ray_cluster.address, "--storage", str(tmp_path / "results"),
            "--tracking-uri", uri, "--name", NAME,
            "--num-samples", "1", "--workers", "1",
            "--set", f"train.epochs={EPOCHS}",
            "--set", "experiment.scheduler={name: asha, grace_period: 1, reduction_factor: 3}",
            "--set", "experiment.max_concurrent_trials=1",
            "--set", f"space.optim.base_lr={{grid: {LRS}}}",
            # big enough that a trial takes seconds: the kill lands between trials' ends
            "--set", "train.data={name: synthetic, num_samples: 20000}", "--set", "train.model.hidden=[512, 512]",
            *extra]


def _results_dir(out: str) -> str:
    found = re.search(rf"{NAME}: \d+ trials, \d+ at a time, results in (\S+),", out)
    assert found, out[-3000:]
    return found.group(1)


def _children(client):
    exp = client.get_experiment_by_name(NAME)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], "tags.`schedtune.trial_id` != ''")


def _ended(runs) -> dict[str, tuple[str, int]]:
    """trial id -> (status, end time) of the trials whose MLflow run has ended."""
    return {r.data.tags["schedtune.trial_id"]: (r.data.tags["schedtune.status"], r.info.end_time)
            for r in runs if r.data.tags.get("schedtune.status", "running") not in ("running", "")}


def test_resume_after_kill_completes_without_rerunning_and_asha_decisions_stand(ray_cluster, tmp_path):
    import mlflow

    uri = sqlite_store(tmp_path / "mlflow.db")
    client = mlflow.MlflowClient(uri)
    proc = subprocess.Popen(_cmd(ray_cluster, tmp_path, uri, "--resume-if-present"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=tmp_path, start_new_session=True)
    before: dict[str, tuple[str, int]] = {}
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            ended = _ended(_children(client))
            statuses = [status for status, _ in ended.values()]
            if "completed" in statuses and "stopped by ASHA at epoch 1" in statuses:
                before = ended
                break
            time.sleep(0.3)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)   # the driver's whole group, no cleanup: what a crash or OOM kill leaves
        out = proc.communicate(timeout=60)[0]
    assert before, f"no trial completed and none was stopped by ASHA before the deadline:\n{out[-3000:]}"
    assert len(before) < SAMPLES, "the experiment finished before it could be interrupted"
    started = _results_dir(out)                                # no run was present: one started
    assert started.startswith(f"{tmp_path / 'results'}/{NAME}/")

    p = subprocess.run(_cmd(ray_cluster, tmp_path, uri, "--resume-if-present"), capture_output=True, text=True,
                       cwd=tmp_path, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert _results_dir(p.stdout) == started                   # present now: the same run, continued
    table = [line for line in p.stdout.splitlines() if line.startswith("| ") and "_0000" in line]
    assert len(table) == SAMPLES, p.stdout

    runs = _children(client)
    assert len(runs) == SAMPLES                                # no MLflow run duplicated
    assert len({r.data.tags["schedtune.trial_id"] for r in runs}) == SAMPLES
    parents = client.search_runs([runs[0].info.experiment_id], "tags.`schedtune.role` = 'experiment'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    after = _ended(runs)
    assert len(after) == SAMPLES
    by_lr = sorted((float(r.data.params["optim.base_lr"]), after[r.data.tags["schedtune.trial_id"]][0])
                   for r in runs)
    assert by_lr == [(1e-6, "stopped by ASHA at epoch 1")] * 2 + [(0.05, "completed")] * 2
    for r in runs:
        trial = r.data.tags["schedtune.trial_id"]
        steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, "val_acc"))
        if trial in before:                                    # ended before the kill: not rerun, decision stands
            assert after[trial] == before[trial]
            status = before[trial][0]
            assert steps == list(range(1, (EPOCHS if status == "completed" else 1) + 1)), (status, steps)
        else:
            assert steps == sorted(set(steps)), steps           # a resumed trial logs no epoch twice

    # everything an uninterrupted run has (tests/tuning/driver/test_tune_integration.py), after the resume
    parent = parents[0]
    completed = [r for r in runs if after[r.data.tags["schedtune.trial_id"]][0] == "completed"]
    score = {r.info.run_id: max(m.value for m in client.get_metric_history(r.info.run_id, "val_acc"))
             for r in completed}
    best = next(r for r in runs if r.info.run_id == parent.data.tags["schedtune.best_run_id"])
    assert score[best.info.run_id] == max(score.values())      # the two lr=0.05 trials may tie
    assert parent.data.tags["schedtune.best_trial_id"] == best.data.tags["schedtune.trial_id"]
    (version,) = client.search_model_versions(f"name = '{NAME}'")
    assert version.run_id == best.info.run_id and parent.data.tags["schedtune.model_version"] == str(version.version)
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == str(version.version)
    assert f"Best trial {best.data.tags['schedtune.trial_id']}" in version.description
    assert f"registered model: {NAME} version {version.version} (alias champion)" in p.stdout
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"search_space.yaml", "results.md", "plots"}
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "plots")} == {
        "plots/hyperparameters.png", "plots/best_so_far.png"}
    with open(client.download_artifacts(parent.info.run_id, "results.md", str(tmp_path))) as f:
        results = f.read()
    assert all(r.data.tags["schedtune.trial_id"] in results for r in runs) and "| diagnosis |" in results
    for r in runs:
        assert {a.path for a in client.list_artifacts(r.info.run_id, "checkpoints")} == {
            "checkpoints/best", "checkpoints/last"}, r.data.tags["schedtune.trial_id"]
        assert "schedtune.diagnosis" in r.data.tags and "schedtune.lost_artifacts" not in r.data.tags
    assert {"schedtune.lost_metrics", "schedtune.lost_artifacts"}.isdisjoint(parent.data.tags)
