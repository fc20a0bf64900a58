"""``rsfusion-compare`` end to end: two tiny configs x two seeds -> tables that match the runs' own metrics."""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from rsfusion.lightning_modules.commands.compare import mean_std, parse_config_spec
from tests.conftest import ROOT

CLASSES = ["Trees", "Grass", "Roofs", "Roads", "Water", "Bare soil"]


def _tiny(tmp_path: Path, name: str, **model_args) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    config["data"]["init_args"].update(root=str(tmp_path / "scene"), scene_height=32, scene_width=40,
                                       train_per_class=12, patch_size=5, batch_size=32)
    config["model"]["init_args"].update(width=8, **model_args)
    config["trainer"].update(max_epochs=1, enable_progress_bar=False, enable_model_summary=False)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_compare_two_configs_over_two_seeds(tmp_path):
    script = shutil.which("rsfusion-compare", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("console script 'rsfusion-compare' not installed (pip install -e .)")
    fusion, hsi_only = _tiny(tmp_path, "fusion"), _tiny(tmp_path, "hsi", use_modalities=["hsi"])
    out_dir = tmp_path / "compare"
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([script, str(fusion), f"HSI-only={hsi_only}", "--seeds", "0", "1", "--output", str(out_dir),
                          "--", "--trainer.max_epochs=2"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not (tmp_path / "runs").exists()  # the configs' default_root_dir (runs/demo) is not used
    checkpoints = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.glob("*/*/checkpoints/*.ckpt"))
    assert [c.rsplit("/", 1)[0] for c in checkpoints] == [f"{label}/seed{seed}/checkpoints" for label in
                                                          ("HSI-only", "fusion") for seed in (0, 1) for _ in (0, 1)]
    # progress bar off: full-scene prediction reports progress and ETA in the log, and its throughput
    assert "full-scene prediction: 100 % (" in out.stdout + out.stderr
    assert "1,280 pixels predicted in" in out.stdout + out.stderr  # the whole 32 x 40 scene

    rows = list(csv.DictReader((out_dir / "comparison.csv").open()))
    assert [r["config"] for r in rows] == ["fusion", "HSI-only"]
    expected_columns = ["config", "model", "seeds", "params", "trainable_params"]
    for name in ["OA", "AA", "kappa", *(f"acc_{c}" for c in CLASSES), "fit_seconds", "predict_seconds"]:
        expected_columns += [f"{name}_mean", f"{name}_std"]
    assert list(rows[0]) == expected_columns

    from rsfusion.lightning_modules import TwoBranchCNN

    for row, label in zip(rows, ["fusion", "HSI-only"]):
        assert row["seeds"] == "0 1" and row["model"] == "TwoBranchCNN"
        per_seed = {}
        for seed in (0, 1):
            run = out_dir / label / f"seed{seed}"
            metrics = [r for r in csv.DictReader((run / "metrics.csv").open()) if r.get("test/OA")]
            assert len(metrics) == 1
            val_epochs = {int(r["epoch"]) for r in csv.DictReader((run / "metrics.csv").open())
                          if r.get("val/OA")}
            assert val_epochs == {0, 1}  # the override after -- reached every run (2 epochs, not 1)
            per_seed[seed] = {k.removeprefix("test/"): 100 * float(v) for k, v in metrics[0].items()
                              if k.startswith("test/") and v}
            assert (run / "predictions" / "classification_map.tif").exists()
            assert yaml.safe_load((run / "config.yaml").read_text())["seed_everything"] == seed
        for name in ["OA", "AA", "kappa", *(f"acc_{c}" for c in CLASSES)]:
            mean, std = mean_std([per_seed[0][name], per_seed[1][name]])
            assert float(row[f"{name}_mean"]) == pytest.approx(mean, abs=1e-4), name
            assert float(row[f"{name}_std"]) == pytest.approx(std, abs=1e-4), name
        ckpt = next((out_dir / label / "seed0" / "checkpoints").glob("best-*.ckpt"))
        model = TwoBranchCNN.load_from_checkpoint(ckpt)
        assert int(row["params"]) == sum(p.numel() for p in model.parameters())
        assert float(row["fit_seconds_mean"]) > 0 and float(row["predict_seconds_mean"]) > 0
    assert int(rows[0]["params"]) > int(rows[1]["params"])  # the HSI-only model has no DSM branch
    # different seeds train different models (otherwise the std would be meaningless)
    runs = list(csv.DictReader((out_dir / "runs.csv").open()))
    assert len(runs) == 4 and runs[0]["OA"] != runs[1]["OA"]
    assert [r["data_seed"] for r in runs] == [r["seed"] for r in runs] == ["0", "1", "0", "1"]  # splits follow

    markdown = (out_dir / "comparison.md").read_text().splitlines()
    assert markdown[0].startswith("| config | model | params | OA (%) | AA (%) | kappa (x100) | Trees |")
    assert len(markdown) == 4 and markdown[2].startswith("| `fusion` | TwoBranchCNN |")
    assert f"{float(rows[0]['OA_mean']):.2f} ± {float(rows[0]['OA_std']):.2f}" in markdown[2]
    assert (out_dir / "maps.png").read_bytes()[:4] == b"\x89PNG"


def test_each_seed_runs_in_its_own_folder_under_the_output(tmp_path):
    from rsfusion.lightning_modules.commands.cli import RSFusionCLI, cli_kwargs
    from rsfusion.lightning_modules.commands.compare import run_args

    config = _tiny(tmp_path, "fusion")
    folders = set()
    for seed in (7, 8):
        cli = RSFusionCLI(**cli_kwargs(), args=run_args(config, tmp_path / "out", "CNN", seed, []), run=False)
        assert cli.config["seed_everything"] == seed and cli.datamodule.hparams.seed == seed
        assert cli.trainer.log_dir == str(tmp_path / "out" / "CNN" / f"seed{seed}")
        folders.add(cli.trainer.log_dir)
    assert len(folders) == 2


def test_config_specs_and_statistics(tmp_path):
    demo = ROOT / "configs" / "demo.yaml"
    assert parse_config_spec(str(demo)) == ("demo", demo)
    assert parse_config_spec(f"CNN={demo}") == ("CNN", demo)
    with pytest.raises(ValueError, match="config: .*missing.yaml does not exist"):
        parse_config_spec(str(tmp_path / "missing.yaml"))
    assert mean_std([1.0]) == (1.0, 0.0)
    mean, std = mean_std([90.0, 92.0, 97.0])
    assert mean == pytest.approx(93.0) and std == pytest.approx(np.std([90, 92, 97], ddof=1))
