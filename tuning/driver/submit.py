"""Submit an experiment to a Ray cluster as a Ray job; follow, list, read and stop those jobs.

``submit_job`` validates the experiment here (every input error before anything is contacted:
the spec, its plug-ins resolved against the code the job ships, names that collide with
schedtune's packages), then runs ``python -m tuning.cli tune FILE --address auto`` on the cluster
through its job API (``ray.job_submission.JobSubmissionClient``) and returns a ``Job`` handle.
The user's code travels in the job's runtime env (tuning.driver.user_code): ``working_dir``
(default: the directory holding the search-space file, which the entrypoint names relative to it)
and ``py_modules``, with this checkout's ``training`` and ``tuning``. A spec that is not a file
inside the working dir (a dict, a loaded ExperimentSpec, a file elsewhere) travels in the
entrypoint itself, as the standard input of ``tune -``.

The address: ``--address`` when given, else ``$RAY_API_SERVER_ADDRESS``, else ``$RAY_ADDRESS``, as
``ray job`` reads them (tuning.driver.address); the one chosen is used exactly.

Token auth (Ray >= 2.52): the client sends ``Authorization: Bearer <token>`` only when
``RAY_AUTH_MODE=token``; the token is found as Ray finds it (``RAY_AUTH_TOKEN``, then the file
named by ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``). A missing, wrong or unreadable
token, or an unreachable address, becomes a ``SubmitError`` that never contains the token.
"""
from __future__ import annotations

import asyncio
import getpass
import hashlib
import os
import secrets
import shlex
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import yaml

from tuning.spec import ExperimentSpec, load_spec
from tuning.spec.space import DICT_FILE
from tuning.tracking import schema

STDIN = "-"   # `schedtune tune -`: the search-space file on standard input

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
    from ray.exceptions import AuthenticationError, RpcError

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
    except RpcError as e:   # a cluster address (RAY_ADDRESS=host:port): its GCS, asked for the job API, is not there
        raise SubmitError(f"cannot reach the Ray cluster at {address} to find its job API: {e}") from None
    except RuntimeError as e:   # the job API answered with an error (unknown job, bad runtime env, ...)
        raise SubmitError(f"the Ray job API at {address} refused the request: {' '.join(str(e).split())[:500]}") from None


def job_address(address: Optional[str]) -> str:
    """The job API address to use: ``address``, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS."""
    from tuning.driver.address import JOB_ADDRESS_VARS, job_api_address

    chosen, _ = job_api_address(address)
    if chosen is None:
        raise SubmitError(f"no Ray cluster to talk to: pass --address http://HEAD:8265 (the job API) or set "
                          f"{' or '.join(JOB_ADDRESS_VARS)}")
    return chosen


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
               tracking_uri: Optional[str], stdin_text: Optional[str] = None) -> str:
    """The job's shell command: the tune subcommand, run from the job's working_dir. With
    ``stdin_text``, ``file_name`` is ``-`` and the text is its standard input (a quoted here-document:
    nothing in it is expanded)."""
    args = ["python", "-m", "tuning.cli", "tune", file_name, "--address", "auto"]
    for key, value in overrides.items():
        args += ["--set", f"{key}={_yaml_value(value)}"]
    if storage:
        args += ["--storage", storage]
    if tracking_uri:
        args += ["--tracking-uri", tracking_uri]
    if stdin_text is None:
        return shlex.join(args)
    end = f"SCHEDTUNE_SPACE_{secrets.token_hex(4)}"
    text = stdin_text if stdin_text.endswith("\n") else stdin_text + "\n"
    return f"{shlex.join(args)} <<'{end}'\n{text}{end}"


def spec_document(spec: ExperimentSpec) -> dict[str, Any]:
    """A loaded spec as the search-space document that loads back to it: every key explicit."""
    return {"experiment": spec.options.to_dict(), "train": spec.base.to_dict(),
            "space": {k: {d.kind: list(d.args)} for k, d in spec.space.items()}}


