"""``schedtune recipe FILE``: the step-by-step recipe for choosing hyperparameters, automated.

1. initial-loss  the data loss at init vs ln(C), weight decay off          (tuning.recipe.probes)
2. overfit       100% train accuracy on a few minibatches, regularization off (tuning.recipe.probes)
3. lr-find       one short run per geometric LR: where the loss falls fastest (tuning.recipe.probes)
4. coarse        the experiment's space, base_lr narrowed around that LR, 1-5 epochs, ASHA
5. refine        the coarse top-k configs trained longer at a constant LR; the best one is written
                 as ``recommendation.yaml``, a file ``schedtune tune`` runs again

Steps 1-3 run in this process on the experiment's base config; 4-5 are ``run_experiment`` calls
(each starts and stops its private Ray cluster unless ``--address``) whose trials get the usual
learning-curve diagnosis (step 6 of the recipe: read the curves). Each step prints its verdict,
writes ``OUT/<step>.json`` (and plots), and is logged to MLflow as a nested run of one recipe
run; a step run alone picks up what earlier steps left in OUT.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from tuning.recipe.probes import StepResult
from tuning.recipe.specs import (coarse_doc, recommendation_doc, refine_doc, sweep_bounds, top_samples,
                                 write_spec)
from tuning.spec import ExperimentSpec, load_spec
from tuning.tracking.recipe_log import RecipeLog

STEPS = ("initial-loss", "overfit", "lr-find", "coarse", "refine")
COARSE_EPOCHS, TOP_K = 3, 3
# Step 7 of the recipe: what the best refined run's learning curves say to do next.
NEXT = {"still_improving": "train longer (--refine-epochs, or train.epochs of the recommendation)",
        "overfitting": "add regularization to the space (optim.weight_decay, model.dropout, data.augment) "
                       "and refine again",
        "underfitting": "a bigger model or less regularization, then refine again",
        "diverged": "lower the LR range (--lr) and refine again",
        "plateau_at_start": "check the initialization (step 1-2) and refine again",
        "no_learning": "it is still at chance: check the initialization and the LR range (steps 1-3), then refine again",
        "too_short": "refine with more epochs (--refine-epochs): its curves are too short to read",
        "input_bound": "feed the workers first (data.loader_workers, data.name: raydata, cheaper augmentation): "
                       "its step waited for data, so its time per epoch says little about the recipe"}


class Recipe:
    """The steps over one experiment; results chain in memory and through ``out_dir``."""

    def __init__(self, spec: ExperimentSpec, out_dir: str | Path, *, tracking_uri: Optional[str] = None,
                 storage: Optional[str] = None, address: Optional[str] = None, num_cpus: Optional[int] = None,
                 top_k: int = TOP_K, coarse_epochs: int = COARSE_EPOCHS, coarse_samples: Optional[int] = None,
                 refine_epochs: Optional[int] = None, lr: Optional[float] = None,
                 lrs: Optional[Sequence[float]] = None, out: Callable[[str], None] = print):
        from tuning.tracking.backend import resolve_tracking_uri

        self.spec, self.dir, self.out = spec, Path(out_dir), out
        self.uri = resolve_tracking_uri(tracking_uri)
        self.storage, self.address, self.num_cpus = storage, address, num_cpus
        self.top_k, self.coarse_epochs, self.coarse_samples = top_k, coarse_epochs, coarse_samples
        self.refine_epochs = refine_epochs or max(10, spec.base.epochs)
        self.lr, self.lrs = lr, lrs
        self.results: dict[str, StepResult] = {}
        self.recommendation: Optional[Path] = None
        self.log = RecipeLog(spec, self.uri, out)

    def run(self, steps: Sequence[str] = STEPS) -> dict[str, StepResult]:
        from tuning.tracking.backend import check_tracking

        check_tracking(self.uri)
        self.dir.mkdir(parents=True, exist_ok=True)
        b = self.spec.base
        self.out(f"recipe for {self.spec.options.name}: {b.model.name} on {b.data.name}, {b.optim.name} base_lr "
                 f"{b.optim.base_lr:g}, global batch {b.scaling.global_batch}; files in {self.dir}, MLflow {self.uri}")
        self.log.start(steps)
        status = "FAILED"
        try:
            for i, name in enumerate(steps):
                r = getattr(self, "_" + name.replace("-", "_"))()
                self.results[name] = r
                path = self.dir / f"{name}.json"
                path.write_text(json.dumps(r.to_dict(), indent=1, default=str))
                self.out(f"[{i + 1}/{len(steps)} {name}] {r.verdict.upper()}: {r.summary}"
                         + "".join(f"\n    plot: {p}" for p in r.plots))
                self.log.step(r, path, r.data.get("experiment_run_id"))
            status = "FINISHED"
        finally:   # a step that raised (no cluster room, interrupted) still closes the recipe run
            self.log.finish(self.recommendation, status)
        return self.results

    def _saved(self, step: str) -> Optional[dict[str, Any]]:
        path = self.dir / f"{step}.json"
        return json.loads(path.read_text()) if path.exists() else None

    # -- steps 1-3: probes in this process
    def _initial_loss(self) -> StepResult:
        from tuning.recipe.probes import initial_loss

        return initial_loss(self.spec.base)

    def _overfit(self) -> StepResult:
        from tuning.analysis.plots import loss_figure, save
        from tuning.recipe.probes import overfit_small

        r = overfit_small(self.spec.base)
        r.plots.append(str(save(loss_figure(r.data["loss"], "overfit a small sample: loss per step"),
                                self.dir / "overfit_loss.png")))
        return r

    def _lr_find(self) -> StepResult:
        from tuning.analysis.plots import lr_sweep_figure, save
        from tuning.recipe.probes import default_lrs, lr_sweep

        lrs = list(self.lrs or default_lrs(*sweep_bounds(self.spec)))
        r = lr_sweep(self.spec.base, lrs)
        r.plots.append(str(save(lr_sweep_figure(lrs, r.data["curves"], r.data["lr"]), self.dir / "lr_find.png")))
        return r

    # -- steps 4-5: searches
    def _found_lr(self) -> tuple[float, str]:
        if self.lr is not None:
            return self.lr, "--lr"
        r = self.results.get("lr-find")
        saved = r.to_dict() if r else self._saved("lr-find")
        if saved and saved["data"].get("lr"):
            return saved["data"]["lr"], "the LR sweep"
        return self.spec.base.optim.base_lr, "the base config (no LR sweep result: run --step lr-find first)"

    def _search(self, step: str, spec: ExperimentSpec, points=None):
        from tuning.driver.experiment import run_experiment
        from tuning.analysis.report import results_table

        # Only the refined best (the recommendation) goes to the Model Registry, not the coarse one.
        result = run_experiment(spec, storage=self.storage, tracking_uri=self.uri, address=self.address,
                                num_cpus=self.num_cpus, points=points, register_model=step == "refine",
                                out=lambda s: self.out(f"    {s}"))
        self.out("\n".join("    " + line for line in results_table(result, spec).splitlines()))
        o = spec.options
        best = result.best
        ev = {"trials": len(result.rows), "diverged": sum(r.status == "diverged" for r in result.rows),
              "epochs": spec.base.epochs}
        if best is not None:
            ev[f"best_{o.metric}"] = best.metric
        data = {"spec_file": spec.file, "experiment_run_id": result.parent_run_id, "results_path": result.path,
                "top": top_samples(spec, result.rows, self.top_k),
                "diagnoses": {r.trial_id: r.diagnosis for r in result.rows}}
        return result, ev, data

    def _coarse(self) -> StepResult:
        lr, source = self._found_lr()
        doc = coarse_doc(self.spec, lr, self.coarse_epochs, self.coarse_samples)
        spec = write_spec(doc, self.dir / "coarse.yaml",
                          f"schedtune recipe, step 4 (coarse) for {self.spec.file}: base_lr around {lr:g} "
                          f"(from {source})")
        result, ev, data = self._search("coarse", spec)
        rng = spec.space["optim.base_lr"].args
        if result.best is None:
            return StepResult("coarse", "fail", "no trial produced a valid metric (see the table)", ev, data)
        o = spec.options
        summary = (f"{len(result.rows)} trials x {spec.base.epochs} epochs, base_lr in [{rng[0]:g}, {rng[1]:g}]: "
                   f"best {o.metric} {result.best.metric:.4f}; top {len(data['top'])} go to refine")
        return StepResult("coarse", "ok", summary, ev, data)

    def _refine(self) -> StepResult:
        coarse = self.results.get("coarse")
        saved = coarse.to_dict() if coarse else self._saved("coarse")
        if not saved or not saved["data"].get("top"):
            return StepResult("refine", "fail", "no coarse search results: run the coarse step first "
                                                "(schedtune recipe FILE --step coarse)")
        coarse_spec = load_spec(saved["data"]["spec_file"])
        doc, points = refine_doc(coarse_spec, saved["data"]["top"], self.refine_epochs)
        spec = write_spec(doc, self.dir / "refine.yaml",
                          f"schedtune recipe, step 5 (refine) for {self.spec.file}: the coarse top "
                          f"{len(saved['data']['top'])}, {self.refine_epochs} epochs, constant LR\n"
                          "(the recipe runs exactly these configs; `schedtune tune` samples the choices)")
        result, ev, data = self._search("refine", spec, points)
        best = result.best
        if best is None:
            return StepResult("refine", "fail", "no trial produced a valid metric (see the table)", ev, data)
        cfg = spec.trial_config(best.params)
        self.recommendation = self.dir / "recommendation.yaml"
        o = spec.options
        write_spec(recommendation_doc(self.spec, cfg), self.recommendation,
                   f"schedtune recipe recommendation for {self.spec.file}: {o.metric} {best.metric:.4f} "
                   f"(refine trial {best.trial_id}, MLflow run {best.run_id}, learning curves: {best.diagnosis})\n"
                   f"Run it again: schedtune tune {self.recommendation}")
        data.update({"recommendation": str(self.recommendation), "config": cfg.to_dict(),
                     "best_trial_id": best.trial_id, "best_run_id": best.run_id, "model_version": result.model_version})
        ev["best_diagnosis_" + (best.diagnosis or "none")] = 1
        summary = (f"{len(result.rows)} configs x {spec.base.epochs} epochs at a constant LR: best {o.metric} "
                   f"{best.metric:.4f} (learning curves: {best.diagnosis}); recommendation {self.recommendation}")
        if best.diagnosis in NEXT:
            summary += f"\n    next: {NEXT[best.diagnosis]}"
        return StepResult("refine", "ok", summary, ev, data)
