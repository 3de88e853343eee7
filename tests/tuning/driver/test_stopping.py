"""Completion criteria and cost: the stopper against the events Tune sends it (a target, a plateau,
a time budget, a CPU-hours budget, and their state across --resume), the cost meter on a clock of
its own, and a real experiment that a target ends, with its costs in MLflow and the final table."""
from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest

from tests.conftest import ROOT, sqlite_store
from tuning.spec import SpaceError, load_spec

QUICK = ROOT / "search_spaces/quickstart.yaml"


def _spec(**over):
    return load_spec(QUICK, {"train.epochs": 4, **over})


def _trial(trial_id, config=None):
    return SimpleNamespace(trial_id=trial_id, config=config or {})


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_a_target_ends_the_experiment_and_names_the_trials_it_cut_short():
    from tuning.driver.stopping import Completion

    cut = {}
    c = Completion(_spec(**{"experiment.stop": {"metric_at_least": 0.9}}), "run", on_cut=cut.__setitem__)
    c.setup()
    assert c("a", {"epoch": 1, "val_acc": 0.5}) is False      # a stopper never stops one trial
    c("x", {"epoch": 1, "val_acc": 0.99, "diverged": 1.0})    # a diverged trial's report is no result
    c.on_trial_complete(0, [], _trial("x"))
    assert not c.stop_all()
    c("b", {"epoch": 4, "val_acc": 0.85})
    c.on_trial_complete(0, [], _trial("b"))
    assert not c.stop_all() and c.ended_by is None
    c("a", {"epoch": 2, "val_acc": 0.9})                    # at least the target: reached
    assert c.stop_all()
    assert c.ended_by == "target reached: val_acc 0.9 (at least 0.9) by trial a at epoch 2"
    assert cut == {"a": {"schedtune.status": "stopped at epoch 2: the experiment ended"}}   # b had completed


def test_min_mode_targets_use_metric_at_most_and_the_other_is_refused():
    from tuning.driver.stopping import Completion

    c = Completion(_spec(**{"experiment.metric": "val_loss", "experiment.mode": "min",
                            "experiment.stop": {"metric_at_most": 0.2}}), "run")
    c("a", {"epoch": 1, "val_loss": 0.21})
    assert not c.stop_all()
    c("a", {"epoch": 2, "val_loss": 0.19})
    assert c.stop_all() and c.ended_by.startswith("target reached: val_loss 0.19 (at most 0.2)")
    with pytest.raises(SpaceError) as e:
        _spec(**{"experiment.stop": {"metric_at_most": 0.2}})
    assert e.value.key == "experiment.stop.metric_at_most" and "metric_at_least with mode: max" in e.value.expected


def test_a_plateau_of_the_best_so_far_ends_it_after_patience_trials():
    from tuning.driver.stopping import Completion

    c = Completion(_spec(**{"experiment.stop": {"patience": 2, "min_delta": 0.01}}), "run")
    for trial_id, acc in [("a", 0.80), ("b", 0.90), ("c", 0.905), ("d", 0.70)]:
        c(trial_id, {"epoch": 4, "val_acc": acc})
        c.on_trial_complete(0, [], _trial(trial_id))
        if trial_id == "c":   # c improved the best, by less than min_delta: one trial of the plateau
            assert not c.stop_all() and c.best == 0.905 and c.without_improvement == 1
    assert c.stop_all()
    assert c.ended_by == ("plateau: the best val_acc (0.905) improved by no more than 0.01 over the last "
                          "2 ended trials")


def test_time_and_cpu_hour_budgets_end_it_and_survive_a_restore(monkeypatch):
    from tuning.driver import stopping
    from tuning.driver.cost import CostMeter
    from tuning.driver.stopping import Completion

    now = [0.0]
    monkeypatch.setattr(stopping.time, "monotonic", lambda: now[0])
    spec = _spec(**{"experiment.time_budget_s": 100, "train.scaling.num_workers": 2,
                    "train.scaling.cpus_per_worker": 0.5})
    c = Completion(spec, "run-t")
    c.setup()
    pickled_at_start = pickle.dumps(c)
    now[0] = 60.0
    assert not c.stop_all()
    state = pickle.loads(pickle.dumps(c.get_state()))
    restored = pickle.loads(pickled_at_start)                 # what Tune rebuilds on --resume
    assert Completion.for_run_dir("run-t") is restored
    restored.set_state(state)                                 # 60 s spent before the interruption
    now[0] = 90.0
    assert not restored.stop_all()
    now[0] = 100.0
    assert restored.stop_all() and restored.ended_by == "time budget spent: 100 s of experiment.time_budget_s 100"

    clock = Clock()
    meter = CostMeter(spec, clock=clock)
    c = Completion(load_spec(QUICK, {"experiment.budget": {"cpu_hours": 1.0}, "train.scaling.num_workers": 2,
                                     "train.scaling.cpus_per_worker": 0.5}), "run-b", meter)
    meter.on_trial_start(0, [], _trial("a"))
    clock.t += 1800
    assert not c.stop_all()
    clock.t += 1800   # 2 workers x 0.5 CPU + the trial's own 0.25 CPU = 1.25 CPU for an hour: 1.25 CPU-hours
    assert c.stop_all()
    assert meter.spent() == pytest.approx({"worker_seconds": 7200.0, "cpu_hours": 1.25, "gpu_hours": 0.0})
    assert c.ended_by == "budget spent: 1.25 of experiment.budget.cpu_hours 1"


