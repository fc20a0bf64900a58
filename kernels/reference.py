"""The one readable reference implementation of the S6 selective scan.

It restates mamba-ssm's ``selective_scan_ref`` (mamba_ssm/ops/selective_scan_interface.py) for real
A: materialise exp(delta * A) and delta * B * u as (batch, dim, L, N) tensors with einsum, then loop
over L in Python, contracting with C at every step. It is slow on purpose (its autograd backward is
quadratic in L, spec §4.3) and serves as the readable statement of the semantics and as the
benchmark baseline; the backends in ``rsfusion.kernels.dispatch`` are the fast paths.
"""
import torch
import torch.nn.functional as F

__all__ = ["selective_scan_ref"]


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False, return_last_state=False):
    """Mamba's S6 scan, written plainly (mamba-ssm ``selective_scan_ref`` semantics, real A only).

    u, delta: (batch, dim, L); A: (dim, N); B, C: (batch, N, L) or (batch, G, N, L); D, delta_bias:
    (dim,); z: (batch, dim, L). Returns out (batch, dim, L) in u's dtype, computed in float32, and
    with ``return_last_state`` the final state (batch, dim, N) float32.
    """
    dtype_in = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta, threshold=20.0)  # identity above 20, as mamba's CUDA kernel
    batch, dim, length = u.shape
    if B.dim() == 3:
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    # Group g serves the contiguous channels [g * dim / G, (g + 1) * dim / G).
    B = B.float().repeat_interleave(dim // B.shape[1], dim=1)  # (batch, dim, N, L)
    C = C.float().repeat_interleave(dim // C.shape[1], dim=1)
    A = A.float()
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    deltaB_u = torch.einsum("bdl,bdnl,bdl->bdln", delta, B, u)
    x = u.new_zeros(batch, dim, A.shape[1], dtype=torch.float32)
    ys = []
    for i in range(length):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        ys.append(torch.einsum("bdn,bdn->bd", x, C[:, :, :, i]))
    out = torch.stack(ys, dim=2)
    if D is not None:
        out = out + u * D.float()[..., None]
    if z is not None:
        out = out * F.silu(z.float())
    out = out.to(dtype_in)
    return (out, x) if return_last_state else out
