"""The hyperparameter recipe: verdicts on crafted curves, the probes on real digits runs, the LR
sweep against a grid, the derived search-space files, and the whole recipe on a real Ray cluster."""
from __future__ import annotations

import json
import math

import pytest

from tests.conftest import ROOT, sqlite_store
from tests.tuning.analysis.test_diagnose import one_thread  # noqa: F401  (a fixture: one torch thread for tiny models)
from training.config import TrainConfig
from tuning.recipe.probes import (default_lrs, initial_loss, initial_loss_verdict, lr_sweep, overfit_small, overfit_verdict,
                           pick_lr)
from tuning.recipe.specs import coarse_doc, recommendation_doc, refine_doc, sweep_bounds, top_samples, write_spec
from tuning.spec import load_spec

QUICK = ROOT / "search_spaces/quickstart.yaml"


# ----------------------------------------------------------------------------- verdicts (pure)

def test_initial_loss_verdicts():
    ln10 = math.log(10)
    assert initial_loss_verdict(2.33, 10) == ("ok", "")
    verdict, cause = initial_loss_verdict(4.0, 10)
    assert verdict == "fail" and cause.startswith("bad initialization")
    verdict, cause = initial_loss_verdict(0.5, 10)
    assert verdict == "fail" and cause.startswith("label problems")
    assert initial_loss_verdict(0.5, 10, pretrained=True)[0] == "ok"
    assert initial_loss_verdict(ln10, 10, labels_in_range=False)[1].startswith("label problems")
    verdict, cause = initial_loss_verdict(ln10, 10, l2_term=1.0)
    assert verdict == "warn" and cause.startswith("weight decay on")


def test_overfit_verdicts():
    assert overfit_verdict([2.3, 1.0, 0.1], 42, False) == ("ok", "100% training accuracy after 42 steps")
    assert overfit_verdict([2.3] * 50, None, False)[1].endswith("LR too low / bad initialization")
    assert overfit_verdict([2.3] * 10 + [50.0] * 10, None, False)[1].endswith("LR too high")
    assert overfit_verdict([2.3, 2.0, math.inf], None, True)[1] == "the loss became Inf/NaN: LR too high"
    verdict, what = overfit_verdict([2.3 - 0.01 * i for i in range(100)], None, False)
    assert verdict == "warn" and "LR too low" in what


def test_pick_lr_takes_the_fastest_fall_that_does_not_diverge():
    lrs = [1e-3, 1e-2, 1e-1, 1.0]
    curves = [[2.3 - 0.002 * i for i in range(50)], [2.3 * 0.97 ** i for i in range(50)],
              [2.3 * 0.9 ** i for i in range(50)], [2.3, 30.0, 80.0] + [2.5] * 47]
    pick = pick_lr(lrs, curves, num_classes=10)
    assert pick["lr"] == 0.1 and pick["diverged"] == [False, False, False, True]
    assert pick_lr([1.0], [[2.3, math.inf]])["lr"] is None
    assert default_lrs(1e-4, 10.0) == [1e-4, 3.2e-4, 1e-3, 3.2e-3, 0.01, 0.032, 0.1, 0.32, 1.0, 3.2, 10.0]


# ----------------------------------------------------------------------------- the probes on digits

def base(**updates) -> TrainConfig:
    return load_spec(QUICK).base.with_updates(updates)


def test_initial_loss_probe_on_digits(one_thread):
    r = initial_loss(base())
    assert r.verdict == "ok" and abs(r.evidence["relative_error"]) < 0.05
    assert r.evidence["ln_num_classes"] == pytest.approx(math.log(10)) and r.evidence["num_classes"] == 10
    heavy = initial_loss(base(**{"optim.weight_decay": 0.1}))      # the data loss is the same, the objective not
    assert heavy.evidence["initial_loss"] == pytest.approx(r.evidence["initial_loss"])
    assert heavy.verdict == "warn" and "weight decay on" in heavy.summary


@pytest.mark.parametrize("updates,verdict,looks_like", [
    ({}, "ok", "100% training accuracy"),
    ({"model.init": "zero"}, "fail", "LR too low / bad initialization"),
    ({"optim.base_lr": 1e-4}, "fail", "LR too low / bad initialization"),
    ({"optim.base_lr": 10.0}, "fail", "LR too high"),
])
def test_overfit_probe_on_digits(updates, verdict, looks_like, one_thread):
    r = overfit_small(base(**updates), max_steps=200)
    assert r.verdict == verdict and looks_like in r.summary, r.summary
    assert r.evidence["samples"] == 5 * 64 and r.evidence["batches"] == 5
    if verdict == "ok":
        assert r.evidence["train_acc"] == 1.0 and r.evidence["steps"] < 200


