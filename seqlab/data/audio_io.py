"""Audio file I/O at the edge of seqlab: read (whole or streamed), mix down, resample, write.

Waveforms inside seqlab are float32 torch tensors shaped (channels, samples) with values in
[-1, 1]; sample rates are ints in Hz. Files are read and written with soundfile (libsndfile),
not torchaudio.load, which needs torchcodec; torchaudio is used only for resampling. The
spectrogram PNG of a waveform is a plot: seqlab.tasks.plots.save_spectrogram_png.

Every format this machine's libsndfile reads is accepted (:data:`SUPPORTED_SUFFIXES`, built
from ``soundfile.available_formats()``: WAV, FLAC, OGG/Vorbis, AIFF, CAF, AU, W64, MP3 with
libsndfile >= 1.1, ...). :data:`AUDIO_SUFFIXES` also names audio formats libsndfile never reads
(.m4a, .aac, .wma, ...), so a folder scan can report such files instead of passing over them.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf
import torch
import torchaudio

from seqlab.errors import DataError, MissingInput

__all__ = [
    "AudioFileError",
    "SUPPORTED_SUFFIXES",
    "AUDIO_SUFFIXES",
    "audio_info",
    "read_audio",
    "stream_wave",
    "to_mono",
    "resample",
    "write_wav",
]

# libsndfile format name -> the suffixes its files carry. Left out: RAW (no header to read),
# MAT4/MAT5 (.mat is Matlab data far more often than audio), MPC2K (.mpc is usually Musepack,
# which libsndfile does not read) and HTK (.htk is usually HTK feature files).
_FORMAT_SUFFIXES = {
    "WAV": (".wav", ".wave"), "WAVEX": (".wav",), "RF64": (".rf64",), "W64": (".w64",),
    "AIFF": (".aiff", ".aif", ".aifc"), "CAF": (".caf",), "AU": (".au", ".snd"),
    "FLAC": (".flac",), "OGG": (".ogg", ".oga"), "MP3": (".mp3", ".mp2"),
    "NIST": (".nist", ".sph"), "IRCAM": (".sf",), "VOC": (".voc",), "SVX": (".iff", ".svx", ".8svx"),
    "PAF": (".paf",), "PVF": (".pvf",), "SD2": (".sd2",), "SDS": (".sds",), "AVR": (".avr",),
    "WVE": (".wve",), "XI": (".xi",),
}


def _supported_suffixes() -> tuple[str, ...]:
    formats = sf.available_formats()
    found = {suffix for name, suffixes in _FORMAT_SUFFIXES.items() if name in formats
             for suffix in suffixes}
    if "OGG" in formats and "OPUS" in sf.available_subtypes("OGG"):
        found.add(".opus")
    return tuple(sorted(found))


SUPPORTED_SUFFIXES = _supported_suffixes()
# Audio suffixes, readable here or not: a folder scan reports files with these suffixes that
# it cannot use, and passes over other files (text, manifests, images) in silence.
AUDIO_SUFFIXES = tuple(sorted(
    {s for suffixes in _FORMAT_SUFFIXES.values() for s in suffixes}
    | {".opus", ".m4a", ".m4b", ".mp4", ".aac", ".wma", ".ape", ".amr", ".wv", ".mka", ".ac3",
       ".alac", ".tta", ".spx", ".webm"}))


class AudioFileError(DataError):
    """An audio file that cannot be used as it is; the message names the file and the fix.

    ``path`` and ``reason`` are kept apart, so a folder scan can list the reason per file.
    """

    def __init__(self, path, reason: str):
        super().__init__(path, reason)
        self.path, self.reason = Path(path), reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def audio_info(path) -> sf._SoundFileInfo:
    """The header of an audio file (frames, samplerate, channels, format), checked.

    Raises:
        MissingInput (a FileNotFoundError) if the path does not exist; AudioFileError (a
        DataError, a ValueError) for a suffix libsndfile does not read here, an empty
        (0-byte) file, a header libsndfile cannot decode, or zero samples.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"{path}: no such audio file; check the path or the manifest entry")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        common = [x for x in (".wav", ".flac", ".ogg", ".mp3", ".aiff") if x in SUPPORTED_SUFFIXES]
        raise AudioFileError(path, f"unsupported audio format {suffix or '(no suffix)'!r} (libsndfile "
                                   f"{sf.__libsndfile_version__} reads {', '.join(common)} and "
                                   f"{len(SUPPORTED_SUFFIXES) - len(common)} more: "
                                   "seqlab.data.audio_io.SUPPORTED_SUFFIXES); convert it first, "
                                   f"e.g. `ffmpeg -i {path.name} {path.stem}.flac`")
    if path.stat().st_size == 0:
        raise AudioFileError(path, "file is empty (0 bytes); re-export or remove it")
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, ValueError) as err:
        raise AudioFileError(path, f"cannot decode as {suffix[1:].upper()} ({err}); the file is "
                                   "corrupt or truncated, or its suffix does not match its "
                                   "content") from err
    if info.frames == 0:
        raise AudioFileError(path, f"audio has zero samples (rate {info.samplerate} Hz); "
                                   "re-export or remove it")
    return info


