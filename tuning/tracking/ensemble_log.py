"""An ensemble of trials as an MLflow run beside the experiment's (``schedtune ensemble``)."""
from __future__ import annotations

from tuning.tracking import schema
from tuning.tracking.entities import metric, param


def log_ensemble(client, parent, report) -> str:
    """``report`` (a tuning.delivery.trial_ensemble.EnsembleReport) as an MLflow run in the
    experiment of ``parent``, not nested under it (so it is never taken for a trial): members as
    tags, metrics for the ensemble and for every member. Returns the run id."""
    tags = {schema.ROLE: schema.ROLE_ENSEMBLE, schema.EXPERIMENT_RUN_ID: parent.info.run_id,
            schema.MEMBERS: ",".join(m.run_id for m in report.members),
            schema.MEMBER_TRIALS: ",".join(m.trial_id for m in report.members),
            **{schema.member_tag(i): m.run_id for i, m in enumerate(report.members, 1)}}
    run = client.create_run(parent.info.experiment_id, run_name=f"{report.name}-ensemble-top{len(report.members)}",
                            tags=tags)
    values = dict(report.ensemble)
    for i, m in enumerate(report.members, 1):
        values.update({f"member_{i}_{k}": v for k, v in m.metrics.items()})
    accs = [m.metrics["val_acc"] for m in report.members]
    values.update(best_member_val_acc=max(accs), worst_member_val_acc=min(accs))
    params = {"top_k": len(report.members), "metric": report.metric, "mode": report.mode,
              "member_weights": ",".join(m.weights for m in report.members)}
    client.log_batch(run.info.run_id, metrics=[metric(k, v) for k, v in values.items()],
                     params=[param(k, v) for k, v in params.items()])
    client.log_text(run.info.run_id, report.table() + "\n", schema.ENSEMBLE_ARTIFACT)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id
