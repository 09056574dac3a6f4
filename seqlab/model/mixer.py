"""The Mamba-1 mixer (selective SSM block), with mamba_ssm's parameter names and initialisation.

Glossary (code name -> paper symbol): d_model = D, d_inner = E*D, d_state = N,
dt_rank = R, d_conv = K, delta = Δ, A = -exp(A_log), B, C as in the paper, D = skip.

Data flow for x (batch, L, d_model):
    in_proj -> (x_in, z), each (batch, L, d_inner)
    x_in -> depthwise conv over time (kernel K) -> SiLU -> u      (batch, d_inner, L)
    x_proj(u) -> (dt (R), B (N), C (N)) per position; delta = dt_proj.weight @ dt
    y = selective_scan(u, delta + dt_proj.bias (softplus), A, B, C, D, gate z)
    out_proj(y) -> (batch, L, d_model)

Inference protocol (causal direction only): ``allocate_cache(batch, dtype)`` ->
(conv_state (batch, d_inner, K), ssm_state (batch, d_inner, N) float32);
``forward(x, cache)`` prefills (and may be called again to continue a prefill);
``step(x_t, cache)`` advances one token with O(1) work.

The LTI ablation (``selective=False``) runs its SSM as a long convolution computed by FFT
(:meth:`Mixer._lti_conv`) whenever it sees a whole sequence (no cache, no packing); prefill,
packed input and ``step`` keep the scan. ``seqlab.kernels.last_impl("lti_ssm")`` reports
"fft" or "scan" for the last call of an LTI mixer.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from seqlab.kernels import (causal_conv1d_silu, causal_conv1d_update, record_impl, resolve_impl,
                            selective_scan, selective_state_update)
from seqlab.utils import autocast, length_mask

from .config import MambaConfig
from .fused_mixer import fused_mixer, fused_mixer_applies

Tensor = torch.Tensor


def inverse_softplus(x: Tensor) -> Tensor:
    """y such that softplus(y) = x, for x > 0 (written to stay finite for small x)."""
    return x + torch.log(-torch.expm1(-x))


def init_dt_bias(d_inner: int, config: MambaConfig, device=None) -> Tensor:
    """Bias whose softplus is Δ drawn log-uniformly in [dt_min, dt_max], floored: (d_inner,) fp32."""
    lo, hi = math.log(config.dt_min), math.log(config.dt_max)
    dt = torch.exp(torch.rand(d_inner, device=device) * (hi - lo) + lo)
    return inverse_softplus(dt.clamp(min=config.dt_init_floor))


def positions_in_segments(cu_seqlens: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """For packed sequences: (offset from own start, offset to own last token), each (length,) long."""
    cs = cu_seqlens.to(torch.long)
    seg_len = cs[1:] - cs[:-1]
    seg_id = torch.repeat_interleave(torch.arange(seg_len.numel(), device=cs.device), seg_len,
                                     output_size=length)  # no host sync on CUDA
    t = torch.arange(length, device=cs.device)
    from_start = t - cs[:-1][seg_id]
    to_end = cs[1:][seg_id] - 1 - t
    return from_start, to_end


def fft_size(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n: FFT libraries (pocketfft, cuFFT) are fastest on such sizes,
    and the next one is often well below the next power of two (540 instead of 1024 for 528)."""
    best = 1 << max(n - 1, 0).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


