"""System metrics of a trial's nodes in its MLflow child run (tuning.tracking.system_metrics): the
interval and the GPUs chosen, one sampler per node; a sampler against a real sqlite store through a
failing stretch; then real experiments: a 1-worker trial, and a 2-worker trial across two Ray nodes
whose every node's metrics appear under its own name."""
from __future__ import annotations

import time

import pytest

from tests.conftest import sqlite_store
from tuning.tracking import schema
from tuning.tracking.system_metrics import (DEFAULT_INTERVAL_S, INTERVAL_ENV, NodeSampler, Target, node_roles,
                                            only_gpus, reachable, target, visible_gpus)

CPU, MEM_MB, MEM_PCT = "cpu_utilization_percentage", "system_memory_usage_megabytes", "system_memory_usage_percentage"


def test_the_interval_comes_from_the_driver_environment():
    assert target("sqlite:///x.db", "e", "/r", {}).interval_s == DEFAULT_INTERVAL_S == 10.0
    t = target("sqlite:///x.db", "e", "/r", {INTERVAL_ENV: " 2.5 "})
    assert (t.interval_s, t.tracking_uri, t.experiment, t.run_dir, t.trial_id, t.node) == (2.5, "sqlite:///x.db", "e",
                                                                                          "/r", None, None)
    assert target("sqlite:///x.db", "e", "/r", {INTERVAL_ENV: "0"}) is None          # off
    for bad in ("ten", "-1", "inf", "nan"):
        with pytest.raises(ValueError, match=rf"{INTERVAL_ENV}: got '{bad}', expected seconds between samples"):
            target("sqlite:///x.db", "e", "/r", {INTERVAL_ENV: bad})
    on = t.for_trial("abc_00001").on_node("node_1", "10.0.0.2, Ray node ff")
    assert (on.trial_id, on.node, on.where, on.prefix) == ("abc_00001", "node_1", "10.0.0.2, Ray node ff",
                                                           "system/node_1/")
    assert t.prefix == "system/"
    assert schema.system_metrics_node_tag(None) == "schedtune.system_metrics.node"
    assert schema.system_metrics_node_tag("node_1") == "schedtune.system_metrics.node_1"


def test_one_sampler_per_node_the_lowest_rank_on_it():
    # ranks 0..5 on nodes a b a c b c: ranks 0, 1 and 3 sample, numbering the nodes by their first rank
    assert node_roles(["a", "b", "a", "c", "b", "c"]) == {0: "node_0", 1: "node_1", 3: "node_2"}
    assert node_roles(["a", "a"]) == {0: "node_0"}
    assert node_roles(["b", "a"]) == {0: "node_0", 1: "node_1"}


def test_only_the_trials_gpus_are_kept():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "1,3"}) == {1, 3}
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == set()          # Ray: a process given no GPU
    assert visible_gpus({}) is None                                     # not set: the node's
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-5d3c,GPU-77aa"}) is None   # UUIDs: not NVML indices
    sample = {CPU: 50.0, "gpu_0_utilization_percentage": 90.0, "gpu_1_utilization_percentage": 80.0,
              "gpu_1_memory_usage_megabytes": 1e4, "gpu_12_utilization_percentage": 70.0}
    assert only_gpus(sample, {1}) == {CPU: 50.0, "gpu_1_utilization_percentage": 80.0,
                                      "gpu_1_memory_usage_megabytes": 1e4}
    assert only_gpus(sample, set()) == {CPU: 50.0} and only_gpus(sample, None) == sample


def test_a_node_only_logs_to_a_store_it_can_reach(tmp_path):
    db = tmp_path / "mlflow.db"
    assert not reachable(f"sqlite:///{db}")       # another machine's file: a store of its own here, seen by nobody
    db.write_bytes(b"")
    assert reachable(f"sqlite:///{db}") and reachable("http://mlflow:5000") and reachable("databricks://x")


