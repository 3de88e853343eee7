"""Ensembles in pure PyTorch: the mean of members' softmax probabilities, and snapshot ensembles.

An ensemble predicts ``p(y | x) = mean_k softmax(f_k(x))`` (members may be different
architectures, as long as they share the classes). ``ProbEnsemble`` is that as an ``nn.Module``
whose output is ``log p``: wherever logits are expected, ``argmax`` gives the ensemble's prediction
and ``cross_entropy`` its negative log-likelihood (``log_softmax(log p) == log p``), so the loop's
own ``evaluate`` evaluates an ensemble unchanged.

Snapshot ensembles (Huang et al. 2017): with the ``cyclic_cosine`` schedule the loop keeps the
weights at the end of every cycle (``cycle_end_steps``), and the snapshots' ensemble is evaluated
once training ends (``snapshot_ensemble``).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

PROB_FLOOR = 1e-12   # log of a mean probability that underflowed to 0 stays finite


def mean_probs(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean of ``softmax(l)`` over members' logits (each (N, C)): the ensemble's (N, C) probabilities."""
    return torch.stack([F.softmax(l.float(), dim=-1) for l in logits]).mean(0)


class ProbEnsemble(nn.Module):
    """Members' averaged probabilities; ``forward`` returns their log (see the module docstring)."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mean_probs([m(x) for m in self.members]).clamp_min(PROB_FLOOR).log()


# ---------------------------------------------------------------------------- evaluation on a dataset

@torch.no_grad()
def predict_probs(model: nn.Module, dataset: Dataset, *, batch_size: int = 512,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities (N, C), labels (N,)) of ``model`` over ``dataset``, in the dataset's order."""
    model.eval().to(device)
    probs, labels = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size):
        probs.append(F.softmax(model(x.to(device)).float(), dim=-1).cpu())
        labels.append(y)
    return torch.cat(probs), torch.cat(labels)


def metrics_from_probs(probs: torch.Tensor, labels: torch.Tensor, prefix: str = "val_") -> dict[str, float]:
    """Accuracy and mean negative log-likelihood of (N, C) probabilities against (N,) labels."""
    nll = -probs.gather(1, labels[:, None]).clamp_min(PROB_FLOOR).log().mean()
    return {f"{prefix}acc": (probs.argmax(-1) == labels).float().mean().item(), f"{prefix}loss": nll.item()}


@dataclass
class EnsembleEval:
    """An ensemble and its members on one dataset (metrics keyed ``val_acc`` / ``val_loss``)."""
    ensemble: dict[str, float]
    members: list[dict[str, float]]
    probs: torch.Tensor                                # (N, C): the mean of member_probs
    member_probs: list[torch.Tensor] = field(repr=False)
    labels: torch.Tensor = field(repr=False)


def evaluate_ensemble(models: Sequence[nn.Module], dataset: Dataset, *, batch_size: int = 512,
                      device: torch.device | str = "cpu") -> EnsembleEval:
    """Each member's and the probability-averaging ensemble's metrics on ``dataset`` (one pass per member)."""
    if not models:
        raise ValueError("an ensemble needs at least one member")
    outs = [predict_probs(m, dataset, batch_size=batch_size, device=device) for m in models]
    labels = outs[0][1]
    member_probs = [p for p, _ in outs]
    probs = torch.stack(member_probs).mean(0)
    return EnsembleEval(metrics_from_probs(probs, labels), [metrics_from_probs(p, labels) for p in member_probs],
                        probs, member_probs, labels)


# ---------------------------------------------------------------------------- snapshot ensembles

def cycle_end_steps(total_steps: int, warmup_steps: int, cycles: int) -> list[int]:
    """Optimizer steps completed at the end of each ``cyclic_cosine`` cycle (the last one is ``total_steps``).

    The schedule runs ``cycles`` equal cycles over the ``total_steps - warmup_steps`` post-warmup
    steps (training.schedules), so cycle k ends once ``warmup + ceil(k * (T - W) / cycles)`` steps
    are done: the next step is the restart at the peak LR. Cycles shorter than a step collapse.
    """
    length = (total_steps - warmup_steps) / cycles
    ends = {min(total_steps, warmup_steps + math.ceil(k * length - 1e-9)) for k in range(1, cycles + 1)}
    return sorted(e for e in ends if e > warmup_steps)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``model``'s weights and buffers (accelerator memory stays the model's)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def snapshot_ensemble(model: nn.Module, snapshots: Sequence[Mapping[str, torch.Tensor]]) -> ProbEnsemble:
    """A ``ProbEnsemble`` of copies of ``model`` holding each of ``snapshots``."""
    members = []
    for state in snapshots:
        member = copy.deepcopy(model)
        member.load_state_dict(state)
        members.append(member)
    return ProbEnsemble(members)
