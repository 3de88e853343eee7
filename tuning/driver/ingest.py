"""Ray Data ingest for ``data.name: raydata``: Parquet or image files at a path or URI, read,
decoded and standardized by Ray Data's CPU tasks (any node with CPUs, CPU-only nodes included)
and streamed to the trial's workers as shards of batches.

The trial's driver calls ``build``: the two ``ray.data.Dataset``s and the facts every worker needs
up front (``Facts``: the rows of each split, so steps_per_epoch and the LR schedule are known before
the first batch; the classes; the standardization). A multi-worker trial hands the datasets to
``TorchTrainer(datasets=..., dataset_config=SplitConfig())`` and each Train worker calls
``worker_data`` on its shards (``ray.train.get_dataset_shard``); a 1-worker trial calls
``worker_data`` on the datasets themselves, in its own process. Either way ``fit`` gets a
``DataBundle`` of ``training.pipeline.Streamed`` splits (training/ never imports Ray).

Epochs, as the in-memory path has them: every iteration of a split is one execution of its
dataset. ``shuffle: full`` shuffles the whole training set every execution (``random_shuffle``
seeded with ``seed`` and reseeded per execution: a new order each epoch, drawn from the seed; Ray
Data's parallel tasks may still reorder blocks); the shards are equal (``streaming_split(equal=True)``:
floor(N / world) rows each, the remainder dropped, as DistributedSampler(drop_last=True)), and
batches drop their partial last, so every worker takes the same number of steps and DDP never waits
on a worker with one batch fewer. ``shuffle: local`` reads the files in a new order every epoch and
shuffles rows in a buffer on each worker, seeded by (seed, epoch, rank): no all-to-all exchange.
The validation split is read whole across the workers (``equal=False``: each row once, none dropped).
Which rows a worker gets is Ray Data's choice (blocks go to whichever worker asks first); a resumed
run starts its executions, and so its shuffles, from the first again.
"""
from __future__ import annotations

import io
import math
import posixpath
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import ray.data
import ray.train

from training.config import RAY_DATA, ConfigError, TrainConfig

if TYPE_CHECKING:   # torch: on the workers only (the trial's driver builds datasets without it)
    from training.data import DataBundle
    from training.pipeline import Batch

IMAGENET_MEAN = (0.485, 0.456, 0.406)   # training.data's, on the [0, 1] pixel scale (test_ingest checks they match)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = ["jpg", "jpeg", "png", "bmp", "gif", "webp", "tif", "tiff"]


def is_streamed(cfg: TrainConfig) -> bool:
    """Is ``cfg``'s data read with Ray Data (``data.name: raydata``)?"""
    return cfg.data.name == RAY_DATA


@dataclass
class Facts:
    """What every worker needs before its first batch, as plain data (it travels in the Train loop's config)."""
    train_rows: int
    val_rows: int
    class_names: list[str]
    input_shape: list[int]
    mean: list[float]                   # the standardization applied, broadcast over one sample
    std: list[float]


@dataclass
class Ingest:
    datasets: dict[str, "ray.data.Dataset"]   # "train" (shuffled per execution) and "val"
    facts: Facts


class SplitConfig(ray.train.DataConfig):
    """Train's sharding of the two splits: the training set in equal shards (Train's default), the
    validation set whole (``equal=False``: every row once, so val_acc is over the whole split)."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        if set(datasets) != {"val"}:
            return super().configure(datasets, world_size, worker_handles, worker_node_ids, **kwargs)
        ds = datasets["val"].copy(datasets["val"])
        ds.context.execution_options = self._resolve_execution_options("val")
        return [{"val": split} for split in ds.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)]


# ---------------------------------------------------------------------------- the driver's side

def build(cfg: TrainConfig) -> Ingest:
    """The trial's datasets and facts; the files' schema or layout checked first (ConfigError naming
    the ``data.source`` key). Read now: the files' metadata, the rows of each split (counted by Ray
    Data), a few rows of parquet, and, for parquet statistics (``mean``/``std`` null), the training
    files once on Ray Data's tasks. The rest is read epoch by epoch as the workers iterate."""
    if cfg.rung_eval.epochs:
        raise ConfigError("rung_eval.epochs", cfg.rung_eval.epochs, "[] with data.name: raydata (a cooldown fork "
                          "re-reads the training set by index; a stream is read once per epoch)")
    _check_room(cfg)
    s = cfg.data.source
    ray.data.DataContext.get_current().enable_progress_bars = False   # the terminal is progress.py's
    remote = {"num_cpus": s.cpus_per_task}   # each read, decode and shuffle task's
    files = ray.data.FileShuffleConfig(seed=cfg.seed) if s.shuffle == "local" else None   # reseeded per execution
    train, val, prep, facts = (_parquet if s.format == "parquet" else _images)(cfg, remote, files)
    if s.shuffle == "full":   # before decoding: the rows (an image's encoded bytes) move, not the pixels
        train = train.random_shuffle(seed=ray.data.RandomSeedConfig(seed=cfg.seed, reseed_after_execution=True),
                                     **remote)
    return Ingest({"train": train.map_batches(prep, batch_format="numpy", **remote),
                   "val": val.map_batches(prep, batch_format="numpy", **remote)}, facts)


