"""Audio edge of seqlab: mu-law codecs, file I/O, clip datasets, splits, the bundled speech.

Waveforms are small (<= 1.5 s at 16 kHz) so the whole file runs in a few seconds.
"""
import logging
import math
import os
import stat
from collections import Counter

import numpy as np
import pytest
import soundfile as sf
import torch

from seqlab.data.audio_io import (SUPPORTED_SUFFIXES, AudioFileError, read_audio, resample, to_mono,
                                  write_wav)
from seqlab.data.audio import (BUNDLED_SPEECH_MANIFEST, DIGIT_WORDS, AudioClipDataset, AudioRecord, find_audio_files,
                               load_manifest, log_skipped, prepare_speech, scan_audio_folder, shift_right,
                               split_files, write_manifest, write_skipped)
from seqlab.errors import DataError
from seqlab.tasks.plots import save_spectrogram_png
from seqlab.data.mulaw import (LINEAR_MAX_ERROR, LINEAR_ZERO_CODE, MU, MULAW_STEP, ZERO_CODE, linear_decode,
                               linear_encode, mulaw_decode, mulaw_encode, mulaw_error_bound)


def _tone(seconds, rate, freq=440.0, amp=0.5):
    t = np.arange(int(round(seconds * rate))) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# ----------------------------------------------------------------------------- mu-law / linear


def test_mulaw_round_trip_within_quantisation_bound(rng_seed):
    x = torch.cat([torch.linspace(-1, 1, 100_001), torch.rand(50_000) * 2 - 1, torch.randn(10_000) * 1e-3])
    x_hat = mulaw_decode(mulaw_encode(x))
    assert x_hat.dtype == torch.float32 and x_hat.shape == x.shape
    err = (x_hat.double() - x.double()).abs()
    assert bool((err <= mulaw_error_bound(x)).all())
    # The bound is tight: the worst error near full scale is close to (1 + mu) * MULAW_STEP.
    assert 0.9 * (1 + MU) * MULAW_STEP < float(err.max()) <= (1 + MU) * MULAW_STEP + 1e-7
    # In the companded domain the error is at most half a code step, 1 / mu.
    def compand(v):
        return torch.sign(v) * torch.log1p(MU * v.abs()) / math.log1p(MU)
    assert float((compand(x_hat.double()) - compand(x.double())).abs().max()) <= 1.0 / MU + 1e-9


def test_linear_round_trip_within_bound():
    x = torch.linspace(-1, 1, 100_001)
    err = (linear_decode(linear_encode(x)) - x).abs()
    assert float(err.max()) <= LINEAR_MAX_ERROR + 1e-7
    assert float(err.max()) > 0.99 * LINEAR_MAX_ERROR


def test_codes_are_monotonic_cover_0_255_and_decode_is_a_fixed_point():
    x = torch.linspace(-1, 1, 65_537)
    for encode, decode in ((mulaw_encode, mulaw_decode), (linear_encode, linear_decode)):
        codes = encode(x)
        assert codes.dtype == torch.int64
        assert bool((codes.diff() >= 0).all())
        assert sorted(set(codes.tolist())) == list(range(256))
        levels = decode(torch.arange(256))
        assert bool((levels.diff() > 0).all())
        assert torch.equal(encode(levels), torch.arange(256))
    # Out-of-range samples are clamped to the extreme codes.
    assert mulaw_encode(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]


def test_zero_code():
    assert ZERO_CODE == LINEAR_ZERO_CODE == 128
    assert int(mulaw_encode(torch.tensor(0.0))) == ZERO_CODE
    assert int(linear_encode(torch.tensor(0.0))) == LINEAR_ZERO_CODE
    assert abs(float(mulaw_decode(torch.tensor(ZERO_CODE)))) <= MULAW_STEP + 1e-7
    # Tiny signals stay on the zero code or its neighbours: mu-law's fine steps near silence.
    assert set(mulaw_encode(torch.tensor([-5e-5, 0.0, 5e-5])).tolist()) <= {127, 128}


def test_codecs_reject_bad_input():
    with pytest.raises(ValueError, match="sample 2 is nan"):
        mulaw_encode(torch.tensor([0.0, 0.1, float("nan")]))
    with pytest.raises(TypeError, match="integer PCM"):
        mulaw_encode(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="0..255.*max 256"):
        mulaw_decode(torch.tensor([0, 256]))


# ----------------------------------------------------------------------------- file I/O


