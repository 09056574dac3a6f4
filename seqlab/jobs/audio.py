"""Audio jobs: `train_audio` (a causal Mamba LM over 8-bit mu-law codes) and `generate_audio`
(sample waveforms from a trained run, unconditionally or continuing a WAV prompt).

The model sees the codes of a clip shifted right by one (position 0 sees ZERO_CODE, the code
of silence) and predicts every code 0..255 of the clip, as in the Mamba paper's SC09 and
YouTubeMix experiments. The model's vocabulary is exactly the 256 codes (``model.vocab_size:
256``): no special ids are needed, and sampling can never produce an id that is not a code.
Generation starts from the same ZERO_CODE, so an unconditional sample is drawn exactly the way
training clips were scored; a prompt is ZERO_CODE followed by the prompt's codes.

Held-out negative log-likelihood is reported in bits per sample (nats / ln 2), averaged over
real (non-padding) samples; 8 bits is a uniform guess over the 256 codes.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from ..audio_io import read_audio, resample, save_spectrogram_png, to_mono, write_wav
from ..data.audio import AudioClipDataset, AudioRecord, find_audio_files, load_manifest, split_files
from ..data.mulaw import NUM_CODES, linear_decode, linear_encode, mulaw_decode, mulaw_encode
from ..train import RunDir, Task
from ..utils import atomic_write_json, resolve_device
from .common import make_trainer, model_config, print_summary, resolve_path

log = logging.getLogger("seqlab")

IGNORE = -100  # cross_entropy's ignore_index: targets at padding positions


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


def audio_records(source: str | Path, fractions, seed: int) -> list[AudioRecord]:
    """Records of a folder or manifest, each with a split (train and valid never empty).

    Entries without a split (a plain folder, or a manifest with no split column) are split by
    speaker with ``fractions`` (train, valid, test) and ``seed``, so no voice is in two splits.
    """
    path = resolve_path(source, what="audio source")
    if path.is_dir():
        records = find_audio_files(path)
    elif path.suffix.lower() in (".yaml", ".yml", ".csv"):
        records = load_manifest(path)
    else:
        raise SystemExit(f"seqlab train_audio: data.source={source!r} is neither a folder of audio "
                         "files nor a manifest (.yaml/.yml/.csv); a single file cannot be split "
                         "into train and valid speakers")
    if any(r.split is None for r in records):
        parts = split_files(records, by="speaker", fractions=tuple(fractions), seed=seed)
        records = [AudioRecord(r.path, r.speaker, split, r.label, r.text, r.extra)
                   for split, rs in parts.items() for r in rs]
    for split in ("train", "valid"):
        if not any(r.split == split for r in records):
            raise SystemExit(f"seqlab train_audio: data.source={source!r} has no {split!r} files "
                             f"(splits found: {sorted({r.split for r in records})}); give the "
                             f"manifest a {split} split or set data.split_fractions")
    return records


def _decode(encoding: str):
    return mulaw_decode if encoding == "mulaw" else linear_decode


def _encode(encoding: str):
    return mulaw_encode if encoding == "mulaw" else linear_encode


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


# ----------------------------------------------------------------------------- training
class AudioLMTask(Task):
    """Next-code prediction on fixed-length clips (``data.mode: pad``, one per file, SC09-like)
    or random crops (``data.mode: crop``, ``data.crops_per_file`` per file per epoch)."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.mcfg = model_config(cfg)
        if self.mcfg.vocab_size != NUM_CODES:
            raise SystemExit(f"seqlab train_audio: model.vocab_size={self.mcfg.vocab_size}; an audio "
                             f"model predicts exactly the {NUM_CODES} codes, set model.vocab_size="
                             f"{NUM_CODES}")
        if self.mcfg.bidirectional:
            raise SystemExit("seqlab train_audio: model.bidirectional=true cannot generate audio; "
                             "use a causal model (model.bidirectional=false)")
        d = cfg.data
        records = audio_records(d.source, d.split_fractions, cfg.trainer.seed)
        common = dict(rate=d.rate, clip_seconds=d.clip_seconds, mode=d.mode, encoding=d.encoding,
                      normalize=d.normalize, seed=cfg.trainer.seed)
        self.train_ds = AudioClipDataset(records, split="train", crops_per_file=d.crops_per_file,
                                         **common)
        self.valid_ds = AudioClipDataset(records, split="valid", **common)
        self.test_records = [r for r in records if r.split == "test"]
        log.info("train_audio: %d train files (%d speakers), %d valid files (%d speakers), "
                 "clips of %d samples at %d Hz", len(self.train_ds.records),
                 len(self.train_ds.speakers), len(self.valid_ds.records),
                 len(self.valid_ds.speakers), self.train_ds.clip_samples, d.rate)

    def build_model(self, device):
        from ..model import MambaLM
        return MambaLM(self.mcfg, device=device)

    def model_spec(self):
        d = self.cfg.data
        return {"architecture": "MambaLM", "model": self.mcfg.to_dict(),
                "audio": {"rate": int(d.rate), "encoding": str(d.encoding),
                          "clip_seconds": float(d.clip_seconds), "start_code": self.train_ds.zero_code}}

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

    def evaluate(self, model, step, device):
        bits = bits_per_sample(model, self.valid_ds, self._n_eval(self.valid_ds),
                               self.cfg.eval.batch_size, device)
        return {"val_bits_per_sample": bits}

    def finish(self, model, run: RunDir, device):
        out: dict = {}
        d = self.cfg.data
        if self.test_records:
            test = AudioClipDataset(self.test_records, split="test", rate=d.rate,
                                    clip_seconds=d.clip_seconds, mode=d.mode, encoding=d.encoding,
                                    normalize=d.normalize, seed=self.cfg.trainer.seed)
            out["test_bits_per_sample"] = bits_per_sample(model, test, self._n_eval(test),
                                                          self.cfg.eval.batch_size, device)
        g = self.cfg.sample
        if g.seconds > 0:
            codes, stats = sample_codes(model, n=1, new_samples=int(round(g.seconds * d.rate)),
                                        start_code=self.train_ds.zero_code, prompt_codes=None,
                                        temperature=g.temperature, top_p=g.top_p, seed=g.seed,
                                        device=device, progress=False, source=str(run.ckpt_dir))
            paths = write_samples(codes, d.encoding, d.rate, run.path / "samples", prompt_len=0,
                                  title="train_audio sample")
            out.update({"sample_wav": str(paths[0][0]), "sample_plot": str(paths[0][1]),
                        "sample_samples_per_s": stats["samples_per_s"]})
        return out


