"""Data-parallel DP-SGD on torch.distributed (torchrun; NCCL on GPUs, gloo on CPUs).

What changes when one logical batch is spread over `world_size` processes, and why:

- Sampling. Rank r of w Poisson-samples only the examples i with i % w == r
  (`PoissonSampler(..., rank=r, world_size=w)`). Inclusion of example i at step t is a pure
  function of (seed, t, i), so the union over ranks IS the single-process Poisson batch with
  rate q: the accountant's assumption holds, and a data-parallel run can be compared with a
  one-process run exactly.
- Clipping. Every rank runs its own `ClippingEngine` on its own samples (any method, any
  style); per-sample clipping needs no communication. There is no DistributedDataParallel
  wrapper, so no all-reduce can fire during the engine's norm-only first pass or its second
  backward: the only collective is ours, after the engine has finished.
- Noise, once in total. `DistributedDPOptimizer.step()` adds this rank's noise to its local
  clipped sum, then all-reduces (sum) the gradients, then divides by the GLOBAL expected
  batch size q*n. Two modes:
    * noise="rank0" (default): rank 0 adds N(0, sigma^2 C^2) with the single-process seed,
      the others add nothing. The noisy sum is the one a single process would release, and
      with the same seed the same noise: a w-process run reproduces the 1-process run.
    * noise="shares": every rank adds an independent share N(0, sigma^2 C^2 / w) from a
      generator seeded by (seed, rank) (or the OS CSPRNG with secure_rng). Shares of
      independent Gaussians add up: Var = w * sigma^2 C^2 / w = sigma^2 C^2. No single rank
      knows the whole noise, but each rank knows its own share, so against a rank that
      sees its share the remaining noise is (w-1)/w of the variance; use "rank0" on a
      trusted cluster when reproducibility matters.
  Getting this wrong is silent: sigma*C on every rank gives w times the variance (wasted
  utility), sigma*C/w per rank gives 1/w of it (epsilon understated), and shares drawn from
  one seed are identical (variance w sigma^2 C^2, and every rank knows the whole noise).
  tests/test_distributed.py measures the variance of the summed noise in both modes.
- Accounting. The ledger sees one subsampled-Gaussian step per logical batch with rate q
  (not q/w: the union is the batch) and records `world_size`.

Entry point for torchrun: `python -m dpbench.workbench.launch CONFIG.yaml` (it reads the config, calls
`fit(..., device=DataParallel)` and writes the outputs; this module holds no config or file handling).
"""

from __future__ import annotations

import datetime
import math
import os
import socket
from typing import Any, Sequence

import torch
import torch.distributed as dist

from dpbench.errors import UserError
from dpbench.training.optimizer import DPOptimizer
from dpbench.training.sampling import step_key

