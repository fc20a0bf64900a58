"""Triton selective scan: fused forward and backward kernels (a GPU training fallback for mamba-ssm).

Design: one program per (batch row, block of BLOCK_D channels of one group) holds
the [BLOCK_D, N] float32 state in registers and walks L sequentially, so every B/C load is shared by
the channel block. delta_bias, softplus, D and the silu(z) gate are fused. The forward saves only
the state at the start of every CHUNK steps; the backward walks the chunks from last to first,
recomputes each chunk's states into a small per-program scratch, then runs the reverse recurrence
g_l = dy_l C_l + exp(delta_{l+1} A) g_{l+1}. Weight gradients are written per program (per batch row
and channel block) and reduced with torch sums, so results are deterministic (no atomics).

No libdevice calls, so the kernels also run under ``TRITON_INTERPRET=1`` on CPU; that
flag must be set before this module is imported.
"""
import torch
import triton
import triton.language as tl

__all__ = ["selective_scan_triton", "CHUNK"]

# Steps between saved states: the backward recomputes at most this many states per program at once.
CHUNK = 64
# The sequential loop is latency-bound, so programs are kept small (one warp, ~128 state elements)
# to put many in flight: BLOCK_D * BLOCK_N <= TILE. Untuned: no GPU was available (see docs/kernels.md).
TILE = 128


@triton.jit
def _softplus(x, SOFTPLUS: tl.constexpr):
    if SOFTPLUS:
        # mamba's kernel: log1p(exp(x)) up to 20, identity above. No tl.log1p, and no libdevice.
        x = tl.where(x <= 20.0, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))), x)
    return x


@triton.jit
def _scan_fwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
                     out_ptr, ckpt_ptr, last_ptr,
                     dim, length, nstate, groups, n_chunks,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < nstate
    mask_dn = mask_n[None, :]
    group = (pid_d * BLOCK_D) // (dim // groups)

    seq = (pid_b * dim + offs_d) * length  # start of each channel's (L,) row in u/delta/z/out
    bc = (pid_b * groups + group) * nstate * length + offs_n * length
    state_idx = offs_d[:, None] * nstate + offs_n[None, :]
    A = tl.load(A_ptr + state_idx, mask=mask_dn, other=0.0).to(tl.float32)
    if HAS_D:
        D = tl.load(D_ptr + offs_d).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d).to(tl.float32)

    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for c in range(0, n_chunks):
        tl.store(ckpt_ptr + (pid_b * n_chunks + c) * dim * nstate + state_idx, h, mask=mask_dn)
        for t in range(c * CHUNK, tl.minimum((c + 1) * CHUNK, length)):
            u = tl.load(u_ptr + seq + t).to(tl.float32)
            dt = tl.load(delta_ptr + seq + t).to(tl.float32)
            if HAS_BIAS:
                dt += bias
            dt = _softplus(dt, SOFTPLUS)
            B = tl.load(B_ptr + bc + t, mask=mask_n, other=0.0).to(tl.float32)
            C = tl.load(C_ptr + bc + t, mask=mask_n, other=0.0).to(tl.float32)
            h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * B[None, :]
            y = tl.sum(h * C[None, :], axis=1)
            if HAS_D:
                y += D * u
            if HAS_Z:
                z = tl.load(z_ptr + seq + t).to(tl.float32)
                y *= z / (1.0 + tl.exp(-z))
            tl.store(out_ptr + seq + t, y.to(out_ptr.dtype.element_ty))
    tl.store(last_ptr + pid_b * dim * nstate + state_idx, h, mask=mask_dn)


