"""Full-scene prediction time on this CPU: eager float32 vs ``--inference_precision bf16`` and/or
``--inference_scan fast``.

    OMP_NUM_THREADS=1 python benchmarks/inference.py [--models cnn das2f m3amba bdgf] [--repeats 3]
        [--options bf16 fast bf16+fast]

Each model (seeded random weights; the timing does not depend on training) maps a synthetic scene
through the real path (DataModule -> Trainer.predict -> map writer). The runs are interleaved
(eager, option 1, option 2, eager, ...) and each timing is the minimum of ``--repeats`` runs, so
contention on the shared machine hits all alike. Map agreement = fraction of pixels where the bf16 map
equals the float32 map; with random weights many pixels are near ties, so a trained model agrees
more (tests/test_inference.py checks a trained one). Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SCENES = {  # model -> (synthetic scene kind, side, DataModule options)
    "cnn": ("hsi_dsm", 96, dict(patch_size=9)),
    "das2f": ("ms_pan", 24, dict(patch_size=16, normalization="minmax_global")),
    "m3amba": ("hsi_dsm", 64, dict(patch_size=32, sampling="tile")),
    "bdgf": ("hsi_sar", 48, dict(patch_size=11, pca={"hsi": 30})),
}


def build_model(name: str, dm, work: Path):
    from rsfusion.lightning_modules import BDGF, DAS2F, M3amba, TwoBranchCNN

    common = dict(in_channels=dm.in_channels, num_classes=dm.num_classes, patch_size=dm.patch_size)
    if name == "cnn":
        return TwoBranchCNN(width=64, **common)  # the configs' baseline width
    if name == "das2f":
        return DAS2F(**common)  # authors' nanjing net, MS 16 x 16 + PAN 64 x 64
    if name == "m3amba":  # Houston2013 width, depth 1 of 9, a ViT-B/32-shaped random CLIP
        clip = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    image_size=224, patch_size=32, projection_dim=512)
        return M3amba(dims=384, depth=1, clip_config=clip, drop_path_rate=0.0, dense=True, **common)
    bank = work / "bank.npy"  # stage 2 reading a ready (320, H, W) bank, as benchmarks/models.py
    h, w = dm.shape
    np.save(bank, np.random.default_rng(0).random((320, h, w), dtype=np.float32).astype(np.float16))
    return BDGF(feature_bank=str(bank), feature_bank_split=[64, 128, 128], **common)


OPTIONS = {"eager": ("32", "exact"), "bf16": ("bf16", "exact"), "fast": ("32", "fast"), "bf16+fast": ("bf16", "fast")}
LABELS = {"bf16": "bf16 autocast, scan float32", "fast": "--inference_scan fast", "bf16+fast": "bf16 + fast scan"}


def predict_map(name: str, option: str, work: Path) -> tuple[float, np.ndarray]:
    import lightning as L
    import rasterio

    from rsfusion.datamodules.synthetic import SyntheticDataModule
    from rsfusion.lightning_modules.outputs.inference import InferencePrecision
    from rsfusion.lightning_modules.outputs.maps import ClassificationMapWriter

    kind, side, options = SCENES[name]
    dm = SyntheticDataModule(kind=kind, root=str(work / "scenes"), scene_height=side, scene_width=side,
                             train_per_class=10, batch_size=64, eval_batch_size=256, **options)
    torch.manual_seed(0)
    model = build_model(name, dm, work).eval()
    out = work / f"{name}-{option}"
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ClassificationMapWriter(str(out)), InferencePrecision(*OPTIONS[option])])
    start = time.perf_counter()
    trainer.predict(model, datamodule=dm, return_predictions=False)
    seconds = time.perf_counter() - start
    with rasterio.open(out / "classification_map.tif") as src:
        return seconds, src.read(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SCENES), choices=list(SCENES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--options", nargs="+", default=["bf16", "fast", "bf16+fast"], choices=list(LABELS))
    args = parser.parse_args()
    options = ["eager", *args.options]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); min of {args.repeats} interleaved runs\n")
    print("| model | scene | eager float32 (s) | " + " | ".join(f"{LABELS[o]} (s, speed-up, map agreement)"
                                                         for o in args.options) + " |")
    print("|---|---|---|" + "---|" * len(args.options))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.models:
            times, maps = {o: [] for o in options}, {}
            for _ in range(args.repeats):
                for option in options:
                    seconds, maps[option] = predict_map(name, option, work)
                    times[option].append(seconds)
            best = {o: min(t) for o, t in times.items()}
            agree = {o: 100 * float((maps[o] == maps["eager"]).mean()) for o in args.options}
            cells = [f"{best[o]:.2f}, {best['eager'] / best[o]:.2f}x, {agree[o]:.2f} %" for o in args.options]
            kind, side, _ = SCENES[name]
            print(f"| {name} | {kind} {side}x{side} | {best['eager']:.2f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
