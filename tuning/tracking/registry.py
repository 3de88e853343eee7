"""A trial's model, materialized: rebuilt from its best checkpoint, registered as an MLflow model
version that serves without schedtune, and fetched back as pretrained weights for another experiment.

The trial's model is the better of its raw and its EMA (Polyak-averaged) weights, judged by the
metric the checkpoint recorded for each (``val_acc`` vs ``ema_val_acc``); ``meta["model_weights"]``
and the run tag ``schedtune.model_weights`` say which (``raw`` | ``ema``).

A registered version is MLflow's ONNX flavor: the ``schedtune export --format onnx`` file (the
dataset's normalization inside, so it takes raw inputs) with a probabilities output added, a tensor
signature, and as extra files its weights (``state_dict.pt``, what ``mlflow:models:/...`` pretrained
weights are read from, weights-only) and the export's sidecar (``model.json``). Serving it needs
onnxruntime, not torch, schedtune or the model's Python code (tuning.delivery.export.publish_model
builds it; this module writes it). The alias ``champion`` is on the best version by the metric.
"""
from __future__ import annotations

import contextlib
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


def model_source(client, run_id: str, meta: Mapping[str, Any], tracking_uri: str) -> dict[str, Any]:
    """Where a trial's model comes from: the tracking URI, the experiment (name, id, its run), the
    trial (id, run), the experiment's metric and the checkpoint's value of it, epoch, weights."""
    run = client.get_run(run_id)
    metric, mode = experiment_metric(client, run)
    metrics = meta.get("metrics", {})
    key = f"ema_{metric}" if meta.get("model_weights") == "ema" and f"ema_{metric}" in metrics else metric
    return {"tracking_uri": tracking_uri, "experiment": client.get_experiment(run.info.experiment_id).name,
            "experiment_id": run.info.experiment_id, "experiment_run_id": run.data.tags.get(schema.PARENT_RUN_ID),
            "run_id": run_id, "trial_id": run.data.tags.get(schema.TRIAL_ID), "metric": metric, "mode": mode,
            "metric_value": metrics.get(key), "model_weights": meta.get("model_weights"), "epoch": meta.get("epoch"),
            "metrics": {k: v for k, v in metrics.items() if "val" in k}}


def log_export(client, run_id: str, fmt: str, files: list[str]) -> str:
    """Log an export's files (model and sidecar) to the run it came from, under ``exports/<format>``;
    returns that artifact path."""
    path = schema.export_dir(fmt)
    for f in files:
        client.log_artifact(run_id, f, path)
    return path


def fetch_pretrained(model_uri: str, tracking_uri: str, directory: str) -> str:
    """The weights (a state_dict file) of MLflow model ``model_uri``, written once into ``directory``.

    ``directory`` is local or a URI (s3://...) on the storage every worker can read; the file is
    named by a hash of the URIs, so the trials of one experiment share one download (and one
    version, even for ``models:/NAME/latest``). Returns the file's path or URI.
    """
    import pyarrow.fs as pafs
    import torch

    key = hashlib.sha256(f"{tracking_uri}|{model_uri}".encode()).hexdigest()[:16]
    fs, root = (pafs.FileSystem.from_uri(directory) if "://" in directory
                else (pafs.LocalFileSystem(), str(Path(directory).resolve())))
    path = f"{root}/pretrained-{key}.pt"
    target = f"{directory}/pretrained-{key}.pt" if "://" in directory else path
    if fs.get_file_info(path).type == pafs.FileType.File:
        return target
    # models:/ URIs resolve through nested artifact repositories that read the global tracking URI:
    # set it for this call only, and give the caller theirs back.
    with tracking_uri_scope(tracking_uri), tempfile.TemporaryDirectory() as local:
        state = registered_state_dict(model_uri, local)
    fs.create_dir(root, recursive=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with fs.open_output_stream(tmp) as f:
        f.write(buffer.getvalue())
    fs.move(tmp, path)   # atomic where the filesystem has renames: concurrent trials never see half a file
    return target


@contextlib.contextmanager
def tracking_uri_scope(uri: str):
    """``uri`` as MLflow's process-wide tracking (and registry) URI inside the block, what the fluent
    API and ``models:/`` URIs read; the caller's URI and $MLFLOW_TRACKING_URI as they were after it.
    (MLflow's own ``_use_tracking_uri`` deletes $MLFLOW_TRACKING_URI on its way out when no URI had
    been set in the process: a trial's other MLflow clients would then write to ./mlflow.db.)"""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    before, env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


def registered_state_dict(model_uri: str, directory: str) -> dict:
    """The weights of MLflow model ``model_uri`` (resolved against the current tracking URI): its
    ``state_dict.pt`` extra file, read weights-only; a version schedtune registered before it
    registered ONNX (a pickled torch model) is unpickled with MLflow's torch loader."""
    import mlflow
    import torch

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=directory))
    weights = local / "extra_files" / schema.MODEL_STATE_DICT
    if weights.is_file():
        return torch.load(weights, map_location="cpu", weights_only=True)
    return mlflow.pytorch.load_model(str(local), map_location="cpu").state_dict()