def test_read_resample_8k_to_16k_doubles_length_and_keeps_pitch(tmp_path):
    wave, rate = read_audio(BUNDLED_SPEECH_MANIFEST.parent / "allison" / "en_US-digits-7.flac")
    assert rate == 8000 and wave.dtype == torch.float32 and wave.shape[0] == 1
    up = resample(wave, 8000, 16000)
    assert abs(up.shape[-1] - 2 * wave.shape[-1]) <= 1
    assert resample(wave, 8000, 8000) is wave
    tone = torch.from_numpy(_tone(1.0, 8000, freq=440.0))
    spectrum = torch.fft.rfft(resample(tone, 8000, 16000)).abs()  # 1 s at 16 kHz: 1 Hz bins
    assert int(spectrum.argmax()) == 440


def test_to_mono_averages_channels():
    stereo = torch.stack([torch.ones(5), -torch.ones(5) * 0.5])
    assert torch.allclose(to_mono(stereo), torch.full((1, 5), 0.25))
    assert to_mono(torch.zeros(7)).shape == (1, 7)


def test_write_wav_round_trip_is_16_bit_and_atomic(tmp_path):
    wave = torch.from_numpy(np.stack([_tone(0.3, 16000), _tone(0.3, 16000, freq=1000.0)]))
    out = write_wav(tmp_path / "sub" / "out.wav", wave, 16000)
    info = sf.info(str(out))
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (16000, 2, 4800, "PCM_16")
    back, rate = read_audio(out)
    assert rate == 16000 and back.dtype == torch.float32 and back.shape == wave.shape
    assert float((back - wave).abs().max()) <= 1.0 / 32768 + 1e-6
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.wav"]  # no temporary left behind
    write_wav(out, torch.zeros(10), 8000)  # overwriting replaces the file whole
    assert sf.info(str(out)).frames == 10 and sf.info(str(out)).samplerate == 8000


def test_save_spectrogram_png(tmp_path):
    path = save_spectrogram_png(torch.from_numpy(_tone(0.5, 16000)), 16000, tmp_path / "spec.png", title="tone")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000


def _bad_files(tmp_path):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" + bytes(range(200)))
    empty = tmp_path / "empty.flac"
    empty.write_bytes(b"")
    zero = tmp_path / "zero_length.wav"
    sf.write(str(zero), np.zeros((0, 1), dtype=np.float32), 16000, subtype="PCM_16")
    nan = tmp_path / "nan.wav"
    samples = _tone(0.1, 16000)
    samples[37] = np.nan
    sf.write(str(nan), samples, 16000, subtype="FLOAT")
    m4a = tmp_path / "speech.m4a"
    m4a.write_bytes(b"\x00\x00\x00\x20ftypM4A " + bytes(100))
    return {
        "corrupt": (corrupt, "cannot decode as WAV.*corrupt"),
        "empty": (empty, "empty \\(0 bytes\\)"),
        "zero_length": (zero, "zero samples"),
        "nan": (nan, "sample 37 of channel 0 is nan"),
        "unsupported": (m4a, "unsupported audio format '.m4a'.*ffmpeg"),
    }


@pytest.mark.parametrize("case", ["corrupt", "empty", "zero_length", "nan", "unsupported"])
def test_bad_audio_raises_naming_the_file(tmp_path, case):
    path, message = _bad_files(tmp_path)[case]
    with pytest.raises(AudioFileError, match=message) as err:
        read_audio(path)
    assert str(path) in str(err.value) and isinstance(err.value, DataError)
    # The dataset surfaces the same error when such a file is named in its list.
    with pytest.raises(AudioFileError) as err:
        AudioClipDataset([path])
    assert str(path) in str(err.value)


# Formats libsndfile writes as well as reads; MP3 needs libsndfile >= 1.1 built with it.
ROUND_TRIP = [(f, s) for f, s in (("AIFF", ".aiff"), ("CAF", ".caf"), ("AU", ".au"), ("W64", ".w64"),
                                  ("OGG", ".ogg"), ("MP3", ".mp3")) if f in sf.available_formats()]


def test_supported_suffixes_follow_libsndfile():
    assert {".wav", ".flac", ".ogg", ".aiff", ".aif", ".caf", ".au", ".w64"} <= set(SUPPORTED_SUFFIXES)
    assert (".mp3" in SUPPORTED_SUFFIXES) == ("MP3" in sf.available_formats())
    assert not {".txt", ".yaml", ".csv", ".m4a", ".mat", ""} & set(SUPPORTED_SUFFIXES)


