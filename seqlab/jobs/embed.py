"""Job `embed`: manifest windows, FASTA tiles or BED intervals -> an embeddings file, through
any checkpoint the one loader opens (a finetune_species or pretrain_dna run, a step folder, a
save_model folder)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from ..errors import ConfigError, DataError
from ..tasks.common import resolve_path
from ..tasks.embed import PooledBackbone, embed_items
from ..tasks.embed_inputs import SkipReport, embed_inputs, where
from ..tasks.embeddings import save_embeddings, to_embeddings
from ..training.pretrained import load_model
from ..utils import resolve_device
from ..version import __version__
from .common import print_summary, tracked_run

log = logging.getLogger("seqlab")

# Architectures with a backbone to pool (a bare Backbone has no .backbone to call).
EMBEDDABLE = ("SequenceClassifier", "MambaLM", "MaskedLM")


def _positive(cfg, key: str, optional: bool) -> int | None:
    value = cfg.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"seqlab embed: {key}={value!r} must be a positive integer"
                          + (" or null" if optional else ""))
    return value


def embed(cfg: DictConfig) -> dict:
    with tracked_run(cfg) as (run, summary):
        batch_size = _positive(cfg, "batch_size", optional=False)
        chunk = _positive(cfg, "chunk", optional=True)
        max_tokens = _positive(cfg, "max_tokens", optional=True)
        out = Path(cfg.get("output") or run.path / "embeddings.npz")
        if out.exists():
            # Removed up front so that a run that fails leaves no complete-looking output.
            log.info("embed: removing the previous %s", out)
            out.unlink()
        device = resolve_device(cfg.get("device", "auto"))
        model, info = load_model(resolve_path(cfg.checkpoint, what="checkpoint"), device)
        if info["architecture"] not in EMBEDDABLE:
            raise ConfigError(f"seqlab embed: {info['path']} holds a {info['architecture']}; "
                              f"embed supports {', '.join(EMBEDDABLE)} checkpoints")
        extra = info["extra"]
        src = embed_inputs(cfg.data, extra.get("window"))
        if not src.items:
            raise DataError(f"{src.what}: no {src.unit} to embed")
        classes = src.classes or list(extra.get("classes") or [])
        pooled = PooledBackbone(model)
        skips = SkipReport()
        vecs, metas = [], []
        for item, vec in embed_items(pooled, src.items, device, batch_size, chunk,
                                     max_tokens=max_tokens, max_n_frac=src.max_n_frac,
                                     progress=cfg.get("progress", True), on_skip=skips):
            vecs.append(vec)
            metas.append(item.meta)
        skipped_tsv = run.path / "skipped.tsv"
        skips.write(skipped_tsv)
        counts = skips.counts()
        summary.update({"n": len(vecs), "skipped": len(skips.rows),
                        **{f"skipped_{k}": v for k, v in counts.items()}})
        if not vecs:
            first = skips.rows[0]
            raise DataError(f"{src.what}: nothing embedded: all {len(src.items)} {src.unit} were "
                            f"skipped ({', '.join(f'{v} {k}' for k, v in counts.items())}); "
                            f"e.g. {where(first.item.meta)}: {first.detail}. "
                            f"The list is in {skipped_tsv}")
        provenance = {"checkpoint": info["path"], "window": src.window,
                      "seqlab_version": __version__, "architecture": info["architecture"],
                      "pooling": pooled.pooling, "input": src.what, "chunk": chunk,
                      "skipped": len(skips.rows)}
        save_embeddings(out, to_embeddings(np.stack(vecs), metas, classes, provenance))
        summary.update({"embeddings": str(out), "dim": int(vecs[0].shape[0]),
                        "skipped_list": str(skipped_tsv)})
    print_summary("embed", summary, run)
    return summary