class Mixer(nn.Module):
    """Mamba-1 selective SSM mixer: (batch, L, d_model) -> (batch, L, d_model).

    ``config.selective=False`` builds the LTI ablation: Δ (via ``dt_bias``), B and C
    (``B_lti``, ``C_lti``, per channel) are learned parameters that do not depend on the
    input, and there is no x_proj / dt_proj.
    """

    # LTI ablation on whole sequences: the SSM as an FFT convolution instead of the scan (see
    # _lti_conv). Tests switch it off on an instance to get the scan as the oracle.
    _lti_fft: bool = True

    def __init__(self, config: MambaConfig, layer_idx: int | None = None, device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.config = config
        self.layer_idx = layer_idx
        self.d_model = config.d_model
        self.d_inner = config.d_inner
        self.d_state = config.d_state
        self.d_conv = config.d_conv
        self.dt_rank = config.dt_rank_value
        self.selective = config.selective
        E, N, R = self.d_inner, self.d_state, self.dt_rank

        self.in_proj = nn.Linear(self.d_model, 2 * E, bias=config.bias, **fk)
        # Padding is applied by hand (left for causal, right for anti-causal), so none here.
        self.conv1d = nn.Conv1d(E, E, kernel_size=self.d_conv, groups=E, bias=config.conv_bias, **fk)
        if self.selective:
            self.x_proj = nn.Linear(E, R + 2 * N, bias=False, **fk)
            self.dt_proj = nn.Linear(R, E, bias=True, **fk)
            std = R ** -0.5 * config.dt_scale
            with torch.no_grad():
                if config.dt_init == "constant":
                    nn.init.constant_(self.dt_proj.weight, std)
                elif config.dt_init == "random":
                    nn.init.uniform_(self.dt_proj.weight, -std, std)
                else:
                    raise ValueError(f"MambaConfig.dt_init={config.dt_init!r}: needs 'random' or 'constant'")
                self.dt_proj.bias.copy_(init_dt_bias(E, config, device))
            # The backbone's initialiser zeroes Linear biases; this one must survive.
            self.dt_proj.bias._no_reinit = True
        else:
            self.dt_bias = nn.Parameter(init_dt_bias(E, config, device).to(dtype or torch.float32))
            self.dt_bias._no_reinit = True
            # S4D-style real init: B = 1, C random with unit total variance per channel.
            self.B_lti = nn.Parameter(torch.ones(E, N, device=device))
            self.C_lti = nn.Parameter(torch.randn(E, N, device=device) * N ** -0.5)
            self.B_lti._no_weight_decay = True
            self.C_lti._no_weight_decay = True

        # S4D-real: A_n = -(n + 1) for every channel; kept in fp32 as log for positivity.
        A = torch.arange(1, N + 1, dtype=torch.float32, device=device).repeat(E, 1)  # (E, N)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(E, device=device))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(E, self.d_model, bias=config.bias, **fk)

    # ------------------------------------------------------------------ pieces
    def _conv(self, x: Tensor, reverse: bool, cu_seqlens: Tensor | None,
              prefix: Tensor | None = None) -> Tensor:
        """Depthwise conv over time: x (batch, E, L) -> (batch, E, L), before SiLU.

        Causal (output t sees t-K+1..t) or, with ``reverse``, anti-causal (sees t..t+K-1).
        ``prefix`` (batch, E, K-1) replaces the causal zero padding (continued prefill).
        """
        K = self.d_conv
        w = self.conv1d.weight  # (E, 1, K)
        if cu_seqlens is None and (x.device.type != "cpu" or prefix is not None):
            if prefix is not None:
                xp = torch.cat([prefix.to(x.dtype), x], dim=-1)
            else:
                xp = F.pad(x, (0, K - 1) if reverse else (K - 1, 0))
            if reverse:
                # Anti-causal = correlation with the taps reversed so tap K-1 still hits t itself.
                w = w.flip(-1)
            return F.conv1d(xp, w, self.conv1d.bias, groups=self.d_inner)
        # Sum of K shifted copies. Used for packed sequences, each tap masked where it would
        # cross a sequence boundary, and on the CPU, where the depthwise F.conv1d backward is
        # pathologically slow (it took 43% of a training step, 4 s per call, at d_inner 128,
        # L 1024, batch 16). Tap j (0 = current token) reads t - j (causal) or t + j.
        room = None
        if cu_seqlens is not None:
            from_start, to_end = positions_in_segments(cu_seqlens, x.shape[-1])
            room = to_end if reverse else from_start
        out = x * w[:, 0, K - 1, None]
        for j in range(1, K):
            shifted = F.pad(x, (0, j))[..., j:] if reverse else F.pad(x, (j, 0))[..., :-j]
            if room is not None:
                shifted = shifted * (room >= j).to(x.dtype)
            out = out + shifted * w[:, 0, K - 1 - j, None]
        if self.conv1d.bias is not None:
            out = out + self.conv1d.bias[:, None]
        return out

    def _ssm_inputs(self, u: Tensor):
        """u (batch, E, L) -> delta (batch, E, L), B, C (batch, N, L) or (batch, E, N, L), and
        the Δ bias (E,) as the parameter itself (:meth:`mix` casts it)."""
        batch, E, L = u.shape
        if not self.selective:
            delta = u.new_zeros(1, 1, 1).expand(batch, E, L)
            Bm = self.B_lti.to(u.dtype)[None, :, :, None].expand(batch, E, self.d_state, L)
            Cm = self.C_lti.to(u.dtype)[None, :, :, None].expand(batch, E, self.d_state, L)
            return delta, Bm, Cm, self.dt_bias
        x_dbl = self.x_proj(u.transpose(1, 2))  # (batch, L, R + 2N)
        dt, Bm, Cm = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, self.dt_proj.weight)  # (batch, L, E); bias goes to the kernel
        # Channels-last views: the scan accepts any strides, so no copies here.
        return delta.transpose(1, 2), Bm.transpose(1, 2), Cm.transpose(1, 2), self.dt_proj.bias

    def _lti_conv(self, u: Tensor, z: Tensor, reverse: bool) -> Tensor:
        """The LTI ablation's SSM over whole sequences: u, z (batch, E, L) -> y (batch, E, L).

        With Δ, B, C input-independent the scan is a linear time-invariant system per channel d:
        Ā = exp(Δ_d A_d), h_t = Ā h_{t-1} + Δ_d B_d u_t, y_t = <C_d, h_t> + D_d u_t (the
        discretisation of seqlab.kernels.scan.reference), so y = K_d * u + D_d u with the causal
        kernel K_d[k] = Σ_n C_dn B_dn Δ_d exp(Δ_d A_dn k), k = 0..L-1 (anti-causal with
        ``reverse``), then gated by silu(z). One FFT convolution replaces a scan with one B/C
        group per channel, which the CPU scans run slowly: a training step of the synthetic
        tasks' 2-layer LM (d_model 64, d_state 16, batch 64, L 264, one CPU thread) took 1.5 s
        through the scan, 0.5 s this way (0.6 s for the selective model).

        Same inputs as the scan gets from :meth:`mix` (B, C rounded to u's dtype first), computed
        in float32 (float64 for float64 u), returned in u's dtype. Right padding needs nothing
        more: u is zero there, so a causal (anti-causal) convolution carries nothing from pads
        into real positions, as the scan's state does. Gradients reach A_log, dt_bias, B_lti,
        C_lti, D, u and z through autograd; the backward keeps the (E, N, L) decays, whatever
        the batch.
        """
        cdt = torch.float64 if u.dtype == torch.float64 else torch.float32
        L = u.shape[-1]
        # Autocast off: the kernel's matmul and the FFTs must not drop to bf16/fp16.
        with autocast(u.device):
            dt = F.softplus(self.dt_bias.to(cdt))  # Δ (E,): softplus(0 + bias)
            A = -torch.exp(self.A_log.to(cdt))  # (E, N)
            Bm = self.B_lti.to(u.dtype).to(cdt)
            Cm = self.C_lti.to(u.dtype).to(cdt)
            k = torch.arange(L, device=u.device, dtype=cdt)
            # (E, 1, N) @ (E, N, L): the decays exp(Δ A k) underflow to 0 harmlessly for large k.
            decay = torch.exp((dt[:, None] * A)[:, :, None] * k)
            K = ((Cm * Bm * dt[:, None])[:, None, :] @ decay)[:, 0]  # (E, L)
            # Linear, not circular, convolution: size >= 2L keeps the wrap-around off [0, L).
            # reverse: y_t = Σ_{s >= t} K[s - t] u_s, the correlation, i.e. conj(FFT(K)).
            n = fft_size(2 * L)
            uf = u.to(cdt)
            Kf = torch.fft.rfft(K, n=n)
            if reverse:
                Kf = Kf.conj()
            y = torch.fft.irfft(torch.fft.rfft(uf, n=n) * Kf, n=n)[..., :L]
            y = (y + uf * self.D.to(cdt)[:, None]) * F.silu(z.to(cdt))
        return y.to(u.dtype)

    # ------------------------------------------------------------------ public API
    def forward(self, x: Tensor, cache: tuple[Tensor, Tensor] | None = None,
                lengths: Tensor | None = None, cu_seqlens: Tensor | None = None,
                reverse: bool = False) -> Tensor:
        """x (batch, L, d_model) -> (batch, L, d_model).

        Args:
            cache: (conv_state, ssm_state) from :meth:`allocate_cache`; filled in place
                (prefill). Causal direction only; not with lengths / cu_seqlens.
            lengths: (batch,) real lengths of right-padded sequences. Padded positions are
                zeroed before the conv and the scan, so nothing leaks into real positions in
                either direction and the reverse scan starts at each sequence's last token.
            cu_seqlens: (nseq + 1,) boundaries of sequences packed along L (batch 1).
            reverse: scan and convolve from the end (the backward half of a BiMixer).
        """
        if fused_mixer_applies(self, x, cache, cu_seqlens):
            return fused_mixer(self, x, reverse, lengths)
        return self.mix(self.in_proj(x), cache, lengths, cu_seqlens, reverse, self.out_proj)

    def mix(self, xz: Tensor, cache=None, lengths=None, cu_seqlens=None, reverse=False,
            out_proj: nn.Module | None = None) -> Tensor:
        """Everything after in_proj: xz (batch, L, 2E) -> (batch, L, d_model) via ``out_proj``.

        Split out so a BiMixer with tied projections computes in_proj once for both directions.
        """
        if cache is not None and (reverse or lengths is not None or cu_seqlens is not None):
            raise ValueError("Mixer.forward: a cache (prefill) works only for causal, unpadded, "
                             "unpacked input; drop lengths/cu_seqlens/reverse")
        batch, L, _ = xz.shape
        # Split on the (batch, L, 2E) side, then transpose: (batch, E, L) channels-last views.
        # The split's backward then concatenates (batch, L, E) gradients along the last axis,
        # which stay contiguous when ∂x_in and ∂z come back channels-last (no strided copy
        # before in_proj's backward).
        x_in, z = (t.transpose(1, 2) for t in xz.chunk(2, dim=-1))
        mask = None
        if lengths is not None:
            mask = length_mask(lengths, L)[:, None, :].to(x_in.dtype)  # (batch, 1, L)
            x_in = x_in * mask
        prefix = None
        if cache is not None:
            conv_state, ssm_state = cache
            prefix = conv_state[:, :, 1:].clone()  # read before the in-place update below
            # The last K inputs (left-filled from the previous state when L < K).
            conv_state.copy_(torch.cat([conv_state, x_in.to(conv_state.dtype)], dim=-1)[..., -self.d_conv:])
        # Triton conv + SiLU when the scan's impl resolves to "triton" ("auto" on CUDA; on the
        # CPU only through TRITON_INTERPRET=1), except for packing, cache prefill and K > 4.
        # u comes back channels-last, so x_proj reads u.transpose(1, 2) as a contiguous
        # (batch, L, E) tensor.
        if (prefix is None and cu_seqlens is None and self.d_conv <= 4
                and resolve_impl(self.config.scan_impl, x_in.device, "causal_conv1d") == "triton"):
            u = causal_conv1d_silu(x_in, self.conv1d.weight, self.conv1d.bias, reverse,
                                   impl="triton")
        else:
            u = F.silu(self._conv(x_in, reverse, cu_seqlens, prefix))
        if mask is not None:
            # Zero input on pads: the reverse scan's state stays exactly 0 across the padding
            # (h = Ā·0 + Δ·B·0), so it starts fresh at each sequence's last real token.
            u = u * mask
        # The scan's constants in float32, or float64 for float64 input: a float64 model is
        # the tests' oracle, and rounding A, D, Δ's bias (and their gradients) through float32
        # would cap its agreement at ~1e-7.
        pdt = torch.float64 if u.dtype == torch.float64 else torch.float32
        use_fft = (not self.selective and self._lti_fft and cache is None
                   and cu_seqlens is None)
        if not self.selective:
            record_impl("lti_ssm", "fft" if use_fft else "scan", u.device)
        if use_fft:
            y = self._lti_conv(u, z, reverse)
        else:
            delta, Bm, Cm, dt_bias = self._ssm_inputs(u)
            A = -torch.exp(self.A_log.to(pdt))
            y = selective_scan(u, delta, A, Bm, Cm, self.D.to(pdt), z,
                               delta_bias=dt_bias.to(pdt), delta_softplus=True,
                               initial_state=None if cache is None else cache[1],
                               return_last_state=cache is not None, reverse=reverse,
                               cu_seqlens=cu_seqlens, impl=self.config.scan_impl)
            if cache is not None:
                y, last = y
                cache[1].copy_(last)
        out_proj = self.out_proj if out_proj is None else out_proj
        return out_proj(y.transpose(1, 2))

    def allocate_cache(self, batch: int, dtype: torch.dtype | None = None, device=None):
        """Zeroed (conv_state (batch, E, K) in dtype, ssm_state (batch, E, N) float32)."""
        device = device or self.A_log.device
        dtype = dtype or self.in_proj.weight.dtype
        conv = torch.zeros(batch, self.d_inner, self.d_conv, device=device, dtype=dtype)
        ssm = torch.zeros(batch, self.d_inner, self.d_state, device=device, dtype=torch.float32)
        return conv, ssm

    def _step_constants(self) -> tuple[Tensor, Tensor, Tensor]:
        """A = -exp(A_log), D and the Δ bias in float32 for :meth:`step`. Without autograd they
        are cached and recomputed only when a parameter moved or changed (in-place updates bump
        its version counter), so a decoding step (or a captured CUDA graph of steps) does not
        relaunch them."""
        bias = self.dt_proj.bias if self.selective else self.dt_bias
        if torch.is_grad_enabled():
            return -torch.exp(self.A_log.float()), self.D.float(), bias.float()
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in (self.A_log, self.D, bias))
        cached = self.__dict__.get("_step_cache")
        if cached is None or cached[0] != key:
            cached = (key, -torch.exp(self.A_log.float()), self.D.float(), bias.float())
            self.__dict__["_step_cache"] = cached
        return cached[1], cached[2], cached[3]

    def step(self, x_t: Tensor, cache: tuple[Tensor, Tensor]) -> Tensor:
        """One token: x_t (batch, d_model) -> (batch, d_model); updates the cache in place.

        Only in-place tensor ops on fixed buffers, so a CUDA graph can capture it.
        """
        conv_state, ssm_state = cache
        xz = self.in_proj(x_t)  # (batch, 2E)
        x_in, z = xz.chunk(2, dim=-1)
        # shift + write + conv + bias + SiLU: one launch on Triton (float32 inside), in-place
        # torch ops otherwise
        u = causal_conv1d_update(x_in, conv_state, self.conv1d.weight, self.conv1d.bias,
                                 impl=self.config.scan_impl)  # (batch, E)
        A, D, dt_bias = self._step_constants()
        if self.selective:
            dt, Bm, Cm = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
            dt = F.linear(dt, self.dt_proj.weight)  # (batch, E)
        else:
            batch = u.shape[0]
            dt = u.new_zeros(batch, self.d_inner)
            Bm = self.B_lti.to(u.dtype)[None].expand(batch, -1, -1)  # (batch, E groups, N)
            Cm = self.C_lti.to(u.dtype)[None].expand(batch, -1, -1)
        y = selective_state_update(ssm_state, u, dt, A, Bm, Cm, D, z,
                                   dt_bias=dt_bias, dt_softplus=True, impl=self.config.scan_impl)
        return self.out_proj(y)
