"""Load a script of the top-level benchmarks/ folder as a module (the scripts are not part of
the installed package): ``load_benchmark("scan").peer_peak_extra_bytes``."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(name: str):
    """benchmarks/<name>.py as the module ``seqlab_benchmarks_<name>`` (loaded once)."""
    mod_name = f"seqlab_benchmarks_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    return module
