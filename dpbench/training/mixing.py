"""Public and private data in one training run: splits, schedules, the switch, a plan over `fit`.

Bu et al. (2024, arXiv 2402.18752; PAPERS.md A) write every way of using a little public
data during DP training as one update direction (their Table 2):

    g_t = a_t * g_public + (1 - a_t) * g_private_DP

with a_t from a schedule (`make_schedule`): only-private (a = 0), only-public (a = 1),
sequential (1 before the switch step s, then 0: their "DP continual pre-training"),
sample-ratio mixing (a = n_pub / (n_pub + n_priv)) and cosine decay of a.

Privacy: only the private part is protected. Public steps (a_t = 1) never touch the private
data and spend no budget; every step with a_t < 1 releases one Poisson-subsampled Gaussian
gradient and is written to the `PrivacyLedger`. The sample rate q is the expected private
batch size over the PRIVATE set's size: public examples are not in the sampled population.
Scaling the private gradient by (1 - a_t) is post-processing.

There is no separate loop: `MixingPlan` turns a schedule into a `dpbench.training.loop.StepPlan`
and `fit_mixed` runs it through `fit`, so every private step is a `DPOptimizer.step` (its step
count, the ledger and the parameters agree) and public gradients are computed with the
clipping engine paused (`ClippingEngine.paused`), on the same model.

At the switch of the sequential schedule the optimizer state can be reset in part
(`reset_optimizer_state`): the paper resets AdamW's first moment m and keeps the second
moment v and the step count t.

The public-phase checkpoint records which examples were public (`save_public_checkpoint`)
and `load_public_checkpoint` refuses a private set that overlaps them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from safetensors import safe_open

from dpbench.data import split_public_private
from dpbench.errors import UserError
from dpbench.models import create_model, load_checkpoint, save_checkpoint
from dpbench.privacy import accounting
from dpbench.training.loop import (BatchSpec, ClipSpec, EvalSpec, OptimSpec, PlannedStep, PrivacySpec, StepPlan,
                                   TrainResult, as_tensors, fit)

SCHEDULES = ("only_private", "only_public", "sequential", "sample_ratio", "cosine")
MODES = ("dp", "non_private", "clip_only", "noise_only")
# Optimizer state entries that each reset letter clears (Adam/AdamW, and SGD's momentum).
RESET_KEYS = {"m": ("exp_avg", "momentum_buffer"), "v": ("exp_avg_sq", "max_exp_avg_sq"), "t": ("step",)}
METADATA_PREFIX = "dpbench_public_"


# --------------------------------------------------------------------------- data


def _origin(ds: Any, n: int) -> torch.Tensor:
    o = getattr(ds, "origin_indices", None)
    return torch.arange(n) if o is None else torch.as_tensor(o, dtype=torch.long)


def _take(ds: Any, idx: torch.Tensor) -> Any:
    """Subset of a dpbench data set (keeps origin indices) or of an (x, y) pair."""
    if hasattr(ds, "subset"):
        return ds.subset(idx)
    x, y = as_tensors(ds)
    return (x[idx], y[idx])


@dataclass
class PublicPrivateData:
    """The public and the private part of the training data, and where they came from.

    `public_indices` / `private_indices` identify the examples in their data sets
    (`origin_indices` of a dpbench data set, else positions); `dataset`/`split` name the
    public examples' data set, `private_dataset`/`private_split` the private ones'.
    """

    public: Any
    private: Any
    public_indices: torch.Tensor
    private_indices: torch.Tensor
    dataset: str
    split: str
    private_dataset: str
    private_split: str

    @property
    def n_public(self) -> int:
        return int(len(self.public_indices))

    @property
    def n_private(self) -> int:
        return int(len(self.private_indices))

    def describe(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "split": self.split, "n_public": self.n_public,
                "private_dataset": self.private_dataset, "private_split": self.private_split,
                "n_private": self.n_private}


def split_dataset(dataset: Any, public_fraction: float | None = None, public_classes: Sequence[int] | None = None,
                  seed: int = 0, split: str = "train", name: str | None = None) -> PublicPrivateData:
    """Split one data set into disjoint public and private parts (by fraction or by classes).

    Uses `dpbench.data.split_public_private` (stratified by class for a fraction). Both
    parts must be non-empty.
    """
    _, y = as_tensors(dataset)
    pub, priv = split_public_private(y, public_fraction=public_fraction, public_classes=public_classes, seed=seed)
    if len(pub) == 0 or len(priv) == 0:
        raise UserError(f"the split leaves {len(pub)} public and {len(priv)} private examples; "
                        "choose a public_fraction strictly between 0 and 1")
    origin = _origin(dataset, len(y))
    nm = name or getattr(dataset, "name", "data")
    return PublicPrivateData(public=_take(dataset, pub), private=_take(dataset, priv),
                             public_indices=origin[pub], private_indices=origin[priv],
                             dataset=nm, split=split, private_dataset=nm, private_split=split)


def separate_datasets(public: Any, private: Any, *, public_split: str = "train", private_split: str = "train",
                      public_name: str | None = None, private_name: str | None = None) -> PublicPrivateData:
    """Public and private data from two different data sets (e.g. CIFAR-100 public, CIFAR-10 private).

    The same data set and split on both sides would make every example both public and
    private: that is refused (use `split_dataset`).
    """
    pn = public_name or getattr(public, "name", "public")
    qn = private_name or getattr(private, "name", "private")
    if (pn, public_split) == (qn, private_split):
        raise UserError(f"public and private data are both {pn!r} ({public_split}); "
                        "split one data set with split_dataset() instead")
    n_pub, n_priv = len(as_tensors(public)[1]), len(as_tensors(private)[1])
    return PublicPrivateData(public=public, private=private, public_indices=_origin(public, n_pub),
                             private_indices=_origin(private, n_priv), dataset=pn, split=public_split,
                             private_dataset=qn, private_split=private_split)


class PublicBatches:
    """Ordinary (non-private) shuffled batches of the public part, endlessly.

    Each epoch is a fresh permutation seeded by (seed, epoch); batches have exactly
    `batch_size` examples (the incomplete tail of an epoch is dropped; a batch larger than
    the public set is the whole set).
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0):
        if n < 1:
            raise UserError("the public part is empty; give a positive public fraction")
        if int(batch_size) != batch_size or batch_size < 1:
            raise UserError(f"public batch size must be a positive integer, got {batch_size!r}")
        self.n, self.batch_size, self.seed = int(n), min(int(batch_size), int(n)), int(seed)

    def __iter__(self) -> Iterator[torch.Tensor]:
        epoch = 0
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g)
            for s in range(0, self.n - self.batch_size + 1, self.batch_size):
                yield perm[s:s + self.batch_size]
            epoch += 1


