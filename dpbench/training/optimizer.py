"""The DP optimizer: Gaussian noise once per logical batch around any torch optimizer.

One logical (Poisson-sampled) batch is processed as one or more physical chunks:

    opt.zero_grad()
    for chunk in split_physical(batch, max_physical_batch):
        opt.backward(per_sample_losses(chunk))   # engine adds sum_i clip(g_i) into .grad
    opt.step()                                   # + N(0, sigma^2 C_total^2), / E[B], inner step

`step()` adds the noise exactly once to every trainable parameter's gradient (a parameter
whose .grad is still None -- e.g. after an empty batch -- starts from zeros), divides by the
expected batch size q*n (not the realised size, which would leak it), steps the wrapped
optimizer and counts the step. An empty logical batch therefore still releases noise and
still counts, so the number of steps always matches the ledger.

Noise sources:
- default: `torch.Generator`s seeded deterministically from `seed` (or a random seed when
  `seed` is None) -- reproducible, NOT cryptographically secure. One per GPU; on the CPU,
  CPU_STREAMS of them, pieces of at most 1 MiB dealt to them evenly, each on its own thread;
- `secure_rng=True`: uniforms from the OS CSPRNG (`os.urandom`), turned into Gaussians by
  Box-Muller in float64 on the CPU, then cast and moved to the parameter's device. The
  randomness cannot be predicted or replayed; like every floating-point Gaussian sampler it
  is not a discrete Gaussian, so the known floating-point attacks on the low-order bits
  (Mironov 2012; Jin et al. 2021) are not ruled out. It is slower (CPU generation).

Fault flags (for the privacy-audit notebook only, refused unless `audit=True`) break the
guarantee on purpose so that an audit can be shown to catch it: `fault_no_noise`,
`fault_sample_rate` (the q stated to the accountant differs from the real one; the
training loop records it in the ledger), `fault_step_every_physical` (after every physical
chunk the inner optimizer also steps on the running, noise-free partial sum, as a loop that
calls step() per chunk but zero_grad() per logical batch would; noise is still added once
per logical batch, so early chunks are released several times and unnoised). The "one layer unclipped" fault lives
in the engine (`ClippingEngine(..., audit=True, unclipped_layer=name)`).
"""

from __future__ import annotations

import math
import secrets
from typing import Any, Callable, Iterable, Sequence

import torch

from dpbench.errors import UserError
from dpbench.privacy.noise import secure_gaussian  # noqa: F401 (re-exported: the optimizer's secure source)
from dpbench.training.threads import thread_map


def _param_list(items: Iterable[Any]) -> list[torch.nn.Parameter]:
    """Parameters from an iterable of tensors or (name, tensor) pairs."""
    out = []
    for item in items:
        out.append(item[1] if isinstance(item, tuple) else item)
    return out


