"""Multi-scale (SaShiMi-style) backbone: shapes, exact causality, step == forward, generation."""
import json

import pytest
import torch

from seqlab.generation import generate
from seqlab.model import MambaConfig, MambaLM
from seqlab.model import multiscale
from seqlab.model.decode import fused_step_reason


def ms_config(**kw):
    base = dict(d_model=16, n_layer=1, d_state=4, d_conv=4, pool_factors=[2, 2],
                vocab_size=256, scan_impl="torch")
    base.update(kw)
    return MambaConfig(**base)


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_parameter_names_and_flat_unchanged():
    names = {n for n, _ in MambaLM(ms_config()).named_parameters()}
    assert "backbone.down.0.layers.0.mixer.in_proj.weight" in names
    assert "backbone.down.1.layers.0.norm.weight" in names
    assert "backbone.center.layers.0.mixer.A_log" in names
    assert "backbone.up.1.layers.0.mixer.out_proj.weight" in names
    assert {"backbone.pools.0.down.weight", "backbone.pools.1.up.weight"} <= names
    assert "backbone.norm_f.weight" in names and "backbone.embedding.weight" in names
    assert not any(n.startswith("backbone.layers.") for n in names)
    m = MambaLM(ms_config())
    assert m.lm_head.weight is m.backbone.embedding.weight
    # Widths: level i at d_model * 2**i.
    assert m.backbone.center.layers[0].norm.weight.shape == (64,)
    flat = {n for n, _ in MambaLM(ms_config(pool_factors=[], n_layer=2)).named_parameters()}
    assert "backbone.layers.1.mixer.in_proj.weight" in flat


@pytest.mark.parametrize("L", [8, 16, 11, 1, 5])
def test_forward_shapes(L):
    m = MambaLM(ms_config())
    ids = torch.randint(0, 256, (2, L))
    with torch.no_grad():
        out = m(ids)
    assert out.shape == (2, L, 256) and torch.isfinite(out).all()
    # Right padding is after every real position: the prefix's logits do not change.
    with torch.no_grad():
        longer = m(torch.cat([ids, torch.randint(0, 256, (2, 3))], 1))
    torch.testing.assert_close(longer[:, :L], out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pool_factors", [[2, 2], [3, 2]])
def test_exact_causality(pool_factors):
    torch.manual_seed(0)
    m = MambaLM(ms_config(pool_factors=pool_factors)).double()
    bb = m.backbone
    L = 24
    x = torch.randn(1, L, 16, dtype=torch.float64, requires_grad=True)
    y = multiscale._level(bb, 0, x)
    for t in [0, 1, 2, 3, 5, 6, 11, 12, 17, 23]:
        (g,) = torch.autograd.grad(y[0, t].sum(), x, retain_graph=True)
        assert (g[0, t + 1:] == 0).all(), f"output {t} depends on later inputs"
        assert g[0, t].abs().sum() > 0
        if t >= 1:
            assert g[0, :t].abs().sum() > 0


def test_coarse_path_sees_the_current_input():
    """No lag wasted: the pooled path alone carries input t to output t at a group end."""
    torch.manual_seed(0)
    m = MambaLM(ms_config(n_layer=0)).double()  # no blocks: only the pools remain
    bb = m.backbone
    x = torch.randn(1, 8, 16, dtype=torch.float64, requires_grad=True)
    y = multiscale._level(bb, 0, x)
    # With n_layer=0, y = x + unpool(...(pool(x))); output 4 minus its skip depends on x[4].
    (g,) = torch.autograd.grad((y[0, 4] - x[0, 4]).sum(), x)
    assert g[0, 4].abs().sum() > 0 and (g[0, 5:] == 0).all()


@pytest.mark.parametrize("pool_factors,P", [([2, 2], 7), ([3, 2], 5), ([4], 3)])
def test_step_matches_forward(pool_factors, P):
    torch.manual_seed(1)
    m = MambaLM(ms_config(pool_factors=pool_factors)).eval()
    assert fused_step_reason(m, torch.device("cpu")) is not None
    L = 3 * 6 + 1  # > 2 * prod(pool_factors), not a multiple of it
    ids = torch.randint(0, 256, (2, L))
    with torch.no_grad():
        full = m(ids)
        cache = m.allocate_cache(2)
        pre = m(ids[:, :P], cache=cache)
        steps = [m.step(ids[:, t], cache) for t in range(P, L)]
    assert int(cache.pos) == L
    torch.testing.assert_close(pre, full[:, :P], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.stack(steps, 1), full[:, P:], rtol=1e-5, atol=1e-5)


def test_cache_zeroing_restarts():
    torch.manual_seed(2)
    m = MambaLM(ms_config()).eval()
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        cache = m.allocate_cache(1)
        a = m(ids, cache=cache)
        for entry in cache:  # what seqlab.generation does on reset
            for t in entry:
                t.zero_()
        b = m(ids, cache=cache)
    assert torch.equal(a, b)


@pytest.mark.parametrize("how", [dict(temperature=0.0), dict(top_k=1)])
def test_greedy_generate_equals_argmax_of_forward(how):
    torch.manual_seed(3)
    m = MambaLM(ms_config())
    prompt = torch.randint(0, 256, (2, 5))
    out = generate(m, prompt, 14, **how)
    with torch.no_grad():
        logits = m(out)[:, 4:-1, :256]
    assert torch.equal(out[:, 5:], logits.argmax(-1))


def test_generate_deterministic_per_seed():
    torch.manual_seed(4)
    m = MambaLM(ms_config())
    prompt = torch.randint(0, 256, (2, 3))
    a = generate(m, prompt, 10, seed=7)
    b = generate(m, prompt, 10, seed=7)
    c = generate(m, prompt, 10, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, :3], prompt) and a.max() < 256


