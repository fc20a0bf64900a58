"""Per-pixel feature cubes ("feature banks") kept on disk: content-addressed, written atomically.

A feature bank is a (F, H, W) array on a scene's reference grid (e.g. BDGF's diffusion features).
Banks are expensive to compute and large, so they are cached as fp16 ``.npy`` files named by a key
that hashes everything they depend on (:func:`cache_key`). Files are written to a temporary name
and renamed (:func:`rsfusion.datamodules.writing.atomic_path`), and every load checks the shape and the values,
so a truncated or half-written file is reported and rebuilt, never used.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from rsfusion.datamodules.errors import InputError
from rsfusion.datamodules.scene import pad_edges
from rsfusion.datamodules.writing import atomic_path

log = logging.getLogger(__name__)

__all__ = ["FEATURE_KEY", "array_digest", "bank_patches", "cache_key", "external_bank_channels", "load_bank",
           "open_bank", "read_external_bank", "save_bank"]

FEATURE_KEY = "ddpm_features"  # the scene modality (and batch key) holding BDGF's diffusion feature patches


def array_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of named arrays: names, shapes, dtypes and bytes (order of the mapping matters)."""
    h = hashlib.sha256()
    for name, arr in arrays.items():
        arr = np.ascontiguousarray(arr)
        h.update(json.dumps([name, list(arr.shape), arr.dtype.str]).encode())
        h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def cache_key(**parts) -> str:
    """A short stable key (24 hex digits) from JSON-serialisable parts (dict order does not matter)."""
    text = json.dumps(parts, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def save_bank(path: str | Path, cube: np.ndarray, meta: Mapping | None = None) -> Path:
    """Write ``cube`` (F, H, W) as fp16 ``.npy`` atomically, with ``meta`` beside it as ``.json``."""
    path = Path(path)
    if cube.ndim != 3:
        raise ValueError(f"cube must be (F, H, W), got shape {cube.shape}")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(cube, dtype=np.float16))
    if meta is not None:
        with atomic_path(path.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps(dict(meta), indent=1, sort_keys=True, default=list))
    return path


def load_bank(path: str | Path, shape: tuple[int, int, int]) -> tuple[np.ndarray | None, str]:
    """Load a cached bank if it is complete and sound: ``(cube, "")`` or ``(None, reason)``.

    The reason is ``"missing"`` when there is no file, else why the file cannot be used
    (unreadable/truncated, wrong shape, non-finite values).
    """
    path = Path(path)
    if not path.exists():
        return None, "missing"
    try:
        cube = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        return None, f"unreadable or truncated ({err})"
    if cube.shape != tuple(shape):
        return None, f"shape {cube.shape}, expected {tuple(shape)}"
    if not np.isfinite(cube).all():
        return None, "contains NaN or infinite values"
    return cube, ""


def _open_external(path: Path) -> np.ndarray:
    """Memory-map a user-given ``.npy`` cube (header and data checks are the callers')."""
    if not path.is_file():
        raise InputError(f"{path}: feature bank file not found")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise InputError(f"{path}: cannot read the feature bank ({err})") from None


def read_external_bank(path: str | Path, height: int, width: int) -> np.ndarray:
    """A user-given (F, H, W) ``.npy`` cube on the scene grid, as float16 (any channel count F)."""
    out = np.asarray(open_bank(path, height, width), dtype=np.float16)
    if not np.isfinite(out).all():
        raise InputError(f"{path}: the feature bank contains NaN or infinite values (or values beyond fp16)")
    return out


def external_bank_channels(path: str | Path) -> int:
    """Channel count F of a (F, H, W) ``.npy`` cube, read from its header only."""
    path = Path(path)
    cube = _open_external(path)
    if cube.ndim != 3:
        raise InputError(f"{path}: expected a (F, H, W) feature cube, got shape {cube.shape}")
    return int(cube.shape[0])


def open_bank(path: str | Path, height: int, width: int) -> np.ndarray:
    """A (F, H, W) ``.npy`` bank on the scene grid, memory-mapped (read window by window, never whole)."""
    path = Path(path)
    cube = _open_external(path)
    if cube.ndim != 3 or cube.shape[1:] != (height, width):
        raise InputError(f"{path}: expected a (F, {height}, {width}) feature cube on the scene grid, "
                         f"got shape {cube.shape}")
    return cube


def bank_patches(bank: np.ndarray, rows: np.ndarray, cols: np.ndarray, patch_size: int,
                 pad_mode: str = "reflect") -> np.ndarray:
    """(B, F, p, p) float32 patches of a (F, H, W) bank around pixels (rows, cols), as the in-memory scene
    cuts them (:class:`~rsfusion.datamodules.sampling.PixelPatchDataset`: the pixel at index (p-1)//2,
    the scene edges padded by ``pad_mode``), reading only the block the pixels span."""
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    _, h, w = bank.shape
    before, after = (patch_size - 1) // 2, patch_size // 2
    r0, r1 = int(rows.min()) - before, int(rows.max()) + after + 1
    c0, c1 = int(cols.min()) - before, int(cols.max()) + after + 1
    block = np.asarray(bank[:, max(0, r0):min(h, r1), max(0, c0):min(w, c1)], dtype=np.float32)
    # beyond the scene edge the whole-scene bank would be padded: do the same on the clipped sides
    block = pad_edges(block, (max(0, -r0), max(0, r1 - h), max(0, -c0), max(0, c1 - w)), pad_mode)
    dy = np.arange(patch_size)
    ys = (rows - before - r0)[:, None] + dy  # (B, p)
    xs = (cols - before - c0)[:, None] + dy
    return block[:, ys[:, :, None], xs[:, None, :]].transpose(1, 0, 2, 3).copy()
