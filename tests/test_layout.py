"""The layout's import rules (docs/layout.md), read from every import statement with ``ast``: at
module level and inside functions, absolute and relative.

- nothing imports ``tuning.cli`` (but the CLI itself);
- ``training/`` imports no ``tuning``, ``ray`` or ``mlflow``;
- only ``tuning/tracking/`` imports ``mlflow``;
- ``tuning/spec/`` and ``tuning/analysis/`` import no ``ray``, ``mlflow`` or ``torch``;
- the graph of module imports inside the project has no cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("training", "tuning")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(path: Path, name: str) -> set[str]:
    """Every module ``path`` imports, anywhere in it (``from a.b import c`` counts a.b and a.b.c)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


MODULES = project_modules()
IMPORTS = {name: imports_of(path, name) for name, path in MODULES.items()}


def _top(mod: str) -> str:
    return mod.split(".")[0]


def _offenders(where: str, banned: tuple[str, ...]) -> list[str]:
    return sorted(f"{m} imports {i}" for m, imps in IMPORTS.items() if m == where or m.startswith(where + ".")
                  for i in imps if i in banned or any(i.startswith(b + ".") for b in banned))


def test_every_module_was_read():
    assert {"tuning.cli", "tuning.spec.space", "tuning.tracking.callback", "training.loop"} <= set(MODULES)
    assert all(IMPORTS[m] for m in ("tuning.cli", "tuning.driver.experiment"))


def test_nothing_imports_the_cli():
    bad = sorted(f"{m} imports {i}" for m, imps in IMPORTS.items() if not m.startswith("tuning.cli")
                 for i in imps if i == "tuning.cli" or i.startswith("tuning.cli."))
    assert not bad, bad


def test_training_imports_no_tuning_ray_or_mlflow():
    assert not _offenders("training", ("tuning", "ray", "mlflow"))


def test_only_tracking_imports_mlflow():
    bad = sorted(f"{m} imports {i}" for m, imps in IMPORTS.items() if not m.startswith("tuning.tracking")
                 for i in imps if _top(i) == "mlflow")
    assert not bad, bad


@pytest.mark.parametrize("room", ["tuning.spec", "tuning.analysis"])
def test_spec_and_analysis_import_no_ray_mlflow_or_torch(room):
    assert not _offenders(room, ("ray", "mlflow", "torch", "torchvision"))


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (a ``from pkg import name`` of a submodule counts the
    submodule; of a symbol, the package's face)."""
    graph = {}
    for m, imps in IMPORTS.items():
        graph[m] = {i for i in imps if i in MODULES and i != m}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` as [a, b, ..., a], or [] when it has none (iterative DFS)."""
    state: dict[str, int] = {}   # 1 on the stack, 2 done
    for start in sorted(graph):
        if state.get(start):
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(sorted(graph.get(child, ())))))
                path.append(child)
    return []


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert not cycle, " -> ".join(cycle)
