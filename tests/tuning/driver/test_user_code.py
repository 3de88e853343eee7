"""Your own model and data, from a directory outside the repository (the package's ``user_project``:
``usermodels:make`` and ``userdata:blobs`` named in its search-space file).

- validate imports them from the file's directory whatever the working directory, and names a bad one;
- a folder named like schedtune's packages is refused (validate, submit), naming it;
- ``schedtune tune --smoke`` on a private cluster trains them (MLflow shows the plug-ins' own values:
  ``model.args.width``, the dataset's 2 named classes and 8 features), a factory that raises fails its
  trial alone with its own message, the model is registered, and ``schedtune export`` exports it from
  yet another directory;
- ``schedtune submit`` from another directory ships them to a real token-auth head with no
  ``--address`` (``RAY_API_SERVER_ADDRESS``): the job succeeds and its trial used them; ``jobs --json``
  (``RAY_ADDRESS`` only) lists it and ``logs ID`` prints its log.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, sqlite_store
from tuning import cli
from tuning.driver.user_code import driver_environ, trial_runtime_env
from tuning.spec.code import collisions

AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS",
             "MLFLOW_TRACKING_URI", "PYTHONPATH")
integration = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]


def schedtune(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 500):
    base = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
    return subprocess.run([sys.executable, "-m", "tuning.cli", *args], cwd=cwd, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def mlflow_runs(uri: str, name: str):
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    return client, client.search_runs([exp.experiment_id], "tags.`schedtune.trial_id` != ''")


def best_meta(client, run_id: str, tmp: Path) -> dict:
    return json.loads(Path(client.download_artifacts(run_id, "checkpoints/best/meta.json", str(tmp))).read_text())


# ----------------------------------------------------------------------------- before anything starts


def test_validate_imports_the_plugins_from_the_files_directory_and_names_a_bad_one(user_project, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    typo = user_project.dir / "typo.yaml"
    typo.write_text(user_project.space.read_text().replace("usermodels:make", "usermodels:mak"))
    p = schedtune("validate", str(user_project.space), "--working-dir", str(other), cwd=other)
    assert p.returncode == 2 and "train.model.name: got 'usermodels:make', expected an importable module: " \
           "there is no module 'usermodels'" in p.stderr, p.stderr
    p = schedtune("validate", str(user_project.space), cwd=other)   # the file's directory: found
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[-1] == f"plug-ins import from {user_project.dir}"
    p = schedtune("validate", str(typo), cwd=other)
    assert p.returncode == 2 and "train.model.name: got 'usermodels:mak'" in p.stderr
    assert "did you mean 'usermodels:make'" in p.stderr, p.stderr
    p = schedtune("validate", str(user_project.space), "--set", "train.model.args={depth: 3}", cwd=other)
    assert p.returncode == 2 and "train.model.args.depth: got 3, expected a keyword argument of usermodels:make" \
           in p.stderr, p.stderr
    # FILE "-": read from stdin, the plug-ins imported from the current directory
    p = subprocess.run([sys.executable, "-m", "tuning.cli", "validate", "-"], input=user_project.space.read_text(),
                       cwd=user_project.dir, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.startswith("<stdin>: OK"), p.stderr


@pytest.mark.parametrize("entry", ["training/__init__.py", "tuning/helpers.py", "training.py", "tuning.py"])
def test_a_folder_named_like_schedtunes_packages_is_refused_naming_it(tmp_path, capsys, entry):
    (tmp_path / entry).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / entry).write_text("")
    (tmp_path / "mymodels.py").write_text("def make(num_classes):\n    raise AssertionError('never imported')\n")
    (tmp_path / "space.yaml").write_text("train: {model: {name: 'mymodels:make'}}\n")
    collider = tmp_path / entry.split("/")[0]   # the folder, or the module file
    for argv in (["validate", str(tmp_path / "space.yaml")],
                 ["submit", str(tmp_path / "space.yaml"), "--address", "http://127.0.0.1:9"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"schedtune {argv[0]}: error: {tmp_path / 'space.yaml'}: ") and err.count("\n") == 1
        assert f"got '{collider}', expected no {collider.name}{'/' if '/' in entry else ''} in {tmp_path}" in err, err
        assert "schedtune installs the top-level packages training and tuning" in err and "rename yours" in err
    assert "mymodels" not in sys.modules


def test_data_folders_and_schedtunes_own_checkout_do_not_collide(tmp_path):
    (tmp_path / "training" / "images").mkdir(parents=True)      # data: no Python files
    (tmp_path / "training" / "images" / "a.png").write_bytes(b"\x89PNG")
    assert collisions(tmp_path) == [] and collisions(ROOT) == []   # an editable checkout holds the real ones
    (tmp_path / "training" / "augment.py").write_text("")
    assert collisions(tmp_path) == [tmp_path / "training"]


def test_submit_refuses_py_modules_named_like_schedtunes_packages_before_the_cluster(tmp_path, capsys):
    (tmp_path / "tuning").mkdir()
    (tmp_path / "tuning" / "__init__.py").write_text("")
    argv = ["submit", str(ROOT / "search_spaces/quickstart.yaml"), "--py-modules", str(tmp_path / "tuning"),
            "--address", "http://127.0.0.1:9"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"--py-modules: got '{tmp_path / 'tuning'}', expected a package not named training or tuning" in err, err


def test_the_code_dir_goes_on_the_workers_path_except_inside_a_job(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.setenv("PYTHONPATH", "/opt/x")
    assert trial_runtime_env("/u/proj") == {"env_vars": {"PYTHONPATH": "/u/proj:${PYTHONPATH}"}}
    assert driver_environ("/u/proj") == {"PYTHONPATH": "/u/proj:/opt/x"}
    assert trial_runtime_env(None) is None and driver_environ(None) == {}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")   # a job's entrypoint: its runtime env has the code
    assert trial_runtime_env("/u/proj") is None and driver_environ("/u/proj") == {}


# ----------------------------------------------------------------------------- real experiments


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tune_smoke_trains_the_users_model_and_data_a_failing_one_fails_alone_and_export_exports_it(
        user_project, tmp_path):
    import torch

    uri = sqlite_store(tmp_path / "mlflow.db")
    p = schedtune("tune", str(user_project.space), "--smoke", "--num-samples", "1", "--storage",
                  str(tmp_path / "results"), "--tracking-uri", uri, cwd=user_project.elsewhere, timeout=800)
    out = p.stdout
    assert p.returncode == 0, out[-3000:] + p.stderr[-3000:]
    assert out.startswith("started a local Ray cluster")
    message = "PluginError: model.name 'usermodels:make': ValueError: width 13 is unlucky"
    assert f"failed: {message}" in out and f" failed: {message}" in out.split("\n\n", 1)[1], out  # progress + summary
    assert "registered model: user-plugins version 1" in out, out   # the registration subprocess found the code
    assert "Configuration for experiment" not in out + p.stderr and "tensorboard" not in (out + p.stderr).lower()
    assert "Trial task failed" not in p.stderr

    client, runs = mlflow_runs(uri, "user-plugins")
    by_width = {r.data.params["model.args.width"]: r for r in runs}
    assert set(by_width) == {"6", "13"} and {r.data.params["model.name"] for r in runs} == {"usermodels:make"}
    ok, bad = by_width["6"], by_width["13"]
    assert ok.data.tags["schedtune.status"] == "completed" and ok.info.status == "FINISHED"
    assert bad.data.tags["schedtune.status"] == "failed" and bad.info.status == "FAILED"
    assert bad.data.tags["schedtune.error"] == message   # the plug-in's own error, in its run too
    meta = best_meta(client, ok.info.run_id, tmp_path)
    assert meta["num_classes"] == 2 and meta["input_shape"] == [8]   # the user's dataset, not a registry one
    assert meta["config"]["model"]["args"] == {"width": 6}

    export_dir = tmp_path / "export"
    p = schedtune("export", "user-plugins", "--tracking-uri", uri, "--out", str(export_dir), cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    sidecar = json.loads((export_dir / "model.json").read_text())
    assert sidecar["class_names"] == ["neg", "pos"] and sidecar["input"]["shape"] == ["batch", 8]
    weights = [t for t in torch.jit.load(str(export_dir / "model.pt")).state_dict().values() if t.dim() == 2]
    assert [tuple(t.shape) for t in weights] == [(6, 8), (2, 6)]   # the factory's own layers, width 6


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_submit_ships_the_users_code_from_elsewhere_then_jobs_and_logs_need_no_address(head, user_project, tmp_path):
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": head.token}
    uri = sqlite_store(tmp_path / "mlflow.db")
    p = schedtune("submit", str(user_project.space), "--set", "space.model.args.width={grid: [6]}",
                  "--storage", str(tmp_path / "results"), "--tracking-uri", uri,
                  cwd=user_project.elsewhere, env={**token, "RAY_API_SERVER_ADDRESS": head.url}, timeout=800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert head.token not in p.stdout + p.stderr
    sid = next(line.split()[2] for line in p.stdout.splitlines() if line.startswith("submitted job "))
    assert f"job {sid}: SUCCEEDED" in p.stdout
    client, runs = mlflow_runs(uri, "user-plugins")
    assert len(runs) == 1 and runs[0].data.params["model.name"] == "usermodels:make"
    assert runs[0].data.tags["schedtune.status"] == "completed"
    meta = best_meta(client, runs[0].info.run_id, tmp_path)
    assert (meta["num_classes"], meta["input_shape"], meta["config"]["model"]["args"]) == (2, [8], {"width": 6})

    p = schedtune("jobs", "--json", cwd=tmp_path, env={**token, "RAY_ADDRESS": head.address}, timeout=120)
    assert p.returncode == 0, p.stderr
    listed = {j["id"]: j for j in json.loads(p.stdout)}
    assert listed[sid]["status"] == "SUCCEEDED" and listed[sid]["experiment"] == "user-plugins"
    assert isinstance(listed[sid]["start_time"], float) and listed[sid]["start_time"] > 0
    p = schedtune("logs", sid, cwd=tmp_path, env={**token, "RAY_API_SERVER_ADDRESS": head.url}, timeout=120)
    assert p.returncode == 0 and "user-plugins: 1 trials" in p.stdout, p.stdout + p.stderr
    p = schedtune("logs", sid, "--follow", cwd=tmp_path, env={**token, "RAY_ADDRESS": head.address}, timeout=120)
    assert p.returncode == 0 and p.stdout.rstrip().endswith(f"job {sid}: SUCCEEDED"), p.stdout + p.stderr
    p = schedtune("logs", "schedtune-x-00000000", cwd=tmp_path, env={**token, "RAY_API_SERVER_ADDRESS": head.url})
    assert p.returncode == 2 and p.stderr.startswith("schedtune logs: error: "), p.stderr
    assert schedtune("jobs", cwd=tmp_path, env=token, timeout=60).stderr.startswith(
        "schedtune jobs: error: no Ray cluster to talk to")
