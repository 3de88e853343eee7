"""args: moved from the former test_tuning_units.py grab-bag."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tuning.cli import build_parser
from tuning.cli.args import overrides

QUICK = ROOT / "search_spaces/quickstart.yaml"
QUICK = ROOT / "search_spaces/quickstart.yaml"


def test_cli_refuses_an_unreachable_tracking_server_before_ray(tmp_path):
    from tuning.driver.cluster import free_ports

    p = subprocess.run([sys.executable, "-m", "tuning.cli", "tune", str(QUICK), "--smoke", "--tracking-uri",
                        f"http://127.0.0.1:{free_ports(1)[0]}", "--storage", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 2 and "cannot reach the MLflow tracking server" in p.stderr
    assert "Traceback" not in p.stderr and "Ray cluster" not in p.stdout


def test_cli_flags_become_dotted_overrides():
    args = build_parser().parse_args(["tune", "f.yaml", "--smoke", "--workers", "3", "--gpus-per-worker", "0.5",
                                      "--name", "x", "--set", "train.optim.base_lr=0.05", "--set",
                                      "train.schedule={name: cosine}"])
    assert overrides(args) == {"experiment.num_samples": 2, "train.epochs": 2, "train.scaling.num_workers": 3,
                               "train.scaling.use_gpu": True, "train.scaling.gpus_per_worker": 0.5,
                               "experiment.name": "x", "train.optim.base_lr": 0.05,
                               "train.schedule": {"name": "cosine"}}


@pytest.mark.parametrize("argv", [["tune", "f.yaml", "--workers", "0"], ["tune", "f.yaml", "--set", "novalue"],
                                  ["tune"], ["bogus"]])
def test_cli_usage_errors_exit_2(argv):
    p = subprocess.run([sys.executable, "-m", "tuning.cli", *argv], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "usage: schedtune" in p.stderr


def test_help_lists_every_command():
    p = subprocess.run([sys.executable, "-m", "tuning.cli", "--help"], capture_output=True, text=True, timeout=60)
    for cmd in ("tune", "validate", "runs", "submit", "jobs", "stop"):
        assert cmd in p.stdout


def test_cli_storage_error_exits_2_before_ray(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    p = subprocess.run([sys.executable, "-m", "tuning.cli", "tune", str(QUICK), "--smoke", "--storage",
                        str(blocker / "r"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 2 and "is not writable" in p.stderr and "Traceback" not in p.stderr
    assert "Ray cluster" not in p.stdout