@pytest.mark.parametrize("fmt,suffix", ROUND_TRIP, ids=[f for f, _ in ROUND_TRIP])
def test_every_libsndfile_format_reads(tmp_path, fmt, suffix):
    tone = _tone(0.25, 16000)
    path = tmp_path / f"tone{suffix}"
    sf.write(str(path), tone, 16000, format=fmt)
    wave, rate = read_audio(path)
    assert rate == 16000 and wave.shape[0] == 1
    # Lossy codecs (Vorbis, MP3) shift and pad: compare the pitch, not the samples.
    spectrum = torch.fft.rfft(wave[0, :4000]).abs()  # 0.25 s: 4 Hz bins
    assert int(spectrum.argmax()) == 110  # 440 Hz


def _mixed_folder(root):
    """Usable: a.wav, b.aiff, c.caf (+ .MP3 upper case if libsndfile reads MP3). Skipped:
    corrupt.flac, empty.wav, talk.m4a. Passed over: notes, manifests, hidden files."""
    (root / "ann").mkdir(parents=True)
    (root / "bob" / ".cache").mkdir(parents=True)
    (root / ".git").mkdir()
    tone = _tone(0.1, 16000)
    sf.write(str(root / "ann" / "a.wav"), tone, 16000, subtype="PCM_16")
    sf.write(str(root / "ann" / "b.aiff"), tone, 16000, format="AIFF")
    sf.write(str(root / "bob" / "c.caf"), tone, 16000, format="CAF")
    usable = ["a.wav", "b.aiff", "c.caf"]
    if "MP3" in sf.available_formats():
        sf.write(str(root / "bob" / "d.MP3"), tone, 16000, format="MP3")
        usable.append("d.MP3")
    (root / "bob" / "corrupt.flac").write_bytes(b"fLaC" + bytes(64))
    (root / "bob" / "empty.wav").write_bytes(b"")
    (root / "bob" / "talk.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A " + bytes(64))
    (root / "notes.txt").write_text("recorded in May\n")
    (root / "manifest.yaml").write_text("items: []\n")
    (root / "ann" / "._a.wav").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # a macOS fork
    (root / "bob" / ".cache" / "x.wav").write_bytes(b"junk")
    (root / ".git" / "y.flac").write_bytes(b"junk")
    return usable


def test_folder_scan_reads_every_format_and_reports_the_skipped(tmp_path, caplog):
    usable = _mixed_folder(tmp_path / "audio")
    found = scan_audio_folder(tmp_path / "audio")
    assert sorted(r.path.name for r in found.records) == sorted(usable)
    reasons = {f.path.name: f.reason for f in found.skipped}
    assert sorted(reasons) == ["corrupt.flac", "empty.wav", "talk.m4a"]
    assert "cannot decode as FLAC" in reasons["corrupt.flac"]
    assert "empty (0 bytes)" in reasons["empty.wav"]
    assert "unsupported audio format '.m4a'" in reasons["talk.m4a"]
    # Every usable file loads; the skipped ones never reach the dataset.
    ds = AudioClipDataset(tmp_path / "audio", clip_seconds=0.1)
    assert len(ds) == len(usable) and all(int(ds[i].length) == 1600 for i in range(len(ds)))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="seqlab.data.audio"):
        assert [r.path.name for r in find_audio_files(tmp_path / "audio")] == [r.path.name for r in found.records]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and all(line.startswith("skipped ") for line in lines)
    assert not any("notes.txt" in line or "._a.wav" in line or ".git" in line for line in lines)


def test_skipped_files_log_is_bounded_and_listed(tmp_path, caplog):
    folder = tmp_path / "audio"
    folder.mkdir()
    for i in range(25):
        (folder / f"broken_{i:02d}.wav").write_bytes(b"RIFFjunk")
    sf.write(str(folder / "good.flac"), _tone(0.1, 16000), 16000)
    found = scan_audio_folder(folder)
    assert len(found.records) == 1 and len(found.skipped) == 25
    listing = write_skipped(found.skipped, tmp_path / "run" / "skipped_files.csv")
    with caplog.at_level(logging.WARNING, logger="seqlab.data.audio"):
        log_skipped(found.skipped, folder, listing, limit=10)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 11 and "15 more audio files skipped" in lines[-1] and str(listing) in lines[-1]
    rows = listing.read_text().splitlines()
    assert rows[0] == "path,reason" and len(rows) == 26 and "broken_24.wav" in rows[-1]