def _store(tmp_path):
    import mlflow

    uri = sqlite_store(tmp_path / "mlflow.db")
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("sysm", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(exp, tags={schema.RUN_DIR: "/results/sysm/1"}).info.run_id
    return uri, client, exp, parent


def _in_range(client, run_id: str, prefix: str) -> list:
    """The run's CPU samples, after checking every CPU and memory value is a plausible reading."""
    import psutil

    total_mb = psutil.virtual_memory().total / 1e6
    cpu = client.get_metric_history(run_id, prefix + CPU)
    for key, low, high in ((CPU, 0, 100), (MEM_PCT, 0, 100), (MEM_MB, 1, total_mb)):
        values = client.get_metric_history(run_id, prefix + key)
        assert len(values) == len(cpu) and all(low <= m.value <= high for m in values), (key, values)
    steps = [m.step for m in cpu]
    assert steps == sorted(steps) and steps[0] >= 0          # seconds since the run started
    return cpu


def test_a_sampler_finds_a_run_made_after_it_started_and_keeps_samples_through_failures(tmp_path, monkeypatch,
                                                                                       capsys):
    """The driver makes the trial's run when Tune starts the trial, so the trial may look for it
    first; sends that fail (a tracking server gone for a while) leave their samples for the next."""
    import mlflow

    uri, client, exp, parent = _store(tmp_path)
    real, calls = mlflow.MlflowClient.log_batch, []

    def flaky(self, run_id, *a, **kw):
        calls.append(len(kw.get("metrics") or []))
        if 2 <= len(calls) <= 3:          # the node tag goes, then two sends fail
            raise ConnectionError("tracking server unreachable")
        return real(self, run_id, *a, **kw)

    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", flaky)
    sampler = NodeSampler(Target(uri, "sysm", "/results/sysm/1", 0.3, "abc_00000", "node_1", "10.0.0.2, Ray node ff"))
    sampler.start()
    time.sleep(1.0)                        # the sampler looks, finds nothing, waits
    child = client.create_run(exp, tags={schema.PARENT_RUN_ID: parent, schema.TRIAL_ID: "abc_00000"}).info.run_id
    deadline = time.monotonic() + 60
    while len([c for c in calls if c]) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    sampler.stop()
    assert not sampler.is_alive()
    run = client.get_run(child)
    assert run.data.tags["schedtune.system_metrics.node_1"] == "10.0.0.2, Ray node ff"
    cpu = _in_range(client, child, "system/node_1/")
    assert len(cpu) >= 4 and sampler.sent == 3 * len(cpu)          # every sample in, the failed ones included
    assert [c for c in calls if c][:3] == [3, 6, 9]                 # a failed send's samples go with the next
    assert not any(k.startswith("system/cpu") for k in run.data.metrics)   # only under the node's name
    assert client.get_run(parent).data.metrics == {}
    err = capsys.readouterr().err
    assert err.count("could not send system metrics") == 1 and "training continues" in err


# ----------------------------------------------------------------------------- real experiments

def _experiment(tmp_path, monkeypatch, address: str, uri: str, name: str, updates: dict):
    from tests.conftest import ROOT
    from tuning.driver.experiment import run_experiment
    from tuning.spec import load_spec

    monkeypatch.setenv(INTERVAL_ENV, "0.5")     # read by the driver, handed to the trials
    spec = load_spec(ROOT / "search_spaces/quickstart.yaml", {
        "experiment.name": name, "experiment.num_samples": 1, "experiment.scheduler": {"name": "fifo"},
        "train.epochs": 3, "train.model.hidden": [512], **updates})
    result = run_experiment(spec, storage=str(tmp_path / "r"), tracking_uri=uri, address=address,
                            out=lambda line: None, register_model=False)
    assert [r.status for r in result.rows] == ["completed"], [r.error for r in result.rows]
    import mlflow

    client = mlflow.MlflowClient(uri)
    return client, client.get_run(result.rows[0].run_id), result


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_a_one_worker_trial_has_its_nodes_system_metrics(ray_cluster, tmp_path, monkeypatch):
    """The embedded default: a sqlite store the trial's process writes into beside the driver."""
    client, run, result = _experiment(tmp_path, monkeypatch, ray_cluster.address, sqlite_store(tmp_path / "mlflow.db"),
                                      "it-sysm-1", {"train.scaling.num_workers": 1,
                                                    "train.scaling.cpus_per_worker": 1.0})
    cpu = _in_range(client, run.info.run_id, "system/")
    assert len(cpu) >= 2, cpu
    assert 0 <= result.rows[0].data_wait < 1            # the results table's figure, from the trial's history
    assert "Ray node" in run.data.tags["schedtune.system_metrics.node"]
    assert not any(k.startswith("system/node_") for k in run.data.metrics)
    parent = client.get_run(result.parent_run_id)
    assert not any(k.startswith("system/") for k in parent.data.metrics)   # never sampled by the driver


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_two_worker_trial_across_two_nodes_has_each_nodes_metrics(mlflow_server, tmp_path, monkeypatch):
    """Two Ray nodes (a head of 1 CPU and a node of 1): the trial's actor (0.25 CPU) and two workers
    of 0.5 CPU cannot share one, so each node runs a worker and samples itself, under its own name."""
    from tests.clusters import multinode_cluster

    with multinode_cluster(1, [1]) as nodes:
        client, run, _ = _experiment(tmp_path, monkeypatch, nodes.address, mlflow_server.uri, "it-sysm-2", {
            "train.scaling.num_workers": 2, "train.scaling.cpus_per_worker": 0.5, "train.scaling.placement": "spread"})
    where = {k: run.data.tags[schema.system_metrics_node_tag(k)] for k in ("node_0", "node_1")}
    assert where["node_0"] != where["node_1"] and all("Ray node" in w for w in where.values())
    for node in ("node_0", "node_1"):
        assert len(_in_range(client, run.info.run_id, f"system/{node}/")) >= 1, node
    assert not any(k.startswith(("system/cpu", "system/node_2")) for k in run.data.metrics)
