"""A multi-node Ray cluster on this machine, shared by the module: a head and three worker nodes of
1 CPU each, every node a ``ray start`` of its own (own raylet, object store, temp dir, ports). A
2-worker trial of 1 CPU per worker (plus its 0.25-CPU trial actor) cannot fit on one node, so its
worker group spans nodes. Asserted from Ray's state API: where every RayTrainWorker actor ran."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from tests.clusters import actors_by_group, multinode_cluster, node_states
from tests.conftest import ROOT, sqlite_store
from tests.tuning.driver.test_faults import _children, _tune_cmd, _val_steps, _wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

HEAD_CPUS, WORKER_CPUS = 1, [1, 1, 1]
WORKER_GROUP_AND_HELPERS = {"RayTrainWorker", "SynchronizationActor", "PlacementGroupCleaner", "TrainStateActor",
                            "_AutoscalingCoordinatorActor"}
TRAIN_STATE = {"RAY_TRAIN_ENABLE_STATE_TRACKING": "1"}   # Train's run records (placement strategy) in the dashboard


@pytest.fixture(scope="module")
def nodes():
    with multinode_cluster(HEAD_CPUS, WORKER_CPUS, env=TRAIN_STATE) as cluster:
        yield cluster


def test_placement_is_validated_and_reaches_train():
    from training.config import ConfigError, TrainConfig

    assert TrainConfig.from_dict({}).scaling.placement == "pack"
    with pytest.raises(ConfigError, match=r"scaling.placement: got 'strict_spread', expected one of 'pack', 'spread'"):
        TrainConfig.from_dict({"scaling": {"placement": "strict_spread"}})


def _train_runs(cluster) -> dict[str, dict]:
    """Train's records of its runs (run id -> run), from the head's dashboard; {} before the first
    (Train's state actor does not exist yet). Its first answer connects the dashboard to Ray: tens
    of seconds on a busy machine."""
    for attempt in range(3):
        try:
            with urllib.request.urlopen(f"{cluster.dashboard_url}/api/train/v2/runs/v1", timeout=60) as r:
                return {run["id"]: run for run in json.load(r)["train_runs"]}
        except urllib.error.HTTPError as e:
            if e.code == 500 and b"Train state data is not available" in e.read():
                return {}
            raise
        except TimeoutError:
            if attempt == 2:
                raise
    return {}


def test_every_trial_s_worker_group_spans_distinct_worker_nodes(nodes, tmp_path):
    from tuning.driver.experiment import run_experiment
    from tuning.spec import load_spec

    samples = 2
    spec = load_spec(ROOT / "search_spaces/quickstart.yaml", {
        "experiment.name": "it-multinode", "experiment.num_samples": samples, "experiment.scheduler": {"name": "fifo"},
        "train.epochs": 1, "train.scaling.num_workers": 2, "train.scaling.cpus_per_worker": 1.0,
        "train.scaling.placement": "spread"})
    before, runs_before = set(actors_by_group(nodes)), set(_train_runs(nodes))
    result = run_experiment(spec, storage=str(tmp_path / "r"), tracking_uri=sqlite_store(tmp_path / "mlflow.db"),
                            address=nodes.address, out=lambda line: None, register_model=False)
    assert [r.status for r in result.rows] == ["completed"] * samples, [r.error for r in result.rows]

    states = node_states(nodes)
    assert sum(not n["is_head_node"] for n in states.values()) >= 2
    groups = {g: actors for g, actors in actors_by_group(nodes).items() if g not in before}
    assert len(groups) == samples                          # one worker group per trial, none restarted
    for actors in groups.values():
        where = [a["node_id"] for a in actors]
        assert len(where) == 2 and len(set(where)) == 2    # the two workers on two distinct nodes
        assert all(states[n]["state"] == "ALIVE" for n in where)
    runs = [r for run_id, r in _train_runs(nodes).items() if run_id not in runs_before]
    assert len(runs) == samples, [r["name"] for r in runs]
    for run in runs:                                       # the knob reached Train: SPREAD, not the default PACK
        scaling = run["run_settings"]["scaling_config"]
        assert (scaling["placement_strategy"], scaling["num_workers"]) == ("SPREAD", 2), run["name"]


def test_a_lost_worker_node_costs_at_most_its_epoch_in_flight(nodes, tmp_path):
    """SIGKILL the raylet of a worker node that holds one of a 2-worker trial's workers (and none of
    Tune's or Train's driver actors) mid-run: Train starts the group again from the last checkpoint
    on the nodes that are left, every epoch is reported once (nothing redone but the epoch in flight),
    the trial keeps its one MLflow run and completes."""
    import mlflow
    from ray.util.state import list_actors

    epochs, name = 8, "it-node-loss"
    uri = sqlite_store(tmp_path / "mlflow.db")
    proc = subprocess.Popen(_tune_cmd(nodes, tmp_path, name, uri, "experiment.num_samples=1",
                                      f"train.epochs={epochs}", "train.scaling.num_workers=2",
                                      "train.scaling.cpus_per_worker=1.0", "train.scaling.placement=spread"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    client = mlflow.MlflowClient(uri)
    before = set(actors_by_group(nodes))
    try:
        def two_epochs_logged():
            runs = _children(client, name)
            return runs and len(_val_steps(client, runs[0].info.run_id)) >= 2
        _wait_for(two_epochs_logged, 300, proc, "two epochs in MLflow")
        alive = list_actors(address=nodes.dashboard_url, filters=[("state", "=", "ALIVE")], limit=10000)
        workers = {a["node_id"] for a in alive if a["class_name"] == "RayTrainWorker"}
        # Tune's trial actor and Train's controller; not the 0-CPU helpers Ray places anywhere (a
        # group's sync actor is started again with the group; the others are bookkeeping)
        drivers = {a["node_id"] for a in alive if a["class_name"] not in WORKER_GROUP_AND_HELPERS}
        victim = next((n for n in nodes.nodes if n.node_id in workers - drivers and n.proc is not None), None)
        assert victim is not None, [(a["class_name"], a["node_id"]) for a in alive]
        os.kill(victim.raylet_pid(), signal.SIGKILL)
        killed_at = time.monotonic()
        out = proc.communicate(timeout=400)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    print(f"node lost -> experiment done in {time.monotonic() - killed_at:.0f} s")

    states = node_states(nodes)
    assert states[victim.node_id]["state"] == "DEAD"
    groups = [g for g in actors_by_group(nodes).values() if g[0]["placement_group_id"] not in before]
    assert len(groups) == 2                                # the group, and its restart after the loss
    (lost,) = [g for g in groups if victim.node_id in {a["node_id"] for a in g}]
    (restart,) = [g for g in groups if g is not lost]
    restarted_on = {a["node_id"] for a in restart}
    assert len(restarted_on) == 2 and all(states[n]["state"] == "ALIVE" for n in restarted_on)

    (run,) = _children(client, name)                      # one MLflow run, continued
    assert run.data.tags["schedtune.status"] == "completed"
    assert _val_steps(client, run.info.run_id) == list(range(1, epochs + 1))
    (progress,) = (tmp_path / "results" / name).glob("*/trial_fn_*/progress.csv")
    reported = [int(float(r["epoch"])) for r in csv.DictReader(progress.open())]
    assert reported == list(range(1, epochs + 1))        # resumed from the last checkpoint, not from epoch 1
