"""BDGF stage 2: the whole-scene diffusion feature bank of a frozen DDPM, as a cached artefact.

The bank (decoder ``levels`` at ``timesteps``, averaged or concatenated, tiles of ``tile`` with
``overlap``, one fixed noise field [D]) is a (F, H, W) fp16 ``.npy`` on the scene grid,
cached under a key that hashes the DDPM's weights, the normalised scene and these options, with a
``.json`` of its provenance beside it (:func:`rsfusion.datamodules.feature_bank.save_bank`). The
classifier reads it as the modality ``ddpm_features``; ``predict_window`` memory-maps it.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from rsfusion.datamodules.tiling import padded_shape, sliding_tiles
from rsfusion.lightning_modules.bdgf_pretrain import denoiser_from_payload
from rsfusion.lightning_modules.networks.bdgf_diffusion import DiffusionSchedule, MultimodalDenoiserUNet, _check_choice

__all__ = ["BLENDS", "TIMESTEP_REDUCTIONS", "build_feature_bank", "extract_feature_cube", "feature_cube_channels",
           "scene_noise"]

BLENDS = ("mean", "center")
TIMESTEP_REDUCTIONS = ("mean", "concat")


def scene_noise(channels: int, height: int, width: int, seed: int) -> Tensor:
    """The fixed noise field eps (C, H, W) for a scene: depends only on the seed and the shape.

    One field for the whole scene (each tile crops its window of it), so every pixel sees the same
    eps whatever the tiling, and the same field is used for every timestep ("shared noise").
    """
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn(channels, height, width, generator=generator)


def feature_cube_channels(denoiser: MultimodalDenoiserUNet, levels: Sequence[int] = (0, 1, 2),
                          num_timesteps: int = 1, timestep_reduction: str = "mean") -> dict[int, int]:
    """{level: channels} of the blocks of an ``extract_feature_cube`` output, in cube order.

    ``torch.split(cube, list(feature_cube_channels(...).values()))`` gives the per-level cubes.
    """
    _check_choice("timestep_reduction", timestep_reduction, TIMESTEP_REDUCTIONS)
    if not levels or any(lvl not in denoiser.feature_channels for lvl in levels):
        raise ValueError(f"levels must be non-empty and in {sorted(denoiser.feature_channels)}, got {tuple(levels)}")
    factor = num_timesteps if timestep_reduction == "concat" else 1
    return {lvl: denoiser.feature_channels[lvl] * factor for lvl in levels}


def _blend_weights(tile: int, origin: int, padded: int, overlap: int, blend: str) -> Tensor:
    """1-D stitching weights of one tile along one axis."""
    w = torch.ones(tile)
    if blend == "center":
        lo, hi = overlap // 2, overlap - overlap // 2
        if origin > 0:
            w[:lo] = 0
        if origin + tile < padded:
            w[tile - hi:] = 0
    return w


@torch.no_grad()
def extract_feature_cube(denoiser: MultimodalDenoiserUNet, schedule: DiffusionSchedule,
                         modalities: Mapping[str, Tensor], timesteps: Sequence[int] = (50, 150),
                         levels: Sequence[int] = (0, 1, 2), tile: int = 32, overlap: int = 16,
                         batch_size: int = 16, seed: int = 0, blend: str = "mean",
                         timestep_reduction: str = "mean", dtype: torch.dtype = torch.float32,
                         progress: Callable[[int, int], None] | None = None) -> Tensor:
    """Frozen-denoiser features of a whole scene, computed in overlapping tiles and stitched.

    ``modalities`` maps every modality name of the denoiser to a (C_m, H, W) tensor on a common
    grid (already normalised as in training). For each tile and each timestep t in ``timesteps``:
    x_t = q_sample(x0, t, eps) with eps from ``scene_noise(C, H, W, seed)``, one UNet pass (no
    masking), the decoder maps of ``levels`` upsampled bilinearly to tile resolution. Timesteps
    are averaged (``timestep_reduction="mean"`` [D]) or concatenated (``"concat"``), and tiles are
    stitched with ``blend="mean"`` (uniform average in overlaps, default [D]) or
    ``"center"`` (each pixel taken from the tile(s) where it lies at least ``overlap // 2`` from
    an inner tile edge, which equals an untiled pass when the network is local and its receptive
    field radius is at most ``overlap // 2``).

    The scene is reflect-padded at the bottom/right to a whole number of tiles, and cropped back.
    ``tile`` and the stride ``tile - overlap`` must be multiples of ``denoiser.downsample_factor``
    so every tile sits on the same down-sampling grid as an untiled pass.
    ``progress(done, total)`` is called once per finished tile, if given.

    Returns (F, H, W) in ``dtype`` on the CPU; channels are the levels in the order given, each
    ``denoiser.feature_channels[level]`` wide (times ``len(timesteps)`` when concatenating, with
    the timesteps consecutive inside a level): see :func:`feature_cube_channels`.
    """
    _check_choice("blend", blend, BLENDS)
    _check_choice("timestep_reduction", timestep_reduction, TIMESTEP_REDUCTIONS)
    names = denoiser.modality_names
    if set(modalities) != set(names):
        raise ValueError(f"modalities must have exactly the keys {names}, got {sorted(modalities)}")
    shapes = {n: tuple(modalities[n].shape) for n in names}
    if any(len(s) != 3 for s in shapes.values()) or len({s[1:] for s in shapes.values()}) != 1:
        raise ValueError(f"modalities must be (C, H, W) tensors on a common grid, got {shapes}")
    for n in names:
        if shapes[n][0] != denoiser.modality_channels[n]:
            raise ValueError(f"modality {n!r} has {shapes[n][0]} bands, the denoiser expects "
                             f"{denoiser.modality_channels[n]}")
    if not timesteps or any(not 0 <= int(t) < schedule.num_timesteps for t in timesteps):
        raise ValueError(f"timesteps must be non-empty and in [0, {schedule.num_timesteps}), got {tuple(timesteps)}")
    level_width = feature_cube_channels(denoiser, levels, len(timesteps), timestep_reduction)
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must satisfy 0 <= overlap < tile, got overlap={overlap}, tile={tile}")
    factor = denoiser.downsample_factor
    if tile % factor or (tile - overlap) % factor:
        raise ValueError(f"tile ({tile}) and tile - overlap ({tile - overlap}) must be multiples of "
                         f"the denoiser's downsample factor {factor}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    param = next(denoiser.parameters())
    device = param.device
    x0 = torch.cat([modalities[n].float().cpu() for n in names], dim=0)
    channels, height, width = x0.shape
    noise = scene_noise(channels, height, width, seed)
    stride = tile - overlap
    ph, pw = padded_shape((height, width), tile, stride)
    if (ph, pw) != (height, width):
        pad = (0, pw - width, 0, ph - height)
        mode = "reflect" if ph - height < height and pw - width < width else "replicate"
        x0 = F.pad(x0[None], pad, mode=mode)[0]
        noise = F.pad(noise[None], pad, mode=mode)[0]

    total_channels = sum(level_width.values())
    acc = torch.zeros(total_channels, ph, pw)
    weight = torch.zeros(ph, pw)
    origins = sliding_tiles((ph, pw), tile, stride)
    was_training = denoiser.training
    denoiser.eval()
    try:
        for start in range(0, len(origins), batch_size):
            chunk = origins[start:start + batch_size]
            clean = torch.stack([x0[:, y:y + tile, x:x + tile] for y, x in chunk]).to(device)
            eps = torch.stack([noise[:, y:y + tile, x:x + tile] for y, x in chunk]).to(device)
            per_t = []
            for t in timesteps:
                tt = torch.full((len(chunk),), int(t), dtype=torch.long, device=device)
                _, feats = denoiser(schedule.q_sample(clean, tt, eps), tt, return_features=True,
                                    feature_levels=levels)
                per_t.append([F.interpolate(feats[lvl].float(), size=(tile, tile), mode="bilinear",
                                            align_corners=False) for lvl in levels])
            if timestep_reduction == "mean":
                stacked = torch.cat([torch.stack([f[i] for f in per_t]).mean(dim=0) for i in range(len(levels))], dim=1)
            else:
                stacked = torch.cat([torch.cat([f[i] for f in per_t], dim=1) for i in range(len(levels))], dim=1)
            stacked = stacked.cpu()
            for k, (y, x) in enumerate(chunk):
                w = (_blend_weights(tile, y, ph, overlap, blend)[:, None]
                     * _blend_weights(tile, x, pw, overlap, blend)[None])
                acc[:, y:y + tile, x:x + tile] += stacked[k] * w
                weight[y:y + tile, x:x + tile] += w
                if progress is not None:
                    progress(start + k + 1, len(origins))
    finally:
        denoiser.train(was_training)
    return (acc / weight.clamp(min=1e-12))[:, :height, :width].to(dtype)


def build_feature_bank(payload: Mapping[str, Any], data: Mapping[str, np.ndarray], *, timesteps: Sequence[int],
                       levels: Sequence[int], tile: int, overlap: int, batch_size: int, seed: int,
                       timestep_reduction: str, device: torch.device | str = "cpu") -> np.ndarray:
    """The fp16 (F, H, W) bank of a DDPM payload over the normalised, unpadded modalities ``data``."""
    denoiser, schedule = denoiser_from_payload(payload)
    denoiser, schedule = denoiser.to(device), schedule.to(device)
    rank_zero_info(f"BDGF: extracting diffusion features (levels {list(levels)}, timesteps {list(timesteps)}) over "
                   f"the {data[next(iter(data))].shape[1:]} scene")
    start = time.perf_counter()
    marks = set()

    def progress(done: int, total: int) -> None:
        quarter = 4 * done // total
        if quarter not in marks and quarter > 0:
            marks.add(quarter)
            rank_zero_info(f"BDGF: feature tiles {done}/{total} ({time.perf_counter() - start:.1f} s)")

    tensors = {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in data.items()}
    cube = extract_feature_cube(denoiser, schedule, tensors, timesteps=timesteps, levels=levels, tile=tile,
                                overlap=overlap, batch_size=batch_size, seed=seed,
                                timestep_reduction=timestep_reduction, progress=progress)
    return cube.numpy().astype(np.float16)


if __name__ == "__main__":  # the pre-``rsfusion bank`` spelling: python -m rsfusion.lightning_modules.bdgf_features
    from rsfusion.lightning_modules.commands.bank import main

    main()
