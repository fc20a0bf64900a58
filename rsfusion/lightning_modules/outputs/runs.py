"""Where a run's outputs go: one folder per run, ``<trainer.default_root_dir>/<version>/``.

The CLI's trainer defaults (``RUN_LOGGER``, ``RUN_CHECKPOINTS``) put everything a run writes in that
folder: ``config.yaml``, ``metrics.csv``, ``checkpoints/`` (``best-epoch=NN.ckpt`` on val/OA and
``last.ckpt`` every epoch), ``predictions/``, ``reports/``, ``split_card.json`` and ``wandb/``.
The version is ``version_N`` (the next free N, claimed with an atomic ``mkdir`` so runs started at
once never share one), ``trial_<W&B run id>`` for a W&B sweep trial, or whatever
``--trainer.logger.init_args.version`` says. ``--ckpt_path last|best`` is resolved to the files of
the newest such file under the root (whichever run wrote it last); ``fit --ckpt_path last`` continues
in that run's own folder.
"""
from __future__ import annotations

import csv
import os
import re
import shutil
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from rsfusion.datamodules.errors import InputError

RUN_LOGGER = {"class_path": "rsfusion.lightning_modules.outputs.runs.RunLogger"}
RUN_CHECKPOINTS = [
    {"class_path": "rsfusion.lightning_modules.outputs.runs.RunCheckpoint",
     "init_args": {"monitor": "val/OA", "mode": "max", "filename": "best-{epoch:02d}"}},
    {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",  # last.ckpt every epoch, for resuming
     "init_args": {"filename": "last", "enable_version_counter": False}},
]
_VERSION = re.compile(r"version_(\d+)")


class RunLogger(CSVLogger):
    """A ``CSVLogger`` writing ``<save_dir>/<version>/metrics.csv`` with the run folder conventions above.

    Args:
        save_dir: the folder holding the run folders; ``null`` = the trainer's ``default_root_dir``
            (filled in by the CLI before the trainer is built).
        name: a sub-folder between ``save_dir`` and the version (default none).
        version: ``null`` = the next free ``version_N``; an int N = ``version_N``; a string = that folder.
    """

    def __init__(self, save_dir: str | None = None, name: str = "", version: int | str | None = None,
                 prefix: str = "", flush_logs_every_n_steps: int = 100):
        super().__init__(save_dir if save_dir is not None else os.getcwd(), name=name, version=version,
                         prefix=prefix, flush_logs_every_n_steps=flush_logs_every_n_steps)

    claimed: list[Path] = []  # run folders this process created (see discard_unused_runs)

    def _get_next_version(self) -> int:
        """The next free ``version_N``, claimed by creating its folder: ``mkdir`` fails for a second process
        that picked the same N, which then takes the next one (listing alone races)."""
        version = super()._get_next_version()
        if rank_zero_only.rank != 0:
            return version  # other DDP ranks never write: Lightning broadcasts rank 0's log_dir
        root = Path(self.root_dir)
        root.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                (root / f"version_{version}").mkdir()
                RunLogger.claimed.append(root / f"version_{version}")
                return version
            except FileExistsError:
                version += 1

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumableWriter(log_dir=self.log_dir)
        return self._experiment


UNUSED_RUN_FILES = {"config.yaml", "hparams.yaml"}


def discard_unused_runs() -> list[Path]:
    """Remove the run folders this process claimed that hold nothing of a run (at most its config): what a
    run that failed before training would leave behind. Returns the removed folders."""
    removed = []
    for folder in RunLogger.claimed:
        files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
        if folder.is_dir() and all(p.parent == folder and p.name in UNUSED_RUN_FILES for p in files):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    RunLogger.claimed.clear()
    return removed


class RunCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` that, when a run resumes, removes the files of its own pattern that it no longer
    tracks: a run killed right after saving a new best checkpoint, before ``last.ckpt`` recorded it,
    would otherwise keep that file beside the one the resumed run saves (two ``best-*.ckpt``)."""

    def on_fit_start(self, trainer, pl_module) -> None:
        super().on_fit_start(trainer, pl_module)
        if trainer.ckpt_path is None or self.monitor is None or not trainer.is_global_zero or not self.dirpath:
            return
        kept = {Path(p).resolve() for p in (*self.best_k_models, self.best_model_path, self.last_model_path) if p}
        stem = re.sub(r"\{[^}]*\}", "*", self.filename or "*")  # best-{epoch:02d} -> best-*
        pattern = stem + ("" if stem.endswith("*") else "*") + self.FILE_EXTENSION  # and its -v1 versions
        for path in Path(self.dirpath).glob(pattern):
            if path.resolve() not in kept and path.name != f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}":
                path.unlink(missing_ok=True)
                rank_zero_info(f"Removed {path.name}: saved by the interrupted run after its last checkpoint, "
                               "so not one this run tracks")


class _ResumableWriter(ExperimentWriter):
    """Lightning's writer deletes an existing ``metrics.csv`` (with a warning); a resumed run appends to it."""

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if path.is_file():
            with path.open(newline="") as handle:
                self.metrics_keys = list(next(csv.reader(handle), []))


CHECKPOINT_FILES = {"last": "last.ckpt", "best": "best-*.ckpt"}


def newest_checkpoint(root: str | Path, which: str) -> Path | None:
    """``last``: the newest ``checkpoints/last.ckpt`` of any run under ``root``; ``best``: the newest
    ``checkpoints/best-*.ckpt`` (each run keeps one). Newest = most recently written; None if there is none."""
    found = [p for p in Path(root).glob(f"*/checkpoints/{CHECKPOINT_FILES[which]}") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _class_name(entry) -> str:
    return str(entry.get("class_path", "")).rsplit(".", 1)[-1] if hasattr(entry, "get") else ""


def _place_loggers(trainer, root: str):
    """Every configured logger writes under ``root``: the run logger (``RunLogger``/``CSVLogger``) into
    ``root/<version>`` and first in the list, so ``trainer.log_dir`` (checkpoints, reports, maps) is its
    folder; TensorBoard and W&B loggers without a folder of their own under ``root`` too. Returns the run
    logger's ``init_args`` (None without one). A ``version`` that leaves ``root`` is refused."""
    loggers = trainer.get("logger")
    entries = [e for e in (loggers if isinstance(loggers, list) else [loggers]) if hasattr(e, "get")]
    run = None
    for entry in entries:
        kind = _class_name(entry)
        if kind not in ("RunLogger", "CSVLogger", "TensorBoardLogger", "WandbLogger"):
            continue
        if entry.get("init_args") is None:
            entry["init_args"] = type(entry)()
        init = entry["init_args"]
        if init.get("save_dir") in (None, ".", "./"):  # W&B's default "." is the working directory
            init["save_dir"] = root  # absolute: paths in messages and checkpoints survive a chdir
        version = init.get("version")
        if isinstance(version, str) and ("/" in version or "\\" in version or version in (".", "..")):
            raise InputError(f"--trainer.logger.init_args.version {version!r}: a run folder name, not a path "
                             f"(every run stays under {root})")
        if run is None and kind in ("RunLogger", "CSVLogger"):
            run = entry
    if run is not None and isinstance(loggers, list) and loggers[0] is not run:
        trainer["logger"] = [run, *[e for e in loggers if e is not run]]
    return None if run is None else run["init_args"]


def version_of(folder_name: str) -> int | str:
    match = _VERSION.fullmatch(folder_name)
    return int(match.group(1)) if match else folder_name


def resolve_run(config, subcommand: str | None) -> None:
    """Fill in the run folder of a parsed config (a jsonargparse namespace), before anything is built.

    - every logger writes under ``trainer.default_root_dir`` (else the cwd), however many a config or
      ``--trainer.logger+=...`` gives, and the run logger comes first (:func:`_place_loggers`);
    - a W&B sweep trial (``WANDB_SWEEP_ID`` and ``WANDB_RUN_ID`` set by ``wandb agent``) gets its own
      folder ``trial_<run id>``, so parallel agents never share one;
    - ``ckpt_path: last|best`` becomes the file of the newest run under the root (a fresh process has no
      "best" of its own to ask Lightning for), and a ``fit`` that resumes a run of this root logs and
      checkpoints in that run's folder.
    """
    trainer = config["trainer"]
    root = Path(trainer.get("default_root_dir") or os.getcwd())
    init = _place_loggers(trainer, os.path.abspath(root))
    if init is not None and init.get("version") is None and os.environ.get("WANDB_SWEEP_ID") \
            and os.environ.get("WANDB_RUN_ID"):
        init["version"] = f"trial_{os.environ['WANDB_RUN_ID']}"
    ckpt = config.get("ckpt_path")
    if ckpt in ("last", "best"):
        found = newest_checkpoint(root, ckpt)
        pattern = f"{root}/*/checkpoints/{CHECKPOINT_FILES[ckpt]}"
        if found is None and subcommand != "fit":
            raise InputError(f"--ckpt_path {ckpt}: no checkpoint matches {pattern} "
                             "(set --trainer.default_root_dir to the run's root, or give the file)")
        if found is None:
            rank_zero_info(f"--ckpt_path {ckpt}: no checkpoint matches {pattern}; starting a new run")
        else:
            rank_zero_info(f"--ckpt_path {ckpt}: {found}")
        config["ckpt_path"] = str(found) if found else None
    if subcommand == "fit" and config.get("ckpt_path") and init is not None and init.get("version") is None:
        checkpoints = Path(config["ckpt_path"]).resolve().parent
        if checkpoints.name == "checkpoints" and checkpoints.parent.parent == Path(init["save_dir"],
                                                                                   init.get("name") or "").resolve():
            init["version"] = version_of(checkpoints.parent.name)
            rank_zero_info(f"Resuming in the run folder {checkpoints.parent}")
