"""`schedtune export`: TorchScript and ONNX files that take raw inputs and match the PyTorch model,
int8 dynamic quantization (ONNX) with its accuracy change, the sidecar, the check that fails loudly,
int8 TorchScript refused with what to use instead, and the files logged to the trial's run."""
import json

import pytest
import torch

from tests.fake_experiment import log_experiment
from tests.conftest import sqlite_store
from training.config import TrainConfig
from training.data import load_data
from training.loop import fit
from tuning.delivery.export import ExportCheckError, export_model, load_exported
from tuning.tracking.registry import model_from_checkpoint

MLP = {"epochs": 2, "seed": 0, "data": {"name": "digits"}, "model": {"name": "mlp", "hidden": [64]},
       "optim": {"name": "sgd", "base_lr": 0.1, "momentum": 0.9}, "schedule": {"name": "cosine"},
       "scaling": {"batch_per_worker": 32}}
CNN = {**MLP, "model": {"name": "small_cnn", "channels": [8, 16], "dropout": 0.1}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{name: (model, bundle)} for an MLP and a small CNN (BatchNorm, conv) trained on digits."""
    out = {}
    for name, doc in (("mlp", MLP), ("small_cnn", CNN)):
        cfg = TrainConfig.from_dict(doc)
        result = fit(cfg, workdir=tmp_path_factory.mktemp(name))
        out[name] = (model_from_checkpoint(result.best_checkpoint)[0], load_data(cfg.data))
    return out


def raw_val(bundle, n=None):
    xs, ys = zip(*(bundle.val[i] for i in range(n or len(bundle.val))))
    x = torch.stack(xs)
    return x * bundle.std + bundle.mean, x, torch.stack(ys)


def test_bundle_mean_std_undo_the_standardization():
    from sklearn.datasets import load_digits

    bundle = load_data(TrainConfig.from_dict(MLP).data)
    raw, _, _ = raw_val(bundle, 50)
    pixels = torch.as_tensor(load_digits().images, dtype=torch.float32)
    assert bundle.mean.shape == bundle.std.shape == (1, 1, 1)
    # raw inputs are digits' 0..16 pixel intensities again
    assert torch.allclose(raw, raw.round(), atol=1e-4) and raw.min() >= -1e-4 and raw.max() <= 16 + 1e-4
    assert any(torch.equal(raw[0, 0].round(), img) for img in pixels)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize("arch", ["mlp", "small_cnn"])
def test_fp32_export_matches_pytorch_on_raw_inputs(trained, tmp_path, fmt, arch):
    model, bundle = trained[arch]
    report = export_model(model, bundle, tmp_path, fmt, check_samples=200)
    check = report.check
    assert check["passed"] and check["samples"] == 200
    assert check["max_abs_diff_logits"] < 1e-4 and check["max_abs_diff_probs"] < 1e-4
    # the file on its own: raw inputs (any batch size) in, the PyTorch model's logits out
    raw, x, y = raw_val(bundle, 37)
    with torch.no_grad():
        expected = model(x)
    got = load_exported(report.path, fmt)(raw)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    side = json.loads(open(report.sidecar).read())
    assert side["format"] == fmt and side["file"] == f"model{'.pt' if fmt == 'torchscript' else '.onnx'}"
    assert side["class_names"] == [str(i) for i in range(10)] and side["input"]["shape"] == ["batch", 1, 8, 8]
    assert side["normalization"]["mean"] == pytest.approx(bundle.mean.flatten().tolist())
    assert side["input"]["raw"] is True and side["output"]["name"] == "logits"


def test_int8_reports_the_accuracy_change(trained, tmp_path):
    model, bundle = trained["mlp"]
    report = export_model(model, bundle, tmp_path, "onnx", quantize="int8")
    c = report.check
    assert report.path.endswith("model.int8.onnx")
    assert c["samples"] == len(bundle.val) and "passed" not in c          # no tolerance check for int8
    assert c["accuracy_change"] == pytest.approx(c["val_acc_exported"] - c["val_acc_pytorch"])
    assert abs(c["accuracy_change"]) < 0.03 and c["prediction_agreement"] > 0.95
    assert c["max_abs_diff_logits"] > 0                                 # it really is quantized
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([report.path.split("/")[-1], "model.int8.json"])


def test_int8_torchscript_is_refused_naming_the_onnx_form(trained, tmp_path, capsys):
    """torch.ao.quantization is deprecated, and torchao's int8 tensors cannot be traced to TorchScript."""
    from training.config import ConfigError
    from tuning.cli import main

    model, bundle = trained["mlp"]
    with pytest.raises(ConfigError, match=r"--quantize: got 'int8', expected --format onnx .*--quantize int8"):
        export_model(model, bundle, tmp_path, "torchscript", quantize="int8")
    assert list(tmp_path.iterdir()) == []
    # the command says so before it reads anything (there is no store here at all)
    assert main(["export", "anything", "--quantize", "int8", "--tracking-uri", f"sqlite:///{tmp_path}/none.db"]) == 2
    assert "--format onnx --quantize int8" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_a_mismatching_export_fails_the_check(trained, tmp_path, monkeypatch):
    import tuning.delivery.export as export

    model, bundle = trained["mlp"]
    original = export.load_exported

    def off_by_a_little(path, fmt):
        run = original(path, fmt)
        return lambda x: run(x) + 1e-3
    monkeypatch.setattr(export, "load_exported", off_by_a_little)
    with pytest.raises(ExportCheckError, match=r"max \|logit diff\| 0.001, .* > tolerance 0.0001"):
        export_model(model, bundle, tmp_path, "torchscript")


# ---------------------------------------------------------------------------- the command, from MLflow

@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-mlflow")
    uri = sqlite_store(root / "mlflow.db")
    cfgs = [TrainConfig.from_dict(MLP).with_updates({"seed": s, "regularization.ema_decay": 0.9}) for s in (0, 1)]
    parent, trials = log_experiment(uri, "export-test", cfgs, root / "work")
    return uri, trials


def test_export_command_by_experiment_name_and_run_id(logged, tmp_path, capsys, monkeypatch):
    from tuning.cli import main

    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    uri, trials = logged
    client = mlflow.MlflowClient(uri)
    best = max(trials, key=lambda t: t.result.best["val_acc"])
    assert main(["export", "export-test", "--format", "onnx", "--tracking-uri", uri, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "the best trial of experiment 'export-test'" in out and ": OK" in out
    assert f"logged them to run {best.run_id} under exports/onnx" in out
    side = json.loads((tmp_path / "a" / "model.json").read_text())
    source = side["source"]
    assert source["run_id"] == best.run_id and source["model_weights"] in ("raw", "ema")
    assert (source["experiment"], source["trial_id"], source["metric"], source["mode"]) == (
        "export-test", best.trial_id, "val_acc", "max")
    assert source["metric_value"] == pytest.approx(source["metrics"][("ema_" if source["model_weights"] == "ema"
                                                                      else "") + "val_acc"])
    other = next(t for t in trials if t is not best)
    assert main(["export", other.run_id, "--tracking-uri", uri, "--out", str(tmp_path / "b"),
                 "--format", "onnx", "--quantize", "int8"]) == 0
    assert "int8 check on 360 validation inputs: accuracy" in capsys.readouterr().out
    assert json.loads((tmp_path / "b" / "model.int8.json").read_text())["source"]["run_id"] == other.run_id
    # the files are on the runs they came from, byte for byte
    for trial, names in ((best, ["model.json", "model.onnx"]), (other, ["model.int8.json", "model.int8.onnx"])):
        assert sorted(a.path for a in client.list_artifacts(trial.run_id, "exports/onnx")) == [
            f"exports/onnx/{n}" for n in names]
    logged_copy = client.download_artifacts(other.run_id, "exports/onnx/model.int8.onnx", str(tmp_path))
    assert open(logged_copy, "rb").read() == (tmp_path / "b" / "model.int8.onnx").read_bytes()
    assert main(["export", best.run_id, "--tracking-uri", uri, "--out", str(tmp_path / "c")]) == 0   # torchscript
    assert {a.path for a in client.list_artifacts(best.run_id, "exports/torchscript")} == {
        "exports/torchscript/model.pt", "exports/torchscript/model.json"}
    assert main(["export", "neither-a-name-nor-a-run", "--tracking-uri", uri]) == 2
    assert "neither a schedtune experiment nor a run id" in capsys.readouterr().err


def test_export_command_exits_1_when_the_check_fails(logged, tmp_path, capsys, monkeypatch):
    from tuning.cli import main

    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    assert main(["export", "export-test", "--tracking-uri", logged[0], "--out", str(tmp_path),
                 "--tolerance", "1e-12"]) == 1
    assert "check failed" in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.slow
def test_export_the_best_model_of_a_real_tune_experiment(experiment, mlflow_server, tmp_path, monkeypatch):
    from tuning.cli import main

    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    _, result, _ = experiment
    assert main(["export", "it-asha", "--format", "onnx", "--tracking-uri", mlflow_server.uri,
                 "--out", str(tmp_path)]) == 0
    side = json.loads((tmp_path / "model.json").read_text())
    assert side["source"]["run_id"] == result.best.run_id and side["check"]["passed"]

