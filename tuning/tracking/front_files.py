"""A multi-objective experiment's Pareto front in MLflow: on the parent run the front as a table
(``pareto_front.md``), every trial's point as data (``pareto_front.json``) and the plot
(``plots/pareto_front.png``); on each front member's run the tag ``schedtune.pareto_front = true``
(what ``schedtune runs`` marks)."""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from tuning.analysis.pareto import front_json, front_table
from tuning.spec import ExperimentSpec
from tuning.tracking import schema


def log_front(tracker, spec: ExperimentSpec, rows: list) -> None:
    """Log the front of ``rows`` (tuning.analysis.results.TrialRow, objectives and on_front set)
    through ``tracker`` (tuning.tracking.callback.MLflowTracker). A tracking server that is down
    loses the front (said on stderr), never the experiment."""
    from tuning.analysis.plots import pareto_figure, save
    from tuning.tracking.callback import PARENT

    objectives = spec.options.objectives
    names = [m.name for m in objectives]
    with_point = [r for r in rows if r.objectives is not None]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, schema.PARETO_ARTIFACT).write_text(front_table(rows, names) + "\n")
            Path(tmp, schema.PARETO_JSON_ARTIFACT).write_text(json.dumps(front_json(rows, objectives), indent=1))
            if with_point:
                save(pareto_figure([r.objectives for r in with_point], [r.on_front for r in with_point], names),
                     Path(tmp, schema.PLOTS_DIR, schema.PARETO_PLOT))
            tracker.lost_artifacts[PARENT] += tracker.uploader.upload_counted(
                "the Pareto front", tracker.parent_run_id, tmp, None)
        for r in rows:
            if r.on_front and r.run_id:
                tracker.client.set_tag(r.run_id, schema.PARETO_FRONT, "true")
    except Exception as e:   # the server went away at the very end
        print(f"[schedtune] could not log the Pareto front to MLflow at {tracker.uri}: {e}", file=sys.stderr)
