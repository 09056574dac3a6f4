"""Backbone (embedding -> n_layer pre-norm blocks -> final norm) and the causal LM on top.

Parameter names follow mamba_ssm's MambaLMHeadModel so its checkpoints load by identity:
``backbone.embedding.weight``, ``backbone.layers.{i}.norm.weight``,
``backbone.layers.{i}.mixer.*`` (``mixer.mamba_fwd.*`` / ``mixer.mamba_rev.*`` when
bidirectional), ``backbone.norm_f.weight``, ``lm_head.weight``. With
``config.rc_equivariant`` the norms and mixers are wrapped (``norm.submodule.weight``,
``mixer.submodule.*``) and work on d_model / 2 channels per strand.

A cache for step-by-step decoding is a list with one (conv_state, ssm_state) per layer.

With ``config.pool_factors`` the backbone is multi-scale (SaShiMi-style, see
:mod:`seqlab.model.multiscale`): ``backbone.down.{i}.layers.{j}``, ``backbone.pools.{i}.down`` /
``.up``, ``backbone.center.layers.{j}``, ``backbone.up.{i}.layers.{j}`` replace
``backbone.layers``, and the cache is a :class:`~seqlab.model.multiscale.MultiScaleCache`.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

from .bidirectional import BiMixer
from .config import MambaConfig
from .mixer import Mixer
from .rc import RCEmbedding, RCLMHead, RCWrapper

Tensor = torch.Tensor


class _RMSNormFn(torch.autograd.Function):
    """RMSNorm that saves only its input and the (..., 1) reciprocal RMS for the backward.

    Composed of plain ops, autograd would keep two float32 copies of the activations per norm
    (the input cast and the normalised product); at the 130m size that is 50 MB per layer.
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        ct = torch.promote_types(x.dtype, torch.float32)  # at least float32
        xf = x.to(ct)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (xf * rstd * weight.to(ct)).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        x, weight, rstd = ctx.saved_tensors
        ct = rstd.dtype
        xhat = x.to(ct) * rstd
        gf = g.to(ct)
        gw = gf * weight.to(ct)
        dx = rstd * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))
        dw = (gf * xhat).reshape(-1, xhat.shape[-1]).sum(0)
        return dx.to(x.dtype), dw.to(weight.dtype), None


