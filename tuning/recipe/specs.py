"""The search-space files the recipe derives from an experiment: coarse, refine, recommendation.

Each is a plain document written as YAML under the recipe's output directory and loaded back with
``tuning.spec.load_spec``, so it is validated like a user's file and can be run again with
``schedtune tune FILE``. The functions here are pure (documents in, documents out).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from training.config import TrainConfig, apply_dotted
from tuning.spec import ExperimentSpec, load_spec

LR_BAND = 3.0            # coarse: optim.base_lr log-uniform in [lr / 3, lr * 3] (a decade around the pick)
COARSE_MAX_EPOCHS = 5    # the recipe's coarse search: 1-5 epochs
SWEEP_DECADES_BEYOND = 1  # the LR sweep spans the space's base_lr range and a decade either side
SECTION_SCHEDULE_KEYS = ("schedule", "schedule.name")   # refine forces a constant LR: these go


def spec_doc(spec: ExperimentSpec) -> dict[str, Any]:
    """A validated spec as a complete search-space document (every train field explicit)."""
    return {"experiment": spec.options.to_dict(), "train": spec.base.to_dict(),
            "space": {k: {d.kind: copy.deepcopy(list(d.args))} for k, d in spec.space.items()}}


def write_spec(doc: dict[str, Any], path: str | Path, header: str = "") -> ExperimentSpec:
    """Write ``doc`` as YAML at ``path`` (a comment ``header`` first) and load it back, validated."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    path.write_text(comment + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=110))
    return load_spec(path)


def _round(x: float) -> float:
    return float(f"{x:.3g}")


def sweep_bounds(spec: ExperimentSpec) -> tuple[float, float]:
    """The LR sweep's range (base_lr units): the space's log-uniform base_lr range widened by a
    decade either side, else three decades below and two above the base config's base_lr."""
    d = spec.space.get("optim.base_lr")
    if d is not None and d.kind == "loguniform":
        f = 10.0 ** SWEEP_DECADES_BEYOND
        return _round(d.args[0] / f), _round(d.args[1] * f)
    lr = spec.base.optim.base_lr
    return _round(lr * 1e-3), _round(lr * 1e2)


def coarse_doc(spec: ExperimentSpec, lr: float, epochs: int, num_samples: Optional[int] = None) -> dict[str, Any]:
    """The coarse search: the experiment's space with base_lr narrowed around ``lr``, ``epochs``
    (clamped to 1-5 and to the base's epochs) and ASHA."""
    doc = spec_doc(spec)
    doc["train"]["epochs"] = max(1, min(epochs, COARSE_MAX_EPOCHS, spec.base.epochs))
    doc["train"]["optim"]["base_lr"] = _round(lr)
    doc["space"]["optim.base_lr"] = {"loguniform": [_round(lr / LR_BAND), _round(lr * LR_BAND)]}
    e = doc["experiment"]
    if e["search"] == "grid":   # a log-uniform range cannot be enumerated
        e["search"] = "random"
    rf = e["scheduler"]["reduction_factor"] if e["scheduler"]["name"] == "asha" else 3.0
    e["scheduler"] = {"name": "asha", "grace_period": 1, "reduction_factor": rf}
    if num_samples:
        e["num_samples"] = num_samples
    return doc


def top_samples(spec: ExperimentSpec, rows: Sequence[Any], k: int) -> list[dict[str, Any]]:
    """The best ``k`` trials of a finished search (tuning.driver.experiment.TrialRow, best first) that
    neither diverged nor failed: {trial_id, metric, sample (decoded), diagnosis}."""
    ok = [r for r in rows if r.metric is not None and r.status not in ("diverged", "failed")]
    return [{"trial_id": r.trial_id, "metric": r.metric, "sample": spec.decode(r.params),
             "diagnosis": getattr(r, "diagnosis", None)} for r in ok[:k]]


def _key(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def refine_doc(coarse: ExperimentSpec, top: Sequence[dict[str, Any]], epochs: int
               ) -> tuple[dict[str, Any], Optional[list[dict[str, Any]]]]:
    """The refine run: the ``top`` configs of the coarse search, ``epochs`` long, constant LR (no
    decay; the base's warmup stays), FIFO. Returns (document, samples): the document's space holds
    a ``choice`` per key that differs among them (so the file validates every value), and the
    samples are the exact joint configs to run (tuning.driver.experiment.run_experiment(points=...)).
    Keys equal in all of them move into ``train``; samples None when only one config remains."""
    doc = spec_doc(coarse)
    keys = [k for k in coarse.space if k not in SECTION_SCHEDULE_KEYS]
    samples, seen = [], set()
    for t in top:
        s = {k: t["sample"][k] for k in keys if k in t["sample"]}
        if _key(s) not in seen:
            seen.add(_key(s))
            samples.append(s)
    if not samples:
        samples = [{}]
    varying = [k for k in keys if len({_key(s.get(k)) for s in samples}) > 1]
    fixed = {k: v for k, v in samples[0].items() if k not in varying}
    doc["train"] = apply_dotted(doc["train"], fixed)
    doc["train"]["epochs"] = epochs
    doc["train"]["schedule"]["name"] = "constant"
    space: dict[str, Any] = {}
    for k in varying:
        values: list[Any] = []
        for s in samples:
            if all(_key(s[k]) != _key(v) for v in values):
                values.append(s[k])
        space[k] = {"choice": values}
    doc["space"] = space
    doc["experiment"].update({"num_samples": len(samples), "search": "random", "scheduler": {"name": "fifo"}})
    points = [{k: s[k] for k in varying} for s in samples] if varying else None
    return doc, points


def recommendation_doc(spec: ExperimentSpec, cfg: TrainConfig) -> dict[str, Any]:
    """One run of ``cfg`` (the recipe's pick), as a file ``schedtune tune`` runs again."""
    o = spec.options
    return {"experiment": {"name": f"{o.name}-recommended", "metric": o.metric, "mode": o.mode, "num_samples": 1,
                           "search": "random", "scheduler": {"name": "fifo"}, "seed": o.seed},
            "train": cfg.to_dict(), "space": {}}