def _check_room(cfg: TrainConfig) -> None:
    """Ray Data's tasks run outside the trial's reservation, and some of its own (listing the files
    every epoch, sampling them, column projections) take a whole CPU whatever ``cpus_per_task`` says:
    on a cluster the trial fills, they would wait forever. Refuse that case before anything starts.
    (Concurrent trials can still fill the cluster: leave a CPU per node that runs Ray Data.)"""
    from tuning.driver.sizing import trial_demand

    total, held = ray.cluster_resources().get("CPU", 0.0), trial_demand(cfg)["CPU"]
    if total - held < 1.0 - 1e-9:
        raise ConfigError("scaling.cpus_per_worker", cfg.scaling.cpus_per_worker,
                          f"a trial that leaves Ray Data 1 CPU of the cluster's {total:g} (data.name: raydata: Ray Data's "
                          f"file listing and sampling tasks take a whole CPU each, outside the trial's {held:g}): lower "
                          "scaling.num_workers or cpus_per_worker, or add a node")


def _parquet(cfg: TrainConfig, remote: dict, files) -> tuple["ray.data.Dataset", "ray.data.Dataset", Any, Facts]:
    """The two splits' rows (the feature and label columns), their decoding and the facts."""
    s = cfg.data.source
    columns = [*s.features, s.label]
    splits = {k: ray.data.read_parquet(getattr(s, k), **remote, **({"shuffle": files} if k == "train" and files else {}))
              for k in ("train", "val")}
    for key, ds in splits.items():
        names = ds.schema().names
        missing = [c for c in columns if c not in names]
        if missing:
            raise ConfigError("data.source.features" if missing[0] in s.features else "data.source.label", missing,
                              f"columns of the {key} files at {getattr(s, key)} (they have {names})")
        splits[key] = ds.select_columns(columns)
    shape = list(s.input_shape)
    # A few training rows on the driver: a wrong shape or label is a keyed error before any trial starts.
    _ParquetRows(s.features, s.label, shape, s.num_classes, [0.0], [1.0])(
        splits["train"].take_batch(4, batch_format="numpy"), where=f"the train files at {s.train}")
    if s.mean is not None:
        mean, std, rows = list(s.mean), list(s.std), splits["train"].count()
    else:   # the training split's, as the in-memory registry's
        mean, std, rows = _parquet_stats(splits["train"], s.features, shape)
    facts = Facts(rows, splits["val"].count(), [str(c) for c in range(s.num_classes)], shape, mean, std)
    return splits["train"], splits["val"], _ParquetRows(s.features, s.label, shape, s.num_classes, mean, std), facts


def _features(batch: dict[str, np.ndarray], features: list[str], shape: list[int], where: str = "") -> np.ndarray:
    """The feature columns of a numpy batch, flattened per row and concatenated, as (rows, *shape) float64.
    ``where``: the files, on the driver's check (ConfigError); on Ray Data's tasks a ValueError (it pickles)."""
    parts = []
    for c in features:
        col = batch[c]
        col = np.stack(list(col)) if col.dtype == object else np.asarray(col)   # list columns: one array per row
        parts.append(col.reshape(len(col), -1))
    x = np.concatenate(parts, axis=1).astype(np.float64)
    if x.shape[1] != math.prod(shape):
        _fail(where, "data.source.input_shape", shape, f"a shape of {x.shape[1]} values: the features {features} "
              f"hold {x.shape[1]} numbers per row")
    return x.reshape(len(x), *shape)


def _fail(where: str, key: str, value, expected: str) -> None:
    if where:
        raise ConfigError(key, value, f"{expected}, in {where}")
    raise ValueError(f"{key}: got {value!r}, expected {expected}")   # ConfigError does not survive Ray's pickling


