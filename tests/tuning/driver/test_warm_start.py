"""Warm start across cluster sizes, end to end: the session's 2-worker ASHA experiment (it-asha)
starts a 4-worker random search. Its trials run the earlier best completed configs first, with the
same per-reference-batch LR, which each 4-worker trial scales to its own global batch (twice the
2-worker one's) by the linear scaling rule."""
from __future__ import annotations

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]


def test_a_4_worker_search_starts_from_the_2_worker_experiments_best_at_the_same_per_reference_lrs(
        experiment, ray_cluster, mlflow_server, tmp_path):
    import mlflow

    from training.schedules import lr_multiplier, plan_steps
    from tuning.driver.experiment import run_experiment
    from tuning.spec.loop_facts import train_size
    from tuning.spec import load_spec
    from tuning.tracking import schema
    from tuning.tracking.reads import sampled_values, trial_runs
    from tuning.tracking.warm_start import load_warm_start

    source_spec, _, _ = experiment          # it-asha: 2 workers x 32, reference batch 64, lr_scaling linear
    uri = mlflow_server.uri
    _, source_runs = trial_runs(source_spec.options.name, uri)
    completed = sorted((r for r in source_runs if r.data.tags[schema.STATUS] == "completed"),
                       key=lambda r: -r.data.metrics["best_val_acc"])[:2]
    assert completed and all(r.data.params["scaling.num_workers"] == "2" for r in completed)

    spec = load_spec(ROOT / "search_spaces/quickstart.yaml", {
        "experiment.name": "it-warm", "experiment.num_samples": len(completed), "experiment.scheduler": {"name": "fifo"},
        "experiment.warm_start": {"from": source_spec.options.name, "top_k": 2},
        "train.epochs": 1, "train.scaling.num_workers": 4, "train.scaling.cpus_per_worker": 0.25})
    assert [t for t in load_warm_start(spec, uri).trial_ids] == [r.data.tags[schema.TRIAL_ID] for r in completed]
    lines: list[str] = []
    result = run_experiment(spec, storage=str(tmp_path / "r"), tracking_uri=uri, address=ray_cluster.address,
                            out=lines.append, register_model=False)
    assert any(line.startswith(f"warm start: {len(completed)} completed trial") for line in lines), lines
    assert all(r.status == "completed" for r in result.rows)

    client = mlflow.MlflowClient(uri)
    _, runs = trial_runs("it-warm", uri)
    by_values = {tuple(r.data.params[k] for k in ("optim.base_lr", "optim.weight_decay", "model.dropout")): r
                 for r in runs}
    for src in completed:
        values = tuple(src.data.params[k] for k in ("optim.base_lr", "optim.weight_decay", "model.dropout"))
        new = by_values[values]                                     # the earlier config, exactly
        assert new.data.params["schedule.name"] == src.data.params["schedule.name"]
        assert (new.data.params["scaling.num_workers"], src.data.params["scaling.num_workers"]) == ("4", "2")
        # the LR it trained at: its peak, base_lr x global batch (4 x 32) / reference (64), times its
        # schedule's multiplier at the epoch's last step (the step schedule has decayed by then)
        cfg = spec.base.with_updates(sampled_values(spec.space, new.data.params))
        assert cfg.optim.base_lr == float(src.data.params["optim.base_lr"]) and cfg.scaling.global_batch == 128
        plan = plan_steps(cfg, train_size(cfg.data))
        assert plan.peak_lr == pytest.approx(2 * cfg.optim.base_lr)          # twice the 2-worker trials' peak
        (lr,) = [m.value for m in client.get_metric_history(new.info.run_id, "lr")]
        assert lr == pytest.approx(plan.peak_lr * lr_multiplier(cfg.schedule, plan.steps_per_epoch - 1,
                                                                plan.total_steps, plan.steps_per_epoch), rel=1e-6)
