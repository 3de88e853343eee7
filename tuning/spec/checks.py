"""Semantic checks of a search-space file: what parses and type-checks, yet cannot work or surely is
a mistake. ``load_spec`` runs them last, before anything starts.

- An error (``SpaceError``: the file, the key, what was expected) where the experiment or every
  trial of a config would fail, or where its result would be wrong: a metric the loop never
  reports at every epoch, a mode that maximizes a loss, a plug-in name that does not resolve, a
  global batch larger than the training set, an ASHA grace period beyond max_t, values that are
  valid alone but not together.
- A warning (``SpaceWarning``, kept on ``ExperimentSpec.warnings``, printed by ``schedtune validate``
  and ``tune``) where the run works but surely not as meant: warmup as long as training, ASHA that
  can stop nothing, a searched key that no config reads or that takes one value, trials that
  repeat a config, a peak LR beyond what the optimizer is known to train at.

Every check sees every config the space can produce where it matters: the product of the
extremes (both bounds, every choice) of the searched keys that touch the fields it reads. What
training/ does (metrics, which fields each model or optimizer reads, dataset sizes) comes from
tuning.spec.loop_facts, written out there without torch and tested against the loop.
"""
from __future__ import annotations

import difflib
import itertools
import math
from dataclasses import dataclass
from typing import Any, Iterator

from training.config import ConfigError, TrainConfig, plugin_form
from training.plugins import check_resolvable
from training.schedules import peak_lr, plan_steps, warmup_steps
import tuning.spec.loop_facts as facts
from tuning.spec.errors import SpaceError


@dataclass(frozen=True)
class SpaceWarning:
    """A legal value that is surely a mistake: ``file: key: why``."""
    file: str
    key: str
    why: str

    def __str__(self) -> str:
        return f"{self.file}: {self.key}: {self.why}"


# Beyond this many configs a check reads its keys one at a time (each extreme with the others at the base).
MAX_COMBINATIONS = 512
# The highest peak LR each optimizer is known to train at; above it a warning. sgd: Goyal et al.
# 2017 found the linear rule to hold up to a global batch of 8k (ResNet-50, momentum 0.9, 5 epochs
# of warmup), a peak LR of 0.1 x 8192 / 256 = 3.2, and to fail beyond. adamw and lamb: at LR 1 an
# Adam step moves every weight by about 1 (|m / sqrt(v)| is about 1), and a LAMB step moves every
# layer by its own norm (the trust ratio), more than the whole initialization. lars has no bound
# here: its trust coefficient makes the LR relative to each layer's gradient-to-weight ratio.
PEAK_LR_BOUND = {"sgd": 3.2, "adamw": 1.0, "lamb": 1.0}
# Optuna's TPESampler (OptunaSearch's default) samples its first n_startup_trials at random.
TPE_STARTUP_TRIALS = 10
# NSGA-II's population (Optuna's default is 50, more trials than most searches run): a quarter of
# the samples, so that a search has about four generations, between these bounds.
NSGA2_MIN_POPULATION, NSGA2_MAX_POPULATION = 4, 50


