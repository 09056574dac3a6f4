"""8-bit audio quantisation: mu-law (mu = 255, ITU-T G.711 style companding) and linear.

A waveform becomes a sequence of byte ids 0..255, the same vocabulary the genome path uses,
so one embedding and one LM head serve both (see ARCHITECTURE.md).

Glossary (code name = paper symbol):
    x     float sample in [-1, 1]
    y     companded sample, y = sign(x) * ln(1 + mu|x|) / ln(1 + mu), also in [-1, 1]
    code  round((y + 1) / 2 * mu), an int64 in 0..mu

Bounds (tested in tests/test_data_audio.py):
    * mu-law, companded domain:  |y - y_hat| <= 1 / mu (half of the step 2 / mu).
    * mu-law, sample domain:     |x - x_hat| <= MULAW_STEP * (1 + mu |x|), where
      MULAW_STEP = ((1 + mu)^(1/mu) - 1) / mu ~= 8.62e-5; at |x| = 1 this is ~0.0221,
      near silence it is ~8.6e-5. `mulaw_error_bound(x)` returns it per sample.
    * linear:                    |x - x_hat| <= 1 / 255 (half of the step 2 / 255).

ZERO_CODE (128) is the code of 0.0 under both encodings: (0 + 1) / 2 * 255 = 127.5 rounds half
to even, to 128. It pads clips and starts the shifted input sequence. Its decoded value is not
exactly 0 (8.6e-5 for mu-law, 1/255 for linear): 256 levels have no exact midpoint.

Inputs may be tensors on any device (any float dtype, bfloat16 included) or numpy arrays;
outputs are CPU tensors, since the arithmetic runs in numpy float64: move them with .to(device).
"""
from __future__ import annotations

import math

import numpy as np
import torch

MU = 255
NUM_CODES = MU + 1
# rint(127.5) = 128: numpy rounds half to even.
ZERO_CODE = 128
LINEAR_ZERO_CODE = 128
MULAW_STEP = ((1.0 + MU) ** (1.0 / MU) - 1.0) / MU
LINEAR_MAX_ERROR = 1.0 / MU

__all__ = [
    "MU",
    "NUM_CODES",
    "ZERO_CODE",
    "LINEAR_ZERO_CODE",
    "MULAW_STEP",
    "LINEAR_MAX_ERROR",
    "mulaw_encode",
    "mulaw_decode",
    "linear_encode",
    "linear_decode",
    "mulaw_error_bound",
]


def _as_float_samples(x, name: str) -> np.ndarray:
    # The arithmetic runs in numpy: these elementwise ops are memory-bound, and torch's
    # intra-op threads cost far more than they save when CPU cores are shared or busy.
    if isinstance(x, torch.Tensor):  # float16 / bfloat16 have no numpy dtype: widen first
        x = (x.detach().to(torch.float64) if torch.is_floating_point(x) else x.detach()).cpu().numpy()
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name}: expected float samples in [-1, 1], got dtype {x.dtype}; "
                        "convert integer PCM with x / 32768.0 first")
    bad = ~np.isfinite(x)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name}: sample {first} is {x.flat[first]} (NaN or infinite); "
                         "clean the waveform before encoding")
    # float64 keeps the companding exact enough that the documented bound holds to the last bit.
    # Clamping (instead of raising) because float files and resampling overshoot [-1, 1] slightly.
    return np.clip(x.astype(np.float64), -1.0, 1.0)


def _as_codes(codes, name: str) -> np.ndarray:
    codes = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    if codes.dtype == np.bool_:
        raise TypeError(f"{name}: expected integer codes 0..{MU}, got booleans")
    if not np.issubdtype(codes.dtype, np.integer):
        raise TypeError(f"{name}: expected integer codes 0..{MU}, got dtype {codes.dtype}")
    if codes.size and (int(codes.min()) < 0 or int(codes.max()) > MU):
        raise ValueError(f"{name}: codes must lie in 0..{MU}, got min {int(codes.min())} max {int(codes.max())}; "
                         "special ids (pad=256 ...) must be removed before decoding")
    return codes.astype(np.float64)


def mulaw_encode(x) -> torch.Tensor:
    """Float samples -> mu-law codes.

    Args:
        x: float tensor (or array) of any shape, values in [-1, 1] (clamped outside).
    Returns:
        int64 tensor of the same shape, values 0..255; 0.0 maps to ZERO_CODE.
    Raises:
        ValueError on NaN / infinite samples, TypeError on integer input.
    """
    x = _as_float_samples(x, "mulaw_encode")
    y = np.sign(x) * np.log1p(MU * np.abs(x)) / math.log1p(MU)
    return torch.from_numpy(np.asarray(np.rint((y + 1.0) / 2.0 * MU), dtype=np.int64))


def mulaw_decode(codes) -> torch.Tensor:
    """Mu-law codes -> float samples.

    Args:
        codes: integer tensor of any shape, values 0..255.
    Returns:
        float32 tensor of the same shape in [-1, 1]; error bound in the module docstring.
    """
    y = _as_codes(codes, "mulaw_decode") / MU * 2.0 - 1.0
    x = np.sign(y) * np.expm1(np.abs(y) * math.log1p(MU)) / MU
    return torch.from_numpy(np.asarray(x, dtype=np.float32))


def linear_encode(x) -> torch.Tensor:
    """Float samples -> 8-bit linear codes (uniform steps of 2/255).

    Args:
        x: float tensor (or array) of any shape in [-1, 1] (clamped outside).
    Returns:
        int64 tensor of the same shape, values 0..255; 0.0 maps to LINEAR_ZERO_CODE.
    """
    x = _as_float_samples(x, "linear_encode")
    return torch.from_numpy(np.asarray(np.rint((x + 1.0) / 2.0 * MU), dtype=np.int64))


def linear_decode(codes) -> torch.Tensor:
    """8-bit linear codes -> float32 samples in [-1, 1]; |x - x_hat| <= 1/255."""
    return torch.from_numpy(np.asarray(_as_codes(codes, "linear_decode") / MU * 2.0 - 1.0, dtype=np.float32))


def mulaw_error_bound(x) -> torch.Tensor:
    """Worst-case |x - mulaw_decode(mulaw_encode(x))| per sample, float64, same shape as x.

    Derivation: a code step of 1/mu in y moves x by at most (1 + mu|x|) * MULAW_STEP, since
    dx/dy = ln(1 + mu) (1 + mu|x|) / mu grows with |x|. float32 output rounding adds < 1e-7.
    """
    x = _as_float_samples(x, "mulaw_error_bound")
    return torch.from_numpy(np.asarray((1.0 + MU * np.abs(x)) * MULAW_STEP + 1e-7))
