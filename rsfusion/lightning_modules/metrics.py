"""The field's accuracy figures as torchmetrics objects: OA, AA, kappa and per-class accuracy.

Definitions (over the labelled reference pixels; unlabelled pixels are ignored):

- OA, overall accuracy: correctly classified pixels / reference pixels.
- per-class accuracy (producer's accuracy, recall) of class c: pixels of c classified as c / pixels
  of c in the reference. A class with no reference pixel has no accuracy: NaN ("no reference
  pixels"), never 0, whatever the model predicts.
- AA, average accuracy: the mean of the per-class accuracies of the classes present in the
  reference. It depends on the reference alone, not on which classes the model happens to predict
  (torchmetrics' own macro average counts a class absent from the reference as 0 as soon as it is
  predicted once, and leaves it out otherwise).
- kappa: Cohen's kappa of the confusion matrix.
"""
from __future__ import annotations

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCohenKappa, MulticlassStatScores
from torchmetrics.wrappers import ClasswiseWrapper

from rsfusion.datamodules.sampling import IGNORE_INDEX


class ClassAccuracy(MulticlassStatScores):
    """Per-class accuracy (recall) of each of the K classes, NaN for a class absent from the reference."""

    def __init__(self, num_classes: int, ignore_index: int | None = IGNORE_INDEX, **kwargs):
        super().__init__(num_classes, average=None, ignore_index=ignore_index, **kwargs)

    def compute(self) -> torch.Tensor:
        tp, _, _, fn = self._final_state()
        support = (tp + fn).double()
        return torch.where(support > 0, tp.double() / support.clamp(min=1), torch.nan).float()


class AverageAccuracy(ClassAccuracy):
    """AA: the mean per-class accuracy over the classes present in the reference (NaN if none is)."""

    def compute(self) -> torch.Tensor:
        accuracy = super().compute()
        present = ~accuracy.isnan()
        return accuracy[present].mean() if present.any() else torch.tensor(torch.nan)


def classification_metrics(num_classes: int) -> MetricCollection:
    """OA, AA and Cohen's kappa, ignoring unlabelled pixels (definitions: the module's docstring)."""
    return MetricCollection({
        "OA": MulticlassAccuracy(num_classes, average="micro", ignore_index=IGNORE_INDEX),
        "AA": AverageAccuracy(num_classes),
        "kappa": MulticlassCohenKappa(num_classes, ignore_index=IGNORE_INDEX),
    })


def per_class_accuracy(class_names: list[str], prefix: str) -> ClasswiseWrapper:
    """Accuracy of each class as ``{prefix}acc_<class name>`` (NaN: no reference pixel of the class)."""
    return ClasswiseWrapper(ClassAccuracy(len(class_names)), labels=list(class_names), prefix=f"{prefix}acc_")
