"""Regularizers and optimizers: weight-decay groups, mixing, augmentation, the optimizer registry."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training.config import DataConfig, OptimConfig, RegularizationConfig, TrainConfig
from training.optim import OPTIMIZERS, build_optimizer
from training.regularizers import (augment_images, mix_batch, no_decay_names, param_groups,
                                   soft_cross_entropy)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.conv(x))).flatten(1))


def test_no_weight_decay_on_bn_and_bias_unless_asked():
    net = Net()
    assert no_decay_names(net) == {"conv.bias", "bn.weight", "bn.bias", "head.bias"}
    groups = param_groups(net, OptimConfig(weight_decay=0.1), peak_lr=0.5)
    by_name = {g["name"]: g for g in groups}
    assert by_name["head_decay"]["weight_decay"] == 0.1 and by_name["head_no_decay"]["weight_decay"] == 0.0
    assert {id(p) for p in by_name["head_decay"]["params"]} == {id(net.conv.weight), id(net.head.weight)}
    groups = param_groups(net, OptimConfig(weight_decay=0.1, decay_norm_and_bias=True), peak_lr=0.5)
    assert [g["weight_decay"] for g in groups] == [0.1]


def test_backbone_lr_mult_and_frozen_params_left_out():
    net = Net()
    net.conv.weight.requires_grad_(False)
    groups = param_groups(net, OptimConfig(), peak_lr=1.0, head_params={id(p) for p in net.head.parameters()},
                          backbone_lr_mult=0.1)
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs == {"backbone_no_decay": pytest.approx(0.1), "head_decay": 1.0, "head_no_decay": 1.0}
    assert all(p is not net.conv.weight for g in groups for p in g["params"])   # no optimizer state


def test_soft_cross_entropy_matches_torch_with_smoothing():
    logits, y = torch.randn(8, 5), torch.randint(5, (8,))
    for ls in (0.0, 0.1):
        hard = soft_cross_entropy(logits, y, ls)
        soft = soft_cross_entropy(logits, F.one_hot(y, 5).float(), ls)
        assert hard == pytest.approx(F.cross_entropy(logits, y, label_smoothing=ls).item(), rel=1e-6)
        assert soft == pytest.approx(hard.item(), rel=1e-5)


def test_mixup_targets_are_the_same_convex_combination_as_inputs():
    """With one-hot inputs, x_mixed[i] = lam e_i + (1 - lam) e_perm(i) shows lam and the partner;
    the soft target must mix the labels with the same lam and partner."""
    gen = torch.Generator().manual_seed(0)
    n = 16
    x, y = torch.eye(n), torch.randint(4, (n,))
    xm, t = mix_batch(x, y, RegularizationConfig(mixup_alpha=0.4), 4, gen)
    lam = xm[torch.arange(n), torch.arange(n)]
    moved = [i for i in range(n) if lam[i] < 1]
    assert moved, "the permutation moved no sample"
    lam0 = lam[moved[0]].item()
    assert 0 < lam0 < 1 and torch.allclose(lam[moved], torch.full((len(moved),), lam0))
    for i in moved:
        j = int(torch.nonzero(xm[i] * (torch.arange(n) != i)).flatten())
        expected = lam0 * F.one_hot(y[i], 4).float() + (1 - lam0) * F.one_hot(y[j], 4).float()
        assert torch.allclose(t[i], expected, atol=1e-6)


def test_cutmix_label_weights_match_pasted_area():
    gen = torch.Generator().manual_seed(1)
    x = torch.zeros(8, 1, 10, 10)
    x[:4] = 1.0   # samples 0-3 white, 4-7 black
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    xm, t = mix_batch(x, y, RegularizationConfig(cutmix_alpha=1.0), 2, gen)
    for i in range(8):  # the fraction of pixels from the other colour equals the other label's weight
        own = x[i, 0, 0, 0].item()
        foreign = (xm[i] != own).float().mean().item()
        assert t[i, 1 - y[i]].item() == pytest.approx(foreign, abs=1e-6)
    assert (xm != x).any()  # something was pasted


def test_mixing_off_leaves_batch_alone_and_is_reproducible():
    x, y = torch.randn(4, 2), torch.randint(3, (4,))
    assert mix_batch(x, y, RegularizationConfig(), 3, torch.Generator())[1] is y
    a = mix_batch(x, y, RegularizationConfig(mixup_alpha=0.2), 3, torch.Generator().manual_seed(5))
    b = mix_batch(x, y, RegularizationConfig(mixup_alpha=0.2), 3, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_cutout_zeroes_one_square_per_image():
    x = torch.ones(6, 3, 16, 16)
    out = augment_images(x, DataConfig(augment=False), RegularizationConfig(cutout=4), torch.Generator().manual_seed(0))
    zeros = (out == 0).all(1).sum((1, 2))    # zeroed pixels per image (all channels)
    assert ((zeros > 0) & (zeros <= 16)).all()


def test_crop_and_flip_keep_shape_and_content():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float).reshape(2, 1, 8, 8)
    out = augment_images(x, DataConfig(augment=True), RegularizationConfig(), torch.Generator().manual_seed(3))
    assert out.shape == x.shape
    for i in range(2):   # every value is from the image itself or the zero padding
        assert set(out[i].unique().tolist()) <= set(x[i].unique().tolist()) | {0.0}
    vec = torch.randn(4, 10)
    assert augment_images(vec, DataConfig(augment=True), RegularizationConfig(cutout=3), torch.Generator()) is vec


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_reduces_a_quadratic(name):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(20, 20))
    optim = OptimConfig.from_dict({"name": name, "base_lr": {"sgd": 0.05, "adamw": 0.05, "lars": 1.0, "lamb": 0.05}[name]})
    opt = build_optimizer([{"params": [w], "lr": optim.base_lr, "weight_decay": 0.0}], optim)
    start = (w ** 2).sum().item()
    for _ in range(50):
        opt.zero_grad()
        (w ** 2).sum().backward()
        opt.step()
    assert (w ** 2).sum().item() < 0.5 * start


def test_optimizer_needs_trainable_params():
    with pytest.raises(ValueError, match="every layer is frozen"):
        build_optimizer([], OptimConfig())


def test_global_batch_counts_accumulation():
    cfg = TrainConfig.from_dict({"scaling": {"num_workers": 4, "batch_per_worker": 32, "grad_accum_steps": 2}})
    assert cfg.scaling.global_batch == 256
