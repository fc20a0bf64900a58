"""The time-major layout both CPU scans work in: (batch, ..., L) <-> (L, batch, ...) copies and views."""
from __future__ import annotations

__all__ = ["time_major", "time_major_view", "length_last"]

# Rows of a (rows, L) matrix transposed per copy: a block of ~1024 x L stays in cache, which makes
# the transpose about twice as fast as one whole-matrix copy at the SS2D shapes.
_TRANSPOSE_ROWS = 1024


def time_major(x):
    """(batch, ..., L) -> a new contiguous (L, batch, ...), transposed in cache-sized blocks of rows."""
    flat = x.reshape(-1, x.shape[-1])
    out = flat.new_empty(flat.shape[1], flat.shape[0])
    for row in range(0, flat.shape[0], _TRANSPOSE_ROWS):
        out[:, row:row + _TRANSPOSE_ROWS].copy_(flat[row:row + _TRANSPOSE_ROWS].t())
    return out.view(x.shape[-1], *x.shape[:-1])


def time_major_view(x):
    """A 2-D (L, batch * ...) view of a contiguous (batch, ..., L) tensor, for writing results chunk
    by chunk straight into their final layout (no time-major buffer, no final transpose copy). Kept
    2-D: copying into it is a 2-D transpose, several times faster than through an N-D permuted view."""
    return x.view(-1, x.shape[-1]).t()


def length_last(x, *shape):
    """(L, ...) -> contiguous ``shape`` whose last dim is L (the inverse of ``time_major``)."""
    return x.reshape(x.shape[0], -1).t().contiguous().view(*shape)
