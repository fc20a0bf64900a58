"""``M3amba``: dense HSI + LiDAR/SAR classification of 32x32 tiles with the M3amba network."""
from __future__ import annotations

from typing import Literal

import torch
from transformers import CLIPVisionConfig

from rsfusion.datamodules.errors import InputError
from rsfusion.lightning_modules.base import Batch, FusionClassifier
from rsfusion.lightning_modules.losses import m3amba_loss
from rsfusion.lightning_modules.networks.layers import check_scan_backend
from rsfusion.lightning_modules.networks.m3amba import M3ambaNet, clip_weights_source
from rsfusion.lightning_modules.optim import no_weight_decay_groups

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
CLIP_PREFIX = "net.clip."  # the frozen tower's state_dict keys


class M3amba(FusionClassifier):
    """M3amba (CLIP-driven Mamba, arXiv 2503.06446) on ``tile`` sampling.

    The network is the authors' (see :class:`~rsfusion.lightning_modules.networks.m3amba.M3ambaNet`); the
    training recipe is not public, so every training default here is rsfusion's own [D]: AdamW
    lr 1e-4, weight decay 0.05 (none on A_logs, Ds and norms), cosine schedule, loss = 1.0 x mean
    CE of the three heads + 0.1 x cosine consistency of each modality's output with the fused one.
    ``class_weights`` and ``label_smoothing`` (FusionClassifier options) apply to all three CEs.
    Prediction uses the fused head, as the authors do.

    Args:
        hsi, aux: the DataModule's names of the hyperspectral and the second modality (default: the
            first and second modality of the data).
        patch_size: the tile side (linked from the DataModule; the authors use 32).
        dims, depth, d_state, ssm_ratio, mlp_ratio, drop_path_rate: network widths (authors: 384,
            9, 16, 2.0, 4.0, 0.1).
        clip_model: local directory or cached Hugging Face name of the CLIP image tower.
        clip_config: keyword arguments of a ``transformers.CLIPVisionConfig`` to build a randomly
            initialised tower instead (tests, CPU demos); ``projection_dim`` is the embedding size.
            A ``clip_model`` other than the default together with ``clip_config`` is refused.
        exchange, avg_A, shared_stream_weights, clip_normalize, linear_embed_trainable: the network's
            switches (authors: "B", True, True, False; trainable embeddings are ours).
        compute_guidance_output: False [ours, default] skips the guidance stream's discarded output
            (identical logits); True runs the authors' network op for op (faithful mode).
        ce_weights, supervised_weight, consistency_weight: the loss weights [ours].
        scan_backend: selective-scan kernel: "auto" (RSFUSION_SCAN_BACKEND if set, else the fastest
            that runs), "torch", "triton" or "cuda"; one that cannot run here is refused.

    Checkpoints do not store a pretrained tower (``clip_model``; about 88 M frozen parameters): they
    record its source, hub revision and the SHA-256 of its weights file (``checkpoint["frozen_weights"]``),
    and loading reads the tower from that source again and refuses, in one line, a source that is
    missing or whose weights changed. A random ``clip_config`` tower is stored, as are all trainable
    parameters (the linear embeddings included).
    """

    samplings = frozenset({"tile"})
    # The authors' guidance SSM keeps dt/D parameters whose output is discarded: no gradient reaches them.
    has_unused_parameters = True

    def __init__(self, hsi: str | None = None, aux: str | None = None, patch_size: int = 32, dims: int = 384,
                 depth: int = 9, d_state: int = 16, ssm_ratio: float = 2.0, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.1, clip_model: str = DEFAULT_CLIP,
                 clip_config: dict | None = None, exchange: Literal["B", "C", "none"] = "B", avg_A: bool = True,
                 compute_guidance_output: bool = False, shared_stream_weights: bool = True,
                 clip_normalize: bool = False, linear_embed_trainable: bool = True,
                 ce_weights: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3), supervised_weight: float = 1.0,
                 consistency_weight: float = 0.1, scan_backend: str = "auto", lr: float = 1e-4,
                 weight_decay: float = 0.05,
                 optimizer: str = "adamw", scheduler: str = "cosine", **kwargs):
        super().__init__(patch_size=patch_size, lr=lr, weight_decay=weight_decay, optimizer=optimizer,
                         scheduler=scheduler, **kwargs)
        names = list(self.in_channels)
        if len(names) < 2 and (hsi is None or aux is None):
            raise InputError(f"M3amba needs two modalities (HSI + LiDAR/SAR), the data has {names}")
        self.hsi_key, self.aux_key = hsi or names[0], aux or names[1]
        missing = [m for m in (self.hsi_key, self.aux_key) if m not in self.in_channels]
        if missing:
            raise InputError(f"M3amba: modalities {missing} not in the data's {names}")
        config = None
        try:
            check_scan_backend(scan_backend)
        except ValueError as err:
            raise InputError(f"model.init_args.{err}") from None
        if clip_config is not None and clip_model != DEFAULT_CLIP:
            raise InputError(f"M3amba: give model.init_args.clip_model ({clip_model!r}) or clip_config, not both "
                             "(clip_config builds a random tower and would ignore clip_model)")
        if clip_config is not None:
            config = CLIPVisionConfig(**clip_config)
        try:
            self.net = M3ambaNet(self.in_channels[self.hsi_key], self.in_channels[self.aux_key], self.num_classes,
                                 dims=dims, depth=depth, d_state=d_state, ssm_ratio=ssm_ratio, mlp_ratio=mlp_ratio,
                                 drop_path_rate=drop_path_rate, image_size=patch_size, clip_model=clip_model,
                                 clip_config=config, exchange=exchange, avg_A=avg_A,
                                 compute_guidance_output=compute_guidance_output,
                                 shared_stream_weights=shared_stream_weights, clip_normalize=clip_normalize,
                                 linear_embed_trainable=linear_embed_trainable, scan_backend=scan_backend)
        except FileNotFoundError as err:
            raise InputError(f"model.init_args.clip_model: {err}") from None

    @property
    def clip_source(self) -> dict | None:
        """:func:`~rsfusion.lightning_modules.networks.m3amba.clip_weights_source` of a pretrained tower
        (hashed once), None for a random ``clip_config`` tower or weights that are not one file."""
        if self.hparams.clip_config is not None:
            return None
        if not hasattr(self, "_clip_source"):
            self._clip_source = clip_weights_source(self.hparams.clip_model)
        return self._clip_source

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        source = self.clip_source
        if source is not None:
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith(CLIP_PREFIX)]:
                del state[key]
            checkpoint["frozen_weights"] = {CLIP_PREFIX: source}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = (checkpoint.get("frozen_weights") or {}).get(CLIP_PREFIX)
        if saved is None:  # a random tower, or a checkpoint that stores the tower's weights
            return
        now = self.clip_source
        if now is None or now["sha256"] != saved["sha256"]:
            found = "no single weights file" if now is None else f"{now['file']} with SHA-256 {now['sha256'][:12]}…"
            raise InputError(f"the checkpoint's frozen CLIP tower {saved['source']!r} (revision "
                             f"{saved.get('revision') or '-'}, {saved['file']} SHA-256 {saved['sha256'][:12]}…) "
                             f"is not what model.init_args.clip_model={self.hparams.clip_model!r} holds now "
                             f"({found}): give the original weights")
        checkpoint["state_dict"].update({CLIP_PREFIX + k: v for k, v in self.net.clip.state_dict().items()})

    def heads(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.net(batch[self.hsi_key], batch[self.aux_key])

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.heads(batch)[2]

    def training_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hp = self.hparams
        terms = m3amba_loss(self.heads(batch), batch["label"], ce_weights=tuple(hp.ce_weights),
                            supervised_weight=hp.supervised_weight, consistency_weight=hp.consistency_weight,
                            class_weights=self.class_weights, label_smoothing=hp.label_smoothing)
        return terms.pop("loss"), terms

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        return no_weight_decay_groups(self.net, weight_decay)
