"""DNA jobs: species classification (finetune_species) and byte-level pretraining (pretrain_dna)."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from ..data.alphabet import PAD_ID
from ..data.collate import pad_collate
from ..data.genome import Genome
from ..data.species import SpeciesManifest, SpeciesWindowDataset, species_eval_windows
from ..data.windows import contig_intervals, sample_window, tile_windows
from ..plots import plot_confusion_matrix
from ..train import RunDir, Task, load_weights
from .common import fit, model_config, print_summary, resolve_path

log = logging.getLogger("seqlab")


def _load_manifest(cfg) -> SpeciesManifest:
    path = resolve_path(cfg.data.manifest, what="species manifest")
    return SpeciesManifest.load(path, fold_case=bool(cfg.data.get("fold_case", True)))


def _checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint directory from a run directory, its checkpoints/ folder or a step folder."""
    p = resolve_path(path, what="checkpoint")
    for cand in (p, p / "checkpoints"):
        if (cand / "latest").exists():
            return cand / (cand / "latest").read_text().strip()
    if (p / "model.safetensors").exists():
        return p
    raise SystemExit(f"seqlab: {p} holds no checkpoint (model.safetensors or checkpoints/latest)")


def init_backbone_from(model: torch.nn.Module, path: str | Path) -> None:
    """Copy ``backbone.*`` weights from a pretraining checkpoint into ``model`` (heads stay new)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    ckpt = _checkpoint_dir(path) / "model.safetensors"
    state = load_file(str(ckpt))
    with safe_open(str(ckpt), framework="pt") as f:
        for k, src in json.loads((f.metadata() or {}).get("ties", "{}")).items():
            state[k] = state[src]
    bb = {k: v for k, v in state.items() if k.startswith("backbone.")}
    if not bb:
        raise SystemExit(f"seqlab: {ckpt} has no backbone.* weights to initialise from")
    missing, unexpected = model.load_state_dict(bb, strict=False)
    missing_bb = [k for k in missing if k.startswith("backbone.")]
    if missing_bb or unexpected:
        raise SystemExit(f"seqlab: {ckpt} does not fit this model's backbone: missing "
                         f"{missing_bb[:8]}, unexpected {unexpected[:8]} (check model.* settings)")
    log.info("initialised the backbone from %s", ckpt)


@torch.no_grad()
def predict(model, dataset, device, batch_size: int = 32, amp_dtype=None):
    """Class predictions over a (ids, label) dataset: (y_true, y_pred, probs (n, C))."""
    ys, preds, probs = [], [], []
    for s in range(0, len(dataset), batch_size):
        batch = pad_collate([dataset[i] for i in range(s, min(len(dataset), s + batch_size))])
        batch = batch.to(device)
        ctx = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
               else torch.autocast(device.type, enabled=False))
        with ctx:
            logits = model(batch.ids, batch.lengths).float()
        p = logits.softmax(-1)
        ys.append(batch.labels.cpu())
        preds.append(p.argmax(-1).cpu())
        probs.append(p.cpu())
    return torch.cat(ys).numpy(), torch.cat(preds).numpy(), torch.cat(probs).numpy()


def classification_report(y, pred, classes: list[str]) -> dict:
    from sklearn.metrics import (accuracy_score, confusion_matrix, f1_score,
                                 precision_recall_fscore_support)
    labels = list(range(len(classes)))
    p, r, f, n = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                          "support": int(n[i])} for i, c in enumerate(classes)},
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
    }


class SpeciesTask(Task):
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.mcfg = model_config(cfg)
        self.manifest = _load_manifest(cfg)
        d = cfg.data
        self.train_ds = SpeciesWindowDataset(self.manifest, "train", window=d.window,
                                             seed=cfg.trainer.seed, rc_augment=d.rc_augment,
                                             max_n_frac=d.max_n_frac)
        self.val_ds = species_eval_windows(self.manifest, "val", window=d.window,
                                           stride=d.get("eval_stride"),
                                           max_per_species=d.eval_max_per_species,
                                           max_n_frac=d.max_n_frac)
        # Built now, so that a manifest without test data stops before training, not after.
        self.test_ds = species_eval_windows(self.manifest, "test", window=d.window,
                                            stride=d.get("eval_stride"),
                                            max_per_species=d.test_max_per_species,
                                            max_n_frac=d.max_n_frac)
        self.classes = list(self.manifest.species)

    def build_model(self, device):
        from ..model import SequenceClassifier
        h = self.cfg.head
        model = SequenceClassifier(self.mcfg, num_classes=len(self.classes), pooling=h.pooling,
                                   conjoin_rc=h.conjoin_rc, device=device)
        if self.cfg.get("init_from"):
            init_backbone_from(model, self.cfg.init_from)
        return model

    def model_spec(self):
        h = self.cfg.head
        return {"architecture": "SequenceClassifier", "model": self.mcfg.to_dict(),
                "num_classes": len(self.classes), "pooling": h.pooling,
                "conjoin_rc": bool(h.conjoin_rc), "classes": self.classes,
                "window": int(self.cfg.data.window)}

    def train_batch(self, indices, device):
        n = len(self.train_ds)
        items = []
        for g in indices:
            label, f, w = self.train_ds.window_at(g % n, epoch=g // n)
            ids = self.manifest.genome(f).ids(w.contig, w.start, w.end, w.strand)
            items.append((torch.from_numpy(ids.astype(np.int64)), label))
        return pad_collate(items).to(device)

    def loss(self, model, batch):
        logits = model(batch.ids, batch.lengths).float()
        loss = F.cross_entropy(logits, batch.labels)
        acc = (logits.argmax(-1) == batch.labels).float().mean()
        return loss, {"loss": loss.item(), "acc": acc.item()}

    def evaluate(self, model, step, device):
        y, pred, _ = predict(model, self.val_ds, device, self.cfg.eval_batch_size)
        rep = classification_report(y, pred, self.classes)
        return {"val_accuracy": rep["accuracy"], "val_macro_f1": rep["macro_f1"]}

    def finish(self, model, run: RunDir, device):
        test = self.test_ds
        y, pred, probs = predict(model, test, device, self.cfg.eval_batch_size)
        rep = classification_report(y, pred, self.classes)
        out = run.path / "test_report.json"
        from ..utils import atomic_write_json
        atomic_write_json(out, {"split": "test", "n": int(len(y)), **rep})
        cm_png = plot_confusion_matrix(np.array(rep["confusion_matrix"]), self.classes,
                                       run.plots_dir / "confusion_test.png",
                                       title=f"held-out strains: accuracy {rep['accuracy']:.3f}")
        with open(run.path / "test_predictions.csv", "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["species", "file", "contig", "start", "end", "strand", "predicted",
                         *[f"p_{c}" for c in self.classes]])
            for i in range(len(test)):
                m = test.meta(i)
                wr.writerow([m["species"], m["file"], m["contig"], m["start"], m["end"],
                             m["strand"], self.classes[pred[i]],
                             *[f"{p:.4f}" for p in probs[i]]])
        summary = {"test_accuracy": rep["accuracy"], "test_macro_f1": rep["macro_f1"],
                   "test_windows": int(len(y)), "confusion_plot": str(cm_png)}
        if self.cfg.post.embed_probe:
            from .embed import embed_and_probe_species
            summary.update(embed_and_probe_species(self.cfg, model, self.manifest, test, run,
                                                   device))
        return summary


def finetune_species(cfg: DictConfig) -> dict:
    summary, trainer = fit(cfg, SpeciesTask)
    if trainer.dist.is_main:
        print_summary("finetune_species", summary, trainer.run)
        for key in ("training_plot", "confusion_plot", "probe_plot"):
            if key in summary:
                print(f"plot: {summary[key]}")
    return summary


# ----------------------------------------------------------------------------- pretraining
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
            man = _load_manifest(cfg)
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
            raise SystemExit(f"seqlab: pretrain_dna found no sequence of at least {d.window} bp "
                             "(set data.manifest or data.fasta, or a shorter data.window)")
        self.weights = np.array([sum(len(iv) for iv in ivs) for _, ivs in self.sources], float)
        self.weights /= self.weights.sum()
        self.val = []
        for g, ivs in (val_sources or self.sources[:1]):
            for w in tile_windows(ivs, d.window, None, g, d.max_n_frac)[:d.eval_windows]:
                self.val.append(g.ids(w.contig, w.start, w.end))

    def build_model(self, device):
        from ..model import MambaLM, MaskedLM
        cls = MaskedLM if self.objective == "mlm" else MambaLM
        return cls(self.mcfg, device=device)

    def model_spec(self):
        return {"architecture": "MaskedLM" if self.objective == "mlm" else "MambaLM",
                "model": self.mcfg.to_dict(), "window": int(self.cfg.data.window)}

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
        from ..model.heads import mask_tokens
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


def pretrain_dna(cfg: DictConfig) -> dict:
    summary, trainer = fit(cfg, DNAPretrainTask)
    if trainer.dist.is_main:
        print_summary("pretrain_dna", summary, trainer.run)
    return summary
