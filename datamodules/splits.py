"""Train/validation/test splits on label maps (0 = unlabelled) and the patch-overlap leakage count."""
from __future__ import annotations

import numpy as np
from scipy.ndimage import maximum_filter


def _blocks(shape: tuple[int, int], block_size: int) -> np.ndarray:
    """Block id of every pixel for a grid of ``block_size`` squares."""
    rows = np.arange(shape[0]) // block_size
    cols = np.arange(shape[1]) // block_size
    return rows[:, None] * (cols.max() + 1) + cols[None, :]


def _takes_last_pixels(labels: np.ndarray, held: np.ndarray, block: np.ndarray) -> bool:
    """Would holding out ``block`` leave some class with no kept pixel?"""
    in_block = np.unique(labels[block & ~held & (labels > 0)])
    rest = labels[~held & ~block]
    return bool(np.setdiff1d(in_block, rest).size)


def block_split(labels: np.ndarray, fraction: float, block_size: int, seed: int,
                guard: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Move whole spatial blocks of ``labels`` out until each class has about ``fraction`` of its pixels.

    Returns (kept, held_out) label maps. Blocks are drawn per class, rarest class first, so the split
    is stratified; every class keeps at least one pixel on each side when it has two or more pixels
    (if a class lives in a single block, that class alone falls back to a pixel-wise split).
    ``guard`` pixels around held-out blocks are removed from ``kept`` so that patches of kept pixels
    do not see held-out pixels.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"split fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    block_id = _blocks(labels.shape, block_size)
    held = np.zeros(labels.shape, dtype=bool)
    classes, counts = np.unique(labels[labels > 0], return_counts=True)
    for cls in classes[np.argsort(counts)]:
        pixels = labels == cls
        target = fraction * pixels.sum()
        have = (pixels & held).sum()
        blocks = np.unique(block_id[pixels & ~held])
        rng.shuffle(blocks)
        limit = max(1.5 * target, 1)
        for b in blocks:
            if have >= target:
                break
            in_block = block_id == b
            gain = (pixels & ~held & in_block).sum()
            if have + gain > limit or _takes_last_pixels(labels, held, in_block):
                continue
            held |= in_block & (labels > 0)
            have = (pixels & held).sum()
        if have == 0 and pixels.sum() >= 2:
            coords = np.flatnonzero(pixels)
            take = rng.choice(coords, size=max(1, int(round(fraction * coords.size))), replace=False)
            held.flat[take] = True
    held_out = np.where(held, labels, 0)
    kept = np.where(held, 0, labels)
    if guard > 0:
        near = (maximum_filter(held.astype(np.uint8), size=2 * guard + 1) > 0) & ~held
        for cls in np.unique(kept[kept > 0]):
            if ((kept == cls) & ~near).any():  # the guard never removes a class's last pixels
                kept[near & (kept == cls)] = 0
    return kept, held_out


def patch_coverage(train: np.ndarray, patch_size: int) -> np.ndarray:
    """Mask of the pixels that lie inside at least one training pixel's input patch.

    The patch of pixel r covers rows r - (p-1)//2 .. r + p//2, so pixel y is covered when some
    training pixel lies in rows y - p//2 .. y + (p-1)//2 (likewise for columns).
    """
    before, after = (patch_size - 1) // 2, patch_size // 2
    h, w = train.shape
    integral = np.zeros((h + 1, w + 1), dtype=np.int64)
    integral[1:, 1:] = (train > 0).cumsum(0).cumsum(1)
    y0 = np.clip(np.arange(h) - after, 0, h)
    y1 = np.clip(np.arange(h) + before + 1, 0, h)
    x0 = np.clip(np.arange(w) - after, 0, w)
    x1 = np.clip(np.arange(w) + before + 1, 0, w)
    total = (integral[y1][:, x1] - integral[y0][:, x1] - integral[y1][:, x0] + integral[y0][:, x0])
    return total > 0


def pixels_inside_patches(train: np.ndarray, test: np.ndarray, patch_size: int) -> int:
    """How many labelled ``test`` pixels fall inside some training pixel's input patch."""
    return int((patch_coverage(train, patch_size) & (test > 0)).sum())
