"""``schedtune export NAME|RUN_ID``: the trial's model as a file that runs without schedtune."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Optional

from tuning.cli.args import add_tracking_uri_arg, positive_int
from tuning.delivery.export import DEFAULT_TOLERANCE, FORMATS



def configure_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="NAME|RUN_ID", help="experiment name (its best trial) or a trial's MLflow run id")
    p.add_argument("--format", choices=FORMATS, default="torchscript", help="default torchscript")
    p.add_argument("--quantize", choices=["int8"], help="dynamic int8 quantization (onnxruntime: --format onnx only)")
    p.add_argument("--out", metavar="DIR", help="output directory (default ./schedtune_export/TARGET)")
    add_tracking_uri_arg(p)
    p.add_argument("--working-dir", metavar="DIR",
                   help="where the trial's package.module:callable plug-ins import from (default: the directory "
                        "of the experiment's search-space file when it is here, then the current directory)")
    p.add_argument("--check-samples", type=positive_int, default=512,
                   help="validation inputs the fp32 check runs (default 512)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"max |difference| of logits and probabilities (default {DEFAULT_TOLERANCE:g})")


def find_user_code(client, run_id: str, working_dir: Optional[str]) -> None:
    """Put where the trial's plug-ins (``package.module:callable``) import from on ``sys.path``:
    ``working_dir``, else the directory of the experiment's search-space file as its run recorded it
    (when it exists on this machine), and the current directory. Nothing for registry models."""
    from training.config import plugin_form
    from tuning.spec.code import check_collisions, put_on_path
    from tuning.tracking import schema

    run = client.get_run(run_id)
    names = [run.data.params.get("model.name", ""), run.data.params.get("data.name", "")]
    if not any((form := plugin_form(n)) and form[0] == "callable" for n in names):
        return
    if working_dir is not None:
        candidates = [Path(working_dir)]
    else:
        parent = run.data.tags.get(schema.PARENT_RUN_ID)
        space_file = client.get_run(parent).data.tags.get(schema.SPACE_FILE, "") if parent else ""
        candidates = [Path(space_file).parent] if space_file and Path(space_file).is_file() else []
        candidates.append(Path.cwd())
    for directory in reversed(candidates):   # the first ends up first on the path
        check_collisions(f"run {run_id}", directory, key="--working-dir")
        put_on_path(directory)


def run_export(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    from tuning.delivery.export import EXIT_CHECK_FAILED, ExportCheckError, check_options, export_model, load_trial
    from tuning.tracking.backend import resolve_tracking_uri
    from tuning.tracking.reads import client_for, resolve_run
    from tuning.tracking.registry import log_export, model_source

    check_options(args.format, args.quantize)   # before anything is downloaded
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")   # a bar per checkpoint file
    uri = resolve_tracking_uri(args.tracking_uri)
    client = client_for(uri)
    run_id, what = resolve_run(client, args.target, uri)
    find_user_code(client, run_id, args.working_dir)
    model, meta, bundle = load_trial(client, run_id)
    out_dir = Path(args.out or Path("schedtune_export") / args.target)
    source = {**model_source(client, run_id, meta, uri), "target": args.target}
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
    out(f"logged them to run {run_id} under {log_export(client, run_id, args.format, [report.path, report.sidecar])}")
    if args.quantize:
        out(f"int8 check on {c['samples']} validation inputs: accuracy {c['val_acc_pytorch']:.4f} (fp32 PyTorch) -> "
            f"{c['val_acc_exported']:.4f} ({c['accuracy_change']:+.4f}); predictions agree on "
            f"{c['prediction_agreement']:.1%}; max |logit diff| {c['max_abs_diff_logits']:.3g}")
    else:
        out(f"check on {c['samples']} validation inputs: max |logit diff| {c['max_abs_diff_logits']:.3g}, "
            f"max |prob diff| {c['max_abs_diff_probs']:.3g} <= {c['tolerance']:g}: OK")
    return 0


