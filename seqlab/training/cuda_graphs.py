"""Training steps replayed from CUDA graphs.

A training step of a small or medium Mamba model issues a few thousand kernels; at the 130m size
(batch 8 x 2048) the Python side needs about as long to launch them as the GPU to run them, so
the GPU idles between kernels. :class:`GraphedForward` captures the model's forward and backward
once per input signature with ``torch.cuda.make_graphed_callables`` and replays them: the launch
cost disappears (H200, 130m: 159k -> 194k tokens/s, docs/performance.md). The loss, the gradient
accumulation into ``.grad`` and the optimizer step stay eager.

Used by the trainer (``trainer.cuda_graph=true``) and by ``python benchmarks/model.py``.
Conditions: CUDA, one process, the model's forward free of host synchronisation (seqlab's
causal, bidirectional and RC models are, with or without ``lengths``) and fixed input shapes.
The first training call captures its signature (shapes, dtypes and keyword names of the tensor
arguments); other signatures beyond ``max_graphs`` (default 1), calls in eval mode or without
gradients, and calls with non-tensor arguments run eagerly, with the same results. Capture
before any eager backward pass whose autograd graph is still referenced (a training loop's
first step does): torch then reports an AccumulateGrad stream mismatch and the capture fails
("operation would make the legacy stream depend on a capturing blocking stream"), which is why
later signatures are not captured by default.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ..utils import autocast

log = logging.getLogger(__name__)


class _FlatCall(nn.Module):
    """model(*pos, **kw) as a module of positional tensors only (what make_graphed_callables
    takes); it holds the model, so the graph's parameters are the model's."""

    def __init__(self, model: nn.Module, n_pos: int, kw_names: tuple[str, ...]):
        super().__init__()
        self.model, self.n_pos, self.kw_names = model, n_pos, kw_names

    def forward(self, *flat):
        return self.model(*flat[:self.n_pos], **dict(zip(self.kw_names, flat[self.n_pos:])))


class GraphedForward:
    """Callable stand-in for ``model`` in a training step whose forward and backward replay from
    CUDA graphs (see the module docstring). Attribute access falls through to the model.

    Args:
        model: the module to run; its parameters receive the gradients as usual.
        autocast_dtype: the dtype of the training step's autocast region (None: no autocast).
            Captures run under ``torch.autocast(..., cache_enabled=False)`` as torch requires.
        max_graphs: signatures captured at most (each keeps its own memory pool; see above).
    """

    def __init__(self, model: nn.Module, autocast_dtype: torch.dtype | None = None,
                 max_graphs: int = 1):
        if not torch.cuda.is_available():
            raise ValueError("CUDA-graph training needs a CUDA device (trainer.cuda_graph=true "
                             "on a machine without one); set trainer.cuda_graph=false")
        self.model, self.autocast_dtype, self.max_graphs = model, autocast_dtype, max_graphs
        self.graphs: dict[tuple, nn.Module] = {}
        self._warned = False

    def __getattr__(self, name):  # only reached for names not set in __init__
        return getattr(self.__dict__["model"], name)

    def autocast(self):
        """The autocast region a graphed call must run in (weight-cast cache off)."""
        return autocast("cuda", self.autocast_dtype, cache_enabled=False)

    def __call__(self, *args, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        tensors = list(args) + list(kwargs.values())
        if (not self.model.training or not torch.is_grad_enabled()
                or not all(torch.is_tensor(t) and t.is_cuda for t in tensors)):
            return self.model(*args, **kwargs)
        key = (len(args), tuple(kwargs), tuple((tuple(t.shape), t.dtype) for t in tensors))
        fn = self.graphs.get(key)
        if fn is None:
            if len(self.graphs) >= self.max_graphs:
                if not self._warned:
                    log.warning("CUDA graphs: %d input signatures captured already; "
                                "further shapes run eagerly (%s)", self.max_graphs, key)
                    self._warned = True
                return self.model(*args, **kwargs)
            log.info("CUDA graphs: capturing the forward and backward for inputs %s", key)
            fn = _FlatCall(self.model, len(args), tuple(kwargs))
            with self.autocast():
                fn = torch.cuda.make_graphed_callables(
                    fn, tuple(t.detach() for t in tensors))
            self.graphs[key] = fn
        return fn(*tensors)
