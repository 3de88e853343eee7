"""Real components the scale and fault tests start on this machine: a multi-node Ray cluster, a
local S3 endpoint, and an MLflow server on PostgreSQL with its artifacts on that endpoint. Each has
its own ports and temp dir and is stopped by PID (or its own process group), nothing else.

- Multi-node Ray: ``tuning.driver.cluster.LocalCluster`` plus ``add_node`` (one ``ray start`` per
  worker node); ``multinode_cluster`` here starts one with auth off and says where actors ran.
- S3: moto's standalone server (``python -m moto.server``), in memory: MinIO's server is not on the
  package registries here. What differs from real S3 is in docs/faults.md ("Object storage").
- PostgreSQL: ``tests.deploy.test_deploy_backup.LocalPostgres`` (initdb in a temp dir, its own port).
- MLflow: ``tests.conftest.MlflowServer`` pointed at PostgreSQL and S3 (``MlflowOnPostgres``).
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Iterator, Optional

from tests.conftest import MlflowServer, end_group
from tuning.driver.cluster import LocalCluster, free_ports
from tuning.driver.user_code import scoped_environ

RAY_OFF = {"RAY_AUTH_MODE": "disabled"}   # private test clusters: token auth off


# ----------------------------------------------------------------------------- Ray

@contextlib.contextmanager
def multinode_cluster(head_cpus: int, worker_cpus: list[int], env: Optional[dict[str, str]] = None
                      ) -> Iterator[LocalCluster]:
    """A head with ``head_cpus`` and one worker node per entry of ``worker_cpus`` (auth off), stopped
    (every node, by PID) on exit. This process's RAY_AUTH_MODE is set to match while it runs."""
    old = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    cluster = LocalCluster(num_cpus=head_cpus, env={**RAY_OFF, **(env or {})})
    try:
        cluster.start()
        for cpus in worker_cpus:
            cluster.add_node(cpus)
        yield cluster
    finally:
        cluster.stop()
        if old is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = old


def actors_by_group(cluster: LocalCluster, class_name: str = "RayTrainWorker") -> dict[str, list[dict]]:
    """Every actor of ``class_name`` the cluster ever started (alive or dead), by placement group:
    Train makes one group per worker-group start, so a group is one start of one trial's workers."""
    from ray.util.state import list_actors

    groups: dict[str, list[dict]] = defaultdict(list)
    for a in list_actors(address=cluster.dashboard_url, filters=[("class_name", "=", class_name)], limit=10000,
                         detail=True, raise_on_missing_output=False):
        groups[a["placement_group_id"]].append(a)
    return dict(groups)


def node_states(cluster: LocalCluster) -> dict[str, dict]:
    """node id -> Ray's state API record (state ALIVE/DEAD, is_head_node, resources_total)."""
    from ray.util.state import list_nodes

    return {n["node_id"]: n for n in list_nodes(address=cluster.dashboard_url, limit=1000, detail=True)}


