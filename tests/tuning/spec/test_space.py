"""Search-space files: every shipped file validates; every broken file names file and key."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tuning.driver.search import to_tune
from tuning.spec import SpaceError, grid_size, load_spec

ROOT = Path(__file__).resolve().parents[3]
SHIPPED = sorted((ROOT / "search_spaces").glob("*.yaml"))

GOOD = {
    "experiment": {"name": "t", "metric": "val_acc", "mode": "max", "num_samples": 3},
    "train": {"epochs": 2, "optim": {"base_lr": 0.1}, "schedule": {"name": "cosine", "warmup": "linear",
                                                                    "warmup_epochs": 1}},
    "space": {"optim.base_lr": {"loguniform": [1e-3, 1.0]},
              "schedule": {"choice": [{"name": "step", "gamma": 0.5}, {"name": "constant"}]}},
}


def write(tmp_path, doc, name="space.yaml") -> Path:
    p = tmp_path / name
    p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return p


def with_change(path: str, value):
    """GOOD with one nested key set (path like 'space.optim.base_lr' uses the first two parts)."""
    import copy

    doc = copy.deepcopy(GOOD)
    section, rest = path.split(".", 1)
    if section == "space":
        doc["space"][rest] = value
    else:
        node = doc[section]
        parts = rest.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return doc


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_file_validates(path):
    spec = load_spec(path)
    assert spec.space, "a shipped experiment searches something"
    first = {k: (0 if k in spec.indexed_choices else d.args[0]) for k, d in spec.space.items()}
    for key, dist in spec.space.items():   # every extreme of every entry makes a valid TrainConfig
        for i, v in enumerate(dist.extremes()):
            cfg = spec.trial_config({**first, key: i if key in spec.indexed_choices else v})
            assert type(cfg).from_dict(cfg.to_dict()) == cfg
            if not isinstance(v, dict):
                assert cfg.flat()[key] == v, (key, v)


def test_shipped_set_is_complete():
    assert {p.name for p in SHIPPED} >= {"quickstart.yaml", "large_batch.yaml", "regularization.yaml",
                                         "cifar10_resnet18.yaml"}


BROKEN = [
    ("unknown top-level key", {**GOOD, "spaces": {}}, "spaces", "top-level keys"),
    ("unknown experiment key", with_change("experiment.num_sample", 3), "experiment.num_sample", "one of the keys"),
    ("typo in a dotted path", with_change("space.optim.base_lrr", {"uniform": [0.1, 0.2]}), "space.optim.base_lrr",
     "did you mean 'optim.base_lr'"),
    ("path into a section that does not exist", with_change("space.optimizer.lr", {"uniform": [0, 1]}),
     "space.optimizer.lr", "names a config field"),
    ("low >= high", with_change("space.optim.base_lr", {"uniform": [0.5, 0.1]}), "space.optim.base_lr.uniform",
     "low < high"),
    ("loguniform with 0", with_change("space.optim.base_lr", {"loguniform": [0, 0.1]}),
     "space.optim.base_lr.loguniform", "positive bounds"),
    ("wrong type in train", with_change("train.epochs", "ten"), "train.epochs", "an integer"),
    ("wrong type of bound", with_change("space.optim.base_lr", {"uniform": ["a", 1]}), "space.optim.base_lr.uniform",
     "finite numbers"),
    ("empty choice", with_change("space.model.dropout", {"choice": []}), "space.model.dropout.choice", "non-empty"),
    ("unknown distribution", with_change("space.model.dropout", {"normal": [0, 1]}), "space.model.dropout.normal",
     "one of"),
    ("two distributions", with_change("space.model.dropout", {"uniform": [0, 0.1], "choice": [0]}),
     "space.model.dropout", "a mapping with one of"),
    ("range produces an invalid value", with_change("space.model.dropout", {"uniform": [0.0, 1.5]}),
     "space.model.dropout", "[0, 1)"),
    ("int range for a float-only field stays valid but int for a bool is not",
     with_change("space.scaling.use_gpu", {"int": [0, 1]}), "space.scaling.use_gpu", "true or false"),
    ("choice of sub-config with a bad key", with_change("space.schedule", {"choice": [{"name": "cosine", "gama": 1}]}),
     "space.schedule", "schedule.gama"),
    ("bad scheduler value", with_change("experiment.scheduler", {"name": "asha", "reduction_factor": 1}),
     "experiment.scheduler.reduction_factor", "> 1"),
    ("bad search", with_change("experiment.search", "bayes"), "experiment.search", "one of"),
    ("grid search over a range", with_change("experiment.search", "grid"), "space.optim.base_lr", "grid or choice"),
]


@pytest.mark.parametrize("case,doc,key,expected", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_files_name_file_key_and_expectation(tmp_path, case, doc, key, expected):
    path = write(tmp_path, doc)
    with pytest.raises(SpaceError) as e:
        load_spec(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: {key}"), msg
    assert expected in msg, msg


def test_yaml_syntax_error_names_line(tmp_path):
    path = write(tmp_path, "experiment:\n  name: [unclosed\ntrain: {}\n")
    with pytest.raises(SpaceError, match=r"line \d+, column \d+"):
        load_spec(path)


def test_missing_file(tmp_path):
    with pytest.raises(SpaceError, match="a readable file"):
        load_spec(tmp_path / "nope.yaml")


def test_overrides_are_validated_and_attributed(tmp_path):
    path = write(tmp_path, GOOD)
    assert load_spec(path, {"experiment.num_samples": 7}).options.num_samples == 7
    with pytest.raises(SpaceError, match="train.scaling.num_workers"):
        load_spec(path, {"train.scaling.num_workers": 0})


def test_choice_merges_into_base_section(tmp_path):
    spec = load_spec(write(tmp_path, GOOD))
    cfg = spec.trial_config({"schedule": {"name": "step", "gamma": 0.5}, "optim.base_lr": 0.01})
    assert (cfg.schedule.name, cfg.schedule.gamma, cfg.schedule.warmup) == ("step", 0.5, "linear")
    assert cfg.optim.base_lr == 0.01


def test_random_sampling_is_seeded_and_log_uniform(tmp_path):
    """Tune's sampler with our seed: a rerun samples the same configs; log-uniform spreads decades."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    spec = load_spec(write(tmp_path, with_change("experiment.num_samples", 200)))

    def sample(seed):
        gen = BasicVariantGenerator(random_state=seed)
        gen.add_configurations({"x": {"run": lambda config: None, "config": to_tune(spec), "num_samples": 200}})
        out = []
        while (t := gen.next_trial()) is not None:
            out.append(t.config["optim.base_lr"])
        return out

    a, b, c = sample(0), sample(0), sample(1)
    assert a == b and a != c and len(a) == 200
    below_01 = sum(v < 0.01 for v in a) / len(a)   # log-uniform on [1e-3, 1]: P(< 1e-2) = 1/3
    assert 0.2 < below_01 < 0.47
    assert all(1e-3 <= v <= 1.0 for v in a)


