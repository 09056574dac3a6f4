"""The decoding step of a causal MambaLM: which form runs, and the model's tensors for the fused
forms.

Three forms, one contract (ids (batch,) -> logits (batch, padded vocab); every cache entry
advanced in place):

- "per_op": ``MambaLM.step_per_op``, one module call per operation (any configuration, any
  device); the reference the others are tested against.
- "fused": two Triton kernels per layer plus one for the head
  (:func:`seqlab.kernels.decode.fused_lm_step`), float32 logits.
- "persistent": the whole step in one persistent Triton launch
  (:class:`seqlab.kernels.decode.PersistentStep`), float32 logits.

``MambaConfig.decode_step`` chooses: "auto" (the default) by the rules of :func:`step_path`,
or one form forced ("fused" and "persistent" raise where they do not apply). The kernels take
the model's tensors, never the model: :func:`lm_weights` collects them. Which form ran is
observable through ``seqlab.kernels.last_impl("lm_step")``.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict

import torch
import torch.nn as nn

from seqlab.kernels import record_impl, resolve_impl, triton_interpreted
from seqlab.kernels.decode import LayerWeights, LMWeights, NormParams

from .config import DECODE_STEPS
from .mixer import Mixer
from .norm import RMSNorm

Tensor = torch.Tensor

# decode_step="auto" takes the fused step for batches of at most FUSED_MAX_BATCH rows, except,
# for a CUDA-graph capture (``for_graph``), for models at least PER_OP_MIN_D_MODEL wide;
# elsewhere the per-op step (cuBLAS GEMMs, the conv-update and state-update kernels, the fused
# add + norm: 7 launches per layer) is faster. H200, generate(): with CUDA graphs, 130m
# (d_model 768, 24 layers) batch 1 per-op 1,317 tokens/s vs fused 948, batch 64 per-op 74,169;
# the audio model (d_model 256, 14 layers) batch 1 fused 5,133 samples/s vs per-op 4,114,
# batch 64 per-op 205,928 vs fused 139,057. Without graphs every launch costs host time and
# the fused step's 2 launches per layer win: 130m batch 1 fused 194 tokens/s vs per-op 99.
# Where the fused step is chosen on a GPU, models up to PERSIST_MAX_D_MODEL wide take its
# persistent form (the whole step in one launch) when its programs fit the GPU at once.
FUSED_MAX_BATCH = 15
PER_OP_MIN_D_MODEL = 512
PERSIST_MAX_D_MODEL = 256


def fused_step_reason(model: nn.Module, device: torch.device) -> str | None:
    """None if the fused step applies to this model on this device, else why not."""
    cfg = model.config
    if cfg.bidirectional or cfg.rc_equivariant:
        return "bidirectional / RC models do not decode"
    if getattr(cfg, "pool_factors", None):
        return "multi-scale (pool_factors) models use the per-op step"
    if not cfg.selective:
        return "the LTI ablation (selective=False) uses the per-op step"
    if resolve_impl(cfg.scan_impl, device, op="lm_step") != "triton":
        return f"scan_impl={cfg.scan_impl!r} resolves to a non-Triton implementation on {device}"
    head = model.lm_head
    if not isinstance(head, nn.Linear) or head.bias is not None:
        return "the LM head is not a bias-free Linear"
    for layer in model.backbone.layers:
        if not isinstance(layer.mixer, Mixer) or not isinstance(layer.norm, (RMSNorm, nn.LayerNorm)):
            return "a block has a non-standard mixer or norm"
    return None


def step_path(model: nn.Module, ids_t: Tensor, for_graph: bool = False) -> str:
    """Which step ``MambaLM.step`` takes for this call: "persistent", "fused" or "per_op".

    ``model.config.decode_step``, the model's structure, the device, the batch size and
    ``for_graph`` (the call is made for a CUDA-graph capture or its warm-up) decide; see the
    rules above FUSED_MAX_BATCH. A forced "fused" or "persistent" that cannot run raises a
    ValueError saying why.
    """
    choice = model.config.decode_step
    if choice not in DECODE_STEPS:
        raise ValueError(f"MambaConfig.decode_step={choice!r}: expected one of {DECODE_STEPS}")
    if choice == "per_op":
        return "per_op"
    reason = fused_step_reason(model, ids_t.device)
    if reason is not None:
        if choice in ("fused", "persistent"):
            raise ValueError(f"MambaConfig.decode_step={choice!r} but the fused step does not "
                             f"apply: {reason}")
        return "per_op"
    from seqlab.kernels.decode import persistent_fits  # Triton resolved above: importable
    batch, cfg = ids_t.shape[0], model.config
    d_inner = model.backbone.layers[0].mixer.d_inner
    interp = triton_interpreted()
    if choice == "persistent":
        if interp or not persistent_fits(batch, d_inner, ids_t.device):
            raise ValueError(f"MambaConfig.decode_step='persistent': {batch} rows x {d_inner} "
                             "channels do not fit the GPU at once (or Triton is interpreted)")
        return "persistent"
    if choice == "fused":
        return "fused"
    if batch > FUSED_MAX_BATCH:
        return "per_op"
    if (not interp and cfg.d_model <= PERSIST_MAX_D_MODEL
            and persistent_fits(batch, d_inner, ids_t.device)):
        return "persistent"
    if for_graph and cfg.d_model >= PER_OP_MIN_D_MODEL:
        return "per_op"
    return "fused"


def _norm_params(norm: nn.Module) -> NormParams:
    if isinstance(norm, RMSNorm):
        return NormParams("rms", norm.weight, None, float(norm.eps))
    return NormParams("layer", norm.weight, norm.bias, float(norm.eps))


def lm_weights(model: nn.Module) -> LMWeights:
    """The tensors of a causal MambaLM (one to which :func:`fused_step_reason` finds nothing
    against) as the decoding kernels read them: the parameters themselves, no copies."""
    bb = model.backbone
    layers = []
    for layer in bb.layers:
        mx = layer.mixer
        layers.append(LayerWeights(
            norm=_norm_params(layer.norm), in_proj_weight=mx.in_proj.weight,
            in_proj_bias=mx.in_proj.bias, conv_weight=mx.conv1d.weight[:, 0, :],
            conv_bias=mx.conv1d.bias, x_proj_weight=mx.x_proj.weight,
            dt_proj_weight=mx.dt_proj.weight, dt_proj_bias=mx.dt_proj.bias, A_log=mx.A_log,
            D=mx.D, out_proj_weight=mx.out_proj.weight, out_proj_bias=mx.out_proj.bias))
    return LMWeights(embedding=bb.embedding.weight, layers=tuple(layers),
                     final_norm=_norm_params(bb.norm_f), head_weight=model.lm_head.weight)


_PERSISTENT: "weakref.WeakKeyDictionary[nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()


def persistent_step(model: nn.Module, cache: list, batch: int):
    """The :class:`~seqlab.kernels.decode.PersistentStep` of this model, cache and batch, built
    on first use (its address table points at the parameters and the cache, so a moved model
    or a new cache builds a new one; a few are kept per model, which stays collectable: a step
    holds the model's tensors, not the model)."""
    from seqlab.kernels.decode import PersistentStep
    key = (batch, tuple(t.data_ptr() for layer in cache for t in layer),
           tuple(p.data_ptr() for p in model.parameters()))
    per_model = _PERSISTENT.setdefault(model, OrderedDict())
    st = per_model.get(key)
    if st is None:
        st = per_model[key] = PersistentStep(lm_weights(model), cache, batch)
        while len(per_model) > 4:
            per_model.popitem(last=False)
    per_model.move_to_end(key)
    return st


@torch.no_grad()
def fused_lm_step(model: nn.Module, ids_t: Tensor, cache: list) -> Tensor:
    """ids_t (batch,) long -> logits (batch, padded vocab) float32; advances every cache entry.

    Same contract as the per-op ``MambaLM.step`` (the residual stream is kept in float32
    whatever ``residual_in_fp32`` says; everything else follows the parameters' dtype).
    """
    from seqlab.kernels.decode import fused_lm_step as kernel_step
    return kernel_step(lm_weights(model), cache, ids_t)


def lm_step(model: nn.Module, ids_t: Tensor, cache: list, for_graph: bool = False) -> Tensor:
    """``MambaLM.step``: the form :func:`step_path` picks, recorded as ``last_impl("lm_step")``."""
    path = step_path(model, ids_t, for_graph)
    if path == "persistent":
        record_impl("lm_step", "persistent_triton", ids_t.device)
        with torch.no_grad():
            # A copy: the step's logits buffer is reused by the next call.
            return persistent_step(model, cache, ids_t.shape[0])(ids_t).clone()
    if path == "fused":
        record_impl("lm_step", "fused_triton", ids_t.device)
        return fused_lm_step(model, ids_t, cache)
    record_impl("lm_step", "per_op", ids_t.device)
    return model.step_per_op(ids_t, cache)


@torch.no_grad()
def step_and_pick(model: nn.Module, ids_t: Tensor, cache: list, noise: Tensor | None,
                  inv_temp: float, out: Tensor, col: int, vocab: int,
                  for_graph: bool = False) -> bool:
    """If ``MambaLM.step`` would take the persistent path here: run the step and the pick of the
    next id (argmax(logits * inv_temp + noise) over the first ``vocab`` ids, written to ids_t
    and out[:, col]) in one launch and return True; else do nothing and return False."""
    if step_path(model, ids_t, for_graph) != "persistent":
        return False
    record_impl("lm_step", "persistent_triton", ids_t.device)
    persistent_step(model, cache, ids_t.shape[0])(ids_t, (noise, inv_temp, ids_t, out, col, vocab))
    return True
