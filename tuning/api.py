"""The Python API: ``load_spec``, ``run`` and ``submit``, exported from ``tuning``.

The CLI is a thin layer over these three (``schedtune validate/tune/submit``): the same errors
(``tuning.spec.SpaceError`` for the file, ``training.config.ConfigError``, ``SubmitError`` for the
cluster, ...) and the same results. ``import tuning`` stays light: Ray, MLflow, torch and pandas
are imported inside the functions, when they are called.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

if TYPE_CHECKING:
    import pandas

    from tuning.analysis.results import ExperimentResult
    from tuning.driver.submit import Job
    from tuning.spec import ExperimentSpec

Source = Union[str, Path, dict, "ExperimentSpec"]


def load_spec(source: str | Path | dict, overrides: list[str] | dict[str, Any] | None = None, *,
              code_dir: str | Path | None = None) -> "ExperimentSpec":
    """A validated experiment from a search-space file (a path) or the same document as a dict.

    ``overrides``: dotted keys under ``experiment.``, ``train.`` or ``space.``, as a dict
    (``{"train.epochs": 2}``) or as ``--set`` strings (``["train.epochs=2"]``, values in YAML).
    ``code_dir``: where ``package.module:callable`` plug-ins import from (default: the file's
    directory; the working directory for a dict); it goes first on ``sys.path``, and every plug-in
    name is resolved. Every error names the file (``<dict>`` for a dict), the key and what was
    expected: ``tuning.spec.SpaceError`` (a malformed ``KEY=VALUE``: ValueError).

    Example: ``tuning.load_spec("search_spaces/quickstart.yaml", ["experiment.num_samples=2"])``.
    """
    from tuning.spec import load_spec as _load
    from tuning.spec.overrides import as_overrides

    return _load(source, as_overrides(overrides), code_dir=code_dir)


@dataclass
class RunResult:
    """What ``tuning.run`` returns: the best trial and every trial of the invocation."""
    name: str
    best_config: Optional[dict[str, Any]]    # the best trial's whole train config (nested, as TrainConfig.to_dict)
    best_params: Optional[dict[str, Any]]    # its sampled values, by space key
    best_metric: Optional[float]             # its score: the best value of experiment.metric it reported
    best_trial_id: Optional[str]
    best_run_id: Optional[str]               # its MLflow run
    best_checkpoint: Optional[str]           # its best checkpoint directory on the results storage (path or URI)
    parent_run_id: Optional[str]             # the invocation's MLflow run
    trials: "pandas.DataFrame"               # one row per trial, best first
    path: str                                # the invocation on the results storage (what --resume continues)
    tracking_uri: str
    model_version: Optional[str] = None      # the best model's version in the MLflow Model Registry
    experiment: Optional["ExperimentResult"] = field(default=None, repr=False)   # everything, as the CLI reads it

    @property
    def ok(self) -> bool:
        """Did any trial finish with a valid metric (what ``schedtune tune`` exits 0 on)?"""
        return self.best_metric is not None


def run(spec: Source, *, address: Optional[str] = None, storage: Optional[str] = None,
        tracking_uri: Optional[str] = None, resume: bool | str = False, num_cpus: Optional[int] = None,
        out: Callable[[str], None] = print) -> RunResult:
    """Run an experiment to its end and return its result (what ``schedtune tune`` does).

    ``spec``: an ExperimentSpec (``tuning.load_spec``), or a path or dict to load. ``address``: the
    Ray cluster to join (``host:port`` of its GCS, ``auto``); default ``$RAY_ADDRESS``, else a
    private local cluster (``"local"`` forces one; ``num_cpus`` sizes it). ``storage``: results
    directory or URI (default ``./schedtune_results``). ``tracking_uri``: MLflow (default
    ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``). ``resume``: True continues the latest
    interrupted run (FileNotFoundError when there is none), ``"if-present"`` continues it when there
    is one and starts a new run otherwise. ``out``: where progress lines go.

    The result's ``trials`` is a pandas DataFrame, one row per trial (best first): ``trial_id``,
    ``status`` (completed / stopped by ASHA at epoch N / diverged / failed), ``epochs``,
    ``best_<metric>`` (with several ``metrics``: each other objective at that epoch, and ``on_front``;
    with ``repeats``: ``seed``, ``mean_<metric>`` and ``std_<metric>`` of its config), ``diagnosis``,
    ``error``, ``run_id`` (MLflow), and one column per space key with the trial's sampled value.
    """
    from tuning.driver.experiment import run_experiment
    from tuning.spec import ExperimentSpec

    if not isinstance(spec, ExperimentSpec):
        spec = load_spec(spec)
    result = run_experiment(spec, storage=storage, tracking_uri=tracking_uri, address=address, resume=resume,
                            num_cpus=num_cpus, out=out)
    return result_of(spec, result)


def result_of(spec: "ExperimentSpec", result: "ExperimentResult") -> RunResult:
    """An ExperimentResult (the driver's) as the API's RunResult."""
    import pandas as pd

    from tuning.spec.options import REPEAT_INDEX

    o = spec.options
    metric = f"best_{o.metric}"
    others = [m.name for m in o.objectives[1:]]
    rows = [{"trial_id": r.trial_id, "status": r.status, "epochs": r.epochs, metric: r.metric,
             **{n: (r.objectives or {}).get(n) for n in others}, **({"on_front": r.on_front} if others else {}),
             **({"seed": spec.base.seed + (r.repeat or 0), f"mean_{o.metric}": r.group[0] if r.group else None,
                 f"std_{o.metric}": r.group[1] if r.group else None} if o.repeats > 1 else {}),
             "diagnosis": r.diagnosis, "error": r.error, "run_id": r.run_id, **spec.decode(r.params)}
            for r in result.rows]
    columns = ["trial_id", "status", "epochs", metric, *others, *(["on_front"] if others else []),
               *(["seed", f"mean_{o.metric}", f"std_{o.metric}"] if o.repeats > 1 else []),
               "diagnosis", "error", "run_id", *spec.space]
    best = result.best
    best_sample = ({**best.params, **({REPEAT_INDEX: best.repeat} if best.repeat is not None else {})}
                   if best else None)   # a repeat's own seed
    return RunResult(
        name=result.name, best_config=spec.trial_config(best_sample).to_dict() if best else None,
        best_params=spec.decode(best.params) if best else None, best_metric=best.metric if best else None,
        best_trial_id=best.trial_id if best else None, best_run_id=best.run_id if best else None,
        best_checkpoint=best_checkpoint(result.path, best.trial_id, spec) if best else None,
        parent_run_id=result.parent_run_id, trials=pd.DataFrame(rows, columns=columns), path=result.path,
        tracking_uri=result.tracking_uri, model_version=result.model_version, experiment=result)


def best_checkpoint(run_dir: str, trial_id: str, spec: "ExperimentSpec") -> Optional[str]:
    """The trial's best checkpoint directory on the results storage: Tune's trial directory
    (1-worker trials) or the trial's Train run (``<run_dir>/train/train-<trial_id>``)."""
    import pyarrow.fs as pafs

    from tuning.tracking.trial_files import best_and_last, find_checkpoints

    try:
        fs, root = pafs.FileSystem.from_uri(run_dir)
    except Exception:
        fs, root = pafs.LocalFileSystem(), run_dir
    scheme = run_dir.split("://")[0] + "://" if "://" in run_dir else ""
    entries = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    trial_dirs = [scheme + e.path for e in entries if e.type == pafs.FileType.Directory and f"_{trial_id}_" in
                  Path(e.path).name]
    found = [c for d in trial_dirs + [f"{run_dir}/train/train-{trial_id}"] for c in find_checkpoints(d)]
    best, _ = best_and_last(found, spec.options.metric, spec.options.mode)
    return best[0] if best else None


def submit(spec: Source, *, address: Optional[str] = None, working_dir: str | Path | None = None,
           py_modules: Optional[list[str | Path]] = None, overrides: list[str] | dict[str, Any] | None = None,
           storage: Optional[str] = None, tracking_uri: Optional[str] = None, pip: Optional[list[str]] = None,
           runtime_env: Optional[dict[str, Any]] = None, entrypoint_num_cpus: float = 1.0) -> "Job":
    """Submit an experiment to a Ray cluster as a Ray job (what ``schedtune submit --no-wait``
    does) and return its handle at once: ``job.job_id``, ``job.status()``, ``job.logs()``,
    ``job.wait(timeout_s=None, out=None)`` (the final status; ``out=print`` streams the log),
    ``job.stop()``.

    ``spec``: a search-space file, a dict, or a loaded ExperimentSpec (``overrides``, as in
    ``load_spec``, apply to a file or a dict). ``address``: the cluster's job API
    (``http://HEAD:8265``); default ``$RAY_API_SERVER_ADDRESS``, then ``$RAY_ADDRESS``.
    ``working_dir``: your code, shipped with the job and first on every worker's path (default:
    the directory holding the file; for a dict or spec, the directory its plug-ins import from);
    ``py_modules``: more packages of yours (directories). ``storage``, ``tracking_uri``: as the
    cluster sees them (shared storage, the in-cluster MLflow). ``pip``: extra requirements for the
    job's environment. Input errors (``SpaceError``) come before the cluster is contacted; the
    cluster's (unreachable, token refused) are ``tuning.driver.submit.SubmitError``.
    """
    from tuning.driver.submit import submit_job
    from tuning.spec.overrides import as_overrides

    return submit_job(spec, address, overrides=as_overrides(overrides), working_dir=working_dir, py_modules=py_modules,
                      storage=storage, tracking_uri=tracking_uri, pip=pip, runtime_env=runtime_env,
                      entrypoint_num_cpus=entrypoint_num_cpus)
