"""Submit an experiment to a Ray cluster as a Ray job; list and stop those jobs.

``submit_experiment`` validates the search-space file here (every input error before anything is
contacted), then runs ``python -m tuning.cli tune FILE --address auto`` on the cluster through its
job API (``ray.job_submission.JobSubmissionClient``). The file travels as the job's ``working_dir``
and this checkout's ``training`` and ``tuning`` packages as ``py_modules``, so the cluster runs the
submitter's code even where its image has an older schedtune.

Token auth (Ray >= 2.52): the client sends ``Authorization: Bearer <token>`` only when
``RAY_AUTH_MODE=token``; the token is found as Ray finds it (``RAY_AUTH_TOKEN``, then the file
named by ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``). A missing, wrong or unreadable
token, or an unreachable address, becomes a ``SubmitError`` that never contains the token.
"""
from __future__ import annotations

import asyncio
import getpass
import os
import secrets
import shlex
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import yaml

from tuning.spec import ExperimentSpec, load_spec
from tuning.tracking import schema

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
TOKEN_SOURCES = "RAY_AUTH_TOKEN (or a token file: RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"


class SubmitError(RuntimeError):
    """The cluster cannot be used: unreachable, refuses the token, or rejects the request."""


@dataclass
class SubmitResult:
    submission_id: str
    status: str                      # a Ray JobStatus value (PENDING ... SUCCEEDED/FAILED/STOPPED)
    metadata: dict[str, str]


def _auth_headers() -> dict[str, str]:
    """The Authorization header for the current environment. Ray caches the auth mode and the
    token per process; refresh both first (unless this process is itself connected to Ray) so a
    changed environment (a notebook, a test) is honoured."""
    from ray._raylet import AuthenticationTokenLoader
    from ray.exceptions import AuthenticationError

    from tuning.driver.cluster import refresh_ray_auth

    refresh_ray_auth()
    try:
        return dict(AuthenticationTokenLoader.instance().get_token_for_http_header())
    except AuthenticationError as e:   # token mode, but no token or an unreadable token file
        raise SubmitError(f"RAY_AUTH_MODE=token but no usable token: {str(e).split('. ')[0]}. "
                          f"Set {TOKEN_SOURCES}") from None