class Job:
    """A submitted experiment: the Ray job ``job_id`` of the cluster whose job API is ``address``.
    Every call asks the cluster; failures are ``SubmitError``s (as the commands report them)."""

    def __init__(self, job_id: str, address: str, metadata: Optional[dict[str, str]] = None):
        self.job_id, self.address, self.metadata = job_id, address, dict(metadata or {})
        self._client = None

    @property
    def client(self):
        if self._client is None:
            self._client = _client(self.address)
        return self._client

    def status(self) -> str:
        """The job's status now: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
        with _errors(self.address):
            return str(self.client.get_job_status(self.job_id))

    def logs(self) -> str:
        """Everything the job has printed so far (its driver's stdout and stderr)."""
        with _errors(self.address):
            return self.client.get_job_logs(self.job_id)

    def wait(self, timeout_s: Optional[float] = None, out: Optional[Callable[[str], None]] = None,
             poll_s: float = 1.0) -> str:
        """Block until the job ends; its final status. ``out``: stream the job's log to it meanwhile.
        ``timeout_s``: TimeoutError when the job is still running after that many seconds."""
        if out is not None:
            return _follow(self.client, self.job_id, self.address, out, timeout_s)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while (status := self.status()) not in TERMINAL:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.job_id} is still {status} after {timeout_s:g} s")
            time.sleep(poll_s)
        return status

    def stop(self) -> bool:
        """Ask the cluster to stop the job; False when it had already ended."""
        return stop_job(self.address, self.job_id)

    def __repr__(self) -> str:
        return f"Job({self.job_id!r}, address={self.address!r})"


def submit_job(source: "str | Path | dict | ExperimentSpec", address: Optional[str] = None, *,
               overrides: Optional[dict[str, Any]] = None, working_dir: "str | Path | None" = None,
               py_modules: Optional[list[str | Path]] = None, runtime_env: Optional[dict[str, Any]] = None,
               storage: Optional[str] = None, tracking_uri: Optional[str] = None, entrypoint_num_cpus: float = 1.0,
               pip: Optional[list[str]] = None, spec: Optional[ExperimentSpec] = None) -> Job:
    """Submit the experiment ``source`` (a search-space file, a dict, or a loaded ExperimentSpec;
    dotted ``overrides`` apply to a file or dict) to the cluster whose job API is ``address``
    (default $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS). ``working_dir`` (default: the file's
    directory; for a dict or spec, the directory its plug-ins import from, if any) and
    ``py_modules`` ship the user's code. ``storage`` and ``tracking_uri`` are as the cluster sees
    them (shared storage, the in-cluster MLflow). ``spec``: ``source`` already loaded with these
    overrides and this working dir (the CLI). Returns at once with the job's handle."""
    from tuning.driver.user_code import check_py_modules, check_working_dir, job_runtime_env

    overrides = dict(overrides or {})
    modules = [str(m) for m in py_modules or []]
    is_file = isinstance(source, (str, Path))
    label = str(source) if is_file else getattr(source, "file", DICT_FILE)
    # Every input error surfaces here, before the cluster is contacted.
    check_py_modules(label, modules)   # their parents go on this process's path: the plug-ins resolve against them
    if working_dir is not None:
        check_working_dir(label, str(working_dir))
    if isinstance(source, ExperimentSpec):
        if overrides:
            raise TypeError("overrides apply to a file or a dict; a loaded ExperimentSpec has its own: "
                            "load it with them (tuning.load_spec(path, overrides))")
        spec = source
    elif spec is None:
        spec = load_spec(source, overrides, code_dir=working_dir)
    if working_dir is None:
        working_dir = Path(source).resolve().parent if is_file else spec.code_dir
        if working_dir is not None:
            check_working_dir(label, str(working_dir))
    working_dir = None if working_dir is None else str(Path(working_dir).resolve())
    address = job_address(address)
    if is_file and working_dir is not None and _inside(Path(source), Path(working_dir)):
        file_arg, text = Path(source).resolve().relative_to(working_dir).as_posix(), None
    else:   # a dict, a loaded spec, a file outside the working dir: the text travels in the entrypoint
        file_arg = STDIN
        text = spec.text if not isinstance(source, ExperimentSpec) else yaml.safe_dump(spec_document(spec),
                                                                                        sort_keys=False)
    name = spec.options.name
    sid = f"schedtune-{''.join(c if c.isalnum() or c in '-_.' else '-' for c in name)}-{secrets.token_hex(4)}"
    metadata = {schema.JOB_EXPERIMENT: name, schema.JOB_USER: getpass.getuser(),
                schema.SPACE_SHA256: hashlib.sha256(text.encode()).hexdigest() if text else spec.sha256,
                schema.SPACE_FILE: label}
    client = _client(address)
    with _errors(address):
        client.submit_job(entrypoint=entrypoint(file_arg, overrides, storage, tracking_uri, stdin_text=text),
                          submission_id=sid, metadata=metadata, entrypoint_num_cpus=entrypoint_num_cpus,
                          runtime_env=job_runtime_env(working_dir, modules, tracking_uri, pip, runtime_env))
    job = Job(sid, address, metadata)
    job._client = client
    return job


