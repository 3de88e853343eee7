"""A trial's model, materialized: rebuilt from its best checkpoint, registered as an MLflow model
version, and fetched back as pretrained weights for another experiment.

The trial's model is the better of its raw and its EMA (Polyak-averaged) weights, judged by the
metric the checkpoint recorded for each (``val_acc`` vs ``ema_val_acc``); ``meta["model_weights"]``
and the run tag ``schedtune.model_weights`` say which (``raw`` | ``ema``).

Run as ``python -m tuning.tracking.registry --tracking-uri URI --run-id RUN --name NAME`` by the Tune
driver (a subprocess, so the driver never loads torch); prints the new version number.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

from tuning.analysis.ranking import better
from tuning.tracking import schema

MLFLOW_PREFIX = "mlflow:"          # model.pretrained: mlflow:<model-uri> (models:/NAME/VERSION, runs:/ID/model)
_AVERAGED_PREFIX = "module."        # torch.optim.swa_utils.AveragedModel's state_dict keys


def ema_state_dict(ema_state: Mapping[str, Any]) -> dict[str, Any]:
    """An AveragedModel state_dict as the averaged model's own (``module.`` stripped, ``n_averaged`` dropped)."""
    return {k[len(_AVERAGED_PREFIX):]: v for k, v in ema_state.items() if k.startswith(_AVERAGED_PREFIX)}


def choose_weights(metrics: Mapping[str, float], has_ema: bool, metric: str = "val_acc",
                   mode: str = "max") -> str:
    """``"ema"`` when the EMA weights' ``metric`` beats the raw weights' (ties keep ``"raw"``)."""
    raw_key = metric[len("ema_"):] if metric.startswith("ema_") else metric
    raw, ema = metrics.get(raw_key), metrics.get(f"ema_{raw_key}")
    if not has_ema or ema is None:
        return "raw"
    if raw is None:
        return "ema"
    return "ema" if better(ema, raw, mode) else "raw"


def model_from_checkpoint(directory: str | Path, metric: Optional[str] = None, mode: Optional[str] = None):
    """Rebuild the model a checkpoint directory was trained with and load the trial's weights:
    the EMA ones where they scored better on ``metric`` (default: the checkpoint's own metric).
    Returns (model in eval mode, meta with ``model_weights``: ``"raw"`` | ``"ema"``)."""
    from training import checkpoint as ckpt
    from training.config import TrainConfig
    from training.models import build_model

    meta = ckpt.read_meta(directory)
    cfg = TrainConfig.from_dict(meta["config"])
    cfg = cfg.with_updates({"model.pretrained": None})
    model = build_model(cfg.model, meta["num_classes"], tuple(meta["input_shape"]),
                        stochastic_depth=cfg.regularization.stochastic_depth)
    state = ckpt.load(directory)
    weights = choose_weights(meta.get("metrics", {}), state.get("ema") is not None,
                             metric or cfg.checkpoint.metric, mode or cfg.checkpoint.mode)
    if weights == "ema":
        state = {**state, "model": ema_state_dict(state["ema"])}
    ckpt.load_model_state(model, directory, state)
    return model.eval(), {**meta, "model_weights": weights}


def experiment_metric(client, run) -> tuple[Optional[str], Optional[str]]:
    """(metric, mode) of the experiment a trial run belongs to (its parent run's params), or (None, None)."""
    parent_id = run.data.tags.get(schema.PARENT_RUN_ID)
    if not parent_id:
        return None, None
    params = client.get_run(parent_id).data.params
    return params.get(schema.PARAM_METRIC), params.get(schema.PARAM_MODE)


def trial_model(client, run_id: str, directory: str | Path):
    """(model, meta) of trial run ``run_id``: its ``checkpoints/best`` downloaded into ``directory``,
    with the better of raw/EMA weights by the experiment's metric."""
    metric, mode = experiment_metric(client, client.get_run(run_id))
    local = client.download_artifacts(run_id, schema.BEST_CHECKPOINT, str(directory))
    return model_from_checkpoint(local, metric, mode)


PRETRAINED_FORMS = "models:/NAME/VERSION, models:/NAME/latest, models:/NAME@ALIAS or runs:/RUN_ID/PATH"


