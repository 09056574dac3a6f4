"""train_audio / generate_audio end to end on the bundled speech, and the audio and model
benchmarks at --quick sizes.

One tiny model is trained once per module (about half a minute on a shared CPU) and every
generation test samples from it.
"""
import json
import logging
import time

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file

from helpers.benchmarks import load_benchmark
from seqlab.cli import compose, run_job
from seqlab.data.audio import BUNDLED_SPEECH_MANIFEST, AudioClipDataset, load_manifest
from seqlab.data.audio_io import AudioFileError, read_audio, write_wav
from seqlab.data.mulaw import mulaw_decode
from seqlab.model import MambaLM
from seqlab.tasks.audio import AudioBatch, AudioLMTask, code_nll
from seqlab.tasks.audio_sampling import load_prompt
from seqlab.training.rundir import RunDir

RATE = 16000


def _run(recipe, tmp, **over):
    cfg = compose(recipe, [f"{k}={v}" for k, v in over.items()] + [f"run_dir={tmp}"])
    return run_job(cfg)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on 2 shared, busy cores, 2 threads made these small models ~30x
    slower (measured: 800 vs 25,000 tokens/s), their synchronisation dominating the work."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("train_audio")
    summary = _run("train_audio", run_dir, **{
        "model.d_model": 32, "model.n_layer": 1, "data.clip_seconds": 0.125,
        "trainer.micro_batch_size": 4, "trainer.max_steps": 120, "trainer.max_minutes": 5.0,
        "trainer.lr": 0.01, "trainer.warmup_steps": 5, "trainer.log_every": 5,
        "trainer.eval_every": 40, "trainer.ckpt_every": 40, "trainer.progress": False,
        "eval.max_clips": 4, "sample.seconds": 0.05})
    return run_dir, summary


def _generate(tmp, ckpt, **over):
    params = {"checkpoint": ckpt, "n_samples": 2, "seconds": 0.05, "progress": False}
    params.update(over)
    return _run("generate_audio", tmp, **params)


def test_code_nll_ignores_padding():
    model = torch.nn.Sequential(torch.nn.Embedding(256, 256))
    model.forward = lambda ids, lengths=None: model[0](ids)  # (B, T, 256) logits
    ids = torch.randint(0, 256, (2, 10))
    tgt = torch.randint(0, 256, (2, 10))
    lengths = torch.tensor([10, 4])
    a, n = code_nll(model, AudioBatch(ids, tgt, lengths))
    tgt2 = tgt.clone()
    tgt2[1, 4:] = (tgt2[1, 4:] + 7) % 256
    b, _ = code_nll(model, AudioBatch(ids, tgt2, lengths))
    assert n == 14 and torch.equal(a, b)


def test_train_audio_checkpoints_metrics_and_sample(trained):
    run_dir, summary = trained
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    spec = json.loads((ckpt / "config.json").read_text())
    audio = spec["extra"]["audio"]
    assert spec["architecture"] == "MambaLM" and "seqlab_version" in spec
    assert audio["rate"] == RATE and spec["model"]["vocab_size"] == 256
    assert audio["normalize"] is True and audio["encoding"] == "mulaw"
    evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if r["split"] == "eval"]
    assert evals and all(np.isfinite(r["val_bits_per_sample"]) for r in evals)
    # Below a uniform guess over 256 codes: the model learnt something about speech.
    assert summary["val_bits_per_sample"] < 7.5, summary
    # xz and the order-2 context model on the same held-out codes, beside the model.
    for key in ("baseline_xz_bits_per_sample", "baseline_context2_bits_per_sample"):
        assert 0.0 < summary[key] < 9.0, summary
    split = summary["baseline_split"]
    assert f"{split}_bits_per_sample" in summary and summary["baseline_samples"] > 0
    assert summary["beats_baseline"] in ("yes", "no")
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    info = sf.info(summary["sample_wav"])
    assert info.samplerate == RATE and info.frames == 800 and info.subtype == "PCM_16"
    assert "sample_cut" not in summary and summary["sample_seconds"] == 0.05