def servable_signature(input_shape, num_classes: int):
    """Raw float32 inputs (any batch size) in; logits and probabilities out."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    f32 = np.dtype(np.float32)
    return ModelSignature(inputs=Schema([TensorSpec(f32, (-1, *input_shape), "input")]),
                          outputs=Schema([TensorSpec(f32, (-1, num_classes), "logits"),
                                          TensorSpec(f32, (-1, num_classes), "probabilities")]))


def description(source: Mapping[str, Any], input_shape, num_classes: int) -> str:
    """Where a model version came from, and what it takes and returns, in a sentence or three."""
    value = source.get("metric_value")
    scored = f"{source['metric']} {value:.4f}" if isinstance(value, (int, float)) else f"{source['metric']} -"
    return (f"Best trial {source['trial_id']} of schedtune experiment '{source['experiment']}' (MLflow experiment "
            f"{source['experiment_id']}, experiment run {source['experiment_run_id']}, trial run {source['run_id']}): "
            f"{scored} ({source['mode']}) at epoch {source['epoch']}, {source['model_weights']} weights. ONNX with the "
            f"dataset's normalization inside: raw float32 inputs (batch, {', '.join(map(str, input_shape))}) -> logits "
            f"and probabilities over {num_classes} classes (names in extra_files/{schema.MODEL_SIDECAR}).")


def register_onnx(tracking_uri: str, name: str, onnx_path: str, extra_files: list[str], example,
                  source: Mapping[str, Any], num_classes: int) -> str:
    """Log the ONNX file as an MLflow model of trial run ``source["run_id"]`` and register it as a
    version of ``name`` with where it came from (tags, description). A version of ``name`` already
    made from that run for the same experiment run (a registration cut short and resumed) is reused.
    Returns the version."""
    import mlflow
    import onnx

    client = mlflow.MlflowClient(tracking_uri)
    run_id, input_shape = source["run_id"], tuple(example.shape[1:])
    tags = {schema.EXPERIMENT_RUN_ID: source["experiment_run_id"] or "", schema.TRIAL_ID: source["trial_id"] or "",
            schema.VERSION_METRIC: source["metric"] or "", schema.VERSION_MODE: source["mode"] or "",
            schema.VERSION_METRIC_VALUE: "" if source["metric_value"] is None else repr(float(source["metric_value"]))}
    for v in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        if v.tags.get(schema.EXPERIMENT_RUN_ID) == tags[schema.EXPERIMENT_RUN_ID]:
            return str(v.version)
    with tracking_uri_scope(tracking_uri), mlflow.start_run(run_id=run_id):
        # pip requirements given (onnx, onnxruntime, mlflow): MLflow would otherwise infer them by
        # loading the model in a subprocess. Nothing of schedtune's is needed to load it.
        info = mlflow.onnx.log_model(onnx.load(onnx_path), name=schema.MODEL_ARTIFACT, input_example=example,
                                     signature=servable_signature(input_shape, num_classes),
                                     pip_requirements=mlflow.onnx.get_default_pip_requirements(),
                                     extra_files=extra_files, save_as_external_data=False)
        version = mlflow.register_model(info.model_uri, name, await_registration_for=60, tags=tags)
    client.update_model_version(name, version.version, description(source, input_shape, num_classes))
    if not client.get_registered_model(name).description:
        client.update_registered_model(name, f"The models of schedtune experiment '{source['experiment']}'; alias "
                                             f"{schema.CHAMPION_ALIAS}: the best version by the experiment's metric.")
    return str(version.version)


def crown(tracking_uri: str, name: str, version: str) -> str:
    """Move the alias ``champion`` to ``version`` unless the version holding it is better by the
    same metric (tags ``schedtune.metric``/``mode``/``metric_value``; a tie goes to the newer one, a
    different metric cannot be compared and goes to the newer one too). Returns the champion."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri)
    new = client.get_model_version(name, version)
    try:
        current = client.get_model_version_by_alias(name, schema.CHAMPION_ALIAS)
    except MlflowException:   # no champion yet
        current = None
    # str(): MLflow 3.17's sqlite store gives the version by alias as an int, by number as a str
    if current is not None and str(current.version) != str(new.version) and _beats(current.tags, new.tags):
        return str(current.version)
    client.set_registered_model_alias(name, schema.CHAMPION_ALIAS, str(new.version))
    return str(new.version)


def _beats(a: Mapping[str, str], b: Mapping[str, str]) -> bool:
    """Version tags ``a`` strictly better than ``b``, by the same metric and mode."""
    keys = (schema.VERSION_METRIC, schema.VERSION_MODE)
    if any(not a.get(k) or a.get(k) != b.get(k) for k in keys) or not a.get(schema.VERSION_METRIC_VALUE):
        return False
    if not b.get(schema.VERSION_METRIC_VALUE):
        return True
    return better(float(a[schema.VERSION_METRIC_VALUE]), float(b[schema.VERSION_METRIC_VALUE]),
                  a[schema.VERSION_MODE])
