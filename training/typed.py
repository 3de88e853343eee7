"""Strict typed config sections: construction from plain dicts, coercion, and ``ConfigError``,
which names the dotted key, the bad value and what was expected. The tree itself is training.config."""
from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union


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
    if isinstance(v, dict):   # model.args / data.args: a copy, so editing the output never edits the config
        return {k: _plain(x) for k, x in v.items()}
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
    if origin is dict or (isinstance(tp, type) and issubclass(tp, Section)):
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
    if origin is dict:   # dict[str, Any]: free-form keyword arguments (model.args), checked by their consumer
        _check(isinstance(v, dict) and all(isinstance(k, str) for k in v), key, v, "a mapping with string keys")
        return copy.deepcopy(dict(v))
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
