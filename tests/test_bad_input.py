"""Property-based: malformed search-space files, config dicts and CLI arguments always get an
error naming the key and the expectation (exit 2 from the CLI), and nothing starts."""
from __future__ import annotations

import copy

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from training.config import ConfigError, TrainConfig
from tuning import cli
from tuning.space import SpaceError, load_spec

GOOD = {
    "experiment": {"name": "fuzz", "metric": "val_acc", "mode": "max", "num_samples": 2,
                   "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 3}},
    "train": {"epochs": 2, "data": {"name": "digits"}, "model": {"name": "mlp", "hidden": [16]},
              "optim": {"base_lr": 0.1}, "scaling": {"num_workers": 1, "batch_per_worker": 32}},
    "space": {"optim.base_lr": {"loguniform": [1e-3, 1.0]}, "model.dropout": {"uniform": [0.0, 0.5]},
              "schedule": {"choice": [{"name": "cosine"}, {"name": "step", "gamma": 0.5}]}},
}

junk = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(max_size=6), st.lists(st.one_of(st.integers(-2, 2), st.text(max_size=3)), max_size=3),
                 st.dictionaries(st.text(max_size=5), st.integers(-1, 1), max_size=2))


def _paths(node, prefix=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))


PATHS = list(_paths(GOOD))


@st.composite
def broken_docs(draw):
    doc = copy.deepcopy(GOOD)
    for _ in range(draw(st.integers(1, 2))):
        path = draw(st.sampled_from(PATHS))
        node = doc
        for k in path[:-1]:
            node = node[k] if isinstance(node, dict) and isinstance(node.get(k), dict) else None
            if node is None:
                break
        if node is None:
            continue
        if draw(st.booleans()):
            node[path[-1]] = draw(junk)                              # a wrong value
        else:
            node[draw(st.text(min_size=1, max_size=6))] = draw(junk)  # an unknown key
    return doc


def _check_error(msg: str, file: str) -> None:
    assert msg.startswith(f"{file}: "), msg
    assert ": got " in msg and ", expected " in msg, msg


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=broken_docs())
def test_malformed_space_files_get_a_keyed_error(tmp_path, doc):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        load_spec(path)
    except SpaceError as e:
        _check_error(str(e), str(path))


@settings(max_examples=200, deadline=None)
@given(d=st.dictionaries(st.sampled_from(["epochs", "seed", "data", "model", "optim", "schedule", "scaling",
                                          "regularization", "checkpoint", "bogus"]),
                         st.one_of(junk, st.dictionaries(st.sampled_from(
                             ["name", "base_lr", "num_workers", "hidden", "warmup", "milestones", "dropout", "x"]),
                             junk, max_size=3)), max_size=4))
def test_malformed_config_dicts_get_a_keyed_config_error(d):
    try:
        TrainConfig.from_dict(d)
    except ConfigError as e:
        assert str(e).startswith(f"{e.key}: got ") and e.expected


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if anything tries to start or join a Ray cluster."""
    import ray

    from tuning import cluster

    def refuse(*a, **k):
        raise AssertionError("a Ray cluster was started for bad input")

    monkeypatch.setattr(cluster.LocalCluster, "start", refuse)
    monkeypatch.setattr(ray, "init", refuse)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=broken_docs())
def test_cli_exits_2_on_malformed_files_and_starts_nothing(tmp_path, no_ray, capsys, doc):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        load_spec(path)
        return  # the mutation happened to be valid
    except SpaceError:
        pass
    code = cli.main(["tune", str(path), "--storage", str(tmp_path / "r"), "--tracking-uri",
                     f"sqlite:///{tmp_path}/m.db"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("schedtune tune: error: ") and "Traceback" not in err
    _check_error(err[len("schedtune tune: error: "):].strip(), str(path))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flag=st.sampled_from(["--workers", "--num-samples", "--gpus-per-worker", "--set"]),
       value=st.text(max_size=8).filter(lambda v: not v.startswith("-")))
def test_cli_malformed_flags_exit_2(tmp_path, no_ray, capsys, flag, value):
    from tests.conftest import ROOT

    argv = ["validate", str(ROOT / "search_spaces/quickstart.yaml"), flag, value]
    try:
        code = cli.main(argv)
    except SystemExit as e:   # argparse: usage error
        code = e.code
    err = capsys.readouterr().err
    if code == 0:   # the value was fine (e.g. --workers 3, --set experiment.seed=1)
        return
    assert code == 2, err
    assert "Traceback" not in err
    assert "usage: schedtune" in err or err.startswith("schedtune validate: error: ")
