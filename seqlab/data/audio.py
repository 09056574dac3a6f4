"""Waveform datasets: files -> mono -> resampled -> 8-bit codes -> (inputs, targets, length).

The audio task is autoregressive next-sample prediction on 8-bit codes at 16 kHz, as in the
Mamba paper's SC09 experiments and SaShiMi. An item is

    targets  int64 (T,)  codes of the clip, padded at the end with the zero-level code
    inputs   int64 (T,)  targets shifted right by one, inputs[0] = ZERO_CODE
    length   int64 ()    number of real (non-padding) samples; the loss ignores t >= length

so position t sees codes < t and predicts code t. T = round(clip_seconds * rate).

Sources are a folder (searched recursively for every format libsndfile reads, see
seqlab.data.audio_io.SUPPORTED_SUFFIXES; speaker = parent folder name), a list of files, or a
manifest (.yaml/.yml/.csv; format in datasets/speech/README.md). A folder scan keeps the files
it can read and reports the audio files it cannot (:func:`scan_audio_folder`).

AudioClipDataset reads all audio once at construction and keeps the resampled float waveform
and its codes in memory: training corpora here are small (SC09 is ~1.3 GB of 16-bit audio at
most). Scoring long held-out files goes through :func:`stream_codes` instead, whose memory
follows its block, not the file.
"""
from __future__ import annotations

import contextlib
import csv
import io
import logging
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
import yaml

from seqlab.data.audio_io import (AUDIO_SUFFIXES, AudioFileError, audio_info, read_audio,
                             resample as resample_wave, stream_wave, to_mono, write_wav)
from seqlab.settings import datasets_dir
from seqlab.data.mulaw import LINEAR_ZERO_CODE, ZERO_CODE, linear_encode, mulaw_encode
from seqlab.errors import ConfigError, DataError, MissingInput
from seqlab.utils import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = [
    "SPLITS",
    "DIGIT_WORDS",
    "BUNDLED_SPEECH_MANIFEST",
    "DEFAULT_ESPEAK_VOICES",
    "AudioRecord",
    "AudioClip",
    "AudioClipDataset",
    "SkippedFile",
    "AudioFolder",
    "scan_audio_folder",
    "find_audio_files",
    "log_skipped",
    "write_skipped",
    "peak_normalize",
    "encoder",
    "stream_codes",
    "load_manifest",
    "write_manifest",
    "split_files",
    "shift_right",
    "prepare_speech",
]

SPLITS = ("train", "valid", "test")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# datasets/ sits beside the seqlab package in the repository (editable install).
BUNDLED_SPEECH_MANIFEST = datasets_dir() / "speech" / "manifest.yaml"
ASTERISK_SOUNDS = Path("/usr/share/asterisk/sounds")
# Seven English accents x four voice variants: 28 synthetic "speakers" for a speaker-level split.
DEFAULT_ESPEAK_VOICES = tuple(
    f"{accent}+{variant}"
    for accent in ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029")
    for variant in ("m1", "f2", "m3", "f4")
)
_MANIFEST_FIELDS = ("path", "speaker", "split", "label", "text")


@dataclass(frozen=True)
class AudioRecord:
    """One audio file and what is known about it.

    path: absolute Path. speaker: id used for leakage-free splits. split: one of SPLITS or None.
    label: a class name (e.g. the English digit word) or None. text: a transcript or None.
    extra: any other manifest fields, kept verbatim (e.g. language, original source path).
    """

    path: Path
    speaker: str
    split: str | None = None
    label: str | None = None
    text: str | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)


class AudioClip(NamedTuple):
    """One training item; torch's default_collate stacks each field over the batch."""

    inputs: torch.Tensor  # int64 (T,)
    targets: torch.Tensor  # int64 (T,)
    length: torch.Tensor  # int64 (), real samples in the clip


# ---------------------------------------------------------------------------------------------
# Sources: folders and manifests


class SkippedFile(NamedTuple):
    """An audio-looking file a folder scan could not use, and why (no path in the reason)."""

    path: Path
    reason: str


