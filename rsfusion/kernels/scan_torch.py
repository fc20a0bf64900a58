"""Fast pure-PyTorch selective scan core with a hand-written backward (CPU or any device).

Algorithm. Forward: h_l = a_l * h_{l-1} + x_l with a_l = exp(delta_l A), x_l = delta_l B_l u_l, then
y_l = sum_n C_l h_l. Backward: g_l = dL/dh_l = dy_l C_l + a_{l+1} g_{l+1}, from the end; then
dC_l = sum_p dy_l h_l, dB_l = sum_p delta_l u_l g_l, d(delta_l u_l) = sum_n B_l g_l and, with
m_l = g_l a_l h_{l-1} = dL/d(delta_l A), dA = sum_{b, l} m_l delta_l and a delta term sum_n m_l A.

Why it is fast on a CPU: both recurrences run time-major over contiguous
(batch, dim, N) slabs with one in-place ``addcmul_`` per step, so there is no per-step autograd
graph and no O(L^2) slice backward. Everything else (discretisation, the contraction with C, and in
backward the B/C/u contractions and the A/delta reductions) runs on chunks of CHUNK time steps right
after they are produced, while they are still in cache, in buffers reused from chunk to chunk. Only
the state at the end of each chunk is kept for backward (like mamba's CUDA kernel): backward
recomputes a chunk's states and exp(delta * A) from it, exactly as forward computed them, so nothing
of size (L, batch, dim, N) is ever allocated (fresh large buffers cost page faults and memory
bandwidth, which dominated on the 2-core CPU). y and du/ddelta are written chunk by chunk straight
into their (batch, dim, L) outputs. The skip term D u and softplus(delta + delta_bias) are applied to
each chunk too (as separate autograd ops they were four more passes over (batch, dim, L)); backward
takes softplus's derivative sigmoid(x) = 1 - exp(-softplus(x)) from the saved softplus output.

Layout: a state slab is stored (batch, G, N, dim / G), state index before channel, so that every
broadcast (delta * u over N, B over the channels of its group, A over time) has a contiguous,
vectorisable inner dimension of dim / G channels; with N innermost (N = 1..16) the elementwise
kernels would run a short scalar inner loop and the contractions would be tiny batched matmuls.

Why it is stable: each step multiplies by its own factor exp(delta_l A), computed from
that step's delta alone, and adds; nothing divides by a cumulative decay or takes exp of a partial
sum, so an underflowing decay just gives 0 (the exact limit) and no NaN can appear that the
recurrence itself would not produce.

Why not a chunked closed form or a doubling scan: on the 2-core CPU the per-step Python cost is
small (~3-5 us per step, ~5 % of fwd + bwd at the M3amba shape (16, 128, 1024, 4)), while a
closed form or an associative scan adds full (L, batch, dim, N) passes (cumulative decays, a
fix-up) that cost more than the whole sequential loop (measured: the loop over 1024 steps 6-8 ms,
a two-level chunked scan of the same recurrence 64 ms).
"""
import torch

from rsfusion.kernels import scan_inference
from rsfusion.kernels.layout import length_last, time_major, time_major_view

__all__ = ["scan_core_torch", "CHUNK"]

# Time steps per chunk (and between the states saved for backward): small enough for a chunk of
# (batch, dim, N) slabs to stay near the cache, large enough that the per-chunk ops are few. 8, 16
# and 32 time alike (within the 2-core CPU's noise) at the benchmark shapes; 4 is slower.
CHUNK = 16
# Up to this state size a sum over N is N fused multiply-adds over (chunk, batch, dim) slices;
# above it one batched (1 x N) @ (N x dim / G) matmul per (step, batch, group) is faster.
_LOOP_MAX_N = 4


def _softplus_(x, scratch):
    """x <- softplus(x) in place (identity above 20, as mamba's kernel), with a ``scratch`` like x."""
    return x.copy_(torch.ops.aten.softplus.out(x, 1.0, 20.0, out=scratch))


