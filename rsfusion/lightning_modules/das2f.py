"""``DAS2F``: MS + PAN classification with the DAS2F network and its authors' training recipe."""
from __future__ import annotations

from typing import Literal

import torch

from rsfusion.datamodules.errors import InputError
from rsfusion.lightning_modules.base import Batch, FusionClassifier
from rsfusion.lightning_modules.networks.das2f import DAS2FNet
from rsfusion.lightning_modules.networks.layers import check_scan_backend


class DAS2F(FusionClassifier):
    """DAS2F (Diff-Attention Aware State Space Fusion) on MS + PAN (4x) patches, ``pixel`` sampling.

    Recipe defaults come from the same authors' code family (docs/models/das2f.md): Adam,
    lr 1.93e-4, weight decay 5e-4 (L2), lr x 0.9995 after every step, batch 64, 40 epochs.

    Args:
        variant: ``nanjing`` (2 CMDA stages) or ``smallxian`` (1 stage) [authors' two nets; defined in
            ``rsfusion.lightning_modules.networks.das2f.VARIANTS``].
        stages: overrides the variant's stage count (the 1 vs 2 stage ablation).
        ms, pan: the DataModule's modality names of the MS and PAN rasters.
        patch_size: the MS patch side (linked from the DataModule); the PAN patch is 4x.
        d_model, d_state, dt_rank, mlp_ratio, head_hidden: network widths (authors' 64, 24, 24, 4, 1024).
        cross_swap, dominant_features, fusion: the paper's ablation switches (see :class:`DAS2FNet`).
        scan_backend: selective-scan kernel: "auto" (RSFUSION_SCAN_BACKEND if set, else the fastest
            that runs), "torch", "triton" or "cuda"; one that cannot run here is refused.
        **kwargs: :class:`FusionClassifier` options.
    """

    def __init__(self, variant: str = "nanjing", stages: int | None = None,
                 ms: str = "ms", pan: str = "pan", patch_size: int = 16, d_model: int = 64, d_state: int = 24,
                 dt_rank: int = 24, mlp_ratio: int = 4, head_hidden: int = 1024, cross_swap: bool = True,
                 dominant_features: bool = True, fusion: Literal["aalf", "concat"] = "aalf", scan_backend: str = "auto",
                 lr: float = 1.93e-4, weight_decay: float = 5e-4, optimizer: str = "adam",
                 scheduler: str = "step_decay", **kwargs):
        super().__init__(patch_size=patch_size, lr=lr, weight_decay=weight_decay, optimizer=optimizer,
                         scheduler=scheduler, **kwargs)
        missing = [m for m in (ms, pan) if m not in self.in_channels]
        if missing:
            raise InputError(f"DAS2F: modalities {missing} not in the data's {list(self.in_channels)} "
                             "(set model.init_args.ms / pan to the DataModule's names)")
        self.ms_key, self.pan_key = ms, pan
        try:
            check_scan_backend(scan_backend)
        except ValueError as err:
            raise InputError(f"model.init_args.{err}") from None
        self.net = DAS2FNet.from_variant(
            variant, self.num_classes, stages, ms_channels=self.in_channels[ms], pan_channels=self.in_channels[pan],
            ms_patch_size=patch_size, d_model=d_model, d_state=d_state, dt_rank=dt_rank, mlp_ratio=mlp_ratio,
            head_hidden=head_hidden, cross_swap=cross_swap, dominant_features=dominant_features, fusion=fusion,
            scan_backend=scan_backend)

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        # The authors apply Adam's weight decay to every parameter.
        return [{"params": [p for p in self.parameters() if p.requires_grad], "weight_decay": weight_decay}]

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.net(batch[self.ms_key], batch[self.pan_key])
