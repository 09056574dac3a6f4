"""Reverse-complement (RC) equivariance for DNA models (the Caduceus-PS idea).

Notation: for ids x (batch, L), RC(x) complements every id and reverses positions (within
each sequence's own bounds when ``lengths`` / ``cu_seqlens`` describe padding or packing).
For hidden states h (batch, L, D), R(h) reverses positions the same way AND reverses the
channel axis. A map f is RC-equivariant when f(RC(x)) = R(f(x)).

Parameter sharing makes this hold by construction: hidden channels are split into halves
(a, b); the first half is processed as is, the second half is mapped to the "other strand"
by R, processed by the SAME module, and mapped back. Hence the wrappers below:

    RCEmbedding   ids -> [E(x), flip_ch(E(comp x))]                    (D/2 rows of weights)
    RCWrapper     h -> [M(a), R(M(R(b)))]  for any sequence module M of width D/2
    RCLMHead      h -> a·W_v + flip_ch(b)·W_comp(v)                    (logits permute by comp)

and :func:`conjoin_rc` averages any model over both strands (post-hoc conjoining).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor

# IUPAC complement pairs (each an involution, which RC-equivariance needs): S, W, N and every
# other byte or special id map to themselves. U is left alone (U -> A would not be invertible).
_PAIRS = ("AT", "CG", "RY", "KM", "BV", "DH")


def complement_table(vocab_size: int = 260) -> Tensor:
    """(vocab_size,) LongTensor: the complement of each id (case-preserving, IUPAC-aware).

    A pair whose byte ids do not both fit below vocab_size is left out (identity), so a
    small non-byte vocabulary (e.g. a converted Caduceus-PS model, which then gets its own
    table) can still be built.
    """
    table = torch.arange(vocab_size, dtype=torch.long)
    for a, b in _PAIRS:
        for x, y in ((a, b), (a.lower(), b.lower())):
            if max(ord(x), ord(y)) < vocab_size:
                table[ord(x)], table[ord(y)] = ord(y), ord(x)
    return table


def reverse_index(length: int, lengths: Tensor | None = None, cu_seqlens: Tensor | None = None,
                  batch: int = 1, device=None) -> Tensor:
    """Gather index (batch, L) that reverses each sequence within its own bounds.

    Padding positions (t >= lengths[b]) map to themselves; packed sequences reverse inside
    their [cu_seqlens[i], cu_seqlens[i+1]) span.
    """
    t = torch.arange(length, device=device)
    if cu_seqlens is not None:
        cs = cu_seqlens.to(device=device, dtype=torch.long)
        seg = torch.repeat_interleave(torch.arange(cs.numel() - 1, device=device), cs[1:] - cs[:-1],
                                      output_size=length)
        return (cs[:-1][seg] + cs[1:][seg] - 1 - t)[None].expand(batch, length)
    if lengths is None:
        return (length - 1 - t)[None].expand(batch, length)
    lengths = lengths.to(device=device, dtype=torch.long)[:, None]
    return torch.where(t[None] < lengths, lengths - 1 - t[None], t[None])


def reverse_positions(h: Tensor, lengths: Tensor | None = None,
                      cu_seqlens: Tensor | None = None) -> Tensor:
    """Reverse axis 1 of h (batch, L, ...) within each sequence's bounds."""
    batch, L = h.shape[:2]
    if lengths is None and cu_seqlens is None:
        return h.flip(1)
    idx = reverse_index(L, lengths, cu_seqlens, batch, h.device)
    idx = idx.reshape(batch, L, *([1] * (h.dim() - 2))).expand_as(h)
    return torch.gather(h, 1, idx)


def reverse_complement(ids: Tensor, lengths: Tensor | None = None,
                       cu_seqlens: Tensor | None = None, table: Tensor | None = None) -> Tensor:
    """RC of ids (batch, L) long; padding stays at the end, specials are unchanged."""
    table = complement_table() if table is None else table
    return reverse_positions(table.to(ids.device)[ids], lengths, cu_seqlens)


def rc_hidden(h: Tensor, lengths: Tensor | None = None, cu_seqlens: Tensor | None = None) -> Tensor:
    """R(h) for h (batch, L, D): reverse positions (within bounds) and channels."""
    return reverse_positions(h, lengths, cu_seqlens).flip(-1)


