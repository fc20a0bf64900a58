"""Callbacks the ``lightning``/``rsfusion`` CLI adds to every Trainer; :func:`default_callbacks` for Python.

A Trainer built in Python gets the same behaviour with ``Trainer(callbacks=default_callbacks())``:
exact resume (RNG states in checkpoints), the leakage figure, the test confusion-matrix report and
the full-scene map of ``trainer.predict``.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import cuda

from rsfusion.lightning_modules.outputs.maps import ClassificationMapWriter
from rsfusion.lightning_modules.outputs.reporting import TestReport

_warned: set[str] = set()


class RNGStateCapture(Callback):
    """Stores the CPU, numpy, Python and per-GPU RNG states in checkpoints (``checkpoint["rng_states"]``)
    and restores them when ``fit`` resumes: a resumed run draws the same dropout masks and noise as an
    uninterrupted one (Lightning stores no RNG state)."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                                    # plain types only, so checkpoints load with weights_only=True
                                    "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                              int(has_gauss), float(gauss))}
        if cuda.is_available() and cuda.is_initialized():
            # one uint8 tensor per visible GPU: dropout masks drawn on the GPU continue on resume
            checkpoint["rng_states"]["cuda"] = [state.cpu() for state in cuda.get_rng_state_all()]

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states")
        if states is None or trainer.state.fn != "fit":
            return
        torch.set_rng_state(states["torch"])
        kind, keys, pos, has_gauss, gauss = states["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.setstate(states["python"])
        restore_cuda_rng(states.get("cuda"))


def restore_cuda_rng(cuda_states: list[torch.Tensor] | None) -> None:
    """Restore the per-GPU RNG states of a checkpoint; warn once when the GPUs differ."""
    if not cuda_states:
        return
    count = cuda.device_count() if cuda.is_available() else 0
    if count == len(cuda_states):
        cuda.set_rng_state_all(cuda_states)
    elif "cuda_rng" not in _warned:
        _warned.add("cuda_rng")
        rank_zero_warn(f"the checkpoint holds the RNG states of {len(cuda_states)} GPU(s), this process sees {count}: "
                       "the GPU random stream (dropout, noise drawn on the GPU) restarts instead of continuing")


class LeakageReport(Callback):
    """Logs ``data/test_pixels_in_train_patches`` (the DataModule's ``leakage``: the fraction of test
    pixels inside some training patch) once, when ``fit`` starts."""

    def on_fit_start(self, trainer, pl_module) -> None:
        leakage = getattr(trainer.datamodule, "leakage", None)
        if leakage is not None:
            for logger in trainer.loggers:
                logger.log_metrics({"data/test_pixels_in_train_patches": float(leakage)}, step=0)


def default_callbacks(map_writer: bool = True) -> list[Callback]:
    """The suite's cross-cutting callbacks, for a Trainer built in Python (the CLI adds them itself):
    RNG capture, leakage report, test report and (``map_writer``) a default :class:`ClassificationMapWriter`."""
    callbacks: list[Callback] = [RNGStateCapture(), LeakageReport(), TestReport()]
    return callbacks + [ClassificationMapWriter()] if map_writer else callbacks