# --------------------------------------------------------------------------- schedules


@dataclass(frozen=True)
class Schedule:
    """Weight a_t of the public gradient at step t = 0..steps-1 (see module docstring)."""

    name: str
    steps: int
    switch_step: int | None = None
    ratio: float | None = None
    decay_steps: int | None = None

    def weight(self, t: int) -> float:
        if self.name == "only_private":
            return 0.0
        if self.name == "only_public":
            return 1.0
        if self.name == "sequential":
            return 1.0 if t < self.switch_step else 0.0
        if self.name == "sample_ratio":
            return float(self.ratio)
        # cosine: 1 at t = 0, decaying to 0 at decay_steps, 0 afterwards
        if t >= self.decay_steps:
            return 0.0
        return 0.5 * (1.0 + math.cos(math.pi * t / self.decay_steps))

    def weights(self) -> np.ndarray:
        return np.array([self.weight(t) for t in range(self.steps)])

    def is_private(self, t: int) -> bool:
        """True when step t uses (and pays for) a private gradient: a_t < 1."""
        return self.weight(t) < 1.0

    def is_public(self, t: int) -> bool:
        """True when step t uses a public gradient: a_t > 0."""
        return self.weight(t) > 0.0

    @property
    def private_steps(self) -> int:
        return sum(self.is_private(t) for t in range(self.steps))

    @property
    def public_steps(self) -> int:
        return sum(self.is_public(t) for t in range(self.steps))

    def is_switch(self, t: int) -> bool:
        """The step at which the sequential schedule turns private (where state is reset)."""
        return self.name == "sequential" and 0 < self.switch_step < self.steps and t == self.switch_step