def test_lr_sweep_picks_within_10x_of_the_grid_best(one_thread):
    """The LR sweep (100 steps per LR) against a grid of full 6-epoch trainings of the same config."""
    from training.loop import fit

    cfg = base(**{"scaling.num_workers": 1, "scaling.batch_per_worker": 64})
    grid = {lr: fit(cfg.with_updates({"optim.base_lr": lr})).best["val_acc"]
            for lr in (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)}
    best = max(grid, key=grid.get)
    r = lr_sweep(cfg, default_lrs(1e-4, 10.0))
    print(f"grid {grid}; sweep picks {r.data['lr']}")
    assert r.verdict == "ok" and best / 10 <= r.data["lr"] <= best * 10
    assert r.evidence["diverges_at"] > r.data["lr"]


# ----------------------------------------------------------------------------- derived files

def test_coarse_narrows_base_lr_around_the_pick(tmp_path):
    spec = load_spec(QUICK)
    assert sweep_bounds(spec) == (1e-4, 10.0)        # the space's [1e-3, 1] and a decade either side
    coarse = write_spec(coarse_doc(spec, 0.1, epochs=3, num_samples=5), tmp_path / "coarse.yaml", "a header")
    assert coarse.space["optim.base_lr"].kind == "loguniform" and coarse.space["optim.base_lr"].args == (0.0333, 0.3)
    assert coarse.base.epochs == 3 and coarse.options.num_samples == 5 and coarse.options.scheduler.name == "asha"
    assert set(coarse.space) == set(spec.space) and coarse.base.scaling == spec.base.scaling
    assert (tmp_path / "coarse.yaml").read_text().startswith("# a header\n")
    assert write_spec(coarse_doc(spec, 0.1, epochs=9), tmp_path / "c2.yaml").base.epochs == 5   # 1-5 epochs


class Row:
    def __init__(self, trial_id, metric, params, status="completed", diagnosis="healthy"):
        self.trial_id, self.metric, self.params = trial_id, metric, params
        self.status, self.diagnosis = status, diagnosis


def test_refine_runs_the_top_k_joint_configs_at_a_constant_lr(tmp_path):
    coarse = write_spec(coarse_doc(load_spec(QUICK), 0.1, epochs=3), tmp_path / "coarse.yaml")
    s = {"model.dropout": 0.1, "optim.weight_decay": 1e-4}
    rows = [Row("a", 0.96, {**s, "optim.base_lr": 0.2, "schedule": {"name": "cosine"}}),
            Row("b", 0.95, {**s, "optim.base_lr": 0.05, "schedule": {"name": "linear"}}),
            Row("c", 0.95, {**s, "optim.base_lr": 0.2, "schedule": {"name": "linear"}}),   # = a, once constant
            Row("d", None, {**s, "optim.base_lr": 2.0, "schedule": {"name": "cosine"}}, status="diverged")]
    top = top_samples(coarse, rows, k=4)
    assert [t["trial_id"] for t in top] == ["a", "b", "c"]
    doc, points = refine_doc(coarse, top, epochs=12)
    refine = write_spec(doc, tmp_path / "refine.yaml")
    assert points == [{"optim.base_lr": 0.2}, {"optim.base_lr": 0.05}]
    assert refine.space["optim.base_lr"].kind == "choice" and refine.space["optim.base_lr"].args == (0.2, 0.05)
    assert refine.base.model.dropout == 0.1 and refine.base.optim.weight_decay == 1e-4   # equal in all: fixed
    assert refine.base.schedule.name == "constant" and refine.base.schedule.warmup == "linear"   # no decay, warmup kept
    assert refine.base.epochs == 12 and refine.options.num_samples == 2 and refine.options.scheduler.name == "fifo"
    assert refine.trial_config(points[1]).optim.base_lr == 0.05
    one, none = refine_doc(coarse, top[:1], epochs=12)
    assert none is None and one["space"] == {} and one["train"]["optim"]["base_lr"] == 0.2


def test_recommendation_is_a_file_tune_runs_again(tmp_path):
    spec = load_spec(QUICK)
    cfg = spec.base.with_updates({"optim.base_lr": 0.123, "epochs": 10})
    rec = write_spec(recommendation_doc(spec, cfg), tmp_path / "recommendation.yaml")
    assert rec.base == cfg and rec.space == {} and rec.options.num_samples == 1
    assert rec.options.name == "digits-quickstart-recommended" and rec.options.scheduler.name == "fifo"


