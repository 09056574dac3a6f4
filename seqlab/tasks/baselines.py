"""Simple baselines, reported beside every result on the same data.

A model's figure means little alone: a species classifier is worth its training only if it
beats the k-mer composition of the same windows, and an audio model only if it codes held-out
speech in fewer bits than a general-purpose compressor and a small context model.

- :func:`kmer_baseline`: k-mer frequencies (k chosen on the validation windows) and a
  scikit-learn logistic regression, trained on the windows the model trained on and tested on
  the model's test windows. :func:`kmer_cv_baseline` does the same inside a probe's folds.
- :func:`xz_bits_per_sample`: ``xz -9`` (LZMA, preset 9 extreme) on the 8-bit codes.
- :func:`context_model_bits_per_sample`: an adaptive order-2 context model, the cost an
  arithmetic coder would pay predicting each code from the two before it.
"""
from __future__ import annotations

import lzma
import math

import numpy as np

KMER_KS = (3, 4, 5, 6)

# byte -> base index (A, C, G, T in either case), -1 for anything else (N, IUPAC codes, pads).
_BASE = np.full(257, -1, np.int64)
for _i, _c in enumerate(b"ACGT"):
    _BASE[_c] = _i
    _BASE[_c + 32] = _i


def kmer_frequencies(seqs, k: int, canonical: bool = False) -> np.ndarray:
    """(n, 4**k) float32: the frequency of each k-mer in each sequence of byte ids.

    k-mers holding a base other than A, C, G, T are not counted. ``canonical`` counts a
    k-mer and its reverse complement as one (features that ignore the strand).
    """
    out = np.zeros((len(seqs), 4 ** k), np.float32)
    weights = 4 ** np.arange(k - 1, -1, -1)
    for row, seq in enumerate(seqs):
        b = _BASE[np.clip(np.asarray(seq, dtype=np.int64), 0, 256)]
        if len(b) < k:
            continue
        win = np.lib.stride_tricks.sliding_window_view(b, k)
        win = win[(win >= 0).all(1)]
        codes = win @ weights
        if canonical:
            codes = np.minimum(codes, (3 - win[:, ::-1]) @ weights)
        counts = np.bincount(codes, minlength=4 ** k)
        out[row] = counts / max(1, counts.sum())
    return out


def _classifier(C: float):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=3000))


def kmer_baseline(train, val, test, ks=KMER_KS, C: float = 1.0) -> dict:
    """k-mer logistic regression on (seqs, labels) splits; k chosen by validation accuracy.

    Returns {"k", "val_accuracy_by_k", "val_accuracy", "test_accuracy", "test_macro_f1",
    "test_pred", "train_windows"}: the classifier of each k is fit on ``train``, scored on
    ``val``; the best k (the smaller on a tie) is the one reported on ``test``.
    """
    from sklearn.metrics import accuracy_score, f1_score
    (xtr, ytr), (xva, yva), (xte, yte) = train, val, test
    ytr, yva, yte = map(np.asarray, (ytr, yva, yte))
    if len(np.unique(ytr)) < 2:
        raise ValueError("k-mer baseline: the training windows hold fewer than two classes")
    by_k, fitted = {}, {}
    for k in ks:
        clf = _classifier(C).fit(kmer_frequencies(xtr, k), ytr)
        by_k[k] = float(accuracy_score(yva, clf.predict(kmer_frequencies(xva, k))))
        fitted[k] = clf
    best = max(ks, key=lambda k: (by_k[k], -k))
    pred = fitted[best].predict(kmer_frequencies(xte, best))
    return {"k": int(best), "val_accuracy_by_k": {str(k): v for k, v in by_k.items()},
            "val_accuracy": by_k[best], "test_accuracy": float(accuracy_score(yte, pred)),
            "test_macro_f1": float(f1_score(yte, pred, average="macro")),
            "test_pred": pred, "train_windows": int(len(ytr))}


