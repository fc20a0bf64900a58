"""Model speed on CPU: training and inference samples/s, peak memory, full-scene prediction pixels/s.

    python benchmarks/models.py                      # every model, a few batches each
    python benchmarks/models.py --models das2f_smallxian m3amba_fast --batches 5

Each model runs in its own subprocess so that its peak memory (resident set growth) is its own.
Models run at the authors' input geometry unless the name says otherwise; M3amba at full width is
slow on a CPU, so ``m3amba_*`` use the Houston2013 width with ``--m3amba-depth`` steps (default 1 of
9; per-step cost is uniform, so depth-9 cost is about 9x the step cost on top of CLIP). Dense models
(M3amba) count pixels: one 32x32 tile is 1,024 samples.

Full-scene prediction runs the real path (DataModule windows -> Trainer.predict -> map writer) on a
synthetic scene and is reported next to the bare forward throughput on ready-made batches: their
ratio shows whether the data pipeline is the bottleneck.
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
import torch

TINY_CLIP = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 image_size=224, patch_size=32, projection_dim=512)  # ViT-B/32 shapes, random weights


def build(name: str, args):
    """(model, batch maker, DataModule kwargs for full-scene prediction)."""
    from rsfusion.lightning_modules import BDGF, DAS2F, M3amba, TwoBranchCNN

    if name == "bdgf":
        # Stage 2 at the spec's sizes (HSI PCA 30, patch 11, guides of 64/128/128 channels; SAR with the
        # synthetic scene's 2 bands instead of Augsburg's 4),
        # reading a ready (320, H, W) feature bank: stages 1 and 1b are timed in the notes column.
        bank = Path(tempfile.mkdtemp()) / "bank.npy"
        np.save(bank, np.random.default_rng(0).random((320, args.scene, args.scene), dtype=np.float32)
                .astype(np.float16))
        model = BDGF(in_channels={"hsi": 30, "sar": 2}, num_classes=6, patch_size=11, feature_bank=str(bank),
                     feature_bank_split=[64, 128, 128])
        make = lambda b: {"hsi": torch.rand(b, 30, 11, 11), "sar": torch.rand(b, 2, 11, 11),  # noqa: E731
                          "ddpm_features": torch.rand(b, 320, 11, 11).half(), "label": torch.randint(0, 6, (b,))}
        return model, make, dict(kind="hsi_sar", patch_size=11, pca={"hsi": 30})

    if name.startswith("das2f"):
        variant = name.split("_")[1]
        model = DAS2F(in_channels={"ms": 4, "pan": 1}, num_classes=7, variant=variant, patch_size=16)
        make = lambda b: {"ms": torch.rand(b, 4, 16, 16), "pan": torch.rand(b, 1, 64, 64),  # noqa: E731
                          "label": torch.randint(0, 7, (b,))}
        return model, make, dict(kind="ms_pan", patch_size=16, normalization="minmax_global")
    if name.startswith("m3amba"):
        # Houston2013 width (dims 384) with a ViT-B/32-shaped random CLIP, on the synthetic scene's
        # 48 HSI bands so that full-scene prediction can run on it.
        model = M3amba(in_channels={"hsi": 48, "dsm": 1}, num_classes=6, patch_size=32, depth=args.m3amba_depth,
                       clip_config=TINY_CLIP, compute_guidance_output=name.endswith("faithful"))
        make = lambda b: {"hsi": torch.rand(b, 48, 32, 32), "dsm": torch.rand(b, 1, 32, 32),  # noqa: E731
                          "label": torch.randint(0, 6, (b, 32, 32))}
        return model, make, dict(kind="hsi_dsm", sampling="tile", patch_size=32, normalization="minmax")
    model = TwoBranchCNN(in_channels={"hsi": 48, "dsm": 1}, num_classes=6, width=64)
    make = lambda b: {"hsi": torch.rand(b, 48, 11, 11), "dsm": torch.rand(b, 1, 11, 11),  # noqa: E731
                      "label": torch.randint(0, 6, (b,))}
    return model, make, dict(kind="hsi_dsm", patch_size=11)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def measure(name: str, args) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model, make, scene = build(name, args)
    batch = make(args.batch_size)
    model.trainer = None
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def train_step():
        model.train()
        loss, _ = model.training_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def infer():
        model.eval()
        with torch.no_grad():
            model.predict_logits(batch)

    train_s = timed(train_step, args.batches)
    infer_s = timed(infer, args.batches)
    # throughput in pixels for dense models (a 32x32 tile is 1,024 pixels), samples otherwise
    unit = args.batch_size * (32 * 32 if model.sampling == "tile" else 1)
    row = {"model": name, "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "train_per_s": unit / train_s, "infer_per_s": unit / infer_s, "dense": model.sampling == "tile"}
    if name == "bdgf":
        row["notes"] = bdgf_stages(args)
    if scene is not None and args.scene > 0:
        row.update(predict_scene(model, scene, args))
    row["peak_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    return row


def bdgf_stages(args) -> str:
    """Stage 1 (DDPM step) and 1b (feature bank) at the spec's sizes, for the notes column."""
    from rsfusion.lightning_modules.bdgf import BDGFDiffusion
    from rsfusion.lightning_modules.bdgf_features import extract_feature_cube

    diffusion = BDGFDiffusion({"hsi": 30, "sar": 4})
    opt = torch.optim.AdamW(diffusion.denoiser.parameters(), lr=1e-4)
    x0 = torch.randn(args.batch_size, 34, 32, 32)

    def ddpm_step():
        loss = diffusion.training_loss(x0)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    step = timed(ddpm_step, 1)
    cube = {"hsi": torch.randn(30, 64, 64), "sar": torch.randn(4, 64, 64)}
    bank = timed(lambda: extract_feature_cube(diffusion.ema, diffusion.schedule, cube), 1)
    return (f"stage 1: {1 / step:.2f} it/s (batch {args.batch_size} x 32x32); "
            f"feature bank: {bank / (64 * 64) * 1e6 / 60:.1f} min/megapixel")