@contextmanager
def _errors(address: str) -> Iterator[None]:
    """Ray's connection and authentication failures as one-line ``SubmitError``s."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except SubmitError:
        raise
    except AuthenticationError as e:
        if str(e).startswith("Authentication failed"):   # 403: a token was sent and is wrong
            raise SubmitError(f"the Ray cluster at {address} rejected the token: check {TOKEN_SOURCES}") from None
        raise SubmitError(f"the Ray cluster at {address} requires a token: set RAY_AUTH_MODE=token and "
                          f"{TOKEN_SOURCES}") from None
    except (ConnectionError, requests.exceptions.RequestException) as e:
        raise SubmitError(f"cannot reach the Ray job API at {address}: {e}") from None
    except RuntimeError as e:   # the job API answered with an error (unknown job, bad runtime env, ...)
        raise SubmitError(f"the Ray job API at {address} refused the request: {' '.join(str(e).split())[:500]}") from None


def _client(address: str):
    """A job client for exactly ``address``. (JobSubmissionClient prefers $RAY_API_SERVER_ADDRESS,
    then $RAY_ADDRESS, over the address it is given: hide both while it is built.)"""
    from ray.job_submission import JobSubmissionClient

    headers = _auth_headers()
    hidden = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        with _errors(address):
            return JobSubmissionClient(address, headers=headers)
    finally:
        os.environ.update(hidden)


def _yaml_value(value: Any) -> str:
    """``value`` as text that ``tuning.spec.load_yaml`` (what ``--set`` applies) turns back into it."""
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"))
    return text[:-5] if text.endswith("\n...\n") else text.rstrip("\n")


def entrypoint(file_name: str, overrides: dict[str, Any], storage: Optional[str],
               tracking_uri: Optional[str]) -> str:
    """The job's shell command: the tune subcommand, run from the job's working_dir."""
    args = ["python", "-m", "tuning.cli", "tune", file_name, "--address", "auto"]
    for key, value in overrides.items():
        args += ["--set", f"{key}={_yaml_value(value)}"]
    if storage:
        args += ["--storage", storage]
    if tracking_uri:
        args += ["--tracking-uri", tracking_uri]
    return shlex.join(args)


def _runtime_env(staging: Path, tracking_uri: Optional[str], pip: Optional[list[str]],
                 extra: Optional[dict[str, Any]]) -> dict[str, Any]:
    """``extra`` (the caller's runtime env) plus the staged file and this checkout's packages."""
    import training
    import tuning

    env = dict(extra or {})
    env["working_dir"] = str(staging)
    env["py_modules"] = list(env.get("py_modules", [])) + [str(Path(m.__file__).parent) for m in (training, tuning)]
    env.setdefault("excludes", ["__pycache__", "*.pyc"])
    if pip:
        env["pip"] = list(pip)
    if tracking_uri:
        env["env_vars"] = {**env.get("env_vars", {}), "MLFLOW_TRACKING_URI": tracking_uri}
    return env


def submit_experiment(space_file: str | Path, address: str, *, overrides: Optional[dict[str, Any]] = None,
                      runtime_env: Optional[dict[str, Any]] = None, storage: Optional[str] = None,
                      tracking_uri: Optional[str] = None, wait: bool = True, entrypoint_num_cpus: float = 1.0,
                      pip: Optional[list[str]] = None, out: Callable[[str], None] = print,
                      spec: Optional[ExperimentSpec] = None) -> SubmitResult:
    """Submit the experiment in ``space_file`` (with dotted ``overrides``) to the cluster whose job
    API is ``address`` (``http://HEAD:8265``). ``storage`` and ``tracking_uri`` are as the cluster
    sees them (shared storage, the in-cluster MLflow). With ``wait``, stream the job's log to
    ``out`` until it ends; Ctrl-C offers to stop it. ``spec``: the already-loaded file (CLI)."""
    overrides = dict(overrides or {})
    spec = spec or load_spec(space_file, overrides)   # every input error surfaces here
    name = spec.options.name
    sid = f"schedtune-{''.join(c if c.isalnum() or c in '-_.' else '-' for c in name)}-{secrets.token_hex(4)}"
    metadata = {schema.JOB_EXPERIMENT: name, schema.JOB_USER: getpass.getuser(),
                schema.SPACE_SHA256: spec.sha256, schema.SPACE_FILE: str(space_file)}
    client = _client(address)
    staging = Path(tempfile.mkdtemp(prefix="schedtune-submit-"))
    try:
        shutil.copy2(space_file, staging / Path(space_file).name)
        with _errors(address):
            client.submit_job(entrypoint=entrypoint(Path(space_file).name, overrides, storage, tracking_uri),
                              submission_id=sid, metadata=metadata, entrypoint_num_cpus=entrypoint_num_cpus,
                              runtime_env=_runtime_env(staging, tracking_uri, pip, runtime_env))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    out(f"submitted job {sid} ({name}) to {address}")
    if not wait:
        with _errors(address):
            return SubmitResult(sid, str(client.get_job_status(sid)), metadata)
    try:
        status = _follow(client, sid, address, out)
    except KeyboardInterrupt:
        status = _interrupted(client, sid, address, out)
    return SubmitResult(sid, status, metadata)


def _follow(client, sid: str, address: str, out: Callable[[str], None]) -> str:
    """Stream the job's log to ``out`` until it ends; its final status."""
    async def tail() -> None:
        async for chunk in client.tail_job_logs(sid):
            out(chunk.rstrip("\n"))

    try:
        asyncio.run(tail())
    except Exception as e:   # the log stream broke (proxy, network): keep polling the status
        out(f"(log stream ended: {e})")
    with _errors(address):
        while (status := str(client.get_job_status(sid))) not in TERMINAL:
            time.sleep(1.0)
    out(f"job {sid}: {status}")
    return status


def _interrupted(client, sid: str, address: str, out: Callable[[str], None]) -> str:
    """Ctrl-C while following: ask whether to stop the job (only on a terminal), else leave it."""
    answer = ""
    if sys.stdin is not None and sys.stdin.isatty():
        try:
            answer = input(f"\nstop job {sid}? [y/N] ").strip().lower()
        except (EOFError, KeyboardInterrupt):
            answer = ""
    with _errors(address):
        if answer in ("y", "yes"):
            client.stop_job(sid)
            out(f"stopping job {sid}")
        else:
            out(f"job {sid} keeps running; stop it with: schedtune stop {sid} --address {address}")
        return str(client.get_job_status(sid))


def list_jobs(address: str) -> list[dict[str, Any]]:
    """The cluster's schedtune jobs (metadata has schedtune.experiment), oldest first."""
    client = _client(address)
    with _errors(address):
        jobs = client.list_jobs()
    rows = [{"id": j.submission_id, "status": str(j.status), "experiment": j.metadata[schema.JOB_EXPERIMENT],
             "user": j.metadata.get(schema.JOB_USER, ""), "start_time": (j.start_time or 0) / 1000}
            for j in jobs if j.metadata and schema.JOB_EXPERIMENT in j.metadata]
    return sorted(rows, key=lambda r: r["start_time"])


def stop_job(address: str, submission_id: str) -> bool:
    """Ask the cluster to stop a job; False when it had already ended."""
    client = _client(address)
    with _errors(address):
        return client.stop_job(submission_id)
