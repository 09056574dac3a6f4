"""Batched autoregressive sampling from a causal model with the cache protocol.

The model must provide ``allocate_cache(batch, dtype)``, ``forward(ids, cache=cache)``
(prefill, returns logits (batch, P, V)) and ``step(ids_t, cache, for_graph=False)`` (returns
logits (batch, V); ``for_graph=True`` marks the calls made for a CUDA-graph capture and its
warm-up, so that a model can pick the step that is fastest when replayed);
:class:`seqlab.model.MambaLM` does. A model may also offer ``step_and_pick`` (the step and the
pick of the next id in one launch, MambaLM's persistent step), used where it accepts. Decoding
costs O(1) per token: one ``step`` on fixed-size states, never a pass over the prefix.

Sampling is Gumbel-max: the next id is argmax(logits / temperature + g) with g standard Gumbel
noise drawn from the call's seeded generator, which samples exactly softmax(logits /
temperature) (restricted by top_k / top_p) and needs no random-number generation inside the
decoding loop. Tokens are decoded in chunks of ``CHUNK`` steps; on CUDA a chunk (model steps,
picks, token writes) is one CUDA graph, captured once per (model, batch, sampling settings)
and reused by later calls, which removes the per-kernel launch overhead that dominates
small-batch decoding.

A multi-scale model (``config.pool_factors``) steps its coarser levels only at some positions:
which ones depends on the position modulo the product of the pool factors (its period). Its
chunks are a whole number of periods long, so every chunk of a call starts at the same phase,
and a graph is captured per starting phase (the prompt length modulo the period) the first time
it is needed; the decoder tells the step each position (``MultiScaleCache.t_hint``), so the
step never reads the position back from the GPU.

A ``deadline`` (a ``time.monotonic()`` value) bounds the wall-clock time of a call: decoding
stops after the first chunk that ends past it, and the ids made so far come back (a shorter
output), so a caller with a time budget gets what fitted in it.
"""
from __future__ import annotations

import math
import time
import weakref
from collections import OrderedDict

import torch
import torch.nn as nn

from seqlab.progress import progress as progress_bar

Tensor = torch.Tensor


CHUNK = 16  # decoding steps per chunk (one CUDA graph replay)
_MAX_CACHED = 4  # decoders (graphs + caches) kept per model
_DECODERS: "weakref.WeakKeyDictionary[nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()


def gumbel_noise(shape, generator: torch.Generator | None, device) -> Tensor:
    """Standard Gumbel samples -log(-log(U)), float32, drawn from ``generator``."""
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    return u.clamp_(1e-20, 1.0 - 1e-7).log_().neg_().log_().neg_()


