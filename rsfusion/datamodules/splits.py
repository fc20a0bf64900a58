"""Train/validation/test splits on label maps (0 = unlabelled) and the patch-overlap leakage count."""
from __future__ import annotations

import numpy as np
from scipy.ndimage import maximum_filter

from rsfusion.datamodules.errors import InputError, RasterError


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


def per_class_quota(counts: np.ndarray, per_class: int | float, keep_test: bool = True) -> np.ndarray:
    """Training pixels to draw from classes with ``counts`` labelled pixels.

    ``per_class >= 1``: N pixels, capped at half the class (min(N, floor(count / 2)), the BDGF spec's
    rule, so every class keeps at least as many test pixels as training ones). ``0 < per_class < 1``:
    that fraction of each class, rounded, at least 1 and at most all but one pixel. A class of one
    pixel gets no training pixel. ``keep_test=False`` (drawing from a training map whose test set is
    elsewhere): capped at the whole class instead.
    """
    counts = np.asarray(counts, dtype=np.int64)
    most = np.maximum(counts - 1, 0) if keep_test else counts
    if per_class >= 1:
        return np.minimum(int(per_class), counts // 2 if keep_test else counts)
    return np.minimum(np.maximum(1, np.rint(per_class * counts).astype(np.int64)), most)


def check_per_class(per_class: int | float) -> None:
    if isinstance(per_class, bool) or not isinstance(per_class, (int, float)) or not per_class > 0 or \
            (per_class >= 1 and not float(per_class).is_integer()):
        raise InputError(f"train_per_class must be a whole number N >= 1 (pixels per class) or a fraction in "
                         f"(0, 1), got {per_class!r}")


def sample_per_class(labels: np.ndarray, per_class: int | float, seed: int, keep_test: bool = True) -> np.ndarray:
    """The training map of N labelled pixels per class (:func:`per_class_quota`) drawn uniformly at
    random from ``labels`` with ``seed``; every other pixel of the returned map is 0."""
    check_per_class(per_class)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels[labels > 0], return_counts=True)
    train = np.zeros_like(labels)
    for cls, n in zip(classes, per_class_quota(counts, per_class, keep_test)):
        take = rng.choice(np.flatnonzero(labels == cls), size=int(n), replace=False)
        train.flat[take] = cls
    return train


def guard_band(train: np.ndarray, test: np.ndarray, guard: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove from ``test`` every pixel within ``guard`` pixels (Chebyshev distance: inside the square
    window of side 2 * guard + 1) of a training pixel. With ``guard`` = half a patch no test pixel lies
    inside a training pixel's patch. Returns (kept test map, map of the removed test labels)."""
    if guard <= 0:
        return test, np.zeros_like(test)
    near = maximum_filter((train > 0).astype(np.uint8), size=2 * guard + 1) > 0
    removed = near & (test > 0)
    return np.where(removed, 0, test), np.where(removed, test, 0)


def per_class_split(labels: np.ndarray, per_class: int | float, seed: int,
                    guard: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The per-class sampling protocol on one label map: N random training pixels per class, every
    other labelled pixel for test except those within the guard band of a training pixel.

    Returns (train, test, removed): label maps of the training pixels, the test pixels and the test
    pixels the guard band removed.
    """
    train = sample_per_class(labels, per_class, seed)
    test, removed = guard_band(train, np.where(train > 0, 0, labels), guard)
    return train, test, removed


def remap_labels(labels: np.ndarray, renumber_classes: dict[int, int], path: str) -> np.ndarray:
    """Apply ``renumber_classes`` (old class value -> new value, 0 = unlabelled) to a label map whose 0 means
    unlabelled. Every class value present must be a key of the map."""
    mapping = {int(k): int(v) for k, v in renumber_classes.items()}
    if 0 in mapping:
        raise InputError("renumber_classes: key 0 is the unlabelled value and cannot be mapped; map classes 1..K")
    if min(mapping.values()) < 0:
        raise InputError("renumber_classes: new values must be 0 (drop) or classes 1..K, got "
                         f"{sorted(set(mapping.values()))}")
    present = np.unique(labels[labels > 0])
    missing = [int(v) for v in present if int(v) not in mapping]
    if missing:
        raise RasterError(f"{path}: label values {missing} are not in renumber_classes (keys {sorted(mapping)}); "
                         "map every class (0 = drop it)")
    lookup = np.zeros(int(max(present.max(initial=0), max(mapping))) + 1, dtype=np.int64)
    for old, new in mapping.items():
        lookup[old] = new
    return lookup[labels].astype(labels.dtype)
