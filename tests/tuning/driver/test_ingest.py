"""Ray Data ingest (``data.name: raydata``, tuning.driver.ingest) on a Parquet copy of digits, split
as training.data's digits splits it: the facts a worker needs up front (rows, classes, the
standardization) equal the in-memory bundle's; a stream shards, shuffles and batches as the in-memory
sampler does (every sample at most once per epoch, the same number of steps on every worker, a new
order every epoch, the validation split whole); and trials that read it through Ray Data, 2 workers
and 1, reach the accuracy of the same trials on the in-memory digits."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import ROOT, sqlite_store
from training.config import ConfigError, TrainConfig
from training.data import split_indices

pytestmark = pytest.mark.integration

BATCH = 32
BASE = {"epochs": 1, "seed": 0, "model": {"name": "mlp", "hidden": [32]},
        "optim": {"name": "sgd", "base_lr": 0.1, "momentum": 0.9}, "scaling": {"batch_per_worker": BATCH}}


@pytest.fixture(scope="module")
def digits_parquet(tmp_path_factory):
    return write_digits_parquet(tmp_path_factory.mktemp("digits-parquet"))


def write_digits_parquet(root: Path) -> dict:
    """digits as Parquet under ``root``, 3 files per split: ``id`` (the row of load_digits), ``pixels``
    (64 values, a fixed-size list), ``label``; the train/val split of training.data's digits
    (val_fraction 0.2, seed 0). Returns the split directories and the ids of each split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    train, val = split_indices(d.target, 0.2, 0)
    for split, idx in (("train", train), ("val", val)):
        (root / split).mkdir()
        for part, rows in enumerate(np.array_split(idx, 3)):
            pixels = pa.FixedSizeListArray.from_arrays(pa.array(d.images[rows].reshape(-1)), 64)
            pq.write_table(pa.table({"id": rows, "pixels": pixels, "label": d.target[rows]}),
                           root / split / f"part-{part}.parquet")
    return {"train": str(root / "train"), "val": str(root / "val"), "train_ids": train, "val_ids": val}


def source(files, **more) -> dict:
    return {"name": "raydata", "source": {"train": files["train"], "val": f"file://{files['val']}",
                                          "features": ["pixels"], "label": "label", "input_shape": [1, 8, 8],
                                          "num_classes": 10, "cpus_per_task": 0.25, **more}}


def ids_source(files, **more) -> dict:
    """The sample's id as its one feature, unstandardized: every batch says which samples it holds."""
    return source(files, features=["id"], input_shape=[1], mean=[0.0], std=[1.0], **more)


def cfg_with(data: dict, **updates) -> TrainConfig:
    return TrainConfig.from_dict({**BASE, "data": data}).with_updates(updates)


@pytest.fixture
def ray_connected(ray_cluster):
    """This process on the session's cluster (run_experiment connects and disconnects by itself)."""
    import ray

    ray.init(address=ray_cluster.address, logging_level="ERROR", log_to_driver=False)
    yield ray_cluster
    ray.shutdown()


def test_the_facts_are_the_in_memory_bundles(ray_connected, digits_parquet):
    from training.data import IMAGENET_MEAN, IMAGENET_STD, load_data
    from tuning.driver import ingest

    memory = load_data(TrainConfig().data)
    facts = ingest.build(cfg_with(source(digits_parquet))).facts
    assert (facts.train_rows, facts.val_rows) == (len(memory.train), len(memory.val)) == (1437, 360)
    assert facts.class_names == memory.class_names and facts.input_shape == list(memory.input_shape)
    # measured on the training files by Ray Data's tasks: the registry's channel_stats of the same split
    assert facts.mean == pytest.approx(memory.mean.flatten().tolist(), rel=1e-6)
    assert facts.std == pytest.approx(memory.std.flatten().tolist(), rel=1e-6)
    assert (ingest.IMAGENET_MEAN, ingest.IMAGENET_STD) == (IMAGENET_MEAN, IMAGENET_STD)


