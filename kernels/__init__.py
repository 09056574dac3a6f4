"""seqlab.kernels: the selective scan (S6) of Mamba, in four explicitly chosen implementations.

- ``reference``: sequential loop in plain torch (float64-capable), the spec.
- ``numba``: the scan as compiled CPU loops (state in registers, checkpointed backward), the
  default on CPU when numba is installed.
- ``torch``: chunked scan in pure PyTorch with a hand-written backward (the CPU fallback).
- ``triton``: fused forward/backward kernels and a decode-step kernel, the default on CUDA.

Also the Triton depthwise causal conv1d + SiLU of the Mamba mixer, ``causal_conv1d_silu``
(and its torch reference ``causal_conv1d_silu_reference``) and its one-step decoding form
``causal_conv1d_update``, from :mod:`.conv_triton`, and the residual add + RMSNorm
``add_rms_norm`` from :mod:`.norm_triton`; imported on first use so that importing
seqlab.kernels does not import triton.
"""
from .api import (IMPLS, last_impl, numba_available, resolve_impl, selective_scan,
                  selective_state_update, triton_available)
from .reference import selective_scan_reference, selective_state_update_reference

_LAZY = {"causal_conv1d_silu": "conv_triton", "causal_conv1d_silu_reference": "conv_triton",
         "causal_conv1d_update": "conv_triton", "add_rms_norm": "norm_triton"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "causal_conv1d_silu",
    "causal_conv1d_silu_reference",
    "causal_conv1d_update",
    "add_rms_norm",
    "IMPLS",
    "last_impl",
    "numba_available",
    "resolve_impl",
    "selective_scan",
    "selective_state_update",
    "selective_scan_reference",
    "selective_state_update_reference",
    "triton_available",
]
