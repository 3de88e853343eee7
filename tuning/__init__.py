"""Everything that knows about Ray and MLflow: search spaces, the Tune driver, tracking, submission, the CLI.

The Python API (tuning/api.py; the CLI is a thin layer over it):

- ``tuning.load_spec(path_or_dict, overrides)``: a validated ExperimentSpec;
- ``tuning.run(spec, address=, storage=, tracking_uri=, resume=)``: run it, a RunResult (best config,
  metric, checkpoint, MLflow parent run, a DataFrame of the trials);
- ``tuning.submit(spec_or_path, address=, working_dir=, py_modules=, ...)``: a Ray job's handle
  (``job_id``, ``status()``, ``logs()``, ``wait()``, ``stop()``).

``import tuning`` loads none of Ray, MLflow, torch or pandas: each function imports what it needs.
"""
from tuning.api import RunResult, load_spec, run, submit

__all__ = ["RunResult", "load_spec", "run", "submit"]