@triton.jit
def _scan_bwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, ckpt_ptr,
                     scratch_ptr, du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
                     dim, length, nstate, groups, n_chunks,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    n_dblocks = tl.num_programs(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < nstate
    mask_dn = mask_n[None, :]
    group = (pid_d * BLOCK_D) // (dim // groups)

    seq = (pid_b * dim + offs_d) * length
    bc = (pid_b * groups + group) * nstate * length + offs_n * length
    dbc = (pid_b * n_dblocks + pid_d) * nstate * length + offs_n * length  # this program's dB/dC rows
    state_idx = offs_d[:, None] * nstate + offs_n[None, :]
    # Per-program scratch of CHUNK + 1 states: slot 0 = state before the chunk, slot i = after step i.
    scratch = scratch_ptr + ((pid_b * dim + offs_d[:, None]) * (CHUNK + 1)) * BLOCK_N + offs_n[None, :]
    A = tl.load(A_ptr + state_idx, mask=mask_dn, other=0.0).to(tl.float32)
    if HAS_D:
        D = tl.load(D_ptr + offs_d).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d).to(tl.float32)

    g = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # dL/dh_t, carried backwards
    decay_next = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # exp(delta_{t+1} A)
    dA = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dD = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for c_rev in range(0, n_chunks):
        c = n_chunks - 1 - c_rev
        start = c * CHUNK
        stop = tl.minimum(start + CHUNK, length)
        # 1) Recompute this chunk's states from its saved start state.
        h = tl.load(ckpt_ptr + (pid_b * n_chunks + c) * dim * nstate + state_idx, mask=mask_dn, other=0.0)
        tl.debug_barrier()
        tl.store(scratch, h)
        for t in range(start, stop):
            dt = tl.load(delta_ptr + seq + t).to(tl.float32)
            if HAS_BIAS:
                dt += bias
            dt = _softplus(dt, SOFTPLUS)
            u = tl.load(u_ptr + seq + t).to(tl.float32)
            B = tl.load(B_ptr + bc + t, mask=mask_n, other=0.0).to(tl.float32)
            h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * B[None, :]
            tl.store(scratch + (t - start + 1) * BLOCK_N, h)
        tl.debug_barrier()
        # 2) Reverse recurrence over the chunk; h holds h_t, the scratch gives h_{t-1}.
        for t_rev in range(0, stop - start):
            t = stop - 1 - t_rev
            raw = tl.load(delta_ptr + seq + t).to(tl.float32)
            if HAS_BIAS:
                raw += bias
            dt = _softplus(raw, SOFTPLUS)
            u = tl.load(u_ptr + seq + t).to(tl.float32)
            B = tl.load(B_ptr + bc + t, mask=mask_n, other=0.0).to(tl.float32)
            C = tl.load(C_ptr + bc + t, mask=mask_n, other=0.0).to(tl.float32)
            dy = tl.load(dout_ptr + seq + t).to(tl.float32)
            if HAS_Z:
                z = tl.load(z_ptr + seq + t).to(tl.float32)
                sig = 1.0 / (1.0 + tl.exp(-z))
                y = tl.sum(h * C[None, :], axis=1)
                if HAS_D:
                    y += D * u
                tl.store(dz_ptr + seq + t, (dy * y * sig * (1.0 + z * (1.0 - sig))).to(dz_ptr.dtype.element_ty))
                dy = dy * z * sig
            h_prev = tl.load(scratch + (t - start) * BLOCK_N)
            decay = tl.exp(dt[:, None] * A)
            g = g * decay_next + dy[:, None] * C[None, :]
            tl.store(dC_ptr + dbc + t, tl.sum(dy[:, None] * h, axis=0), mask=mask_n)
            tl.store(dB_ptr + dbc + t, tl.sum(g * (dt * u)[:, None], axis=0), mask=mask_n)
            d_dt_u = tl.sum(g * B[None, :], axis=1)
            m = g * decay * h_prev  # dL/d(delta_t A)
            d_dt = d_dt_u * u + tl.sum(m * A, axis=1)
            dA += m * dt[:, None]
            du = d_dt_u * dt
            if HAS_D:
                du += dy * D
                dD += dy * u
            if SOFTPLUS:
                d_dt = tl.where(raw <= 20.0, d_dt / (1.0 + tl.exp(-raw)), d_dt)
            dbias += d_dt
            tl.store(du_ptr + seq + t, du.to(du_ptr.dtype.element_ty))
            tl.store(ddelta_ptr + seq + t, d_dt.to(ddelta_ptr.dtype.element_ty))
            decay_next = decay
            h = h_prev
        tl.debug_barrier()
    tl.store(dA_ptr + pid_b * dim * nstate + state_idx, dA, mask=mask_dn)
    if HAS_D:
        tl.store(dD_ptr + pid_b * dim + offs_d, dD)
    if HAS_BIAS:
        tl.store(dbias_ptr + pid_b * dim + offs_d, dbias)


