"""BDGF stage 2: the tiled diffusion feature cube equals a single pass over the scene."""
import pytest
import torch
import torch.nn.functional as F

from rsfusion.lightning_modules.bdgf_features import extract_feature_cube, feature_cube_channels, scene_noise
from rsfusion.lightning_modules.networks.bdgf import (
    BDGFNet,
)
from rsfusion.lightning_modules.networks.bdgf_diffusion import (
    DiffusionSchedule,
    MultimodalDenoiserUNet,
)

MODS = {"hsi": 6, "sar": 2}

@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny ops run ~100x faster single-threaded on shared, oversubscribed CI cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
K, P, D = 3, 5, 16


def tiny_unet(**kwargs):
    cfg = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
               attention_heads=2, stem_channels=4, norm_groups=4, dropout=0.0)
    cfg.update(kwargs)
    return MultimodalDenoiserUNet(MODS, **cfg)


def patches(batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(batch, c, P, P, generator=g) for n, c in MODS.items()}


def guides(batch=4, seed=1, channels=(8, 12, 10)):
    g = torch.Generator().manual_seed(seed)
    return {b: torch.randn(batch, c, P, P, generator=g) for b, c in zip(("cnn", "mamba", "transformer"), channels)}


def tiny_net(**kwargs):
    cfg = dict(guide_channels={"cnn": 8, "mamba": 12, "transformer": 10}, patch_size=P, dim=D, proj_dim=8,
               mamba_kwargs=dict(d_state=4), transformer_kwargs=dict(heads=2))
    cfg.update(kwargs)
    return BDGFNet(MODS, K, **cfg)


def test_tiled_feature_cube_equals_single_pass():
    torch.manual_seed(0)
    net = tiny_unet(attention_levels=(), norm="none").eval()  # purely local network
    sch = DiffusionSchedule(100)
    height, width, timesteps, levels = 160, 96, (5, 30), (1, 0)
    g = torch.Generator().manual_seed(1)
    scene = {n: torch.randn(c, height, width, generator=g) for n, c in MODS.items()}

    x0 = torch.cat([scene["hsi"], scene["sar"]])[None]
    eps = scene_noise(8, height, width, seed=3)[None]
    per_t = []
    with torch.no_grad():
        for t in timesteps:
            tt = torch.tensor([t])
            feats = net(sch.q_sample(x0, tt, eps), tt, return_features=True)[1]
            per_t.append(torch.cat([F.interpolate(feats[lvl], size=(height, width), mode="bilinear")
                                    for lvl in levels], dim=1))
    reference = torch.stack(per_t).mean(dim=0)[0]

    calls = []
    # receptive-field radius of this net is 30 px < overlap / 2 = 32: tiling must be invisible
    tiled = extract_feature_cube(net, sch, scene, timesteps, levels, tile=96, overlap=64, batch_size=2,
                                 seed=3, blend="center", progress=lambda done, total: calls.append((done, total)))
    assert feature_cube_channels(net, levels) == {1: 16, 0: 8}
    assert tiled.shape == (16 + 8, height, width)
    torch.testing.assert_close(tiled, reference, rtol=1e-4, atol=1e-5)
    assert calls == [(1, 3), (2, 3), (3, 3)]

    # too little overlap: the tile borders show (so the comparison above is not vacuous)
    no_overlap = extract_feature_cube(net, sch, scene, timesteps, levels, tile=32, overlap=0, seed=3)
    assert (no_overlap - reference).abs().max() > 1e-2
    # a different seed gives different (deterministic) features
    other = extract_feature_cube(net, sch, scene, timesteps, levels, tile=96, overlap=64, seed=4, blend="center")
    assert (other - tiled).abs().max() > 1e-3
    concat = extract_feature_cube(net, sch, scene, timesteps, (0,), tile=96, overlap=64, seed=3,
                                  timestep_reduction="concat", dtype=torch.float16)
    assert concat.shape == (16, height, width) and concat.dtype == torch.float16

    with pytest.raises(ValueError, match="multiples"):
        extract_feature_cube(net, sch, scene, timesteps, levels, tile=33, overlap=1)
    with pytest.raises(ValueError, match="bands"):
        extract_feature_cube(net, sch, {"hsi": scene["hsi"][:5], "sar": scene["sar"]}, timesteps, levels)


# ------------------------------------------------------------------ stage 2: guidance
