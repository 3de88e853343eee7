"""The PostgreSQL backup and restore, and MLflow's schema migration, run for real: the scripts and
commands exactly as deploy/ renders them, against a PostgreSQL server this test starts in a
temporary directory on a port of its own (and stops by its PID), and against a SQLite database for
`mlflow db upgrade`. Only the connection settings and paths that name in-cluster places (the
`postgres` Service, mounted Secrets and volumes) are pointed at the local ones.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.deploy.test_deploy import OVERLAYS, _kubectl, pod_specs, render

SERVER_START_TIMEOUT_S = 60
SCRIPT_TIMEOUT_S = 120


def postgres_bin_dir() -> Path | None:
    """A directory with the PostgreSQL server and its client tools of one version."""
    candidates = [Path(p).resolve().parent for p in filter(None, [shutil.which("postgres"),
                                                                  shutil.which("initdb")])]
    candidates += sorted(Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin"))[::-1]
    candidates.append(Path("/usr/local/bin"))
    tools = ("initdb", "postgres", "pg_dump", "pg_restore", "psql", "pg_isready")
    return next((d for d in candidates if all((d / t).is_file() for t in tools)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalPostgres:
    """A throwaway PostgreSQL server: initdb in a temporary directory, password authentication on
    127.0.0.1 only, the superuser `mlflow` (as the official image's POSTGRES_USER is)."""

    def __init__(self, bin_dir: Path):
        self.bin_dir, self.port = bin_dir, free_port()
        # Not under pytest's tmp_path: the server may run as `nobody`, which must reach its files.
        self.root = Path(tempfile.mkdtemp(prefix="schedtune-pg-"))
        self.password = "s3cret-" + os.urandom(6).hex()
        self.password_file = self.root / "password"
        self.password_file.write_text(self.password)
        self.data, self.sockets = self.root / "data", self.root / "sockets"
        self.sockets.mkdir()
        self.proc: subprocess.Popen | None = None
        # initdb and postgres refuse to run as root: run the server as `nobody` then.
        self.demote = None
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            for path in (self.root, self.sockets, self.password_file):
                os.chown(path, nobody.pw_uid, nobody.pw_gid)

            def demote():
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
            self.demote = demote

    def env(self) -> dict[str, str]:
        return {**os.environ, "PATH": f"{self.bin_dir}{os.pathsep}{os.environ['PATH']}",
                "LC_ALL": "C", "PGCONNECT_TIMEOUT": "10"}

    def start(self) -> None:
        subprocess.run([str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", "mlflow",
                        "--auth=scram-sha-256", f"--pwfile={self.password_file}", "--encoding=UTF8",
                        "--locale=C", "--no-sync"],
                       check=True, capture_output=True, env=self.env(), preexec_fn=self.demote,
                       timeout=SERVER_START_TIMEOUT_S, cwd=self.root)
        self.log = open(self.root / "server.log", "wb")
        self.proc = subprocess.Popen(
            [str(self.bin_dir / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-k", str(self.sockets), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
            stdout=self.log, stderr=subprocess.STDOUT, env=self.env(), preexec_fn=self.demote,
            cwd=self.root)
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while subprocess.run([str(self.bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                             capture_output=True, env=self.env()).returncode != 0:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()
            assert time.monotonic() < deadline, "PostgreSQL did not start"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)   # fast shutdown of the server this test started
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc is not None:
            self.log.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def client_env(self) -> dict[str, str]:
        return {**self.env(), "PGHOST": "127.0.0.1", "PGPORT": str(self.port), "PGUSER": "mlflow",
                "PGPASSWORD": self.password}

    def psql(self, database: str, sql: str) -> str:
        proc = subprocess.run([str(self.bin_dir / "psql"), "--no-psqlrc", "--quiet", "--tuples-only", "--no-align",
                               "--set=ON_ERROR_STOP=1", f"--dbname={database}"],
                              input=sql, capture_output=True, text=True, env=self.client_env(),
                              timeout=SCRIPT_TIMEOUT_S)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()


@pytest.fixture
def local_postgres():
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, postgres) with their client tools: "
                    "install postgresql (apt-get install postgresql) to run the backup round trip")
    server = LocalPostgres(bin_dir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def backup_job(overlay: str) -> tuple[dict, dict[str, str], dict[str, str]]:
    """The rendered backup container, its environment and the scripts ConfigMap's files."""
    docs = render(overlay)
    (container,) = pod_specs(docs)["CronJob/postgres-backup"]["containers"]
    scripts = next(d for d in docs if d["kind"] == "ConfigMap"
                   and d["metadata"]["name"] == "postgres-backup-scripts")["data"]
    return container, {e["name"]: e["value"] for e in container["env"]}, scripts


def run_task(server: LocalPostgres, container: dict, env: dict[str, str], scripts: dict[str, str],
             backup_dir: Path, **overrides) -> subprocess.CompletedProcess:
    """Run the container's command as the kubelet would ($(VAR) in args from its env), with the
    ConfigMap's scripts at their mount path replaced by a local copy, and the in-cluster
    connection settings and paths pointed at the local server."""
    env = {**env, **overrides}
    local = {"PGHOST": "127.0.0.1", "PGPORT": str(server.port), "PGPASSWORD_FILE": str(server.password_file),
             "BACKUP_DIR": str(backup_dir), "HOME": str(backup_dir.parent)}
    assert set(local) <= set(env), "the container's environment changed: update this test"
    script_dir = backup_dir.parent / "scripts"
    script_dir.mkdir(exist_ok=True)
    for name, text in scripts.items():
        (script_dir / name).write_text(text)
    mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "scripts")
    argv = container["command"] + [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container["args"]]
    argv = [a.replace(mount, str(script_dir)) for a in argv]
    full_env = {**server.env(), **env, **local}
    return subprocess.run(argv, capture_output=True, text=True, env=full_env, timeout=SCRIPT_TIMEOUT_S)


SCHEMA = """
CREATE TABLE experiments (experiment_id serial PRIMARY KEY, name text UNIQUE NOT NULL);
CREATE TABLE runs (run_uuid text PRIMARY KEY, experiment_id int REFERENCES experiments, status text);
INSERT INTO experiments (name) VALUES ('digits'), ('cifar10');
INSERT INTO runs VALUES ('a1', 1, 'FINISHED'), ('b2', 2, 'RUNNING');
"""
SNAPSHOT = "SELECT string_agg(e.name || ':' || r.run_uuid || ':' || r.status, ',' ORDER BY r.run_uuid) " \
           "FROM runs r JOIN experiments e USING (experiment_id);"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_backup_and_restore_round_trip(overlay, local_postgres, tmp_path):
    """The nightly backup dumps both databases into a new time-stamped directory and prunes old
    ones; a restore refuses while MLflow is connected, rejects a stamp that is not one, and
    otherwise brings both databases back to the backup, tables dropped since included."""
    server = local_postgres
    container, env, scripts = backup_job(overlay)
    docs = render(overlay)
    initdb_sql = next(d for d in docs if d["kind"] == "ConfigMap"
                      and d["metadata"]["name"] == "postgres-initdb")["data"]
    server.psql("postgres", "CREATE DATABASE mlflow;")      # what POSTGRES_DB does in the image
    for sql in initdb_sql.values():                           # then the image runs the initdb scripts
        server.psql("mlflow", sql)
    server.psql("mlflow", SCHEMA)
    server.psql("mlflow_auth", "CREATE TABLE users (id serial PRIMARY KEY, username text); "
                               "INSERT INTO users (username) VALUES ('admin'), ('schedtune');")
    before = server.psql("mlflow", SNAPSHOT)
    assert before == "digits:a1:FINISHED,cifar10:b2:RUNNING"

    backups = tmp_path / "backups"
    backups.mkdir()
    old = backups / "20000101T031700Z"
    old.mkdir()
    os.utime(old, (time.time() - 30 * 86400,) * 2)
    (backups / ".partial-20000102T031700Z").mkdir()           # a backup that died half-way
    result = run_task(server, container, env, scripts, backups)
    assert result.returncode == 0, result.stderr
    stamps = sorted(p.name for p in backups.iterdir())
    assert len(stamps) == 1 and re.fullmatch(r"\d{8}T\d{6}Z", stamps[0]), stamps
    made = backups / stamps[0]
    assert sorted(p.name for p in made.iterdir()) == ["mlflow.dump", "mlflow_auth.dump"]
    assert made.stat().st_mode & 0o077 == 0, "backups are readable by their owner only"

    # Later changes, which the restore must undo.
    server.psql("mlflow", "UPDATE runs SET status = 'FAILED'; INSERT INTO experiments (name) VALUES ('late'); "
                          "DROP TABLE runs;")
    server.psql("mlflow_auth", "DELETE FROM users;")

    # A restore Job is the backup pod with BACKUP_TASK=restore (deploy/README.md).
    # MLflow still connected: an idle psql session this test holds open on its stdin.
    session = subprocess.Popen([str(server.bin_dir / "psql"), "--dbname=mlflow", "--no-psqlrc"],
                               env=server.client_env(), stdin=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        session.stdin.write(b"SELECT 1;\n")
        session.stdin.flush()
        deadline = time.monotonic() + 30
        while server.psql("postgres", "SELECT count(*) FROM pg_stat_activity WHERE datname = 'mlflow';") == "0":
            assert time.monotonic() < deadline, "the other session did not connect"
            time.sleep(0.1)
        refused = run_task(server, container, env, scripts, backups, BACKUP_TASK="restore")
        assert refused.returncode != 0 and "connected to mlflow; stop MLflow first" in refused.stderr
    finally:
        session.stdin.close()   # psql ends its session at the end of its input
        try:
            session.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(session.pid, signal.SIGKILL)   # the psql this test started
            session.wait()
    deadline = time.monotonic() + 30
    while server.psql("postgres", "SELECT count(*) FROM pg_stat_activity WHERE datname = 'mlflow';") != "0":
        assert time.monotonic() < deadline, "the other session did not go away"
        time.sleep(0.1)
    for bad in ("../20000101T031700Z", "20990101T000000Z"):
        rejected = run_task(server, container, env, scripts, backups, BACKUP_TASK="restore", RESTORE_FROM=bad)
        assert rejected.returncode != 0 and "restore:" in rejected.stderr, rejected.stderr
    assert server.psql("mlflow", "SELECT count(*) FROM experiments;") == "3", "a refused restore changed data"

    restored = run_task(server, container, env, scripts, backups, BACKUP_TASK="restore",
                        RESTORE_FROM=stamps[0])
    assert restored.returncode == 0, restored.stderr
    assert server.psql("mlflow", SNAPSHOT) == before
    assert server.psql("mlflow", "SELECT count(*) FROM experiments WHERE name = 'late';") == "0"
    assert server.psql("mlflow_auth", "SELECT string_agg(username, ',' ORDER BY id) FROM users;") == "admin,schedtune"
    # The sequences come back too: the next experiment gets the next id after the backup's.
    assert server.psql("mlflow", "INSERT INTO experiments (name) VALUES ('next') RETURNING experiment_id;") == "3"
    latest = run_task(server, container, env, scripts, backups, BACKUP_TASK="restore")   # RESTORE_FROM=latest
    assert latest.returncode == 0, latest.stderr
    assert server.psql("mlflow", "SELECT count(*) FROM experiments;") == "2"


def test_restore_job_is_made_with_kubectl_set_env():
    """deploy/README.md makes the restore Job from the CronJob with `kubectl set env --local`;
    run that step on the rendered job template: it switches the task and keeps the rest."""
    docs = render("cpu")
    cron = next(d for d in docs if d["kind"] == "CronJob" and d["metadata"]["name"] == "postgres-backup")
    job = {"apiVersion": "batch/v1", "kind": "Job",
           "metadata": {"name": "postgres-restore", "namespace": cron["metadata"]["namespace"]},
           "spec": cron["spec"]["jobTemplate"]["spec"]}
    proc = subprocess.run([_kubectl(), "set", "env", "--local", "-f", "-", "BACKUP_TASK=restore",
                           "RESTORE_FROM=20260102T031700Z", "-o", "yaml"],
                          input=yaml.safe_dump(job), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (container,) = yaml.safe_load(proc.stdout)["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["BACKUP_TASK"] == "restore" and env["RESTORE_FROM"] == "20260102T031700Z"
    original = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert {k: v for k, v in env.items() if k not in ("BACKUP_TASK", "RESTORE_FROM")} == \
        {k: v for k, v in original.items() if k not in ("BACKUP_TASK", "RESTORE_FROM")}


def test_mlflow_db_upgrade_step_creates_and_keeps_the_schema(tmp_path):
    """The init container's command, run as rendered on a SQLite URI: on an empty database it
    creates the schema the server's store accepts (the check that crash-loops a server on an old
    schema), and running it again on every later start is harmless."""
    (init,) = pod_specs(render("gpu"))["Deployment/mlflow"]["initContainers"]
    argv = [sys.executable if init["command"][0] == "python" else init["command"][0]] + init["command"][1:]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": uri, "HOME": str(tmp_path)}
    for attempt in range(2):
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, f"run {attempt}: {proc.stderr[-2000:]}"
    check = ("import sys; from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore; "
             "SqlAlchemyStore(sys.argv[1], sys.argv[2]); print('schema ok')")
    proc = subprocess.run([sys.executable, "-c", check, uri, str(tmp_path / "artifacts")],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0 and "schema ok" in proc.stdout, proc.stderr[-2000:]