class AudioFolder(NamedTuple):
    """What :func:`scan_audio_folder` found: the usable files and the skipped audio files."""

    records: list[AudioRecord]
    skipped: list[SkippedFile]


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def scan_audio_folder(folder) -> AudioFolder:
    """Every audio file under ``folder`` (recursive, sorted) that libsndfile can read, and the
    audio files it cannot.

    A file counts as audio when its suffix is in seqlab.data.audio_io.AUDIO_SUFFIXES. It is kept
    when its header reads and holds samples (:func:`seqlab.data.audio_io.audio_info`); otherwise
    it is skipped with the reason (a format libsndfile does not read here, empty, corrupt,
    no samples). Hidden files and folders (macOS ``._x.wav`` forks, ``.git``) and files with
    other suffixes (manifests, notes, images) are passed over without a word.

    Raises:
        MissingInput if ``folder`` is not a folder; DataError if it holds no usable audio.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingInput(f"{folder}: not a folder of audio files; check the path")
    records, skipped = [], []
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() not in AUDIO_SUFFIXES or _hidden(p, folder) or not p.is_file():
            continue
        try:
            audio_info(p)
        except AudioFileError as err:
            skipped.append(SkippedFile(p.resolve(), err.reason))
            continue
        records.append(AudioRecord(path=p.resolve(), speaker=p.parent.name))
    if not records:
        what = (f"all {len(skipped)} audio files were skipped, the first: {skipped[0].path}: "
                f"{skipped[0].reason}" if skipped else
                "no file has an audio suffix (.wav, .flac, .mp3, ...: "
                "seqlab.data.audio_io.SUPPORTED_SUFFIXES)")
        raise DataError(f"{folder}: no usable audio ({what}); point at the folder that holds "
                        "the audio or pass a manifest")
    return AudioFolder(records, skipped)


def log_skipped(skipped: Sequence[SkippedFile], folder, listing: Path | None = None,
                limit: int = 10) -> None:
    """One warning per skipped file up to ``limit``, then one line with the count of the rest
    and where the full list is (``listing``, when the caller writes one)."""
    for f in skipped[:limit]:
        logger.warning("skipped %s: %s", f.path, f.reason)
    more = len(skipped) - limit
    if more > 0 or (skipped and listing is not None):
        parts = [f"{more} more audio files skipped" if more > 0 else f"{len(skipped)} audio files skipped"]
        if listing is not None:
            parts.append(f"full list: {listing}")
        logger.warning("%s: %s", folder, "; ".join(parts))


def write_skipped(skipped: Sequence[SkippedFile], path) -> Path:
    """Write the skipped files as a CSV with columns path, reason (atomically)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", "reason"])
    writer.writerows((str(f.path), f.reason) for f in skipped)
    atomic_write_text(path, text.getvalue())
    return Path(path)


def find_audio_files(folder) -> list[AudioRecord]:
    """The usable audio files under ``folder`` (:func:`scan_audio_folder`); the skipped ones
    are logged. Speaker = parent folder name."""
    found = scan_audio_folder(folder)
    log_skipped(found.skipped, folder)
    return found.records


