"""The search keys of issue 16's last items: experiment.metrics (multi-objective, NSGA-II),
experiment.warm_start and experiment.repeats. Each bad value names the file and the key, and
nothing starts; the good ones change what the searcher and the trials get."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml

from tuning.driver.search import searcher, to_tune, tune_num_samples
from tuning.spec import SpaceError, load_spec, total_trials
from tuning.spec.checks import nsga2_population
from tuning.spec.options import REPEAT_INDEX

GOOD = {
    "experiment": {"name": "t", "num_samples": 4},
    "train": {"epochs": 2, "seed": 7, "model": {"name": "mlp", "hidden": [32]}},
    "space": {"optim.base_lr": {"loguniform": [1e-3, 1.0]}, "model.hidden": {"choice": [[8], [32]]}},
}
TWO = [{"name": "val_acc", "mode": "max"}, {"name": "num_params", "mode": "min"}]


def spec_with(**experiment):
    doc = copy.deepcopy(GOOD)
    doc["experiment"].update(experiment)
    return load_spec(doc, file="f.yaml")


@pytest.mark.parametrize("experiment, key, expected", [
    ({"metrics": [{"name": "val_acc", "mode": "max"}, {"name": "val_acc", "mode": "max"}]},
     "experiment.metrics[1].name", "not already in metrics"),
    ({"metrics": [{"name": "val_acc"}]}, "experiment.metrics[0].mode", "one of 'max', 'min'"),
    ({"metrics": TWO, "metric": "val_loss"}, "experiment.metric", "the first of metrics"),
    ({"metrics": TWO, "mode": "min"}, "experiment.mode", "the first of metrics"),
    ({"metrics": [TWO[0], {"name": "num_parms", "mode": "min"}]}, "experiment.metrics[1].name", "did you mean 'num_params'"),
    ({"metrics": [TWO[0], {"name": "num_params", "mode": "max"}]}, "experiment.metrics[1].mode", "min for num_params"),
    ({"metrics": [{"name": "val_loss", "mode": "max"}]}, "experiment.metrics[0].mode", "min for val_loss"),
    ({"metrics": TWO, "scheduler": {"name": "pbt"}}, "experiment.metrics", "one metric with scheduler pbt"),
    ({"repeats": 0}, "experiment.repeats", ">= 1"),
    ({"repeats": 2, "scheduler": {"name": "pbt"}}, "experiment.repeats", "1 with scheduler pbt"),
    ({"repeats": 2, "metrics": TWO}, "experiment.repeats", "1 with several metrics"),
    ({"warm_start": {"from": "a", "top_k": 0}}, "experiment.warm_start.top_k", ">= 1"),
    ({"warm_start": {"form": "a"}}, "experiment.warm_start.form", "one of the keys ['from', 'top_k']"),
    ({"warm_start": {"from": "a/b"}}, "experiment.warm_start.from", "no slashes"),
    ({"warm_start": {"from": "t"}}, "experiment.warm_start.from", "another experiment than this one"),
    ({"warm_start": {"from": "a"}, "search": "grid"}, "experiment.warm_start.from", "unset with search: grid"),
    ({"search": "nsga2"}, "experiment.search", "'optuna_nsga2'"),
])
def test_a_bad_search_key_names_the_file_and_the_key(experiment, key, expected):
    with pytest.raises(SpaceError) as e:
        spec_with(**experiment)
    assert e.value.file == "f.yaml" and e.value.key == key, str(e.value)
    assert expected in e.value.expected, str(e.value)


def test_repeats_cannot_search_the_seed_they_set():
    doc = copy.deepcopy(GOOD)
    doc["experiment"]["repeats"] = 3
    doc["space"]["seed"] = {"choice": [1, 2]}
    with pytest.raises(SpaceError) as e:
        load_spec(doc, file="f.yaml")
    assert e.value.key == "space.seed" and "each repeat sets train.seed" in e.value.expected


def test_metrics_set_metric_and_mode_and_name_each_objective():
    spec = spec_with(metrics=[{"name": "val_loss", "mode": "min"}, {"name": "epoch_time_s", "mode": "min"}])
    o = spec.options
    assert (o.metric, o.mode, o.multi_objective) == ("val_loss", "min", True)
    assert [(m.name, m.mode) for m in o.objectives] == [("val_loss", "min"), ("epoch_time_s", "min")]
    assert "objectives: val_loss (min), epoch_time_s (min)" in spec.describe()
    single = spec_with()
    assert [(m.name, m.mode) for m in single.options.objectives] == [("val_acc", "max")]
    assert not single.options.multi_objective


def test_nsga2_searches_every_objective_with_a_population_of_a_quarter_of_the_samples():
    import optuna

    spec = spec_with(metrics=TWO, search="optuna_nsga2", num_samples=40)
    s = searcher(spec, limit=2)
    assert s.set_search_properties("val_acc", "max", to_tune(spec))   # what Tune does with TuneConfig's metric
    inner = s.searcher
    assert isinstance(inner._sampler, optuna.samplers.NSGAIISampler)
    assert inner._sampler._population_size == nsga2_population(40) == 10
    assert (inner.metric, inner.mode) == (["val_acc", "num_params"], ["max", "min"])   # kept its list
    assert inner._ot_study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    assert [nsga2_population(n) for n in (3, 16, 100, 1000)] == [4, 4, 25, 50]


def test_the_nsga2_searcher_pickles_as_tune_pickles_it_and_breeds_the_same_after():
    """Tune pickles the searcher with the experiment (at the Tuner's start and every checkpoint):
    Optuna 5.1's NSGA-II holds a threading.Lock that cannot be pickled. A round trip mid-study, in
    its second generation, leaves what it suggests unchanged."""
    import pickle

    import optuna
    from ray import cloudpickle

    spec = spec_with(metrics=TWO, search="optuna_nsga2", num_samples=16)
    s = searcher(spec, limit=2)
    assert s.set_search_properties("val_acc", "max", to_tune(spec))
    assert pickle.loads(cloudpickle.dumps(s)).searcher._sampler._population_size == 4

    def run(n, sampler):
        study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
        study.optimize(lambda t: (t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1) ** 2), n_trials=n)
        return study, [t.params for t in study.trials]

    from tuning.driver.optuna_samplers import NSGAIISampler
    _, straight = run(12, NSGAIISampler(population_size=4, seed=3))
    study, first = run(6, NSGAIISampler(population_size=4, seed=3))
    study.sampler = pickle.loads(pickle.dumps(study.sampler))
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1) ** 2), n_trials=6)
    assert [t.params for t in study.trials] == straight and first == straight[:6]
    assert NSGAIISampler._GENERATION_KEY == optuna.samplers.NSGAIISampler._GENERATION_KEY


def test_nsga2_with_too_few_samples_for_a_bred_generation_warns():
    spec = spec_with(metrics=TWO, search="optuna_nsga2", num_samples=6)
    assert any(w.key == "experiment.search" and "first generation (4 trials)" in w.why for w in spec.warnings)


def test_random_repeats_hold_each_sample_and_give_every_repeat_its_seed():
    from ray.tune.search.basic_variant import BasicVariantGenerator

    spec = spec_with(repeats=3, num_samples=2)
    assert total_trials(spec) == 6 and tune_num_samples(spec) == 2   # the repeat grid is not a sample
    gen = searcher(spec, limit=10)   # no more than `limit` live trials: all six here
    assert isinstance(gen, BasicVariantGenerator)
    gen.add_configurations({"t": {"run": lambda config: None, "config": to_tune(spec),
                                  "num_samples": tune_num_samples(spec)}})
    configs = []
    while (t := gen.next_trial()) is not None:
        configs.append(t.config)
    assert len(configs) == 6
    assert [c[REPEAT_INDEX] for c in configs] == [0, 1, 2, 0, 1, 2]
    samples = [(c["optim.base_lr"], c["model.hidden"]) for c in configs]
    assert samples[0] == samples[1] == samples[2] != samples[3] == samples[4] == samples[5]
    assert [spec.trial_config(c).seed for c in configs] == [7, 8, 9, 7, 8, 9]
    assert spec.trial_config(configs[0]).optim.base_lr == configs[0]["optim.base_lr"]


def test_optuna_repeats_are_repeated_suggestions_and_optuna_hears_their_mean():
    from ray.tune.search import Repeater

    spec = spec_with(repeats=2, num_samples=3, search="optuna_tpe")
    assert total_trials(spec) == 6 and tune_num_samples(spec) == 6   # Tune counts the Repeater's trials
    s = searcher(spec, limit=4)
    s.set_search_properties("val_acc", "max", to_tune(spec))
    repeater = s.searcher
    assert isinstance(repeater, Repeater)
    a, b = s.suggest("a"), s.suggest("b")
    assert a[REPEAT_INDEX] == 0 and b[REPEAT_INDEX] == 1
    assert {k: v for k, v in a.items() if k != REPEAT_INDEX} == {k: v for k, v in b.items() if k != REPEAT_INDEX}
    s.on_trial_complete("a", {"val_acc": 0.5})
    s.on_trial_complete("b", {"val_acc": 0.7})
    study = repeater.searcher._ot_study
    assert [t.value for t in study.trials if t.value is not None] == [pytest.approx(0.6)]


def test_validate_prints_the_new_keys_and_refuses_a_bad_one_with_exit_2(tmp_path):
    good = copy.deepcopy(GOOD)
    good["experiment"].update(repeats=2, warm_start={"from": "earlier", "top_k": 3})
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(good))
    p = subprocess.run([sys.executable, "-m", "tuning.cli", "validate", str(path)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "repeats: 2 seeds per config (train.seed + 0..1)" in p.stdout
    assert "warm start: the best 3 completed trials of experiment 'earlier'" in p.stdout
    good["experiment"]["repeats"] = -1
    path.write_text(yaml.safe_dump(good))
    p = subprocess.run([sys.executable, "-m", "tuning.cli", "validate", str(path)], capture_output=True, text=True)
    assert p.returncode == 2 and f"{path}: experiment.repeats: got -1, expected >= 1" in p.stderr


def test_optuna_repeats_survive_a_resume_mid_group(tmp_path):
    """Ray's Repeater saves only the searcher it wraps: restored, it would fail on the first repeat
    that ends. schedtune's keeps its groups, so the group's mean still reaches Optuna."""
    spec = spec_with(repeats=2, num_samples=3, search="optuna_tpe")

    def fresh():
        s = searcher(spec, limit=4)
        s.set_search_properties("val_acc", "max", to_tune(spec))
        return s

    s = fresh()
    s.suggest("a"), s.suggest("b")
    s.on_trial_complete("a", {"val_acc": 0.5})
    s.save_to_dir(str(tmp_path))                 # what Tune does with the experiment's state
    restored = fresh()
    restored.restore_from_dir(str(tmp_path))
    restored.on_trial_complete("b", {"val_acc": 0.9})
    study = restored.searcher.searcher._ot_study
    assert [t.value for t in study.trials if t.value is not None] == [pytest.approx(0.7)]
    c = restored.suggest("c")
    assert c[REPEAT_INDEX] == 0                  # the next config's first repeat