def test_the_files_are_checked_before_anything_trains(ray_connected, digits_parquet):
    from tuning.driver import ingest

    cases = [({"features": ["pixel"]}, "data.source.features", "columns of the train files"),
             ({"label": "target"}, "data.source.label", "columns of the train files"),
             ({"input_shape": [1, 8, 9]}, "data.source.input_shape", "the features ['pixels'] hold 64 numbers"),
             ({"num_classes": 5}, "data.source.label", "class indices in [0, 5)")]
    for more, key, expected in cases:
        with pytest.raises(ConfigError) as e:
            ingest.build(cfg_with(source(digits_parquet, **more)))
        assert e.value.key == key and expected in e.value.expected, (more, str(e.value))
    with pytest.raises(ConfigError) as e:
        ingest.build(cfg_with(source(digits_parquet), **{"rung_eval.epochs": [1]}))
    assert e.value.key == "rung_eval.epochs"
    # the session's 2 CPUs less 2 x 0.5 for the workers and 0.25 for the trial: not the CPU Ray Data needs
    with pytest.raises(ConfigError) as e:
        ingest.build(cfg_with(source(digits_parquet), **{"scaling.num_workers": 2, "scaling.cpus_per_worker": 0.5}))
    assert e.value.key == "scaling.cpus_per_worker" and "leaves Ray Data 1 CPU of the cluster's 2" in e.value.expected


def _epoch_ids(bundle, epochs: int) -> list[list[int]]:
    out = []
    for epoch in range(epochs):
        batches = list(bundle.train.epoch_batches(epoch))
        assert all(len(y) == BATCH and x.shape == (BATCH, 1) for x, y in batches)   # partial batches dropped
        out.append([int(i) for x, _ in batches for i in x[:, 0]])
    return out


@pytest.mark.parametrize("shuffle", ["full", "local"])
def test_a_one_worker_stream_has_every_sample_once_per_epoch_in_a_new_order(ray_connected, digits_parquet, shuffle):
    """In a 1-worker trial the datasets are iterated whole in the trial's process: each epoch every
    training sample once (all but the partial last batch), shuffled anew (``full``: the whole set;
    ``local``: the files' order and a buffer of rows); the validation split in full."""
    from tuning.driver import ingest

    cfg = cfg_with(ids_source(digits_parquet, shuffle=shuffle, shuffle_buffer=256))
    streamed = ingest.build(cfg)
    bundle = ingest.worker_data(cfg, streamed.facts, streamed.datasets["train"], streamed.datasets["val"], 0, None)
    epochs = _epoch_ids(bundle, 3)
    everything = set(digits_parquet["train_ids"].tolist())
    for ids in epochs:
        assert len(ids) == len(set(ids)) == 1437 // BATCH * BATCH and set(ids) <= everything
    assert len({tuple(ids) for ids in epochs}) == 3                      # a new order every epoch
    assert len(set.union(*map(set, epochs))) > 1437 - 3 * (1437 % BATCH)   # the dropped tail changes too
    val = [int(i) for x, _ in bundle.val.epoch_batches(0) for i in x[:, 0]]
    assert sorted(val) == sorted(digits_parquet["val_ids"].tolist())


