"""Synthetic co-registered scenes, written as real GeoTIFFs: the built-in demo and CI data.

Both kinds are built so that fusion matters: some classes share their spectra and differ only in
the second modality, others the reverse, so no single modality can reach full accuracy.

- ``hsi_dsm`` / ``hsi_sar``: hyperspectral cube + elevation (DSM, 1 band, metres) or SAR (VV/VH
  backscatter, dB, with speckle). Trees/grass and roofs/roads share spectra (height or
  scattering tells them apart); trees/roofs share height (spectra tell them apart).
- ``ms_pan``: 4-band multispectral + panchromatic at 4x resolution, in the MS/PAN benchmark layout
  (``ms4.tif``, ``pan.tif``, ``train.npy``, ``test.npy``). Dense/sparse urban and meadow/crops share
  spectra and differ in PAN texture; vegetation and bare soil share PAN brightness.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from rasterio.crs import CRS
from rasterio.transform import from_origin
from scipy.ndimage import gaussian_filter, zoom

from rsfusion.datamodules.raster import RasterDataModule
from rsfusion.datamodules.splits import block_split
from rsfusion.datamodules.writing import atomic_path, write_geotiff

SceneKind = Literal["hsi_dsm", "hsi_sar", "ms_pan"]
VERSION = 2
CRS_UTM32N = CRS.from_epsg(32632)
HSI_CLASSES = ["Trees", "Grass", "Roofs", "Roads", "Water", "Bare soil"]
MSPAN_CLASSES = ["Dense urban", "Sparse urban", "Meadow", "Crops", "Bare soil", "Water"]


def _regions(shape: tuple[int, int], num_classes: int, rng: np.random.Generator,
             cells_per_class: int = 4) -> np.ndarray:
    """Spatially coherent class regions: Voronoi cells with wobbly borders, classes 1..K."""
    h, w = shape
    n = num_classes * cells_per_class
    seeds = rng.uniform(0, 1, size=(n, 2)) * (h, w)
    cell_class = np.tile(np.arange(1, num_classes + 1), cells_per_class)
    rng.shuffle(cell_class)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    wobble = max(h, w) / 12
    yy += wobble * gaussian_filter(rng.standard_normal(shape), sigma=max(h, w) / 16) * 6
    xx += wobble * gaussian_filter(rng.standard_normal(shape), sigma=max(h, w) / 16) * 6
    dist = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
    return cell_class[dist.argmin(axis=-1)].astype(np.uint8)


def _smooth_field(shape, rng, sigma, scale) -> np.ndarray:
    field = gaussian_filter(rng.standard_normal(shape), sigma=sigma)
    return scale * field / (field.std() + 1e-12)


def _split_maps(gt: np.ndarray, train_per_class: int, rng: np.random.Generator, seed: int):
    """Spatially disjoint train/test maps: blocks for test; training and validation pixels sampled
    per class (``train_per_class`` and half as many, disjoint) from the remaining area."""
    train_area, test = block_split(gt, fraction=0.5, block_size=max(8, gt.shape[0] // 8), seed=seed, guard=2)
    train, val = np.zeros_like(gt), np.zeros_like(gt)
    for k in np.unique(train_area[train_area > 0]):
        coords = rng.permutation(np.flatnonzero(train_area == k))
        n_train = min(train_per_class, max(1, coords.size // 2))
        train.flat[coords[:n_train]] = k
        val.flat[coords[n_train:n_train + max(1, train_per_class // 2)]] = k
    return train, val, test


def _spectra(bands: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Smooth reflectance-like spectra (0..1) on ``bands`` wavelengths between 400 and 1000 nm."""
    wl = np.linspace(400, 1000, bands)

    def bump(centre, width, height):
        return height * np.exp(-0.5 * ((wl - centre) / width) ** 2)

    red_edge = 1 / (1 + np.exp(-(wl - 715) / 15))
    vegetation = 0.05 + bump(550, 30, 0.06) + 0.45 * red_edge
    asphalt = 0.08 + 0.10 * (wl - 400) / 600 + bump(rng.uniform(600, 800), 80, 0.02)
    water = 0.06 * np.exp(-(wl - 400) / 150) + 0.01
    soil = 0.10 + 0.25 * (wl - 400) / 600 + bump(900, 60, 0.03)
    return {"Trees": vegetation, "Grass": vegetation, "Roofs": asphalt, "Roads": asphalt,
            "Water": water, "Bare soil": soil}


