"""The typed config tree: the single source of truth for one training run.

YAML files, CLI flags and Ray Tune samples are all layers applied onto this tree
(``TrainConfig.from_dict``). Every field is keyword-only, typed, and validated at
construction; an error names the dotted key, the bad value and what was expected.
Units: ``epochs`` are epochs, ``*_steps`` are optimizer steps, ``batch_per_worker``
is per worker (the global batch is derived, see ``ScalingConfig.global_batch``).
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union


class ConfigError(ValueError):
    """A config value is wrong: names the dotted key, the value and what was expected."""

    def __init__(self, key: str, value: Any, expected: str, source: str | None = None):
        self.key, self.value, self.expected, self.source = key, value, expected, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: got {value!r}, expected {expected}")

    def with_source(self, source: str, prefix: str = "") -> "ConfigError":
        """The same error, re-rooted under ``prefix`` and attributed to ``source`` (a file)."""
        key = f"{prefix}.{self.key}" if prefix else self.key
        return ConfigError(key, self.value, self.expected, source)


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(key, value, expected)


@dataclass(kw_only=True)
class Section:
    """Base of every config section: strict construction from plain dicts."""

    def _validate(self) -> None:  # overridden by sections with range rules
        pass

    @classmethod
    def from_dict(cls, d: Any, prefix: str = ""):
        if isinstance(d, cls):
            d = d.to_dict()
        _check(isinstance(d, dict), prefix or "<root>", d, "a mapping")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
            raise ConfigError(key, d[unknown[0]], f"one of the keys {names}")
        kwargs = {}
        for name in names:
            if name in d:
                key = f"{prefix}.{name}" if prefix else name
                kwargs[name] = _coerce(hints[name], d[name], key)
        obj = cls(**kwargs)
        obj._validate_under(prefix)
        return obj

    def _validate_under(self, prefix: str) -> None:
        try:
            self._validate()
        except ConfigError as e:
            raise e.with_source(None, prefix) if prefix else e  # type: ignore[arg-type]

    def to_dict(self) -> dict:
        """A plain, YAML/JSON-ready dict that ``from_dict`` turns back into an equal config."""
        return _plain(self)


def _plain(v: Any) -> Any:
    if isinstance(v, Section):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if isinstance(tp, type) and issubclass(tp, Section):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(tp: Any, v: Any, key: str) -> Any:
    """Check ``v`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, Section):
        return tp.from_dict(v, key)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if v is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, v, key)
            except ConfigError:
                continue
        raise ConfigError(key, v, _type_name(tp))
    if origin is Literal:
        _check(v in typing.get_args(tp) and isinstance(v, type(typing.get_args(tp)[0])), key, v, _type_name(tp))
        return v
    if origin is list:
        _check(isinstance(v, (list, tuple)), key, v, _type_name(tp))
        (item,) = typing.get_args(tp)
        return [_coerce(item, x, f"{key}[{i}]") for i, x in enumerate(v)]
    if tp is bool:
        _check(isinstance(v, bool), key, v, "true or false")
        return v
    if tp is int:
        _check(isinstance(v, int) and not isinstance(v, bool), key, v, "an integer")
        return v
    if tp is float:
        _check(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), key, v,
               "a finite number")
        return float(v)
    if tp is str:
        _check(isinstance(v, str), key, v, "a string")
        return v
    raise TypeError(f"unsupported annotation {tp!r} at {key}")  # a bug in this module, not user input


# ---------------------------------------------------------------------------- sections

@dataclass(kw_only=True)
class DataConfig(Section):
    """Which dataset, how it is split, and input-side augmentation (images only)."""
    name: str = "digits"                 # key in training.data.DATASETS
    root: Optional[str] = None           # cifar10 / imagefolder: local directory
    download: bool = False               # cifar10: fetch into root if missing (never implicit)
    val_fraction: float = 0.2            # fraction held out for validation (ignored where a split exists)
    seed: int = 0                        # the train/val split's seed (not the training seed)
    num_samples: Optional[int] = None    # mnist1d / synthetic size; a cap on the training set elsewhere
    image_size: int = 32                 # imagefolder: resize + center-crop side
    augment: bool = False                # random crop (pad 4) + horizontal flip on image batches
    loader_workers: int = 0              # torch DataLoader worker processes

    def _validate(self):
        _check(0.0 < self.val_fraction < 1.0, "val_fraction", self.val_fraction, "a number in (0, 1)")
        _check(self.num_samples is None or self.num_samples > 0, "num_samples", self.num_samples, "> 0")
        _check(self.image_size >= 8, "image_size", self.image_size, ">= 8")
        _check(self.loader_workers >= 0, "loader_workers", self.loader_workers, ">= 0")


@dataclass(kw_only=True)
class ModelConfig(Section):
    """Architecture and transfer learning. Registry keys live in training.models.MODELS."""
    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [128])   # mlp hidden widths
    channels: list[int] = field(default_factory=lambda: [32, 64])  # small_cnn conv widths
    dropout: float = 0.0
    small_stem: bool = False             # resnets: 3x3 stride-1 stem, no max-pool (32x32 inputs)
    init: Literal["default", "zero"] = "default"  # "zero": zero all weights (a known-bad init)
    pretrained: Optional[str] = None     # local weights file (state_dict); no downloads at run time
    transfer: Literal["full", "finetune_last_n", "linear_probe"] = "full"
    finetune_last_n: int = 1             # trainable top-level blocks (head counts as one)
    backbone_lr_mult: Optional[float] = None  # default: 1.0 for full, 0.1 for finetune_last_n

    def _validate(self):
        _check(all(h > 0 for h in self.hidden), "hidden", self.hidden, "positive widths")
        _check(len(self.channels) > 0 and all(c > 0 for c in self.channels), "channels", self.channels,
               "a non-empty list of positive widths")
        _check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "a number in [0, 1)")
        _check(self.finetune_last_n >= 1, "finetune_last_n", self.finetune_last_n, ">= 1")
        _check(self.backbone_lr_mult is None or self.backbone_lr_mult >= 0, "backbone_lr_mult",
               self.backbone_lr_mult, ">= 0")

    @property
    def effective_backbone_lr_mult(self) -> float:
        if self.backbone_lr_mult is not None:
            return self.backbone_lr_mult
        return 0.1 if self.transfer == "finetune_last_n" else 1.0


@dataclass(kw_only=True)
class OptimConfig(Section):
    """Optimizer and the large-batch learning-rate rule (``base_lr`` is per ``reference_batch``)."""
    name: Literal["sgd", "adamw", "lars", "lamb"] = "sgd"
    base_lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    decay_norm_and_bias: bool = False    # Goyal et al.: no weight decay on BN and bias by default
    lr_scaling: Literal["linear", "sqrt", "none"] = "none"
    reference_batch: int = 256
    grad_clip: Optional[float] = None    # max global grad norm; None = off

    def _validate(self):
        _check(self.base_lr > 0, "base_lr", self.base_lr, "> 0")
        _check(0.0 <= self.momentum < 1.0, "momentum", self.momentum, "a number in [0, 1)")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", self.betas,
               "two numbers in [0, 1)")
        _check(self.eps > 0, "eps", self.eps, "> 0")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        _check(self.reference_batch > 0, "reference_batch", self.reference_batch, "> 0")
        _check(self.grad_clip is None or self.grad_clip > 0, "grad_clip", self.grad_clip, "> 0 or null")
        _check(not (self.nesterov and self.momentum == 0), "nesterov", self.nesterov,
               "false when momentum is 0 (nesterov needs momentum)")


@dataclass(kw_only=True)
class ScheduleConfig(Section):
    """LR schedule as a multiplier of the peak LR; warmup composes with every schedule."""
    name: Literal["constant", "step", "cosine", "linear", "inverse_sqrt", "cyclic_cosine"] = "constant"
    # step: where the LR drops, as fractions of the post-warmup phase (the steps after warmup; with no
    # warmup, of all steps): milestone m is at step W + round(m * (total_steps - W)), W = warmup steps
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    gamma: float = 0.1                   # step: factor applied at each milestone
    min_factor: float = 0.0              # cosine / linear / cyclic_cosine: floor as a fraction of peak
    cycles: int = 3                      # cyclic_cosine: number of equal-length warm-restart cycles
    warmup: Literal["none", "linear", "constant"] = "none"
    warmup_epochs: float = 0.0
    warmup_steps: Optional[int] = None   # overrides warmup_epochs when set
    warmup_start_factor: float = 0.1     # multiplier at step 0 of warmup

    def _validate(self):
        ms = self.milestones
        _check(all(0 < m < 1 for m in ms) and ms == sorted(ms), "milestones", ms,
               "increasing fractions of the post-warmup phase (the steps after warmup) in (0, 1)")
        _check(0 < self.gamma <= 1, "gamma", self.gamma, "a number in (0, 1]")
        _check(0 <= self.min_factor < 1, "min_factor", self.min_factor, "a number in [0, 1)")
        _check(self.cycles >= 1, "cycles", self.cycles, ">= 1")
        _check(self.warmup_epochs >= 0, "warmup_epochs", self.warmup_epochs, ">= 0")
        _check(self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, ">= 0")
        _check(0 <= self.warmup_start_factor <= 1, "warmup_start_factor", self.warmup_start_factor,
               "a number in [0, 1]")


@dataclass(kw_only=True)
class RegularizationConfig(Section):
    """Regularizers beyond weight decay (optim) and dropout (model); all off by default."""
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0             # Beta(alpha, alpha) mixing; 0 = off
    cutmix_alpha: float = 0.0            # 0 = off; with both on, each batch picks one at random
    cutout: int = 0                      # side of the zeroed square in pixels; 0 = off (images only)
    stochastic_depth: float = 0.0        # drop probability of the last residual block (resnets)
    ema_decay: float = 0.0               # Polyak/EMA of weights per step; 0 = off

    def _validate(self):
        _check(0 <= self.label_smoothing < 1, "label_smoothing", self.label_smoothing, "a number in [0, 1)")
        _check(self.mixup_alpha >= 0, "mixup_alpha", self.mixup_alpha, ">= 0")
        _check(self.cutmix_alpha >= 0, "cutmix_alpha", self.cutmix_alpha, ">= 0")
        _check(self.cutout >= 0, "cutout", self.cutout, ">= 0")
        _check(0 <= self.stochastic_depth < 1, "stochastic_depth", self.stochastic_depth, "a number in [0, 1)")
        _check(0 <= self.ema_decay < 1, "ema_decay", self.ema_decay, "a number in [0, 1)")


@dataclass(kw_only=True)
class ScalingConfig(Section):
    """Data-parallel layout. The global batch is what the LR rule and steps/epoch see."""
    num_workers: int = 1
    batch_per_worker: int = 32
    grad_accum_steps: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0         # only when use_gpu
    sync_batchnorm: bool = False         # default: BN statistics stay per worker (Goyal et al.); GPU only

    def _validate(self):
        _check(not self.sync_batchnorm or self.use_gpu, "sync_batchnorm", self.sync_batchnorm,
               "false unless use_gpu is true (torch's SyncBatchNorm runs on GPUs only)")
        _check(self.num_workers >= 1, "num_workers", self.num_workers, ">= 1")
        _check(self.batch_per_worker >= 1, "batch_per_worker", self.batch_per_worker, ">= 1")
        _check(self.grad_accum_steps >= 1, "grad_accum_steps", self.grad_accum_steps, ">= 1")
        _check(self.cpus_per_worker > 0, "cpus_per_worker", self.cpus_per_worker, "> 0")
        _check(self.gpus_per_worker > 0, "gpus_per_worker", self.gpus_per_worker, "> 0")

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step across all workers."""
        return self.batch_per_worker * self.num_workers * self.grad_accum_steps


@dataclass(kw_only=True)
class CheckpointConfig(Section):
    """What the loop keeps: the latest and the best-by-``metric`` checkpoints."""
    every_epochs: int = 1                # a checkpoint every N epochs, at the last, and at every new best
    metric: str = "val_acc"
    mode: Literal["max", "min"] = "max"

    def _validate(self):
        _check(self.every_epochs >= 1, "every_epochs", self.every_epochs, ">= 1")


@dataclass(kw_only=True)
class TrainConfig(Section):
    """One training run. ``TrainConfig.from_dict`` is the only way user input becomes a config."""
    epochs: int = 10
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    regularization: RegularizationConfig = field(default_factory=RegularizationConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def _validate(self):
        _check(self.epochs >= 1, "epochs", self.epochs, ">= 1")

    def flat(self) -> dict[str, Any]:
        """Dotted-key view for logging (MLflow params): {"optim.base_lr": 0.1, ...}."""
        return flatten(self.to_dict())

    def with_updates(self, updates: dict[str, Any]) -> "TrainConfig":
        """A new validated config with dotted-path ``updates`` applied (dict values merge)."""
        return TrainConfig.from_dict(apply_dotted(self.to_dict(), updates))


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def apply_dotted(base: dict, updates: dict[str, Any]) -> dict:
    """Apply {"optim.base_lr": 0.3, "schedule": {...}} onto a nested dict (copy).

    A dict value merges into the section it names (so a sampled ``schedule`` choice keeps the
    base file's warmup); any other value replaces. Unknown paths surface as ConfigError when
    the result is validated.
    """
    import copy

    out = copy.deepcopy(base)
    for path, value in updates.items():
        node = out
        parts = path.split(".")
        for p in parts[:-1]:
            nxt = node.get(p)
            if not isinstance(nxt, dict):
                nxt = node[p] = {}
            node = nxt
        leaf = parts[-1]
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf] = {**node[leaf], **copy.deepcopy(value)}
        else:
            node[leaf] = copy.deepcopy(value)
    return out


def field_paths(cls: type[Section] = TrainConfig, prefix: str = "") -> dict[str, Any]:
    """Every dotted path of the tree mapped to its annotation (sections included)."""
    out: dict[str, Any] = {}
    for name, tp in typing.get_type_hints(cls).items():
        path = f"{prefix}.{name}" if prefix else name
        out[path] = tp
        if isinstance(tp, type) and issubclass(tp, Section):
            out.update(field_paths(tp, path))
    return out