def _channel_axes(shape: list[int]) -> tuple[int, ...]:
    """Axes of a (rows, *shape) batch that the statistics pool over: all but dim 0 of a sample
    (per channel for (C, H, W), per feature for (F,)), as training.data.channel_stats does."""
    return (0, *range(2, len(shape) + 1))


def _parquet_stats(train: "ray.data.Dataset", features: list[str], shape: list[int]
                   ) -> tuple[list[float], list[float], int]:
    """Per-channel mean and std of the training files (summed in float64 on Ray Data's tasks), and
    their rows. A constant channel gets std 1 (it stays constant instead of becoming NaN), as
    channel_stats."""
    def sums(batch):
        x = _features(batch, features, shape)
        axes = _channel_axes(shape)
        return {"s": x.sum(axes)[None], "q": (x * x).sum(axes)[None], "rows": np.array([len(x)])}

    parts = train.map_batches(sums, batch_format="numpy").take_all()
    rows = sum(int(p["rows"]) for p in parts)
    n = rows * math.prod(shape[1:])   # values per channel
    mean = sum(np.asarray(p["s"], dtype=np.float64) for p in parts) / n
    var = sum(np.asarray(p["q"], dtype=np.float64) for p in parts) / n - mean * mean
    std = np.sqrt(np.clip(var, 0, None))
    std = np.where(std > 1e-6 * (1 + np.abs(mean)), std, 1.0)
    return mean.tolist(), std.tolist(), rows


def _broadcast(values: list[float], shape: list[int]) -> np.ndarray:
    """mean/std shaped onto one sample: (C, 1, 1) for images, (F,) for vectors, a scalar for one value."""
    v = np.asarray(values, dtype=np.float64)
    return v.reshape(len(v), *([1] * (len(shape) - 1))) if len(v) > 1 else v.reshape(())


class _ParquetRows:
    """Parquet rows -> {"x": standardized float32 samples, "y": int64 class indices} (on Ray Data's tasks)."""

    def __init__(self, features, label, shape, num_classes, mean, std):
        self.features, self.label, self.shape, self.num_classes = features, label, shape, num_classes
        self.mean, self.std = _broadcast(mean, shape), _broadcast(std, shape)

    def __call__(self, batch: dict[str, np.ndarray], where: str = "") -> dict[str, np.ndarray]:
        x = (_features(batch, self.features, self.shape, where) - self.mean) / self.std
        y = np.asarray(batch[self.label])
        if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= self.num_classes):
            _fail(where, "data.source.label", self.label, f"a column of class indices in [0, {self.num_classes}) "
                  f"(got {y.dtype} values in [{y.min()}, {y.max()}])")
        return {"x": x.astype(np.float32), "y": y.astype(np.int64)}


def _images(cfg: TrainConfig, remote: dict, files) -> tuple["ray.data.Dataset", "ray.data.Dataset", Any, Facts]:
    """Class folders under each split (``<split>/<class>/<image>``), listed on the driver: exactly
    those files are read (their bytes), and decoded on Ray Data's tasks."""
    s, size = cfg.data.source, cfg.data.image_size
    files_of = {k: _class_files(getattr(s, k), f"data.source.{k}") for k in ("train", "val")}
    classes = sorted(files_of["train"])
    if sorted(files_of["val"]) != classes:
        raise ConfigError("data.source.val", s.val, f"the class folders of data.source.train ({classes}), "
                          f"got {sorted(files_of['val'])}")
    mean = list(s.mean) if s.mean is not None else list(IMAGENET_MEAN)
    std = list(s.std) if s.std is not None else list(IMAGENET_STD)
    prep = _DecodedImages({c: i for i, c in enumerate(classes)}, size, mean, std)
    listed = {k: sorted(f for paths in files_of[k].values() for f in paths) for k in ("train", "val")}
    splits = {k: ray.data.read_binary_files(listed[k], include_paths=True, **remote,
                                            **({"shuffle": files} if k == "train" and files else {}))
              for k in ("train", "val")}
    facts = Facts(len(listed["train"]), len(listed["val"]), classes, [3, size, size], mean, std)
    return splits["train"], splits["val"], prep, facts


def _class_files(path: str, key: str) -> dict[str, list[str]]:
    """The image files of each class folder directly under ``path`` (a local directory or a URI; the
    files as paths or URIs of the same scheme), without reading them."""
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except (OSError, ValueError) as e:
        raise ConfigError(key, path, f"a readable directory of class folders (<class>/<image>) ({e})") from e
    scheme = path.split("://")[0] + "://" if "://" in path else ""
    files: dict[str, list[str]] = {}
    for info in infos:
        rel = posixpath.relpath(info.path, root.rstrip("/")).split("/")
        if info.type == pafs.FileType.File and len(rel) == 2 and rel[1].rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
            files.setdefault(rel[0], []).append(scheme + info.path)
    if len(files) < 2:
        raise ConfigError(key, path, f"a directory of at least 2 class folders holding images ({', '.join(IMAGE_EXTENSIONS)}), "
                          f"found {sorted(files) or 'none'}")
    return files


