"""Task heads on the backbone: sequence classification (masked pooling) and masked-LM.

Pooling respects ``lengths`` (right padding): padded positions never enter a mean/max,
"last" takes each sequence's own last real token.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from seqlab.utils import length_mask

from .backbone import Backbone, make_lm_head
from .config import MambaConfig
from .rc import conjoin_rc

Tensor = torch.Tensor
POOLINGS = ("mean", "max", "first", "last")


def pool(hidden: Tensor, lengths: Tensor | None = None, pooling: str = "mean") -> Tensor:
    """hidden (batch, L, d) -> (batch, d), ignoring positions t >= lengths[b]."""
    batch, L, _ = hidden.shape
    if pooling == "first":
        return hidden[:, 0]
    if lengths is None:
        lengths = torch.full((batch,), L, device=hidden.device, dtype=torch.long)
    lengths = lengths.to(hidden.device)
    if pooling == "last":
        return hidden[torch.arange(batch, device=hidden.device), lengths.long() - 1]
    mask = length_mask(lengths, L)[..., None]  # (batch, L, 1)
    if pooling == "mean":
        return (hidden * mask).sum(1) / lengths.clamp(min=1)[:, None].to(hidden.dtype)
    if pooling == "max":
        return hidden.masked_fill(~mask, torch.finfo(hidden.dtype).min).max(1).values
    raise ValueError(f"pool: pooling={pooling!r}; use one of {POOLINGS}")


class ClassifierHead(nn.Module):
    """hidden (batch, L, d_model), lengths (batch,) -> logits (batch, num_classes)."""

    def __init__(self, d_model: int, num_classes: int, pooling: str = "mean", dropout: float = 0.0,
                 device=None, dtype=None):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"ClassifierHead: pooling={pooling!r}; use one of {POOLINGS}")
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(d_model, num_classes, device=device, dtype=dtype)

    def forward(self, hidden: Tensor, lengths: Tensor | None = None) -> Tensor:
        return self.proj(self.dropout(pool(hidden, lengths, self.pooling)))


class SequenceClassifier(nn.Module):
    """ids (batch, L) -> class logits (batch, num_classes): backbone + masked pooling + linear.

    ``conjoin_rc=True`` averages over both DNA strands (test-time RC conjoining). With an
    RC-equivariant backbone the pooled vector is symmetrised over its channel flip, which
    makes mean/max pooled features RC-invariant by construction.
    """

    def __init__(self, config: MambaConfig, num_classes: int, pooling: str = "mean",
                 conjoin_rc: bool = False, dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.conjoin = conjoin_rc
        self.backbone = Backbone(config, device=device, dtype=dtype)
        self.head = ClassifierHead(config.d_model, num_classes, pooling, dropout, device, dtype)

    def _embed_one(self, ids: Tensor, lengths: Tensor | None = None) -> Tensor:
        pooled = pool(self.backbone(ids, lengths=lengths), lengths, self.head.pooling)
        if self.config.rc_equivariant:
            pooled = (pooled + pooled.flip(-1)) / 2
        return pooled

    def embed(self, ids: Tensor, lengths: Tensor | None = None) -> Tensor:
        """ids (batch, L) -> pooled features (batch, d_model)."""
        if self.conjoin:
            return conjoin_rc(self._embed_one, ids, lengths)
        return self._embed_one(ids, lengths)

    def forward(self, ids: Tensor, lengths: Tensor | None = None) -> Tensor:
        def logits(x, *lens):
            return self.head.proj(self.head.dropout(self._embed_one(x, *lens)))
        if self.conjoin:
            return conjoin_rc(logits, ids, lengths)
        return logits(ids, lengths)


class MaskedLM(nn.Module):
    """Bidirectional backbone + tied LM head: ids (batch, L) -> logits (batch, L, padded_vocab)."""

    def __init__(self, config: MambaConfig, device=None, dtype=None):
        super().__init__()
        if not config.bidirectional:
            raise ValueError("MaskedLM: needs config.bidirectional=True (a causal backbone cannot "
                             "see the context right of a masked token)")
        self.config = config
        self.backbone = Backbone(config, device=device, dtype=dtype)
        self.lm_head = make_lm_head(config, self.backbone, device=device, dtype=dtype)

    def forward(self, ids: Tensor, lengths: Tensor | None = None,
                cu_seqlens: Tensor | None = None) -> Tensor:
        return self.lm_head(self.backbone(ids, lengths=lengths, cu_seqlens=cu_seqlens))


def mask_tokens(ids: Tensor, lengths: Tensor | None = None, mask_id: int = 257, vocab: int = 256,
                prob: float = 0.15, generator: torch.Generator | None = None):
    """BERT-style corruption: (inputs, labels), both (batch, L) long.

    Each real byte token (id < vocab, position < lengths) is selected with probability
    ``prob``; a selected token becomes ``mask_id`` with p 0.8, a uniform random byte with
    p 0.1, or stays itself with p 0.1. Labels hold the original id at selected positions and
    -100 (ignored by cross_entropy) elsewhere; padding and special ids are never selected.
    """
    dev = ids.device
    eligible = ids < vocab
    if lengths is not None:
        eligible &= length_mask(lengths.to(dev), ids.shape[1])
    r = torch.rand(ids.shape, generator=generator, device=dev)
    selected = (r < prob) & eligible
    labels = torch.where(selected, ids, torch.full_like(ids, -100))
    action = torch.rand(ids.shape, generator=generator, device=dev)
    random_ids = torch.randint(0, vocab, ids.shape, generator=generator, device=dev, dtype=ids.dtype)
    inputs = torch.where(selected & (action < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(selected & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    return inputs, labels
