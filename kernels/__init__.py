"""seqlab.kernels: the selective scan (S6) of Mamba, in three explicitly chosen implementations.

- ``reference``: sequential loop in plain torch (float64-capable), the spec.
- ``torch``: chunked scan with a hand-written backward, the default on CPU.
- ``triton``: fused forward/backward kernels and a decode-step kernel, the default on CUDA.
"""
from .api import (IMPLS, last_impl, resolve_impl, selective_scan, selective_state_update,
                  triton_available)
from .reference import selective_scan_reference, selective_state_update_reference

__all__ = [
    "IMPLS",
    "last_impl",
    "resolve_impl",
    "selective_scan",
    "selective_state_update",
    "selective_scan_reference",
    "selective_state_update_reference",
    "triton_available",
]
