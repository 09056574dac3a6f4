"""The fused Triton residual add + RMSNorm against the unfused torch path.

    python benchmarks/norm.py

(on a CUDA machine). 16,384 rows of d 1024: bf16 x, float32 residual and weight, both outputs
used in the backward. The torch path is the plain reference
(:func:`seqlab.kernels.add_rms_norm_reference`). Times are medians of
``triton.testing.do_bench``. There is no peer figure for this op: the ratio column is torch
time / triton time.
"""
from __future__ import annotations

import argparse
from functools import partial

import torch

from seqlab.kernels import add_rms_norm, add_rms_norm_reference


def bench(M=16384, d=1024) -> list[dict]:
    from triton.testing import do_bench
    dev = "cuda"
    x = torch.randn(M, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(M, d, device=dev, requires_grad=True)
    w = torch.randn(d, device=dev, requires_grad=True)
    g1 = torch.randn(M, d, device=dev, dtype=torch.bfloat16)
    g2 = torch.randn(M, d, device=dev)
    rows = []
    for name, f in (("torch", add_rms_norm_reference),
                    ("triton", partial(add_rms_norm, impl="triton"))):
        def fwd(f=f):
            return f(x, r, w, 1e-5)

        def fb(f=f):
            return torch.autograd.grad(f(x, r, w, 1e-5), (x, r, w), (g1, g2))

        rows.append(dict(impl=name, fwd_ms=do_bench(fwd), fwd_bwd_ms=do_bench(fb)))
    base = rows[0]
    print(f"# add + RMSNorm, {M} rows x d {d}, bf16 x, float32 residual and weight")
    print(f"{'impl':7s} {'fwd ms':>8s} {'fwd+bwd ms':>11s} {'x torch fwd':>12s} {'x torch f+b':>12s}")
    for r_ in rows:
        print(f"{r_['impl']:7s} {r_['fwd_ms']:8.4f} {r_['fwd_bwd_ms']:11.4f} "
              f"{base['fwd_ms'] / r_['fwd_ms']:12.2f} {base['fwd_bwd_ms'] / r_['fwd_bwd_ms']:12.2f}")
    return rows


def main(argv=None) -> list[dict]:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/norm.py needs a CUDA device")
    return bench()


if __name__ == "__main__":
    main()
