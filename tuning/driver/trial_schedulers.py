"""Tune's trial schedulers as schedtune configures them (ASHA, HyperBand, the median stopping rule,
PBT, FIFO; time in epochs), and what Tune forgets of them across ``--resume``.

Tune checkpoints the search algorithm and the callbacks with the experiment, but not the
scheduler (ray-project/ray#30838): a restored experiment rebuilds it from the copy pickled when
the experiment started. ASHA would come back with empty rungs (every resumed trial passes each
rung as if it were the first to reach it) and PBT with no scores, no perturbation times and no
record of what it changed. ``ASHAState`` and ``PBTState`` are callbacks, so Tune checkpoints them,
that carry that state over. (HyperBand's brackets are not carried: a resumed HyperBand experiment
starts its brackets again for the trials that have not ended.)
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.schedulers import (ASHAScheduler, FIFOScheduler, HyperBandScheduler, MedianStoppingRule,
                                 PopulationBasedTraining, TrialScheduler)

from tuning.spec import ExperimentSpec
from tuning.spec.options import rung_metric


def make_scheduler(spec: ExperimentSpec, limit: int = 1,
                   on_perturbation: Optional[Callable[[str, dict], None]] = None
                   ) -> tuple[TrialScheduler, list[Callback]]:
    """The scheduler of ``spec`` and the callbacks it needs on the Tuner's RunConfig. ``limit``: how
    many trials may run at once (PBT and HyperBand hold the rest paused: RunningLimit).
    ``on_perturbation(trial_id, tags)``: given each PBT perturbation as run tags (the tracker's add_trial_tags)."""
    s, epochs = spec.options.scheduler, spec.base.epochs
    if s.name == "fifo":
        return FIFOScheduler(), []
    if s.name == "hyperband":
        return LimitedHyperBand(limit, time_attr="epoch", max_t=epochs, reduction_factor=s.reduction_factor), []
    if s.name == "median":
        return MedianStoppingRule(time_attr="epoch", grace_period=s.grace_period,
                                  min_samples_required=s.min_samples_required), []
    if s.name == "pbt":
        pbt = RecordingPBT(spec, limit)
        return pbt, [PBTState(pbt, on_perturbation)]
    asha = (CooldownASHA if s.rung_eval == "cooldown" else ASHAScheduler)(
        time_attr="epoch", max_t=epochs, grace_period=s.grace_period, reduction_factor=s.reduction_factor)
    return asha, [ASHAState(asha)]


class CooldownASHA(ASHAScheduler):
    """ASHA that judges a trial at a rung by its cooldown fork (``scheduler.rung_eval: cooldown``): the
    trial reports ``rung_<metric>`` at exactly ASHA's rung epochs (SchedulerConfig.rung_epochs, passed
    to it as ``train.rung_eval``), and that value is what the rung records and compares. Every other
    result, the last epoch's included, is ASHA's as usual; Tune and MLflow see the results unchanged."""

    def on_trial_result(self, tune_controller, trial, result):
        fork = rung_metric(self._metric)
        if fork in result:
            result = {**result, self._metric: result[fork]}
        return super().on_trial_result(tune_controller, trial, result)


class ASHAState(Callback):
    """Checkpoints ``asha``'s rung results with the experiment and puts them back on restore.
    It holds the scheduler itself: Tune pickles the tuner's config and callbacks together, so
    after a restore this is still the scheduler Tune runs."""

    def __init__(self, asha: ASHAScheduler):
        self.asha = asha

    def get_state(self) -> Optional[dict]:
        rungs = [[(milestone, dict(recorded)) for milestone, recorded in b._rungs] for b in self.asha._brackets]
        if not any(recorded for bracket in rungs for _, recorded in bracket):
            return None
        return {"rungs": rungs, "num_stopped": self.asha._num_stopped}

    def set_state(self, state: dict) -> None:
        for bracket, saved in zip(self.asha._brackets, state["rungs"]):
            for (milestone, recorded), (saved_milestone, saved_recorded) in zip(bracket._rungs, saved):
                if milestone == saved_milestone:
                    recorded.update(saved_recorded)
        self.asha._num_stopped = state["num_stopped"]


# -- PBT

def pbt_mutations(spec: ExperimentSpec) -> dict:
    """PBT's hyperparam_mutations over the space's own keys: a range as its Tune domain (perturbed by
    a factor, resampled from the domain), a choice or grid as its list of values (shifted to a neighbour)."""
    from tuning.driver.search import to_tune

    keys = spec.options.scheduler.hyperparam_mutations or list(spec.space)
    domains = to_tune(spec)
    return {k: list(spec.space[k].args) if spec.space[k].kind in ("choice", "grid") else domains[k] for k in keys}


def clip_to_space(spec: ExperimentSpec, config: dict) -> dict:
    """A perturbed config with every range back inside its bounds (PBT multiplies by its factors
    without looking at them, and a dropout of 1.08 or an LR above the searched range is no trial)."""
    out = dict(config)
    for key, d in spec.space.items():
        if d.kind in ("loguniform", "uniform", "int") and key in out:
            low, high = d.args
            out[key] = min(max(out[key], low), high)
            if d.kind == "int":
                out[key] = int(round(out[key]))
    return out


def pbt_spec(spec: ExperimentSpec) -> ExperimentSpec:
    """The spec PBT's trials run: a checkpoint at every epoch PBT may perturb at (the exploited
    checkpoint is the one reported with the result PBT scored; an epoch without one is skipped)."""
    import dataclasses

    s = spec.options.scheduler
    if s.name != "pbt":
        return spec
    every = math.gcd(spec.base.checkpoint.every_epochs, s.perturbation_interval)
    return dataclasses.replace(spec, base=spec.base.with_updates({"checkpoint.every_epochs": every}))


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class RunningLimit:
    """For schedulers that pause trials (PBT, HyperBand): every trial is created at once (a paused
    trial still counts against a searcher's concurrency limit, so a limited searcher would never
    fill PBT's population or HyperBand's bracket), but only ``limit`` run. A multi-worker trial asks
    Tune for its own process's CPU only (Train V2 places its workers itself), and Tune starts every
    PENDING trial whose request fits: many more worker groups than the cluster holds. So a trial
    added beyond the limit waits PAUSED (``held``), and only ``choose_trial_to_run`` starts one."""

    def __init__(self, limit: int, **kwargs):
        super().__init__(**kwargs)
        self.limit, self.held = limit, set()

    def _running(self, tune_controller, but=None) -> int:
        return sum(t.status in (Trial.RUNNING, Trial.PENDING) for t in tune_controller.get_trials() if t is not but)

    def on_trial_add(self, tune_controller, trial):
        super().on_trial_add(tune_controller, trial)
        if trial.status == Trial.PENDING and self._running(tune_controller, but=trial) >= self.limit:
            trial.set_status(Trial.PAUSED)   # Tune files the trial by its status right after on_trial_add
            self.held.add(trial.trial_id)

    def choose_trial_to_run(self, tune_controller):
        if self._running(tune_controller) >= self.limit:
            return None
        trial = super().choose_trial_to_run(tune_controller) or next(   # the scheduler's choice, else a held one
            (t for t in tune_controller.get_trials() if t.trial_id in self.held and t.status == Trial.PAUSED), None)
        if trial is not None:
            self.held.discard(trial.trial_id)
        return trial


class LimitedHyperBand(RunningLimit, HyperBandScheduler):
    """HyperBand (time in epochs) with at most ``limit`` trials running."""


class RecordingPBT(RunningLimit, PopulationBasedTraining):
    """Tune's PBT over the spec's space (time in epochs, clipped to the space), which also keeps a
    record of each perturbation: the epoch, the trial cloned, its values, the new values and how
    each was made. Tune's own log of them (pbt_global.txt) names trials by tag, not id."""

    def __init__(self, spec: ExperimentSpec, limit: int):
        s = spec.options.scheduler
        super().__init__(limit, time_attr="epoch", perturbation_interval=s.perturbation_interval,
                         quantile_fraction=s.quantile, resample_probability=s.resample_probability,
                         perturbation_factors=tuple(s.perturbation_factors),
                         hyperparam_mutations=pbt_mutations(spec), synch=s.synch,
                         custom_explore_fn=functools.partial(clip_to_space, spec))
        self.epochs = spec.base.epochs
        self.keys = list(self._hyperparam_mutations)
        self.records: list[tuple[str, dict]] = []    # (trial id, record), in order
        self._results: dict[str, dict] = {}          # trial id -> the result being scored now
        self._saved: dict[str, dict] = {}            # trial id -> PBT's per-trial state, from a restore
        self._operations: dict[str, str] = {}        # how the last explore made each value

    def on_trial_add(self, tune_controller, trial):
        super().on_trial_add(tune_controller, trial)
        self._apply_saved(trial)

    def on_trial_result(self, tune_controller, trial, result):
        self._results[trial.trial_id] = result
        if result.get("epoch", 0) >= self.epochs:
            return TrialScheduler.CONTINUE   # its last epoch: no pause (a restart to report it again), no exploit
        return super().on_trial_result(tune_controller, trial, result)

    def _exploit(self, tune_controller, trial, trial_to_clone):
        own = {k: trial.config.get(k) for k in self.keys}
        epoch = int(self._results.get(trial.trial_id, {}).get("epoch", 0))
        donor_epoch = int((self._trial_state[trial_to_clone].last_result or {}).get("epoch", 0))
        donor = {k: trial_to_clone.config.get(k) for k in self.keys}
        super()._exploit(tune_controller, trial, trial_to_clone)
        new = {k: trial.config.get(k) for k in self.keys}
        self.records.append((trial.trial_id, {
            "epoch": epoch, "from_trial": trial_to_clone.trial_id, "from_epoch": donor_epoch,
            "old": own, "from_values": donor, "new": new, "operations": self._operations,
            # new / donor's value, clipping included (12 digits: the float product's noise dropped)
            "factors": {k: float(f"{new[k] / donor[k]:.12g}") for k in self.keys
                        if _number(new[k]) and _number(donor[k]) and donor[k]}}))

    def _get_new_config(self, trial, trial_to_clone):
        new_config, operations = super()._get_new_config(trial, trial_to_clone)
        self._operations = {k: str(v) for k, v in operations.items()}   # "* 1.2", "resample", "shift left"
        return new_config, operations

    # -- what PBTState checkpoints
    def state(self) -> dict:
        trials = {t.trial_id: {"last_score": s.last_score, "last_perturbation_time": s.last_perturbation_time,
                               "last_train_time": s.last_train_time, "last_result": s.last_result}
                  for t, s in self._trial_state.items()}
        return {"trials": {**self._saved, **trials}, "records": list(self.records),
                "num_perturbations": self._num_perturbations, "num_checkpoints": self._num_checkpoints}

    def restore(self, state: dict) -> None:
        self._saved = dict(state["trials"])
        self.records = [tuple(r) for r in state["records"]]
        self._num_perturbations, self._num_checkpoints = state["num_perturbations"], state["num_checkpoints"]
        for trial in list(self._trial_state):
            self._apply_saved(trial)

    def _apply_saved(self, trial) -> None:
        saved = self._saved.get(trial.trial_id)
        if saved is not None and trial in self._trial_state:
            # No checkpoint is carried: a trial is exploited only once its donor has scored again.
            for k, v in saved.items():
                setattr(self._trial_state[trial], k, v)


def perturbation_tags(n: int, record: dict) -> dict[str, str]:
    """The run tags of a trial's ``n``-th perturbation (1-based): the record as JSON, and the count."""
    import json

    from tuning.tracking import schema

    return {schema.pbt_perturbation_tag(n): json.dumps(record, sort_keys=True, default=str),
            schema.PBT_PERTURBATIONS: str(n)}


class PBTState(Callback):
    """Checkpoints ``pbt``'s per-trial state and its perturbation records with the experiment, puts
    them back on restore, and hands each new record to ``on_perturbation(trial_id, tags)`` as the
    tags of the perturbed trial's run (``perturbation_tags``)."""

    def __init__(self, pbt: RecordingPBT, on_perturbation: Optional[Callable[[str, dict], None]] = None):
        self.pbt, self.on_perturbation = pbt, on_perturbation
        self.told = 0   # records already handed on

    def _tell(self) -> None:
        for trial_id, record in self.pbt.records[self.told:]:
            self.told += 1
            if self.on_perturbation is not None:
                n = sum(t == trial_id for t, _ in self.pbt.records[:self.told])
                self.on_perturbation(trial_id, perturbation_tags(n, record))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._tell()   # Tune runs the scheduler before the callbacks: this result's perturbation is in

    def on_experiment_end(self, trials, **info):
        self._tell()

    def get_state(self) -> Optional[dict]:
        return {"pbt": self.pbt.state(), "told": self.told}

    def set_state(self, state: dict) -> None:
        self.pbt.restore(state["pbt"])
        self.told = state["told"]
