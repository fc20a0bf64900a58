"""The shared layers (rsfusion/lightning_modules/networks/layers.py) keep M3amba's and DAS2F's networks as they were.

M3ambaNet and DAS2FNet were checked against their authors' code with the authors' weights mapped
in, so moving their repeated pieces (DropPath, Mlp, the Mamba dt/A/D initialisation, the directional
SSM parameters) into one module must change neither a state_dict key nor a single bit of a seeded
initialisation (same RNG draws in the same order). The digests below were recorded from the code
before the move (commit e6f51fd) with torch 2.x's CPU generator; if a torch upgrade changes the RNG
streams, re-record them from that commit.

The frozen CLIP tower is not ours: how transformers initialises it (and how many random numbers it
draws doing so) changes between its releases. M3amba's digest therefore covers every entry but the
tower's, and the tower is built with the global RNG untouched and filled from its own generator, so
the digest and logits hold for every transformers release the project supports. (M3amba's figures
were re-recorded that way from code whose full digest still matched e6f51fd's, under transformers 5.25.)
"""
import hashlib
from unittest import mock

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from rsfusion.lightning_modules.networks.das2f import DAS2FNet
from rsfusion.lightning_modules.networks.m3amba import M3ambaNet


def state_digest(module):
    """sha256 over every state_dict entry's key, shape, dtype and bytes, in state_dict order (the frozen
    CLIP tower's entries aside)."""
    digest = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        if key.startswith("clip."):
            continue
        digest.update(f"{key}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def fixed_clip_tower(clip_model=None, clip_config=None):
    """A CLIP tower whose weights do not depend on transformers: built without touching the global RNG,
    then every parameter drawn from its own generator (in name order) at CLIP's 0.02 scale."""
    with torch.random.fork_rng():
        tower = CLIPVisionModelWithProjection(clip_config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, param in sorted(tower.named_parameters()):
            param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    return tower


def seeded_m3amba():
    torch.manual_seed(0)
    clip = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                            image_size=32, patch_size=16, projection_dim=8)
    with mock.patch("rsfusion.lightning_modules.networks.m3amba.load_clip_vision_tower", fixed_clip_tower):
        return M3ambaNet(hsi_channels=5, aux_channels=2, num_classes=3, dims=8, depth=2, d_state=4, image_size=6,
                         clip_config=clip)


def seeded_das2f(**kwargs):
    torch.manual_seed(0)
    return DAS2FNet(5, ms_patch_size=4, d_model=32, d_state=8, dt_rank=4, head_hidden=32, **kwargs)


def inputs():
    generator = torch.Generator().manual_seed(1)
    shapes = [(2, 5, 6, 6), (2, 2, 6, 6), (2, 4, 4, 4), (2, 1, 16, 16)]
    return [torch.rand(*shape, generator=generator) for shape in shapes]


# name -> (build, digest, number of state_dict entries, sum of the logits, first three logits)
RECORDED = {
    "m3amba": (seeded_m3amba, "23fab7563925c68b", 174, -129.8759921491146,
               [0.0171433687210083, -0.18412896990776062, -0.14953374862670898]),
    "das2f-2-stages": (seeded_das2f, "6f2d047d2d715ec3", 210, 0.39306050539016724,
                       [0.16092559695243835, -0.06230759620666504, 0.04229869693517685]),
    "das2f-1-stage": (lambda: seeded_das2f(stages=1), "459c59d7bc95f8b3", 112, -0.8454050049185753,
                      [-0.3217107057571411, 0.1346641629934311, -0.14055433869361877]),
}


@pytest.mark.parametrize("name", list(RECORDED))
def test_seeded_network_state_dict_and_outputs_are_unchanged(name):
    build, digest, entries, logit_sum, first_logits = RECORDED[name]
    net = build().eval()
    assert len([k for k in net.state_dict() if not k.startswith("clip.")]) == entries
    assert state_digest(net) == digest
    hsi, aux, ms, pan = inputs()
    with torch.no_grad():
        logits = net(hsi, aux)[2] if name == "m3amba" else net(ms, pan)
    assert logits.double().sum().item() == pytest.approx(logit_sum, abs=1e-4)
    torch.testing.assert_close(logits.flatten()[:3], torch.tensor(first_logits), rtol=0, atol=1e-5)
