"""The tables and the figure of a study, from its runs' ``result.json`` and ``test_pixels.npz``.

- accuracy: rows are the classes, then OA, AA and kappa; one column per model; mean +- sample std over
  seeds (percent, kappa x 100), the best mean of each row in bold;
- efficiency: trainable and frozen parameters, FLOPs per sample, seconds per training epoch, full-scene
  prediction throughput (pixels/s) and peak memory;
- significance: the best model (mean OA) against each other model: McNemar's p-value per seed on the
  test pixels, and the paired t-test over seeds on OA.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from rsfusion.datamodules.writing import atomic_path
from rsfusion.lightning_modules.outputs.maps import class_colours
from rsfusion.lightning_modules.outputs.significance import mcnemar, paired_seeds


@dataclass
class SeedRun:
    """One finished run: its ``result.json`` and its folder."""
    seed: int
    folder: Path
    result: dict

    def test_pixels(self) -> dict[str, np.ndarray]:
        with np.load(self.folder / "test_pixels.npz") as data:
            return {k: data[k] for k in data.files}


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[str]
    cells: dict[tuple[str, str], str] = field(default_factory=dict)  # (row, column) -> text
    numbers: dict[tuple[str, str], tuple[float, float, int]] = field(default_factory=dict)  # mean, std, n
    bold: set[tuple[str, str]] = field(default_factory=set)
    note: str = ""


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value) of the values that exist: a class
    with no reference pixel in a run's test set has no accuracy (NaN) and is left out; NaN if none exists."""
    array = np.asarray(values, dtype=float)
    array = array[~np.isnan(array)]
    if array.size == 0:
        return float("nan"), float("nan")
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0


def _pm(mean: float, std: float, digits: int) -> str:
    return "-" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def accuracy_table(runs: dict[str, list[SeedRun]]) -> Table:
    class_names = next(iter(runs.values()))[0].result["class_names"]
    keys = {name: f"acc_{name}" for name in class_names} | {"OA": "OA", "AA": "AA", "κ (x100)": "kappa"}
    table = Table("Accuracy (%, mean ± std over seeds)", list(runs), list(keys))
    for row, key in keys.items():
        for model, seeds in runs.items():
            values = [100 * s.result["metrics"].get(key, float("nan")) for s in seeds]
            mean, std = mean_std(values)
            table.numbers[row, model] = (mean, std, sum(not math.isnan(v) for v in values))
            table.cells[row, model] = _pm(mean, std, 2)
        means = [table.numbers[row, m][0] for m in runs if not math.isnan(table.numbers[row, m][0])]
        table.bold |= {(row, m) for m in runs if means and table.numbers[row, m][0] == max(means)}
    table.note = f"Seeds: {', '.join(str(s.seed) for s in next(iter(runs.values())))}."
    return table


def efficiency_table(runs: dict[str, list[SeedRun]]) -> Table:
    rows = ["sampling", "trainable parameters", "frozen parameters", "FLOPs per sample", "train s / epoch",
            "inference pixels / s", "peak memory (MiB)"]
    table = Table("Efficiency (measured in the study's runs)", list(runs), rows)
    for model, seeds in runs.items():
        first = seeds[0].result
        table.cells["sampling", model] = f"{first['sampling']} {first['patch_size']}"
        for row, key in (("trainable parameters", "trainable_params"), ("frozen parameters", "frozen_params"),
                         ("FLOPs per sample", "flops_per_sample")):
            table.numbers[row, model] = (float(first[key]), 0.0, 1)
            table.cells[row, model] = _count(first[key])
        for row, values, digits in (
                ("train s / epoch", [float(np.mean(s.result["epoch_seconds"] or [np.nan])) for s in seeds], 2),
                ("inference pixels / s", [s.result["pixels_per_second"] for s in seeds], 0),
                ("peak memory (MiB)", [s.result["peak_memory_bytes"] / 2 ** 20 for s in seeds], 0)):
            mean, std = mean_std(values)
            table.numbers[row, model] = (mean, std, len(values))
            table.cells[row, model] = _pm(mean, std, digits)
    table.note = ("FLOPs: torch.utils.flop_counter (a multiply-add is 2), the selective scan counted "
                  "analytically; peak memory: CUDA max allocated, or the run process's peak RSS on CPU.")
    return table


def _count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)}"