def test_fixed_samples_searcher(tmp_path):
    from ray.tune.search import Searcher

    from tuning.driver.search import FixedSamples

    s = FixedSamples([{"a": 1, "schedule": {"name": "step", "milestones": [0.5]}}, {"a": 2}], "val_acc", "max")
    assert s.set_search_properties(None, None, {"a": object()})
    assert s.suggest("t1") == {"a": 1, "schedule": {"name": "step", "milestones": [0.5]}}
    s.save(str(tmp_path / "s.pkl"))
    assert s.suggest("t2") == {"a": 2} and s.suggest("t3") == Searcher.FINISHED
    t = FixedSamples([])
    t.restore(str(tmp_path / "s.pkl"))
    assert t.suggest("t2") == {"a": 2}


# ----------------------------------------------------------------------------- the command

def test_probe_steps_alone_from_the_cli(tmp_path, capsys, one_thread):
    from tuning.cli import main

    uri = sqlite_store(tmp_path / "mlflow.db")
    args = ["recipe", str(QUICK), "--out", str(tmp_path / "out"), "--tracking-uri", uri]
    assert main(args + ["--step", "lr-find", "--step", "initial-loss"]) == 0
    printed = capsys.readouterr().out
    assert "[1/2 initial-loss] OK: data loss at init" in printed and "[2/2 lr-find] OK: base_lr " in printed
    saved = json.loads((tmp_path / "out/lr-find.json").read_text())
    assert saved["verdict"] == "ok" and saved["data"]["lr"] > 0
    assert (tmp_path / "out/lr_find.png").stat().st_size > 0
    # refine needs the coarse results: exit 1, saying so
    assert main(args + ["--step", "refine"]) == 1
    assert "run the coarse step first" in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_recipe_end_to_end_on_digits(ray_cluster, tmp_path, one_thread):
    """All five steps on the quickstart with 1-worker trials on the session's Ray cluster; the
    recommendation.yaml config, trained again, reaches 0.97 val_acc at its best epoch (the refine
    trial's number), and MLflow has one recipe run with a nested run per step."""
    import mlflow

    from training.loop import fit
    from tuning.recipe import STEPS, Recipe

    spec = load_spec(QUICK, {"experiment.name": "it-recipe", "experiment.num_samples": 8,
                             "train.scaling.num_workers": 1, "train.scaling.batch_per_worker": 64,
                             "train.scaling.cpus_per_worker": 0.5})
    uri = sqlite_store(tmp_path / "mlflow.db")
    lines: list[str] = []
    recipe = Recipe(spec, tmp_path / "out", tracking_uri=uri, storage=str(tmp_path / "results"),
                    address=ray_cluster.address, top_k=3, coarse_epochs=3, refine_epochs=10, out=lines.append)
    results = recipe.run()
    print("\n".join(lines))
    assert [r.verdict for r in results.values()] == ["ok"] * 5, [r.summary for r in results.values()]
    refine = results["refine"]
    assert refine.evidence["best_val_acc"] >= 0.97
    rec = load_spec(recipe.recommendation)           # valid, and runs again with `schedtune tune`
    assert rec.base.schedule.name == "constant" and rec.base.epochs == 10
    # The recommendation itself reaches it: its config trained again as a plain 1-worker fit (what its
    # refine trial ran, on one thread) gives the trial's best epoch back. The bar is on the best epoch
    # (the checkpoint kept and registered), not the last (measured: best 0.975 at epoch 8, last 0.969).
    again = fit(rec.base)
    print(f"recommendation again: best val_acc {again.best['val_acc']:.4f} at epoch {again.best['epoch']}, "
          f"final {again.history[-1]['val_acc']:.4f}")
    assert again.best["val_acc"] >= 0.97
    assert again.best["val_acc"] == pytest.approx(refine.evidence["best_val_acc"], abs=1e-9)
    lr = results["lr-find"].data["lr"]
    assert lr / 3 * 0.99 <= rec.base.optim.base_lr <= lr * 3 * 1.01   # from the narrowed coarse range
    for step in STEPS:
        assert (tmp_path / "out" / f"{step}.json").exists()

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("it-recipe")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`schedtune.role` = 'recipe'")
    nested = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.data.tags["schedtune.recipe_step"] for r in nested) == sorted(STEPS)
    by_step = {r.data.tags["schedtune.recipe_step"]: r for r in nested}
    assert by_step["initial-loss"].data.metrics["ln_num_classes"] == pytest.approx(math.log(10))
    assert {a.path for a in client.list_artifacts(by_step["lr-find"].info.run_id, "plots")} == {"plots/lr_find.png"}
    coarse_run = by_step["coarse"]   # the search's own experiment run, its trials nested under it
    assert coarse_run.data.tags["schedtune.role"] == "experiment"
    trials = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{coarse_run.info.run_id}'")
    assert len(trials) == 8 and all("schedtune.diagnosis" in t.data.tags for t in trials)
    assert "recommendation.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    versions = client.search_model_versions("name = 'it-recipe'")     # the recommendation only, not the coarse best
    assert [v.run_id for v in versions] == [refine.data["best_run_id"]]

