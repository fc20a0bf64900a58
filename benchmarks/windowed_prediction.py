"""Peak memory of full-scene prediction as the scene grows: whole scene in memory vs ``predict_window``.

    python benchmarks/windowed_prediction.py [--sides 512 724 1024] [--bands 64] [--window 256]

Writes synthetic HSI (``--bands``) + DSM GeoTIFFs of side x side pixels, then runs ``trainer.predict``
of an untrained tile baseline (the model does not matter for memory) in a fresh process per run and
reports that process's peak resident memory (ru_maxrss) and its prediction time. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_scene(folder: Path, side: int, bands: int) -> dict[str, str]:
    """Smooth random bands written strip by strip (this process never holds the scene either)."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    profile = dict(driver="GTiff", height=side, width=side, crs="EPSG:32632",
                   transform=from_origin(500_000.0, 4_000_000.0, 1.0, 1.0), tiled=True, blockxsize=256, blockysize=256)
    paths = {name: folder / f"{name}.tif" for name in ("hsi", "dsm", "train", "test")}
    with rasterio.open(paths["hsi"], "w", count=bands, dtype="float32", **profile) as hsi, \
            rasterio.open(paths["dsm"], "w", count=1, dtype="float32", **profile) as dsm, \
            rasterio.open(paths["train"], "w", count=1, dtype="uint8", **profile) as train, \
            rasterio.open(paths["test"], "w", count=1, dtype="uint8", **profile) as test:
        for r0 in range(0, side, 256):
            h = min(256, side - r0)
            window = Window(0, r0, side, h)
            hsi.write(rng.normal(size=(bands, h, side)).astype(np.float32), window=window)
            dsm.write(rng.normal(size=(1, h, side)).astype(np.float32), window=window)
            labels = rng.integers(1, 5, size=(h, side)) * (rng.random((h, side)) < 0.01)
            split = rng.random((h, side)) < 0.5
            train.write(np.where(split, labels, 0).astype(np.uint8)[None], window=window)
            test.write(np.where(split, 0, labels).astype(np.uint8)[None], window=window)
    return {k: str(v) for k, v in paths.items()}


def child(paths: dict[str, str], window: int | None, out_dir: str) -> dict:
    import lightning as L
    import torch

    from rsfusion.datamodules import RasterDataModule
    from rsfusion.lightning_modules import TwoBranchCNN
    from rsfusion.lightning_modules.outputs.maps import ClassificationMapWriter

    torch.manual_seed(0)
    dm = RasterDataModule({"hsi": paths["hsi"], "dsm": paths["dsm"]}, train_labels=paths["train"],
                          test_labels=paths["test"], sampling="tile", patch_size=32, eval_batch_size=32,
                          predict_window=window)
    model = TwoBranchCNN(in_channels=dm.in_channels, num_classes=dm.num_classes, class_names=dm.class_names,
                         width=8, dense=True)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ClassificationMapWriter(output_dir=out_dir)], default_root_dir=out_dir)
    start = time.perf_counter()
    trainer.predict(model, datamodule=dm, return_predictions=False)
    return {"seconds": time.perf_counter() - start,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[512, 724, 1024])
    parser.add_argument("--bands", type=int, default=64)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        job = json.loads(args.child)
        print(json.dumps(child(job["paths"], job["window"], job["out"])))
        return
    print("| scene (px) | raw data (MB) | mode | peak RSS (MB) | prediction (s) |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for side in args.sides:
            paths = write_scene(Path(tmp) / str(side), side, args.bands)
            raw_mb = side * side * (args.bands + 1) * 4 / 2 ** 20
            for window in (None, args.window):
                job = {"paths": paths, "window": window, "out": str(Path(tmp) / f"maps-{side}-{window}")}
                out = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], cwd=ROOT,
                                     capture_output=True, text=True, check=True)
                result = json.loads(out.stdout.strip().splitlines()[-1])
                mode = "whole scene" if window is None else f"predict_window {window}"
                print(f"| {side}x{side} | {raw_mb:,.0f} | {mode} | {result['peak_mb']:,.0f} | "
                      f"{result['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
