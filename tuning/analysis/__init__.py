"""What an experiment produced, read as plain data: no Ray, MLflow or torch.

- ``results``: trial rows and records, how a trial ended (``end_state``), its training metrics
- ``ranking``: the one ranking rule (``trial_score``, ``rank``) and the one comparison by mode (``better``)
- ``diagnose``: learning-curve diagnosis of one trial
- ``report``: the final table, the terminal summary, the diagnosis table
- ``plots``: PNG figures of runs and experiments
"""
from tuning.analysis.ranking import BROKEN_STATUSES, best_of, better, rank, trial_score, worst_value
from tuning.analysis.results import ExperimentRecord, ExperimentResult, TrialRecord, TrialRow, end_state

__all__ = ["BROKEN_STATUSES", "ExperimentRecord", "ExperimentResult", "TrialRecord", "TrialRow", "best_of",
           "better", "end_state", "rank", "trial_score", "worst_value"]
