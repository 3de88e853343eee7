"""Faults on a real local Ray cluster: a diverging trial."""
from __future__ import annotations

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]


def test_a_diverged_trial_is_tagged_and_never_best(ray_cluster, tmp_path):
    import mlflow

    from tuning.experiment import run_experiment
    from tuning.space import load_spec

    spec = load_spec(ROOT / "search_spaces/quickstart.yaml", {
        "experiment.name": "it-diverge", "experiment.num_samples": 1, "experiment.scheduler": {"name": "fifo"},
        "train.epochs": 2, "train.scaling.num_workers": 1, "train.schedule": {"name": "constant", "warmup": "none"},
        "space.optim.base_lr": {"grid": [1.0e6, 0.05]}, "space.schedule": {"choice": [{"name": "constant"}]}})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
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