def cluster_snapshot(cluster: LocalCluster) -> str:
    """What a cluster holds now, for a test's failure message: its actors that are not dead (class,
    state, job, placement group), its placement groups that are not removed (state, bundles), and a
    summary of its tasks by state. Never raises (a failure message must not fail)."""
    from ray.util.state import list_actors, list_placement_groups, summarize_tasks

    lines = []
    try:
        for a in list_actors(address=cluster.dashboard_url, filters=[("state", "!=", "DEAD")], limit=1000,
                             detail=True, raise_on_missing_output=False):
            lines.append(f"actor {a['class_name']} {a['state']} job {a['job_id']} pid {a.get('pid')} "
                         f"group {a.get('placement_group_id')}")
        for g in list_placement_groups(address=cluster.dashboard_url, filters=[("state", "!=", "REMOVED")],
                                       limit=1000, detail=True, raise_on_missing_output=False):
            lines.append(f"placement group {g['placement_group_id']} {g['state']} job {g.get('creator_job_id')} "
                         f"bundles {[b.get('unit_resources') for b in g.get('bundles', [])]}")
        tasks = summarize_tasks(address=cluster.dashboard_url, raise_on_missing_output=False)
        lines.append(f"tasks: {tasks}"[:2000])
    except Exception as e:   # the dashboard may be what hangs
        lines.append(f"(the state API did not answer: {e!r})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- S3 (moto)

class S3Endpoint:
    """moto's S3 server on 127.0.0.1 (a port of its own, its own process group), and the AWS
    environment that points boto3, pyarrow (Ray Tune/Train's storage) and MLflow at it."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        root.mkdir(parents=True, exist_ok=True)
        self.log = open(root / "moto.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root)

    @property
    def env(self) -> dict[str, str]:
        """The usual AWS variables: the endpoint (AWS_ENDPOINT_URL for boto3 and pyarrow,
        MLFLOW_S3_ENDPOINT_URL for MLflow's artifact store), credentials and region."""
        return {"AWS_ENDPOINT_URL": self.url, "MLFLOW_S3_ENDPOINT_URL": self.url,
                "AWS_ACCESS_KEY_ID": "schedtune-test", "AWS_SECRET_ACCESS_KEY": "schedtune-test",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def wait(self, timeout_s: float = 60.0) -> "S3Endpoint":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError((self.root / "moto.log").read_text()[-3000:])
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=2):
                    return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"moto's S3 server did not answer within {timeout_s} s")

    def client(self):
        import boto3

        e = self.env
        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=e["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=e["AWS_SECRET_ACCESS_KEY"], region_name=e["AWS_DEFAULT_REGION"])

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` (all pages)."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def stop(self) -> None:
        end_group(self.proc)
        self.log.close()


def aws_environment(s3: S3Endpoint):
    """This process's environment (and so that of what it starts) pointed at ``s3``; restored after."""
    return scoped_environ(s3.env)


@contextlib.contextmanager
def running_s3(*buckets: str) -> Iterator[S3Endpoint]:
    """A started S3Endpoint with ``buckets``, this process's AWS environment pointed at it while it
    runs (see ``aws_environment``); stopped on exit."""
    endpoint = S3Endpoint(fresh_dir("st-s3-")).wait()
    try:
        for bucket in buckets:
            endpoint.make_bucket(bucket)
        with aws_environment(endpoint):
            yield endpoint
    finally:
        endpoint.stop()


# ----------------------------------------------------------------------------- PostgreSQL + MLflow

def local_postgres():
    """A started ``LocalPostgres`` with a database ``mlflow``, or None where the server binaries
    are missing (the caller skips, naming the package)."""
    from tests.deploy.test_deploy_backup import LocalPostgres, postgres_bin_dir

    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        return None
    server = LocalPostgres(bin_dir)
    try:
        server.start()
        server.psql("postgres", "CREATE DATABASE mlflow;")
    except BaseException:
        server.stop()
        raise
    return server


def postgres_uri(server) -> str:
    # +psycopg2 as deploy/ writes it: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg (3)
    return f"postgresql+psycopg2://mlflow:{server.password}@127.0.0.1:{server.port}/mlflow"


class MlflowOnPostgres(MlflowServer):
    """``mlflow server`` as deploy/ runs it: the PostgreSQL backend store, artifacts proxied to S3
    (``--serve-artifacts --artifacts-destination s3://...``), started in its own process group and
    restartable on the same port (``restart``). The S3 endpoint comes from this process's
    environment (``aws_environment``)."""

    def __init__(self, root: Path, port: int, backend_uri: str, artifacts_uri: str):
        self.backend_uri, self.artifacts_uri = backend_uri, artifacts_uri
        # MlflowServer's own --backend-store-uri/--artifacts-destination come first: click keeps the last.
        super().__init__(root, port, ("--backend-store-uri", backend_uri, "--artifacts-destination", artifacts_uri))

    def restart(self) -> "MlflowOnPostgres":
        """Stop the server (its whole process group) and start it again, same port and stores."""
        self.stop()
        self.__init__(self.root, self.port, self.backend_uri, self.artifacts_uri)
        return self.wait()


def fresh_dir(prefix: str) -> Path:
    """A short temp dir under /tmp (Unix socket paths must stay under 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