def nsga2_population(num_samples: int) -> int:
    """The population of ``search: optuna_nsga2`` (Optuna's NSGAIISampler population_size)."""
    return max(NSGA2_MIN_POPULATION, min(NSGA2_MAX_POPULATION, num_samples // 4))


def check_spec(spec, trials: int) -> list[SpaceWarning]:
    """Raise SpaceError for what cannot work; return the warnings. ``spec`` is a validated
    ExperimentSpec, ``trials`` how many trials it runs (tuning.spec.space.total_trials)."""
    c = _Configs(spec)
    warnings: list[SpaceWarning] = []
    for check in (_together, _names, _metrics, _scheduler, _steps, _peak_lr, _budget, _searched):
        warnings += check(c, trials)
    return warnings


def _touches(key: str, field: str) -> bool:
    """Does the searched ``key`` set ``field``? (``schedule`` sets schedule.name; ``model.args.w`` is
    under ``model.args``.)"""
    return key == field or field.startswith(key + ".") or key.startswith(field + ".")


class _Configs:
    """The configs a spec's space can produce, each built (and validated) once."""

    def __init__(self, spec):
        self.spec, self.file, self.o, self.base = spec, spec.file, spec.options, spec.base
        self._built: dict[str, TrainConfig] = {}

    def each(self, *fields: str) -> Iterator[tuple[dict[str, Any], TrainConfig]]:
        """(the searched values, the config) for every combination of the extremes of the keys that touch ``fields``."""
        keys = [k for k in self.spec.space if any(_touches(k, f) for f in fields)]
        values = [self.spec.space[k].extremes() for k in keys]
        if math.prod(len(v) for v in values) > MAX_COMBINATIONS:
            combos = [{}] + [{k: v} for k, vs in zip(keys, values) for v in vs]
        else:
            combos = [dict(zip(keys, vs)) for vs in itertools.product(*values)]
        for a in combos:
            yield a, self.config(a)

    def config(self, a: dict[str, Any]) -> TrainConfig:
        if not a:
            return self.base
        tag = repr(sorted(a.items(), key=lambda kv: kv[0]))
        if tag not in self._built:
            try:
                self._built[tag] = self.base.with_updates(a)
            except ConfigError as e:   # each value was valid alone (load_spec): these are not, together
                k = next((k for k in a if _touches(k, e.key)), next(iter(a)))
                rest = ", ".join(f"space.{o} = {v!r}" for o, v in a.items() if o != k)
                raise SpaceError(self.file, f"space.{k}", a[k], f"a value valid together with {rest} (both can "
                                 f"be sampled): train.{e.key} got {e.value!r}, expected {e.expected}") from None
        return self._built[tag]

    def where(self, a: dict[str, Any], *fields: str) -> tuple[str, Any]:
        """The key to name for a finding in config ``a`` about ``fields`` (the most to blame first) and its value."""
        for f in fields:
            for k in a:
                if _touches(k, f):
                    return f"space.{k}", a[k]
        return f"train.{fields[0]}", self.base.flat().get(fields[0])

    def warn(self, key: str, why: str) -> list[SpaceWarning]:
        return [SpaceWarning(self.file, key, why)]


def _together(c: _Configs, trials: int) -> list[SpaceWarning]:
    """Keys of one section, each valid alone, that a trial may combine (optim.nesterov with optim.momentum 0)."""
    sections: dict[str, list[str]] = {}
    for k in c.spec.space:
        sections.setdefault(k.split(".")[0] if "." in k else "", []).append(k)
    for keys in sections.values():
        if len(keys) > 1:
            for _ in c.each(*keys):
                pass
    return []


def _names(c: _Configs, trials: int) -> list[SpaceWarning]:
    """Plug-in names resolve together (training.plugins.check_resolvable: tuning.spec.code resolved each
    value alone, here every combination, e.g. a model.name choice with model.args); a registry model
    fits the data and its regularizers."""
    fields = ("model.name", "model.args", "data.name", "data.args", "data.root", "regularization.stochastic_depth")
    for a, cfg in c.each(*fields):
        if plugin_form(cfg.model.name) or plugin_form(cfg.data.name):
            try:
                check_resolvable(cfg)
            except ConfigError as e:
                key, _ = c.where(a, e.key)
                raise SpaceError(c.file, key, e.value, e.expected) from None
        m, d = cfg.model.name, cfg.data.name
        if m in facts.IMAGE_MODELS and d in facts.VECTOR_DATA:
            key, value = c.where(a, "model.name", "data.name")
            raise SpaceError(c.file, key, value, f"a model for {d}'s 1-D samples (mlp, or a plug-in): {m} needs "
                             "(C, H, W) images")
        if m in facts.NO_STOCHASTIC_DEPTH and cfg.regularization.stochastic_depth > 0:
            key, value = c.where(a, "regularization.stochastic_depth", "model.name")
            raise SpaceError(c.file, key, value, f"regularization.stochastic_depth 0 with {m}: stochastic depth "
                             "needs residual blocks (resnet18, resnet50, timm: or torchvision: models)")
    return []


def _metrics(c: _Configs, trials: int) -> list[SpaceWarning]:
    """experiment.metric at every epoch of every trial (Tune fails a trial whose result lacks it);
    checkpoint.metric too (else no best checkpoint); each mode the metric's own direction."""
    o, ck = c.o, c.base.checkpoint
    objectives = [(m.name, m.mode, f"experiment.metrics[{i}]" if o.metrics else "experiment")
                  for i, m in enumerate(o.objectives)]
    named = [(name, f"{where}.{'name' if o.metrics else 'metric'}") for name, _, where in objectives]
    for metric, key in (*named, (ck.metric, "train.checkpoint.metric")):
        for a, cfg in c.each("regularization.ema_decay", "schedule.name", "checkpoint.metric"):
            every, last = facts.reported(cfg)
            if metric in every:
                continue
            if metric in last and key == "train.checkpoint.metric":
                continue   # the loop keeps the last epoch as the best: legal
            if metric in last:
                raise SpaceError(c.file, key, metric, f"a metric reported at every epoch: {metric} exists at the last "
                                 "epoch only (the snapshot ensemble of cyclic_cosine), and Tune's scheduler and "
                                 f"searcher read it at every epoch (e.g. {metric.replace('snapshot_ensemble_', '')})")
            if metric in facts.EMA_METRICS:
                where, value = c.where(a, "regularization.ema_decay")
                raise SpaceError(c.file, key, metric, f"regularization.ema_decay > 0 in every trial for an ema_* "
                                 f"metric ({where} = {value!r} turns EMA off), or a metric without ema_")
            known = sorted(set(facts.EVERY_EPOCH) | set(facts.EMA_METRICS))
            near = difflib.get_close_matches(metric, known, n=1, cutoff=0.6)
            raise SpaceError(c.file, key, metric, f"a metric the training loop reports every epoch: one of "
                             f"{', '.join(facts.EVERY_EPOCH)}; ema_* with regularization.ema_decay > 0"
                             + (f" (did you mean {near[0]!r}?)" if near else ""))
    for metric, mode, key in (*((n, m, f"{w}.mode") for n, m, w in objectives), (ck.metric, ck.mode, "train.checkpoint.mode")):
        best = facts.direction(metric)
        if best is not None and mode != best:
            kind = "a loss or a cost: lower is better" if best == "min" else "an accuracy or a rate: higher is better"
            raise SpaceError(c.file, key, mode, f"{best} for {metric} ({kind}); {mode} would rank the worst trial best")
    if ck.metric == o.metric and ck.mode != o.mode:
        raise SpaceError(c.file, "train.checkpoint.mode", ck.mode, f"{o.mode}, experiment.mode for the same metric "
                         f"{o.metric}: else each trial keeps its worst epoch as its best checkpoint")
    out = []
    if ck.metric != o.metric:
        out += c.warn("train.checkpoint.metric", f"{ck.metric!r} differs from experiment.metric {o.metric!r}: trials are "
                      f"ranked by {o.metric}, but each keeps (and registers, exports, ensembles) its best epoch by "
                      f"{ck.metric}; set train.checkpoint: {{metric: {o.metric}, mode: {o.mode}}} unless that is meant")
    if o.metric in facts.TRAIN_METRICS and o.metric.startswith("train_"):
        out += c.warn("experiment.metric", f"{o.metric} ranks trials by how well they fit the training set: the search "
                      f"prefers the configs that overfit; val_{o.metric[len('train_'):]} ranks by what generalizes")
    return out


def _scheduler(c: _Configs, trials: int) -> list[SpaceWarning]:
    """ASHA: max_t is train.epochs, its first rung the grace period."""
    s = c.o.scheduler
    if s.name != "asha":
        return []
    grace, max_t = s.grace_period, c.base.epochs
    if grace > max_t:
        raise SpaceError(c.file, "experiment.scheduler.grace_period", grace, f"at most train.epochs ({max_t}), ASHA's "
                         "max_t (Ray's ASHAScheduler refuses a longer grace period)")
    shortest = max_t
    for a, cfg in c.each("epochs"):
        if cfg.epochs > max_t:
            raise SpaceError(c.file, "space.epochs", cfg.epochs, f"at most train.epochs ({max_t}) under ASHA: its max_t "
                             f"is train.epochs, so it stops every trial at epoch {max_t} (raise train.epochs to the "
                             "longest value, or use scheduler: {name: fifo})")
        shortest = min(shortest, cfg.epochs)
    if grace >= shortest:
        return c.warn("experiment.scheduler.grace_period", f"{grace} is at or beyond the last epoch of "
                      f"{'every' if shortest == max_t else 'the shortest'} trial ({shortest}): ASHA first compares "
                      f"trials at epoch {grace}, so it stops nothing early (a grace period below {shortest} lets it; "
                      "scheduler: {name: fifo} says that every trial runs to the end)")
    return []


def _steps(c: _Configs, trials: int) -> list[SpaceWarning]:
    """The global batch fits the training set; warmup ends before training does."""
    size = ("data.name", "data.num_samples", "data.val_fraction")
    batch = ("scaling.batch_per_worker", "scaling.num_workers", "scaling.grad_accum_steps")
    warmup = ("schedule.warmup_epochs", "schedule.warmup_steps", "schedule.warmup", "epochs")
    for a, cfg in c.each(*warmup, *batch, *size):
        n = facts.train_size(cfg.data)
        if n is not None:
            try:
                plan = plan_steps(cfg, n)
            except ValueError:
                key, value = c.where(a, *batch, *size)
                sc = cfg.scaling
                raise SpaceError(c.file, key, value, f"a global batch (batch_per_worker x num_workers x grad_accum_steps "
                                 f"= {sc.batch_per_worker} x {sc.num_workers} x {sc.grad_accum_steps} = {sc.global_batch}) "
                                 f"that fits the {n} training samples of {cfg.data.name}: each worker needs a whole "
                                 "batch per optimizer step, and every epoch at least one step") from None
            w, total, unit = warmup_steps(cfg.schedule, plan.steps_per_epoch), plan.total_steps, "steps"
        elif cfg.schedule.warmup_steps is None:
            w, total, unit = (cfg.schedule.warmup_epochs if cfg.schedule.warmup != "none" else 0), cfg.epochs, "epochs"
        else:
            continue   # warmup in steps, steps per epoch unknown (a local or plug-in dataset)
        if w >= total:
            key, value = c.where(a, "schedule.warmup_epochs" if cfg.schedule.warmup_steps is None
                                 else "schedule.warmup_steps", "schedule.warmup", "epochs", *batch, *size)
            return c.warn(key, f"{value!r} makes warmup ({w:g} {unit}) as long as training ({total} {unit}): the LR "
                          "reaches its peak only at the last step and the schedule after warmup never runs")
    s = c.base.schedule
    if s.warmup == "none" and (s.warmup_epochs > 0 or s.warmup_steps) and not any(
            _touches(k, "schedule.warmup") for k in c.spec.space):
        which = "warmup_steps" if s.warmup_steps else "warmup_epochs"
        return c.warn(f"train.schedule.{which}", f"{getattr(s, which)!r} is ignored: schedule.warmup is none (set "
                      "schedule.warmup: linear or constant for a warmup)")
    return []


def _peak_lr(c: _Configs, trials: int) -> list[SpaceWarning]:
    """The peak LR (base_lr through the large-batch rule) within what the optimizer is known to train at."""
    fields = ("optim.base_lr", "scaling.batch_per_worker", "scaling.num_workers", "scaling.grad_accum_steps",
              "optim.lr_scaling", "optim.reference_batch", "optim.name")
    worst = None
    for a, cfg in c.each(*fields):
        bound = PEAK_LR_BOUND.get(cfg.optim.name)
        lr = peak_lr(cfg.optim, cfg.scaling.global_batch)
        if bound is not None and lr > bound and (worst is None or lr / bound > worst[0]):
            worst = (lr / bound, lr, bound, a, cfg)
    if worst is None:
        return []
    _, lr, bound, a, cfg = worst
    key, value = c.where(a, *fields)
    o = cfg.optim
    ratio = f"{cfg.scaling.global_batch} / reference_batch {o.reference_batch}"
    rule = {"linear": f" x global batch {ratio}", "sqrt": f" x sqrt(global batch {ratio})", "none": ""}[o.lr_scaling]
    return c.warn(key, f"{value!r} gives a peak LR of {lr:.3g} (base_lr {o.base_lr:g}{rule}), above {bound:g}, the "
                  f"highest {o.name} is known to train at (see tuning.spec.checks.PEAK_LR_BOUND): lower the range"
                  + (", or use lr_scaling: sqrt" if o.lr_scaling == "linear" else ""))


def _distinct(c: _Configs, key: str) -> float:
    """How many different configs ``key``'s values give (inf for a continuous range)."""
    d = c.spec.space[key]
    if d.kind in ("uniform", "loguniform"):
        return math.inf
    if d.kind == "int":
        return d.args[1] - d.args[0] + 1
    return len({repr(c.config({key: v}).to_dict()) for v in d.args})


def _budget(c: _Configs, trials: int) -> list[SpaceWarning]:
    """Trials that can only repeat a config; a TPE search too short to leave its random start."""
    out = []
    distinct = math.prod(_distinct(c, k) for k in c.spec.space)
    trials //= c.o.repeats   # a config's repeats differ by their seed: meant
    if trials > distinct:
        out += c.warn("experiment.num_samples", f"{c.o.num_samples} gives {trials} trials over at most {distinct} "
                      f"different config{'s' if distinct > 1 else ''}: {trials - distinct} repeat one (with the "
                      "same train.seed, to the same result; search train.seed to measure the noise, or lower num_samples"
                      + ("; with search: grid each sample runs the whole grid)" if c.o.search == "grid" else ")"))
    if c.o.search == "optuna_tpe" and c.o.num_samples <= TPE_STARTUP_TRIALS:
        out += c.warn("experiment.search", f"optuna_tpe with num_samples {c.o.num_samples}: TPE samples its first "
                      f"{TPE_STARTUP_TRIALS} trials at random (Optuna's n_startup_trials), so this is a random search; "
                      f"more than {TPE_STARTUP_TRIALS} samples let TPE model the results")
    if c.o.search == "optuna_nsga2" and c.o.num_samples < 2 * NSGA2_MIN_POPULATION:
        out += c.warn("experiment.search", f"optuna_nsga2 with num_samples {c.o.num_samples}: NSGA-II's first "
                      f"generation ({nsga2_population(c.o.num_samples)} trials) is sampled at random, so fewer than "
                      f"{2 * NSGA2_MIN_POPULATION} samples leave no generation bred from the front")
    return out


def _searched(c: _Configs, trials: int) -> list[SpaceWarning]:
    """Every searched key changes something: more than one config, and a field some config reads."""
    out = []
    for key in c.spec.space:
        if _distinct(c, key) == 1:
            same = c.config({key: c.spec.space[key].args[0]}) == c.base
            out += c.warn(f"space.{key}", "searches nothing: every value gives the same config"
                          + (" as train's" if same else "") + " (set it in train instead)")
            continue
        if key not in facts.USED_WHEN:
            continue
        used, deciders, who = facts.USED_WHEN[key]
        configs = [cfg for _, cfg in c.each(key, *deciders)]
        if not any(used(cfg) for cfg in configs):
            seen = {f: sorted({repr(cfg.flat()[f]) for cfg in configs}) for f in deciders}
            now = ", ".join(f"{f} {' or '.join(v)}" for f, v in seen.items())
            out += c.warn(f"space.{key}", f"no trial reads it ({who}; every trial has {now}): its trials "
                          "train alike")
    return out
