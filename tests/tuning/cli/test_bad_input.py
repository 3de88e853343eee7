"""Property-based: every malformed search-space file, config dict and CLI argument gets an error
naming the key and what was expected (exit 2 from the CLI), and nothing starts.

Inputs are malformed by construction (tests/malformed.py): a valid experiment with one to three
independent mutations, each wrong on its own and carrying the key its error must name and a
fragment of the expectation. `schedtune tune` on bad input is also run as a real process, which
must exit 2 without launching Ray; a control run on a good file shows that check can fail."""
from __future__ import annotations

import math
import signal
import subprocess
import typing

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.malformed import (GOOD, Mutation, check_error, finite, fits, junk, key_of, letters, malformed, name)
from training.config import ConfigError, TrainConfig
from tuning import cli
from tuning.spec import SpaceError, load_spec
from tuning.driver.submit import _yaml_value

FAST = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                                  HealthCheck.filter_too_much])


@settings(max_examples=150, **FAST)
@given(case=malformed())
def test_malformed_space_files_get_a_keyed_error(tmp_path, case):
    doc, ms = case
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(SpaceError) as e:
        load_spec(path)
    check_error(str(e.value), ms, str(path))


@settings(max_examples=150, **FAST)
@given(case=malformed("train"))
def test_malformed_config_dicts_get_a_keyed_config_error(case):
    d, ms = case
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict(d)
    assert str(e.value) == f"{e.value.key}: got {e.value.value!r}, expected {e.value.expected}"
    check_error(str(e.value), ms)


@settings(max_examples=20, deadline=None)
@given(d=junk.filter(lambda v: not isinstance(v, dict)))
def test_a_config_that_is_not_a_mapping_is_a_root_error(d):
    with pytest.raises(ConfigError, match=r"^<root>: got .*, expected a mapping$"):
        TrainConfig.from_dict(d)


def test_the_oracle_starts_from_a_valid_file(tmp_path):
    """Every error above comes from a mutation: GOOD itself loads, and fits() agrees with the
    format on plain cases."""
    path = tmp_path / "good.yaml"
    path.write_text(yaml.safe_dump(GOOD, sort_keys=False))
    spec = load_spec(path)
    assert list(spec.space) == ["optim.base_lr", "model.dropout", "schedule"] and spec.options.num_samples == 2
    assert TrainConfig.from_dict(GOOD["train"]).scaling.global_batch == 32
    assert fits(float, 1) and not fits(float, True) and not fits(float, math.nan) and not fits(int, 1.0)
    assert fits(typing.Optional[str], None) and not fits(list[int], [1, "a"]) and fits(list[int], [])


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture
def nothing_starts(monkeypatch):
    """Fail the test if the CLI starts or joins a Ray cluster, contacts a job API or starts any
    process; afterwards, no new raylet/gcs_server below this process."""
    import psutil
    import ray

    from tuning.driver import cluster, submit

    def refuse(*a, **k):
        raise AssertionError(f"bad input started something: {a!r:.200}")

    def ray_children():
        return {p.pid for p in psutil.Process().children(recursive=True)
                if p.name() in ("raylet", "gcs_server") or p.name().startswith("ray::")}

    before, handler = ray_children(), signal.getsignal(signal.SIGTERM)
    for target, attr in ((cluster.LocalCluster, "start"), (ray, "init"), (subprocess, "Popen"),
                         (submit, "_client")):
        monkeypatch.setattr(target, attr, refuse)
    yield
    signal.signal(signal.SIGTERM, handler)   # cli.main installs its own
    assert ray_children() <= before


INT_FLAGS = {"validate": ["--workers", "--num-samples"], "submit": ["--workers", "--num-samples"],
             "tune": ["--workers", "--num-samples", "--num-cpus"]}
not_positive_int = st.one_of(st.integers(max_value=0).map(str), letters, finite.map(repr),
                             st.sampled_from(["1.5", "2e3", "0x10", "1 2"]))
not_positive_float = st.one_of(finite.filter(lambda v: v <= 0).map(repr), st.sampled_from(["nan", "-inf", ""]),
                               letters.filter(lambda s: s.lower() not in ("inf", "infinity")))
BROKEN_YAML = ["[", "{", "]", "{a: 1", "'", '"x', "a: b: c", "*nope", "!!int abc", "2001-13-45", "[1, 2"]


@st.composite
def bad_flag(draw, command: str) -> tuple[list[str], str]:
    """A flag the argument parser must refuse: (argv, what its error says after 'argument ')."""
    case = draw(st.integers(0, 4))
    if case == 0:
        flag = draw(st.sampled_from(INT_FLAGS[command]))
        return [f"{flag}={draw(not_positive_int)}"], f"{flag}: expected a positive integer"
    if case == 1:
        return [f"--gpus-per-worker={draw(not_positive_float)}"], "--gpus-per-worker: expected a positive number"
    if case == 2:
        return ["--set", draw(letters)], "--set: expected KEY=VALUE"
    if case == 3:
        k = draw(st.one_of(name, st.tuples(name, name).map(".".join)).filter(
            lambda k: k.split(".")[0] not in GOOD))
        return ["--set", f"{k}={draw(st.integers())}"], "--set: expected KEY=VALUE with KEY under"
    return ["--set", f"train.epochs={draw(st.sampled_from(BROKEN_YAML))}"], "--set: expected KEY=VALUE with VALUE in YAML"


