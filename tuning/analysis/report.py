"""The final table of trials (terminal and MLflow), where to look next, and the diagnosis table of
``schedtune report``."""
from __future__ import annotations

from tuning.analysis.results import ExperimentRecord, ExperimentResult
from tuning.spec import ExperimentSpec

MLFLOW_UI = "http://127.0.0.1:5000"     # where `mlflow ui` serves a local store


def runs_page(tracking_uri: str, experiment_id: str) -> str:
    """The MLflow UI page of an experiment's trial runs. MLflow 3.17's UI opens ``#/experiments/<id>``
    in its GenAI view whatever the experiment's ``mlflow.experimentKind`` tag says (the view is a
    toggle the browser keeps, GenAI by default); this page opens on the runs, in the training view."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else MLFLOW_UI
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


def _cost(cost) -> str:
    """worker-seconds, and the CPU-/GPU-hours they are (tuning.driver.cost)."""
    if not cost:
        return "-"
    return f"{cost['worker_seconds']:.0f} worker-s, {cost['cpu_hours']:.3g} CPU-h, {cost['gpu_hours']:.3g} GPU-h"


def results_table(result: ExperimentResult, spec: ExperimentSpec) -> str:
    """Markdown table of every trial, best first: id, how it ended, epochs, metric (with several
    ``metrics``: the others at its best epoch and whether it is on the Pareto front; with ``repeats``:
    its seed and its config's mean ± std over the repeats, by which configs rank), the diagnosis of
    its learning curves (tuning.analysis.diagnose), its data wait (the mean fraction of its step
    loop's time spent waiting for batches), its worker-seconds, sampled values; then what ended the
    experiment and what it cost."""
    keys = list(spec.space)
    o = spec.options
    metric = o.metric
    others = [m.name for m in o.objectives[1:]]   # multi-objective: each at the trial's best epoch, and the front
    repeats = o.repeats > 1                      # each repeat's seed, and its config's mean over the repeats
    head = (["trial", "status", "epochs", metric] + others + (["front"] if others else [])
            + (["seed", f"mean {metric} ± std (n)"] if repeats else []) + ["diagnosis", "data wait", "worker-s"] + keys)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result.rows:
        cells = [r.trial_id + (" (best)" if result.best is r else ""), r.status, str(r.epochs),
                 "-" if r.metric is None else f"{r.metric:.4f}"]
        cells += [f"{r.objectives[n]:.4g}" if r.objectives else "-" for n in others]
        cells += (["yes" if r.on_front else ""] if others else [])
        if repeats:
            cells += [str(spec.base.seed + (r.repeat or 0)),
                      f"{r.group[0]:.4f} ± {r.group[1]:.4f} ({r.group[2]})" if r.group else "-"]
        cells += [r.diagnosis or "-", "-" if r.data_wait is None else f"{r.data_wait:.0%}",
                  f"{r.cost['worker_seconds']:.0f}" if r.cost else "-"]
        sample = spec.decode(r.params)
        cells += [_fmt(sample.get(k, "-")) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"ended by: {result.ended_by or 'every trial ended'}", f"cost: {_cost(result.cost)}"]
    return "\n".join(lines)


def summary(result: ExperimentResult, spec: ExperimentSpec) -> str:
    """What the terminal shows at the end: the table, the best config, where it is in MLflow."""
    out = [results_table(result, spec), ""]
    best = result.best
    failed = [r for r in result.rows if r.error]
    for r in failed:
        out.append(f"trial {r.trial_id} failed: {r.error}")
    if failed:
        out.append("")
    if best is None:
        out.append("no trial finished with a valid metric (see the status column)")
    else:
        if best.group is not None:
            mean, std, n = best.group
            out.append(f"best config by the mean over its repeats: {spec.options.metric} {mean:.4f} ± {std:.4f} "
                       f"({n} of {spec.options.repeats} repeats); its best repeat is trial {best.trial_id} "
                       f"({best.metric:.4f}, seed {spec.base.seed + (best.repeat or 0)}); sampled:")
        else:
            out.append(f"best: trial {best.trial_id}, {spec.options.metric} {best.metric:.4f}; sampled:")
        out += [f"  {k}: {_fmt(v)}" for k, v in spec.decode(best.params).items()]
        if result.model_version:
            crowned = ("alias champion" if result.champion == result.model_version
                       else f"champion stays version {result.champion}, better by {spec.options.metric}")
            out.append(f"registered model: {spec.options.name} version {result.model_version} ({crowned}); serve "
                       f"it: MLFLOW_TRACKING_URI={result.tracking_uri} mlflow models serve -m "
                       f"models:/{spec.options.name}@champion --env-manager local")
    if spec.options.multi_objective:
        members = [r.trial_id for r in result.rows if r.on_front]
        out.append(f"Pareto front over {', '.join(m.name for m in spec.options.objectives)}: {len(members)} trials "
                   f"({', '.join(members) or 'none'}); pareto_front.md and plots/pareto_front.png on the parent run")
    out.append(f"MLflow: experiment {spec.options.name!r} (id {result.experiment_id}), parent run "
               f"{result.parent_run_id}, tracking URI {result.tracking_uri}")
    if result.tracking_uri.startswith("sqlite:///"):
        out.append(f"open the UI with:  mlflow ui --backend-store-uri {result.tracking_uri}")
    if result.experiment_id:
        out.append(f"the trials in the UI: {runs_page(result.tracking_uri, result.experiment_id)}")
    if result.lost_metrics:
        out.append(f"warning: {result.lost_metrics} metric values could not be sent to MLflow")
    if result.lost_artifacts:
        out.append(f"warning: {result.lost_artifacts} files (checkpoints, plots) could not be uploaded to MLflow "
                   f"after every retry (tag schedtune.lost_artifacts on the runs; SCHEDTUNE_ARTIFACT_TIMEOUT_S)")
    out.append(f"results: {result.path}  (continue an interrupted run with --resume)")
    return "\n".join(out)


def diagnosis_table(exp: ExperimentRecord) -> str:
    """Markdown table, best first: trial, status, metric, diagnosis, evidence; then the advice per kind."""
    lines = [f"| trial | status | {exp.metric} | diagnosis | evidence |", "|---|---|---|---|---|"]
    advice: dict[str, str] = {}
    for t in exp.trials:
        d = t.diagnosis
        lines.append(f"| {t.trial_id} | {t.status} | {'-' if t.metric is None else f'{t.metric:.4f}'} | "
                     f"{d.kind if d else '-'} | {d.evidence_json(200) if d else ''} |")
        if d:
            advice.setdefault(d.kind, d.advice)
    lines.append("")
    lines += [f"{kind}: {text}" for kind, text in advice.items()]
    return "\n".join(lines)
