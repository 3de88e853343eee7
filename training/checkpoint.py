"""Checkpoints: one directory per save holding ``checkpoint.pt`` (everything needed to resume
exactly: weights, optimizer moments, the step, EMA, RNG streams, the fp16 gradient scaler; loaded
weights-only) and ``meta.json`` (epoch, step, metrics, the config), readable without torch.

A state holds plain data only (tensors, numbers, strings, lists, dicts), and is loaded with
``torch.load(weights_only=True)``: checkpoints live on shared storage, and a full unpickler would run
whatever code a tampered file names on every worker that restores it. One that names any other
object is refused (CheckpointError), before anything in it runs.
"""
from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "checkpoint.pt"
META_FILE = "meta.json"
TRACE_FILE = "trace.json"   # the run's curves so far (per-step loss/LR, per-layer update ratios)


class CheckpointError(ValueError):
    """A checkpoint cannot be used: names the file and why."""


def save(directory: str | Path, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write ``state`` and ``meta`` (and ``state["trace"]`` as JSON, readable without torch)
    atomically into ``directory`` (replaced if it exists)."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(state, tmp / STATE_FILE)
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1, default=str))
    if state.get("trace") is not None:
        (tmp / TRACE_FILE).write_text(json.dumps(state["trace"]))
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    return directory


def copy(src: str | Path, dst: str | Path) -> Path:
    """Replace checkpoint directory ``dst`` with a copy of ``src``."""
    dst = Path(dst)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


def state_file(path: str | Path) -> Path:
    """The ``checkpoint.pt`` of a checkpoint directory (or the file itself)."""
    path = Path(path)
    return path / STATE_FILE if path.is_dir() else path


def load(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint's state; a missing, truncated or foreign file is a CheckpointError."""
    f = state_file(path)
    if not f.exists():
        raise CheckpointError(f"{f}: no such checkpoint file")
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # an object beyond plain data (never built), a truncated zip, pickle garbage, ...
        reason = _unpickler_reason(e) if isinstance(e, pickle.UnpicklingError) else f"{type(e).__name__}: {e}"
        if reason.startswith("Unsupported global"):
            raise CheckpointError(f"{f}: refused: it holds an object that is not plain data ({reason}); a "
                                  "schedtune checkpoint holds tensors, numbers, strings, lists and dicts only, "
                                  "and is loaded weights-only so that a tampered file cannot run code") from e
        raise CheckpointError(f"{f}: not a readable schedtune checkpoint ({reason})") from e
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{f}: not a schedtune checkpoint (no 'model' entry)")
    return state


def read_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    return json.loads(((path if path.is_dir() else path.parent) / META_FILE).read_text())


def load_model_state(model: torch.nn.Module, path: str | Path, state: dict | None = None) -> None:
    """Load weights into ``model``; a checkpoint of another architecture is a CheckpointError."""
    state = state if state is not None else load(path)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        first = str(e).splitlines()[0:3]
        raise CheckpointError(f"{state_file(path)}: does not fit this model: {' '.join(first)}") from e


def _unpickler_reason(e: Exception) -> str:
    """The one line of torch's weights-only refusal that says what was refused (the rest is advice
    on loading the file unsafely)."""
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed global by default|\n|$)", str(e))
    return found.group(1).strip() if found else f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"


def rng_state(gen: torch.Generator, device_gen: torch.Generator | None = None) -> dict[str, Any]:
    """Every random stream a resumed run continues: torch's global (CPU and CUDA) and the loop's
    augmentation generators (``device_gen``: the one on an accelerator, where there is one)."""
    out = {"torch": torch.get_rng_state(), "aug": gen.get_state()}
    if device_gen is not None:
        out["aug_device"] = device_gen.get_state()
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(s: dict[str, Any], gen: torch.Generator, device_gen: torch.Generator | None = None) -> None:
    torch.set_rng_state(s["torch"])
    gen.set_state(s["aug"])
    if device_gen is not None and "aug_device" in s:
        device_gen.set_state(s["aug_device"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
