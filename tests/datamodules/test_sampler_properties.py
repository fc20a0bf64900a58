"""Property-based test of the patch sampler over random rasters, patch sizes, ratios and nodata masks."""
from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rsfusion.datamodules.sampling import PixelPatchDataset
from rsfusion.datamodules.scene import load_scene
from tests.conftest import write_tif

SENTINEL = -9999.0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(h=st.integers(3, 14), w=st.integers(3, 14), patch=st.integers(1, 7), ratio=st.sampled_from([1, 2, 4]),
       nodata_fraction=st.floats(0, 0.5), seed=st.integers(0, 10_000))
def test_every_valid_labelled_pixel_once_and_no_sentinels(tmp_path_factory, h, w, patch, ratio, nodata_fraction,
                                                          seed):
    rng = np.random.default_rng(seed)
    folder = tmp_path_factory.mktemp("prop")
    coarse = rng.normal(size=(2, h, w)).astype(np.float32)
    holes = rng.random((h, w)) < nodata_fraction
    holes[0, 0] = False  # at least one valid pixel
    coarse[0][holes] = SENTINEL
    fine = rng.normal(size=(1, h * ratio, w * ratio)).astype(np.float32)
    paths = {"coarse": str(write_tif(folder / "c.tif", coarse, res=4.0 * ratio, nodata=SENTINEL)),
             "fine": str(write_tif(folder / "f.tif", fine, res=4.0))}
    labels = rng.integers(0, 4, size=(h, w))
    scene = load_scene(paths, pad=patch)
    assert np.array_equal(scene.valid, ~holes)
    rows, cols = np.nonzero((labels > 0) & scene.valid)
    dataset = PixelPatchDataset(scene, rows, cols, patch, labels[rows, cols] - 1)
    batch = dataset.__getitems__(np.arange(len(dataset)))
    # every valid labelled pixel exactly once, with its own label
    assert len(set(zip(rows.tolist(), cols.tolist()))) == len(dataset) == ((labels > 0) & ~holes).sum()
    assert np.array_equal(batch["label"].numpy(), labels[rows, cols] - 1)
    # patches have the right shape and never contain the raw sentinel (or anything non-finite)
    assert batch["coarse"].shape[1:] == (2, patch, patch)
    assert batch["fine"].shape[1:] == (1, patch * ratio, patch * ratio)
    for name in ("coarse", "fine"):
        values = batch[name].numpy()
        assert np.isfinite(values).all() and not np.isclose(values, SENTINEL).any()