def _record_shards(config: dict) -> None:
    """A Train worker: its shards, built as tuning.driver.trial._train_worker builds them, read for
    ``epochs`` epochs; the sample ids of each epoch and of the validation pass written to a file."""
    import ray.train

    from tuning.driver import ingest

    cfg = TrainConfig.from_dict(config["train"])
    bundle = ingest.shard_data(cfg, config["ingest"])
    epochs = _epoch_ids(bundle, config["epochs"])
    val = [int(i) for x, _ in bundle.val.epoch_batches(0) for i in x[:, 0]]
    rank = ray.train.get_context().get_world_rank()
    with open(f"{config['out']}/rank{rank}.json", "w") as f:
        json.dump({"epochs": epochs, "val": val}, f)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_workers_share_every_epoch_without_overlap(ray_connected, digits_parquet, tmp_path):
    """Train's shards (ingest.SplitConfig): per epoch the two workers' batches hold disjoint samples,
    as many steps each as the in-memory sampler gives them (floor(N / 2) rows, partial batches
    dropped: DDP never waits on a worker with a batch fewer), in a new order each epoch; together
    they read the validation split exactly once."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from tuning.driver import ingest

    cfg = cfg_with(ids_source(digits_parquet), **{"scaling.num_workers": 2, "scaling.cpus_per_worker": 0.25})
    streamed = ingest.build(cfg)
    trainer = TorchTrainer(
        _record_shards, train_loop_config={"train": cfg.to_dict(), "ingest": ingest.facts_dict(streamed.facts),
                                           "epochs": 3, "out": str(tmp_path)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.25}),
        run_config=ray.train.RunConfig(name="ingest-shards", storage_path=str(tmp_path / "train")),
        **ingest.trainer_args(streamed))
    trainer.fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    steps = (1437 // 2) // BATCH                       # the in-memory plan: training.schedules.plan_steps
    everything = set(digits_parquet["train_ids"].tolist())
    for epoch in range(3):
        a, b = (r["epochs"][epoch] for r in ranks)
        print(f"epoch {epoch}: rank 0 {len(a)} samples, rank 1 {len(b)}, distinct {len(set(a) | set(b))}")
        assert len(a) == len(b) == steps * BATCH
        assert len(set(a) | set(b)) == 2 * steps * BATCH and set(a) | set(b) <= everything   # no sample twice
    orders = [tuple(r["epochs"][e]) for r in ranks for e in range(3)]
    assert len(set(orders)) == 6
    assert sorted(ranks[0]["val"] + ranks[1]["val"]) == sorted(digits_parquet["val_ids"].tolist())


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_trials_reading_parquet_through_ray_data_reach_the_in_memory_accuracy(ray_cluster, digits_parquet, tmp_path):
    """One grid experiment: digits in memory and its Parquet copy through Ray Data, each with 2
    workers (TorchTrainer, Train's shards) and 1 (in the trial's process), at the same seed and
    config: the same steps, and val_acc within 3 points of the in-memory trial's."""
    from tuning.driver.experiment import run_experiment
    from tuning.spec import load_spec

    epochs = 3
    quickstart = yaml.safe_load((ROOT / "search_spaces/quickstart.yaml").read_text())   # its train section
    spec = load_spec({"experiment": {"name": "it-ingest", "metric": "val_acc", "mode": "max", "num_samples": 1,
                                     "search": "grid", "scheduler": {"name": "fifo"}, "max_concurrent_trials": 1},
                      # 0.25 CPU per worker: Ray Data's own tasks take a whole CPU each, outside the trial's
                      "train": {**quickstart["train"], "epochs": epochs,
                                "scaling": {**quickstart["train"]["scaling"], "cpus_per_worker": 0.25}},
                      "space": {"data": {"grid": [{"name": "digits"}, source(digits_parquet)]},
                                "scaling.num_workers": {"grid": [2, 1]}}})
    uri = sqlite_store(tmp_path / "mlflow.db")
    result = run_experiment(spec, storage=str(tmp_path / "r"), tracking_uri=uri, address=ray_cluster.address,
                            out=lambda line: None, register_model=False)
    assert [r.status for r in result.rows] == ["completed"] * 4, [(r.status, r.error) for r in result.rows]
    got = {}
    for r in result.rows:   # each trial's last epoch, as Tune recorded it
        (results,) = Path(result.path).glob(f"*{r.trial_id}*/result.json")
        last = json.loads(results.read_text().splitlines()[-1])
        data, workers = last["config"]["data"]["name"], last["config"]["scaling.num_workers"]
        got[(data, workers)] = (last["val_acc"], last["step"])
    print(f"val_acc, steps after {epochs} epochs: {got}")
    for workers in (2, 1):
        (memory, memory_steps), (stream, stream_steps) = got[("digits", workers)], got[("raydata", workers)]
        assert stream_steps == memory_steps == epochs * ((1437 // workers) // BATCH)   # training.schedules.plan_steps
        assert memory > 0.9 and abs(stream - memory) <= 0.03
