"""The Triton causal conv1d + SiLU against the torch path it replaces, on the mixer's layout.

    python benchmarks/conv.py            # forward and forward+backward, triton vs torch
    python benchmarks/conv.py --sweep    # also time the kernels' tile sizes

(on a CUDA machine). Shape (batch 8, d_inner 1536, L 2048, K 4): the 130m mixer's conv; x is
the first half of a (batch, L, 2E) bf16 in_proj output, the parameters float32 (bf16 autocast
numerics). The torch path is ``F.pad`` + ``F.conv1d`` + ``F.silu`` under autocast. Times are
medians of ``triton.testing.do_bench``. There is no peer figure for this op (the anchors hold
none for causal-conv1d): the ratio column is torch time / triton time.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from seqlab.kernels import causal_conv1d_silu
from seqlab.kernels.conv import triton_kernels


def bench(batch=8, E=1536, L=2048, K=4, sweep=False) -> list[dict]:
    from triton.testing import do_bench
    dev = "cuda"
    x = torch.randn(batch, L, 2 * E, device=dev, dtype=torch.bfloat16)[..., :E].transpose(1, 2)
    x.requires_grad_(True)
    w = torch.randn(E, 1, K, device=dev, requires_grad=True)
    b = torch.randn(E, device=dev, requires_grad=True)
    g = torch.randn(batch, L, E, device=dev, dtype=torch.bfloat16).transpose(1, 2)

    def torch_path():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return F.silu(F.conv1d(F.pad(x, (K - 1, 0)), w, b, groups=E))

    def triton_path():
        return causal_conv1d_silu(x, w, b, impl="triton")

    def fb(f):
        return lambda: torch.autograd.grad(f(), (x, w, b), g)

    rows = [dict(impl=name, fwd_ms=do_bench(f), fwd_bwd_ms=do_bench(fb(f)))
            for name, f in (("torch", torch_path), ("triton", triton_path))]
    base = rows[0]
    print(f"# conv1d + SiLU, batch {batch}, E {E}, L {L}, K {K}, bf16 x, float32 parameters")
    print(f"{'impl':7s} {'fwd ms':>8s} {'fwd+bwd ms':>11s} {'x torch fwd':>12s} {'x torch f+b':>12s}")
    for r in rows:
        print(f"{r['impl']:7s} {r['fwd_ms']:8.4f} {r['fwd_bwd_ms']:11.4f} "
              f"{base['fwd_ms'] / r['fwd_ms']:12.2f} {base['fwd_bwd_ms'] / r['fwd_bwd_ms']:12.2f}")
    if sweep:
        tk = triton_kernels
        defaults = (tk.FWD_BL, tk.FWD_BE, tk.FWD_WARPS, tk.BWD_BL, tk.BWD_BE, tk.BWD_WARPS,
                    tk.BWD_TILES)
        try:
            for tk.FWD_BL, tk.FWD_BE, tk.FWD_WARPS in [(16, 64, 2), (32, 64, 4), (64, 64, 4),
                                                       (32, 128, 4), (64, 128, 8), (128, 64, 8)]:
                print(f"fwd BL {tk.FWD_BL} BE {tk.FWD_BE} warps {tk.FWD_WARPS}: "
                      f"{do_bench(triton_path):.4f} ms")
            tk.FWD_BL, tk.FWD_BE, tk.FWD_WARPS = 32, 64, 4
            fwd = do_bench(triton_path)
            for tk.BWD_BL, tk.BWD_BE, tk.BWD_WARPS, tk.BWD_TILES in [
                    (16, 64, 4, 16), (8, 64, 2, 16), (16, 64, 2, 16), (32, 64, 4, 8),
                    (16, 128, 4, 16), (16, 64, 4, 4), (32, 128, 8, 8)]:
                print(f"bwd BL {tk.BWD_BL} BE {tk.BWD_BE} warps {tk.BWD_WARPS} tiles "
                      f"{tk.BWD_TILES}: {do_bench(fb(triton_path)) - fwd:.4f} ms")
        finally:
            (tk.FWD_BL, tk.FWD_BE, tk.FWD_WARPS, tk.BWD_BL, tk.BWD_BE, tk.BWD_WARPS,
             tk.BWD_TILES) = defaults
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true", help="also time the kernels' tile sizes")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/conv.py needs a CUDA device")
    return bench(sweep=args.sweep)


if __name__ == "__main__":
    main()
