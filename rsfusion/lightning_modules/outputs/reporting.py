"""Run reports: W&B set-up, the confusion matrix and classification maps as local files and W&B media.

Everything here works without W&B: the pictures are always written under ``<log_dir>/reports`` and
``<log_dir>/predictions`` (the directory of the run's ``config.yaml``, beside its checkpoints), and
are additionally sent to every attached ``WandbLogger`` (media, plots, artefacts).
"""
from __future__ import annotations

import csv
import logging
import netrc
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import matplotlib.image
import numpy as np
import wandb
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from rsfusion.datamodules.writing import atomic_path

log = logging.getLogger(__name__)

WANDB_HOST = "api.wandb.ai"


@dataclass
class WandbOptions:
    """``--wandb.*``: add a Weights & Biases logger beside the config's own logger(s).

    Args:
        enabled: switch the W&B logger on (``--wandb.enabled true``).
        project: W&B project; default ``WANDB_PROJECT`` (set by ``wandb agent``), else ``rsfusion``.
        entity, name, group, tags, notes: passed to ``wandb.init``.
        mode: ``auto`` = online when credentials exist (``WANDB_API_KEY`` or a netrc entry for
            api.wandb.ai), offline otherwise; an explicit ``WANDB_MODE`` always wins.
        log_model: upload checkpoints as W&B artefacts (``true``: at the end, ``all``: every save).
            Ignored (with a warning) when the run is offline or disabled.
        init_timeout: seconds to wait for the W&B server before falling back to an offline run.
    """

    enabled: bool = False
    project: str | None = None
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    notes: str | None = None
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    log_model: Literal[False, True, "all"] = False
    init_timeout: float = 30.0


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(WANDB_HOST) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def default_wandb_mode() -> str:
    """``WANDB_MODE`` if set, else online with credentials and offline without (never a login prompt)."""
    return os.environ.get("WANDB_MODE") or ("online" if has_wandb_credentials() else "offline")


def start_wandb_run(options: WandbOptions, save_dir: str | Path) -> Any:
    """Create the W&B run eagerly; if the server cannot be reached, continue offline instead of failing."""
    mode = default_wandb_mode() if options.mode == "auto" else options.mode
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    project = options.project or os.environ.get("WANDB_PROJECT") or "rsfusion"
    kwargs = dict(project=project, entity=options.entity, name=options.name, group=options.group,
                  tags=list(options.tags) or None, notes=options.notes, dir=str(save_dir))
    try:
        run = wandb.init(mode=mode, settings=wandb.Settings(init_timeout=options.init_timeout), **kwargs)
    except Exception as err:  # network, authentication, server errors: never lose the training run
        if mode != "online":
            raise
        rank_zero_warn(f"W&B server not reachable ({type(err).__name__}: {err}); logging offline instead "
                       f"(upload later with `wandb sync {save_dir}/wandb/offline-run-*`)")
        run = wandb.init(mode="offline", **kwargs)
    # Sweeps and the run summary should see the best validation OA, not the last epoch's.
    run.define_metric("val/OA", summary="max")
    return run


def make_wandb_logger(options: WandbOptions, save_dir: str | Path) -> WandbLogger:
    """A ``WandbLogger`` over an eagerly started run on global rank 0 (lazy, never started, elsewhere)."""
    log_model = options.log_model
    if rank_zero_only.rank != 0:
        return WandbLogger(project=options.project or "rsfusion", save_dir=str(save_dir), log_model=False)
    run = start_wandb_run(options, save_dir)
    if log_model and (run.settings.mode != "online" or getattr(run, "disabled", False)):
        rank_zero_warn("--wandb.log_model needs an online W&B run; checkpoints stay local")
        log_model = False
    return WandbLogger(experiment=run, save_dir=str(save_dir), log_model=log_model)


