"""PBT over schedtune's trials: the scheduler against a stand-in for Tune's controller (exploit,
explore, the record of each perturbation, the limit of running trials, its state across --resume),
then real experiments of 1-worker and 2-worker trials on a local Ray cluster, tracked in MLflow,
where the `lr` metric of a perturbed trial changes at the perturbation by the factor applied."""
from __future__ import annotations

import json
import pickle
from types import SimpleNamespace

import pytest

from tests.conftest import ROOT, sqlite_store
from tuning.spec import SpaceError, load_spec

QUICK = ROOT / "search_spaces/quickstart.yaml"
PBT = {"name": "pbt", "perturbation_interval": 1, "quantile": 0.5, "resample_probability": 0.0,
       "hyperparam_mutations": ["optim.base_lr"], "synch": True}
LR_RANGE = [1.0e-3, 0.3]


def _spec(**over):
    return load_spec(QUICK, {"experiment.scheduler": PBT, "space.optim.base_lr": {"loguniform": LR_RANGE},
                             "train.epochs": 3, **over})


class FakeTrial:
    """What Tune's PBT reads and writes of a trial."""

    def __init__(self, trial_id: str, lr: float, tmp):
        from ray.tune.experiment import Trial

        self.trial_id, self.config, self.status = trial_id, {"optim.base_lr": lr, "model.dropout": 0.1}, Trial.PENDING
        self.experiment_tag, self.evaluated_params, self.last_result = trial_id, {}, {}
        self.checkpoint = f"checkpoint-of-{trial_id}"
        self.local_experiment_path = self.local_dir = str(tmp)
        self.temporary_state = SimpleNamespace(saving_to=None)
        self.run_metadata = SimpleNamespace(checkpoint_manager=SimpleNamespace(
            checkpoint_config=SimpleNamespace(num_to_keep=None), _latest_checkpoint_result=None))

    def is_finished(self):
        return self.status in ("TERMINATED", "ERROR")

    def set_status(self, status):
        self.status = status

    def set_experiment_tag(self, tag):
        self.experiment_tag = tag

    def set_config(self, config):
        self.config = config


class FakeController:
    def __init__(self, trials):
        self.trials, self.search_alg = trials, None

    def get_trials(self):
        return self.trials

    def get_live_trials(self):
        return [t for t in self.trials if not t.is_finished()]

    def pause_trial(self, trial, should_checkpoint=True):
        trial.status = "PAUSED"

    def _schedule_trial_save(self, trial, result=None):
        return trial.checkpoint


