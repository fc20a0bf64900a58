"""``selective_scan``: mamba-ssm's ``selective_scan_fn`` interface over three backends.

Backends (spec §6):

* ``"cuda"``: mamba-ssm's own ``selective_scan_fn`` (its ``selective_scan_cuda`` extension), when it
  imports and the tensors live on a CUDA device;
* ``"triton"``: this project's Triton kernels (forward and backward), GPU tensors;
* ``"torch"``: a fast pure-PyTorch path with a hand-written backward, any device.

``backend="auto"`` honours the ``RSFUSION_SCAN_BACKEND`` environment variable if it is set, otherwise
picks cuda, else triton on a GPU, else torch. An explicit ``backend=`` argument wins over the
environment variable. The first use of each backend is logged once (logger ``"rsfusion.kernels"``).
"""
import functools
import importlib
import logging
import math
import os

import torch
import torch.nn.functional as F

from rsfusion.kernels.scan_torch import scan_core_torch

__all__ = ["selective_scan", "available_backends", "resolve_backend", "BACKENDS", "ENV_VAR"]

logger = logging.getLogger("rsfusion.kernels")

BACKENDS = ("auto", "cuda", "triton", "torch")
ENV_VAR = "RSFUSION_SCAN_BACKEND"
_logged_backends = set()


@functools.lru_cache(maxsize=None)
def _mamba_selective_scan_fn():
    """mamba-ssm's ``selective_scan_fn`` if its CUDA extension imports, else None (never raises).

    The extension itself is probed: released mamba-ssm raises ModuleNotFoundError on ``import
    mamba_ssm`` without it, and an extension built against another torch raises ImportError/OSError
    ("undefined symbol") -- spec §1.7.
    """
    try:
        importlib.import_module("selective_scan_cuda")
        interface = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
        return interface.selective_scan_fn
    except (ImportError, OSError, RuntimeError, AttributeError) as err:
        logger.debug("mamba-ssm selective scan unavailable: %s", err)
        return None


@functools.lru_cache(maxsize=None)
def _triton_scan():
    """This project's Triton ``selective_scan_triton`` if Triton imports, else None (never raises)."""
    try:
        from rsfusion.kernels import scan_triton
    except (ImportError, OSError, RuntimeError) as err:
        logger.debug("Triton selective scan unavailable: %s", err)
        return None
    return scan_triton.selective_scan_triton


def _triton_runs_on(device):
    # The Triton interpreter (TRITON_INTERPRET=1, used by the CPU tests) runs kernels on CPU tensors.
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends(device=None):
    """Backends usable for tensors on ``device`` (default: CUDA if present, else CPU)."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    names = []
    if device.type == "cuda" and _mamba_selective_scan_fn() is not None:
        names.append("cuda")
    if _triton_runs_on(device) and _triton_scan() is not None:
        names.append("triton")
    names.append("torch")
    return names


def resolve_backend(backend, device):
    """The concrete backend for ``backend`` in BACKENDS and tensors on ``device``; raises if unusable."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        forced = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if forced not in BACKENDS:
            raise ValueError(f"environment variable {ENV_VAR} must be one of {BACKENDS}, got {forced!r}")
        backend = forced
    if backend == "auto":
        if device.type == "cuda" and _mamba_selective_scan_fn() is not None:
            backend = "cuda"
        elif device.type == "cuda" and _triton_scan() is not None:
            backend = "triton"
        else:
            backend = "torch"
    elif backend == "cuda":
        if device.type != "cuda":
            raise RuntimeError(f"selective_scan backend 'cuda' needs CUDA tensors, got device {device}")
        if _mamba_selective_scan_fn() is None:
            raise RuntimeError("selective_scan backend 'cuda' requested but mamba-ssm's selective_scan_cuda "
                               "extension does not import; use backend 'triton' or 'torch'")
    elif backend == "triton":
        if not _triton_runs_on(device):
            raise RuntimeError(f"selective_scan backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1), "
                               f"got device {device}")
        if _triton_scan() is None:
            raise RuntimeError("selective_scan backend 'triton' requested but triton does not import")
    if backend not in _logged_backends:
        _logged_backends.add(backend)
        logger.info("selective_scan: using the %r backend (tensors on %s)", backend, device.type)
    return backend


