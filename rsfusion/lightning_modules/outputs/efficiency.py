"""What a model costs, measured in its own run: parameters, FLOPs per sample, time per training epoch,
full-scene inference throughput and peak memory."""
from __future__ import annotations

import resource
import sys
import time

import lightning as L
import torch
from torch.utils.flop_counter import FlopCounterMode

from rsfusion.kernels import count_scan_flops


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Trainable and frozen parameters (frozen: ``requires_grad`` off, e.g. M3amba's CLIP tower)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_params": trainable, "frozen_params": sum(p.numel() for p in model.parameters()) - trainable}


def one_sample(batch: dict) -> dict:
    """The first sample of a batch, as a batch of one."""
    return {key: value[:1] if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def flops_per_sample(model: torch.nn.Module, batch: dict) -> int:
    """Forward FLOPs of one sample (``torch.utils.flop_counter``; a multiply-add counts 2), the selective
    scan counted analytically (``rsfusion.kernels.count_scan_flops``), in eval mode."""
    device = next(model.parameters()).device
    sample = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in one_sample(batch).items()}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter, count_scan_flops():
            model(sample)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the most memory tensors held on the device; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


class EpochTimer(L.Callback):
    """Wall time of every training epoch this process runs (a resumed run times its remaining epochs)."""

    def __init__(self):
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds.append(time.perf_counter() - self._start)
