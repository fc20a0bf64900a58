"""``rsfusion-compare``: train several configs over several seeds on one scene and tabulate the results.

    rsfusion-compare configs/demo.yaml CNN-HSI=configs/baseline_hsi_only_tiles_synthetic.yaml \\
        --seeds 0 1 2 --output runs/compare -- --trainer.max_epochs=10

Each ``config`` (optionally ``label=config``) is trained once per seed exactly as ``rsfusion fit``
would (same CLI, same callbacks), with ``--trainer.default_root_dir <output>/<label>`` and the run folder
``seed<k>`` (so every output of the run is in ``<output>/<label>/seed<k>``); the
best checkpoint is tested and the full scene predicted. Arguments after ``--`` are CLI overrides
applied to every run. A seed is the run's ``seed_everything`` (weights, batch order, dropout) and, unless
a config sets ``data.init_args.seed``, the seed of its random data splits too (validation blocks, a
single map's test blocks, ``train_per_class`` samples): each seed is a new draw of the split, which
``runs.csv`` records as ``data_seed``. Writes to ``<output>``:

- ``comparison.md`` / ``comparison.csv``: per config OA, AA, kappa and per-class accuracy (percent,
  mean +- sample std over seeds), parameter counts, fit and full-scene prediction wall time;
- ``runs.csv``: the same numbers for every single run;
- ``maps.png``: the classification maps (first seed) side by side, with the legend.
"""
from __future__ import annotations

import argparse
import csv
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from rsfusion.datamodules.writing import atomic_path
from rsfusion.lightning_modules.commands import study
from rsfusion.lightning_modules.commands.cli import RSFusionCLI, cli_kwargs, evaluation_checkpoint
from rsfusion.lightning_modules.outputs.maps import class_colours, ensure_map_writer
from rsfusion.lightning_modules.outputs.study_tables import mean_std

METRICS = ("OA", "AA", "kappa")


@dataclass
class RunResult:
    label: str
    seed: int
    model: str
    params: int
    trainable: int
    metrics: dict[str, float]  # "OA", "AA", "kappa", "acc_<class>": fractions in [0, 1]
    fit_seconds: float
    predict_seconds: float
    map_path: Path | None
    run_dir: Path
    data_seed: int | None = None  # the seed of the run's data splits (follows ``seed`` unless configured)
    class_names: list[str] = field(default_factory=list)
    palette: list[tuple[int, int, int]] = field(default_factory=list)


def parse_config_spec(spec: str) -> tuple[str, Path]:
    """``label=path`` or ``path`` (label = file stem)."""
    label, sep, path = spec.partition("=")
    if not sep:
        label, path = Path(spec).stem, spec
    if not label or not path:
        raise ValueError(f"config: expected 'label=path' or 'path', got {spec!r}")
    if not Path(path).is_file():
        raise ValueError(f"config: {path} does not exist")
    return label, Path(path)


def run_args(config_path: Path, output: Path, label: str, seed: int, overrides: list[str]) -> list[str]:
    """The CLI arguments of one run: seeded with ``seed``, every output in ``<output>/<label>/seed<k>``
    (the run folder ``seed<k>`` under the root ``<output>/<label>``: checkpoints, logs, maps, reports)."""
    return ["--config", str(config_path), "--seed_everything", str(seed), "--trainer.default_root_dir",
            str(output / label), "--trainer.logger.init_args.version", f"seed{seed}", *overrides]


def train_and_evaluate(label: str, config_path: Path, seed: int, output: Path, overrides: list[str]) -> RunResult:
    """One ``fit`` + test of the best checkpoint + timed full-scene prediction, in this process."""
    run_dir = output / label / f"seed{seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a new comparison replaces the old run of this config and seed
    cli = RSFusionCLI(**cli_kwargs(), args=run_args(config_path, output, label, seed, overrides), run=False)
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    ckpt = evaluation_checkpoint(trainer)
    (results,) = trainer.test(model, datamodule=datamodule, ckpt_path=ckpt, verbose=False)
    writer = ensure_map_writer(trainer)
    start = time.perf_counter()
    trainer.predict(model, datamodule=datamodule, ckpt_path=ckpt, return_predictions=False)
    predict_seconds = time.perf_counter() - start
    _finish_wandb()
    metrics = {key.removeprefix("test/"): float(value) for key, value in results.items() if key.startswith("test/")}
    return RunResult(label=label, seed=seed, model=type(model).__name__,
                     params=sum(p.numel() for p in model.parameters()),
                     trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                     metrics=metrics, fit_seconds=fit_seconds, predict_seconds=predict_seconds,
                     map_path=writer.paths.get("tif"), run_dir=run_dir,
                     data_seed=getattr(datamodule, "hparams", {}).get("seed"), class_names=list(datamodule.class_names),
                     palette=class_colours(datamodule.palette, len(datamodule.class_names)))


def _finish_wandb() -> None:
    """Close a W&B run a config may have opened, so the next run gets its own."""
    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()


