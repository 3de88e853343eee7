"""Which cluster a command uses, as Ray's own tools choose it (tuning.driver.address)."""
from __future__ import annotations

import pytest

from tuning.driver.address import cluster_to_join, job_api_address


@pytest.fixture
def env(monkeypatch):
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_tune_joins_address_then_ray_address_else_a_private_cluster(env):
    assert cluster_to_join(None) == (None, "local")
    assert cluster_to_join("10.0.0.1:6379") == ("10.0.0.1:6379", "--address")
    env.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    assert cluster_to_join(None) == ("10.0.0.2:6379", "RAY_ADDRESS")
    assert cluster_to_join("auto") == ("auto", "--address")          # the flag wins over the environment
    assert cluster_to_join("local") == (None, "local")               # --address local: private, whatever it says
    env.setenv("RAY_ADDRESS", "local")                               # ray.init's own word for a new local cluster
    assert cluster_to_join(None) == (None, "local")
    env.setenv("RAY_API_SERVER_ADDRESS", "http://head:8265")          # the job API is not a cluster to join
    env.delenv("RAY_ADDRESS")
    assert cluster_to_join(None) == (None, "local")


def test_job_commands_take_address_then_api_server_then_ray_address(env):
    assert job_api_address(None) == (None, "")
    env.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    assert job_api_address(None) == ("10.0.0.2:6379", "RAY_ADDRESS")
    env.setenv("RAY_API_SERVER_ADDRESS", "http://head:8265")
    assert job_api_address(None) == ("http://head:8265", "RAY_API_SERVER_ADDRESS")
    assert job_api_address("http://other:8265") == ("http://other:8265", "--address")
