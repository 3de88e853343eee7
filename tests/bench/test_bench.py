"""The benchmark scripts run: each one's smallest mode (``--smoke``) ends with a well-formed
RESULT line and writes its table. Figures are never asserted here (bench/ prints figures, tests
don't time things). The pure-PyTorch scripts run by default (about a minute on 2 idle cores);
those that start MLflow stores, a Ray cluster or an mlflow server are marked slow. Each script
runs once: the overhead and gpu smokes check their bare-process parts in the run with Ray."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


SHARED = ("common", "processes")   # the modules the scripts import by their plain names (bench/ on their path)


def load_bench(name: str):
    """bench/NAME.py as the module ``bench_NAME``; the scripts' ``from common import ...`` and
    ``from processes import ...`` get bench/common.py and bench/processes.py (loaded as
    ``bench_common``, ``bench_processes``) without putting bench/ on sys.path."""
    shared = {}
    for dep in SHARED[:SHARED.index(name)] if name in SHARED else SHARED:
        shared[dep] = sys.modules.get(f"bench_{dep}") or load_bench(dep)
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    saved = {dep: sys.modules.get(dep) for dep in shared}
    sys.modules.update(shared)
    try:
        spec.loader.exec_module(module)
    finally:
        for dep, old in saved.items():
            if old is None:
                sys.modules.pop(dep, None)
            else:
                sys.modules[dep] = old
    return module


common = load_bench("common")


def run_bench(name: str, tmp_path: Path, *flags: str, timeout: float = 600, cluster=None) -> dict[str, str]:
    """``python bench/NAME.py --smoke --out tmp_path FLAGS``; its RESULT values. With ``cluster``
    (the session's ``ray_cluster``, auth off): ``--address`` it, instead of the script starting and
    stopping a private cluster of its own (~15 s apiece)."""
    env = None
    if cluster is not None:
        flags, env = (*flags, "--address", cluster.address), {**os.environ, "RAY_AUTH_MODE": "disabled"}
    p = subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), "--smoke", "--out", str(tmp_path), *flags],
                       capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    last = p.stdout.strip().splitlines()[-1]
    bench, values = common.parse_result(last)
    assert bench == name
    assert values["mode"] == "smoke"
    md = (tmp_path / f"{name}.md").read_text()
    assert last in md and "load at start" in md and "machine:" in md
    return values


def number(v: str) -> float:
    return float(v)


# ----------------------------------------------------------------------------- bench/common.py

def test_result_line_round_trips():
    line = common.result_line("overhead", {"mode": "quick", "ratio_c_a": 0.98765, "ok": True, "n": 3, "gap": None})
    assert line == "RESULT overhead mode=quick ratio_c_a=0.9877 ok=yes n=3 gap=-"
    assert common.parse_result(line) == ("overhead", {"mode": "quick", "ratio_c_a": "0.9877", "ok": "yes", "n": "3",
                                                      "gap": "-"})


@pytest.mark.parametrize("name, values", [("Bad-Name", {"a": 1}), ("ok", {"Bad Key": 1}), ("ok", {"k": "two words"}),
                                          ("ok", {"k": ""})])
def test_result_line_rejects_what_would_not_parse(name, values):
    with pytest.raises(ValueError):
        common.result_line(name, values)


def test_parse_result_rejects_other_lines():
    for line in ("RESULT overhead", "result overhead a=1", "RESULT overhead a=1 b"):
        with pytest.raises(ValueError):
            common.parse_result(line)


def test_markdown_table_and_numbers():
    table = common.markdown_table(["run", "samples/s"], [["(a)", 12345.6], ["(b)", 0.97123], ["(c)", None]])
    lines = table.splitlines()
    assert lines[0].startswith("| run") and set(lines[1]) <= {"|", "-"}
    assert "12346" in lines[2] and "0.971" in lines[3] and "| -" in lines[4]
    assert len({len(line) for line in lines}) == 1
    assert common.mean_std([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5))
    assert common.mean_std([5.0]) == (5.0, 0.0)
    assert common.median([3.0, 1.0, 2.0, 10.0]) == 2.5


# ----------------------------------------------------------------------------- scripts, no Ray

def test_map_single_threaded_keeps_the_jobs_order_and_reports_progress():
    # spawned processes (finishing in any order) import the module by its plain name, as the scripts do
    code = ("import sys; sys.path.insert(0, 'bench'); from processes import map_single_threaded as m; "
            "print(m(abs, [-3, -1, -2, -5], 2, every_s=0))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    *progress, result = p.stdout.strip().splitlines()
    assert result == "[3, 1, 2, 5]"
    assert [line.split(" runs done")[0] for line in progress] == ["1/4", "2/4", "3/4", "4/4"], progress
    lines: list[str] = []   # one process: this one
    assert load_bench("processes").map_single_threaded(abs, [-3, -1], 1, every_s=1e9, out=lines.append) == [3, 1]
    assert len(lines) == 1 and lines[0].startswith("2/2 runs done") and lines[0].endswith("~0 s left")


def test_large_batch_smoke(tmp_path):
    v = run_bench("large_batch", tmp_path)
    assert v["ordering_holds"] in ("yes", "no")
    for key in ("baseline_err", "same_lr_err", "sqrt_err", "linear_err", "constant_warmup_err", "gradual_warmup_err",
                "grid_best_err", "random_best_err"):
        assert 0 <= number(v[key]) <= 100
    md = (tmp_path / "large_batch.md").read_text()
    assert "(v) batch 256, linear, gradual warmup" in md and "k-sweep" in md   # the default k = 8
    assert v["gap_goal_met"] in ("yes", "no") and v["largest_k_within_1pt"] in ("1", "2", "8", "-")
    assert [number(v[f"k{k}_steps_per_epoch"]) for k in (1, 2, 8)] == [25, 12, 3]   # 800 samples / (k x 32)
    for k in (1, 2, 8):
        assert 0 <= number(v[f"k{k}_rule_err"]) <= 100 and 0 <= number(v[f"k{k}_same_lr_err"]) <= 100
    assert v["k1_rule_err"] == v["k1_same_lr_err"] == v["baseline_err"]   # k = 1 is the baseline (one run)
    assert (tmp_path / "large_batch_k_sweep.png").stat().st_size > 1000


def test_large_batch_grid_and_random_points():
    lb = load_bench("large_batch")
    space = {"optim.base_lr": (1e-3, 1.0), "optim.weight_decay": (1e-6, 1e-3)}
    grid = lb.grid_points(9, space)
    assert len(grid) == 9 and len({g["optim.base_lr"] for g in grid}) == 3
    assert sorted({g["optim.base_lr"] for g in grid}) == pytest.approx([10 ** -2.5, 10 ** -1.5, 10 ** -0.5], rel=1e-9)
    rand = lb.random_points(9, space, seed=0)
    assert len({r["optim.base_lr"] for r in rand}) == 9 and rand == lb.random_points(9, space, seed=0)
    assert all(1e-3 <= r["optim.base_lr"] <= 1.0 and 1e-6 <= r["optim.weight_decay"] <= 1e-3 for r in rand)
    with pytest.raises(ValueError):
        lb.grid_points(8, space)


def test_rung_fidelity_smoke(tmp_path):
    v = run_bench("rung_fidelity", tmp_path)
    assert v["goal_met"] in ("yes", "no") and number(v["compute_ratio"]) > 0
    for space in ("quickstart", "regularization", "large_batch"):
        for scheduler in ("fifo", "asha", "cooldown"):
            assert number(v[f"{space}_{scheduler}_regret"]) >= 0        # nothing beats FIFO's best of the same configs
        assert number(v[f"{space}_fifo_regret"]) == 0
        assert number(v[f"{space}_asha_compute"]) <= number(v[f"{space}_fifo_compute"])
    assert "quickstart_spearman_cooldown_r1" in v and "regularization_kendall_plain_r2" in v   # rungs 1 / 2
    md = (tmp_path / "rung_fidelity.md").read_text()
    assert "cooldown-ASHA" in md and "Per schedule" in md


@pytest.mark.slow   # no Ray, but creating an MLflow sqlite store takes ~10 s
def test_tracking_smoke_sqlite(tmp_path):
    v = run_bench("tracking", tmp_path, "--backends", "sqlite", "--skip-ray")
    assert number(v["sqlite_send_one_epoch_ms"]) > 0 and number(v["sqlite_on_result_ms"]) > 0
    assert number(v["epochs_per_flush"]) >= 1


# ----------------------------------------------------------------------------- scripts with Ray (and a server)

@pytest.mark.integration
@pytest.mark.slow
def test_overhead_smoke(tmp_path):
    """Bare processes (a plain loop, fit) and Ray trials (1 and 2 workers) on a private cluster."""
    v = run_bench("overhead", tmp_path)
    assert number(v["a_samples_per_s"]) > 0 and number(v["b_samples_per_s"]) > 0 and number(v["ratio_b_a"]) > 0
    for key in ("startup_c_s", "startup_d_s", "rss_d_gb", "ratio_c_a", "ratio_d_a"):
        assert number(v[key]) > 0
    assert v["goal_startup_d"] in ("yes", "no")
    md = (tmp_path / "overhead.md").read_text()
    assert "RayTrainWorker.__init__" in md and "ray::RayTrainWorker" in md


@pytest.mark.integration
@pytest.mark.slow
def test_gpu_smoke(tmp_path):
    """bench/gpu.py's smoke run (a CPU, or a GPU where there is one), its JPEG folder also read through
    Ray Data (data.name: raydata) on a private cluster: every part ran and said so; goals are judged
    on a GPU only."""
    v = run_bench("gpu", tmp_path, "--ray-data")
    assert 0 <= number(v["jpeg_wait_ray_data"]) <= 1
    assert "| Ray Data (" in (tmp_path / "gpu.md").read_text()
    for setting in ("fp32", "bf16", "bf16_cl"):            # compile: the full GPU run only
        for what in ("model", "bare", "fit", "ratio"):
            assert number(v[f"small_cnn_{setting}_{what}"]) > 0, (setting, what)
        assert 0 <= number(v[f"small_cnn_{setting}_wait"]) <= 1
    assert "small_cnn_bf16_cl_compile_fit" not in v and v["skipped"] == "0"
    assert all(0 <= number(v[f"jpeg_wait_w{n}"]) <= 1 for n in (0, 2))
    md = (tmp_path / "gpu.md").read_text()
    assert "2,470 img/s" in md and "| loader workers " in md
    if v["device"] == "cpu":
        assert (v["goal_fit_ratio_met"], v["goal_bf16_2x_met"], v["goal_wait_met"]) == ("-", "-", "-")
        assert v["ddp_world"] == "2" and number(v["ddp_total"]) > 0        # 2 CPU processes over gloo
        assert "say nothing about the GPU goals" in md


@pytest.mark.integration
@pytest.mark.slow
def test_asha_smoke(tmp_path, ray_cluster):
    v = run_bench("asha", tmp_path, cluster=ray_cluster)
    assert v["same_configs"] == "yes"
    assert 0 < number(v["asha_epochs"]) <= number(v["fifo_epochs"]) == 3 * 3


@pytest.mark.integration
@pytest.mark.slow
def test_search_smoke(tmp_path, ray_cluster):
    v = run_bench("search", tmp_path, cluster=ray_cluster)
    assert (v["seeds"], v["samples"], v["epochs"]) == ("1", "2", "2")
    budget = 2 * 2
    assert number(v["random_fifo_epochs"]) == number(v["pbt_epochs"]) == budget   # FIFO and PBT run to the end
    for method in ("random_asha", "tpe_asha", "hyperband"):
        assert 0 < number(v[f"{method}_epochs"]) <= budget, method
    for method in ("random_fifo", "random_asha", "tpe_asha", "hyperband", "pbt"):
        assert 0 < number(v[f"{method}_best"]) <= 1 and number(v[f"{method}_worker_s"]) > 0, method


@pytest.mark.integration
@pytest.mark.slow
def test_tracking_smoke_server_and_trials(tmp_path, ray_cluster):
    v = run_bench("tracking", tmp_path, "--backends", "server", cluster=ray_cluster)
    assert number(v["server_send_one_epoch_ms"]) > 0 and number(v["trial_period_ms"]) > 0
    assert "trial_tracker_ms_server_every_0_05s" in v and "trial_tracker_fraction_server_every_2s" in v
    assert number(v["trial_period_ratio_server_every_2s"]) > 0


@pytest.mark.integration
@pytest.mark.slow
def test_scale_smoke(tmp_path, ray_cluster):
    v = run_bench("scale", tmp_path, cluster=ray_cluster)
    assert number(v["trivial_trials"]) == 4 and number(v["concurrency"]) >= 1
    for key in ("s_trivial_tuning_s", "p_trivial_tuning_s", "s_fit_per_trial_s", "p_fit_per_trial_s",
                "tracker_loop_ms_per_trial"):
        assert number(v[key]) > 0
    assert v["goal_overhead"] in ("yes", "no") and v["goal_memory_flat"] in ("yes", "no")
    md = (tmp_path / "scale.md").read_text()
    assert "MLflow writes for 4 child runs" in md and "on_trial_complete" in md