def test_grid_enumerates_and_optuna_indexes_subconfig_choices(tmp_path):
    doc = with_change("experiment.search", "grid")
    doc["space"] = {"optim.base_lr": {"grid": [0.1, 0.01]}, "schedule": {"choice": [{"name": "cosine"}, {"name": "linear"}]}}
    spec = load_spec(write(tmp_path, doc))
    assert grid_size(spec) == 4
    doc["experiment"]["search"] = "optuna_tpe"
    doc["space"]["optim.base_lr"] = {"loguniform": [1e-3, 1e-1]}
    spec = load_spec(write(tmp_path, doc, "o.yaml"))
    assert spec.indexed_choices == {"schedule"}
    assert spec.trial_config({"schedule": 1, "optim.base_lr": 0.01}).schedule.name == "linear"


@pytest.mark.parametrize("doc", [BROKEN[2][1], BROKEN[4][1]])
def test_cli_exits_2_and_starts_no_ray(tmp_path, doc):
    path = write(tmp_path, doc)
    p = subprocess.run([sys.executable, "-m", "tuning.cli", "tune", str(path), "--storage", str(tmp_path / "r")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert p.returncode == 2
    assert str(path) in p.stderr and "space.optim.base_lr" in p.stderr
    assert "Traceback" not in p.stderr
    assert "Ray cluster" not in p.stdout and not (tmp_path / "r").exists()


def test_cli_validate_prints_resolved_space():
    p = subprocess.run([sys.executable, "-m", "tuning.cli", "validate", str(ROOT / "search_spaces/quickstart.yaml")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "optim.base_lr" in p.stdout and "loguniform[0.001, 1]" in p.stdout


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML) reads `1e-4` as a string; schedtune reads it as the number people mean,
    in files and in --set; a quoted '1e-4' stays a string (and is refused where a number goes)."""
    from tuning.cli.args import set_pair as _set_pair

    p = write(tmp_path, "experiment: {name: t, metric: val_acc, mode: max, num_samples: 2}\n"
                        "train: {epochs: 2, optim: {base_lr: 1e-1, weight_decay: 5E-4}}\n"
                        "space: {optim.base_lr: {loguniform: [1e-4, 1e0]}}\n")
    spec = load_spec(p)
    assert (spec.base.optim.base_lr, spec.base.optim.weight_decay) == (0.1, 5e-4)
    assert spec.space["optim.base_lr"].args == (1e-4, 1.0)
    assert _set_pair("train.optim.base_lr=3e-2") == ("train.optim.base_lr", 0.03)
    with pytest.raises(SpaceError, match=r"train.optim.base_lr: got '1e-1'.*a finite number"):
        load_spec(write(tmp_path, p.read_text().replace("base_lr: 1e-1", "base_lr: '1e-1'")))


def test_an_override_outside_the_three_sections_is_an_error_not_ignored():
    with pytest.raises(SpaceError, match="experment.num_samples.*under experiment., train. or space."):
        load_spec(SHIPPED[0], {"experment.num_samples": 3})