def test_the_cost_of_a_trial_sums_its_starts_and_is_tagged_when_it_ends():
    from tuning.driver.cost import CostMeter

    clock, tags = Clock(), {}
    meter = CostMeter(_spec(**{"train.scaling.num_workers": 1, "train.scaling.cpus_per_worker": 2}),
                      on_cost=tags.__setitem__, clock=clock)
    t = _trial("a")
    meter.on_trial_start(0, [], t)
    clock.t += 10                       # start-up, then an epoch
    meter.on_trial_result(0, [], t, {})
    clock.t += 100                      # paused after that result (the tail is not counted), resumed later
    meter.on_trial_start(0, [], t)
    clock.t += 30
    state = pickle.loads(pickle.dumps(meter.get_state()))
    meter.on_trial_complete(0, [], t)
    assert meter.trial_cost("a") == pytest.approx({"worker_seconds": 40.0, "cpu_hours": 80 / 3600, "gpu_hours": 0.0})
    assert tags == {"a": {"schedtune.cost.worker_seconds": "40", "schedtune.cost.cpu_hours": "0.0222222",
                          "schedtune.cost.gpu_hours": "0"}}
    cut = _trial("b")                   # stopped with the experiment: no end event, closed when it ends
    meter.on_trial_start(0, [], cut)
    clock.t += 5
    meter.on_trial_result(0, [], cut, {})
    clock.t += 50
    meter.on_experiment_end([])
    assert meter.trial_cost("b")["worker_seconds"] == pytest.approx(55.0)
    assert tags["b"]["schedtune.cost.worker_seconds"] == "55"
    again = CostMeter(meter.spec, clock=clock)
    again.set_state(state)              # --resume: what ran before the interruption is kept
    assert again.trial_cost("a")["worker_seconds"] == pytest.approx(40.0)


@pytest.mark.parametrize("over, key, expected", [
    ({"experiment.time_budget_s": 0}, "experiment.time_budget_s", "> 0"),
    ({"experiment.budget": {"gpu_hours": -1}}, "experiment.budget.gpu_hours", "> 0"),
    ({"experiment.stop": {"patience": 0}}, "experiment.stop.patience", ">= 1"),
    ({"experiment.stop": {"min_delta": -0.1}}, "experiment.stop.min_delta", ">= 0"),
    ({"experiment.stop": {"target": 1}}, "experiment.stop.target", "one of the keys"),
])
def test_bad_completion_settings_name_the_key(over, key, expected):
    with pytest.raises(SpaceError) as e:
        _spec(**over)
    assert e.value.key == key and expected in e.value.expected


# ----------------------------------------------------------------------------- real experiments

def _run(ray_cluster, tmp_path, over):
    from tuning.driver.experiment import run_experiment

    spec = _spec(**{"experiment.max_concurrent_trials": 1, "experiment.scheduler": {"name": "fifo"},
                    "space.optim.base_lr": {"loguniform": [0.02, 0.1]}, **over})
    uri = sqlite_store(tmp_path / "mlflow.db")
    return spec, run_experiment(spec, storage=str(tmp_path / "r"), tracking_uri=uri, address=ray_cluster.address,
                                out=lambda line: None, register_model=False), uri


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_target_ends_a_real_experiment_of_2_worker_trials_and_costs_are_tagged(ray_cluster, tmp_path):
    import mlflow

    from tuning.analysis.report import results_table

    spec, result, uri = _run(ray_cluster, tmp_path, {
        "experiment.name": "it-target", "experiment.num_samples": 3, "experiment.stop": {"metric_at_least": 0.3},
        "train.scaling.num_workers": 2, "train.scaling.cpus_per_worker": 0.5})
    assert result.ended_by.startswith("target reached: val_acc ") and "at epoch 1" in result.ended_by
    first = result.rows[0]
    assert first.status == "stopped at epoch 1: the experiment ended" and first.epochs == 1
    assert len([r for r in result.rows if r.epochs]) == 1          # no other trial trained
    client = mlflow.MlflowClient(uri)
    tags = client.get_run(first.run_id).data.tags
    assert tags["schedtune.status"] == first.status
    seconds = float(tags["schedtune.cost.worker_seconds"]) / 2     # 2 workers
    assert first.cost["worker_seconds"] >= 2 * seconds * (1 - 1e-4)   # the tag: up to when its run was closed
    assert seconds > 0 and float(tags["schedtune.cost.gpu_hours"]) == 0
    assert float(tags["schedtune.cost.cpu_hours"]) == pytest.approx(1.25 * seconds / 3600, rel=1e-4)  # 2 x 0.5 + 0.25
    parent = client.get_run(result.parent_run_id).data.tags
    assert float(parent["schedtune.cost.worker_seconds"]) == pytest.approx(
        sum(r.cost["worker_seconds"] for r in result.rows), rel=1e-4)
    assert parent["schedtune.ended_by"] == result.ended_by
    table = results_table(result, spec)
    assert f"ended by: {result.ended_by}" in table and "| worker-s |" in table
    with open(client.download_artifacts(result.parent_run_id, "results.md")) as f:
        assert f"ended by: {result.ended_by}" in f.read()


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_cpu_hour_budget_stops_launching_trials(ray_cluster, tmp_path):
    """0.001 CPU-hours is 7.2 s of a 0.5-CPU trial; 20 trials take far more (each starts a process).
    A trial still starting when it is spent counts until the experiment ends."""
    spec, result, _ = _run(ray_cluster, tmp_path, {
        "experiment.name": "it-budget", "experiment.num_samples": 20, "experiment.budget": {"cpu_hours": 0.001},
        "train.epochs": 2, "train.scaling.num_workers": 1, "train.scaling.cpus_per_worker": 0.5})
    assert result.ended_by.startswith("budget spent: ") and "of experiment.budget.cpu_hours 0.001" in result.ended_by
    assert result.cost["cpu_hours"] >= 0.001
    assert len(result.rows) < 20
