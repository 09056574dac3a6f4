"""Decoding: one token through the recurrence.

- :func:`selective_state_update` (``op.py``; reference ``reference.py``, Triton kernel
  ``state_update.py``): one step of the scan, the state updated in place.
- ``mixer_step.py``: a whole layer in two Triton kernels and a whole LM step from them,
  :func:`fused_lm_step`.
- ``lm_step.py``: the whole LM step in one persistent launch, :class:`PersistentStep`.
- ``pick.py``: the next id's pick (greedy or Gumbel-max) on the device, :func:`pick_step`.
- ``weights.py``: the tensors the LM steps read (:class:`LMWeights`), filled by the model layer.

The Triton-backed names are imported on first use, so importing this package does not import
triton.
"""
from .op import selective_state_update
from .reference import selective_state_update_reference
from .weights import LayerWeights, LMWeights, NormParams

_LAZY = {"fused_lm_step": "mixer_step", "PersistentStep": "lm_step",
         "persistent_fits": "lm_step", "pick_step": "pick"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["LMWeights", "LayerWeights", "NormParams", "PersistentStep", "fused_lm_step",
           "persistent_fits", "pick_step", "selective_state_update",
           "selective_state_update_reference"]
