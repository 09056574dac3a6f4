"""Fused decoding step of a causal MambaLM: two Triton kernels per layer plus one for the head.

``MambaLM.step`` calls :func:`fused_lm_step` when :func:`fused_step_reason` finds nothing
against it (causal, selective, non-RC blocks whose scan implementation resolves to Triton:
the default on CUDA). The per-op path in ``Mixer.step`` stays the reference it is tested
against. Which one ran is observable through ``seqlab.kernels.last_impl("lm_step")``.
"""
from __future__ import annotations

import contextlib
import os
import weakref
from collections import OrderedDict

import torch
import torch.nn as nn

from seqlab.kernels import api as kernel_api

Tensor = torch.Tensor


def fused_step_reason(model: nn.Module, device: torch.device) -> str | None:
    """None if the fused step applies to this model on this device, else why not."""
    from .backbone import RMSNorm
    from .mixer import Mixer
    cfg = model.config
    if cfg.bidirectional or cfg.rc_equivariant:
        return "bidirectional / RC models do not decode"
    if getattr(cfg, "pool_factors", None):
        return "multi-scale (pool_factors) models use the per-op step"
    if not cfg.selective:
        return "the LTI ablation (selective=False) uses the per-op step"
    if kernel_api.resolve_impl(cfg.scan_impl, device, op="lm_step") != "triton":
        return f"scan_impl={cfg.scan_impl!r} resolves to a non-Triton implementation on {device}"
    head = model.lm_head
    if not isinstance(head, nn.Linear) or head.bias is not None:
        return "the LM head is not a bias-free Linear"
    for layer in model.backbone.layers:
        if not isinstance(layer.mixer, Mixer) or not isinstance(layer.norm, (RMSNorm, nn.LayerNorm)):
            return "a block has a non-standard mixer or norm"
    return None


# SEQLAB_LM_STEP=auto takes the fused step for batches of at most FUSED_MAX_BATCH rows, except,
# inside CUDA-graph decoding (:func:`graph_decoding`), for models at least PER_OP_MIN_D_MODEL
# wide; elsewhere the per-op step (cuBLAS GEMMs, the conv-update and state-update kernels, the
# fused add + norm: 7 launches per layer) is faster. H200, generate(): with CUDA graphs, 130m
# (d_model 768, 24 layers) batch 1 per-op 1,317 tokens/s vs fused 948, batch 64 per-op 74,169;
# the audio model (d_model 256, 14 layers) batch 1 fused 5,133 samples/s vs per-op 4,114,
# batch 64 per-op 205,928 vs fused 139,057. Without graphs every launch costs host time and
# the fused step's 2 launches per layer win: 130m batch 1 fused 194 tokens/s vs per-op 99.
# Where the fused step is chosen on a GPU, models up to PERSIST_MAX_D_MODEL wide take its
# persistent form (the whole step in one launch, :mod:`seqlab.kernels.lm_step_persistent`)
# when its programs fit the GPU at once.
FUSED_MAX_BATCH = 15
PER_OP_MIN_D_MODEL = 512
PERSIST_MAX_D_MODEL = 256
STEP_CHOICES = ("auto", "fused", "persistent", "per_op")
_GRAPH_DECODING = [0]  # depth of graph_decoding() contexts


@contextlib.contextmanager
def graph_decoding():
    """Marks ``step`` calls made for a CUDA-graph capture and its warm-up (generate() does), so
    that ``SEQLAB_LM_STEP=auto`` picks the step that is fastest when replayed."""
    _GRAPH_DECODING[0] += 1
    try:
        yield
    finally:
        _GRAPH_DECODING[0] -= 1


def step_choice() -> str:
    """SEQLAB_LM_STEP: auto (default), fused, persistent or per_op."""
    v = os.environ.get("SEQLAB_LM_STEP", "").strip().lower() or "auto"
    if v not in STEP_CHOICES:
        raise ValueError(f"SEQLAB_LM_STEP={v!r}: expected one of {STEP_CHOICES}")
    return v


def step_path(model: nn.Module, ids_t: Tensor) -> str:
    """Which step ``MambaLM.step`` takes for this call: "persistent", "fused" or "per_op"
    (SEQLAB_LM_STEP, the model's structure, the device and the batch size decide;
    ``last_impl("lm_step")`` reports it as "persistent_triton", "fused_triton" or "per_op")."""
    choice = step_choice()
    if choice == "per_op":
        return "per_op"
    reason = fused_step_reason(model, ids_t.device)
    if reason is not None:
        if choice in ("fused", "persistent"):
            raise ValueError(f"SEQLAB_LM_STEP={choice} but the fused step does not apply: {reason}")
        return "per_op"
    from seqlab.kernels.lm_step_persistent import fits  # Triton resolves here: importable
    batch, cfg = ids_t.shape[0], model.config
    d_inner = model.backbone.layers[0].mixer.d_inner
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if choice == "persistent":
        if interp or not fits(batch, d_inner, ids_t.device):
            raise ValueError(f"SEQLAB_LM_STEP=persistent: {batch} rows x {d_inner} channels do "
                             "not fit the GPU at once (or Triton is interpreted)")
        return "persistent"
    if choice == "fused":
        return "fused"
    if batch > FUSED_MAX_BATCH:
        return "per_op"
    if (not interp and cfg.d_model <= PERSIST_MAX_D_MODEL and fits(batch, d_inner, ids_t.device)):
        return "persistent"
    if _GRAPH_DECODING[0] and cfg.d_model >= PER_OP_MIN_D_MODEL:
        return "per_op"
    return "fused"


