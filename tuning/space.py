"""Search-space files: YAML -> validated ``ExperimentSpec`` -> Ray Tune / Optuna spaces.

The file format (see search_spaces/ and DESIGN.md) has three sections: ``experiment`` (how to
search), ``train`` (the fixed part of a TrainConfig) and ``space`` (dotted paths into train, each
a distribution). Every error names the file, the key and what was expected, and is raised here,
before anything starts on a cluster: every value a distribution can produce (its bounds, each
choice) is applied to the base config and validated.

This module imports no Ray at import time; ``to_tune`` imports it lazily.
"""
from __future__ import annotations

import difflib
import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from training.config import ConfigError, Section, TrainConfig, field_paths


class SpaceError(ValueError):
    """A search-space file is wrong: ``file: key: got value, expected ...``."""

    def __init__(self, file: str, key: str, value: Any, expected: str):
        self.file, self.key, self.value, self.expected = file, key, value, expected
        super().__init__(f"{file}: {key}: got {value!r}, expected {expected}")


@dataclass(kw_only=True)
class SchedulerConfig(Section):
    """Early stopping: ASHA (time_attr = epoch, max_t = train.epochs) or FIFO (run to the end)."""
    name: Literal["asha", "fifo"] = "asha"
    grace_period: int = 1          # epochs every trial gets before it can be stopped
    reduction_factor: float = 3.0  # keep the top 1/reduction_factor at each rung

    def _validate(self):
        if self.grace_period < 1:
            raise ConfigError("grace_period", self.grace_period, ">= 1")
        if self.reduction_factor <= 1:
            raise ConfigError("reduction_factor", self.reduction_factor, "> 1")


@dataclass(kw_only=True)
class ExperimentOptions(Section):
    name: str = "schedtune"
    metric: str = "val_acc"
    mode: Literal["max", "min"] = "max"
    num_samples: int = 8
    search: Literal["random", "optuna_tpe", "grid"] = "random"
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    max_concurrent_trials: Union[int, Literal["auto"]] = "auto"
    seed: int = 0                  # the searcher's seed: a rerun samples the same configs

    def _validate(self):
        if self.num_samples < 1:
            raise ConfigError("num_samples", self.num_samples, ">= 1")
        if self.max_concurrent_trials != "auto" and self.max_concurrent_trials < 1:
            raise ConfigError("max_concurrent_trials", self.max_concurrent_trials, "'auto' or >= 1")
        if not self.name or any(c in self.name for c in "/\\"):
            raise ConfigError("name", self.name, "a non-empty name without slashes")


@dataclass(frozen=True)
class Dist:
    """One searched dimension: ``kind`` in DISTRIBUTIONS and its arguments."""
    kind: str
    args: tuple

    def describe(self) -> str:
        if self.kind in ("choice", "grid"):
            return f"{self.kind} of {len(self.args)}: " + ", ".join(_short(a) for a in self.args)
        return f"{self.kind}[{self.args[0]:g}, {self.args[1]:g}]"

    def extremes(self) -> list[Any]:
        """Values that span what this distribution can produce (for validation)."""
        return list(self.args)


def _short(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {x}" for k, x in v.items()) + "}"
    return repr(v)


DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice", "grid")
SECTIONS = ("experiment", "train", "space")   # the top-level keys of a search-space file


