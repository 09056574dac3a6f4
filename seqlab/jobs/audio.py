"""Audio jobs: `train_audio` (a causal Mamba LM over 8-bit mu-law codes) and `generate_audio`
(sample waveforms from a trained run, unconditionally or continuing a WAV prompt).

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
with ``data.normalize``, encoded); the checkpoint's ``audio`` entry records how, and
generate_audio encodes prompts by it.

With ``trainer.max_minutes`` the whole job keeps to the budget: training steps get all but
``sample.budget_share`` of it, and the end-of-training sample stops at the job's deadline,
written shorter (the summary says so) or not at all.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from ..audio_io import read_audio, resample, save_spectrogram_png, to_mono, write_wav
from ..data.audio import (AudioClipDataset, AudioRecord, SkippedFile, encoder, load_manifest,
                          log_skipped, peak_normalize, scan_audio_folder, split_files,
                          stream_codes, write_skipped)
from ..data.mulaw import NUM_CODES, linear_decode, mulaw_decode
from ..errors import ConfigError, DataError
from ..train import RunDir, Task
from ..utils import resolve_device
from .common import make_trainer, model_config, print_summary, resolve_path, tracked_run

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


def audio_records(source: str | Path, fractions, seed: int) -> tuple[list[AudioRecord], list[SkippedFile]]:
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


def _decode(encoding: str):
    return mulaw_decode if encoding == "mulaw" else linear_decode


# ----------------------------------------------------------------------------- loss
def code_nll(model, batch: AudioBatch) -> tuple[torch.Tensor, int]:
    """Mean next-code NLL in nats over the real samples of ``batch``, and their count.

    logits (B, T, V_padded); positions t >= lengths[b] are padding and carry no loss.
    """
    logits = model(batch.ids, lengths=batch.lengths)  # (B, T, V)
    T = batch.ids.shape[1]
    pad = torch.arange(T, device=batch.ids.device)[None, :] >= batch.lengths[:, None]  # (B, T)
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
        from ..model import MambaLM
        return MambaLM(self.mcfg, device=device)

    def model_spec(self):
        """config.json's ``audio`` entry says how training made codes from a file (mono mix,
        resampling to ``rate``, ``normalize``: peak-normalised per file, ``encoding``) and the
        code that starts every sequence; generate_audio encodes prompts the same way."""
        d = self.cfg.data
        return {"architecture": "MambaLM", "model": self.mcfg.to_dict(),
                "audio": {"rate": int(d.rate), "encoding": str(d.encoding),
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

    def finish(self, model, run: RunDir, device):
        out: dict = {}
        if self.skipped:
            out["skipped_files"] = len(self.skipped)
            out["skipped_list"] = str(write_skipped(self.skipped, run.path / SKIPPED_NAME))
        if self.test_records:
            out["test_bits_per_sample"] = self._held_out_bits(model, "test", device)
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


def _set_cpu_threads(cfg: DictConfig) -> None:
    # Small models on shared or busy cores: intra-op threads mostly wait on each other
    # (measured 800 vs 25,000 tokens/s for 2 threads vs 1 on 2 busy cores).
    n = int(cfg.get("cpu_threads") or 0)
    if n > 0:
        torch.set_num_threads(n)


def _sample_share(cfg: DictConfig) -> float:
    """The share of ``trainer.max_minutes`` kept from training steps for the sample."""
    if not (cfg.trainer.get("max_minutes") and cfg.sample.seconds > 0):
        return 0.0
    share = float(cfg.sample.get("budget_share", 0.1))
    if not 0.0 <= share < 1.0:
        raise ConfigError(f"seqlab train_audio: sample.budget_share={share}; use a share of "
                          "trainer.max_minutes in [0, 1)")
    return share


def train_audio(cfg: DictConfig) -> dict:
    started = time.monotonic()
    _set_cpu_threads(cfg)
    share = _sample_share(cfg)
    trainer = make_trainer(cfg)
    if share:
        # Training steps stop early enough to leave the sample its share of the job's budget;
        # config.yaml keeps the max_minutes the user gave, the deadline of the whole job.
        trainer.cfg = dataclasses.replace(trainer.cfg,
                                          max_minutes=trainer.cfg.max_minutes * (1.0 - share))
    # The lock first (as jobs.common.fit): a second run on this run_dir stops before loading data.
    trainer.run.acquire()
    try:
        task = AudioLMTask(cfg, started=started)
    except BaseException:
        trainer.run.abandon()
        raise
    summary = trainer.fit(task, resume=cfg.get("resume", True))
    if trainer.dist.is_main:
        print_summary("train_audio", summary, trainer.run)
        for key in ("training_plot", "sample_wav", "sample_plot", "sample_cut", "sample_skipped",
                    "skipped_list"):
            if key in summary:
                print(f"{key}: {summary[key]}")
    return summary


# ----------------------------------------------------------------------------- generation
def load_prompt(path: str | Path, rate: int, encoding: str, max_seconds: float,
                seconds: float | None = None, normalize: bool = False) -> torch.Tensor:
    """A prompt file -> codes (P,) int64, made as training made codes from its files: read,
    mix to mono, resample to ``rate``, peak-normalise the whole file if ``normalize`` (as
    ``data.normalize`` did), encode.

    ``seconds`` keeps only the prompt's beginning (after normalising by the whole file's peak,
    as a training crop is). Raises MissingInput / AudioFileError for a missing, empty or
    corrupt file, and ConfigError when the prompt used is longer than ``max_seconds``; each
    message names the file and the value.
    """
    path = Path(path)
    wave, file_rate = read_audio(path)  # names the file on every failure
    wave = resample(to_mono(wave), file_rate, rate)[0]  # (n,) float32 at the model's rate
    if normalize:
        wave = peak_normalize(wave)
    if seconds is not None:
        if seconds <= 0:
            raise ConfigError(f"{path}: prompt_seconds={seconds} must be positive (or null for "
                              "the whole file)")
        wave = wave[:int(round(seconds * rate))]
    used = wave.numel() / rate
    if max_seconds and used > max_seconds:
        raise ConfigError(f"{path}: the prompt is {used:.2f} s long ({wave.numel()} samples at "
                          f"{rate} Hz), more than max_prompt_seconds={max_seconds}; cut it with "
                          f"prompt_seconds=<s> or raise max_prompt_seconds")
    if wave.numel() == 0:
        raise ConfigError(f"{path}: prompt_seconds={seconds} leaves no sample of the prompt")
    return encoder(encoding)(wave)


def prompt_normalize(cfg: DictConfig, audio: dict, config_path: Path) -> bool:
    """Whether prompts are peak-normalised: ``prompt_normalize`` when set, else what the
    checkpoint's training did (``audio.normalize``). A checkpoint written before that was
    recorded gets the old behaviour (no normalisation) and a warning."""
    if cfg.get("prompt_normalize") is not None:
        return bool(cfg.prompt_normalize)
    if "normalize" in audio:
        return bool(audio["normalize"])
    log.warning("generate_audio: %s does not record whether training peak-normalised its audio "
                "(audio.normalize, written by newer train_audio runs); the prompt is encoded "
                "without normalisation. If the run trained with data.normalize=true (the "
                "train_audio default), pass prompt_normalize=true", config_path)
    return False


def sample_codes(model, n: int, new_samples: int, start_code: int, prompt_codes, temperature: float,
                 top_p: float, seed: int | None, device, progress: bool, top_k: int = 0,
                 cuda_graph: bool | str = "auto", source: str = "model",
                 deadline: float | None = None) -> tuple[torch.Tensor, dict]:
    """Draw ``n`` waveforms in one batch: codes (n, P + m) int64 on the CPU (the start code
    dropped; P = len(prompt_codes) or 0; m = new_samples, or fewer when ``deadline``, a
    time.monotonic() value, passed first) and timing stats.

    Work per generated sample is O(1): :func:`seqlab.generation.generate` prefills the prompt
    once and then steps the recurrent cache (a CUDA graph on GPU).
    """
    from ..generation import generate
    prompt = torch.full((n, 1), start_code, dtype=torch.long)
    if prompt_codes is not None:
        prompt = torch.cat([prompt, prompt_codes.long()[None].expand(n, -1)], dim=1)
    prompt = prompt.to(device)  # (n, 1 + P)
    with torch.inference_mode():
        logits = model(prompt[:1])  # (1, 1 + P, V): one prefill to catch a broken model early
    if not torch.isfinite(logits).all():
        raise ValueError(f"{source}: the model's logits hold NaN or infinite values (weights "
                         "broken?); nothing was written")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    try:
        ids = generate(model, prompt, new_samples, temperature=temperature, top_k=top_k,
                       top_p=top_p, seed=seed, cuda_graph=cuda_graph, progress=progress,
                       deadline=deadline)
    except RuntimeError as exc:
        if "inf" in str(exc) or "nan" in str(exc):
            raise ValueError(f"{source}: sampling met NaN or infinite probabilities ({exc}); "
                             "nothing was written") from exc
        raise
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    total = n * (ids.shape[1] - prompt.shape[1])  # the samples drawn, fewer past a deadline
    return ids[:, 1:].cpu(), {"seconds": dt, "samples_per_s": total / max(dt, 1e-9)}


def _atomic_png(wave, rate: int, path: Path, title: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_spectrogram_png(wave, rate, tmp, title=title)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def write_samples(codes: torch.Tensor, encoding: str, rate: int, folder: Path, prompt_len: int,
                  title: str, prefix: str = "sample") -> list[tuple[Path, Path]]:
    """codes (n, L) -> folder/<prefix>_<i>.wav (16-bit PCM at ``rate``) and .png per sample.

    Every waveform is decoded and checked before the first file is written; each file is
    written atomically, so a failure leaves no half-written output.
    """
    waves = _decode(encoding)(codes)  # (n, L) float32
    for i, w in enumerate(waves):
        bad = ~torch.isfinite(w)
        if bad.any():
            j = int(bad.nonzero()[0])
            raise ValueError(f"{folder}: generated sample {i} has value {w[j].item()} at index {j}; "
                             "nothing was written")
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, w in enumerate(waves):
        wav = write_wav(folder / f"{prefix}_{i:03d}.wav", w, rate)
        note = f", prompt {prompt_len / rate:.2f} s" if prompt_len else ""
        png = _atomic_png(w, rate, folder / f"{prefix}_{i:03d}.png",
                          f"{title} {i} ({w.numel() / rate:.2f} s{note})")
        out.append((wav, png))
    return out


def _gen_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"seqlab generate_audio: dtype={name!r}; use auto, float32, bfloat16 or float16")
    return getattr(torch, name)


def generate_audio(cfg: DictConfig) -> dict:
    from .embed import load_run_model
    from .species import _checkpoint_dir
    _set_cpu_threads(cfg)
    if cfg.n_samples < 1 or cfg.seconds <= 0:
        raise ConfigError(f"generate_audio: n_samples={cfg.n_samples} must be >= 1 and "
                          f"seconds={cfg.seconds} > 0")
    with tracked_run(cfg) as (run, summary):
        ckpt = _checkpoint_dir(cfg.checkpoint)
        spec = json.loads((ckpt / "config.json").read_text())
        audio = spec.get("audio")
        if spec.get("architecture") != "MambaLM" or not audio:
            raise ConfigError(f"seqlab generate_audio: {ckpt / 'config.json'} is not an audio model "
                              f"(architecture={spec.get('architecture')!r}, no 'audio' entry); "
                              "point checkpoint= at a train_audio run")
        rate, encoding = int(audio["rate"]), str(audio["encoding"])
        device = resolve_device(cfg.device)
        model, _, _ = load_run_model(ckpt, device)
        model.to(_gen_dtype(cfg.dtype, device))
        prompt = None
        if cfg.get("prompt"):
            prompt = load_prompt(resolve_path(cfg.prompt, what="prompt"), rate, encoding,
                                 cfg.max_prompt_seconds, cfg.get("prompt_seconds"),
                                 normalize=prompt_normalize(cfg, audio, ckpt / "config.json"))
        new = int(round(cfg.seconds * rate))
        codes, stats = sample_codes(model, cfg.n_samples, new, int(audio["start_code"]), prompt,
                                    cfg.temperature, cfg.top_p, cfg.seed, device, cfg.progress,
                                    top_k=cfg.top_k, cuda_graph=cfg.cuda_graph, source=str(ckpt))
        P = 0 if prompt is None else prompt.numel()
        paths = write_samples(codes, encoding, rate, run.path / "samples", P,
                              "continuation" if P else "sample")
        summary.update({"checkpoint": str(ckpt), "n_samples": int(cfg.n_samples), "rate": rate,
                        "prompt_samples": P, "new_samples_each": new,
                        "samples_per_s": stats["samples_per_s"],
                        # Audio seconds produced per wall-clock second, all samples together:
                        # >= 1 is faster than real time.
                        "real_time_factor": stats["samples_per_s"] / rate,
                        "generate_seconds": stats["seconds"], "device": str(device),
                        "wavs": [str(w) for w, _ in paths], "plots": [str(p) for _, p in paths]})
    print_summary("generate_audio", summary, run)
    for w in summary["wavs"]:
        print(f"wav: {w}")
    return summary
