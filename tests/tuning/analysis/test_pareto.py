"""The Pareto front and the ranking of repeated configs by their mean: plain functions, checked
against brute force on random points and against hand-worked cases."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from tuning.analysis.pareto import dominates, front, front_table, point_at_best_epoch
from tuning.analysis.ranking import mean_and_std, rank_by_mean


def test_dominance_follows_each_objectives_mode():
    modes = ["max", "min"]
    assert dominates([0.9, 100], [0.8, 200], modes)
    assert dominates([0.9, 100], [0.9, 200], modes)        # better on one, equal on the other
    assert not dominates([0.9, 100], [0.9, 100], modes)    # equal points: neither
    assert not dominates([0.9, 300], [0.8, 200], modes)    # a trade-off: neither
    assert dominates([0.1, 5], [0.2, 6], ["min", "min"])


def test_the_front_is_what_no_point_dominates_brute_force():
    rng = random.Random(0)
    for _ in range(50):
        modes = [rng.choice(["max", "min"]) for _ in range(rng.randint(2, 3))]
        points = [[rng.randint(0, 5) for _ in modes] if rng.random() > 0.1 else None for _ in range(12)]
        got = front(points, modes)
        for p, on in zip(points, got):
            if p is None:
                assert not on
                continue
            beaten = False
            for q in points:
                if q is None:
                    continue
                ge = all((a >= b) if m == "max" else (a <= b) for a, b, m in zip(q, p, modes))
                gt = any((a > b) if m == "max" else (a < b) for a, b, m in zip(q, p, modes))
                beaten |= ge and gt
            assert on == (not beaten), (p, points, modes)


def test_a_hand_worked_front():
    # accuracy up, parameters down: (0.95, 9610) is beaten by (0.95, 4810); the others trade off
    points = [[0.95, 9610], [0.95, 4810], [0.94, 17230], [0.86, 2410], [0.75, 1210], [0.37, 610], None]
    assert front(points, ["max", "min"]) == [False, True, False, True, True, True, False]


def test_a_trials_point_is_its_objectives_at_its_best_epoch_by_the_first():
    history = [{"epoch": 1, "val_acc": 0.7, "epoch_time_s": 3.0},
               {"epoch": 2, "val_acc": 0.9, "epoch_time_s": 5.0},
               {"epoch": 3, "val_acc": 0.8, "epoch_time_s": 1.0},
               {"epoch": 4, "val_acc": float("nan"), "epoch_time_s": 0.5}]
    assert point_at_best_epoch(history, ["val_acc", "epoch_time_s"], ["max", "min"]) == \
        {"val_acc": 0.9, "epoch_time_s": 5.0}
    assert point_at_best_epoch(history, ["val_loss", "epoch_time_s"], ["min", "min"]) is None   # never logged
    assert point_at_best_epoch([], ["val_acc"], ["max"]) is None


def test_front_table_lists_the_members_and_counts_the_rest():
    rows = [SimpleNamespace(trial_id="a", run_id="r1", on_front=True, objectives={"val_acc": 0.9, "num_params": 10.0}),
            SimpleNamespace(trial_id="b", run_id="r2", on_front=False, objectives={"val_acc": 0.8, "num_params": 20.0}),
            SimpleNamespace(trial_id="c", run_id=None, on_front=False, objectives=None)]
    table = front_table(rows, ["val_acc", "num_params"])
    assert "| a | 0.9 | 10 | r1 |" in table and "| b |" not in table
    assert "1 of 2 trials with every objective are on the Pareto front (1 without a point" in table


def test_repeats_rank_by_their_mean_and_each_group_keeps_its_best_member_first():
    # config x: 0.90, 0.80, 0.85 (mean 0.85); config y: 0.95, 0.60 (mean 0.775) though y has the best trial;
    # config z: only a diverged member (no score): last
    items = [("x", 0.90), ("y", 0.95), ("x", 0.80), ("z", None), ("y", 0.60), ("x", 0.85)]
    order, stats = rank_by_mean(items, lambda it: it[0], lambda it: it[1], "max")
    assert order == [("x", 0.90), ("x", 0.85), ("x", 0.80), ("y", 0.95), ("y", 0.60), ("z", None)]
    mean, std, n = stats["x"]
    assert (mean, n) == (pytest.approx(0.85), 3) and std == pytest.approx(0.05)
    assert "z" not in stats
    order, _ = rank_by_mean(items, lambda it: it[0], lambda it: it[1], "min")
    assert [it[0] for it in order] == ["y", "y", "x", "x", "x", "z"]


def test_mean_and_std_is_the_sample_standard_deviation():
    import statistics

    for values in ([1.0], [1.0, 2.0], [0.3, 0.9, 0.4, 0.7]):
        mean, std = mean_and_std(values)
        assert mean == pytest.approx(statistics.mean(values))
        assert std == pytest.approx(statistics.stdev(values) if len(values) > 1 else 0.0)