class _DecodedImages:
    """Image file bytes -> {"x": (3, size, size) standardized float32, "y": the class of the file's folder}:
    RGB, the shorter side resized to ``size`` then center-cropped, as imagefolder's transforms."""

    def __init__(self, classes: dict[str, int], size: int, mean: list[float], std: list[float]):
        self.classes, self.size = classes, size
        self.mean, self.std = _broadcast(mean, [3, 1, 1]), _broadcast(std, [3, 1, 1])

    def _pixels(self, data: bytes) -> np.ndarray:
        from PIL import Image

        img = Image.open(io.BytesIO(data)).convert("RGB")
        w, h, s = *img.size, self.size
        w2, h2 = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        img = img.resize((w2, h2), Image.BILINEAR)
        left, top = int(round((w2 - s) / 2.0)), int(round((h2 - s) / 2.0))
        return np.asarray(img.crop((left, top, left + s, top + s)))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = np.stack([self._pixels(b) for b in batch["bytes"]]).transpose(0, 3, 1, 2) / 255.0
        y = np.array([self.classes[posixpath.basename(posixpath.dirname(p))] for p in batch["path"]], dtype=np.int64)
        return {"x": ((x - self.mean) / self.std).astype(np.float32), "y": y}


# ---------------------------------------------------------------------------- a worker's side

def worker_data(cfg: TrainConfig, facts: Facts | dict, train, val, rank: int, device) -> "DataBundle":
    """The DataBundle ``fit`` trains on: ``train``/``val`` are this worker's shards (DataIterators from
    ``ray.train.get_dataset_shard``) or, in a 1-worker trial, the Datasets themselves."""
    import torch

    from training.data import DataBundle
    from training.pipeline import VAL_BATCH, Streamed

    f = facts if isinstance(facts, Facts) else Facts(**facts)
    s, batch = cfg.data.source, cfg.scaling.batch_per_worker
    pin = torch.device(device).type == "cuda" if device is not None else False
    local = s.shuffle == "local"

    def train_batches(epoch: int) -> Iterator["Batch"]:
        seed = int(np.random.SeedSequence([cfg.seed, epoch, rank]).generate_state(1)[0]) if local else None
        return _pairs(train.iter_torch_batches(batch_size=batch, drop_last=True, device="cpu", pin_memory=pin,
                                               prefetch_batches=cfg.data.prefetch_factor,
                                               local_shuffle_buffer_size=s.shuffle_buffer if local else None,
                                               local_shuffle_seed=seed))

    def val_batches(epoch: int) -> Iterator["Batch"]:
        return _pairs(val.iter_torch_batches(batch_size=max(batch, VAL_BATCH), device="cpu", pin_memory=pin,
                                             prefetch_batches=cfg.data.prefetch_factor))

    shape = tuple(f.input_shape)
    mean = torch.as_tensor(_broadcast(f.mean, f.input_shape), dtype=torch.float32)
    std = torch.as_tensor(_broadcast(f.std, f.input_shape), dtype=torch.float32)
    return DataBundle(Streamed(f.train_rows, train_batches), Streamed(f.val_rows, val_batches),
                      num_classes=len(f.class_names), input_shape=shape, class_names=f.class_names,
                      is_image=len(shape) == 3, mean=mean, std=std)


def shard_data(cfg: TrainConfig, facts: dict) -> "DataBundle":
    """On a Train worker: ``worker_data`` on its shards of the trainer's datasets (``trainer_args``)."""
    import ray.train.torch

    rank = ray.train.get_context().get_world_rank()
    return worker_data(cfg, facts, ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val"), rank,
                       ray.train.torch.get_device())


def trainer_args(ingest: Ingest) -> dict[str, Any]:
    """What ``TorchTrainer`` takes for ``ingest``: its datasets, sharded by ``SplitConfig``."""
    return {"datasets": ingest.datasets, "dataset_config": SplitConfig()}


def _pairs(batches) -> Iterator["Batch"]:
    for b in batches:
        yield b["x"], b["y"]


def facts_dict(facts: Facts) -> dict[str, Any]:
    """``facts`` as the plain dict the Train loop's config carries (``shard_data`` reads it)."""
    return asdict(facts)
