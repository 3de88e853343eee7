"""Warm start read from MLflow (tuning.tracking.warm_start): an earlier experiment's best completed
trials, in this space's terms; spaces that do not fit are refused naming the key, and a warm
start that cannot be is an error before Ray starts. Runs are written the way the tracker writes
them (flattened-config params, status tags, best_<metric>), into a sqlite store of the test's own."""
from __future__ import annotations

import copy

import pytest

from tests.conftest import sqlite_store
from tuning.spec import SpaceError, load_spec
from tuning.tracking import schema
from tuning.tracking.entities import param
from tuning.tracking.warm_start import load_warm_start

SCHEDULES = [{"name": "cosine"}, {"name": "step", "milestones": [0.5, 0.75], "gamma": 0.1}]
NEW = {
    "experiment": {"name": "new", "num_samples": 4, "warm_start": {"from": "earlier", "top_k": 2}},
    "train": {"epochs": 2, "scaling": {"num_workers": 4, "batch_per_worker": 32},
              "optim": {"base_lr": 0.1, "reference_batch": 64, "lr_scaling": "linear"}},
    "space": {"optim.base_lr": {"loguniform": [1e-3, 1.0]}, "schedule": {"choice": SCHEDULES}},
}
# (trial, status, base_lr, schedule, best val_acc, last num_params)
EARLIER = [("t0", "completed", 0.05, SCHEDULES[0], 0.91, 100.0),
           ("t1", "completed", 0.30, SCHEDULES[1], 0.95, 300.0),
           ("t2", "stopped by ASHA at epoch 1", 0.20, SCHEDULES[0], 0.97, 200.0),   # not completed: left out
           ("t3", "completed", 2.00, SCHEDULES[0], 0.96, 400.0),                     # base_lr outside the new range
           ("t4", "diverged", 0.90, SCHEDULES[1], None, None),
           ("t5", "completed", 0.01, SCHEDULES[1], 0.80, 50.0)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite MLflow store holding experiment ``earlier``: 2-worker trials of the quickstart's kind."""
    import mlflow

    from training.config import TrainConfig

    root = tmp_path_factory.mktemp("warm")
    uri = sqlite_store(root / "mlflow.db")
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("earlier", artifact_location=str(root / "artifacts"))
    parent = client.create_run(exp, tags={schema.ROLE: schema.ROLE_EXPERIMENT}).info.run_id
    client.log_batch(parent, params=[param(schema.PARAM_METRIC, "val_acc"), param(schema.PARAM_MODE, "max")])
    for trial, status, lr, schedule, best, size in EARLIER:
        cfg = TrainConfig.from_dict({"epochs": 3, "optim": {"base_lr": lr, "reference_batch": 64, "lr_scaling": "linear"},
                                     "schedule": schedule,
                                     "scaling": {"num_workers": 2, "batch_per_worker": 32}})
        run = client.create_run(exp, tags={schema.PARENT_RUN_ID: parent, schema.TRIAL_ID: trial,
                                           schema.STATUS: status}).info.run_id
        client.log_batch(run, params=[param(k, v) for k, v in cfg.flat().items()])
        if best is not None:
            client.log_metric(run, "best_val_acc", best)
            client.log_metric(run, "val_acc", best - 0.01)
            client.log_metric(run, "num_params", size)
    return uri


def new_spec(**experiment):
    doc = copy.deepcopy(NEW)
    doc["experiment"].update(experiment)
    return load_spec(doc, file="new.yaml")


def test_the_best_completed_trials_inside_the_space_come_first_with_their_results(store):
    warm = load_warm_start(new_spec(), store)
    assert warm.trial_ids == ["t1", "t0"]                       # t3 is better but outside; t2 did not complete
    # a choice of sections by its index (Tune would merge a section into the choice's domain)
    assert warm.points == [{"optim.base_lr": 0.30, "schedule": 1}, {"optim.base_lr": 0.05, "schedule": 0}]
    assert [spec_values for spec_values in map(new_spec().decode, warm.points)] == \
        [{"optim.base_lr": 0.30, "schedule": SCHEDULES[1]}, {"optim.base_lr": 0.05, "schedule": SCHEDULES[0]}]
    assert warm.rewards == [0.95, 0.91]                          # the trials' scores (best_val_acc)
    assert warm.dropped == ["trial t3: optim.base_lr = 2.0 is outside loguniform[0.001, 1]"]
    assert "2 completed trials of experiment 'earlier' (t1, t0)" in warm.describe()


def test_base_lr_stays_per_reference_batch_so_a_4_worker_search_scales_it_itself(store):
    """The earlier trials ran 2 x 32 samples a step, the new ones 4 x 32: the warm point keeps
    base_lr (per reference batch of 64), and the new trial's peak LR is twice the old one's."""
    from training.schedules import peak_lr

    spec = new_spec()
    warm = load_warm_start(spec, store)
    new_cfg = spec.trial_config(warm.points[0])
    assert new_cfg.optim.base_lr == 0.30 and new_cfg.scaling.global_batch == 128
    assert new_cfg.schedule.name == "step"
    assert peak_lr(new_cfg.optim, 128) == pytest.approx(0.60) and peak_lr(new_cfg.optim, 64) == pytest.approx(0.30)


def test_optuna_gets_choices_as_indices_and_every_objective(store):
    spec = new_spec(search="optuna_tpe", warm_start={"from": "earlier", "top_k": 3})
    warm = load_warm_start(spec, store)
    assert [p["schedule"] for p in warm.points] == [1, 0, 1]      # optuna searches a choice of sections by index
    multi = new_spec(search="optuna_nsga2", metrics=[{"name": "val_acc", "mode": "max"},
                                                     {"name": "num_params", "mode": "min"}])
    assert load_warm_start(multi, store).rewards == [[0.95, 300.0], [0.91, 100.0]]


def test_optuna_starts_its_study_with_the_warm_trials_and_does_not_rerun_them(store):
    from tuning.driver.search import searcher, to_tune

    spec = new_spec(search="optuna_tpe")
    warm = load_warm_start(spec, store)
    s = searcher(spec, limit=2, warm=warm)
    s.set_search_properties("val_acc", "max", to_tune(spec))
    study = s.searcher._ot_study
    assert [(t.params["optim.base_lr"], t.params["schedule"], t.value) for t in study.trials] == \
        [(0.30, 1, 0.95), (0.05, 0, 0.91)]
    first = s.suggest("new-1")
    assert (first["optim.base_lr"], first["schedule"]) not in [(0.30, 1), (0.05, 0)]


def test_random_search_runs_the_warm_points_first(store):
    from tuning.driver.search import searcher, to_tune

    spec = new_spec()
    gen = searcher(spec, limit=10, warm=load_warm_start(spec, store))
    gen.add_configurations({"new": {"run": lambda config: None, "config": to_tune(spec), "num_samples": 4}})
    configs = [gen.next_trial().config for _ in range(4)]
    assert [(c["optim.base_lr"], c["schedule"]) for c in configs[:2]] == [(0.30, 1), (0.05, 0)]
    assert spec.trial_config(configs[0]).schedule.to_dict().items() >= SCHEDULES[1].items()
    assert all(1e-3 <= c["optim.base_lr"] <= 1.0 for c in configs[2:])


def test_a_warm_start_that_cannot_be_is_refused_naming_the_key(store, tmp_path):
    with pytest.raises(SpaceError) as e:
        load_warm_start(new_spec(warm_start={"from": "nowhere"}), store)
    assert (e.value.file, e.value.key) == ("new.yaml", "experiment.warm_start.from")
    assert f"an earlier schedtune experiment in MLflow at {store} (there is none of that name)" in e.value.expected
    # a key the earlier trials never had: the user's model's own argument (their mlp had no model.args)
    (tmp_path / "mymodels.py").write_text("def wide(width=8, num_classes=10):\n    pass\n")
    doc = copy.deepcopy(NEW)
    doc["train"]["model"] = {"name": "mymodels:wide"}
    doc["space"]["model.args.width"] = {"choice": [4, 8]}
    with pytest.raises(SpaceError) as e:
        load_warm_start(load_spec(doc, file="new.yaml", code_dir=tmp_path), store)
    assert e.value.key == "space.model.args.width" and "the space does not fit" in e.value.expected
    # every completed trial outside the new range: nothing to start from
    doc = copy.deepcopy(NEW)
    doc["space"]["optim.base_lr"] = {"loguniform": [1e-4, 1e-3]}
    with pytest.raises(SpaceError) as e:
        load_warm_start(load_spec(doc, file="new.yaml"), store)
    assert e.value.key == "experiment.warm_start.from" and "a completed trial inside this space" in e.value.expected
    assert "trial t1: optim.base_lr = 0.3 is outside loguniform[0.0001, 0.001]" in e.value.expected


def test_the_refusal_comes_before_ray_starts(store, tmp_path):
    import ray

    from tuning.driver.experiment import run_experiment

    spec = new_spec(warm_start={"from": "nowhere"})
    with pytest.raises(SpaceError, match="there is none of that name"):
        run_experiment(spec, storage=str(tmp_path), tracking_uri=store, address="local")
    assert not ray.is_initialized()
    assert not any(tmp_path.iterdir())   # nothing written
