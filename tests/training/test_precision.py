"""Precision and kernels on CPU: bf16/fp16 autocast reach fp32's accuracy, fp16's scaler skips
overflowing steps and resumes with its state, torch.compile leaves checkpoints uncompiled, and
channels_last trains like the contiguous layout."""
from pathlib import Path

import pytest
import torch
import yaml

from training import checkpoint as ckpt
from training import loop
from training.config import TrainConfig
from training.loop import Diverged, build_run, evaluate, fit

QUICKSTART = Path(__file__).resolve().parents[2] / "search_spaces" / "quickstart.yaml"


def quickstart(**updates) -> TrainConfig:
    """The quickstart's train section for 2 epochs on one process (its global batch of 64 kept)."""
    train = yaml.safe_load(QUICKSTART.read_text())["train"]
    return TrainConfig.from_dict(train).with_updates(
        {"epochs": 2, "scaling.num_workers": 1, "scaling.batch_per_worker": 64, **updates})


def test_bf16_and_fp16_train_the_quickstart_to_fp32s_accuracy():
    acc = {p: fit(quickstart(precision=p)).history[-1]["val_acc"] for p in ("fp32", "bf16", "fp16")}
    assert acc["fp32"] > 0.9
    assert abs(acc["bf16"] - acc["fp32"]) <= 0.01 and abs(acc["fp16"] - acc["fp32"]) <= 0.01, acc


def test_forward_passes_run_in_the_chosen_dtype():
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        run = build_run(quickstart(precision=precision, epochs=1))
        seen = []
        run.core.head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        loop.train_one_epoch(run, 0)
        evaluate(run.model, run)
        assert set(seen) == {dtype}, precision
        assert all(p.dtype == torch.float32 for p in run.core.parameters())     # weights stay fp32


def _overflow_at(call: int):
    """soft_cross_entropy whose ``call``-th loss has its exact value but gradients of 1e30 per
    logit: in fp16 they overflow (the scaler's case), the loss stays finite."""
    real, calls = loop.soft_cross_entropy, []

    def loss_fn(logits, target, smoothing):
        calls.append(1)
        loss = real(logits, target, smoothing)
        if len(calls) != call:
            return loss
        s = logits.sum() * 1e30
        return loss + (s - s.detach())
    return loss_fn


class _Stop(Exception):
    pass


def _stop(metrics, directory):
    raise _Stop


def test_an_fp16_overflow_is_a_skipped_step_and_the_scale_resumes(monkeypatch, tmp_path):
    """Under fp16 the overflowing step is skipped (the weights do not move) and the scale halves;
    the checkpoint holds the scaler's state and a resumed run continues with that scale (not a
    fresh scaler's 65536). Under fp32 the same step moves the weights by ~1e30: divergence."""
    monkeypatch.setattr(loop, "soft_cross_entropy", _overflow_at(5))
    cfg = quickstart(precision="fp16")
    with pytest.raises(_Stop):   # after epoch 1, its checkpoint taken
        fit(cfg, _stop, workdir=tmp_path)
    state = ckpt.load(tmp_path / "latest")
    assert state["scaler"]["scale"] == 2.0 ** 15            # 65536 backed off once
    steps = state["step"]
    assert state["scaler"]["_growth_tracker"] == steps - 5  # the good steps since the skipped 5th
    run = build_run(cfg)
    assert run.precision.scaler.get_scale() == 2.0 ** 16
    loop._restore(run, tmp_path / "latest")
    assert run.precision.scaler.get_scale() == state["scaler"]["scale"]
    assert run.precision.state_dict() == state["scaler"]
    monkeypatch.setattr(loop, "soft_cross_entropy", _overflow_at(5))
    with pytest.raises(Diverged):
        fit(cfg.with_updates({"precision": "fp32"}))


def test_the_skipped_step_leaves_the_weights_alone(monkeypatch):
    monkeypatch.setattr(loop, "soft_cross_entropy", _overflow_at(3))
    run = build_run(quickstart(precision="fp16"))
    weights = []
    real_average = loop._average
    monkeypatch.setattr(loop, "_average", lambda r: (weights.append(r.core.head.weight.detach().clone()),
                                                     real_average(r)))
    loop.train_one_epoch(run, 0)
    assert torch.equal(weights[1], weights[2])               # step 3 (index 2) skipped
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[2], weights[3])


