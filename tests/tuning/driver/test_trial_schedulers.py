"""trial schedulers: moved from the former test_tuning_units.py grab-bag."""
from __future__ import annotations



from tests.conftest import ROOT
from tuning.spec import load_spec

QUICK = ROOT / "search_spaces/quickstart.yaml"
QUICK = ROOT / "search_spaces/quickstart.yaml"


def test_asha_rungs_survive_a_restore_through_the_callback_state():
    """Tune pickles the scheduler and the callbacks together when the experiment starts (empty
    rungs) and checkpoints only the callbacks' state as it runs: ASHAState carries the rungs."""
    import pickle
    from types import SimpleNamespace

    from tuning.driver.trial_schedulers import ASHAState, make_scheduler

    spec = load_spec(QUICK, {"train.epochs": 9, "experiment.scheduler": {"name": "asha", "grace_period": 1,
                                                                          "reduction_factor": 3}})
    asha, callbacks = make_scheduler(spec)
    assert [type(c) for c in callbacks] == [ASHAState]
    assert callbacks[0].get_state() is None                            # nothing to save yet
    pickled_at_start = pickle.dumps((asha, callbacks))
    bracket = asha._brackets[0]
    for trial_id, acc in [("a", 0.9), ("b", 0.5), ("c", 0.8)]:
        bracket.on_result(SimpleNamespace(trial_id=trial_id), 1, acc)   # rung at epoch 1
    state = pickle.loads(pickle.dumps(callbacks[0].get_state()))
    assert state["rungs"][0][-1] == (1, {"a": 0.9, "b": 0.5, "c": 0.8})

    restored_asha, restored_callbacks = pickle.loads(pickled_at_start)
    fresh = restored_asha._brackets[0]
    assert fresh.on_result(SimpleNamespace(trial_id="x"), 1, 0.1) == "CONTINUE"   # empty rungs: passes
    restored_asha, restored_callbacks = pickle.loads(pickled_at_start)
    restored_callbacks[0].set_state(state)
    bracket = restored_asha._brackets[0]
    assert bracket.on_result(SimpleNamespace(trial_id="x"), 1, 0.1) == "STOP"     # judged against a, b, c
    assert bracket.on_result(SimpleNamespace(trial_id="y"), 1, 0.95) == "CONTINUE"