def predict_scene(model, scene: dict, args) -> dict:
    import lightning as L

    from rsfusion.datamodules import SyntheticDataModule
    from rsfusion.lightning_modules.outputs.maps import ClassificationMapWriter

    with tempfile.TemporaryDirectory() as root:
        dm = SyntheticDataModule(root=root, scene_height=args.scene, scene_width=args.scene,
                                 batch_size=args.batch_size, eval_batch_size=args.batch_size, **scene)
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[ClassificationMapWriter(output_dir=root)], default_root_dir=root)
        model.eval()
        start = time.perf_counter()
        trainer.predict(model, datamodule=dm, return_predictions=False)
        seconds = time.perf_counter() - start
        pixels = int(dm.scene.valid.sum())
    return {"scene_px_per_s": pixels / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["baseline", "das2f_nanjing", "das2f_smallxian",
                                                        "m3amba_fast", "m3amba_faithful", "bdgf"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--scene", type=int, default=48, help="synthetic scene side for full-scene prediction")
    parser.add_argument("--m3amba-depth", type=int, default=1)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker, args)))
        return
    rows = []
    for name in args.models:
        cmd = [sys.executable, __file__, "--worker", name, "--batch-size", str(args.batch_size),
               "--batches", str(args.batches), "--threads", str(args.threads), "--scene", str(args.scene),
               "--m3amba-depth", str(args.m3amba_depth)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{name}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"batch {args.batch_size}, {args.threads} thread(s), CPU; scene {args.scene}x{args.scene} px\n")
    print("| model | trainable params | train samples/s | inference samples/s | peak memory | "
          "full-scene pixels/s | scene / bare forward | notes |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        scene = r.get("scene_px_per_s")
        ratio = f"{100 * scene / r['infer_per_s']:.0f}%" if scene else "-"
        print(f"| {r['model']} | {r['params']:,} | {r['train_per_s']:.1f} | {r['infer_per_s']:.1f} | "
              f"{r['peak_mb']:.0f} MB | {f'{scene:,.0f}' if scene else '-'} | {ratio} | {r.get('notes', '')} |")


if __name__ == "__main__":
    main()