def test_folder_without_usable_audio_names_what_was_skipped(tmp_path):
    (tmp_path / "only_bad.wav").write_bytes(b"")
    (tmp_path / "readme.md").write_text("no audio here")
    with pytest.raises(DataError, match="all 1 audio files were skipped.*only_bad.wav: file is empty"):
        scan_audio_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        scan_audio_folder(tmp_path / "nowhere")


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.wav"):
        read_audio(tmp_path / "nowhere.wav")


# ----------------------------------------------------------------------------- datasets


@pytest.fixture
def speech_folder(tmp_path):
    """Two speakers, 16 kHz: a 0.5 s clip, a 1.5 s clip and an 8 kHz 0.25 s clip."""
    root = tmp_path / "speech"
    (root / "ann").mkdir(parents=True)
    (root / "bob").mkdir()
    sf.write(str(root / "ann" / "short.wav"), _tone(0.5, 16000), 16000, subtype="PCM_16")
    sf.write(str(root / "bob" / "long.wav"), _tone(1.5, 16000, freq=300.0) * np.linspace(0.1, 1, 24000,
             dtype=np.float32), 16000, subtype="PCM_16")
    sf.write(str(root / "bob" / "low_rate.flac"), _tone(0.25, 8000), 8000, subtype="PCM_16")
    return root


def test_pad_mode_pads_with_zero_code_and_shifts_inputs(speech_folder):
    ds = AudioClipDataset(speech_folder, rate=16000, clip_seconds=1.0)
    assert [r.path.name for r in ds.records] == ["short.wav", "long.wav", "low_rate.flac"]
    assert ds.speakers == ["ann", "bob"]
    lengths = [int(ds[i].length) for i in range(len(ds))]
    assert lengths == [8000, 16000, 4000]  # 0.25 s at 8 kHz resampled to 16 kHz: 4000 samples
    for i in range(len(ds)):
        inputs, targets, length = ds[i]
        assert inputs.shape == targets.shape == (16000,)
        assert inputs.dtype == targets.dtype == length.dtype == torch.int64
        assert int(inputs[0]) == ZERO_CODE and torch.equal(inputs[1:], targets[:-1])
        assert bool((targets[int(length):] == ZERO_CODE).all())
    short, _ = read_audio(speech_folder / "ann" / "short.wav")
    assert torch.equal(ds[0].targets[:8000], mulaw_encode(short[0]))
    # Long files are cut to their first clip.
    long, _ = read_audio(speech_folder / "bob" / "long.wav")
    assert torch.equal(ds[1].targets, mulaw_encode(long[0, :16000]))
    batch = torch.utils.data.default_collate([ds[0], ds[2]])
    assert batch.inputs.shape == (2, 16000) and batch.length.tolist() == [8000, 4000]


def test_linear_encoding_and_normalize(speech_folder):
    ds = AudioClipDataset(speech_folder, encoding="linear", normalize=True, clip_seconds=0.5)
    assert all(abs(float(w.abs().max()) - 1.0) < 1e-6 for w in ds.waves)
    assert int(ds[0].targets.max()) == 255 and int(ds[0].targets.min()) == 0


def test_crop_mode_is_deterministic_per_seed_epoch_index(speech_folder):
    kwargs = dict(mode="crop", clip_seconds=0.25, crops_per_file=3, seed=7)
    a, b = AudioClipDataset(speech_folder, **kwargs), AudioClipDataset(speech_folder, **kwargs)
    assert len(a) == 9
    full = a._codes[1].to(torch.int64)  # long.wav: items 3, 4, 5
    starts = {}
    for epoch in range(4):
        a.set_epoch(epoch)
        for index in (3, 4, 5):
            clip = a[index]
            assert torch.equal(clip.targets, b.clip(index, epoch).targets)
            assert int(clip.length) == 4000
            # Candidate starts agree on the first 64 codes; then check the whole window.
            near = (full.unfold(0, 64, 1)[:full.numel() - 4000 + 1] == clip.targets[:64]).all(dim=1).nonzero()
            hits = [int(s) for s in near.flatten() if torch.equal(full[s:s + 4000], clip.targets)]
            assert hits, "a crop must be a contiguous window of the file"
            starts[(epoch, index)] = hits[0]
    assert len(set(starts.values())) > 6  # 12 draws from 20001 starts: nearly all distinct
    other_seed = AudioClipDataset(speech_folder, **{**kwargs, "seed": 8})
    assert not torch.equal(other_seed.clip(3, 0).targets, a.clip(3, 0).targets)
    # A file shorter than the crop is padded, not cropped.
    assert int(a.clip(6, 0).length) == 4000 and int(a.clip(6, 5).length) == 4000


