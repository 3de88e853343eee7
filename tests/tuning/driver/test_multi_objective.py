"""Multi-objective search end to end: NSGA-II over accuracy and model size on the session's Ray
cluster, tracked in its `mlflow server`. The Pareto front is recomputed here from what MLflow
holds (each trial's objectives at its best epoch by val_acc) and must be exactly what the parent
run's files, the members' tags and `schedtune runs` say."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def pareto(ray_cluster, mlflow_server, tmp_path_factory):
    from tuning.driver.experiment import run_experiment
    from tuning.spec import load_spec

    spec = load_spec(ROOT / "search_spaces/multi_objective.yaml", {
        "experiment.name": "it-pareto", "experiment.num_samples": 6, "experiment.scheduler": {"name": "fifo"},
        "train.epochs": 2, "train.scaling.num_workers": 1, "train.scaling.cpus_per_worker": 1})
    lines: list[str] = []
    result = run_experiment(spec, storage=str(tmp_path_factory.mktemp("pareto")), tracking_uri=mlflow_server.uri,
                            address=ray_cluster.address, out=lines.append)
    return spec, result


def _points(client, children) -> dict[str, tuple[float, float]]:
    """trial id -> (val_acc, num_params) at its best epoch by val_acc, from the metric histories."""
    out = {}
    for run in children:
        acc = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_acc")}
        size = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "num_params")}
        best = max(acc, key=lambda e: (acc[e], -e))   # the first epoch at the best value
        out[run.data.tags["schedtune.trial_id"]] = (acc[best], size[best])
    return out


def test_the_front_is_the_trials_no_other_beats_on_both_objectives(pareto, mlflow_server):
    import mlflow

    from tuning.tracking import schema
    from tuning.tracking.reads import trial_runs

    spec, result = pareto
    client = mlflow.MlflowClient(mlflow_server.uri)
    parent, children = trial_runs("it-pareto", mlflow_server.uri)
    assert len(children) == 6 and all(r.data.tags[schema.STATUS] == "completed" for r in children)
    for run in children:   # num_params is the model's size: an MLP 64 -> h -> 10 has 75 h + 10 parameters
        hidden = json.loads(run.data.params["model.hidden"])
        if len(hidden) == 1:
            assert run.data.metrics["num_params"] == 75 * hidden[0] + 10
    points = _points(client, children)
    expected = {t for t, (a, n) in points.items()
                if not any(a2 >= a and n2 <= n and (a2 > a or n2 < n) for a2, n2 in points.values())}
    assert expected
    assert max(points, key=lambda t: (points[t][0], -points[t][1])) in expected      # the most accurate
    assert min(points, key=lambda t: (points[t][1], -points[t][0])) in expected      # the smallest
    tagged = {r.data.tags[schema.TRIAL_ID] for r in children if r.data.tags.get(schema.PARETO_FRONT) == "true"}
    assert tagged == expected
    assert {r.trial_id for r in result.rows if r.on_front} == expected
    for r in result.rows:
        assert r.objectives == {"val_acc": pytest.approx(points[r.trial_id][0]),
                                "num_params": pytest.approx(points[r.trial_id][1])}

    with tempfile.TemporaryDirectory() as tmp:
        front = json.loads(Path(client.download_artifacts(parent.info.run_id, schema.PARETO_JSON_ARTIFACT, tmp)).read_text())
        table = Path(client.download_artifacts(parent.info.run_id, schema.PARETO_ARTIFACT, tmp)).read_text()
        plot = Path(client.download_artifacts(parent.info.run_id, f"{schema.PLOTS_DIR}/{schema.PARETO_PLOT}", tmp))
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        results = Path(client.download_artifacts(parent.info.run_id, schema.RESULTS_ARTIFACT, tmp)).read_text()
    assert front["objectives"] == [{"name": "val_acc", "mode": "max"}, {"name": "num_params", "mode": "min"}]
    assert {t["trial_id"] for t in front["trials"] if t["on_front"]} == expected and len(front["trials"]) == 6
    assert all(f"| {t} |" in table for t in expected)
    assert f"{len(expected)} of 6 trials with every objective are on the Pareto front" in table
    assert "| num_params | front |" in results


def test_schedtune_runs_marks_the_front(pareto, mlflow_server):
    from tuning.cli.runs import print_runs
    from tuning.tracking import schema
    from tuning.tracking.reads import trial_runs

    _, children = trial_runs("it-pareto", mlflow_server.uri)
    expected = {r.data.tags[schema.TRIAL_ID] for r in children if r.data.tags.get(schema.PARETO_FRONT) == "true"}
    lines: list[str] = []
    assert print_runs("it-pareto", mlflow_server.uri, out=lines.append) == 0
    assert f"{len(expected)} on the Pareto front (*)" in lines[0] and "front" in lines[1]
    marked = {line.split()[0] for line in lines[2:] if line.split()[-2] == "*"}
    assert marked == expected