class DPOptimizer:
    """Wraps a torch optimizer: noise N(0, sigma^2 C_total^2) once per logical batch.

    Args:
        optimizer: any `torch.optim.Optimizer` over exactly the engine's trainable parameters.
        engine: a `dpbench.clipping.ClippingEngine` (anything with `backward(losses)`,
            `sensitivity` and `trainable_parameters()`).
        noise_multiplier: sigma >= 0; the noise std is sigma * engine.sensitivity, read at
            every step (adaptive clipping may change the thresholds).
        expected_batch_size: q * n, the divisor of the noisy sum.
        secure_rng: draw noise from the OS CSPRNG (see module docstring).
        seed: seed of the deterministic noise generator (None: a random seed).
        audit: must be True to enable any fault flag.
        fault_no_noise / fault_step_every_physical / fault_sample_rate: deliberate bugs for
            privacy auditing (see module docstring).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        engine: Any,
        noise_multiplier: float,
        expected_batch_size: float,
        *,
        secure_rng: bool = False,
        seed: int | None = None,
        audit: bool = False,
        fault_no_noise: bool = False,
        fault_step_every_physical: bool = False,
        fault_sample_rate: float | None = None,
    ):
        if noise_multiplier is None or not math.isfinite(float(noise_multiplier)) or noise_multiplier < 0:
            raise UserError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
        if expected_batch_size is None or not (float(expected_batch_size) > 0):
            raise UserError(f"expected_batch_size must be > 0 (q * n), got {expected_batch_size!r}")
        faults = {
            "fault_no_noise": bool(fault_no_noise),
            "fault_step_every_physical": bool(fault_step_every_physical),
            "fault_sample_rate": fault_sample_rate is not None,
        }
        on = [k for k, v in faults.items() if v]
        if on and not audit:
            raise UserError(f"{', '.join(on)} breaks differential privacy on purpose; pass audit=True only in privacy audits")
        if fault_sample_rate is not None and not (0.0 < float(fault_sample_rate) <= 1.0):
            raise UserError(f"fault_sample_rate must be in (0, 1], got {fault_sample_rate!r}")
        if secure_rng and seed is not None:
            raise UserError("secure_rng=True draws from the OS and cannot be seeded; drop seed or secure_rng")

        self.optimizer = optimizer
        self.engine = engine
        self.noise_multiplier = float(noise_multiplier)
        self.expected_batch_size = float(expected_batch_size)
        self.secure_rng = bool(secure_rng)
        self.audit = bool(audit)
        self.fault_no_noise = bool(fault_no_noise)
        self.fault_step_every_physical = bool(fault_step_every_physical)
        self.fault_sample_rate = None if fault_sample_rate is None else float(fault_sample_rate)
        self.seed = int(seed) if seed is not None else (None if secure_rng else secrets.randbits(62))
        self.steps_taken = 0
        self.public_steps = 0  # steps on public gradients only (public_step), never noised
        self.physical_steps = 0  # inner-optimizer steps taken by the step-every-physical fault
        self.samples_in_batch = 0
        self._generators: dict[tuple[torch.device, int], torch.Generator] = {}

        self.params = _param_list(engine.trainable_parameters())
        self._check_params()

    # -- validation -------------------------------------------------------------------
    def _check_params(self) -> None:
        opt_params = [p for g in self.optimizer.param_groups for p in g["params"]]
        engine_ids = {id(p) for p in self.params}
        opt_ids = {id(p) for p in opt_params}
        if not self.params:
            raise UserError("the engine has no trainable parameters; unfreeze at least one layer")
        extra = [p for p in opt_params if id(p) not in engine_ids]
        missing = [p for p in self.params if id(p) not in opt_ids]
        if extra or missing:
            raise UserError(
                f"the optimizer's parameters ({len(opt_params)}) differ from the engine's trainable parameters "
                f"({len(self.params)}): {len(extra)} not clipped by the engine, {len(missing)} never stepped; "
                "build the optimizer from engine.trainable_parameters() after freezing layers"
            )

    # -- torch.optim look-alike -------------------------------------------------------
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def state_dict(self) -> dict:
        """Inner optimizer state plus the step counter (noise generator state excluded)."""
        return {"optimizer": self.optimizer.state_dict(), "steps_taken": self.steps_taken}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps_taken = int(state["steps_taken"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Start a logical batch: clear the accumulated clipped sums."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        for p in self.params:  # parameters outside the optimizer cannot exist (checked)
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        self.samples_in_batch = 0

    # -- the DP step ------------------------------------------------------------------
    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise added to the summed gradient: sigma * C_total."""
        return self.noise_multiplier * float(self.engine.sensitivity)

    @property
    def stated_sample_rate_fault(self) -> float | None:
        """The sample rate the accountant is told under the sample-rate fault, else None."""
        return self.fault_sample_rate

    def backward(self, per_sample_losses: torch.Tensor):
        """Accumulate one physical chunk: the engine adds its clipped per-sample sum.

        Returns the engine's per-sample norms. Under `fault_step_every_physical` the inner
        optimizer also steps on the partial (noise-free) sum, which leaks; audit use only.
        """
        norms = self.engine.backward(per_sample_losses)
        self.samples_in_batch += int(per_sample_losses.shape[0])
        if self.fault_step_every_physical:
            self._fill_missing_grads()
            saved = [p.grad.clone() for p in self.params]
            for p in self.params:
                p.grad.div_(self.expected_batch_size)
            self.optimizer.step()
            for p, g in zip(self.params, saved):
                p.grad.copy_(g)
            self.physical_steps += 1
        return norms

    #: independent noise streams on the CPU, each its own generator: the pieces of the noise
    #: are dealt to them by size, in parameter order, and drawn on parallel threads (torch's
    #: CPU generator is serial, about 2.6 ns a draw: 0.38 of a ResNet-18 step on 2 cores).
    #: A constant, so a seed gives the same noise on any number of cores.
    CPU_STREAMS = 2

    def _generator(self, device: torch.device, stream: int = 0) -> torch.Generator:
        key = (device, stream)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            # Different devices and streams get different streams from one seed.
            dev_salt = (0 if device.type == "cpu" else 1 + (device.index or 0)) * 0x9E3779B1
            gen.manual_seed((self.seed + dev_salt + stream * 0x632BE5AB) % (1 << 63))
            self._generators[key] = gen
        return gen

    def _fill_missing_grads(self) -> None:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def add_noise(self) -> None:
        """Add N(0, (sigma C_total)^2) to every trainable gradient and divide by E[B]."""
        self._fill_missing_grads()
        self._add_gaussian(0.0 if self.fault_no_noise else self.noise_std, divisor=self.expected_batch_size)

    def _add_gaussian(self, std: float, divisor: float | None = None) -> None:
        """Add N(0, std^2) to every trainable gradient (nothing when std is 0), then divide it
        by `divisor` if given: piece by piece while the piece is in cache (a separate pass over
        a ResNet-18's gradients after the noise took 8-10 ms on 2 cores)."""
        if std <= 0:
            if divisor is not None:
                for p in self.params:
                    p.grad.div_(divisor)
            return
        pieces: dict[torch.device, list] = {}  # contiguous gradients' pieces, per device
        for p in self.params:
            g = p.grad
            if self.secure_rng:
                g.add_(secure_gaussian(p.shape, dtype=g.dtype, device=g.device), alpha=std)
            elif not g.is_contiguous():
                g.add_(torch.randn(p.shape, generator=self._generator(g.device), dtype=g.dtype, device=g.device),
                       alpha=std)
            else:
                # Drawn in place into a reused scratch piece and added piece by piece: a fresh
                # (numel,) tensor per parameter cost 2-3x more on CPU (page faults of new memory).
                flat = g.view(-1)
                pieces.setdefault(g.device, []).extend(
                    flat[i:i + self.NOISE_CHUNK] for i in range(0, flat.numel(), self.NOISE_CHUNK))
                continue
            if divisor is not None:
                g.div_(divisor)
        for device, todo in pieces.items():
            streams = self.CPU_STREAMS if device.type == "cpu" else 1  # a GPU's generator is parallel
            # each piece to the stream with the fewest elements so far: alternating pieces gave
            # one stream every large weight of a ViT block (its odd pieces are all small)
            dealt, loads = [[] for _ in range(streams)], [0] * streams
            for piece in todo:
                k = loads.index(min(loads))
                dealt[k].append(piece)
                loads[k] += piece.numel()
            jobs = [(k, self._generator(device, k), dealt[k]) for k in range(streams)]
            fill = lambda job: self._add_pieces(*job, std, divisor)  # noqa: E731
            big = sum(t.numel() for t in todo) >= 4 * self.NOISE_CHUNK  # threads cost ~0.2 ms
            thread_map(fill, jobs, min(streams, torch.get_num_threads()) if big else 1)

    def _add_pieces(self, stream: int, gen: torch.Generator, pieces: list, std: float,
                    divisor: float | None) -> None:
        """Add std * N(0, 1) from `gen` to each piece, drawn into the stream's scratch buffer; then divide by `divisor`."""
        bufs = self.__dict__.setdefault("_noise_bufs", {})
        for piece in pieces:
            key = (piece.device, piece.dtype, stream)
            buf = bufs.get(key)
            if buf is None or buf.numel() < piece.numel():
                buf = bufs[key] = torch.empty(piece.numel(), dtype=piece.dtype, device=piece.device)
            piece.add_(buf[:piece.numel()].normal_(generator=gen), alpha=std)
            if divisor is not None:
                piece.div_(divisor)

    #: elements of one piece of noise and of a stream's scratch buffer (1 MiB in float32: it stays in cache)
    NOISE_CHUNK = 1 << 18

    def _check_no_raw_gradients(self) -> None:
        """Refuse gradients written while the engine was paused (see ClippingEngine.paused)."""
        check = getattr(self.engine, "check_no_raw_gradients", None)
        if check is not None:
            check()

    def step(self, closure=None, *, before_update: Callable[[], Any] | None = None) -> None:
        """Finish the logical batch: noise once, divide by E[B], step, count.

        This is the only way a private step is taken: `steps_taken` counts exactly the noisy
        releases. `before_update()` runs after the noise and before the inner optimizer's
        step (post-processing of the released gradient, e.g. mixing in a public gradient).
        """
        if closure is not None:
            raise UserError("DPOptimizer.step takes no closure: compute losses and call opt.backward() per chunk")
        self._check_no_raw_gradients()
        self.add_noise()
        if before_update is not None:
            before_update()
        self.optimizer.step()
        self.steps_taken += 1

    def public_step(self, grads: Sequence[torch.Tensor] | None = None, *,
                    before_update: Callable[[], Any] | None = None) -> None:
        """A step on public gradients only: no private data, no noise, no privacy cost.

        `grads` (one per trainable parameter) replace .grad; None steps on the current .grad
        (e.g. raw gradients of a public batch written while the engine was paused). The
        gradients are consumed: .grad is cleared afterwards. Not counted in `steps_taken`.
        """
        if grads is not None:
            grads = list(grads)
            if len(grads) != len(self.params):
                raise UserError(f"public_step got {len(grads)} gradients for {len(self.params)} trainable parameters")
            for p, g in zip(self.params, grads):
                p.grad = g.detach().clone()
        self._fill_missing_grads()
        if before_update is not None:
            before_update()
        self.optimizer.step()
        self.zero_grad()
        self.public_steps += 1

    def __repr__(self) -> str:
        faults = [n for n in ("fault_no_noise", "fault_step_every_physical") if getattr(self, n)]
        if self.fault_sample_rate is not None:
            faults.append(f"fault_sample_rate={self.fault_sample_rate:g}")
        return (f"DPOptimizer({type(self.optimizer).__name__}, sigma={self.noise_multiplier:g}, "
                f"E[B]={self.expected_batch_size:g}, secure_rng={self.secure_rng}, steps={self.steps_taken}"
                + (f", FAULTS={faults}" if faults else "") + ")")


class LogicalBatching:
    """Checks that physical chunks are no larger than the logical batch they split.

    `LogicalBatching(expected_batch_size, max_physical_batch)` raises UserError when the
    physical batch exceeds the expected logical batch (usually a swapped argument: the
    logical batch is what the accountant sees; the physical one is a memory limit).
    """

    def __init__(self, expected_batch_size: float, max_physical_batch: int):
        if int(max_physical_batch) != max_physical_batch or max_physical_batch < 1:
            raise UserError(f"max_physical_batch must be a positive integer, got {max_physical_batch!r}")
        if not (expected_batch_size > 0):
            raise UserError(f"the expected logical batch size must be > 0, got {expected_batch_size!r}")
        if expected_batch_size < max_physical_batch:
            raise UserError(
                f"logical batch (expected {expected_batch_size:g}) is smaller than the physical batch "
                f"({max_physical_batch}); lower max_physical_batch or raise the logical batch size"
            )
        self.expected_batch_size = float(expected_batch_size)
        self.max_physical_batch = int(max_physical_batch)