def test_generation_deterministic_format_and_not_silent(trained, tmp_path):
    run_dir, _ = trained
    a = _generate(tmp_path / "a", run_dir, seed=3)
    b = _generate(tmp_path / "b", run_dir, seed=3)
    c = _generate(tmp_path / "c", run_dir, seed=4)
    assert a["rate"] == RATE and a["samples_per_s"] > 0 and a["real_time_factor"] > 0
    assert len(a["wavs"]) == 2 and len(a["plots"]) == 2
    for wa, wb, wc, png in zip(a["wavs"], b["wavs"], c["wavs"], a["plots"]):
        info = sf.info(wa)
        assert (info.samplerate, info.frames, info.channels, info.subtype) == (RATE, 800, 1, "PCM_16")
        x, _ = sf.read(wa, dtype="int16")
        assert np.array_equal(x, sf.read(wb, dtype="int16")[0])
        assert not np.array_equal(x, sf.read(wc, dtype="int16")[0])
        assert len(np.unique(x)) > 20 and np.abs(x.astype(float)).max() > 100  # not silent/constant
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_prompt_continuation_keeps_prompt(trained, tmp_path):
    run_dir, _ = trained
    rec = load_manifest(BUNDLED_SPEECH_MANIFEST)[0]
    wave, rate = read_audio(rec.path)  # 8 kHz: the job resamples to 16 kHz
    prompt = tmp_path / "prompt.wav"
    write_wav(prompt, torch.cat([wave, wave])[:, int(0.2 * rate):int(0.24 * rate)], rate)  # stereo
    out = _generate(tmp_path / "gen", run_dir, prompt=str(prompt), seed=1)
    codes = load_prompt(prompt, RATE, "mulaw", max_seconds=10.0, normalize=True)  # as trained
    P = codes.numel()
    assert out["prompt_samples"] == P and P == 640
    expect = mulaw_decode(codes).numpy()
    for w in out["wavs"]:
        x, sr = sf.read(w, dtype="float32")
        assert sr == RATE and len(x) == P + 800
        np.testing.assert_allclose(x[:P], expect, atol=1.0 / 32767)