def _check_inputs(u, delta, A, B, C, D, z, delta_bias):
    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    for name, tensor in named.items():
        if tensor is None and name in ("D", "z", "delta_bias"):
            continue
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"selective_scan: {name} must be a tensor, got {type(tensor).__name__}")
        if tensor.is_complex():
            raise ValueError(f"selective_scan: complex {name} is not supported (real A only)")
        if not tensor.is_floating_point():
            raise ValueError(f"selective_scan: {name} must be a floating-point tensor, got {tensor.dtype}")
        if tensor.device != u.device:
            raise ValueError(f"selective_scan: {name} is on {tensor.device} but u is on {u.device}")
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, dim, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be (dim={dim}, N), got shape {tuple(A.shape)}")
    nstate = A.shape[1]
    for name, mat in (("B", B), ("C", C)):
        if mat.dim() not in (3, 4) or mat.shape[0] != batch or mat.shape[-2:] != (nstate, length):
            raise ValueError(f"selective_scan: {name} must be (batch={batch}, N={nstate}, L={length}) or "
                             f"(batch, G, N, L), got shape {tuple(mat.shape)}")
        if mat.dim() == 4 and dim % mat.shape[1] != 0:
            raise ValueError(f"selective_scan: {name} has {mat.shape[1]} groups, which do not divide dim={dim}")
    for name, vec in (("D", D), ("delta_bias", delta_bias)):
        if vec is not None and vec.shape != (dim,):
            raise ValueError(f"selective_scan: {name} must be (dim={dim},), got shape {tuple(vec.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")


def _common_groups(B, C):
    """B, C as (batch, G, N, L) with one G (3-D means G = 1; unequal G expand to their lcm)."""
    B = B.unsqueeze(1) if B.dim() == 3 else B
    C = C.unsqueeze(1) if C.dim() == 3 else C
    groups = math.lcm(B.shape[1], C.shape[1])  # both divide dim, so their lcm does too

    def expand(mat):
        return mat if mat.shape[1] == groups else mat.repeat_interleave(groups // mat.shape[1], dim=1)

    return expand(B), expand(C)


def _torch_backend(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    """The torch scan core (delta_bias, softplus and D fused in) and the z gate as plain autograd ops.

    Computes in float32 (float64 stays float64, so the torch backend can be gradchecked).
    """
    dtype_in = u.dtype
    compute = torch.float64 if dtype_in == torch.float64 else torch.float32
    D, delta_bias = (None if v is None else v.to(compute) for v in (D, delta_bias))
    y, last_state = scan_core_torch(u.to(compute), delta.to(compute), A.to(compute), B.to(compute), C.to(compute),
                                    D, delta_bias, delta_softplus)
    if z is not None:
        y = y * F.silu(z.to(compute))
    y = y.to(dtype_in)
    return (y, last_state) if return_last_state else y


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, backend="auto"):
    """Mamba's S6 selective scan with mamba-ssm ``selective_scan_fn`` semantics (real A).

    Args:
        u: (batch, dim, L) input.
        delta: (batch, dim, L) time steps, before ``delta_bias`` and softplus.
        A: (dim, N) real state matrix (diagonal per channel), usually negative.
        B, C: (batch, N, L), or grouped (batch, G, N, L) with channel d using group d // (dim / G).
        D: optional (dim,) skip connection, ``out += D * u``.
        z: optional (batch, dim, L) gate, ``out *= silu(z)``.
        delta_bias: optional (dim,) added to delta before the softplus.
        delta_softplus: apply softplus (identity above 20, as mamba's kernel) to delta.
        return_last_state: also return the final state h_L, (batch, dim, N) float32, without gradient.
        backend: "auto", "cuda", "triton" or "torch" (see the module docstring).

    Returns:
        out (batch, dim, L) in u's dtype, and the last state if requested. Half and bfloat16 inputs are
        computed in float32; the torch backend keeps float64 inputs in float64 (for gradcheck).
        Unlike mamba-ssm's CUDA op, delta/B/C/z need not share u's dtype. Complex A is unsupported.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    chosen = resolve_backend(backend, u.device)
    B, C = _common_groups(B, C)
    if chosen == "cuda":
        cast = [t if t is None else t.to(u.dtype) for t in (delta, B, C, z)]
        vecs = [t if t is None else t.float() for t in (D, delta_bias)]
        return _mamba_selective_scan_fn()(u, cast[0], A.float(), cast[1], cast[2], vecs[0], cast[3], vecs[1],
                                          delta_softplus, return_last_state)
    if chosen == "triton":
        return _triton_scan()(u, delta, A.float(), B, C, D, z, delta_bias, delta_softplus, return_last_state)
    return _torch_backend(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
