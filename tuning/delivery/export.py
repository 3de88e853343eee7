"""`schedtune export NAME|RUN_ID --format torchscript|onnx [--quantize int8]`: the trial's model
as a file that runs without schedtune, checked against PyTorch before it is called done.

NAME is an experiment (its best trial: the experiment run's ``schedtune.best_run_id``), or RUN_ID
a trial run. The model (tuning.tracking.registry: the better of raw and EMA weights) is wrapped with the
dataset's standardization, so the exported model takes raw inputs (pixel intensities, features)
and returns logits; ``model.json`` (``model.int8.json``) beside it holds the class names, input
shape, normalization and format. The check runs the exported model (TorchScript, or onnxruntime for ONNX) on validation
inputs: fp32 fails (exit 1) when a logit or probability differs from PyTorch's by more than
``--tolerance``; int8 (onnxruntime's dynamic quantization of the MatMul/Gemm weights, ONNX only)
reports the accuracy change. The files and the sidecar are logged to the trial's run
(``exports/<format>``).

``publish_model`` makes the experiment's registered model from the same ONNX export
(tuning.tracking.registry writes it; ``python -m tuning.delivery.export --run-id ... --name ...`` is how
the Tune driver calls it, in a subprocess, so that the driver never loads torch).
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

FORMATS = ("torchscript", "onnx")
SUFFIX = {"torchscript": ".pt", "onnx": ".onnx"}
DEFAULT_TOLERANCE = 1e-4        # max |logit| / |probability| difference of an fp32 export
EXIT_CHECK_FAILED = 1


class ExportCheckError(RuntimeError):
    """The exported model's outputs differ from the PyTorch model's beyond the tolerance."""


def check_options(fmt: str, quantize: Optional[str]) -> None:
    """A format and quantization that can be made, else a ConfigError that says what can.

    int8 TorchScript is not offered: it needs ``torch.ao.quantization``, which PyTorch deprecated,
    and torchao's quantized weights are tensor subclasses that ``torch.jit.trace`` cannot record
    (torchao 0.18 with torch 2.14: an internal assert in the tracer)."""
    from training.config import ConfigError

    if fmt not in FORMATS:
        raise ConfigError("--format", fmt, f"one of {', '.join(FORMATS)}")
    if quantize == "int8" and fmt != "onnx":
        raise ConfigError("--quantize", quantize, "--format onnx with int8 (`schedtune export TARGET --format onnx "
                          "--quantize int8`: onnxruntime's dynamic quantization); int8 TorchScript would need the "
                          "deprecated torch.ao.quantization")


def _torch():
    import torch   # here, not at import: `schedtune --help` loads this module

    return torch


def preprocessed(model, mean=None, std=None):
    """``model((x - mean) / std)`` as one module: the dataset's standardization inside the exported
    graph (``.normalize`` says whether there was one; without, the inputs pass unchanged)."""
    torch = _torch()

    class Preprocessed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.normalize = mean is not None and std is not None
            self.register_buffer("mean", torch.as_tensor(mean if self.normalize else 0.0, dtype=torch.float32))
            self.register_buffer("std", torch.as_tensor(std if self.normalize else 1.0, dtype=torch.float32))

        def forward(self, x):
            return self.model((x - self.mean) / self.std)

    return Preprocessed()


@dataclass
class ExportReport:
    path: str                          # the model file
    sidecar: str                       # model.json / model.int8.json
    format: str
    quantize: Optional[str]
    check: dict[str, Any] = field(default_factory=dict)   # the numbers of the check


# ---------------------------------------------------------------------------- writers and runners

def _write_torchscript(module, example, path: Path, quantize: Optional[str]) -> None:
    _torch().jit.trace(module, example).save(str(path))   # quantize: None (check_options)


def _write_onnx(module, example, path: Path, quantize: Optional[str]) -> None:
    torch = _torch()
    target = path if quantize is None else path.with_suffix(".fp32.onnx")
    torch.onnx.export(module, (example,), str(target), input_names=["input"], output_names=["logits"],
                      dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, external_data=False,
                      verbose=False)
    if quantize == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.shape_inference import quant_pre_process

        # onnxruntime's pre-processing (symbolic shape inference, graph optimization) first: without
        # it the quantizer's shape inference rejects the exporter's value_info for MatMul weights.
        prepared = path.with_suffix(".prep.onnx")
        quant_pre_process(str(target), str(prepared))
        quantize_dynamic(str(prepared), str(path), weight_type=QuantType.QInt8)
        target.unlink()
        prepared.unlink()


def load_exported(path: str | Path, fmt: str) -> Callable:
    """A function from a float32 (N, *input_shape) tensor to (N, C) logits, running the exported file."""
    torch = _torch()
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)   # torch.jit is deprecated, still the format asked for
            module = torch.jit.load(str(path), map_location="cpu").eval()

        def run(x):
            with torch.no_grad():
                return module(x)
        return run
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


# ---------------------------------------------------------------------------- the export and its check

def compare(reference, exported, labels, *, quantized: bool, tolerance: float) -> dict[str, Any]:
    """Numbers of the check: max |diff| of logits and probabilities and the accuracies;
    raises ExportCheckError for an fp32 export beyond ``tolerance``."""
    torch = _torch()
    p_ref, p_exp = torch.softmax(reference, -1), torch.softmax(exported, -1)
    acc_ref = (reference.argmax(-1) == labels).float().mean().item()
    acc_exp = (exported.argmax(-1) == labels).float().mean().item()
    numbers = {"samples": len(labels), "max_abs_diff_logits": (reference - exported).abs().max().item(),
               "max_abs_diff_probs": (p_ref - p_exp).abs().max().item(), "val_acc_pytorch": acc_ref,
               "val_acc_exported": acc_exp, "accuracy_change": acc_exp - acc_ref,
               "prediction_agreement": (reference.argmax(-1) == exported.argmax(-1)).float().mean().item()}
    if not quantized:
        numbers["tolerance"] = tolerance
        worst = max(numbers["max_abs_diff_logits"], numbers["max_abs_diff_probs"])
        numbers["passed"] = worst <= tolerance
        if not numbers["passed"]:
            raise ExportCheckError(
                f"the exported model differs from PyTorch's on {len(labels)} validation inputs: max |logit diff| "
                f"{numbers['max_abs_diff_logits']:.3g}, max |prob diff| {numbers['max_abs_diff_probs']:.3g} "
                f"> tolerance {tolerance:g} (accuracy {acc_ref:.4f} -> {acc_exp:.4f})")
    return numbers


def export_model(model, bundle, out_dir: str | Path, fmt: str, *, quantize: Optional[str] = None,
                 check_samples: Optional[int] = 512, tolerance: float = DEFAULT_TOLERANCE,
                 source: Optional[dict] = None) -> ExportReport:
    """Write ``model`` (eval mode, CPU) with ``bundle``'s normalization to ``out_dir`` as ``fmt``, check it
    on validation inputs, and write the JSON sidecar. fp32: the first ``check_samples`` inputs
    (None: all) must match within ``tolerance``, else ExportCheckError (the model file stays, for a look);
    int8: accuracy before/after on the whole validation split."""
    torch = _torch()
    check_options(fmt, quantize)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    module = preprocessed(copy.deepcopy(model).cpu().eval(), bundle.mean, bundle.std).eval()
    x, y = _validation(bundle, None if quantize else check_samples)
    raw = x * module.std + module.mean                      # what the exported model takes
    path = out / f"model{'.int8' if quantize else ''}{SUFFIX[fmt]}"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")                     # deprecation notes of torch.jit / quantization
        (_write_torchscript if fmt == "torchscript" else _write_onnx)(module, raw[:2], path, quantize)
        reference = _batched(module.model, x)
    exported = _batched(load_exported(path, fmt), raw)
    check = compare(reference, exported, y, quantized=quantize is not None, tolerance=tolerance)
    sidecar = path.with_name(path.name.split(".")[0] + (".int8" if quantize else "") + ".json")   # model[.int8].json
    sidecar.write_text(json.dumps(_sidecar(path, fmt, quantize, bundle, module, source, check), indent=1))
    return ExportReport(str(path), str(sidecar), fmt, quantize, check)


def _batched(fn: Callable, x, batch: int = 256):
    """``fn`` over ``x`` in batches (a whole validation split at once can be GBs of activations)."""
    torch = _torch()
    return torch.cat([fn(x[i:i + batch]) for i in range(0, len(x), batch)])


def _validation(bundle, n: Optional[int]):
    torch = _torch()
    val = bundle.val
    count = len(val) if n is None else min(n, len(val))
    xs, ys = zip(*(val[i] for i in range(count)))
    return torch.stack(xs).float(), torch.stack(ys)


def _sidecar(path: Path, fmt: str, quantize: Optional[str], bundle, module, source, check) -> dict:
    return {
        "format": fmt, "file": path.name, "quantize": quantize,
        "input": {"name": "input", "shape": ["batch", *bundle.input_shape], "dtype": "float32",
                  "raw": module.normalize,
                  "note": "raw inputs: the model standardizes them with `normalization`" if module.normalize
                  else "inputs already standardized as the training data was"},
        "normalization": {"formula": "(input - mean) / std", "shape": list(module.mean.shape),
                          "mean": module.mean.flatten().tolist(), "std": module.std.flatten().tolist()}
        if module.normalize else None,
        "output": {"name": "logits", "shape": ["batch", bundle.num_classes], "note": "softmax gives probabilities"},
        "class_names": list(bundle.class_names),
        "source": source or {},
        "check": check,
    }


# ---------------------------------------------------------------------------- the registered model

def load_trial(client, run_id: str):
    """(model, meta, data bundle) of trial run ``run_id``: its best checkpoint's model
    (tuning.tracking.registry.trial_model) and the data it was trained on (for the normalization
    and the check's validation inputs)."""
    from training.config import DataConfig
    from training.data import load_data
    from tuning.tracking.registry import trial_model

    with tempfile.TemporaryDirectory(prefix="schedtune-export-") as tmp:
        model, meta = trial_model(client, run_id, tmp)
    return model, meta, load_data(DataConfig.from_dict(meta["config"]["data"]))


def with_probabilities(src: str | Path, dst: str | Path) -> None:
    """The ONNX graph at ``src`` with a second output, ``probabilities`` (softmax of ``logits``), at ``dst``."""
    import onnx
    from onnx import helper

    graph = onnx.load(str(src))
    graph.graph.node.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1))
    out = onnx.ValueInfoProto()
    out.CopyFrom(next(o for o in graph.graph.output if o.name == "logits"))
    out.name = "probabilities"
    graph.graph.output.append(out)
    onnx.checker.check_model(graph)
    onnx.save(graph, str(dst))


