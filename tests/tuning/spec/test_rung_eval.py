"""``experiment.scheduler.rung_eval: cooldown``: validated with the experiment section (ASHA only,
a metric a fork measures, a fork length in (0, 1]), and every trial's config carries the forks at
ASHA's rung epochs (``train.rung_eval``)."""
import pytest

from tests.conftest import ROOT
from training.cooldown import METRICS
from tuning.spec import SpaceError, load_spec
from tuning.spec.options import COOLDOWN_METRICS, rung_metric

QUICK = ROOT / "search_spaces/quickstart.yaml"
COOLDOWN = {"name": "asha", "grace_period": 1, "reduction_factor": 3, "rung_eval": "cooldown",
            "cooldown_fraction": 0.2}


def test_every_trial_forks_at_the_rung_epochs_before_the_last():
    spec = load_spec(QUICK, {"train.epochs": 9, "experiment.scheduler": COOLDOWN})
    cfg = spec.trial_config({"optim.base_lr": 0.3})
    assert (cfg.rung_eval.epochs, cfg.rung_eval.cooldown_fraction, cfg.optim.base_lr) == ([1, 3], 0.2, 0.3)
    plain = load_spec(QUICK, {"train.epochs": 9})
    assert plain.options.scheduler.rung_eval == "plain" and plain.trial_config({}).rung_eval.epochs == []


def test_the_metrics_asha_reads_are_those_a_fork_reports():
    assert {rung_metric(m) for m in COOLDOWN_METRICS} | {"fork_steps"} == set(METRICS)


@pytest.mark.parametrize("overrides,key,expected", [
    ({"experiment.scheduler": {"name": "fifo", "rung_eval": "cooldown"}}, "experiment.scheduler.rung_eval",
     "plain with name: fifo"),
    ({"experiment.scheduler": {**COOLDOWN, "cooldown_fraction": 0.0}}, "experiment.scheduler.cooldown_fraction",
     "a number in (0, 1]"),
    ({"experiment.scheduler": {**COOLDOWN, "rung_eval": "decay"}}, "experiment.scheduler.rung_eval",
     "one of 'plain', 'cooldown'"),
    ({"experiment.scheduler": COOLDOWN, "experiment.metric": "train_loss", "experiment.mode": "min"},
     "experiment.scheduler.rung_eval", "plain with metric: train_loss"),
    ({"train.rung_eval": {"epochs": [3, 1]}}, "train.rung_eval.epochs", "increasing epoch numbers"),
])
def test_bad_rung_eval_settings_name_the_key(overrides, key, expected):
    with pytest.raises(SpaceError) as e:
        load_spec(QUICK, overrides)
    assert e.value.key == key and expected in e.value.expected, str(e.value)
