"""Every name schedtune writes to MLflow: run tags, params and artifact paths, in one place.

The MLflow layout (DESIGN.md, "MLflow layout") is a contract with the people who read the UI, with
``--resume`` (runs are found again by tags) and with the commands that read runs back (runs, report,
ensemble, export): a name is written here once and imported wherever it is used.
"""
from __future__ import annotations

# -- MLflow's own tags
PARENT_RUN_ID = "mlflow.parentRunId"             # nests a trial run under its experiment run
EXPERIMENT_KIND = "mlflow.experimentKind"         # MLflow 3: which view the UI opens an experiment in
EXPERIMENT_KIND_TRAINING = "custom_model_development"

# -- every schedtune run
ROLE = "schedtune.role"                          # experiment | ensemble | recipe | recipe-step
ROLE_EXPERIMENT, ROLE_ENSEMBLE, ROLE_RECIPE, ROLE_RECIPE_STEP = "experiment", "ensemble", "recipe", "recipe-step"

# -- the experiment (parent) run
RUN_DIR = "schedtune.run_dir"                    # where Tune keeps this invocation: finds the run on --resume
SPACE_FILE = "schedtune.space_file"
SPACE_SHA256 = "schedtune.space_sha256"
BEST_TRIAL_ID = "schedtune.best_trial_id"
BEST_RUN_ID = "schedtune.best_run_id"
MODEL_VERSION = "schedtune.model_version"
LOST_METRICS = "schedtune.lost_metrics"
LOST_ARTIFACTS = "schedtune.lost_artifacts"      # files not uploaded after every retry (also on a trial run)
PARENT_PARAMS = ("search", "num_samples", "metric", "mode", "scheduler", "seed")
PARAM_METRIC, PARAM_MODE = "metric", "mode"

# -- a trial (child) run
TRIAL_ID = "schedtune.trial_id"
STATUS = "schedtune.status"                      # running, then how it ended (analysis.results.end_state)
STATUS_RUNNING = "running"
END_EPOCH = "schedtune.end_epoch"
DIVERGED_STEP = "schedtune.diverged_step"
DIVERGED_LR = "schedtune.diverged_lr"
ERROR_FILE = "schedtune.error_file"
ERROR = "schedtune.error"   # a failed trial's error, the line that says what went wrong (the plug-in's own)
DIAGNOSIS = "schedtune.diagnosis"
DIAGNOSIS_EVIDENCE = "schedtune.diagnosis_evidence"
MODEL_WEIGHTS = "schedtune.model_weights"        # raw | ema: which weights the trial's model is
PARETO_FRONT = "schedtune.pareto_front"          # "true" on the runs of a multi-objective experiment's front
PBT_PERTURBATIONS = "schedtune.pbt.perturbations"  # how many times PBT perturbed the trial


def pbt_perturbation_tag(i: int) -> str:
    """``schedtune.pbt.perturbation.<i>`` (1-based): JSON of epoch, from_trial, from_epoch, old,
    from_values, new, operations, factors (tuning.driver.trial_schedulers.RecordingPBT)."""
    return f"schedtune.pbt.perturbation.{i}"


# -- cost: a trial's on its run, the experiment's (the sum) on the parent; resources x wall time, start-up included
COST_WORKER_SECONDS = "schedtune.cost.worker_seconds"
COST_CPU_HOURS = "schedtune.cost.cpu_hours"
COST_GPU_HOURS = "schedtune.cost.gpu_hours"
ENDED_BY = "schedtune.ended_by"                  # parent: what ended the experiment (tuning.driver.stopping)


def system_metrics_node_tag(node: str | None) -> str:
    """A trial run's tag of where a node's system metrics (``system/<node>/...``) were sampled:
    ``schedtune.system_metrics.node`` (one node), ``schedtune.system_metrics.node_<k>``
    (tuning.tracking.system_metrics)."""
    return f"schedtune.system_metrics.{node or 'node'}"


def checkpoint_epoch_tag(label: str) -> str:
    """``schedtune.checkpoint_best_epoch`` / ``schedtune.checkpoint_last_epoch``."""
    return f"schedtune.checkpoint_{label}_epoch"


# -- an ensemble run
EXPERIMENT_RUN_ID = "schedtune.experiment_run_id"
MEMBERS = "schedtune.members"
MEMBER_TRIALS = "schedtune.member_trials"


def member_tag(i: int) -> str:
    return f"schedtune.member.{i}"


# -- a recipe run and its steps
RECIPE_STEPS = "schedtune.recipe_steps"
RECIPE_STEP = "schedtune.recipe_step"
VERDICT = "schedtune.verdict"
SUMMARY = "schedtune.summary"

# -- Ray job metadata (the job API, not MLflow: the same namespace, kept here with the rest)
JOB_EXPERIMENT = "schedtune.experiment"
JOB_USER = "schedtune.user"

# -- artifact paths
SEARCH_SPACE_ARTIFACT = "search_space.yaml"
RESULTS_ARTIFACT = "results.md"
PARETO_ARTIFACT = "pareto_front.md"              # parent of a multi-objective experiment: the front's table
PARETO_JSON_ARTIFACT = "pareto_front.json"       # ... every trial's point and whether it is on the front
PARETO_PLOT = "pareto_front.png"                 # ... under plots/
PLOTS_DIR = "plots"
CHECKPOINTS_DIR = "checkpoints"
BEST_CHECKPOINT = "checkpoints/best"
LAST_CHECKPOINT = "checkpoints/last"
LAST_TRACE = "checkpoints/last/trace.json"
LAST_META = "checkpoints/last/meta.json"
ENSEMBLE_ARTIFACT = "ensemble.txt"
MODEL_ARTIFACT = "model"


def export_dir(fmt: str) -> str:
    """Where ``schedtune export`` logs a model file and its sidecar on the trial run: ``exports/onnx``
    (``model.onnx`` + ``model.json``, ``model.int8.onnx`` + ``model.int8.json``), ``exports/torchscript``."""
    return f"exports/{fmt}"


# -- the registered model (the MLflow Model Registry)
CHAMPION_ALIAS = "champion"                      # the best version registered so far, by the experiment's metric
MODEL_STATE_DICT = "state_dict.pt"               # extra file of the registered model: its weights (weights-only)
MODEL_SIDECAR = "model.json"                     # extra file: class names, normalization, source, check
# model version tags: where it came from (TRIAL_ID, EXPERIMENT_RUN_ID) and what the champion is compared on
VERSION_METRIC = "schedtune.metric"              # e.g. val_acc
VERSION_MODE = "schedtune.mode"                  # max | min
VERSION_METRIC_VALUE = "schedtune.metric_value"
