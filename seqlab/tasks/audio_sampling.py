"""Sampling waveforms from an audio LM: prompts encoded as training encoded its files, codes
drawn through seqlab.generation, WAV and spectrogram files written atomically. Used by the
generate_audio job and by the audio task's end-of-training sample."""
from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from ..data.audio import encoder, peak_normalize
from ..data.audio_io import read_audio, resample, to_mono, write_wav
from ..data.mulaw import linear_decode, mulaw_decode
from ..errors import ConfigError
from ..generation import generate
from ..utils import sync_device
from .plots import save_spectrogram_png

log = logging.getLogger("seqlab")


def decoder(encoding: str):
    """codes -> float waveform in [-1, 1] for ``encoding`` ("mulaw" | "linear")."""
    return mulaw_decode if encoding == "mulaw" else linear_decode


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


def prompt_normalize(setting: bool | None, audio: dict, config_path: Path) -> bool:
    """Whether prompts are peak-normalised: ``setting`` (the job's ``prompt_normalize``) when
    not None, else what the checkpoint's training did (``audio.normalize``). A checkpoint that
    does not record it gets no normalisation and a warning."""
    if setting is not None:
        return bool(setting)
    if "normalize" in audio:
        return bool(audio["normalize"])
    log.warning("generate_audio: %s does not record whether training peak-normalised its audio "
                "(extra.audio.normalize, which train_audio records); the prompt is encoded "
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
    prompt = torch.full((n, 1), start_code, dtype=torch.long)
    if prompt_codes is not None:
        prompt = torch.cat([prompt, prompt_codes.long()[None].expand(n, -1)], dim=1)
    prompt = prompt.to(device)  # (n, 1 + P)
    with torch.inference_mode():
        logits = model(prompt[:1])  # (1, 1 + P, V): one prefill to catch a broken model early
    if not torch.isfinite(logits).all():
        raise ValueError(f"{source}: the model's logits hold NaN or infinite values (weights "
                         "broken?); nothing was written")
    sync_device(device)
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
    sync_device(device)
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
    waves = decoder(encoding)(codes)  # (n, L) float32
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


__all__ = ["load_prompt", "prompt_normalize", "sample_codes", "write_samples", "decoder"]
