"""Malformed inputs by construction, for tests/tuning/cli/test_bad_input.py: a valid experiment (GOOD) with
one to three independent mutations, each wrong on its own and carrying the key its error must
name and a fragment of the expectation. The oracle (``fits``, ``fragment``, ``RANGES``, the space
rules) is written here from the file format (DESIGN.md, "The search-space file"), not read back
from the code under test."""
from __future__ import annotations

import copy
import math
import string
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union

from hypothesis import strategies as st

from training.config import ScheduleConfig, Section, field_paths
from tuning.spec import DISTRIBUTIONS, ExperimentOptions

GOOD = {
    "experiment": {"name": "fuzz", "metric": "val_acc", "mode": "max", "num_samples": 2,
                   "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 3}},
    "train": {"epochs": 2, "data": {"name": "digits"}, "model": {"name": "mlp", "hidden": [16]},
              "optim": {"base_lr": 0.1}, "scaling": {"num_workers": 1, "batch_per_worker": 32}},
    "space": {"optim.base_lr": {"loguniform": [1e-3, 1.0]}, "model.dropout": {"uniform": [0.0, 0.5]},
              "schedule": {"choice": [{"name": "cosine"}, {"name": "step", "gamma": 0.5}]}},
}
TRAIN_PATHS = field_paths()                                       # "optim.base_lr" -> annotation
FIELDS = {("train", *p.split(".")): tp for p, tp in TRAIN_PATHS.items()}
FIELDS.update({("experiment", *p.split(".")): tp for p, tp in field_paths(ExperimentOptions).items()})
SECTIONS = [("train",), ("experiment",)] + [p for p, tp in FIELDS.items()
                                            if isinstance(tp, type) and issubclass(tp, Section)]
SCHEDULES = typing.get_args(typing.get_type_hints(ScheduleConfig)["name"])

# Strings are letters only: once dumped, YAML never reads them back as a number, a bool or null.
letters = st.text(alphabet=string.ascii_letters, max_size=6)
name = st.text(alphabet=string.ascii_lowercase, min_size=1, max_size=8)
finite = st.floats(allow_nan=False, allow_infinity=False)
# Strictly negative floats. Not ``finite.filter(lambda v: v < 0)``: Hypothesis rewrites that filter
# into a bound (max_value=0, exclude_max) that still yields -0.0, which is a valid ">= 0".
negative = st.floats(max_value=-1e-12, allow_nan=False, allow_infinity=False)
junk = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), finite,
                 st.sampled_from([math.nan, math.inf, -math.inf]), letters,
                 st.lists(st.one_of(st.integers(-3, 3), letters), max_size=3),
                 st.dictionaries(name, st.integers(-1, 1), max_size=2))


@dataclass(frozen=True)
class Mutation:
    sets: tuple            # ((doc path, value), ...) written into the document
    key: str               # the key the error must name
    expected: str          # a fragment of what the error must say was expected


def fits(tp: Any, v: Any) -> bool:
    """Does ``v`` have type ``tp`` as the file format defines it (ints where floats go; floats finite)?"""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(fits(a, v) for a in typing.get_args(tp))
    if tp is type(None):
        return v is None
    if origin is Literal:
        return any(v == a and type(v) is type(a) for a in typing.get_args(tp))
    if origin is list:
        return isinstance(v, list) and all(fits(typing.get_args(tp)[0], x) for x in v)
    if origin is dict:   # free-form keyword arguments (model.args): any mapping with string keys
        return isinstance(v, dict) and all(isinstance(k, str) for k in v)
    if isinstance(tp, type) and issubclass(tp, Section):
        return isinstance(v, dict)
    if tp is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return isinstance(v, tp) and (tp is bool or not isinstance(v, bool))


