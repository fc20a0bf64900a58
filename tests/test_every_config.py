"""Every shipped config, end to end through the console-script entry, on a tiny faithful copy of its data.

As a user types it: ``lightning fit --config configs/<x>.yaml --data.init_args.root <copy>`` (fit,
then test of the best checkpoint and the full-scene map). Shrinks are CLI overrides only: one epoch of
two batches, tiny widths, a tiny random CLIP tower for M3amba, a few DDPM steps for BDGF. The data
path, files and DataModule options of each config are untouched.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml

from rsfusion.lightning_modules.commands.cli import main
from tests.conftest import CONFIGS, E2E_TRAINER, redirect_outputs
from tests.data import releases

RUN = [c.stem for c in sorted(CONFIGS.glob("*.yaml")) if not c.stem.endswith("_template")]

# config -> the copy it runs on (a release copy of tests/data/releases.py, or a synthetic scene kind)
DATA = {
    "baseline_augsburg": "augsburg_official", "m3amba_augsburg": "augsburg_masks",
    "bdgf_augsburg": "augsburg_official_v5", "bdgf_pretrain_augsburg": "augsburg_official",
    "baseline_berlin": "berlin_official", "bdgf_berlin": "berlin_ouc",
    "baseline_houston2013": "houston2013_mat", "m3amba_houston2013": "houston2013_contest",
    "baseline_muufl": "muufl", "m3amba_muufl": "muufl_v73",
    "baseline_trento": "trento", "m3amba_trento": "trento_v73",
    "baseline_nanjing": "mspan", "das2f_nanjing": "mspan", "das2f_xian": "mspan",
    "demo": "synthetic", "baseline_hsi_only_tiles_synthetic": "synthetic", "baseline_ms_only_synthetic": "synthetic",
    "bdgf_synthetic": "synthetic", "bdgf_pretrain_synthetic": "synthetic", "das2f_synthetic": "synthetic",
    "m3amba_synthetic": "synthetic",
}
STAGE_1 = ("bdgf_pretrain_augsburg", "bdgf_pretrain_synthetic")  # DDPM pretraining alone: no classes to test
TINY_DDPM = json.dumps(dict(base_channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[],
                            stem_channels=8,
                            norm_groups=4, dropout=0.0, num_timesteps=50))
TINY_CLIP = json.dumps(dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                            image_size=32, patch_size=16, projection_dim=8))
# model class -> shrink (CLI overrides): same architecture family, tiny sizes
MODEL = {
    "TwoBranchCNN": ["--model.init_args.width", "8"],
    "M3amba": ["--model.init_args.dims", "16", "--model.init_args.depth", "1", "--model.init_args.d_state", "4",
               "--model.init_args.ssm_ratio", "1.0", "--model.init_args.clip_config", TINY_CLIP],
    "DAS2F": ["--model.init_args.d_model", "16", "--model.init_args.d_state", "4", "--model.init_args.dt_rank", "4",
              "--model.init_args.head_hidden", "32"],
    "BDGF": ["--model.init_args.ddpm", TINY_DDPM, "--model.init_args.pretrain_steps", "2",
             "--model.init_args.pretrain_batch_size", "4", "--model.init_args.pretrain_tile", "16",
             "--model.init_args.feature_timesteps", "[5, 15]", "--model.init_args.feature_levels", "[0, 1]",
             "--model.init_args.guide_levels", '{"cnn": 0, "mamba": 1, "transformer": 1}',
             "--model.init_args.feature_tile", "16", "--model.init_args.feature_overlap", "8",
             "--model.init_args.dim", "16", "--model.init_args.proj_dim", "16",
             "--model.init_args.mamba_kwargs", '{"d_state": 4}', "--model.init_args.transformer_kwargs", '{"heads": 2}',
             "--model.init_args.warmup_steps", "1"],
    "BDGFPretrain": ["--model.init_args.ddpm", TINY_DDPM, "--data.init_args.pretrain_tiles",
                     '{"tile": 16, "per_epoch": 8}', "--trainer.max_steps", "2",
                     "--data.init_args.batch_size", "4", "--trainer.check_val_every_n_epoch", "1"],
}
SYNTHETIC = ["--data.init_args.scene_height", "32", "--data.init_args.scene_width", "36",
             "--data.init_args.train_per_class", "10"]


def run_args(name: str, root: Path, out: Path) -> list[str]:
    """``fit --config <config> --data.init_args.root <root>`` plus the documented shrink."""
    config = CONFIGS / f"{name}.yaml"
    model = yaml.safe_load(config.read_text())["model"]["class_path"].rsplit(".", 1)[-1]
    extra = SYNTHETIC if DATA[name] == "synthetic" else []
    return ["fit", "--config", str(redirect_outputs(config, out)), "--data.init_args.root", str(root),
            *E2E_TRAINER, *MODEL[model], *extra]


def scene_shape(name: str) -> tuple[int, int]:
    if DATA[name] == "synthetic":
        return 32, 36
    return releases.SHAPES[next(d for d in releases.SHAPES if DATA[name].startswith(d))]


def test_every_config_has_a_copy():
    assert sorted(DATA) == sorted(RUN), "a new config needs its data copy (and shrink) here"


@pytest.mark.slow
@pytest.mark.parametrize("name", RUN)
def test_config_end_to_end(name, tmp_path, tmp_path_factory, capsys):
    copy = DATA[name]
    root = tmp_path / "data" if copy == "synthetic" else releases.write_copy(copy, tmp_path / copy)
    out = tmp_path / "runs"
    main(run_args(name, root, out))
    printed = capsys.readouterr().out
    run = out / "version_0"
    metrics = list(csv.DictReader((run / "metrics.csv").open()))
    if name in STAGE_1:  # judged by its loss
        losses = [float(r["train/loss"]) for r in metrics if r.get("train/loss")]
        assert len(losses) == 2 and all(np.isfinite(losses))
        assert [float(r["val/ddpm_loss"]) for r in metrics if r.get("val/ddpm_loss")]
        assert (run / "checkpoints" / "last.ckpt").is_file()
        # a DDPM has nothing to map: predict with its checkpoint is refused in one line
        with pytest.raises(SystemExit) as refused:
            main(["predict", *run_args(name, root, tmp_path / "predict")[1:5], "--ckpt_path",
                  str(run / "checkpoints" / "last.ckpt")])
        assert refused.value.code == 2
        message = capsys.readouterr().err.strip().splitlines()[-1]
        assert message == ("error: BDGFPretrain has no classification output to map (BDGFPretrain: give its "
                           "checkpoint to BDGF as model.init_args.ddpm_checkpoint)")
        return
    for key in ("OA", "AA", "kappa"):
        values = [float(r[f"test/{key}"]) for r in metrics if r.get(f"test/{key}")]
        assert len(values) == 1, f"test/{key} logged {len(values)} times"
        low = -1.0 if key == "kappa" else 0.0  # kappa is negative for a worse-than-chance model (1 epoch)
        assert low <= values[0] <= 1.0
        assert f"test/{key}" in printed
    with rasterio.open(run / "predictions" / "classification_map.tif") as src:
        assert src.shape == scene_shape(name)
        classes = src.read(1)
    assert classes.min() >= 1  # every pixel of these scenes is valid: every one is classified
    if copy == "houston2013_contest":  # the map takes the contest LiDAR's transform (no CRS)
        with rasterio.open(root / "2013_IEEE_GRSS_DF_Contest_LiDAR.tif") as lidar, \
                rasterio.open(run / "predictions" / "classification_map.tif") as src:
            assert src.transform == lidar.transform and src.crs is None
    if copy != "synthetic":
        card = json.loads((run / "split_card.json").read_text())
        assert card["total"]["test"] == int((releases.expected_maps(copy)[2] > 0).sum())
