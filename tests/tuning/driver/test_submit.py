"""Job submission (tuning.driver.submit) against a real token-auth Ray head.

One head (``ray start --head`` through LocalCluster: its own temp dir and ports, 2 CPUs,
``RAY_AUTH_MODE=token`` and a random ``RAY_AUTH_TOKEN`` in its environment; the package's ``head``
fixture, tests/tuning/driver/conftest.py) serves every integration test: the job API refuses requests without the token or with a wrong one (raw HTTP,
the Python API, the CLI: exit 2, one line); the smoke quickstart submitted through the Python API
(once, a module fixture) runs to SUCCEEDED and its trials are in MLflow; ``schedtune jobs`` lists it
and ``schedtune stop`` stops a second submission. No output, job log, job entrypoint, runtime
environment or metadata these tests see contains the token. A few fast tests need no cluster.
"""
from __future__ import annotations

import io
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.tuning.driver.conftest import Head, hold_token
from tests.conftest import sqlite_store
from tuning.spec import SpaceError
from tuning.driver.submit import SubmitError, SubmitResult, _client, _interrupted, entrypoint, list_jobs, submit_experiment

REPO = Path(__file__).resolve().parents[3]
QUICKSTART = REPO / "search_spaces" / "quickstart.yaml"
SMOKE = {"experiment.num_samples": 2, "train.epochs": 2, "train.scaling.num_workers": 1}   # = --smoke
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")

pytestmark = pytest.mark.timeout(600)


def cluster_test(fn):
    return pytest.mark.integration(pytest.mark.slow(fn))


@pytest.fixture
def auth(head, monkeypatch):
    """This process holds the cluster's token, as a user who set it up would."""
    hold_token(monkeypatch, head)
    return head


@dataclass
class FirstJob:
    result: SubmitResult
    log: str            # everything submit_experiment streamed: our lines and the job's own log
    uri: str            # its MLflow
    info: str           # the job as everyone who can list jobs sees it: entrypoint, runtime env, metadata


@pytest.fixture(scope="module")
def first_job(head) -> FirstJob:
    """The smoke quickstart submitted through the Python API and followed to its end, once for
    the tests that check it ran and that `schedtune jobs` lists it."""
    uri = sqlite_store(head.tmp / "mlflow.db")
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        hold_token(mp, head)
        r = submit_experiment(QUICKSTART, head.url, overrides=SMOKE, storage=str(head.tmp / "results"),
                              tracking_uri=uri, out=lines.append)
        info = _client(head.url).get_job_info(r.submission_id)
    return FirstJob(r, "\n".join(lines), uri, repr(info))


def no_token(head: Head, *texts: str) -> None:
    for text in texts:
        assert head.token not in text, "the token leaked"


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
    return subprocess.run([sys.executable, "-m", "tuning.cli", *args], env={**base, **env}, cwd=REPO,
                          capture_output=True, text=True, timeout=120)


# ----------------------------------------------------------------------------- no cluster


def test_entrypoint_overrides_round_trip_through_set():
    values = {"train.optim.base_lr": 1e-5, "train.epochs": 2, "experiment.name": "1.0",
              "train.schedule": {"name": "step", "milestones": [0.5, 0.75]}, "train.scaling.use_gpu": True,
              "experiment.seed": 0, "train.model.name": "it's"}
    cmd = entrypoint("quickstart.yaml", values, "/shared/results dir", "http://mlflow:5000")
    import shlex

    argv = shlex.split(cmd)
    assert argv[:7] == ["python", "-m", "tuning.cli", "tune", "quickstart.yaml", "--address", "auto"]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in sets)} == values
    assert argv[-4:] == ["--storage", "/shared/results dir", "--tracking-uri", "http://mlflow:5000"]


def test_a_spec_that_is_not_a_file_travels_as_the_entrypoints_stdin_exactly():
    """A dict, a loaded spec or a file outside the working dir: ``tune -`` reads the text from a quoted
    here-document; nothing in it is expanded by the job's shell."""
    text = "experiment: {name: 'it''s $HOME `x`'}\ntrain: {epochs: 2}  # \"quoted\" \\n\n"
    cmd = entrypoint("-", {"train.epochs": 2}, None, None, stdin_text=text)
    head, _, body = cmd.partition(" <<'")
    assert head == "python -m tuning.cli tune - --address auto --set train.epochs=2"
    shown = subprocess.run(["sh", "-c", "cat <<'" + body], capture_output=True, text=True, check=True).stdout
    assert shown == text


def test_a_loaded_spec_is_submitted_as_the_document_that_loads_back_to_it():
    from tuning.driver.submit import spec_document
    from tuning.spec import load_spec

    spec = load_spec(QUICKSTART, {**SMOKE, "space.optim.base_lr": {"loguniform": [1e-3, 0.3]}})
    again = load_spec(yaml.safe_load(yaml.safe_dump(spec_document(spec))))
    assert (again.options, again.base, again.space) == (spec.options, spec.base, spec.space)


