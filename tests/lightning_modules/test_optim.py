"""Parameter groups (rsfusion/lightning_modules/optim.py): no weight decay on flagged SSM parameters and LayerNorms."""
import pytest
import torch
import torch.nn as nn

from rsfusion.lightning_modules.networks.ss2d import VSSBlock
from rsfusion.lightning_modules.optim import no_weight_decay_groups


def test_groups_exempt_a_logs_ds_and_norms_and_skip_frozen_parameters():
    torch.manual_seed(0)
    net = nn.ModuleDict({"block": VSSBlock(8, d_state=2), "frozen": nn.Linear(3, 3), "head": nn.Linear(8, 2)})
    net["frozen"].requires_grad_(False)
    decay, no_decay = no_weight_decay_groups(net, weight_decay=0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    block = net["block"]
    exempt = {id(p) for p in (block.op.ssm.A_logs, block.op.ssm.Ds, block.norm.weight, block.norm.bias,
                              block.norm2.weight, block.norm2.bias, block.op.out_norm.weight,
                              block.op.out_norm.bias)}
    trainable = [p for name, p in net.named_parameters() if not name.startswith("frozen.")]
    assert [id(p) for p in no_decay["params"]] == [id(p) for p in trainable if id(p) in exempt]
    assert [id(p) for p in decay["params"]] == [id(p) for p in trainable if id(p) not in exempt]
    assert len(exempt) == 8 and len(decay["params"]) == len(trainable) - 8


def test_negative_weight_decay_is_refused():
    with pytest.raises(ValueError, match="weight_decay must be >= 0, got -0.1"):
        no_weight_decay_groups(nn.Linear(2, 2), weight_decay=-0.1)