def _scan_forward(h, a):
    """In place over the time dim 0: h[t] += a[t] * h[t - 1] for t >= 1 (views from one unbind: a
    per-step index would cost three tensor constructions per step)."""
    previous = None
    for h_t, a_t in zip(h.unbind(0), a.unbind(0)):
        if previous is not None:
            h_t.addcmul_(a_t, previous)
        previous = h_t


def _scan_backward(g, a):
    """In place, from the end: g[t] += a[t + 1] * g[t + 1] for t < steps - 1."""
    later = g[-1]
    for g_t, a_next in zip(reversed(g.unbind(0)[:-1]), reversed(a.unbind(0)[1:])):
        g_t.addcmul_(a_next, later)
        later = g_t


def _chunk_states(h, a, delta_u, u, delta, A_g, B, h_before):
    """One chunk's states, in place: h (steps, batch, G, N, dim / G), with a = exp(delta A) and
    delta_u = delta * u of its steps as by-products; h_before is the state before the chunk (None
    at the sequence start). u, delta (steps, batch, G, 1, dim / G); A_g (G, N, dim / G); B (steps, batch, G, N)."""
    torch.mul(delta, u, out=delta_u)
    torch.mul(delta_u, B[..., None], out=h)  # delta B u
    torch.mul(delta, A_g, out=a).exp_()  # exp(delta A)
    if h_before is not None:
        h[0].addcmul_(a[0], h_before)
    _scan_forward(h, a)
    return h


def _sum_over_states(h, weight, out, scratch=None):
    """out[..., p] = sum_n weight[..., n, p] * h[..., n, p] for h (..., N, P) and a weight broadcastable
    to it, either per state (..., N, 1) or per state and channel (..., N, P) (then with N above
    _LOOP_MAX_N a ``scratch`` like h is needed)."""
    nstate = h.shape[-2]
    if nstate <= _LOOP_MAX_N:
        torch.mul(h[..., 0, :], weight[..., 0, :], out=out)
        for n in range(1, nstate):
            out.addcmul_(h[..., n, :], weight[..., n, :])
    elif weight.shape[-1] == 1:
        torch.matmul(weight.transpose(-1, -2), h, out=out[..., None, :])
    else:
        torch.sum(torch.mul(h, weight, out=scratch), dim=-2, out=out)
    return out


def _sum_over_channels(h, weight, out):
    """out[..., n] = sum_p h[..., n, p] * weight[..., p] for h (..., N, P), weight (..., P)."""
    # As (1 x P) @ (P x N) with a transposed h: 1.5-2.5x faster than (N x P) @ (P x 1) at N >= 16.
    torch.matmul(weight[..., None, :], h.transpose(-1, -2), out=out[..., None, :])
    return out


