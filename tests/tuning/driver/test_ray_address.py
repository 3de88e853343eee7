"""``schedtune tune`` next to a running ``ray start --head`` (the package's token-auth ``head``): with
``RAY_ADDRESS`` set it joins that cluster and says so, starts none of its own (no raylet or GCS below
it; the head lists the experiment's driver), and on a terminal shows schedtune's bar, not Tune's box."""
from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import ROOT, sqlite_store

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]


def run_on_a_terminal(argv: list[str], env: dict[str, str], cwd, timeout_s: float = 500) -> tuple[int, str, set[str]]:
    """(exit status, everything it wrote to its terminal, names of the processes below it while it ran)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env, cwd=cwd)
    os.close(slave)
    chunks, names = [], set()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            try:
                names |= {p.name() for p in psutil.Process(proc.pid).children(recursive=True)}
            except psutil.Error:
                pass
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:   # EIO: the child closed its terminal
                    data = b""
                if not data and proc.poll() is not None:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return proc.wait(), b"".join(chunks).decode(errors="replace"), names


def test_tune_joins_the_cluster_in_ray_address_and_draws_its_own_bar(head, tmp_path):
    from ray.job_submission import JobSubmissionClient

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update({"RAY_ADDRESS": head.address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": head.token,
                "COLUMNS": "160"})
    argv = [sys.executable, "-m", "tuning.cli", "tune", str(ROOT / "search_spaces/quickstart.yaml"), "--smoke",
            "--name", "joined", "--storage", str(tmp_path / "results"), "--tracking-uri", sqlite_store(tmp_path / "m.db")]
    code, screen, below = run_on_a_terminal(argv, env, tmp_path)
    assert code == 0, screen[-3000:]
    assert f"joining the Ray cluster at {head.address} (RAY_ADDRESS" in screen
    assert "started a local Ray cluster" not in screen
    assert not below & {"raylet", "gcs_server"}, below          # no second cluster
    assert "\r\x1b[K[" in screen and "2/2 trials" in screen and "ETA" in screen, screen[-2000:]
    assert "Configuration for experiment" not in screen and "tensorboard" not in screen.lower()
    # The experiment's driver is a job of the head: it ran there.
    drivers = [j for j in JobSubmissionClient(head.url, headers={"Authorization": f"Bearer {head.token}"}).list_jobs()
               if str(j.type).endswith("DRIVER") and "tuning.cli tune" in (j.entrypoint or "") and "joined" in j.entrypoint]
    assert len(drivers) == 1 and str(drivers[0].status).endswith("SUCCEEDED"), drivers
    # What the README says of TensorBoard: its event files outlive the run, in each trial's directory.
    assert list((tmp_path / "results" / "joined").glob("*/trial_fn_*/events.out.tfevents.*"))
