"""What every dataset entry returns: ``DataBundle`` (normalized train/val splits and what a model
needs to know), and ``Uint8Images``, images kept as uint8 and standardized per item or on the device."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.data import Dataset, TensorDataset


@dataclass
class DataBundle:
    """A dataset ready for the loop: normalized train/val splits and what a model needs to know."""
    train: Dataset
    val: Dataset
    num_classes: int
    input_shape: tuple[int, ...]        # one sample, e.g. (64,) or (1, 8, 8) / (3, 32, 32)
    class_names: list[str]
    is_image: bool                      # (C, H, W) samples: image augmentation applies
    # The standardization the samples went through, x = (raw - mean) / std, shaped to broadcast onto
    # one sample ((C, 1, 1) or (F,)); None where unknown. Lets an exported model take raw inputs.
    mean: Optional[torch.Tensor] = None
    std: Optional[torch.Tensor] = None


class Uint8Images(Dataset):
    """Images kept as uint8 (N, C, H, W): 4x less memory than float32. ``self[i]`` is standardized
    per item (the registry's contract); the training loop instead reads whole uint8 batches (``raw``)
    and standardizes them on its device (``normalize``): the same numbers.

    CIFAR-10's train split is 150 MB this way instead of 600 MB per process.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor):
        self.images, self.labels = images, labels
        self.mean, self.std = mean.float(), std.float()   # (C, 1, 1), on the 0..255 pixel scale
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return (self.images[i].float() - self.mean) / self.std, self.labels[i]

    @property
    def raw(self) -> TensorDataset:
        """The uint8 images and their labels, unnormalized: the loop's loader reads these, copies the
        uint8 batch to the device (4x fewer bytes) and normalizes it there (``normalize``)."""
        return TensorDataset(self.images, self.labels)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """A uint8 batch (N, C, H, W) on any device -> float32, standardized exactly as ``self[i]``
        (the same two elementwise ops), with the statistics copied to that device once."""
        stats = self._on_device.get(x.device)
        if stats is None:
            stats = self._on_device[x.device] = (self.mean.to(x.device), self.std.to(x.device))
        return (x.float() - stats[0]) / stats[1]
