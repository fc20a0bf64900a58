"""``selective_scan``: mamba-ssm's ``selective_scan_fn`` interface over three backends.

Backends:

* ``"cuda"``: mamba-ssm's own ``selective_scan_fn`` (its ``selective_scan_cuda`` extension), when it
  imports and the tensors live on a CUDA device;
* ``"triton"``: this project's Triton kernels (forward and backward), GPU tensors;
* ``"torch"``: a fast pure-PyTorch path with a hand-written backward, any device.

``backend="auto"`` honours the ``RSFUSION_SCAN_BACKEND`` environment variable if it is set, otherwise
picks cuda, else triton on a GPU, else torch. An explicit ``backend=`` argument wins over the
environment variable. The first use of each backend is logged once (logger ``"rsfusion.kernels"``).
Models take the backend as their ``scan_backend`` argument (``--model.init_args.scan_backend``) and
pass it to every scan; ``check_backend`` refuses, at construction, a value that cannot run here.

Before ``auto`` first picks Triton for a (device, dtype), it runs a self-check: the Triton kernels
against the torch backend on a small input, values and gradients of all inputs. A kernel that does
not compile, raises, or gives wrong or non-finite numbers (a GPU or Triton version never tested)
logs one warning with the reason and ``auto`` uses the torch backend for that (device, dtype) from
then on. An explicit ``backend="triton"`` (argument or environment variable) is never checked: its
errors propagate.
"""
import functools
import importlib
import logging
import math
import os

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from rsfusion.kernels.flops import counting, selective_scan_flops
from rsfusion.kernels.scan_torch import scan_core_torch

__all__ = ["selective_scan", "available_backends", "check_backend", "resolve_backend", "BACKENDS", "ENV_VAR"]

logger = logging.getLogger("rsfusion.kernels")

BACKENDS = ("auto", "cuda", "triton", "torch")
ENV_VAR = "RSFUSION_SCAN_BACKEND"
_logged_backends = set()
# (device, dtype) -> None if the Triton kernels passed their self-check there, else the reason
_triton_health = {}
# Tolerances of the self-check per input dtype (mamba-ssm's test): outputs; gradients get rtol x5, atol x10.
_SELF_CHECK_TOL = {torch.float16: (3e-3, 5e-3), torch.bfloat16: (3e-2, 5e-2)}
_SELF_CHECK_TOL_FP32 = (6e-4, 2e-3)


