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
        (self.gcs_port, self.dashboard_port, agent_http, agent_grpc, metrics, runtime_env,
         node_mgr, obj_mgr) = free_ports(8)
        # Workers' ports: a 200-port window below the ephemeral range (which free_ports draws
        # from, 32768+ on Linux) and above Ray's client port 10001; chosen per cluster.
        lo = 11000 + (self.gcs_port % 100) * 200
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
               f"--port={self.gcs_port}", f"--num-cpus={self.num_cpus}",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
               f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
               f"--node-manager-port={node_mgr}",
               f"--object-manager-port={obj_mgr}", f"--min-worker-port={lo}", f"--max-worker-port={lo + 199}",
               f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]
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
        env = {**os.environ, **TRAIN_ENV_DEFAULTS, **self.env,
               "RAY_API_SERVER_ADDRESS": self.dashboard_url}
        log = open(Path(self.temp_dir) / "ray-start.log", "wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}: "
                                   f"{(Path(self.temp_dir) / 'ray-start.log').read_text()[-2000:]}")
            if _http_ok(f"{self.dashboard_url}/api/version", _auth_headers(env)):
                return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"the local Ray cluster did not come up within {timeout_s:.0f} s "
                           f"(log: {self.temp_dir}/ray-start.log)")

    def stop(self, grace_s: float = 5.0) -> None:
        """End the processes this cluster started, nothing else: SIGTERM to ``ray start``
        (a graceful teardown takes ~17 s here), then SIGKILL for what remains after ``grace_s``."""
        if self.proc is None:
            return
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
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
        # Processes the raylet spawned into their own sessions still name our temp dir.
        for p in psutil.process_iter(["cmdline"]):
            try:
                if self.temp_dir and any(self.temp_dir in a for a in (p.info["cmdline"] or [])):
                    p.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        self.proc = None
        if self._own_temp:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def refresh_ray_auth() -> None:
    """Make Ray re-read RAY_AUTH_MODE / RAY_AUTH_TOKEN from the environment: it caches both per
    process on first use. A no-op while this process is connected to Ray."""
    import ray
    from ray._raylet import AuthenticationTokenLoader, Config

    if not ray.is_initialized():
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


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