TINY = {"epochs": 1, "seed": 0, "data": {"name": "digits"}, "model": {"name": "mlp", "hidden": [16]},
        "optim": {"name": "sgd", "base_lr": 0.1}, "scaling": {"batch_per_worker": 360}}   # val: one batch of 360


def test_compile_trains_and_its_checkpoint_is_the_uncompiled_models(tmp_path):
    """train.compile: default on CPU (inductor, gcc). The step calls the compiled module; the
    checkpoint holds the bare module's weights and EMA (no _orig_mod. keys), which an uncompiled
    model loads to the same validation losses, i.e. the same logits; the model export and
    ensembles rebuild (tuning.tracking.registry) is uncompiled and takes those weights."""
    from torch._dynamo.eval_frame import OptimizedModule

    from tuning.tracking.registry import ema_state_dict, model_from_checkpoint

    cfg = TrainConfig.from_dict({**TINY, "compile": "default", "regularization": {"ema_decay": 0.5}})
    run = build_run(cfg)
    assert isinstance(run.model, OptimizedModule) and not isinstance(run.core, OptimizedModule)
    result = fit(cfg, workdir=tmp_path)
    last = result.history[-1]
    state = ckpt.load(result.last_checkpoint)
    assert state["model"] and not any("_orig_mod" in k for k in state["model"])
    assert set(state["ema"]) == {f"module.{k}" for k in state["model"]} | {"n_averaged"}
    plain = build_run(TrainConfig.from_dict(TINY))
    for weights, prefix in ((state["model"], ""), (ema_state_dict(state["ema"]), "ema_")):
        plain.core.load_state_dict(weights)
        again = evaluate(plain.core, plain)
        assert again["val_loss"] == pytest.approx(last[f"{prefix}val_loss"], rel=1e-5), prefix
        assert again["val_acc"] == last[f"{prefix}val_acc"], prefix
    model, meta = model_from_checkpoint(result.last_checkpoint)
    assert not isinstance(model, OptimizedModule)
    chosen = state["model"] if meta["model_weights"] == "raw" else ema_state_dict(state["ema"])
    assert all(torch.equal(v, chosen[k]) for k, v in model.state_dict().items())


def test_compile_accepts_yamls_off_and_on():
    assert TrainConfig.from_dict({"compile": False}).compile == "off"       # YAML reads `off` as false
    assert TrainConfig.from_dict({"compile": True}).compile == "default"
    assert TrainConfig.from_dict({"compile": "max-autotune"}).compile == "max-autotune"
    assert TrainConfig.from_dict({"compile": False}).to_dict()["compile"] == "off"


CNN = {"epochs": 2, "seed": 0, "data": {"name": "digits"}, "model": {"name": "small_cnn"},
       "optim": {"name": "sgd", "base_lr": 0.05, "momentum": 0.9}, "scaling": {"batch_per_worker": 64}}


def test_channels_last_trains_small_cnn_like_the_contiguous_layout():
    base = TrainConfig.from_dict(CNN)
    run = build_run(base.with_updates({"channels_last": True}))
    convs = [m for m in run.core.modules() if isinstance(m, torch.nn.Conv2d)]
    assert run.channels_last and convs
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    seen = []
    convs[0].register_forward_pre_hook(lambda m, i: seen.append(i[0].is_contiguous(memory_format=torch.channels_last)))
    loop.train_one_epoch(run, 0)
    assert seen and all(seen)
    nchw, nhwc = fit(base), fit(base.with_updates({"channels_last": True}))
    assert abs(nhwc.history[-1]["val_acc"] - nchw.history[-1]["val_acc"]) <= 0.01
    diffs = [abs(a - b) for a, b in zip(nchw.trace["loss"], nhwc.trace["loss"])]
    assert len(diffs) == nchw.plan.total_steps and max(diffs) < 1e-2
    assert diffs[0] < 1e-5                                  # the same first step, up to kernel rounding


def test_channels_last_is_a_no_op_without_2d_convolutions():
    run = build_run(quickstart(channels_last=True))        # the quickstart's MLP on 8x8 images
    assert not run.channels_last
