"""Audio file I/O at the edge of seqlab: read, mix down, resample, write, plot.

Waveforms inside seqlab are float32 torch tensors shaped (channels, samples) with values in
[-1, 1]; sample rates are ints in Hz. Files are read and written with soundfile (libsndfile),
not torchaudio.load, which needs torchcodec; torchaudio is used only for resampling and the
spectrogram transform.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

__all__ = [
    "AudioFileError",
    "SUPPORTED_SUFFIXES",
    "read_audio",
    "to_mono",
    "resample",
    "write_wav",
    "save_spectrogram_png",
]

# Formats libsndfile decodes losslessly or that speech corpora ship in; MP3 is left out on
# purpose because libsndfile's MP3 support depends on how it was built.
SUPPORTED_SUFFIXES = (".wav", ".flac", ".ogg")


class AudioFileError(ValueError):
    """An audio file that cannot be used as it is; the message names the file and the fix."""


def read_audio(path) -> tuple[torch.Tensor, int]:
    """Read a WAV, FLAC or OGG file.

    Args:
        path: str or Path.
    Returns:
        (wave, rate): wave is float32 (channels, samples) in [-1, 1]; rate is the file's
        sample rate in Hz (no resampling here).
    Raises:
        FileNotFoundError if the path does not exist; AudioFileError (a ValueError) for an
        unsupported suffix, an empty (0-byte) or zero-length file, a corrupt file, or NaN /
        infinite samples. Each message names the file, the offending value and a fix.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such audio file; check the path or the manifest entry")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise AudioFileError(f"{path}: unsupported audio format {suffix or '(no suffix)'!r}; "
                             f"supported are {', '.join(SUPPORTED_SUFFIXES)}; convert it first, "
                             f"e.g. `sox {path.name} {path.stem}.wav`")
    if path.stat().st_size == 0:
        raise AudioFileError(f"{path}: file is empty (0 bytes); re-export or remove it")
    try:
        # always_2d gives (frames, channels) even for mono, so one code path handles both.
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as err:
        raise AudioFileError(f"{path}: cannot decode as {suffix[1:].upper()} ({err}); the file is "
                             "corrupt or truncated, or its suffix does not match its content") from err
    if data.shape[0] == 0:
        raise AudioFileError(f"{path}: audio has zero samples (rate {rate} Hz); re-export or remove it")
    bad = ~np.isfinite(data)
    if bad.any():
        frame, channel = (int(i) for i in np.argwhere(bad)[0])
        raise AudioFileError(f"{path}: sample {frame} of channel {channel} is {data[frame, channel]} "
                             f"({int(bad.sum())} non-finite samples in all); the float file is damaged, "
                             "re-export it as 16-bit PCM")
    return torch.from_numpy(np.ascontiguousarray(data.T)), int(rate)


def to_mono(wave: torch.Tensor) -> torch.Tensor:
    """Mix down to one channel by averaging.

    Args:
        wave: float (channels, samples) or (samples,).
    Returns:
        float (1, samples), same dtype.
    """
    wave = torch.as_tensor(wave)
    if wave.dim() == 1:
        return wave.unsqueeze(0)
    if wave.dim() != 2:
        raise ValueError(f"to_mono: expected (channels, samples) or (samples,), got shape {tuple(wave.shape)}")
    return wave.mean(dim=0, keepdim=True)


def resample(wave: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Band-limited (sinc, Hann window) resampling via torchaudio.functional.resample.

    Args:
        wave: float (..., samples).
        orig_rate, new_rate: positive ints, Hz.
    Returns:
        float (..., ceil(samples * new_rate / orig_rate)); 8 kHz -> 16 kHz doubles the length.
        The input itself is returned when the rates are equal.
    """
    orig_rate, new_rate = int(orig_rate), int(new_rate)
    if orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"resample: rates must be positive Hz, got {orig_rate} -> {new_rate}")
    if orig_rate == new_rate:
        return wave
    return torchaudio.functional.resample(torch.as_tensor(wave), orig_rate, new_rate)


def write_wav(path, wave, rate: int) -> Path:
    """Write 16-bit PCM WAV atomically (temporary file in the same folder, then os.replace).

    A crash mid-write leaves either the old file or none, never a truncated WAV that a later
    read_audio would reject as corrupt.

    Args:
        path: destination; parent folders are created.
        wave: float tensor or array, (channels, samples) or (samples,), in [-1, 1]
            (clipped outside, since PCM cannot hold it).
        rate: sample rate in Hz.
    Returns:
        The destination Path.
    """
    path = Path(path)
    data = np.asarray(torch.as_tensor(wave).detach().cpu().to(torch.float32))
    if data.ndim == 1:
        data = data[None, :]
    if data.ndim != 2:
        raise ValueError(f"write_wav {path}: expected (channels, samples) or (samples,), got shape {data.shape}")
    if not np.isfinite(data).all():
        raise ValueError(f"write_wav {path}: waveform holds NaN or infinite samples; refusing to write")
    if int(rate) <= 0:
        raise ValueError(f"write_wav {path}: rate must be a positive number of Hz, got {rate}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        sf.write(tmp, np.clip(data, -1.0, 1.0).T, int(rate), subtype="PCM_16", format="WAV")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def save_spectrogram_png(wave, rate: int, path, title: str | None = None) -> Path:
    """Plot a log-magnitude spectrogram (dB) of a waveform to a PNG.

    Uses matplotlib's Agg canvas directly (no pyplot), so no global backend is switched and
    it works without a display.

    Args:
        wave: float (channels, samples) or (samples,); channels are averaged.
        rate: sample rate in Hz, for the axes.
        path: destination .png; parent folders are created.
        title: optional plot title.
    Returns:
        The destination Path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    mono = to_mono(torch.as_tensor(wave).to(torch.float32))[0]
    # ~32 ms windows with 75% overlap: resolves pitch harmonics of speech at any rate.
    n_fft = max(16, 1 << int(round(np.log2(0.032 * rate))))
    if mono.numel() < n_fft:
        mono = torch.nn.functional.pad(mono, (0, n_fft - mono.numel()))
    spec = torchaudio.transforms.Spectrogram(n_fft=n_fft, hop_length=n_fft // 4, power=2.0)(mono)
    db = 10.0 * torch.log10(spec + 1e-10)  # (n_fft // 2 + 1, frames)
    fig = Figure(figsize=(8, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    duration = mono.numel() / rate
    im = ax.imshow(db.numpy(), origin="lower", aspect="auto", cmap="magma",
                   extent=(0.0, duration, 0.0, rate / 2.0), vmin=float(db.max()) - 80.0)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("frequency (Hz)")
    if title:
        ax.set_title(title)
    fig.colorbar(im, ax=ax, label="power (dB)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