def load_manifest(path) -> list[AudioRecord]:
    """Read a speech manifest (YAML list / {items: list}, or CSV with a header row).

    Each entry needs `path` (relative to the manifest's folder, or absolute); `speaker`
    defaults to the file's parent folder name; `split` must be one of SPLITS if given;
    `label` and `text` are optional; other fields land in AudioRecord.extra.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"{path}: manifest not found")
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        doc = yaml.safe_load(path.read_text())
        rows = doc.get("items") if isinstance(doc, dict) else doc
        if not isinstance(rows, list):
            raise DataError(f"{path}: a YAML manifest is a list of entries or a mapping with key 'items' "
                             f"holding that list; got {type(rows).__name__}")
    elif suffix == ".csv":
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    else:
        raise ConfigError(f"{path}: unknown manifest format {suffix!r}; use .yaml, .yml or .csv")
    records = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not row.get("path"):
            raise DataError(f"{path}: entry {i} has no 'path' field: {row!r}")
        file = Path(str(row["path"]))
        file = (file if file.is_absolute() else path.parent / file).resolve()
        split = row.get("split") or None
        if split is not None and split not in SPLITS:
            raise DataError(f"{path}: entry {i} ({row['path']}) has split {split!r}; use one of {SPLITS}")
        records.append(AudioRecord(
            path=file,
            speaker=str(row.get("speaker") or file.parent.name),
            split=split,
            label=None if row.get("label") in (None, "") else str(row["label"]),
            text=None if row.get("text") in (None, "") else str(row["text"]),
            extra={k: v for k, v in row.items() if k not in _MANIFEST_FIELDS and v not in (None, "")},
        ))
    if not records:
        raise DataError(f"{path}: manifest lists no files")
    return records


def write_manifest(records: Sequence[AudioRecord], path) -> Path:
    """Write records as a CSV (path relative to the manifest's folder when inside it) or YAML."""
    path = Path(path)
    root = path.parent.resolve()
    extra_keys = sorted({k for r in records for k in r.extra})
    rows = []
    for r in records:
        try:
            rel = r.path.resolve().relative_to(root).as_posix()
        except ValueError:
            rel = str(r.path)
        row = {"path": rel, "speaker": r.speaker, "split": r.split or "", "label": r.label or "", "text": r.text or ""}
        row.update({k: r.extra.get(k, "") for k in extra_keys})
        rows.append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv":
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(_MANIFEST_FIELDS) + extra_keys)
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix.lower() in (".yaml", ".yml"):
        path.write_text(yaml.safe_dump({"items": [{k: v for k, v in r.items() if v != ""} for r in rows]},
                                       sort_keys=False, allow_unicode=True))
    else:
        raise ValueError(f"{path}: manifest must end in .csv, .yaml or .yml")
    return path


def _records_from(source) -> list[AudioRecord]:
    if isinstance(source, (str, Path)):
        p = Path(source)
        if p.is_dir():
            return find_audio_files(p)
        if p.suffix.lower() in (".yaml", ".yml", ".csv"):
            return load_manifest(p)
        return [AudioRecord(path=p.resolve(), speaker=p.parent.name)]
    records = [s if isinstance(s, AudioRecord) else AudioRecord(path=Path(s).resolve(), speaker=Path(s).parent.name)
               for s in source]
    if not records:
        raise ValueError("AudioClipDataset: the list of files is empty")
    return records


# ---------------------------------------------------------------------------------------------
# Splits


def split_files(files: Sequence, by: str = "speaker", fractions=(0.8, 0.1, 0.1), seed: int = 0) -> dict[str, list]:
    """Split files into train / valid / test with no speaker (or file) in two splits.

    Args:
        files: paths (speaker = parent folder name) or AudioRecords (speaker = record.speaker).
        by: "speaker" groups all files of a speaker into one split; "file" splits files freely.
        fractions: (train, valid, test) shares of the groups, non-negative, summing to 1. Each
            split with a positive share gets at least one group, the rest goes to train.
        seed: the group shuffle; same seed and files give the same split.
    Returns:
        {"train": [...], "valid": [...], "test": [...]}, the input items in their input order.
    """
    if by not in ("speaker", "file"):
        raise ValueError(f"split_files: by={by!r}; use 'speaker' or 'file'")
    fr = [float(f) for f in fractions]
    if len(fr) != 3 or min(fr) < 0 or abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(f"split_files: fractions {tuple(fractions)} must be three non-negative shares "
                         "(train, valid, test) summing to 1")

    def key(item):
        if by == "file":
            return str(item.path if isinstance(item, AudioRecord) else Path(item))
        return item.speaker if isinstance(item, AudioRecord) else Path(item).parent.name

    groups = sorted({key(f) for f in files})
    needed = sum(f > 0 for f in fr)
    if len(groups) < needed:
        raise ValueError(f"split_files: {len(groups)} {by}(s) {groups} cannot fill {needed} splits with "
                         f"fractions {tuple(fractions)}; add {by}s, split by='file', or set a fraction to 0")
    order = [groups[i] for i in np.random.default_rng(seed).permutation(len(groups))]
    n_valid = max(1, round(fr[1] * len(groups))) if fr[1] > 0 else 0
    n_test = max(1, round(fr[2] * len(groups))) if fr[2] > 0 else 0
    # Rounding up tiny shares must not starve train when train has a share.
    while fr[0] > 0 and len(groups) - n_valid - n_test < 1:
        if n_valid >= n_test and n_valid > 1:
            n_valid -= 1
        else:
            n_test -= 1
    which = {g: "test" for g in order[:n_test]}
    which.update({g: "valid" for g in order[n_test:n_test + n_valid]})
    which.update({g: "train" for g in order[n_test + n_valid:]})
    out = {s: [] for s in SPLITS}
    for f in files:
        out[which[key(f)]].append(f)
    return out


