"""Results, checkpoints and pretrained weights on an S3-compatible endpoint (moto's server, started
here on a port of its own; tests/clusters.py), reached the way a user's cluster reaches S3: the AWS
environment variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) on every Ray node and on the
driver, and ``--storage s3://bucket/prefix``. Nothing of the experiment is written to local disk."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.clusters import RAY_OFF, running_s3
from tests.conftest import ROOT, sqlite_store
from tuning.driver.cluster import LocalCluster

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

BUCKET, NAME, EPOCHS = "schedtune", "it-s3", 3
WEIGHTS = f"s3://{BUCKET}/weights/digits-mlp.pt"


@pytest.fixture(scope="module")
def s3():
    with running_s3(BUCKET) as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def s3_cluster(s3):
    """A private 2-CPU Ray cluster whose processes have the AWS environment (as a cluster's nodes
    have their credentials): Tune's trial actors and Train's workers write to S3 themselves."""
    with LocalCluster(num_cpus=2, env=RAY_OFF) as cluster:
        yield cluster


def test_s3_storage_is_probed_before_ray_starts(s3):
    from tuning.driver.storage import PROBE, StorageError, latest_run_dir, resolve_storage

    assert resolve_storage(f"s3://{BUCKET}/probe/") == f"s3://{BUCKET}/probe"
    assert not [k for k in s3.keys(BUCKET, "probe/") if k.endswith(PROBE)]     # written, then deleted
    missing = r"results storage s3://no-such-bucket/x is not writable \(Bucket 'no-such-bucket' not found"
    with pytest.raises(StorageError, match=missing):
        resolve_storage("s3://no-such-bucket/x")
    assert latest_run_dir(f"s3://{BUCKET}/probe", "nothing") is None


def _spec_file(tmp_path) -> str:
    """Two trials, one at a time: a 2-worker Train run (its workers upload checkpoints) and a 1-worker
    one (its Tune trial uploads them); both a linear probe on pretrained weights read from S3."""
    doc = yaml.safe_load((ROOT / "search_spaces/quickstart.yaml").read_text())
    doc["experiment"].update({"name": NAME, "num_samples": 1, "scheduler": {"name": "fifo"},
                              "max_concurrent_trials": 1})
    doc["train"].update({"epochs": EPOCHS, "schedule": {"name": "constant"}})
    doc["train"]["model"].update({"pretrained": WEIGHTS, "transfer": "linear_probe"})
    doc["train"]["optim"]["base_lr"] = 0.05
    doc["space"] = {"scaling.num_workers": {"grid": [2, 1]}}
    path = tmp_path / "s3.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


def _put_pretrained_weights(s3) -> dict:
    """A digits MLP's state_dict (seeded, untrained) uploaded to WEIGHTS; returns it."""
    import io

    import torch

    from training.config import TrainConfig
    from training.data import load_data
    from training.models import build_model

    cfg = TrainConfig.from_dict({"data": {"name": "digits", "val_fraction": 0.2, "seed": 0},
                                 "model": {"name": "mlp", "hidden": [128]}})
    data = load_data(cfg.data)
    torch.manual_seed(1234)
    state = build_model(cfg.model, data.num_classes, data.input_shape).state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    s3.client().put_object(Bucket=BUCKET, Key=WEIGHTS.split(f"{BUCKET}/", 1)[1], Body=buf.getvalue())
    return state


def _cmd(cluster, spec_file, uri, *extra):
    return [sys.executable, "-m", "tuning.cli", "tune", spec_file, "--address", cluster.address,
            "--storage", f"s3://{BUCKET}/results", "--tracking-uri", uri, *extra]


def _trial_runs(client):
    exp = client.get_experiment_by_name(NAME)
    return client.search_runs([exp.experiment_id], "tags.`schedtune.trial_id` != ''") if exp else []


