"""The residual add + RMSNorm of a pre-norm block: the public :func:`add_rms_norm` (``op.py``),
its torch reference (``reference.py``) and the fused Triton forward and backward
(``triton_kernels.py``)."""
from .op import add_rms_norm
from .reference import add_rms_norm_reference

__all__ = ["add_rms_norm", "add_rms_norm_reference"]
