"""Shared fixtures: tiny synthetic scenes written as real GeoTIFFs, and the real rasters of ../shared."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import yaml
from rasterio.transform import from_origin

from rsfusion.kernels import selective_scan_ref


def pytest_configure(config):
    """Caches of runs the tests start (BDGF's DDPMs and banks) go to a fresh folder, never ~/.cache/rsfusion:
    child processes inherit the variable."""
    if "RSFUSION_CACHE_DIR" not in os.environ:
        os.environ["RSFUSION_CACHE_DIR"] = tempfile.mkdtemp(prefix="rsfusion-test-cache-")
    # The Hugging Face hub is never reached (tests that exercise a fetch mock the client and unset this)
    os.environ["HF_HUB_OFFLINE"] = "1"
    # rs-fusion-datasets' data home: never the user's ~/scikit_learn_data
    os.environ["SCIKIT_LEARN_DATA"] = tempfile.mkdtemp(prefix="rsfusion-test-skl-")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``network`` download real data: run only with RSFUSION_NETWORK_TESTS=1."""
    if os.environ.get("RSFUSION_NETWORK_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="downloads real data: set RSFUSION_NETWORK_TESTS=1 on a machine with internet")
    for item in items:
        if "network" in item.keywords:
            item.add_marker(skip)

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("MPLBACKEND", "Agg")
# The tests use tiny tensors, for which thread start-up costs far more than it saves.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
REAL_RASTERS = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-rasters"


@pytest.fixture(scope="session")
def real_rasters() -> Path:
    if not (REAL_RASTERS / "RGB.byte.tif").exists():
        pytest.skip(f"real test rasters not found at {REAL_RASTERS} (they ship beside the project in CI only)")
    return REAL_RASTERS


def write_tif(path: Path, data: np.ndarray, res: float = 10.0, origin=(500_000.0, 4_000_000.0),
              crs: str = "EPSG:32632", nodata=None) -> Path:
    data = data[None] if data.ndim == 2 else data
    with rasterio.open(path, "w", driver="GTiff", height=data.shape[1], width=data.shape[2], count=data.shape[0],
                       dtype=data.dtype, crs=crs, transform=from_origin(*origin, res, res), nodata=nodata) as dst:
        dst.write(data)
    return path


@pytest.fixture(scope="session")
def tiny_hsi_scene(tmp_path_factory) -> dict[str, Path]:
    """A small synthetic HSI + DSM scene (the generator the demo uses, at test size)."""
    from rsfusion.datamodules.synthetic import ensure_scene

    return ensure_scene(tmp_path_factory.mktemp("scenes"), "hsi_dsm", seed=0, height=40, width=48, bands=8,
                        train_per_class=15)


def tiny_config(tmp_path: Path, name: str, data: dict, model: dict, run: str = "runs", **trainer) -> Path:
    """``configs/<name>.yaml`` shrunk for a test: data/model overrides, outputs under ``tmp_path/<run>``
    (the first run's folder is ``tmp_path/<run>/version_0``).

    The scene is generated under ``tmp_path/scene`` (shared by the runs of one test). The config is
    written to ``tmp_path/<name>.yaml``, or ``tmp_path/<run>.yaml`` for a named run.
    """
    import yaml

    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    config["data"]["init_args"].update(root=str(tmp_path / "scene"), **data)
    config["model"]["init_args"].update(model)
    runs = tmp_path / run
    config["trainer"].update(default_root_dir=str(runs), enable_progress_bar=False, **trainer)
    path = tmp_path / f"{name if run == 'runs' else run}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def scan_backend_calls(monkeypatch):
    """(requested, resolved) backend of every rsfusion.kernels.selective_scan call made during the test."""
    from rsfusion.kernels import dispatch

    calls, resolve = [], dispatch.resolve_backend

    def recording(backend, device, dtype=torch.float32):
        calls.append((backend, resolve(backend, device, dtype)))
        return calls[-1][1]

    monkeypatch.setattr(dispatch, "resolve_backend", recording)
    return calls


# ----------------------------------------------------------------- selective-scan test helpers
GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def oracle(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The one reference (rsfusion/kernels/reference.py, a step-by-step loop) on the inputs upcast to float64:
    (out, last state), differentiable with respect to float64 leaves."""
    inputs = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    doubled = {k: v if v is None else v.double() for k, v in inputs.items()}
    return selective_scan_ref(**doubled, delta_softplus=delta_softplus, return_last_state=True)


def make_inputs(batch, dim, length, nstate, groups=None, extras=True, dtype=torch.float32, seed=0):
    """mamba's test distribution (spec §1.6); groups=None gives 3-D B/C."""
    gen = torch.Generator().manual_seed(seed)
    bc_shape = (batch, nstate, length) if groups is None else (batch, groups, nstate, length)

    def rand(*shape, scale=1.0, normal=True):
        t = torch.randn(*shape, generator=gen) if normal else torch.rand(*shape, generator=gen)
        return (t * scale).to(dtype)

    inputs = {
        "u": rand(batch, dim, length),
        "delta": rand(batch, dim, length, scale=0.5, normal=False),
        "A": -0.5 * torch.rand(dim, nstate, generator=gen).to(dtype if dtype == torch.float64 else torch.float32),
        "B": rand(*bc_shape),
        "C": rand(*bc_shape),
    }
    if extras:
        weight = dtype if dtype == torch.float64 else torch.float32
        inputs["D"] = torch.randn(dim, generator=gen).to(weight)
        inputs["z"] = rand(batch, dim, length)
        inputs["delta_bias"] = (0.5 * torch.rand(dim, generator=gen)).to(weight)
    return inputs


def run_with_grads(fn, inputs, grad_out, **kwargs):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    out, last = fn(**leaves, return_last_state=True, **kwargs)
    (out.double() * grad_out).sum().backward()
    return out, last, {k: v.grad for k, v in leaves.items()}


def oracle_with_grads(inputs, grad_out, delta_softplus):
    leaves = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    out, last = oracle(**leaves, delta_softplus=delta_softplus)
    (out * grad_out).sum().backward()
    return out, last, {k: v.grad for k, v in leaves.items()}


def assert_close(actual, expected, name, rtol=1e-4, atol=1e-4):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------- tiny models shared by tests
TINY_CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                 patch_size=8, projection_dim=8)
TINY_M3AMBA = dict(dims=16, depth=1, d_state=2, ssm_ratio=1.0, drop_path_rate=0.0, clip_config=TINY_CLIP)


TINY_DAS2F = dict(d_model=16, d_state=4, dt_rank=4, head_hidden=16)


TINY_DDPM = dict(base_channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[], stem_channels=4,
                 norm_groups=4, dropout=0.0, num_timesteps=50, mask_window=2)
TINY_BDGF_NET = dict(dim=16, proj_dim=8, mamba_kwargs={"d_state": 4}, transformer_kwargs={"heads": 2})
BDGF_PATCH = 5


def tiny_bdgf_config(tmp_path: Path, cache: Path) -> Path:
    """configs/bdgf_synthetic.yaml with a tiny DDPM and network, outputs under ``tmp_path``."""
    config = yaml.safe_load((ROOT / "configs" / "bdgf_synthetic.yaml").read_text())
    model = config["model"]["init_args"]
    model.update(cache_dir=str(cache), ddpm=TINY_DDPM, pretrain_steps=3, pretrain_batch_size=4, pretrain_tile=8,
                 feature_levels=[0, 1], guide_levels={"cnn": 0, "mamba": 1, "transformer": 1}, feature_timesteps=[5],
                 feature_tile=8, feature_overlap=4, **TINY_BDGF_NET)
    config["data"]["init_args"].update(root=str(tmp_path / "scene"), scene_height=16, scene_width=16,
                                       train_per_class=6, patch_size=BDGF_PATCH, batch_size=16, pca={"hsi": 4})
    config["trainer"].update(max_epochs=1, limit_train_batches=2, default_root_dir=str(tmp_path / "runs"),
                             enable_progress_bar=False, enable_model_summary=False)
    path = tmp_path / "bdgf.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# ----------------------------------------------------------------- end-to-end config runs
E2E_TRAINER = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
           "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.enable_progress_bar", "false",
           "--trainer.log_every_n_steps", "1"]


def redirect_outputs(config: Path, out: Path) -> Path:
    """The config with its run folders and cache directory under ``out`` (the shipped configs
    write to runs/<name>; this is the only change made to a config's file)."""
    data = yaml.safe_load(config.read_text())
    trainer = data["trainer"]
    trainer["default_root_dir"] = str(out)
    if str(data["model"].get("class_path", "")).endswith("BDGF"):  # never the user's ~/.cache/rsfusion
        data["model"].setdefault("init_args", {})["cache_dir"] = str(out / "cache")
    path = out / config.name
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path
