"""The typed config tree: the single source of truth for one training run.

YAML files, CLI flags and Ray Tune samples are all layers applied onto this tree
(``TrainConfig.from_dict``). Every field is keyword-only, typed, and validated at
construction; an error names the dotted key, the bad value and what was expected.
Units: ``epochs`` are epochs, ``*_steps`` are optimizer steps, ``batch_per_worker``
is per worker (the global batch is derived, see ``ScalingConfig.global_batch``).
"""
from __future__ import annotations

import copy
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from training.names import (DATA_PLUGINS, DATASET_NAMES, MODEL_NAMES, MODEL_PLUGINS, RESERVED_ARGS,  # noqa: F401
                            _check_args, _check_name, plugin_form)
from training.sources import RAY_DATA, SourceConfig
from training.typed import ConfigError, Section, _check  # noqa: F401  (ConfigError: every caller imports it from here)


# ---------------------------------------------------------------------------- sections

@dataclass(kw_only=True)
class DataConfig(Section):
    """Which dataset, how it is split, and input-side augmentation (images only).

    ``name``: a key of training.data.DATASETS (DATASET_NAMES), ``torchvision:<Dataset>`` read from
    ``root``, ``package.module:callable`` (the user's factory; contracts in training.plugins), or
    ``raydata``: the files ``source`` names, streamed by Ray Data (SourceConfig; training/ never
    loads them: tuning.driver.ingest hands ``fit`` their shards).
    """
    name: str = "digits"                 # registry key, plug-in or raydata (see above)
    source: SourceConfig = field(default_factory=SourceConfig)   # data.name: raydata only
    root: Optional[str] = None           # cifar10 / imagefolder / torchvision:<Dataset>: local directory
    download: bool = False               # cifar10 / torchvision:<Dataset>: fetch into root if missing (never implicit)
    args: dict[str, Any] = field(default_factory=dict)  # plug-ins: extra keyword arguments (data.args.<key>)
    val_fraction: float = 0.2            # fraction held out for validation (ignored where a split exists)
    seed: int = 0                        # the train/val split's seed (not the training seed)
    num_samples: Optional[int] = None    # mnist1d / synthetic size; a cap on the training set elsewhere
    image_size: int = 32                 # imagefolder: resize + center-crop side
    augment: bool = False                # random crop (pad 4) + horizontal flip on image batches
    # The input pipeline (training.pipeline): DataLoader worker processes ("auto": none for in-memory
    # datasets, whose batch is one index op; else the worker's CPUs (scaling.cpus_per_worker) less the
    # one that trains), and, with worker processes only, the batches each keeps ready and whether they
    # live for the whole fit (created once, reshuffled every epoch) instead of being restarted per epoch.
    loader_workers: Union[int, Literal["auto"]] = "auto"
    prefetch_factor: int = 2
    persistent_workers: bool = True

    def _validate(self):
        raydata = self.name == RAY_DATA
        if raydata:
            try:
                self.source.check_complete()
            except ConfigError as e:
                raise e.with_source(None, "source") from None   # type: ignore[arg-type]
            _check(self.root is None and not self.download, "root" if self.root else "download",
                   self.root or self.download, "unset with data.name: raydata (its files are data.source.train/val)")
            _check(self.num_samples is None, "num_samples", self.num_samples,
                   "null with data.name: raydata (a streamed split has no fixed first rows to keep: cap its files)")
        else:
            _check_name(self.name, (*DATASET_NAMES, RAY_DATA), DATA_PLUGINS)
            unset = SourceConfig().to_dict()
            _check(self.source == SourceConfig(), "source",
                   {k: v for k, v in self.source.to_dict().items() if v != unset[k]},
                   f"unset unless data.name is {RAY_DATA!r}")
        _check_args("data", self.name, self.args)
        _check(0.0 < self.val_fraction < 1.0, "val_fraction", self.val_fraction, "a number in (0, 1)")
        _check(self.num_samples is None or self.num_samples > 0, "num_samples", self.num_samples, "> 0")
        _check(self.image_size >= 8, "image_size", self.image_size, ">= 8")
        _check(self.loader_workers == "auto" or self.loader_workers >= 0, "loader_workers", self.loader_workers,
               "'auto' or >= 0")
        _check(self.prefetch_factor >= 1, "prefetch_factor", self.prefetch_factor, ">= 1")


