"""OA/AA/kappa and per-class accuracy of the base module against scikit-learn and numpy."""
from __future__ import annotations

import csv
from contextlib import nullcontext

import lightning as L
import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score

from rsfusion.lightning_modules.base import FusionClassifier
from rsfusion.lightning_modules.metrics import classification_metrics, per_class_accuracy
from rsfusion.lightning_modules.outputs.reporting import TestReport


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


@pytest.mark.parametrize("predicted", [True, False])
def test_aa_averages_the_classes_of_the_reference_whatever_the_model_predicts(predicted):
    """Class 2 has no reference pixel: its accuracy is NaN and AA is the mean over classes 0, 1, 3, whether
    or not the model predicts class 2 (torchmetrics' macro average counts it as 0 once predicted)."""
    rng = np.random.default_rng(5)
    target = rng.choice([0, 1, 3], size=500)
    pred = np.where(rng.random(500) < 0.7, target, rng.choice([0, 1, 3], size=500))
    if predicted:
        pred[:40] = 2
    metrics = classification_metrics(4)
    per_class = per_class_accuracy(["a", "b", "c", "d"], "test/")
    for metric in (metrics, per_class):
        metric.update(torch.from_numpy(pred), torch.from_numpy(target))
    recall = [((pred == c) & (target == c)).sum() / (target == c).sum() for c in (0, 1, 3)]
    with pytest.warns(UserWarning, match="y_pred contains classes not in y_true") if predicted else nullcontext():
        balanced = balanced_accuracy_score(target, pred)
    assert metrics.compute()["AA"].item() == pytest.approx(np.mean(recall), abs=1e-6)
    assert metrics.compute()["AA"].item() == pytest.approx(balanced, abs=1e-6)
    accuracies = {k: v.item() for k, v in per_class.compute().items()}
    assert np.isnan(accuracies["test/acc_c"])
    assert [accuracies[f"test/acc_{n}"] for n in "abd"] == pytest.approx(recall, abs=1e-6)


def test_unlabelled_pixels_are_ignored_in_dense_metrics():
    rng = np.random.default_rng(1)
    target = rng.integers(-1, 3, size=(4, 8, 8))
    pred = rng.integers(0, 3, size=(4, 8, 8))
    metrics = classification_metrics(3)
    metrics.update(torch.from_numpy(pred), torch.from_numpy(target))
    keep = target >= 0
    assert metrics.compute()["OA"].item() == pytest.approx((pred[keep] == target[keep]).mean(), abs=1e-6)


class Oracle(FusionClassifier):
    """Predicts the class each sample carries in ``batch["pred"]`` (the metrics see known predictions)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.bias = torch.nn.Parameter(torch.zeros(1))

    def forward(self, batch):
        return torch.nn.functional.one_hot(batch["pred"], self.num_classes).float() + self.bias


def _loader(target: np.ndarray, pred: np.ndarray):
    samples = [{"label": torch.tensor(t), "pred": torch.tensor(p)} for t, p in zip(target, pred)]
    return torch.utils.data.DataLoader(samples, batch_size=7)


def _numpy_metrics(target: np.ndarray, pred: np.ndarray, k: int) -> tuple[dict[str, float], np.ndarray]:
    keep = target >= 0
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (target[keep], pred[keep]), 1)
    recall = np.diag(confusion) / confusion.sum(1)
    n = confusion.sum()
    observed, expected = np.trace(confusion) / n, (confusion.sum(0) * confusion.sum(1)).sum() / n ** 2
    return {"OA": observed, "AA": recall.mean(), "kappa": (observed - expected) / (1 - expected),
            **{f"acc_{c}": r for c, r in zip(NAMES, recall)}}, confusion


NAMES = ["water", "bare soil", "trees"]


def test_logged_metric_names_and_values_match_numpy_and_reset_between_runs(tmp_path):
    rng = np.random.default_rng(3)
    model = Oracle(in_channels={"a": 1}, num_classes=3, class_names=NAMES)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[TestReport()])
    for run in range(2):  # the second run's figures must not include the first run's samples
        target = rng.integers(-1, 3, size=60)  # -1: unlabelled, ignored
        pred = np.where(rng.random(60) < 0.6 + 0.2 * run, np.maximum(target, 0), rng.integers(0, 3, size=60))
        expected, confusion = _numpy_metrics(target, pred, 3)
        for stage, evaluate in (("val", trainer.validate), ("test", trainer.test)):
            logged = evaluate(model, _loader(target, pred), verbose=False)[0]
            names = {k for k in logged if k != "val/loss"}
            assert names == {f"{stage}/{key}" for key in expected}
            for key, value in expected.items():
                assert logged[f"{stage}/{key}"] == pytest.approx(value, abs=1e-6), (run, stage, key)
        with (tmp_path / "reports" / "confusion_matrix.csv").open() as handle:
            rows = list(csv.reader(handle))
        assert rows[0] == ["true \\ predicted", *NAMES]
        np.testing.assert_array_equal(np.array([row[1:] for row in rows[1:]], dtype=np.int64), confusion)
