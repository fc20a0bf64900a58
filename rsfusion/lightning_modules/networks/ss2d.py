"""VMamba's SS2D (2-D selective scan, forward type "v2") and the VSS block, as reusable modules.

Layout is channel-last, like VMamba: tokens are ``(B, H, W, C)``. SS2D runs the four cross-scan
directions through ONE grouped selective scan (G = 4 groups of ``d_inner`` channels):

    x (B,H,W,C) -> in_proj -> u, gate -> depthwise conv + SiLU on u -> cross_scan -> (B,4,D,L)
      -> per-direction x_proj / dt_proj -> selective_scan(u, delta, A, B, C, D, delta_bias,
         softplus) -> cross_merge -> out_norm -> * SiLU(gate) -> out_proj -> (B,H,W,C)

Defaults follow VMamba / the M3amba code (d_state 16, ssm_ratio 2, dt_rank ceil(C/16), d_conv 3,
dt ~ logU[1e-3, 0.1] floored at 1e-4, A_logs = log(1..N) (S4D-real), Ds = 1, Linear layers
trunc_normal(std 0.02)). The per-direction SSM parameters live in :class:`DirectionalSSM` so that
models needing two parameter sets around one shared SS2D body (M3amba's Cross-SS2D) can reuse the
pieces: :meth:`SS2D.scan_input`, :meth:`DirectionalSSM.project`, :meth:`DirectionalSSM.scan` and
:meth:`SS2D.merge_output`.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from rsfusion.kernels import cross_merge, cross_scan, selective_scan
from rsfusion.lightning_modules.networks.layers import (
    NUM_DIRECTIONS,
    DropPath,
    Mlp,
    check_fraction,
    check_scan_backend,
    directional_ssm_parameters,
    mamba_init_,
    project_directions,
)

__all__ = ["SS2D", "VSSBlock", "DirectionalSSM", "resolve_dt_rank", "vmamba_init_weights"]


def vmamba_init_weights(module):
    """VMamba's ``_init_weights``: Linear trunc_normal(std 0.02) with zero bias; LayerNorm 1/0.

    Meant for ``model.apply(vmamba_init_weights)``; leaves convolutions and raw Parameters alone.
    """
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def resolve_dt_rank(dt_rank, d_model):
    """``"auto"`` -> ceil(d_model / 16) (VMamba/Mamba rule); an int is returned as is."""
    if dt_rank == "auto":
        return math.ceil(d_model / 16)
    _check_positive_int("dt_rank", dt_rank)
    return dt_rank


class DirectionalSSM(nn.Module):
    """The per-direction SSM parameters of SS2D (K = 4 directions) and the grouped scan.

    Args:
        d_inner: channels D scanned per direction.
        d_state: state size N (VMamba v0 / M3amba: 16).
        dt_rank: rank R of the delta projection (an int; see :func:`resolve_dt_rank`).
        dt_min, dt_max, dt_init_floor, dt_scale: delta initialisation (Mamba's "random" dt init):
            dt ~ logU[dt_min, dt_max] floored at dt_init_floor, dt_projs_bias = softplus^-1(dt),
            dt_projs_weight ~ U(+-dt_scale * R^-0.5).
        scan_backend: ``backend`` of :func:`rsfusion.kernels.selective_scan` ("auto", "torch",
            "triton", "cuda"; checked here, see :func:`rsfusion.kernels.check_backend`).

    Parameters (VMamba names): ``x_proj_weight`` (K, R + 2N, D), nn.Linear's default uniform init;
    ``dt_projs_weight`` (K, D, R); ``dt_projs_bias`` (K, D); ``A_logs`` (K*D, N); ``Ds`` (K*D,).
    ``A_logs`` and ``Ds`` carry ``_no_weight_decay = True`` like VMamba.
    """

    def __init__(self, d_inner, d_state=16, dt_rank=24, dt_min=1e-3, dt_max=0.1,
                 dt_init_floor=1e-4, dt_scale=1.0, scan_backend="auto"):
        super().__init__()
        self.scan_backend = check_scan_backend(scan_backend)
        _check_positive_int("d_inner", d_inner)
        _check_positive_int("d_state", d_state)
        _check_positive_int("dt_rank", dt_rank)
        self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, dt_rank
        (self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias, self.A_logs,
         self.Ds) = directional_ssm_parameters(d_inner, d_state, dt_rank)
        self.reset_parameters(dt_min, dt_max, dt_init_floor, dt_scale)

    def reset_parameters(self, dt_min=1e-3, dt_max=0.1, dt_init_floor=1e-4, dt_scale=1.0):
        mamba_init_(self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias, self.A_logs, self.Ds,
                    dt_min, dt_max, dt_init_floor, dt_scale)

    def A(self):
        """The (negative, real) state matrix -exp(A_logs), fp32, shape (K*D, N)."""
        return -torch.exp(self.A_logs.float())

    def project(self, xs):
        """xs (B, K, D, L) -> delta (B, K*D, L) (before bias/softplus), B and C (B, K, N, L)."""
        dts, Bs, Cs = project_directions(xs, self.x_proj_weight, self.dt_projs_weight, self.d_state)
        return dts.flatten(1, 2), Bs, Cs

    def project_B(self, xs):
        """Only the B rows of :meth:`project` (B, K, N, L): what a stream lends when B is exchanged."""
        start = self.dt_rank
        return torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight[:, start:start + self.d_state])

    def project_C(self, xs):
        """Only the C rows of :meth:`project` (B, K, N, L)."""
        start = self.dt_rank + self.d_state
        return torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight[:, start:])

    def scan(self, xs, dts, Bs, Cs, A=None):
        """One grouped selective scan over the 4 directions, in fp32 like VMamba's force_fp32.

        xs (B, K, D, L), dts (B, K*D, L), Bs/Cs (B, K, N, L); A defaults to :meth:`A`.
        Returns (B, K, D, L) fp32.
        """
        batch, k, d, length = xs.shape
        ys = selective_scan(
            xs.reshape(batch, k * d, length).float(), dts.float(),
            self.A() if A is None else A.float(), Bs.float(), Cs.float(), self.Ds.float(),
            delta_bias=self.dt_projs_bias.reshape(-1).float(), delta_softplus=True, backend=self.scan_backend)
        return ys.view(batch, k, d, length)


class SS2D(nn.Module):
    """VMamba's 2-D selective scan (forward type "v2"), channel-last.

    Args:
        d_model: token channels C (in and out).
        d_state: SSM state size N (VMamba v0 / M3amba: 16).
        ssm_ratio: d_inner = int(ssm_ratio * d_model) (M3amba: 2.0).
        dt_rank: "auto" = ceil(d_model / 16) (M3amba: 24 for C = 384), or an int.
        d_conv: kernel of the depthwise conv before the scan, odd (3, as VMamba).
        conv_bias: bias of that conv (True, as VMamba).
        dropout: dropout after out_proj (0 in VMamba / M3amba).
        dt_min, dt_max, dt_init_floor, dt_scale: delta init, see :class:`DirectionalSSM`.
        scan_backend: selective-scan backend, see :class:`DirectionalSSM`.

    Shapes: ``forward(x: (B, H, W, C)) -> (B, H, W, C)``.
    Parameter count for C = 384, N = 16, ratio 2, dt_rank 24: 1,195,008.
    """

    def __init__(self, d_model, d_state=16, ssm_ratio=2.0, dt_rank="auto", d_conv=3,
                 conv_bias=True, dropout=0.0, dt_min=1e-3, dt_max=0.1, dt_init_floor=1e-4,
                 dt_scale=1.0, scan_backend="auto"):
        super().__init__()
        _check_positive_int("d_model", d_model)
        if not ssm_ratio > 0:
            raise ValueError(f"ssm_ratio must be > 0, got {ssm_ratio!r}")
        d_inner = int(ssm_ratio * d_model)
        _check_positive_int("d_inner (ssm_ratio * d_model)", d_inner)
        if isinstance(d_conv, bool) or not isinstance(d_conv, int) or d_conv < 1 or d_conv % 2 == 0:
            raise ValueError(f"d_conv must be an odd positive int, got {d_conv!r}")
        check_fraction("dropout", dropout)
        self.d_model, self.d_inner = d_model, d_inner
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2,
                                groups=d_inner, bias=conv_bias)
        self.ssm = DirectionalSSM(d_inner, d_state, resolve_dt_rank(dt_rank, d_model),
                                  dt_min, dt_max, dt_init_floor, dt_scale, scan_backend)
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for layer in (self.in_proj, self.out_proj, self.out_norm):
            vmamba_init_weights(layer)

    def scan_input(self, x, with_gate=True):
        """x (B, H, W, C) -> cross-scanned u (B, 4, D, H*W) and the SiLU gate (B, H, W, D).

        ``with_gate=False`` skips the gate half of in_proj (returns None for it): for a stream
        whose own output is not needed.
        """
        if with_gate:
            u, gate = self.in_proj(x).chunk(2, dim=-1)
            gate = F.silu(gate)
        else:
            u, gate = F.linear(x, self.in_proj.weight[:self.d_inner]), None
        u = F.silu(self.conv2d(u.permute(0, 3, 1, 2).contiguous()))
        return cross_scan(u), gate

    def merge_output(self, ys, gate):
        """Scan outputs ys (B, 4, D, H*W) and gate (B, H, W, D) -> (B, H, W, C)."""
        batch, height, width, _ = gate.shape
        y = cross_merge(ys.to(gate.dtype).view(batch, NUM_DIRECTIONS, self.d_inner, height, width))
        y = self.out_norm(y.transpose(1, 2).reshape(batch, height, width, self.d_inner))
        return self.dropout(self.out_proj(y * gate))

    def forward(self, x):
        if x.dim() != 4 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be (B, H, W, {self.d_model}), got {tuple(x.shape)}")
        xs, gate = self.scan_input(x)
        dts, Bs, Cs = self.ssm.project(xs)
        return self.merge_output(self.ssm.scan(xs, dts, Bs, Cs), gate)


class VSSBlock(nn.Module):
    """VMamba's VSS block as used by M3amba (``VSSBlock_add``), pre-norm, channel-last:

        t <- t + DropPath(SS2D(LN(t)));  t <- t + DropPath(MLP(LN2(t)))   (MLP skipped if mlp_ratio 0)

    Args:
        hidden_dim: token channels C.
        drop_path: stochastic-depth probability of both residual branches.
        d_state, ssm_ratio, dt_rank, d_conv, conv_bias, dt_min, dt_max, dt_init_floor, dt_scale:
            passed to :class:`SS2D`.
        ssm_dropout: dropout after SS2D's out_proj (0 in M3amba).
        mlp_ratio: MLP hidden = int(mlp_ratio * C), GELU (4.0 in M3amba; 0 disables the MLP).
        mlp_drop: MLP dropout (0 in M3amba).
        scan_backend: selective-scan backend, see :class:`DirectionalSSM`.

    Shapes: ``forward(x: (B, H, W, C)) -> (B, H, W, C)``.
    Parameter count for C = 384 with M3amba's settings: 2,378,112.
    """

    def __init__(self, hidden_dim, drop_path=0.0, d_state=16, ssm_ratio=2.0, dt_rank="auto",
                 d_conv=3, conv_bias=True, ssm_dropout=0.0, mlp_ratio=4.0, mlp_drop=0.0,
                 dt_min=1e-3, dt_max=0.1, dt_init_floor=1e-4, dt_scale=1.0, scan_backend="auto"):
        super().__init__()
        if mlp_ratio < 0:
            raise ValueError(f"mlp_ratio must be >= 0, got {mlp_ratio!r}")
        self.norm = nn.LayerNorm(hidden_dim)
        self.op = SS2D(hidden_dim, d_state, ssm_ratio, dt_rank, d_conv, conv_bias, ssm_dropout,
                       dt_min, dt_max, dt_init_floor, dt_scale, scan_backend)
        self.drop_path = DropPath(drop_path)
        if mlp_ratio > 0:
            self.norm2 = nn.LayerNorm(hidden_dim)
            self.mlp = Mlp(hidden_dim, int(hidden_dim * mlp_ratio), mlp_drop)
            self.mlp.apply(vmamba_init_weights)
        else:
            self.norm2 = self.mlp = None

    def forward(self, x):
        x = x + self.drop_path(self.op(self.norm(x)))
        if self.mlp is not None:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x
