"""Patches, tiles, normalisation and splits, checked against direct array arithmetic."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from rsfusion.datamodules import RasterDataModule
from rsfusion.datamodules.io import Raster, read_raster
from rsfusion.datamodules.normalization import fit_normalizers, in_memory_reader, sampled
from rsfusion.datamodules.sampling import IGNORE_INDEX, ClassBalancedSampler, EpochShuffleSampler, TileDataset
from rsfusion.datamodules.scene import Scene
from rsfusion.datamodules.splits import block_split, pixels_inside_patches
from tests.conftest import write_tif


def _split_labels(shape, rng):
    labels = rng.integers(1, 4, size=shape).astype(np.uint8)
    coin = rng.random(shape)
    return np.where(coin < 0.3, labels, 0).astype(np.uint8), np.where(coin > 0.6, labels, 0).astype(np.uint8)


@pytest.mark.parametrize("patch_size", [5, 6])
def test_pixel_patches_equal_direct_slicing(tmp_path, patch_size):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(3, 17, 23)).astype(np.float32)
    train, test = _split_labels((17, 23), rng)
    path = write_tif(tmp_path / "x.tif", data)
    dm = RasterDataModule({"x": str(path)}, train_labels=str(write_tif(tmp_path / "tr.tif", train)),
                          test_labels=str(write_tif(tmp_path / "te.tif", test)), patch_size=patch_size,
                          normalization="none", allow_even_patch=True)
    dm.setup("test")
    before = (patch_size - 1) // 2
    padded = np.pad(data, ((0, 0), (patch_size, patch_size), (patch_size, patch_size)), mode="reflect")
    batch = dm.test_dataset.__getitems__(np.arange(len(dm.test_dataset)))
    for i, (r, c) in enumerate(zip(dm.test_dataset.rows, dm.test_dataset.cols)):
        y0, x0 = r - before + patch_size, c - before + patch_size
        np.testing.assert_array_equal(batch["x"][i].numpy(), padded[:, y0:y0 + patch_size, x0:x0 + patch_size])
        assert batch["label"][i] == test[r, c] - 1
    assert len(dm.test_dataset) == (test > 0).sum()


def test_ms_pan_patches_cover_the_same_ground(tmp_path):
    """Pixel values encode their own ground coordinates, so aligned patches agree everywhere."""
    h, w, r = 12, 10, 4
    yy, xx = np.mgrid[0:h, 0:w]
    ms = np.stack([yy * 1000 + xx, yy, xx, yy + xx]).astype(np.float32)
    fy, fx = np.mgrid[0:h * r, 0:w * r]
    pan = ((fy // r) * 1000 + fx // r).astype(np.float32)
    ms_path = write_tif(tmp_path / "ms.tif", ms, res=4.0)
    pan_path = write_tif(tmp_path / "pan.tif", pan, res=1.0)
    train, test = _split_labels((h, w), np.random.default_rng(1))
    dm = RasterDataModule({"ms": str(ms_path), "pan": str(pan_path)},
                          train_labels=str(write_tif(tmp_path / "tr.tif", train, res=4.0)),
                          test_labels=str(write_tif(tmp_path / "te.tif", test, res=4.0)),
                          patch_size=4, normalization="none", allow_even_patch=True)
    assert dm.ratios == {"ms": 1, "pan": 4}
    dm.setup("test")
    rows, cols = dm.test_dataset.rows, dm.test_dataset.cols
    batch = dm.test_dataset.__getitems__(np.arange(len(rows)))
    assert batch["ms"].shape[1:] == (4, 4, 4) and batch["pan"].shape[1:] == (1, 16, 16)
    # inside the image every PAN block averages to its MS pixel (reflect padding at the borders
    # mirrors each grid at its own resolution, as the authors' padding does)
    inside = (rows >= 1) & (rows + 2 < h) & (cols >= 1) & (cols + 2 < w)
    assert inside.sum() > 5
    block_mean = batch["pan"][inside, 0].reshape(-1, 4, 4, 4, 4).float().mean(dim=(2, 4))
    np.testing.assert_array_equal(block_mean.numpy(), batch["ms"][inside, 0].numpy())
    # the sampled pixel sits at index (p-1)//2 = 1 of its MS patch and rows 4..7 of its PAN patch
    np.testing.assert_array_equal(batch["ms"][:, 0, 1, 1].numpy(), rows * 1000 + cols)
    np.testing.assert_array_equal(batch["pan"][:, 0, 4:8, 4:8].numpy(),
                                  np.broadcast_to((rows * 1000 + cols)[:, None, None], (len(rows), 4, 4)))


def test_tile_evaluation_counts_each_test_pixel_once(tmp_path):
    rng = np.random.default_rng(2)
    shape = (45, 38)
    train, test = _split_labels(shape, rng)
    dm = RasterDataModule({"x": str(write_tif(tmp_path / "x.tif", rng.normal(size=(2, *shape)).astype(np.float32)))},
                          train_labels=str(write_tif(tmp_path / "tr.tif", train)),
                          test_labels=str(write_tif(tmp_path / "te.tif", test)), sampling="tile", patch_size=16)
    dm.setup("test")
    batch = dm.test_dataset.__getitems__(np.arange(len(dm.test_dataset)))
    labels = batch["label"].numpy()
    assert (labels != IGNORE_INDEX).sum() == (test > 0).sum()
    assert np.array_equal(np.bincount(labels[labels >= 0]), np.bincount(test[test > 0] - 1))


def _fit(pixels: np.ndarray, mode: str, clip=None, valid=None, seed=0, windows=None):
    """fit_normalizers on one in-memory (bands, 1, n) modality."""
    raster = Raster("x.tif", pixels[:, None, :], np.ones((1, pixels.shape[1]), bool) if valid is None else valid[None])
    shape = (1, pixels.shape[1])
    read = in_memory_reader({"x": raster}, raster.valid, {"x": 1})
    return fit_normalizers(read, windows or [(0, 1, 0, shape[1])], shape, {"x": 1}, {"x": "x.tif"}, {"x": mode},
                           clip, None, None, seed)["x"]


def test_normalisation_uses_valid_pixels_and_survives_constant_bands():
    pixels = np.stack([np.arange(10.0), np.full(10, 7.0)])
    out = _fit(pixels, "zscore").apply(pixels[:, None], np.ones((1, 10), bool))[:, 0]
    np.testing.assert_allclose(out[0].mean(), 0, atol=1e-6)
    np.testing.assert_allclose(out[0].std(), 1, atol=1e-5)
    np.testing.assert_array_equal(out[1], 0)  # constant band: no division by zero
    minmax = _fit(pixels, "minmax").apply(pixels[:, None], np.ones((1, 10), bool))[:, 0]
    np.testing.assert_allclose(minmax[0], np.arange(10) / 9, rtol=1e-6)
    clipped = _fit(np.arange(101.0)[None], "minmax", 10).apply(np.array([[[0.0, 100.0]]]), np.ones((1, 2), bool))
    np.testing.assert_allclose(clipped.ravel(), [0, 1])
    # invalid pixels neither count in the statistics nor keep their value: they get the mean (0 under zscore)
    valid = np.arange(12) < 10
    spiked = np.concatenate([pixels, [[1e6, 1e6], [1e6, 1e6]]], axis=1)
    normalizer = _fit(spiked, "zscore", valid=valid)
    np.testing.assert_allclose(normalizer.stats.offset, [4.5, 7.0])
    np.testing.assert_allclose(normalizer.stats.scale, [np.arange(10.0).std(), 1.0], rtol=1e-6)
    np.testing.assert_allclose(normalizer.apply(spiked[:, None], valid[None])[:, 0, 10:], 0, atol=1e-6)


def test_clip_percentiles_of_a_large_scene_come_from_a_seeded_sample_of_fixed_pixels(monkeypatch):
    monkeypatch.setattr("rsfusion.datamodules.normalization.MAX_PERCENTILE_SAMPLES", 500)
    pixels = np.random.default_rng(0).normal(size=(1, 4000)) ** 3
    cols = np.arange(4000)
    chosen = sampled(np.zeros(4000, dtype=np.int64), cols, 4000, 500 / 4000, seed=3)
    assert 400 < chosen.sum() < 600
    assert not np.array_equal(chosen, sampled(np.zeros(4000, dtype=np.int64), cols, 4000, 500 / 4000, seed=4))
    whole = _fit(pixels, "none", clip=5.0, seed=3)
    windows = _fit(pixels, "none", clip=5.0, seed=3, windows=[(0, 1, c, min(c + 333, 4000)) for c in range(0, 4000,
                                                                                                           333)])
    want = np.percentile(pixels[0, chosen], [5, 95])  # the percentiles of exactly the sampled pixels
    np.testing.assert_allclose([whole.stats.lo[0], whole.stats.hi[0]], want, rtol=1e-6)
    np.testing.assert_array_equal(windows.stats.lo, whole.stats.lo)
    np.testing.assert_array_equal(windows.stats.hi, whole.stats.hi)
    assert whole.stats.lo[0] != np.float32(np.percentile(pixels, 5))  # a sample, not all the pixels


def test_block_split_is_disjoint_stratified_and_guarded():
    rng = np.random.default_rng(3)
    labels = np.repeat(np.repeat(rng.integers(1, 4, size=(8, 8)), 8, 0), 8, 1).astype(np.uint8)
    kept, held = block_split(labels, 0.3, block_size=8, seed=0, guard=2)
    assert not ((kept > 0) & (held > 0)).any()
    for k in (1, 2, 3):
        frac = (held == k).sum() / (labels == k).sum()
        assert 0.1 < frac < 0.6 and (kept == k).any()
    # no kept pixel lies within 2 pixels of a held-out pixel
    near = np.zeros_like(held, dtype=bool)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            near |= np.roll(np.roll(held > 0, dy, 0), dx, 1)
    assert not (near & (kept > 0))[2:-2, 2:-2].any()


@pytest.mark.parametrize("patch_size", [1, 4, 5])
def test_leakage_count_matches_brute_force(patch_size):
    rng = np.random.default_rng(4)
    train = (rng.random((20, 25)) < 0.05).astype(int)
    test = ((rng.random((20, 25)) < 0.3) & (train == 0)).astype(int)
    before, after = (patch_size - 1) // 2, patch_size // 2
    covered = np.zeros_like(train, dtype=bool)
    for r, c in zip(*np.nonzero(train)):
        covered[max(0, r - before):r + after + 1, max(0, c - before):c + after + 1] = True
    assert pixels_inside_patches(train, test, patch_size) == (covered & (test > 0)).sum()


def test_synthetic_scene_needs_both_modalities(tiny_hsi_scene):
    """Trees and grass share spectra; only elevation tells them apart (and the reverse for roofs/trees)."""
    hsi = read_raster(tiny_hsi_scene["hsi"]).data
    dsm = read_raster(tiny_hsi_scene["dsm"]).data[0]
    train = read_raster(tiny_hsi_scene["train"]).data[0]
    trees, grass, roofs = train == 1, train == 2, train == 3
    same_spectrum = np.abs(hsi[:, trees].mean(1) - hsi[:, grass].mean(1)).max()
    different_spectrum = np.abs(hsi[:, trees].mean(1) - hsi[:, roofs].mean(1)).max()
    assert different_spectrum > 5 * same_spectrum
    height_gap = dsm[trees].mean() - dsm[grass].mean()
    assert height_gap > 4 and abs(dsm[trees].mean() - dsm[roofs].mean()) < 0.5 * height_gap


def _draws(sampler, epochs) -> np.ndarray:
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        out.extend(sampler)
    return np.array(out)


def test_balanced_sampler_draws_each_class_equally_and_each_sample_by_inverse_class_size():
    sizes = [2000, 300, 40, 3]
    classes = np.random.default_rng(0).permutation(np.repeat(np.arange(4), sizes))
    sampler = ClassBalancedSampler(classes, seed=7)
    assert len(sampler) == len(classes) and len(list(sampler)) == len(classes)  # as many per epoch as there are
    draws = _draws(sampler, 10)
    n = len(draws)
    per_class = np.bincount(classes[draws], minlength=4)
    bound = 5 * np.sqrt(n * 0.25 * 0.75)  # binomial, 5 sigma
    assert np.all(np.abs(per_class - n / 4) < bound), per_class
    # within the 3-sample class each sample has probability 1 / (4 * 3)
    counts = np.bincount(draws, minlength=len(classes))[classes == 3]
    p = 1 / 12
    assert np.all(np.abs(counts - n * p) < 5 * np.sqrt(n * p * (1 - p))), counts
    # a sample of the largest class: probability 1 / (4 * 2000), about 2.8 draws in 22,343
    big = np.bincount(draws, minlength=len(classes))[classes == 0]
    assert abs(big.mean() - n / (4 * 2000)) < 0.2


def test_balanced_sampler_is_a_function_of_seed_and_epoch():
    classes = np.repeat(np.arange(3), [50, 20, 5])
    a, b = ClassBalancedSampler(classes, seed=3), ClassBalancedSampler(classes, seed=3)
    for epoch in (0, 4):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        assert list(a) == list(b)
    a.set_epoch(1)
    b.set_epoch(2)
    assert list(a) != list(b)
    assert list(ClassBalancedSampler(classes, seed=4)) != list(ClassBalancedSampler(classes, seed=3))


@pytest.mark.parametrize("sampler_class", [EpochShuffleSampler, ClassBalancedSampler])
def test_ddp_ranks_split_one_draw_sequence_disjointly(sampler_class):
    classes = np.repeat(np.arange(3), [40, 12, 5])  # 57 samples: 3 ranks of 19, 4 ranks of 15 (3 wrapped)
    make = (lambda **kw: ClassBalancedSampler(classes, seed=5, **kw)) if sampler_class is ClassBalancedSampler \
        else (lambda **kw: EpochShuffleSampler(len(classes), seed=5, **kw))
    single = make()
    single.set_epoch(2)
    whole = list(single)
    for world in (3, 4):
        ranks = []
        for rank in range(world):
            sampler = make(num_replicas=world, rank=rank)
            sampler.set_epoch(2)
            ranks.append(list(sampler))
        assert {len(r) for r in ranks} == {-(-len(classes) // world)}
        # rank k takes positions k, k + world, ...: the positions are disjoint and rebuild one sequence
        rebuilt = [ranks[i % world][i // world] for i in range(world * len(ranks[0]))]
        assert rebuilt[:len(whole)] == whole
        assert rebuilt[len(whole):] == whole[:len(rebuilt) - len(whole)]  # padding wraps around


@pytest.mark.parametrize("length,world", [(57, 4), (57, 3), (5, 8), (64, 4)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_samplers_size_their_rank_shares_like_torchs_distributed_sampler(length, world, drop_last):
    torch_samplers = [DistributedSampler(range(length), world, rank, drop_last=drop_last) for rank in range(world)]
    ours = [EpochShuffleSampler(length, seed=9, num_replicas=world, rank=rank, drop_last=drop_last)
            for rank in range(world)]
    balanced = ClassBalancedSampler(np.arange(length) % 3, seed=9, num_replicas=world, rank=world - 1,
                                    drop_last=drop_last)
    for mine, theirs in zip(ours + [balanced], torch_samplers + [torch_samplers[-1]]):
        assert isinstance(mine, DistributedSampler) and mine.shuffle and mine.drop_last is drop_last
        assert (len(mine), mine.num_samples, mine.total_size) == (len(theirs), theirs.num_samples, theirs.total_size)
        assert len(list(mine)) == len(mine)
    shares = [list(s) for s in ours]
    taken = [i for share in shares for i in share]
    if drop_last:  # no index twice, the tail of the permutation left out
        assert len(set(taken)) == len(taken) == length - length % world
    else:  # every index, the first ones again on the last ranks
        assert set(taken) == set(range(length)) and len(taken) == -(-length // world) * world
    with pytest.raises(ValueError, match="Invalid rank"):
        EpochShuffleSampler(length, seed=9, num_replicas=world, rank=world)


def test_sampler_order_is_the_seeded_permutation_of_its_epoch():
    sampler = EpochShuffleSampler(50, seed=7)
    assert (sampler.num_replicas, sampler.rank, sampler.seed, sampler.epoch) == (1, 0, 7, 0)
    for epoch in (0, 3):
        sampler.set_epoch(epoch)
        want = torch.randperm(50, generator=torch.Generator().manual_seed(7 * 1_000_003 + epoch)).tolist()
        assert list(sampler) == want


def test_tile_rarest_class_against_brute_force():
    rng = np.random.default_rng(4)
    h, w, tile = 21, 26, 8
    labels = rng.choice([IGNORE_INDEX, 0, 1, 2, 3], p=[0.5, 0.3, 0.12, 0.05, 0.03], size=(h, w))
    labels[:, :6] = np.where(labels[:, :6] >= 0, 0, IGNORE_INDEX)  # tiles holding class 0 only
    scene = Scene({"x": np.zeros((1, h + 2 * tile, w + 2 * tile), np.float32)}, {"x": 1}, np.ones((h, w), bool), tile)
    ys, xs = np.arange(-4, h - 4, 3), np.arange(-4, w - 4, 3)
    origins = np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)
    dataset = TileDataset(scene, origins, tile, labels)
    counts = np.bincount(labels[labels >= 0])
    expected = []
    for y, x in origins:
        window = labels[max(y, 0):y + tile, max(x, 0):x + tile]
        present = np.unique(window[window >= 0])
        expected.append(min(present, key=lambda c: (counts[c], c)) if len(present) else IGNORE_INDEX)
    np.testing.assert_array_equal(dataset.rarest_classes(), expected)
    assert 0 in expected and 3 in expected


def test_balanced_tile_sampling_through_the_datamodule(tmp_path):
    rng = np.random.default_rng(6)
    shape = (40, 44)
    train, test = _split_labels(shape, rng)
    train[train == 3] = 0
    train[5:7, 30:32], test[5:7, 30:32] = 3, 0  # one small patch of a rare class
    common = dict(modalities={"x": str(write_tif(tmp_path / "x.tif", rng.normal(size=(1, *shape)).astype(np.float32)))},
                  train_labels=str(write_tif(tmp_path / "tr.tif", train)),
                  test_labels=str(write_tif(tmp_path / "te.tif", test)), sampling="tile", patch_size=8,
                  train_stride=4, val_fraction=0)  # every training tile stays in the training set
    dm = RasterDataModule(**common, balanced_sampling=True)
    dm.setup("fit")
    sampler = dm.train_dataloader().sampler
    assert isinstance(sampler, ClassBalancedSampler)
    rarest = dm.train_dataset.rarest_classes()
    assert (rarest == 2).sum() <= 4 < len(rarest)  # only the tiles over the rare patch count as class 3
    draws = _draws(sampler, 40)
    freq = np.bincount(rarest[draws], minlength=3) / len(draws)
    k = len(np.unique(rarest))
    assert np.all(np.abs(freq[np.unique(rarest)] - 1 / k) < 5 * np.sqrt((1 / k) * (1 - 1 / k) / len(draws))), freq
    plain = RasterDataModule(**common)
    plain.setup("fit")
    assert type(plain.train_dataloader().sampler) is EpochShuffleSampler


@pytest.mark.parametrize("extra,order_seed", [([], 3), (["--data.init_args.seed", "11"], 11)])
def test_the_cli_run_orders_and_augments_training_batches_by_the_data_seed(tmp_path, monkeypatch, extra, order_seed):
    """Default: the data seed is the run's seed_everything, the seed the order came from before (torch's
    initial seed), so default runs keep their batches; an explicit data seed drives order and augmentation."""
    from types import SimpleNamespace

    from rsfusion.lightning_modules.commands.cli import RSFusionCLI, cli_kwargs
    from tests.conftest import tiny_config

    config = tiny_config(tmp_path, "demo", dict(scene_height=24, scene_width=32, train_per_class=8, patch_size=5,
                                                batch_size=8, augment={"flip": True}), dict(width=8))
    monkeypatch.chdir(tmp_path)
    cli = RSFusionCLI(**cli_kwargs(), args=["--config", str(config), "--seed_everything", "3", *extra], run=False)
    assert torch.initial_seed() == 3
    dm = cli.datamodule
    dm.setup("fit")
    sampler = dm.train_dataloader().sampler
    assert isinstance(sampler, EpochShuffleSampler) and sampler.seed == order_seed
    n = len(dm.train_dataset)
    sampler.set_epoch(1)
    generator = torch.Generator().manual_seed(order_seed * 1_000_003 + 1)
    assert list(sampler) == torch.randperm(n, generator=generator).tolist()

    seeds = []
    monkeypatch.setattr("rsfusion.datamodules.raster.batch_generator",
                        lambda seed, *args: seeds.append(seed) or torch.Generator().manual_seed(0))
    dm.trainer = SimpleNamespace(training=True, current_epoch=1, global_rank=0,
                                 fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_idx=0)))
    dm.on_after_batch_transfer(dm.train_dataset.__getitems__(list(range(4))), 0)
    assert seeds == [order_seed]
