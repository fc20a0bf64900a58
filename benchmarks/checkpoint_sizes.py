"""Checkpoint sizes: a ``last.ckpt`` of each model at the authors' sizes, after one optimiser step.

    python benchmarks/checkpoint_sizes.py

Each model takes one AdamW step on a random batch under a Lightning Trainer, which then writes its
checkpoint as ``fit`` does (weights, optimiser moments, hyper-parameters). M3amba runs twice with a
ViT-B/32-shaped CLIP tower (random weights, so nothing is downloaded): built from ``clip_config``
(stored in the checkpoint, as every M3amba checkpoint was before the tower became a recorded source)
and loaded from a ``save_pretrained`` folder as ``clip_model`` (recorded: source, revision, SHA-256).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from rsfusion.lightning_modules import BDGF, DAS2F, M3amba, TwoBranchCNN

VIT_B32 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               image_size=224, patch_size=32, projection_dim=512)


def models(work: Path):
    """(row name, model, one training batch) at the authors' sizes."""
    tower = work / "clip-vit-b32"
    CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_B32)).save_pretrained(tower)
    houston = dict(in_channels={"hsi": 144, "lidar": 1}, num_classes=15, patch_size=32)
    tile = {"hsi": torch.rand(1, 144, 32, 32), "lidar": torch.rand(1, 1, 32, 32),
            "label": torch.randint(0, 15, (1, 32, 32))}
    yield "M3amba Houston2013, tower stored (before)", M3amba(**houston, clip_config=VIT_B32), tile
    yield "M3amba Houston2013, tower recorded (after)", M3amba(**houston, clip_model=str(tower)), tile
    yield "DAS2F nanjing, MS 4 + PAN 1, 7 classes", DAS2F(in_channels={"ms": 4, "pan": 1}, num_classes=7,
                                                        variant="nanjing", patch_size=16), \
        {"ms": torch.rand(2, 4, 16, 16), "pan": torch.rand(2, 1, 64, 64), "label": torch.randint(0, 7, (2,))}
    bank = work / "bank.npy"
    np.save(bank, np.zeros((320, 16, 16), dtype=np.float16))
    bdgf = BDGF(in_channels={"hsi": 30, "sar": 4}, num_classes=7, patch_size=11, feature_bank=str(bank),
                feature_bank_split=[64, 128, 128])
    bdgf.on_fit_start = lambda: None  # the batch below carries the bank's patches: no scene to read it for
    yield "BDGF Augsburg (PCA 30 + SAR 4), bank given", bdgf, \
        {"hsi": torch.rand(2, 30, 11, 11), "sar": torch.rand(2, 4, 11, 11),
         "ddpm_features": torch.rand(2, 320, 11, 11).half(), "label": torch.randint(0, 7, (2,))}
    yield "TwoBranchCNN Houston2013", TwoBranchCNN(in_channels={"hsi": 144, "lidar": 1}, num_classes=15), \
        {"hsi": torch.rand(2, 144, 11, 11), "lidar": torch.rand(2, 1, 11, 11), "label": torch.randint(0, 15, (2,))}


def checkpoint_size(model, batch, path: Path) -> tuple[int, int]:
    """(bytes of the checkpoint, parameters in its state_dict)."""
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=0)
    trainer.fit(model, DataLoader([batch], batch_size=None))
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    return path.stat().st_size, sum(v.numel() for v in state.values() if v.is_floating_point())


def main() -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = [(name, *checkpoint_size(model, batch, work / "last.ckpt"))
                for name, model, batch in models(work)]
    print("| model | checkpoint | values stored |\n|---|---|---|")
    for name, size, values in rows:
        print(f"| {name} | {size / 2**20:,.1f} MiB | {values / 1e6:,.2f} M |")


if __name__ == "__main__":
    main()
