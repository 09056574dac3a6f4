"""Thread counts fit the cores this process may use, and OpenMP threads do not spin."""
import os
import subprocess
import sys

import torch

from seqlab import utils


def test_cli_sets_openmp_wait_policy_before_torch_loads():
    code = ("import sys, os; import seqlab.cli; "
            "print(os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout.split()
    assert out == ["PASSIVE"]
    # The setting must come first: torch (and libgomp with it) is imported by seqlab.cli's
    # imports, which follow it in the module.
    src = open(utils.__file__.replace("utils.py", "cli.py")).read()
    assert src.index('setdefault("OMP_WAIT_POLICY"') < src.index("from .utils import")
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout.split()
    assert out == ["ACTIVE"], "a user's own setting wins"


def test_usable_cores_follow_affinity_quota_and_workers(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    monkeypatch.setattr(utils, "_cgroup_cpu_quota", lambda: None)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    assert utils.usable_cores() == 8
    monkeypatch.setattr(utils, "_cgroup_cpu_quota", lambda: 2.5)
    assert utils.usable_cores() == 3
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "3")
    assert utils.usable_cores() == 1
    monkeypatch.setattr(utils, "_cgroup_cpu_quota", lambda: None)
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    assert utils.usable_cores() == 4


def test_cgroup_quota_is_read(monkeypatch, tmp_path):
    files = {"/sys/fs/cgroup/cpu.max": "150000 100000\n"}
    real = utils.Path.read_text

    def fake(self, *a, **k):
        if str(self) in files:
            return files[str(self)]
        raise OSError("absent")

    monkeypatch.setattr(utils.Path, "read_text", fake)
    assert utils._cgroup_cpu_quota() == 1.5
    files["/sys/fs/cgroup/cpu.max"] = "max 100000\n"
    assert utils._cgroup_cpu_quota() is None
    monkeypatch.setattr(utils.Path, "read_text", real)


def test_set_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(utils, "usable_cores", lambda: 1)
        assert utils.set_threads(0) == 1 and torch.get_num_threads() == 1
        assert utils.set_threads(2) == 2 and torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert utils.set_threads(0) == 1
    finally:
        torch.set_num_threads(before)
