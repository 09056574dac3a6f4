"""Shared test setup.

Triton decides at decoration time whether a kernel is interpreted, so TRITON_INTERPRET must be
set before any seqlab.kernels Triton module is imported: on a machine without a GPU the Triton
kernels are exercised through the interpreter on small shapes.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One xdist worker per core (the README's command): one thread each, or the workers'
    # thread pools spin-wait on each other. Numba reads its variable at first import.
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    torch.set_num_threads(1)
else:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def rng_seed(request):
    """A fresh seed per test (printed on failure) so inputs differ between runs."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    return seed


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; the GPU tier runs through the device machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