def _inside(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
        return True
    except ValueError:
        return False


def submit_experiment(space_file: str | Path, address: Optional[str] = None, *,
                      overrides: Optional[dict[str, Any]] = None, runtime_env: Optional[dict[str, Any]] = None,
                      storage: Optional[str] = None, tracking_uri: Optional[str] = None, wait: bool = True,
                      entrypoint_num_cpus: float = 1.0, pip: Optional[list[str]] = None,
                      out: Callable[[str], None] = print, spec: Optional[ExperimentSpec] = None,
                      working_dir: "str | Path | None" = None,
                      py_modules: Optional[list[str | Path]] = None) -> SubmitResult:
    """``submit_job``, then (with ``wait``) stream the job's log to ``out`` until it ends; Ctrl-C
    offers to stop it (what ``schedtune submit`` does)."""
    job = submit_job(space_file, address, overrides=overrides, working_dir=working_dir, py_modules=py_modules,
                     runtime_env=runtime_env, storage=storage, tracking_uri=tracking_uri,
                     entrypoint_num_cpus=entrypoint_num_cpus, pip=pip, spec=spec)
    out(f"submitted job {job.job_id} ({job.metadata[schema.JOB_EXPERIMENT]}) to {job.address}")
    if not wait:
        return SubmitResult(job.job_id, job.status(), job.metadata)
    try:
        status = job.wait(out=out)
    except KeyboardInterrupt:
        status = _interrupted(job.client, job.job_id, job.address, out)
    return SubmitResult(job.job_id, status, job.metadata)


def _follow(client, sid: str, address: str, out: Callable[[str], None], timeout_s: Optional[float] = None) -> str:
    """Stream the job's log to ``out`` until it ends; its final status."""
    async def tail() -> None:
        async for chunk in client.tail_job_logs(sid):
            out(chunk.rstrip("\n"))

    try:
        asyncio.run(asyncio.wait_for(tail(), timeout_s))
    except asyncio.TimeoutError:
        raise TimeoutError(f"job {sid} is still running after {timeout_s:g} s") from None
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


def list_jobs(address: Optional[str] = None) -> list[dict[str, Any]]:
    """The cluster's schedtune jobs (metadata has schedtune.experiment), oldest first."""
    address = job_address(address)
    client = _client(address)
    with _errors(address):
        jobs = client.list_jobs()
    rows = [{"id": j.submission_id, "status": str(j.status), "experiment": j.metadata[schema.JOB_EXPERIMENT],
             "user": j.metadata.get(schema.JOB_USER, ""), "start_time": (j.start_time or 0) / 1000}
            for j in jobs if j.metadata and schema.JOB_EXPERIMENT in j.metadata]
    return sorted(rows, key=lambda r: r["start_time"])


def stop_job(address: Optional[str], submission_id: str) -> bool:
    """Ask the cluster to stop a job; False when it had already ended."""
    address = job_address(address)
    client = _client(address)
    with _errors(address):
        return client.stop_job(submission_id)


def job(submission_id: str, address: Optional[str] = None) -> Job:
    """The handle of a job already submitted (``schedtune logs ID``): SubmitError when the cluster
    has no such job."""
    address = job_address(address)
    handle = Job(submission_id, address)
    with _errors(address):
        handle.metadata = dict(handle.client.get_job_info(submission_id).metadata or {})
    return handle
