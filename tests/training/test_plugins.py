"""training.plugins: the user's model and dataset factories, names checked before anything starts
(check_resolvable), plug-in failures inside a trial, and the registry-name contracts (timm: and torchvision: models: test_external_models.py)."""
from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
import typing
import uuid

import pytest

from training import checkpoint as ckpt
from training.config import (DATASET_NAMES, MODEL_NAMES, ConfigError, ModelConfig, OptimConfig, ScheduleConfig,
                             TrainConfig, field_paths, is_field_path)
from training.data import DATASETS, load_data
from training.loop import fit
from training.models import MODELS, PluginModel, StagedModel, build_model
from training.optim import OPTIMIZERS
from training.plugins import PluginError, check_resolvable
from training.schedules import SCHEDULE_NAMES

MODEL_SRC = '''
import math

from torch import nn

from training.models import StagedModel


class Net(nn.Module):
    def __init__(self, width, num_classes, input_shape):
        super().__init__()
        if width % 2:
            raise ValueError("width must be even")
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU())
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


def make(width: int, num_classes: int, input_shape: tuple, depth: int = 1):
    """The test's factory: no **kwargs, so model.args keys are checked against (width, depth)."""
    return Net(width, num_classes, input_shape)


def make_any(**kwargs):
    return Net(kwargs.get("width", 8), 2, (3, 8, 8))


def returns_a_string(num_classes):
    return "not a model"


def wrong_logits(input_shape):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 5))


class Staged(StagedModel):
    def __init__(self, num_classes, input_shape):
        super().__init__()
        self.a = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 4))
        self.b = nn.Linear(4, num_classes)

    def stages(self):
        return [self.a, self.b]

    def forward(self, x):
        return self.b(self.a(x))


not_callable = 3
'''

DATA_SRC = '''
import torch
from torch.utils.data import TensorDataset

from training.data import DataBundle


def images(n: int = 80, channels: int = 3, side: int = 16, seed: int = 0):
    """Two classes of images told apart by brightness (+1 / -1), as a (train, val) pair."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, channels, side, side, generator=g) + (2.0 * y - 1.0).view(-1, 1, 1, 1)
    cut = n * 3 // 4
    return TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:])


def as_dict(n: int = 40):
    train, val = images(n, channels=1, side=4)
    return {"train": train, "val": val, "classes": ["dark", "bright"], "mean": [0.5], "std": [2.0]}


def as_bundle(n: int = 40):
    train, val = images(n, channels=1, side=4)
    return DataBundle(train, val, num_classes=2, input_shape=(1, 4, 4), class_names=["a", "b"], is_image=True)


def float64(n: int = 40):
    train, val = images(n)
    return TensorDataset(train.tensors[0].double(), train.tensors[1]), val


def no_classes():
    class Plain(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.zeros(3), i % 2
    return Plain(), Plain()


def raises(root=None):
    raise FileNotFoundError(f"no shards under {root}")


def returns_a_number():
    return 42
'''


@pytest.fixture
def user_modules(tmp_path, monkeypatch):
    """The test's model and dataset factories as modules in a temporary directory on sys.path: (model, data)
    module names, unique per test (resolutions are cached per process)."""
    tag = uuid.uuid4().hex[:8]
    models, data = f"usermodels_{tag}", f"userdata_{tag}"
    (tmp_path / f"{models}.py").write_text(textwrap.dedent(MODEL_SRC))
    (tmp_path / f"{data}.py").write_text(textwrap.dedent(DATA_SRC))
    monkeypatch.syspath_prepend(str(tmp_path))
    return models, data


def config(model: dict, data: dict, **extra) -> TrainConfig:
    return TrainConfig.from_dict({"epochs": 1, "seed": 0, "model": model, "data": data,
                                  "optim": {"name": "sgd", "base_lr": 0.05, "momentum": 0.9},
                                  "scaling": {"batch_per_worker": 16}, **extra})


def assert_staged(model: StagedModel) -> None:
    """The StagedModel contract: every parameter in exactly one stage, the head last."""
    per_stage = [{id(p) for p in s.parameters()} for s in model.stages()]
    assert sum(map(len, per_stage)) == len(set().union(*per_stage))
    assert set().union(*per_stage) == {id(p) for p in model.parameters()}
    assert len(per_stage) >= 2 and all(per_stage)


# ---------------------------------------------------------------------------- registry names

