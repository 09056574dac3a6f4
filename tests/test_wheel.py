"""seqlab installs as a wheel and runs from any directory: recipes and bundled data ship inside."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _source_copy(dest: Path) -> Path:
    """The tracked files only (a clean clone's content), so no build leftovers reach the wheel."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                    reason="needs a git checkout to list the tracked files")
def test_wheel_installs_and_runs_from_another_directory(tmp_path):
    src = _source_copy(tmp_path / "src")
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(dist), str(src)], check=True)
    (wheel,) = dist.glob("seqlab-*.whl")
    venv = tmp_path / "venv"
    # The test machine's own packages (torch, ...) are reused; seqlab comes from the wheel.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py, exe = venv / "bin" / "python", venv / "bin" / "seqlab"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("SEQLAB_RECIPES", "PYTHONPATH")}

    def run(*args):
        return subprocess.run([*args], cwd=elsewhere, env=env, capture_output=True, text=True)

    where = run(str(py), "-c", "import seqlab, seqlab.kernels, seqlab.settings as s; "
                               "print(seqlab.__file__); print(s.resource_root())")
    assert where.returncode == 0, where.stderr
    pkg, root = where.stdout.split()
    assert Path(pkg).is_relative_to(venv) and Path(root).is_relative_to(venv)
    listing = run(str(exe), "ls")
    assert listing.returncode == 0 and "finetune_species" in listing.stdout, listing.stderr
    job = run(str(exe), "run", "finetune_species", "trainer.max_steps=2", "trainer.eval_every=0",
              "trainer.progress=false", "post.embed_probe=false", "data.eval_max_per_species=4",
              "data.test_max_per_species=4", "model.d_model=16", "model.n_layer=1",
              "run_dir=run")
    assert job.returncode == 0, job.stderr[-3000:]
    assert (elsewhere / "run" / "summary.json").is_file()
    assert "test_accuracy" in job.stdout
