"""What the tracker writes into its runs when a trial ends, and the parent run's files: a trial's
end tags, its best and last checkpoints, the diagnosis of its learning curves with their plots;
the experiment's text artifacts and plots.

Functions of an ``Upload`` (``Uploader.upload_counted``: a directory in, the number of its files that
could not be uploaded out), so that tuning.tracking.callback keeps only when things are sent and
what happens while MLflow is down.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from tuning.analysis.ranking import best_of
from tuning.analysis.results import end_state
from tuning.spec import ExperimentSpec
from tuning.tracking import schema
from tuning.tracking.entities import metric as _metric, param as _param
from tuning.tracking.reads import best_metric_key
from tuning.tracking.trial_files import best_and_last

Upload = Callable[[str, str, str, Optional[str]], int]   # (what, run id, local dir, artifact path) -> files lost
TRACE_FILE = "trace.json"   # training.checkpoint.TRACE_FILE (not imported: that module imports torch)


def create_parent_run(client, experiment_id: str, spec: ExperimentSpec, run_dir: str) -> str:
    """The run of one invocation (found again on --resume by its ``schedtune.run_dir`` tag), with the
    experiment's options as params; returns its id."""
    o = spec.options
    run = client.create_run(experiment_id, run_name=f"{o.name}-{Path(run_dir).name}", tags={
        schema.RUN_DIR: run_dir, schema.ROLE: schema.ROLE_EXPERIMENT, schema.SPACE_FILE: spec.file,
        schema.SPACE_SHA256: spec.sha256})
    client.log_batch(run.info.run_id, params=[_param(k, v) for k, v in {
        "search": o.search, "num_samples": o.num_samples, "metric": o.metric, "mode": o.mode,
        "scheduler": o.scheduler.name, "seed": o.seed}.items()])
    return run.info.run_id


def open_trial_runs(client, experiment_id: str, parent_run_id: str) -> dict[str, str]:
    """{trial id: run id} of the trial runs under ``parent_run_id`` still tagged running."""
    runs = client.search_runs([experiment_id], f"tags.`{schema.PARENT_RUN_ID}` = '{parent_run_id}' and "
                                               f"tags.`{schema.STATUS}` = '{schema.STATUS_RUNNING}'")
    return {r.data.tags[schema.TRIAL_ID]: r.info.run_id for r in runs if schema.TRIAL_ID in r.data.tags}


def best_metric(client, run_id: str, history: list[dict], metric: str, mode: str) -> list:
    """``best_<metric>`` (what ``schedtune runs`` ranks by) as a one-metric list, [] without a value; from
    ``history``, else from the run (a trial that ended before an interruption the tracker forgot it in)."""
    values = [h.get(metric) for h in history] or [m.value for m in client.get_metric_history(run_id, metric)]
    score = best_of(values, mode)
    return [] if score is None else [_metric(best_metric_key(metric), score)]


def end_tags(last: dict[str, Any], errored: bool, error_file: Optional[str], spec: ExperimentSpec,
             error: Optional[str] = None) -> dict[str, str]:
    """How a trial ended, as its run's tags: status, last epoch, where it diverged, its error and error file."""
    state = end_state(last, errored, spec.base.epochs, spec.options.scheduler.name)
    tags = {schema.STATUS: state, schema.END_EPOCH: str(int(last.get("epoch", 0)))}
    if last.get("diverged"):
        tags.update({schema.DIVERGED_STEP: str(int(last["diverged_step"])),
                     schema.DIVERGED_LR: f"{last['diverged_lr']:.6g}"})
    if errored and error_file:
        tags[schema.ERROR_FILE] = str(error_file)
    if errored and error:
        tags[schema.ERROR] = error
    return tags


def log_checkpoints(client, upload: Upload, run_id: str, trial_id: str, found: list[tuple[str, dict]],
                    metric: str, mode: str) -> tuple[dict, dict, int]:
    """Log the best and the last of ``found`` (tuning.tracking.trial_files.find_checkpoints) under
    checkpoints/best and checkpoints/last; returns the last one's (trace, meta), {} where none, and
    how many files are lost. A checkpoint gets its epoch tag only when all of it is in."""
    import pyarrow.fs as pafs

    best, last = best_and_last(found, metric, mode)
    trace: dict = {}
    lost = 0
    for label, ckpt in (("best", best), ("last", last)):
        if ckpt is None:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            pafs.copy_files(ckpt[0], tmp)
            if label == "last" and (Path(tmp) / TRACE_FILE).exists():
                trace = json.loads((Path(tmp) / TRACE_FILE).read_text())
            missing = upload(f"trial {trial_id}'s {label} checkpoint", run_id, tmp, f"{schema.CHECKPOINTS_DIR}/{label}")
        lost += missing
        if not missing:
            client.set_tag(run_id, schema.checkpoint_epoch_tag(label), str(ckpt[1]["epoch"]))
    return trace, (last[1] if last else {}), lost


def diagnose_and_plot(upload: Upload, run_id: str, trial_id: str, history: list[dict], trace: dict,
                      meta: dict) -> tuple[Any, dict[str, str], int]:
    """(tuning.analysis.diagnose.Diagnosis or None, its tags, plot files lost): the trial's learning
    curves diagnosed, and its plots logged under plots/."""
    from tuning.analysis.diagnose import diagnose
    from tuning.analysis.plots import run_plots

    if not history:   # failed before its first report: nothing to read
        return None, {}, 0
    d = diagnose(history, step_losses=trace.get("loss"), num_classes=meta.get("num_classes"))
    with tempfile.TemporaryDirectory() as tmp:
        drawn = run_plots(tmp, history, trace)
        lost = upload(f"trial {trial_id}'s plots", run_id, tmp, schema.PLOTS_DIR) if drawn else 0
    return d, {schema.DIAGNOSIS: d.kind, schema.DIAGNOSIS_EVIDENCE: d.evidence_json()}, lost


def log_text(upload: Upload, run_id: str, text: str, name: str) -> int:
    """``text`` as the artifact ``name`` at the run's root; returns 1 when it is lost."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / name).write_text(text)
        return upload(name, run_id, tmp, None)


def log_experiment_plots(upload: Upload, run_id: str, spec: ExperimentSpec, rows: list) -> int:
    """Metric against each sampled hyperparameter and the best-so-far curve (``rows`` in start
    order: tuning.analysis.results.TrialRow) as PNGs under plots/; returns the files lost."""
    from tuning.analysis.plots import experiment_plots

    o = spec.options
    with tempfile.TemporaryDirectory() as tmp:
        experiment_plots(tmp, [spec.decode(r.params) for r in rows], [r.metric for r in rows], spec.space,
                         o.metric, o.mode)
        return upload("the experiment plots", run_id, tmp, schema.PLOTS_DIR)
