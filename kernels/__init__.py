"""seqlab.kernels: the ops of a Mamba model on tensors, one subpackage per op, each with its
plain reference beside its fast paths and one public entry point that checks its arguments
(ValueError) and takes an explicit ``impl`` ("auto" | "triton" | "numba" | "torch" |
"reference"; :func:`last_impl` says which ran).

- :mod:`.scan`: the selective scan (S6), :func:`selective_scan`: ``reference`` a sequential
  loop in plain torch (float64-capable), the spec; ``numba`` compiled CPU loops (the default on
  CPU when numba is installed); ``torch`` a chunked scan in pure PyTorch with a hand-written
  backward; ``triton`` fused forward/backward kernels (the default on CUDA), tuned by a
  :class:`ScanTuning`.
- :mod:`.conv`: the depthwise causal conv1d + SiLU, :func:`causal_conv1d_silu`, and its
  one-step decoding form :func:`causal_conv1d_update`.
- :mod:`.norm`: the residual add + RMSNorm, :func:`add_rms_norm`.
- :mod:`.decode`: one decoding step, :func:`selective_state_update`, and the fused per-layer
  and persistent whole-model steps that take the model's tensors (:class:`~.decode.LMWeights`).

:mod:`.api` holds what they share: the implementation choice and its reporting. Importing
seqlab.kernels does not import triton: the Triton modules load on first use.
"""
from .api import (IMPLS, last_impl, numba_available, record_impl, resolve_impl,
                  triton_available, triton_interpreted)
from .conv import (causal_conv1d_silu, causal_conv1d_silu_reference, causal_conv1d_update,
                   causal_conv1d_update_reference)
from .decode import selective_state_update, selective_state_update_reference
from .norm import add_rms_norm, add_rms_norm_reference
from .scan import ScanTuning, selective_scan, selective_scan_reference

__all__ = [
    "IMPLS",
    "ScanTuning",
    "add_rms_norm",
    "add_rms_norm_reference",
    "causal_conv1d_silu",
    "causal_conv1d_silu_reference",
    "causal_conv1d_update",
    "causal_conv1d_update_reference",
    "last_impl",
    "numba_available",
    "record_impl",
    "resolve_impl",
    "selective_scan",
    "selective_scan_reference",
    "selective_state_update",
    "selective_state_update_reference",
    "triton_available",
    "triton_interpreted",
]
