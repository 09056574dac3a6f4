"""The byte vocabulary shared by genomes and audio, and reverse complement over it.

Every token is a byte id in 0..255, followed by four special ids:

    PAD_ID = 256   right padding of a batch (never predicted, masked out of losses)
    MASK_ID = 257  masked-language-model corruption
    CLS_ID = 258   classification / beginning-of-sequence token (BOS_ID is the same id)
    EOS_ID = 259   end of sequence
    VOCAB_SIZE = 260

DNA keeps its FASTA bytes as they are (ord('A') = 65, ord('a') = 97, ...): soft-masked
lowercase carries repeat annotation, so case is only folded when asked (`fold_case=True`).
"""
from __future__ import annotations

import numpy as np
import torch

PAD_ID = 256
MASK_ID = 257
CLS_ID = 258
BOS_ID = CLS_ID
EOS_ID = 259
VOCAB_SIZE = 260

# IUPAC complement pairs; S (G/C), W (A/T) and N complement to themselves.
_IUPAC_PAIRS = ("AT", "CG", "RY", "KM", "BV", "DH", "SS", "WW", "NN")


def encode_bytes(seq: str | bytes | bytearray, fold_case: bool = False) -> np.ndarray:
    """Byte ids of a sequence.

    Args:
        seq: text (must be ASCII, as FASTA is) or raw bytes.
        fold_case: upper-case ASCII letters first (drops soft-masking).
    Returns:
        np.ndarray uint8 of shape (len(seq),); widen with `.astype(np.int64)` before
        adding specials or building tensors.
    """
    if isinstance(seq, str):
        try:
            raw = seq.encode("ascii")
        except UnicodeEncodeError as err:
            bad = seq[err.start]
            raise ValueError(f"encode_bytes: non-ASCII character {bad!r} at position {err.start}; "
                             "sequences must be ASCII (FASTA) or passed as bytes") from None
    else:
        raw = bytes(seq)
    if fold_case:
        raw = raw.upper()
    return np.frombuffer(raw, dtype=np.uint8).copy()


def decode_ids(ids, skip_specials: bool = True) -> str:
    """Text of byte ids: (L,) array/tensor/list of ints in 0..259 -> str (latin-1 decoded).

    Special ids (>= 256) are dropped when `skip_specials`, otherwise an error names the
    first one and its position.
    """
    arr = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    arr = arr.reshape(-1).astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= VOCAB_SIZE):
        pos = int(np.flatnonzero((arr < 0) | (arr >= VOCAB_SIZE))[0])
        raise ValueError(f"decode_ids: id {int(arr[pos])} at position {pos} is outside 0..{VOCAB_SIZE - 1}")
    special = arr >= 256
    if special.any():
        if not skip_specials:
            pos = int(np.flatnonzero(special)[0])
            raise ValueError(f"decode_ids: special id {int(arr[pos])} at position {pos}; "
                             "pass skip_specials=True to drop specials")
        arr = arr[~special]
    return arr.astype(np.uint8).tobytes().decode("latin-1")


def _build_complement() -> np.ndarray:
    table = np.arange(VOCAB_SIZE, dtype=np.int64)  # identity: other bytes and specials map to themselves
    for a, b in _IUPAC_PAIRS:
        for x, y in ((a, b), (a.lower(), b.lower())):
            table[ord(x)], table[ord(y)] = ord(y), ord(x)
    table[ord("U")], table[ord("u")] = ord("A"), ord("a")  # RNA input: U pairs with A
    return table


_COMPLEMENT = _build_complement()
_COMPLEMENT.setflags(write=False)


def complement_table(kind: str = "numpy"):
    """Lookup table of shape (VOCAB_SIZE,) int64 mapping each id to its complement.

    IUPAC-aware and case-preserving (A<->T, C<->G, R<->Y, K<->M, B<->V, D<->H; S, W, N
    self; a<->t ...); U maps to A; every other byte and the special ids map to themselves.
    kind: "numpy" (a read-only np.ndarray) or "torch" (a CPU LongTensor; move it with .to()).
    """
    if kind == "numpy":
        return _COMPLEMENT
    if kind == "torch":
        return torch.from_numpy(_COMPLEMENT.copy())
    raise ValueError(f"complement_table: kind={kind!r}; use 'numpy' or 'torch'")


def reverse_complement_ids(ids, lengths=None):
    """Reverse complement of byte ids, keeping the input's type, dtype and device.

    Args:
        ids: (L,) or right-padded (B, L) integer np.ndarray or torch.Tensor.
        lengths: optional (B,) valid lengths of a padded batch. Each row is reversed
            within its first lengths[b] positions; the padding stays at the right.
    Returns:
        same shape/type as `ids`.
    """
    is_torch = isinstance(ids, torch.Tensor)
    if ids.ndim not in (1, 2):
        raise ValueError(f"reverse_complement_ids: ids must be (L,) or (B, L), got shape {tuple(ids.shape)}")
    if is_torch:
        table = complement_table("torch").to(ids.device)
        comp = table[ids.long()].to(ids.dtype)
    else:
        comp = _COMPLEMENT[np.asarray(ids).astype(np.int64)].astype(ids.dtype)
    if lengths is None:
        return comp.flip(-1) if is_torch else comp[..., ::-1].copy()
    if ids.ndim != 2:
        raise ValueError("reverse_complement_ids: lengths given but ids is not a (B, L) batch")
    B, L = ids.shape
    lens = lengths.to(ids.device).long() if is_torch else np.asarray(lengths, dtype=np.int64)
    if len(lens) != B or (lens < 0).any() or (lens > L).any():
        raise ValueError(f"reverse_complement_ids: lengths {lens.tolist()} must be B={B} values in 0..{L}")
    # Position j of row b reads from lengths[b]-1-j while j < lengths[b]; padding stays put.
    if is_torch:
        pos = torch.arange(L, device=ids.device).expand(B, L)
        src = torch.where(pos < lens[:, None], lens[:, None] - 1 - pos, pos)
        return torch.gather(comp, 1, src)
    pos = np.broadcast_to(np.arange(L), (B, L))
    src = np.where(pos < lens[:, None], lens[:, None] - 1 - pos, pos)
    return np.take_along_axis(comp, src, axis=1)
