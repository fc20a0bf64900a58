"""The shared layers (lightning_modules/networks/layers.py) keep M3amba's and DAS2F's networks as they were.

M3ambaNet and DAS2FNet were checked against their authors' code with the authors' weights mapped
in, so moving their repeated pieces (DropPath, Mlp, the Mamba dt/A/D initialisation, the directional
SSM parameters) into one module must change neither a state_dict key nor a single bit of a seeded
initialisation (same RNG draws in the same order). The digests below were recorded from the code
before the move (commit e6f51fd) with torch 2.x's CPU generator; if a torch or transformers upgrade
changes the RNG streams, re-record them from that commit.
"""
import hashlib

import pytest
import torch
from transformers import CLIPVisionConfig

from rsfusion.lightning_modules.networks.das2f import DAS2FNet
from rsfusion.lightning_modules.networks.m3amba import M3ambaNet


def state_digest(module):
    """sha256 over every state_dict entry's key, shape, dtype and bytes, in state_dict order."""
    digest = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        digest.update(f"{key}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def seeded_m3amba():
    torch.manual_seed(0)
    clip = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                            image_size=32, patch_size=16, projection_dim=8)
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
    "m3amba": (seeded_m3amba, "ecaf576664fc3a59", 198, 30.60901939868927,
               [-0.0002670884132385254, 0.019143283367156982, -0.1185113787651062]),
    "das2f-2-stages": (seeded_das2f, "6f2d047d2d715ec3", 210, 0.39306050539016724,
                       [0.16092559695243835, -0.06230759620666504, 0.04229869693517685]),
    "das2f-1-stage": (lambda: seeded_das2f(stages=1), "459c59d7bc95f8b3", 112, -0.8454050049185753,
                      [-0.3217107057571411, 0.1346641629934311, -0.14055433869361877]),
}


@pytest.mark.parametrize("name", list(RECORDED))
def test_seeded_network_state_dict_and_outputs_are_unchanged(name):
    build, digest, entries, logit_sum, first_logits = RECORDED[name]
    net = build().eval()
    assert len(net.state_dict()) == entries
    assert state_digest(net) == digest
    hsi, aux, ms, pan = inputs()
    with torch.no_grad():
        logits = net(hsi, aux)[2] if name == "m3amba" else net(ms, pan)
    assert logits.double().sum().item() == pytest.approx(logit_sum, abs=1e-4)
    torch.testing.assert_close(logits.flatten()[:3], torch.tensor(first_logits), rtol=0, atol=1e-5)
