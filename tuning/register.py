"""Register a trial's best checkpoint as an MLflow model version.

Run as ``python -m tuning.register --tracking-uri URI --run-id RUN --name NAME`` by the Tune
driver (a subprocess, so the driver never loads torch); prints the new version number.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def model_from_checkpoint(directory: str | Path):
    """Rebuild the model a checkpoint directory was trained with and load its weights."""
    from training import checkpoint as ckpt
    from training.config import TrainConfig
    from training.models import build_model

    meta = ckpt.read_meta(directory)
    cfg = TrainConfig.from_dict(meta["config"])
    cfg = cfg.with_updates({"model.pretrained": None})
    model = build_model(cfg.model, meta["num_classes"], tuple(meta["input_shape"]),
                        stochastic_depth=cfg.regularization.stochastic_depth)
    ckpt.load_model_state(model, directory)
    return model.eval(), meta


def register(tracking_uri: str, run_id: str, name: str) -> str:
    import mlflow
    import numpy as np

    client = mlflow.MlflowClient(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run_id, "checkpoints/best", tmp)
        model, meta = model_from_checkpoint(local)
        example = np.zeros((1, *meta["input_shape"]), dtype=np.float32)
        with mlflow.start_run(run_id=run_id):
            # pickle, not MLflow 3's torch.export format: that one fixes the batch size to the
            # input example's (a registered model that only takes batches of 1).
            info = mlflow.pytorch.log_model(model, name="model", input_example=example,
                                            serialization_format="pickle",
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
