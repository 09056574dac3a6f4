"""The Mamba paper's synthetic tasks as a job: train a causal MambaLM on selective copying or
induction heads, then measure accuracy at the training length and far beyond it.

Accuracy counts only the answer positions (the K markers of selective copying, the final
trigger of induction heads). Evaluation draws from a held-out seed stream (``data.eval_seed``).
The length-extrapolation evaluation runs the model as a recurrence: the input goes through
``backbone(chunk, cache=cache)`` chunk by chunk (a prefill that carries the SSM and conv state),
and the LM head is applied only to the hidden states at answer positions, so memory depends on
the batch and chunk sizes, not on the sequence length.

``data.curriculum`` ([[from_step, seq_len], ...], default null) trains at shorter lengths first
(:class:`seqlab.data.synthetic.LengthCurriculum`); evaluation always runs at ``data.seq_len``.
The stage of a batch follows from its optimizer step, which the trainer's sample indices
determine (see :mod:`seqlab.train`), so a resumed run trains at the same lengths.
"""
from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from ..data.synthetic import (IGNORE_INDEX, LengthCurriculum, SyntheticTask, make_curriculum,
                               make_task)
# The evaluation helpers live in seqlab.synthetic_eval (no Hydra / OmegaConf imports there);
# they are re-exported here for existing callers.
from ..synthetic_eval import (accuracy, answer_logits_chunked, answer_logits_full,  # noqa: F401
                              evaluate_task, plot_extrapolation)
from .. import distributed as D
from ..train import RunDir, Task
from .common import fit, model_config, print_summary, trainer_config

log = logging.getLogger("seqlab")


# ----------------------------------------------------------------------------- task
def generator_from_config(cfg: DictConfig) -> SyntheticTask:
    """The training-stream generator named by ``data.task`` with the remaining data keys."""
    d = OmegaConf.to_container(cfg.data, resolve=True)
    name = d.pop("task")
    d.pop("eval_seed", None)
    d.pop("curriculum", None)
    try:
        return make_task(name, **d)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"seqlab: invalid `data` config for the synthetic job: {exc}") from exc


def curriculum_from_config(cfg: DictConfig, gen: SyntheticTask) -> LengthCurriculum | None:
    """``data.curriculum`` validated against the full-length generator (None when unset)."""
    spec = cfg.data.get("curriculum", None)
    if OmegaConf.is_config(spec):
        spec = OmegaConf.to_container(spec, resolve=True)
    try:
        return make_curriculum(spec, gen)
    except ValueError as exc:
        raise SystemExit(f"seqlab: invalid `data` config for the synthetic job: {exc}") from exc


class SyntheticLMTask(Task):
    """Causal MambaLM trained with cross-entropy on the answer positions only."""

    def __init__(self, cfg: DictConfig, world_size: int = 1):
        self.cfg = cfg
        self.gen = generator_from_config(cfg)
        self.curriculum = curriculum_from_config(cfg, self.gen)
        # Samples per optimizer step: the trainer's step s holds global indices
        # [s * per_step, (s + 1) * per_step), so a batch's first index gives its step.
        t = trainer_config(cfg)  # the trainer's own defaults for keys the recipe leaves out
        self.samples_per_step = t.micro_batch_size * t.grad_accum * int(world_size)
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
        # seq_len: the L trained at (below data.seq_len during a curriculum's early stages).
        seq_len = batch.ids.shape[1] - (self.gen.length - self.gen.seq_len)
        return loss, {"loss": loss.item(), "acc": acc.item(), "seq_len": float(seq_len)}

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
    # fit() joins the process group before it builds the task, so the world size is known.
    summary, trainer = fit(cfg, lambda c: SyntheticLMTask(c, world_size=D.world_size()))
    if trainer.dist.is_main:
        print_summary(f"synthetic {cfg.data.task}", summary, trainer.run)
        for key in ("training_plot", "extrapolation_plot"):
            if key in summary:
                print(f"plot: {summary[key]}")
    return summary
