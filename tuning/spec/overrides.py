"""Overrides as people write them: ``KEY=VALUE`` (``--set``, ``tuning.load_spec(path, [...])``), a
dotted key under one of the file's sections and a value in YAML, read as the files are."""
from __future__ import annotations

from typing import Any

import yaml

from tuning.spec.files import load_yaml
from tuning.spec.space import SECTIONS


def parse_set(text: str) -> tuple[str, Any]:
    """``"train.optim.base_lr=0.05"`` -> ``("train.optim.base_lr", 0.05)``. ValueError saying what
    was expected: no ``=``, a key under no section (it would be silently ignored), a value that is
    not YAML."""
    if "=" not in text:
        raise ValueError(f"expected KEY=VALUE (e.g. train.optim.base_lr=0.05), got {text!r}")
    key, value = text.split("=", 1)
    key = key.strip()
    if key.split(".", 1)[0] not in SECTIONS:
        raise ValueError(f"expected KEY=VALUE with KEY under experiment., train. or space. "
                         f"(e.g. train.optim.base_lr=0.05), got key {key!r}")
    try:
        return key, load_yaml(value)
    except (yaml.YAMLError, ValueError, RecursionError) as e:   # ValueError: e.g. a date 2001-13-45
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"expected KEY=VALUE with VALUE in YAML, got {value!r} ({problem})") from None


def as_overrides(overrides: "list[str] | tuple[str, ...] | dict[str, Any] | None") -> dict[str, Any]:
    """Overrides given as ``KEY=VALUE`` strings or as a dict, as the dict ``load_spec`` applies."""
    if overrides is None:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    if isinstance(overrides, str):
        raise TypeError(f"overrides: expected a list of KEY=VALUE strings or a dict, got the string {overrides!r}")
    return dict(parse_set(text) for text in overrides)
