"""Search-space files: YAML -> validated ``ExperimentSpec`` (the Tune/Optuna space is built from it in
tuning.driver.search).

The file format (see search_spaces/ and DESIGN.md) has three sections: ``experiment`` (how to
search), ``train`` (the fixed part of a TrainConfig) and ``space`` (dotted paths into train, each
a distribution). Every error names the file, the key and what was expected, and is raised here,
before anything starts on a cluster: every value a distribution can produce (its bounds, each
choice) is applied to the base config and validated.

No Ray, MLflow or torch here: ``schedtune validate`` and every command import it.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from training.config import ConfigError, TrainConfig, field_paths, is_field_path
from tuning.spec.checks import SpaceWarning, check_spec
from tuning.spec.code import prepare_code
from tuning.spec.errors import SpaceError
from tuning.spec.files import read_yaml_file
from tuning.spec.options import REPEAT_INDEX, ExperimentOptions, check_against_space


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
    code_dir: Optional[str] = None  # where the plug-ins (package.module:callable) import from; None: no plug-in
    warnings: list[SpaceWarning] = field(default_factory=list)   # legal but surely a mistake (tuning.spec.checks)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def indexed_choices(self) -> set[str]:
        """Choice keys sampled as an index: Optuna takes only scalar categories, so a choice
        over sub-configs (e.g. whole schedules) is searched by position under optuna_tpe/_nsga2; so
        is it by a random search with a warm start, whose first points Tune deep-merges into the param
        space (a section-valued point would be merged into the choice's domain object itself)."""
        o = self.options
        if not (o.search.startswith("optuna") or o.warm_start.from_ is not None):
            return set()
        return {k for k, d in self.space.items()
                if d.kind == "choice" and not all(isinstance(a, (str, int, float, bool)) for a in d.args)}

    def decode(self, sample: dict[str, Any]) -> dict[str, Any]:
        """The sampled values of the space's keys, choices searched by index mapped back."""
        return {k: self.space[k].args[v] if k in self.indexed_choices else v
                for k, v in sample.items() if k in self.space}

    def trial_config(self, sample: dict[str, Any]) -> TrainConfig:
        """The TrainConfig of one trial: the sampled dotted paths applied onto the base; under
        ``scheduler.rung_eval: cooldown`` the cooldown forks at ASHA's rung epochs (``train.rung_eval``);
        under ``repeats`` the repeat's seed (train.seed + its index, REPEAT_INDEX in the sample)."""
        repeat = {"seed": self.base.seed + sample[REPEAT_INDEX]} if REPEAT_INDEX in sample else {}
        return self.base.with_updates({**self.decode(sample), **repeat,
                                       **self.options.scheduler.rung_eval_updates(self.base.epochs)})

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
        extras = ([f"objectives: {', '.join(f'{m.name} ({m.mode})' for m in o.objectives)}; the Pareto front "
                   f"goes to the parent run"] if o.multi_objective else [])
        extras += [f"repeats: {o.repeats} seeds per config (train.seed + 0..{o.repeats - 1}), ranked by their "
                   f"mean"] if o.repeats > 1 else []
        extras += [f"warm start: the best {o.warm_start.top_k} completed trials of experiment "
                   f"{o.warm_start.from_!r}"] if o.warm_start.from_ else []
        lines[-1:-1] = extras
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


DICT_FILE = "<dict>"   # what errors and MLflow call a spec given as a dict


def load_spec(source: str | Path | dict, overrides: Optional[dict[str, Any]] = None, *,
              code_dir: str | Path | None = None, file: Optional[str] = None) -> ExperimentSpec:
    """Read and validate a search-space file (a path), or the same document as a dict.
    ``overrides`` are dotted paths applied to it (e.g. ``{"experiment.num_samples": 4,
    "train.scaling.num_workers": 1}``) and validated the same way, attributed to the file.

    ``code_dir``: where the plug-ins' modules (``package.module:callable``) are imported from
    (default: the directory holding the file; the working directory for a dict). When the spec
    names one, that directory goes first on ``sys.path`` (checked for folders that collide with
    schedtune's packages), and every plug-in name is resolved here (tuning.spec.code). ``file``:
    what errors call a dict (default ``<dict>``)."""
    from training.config import apply_dotted

    if isinstance(source, dict):
        file = file or DICT_FILE
        text, doc = _dict_text(file, source), copy.deepcopy(source)
        code_dir = Path.cwd() if code_dir is None else code_dir
    else:
        path = Path(source)
        file = file or str(path)
        try:
            text, doc = read_yaml_file(path)
        except SpaceError as e:   # named by its path: under the name it was given (stdin)
            raise SpaceError(file, e.key, e.value, e.expected) from None
        code_dir = path.resolve().parent if code_dir is None else code_dir
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
        if not is_field_path(str(key)):
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
    variants = [(f"space.{k}", base.with_updates({k: v})) for k, d in space.items() for v in d.extremes()]
    spec = ExperimentSpec(file, options, base, space, text, prepare_code(file, code_dir, base, variants))
    spec.warnings.extend(check_spec(spec, total_trials(spec)))   # semantic checks: errors raise SpaceError
    return spec


def _dict_text(file: str, doc: dict) -> str:
    """A dict spec as YAML text (what MLflow logs as the search-space file and its hash covers)."""
    import yaml

    try:
        return yaml.safe_dump(doc, sort_keys=False)
    except yaml.YAMLError as e:   # a tuple, a set, an object: not what a file could hold
        raise SpaceError(file, "<dict>", None, f"plain YAML values: mappings, lists, strings, numbers, "
                                               f"booleans, null ({str(e).splitlines()[0][:120]})") from None


def _check_search(file: str, o: ExperimentOptions, space: dict[str, Dist]) -> None:
    check_against_space(file, o, space)
    if o.search == "grid":
        bad = [k for k, d in space.items() if d.kind not in ("grid", "choice")]
        if bad:
            raise SpaceError(file, f"space.{bad[0]}", space[bad[0]].kind,
                             "grid or choice (experiment.search: grid enumerates; use random for ranges)")
        if not space:
            raise SpaceError(file, "space", {}, "at least one grid/choice entry with search: grid")
    if o.search.startswith("optuna"):
        bad = [k for k, d in space.items() if d.kind == "grid"]
        if bad:
            raise SpaceError(file, f"space.{bad[0]}", "grid", f"loguniform, uniform, int or choice with {o.search}")


def grid_size(spec: ExperimentSpec) -> int:
    """How many points the space's grids enumerate (1 without grids): Tune runs each sample on all of them."""
    n = 1
    for d in spec.space.values():
        if d.kind == "grid" or (spec.options.search == "grid" and d.kind == "choice"):
            n *= len(d.args)
    return n


def total_trials(spec: ExperimentSpec) -> int:
    """How many trials the experiment runs: ``num_samples`` for every point of the grids, each ``repeats`` times."""
    return spec.options.num_samples * grid_size(spec) * spec.options.repeats


