"""HyperBand and the median stopping rule as `scheduler` choices: how they are built from the spec,
and real experiments of 1-worker trials on a local Ray cluster, where they stop the trials they should."""
from __future__ import annotations

import pytest

from tests.conftest import ROOT, sqlite_store
from tuning.spec import load_spec

QUICK = ROOT / "search_spaces/quickstart.yaml"


def test_hyperband_and_median_are_built_in_epochs_from_the_spec():
    from ray.tune.schedulers import HyperBandScheduler, MedianStoppingRule

    from tuning.analysis.results import end_state
    from tuning.driver.trial_schedulers import make_scheduler

    hb, callbacks = make_scheduler(load_spec(QUICK, {"train.epochs": 9, "experiment.scheduler": {
        "name": "hyperband", "reduction_factor": 3}}))
    assert isinstance(hb, HyperBandScheduler) and callbacks == []
    assert (hb._time_attr, hb._max_t_attr, hb._eta, hb._s_max_1) == ("epoch", 9, 3, 3)   # brackets of 9, 3, 1 epochs
    med, callbacks = make_scheduler(load_spec(QUICK, {"experiment.scheduler": {
        "name": "median", "grace_period": 2, "min_samples_required": 4}}))
    assert isinstance(med, MedianStoppingRule) and callbacks == []
    assert (med._time_attr, med._grace_period, med._min_samples_required) == ("epoch", 2, 4)
    assert end_state({"epoch": 2}, False, 9, "hyperband") == "stopped by HyperBand at epoch 2"
    assert end_state({"epoch": 3}, False, 9, "median") == "stopped by the median stopping rule at epoch 3"
    assert end_state({"epoch": 9}, False, 9, "median") == "completed"


def _run(ray_cluster, tmp_path, name, scheduler, lrs, epochs=3):
    from tuning.driver.experiment import run_experiment

    spec = load_spec(QUICK, {
        "experiment.name": name, "experiment.num_samples": 1, "experiment.scheduler": scheduler,
        "experiment.max_concurrent_trials": 1, "train.epochs": epochs, "train.scaling.num_workers": 1,
        "space.optim.base_lr": {"grid": lrs}, "space.schedule": {"choice": [{"name": "cosine"}]}})
    return run_experiment(spec, storage=str(tmp_path / "r"), tracking_uri=sqlite_store(tmp_path / "mlflow.db"),
                          address=ray_cluster.address, out=lambda line: None, register_model=False)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_hyperband_keeps_the_best_third_of_its_bracket(ray_cluster, tmp_path):
    """max_t 3, eta 3: Ray fills a bracket of 2 trials at 3 epochs first (s = 0), then one of 3 trials
    at 1 epoch (s = 1), whose best goes on to 3 epochs and the other two stop."""
    lrs = [0.05, 0.05, 0.05, 1.0e-5, 1.0e-6]
    result = _run(ray_cluster, tmp_path, "it-hyperband", {"name": "hyperband", "reduction_factor": 3}, lrs)
    by_lr = {}
    for r in result.rows:
        by_lr.setdefault(r.params["optim.base_lr"], []).append(r)
    assert [(r.status, r.epochs) for r in by_lr[0.05]] == [("completed", 3)] * 3
    assert [r.status for lr in (1.0e-5, 1.0e-6) for r in by_lr[lr]] == ["stopped by HyperBand at epoch 1"] * 2


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_median_rule_stops_a_trial_below_the_others_median(ray_cluster, tmp_path):
    result = _run(ray_cluster, tmp_path, "it-median", {"name": "median", "grace_period": 1,
                                                       "min_samples_required": 2}, [0.05, 0.04, 1.0e-6])
    by_lr = {r.params["optim.base_lr"]: r for r in result.rows}
    assert by_lr[0.05].status == by_lr[0.04].status == "completed"
    assert by_lr[1.0e-6].status == "stopped by the median stopping rule at epoch 1"
