"""Where a run's outputs go: one folder per run, ``<trainer.default_root_dir>/<version>/``.

The CLI's trainer defaults (``RUN_LOGGER``, ``RUN_CHECKPOINTS``) put everything a run writes in that
folder: ``config.yaml``, ``metrics.csv``, ``checkpoints/`` (``best-epoch=NN.ckpt`` on val/OA and
``last.ckpt`` every epoch), ``predictions/``, ``reports/``, ``split_card.json`` and ``wandb/``.
The version is ``version_N`` (the next free N, claimed with an atomic ``mkdir`` so runs started at
once never share one), ``trial_<W&B run id>`` for a W&B sweep trial, or whatever
``--trainer.logger.init_args.version`` says. ``--ckpt_path last|best`` is resolved to the files of
the newest run under the root; ``fit --ckpt_path last`` continues in that run's own folder.
"""
from __future__ import annotations

import csv
import os
import re
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from rsfusion.datamodules.io import InputError

RUN_LOGGER = {"class_path": "rsfusion.lightning_modules.runs.RunLogger"}
RUN_CHECKPOINTS = [
    {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
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


class _ResumableWriter(ExperimentWriter):
    """Lightning's writer deletes an existing ``metrics.csv`` (with a warning); a resumed run appends to it."""

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if path.is_file():
            with path.open(newline="") as handle:
                self.metrics_keys = list(next(csv.reader(handle), []))


def run_folders(root: str | Path) -> list[Path]:
    """The run folders under ``root`` that hold checkpoints, oldest first (by their newest checkpoint)."""
    folders = [p.parent.parent for p in Path(root).glob("*/checkpoints/*.ckpt")]
    newest = {folder: max(p.stat().st_mtime for p in (folder / "checkpoints").glob("*.ckpt")) for folder in folders}
    return sorted(newest, key=newest.get)


def checkpoint_of(folder: Path, which: str) -> Path | None:
    """``last`` -> ``checkpoints/last.ckpt``; ``best`` -> the ``best-*.ckpt`` (the most recent if several)."""
    if which == "last":
        path = folder / "checkpoints" / "last.ckpt"
        return path if path.is_file() else None
    best = sorted((folder / "checkpoints").glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime)
    return best[-1] if best else None


def version_of(folder_name: str) -> int | str:
    match = _VERSION.fullmatch(folder_name)
    return int(match.group(1)) if match else folder_name


def resolve_run(config, subcommand: str | None) -> None:
    """Fill in the run folder of a parsed config (a jsonargparse namespace), before anything is built.

    - the ``RunLogger``'s ``save_dir`` defaults to ``trainer.default_root_dir`` (else the cwd);
    - a W&B sweep trial (``WANDB_SWEEP_ID`` and ``WANDB_RUN_ID`` set by ``wandb agent``) gets its own
      folder ``trial_<run id>``, so parallel agents never share one;
    - ``ckpt_path: last|best`` becomes the file of the newest run under the root (a fresh process has no
      "best" of its own to ask Lightning for), and a ``fit`` that resumes a run of this root logs and
      checkpoints in that run's folder.
    """
    trainer = config["trainer"]
    root = Path(trainer.get("default_root_dir") or os.getcwd())
    logger = trainer.get("logger")
    init = None
    if hasattr(logger, "get") and str(logger.get("class_path", "")).endswith((".RunLogger", ".CSVLogger")):
        if logger.get("init_args") is None:
            logger["init_args"] = type(logger)()
        init = logger["init_args"]
        if init.get("save_dir") is None:
            init["save_dir"] = os.path.abspath(root)  # paths in messages and checkpoints survive a chdir
        if init.get("version") is None and os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID"):
            init["version"] = f"trial_{os.environ['WANDB_RUN_ID']}"
    ckpt = config.get("ckpt_path")
    if ckpt in ("last", "best"):
        folders = run_folders(root)
        found = checkpoint_of(folders[-1], ckpt) if folders else None
        if found is None and subcommand != "fit":
            raise InputError(f"--ckpt_path {ckpt}: no {ckpt} checkpoint under {root}/*/checkpoints "
                             "(set --trainer.default_root_dir to the run's root, or give the file)")
        if found is None:
            rank_zero_info(f"--ckpt_path {ckpt}: no checkpoint under {root}/*/checkpoints; starting a new run")
        else:
            rank_zero_info(f"--ckpt_path {ckpt}: {found}")
        config["ckpt_path"] = str(found) if found else None
    if subcommand == "fit" and config.get("ckpt_path") and init is not None and init.get("version") is None:
        checkpoints = Path(config["ckpt_path"]).resolve().parent
        if checkpoints.name == "checkpoints" and checkpoints.parent.parent == Path(init["save_dir"],
                                                                                   init.get("name") or "").resolve():
            init["version"] = version_of(checkpoints.parent.name)
            rank_zero_info(f"Resuming in the run folder {checkpoints.parent}")
