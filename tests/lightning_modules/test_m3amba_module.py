"""The M3amba LightningModule: dense tiles, the recipe defaults, CLIP errors, a CLI smoke run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rsfusion.datamodules.errors import InputError
from rsfusion.lightning_modules import M3amba
from tests.conftest import TINY_M3AMBA as TINY
from tests.conftest import tiny_config


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


def _labelled_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 3, (2, 8, 8), generator=gen)
    label[:, :3] = -1  # unlabelled tile pixels (IGNORE_INDEX)
    return {"hsi": torch.randn(2, 5, 8, 8, generator=gen), "dsm": torch.randn(2, 1, 8, 8, generator=gen),
            "label": label}


@pytest.mark.parametrize("options", [dict(class_weights=[0.2, 1.0, 3.0]), dict(label_smoothing=0.3),
                                     dict(class_weights=[2.0, 0.5, 1.0], label_smoothing=0.1)])
def test_training_loss_honours_class_weights_and_label_smoothing_on_every_head(options):
    import torch.nn.functional as F

    torch.manual_seed(0)
    plain = _model(ce_weights=(0.2, 0.3, 0.5), consistency_weight=0.25)
    torch.manual_seed(0)
    model = _model(ce_weights=(0.2, 0.3, 0.5), consistency_weight=0.25, **options)
    batch = _labelled_batch()
    heads = model.heads(batch)
    weight = torch.tensor(options["class_weights"]) if "class_weights" in options else None
    ces = [F.cross_entropy(h, batch["label"], weight=weight, ignore_index=-1,
                           label_smoothing=options.get("label_smoothing", 0.0)) for h in heads]
    consistency = sum(1 - F.cosine_similarity(h, heads[2], dim=1).mean() for h in heads[:2])
    expected = 0.2 * ces[0] + 0.3 * ces[1] + 0.5 * ces[2] + 0.25 * consistency
    loss, terms = model.training_loss(batch)
    torch.testing.assert_close(loss, expected)
    for name, ce in zip(("ce_hsi", "ce_aux", "ce_fused"), ces):
        torch.testing.assert_close(terms[name], ce)
    unweighted = plain.training_loss(batch)[0]
    assert torch.equal(plain.heads(batch)[2], heads[2])  # same weights: only the loss options differ
    assert abs(float((loss - unweighted).detach())) > 1e-3
    # val/loss (FusionClassifier.cross_entropy on the fused head) uses the same options
    torch.testing.assert_close(model.cross_entropy(heads[2], batch["label"]), ces[2])


@pytest.mark.parametrize("faithful", [False, True])
def test_guidance_dt_projs_and_ds_get_no_gradient_in_either_mode(faithful):
    torch.manual_seed(0)
    model = _model(compute_guidance_output=faithful, depth=2)
    model.training_loss(_labelled_batch())[0].backward()
    no_grad = {n for n, p in model.net.named_parameters() if p.requires_grad and p.grad is None}
    expected = {f"layers_{s}.{i}.op.ssm_guide.{p}" for s in ("hsi", "aux") for i in range(2)
                for p in ("Ds", "dt_projs_weight", "dt_projs_bias")}
    assert no_grad == expected
    assert model.has_unused_parameters


def _lean_fit(tmp_path: Path, clip: Path) -> Path:
    from rsfusion.lightning_modules.commands.cli import main

    main(["fit", "--config", "configs/m3amba_synthetic.yaml", "--data.init_args.root", str(tmp_path / "scene"),
          "--data.init_args.scene_height", "24", "--data.init_args.scene_width", "24",
          "--data.init_args.train_per_class", "6", "--data.init_args.patch_size", "16",
          "--data.init_args.train_stride", "8", "--data.init_args.batch_size", "4", "--model.init_args.dims", "16",
          "--model.init_args.depth", "1", "--model.init_args.d_state", "2", "--model.init_args.clip_model",
          str(clip), "--model.init_args.clip_config", "null", "--trainer.max_epochs", "1",
          "--trainer.limit_train_batches", "2",
          "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false", "--map_after_fit", "false",
          "--trainer.default_root_dir", str(tmp_path / "runs")])
    return tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt"


def _save_tower(path: Path, seed: int) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**{**TINY["clip_config"], "image_size": 16})).save_pretrained(path)


def test_a_checkpoint_records_the_pretrained_tower_instead_of_storing_it(tmp_path, monkeypatch, capsys):
    import hashlib

    from rsfusion.lightning_modules.commands.cli import main
    from tests.conftest import ROOT

    monkeypatch.chdir(ROOT)
    clip = tmp_path / "clip"
    _save_tower(clip, seed=1)
    ckpt_path = _lean_fit(tmp_path, clip)
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert not [k for k in ckpt["state_dict"] if k.startswith("net.clip.")]
    assert "net.linear_embed_hsi.weight" in ckpt["state_dict"]  # trainable parameters stay
    record = ckpt["frozen_weights"]["net.clip."]
    assert record["sha256"] == hashlib.sha256((clip / "model.safetensors").read_bytes()).hexdigest()
    assert record["source"] == str(clip) and record["file"] == "model.safetensors"

    # loading reads the tower again: the loaded model equals the trained one, tower included
    model = M3amba.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    from transformers import CLIPVisionModelWithProjection
    tower = CLIPVisionModelWithProjection.from_pretrained(clip).state_dict()
    assert all(torch.equal(v, tower[k]) for k, v in model.net.clip.state_dict().items())

    # a changed or missing source: one line naming it, for the console script's test and for export
    _save_tower(clip, seed=2)
    test = ["test", "--config", str(ckpt_path.parents[1] / "config.yaml"), "--ckpt_path", str(ckpt_path),
            "--trainer.default_root_dir", str(tmp_path / "test")]
    with pytest.raises(SystemExit) as exit_info:
        main(test)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error: ") and f"frozen CLIP tower {str(clip)!r}" in message
    assert record["sha256"][:12] in message and "give the original weights" in message
    import shutil
    shutil.rmtree(clip)
    with pytest.raises(SystemExit):
        main(["export", "--ckpt_path", str(ckpt_path), "--output", str(tmp_path / "m.pt2")])
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error: ") and "not found locally" in message and str(clip) in message