def _run_or_explain(cmd, cluster, cwd, timeout_s: float) -> subprocess.CompletedProcess:
    """``cmd`` to its end; past ``timeout_s``, a failure that says what the cluster held then (its
    actors, placement groups and tasks) beside the command's output, so a hang can be told from slowness."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        from tests.clusters import cluster_snapshot

        out = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        pytest.fail(f"{cmd[3:5]} did not end within {timeout_s:g} s; its output:\n{out[-3000:]}\n"
                    f"the cluster then:\n{cluster_snapshot(cluster)}")


def test_experiment_on_s3_is_killed_and_resumed_from_it(s3, s3_cluster, tmp_path):
    import mlflow
    import pyarrow.fs as pafs
    import torch

    from training import checkpoint as ckpt

    pretrained = _put_pretrained_weights(s3)
    spec_file, uri = _spec_file(tmp_path), sqlite_store(tmp_path / "mlflow.db")
    client = mlflow.MlflowClient(uri)
    proc = subprocess.Popen(_cmd(s3_cluster, spec_file, uri), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=tmp_path)
    interrupted = False
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            runs = _trial_runs(client)
            status = sorted(r.data.tags.get("schedtune.status", "") for r in runs)
            # The first trial is done and the second has trained an epoch (so Tune's experiment state,
            # saved every >= 10 s, has the first one's end, and the second resumes from a checkpoint).
            if status == ["completed", "running"] and client.get_metric_history(
                    next(r for r in runs if r.data.tags["schedtune.status"] == "running").info.run_id, "val_acc"):
                interrupted = True
                break
            time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        out = proc.communicate(timeout=60)[0]
    assert interrupted, f"not interrupted between the trials:\n{out[-3000:]}"

    keys = s3.keys(BUCKET, f"results/{NAME}/")
    (run_dir,) = {k.split("/")[2] for k in keys} - {""}           # ("results/it-s3/": pyarrow's directory marker)
    assert f"results/{NAME}/{run_dir}/tuner.pkl" in keys          # restorable from S3 alone
    assert not (tmp_path / "schedtune_results").exists()

    p = _run_or_explain(_cmd(s3_cluster, spec_file, uri, "--resume"), s3_cluster, tmp_path, timeout_s=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"results in s3://{BUCKET}/results/{NAME}/{run_dir}" in p.stdout   # the same run, continued

    runs = _trial_runs(client)
    assert len(runs) == 2 and {r.data.tags["schedtune.status"] for r in runs} == {"completed"}
    by_workers = {int(r.data.params["scaling.num_workers"]): r for r in runs}
    assert set(by_workers) == {1, 2}
    for run in runs:
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_acc"))
        assert steps == list(range(1, EPOCHS + 1))                # every epoch once, across the kill

    # Checkpoints on S3: the 2-worker trial's from Train's workers, the 1-worker trial's from Tune.
    keys = s3.keys(BUCKET, f"results/{NAME}/{run_dir}/")
    two, one = (by_workers[n].data.tags["schedtune.trial_id"] for n in (2, 1))
    train_ckpts = sorted(k for k in keys if f"/train/train-{two}/" in k and k.endswith("/checkpoint.pt"))
    tune_ckpts = sorted(k for k in keys if f"_{one}_" in k and k.endswith("/checkpoint.pt"))
    assert train_ckpts and tune_ckpts, keys

    # The pretrained weights were read from S3: a linear probe leaves the backbone as the file had it.
    fs = pafs.S3FileSystem(endpoint_override=s3.url, access_key=s3.env["AWS_ACCESS_KEY_ID"],
                           secret_key=s3.env["AWS_SECRET_ACCESS_KEY"], region="us-east-1")
    for i, key in enumerate((train_ckpts[-1], tune_ckpts[-1])):
        local = tmp_path / "ckpt" / str(i)
        local.mkdir(parents=True)
        pafs.copy_files(f"{BUCKET}/{key.rsplit('/', 1)[0]}", str(local), source_filesystem=fs)
        model = ckpt.load(local)["model"]
        backbone = [k for k in pretrained if not k.startswith("head.")]
        assert backbone and all(torch.equal(model[k], pretrained[k]) for k in backbone), key
        assert not torch.equal(model["head.weight"], pretrained["head.weight"])   # the head trained

    for workers in (2, 1):   # the tracker found each trial's checkpoints on S3 and logged the best and the last
        logged = {a.path for a in client.list_artifacts(by_workers[workers].info.run_id, "checkpoints")}
        assert logged == {"checkpoints/best", "checkpoints/last"}, (f"the {workers}-worker trial",
                                                                by_workers[workers].data.tags, p.stdout[-2000:])


def test_ray_data_streams_a_parquet_split_from_s3(s3, s3_cluster, tmp_path):
    """``data.name: raydata`` with both splits on S3: Ray Data's tasks (on the cluster, with its AWS
    environment) read them; one epoch has every training sample at most once, the validation split whole."""
    import ray

    from tests.tuning.driver.test_ingest import BATCH, _epoch_ids, cfg_with, ids_source, write_digits_parquet
    from tuning.driver import ingest

    files = write_digits_parquet(tmp_path)
    for split in ("train", "val"):
        for f in sorted(Path(files[split]).iterdir()):
            s3.client().upload_file(str(f), BUCKET, f"digits/{split}/{f.name}")
    data = ids_source(files)
    data["source"].update(train=f"s3://{BUCKET}/digits/train", val=f"s3://{BUCKET}/digits/val")
    cfg = cfg_with(data)
    ray.init(address=s3_cluster.address, logging_level="ERROR", log_to_driver=False)
    try:
        streamed = ingest.build(cfg)
        assert (streamed.facts.train_rows, streamed.facts.val_rows) == (len(files["train_ids"]), len(files["val_ids"]))
        bundle = ingest.worker_data(cfg, streamed.facts, streamed.datasets["train"], streamed.datasets["val"], 0, None)
        (ids,) = _epoch_ids(bundle, 1)
        assert len(ids) == len(set(ids)) == len(files["train_ids"]) // BATCH * BATCH
        assert set(ids) <= set(files["train_ids"].tolist())
        val = [int(i) for x, _ in bundle.val.epoch_batches(0) for i in x[:, 0]]
        assert sorted(val) == sorted(files["val_ids"].tolist())
    finally:
        ray.shutdown()
