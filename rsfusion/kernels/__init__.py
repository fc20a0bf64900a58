"""Selective scan (S6) and the SS2D cross-scan, shared by every model of the suite.

* ``selective_scan``: mamba-ssm ``selective_scan_fn`` semantics over the cuda / triton / torch backends.
* ``selective_scan_ref``: the one readable reference implementation (mamba-ssm ``selective_scan_ref``).
* ``cross_scan`` / ``cross_merge``: VMamba's four-direction SS2D routing, with hand-written backward.
* ``count_scan_flops`` / ``selective_scan_flops``: the scan's analytic FLOPs, for ``FlopCounterMode``.
"""
from rsfusion.kernels.cross_scan import cross_merge, cross_scan
from rsfusion.kernels.dispatch import (
    BACKENDS,
    ENV_VAR,
    available_backends,
    check_backend,
    resolve_backend,
    selective_scan,
)
from rsfusion.kernels.flops import count_scan_flops, selective_scan_flops
from rsfusion.kernels.reference import selective_scan_ref

__all__ = ["selective_scan", "selective_scan_ref", "cross_scan", "cross_merge", "available_backends",
           "check_backend", "resolve_backend", "BACKENDS", "ENV_VAR", "count_scan_flops", "selective_scan_flops"]
