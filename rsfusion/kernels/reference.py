"""The one readable reference implementation of the S6 selective scan, and the tests' oracle.

The recurrence written plainly, one time step at a time, with mamba-ssm's ``selective_scan_ref``
semantics (mamba_ssm/ops/selective_scan_interface.py) for real A:

    dt_l = softplus(delta_l + delta_bias)   (identity above 20, as mamba's kernel; only if delta_softplus)
    h_l  = exp(dt_l * A) * h_{l-1} + dt_l * B_l * u_l
    y_l  = <C_l, h_l> + D * u_l;   y_l *= silu(z_l)

It is slow on purpose (a Python loop over L) and differentiable through autograd; float64 inputs are
computed in float64, so the tests run it as their oracle on ``.double()`` inputs. The backends in
``rsfusion.kernels.dispatch`` are the fast paths and are tested against it.
"""
import torch
import torch.nn.functional as F

__all__ = ["selective_scan_ref"]


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False, return_last_state=False):
    """Mamba's S6 scan, one step at a time (mamba-ssm ``selective_scan_ref`` semantics, real A only).

    u, delta: (batch, dim, L); A: (dim, N); B, C: (batch, N, L) or (batch, G, N, L), group g serving
    channels [g * dim / G, (g + 1) * dim / G); D, delta_bias: (dim,); z: (batch, dim, L).
    Computes in float32 (float64 inputs in float64); returns out (batch, dim, L) in u's dtype and, with
    ``return_last_state``, the final state h_L (batch, dim, N) in the compute dtype.
    """
    dtype_in = u.dtype
    compute = torch.float64 if dtype_in == torch.float64 else torch.float32
    u, delta, A = u.to(compute), delta.to(compute), A.to(compute)
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta = F.softplus(delta, threshold=20.0)
    batch, dim, length = u.shape

    def per_channel(mat):  # (batch, N, L) or (batch, G, N, L) -> (batch, dim, N, L)
        mat = mat.unsqueeze(1) if mat.dim() == 3 else mat
        return mat.to(compute).repeat_interleave(dim // mat.shape[1], dim=1)

    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    # unbind, not [..., l]: indexing would make the autograd backward quadratic in L
    for u_l, dt_l, B_l, C_l in zip(u.unbind(-1), delta.unbind(-1), per_channel(B).unbind(-1),
                                   per_channel(C).unbind(-1)):
        h = torch.exp(dt_l[:, :, None] * A) * h + (dt_l * u_l)[:, :, None] * B_l
        ys.append((h * C_l).sum(-1))
    out = torch.stack(ys, dim=-1)
    if D is not None:
        out = out + D.to(compute)[:, None] * u
    if z is not None:
        out = out * F.silu(z.to(compute))
    out = out.to(dtype_in)
    return (out, h) if return_last_state else out
