"""Integration: a real ASHA experiment of 2-worker Ray Train trials on a private local Ray
cluster, tracked in a real `mlflow server` process; then the MLflow UI in headless Chromium."""
from __future__ import annotations

import json
import time

import pytest

from tests.conftest import EPOCHS, NUM_SAMPLES
from tuning.analysis.diagnose import KINDS

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

ENDINGS = {"completed"} | {f"stopped by ASHA at epoch {e}" for e in range(1, EPOCHS)}


def test_every_trial_ends_and_asha_stops_some(experiment):
    spec, result, lines = experiment
    assert len(result.rows) == NUM_SAMPLES
    assert all(r.status in ENDINGS for r in result.rows), [r.status for r in result.rows]
    assert any(r.status.startswith("stopped by ASHA") for r in result.rows)
    assert sum(r.status == "completed" for r in result.rows) >= 1
    assert result.best is not None and result.best.metric > 0.5
    assert any("1 at a time" in line for line in lines)   # 2 CPUs: one 2-worker trial (1.25 CPU) fits
    assert any("done" in line and "best val_acc" in line for line in lines)  # live progress


def test_no_placement_group_left_behind(experiment, ray_cluster):
    import ray
    from ray.util import placement_group_table

    ray.init(address=ray_cluster.address, logging_level="ERROR")
    try:
        deadline = time.monotonic() + 60
        while True:
            live = [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]
            if not live or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert live == [], live
        assert ray.available_resources().get("CPU", 0) == pytest.approx(2.0)
    finally:
        ray.shutdown()


def test_trials_never_ran_beyond_the_limit(experiment):
    """Tune's own count of RUNNING trials (the progress lines) never exceeded the limit of 1:
    more trials at once would starve each other's worker groups on 2 CPUs."""
    import re

    spec, result, lines = experiment
    running = [int(m.group(1)) for line in lines if (m := re.search(r"\] (\d+) running", line))]
    assert running and max(running) == 1


def test_mlflow_layout(experiment, mlflow_server):
    import mlflow

    spec, result, _ = experiment
    client = mlflow.MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("it-asha")
    parent = client.get_run(result.parent_run_id)
    assert parent.info.experiment_id == exp.experiment_id and parent.info.status == "FINISHED"
    assert parent.data.tags["schedtune.role"] == "experiment"
    assert parent.data.tags["schedtune.best_trial_id"] == result.best.trial_id
    assert parent.data.metrics["best_val_acc"] == pytest.approx(result.best.metric)
    parent_files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"search_space.yaml", "results.md"} <= parent_files
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "plots")} == {
        "plots/hyperparameters.png", "plots/best_so_far.png"}     # metric vs each hyperparameter, best so far
    with open(client.download_artifacts(parent.info.run_id, "results.md")) as f:
        assert "| diagnosis |" in f.read()                          # the results table has the diagnosis column

    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == NUM_SAMPLES          # one run per trial, none duplicated
    for run in children:
        tags, params = run.data.tags, run.data.params
        end_epoch = int(tags["schedtune.end_epoch"])
        assert tags["schedtune.status"] in ENDINGS
        assert (tags["schedtune.status"] == "completed") == (end_epoch == EPOCHS)
        history = client.get_metric_history(run.info.run_id, "val_acc")
        assert sorted(m.step for m in history) == list(range(1, end_epoch + 1))
        for key in ("train_loss", "val_loss", "lr", "samples_per_s", "epoch_time_s", "grad_norm"):
            assert len(client.get_metric_history(run.info.run_id, key)) == end_epoch, key
        assert params["scaling.num_workers"] == "2" and "optim.base_lr" in params and "schedule.name" in params
        ckpts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
        assert ckpts == {"checkpoints/best", "checkpoints/last"}
        best_files = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run.info.run_id, "checkpoints/best")}
        assert best_files == {"checkpoint.pt", "meta.json", "trace.json"}
        # the learning-curve diagnosis and the per-run plots, made when the trial ended
        assert tags["schedtune.diagnosis"] in KINDS and isinstance(json.loads(tags["schedtune.diagnosis_evidence"]), dict)
        row = next(r for r in result.rows if r.trial_id == tags["schedtune.trial_id"])
        assert row.diagnosis == tags["schedtune.diagnosis"]
        assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {
            "plots/loss.png", "plots/accuracy.png", "plots/lr.png", "plots/update_ratio.png"}


def test_best_model_is_registered(experiment, mlflow_server):
    import mlflow

    spec, result, _ = experiment
    client = mlflow.MlflowClient(mlflow_server.uri)
    versions = client.search_model_versions("name = 'it-asha'")
    assert [v.version for v in versions] == [result.model_version]
    assert versions[0].run_id == result.best.run_id
    assert client.get_model_version_by_alias("it-asha", "champion").version in (result.model_version,
                                                                                int(result.model_version))
    mlflow.set_tracking_uri(mlflow_server.uri)
    model = mlflow.pyfunc.load_model(f"models:/it-asha/{result.model_version}")   # ONNX: raw inputs in
    import numpy as np

    out = model.predict(np.zeros((2, 1, 8, 8), np.float32))
    assert out["logits"].shape == (2, 10) and np.allclose(out["probabilities"].sum(axis=1), 1, atol=1e-5)
    local = mlflow.artifacts.download_artifacts(f"models:/it-asha/{result.model_version}")
    names = {line.split("==")[0].split(">")[0].split("<")[0] for line in open(f"{local}/requirements.txt").read().split()}
    assert {"onnx", "onnxruntime", "mlflow"} <= names and "schedtune" not in names, names   # serves without schedtune


def test_runs_command_lists_the_trials_from_mlflow(experiment, mlflow_server):
    from tuning.cli.runs import print_runs

    spec, result, _ = experiment
    lines = []
    assert print_runs("it-asha", mlflow_server.uri, out=lines.append) == 0
    assert f"{NUM_SAMPLES} trials" in lines[0]
    rows = lines[2:]
    assert [r.split()[0] for r in rows][0] == result.best.trial_id       # best first
    assert {r.split()[0] for r in rows} == {r.trial_id for r in result.rows}
    assert sum("stopped by ASHA" in r for r in rows) == sum(r.status.startswith("stopped") for r in result.rows)
