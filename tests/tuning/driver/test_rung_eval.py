"""Cooldown-ASHA (``scheduler.rung_eval: cooldown``): the rung epochs the trials fork at are the
epochs Ray's ASHA records them at, and at those epochs the rung compares the forks' metric."""
from types import SimpleNamespace

import pytest
from ray.tune.schedulers import ASHAScheduler

from tests.conftest import ROOT, sqlite_store
from tuning.driver.trial_schedulers import ASHAState, CooldownASHA, make_scheduler
from tuning.spec import load_spec
from tuning.spec.options import SchedulerConfig

QUICK = ROOT / "search_spaces/quickstart.yaml"


@pytest.mark.parametrize("grace,rf,epochs", [(g, rf, e) for g in (1, 2, 3) for rf in (2.0, 2.5, 3.0, 4.0)
                                              for e in (1, 2, 6, 9, 12, 27, 30, 81) if g <= e])   # Ray: grace <= max_t
def test_rung_epochs_are_where_ray_asha_records_a_trial(grace, rf, epochs):
    """Ray's rungs (milestones grace x rf^k), each recorded at the first reported epoch at or past it."""
    asha = ASHAScheduler(time_attr="epoch", metric="val_acc", mode="max", max_t=epochs, grace_period=grace,
                         reduction_factor=rf)
    (bracket,) = asha._brackets
    recorded_at = set()
    for milestone, _ in bracket._rungs:
        first = next((e for e in range(1, epochs + 1) if e >= milestone), None)
        if first is not None and first < epochs:
            recorded_at.add(first)
    assert SchedulerConfig(grace_period=grace, reduction_factor=rf).rung_epochs(epochs) == sorted(recorded_at)


def _decisions(scheduler, results):
    scheduler.set_search_properties("val_acc", "max")   # what Tune does with TuneConfig(metric, mode)
    out = {}
    for trial_id, result in results:
        trial = SimpleNamespace(trial_id=trial_id)
        if trial_id not in scheduler._trial_info:
            scheduler.on_trial_add(None, trial)
        out[(trial_id, result["epoch"])] = scheduler.on_trial_result(None, trial, result)
    return out


# (trial, result): a and b reach rung 1 first; c looks bad but its fork is the best, d the reverse.
RESULTS = [("a", {"epoch": 1, "val_acc": 0.9, "rung_val_acc": 0.6}),
           ("b", {"epoch": 1, "val_acc": 0.8, "rung_val_acc": 0.7}),
           ("c", {"epoch": 1, "val_acc": 0.5, "rung_val_acc": 0.95}),
           ("d", {"epoch": 1, "val_acc": 0.95, "rung_val_acc": 0.1}),
           ("a", {"epoch": 2, "val_acc": 0.1})]   # between rungs: no fork, nothing to decide


def test_cooldown_asha_decides_on_the_fork_metric_at_rungs():
    cooldown = load_spec(QUICK, {"train.epochs": 9, "experiment.scheduler": {
        "name": "asha", "grace_period": 1, "reduction_factor": 3, "rung_eval": "cooldown"}})
    scheduler, callbacks = make_scheduler(cooldown)
    assert type(scheduler) is CooldownASHA and [type(c) for c in callbacks] == [ASHAState]
    got = _decisions(scheduler, RESULTS)
    assert (got[("c", 1)], got[("d", 1)], got[("a", 2)]) == ("CONTINUE", "STOP", "CONTINUE")
    assert scheduler._brackets[0]._rungs[-1][1] == {"a": 0.6, "b": 0.7, "c": 0.95, "d": 0.1}
    plain, _ = make_scheduler(load_spec(QUICK, {"train.epochs": 9}))
    assert type(plain) is ASHAScheduler
    got = _decisions(plain, RESULTS)                                 # the same results, judged on val_acc
    assert (got[("c", 1)], got[("d", 1)]) == ("STOP", "CONTINUE")


# ------------------------------------------------------------------ a real experiment (Ray, MLflow in sqlite)

RUNG_LRS = [0.05, 0.1, 1.0e-6]   # one trial at a time in this order: the last one is hopeless


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_cooldown_asha_experiment_end_to_end(ray_cluster, tmp_path):
    """A real experiment over the large-batch space with cooldown-ASHA (rungs at epochs 1 and 2 of 4),
    one trial at a time: every trial reports its forks at the rung epochs it reaches (rung_val_acc,
    fork_steps) and carries train.rung_eval; the hopeless trial is stopped at the first rung; then
    `schedtune report` draws the k-sweep (the space searches scaling.batch_per_worker)."""
    import mlflow

    from tuning.cli import main
    from tuning.driver.experiment import run_experiment

    uri = sqlite_store(tmp_path / "mlflow.db")
    spec = load_spec(ROOT / "search_spaces/large_batch.yaml", {
        "experiment.name": "it-cooldown", "experiment.num_samples": 1, "experiment.max_concurrent_trials": 1,
        "experiment.scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2, "rung_eval": "cooldown"},
        "train.epochs": 4, "train.data": {"name": "mnist1d", "num_samples": 2000}, "train.scaling.num_workers": 1,
        "space.optim.base_lr": {"grid": RUNG_LRS}})
    result = run_experiment(spec, storage=str(tmp_path / "results"), tracking_uri=uri, address=ray_cluster.address,
                            out=lambda line: None, register_model=False)
    assert len(result.rows) == len(RUNG_LRS)
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("it-cooldown").experiment_id],
                              "tags.`schedtune.trial_id` != ''")
    statuses = {}
    for r in runs:
        assert r.data.params["rung_eval.epochs"] == "[1, 2]" and float(r.data.params["rung_eval.cooldown_fraction"]) == 0.1
        epochs = sorted(m.step for m in client.get_metric_history(r.info.run_id, "val_acc"))
        forks = {m.step: m.value for m in client.get_metric_history(r.info.run_id, "rung_val_acc")}
        steps = {m.step: m.value for m in client.get_metric_history(r.info.run_id, "fork_steps")}
        assert sorted(forks) == sorted(steps) == [e for e in (1, 2) if e <= epochs[-1]], (epochs, forks)
        assert all(0 <= v <= 1 for v in forks.values()) and all(v >= 1 for v in steps.values())
        statuses[float(r.data.params["optim.base_lr"])] = r.data.tags["schedtune.status"]
    assert statuses[1.0e-6] == "stopped by ASHA at epoch 1", statuses
    out = tmp_path / "report"
    assert main(["report", "it-cooldown", "--out", str(out), "--tracking-uri", uri]) == 0
    assert (out / "k_sweep.png").stat().st_size > 1000 and (out / "hyperparameters.png").exists()
