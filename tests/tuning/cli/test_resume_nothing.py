"""``schedtune tune --resume`` with nothing to resume: exit 2, nothing started. (``--resume-if-present``
starting a run and then resuming it after a kill: tests/tuning/driver/test_resume.py.)"""
from __future__ import annotations

from tests.conftest import ROOT
from tuning import cli

NAME = "it-if-present"


def test_resume_with_nothing_to_resume_exits_2_and_starts_nothing(tmp_path, capsys):
    code = cli.main(["tune", str(ROOT / "search_spaces/quickstart.yaml"), "--resume", "--name", NAME,
                     "--storage", str(tmp_path / "results"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
                     "--address", "127.0.0.1:9"])   # nothing listens there: never reached
    err = capsys.readouterr().err
    assert code == 2 and err == (f"schedtune tune: error: nothing to resume: no interrupted run of {NAME!r} under "
                                 f"{tmp_path / 'results'}/{NAME}\n"), err
