"""Local pretrained weights: copy every tensor of a state_dict file whose name and shape match."""
from __future__ import annotations

import warnings
from typing import Mapping

import torch

from training.models.base import StagedModel

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")   # DistributedDataParallel, torch.compile


def _head_keys(model: StagedModel) -> set[str]:
    head = model.stages()[-1]
    ids = {id(t) for t in (*head.parameters(), *head.buffers())}
    return {k for k, t in model.state_dict(keep_vars=True).items() if id(t) in ids}


def load_pretrained(model: StagedModel, path: str) -> list[str]:
    """Copy into ``model`` every tensor of the file whose name and shape match; return their names.

    The file is ``torch.save(model.state_dict())`` or a checkpoint dict holding it under ``"model"``.
    For a plug-in model (training.models.external.PluginModel, keys under ``net.``) the file may
    also be the bare timm/torchvision/user module's own state_dict. Head tensors of another shape
    (a different number of classes) are skipped; other skipped or missing tensors are warned about.
    Raises ``ValueError`` naming ``path`` when the file is unreadable, is no state_dict, or matches
    nothing besides the head.
    """
    def not_a_state_dict(reason: str) -> ValueError:
        return ValueError(f"{path}: not a schedtune/torch state_dict: {reason}")

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, truncated, not a torch file, or pickled non-tensor objects
        first_line = (str(e).strip().splitlines() or ["no details"])[0]   # weights_only errors run long
        if isinstance(e, EOFError):
            first_line = "the file ends early (truncated?)"
        raise not_a_state_dict(f"{type(e).__name__}: {first_line}") from e
    state = obj["model"] if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping) else obj
    if not (isinstance(state, Mapping) and state
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
        raise not_a_state_dict("expected a mapping of tensor names to tensors, "
                               "or a dict holding one under 'model'")
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}

    own = model.state_dict()
    wrapped = getattr(model, "wrapped_prefix", "")
    if wrapped and not any(k in own for k in state):   # the wrapped module's own file (timm, torchvision)
        state = {wrapped + k: v for k, v in state.items()}
    head = _head_keys(model)
    loaded = [k for k, v in state.items() if k in own and own[k].shape == v.shape]
    if not any(k not in head for k in loaded):
        raise ValueError(f"{path}: no tensor besides the head matches this {type(model).__name__} "
                         f"(file has e.g. {list(state)[:3]}, the model has e.g. {list(own)[:3]})")
    mismatched = [k for k in state if k in own and k not in loaded and k not in head]
    missing = [k for k in own if k not in state and k not in head]
    if mismatched or missing:
        warnings.warn(f"{path}: loaded {len(loaded)} tensors; kept the fresh init for {len(mismatched)} of "
                      f"another shape {mismatched[:5]} and {len(missing)} absent from the file {missing[:5]}",
                      stacklevel=2)
    model.load_state_dict({k: state[k] for k in loaded}, strict=False)
    return loaded