def test_a_bad_space_file_fails_before_contacting_the_cluster(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(QUICKSTART.read_text().replace("num_samples: 6", "num_samples: 0"))
    with pytest.raises(SpaceError, match="num_samples"):
        submit_experiment(bad, "http://127.0.0.1:1")   # nothing listens there: never reached


class FakeClient:
    def __init__(self):
        self.stopped = []

    def stop_job(self, sid):
        self.stopped.append(sid)
        return True

    def get_job_status(self, sid):
        return "STOPPED" if self.stopped else "RUNNING"


def test_ctrl_c_without_a_terminal_leaves_the_job_running(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))   # not a TTY: never read
    lines, client = [], FakeClient()
    assert _interrupted(client, "schedtune-x-1", "http://head:8265", lines.append) == "RUNNING"
    assert client.stopped == []
    assert "schedtune stop schedtune-x-1 --address http://head:8265" in lines[-1]


def test_ctrl_c_on_a_terminal_asks_and_stops(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Tty())
    asked = []
    monkeypatch.setattr("builtins.input", lambda prompt: asked.append(prompt) or "y")
    client = FakeClient()
    assert _interrupted(client, "schedtune-x-1", "http://head:8265", lambda s: None) == "STOPPED"
    assert client.stopped == ["schedtune-x-1"] and "stop job schedtune-x-1? [y/N]" in asked[0]


# ----------------------------------------------------------------------------- token auth


