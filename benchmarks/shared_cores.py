"""Two runs of the main job side by side on one machine, against one alone.

    python benchmarks/shared_cores.py                    # 30 steps each, seqlab's defaults
    python benchmarks/shared_cores.py --steps 30 --env OMP_WAIT_POLICY=ACTIVE   # spinning threads

Prints the wall time of one run alone and of each of two started together, and their ratio.
Sharing the cores costs at most 2x when the runs do not get in each other's way; seqlab's
target is at most 2.5x. Each run is `seqlab run finetune_species trainer.max_steps=N` in a
fresh run directory (its final evaluation, embedding and probe included).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one(run_dir: Path, steps: int, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "seqlab.cli", "run", "finetune_species",
           f"trainer.max_steps={steps}", f"run_dir={run_dir}", "trainer.progress=false"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def timed(procs: list[subprocess.Popen], t0: float) -> list[float]:
    out = []
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"a run failed (exit {p.returncode})")
        out.append(time.time() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for the runs (repeatable)")
    args = ap.parse_args()
    env = dict(os.environ)
    env.update(kv.split("=", 1) for kv in args.env)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.time()
        (alone,) = timed([one(tmp / "alone", args.steps, env)], t0)
        t0 = time.time()
        pair = timed([one(tmp / "a", args.steps, env), one(tmp / "b", args.steps, env)], t0)
    print(f"| runs | wall s | ratio to one alone |\n|---|---|---|")
    print(f"| one alone | {alone:.1f} | 1.00 |")
    for i, t in enumerate(pair):
        print(f"| side by side, run {i + 1} | {t:.1f} | {t / alone:.2f} |")
    print(f"# {os.cpu_count()} cores; {args.steps} steps; env {args.env or 'default'}")


if __name__ == "__main__":
    main()
