"""A private local Ray cluster: its own temp dir and explicit ports, stopped by PID.

``ray.init()`` alone shares defaults with any other Ray cluster on the machine (the dashboard
agent's fixed port, /tmp/ray), and Train's detached placement-group cleaner then finds the
wrong cluster's state API: groups of trials that ASHA stopped leak and later trials wait
forever for workers. So schedtune starts its local cluster with ``ray start --head --block``,
every port chosen and the dashboard on, gives the head (and so every Ray worker) the environment
variable ``RAY_API_SERVER_ADDRESS`` naming that dashboard, and ends only the process tree it
started. The calling process's own environment is left alone (two clusters can coexist).
"""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

# Train V2 waits on its controller's poll between reports; 2 s by default makes tiny epochs slow.
TRAIN_ENV_DEFAULTS = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "120",
}


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


@dataclass
class LocalCluster:
    """``ray start --head`` on this machine with private ports and temp dir."""
    num_cpus: int
    num_gpus: Optional[int] = None
    env: dict[str, str] = field(default_factory=dict)    # extra environment for every Ray process
    temp_dir: Optional[str] = None
    gcs_port: int = 0
    dashboard_port: int = 0
    proc: Optional[subprocess.Popen] = None
    nodes: list["WorkerNode"] = field(default_factory=list)   # worker nodes started by add_node
    _own_temp: bool = False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, timeout_s: float = 90.0) -> "LocalCluster":
        # Unix socket paths are limited to 107 bytes: keep the temp dir short.
        if self.temp_dir is None:
            self.temp_dir, self._own_temp = tempfile.mkdtemp(prefix="st-ray-", dir="/tmp"), True
        self.gcs_port, self.dashboard_port = free_ports(2)
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
               f"--port={self.gcs_port}", f"--num-cpus={self.num_cpus}",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
               *_node_ports(self.gcs_port % 100), f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]
        if self.num_gpus is not None:
            cmd.append(f"--num-gpus={self.num_gpus}")
        if "RAY_AUTH_MODE" not in {**os.environ, **self.env}:
            # Nobody chose: token auth (Ray's default) with a token of this cluster's own, handed
            # to this process and to the head's environment (never ~/.ray/auth_token, which other
            # clusters on the machine may be using).
            token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
            self.env.update(token)
            os.environ.update(token)
            refresh_ray_auth()
        env = self.node_env()
        self.proc = _launch(cmd, env, self.temp_dir)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            _check_running(self.proc, self.temp_dir)
            if _http_ok(f"{self.dashboard_url}/api/version", _auth_headers(env)):
                return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"the local Ray cluster did not come up within {timeout_s:.0f} s "
                           f"(log: {self.temp_dir}/ray-start.log)")

    def node_env(self) -> dict[str, str]:
        """The environment of every node's Ray processes: Train's bounded waits, this cluster's
        auth, and the dashboard Train's placement-group cleaner must ask (never another cluster's)."""
        env = {**os.environ, **TRAIN_ENV_DEFAULTS, **self.env, "RAY_API_SERVER_ADDRESS": self.dashboard_url}
        env.pop("RAY_ADDRESS", None)   # another cluster's (the caller's environment): never followed from here
        return env

    def add_node(self, num_cpus: int, resources: Optional[dict[str, float]] = None,
                 timeout_s: float = 180.0) -> "WorkerNode":
        """Start a worker node of this cluster on this machine (see ``WorkerNode``); it is stopped
        with the cluster, or on its own (``WorkerNode.stop``)."""
        node = WorkerNode(self, num_cpus, resources or {}, index=len(self.nodes) + 1)
        self.nodes.append(node)
        return node.start(timeout_s)

    def stop(self, grace_s: float = 5.0) -> None:
        """End the processes this cluster started, nothing else: its worker nodes, then SIGTERM to
        ``ray start`` (a graceful teardown takes ~17 s here), SIGKILL for what remains after ``grace_s``."""
        for node in self.nodes:
            node.stop(grace_s)
        if self.proc is None:
            return
        _end_tree(self.proc, self.temp_dir, grace_s)
        self.proc = None
        if self._own_temp:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class WorkerNode:
    """A worker node of a ``LocalCluster`` on the same machine: ``ray start --address HEAD --block``
    with its own temp dir, ports and worker-port window, so several nodes (each with its own raylet,
    object store and agents) simulate a multi-node cluster. Declared CPUs need not exist (a node of
    1 CPU on a 2-core machine is how a test makes a worker group span nodes). ``resources``: custom
    resources of this node only. Ended by PID, like the head."""
    head: LocalCluster
    num_cpus: int
    resources: dict[str, float]
    index: int                       # 1, 2, ...: picks the node's worker-port window
    temp_dir: Optional[str] = None
    node_id: Optional[str] = None    # Ray's id of this node, known once it has joined
    proc: Optional[subprocess.Popen] = None

    def start(self, timeout_s: float = 180.0, attempts: int = 3) -> "WorkerNode":
        """Start the node and wait until the head's GCS lists it alive. ``ray start`` gives a raylet
        30 s (hard-coded) to register and exits when it does not, which an overloaded machine
        makes happen: that start is cleaned up and the node started afresh, ``attempts`` times."""
        from ray._raylet import GcsClient

        gcs = GcsClient(address=self.head.address)
        deadline = time.monotonic() + timeout_s
        attempt = 0
        while True:
            attempt += 1
            self._launch()
            while time.monotonic() < deadline and self.proc.poll() is None:
                self.node_id = _alive_node_with_temp_dir(gcs, self.temp_dir)
                if self.node_id:
                    return self
                time.sleep(0.5)
            log = (Path(self.temp_dir) / "ray-start.log").read_text()[-2000:]   # before stop() deletes it
            self.stop()
            if "timed out during startup" not in log or attempt == attempts or time.monotonic() >= deadline:
                raise TimeoutError(f"worker node {self.index} did not join {self.head.address} "
                                   f"(attempt {attempt}, {timeout_s:.0f} s in all): {log}")

    def _launch(self) -> None:
        import json

        self.temp_dir = tempfile.mkdtemp(prefix=f"st-ray-w{self.index}-", dir="/tmp")
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", f"--address={self.head.address}", "--block",
               f"--num-cpus={self.num_cpus}", *_node_ports(self.head.gcs_port % 100 + self.index),
               f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]
        if self.resources:
            cmd.append(f"--resources={json.dumps(self.resources)}")
        self.proc = _launch(cmd, self.head.node_env(), self.temp_dir)

    def raylet_pid(self) -> int:
        """The PID of this node's raylet (what a test kills to lose the node)."""
        import psutil

        for p in psutil.Process(self.proc.pid).children(recursive=True):
            if p.name() == "raylet":
                return p.pid
        raise RuntimeError(f"worker node {self.index} has no raylet running")

    def stop(self, grace_s: float = 5.0) -> None:
        """End this node's processes (and only them), by PID."""
        if self.proc is None:
            return
        _end_tree(self.proc, self.temp_dir, grace_s)
        self.proc = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def refresh_ray_auth() -> None:
    """Make Ray re-read RAY_AUTH_MODE / RAY_AUTH_TOKEN from the environment: it caches both per
    process on first use. A no-op while this process is connected to Ray."""
    import ray
    from ray._raylet import AuthenticationTokenLoader, Config

    if not ray.is_initialized():
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def _node_ports(slot: int) -> list[str]:
    """The ``ray start`` port arguments of one node: every port it listens on chosen free now, and
    its workers' ports in a 200-port window below the ephemeral range (which free_ports draws from,
    32768+ on Linux) and above Ray's client port 10001, chosen by ``slot`` (distinct per node of a
    cluster)."""
    agent_http, agent_grpc, metrics, runtime_env, node_mgr, obj_mgr = free_ports(6)
    lo = 11000 + (slot % 100) * 200
    return [f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
            f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
            f"--min-worker-port={lo}", f"--max-worker-port={lo + 199}"]


