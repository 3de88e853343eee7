"""Artifact uploads with a timeout and bounded retries of their own.

The tracker's tracking calls fail fast (``MLFLOW_HTTP_REQUEST_TIMEOUT=5``, no retries: a stall there
would stall Tune), but a checkpoint of hundreds of MB through the tracking server's artifact proxy
(``mlflow server --serve-artifacts``) can take longer than 5 s, and before this module such a file
was simply not in MLflow. MLflow reads that timeout from the environment on every request, for every
thread, so uploads cannot get another one through it: files for the proxy (``mlflow-artifacts:``
artifact URIs) are PUT here with MLflow's own request helper and an explicit timeout, exactly as
MLflow's ``HttpArtifactRepository.log_artifact`` does otherwise; other stores (S3, GCS, a local
directory) go through their MLflow repository and their client's own timeouts. Every file gets
``retries`` more attempts after a failure, with exponential backoff; a file that fails them all is
reported (``UploadResult.lost``), never raised, so that the caller counts it
(``schedtune.lost_artifacts``) and the trial's run still ends.
"""
from __future__ import annotations

import os
import posixpath
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional

ENV_TIMEOUT = "SCHEDTUNE_ARTIFACT_TIMEOUT_S"
ENV_RETRIES = "SCHEDTUNE_ARTIFACT_RETRIES"
DEFAULT_TIMEOUT_S = 300.0     # one request: ~1 GB at 30 MB/s
DEFAULT_RETRIES = 3
BACKOFF_S = 2.0               # the first wait between attempts; it doubles: 2, 4, 8 s
REPOS_KEPT = 64               # runs whose artifact repository is kept (one get_run each otherwise)


@dataclass(frozen=True)
class UploadPolicy:
    """How long one upload request may take (seconds), how many more attempts a file gets, and the
    first wait between them (doubling after each)."""
    timeout_s: float = DEFAULT_TIMEOUT_S
    retries: int = DEFAULT_RETRIES
    backoff_s: float = BACKOFF_S

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise ValueError(f"{ENV_TIMEOUT}: got {self.timeout_s!r}, expected seconds > 0")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or not 0 <= self.retries <= 10:
            raise ValueError(f"{ENV_RETRIES}: got {self.retries!r}, expected an integer from 0 to 10")
        if not self.backoff_s >= 0:
            raise ValueError(f"backoff_s: got {self.backoff_s!r}, expected seconds >= 0")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "UploadPolicy":
        """The defaults, with ``$SCHEDTUNE_ARTIFACT_TIMEOUT_S`` and ``$SCHEDTUNE_ARTIFACT_RETRIES`` where set."""
        def number(key: str, cast, default):
            text = env.get(key, "").strip()
            if not text:
                return default
            try:
                return cast(text)
            except ValueError:
                raise ValueError(f"{key}: got {text!r}, expected a number") from None
        return cls(number(ENV_TIMEOUT, float, DEFAULT_TIMEOUT_S), number(ENV_RETRIES, int, DEFAULT_RETRIES))

    def waits(self) -> list[float]:
        """The waits before each retry, in seconds."""
        return [self.backoff_s * 2 ** i for i in range(self.retries)]


@dataclass
class UploadResult:
    uploaded: list[str] = field(default_factory=list)   # artifact paths now in MLflow
    lost: list[str] = field(default_factory=list)       # artifact paths that are not
    error: Optional[str] = None                         # why the first lost file failed


class Uploader:
    """Uploads files to runs' artifact stores under an ``UploadPolicy``."""

    def __init__(self, client, tracking_uri: str, policy: Optional[UploadPolicy] = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.client, self.tracking_uri = client, tracking_uri
        self.policy = policy or UploadPolicy.from_env()
        self._sleep = sleep
        self._repos: dict[str, object] = {}   # run id -> its MLflow artifact repository

    def upload_dir(self, run_id: str, local_dir: str | Path, artifact_path: Optional[str] = None) -> UploadResult:
        """Every file under ``local_dir`` to ``artifact_path`` of run ``run_id``. Once a file has
        failed every attempt the rest are counted lost without trying: the store is not taking
        files now, and trying each would cost the full retries per file. Raises only what finding
        the run's store raises (the tracking server is down)."""
        repo = self._repo(run_id)
        result = UploadResult()
        root = Path(local_dir)
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            parts = [p for p in (artifact_path, path.relative_to(root).parent.as_posix()) if p and p != "."]
            directory = posixpath.join(*parts) if parts else None
            target = posixpath.join(directory or "", path.name)
            if result.lost:
                result.lost.append(target)
                continue
            error = self._with_retries(lambda: self._put(repo, str(path), directory))
            if error is None:
                result.uploaded.append(target)
            else:
                result.lost.append(target)
                result.error = error
        return result

    def upload_counted(self, what: str, run_id: str, local_dir: str | Path, artifact_path: Optional[str]) -> int:
        """``upload_dir``, returning how many files are lost (said on stderr, with ``what`` they were).
        Raises while the tracking server itself is down: then nothing is lost yet, and the caller
        tries again later."""
        result = self.upload_dir(run_id, local_dir, artifact_path)
        if result.lost:
            self.client.get_run(run_id)   # raises during an outage
            warn_lost(f"{what} ({artifact_path or 'the run root'}, run {run_id})", result, self.policy)
        return len(result.lost)

    def _with_retries(self, attempt: Callable[[], None]) -> Optional[str]:
        """None once ``attempt`` succeeded; the last error after every attempt failed."""
        for wait in [*self.policy.waits(), None]:
            try:
                attempt()
                return None
            except Exception as e:   # a timeout, a reset connection, a 5xx: all worth another try
                error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                if wait is not None:
                    self._sleep(wait)
        return error

    def _repo(self, run_id: str):
        if run_id not in self._repos:
            from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

            uri = self.client.get_run(run_id).info.artifact_uri
            if len(self._repos) >= REPOS_KEPT:   # a driver of 1000 trials keeps a flat memory
                del self._repos[next(iter(self._repos))]
            self._repos[run_id] = get_artifact_repository(uri, tracking_uri=self.tracking_uri)
        return self._repos[run_id]

    def _put(self, repo, local_file: str, directory: Optional[str]) -> None:
        from mlflow.environment_variables import MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD
        from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository

        if not isinstance(repo, HttpArtifactRepository) or MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD.get():
            repo.log_artifact(local_file, directory)   # the store's own client and timeouts
            return
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.mime_type_utils import _guess_mime_type
        from mlflow.utils.rest_utils import augmented_raise_for_status, http_request

        name = os.path.basename(local_file)
        endpoint = posixpath.join("/", *([directory] if directory else []), name)
        with open(local_file, "rb") as f:
            response = http_request(get_default_host_creds(repo.artifact_uri), endpoint, "PUT", data=f,
                                    extra_headers={"Content-Type": _guess_mime_type(name)},
                                    timeout=self.policy.timeout_s, max_retries=0)
        augmented_raise_for_status(response)


def warn_lost(what: str, result: UploadResult, policy: UploadPolicy) -> None:
    """One line on stderr for files that are not in MLflow, and why."""
    print(f"[schedtune] MLflow: {len(result.lost)} file(s) of {what} could not be uploaded after "
          f"{policy.retries + 1} attempts of up to {policy.timeout_s:g} s ({result.error}); counted in "
          f"the runs' schedtune.lost_artifacts tag (a longer {ENV_TIMEOUT} may help)", file=sys.stderr)
