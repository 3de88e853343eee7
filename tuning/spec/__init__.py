"""The search-space file: YAML in, a validated ``ExperimentSpec`` out (no Ray, MLflow or torch)."""
from tuning.spec.checks import SpaceWarning
from tuning.spec.errors import SpaceError
from tuning.spec.files import load_yaml, read_yaml_file
from tuning.spec.options import ExperimentOptions, SchedulerConfig
from tuning.spec.space import (DISTRIBUTIONS, SECTIONS, Dist, ExperimentSpec, grid_size, load_spec,
                               total_trials)

__all__ = ["DISTRIBUTIONS", "SECTIONS", "Dist", "ExperimentOptions", "ExperimentSpec", "SchedulerConfig",
           "SpaceError", "SpaceWarning", "grid_size", "load_spec", "load_yaml", "read_yaml_file", "total_trials"]
