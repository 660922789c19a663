"""Batch selection for DP training: Poisson sampling by default, shuffling only on request.

DP-SGD's accountants (RDP, PLD) assume that every logical batch is a Poisson sample: each
example joins each batch independently with probability q. `PoissonSampler` does exactly
that, so batch sizes vary (Binomial(n, q)) and a batch can be empty. Inclusion of example i
at step t is a pure function of (seed, t, i) -- a counter-based splitmix64 hash -- so the
batches do not depend on the number of processes: rank r of w keeps the examples with
i % w == r, and the union over ranks is the single-process batch, exactly.

Fixed-size shuffled batches (`ShuffledSampler`) are not covered by that analysis (Chua et
al. 2024, "How private are DP-SGD implementations?"); they exist for comparison only, need
`approximate=True`, and say why the accounting is then approximate.

Physical batching: a logical batch is sampled first and then cut into physical chunks
(`split_physical`) that the engine accumulates; the optimizer steps once per logical batch.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

from dpbench.errors import UserError
from dpbench.privacy.accounting import steps_for_epochs  # noqa: F401 -- re-exported: the loop and notebooks import it here

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _splitmix64_int(x: int) -> int:
    """splitmix64 finaliser on one Python int (used to derive per-step keys)."""
    z = (x + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def _splitmix64_array(x: np.ndarray) -> np.ndarray:
    """The same finaliser on a uint64 array (arithmetic wraps modulo 2^64 by design)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(_GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
        return z ^ (z >> np.uint64(31))


def step_key(seed: int, step: int) -> int:
    """A 64-bit key for one step of one seed; distinct (seed, step) pairs mix independently."""
    return _splitmix64_int(_splitmix64_int(int(seed) & _MASK64) ^ (int(step) & _MASK64))


def inclusion_uniforms(seed: int, step: int, indices: np.ndarray | torch.Tensor) -> np.ndarray:
    """Uniform [0, 1) draws u(seed, step, i) for the given example indices.

    A pure function of its arguments (no generator state), which is what makes Poisson
    sampling reproducible and independent of how examples are split across processes.
    The top 53 bits of the hash give an exactly representable float64.
    """
    idx = np.asarray(indices, dtype=np.uint64)
    key = np.uint64(step_key(seed, step))
    with np.errstate(over="ignore"):
        h = _splitmix64_array(idx * np.uint64(_GOLDEN) ^ key)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class PoissonSampler:
    """Poisson-sampled logical batches: each example joins each batch with probability q.

    Iterating yields `steps` LongTensors of example indices (sorted, possibly empty). With
    `world_size > 1`, rank `rank` yields only the indices i with i % world_size == rank; the
    union over ranks equals the single-process batch for the same seed and step.

    Attributes used by the training loop and the ledger: `sample_rate`, `steps`,
    `expected_batch_size` (q * n, over all ranks), `approximate` (False) and
    `approximate_reason` ("").
    """

    approximate = False
    approximate_reason = ""

    def __init__(self, n: int, sample_rate: float, steps: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if int(n) != n or n < 1:
            raise UserError(f"PoissonSampler needs n >= 1 examples, got n={n!r}")
        if not (0.0 < float(sample_rate) <= 1.0):
            raise UserError(f"sample_rate must be in (0, 1], got {sample_rate!r}; use expected_batch_size / n")
        if int(steps) != steps or steps < 0:
            raise UserError(f"steps must be a non-negative integer, got {steps!r}")
        if int(world_size) != world_size or world_size < 1 or not (0 <= rank < world_size):
            raise UserError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        self.n = int(n)
        self.sample_rate = float(sample_rate)
        self.steps = int(steps)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        # This rank's share of the examples; the hash is evaluated only on these.
        self._local = np.arange(self.rank, self.n, self.world_size, dtype=np.int64)

    @property
    def expected_batch_size(self) -> float:
        """q * n: the expected size of a logical batch over all ranks (the DP divisor)."""
        return self.sample_rate * self.n

    def batch(self, step: int) -> torch.Tensor:
        """The indices this rank holds in logical batch `step` (any step, in any order)."""
        u = inclusion_uniforms(self.seed, step, self._local)
        return torch.from_numpy(self._local[u < self.sample_rate].copy())

    def __iter__(self) -> Iterator[torch.Tensor]:
        for t in range(self.steps):
            yield self.batch(t)

    def __len__(self) -> int:
        return self.steps

    def __repr__(self) -> str:
        return (f"PoissonSampler(n={self.n}, sample_rate={self.sample_rate:g}, steps={self.steps}, "
                f"seed={self.seed}, rank={self.rank}, world_size={self.world_size})")


class ShuffledSampler:
    """Fixed-size batches from a fresh shuffle each epoch (NOT what the accountant assumes).

    Only for comparisons: construction needs `approximate=True`. The training loop copies
    `approximate_reason` into the privacy ledger so the manifest says the epsilon reported
    for such a run is an approximation (it is computed as if batches were Poisson with
    q = batch_size / n). The last batch of an epoch is smaller when batch_size does not
    divide n.
    """

    approximate = True
    approximate_reason = (
        "shuffled fixed-size batches: epsilon is computed as if batches were Poisson-sampled "
        "with q = batch_size / n, which the accountant's analysis does not cover"
    )

    def __init__(self, n: int, batch_size: int, epochs: int, seed: int = 0, *, approximate: bool = False):
        if not approximate:
            raise UserError(
                "shuffled batches are not covered by DP-SGD accounting; use Poisson sampling, "
                "or pass approximate=True to accept an approximate epsilon"
            )
        if int(n) != n or n < 1:
            raise UserError(f"ShuffledSampler needs n >= 1 examples, got n={n!r}")
        if int(batch_size) != batch_size or not (1 <= batch_size <= n):
            raise UserError(f"batch_size must be an integer in [1, n={n}], got {batch_size!r}")
        if int(epochs) != epochs or epochs < 0:
            raise UserError(f"epochs must be a non-negative integer, got {epochs!r}")
        self.n = int(n)
        self.batch_size = int(batch_size)
        self.epochs = int(epochs)
        self.seed = int(seed)
        self.batches_per_epoch = math.ceil(self.n / self.batch_size)
        self.steps = self.epochs * self.batches_per_epoch
        self.sample_rate = self.batch_size / self.n

    @property
    def expected_batch_size(self) -> float:
        return float(self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for epoch in range(self.epochs):
            g = torch.Generator().manual_seed(step_key(self.seed, epoch) & ((1 << 63) - 1))
            perm = torch.randperm(self.n, generator=g)
            for b in range(self.batches_per_epoch):
                yield perm[b * self.batch_size:(b + 1) * self.batch_size].sort().values

    def __len__(self) -> int:
        return self.steps

    def __repr__(self) -> str:
        return f"ShuffledSampler(n={self.n}, batch_size={self.batch_size}, epochs={self.epochs}, seed={self.seed}, approximate=True)"


def split_physical(indices: torch.Tensor, max_physical_batch: int) -> list[torch.Tensor]:
    """Cut one logical batch into chunks of at most `max_physical_batch` indices.

    An empty logical batch gives an empty list: the caller still takes the (noise-only)
    optimizer step for it.
    """
    if int(max_physical_batch) != max_physical_batch or max_physical_batch < 1:
        raise UserError(f"max_physical_batch must be a positive integer, got {max_physical_batch!r}")
    if indices.numel() == 0:
        return []
    return list(torch.split(indices, int(max_physical_batch)))
