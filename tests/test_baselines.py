"""The simple baselines reported beside the models: k-mer logistic regression, xz, an order-2
context model."""
import lzma

import numpy as np
import pytest

from seqlab.tasks import baselines as B


def ids(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), np.uint8)


def test_kmer_frequencies_count_acgt_kmers_only():
    f = B.kmer_frequencies([ids("ACGTNacg")], 2)[0]
    # AC, CG, GT, ac, cg (lower case folds); the k-mers touching N are skipped.
    code = {"AC": 1, "CG": 6, "GT": 11}
    assert f.sum() == pytest.approx(1.0)
    assert f[code["AC"]] == pytest.approx(2 / 5) and f[code["CG"]] == pytest.approx(2 / 5)
    assert f[code["GT"]] == pytest.approx(1 / 5)
    # canonical: AC and its reverse complement GT count together (at the smaller code, AC).
    c = B.kmer_frequencies([ids("ACGT")], 2, canonical=True)[0]
    assert c[code["AC"]] == pytest.approx(2 / 3) and c[code["GT"]] == 0
    assert B.kmer_frequencies([ids("AC")], 3).sum() == 0  # shorter than k


def _dna(rng, n, gc):
    p = [(1 - gc) / 2, gc / 2, gc / 2, (1 - gc) / 2]
    return [ids("".join(rng.choice(list("ACGT"), size=300, p=p))) for _ in range(n)]


def test_kmer_baseline_separates_composition_and_picks_k_on_validation():
    rng = np.random.default_rng(0)
    split = lambda n: (_dna(rng, n, 0.35) + _dna(rng, n, 0.55), [0] * n + [1] * n)  # noqa: E731
    rep = B.kmer_baseline(split(40), split(20), split(20), ks=(1, 2, 3))
    assert rep["test_accuracy"] > 0.95 and rep["train_windows"] == 80
    assert rep["k"] in (1, 2, 3) and rep["val_accuracy"] == rep["val_accuracy_by_k"][str(rep["k"])]
    assert rep["val_accuracy"] == max(rep["val_accuracy_by_k"].values())
    assert len(rep["test_pred"]) == 40
    with pytest.raises(ValueError, match="fewer than two classes"):
        B.kmer_baseline((split(5)[0], [0] * 10), split(5), split(5))


def test_kmer_cv_baseline_uses_the_given_folds():
    rng = np.random.default_rng(1)
    seqs = _dna(rng, 30, 0.3) + _dna(rng, 30, 0.6)
    y = np.array([0] * 30 + [1] * 30)
    folds = [(np.r_[0:20, 30:50], np.r_[20:30, 50:60]), (np.r_[10:30, 40:60], np.r_[0:10, 30:40])]
    rep = B.kmer_cv_baseline(seqs, y, folds, ks=(2,))
    assert rep["k"] == 2 and rep["accuracy"] > 0.9


def test_xz_bits_match_lzma_and_order_of_magnitude():
    rng = np.random.default_rng(2)
    noise = rng.integers(0, 256, 20_000).astype(np.uint8)
    assert B.xz_bits_per_sample(noise) == pytest.approx(
        8 * len(lzma.compress(noise.tobytes(), preset=9 | lzma.PRESET_EXTREME)) / 20_000)
    assert B.xz_bits_per_sample(noise) > 7.9
    assert B.xz_bits_per_sample(np.full(20_000, 128, np.uint8)) < 0.1


def test_context_model_equals_its_plain_loop_and_learns_structure():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, 3000)
    fast = B.context_model_bits_per_sample(x, beta=8.0)
    slow = B._context_bits_python(x.astype(np.int64), 8.0) / x.size
    assert fast == pytest.approx(slow, rel=1e-12)
    assert fast > 8.0  # uniform noise costs more than 8 bits to an adaptive model
    # A sequence determined by its two predecessors is learnt: far below 8 bits.
    period = np.tile(rng.integers(0, 256, 50), 200)
    assert B.context_model_bits_per_sample(period) < 1.0
    with pytest.raises(ValueError, match="0..255"):
        B.context_model_bits_per_sample(np.array([0, 300]))


def test_audio_baselines_on_speechlike_codes_are_below_eight_bits():
    t = np.arange(16_000)
    wave = 0.5 * np.sin(2 * np.pi * 220 * t / 16_000) * np.exp(-t / 8000)
    from seqlab.data.mulaw import mulaw_encode
    import torch
    codes = mulaw_encode(torch.tensor(wave, dtype=torch.float32)).numpy()
    rep = B.audio_baselines(codes)
    assert rep["baseline_samples"] == 16_000
    assert 0 < rep["xz_bits_per_sample"] < 8 and 0 < rep["context2_bits_per_sample"] < 8
