"""The Mamba paper's synthetic tasks as a job: train a causal MambaLM on selective copying or
induction heads, then measure accuracy at the training length and far beyond it.

Accuracy counts only the answer positions (the K markers of selective copying, the final
trigger of induction heads). Evaluation draws from a held-out seed stream (``data.eval_seed``).
The length-extrapolation evaluation runs the model as a recurrence: the input goes through
``backbone(chunk, cache=cache)`` chunk by chunk (a prefill that carries the SSM and conv state),
and the LM head is applied only to the hidden states at answer positions, so memory depends on
the batch and chunk sizes, not on the sequence length.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from ..data.synthetic import IGNORE_INDEX, SyntheticBatch, SyntheticTask, make_task
from ..train import RunDir, Task
from .common import make_trainer, model_config, print_summary

log = logging.getLogger("seqlab")


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


# ----------------------------------------------------------------------------- task
def generator_from_config(cfg: DictConfig) -> SyntheticTask:
    """The training-stream generator named by ``data.task`` with the remaining data keys."""
    d = OmegaConf.to_container(cfg.data, resolve=True)
    name = d.pop("task")
    d.pop("eval_seed", None)
    try:
        return make_task(name, **d)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"seqlab: invalid `data` config for the synthetic job: {exc}") from exc


class SyntheticLMTask(Task):
    """Causal MambaLM trained with cross-entropy on the answer positions only."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.gen = generator_from_config(cfg)
        if cfg.data.eval_seed == self.gen.seed:
            raise SystemExit(f"seqlab: data.eval_seed equals data.seed ({self.gen.seed}); the "
                             "held-out stream must use another seed")
        self.eval_gen = self.gen.with_seed(cfg.data.eval_seed)
        self.mcfg = model_config(cfg)
        if self.mcfg.bidirectional:
            raise SystemExit("seqlab: the synthetic tasks need a causal model; set "
                             "model.bidirectional=false")
        if self.mcfg.vocab_size < self.gen.vocab_size:
            raise SystemExit(f"seqlab: model.vocab_size={self.mcfg.vocab_size} is smaller than "
                             f"data.vocab_size={self.gen.vocab_size}")
        self.last_step = 0

    def build_model(self, device):
        from ..model import MambaLM
        return MambaLM(self.mcfg, device=device)

    def model_spec(self):
        return {"architecture": "MambaLM", "model": self.mcfg.to_dict(),
                "task": OmegaConf.to_container(self.cfg.data, resolve=True)}

    def train_batch(self, indices, device):
        return self.gen.train_batch(indices, device)

    def loss(self, model, batch):
        logits = model(batch.ids).float()  # (B, T, V)
        keep = batch.labels != IGNORE_INDEX
        picked, targets = logits[keep], batch.labels[keep]  # (B*K, V), (B*K,)
        loss = F.cross_entropy(picked, targets)
        acc = (picked.argmax(-1) == targets).float().mean()
        return loss, {"loss": loss.item(), "acc": acc.item()}

    def evaluate(self, model, step, device):
        self.last_step = step
        e = self.cfg.eval
        r = evaluate_task(model, self.eval_gen, e.n_samples, e.batch_size, device)
        return {"val_acc": r["acc"], "val_seq_acc": r["seq_acc"]}

    def extrapolate(self, model, device) -> dict[int, dict[str, float]]:
        """Accuracy at L x factor for factor in 1 + eval.extrapolate, via the chunked recurrence."""
        e = self.cfg.eval
        factors = sorted({1, *[int(f) for f in e.extrapolate]})
        out = {}
        for f in factors:
            L = self.gen.seq_len * f
            t0 = time.time()
            gen = self.eval_gen.with_length(L)
            r = evaluate_task(model, gen, e.extrapolate_samples,
                              max(1, min(e.batch_size, e.extrapolate_samples)), device,
                              chunk=e.chunk)
            r["seconds"] = time.time() - t0
            out[gen.length] = r
            log.info("extrapolation: length %d (%dx): acc %.4f, all-correct %.4f (%.1f s)",
                     gen.length, f, r["acc"], r["seq_acc"], r["seconds"])
        return out

    def finish(self, model, run: RunDir, device):
        model.eval()
        if not self.cfg.eval.extrapolate:
            return {}
        amp = torch.bfloat16 if (device.type == "cuda"
                                 and self.cfg.trainer.precision in ("auto", "bf16")) else None
        ctx = (torch.autocast(device.type, dtype=amp) if amp is not None
               else torch.autocast(device.type, enabled=False))
        with ctx:
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


def train_synthetic(cfg: DictConfig) -> dict:
    trainer = make_trainer(cfg)
    summary = trainer.fit(SyntheticLMTask(cfg), resume=cfg.get("resume", True))
    if trainer.dist.is_main:
        print_summary(f"synthetic {cfg.data.task}", summary, trainer.run)
        for key in ("training_plot", "extrapolation_plot"):
            if key in summary:
                print(f"plot: {summary[key]}")
    return summary
