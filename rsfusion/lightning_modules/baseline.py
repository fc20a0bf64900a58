"""``TwoBranchCNN``: the reference point every real model is compared with on the same data."""
from __future__ import annotations

import torch

from rsfusion.lightning_modules.base import Batch, FusionClassifier
from rsfusion.lightning_modules.networks.baseline import TwoBranchCNNNet


class TwoBranchCNN(FusionClassifier):
    """Two-branch (one per modality) CNN fusion baseline, or a single-modality variant.

    Args:
        use_modalities: the modalities this model sees (default all); e.g. ``[hsi]`` for the
            HSI-only baseline.
        width: channels per branch.
        dense: predict whole tiles (``tile`` sampling) instead of centre pixels (linked from the
            DataModule's sampling by the CLI).
        dropout: dropout before the classifier.
        **kwargs: :class:`FusionClassifier` options (in_channels, num_classes, lr, ...).
    """

    samplings = frozenset({"pixel", "tile"})

    def __init__(self, use_modalities: list[str] | None = None, width: int = 64, dense: bool = False,
                 dropout: float = 0.2, **kwargs):
        super().__init__(dense=dense, **kwargs)
        used = list(use_modalities or self.in_channels)
        unknown = [m for m in used if m not in self.in_channels]
        if unknown:
            raise ValueError(f"use_modalities: {unknown} not among the data's modalities {list(self.in_channels)}")
        self.used = used
        self.net = TwoBranchCNNNet({m: self.in_channels[m] for m in used}, self.num_classes, width, dense, dropout)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.net({m: batch[m] for m in self.used})
