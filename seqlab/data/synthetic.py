"""The synthetic tasks of the Mamba paper (Gu & Dao 2023, section 4.1): selective copying and
induction heads, generated on the fly.

Nothing is stored: sample ``i`` of a generator is a pure function of (seed, i), drawn from
``np.random.default_rng([seed, i])``, so a training run sees the same samples after a resume
and a held-out stream is just another seed. Every sample of a generator has the same length,
so a batch is a plain (B, T) array.

Answers are kept sparse: each sample has K answer ``positions`` (where the causal model's
output is read) and K ``targets`` (what it must predict there). Dense labels (-100 except at
the answer positions) are made only for training batches; the long extrapolation evaluation
never builds a (B, T) label or logit array.

Token ids (``V = vocab_size``, the number of distinct ids the model sees):

selective copying   0 = noise, 1..V-2 = content, V-1 = marker
                    [noise with K content tokens at random positions] (length L) +
                    [K markers]; the answer at the k-th marker is the k-th content token.
induction heads     V-1 = trigger, 0..V-2 = ordinary tokens
                    random tokens (length L) with the trigger at a random position p,
                    followed by the target at p + 1, and the trigger again at L - 1;
                    the answer at L - 1 is the target.

The paper's settings: selective copying L=4096, K=16, V=16; induction heads V=16 trained at
L=256 and evaluated up to L=2^20.

A :class:`LengthCurriculum` trains at shorter L first (``data.curriculum`` of the synthetic
job): the length is a function of the optimizer step, sample ``i`` at length L is still
``default_rng([seed, i])``, and evaluation stays at the full L.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100  # label of positions that carry no loss (torch's cross_entropy default)


@dataclass
class SyntheticBatch:
    """B samples of one generator.

    ids        (B, T) int32 numpy: the input tokens (int32 keeps 2^20-long evaluations small)
    positions  (B, K) int64 numpy: answer positions, increasing along K
    targets    (B, K) int64 numpy: the token the model must output at each answer position
    """
    ids: np.ndarray
    positions: np.ndarray
    targets: np.ndarray

    def __len__(self) -> int:
        return self.ids.shape[0]

    def labels(self) -> np.ndarray:
        """(B, T) int64: the target at answer positions, IGNORE_INDEX elsewhere."""
        lab = np.full(self.ids.shape, IGNORE_INDEX, dtype=np.int64)
        np.put_along_axis(lab, self.positions, self.targets, axis=1)
        return lab


@dataclass
class TrainBatch:
    """Torch tensors for the trainer: ids (B, T) long, labels (B, T) long (IGNORE_INDEX = no loss)."""
    ids: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]


class SyntheticTask:
    """Common part of the generators: seeding, batching and length changes."""

    name = "synthetic"

    seed: int
    seq_len: int
    vocab_size: int

    @property
    def length(self) -> int:
        """T, the number of input tokens per sample."""
        raise NotImplementedError

    @property
    def n_answers(self) -> int:
        """K, the number of answer positions per sample."""
        raise NotImplementedError

    def _draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sample ``index``: (ids (T,) int32, positions (K,) int64, targets (K,) int64)."""
        if index < 0:
            raise ValueError(f"{type(self).__name__}.sample: index must be >= 0, got {index}")
        return self._draw(np.random.default_rng([self.seed, int(index)]))

    def batch(self, indices) -> SyntheticBatch:
        parts = [self.sample(i) for i in indices]
        return SyntheticBatch(ids=np.stack([p[0] for p in parts]),
                              positions=np.stack([p[1] for p in parts]),
                              targets=np.stack([p[2] for p in parts]))

    def train_batch(self, indices, device=None) -> TrainBatch:
        b = self.batch(indices)
        return TrainBatch(ids=torch.from_numpy(b.ids.astype(np.int64)).to(device),
                          labels=torch.from_numpy(b.labels()).to(device))

    def with_length(self, seq_len: int):
        """The same task (and seed) at another sequence length L, for extrapolation."""
        return dataclasses.replace(self, seq_len=int(seq_len))

    def with_seed(self, seed: int):
        """The same task drawn from another seed stream (e.g. held-out evaluation)."""
        return dataclasses.replace(self, seed=int(seed))


@dataclass(frozen=True)
class SelectiveCopying(SyntheticTask):
    """Selective copying: remember K content tokens scattered in noise, recite them in order.

    seq_len     L, length of the noise region holding the content tokens (paper: 4096)
    n_content   K, content tokens per sample (paper: 16)
    vocab_size  V, distinct ids: noise, V-2 content values, marker (paper: 16)
    """
    seq_len: int = 256
    n_content: int = 8
    vocab_size: int = 16
    seed: int = 0

    name = "selective_copy"

    def __post_init__(self):
        if self.vocab_size < 3 or self.vocab_size > 2**31 - 1:
            raise ValueError(f"SelectiveCopying.vocab_size={self.vocab_size}: needs at least 3 "
                             "(noise, one content value, marker)")
        if self.n_content < 1 or self.n_content > self.seq_len:
            raise ValueError(f"SelectiveCopying: n_content={self.n_content} must be in "
                             f"1..seq_len={self.seq_len}")

    @property
    def noise_id(self) -> int:
        return 0

    @property
    def marker_id(self) -> int:
        return self.vocab_size - 1

    @property
    def length(self) -> int:
        return self.seq_len + self.n_content

    @property
    def n_answers(self) -> int:
        return self.n_content

    def _draw(self, rng):
        L, K = self.seq_len, self.n_content
        where = np.sort(rng.choice(L, size=K, replace=False))
        content = rng.integers(1, self.vocab_size - 1, size=K)
        ids = np.zeros(L + K, dtype=np.int32)  # noise_id = 0
        ids[where] = content
        ids[L:] = self.marker_id
        return ids, np.arange(L, L + K, dtype=np.int64), content.astype(np.int64)


