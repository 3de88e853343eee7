"""Fixtures the driver tests share, each started once for the package: a real token-auth Ray head
(``ray start --head`` through LocalCluster: its own temp dir and ports, 2 CPUs, ``RAY_AUTH_MODE=token``
and a random ``RAY_AUTH_TOKEN`` in its environment), and a user's project outside the repository
(a model factory and a dataset factory, referenced as ``module:callable`` from its search-space file)."""
from __future__ import annotations

import secrets
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from tuning.driver.cluster import LocalCluster


@dataclass
class Head:
    url: str            # the dashboard / job API
    address: str        # the GCS, for ray.init
    token: str
    tmp: Path


@pytest.fixture(scope="package")
def head(tmp_path_factory):
    token = secrets.token_hex(16)
    cluster = LocalCluster(num_cpus=2, env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    cluster.start()
    try:
        yield Head(cluster.dashboard_url, cluster.address, token, tmp_path_factory.mktemp("submit"))
    finally:
        cluster.stop()


def hold_token(mp: pytest.MonkeyPatch, head: Head) -> None:
    """This process holds the head's token, as a user who set it up would."""
    mp.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    mp.setenv("RAY_AUTH_MODE", "token")
    mp.setenv("RAY_AUTH_TOKEN", head.token)


MODELS = '''
    """A user's model factory: an MLP whose hidden width is its own argument."""
    from torch import nn


    def make(num_classes, input_shape, width=8):
        if width == 13:
            raise ValueError("width 13 is unlucky")
        features = 1
        for s in input_shape:
            features *= s
        return nn.Sequential(nn.Flatten(), nn.Linear(features, width), nn.ReLU(), nn.Linear(width, num_classes))
'''
DATA = '''
    """A user's dataset factory: two Gaussian blobs in 8 dimensions, named classes."""
    import torch
    from torch.utils.data import TensorDataset


    def blobs(n=400, seed=0):
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, 2, (n,), generator=g)
        x = torch.randn(n, 8, generator=g) + 1.5 * (2 * y[:, None].float() - 1)
        cut = n * 3 // 4
        return {"train": TensorDataset(x[:cut], y[:cut]), "val": TensorDataset(x[cut:], y[cut:]),
                "classes": ["neg", "pos"]}
'''
SPACE = '''
    experiment: {name: user-plugins, metric: val_acc, mode: max, num_samples: 1, search: grid, scheduler: {name: fifo}}
    train:
      epochs: 2
      data: {name: "userdata:blobs", args: {n: 400}}
      model: {name: "usermodels:make", args: {width: 8}}
      optim: {name: sgd, base_lr: 0.1}
      scaling: {num_workers: 1, batch_per_worker: 32, cpus_per_worker: 0.5}
    space:
      model.args.width: {grid: [6, 13]}     # 13: the factory raises inside its trial
'''


@dataclass
class UserProject:
    dir: Path           # the project: usermodels.py, userdata.py, space.yaml (nothing else on any path)
    space: Path
    elsewhere: Path     # an unrelated directory to run commands from


@pytest.fixture(scope="package")
def user_project(tmp_path_factory) -> UserProject:
    root = tmp_path_factory.mktemp("user-project")
    for name, text in (("usermodels.py", MODELS), ("userdata.py", DATA), ("space.yaml", SPACE)):
        (root / name).write_text(textwrap.dedent(text).lstrip())
    return UserProject(root, root / "space.yaml", tmp_path_factory.mktemp("elsewhere"))