# ---------------------------------------------------------------------------------------------
# Dataset


def shift_right(codes: torch.Tensor, start: int = ZERO_CODE) -> torch.Tensor:
    """Teacher-forcing inputs: (..., T) int64 -> (..., T) with [start, codes[..., :-1]]."""
    first = torch.full_like(codes[..., :1], start)
    return torch.cat([first, codes[..., :-1]], dim=-1)


@contextlib.contextmanager
def _one_thread():
    """Run torch ops on one intra-op thread, then restore the previous count.

    Loading is thousands of small resampling convolutions; on busy or shared cores torch's
    thread pool spends far longer synchronising than computing (measured 20x slower with 2
    threads on 2 busy cores), and DataLoader workers already run single-threaded.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def encoder(encoding: str):
    """The codec of ``encoding`` ("mulaw" or "linear"): float samples -> int64 codes."""
    if encoding not in ("mulaw", "linear"):
        raise ConfigError(f"encoding={encoding!r}; use 'mulaw' or 'linear'")
    return mulaw_encode if encoding == "mulaw" else linear_encode


def peak_normalize(wave: torch.Tensor, peak: torch.Tensor | None = None) -> torch.Tensor:
    """wave / peak, peak = max |wave| unless given (a file's peak, for one of its blocks); a
    silent wave (peak 0) comes back unchanged. The one normalisation of training, scoring and
    prompts (``data.normalize``): the same division gives the same codes everywhere."""
    peak = wave.abs().max() if peak is None else peak
    return wave / peak if peak > 0 else wave


def stream_codes(path, rate: int, encoding: str = "mulaw", normalize: bool = False,
                 block_seconds: float = 10.0) -> Iterator[torch.Tensor]:
    """The codes of one whole file, a block at a time: what AudioClipDataset would store for
    it (mono, resampled to ``rate``, peak-normalised if ``normalize``, encoded), with memory
    bounded by the block instead of the file.

    ``normalize`` needs the file's peak before its first code: the file is then read twice.

    Yields:
        int64 (n_i,) codes; joined they equal the dataset's codes of the file (see
        seqlab.data.audio_io.stream_wave for the rounding caveat of non-integer rate ratios).
    Raises:
        as seqlab.data.audio_io.read_audio, naming the file.
    """
    encode = encoder(encoding)
    peak = None
    if normalize:
        peak = torch.zeros(())
        for block in stream_wave(path, rate, block_seconds):
            peak = torch.maximum(peak, block.abs().max())
    for block in stream_wave(path, rate, block_seconds):
        yield encode(block if peak is None else peak_normalize(block, peak))


def _seed_for(seed: int, epoch: int, index: int) -> np.random.Generator:
    # SeedSequence mixes the three ints into independent streams: no global RNG state, so the
    # same crop comes back in any worker process and after a resume at (epoch, index).
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(index)]))


class AudioClipDataset(torch.utils.data.Dataset):
    """Fixed-length 8-bit clips for autoregressive waveform modelling.

    Args:
        source: a folder, a manifest (.yaml/.yml/.csv), one audio file, or a list of paths /
            AudioRecords.
        rate: target sample rate in Hz (16000 as in SC09).
        clip_seconds: clip duration; T = round(clip_seconds * rate) samples.
        mode: "pad": one item per file, its first T samples, zero-padded at the end (SC09-like
            clips); "crop": crops_per_file random T-sample windows per file per epoch, drawn
            deterministically from (seed, epoch, index); files shorter than T are padded.
        encoding: "mulaw" (mu = 255) or "linear" (8-bit uniform).
        normalize: scale each file to peak |x| = 1 before encoding (silent files stay silent).
        resample: resample files whose rate differs from `rate`; if False such a file raises
            AudioFileError naming the file and both rates.
        seed: crop seed.
        split: keep only records with this split (needs a manifest or AudioRecords with split).
        crops_per_file: items per file in "crop" mode.
    Items:
        AudioClip(inputs int64 (T,), targets int64 (T,), length int64 ()), see module docstring.
    """

    def __init__(self, source, rate: int = 16000, clip_seconds: float = 1.0, mode: str = "pad",
                 encoding: str = "mulaw", normalize: bool = False, resample: bool = True, seed: int = 0,
                 split: str | None = None, crops_per_file: int = 1):
        if mode not in ("pad", "crop"):
            raise ConfigError(f"AudioClipDataset: mode={mode!r}; use 'pad' (fixed clips) or 'crop' (random windows)")
        if encoding not in ("mulaw", "linear"):
            raise ConfigError(f"AudioClipDataset: encoding={encoding!r}; use 'mulaw' or 'linear'")
        if split is not None and split not in SPLITS:
            raise ConfigError(f"AudioClipDataset: split={split!r}; use one of {SPLITS} or None")
        self.rate = int(rate)
        self.clip_samples = int(round(clip_seconds * self.rate))
        if self.rate <= 0 or self.clip_samples < 2:
            raise ConfigError(f"AudioClipDataset: rate={rate} Hz and clip_seconds={clip_seconds} give "
                             f"{self.clip_samples} samples per clip; need at least 2")
        if crops_per_file < 1:
            raise ConfigError(f"AudioClipDataset: crops_per_file={crops_per_file}; must be >= 1")
        self.mode, self.encoding, self.seed = mode, encoding, int(seed)
        self.crops_per_file = int(crops_per_file) if mode == "crop" else 1
        self.zero_code = ZERO_CODE if encoding == "mulaw" else LINEAR_ZERO_CODE
        self.epoch = 0

        records = _records_from(source)
        if split is not None:
            if all(r.split is None for r in records):
                raise ValueError(f"AudioClipDataset: split={split!r} requested but {source} carries no split "
                                 "column; use a manifest with one or split_files() first")
            records = [r for r in records if r.split == split]
            if not records:
                raise ValueError(f"AudioClipDataset: no files of split {split!r} in {source}")
        self.records = records
        encode = encoder(encoding)
        self.waves: list[torch.Tensor] = []  # float32 (n_i,) at self.rate, the resampled cache
        self._codes: list[torch.Tensor] = []  # uint8 (n_i,): 1 byte/sample, widened per item
        with _one_thread():
            for r in records:
                self._load(r, encode, resample, normalize)

    def _load(self, r: AudioRecord, encode, resample: bool, normalize: bool) -> None:
        wave, file_rate = read_audio(r.path)
        if file_rate != self.rate and not resample:
            raise AudioFileError(r.path, f"sample rate {file_rate} Hz differs from the dataset rate "
                                         f"{self.rate} Hz and resample=False; pass resample=True or "
                                         f"convert the file (sox in.wav -r {self.rate} out.wav)")
        wave = resample_wave(to_mono(wave), file_rate, self.rate)[0].contiguous()
        if normalize:
            wave = peak_normalize(wave)
        self.waves.append(wave)
        self._codes.append(encode(wave).to(torch.uint8))

    @property
    def speakers(self) -> list[str]:
        """Sorted distinct speaker ids of the loaded files."""
        return sorted({r.speaker for r in self.records})

    def set_epoch(self, epoch: int) -> None:
        """Choose the crop draw of this epoch (like DistributedSampler.set_epoch); no effect in pad mode."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records) * self.crops_per_file

    def __getitem__(self, index: int) -> AudioClip:
        return self.clip(index, self.epoch)

    def clip(self, index: int, epoch: int = 0) -> AudioClip:
        """Item `index` as drawn in `epoch`; the same (seed, epoch, index) always gives the same clip."""
        if not 0 <= index < len(self):
            raise IndexError(f"AudioClipDataset: index {index} out of range for {len(self)} items")
        codes = self._codes[index // self.crops_per_file]
        T, n = self.clip_samples, codes.numel()
        start = 0
        if self.mode == "crop" and n > T:
            start = int(_seed_for(self.seed, epoch, index).integers(0, n - T + 1))
        window = codes[start:start + T].to(torch.int64)
        length = window.numel()
        targets = torch.full((T,), self.zero_code, dtype=torch.int64)
        targets[:length] = window
        return AudioClip(shift_right(targets, self.zero_code), targets, torch.tensor(length, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------
# Building a larger SC09-like spoken-digit set


def _trim_and_fit(wave: torch.Tensor, rate: int, clip_samples: int) -> torch.Tensor:
    """(n,) float -> (clip_samples,): cut silence below -40 dB of the peak (keeping 50 ms of
    margin), centre-crop words longer than the clip, zero-pad the end like SC09's short clips."""
    peak = float(wave.abs().max())
    if peak > 0:
        loud = (wave.abs() > 0.01 * peak).nonzero().flatten()
        margin = int(0.05 * rate)
        wave = wave[max(0, int(loud[0]) - margin): int(loud[-1]) + 1 + margin]
    if wave.numel() > clip_samples:
        off = (wave.numel() - clip_samples) // 2
        wave = wave[off:off + clip_samples]
    return torch.nn.functional.pad(wave, (0, clip_samples - wave.numel()))


def _asterisk_voice(folder: Path) -> tuple[str, str]:
    """Speaker id and language of an Asterisk sounds folder such as en_US_f_Allison.

    The speaker id is the voice's name: en_US_f_Allison and es_MX_f_Allison are one person,
    and a split by folder would leak her voice across splits.
    """
    parts = folder.name.split("_")
    if len(parts) >= 4:
        return parts[-1].lower(), "_".join(parts[:2])
    return folder.name.lower(), folder.name


def _digit_sources(source: Path) -> list[tuple[str, str, str, Path, str | None]]:
    """(speaker, variant, digit word, file, transcript or None) for one source path."""
    if source.is_file():  # a manifest such as the bundled one: entries labelled with digit words
        return [(r.speaker, r.path.stem, r.label, r.path, r.text) for r in load_manifest(source)
                if r.label in DIGIT_WORDS]
    if not source.is_dir():
        raise FileNotFoundError(f"prepare_speech: source {source} does not exist; install "
                                "asterisk-core-sounds-*-wav or pass a folder / manifest")
    folders = [source] if (source / "digits").is_dir() else sorted(d for d in source.iterdir() if (d / "digits").is_dir())
    found = []
    for folder in folders:
        speaker, language = _asterisk_voice(folder)
        for d, word in enumerate(DIGIT_WORDS):
            f = folder / "digits" / f"{d}.wav"
            if f.is_file():
                found.append((speaker, language, word, f, None))
    return found


def prepare_speech(out_dir, sources: Sequence | None = None, rate: int = 16000, espeak_voices: Sequence[str] | None = None,
                   clip_seconds: float = 1.0, pitches: Sequence[int] = (40, 60), speeds: Sequence[int] = (150, 190),
                   fractions=(0.8, 0.1, 0.1), seed: int = 0) -> Path:
    """Build an SC09-like spoken-digit set: 1 s, 16-bit PCM WAV clips at `rate`.

    Layout: out_dir/<digit word>/<speaker>_<variant>.wav, plus out_dir/manifest.csv with
    path, speaker, split (by speaker, `fractions`, `seed`), label (digit word), text, source.

    Args:
        out_dir: output folder (created).
        sources: Asterisk sounds roots (<root>/<voice>/digits/0..9.wav), single voice folders,
            or manifests whose entries carry a digit-word label. Default: /usr/share/asterisk/sounds
            if installed, else the bundled datasets/speech/manifest.yaml.
        rate: output sample rate in Hz.
        espeak_voices: espeak-ng voices to synthesise each digit with, at every pitch x speed;
            None means DEFAULT_ESPEAK_VOICES, [] means none. Skipped with a logged message when
            espeak-ng is not on PATH.
        clip_seconds: clip duration (SC09: 1 s).
        pitches, speeds: espeak-ng -p (0..99) and -s (words per minute) values.
    Returns:
        Path of the manifest.
    """
    out_dir = Path(out_dir)
    clip_samples = int(round(clip_seconds * rate))
    if sources is None:
        sources = [ASTERISK_SOUNDS] if ASTERISK_SOUNDS.is_dir() else [BUNDLED_SPEECH_MANIFEST]
        logger.info("prepare_speech: reading recordings from %s", sources[0])
    with _one_thread():
        records = _collect_digits(out_dir, sources, rate, clip_samples, espeak_voices, pitches, speeds)
    parts = split_files(records, by="speaker", fractions=fractions, seed=seed)
    split_of = {id(r): s for s, rs in parts.items() for r in rs}
    records = [AudioRecord(r.path, r.speaker, split_of[id(r)], r.label, r.text, r.extra) for r in records]
    manifest = write_manifest(records, out_dir / "manifest.csv")
    logger.info("prepare_speech: wrote %d clips from %d speakers to %s", len(records),
                len({r.speaker for r in records}), out_dir)
    return manifest


def _collect_digits(out_dir: Path, sources, rate: int, clip_samples: int, espeak_voices, pitches, speeds):
    records: list[AudioRecord] = []

    def emit(wave: torch.Tensor, file_rate: int, speaker: str, variant: str, word: str, origin: str,
             text: str | None) -> None:
        wave = resample_wave(to_mono(wave), file_rate, rate)[0]
        dest = out_dir / word / f"{speaker}_{variant}.wav"
        write_wav(dest, _trim_and_fit(wave, rate, clip_samples), rate)
        records.append(AudioRecord(path=dest.resolve(), speaker=speaker, label=word, text=text,
                                   extra={"source": origin}))

    for source in sources:
        for speaker, variant, word, f, text in _digit_sources(Path(source)):
            wave, file_rate = read_audio(f)
            emit(wave, file_rate, speaker, variant, word, str(f), text)

    voices = DEFAULT_ESPEAK_VOICES if espeak_voices is None else tuple(espeak_voices)
    espeak = shutil.which("espeak-ng")
    if voices and espeak is None:
        logger.warning("prepare_speech: espeak-ng not found on PATH; skipping %d synthetic voices "
                       "(install it with `apt-get install espeak-ng`)", len(voices))
    elif voices:
        with tempfile.TemporaryDirectory() as tmp:
            wav = Path(tmp) / "say.wav"
            for voice in voices:
                for pitch in pitches:
                    for speed in speeds:
                        for word in DIGIT_WORDS:
                            cmd = [espeak, "-v", voice, "-p", str(pitch), "-s", str(speed), "-w", str(wav), word]
                            done = subprocess.run(cmd, capture_output=True, text=True)
                            if done.returncode != 0 or not wav.is_file():
                                raise RuntimeError(f"prepare_speech: `{' '.join(cmd)}` failed ({done.stderr.strip()}); "
                                                   f"check the voice name with `espeak-ng --voices=en`")
                            wave, file_rate = read_audio(wav)
                            emit(wave, file_rate, f"espeak-{voice}", f"p{pitch}-s{speed}", word,
                                 f"espeak-ng -v {voice} -p {pitch} -s {speed}", word)
    if not records:
        raise ValueError(f"prepare_speech: no digit recordings found in {list(map(str, sources))} and no "
                         "espeak-ng voices; install asterisk-core-sounds-en-wav or espeak-ng")
    return records