def _set_cpu_threads(cfg: DictConfig) -> None:
    # Small models on shared or busy cores: intra-op threads mostly wait on each other
    # (measured 800 vs 25,000 tokens/s for 2 threads vs 1 on 2 busy cores).
    n = int(cfg.get("cpu_threads") or 0)
    if n > 0:
        torch.set_num_threads(n)


def train_audio(cfg: DictConfig) -> dict:
    _set_cpu_threads(cfg)
    trainer = make_trainer(cfg)
    summary = trainer.fit(AudioLMTask(cfg), resume=cfg.get("resume", True))
    if trainer.dist.is_main:
        print_summary("train_audio", summary, trainer.run)
        for key in ("training_plot", "sample_wav", "sample_plot"):
            if key in summary:
                print(f"{key}: {summary[key]}")
    return summary


# ----------------------------------------------------------------------------- generation
def load_prompt(path: str | Path, rate: int, encoding: str, max_seconds: float,
                seconds: float | None = None) -> torch.Tensor:
    """A prompt file -> codes (P,) int64: read, mix to mono, resample to ``rate``, encode.

    ``seconds`` keeps only the prompt's beginning. Raises FileNotFoundError / AudioFileError
    (a ValueError) for a missing, empty or corrupt file, and ValueError when the prompt used is
    longer than ``max_seconds``; each message names the file and the value.
    """
    path = Path(path)
    wave, file_rate = read_audio(path)  # names the file on every failure
    wave = resample(to_mono(wave), file_rate, rate)[0]  # (n,) float32 at the model's rate
    if seconds is not None:
        if seconds <= 0:
            raise ValueError(f"{path}: prompt_seconds={seconds} must be positive (or null for "
                             "the whole file)")
        wave = wave[:int(round(seconds * rate))]
    used = wave.numel() / rate
    if max_seconds and used > max_seconds:
        raise ValueError(f"{path}: the prompt is {used:.2f} s long ({wave.numel()} samples at "
                         f"{rate} Hz), more than max_prompt_seconds={max_seconds}; cut it with "
                         f"prompt_seconds=<s> or raise max_prompt_seconds")
    if wave.numel() == 0:
        raise ValueError(f"{path}: prompt_seconds={seconds} leaves no sample of the prompt")
    return _encode(encoding)(wave)


