"""The Python API (tuning.load_spec, tuning.run, tuning.submit): a dict is a spec like a file,
``import tuning`` loads nothing heavy, the result's DataFrame and best checkpoint, input errors
before any cluster, and the README's "From Python" snippets run as written on a real local cluster."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

import tuning
from tests.conftest import ROOT
from tuning.analysis.results import ExperimentResult, TrialRow
from tuning.driver.submit import SubmitError
from tuning.spec import SpaceError

QUICKSTART = ROOT / "search_spaces" / "quickstart.yaml"
SMOKE = ["experiment.num_samples=2", "train.epochs=2", "train.scaling.num_workers=1"]


def test_import_tuning_loads_no_ray_mlflow_torch_or_pandas():
    code = ("import sys, tuning; heavy = [m for m in ('ray', 'mlflow', 'torch', 'pandas') if m in sys.modules]; "
            "assert not heavy, heavy; assert callable(tuning.load_spec) and callable(tuning.run) "
            "and callable(tuning.submit)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr


def test_a_dict_is_the_same_spec_as_its_file_and_overrides_come_as_strings_or_a_dict():
    doc = yaml.safe_load(QUICKSTART.read_text())
    from_file = tuning.load_spec(QUICKSTART, SMOKE)
    from_dict = tuning.load_spec(doc, {"experiment.num_samples": 2, "train.epochs": 2,
                                       "train.scaling.num_workers": 1})
    assert from_dict.file == "<dict>" and from_file.file == str(QUICKSTART)
    assert from_dict.options == from_file.options and from_dict.base == from_file.base
    assert from_dict.space == from_file.space and list(from_dict.space) == list(doc["space"])
    assert (from_file.options.num_samples, from_file.base.epochs, from_file.base.scaling.num_workers) == (2, 2, 1)
    assert yaml.safe_load(from_dict.text) == doc   # what MLflow logs as the search-space file
    doc["train"]["epochs"] = 99                     # the spec holds a copy
    assert from_dict.base.epochs == 2


def test_dict_errors_name_the_dict_the_key_and_the_expectation():
    doc = yaml.safe_load(QUICKSTART.read_text())
    doc["train"]["optim"]["base_lr"] = "fast"
    with pytest.raises(SpaceError, match=r"^<dict>: train\.optim\.base_lr: got 'fast', expected a finite number"):
        tuning.load_spec(doc)
    with pytest.raises(SpaceError, match=r"^<dict>: <dict>: got None, expected plain YAML values"):
        tuning.load_spec({"train": {"data": {"root": ROOT}}})   # a Path: nothing a file could hold
    with pytest.raises(ValueError, match="expected KEY=VALUE with KEY under experiment"):
        tuning.load_spec(QUICKSTART, ["epochs=3"])
    with pytest.raises(TypeError, match="a list of KEY=VALUE strings or a dict"):
        tuning.load_spec(QUICKSTART, "train.epochs=3")


def test_submit_checks_the_input_before_it_looks_for_a_cluster(tmp_path, monkeypatch):
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SpaceError, match="experiment.num_samples"):
        tuning.submit(QUICKSTART, overrides=["experiment.num_samples=0"])   # bad input first ...
    with pytest.raises(SubmitError, match=r"no Ray cluster to talk to: pass --address .* or set "
                                          r"RAY_API_SERVER_ADDRESS or RAY_ADDRESS"):
        tuning.submit(QUICKSTART, overrides=SMOKE)                          # ... then no address
    with pytest.raises(SpaceError, match=r"--working-dir: got '.*missing', expected an existing directory"):
        tuning.submit(QUICKSTART, address="http://127.0.0.1:1", working_dir=tmp_path / "missing")
    with pytest.raises(TypeError, match="a loaded ExperimentSpec has its own"):
        tuning.submit(tuning.load_spec(QUICKSTART), address="http://127.0.0.1:1", overrides=SMOKE)


def _checkpoint(directory, epoch: int, val_acc: float) -> None:
    directory.mkdir(parents=True)
    (directory / "meta.json").write_text(json.dumps({"epoch": epoch, "metrics": {"val_acc": val_acc}}))


def test_the_result_has_a_row_per_trial_the_best_config_and_its_best_checkpoint(tmp_path):
    from tuning.api import result_of

    spec = tuning.load_spec(QUICKSTART, SMOKE)
    run_dir = tmp_path / "digits-quickstart" / "20250101-000000"
    # trial a's best epoch is 1 (not its last); trial b ran on 2 Train workers (checkpoints under train/)
    _checkpoint(run_dir / "trial_fn_abc12_00000_0_lr=0.1_2025" / "checkpoint_000000", 1, 0.91)
    _checkpoint(run_dir / "trial_fn_abc12_00000_0_lr=0.1_2025" / "checkpoint_000001", 2, 0.88)
    _checkpoint(run_dir / "train" / "train-abc12_00001" / "epoch_0002", 2, 0.5)
    sched = {"name": "cosine"}
    rows = [TrialRow("abc12_00000", "completed", 2, 0.91, {"optim.base_lr": 0.1, "schedule": sched}, "run-a",
                     diagnosis="healthy"),
            TrialRow("abc12_00001", "stopped by ASHA at epoch 1", 1, 0.5,
                     {"optim.base_lr": 0.002, "schedule": sched}, "run-b"),
            TrialRow("abc12_00002", "failed", 0, None, {"optim.base_lr": 0.3, "schedule": sched}, "run-c",
                     error="PluginError: model.name 'm:f': ValueError: no")]
    result = result_of(spec, ExperimentResult("digits-quickstart", str(run_dir), rows, "sqlite:///x.db",
                                              "1", "parent-run", model_version="3"))
    assert (result.best_trial_id, result.best_metric, result.best_run_id) == ("abc12_00000", 0.91, "run-a")
    assert result.best_params == {"optim.base_lr": 0.1, "schedule": sched}
    assert result.best_config["optim"]["base_lr"] == 0.1 and result.best_config["epochs"] == 2
    assert result.best_checkpoint == str(run_dir / "trial_fn_abc12_00000_0_lr=0.1_2025" / "checkpoint_000000")
    assert (result.parent_run_id, result.model_version, result.ok) == ("parent-run", "3", True)
    df = result.trials
    assert list(df.columns) == ["trial_id", "status", "epochs", "best_val_acc", "diagnosis", "error", "run_id",
                                *spec.space] and {"optim.base_lr", "schedule"} <= set(spec.space)
    assert df["trial_id"].tolist() == ["abc12_00000", "abc12_00001", "abc12_00002"]
    assert df["status"].tolist()[1:] == ["stopped by ASHA at epoch 1", "failed"]
    assert df["epochs"].tolist() == [2, 1, 0] and df["run_id"].tolist() == ["run-a", "run-b", "run-c"]
    assert df["optim.base_lr"].tolist() == [0.1, 0.002, 0.3] and df["error"][2].startswith("PluginError")
    from tuning.api import best_checkpoint

    assert best_checkpoint(str(run_dir), "abc12_00001", spec) == str(run_dir / "train" / "train-abc12_00001" / "epoch_0002")
    none = result_of(spec, ExperimentResult("x", str(run_dir), rows[2:], "sqlite:///x.db"))
    assert (none.best_metric, none.best_config, none.best_checkpoint, none.ok) == (None, None, None, False)


def test_repeats_and_objectives_are_columns_and_the_best_config_has_its_repeats_seed(tmp_path):
    from tuning.api import result_of

    spec = tuning.load_spec(QUICKSTART, [*SMOKE, "experiment.repeats=2", "train.seed=10"])
    sched = {"name": "cosine"}
    rows = [TrialRow("t1", "completed", 2, 0.91, {"optim.base_lr": 0.1, "schedule": sched}, "r1", repeat=1,
                     group=(0.9, 0.0141, 2)),
            TrialRow("t0", "completed", 2, 0.89, {"optim.base_lr": 0.1, "schedule": sched}, "r0", repeat=0,
                     group=(0.9, 0.0141, 2))]
    result = result_of(spec, ExperimentResult("x", str(tmp_path), rows, "sqlite:///x.db"))
    assert result.best_config["seed"] == 11                                   # t1 is repeat 1: train.seed + 1
    df = result.trials
    assert df[["seed", "mean_val_acc", "std_val_acc"]].values.tolist() == [[11, 0.9, 0.0141], [10, 0.9, 0.0141]]
    multi = tuning.load_spec(QUICKSTART, [*SMOKE, "experiment.metrics=[{name: val_acc, mode: max}, "
                                                  "{name: epoch_time_s, mode: min}]"])
    rows = [TrialRow("a", "completed", 2, 0.9, {"optim.base_lr": 0.1, "schedule": sched}, "ra",
                     objectives={"val_acc": 0.9, "epoch_time_s": 2.0}, on_front=True),
            TrialRow("b", "failed", 0, None, {"optim.base_lr": 0.3, "schedule": sched}, "rb")]
    df = result_of(multi, ExperimentResult("x", str(tmp_path), rows, "sqlite:///x.db")).trials
    assert list(df.columns[:6]) == ["trial_id", "status", "epochs", "best_val_acc", "epoch_time_s", "on_front"]
    assert df["epoch_time_s"].tolist()[0] == 2.0 and df["on_front"].tolist() == [True, False]


# ----------------------------------------------------------------------------- the README, run as written


def readme_python_blocks() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### From Python", 1)[1].split("\n### ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_readme_has_the_run_and_the_submit_snippets():
    blocks = readme_python_blocks()
    assert len(blocks) == 2 and "tuning.run(spec)" in blocks[0] and "tuning.submit(" in blocks[1]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_readme_python_snippets_run_as_written(ray_cluster, tmp_path):
    """Both snippets in one fresh interpreter, in a scratch directory holding search_spaces/ as the
    README's paths expect: the run joins the session's cluster through RAY_ADDRESS, the submit
    goes to its job API through RAY_API_SERVER_ADDRESS."""
    import mlflow

    (tmp_path / "search_spaces").symlink_to(ROOT / "search_spaces")
    script = tmp_path / "snippet.py"
    script.write_text("\n".join(readme_python_blocks()))
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address, "RAY_API_SERVER_ADDRESS": ray_cluster.dashboard_url,
           "RAY_AUTH_MODE": "disabled"}
    env.pop("MLFLOW_TRACKING_URI", None)
    p = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=850)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert f"joining the Ray cluster at {ray_cluster.address} (RAY_ADDRESS" in p.stdout
    _, metric, lr, checkpoint = next(line for line in lines if line.startswith("best ")).split()
    assert 0 < float(metric) <= 1 and 1e-3 <= float(lr) <= 1.0
    assert checkpoint.startswith(str(tmp_path / "schedtune_results" / "digits-quickstart"))
    assert os.path.isfile(os.path.join(checkpoint, "meta.json"))
    table = [line.split() for line in lines if re.match(r"\s*\d+\s+\w+_0000[01]\s", line)]   # index, trial_id, status ...
    assert len(table) == 2 and all(row[2] in ("completed", "stopped") for row in table), p.stdout
    # the run's trials are in ./mlflow.db, as the CLI would have put them
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("digits-quickstart")
    runs = client.search_runs([exp.experiment_id], "tags.`schedtune.trial_id` != ''")
    assert sorted(r.info.run_id for r in runs) == sorted(row[-1] for row in table)
    # the submitted job: its id and status, then SUCCEEDED and the last line of its log
    sid = next(line.split()[0] for line in lines if line.startswith("schedtune-digits-quickstart-"))
    assert any(line.startswith("SUCCEEDED ") for line in lines), p.stdout
    from tuning.driver.submit import list_jobs

    assert {j["id"]: j["status"] for j in list_jobs(ray_cluster.dashboard_url)}[sid] == "SUCCEEDED"