NOISE_MODES = ("rank0", "shares")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def init_from_env(backend: str | None = None, device: str | None = None, timeout_s: float = 300.0) -> "DataParallel":
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT).

    backend: None picks "nccl" when `device` is CUDA (each rank takes cuda:LOCAL_RANK) and
    "gloo" otherwise. Without torchrun's variables this is a one-process group (world size
    1), so the same script runs with or without torchrun.
    Returns a `DataParallel` with `.device` set to this rank's device.
    """
    if not dist.is_available():
        raise UserError("this torch build has no torch.distributed; install a standard PyTorch wheel")
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = torch.device(device or "cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r} was requested but CUDA is not available; use device: cpu (gloo)")
        if torch.cuda.device_count() <= local_rank:
            raise UserError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible; "
                            "set --nproc-per-node to at most the number of GPUs")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()) if world == 1 else "29500")
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DataParallel(device=dev)


def free_port() -> int:
    """A TCP port that was free a moment ago on localhost (for MASTER_PORT / tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DataParallel:
    """The data-parallel settings `dpbench.training.loop.fit(..., device=DataParallel())` uses.

    Args:
        group: the process group (None: the default group; must be initialised).
        noise: "rank0" or "shares" (see the module docstring).
        device: this rank's device (`fit` runs on it; None = cpu).
    """

    def __init__(self, group: Any = None, noise: str = "rank0", device: str | torch.device | None = None):
        if not dist.is_available() or not dist.is_initialized():
            raise UserError("torch.distributed is not initialised; call dpbench.training.distributed.init_from_env() "
                            "(under torchrun) or dist.init_process_group first")
        if noise not in NOISE_MODES:
            raise UserError(f"noise must be one of {NOISE_MODES}, got {noise!r}")
        self.group = group
        self.noise = noise
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.device = torch.device(device) if device is not None else None

    def __repr__(self) -> str:
        return f"DataParallel(rank={self.rank}, world_size={self.world_size}, noise={self.noise!r})"

    # -- collectives the training loop needs ---------------------------------------
    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank (same starting point)."""
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, src=dist.get_global_rank(self.group, 0) if self.group else 0, group=self.group)

    def all_reduce_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum tensors across ranks in place, one flat bucket per (device, dtype)."""
        buckets: dict[tuple, list[torch.Tensor]] = {}
        for t in tensors:
            buckets.setdefault((t.device, t.dtype), []).append(t)
        for ts in buckets.values():
            flat = torch.cat([t.reshape(-1) for t in ts])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            pos = 0
            for t in ts:
                k = t.numel()
                t.copy_(flat[pos:pos + k].view_as(t))
                pos += k

    def sum_floats(self, *values: float) -> list[float]:
        """Sum Python numbers across ranks (float64 on the collective's device)."""
        dev = self._collective_device()
        buf = torch.tensor([float(v) for v in values], dtype=torch.float64, device=dev)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
        return [float(v) for v in buf.cpu()]

    def _collective_device(self) -> torch.device:
        backend = dist.get_backend(self.group)
        if backend == "nccl":
            return self.device if self.device is not None and self.device.type == "cuda" else \
                torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def optimizer(self, optimizer: torch.optim.Optimizer, engine: Any, noise_multiplier: float,
                  expected_batch_size: float, **kwargs: Any) -> "DistributedDPOptimizer":
        """A `DistributedDPOptimizer` for this group (same arguments as DPOptimizer)."""
        return DistributedDPOptimizer(optimizer, engine, noise_multiplier, expected_batch_size, distributed=self,
                                      **kwargs)


def share_seed(seed: int, rank: int) -> int:
    """Seed of rank `rank`'s noise share: distinct ranks get unrelated streams."""
    return step_key(seed, 1_000_003 + rank) & ((1 << 62) - 1)


class DistributedDPOptimizer(DPOptimizer):
    """DPOptimizer whose step all-reduces the clipped sums and adds the noise once in total.

    `expected_batch_size` is the GLOBAL q*n. In noise="rank0" mode rank 0 draws exactly what
    a single-process DPOptimizer with the same seed draws; in noise="shares" mode rank r
    draws N(0, (sigma C)^2 / w) from `share_seed(seed, r)`.
    """

    def __init__(self, optimizer, engine, noise_multiplier, expected_batch_size, *, distributed: DataParallel,
                 **kwargs: Any):
        if kwargs.get("fault_step_every_physical"):
            raise UserError("fault_step_every_physical is not supported with data-parallel training; "
                            "run that audit in one process")
        super().__init__(optimizer, engine, noise_multiplier, expected_batch_size, **kwargs)
        self.distributed = distributed
        if distributed.noise == "shares" and self.seed is not None:
            self.seed = share_seed(self.seed, distributed.rank)
            self._generators.clear()

    @property
    def noise_share_std(self) -> float:
        """The std of the noise THIS rank adds (the summed noise has std sigma * C_total)."""
        std = 0.0 if self.fault_no_noise else self.noise_std
        d = self.distributed
        if d.noise == "rank0":
            return std if d.rank == 0 else 0.0
        return std / math.sqrt(d.world_size)

    def add_noise(self) -> None:
        """Local noise share, then sum over ranks, then divide by the global E[B]."""
        self._fill_missing_grads()
        self._add_gaussian(self.noise_share_std)
        self.distributed.all_reduce_tensors([p.grad for p in self.params])
        for p in self.params:
            p.grad.div_(self.expected_batch_size)
