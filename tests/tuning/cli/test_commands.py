"""The command table's newer rows and flags: ``--version`` from the installed distribution's
metadata, ``logs ID [--follow]``, ``jobs --json``, ``--address`` optional on every job command (the
environment's, as ``ray job`` reads it), ``--address local`` for ``tune``."""
from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import pytest

from tests.conftest import ROOT
from tuning.cli import COMMANDS, build_parser, main


def test_version_is_the_installed_distributions():
    p = subprocess.run([sys.executable, "-m", "tuning.cli", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0 and p.stdout == f"schedtune {version('schedtune')}\n", p.stdout + p.stderr


def test_job_commands_parse_without_an_address():
    parser = build_parser()
    assert {"submit", "jobs", "logs", "stop"} <= set(COMMANDS)
    logs = parser.parse_args(["logs", "schedtune-x-1", "--follow"])
    assert (logs.command, logs.submission_id, logs.follow, logs.address) == ("logs", "schedtune-x-1", True, None)
    assert parser.parse_args(["jobs", "--json"]).json is True
    submit = parser.parse_args(["submit", "f.yaml", "--py-modules", "a", "--py-modules", "b", "--working-dir", "w"])
    assert (submit.py_modules, submit.working_dir, submit.address) == (["a", "b"], "w", None)
    assert parser.parse_args(["tune", "f.yaml", "--address", "local"]).address == "local"


@pytest.mark.parametrize("argv", [["jobs"], ["jobs", "--json"], ["logs", "schedtune-x-1"], ["stop", "schedtune-x-1"]])
def test_job_commands_without_any_address_exit_2_saying_where_to_put_one(monkeypatch, capsys, argv):
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (f"schedtune {argv[0]}: error: no Ray cluster to talk to: pass --address http://HEAD:8265 "
                   f"(the job API) or set RAY_API_SERVER_ADDRESS or RAY_ADDRESS\n")