def check_pretrained(pretrained: Optional[str], tracking_uri: str, key: str = "train.model.pretrained") -> None:
    """``mlflow:<model-uri>`` names a model that exists at ``tracking_uri``: checked by the driver
    before Ray starts, without torch (each experiment's trials download it). Other values pass."""
    if not (pretrained and pretrained.startswith(MLFLOW_PREFIX)):
        return
    from training.config import ConfigError

    uri = pretrained[len(MLFLOW_PREFIX):]
    expected = f"a model at the tracking URI {tracking_uri} ({PRETRAINED_FORMS})"
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).exists():
        raise ConfigError(key, pretrained, f"{expected}: that database does not exist")
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri)
    try:
        if uri.startswith("models:/"):
            name, _, ref = uri[len("models:/"):].partition("/")
            if "@" in name and not ref:
                client.get_model_version_by_alias(*name.split("@", 1))
            elif ref == "latest":
                if not client.search_model_versions(f"name = '{name}'"):
                    raise ConfigError(key, pretrained, f"{expected}: no version of {name!r} is registered")
            elif ref.isdigit():
                client.get_model_version(name, ref)
            else:
                raise ConfigError(key, pretrained, expected)
        elif uri.startswith("runs:/") and uri[len("runs:/"):].strip("/"):
            client.get_run(uri[len("runs:/"):].split("/")[0])
        else:
            raise ConfigError(key, pretrained, expected)
    except MlflowException as e:
        raise ConfigError(key, pretrained, f"{expected}: {e.message.splitlines()[0]}") from None


def fetch_pretrained(model_uri: str, tracking_uri: str, directory: str) -> str:
    """The weights (a state_dict file) of MLflow model ``model_uri``, written once into ``directory``.

    ``directory`` is local or a URI (s3://...) on the storage every worker can read; the file is
    named by a hash of the URIs, so the trials of one experiment share one download (and one
    version, even for ``models:/NAME/latest``). Returns the file's path or URI.
    """
    import mlflow
    import pyarrow.fs as pafs
    import torch

    key = hashlib.sha256(f"{tracking_uri}|{model_uri}".encode()).hexdigest()[:16]
    fs, root = (pafs.FileSystem.from_uri(directory) if "://" in directory
                else (pafs.LocalFileSystem(), str(Path(directory).resolve())))
    path = f"{root}/pretrained-{key}.pt"
    target = f"{directory}/pretrained-{key}.pt" if "://" in directory else path
    if fs.get_file_info(path).type == pafs.FileType.File:
        return target
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    # models:/ URIs resolve through nested artifact repositories that read the global tracking URI:
    # set it for this call only, and give the caller theirs back.
    with _use_tracking_uri(tracking_uri):
        model = mlflow.pytorch.load_model(model_uri, map_location="cpu")
    fs.create_dir(root, recursive=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    with fs.open_output_stream(tmp) as f:
        f.write(buffer.getvalue())
    fs.move(tmp, path)   # atomic where the filesystem has renames: concurrent trials never see half a file
    return target


def model_requirements() -> list[str]:
    """What loading a registered model needs: MLflow's defaults for a pickled torch model (torch,
    cloudpickle, mlflow) and schedtune, whose model classes the pickle names. Given explicitly:
    MLflow's inference reaches the same list by loading the model in a subprocess, 6 s here."""
    from importlib.metadata import PackageNotFoundError, version

    import mlflow

    reqs = list(mlflow.pytorch.get_default_pip_requirements())
    try:
        reqs.append(f"schedtune=={version('schedtune')}")
    except PackageNotFoundError:   # running from a source tree that was never installed
        pass
    return reqs


def register(tracking_uri: str, run_id: str, name: str) -> str:
    import mlflow
    import numpy as np

    client = mlflow.MlflowClient(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        model, meta = trial_model(client, run_id, tmp)
        client.set_tag(run_id, schema.MODEL_WEIGHTS, meta["model_weights"])
        example = np.zeros((1, *meta["input_shape"]), dtype=np.float32)
        with mlflow.start_run(run_id=run_id):
            # pickle, not MLflow 3's torch.export format: that one fixes the batch size to the
            # input example's (a registered model that only takes batches of 1).
            info = mlflow.pytorch.log_model(model, name=schema.MODEL_ARTIFACT, input_example=example,
                                            serialization_format="pickle", pip_requirements=model_requirements(),
                                            registered_model_name=name, await_registration_for=60)
    return str(info.registered_model_version)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tracking-uri", required=True)
    p.add_argument("--run-id", required=True)
    p.add_argument("--name", required=True, help="registered model name")
    a = p.parse_args()
    print(register(a.tracking_uri, a.run_id, a.name))


if __name__ == "__main__":
    main()
