"""Job `generate_audio`: sample waveforms from a trained audio LM, unconditionally or
continuing a WAV prompt (seqlab.tasks.audio_sampling). The checkpoint is opened by the one
loader (a train_audio run directory, its checkpoints/ or a step folder); its ``extra.audio``
entry says how training made codes, and prompts are encoded the same way."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from ..errors import ConfigError
from ..tasks.audio_sampling import load_prompt, prompt_normalize, sample_codes, write_samples
from ..tasks.common import resolve_path
from ..training.checkpoint import CONFIG_NAME
from ..training.pretrained import load_model
from ..utils import resolve_device
from .common import print_summary, tracked_run


def _gen_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"seqlab generate_audio: dtype={name!r}; use auto, float32, bfloat16 "
                          "or float16")
    return getattr(torch, name)


def generate_audio(cfg: DictConfig) -> dict:
    if cfg.n_samples < 1 or cfg.seconds <= 0:
        raise ConfigError(f"generate_audio: n_samples={cfg.n_samples} must be >= 1 and "
                          f"seconds={cfg.seconds} > 0")
    with tracked_run(cfg) as (run, summary):
        device = resolve_device(cfg.device)
        model, info = load_model(resolve_path(cfg.checkpoint, what="checkpoint"), device,
                                 dtype=_gen_dtype(cfg.dtype, device))
        ckpt = Path(info["path"])
        audio = info["extra"].get("audio")
        if info["architecture"] != "MambaLM" or not audio:
            raise ConfigError(f"seqlab generate_audio: {ckpt / CONFIG_NAME} is not an audio model "
                              f"(architecture={info['architecture']!r}, no 'audio' entry); "
                              "point checkpoint= at a train_audio run")
        rate, encoding = int(audio["rate"]), str(audio["encoding"])
        prompt = None
        if cfg.get("prompt"):
            prompt = load_prompt(resolve_path(cfg.prompt, what="prompt"), rate, encoding,
                                 cfg.max_prompt_seconds, cfg.get("prompt_seconds"),
                                 normalize=prompt_normalize(cfg.get("prompt_normalize"), audio,
                                                            ckpt / CONFIG_NAME))
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
