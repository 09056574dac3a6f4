"""Held-out audio scored whole: files streamed from disk block by block (stream_wave /
stream_codes) and through the model chunk by chunk with the recurrent state carried over
(file_nll), against one pass over everything in memory."""
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from seqlab.data.audio_io import read_audio, resample, stream_wave, to_mono
from seqlab.data.audio import AudioClipDataset, AudioRecord, shift_right, stream_codes
from seqlab.data.mulaw import ZERO_CODE
from seqlab.tasks.audio import AudioBatch, code_nll, file_nll, files_bits_per_sample
from seqlab.model import MambaConfig, MambaLM

CPU = torch.device("cpu")


def _speechlike(seconds, rate, gain, channels=1, seed=0):
    """Noise through a slow envelope: every code level in use, changing loudness."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * rate))
    env = 0.2 + 0.8 * np.abs(np.sin(np.linspace(0, 7, n)))[:, None]
    return (gain * env * rng.uniform(-1, 1, (n, channels))).astype(np.float32)


@pytest.mark.parametrize("rate,channels,normalize", [(8000, 1, True), (16000, 2, True), (16000, 1, False)])
def test_stream_codes_equal_the_datasets_codes(tmp_path, rate, channels, normalize):
    path = tmp_path / "take.flac"
    sf.write(str(path), _speechlike(2.3, rate, gain=0.05, channels=channels), rate, subtype="PCM_16")
    ds = AudioClipDataset([path], rate=16000, clip_seconds=0.1, normalize=normalize)
    for block_seconds in (0.07, 0.5, 10.0):
        codes = torch.cat(list(stream_codes(path, 16000, "mulaw", normalize, block_seconds)))
        assert torch.equal(codes, ds._codes[0].to(torch.int64)), block_seconds


@pytest.mark.parametrize("rate", [22050, 44100, 11025])
def test_stream_wave_equals_one_pass_resampling(tmp_path, rate):
    """Non-integer rate ratios: the blocks carry the resampler's full context, so they agree
    with resampling the whole file to float32 rounding (conv1d may sum in another order)."""
    path = tmp_path / "take.wav"
    sf.write(str(path), _speechlike(1.7, rate, gain=0.5, channels=2), rate, subtype="FLOAT")
    wave, file_rate = read_audio(path)
    whole = resample(to_mono(wave), file_rate, 16000)[0]
    streamed = torch.cat(list(stream_wave(path, 16000, block_seconds=0.13)))
    assert streamed.shape == whole.shape
    assert float((streamed - whole).abs().max()) < 1e-6


def test_stream_wave_reads_a_block_at_a_time(tmp_path, monkeypatch):
    path = tmp_path / "long.wav"
    sf.write(str(path), _speechlike(30.0, 8000, gain=0.5), 8000, subtype="PCM_16")
    reads = []
    original = sf.SoundFile.read

    def spy(self, frames=-1, *args, **kwargs):
        reads.append(frames)
        return original(self, frames, *args, **kwargs)

    monkeypatch.setattr(sf.SoundFile, "read", spy)
    n = sum(b.numel() for b in stream_wave(path, 16000, block_seconds=1.0))
    assert n == 480_000
    # 30 blocks of 8000 frames plus the resampler's context on each side, never the file.
    assert len(reads) == 30 and 0 < max(reads) <= 8000 + 2 * 64


def tiny_lm(**kw):
    model = MambaLM(MambaConfig(d_model=16, n_layer=2, d_state=4, vocab_size=256, **kw)).eval()
    with torch.no_grad():
        # Sharper logits than at initialisation, so the context (the carried state) shows.
        model.lm_head.weight.mul_(20)
    return model


def _one_pass_nats(model, codes):
    with torch.no_grad():
        loss, n = code_nll(model, AudioBatch(shift_right(codes)[None], codes[None], torch.tensor([codes.numel()])))
    return loss.item() * n


@pytest.mark.parametrize("kw,n", [({}, 600), ({"pool_factors": [2, 2]}, 160), ({"selective": False}, 600)],
                         ids=["mamba", "multiscale", "lti"])
def test_chunked_nll_equals_one_pass(rng_seed, kw, n):
    """A multi-scale model's prefill steps token by token, hence its shorter sequence."""
    model = tiny_lm(**kw)
    codes = torch.randint(0, 256, (n,))
    full = _one_pass_nats(model, codes)
    blocks = [codes[:100], codes[100:101], codes[101:]]  # block edges apart from chunk edges
    for chunk in (n, 37, 16):
        nats, count = file_nll(model, blocks, ZERO_CODE, chunk, CPU)
        assert count == n
        assert nats == pytest.approx(full, rel=2e-6), chunk
    # The carried state matters: a chunk scored from a fresh state differs from the same
    # positions of the one pass (chunk by chunk, so differences of opposite sign cannot cancel;
    # the largest difference was at least 0.17 nats over 12 seeds of each model).
    with torch.no_grad():
        logp = torch.log_softmax(model(shift_right(codes)[None]).float()[0, :, :256], -1)
    per_position = -logp.gather(1, codes[:, None])[:, 0].double()
    gaps = [abs(file_nll(model, [codes[s:s + 37]], int(codes[s - 1]), 37, CPU)[0]
                - per_position[s:s + 37].sum().item()) for s in range(37, n, 37)]
    assert max(gaps) > 0.01


def test_file_nll_memory_follows_the_chunk(rng_seed):
    model = tiny_lm()
    lengths = []
    forward = model.forward

    def spy(ids, *args, **kwargs):
        lengths.append(ids.shape[1])
        return forward(ids, *args, **kwargs)

    model.forward = spy
    blocks = (torch.randint(0, 256, (5000,)) for _ in range(8))  # a generator: never all in memory
    nats, n = file_nll(model, blocks, ZERO_CODE, 512, CPU)
    assert n == 40_000 and math.isfinite(nats)
    assert max(lengths) == 512 and len(lengths) == 8 * 10


def test_files_bits_per_sample_scores_whole_files(tmp_path, rng_seed):
    model = tiny_lm()
    paths = []
    for i, seconds in enumerate((0.05, 0.12)):
        paths.append(tmp_path / f"f{i}.wav")
        sf.write(str(paths[-1]), _speechlike(seconds, 8000, gain=0.1, seed=i), 8000, subtype="PCM_16")
    records = [AudioRecord(p, "spk") for p in paths]
    bits = files_bits_per_sample(model, records, 16000, "mulaw", True, 0.01, ZERO_CODE, CPU)
    # The same files, whole, as one padded batch of dataset clips (pad mode, clip = longest).
    ds = AudioClipDataset(records, rate=16000, clip_seconds=0.12, normalize=True)
    nats = [_one_pass_nats(model, ds[i].targets[:int(ds[i].length)]) for i in range(2)]
    assert bits == pytest.approx(sum(nats) / (800 + 1920) / math.log(2), rel=1e-5)
