"""Pooled embeddings of genome items, streamed chunk by chunk through a seqlab model.

Items are references (:class:`GenomeSpan`, :class:`DatasetItem`, :class:`ArrayItem`)
whose sequence is read only when its chunks are about to enter a batch. Every item is cut into
chunks of at most ``chunk`` bases (in reading order: for strand "-" the first chunk is the
reverse complement of the interval's right end); the chunks of all items form one stream, cut
into batches of at most ``batch_size`` chunks and ``max_tokens`` padded tokens. Each chunk's
pooled vector is folded into its item's running result, which is finished when the item's last
chunk has been through the model. Peak memory is therefore O(batch_size * chunk * model width)
for any interval length; only the finished (n, d_model) rows grow with the number of items.

Chunks are embedded independently: the model sees one chunk at a time, so a bidirectional model
has no context across a chunk boundary, and a causal one restarts its state at each chunk.
Combining the chunk results is exact for the pooling in use, i.e. equal to pooling the
concatenated per-chunk hidden states: mean weights each chunk by its length, max takes the
elementwise max, first the first chunk's, last the last chunk's.

The vectors and their provenance are written as an embeddings file by
seqlab.tasks.embeddings; probes on them are in seqlab.tasks.probe.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data.collate import pad_collate
from ..model.heads import pool
from ..model.rc import reverse_complement
from ..progress import progress as progress_bar
from ..utils import autocast

POOLINGS = ("mean", "max", "first", "last")
_N_IDS = np.array([ord("N"), ord("n")], dtype=np.uint8)


# ----------------------------------------------------------------------------- items
@dataclass(frozen=True)
class GenomeSpan:
    """[start, end) of ``contig`` read from ``genome`` (anything with ``ids(contig, start, end,
    strand)``, e.g. a :class:`~seqlab.data.genome.Genome`) one chunk at a time."""

    genome: object
    contig: str
    start: int
    end: int
    strand: str = "+"
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.end - self.start

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        """uint8 (<= size,) pieces of the sequence as read on its strand."""
        n = len(self)
        for i in range(0, n, size):
            j = min(i + size, n)
            if self.strand == "-":  # sequence offsets [i, j) are genome [end - j, end - i), RC
                yield self.genome.ids(self.contig, self.end - j, self.end - i, "-")
            else:
                yield self.genome.ids(self.contig, self.start + i, self.start + j, "+")


@dataclass(frozen=True)
class DatasetItem:
    """Item ``index`` of a dataset returning (ids, label), loaded when its chunks are read;
    ``length`` is known up front (e.g. from the window's coordinates)."""

    dataset: object
    index: int
    length: int
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.length

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        ids = np.asarray(self.dataset[self.index][0])
        if len(ids) != self.length:
            raise ValueError(f"DatasetItem: item {self.index} has {len(ids)} ids, "
                             f"expected {self.length} from its coordinates")
        for i in range(0, self.length, size):
            yield ids[i:i + size]


@dataclass(frozen=True)
class ArrayItem:
    """A sequence already in memory: ids (L,) integer array."""

    ids: np.ndarray
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        for i in range(0, len(self.ids), size):
            yield self.ids[i:i + size]


@dataclass(frozen=True)
class Skip:
    """An item left out: ``reason`` is "all_n" or "n_frac"; ``detail`` says it in words."""

    item: object
    reason: str
    detail: str


# ----------------------------------------------------------------------------- pooling
class _Running:
    """Pooled vector of one item, folded chunk by chunk: (S, d) float64 over S branches.

    Branch s reads the chunks forward (order +1) or backward (-1, e.g. a reverse-complement
    branch), so for it "first" comes from the item's last chunk and "last" from its first.
    """

    def __init__(self, pooling: str, orders: Sequence[int]):
        self.pooling = pooling
        # Per branch: True when its value comes from the item's first chunk (first/last pooling).
        self.from_first = np.array([(pooling == "first") == (o > 0) for o in orders])
        self.value: np.ndarray | None = None
        self.bases = 0

    def add(self, vec: np.ndarray, length: int, is_first: bool, is_last: bool) -> None:
        """vec (S, d): one chunk's pooled vector per branch; length: the chunk's bases."""
        vec = vec.astype(np.float64)
        if self.pooling == "mean":
            vec = vec * length
            self.value = vec if self.value is None else self.value + vec
        elif self.pooling == "max":
            self.value = vec if self.value is None else np.maximum(self.value, vec)
        else:
            if self.value is None:
                self.value = np.zeros_like(vec)
            take = (self.from_first & is_first) | (~self.from_first & is_last)
            self.value[take] = vec[take]
        self.bases += length

    def result(self) -> np.ndarray:
        return self.value / self.bases if self.pooling == "mean" else self.value


def _n_count(ids: np.ndarray) -> int:
    return int(np.count_nonzero(np.isin(ids, _N_IDS)))


def _screen(n_count: int, length: int, max_n_frac: float) -> tuple[str, str] | None:
    """(reason, detail) when an item of ``length`` bases with ``n_count`` N is left out."""
    if n_count == length:
        return "all_n", f"all {length} bp are N: no sequence to embed"
    if n_count > max_n_frac * length:
        return "n_frac", (f"{n_count / length:.1%} of {length} bp are N, more than "
                          f"max_n_frac={max_n_frac}")
    return None


# ----------------------------------------------------------------------------- embedding
@dataclass
class _Piece:
    item: object
    state: _Running
    ids: np.ndarray
    is_first: bool
    is_last: bool


@torch.no_grad()
def embed_items(model, items: Iterable, device: torch.device, batch_size: int = 32,
                chunk: int | None = None, *, max_tokens: int | None = None,
                max_n_frac: float | None = None, pooling: str = "mean",
                amp_dtype: torch.dtype | None = None, progress: bool = True,
                on_skip: Callable[[Skip], None] | None = None,
                ) -> Iterator[tuple[object, np.ndarray]]:
    """Yield (item, float32 (d_model,)) for each embedded item, in input order.

    items: objects with ``len(item)`` (bases) and ``item.chunks(size)`` yielding uint8/int
        arrays (:class:`GenomeSpan`, :class:`DatasetItem`, :class:`ArrayItem`).
    chunk: bases per chunk (None: each item is one chunk, however long).
    batch_size, max_tokens: a batch holds at most batch_size chunks and, when max_tokens is
        set, at most max_tokens padded positions (chunks * longest chunk); never less than
        one chunk.
    max_n_frac: when set, an item with more than this fraction of N (N/n bytes), or with no
        base but N, is not embedded: ``on_skip(Skip)`` is called instead. Screening reads an
        item of several chunks once more, one chunk at a time, before any model work on it.
    model: either the chunk protocol of :class:`PooledBackbone` (attributes
        ``pooling``, ``branch_orders``; ``pool_chunks(ids (B, L), lengths (B,)) -> (B, S, d)``
        and ``finish(ndarray (n, S, d)) -> (n, d)``), or any module with
        ``embed(ids, lengths) -> (B, d)``, whose chunk vectors are combined by ``pooling``.
    """
    if batch_size < 1:
        raise ValueError(f"embed: batch_size must be >= 1, got {batch_size}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"embed: chunk must be >= 1 or None, got {chunk}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"embed: max_tokens must be >= 1 or None, got {max_tokens}")
    chunked = hasattr(model, "pool_chunks")
    pooling = model.pooling if chunked else pooling
    if pooling not in POOLINGS:
        raise ValueError(f"embed: pooling={pooling!r}; use one of {POOLINGS}")
    orders = tuple(model.branch_orders) if chunked else (1,)
    model.eval()
    total = sum(len(it) for it in items) if isinstance(items, Sequence) else None

    def skipped(item, n: int, reason: str, detail: str) -> None:
        bar.update(n)
        if on_skip is not None:
            on_skip(Skip(item, reason, detail))

    def pieces() -> Iterator[_Piece]:
        for index, item in enumerate(items):
            n = len(item)
            if n == 0:
                raise ValueError(f"embed: item {index} ({_describe(item)}) is empty (0 bp)")
            size = n if chunk is None else chunk
            state = _Running(pooling, orders)
            if max_n_frac is not None:
                if n <= size:  # one chunk: read once, screen it, then embed it
                    (ids,) = item.chunks(size)
                    skip = _screen(_n_count(ids), n, max_n_frac)
                    if skip is None:
                        yield _Piece(item, state, ids, True, True)
                    else:
                        skipped(item, n, *skip)
                    continue
                skip = _screen(sum(_n_count(c) for c in item.chunks(size)), n, max_n_frac)
                if skip is not None:
                    skipped(item, n, *skip)
                    continue
            last = (n - 1) // size
            for k, ids in enumerate(item.chunks(size)):
                yield _Piece(item, state, ids, k == 0, k == last)

    with progress_bar(total=total, desc="embed", unit="bp", enabled=progress) as bar:
        batch: list[_Piece] = []
        for piece in pieces():
            if batch and not _fits(batch, piece, batch_size, max_tokens):
                yield from _run_batch(model, batch, device, amp_dtype, chunked, bar)
                batch = []
            batch.append(piece)
        if batch:
            yield from _run_batch(model, batch, device, amp_dtype, chunked, bar)


def _fits(batch: list[_Piece], piece: _Piece, batch_size: int, max_tokens: int | None) -> bool:
    if len(batch) >= batch_size:
        return False
    if max_tokens is None:
        return True
    longest = max(len(piece.ids), max(len(p.ids) for p in batch))
    return (len(batch) + 1) * longest <= max_tokens


def _run_batch(model, batch: list[_Piece], device, amp_dtype, chunked: bool, bar):
    b = pad_collate([torch.as_tensor(np.asarray(p.ids), dtype=torch.long) for p in batch])
    b = b.to(device)
    with autocast(device, amp_dtype):
        if chunked:
            pooled = model.pool_chunks(b.ids, b.lengths)  # (B, S, d)
        else:
            pooled = model.embed(b.ids, b.lengths)[:, None]  # (B, 1, d)
    pooled = pooled.float().cpu().numpy()
    done = []
    for p, vec in zip(batch, pooled):
        p.state.add(vec, len(p.ids), p.is_first, p.is_last)
        if p.is_last:
            done.append(p)
    bar.update(int(b.lengths.sum()))
    if done:
        stacked = np.stack([p.state.result() for p in done])  # (n, S, d)
        rows = model.finish(stacked) if chunked else stacked[:, 0]
        for p, row in zip(done, rows):
            yield p.item, np.asarray(row, dtype=np.float32)


def _describe(item) -> str:
    meta = getattr(item, "meta", None) or {}
    if {"contig", "start", "end"} <= meta.keys():
        return f"{meta['contig']}:{meta['start']}-{meta['end']}"
    return type(item).__name__


def embed_windows(model, windows: Sequence, device: torch.device, batch_size: int = 32,
                  chunk: int | None = None, progress: bool = True,
                  amp_dtype: torch.dtype | None = None, *, max_tokens: int | None = None,
                  pooling: str = "mean") -> np.ndarray:
    """Pooled embeddings of every window: float32 (n, d_model), row i for window i.

    windows: (ids ndarray, meta) pairs or lazy items (see :func:`embed_items`, which this
    streams through with no N screening, so every window gives a row).
    """
    items = [w if hasattr(w, "chunks") else ArrayItem(np.asarray(w[0]), w[1]) for w in windows]
    rows = [vec for _, vec in embed_items(model, items, device, batch_size, chunk,
                                          max_tokens=max_tokens, pooling=pooling,
                                          amp_dtype=amp_dtype, progress=progress)]
    return np.stack(rows) if rows else np.zeros((0, 0), np.float32)


# ----------------------------------------------------------------------------- seqlab models
class PooledBackbone(torch.nn.Module):
    """Pooled final hidden states of a seqlab model, in the chunk protocol of
    :func:`embed_items` (so pooling stays exact across chunks).

    SequenceClassifier: its head's pooling (mean / max / first / last); with ``conjoin_rc`` a
    second branch pools the reverse complement of each chunk, and that branch reads the chunks
    backwards (the reverse complement of a whole interval starts with its last chunk's); with
    ``rc_equivariant`` the channel-flip symmetrisation is applied after the chunks are combined,
    as ``SequenceClassifier.embed`` applies it after pooling. Language models (MambaLM,
    MaskedLM): mean over positions.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        head = getattr(model, "head", None)
        self.pooling = head.pooling if head is not None else "mean"
        self.conjoin = bool(getattr(model, "conjoin", False))
        self.symmetrise = head is not None and bool(model.config.rc_equivariant)
        self.branch_orders = (1, -1) if self.conjoin else (1,)

    def pool_chunks(self, ids, lengths):
        """ids (B, L) long, lengths (B,) -> float32 (B, S, d_model), S = len(branch_orders)."""
        branches = [ids] + ([reverse_complement(ids, lengths)] if self.conjoin else [])
        return torch.stack([pool(self.model.backbone(x, lengths=lengths).float(), lengths,
                                 self.pooling) for x in branches], 1)

    def finish(self, pooled: np.ndarray) -> np.ndarray:
        """(n, S, d_model) combined per-branch vectors -> (n, d_model)."""
        if self.symmetrise:
            pooled = (pooled + pooled[..., ::-1]) / 2
        return pooled.mean(1)


__all__ = ["POOLINGS", "GenomeSpan", "DatasetItem", "ArrayItem", "Skip", "embed_items",
           "embed_windows", "PooledBackbone"]
