"""Multi-scale (SaShiMi-style, Goel et al. 2022) causal backbone built from Mamba blocks.

Selected by ``MambaConfig.pool_factors = [p1, ..., pk]`` (``pool_expand`` = E, default 2).
Level 0 works at d_model and the full rate; level i at d_model * E**i channels and rate
1 / (p1 * ... * pi). With n = ``n_layer`` Mamba blocks per stage, a U-Net in time:

    level 0..k-1 down stage (n blocks) -> skip s_i -> down-pool by p_{i+1}
    level k      center stage (n blocks)
    level k-1..0 up-pool -> + s_i -> up stage (n blocks)

followed by the final norm and the (tied) LM head of the flat model.

Exact causality (output t depends on inputs <= t) with no lag wasted:

* down-pool by p: shift the fine sequence right by p - 1 (zeros in front), reshape
  (B, L, D) -> (B, L/p, p*D), Linear -> D*E. Coarse step j thus sees fine inputs
  j*p - p + 1 .. j*p, i.e. nothing after j*p.
* up-pool: Linear D*E -> p*D, reshape (B, L/p, p*D) -> (B, L, D), *no* further shift:
  coarse output j lands on fine positions j*p .. j*p + p - 1, all >= j*p. (SaShiMi pools
  unshifted groups and delays the up-pooled output by one coarse step instead; that is the
  same construction lagged by p - 1 extra fine steps.)

Any L works: the forward right-pads the embedded sequence with zeros to a multiple of
prod(pool_factors) and crops the output (padding sits after every real position, so by
causality it changes nothing). ``lengths`` (right padding) is accepted and ignored for the
same reason; packing (``cu_seqlens``) is refused.

Decoding (O(1) work per token) keeps a :class:`MultiScaleCache`: per block the Mixer's
(conv_state, ssm_state), per level i < k a ``window`` (B, p, D_i) with the last p down-stage
outputs awaiting pooling (zeros at the start = the shift's zeros) and ``pending`` (B, p, D_i),
the up-pooled outputs for the current group of p fine steps, plus a position counter. Level
i+1 steps once every p fine steps of level i (when the level-i time t has t % p == 0: its
window then holds exactly inputs t-p+1 .. t). The cache is a list of tuples of tensors, so
zeroing every tensor (what ``seqlab.generation`` does on reset) restarts it. A prefill with a
cache (``forward(ids, cache=cache)``) runs :meth:`step` over the prompt, token by token, so it
leaves the cache exactly as stepping would (prompts are short; the step is O(1) per token).
Which levels step depends only on the position modulo prod(pool_factors). The step reads the
position from ``pos`` with ``.item()`` unless the caller sets ``cache.t_hint`` (the position,
or that remainder) for the next step: generate() does, and captures one CUDA graph per
starting remainder (see :mod:`seqlab.generation`); a capture without the hint is refused.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .block import Block
from .config import MambaConfig

Tensor = torch.Tensor


def level_widths(config: MambaConfig) -> list[int]:
    """d_model * pool_expand**i for levels 0..k."""
    return [config.d_model * config.pool_expand ** i for i in range(len(config.pool_factors) + 1)]


class Stage(nn.Module):
    """n pre-norm residual Blocks at one width: stream (B, L, D) -> stream (un-normed)."""

    def __init__(self, config: MambaConfig, n: int, first_idx: int, device=None, dtype=None):
        super().__init__()
        self.layers = nn.ModuleList(Block(config, first_idx + j, device, dtype) for j in range(n))

    def forward(self, x: Tensor) -> Tensor:
        hidden, residual = x, None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        return hidden if residual is None else residual + hidden

    def step(self, x: Tensor, caches: list) -> Tensor:
        hidden, residual = x, None
        for layer, c in zip(self.layers, caches):
            hidden, residual = layer.step(hidden, residual, c)
        return hidden if residual is None else residual + hidden


class Pool(nn.Module):
    """Causal down-pool (fine D -> coarse D*E, by p) and up-pool (coarse -> fine) of one level."""

    def __init__(self, d: int, p: int, d_coarse: int, device=None, dtype=None):
        super().__init__()
        self.p, self.d = p, d
        self.down = nn.Linear(p * d, d_coarse, device=device, dtype=dtype)
        self.up = nn.Linear(d_coarse, p * d, device=device, dtype=dtype)

    def pool(self, x: Tensor) -> Tensor:
        """(B, L, D), L % p == 0 -> (B, L/p, D*E); coarse j sees x[j*p - p + 1 .. j*p]."""
        B, L, D = x.shape
        p = self.p
        x = F.pad(x, (0, 0, p - 1, 0))[:, :L]  # shift right by p - 1
        return self.down(x.reshape(B, L // p, p * D).to(self.down.weight.dtype))

    def unpool(self, y: Tensor) -> Tensor:
        """(B, L/p, D*E) -> (B, L, D): coarse j -> fine j*p .. j*p + p - 1 (no shift needed)."""
        B, Lc, _ = y.shape
        return self.up(y.to(self.up.weight.dtype)).reshape(B, Lc * self.p, self.d)

    def pool_step(self, window: Tensor) -> Tensor:
        """window (B, p, D), oldest first -> (B, D*E)."""
        return self.down(window.reshape(window.shape[0], -1).to(self.down.weight.dtype))

    def unpool_step(self, y: Tensor) -> Tensor:
        """(B, D*E) -> (B, p, D): the next p fine steps' up-pooled inputs."""
        return self.up(y.to(self.up.weight.dtype)).reshape(y.shape[0], self.p, self.d)