def test_bidirectional_or_rc_with_pooling_raises():
    with pytest.raises(ValueError, match="pool_factors"):
        ms_config(bidirectional=True)
    with pytest.raises(ValueError, match="pool_factors"):
        ms_config(rc_equivariant=True)
    with pytest.raises(ValueError, match="pool_factors"):
        ms_config(pool_factors=[0])


def test_packing_refused():
    m = MambaLM(ms_config())
    with pytest.raises(ValueError, match="cu_seqlens"):
        m(torch.zeros(1, 8, dtype=torch.long), cu_seqlens=torch.tensor([0, 4, 8]))


def test_train_audio_sashimi_end_to_end(tmp_path):
    from seqlab.cli import compose, run_job
    over = {"model": "audio_sashimi", "model.d_model": 16, "model.n_layer": 1,
            "model.pool_factors": "[2,2]", "data.clip_seconds": 0.0625,
            "trainer.micro_batch_size": 2, "trainer.max_steps": 3, "trainer.warmup_steps": 1,
            "trainer.log_every": 1, "trainer.eval_every": 3, "trainer.ckpt_every": 3,
            "trainer.progress": False, "eval.max_clips": 2, "sample.seconds": 0.01}
    cfg = compose("train_audio", [f"{k}={v}" for k, v in over.items()] + [f"run_dir={tmp_path}"])
    summary = run_job(cfg)
    ckpt = tmp_path / "checkpoints" / (tmp_path / "checkpoints" / "latest").read_text().strip()
    spec = json.loads((ckpt / "config.json").read_text())
    assert spec["model"]["pool_factors"] == [2, 2] and spec["model"]["vocab_size"] == 256
    assert summary["val_bits_per_sample"] > 0
    # generate_audio reloads the checkpoint (multi-scale parameter names) and samples from it.
    gen = run_job(compose("generate_audio", [f"checkpoint={tmp_path}", "n_samples=1", "seconds=0.01",
                                             "progress=false", f"run_dir={tmp_path / 'gen'}"]))
    assert len(gen["wavs"]) == 1


def test_generate_cuda_graph_needs_cuda():
    m = MambaLM(ms_config(pool_factors=[2], n_layer=1))
    with pytest.raises(ValueError, match="CUDA"):
        generate(m, torch.zeros(1, 1, dtype=torch.long), 2, cuda_graph=True)


@pytest.mark.parametrize("pool_factors", [[2, 2], [3, 2]])
def test_position_hint_equals_reading_the_position(pool_factors):
    """A step told its position modulo prod(pool_factors) (what generate() does, and what a
    CUDA graph needs) leaves the cache and returns the logits of a step that reads ``pos``."""
    torch.manual_seed(3)
    m = MambaLM(ms_config(pool_factors=pool_factors)).eval()
    period = 1
    for p in pool_factors:
        period *= p
    ids = torch.randint(0, 256, (2, 3 * period + 2))
    with torch.no_grad():
        read, hinted = m.allocate_cache(2), m.allocate_cache(2)
        for t in range(ids.shape[1]):
            a = m.step(ids[:, t], read)
            hinted.t_hint = t % period
            b = m.step(ids[:, t], hinted)
            assert hinted.t_hint is None  # used once
            assert torch.equal(a, b), t
    for x, y in zip((t for e in read for t in e), (t for e in hinted for t in e)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("pool_factors,P", [([2, 2], 1), ([2, 2], 3), ([3, 2], 5)])
def test_greedy_generation_equals_full_forward(pool_factors, P):
    """generate() over several chunks (whole periods long: 16 steps for [2, 2], 18 for [3, 2])
    from prompts of different phases equals argmax decoding with the full forward."""
    from seqlab.generation import _DECODERS
    torch.manual_seed(4)
    m = MambaLM(ms_config(pool_factors=pool_factors)).double().eval()
    prompt = torch.randint(0, 256, (2, P))
    out = generate(m, prompt, 40, temperature=0)
    assert next(iter(_DECODERS[m].values())).steps == (16 if pool_factors == [2, 2] else 18)
    with torch.no_grad():
        logits = m(out)[:, P - 1:-1, :256]
    assert torch.equal(out[:, P:], logits.argmax(-1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("how", [dict(temperature=0.0), dict(temperature=1.0)])
def test_cuda_graph_generation_equals_eager(how):
    """One graph per starting phase (prompts of 1 and 3 positions: phases 1 and 3 of 4),
    captured lazily and replayed; samples equal the eager decoder's for the same seed."""
    from seqlab.generation import _DECODERS
    torch.manual_seed(5)
    m = MambaLM(ms_config(pool_factors=[2, 2], scan_impl="auto", d_model=32), device="cuda")
    for P in (1, 3, 1):
        prompt = torch.randint(0, 256, (2, P), device="cuda")
        eager = generate(m, prompt, 50, seed=11, cuda_graph=False, **how)
        graphed = generate(m, prompt, 50, seed=11, cuda_graph=True, **how)
        assert torch.equal(eager, graphed), P
    graphed_decoders = [d for d in _DECODERS[m].values() if d.cuda_graph]
    assert sorted(graphed_decoders[0].graphs) == [1, 3]
