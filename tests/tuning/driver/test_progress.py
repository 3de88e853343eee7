"""The terminal: a bar with trials done, the best so far and the time left on a TTY, plain lines
elsewhere, a failed trial's own error on its line; Tune's output switched off and restored."""
from __future__ import annotations

import io
import logging
import os
from types import SimpleNamespace

import pytest

import tuning.driver.progress as progress
from tests.conftest import ROOT
from tuning.driver.progress import ProgressPrinter, tune_output_off
from tuning.spec import load_spec

SPEC = load_spec(ROOT / "search_spaces/quickstart.yaml", {"experiment.num_samples": 4, "train.epochs": 5})


class Tty(io.StringIO):
    def isatty(self):
        return True


def trial(tid: str, status: str = "RUNNING", **kw):
    return SimpleNamespace(trial_id=tid, status=status, last_result=kw.pop("last_result", {}),
                           error_file=kw.pop("error_file", None), get_error=lambda: None)


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    return now


def test_on_a_tty_a_bar_with_trials_best_and_time_left_redrawn_in_place(clock, monkeypatch):
    monkeypatch.setattr(progress.shutil, "get_terminal_size", lambda fallback: os.terminal_size((120, 24)))
    term, lines = Tty(), []
    p = ProgressPrinter(SPEC, lines.append, stream=term)
    p.setup()
    a, b = trial("t_00000"), trial("t_00001")
    trials = [a, b, trial("t_00002", "PENDING"), trial("t_00003", "PENDING")]
    clock[0] += 10
    p.on_trial_result(0, trials, a, {"epoch": 5, "val_acc": 0.9})
    p.on_trial_result(0, trials, b, {"epoch": 5, "val_acc": 0.7})   # within BAR_EVERY_S: not redrawn
    a.status, a.last_result = "TERMINATED", {"epoch": 5, "val_acc": 0.9}
    p.on_trial_complete(0, trials, a)
    # 1 trial ended (5 epochs) + b's 5 of 4 x 5 trial-epochs: half done in 10 s -> 10 s left
    assert p.fraction() == pytest.approx(0.5) and p.eta_s() == pytest.approx(10.0)
    out = term.getvalue()
    frames = [f for f in out.split("\r\x1b[K") if f]
    assert frames[0].startswith("[") and "0/4 trials, 2 running | best val_acc 0.9000 (t_00000, epoch 5)" in frames[0]
    assert frames[-1] == ("[###############---------------] 1/4 trials, 1 running | best val_acc 0.9000 "
                          "(t_00000, epoch 5) | ETA 10s")
    assert "\n" not in out   # drawn in place; the trial's end is a line of its own, above the bar
    assert lines == ["[    10s] 1 running, 2 pending, 1/4 done (0 stopped early) | best val_acc 0.9000 "
                     "(t_00000, epoch 5) | t_00000 completed"]
    p.on_experiment_end(trials)
    assert term.getvalue().endswith("\n")
    assert len(p.bar(trials, width=40)) == 40   # fits the terminal


def test_elsewhere_plain_lines_at_most_every_every_s(clock):
    lines = []
    p = ProgressPrinter(SPEC, lines.append, every_s=10.0, stream=io.StringIO())   # not a TTY
    p.setup()
    a = trial("t_00000")
    for epoch in range(1, 4):
        clock[0] += 4
        p.on_trial_result(0, [a], a, {"epoch": epoch, "val_acc": 0.1 * epoch})
    assert lines == ["[     4s] 1 running, 0 pending, 0/4 done (0 stopped early) | best val_acc 0.1000 (t_00000, epoch 1)"]
    clock[0] += 8
    p.on_trial_result(0, [a], a, {"epoch": 4, "val_acc": 0.2})
    assert len(lines) == 2 and lines[1].endswith("best val_acc 0.3000 (t_00000, epoch 3)")


def test_a_failed_trial_s_line_carries_its_own_error(clock, tmp_path):
    error = tmp_path / "error.txt"
    error.write_text("Failure # 1 (occurred at 2025-01-01)\nray::ImplicitFunc.train() (pid=1)\n  File \"x.py\"\n"
                     "training.plugins.PluginError: model.name 'mymodels:make': ValueError: width 13 is unlucky\n")
    lines = []
    p = ProgressPrinter(SPEC, lines.append, stream=io.StringIO())
    bad = trial("t_00001", "ERROR", error_file=str(error))
    p.on_trial_error(0, [bad], bad)
    assert lines[-1].endswith("| t_00001 failed: PluginError: model.name 'mymodels:make': ValueError: width 13 is unlucky")


def test_pickled_with_plain_print(clock):
    import pickle

    p = pickle.loads(pickle.dumps(ProgressPrinter(SPEC, lambda s: None, stream=Tty())))
    assert p.out is print and p.stream is None


def test_tune_output_is_off_inside_and_as_it_was_after(monkeypatch):
    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "1")
    logger = logging.getLogger(progress.TUNE_CONTROLLER_LOGGER)
    level = logger.level
    with tune_output_off():
        from ray.tune.experimental.output import get_air_verbosity

        assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0" and get_air_verbosity(0) is None   # Tune's legacy reporter
        assert logger.level == logging.CRITICAL
    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "1" and logger.level == level
