"""torch.distributed under torchrun (gloo on CPU): two ranks equal one rank with the same global
batch, and a run killed under two processes resumes under one."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

WORKER = Path(__file__).parent / "helpers" / "dist_toy.py"


def _run(args, nproc=1, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), *map(str, args)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", str(WORKER), *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _final(run_dir):
    ck = Path(run_dir) / "checkpoints"
    return load_file(str(ck / (ck / "latest").read_text().strip() / "model.safetensors"))


def test_two_ranks_equal_one_rank_with_same_global_batch(tmp_path):
    _run([tmp_path / "one", 4, 2, 6], nproc=1)
    _run([tmp_path / "two", 4, 1, 6], nproc=2)
    one, two = _final(tmp_path / "one"), _final(tmp_path / "two")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6)
    # Only rank 0 writes: one metrics line per step, not two.
    train = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
             if '"train"' in line]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]


def test_killed_two_rank_run_resumes_on_one_rank(tmp_path):
    ref = tmp_path / "ref"
    _run([ref, 4, 2, 6], nproc=1)
    run = tmp_path / "run"
    proc = _run([run, 4, 1, 6, 5], nproc=2, check=False)  # dies inside step 5
    assert proc.returncode != 0
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "failed"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    _run([run, 4, 2, 6], nproc=1)  # same global batch (8) on one rank
    got, want = _final(run), _final(ref)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
