"""The audio language model (the train_audio job): a causal Mamba LM over 8-bit mu-law codes,
its data, loss and held-out scoring. Sampling from it (the end-of-training sample, the
generate_audio job) is in seqlab.tasks.audio_sampling.

The model sees the codes of a clip shifted right by one (position 0 sees ZERO_CODE, the code
of silence) and predicts every code 0..255 of the clip, as in the Mamba paper's SC09 and
YouTubeMix experiments. The model's vocabulary is exactly the 256 codes (``model.vocab_size:
256``): no special ids are needed, and sampling can never produce an id that is not a code.
Generation starts from the same ZERO_CODE, so an unconditional sample is drawn exactly the way
training clips were scored; a prompt is ZERO_CODE followed by the prompt's codes.

Held-out negative log-likelihood is reported in bits per sample (nats / ln 2), averaged over
real (non-padding) samples; 8 bits is a uniform guess over the 256 codes. ``eval.mode: clips``
scores the held-out clips as training sees them (the first clip of each file, or crops);
``eval.mode: files`` scores each held-out file whole, streamed from disk and through the model
chunk by chunk with the recurrent state carried over (:func:`file_nll`), so memory follows
``eval.chunk_seconds``, not the length of the longest file.

Every code the model sees is made the one way training made it (mono, resampled, peak-normalised
with ``data.normalize``, encoded); the checkpoint's ``extra.audio`` entry records how, and
generate_audio encodes prompts by it.

With ``trainer.max_minutes`` the whole job keeps to the budget: training steps get all but
``sample.budget_share`` of it, and the end-of-training sample stops at the job's deadline,
written shorter (the summary says so) or not at all.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from ..data.audio import (AudioClipDataset, AudioRecord, SkippedFile, load_manifest,
                          log_skipped, scan_audio_folder, split_files, stream_codes,
                          write_skipped)
from ..data.mulaw import NUM_CODES
from ..errors import ConfigError, DataError
from ..model import MambaLM
from ..training.rundir import RunDir
from ..training.trainer import Task
from ..utils import length_mask
from .audio_sampling import sample_codes, write_samples
from .baselines import audio_baselines
from .common import model_config, resolve_path

log = logging.getLogger("seqlab")

IGNORE = -100  # cross_entropy's ignore_index: targets at padding positions
SKIPPED_NAME = "skipped_files.csv"  # in the run directory: audio files of data.source not used


# ----------------------------------------------------------------------------- data
@dataclass
class AudioBatch:
    """ids (B, T) int64 model inputs; targets (B, T) int64 codes; lengths (B,) real samples."""

    ids: torch.Tensor
    targets: torch.Tensor
    lengths: torch.Tensor

    def to(self, device) -> "AudioBatch":
        return AudioBatch(self.ids.to(device), self.targets.to(device), self.lengths.to(device))


def collate_clips(clips) -> AudioBatch:
    """AudioClip items (all of one length T) -> AudioBatch."""
    return AudioBatch(torch.stack([c.inputs for c in clips]), torch.stack([c.targets for c in clips]),
                      torch.stack([c.length for c in clips]))


def audio_records(source: str | Path, fractions, seed: int
                  ) -> tuple[list[AudioRecord], list[SkippedFile]]:
    """Records of a folder or manifest, each with a split (train and valid never empty), and
    the audio files of a folder that were skipped (unreadable, empty, a format libsndfile does
    not read; see seqlab.data.audio.scan_audio_folder). A manifest names its files, so one it
    names that cannot be read is an error at load, not a skip.

    Entries without a split (a plain folder, or a manifest with no split column) are split by
    speaker with ``fractions`` (train, valid, test) and ``seed``, so no voice is in two splits.
    """
    path = resolve_path(source, what="audio source")
    skipped: list[SkippedFile] = []
    if path.is_dir():
        records, skipped = scan_audio_folder(path)
    elif path.suffix.lower() in (".yaml", ".yml", ".csv"):
        records = load_manifest(path)
    else:
        raise ConfigError(f"seqlab train_audio: data.source={source!r} is neither a folder of audio "
                          "files nor a manifest (.yaml/.yml/.csv); a single file cannot be split "
                          "into train and valid speakers")
    if any(r.split is None for r in records):
        parts = split_files(records, by="speaker", fractions=tuple(fractions), seed=seed)
        records = [AudioRecord(r.path, r.speaker, split, r.label, r.text, r.extra)
                   for split, rs in parts.items() for r in rs]
    for split in ("train", "valid"):
        if not any(r.split == split for r in records):
            raise DataError(f"seqlab train_audio: data.source={source!r} has no {split!r} files "
                            f"(splits found: {sorted({r.split for r in records})}); give the "
                            f"manifest a {split} split or set data.split_fractions")
    return records, skipped


# ----------------------------------------------------------------------------- loss
def code_nll(model, batch: AudioBatch) -> tuple[torch.Tensor, int]:
    """Mean next-code NLL in nats over the real samples of ``batch``, and their count.

    logits (B, T, V_padded); positions t >= lengths[b] are padding and carry no loss.
    """
    logits = model(batch.ids, lengths=batch.lengths)  # (B, T, V)
    pad = ~length_mask(batch.lengths, batch.ids.shape[1])  # (B, T)
    targets = batch.targets.masked_fill(pad, IGNORE)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE)
    return loss, int((~pad).sum())


@torch.no_grad()
def bits_per_sample(model, dataset: AudioClipDataset, n_items: int, batch_size: int,
                    device) -> float:
    """Held-out NLL in bits per real sample over items 0..n_items-1 (crops of epoch 0).

    Runs under the caller's autocast (the trainer's precision)."""
    total, count = 0.0, 0
    for s in range(0, n_items, batch_size):
        batch = collate_clips([dataset.clip(i, epoch=0)
                               for i in range(s, min(n_items, s + batch_size))]).to(device)
        loss, n = code_nll(model, batch)
        total += loss.item() * n
        count += n
    return total / max(count, 1) / math.log(2)


@torch.no_grad()
def file_nll(model, blocks: Iterable[torch.Tensor], start_code: int, chunk: int,
             device) -> tuple[float, int]:
    """Summed next-code NLL in nats of one whole file, and its number of codes.

    The file's codes arrive in blocks of any length (seqlab.data.audio.stream_codes) and go
    through the model ``chunk`` positions at a time; the model's decoding cache carries the
    recurrent state (conv and SSM states) from one chunk to the next, so the sum equals one
    pass over the whole file (tests/test_audio_scoring.py) while memory follows ``chunk``.
    Position 0 sees ``start_code``, as in training. Runs under the caller's autocast.

    Args:
        model: a causal model with ``allocate_cache`` / ``forward(ids, cache=...)`` (MambaLM).
        blocks: int64 (n_i,) codes, in file order.
        start_code: the input at position 0 (the encoding's zero-level code).
        chunk: positions per forward pass (>= 1).
    """
    if chunk < 1:
        raise ConfigError(f"file_nll: chunk={chunk} positions; must be >= 1")
    cache = model.allocate_cache(1)
    prev = torch.full((1,), start_code, dtype=torch.long, device=device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for block in blocks:
        block = block.to(device=device, dtype=torch.long)
        for s in range(0, block.numel(), chunk):
            targets = block[s:s + chunk]  # (L,)
            inputs = torch.cat([prev, targets[:-1]])  # (L,): shifted right across the chunk edge
            logits = model(inputs[None], cache=cache)[0]  # (L, V)
            total += F.cross_entropy(logits.float(), targets, reduction="sum").double()
            count += targets.numel()
            prev = targets[-1:]
    return float(total), count


def files_bits_per_sample(model, records: list[AudioRecord], rate: int, encoding: str,
                          normalize: bool, chunk_seconds: float, start_code: int, device) -> float:
    """Held-out NLL in bits per sample over whole files, each streamed from disk
    (seqlab.data.audio.stream_codes) through :func:`file_nll`: memory follows
    ``chunk_seconds``, not the files."""
    chunk = max(1, int(round(chunk_seconds * rate)))
    total, count = 0.0, 0
    for r in records:
        nats, n = file_nll(model, stream_codes(r.path, rate, encoding, normalize), start_code,
                           chunk, device)
        total += nats
        count += n
    return total / max(count, 1) / math.log(2)


# ----------------------------------------------------------------------------- training
class AudioLMTask(Task):
    """Next-code prediction on fixed-length clips (``data.mode: pad``, one per file, SC09-like)
    or random crops (``data.mode: crop``, ``data.crops_per_file`` per file per epoch)."""

    def __init__(self, cfg: DictConfig, started: float | None = None):
        """``started``: the job's start, a time.monotonic() value (default: now); with
        ``trainer.max_minutes`` the end-of-training sample stops at started + max_minutes."""
        self.cfg = cfg
        self.started = time.monotonic() if started is None else started
        budget = float(cfg.trainer.get("max_minutes") or 0.0)
        self.deadline = self.started + 60.0 * budget if budget > 0 else None
        self.mcfg = model_config(cfg)
        if self.mcfg.vocab_size != NUM_CODES:
            raise ConfigError(f"seqlab train_audio: model.vocab_size={self.mcfg.vocab_size}; an audio "
                              f"model predicts exactly the {NUM_CODES} codes, set model.vocab_size="
                              f"{NUM_CODES}")
        if self.mcfg.bidirectional:
            raise ConfigError("seqlab train_audio: model.bidirectional=true cannot generate audio; "
                              "use a causal model (model.bidirectional=false)")
        self.eval_mode = str(cfg.eval.get("mode", "clips"))
        if self.eval_mode not in ("clips", "files"):
            raise ConfigError(f"seqlab train_audio: eval.mode={self.eval_mode!r}; use clips (held-out "
                              "clips as training sees them) or files (whole files, streamed)")
        d = cfg.data
        records, self.skipped = audio_records(d.source, d.split_fractions, cfg.trainer.seed)
        if self.skipped:
            log_skipped(self.skipped, d.source,
                        Path(cfg.run_dir) / SKIPPED_NAME if cfg.get("run_dir") else None)
        common = dict(rate=d.rate, clip_seconds=d.clip_seconds, mode=d.mode, encoding=d.encoding,
                      normalize=d.normalize, seed=cfg.trainer.seed)
        self.train_ds = AudioClipDataset(records, split="train", crops_per_file=d.crops_per_file,
                                         **common)
        self.valid_records = [r for r in records if r.split == "valid"]
        self.test_records = [r for r in records if r.split == "test"]
        # Files mode streams held-out files from disk at each evaluation: nothing held in memory.
        self.valid_ds = (AudioClipDataset(records, split="valid", **common)
                         if self.eval_mode == "clips" else None)
        log.info("train_audio: %d train files (%d speakers), %d valid files (%d speakers), "
                 "clips of %d samples at %d Hz", len(self.train_ds.records),
                 len(self.train_ds.speakers), len(self.valid_records),
                 len({r.speaker for r in self.valid_records}), self.train_ds.clip_samples, d.rate)

    def build_model(self, device):
        return MambaLM(self.mcfg, device=device)

    def checkpoint_extra(self):
        """The ``audio`` entry says how training made codes from a file (mono mix, resampling
        to ``rate``, ``normalize``: peak-normalised per file, ``encoding``) and the code that
        starts every sequence; generate_audio encodes prompts the same way."""
        d = self.cfg.data
        return {"audio": {"rate": int(d.rate), "encoding": str(d.encoding),
                          "normalize": bool(d.normalize), "clip_seconds": float(d.clip_seconds),
                          "start_code": self.train_ds.zero_code}}

    def train_batch(self, indices, device):
        n = len(self.train_ds)
        # Index g is item g % n of epoch g // n: a crop is a pure function of (seed, epoch, item).
        return collate_clips([self.train_ds.clip(g % n, epoch=g // n) for g in indices]).to(device)

    def loss(self, model, batch):
        loss, _ = code_nll(model, batch)
        return loss, {"loss": loss.item(), "bits_per_sample": loss.item() / math.log(2)}

    def _n_eval(self, ds) -> int:
        limit = self.cfg.eval.max_clips
        return len(ds) if not limit else min(len(ds), int(limit))

    def _held_out_bits(self, model, split: str, device) -> float:
        e, d = self.cfg.eval, self.cfg.data
        if self.eval_mode == "files":
            records = self.valid_records if split == "valid" else self.test_records
            limit = int(e.get("max_files") or 0)
            return files_bits_per_sample(model, records[:limit] if limit else records, int(d.rate),
                                         str(d.encoding), bool(d.normalize),
                                         float(e.get("chunk_seconds", 1.0)),
                                         self.train_ds.zero_code, device)
        ds = self.valid_ds if split == "valid" else AudioClipDataset(
            self.test_records, split="test", rate=d.rate, clip_seconds=d.clip_seconds,
            mode=d.mode, encoding=d.encoding, normalize=d.normalize, seed=self.cfg.trainer.seed)
        return bits_per_sample(model, ds, self._n_eval(ds), e.batch_size, device)

    def evaluate(self, model, step, device):
        return {"val_bits_per_sample": self._held_out_bits(model, "valid", device)}

    def _held_out_codes(self, split: str) -> np.ndarray:
        """The codes :meth:`_held_out_bits` scores for ``split``, as one uint8 stream: the
        whole files (files mode) or the real samples of the scored clips (clips mode)."""
        e, d = self.cfg.eval, self.cfg.data
        if self.eval_mode == "files":
            records = self.valid_records if split == "valid" else self.test_records
            limit = int(e.get("max_files") or 0)
            parts = [b.numpy() for r in (records[:limit] if limit else records)
                     for b in stream_codes(r.path, int(d.rate), str(d.encoding), bool(d.normalize))]
        else:
            ds = self.valid_ds if split == "valid" else AudioClipDataset(
                self.test_records, split="test", rate=d.rate, clip_seconds=d.clip_seconds,
                mode=d.mode, encoding=d.encoding, normalize=d.normalize,
                seed=self.cfg.trainer.seed)
            parts = []
            for i in range(self._n_eval(ds)):
                clip = ds.clip(i, epoch=0)
                parts.append(clip.targets[:int(clip.length)].numpy())
        return np.concatenate(parts).astype(np.uint8) if parts else np.zeros(0, np.uint8)

    def _baselines(self, run: RunDir, split: str, model_bits: float) -> dict:
        """xz and the order-2 context model on the same held-out codes as ``model_bits``.

        Both see the codes as one stream (they adapt across clips and files; the model starts
        each clip or file from its initial state), so the comparison favours them."""
        base = audio_baselines(self._held_out_codes(split))
        run.log({"step": getattr(self, "step", 0), "split": "baseline",
                 "xz_bits_per_sample": base["xz_bits_per_sample"],
                 "context2_bits_per_sample": base["context2_bits_per_sample"]})
        run.log({"step": getattr(self, "step", 0), "split": "test",
                 f"{split}_bits_per_sample": model_bits})
        best = min(base["xz_bits_per_sample"], base["context2_bits_per_sample"])
        log.info("held-out %s: model %.3f bits/sample, xz -9 %.3f, order-2 context model %.3f "
                 "(%d samples)", split, model_bits, base["xz_bits_per_sample"],
                 base["context2_bits_per_sample"], base["baseline_samples"])
        return {"baseline_xz_bits_per_sample": base["xz_bits_per_sample"],
                "baseline_context2_bits_per_sample": base["context2_bits_per_sample"],
                "baseline_split": split, "baseline_samples": base["baseline_samples"],
                "beats_baseline": "yes" if model_bits < best else "no"}

    def finish(self, model, run: RunDir, device):
        out: dict = {}
        if self.skipped:
            out["skipped_files"] = len(self.skipped)
            out["skipped_list"] = str(write_skipped(self.skipped, run.path / SKIPPED_NAME))
        split = "test" if self.test_records else "valid"
        bits = self._held_out_bits(model, split, device)
        out[f"{split}_bits_per_sample"] = bits
        if (self.cfg.get("baseline") or {}).get("enabled", True):
            out.update(self._baselines(run, split, bits))
        if self.cfg.sample.seconds > 0:
            out.update(self._final_sample(model, run, device))
        return out

    def _final_sample(self, model, run: RunDir, device) -> dict:
        """The end-of-training sample, cut at the job's deadline (``trainer.max_minutes``)."""
        g, d = self.cfg.sample, self.cfg.data
        want = int(round(g.seconds * d.rate))
        budget = f"trainer.max_minutes={self.cfg.trainer.max_minutes}"
        later = (f"sample it with `seqlab run generate_audio checkpoint={run.path} "
                 f"seconds={g.seconds} n_samples=1`")
        if self.deadline is not None and time.monotonic() >= self.deadline:
            note = f"{budget} was spent before the end-of-training sample; none was written: {later}"
            log.warning("train_audio: %s", note)
            return {"sample_skipped": note}
        codes, stats = sample_codes(model, n=1, new_samples=want, start_code=self.train_ds.zero_code,
                                    prompt_codes=None, temperature=g.temperature, top_p=g.top_p,
                                    seed=g.seed, device=device, progress=False,
                                    source=str(run.ckpt_dir), deadline=self.deadline)
        got = codes.shape[1]
        if got == 0:
            note = f"{budget} ran out before the first sample was drawn; none was written: {later}"
            log.warning("train_audio: %s", note)
            return {"sample_skipped": note}
        paths = write_samples(codes, d.encoding, d.rate, run.path / "samples", prompt_len=0,
                              title="train_audio sample")
        out = {"sample_wav": str(paths[0][0]), "sample_plot": str(paths[0][1]),
               "sample_seconds": got / d.rate, "sample_samples_per_s": stats["samples_per_s"]}
        if got < want:
            out["sample_cut"] = (f"{got} of {want} samples ({got / d.rate:.3f} of {g.seconds} s): "
                                 f"{budget} ran out at {stats['samples_per_s']:.0f} samples/s; "
                                 f"{later}")
            log.warning("train_audio: end-of-training sample cut at %s", out["sample_cut"])
        return out


__all__ = ["AudioBatch", "collate_clips", "audio_records", "code_nll", "bits_per_sample",
           "file_nll", "files_bits_per_sample", "AudioLMTask", "SKIPPED_NAME"]