def as_set_flags(ms: list[Mutation]) -> list[str]:
    argv = []
    for m in ms:
        for path, value in m.sets:
            argv += ["--set", f"{key_of(path)}={_yaml_value(value)}"]
    return argv


def command_argv(command: str, file: str, tmp_path) -> list[str]:
    if command == "validate":
        return ["validate", file]
    tracking = ["--storage", str(tmp_path / "results"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    if command == "submit":
        return ["submit", file, "--address", "http://127.0.0.1:9", *tracking]
    return ["tune", file, *tracking]


@pytest.mark.parametrize("command", ["validate", "tune", "submit"])
@settings(max_examples=40, **FAST)
@given(data=st.data())
def test_cli_exits_2_naming_the_key_and_starts_nothing(tmp_path, nothing_starts, capsys, command, data):
    """A malformed file, a malformed --set (the same mutations as flags) or a malformed flag."""
    path = tmp_path / "space.yaml"
    how = data.draw(st.sampled_from(["file", "set", "flag"]))
    as_flags = malformed().filter(lambda c: all(p[0] in GOOD for m in c[1] for p, _ in m.sets))
    doc, ms = data.draw(malformed() if how == "file" else as_flags) if how != "flag" else (GOOD, [])
    path.write_text(yaml.safe_dump(GOOD if how == "set" else doc, sort_keys=False))
    argv = command_argv(command, str(path), tmp_path)
    if how == "set":
        argv += as_set_flags(ms)
    if how == "flag":
        extra, said = data.draw(bad_flag(command))
        argv += extra
    try:
        code = cli.main(argv)
    except SystemExit as e:   # argparse
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2, (argv, out, err)
    assert "Traceback" not in err and out == ""
    if how == "flag":
        assert err.startswith("usage: schedtune ")
        assert err.splitlines()[-1].startswith(f"schedtune {command}: error: argument {said}"), err
    else:
        assert err.startswith(f"schedtune {command}: error: "), err
        check_error(err[len(f"schedtune {command}: error: "):], ms, str(path))


@pytest.mark.parametrize("content,says", [
    (b"train: {epochs: 2001-13-45}\n", "valid YAML values"), (b"train: {epochs: !!int abc}\n", "valid YAML values"),
    (b"train: {epochs: " + b"[" * 5000 + b"]" * 5000 + b"}\n", "nested less deeply"),
    (b"\xff\xfe experiment: {}\n", "UTF-8 text"),
    (b"train: {epochs: 2}\ntrain: {epochs: 3}\n", "found duplicate key 'train'")],
    ids=["date", "tag", "deep", "latin1", "duplicate"])
def test_yaml_the_parser_chokes_on_is_a_keyed_error(tmp_path, nothing_starts, capsys, content, says):
    path = tmp_path / "space.yaml"
    path.write_bytes(content)
    try:
        code = cli.main(["validate", str(path)])
    except (ValueError, RecursionError) as e:
        pytest.fail(f"escaped as {type(e).__name__}: {e}"[:300])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"schedtune validate: error: {path}: ") and says in err, err


# ----------------------------------------------------------------------------- a real `schedtune tune` process

# Runs `schedtune tune` (tuning.cli.main) once per case in one fresh process. An audit hook records
# every process it launches and every directory it makes; a Ray launch (`ray start`, raylet,
# gcs_server) is recorded and ends the process at once with status 99, before Ray can come up.
HARNESS = r"""
import contextlib, io, json, os, sys
cases, out = json.load(open(sys.argv[1])), sys.argv[2]
seen = []
def ray_like(args):
    return any(os.path.basename(str(a)) in ("raylet", "gcs_server", "ray") or "ray.scripts" in str(a) for a in args)
def hook(event, args):
    if event in ("subprocess.Popen", "os.posix_spawn", "os.exec", "os.spawn", "os.system"):
        argv = [str(a) for a in (args[1] if event != "os.system" else [args[0]]) or []]
        seen.append({"launch": argv})
        if ray_like(argv):
            json.dump({"ray_launch": argv, "seen": seen}, open(out, "w"))
            os._exit(99)
    elif event in ("tempfile.mkdtemp", "os.mkdir"):
        seen.append({"mkdir": str(args[0])})
sys.addaudithook(hook)
from tuning.cli import main
import psutil
results = []
for argv in cases:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    results.append({"argv": argv, "code": code, "stderr": err.getvalue(), "seen": list(seen)})
    seen.clear()
children = [p.name() for p in psutil.Process().children(recursive=True)]
json.dump({"results": results, "children": children}, open(out, "w"))
"""


def run_harness(cases: list[list[str]], tmp_path) -> tuple[int, dict, set[str]]:
    """(exit status, what the harness wrote, names of every process seen below it while it ran)."""
    import json
    import sys
    import time

    import psutil

    from tests.conftest import ROOT

    (tmp_path / "cases.json").write_text(json.dumps(cases))
    out = tmp_path / "out.json"
    proc = subprocess.Popen([sys.executable, "-c", HARNESS, str(tmp_path / "cases.json"), str(out)], cwd=ROOT)
    names: set[str] = set()
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            names |= {p.name() for p in psutil.Process(proc.pid).children(recursive=True)}
        except psutil.Error:
            pass
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
    code = proc.wait()
    return code, (json.loads(out.read_text()) if out.exists() else {}), names


def _ray_dirs(seen: list[dict]) -> list[str]:
    return [s["mkdir"] for s in seen if "mkdir" in s and ("st-ray-" in s["mkdir"] or "/session_" in s["mkdir"])]


def test_tune_on_bad_input_exits_2_naming_the_key_and_no_ray_process_starts(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(GOOD, sort_keys=False))
    files = {"unknown_top": ("experimnt: {}\n", "experimnt", "one of the top-level keys"),
             "wrong_type": ("train: {optim: {base_lr: abc}}\n", "train.optim.base_lr", "a finite number"),
             "range": ("experiment: {num_samples: 0}\n", "experiment.num_samples", ">= 1"),
             "space": ("space: {optim.base_lr: {loguniform: [0, 1]}}\n", "space.optim.base_lr.loguniform",
                       "0 < low < high"),
             "syntax": ("train: [\n", "line 2, column 1", "valid YAML")}
    cases, expect = [], []
    tracking = ["--storage", str(tmp_path / "results"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    for stem, (text, key, expected) in files.items():
        (tmp_path / f"{stem}.yaml").write_text(text)
        cases.append(["tune", str(tmp_path / f"{stem}.yaml"), *tracking])
        expect.append(f"{tmp_path / stem}.yaml: {key}: got ")
        expect[-1] = (expect[-1], expected)
    cases.append(["tune", str(tmp_path / "missing.yaml"), *tracking])
    expect.append((f"{tmp_path / 'missing.yaml'}: <file>: got ", "a readable file"))
    for extra, key, expected in [(["--set", "train.epochs=abc"], "train.epochs", "an integer"),
                                 (["--gpus-per-worker=inf"], "train.scaling.gpus_per_worker", "a finite number"),
                                 (["--set", "space.bogus={uniform: [0, 1]}"], "space.bogus", "a dotted path")]:
        cases.append(["tune", str(good), *tracking, *extra])
        expect.append((f"{good}: {key}: got ", expected))
    flags = [("--workers=0", "--workers: expected a positive integer"),
             ("--num-cpus=two", "--num-cpus: expected a positive integer"),
             ("--set=experment.num_samples=2", "--set: expected KEY=VALUE with KEY under"),
             ("--set=train.epochs=[", "--set: expected KEY=VALUE with VALUE in YAML")]
    for flag, said in flags:
        cases.append(["tune", str(good), *tracking, flag])
        expect.append(("usage: ", f"argument {said}"))

    code, out, names = run_harness(cases, tmp_path)
    assert code == 0, out.get("ray_launch", out)
    assert not names & {"raylet", "gcs_server", "ray"} and out["children"] == [], (names, out["children"])
    for r, (start, expected) in zip(out["results"], expect, strict=True):
        err = r["stderr"]
        assert r["code"] == 2, r
        assert "Traceback" not in err, err
        assert [s for s in r["seen"] if "launch" in s] == [] and _ray_dirs(r["seen"]) == [], r
        if start == "usage: ":
            assert err.startswith("usage: schedtune tune ")
            assert err.splitlines()[-1].startswith(f"schedtune tune: error: {expected}"), err
        else:
            assert err.startswith(f"schedtune tune: error: {start}") and err.count("\n") == 1, err
            assert expected in err.partition(", expected ")[2], err
    assert not (tmp_path / "results").exists() and not (tmp_path / "m.db").exists()


def test_the_harness_sees_tune_start_ray_on_a_good_file(tmp_path):
    """The check above can fail: on a valid file `schedtune tune` gets as far as `ray start`."""
    import shutil

    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(GOOD, sort_keys=False))
    code, out, _ = run_harness([["tune", str(good), "--storage", str(tmp_path / "results"),
                                 "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]], tmp_path)
    for d in _ray_dirs(out.get("seen", [])):   # the cluster's temp dir, made just before `ray start`
        if d.startswith("/tmp/st-ray-"):
            shutil.rmtree(d, ignore_errors=True)
    assert code == 99, out
    assert "ray.scripts.scripts" in out["ray_launch"] and "start" in out["ray_launch"], out["ray_launch"]
    assert any("st-ray-" in d for d in _ray_dirs(out["seen"])), out["seen"]
