"""backend: moved from the former test_tuning_units.py grab-bag."""
from __future__ import annotations


import pytest

from tests.conftest import ROOT
from tuning.tracking.backend import TrackingError, check_tracking, resolve_tracking_uri

QUICK = ROOT / "search_spaces/quickstart.yaml"
QUICK = ROOT / "search_spaces/quickstart.yaml"


def test_tracking_down_at_start_is_a_clear_error(tmp_path):
    from tuning.driver.cluster import free_ports

    uri = f"http://127.0.0.1:{free_ports(1)[0]}"
    with pytest.raises(TrackingError, match=f"cannot reach the MLflow tracking server at {uri}"):
        check_tracking(uri, timeout_s=2)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(TrackingError, match=f"{tmp_path}/a-file is not a writable directory"):
        check_tracking(f"sqlite:///{tmp_path}/a-file/sub/mlflow.db")
    check_tracking(f"sqlite:///{tmp_path}/mlflow.db")
    check_tracking(f"sqlite:///{tmp_path}/not/yet/mlflow.db")        # MLflow makes the directories
    assert not (tmp_path / "not").exists()                          # the check itself makes nothing


def test_default_tracking_uri_is_absolute_sqlite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert resolve_tracking_uri(None) == "http://mlflow:5000"


def test_a_sqlite_store_keeps_its_artifacts_beside_the_database(tmp_path, monkeypatch):
    """Not MLflow's default ./mlruns of whatever directory the command ran in."""
    import mlflow

    from tuning.tracking.backend import experiment_id

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
