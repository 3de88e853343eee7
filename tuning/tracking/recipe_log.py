"""The recipe in MLflow: one run for ``schedtune recipe``, one nested run per step."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from tuning.analysis.results import finite_numbers
from tuning.spec import ExperimentSpec
from tuning.tracking import schema
from tuning.tracking.backend import experiment_id
from tuning.tracking.entities import metric, tag


class RecipeLog:
    """The recipe in MLflow: one parent run (role ``recipe``) in the experiment's MLflow experiment,
    one nested run per step. A search step's nested run is the experiment run its tuner made.
    MLflow failures are reported once and never stop the recipe."""

    def __init__(self, spec: ExperimentSpec, uri: str, out: Callable[[str], None]):
        self.spec, self.uri, self.out = spec, uri, out
        self.client, self.run_id, self._warned = None, None, False

    def _safe(self, fn, *a, **kw):
        try:
            return fn(*a, **kw)
        except Exception as e:
            if not self._warned:
                self.out(f"[schedtune] MLflow at {self.uri}: {type(e).__name__}: {str(e).splitlines()[0][:200]}; "
                         "the recipe goes on")
                self._warned = True
            return None

    def start(self, steps: Sequence[str]) -> None:
        def start():
            import mlflow

            self.client = mlflow.MlflowClient(self.uri)
            name = self.spec.options.name
            exp_id = experiment_id(self.client, self.uri, name)
            run = self.client.create_run(exp_id, run_name=f"{name}-recipe-{time.strftime('%Y%m%d-%H%M%S')}", tags={
                schema.ROLE: schema.ROLE_RECIPE, schema.SPACE_FILE: self.spec.file,
                schema.RECIPE_STEPS: ",".join(steps)})
            self.run_id = run.info.run_id
            self.client.log_text(self.run_id, self.spec.text, schema.SEARCH_SPACE_ARTIFACT)
        self._safe(start)

    def _tags(self, r) -> dict[str, str]:
        return {schema.PARENT_RUN_ID: self.run_id, schema.RECIPE_STEP: r.step, schema.VERDICT: r.verdict,
                schema.SUMMARY: r.summary[:4000]}

    def step(self, r, json_path: Path, experiment_run_id: Optional[str] = None) -> None:
        """Log ``r`` (a tuning.recipe.probes.StepResult) as a nested run (or, for a search step, tag its experiment run as one)."""
        if self.run_id is None:
            return

        def log():
            if experiment_run_id:
                run_id = experiment_run_id
            else:
                exp_id = self.client.get_run(self.run_id).info.experiment_id
                run_id = self.client.create_run(exp_id, run_name=r.step,
                                                tags={schema.ROLE: schema.ROLE_RECIPE_STEP}).info.run_id
            self.client.log_batch(run_id, metrics=[metric(k, v) for k, v in finite_numbers(r.evidence).items()],
                                  tags=[tag(k, v) for k, v in self._tags(r).items()])
            self.client.log_artifact(run_id, str(json_path))
            for p in r.plots:
                self.client.log_artifact(run_id, p, schema.PLOTS_DIR)
            if not experiment_run_id:
                self.client.set_terminated(run_id, "FINISHED" if r.verdict != "fail" else "FAILED")
        self._safe(log)

    def finish(self, recommendation: Optional[Path], status: str = "FINISHED") -> None:
        if self.run_id is None:
            return

        def finish():
            if recommendation is not None:
                self.client.log_artifact(self.run_id, str(recommendation))
            self.client.set_terminated(self.run_id, status)
        self._safe(finish)
