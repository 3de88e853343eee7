"""search: moved from the former test_tuning_units.py grab-bag."""
from __future__ import annotations



from tests.conftest import ROOT
from tuning.spec import load_spec

QUICK = ROOT / "search_spaces/quickstart.yaml"
QUICK = ROOT / "search_spaces/quickstart.yaml"


def test_optuna_tpe_with_the_same_seed_suggests_the_same_configs():
    from tuning.driver.search import searcher as _searcher, to_tune

    def suggestions(seed):
        spec = load_spec(QUICK, {"experiment.search": "optuna_tpe", "experiment.seed": seed})
        searcher = _searcher(spec, 4)
        searcher.set_search_properties(spec.options.metric, spec.options.mode, to_tune(spec))
        return [searcher.suggest(f"trial_{i}") for i in range(3)]

    first = suggestions(3)
    assert all(isinstance(s, dict) and "optim.base_lr" in s for s in first)
    assert first == suggestions(3) and first != suggestions(4)