def literal_names(section: type) -> set[str]:
    return set(typing.get_args(typing.get_type_hints(section)["name"]))


REGISTRIES = {   # the names a config accepts (typed or listed in training.config), and the registry's keys
    "models": (lambda: set(MODEL_NAMES), lambda: set(MODELS)),
    "datasets": (lambda: set(DATASET_NAMES), lambda: set(DATASETS)),
    "optimizers": (lambda: literal_names(OptimConfig), lambda: set(OPTIMIZERS)),
    "schedules": (lambda: literal_names(ScheduleConfig), lambda: set(SCHEDULE_NAMES)),
}


@pytest.mark.parametrize("registry", sorted(REGISTRIES))
def test_typed_names_are_exactly_the_registry_keys(registry):
    names, keys = (f() for f in REGISTRIES[registry])
    assert names == keys and keys


@pytest.mark.parametrize("section,typo,near", [("data", "digitz", "digits"), ("model", "resnet19", "resnet18"),
                                               ("model", "smal_cnn", "small_cnn")])
def test_a_misspelt_registry_name_fails_at_from_dict_with_the_closest_name(section, typo, near):
    with pytest.raises(ConfigError, match=f"did you mean '{near}'") as e:
        TrainConfig.from_dict({section: {"name": typo}})
    assert e.value.key == f"{section}.name"


@pytest.mark.parametrize("section,name,ok", [
    ("model", "timm:resnet10t", True), ("model", "torchvision:resnet18", True), ("model", "pkg.mod:make", True),
    ("model", "pkg.mod:Cls.build", True), ("data", "torchvision:MNIST", True), ("data", "pkg:load", True),
    ("data", "timm:resnet18", False), ("model", "timm:", False), ("model", "pkg.mod:", False),
    ("model", "pkg mod:make", False), ("data", "torchvision:not-a-class", False)])
def test_plugin_names_pass_the_syntactic_check_and_nothing_is_imported(section, name, ok):
    if ok:
        assert getattr(TrainConfig.from_dict({section: {"name": name}}), section).name == name
    else:
        with pytest.raises(ConfigError, match="or a plug-in") as e:
            TrainConfig.from_dict({section: {"name": name}})
        assert e.value.key == f"{section}.name"
    assert "pkg" not in sys.modules


def test_importing_config_and_plugins_imports_no_torch_and_the_loop_no_torchvision():
    code = ("import sys, training.config, training.plugins; assert 'torch' not in sys.modules, 'torch';"
            "import training.loop; bad = [m for m in ('torchvision', 'timm') if m in sys.modules]; assert not bad, bad")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr


# ---------------------------------------------------------------------------- model.args as config fields

def test_model_args_are_dotted_paths_applied_by_with_updates():
    assert is_field_path("model.args.width") and is_field_path("data.args.n") and is_field_path("model.args")
    assert not is_field_path("model.args.a.b") and not is_field_path("model.argz.width")
    assert not is_field_path("optim.lr") and all(is_field_path(p) for p in field_paths())
    base = TrainConfig.from_dict({"model": {"name": "pkg.mod:make", "args": {"depth": 2}}})
    cfg = base.with_updates({"model.args.width": 16})
    assert cfg.model.args == {"depth": 2, "width": 16} and base.model.args == {"depth": 2}
    assert cfg.flat()["model.args.width"] == 16
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    cfg.to_dict()["model"]["args"]["width"] = 3        # to_dict is a copy
    assert cfg.model.args["width"] == 16


@pytest.mark.parametrize("model,key,fragment", [
    ({"name": "mlp", "args": {"width": 8}}, "model.args", "for the registry entry 'mlp'"),
    ({"name": "pkg:make", "args": {"num_classes": 3}}, "model.args.num_classes", "schedtune passes"),
    ({"name": "timm:resnet10t", "args": {"in_chans": 1}}, "model.args.in_chans", "schedtune passes"),
    ({"name": "pkg:make", "args": {"not an identifier": 1}}, "model.args", "Python identifiers"),
    ({"name": "pkg:make", "args": [1]}, "model.args", "a mapping"),
    ({"name": "pkg:make", "dropout": 0.1}, "model.dropout", "model.args"),
])
def test_model_args_rules_at_from_dict(model, key, fragment):
    with pytest.raises(ConfigError, match=fragment) as e:
        TrainConfig.from_dict({"model": model})
    assert e.value.key == key


# ---------------------------------------------------------------------------- the user's model and data

