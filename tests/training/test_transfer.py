"""Transfer learning: frozen stages stay bit-identical and hold no optimizer state; a model that one
experiment registered in MLflow is fine-tuned on another dataset via ``model.pretrained: mlflow:...``."""
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, sqlite_store
from tests.fake_experiment import log_experiment
from training import checkpoint as ckpt
from training.config import TrainConfig
from training.loop import build_run, fit
from tuning.spec import load_spec
from tuning.driver.trial import resolve_pretrained

# digits are (1, 8, 8) images, synthetic 64-dim vectors: the MLP flattens, so its first layer fits both.
PRETRAIN = {"epochs": 3, "seed": 0, "data": {"name": "digits"}, "model": {"name": "mlp", "hidden": [64, 32]},
            "optim": {"name": "sgd", "base_lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3},
            "schedule": {"name": "cosine"}, "scaling": {"batch_per_worker": 32}}
FINETUNE = {"epochs": 3, "data": {"name": "synthetic", "num_samples": 1500}, "optim.base_lr": 0.05}


def finetune_cfg(pretrained: str, transfer: str, n: int = 2) -> TrainConfig:
    return TrainConfig.from_dict(PRETRAIN).with_updates(
        {**FINETUNE, "model.pretrained": pretrained, "model.transfer": transfer, "model.finetune_last_n": n})


def stage_names(prefix: str, state: dict) -> list[str]:
    return [k for k in state if k.startswith(prefix)]


@pytest.fixture(scope="module")
def pretrained_file(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("pretrain")
    result = fit(TrainConfig.from_dict(PRETRAIN), workdir=work)
    assert result.best["val_acc"] > 0.9
    path = work / "digits_mlp.pt"
    torch.save(ckpt.load(result.best_checkpoint)["model"], path)
    return path


@pytest.mark.parametrize("transfer,n,frozen,trained", [
    ("finetune_last_n", 2, ["blocks.0."], ["blocks.1.", "head."]),
    ("linear_probe", 1, ["blocks.0.", "blocks.1."], ["head."]),
])
def test_frozen_stages_are_bit_identical_after_finetuning(pretrained_file, tmp_path, transfer, n, frozen, trained):
    before = torch.load(pretrained_file)
    cfg = finetune_cfg(str(pretrained_file), transfer, n)
    result = fit(cfg, workdir=tmp_path)
    state = ckpt.load(result.last_checkpoint)
    after = state["model"]
    for prefix in frozen:
        assert all(torch.equal(before[k], after[k]) for k in stage_names(prefix, after)), prefix
    for prefix in trained:
        assert all(not torch.equal(before[k], after[k]) for k in stage_names(prefix, after)), prefix
    # no optimizer state for frozen parameters: only the trainable ones are in the optimizer at all
    n_trainable = sum(len(stage_names(p, after)) for p in trained)
    assert sum(len(g["params"]) for g in state["optimizer"]["param_groups"]) == n_trainable
    assert len(state["optimizer"]["state"]) == n_trainable
    assert result.best["val_acc"] > 0.25            # 10 classes: well above chance from fixed digits features


def test_backbone_gets_a_tenth_of_the_head_lr_when_finetuning(pretrained_file):
    run = build_run(finetune_cfg(str(pretrained_file), "finetune_last_n", 2))
    lrs = {g["name"].split("_")[0]: g["lr"] for g in run.optimizer.param_groups}
    assert lrs["backbone"] == pytest.approx(0.1 * lrs["head"])
    frozen = [p for n, p in run.core.named_parameters() if n.startswith("blocks.0.")]
    assert frozen and not any(p.requires_grad for p in frozen)
    run = build_run(finetune_cfg(str(pretrained_file), "full").with_updates({"model.backbone_lr_mult": None}))
    assert len({g["lr"] for g in run.optimizer.param_groups}) == 1     # full: one LR everywhere


def load_registered(model_uri: str, tracking_uri: str) -> dict:
    """The weights of a registered model (its weights-only ``state_dict.pt``), read against ``tracking_uri``."""
    import tempfile

    from tuning.tracking.registry import registered_state_dict, tracking_uri_scope

    with tracking_uri_scope(tracking_uri), tempfile.TemporaryDirectory() as local:
        return registered_state_dict(model_uri, local)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A sqlite MLflow where experiment digits-base trained an MLP on digits and registered it: (uri, run id)."""
    from tuning.delivery.export import publish_model

    tmp = tmp_path_factory.mktemp("registry")
    uri = sqlite_store(tmp / "mlflow.db")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        cfg = TrainConfig.from_dict(PRETRAIN).with_updates({"regularization.ema_decay": 0.9})
        _, (trial,) = log_experiment(uri, "digits-base", [cfg], tmp / "work")
        assert publish_model(uri, trial.run_id, "digits-base") == ("1", "1")   # version 1, the champion
    return uri, trial.run_id


def test_finetune_a_model_registered_by_an_earlier_experiment(registry, tmp_path, monkeypatch):
    """Train on digits, register the model in MLflow, fine-tune it on synthetic from `mlflow:models:/...`."""
    import mlflow

    uri, run_id = registry
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    weights = mlflow.MlflowClient(uri).get_run(run_id).data.tags["schedtune.model_weights"]
    assert weights in ("raw", "ema")
    registered = load_registered("models:/digits-base/1", uri)

    storage = str(tmp_path / "results")
    ft = finetune_cfg("mlflow:models:/digits-base/1", "finetune_last_n", 2)
    resolved = resolve_pretrained(ft, storage, uri)
    path = resolved.model.pretrained
    assert path.startswith(storage) and Path(path).is_file()
    assert resolve_pretrained(ft, storage, uri).model.pretrained == path      # one download per experiment
    assert resolve_pretrained(ft.with_updates({"model.pretrained": None}), storage, uri).model.pretrained is None
    result = fit(resolved, workdir=tmp_path / "ft")
    after = ckpt.load(result.last_checkpoint)["model"]
    assert all(torch.equal(registered[k], after[k]) for k in stage_names("blocks.0.", after))
    assert not torch.equal(registered["head.weight"], after["head.weight"])
    assert not torch.equal(registered["blocks.1.0.weight"], after["blocks.1.0.weight"])
    assert result.best["val_acc"] > 0.25
    # `latest` resolves too (what search_spaces/transfer.yaml uses); $MLFLOW_TRACKING_URI by default
    latest = resolve_pretrained(ft.with_updates({"model.pretrained": "mlflow:models:/digits-base/latest"}),
                                str(tmp_path / "other"))
    assert torch.equal(torch.load(latest.model.pretrained)["head.weight"], registered["head.weight"])


def test_unknown_registered_model_is_an_error_naming_it(registry, tmp_path):
    from mlflow.exceptions import MlflowException

    ft = finetune_cfg("mlflow:models:/no-such-model/1", "full")
    with pytest.raises(MlflowException, match="no-such-model"):
        resolve_pretrained(ft, str(tmp_path), registry[0])


def test_the_driver_checks_mlflow_models_before_anything_starts(registry, tmp_path):
    from training.config import ConfigError
    from tuning.tracking.registry import check_pretrained

    uri, run_id = registry
    for ok in ("mlflow:models:/digits-base/1", "mlflow:models:/digits-base/latest", f"mlflow:runs:/{run_id}/model",
               "/a/local/file.pt", None):
        check_pretrained(ok, uri)
    for bad, why in [("mlflow:models:/digits-base/7", "digits-base"), ("mlflow:models:/nope/latest", "'nope'"),
                     ("mlflow:models:/nope/1", "nope"), ("mlflow:runs:/0123abcd/model", "0123abcd"),
                     ("mlflow:models:/digits-base", "expected a model"), ("mlflow:s3://b/m.pt", "expected a model")]:
        with pytest.raises(ConfigError, match=r"^train\.model\.pretrained: got '.*', expected a model at") as e:
            check_pretrained(bad, uri)
        assert why in str(e.value), str(e.value)
    missing = f"sqlite:///{tmp_path}/none.db"
    with pytest.raises(ConfigError, match="that database does not exist"):
        check_pretrained("mlflow:models:/digits-base/1", missing)
    assert not (tmp_path / "none.db").exists()


def test_tune_with_an_unknown_mlflow_model_exits_2_before_ray_starts(registry, tmp_path):
    import subprocess
    import sys

    uri, _ = registry
    p = subprocess.run([sys.executable, "-m", "tuning.cli", "tune", str(ROOT / "search_spaces/transfer.yaml"),
                        "--tracking-uri", uri, "--storage", str(tmp_path / "r"),
                        "--set", "train.model.pretrained=mlflow:models:/digits-base/9"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "train.model.pretrained: got 'mlflow:models:/digits-base/9'" in p.stderr
    assert "Ray cluster" not in p.stdout and not (tmp_path / "r").exists()


def test_transfer_search_space_ships_the_three_modes():
    spec = load_spec(ROOT / "search_spaces/transfer.yaml")
    assert spec.base.model.pretrained.startswith("mlflow:models:/")
    assert set(spec.space["model.transfer"].args) == {"linear_probe", "finetune_last_n", "full"}
    mults = {t: spec.trial_config({"model.transfer": t}).model.effective_backbone_lr_mult
             for t in ("finetune_last_n", "full")}
    assert mults == {"finetune_last_n": 0.1, "full": 1.0}


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tune_finetunes_the_model_an_earlier_experiment_registered(experiment, mlflow_server, ray_cluster, tmp_path):
    """`schedtune tune search_spaces/transfer.yaml` end to end on Ray: the trials start from the model the
    session's quickstart experiment registered (`mlflow:models:/it-asha/N`), downloaded once into storage."""
    import mlflow

    from tuning.driver.experiment import run_experiment

    _, earlier, _ = experiment
    assert earlier.model_version
    spec = load_spec(ROOT / "search_spaces/transfer.yaml", {
        "experiment.name": "it-transfer", "experiment.num_samples": 1, "experiment.scheduler": {"name": "fifo"},
        "train.epochs": 2, "train.data.num_samples": 1500,
        "train.model.pretrained": f"mlflow:models:/it-asha/{earlier.model_version}",
        "space.model.transfer": {"grid": ["linear_probe", "full"]}})
    storage = tmp_path / "results"
    result = run_experiment(spec, storage=str(storage), tracking_uri=mlflow_server.uri, address=ray_cluster.address,
                            out=lambda line: None)
    assert sorted(r.status for r in result.rows) == ["completed", "completed"], [r.error for r in result.rows]
    assert len(list(storage.glob("it-transfer/*/train/pretrained/pretrained-*.pt"))) == 1   # one download
    registered = load_registered(f"models:/it-asha/{earlier.model_version}", mlflow_server.uri)
    client = mlflow.MlflowClient(mlflow_server.uri)
    for row in result.rows:
        local = client.download_artifacts(row.run_id, "checkpoints/best", str(tmp_path / row.trial_id))
        after = ckpt.load(local)["model"]
        same = torch.equal(registered["blocks.0.0.weight"], after["blocks.0.0.weight"])
        assert same == (row.params["model.transfer"] == "linear_probe"), row.params
        assert client.get_run(row.run_id).data.params["model.pretrained"].startswith("mlflow:models:/it-asha/")
        assert row.metric > 0.25
