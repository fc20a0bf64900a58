"""Layers shared by the suite's networks (timm's ``layers/`` style): stochastic depth, the token MLP,
and the per-direction SSM parameters of a 2-D selective scan with Mamba's initialisation.

The SSM helpers return plain tensors/Parameters so each network keeps its own parameter names (and
so state_dict keys compatible with its authors' checkpoints): VMamba/M3amba's ``x_proj_weight``,
``dt_projs_weight``, ``dt_projs_bias``, ``A_logs``, ``Ds`` and DAS2F's ``x_proj_weight``,
``dt_proj_weight``, ``dt_proj_bias``, ``A_log``, ``D`` are the same five tensors.
"""
import math

import torch
import torch.nn as nn

from rsfusion.kernels import check_backend

NUM_DIRECTIONS = 4  # SS2D scan orders (see rsfusion.kernels.cross_scan)


def check_fraction(name, value):
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def check_scan_backend(scan_backend):
    """A model's ``scan_backend`` (the ``backend`` of every selective_scan it runs), checked at
    construction: unknown, or unable to run on this machine, is a one-line ValueError."""
    try:
        return check_backend(scan_backend)
    except ValueError as err:
        raise ValueError(f"scan_backend {err}") from None


class DropPath(nn.Module):
    """Stochastic depth per sample (timm semantics, survivors rescaled by 1/keep_prob)."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        check_fraction("drop_prob", drop_prob)
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep_prob)
        return x * mask / keep_prob

    def extra_repr(self):
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    """Linear -> GELU -> Dropout -> Linear -> Dropout on the last axis (timm ``Mlp``; no dropout at drop=0)."""

    def __init__(self, in_features, hidden_features, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def directional_ssm_parameters(d_inner, d_state, dt_rank, flat_dt_bias=False, directions=NUM_DIRECTIONS):
    """Uninitialised SSM parameters of ``directions`` scan directions (K), each scanning D = d_inner channels.

    Returns ``(x_proj_weight (K, R + 2N, D), dt_proj_weight (K, D, R), dt_bias (K, D) or (K*D,) if
    flat_dt_bias, A_log (K*D, N), D (K*D,))``; A_log and D carry ``_no_weight_decay = True`` like VMamba.
    Initialise them with :func:`mamba_init_` (after any other layer of the module, to keep the RNG order).
    """
    k = directions
    x_proj_weight = nn.Parameter(torch.empty(k, dt_rank + 2 * d_state, d_inner))
    dt_proj_weight = nn.Parameter(torch.empty(k, d_inner, dt_rank))
    dt_bias = nn.Parameter(torch.empty(k * d_inner) if flat_dt_bias else torch.empty(k, d_inner))
    A_log = nn.Parameter(torch.empty(k * d_inner, d_state))
    D = nn.Parameter(torch.empty(k * d_inner))
    A_log._no_weight_decay = True
    D._no_weight_decay = True
    return x_proj_weight, dt_proj_weight, dt_bias, A_log, D


@torch.no_grad()
def mamba_init_(x_proj_weight, dt_proj_weight, dt_bias, A_log, D, dt_min=1e-3, dt_max=0.1,
                dt_init_floor=1e-4, dt_scale=1.0):
    """VMamba's ``mamba_init`` in place, in this RNG order: W_x ~ nn.Linear's default U(+-D^-1/2),
    W_dt ~ U(+-dt_scale R^-1/2), dt_bias = softplus^-1(dt) with dt ~ logU[dt_min, dt_max] floored at
    dt_init_floor, A_log = log(1..N) per channel (S4D-real), D = 1. Shapes as :func:`directional_ssm_parameters`.
    """
    if not 0.0 < dt_min <= dt_max:
        raise ValueError(f"dt_min/dt_max must satisfy 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
    bound = 1.0 / math.sqrt(x_proj_weight.shape[-1])
    x_proj_weight.uniform_(-bound, bound)
    dt_std = dt_scale * dt_proj_weight.shape[-1] ** -0.5
    dt_proj_weight.uniform_(-dt_std, dt_std)
    log_dt = torch.rand_like(dt_bias) * (math.log(dt_max) - math.log(dt_min))
    dt = torch.exp(log_dt + math.log(dt_min)).clamp(min=dt_init_floor)
    dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
    states = torch.arange(1, A_log.shape[-1] + 1, dtype=torch.float32, device=A_log.device)
    A_log.copy_(torch.log(states).expand_as(A_log))
    D.fill_(1.0)


def project_directions(xs, x_proj_weight, dt_proj_weight, d_state):
    """Per-direction projections of scan inputs xs (B, K, D, L): delta (B, K, D, L) (before bias and
    softplus) and B, C (B, K, N, L)."""
    x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, x_proj_weight)
    dts, Bs, Cs = torch.split(x_dbl, [dt_proj_weight.shape[-1], d_state, d_state], dim=2)
    return torch.einsum("bkrl,kdr->bkdl", dts, dt_proj_weight), Bs, Cs
