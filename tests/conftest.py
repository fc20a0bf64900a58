"""Shared fixtures: tiny synthetic scenes written as real GeoTIFFs, and the real rasters of ../shared."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("MPLBACKEND", "Agg")
# The tests use tiny tensors, for which thread start-up costs far more than it saves.
torch.set_num_threads(1)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
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
