"""BDGF (Liu et al., arXiv 2509.23310): the diffusion-guided three-branch classifier (stage 3).

Stages 1 (the DDPM, :mod:`~rsfusion.lightning_modules.bdgf_pretrain`) and 2 (its feature bank of the
scene, :mod:`~rsfusion.lightning_modules.bdgf_bank`) run when a fit, test or predict starts, each
skipped when its result is given or cached; the bank joins the DataModule as the modality
``ddpm_features``. The BDGF checkpoint stores the EMA denoiser (``checkpoint["bdgf_ddpm"]``), so
test and predict never pre-train again. Because Lightning restores checkpoint weights *after*
``setup``, the bank is prepared in the ``on_{fit,validation,test,predict}_start`` hooks.
The paper-to-code map and every value's provenance: docs/models/bdgf.md.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from rsfusion.datamodules.errors import InputError
from rsfusion.datamodules.feature_bank import (
    FEATURE_KEY,
    open_bank,
    read_external_bank,
)
from rsfusion.datamodules.pretrain_tiles import unpadded_modalities
from rsfusion.datamodules.sampling import IGNORE_INDEX
from rsfusion.lightning_modules.base import Batch, FusionClassifier
from rsfusion.lightning_modules.bdgf_bank import (
    BankSettings,
    FeatureBankProvider,
    PretrainRecipe,
    default_cache_dir,
    guide_layout,
)
from rsfusion.lightning_modules.bdgf_pretrain import (
    BDGFDiffusion,
    BDGFPretrain,
    load_ddpm_payload,
    payload_digest,
    pretrain_ddpm,
    resolve_ddpm_config,
)
from rsfusion.lightning_modules.losses import bdgf_loss, warmup_weight
from rsfusion.lightning_modules.networks.bdgf import (
    BRANCHES,
    DEFAULT_GUIDE_LEVELS,
    BDGFNet,
    BDGFOutput,
)

__all__ = ["BDGF", "BDGFPretrain", "BDGFDiffusion", "FEATURE_KEY", "pretrain_ddpm", "load_ddpm_payload",
           "payload_digest", "resolve_ddpm_config", "default_cache_dir"]


def _datamodule_of(module: nn.Module):
    dm = getattr(module.trainer, "datamodule", None) if module._trainer is not None else None
    if not hasattr(dm, "add_modality"):
        raise InputError(f"{type(module).__name__} needs a RasterDataModule (its scene) as datamodule")
    return dm


class BDGF(FusionClassifier):
    """BDGF: diffusion-guided CNN / Mamba / Transformer branches with mutual learning (``pixel`` sampling).

    Where the guide features come from (first that applies):
      1. ``feature_bank``: any (F, H, W) ``.npy`` cube on the scene grid, used as given (the
         paper's cross-model experiment [S]); ``feature_bank_split`` lists the channel counts of
         its consecutive blocks (``guide_levels`` then indexes the blocks), else every guided
         branch sees the whole cube.
      2. the DDPM of ``ddpm_checkpoint`` (a :class:`BDGFPretrain` checkpoint, a BDGF checkpoint or a
         cached DDPM file); its own configuration replaces ``ddpm``.
      3. a DDPM cached under ``cache_dir`` for this scene (normalised data), ``ddpm`` configuration and
         pre-training recipe; else one pre-trained in-process for ``pretrain_steps`` steps and
         saved there atomically.
    The bank and the DDPM are cached by content under ``cache_dir`` (:class:`FeatureBankProvider`).

    Args:
        ddpm_checkpoint, feature_bank, feature_bank_split: see above.
        ddpm: overrides of :data:`DDPM_DEFAULTS` for an in-process DDPM.
        pretrain_steps, pretrain_batch_size, pretrain_lr, pretrain_tile, pretrain_ema_decay,
            pretrain_grad_clip, pretrain_seed: the in-process stage-1 recipe (docs/models/bdgf.md: 30k steps,
            batch 64, AdamW 1e-4, tiles 32, EMA 0.999, clip 1.0 [D]).
        feature_timesteps, feature_levels, feature_tile, feature_overlap, feature_batch_size,
            feature_seed, timestep_reduction: stage 1b ({50, 150} averaged, levels 0/1/2, 32/16 [D]).
        guide_levels: {branch: level} (default cnn 0 = shallow, mamba 1, transformer 2 = deep [R]);
            a branch left out is unguided; ``{}`` trains without diffusion features (ablation A).
        cache_dir: where DDPMs and banks are cached (default :func:`default_cache_dir`).
        branches, dim, proj_dim, cnn_kwargs, mamba_kwargs, transformer_kwargs: :class:`BDGFNet`.
        ml, temperature, lambda_prob, lambda_feat, entropy_weight, warmup_fraction: mutual learning
            (docs/models/bdgf.md: both, tau 2, 1.0, 0.5, 0.1, 10 % of the steps [D]); see :func:`bdgf_loss`.
        **kwargs: :class:`FusionClassifier` options (AdamW lr 1e-3, wd 1e-4, cosine [D]).
    """

    def __init__(self, ddpm_checkpoint: str | None = None, feature_bank: str | None = None,
                 feature_bank_split: list[int] | None = None, ddpm: dict[str, Any] | None = None,
                 pretrain_steps: int = 30000, pretrain_batch_size: int = 64, pretrain_lr: float = 1e-4,
                 pretrain_tile: int = 32, pretrain_ema_decay: float = 0.999, pretrain_grad_clip: float = 1.0,
                 pretrain_seed: int = 0, feature_timesteps: list[int] = (50, 150),
                 feature_levels: list[int] = (0, 1, 2), feature_tile: int = 32, feature_overlap: int = 16,
                 feature_batch_size: int = 16, feature_seed: int = 0,
                 timestep_reduction: Literal["mean", "concat"] = "mean", guide_levels: dict[str, int] | None = None,
                 cache_dir: str | None = None, branches: list[str] = list(BRANCHES), dim: int = 64,
                 proj_dim: int = 64, cnn_kwargs: dict[str, Any] | None = None,
                 mamba_kwargs: dict[str, Any] | None = None, transformer_kwargs: dict[str, Any] | None = None,
                 ml: Literal["none", "prob", "feat", "both"] = "both", temperature: float = 2.0,
                 lambda_prob: float = 1.0, lambda_feat: float = 0.5, entropy_weight: float = 0.1,
                 warmup_fraction: float = 0.1, patch_size: int = 11, **kwargs):
        super().__init__(patch_size=patch_size, **kwargs)
        if self.hparams.get("class_weights") is not None:
            raise ValueError("class_weights: not supported by BDGF's loss (bdgf_loss has no class weights)")
        if ddpm_checkpoint is not None and feature_bank is not None:
            raise ValueError("give ddpm_checkpoint or feature_bank, not both")
        self.branch_list = list(branches)
        unknown = [b for b in self.branch_list if b not in BRANCHES]
        if unknown:
            raise ValueError(f"branches: {unknown} not among {list(BRANCHES)}")
        guide_levels = dict(DEFAULT_GUIDE_LEVELS if guide_levels is None else guide_levels)
        bad = [b for b in guide_levels if b not in BRANCHES]
        if bad:
            raise ValueError(f"guide_levels: unknown branches {bad} (known: {list(BRANCHES)})")
        guide_levels = {b: int(lvl) for b, lvl in guide_levels.items() if b in self.branch_list}
        self.feature_timesteps = [int(t) for t in feature_timesteps]
        self.feature_levels = [int(lvl) for lvl in feature_levels]
        self._branch_logits: dict[str, Tensor] = {}
        self._bank_added: tuple[int, int] | None = None  # ids of the DataModule and scene given this bank
        self._bank_path: str | None = None  # the cached bank file last used (saved in checkpoints)
        payload = None
        if ddpm_checkpoint is not None and feature_bank is None:
            payload = load_ddpm_payload(ddpm_checkpoint)
        self.bank_provider = FeatureBankProvider(
            self.in_channels, payload["config"] if payload else ddpm,
            PretrainRecipe(pretrain_steps, pretrain_batch_size, pretrain_lr, pretrain_tile, pretrain_ema_decay,
                           pretrain_grad_clip, pretrain_seed),
            BankSettings(tuple(self.feature_timesteps), tuple(self.feature_levels), feature_tile, feature_overlap,
                         feature_batch_size, feature_seed, timestep_reduction), cache_dir, payload)
        if payload is not None:
            self.bank_provider.check_payload(payload, ddpm_checkpoint)

        self.guide_slices, self.bank_channels = guide_layout(
            guide_levels, self.in_channels, feature_bank=feature_bank, feature_bank_split=feature_bank_split,
            ddpm=payload["config"] if payload else ddpm, levels=self.feature_levels,
            timesteps=len(self.feature_timesteps), reduction=timestep_reduction)
        guide_channels = {b: e - s for b, (s, e) in self.guide_slices.items()}
        self.net = BDGFNet(self.in_channels, self.num_classes, guide_channels, patch_size, self.branch_list, dim,
                           proj_dim, cnn_kwargs, mamba_kwargs, transformer_kwargs)
        metric = lambda: MulticlassAccuracy(self.num_classes, average="micro", ignore_index=IGNORE_INDEX)  # noqa: E731
        self.val_branch_oa = nn.ModuleDict({b: metric() for b in self.branch_list})
        self.test_branch_oa = nn.ModuleDict({b: metric() for b in self.branch_list})

    # ------------------------------------------------------------------ network
    def _modalities(self, batch: Batch) -> dict[str, Tensor]:
        return {n: batch[n] for n in self.in_channels}

    def _guides(self, batch: Batch) -> dict[str, Tensor]:
        if not self.guide_slices:
            return {}
        if FEATURE_KEY not in batch:
            raise InputError(f"BDGF: the batch has no {FEATURE_KEY!r} patches; the feature bank is added to the "
                             "DataModule as a modality when fit/validate/test/predict starts")
        feats = batch[FEATURE_KEY].float()
        if feats.shape[1] != self.bank_channels:
            raise InputError(f"BDGF: feature patches have {feats.shape[1]} channels, the model expects "
                             f"{self.bank_channels}")
        return {b: feats[:, s:e] for b, (s, e) in self.guide_slices.items()}

    def branch_outputs(self, batch: Batch) -> BDGFOutput:
        return self.net(self._modalities(batch), self._guides(batch))

    @staticmethod
    def ensemble_log_probs(logits: Mapping[str, Tensor]) -> Tensor:
        """Log of the mean of the branch softmaxes (B, K) [D]: the prediction's scores."""
        return BDGFNet.ensemble_probabilities(logits).clamp_min(1e-12).log()

    def forward(self, batch: Batch) -> Tensor:
        return self.ensemble_log_probs(self.branch_outputs(batch).logits)

    def predict_logits(self, batch: Batch) -> Tensor:
        """Log of the mean branch probabilities; keeps the branch logits for per-branch metrics."""
        out = self.branch_outputs(batch)
        self._branch_logits = {b: logits.detach() for b, logits in out.logits.items()}
        return self.ensemble_log_probs(out.logits)

    def _progress(self) -> float:
        if self._trainer is None:
            return 1.0
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total <= 0:
            return 1.0
        return self.global_step / total

    def training_loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        hp = self.hparams
        weight = warmup_weight(self._progress(), hp.warmup_fraction)
        terms = bdgf_loss(self.branch_outputs(batch), batch["label"], ml=hp.ml, temperature=hp.temperature,
                          lambda_prob=hp.lambda_prob, lambda_feat=hp.lambda_feat, entropy_weight=hp.entropy_weight,
                          warmup=weight, label_smoothing=hp.label_smoothing)
        loss = terms.pop("loss")
        terms["ml_weight"] = torch.tensor(weight)
        return loss, terms

    def _log_branch_metrics(self, metrics: nn.ModuleDict, target: Tensor, split: str) -> None:
        # Lightning computes, syncs and resets the metric objects at the end of the epoch
        for b, logits in self._branch_logits.items():
            metrics[b].update(logits.argmax(1), target)
            self.log(f"{split}/OA_{b}", metrics[b])

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        self._log_branch_metrics(self.val_branch_oa, batch["label"], "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        self._log_branch_metrics(self.test_branch_oa, batch["label"], "test")

    # ------------------------------------------------------------------ the DDPM and the bank
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.bank_provider.payload is not None:
            checkpoint["bdgf_ddpm"] = self.bank_provider.payload
        if self._bank_path is not None:
            checkpoint["bdgf_bank"] = self._bank_path

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._bank_path = checkpoint.get("bdgf_bank", self._bank_path)
        payload, given = checkpoint.get("bdgf_ddpm"), self.bank_provider.payload
        if payload is not None:
            if given is None or payload_digest(payload) != payload_digest(given):
                self._bank_added = None  # another DDPM: the DataModule's bank must be redone
            self.bank_provider.payload = payload

    def on_fit_start(self) -> None:
        self.prepare_feature_bank()
        super().on_fit_start()

    def on_validation_start(self) -> None:
        self.prepare_feature_bank()

    def on_test_start(self) -> None:
        self.prepare_feature_bank()

    def on_predict_start(self) -> None:
        self.prepare_feature_bank()

    @property
    def feature_bank_path(self) -> str | None:
        """The bank file the last prepared scene reads (the cached one or ``feature_bank``)."""
        return self._bank_path or self.hparams.feature_bank

    def prepare_feature_bank(self, datamodule=None) -> None:
        """Give ``datamodule`` (default: the Trainer's) the guide features as its modality ``ddpm_features``:
        the bank of ``feature_bank``, or the :class:`FeatureBankProvider`'s (cached or built). Under
        ``predict_window`` the DataModule reads the bank file window by window. A DataModule that already
        has this model's bank is left alone."""
        if not self.guide_slices:
            return
        dm = datamodule if datamodule is not None else _datamodule_of(self)
        identity = (id(dm), id(dm.scene))
        if self._bank_added == identity and FEATURE_KEY in dm.extra_modalities:
            return
        windowed = bool(dm.hparams.get("predict_window")) and dm.scene is None
        dm.add_modality(FEATURE_KEY, self._windowed_bank_file(dm) if windowed else self._bank_of(dm.scene))
        self._bank_added = identity

    def _bank_of(self, scene) -> np.ndarray:
        hp = self.hparams
        if hp.feature_bank is not None:
            cube = read_external_bank(hp.feature_bank, *scene.shape)
            rank_zero_info(f"BDGF: using the feature bank {hp.feature_bank} as given ({cube.shape[0]} channels)")
            return cube
        data = unpadded_modalities(scene, list(self.in_channels))
        cube = self.bank_provider.bank(data, self.bank_channels, self._trainer, self.device)
        self._bank_path = str(self.bank_provider.bank_path)
        return cube

    def _windowed_bank_file(self, dm) -> str:
        """The bank file a ``predict_window`` run reads window by window: ``feature_bank``, else the cached
        bank of this checkpoint's DDPM."""
        if self.hparams.feature_bank is not None:
            open_bank(self.hparams.feature_bank, *dm.shape)  # checks the file and its grid
            return self.hparams.feature_bank
        return self.bank_provider.cached_bank_file(self._bank_path, dm.shape, self.bank_channels)
