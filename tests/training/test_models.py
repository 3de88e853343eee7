"""training.models: one contract over every MODELS entry and a set of timm:/torchvision: plug-ins, transfer
modes, init, pretrained, stochastic depth."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from training.config import ConfigError, ModelConfig
from training.models import MODELS, PluginModel, apply_transfer, build_model, load_pretrained

NUM_CLASSES = 7
# Plug-ins of each stage layout: timm's feature_info (a CNN, a ViT with tensors on its root, blocks,
# a byobnet whose head holds more than the classifier); torchvision's top-level children (ResNet, with
# its first conv rebuilt for 1 channel; MobileNet's features split into blocks; SqueezeNet's conv head).
PLUGINS = {"timm:test_resnet": (3, 16, 16), "timm:test_vit": (3, 16, 16), "timm:test_efficientnet": (3, 16, 16),
           "timm:test_byobnet": (3, 16, 16), "torchvision:resnet18": (1, 16, 16),
           "torchvision:mobilenet_v3_small": (3, 32, 32), "torchvision:squeezenet1_0": (3, 32, 32)}


def small_setup(name: str, **overrides) -> tuple[ModelConfig, tuple[int, ...]]:
    """A fast config and input shape per entry: digits-like for mlp/small_cnn, tiny CIFAR-like for resnets."""
    if name in PLUGINS:
        return ModelConfig.from_dict({"name": name, **overrides}), PLUGINS[name]
    if name.startswith("resnet"):
        return ModelConfig.from_dict({"name": name, "small_stem": True, **overrides}), (3, 16, 16)
    return ModelConfig.from_dict({"name": name, "hidden": [16], "channels": [8, 16], **overrides}), (1, 8, 8)


def make(name: str, *, stochastic_depth: float = 0.0, **overrides):
    cfg, shape = small_setup(name, **overrides)
    torch.manual_seed(0)
    return build_model(cfg, NUM_CLASSES, shape, stochastic_depth=stochastic_depth), cfg, shape


def batch(shape, n: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_obeys_the_contract(name):
    model, _, shape = make(name)
    x, y = batch(shape)
    logits = model(x)
    assert logits.shape == (2, NUM_CLASSES)

    stages = model.stages()
    assert len(stages) >= 2
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert stages[-1] is linears[-1] and stages[-1].out_features == NUM_CLASSES
    per_stage = [{id(p) for p in s.parameters()} for s in stages]
    assert sum(map(len, per_stage)) == len(set().union(*per_stage))           # no parameter in two stages
    assert set().union(*per_stage) == {id(p) for p in model.parameters()}    # and none outside a stage
    assert sum(p.numel() for p in model.parameters()) > 0

    nn.functional.cross_entropy(logits, y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PLUGINS))
def test_every_plugin_model_obeys_the_contract(name):
    model, _, shape = make(name)
    assert isinstance(model, PluginModel)
    x, y = batch(shape)
    logits = model(x)
    assert logits.shape == (2, NUM_CLASSES)

    stages = model.stages()
    assert len(stages) >= 3
    head = dict(model.net.named_modules())[model._plan[-1][0][0]]
    assert [m is head for m in stages[-1].parts] == [True]                   # the head is one module
    assert (head.out_features if isinstance(head, nn.Linear) else head.out_channels) == NUM_CLASSES
    per_stage = [{id(p) for p in s.parameters()} for s in stages]
    assert all(per_stage)                                                     # no stage without parameters
    assert sum(map(len, per_stage)) == len(set().union(*per_stage))
    assert set().union(*per_stage) == {id(p) for p in model.parameters()}
    buffers = [{id(b) for b in s.buffers()} for s in stages]
    assert set().union(*buffers) == {id(b) for b in model.buffers()}          # BN statistics have a stage too

    nn.functional.cross_entropy(logits, y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_models_face_lists_its_members_and_resnets_stay_lazy():
    import subprocess
    import sys

    import training.models as face

    assert set(face.__all__) <= set(dir(face))
    code = ("import sys, training.models; assert 'torchvision' not in sys.modules;"
            "from training.config import ModelConfig; training.models.build_model(ModelConfig(name='resnet18'), 2, (3, 8, 8));"
            "assert 'torchvision' in sys.modules and 'training.models.resnet' in sys.modules")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("name", sorted(MODELS))
def test_zero_init_zeroes_every_parameter(name):
    model, _, _ = make(name, init="zero")
    assert all(torch.count_nonzero(p) == 0 for p in model.parameters())


@pytest.mark.parametrize("name,shape", [("small_cnn", (3, 32, 32)), ("resnet18", (1, 8, 8)),
                                        ("resnet18", (3, 8, 8))])
def test_image_models_take_other_shapes(name, shape):
    model = build_model(ModelConfig(name=name), 10, shape)
    assert model(torch.randn(2, *shape)).shape == (2, 10)


def test_image_models_reject_vectors_and_mlp_rejects_stochastic_depth():
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(name="small_cnn"), 10, (40,))
    assert err.value.key == "model.name"
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(name="mlp"), 10, (40,), stochastic_depth=0.1)
    assert err.value.key == "regularization.stochastic_depth"


def test_unknown_model_names_model_name():
    with pytest.raises(ConfigError, match="one of") as err:
        build_model(ModelConfig(name="vgg"), 10, (1, 8, 8))
    assert err.value.key == "model.name"


# ---------------------------------------------------------------------------- transfer learning

@pytest.mark.parametrize("name", ["mlp", "small_cnn", "resnet18", "timm:test_resnet", "timm:test_vit",
                                  "torchvision:mobilenet_v3_small"])
@pytest.mark.parametrize("transfer,n_trainable", [("full", None), ("finetune_last_n", 2), ("linear_probe", 1)])
def test_frozen_stages_do_not_move_under_sgd_with_weight_decay(name, transfer, n_trainable):
    model, cfg, shape = make(name, hidden=[16, 16], transfer=transfer, finetune_last_n=2)
    backbone, head = apply_transfer(model, cfg)
    stages = model.stages()
    n_trainable = n_trainable or len(stages)
    frozen, trainable = stages[:-n_trainable], stages[-n_trainable:]
    assert head == list(stages[-1].parameters())
    assert {id(p) for p in backbone} == {id(p) for s in trainable[:-1] for p in s.parameters()}
    assert all(not p.requires_grad for s in frozen for p in s.parameters())
    assert all(p.requires_grad for s in trainable for p in s.parameters())

    model.train()
    stateful = (nn.BatchNorm2d, nn.Dropout)
    assert all(not m.training for s in frozen for m in s.modules() if isinstance(m, stateful))  # stay in eval
    assert all(m.training for s in trainable for m in s.modules())
    frozen_keys = {k for k, t in model.state_dict(keep_vars=True).items()
                   if any(t is u for s in frozen for u in (*s.parameters(), *s.buffers()))}
    before = snapshot(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    x, y = batch(shape, n=4)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in frozen_keys)   # weights and BN running stats
    params = {k for k, _ in model.named_parameters()}
    assert all(not torch.equal(before[k], after[k]) for k in params - frozen_keys)


def test_finetune_more_stages_than_the_model_has_is_a_config_error():
    model, cfg, _ = make("mlp", transfer="finetune_last_n", finetune_last_n=3)   # stages: block, head
    with pytest.raises(ConfigError) as err:
        apply_transfer(model, cfg)
    assert err.value.key == "model.finetune_last_n"


def test_apply_transfer_back_to_full_unfreezes_everything():
    model, cfg, _ = make("small_cnn", transfer="linear_probe")
    apply_transfer(model, cfg)
    backbone, head = apply_transfer(model, ModelConfig(name="small_cnn", channels=[8, 16]))
    assert len(backbone) + len(head) == len(list(model.parameters()))
    assert all(m.training for m in model.train().modules())


# ---------------------------------------------------------------------------- pretrained weights

@pytest.mark.parametrize("name", ["small_cnn", "resnet18", "timm:test_resnet", "torchvision:resnet18"])
@pytest.mark.parametrize("wrap", [False, True])
def test_pretrained_round_trips(name, wrap, tmp_path):
    source, _, shape = make(name)
    source.train()(batch(shape, n=4)[0])            # non-trivial BatchNorm running statistics
    path = tmp_path / "w.pt"
    state = source.state_dict()
    torch.save({"model": state, "step": 12, "ema": None} if wrap else state, path)
    torch.manual_seed(123)
    loaded, _, _ = make(name, pretrained=str(path))
    for k, v in state.items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_pretrained_with_another_head_size_loads_the_backbone_only(tmp_path):
    source, cfg, shape = make("resnet18")
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    target = build_model(ModelConfig.from_dict({**cfg.to_dict(), "pretrained": str(path)}), 3, shape)
    assert target.fc.out_features == 3
    src = source.state_dict()
    names = load_pretrained(target, str(path))
    assert "fc.weight" not in names and "fc.bias" not in names
    assert names == [k for k in src if not k.startswith("fc.")]
    assert all(torch.equal(target.state_dict()[k], src[k]) for k in names)


def test_pretrained_strips_ddp_prefixes(tmp_path):
    source, _, _ = make("mlp")
    path = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)
    loaded, _, _ = make("mlp", pretrained=str(path))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())


@pytest.mark.parametrize("content", ["truncated", "garbage", "not_a_state_dict", "missing"])
def test_unreadable_pretrained_file_is_a_value_error_naming_the_file(content, tmp_path):
    source, _, _ = make("mlp")
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    data = path.read_bytes()
    if content == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif content == "garbage":
        path.write_bytes(b"definitely not a checkpoint")
    elif content == "not_a_state_dict":
        torch.save([1, 2, 3], path)
    else:
        path.unlink()
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a schedtune/torch state_dict")):
        make("mlp", pretrained=str(path))


def test_pretrained_from_another_architecture_is_a_value_error(tmp_path):
    source, _, _ = make("mlp")
    path = tmp_path / "mlp.pt"
    torch.save(source.state_dict(), path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: no tensor besides the head")):
        make("small_cnn", pretrained=str(path))


# ---------------------------------------------------------------------------- stochastic depth

def test_stochastic_depth_is_linear_in_depth_and_random_only_in_training():
    model, cfg, shape = make("resnet18", stochastic_depth=0.5)
    assert [b.drop_path.p for b in model.residual_blocks()] == [0.5 * i / 8 for i in range(1, 9)]
    x, _ = batch(shape, n=8)

    model.train()
    torch.manual_seed(0)
    first = model(x)
    torch.manual_seed(1)
    assert not torch.allclose(first, model(x))
    torch.manual_seed(0)
    assert torch.equal(first, model(x))

    plain = build_model(cfg, NUM_CLASSES, shape)
    plain.load_state_dict(model.state_dict())    # same keys as the p=0 (and torchvision) model
    model.eval(), plain.eval()
    with torch.no_grad():
        out = model(x)
        assert torch.equal(out, model(x))
        assert torch.equal(out, plain(x))


def test_resnet_state_dict_matches_torchvision():
    import torchvision

    ours = build_model(ModelConfig(name="resnet50"), 10, (3, 32, 32)).state_dict()
    theirs = torchvision.models.resnet50(weights=None, num_classes=10).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
