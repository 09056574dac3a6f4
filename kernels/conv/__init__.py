"""The depthwise causal conv1d + SiLU of the Mamba mixer: the public
:func:`causal_conv1d_silu` and its decoding form :func:`causal_conv1d_update` (``op.py``), their
torch references (``reference.py``) and Triton kernels (``triton_kernels.py``).

The Triton path's autograd-free pair, :func:`conv_triton_forward` and
:func:`conv_triton_backward`, is imported on first use so that importing this package does not
import triton.
"""
from .op import causal_conv1d_silu, causal_conv1d_update
from .reference import causal_conv1d_silu_reference, causal_conv1d_update_reference

_LAZY = {"conv_triton_forward", "conv_triton_backward"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(".triton_kernels", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["causal_conv1d_silu", "causal_conv1d_silu_reference", "causal_conv1d_update",
           "causal_conv1d_update_reference", "conv_triton_backward", "conv_triton_forward"]