class MultiScaleCache(list):
    """Decoding state of a multi-scale backbone.

    As a list: every entry is a tuple of tensors (block caches (conv_state, ssm_state),
    then (window_i, pending_i) per level, then (pos,)), so generic code can clone or zero it.
    Structured access: ``down[i][j]``, ``center[j]``, ``up[i][j]`` (block caches),
    ``window[i]``, ``pending[i]`` and ``pos`` (a (1,) long tensor: fine steps taken).
    ``t_hint``: None, or the next step's position (or that position modulo prod(pool_factors))
    set by a caller that tracks it on the host; :func:`step` uses and clears it.
    """

    def __init__(self, down, center, up, window, pending, pos):
        entries = [c for stage in down for c in stage] + list(center) + \
                  [c for stage in up for c in stage] + list(zip(window, pending)) + [(pos,)]
        super().__init__(entries)
        self.down, self.center, self.up = down, center, up
        self.window, self.pending, self.pos = window, pending, pos
        self.t_hint: int | None = None


def build(bb: nn.Module, config: MambaConfig, device=None, dtype=None) -> int:
    """Add down / pools / center / up to the backbone ``bb``; returns the number of blocks."""
    if config.bidirectional or config.rc_equivariant:
        raise ValueError("MambaConfig.pool_factors: the multi-scale backbone is causal only; "
                         "bidirectional / rc_equivariant are not supported with pooling")
    pf = [int(p) for p in config.pool_factors]
    widths = level_widths(config)
    cfgs = [dataclasses.replace(config, d_model=w, pool_factors=[]) for w in widths]
    n, k = config.n_layer, len(pf)
    bb.down = nn.ModuleList(Stage(cfgs[i], n, i * n, device, dtype) for i in range(k))
    bb.pools = nn.ModuleList(Pool(widths[i], pf[i], widths[i + 1], device, dtype) for i in range(k))
    bb.center = Stage(cfgs[k], n, k * n, device, dtype)
    bb.up = nn.ModuleList(Stage(cfgs[i], n, (2 * k - i) * n, device, dtype) for i in range(k))
    return n * (2 * k + 1)


def _level(bb, i: int, x: Tensor) -> Tensor:
    if i == len(bb.pools):
        return bb.center(x)
    s = bb.down[i](x)
    y = _level(bb, i + 1, bb.pools[i].pool(s))
    return bb.up[i](bb.pools[i].unpool(y) + s)


def forward(bb, ids: Tensor, lengths=None, cu_seqlens=None, cache=None) -> Tensor:
    """ids (B, L) -> hidden (B, L, d_model) after the final norm."""
    if cu_seqlens is not None:
        raise ValueError("multi-scale backbone (pool_factors): packed sequences (cu_seqlens) "
                         "are not supported; pooling would mix segments")
    if cache is not None:
        # Prefill = stepping over the prompt: leaves the cache exactly as decoding would.
        return torch.stack([step(bb, ids[:, t], cache) for t in range(ids.shape[1])], dim=1)
    x = bb.embedding(ids)
    L = x.shape[1]
    P = math.prod(int(p) for p in bb.config.pool_factors)
    Lp = -(-L // P) * P
    if Lp != L:
        x = F.pad(x, (0, 0, 0, Lp - L))  # right zeros: after every real position (causal)
    y = _level(bb, 0, x)[:, :L]
    return bb.norm_f(y.to(bb._out_dtype()))


def allocate_cache(bb, batch: int, dtype: torch.dtype | None = None, device=None) -> MultiScaleCache:
    device = device or bb.embedding.weight.device
    wdtype = bb.embedding.weight.dtype
    dtype = dtype or wdtype
    stream_dtype = torch.float32 if bb.config.residual_in_fp32 else dtype

    def stage(s):
        return [layer.mixer.allocate_cache(batch, dtype, device) for layer in s.layers]

    widths = level_widths(bb.config)
    window = [torch.zeros(batch, p.p, widths[i], device=device, dtype=stream_dtype)
              for i, p in enumerate(bb.pools)]
    pending = [torch.zeros(batch, p.p, widths[i], device=device, dtype=p.up.weight.dtype)
               for i, p in enumerate(bb.pools)]
    pos = torch.zeros(1, dtype=torch.long, device=device)
    return MultiScaleCache([stage(s) for s in bb.down], stage(bb.center),
                           [stage(s) for s in bb.up], window, pending, pos)


def _step_level(bb, cache: MultiScaleCache, i: int, x: Tensor, t: int) -> Tensor:
    if i == len(bb.pools):
        return bb.center.step(x, cache.center)
    pool = bb.pools[i]
    s = bb.down[i].step(x, cache.down[i])
    w = cache.window[i]
    w.copy_(torch.roll(w, shifts=-1, dims=1))
    w[:, -1] = s.to(w.dtype)
    r = t % pool.p
    if r == 0:  # a new coarse step: the window holds inputs t-p+1 .. t
        y = _step_level(bb, cache, i + 1, pool.pool_step(w), t // pool.p)
        cache.pending[i].copy_(pool.unpool_step(y))
    return bb.up[i].step(cache.pending[i][:, r] + s, cache.up[i])


def step(bb, ids_t: Tensor, cache: MultiScaleCache) -> Tensor:
    """ids_t (B,) -> hidden (B, d_model); advances the cache by one fine step."""
    if not isinstance(cache, MultiScaleCache):
        raise ValueError("multi-scale backbone: the cache must come from allocate_cache()")
    t, cache.t_hint = cache.t_hint, None
    if t is None:
        if ids_t.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("multi-scale backbone (pool_factors): the step branches on the "
                               "position; to capture it in a CUDA graph set cache.t_hint to the "
                               "step's position before each step (generate() does)")
        t = int(cache.pos.item())
    y = _step_level(bb, cache, 0, bb.embedding(ids_t), t)
    cache.pos.add_(1)
    return bb.norm_f(y.to(bb._out_dtype()))