@pytest.mark.parametrize("case", ["empty", "corrupt", "too_long", "missing"])
def test_bad_prompt_names_file_and_writes_nothing(trained, tmp_path, case):
    run_dir, _ = trained
    prompt = tmp_path / "prompt.wav"
    over = {}
    if case == "empty":
        prompt.write_bytes(b"")
        err, words = AudioFileError, "empty"
    elif case == "corrupt":
        prompt.write_bytes(b"RIFF\x00\x01garbage" * 8)
        err, words = AudioFileError, "corrupt"
    elif case == "too_long":
        write_wav(prompt, np.zeros(RATE // 2, np.float32) + 0.1, RATE)
        over = {"max_prompt_seconds": 0.1}
        err, words = ValueError, "0.50 s"
    else:
        err, words = FileNotFoundError, "no such"
    out = tmp_path / "gen"
    with pytest.raises(err) as info:
        _generate(out, run_dir, prompt=str(prompt), **over)
    assert str(prompt) in str(info.value) and words in str(info.value)
    assert not (out / "samples").exists() or not any((out / "samples").iterdir())
    assert json.loads((out / "status.json").read_text())["status"] == "failed"


def test_nan_model_is_refused(trained, tmp_path):
    run_dir, _ = trained
    src = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    bad = tmp_path / "bad_ckpt"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    from safetensors import safe_open
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
             for k, v in load_file(str(src / "model.safetensors")).items()}
    save_file(state, str(bad / "model.safetensors"), metadata=meta)
    out = tmp_path / "gen"
    with pytest.raises(ValueError, match="NaN") as info:
        _generate(out, bad)
    assert str(bad) in str(info.value)
    assert not (out / "samples").exists()


def test_bench_audio_quick(capsys):
    main = load_benchmark("audio").main
    rows = main(["--device", "cpu", "--quick"])
    assert [r["name"] for r in rows] == ["gen_b1", "gen_b64", "train"]
    assert all(r["value"] > 0 for r in rows)
    text = capsys.readouterr().out
    assert "mamba_ssm H200" in text and "tokens/s" in text
    # Quick sizes are not compared with the peer's full-size figures.
    assert all(r["peer"] is None and r["meets_target"] is None for r in rows)


def test_bench_model_quick(capsys, tmp_path):
    import json

    main = load_benchmark("model").main
    out = tmp_path / "model.json"
    rows = main(["--device", "cpu", "--quick", "--steps", "1", "--json", str(out)])
    assert [r["name"] for r in rows] == ["train_130m", "train_caduceus", "decode_130m_b1_cg0",
                                         "decode_130m_b4_cg0"]
    assert all(r["value"] > 0 and r["peer"] is None for r in rows)
    assert json.loads(out.read_text())["rows"][0]["name"] == "train_130m"
    assert "train 130m causal" in capsys.readouterr().out


def test_train_audio_folder_source_pad_mode(tmp_path):
    """A plain folder (speaker = sub-folder, no split column) is split by speaker; SC09-like
    fixed clips (pad mode) train and evaluate."""
    import shutil
    records = load_manifest(BUNDLED_SPEECH_MANIFEST)
    folder = tmp_path / "audio"
    for speaker in ("allison", "carlo", "june"):
        for r in [r for r in records if r.speaker == speaker][:2]:
            (folder / speaker).mkdir(parents=True, exist_ok=True)
            shutil.copy(r.path, folder / speaker / r.path.name)
    summary = _run("train_audio", tmp_path / "run", **{
        "data.source": str(folder), "data.mode": "pad", "data.clip_seconds": 0.05,
        "model.d_model": 16, "model.n_layer": 1, "trainer.micro_batch_size": 2,
        "trainer.max_steps": 2, "trainer.progress": False, "sample.seconds": 0})
    assert np.isfinite(summary["val_bits_per_sample"]) and np.isfinite(summary["test_bits_per_sample"])
    assert "sample_wav" not in summary


# ----------------------------------------------------------------------------- prompts as trained


def _low_gain_prompt(tmp_path, gain=0.05):
    """0.04 s of bundled speech (8 kHz) at low gain: normalising changes every code."""
    wave, rate = read_audio(load_manifest(BUNDLED_SPEECH_MANIFEST)[0].path)
    quiet = wave[:, int(0.2 * rate):int(0.24 * rate)]
    quiet = gain * quiet / quiet.abs().max()
    return write_wav(tmp_path / "quiet.wav", quiet, rate)


def _prompt_part(summary):
    P = summary["prompt_samples"]
    return [sf.read(w, dtype="float32")[0][:P] for w in summary["wavs"]]


def test_low_gain_prompt_encodes_as_training_did(trained, tmp_path):
    """The checkpoint records data.normalize=true: a quiet prompt is normalised as every
    training file was, so its codes are the ones training would have made of that file."""
    run_dir, _ = trained
    prompt = _low_gain_prompt(tmp_path)
    as_trained = AudioClipDataset([prompt], rate=RATE, clip_seconds=0.04, normalize=True)._codes[0].long()
    codes = load_prompt(prompt, RATE, "mulaw", max_seconds=10.0, normalize=True)
    assert torch.equal(codes, as_trained) and codes.numel() == 640
    assert not torch.equal(codes, load_prompt(prompt, RATE, "mulaw", max_seconds=10.0))
    out = _generate(tmp_path / "gen", run_dir, prompt=str(prompt), seed=1)
    for x in _prompt_part(out):
        np.testing.assert_allclose(x, mulaw_decode(as_trained).numpy(), atol=1.0 / 32767)


def test_checkpoint_without_normalize_keeps_old_prompts_and_warns(trained, tmp_path, caplog):
    run_dir, _ = trained
    src = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    old = tmp_path / "old_ckpt"
    old.mkdir()
    spec = json.loads((src / "config.json").read_text())
    del spec["extra"]["audio"]["normalize"]
    (old / "config.json").write_text(json.dumps(spec))
    (old / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    prompt = _low_gain_prompt(tmp_path)
    with caplog.at_level(logging.WARNING, logger="seqlab"):
        out = _generate(tmp_path / "gen", old, prompt=str(prompt), seed=1)
    assert "prompt_normalize=true" in caplog.text and str(old / "config.json") in caplog.text
    raw = mulaw_decode(load_prompt(prompt, RATE, "mulaw", max_seconds=10.0)).numpy()
    for x in _prompt_part(out):
        np.testing.assert_allclose(x, raw, atol=1.0 / 32767)
    fixed = _generate(tmp_path / "gen2", old, prompt=str(prompt), seed=1, prompt_normalize="true")
    normalised = mulaw_decode(load_prompt(prompt, RATE, "mulaw", max_seconds=10.0, normalize=True)).numpy()
    for x in _prompt_part(fixed):
        np.testing.assert_allclose(x, normalised, atol=1.0 / 32767)


# ----------------------------------------------------------------------------- time budget


def _task(tmp_path, **over):
    over = {"model.d_model": 32, "model.n_layer": 1, "data.clip_seconds": 0.125, "eval.max_clips": 2,
            "trainer.max_minutes": 1.0, **over}
    return AudioLMTask(compose("train_audio", [f"{k}={v}" for k, v in over.items()] + [f"run_dir={tmp_path}"]))


def test_end_of_training_sample_stops_at_the_deadline(tmp_path):
    task = _task(tmp_path, **{"sample.seconds": 2.0})
    torch.manual_seed(0)
    model = MambaLM(task.mcfg).eval()
    run = RunDir(tmp_path)
    task.deadline = time.monotonic() + 0.5
    t0 = time.monotonic()
    out = task.finish(model, run, torch.device("cpu"))
    # One chunk of decoding past the deadline at most (16 samples), never the 2 s asked for.
    assert time.monotonic() - t0 < 10.0
    frames = sf.info(out["sample_wav"]).frames
    assert 0 < frames < 2 * RATE and frames == round(out["sample_seconds"] * RATE)
    assert f"{frames} of {2 * RATE} samples" in out["sample_cut"] and "generate_audio" in out["sample_cut"]
    # A budget spent before the sample: nothing is drawn, and the summary says why.
    task.deadline = time.monotonic()
    (tmp_path / "samples" / "sample_000.wav").unlink()
    out = task.finish(model, run, torch.device("cpu"))
    assert "trainer.max_minutes=1.0 was spent" in out["sample_skipped"] and "sample_wav" not in out
    assert not (tmp_path / "samples" / "sample_000.wav").exists()


def test_max_minutes_bounds_the_whole_training_job(tmp_path):
    """Training steps get (1 - sample.budget_share) of trainer.max_minutes; the sample stops at
    the job's deadline. Without that, 2 s of audio at batch 1 took minutes on a CPU."""
    t0 = time.monotonic()
    summary = _run("train_audio", tmp_path, **{
        "model.d_model": 32, "model.n_layer": 1, "data.clip_seconds": 0.125, "eval.max_clips": 2,
        "trainer.micro_batch_size": 2, "trainer.max_steps": 100000, "trainer.max_minutes": 0.1,
        "trainer.eval_every": 0, "trainer.ckpt_every": 0, "trainer.progress": False,
        "sample.seconds": 2.0, "sample.budget_share": 0.5})
    elapsed = time.monotonic() - t0
    assert summary["stopped_early"] and summary["train_minutes"] < 0.1
    assert ("sample_cut" in summary) != ("sample_skipped" in summary)
    # The budget is 6 s; the final checkpoint, evaluations and plot come on top of it.
    assert elapsed < 30.0, elapsed


# ----------------------------------------------------------------------------- folders, whole files


def test_folder_of_many_formats_with_bad_files_and_whole_file_eval(tmp_path):
    """AIFF, CAF and FLAC speakers train and score (eval.mode=files: whole files, streamed);
    a corrupt file and an .m4a are skipped and listed in the run directory."""
    records = load_manifest(BUNDLED_SPEECH_MANIFEST)
    folder = tmp_path / "audio"
    for speaker, fmt, suffix in (("allison", "AIFF", ".aiff"), ("carlo", "CAF", ".caf"), ("june", "FLAC", ".flac")):
        (folder / speaker).mkdir(parents=True)
        for r in [r for r in records if r.speaker == speaker][:2]:
            wave, rate = read_audio(r.path)
            sf.write(str(folder / speaker / (r.path.stem + suffix)), wave[0].numpy(), rate, format=fmt)
    (folder / "june" / "broken.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk")
    (folder / "carlo" / "phone.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A " + bytes(64))
    (folder / "notes.txt").write_text("not audio\n")
    summary = _run("train_audio", tmp_path / "run", **{
        "data.source": str(folder), "data.mode": "pad", "data.clip_seconds": 0.05,
        "model.d_model": 16, "model.n_layer": 1, "trainer.micro_batch_size": 2,
        "trainer.max_steps": 2, "trainer.progress": False, "sample.seconds": 0,
        "eval.mode": "files", "eval.chunk_seconds": 0.1})
    # Every speaker is one split: all three formats were read, or a split would be empty.
    assert np.isfinite(summary["val_bits_per_sample"]) and np.isfinite(summary["test_bits_per_sample"])
    assert summary["skipped_files"] == 2
    rows = (tmp_path / "run" / "skipped_files.csv").read_text().splitlines()
    assert rows[0] == "path,reason" and len(rows) == 3
    assert any("broken.wav" in row and "cannot decode" in row for row in rows)
    assert any("phone.m4a" in row and "unsupported audio format" in row for row in rows)
