"""Byte-level pretraining on FASTA windows (the pretrain_dna job): next-byte prediction for a
causal model, masked-byte prediction for a bidirectional one."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from ..data.alphabet import PAD_ID
from ..data.collate import pad_collate
from ..data.genome import Genome
from ..data.windows import contig_intervals, sample_window, tile_windows
from ..errors import DataError
from ..model import MambaLM, MaskedLM, mask_tokens
from ..training.trainer import Task
from .common import load_manifest, model_config, resolve_path


class DNAPretrainTask(Task):
    """Next-byte (causal) or masked (bidirectional) pretraining on FASTA windows.

    Data: the train split of a species manifest (``data.manifest``) or every contig of the
    FASTA files in ``data.fasta``; validation on the manifest's val split, or on a fixed set
    of windows from the files.
    """

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.mcfg = model_config(cfg)
        self.objective = "mlm" if self.mcfg.bidirectional else "clm"
        d = cfg.data
        self.sources: list[tuple[Genome, list]] = []
        val_sources: list[tuple[Genome, list]] = []
        if d.get("manifest"):
            man = load_manifest(cfg)
            for split, dest in (("train", self.sources), ("val", val_sources)):
                for parts in man.split_files(split).values():
                    for f, ivs in parts:
                        ivs = [iv for iv in ivs if len(iv) >= d.window]
                        if ivs:
                            dest.append((man.genome(f), ivs))
        for path in d.get("fasta") or []:
            g = Genome(resolve_path(path, what="FASTA"), fold_case=bool(d.get("fold_case", True)))
            self.sources.append((g, [iv for iv in contig_intervals(g) if len(iv) >= d.window]))
        self.sources = [(g, ivs) for g, ivs in self.sources if ivs]
        if not self.sources:
            raise DataError(f"pretrain_dna found no sequence of at least {d.window} bp "
                            "(set data.manifest or data.fasta, or a shorter data.window)")
        self.weights = np.array([sum(len(iv) for iv in ivs) for _, ivs in self.sources], float)
        self.weights /= self.weights.sum()
        self.val = []
        for g, ivs in (val_sources or self.sources[:1]):
            for w in tile_windows(ivs, d.window, None, g, d.max_n_frac)[:d.eval_windows]:
                self.val.append(g.ids(w.contig, w.start, w.end))

    def build_model(self, device):
        cls = MaskedLM if self.objective == "mlm" else MambaLM
        return cls(self.mcfg, device=device)

    def checkpoint_extra(self):
        return {"window": int(self.cfg.data.window)}

    def train_batch(self, indices, device):
        d = self.cfg.data
        items = []
        for g in indices:
            rng = np.random.default_rng([self.cfg.trainer.seed, g])
            k = int(rng.choice(len(self.sources), p=self.weights))
            genome, ivs = self.sources[k]
            w = sample_window(ivs, d.window, rng, genome, d.max_n_frac,
                              rc_prob=0.5 if d.rc_augment else 0.0)
            items.append(torch.from_numpy(genome.ids(w.contig, w.start, w.end, w.strand)
                                          .astype(np.int64)))
        return pad_collate(items).to(device)

    def _loss(self, model, ids, lengths, gen=None):
        if self.objective == "clm":
            logits = model(ids, lengths=lengths).float()
            targets = ids[:, 1:].masked_fill(ids[:, 1:] == PAD_ID, -100)
            return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                   targets.reshape(-1), ignore_index=-100)
        inputs, labels = mask_tokens(ids, lengths, generator=gen)
        logits = model(inputs, lengths=lengths).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=-100)

    def loss(self, model, batch):
        loss = self._loss(model, batch.ids, batch.lengths)
        return loss, {"loss": loss.item(), "bits_per_base": loss.item() / np.log(2)}

    def evaluate(self, model, step, device):
        total, n = 0.0, 0
        gen = torch.Generator(device=device).manual_seed(1234)
        for s in range(0, len(self.val), self.cfg.eval_batch_size):
            b = pad_collate([torch.from_numpy(x.astype(np.int64))
                             for x in self.val[s:s + self.cfg.eval_batch_size]]).to(device)
            total += self._loss(model, b.ids, b.lengths, gen).item() * len(b)
            n += len(b)
        loss = total / max(n, 1)
        return {"val_loss": loss, "val_bits_per_base": loss / np.log(2)}


__all__ = ["DNAPretrainTask"]
