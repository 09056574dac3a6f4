"""Backbone (embedding -> n_layer pre-norm blocks -> final norm) and the causal LM on top.

Parameter names follow mamba_ssm's MambaLMHeadModel so its checkpoints load by identity:
``backbone.embedding.weight``, ``backbone.layers.{i}.norm.weight``,
``backbone.layers.{i}.mixer.*`` (``mixer.mamba_fwd.*`` / ``mixer.mamba_rev.*`` when
bidirectional), ``backbone.norm_f.weight``, ``lm_head.weight``. With
``config.rc_equivariant`` the norms and mixers are wrapped (``norm.submodule.weight``,
``mixer.submodule.*``) and work on d_model / 2 channels per strand.

A cache for step-by-step decoding is a list with one (conv_state, ssm_state) per layer.
The blocks are :class:`~seqlab.model.block.Block`; which decoding step ``MambaLM.step`` takes is
:mod:`seqlab.model.decode`'s choice (``config.decode_step``).

With ``config.pool_factors`` the backbone is multi-scale (SaShiMi-style, see
:mod:`seqlab.model.multiscale`): ``backbone.down.{i}.layers.{j}``, ``backbone.pools.{i}.down`` /
``.up``, ``backbone.center.layers.{j}``, ``backbone.up.{i}.layers.{j}`` replace
``backbone.layers``, and the cache is a :class:`~seqlab.model.multiscale.MultiScaleCache`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from . import decode, multiscale
from .block import Block
from .config import MambaConfig
from .mixer import Mixer
from .norm import fused_add_norm, make_norm
from .rc import RCEmbedding, RCLMHead, RCWrapper

Tensor = torch.Tensor


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

    def step(self, ids_t: Tensor, cache: list, for_graph: bool = False) -> Tensor:
        """ids_t (batch,) -> logits (batch, padded_vocab_size) for the next token.

        Takes the step ``config.decode_step`` asks for ("auto": a fused Triton step where it
        applies and is faster, see :func:`seqlab.model.decode.step_path`): the whole step in
        one persistent launch or two kernels per layer (float32 logits), else the per-op path.
        ``for_graph``: the call is made for a CUDA-graph capture or its warm-up (generate()
        passes it), so "auto" picks the step that is fastest when replayed.
        ``seqlab.kernels.last_impl("lm_step")`` says which ran ("persistent_triton" /
        "fused_triton" / "per_op").
        """
        return decode.lm_step(self, ids_t, cache, for_graph)

    def step_and_pick(self, ids_t: Tensor, cache: list, noise: Tensor | None, inv_temp: float,
                      out: Tensor, col: int, vocab: int, for_graph: bool = False) -> bool:
        """The step and the pick of the next id in one launch where the persistent step runs
        (see :func:`seqlab.model.decode.step_and_pick`); False, having done nothing, elsewhere."""
        return decode.step_and_pick(self, ids_t, cache, noise, inv_temp, out, col, vocab,
                                    for_graph)

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
