"""Audio benchmark: decoding samples/s and training tokens/s of the ~6M-parameter audio model.

    python benchmarks/audio.py                      # GPU: the full table
    python benchmarks/audio.py --device cpu --quick # tiny sizes, a smoke test (seconds)
    python benchmarks/audio.py --json bench.json    # also write the rows as JSON
    python benchmarks/audio.py --compare-steps      # GPU: per-op / fused / persistent decoding

Model: recipes/model/audio6m.yaml (d_model 256, 14 layers, d_state 16) over the 256 mu-law
codes. Rows:
  * generation at batch 1 (CUDA-graph decode step) and batch 64: generated samples per second,
    all sequences together, timed around :func:`seqlab.generation.generate` from a one-code
    prompt (the prefill and the graph capture included, after one untimed warm-up call).
  * training at length 16000, batch 16, bf16 autocast: tokens/s of forward + backward + AdamW
    step with the train_audio loss (cross-entropy over the codes, all positions real).
Peer figures are mamba_ssm 2.3.2 on one H200 (decode_audio6m_b{1,64}_cg1 of
/work/shared/anchors/h200-mamba_ssm-2.3.2-model.json); "x peer" is this figure / the peer's.
Targets are 16 kHz real time at batch 1 and the peer figure at batch 64.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from seqlab.generation import generate
from seqlab.kernels import last_impl
from seqlab.model import MambaConfig, MambaLM
from seqlab.utils import autocast, emit_report, fmt_num, met_mark, sync_device

PEERS = {"gen_b1": 3495.0, "gen_b64": 108967.0}
TARGETS = {"gen_b1": 16000.0, "gen_b64": 108967.0}


def build(d_model: int, n_layer: int, device: torch.device, dtype: torch.dtype,
          pool_factors: tuple[int, ...] = (), pool_expand: int = 2) -> MambaLM:
    cfg = MambaConfig(d_model=d_model, n_layer=n_layer, d_state=16, vocab_size=256,
                      pool_factors=list(pool_factors), pool_expand=pool_expand)
    return MambaLM(cfg, device=device, dtype=dtype).eval()


def bench_generate(model: MambaLM, batch: int, new_tokens: int, device: torch.device,
                   cuda_graph: bool) -> float:
    """Generated samples/s (batch * new_tokens / wall seconds) after one warm-up call."""
    prompt = torch.full((batch, 1), 128, dtype=torch.long, device=device)
    generate(model, prompt, min(new_tokens, 64), seed=0, cuda_graph=cuda_graph)  # warm-up
    sync_device(device)
    t0 = time.perf_counter()
    generate(model, prompt, new_tokens, seed=0, cuda_graph=cuda_graph)
    sync_device(device)
    return batch * new_tokens / (time.perf_counter() - t0)


def bench_train(d_model: int, n_layer: int, batch: int, length: int, steps: int,
                device: torch.device, bf16: bool, pool_factors=(), pool_expand=2
                ) -> tuple[float, float]:
    """(tokens/s, peak GiB) of full training steps at (batch, length) after two warm-up steps."""
    model = build(d_model, n_layer, device, torch.float32, pool_factors, pool_expand).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 256, (batch, length), generator=g)
    ids = torch.cat([torch.full((batch, 1), 128), targets[:, :-1]], dim=1)
    ids, targets = ids.to(device), targets.to(device)
    amp = torch.bfloat16 if bf16 else None

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(device, amp):
            # The train_audio loss (seqlab.tasks.audio.code_nll) without its config imports.
            logits = model(ids)  # (B, L, V); every position is real: no lengths
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync_device(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync_device(device)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan
    return batch * length * steps / dt, peak


def run(args) -> list[dict]:
    device = torch.device(args.device)
    if args.quick:
        d_model, n_layer, gen_tokens, b_big, t_len, t_batch, t_steps = 32, 2, 64, 4, 512, 2, 1
    else:
        d_model, n_layer = args.d_model, args.n_layer
        gen_tokens, b_big, t_len, t_batch, t_steps = args.gen_tokens, 64, 16000, 16, args.train_steps
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16}[args.gen_dtype]
    if device.type == "cpu" and dtype != torch.float32:
        dtype = torch.float32  # CPU decoding in low precision is slower, not faster
    pf = tuple(int(f) for f in args.pool_factors.split(",") if f) if args.pool_factors else ()
    graphs = device.type == "cuda"  # multi-scale: one graph per starting phase
    if pf and t_len % math.prod(pf):
        t_len -= t_len % math.prod(pf)  # the multi-scale model needs L divisible by the pooling
    model = build(d_model, n_layer, device, dtype, pf, args.pool_expand)
    n_params = sum(p.numel() for p in model.parameters())
    if args.compare_steps:
        return compare_steps(model, device, gen_tokens, graphs)
    rows = []
    for name, b in (("gen_b1", 1), ("gen_b64", b_big)):
        rows.append({"name": name, "what": f"generate, batch {b}{' (CUDA graph)' if graphs else ''}",
                     "unit": "samples/s", "value": bench_generate(model, b, gen_tokens, device, graphs)})
        print(f"  {rows[-1]['what']}: {rows[-1]['value']:,.0f} samples/s", flush=True)
    del model
    tok, peak = bench_train(d_model, n_layer, t_batch, t_len, t_steps, device,
                            bf16=device.type == "cuda", pool_factors=pf,
                            pool_expand=args.pool_expand)
    rows.append({"name": "train", "what": f"train, length {t_len}, batch {t_batch}"
                 f"{', bf16 autocast' if device.type == 'cuda' else ', fp32'}",
                 "unit": "tokens/s", "value": tok, "peak_gib": peak})
    for r in rows:
        # Quick sizes are a smoke test: comparing them with the peer would mean nothing.
        r["peer"] = None if args.quick else PEERS.get(r["name"])
        r["target"] = None if args.quick else TARGETS.get(r["name"])
        r["meets_target"] = None if r["target"] is None else bool(r["value"] >= r["target"])
    arch = f"multi-scale, pool factors {list(pf)}, " if pf else ""
    header = (f"seqlab audio benchmark: {arch}d_model {d_model}, {n_layer} layers, "
              f"{n_params / 1e6:.2f}M parameters, {device}"
              f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
              f"decode dtype {str(dtype).replace('torch.', '')}, {gen_tokens} new samples per call"
              f"{' [--quick sizes]' if args.quick else ''}")
    emit_report(header, format_table(rows), rows, args.json)
    return rows


def compare_steps(model: MambaLM, device: torch.device, new_tokens: int, graphs: bool) -> list[dict]:
    """generate() samples/s at batches 1, 2, 4 and 8 with each decoding step forced through
    ``model.config.decode_step`` (per_op, fused two-kernel, persistent one-launch; generate()
    keeps a decoder, and its CUDA graph, per setting); a step that does not apply at a batch is
    reported as such."""
    rows, before = [], model.config.decode_step
    try:
        for b in (1, 2, 4, 8):
            for step in ("per_op", "fused", "persistent"):
                model.config.decode_step = step
                try:
                    v = bench_generate(model, b, new_tokens, device, graphs)
                    ran = last_impl("lm_step")
                except ValueError as e:  # the step does not apply here
                    v, ran = math.nan, str(e).split(":")[0]
                rows.append({"batch": b, "step": step, "value": v, "ran": ran})
                us = 1e6 * b / v if v == v else math.nan
                print(f"  batch {b}, {step:<10}: {fmt_num(v):>9} samples/s, "
                      f"{fmt_num(us, '{:.1f}'):>7} us/step ({ran})", flush=True)
    finally:
        model.config.decode_step = before
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'measurement':<44} {'seqlab':>12} {'mamba_ssm H200':>15} {'x peer':>7} "
             f"{'target':>10}  unit      met",
             "-" * 108]
    for r in rows:
        ratio = r["value"] / r["peer"] if r["peer"] else None
        lines.append(f"{r['what']:<44} {fmt_num(r['value']):>12} {fmt_num(r['peer']):>15} "
                     f"{fmt_num(ratio, '{:.2f}'):>7} {fmt_num(r['target']):>10}  {r['unit']:<9} "
                     f"{met_mark(r)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python benchmarks/audio.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test on CPU)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=14)
    p.add_argument("--pool-factors", default="",
                   help="comma-separated pooling factors for the multi-scale (SaShiMi-style) "
                        "model, e.g. 4,4 (recipes/model/audio_sashimi.yaml); empty = flat")
    p.add_argument("--pool-expand", type=int, default=2,
                   help="width multiplier per pooling stage (multi-scale model)")
    p.add_argument("--gen-tokens", type=int, default=8000,
                   help="new samples per sequence in each timed generate() call")
    p.add_argument("--gen-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="parameter dtype for decoding (CPU always float32)")
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--compare-steps", action="store_true",
                   help="only the decoding steps side by side (per_op / fused / persistent, "
                        "batches 1-8; GPU)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
