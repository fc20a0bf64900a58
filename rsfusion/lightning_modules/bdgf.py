"""BDGF (Liu et al., arXiv 2509.23310): the diffusion-guided three-branch classifier (stage 3).

BDGF runs in stages on the suite's :class:`~rsfusion.datamodules.raster.RasterDataModule`:

1. the multimodal DDPM (:mod:`rsfusion.lightning_modules.bdgf_pretrain`, :class:`BDGFPretrain`),
   a Trainer run of its own over unlabelled scene tiles;
2. the whole-scene diffusion feature bank of that DDPM (:mod:`rsfusion.lightning_modules.bdgf_features`);
3. :class:`BDGF`, the classifier reading the bank as the scene modality ``ddpm_features``.

``lightning fit --config configs/bdgf_synthetic.yaml`` runs all three: :class:`BDGF` obtains a
DDPM (a given checkpoint, else a cached one for this scene and DDPM configuration, else stage 1 is
fitted by a Trainer on every rank under the run's own strategy, so no rank waits for another's
training), builds or reuses the bank and trains. The BDGF checkpoint stores the EMA denoiser
(``checkpoint["bdgf_ddpm"]``), so ``lightning test/predict --ckpt_path`` never pre-trains again;
the bank is rebuilt from those weights when the cache lacks it. Because Lightning restores
checkpoint weights *after* ``setup``, the bank is prepared in the ``on_{fit,validation,test,predict}_start``
hooks (before the first batch; the datasets cut their windows lazily).

Only the skeleton is the paper's [P]; the rest follows ``specs/bdgf.md`` (tags [R]/[D] there) and
every number is a constructor argument. The abstract announces code at github.com/HaoLiu-XDU/BDGF;
it was not available to this project and this reconstruction has not been compared with it.

Deviations from the spec (ours): the DDPM sees the modalities as the DataModule normalises them
(PCA components are whitened, the rest per-band z-score or min-max) instead of a rescale to
[-1, 1]; the cache keys hash the normalised scene data itself rather than file paths and mtimes;
no random flips/rot90 of the classifier's patches (the suite's DataModule has no augmentation).
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from rsfusion.datamodules.errors import InputError
from rsfusion.datamodules.feature_bank import (
    FEATURE_KEY,
    array_digest,
    bank_patches,
    cache_key,
    external_bank_channels,
    load_bank,
    open_bank,
    read_external_bank,
    save_bank,
)
from rsfusion.datamodules.pretrain_tiles import unpadded_modalities
from rsfusion.datamodules.sampling import IGNORE_INDEX
from rsfusion.datamodules.writing import atomic_path
from rsfusion.lightning_modules.base import Batch, FusionClassifier
from rsfusion.lightning_modules.bdgf_features import build_feature_bank, feature_cube_channels
from rsfusion.lightning_modules.bdgf_pretrain import (
    _DENOISER_KEYS,
    PAYLOAD_FORMAT,
    STAGE1_OBJECTIVE_VERSION,
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
from rsfusion.lightning_modules.networks.bdgf_diffusion import MultimodalDenoiserUNet

__all__ = ["BDGF", "BDGFPretrain", "BDGFDiffusion", "FEATURE_KEY", "pretrain_ddpm", "load_ddpm_payload",
           "payload_digest", "resolve_ddpm_config", "default_cache_dir"]



def default_cache_dir() -> Path:
    """``$RSFUSION_CACHE_DIR/bdgf`` if set, else ``$XDG_CACHE_HOME`` (``~/.cache``) ``/rsfusion/bdgf``."""
    if os.environ.get("RSFUSION_CACHE_DIR"):
        return Path(os.environ["RSFUSION_CACHE_DIR"]).expanduser() / "bdgf"
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "rsfusion" / "bdgf"


def _scene_of(module: nn.Module):
    dm = getattr(module.trainer, "datamodule", None) if module._trainer is not None else None
    scene = getattr(dm, "scene", None)
    if scene is None:
        raise InputError(f"{type(module).__name__} needs a RasterDataModule (its scene) as datamodule")
    return dm, scene


# ----------------------------------------------------------------------------------------------
# Stages 1b + 2
# ----------------------------------------------------------------------------------------------
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
    The bank (decoder ``feature_levels`` at ``feature_timesteps``, averaged, tiles of
    ``feature_tile`` with ``feature_overlap``, fixed noise ``feature_seed`` [D, spec 5]) is cached as
    fp16 ``.npy`` under ``cache_dir/banks`` with a key hashing the DDPM weights, the normalised scene
    data and these settings; damaged files are detected (shape/values) and rebuilt.

    Args:
        ddpm_checkpoint, feature_bank, feature_bank_split: see above.
        ddpm: overrides of :data:`DDPM_DEFAULTS` for an in-process DDPM.
        pretrain_steps, pretrain_batch_size, pretrain_lr, pretrain_tile, pretrain_ema_decay,
            pretrain_grad_clip, pretrain_seed: the in-process stage-1 recipe (spec 4.2: 30k steps,
            batch 64, AdamW 1e-4, tiles 32, EMA 0.999, clip 1.0 [D]).
        feature_timesteps, feature_levels, feature_tile, feature_overlap, feature_batch_size,
            feature_seed, timestep_reduction: stage 1b ({50, 150} averaged, levels 0/1/2, 32/16 [D]).
        guide_levels: {branch: level} (default cnn 0 = shallow, mamba 1, transformer 2 = deep [R]);
            a branch left out is unguided; ``{}`` trains without diffusion features (ablation A).
        cache_dir: where DDPMs and banks are cached (default :func:`default_cache_dir`).
        branches, dim, proj_dim, cnn_kwargs, mamba_kwargs, transformer_kwargs: :class:`BDGFNet`.
        ml, temperature, lambda_prob, lambda_feat, entropy_weight, warmup_fraction: mutual learning
            (spec 7: both, tau 2, 1.0, 0.5, 0.1, 10 % of the steps [D]); see :func:`bdgf_loss`.
        **kwargs: :class:`FusionClassifier` options (AdamW lr 1e-3, wd 1e-4, cosine [D, spec 8]).
    """

    def __init__(
        self,
        ddpm_checkpoint: str | None = None,
        feature_bank: str | None = None,
        feature_bank_split: list[int] | None = None,
        ddpm: dict[str, Any] | None = None,
        pretrain_steps: int = 30000,
        pretrain_batch_size: int = 64,
        pretrain_lr: float = 1e-4,
        pretrain_tile: int = 32,
        pretrain_ema_decay: float = 0.999,
        pretrain_grad_clip: float = 1.0,
        pretrain_seed: int = 0,
        feature_timesteps: list[int] = (50, 150),
        feature_levels: list[int] = (0, 1, 2),
        feature_tile: int = 32,
        feature_overlap: int = 16,
        feature_batch_size: int = 16,
        feature_seed: int = 0,
        timestep_reduction: Literal["mean", "concat"] = "mean",
        guide_levels: dict[str, int] | None = None,
        cache_dir: str | None = None,
        branches: list[str] = list(BRANCHES),
        dim: int = 64,
        proj_dim: int = 64,
        cnn_kwargs: dict[str, Any] | None = None,
        mamba_kwargs: dict[str, Any] | None = None,
        transformer_kwargs: dict[str, Any] | None = None,
        ml: Literal["none", "prob", "feat", "both"] = "both",
        temperature: float = 2.0,
        lambda_prob: float = 1.0,
        lambda_feat: float = 0.5,
        entropy_weight: float = 0.1,
        warmup_fraction: float = 0.1,
        patch_size: int = 11,
        **kwargs,
    ):
        super().__init__(patch_size=patch_size, **kwargs)
        if self.hparams.get("class_weights") is not None:
            raise ValueError("class_weights: not supported by BDGF's loss (bdgf_loss has no class weights)")
        if ddpm_checkpoint is not None and feature_bank is not None:
            raise ValueError("give ddpm_checkpoint or feature_bank, not both")
        self.branch_list = list(branches)
        unknown = [b for b in self.branch_list if b not in BRANCHES]
        if unknown:
            raise ValueError(f"branches: {unknown} not among {list(BRANCHES)}")
        self.guide_levels = dict(DEFAULT_GUIDE_LEVELS if guide_levels is None else guide_levels)
        bad = [b for b in self.guide_levels if b not in BRANCHES]
        if bad:
            raise ValueError(f"guide_levels: unknown branches {bad} (known: {list(BRANCHES)})")
        self.guide_levels = {b: int(lvl) for b, lvl in self.guide_levels.items() if b in self.branch_list}
        self.feature_timesteps = [int(t) for t in feature_timesteps]
        self.feature_levels = [int(lvl) for lvl in feature_levels]
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self._ddpm_payload: dict | None = None
        self._bank_key: str | None = None  # key of the bank added to the scene with id _bank_scene
        self._sources: dict[str, str] = {}  # where the last DDPM / bank came from ("cache" or "built")
        self._bank_scene: int | None = None
        self._bank_path: str | None = None  # the cached bank file last used (saved in checkpoints)
        self._windowed_bank: np.ndarray | None = None
        self._branch_logits: dict[str, Tensor] = {}

        blocks = self._bank_blocks(ddpm_checkpoint, feature_bank, feature_bank_split, ddpm)
        self.bank_channels = sum(blocks) if blocks else 0
        offsets = np.concatenate([[0], np.cumsum(blocks)]).astype(int).tolist() if blocks else [0]
        self.guide_slices: dict[str, tuple[int, int]] = {}
        for b, lvl in self.guide_levels.items():
            if feature_bank is not None and not feature_bank_split:
                self.guide_slices[b] = (0, self.bank_channels)
                continue
            if not 0 <= lvl < len(blocks):
                names = ("feature_bank_split blocks" if feature_bank is not None
                         else f"feature_levels {self.feature_levels}")
                raise ValueError(f"guide_levels[{b!r}] = {lvl} is not among the {names}")
            self.guide_slices[b] = (offsets[lvl], offsets[lvl + 1])
        guide_channels = {b: e - s for b, (s, e) in self.guide_slices.items()}
        self.net = BDGFNet(self.in_channels, self.num_classes, guide_channels, patch_size, self.branch_list, dim,
                           proj_dim, cnn_kwargs, mamba_kwargs, transformer_kwargs)
        metric = lambda: MulticlassAccuracy(self.num_classes, average="micro", ignore_index=IGNORE_INDEX)  # noqa: E731
        self.val_branch_oa = nn.ModuleDict({b: metric() for b in self.branch_list})
        self.test_branch_oa = nn.ModuleDict({b: metric() for b in self.branch_list})

    # ------------------------------------------------------------------ feature bank layout
    def _bank_blocks(self, ddpm_checkpoint, feature_bank, feature_bank_split, ddpm) -> list[int]:
        """Channel counts of the bank's consecutive blocks; ``guide_levels`` index into them.

        For a DDPM bank the blocks are ``feature_levels`` in order, so ``guide_levels`` values are
        decoder levels; they are mapped to block positions here.
        """
        if not self.guide_levels:
            return []
        if feature_bank is not None:
            total = external_bank_channels(feature_bank)
            if feature_bank_split:
                if sum(feature_bank_split) != total or min(feature_bank_split) < 1:
                    raise ValueError(f"feature_bank_split {list(feature_bank_split)} must be positive and sum to "
                                     f"the bank's {total} channels")
                return [int(c) for c in feature_bank_split]
            return [total]
        if ddpm_checkpoint is not None:
            self._ddpm_payload = load_ddpm_payload(ddpm_checkpoint)
            self._check_payload_modalities(self._ddpm_payload, ddpm_checkpoint)
            config = self._ddpm_payload["config"]
        else:
            config = resolve_ddpm_config(ddpm)
        with torch.device("meta"):
            config = resolve_ddpm_config(config)
            unet = MultimodalDenoiserUNet(self.in_channels, **{k: config[k] for k in _DENOISER_KEYS})
        widths = feature_cube_channels(unet, self.feature_levels, len(self.feature_timesteps),
                                       self.hparams.timestep_reduction)
        missing = {b: lvl for b, lvl in self.guide_levels.items() if lvl not in widths}
        if missing:
            raise ValueError(f"guide_levels {missing} must be among feature_levels {self.feature_levels}")
        unused = sorted(set(self.feature_levels) - set(self.guide_levels.values()))
        if unused:
            raise ValueError(f"feature_levels {unused} would be extracted and cached but no branch reads them "
                             f"(guide_levels {self.guide_levels}): drop them from feature_levels")
        self.guide_levels = {b: self.feature_levels.index(lvl) for b, lvl in self.guide_levels.items()}
        return list(widths.values())

    def _check_payload_modalities(self, payload: Mapping, source) -> None:
        if dict(payload["modality_channels"]) != dict(self.in_channels):
            raise InputError(f"{source}: the DDPM was trained on {dict(payload['modality_channels'])}, the data has "
                             f"{dict(self.in_channels)}")

    # ------------------------------------------------------------------ network
    def _modalities(self, batch: Batch) -> dict[str, Tensor]:
        return {n: batch[n] for n in self.in_channels}

    def _guides(self, batch: Batch) -> dict[str, Tensor]:
        if not self.guide_slices:
            return {}
        if FEATURE_KEY not in batch:
            raise InputError(f"BDGF: the batch has no {FEATURE_KEY!r} patches; the feature bank is added to the "
                             "DataModule's scene when fit/validate/test/predict starts")
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
        if self._ddpm_payload is not None:
            checkpoint["bdgf_ddpm"] = self._ddpm_payload
        if self._bank_path is not None:
            checkpoint["bdgf_bank"] = self._bank_path

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._bank_path = checkpoint.get("bdgf_bank", self._bank_path)
        payload = checkpoint.get("bdgf_ddpm")
        if payload is not None:
            if self._ddpm_payload is None or payload_digest(payload) != payload_digest(self._ddpm_payload):
                self._bank_key = None  # another DDPM: the scene's bank must be redone
            self._ddpm_payload = payload

    def on_fit_start(self) -> None:
        self.prepare_feature_bank()
        super().on_fit_start()

    def on_validation_start(self) -> None:
        self.prepare_feature_bank()

    def on_test_start(self) -> None:
        self.prepare_feature_bank()

    def on_predict_start(self) -> None:
        dm = self.trainer.datamodule
        if dm is not None and dm.hparams.get("predict_window"):
            self._windowed_bank = self._bank_for_windows(dm)
            return
        self._windowed_bank = None
        self.prepare_feature_bank()

    @property
    def feature_bank_path(self) -> str | None:
        """The bank file the last prepared scene reads (the cached one or ``feature_bank``)."""
        return self._bank_path or self.hparams.feature_bank

    def _bank_for_windows(self, dm) -> np.ndarray | None:
        """The memory-mapped bank of a ``predict_window`` run: ``feature_bank``, else the cached bank
        this checkpoint's DDPM made for the scene (its provenance ``.json`` names the DDPM)."""
        if not self.guide_slices:
            return None
        h, w = dm.shape
        if self.hparams.feature_bank is not None:
            return open_bank(self.hparams.feature_bank, h, w)
        path = Path(self._bank_path) if self._bank_path else None
        if path is None or not path.is_file() or self._ddpm_payload is None:
            raise InputError(f"BDGF: predict_window reads the feature bank window by window, but "
                             f"{path or 'the checkpoint'} names no cached bank: predict once without "
                             "data.predict_window (builds it) or give model.feature_bank")
        meta = json.loads(path.with_suffix(".json").read_text()) if path.with_suffix(".json").is_file() else {}
        if meta.get("ddpm") != payload_digest(self._ddpm_payload):
            raise InputError(f"{path}: this feature bank was not made by the checkpoint's DDPM")
        bank = open_bank(path, h, w)
        if bank.shape[0] != self.bank_channels:
            raise InputError(f"{path}: {bank.shape[0]} channels, the model expects {self.bank_channels}")
        rank_zero_info(f"BDGF: reading the feature bank {path} window by window (memory-mapped)")
        return bank

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """``predict_window``: the bank's patches of the batch's pixels, cut from the memory-mapped file."""
        bank = getattr(self, "_windowed_bank", None)
        if bank is not None and "index" in batch and FEATURE_KEY not in batch:
            index = batch["index"].numpy()
            pad_mode = self.trainer.datamodule.hparams.get("pad_mode", "reflect")
            batch[FEATURE_KEY] = torch.from_numpy(bank_patches(bank, index[:, 0], index[:, 1], self.patch_size,
                                                               pad_mode))
        return batch

    def prepare_feature_bank(self, scene=None) -> None:
        """Add the guide features to ``scene`` (default: the DataModule's) as modality ``ddpm_features``.

        Idempotent: a scene that already holds this model's bank is left alone.
        """
        if not self.guide_slices:
            return
        if scene is None:
            _, scene = _scene_of(self)
        if self._bank_key is not None and self._bank_scene == id(scene) and FEATURE_KEY in scene.data:
            return
        # Under DDP every rank runs this: a missing DDPM is trained by all ranks together (one Trainer
        # run under the same strategy), and each rank extracts the bank itself, so no rank waits for
        # another's work; rank 0 writes the cache.
        self._sources = {}
        self._build_or_load_bank(scene)
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            sources = ", ".join(f"{what} {how}" for what, how in self._sources.items())
            logging.getLogger("lightning.pytorch").info(
                f"BDGF rank {trainer.global_rank}: " + sources.replace(" cache", " read from the cache"))

    def _build_or_load_bank(self, scene) -> None:
        hp = self.hparams
        if hp.feature_bank is not None:
            cube = read_external_bank(hp.feature_bank, *scene.shape)
            rank_zero_info(f"BDGF: using the feature bank {hp.feature_bank} as given ({cube.shape[0]} channels)")
            scene.add(FEATURE_KEY, cube)
            self._bank_key, self._bank_scene = f"file:{hp.feature_bank}", id(scene)
            return
        data = unpadded_modalities(scene, list(self.in_channels))
        data_hash = array_digest(data)
        payload = self._obtain_ddpm(data, data_hash)
        key = cache_key(kind="bank", ddpm=payload_digest(payload), data=data_hash, timesteps=self.feature_timesteps,
                        levels=self.feature_levels, tile=hp.feature_tile, overlap=hp.feature_overlap,
                        seed=hp.feature_seed, reduction=hp.timestep_reduction, blend="mean")
        path = self.cache_dir / "banks" / f"{key}.npy"
        shape = (self.bank_channels, *scene.shape)
        cube, reason = load_bank(path, shape)
        self._sources["bank"] = "cache" if cube is not None else "built"
        if cube is not None:
            rank_zero_info(f"BDGF: feature bank cache hit, reusing {path}")
        else:
            if reason != "missing":
                rank_zero_warn(f"BDGF: cached feature bank {path} is unusable ({reason}); rebuilding it")
            cube = self._extract_bank(payload, data)
            if self._is_global_zero():
                save_bank(path, cube, {"ddpm": payload_digest(payload), "data": data_hash, "shape": list(cube.shape),
                                       "levels": self.feature_levels, "timesteps": self.feature_timesteps,
                                       "tile": hp.feature_tile, "overlap": hp.feature_overlap,
                                       "seed": hp.feature_seed, "reduction": hp.timestep_reduction,
                                       "modalities": list(data)})
                rank_zero_info(f"BDGF: feature bank {tuple(cube.shape)} saved to {path}")
        scene.add(FEATURE_KEY, cube)
        self._bank_key, self._bank_scene, self._bank_path = key, id(scene), str(path)

    def _extract_bank(self, payload: Mapping, data: Mapping[str, np.ndarray]) -> np.ndarray:
        hp = self.hparams
        return build_feature_bank(payload, data, timesteps=self.feature_timesteps, levels=self.feature_levels,
                                  tile=hp.feature_tile, overlap=hp.feature_overlap, batch_size=hp.feature_batch_size,
                                  seed=hp.feature_seed, timestep_reduction=hp.timestep_reduction, device=self.device)

    def _obtain_ddpm(self, data: Mapping[str, np.ndarray], data_hash: str) -> dict:
        if self._ddpm_payload is not None:
            self._check_payload_modalities(self._ddpm_payload, "the DDPM in the checkpoint")
            return self._ddpm_payload
        hp = self.hparams
        config = resolve_ddpm_config(hp.ddpm)
        recipe = {"steps": hp.pretrain_steps, "batch_size": hp.pretrain_batch_size, "lr": hp.pretrain_lr,
                  "tile": hp.pretrain_tile, "ema_decay": hp.pretrain_ema_decay, "grad_clip": hp.pretrain_grad_clip,
                  "seed": hp.pretrain_seed}
        key = cache_key(kind="ddpm", data=data_hash, config=config, recipe=recipe, format=PAYLOAD_FORMAT,
                        objective=STAGE1_OBJECTIVE_VERSION)
        path = self.cache_dir / "ddpm" / f"{key}.pt"
        payload = self._cached_ddpm(path)
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            # all ranks take the same road: a rank without the cached file (another node) trains with the rest
            if not trainer.strategy.reduce_boolean_decision(payload is not None, all=True):
                payload = None
        if payload is not None:
            rank_zero_info(f"BDGF: DDPM cache hit, reusing {path} (no pretraining)")
            self._sources["DDPM"] = "cache"
            self._ddpm_payload = payload
            return payload
        processes = trainer.world_size if trainer is not None else 1
        rank_zero_info(f"BDGF: no cached DDPM for this scene and configuration; stage 1 is a Trainer run of "
                       f"{hp.pretrain_steps} steps on {processes} process(es) (batch {hp.pretrain_batch_size} "
                       f"per process, tiles {hp.pretrain_tile})")
        # logged beside the run's own log; a run without a logger logs nothing of stage 1 either
        log_dir = Path(trainer.log_dir) / "bdgf_pretrain" if trainer is not None and trainer.loggers else None
        payload = pretrain_ddpm(data, config, steps=hp.pretrain_steps, batch_size=hp.pretrain_batch_size,
                                lr=hp.pretrain_lr, tile=hp.pretrain_tile, ema_decay=hp.pretrain_ema_decay,
                                grad_clip=hp.pretrain_grad_clip, seed=hp.pretrain_seed, like=trainer, log_dir=log_dir)
        if self._is_global_zero():
            with atomic_path(path) as tmp:
                torch.save(payload, tmp)
            rank_zero_info(f"BDGF: DDPM saved to {path}")
        self._sources["DDPM"] = "built"
        self._ddpm_payload = payload
        return payload

    def _cached_ddpm(self, path: Path) -> dict | None:
        if not path.is_file():
            return None
        try:
            payload = load_ddpm_payload(path)
            self._check_payload_modalities(payload, path)
            return payload
        except InputError as err:
            rank_zero_warn(f"BDGF: cached DDPM is unusable ({err}); pretraining again")
            return None

    def _is_global_zero(self) -> bool:
        return self._trainer is None or self.trainer.is_global_zero