class RMSNorm(nn.Module):
    """x (..., d) -> x / rms(x) * weight, computed in float32 and returned in x's dtype."""

    def __init__(self, d: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return _RMSNormFn.apply(x, self.weight, self.eps)


def fused_add_norm(norm: nn.Module, config: MambaConfig, hidden: Tensor, residual: Tensor | None,
                   out_dtype: torch.dtype, residual_dtype: torch.dtype):
    """(normed, residual_out) through the Triton add + RMSNorm kernel, or None where it does
    not apply (LayerNorm, RC-wrapped norms, float64, a non-Triton scan_impl, d > 8192)."""
    from seqlab.kernels import api as kernel_api
    if not (config.fused_add_norm and isinstance(norm, RMSNorm)
            and hidden.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and (residual is None or residual.dtype in (torch.float32, torch.float16, torch.bfloat16))
            and residual_dtype != torch.float64 and hidden.shape[-1] <= 8192
            and kernel_api.resolve_impl(config.scan_impl, hidden.device, op="add_rms_norm") == "triton"):
        return None
    from seqlab.kernels.norm_triton import add_rms_norm
    return add_rms_norm(hidden, residual, norm.weight, norm.eps, out_dtype=out_dtype,
                        residual_dtype=residual_dtype)


def _block_dtypes(hidden: Tensor, residual: Tensor | None, fp32_residual: bool,
                  norm_dtype: torch.dtype):
    """(normed dtype, residual dtype) of the unfused path: the residual in float32 by option
    (else the promoted dtype of the sum); the normed activations in the autocast dtype when
    autocast is on (what the next matmul would cast them to), else the norm's dtype. (The
    unfused path rounds the residual to the norm's dtype before normalising; the kernel
    normalises the residual as stored.)"""
    res = hidden.dtype if residual is None else torch.promote_types(hidden.dtype, residual.dtype)
    if fp32_residual:
        res = torch.float32
    dev = hidden.device.type
    out = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else norm_dtype
    return out, res


def make_norm(config: MambaConfig, d: int, device=None, dtype=None) -> nn.Module:
    if config.norm == "rms":
        return RMSNorm(d, config.norm_eps, device=device, dtype=dtype)
    return nn.LayerNorm(d, eps=config.norm_eps, device=device, dtype=dtype)


class Block(nn.Module):
    """Pre-norm residual block: residual = residual + hidden; hidden = mixer(norm(residual)).

    Carrying (hidden, residual) separately, as mamba_ssm does, lets the residual stream stay
    in float32 (``config.residual_in_fp32``) while the mixer runs in a lower precision.
    """

    def __init__(self, config: MambaConfig, layer_idx: int, device=None, dtype=None):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.config = config
        mixer_cls = BiMixer if config.bidirectional else Mixer
        if config.rc_equivariant:
            half = dataclasses.replace(config, d_model=config.d_model // 2)
            self.norm = RCWrapper(make_norm(config, half.d_model, device, dtype))
            self.mixer = RCWrapper(mixer_cls(half, layer_idx, device=device, dtype=dtype))
        else:
            self.norm = make_norm(config, config.d_model, device, dtype)
            self.mixer = mixer_cls(config, layer_idx, device=device, dtype=dtype)

    def forward(self, hidden: Tensor, residual: Tensor | None = None, cache=None,
                lengths: Tensor | None = None, cu_seqlens: Tensor | None = None):
        """hidden, residual (batch, L, d_model) -> (mixer output, new residual)."""
        hidden, residual = self._add_norm(hidden, residual)
        kw = {}
        if lengths is not None:
            kw["lengths"] = lengths
        if cu_seqlens is not None:
            kw["cu_seqlens"] = cu_seqlens
        if cache is not None:
            kw["cache"] = cache
        return self.mixer(hidden, **kw), residual

    def _norm_dtype(self) -> torch.dtype:
        return next(self.norm.parameters()).dtype

    def _add_norm(self, hidden: Tensor, residual: Tensor | None):
        """(normed, new residual): one Triton kernel where it applies, else the add, the cast
        and the norm module."""
        fused = fused_add_norm(self.norm, self.config, hidden, residual,
                               *_block_dtypes(hidden, residual, self.residual_in_fp32,
                                              self._norm_dtype()))
        if fused is not None:
            return fused
        residual = hidden if residual is None else residual + hidden
        hidden = self.norm(residual.to(self._norm_dtype()))
        if self.residual_in_fp32:
            residual = residual.float()
        return hidden, residual

    def step(self, hidden: Tensor, residual: Tensor | None, cache):
        """One token: hidden, residual (batch, d_model) -> (mixer output, new residual)."""
        if not isinstance(self.mixer, Mixer):
            raise ValueError("Block.step: only causal, non-RC models decode step by step "
                             "(config.bidirectional and config.rc_equivariant must be False)")
        hidden, residual = self._add_norm(hidden, residual)
        return self.mixer.step(hidden, cache), residual


class Backbone(nn.Module):
    """ids (batch, L) long -> hidden (batch, L, d_model) after the final norm."""

    def __init__(self, config: MambaConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.multiscale = bool(config.pool_factors)
        if self.multiscale and (config.bidirectional or config.rc_equivariant):
            raise ValueError("MambaConfig.pool_factors: the multi-scale backbone is causal only; "
                             "bidirectional / rc_equivariant are not supported with pooling")
        if config.rc_equivariant:
            self.embedding = RCEmbedding(config.padded_vocab_size, config.d_model, device, dtype)
        else:
            self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model, device=device, dtype=dtype)
        if self.multiscale:
            from . import multiscale
            n_blocks = multiscale.build(self, config, device, dtype)
        else:
            self.layers = nn.ModuleList(Block(config, i, device, dtype) for i in range(config.n_layer))
            n_blocks = config.n_layer
        if config.rc_equivariant:
            self.norm_f = RCWrapper(make_norm(config, config.d_model // 2, device, dtype))
        else:
            self.norm_f = make_norm(config, config.d_model, device, dtype)
        init_weights(self, max(n_blocks, 1))

    def forward(self, ids: Tensor, lengths: Tensor | None = None, cu_seqlens: Tensor | None = None,
                cache: list | None = None) -> Tensor:
        """ids (batch, L); lengths (batch,) for right padding; cu_seqlens (nseq+1,) for packing
        (batch 1); cache from :meth:`allocate_cache` for a causal prefill (multi-scale: any L;
        ``lengths`` is not needed there, the prefill steps token by token)."""
        if self.multiscale:
            from . import multiscale
            return multiscale.forward(self, ids, lengths=lengths, cu_seqlens=cu_seqlens, cache=cache)
        hidden = self.embedding(ids)
        residual = None
        for i, layer in enumerate(self.layers):
            hidden, residual = layer(hidden, residual, cache=None if cache is None else cache[i],
                                     lengths=lengths, cu_seqlens=cu_seqlens)
        return self._final_norm(hidden, residual)

    def _final_norm(self, hidden: Tensor, residual: Tensor | None) -> Tensor:
        if residual is not None:
            fused = fused_add_norm(self.norm_f, self.config, hidden, residual, self._out_dtype(),
                                   torch.promote_types(hidden.dtype, residual.dtype))
            if fused is not None:
                return fused[0]
        residual = residual + hidden if residual is not None else hidden
        return self.norm_f(residual.to(self._out_dtype()))

    def _out_dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    def allocate_cache(self, batch: int, dtype: torch.dtype | None = None, device=None) -> list:
        """One (conv_state, ssm_state) per layer (see :meth:`Mixer.allocate_cache`); a
        :class:`~seqlab.model.multiscale.MultiScaleCache` for a multi-scale backbone."""
        if self.multiscale:
            from . import multiscale
            return multiscale.allocate_cache(self, batch, dtype, device)
        caches = []
        for layer in self.layers:
            if not isinstance(layer.mixer, Mixer):
                raise ValueError("Backbone.allocate_cache: only causal, non-RC models keep a "
                                 "decoding cache (config.bidirectional / rc_equivariant are set)")
            caches.append(layer.mixer.allocate_cache(batch, dtype, device))
        return caches

    def step(self, ids_t: Tensor, cache: list) -> Tensor:
        """ids_t (batch,) long -> hidden (batch, d_model); advances every layer's cache."""
        if self.multiscale:
            from . import multiscale
            return multiscale.step(self, ids_t, cache)
        hidden = self.embedding(ids_t)
        residual = None
        for layer, c in zip(self.layers, cache):
            hidden, residual = layer.step(hidden, residual, c)
        return self._final_norm(hidden, residual)


def make_lm_head(config: MambaConfig, backbone: "Backbone", device=None, dtype=None) -> nn.Module:
    """d_model -> padded vocab logits; RC-equivariant when the backbone is, and tied to the
    embedding when config.tie_embeddings."""
    V = config.padded_vocab_size
    if config.rc_equivariant:
        head = RCLMHead(config.d_model, V, device=device, dtype=dtype)
    else:
        head = nn.Linear(config.d_model, V, bias=False, device=device, dtype=dtype)
    if config.tie_embeddings:
        head.weight = backbone.embedding.weight
    return head


class MambaLM(nn.Module):
    """Causal byte LM: ids (batch, L) -> logits (batch, L, padded_vocab_size).

    ``lm_head.weight`` is the embedding matrix when ``config.tie_embeddings``.
    """

    def __init__(self, config: MambaConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config, device=device, dtype=dtype)
        self.lm_head = make_lm_head(config, self.backbone, device=device, dtype=dtype)

    def forward(self, ids: Tensor, lengths: Tensor | None = None, cu_seqlens: Tensor | None = None,
                cache: list | None = None) -> Tensor:
        return self.lm_head(self.backbone(ids, lengths=lengths, cu_seqlens=cu_seqlens, cache=cache))

    def allocate_cache(self, batch: int, dtype: torch.dtype | None = None, device=None) -> list:
        return self.backbone.allocate_cache(batch, dtype, device)

    def step(self, ids_t: Tensor, cache: list) -> Tensor:
        """ids_t (batch,) -> logits (batch, padded_vocab_size) for the next token.

        Uses a fused Triton step where it applies (see
        :func:`seqlab.model.decode.fused_step_reason` and :func:`~seqlab.model.decode.step_path`):
        the whole step in one persistent launch or two kernels per layer (float32 logits);
        else the per-op path. ``seqlab.kernels.last_impl("lm_step")`` says which ran
        ("persistent_triton" / "fused_triton" / "per_op").
        """
        from seqlab.kernels import api as kernel_api

        from .decode import fused_lm_step, persistent_step, step_path
        path = step_path(self, ids_t)
        if path == "persistent":
            kernel_api.record_impl("lm_step", "persistent_triton", ids_t.device)
            with torch.no_grad():
                # A copy: the step's logits buffer is reused by the next call.
                return persistent_step(self, cache, ids_t.shape[0])(ids_t).clone()
        if path == "fused":
            kernel_api.record_impl("lm_step", "fused_triton", ids_t.device)
            return fused_lm_step(self, ids_t, cache)
        kernel_api.record_impl("lm_step", "per_op", ids_t.device)
        return self.step_per_op(ids_t, cache)

    def step_per_op(self, ids_t: Tensor, cache: list) -> Tensor:
        """The reference step: one module call per operation (any configuration, any device)."""
        return self.lm_head(self.backbone.step(ids_t, cache))


def init_weights(module: nn.Module, n_layer: int, initializer_range: float = 0.02) -> None:
    """mamba_ssm's initialisation: Linear biases zero (except flagged ``_no_reinit``),
    embeddings N(0, 0.02), and each out_proj (the layer's write into the residual stream)
    rescaled by 1/sqrt(n_layer) so the residual variance does not grow with depth (GPT-2)."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            if m.bias is not None and not getattr(m.bias, "_no_reinit", False):
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.Embedding, RCEmbedding)):
            nn.init.normal_(m.weight, std=initializer_range)
    seen = set()
    for name, p in module.named_parameters(remove_duplicate=False):
        if name.endswith("out_proj.weight") and id(p) not in seen:
            seen.add(id(p))  # tied BiMixer projections: rescale once
            with torch.no_grad():
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                p /= math.sqrt(n_layer)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices, and undecayed biases, norm weights, 1-D parameters
    and anything flagged ``_no_weight_decay`` (A_log, D, LTI B/C). Shared (tied) parameters
    appear once."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # removes duplicates of tied parameters
        if not p.requires_grad:
            continue
        if p.dim() < 2 or name.endswith("bias") or getattr(p, "_no_weight_decay", False):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
