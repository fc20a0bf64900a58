"""A simple two-branch CNN fusion baseline: one small conv branch per modality, concatenated."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_block(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch),
                         nn.ReLU(inplace=True))


class TwoBranchCNNNet(nn.Module):
    """One two-layer conv branch per modality, features concatenated on the reference grid.

    Finer modalities (e.g. PAN at 4x) are average-pooled onto the reference grid after their branch.
    ``dense=False``: (B, K) logits from globally pooled features (centre-pixel classification);
    ``dense=True``: (B, K, H, W) logits for every pixel of a tile.

    Args:
        in_channels: modality name -> bands; the first modality's patch size is the reference.
        num_classes: K.
        width: channels of each branch.
        dropout: dropout before the classifier.
    """

    def __init__(self, in_channels: dict[str, int], num_classes: int, width: int = 64, dense: bool = False,
                 dropout: float = 0.2):
        super().__init__()
        if not in_channels:
            raise ValueError("in_channels: the baseline needs at least one modality")
        self.dense = dense
        self.branches = nn.ModuleDict({name: nn.Sequential(conv_block(c, width), conv_block(width, width))
                                       for name, c in in_channels.items()})
        fused = width * len(in_channels)
        self.fuse = conv_block(fused, fused)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Conv2d(fused, num_classes, 1)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        size = min((inputs[name].shape[-2:] for name in self.branches), key=lambda s: s[0])
        feats = []
        for name, branch in self.branches.items():
            f = branch(inputs[name])
            if f.shape[-2:] != size:
                f = F.adaptive_avg_pool2d(f, size)
            feats.append(f)
        x = self.dropout(self.fuse(torch.cat(feats, dim=1)))
        if not self.dense:
            x = x.mean(dim=(2, 3), keepdim=True)
        logits = self.head(x)
        return logits if self.dense else logits.flatten(1)