def make_hsi_scene(root: str | Path, second: Literal["dsm", "sar"] = "dsm", height: int = 120, width: int = 160,
                   bands: int = 48, train_per_class: int = 60, seed: int = 0) -> dict[str, Path]:
    """Write hsi.tif + dsm.tif (or sar.tif) + train.tif + test.tif under ``root``; return their paths."""
    rng = np.random.default_rng(seed)
    shape = (height, width)
    gt = _regions(shape, len(HSI_CLASSES), rng)
    spectra = _spectra(bands, rng)
    mean = np.stack([spectra[name] for name in HSI_CLASSES])[gt - 1]  # (H, W, bands)
    brightness = 1 + _smooth_field(shape, rng, 3, 0.08)[..., None]
    hsi = mean * brightness * (1 + 0.04 * rng.standard_normal((*shape, 1)))
    hsi += 0.012 * rng.standard_normal(hsi.shape)
    hsi = np.moveaxis(hsi, -1, 0).astype(np.float32)

    tall = np.isin(gt, [HSI_CLASSES.index("Trees") + 1, HSI_CLASSES.index("Roofs") + 1])
    if second == "dsm":
        terrain = 300 + _smooth_field(shape, rng, 20, 2.0)
        height_m = np.where(tall, 7.0 + 1.5 * rng.standard_normal(shape), 0.0)
        aux = (terrain + height_m + 0.5 * rng.standard_normal(shape))[None].astype(np.float32)
        aux_desc = ["elevation (m)"]
    else:
        # Volume (trees) and double-bounce (roofs) scattering are bright; smooth surfaces dark.
        sigma0 = {"Trees": -7.0, "Grass": -14.0, "Roofs": -3.0, "Roads": -17.0, "Water": -22.0, "Bare soil": -12.0}
        vv = np.array([sigma0[n] for n in HSI_CLASSES])[gt - 1]
        speckle = rng.gamma(4.0, 1 / 4.0, size=(2, *shape))  # 4-look intensity speckle
        lin = 10 ** (np.stack([vv, vv - 6.0]) / 10) * speckle
        aux = (10 * np.log10(lin)).astype(np.float32)
        aux_desc = ["VV (dB)", "VH (dB)"]
    train, val, test = _split_maps(gt, train_per_class, rng, seed)
    transform = from_origin(600_000.0, 5_350_000.0, 2.5, 2.5)
    root = Path(root)
    paths = {"hsi": root / "hsi.tif", second: root / f"{second}.tif", "train": root / "train.tif",
             "val": root / "val.tif", "test": root / "test.tif"}
    write_geotiff(paths["hsi"], hsi, CRS_UTM32N, transform, descriptions=[f"band {i + 1}" for i in range(bands)])
    write_geotiff(paths[second], aux, CRS_UTM32N, transform, descriptions=aux_desc)
    for key, labels in (("train", train), ("val", val), ("test", test)):
        write_geotiff(paths[key], labels, CRS_UTM32N, transform)
    return paths


