"""Synthetic-task benchmark (Mamba paper, section 4.1) without Hydra: train a 2-layer causal
MambaLM on selective copying or induction heads for a wall-clock budget, then measure accuracy
at the training length and far beyond it.

    # selective copying, the paper's setting (L=4096, K=16, vocab 16), 20 minutes on one GPU
    python -m seqlab.bench_synthetic --task selective_copy --minutes 20 --json sc.json
    # induction heads: train at length 256, evaluate up to 2^20 = 1,048,576 tokens
    python -m seqlab.bench_synthetic --task induction --minutes 10 --json ih.json
    # the LTI (S4D-style) ablation: Δ, B, C input-independent
    python -m seqlab.bench_synthetic --task induction --no-selective --minutes 10
    # CPU smoke test (seconds)
    python -m seqlab.bench_synthetic --quick --device cpu --task induction

Training: MambaLM(d_model 64, 2 layers, d_state 16, vocab = the task's vocab), AdamW (betas
0.9/0.95, weight decay on matrices only, as seqlab.train), gradient clipping at 1.0, bf16
autocast on CUDA (fp32 parameters), fp32 on the CPU. Step s trains on samples s*B .. s*B+B-1
of the task's training stream (seed --seed): fresh samples every step, the same ones on a
re-run. The loss is the synthetic job's: cross-entropy at the answer positions only (the K
markers of selective copying, the final trigger of induction heads); the LM head is applied
to the hidden states at those positions only, which gives the same loss as masking the full
logits with IGNORE_INDEX labels.

LR schedule (--schedule): "cosine" (default) = linear warm-up over --warmup-steps, then a
cosine decay to lr * --min-lr-ratio as the run's progress goes from 0 to 1, where progress =
max(step / --max-steps, elapsed / --minutes) over whichever limits are set (a wall-clock-only
run therefore decays by time); "constant" = linear warm-up, then constant.

Evaluation: every --eval-every steps, accuracy on --eval-samples held-out samples (the stream
of seed --eval-seed) at the training length, one full forward per batch. At the end, the same
held-out stream at each --extrapolate length through the chunked recurrence
(seqlab.synthetic_eval.answer_logits_chunked): the model runs --chunk tokens at a time carrying
its SSM and conv state, so memory is bounded by batch * chunk whatever the length.
"Accuracy" is over answer tokens; "all-correct" is the fraction of samples with every answer
right (the same for induction heads, which has one answer per sample).
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from .data.synthetic import SyntheticTask, make_task
from .model import MambaConfig, MambaLM
from .model.backbone import param_groups
from .synthetic_eval import evaluate_task
from .utils import (atomic_write_json, cosine_lr, emit_report, fmt_num, resolve_device,
                    seed_everything, sync_device)

# Per-task defaults: the paper's data settings; the optimiser settings of recipes/synthetic_*.yaml
# (measured there at shorter lengths on the recipes' smaller-state model).
TASK_DEFAULTS = {
    "selective_copy": {"seq_len": 4096, "n_content": 16, "vocab_size": 16, "batch_size": 64,
                       "lr": 8e-3, "warmup_steps": 100, "extrapolate": "2x,4x",
                       "eval_samples": 256, "eval_batch_size": 64},
    "induction": {"seq_len": 256, "vocab_size": 16, "batch_size": 64, "lr": 8e-3,
                  "warmup_steps": 20,
                  # 2^9 .. 2^20, the range of the paper's figure beyond the training length
                  "extrapolate": ",".join(f"2^{k}" for k in range(9, 21)),
                  "eval_samples": 512, "eval_batch_size": 128},
}
# --quick: tiny sizes for a CPU smoke test of a few seconds.
QUICK = {
    "selective_copy": {"seq_len": 32, "n_content": 4, "extrapolate": "2x,4x"},
    "induction": {"seq_len": 16, "extrapolate": "2x,2^6"},
    "common": {"d_model": 16, "d_state": 4, "batch_size": 8, "eval_samples": 16,
               "eval_batch_size": 16, "extrapolate_samples": 4, "chunk": 16, "eval_every": 2,
               "log_every": 1, "max_steps": 6, "minutes": 0.5, "warmup_steps": 2},
}


# ----------------------------------------------------------------------------- helpers
def parse_lengths(spec: str, train_len: int) -> list[int]:
    """Comma-separated lengths -> sorted distinct values of the task's ``seq_len`` L.

    ``4x`` = 4 * the training L; ``2^20`` = 1048576; a plain integer = that L. (L is the
    sequence length for induction heads, and the noise region for selective copying, whose
    input is L + K tokens.)
    """
    out = set()
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        try:
            if item.lower().endswith("x"):
                v = float(item[:-1]) * train_len
                if v != int(v):
                    raise ValueError
                v = int(v)
            elif "^" in item:
                base, exp = item.split("^")
                v = int(base) ** int(exp)
            else:
                v = int(item)
        except ValueError:
            raise SystemExit(f"bench_synthetic: --extrapolate item {item!r} is not a length "
                             "(use e.g. 4x, 2^20 or 65536)") from None
        if v < 1:
            raise SystemExit(f"bench_synthetic: --extrapolate item {item!r} gives length {v}")
        out.add(v)
    return sorted(out)


def lr_at(step: int, elapsed: float, args) -> float:
    """Linear warm-up, then constant or cosine (see the module docstring)."""
    if args.warmup_steps and step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if args.schedule == "constant":
        return args.lr
    progress = 0.0
    if args.max_steps:
        progress = max(progress, (step - args.warmup_steps) / max(1, args.max_steps
                                                                   - args.warmup_steps))
    if args.minutes:
        progress = max(progress, elapsed / (args.minutes * 60))
    return cosine_lr(args.lr, args.min_lr_ratio, progress)


def _autocast(device: torch.device, bf16: bool):
    if bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def answer_loss(model: MambaLM, task: SyntheticTask, indices, device):
    """(loss, accuracy) tensors on ``device`` for training samples ``indices`` of ``task``:
    cross-entropy at the answer positions, the LM head applied there only (no host sync)."""
    b = task.batch(indices)
    ids = torch.from_numpy(b.ids.astype(np.int64)).to(device, non_blocking=True)
    pos = torch.from_numpy(b.positions).to(device, non_blocking=True)  # (B, K)
    tgt = torch.from_numpy(b.targets).to(device, non_blocking=True)  # (B, K)
    hidden = model.backbone(ids)  # (B, T, D)
    h = hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, K, D)
    logits = model.lm_head(h).float().flatten(0, 1)  # (B*K, V)
    tgt = tgt.flatten()
    loss = F.cross_entropy(logits, tgt)
    acc = (logits.argmax(-1) == tgt).float().mean()
    return loss, acc


# ----------------------------------------------------------------------------- the run
def resolve_args(args) -> argparse.Namespace:
    """Fill the task-dependent defaults (and the --quick sizes) into ``args``."""
    defaults = dict(TASK_DEFAULTS[args.task])
    if args.quick:
        defaults.update(QUICK["common"])
        defaults.update(QUICK[args.task])
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    # Generic defaults for anything still unset.
    for k, v in {"d_model": 64, "d_state": 16, "extrapolate_samples": 8, "chunk": 16384,
                 "eval_every": 250, "log_every": 50, "max_steps": 0, "minutes": 10.0,
                 "n_content": 16}.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if not args.max_steps and not args.minutes:
        raise SystemExit("bench_synthetic: set --minutes and/or --max-steps (both are 0)")
    if args.eval_seed == args.seed:
        raise SystemExit(f"bench_synthetic: --eval-seed equals --seed ({args.seed}); the "
                         "held-out stream must use another seed")
    return args


def build_task(args) -> SyntheticTask:
    kw = {"seq_len": args.seq_len, "vocab_size": args.vocab_size, "seed": args.seed}
    if args.task == "selective_copy":
        kw["n_content"] = args.n_content
    try:
        return make_task(args.task, **kw)
    except ValueError as exc:
        raise SystemExit(f"bench_synthetic: {exc}") from exc


def run(args) -> dict:
    args = resolve_args(args)
    device = resolve_device(args.device)
    bf16 = device.type == "cuda" and not args.fp32
    task = build_task(args)
    eval_task = task.with_seed(args.eval_seed)
    ext_lengths = parse_lengths(args.extrapolate, task.seq_len) if args.extrapolate else []
    for L in ext_lengths:  # fail before training, not after
        try:
            task.with_length(L)  # dataclasses.replace: re-runs the generator's checks
        except ValueError as exc:
            raise SystemExit(f"bench_synthetic: --extrapolate length {L}: {exc}") from exc

    seed_everything(args.seed)
    mcfg = MambaConfig(d_model=args.d_model, n_layer=args.n_layer, d_state=args.d_state,
                       vocab_size=task.vocab_size, selective=not args.no_selective,
                       scan_impl=args.scan_impl)
    model = MambaLM(mcfg, device=device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr,
                            betas=(0.9, 0.95), fused=device.type == "cuda")
    dev_name = (f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda"
                else str(device))
    sel = "on" if mcfg.selective else "off (LTI)"
    knobs = (f"L={task.seq_len}, K={task.n_answers}, vocab {task.vocab_size}, "
             f"{task.length} tokens per sample")
    print(f"bench_synthetic: {task.name} ({knobs}); MambaLM d_model {mcfg.d_model}, "
          f"{mcfg.n_layer} layers, d_state {mcfg.d_state}, selective {sel}, "
          f"{n_params / 1e3:.1f}K parameters; {dev_name}, "
          f"{'bf16 autocast' if bf16 else 'fp32'}; batch {args.batch_size}, lr {args.lr:g} "
          f"({args.schedule}, warm-up {args.warmup_steps}), budget "
          f"{f'{args.minutes:g} min' if args.minutes else 'none'}"
          f"{f', max {args.max_steps} steps' if args.max_steps else ''}", flush=True)

    curve: list[dict] = []
    win_loss = torch.zeros((), device=device)
    win_acc = torch.zeros((), device=device)
    win_n = 0
    last_loss = last_train_acc = float("nan")
    step = 0
    eval_seconds = 0.0
    last_eval: dict | None = None
    model.train()
    sync_device(device)
    t0 = time.perf_counter()

    def evaluate(step: int) -> dict:
        nonlocal eval_seconds
        te = time.perf_counter()
        model.eval()
        with torch.no_grad(), _autocast(device, bf16):
            r = evaluate_task(model, eval_task, args.eval_samples, args.eval_batch_size, device)
        model.train()
        sync_device(device)
        eval_seconds += time.perf_counter() - te
        return r

    while True:
        elapsed = time.perf_counter() - t0
        if args.max_steps and step >= args.max_steps:
            break
        if args.minutes and elapsed >= args.minutes * 60:
            break
        lr = lr_at(step, elapsed, args)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        idx = range(step * args.batch_size, (step + 1) * args.batch_size)
        with _autocast(device, bf16):
            loss, acc = answer_loss(model, task, idx, device)
        loss.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        win_loss += loss.detach()
        win_acc += acc.detach()
        win_n += 1
        step += 1
        do_eval = args.eval_every and step % args.eval_every == 0
        if do_eval or (args.log_every and step % args.log_every == 0):
            last_loss = win_loss.item() / win_n  # the host sync of this window
            last_train_acc = win_acc.item() / win_n
            win_loss.zero_()
            win_acc.zero_()
            win_n = 0
            if not math.isfinite(last_loss):
                raise FloatingPointError(f"non-finite training loss at step {step}; lower --lr")
            point = {"step": step, "loss": last_loss, "train_acc": last_train_acc, "lr": lr}
            if do_eval:
                last_eval = evaluate(step)
                point.update(acc=last_eval["acc"], seq_acc=last_eval["seq_acc"])
                last_eval["step"] = step
            point["seconds"] = time.perf_counter() - t0
            curve.append(point)
            msg = (f"step {step:>7d}  loss {last_loss:.4f}  train acc {last_train_acc:.4f}  "
                   f"lr {lr:.2e}  {point['seconds']:8.1f} s")
            if do_eval:
                msg += f"  | held-out acc {point['acc']:.4f}  all-correct {point['seq_acc']:.4f}"
            print(msg, flush=True)
    sync_device(device)
    if win_n:  # steps since the last print
        last_loss = win_loss.item() / win_n
        last_train_acc = win_acc.item() / win_n
    train_seconds = time.perf_counter() - t0
    if last_eval is None or last_eval["step"] != step:
        last_eval = evaluate(step)
        last_eval["step"] = step
        if not (curve and curve[-1]["step"] == step):  # else: complete the point just logged
            curve.append({"step": step, "loss": last_loss, "train_acc": last_train_acc,
                          "lr": opt.param_groups[0]["lr"]})
        curve[-1].update(acc=last_eval["acc"], seq_acc=last_eval["seq_acc"],
                         seconds=time.perf_counter() - t0)
    final = {"step": step, "seconds": train_seconds, "eval_seconds": eval_seconds,
             "steps_per_s": step / max(train_seconds - eval_seconds, 1e-9),
             "loss": last_loss, "train_acc": last_train_acc, "acc": last_eval["acc"],
             "seq_acc": last_eval["seq_acc"], "n": args.eval_samples,
             "length": task.length, "seq_len": task.seq_len}
    print(f"trained {step} steps in {train_seconds:.1f} s ({eval_seconds:.1f} s of it in "
          f"evaluation, {final['steps_per_s']:.2f} training steps/s); held-out accuracy at "
          f"length {task.length}: {final['acc']:.4f}", flush=True)

    # ---- extrapolation: the chunked recurrence, bounded memory
    model.eval()
    extrapolation = []
    for L in ext_lengths:
        gen = eval_task.with_length(L)
        n = args.extrapolate_samples
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        te = time.perf_counter()
        rec = {"seq_len": L, "length": gen.length, "factor": L / task.seq_len, "n": n}
        try:
            with torch.no_grad(), _autocast(device, bf16):
                r = evaluate_task(model, gen, n, max(1, min(args.extrapolate_batch_size, n)),
                                  device, chunk=args.chunk)
            sync_device(device)
            rec.update(acc=r["acc"], seq_acc=r["seq_acc"])
        except torch.cuda.OutOfMemoryError as exc:  # report it, keep the other lengths
            rec.update(acc=None, seq_acc=None, error=f"out of memory: {exc}".splitlines()[0])
            torch.cuda.empty_cache()
        rec["seconds"] = time.perf_counter() - te
        if device.type == "cuda":
            rec["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        extrapolation.append(rec)
        print(f"extrapolation: length {gen.length:>9,d} ({rec['factor']:.4g}x L): "
              + (f"acc {rec['acc']:.4f}  all-correct {rec['seq_acc']:.4f}"
                 if rec.get("acc") is not None else rec["error"])
              + f"  ({rec['seconds']:.1f} s)", flush=True)

    header = (f"seqlab synthetic benchmark: {task.name} ({knobs}), selective {sel}, "
              f"d_model {mcfg.d_model}, {mcfg.n_layer} layers, d_state {mcfg.d_state}, "
              f"{dev_name}{' [--quick sizes]' if args.quick else ''}")
    rows = [{"task": task.name, "selective": mcfg.selective, "length": task.length,
             "factor": 1.0, "what": "training length (full forward)", "acc": final["acc"],
             "seq_acc": final["seq_acc"], "n": args.eval_samples}]
    rows += [{"task": task.name, "selective": mcfg.selective, "length": e["length"],
              "factor": e["factor"], "what": "extrapolation (chunked)", "acc": e["acc"],
              "seq_acc": e["seq_acc"], "n": e["n"]} for e in extrapolation]
    table = format_table(task.name, sel, final, rows)
    emit_report(header, table, rows, None)
    result = {"header": header, "table": table, "rows": rows,
              "config": {**{k: v for k, v in vars(args).items() if k != "json"},
                         "device": dev_name, "bf16": bf16, "params": n_params,
                         "model": mcfg.to_dict(),
                         "task_length": task.length, "n_answers": task.n_answers,
                         "extrapolate_lengths": ext_lengths},
              "curve": curve, "final": final, "extrapolation": extrapolation}
    if args.json:
        atomic_write_json(args.json, result)
        print(f"wrote {args.json}")
    return result


def format_table(task_name: str, sel: str, final: dict, rows: list[dict]) -> str:
    lines = [f"{'task':<15} {'selective':<10} {'steps':>8} {'seconds':>8} {'final loss':>11} "
             f"{'acc @ train length':>19}",
             f"{task_name:<15} {sel:<10} {final['step']:>8d} {final['seconds']:>8.1f} "
             f"{fmt_num(final['loss'], '{:.4f}'):>11} {fmt_num(final['acc'], '{:.4f}'):>19}",
             "",
             f"{'length (tokens)':>16} {'x train L':>10} {'samples':>8} {'accuracy':>9} "
             f"{'all-correct':>12}  evaluation",
             "-" * 84]
    for r in rows:
        lines.append(f"{r['length']:>16,d} {r['factor']:>10.4g} {r['n']:>8d} "
                     f"{fmt_num(r['acc'], '{:.4f}'):>9} {fmt_num(r['seq_acc'], '{:.4f}'):>12}  "
                     f"{r['what']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m seqlab.bench_synthetic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(TASK_DEFAULTS), default="selective_copy")
    g = p.add_argument_group("task (defaults: the paper's settings for the chosen --task)")
    g.add_argument("--seq-len", type=int, default=None,
                   help="L: training length (induction, default 256) or the noise region "
                        "holding the content (selective copying, default 4096; the input is "
                        "L + K tokens)")
    g.add_argument("--n-content", type=int, default=None,
                   help="K: content tokens to copy (selective copying only; default 16)")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="distinct token ids of the task, also the model's vocab (default 16)")
    g.add_argument("--seed", type=int, default=0,
                   help="training stream seed and torch seed (default 0)")
    g.add_argument("--eval-seed", type=int, default=1_000_000,
                   help="held-out stream seed for every evaluation (default 1000000)")
    g = p.add_argument_group("model")
    g.add_argument("--d-model", type=int, default=None, help="default 64")
    g.add_argument("--n-layer", type=int, default=2, help="default 2")
    g.add_argument("--d-state", type=int, default=None, help="default 16 (the paper's)")
    g.add_argument("--no-selective", action="store_true",
                   help="MambaConfig(selective=False): Δ, B, C input-independent, the LTI "
                        "(S4D-style) ablation")
    g.add_argument("--scan-impl", default="auto", choices=["auto", "triton", "numba", "torch", "reference"],
                   help="selective-scan implementation; auto = Triton on CUDA, torch on CPU")
    g = p.add_argument_group("training")
    g.add_argument("--minutes", type=float, default=None,
                   help="wall-clock budget of the training loop, periodic evaluations included "
                        "(default 10; 0 = none, then --max-steps must be set)")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps (default 0 = only --minutes)")
    g.add_argument("--batch-size", type=int, default=None, help="samples per step (default 64)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default 8e-3)")
    g.add_argument("--schedule", choices=["cosine", "constant"], default="cosine",
                   help="after the warm-up: cosine decay by run progress (default) or constant")
    g.add_argument("--min-lr-ratio", type=float, default=0.1,
                   help="cosine floor as a fraction of --lr (default 0.1)")
    g.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warm-up steps (default 100 selective copying, 20 induction)")
    g.add_argument("--weight-decay", type=float, default=0.1,
                   help="AdamW weight decay on matrices (default 0.1)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="0 = none (default 1.0)")
    g.add_argument("--device", default="auto", help="auto (CUDA if present) | cuda | cpu | ...")
    g.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, default=None,
                   help="held-out evaluation every N steps (default 250; 0 = only at the end)")
    g.add_argument("--log-every", type=int, default=None,
                   help="print the training loss every N steps (default 50; 0 = at evaluations only)")
    g.add_argument("--eval-samples", type=int, default=None,
                   help="held-out samples per evaluation at the training length")
    g.add_argument("--eval-batch-size", type=int, default=None)
    g.add_argument("--extrapolate", default=None,
                   help="comma-separated lengths for the final evaluation: 4x = 4 * training "
                        "L, 2^20 or 1048576 = that L ('' = none; default 2x,4x for selective "
                        "copying, 2^9,...,2^20 for induction)")
    g.add_argument("--extrapolate-samples", type=int, default=None,
                   help="held-out samples per extrapolation length (default 8)")
    g.add_argument("--extrapolate-batch-size", type=int, default=8)
    g.add_argument("--chunk", type=int, default=None,
                   help="tokens per step of the chunked recurrence (default 16384): bounds "
                        "memory at long lengths")
    p.add_argument("--json", default=None,
                   help="write everything (config, curve, final and extrapolation accuracies) "
                        "to this JSON file")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes: a CPU smoke test of a few seconds")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