@dataclass(kw_only=True)
class ModelConfig(Section):
    """Architecture and transfer learning.

    ``name``: a key of training.models.MODELS (MODEL_NAMES), ``timm:<architecture>``,
    ``torchvision:<architecture>``, or ``package.module:callable`` (the user's factory; contracts in
    training.plugins). ``args``: the plug-in's extra keyword arguments, each searchable as ``model.args.<key>``.
    """
    name: str = "mlp"
    args: dict[str, Any] = field(default_factory=dict)  # plug-ins only: keyword arguments of the builder
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
        _check_name(self.name, MODEL_NAMES, MODEL_PLUGINS)
        _check_args("model", self.name, self.args)
        form = plugin_form(self.name)
        _check(self.dropout == 0 or form is None or form[0] != "callable", "dropout", self.dropout,
               "0 for a package.module:callable model (schedtune cannot place it: give your factory its own "
               "dropout argument under model.args, searchable as model.args.<key>)")
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
    name: Literal["constant", "step", "cosine", "linear", "inverse_sqrt", "cyclic_cosine", "wsd"] = "constant"
    # step: where the LR drops, as fractions of the post-warmup phase (the steps after warmup; with no
    # warmup, of all steps): milestone m is at step W + round(m * (total_steps - W)), W = warmup steps
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    gamma: float = 0.1                   # step: factor applied at each milestone
    min_factor: float = 0.0              # cosine / linear / cyclic_cosine / wsd: floor as a fraction of peak
    # wsd (warmup-stable-decay): the peak, then a linear decay to min_factor over this last fraction
    # of the post-warmup phase (1.0: the linear schedule)
    decay_fraction: float = 0.2
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
        _check(0 < self.decay_fraction <= 1, "decay_fraction", self.decay_fraction, "a number in (0, 1]")
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
    # Where Ray puts a trial's worker group (Train's placement strategy): "pack" fills as few nodes as
    # possible (DDP's all-reduce stays on a node's memory bus); "spread" puts each worker on a node of
    # its own where nodes are free (one lost node costs one worker's share, not the whole group).
    # Both are soft: a group that does not fit the preference still starts.
    placement: Literal["pack", "spread"] = "pack"

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
class RungEvalConfig(Section):
    """Cooldown forks (training.cooldown): at the end of each epoch in ``epochs``, a copy of the model
    and optimizer trains ``cooldown_fraction`` x the optimizer steps so far with its LR decaying
    linearly to 0, and is evaluated on the validation split; its ``rung_val_acc``, ``rung_val_loss``
    and ``fork_steps`` join that epoch's metrics. The run itself goes on exactly as if the fork never
    happened. ``experiment.scheduler.rung_eval: cooldown`` sets both keys (ASHA's rung epochs); set
    by hand, the forks are measured without a scheduler deciding on them. Off by default."""
    epochs: list[int] = field(default_factory=list)   # 1-based epochs that end with a fork; [] = no forks
    cooldown_fraction: float = 0.1

    def _validate(self):
        _check(all(e >= 1 for e in self.epochs) and self.epochs == sorted(set(self.epochs)), "epochs", self.epochs,
               "increasing epoch numbers >= 1 (the epochs that end with a cooldown fork)")
        _check(0 < self.cooldown_fraction <= 1, "cooldown_fraction", self.cooldown_fraction,
               "a number in (0, 1] (the fork's steps as a fraction of the steps so far)")


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
    rung_eval: RungEvalConfig = field(default_factory=RungEvalConfig)   # cooldown forks at rung epochs
    # Precision and kernels (training.precision). precision: the autocast dtype of forward passes
    # (weights, optimizer state and the loss stay fp32); fp16 adds a gradient scaler whose state is
    # checkpointed. bf16 and fp16 also run on CPU (fp16 slowly there: a way to test the GPU path).
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False          # NHWC weights and inputs for models with 2-D convolutions; else a no-op
    # torch.compile mode, compiled once per worker; false/true are accepted for off/default (YAML reads
    # a bare `off` as false). Checkpoints, EMA and exports hold the uncompiled module's weights.
    compile: Union[bool, Literal["off", "default", "reduce-overhead", "max-autotune"]] = "off"

    def __post_init__(self):
        if isinstance(self.compile, bool):
            self.compile = "default" if self.compile else "off"

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


_ARGS_PATH = re.compile(r"(?:model|data)\.args\.[A-Za-z_]\w*")


def is_field_path(path: str) -> bool:
    """Does the dotted ``path`` name a config field? ``field_paths()`` keys, and ``model.args.<key>`` /
    ``data.args.<key>`` for any identifier key (a plug-in's keyword arguments are not known here:
    training.plugins.check_resolvable checks them against the factory)."""
    return path in field_paths() or _ARGS_PATH.fullmatch(path) is not None


def field_paths(cls: type[Section] = TrainConfig, prefix: str = "") -> dict[str, Any]:
    """Every dotted path of the tree mapped to its annotation (sections included; not the keys under
    ``model.args`` / ``data.args``, which any plug-in defines: see ``is_field_path``)."""
    out: dict[str, Any] = {}
    for name, tp in typing.get_type_hints(cls).items():
        path = f"{prefix}.{name}" if prefix else name
        out[path] = tp
        if isinstance(tp, type) and issubclass(tp, Section):
            out.update(field_paths(tp, path))
    return out
