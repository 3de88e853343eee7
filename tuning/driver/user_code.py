"""The user's code on the cluster: the directory a spec's plug-ins import from
(``ExperimentSpec.code_dir``) on the path of every process that builds a model or loads data.

- ``schedtune tune`` on this machine's Ray (a private cluster, or one it joins with ``--address``
  or ``RAY_ADDRESS``): the directory goes first on the Ray workers' ``PYTHONPATH`` (the runtime env
  of ``ray.init``; Ray expands ``${PYTHONPATH}`` on each worker) and on this process's own, for its
  children (a private cluster's head, the model-registration subprocess). A cluster on other machines
  gets nothing it can import from there: submit the experiment instead (``schedtune submit``), which
  ships the code.
- ``schedtune submit``: the job's runtime env ships ``working_dir`` (default: the directory holding
  the search-space file; it is the job's working directory and first on every worker's path) and
  ``py_modules`` (the user's packages, and this checkout's ``training`` and ``tuning``, so the
  cluster runs the submitter's schedtune even where its image has another). Inside the job nothing
  more is added: that runtime env is on every worker's path already, and Ray refuses a second value
  for the same field.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from tuning.spec import SpaceError
from tuning.spec.code import SCHEDTUNE_PACKAGES, check_collisions, put_on_path

JOB_CONFIG_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"   # set by Ray's job manager in a job's entrypoint (ray._private.runtime_env.constants)


def in_ray_job() -> bool:
    """Is this process the entrypoint of a Ray job (whose runtime env every worker gets)?"""
    return JOB_CONFIG_VAR in os.environ


def trial_runtime_env(code_dir: Optional[str]) -> Optional[dict[str, Any]]:
    """The runtime env ``ray.init`` gives the experiment's workers: ``code_dir`` first on their path."""
    if not code_dir or in_ray_job():
        return None
    return {"env_vars": {"PYTHONPATH": f"{code_dir}{os.pathsep}${{PYTHONPATH}}"}}


def driver_environ(code_dir: Optional[str]) -> dict[str, str]:
    """This process's environment additions while the experiment runs: ``code_dir`` first on the
    ``PYTHONPATH`` its children inherit (empty without a code dir, or inside a job)."""
    if not code_dir or in_ray_job():
        return {}
    old = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": code_dir + (os.pathsep + old if old else "")}


@contextmanager
def scoped_environ(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set for the duration, then exactly as it was."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def schedtune_packages() -> list[str]:
    """The directories of this checkout's ``training`` and ``tuning`` packages."""
    import training

    return [str(Path(training.__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]


def check_working_dir(file: str, working_dir: str) -> None:
    """The job's working dir exists and holds no folder named like schedtune's packages (it is
    the job's working directory: ``python -m tuning.cli`` there would import it). SpaceError."""
    if not Path(working_dir).is_dir():
        raise SpaceError(file, "--working-dir", working_dir, "an existing directory (your code, shipped with the job)")
    check_collisions(file, working_dir, key="--working-dir")


def check_py_modules(file: str, py_modules: list[str]) -> None:
    """Each of ``py_modules`` is a directory (a package) not named ``training`` or ``tuning``; its
    parent goes on this process's path, so the spec's plug-ins resolve here against the code the
    job ships. SpaceError naming the flag."""
    own = {Path(d).name: Path(d) for d in schedtune_packages()}
    for module in py_modules:
        path = Path(module)
        if not path.is_dir():
            raise SpaceError(file, "--py-modules", module, "an existing directory: a Python package of yours")
        if path.name in SCHEDTUNE_PACKAGES and path.resolve() != own[path.name]:
            raise SpaceError(file, "--py-modules", module, (
                f"a package not named {' or '.join(SCHEDTUNE_PACKAGES)}: schedtune ships its own {path.name} "
                f"with every job, and only one of the two could be imported; rename yours"))
        put_on_path(path.resolve().parent)


def job_runtime_env(working_dir: Optional[str], py_modules: list[str], tracking_uri: Optional[str],
                    pip: Optional[list[str]], extra: Optional[dict[str, Any]]) -> dict[str, Any]:
    """``extra`` (the caller's runtime env) plus the user's code and this checkout's packages."""
    env = dict(extra or {})
    if working_dir is not None:
        env["working_dir"] = str(Path(working_dir).resolve())
    env["py_modules"] = (list(env.get("py_modules", [])) + [str(Path(m).resolve()) for m in py_modules]
                         + schedtune_packages())
    env.setdefault("excludes", ["__pycache__", "*.pyc"])
    if pip:
        env["pip"] = list(pip)
    if tracking_uri:
        env["env_vars"] = {**env.get("env_vars", {}), "MLFLOW_TRACKING_URI": tracking_uri}
    return env
