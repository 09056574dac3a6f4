"""Evaluation helpers for the synthetic tasks (selective copying, induction heads), free of
Hydra / OmegaConf so that they run where only torch (and numpy) are installed.

Accuracy counts only the answer positions (the K markers of selective copying, the final
trigger of induction heads). :func:`answer_logits_full` runs one forward over the whole
sequence; :func:`answer_logits_chunked` runs the model as a recurrence: the input goes through
``backbone(chunk, cache=cache)`` chunk by chunk (a prefill that carries the SSM and conv state),
and the LM head is applied only to the hidden states at answer positions, so memory depends on
the batch and chunk sizes, not on the sequence length.

Used by the Hydra job (:mod:`seqlab.jobs.synthetic`) and the standalone benchmark
(:mod:`seqlab.bench_synthetic`).
"""
from __future__ import annotations

import numpy as np
import torch

from .data.synthetic import SyntheticBatch, SyntheticTask

__all__ = ["answer_logits_full", "answer_logits_chunked", "accuracy", "evaluate_task",
           "plot_extrapolation"]


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def answer_logits_full(model, batch: SyntheticBatch, device) -> torch.Tensor:
    """One full forward over (B, T): logits at the answer positions, (B, K, V) float32."""
    ids = torch.from_numpy(batch.ids.astype(np.int64)).to(device)
    logits = model(ids)  # (B, T, V)
    pos = torch.from_numpy(batch.positions).to(device)  # (B, K)
    return logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1])).float()


@torch.no_grad()
def answer_logits_chunked(model, batch: SyntheticBatch, device, chunk: int = 2048) -> torch.Tensor:
    """Logits at the answer positions, (B, K, V) float32, in bounded memory.

    The sequence is fed ``chunk`` tokens at a time through ``model.backbone(x, cache=cache)``,
    which continues the recurrence from the cache; ``model.lm_head`` sees only the hidden
    states at answer positions. Peak memory is O(B * chunk) activations whatever T is.
    """
    if chunk < 1:
        raise ValueError(f"answer_logits_chunked: chunk must be >= 1, got {chunk}")
    B, T = batch.ids.shape
    K = batch.positions.shape[1]
    cache = model.allocate_cache(B, device=device)
    out = None
    pos = torch.from_numpy(batch.positions)  # (B, K) on the CPU: only indexes
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        x = torch.from_numpy(batch.ids[:, s:e].astype(np.int64)).to(device)  # (B, c)
        hidden = model.backbone(x, cache=cache)  # (B, c, d_model); cache now at position e
        b_idx, k_idx = torch.nonzero((pos >= s) & (pos < e), as_tuple=True)
        if b_idx.numel() == 0:
            continue
        h = hidden[b_idx.to(device), (pos[b_idx, k_idx] - s).to(device)]  # (n, d_model)
        logits = model.lm_head(h).float()  # (n, V)
        if out is None:
            out = logits.new_zeros(B, K, logits.shape[-1])
        out[b_idx.to(device), k_idx.to(device)] = logits
    if out is None:
        raise ValueError("answer_logits_chunked: the batch has no answer positions")
    return out


def accuracy(logits: torch.Tensor, targets: np.ndarray | torch.Tensor) -> tuple[float, float]:
    """(token accuracy over all answers, fraction of samples with every answer right)."""
    t = torch.as_tensor(targets, device=logits.device)
    hit = logits.argmax(-1) == t  # (B, K)
    return hit.float().mean().item(), hit.all(-1).float().mean().item()


def evaluate_task(model, gen: SyntheticTask, n_samples: int, batch_size: int, device,
                  chunk: int | None = None) -> dict[str, float]:
    """Accuracy of ``model`` on samples 0..n_samples-1 of ``gen``.

    ``chunk`` None: one full forward per batch; else the bounded-memory chunked recurrence.
    Returns {"acc": token accuracy, "seq_acc": all answers right, "n": n_samples}.
    """
    hits, seq_hits = 0.0, 0.0
    for s in range(0, n_samples, batch_size):
        idx = range(s, min(n_samples, s + batch_size))
        b = gen.batch(idx)
        logits = (answer_logits_full(model, b, device) if chunk is None
                  else answer_logits_chunked(model, b, device, chunk))
        acc, seq_acc = accuracy(logits, b.targets)
        hits += acc * len(idx)
        seq_hits += seq_acc * len(idx)
    return {"acc": hits / n_samples, "seq_acc": seq_hits / n_samples, "n": n_samples}


def plot_extrapolation(lengths: list[int], accs: list[float], train_len: int, path,
                       title: str) -> None:
    """Accuracy against sequence length (log x), the training length marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(lengths, accs, marker="o")
    ax.axvline(train_len, color="grey", ls="--", lw=1, label=f"training length {train_len}")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("accuracy (answer positions)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
