"""``schedtune export NAME|RUN_ID``: the trial's model as a file that runs without schedtune."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

from tuning.cli.args import add_tracking_uri_arg, positive_int
from tuning.delivery.export import DEFAULT_TOLERANCE, FORMATS



def configure_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="NAME|RUN_ID", help="experiment name (its best trial) or a trial's MLflow run id")
    p.add_argument("--format", choices=FORMATS, default="torchscript", help="default torchscript")
    p.add_argument("--quantize", choices=["int8"], help="dynamic int8 quantization of the Linear layers")
    p.add_argument("--out", metavar="DIR", help="output directory (default ./schedtune_export/TARGET)")
    add_tracking_uri_arg(p)
    p.add_argument("--check-samples", type=positive_int, default=512,
                   help="validation inputs the fp32 check runs (default 512)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"max |difference| of logits and probabilities (default {DEFAULT_TOLERANCE:g})")


def run_export(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    from training.config import DataConfig
    from training.data import load_data
    from tuning.delivery.export import EXIT_CHECK_FAILED, ExportCheckError, export_model
    from tuning.tracking import schema
    from tuning.tracking.backend import resolve_tracking_uri
    from tuning.tracking.reads import client_for, resolve_run
    from tuning.tracking.registry import trial_model

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")   # a bar per checkpoint file
    uri = resolve_tracking_uri(args.tracking_uri)
    client = client_for(uri)
    run_id, what = resolve_run(client, args.target, uri)
    with tempfile.TemporaryDirectory(prefix="schedtune-export-") as tmp:
        model, meta = trial_model(client, run_id, tmp)
    bundle = load_data(DataConfig.from_dict(meta["config"]["data"]))
    out_dir = Path(args.out or Path("schedtune_export") / args.target)
    source = {"tracking_uri": uri, "run_id": run_id, "target": args.target,
              "trial_id": client.get_run(run_id).data.tags.get(schema.TRIAL_ID),
              "model_weights": meta["model_weights"], "epoch": meta.get("epoch"),
              "metrics": {k: v for k, v in meta.get("metrics", {}).items() if "val" in k}}
    out(f"exporting {what} ({meta['config']['model']['name']}, {meta['model_weights']} weights, epoch "
        f"{meta.get('epoch')}) as {args.format}{' int8' if args.quantize else ''}")
    try:
        report = export_model(model, bundle, out_dir, args.format, quantize=args.quantize,
                              check_samples=args.check_samples, tolerance=args.tolerance, source=source)
    except ExportCheckError as e:
        print(f"schedtune export: check failed: {e}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    c = report.check
    out(f"wrote {report.path} and {report.sidecar}")
    if args.quantize:
        out(f"int8 check on {c['samples']} validation inputs: accuracy {c['val_acc_pytorch']:.4f} (fp32 PyTorch) -> "
            f"{c['val_acc_exported']:.4f} ({c['accuracy_change']:+.4f}); predictions agree on "
            f"{c['prediction_agreement']:.1%}; max |logit diff| {c['max_abs_diff_logits']:.3g}")
    else:
        out(f"check on {c['samples']} validation inputs: max |logit diff| {c['max_abs_diff_logits']:.3g}, "
            f"max |prob diff| {c['max_abs_diff_probs']:.3g} <= {c['tolerance']:g}: OK")
    return 0


