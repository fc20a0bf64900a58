"""The M3amba LightningModule: dense tiles, the recipe defaults, CLIP errors, a CLI smoke run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rsfusion.datamodules.io import InputError
from rsfusion.lightning_modules import M3amba
from tests.conftest import tiny_config

TINY_CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                 patch_size=8, projection_dim=8)
TINY = dict(dims=16, depth=1, d_state=2, ssm_ratio=1.0, drop_path_rate=0.0, clip_config=TINY_CLIP)


def _model(**kw):
    return M3amba(in_channels={"hsi": 5, "dsm": 1}, num_classes=3, patch_size=8, **{**TINY, **kw})


def test_fused_head_predicts_and_the_loss_ignores_unlabelled_pixels():
    torch.manual_seed(0)
    model = _model()
    batch = {"hsi": torch.randn(2, 5, 8, 8), "dsm": torch.randn(2, 1, 8, 8),
             "label": torch.full((2, 8, 8), -1, dtype=torch.long)}
    batch["label"][:, 2:4, 3:6] = torch.tensor([0, 1, 2])
    heads = model.heads(batch)
    assert torch.equal(model(batch), heads[2]) and model(batch).shape == (2, 3, 8, 8)
    loss, terms = model.training_loss(batch)
    flipped = dict(batch, label=batch["label"].clone())
    assert set(terms) == {"ce_hsi", "ce_aux", "ce_fused", "consistency"}
    # relabelling only the labelled pixels changes the loss; unlabelled pixels never count
    flipped["label"][batch["label"] >= 0] = (batch["label"][batch["label"] >= 0] + 1) % 3
    assert not torch.isclose(model.training_loss(flipped)[0], loss)
    loss.backward()
    assert model.net.head_fused.conv.weight.grad.abs().sum() > 0


def test_optimizer_has_no_decay_on_a_logs_ds_and_norms():
    model = _model()
    groups = model.parameter_groups(0.05)
    no_decay = {id(p) for p in groups[1]["params"]}
    for name, p in model.net.named_parameters():
        if not name.startswith("clip.") and ("A_logs" in name or name.endswith("Ds") or "norm" in name):
            assert id(p) in no_decay, name
    assert all(not p.requires_grad for p in model.net.clip.parameters())
    grouped = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in grouped for p in model.net.clip.parameters())


def test_missing_clip_weights_are_a_one_line_input_error(tmp_path):
    with pytest.raises(InputError, match=r"clip_model: CLIP weights .*nowhere.* not found locally") as err:
        M3amba(in_channels={"hsi": 5, "dsm": 1}, num_classes=3, patch_size=8, clip_model=str(tmp_path / "nowhere"),
               **{k: v for k, v in TINY.items() if k != "clip_config"})
    assert "\n" not in str(err.value)


def test_pixel_sampling_is_refused():
    with pytest.raises(InputError, match="needs data.sampling='tile'"):
        _model(dense=False)


def test_fit_smoke_run_through_the_console_script(tmp_path):
    path = tiny_config(tmp_path, "m3amba_synthetic", dict(scene_height=40, scene_width=40, train_per_class=10,
                                                          patch_size=16, batch_size=8), TINY,
                       max_epochs=1, limit_train_batches=2)
    out = subprocess.run([str(Path(sys.executable).parent / "rsfusion"), "fit", "--config", str(path)], cwd=tmp_path,
                         capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "test/OA" in out.stdout
    assert next((tmp_path / "runs").glob("version_0/predictions/classification_map.tif")).stat().st_size > 0