@cluster_test
def test_the_job_api_refuses_requests_without_the_token(head):
    def get(headers):
        req = urllib.request.Request(f"{head.url}/api/jobs/", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    assert get({}) == 401          # Ray 2.60: missing token 401, wrong token 403 (docs/security.md)
    assert get({"Authorization": f"Bearer {secrets.token_hex(16)}"}) == 403
    assert get({"Authorization": f"Bearer {head.token}"}) == 200


@cluster_test
def test_python_api_without_or_with_a_wrong_token_is_a_clear_error(head, monkeypatch, tmp_path):
    for var in AUTH_VARS:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SubmitError, match="requires a token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN") as e:
        submit_experiment(QUICKSTART, head.url, overrides=SMOKE, wait=False)
    no_token(head, str(e.value))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_AUTH_TOKEN", head.token)   # present but not sent: auth mode is off here
    with pytest.raises(SubmitError, match="requires a token") as e:
        submit_experiment(QUICKSTART, head.url, overrides=SMOKE, wait=False)
    assert head.token not in str(e.value)

    wrong = secrets.token_hex(16)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", wrong)
    with pytest.raises(SubmitError, match="rejected the token") as e:
        list_jobs(head.url)
    assert wrong not in str(e.value)
    no_token(head, str(e.value))

    # a token file (RAY_AUTH_TOKEN_PATH) works when RAY_AUTH_TOKEN is unset; a missing one is an error
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    token_file = tmp_path / "auth_token"
    token_file.write_text(head.token + "\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    assert isinstance(list_jobs(head.url), list)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(SubmitError, match="no usable token") as e:
        list_jobs(head.url)
    no_token(head, str(e.value))


@cluster_test
def test_an_unreachable_address_is_a_clear_error_whatever_the_environment_says(auth, monkeypatch):
    # JobSubmissionClient would silently prefer $RAY_API_SERVER_ADDRESS over the address given
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", auth.url)
    with pytest.raises(SubmitError, match=r"cannot reach the Ray job API at http://127\.0\.0\.1:1\b") as e:
        list_jobs("http://127.0.0.1:1")
    no_token(auth, str(e.value))


@cluster_test
def test_cli_errors_exit_2_on_one_line_and_never_show_the_token(head):
    wrong = secrets.token_hex(16)
    cases = [({}, "requires a token"),
             ({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": head.token}, "requires a token"),
             ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": wrong}, "rejected the token")]
    for env, expected in cases:
        p = cli("jobs", "--address", head.url, env=env)
        assert p.returncode == 2, (env.keys(), p.stdout, p.stderr)
        assert p.stderr.startswith("schedtune jobs: error: ") and expected in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert head.token not in p.stdout + p.stderr and wrong not in p.stdout + p.stderr
    p = cli("stop", "schedtune-x-00000000", "--address", "http://127.0.0.1:1",
            env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": head.token})
    assert p.returncode == 2 and "cannot reach the Ray job API" in p.stderr
    assert head.token not in p.stdout + p.stderr


# ----------------------------------------------------------------------------- a real experiment


@cluster_test
def test_submitted_smoke_experiment_succeeds_and_its_trials_are_in_mlflow(head, first_job):
    import mlflow

    r, log, uri = first_job.result, first_job.log, first_job.uri
    assert r.status == "SUCCEEDED", log[-3000:]
    no_token(head, log, first_job.info, repr(r))
    assert f"submitted job {r.submission_id} (digits-quickstart) to {head.url}" in log
    assert f"job {r.submission_id}: SUCCEEDED" in log
    assert r.submission_id.startswith("schedtune-digits-quickstart-") and len(r.submission_id.rsplit("-", 1)[1]) == 8
    assert r.metadata["schedtune.experiment"] == "digits-quickstart"
    assert set(r.metadata) == {"schedtune.experiment", "schedtune.user", "schedtune.space_sha256",
                               "schedtune.space_file"}
    assert "digits-quickstart: 2 trials" in log   # the job's own output was streamed to us

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("digits-quickstart")
    assert exp is not None
    parents = client.search_runs([exp.experiment_id], "tags.`schedtune.role` = 'experiment'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.tags["schedtune.space_sha256"] == r.metadata["schedtune.space_sha256"]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 2
    for child in children:
        assert child.data.tags.get("schedtune.status") not in (None, "", "running")
        steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, "val_acc"))
        assert steps and steps == list(range(1, len(steps) + 1)) and len(steps) <= 2


@cluster_test
def test_cli_jobs_lists_the_job_and_stop_stops_a_second_one(auth, first_job):
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": auth.token}
    p = cli("submit", str(QUICKSTART), "--smoke", "--address", auth.url, "--no-wait",
            "--storage", str(auth.tmp / "stopped"), "--tracking-uri", sqlite_store(auth.tmp / "stopped.db"), env=env)
    no_token(auth, p.stdout, p.stderr)
    assert p.returncode == 0, p.stderr
    second = p.stdout.strip()
    assert second.startswith("schedtune-digits-quickstart-") and "\n" not in second, p.stdout
    # stdout is the id alone; our messages (and Ray's upload log lines) go to stderr
    assert f"submitted job {second} (digits-quickstart) to {auth.url}" in p.stderr.splitlines(), p.stderr

    p = cli("stop", second, "--address", auth.url, env=env)
    no_token(auth, p.stdout, p.stderr)
    assert p.returncode == 0 and p.stdout.strip() == f"stopping job {second}", p.stdout + p.stderr
    deadline = time.monotonic() + 90
    while (status := {j["id"]: j["status"] for j in list_jobs(auth.url)}[second]) != "STOPPED":
        assert status not in ("SUCCEEDED", "FAILED") and time.monotonic() < deadline, status
        time.sleep(1)
    client = _client(auth.url)
    no_token(auth, client.get_job_logs(second), repr(client.get_job_info(second)))

    p = cli("stop", second, "--address", auth.url, env=env)   # it has ended: says so, exit 0
    no_token(auth, p.stdout, p.stderr)
    assert p.returncode == 0 and p.stdout.strip() == f"job {second} had already ended", p.stdout + p.stderr
    p = cli("stop", "schedtune-x-00000000", "--address", auth.url, env=env)   # no such job: exit 2, one line
    no_token(auth, p.stdout, p.stderr)
    assert p.returncode == 2 and p.stderr.startswith("schedtune stop: error: the Ray job API at "), p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr

    p = cli("jobs", "--address", auth.url, env=env)
    no_token(auth, p.stdout, p.stderr)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["ID", "STATUS", "EXPERIMENT", "USER", "START"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    first = first_job.result.submission_id
    assert rows[second][1:3] == ["STOPPED", "digits-quickstart"]
    assert rows[first][1:3] == ["SUCCEEDED", "digits-quickstart"]
    assert list(rows).index(first) < list(rows).index(second)   # oldest first


@cluster_test
def test_a_token_connection_earlier_in_the_process_does_not_break_a_later_experiment(
        auth, ray_cluster, monkeypatch, tmp_path):
    """Ray caches the auth mode per process. After a token-mode connection (this module's head), an
    experiment on a no-auth cluster from the same process must still run: with the stale token mode
    its driver refused the raylet's calls and every trial actor was cancelled at creation."""
    import ray

    from tuning.driver.cluster import refresh_ray_auth
    from tuning.driver.experiment import run_experiment
    from tuning.spec import load_spec

    refresh_ray_auth()
    ray.init(address=auth.address, logging_level="ERROR")
    try:
        assert ray.cluster_resources()["CPU"] == 2
    finally:
        ray.shutdown()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    spec = load_spec(QUICKSTART, {**SMOKE, "experiment.name": "after-token", "experiment.num_samples": 1,
                                  "train.epochs": 1, "experiment.scheduler": {"name": "fifo"}})
    result = run_experiment(spec, storage=str(tmp_path / "results"), tracking_uri=sqlite_store(tmp_path / "m.db"),
                            address=ray_cluster.address, out=lambda line: None, register_model=False)
    assert [r.status for r in result.rows] == ["completed"], [r.error for r in result.rows]
