"""FLOPs of the selective scan, for ``torch.utils.flop_counter.FlopCounterMode``.

The counter knows matmuls and convolutions; the scan is a recurrence of element-wise products, which it
does not count, so a Mamba model would look cheaper than it is. Inside :func:`count_scan_flops`,
``selective_scan`` runs as one registered op (``rsfusion::selective_scan``, defined in ``dispatch.py``)
whose count is the analytic one below, and the counter sees none of the scan's inner operations (no
double count).

The analytic count is the one VMamba and the Mamba papers report (mamba-ssm issue 110):
``9 * batch * L * dim * N``, plus ``batch * dim * L`` for the ``D`` skip and again for the ``z`` gate.
"""
from __future__ import annotations

import contextlib
import contextvars

_COUNTING = contextvars.ContextVar("rsfusion_count_scan_flops", default=False)


def selective_scan_flops(batch: int, dim: int, length: int, nstate: int, with_D: bool = True,
                         with_z: bool = False) -> int:
    """The analytic FLOPs of one selective scan (forward)."""
    flops = 9 * batch * length * dim * nstate
    flops += batch * dim * length if with_D else 0
    flops += batch * dim * length if with_z else 0
    return flops


@contextlib.contextmanager
def count_scan_flops():
    """Within this context (and a ``FlopCounterMode``), every ``selective_scan`` is counted analytically.

    Forward only, without autograd: use it under ``torch.no_grad()``.
    """
    token = _COUNTING.set(True)
    try:
        yield
    finally:
        _COUNTING.reset(token)


def counting() -> bool:
    return _COUNTING.get()