def restrict(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """-inf outside the top_k most likely ids and outside the nucleus of mass top_p (the
    smallest set of most likely ids whose probability reaches top_p; the best id stays)."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop an id when the mass before it already reaches top_p.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _greedy(temperature: float, top_k: int) -> bool:
    return temperature == 0 or top_k == 1


def pick(logits: Tensor, noise: Tensor | None, temperature: float = 1.0, top_k: int = 0,
         top_p: float = 1.0) -> Tensor:
    """Next ids (batch,) long from logits (batch, V) and Gumbel noise (batch, V) (None when
    greedy): argmax(restrict(logits * (1 / temperature)) + noise)."""
    if _greedy(temperature, top_k):
        return logits.argmax(-1)
    x = restrict(logits.float() * (1.0 / temperature), top_k, top_p)
    return (x + noise).argmax(-1)


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """logits (batch, V) -> next ids (batch,) long. Greedy when temperature == 0 or top_k == 1.

    top_k > 0 keeps the k most likely ids; top_p < 1 keeps the smallest set of most likely ids
    whose probability reaches top_p (nucleus sampling; the most likely id is always kept).
    """
    noise = None if _greedy(temperature, top_k) else gumbel_noise(logits.shape, generator,
                                                                  logits.device)
    return pick(logits, noise, temperature, top_k, top_p)


class _Decoder:
    """Fixed buffers (cache, current ids, noise, chunk output) and, on CUDA, the CUDA graphs of
    one chunk of decoding steps over them (one per starting phase; a flat model has one)."""

    def __init__(self, model: nn.Module, batch: int, dtype, device, vocab: int,
                 temperature: float, top_k: int, top_p: float, cuda_graph: bool):
        # A weak reference: _DECODERS is keyed weakly by the model, and a strong one here
        # would keep every model that ever generated alive.
        self._model, self.vocab = weakref.ref(model), vocab
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        # A multi-scale model's step repeats its structure every prod(pool_factors) positions
        # (its period); a flat model's every position.
        factors = getattr(getattr(model, "config", None), "pool_factors", None) or []
        self.multiscale = bool(factors)
        self.period = math.prod(int(p) for p in factors)
        self.steps = -(-CHUNK // self.period) * self.period  # whole periods per chunk
        self.cache = model.allocate_cache(batch, dtype)
        self.pos = 0  # positions the cache has taken (set by generate() after the prefill)
        self.ids = torch.zeros(batch, dtype=torch.long, device=device)
        self.out = torch.zeros(batch, self.steps, dtype=torch.long, device=device)
        self.noise = None if _greedy(temperature, top_k) else \
            torch.zeros(self.steps, batch, vocab, dtype=torch.float32, device=device)
        # One launch per pick on CUDA when no top-k / top-p masking is asked for.
        self.fused_pick = device.type == "cuda" and top_k == 0 and top_p >= 1.0
        self.cuda_graph = cuda_graph
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}  # starting phase -> graph

    def _capture(self, phase: int) -> "torch.cuda.CUDAGraph":
        """Capture one chunk starting at ``phase``. The warm-up run (it compiles the kernels)
        advances the cache and the current ids, so both are restored afterwards."""
        state = [t for layer in self.cache for t in layer] + [self.ids]
        saved = [t.clone() for t in state]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._steps(self.steps, phase, for_graph=True)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._steps(self.steps, phase, for_graph=True)
        for dst, src in zip(state, saved):
            dst.copy_(src)
        return graph

    def _steps(self, n: int, phase: int, for_graph: bool = False):
        """n decoding steps from position phase (mod the period); ``for_graph``: they are
        being captured into a CUDA graph (or are its warm-up)."""
        model = self._model()
        step_and_pick = getattr(model, "step_and_pick", None) if self.fused_pick else None
        if self.fused_pick:  # CUDA only: the import needs Triton
            from seqlab.kernels.decode import pick_step
        for s in range(n):
            if self.multiscale:
                self.cache.t_hint = (phase + s) % self.period
            noise = None if self.noise is None else self.noise[s]
            inv = 1.0 if self.noise is None else 1.0 / self.temperature
            if step_and_pick is not None and step_and_pick(
                    self.ids, self.cache, noise, inv, self.out, s, self.vocab, for_graph):
                continue  # step and pick in one launch (the persistent step)
            logits = model.step(self.ids, self.cache, for_graph=for_graph)
            if self.fused_pick:
                pick_step(logits, noise, inv, self.ids, self.out, s, self.vocab)
            else:
                nxt = pick(logits[:, :self.vocab], noise, self.temperature, self.top_k, self.top_p)
                self.out[:, s] = nxt
                self.ids.copy_(nxt)

    def reset(self):
        for layer in self.cache:
            for t in layer:
                t.zero_()
        self.pos = 0

    def chunk(self, gen: torch.Generator, n: int | None = None) -> Tensor:
        """Advance n <= self.steps steps from self.ids (a graph always runs self.steps) and
        return the (batch, self.steps) picked ids, of which the first n are valid (a view,
        reused)."""
        n = self.steps if n is None else n
        phase = self.pos % self.period
        if self.cuda_graph and phase not in self.graphs:
            self.graphs[phase] = self._capture(phase)
        if self.noise is not None:
            self.noise.copy_(gumbel_noise(self.noise.shape, gen, self.noise.device))
        if self.cuda_graph:
            self.graphs[phase].replay()
            self.pos += self.steps
        else:
            self._steps(n, phase)
            self.pos += n
        return self.out


def _decoder(model, batch, dtype, device, vocab, temperature, top_k, top_p, cuda_graph) -> _Decoder:
    """A cached decoder for these settings (graphs are captured once, then replayed)."""
    params = tuple(p.data_ptr() for p in model.parameters())  # a moved/reloaded model recaptures
    config = getattr(model, "config", None)
    # a captured graph holds one step path: the settings that choose it are part of the key
    key = (batch, dtype, str(device), vocab, float(temperature), int(top_k), float(top_p),
           bool(cuda_graph), getattr(config, "scan_impl", None), params,
           getattr(config, "decode_step", None))
    per_model = _DECODERS.setdefault(model, OrderedDict())
    dec = per_model.get(key)
    if dec is None:
        dec = _Decoder(model, batch, dtype, device, vocab, temperature, top_k, top_p, cuda_graph)
        per_model[key] = dec
        while len(per_model) > _MAX_CACHED:
            per_model.popitem(last=False)
    per_model.move_to_end(key)
    return dec


@torch.inference_mode()
def generate(model: nn.Module, prompt_ids: Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             cuda_graph: bool | str = "auto", progress: bool = False,
             deadline: float | None = None) -> Tensor:
    """Sample continuations of a batch of prompts.

    Args:
        model: causal model with the cache protocol (e.g. MambaLM); put in eval mode here.
        prompt_ids: (batch, P) long, P >= 1 (start from BOS 258 for an unconditional sample).
        max_new_tokens: tokens to append.
        temperature, top_k, top_p: see :func:`sample_next`; temperature 0 or top_k 1 is greedy.
        seed: seeds a private torch.Generator, so equal seeds give equal samples (on one
            device; eager and CUDA-graph decoding draw the same noise).
        cuda_graph: "auto" (on for CUDA tensors), True, or False.
        progress: report progress over the new tokens (seqlab.progress).
        deadline: a ``time.monotonic()`` value, or None for no limit. Checked before the
            prefill and after every chunk (on CUDA after synchronising, so the clock sees
            the work done, not the work queued): once past it, decoding stops.

    Returns:
        (batch, P + n) long: the prompts followed by the sampled ids, n = max_new_tokens, or
        fewer when the deadline passed first (n = 0 if it had passed before the prefill).
        Only ids below ``model.config.vocab_size`` are sampled (the padded vocabulary rows
        never are).
    """
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] < 1:
        raise ValueError(f"generate: prompt_ids must be (batch, P) with P >= 1, got shape "
                         f"{tuple(prompt_ids.shape)}; start from the BOS id 258 for no prompt")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be >= 0")
    if temperature < 0:
        raise ValueError(f"generate: temperature={temperature} must be >= 0")
    device = prompt_ids.device
    if cuda_graph == "auto":
        cuda_graph = device.type == "cuda"
    elif cuda_graph and device.type != "cuda":
        raise ValueError(f"generate: cuda_graph=True needs CUDA tensors, prompt is on {device}")

    model.eval()
    batch, P = prompt_ids.shape
    out = torch.empty(batch, P + max_new_tokens, dtype=torch.long, device=device)
    out[:, :P] = prompt_ids
    if max_new_tokens == 0:
        return out

    def past_deadline() -> bool:
        if deadline is None:
            return False
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.monotonic() >= deadline

    if past_deadline():
        return out[:, :P]
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)

    config = getattr(model, "config", None)
    dtype = next(model.parameters()).dtype
    vocab = getattr(config, "vocab_size", None)
    if vocab is None:
        raise ValueError("generate: the model needs config.vocab_size")
    bar = progress_bar(total=max_new_tokens, desc="generate", unit="token", enabled=progress)
    dec = _decoder(model, batch, dtype, device, vocab, temperature, top_k, top_p, bool(cuda_graph))
    dec.reset()
    # The first new id comes from the prefill's last logits; the rest from chunks of steps.
    logits = model(prompt_ids, cache=dec.cache)[:, -1, :vocab]
    dec.pos = P
    noise = None if _greedy(temperature, top_k) else gumbel_noise(logits.shape, gen, device)
    first = pick(logits, noise, temperature, top_k, top_p)
    out[:, P] = first
    dec.ids.copy_(first)
    bar.update(1)
    done = 1
    while done < max_new_tokens and not past_deadline():
        n = min(dec.steps, max_new_tokens - done)
        out[:, P + done:P + done + n] = dec.chunk(gen, n)[:, :n]
        done += n
        bar.update(n)
    bar.close()
    return out if done == max_new_tokens else out[:, :P + done]
