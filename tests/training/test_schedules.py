"""Schedules against their formulas and against torch's own schedulers, step by step."""
import math

import pytest
import torch

from training.config import ConfigError, OptimConfig, ScheduleConfig, TrainConfig
from training.schedules import SCHEDULE_NAMES, lambda_lr, lr_multiplier, peak_lr, plan_steps, warmup_steps


def sched(**kw) -> ScheduleConfig:
    return ScheduleConfig.from_dict(kw)


def multipliers(s, total, spe=None):
    return [lr_multiplier(s, t, total, spe) for t in range(total)]


def torch_factors(make, total, base=1.0):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base)
    sch = make(opt)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"] / base)
        opt.step()
        sch.step()
    return out


def test_constant_is_one_everywhere():
    assert multipliers(sched(name="constant"), 7) == [1.0] * 7


def test_cosine_formula_boundaries():
    # alpha_t = alpha_0 / 2 (1 + cos(t pi / T)), T = 10
    m = multipliers(sched(name="cosine"), 10)
    assert m[0] == 1.0
    assert m[5] == pytest.approx(0.5)
    assert m[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 9 / 10)))
    assert lr_multiplier(sched(name="cosine"), 10, 10) == pytest.approx(0.0)


def test_linear_formula_boundaries():
    m = multipliers(sched(name="linear"), 4)
    assert m == pytest.approx([1.0, 0.75, 0.5, 0.25])
    m = multipliers(sched(name="linear", min_factor=0.2), 4)
    assert m == pytest.approx([1.0, 0.8, 0.6, 0.4])


def test_step_schedule_values():
    m = multipliers(sched(name="step", milestones=[0.5, 0.75], gamma=0.1), 8)
    assert m == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])


def test_step_milestones_are_fractions_of_the_post_warmup_phase():
    """The README's example: milestones [0.5], 10 warmup steps of 110: the drop is at 10 + 0.5 x 100."""
    m = multipliers(sched(name="step", milestones=[0.5], gamma=0.1, warmup="linear", warmup_steps=10), 110)
    assert m[10:60] == [1.0] * 50 and m[60:] == pytest.approx([0.1] * 50)
    assert multipliers(sched(name="step", milestones=[0.5], gamma=0.1), 110).index(0.1) == 55   # no warmup: of all


def test_inverse_sqrt_counts_from_end_of_warmup():
    s = sched(name="inverse_sqrt", warmup="linear", warmup_steps=4, warmup_start_factor=0.0)
    m = multipliers(s, 20)
    assert m[:4] == pytest.approx([0.0, 0.25, 0.5, 0.75])
    assert m[4] == 1.0                      # peak exactly at the end of warmup
    assert m[4 + 4] == pytest.approx(1 / math.sqrt(2))   # t = W after warmup: sqrt(W / 2W)
    assert m[4 + 12] == pytest.approx(0.5)               # sqrt(4 / 16)
    assert multipliers(sched(name="inverse_sqrt"), 4) == pytest.approx([1, 1 / math.sqrt(2), 1 / math.sqrt(3), 0.5])


def test_linear_warmup_reaches_peak_exactly_at_end():
    s = sched(name="constant", warmup="linear", warmup_steps=5, warmup_start_factor=0.1)
    m = multipliers(s, 10)
    assert m[0] == pytest.approx(0.1)
    assert m[4] == pytest.approx(0.1 + 0.9 * 4 / 5)   # warmup - 1: still below the peak
    assert m[4] < 1.0
    assert m[5:] == [1.0] * 5


def test_constant_warmup_holds_then_jumps():
    s = sched(name="constant", warmup="constant", warmup_steps=3, warmup_start_factor=0.25)
    assert multipliers(s, 6) == [0.25, 0.25, 0.25, 1.0, 1.0, 1.0]


def test_warmup_epochs_use_steps_per_epoch():
    s = sched(name="cosine", warmup="linear", warmup_epochs=1.5)
    assert warmup_steps(s, steps_per_epoch=4) == 6
    with pytest.raises(ValueError, match="steps_per_epoch"):
        lr_multiplier(s, 0, 10)


@pytest.mark.parametrize("total", [10, 37])
def test_cosine_matches_torch(total):
    mine = multipliers(sched(name="cosine", min_factor=0.1), total)
    ref = torch_factors(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=total, eta_min=0.1), total)
    assert mine == pytest.approx(ref, abs=1e-9)


@pytest.mark.parametrize("total", [10, 37])
def test_step_matches_multisteplr(total):
    s = sched(name="step", milestones=[0.3, 0.6, 0.9], gamma=0.5)
    ms = [round(f * total) for f in s.milestones]
    ref = torch_factors(lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=ms, gamma=0.5), total)
    assert multipliers(s, total) == pytest.approx(ref, abs=1e-12)


def test_linear_matches_linearlr():
    total = 12
    ref = torch_factors(lambda o: torch.optim.lr_scheduler.LinearLR(o, 1.0, 0.25, total_iters=total), total)
    assert multipliers(sched(name="linear", min_factor=0.25), total) == pytest.approx(ref, abs=1e-9)


