"""The registered model: served by a real `mlflow models serve` and loaded with mlflow.pyfunc from an
environment where schedtune cannot be imported, on raw inputs, with the checkpoint's predictions;
its alias `champion`, its description and its weights (what `mlflow:models:/...` pretrained reads)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import end_group, sqlite_store
from tests.fake_experiment import log_experiment
from training.config import TrainConfig
from training.data import load_data
from tuning.tracking.registry import model_from_checkpoint, tracking_uri_scope

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

NAME = "served-test"
MLP = {"epochs": 2, "seed": 0, "data": {"name": "digits"}, "model": {"name": "mlp", "hidden": [32]},
       "optim": {"name": "sgd", "base_lr": 0.1, "momentum": 0.9}, "schedule": {"name": "cosine"},
       "scaling": {"batch_per_worker": 32}}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """A sqlite MLflow with two trials of NAME (the better one first): (uri, parent run id, [trials])."""
    root = tmp_path_factory.mktemp("served")
    uri = sqlite_store(root / "mlflow.db")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        cfgs = [TrainConfig.from_dict(MLP).with_updates({"seed": 0}),
                TrainConfig.from_dict(MLP).with_updates({"seed": 1, "optim.base_lr": 0.002})]   # barely learns
        parent, trials = log_experiment(uri, NAME, cfgs, root / "work")
    trials = sorted(trials, key=lambda t: -t.result.best["val_acc"])
    assert trials[0].result.best["val_acc"] > trials[1].result.best["val_acc"]
    return uri, parent, trials


@pytest.fixture(scope="module")
def published(experiment):
    """The better trial registered: (version, champion)."""
    from tuning.delivery.export import publish_model

    uri, _, trials = experiment
    return publish_model(uri, trials[0].run_id, NAME)


def without_schedtune(root: Path) -> Path:
    """A virtual environment with this interpreter's packages but not schedtune; returns its python.

    ``python -I`` is not enough: schedtune's editable install is a .pth file in site-packages that
    installs an import finder for ``tuning`` and ``training`` at start-up, whatever PYTHONPATH and
    the working directory say. Here site-packages is named by a .pth file of the venv's own, which
    puts the directory on sys.path without running the .pth files inside it. ``mlflow models serve``
    starts ``uvicorn`` from PATH: the venv gets its own launcher."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    site = Path(subprocess.run([str(root / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], check=True, capture_output=True, text=True).stdout.strip())
    (site / "host-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    uvicorn = root / "bin" / "uvicorn"
    uvicorn.write_text(f"#!{root}/bin/python\nimport sys\nfrom uvicorn.main import main\nsys.exit(main())\n")
    uvicorn.chmod(0o755)
    return root / "bin" / "python"


def _env(venv_python: Path, uri: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return {**env, "PATH": f"{venv_python.parent}:{env.get('PATH', '')}", "MLFLOW_TRACKING_URI": uri}


def _raw_and_expected(trial, n: int = 40):
    """(raw validation inputs as float32 numpy, the checkpoint's logits on them)."""
    bundle = load_data(trial.cfg.data)
    x = torch.stack([bundle.val[i][0] for i in range(n)])
    model, _ = model_from_checkpoint(trial.result.best_checkpoint, "val_acc", "max")
    with torch.no_grad():
        logits = model(x)
    return (x * bundle.std + bundle.mean).numpy().astype(np.float32), logits.numpy()


def test_registered_model_serves_raw_inputs_where_schedtune_is_not_installed(experiment, published, tmp_path):
    import mlflow

    from tuning.driver.cluster import free_ports

    uri, parent, trials = experiment
    version, champion = published
    assert (version, champion) == ("1", "1")
    client = mlflow.MlflowClient(uri)
    v = client.get_model_version_by_alias(NAME, "champion")
    assert str(v.version) == "1" and v.run_id == trials[0].run_id
    value = trials[0].result.best["val_acc"]
    for where in (f"Best trial {trials[0].trial_id}", f"'{NAME}'", f"experiment run {parent}",
                  f"trial run {trials[0].run_id}", f"val_acc {value:.4f} (max)", "raw float32 inputs (batch, 1, 8, 8)"):
        assert where in v.description, (where, v.description)
    assert v.tags["schedtune.metric_value"] == repr(value) and v.tags["schedtune.experiment_run_id"] == parent
    # models:/ URIs are resolved against the process's registry URI, whatever tracking_uri= says
    with tracking_uri_scope(uri):
        reqs = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1/requirements.txt", dst_path=str(tmp_path)))
    assert {line.split("==")[0] for line in reqs.read_text().split()} == {"mlflow", "onnx", "onnxruntime"}

    venv = without_schedtune(tmp_path / "venv")
    away = tmp_path / "elsewhere"
    away.mkdir()
    for module in ("tuning", "training"):
        p = subprocess.run([str(venv), "-c", f"import {module}"], cwd=away, env=_env(venv, uri),
                           capture_output=True, text=True)
        assert p.returncode != 0 and f"No module named '{module}'" in p.stderr, p.stderr
    raw, logits = _raw_and_expected(trials[0])
    probabilities = torch.softmax(torch.from_numpy(logits), -1).numpy()
    np.save(tmp_path / "raw.npy", raw)

    # mlflow.pyfunc in that environment
    script = ("import sys, numpy as np, mlflow.pyfunc\n"
              "assert 'tuning' not in sys.modules and 'training' not in sys.modules\n"
              f"m = mlflow.pyfunc.load_model('models:/{NAME}@champion')\n"
              f"out = m.predict(np.load({str(tmp_path / 'raw.npy')!r}))\n"
              "assert not any(k.split('.')[0] in ('tuning', 'training') for k in sys.modules)\n"
              f"np.savez({str(tmp_path / 'out.npz')!r}, **out)\n")
    p = subprocess.run([str(venv), "-c", script], cwd=away, env=_env(venv, uri), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    np.testing.assert_allclose(out["logits"], logits, atol=1e-4)
    np.testing.assert_allclose(out["probabilities"], probabilities, atol=1e-5)

    # `mlflow models serve` from that environment: its own process group, ended by PID
    port = free_ports(1)[0]
    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen([str(venv), "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@champion",
                               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=away, env=_env(venv, uri), stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow models serve did not answer /ping"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", headers={
            "Content-Type": "application/json"}, data=json.dumps({"inputs": raw.tolist()}).encode())
        with urllib.request.urlopen(request, timeout=60) as r:
            predictions = json.loads(r.read())["predictions"]
    finally:
        end_group(server, 30)
        log.close()
    np.testing.assert_allclose(np.array(predictions["logits"]), logits, atol=1e-4)
    np.testing.assert_allclose(np.array(predictions["probabilities"]), probabilities, atol=1e-5)
    assert (np.array(predictions["logits"]).argmax(-1) == logits.argmax(-1)).all()


def test_the_champion_moves_only_to_a_better_version_and_weights_come_back(experiment, published, tmp_path):
    import mlflow

    from tuning.delivery.export import publish_model
    from tuning.tracking.registry import fetch_pretrained

    uri, parent, trials = experiment
    client = mlflow.MlflowClient(uri)
    assert publish_model(uri, trials[1].run_id, NAME) == ("2", "1")     # worse: version 2, champion stays 1
    assert publish_model(uri, trials[1].run_id, NAME) == ("2", "1")     # the same run again: no version 3
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    assert sorted(str(v.version) for v in client.search_model_versions(f"name = '{NAME}'")) == ["1", "2"]
    # the export the registration made is on the trial's run
    assert {a.path for a in client.list_artifacts(trials[1].run_id, "exports/onnx")} == {
        "exports/onnx/model.onnx", "exports/onnx/model.json"}
    # mlflow:models:/NAME@champion as pretrained weights: the checkpoint's, read weights-only
    path = fetch_pretrained(f"models:/{NAME}@champion", uri, str(tmp_path))
    state = torch.load(path, weights_only=True)
    expected = model_from_checkpoint(trials[0].result.best_checkpoint, "val_acc", "max")[0].state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
