"""Many finetune_species runs side by side on one machine (one GPU holds several small ones),
then a table of held-out-strain accuracy against the k-mer baseline of the same windows.

    python benchmarks/species_sweep.py benchmarks/species_sweep.txt --parallel 8 --out /tmp/sweep

Each line of the config file is one run's overrides (`#` starts a comment). Every run writes
its own run directory under --out; the table lists test accuracy, the k-mer baseline, the
validation accuracy and the minutes of training.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", type=Path)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/species_sweep"))
    args = ap.parse_args()
    configs = [ln.split("#")[0].split() for ln in args.configs.read_text().splitlines()]
    configs = [c for c in configs if c]
    args.out.mkdir(parents=True, exist_ok=True)
    pending, running, t0 = list(enumerate(configs)), {}, time.time()
    print("| run | test | k-mer baseline | val | train min | overrides |\n|---|---|---|---|---|---|",
          flush=True)
    while pending or running:
        while pending and len(running) < args.parallel:
            i, ov = pending.pop(0)
            log = open(args.out / f"r{i:02d}.log", "w")
            cmd = [sys.executable, "-m", "seqlab.cli", "run", "finetune_species",
                   f"run_dir={args.out / f'r{i:02d}'}", "trainer.progress=false", *ov]
            running[i] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                          env=dict(os.environ))
        for i, proc in list(running.items()):
            if proc.poll() is None:
                continue
            del running[i]
            path = args.out / f"r{i:02d}" / "summary.json"
            s = json.loads(path.read_text()) if path.exists() else {}
            fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
            print(f"| r{i:02d} | {fmt(s.get('test_accuracy'))} | "
                  f"{fmt(s.get('baseline_kmer_test_accuracy'))} | {fmt(s.get('val_accuracy'))} "
                  f"| {fmt(s.get('train_minutes'))} | {' '.join(configs[i])}"
                  + ("" if proc.returncode == 0 else f" (exit {proc.returncode})"), flush=True)
        time.sleep(1)
    print(f"# {len(configs)} runs in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
