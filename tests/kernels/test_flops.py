"""The selective scan's FLOPs: counted analytically by FlopCounterMode inside count_scan_flops."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from rsfusion.kernels import count_scan_flops, selective_scan, selective_scan_flops
from rsfusion.kernels.flops import counting


def _tiny_case():
    gen = torch.Generator().manual_seed(0)
    batch, dim, length, nstate = 1, 2, 3, 2
    x = torch.randn(batch, length, 4, generator=gen)
    proj = torch.nn.Linear(4, dim, bias=False)
    rest = dict(delta=torch.rand(batch, dim, length, generator=gen), A=-torch.rand(dim, nstate, generator=gen),
                B=torch.randn(batch, nstate, length, generator=gen),
                C=torch.randn(batch, nstate, length, generator=gen),
                D=torch.randn(dim, generator=gen), z=torch.randn(batch, dim, length, generator=gen))

    def forward():
        u = proj(x).transpose(1, 2)  # (batch, dim, length)
        return selective_scan(u, **rest, delta_softplus=True, backend="torch")
    return forward


def test_the_scan_is_counted_by_hand_and_not_twice():
    forward = _tiny_case()
    # By hand: the projection is a (3 x 4) @ (4 x 2) matmul, 2 FLOPs per multiply-add: 2 * 3 * 4 * 2 = 48.
    # The scan (batch 1, dim 2, L 3, N 2): 9 FLOPs per (batch, L, dim, N) element = 9 * 12 = 108,
    # + 1 per (batch, dim, L) for D (6) + 1 for the z gate (6) = 120.
    matmul, scan = 48, 120
    assert selective_scan_flops(1, 2, 3, 2, with_D=True, with_z=True) == scan
    with torch.no_grad():
        expected = forward()
        with FlopCounterMode(display=False) as plain:
            forward()
        with FlopCounterMode(display=False) as counter, count_scan_flops():
            counted = forward()
    assert plain.get_total_flops() == matmul  # without the registration the scan is invisible
    assert counter.get_total_flops() == matmul + scan  # and its own matmuls/products are not added on top
    torch.testing.assert_close(counted, expected, rtol=0, atol=0)  # the counted op computes the same scan


def test_counting_ends_with_its_context():
    forward = _tiny_case()
    with torch.no_grad():
        with count_scan_flops():
            assert counting()
        assert not counting()
        with FlopCounterMode(display=False) as counter:
            forward()
    assert counter.get_total_flops() == 48
