"""The user's code: the directory a spec's plug-ins (``package.module:callable``) are imported from,
put on this process's path before their names are resolved, and checked for names that collide with
schedtune's own top-level packages (``training``, ``tuning``).

The same directory reaches the trials: ``schedtune tune`` puts it on the workers' ``PYTHONPATH``
(tuning.driver.experiment), ``schedtune submit`` ships it as the job's ``working_dir``
(tuning.driver.submit). A folder named like one of schedtune's packages in it would be found before
(or instead of) schedtune's own, on the driver or on a worker, and fail far from its cause: refused
here, naming the folder.

No Ray, MLflow or torch here (the user's module may import torch when it is resolved).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Iterable, Optional

from training.config import ConfigError, TrainConfig, plugin_form
from tuning.spec.errors import SpaceError

SCHEDTUNE_PACKAGES = ("training", "tuning")   # the top-level packages the schedtune distribution installs


def callable_plugins(configs: Iterable[TrainConfig]) -> list[str]:
    """The ``package.module:callable`` names (model and data) of ``configs``, in order, once each."""
    names: list[str] = []
    for cfg in configs:
        for name in (cfg.model.name, cfg.data.name):
            form = plugin_form(name)
            if form and form[0] == "callable" and name not in names:
                names.append(name)
    return names


def _own_location(package: str) -> Optional[Path]:
    """Where schedtune's ``package`` is imported from in this process (its directory)."""
    module = sys.modules.get(package)
    origin = getattr(module, "__file__", None) if module else None
    if origin is None:
        found = importlib.util.find_spec(package)
        origin = found.origin if found else None
    return Path(origin).resolve().parent if origin else None


def collisions(directory: str | Path) -> list[Path]:
    """The entries of ``directory`` that Python would import as ``training`` or ``tuning``: a
    ``training.py``, or a ``training/`` folder holding Python files (a package, or a namespace
    package), unless it is schedtune's own (an editable checkout). Data folders without Python
    files are harmless: schedtune's regular package wins over a namespace portion."""
    directory = Path(directory)
    found = []
    for name in SCHEDTUNE_PACKAGES:
        module_file, folder = directory / f"{name}.py", directory / name
        if module_file.is_file():
            found.append(module_file)
        elif folder.is_dir() and any(folder.glob("*.py")) and folder.resolve() != _own_location(name):
            found.append(folder)
    return found


def check_collisions(file: str, directory: str | Path, key: str = "<code directory>") -> None:
    """SpaceError naming the first entry of ``directory`` that collides with a schedtune package."""
    found = collisions(directory)
    if found:
        entry = found[0]
        what = f"{entry.stem}/" if entry.is_dir() else entry.name
        raise SpaceError(file, key, str(entry), (
            f"no {what} in {Path(directory).resolve()}: schedtune installs the top-level packages "
            f"{' and '.join(SCHEDTUNE_PACKAGES)}, so `import {entry.stem}` finds schedtune's on one side "
            f"and yours on the other (on the driver, on the workers); rename yours (e.g. "
            f"myproject_{entry.stem}{'/' if entry.is_dir() else '.py'}) or move it into a package of your own"))


def put_on_path(directory: str | Path) -> str:
    """``directory`` (absolute) first on ``sys.path`` unless it is there already; returns it."""
    path = str(Path(directory).resolve())
    if path not in sys.path:
        sys.path.insert(0, path)
        importlib.invalidate_caches()   # a module written after the path was first scanned
    return path


def prepare_code(file: str, code_dir: str | Path, base: TrainConfig,
                 variants: list[tuple[str, TrainConfig]]) -> Optional[str]:
    """Make the spec's plug-ins importable and resolve every plug-in name, before anything starts.

    ``variants``: (``space.<key>``, the base with one value that key can take) for every extreme
    of the space. When any config names a ``package.module:callable``, ``code_dir`` is checked for
    collisions and put first on ``sys.path``; it is returned (absolute) for the trials' path, else
    None. Every plug-in name (timm:, torchvision:, module:callable) is then resolved with
    training.plugins.check_resolvable; its ConfigError becomes a SpaceError on ``train.<key>`` (or
    on the space key whose value names it).
    """
    from training.plugins import check_resolvable

    resolved_dir = None
    if callable_plugins([base] + [cfg for _, cfg in variants]):
        check_collisions(file, code_dir)
        resolved_dir = put_on_path(code_dir)
    try:
        check_resolvable(base)
    except ConfigError as e:
        raise SpaceError(file, f"train.{e.key}", e.value, e.expected) from None
    for where, cfg in variants:
        try:
            check_resolvable(cfg)
        except ConfigError as e:
            raise SpaceError(file, where, e.value, f"values valid for train.{e.key}: {e.expected}") from None
    return resolved_dir
