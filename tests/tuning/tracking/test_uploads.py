"""Checkpoint uploads through a deliberately slow artifact endpoint: a real `mlflow server
--serve-artifacts` behind a local proxy that answers the PUTs of checkpoint files late (and refuses
the first try of each), in front of the tracker as Tune drives it. Slower than MLflow's 5 s tracking
timeout but within the upload timeout: in, after a retry. Slower than the upload timeout: counted
in schedtune.lost_artifacts on the trial run and the parent run, and on the terminal."""
from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import ROOT, MlflowServer
from tuning.spec import load_spec
from tuning.tracking.uploads import UploadPolicy

QUICK = ROOT / "search_spaces/quickstart.yaml"
SLOW_FILE = "checkpoint.pt"
CHECKPOINT_BYTES = 3_000_000


class SlowArtifactProxy(ThreadingHTTPServer):
    """Forwards every request to ``upstream``; a PUT of an artifact named SLOW_FILE is refused with 503
    on its first try (``fail_first``), then held ``delay_s`` and forwarded, or dropped (``drop``)."""
    daemon_threads = True

    def __init__(self, upstream_port: int, delay_s: float, fail_first: bool, drop: bool):
        super().__init__(("127.0.0.1", 0), _Forward)
        self.upstream_port, self.delay_s, self.fail_first, self.drop = upstream_port, delay_s, fail_first, drop
        self.tries: dict[str, int] = {}
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _forward(self):
        srv: SlowArtifactProxy = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.command == "PUT" and "/mlflow-artifacts/artifacts/" in self.path and self.path.endswith(SLOW_FILE):
            with srv.lock:
                srv.tries[self.path] = n = srv.tries.get(self.path, 0) + 1
            if srv.fail_first and n == 1:
                return self._reply(503, b'{"error_code": "TEMPORARILY_UNAVAILABLE"}', [])
            time.sleep(srv.delay_s)
            if srv.drop:
                self.close_connection = True   # never reaches the store, never answered
                return
        upstream = http.client.HTTPConnection("127.0.0.1", srv.upstream_port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        upstream.request(self.command, self.path, body=body or None, headers=headers)
        response = upstream.getresponse()
        self._reply(response.status, response.read(), response.getheaders())
        upstream.close()

    def _reply(self, status: int, data: bytes, headers):
        try:
            self.send_response(status)
            for k, v in headers:
                if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:   # the client gave up waiting
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tuning.driver.cluster import free_ports

    import mlflow

    s = MlflowServer(tmp_path_factory.mktemp("slow-artifacts"), free_ports(1)[0]).wait()
    mlflow.MlflowClient(s.uri).search_experiments()   # its first answers are slow: before the 5 s timeout applies
    yield s
    s.stop()


def _trial_dir(root: Path) -> Path:
    """Two checkpoints as training.checkpoint writes them (best at epoch 1, last at epoch 2)."""
    import json

    for epoch, acc in ((1, 0.9), (2, 0.8)):
        d = root / f"checkpoint_{epoch:06d}"
        d.mkdir(parents=True)
        (d / SLOW_FILE).write_bytes(bytes([epoch]) * CHECKPOINT_BYTES)
        (d / "meta.json").write_text(json.dumps({"epoch": epoch, "metrics": {"val_acc": acc}, "num_classes": 10}))
        (d / "trace.json").write_text(json.dumps({"loss": [2.3, 2.0, 1.5, 1.2]}))
    return root


def _run_trial(proxy_uri: str, tmp_path: Path, name: str):
    """The tracker as Tune drives it for one 2-epoch trial, then the driver's end; (tracker, trial)."""
    from tuning.tracking.callback import MLflowTracker

    spec = load_spec(QUICK, {"experiment.name": name, "train.epochs": 2})
    tracker = MLflowTracker(spec, proxy_uri, str(tmp_path / "run"), str(tmp_path / "run" / "train"))
    trial = SimpleNamespace(trial_id="t_00000", path=str(_trial_dir(tmp_path / "trial")), status="RUNNING",
                            config={"optim.base_lr": 0.1, "optim.weight_decay": 1e-4, "model.dropout": 0.1,
                                    "schedule": {"name": "cosine"}}, error_file=None, last_result={})
    tracker.setup()
    tracker.on_trial_start(0, [], trial)
    for epoch, acc in ((1, 0.9), (2, 0.8)):
        trial.last_result = {"epoch": epoch, "training_iteration": epoch, "val_acc": acc, "val_loss": 1.0 / epoch,
                             "train_loss": 1.2 / epoch, "lr": 0.1, "trial_id": trial.trial_id}
        tracker.on_trial_result(0, [], trial, dict(trial.last_result))
    trial.status = "TERMINATED"
    tracker.on_trial_complete(0, [], trial)   # queued: the sender thread uploads (test_callback.py)
    tracker.on_experiment_end([trial])
    tracker.finish("| table |", {"trial_id": trial.trial_id, "run_id": tracker.run_id(trial.trial_id),
                                 "metric": 0.9}, None)
    return tracker, trial


@pytest.fixture
def tracking_env(monkeypatch):
    """What the tracker sets for its tracking calls, scoped to the test (it sets them process-wide)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return monkeypatch


def _run_through(server, tmp_path, name: str, **slow):
    """One trial whose uploads go through a SlowArtifactProxy(**slow) in front of ``server``:
    (client, tracker, the trial's run, proxy)."""
    import mlflow

    proxy = SlowArtifactProxy(server.port, **slow)
    proxy.thread.start()
    try:
        tracker, trial = _run_trial(proxy.uri, tmp_path, name)
    finally:
        proxy.shutdown()
    client = mlflow.MlflowClient(server.uri)
    return client, tracker, client.get_run(tracker.run_id(trial.trial_id)), proxy


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_uploads_slower_than_the_tracking_timeout_get_in_after_a_retry(server, tmp_path, tracking_env, capsys):
    tracking_env.setenv("SCHEDTUNE_ARTIFACT_TIMEOUT_S", "12")
    client, tracker, run, proxy = _run_through(server, tmp_path, "slow-but-in", delay_s=6.5, fail_first=True,
                                               drop=False)   # 6.5 s > 5 s < 12 s
    assert sorted(proxy.tries.values()) == [2, 2]               # best and last: refused once, then in
    for label, epoch in (("best", 1), ("last", 2)):
        assert {a.path for a in client.list_artifacts(run.info.run_id, f"checkpoints/{label}")} == {
            f"checkpoints/{label}/{f}" for f in (SLOW_FILE, "meta.json", "trace.json")}
        local = client.download_artifacts(run.info.run_id, f"checkpoints/{label}/{SLOW_FILE}", str(tmp_path / label))
        assert Path(local).read_bytes() == bytes([epoch]) * CHECKPOINT_BYTES
        assert run.data.tags[f"schedtune.checkpoint_{label}_epoch"] == str(epoch)
    assert run.data.tags["schedtune.status"] == "completed" and "schedtune.lost_artifacts" not in run.data.tags
    assert "schedtune.lost_artifacts" not in client.get_run(tracker.parent_run_id).data.tags
    assert tracker.lost_artifact_count() == 0 and "could not be uploaded" not in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_uploads_slower_than_the_upload_timeout_are_counted_lost(server, tmp_path, tracking_env, capsys):
    from tuning.analysis.report import summary
    from tuning.analysis.results import ExperimentResult, TrialRow

    tracking_env.setenv("SCHEDTUNE_ARTIFACT_TIMEOUT_S", "2")
    tracking_env.setenv("SCHEDTUNE_ARTIFACT_RETRIES", "1")
    client, tracker, run, proxy = _run_through(server, tmp_path, "too-slow", delay_s=4, fail_first=False, drop=True)
    assert sorted(proxy.tries.values()) == [2, 2]               # 1 + 1 retry each, then given up
    # checkpoint.pt failed first in each checkpoint; its meta.json and trace.json were not tried
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == []
    assert run.data.tags["schedtune.lost_artifacts"] == "6"
    assert not any(k.startswith("schedtune.checkpoint_") for k in run.data.tags)
    assert run.data.tags["schedtune.status"] == "completed"      # the run still ends, with its plots
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    parent = client.get_run(tracker.parent_run_id)
    assert parent.data.tags["schedtune.lost_artifacts"] == "6" and parent.info.status == "FINISHED"
    err = capsys.readouterr().err
    assert err.count("could not be uploaded after 2 attempts of up to 2 s") == 2, err
    result = ExperimentResult("too-slow", str(tmp_path / "run"), [TrialRow(run.data.tags["schedtune.trial_id"], "completed", 2, 0.9, {},
                              run.info.run_id)], proxy.uri, lost_artifacts=tracker.lost_artifact_count())
    assert ("warning: 6 files (checkpoints, plots) could not be uploaded to MLflow after every retry"
            in summary(result, load_spec(QUICK)))


def test_upload_policy_from_the_environment_names_a_bad_value():
    assert UploadPolicy.from_env({}) == UploadPolicy(300.0, 3, 2.0)
    none = {"SCHEDTUNE_ARTIFACT_TIMEOUT_S": "30", "SCHEDTUNE_ARTIFACT_RETRIES": "0"}
    assert UploadPolicy.from_env(none).waits() == []
    assert UploadPolicy(10, 3, 2.0).waits() == [2.0, 4.0, 8.0]
    with pytest.raises(ValueError, match="SCHEDTUNE_ARTIFACT_TIMEOUT_S: got 'soon', expected a number"):
        UploadPolicy.from_env({"SCHEDTUNE_ARTIFACT_TIMEOUT_S": "soon"})
    with pytest.raises(ValueError, match="SCHEDTUNE_ARTIFACT_TIMEOUT_S: got 0.0, expected seconds > 0"):
        UploadPolicy.from_env({"SCHEDTUNE_ARTIFACT_TIMEOUT_S": "0"})
    with pytest.raises(ValueError, match="SCHEDTUNE_ARTIFACT_RETRIES: got 11, expected an integer from 0 to 10"):
        UploadPolicy.from_env({"SCHEDTUNE_ARTIFACT_RETRIES": "11"})
