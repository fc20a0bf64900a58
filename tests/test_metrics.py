"""OA/AA/kappa of the base module against scikit-learn on fixed predictions."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score, confusion_matrix, recall_score

from rsfusion.lightning_modules.base import classification_metrics
from rsfusion.lightning_modules import TwoBranchCNN


def test_oa_aa_kappa_match_scikit_learn():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 5, size=2000)
    pred = np.where(rng.random(2000) < 0.7, target, rng.integers(0, 5, size=2000))
    metrics = classification_metrics(5)
    for chunk in np.array_split(np.arange(2000), 7):  # accumulated over batches
        metrics.update(torch.from_numpy(pred[chunk]), torch.from_numpy(target[chunk]))
    out = {k: v.item() for k, v in metrics.compute().items()}
    assert out["OA"] == pytest.approx((pred == target).mean(), abs=1e-6)
    assert out["AA"] == pytest.approx(balanced_accuracy_score(target, pred), abs=1e-6)
    assert out["kappa"] == pytest.approx(cohen_kappa_score(target, pred), abs=1e-5)


def test_unlabelled_pixels_are_ignored_in_dense_metrics():
    rng = np.random.default_rng(1)
    target = rng.integers(-1, 3, size=(4, 8, 8))
    pred = rng.integers(0, 3, size=(4, 8, 8))
    metrics = classification_metrics(3)
    metrics.update(torch.from_numpy(pred), torch.from_numpy(target))
    keep = target >= 0
    assert metrics.compute()["OA"].item() == pytest.approx((pred[keep] == target[keep]).mean(), abs=1e-6)


def test_test_epoch_logs_per_class_accuracy_and_confusion():
    model = TwoBranchCNN(in_channels={"a": 2}, num_classes=3, class_names=["x", "y", "z"])
    target = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 1, 2, 0, 2]), 3).float()
    model.predict_logits = lambda batch: logits
    logged = {}
    model.log_dict = lambda values, **kw: logged.update({k: float(v) for k, v in values.items()})
    model.test_step({"label": target}, 0)
    model.on_test_epoch_end()
    recall = recall_score(target, logits.argmax(1), average=None)
    assert [logged[f"test/acc_{n}"] for n in "xyz"] == pytest.approx(list(recall))
    np.testing.assert_array_equal(model.confusion_matrix.numpy(), confusion_matrix(target, logits.argmax(1)))
