"""Batched autoregressive sampling from a causal model with the cache protocol.

The model must provide ``allocate_cache(batch, dtype)``, ``forward(ids, cache=cache)``
(prefill, returns logits (batch, P, V)) and ``step(ids_t, cache)`` (returns logits (batch, V));
:class:`seqlab.model.MambaLM` does. Decoding costs O(1) per token: one ``step`` on fixed-size
states, never a pass over the prefix. On CUDA the step is captured once as a CUDA graph and
replayed, which removes the per-kernel launch overhead that dominates small-batch decoding.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from tqdm.auto import tqdm

Tensor = torch.Tensor


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """logits (batch, V) -> next ids (batch,) long. Greedy when temperature == 0 or top_k == 1.

    top_k > 0 keeps the k most likely ids; top_p < 1 keeps the smallest set of most likely ids
    whose probability reaches top_p (nucleus sampling; the most likely id is always kept).
    """
    if temperature == 0 or top_k == 1:
        return logits.argmax(-1)
    logits = logits.float() / temperature
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
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _GraphedStep:
    """The model's step captured as a CUDA graph on static input/output/cache buffers."""

    def __init__(self, model: nn.Module, cache: list, ids_t: Tensor, warmup: int = 2):
        self.ids = ids_t.clone()
        # Warm-up runs execute for real and would advance the cache: save and restore it.
        saved = [t.clone() for layer in cache for t in layer]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                model.step(self.ids, cache)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model.step(self.ids, cache)
        for dst, src in zip((t for layer in cache for t in layer), saved):
            dst.copy_(src)

    def __call__(self, ids_t: Tensor) -> Tensor:
        self.ids.copy_(ids_t)
        self.graph.replay()
        return self.logits


@torch.inference_mode()
def generate(model: nn.Module, prompt_ids: Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             cuda_graph: bool | str = "auto", progress: bool = False) -> Tensor:
    """Sample continuations of a batch of prompts.

    Args:
        model: causal model with the cache protocol (e.g. MambaLM); put in eval mode here.
        prompt_ids: (batch, P) long, P >= 1 (start from BOS 258 for an unconditional sample).
        max_new_tokens: tokens to append.
        temperature, top_k, top_p: see :func:`sample_next`; temperature 0 or top_k 1 is greedy.
        seed: seeds a private torch.Generator, so equal seeds give equal samples.
        cuda_graph: "auto" (on for CUDA tensors), True, or False.
        progress: show a tqdm bar over the new tokens.

    Returns:
        (batch, P + max_new_tokens) long: the prompts followed by the sampled ids. Only ids
        below ``model.config.vocab_size`` are sampled (the padded vocabulary rows never are).
    """
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] < 1:
        raise ValueError(f"generate: prompt_ids must be (batch, P) with P >= 1, got shape "
                         f"{tuple(prompt_ids.shape)}; start from the BOS id 258 for no prompt")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be >= 0")
    device = prompt_ids.device
    if cuda_graph == "auto":
        cuda_graph = device.type == "cuda"
    elif cuda_graph and device.type != "cuda":
        raise ValueError(f"generate: cuda_graph=True needs CUDA tensors, prompt is on {device}")
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)

    model.eval()
    batch, P = prompt_ids.shape
    out = torch.empty(batch, P + max_new_tokens, dtype=torch.long, device=device)
    out[:, :P] = prompt_ids
    if max_new_tokens == 0:
        return out
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)

    dtype = next(model.parameters()).dtype
    cache = model.allocate_cache(batch, dtype)
    logits = model(prompt_ids, cache=cache)[:, -1]  # (batch, V)
    stepper = None
    for t in tqdm(range(max_new_tokens), disable=not progress, desc="generate"):
        if vocab is not None:
            logits = logits[:, :vocab]
        nxt = sample_next(logits, temperature, top_k, top_p, gen)
        out[:, P + t] = nxt
        if t == max_new_tokens - 1:
            break
        if cuda_graph:
            if stepper is None:
                stepper = _GraphedStep(model, cache, nxt)
            logits = stepper(nxt)
        else:
            logits = model.step(nxt, cache)
    return out
