"""``rsfusion evaluate``: score any classification map against a label raster (OA, AA, kappa, per class).

The map (classes 1..K, 0 or the file's nodata = no prediction) and the labels (1..K, 0 or nodata =
unlabelled) are read in row strips, so memory does not grow with the scene, and each labelled pixel
is counted once. The metrics are the suite's own (:mod:`rsfusion.lightning_modules.metrics`, torchmetrics),
so a map written by ``lightning predict`` scores exactly what ``lightning test`` reports; AA is the
mean accuracy of the classes present in the labels, and a class without labelled pixels is reported
as "no reference pixels" (``null`` in the JSON), never 0. A labelled pixel the map leaves without a
prediction counts as wrong: it is scored as an extra "no prediction" class (a column of the
confusion matrix; it lowers OA, its true class's accuracy and kappa) and the report says how many
there were.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import rasterio
import torch
from torchmetrics.classification import MulticlassConfusionMatrix

from rsfusion.datamodules.errors import InputError, RasterError
from rsfusion.datamodules.io import is_gdal_raster, read_header, read_raster
from rsfusion.datamodules.scene import _grid_ratio
from rsfusion.lightning_modules.metrics import ClassAccuracy, classification_metrics
from rsfusion.lightning_modules.outputs.map_set import SET_TAG, check_member

STRIP_ROWS = 256


def check_same_grid(map_path: str, labels_path: str) -> tuple[int, int]:
    """The shared (rows, cols) grid of two single-band rasters, or a one-line error naming both."""
    labels, predicted = read_header(labels_path), read_header(map_path)
    for header, what in ((labels, "label raster"), (predicted, "classification map")):
        if header.bands != 1:
            raise RasterError(f"{header.path}: a {what} must have 1 band, found {header.bands}")
    if _grid_ratio(labels, predicted) != 1:  # raises for CRS / pixel size / extent / alignment mismatches
        raise RasterError(f"{map_path} and {labels_path}: different resolutions ({predicted.shape} vs "
                          f"{labels.shape} pixels over the same area); resample the map onto the label grid")
    return labels.shape


def check_complete_set(map_path: str) -> None:
    """A map rsfusion wrote must come with the manifest of its set, with the same bytes: a map of a
    prediction that stopped while committing its files, or changed since, is refused (maps of other
    tools carry no set tag and are taken as they are)."""
    if not is_gdal_raster(map_path):
        return
    with rasterio.open(map_path) as src:
        set_id = src.tags().get(SET_TAG)
    check_member(map_path, set_id)


def _strips(path: str, shape: tuple[int, int], empty_value: int | None = None):
    """Row strips of a class raster as int64, 0 where the pixel is nodata/NaN or ``empty_value``."""
    for r0 in range(0, shape[0], STRIP_ROWS):
        raster = read_raster(path, window=(r0, min(r0 + STRIP_ROWS, shape[0]), 0, shape[1]))
        values = raster.data[0]
        if empty_value is not None:
            values = np.where(values == empty_value, 0, values)
        if values.dtype.kind == "f":
            finite = values[raster.valid]
            if not np.array_equal(finite, np.round(finite)):
                raise RasterError(f"{path}: class values must be whole numbers, found fractional values")
        yield np.where(raster.valid, np.nan_to_num(values, nan=0), 0).astype(np.int64)


def _checked(path: str, values: np.ndarray, num_classes: int | None, what: str, source: str) -> np.ndarray:
    if values.size and values.min() < 0:
        empty = "unlabelled" if what == "label" else "no prediction"
        raise RasterError(f"{path}: negative {what} value {values.min()} (0 = {empty}, 1..K = classes)")
    if num_classes is not None and values.size and values.max() > num_classes:
        raise RasterError(f"{path}: {what} value {values.max()} is outside 1..{num_classes} "
                          f"({int((values > num_classes).sum())} pixels in this strip; K from {source})")
    return values


def evaluate_map(map_path: str, labels_path: str, class_names: list[str] | None = None,
                 num_classes: int | None = None, label_nodata: int | None = None) -> dict:
    """OA, AA, kappa, per-class accuracy and confusion matrix of ``map_path`` against ``labels_path``.

    K is ``len(class_names)``, else ``num_classes``, else the largest value in either raster. Values
    outside 1..K are an error naming the file; labelled pixels without a prediction count as wrong.
    ``label_nodata`` is a label value meaning "unlabelled" besides 0 (e.g. -1 in MUUFL).
    """
    shape = check_same_grid(map_path, labels_path)
    check_complete_set(map_path)
    if class_names and num_classes is not None and len(class_names) != num_classes:
        raise InputError(f"--class_names has {len(class_names)} names for --num_classes {num_classes}")
    k = len(class_names) if class_names else num_classes
    source = "--class_names" if class_names else "--num_classes"
    if k is None:  # a first pass finds K
        source = "the rasters"
        k = max(int(_checked(p, s, None, w, source).max(initial=0))
                for p, w, e in ((labels_path, "label", label_nodata), (map_path, "class", None))
                for s in _strips(p, shape, e))
    if k < 1:
        raise RasterError(f"{labels_path}: no labelled pixel (0 = unlabelled, 1..K = classes)")
    # Class index k (0-based) is "no prediction": OA and kappa count it as an error; it has no reference
    # pixel, so AA (over the classes present in the labels) never averages it in.
    metrics = classification_metrics(k + 1)
    per_class = ClassAccuracy(k + 1)
    confusion = MulticlassConfusionMatrix(k + 1)
    labelled = missing = 0
    for labels, predicted in zip(_strips(labels_path, shape, label_nodata), _strips(map_path, shape)):
        labels = _checked(labels_path, labels, k, "label", source)
        predicted = _checked(map_path, predicted, k, "class", source)
        scored = labels > 0
        target = torch.from_numpy(labels[scored] - 1)
        pred = predicted[scored]
        missing += int((pred == 0).sum())
        pred = torch.from_numpy(np.where(pred == 0, k + 1, pred) - 1)
        labelled += len(target)
        if len(target):
            for metric in (metrics, per_class, confusion):
                metric.update(pred, target)
    if labelled == 0:
        raise RasterError(f"{labels_path}: no labelled pixel (0 = unlabelled, 1..K = classes)")
    values = {name.split("/")[-1]: float(v) for name, v in metrics.compute().items()}
    matrix = confusion.compute()[:k].long()
    accuracy = per_class.compute()[:k]
    names = list(class_names) if class_names else [f"class {i}" for i in range(1, k + 1)]
    return {"map": str(map_path), "labels": str(labels_path), "labelled_pixels": labelled,
            "no_prediction_pixels": missing, "OA": values["OA"], "AA": values["AA"], "kappa": values["kappa"],
            "per_class": {name: {"accuracy": None if a.isnan() else float(a), "pixels": int(n)}
                          for name, a, n in zip(names, accuracy, matrix.sum(1))},
            "class_names": names, "confusion_matrix": matrix[:, :k].tolist(),
            "no_prediction": matrix[:, k].tolist()}


def format_report(report: dict) -> str:
    names = report["class_names"]
    lines = [f"{report['map']} against {report['labels']}: {report['labelled_pixels']:,} labelled pixels"]
    if report["no_prediction_pixels"]:
        lines.append(f"{report['no_prediction_pixels']:,} labelled pixels have no prediction in the map "
                     "(0/nodata): counted as wrong")
    lines += ["", f"{'OA':<12}{report['OA']:.4f}", f"{'AA':<12}{report['AA']:.4f}",
              f"{'kappa':<12}{report['kappa']:.4f}", ""]
    width = max(len(n) for n in names + ["class"]) + 2
    lines.append(f"{'class':<{width}}{'accuracy':>10}{'pixels':>10}")
    for name, row in report["per_class"].items():
        accuracy = "no reference pixels" if row["accuracy"] is None else f"{row['accuracy']:>10.4f}"
        lines.append(f"{name:<{width}}{accuracy:>10}{row['pixels']:>10,}")
    lines += ["", "confusion matrix (rows: label, columns: map" + (", last: no prediction)"
                                                                   if report["no_prediction_pixels"] else ")")]
    columns = [str(i) for i in range(1, len(names) + 1)] + (["none"] if report["no_prediction_pixels"] else [])
    cell = max(6, *(len(f"{v:,}") + 1 for row in report["confusion_matrix"] for v in row))
    lines.append(" " * width + "".join(f"{c:>{cell}}" for c in columns))
    for i, (name, row) in enumerate(zip(names, report["confusion_matrix"])):
        row = row + ([report["no_prediction"][i]] if report["no_prediction_pixels"] else [])
        lines.append(f"{f'{i + 1} {name}':<{width}}" + "".join(f"{v:>{cell},}" for v in row))
    return "\n".join(lines)


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="rsfusion evaluate",
        description="Score a classification map (classes 1..K, 0 = no data; rsfusion's or any tool's) against a "
                    "label raster (0 = unlabelled): OA, AA, kappa, per-class accuracy, confusion matrix.")
    parser.add_argument("--map", required=True, help="classification map (GeoTIFF or anything GDAL reads, .npy)")
    parser.add_argument("--labels", required=True, help="label raster on the same grid (e.g. the test labels)")
    parser.add_argument("--class_names", nargs="+", default=None, help="the K class names, in class order 1..K")
    parser.add_argument("--num_classes", type=int, default=None,
                        help="K when no names are given (default: the largest value in either raster)")
    parser.add_argument("--label_nodata", type=int, default=None,
                        help="a label value meaning unlabelled besides 0 (e.g. -1 in MUUFL)")
    parser.add_argument("--output", default=None, help="also write the report as JSON here")
    opts = parser.parse_args(args)
    try:
        report = evaluate_map(opts.map, opts.labels, opts.class_names, opts.num_classes, opts.label_nodata)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(format_report(report))
    if opts.output:
        Path(opts.output).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.output).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