def sample_codes(model, n: int, new_samples: int, start_code: int, prompt_codes, temperature: float,
                 top_p: float, seed: int | None, device, progress: bool, top_k: int = 0,
                 cuda_graph: bool | str = "auto", source: str = "model") -> tuple[torch.Tensor, dict]:
    """Draw ``n`` waveforms in one batch: codes (n, P + new_samples) int64 on the CPU (the start
    code dropped; P = len(prompt_codes) or 0) and timing stats.

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
                       top_p=top_p, seed=seed, cuda_graph=cuda_graph, progress=progress)
    except RuntimeError as exc:
        if "inf" in str(exc) or "nan" in str(exc):
            raise ValueError(f"{source}: sampling met NaN or infinite probabilities ({exc}); "
                             "nothing was written") from exc
        raise
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    total = n * new_samples
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
        raise SystemExit(f"seqlab generate_audio: dtype={name!r}; use auto, float32, bfloat16 or float16")
    return getattr(torch, name)


def generate_audio(cfg: DictConfig) -> dict:
    from .embed import load_run_model
    from .species import _checkpoint_dir
    _set_cpu_threads(cfg)
    run = RunDir(cfg.run_dir)
    run.write_config(OmegaConf.to_yaml(cfg, resolve=True))
    run.set_status("running")
    try:
        if cfg.n_samples < 1 or cfg.seconds <= 0:
            raise ValueError(f"generate_audio: n_samples={cfg.n_samples} must be >= 1 and "
                             f"seconds={cfg.seconds} > 0")
        ckpt = _checkpoint_dir(cfg.checkpoint)
        spec = json.loads((ckpt / "config.json").read_text())
        audio = spec.get("audio")
        if spec.get("architecture") != "MambaLM" or not audio:
            raise SystemExit(f"seqlab generate_audio: {ckpt / 'config.json'} is not an audio model "
                             f"(architecture={spec.get('architecture')!r}, no 'audio' entry); "
                             "point checkpoint= at a train_audio run")
        rate, encoding = int(audio["rate"]), str(audio["encoding"])
        device = resolve_device(cfg.device)
        model, _, _ = load_run_model(ckpt, device)
        model.to(_gen_dtype(cfg.dtype, device))
        prompt = None
        if cfg.get("prompt"):
            prompt = load_prompt(resolve_path(cfg.prompt, what="prompt"), rate, encoding,
                                 cfg.max_prompt_seconds, cfg.get("prompt_seconds"))
        new = int(round(cfg.seconds * rate))
        codes, stats = sample_codes(model, cfg.n_samples, new, int(audio["start_code"]), prompt,
                                    cfg.temperature, cfg.top_p, cfg.seed, device, cfg.progress,
                                    top_k=cfg.top_k, cuda_graph=cfg.cuda_graph, source=str(ckpt))
        P = 0 if prompt is None else prompt.numel()
        paths = write_samples(codes, encoding, rate, run.path / "samples", P,
                              "continuation" if P else "sample")
        summary = {"checkpoint": str(ckpt), "n_samples": int(cfg.n_samples), "rate": rate,
                   "prompt_samples": P, "new_samples_each": new,
                   "samples_per_s": stats["samples_per_s"],
                   # Audio seconds produced per wall-clock second, all samples together:
                   # >= 1 is faster than real time.
                   "real_time_factor": stats["samples_per_s"] / rate,
                   "generate_seconds": stats["seconds"], "device": str(device),
                   "wavs": [str(w) for w, _ in paths], "plots": [str(p) for _, p in paths]}
        atomic_write_json(run.path / "summary.json", summary)
        run.set_status("completed")
    except BaseException as exc:
        run.set_status("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    print_summary("generate_audio", summary, run)
    for w in summary["wavs"]:
        print(f"wav: {w}")
    return summary
