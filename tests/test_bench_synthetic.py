"""Smoke tests of the Hydra-free synthetic benchmark (python benchmarks/synthetic.py): a few
CPU steps at --quick sizes for both tasks through seqlab's Trainer, the JSON it writes, and
that it imports without omegaconf / hydra (the GPU machine has neither)."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from helpers.benchmarks import BENCHMARKS, load_benchmark

bench = load_benchmark("synthetic")
main, parse_lengths = bench.main, bench.parse_lengths


@pytest.mark.parametrize("task,extra", [("selective_copy", []),
                                        ("induction", ["--no-selective"])])
def test_quick_run_writes_json(tmp_path, task, extra):
    path = tmp_path / "out.json"
    res = main(["--task", task, "--quick", "--device", "cpu", "--max-steps", "3",
                "--eval-every", "2", "--json", str(path), *extra])
    data = json.loads(path.read_text())
    assert set(data) >= {"header", "table", "rows", "config", "curve", "final", "extrapolation"}
    assert data["final"]["step"] == 3 == res["final"]["step"]
    cfg = data["config"]
    assert cfg["task"] == task and cfg["device"] == "cpu" and cfg["bf16"] is False
    assert cfg["model"]["selective"] is (task == "selective_copy")
    assert cfg["model"]["n_layer"] == 2 and cfg["model"]["vocab_size"] == cfg["vocab_size"]
    for key in ("loss", "train_acc", "acc", "seq_acc", "seconds", "steps_per_s"):
        assert math.isfinite(data["final"][key]), key
    assert 0.0 <= data["final"]["acc"] <= 1.0
    # The curve: a point per step at --quick (log every step), evaluations at steps 2 and 3.
    assert [p["step"] for p in data["curve"]] == [1, 2, 3]
    assert [p["step"] for p in data["curve"] if "acc" in p] == [2, 3]
    for p in data["curve"]:
        assert all(math.isfinite(p[k]) for k in ("loss", "seconds", "lr"))
    # Extrapolation through the chunked recurrence, at the --quick lengths.
    train_L = cfg["seq_len"]
    assert [e["seq_len"] for e in data["extrapolation"]] == cfg["extrapolate_lengths"]
    assert data["extrapolation"] and all(e["seq_len"] > train_L for e in data["extrapolation"])
    for e in data["extrapolation"]:
        assert 0.0 <= e["acc"] <= 1.0 and 0.0 <= e["seq_acc"] <= 1.0 and e["n"] == 4
    assert len(data["rows"]) == 1 + len(data["extrapolation"])


def test_cpu_uses_a_cpu_scan():
    """--device cpu with scan_impl auto resolves to a CPU scan (numba, or torch without it)."""
    from seqlab.kernels import api
    main(["--task", "induction", "--quick", "--device", "cpu", "--max-steps", "1",
          "--extrapolate", ""])
    assert api.last_impl("selective_scan") == ("numba" if api.numba_available() else "torch")


def test_parse_lengths():
    assert parse_lengths("2x, 4x,2^10,4096", 256) == [512, 1024, 4096]
    assert parse_lengths("", 256) == []
    with pytest.raises(SystemExit):
        parse_lengths("long", 256)


def test_imports_without_hydra():
    code = ("import sys, runpy; sys.modules['omegaconf'] = None; sys.modules['hydra'] = None; "
            f"runpy.run_path({str(BENCHMARKS / 'synthetic.py')!r}, run_name='bench')")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_trains_through_the_trainer_and_keeps_its_run_directory(tmp_path):
    """--run-dir keeps what the Trainer wrote: metrics of every step, the final checkpoint in
    the one format (the synthetic task's data under "extra"), a completed status."""
    run = tmp_path / "run"
    main(["--task", "induction", "--quick", "--device", "cpu", "--max-steps", "2",
          "--extrapolate", "", "--run-dir", str(run)])
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
             if '"train"' in x]
    assert steps == [1, 2]
    config = json.loads((run / "checkpoints" / "step_0000002" / "config.json").read_text())
    assert config["architecture"] == "MambaLM" and config["extra"]["task"]["task"] == "induction"
