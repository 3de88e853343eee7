"""timm: and torchvision: models (training.models.external): built from the data's shape, local weights,
dropout and stochastic depth, and transfer modes through each library's own head and stages."""
from __future__ import annotations


import pytest
import torch

from training import checkpoint as ckpt
from training.config import (ConfigError, ModelConfig)
from training.loop import fit
from training.models import apply_transfer, build_model
from training.plugins import check_resolvable

from tests.training.test_plugins import assert_staged, config, user_modules  # noqa: F401 (a fixture)


@pytest.fixture
def image_data(user_modules):  # noqa: F811 (the fixture imported above)
    return {"name": f"{user_modules[1]}:images", "args": {"n": 64}}


def test_timm_model_loads_local_weights_and_linear_probe_trains_only_its_head(image_data, tmp_path):
    import timm

    bare = timm.create_model("test_resnet", num_classes=2, in_chans=3)
    torch.save(bare.state_dict(), tmp_path / "bare.pt")
    cfg = config({"name": "timm:test_resnet", "transfer": "linear_probe", "pretrained": str(tmp_path / "bare.pt")},
                 image_data)
    check_resolvable(cfg)
    model = build_model(cfg.model, 2, (3, 16, 16))
    stages = model.stages()
    assert len(stages) == 6 and stages[-1].parts[0] is model.net.get_classifier()   # act1, layer1..4, fc
    assert_staged(model)
    _, head = apply_transfer(model, cfg.model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in head) == model.net.fc.in_features * 2 + 2

    result = fit(cfg, workdir=tmp_path / "fit")
    after = ckpt.load(result.last_checkpoint)["model"]
    for k, v in bare.state_dict().items():       # the backbone (BN statistics too) is the file's, unchanged
        assert torch.equal(after[f"net.{k}"], v) == (not k.startswith("fc.")), k
    assert 0 <= result.best["val_acc"] <= 1


def test_timm_takes_dropout_stochastic_depth_channels_and_the_data_image_size():
    model = build_model(ModelConfig(name="timm:test_vit", dropout=0.25), 3, (1, 16, 16), stochastic_depth=0.2)
    assert model.net.patch_embed.proj.in_channels == 1 and model.net.head_drop.p == 0.25
    assert model.net.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 3)
    assert_staged(model)
    stages = model.stages()
    assert len(stages) == 7                              # timm's feature_info: blocks.0..5, then the head
    assert any(p is model.net.cls_token for p in stages[0].parameters())   # the root's own tensors: stage 0
    assert any(p is model.net.norm.weight for p in stages[-2].parameters())  # after the last block: its stage


def test_torchvision_model_trains_and_linear_probe_freezes_all_but_fc(image_data, tmp_path):
    cfg = config({"name": "torchvision:resnet18", "transfer": "linear_probe"}, image_data)
    check_resolvable(cfg)
    model = build_model(cfg.model, 2, (3, 16, 16))
    assert len(model.stages()) == 6                      # stem, layer1..4, fc: as the registry's ResNets
    assert_staged(model)
    _, head = apply_transfer(model, cfg.model)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 512 * 2 + 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = fit(cfg.with_updates({"model.transfer": "full"}), workdir=tmp_path)
    after = ckpt.load(result.last_checkpoint)["model"]
    assert not torch.equal(after["net.layer1.0.conv1.weight"], before["net.layer1.0.conv1.weight"])
    assert 0 <= result.best["val_acc"] <= 1


def test_torchvision_rebuilds_the_first_conv_for_one_channel_and_passes_dropout():
    model = build_model(ModelConfig(name="torchvision:mobilenet_v3_small", dropout=0.3), 4, (1, 32, 32))
    assert model.net.features[0][0].in_channels == 1 and model.net.classifier[2].p == 0.3
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 4)
    assert_staged(model)
    with pytest.raises(ConfigError, match="takes no 'dropout'") as e:
        build_model(ModelConfig(name="torchvision:resnet18", dropout=0.3), 4, (3, 32, 32))
    assert e.value.key == "model.dropout"
