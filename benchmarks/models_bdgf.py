"""BDGF cost at the spec's sizes on CPU: parameters, DDPM step, feature-bank extraction, classifier.

    python benchmarks/models_bdgf.py [--repeats 3] [--batch 64]

Prints a Markdown table (best of ``--repeats`` timings). Random data with Augsburg's geometry
(HSI PCA 30 + SAR 4, 7 classes, patch 11); the feature-bank time of a whole scene is extrapolated
from the time per tile (tiles of 32 with overlap 16, two timesteps), which is how it scales.
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from rsfusion.lightning_modules.bdgf import BDGF, BDGFDiffusion
from rsfusion.lightning_modules.bdgf_features import extract_feature_cube

CHANNELS = {"hsi": 30, "sar": 4}
SCENES = {"Augsburg": (332, 485), "Berlin": (1723, 476)}


def timed(fn, repeats: int) -> float:
    """Best of ``repeats`` timings after a warm-up (the machine may be shared: the minimum is the
    least disturbed measurement)."""
    fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def tiles_in(shape: tuple[int, int], tile: int = 32, overlap: int = 16) -> int:
    stride = tile - overlap
    return math.prod(max(1, math.ceil((s - tile) / stride) + 1) for s in shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64, help="DDPM and classifier training batch")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []

    diffusion = BDGFDiffusion(CHANNELS)
    ddpm_params = sum(p.numel() for p in diffusion.denoiser.parameters())
    model = BDGF(in_channels=CHANNELS, num_classes=7)
    clf_params = sum(p.numel() for p in model.net.parameters())
    rows.append(("DDPM denoiser parameters", f"{ddpm_params / 1e6:.2f} M", "spec 4.1 sizes, 34 input bands"))
    rows.append(("classifier parameters", f"{clf_params / 1e6:.3f} M", "3 branches + guide projections"))

    optimizer = torch.optim.AdamW(diffusion.denoiser.parameters(), lr=1e-4)
    x0 = torch.randn(args.batch, 34, 32, 32)

    def ddpm_step():
        out = diffusion.training_loss(x0)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()

    step = timed(ddpm_step, args.repeats)
    rows.append(("DDPM training step", f"{step:.2f} s",
                 f"batch {args.batch} x 32x32; 30k steps = {30000 * step / 3600:.0f} h"))

    modalities = {n: torch.randn(c, 48, 48) for n, c in CHANNELS.items()}  # 4 tiles of 32 at overlap 16
    per_tile = timed(lambda: extract_feature_cube(diffusion.ema, diffusion.schedule, modalities), args.repeats) / 4
    for name, shape in SCENES.items():
        n = tiles_in(shape)
        rows.append((f"feature bank, {name}", f"{n * per_tile / 60:.1f} min", f"{n} tiles x {per_tile:.2f} s"))

    batch = {"hsi": torch.randn(args.batch, 30, 11, 11), "sar": torch.randn(args.batch, 4, 11, 11),
             "ddpm_features": torch.randn(args.batch, 320, 11, 11).half(), "label": torch.randint(0, 7, (args.batch,))}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def train_step():
        loss, _ = model.training_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()

    model.train()
    train = timed(train_step, args.repeats)
    model.eval()
    with torch.no_grad():
        infer = timed(lambda: model(batch), args.repeats)
    rows.append(("classifier training", f"{args.batch / train:.0f} samples/s", f"batch {args.batch}, patch 11"))
    rows.append(("classifier inference", f"{args.batch / infer:.0f} pixels/s",
                 f"Berlin test set (461,851 px): {461851 * infer / args.batch / 60:.0f} min"))

    print("| quantity | value | note |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