def kmer_cv_baseline(seqs, labels, splits, ks=KMER_KS, C: float = 1.0) -> dict:
    """k-mer logistic regression cross-validated on the given (train, test) index splits (a
    probe's own folds), k chosen by the pooled out-of-fold accuracy; returns {"k",
    "accuracy", "accuracy_by_k"}."""
    labels = np.asarray(labels)
    scored = np.zeros(len(labels), bool)
    for _, te in splits:
        scored[te] = True
    by_k = {}
    for k in ks:
        X = kmer_frequencies(seqs, k)
        pred = np.full_like(labels, -1)
        for tr, te in splits:
            pred[te] = _classifier(C).fit(X[tr], labels[tr]).predict(X[te])
        by_k[k] = float((pred[scored] == labels[scored]).mean())
    best = max(ks, key=lambda k: (by_k[k], -k))
    return {"k": int(best), "accuracy": by_k[best],
            "accuracy_by_k": {str(k): v for k, v in by_k.items()}}


# ----------------------------------------------------------------------------- audio
def xz_bits_per_sample(codes) -> float:
    """Bits per sample of ``xz -9e`` (LZMA preset 9, extreme) on 8-bit codes, header included."""
    data = np.asarray(codes, dtype=np.uint8).tobytes()
    if not data:
        raise ValueError("xz baseline: no samples")
    return 8.0 * len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) / len(data)


# Blend weights of the context model, chosen on the bundled speech's validation speakers
# (bits/sample at beta 1 / 4 / 16 / 32 / 64 / 128: 6.84 / 6.12 / 5.70 / 5.62 / 5.61 / 5.67).
CONTEXT_BETA = 32.0


def context_model_bits_per_sample(codes, beta: float = CONTEXT_BETA) -> float:
    """Adaptive order-2 context model over 8-bit codes, in bits per sample.

    Each code is predicted from the two before it, with counts updated after every sample
    (what a decoder could do): p2(x) = (n(ab, x) + beta * p1(x)) / (n(ab) + beta), where the
    order-1 estimate p1 is blended with a Laplace order-0 one the same way. The sum of
    -log2 p2 is what an arithmetic coder pays. Starts from the zero level (code 128).
    """
    x = np.asarray(codes, dtype=np.int64)
    if x.size == 0:
        raise ValueError("context model baseline: no samples")
    if x.min() < 0 or x.max() > 255:
        raise ValueError("context model baseline: codes must lie in 0..255")
    return float(_context_bits(x, float(beta))) / x.size


def _context_bits_python(x: np.ndarray, beta: float) -> float:
    c0 = np.zeros(256)
    c1 = np.zeros((256, 256))
    n1 = np.zeros(256)
    c2 = np.zeros((65536, 256), np.float32)
    n2 = np.zeros(65536)
    n0, total, a, b = 0.0, 0.0, 128, 128
    for s in x:
        p0 = (c0[s] + 1.0) / (n0 + 256.0)
        p1 = (c1[b, s] + beta * p0) / (n1[b] + beta)
        ctx = a * 256 + b
        total -= math.log2((c2[ctx, s] + beta * p1) / (n2[ctx] + beta))
        c0[s] += 1
        n0 += 1
        c1[b, s] += 1
        n1[b] += 1
        c2[ctx, s] += 1
        n2[ctx] += 1
        a, b = b, s
    return total


def _context_bits(x: np.ndarray, beta: float) -> float:
    try:
        import numba
    except ImportError:  # the same loop, slowly (numba is a dependency; this is a fallback)
        return _context_bits_python(x, beta)
    global _context_bits_numba
    if _context_bits_numba is None:
        _context_bits_numba = numba.njit(cache=True)(_context_bits_python)
    return _context_bits_numba(x, beta)


_context_bits_numba = None


def audio_baselines(codes) -> dict:
    """xz and the order-2 context model on one stream of codes: {"xz_bits_per_sample",
    "context2_bits_per_sample", "baseline_samples"}."""
    codes = np.asarray(codes, dtype=np.uint8)
    return {"xz_bits_per_sample": xz_bits_per_sample(codes),
            "context2_bits_per_sample": context_model_bits_per_sample(codes),
            "baseline_samples": int(codes.size)}


__all__ = ["KMER_KS", "kmer_frequencies", "kmer_baseline", "kmer_cv_baseline",
           "xz_bits_per_sample", "context_model_bits_per_sample", "audio_baselines",
           "CONTEXT_BETA"]
