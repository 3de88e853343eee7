"""storage: moved from the former test_tuning_units.py grab-bag."""
from __future__ import annotations


import pytest

from tests.conftest import ROOT

QUICK = ROOT / "search_spaces/quickstart.yaml"
QUICK = ROOT / "search_spaces/quickstart.yaml"


def test_unwritable_or_full_storage_is_a_clear_error_at_start(tmp_path, monkeypatch):
    from tuning.driver import storage
    from tuning.driver.storage import StorageError, resolve_storage

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match=f"results storage {blocker}/results is not writable"):
        resolve_storage(str(blocker / "results"))
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda p: type("U", (), {"free": 10 * 1024 * 1024})())
    with pytest.raises(StorageError, match="is full .10 MB free"):
        resolve_storage(str(tmp_path / "ok"))
    monkeypatch.undo()
    assert resolve_storage(str(tmp_path / "ok")) == str(tmp_path / "ok")
    # a URI gets the same check, through pyarrow's filesystems (S3, GCS, file://, ...)
    assert resolve_storage(f"file://{tmp_path}/uri/") == f"file://{tmp_path}/uri"
    assert (tmp_path / "uri").is_dir() and not list((tmp_path / "uri").iterdir())   # the probe is gone
    with pytest.raises(StorageError, match=f"results storage file://{blocker}/results is not writable"):
        resolve_storage(f"file://{blocker}/results")


@pytest.mark.parametrize("uri", [False, True])
def test_resume_finds_the_latest_restorable_run_locally_and_under_a_uri(tmp_path, uri):
    from tuning.driver.storage import latest_run_dir

    for run, restorable in (("20261101-000000", True), ("20261102-000000", True), ("20261103-000000", False)):
        (tmp_path / "exp" / run).mkdir(parents=True)
        if restorable:
            (tmp_path / "exp" / run / "tuner.pkl").write_bytes(b"x")
    storage = f"file://{tmp_path}" if uri else str(tmp_path)
    assert latest_run_dir(storage, "exp") == f"{storage}/exp/20261102-000000"
    assert latest_run_dir(storage, "other") is None
