"""Results storage: a local directory or a URI (s3://, gs://, file://, ...), checked before Ray starts,
and the runs an experiment left there (what ``--resume`` restores)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

DEFAULT_STORAGE = "./schedtune_results"
MIN_FREE_BYTES = 200 * 1024 * 1024   # below this a run would fail mid-way writing checkpoints
PROBE = ".schedtune-write-test"
RESTORABLE = "tuner.pkl"             # what Tune writes into an invocation's directory


class StorageError(RuntimeError):
    """The results storage cannot take this experiment (unwritable, full, unreachable)."""


def resolve_storage(storage: Optional[str]) -> str:
    """Absolute local path, or the URI as given; either way created and checked writable."""
    storage = storage or DEFAULT_STORAGE
    if "://" in storage:
        _check_uri(storage)
        return storage.rstrip("/")
    p = Path(storage).expanduser().resolve()
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / PROBE
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise StorageError(f"results storage {p} is not writable ({e.strerror}): pass --storage DIR") from None
    free = shutil.disk_usage(p).free
    if free < MIN_FREE_BYTES:
        raise StorageError(f"results storage {p} is full ({free / 1e6:.0f} MB free, checkpoints need at least "
                           f"{MIN_FREE_BYTES / 1e6:.0f} MB): free space or pass --storage DIR")
    return str(p)


def _check_uri(uri: str) -> None:
    """Write and delete a probe object under ``uri`` (bucket, credentials and permissions at once)."""
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(uri)
        fs.create_dir(root, recursive=True)
        with fs.open_output_stream(f"{root.rstrip('/')}/{PROBE}") as f:
            f.write(b"ok")
        fs.delete_file(f"{root.rstrip('/')}/{PROBE}")
    except Exception as e:   # pyarrow raises OSError, ArrowInvalid, ... with the backend's message
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise StorageError(f"results storage {uri} is not writable ({reason}): check the URI and its credentials "
                           f"(for S3/MinIO: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, and "
                           f"AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_S3 for an S3-compatible store; every Ray node "
                           f"needs them too: docs/faults.md), or pass --storage DIR") from None


def latest_run_dir(storage: str, name: str) -> Optional[str]:
    """The newest restorable invocation of experiment ``name`` under ``storage`` (a local path or a
    URI, as resolve_storage returned it), in the same form; None when there is none."""
    base = f"{storage}/{name}"
    if "://" not in storage:
        root = Path(base)
        runs = sorted(p.name for p in root.glob("*") if (p / RESTORABLE).exists()) if root.is_dir() else []
    else:
        import pyarrow.fs as pafs

        fs, root_path = pafs.FileSystem.from_uri(base)
        infos = fs.get_file_info(pafs.FileSelector(root_path, allow_not_found=True))
        dirs = [i.path for i in infos if i.type == pafs.FileType.Directory]
        runs = sorted(Path(d).name for d in dirs if fs.get_file_info(f"{d}/{RESTORABLE}").type == pafs.FileType.File)
    return f"{base}/{runs[-1]}" if runs else None
