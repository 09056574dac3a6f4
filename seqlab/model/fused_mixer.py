"""The whole Mamba-1 mixer (in_proj .. out_proj) as one autograd function that recomputes.

Training memory of a Mamba stack is the activations each layer keeps for its backward. Built
from modules, a layer keeps in_proj's output xz (2E per token), the conv output u (E), Δ (E),
the scan output y (E) and the scan's checkpoints: at the 130m size (b 8, L 2048, bf16) about
300 MB per layer. :class:`FusedMixerFn` keeps only the mixer's input (d_model per token), the
small x_proj output (R + 2N) and y, with the scan's checkpoints; in the backward it recomputes
xz = in_proj(x), u = silu(conv(x_in)) and Δ = dt_proj(dt) (one GEMM, the Triton conv and a
thin GEMM: a few per cent of a layer's time) and runs the Triton kernels' backward directly,
through their autograd-free public pieces (:func:`seqlab.kernels.scan.scan_triton_forward` /
``scan_triton_backward`` and :func:`seqlab.kernels.conv.conv_triton_forward` /
``conv_triton_backward``).

Numerics equal the module path under autocast: the matrix products take the autocast dtype
(or the weights' dtype without autocast), the scan and conv kernels are the same, the
gradients of the weights come back in the parameters' dtypes. Used by :class:`Mixer` when
``config.fused_mixer`` is on and the input is not packed and has no cache (right padding by
``lengths`` is masked as in the module path), the model is selective, the conv is at most 4
wide and the scan resolves to Triton (the default on CUDA); ``seqlab.kernels.last_impl("mixer")``
reports "fused" or "modules". The mixer is passed in and read for its parameters and sizes
(duck-typed: this module does not import :mod:`seqlab.model.mixer`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from seqlab.kernels import record_impl, resolve_impl
from seqlab.utils import autocast, length_mask

Tensor = torch.Tensor


def fused_mixer_applies(mixer, x: Tensor, cache, cu_seqlens) -> bool:
    """Whether :func:`fused_mixer` can run this call (right padding through ``lengths`` is
    handled as the module path does: padded inputs of the conv and the scan are zeroed)."""
    cfg = mixer.config
    ok = (getattr(cfg, "fused_mixer", False) and mixer.selective and cache is None
          and cu_seqlens is None and mixer.d_conv <= 4
          and torch.is_grad_enabled()
          and resolve_impl(cfg.scan_impl, x.device, op="mixer") == "triton")
    record_impl("mixer", "fused" if ok else "modules", x.device)
    return ok


def _compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return weight.dtype


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


class FusedMixerFn(torch.autograd.Function):
    """(x (batch, L, d_model), the mixer's parameters) -> out (batch, L, d_model)."""

    @staticmethod
    def forward(ctx, x, reverse, dims, lengths, w_in, b_in, w_conv, b_conv, w_x, w_dt, b_dt,
                A_log, D, w_out, b_out):
        from seqlab.kernels.scan import ScanPlan, scan_triton_forward
        E, R, N = dims
        cdt = _compute_dtype(x, w_in)
        with autocast(x.device):
            xc = x.to(cdt)
            mask = None
            if lengths is not None:  # (batch, 1, L): 1 on real positions, 0 on right padding
                mask = length_mask(lengths, x.shape[1])[:, None, :].to(cdt)
            inner = _Inner(xc, E, R, N, reverse, cdt, w_in, b_in, w_conv, b_conv, w_x, w_dt,
                           want_xdbl=None, mask=mask)
            A = -torch.exp(A_log.float())  # (E, N)
            plan = ScanPlan(inner.u, A, inner.Bm)
            y, _, ckpt = scan_triton_forward(plan, inner.u, inner.delta, A, inner.Bm, inner.Cm,
                                             D, inner.z, b_dt, True, reverse=reverse)
            out = F.linear(y.transpose(1, 2), w_out.to(cdt), _cast(b_out, cdt))
        ctx.save_for_backward(xc, inner.x_dbl, y, ckpt, w_in, b_in, w_conv, b_conv, w_x, w_dt,
                              b_dt, A_log, D, w_out, b_out, mask)
        ctx.plan, ctx.reverse, ctx.dims, ctx.cdt, ctx.x_dtype = plan, reverse, dims, cdt, x.dtype
        return out.to(cdt)

    @staticmethod
    def backward(ctx, g):
        from seqlab.kernels.conv import conv_triton_backward
        from seqlab.kernels.scan import scan_triton_backward
        (xc, x_dbl, y, ckpt, w_in, b_in, w_conv, b_conv, w_x, w_dt, b_dt, A_log, D,
         w_out, b_out, mask) = ctx.saved_tensors
        E, R, N = ctx.dims
        cdt = ctx.cdt
        with autocast(g.device):
            g = g.to(cdt)
            g2 = g.reshape(-1, g.shape[-1])
            yt = y.transpose(1, 2)  # (batch, L, E), contiguous
            wo = w_out.to(cdt)
            dy = g @ wo  # (batch, L, E)
            d_w_out = (g2.t() @ yt.reshape(-1, E)).to(w_out.dtype)
            d_b_out = g2.float().sum(0).to(b_out.dtype) if b_out is not None else None
            # Recompute everything before the scan from the saved input.
            inner = _Inner(xc, E, R, N, ctx.reverse, cdt, w_in, b_in, w_conv, b_conv, w_x,
                           w_dt, want_xdbl=x_dbl, mask=mask)
            # ∂x_in and ∂z are written straight into the halves of one (batch, L, 2E) buffer:
            # in_proj's backward reads it without a concatenation.
            bsz, L = xc.shape[0], xc.shape[1]
            dxz = torch.empty(bsz, L, 2 * E, dtype=cdt, device=xc.device)
            A = -torch.exp(A_log.float())  # (E, N), as in the forward
            du, ddelta, dA, dB, dC, dD, _, dbias, _ = scan_triton_backward(
                ctx.plan, ckpt, dy.transpose(1, 2), None, inner.u, inner.delta, A, inner.Bm,
                inner.Cm, D, inner.z, b_dt, True, reverse=ctx.reverse,
                dz_out=dxz[..., E:].transpose(1, 2))
            d_A_log = (dA * A).to(A_log.dtype)  # A = -exp(A_log)
            dd = ddelta.transpose(1, 2)  # (batch, L, E)
            dt = x_dbl[..., :R]
            ddt = dd @ w_dt.to(cdt)  # (batch, L, R)
            d_w_dt = (dd.reshape(-1, E).t() @ dt.reshape(-1, R)).to(w_dt.dtype)
            d_xdbl = torch.cat([ddt, dB.transpose(1, 2).to(cdt), dC.transpose(1, 2).to(cdt)],
                               dim=-1)  # (batch, L, R + 2N)
            ut = inner.u.transpose(1, 2)
            du_t = du.transpose(1, 2)  # (batch, L, E), a dense buffer the scan allocated
            # du += d_xdbl @ W_x in one GEMM (no separate elementwise add)
            du_t.view(-1, E).addmm_(d_xdbl.reshape(-1, R + 2 * N), w_x.to(cdt))
            if mask is not None:
                du_t.mul_(mask.transpose(1, 2))  # u = silu(conv) * mask
            d_w_x = (d_xdbl.reshape(-1, R + 2 * N).t() @ ut.reshape(-1, E)).to(w_x.dtype)
            wc = w_conv.reshape(E, -1).to(cdt)
            bc = _cast(b_conv, cdt)
            _, d_wc, d_bc = conv_triton_backward(du_t.transpose(1, 2), inner.x_in, wc, bc,
                                                 ctx.reverse, dx_out=dxz[..., :E].transpose(1, 2))
            if mask is not None:
                dxz[..., :E].mul_(mask.transpose(1, 2))  # the conv read x_in * mask
            dxz2 = dxz.view(-1, 2 * E)
            dx = dxz @ w_in.to(cdt)
            d_w_in = (dxz2.t() @ xc.reshape(-1, xc.shape[-1])).to(w_in.dtype)
            d_b_in = dxz2.float().sum(0).to(b_in.dtype) if b_in is not None else None
        return (dx.to(ctx.x_dtype), None, None, None, d_w_in, d_b_in,
                d_wc.reshape(w_conv.shape).to(w_conv.dtype),
                None if d_bc is None else d_bc.to(b_conv.dtype), d_w_x, d_w_dt,
                dbias.to(b_dt.dtype), d_A_log, dD.to(D.dtype), d_w_out, d_b_out)


class _Inner:
    """The activations between in_proj and the scan, computed (forward) or recomputed
    (backward) from the mixer's input xc (batch, L, d_model) in the compute dtype: x_in, z, u,
    delta (batch, E, L) channels-last views; x_dbl (batch, L, R + 2N); Bm, Cm (batch, N, L)."""

    def __init__(self, xc, E, R, N, reverse, cdt, w_in, b_in, w_conv, b_conv, w_x, w_dt,
                 want_xdbl, mask=None):
        xz = F.linear(xc, w_in.to(cdt), _cast(b_in, cdt))  # (batch, L, 2E)
        self.x_in = xz[..., :E].transpose(1, 2)  # (batch, E, L) channels-last views
        self.z = xz[..., E:].transpose(1, 2)
        if mask is not None:
            # as Mixer.mix: zero padded inputs of the conv and of the scan, so nothing leaks
            # into real positions in either direction (the products stay channels-last)
            self.x_in = self.x_in * mask
        from seqlab.kernels.conv import conv_triton_forward
        wc = w_conv.reshape(E, -1).to(cdt)
        self.u = conv_triton_forward(self.x_in, wc, _cast(b_conv, cdt), reverse)
        if mask is not None:
            self.u = self.u * mask
        if want_xdbl is None:
            self.x_dbl = F.linear(self.u.transpose(1, 2), w_x.to(cdt))  # (batch, L, R + 2N)
        else:
            self.x_dbl = want_xdbl  # saved by the forward: bit-identical, no GEMM
        dt = self.x_dbl[..., :R]
        self.Bm = self.x_dbl[..., R:R + N].transpose(1, 2)
        self.Cm = self.x_dbl[..., R + N:].transpose(1, 2)
        self.delta = F.linear(dt, w_dt.to(cdt)).transpose(1, 2)


def fused_mixer(mixer, x: Tensor, reverse: bool = False, lengths: Tensor | None = None) -> Tensor:
    """Run ``mixer`` (a :class:`~seqlab.model.mixer.Mixer`) on x (batch, L, d_model) through
    :class:`FusedMixerFn` (check :func:`fused_mixer_applies` first); ``lengths`` (batch,) for
    right-padded batches."""
    dims = (mixer.d_inner, mixer.dt_rank, mixer.d_state)
    return FusedMixerFn.apply(
        x, bool(reverse), dims, lengths, mixer.in_proj.weight, mixer.in_proj.bias,
        mixer.conv1d.weight, mixer.conv1d.bias, mixer.x_proj.weight, mixer.dt_proj.weight,
        mixer.dt_proj.bias, mixer.A_log, mixer.D, mixer.out_proj.weight, mixer.out_proj.bias)
