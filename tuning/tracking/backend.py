"""The MLflow tracking backend: which URI (``--tracking-uri``, ``$MLFLOW_TRACKING_URI``, else a sqlite
file in the working directory), whether it can be used (checked before Ray starts), and the
experiment in it. No Ray and no torch here: every command imports it (mlflow only inside functions)."""
from __future__ import annotations

import os
import urllib.request
from pathlib import Path
from typing import Optional

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class TrackingError(RuntimeError):
    """The tracking backend cannot be used: says which URI and what to do."""


def resolve_tracking_uri(uri: Optional[str]) -> str:
    """``uri``, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db (made absolute)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def experiment_id(client, uri: str, name: str) -> str:
    """The MLflow experiment ``name``, created where missing. With a sqlite store its artifacts go
    beside the database (``<db dir>/mlruns/<run id>``), not into MLflow's default ``./mlruns`` of whatever
    directory the command happened to run in."""
    from tuning.tracking import schema

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.tags.get(schema.EXPERIMENT_KIND) != schema.EXPERIMENT_KIND_TRAINING:   # made by an older schedtune
            client.set_experiment_tag(exp.experiment_id, schema.EXPERIMENT_KIND, schema.EXPERIMENT_KIND_TRAINING)
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).resolve().parent / "mlruns").as_uri()
    # The experiment kind makes MLflow 3's UI open on the training runs, not its GenAI view.
    return client.create_experiment(name, artifact_location=location,
                                    tags={schema.EXPERIMENT_KIND: schema.EXPERIMENT_KIND_TRAINING})


def store_exists(uri: str) -> bool:
    """Whether there can be anything to read at ``uri``: a sqlite database that exists, or any other
    store (a server, a file store). Read-only commands check this first, so that they never create one."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).is_file()
    return True


def check_tracking(uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast (before any trial starts) when the tracking backend is unusable."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as r:
                if r.status == 200:
                    return
        except Exception as e:
            raise TrackingError(f"cannot reach the MLflow tracking server at {uri} ({e}): start it, or pass "
                                f"--tracking-uri (default {DEFAULT_TRACKING_URI})") from None
    elif uri.startswith("sqlite:///"):
        parent = Path(uri[len("sqlite:///"):]).parent
        existing = next(p for p in (parent, *parent.parents) if p.exists())   # MLflow makes the rest
        if not (existing.is_dir() and os.access(existing, os.W_OK)):
            raise TrackingError(f"cannot write the MLflow database {uri}: {existing} is not a writable directory")
