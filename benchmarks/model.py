"""Model benchmark: training tokens/s + peak memory and decoding tokens/s against mamba_ssm.

    python benchmarks/model.py                        # GPU: the full table (about 3 min)
    python benchmarks/model.py --device cpu --quick   # tiny sizes, a smoke test (seconds)
    python benchmarks/model.py --json out.json --profile

Rows, with the settings of the peer figures (shared/anchors/h200-mamba_ssm-2.3.2-model.json,
mamba_ssm 2.3.2 ``MambaLMHeadModel`` on one H200):
  * train_130m: causal, d_model 768, 24 layers, vocab 256, batch 8 x 2048 tokens; one
    forward + backward (cross-entropy) under bf16 autocast with float32 parameters, no
    optimizer step. Peak memory is ``torch.cuda.max_memory_allocated`` from the model's
    creation on (parameters, gradients and, for the graph rows, the capture included).
  * train_130m_cg / train_caduceus_cg (CUDA only): the same step with the model's forward and
    backward captured as CUDA graphs (:class:`seqlab.training.cuda_graphs.GraphedForward`, what
    ``trainer.cuda_graph=true`` uses), the loss and the gradient accumulation eager. The
    peer's figure is eager; graphs remove the Python launch cost, which at the 130m size is
    a large part of the step (see docs/performance.md).
  * train_caduceus: 16 bidirectional layers of d_model 256 (in/out projections tied between
    the directions, as Caduceus does), batch 1 x 131,072 tokens, same step. seqlab runs the
    reverse direction with the kernel's ``reverse=True``; the peer on flipped copies.
  * decode_130m b1 / b64, with and without CUDA graphs (the peer has no b64 figure without):
    ``generate(top_k=1)`` from a 16-token prompt for 256 new tokens, parameters in bf16; new
    tokens of all rows per second, prefill and graph capture included (after one untimed
    warm-up call).
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from seqlab.generation import generate
from seqlab.model import MambaConfig, MambaLM
from seqlab.training.cuda_graphs import GraphedForward
from seqlab.utils import autocast, emit_report, fmt_num, met_mark, sync_device

# mamba_ssm 2.3.2 on one H200, from shared/anchors/h200-mamba_ssm-2.3.2-model.json.
PEERS = {
    "train_130m": (183697.6, 7.048),
    "train_caduceus": (357926.8, 19.709),
    "decode_130m_b1_cg1": (1250.0, None),
    "decode_130m_b1_cg0": (69.8, None),
    "decode_130m_b64_cg1": (40033.3, None),
}
TARGETS = {"train_130m": 183697.6, "train_caduceus": 357926.8, "decode_130m_b1_cg1": 1250.0,
           "decode_130m_b64_cg1": 40033.3}


def lm_130m(quick: bool, fused: bool = True) -> MambaConfig:
    if quick:
        return MambaConfig(d_model=64, n_layer=2, vocab_size=256, fused_mixer=fused,
                           fused_add_norm=fused)
    return MambaConfig(d_model=768, n_layer=24, vocab_size=256, fused_mixer=fused,
                       fused_add_norm=fused)


def caduceus(quick: bool, fused: bool = True) -> MambaConfig:
    d, n = (32, 2) if quick else (256, 16)
    return MambaConfig(d_model=d, n_layer=n, vocab_size=256, bidirectional=True,
                       tie_bidirectional_projections=True, fused_mixer=fused,
                       fused_add_norm=fused)


def bench_train(cfg: MambaConfig, batch: int, length: int, steps: int, device, profile=False,
                cuda_graph: bool = False):
    """(tokens/s, peak GB, median ms) of forward+backward under bf16 autocast (CUDA).

    cuda_graph: run the model's forward and backward as CUDA graphs (GraphedForward; the loss
    and the gradient accumulation stay eager), which removes the Python side's launch cost."""
    torch.manual_seed(0)
    model = MambaLM(cfg, device=device, dtype=torch.float32).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, length), generator=g).to(device)
    targets = torch.randint(0, cfg.vocab_size, (batch, length), generator=g).to(device)
    amp = device.type == "cuda"
    if device.type == "cuda":
        # from here on: parameters, gradients, activations and, with cuda_graph, the graphs'
        # private memory pool (allocated during the capture) all count towards the peak
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    amp_dtype = torch.bfloat16 if amp else None
    forward = GraphedForward(model, amp_dtype) if cuda_graph else model

    def step():
        with autocast(device, amp_dtype, cache_enabled=not cuda_graph):
            logits = forward(ids)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        model.zero_grad(set_to_none=False)  # grads stay allocated, like a training loop

    for _ in range(2):
        step()
    sync_device(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync_device(device)
        times.append(time.perf_counter() - t0)
    med = sorted(times)[len(times) // 2]
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else math.nan
    if profile and device.type == "cuda":
        print_profile(step, top=30, title=f"train d_model {cfg.d_model} x {cfg.n_layer} "
                      f"{'bi' if cfg.bidirectional else 'causal'} b{batch} L{length}")
    del model
    return batch * length / med, peak, med * 1e3


def print_profile(fn, title: str, top: int = 14):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(f"--- profile: {title}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=60))


def bench_decode(cfg: MambaConfig, batch: int, new_tokens: int, device, cuda_graph: bool,
                 dtype=torch.bfloat16, profile: bool = False) -> float:
    torch.manual_seed(0)
    model = MambaLM(cfg, device=device, dtype=dtype).eval()
    prompt = torch.randint(0, cfg.vocab_size, (batch, 16), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(device)
    generate(model, prompt, min(new_tokens, 32), top_k=1, cuda_graph=cuda_graph)  # warm-up
    sync_device(device)
    t0 = time.perf_counter()
    generate(model, prompt, new_tokens, top_k=1, cuda_graph=cuda_graph)
    sync_device(device)
    dt = time.perf_counter() - t0
    if profile and device.type == "cuda" and not cuda_graph:
        cache = model.allocate_cache(batch, dtype)
        ids = prompt[:, 0]

        def steps():
            with torch.inference_mode():
                for _ in range(4):
                    model.step(ids, cache)
        steps()
        print_profile(steps, f"4 decode steps, batch {batch}, eager", top=12)
    del model
    return batch * new_tokens / dt


def run(args) -> list[dict]:
    device = torch.device(args.device)
    q = args.quick
    rows = []
    only = set(args.only.split(",")) if args.only else None

    def want(name):
        return only is None or any(name.startswith(o) for o in only)

    train_graphs = [False, True] if device.type == "cuda" and not args.no_graph_train else [False]
    train_rows = [  # name, description, config, batch, length
        ("train_130m", "train 130m causal", lm_130m(q, not args.no_fused),
         *((2, 256) if q else (8, 2048))),
        ("train_caduceus", "train Caduceus-size bidir", caduceus(q, not args.no_fused),
         1, 4096 if q else 131072)]
    for cg in train_graphs:
        sfx, label = ("_cg", ", CUDA graph") if cg else ("", "")
        for name, what, cfg, b, L in train_rows:
            if not want(name + sfx):
                continue
            tok, peak, ms = bench_train(cfg, b, L, args.steps, device, args.profile and not cg, cg)
            rows.append(dict(name=name + sfx, what=f"{what}, b{b} x L{L}{label}", value=tok,
                             unit="tokens/s", peak_gb=peak, ms=ms))
            print(f"  {rows[-1]['what']}: {tok:,.0f} tokens/s, {ms:.1f} ms, peak {peak:.2f} GB",
                  flush=True)
    graphs = [True, False] if device.type == "cuda" else [False]
    new = 32 if q else args.new_tokens
    for b in (1, 64 if not q else 4):
        for cg in graphs:
            name = f"decode_130m_b{b}_cg{int(cg)}"
            if not want(name):
                continue
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            tok = bench_decode(lm_130m(q), b, new, device, cg, dtype, args.profile)
            rows.append(dict(name=name, what=f"decode 130m, batch {b}, "
                             f"{'CUDA graph' if cg else 'eager'}", value=tok, unit="tokens/s"))
            print(f"  {rows[-1]['what']}: {tok:,.0f} tokens/s", flush=True)
    for r in rows:
        # Quick sizes are a smoke test: comparing them with the peer would mean nothing.
        # a CUDA-graph training row is held against the peer's (eager) figure and target
        base = r["name"].removesuffix("_cg") if r["name"].startswith("train") else r["name"]
        peer = (None, None) if q else PEERS.get(base, (None, None))
        r["peer"], r["peer_peak_gb"] = peer
        r["target"] = None if q else TARGETS.get(base)
        r["ratio"] = None if r["peer"] is None else r["value"] / r["peer"]
        met = r["target"] is None or r["value"] >= r["target"]
        if r.get("peak_gb") is not None and r["peer_peak_gb"] is not None and not math.isnan(r["peak_gb"]):
            met = met and r["peak_gb"] <= r["peer_peak_gb"]
        r["meets_target"] = None if r["target"] is None else bool(met)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    header = (f"seqlab model benchmark on {name}, torch {torch.__version__}"
              f"{' [--quick sizes]' if q else ''}")
    emit_report(header, format_table(rows), rows, args.json)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'measurement':<36} {'seqlab':>11} {'peak GB':>8} {'mamba_ssm':>11} {'peer GB':>8} "
             f"{'ratio':>6}  met", "-" * 92]
    for r in rows:
        lines.append(f"{r['what']:<36} {fmt_num(r['value']):>11} "
                     f"{fmt_num(r.get('peak_gb'), '{:.2f}'):>8} {fmt_num(r['peer']):>11} "
                     f"{fmt_num(r['peer_peak_gb'], '{:.2f}'):>8} "
                     f"{fmt_num(r['ratio'], '{:.2f}x'):>6}  {met_mark(r)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python benchmarks/model.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test on CPU)")
    p.add_argument("--steps", type=int, default=7, help="timed training steps (median)")
    p.add_argument("--new-tokens", type=int, default=256, help="new tokens per decode call")
    p.add_argument("--only", default=None,
                   help="comma-separated row-name prefixes, e.g. train_130m,decode_130m_b1")
    p.add_argument("--no-fused", action="store_true",
                   help="train with the module path (config.fused_mixer / fused_add_norm off)")
    p.add_argument("--no-graph-train", action="store_true",
                   help="skip the CUDA-graph training rows (eager rows only)")
    p.add_argument("--profile", action="store_true",
                   help="print the top CUDA kernels of one training step (torch.profiler)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
