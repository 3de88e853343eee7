"""MLflow as deploy/ runs it: ``mlflow server`` on a PostgreSQL backend store (initdb in a temp dir,
a port of its own, stopped by PID) with its artifacts proxied to S3 (moto's server). An experiment
tracked end to end, then one whose tracking server is restarted mid-experiment (the tracker's outage
buffer against the real thing). What MLflow stored is read back from PostgreSQL and S3 themselves."""
from __future__ import annotations

import subprocess
import time

import pytest

from tests.clusters import MlflowOnPostgres, fresh_dir, local_postgres, postgres_uri, running_s3
from tests.conftest import ROOT
from tuning.driver.cluster import free_ports
from tuning.tracking import schema

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

BUCKET = "mlflow-artifacts"


@pytest.fixture(scope="module")
def postgres():
    server = local_postgres()
    if server is None:
        pytest.skip("no PostgreSQL server binaries (initdb, postgres, psql): apt-get install postgresql")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def s3():
    with running_s3(BUCKET) as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def tracking(postgres, s3):
    server = MlflowOnPostgres(fresh_dir("st-mlflow-"), free_ports(1)[0], postgres_uri(postgres),
                              f"s3://{BUCKET}/mlflow").wait()
    yield server
    server.stop()


def parent_path(keys: list[str], run_id: str) -> str:
    """Where under the artifact root a run's artifacts are (``<experiment id>/<run id>/artifacts``)."""
    (path,) = {k.split(f"/{run_id}/artifacts/")[0] for k in keys if f"/{run_id}/artifacts/" in k}
    return f"{path.split('mlflow/', 1)[1]}/{run_id}/artifacts"


def _rows(postgres, sql: str) -> list[list[str]]:
    out = postgres.psql("mlflow", sql)
    return [line.split("|") for line in out.splitlines() if line]


def _val_acc_steps(postgres, experiment: str) -> dict[str, list[int]]:
    """trial id -> the val_acc steps PostgreSQL holds for its run (every value, duplicates included)."""
    rows = _rows(postgres, f"""
        SELECT t.value, m.step FROM metrics m
        JOIN runs r ON r.run_uuid = m.run_uuid JOIN experiments e ON e.experiment_id = r.experiment_id
        JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'schedtune.trial_id'
        WHERE e.name = '{experiment}' AND m.key = 'val_acc' ORDER BY t.value, m.step;""")
    steps: dict[str, list[int]] = {}
    for trial, step in rows:
        steps.setdefault(trial, []).append(int(step))
    return steps


def test_an_experiment_is_tracked_on_postgres_with_artifacts_on_s3(ray_cluster, tracking, postgres, s3, tmp_path):
    import mlflow

    from tuning.driver.experiment import run_experiment
    from tuning.spec import load_spec

    name, samples, epochs = "it-postgres", 2, 2
    spec = load_spec(ROOT / "search_spaces/quickstart.yaml", {
        "experiment.name": name, "experiment.num_samples": samples, "experiment.scheduler": {"name": "fifo"},
        "train.epochs": epochs, "train.scaling.num_workers": 1, "train.scaling.cpus_per_worker": 1.0})
    result = run_experiment(spec, storage=str(tmp_path / "r"), tracking_uri=tracking.uri, address=ray_cluster.address,
                            out=lambda line: None)
    assert [r.status for r in result.rows] == ["completed"] * samples
    assert result.model_version == "1" and result.lost_metrics == 0

    # PostgreSQL holds the runs, every epoch's metrics, the best trial and the model version.
    assert _val_acc_steps(postgres, name) == {r.trial_id: list(range(1, epochs + 1)) for r in result.rows}
    [[best_run]] = _rows(postgres, f"SELECT value FROM tags WHERE run_uuid = '{result.parent_run_id}' "
                                   "AND key = 'schedtune.best_run_id';")
    assert best_run == result.best.run_id
    [[model, version, source]] = _rows(postgres, "SELECT name, version, source FROM model_versions;")
    assert (model, version) == (name, "1")

    # S3 holds the artifacts: the search-space file and results table of the parent run, each trial's
    # checkpoints, the registered model.
    keys = s3.keys(BUCKET, "mlflow/")
    client = mlflow.MlflowClient(tracking.uri)
    parent = client.get_run(result.parent_run_id).info.artifact_uri
    assert parent.startswith("mlflow-artifacts:")              # proxied by the server, stored on S3
    for row in result.rows:
        run_keys = [k for k in keys if f"/{row.run_id}/artifacts/checkpoints/" in k]
        assert {k.split("/checkpoints/")[1].split("/")[0] for k in run_keys} == {"best", "last"}
        assert any(k.endswith("best/checkpoint.pt") for k in run_keys)
    for artifact in (schema.SEARCH_SPACE_ARTIFACT, schema.RESULTS_ARTIFACT):
        assert f"mlflow/{parent_path(keys, result.parent_run_id)}/{artifact}" in keys
    model_files = [k for k in keys if k.endswith("/MLmodel")]
    assert model_files, "the registered model's files are not on S3"
    assert client.get_model_version(name, "1").source == source


def test_a_restarted_tracking_server_loses_nothing(ray_cluster, tracking, postgres, s3, tmp_path):
    """Restart the PostgreSQL-backed server while trials train: training goes on, the terminal says
    so, and once it is back every epoch of every trial is in PostgreSQL exactly once, every run ended
    with its checkpoints on S3."""
    import mlflow

    from tests.tuning.driver.test_faults import _children, _tune_cmd, _val_steps, _wait_for

    name, epochs = "it-postgres-restart", 6
    proc = subprocess.Popen(_tune_cmd(ray_cluster, tmp_path, name, tracking.uri, "experiment.num_samples=2",
                                      f"train.epochs={epochs}", "train.scaling.num_workers=1",
                                      "experiment.max_concurrent_trials=1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    client = mlflow.MlflowClient(tracking.uri)
    try:
        _wait_for(lambda: any(len(_val_steps(client, r.info.run_id)) >= 1 for r in _children(client, name)),
                  300, proc, "the first epoch in MLflow")
        tracking.restart()       # down for its stop and start: ~10 s, several epochs
        restarted_at = time.monotonic()
        out = proc.communicate(timeout=400)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "training continues" in out and "reachable again" in out
    print(f"experiment ended {time.monotonic() - restarted_at:.0f} s after the restart")

    runs = _children(client, name)
    assert len(runs) == 2
    assert {r.data.tags["schedtune.status"] for r in runs} == {"completed"}
    steps = _val_acc_steps(postgres, name)
    assert steps == {r.data.tags["schedtune.trial_id"]: list(range(1, epochs + 1)) for r in runs}
    parent = client.get_run(runs[0].data.tags["mlflow.parentRunId"])
    assert schema.LOST_METRICS not in parent.data.tags and parent.info.status == "FINISHED"
    keys = s3.keys(BUCKET, "mlflow/")
    for run in runs:
        assert any(f"/{run.info.run_id}/artifacts/checkpoints/last/" in k for k in keys)
