"""Data pipeline speed: training DataLoader samples/s and full-scene prediction pixels/s (baseline CNN).

    python benchmarks/data_pipeline.py [--size 500] [--batches 50]

Prints a Markdown table. Uses a synthetic HSI + DSM scene of size x size pixels (48 bands).
"""
from __future__ import annotations

import argparse
import tempfile
import time

import lightning as L
import torch

from rsfusion.datamodules import SyntheticDataModule
from rsfusion.lightning_modules import TwoBranchCNN
from rsfusion.lightning_modules.outputs.maps import ClassificationMapWriter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=500)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--patch-size", type=int, default=11)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        dm = SyntheticDataModule(root=root, scene_height=args.size, scene_width=args.size,
                                 train_per_class=2000, patch_size=args.patch_size, batch_size=args.batch_size)
        dm.setup("fit")
        rows.append(("scene generation + load", f"{time.perf_counter() - t0:.2f} s", f"{args.size}x{args.size} px"))

        loader, n = dm.train_dataloader(), 0
        t0 = time.perf_counter()
        for i, batch in enumerate(loader):
            n += batch["label"].shape[0]
            if i + 1 >= args.batches:
                break
        dt = time.perf_counter() - t0
        rows.append(("training DataLoader", f"{n / dt:,.0f} samples/s",
                     f"batch {args.batch_size}, patch {args.patch_size}"))

        model = TwoBranchCNN(in_channels=dm.in_channels, num_classes=dm.num_classes, class_names=dm.class_names,
                             width=32)
        writer = ClassificationMapWriter(output_dir=root + "/maps")
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[writer],
                            enable_model_summary=False, default_root_dir=root)
        t0 = time.perf_counter()
        trainer.predict(model, datamodule=dm, return_predictions=False)
        dt = time.perf_counter() - t0
        pixels = int(dm.scene.valid.sum())
        rows.append(("full-scene prediction (baseline, width 32)", f"{pixels / dt:,.0f} pixels/s",
                     f"{pixels:,} pixels in {dt:.1f} s, map written"))
    print("| stage | throughput | notes |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