@dataclass(frozen=True)
class InductionHeads(SyntheticTask):
    """Induction heads: after the trigger reappears at the end, recall the token that followed it.

    seq_len     L, total length including the final trigger (paper: 256 in training)
    vocab_size  V, distinct ids: V-1 ordinary tokens and the trigger (paper: 16)
    """
    seq_len: int = 64
    vocab_size: int = 16
    seed: int = 0

    name = "induction"

    def __post_init__(self):
        if self.vocab_size < 3 or self.vocab_size > 2**31 - 1:
            raise ValueError(f"InductionHeads.vocab_size={self.vocab_size}: needs at least 3 "
                             "(two ordinary tokens and the trigger)")
        if self.seq_len < 3:
            raise ValueError(f"InductionHeads.seq_len={self.seq_len}: needs at least 3 "
                             "(trigger, target, final trigger)")

    @property
    def trigger_id(self) -> int:
        return self.vocab_size - 1

    @property
    def length(self) -> int:
        return self.seq_len

    @property
    def n_answers(self) -> int:
        return 1

    def _draw(self, rng):
        L = self.seq_len
        ids = rng.integers(0, self.vocab_size - 1, size=L, dtype=np.int32)
        p = int(rng.integers(0, L - 2))  # trigger at p, target at p + 1 <= L - 2
        ids[p] = self.trigger_id
        ids[L - 1] = self.trigger_id
        return ids, np.array([L - 1], dtype=np.int64), np.array([ids[p + 1]], dtype=np.int64)


@dataclass(frozen=True)
class LengthCurriculum:
    """Training length by optimizer step: ``stages`` = ((from_step, seq_len), ...).

    Stage k trains at ``seq_len_k`` from ``from_step_k`` until the next stage starts; the last
    stage runs to the end. The first stage starts at step 0, steps strictly increase and every
    length lies in the task's valid range up to its full ``seq_len`` (where evaluation stays).
    The length is a pure function of the step, so a resumed run trains at the same lengths.
    """
    stages: tuple[tuple[int, int], ...]

    def __post_init__(self):
        where = "data.curriculum"
        if not self.stages:
            raise ValueError(f"{where}: needs at least one [from_step, seq_len] stage")
        if self.stages[0][0] != 0:
            raise ValueError(f"{where}: the first stage must start at step 0, got "
                             f"{self.stages[0][0]}")
        for (s0, _), (s1, _) in itertools.pairwise(self.stages):
            if s1 <= s0:
                raise ValueError(f"{where}: stage start steps must strictly increase, got {s0} "
                                 f"then {s1}")

    def length_at(self, step: int) -> int:
        """seq_len of the stage holding optimizer step ``step`` (0-based)."""
        if step < 0:
            raise ValueError(f"LengthCurriculum.length_at: step must be >= 0, got {step}")
        length = self.stages[0][1]
        for start, seq_len in self.stages:
            if step < start:
                break
            length = seq_len
        return length

    def to_list(self) -> list[list[int]]:
        return [list(s) for s in self.stages]


def make_curriculum(spec, task: SyntheticTask) -> LengthCurriculum | None:
    """Validate ``spec`` ([[from_step, seq_len], ...] or None) against ``task`` (the generator at
    its full training / evaluation length). None or an empty list mean no curriculum."""
    if spec is None or (isinstance(spec, (list, tuple)) and len(spec) == 0):
        return None
    where = "data.curriculum"
    if not isinstance(spec, (list, tuple)):
        raise ValueError(f"{where} must be a list of [from_step, seq_len] pairs, got {spec!r}")
    stages = []
    for k, stage in enumerate(spec):
        if (not isinstance(stage, (list, tuple)) or len(stage) != 2
                or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                           for v in stage)):
            raise ValueError(f"{where}[{k}] must be a pair of integers [from_step, seq_len], "
                             f"got {stage!r}")
        stages.append((int(stage[0]), int(stage[1])))
    curriculum = LengthCurriculum(tuple(stages))  # checks the steps
    for k, (_, seq_len) in enumerate(stages):
        if seq_len > task.seq_len:
            raise ValueError(f"{where}[{k}]: seq_len {seq_len} exceeds data.seq_len="
                             f"{task.seq_len} (the evaluation length, and the most a stage "
                             "may train at)")
        try:
            task.with_length(seq_len)  # the generator's own checks (e.g. n_content <= seq_len)
        except ValueError as exc:
            raise ValueError(f"{where}[{k}]: seq_len {seq_len} is invalid for "
                             f"{task.name}: {exc}") from exc
    return curriculum


TASKS = {"selective_copy": SelectiveCopying, "induction": InductionHeads}


def make_task(name: str, **kwargs) -> SyntheticTask:
    """A generator by name (``selective_copy`` | ``induction``) with its knobs as keywords."""
    if name not in TASKS:
        raise ValueError(f"unknown synthetic task {name!r}; known: {', '.join(TASKS)}")
    cls = TASKS[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"synthetic task {name!r} has no setting(s) {unknown}; "
                         f"it takes {sorted(known)}")
    return cls(**kwargs)
