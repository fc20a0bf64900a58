"""``rsfusion evaluate``: agrees with ``lightning test`` and with an independent numpy computation; bad
grids and labels are one-line errors."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from rsfusion.lightning_modules import evaluate
from rsfusion.lightning_modules.commands.cli import main
from tests.conftest import tiny_config, write_tif


def _run_evaluate(args, capsys) -> tuple[int, str, str]:
    try:
        main(["evaluate", *args])
        code = 0
    except SystemExit as err:
        code = err.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
def test_agrees_exactly_with_lightning_test_on_the_map_lightning_predict_writes(tmp_path, capsys):
    config = tiny_config(tmp_path, "demo", dict(scene_height=32, scene_width=40, train_per_class=12, patch_size=5,
                                                batch_size=32), dict(width=8), max_epochs=2)
    main(["fit", "--config", str(config), "--map_after_fit", "false"])  # tests the best checkpoint
    run = tmp_path / "runs" / "version_0"
    logged = {k: float(v) for row in csv.DictReader((run / "metrics.csv").open()) for k, v in row.items()
              if k.startswith("test/") and v}
    confusion = np.loadtxt(run / "reports" / "confusion_matrix.csv", delimiter=",", skiprows=1,
                           usecols=range(1, 7), dtype=np.int64)
    ckpt = next((tmp_path / "runs").glob("version_*/checkpoints/best-*.ckpt"))
    main(["predict", "--config", str(config), "--ckpt_path", str(ckpt)])
    class_map = tmp_path / "runs" / "version_1" / "predictions" / "classification_map.tif"
    labels = tmp_path / "scene" / "hsi_dsm-seed0" / "test.tif"
    names = ["Trees", "Grass", "Roofs", "Roads", "Water", "Bare soil"]
    capsys.readouterr()
    code, out, err = _run_evaluate(["--map", str(class_map), "--labels", str(labels), "--class_names", *names,
                                    "--output", str(tmp_path / "report.json")], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["OA"], report["AA"], report["kappa"]) == (logged["test/OA"], logged["test/AA"], logged["test/kappa"])
    assert [report["per_class"][n]["accuracy"] for n in names] == [logged[f"test/acc_{n}"] for n in names]
    np.testing.assert_array_equal(report["confusion_matrix"], confusion)
    assert report["no_prediction_pixels"] == 0 and report["labelled_pixels"] == confusion.sum()
    assert f"OA          {logged['test/OA']:.4f}" in out and "Bare soil" in out


def _numpy_scores(labels: np.ndarray, class_map: np.ndarray, k: int) -> dict:
    """Independent definitions: confusion matrix K x (K + 1) with a "no prediction" column; a class without
    reference pixels has no accuracy (NaN) and AA averages the classes with reference pixels only."""
    scored = labels > 0
    t, p = labels[scored] - 1, class_map[scored]
    p = np.where(p == 0, k, p - 1)
    cm = np.zeros((k, k + 1), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    n = cm.sum()
    recall = np.array([cm[i, i] / cm[i].sum() if cm[i].sum() else np.nan for i in range(k)])
    present = cm.sum(1) > 0
    po = np.trace(cm[:, :k]) / n
    pe = (cm.sum(1) * cm[:, :k].sum(0)).sum() / n ** 2
    return {"OA": po, "AA": recall[present].mean(), "kappa": (po - pe) / (1 - pe), "recall": recall, "cm": cm}


@pytest.mark.parametrize("with_gaps", [False, True])
def test_metrics_match_an_independent_numpy_computation_in_any_strip_size(tmp_path, monkeypatch, with_gaps):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, size=(37, 23)).astype(np.uint8)  # 0 = unlabelled, classes 1..4
    labels[labels == 3] = 0  # class 3 has no test pixel ...
    class_map = np.where(rng.random(labels.shape) < 0.6, labels, rng.integers(1, 5, size=labels.shape))
    class_map = np.where(class_map == 0, rng.integers(1, 5, size=labels.shape), class_map).astype(np.uint8)
    class_map[0, :5] = 3  # ... but is predicted
    if with_gaps:
        class_map[5:9, 2:12] = 0  # no prediction on labelled pixels: wrong, and reported
    expected = _numpy_scores(labels.astype(np.int64), class_map.astype(np.int64), 4)
    paths = write_tif(tmp_path / "map.tif", class_map, nodata=0), write_tif(tmp_path / "labels.tif", labels)
    reports = []
    for rows in (256, 4):  # one strip, several strips: every labelled pixel once
        monkeypatch.setattr(evaluate, "STRIP_ROWS", rows)
        reports.append(evaluate.evaluate_map(str(paths[0]), str(paths[1]), num_classes=4))
    for report in reports:
        assert report["labelled_pixels"] == int((labels > 0).sum())
        assert report["no_prediction_pixels"] == (int(((class_map == 0) & (labels > 0)).sum()) if with_gaps else 0)
        np.testing.assert_allclose([report["OA"], report["AA"], report["kappa"]],
                                   [expected["OA"], expected["AA"], expected["kappa"]], rtol=1e-6)
        accuracies = [np.nan if v["accuracy"] is None else v["accuracy"] for v in report["per_class"].values()]
        np.testing.assert_allclose(accuracies, expected["recall"], rtol=1e-6)  # NaN where NaN
        assert report["per_class"]["class 3"]["accuracy"] is None  # predicted, but not in the reference
        np.testing.assert_array_equal(report["confusion_matrix"], expected["cm"][:, :4])
        np.testing.assert_array_equal(report["no_prediction"], expected["cm"][:, 4])
    assert reports[0] == reports[1]


def test_grid_mismatches_are_one_line_errors_naming_both_files(tmp_path, capsys):
    labels = write_tif(tmp_path / "labels.tif", np.ones((10, 12), dtype=np.uint8))
    cases = {
        "shifted.tif": (dict(origin=(500_050.0, 4_000_000.0)), "misaligned pixel grids (offset by 5, -0 pixels)"),
        "wider.tif": ({}, "different extents"),
        "coarse.tif": (dict(res=20.0), "not an integer ratio"),
        "utm33.tif": (dict(crs="EPSG:32633"), "different CRS"),
    }
    for name, (kwargs, problem) in cases.items():
        shape = {"coarse.tif": (5, 6), "wider.tif": (10, 14)}.get(name, (10, 12))
        write_tif(tmp_path / name, np.ones(shape, dtype=np.uint8), **kwargs)
        code, _, err = _run_evaluate(["--map", str(tmp_path / name), "--labels", str(labels)], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert problem in err and str(labels) in err and name in err
    write_tif(tmp_path / "fine.tif", np.ones((20, 24), dtype=np.uint8), res=5.0)
    code, _, err = _run_evaluate(["--map", str(tmp_path / "fine.tif"), "--labels", str(labels)], capsys)
    assert code == 2 and "different resolutions ((20, 24) vs (10, 12) pixels" in err


def test_labels_and_map_values_outside_the_classes_are_errors(tmp_path, capsys):
    labels = np.ones((6, 6), dtype=np.uint8)
    labels[2, 2] = 7
    write_tif(tmp_path / "labels.tif", labels)
    write_tif(tmp_path / "map.tif", np.ones((6, 6), dtype=np.uint8))
    code, _, err = _run_evaluate(["--map", str(tmp_path / "map.tif"), "--labels", str(tmp_path / "labels.tif"),
                                  "--class_names", "a", "b", "c"], capsys)
    assert code == 2
    assert err.strip() == (f"error: {tmp_path / 'labels.tif'}: label value 7 is outside 1..3 (1 pixels in this "
                           "strip; K from --class_names)")
    write_tif(tmp_path / "labels.tif", np.ones((6, 6), dtype=np.uint8))
    write_tif(tmp_path / "map.tif", np.full((6, 6), 9, dtype=np.uint8))
    code, _, err = _run_evaluate(["--map", str(tmp_path / "map.tif"), "--labels", str(tmp_path / "labels.tif"),
                                  "--num_classes", "3"], capsys)
    assert code == 2 and f"{tmp_path / 'map.tif'}: class value 9 is outside 1..3 (36 pixels" in err
    write_tif(tmp_path / "labels.tif", np.full((6, 6), -2, dtype=np.int16))
    code, _, err = _run_evaluate(["--map", str(tmp_path / "map.tif"), "--labels", str(tmp_path / "labels.tif")],
                                 capsys)
    assert code == 2 and "negative label value -2" in err
