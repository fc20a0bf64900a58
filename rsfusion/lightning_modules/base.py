"""``FusionTask``, what every LightningModule of the suite shares, and ``FusionClassifier``, the
classifier every model builds on (``BDGFPretrain``, which trains a DDPM, is a ``FusionTask`` only).

Subclasses build their network in ``__init__`` and implement :meth:`forward` (a batch dict of
modality tensors -> logits, (B, K) for pixel sampling or (B, K, H, W) for tile sampling). They may
override :meth:`training_loss` (extra heads, auxiliary terms) and :meth:`parameter_groups`.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassConfusionMatrix
from torchmetrics.wrappers import ClasswiseWrapper

from rsfusion.datamodules.checkpoint_inputs import check_modalities
from rsfusion.datamodules.errors import InputError
from rsfusion.datamodules.sampling import IGNORE_INDEX
from rsfusion.lightning_modules.metrics import classification_metrics, per_class_accuracy

Batch = dict[str, torch.Tensor]


class FusionTask(L.LightningModule):
    """What every task of the suite shares: the arguments the CLI links from the DataModule, the sampling
    and band-count checks (at setup and before a checkpoint's weights load), and the optimiser and schedule.

    Args:
        in_channels: modality name -> band count (linked from the DataModule by the CLI).
        num_classes: number of classes K (linked from the DataModule).
        class_names: names of the K classes, for per-class metrics and maps (linked).
        patch_size: the DataModule's patch/tile size (linked; recorded in checkpoints).
        dense: whether the DataModule samples tiles (linked); a sampling not in the class's
            ``samplings`` is refused with a one-line error.
        lr, weight_decay: optimiser settings; no decay on biases and normalisation weights.
        optimizer: ``adamw``, ``adam`` or ``sgd`` (momentum 0.9).
        scheduler: ``cosine`` (per step, to 0 at the end of training, after ``warmup_steps``),
            ``step_decay`` (lr x ``step_decay_gamma`` after every optimiser step, DAS2F's recipe) or
            ``none``.
    """

    # The DataModule samplings the model takes: "pixel" (a patch per labelled pixel -> (B, K) logits)
    # and/or "tile" (whole tiles -> (B, K, H, W) logits). ``self.sampling`` is the one of this instance.
    samplings: ClassVar[frozenset[str]] = frozenset({"pixel"})
    # True for networks with parameters that never reach the loss (DDP must then look for them each step)
    has_unused_parameters: bool = False

    def __init__(
        self,
        in_channels: dict[str, int],
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        patch_size: int | None = None,
        dense: bool | None = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        optimizer: Literal["adamw", "adam", "sgd"] = "adamw",
        scheduler: Literal["cosine", "step_decay", "none"] = "cosine",
        warmup_steps: int = 0,
        step_decay_gamma: float = 0.9995,
    ):
        super().__init__()
        self.save_hyperparameters()  # collects the subclass's arguments too
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        given = None if dense is None else ("tile" if dense else "pixel")
        self.sampling = given if given in self.samplings else sorted(self.samplings)[0]
        if given is not None:
            self.check_sampling(given)
        self.in_channels = dict(in_channels)
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names else [f"class {k}" for k in
                                                                   range(1, (num_classes or 0) + 1)]

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """No weight decay on biases and normalisation weights (any parameter with one dimension)."""
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def check_sampling(self, sampling: str, where: str = "") -> None:
        """Refuse data sampled otherwise than this model (``self.sampling``) predicts."""
        if sampling != self.sampling:
            raise InputError(f"{type(self).__name__} needs data.sampling={self.sampling!r}{where}")

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return
        if getattr(dm, "sampling", None) is not None:
            self.check_sampling(dm.sampling, f", the DataModule uses {dm.sampling!r}")
        data_channels = getattr(dm, "in_channels", None)
        if data_channels is not None and dict(data_channels) != self.in_channels:
            raise InputError(f"band counts differ: the data has {dict(data_channels)}, the model (checkpoint) "
                             f"expects {self.in_channels}")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Runs before the weights are loaded: a data/checkpoint band mismatch is one clear line,
        # not a load_state_dict size error.
        saved = checkpoint.get("hyper_parameters", {})
        if saved.get("in_channels") is not None:
            dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
            check_modalities(dict(saved["in_channels"]), self.in_channels, getattr(dm, "modalities", None),
                             what="channels")
        expected = saved.get("num_classes")
        if expected is not None and expected != self.num_classes:
            raise InputError(f"the checkpoint was trained with num_classes={expected!r}, the data gives "
                             f"{self.num_classes!r}")

    def configure_optimizers(self):
        hp = self.hparams
        groups = self.parameter_groups(hp.weight_decay)
        if hp.optimizer == "adamw":
            opt = torch.optim.AdamW(groups, lr=hp.lr)
        elif hp.optimizer == "adam":
            # Adam's weight_decay is L2 added to the gradient, as in the papers' recipes.
            opt = torch.optim.Adam(groups, lr=hp.lr)
        else:
            opt = torch.optim.SGD(groups, lr=hp.lr, momentum=0.9)
        if hp.scheduler == "none":
            return opt
        schedulers = torch.optim.lr_scheduler
        if hp.scheduler == "step_decay":
            schedule = schedulers.ExponentialLR(opt, gamma=hp.step_decay_gamma)
        else:  # linear warm-up from lr / warmup_steps to lr, then cosine to 0 at the last step
            total, warmup = max(1, int(self.trainer.estimated_stepping_batches)), hp.warmup_steps
            schedule = schedulers.CosineAnnealingLR(opt, T_max=max(1, total - warmup))
            if warmup > 0:
                ramp = schedulers.LinearLR(opt, start_factor=1 / warmup, total_iters=max(1, warmup - 1))
                schedule = schedulers.SequentialLR(opt, [ramp, schedule], milestones=[warmup])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class FusionClassifier(FusionTask):
    """Shared training/evaluation logic of the classifiers: loss, OA/AA/kappa, per-class accuracy, predictions.

    Args:
        label_smoothing: cross-entropy label smoothing.
        class_weights: optional per-class loss weights (length K).
        **kwargs: :class:`FusionTask` arguments (the linked ones, optimiser and schedule).
    """

    predict_probabilities: bool = False  # predict_step also returns class probabilities (set by map writers)

    def __init__(self, in_channels: dict[str, int], num_classes: int, label_smoothing: float = 0.0,
                 class_weights: list[float] | None = None, **kwargs):
        super().__init__(in_channels=in_channels, num_classes=num_classes, **kwargs)
        if class_weights is not None and len(class_weights) != num_classes:
            raise ValueError(f"class_weights has {len(class_weights)} entries for {num_classes} classes")
        weights = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", weights, persistent=False)
        self.val_metrics = classification_metrics(num_classes).clone(prefix="val/")
        self.test_metrics = classification_metrics(num_classes).clone(prefix="test/")
        self.val_per_class = per_class_accuracy(self.class_names, "val/")
        self.test_per_class = per_class_accuracy(self.class_names, "test/")
        # read (computed and reset) by the TestReport callback
        self.test_confusion = MulticlassConfusionMatrix(num_classes, ignore_index=IGNORE_INDEX)

    # ----------------------------------------------------------------- what subclasses may override
    def cross_entropy(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, weight=self.class_weights, ignore_index=IGNORE_INDEX,
                               label_smoothing=self.hparams.get("label_smoothing", 0.0))

    def training_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to minimise and extra named terms to log (override for auxiliary losses)."""
        return self.cross_entropy(self(batch), batch["label"]), {}

    def predict_logits(self, batch: Batch) -> torch.Tensor:
        """Logits used for evaluation and maps (override when prediction differs from ``forward``)."""
        return self(batch)

    # ----------------------------------------------------------------- Lightning hooks
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss, terms = self.training_loss(batch)
        size = batch["label"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        for name, value in terms.items():
            self.log(f"train/{name}", value, batch_size=size)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        logits = self.predict_logits(batch)
        self.log("val/loss", self.cross_entropy(logits, batch["label"]), batch_size=batch["label"].shape[0],
                 sync_dist=True)
        self.val_metrics.update(logits.argmax(1), batch["label"])
        self.val_per_class.update(logits.argmax(1), batch["label"])
        self.log_dict(self.val_metrics, prog_bar=True)  # Lightning computes, syncs and resets them

    def on_validation_epoch_end(self) -> None:
        self._log_per_class(self.val_per_class)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        preds = self.predict_logits(batch).argmax(1)
        for metric in (self.test_metrics, self.test_per_class, self.test_confusion):
            metric.update(preds, batch["label"])
        self.log_dict(self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_per_class(self.test_per_class)

    def _log_per_class(self, metric: ClasswiseWrapper) -> None:
        # Lightning logs only metrics that compute one number (torchmetrics#2683): log the computed dict.
        # compute() syncs the ranks' states, so every rank logs the same values.
        self.log_dict(metric.compute(), sync_dist=True)
        metric.reset()

    def predict_step(self, batch: Batch, batch_idx: int) -> Batch:
        """Classes (``pred``, 0..K-1), and class probabilities (``probs``, softmax of
        :meth:`predict_logits`) when a map writer sets ``predict_probabilities``."""
        logits = self.predict_logits(batch)
        out = {"pred": logits.argmax(1)}
        if self.predict_probabilities:
            out["probs"] = logits.float().softmax(1)
        return out