def fragment(tp: Any) -> str:
    """What a type error at a field of type ``tp`` must say was expected."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return fragment(next(a for a in typing.get_args(tp) if a is not type(None)))
    if origin is Literal:
        return "one of"
    if origin is list:
        return "a list of"
    if origin is dict or (isinstance(tp, type) and issubclass(tp, Section)):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "number", str: "a string"}[tp]


def key_of(path: tuple) -> str:
    return ".".join(path)


@st.composite
def wrong_type(draw, scope: str) -> Mutation:
    path = draw(st.sampled_from([p for p in FIELDS if p[0] == scope or scope == "file"]))
    tp = FIELDS[path]
    if typing.get_origin(tp) is list and draw(st.booleans()):   # one bad item in a list
        item = typing.get_args(tp)[0]
        good = st.integers(1, 64) if item is int else st.floats(0.1, 0.9)
        items = draw(st.lists(good, max_size=3))
        i = draw(st.integers(0, len(items)))
        items.insert(i, draw(junk.filter(lambda v: not fits(item, v) and not isinstance(v, list))))
        return Mutation(((path, items),), f"{key_of(path)}[{i}]", fragment(item))
    value = draw(junk.filter(lambda v: not fits(tp, v) and not (isinstance(v, list) and typing.get_origin(tp) is list)))
    return Mutation(((path, value),), key_of(path), fragment(tp))


def _not_in(lo, hi):  # finite floats outside [lo, hi)
    return finite.filter(lambda v: not lo <= v < hi)


RANGES = {   # path -> (values out of its range, the expectation)
    "experiment.num_samples": (st.integers(max_value=0), ">= 1"),
    "experiment.max_concurrent_trials": (st.integers(max_value=0), "'auto' or >= 1"),
    "experiment.name": (st.sampled_from(["", "a/b", "x\\y", "runs/"]), "without slashes"),
    "experiment.scheduler.grace_period": (st.integers(max_value=0), ">= 1"),
    "experiment.scheduler.reduction_factor": (finite.filter(lambda v: v <= 1), "> 1"),
    "train.epochs": (st.integers(max_value=0), ">= 1"),
    "train.data.val_fraction": (finite.filter(lambda v: not 0 < v < 1), "(0, 1)"),
    "train.data.image_size": (st.integers(max_value=7), ">= 8"),
    "train.data.loader_workers": (st.integers(max_value=-1), ">= 0"),
    "train.model.hidden": (st.lists(st.integers(-5, 64), min_size=1, max_size=3).filter(lambda h: min(h) <= 0),
                           "positive widths"),
    "train.model.dropout": (_not_in(0, 1), "[0, 1)"),
    "train.optim.base_lr": (finite.filter(lambda v: v <= 0), "> 0"),
    "train.optim.momentum": (_not_in(0, 1), "[0, 1)"),
    "train.optim.weight_decay": (negative, ">= 0"),
    "train.optim.betas": (st.lists(st.floats(0, 0.99), max_size=4).filter(lambda b: len(b) != 2),
                          "two numbers in [0, 1)"),
    "train.schedule.gamma": (finite.filter(lambda v: not 0 < v <= 1), "(0, 1]"),
    "train.schedule.milestones": (st.lists(st.floats(-1, 2), min_size=1, max_size=3).filter(
        lambda m: not (all(0 < x < 1 for x in m) and m == sorted(m))), "increasing fractions"),
    "train.schedule.warmup_epochs": (negative, ">= 0"),
    "train.regularization.label_smoothing": (_not_in(0, 1), "[0, 1)"),
    "train.regularization.cutout": (st.integers(max_value=-1), ">= 0"),
    "train.scaling.num_workers": (st.integers(max_value=0), ">= 1"),
    "train.scaling.batch_per_worker": (st.integers(max_value=0), ">= 1"),
    "train.scaling.cpus_per_worker": (finite.filter(lambda v: v <= 0), "> 0"),
    "train.checkpoint.every_epochs": (st.integers(max_value=0), ">= 1"),
}


@st.composite
def out_of_range(draw, scope: str) -> Mutation:
    key = draw(st.sampled_from([k for k in RANGES if scope == "file" or k.startswith(scope + ".")]))
    values, expected = RANGES[key]
    return Mutation(((tuple(key.split(".")), draw(values)),), key, expected)


@st.composite
def unknown_key(draw, scope: str) -> Mutation:
    if scope == "file" and draw(st.integers(0, 9)) == 0:
        k = draw(name.filter(lambda n: n not in GOOD))
        return Mutation((((k,), draw(junk)),), k, "one of the top-level keys")
    section = draw(st.sampled_from([s for s in SECTIONS if scope == "file" or s[0] == scope]))
    k = draw(name.filter(lambda n: section + (n,) not in FIELDS))
    return Mutation(((section + (k,), draw(junk)),), key_of(section + (k,)), "one of the keys")


nesterov = Mutation(((("train", "optim", "momentum"), 0.0), (("train", "optim", "nesterov"), True)),
                    "train.optim.nesterov", "nesterov needs momentum")


@st.composite
def not_a_section(draw) -> Mutation:   # a top-level section that is not a mapping (empty ones are allowed)
    k = draw(st.sampled_from(["experiment", "train", "space"]))
    value = draw(st.one_of(st.just(True), st.integers(1, 9), name, st.lists(st.integers(), min_size=1, max_size=2)))
    return Mutation((((k,), value),), k, "a mapping")


RANGED = ["optim.base_lr", "optim.weight_decay", "model.dropout", "optim.momentum", "regularization.label_smoothing"]


@st.composite
def bad_space_entry(draw) -> Mutation:
    p = draw(st.sampled_from(RANGED))
    kind = draw(st.sampled_from(["uniform", "loguniform", "int"]))
    where, at = f"space.{p}", ("space", p)
    case = draw(st.integers(0, 9))
    if case == 0:
        k = draw(st.one_of(name, st.tuples(name, name).map(".".join)).filter(lambda n: n not in TRAIN_PATHS))
        return Mutation(((("space", k), {"uniform": [0.0, 0.5]}),), f"space.{k}", "a dotted path into train")
    if case == 1:
        v = draw(st.one_of(junk.filter(lambda v: not isinstance(v, dict)), st.just({}),
                           st.just({"uniform": [0, 0.5], "choice": [0.1]})))
        return Mutation(((at, v),), where, "a mapping with one of")
    if case == 2:
        k = draw(name.filter(lambda n: n not in DISTRIBUTIONS))
        return Mutation(((at, {k: [0.0, 0.5]}),), f"{where}.{k}", "one of ['loguniform'")
    if case == 3:
        v = draw(junk.filter(lambda v: not (isinstance(v, list) and len(v) == 2)))
        return Mutation(((at, {kind: v}),), f"{where}.{kind}", "a list [low, high]")
    if case == 4:
        bad = junk.filter(lambda v: not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                         and (kind != "int" or isinstance(v, int))) and not isinstance(v, list))
        bounds = draw(st.permutations([draw(bad), draw(st.integers(1, 3) if kind == "int" else finite)]))
        return Mutation(((at, {kind: bounds}),), f"{where}.{kind}", "integers" if kind == "int" else "finite numbers")
    if case == 5:
        lo, hi = sorted(draw(st.lists(st.integers(-9, 9) if kind == "int" else finite, min_size=2, max_size=2)))
        return Mutation(((at, {kind: [hi, lo]}),), f"{where}.{kind}", "low < high")
    if case == 6:
        lo, hi = draw(finite.filter(lambda v: v <= 0)), draw(st.floats(1e-3, 1e3))
        return Mutation(((at, {"loguniform": [lo, hi]}),), f"{where}.loguniform", "0 < low < high")
    if case == 7:
        k = draw(st.sampled_from(["choice", "grid"]))
        v = draw(st.one_of(st.just([]), junk.filter(lambda v: not isinstance(v, list))))
        return Mutation(((at, {k: v}),), f"{where}.{k}", "a non-empty list of values")
    if case == 8:   # well formed, but a value it can produce is invalid for the field
        if draw(st.booleans()):
            return Mutation(((("space", "model.dropout"), {"uniform": [0.0, draw(st.floats(1.0, 9.0))]}),),
                            "space.model.dropout", "values valid for train.model.dropout")
        return Mutation(((("space", "optim.base_lr"), {"uniform": [draw(st.floats(-1.0, 0.0)), 0.5]}),),
                        "space.optim.base_lr", "values valid for train.optim.base_lr")
    bad = draw(name.filter(lambda n: n not in SCHEDULES))
    return Mutation(((("space", "schedule"), {"choice": [{"name": "cosine"}, {"name": bad}]}),),
                    "space.schedule", "values valid for train.schedule.name")


search_mismatch = st.sampled_from([
    Mutation(((("experiment", "search"), "grid"),), "space.optim.base_lr", "grid or choice"),
    Mutation(((("experiment", "search"), "optuna_tpe"), (("space", "model.dropout"), {"grid": [0.1, 0.2]})),
             "space.model.dropout", "with optuna_tpe")])


def mutation(scope: str):
    """One mutation, wrong on its own. scope: "file" (anywhere in a file) or "train" (a TrainConfig)."""
    options = [wrong_type(scope), out_of_range(scope), unknown_key(scope), st.just(nesterov)]
    if scope == "file":
        options += [not_a_section(), bad_space_entry(), bad_space_entry(), search_mismatch]
    return st.one_of(options)


def _overlap(a: Mutation, b: Mutation) -> bool:
    return any(p[:len(q)] == q or q[:len(p)] == p for p, _ in a.sets for q, _ in b.sets)


@st.composite
def malformed(draw, scope: str = "file") -> tuple[dict, list[Mutation]]:
    """GOOD (or its train section) with 1-3 mutations that touch disjoint keys."""
    ms: list[Mutation] = []
    for _ in range(draw(st.integers(1, 3))):
        m = draw(mutation(scope))
        if not any(_overlap(m, o) for o in ms):
            ms.append(m)
    doc = copy.deepcopy(GOOD)
    for m in ms:
        for path, value in m.sets:
            node = doc
            for k in path[:-1]:
                node = node.setdefault(k, {})
            node[path[-1]] = copy.deepcopy(value)
    return (doc if scope == "file" else doc["train"]), ms


def check_error(msg: str, ms: list[Mutation], file: str = "") -> None:
    """``msg`` is ``[file: ]key: got value, expected ...``, the key and expectation of one of ``ms``."""
    prefix = f"{file}: " if file else ""
    assert "\n" not in msg.strip() and "Traceback" not in msg, msg
    named = [m for m in ms if msg.startswith(f"{prefix}{m.key[len('train.'):] if not file else m.key}: got ")]
    assert named, f"{msg!r} names none of {[m.key for m in ms]}"
    expected = msg.partition(", expected ")[2]
    assert any(m.expected in expected for m in named), (msg, named)
