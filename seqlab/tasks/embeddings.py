"""The embeddings file: pooled vectors of DNA items with their provenance.

Embeddings file (``.npz``, read with ``numpy.load(path)``; no pickled objects inside):
    embeddings   float32 (n, d_model)   pooled hidden states
    contig       str (n,)               provenance: 0-based half-open [start, end) on contig
    start, end   int64 (n,)
    strand       str (n,)               "+" or "-" (reverse complement)
    label        int64 (n,)             class id, or -1 when unlabelled
    group        str (n,)               e.g. strain or file: probes can split by it
    classes      str (k,)               class names (label i -> classes[i]); may be empty
    info         str ()                 JSON: model checkpoint, window, pooling, seqlab version
    source       str (n,)               the FASTA file of each row (optional: files written
                                        before it existed lack it); lets a probe compute the
                                        k-mer baseline on the same rows
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError, MissingInput


@dataclass
class Embeddings:
    embeddings: np.ndarray
    contig: np.ndarray
    start: np.ndarray
    end: np.ndarray
    strand: np.ndarray
    label: np.ndarray
    group: np.ndarray
    classes: list[str]
    info: dict
    source: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.embeddings)



def to_embeddings(vecs: np.ndarray, metas: list[dict], classes: list[str], info: dict
                  ) -> Embeddings:
    """Rows ``vecs`` (n, d) float32 with the provenance in ``metas`` (each with "contig",
    "start", "end", "strand" and optionally "label", "group", "source" or "file")."""
    return Embeddings(vecs, np.array([m["contig"] for m in metas], dtype=str),
                      np.array([m["start"] for m in metas], np.int64),
                      np.array([m["end"] for m in metas], np.int64),
                      np.array([m["strand"] for m in metas], dtype=str),
                      np.array([m.get("label", -1) for m in metas], np.int64),
                      np.array([m.get("group", "") for m in metas], dtype=str), classes, info,
                      np.array([str(m.get("source") or m.get("file") or "") for m in metas],
                               dtype=str))


def save_embeddings(path: str | os.PathLike, emb: Embeddings) -> Path:
    """Write atomically: a killed run never leaves a truncated file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(emb.embeddings)
    for name in ("contig", "start", "end", "strand", "label", "group"):
        if len(getattr(emb, name)) != n:
            raise ValueError(f"save_embeddings: {name} has {len(getattr(emb, name))} rows, "
                             f"embeddings has {n}")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".npz")
    os.close(fd)
    try:
        np.savez(tmp, embeddings=emb.embeddings.astype(np.float32),
                 contig=np.asarray(emb.contig, dtype=str), start=np.asarray(emb.start, np.int64),
                 end=np.asarray(emb.end, np.int64), strand=np.asarray(emb.strand, dtype=str),
                 label=np.asarray(emb.label, np.int64), group=np.asarray(emb.group, dtype=str),
                 classes=np.asarray(emb.classes, dtype=str),
                 info=np.asarray(json.dumps(emb.info)),
                 **({"source": np.asarray(emb.source, dtype=str)}
                    if emb.source is not None else {}))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_embeddings(path: str | os.PathLike) -> Embeddings:
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"{path}: embeddings file not found; create it with "
                           "`seqlab run embed`")
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: not a seqlab embeddings file (.npz): {exc}") from exc
    need = ("embeddings", "contig", "start", "end", "strand", "label", "group", "classes", "info")
    missing = [k for k in need if k not in z.files]
    if missing:
        raise DataError(f"{path}: embeddings file lacks arrays {missing}; was it written by "
                        "seqlab.tasks.embeddings.save_embeddings?")
    return Embeddings(z["embeddings"], z["contig"], z["start"], z["end"], z["strand"],
                      z["label"], z["group"], [str(c) for c in z["classes"]],
                      json.loads(str(z["info"])), z["source"] if "source" in z.files else None)


__all__ = ["Embeddings", "to_embeddings", "save_embeddings", "load_embeddings"]