class RCEmbedding(nn.Module):
    """ids (batch, L) -> (batch, L, d_model) with RC(ids) -> R(output).

    ``weight`` is (num_embeddings, d_model / 2): the second half of the output embeds the
    complement, channel-reversed.
    """

    def __init__(self, num_embeddings: int, d_model: int, device=None, dtype=None):
        super().__init__()
        if d_model % 2:
            raise ValueError(f"RCEmbedding: d_model must be even, got {d_model}")
        self.weight = nn.Parameter(torch.empty(num_embeddings, d_model // 2, device=device, dtype=dtype))
        nn.init.normal_(self.weight)
        self.register_buffer("complement", complement_table(num_embeddings).to(device),
                             persistent=False)

    def forward(self, ids: Tensor) -> Tensor:
        fwd = F.embedding(ids, self.weight)
        rc = F.embedding(self.complement[ids], self.weight).flip(-1)
        return torch.cat([fwd, rc], dim=-1)


class RCWrapper(nn.Module):
    """h (batch, L, D) -> [M(a), R(M(R(b)))] where (a, b) are the channel halves of h.

    M = ``submodule`` works on D/2 channels and is called with the keyword arguments given
    to forward (e.g. lengths, cu_seqlens); it needs no symmetry of its own. Used around the
    mixers and the norms of an RC-equivariant backbone.
    """

    def __init__(self, submodule: nn.Module):
        super().__init__()
        self.submodule = submodule

    def forward(self, h: Tensor, lengths: Tensor | None = None, cu_seqlens: Tensor | None = None,
                **kwargs) -> Tensor:
        if kwargs.get("cache") is not None:
            raise ValueError("RCWrapper: the reverse-complement strand reads the sequence backwards, "
                             "so an RC-equivariant model cannot decode step by step")
        kwargs.pop("cache", None)
        if lengths is not None:
            kwargs["lengths"] = lengths
        if cu_seqlens is not None:
            kwargs["cu_seqlens"] = cu_seqlens
        a, b = h.chunk(2, dim=-1)
        out_a = self.submodule(a, **kwargs)
        out_b = self.submodule(rc_hidden(b, lengths, cu_seqlens), **kwargs)
        return torch.cat([out_a, rc_hidden(out_b, lengths, cu_seqlens)], dim=-1)


class RCLMHead(nn.Module):
    """h (batch, L, D) -> logits (batch, L, V) with R(h) -> logits reversed in position and
    permuted by the complement over the vocabulary. ``weight`` (V, D/2), tieable to RCEmbedding."""

    def __init__(self, d_model: int, vocab: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, d_model // 2, device=device, dtype=dtype))
        nn.init.normal_(self.weight, std=0.02)
        self.register_buffer("complement", complement_table(vocab).to(device),
                             persistent=False)

    def forward(self, h: Tensor) -> Tensor:
        a, b = h.chunk(2, dim=-1)
        return F.linear(a, self.weight) + F.linear(b.flip(-1), self.weight[self.complement])


def conjoin_rc(fn: Callable, ids: Tensor, lengths: Tensor | None = None,
               per_position: bool = False, complement_vocab: bool = False) -> Tensor:
    """Average fn over both strands: (fn(x) + T(fn(RC(x)))) / 2, for any DNA model ``fn``.

    Args:
        fn: called as fn(ids) or fn(ids, lengths); returns (batch, ...).
        ids: (batch, L) long; lengths: (batch,) for right-padded batches.
        per_position: fn returns (batch, L, ...): T reverses positions within bounds so
            position t of the RC output lines up with position t of x.
        complement_vocab: the last axis of fn's output indexes the vocabulary (per-position
            LM logits): T also permutes it by the complement table.
    """
    call = (lambda x: fn(x)) if lengths is None else (lambda x: fn(x, lengths))
    out = call(ids)
    out_rc = call(reverse_complement(ids, lengths))
    if per_position:
        out_rc = reverse_positions(out_rc, lengths)
    if complement_vocab:
        out_rc = out_rc[..., complement_table(out_rc.shape[-1]).to(out_rc.device)]
    return (out + out_rc) / 2
