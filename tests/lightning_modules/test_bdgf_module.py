"""BDGF end to end: DDPM pre-training, feature-bank cache, guided classifier, configs."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import yaml

from rsfusion.datamodules.benchmarks import AugsburgDataModule, BerlinDataModule
from rsfusion.datamodules.errors import InputError
from rsfusion.datamodules.feature_bank import array_digest, cache_key, load_bank
from rsfusion.datamodules.pretrain_tiles import RandomSceneTiles
from rsfusion.datamodules.raster import RasterDataModule
from rsfusion.datamodules.synthetic import ensure_scene
from rsfusion.lightning_modules import BDGF, BDGFPretrain
from rsfusion.lightning_modules.bdgf import (
    FEATURE_KEY,
    BDGFDiffusion,
    load_ddpm_payload,
    payload_digest,
    pretrain_ddpm,
    resolve_ddpm_config,
)
from tests.conftest import ROOT, TINY_BDGF_NET, TINY_DDPM, tiny_bdgf_config

CONFIGS = ["bdgf_synthetic", "bdgf_augsburg", "bdgf_pretrain_augsburg", "bdgf_pretrain_synthetic", "bdgf_berlin",
           "bdgf_yellow_river_template", "bdgf_lcz_hk_template"]
TINY_NET = TINY_BDGF_NET
CHANNELS = {"hsi": 6, "sar": 2}
PATCH = 5


@pytest.fixture(scope="module")
def scene_paths(tmp_path_factory):
    return ensure_scene(tmp_path_factory.mktemp("bdgf_scene"), "hsi_sar", seed=0, height=16, width=16, bands=6,
                        train_per_class=6)


@pytest.fixture
def make_dm(scene_paths):
    """A fresh, set-up DataModule over the tiny scene (each has its own Scene object)."""
    def make(**kwargs):
        dm = RasterDataModule({"hsi": str(scene_paths["hsi"]), "sar": str(scene_paths["sar"])},
                              train_labels=str(scene_paths["train"]), test_labels=str(scene_paths["test"]),
                              val_labels=str(scene_paths["val"]), **{"patch_size": PATCH, "batch_size": 8, **kwargs})
        dm.setup("fit")
        return dm
    return make


def tiny_bdgf(**kwargs) -> BDGF:
    cfg = dict(in_channels=CHANNELS, num_classes=6, patch_size=PATCH, ddpm=TINY_DDPM, feature_levels=[0, 1],
               guide_levels={"cnn": 0, "mamba": 1, "transformer": 1}, feature_timesteps=[5], feature_tile=8,
               feature_overlap=4, pretrain_steps=2, pretrain_batch_size=2, pretrain_tile=8, **TINY_NET)
    cfg.update(kwargs)
    return BDGF(**cfg)


def unpadded(dm) -> dict[str, np.ndarray]:
    p = dm.scene.pad
    return {n: dm.scene.data[n][:, p:-p, p:-p] for n in CHANNELS}


@pytest.fixture(scope="module")
def ddpm_files(tmp_path_factory, scene_paths):
    """Two tiny DDPMs pre-trained on the scene with different seeds (2 steps each)."""
    folder = tmp_path_factory.mktemp("ddpms")
    dm = RasterDataModule({"hsi": str(scene_paths["hsi"]), "sar": str(scene_paths["sar"])},
                          train_labels=str(scene_paths["train"]), test_labels=str(scene_paths["test"]),
                          val_labels=str(scene_paths["val"]), patch_size=PATCH)
    dm.load()
    paths = []
    for seed in (0, 1):
        payload = pretrain_ddpm(unpadded(dm), TINY_DDPM, steps=2, batch_size=2, tile=8, seed=seed)
        torch.save(payload, folder / f"ddpm{seed}.pt")
        paths.append(folder / f"ddpm{seed}.pt")
    return paths


def test_pretraining_is_deterministic_and_seed_dependent(ddpm_files, make_dm):
    again = pretrain_ddpm(unpadded(make_dm()), TINY_DDPM, steps=2, batch_size=2, tile=8, seed=0)
    first, second = (load_ddpm_payload(p) for p in ddpm_files)
    assert payload_digest(again) == payload_digest(first) != payload_digest(second)
    assert again["modality_channels"] == CHANNELS and again["config"]["base_channels"] == 8


def test_bank_cache_key_follows_the_ddpm(tmp_path, ddpm_files, make_dm):
    cache = tmp_path / "cache"
    dms = [make_dm() for _ in range(3)]
    models = [tiny_bdgf(ddpm_checkpoint=str(p), cache_dir=str(cache))
              for p in (ddpm_files[0], ddpm_files[1], ddpm_files[0])]
    for model, dm in zip(models, dms):
        model.prepare_feature_bank(dm)
    keys = [Path(m.feature_bank_path).stem for m in models]
    assert keys[0] != keys[1] and keys[0] == keys[2]
    assert sorted(p.stem for p in (cache / "banks").glob("*.npy")) == sorted({keys[0], keys[1]})
    banks = [dm.scene.data[FEATURE_KEY] for dm in dms]
    # 8 + 16 channels of decoder levels 0 and 1, reflect-padded like the raw modalities
    assert banks[0].shape == (24, 16 + 2 * PATCH, 16 + 2 * PATCH) and banks[0].dtype == np.float16
    assert not np.array_equal(banks[0], banks[1])
    np.testing.assert_array_equal(banks[0], banks[2])
    assert not (cache / "ddpm").exists()  # a given checkpoint is never pre-trained or cached again


def test_truncated_bank_is_detected_and_rebuilt(tmp_path, ddpm_files, make_dm):
    cache = tmp_path / "cache"
    first_dm = make_dm()
    tiny_bdgf(ddpm_checkpoint=str(ddpm_files[0]), cache_dir=str(cache)).prepare_feature_bank(first_dm)
    (path,) = (cache / "banks").glob("*.npy")
    good = np.load(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a half-written file under the final name
    cube, reason = load_bank(path, good.shape)
    assert cube is None and "truncated" in reason
    dm = make_dm()
    with pytest.warns(UserWarning, match="unusable .*truncated.*rebuilding"):
        tiny_bdgf(ddpm_checkpoint=str(ddpm_files[0]), cache_dir=str(cache)).prepare_feature_bank(dm)
    np.testing.assert_array_equal(np.load(path), good)
    np.testing.assert_array_equal(dm.scene.data[FEATURE_KEY], first_dm.scene.data[FEATURE_KEY])


def _coded_bank(path: Path, channels: int = 3, size: int = 16) -> np.ndarray:
    c, y, x = np.meshgrid(np.arange(channels), np.arange(size), np.arange(size), indexing="ij")
    cube = (c * 256 + y * size + x).astype(np.float32)  # integers < 2048: exact in fp16
    np.save(path, cube)
    return cube


def test_feature_bank_file_is_used_as_given(tmp_path, make_dm):
    cube = _coded_bank(tmp_path / "bank.npy")
    model = tiny_bdgf(feature_bank=str(tmp_path / "bank.npy"), feature_bank_split=[1, 2], cache_dir=str(tmp_path / "c"))
    assert model.guide_slices == {"cnn": (0, 1), "mamba": (1, 3), "transformer": (1, 3)}
    assert model.net.branches["cnn"].guide_proj[0].in_channels == 1
    assert model.net.branches["transformer"].guide_proj.in_channels == 2
    dm = make_dm()
    model.prepare_feature_bank(dm)
    data = dm.train_dataset
    idx = [0, 3, len(data) - 1]
    batch = data.__getitems__(idx)
    centre = (PATCH - 1) // 2
    expected = cube[:, data.rows[idx], data.cols[idx]].T
    np.testing.assert_array_equal(batch[FEATURE_KEY][:, :, centre, centre].float().numpy(), expected)
    guides = model._guides(batch)
    assert torch.equal(guides["cnn"], batch[FEATURE_KEY][:, :1].float())
    assert torch.equal(guides["mamba"], batch[FEATURE_KEY][:, 1:3].float())
    assert not (tmp_path / "c").exists()  # no DDPM, no cache
    whole = tiny_bdgf(feature_bank=str(tmp_path / "bank.npy"))
    assert all(s == (0, 3) for s in whole.guide_slices.values())


@pytest.mark.parametrize("ml", ["none", "prob", "feat", "both"])
def test_each_mutual_learning_switch_trains_a_step(tmp_path, make_dm, ml):
    np.save(tmp_path / "bank.npy", np.random.default_rng(0).standard_normal((5, 16, 16)).astype(np.float32))
    torch.manual_seed(0)
    model = tiny_bdgf(feature_bank=str(tmp_path / "bank.npy"), ml=ml)
    dm = make_dm()
    model.prepare_feature_bank(dm)
    batch = next(iter(dm.train_dataloader()))
    loss, terms = model.training_loss(batch)
    ml_part = {"none": 0.0, "prob": terms["prob_kl"] + 0.1 * terms["entropy_gap"], "feat": 0.5 * terms["feat_cos"],
               "both": terms["prob_kl"] + 0.1 * terms["entropy_gap"] + 0.5 * terms["feat_cos"]}[ml]
    assert torch.isfinite(loss) and float(terms["ml_weight"]) == 1.0  # no trainer: warm-up over
    assert torch.allclose(loss, terms["ce"] + ml_part)
    assert terms["prob_kl"].detach() > 0 and terms["feat_cos"].detach() > 0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.net.named_parameters()}
    loss.backward()
    for b in ("cnn", "mamba", "transformer"):
        grads = [p.grad for p in model.net.branches[b].guide_proj.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), b  # the guide is used and trained
    opt.step()
    changed = [n for n, p in model.net.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith("branches.mamba.guide_proj") for n in changed)
    assert any(n.startswith("projectors.") for n in changed) == (ml in ("feat", "both"))


def _one_easy_modality(easy: str, channels: dict[str, int], count: int = 256, size: int = 8) -> torch.Tensor:
    """Tiles where ``easy`` is one constant per tile in all its bands (+ 1 % noise), the other white noise."""
    g = torch.Generator().manual_seed(0)
    fields = {}
    for name, bands in channels.items():
        if name == easy:
            fields[name] = (torch.randn(count, 1, 1, 1, generator=g).expand(count, bands, size, size)
                            + 0.01 * torch.randn(count, bands, size, size, generator=g))
        else:
            fields[name] = torch.randn(count, bands, size, size, generator=g)
    return torch.cat([fields[n] for n in channels], dim=1)


@pytest.mark.parametrize("easy, masked_target", [("sar", "x0"), ("hsi", "x0"), ("sar", "none")])
def test_controller_masks_the_easier_modality_more_window_after_window(easy, masked_target):
    channels = {"hsi": 3, "sar": 3}  # equal band counts: only the data makes one modality easier
    momentum, window, eta, windows, transient = 0.8, 12, 0.05, 8, 1
    config = {**TINY_DDPM, "mask_window": window, "mask_ema_momentum": momentum, "mask_step_size": eta,
              "masked_target": masked_target}
    torch.manual_seed(0)
    model = BDGFDiffusion(channels, config)
    optimizer = torch.optim.Adam(model.denoiser.parameters(), lr=1e-2)
    data, g = _one_easy_modality(easy, channels), torch.Generator().manual_seed(1)
    # the spec's rule, written out here: EMA (momentum 0.99 there) of each modality's epsilon loss
    # where it is visible; every window r_m = EMA_m(window start) / EMA_m(now), rho = r_hsi / r_sar,
    # p_hsi += eta (rho - 1), p_sar += eta (1 / rho - 1) (two modalities: "the others" = the other)
    ema, start, in_window, updates = None, None, 0, []
    probs = torch.tensor([0.3, 0.1], dtype=torch.float64)
    for _ in range(windows * window + 1):
        out = model.training_loss(data[torch.randint(0, len(data), (16,), generator=g)], g)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        seen = out["unmasked_modality_losses"].double()
        assert torch.isfinite(seen).all()  # in these batches of 16 each modality is visible somewhere
        if ema is None:
            ema, start = seen.clone(), seen.clone()
            continue
        ema = momentum * ema + (1 - momentum) * seen
        in_window += 1
        if in_window == window:
            r = start / ema
            rho = torch.stack([r[0] / r[1], r[1] / r[0]])
            new = (probs + eta * (rho - 1)).clamp(0.05, 0.5)
            actual = torch.tensor(list(model.masking.probabilities.values()), dtype=torch.float64)
            torch.testing.assert_close(actual, new, rtol=0, atol=1e-9)
            updates.append(new - probs)
            probs, start, in_window = new, ema.clone(), 0
    assert len(updates) == windows and int(model.masking.num_updates) == windows
    easy_index = list(channels).index(easy)
    # after the first window (both modalities first learn to predict about 0), the easier modality's
    # loss falls faster, so it is hidden more and the other one less, window after window
    for step in updates[transient:]:
        assert step[easy_index] > 0 > step[1 - easy_index], updates
    assert probs[easy_index] > (0.3, 0.1)[easy_index] + 0.02


def test_ddpm_cache_key_covers_the_objective(tmp_path, make_dm):
    """A DDPM cached by the pre-fix code (old key) is not reused; masked_target selects its own DDPM."""
    cache = tmp_path / "cache"
    dm = make_dm()
    data = unpadded(dm)
    stale = pretrain_ddpm(data, TINY_DDPM, steps=1, batch_size=2, tile=8)
    stale["format"] = "rsfusion-bdgf-ddpm-v1"  # as the pre-fix code wrote it
    del stale["config"]["masked_target"], stale["objective"]
    old_config = {k: v for k, v in resolve_ddpm_config(TINY_DDPM).items() if k != "masked_target"}
    recipe = {"steps": 2, "batch_size": 2, "lr": 1e-4, "tile": 8, "ema_decay": 0.999, "grad_clip": 1.0, "seed": 0}
    old_key = cache_key(kind="ddpm", data=array_digest(data), config=old_config, recipe=recipe,
                        format="rsfusion-bdgf-ddpm-v1")  # how the DDPM cache was keyed before the fix
    (cache / "ddpm").mkdir(parents=True)
    torch.save(stale, cache / "ddpm" / f"{old_key}.pt")

    model = tiny_bdgf(cache_dir=str(cache))
    model.prepare_feature_bank(dm)
    assert model.bank_provider.sources["DDPM"] == "built"  # pre-trained again, the stale file left alone
    payload = model.bank_provider.payload
    assert payload["config"]["masked_target"] == "x0" and payload["objective"] == 2
    files = {p.stem for p in (cache / "ddpm").glob("*.pt")}
    assert len(files) == 2 and old_key in files

    none = tiny_bdgf(cache_dir=str(cache), ddpm={**TINY_DDPM, "masked_target": "none"})
    none.prepare_feature_bank(make_dm())
    assert none.bank_provider.sources["DDPM"] == "built" and len(list((cache / "ddpm").glob("*.pt"))) == 3
    again = tiny_bdgf(cache_dir=str(cache))
    again.prepare_feature_bank(make_dm())
    assert again.bank_provider.sources == {"DDPM": "cache", "bank": "cache"}
    assert payload_digest(again.bank_provider.payload) == payload_digest(model.bank_provider.payload)

    # a pre-fix DDPM given explicitly still loads, with a warning
    with pytest.warns(UserWarning, match="pre-trained before the stage-1 fix"):
        assert load_ddpm_payload(cache / "ddpm" / f"{old_key}.pt")["format"] == "rsfusion-bdgf-ddpm-v1"
    with pytest.raises(ValueError, match=r"ddpm.masked_target must be one of \('x0', 'none'\), got 'eps'"):
        tiny_bdgf(ddpm={"masked_target": "eps"})


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"ddpm: unknown keys \['base_width'\]"):
        tiny_bdgf(ddpm={"base_width": 8})
    with pytest.raises(ValueError, match=r"guide_levels \{'mamba': 2\} must be among feature_levels \[0, 1\]"):
        tiny_bdgf(guide_levels={"cnn": 0, "mamba": 2})
    np.save(tmp_path / "bank.npy", np.zeros((4, 16, 16), dtype=np.float32))
    with pytest.raises(ValueError, match=r"feature_bank_split \[1, 2\] must be positive and sum to the bank's 4"):
        tiny_bdgf(feature_bank=str(tmp_path / "bank.npy"), feature_bank_split=[1, 2])
    with pytest.raises(ValueError, match="ddpm_checkpoint.*not found"):
        tiny_bdgf(ddpm_checkpoint=str(tmp_path / "missing.ckpt"))


def test_pretrain_module_logs_masking_probabilities(tmp_path, scene_paths):
    from rsfusion.lightning_modules.base import FusionTask
    from rsfusion.lightning_modules.commands.cli import RSFusionCLI

    config = yaml.safe_load((ROOT / "configs" / "bdgf_pretrain_augsburg.yaml").read_text())
    config["model"]["init_args"].update(ddpm=TINY_DDPM)
    # the scene's own files, not a release layout
    config["data"]["class_path"] = "rsfusion.datamodules.RasterDataModule"
    config["data"]["init_args"] = {"modalities": {"hsi": str(scene_paths["hsi"]), "sar": str(scene_paths["sar"])},
                                   "train_labels": str(scene_paths["train"]), "test_labels": str(scene_paths["test"]),
                                   "val_labels": str(scene_paths["val"]), "patch_size": 8, "batch_size": 4,
                                   "allow_even_patch": True, "pretrain_tiles": {"tile": 8, "per_epoch": 24}}
    config["trainer"].update(max_steps=-1, max_epochs=2, check_val_every_n_epoch=1, log_every_n_steps=1,
                             default_root_dir=str(tmp_path),
                             enable_progress_bar=False, enable_model_summary=False)
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = RSFusionCLI(FusionTask, RasterDataModule, subclass_mode_model=True, subclass_mode_data=True,
                      seed_everything_default=0, save_config_kwargs={"overwrite": True},
                      args=["fit", "--config", str(path)])
    assert isinstance(cli.model, BDGFPretrain) and isinstance(cli.datamodule.train_dataset, RandomSceneTiles)
    rows = list(csv.DictReader(next(tmp_path.glob("version_0/metrics.csv")).open()))
    p_hsi = [float(r["train/p_mask/hsi"]) for r in rows if r.get("train/p_mask/hsi")]
    p_sar = [float(r["train/p_mask/sar"]) for r in rows if r.get("train/p_mask/sar")]
    assert len(p_hsi) == len(p_sar) == 12  # every optimiser step: 2 epochs x 24 tiles / batch 4
    assert p_hsi[0] == pytest.approx(0.3) and p_sar[0] == pytest.approx(0.1)
    assert (p_hsi[-1], p_sar[-1]) != (0.3, 0.1) and all(0.05 <= p <= 0.5 for p in p_hsi + p_sar)
    assert any(r.get("val/ddpm_loss") for r in rows)
    ckpt = next(tmp_path.glob("version_0/checkpoints/*.ckpt"))
    payload = load_ddpm_payload(ckpt)
    assert payload["modality_channels"] == CHANNELS and payload["masking"]["hsi"] == pytest.approx(p_hsi[-1])
    assert payload["ema_updates"] == 12  # the AveragedModel averaged once per optimiser step
    # the EMA weights of the checkpoint drive a BDGF
    model = tiny_bdgf(ddpm_checkpoint=str(ckpt), patch_size=8)
    assert model.bank_channels == 24


def _script() -> str:
    found = shutil.which("rsfusion", path=str(Path(sys.executable).parent)) or shutil.which("rsfusion")
    if found is None:
        pytest.skip("console script 'rsfusion' not installed (pip install -e .)")
    return found


def _run(args, cwd):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _test_oa(stdout: str) -> str | None:
    """The test/OA value printed in the metrics table."""
    for line in stdout.splitlines():
        cells = line.replace("│", " ").split()
        if cells[:1] == ["test/OA"]:
            return cells[1]
    return None


def test_two_stage_fit_through_the_console_script_then_cache_reuse(tmp_path):
    cache = tmp_path / "cache"
    config = tiny_bdgf_config(tmp_path, cache)
    first = _run([_script(), "fit", "--config", str(config)], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "no cached DDPM" in first.stderr and "BDGF stage 1: 3 steps done on 1 process(es) in " in first.stderr
    assert first.stderr.count("GPU available:") == 1  # the nested stage-1 Trainer prints no second banner
    # stage 1 was a Trainer run of its own, logged beside the classifier's run
    stage1 = list(csv.DictReader((tmp_path / "runs" / "version_0" / "bdgf_pretrain" / "metrics.csv").open()))
    assert {"train/loss", "train/p_mask/hsi", "train/p_mask/sar"} <= set(stage1[0])
    assert max(int(r["step"]) for r in stage1) == 2  # steps 0, 1, 2 logged
    assert "feature bank (24, 16, 16) saved" in first.stderr
    assert "test/OA_mamba" in first.stdout and "test/kappa" in first.stdout
    assert len(list((cache / "ddpm").glob("*.pt"))) == 1 and len(list((cache / "banks").glob("*.npy"))) == 1
    assert (tmp_path / "runs" / "version_0" / "predictions" / "classification_map.tif").stat().st_size > 0
    ckpt = next((tmp_path / "runs" / "version_0" / "checkpoints").glob("best-*.ckpt"))
    cached = next((cache / "ddpm").glob("*.pt"))
    assert payload_digest(load_ddpm_payload(ckpt)) == payload_digest(load_ddpm_payload(cached))
    metrics = csv.DictReader((tmp_path / "runs" / "version_0" / "metrics.csv").open())
    val_rows = [r for r in metrics if r.get("val/OA_cnn")]
    assert val_rows and all(0 <= float(val_rows[0][f"val/OA_{b}"]) <= 1 for b in ("cnn", "mamba", "transformer"))

    # stage 2 as a command: for the same config it finds the bank the fit cached (same key), and prints it
    stage2 = _run([sys.executable, "-m", "rsfusion.lightning_modules", "bank", "--config", str(config)], tmp_path)
    assert stage2.returncode == 0, stage2.stderr[-3000:]
    assert "DDPM cache hit" in stage2.stderr and "feature bank cache hit" in stage2.stderr
    assert stage2.stdout.strip() == str(next((cache / "banks").glob("*.npy")))

    second = _run([_script(), "fit", "--config", str(config)], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "DDPM cache hit" in second.stderr and "feature bank cache hit" in second.stderr
    assert "pretrain" not in second.stderr.replace("(no pretraining)", "") and "extracting" not in second.stderr
    assert len(list((cache / "ddpm").glob("*.pt"))) == 1 and len(list((cache / "banks").glob("*.npy"))) == 1
    assert _test_oa(first.stdout) is not None and _test_oa(second.stdout) == _test_oa(first.stdout)  # same run

    # predict_window: the bank is read window by window from the memory-mapped cached file (the checkpoint
    # names it); the map equals the in-memory prediction's
    whole = _run([_script(), "predict", "--config", str(config), "--ckpt_path", str(ckpt)], tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    windowed = _run([_script(), "predict", "--config", str(config), "--ckpt_path", str(ckpt),
                     "--data.init_args.predict_window", "6"], tmp_path)
    assert windowed.returncode == 0, windowed.stderr[-3000:]
    assert "reading the feature bank" in windowed.stderr and "window by window" in windowed.stderr
    maps = [rasterio.open(tmp_path / "runs" / f"version_{v}" / "predictions" / "classification_map.tif").read(1)
            for v in (2, 3)]
    assert maps[0].shape == (16, 16) and maps[0].min() >= 1 and len(np.unique(maps[0])) > 1
    np.testing.assert_array_equal(maps[1], maps[0])
    bank = next((cache / "banks").glob("*.npy"))
    provenance = json.loads(bank.with_suffix(".json").read_text())
    assert provenance["ddpm"] == payload_digest(load_ddpm_payload(ckpt)) and len(provenance["data"]) == 64
    assert (provenance["tile"], provenance["overlap"], provenance["timesteps"]) == (8, 4, [5])

    # test from the checkpoint with the cache deleted: the DDPM comes from the checkpoint (no
    # pretraining), only the bank is rebuilt, and the metrics are those of the fit's own test
    shutil.rmtree(cache)
    test = _run([_script(), "test", "--config", str(config), "--ckpt_path", str(ckpt)], tmp_path)
    assert test.returncode == 0, test.stderr[-3000:]
    assert "no cached DDPM" not in test.stderr and "pretrain step" not in test.stderr
    assert "feature bank (24, 16, 16) saved" in test.stderr
    assert not (cache / "ddpm").exists() and len(list((cache / "banks").glob("*.npy"))) == 1
    assert _test_oa(test.stdout) == _test_oa(first.stdout)
    assert _test_oa(first.stdout) is not None and _test_oa(test.stdout)[:6] == _test_oa(first.stdout)[:6]


def test_spec_default_sizes():
    model = BDGF(in_channels={"hsi": 30, "sar": 4}, num_classes=7)
    # decoder levels 0/1/2 of the default UNet (base 64, mult 1, 2, 2), timesteps averaged
    assert model.guide_slices == {"cnn": (0, 64), "mamba": (64, 192), "transformer": (192, 320)}
    assert model.bank_channels == 320 and model.net.patch_size == 11
    classifier_params = sum(p.numel() for p in model.net.parameters())
    assert 300_000 < classifier_params < 800_000  # spec 6.4: about 0.3-0.6 M, plus the guide projections
    unguided = BDGF(in_channels={"hsi": 30, "sar": 4}, num_classes=7, guide_levels={})
    assert unguided.bank_channels == 0 and unguided._guides({}) == {}
    assert not any(b.guided for b in unguided.net.branches.values())


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_parse_without_their_data(name, capsys):
    from rsfusion.lightning_modules.commands.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs" / f"{name}.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    model = printed["model"]
    task = "BDGFPretrain" if "pretrain" in name else "BDGF"
    assert model["class_path"] == f"rsfusion.lightning_modules.{task}"
    data = printed["data"]["init_args"]
    assert model["init_args"]["ddpm"]["masked_target"] == "x0"  # the corrected stage-1 objective, spelt out
    if "template" in name:  # your own rasters, relative paths
        assert printed["data"]["class_path"] == "rsfusion.datamodules.RasterDataModule"
        assert all(not Path(p.split(".mat:")[0]).is_absolute() for p in data["modalities"].values())
    elif "synthetic" not in name:  # a release DataModule that finds the files under a relative root
        release = "Berlin" if "berlin" in name else "Augsburg"
        assert printed["data"]["class_path"] == f"rsfusion.datamodules.{release}DataModule"
        assert not Path(data["root"]).is_absolute() and data["use"] in (None, ["hsi", "sar"])
    if name in ("bdgf_augsburg", "bdgf_berlin"):
        assert data["patch_size"] == 11 and data["pca"] == {"hsi": 30}
        assert model["init_args"]["feature_timesteps"] == [50, 150] and model["init_args"]["pretrain_steps"] == 30000
        classes = {"bdgf_augsburg": AugsburgDataModule, "bdgf_berlin": BerlinDataModule}[name].classes
        assert len(data["class_names"] or classes) == {"bdgf_augsburg": 7, "bdgf_berlin": 8}[name]
    if name.startswith("bdgf_pretrain"):
        assert printed["test_after_fit"] is False and printed["trainer"]["gradient_clip_val"] == 1.0


def test_pretrain_needs_the_datamodules_unlabelled_tiles(make_dm):
    import lightning as L

    model = BDGFPretrain(ddpm=TINY_DDPM, in_channels=CHANNELS, num_classes=6)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(InputError, match=r"BDGFPretrain trains on unlabelled scene tiles: set data.pretrain_tiles"):
        trainer.fit(model, datamodule=make_dm(patch_size=8, allow_even_patch=True))
    with pytest.raises(InputError, match=r"pretrain_tiles.tile \(5\) must be a multiple of the denoiser's downsample "
                                         r"factor 2"):
        trainer.fit(model, datamodule=make_dm(patch_size=8, allow_even_patch=True,
                                              pretrain_tiles={"tile": 5, "per_epoch": 4}))
    with pytest.raises(InputError, match=r"pretrain_tiles: expected the keys tile and per_epoch, got \['size'\]"):
        make_dm(pretrain_tiles={"size": 8})
    dm = make_dm(patch_size=8, allow_even_patch=True, pretrain_tiles={"tile": 8, "per_epoch": 5})
    tiles = dm.train_dataset
    assert isinstance(tiles, RandomSceneTiles) and len(tiles) == 5
    x0 = tiles[0]["x0"]
    assert x0.shape == (8, 8, 8) and set(tiles[0]) == {"x0"}
    # a tile is a crop of the stacked normalised scene, up to a flip/rot90
    scene = torch.cat([torch.from_numpy(a) for a in unpadded(dm).values()])
    crops = [scene[:, y:y + 8, x:x + 8] for y in range(9) for x in range(9)]
    views = [torch.rot90(c, k, dims=(1, 2)) for c in crops for k in range(4)]
    assert any(torch.equal(x0, v) or torch.equal(x0, v.flip(-1)) for v in views)