def _launch_config(dim, groups, nstate):
    per = dim // groups
    block_n = triton.next_power_of_2(nstate)
    block_d = 1
    while 2 * block_d * block_n <= TILE and per % (2 * block_d) == 0:
        block_d *= 2  # a power of two dividing the group width, so a block never spans groups
    num_warps = max(1, min(4, block_d * block_n // 256))
    return block_d, block_n, num_warps


def _flags(D, z, delta_bias, delta_softplus):
    return dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                SOFTPLUS=bool(delta_softplus))


class _SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk):
        batch, dim, length = u.shape
        groups, nstate = B.shape[1], A.shape[1]
        block_d, block_n, num_warps = _launch_config(dim, groups, nstate)
        n_chunks = triton.cdiv(length, chunk)
        out = torch.empty_like(u)
        ckpt = u.new_empty(batch, n_chunks, dim, nstate, dtype=torch.float32)
        last_state = u.new_empty(batch, dim, nstate, dtype=torch.float32)
        dummy = ckpt  # placeholder pointer for absent optional inputs (never read: constexpr flags)
        grid = (batch, dim // block_d)
        _scan_fwd_kernel[grid](u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
                               delta_bias if delta_bias is not None else dummy, out, ckpt, last_state,
                               dim, length, nstate, groups, n_chunks, **_flags(D, z, delta_bias, delta_softplus),
                               BLOCK_D=block_d, BLOCK_N=block_n, CHUNK=chunk, num_warps=num_warps)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt)
        ctx.config = (delta_softplus, chunk, block_d, block_n, num_warps)
        ctx.mark_non_differentiable(last_state)
        return out, last_state

    @staticmethod
    def backward(ctx, dout, dlast_state):
        u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
        delta_softplus, chunk, block_d, block_n, num_warps = ctx.config
        batch, dim, length = u.shape
        groups, nstate = B.shape[1], A.shape[1]
        n_chunks, n_dblocks = ckpt.shape[1], dim // block_d
        f32 = dict(dtype=torch.float32, device=u.device)
        scratch = torch.empty(batch, dim, chunk + 1, block_n, **f32)
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dz = torch.empty_like(z) if z is not None else scratch
        dA = torch.empty(batch, dim, nstate, **f32)
        dB = torch.empty(batch, n_dblocks, nstate, length, **f32)
        dC = torch.empty(batch, n_dblocks, nstate, length, **f32)
        dD = torch.empty(batch, dim, **f32)
        dbias = torch.empty(batch, dim, **f32)
        grid = (batch, n_dblocks)
        _scan_bwd_kernel[grid](u, delta, A, B, C, D if D is not None else scratch, z if z is not None else scratch,
                               delta_bias if delta_bias is not None else scratch, dout.contiguous(), ckpt, scratch,
                               du, ddelta, dz, dA, dB, dC, dD, dbias,
                               dim, length, nstate, groups, n_chunks, **_flags(D, z, delta_bias, delta_softplus),
                               BLOCK_D=block_d, BLOCK_N=block_n, CHUNK=chunk, num_warps=num_warps)

        def per_group(grad):  # (batch, channel blocks, N, L) -> (batch, G, N, L): sum a group's blocks
            return grad.view(batch, groups, n_dblocks // groups, nstate, length).sum(2).to(B.dtype)

        return (du, ddelta, dA.sum(0).to(A.dtype), per_group(dB), per_group(dC),
                dD.sum(0).to(D.dtype) if D is not None else None, dz if z is not None else None,
                dbias.sum(0).to(delta_bias.dtype) if delta_bias is not None else None, None, None)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, chunk=None):
    """Triton S6 scan. B, C must be grouped (batch, G, N, L) with the same G; other layouts as mamba.

    Computes in float32 and returns ``out`` in u's dtype (and the float32 last state if asked).
    ``chunk`` (default ``CHUNK``) is the number of steps between states saved for the backward.
    """
    chunk = CHUNK if chunk is None else chunk
    contiguous = [t if t is None else t.contiguous() for t in (u, delta, A, B, C, D, z, delta_bias)]
    out, last_state = _SelectiveScanTriton.apply(*contiguous, delta_softplus, chunk)
    return (out, last_state) if return_last_state else out