def test_pbt_holds_the_population_to_the_limit_exploits_records_and_survives_a_restore(tmp_path):
    from ray.tune.schedulers import TrialScheduler

    from tuning.driver.trial_schedulers import PBTState, RecordingPBT, make_scheduler

    spec = _spec()
    pbt, callbacks = make_scheduler(spec, limit=1)
    assert isinstance(pbt, RecordingPBT) and [type(c) for c in callbacks] == [PBTState]
    pbt.set_search_properties(spec.options.metric, spec.options.mode)   # what the Tuner does
    pickled_at_start = pickle.dumps((pbt, callbacks))
    good, bad = FakeTrial("t_good", 0.05, tmp_path), FakeTrial("t_bad", 0.002, tmp_path)
    tc = FakeController([])
    for t in (good, bad):   # Tune lists a trial, then tells the scheduler
        tc.trials.append(t)
        pbt.on_trial_add(tc, t)
    assert (good.status, bad.status) == ("PENDING", "PAUSED")      # only `limit` may run: the rest wait
    good.status = "RUNNING"
    assert pbt.choose_trial_to_run(tc) is None                       # the slot is taken
    # synch: the first to reach the interval waits; once both have, the bottom one clones the top one.
    assert pbt.on_trial_result(tc, good, {"epoch": 1, "val_acc": 0.9}) == TrialScheduler.PAUSE
    good.status = "PAUSED"
    assert pbt.choose_trial_to_run(tc) is bad                        # least trained first
    bad.status = "RUNNING"
    pbt.on_trial_result(tc, bad, {"epoch": 1, "val_acc": 0.2})
    assert bad.status == "PAUSED" and bad.run_metadata.checkpoint_manager._latest_checkpoint_result.checkpoint \
        == "checkpoint-of-t_good"                                    # exploit: restarts from the top trial's
    [(trial_id, record)] = pbt.records
    factor = record["factors"]["optim.base_lr"]
    assert trial_id == "t_bad" and factor in (1.2, 0.8)
    assert record == {"epoch": 1, "from_trial": "t_good", "from_epoch": 1, "old": {"optim.base_lr": 0.002},
                      "from_values": {"optim.base_lr": 0.05}, "new": {"optim.base_lr": pytest.approx(0.05 * factor)},
                      "operations": {"optim.base_lr": f"* {factor}"}, "factors": {"optim.base_lr": factor}}
    # explore: only the mutated key changes
    assert bad.config == {"optim.base_lr": pytest.approx(0.05 * factor), "model.dropout": 0.1}
    assert pbt.on_trial_result(tc, good, {"epoch": 3, "val_acc": 0.95}) == TrialScheduler.CONTINUE  # last epoch

    told = []
    callbacks[0].on_perturbation = lambda tid, tags: told.append((tid, tags))
    callbacks[0].on_trial_result(0, [], bad, {})
    [(tid, tags)] = told
    assert tid == "t_bad" and tags["schedtune.pbt.perturbations"] == "1"
    assert json.loads(tags["schedtune.pbt.perturbation.1"])["from_trial"] == "t_good"
    state = pickle.loads(pickle.dumps(callbacks[0].get_state()))

    def restored(with_state: bool):
        pbt2, callbacks2 = pickle.loads(pickled_at_start)   # what Tune rebuilds on --resume
        if with_state:
            callbacks2[0].set_state(state)
        g, b = FakeTrial("t_good", 0.05, tmp_path), FakeTrial("t_bad", 0.05 * factor, tmp_path)
        for t in (g, b):
            pbt2.on_trial_add(FakeController([g, b]), t)
        return pbt2, callbacks2[0], pbt2._trial_state[g]

    pbt2, cb2, g2 = restored(with_state=False)
    assert pbt2.records == [] and g2.last_score is None and g2.last_perturbation_time == 0   # what Tune alone keeps
    pbt2, cb2, g2 = restored(with_state=True)
    assert pbt2.records == pbt.records and cb2.told == 1                  # no perturbation logged twice
    assert (g2.last_score, g2.last_perturbation_time, g2.last_train_time) == (0.9, 1, 1)


def test_perturbed_values_stay_in_the_space_and_choices_shift():
    from tuning.driver.trial_schedulers import clip_to_space, pbt_mutations, pbt_spec

    spec = _spec(**{"experiment.scheduler": {**PBT, "hyperparam_mutations": []}, "train.checkpoint.every_epochs": 4,
                    "experiment.scheduler.perturbation_interval": 6})
    mutations = pbt_mutations(spec)
    assert set(mutations) == set(spec.space)                           # []: every key of the space
    assert mutations["schedule"] == list(spec.space["schedule"].args)  # a choice shifts among its values
    assert clip_to_space(spec, {"optim.base_lr": 0.29 * 1.2, "model.dropout": -0.1, "x": 7}) == {
        "optim.base_lr": 0.3, "model.dropout": 0.0, "x": 7}
    assert pbt_spec(spec).base.checkpoint.every_epochs == 2            # gcd(4, 6): a checkpoint at each interval


@pytest.mark.parametrize("over, key, expected", [
    ({"experiment.scheduler": {**PBT, "hyperparam_mutations": ["optim.momentum"]}},
     "experiment.scheduler.hyperparam_mutations[0]", "a key of space"),
    ({"experiment.scheduler": {**PBT, "hyperparam_mutations": ["optim.nope"]}},
     "experiment.scheduler.hyperparam_mutations[0]", "a dotted path into train"),
    ({"experiment.search": "optuna_tpe"}, "experiment.scheduler.name", "search: random or grid with pbt"),
    ({"experiment.scheduler": {**PBT, "quantile": 0.7}}, "experiment.scheduler.quantile", "in (0, 0.5]"),
    ({"experiment.scheduler": {**PBT, "perturbation_factors": []}}, "experiment.scheduler.perturbation_factors",
     "a non-empty list of numbers > 0"),
])
def test_bad_pbt_settings_name_the_key(over, key, expected):
    from tuning.spec.options import check_against_space

    with pytest.raises(SpaceError) as e:
        spec = _spec(**over)
        check_against_space(spec.file, spec.options, spec.space)
    assert e.value.key == key and expected in e.value.expected