def test_user_model_and_dataset_factories_resolve_build_and_train(user_modules):
    models, data = user_modules
    cfg = config({"name": f"{models}:make", "args": {"width": 12}},
                 {"name": f"{data}:images", "args": {"n": 120, "side": 8}})
    check_resolvable(cfg)
    bundle = load_data(cfg.data)
    assert (len(bundle.train), len(bundle.val), bundle.input_shape, bundle.num_classes) == (90, 30, (3, 8, 8), 2)
    model = build_model(cfg.model, bundle.num_classes, bundle.input_shape)
    assert isinstance(model, PluginModel) and model.net.body[1].out_features == 12   # the factory's own width
    assert_staged(model)
    assert [len(list(s.parameters())) for s in model.stages()] == [2, 2]              # body, head

    result = fit(cfg)
    state = ckpt.load(result.last_checkpoint)["model"]
    assert state["net.body.1.weight"].shape == (12, 3 * 8 * 8)
    assert result.best["val_acc"] >= 0.9      # the classes differ by 2 standard deviations in every pixel


def test_a_staged_model_from_the_factory_is_used_as_is(user_modules):
    models, _ = user_modules
    model = build_model(ModelConfig(name=f"{models}:Staged"), 3, (2, 4))
    assert type(model).__name__ == "Staged" and model.b.out_features == 3


@pytest.mark.parametrize("factory,shape,classes,mean", [("as_dict", (1, 4, 4), ["dark", "bright"], 0.5),
                                                        ("as_bundle", (1, 4, 4), ["a", "b"], None),
                                                        ("images", (3, 16, 16), ["0", "1"], None)])
def test_what_a_dataset_factory_returns_becomes_a_bundle(user_modules, factory, shape, classes, mean):
    _, data = user_modules
    bundle = load_data(TrainConfig.from_dict({"data": {"name": f"{data}:{factory}"}}).data)
    assert (bundle.input_shape, bundle.class_names, bundle.num_classes, bundle.is_image) == (shape, classes, 2, True)
    assert (None if bundle.mean is None else bundle.mean.flatten().tolist()) == (None if mean is None else [mean])
    if mean is not None:
        assert bundle.mean.shape == (1, 1, 1) and bundle.std.flatten().tolist() == [2.0]


def test_num_samples_caps_a_factory_dataset_that_does_not_take_it(user_modules):
    _, data = user_modules
    bundle = load_data(TrainConfig.from_dict({"data": {"name": f"{data}:images", "num_samples": 7}}).data)
    assert (len(bundle.train), len(bundle.val)) == (7, 20)


# ---------------------------------------------------------------------------- names checked before anything starts

def bad_names(models: str, data: str) -> list[tuple[dict, str, str]]:
    """(config updates, the key the error names, a fragment of what it says)."""
    return [
        ({"model.name": "timm:resnet1800"}, "model.name", "did you mean 'timm:resnet18'"),
        ({"model.name": "torchvision:resnet180"}, "model.name", "did you mean 'torchvision:resnet18'"),
        ({"model.name": "nosuchpkg.mod:make"}, "model.name", "no module 'nosuchpkg'"),
        ({"model.name": f"{models}x:make"}, "model.name", f"did you mean '{models}:make'"),
        ({"model.name": f"{models}:maek"}, "model.name", f"did you mean '{models}:make'"),
        ({"model.name": "os:sep"}, "model.name", "os.sep is a str"),
        ({"model.name": f"{models}:not_callable"}, "model.name", "is a int"),
        ({"model.name": f"{models}:make", "model.args": {"width": 8, "bogus": 1}}, "model.args.bogus",
         "it takes depth, width"),
        ({"model.name": f"{models}:make", "model.args": {"widht": 8}}, "model.args.widht", "did you mean 'width'"),
        ({"model.name": f"{models}:make"}, "model.args.width", "requires the argument 'width'"),
        ({"model.name": f"{models}:make", "model.args": {"width": 8}, "regularization.stochastic_depth": 0.1},
         "regularization.stochastic_depth", "model.args"),
        ({"data.name": "torchvision:MNISTT", "data.root": "/x"}, "data.name", "did you mean 'torchvision:MNIST'"),
        ({"data.name": "torchvision:ImageFolder", "data.root": "/x"}, "data.name", "a train and a test split"),
        ({"data.name": "torchvision:MNIST"}, "data.root", "data.download: true"),
        ({"data.name": "torchvision:CIFAR10", "data.root": "/x", "data.args": {"trian": True}}, "data.args.trian",
         "a keyword argument of torchvision:CIFAR10"),
        ({"data.name": "torchvision:SVHN", "data.root": "/x", "data.args": {"split": "extra"}}, "data.args.split",
         "split='train'"),
        ({"data.name": f"{data}:imagez"}, "data.name", f"did you mean '{data}:images'"),
        ({"data.name": f"{data}:images", "data.args": {"sides": 4}}, "data.args.sides", "did you mean 'side'"),
    ]


