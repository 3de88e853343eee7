"""The ``data.source`` section of ``data.name: raydata``: files on shared or object storage that Ray
Data reads and streams to the workers (tuning.driver.ingest), validated without torch or Ray.
Its own module so that training.config stays one screen per section."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from training.typed import Section, _check

RAY_DATA = "raydata"   # data.name of files read with Ray Data (data.source), streamed to the workers


@dataclass(kw_only=True)
class SourceConfig(Section):
    """``data.name: raydata``: Parquet or image files at a path or URI (a local directory,
    ``file://``, ``s3://``, ...), read, decoded and standardized by Ray Data's CPU workers and
    streamed to the Train workers (tuning.driver.ingest), reshuffled every epoch.

    ``train`` and ``val`` hold the two splits (a directory, a file, or a URI of either). Parquet: the
    ``features`` columns (numbers or fixed-length lists of numbers), flattened and concatenated in
    order, are reshaped to ``input_shape``; ``label`` holds class indices in [0, num_classes). Images
    (``format: images``): one folder per class under each split (``<split>/<class>/<image>``), resized
    (shorter side) and center-cropped to ``data.image_size``, RGB. ``mean``/``std``: the
    standardization ``x = (raw - mean) / std``, one value per channel (dim 0 of a sample; per feature
    for 1-D samples) or one for all; null: parquet measures them on the training files (one pass),
    images take ImageNet's (as ``imagefolder``).
    """
    format: Literal["parquet", "images"] = "parquet"
    train: Optional[str] = None          # path or URI of the training split
    val: Optional[str] = None            # path or URI of the validation split
    features: list[str] = field(default_factory=list)   # parquet: feature columns
    label: str = "label"                 # parquet: the class-index column
    input_shape: list[int] = field(default_factory=list)   # parquet: one sample's shape, e.g. [64] or [1, 8, 8]
    num_classes: Optional[int] = None    # parquet: required; images: the class folders
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    # "full": a global shuffle every epoch (Ray Data's random_shuffle; every sample once per epoch in a
    # new order, as the in-memory sampler); "local": files in a new order every epoch, rows shuffled in
    # a buffer of shuffle_buffer rows per worker (no all-to-all exchange: for data much larger than memory).
    shuffle: Literal["full", "local"] = "full"
    shuffle_buffer: int = 10_000
    cpus_per_task: float = 1.0           # CPUs of each Ray Data read/decode task (fractions fit a busy node)

    def _validate(self):   # what any value must satisfy; what data.name: raydata needs is check_complete
        _check((self.mean is None) == (self.std is None), "mean", self.mean,
               f"a list together with std (std is {self.std!r}), or both null")
        _check(self.std is None or all(s > 0 for s in self.std), "std", self.std, "values > 0")
        _check(self.shuffle_buffer >= 1, "shuffle_buffer", self.shuffle_buffer, ">= 1")
        _check(self.cpus_per_task > 0, "cpus_per_task", self.cpus_per_task, "> 0")

    def check_complete(self) -> None:
        """What ``data.name: raydata`` needs of its source: both splits, and per format its columns,
        sample shape and classes (raises ConfigError naming the key under ``data.source``)."""
        for key in ("train", "val"):
            _check(bool(getattr(self, key)), key, getattr(self, key),
                   "a path or URI (a local directory, file://..., s3://...) of the split's files")
        parquet = self.format == "parquet"
        if parquet:
            _check(len(self.features) > 0, "features", self.features, "a non-empty list of feature columns")
            _check(1 <= len(self.input_shape) <= 3 and all(s >= 1 for s in self.input_shape), "input_shape",
                   self.input_shape, "one sample's shape: 1 to 3 positive sizes, e.g. [64] or [1, 8, 8]")
            _check(self.num_classes is not None and self.num_classes >= 2, "num_classes", self.num_classes,
                   "an integer >= 2 (labels are class indices in [0, num_classes))")
        else:
            for key in ("features", "input_shape", "num_classes"):
                _check(getattr(self, key) in ([], None), key, getattr(self, key),
                       "unset for format: images (pixels, [3, data.image_size, data.image_size], the class folders)")
        channels = self.input_shape[0] if parquet else 3
        for key in ("mean", "std"):
            v = getattr(self, key)
            _check(v is None or len(v) in (1, channels), key, v,
                   f"1 or {channels} values (one per channel, dim 0 of a sample; per feature for 1-D samples)")
