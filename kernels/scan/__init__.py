"""The selective scan (S6): the public :func:`selective_scan`, its sequential reference and
its implementations (``reference.py`` the spec, ``chunked.py`` pure PyTorch, ``numba_loops.py``
compiled CPU loops, ``triton_kernels.py`` the GPU kernels, ``tuning.py`` their settings).

The Triton path's autograd-free pieces, :class:`ScanPlan`, :func:`scan_triton_forward` and
:func:`scan_triton_backward`, are imported on first use so that importing this package does
not import triton.
"""
from .op import selective_scan
from .reference import selective_scan_reference
from .tuning import ScanTuning

_LAZY = {"ScanPlan", "scan_triton_forward", "scan_triton_backward"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(".triton_kernels", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ScanPlan", "ScanTuning", "scan_triton_backward", "scan_triton_forward",
           "selective_scan", "selective_scan_reference"]
