"""Pooled embeddings of DNA windows, saved with provenance, and scikit-learn probes on them.

Embeddings file (``.npz``, read with ``numpy.load(path)``; no pickled objects inside):
    embeddings   float32 (n, d_model)   pooled hidden states
    contig       str (n,)               provenance: 0-based half-open [start, end) on contig
    start, end   int64 (n,)
    strand       str (n,)               "+" or "-" (reverse complement)
    label        int64 (n,)             class id, or -1 when unlabelled
    group        str (n,)               e.g. strain or file: probes can split by it
    classes      str (k,)               class names (label i -> classes[i]); may be empty
    info         str ()                 JSON: model checkpoint, window, pooling, seqlab version
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .data.collate import pad_collate


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

    def __len__(self) -> int:
        return len(self.embeddings)


@torch.no_grad()
def embed_windows(model, windows: list[tuple[np.ndarray, dict]], device: torch.device,
                  batch_size: int = 32, chunk: int | None = None, progress: bool = True,
                  amp_dtype: torch.dtype | None = None) -> np.ndarray:
    """Pool ``model.embed`` over each (ids, meta) item; returns float32 (n, d_model).

    Sequences longer than ``chunk`` are embedded chunk by chunk and the chunk embeddings
    averaged with weights equal to their lengths, so memory stays bounded by ``chunk`` for
    any sequence length.
    """
    model.eval()
    out = []
    for s in tqdm(range(0, len(windows), batch_size), desc="embed", unit="batch",
                  disable=not progress, dynamic_ncols=True):
        items = windows[s:s + batch_size]
        if chunk is None or all(len(ids) <= chunk for ids, _ in items):
            out.append(_embed_batch(model, [ids for ids, _ in items], device, amp_dtype))
            continue
        for ids, _ in items:
            pieces = [ids[i:i + chunk] for i in range(0, len(ids), chunk)]
            vecs = _embed_batch(model, pieces, device, amp_dtype)
            w = np.array([len(p) for p in pieces], dtype=np.float64)
            out.append((vecs * (w / w.sum())[:, None]).sum(0, keepdims=True).astype(np.float32))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _embed_batch(model, seqs, device, amp_dtype):
    batch = pad_collate([torch.as_tensor(np.asarray(x), dtype=torch.long) for x in seqs]).to(device)
    ctx = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
           else torch.autocast(device.type, enabled=False))
    with ctx:
        pooled = model.embed(batch.ids, batch.lengths)
    return pooled.float().cpu().numpy()


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
                 info=np.asarray(json.dumps(emb.info)))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_embeddings(path: str | os.PathLike) -> Embeddings:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: embeddings file not found; create it with "
                                "`seqlab run embed`")
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ValueError(f"{path}: not a seqlab embeddings file (.npz): {exc}") from exc
    need = ("embeddings", "contig", "start", "end", "strand", "label", "group", "classes", "info")
    missing = [k for k in need if k not in z.files]
    if missing:
        raise ValueError(f"{path}: embeddings file lacks arrays {missing}; was it written by "
                         "seqlab.embed.save_embeddings?")
    return Embeddings(z["embeddings"], z["contig"], z["start"], z["end"], z["strand"],
                      z["label"], z["group"], [str(c) for c in z["classes"]],
                      json.loads(str(z["info"])))


def run_probe(emb: Embeddings, estimator: str = "logistic", folds: int = 5,
              group_split: bool = False, seed: int = 0, C: float = 1.0) -> dict:
    """Cross-validated probe on the labelled rows; returns metrics and pooled predictions.

    estimator: "logistic" (StandardScaler + LogisticRegression) | "knn" | "linear_svm".
    group_split: folds by the ``group`` column (e.g. strain) so no group is in train and test.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
    from sklearn.model_selection import GroupKFold, StratifiedKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    keep = emb.label >= 0
    X, y, groups = emb.embeddings[keep], emb.label[keep], emb.group[keep]
    if len(np.unique(y)) < 2:
        raise ValueError(f"probe: needs at least two classes among the labelled rows, got "
                         f"{np.unique(y).tolist()}")
    estimators = {
        "logistic": lambda: LogisticRegression(C=C, max_iter=2000),
        "knn": lambda: KNeighborsClassifier(n_neighbors=5),
        "linear_svm": lambda: LinearSVC(C=C, max_iter=5000),
    }
    if estimator not in estimators:
        raise ValueError(f"probe.estimator={estimator!r}: choose one of {sorted(estimators)}")
    clf = make_pipeline(StandardScaler(), estimators[estimator]())
    min_count = int(np.bincount(y).min())
    if group_split:
        n_groups = len(np.unique(groups))
        k = min(folds, n_groups)
        if k < 2:
            raise ValueError(f"probe: group_split needs at least 2 groups, got {n_groups}")
        cv = GroupKFold(n_splits=k)
        pred = cross_val_predict(clf, X, y, cv=cv, groups=groups)
    else:
        k = max(2, min(folds, min_count))
        cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        pred = cross_val_predict(clf, X, y, cv=cv)
    fold_acc = []
    splitter = cv.split(X, y, groups) if group_split else cv.split(X, y)
    for _, test in splitter:
        fold_acc.append(accuracy_score(y[test], pred[test]))
    labels = list(range(max(len(emb.classes), int(y.max()) + 1)))
    return {
        "n": int(len(y)), "folds": k, "estimator": estimator, "group_split": group_split,
        "accuracy": float(accuracy_score(y, pred)),
        "accuracy_fold_std": float(np.std(fold_acc)),
        "macro_f1": float(f1_score(y, pred, average="macro")),
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
    }
