"""YAML as every schedtune input is read (search-space files, ``--set`` values): YAML 1.2 floats,
no duplicate keys, and every failure a ``SpaceError`` naming the file and where in it."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tuning.spec.errors import SpaceError


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


def read_yaml_file(path: Path) -> tuple[str, Any]:
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