def _texture(shape: tuple[int, int], period: int, rng: np.random.Generator, kind: str) -> np.ndarray:
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    if kind == "blocks":  # building footprints on a regular lot grid
        return (((yy // period) + (xx // period)) % 2).astype(np.float64) - 0.5
    if kind == "rows":  # crop rows
        return np.sin(2 * np.pi * (yy + 0.5 * xx) / period)
    return gaussian_filter(rng.standard_normal(shape), 1.0)


def make_mspan_scene(root: str | Path, height: int = 64, width: int = 80, ratio: int = 4,
                     train_per_class: int = 60, seed: int = 0) -> dict[str, Path]:
    """Write ms4.tif (4 bands) + pan.tif (``ratio`` x finer) + train.npy + test.npy under ``root``."""
    rng = np.random.default_rng(seed)
    shape = (height, width)
    gt = _regions(shape, len(MSPAN_CLASSES), rng)
    # B, G, R, NIR reflectance; meadow/crops and the two urban classes share spectra; bare soil has
    # the same PAN brightness (band mean) as meadow.
    spectra = {"Dense urban": [0.20, 0.21, 0.22, 0.24], "Sparse urban": [0.20, 0.21, 0.22, 0.24],
               "Meadow": [0.04, 0.09, 0.05, 0.42], "Crops": [0.04, 0.09, 0.05, 0.42],
               "Bare soil": [0.12, 0.14, 0.16, 0.18], "Water": [0.07, 0.05, 0.03, 0.01]}
    mean = np.array([spectra[n] for n in MSPAN_CLASSES])[gt - 1]
    ms = mean * (1 + _smooth_field(shape, rng, 3, 0.06))[..., None] + 0.01 * rng.standard_normal((*shape, 4))
    ms = np.moveaxis(ms, -1, 0)
    fine = (height * ratio, width * ratio)
    gt_fine = np.kron(gt, np.ones((ratio, ratio), dtype=gt.dtype))
    pan = zoom(ms.mean(axis=0), ratio, order=1)
    textures = {"Dense urban": ("blocks", 2, 0.5), "Sparse urban": ("blocks", 6, 0.5),
                "Crops": ("rows", 5, 0.4), "Meadow": ("noise", 0, 0.05)}
    for name, (kind, period, amplitude) in textures.items():
        where = gt_fine == MSPAN_CLASSES.index(name) + 1
        pan[where] *= 1 + amplitude * _texture(fine, period, rng, kind)[where]
    pan += 0.01 * rng.standard_normal(fine)
    to_dn = lambda x: np.clip(x * 1000 + 100, 0, 65535).astype(np.uint16)  # noqa: E731 (integer DNs like the sensors)
    train, val, test = _split_maps(gt, train_per_class, rng, seed)
    root = Path(root)
    paths = {"ms": root / "ms4.tif", "pan": root / "pan.tif", "train": root / "train.npy", "val": root / "val.npy",
             "test": root / "test.npy"}
    write_geotiff(paths["ms"], to_dn(ms), CRS_UTM32N, from_origin(500_000.0, 4_000_000.0, 4.0, 4.0),
                  descriptions=["blue", "green", "red", "nir"])
    write_geotiff(paths["pan"], to_dn(pan)[None], CRS_UTM32N, from_origin(500_000.0, 4_000_000.0, 4.0 / ratio,
                                                                          4.0 / ratio))
    for key, labels in (("train", train), ("val", val), ("test", test)):
        with atomic_path(paths[key]) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, labels.astype(np.uint8))
    return paths


def ensure_scene(root: str | Path, kind: SceneKind, seed: int = 0, **size) -> dict[str, Path]:
    """Generate the scene once under ``root/<kind>-seed<seed>``; later calls reuse it."""
    folder = Path(root) / f"{kind}-seed{seed}"
    manifest = folder / "scene.json"
    request = {"kind": kind, "seed": seed, "version": VERSION, **size}
    if manifest.exists():
        saved = json.loads(manifest.read_text())
        if saved["request"] == request:
            return {k: Path(v) for k, v in saved["paths"].items()}
    if kind == "ms_pan":
        paths = make_mspan_scene(folder, seed=seed, **size)
    else:
        paths = make_hsi_scene(folder, second=kind.split("_")[1], seed=seed, **size)
    with atomic_path(manifest) as tmp:
        tmp.write_text(json.dumps({"request": request, "paths": {k: str(v) for k, v in paths.items()}}))
    return paths


class SyntheticDataModule(RasterDataModule):
    """A :class:`RasterDataModule` over a built-in synthetic scene, generated on first use.

    Args:
        kind: ``hsi_dsm``, ``hsi_sar`` or ``ms_pan`` (see the module docstring).
        root: where the scene's GeoTIFFs are written (and reused from).
        scene_seed: the scene generator's seed (independent of the training seed).
        scene_height, scene_width: the scene size on the reference (coarsest) grid.
        train_per_class: training pixels drawn per class (and half as many validation pixels, from
            the same, training side of the scene; the test side is spatially disjoint).
        **kwargs: any :class:`RasterDataModule` option (patch_size, sampling, batch_size, ...).
    """

    def __init__(self, kind: SceneKind = "hsi_dsm", root: str = "data/synthetic", scene_seed: int = 0,
                 scene_height: int | None = None, scene_width: int | None = None, train_per_class: int = 60,
                 **kwargs):
        size = {"train_per_class": train_per_class}
        if scene_height is not None:
            size["height"] = scene_height
        if scene_width is not None:
            size["width"] = scene_width
        paths = ensure_scene(root, kind, scene_seed, **size)
        modalities = {name: str(p) for name, p in paths.items() if name not in ("train", "val", "test")}
        if not kwargs.get("class_names"):
            kwargs["class_names"] = MSPAN_CLASSES if kind == "ms_pan" else HSI_CLASSES
        kwargs["val_labels"] = kwargs.get("val_labels") or str(paths["val"])
        if kind == "ms_pan" and kwargs.get("allow_even_patch") is None:
            kwargs["allow_even_patch"] = True  # as MSPanDataModule: MS/PAN models use even patches
        super().__init__(modalities=modalities, train_labels=str(paths["train"]), test_labels=str(paths["test"]),
                         **kwargs)