def summarise(results: list[RunResult]) -> tuple[list[str], list[dict]]:
    """One row per label: columns and rows for the CSV (percent for accuracies, seconds for times)."""
    class_names = results[0].class_names
    columns = ["config", "model", "seeds", "params", "trainable_params"]
    for name in [*METRICS, *(f"acc_{c}" for c in class_names)]:
        columns += [f"{name}_mean", f"{name}_std"]
    columns += ["fit_seconds_mean", "fit_seconds_std", "predict_seconds_mean", "predict_seconds_std"]
    rows = []
    for label in dict.fromkeys(r.label for r in results):
        runs = [r for r in results if r.label == label]
        row = {"config": label, "model": runs[0].model, "seeds": " ".join(str(r.seed) for r in runs),
               "params": runs[0].params, "trainable_params": runs[0].trainable}
        for name in [*METRICS, *(f"acc_{c}" for c in class_names)]:
            row[f"{name}_mean"], row[f"{name}_std"] = mean_std([100 * r.metrics[name] for r in runs])
        for name in ("fit_seconds", "predict_seconds"):
            row[f"{name}_mean"], row[f"{name}_std"] = mean_std([getattr(r, name) for r in runs])
        rows.append(row)
    return columns, rows


def markdown_table(rows: list[dict], class_names: list[str]) -> str:
    def pm(row, name, digits=2):
        if np.isnan(row[f"{name}_mean"]):
            return "no reference pixels"
        return f"{row[f'{name}_mean']:.{digits}f} ± {row[f'{name}_std']:.{digits}f}"

    header = ["config", "model", "params", "OA (%)", "AA (%)", "kappa (x100)",
              *class_names, "fit (s)", "full-scene predict (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"`{row['config']}`", row["model"], f"{row['params']:,}", pm(row, "OA"), pm(row, "AA"),
                 pm(row, "kappa"), *(pm(row, f"acc_{c}", 1) for c in class_names),
                 pm(row, "fit_seconds", 1), pm(row, "predict_seconds", 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def maps_figure(path: Path, results: list[RunResult]) -> None:
    """The first seed's classification map of each config, side by side, one legend."""
    firsts = [next(r for r in results if r.label == label) for label in dict.fromkeys(r.label for r in results)]
    firsts = [r for r in firsts if r.map_path is not None]
    if not firsts:
        return
    palette = firsts[0].palette
    colours = np.array([(0, 0, 0), *palette], dtype=np.uint8)
    fig = Figure(figsize=(4 * len(firsts) + 2, 4.5), dpi=120)
    axes = fig.subplots(1, len(firsts), squeeze=False)
    for ax, result in zip(axes[0], firsts):
        with rasterio.open(result.map_path) as src:
            classes = src.read(1)
        ax.imshow(colours[np.clip(classes, 0, len(palette))], interpolation="nearest")
        ax.set_title(f"{result.label}\nOA {100 * result.metrics['OA']:.2f} % (seed {result.seed})", fontsize=9)
        ax.set_axis_off()
    handles = [Patch(facecolor=np.array(c) / 255, edgecolor="k", label=n) for n, c in zip(firsts[0].class_names,
                                                                                          palette)]
    fig.legend(handles=handles, loc="center right", frameon=False, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1 - 1.6 / (4 * len(firsts) + 2), 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def write_outputs(output: Path, results: list[RunResult]) -> dict[str, Path]:
    names = results[0].class_names
    for result in results:
        if result.class_names != names:
            raise ValueError(f"config {result.label!r} has classes {result.class_names}, {results[0].label!r} has "
                             f"{names}: compare configs on one scene")
    columns, rows = summarise(results)
    paths = {"csv": output / "comparison.csv", "md": output / "comparison.md", "runs": output / "runs.csv",
             "maps": output / "maps.png"}
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    run_columns = ["config", "seed", "data_seed", "model", "params", *METRICS, *(f"acc_{c}" for c in names),
                   "fit_seconds", "predict_seconds", "run_dir"]
    with paths["runs"].open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(run_columns)
        for r in results:
            writer.writerow([r.label, r.seed, r.data_seed, r.model, r.params, *(100 * r.metrics[m] for m in METRICS),
                             *(100 * r.metrics[f"acc_{c}"] for c in names), r.fit_seconds, r.predict_seconds,
                             r.run_dir])
    paths["md"].write_text(markdown_table(rows, names))
    maps_figure(paths["maps"], results)
    return paths


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--study" or a.startswith("--study=") for a in argv):
        study.main(argv)
        return
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="rsfusion compare", description=__doc__.split("\n")[0],
                                     epilog="Arguments after -- are passed to every run's CLI, e.g. "
                                            "-- --trainer.max_epochs=5. A whole study (models x datasets x "
                                            "protocols x seeds, resumable, papers' tables): "
                                            "rsfusion compare --study configs/studies/<x>.yaml")
    parser.add_argument("configs", nargs="+", help="config files, optionally as label=path")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--output", type=Path, default=Path("runs/compare"), help="output directory")
    args = parser.parse_args(argv)
    try:
        specs = [parse_config_spec(spec) for spec in args.configs]
    except ValueError as err:
        parser.error(str(err))
    if len({label for label, _ in specs}) != len(specs):
        parser.error("configs: labels must be unique (use label=path)")
    args.output.mkdir(parents=True, exist_ok=True)
    results = [train_and_evaluate(label, path, seed, args.output, overrides)
               for label, path in specs for seed in args.seeds]
    paths = write_outputs(args.output, results)
    print(paths["md"].read_text())
    print("Written: " + ", ".join(str(p) for p in paths.values() if p.exists()))


if __name__ == "__main__":
    main()
