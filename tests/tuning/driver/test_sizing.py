"""sizing: moved from the former test_tuning_units.py grab-bag."""
from __future__ import annotations


import pytest

from tests.conftest import ROOT
from tuning.driver.sizing import ResourceError, max_concurrent, trial_demand
from tuning.spec import load_spec

QUICK = ROOT / "search_spaces/quickstart.yaml"
QUICK = ROOT / "search_spaces/quickstart.yaml"


def spec_with(**o):
    return load_spec(QUICK, {f"train.scaling.{k}": v for k, v in o.items()})


@pytest.mark.parametrize("scaling,cluster,memory,expected", [
    ({"num_workers": 2, "cpus_per_worker": 0.5}, {"CPU": 2}, None, 1),     # 0.25 + 2 x 0.5 = 1.25 CPU
    ({"num_workers": 2, "cpus_per_worker": 0.5}, {"CPU": 8}, None, 6),
    ({"num_workers": 2, "cpus_per_worker": 0.5}, {"CPU": 8}, 8.0, 2),      # memory: 0.5 + 2 x 1.5 GB each
    ({"num_workers": 1, "cpus_per_worker": 0.5}, {"CPU": 2}, None, 4),     # in-process trial: no driver share
    ({"num_workers": 4, "use_gpu": True, "gpus_per_worker": 1, "cpus_per_worker": 1}, {"CPU": 64, "GPU": 8}, None, 2),
])
def test_max_concurrent_fits_full_worker_groups(scaling, cluster, memory, expected):
    assert max_concurrent(spec_with(**scaling), cluster, memory) == expected


def test_max_concurrent_uses_the_largest_sampled_worker_group():
    spec = load_spec(QUICK, {"space.scaling.num_workers": {"choice": [1, 4]}, "train.scaling.cpus_per_worker": 1})
    assert trial_demand(spec.base.with_updates({"scaling.num_workers": 4}))["CPU"] == 4.25
    assert max_concurrent(spec, {"CPU": 10}, None) == 2


def test_max_concurrent_combines_searched_worker_counts_and_sizes():
    # The largest group is 4 workers x 2 CPUs (+ 0.25 for the trial driver) = 8.25 CPU: a combination
    # of two searched keys, which neither key's extremes reach alone (4 x 0.5 + 0.25, 2 x 2 + 0.25).
    spec = load_spec(QUICK, {"space.scaling.num_workers": {"choice": [1, 4]},
                             "space.scaling.cpus_per_worker": {"choice": [0.5, 2]}})
    assert max_concurrent(spec, {"CPU": 17}, None) == 2
    with pytest.raises(ResourceError, match="8.25 CPU"):
        max_concurrent(spec, {"CPU": 8}, None)


def test_progress_counts_every_grid_point_as_a_trial():
    from tuning.driver.progress import ProgressPrinter

    spec = load_spec(QUICK, {"experiment.num_samples": 2, "space.optim.base_lr": {"grid": [0.1, 0.01, 0.001]}})
    lines: list[str] = []
    ProgressPrinter(spec, lines.append)._line([])
    assert "0/6 done" in lines[0]


def test_a_trial_that_cannot_fit_is_an_error_naming_resources():
    with pytest.raises(ResourceError) as e:
        max_concurrent(spec_with(num_workers=4, cpus_per_worker=1), {"CPU": 2}, None)
    assert "4.25 CPU" in str(e.value) and "cluster has 2 CPU" in str(e.value)
    # an autoscaling cluster may grow: admit one, the worker group waits (bounded) for nodes
    assert max_concurrent(spec_with(num_workers=4, cpus_per_worker=1), {"CPU": 2}, None, autoscaling=True) == 1