def significance_table(runs: dict[str, list[SeedRun]], accuracy: Table) -> Table:
    best = max(runs, key=lambda m: accuracy.numbers["OA", m][0])
    seeds = [s.seed for s in runs[best]]
    columns = [f"McNemar p, seed {seed}" for seed in seeds] + ["paired t over seeds (OA), p"]
    others = [m for m in runs if m != best]
    table = Table(f"Significance: {best} (best mean OA) against each model", columns, others)
    best_runs = {s.seed: s for s in runs[best]}
    for model in others:
        oa = {}
        for run in runs[model]:
            if run.seed not in best_runs:
                continue
            a, b = best_runs[run.seed].test_pixels(), run.test_pixels()
            for key in ("rows", "cols", "reference"):
                if not np.array_equal(a[key], b[key]):
                    raise ValueError(f"{run.folder} and {best_runs[run.seed].folder}: different test pixels for "
                                     f"seed {run.seed}; McNemar's test needs one split")
            test = mcnemar(a["mapped"] == a["reference"], b["mapped"] == b["reference"])
            table.numbers[model, f"McNemar p, seed {run.seed}"] = (test.p_value, 0.0, 1)
            table.cells[model, f"McNemar p, seed {run.seed}"] = f"{_p(test.p_value)} ({test.b}/{test.c})"
            oa[run.seed] = (best_runs[run.seed].result["metrics"]["OA"], run.result["metrics"]["OA"])
        p = paired_seeds([v[0] for v in oa.values()], [v[1] for v in oa.values()])
        table.cells[model, columns[-1]] = _p(p)
        table.numbers[model, columns[-1]] = (p, 0.0, len(oa))
    table.note = ("(b/c): test pixels right by the best model only / by the other only. McNemar treats test "
                  "pixels as independent, which neighbouring pixels are not: its p-values are optimistic. The "
                  "t-test over seeds reflects training variation, with little power for few seeds.")
    return table


def _p(p: float) -> str:
    return "-" if math.isnan(p) else ("< 1e-4" if p < 1e-4 else f"{p:.4f}")


def _cell(table: Table, row: str, column: str) -> str:
    return table.cells.get((row, column), "-")


def markdown(tables: list[Table]) -> str:
    out = []
    for t in tables:
        out += [f"### {t.title}", "", "| | " + " | ".join(t.columns) + " |", "|---" * (len(t.columns) + 1) + "|"]
        for row in t.rows:
            cells = [f"**{_cell(t, row, c)}**" if (row, c) in t.bold else _cell(t, row, c) for c in t.columns]
            out.append(f"| {row} | " + " | ".join(cells) + " |")
        out += ["", t.note, ""] if t.note else [""]
    return "\n".join(out)


def _tex(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                 ("±", r"$\pm$"), ("κ", r"$\kappa$"), ("<", r"$<$")):
        text = text.replace(a, b)
    return text


def latex(tables: list[Table]) -> str:
    out = []
    for t in tables:
        out += [f"% {t.title}", r"\begin{tabular}{l" + "c" * len(t.columns) + "}", r"\toprule",
                " & " + " & ".join(_tex(c) for c in t.columns) + r" \\", r"\midrule"]
        for row in t.rows:
            cells = [_tex(_cell(t, row, c)) for c in t.columns]
            cells = [rf"\textbf{{{v}}}" if (row, c) in t.bold else v for v, c in zip(cells, t.columns)]
            out.append(_tex(row) + " & " + " & ".join(cells) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(out)


def csv_text(tables: list[Table]) -> str:
    """Long format: one line per cell, with the numbers behind it."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["table", "row", "column", "text", "mean", "std", "n"])
    for t in tables:
        for row in t.rows:
            for column in t.columns:
                mean, std, n = t.numbers.get((row, column), (float("nan"), float("nan"), 0))
                writer.writerow([t.title.split(" ")[0].split(":")[0].lower(), row, column, _cell(t, row, column),
                                 mean, std, n])
    return buffer.getvalue()


def write_tables(folder: Path, runs: dict[str, list[SeedRun]]) -> dict[str, Path]:
    accuracy = accuracy_table(runs)
    tables = [accuracy, efficiency_table(runs)]
    if len(runs) > 1:
        tables.append(significance_table(runs, accuracy))
    paths = {"md": folder / "table.md", "tex": folder / "table.tex", "csv": folder / "table.csv"}
    for kind, render in (("md", markdown), ("tex", latex), ("csv", csv_text)):
        with atomic_path(paths[kind]) as tmp:
            Path(tmp).write_text(render(tables))
    return paths


def maps_figure(stem: Path, runs: dict[str, list[SeedRun]]) -> list[Path]:
    """The ground truth and each model's map (its first seed) of the scene, one shared legend; PNG and PDF."""
    first = {model: seeds[0] for model, seeds in runs.items()}
    result = next(iter(first.values())).result
    names = result["class_names"]
    colours = np.array([(0, 0, 0), *class_colours(result["palette"], len(names))], dtype=np.uint8)
    panels = [("ground truth", np.load(next(iter(first.values())).folder / "ground_truth.npy"))]
    for model, run in first.items():
        with rasterio.open(run.result["map"]) as src:
            panels.append((f"{model}\nOA {100 * run.result['metrics']['OA']:.2f} % (seed {run.seed})", src.read(1)))
    h, w = panels[0][1].shape
    side = 3.2
    legend = 1.3  # inches on the right for the shared legend
    fig = Figure(figsize=(side * len(panels) + legend, side * h / w + 0.8), dpi=150)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, classes) in zip(axes, panels):
        ax.imshow(colours[np.clip(classes, 0, len(names))], interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_axis_off()
    handles = [Patch(facecolor=colours[k + 1] / 255, edgecolor="k", label=n) for k, n in enumerate(names)]
    fig.legend(handles=handles, loc="center right", frameon=False, fontsize=7)
    fig.tight_layout(rect=(0, 0, 1 - legend / (side * len(panels) + legend), 1))
    paths = []
    for suffix in ("png", "pdf"):
        path = stem.with_suffix(f".{suffix}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=suffix)
        paths.append(path)
    return paths
