"""Synthetic-task benchmark (Mamba paper, section 4.1) without Hydra: train a 2-layer causal
MambaLM on selective copying or induction heads for a wall-clock budget, through seqlab's one
Trainer and the synthetic job's task, then measure accuracy at the training length and far
beyond it. Prints a table.

    # selective copying, the paper's setting (L=4096, K=16, vocab 16), 20 minutes on one GPU
    python benchmarks/synthetic.py --task selective_copy --minutes 20 --json sc.json
    # induction heads: train at length 256, evaluate up to 2^20 = 1,048,576 tokens
    python benchmarks/synthetic.py --task induction --minutes 10 --json ih.json
    # the LTI (S4D-style) ablation: Δ, B, C input-independent
    python benchmarks/synthetic.py --task induction --no-selective --minutes 10
    # CPU smoke test (seconds)
    python benchmarks/synthetic.py --quick --device cpu --task induction

Training: :class:`seqlab.training.trainer.Trainer` runs
:class:`seqlab.tasks.synthetic.SyntheticLMTask` (the synthetic job's task) on MambaLM(d_model
64, 2 layers, d_state 16, vocab = the task's vocab): AdamW (betas 0.9/0.95, weight decay on
matrices only), gradient clipping at 1.0, bf16 autocast on CUDA (fp32 parameters), fp32 on the
CPU. Step s trains on samples s*B .. s*B+B-1 of the task's training stream (seed --seed):
fresh samples every step, the same ones on a re-run. The loss is cross-entropy at the answer
positions only (the K markers of selective copying, the final trigger of induction heads).
The run directory (metrics.jsonl, the final checkpoint, plots/training.png) is --run-dir, or a
temporary folder removed at the end.

LR schedule (--schedule): "cosine" (default) = linear warm-up over --warmup-steps, then a
cosine decay to lr * --min-lr-ratio as the run's progress goes from 0 to 1, where progress =
max(step / --max-steps, elapsed / --minutes) over whichever limits are set (a wall-clock-only
run therefore decays by time); "constant" = linear warm-up, then constant.

Evaluation: every --eval-every steps and at the end, accuracy on --eval-samples held-out
samples (the stream of seed --eval-seed) at the training length, one full forward per batch.
Then the same held-out stream at each --extrapolate length through the chunked recurrence
(seqlab.tasks.synthetic.answer_logits_chunked): the model runs --chunk tokens at a time
carrying its SSM and conv state, so memory is bounded by batch * chunk whatever the length.
"Accuracy" is over answer tokens; "all-correct" is the fraction of samples with every answer
right (the same for induction heads, which has one answer per sample).
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from seqlab.data.synthetic import SyntheticTask, make_task
from seqlab.model import MambaConfig
from seqlab.tasks.synthetic import SyntheticLMTask, evaluate_task
from seqlab.training.rundir import RunDir
from seqlab.training.trainer import Trainer, TrainerConfig
from seqlab.utils import (atomic_write_json, autocast, cosine_lr, emit_report, fmt_num,
                          resolve_device, sync_device)

# A wall-clock-only run (--max-steps 0) has no step limit: the trainer's is set past reach.
UNBOUNDED_STEPS = 1 << 62

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
            raise SystemExit(f"benchmarks/synthetic.py: --extrapolate item {item!r} is not a "
                             "length (use e.g. 4x, 2^20 or 65536)") from None
        if v < 1:
            raise SystemExit(f"benchmarks/synthetic.py: --extrapolate item {item!r} gives "
                             f"length {v}")
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


# ----------------------------------------------------------------------------- the run
class _Watched(SyntheticLMTask):
    """The synthetic task, timing its evaluations and keeping the trained model."""

    eval_seconds = 0.0
    model = None

    def evaluate(self, model, step, device):
        t0 = time.perf_counter()
        out = super().evaluate(model, step, device)
        sync_device(device)
        self.eval_seconds += time.perf_counter() - t0
        return out

    def finish(self, model, run, device):
        self.model = model
        return {}


class _Printed(RunDir):
    """The run directory, with each metrics record also printed as a line and kept (with
    the seconds since training began and the evaluation seconds by then) for the curve."""

    def __init__(self, path, task: _Watched):
        super().__init__(path)
        self.task, self.records, self.t0 = task, [], time.perf_counter()

    def begin(self, config_text, step=0):
        super().begin(config_text, step)
        self.t0 = time.perf_counter()

    def log(self, record):
        super().log(record)
        seconds = time.perf_counter() - self.t0
        self.records.append((record, seconds, self.task.eval_seconds))
        if record.get("split") == "train":
            print(f"step {record['step']:>7d}  loss {record['loss']:.4f}  train acc "
                  f"{record['acc']:.4f}  lr {record['lr']:.2e}  {seconds:8.1f} s", flush=True)
        elif record.get("split") == "eval":
            print(f"step {record['step']:>7d}  | held-out acc {record['val_acc']:.4f}  "
                  f"all-correct {record['val_seq_acc']:.4f}  {seconds:8.1f} s", flush=True)


def _curve(records) -> list[dict]:
    """One point per logged step: training loss, accuracy and lr; held-out accuracy where an
    evaluation ran at that step; seconds since training began."""
    points: dict[int, dict] = {}
    for record, seconds, _ in records:
        point = points.setdefault(record["step"], {"step": record["step"]})
        if record.get("split") == "train":
            point.update(loss=record["loss"], train_acc=record["acc"], lr=record["lr"])
        elif record.get("split") == "eval":
            point.update(acc=record["val_acc"], seq_acc=record["val_seq_acc"])
        point["seconds"] = seconds
    return [points[s] for s in sorted(points)]


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
        raise SystemExit("benchmarks/synthetic.py: set --minutes and/or --max-steps (both are 0)")
    if args.eval_seed == args.seed:
        raise SystemExit(f"benchmarks/synthetic.py: --eval-seed equals --seed ({args.seed}); the "
                         "held-out stream must use another seed")
    return args


def build_task(args) -> SyntheticTask:
    kw = {"seq_len": args.seq_len, "vocab_size": args.vocab_size, "seed": args.seed}
    if args.task == "selective_copy":
        kw["n_content"] = args.n_content
    try:
        return make_task(args.task, **kw)
    except ValueError as exc:
        raise SystemExit(f"benchmarks/synthetic.py: {exc}") from exc


def run(args) -> dict:
    args = resolve_args(args)
    device = resolve_device(args.device)
    bf16 = device.type == "cuda" and not args.fp32
    gen = build_task(args)
    ext_lengths = parse_lengths(args.extrapolate, gen.seq_len) if args.extrapolate else []
    for L in ext_lengths:  # fail before training, not after
        try:
            gen.with_length(L)  # dataclasses.replace: re-runs the generator's checks
        except ValueError as exc:
            raise SystemExit(f"benchmarks/synthetic.py: --extrapolate length {L}: {exc}") from exc

    mcfg = MambaConfig(d_model=args.d_model, n_layer=args.n_layer, d_state=args.d_state,
                       vocab_size=gen.vocab_size, selective=not args.no_selective,
                       scan_impl=args.scan_impl)
    task = _Watched(gen, mcfg, args.eval_seed, samples_per_step=args.batch_size,
                    eval_samples=args.eval_samples, eval_batch_size=args.eval_batch_size,
                    precision="fp32" if args.fp32 else "auto",
                    data_spec={"task": args.task, "seq_len": gen.seq_len,
                               "vocab_size": gen.vocab_size, "seed": args.seed})
    tcfg = TrainerConfig(
        max_steps=args.max_steps or UNBOUNDED_STEPS, micro_batch_size=args.batch_size,
        lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        # --log-every 0: a line at each evaluation only
        log_every=args.log_every or args.eval_every or UNBOUNDED_STEPS,
        eval_every=args.eval_every, ckpt_every=0, keep_checkpoints=1,
        precision="fp32" if args.fp32 else "auto", device=args.device, seed=args.seed,
        max_minutes=args.minutes, progress=False)
    n_params = sum(p.numel() for p in task.build_model(torch.device("cpu")).parameters())
    dev_name = (f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda"
                else str(device))
    sel = "on" if mcfg.selective else "off (LTI)"
    knobs = (f"L={gen.seq_len}, K={gen.n_answers}, vocab {gen.vocab_size}, "
             f"{gen.length} tokens per sample")
    print(f"benchmarks/synthetic.py: {gen.name} ({knobs}); MambaLM d_model {mcfg.d_model}, "
          f"{mcfg.n_layer} layers, d_state {mcfg.d_state}, selective {sel}, "
          f"{n_params / 1e3:.1f}K parameters; {dev_name}, "
          f"{'bf16 autocast' if bf16 else 'fp32'}; batch {args.batch_size}, lr {args.lr:g} "
          f"({args.schedule}, warm-up {args.warmup_steps}), budget "
          f"{f'{args.minutes:g} min' if args.minutes else 'none'}"
          f"{f', max {args.max_steps} steps' if args.max_steps else ''}", flush=True)

    with tempfile.TemporaryDirectory(prefix="seqlab-bench-synthetic-") as tmp:
        run_dir = _Printed(Path(args.run_dir) if args.run_dir else Path(tmp) / "run", task)
        trainer = Trainer(tcfg, run_dir, lr_schedule=lambda step, s: lr_at(step, s, args))
        summary = trainer.fit(task, resume=False)
    model = task.model

    train = [r for r in run_dir.records if r[0].get("split") == "train"]
    evals = [r for r in run_dir.records if r[0].get("split") == "eval"]
    last, train_seconds, eval_seconds = train[-1] if train else ({}, 0.0, 0.0)
    step = summary["step"]
    final = {"step": step, "seconds": train_seconds, "eval_seconds": eval_seconds,
             "steps_per_s": step / max(train_seconds - eval_seconds, 1e-9),
             "loss": last.get("loss", math.nan), "train_acc": last.get("acc", math.nan),
             "acc": evals[-1][0]["val_acc"], "seq_acc": evals[-1][0]["val_seq_acc"],
             "n": args.eval_samples, "length": gen.length, "seq_len": gen.seq_len}
    print(f"trained {step} steps in {train_seconds:.1f} s ({eval_seconds:.1f} s of it in "
          f"evaluation, {final['steps_per_s']:.2f} training steps/s); held-out accuracy at "
          f"length {gen.length}: {final['acc']:.4f}", flush=True)

    # ---- extrapolation: the chunked recurrence, bounded memory
    model.eval()
    extrapolation = []
    for L in ext_lengths:
        eval_gen = task.eval_gen.with_length(L)
        n = args.extrapolate_samples
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        te = time.perf_counter()
        rec = {"seq_len": L, "length": eval_gen.length, "factor": L / gen.seq_len, "n": n}
        try:
            with torch.no_grad(), autocast(device, torch.bfloat16 if bf16 else None):
                r = evaluate_task(model, eval_gen, n, max(1, min(args.extrapolate_batch_size, n)),
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
        print(f"extrapolation: length {eval_gen.length:>9,d} ({rec['factor']:.4g}x L): "
              + (f"acc {rec['acc']:.4f}  all-correct {rec['seq_acc']:.4f}"
                 if rec.get("acc") is not None else rec["error"])
              + f"  ({rec['seconds']:.1f} s)", flush=True)

    header = (f"seqlab synthetic benchmark: {gen.name} ({knobs}), selective {sel}, "
              f"d_model {mcfg.d_model}, {mcfg.n_layer} layers, d_state {mcfg.d_state}, "
              f"{dev_name}{' [--quick sizes]' if args.quick else ''}")
    rows = [{"task": gen.name, "selective": mcfg.selective, "length": gen.length,
             "factor": 1.0, "what": "training length (full forward)", "acc": final["acc"],
             "seq_acc": final["seq_acc"], "n": args.eval_samples}]
    rows += [{"task": gen.name, "selective": mcfg.selective, "length": e["length"],
              "factor": e["factor"], "what": "extrapolation (chunked)", "acc": e["acc"],
              "seq_acc": e["seq_acc"], "n": e["n"]} for e in extrapolation]
    table = format_table(gen.name, sel, final, rows)
    emit_report(header, table, rows, None)
    result = {"header": header, "table": table, "rows": rows,
              "config": {**{k: v for k, v in vars(args).items() if k != "json"},
                         "device": dev_name, "bf16": bf16, "params": n_params,
                         "model": mcfg.to_dict(),
                         "task_length": gen.length, "n_answers": gen.n_answers,
                         "extrapolate_lengths": ext_lengths},
              "curve": _curve(run_dir.records), "final": final, "extrapolation": extrapolation}
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
    p = argparse.ArgumentParser(prog="python benchmarks/synthetic.py", description=__doc__,
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
    p.add_argument("--run-dir", default=None,
                   help="keep the run directory here (metrics.jsonl, final checkpoint, training "
                        "plot); default: a temporary folder removed at the end")
    p.add_argument("--json", default=None,
                   help="write everything (config, curve, final and extrapolation accuracies) "
                        "to this JSON file")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes: a CPU smoke test of a few seconds")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