def test_wrong_rate_with_resample_off_names_file_and_rates(speech_folder):
    with pytest.raises(AudioFileError, match="8000 Hz.*16000 Hz.*resample=False") as err:
        AudioClipDataset(speech_folder, resample=False)
    assert "low_rate.flac" in str(err.value)
    ds = AudioClipDataset(speech_folder, resample=True)
    assert ds.waves[2].numel() == 4000


def test_bad_arguments_are_named(speech_folder):
    with pytest.raises(ValueError, match="mode='loop'"):
        AudioClipDataset(speech_folder, mode="loop")
    with pytest.raises(ValueError, match="encoding='alaw'"):
        AudioClipDataset(speech_folder, encoding="alaw")
    with pytest.raises(ValueError, match="carries no split"):
        AudioClipDataset(speech_folder, split="train")


def test_shift_right_batched():
    codes = torch.tensor([[5, 6, 7], [1, 2, 3]])
    assert shift_right(codes).tolist() == [[ZERO_CODE, 5, 6], [ZERO_CODE, 1, 2]]


# ----------------------------------------------------------------------------- splits and manifests


def _records(n_speakers=6, per_speaker=5):
    return [AudioRecord(path=f"/data/s{s}/f{i}.wav", speaker=f"s{s}") for s in range(n_speakers) for i in range(per_speaker)]


def test_split_by_speaker_has_no_leakage_and_is_deterministic():
    records = _records(10, 4)
    parts = split_files(records, by="speaker", fractions=(0.8, 0.1, 0.1), seed=3)
    speakers = {k: {r.speaker for r in v} for k, v in parts.items()}
    assert [len(speakers[k]) for k in ("train", "valid", "test")] == [8, 1, 1]
    assert not (speakers["train"] & speakers["valid"] or speakers["train"] & speakers["test"]
                or speakers["valid"] & speakers["test"])
    assert sorted(sum(parts.values(), []), key=str) == sorted(records, key=str)
    assert split_files(records, seed=3) == parts
    assert any(split_files(records, seed=s)["test"] != parts["test"] for s in range(4, 10))


def test_split_by_file_and_by_parent_folder():
    paths = [f"/data/spk{i % 3}/clip{i}.wav" for i in range(30)]
    parts = split_files(paths, by="file", fractions=(0.8, 0.1, 0.1), seed=0)
    assert [len(parts[k]) for k in ("train", "valid", "test")] == [24, 3, 3]
    by_folder = split_files(paths, by="speaker", seed=0)  # speaker = parent folder name
    assert [len(by_folder[k]) for k in ("train", "valid", "test")] == [10, 10, 10]


def test_split_errors_are_actionable():
    with pytest.raises(ValueError, match="2 speaker.*cannot fill 3 splits"):
        split_files(_records(2, 3), by="speaker")
    with pytest.raises(ValueError, match="summing to 1"):
        split_files(_records(), fractions=(0.5, 0.1, 0.1))
    assert [len(v) for v in split_files(_records(2, 3), fractions=(0.5, 0.5, 0.0)).values()] == [3, 3, 0]


def test_manifest_csv_round_trip_and_errors(speech_folder, tmp_path):
    records = [AudioRecord(path=p, speaker=p.parent.name, split=s, label="tone", extra={"lang": "xx"})
               for p, s in zip(sorted(speech_folder.rglob("*.wav")), ("train", "test"))]
    manifest = write_manifest(records, speech_folder / "manifest.csv")
    assert manifest.read_text().splitlines()[1] == "ann/short.wav,ann,train,tone,,xx"
    loaded = load_manifest(manifest)
    assert [(r.path, r.speaker, r.split, r.label, r.extra) for r in loaded] == \
        [(r.path.resolve(), r.speaker, r.split, "tone", {"lang": "xx"}) for r in records]
    assert len(AudioClipDataset(manifest, split="test", clip_seconds=0.1)) == 1
    bad = tmp_path / "bad.csv"
    bad.write_text("path,speaker,split\nann/short.wav,ann,validation\n")
    with pytest.raises(ValueError, match="bad.csv: entry 0 .*split 'validation'"):
        load_manifest(bad)