@functools.lru_cache(maxsize=None)
def _mamba_selective_scan_fn():
    """mamba-ssm's ``selective_scan_fn`` if its CUDA extension imports, else None (never raises).

    The extension itself is probed: released mamba-ssm raises ModuleNotFoundError on ``import
    mamba_ssm`` without it, and an extension built against another torch raises ImportError/OSError
    ("undefined symbol").
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


def _triton_preferred(device):
    """Whether ``auto`` considers Triton: CUDA tensors only (in the interpreter it is far slower than torch)."""
    return device.type == "cuda"


def _self_check_inputs(device, dtype):
    """A small grouped scan with every optional input (mamba's test distributions), as leaves needing grad."""
    gen = torch.Generator().manual_seed(0)
    batch, dim, length, nstate, groups = 2, 4, 11, 3, 2

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    def rand(*shape):
        return torch.rand(*shape, generator=gen)

    inputs = {"u": randn(batch, dim, length).to(dtype), "delta": (0.5 * rand(batch, dim, length)).to(dtype),
              "A": -0.5 * rand(dim, nstate), "B": randn(batch, groups, nstate, length).to(dtype),
              "C": randn(batch, groups, nstate, length).to(dtype), "D": randn(dim),
              "z": randn(batch, dim, length).to(dtype), "delta_bias": 0.5 * rand(dim)}
    grad_out = randn(batch, dim, length).to(dtype)
    return {k: v.to(device).requires_grad_() for k, v in inputs.items()}, grad_out.to(device)


def _run_for_check(scan, inputs, grad_out):
    out = scan(**inputs, delta_softplus=True, return_last_state=False)
    grads = torch.autograd.grad(out, list(inputs.values()), grad_out)
    return out.detach(), dict(zip(inputs, grads))


def _triton_self_check(device, dtype):
    """None if the Triton kernels match the torch backend on ``device`` in ``dtype``, else the reason."""
    rtol, atol = _SELF_CHECK_TOL.get(dtype, _SELF_CHECK_TOL_FP32)
    try:
        # The first call may come from validation or prediction (inference mode, no grad, autocast).
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            inputs, grad_out = _self_check_inputs(device, dtype)
            out, grads = _run_for_check(_triton_scan(), inputs, grad_out)
            ref_out, ref_grads = _run_for_check(_torch_backend, inputs, grad_out)
    except Exception as err:  # noqa: BLE001 - any failure of an untested GPU/compiler means: do not use it
        first_line = (str(err).strip().splitlines() or [""])[0][:300]
        return f"{type(err).__name__}: {first_line}"
    compared = [("output", out, ref_out, rtol, atol)]
    compared += [(f"gradient of {k}", grads[k], ref_grads[k], 5 * rtol, 10 * atol) for k in grads]
    for what, got, want, rt, at in compared:
        if got is None or got.shape != want.shape:
            return f"{what}: shape {None if got is None else tuple(got.shape)}, expected {tuple(want.shape)}"
        got, want = got.double(), want.double()
        if not torch.isfinite(got).all():
            return f"{what} is not finite ({int((~torch.isfinite(got)).sum())} of {got.numel()} values)"
        excess = (got - want).abs() - (at + rt * want.abs())
        if (excess > 0).any():
            worst = int(excess.argmax())
            return (f"{what} differs from the torch backend by {float((got - want).abs().flatten()[worst]):.3g} "
                    f"(tolerance {at:g} + {rt:g} x |value|)")
    return None


def _triton_passes_self_check(device, dtype):
    key = (str(device), dtype)
    if key not in _triton_health:
        reason = _triton_self_check(device, dtype)
        _triton_health[key] = reason
        if reason is None:
            logger.info("selective_scan: the Triton kernels passed their self-check on %s (%s)", device, dtype)
        else:
            logger.warning("selective_scan: the Triton kernels failed their self-check on %s (%s): %s; using the "
                           "torch backend instead (RSFUSION_SCAN_BACKEND=triton forces Triton and shows the error)",
                           device, str(dtype).replace("torch.", ""), reason)
    return _triton_health[key] is None


def check_backend(backend):
    """``backend`` if it is in BACKENDS and could run on this machine (some device), else a one-line ValueError.

    For a model's ``scan_backend`` at construction, before any tensor exists: ``cuda`` needs a CUDA
    device and mamba-ssm's extension; ``triton`` needs triton and a CUDA device, or the CPU
    interpreter (TRITON_INTERPRET=1, which Triton reads when the kernels are defined: set it before
    rsfusion is imported). ``auto`` always runs (and follows RSFUSION_SCAN_BACKEND if set).
    """
    if backend not in BACKENDS:
        raise ValueError(f"must be one of {BACKENDS}, got {backend!r}")
    if backend == "cuda" and not torch.cuda.is_available():
        raise ValueError("'cuda' (mamba-ssm's kernel) needs a CUDA device and this machine has none; "
                         "use 'auto' or 'torch'")
    if backend == "cuda" and _mamba_selective_scan_fn() is None:
        raise ValueError("'cuda' needs mamba-ssm's selective_scan_cuda extension, which does not import; "
                         "use 'auto', 'triton' or 'torch'")
    if backend == "triton" and not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"):
        raise ValueError("'triton' needs a CUDA device and this machine has none (on CPU, Triton runs only in "
                         "its interpreter: TRITON_INTERPRET=1 set before rsfusion is imported); use 'auto' or 'torch'")
    if backend == "triton" and _triton_scan() is None:
        raise ValueError("'triton' needs the triton package, which does not import; use 'auto' or 'torch'")
    return backend


def resolve_backend(backend, device, dtype=torch.float32):
    """The concrete backend for ``backend`` in BACKENDS and tensors on ``device``; raises if unusable.

    ``dtype`` (the input's) matters only when ``auto`` considers Triton: its self-check runs in it.
    """
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
        elif _triton_preferred(device) and _triton_scan() is not None and _triton_passes_self_check(device, dtype):
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


@torch.library.custom_op("rsfusion::selective_scan", mutates_args=())
def _counted_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                  D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
                  delta_softplus: bool) -> torch.Tensor:
    """The torch backend's forward as one op, which ``FlopCounterMode`` counts analytically (``flops.py``)."""
    return _torch_backend(u, delta, A, B, C, D, z, delta_bias, delta_softplus, False).clone()


@_counted_scan.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    return torch.empty_like(u)


@register_flop_formula(torch.ops.rsfusion.selective_scan)
def _scan_flop_formula(u_shape, delta_shape, A_shape, B_shape, C_shape, D_shape, z_shape, delta_bias_shape,
                       delta_softplus, out_shape=None, **kwargs) -> int:
    batch, dim, length = u_shape
    return selective_scan_flops(batch, dim, length, A_shape[1], D_shape is not None, z_shape is not None)


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
    chosen = resolve_backend(backend, u.device, u.dtype)
    B, C = _common_groups(B, C)
    if counting() and not return_last_state:
        return _counted_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if chosen == "cuda":
        cast = [t if t is None else t.to(u.dtype) for t in (delta, B, C, z)]
        vecs = [t if t is None else t.float() for t in (D, delta_bias)]
        return _mamba_selective_scan_fn()(u, cast[0], A.float(), cast[1], cast[2], vecs[0], cast[3], vecs[1],
                                          delta_softplus, return_last_state)
    if chosen == "triton":
        return _triton_scan()(u, delta, A.float(), B, C, D, z, delta_bias, delta_softplus, return_last_state)
    return _torch_backend(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
