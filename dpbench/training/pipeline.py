"""Per-device (pipeline) clipping: a model split into stages on different ranks.

Stage k lives on rank k. Activations go forward and their gradients go back by plain
point-to-point `send`/`recv`; nothing else crosses a stage boundary. Each stage clips its
own per-sample gradient block with its own threshold C_k (a `ClippingEngine` with
style="device" on the stage's parameters), so no per-sample norm is ever exchanged: the
concatenated per-sample gradient (g_i^1, ..., g_i^K) has norm at most
C_total = sqrt(sum_k C_k^2), and each stage adds N(0, sigma^2 C_total^2) to its OWN
coordinates with its own noise stream. (Noise sigma*C_k per stage would be the mistake: the
sensitivity of the whole release is C_total, and sigma*C_k would cost about sqrt(K) in
epsilon.) The result equals a single process running `ClippingEngine(style="device")` with
the same placement and thresholds.

How stage k > 0 backpropagates without the loss: the gradient G_i that arrives for sample
i's output activation is dL_i/d out_i (samples never mix inside a stage: no BatchNorm), so
the surrogate per-sample loss  l_i = <out_i, G_i>  has exactly sample i's gradient on the
stage's parameters, and the engine clips it like any per-sample loss. The gradient sent
back to stage k-1 is d(sum_i l_i)/d input, computed first with the graph retained (one
extra backward through the stage's layers, no parameter gradients).

All ranks hold the same data indices and labels: every stage draws the same Poisson batch
from `PoissonSampler(n, q, steps, seed)` (world size 1: the batch is not split), so batch
sizes need no exchange and an empty batch is skipped by all stages at once. The
per-sample activation shapes are found once, at construction, by a no-grad forward of one
example through all stages (each rank builds every stage module, then keeps its own), or
passed as `activation_shapes`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm.auto import tqdm

from dpbench.clipping import ClippingEngine
from dpbench.errors import UserError
from dpbench.training.distributed import share_seed
from dpbench.training.loop import make_optimizer
from dpbench.training.losses import per_sample_cross_entropy
from dpbench.training.optimizer import DPOptimizer
from dpbench.training.sampling import PoissonSampler


class P2P:
    """Point-to-point transport between stages; every tensor that crosses is logged.

    `log` holds (op, peer, shape, dtype) for each send/recv, which is how the tests check
    that only activations and their gradients cross a stage boundary.
    """

    def __init__(self, group: Any = None):
        self.group = group
        self.log: list[tuple[str, int, tuple[int, ...], torch.dtype]] = []

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        t = tensor.detach().contiguous()
        self.log.append(("send", dst, tuple(t.shape), t.dtype))
        dist.send(t, dst=dst, group=self.group)

    def recv(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device, src: int) -> torch.Tensor:
        t = torch.empty(tuple(shape), dtype=dtype, device=device)
        dist.recv(t, src=src, group=self.group)
        self.log.append(("recv", src, tuple(t.shape), t.dtype))
        return t


class _StageEngine:
    """The stage's ClippingEngine, but reporting the pipeline's total sensitivity.

    DPOptimizer reads `engine.sensitivity` for the noise std; here it must be C_total, not
    this stage's C_k.
    """

    def __init__(self, engine: Any, thresholds: Sequence[float]):
        self.engine = engine
        self.all_thresholds = [float(c) for c in thresholds]

    @property
    def sensitivity(self) -> float:
        return math.sqrt(sum(c * c for c in self.all_thresholds))

    def backward(self, losses):
        return self.engine.backward(losses)

    def trainable_parameters(self):
        return self.engine.trainable_parameters()

    @property
    def thresholds(self):
        return self.engine.thresholds


def stage_name(k: int) -> str:
    """The clipping group name of stage k (also used by single-process references)."""
    return f"stage{k}"


def stage_placement(stages: Sequence[nn.Module]) -> dict[str, str]:
    """The placement map of `nn.Sequential(*stages)` for ClippingEngine(style="device")."""
    return {f"{k}.{n}": stage_name(k) for k, s in enumerate(stages) for n, p in s.named_parameters()
            if p.requires_grad}


class PipelineDP:
    """One rank's stage of a pipeline-parallel DP-SGD model with per-device clipping.

    Args:
        stages: the K stage modules (every rank builds all of them with the same seed; this
            rank keeps `stages[rank]`). K must equal the group's world size.
        thresholds: C_k per stage (a float: the same for every stage).
        noise_multiplier: sigma; each stage adds N(0, sigma^2 C_total^2) to its coordinates.
        expected_batch_size: q * n (the divisor of the noisy sum).
        example_input: one input batch (any size >= 1) to find the activation shapes, or
            `activation_shapes`: the per-sample output shape of each stage.
        optimizer: "sgd" | "adam" | "adamw" or a callable params -> torch optimizer.
        loss_fn: per-sample loss on the last stage (default cross entropy, reduction none).
        seed: noise seed; stage k draws from a stream derived from (seed, k).
        method, clip_fn, gamma: passed to the stage's ClippingEngine.
        device: this stage's device (default: where the stage's parameters are; a GPU under NCCL).
        transport: a P2P (default: a new one on `group`).
    """

    def __init__(self, stages: Sequence[nn.Module], thresholds: float | Sequence[float], *,
                 noise_multiplier: float, expected_batch_size: float, example_input: torch.Tensor | None = None,
                 activation_shapes: Sequence[Sequence[int]] | None = None, optimizer: Any = "sgd",
                 lr: float = 0.1, loss_fn: Callable | None = None, seed: int = 0, method: str = "auto",
                 clip_fn: str = "abadi", gamma: float = 0.01, device: str | torch.device | None = None,
                 group: Any = None, transport: P2P | None = None, secure_rng: bool = False):
        if not dist.is_available() or not dist.is_initialized():
            raise UserError("torch.distributed is not initialised; call dpbench.training.distributed.init_from_env() first")
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        K = len(stages)
        if K != self.world_size:
            raise UserError(f"{K} stages but {self.world_size} ranks; start one rank per stage (--nproc {K})")
        self.K = K
        th = [float(thresholds)] * K if isinstance(thresholds, (int, float)) else [float(c) for c in thresholds]
        if len(th) != K or not all(c > 0 and math.isfinite(c) for c in th):
            raise UserError(f"thresholds must be {K} positive numbers (one per stage), got {thresholds!r}")
        self.thresholds = th
        if device is None:  # where the stage already lives (cuda:LOCAL_RANK under NCCL)
            first = next(iter(stages[self.rank].parameters()), None)
            device = first.device if first is not None else "cpu"
        self.device = torch.device(device)
        if dist.get_backend(group) == "nccl" and self.device.type != "cuda":
            # NCCL moves CUDA tensors only: CPU activations would fail at the first send.
            raise UserError(f"PipelineDP on the NCCL backend needs its stage on a GPU, got device {self.device}; "
                            f"move the stage to cuda:LOCAL_RANK or pass device='cuda:N'")
        self.loss_fn = loss_fn or per_sample_cross_entropy
        if activation_shapes is None:
            if example_input is None:
                raise UserError("pass example_input (one input batch) or activation_shapes to PipelineDP")
            activation_shapes, self.dtypes = _infer_shapes(stages, example_input)
        else:
            dt = next(stages[self.rank].parameters()).dtype
            self.dtypes = [dt] * K
        if len(activation_shapes) != K:
            raise UserError(f"activation_shapes needs one per-sample output shape per stage ({K})")
        self.out_shapes = [tuple(s) for s in activation_shapes]
        self.module = stages[self.rank].to(self.device)
        self.module.train()
        k = self.rank
        self.engine = ClippingEngine(self.module, max_grad_norm=th[k], method=method, style="device",
                                     placement={"*": stage_name(k)}, thresholds={stage_name(k): th[k]},
                                     clip_fn=clip_fn, gamma=gamma)
        self.stage_engine = _StageEngine(self.engine, th)
        inner = make_optimizer(optimizer, self.engine.trainable_parameters(), lr)
        self.optimizer = DPOptimizer(inner, self.stage_engine, noise_multiplier, expected_batch_size,
                                     secure_rng=secure_rng, seed=None if secure_rng else share_seed(seed, k))
        self.transport = transport or P2P(group)
        self.group = group
        self._loss_sum = 0.0
        self.last_loss: float | None = None

    @property
    def sensitivity(self) -> float:
        """C_total = sqrt(sum_k C_k^2), the sensitivity of the whole model's clipped sum."""
        return self.stage_engine.sensitivity

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.K - 1

    def _peer(self, k: int) -> int:
        return dist.get_global_rank(self.group, k) if self.group is not None else k

    def backward_chunk(self, x: torch.Tensor | None, y: torch.Tensor | None, batch_size: int) -> dict[str, torch.Tensor]:
        """Forward and clipped backward of one physical chunk through the pipeline.

        The first stage needs `x`, the last `y`; every stage needs `batch_size`. Adds this
        stage's clipped sum to its .grad; returns its per-sample norms ({} for B = 0) --
        they stay on this rank.
        """
        B = int(batch_size)
        if B == 0:
            return {}
        k, tr = self.rank, self.transport
        if self.is_first:
            inp = x.to(self.device)
        else:
            inp = tr.recv((B, *self.out_shapes[k - 1]), self.dtypes[k - 1], self.device, self._peer(k - 1))
            inp.requires_grad_(True)
        out = self.module(inp)
        if self.is_last:
            losses = self.loss_fn(out, y.to(self.device))
            self._loss_sum += float(losses.detach().sum())
        else:
            tr.send(out, self._peer(k + 1))
            g_out = tr.recv((B, *self.out_shapes[k]), out.dtype, self.device, self._peer(k + 1))
            losses = (out * g_out).flatten(1).sum(1)  # l_i = <out_i, dL_i/dout_i>
        if not self.is_first:
            (g_in,) = torch.autograd.grad(losses.sum(), inp, retain_graph=True)
        norms = self.optimizer.backward(losses)
        if not self.is_first:
            tr.send(g_in, self._peer(k - 1))
        return norms

    def step(self, x: torch.Tensor | None, y: torch.Tensor | None, batch_size: int,
             max_physical_batch: int | None = None) -> dict[str, torch.Tensor]:
        """One logical batch: chunks through the pipeline, then noise and the optimizer step.

        x (first stage) and y (last stage) are the whole logical batch; other stages pass
        None. Returns this stage's per-sample norms of the logical batch.
        """
        B = int(batch_size)
        self.optimizer.zero_grad()
        self._loss_sum = 0.0
        m = max_physical_batch or max(B, 1)
        norms: list[torch.Tensor] = []
        for start in range(0, B, m):
            b = min(m, B - start)
            xs = x[start:start + b] if x is not None else None
            ys = y[start:start + b] if y is not None else None
            out = self.backward_chunk(xs, ys, b)
            norms.extend(out.values())
        self.optimizer.step()
        self.last_loss = self._loss_sum / B if self.is_last and B else None
        return {stage_name(self.rank): torch.cat(norms) if norms else torch.empty(0)}

    def train(self, x: torch.Tensor, y: torch.Tensor, *, sample_rate: float, steps: int, seed: int = 0,
              max_physical_batch: int | None = None, ledger: Any = None, progress: bool = False) -> list[float]:
        """Poisson-sampled training: every stage draws the same batch indices.

        x and y are the full training inputs and labels (only the first stage reads x, only
        the last reads y). Records every step in `ledger` (one subsampled Gaussian with the
        optimizer's sigma: C_total-calibrated noise on every coordinate). Returns the
        last stage's mean training loss per step (empty list on other stages).
        """
        sampler = PoissonSampler(len(y), sample_rate, steps, seed=seed)
        losses: list[float] = []
        for batch in tqdm(sampler, total=steps, disable=not progress, desc=f"stage{self.rank}", leave=False):
            xb = x[batch] if self.is_first else None
            yb = y[batch] if self.is_last else None
            self.step(xb, yb, len(batch), max_physical_batch)
            if self.last_loss is not None:
                losses.append(self.last_loss)
            if ledger is not None:
                ledger.record_dpsgd(self.optimizer.noise_multiplier, sample_rate, steps=1)
        return losses

    def remove(self) -> None:
        """Detach the stage engine's hooks."""
        self.engine.remove()


@torch.no_grad()
def _infer_shapes(stages: Sequence[nn.Module], example: torch.Tensor):
    """Per-sample output shape and dtype of every stage, from one example."""
    h = example[:1]
    shapes, dtypes = [], []
    for s in stages:
        h = s(h)
        shapes.append(tuple(h.shape[1:]))
        dtypes.append(h.dtype)
    return shapes, dtypes