def _check_finite(path: Path, data: np.ndarray, first_frame: int = 0) -> None:
    """data (frames, channels) float32 read from ``path`` starting at ``first_frame``."""
    bad = ~np.isfinite(data)
    if bad.any():
        frame, channel = (int(i) for i in np.argwhere(bad)[0])
        raise AudioFileError(path, f"sample {first_frame + frame} of channel {channel} is "
                                   f"{data[frame, channel]} ({int(bad.sum())} non-finite samples "
                                   "in that stretch); the float file is damaged, re-export it "
                                   "as 16-bit PCM")


def read_audio(path) -> tuple[torch.Tensor, int]:
    """Read a whole audio file in any format of :data:`SUPPORTED_SUFFIXES`.

    Args:
        path: str or Path.
    Returns:
        (wave, rate): wave is float32 (channels, samples) in [-1, 1]; rate is the file's
        sample rate in Hz (no resampling here).
    Raises:
        MissingInput (a FileNotFoundError) if the path does not exist; AudioFileError (a
        ValueError) for an unsupported suffix, an empty (0-byte) or zero-length file, a corrupt
        file, or NaN / infinite samples. Each message names the file, the value and a fix.
    """
    path = Path(path)
    audio_info(path)
    suffix = path.suffix.lower()
    try:
        # always_2d gives (frames, channels) even for mono, so one code path handles both.
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as err:
        raise AudioFileError(path, f"cannot decode as {suffix[1:].upper()} ({err}); the file is "
                                   "corrupt or truncated, or its suffix does not match its "
                                   "content") from err
    if data.shape[0] == 0:
        raise AudioFileError(path, f"audio has zero samples (rate {rate} Hz); re-export or remove it")
    _check_finite(path, data)
    return torch.from_numpy(np.ascontiguousarray(data.T)), int(rate)


def _resample_context(orig: int, new: int) -> int:
    """Input frames each side that one output of torchaudio's default sinc resampler reads
    beyond its own polyphase period, rounded up to whole periods plus one: ``orig`` and ``new``
    are the rates divided by their gcd, and the filter reaches ceil(6 * orig / (0.99 *
    min(orig, new))) frames (lowpass_filter_width 6, rolloff 0.99)."""
    width = math.ceil(6 * orig / (0.99 * min(orig, new)))
    return orig * (-(-width // orig) + 1)


def stream_wave(path, rate: int, block_seconds: float = 10.0) -> Iterator[torch.Tensor]:
    """A file as mono blocks at ``rate``, read a block at a time: memory follows the block,
    not the file.

    The blocks joined equal ``resample(to_mono(read_audio(path)[0]), file_rate, rate)[0]``:
    each block is resampled with enough input context on both sides that every output
    sample sees the same input as in one pass over the whole file (see
    :func:`_resample_context`), and blocks start on the resampler's polyphase period. Equal
    bit for bit when one rate divides the other (8 -> 16 kHz) or they match; otherwise to
    float32 rounding (~3e-8), since conv1d may sum in another order on another length.

    Args:
        path: an audio file of :data:`SUPPORTED_SUFFIXES`.
        rate: output rate in Hz.
        block_seconds: input seconds per block (rounded to whole polyphase periods).
    Yields:
        float32 (n_i,) blocks; the last may be shorter.
    Raises:
        as :func:`read_audio`, naming the file.
    """
    path = Path(path)
    info = audio_info(path)
    n, file_rate = int(info.frames), int(info.samplerate)
    g = math.gcd(file_rate, int(rate))
    orig, new = file_rate // g, int(rate) // g
    context = 0 if orig == new else _resample_context(orig, new)
    step = orig * max(1, round(block_seconds * file_rate / orig))  # whole polyphase periods
    with sf.SoundFile(str(path)) as f:
        for a in range(0, n, step):
            b = min(n, a + step)
            s, e = max(0, a - context), min(n, b + context)
            f.seek(s)
            data = f.read(e - s, dtype="float32", always_2d=True)  # (frames, channels)
            if data.shape[0] != e - s:
                raise AudioFileError(path, f"the header promises {n} frames but reading stopped "
                                           f"at frame {s + data.shape[0]}; the file is truncated, "
                                           "re-export it")
            _check_finite(path, data, s)
            mono = to_mono(torch.from_numpy(np.ascontiguousarray(data.T)))  # (1, e - s)
            if orig == new:
                yield mono[0, a - s:b - s]
                continue
            out = resample(mono, file_rate, rate)[0]
            lo = (a - s) // orig * new
            hi = (b - s) // orig * new if b < n else out.numel()
            yield out[lo:hi]


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
