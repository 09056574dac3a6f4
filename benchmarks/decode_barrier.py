"""What one grid barrier of the persistent decoding step costs, without the step's arithmetic.

    python benchmarks/decode_barrier.py [--programs 16,32,64] [--rounds 290] [--warps 8]

(on a CUDA machine). The persistent step (:mod:`seqlab.kernels.decode.lm_step`) spends ~4 us
per phase at batch 1 whatever its programs' work. This probe runs only the phases' skeleton:
``rounds`` times, every program stores a share of ``share`` float32 values, arrives at the
row's counter (release), spins until all have arrived, acquires, and sums the ``programs``
shares (the reads the step's next phase starts with). The per-round cost is the slope between
0 and ``rounds`` rounds, timed as the median of CUDA-graph replays
(``triton.testing.do_bench_cudagraph``, so launch overhead drops out). Variants:

* ``full``: the step's protocol (``barrier_arrive`` / ``barrier_wait`` of the step);
* ``no-share``: the same without the share stores and loads (the bare counter round trips);
* ``relaxed``: a relaxed arrival and no acquire (no fences: not a correct barrier for data,
  timed only to show what the fences cost).

A table per program count: share size, variant, us per round, and the 29-round total that a
14-layer step pays. There is no peer figure (mamba_ssm has no persistent step).
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from seqlab.kernels.decode.lm_step import barrier_arrive, barrier_wait


@triton.jit
def _probe_kernel(bar_ptr, share_ptr, out_ptr, rounds, P: tl.constexpr, SH: tl.constexpr,
                  SHP: tl.constexpr, PP: tl.constexpr, SHARE: tl.constexpr,
                  FENCED: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.arange(0, SHP)
    m = offs < SH
    acc = tl.zeros([SHP], dtype=tl.float32) + pid
    for r in range(rounds):
        if SHARE:
            tl.store(share_ptr + (r % 2) * P * SH + pid * SH + offs, acc, mask=m)
        if FENCED:
            barrier_arrive(bar_ptr)
            barrier_wait(bar_ptr, (r + 1) * P)
        else:
            tl.debug_barrier()
            tl.atomic_add(bar_ptr, 1, sem="relaxed", scope="gpu")
            cur = tl.load(bar_ptr, volatile=True)
            while cur < (r + 1) * P:
                cur = tl.load(bar_ptr, volatile=True)
            tl.debug_barrier()
        if SHARE:
            q = tl.arange(0, PP)
            xs = tl.load(share_ptr + (r % 2) * P * SH + q[:, None] * SH + offs[None, :],
                         mask=(q < P)[:, None] & m[None, :], other=0.0, cache_modifier=".cg")
            acc = tl.sum(xs, axis=0) * 0.5
    tl.store(out_ptr + pid * SHP + offs, acc)
    tl.debug_barrier()
    done = tl.atomic_add(bar_ptr + 1, 1, sem="acq_rel", scope="gpu")
    if done == P - 1:
        tl.store(bar_ptr, 0)
        tl.store(bar_ptr + 1, 0)


def time_rounds(P: int, share: int, variant: str, rounds: int, num_warps: int = 8) -> float:
    """Median microseconds of one launch of ``rounds`` barrier rounds, from CUDA-graph replays
    (triton.testing.do_bench_cudagraph)."""
    from triton.testing import do_bench_cudagraph
    dev = "cuda"
    bar = torch.zeros(2, dtype=torch.int32, device=dev)
    shp = triton.next_power_of_2(max(share, 1))
    shares = torch.zeros(2 * P * max(share, 1), device=dev)
    out = torch.empty(P * shp, device=dev)
    kw = dict(P=P, SH=max(share, 1), SHP=shp, PP=triton.next_power_of_2(P),
              SHARE=variant != "no-share" and share > 0, FENCED=variant != "relaxed",
              num_warps=num_warps)
    ms = do_bench_cudagraph(lambda: _probe_kernel[(P,)](bar, shares, out, rounds, **kw),
                            rep=100, return_mode="median")
    assert int(bar.sum()) == 0, "barrier counters not reset"
    return ms * 1e3


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--programs", default="16,32,64",
                    help="programs per batch row (comma-separated; the audio step uses 32)")
    ap.add_argument("--rounds", type=int, default=290, help="barrier rounds per launch")
    ap.add_argument("--warps", type=int, default=8, help="warps per program (the step's 8)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/decode_barrier.py needs a CUDA device")
    rows = []
    print(f"{'programs':>8s} {'share':>6s} {'variant':>9s} {'us/round':>9s} {'29 rounds us':>13s}")
    for P in (int(p) for p in args.programs.split(",")):
        for share, variant in ((256, "full"), (48, "full"), (0, "no-share"), (256, "relaxed"),
                               (0, "relaxed")):
            t0 = time_rounds(P, share, variant, 0, args.warps)
            t1 = time_rounds(P, share, variant, args.rounds, args.warps)
            per = (t1 - t0) / args.rounds
            rows.append(dict(programs=P, share=share, variant=variant, us_per_round=per,
                             empty_launch_us=t0))
            print(f"{P:8d} {share:6d} {variant:>9s} {per:9.3f} {29 * per:13.1f}")
    return rows


if __name__ == "__main__":
    main()
