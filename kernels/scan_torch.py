"""Fast pure-PyTorch selective scan core with a hand-written backward (CPU or any device).

Why it is fast on a CPU (spec §4.3, §5.5): the recurrence runs time-major over contiguous
(batch, dim, N) slabs with one in-place ``addcmul_`` per step, so there is no per-step autograd
graph and no O(L^2) slice backward. Everything else (discretisation, the contraction with C, and in
backward the B/C/u contractions and the A/delta reductions) runs on chunks of CHUNK time steps right
after they are produced, while they are still in cache. Only the states h (L, batch, dim, N) are kept
for backward; exp(delta * A) is recomputed there, and the backward needs no full-size buffer.
"""
import torch

__all__ = ["scan_core_torch", "CHUNK"]

# Time steps per chunk: small enough for a chunk of (batch, dim, N) slabs to stay in cache at the
# suite's shapes, large enough that the per-chunk ops are few (16 beat 8 and 32 on the 2-core CPU).
CHUNK = 16


def _time_major(x):
    """(batch, ..., L) -> contiguous (L, batch, ...). A 2-D transpose copy: on CPU it is several times
    faster than the equivalent 3-D/4-D permute copy."""
    return x.reshape(-1, x.shape[-1]).t().contiguous().view(x.shape[-1], *x.shape[:-1])


def _length_last(x, *shape):
    """(L, ...) -> contiguous ``shape`` whose last dim is L (the inverse of ``_time_major``)."""
    return x.reshape(x.shape[0], -1).t().contiguous().view(*shape)


class _SelectiveScanTorch(torch.autograd.Function):
    """y[b, d, l] = sum_n C[b, g(d), n, l] h[b, d, l, n] with h_l = exp(delta_l A) h_{l-1} + delta_l B_l u_l.

    Inputs share one float dtype: u, delta (batch, dim, L); A (dim, N); B, C (batch, G, N, L).
    Returns y (batch, dim, L) and the last state (batch, dim, N), which carries no gradient.
    Internally everything is time-major: (L, batch, G, dim / G, N).
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        # The scan accumulates in the inputs' dtype even under autocast (its einsum/matmul would
        # otherwise drop to bfloat16/float16), as mamba-ssm's kernel does.
        with torch.autocast(u.device.type, enabled=False):
            return _SelectiveScanTorch._forward(ctx, u, delta, A, B, C)

    @staticmethod
    def backward(ctx, grad_y, grad_last_state):
        # grad_last_state is ignored, as in mamba-ssm.
        with torch.autocast(grad_y.device.type, enabled=False):
            return _SelectiveScanTorch._backward(ctx, grad_y)

    @staticmethod
    def _forward(ctx, u, delta, A, B, C):
        batch, dim, length = u.shape
        groups, nstate = B.shape[1], A.shape[1]
        per = dim // groups
        u_t = _time_major(u).view(length, batch, groups, per)
        delta_t = _time_major(delta).view(length, batch, groups, per)
        B_t, C_t = _time_major(B), _time_major(C)  # (L, batch, G, N)
        A_g = A.reshape(groups, per, nstate)
        delta_u = delta_t * u_t

        states = u.new_empty(length, batch, groups, per, nstate)
        y = u.new_empty(length, batch, groups, per)
        decay = u.new_empty(min(CHUNK, length), batch, groups, per, nstate)
        for start in range(0, length, CHUNK):
            stop = min(start + CHUNK, length)
            steps = stop - start
            h, a = states[start:stop], decay[:steps]
            torch.mul(delta_u[start:stop, ..., None], B_t[start:stop, :, :, None, :], out=h)  # delta B u
            torch.mul(delta_t[start:stop, ..., None], A_g, out=a).exp_()  # exp(delta A)
            if start > 0:
                h[0].addcmul_(a[0], states[start - 1])
            for t in range(1, steps):
                h[t].addcmul_(a[t], h[t - 1])
            y[start:stop] = torch.einsum("lbgpn,lbgn->lbgp", h, C_t[start:stop])  # beats bmm at N = 1

        last_state = states[-1].reshape(batch, dim, nstate).clone()
        ctx.mark_non_differentiable(last_state)
        ctx.save_for_backward(u_t, delta_t, A, B_t, C_t, states)
        return _length_last(y, batch, dim, length), last_state

    @staticmethod
    def _backward(ctx, grad_y):
        u_t, delta_t, A, B_t, C_t, states = ctx.saved_tensors
        length, batch, groups, per, nstate = states.shape
        A_g = A.reshape(groups, per, nstate)
        dy_t = _time_major(grad_y).view(length, batch, groups, per)
        delta_u = delta_t * u_t

        grad_B, grad_C = torch.empty_like(B_t), torch.empty_like(C_t)
        grad_delta_u = torch.empty_like(u_t)  # dL/d(delta u)
        grad_delta_a = torch.empty_like(delta_t)  # the part of dL/ddelta that flows through exp(delta A)
        grad_A = torch.zeros_like(A_g)
        chunk_len = min(CHUNK, length)
        grad_h = states.new_empty(chunk_len, batch, groups, per, nstate)
        decay = torch.empty_like(grad_h)
        carry_g = states.new_empty(batch, groups, per, nstate)  # dL/dh at the step after the chunk ...
        carry_a = torch.empty_like(carry_g)  # ... and exp(delta A) at that step
        for start in reversed(range(0, length, CHUNK)):
            stop = min(start + CHUNK, length)
            steps = stop - start
            g, a, h = grad_h[:steps], decay[:steps], states[start:stop]
            # g_l = dL/dh_l = dy_l C_l + exp(delta_{l+1} A) g_{l+1}, built in place from the end.
            torch.mul(dy_t[start:stop, ..., None], C_t[start:stop, :, :, None, :], out=g)
            torch.mul(delta_t[start:stop, ..., None], A_g, out=a).exp_()
            if stop < length:
                g[-1].addcmul_(carry_a, carry_g)
            for t in range(steps - 2, -1, -1):
                g[t].addcmul_(a[t + 1], g[t + 1])
            carry_g.copy_(g[0])
            carry_a.copy_(a[0])

            torch.matmul(dy_t[start:stop, :, :, None, :], h, out=grad_C[start:stop, :, :, None, :])
            torch.matmul(delta_u[start:stop, :, :, None, :], g, out=grad_B[start:stop, :, :, None, :])
            grad_delta_u[start:stop] = torch.einsum("lbgpn,lbgn->lbgp", g, B_t[start:stop])
            # m_l = g_l * exp(delta_l A) * h_{l-1} = dL/d(delta_l A), with h_{-1} = 0.
            if start > 0:
                a.mul_(states[start - 1: stop - 1])
            else:
                a[0].zero_()
                a[1:].mul_(states[: stop - 1])
            a.mul_(g)
            torch.sum(torch.mul(a, A_g, out=g), dim=-1, out=grad_delta_a[start:stop])  # g is free now
            grad_A += a.mul_(delta_t[start:stop, ..., None]).sum((0, 1))

        grad_u = grad_delta_u * delta_t
        grad_delta = grad_delta_u.mul_(u_t).add_(grad_delta_a)

        dim = groups * per
        return (_length_last(grad_u, batch, dim, length), _length_last(grad_delta, batch, dim, length),
                grad_A.view_as(A), _length_last(grad_B, batch, groups, nstate, length),
                _length_last(grad_C, batch, groups, nstate, length))


def scan_core_torch(u, delta, A, B, C):
    """Core S6 recurrence; see ``_SelectiveScanTorch``. Returns (y, last_state)."""
    return _SelectiveScanTorch.apply(u, delta, A, B, C)
