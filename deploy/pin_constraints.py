"""Rewrite deploy/constraints.txt for the environment this runs in: `name==version` for every
package in the runtime dependency closure of pyproject.toml's [project].dependencies (extras
followed, environment markers evaluated here), below the file's comment header. Run it in the
environment the tests passed in, on the image's Python (3.11):

    python deploy/pin_constraints.py
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:   # Python 3.10
    import tomli as tomllib


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(requirements: list[str]) -> dict[str, str]:
    """Installed version (without a local label such as +cpu) of every distribution the
    requirements need, transitively."""
    env = default_environment()
    pins: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        key = (canonical(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:
            sys.exit(f"{req.name} (required as {req}) is not installed here: install the project first")
        pins[key[0]] = dist.version.split("+")[0]
        for line in dist.requires or []:
            dep = Requirement(line)
            extras = [""] + sorted(req.extras)
            if dep.marker is None or any(dep.marker.evaluate({**env, "extra": e}) for e in extras):
                todo.append(dep)
    return pins


def main() -> None:
    deploy = Path(__file__).resolve().parent
    deps = tomllib.loads((deploy.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    target = deploy / "constraints.txt"
    header = [line for line in target.read_text().splitlines() if line.startswith("#")]
    pins = [f"{name}=={version}" for name, version in sorted(closure(deps).items())]
    target.write_text("\n".join(header + pins) + "\n")
    print(f"{target}: {len(pins)} pins")


if __name__ == "__main__":
    main()