@dataclass
class ExperimentSpec:
    file: str
    options: ExperimentOptions
    base: TrainConfig
    space: dict[str, Dist]
    text: str                      # the file as written (logged to MLflow)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def indexed_choices(self) -> set[str]:
        """Choice keys sampled as an index: Optuna takes only scalar categories, so a choice
        over sub-configs (e.g. whole schedules) is searched by position under optuna_tpe."""
        if self.options.search != "optuna_tpe":
            return set()
        return {k for k, d in self.space.items()
                if d.kind == "choice" and not all(isinstance(a, (str, int, float, bool)) for a in d.args)}

    def decode(self, sample: dict[str, Any]) -> dict[str, Any]:
        """The sampled values of the space's keys, choices searched by index mapped back."""
        return {k: self.space[k].args[v] if k in self.indexed_choices else v
                for k, v in sample.items() if k in self.space}

    def trial_config(self, sample: dict[str, Any]) -> TrainConfig:
        """The TrainConfig of one trial: the sampled dotted paths applied onto the base."""
        return self.base.with_updates(self.decode(sample))

    def describe(self) -> str:
        o = self.options
        lines = [f"experiment {o.name!r}: {o.search} search, {o.num_samples} samples, "
                 f"{o.mode} {o.metric}, scheduler {o.scheduler.name}"
                 + (f" (grace {o.scheduler.grace_period}, reduction {o.scheduler.reduction_factor:g})"
                    if o.scheduler.name == "asha" else "")
                 + f", max_concurrent_trials {o.max_concurrent_trials}",
                 f"base: {self.base.epochs} epochs, data {self.base.data.name}, model {self.base.model.name}, "
                 f"optim {self.base.optim.name} base_lr {self.base.optim.base_lr:g}, "
                 f"global batch {self.base.scaling.global_batch} ({self.base.scaling.num_workers} workers)",
                 "space:"]
        width = max((len(k) for k in self.space), default=0)
        lines += [f"  {k:<{width}}  {d.describe()}" for k, d in self.space.items()] or ["  (empty: one config)"]
        return "\n".join(lines)


def _parse_dist(file: str, key: str, spec: Any) -> Dist:
    expected = f"a mapping with one of {list(DISTRIBUTIONS)}, e.g. {{loguniform: [1.0e-4, 1.0e-1]}}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise SpaceError(file, key, spec, expected)
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise SpaceError(file, f"{key}.{kind}", args, f"one of {list(DISTRIBUTIONS)}")
    where = f"{key}.{kind}"
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise SpaceError(file, where, args, "a non-empty list of values")
        return Dist(kind, tuple(args))
    if not (isinstance(args, list) and len(args) == 2):
        raise SpaceError(file, where, args, "a list [low, high]")
    number = int if kind == "int" else (int, float)
    if not all(isinstance(a, number) and not isinstance(a, bool) and math.isfinite(a) for a in args):
        raise SpaceError(file, where, args, f"[low, high] as {'integers' if kind == 'int' else 'finite numbers'}")
    low, high = args
    if low >= high:
        raise SpaceError(file, where, args, "low < high")
    if kind == "loguniform" and low <= 0:
        raise SpaceError(file, where, args, "0 < low < high (a log-uniform range needs positive bounds)")
    return Dist(kind, (low, high))


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: ``1e-4`` is a number (YAML 1.1, which PyYAML
    implements, reads it as the string '1e-4' because it lacks a dot), and no duplicate keys
    (PyYAML keeps the last one silently: an edit that never takes effect)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"found duplicate key {key!r}",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """YAML text -> Python values, the way every schedtune input is read (files, ``--set``)."""
    return yaml.load(text, Loader=_Loader)