class _SelectiveScanTorch(torch.autograd.Function):
    """y[b, d, l] = sum_n C[b, g(d), n, l] h[b, d, l, n] with h_l = exp(delta_l A) h_{l-1} + delta_l B_l u_l.

    Inputs share one float dtype: u, delta (batch, dim, L); A (dim, N); B, C (batch, G, N, L).
    Returns y (batch, dim, L) and the last state (batch, dim, N), which carries no gradient.
    Internally everything is time-major: states (steps, batch, G, N, dim / G), the rest (L, batch, G, ...).
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, delta_softplus):
        # The scan accumulates in the inputs' dtype even under autocast (its einsum/matmul would
        # otherwise drop to bfloat16/float16), as mamba-ssm's kernel does.
        with torch.autocast(u.device.type, enabled=False):
            return _SelectiveScanTorch._forward(ctx, u, delta, A, B, C, D, delta_bias, delta_softplus)

    @staticmethod
    def backward(ctx, grad_y, grad_last_state):
        # grad_last_state is ignored, as in mamba-ssm.
        with torch.autocast(grad_y.device.type, enabled=False):
            return _SelectiveScanTorch._backward(ctx, grad_y)

    @staticmethod
    def _forward(ctx, u, delta, A, B, C, D, delta_bias, delta_softplus):
        batch, dim, length = u.shape
        groups, nstate = B.shape[1], A.shape[1]
        per = dim // groups
        u_t = time_major(u).view(length, batch, groups, 1, per)
        # delta's time-major copy becomes softplus(delta + delta_bias) in place, chunk by chunk.
        delta_t = time_major(delta).view(length, batch, groups, 1, per)
        D_g, bias_g = (None if v is None else v.reshape(groups, 1, per) for v in (D, delta_bias))
        B_t, C_t = time_major(B), time_major(C)  # (L, batch, G, N)
        A_g = A.reshape(groups, per, nstate).transpose(1, 2).contiguous()  # (G, N, dim / G)

        y = u.new_empty(batch, dim, length)
        y_t = time_major_view(y)
        chunk_len = min(CHUNK, length)
        checkpoints = u.new_empty(-(-length // CHUNK), batch, groups, nstate, per)  # state after each chunk
        states, decay = (u.new_empty(chunk_len, batch, groups, nstate, per) for _ in range(2))
        delta_u, y_chunk = u.new_empty(chunk_len, batch, groups, 1, per), u.new_empty(chunk_len, batch, groups, per)
        for chunk, start in enumerate(range(0, length, CHUNK)):
            stop = min(start + CHUNK, length)
            steps = stop - start
            dt = delta_t[start:stop]
            if bias_g is not None:
                dt += bias_g
            if delta_softplus:
                _softplus_(dt, scratch=delta_u[:steps])
            h = _chunk_states(states[:steps], decay[:steps], delta_u[:steps], u_t[start:stop], dt,
                              A_g, B_t[start:stop], checkpoints[chunk - 1] if chunk else None)
            checkpoints[chunk].copy_(h[-1])
            y_c = _sum_over_states(h, C_t[start:stop, ..., None], out=y_chunk[:steps])
            if D_g is not None:
                y_c.addcmul_(u_t[start:stop, :, :, 0], D_g[:, 0])
            y_t[start:stop] = y_c.view(steps, -1)

        last_state = checkpoints[-1].transpose(-1, -2).reshape(batch, dim, nstate)  # a copy
        ctx.mark_non_differentiable(last_state)
        ctx.save_for_backward(u_t, delta_t, A_g, B_t, C_t, checkpoints, D_g)
        ctx.has_bias, ctx.delta_softplus = bias_g is not None, delta_softplus
        return y, last_state

    @staticmethod
    def _backward(ctx, grad_y):
        u_t, delta_t, A_g, B_t, C_t, checkpoints, D_g = ctx.saved_tensors
        length, batch, groups, _, per = u_t.shape
        nstate = A_g.shape[1]
        dim = groups * per
        dy_t = time_major(grad_y).view(length, batch, groups, 1, per)
        grad_u, grad_delta = (grad_y.new_empty(batch, dim, length) for _ in range(2))
        grad_u_t, grad_delta_t = time_major_view(grad_u), time_major_view(grad_delta)
        grad_B, grad_C = torch.empty_like(B_t), torch.empty_like(C_t)
        grad_A = torch.zeros_like(A_g)
        grad_D = None if D_g is None else torch.zeros_like(D_g)  # (G, 1, dim / G), like the bias's
        grad_bias = torch.zeros_like(grad_A[:, :1]) if ctx.has_bias else None
        chunk_len = min(CHUNK, length)
        states, decay, grad_h = (u_t.new_empty(chunk_len, batch, groups, nstate, per) for _ in range(3))
        delta_u, grad_delta_u, grad_delta_a = (u_t.new_empty(chunk_len, batch, groups, 1, per) for _ in range(3))
        carry_g = u_t.new_empty(batch, groups, nstate, per)  # dL/dh at the step after the chunk ...
        carry_a = torch.empty_like(carry_g)  # ... and exp(delta A) at that step
        for chunk, start in reversed(list(enumerate(range(0, length, CHUNK)))):
            stop = min(start + CHUNK, length)
            steps = stop - start
            g, a, h = grad_h[:steps], decay[:steps], states[:steps]
            du, gdu, gda = delta_u[:steps], grad_delta_u[:steps], grad_delta_a[:steps]
            before = checkpoints[chunk - 1] if chunk else None
            # The chunk's states, recomputed from its checkpoint exactly as in forward.
            _chunk_states(h, a, du, u_t[start:stop], delta_t[start:stop], A_g, B_t[start:stop], before)
            # g_l = dL/dh_l = dy_l C_l + exp(delta_{l+1} A) g_{l+1}, built in place from the end.
            torch.mul(dy_t[start:stop], C_t[start:stop, ..., None], out=g)
            if stop < length:
                g[-1].addcmul_(carry_a, carry_g)
            _scan_backward(g, a)
            carry_g.copy_(g[0])
            carry_a.copy_(a[0])

            _sum_over_channels(h, dy_t[start:stop, :, :, 0], out=grad_C[start:stop])
            _sum_over_channels(g, du[:, :, :, 0], out=grad_B[start:stop])
            _sum_over_states(g, B_t[start:stop, ..., None], out=gdu[:, :, :, 0])  # dL/d(delta u)
            # m_l = g_l * exp(delta_l A) * h_{l-1} = dL/d(delta_l A), with h_{-1} = 0.
            a[1:].mul_(h[:-1])
            if before is None:
                a[0].zero_()
            else:
                a[0].mul_(before)
            a.mul_(g)
            _sum_over_states(a, A_g, out=gda[:, :, :, 0], scratch=g)  # g is free now
            grad_A += a.mul_(delta_t[start:stop]).sum((0, 1))
            # ddelta = d(delta u) * u + the part through exp(delta A); du = d(delta u) * delta (+ D dy).
            # Computed in the chunk buffers, then copied: an elementwise op writing the strided view is slower.
            dt, u_c, dy_c = delta_t[start:stop], u_t[start:stop], dy_t[start:stop]
            gda.addcmul_(gdu, u_c)
            if ctx.delta_softplus:  # through softplus: its derivative sigmoid(x) = 1 - exp(-softplus(x))
                gda.mul_(torch.neg(dt, out=du).exp_().neg_().add_(1.0))
            if grad_bias is not None:
                grad_bias += gda.sum((0, 1))
            grad_delta_t[start:stop] = gda.view(steps, -1)
            gdu.mul_(dt)
            if grad_D is not None:
                gdu.addcmul_(dy_c, D_g)
                grad_D += torch.mul(dy_c, u_c, out=du).sum((0, 1))
            grad_u_t[start:stop] = gdu.view(steps, -1)

        grad_B, grad_C = (length_last(grad, batch, groups, nstate, length) for grad in (grad_B, grad_C))
        vectors = (None if g is None else g.reshape(dim) for g in (grad_D, grad_bias))
        return (grad_u, grad_delta, grad_A.transpose(1, 2).reshape(dim, nstate), grad_B, grad_C, *vectors, None)


def scan_core_torch(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """S6 recurrence with the skip ``D`` and ``softplus(delta + delta_bias)`` fused into its chunk loop
    (they are full passes over (batch, dim, L) otherwise); see ``_SelectiveScanTorch``. Returns
    (y, last_state). Inside ``scan_inference.fast_inference_scan()``, a call that needs no gradient
    runs the forward-only ``scan_core_inference`` instead."""
    if scan_inference.fast_inference_scan_enabled() and not (
            torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                            for t in (u, delta, A, B, C, D, delta_bias))):
        return scan_inference.scan_core_inference(u, delta, A, B, C, D, delta_bias, delta_softplus)
    return _SelectiveScanTorch.apply(u, delta, A, B, C, D, delta_bias, delta_softplus)