def make_schedule(name: str, steps: int, *, switch_step: int | None = None, n_public: int | None = None,
                  n_private: int | None = None, decay_steps: int | None = None) -> Schedule:
    """Build a schedule by name: only_private | only_public | sequential | sample_ratio | cosine.

    sequential needs `switch_step` (0 <= s <= steps); sample_ratio needs `n_public` and
    `n_private`; cosine decays over `decay_steps` (default: `switch_step`, else all steps).
    """
    if name not in SCHEDULES:
        raise UserError(f"unknown schedule {name!r}; use one of {', '.join(SCHEDULES)}")
    if int(steps) != steps or steps < 0:
        raise UserError(f"steps must be a non-negative integer, got {steps!r}")
    steps = int(steps)
    if name == "sequential":
        if switch_step is None or int(switch_step) != switch_step or not (0 <= switch_step <= steps):
            raise UserError(f"the sequential schedule needs 0 <= switch_step <= steps={steps}, got {switch_step!r}")
        return Schedule(name, steps, switch_step=int(switch_step))
    if name == "sample_ratio":
        if not n_public or not n_private or n_public < 0 or n_private < 0:
            raise UserError("sample_ratio mixing needs positive n_public and n_private")
        return Schedule(name, steps, ratio=n_public / (n_public + n_private))
    if name == "cosine":
        d = decay_steps if decay_steps is not None else (switch_step if switch_step else steps)
        if int(d) != d or d < 1:
            raise UserError(f"cosine decay needs decay_steps >= 1, got {d!r}")
        return Schedule(name, steps, switch_step=switch_step, decay_steps=int(d))
    return Schedule(name, steps, switch_step=switch_step)


# --------------------------------------------------------------------------- optimizer state