def _load_yaml(path: Path) -> tuple[str, Any]:
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SpaceError(file, "<file>", None, f"a readable file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise SpaceError(file, f"byte {e.start}", None, "UTF-8 text (YAML)") from None
    try:
        return text, load_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "<file>"
        raise SpaceError(file, where, None, f"valid YAML ({getattr(e, 'problem', e)})") from None
    except (ValueError, TypeError) as e:   # a value PyYAML's constructors refuse: 2001-13-45, !!int abc
        raise SpaceError(file, "<file>", None, f"valid YAML values ({str(e).splitlines()[0][:200]})") from None
    except RecursionError:
        raise SpaceError(file, "<file>", None, "YAML nested less deeply (the parser's recursion limit)") from None


def load_spec(path: str | Path, overrides: Optional[dict[str, Any]] = None) -> ExperimentSpec:
    """Read and validate a search-space file. ``overrides`` are dotted paths applied to it
    (e.g. ``{"experiment.num_samples": 4, "train.scaling.num_workers": 1}``) and validated
    the same way, attributed to the file."""
    from training.config import apply_dotted

    path = Path(path)
    file = str(path)
    text, doc = _load_yaml(path)
    if not isinstance(doc, dict):
        raise SpaceError(file, "<top level>", doc, "a mapping with keys experiment, train, space")
    unknown = sorted(set(doc) - set(SECTIONS))
    if unknown:
        raise SpaceError(file, unknown[0], doc[unknown[0]], "one of the top-level keys experiment, train, space")
    overrides = dict(overrides or {})
    stray = sorted(k for k in overrides if k.split(".", 1)[0] not in SECTIONS)
    if stray:
        raise SpaceError(file, stray[0], overrides[stray[0]], "a dotted key under experiment., train. or space.")
    # Keys under `space` are dotted paths themselves: `space.optim.base_lr` names one entry.
    space_overrides = {k[len("space."):]: overrides.pop(k) for k in list(overrides) if k.startswith("space.")}
    doc = apply_dotted({k: doc.get(k) or {} for k in SECTIONS}, overrides)
    if isinstance(doc["space"], dict):
        doc["space"].update(space_overrides)
    try:
        options = ExperimentOptions.from_dict(doc["experiment"], "experiment")
        base = TrainConfig.from_dict(doc["train"], "train")
    except ConfigError as e:
        raise SpaceError(file, e.key, e.value, e.expected) from None
    if not isinstance(doc["space"], dict):
        raise SpaceError(file, "space", doc["space"], "a mapping of dotted paths to distributions")
    paths = field_paths()
    space: dict[str, Dist] = {}
    for key, spec in doc["space"].items():
        where = f"space.{key}"
        if key not in paths:
            near = difflib.get_close_matches(str(key), list(paths), n=1, cutoff=0.75)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise SpaceError(file, where, spec, f"a dotted path into train that names a config field{hint}")
        dist = _parse_dist(file, where, spec)
        for value in dist.extremes():
            try:
                base.with_updates({key: value})
            except ConfigError as e:
                raise SpaceError(file, where, value, f"values valid for train.{e.key}: {e.expected}") from None
        space[key] = dist
    _check_search(file, options, space)
    return ExperimentSpec(file, options, base, space, text)


def _check_search(file: str, o: ExperimentOptions, space: dict[str, Dist]) -> None:
    if o.search == "grid":
        bad = [k for k, d in space.items() if d.kind not in ("grid", "choice")]
        if bad:
            raise SpaceError(file, f"space.{bad[0]}", space[bad[0]].kind,
                             "grid or choice (experiment.search: grid enumerates; use random for ranges)")
        if not space:
            raise SpaceError(file, "space", {}, "at least one grid/choice entry with search: grid")
    if o.search == "optuna_tpe":
        bad = [k for k, d in space.items() if d.kind == "grid"]
        if bad:
            raise SpaceError(file, f"space.{bad[0]}", "grid", "loguniform, uniform, int or choice with optuna_tpe")


def grid_size(spec: ExperimentSpec) -> int:
    """How many points the space's grids enumerate (1 without grids): Tune runs each sample on all of them."""
    n = 1
    for d in spec.space.values():
        if d.kind == "grid" or (spec.options.search == "grid" and d.kind == "choice"):
            n *= len(d.args)
    return n


def total_trials(spec: ExperimentSpec) -> int:
    """How many trials the experiment runs: ``num_samples`` for every point of the grids."""
    return spec.options.num_samples * grid_size(spec)


def to_tune(spec: ExperimentSpec) -> dict[str, Any]:
    """The Ray Tune param space: {dotted path: tune distribution} (grid crosses with samples)."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, d in spec.space.items():
        if d.kind == "loguniform":
            out[key] = tune.loguniform(*d.args)
        elif d.kind == "uniform":
            out[key] = tune.uniform(*d.args)
        elif d.kind == "int":
            out[key] = tune.randint(d.args[0], d.args[1] + 1)   # inclusive high
        elif key in spec.indexed_choices:
            out[key] = tune.choice(list(range(len(d.args))))
        elif d.kind == "grid" or spec.options.search == "grid":
            out[key] = tune.grid_search(list(d.args))
        else:
            out[key] = tune.choice(list(d.args))
    return out