def test_bundled_manifest_loads_with_speaker_level_split():
    records = load_manifest(BUNDLED_SPEECH_MANIFEST)
    assert len(records) == 115
    assert Counter((r.speaker, r.split) for r in records) == {
        ("allison", "train"): 46, ("carlo", "train"): 23, ("ivrvoiceru", "valid"): 23, ("june", "test"): 23}
    assert sum(r.label in DIGIT_WORDS for r in records) == 50
    total = sum(p.stat().st_size for p in BUNDLED_SPEECH_MANIFEST.parent.rglob("*") if p.is_file())
    assert total < 2.5e6
    test = AudioClipDataset(BUNDLED_SPEECH_MANIFEST, split="test")
    assert test.speakers == ["june"] and len(test) == 23
    lengths = torch.stack([test[i].length for i in range(len(test))])
    assert int(lengths.max()) == 16000 and int(lengths.min()) > 4000  # 8 kHz digits, >= 0.25 s, resampled
    inputs, targets, length = test[0]
    assert inputs.shape == (16000,) and int(inputs[0]) == ZERO_CODE
    speech = targets[:int(length)]
    assert len(set(speech.tolist())) > 60  # real speech uses many mu-law levels


# ----------------------------------------------------------------------------- prepare_speech


def _fake_espeak(folder, tone_wav):
    """An `espeak-ng` stand-in: copies a 22,050 Hz tone to the -w path and logs its arguments."""
    script = folder / "espeak-ng"
    script.write_text('#!/bin/sh\necho "$@" >> "$(dirname "$0")/calls.log"\n'
                      'while [ $# -gt 0 ]; do [ "$1" = "-w" ] && cp "%s" "$2"; shift; done\n' % tone_wav)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return folder / "calls.log"


def test_prepare_speech_builds_sc09_like_set(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tone = tmp_path / "tone.wav"
    sf.write(str(tone), np.concatenate([np.zeros(2205, np.float32), _tone(0.4, 22050)]), 22050, subtype="PCM_16")
    calls = _fake_espeak(bin_dir, tone)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "sc09"
    manifest = prepare_speech(out, sources=[BUNDLED_SPEECH_MANIFEST], espeak_voices=["en-us+m1"], pitches=(50,),
                              speeds=(160,))
    records = load_manifest(manifest)
    assert len(records) == 60  # 5 voice folders x 10 digits + 1 synthetic voice x 10 digits
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(DIGIT_WORDS)
    assert calls.read_text().splitlines()[0].startswith("-v en-us+m1 -p 50 -s 160 -w ")
    assert (out / "seven" / "espeak-en-us+m1_p50-s160.wav").is_file()
    assert (out / "zero" / "june_fr_CA-digits-0.wav").is_file()
    for r in records[::7]:
        info = sf.info(str(r.path))
        assert (info.samplerate, info.frames, info.subtype) == (16000, 16000, "PCM_16")
        assert r.path.parent.name == r.label
    splits = {}
    for r in records:
        splits.setdefault(r.speaker, set()).add(r.split)
    assert all(len(s) == 1 for s in splits.values()) and set().union(*splits.values()) == {"train", "valid", "test"}
    # Leading silence of the synthetic word is trimmed to the 50 ms margin.
    clip, _ = read_audio(out / "one" / "espeak-en-us+m1_p50-s160.wav")
    assert float(clip[0, :400].abs().max()) < 1e-3 and float(clip[0, 800:1600].abs().max()) > 0.3


def test_prepare_speech_skips_espeak_cleanly_when_missing(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("seqlab.data.audio.shutil.which", lambda name: None)
    subset = tmp_path / "subset.csv"
    write_manifest([r for r in load_manifest(BUNDLED_SPEECH_MANIFEST)
                    if r.label in ("zero", "one")], subset)
    with caplog.at_level(logging.WARNING, logger="seqlab.data.audio"):
        manifest = prepare_speech(tmp_path / "out", sources=[subset], espeak_voices=None)
    assert "espeak-ng not found" in caplog.text
    records = load_manifest(manifest)
    assert len(records) == 10 and not any(r.speaker.startswith("espeak") for r in records)