def wandb_loggers(trainer) -> list[WandbLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def report_dir(trainer) -> Path:
    """``<log_dir>/reports``: beside ``config.yaml``, ``predictions/`` and (by default) the checkpoints."""
    return Path(trainer.log_dir or trainer.default_root_dir) / "reports"


def log_picture(trainer, key: str, path: str | Path, caption: str | None = None) -> None:
    """Send a PNG written to disk to the loggers that show pictures (W&B media, TensorBoard figures)."""
    for logger in wandb_loggers(trainer):
        logger.log_image(key=key, images=[str(path)], caption=[caption or Path(path).stem])
    for logger in trainer.loggers:
        add_image = getattr(getattr(logger, "experiment", None), "add_image", None)
        if callable(add_image) and not isinstance(logger, WandbLogger):
            image = matplotlib.image.imread(str(path))[..., :3]
            add_image(key, image, global_step=trainer.global_step, dataformats="HWC")


def log_artifact_files(trainer, name: str, kind: str, paths: list[Path]) -> None:
    """Attach files to the W&B run as one artefact (offline runs keep it for ``wandb sync``)."""
    for logger in wandb_loggers(trainer):
        run = logger.experiment
        if getattr(run, "disabled", False) or run.settings.mode == "disabled":
            continue
        artifact = wandb.Artifact(f"{name}-{run.id}", type=kind)
        for path in paths:
            artifact.add_file(str(path))
        run.log_artifact(artifact)


def write_confusion_csv(path: str | Path, matrix: np.ndarray, class_names: list[str]) -> None:
    """Rows = true class, columns = predicted class, pixel counts."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["true \\ predicted", *class_names])
        for name, row in zip(class_names, matrix):
            writer.writerow([name, *(int(v) for v in row)])


def render_confusion_png(path: str | Path, matrix: np.ndarray, class_names: list[str], title: str = "") -> None:
    """Colours = row-normalised (per true class recall), numbers = pixel counts."""
    k = len(class_names)
    rows = matrix.sum(1, keepdims=True)
    recall = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    size = 2.5 + 0.55 * k
    fig = Figure(figsize=(size + 1, size), dpi=120)
    ax = fig.subplots()
    image = ax.imshow(recall, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=7,
                    color="white" if recall[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def wandb_confusion_chart(matrix: np.ndarray, class_names: list[str], title: str):
    """W&B's interactive confusion-matrix plot from a (K, K) count matrix."""
    true = np.repeat(np.arange(len(class_names)), matrix.sum(1))
    pred = np.concatenate([np.repeat(np.arange(len(class_names)), row) for row in matrix]) if matrix.sum() else true
    return wandb.plot.confusion_matrix(y_true=true.tolist(), preds=pred.tolist(), class_names=list(class_names),
                                       title=title)


class TestReport(Callback):
    """At the end of ``test``: the confusion matrix as CSV + PNG (local) and as W&B plot, image and artefact.

    The matrix is the model's ``test_confusion`` metric (a ``MulticlassConfusionMatrix`` its
    ``test_step`` updates), computed over every process at the end of the test epoch.
    """

    matrix: np.ndarray | None = None

    @staticmethod
    def _metric(pl_module):
        return getattr(pl_module, "test_confusion", None)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self.matrix = None
        if self._metric(pl_module) is not None:
            self._metric(pl_module).reset()

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        metric = self._metric(pl_module)
        if metric is not None and metric.update_called:
            self.matrix = metric.compute().cpu().numpy().astype(np.int64)  # a collective under DDP
            metric.reset()

    def on_test_end(self, trainer, pl_module) -> None:
        if self.matrix is None:
            return
        out = report_dir(trainer)  # a broadcast under DDP: every rank must ask, or later collectives pair wrongly
        if not trainer.is_global_zero:
            return
        matrix, names = self.matrix, list(pl_module.class_names)
        csv_path, png_path = out / "confusion_matrix.csv", out / "confusion_matrix.png"
        write_confusion_csv(csv_path, matrix, names)
        render_confusion_png(png_path, matrix, names, title=f"{type(pl_module).__name__}: test confusion matrix")
        rank_zero_info(f"Confusion matrix written to {csv_path} and {png_path}")
        for logger in wandb_loggers(trainer):
            logger.log_metrics({"test/confusion_matrix": wandb_confusion_chart(matrix, names, "test confusion matrix")},
                               step=trainer.global_step)
        log_picture(trainer, "test/confusion_matrix_image", png_path, "test confusion matrix")
        log_artifact_files(trainer, "confusion-matrix", "evaluation", [png_path, csv_path])


class LoggedSaveConfigCallback(SaveConfigCallback):
    """Saves ``config.yaml`` as usual and sends the full resolved config to W&B as the run's config."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        resolved = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in wandb_loggers(trainer):
            logger.log_hyperparams(resolved)


class Progress:
    """A ``progress(done, total)`` callback for long loops: a tqdm bar with ETA on a terminal, else log
    lines with the elapsed time and ETA every ``every`` of the work (for logs and batch jobs).

    Used for full-scene prediction when Lightning's bar is off; usable by feature-bank builders too.
    """

    def __init__(self, description: str, bar: bool | None = None, every: float = 0.1):
        self.description, self.every = description, every
        self.bar = sys.stderr.isatty() if bar is None else bar
        self._tqdm = None
        self._start: float | None = None
        self._last_mark = 0
        self.lines: list[str] = []

    def __call__(self, done: int, total: int) -> None:
        if self._start is None:
            self._start = time.perf_counter()
        if self.bar:
            if self._tqdm is None:
                self._tqdm = tqdm(total=total, desc=self.description, dynamic_ncols=True)
            self._tqdm.update(done - self._tqdm.n)
            if done >= total:
                self.close()
            return
        mark = int(done / max(total, 1) / self.every + 1e-9)
        if mark > self._last_mark or done >= total:
            self._last_mark = mark
            elapsed = time.perf_counter() - self._start
            eta = elapsed / max(done, 1) * (total - done)
            line = (f"{self.description}: {100 * done / max(total, 1):.0f} % ({done}/{total}), "
                    f"{elapsed:.1f} s elapsed, ETA {eta:.1f} s")
            self.lines.append(line)
            rank_zero_info(line)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None
