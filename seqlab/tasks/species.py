"""Species classification of genome windows (the finetune_species job): the task the trainer
runs, its predictions and report on held-out strains, and the embedding + probe of the test
windows after training."""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from ..data.collate import pad_collate
from ..data.species import SpeciesManifest, SpeciesWindowDataset, species_eval_windows
from ..errors import ConfigError
from ..model import SequenceClassifier
from ..training.checkpoint import load_state
from ..training.pretrained import load_model
from ..training.rundir import RunDir
from ..training.trainer import Task
from ..utils import atomic_write_json, autocast
from ..version import __version__
from .common import load_manifest, model_config, resolve_path
from .embed import PooledBackbone, embed_items
from .embed_inputs import dataset_items
from .embeddings import load_embeddings, save_embeddings, to_embeddings
from .baselines import KMER_KS, kmer_baseline
from .plots import plot_confusion_matrix
from .probe import probe_and_report

log = logging.getLogger("seqlab")


def init_backbone_from(model: torch.nn.Module, path: str | Path) -> None:
    """Copy the backbone weights of the checkpoint ``path`` names (a pretraining run, a step
    folder, a published checkpoint: anything seqlab.training.pretrained opens) into
    ``model``'s backbone; its head stays new."""
    source, info = load_model(resolve_path(path, what="checkpoint"))
    backbone = getattr(source, "backbone", source)  # a bare Backbone is its own backbone
    try:
        load_state(model.backbone, backbone.state_dict(), Path(info["path"]), strict=True)
    except (KeyError, ValueError) as err:
        raise ConfigError(f"init_from={path}: {err.args[0]}; the model.* settings must be "
                          "those of the checkpoint's backbone") from None
    log.info("initialised the backbone from %s", info["path"])


@torch.no_grad()
def predict(model, dataset, device, batch_size: int = 32, amp_dtype=None):
    """Class predictions over a (ids, label) dataset: (y_true, y_pred, probs (n, C))."""
    ys, preds, probs = [], [], []
    for s in range(0, len(dataset), batch_size):
        batch = pad_collate([dataset[i] for i in range(s, min(len(dataset), s + batch_size))])
        batch = batch.to(device)
        with autocast(device, amp_dtype):
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
    """Windows of the manifest's train strains, classified by species; validation and test on
    held-out strains (or regions)."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.mcfg = model_config(cfg)
        self.manifest = load_manifest(cfg)
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
        h = self.cfg.head
        model = SequenceClassifier(self.mcfg, num_classes=len(self.classes), pooling=h.pooling,
                                   conjoin_rc=h.conjoin_rc, device=device)
        if self.cfg.get("init_from"):
            init_backbone_from(model, self.cfg.init_from)
        return model

    def checkpoint_extra(self):
        return {"classes": self.classes, "window": int(self.cfg.data.window)}

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

    def kmer_baseline(self, n_train: int) -> dict:
        """The k-mer logistic regression on this task's split: fit on the first ``n_train``
        training windows the model saw (global indices 0.., as train_batch draws them), k
        chosen on the validation windows, scored on the test windows."""
        n = len(self.train_ds)
        train = ([], [])
        for g in range(n_train):
            label, f, w = self.train_ds.window_at(g % n, epoch=g // n)
            train[0].append(self.manifest.genome(f).ids(w.contig, w.start, w.end, w.strand))
            train[1].append(label)

        def split(ds):
            rows = [ds[i] for i in range(len(ds))]
            return [ids.numpy() for ids, _ in rows], [label for _, label in rows]

        ks = tuple(int(k) for k in self.cfg.baseline.get("ks", KMER_KS))
        return kmer_baseline(train, split(self.val_ds), split(self.test_ds), ks=ks)

    def finish(self, model, run: RunDir, device):
        test = self.test_ds
        y, pred, probs = predict(model, test, device, self.cfg.eval_batch_size)
        rep = classification_report(y, pred, self.classes)
        base = None
        b = self.cfg.get("baseline") or {}
        if b.get("kmer", True):
            n_train = min(int(getattr(self, "samples_seen", 0)) or len(self.train_ds),
                          int(b.get("max_train_windows", 20_000)))
            base = self.kmer_baseline(n_train)
            base_rep = classification_report(y, base.pop("test_pred"), self.classes)
            rep["baseline"] = {"method": f"{base['k']}-mer frequencies + logistic regression "
                                         "(k chosen on validation)", **base,
                               "confusion_matrix": base_rep["confusion_matrix"]}
            run.log({"step": getattr(self, "step", 0), "split": "baseline",
                     "kmer_test_accuracy": base["test_accuracy"]})
            run.log({"step": getattr(self, "step", 0), "split": "test",
                     "test_accuracy": rep["accuracy"]})
            log.info("held-out strains: model %.4f, %d-mer logistic regression %.4f (%d training "
                     "windows)", rep["accuracy"], base["k"], base["test_accuracy"],
                     base["train_windows"])
        atomic_write_json(run.path / "test_report.json", {"split": "test", "n": int(len(y)), **rep})
        title = f"held-out strains: accuracy {rep['accuracy']:.3f}"
        if base is not None:
            title += f" (k-mer baseline {base['test_accuracy']:.3f})"
        cm_png = plot_confusion_matrix(np.array(rep["confusion_matrix"]), self.classes,
                                       run.plots_dir / "confusion_test.png", title=title)
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
        if base is not None:
            summary.update({"baseline_kmer_test_accuracy": base["test_accuracy"],
                            "baseline_kmer_test_macro_f1": base["test_macro_f1"],
                            "baseline_kmer_k": base["k"],
                            "beats_baseline": "yes" if rep["accuracy"] > base["test_accuracy"]
                            else "no"})
        if self.cfg.post.embed_probe:
            summary.update(embed_and_probe(self.cfg, model, self.manifest, test, run, device))
        return summary


def embed_and_probe(cfg, model, manifest: SpeciesManifest, test_ds, run: RunDir,
                    device) -> dict:
    """After fine-tuning: embed the held-out windows (embeddings_test.npz) and cross-validate
    a probe on them (probe_report.json, plots/confusion_probe.png)."""
    pooled = PooledBackbone(model)
    rows = list(embed_items(pooled, dataset_items(test_ds, manifest), device,
                            cfg.eval_batch_size, progress=cfg.trainer.get("progress", True)))
    info = {"checkpoint": str(run.ckpt_dir), "window": int(cfg.data.window),
            "seqlab_version": __version__, "pooling": pooled.pooling, "split": "test"}
    out = save_embeddings(run.path / "embeddings_test.npz", to_embeddings(
        np.stack([v for _, v in rows]), [it.meta for it, _ in rows], list(manifest.species), info))
    res = probe_and_report(load_embeddings(out), cfg.probe, run, "held-out windows")
    return {"embeddings": str(out), **res}


__all__ = ["SpeciesTask", "predict", "classification_report", "init_backbone_from",
           "embed_and_probe"]
