"""Batches of byte-id sequences: right padding with lengths, or packing with cu_seqlens.

A sample is any of: a 1-D id sequence (LongTensor / ndarray / list), a tuple
(ids, label) or (ids, label, meta), or a dict with "ids" and optional "label", "meta".
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from seqlab.data.alphabet import PAD_ID
from seqlab.utils import length_mask


@dataclass
class Batch:
    """ids: LongTensor (B, L) right-padded with pad ids (B = 1 when packed);
    lengths: LongTensor (B,) valid lengths (packed: the total length);
    labels: Tensor (B,) or (n_seqs,) when packed, or None;
    cu_seqlens: IntTensor (n_seqs + 1,) int32 cumulative sequence starts in the packed row
        (FlashAttention's convention: [0, l0, l0+l1, ...]), or None when padded;
    meta: per-sequence metadata list, or None."""

    ids: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    meta: list | None = None

    def to(self, device, non_blocking: bool = False) -> "Batch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[k] = v.to(device, non_blocking=non_blocking)
        return Batch(**moved)

    @property
    def mask(self) -> torch.Tensor:
        """BoolTensor (B, L): True at real (non-padding) positions."""
        return length_mask(self.lengths, self.ids.shape[1])

    def __len__(self) -> int:
        return self.ids.shape[0]


def _split(sample, index: int):
    if isinstance(sample, dict):
        if "ids" not in sample:
            raise ValueError(f"collate: sample {index} is a dict without 'ids' (keys {sorted(sample)})")
        return sample["ids"], sample.get("label"), sample.get("meta")
    if isinstance(sample, tuple):
        if not 1 <= len(sample) <= 3:
            raise ValueError(f"collate: sample {index} is a tuple of {len(sample)}; use (ids, label[, meta])")
        return (tuple(sample) + (None, None))[:3]
    return sample, None, None


def _ids(x, index: int) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != 1:
        raise ValueError(f"collate: sample {index} ids must be 1-D (L,), got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point:
        raise ValueError(f"collate: sample {index} ids have dtype {t.dtype}; ids must be integers")
    return t.long()


def _gather(samples):
    if len(samples) == 0:
        raise ValueError("collate: got an empty list of samples")
    parts = [_split(s, i) for i, s in enumerate(samples)]
    ids = [_ids(p[0], i) for i, p in enumerate(parts)]
    labels = [p[1] for p in parts]
    if all(lb is None for lb in labels):
        label_t = None
    elif any(lb is None for lb in labels):
        raise ValueError(f"collate: sample {labels.index(None)} has no label while others do")
    else:
        label_t = torch.stack([torch.as_tensor(lb) for lb in labels])
    metas = [p[2] for p in parts]
    meta = None if all(m is None for m in metas) else metas
    return ids, label_t, meta


def pad_collate(samples, pad_id: int = PAD_ID) -> Batch:
    """Right-pad to the longest sample: ids (B, L_max) int64, lengths (B,) int64."""
    ids, labels, meta = _gather(samples)
    lengths = torch.tensor([len(t) for t in ids], dtype=torch.long)
    out = torch.full((len(ids), int(lengths.max())), pad_id, dtype=torch.long)
    for b, t in enumerate(ids):
        out[b, : len(t)] = t
    return Batch(out, lengths, labels, None, meta)


def pack_collate(samples) -> Batch:
    """Concatenate all samples into one row: ids (1, sum L) int64, lengths (1,),
    cu_seqlens (n + 1,) int32 so that sample k is ids[0, cu[k]:cu[k+1]]."""
    ids, labels, meta = _gather(samples)
    lens = torch.tensor([len(t) for t in ids], dtype=torch.int32)
    cu = torch.zeros(len(ids) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens, 0)
    packed = torch.cat(ids)[None, :]
    return Batch(packed, torch.tensor([packed.shape[1]], dtype=torch.long), labels, cu, meta)