@pytest.mark.parametrize("main", ["cosine", "linear", "step"])
def test_warmup_then_main_matches_sequentiallr(main):
    W, total = 4, 20
    s = sched(name=main, warmup="linear", warmup_steps=W, warmup_start_factor=0.2, milestones=[0.5])
    T = total - W
    mains = {"cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=T),
             "linear": lambda o: torch.optim.lr_scheduler.LinearLR(o, 1.0, 0.0, total_iters=T),
             "step": lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[round(0.5 * T)], gamma=0.1)}

    def make(o):
        warm = torch.optim.lr_scheduler.LinearLR(o, 0.2, 1.0, total_iters=W)
        return torch.optim.lr_scheduler.SequentialLR(o, [warm, mains[main](o)], milestones=[W])

    ref = torch_factors(make, total)
    mine = multipliers(s, total)
    assert mine[W - 1] < 1.0 and mine[W] == 1.0 and ref[W] == pytest.approx(1.0)
    assert mine == pytest.approx(ref, abs=1e-9)


def test_wsd_values_at_the_boundary_steps():
    """Warmup 4 of 24 steps, decay over the last 25% of the 20 post-warmup steps (5 steps, from step 19)."""
    s = sched(name="wsd", decay_fraction=0.25, warmup="linear", warmup_steps=4, warmup_start_factor=0.2)
    m = multipliers(s, 24)
    assert m[0] == pytest.approx(0.2) and m[3] == pytest.approx(0.2 + 0.8 * 3 / 4)   # step 0, warmup - 1
    assert m[4:20] == [1.0] * 16                         # warmup .. the decay's first step: the peak
    assert m[19:] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])   # decay start .. total - 1
    assert lr_multiplier(s, 24, 24) == 0.0               # the end of the decay
    floored = multipliers(sched(name="wsd", decay_fraction=0.5, min_factor=0.1), 8)
    assert floored == pytest.approx([1.0, 1.0, 1.0, 1.0, 1.0, 0.775, 0.55, 0.325])


def test_wsd_over_the_whole_run_is_linear_and_its_decay_is_at_least_one_step():
    assert multipliers(sched(name="wsd", decay_fraction=1.0), 9) == pytest.approx(multipliers(sched(name="linear"), 9))
    assert multipliers(sched(name="wsd", decay_fraction=0.01), 3) == [1.0, 1.0, 1.0]   # D = max(1, round(0.03)) = 1
    assert lr_multiplier(sched(name="wsd", decay_fraction=0.01), 3, 3) == 0.0
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="decay_fraction"):
            sched(name="wsd", decay_fraction=bad)


def test_cyclic_cosine_matches_warm_restarts():
    total, cycles = 30, 3
    ref = torch_factors(lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=10), total)
    mine = multipliers(sched(name="cyclic_cosine", cycles=cycles), total)
    assert mine == pytest.approx(ref, abs=1e-9)
    assert [mine[i] for i in (0, 10, 20)] == [1.0, 1.0, 1.0]   # restarts at the peak


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_every_schedule_is_bounded_and_accepts_dicts(name):
    s = {"name": name, "warmup": "linear", "warmup_steps": 3}
    m = multipliers(s, 25)
    assert all(0.0 <= v <= 1.0 for v in m)
    assert m[3] == 1.0


def test_lambda_lr_wraps_peak_lr():
    cfg = TrainConfig.from_dict({"epochs": 2, "schedule": {"name": "linear", "warmup": "linear", "warmup_steps": 2},
                                 "optim": {"base_lr": 0.4}})
    plan = plan_steps(cfg, train_size=32 * 5)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=plan.peak_lr)
    sch = lambda_lr(opt, cfg, plan)
    lrs = []
    for _ in range(plan.total_steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    assert plan.total_steps == 10
    expected = [0.4 * lr_multiplier(cfg.schedule, t, 10) for t in range(10)]
    assert lrs == pytest.approx(expected)
    assert lrs[2] == pytest.approx(0.4)


@pytest.mark.parametrize("rule,expected", [("linear", 0.1 * 1024 / 256), ("sqrt", 0.1 * 2.0), ("none", 0.1)])
def test_peak_lr_scaling_rules(rule, expected):
    o = OptimConfig.from_dict({"base_lr": 0.1, "lr_scaling": rule, "reference_batch": 256})
    assert peak_lr(o, 1024) == pytest.approx(expected)


def test_plan_steps_counts_global_batch():
    cfg = TrainConfig.from_dict({"epochs": 3, "scaling": {"num_workers": 2, "batch_per_worker": 16, "grad_accum_steps": 2},
                                 "optim": {"base_lr": 0.1, "lr_scaling": "linear", "reference_batch": 32},
                                 "schedule": {"warmup": "linear", "warmup_epochs": 1}})
    plan = plan_steps(cfg, train_size=1000)   # 500 per worker -> 31 batches -> 15 steps
    assert (plan.global_batch, plan.steps_per_epoch, plan.total_steps, plan.warmup_steps) == (64, 15, 45, 15)
    assert plan.peak_lr == pytest.approx(0.2)
    with pytest.raises(ValueError, match="larger than the training set"):
        plan_steps(cfg, train_size=50)
