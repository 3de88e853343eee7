"""Shared fixtures: a private local Ray cluster and a real `mlflow server` process.

Both are started by the tests themselves (own temp dirs and ports, so other Ray clusters or
servers on the machine are untouched) and stopped by PID / process group, nothing else.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


_STORE_TEMPLATE: list[Path] = []   # the session's migrated empty store, made on first use


def sqlite_store(path: Path) -> str:
    """``sqlite:///PATH``: a fresh, empty MLflow store at ``path``, copied from one migrated for the
    session. MLflow's Alembic migrations take ~3 s per new sqlite file; a copy takes milliseconds and
    is the same store (MLflow opens it as its own schema, nothing pending). Tests of how schedtune
    or MLflow *create* a store (tests/tuning/tracking/test_backend.py) make theirs the usual way."""
    import shutil
    import tempfile

    if not _STORE_TEMPLATE:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        root = Path(tempfile.mkdtemp(prefix="schedtune-test-store-"))
        SqlAlchemyStore(f"sqlite:///{root}/template.db", str(root / "mlruns")).search_experiments()
        _STORE_TEMPLATE.append(root / "template.db")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_STORE_TEMPLATE[0], path)
    return f"sqlite:///{path}"


@pytest.fixture(scope="session", autouse=True)
def _remove_store_template():
    yield
    if _STORE_TEMPLATE:
        import shutil

        shutil.rmtree(_STORE_TEMPLATE[0].parent, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster():
    """A 2-CPU private Ray cluster (token auth off: it is private to this test session)."""
    from tuning.driver.cluster import LocalCluster

    old = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    cluster = LocalCluster(num_cpus=2, env={"RAY_AUTH_MODE": "disabled"}).start()
    yield cluster
    cluster.stop()
    if old is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = old


class MlflowServer:
    def __init__(self, root: Path, port: int, extra_args: tuple[str, ...] = ()):
        self.root, self.port = root, port
        self.uri = f"http://127.0.0.1:{port}"
        root.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
               "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--serve-artifacts",
               "--artifacts-destination", str(root / "artifacts"), "--workers", "1", *extra_args]
        self.log = open(root / "server.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=root)

    def wait(self, timeout_s: float = 120.0) -> "MlflowServer":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError((self.root / "server.log").read_text()[-3000:])
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"mlflow server did not answer /health within {timeout_s} s")

    def stop(self) -> None:
        """End the server's own process group (gunicorn/uvicorn workers included)."""
        end_group(self.proc, 20)
        self.log.close()


def end_group(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """End the process group ``proc`` leads (it was started with ``start_new_session=True``): SIGTERM,
    then SIGKILL after ``grace_s``. Children that outlive their parent (mlflow's huey consumers) go too."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    from tuning.driver.cluster import free_ports

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), free_ports(1)[0]).wait()
    yield server
    server.stop()


NUM_SAMPLES, EPOCHS = 4, 3


@pytest.fixture(scope="session")
def experiment(ray_cluster, mlflow_server, tmp_path_factory):
    """One real ASHA experiment of 2-worker trials (more trials than slots), tracked in the
    session's mlflow server: (spec, ExperimentResult, progress lines)."""
    from tuning.driver.experiment import run_experiment
    from tuning.spec import load_spec

    spec = load_spec(ROOT / "search_spaces/quickstart.yaml", {
        "experiment.name": "it-asha", "experiment.num_samples": NUM_SAMPLES,
        "experiment.scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "train.epochs": EPOCHS, "train.scaling.num_workers": 2, "train.scaling.cpus_per_worker": 0.5})
    from tuning.driver.cluster import LocalCluster

    lines = []
    # A second Ray cluster on the same machine while trials are stopped by ASHA: Train's
    # placement-group cleaner must still find *this* cluster's state API.
    with LocalCluster(num_cpus=1, env={"RAY_AUTH_MODE": "disabled"}):
        result = run_experiment(spec, storage=str(tmp_path_factory.mktemp("results")),
                                tracking_uri=mlflow_server.uri, address=ray_cluster.address, out=lines.append)
    return spec, result, lines