def _launch(cmd: list[str], env: dict[str, str], temp_dir: str) -> subprocess.Popen:
    """``ray start ... --block`` in a process group of its own, its output in temp_dir/ray-start.log."""
    log = open(Path(temp_dir) / "ray-start.log", "wb")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=_die_with_parent)


def _check_running(proc: subprocess.Popen, temp_dir: str) -> None:
    if proc.poll() is not None:
        raise RuntimeError(f"ray start exited with {proc.returncode}: "
                           f"{(Path(temp_dir) / 'ray-start.log').read_text()[-2000:]}")


def _alive_node_with_temp_dir(gcs, temp_dir: str) -> Optional[str]:
    """The id of the alive node started with ``temp_dir``, from the GCS's node table (nodes on one
    machine share an IP; their temp dirs tell them apart). None until its raylet has registered,
    which comes seconds after ``ray start`` answers (and after the head's dashboard does)."""
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    try:
        infos = gcs.get_all_node_info(timeout=5)
    except Exception:   # the GCS is busy: asked again at the next poll
        return None
    want = os.path.realpath(temp_dir)
    return next((node_id.hex() for node_id, info in infos.items()
                 if info.state == GcsNodeInfo.ALIVE and os.path.realpath(info.temp_dir) == want), None)


def _end_tree(proc: subprocess.Popen, temp_dir: Optional[str], grace_s: float) -> None:
    """SIGTERM to ``proc`` (a ``ray start --block``), SIGKILL for what of its tree remains after
    ``grace_s``, then SIGKILL for the processes its raylet spawned into sessions of their own (they
    still name ``temp_dir`` on their command line)."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
        tree = [root] + root.children(recursive=True)
        root.terminate()
    except psutil.NoSuchProcess:
        tree = []
    _, alive = psutil.wait_procs(tree, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    for p in psutil.process_iter(["cmdline"]):
        try:
            if temp_dir and any(temp_dir in a for a in (p.info["cmdline"] or [])):
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    try:
        proc.wait(timeout=1)   # reap it (no zombie left to this process)
    except subprocess.TimeoutExpired:
        pass


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the process that started it dies (Linux), so a
    driver killed outright cannot orphan its cluster (``ray start --block`` then tears down)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except Exception:  # not Linux: rely on stop()
        pass


def _auth_headers(env: dict[str, str]) -> dict[str, str]:
    """The bearer token a token-auth head (``RAY_AUTH_MODE=token`` in ``env``) wants on its
    dashboard, found as Ray finds it: ``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH``,
    ``~/.ray/auth_token``. Used only by the readiness probe; {} when auth is off."""
    if env.get("RAY_AUTH_MODE", "").lower() != "token":
        return {}
    token = env.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(env.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        token = (path.read_text().splitlines() or [""])[0].strip() if path.is_file() else ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def _http_ok(url: str, headers: Optional[dict[str, str]] = None) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2) as r:
            return r.status == 200
    except Exception:
        return False