def publish_model(tracking_uri: str, run_id: str, name: str) -> tuple[str, str]:
    """Register trial run ``run_id``'s model as a version of ``name`` that serves without schedtune:
    the ONNX export (raw inputs; checked against PyTorch, ExportCheckError otherwise), also logged
    to the run under ``exports/onnx``, with a probabilities output, its weights and sidecar as extra
    files. Returns (version, the version holding the alias ``champion`` now)."""
    from tuning.tracking import registry, schema
    from tuning.tracking.reads import client_for

    client = client_for(tracking_uri)
    model, meta, bundle = load_trial(client, run_id)
    source = registry.model_source(client, run_id, meta, tracking_uri)
    client.set_tag(run_id, schema.MODEL_WEIGHTS, meta["model_weights"])
    with tempfile.TemporaryDirectory(prefix="schedtune-publish-") as tmp:
        report = export_model(model, bundle, Path(tmp) / "export", "onnx", source=source)
        registry.log_export(client, run_id, "onnx", [report.path, report.sidecar])
        served, extra = Path(tmp) / "model.onnx", Path(tmp) / "extra"
        with_probabilities(report.path, served)
        extra.mkdir()
        sidecar = json.loads(Path(report.sidecar).read_text())
        sidecar["output"] = {"names": ["logits", "probabilities"], "shape": ["batch", bundle.num_classes],
                             "note": "probabilities: softmax of logits"}
        (extra / schema.MODEL_SIDECAR).write_text(json.dumps(sidecar, indent=1))
        _torch().save(model.state_dict(), extra / schema.MODEL_STATE_DICT)
        x, _ = _validation(bundle, 2)
        example = (x * bundle.std + bundle.mean if sidecar["input"]["raw"] else x).numpy()   # raw inputs
        version = registry.register_onnx(tracking_uri, name, str(served), [str(p) for p in sorted(extra.iterdir())],
                                         example, source, bundle.num_classes)
    return version, registry.crown(tracking_uri, name, version)


def main() -> None:
    p = argparse.ArgumentParser(description="Register a trial's model (ONNX, servable without schedtune); "
                                            "prints the version and the champion's version")
    p.add_argument("--tracking-uri", required=True)
    p.add_argument("--run-id", required=True)
    p.add_argument("--name", required=True, help="registered model name")
    a = p.parse_args()
    print(json.dumps(dict(zip(("version", "champion"), publish_model(a.tracking_uri, a.run_id, a.name)))))


if __name__ == "__main__":
    main()
