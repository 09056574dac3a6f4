"""Synthetic tasks (Mamba paper, section 4.1): generator properties, the chunked-prefill
evaluation against the full forward, and the CI learning targets on the CPU.

The learning tests train the recipes' model (2 layers, d_model 64) through the real Trainer
with fixed seeds; the budgets were measured on a shared 2-core CPU (see each test).
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from seqlab.data.synthetic import (IGNORE_INDEX, InductionHeads, SelectiveCopying, make_task)


# ----------------------------------------------------------------------------- generators
@pytest.mark.parametrize("L,K,V", [(16, 4, 6), (256, 8, 16), (40, 40, 3)])
def test_selective_copy_layout(L, K, V):
    gen = SelectiveCopying(seq_len=L, n_content=K, vocab_size=V, seed=3)
    assert gen.length == L + K and gen.n_answers == K
    for i in range(20):
        ids, pos, tgt = gen.sample(i)
        assert ids.shape == (L + K,) and pos.shape == (K,) and tgt.shape == (K,)
        region = ids[:L]
        content_at = np.flatnonzero(region != gen.noise_id)
        # Exactly K content tokens in the region (content ids are never the noise id 0) ...
        assert len(content_at) == K
        assert ((region[content_at] >= 1) & (region[content_at] <= V - 2)).all()
        # ... then K markers, whose answers are the content tokens in order of appearance.
        assert (ids[L:] == gen.marker_id).all()
        np.testing.assert_array_equal(pos, np.arange(L, L + K))
        np.testing.assert_array_equal(tgt, region[content_at])


def test_selective_copy_positions_spread():
    """Content positions are random over the whole region, not clustered at the start."""
    gen = SelectiveCopying(seq_len=64, n_content=4, seed=0)
    seen = np.concatenate([np.flatnonzero(gen.sample(i)[0][:64]) for i in range(200)])
    counts = np.bincount(seen, minlength=64)
    assert counts.min() > 0 and counts[:32].sum() / counts.sum() == pytest.approx(0.5, abs=0.07)


@pytest.mark.parametrize("L,V", [(3, 3), (64, 16), (300, 5)])
def test_induction_layout(L, V):
    gen = InductionHeads(seq_len=L, vocab_size=V, seed=1)
    assert gen.length == L and gen.n_answers == 1
    for i in range(30):
        ids, pos, tgt = gen.sample(i)
        assert ids.shape == (L,)
        trig = np.flatnonzero(ids == gen.trigger_id)
        # The trigger occurs exactly twice: once inside, once as the last token.
        assert len(trig) == 2 and trig[1] == L - 1 and trig[0] <= L - 3
        np.testing.assert_array_equal(pos, [L - 1])
        assert tgt[0] == ids[trig[0] + 1] and tgt[0] != gen.trigger_id
        assert ids.min() >= 0 and ids.max() <= V - 1


def test_deterministic_by_index_and_seed():
    for gen in (SelectiveCopying(seed=7), InductionHeads(seed=7)):
        a = gen.batch([5, 0, 123456789])
        b = gen.batch([123456789, 5])
        np.testing.assert_array_equal(a.ids[0], b.ids[1])  # order and batch mates don't matter
        np.testing.assert_array_equal(a.ids[2], b.ids[0])
        np.testing.assert_array_equal(a.targets[2], b.targets[0])
        # Sample i is default_rng([seed, i]) and nothing else.
        ids, _, _ = gen._draw(np.random.default_rng([7, 5]))
        np.testing.assert_array_equal(ids, a.ids[0])
        other = gen.with_seed(8).batch([5, 0])
        assert not np.array_equal(other.ids, a.ids[:2])
        assert not np.array_equal(a.ids[0], a.ids[1])


def test_label_mask():
    gen = SelectiveCopying(seq_len=32, n_content=5, seed=2)
    b = gen.train_batch(range(6))
    assert b.ids.dtype == torch.long and b.labels.shape == b.ids.shape
    keep = b.labels != IGNORE_INDEX
    assert keep.sum(1).tolist() == [5] * 6
    assert keep[:, 32:].all() and not keep[:, :32].any()
    np.testing.assert_array_equal(b.labels[keep].view(6, 5).numpy(), gen.batch(range(6)).targets)
    ib = InductionHeads(seq_len=20, seed=2).train_batch(range(4))
    keep = ib.labels != IGNORE_INDEX
    assert keep[:, -1].all() and keep.sum().item() == 4


def test_with_length_keeps_the_rest():
    gen = SelectiveCopying(seq_len=32, n_content=6, vocab_size=10, seed=4)
    long = gen.with_length(512)
    assert (long.seq_len, long.n_content, long.vocab_size, long.seed) == (512, 6, 10, 4)
    assert long.batch(range(2)).ids.shape == (2, 518)


def test_bad_settings_name_themselves():
    with pytest.raises(ValueError, match="n_content"):
        SelectiveCopying(seq_len=4, n_content=5)
    with pytest.raises(ValueError, match="vocab_size"):
        InductionHeads(vocab_size=2)
    with pytest.raises(ValueError, match="no setting"):
        make_task("induction", n_content=3)
    with pytest.raises(ValueError, match="unknown synthetic task"):
        make_task("copying")
    with pytest.raises(ValueError, match="index"):
        InductionHeads().sample(-1)
