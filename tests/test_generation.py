"""Sampling: determinism, greedy decoding against the full forward, top-k/top-p support."""
import pytest
import torch

from seqlab.generation import generate, sample_next
from seqlab.model import MambaConfig, MambaLM


def tiny_lm():
    return MambaLM(MambaConfig(d_model=16, n_layer=2, d_state=4, scan_impl="torch"))


def test_generate_is_deterministic_for_a_seed(rng_seed):
    m = tiny_lm()
    prompt = torch.randint(0, 256, (3, 4))
    a = generate(m, prompt, 12, temperature=1.0, seed=7)
    b = generate(m, prompt, 12, temperature=1.0, seed=7)
    c = generate(m, prompt, 12, temperature=1.0, seed=8)
    assert a.shape == (3, 16) and a.dtype == torch.long
    assert torch.equal(a[:, :4], prompt)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.max() < 260  # padded vocabulary rows are never sampled


@pytest.mark.parametrize("how", [dict(temperature=0.0), dict(top_k=1)])
def test_greedy_equals_argmax_of_the_full_forward(rng_seed, how):
    m = tiny_lm()
    prompt = torch.randint(0, 256, (2, 5))
    out = generate(m, prompt, 10, **how)
    with torch.no_grad():
        logits = m(out)[:, 4:-1, :260]  # position t predicts token t + 1
    assert torch.equal(out[:, 5:], logits.argmax(-1))


def test_top_k_and_top_p_restrict_the_support(rng_seed):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50)
    top3 = logits.topk(3, -1).indices
    for _ in range(20):
        ids = sample_next(logits, top_k=3, generator=g)
        assert (top3 == ids[:, None]).any(-1).all()
    # Nucleus: with one id holding 90% of the mass, top_p=0.5 keeps only that id.
    peaked = torch.full((2, 10), -10.0)
    peaked[0, 3] = peaked[1, 7] = 10.0
    peaked[:, 0] = 7.8  # a second id with ~10% of the mass
    for _ in range(20):
        assert sample_next(peaked, top_p=0.5, generator=g).tolist() == [3, 7]
    # ... while top_p=0.999 keeps the second id too (drawn ~10% of the time).
    draws = torch.stack([sample_next(peaked, top_p=0.999, generator=g) for _ in range(200)])
    assert (draws == 0).any()
    # The empirical distribution follows softmax(logits / T).
    probs = torch.softmax(torch.tensor([[1.0, 0.0, -1.0]]) / 0.7, -1)[0]
    draws = sample_next(torch.tensor([[1.0, 0.0, -1.0]]).expand(20000, 3), temperature=0.7, generator=g)
    freq = torch.bincount(draws, minlength=3) / 20000
    assert (freq - probs).abs().max() < 0.015


def test_generate_rejects_bad_arguments():
    m = tiny_lm()
    with pytest.raises(ValueError, match="P >= 1"):
        generate(m, torch.zeros(2, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="CUDA"):
        generate(m, torch.zeros(2, 1, dtype=torch.long), 3, cuda_graph=True)


@pytest.mark.gpu
def test_cuda_graph_decoding_equals_eager():
    m = tiny_lm().cuda()
    prompt = torch.randint(0, 256, (2, 6), device="cuda")
    eager = generate(m, prompt, 16, seed=3, cuda_graph=False)
    graphed = generate(m, prompt, 16, seed=3, cuda_graph=True)
    assert torch.equal(eager, graphed)


def test_decoders_are_reused_across_calls_and_chunks_are_seamless(rng_seed):
    from seqlab.generation import CHUNK, _DECODERS
    m = tiny_lm()
    prompt = torch.randint(0, 256, (2, 3))
    n = 2 * CHUNK + 5  # crosses chunk boundaries
    a = generate(m, prompt, n, temperature=0)
    b = generate(m, prompt, n, temperature=0)
    assert torch.equal(a, b) and len(_DECODERS[m]) == 1
    with torch.no_grad():
        logits = m(a)[:, 2:-1, :260]
    assert torch.equal(a[:, 3:], logits.argmax(-1))  # greedy == argmax of the full forward
    generate(m, prompt, 3, temperature=0.5, seed=1)
    assert len(_DECODERS[m]) == 2  # other sampling settings: another decoder


@pytest.mark.gpu
@pytest.mark.parametrize("how", [dict(temperature=0.0), dict(temperature=1.0),
                                 dict(temperature=0.8, top_p=0.9)])
def test_fused_cuda_graph_decoding_equals_eager(how):
    from seqlab.kernels import last_impl
    torch.manual_seed(0)
    m = MambaLM(MambaConfig(d_model=64, n_layer=3, vocab_size=256), device="cuda",
                dtype=torch.bfloat16)
    prompt = torch.randint(0, 256, (3, 5), device="cuda")
    eager = generate(m, prompt, 40, seed=3, cuda_graph=False, **how)
    assert last_impl("lm_step") in ("fused_triton", "persistent_triton")
    graphed = generate(m, prompt, 40, seed=3, cuda_graph=True, **how)
    again = generate(m, prompt, 40, seed=3, cuda_graph=True, **how)  # replays the cached graph
    assert torch.equal(eager, graphed) and torch.equal(graphed, again)
    assert eager.max() < 256


def test_cached_decoders_do_not_keep_models_alive(rng_seed):
    import gc
    import weakref

    from seqlab.generation import _DECODERS
    m = tiny_lm()
    generate(m, torch.randint(0, 256, (1, 2)), 3, temperature=0)
    ref = weakref.ref(m)
    n = len(_DECODERS)
    del m
    gc.collect()
    assert ref() is None and len(_DECODERS) == n - 1


def test_deadline_cuts_generation_to_a_prefix_of_the_full_sample(rng_seed):
    import time

    from seqlab.generation import CHUNK
    m = tiny_lm()
    prompt = torch.randint(0, 256, (2, 3))
    full = generate(m, prompt, 200, temperature=1.0, seed=5)
    t0 = time.monotonic()
    cut = generate(m, prompt, 10**7, temperature=1.0, seed=5, deadline=t0 + 0.3)
    assert time.monotonic() - t0 < 5.0  # ten million steps would take hours
    n = cut.shape[1] - 3
    assert 1 <= n < 10**7 and (n - 1) % CHUNK == 0  # the prefill's id, then whole chunks
    # The same draws as an uncut call: a cut sample is the beginning of the full one.
    k = min(n, 200)
    assert torch.equal(cut[:, :3 + k], full[:, :3 + k])
    # A deadline already past: the prompt alone comes back.
    assert torch.equal(generate(m, prompt, 50, seed=5, deadline=time.monotonic() - 1.0), prompt)