def _inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under any wrapper that exposes `.optimizer` (e.g. DPOptimizer)."""
    opt = optimizer
    while not isinstance(opt, torch.optim.Optimizer):
        if not hasattr(opt, "optimizer"):
            raise UserError(f"cannot find a torch optimizer inside {type(optimizer).__name__}")
        opt = opt.optimizer
    return opt


def parse_reset(reset: str | Iterable[str] | None) -> tuple[str, ...]:
    """'m', 'v', 't', any combination such as 'mv', a list of letters, or 'none'."""
    if reset is None or reset in ("none", ""):
        return ()
    letters = tuple(reset) if isinstance(reset, str) else tuple(reset)
    bad = [r for r in letters if r not in RESET_KEYS]
    if bad:
        raise UserError(f"reset must combine 'm', 'v' and 't' (or be 'none'), got {reset!r}")
    return tuple(dict.fromkeys(letters))


def reset_optimizer_state(optimizer: Any, reset: str | Iterable[str] | None = "m") -> list[str]:
    """Zero the chosen parts of the optimizer state in place; returns the keys touched.

    m: first moment (Adam's exp_avg, SGD's momentum_buffer); v: second moment (exp_avg_sq,
    and max_exp_avg_sq with amsgrad); t: the step count (bias correction restarts).
    Everything else is kept. A wrapper with `.optimizer` (DPOptimizer) is unwrapped.
    """
    letters = parse_reset(reset)
    opt = _inner_optimizer(optimizer)
    touched: set[str] = set()
    for state in opt.state.values():
        for letter in letters:
            for key in RESET_KEYS[letter]:
                if key not in state:
                    continue
                val = state[key]
                if isinstance(val, torch.Tensor):
                    val.zero_()
                else:
                    state[key] = type(val)(0) if isinstance(val, (int, float)) else val
                touched.add(key)
    return sorted(touched)


# --------------------------------------------------------------------------- training


class _UnclippedSum:
    """Engine stand-in for the 'noisy SGD without clipping' ablation: plain summed gradients.

    Has the engine interface DPOptimizer needs (backward, sensitivity, trainable_parameters);
    noise is scaled by `max_grad_norm` as if it were a clipping threshold. NOT private.
    """

    def __init__(self, model: torch.nn.Module, max_grad_norm: float):
        self.model = model
        self.sensitivity = float(max_grad_norm)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def backward(self, per_sample_losses: torch.Tensor) -> dict:
        per_sample_losses.sum().backward()
        return {}

    def remove(self) -> None:
        pass


class _Unaccounted:
    """Ledger stand-in for the ablation modes, which are not private: epsilon is inf once a
    step has touched the private data (0 before), and nothing is sent to an accountant."""

    def __init__(self, delta: float):
        self.delta = float(delta)
        self.steps = 0
        self.events: list[dict[str, Any]] = []

    def record_dpsgd(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        self.steps += int(steps)

    def epsilon(self) -> float:
        return math.inf if self.steps else 0.0


class MixingPlan(StepPlan):
    """A `Schedule` as a `dpbench.training.loop.StepPlan`: public batches where a_t > 0,
    private Poisson batches (drawn by `fit`) where a_t < 1.

    Public batches come from `PublicBatches(len(public), public_batch_size, seed)`. At the
    sequential schedule's switch, `on_switch(model, optimizer)` is called (the model then
    holds the public-phase weights) and the optimizer state parts in `reset` are zeroed.
    """

    def __init__(self, schedule: Schedule, public: Any = None, *, public_batch_size: int = 64, seed: int = 0,
                 reset: str | Iterable[str] | None = "m",
                 on_switch: Callable[[torch.nn.Module, Any], Any] | None = None):
        self.schedule = schedule
        self.steps = schedule.steps
        self.private_steps = schedule.private_steps
        self.letters = parse_reset(reset)
        self.on_switch = on_switch
        self.public_xy = None
        self.batches = None
        if schedule.public_steps:
            if public is None:
                raise UserError(f"the {schedule.name} schedule takes public steps; pass the public data")
            self.public_xy = as_tensors(public)
            self.batches = PublicBatches(len(self.public_xy[1]), public_batch_size, seed=seed)

    def weight(self, t: int) -> float:
        return self.schedule.weight(t)

    def iter_steps(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[PlannedStep]:
        public = iter(self.batches) if self.batches is not None else None
        for t in range(self.steps):
            if self.schedule.is_switch(t):
                if self.on_switch is not None:  # e.g. save the public-phase checkpoint
                    self.on_switch(model, optimizer)
                if self.letters:
                    reset_optimizer_state(optimizer, self.letters)
            a = self.schedule.weight(t)
            batch = None
            if a > 0.0:
                idx = next(public)
                batch = (self.public_xy[0][idx], self.public_xy[1][idx])
            yield PlannedStep(private=a < 1.0, public=batch, public_weight=a)

    def describe(self) -> dict[str, Any]:
        return {"schedule": self.schedule.name, "reset": "".join(self.letters) or "none",
                "private_steps_planned": self.private_steps, "public_steps_planned": self.schedule.public_steps}


def fit_mixed(
    model: torch.nn.Module,
    data: PublicPrivateData,
    schedule: Schedule,
    *,
    test_data: Any = None,
    private_batch_size: float = 64,
    public_batch_size: int = 64,
    optimizer: Any = "adamw",
    lr: float = 1e-3,
    optimizer_kwargs: dict | None = None,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    delta: float = 1e-5,
    accountant: str = "rdp",
    max_grad_norm: float = 1.0,
    clip_fn: str = "automatic",
    gamma: float = 0.01,
    clip_method: str = "auto",
    mode: str = "dp",
    reset: str | Iterable[str] | None = "m",
    max_physical_batch: int | None = None,
    eval_every: int | None = None,
    eval_at_start: bool = True,
    eval_batch_size: int = 512,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ledger: Any = None,
    seed: int = 0,
    device: str | torch.device | None = "cpu",
    method: str = "",
    on_switch: Callable[[torch.nn.Module, Any], Any] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train on public and private data with g_t = a_t g_public + (1 - a_t) g_private_DP.

    A convenience wrapper: `dpbench.training.loop.fit` with a `MixingPlan(schedule, ...)`.
    Private part: Poisson sampling with q = private_batch_size / n_private (the private
    set's size only), per-sample clipping by a `ClippingEngine` (`clip_fn`, default
    "automatic" with `gamma`, as the paper), Gaussian noise once per logical batch in
    `DPOptimizer.step`, divided by the expected batch size. Public part: mean gradient of an
    ordinary shuffled batch, computed with the engine paused. The inner optimizer (default
    AdamW, i.e. DP-AdamW on the private steps) steps on the combination. At the sequential
    schedule's switch `on_switch(model, optimizer)` is called, then the optimizer state
    parts in `reset` are zeroed.

    Privacy: `noise_multiplier`, or `target_epsilon` calibrated for the schedule's number of
    private steps. Only steps with a_t < 1 enter the ledger; a run without private steps
    has epsilon 0. Evaluates every `eval_every` steps (default: 20 times per run).

    `mode` ablates the private gradient (figure 1 of the paper): "non_private" (plain sum /
    E[B]), "clip_only" (clipped, no noise), "noise_only" (unclipped + the same noise, scaled
    by `max_grad_norm`); those are not private, keep no ledger and report epsilon = inf.
    Returns fit's `TrainResult` (history rows also carry the public weight, the private step
    count and the schedule's name; `method` is the run label).
    """
    if mode not in MODES:
        raise UserError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not isinstance(schedule, Schedule):
        raise UserError("schedule must be a dpbench.training.mixing.Schedule (see make_schedule)")
    n_priv = len(as_tensors(data.private)[1])
    batching = BatchSpec(expected_batch_size=private_batch_size, max_physical_batch=max_physical_batch)
    q = batching.rate(n_priv)  # the private set's size only: public examples are not sampled
    dp = mode == "dp"
    if (noise_multiplier is None) == (target_epsilon is None) and mode in ("dp", "noise_only"):
        raise UserError("give exactly one of noise_multiplier and target_epsilon")
    if mode == "noise_only" and target_epsilon is not None:
        noise_multiplier = (accounting.noise_multiplier(float(target_epsilon), q, schedule.private_steps, delta=delta,
                                                        accountant=accountant) if schedule.private_steps else 0.0)
    if dp:
        privacy = PrivacySpec(noise_multiplier=noise_multiplier, target_epsilon=target_epsilon, delta=delta,
                              accountant=accountant, ledger=ledger, track_epsilon=ledger is not None)
    else:
        sigma = float(noise_multiplier) if mode == "noise_only" else 0.0
        privacy = PrivacySpec(noise_multiplier=sigma, delta=delta, accountant=accountant, track_epsilon=False,
                              ledger=_Unaccounted(delta))
    unclipped = mode in ("non_private", "noise_only")
    clipping = ClipSpec(max_grad_norm=max_grad_norm, method=clip_method, clip_fn=clip_fn, options={"gamma": gamma},
                        engine=_UnclippedSum(model, max_grad_norm) if unclipped else None)
    plan = MixingPlan(schedule, data.public if schedule.public_steps else None, public_batch_size=public_batch_size,
                      seed=seed, reset=reset, on_switch=on_switch)
    result = fit(
        model, data.private,
        batching=batching, privacy=privacy, clipping=clipping,
        optim=OptimSpec(optimizer=optimizer, lr=lr, kwargs=optimizer_kwargs, loss_fn=loss_fn),
        evaluation=EvalSpec(test_data=test_data, every=eval_every or max(1, schedule.steps // 20),
                            at_start=eval_at_start, batch_size=eval_batch_size, progress=progress),
        plan=plan, seed=seed, device=device, label=method or schedule.name)

    if dp and ledger is None:
        # History epsilons for the private step counts reached at each evaluation, in one
        # accountant pass (RDP composes linearly); the final value comes from the ledger.
        curve = accounting.epsilon_curve(result.noise_multiplier, q, [r["private_steps"] for r in result.history],
                                         delta=delta, accountant=accountant)
        for row, e in zip(result.history, curve):
            row["epsilon"] = float(e)
        result.history[-1]["epsilon"] = result.final["epsilon"]
    elif not dp:
        for row in result.history:
            row["epsilon"] = math.inf if row["private_steps"] else 0.0
        result.ledger = None
        result.private = False
    for row in result.history:
        row["schedule"] = schedule.name
    result.config.update({"mode": mode, "private_batch_size": private_batch_size,
                          "public_batch_size": public_batch_size, "gamma": gamma, **data.describe()})
    return result


# --------------------------------------------------------------------------- checkpoints


def _encode_indices(idx: torch.Tensor) -> str:
    return ",".join(str(int(i)) for i in torch.as_tensor(idx).reshape(-1).tolist())


def _decode_indices(text: str) -> torch.Tensor:
    return torch.tensor([int(s) for s in text.split(",") if s], dtype=torch.long)


@dataclass
class PublicCheckpointInfo:
    """What a public-phase checkpoint says about its provenance."""

    path: Path
    dataset: str
    split: str
    public_indices: torch.Tensor
    model: dict[str, Any]
    metadata: dict[str, str]

    def private_complement(self, n: int, origin_indices: torch.Tensor | None = None) -> torch.Tensor:
        """Positions 0..n-1 (or of `origin_indices`) whose examples were NOT public."""
        origin = torch.arange(n) if origin_indices is None else torch.as_tensor(origin_indices, dtype=torch.long)
        return torch.nonzero(~torch.isin(origin, self.public_indices)).reshape(-1)


def save_public_checkpoint(model: torch.nn.Module, path: str | Path, data: PublicPrivateData, *,
                           model_spec: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Save the public-phase model (safetensors) with the public examples in its metadata.

    Metadata (strings): dpbench_public_dataset, _split, _count, _indices (comma-separated
    origin indices), _model (JSON: how to rebuild the model with `dpbench.models.create_model`)
    and _extra (JSON, e.g. steps and lr).
    """
    meta = {
        f"{METADATA_PREFIX}dataset": str(data.dataset),
        f"{METADATA_PREFIX}split": str(data.split),
        f"{METADATA_PREFIX}count": str(data.n_public),
        f"{METADATA_PREFIX}indices": _encode_indices(data.public_indices),
        f"{METADATA_PREFIX}model": json.dumps(model_spec or {}, sort_keys=True),
        f"{METADATA_PREFIX}extra": json.dumps(extra or {}, sort_keys=True, default=str),
    }
    path = Path(path)
    save_checkpoint(model, path, metadata=meta)
    return path


def read_public_metadata(path: str | Path) -> PublicCheckpointInfo:
    """Read the provenance of a public checkpoint without loading its weights."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"public checkpoint {path} does not exist; run the public phase that writes it "
                        "(save_public_checkpoint) first, or pass the right path")
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
    key = f"{METADATA_PREFIX}indices"
    if key not in meta:
        raise UserError(f"{path} does not record its public examples; it was not written by save_public_checkpoint")
    idx = _decode_indices(meta[key])
    if len(idx) != int(meta.get(f"{METADATA_PREFIX}count", len(idx))):
        raise UserError(f"{path}: the recorded public indices are corrupt (count mismatch); re-create the checkpoint")
    return PublicCheckpointInfo(path=path, dataset=meta.get(f"{METADATA_PREFIX}dataset", ""),
                                split=meta.get(f"{METADATA_PREFIX}split", ""), public_indices=idx,
                                model=json.loads(meta.get(f"{METADATA_PREFIX}model", "{}")), metadata=meta)


def check_no_overlap(info: PublicCheckpointInfo, private: Any, dataset: str | None = None,
                     split: str = "train") -> None:
    """Raise UserError if the private examples include any of the checkpoint's public ones.

    `private`: a dpbench data set (its `origin_indices` and `name` are used) or a tensor of
    example indices of `dataset` (default: the checkpoint's data set). A different data set
    or split cannot overlap.
    """
    if private is None:
        raise UserError("pass the private data set (or its example indices) so that the loader can check "
                        "that it does not overlap the checkpoint's public examples")
    if hasattr(private, "y") and not isinstance(private, torch.Tensor):
        idx = _origin(private, len(private.y))
        dataset = dataset or getattr(private, "name", None)
    else:
        idx = torch.as_tensor(private, dtype=torch.long).reshape(-1)
    dataset = dataset or info.dataset
    if dataset != info.dataset or split != info.split:
        return
    clash = idx[torch.isin(idx, info.public_indices)]
    if len(clash):
        raise UserError(
            f"{len(clash)} private examples of {dataset} ({split}) were public in {info.path.name} "
            f"(e.g. index {int(clash[0])}); use the complement of its public indices "
            "(PublicCheckpointInfo.private_complement) as the private set")


def load_public_checkpoint(path: str | Path, private: Any, *, dataset: str | None = None, split: str = "train",
                           model: torch.nn.Module | None = None, skip_head_mismatch: bool = False,
                           **create_kw: Any) -> tuple[torch.nn.Module, PublicCheckpointInfo]:
    """Load a public-phase checkpoint after checking that `private` does not overlap it.

    `private`: the private data set or its example indices (see `check_no_overlap`).
    Without `model`, the model is rebuilt with `dpbench.models.create_model` from the
    recorded spec (keyword overrides in `create_kw`, e.g. num_classes for another task, with
    `skip_head_mismatch=True` to keep the new head). Returns (model, info).
    """
    info = read_public_metadata(path)
    check_no_overlap(info, private, dataset=dataset, split=split)
    if model is None:
        spec = {**info.model, **create_kw}
        if "name" not in spec:
            raise UserError(f"{path} records no model spec; pass model= with the right architecture")
        model = create_model(**spec)
    # A new head (other classes) is left as initialised; everything else must match.
    load_checkpoint(model, info.path, skip_head_mismatch=skip_head_mismatch)
    return model, info