# ----------------------------------------------------------------------------- real experiments

def _run_pbt(ray_cluster, tmp_path, workers: int):
    from tuning.driver.experiment import run_experiment

    spec = _spec(**{"experiment.name": f"it-pbt-{workers}w", "experiment.num_samples": 2, "train.epochs": 2,
                    "experiment.max_concurrent_trials": 1, "train.scaling.num_workers": workers,
                    "train.schedule": {"name": "constant", "warmup": "none"},
                    "space.schedule": {"choice": [{"name": "constant"}]},
                    "space.model.dropout": {"uniform": [0.0, 0.01]}})
    uri = sqlite_store(tmp_path / "mlflow.db")
    result = run_experiment(spec, storage=str(tmp_path / "r"), tracking_uri=uri, address=ray_cluster.address,
                            out=lambda line: None, register_model=False)
    return spec, result, uri


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("workers", [2, 1])
def test_a_perturbed_trial_trains_at_the_new_lr_from_the_exploited_checkpoint(ray_cluster, tmp_path, workers):
    """2 trials, 2 epochs, one slot: after epoch 1 the worse trial restarts from the better one's
    checkpoint with its LR times 1.2 or 0.8, and its epoch 2 reports that LR (the donor's, times the factor)."""
    import mlflow

    spec, result, uri = _run_pbt(ray_cluster, tmp_path, workers)
    assert sorted(r.status for r in result.rows) == ["completed", "completed"]
    client = mlflow.MlflowClient(uri)
    runs = {r.trial_id: client.get_run(r.run_id) for r in result.rows}
    perturbed = [t for t, run in runs.items() if "schedtune.pbt.perturbations" in run.data.tags]
    assert len(perturbed) == 1, {t: run.data.tags for t, run in runs.items()}
    [trial] = perturbed
    tags = runs[trial].data.tags
    assert tags["schedtune.pbt.perturbations"] == "1"
    record = json.loads(tags["schedtune.pbt.perturbation.1"])
    donor, factor = record["from_trial"], record["factors"]["optim.base_lr"]
    assert record["epoch"] == record["from_epoch"] == 1 and donor in runs and donor != trial
    assert factor in (1.2, 0.8) and LR_RANGE[0] <= record["new"]["optim.base_lr"] <= LR_RANGE[1]

    def lr(trial_id):
        return {m.step: m.value for m in client.get_metric_history(runs[trial_id].info.run_id, "lr")}

    scale = spec.base.scaling.global_batch / spec.base.optim.reference_batch if workers == 2 else \
        spec.base.scaling.batch_per_worker / spec.base.optim.reference_batch      # the linear scaling rule
    assert lr(trial)[1] == pytest.approx(record["old"]["optim.base_lr"] * scale)   # its own LR before
    assert lr(donor)[1] == pytest.approx(record["from_values"]["optim.base_lr"] * scale)
    assert lr(trial)[2] == pytest.approx(lr(donor)[1] * factor)                    # at once, by the factor
    assert float(runs[trial].data.params["optim.base_lr"]) == pytest.approx(record["old"]["optim.base_lr"])
    # it trained on from the donor's weights: its epoch 2 is at least as good as the donor's epoch 1, far
    # better than its own epoch 1
    acc = {m.step: m.value for m in client.get_metric_history(runs[trial].info.run_id, "val_acc")}
    donor_acc = {m.step: m.value for m in client.get_metric_history(runs[donor].info.run_id, "val_acc")}
    assert acc[2] > acc[1] and acc[2] >= donor_acc[1] - 0.05