_PERSISTENT: "weakref.WeakKeyDictionary[nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()


def persistent_step(model: nn.Module, cache: list, batch: int):
    """The :class:`~seqlab.kernels.lm_step_persistent.PersistentStep` of this model, cache and
    batch, built on first use (its address table points at the parameters and the cache, so a
    moved model or a new cache builds a new one; a few are kept per model)."""
    from seqlab.kernels.lm_step_persistent import PersistentStep
    key = (batch, tuple(t.data_ptr() for layer in cache for t in layer),
           tuple(p.data_ptr() for p in model.parameters()))
    per_model = _PERSISTENT.setdefault(model, OrderedDict())
    st = per_model.get(key)
    if st is None:
        st = per_model[key] = PersistentStep(model, cache, batch)
        while len(per_model) > 4:
            per_model.popitem(last=False)
    per_model.move_to_end(key)
    return st


@torch.no_grad()
def step_and_pick(model: nn.Module, ids_t: Tensor, cache: list, noise: Tensor | None,
                  inv_temp: float, out: Tensor, col: int, vocab: int) -> bool:
    """If ``MambaLM.step`` would take the persistent path here: run the step and the pick of the
    next id (argmax(logits * inv_temp + noise) over the first ``vocab`` ids, written to ids_t
    and out[:, col]) in one launch and return True; else do nothing and return False."""
    from .backbone import MambaLM
    if not isinstance(model, MambaLM) or step_path(model, ids_t) != "persistent":
        return False
    kernel_api.record_impl("lm_step", "persistent_triton", ids_t.device)
    persistent_step(model, cache, ids_t.shape[0])(ids_t, (noise, inv_temp, ids_t, out, col, vocab))
    return True


def _norm_args(norm: nn.Module):
    from .backbone import RMSNorm
    if isinstance(norm, RMSNorm):
        return norm.weight, None, norm.eps, True
    return norm.weight, norm.bias, norm.eps, False


@torch.no_grad()
def fused_lm_step(model: nn.Module, ids_t: Tensor, cache: list) -> Tensor:
    """ids_t (batch,) long -> logits (batch, padded vocab) float32; advances every cache entry.

    Same contract as the per-op ``MambaLM.step`` (the residual stream is kept in float32
    whatever ``residual_in_fp32`` says; everything else follows the parameters' dtype).
    """
    from seqlab.kernels.mixer_step_triton import StepPlan, head_step, mixer_in_step, mixer_out_step
    cfg = model.config
    bb = model.backbone
    batch = ids_t.shape[0]
    dev = ids_t.device
    m0 = bb.layers[0].mixer
    w_dtype = m0.in_proj.weight.dtype
    plan = StepPlan(batch, cfg.d_model, m0.d_inner, m0.dt_rank, m0.d_state, w_dtype)
    f32 = dict(dtype=torch.float32, device=dev)
    parts = [torch.empty(plan.n_parts, batch, cfg.d_model, **f32) for _ in range(2)]
    res = [torch.empty(batch, cfg.d_model, **f32) for _ in range(2)]
    x = torch.empty(batch, m0.d_inner, **f32)
    z = torch.empty(batch, m0.d_inner, **f32)
    XW = m0.dt_rank + 2 * m0.d_state
    xdbl = torch.empty(plan.n_xparts, batch, XW, **f32)
    if plan.last:  # one-row sums made by the last program of each kernel
        xdbl_final = torch.empty(1, batch, XW, **f32)
        hidden = [torch.empty(1, batch, cfg.d_model, **f32) for _ in range(2)]
        counters = torch.zeros(2, plan.nb, dtype=torch.int32, device=dev)
    src = (ids_t, bb.embedding.weight)
    res_in = None
    for i, (layer, (conv_state, ssm_state)) in enumerate(zip(bb.layers, cache)):
        mx = layer.mixer
        nw, nb, eps, is_rms = _norm_args(layer.norm)
        mixer_in_step(plan, src, res_in, res[i % 2], nw, nb, eps, is_rms,
                      mx.in_proj.weight, mx.in_proj.bias, conv_state, mx.conv1d.weight[:, 0, :],
                      mx.conv1d.bias, x, z, mx.x_proj.weight, xdbl,
                      xdbl_final[0] if plan.last else None, counters[0] if plan.last else None)
        mixer_out_step(plan, x, z, xdbl_final if plan.last else xdbl, mx.dt_proj.weight,
                       mx.dt_proj.bias, mx.A_log, mx.D, ssm_state, mx.out_proj.weight,
                       mx.out_proj.bias, parts[i % 2],
                       hidden[i % 2][0] if plan.last else None,
                       counters[1] if plan.last else None)
        src = hidden[i % 2] if plan.last else parts[i % 2]
        res_in = res[i % 2]
    nw, nb, eps, is_rms = _norm_args(bb.norm_f)
    logits = torch.empty(batch, model.lm_head.weight.shape[0], **f32)
    head_step(plan, src, res_in, nw, nb, eps, is_rms, model.lm_head.weight, logits)
    return logits