def test_bad_plugin_names_are_config_errors_naming_the_key(user_modules):
    models, data = user_modules
    base = config({"name": "mlp"}, {"name": "digits"})
    for updates, key, fragment in bad_names(models, data):
        cfg = base.with_updates(updates)           # syntactically fine: from_dict accepts every one
        with pytest.raises(ConfigError) as e:
            check_resolvable(cfg)
        assert (e.value.key, fragment in str(e.value)) == (key, True), (updates, str(e.value))


def test_accepted_args_and_kwargs_factories_pass(user_modules):
    models, data = user_modules
    check_resolvable(config({"name": f"{models}:make", "args": {"width": 8, "depth": 2}},
                            {"name": f"{data}:images", "args": {"side": 4}}))
    check_resolvable(config({"name": f"{models}:make_any", "args": {"anything": 1}}, {"name": "digits"}))
    check_resolvable(config({"name": "timm:resnet10t.c3_in1k"}, {"name": "torchvision:EMNIST", "root": "/x",
                                                                   "args": {"split": "digits"}}))


def test_resolutions_are_cached(user_modules, tmp_path):
    models, _ = user_modules
    cfg = config({"name": f"{models}:make", "args": {"width": 8}}, {"name": "digits"})
    check_resolvable(cfg)
    (tmp_path / f"{models}.py").unlink()
    del sys.modules[models]                          # a second import would fail now: none happens
    for width in (2, 4, 6):
        check_resolvable(cfg.with_updates({"model.args.width": width}))


# ---------------------------------------------------------------------------- plug-in failures inside a trial

def test_a_factory_that_raises_fails_with_its_own_message_naming_the_plugin(user_modules):
    models, data = user_modules
    cfg = config({"name": f"{models}:make", "args": {"width": 7}}, {"name": f"{data}:images", "args": {"n": 40}})
    check_resolvable(cfg)                            # a value only the factory itself can refuse
    with pytest.raises(PluginError) as e:
        fit(cfg)
    assert str(e.value) == f"model.name '{models}:make': ValueError: width must be even"
    assert isinstance(e.value.__cause__, ValueError)
    again = pickle.loads(pickle.dumps(e.value))      # as it crosses from a Ray worker
    assert (str(again), again.key) == (str(e.value), "model.name")


@pytest.mark.parametrize("factory,fragment", [
    ("returns_a_string", "returned str 'not a model', expected a torch.nn.Module"),
    ("wrong_logits", "to (2, 5), expected logits of shape (2, 3)"),
])
def test_a_model_factory_returning_the_wrong_thing_says_what_it_returned(user_modules, factory, fragment):
    models, _ = user_modules
    with pytest.raises(PluginError, match=r"^model\.name '.*': ") as e:
        build_model(ModelConfig(name=f"{models}:{factory}"), 3, (3, 4, 4))
    assert fragment in str(e.value)


@pytest.mark.parametrize("factory,fragment", [
    ("raises", "FileNotFoundError: no shards under None"),
    ("returns_a_number", "returned int 42, expected a training.data.DataBundle"),
    ("float64", "train[0] is x of torch.float64 (3, 16, 16), expected (x, y) with x a float32 tensor"),
    ("no_classes", "return a dict with train, val and classes"),
])
def test_a_dataset_factory_failing_names_the_plugin(user_modules, factory, fragment):
    _, data = user_modules
    with pytest.raises(PluginError, match=rf"^data\.name '{data}:{factory}': ") as e:
        load_data(TrainConfig.from_dict({"data": {"name": f"{data}:{factory}"}}).data)
    assert fragment in str(e.value)


def test_unknown_model_name_built_directly_names_model_name():
    with pytest.raises(ConfigError, match="or a plug-in") as e:
        build_model(ModelConfig(name="vgg"), 10, (1, 8, 8))
    assert e.value.key == "model.name"
