"""The Mamba paper's synthetic tasks (selective copying, induction heads) as a training task,
with the evaluation that judges them: accuracy at the training length and far beyond it.

Accuracy counts only the answer positions (the K markers of selective copying, the final
trigger of induction heads). Evaluation draws from a held-out seed stream.
:func:`answer_logits_full` runs one forward over the whole sequence;
:func:`answer_logits_chunked` runs the model as a recurrence: the input goes through
``backbone(chunk, cache=cache)`` chunk by chunk (a prefill that carries the SSM and conv
state), and the LM head is applied only to the hidden states at answer positions, so memory
depends on the batch and chunk sizes, not on the sequence length.

A :class:`~seqlab.data.synthetic.LengthCurriculum` trains at shorter lengths first; evaluation
always runs at the generator's full length. The stage of a batch follows from its optimizer
step, which the trainer's sample indices determine (see :mod:`seqlab.training.trainer`), so a
resumed run trains at the same lengths.

Free of Hydra / OmegaConf (typed arguments only): the synthetic job builds the task from its
recipe (seqlab.jobs.synthetic), the benchmark from its flags (benchmarks/synthetic.py).
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..data.synthetic import IGNORE_INDEX, LengthCurriculum, SyntheticBatch, SyntheticTask
from ..errors import ConfigError
from ..model import MambaConfig, MambaLM
from ..training.rundir import RunDir
from ..training.trainer import Task
from ..utils import autocast
from .plots import plot_extrapolation

log = logging.getLogger("seqlab")


# ----------------------------------------------------------------------------- task
class SyntheticLMTask(Task):
    """Causal MambaLM trained with cross-entropy on the answer positions only.

    Args:
        gen: the training-stream generator (its seed is the training stream's).
        model_config: the MambaLM's config (causal; vocab_size >= gen.vocab_size).
        eval_seed: seed of the held-out stream every evaluation draws from (not gen.seed).
        samples_per_step: global samples per optimizer step (micro_batch_size * grad_accum *
            world size): the trainer's step s holds indices [s * per_step, (s + 1) * per_step),
            so a batch's first index gives its step and its curriculum stage.
        curriculum: shorter training lengths first (None: always gen.seq_len).
        eval_samples, eval_batch_size: held-out samples per evaluation at the training length.
        extrapolate: factors of gen.seq_len evaluated at the end (1 is always added when any).
        extrapolate_samples, chunk: samples per extrapolation length, and tokens per step of
            the chunked recurrence there.
        precision: the trainer's ("auto" | "bf16" | "fp32"): the extrapolation runs in it.
        data_spec: JSON-able description of the data, stored in every checkpoint's "extra".
    """

    def __init__(self, gen: SyntheticTask, model_config: MambaConfig, eval_seed: int, *,
                 samples_per_step: int, curriculum: LengthCurriculum | None = None,
                 eval_samples: int = 512, eval_batch_size: int = 128,
                 extrapolate: list[int] | tuple[int, ...] = (), extrapolate_samples: int = 64,
                 chunk: int = 4096, precision: str = "auto", data_spec: dict | None = None):
        if eval_seed == gen.seed:
            raise ConfigError(f"data.eval_seed equals data.seed ({gen.seed}); the held-out "
                              "stream must use another seed")
        if model_config.bidirectional:
            raise ConfigError("the synthetic tasks need a causal model; set "
                              "model.bidirectional=false")
        if model_config.vocab_size < gen.vocab_size:
            raise ConfigError(f"model.vocab_size={model_config.vocab_size} is smaller than "
                              f"data.vocab_size={gen.vocab_size}")
        self.gen, self.mcfg, self.curriculum = gen, model_config, curriculum
        self.eval_gen = gen.with_seed(eval_seed)
        self.samples_per_step = int(samples_per_step)
        self.eval_samples, self.eval_batch_size = eval_samples, eval_batch_size
        self.extrapolate_factors = [int(f) for f in extrapolate]
        self.extrapolate_samples, self.chunk = extrapolate_samples, chunk
        self.precision = precision
        self.data_spec = dict(data_spec or {})
        self.last_step = 0

    def build_model(self, device):
        return MambaLM(self.mcfg, device=device)

    def checkpoint_extra(self):
        return {"task": self.data_spec}

    def train_length(self, step: int) -> int:
        """Noise-region / sequence length L trained at optimizer step ``step``."""
        return self.gen.seq_len if self.curriculum is None else self.curriculum.length_at(step)

    def train_batch(self, indices, device):
        indices = list(indices)
        if self.curriculum is None or not indices:
            return self.gen.train_batch(indices, device)
        L = self.train_length(indices[0] // self.samples_per_step)
        gen = self.gen if L == self.gen.seq_len else self.gen.with_length(L)
        return gen.train_batch(indices, device)

    def loss(self, model, batch):
        logits = model(batch.ids).float()  # (B, T, V)
        keep = batch.labels != IGNORE_INDEX
        picked, targets = logits[keep], batch.labels[keep]  # (B*K, V), (B*K,)
        loss = F.cross_entropy(picked, targets)
        acc = (picked.argmax(-1) == targets).float().mean()
        # seq_len: the L trained at (below the full seq_len during a curriculum's early stages).
        seq_len = batch.ids.shape[1] - (self.gen.length - self.gen.seq_len)
        return loss, {"loss": loss.item(), "acc": acc.item(), "seq_len": float(seq_len)}

    def evaluate(self, model, step, device):
        self.last_step = step
        r = evaluate_task(model, self.eval_gen, self.eval_samples, self.eval_batch_size, device)
        return {"val_acc": r["acc"], "val_seq_acc": r["seq_acc"]}

    def extrapolate(self, model, device) -> dict[int, dict[str, float]]:
        """Accuracy at L x factor for factor in 1 + extrapolate, via the chunked recurrence."""
        out = {}
        for f in sorted({1, *self.extrapolate_factors}):
            L = self.gen.seq_len * f
            t0 = time.time()
            gen = self.eval_gen.with_length(L)
            n = self.extrapolate_samples
            r = evaluate_task(model, gen, n, max(1, min(self.eval_batch_size, n)), device,
                              chunk=self.chunk)
            r["seconds"] = time.time() - t0
            out[gen.length] = r
            log.info("extrapolation: length %d (%dx): acc %.4f, all-correct %.4f (%.1f s)",
                     gen.length, f, r["acc"], r["seq_acc"], r["seconds"])
        return out

    def finish(self, model, run: RunDir, device):
        model.eval()
        if not self.extrapolate_factors:
            return {}
        amp = torch.bfloat16 if device.type == "cuda" and self.precision in ("auto", "bf16") \
            else None
        with autocast(device, amp):
            res = self.extrapolate(model, device)
        record = {"step": self.last_step, "split": "extrapolate"}
        for T, r in res.items():
            record[f"acc_len{T}"] = r["acc"]
        run.log(record)
        lengths = sorted(res)
        png = run.plots_dir / "extrapolation.png"
        plot_extrapolation(lengths, [res[T]["acc"] for T in lengths], self.gen.length, png,
                           f"{self.gen.name}: trained at length {self.gen.length}")
        summary = {f"acc_len{T}": res[T]["acc"] for T in lengths}
        summary["extrapolation"] = {str(T): res[T] for T in lengths}
        summary["extrapolation_plot"] = str(png)
        return summary


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


__all__ = ["SyntheticLMTask", "answer_logits_full", "answer_logits_chunked", "accuracy",
           "evaluate_task"]
