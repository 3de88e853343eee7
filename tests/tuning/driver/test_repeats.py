"""Noise-aware search end to end: every sampled config trained with 3 seeds on the session's Ray
cluster; configs ranked by the mean of their repeats (the numbers recomputed from MLflow), the
spread in the final table, the registered model the best repeat of the best config."""
from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def repeated(ray_cluster, mlflow_server, tmp_path_factory):
    from tuning.driver.experiment import run_experiment
    from tuning.spec import load_spec

    spec = load_spec(ROOT / "search_spaces/noise_aware.yaml", {
        "experiment.name": "it-repeats", "experiment.num_samples": 2, "train.epochs": 2, "train.seed": 5,
        "train.scaling.num_workers": 1, "train.scaling.cpus_per_worker": 1})
    result = run_experiment(spec, storage=str(tmp_path_factory.mktemp("repeats")), tracking_uri=mlflow_server.uri,
                            address=ray_cluster.address, out=lambda line: None)
    return spec, result


def test_each_config_trains_with_three_seeds_and_configs_rank_by_their_mean(repeated, mlflow_server):
    import mlflow

    from tuning.tracking import schema
    from tuning.tracking.reads import trial_runs

    spec, result = repeated
    client = mlflow.MlflowClient(mlflow_server.uri)
    parent, children = trial_runs("it-repeats", mlflow_server.uri)
    assert len(children) == 6
    groups: dict[tuple, list] = {}
    for run in children:
        p = run.data.params
        groups.setdefault((p["optim.base_lr"], p["optim.weight_decay"]), []).append(run)
    assert len(groups) == 2
    for runs in groups.values():   # the same values, seeds train.seed + 0, 1, 2, and the seeds change the run
        assert sorted(int(r.data.params["seed"]) for r in runs) == [5, 6, 7]
        losses = {tuple(m.value for m in client.get_metric_history(r.info.run_id, "train_loss")) for r in runs}
        assert len(losses) == 3
    means = {key: statistics.mean(r.data.metrics["best_val_acc"] for r in runs) for key, runs in groups.items()}
    stdevs = {key: statistics.stdev(r.data.metrics["best_val_acc"] for r in runs) for key, runs in groups.items()}
    run_group = {r.info.run_id: key for key, runs in groups.items() for r in runs}

    rows = result.rows
    order = [run_group[r.run_id] for r in rows]
    assert order[:3] == [order[0]] * 3 and order[3:] == [order[3]] * 3   # a config's repeats together
    assert means[order[0]] >= means[order[3]]                             # best mean first
    for r in rows:
        mean, std, n = r.group
        assert (mean, std, n) == (pytest.approx(means[run_group[r.run_id]]), pytest.approx(stdevs[run_group[r.run_id]]), 3)
        assert spec.base.seed + r.repeat == int(client.get_run(r.run_id).data.params["seed"])
    first = rows[:3]
    assert [r.metric for r in first] == sorted((r.metric for r in first), reverse=True)
    assert result.best is rows[0]                                          # the best repeat of the best config
    assert parent.data.tags[schema.BEST_RUN_ID] == rows[0].run_id
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(client.download_artifacts(parent.info.run_id, schema.RESULTS_ARTIFACT, tmp)).read_text()
    assert "| seed | mean val_acc ± std (n) |" in table
    m, s, _ = rows[0].group
    assert table.count(f"| {m:.4f} ± {s:.4f} (3) |") == 3
