"""results: moved from the former test_tuning_units.py grab-bag."""
from __future__ import annotations


import pytest

from tests.conftest import ROOT
from tuning.analysis.results import end_state, training_metrics

QUICK = ROOT / "search_spaces/quickstart.yaml"
QUICK = ROOT / "search_spaces/quickstart.yaml"


@pytest.mark.parametrize("last,errored,expected", [
    ({"epoch": 6}, False, "completed"),
    ({"epoch": 2}, False, "stopped by ASHA at epoch 2"),
    ({"epoch": 6, "diverged": 1.0}, False, "diverged"),
    ({"epoch": 3}, True, "failed"),
])
def test_end_state(last, errored, expected):
    assert end_state(last, errored, epochs=6, scheduler="asha") == expected


def test_training_metrics_drop_bookkeeping_and_non_finite():
    r = {"val_acc": 0.9, "epoch": 3, "timestamp": 1, "val_loss": float("inf"), "config": {}, "done": False,
         "lr": 0.1}
    assert training_metrics(r) == {"val_acc": 0.9, "lr": 0.1}


def test_a_failed_trials_error_is_its_own_exception_not_rays_wrapper():
    from tuning.analysis.results import error_summary

    wrapped = RuntimeError("ray::ImplicitFunc.train() (pid=1, ip=127.0.0.1)\n  File \"trial.py\", line 3, in fit\n"
                           "    raise X\ntuning.driver.trial.WorkerGroupStartError: it needs 2 workers x 0.5 CPU: missing 0.25 CPU")
    assert error_summary(wrapped) == "WorkerGroupStartError: it needs 2 workers x 0.5 CPU: missing 0.25 CPU"
    assert error_summary(ValueError("no type prefix here")) == "no type prefix here"
