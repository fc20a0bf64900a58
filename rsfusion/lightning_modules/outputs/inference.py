"""Faster full-scene prediction on a CPU: bfloat16 autocast for the network, float32 for the scan.

:class:`InferencePrecision` is a callback (``rsfusion predict --inference_precision bf16``, or in the
Trainer's callbacks) that runs the model's ``predict_logits`` under ``torch.autocast`` with
bfloat16 during ``predict`` only: convolutions and linear layers use the CPU's bfloat16 units
(AVX512-BF16/AMX, through oneDNN) while the selective scan keeps computing in float32 (its torch
backend casts its inputs up) and the class scores are returned as float32. Training, validation and
``test`` are untouched, so the reported metrics stay float32. Maps can differ from float32 maps
where two classes' scores are within bfloat16 rounding of each other (measured in
``benchmarks/inference.py`` and tested to stay below 1 % of the pixels of a trained model).

``scan="fast"`` (``--inference_scan fast``) runs the selective scan's forward-only, cache-blocked
path during ``predict`` (``rsfusion.kernels.scan_inference``): float32 throughout, scores within
~1e-5 of the exact scan's, 2x faster scans at full-scene batch sizes. It combines with either precision.
"""
from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.callbacks import Callback

from rsfusion.kernels.scan_inference import fast_inference_scan

Precision = Literal["32", "bf16"]
Scan = Literal["exact", "fast"]


class InferencePrecision(Callback):
    """Run ``predict_logits`` under bfloat16 autocast during ``predict`` (``precision="bf16"``) and/or
    with the forward-only selective scan (``scan="fast"``)."""

    def __init__(self, precision: Precision = "bf16", scan: Scan = "exact"):
        if precision not in ("32", "bf16"):
            raise ValueError(f"inference precision must be '32' or 'bf16', got {precision!r}")
        if scan not in ("exact", "fast"):
            raise ValueError(f"inference scan must be 'exact' or 'fast', got {scan!r}")
        self.precision, self.scan = precision, scan

    def on_predict_start(self, trainer, pl_module) -> None:
        if (self.precision == "32" and self.scan == "exact") or "predict_logits" in vars(pl_module):
            return
        exact_logits = pl_module.predict_logits
        device_type = pl_module.device.type
        bf16, fast = self.precision == "bf16", self.scan == "fast"

        def predict_logits(batch):
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16), fast_inference_scan(fast):
                return exact_logits(batch).float()

        pl_module.predict_logits = predict_logits  # shadows the method for this prediction only

    def on_predict_end(self, trainer, pl_module) -> None:
        vars(pl_module).pop("predict_logits", None)


def ensure_inference_precision(trainer, precision: Precision, scan: Scan = "exact") -> None:
    """Add (or retune) the trainer's :class:`InferencePrecision` callback."""
    for cb in trainer.callbacks:
        if isinstance(cb, InferencePrecision):
            cb.precision, cb.scan = precision, scan
            return
    if precision != "32" or scan != "exact":
        trainer.callbacks.append(InferencePrecision(precision, scan))
