"""The one training and evaluation loop every notebook shares, private or not.

`fit` runs Poisson-sampled logical batches, splits each into physical chunks, lets the
clipping engine accumulate clipped per-sample sums, and lets `DPOptimizer.step` add noise once
per logical batch. It keeps the privacy ledger in step with the optimizer (every private
step, empty ones included, is one recorded subsampled-Gaussian step), evaluates on a
schedule, and returns a `TrainResult` with tidy history rows. `privacy=None` runs the same
loop without clipping or noise, for non-private baselines.

Its settings come in five small typed specs (`BatchSpec`, `PrivacySpec`, `ClipSpec`,
`OptimSpec`, `EvalSpec`), validated when they are built. Two extension points keep variants
inside this one loop:

- a `StepPlan` says, for each step, whether it takes a private Poisson batch (drawn by
  `fit` itself, so the sample rate the ledger records is the one used) and which public
  batch, with which weight a, joins it: g = a g_public + (1 - a) g_private_DP
  (`dpbench.training.mixing` builds its schedules this way);
- hooks run between the noise and the optimizer step (`before_update`) and after the step
  (`after_step`, or any plain callable), with a `StepInfo` (adaptive clipping,
  `dpbench.training.adaptive`).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from dpbench.clipping import ClippingEngine
from dpbench.clipping.clipfns import check_clip_fn
from dpbench.clipping.engine import METHODS
from dpbench.clipping.grouping import STYLES
from dpbench.data import StreamedImages
from dpbench.errors import UserError
from dpbench.privacy import accounting
from dpbench.training.distributed import DataParallel
from dpbench.training.losses import per_sample_cross_entropy
from dpbench.training.optimizer import DPOptimizer, LogicalBatching
from dpbench.training.sampling import PoissonSampler, ShuffledSampler, split_physical, steps_for_epochs

HISTORY_KEYS = ("step", "epoch", "train_loss", "test_loss", "test_acc", "epsilon", "wall_time_s")
SAMPLINGS = ("poisson", "shuffle")
OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
_FAULTS = ("fault_no_noise", "fault_step_every_physical", "fault_sample_rate")


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _is_int(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and _finite(x) and int(x) == x


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class BatchSpec:
    """How long to train and how each logical batch is drawn.

    Length: exactly one of `epochs` (steps = round(epochs / q)) and `steps`. Batch size:
    exactly one of `sample_rate` q and `expected_batch_size` (q = B / n). With a `StepPlan`
    the plan sets the length: leave `epochs` and `steps` None.
    `max_physical_batch`: the most examples per forward/backward (memory); None = no split.
    `sampling`: "poisson" (what the accountant assumes) or "shuffle" (fixed-size shuffled
    batches, whole epochs; needs `approximate=True` for private training and marks the
    ledger approximate).
    """

    epochs: float | None = None
    steps: int | None = None
    sample_rate: float | None = None
    expected_batch_size: float | None = None
    max_physical_batch: int | None = None
    sampling: str = "poisson"
    approximate: bool = False

    def __post_init__(self) -> None:
        if self.epochs is not None and self.steps is not None:
            raise UserError("give only one of epochs and steps")
        if self.steps is not None and (not _is_int(self.steps) or self.steps < 0):
            raise UserError(f"steps must be a non-negative integer, got {self.steps!r}")
        if self.epochs is not None and (not _finite(self.epochs) or self.epochs < 0):
            raise UserError(f"epochs must be a finite number >= 0, got {self.epochs!r}")
        if (self.sample_rate is None) == (self.expected_batch_size is None):
            raise UserError("give exactly one of sample_rate (q) and expected_batch_size (q * n)")
        if self.sample_rate is not None and not (_finite(self.sample_rate) and 0.0 < float(self.sample_rate) <= 1.0):
            raise UserError(f"sample_rate must be in (0, 1], got {self.sample_rate!r}")
        if self.expected_batch_size is not None and not (_finite(self.expected_batch_size)
                                                         and float(self.expected_batch_size) > 0):
            raise UserError(f"expected_batch_size must be > 0, got {self.expected_batch_size!r}")
        if self.max_physical_batch is not None and (not _is_int(self.max_physical_batch) or self.max_physical_batch < 1):
            raise UserError(f"max_physical_batch must be a positive integer or None, got {self.max_physical_batch!r}")
        if self.sampling not in SAMPLINGS:
            raise UserError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {self.sampling!r}")

    def rate(self, n: int) -> float:
        """The sample rate q for a data set of n examples."""
        q = float(self.sample_rate) if self.sample_rate is not None else float(self.expected_batch_size) / n
        if not 0.0 < q <= 1.0:
            raise UserError(f"sample rate q = {q:g} must be in (0, 1]; expected_batch_size must be in (0, n={n}]")
        return q

    def num_steps(self, q: float) -> int:
        """The number of Poisson steps: `steps`, or round(epochs / q)."""
        if (self.epochs is None) == (self.steps is None):
            raise UserError("give exactly one of epochs and steps in BatchSpec")
        return int(self.steps) if self.steps is not None else steps_for_epochs(self.epochs, q)


@dataclass(frozen=True)
class PrivacySpec:
    """The privacy side of a run (pass `privacy=None` to `fit` for a non-private baseline).

    Noise: exactly one of `noise_multiplier` sigma and `target_epsilon` (calibrated with
    `dpbench.privacy.accounting.noise_multiplier` for this q, private step count and
    `delta`, by `accountant` "rdp" or "pld"). `gradient_noise_multiplier` (>= sigma) is
    the noise the optimizer adds when a hook releases further statistics of the same batch
    (adaptive clipping), whose combined mechanism has the multiplier sigma the ledger records.
    `secure_rng`: noise from the OS CSPRNG. `track_epsilon`: read epsilon from the ledger at
    every evaluation (False: only the final epsilon). `ledger`: a `PrivacyLedger` to append
    to (None: a new one). `audit` + `faults` (e.g. {"fault_no_noise": True}): deliberate
    privacy bugs, for privacy audits only.
    """

    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    accountant: str = "rdp"
    gradient_noise_multiplier: float | None = None
    secure_rng: bool = False
    track_epsilon: bool = True
    ledger: Any = None
    audit: bool = False
    faults: dict | None = None

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise UserError("private training needs exactly one of noise_multiplier and target_epsilon")
        if self.noise_multiplier is not None and not (_finite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise UserError(f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier!r}")
        if self.target_epsilon is not None and not (_finite(self.target_epsilon) and self.target_epsilon > 0):
            raise UserError(f"target_epsilon must be > 0, got {self.target_epsilon!r}")
        if not (_finite(self.delta) and 0.0 < float(self.delta) < 1.0):
            raise UserError(f"delta must be in (0, 1), got {self.delta!r}")
        if self.accountant not in accounting.ACCOUNTANTS:
            raise UserError(f"unknown accountant {self.accountant!r}; use one of {list(accounting.ACCOUNTANTS)}")
        g = self.gradient_noise_multiplier
        if g is not None and not (_finite(g) and g >= 0):
            raise UserError(f"gradient_noise_multiplier must be a finite number >= 0, got {g!r}")
        if g is not None and self.noise_multiplier is not None and g < self.noise_multiplier:
            raise UserError(f"gradient_noise_multiplier ({g:g}) below the accounted noise_multiplier "
                            f"({self.noise_multiplier:g}) would understate epsilon")
        faults = dict(self.faults or {})
        unknown = sorted(set(faults) - set(_FAULTS))
        if unknown:
            raise UserError(f"unknown fault flags {unknown}; use {list(_FAULTS)}")
        on = sorted(k for k, v in faults.items() if v is not None and v is not False)
        if on and not self.audit:
            raise UserError(f"{', '.join(on)} breaks differential privacy on purpose; pass audit=True only in privacy audits")


@dataclass(frozen=True)
class ClipSpec:
    """Per-sample clipping: the `ClippingEngine` `fit` builds (or `engine`, one you built).

    `max_grad_norm` C, `method` ("auto", "instantiate", "ghost", "mixed", "bk"), `style`
    ("flat", "layer", "groups", "device"), `clip_fn` ("abadi" or "automatic") and `options`
    (further ClippingEngine keywords, e.g. {"gamma": 0.01} or {"placement": ...}). An engine
    built by `fit` is detached again when `fit` returns; a given `engine` is left attached.
    """

    max_grad_norm: float = 1.0
    method: str = "auto"
    style: str = "flat"
    clip_fn: str = "abadi"
    options: dict | None = None
    engine: Any = None

    def __post_init__(self) -> None:
        if not (_finite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise UserError(f"max_grad_norm must be a finite number > 0, got {self.max_grad_norm!r}")
        if self.method not in METHODS:
            raise UserError(f"unknown clipping method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.style not in STYLES:
            raise UserError(f"unknown clipping style {self.style!r}; use one of {', '.join(STYLES)}")
        check_clip_fn(self.clip_fn, float((self.options or {}).get("gamma", 0.01)))
        if self.options is not None and not isinstance(self.options, dict):
            raise UserError("ClipSpec.options must be a dict of ClippingEngine keywords")

    def build(self, model: torch.nn.Module) -> ClippingEngine:
        """A new ClippingEngine on `model` with these settings."""
        return ClippingEngine(model, max_grad_norm=self.max_grad_norm, method=self.method, style=self.style,
                              clip_fn=self.clip_fn, **(self.options or {}))


@dataclass(frozen=True)
class OptimSpec:
    """The optimizer and the per-sample loss.

    `optimizer`: "sgd" | "adam" | "adamw" (with `lr` and `kwargs`, e.g. {"momentum": 0.9}),
    a torch optimizer over the trainable parameters, or a callable params -> optimizer.
    `loss_fn(outputs, targets)` returns one loss per sample (default: cross-entropy).
    """

    optimizer: Any = "sgd"
    lr: float = 0.1
    kwargs: dict | None = None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if not (_finite(self.lr) and self.lr >= 0):
            raise UserError(f"lr must be a finite number >= 0, got {self.lr!r}")
        if isinstance(self.optimizer, str) and self.optimizer.lower() not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.optimizer!r}; use one of {sorted(OPTIMIZERS)} or pass a torch optimizer")
        if self.kwargs is not None and not isinstance(self.kwargs, dict):
            raise UserError("OptimSpec.kwargs must be a dict of optimizer keywords")


@dataclass(frozen=True)
class EvalSpec:
    """When and on what to evaluate.

    `test_data`: evaluated (loss, accuracy) at every evaluation (None: train loss only).
    `every`: "epoch" (about once per epoch of the private data), a positive number of steps,
    or None (never during training). The last step is always evaluated. `at_start`: also
    evaluate before the first step. `batch_size`: evaluation chunk size. `progress`: show a
    progress bar.
    """

    test_data: Any = None
    every: int | str | None = "epoch"
    at_start: bool = False
    batch_size: int = 512
    progress: bool = True

    def __post_init__(self) -> None:
        if self.every is not None and self.every != "epoch" and not (_is_int(self.every) and self.every >= 1):
            raise UserError(f"evaluation every must be 'epoch', a positive number of steps or None, got {self.every!r}")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise UserError(f"evaluation batch_size must be a positive integer, got {self.batch_size!r}")

    def period(self, sample_rate: float, steps: int) -> int:
        """Steps between evaluations (a value past the last step means: only at the end)."""
        if self.every is None:
            return steps + 1
        if self.every == "epoch":
            return max(1, int(round(1.0 / sample_rate)))
        return int(self.every)


def specs_from_flat(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Flat keyword names (a YAML config, a convenience wrapper) -> `fit`'s spec arguments.

    Names: epochs, steps, sample_rate, expected_batch_size, max_physical_batch, sampling,
    approximate (BatchSpec); noise_multiplier, target_epsilon, delta, accountant,
    gradient_noise_multiplier, secure_rng, track_epsilon, ledger, audit, faults
    (PrivacySpec; `private=False` gives privacy=None); max_grad_norm, clip_method,
    clip_style, clip_fn, engine_kwargs, engine (ClipSpec); optimizer, lr, optimizer_kwargs,
    loss_fn (OptimSpec); test_data, eval_every, eval_at_start, eval_batch_size, progress
    (EvalSpec); seed, device, label pass through. Unknown names are a UserError.
    `eval_every=None` keeps the flat keyword's old meaning, about once per epoch; for
    "never" use `EvalSpec(every=None)` directly, or a step count past the end.
    """
    kw = dict(kwargs)
    groups = {
        "batching": {"epochs": "epochs", "steps": "steps", "sample_rate": "sample_rate",
                     "expected_batch_size": "expected_batch_size", "max_physical_batch": "max_physical_batch",
                     "sampling": "sampling", "approximate": "approximate"},
        "privacy": {"noise_multiplier": "noise_multiplier", "target_epsilon": "target_epsilon", "delta": "delta",
                    "accountant": "accountant", "gradient_noise_multiplier": "gradient_noise_multiplier",
                    "secure_rng": "secure_rng", "track_epsilon": "track_epsilon", "ledger": "ledger",
                    "audit": "audit", "faults": "faults"},
        "clipping": {"max_grad_norm": "max_grad_norm", "clip_method": "method", "clip_style": "style",
                     "clip_fn": "clip_fn", "engine_kwargs": "options", "engine": "engine"},
        "optim": {"optimizer": "optimizer", "lr": "lr", "optimizer_kwargs": "kwargs", "loss_fn": "loss_fn"},
        "evaluation": {"test_data": "test_data", "eval_every": "every", "eval_at_start": "at_start",
                       "eval_batch_size": "batch_size", "progress": "progress"},
    }
    classes = {"batching": BatchSpec, "privacy": PrivacySpec, "clipping": ClipSpec, "optim": OptimSpec,
               "evaluation": EvalSpec}
    private = kw.pop("private", True)
    out: dict[str, Any] = {k: kw.pop(k) for k in ("seed", "device", "label") if k in kw}
    fields_of: dict[str, dict[str, Any]] = {g: {} for g in groups}
    for g, names in groups.items():
        for flat, name in names.items():
            if flat in kw:
                fields_of[g][name] = kw.pop(flat)
    if kw:
        raise UserError(f"unknown training settings {sorted(kw)}; see dpbench.training.loop.specs_from_flat")
    if "every" in fields_of["evaluation"] and fields_of["evaluation"]["every"] is None:
        fields_of["evaluation"]["every"] = "epoch"  # the old keyword's None meant "about once per epoch"
    for g, cls in classes.items():
        if g == "privacy" and not private:
            set_ = {k: v for k, v in fields_of[g].items()
                    if v is not None and v is not False and k not in ("delta", "accountant", "track_epsilon")}
            if set_:
                raise UserError(f"non-private training takes no privacy settings, got {sorted(set_)}")
            out[g] = None
        elif g in ("batching", "privacy") or fields_of[g]:
            out[g] = cls(**fields_of[g])
    return out


# --------------------------------------------------------------------------- plans and hooks


@dataclass(frozen=True)
class PlannedStep:
    """One step of a `StepPlan`.

    `private`: take the next private Poisson batch (drawn by `fit`; an empty batch still
    gets its noise and its ledger entry). `public`: an (x, y) batch of public examples, or
    None; its mean gradient (no clipping, no noise, recorded by no engine) joins with weight
    `public_weight` a: g = a g_public + (1 - a) g_private_DP. a must be 0 without a public
    batch and 1 without a private one.
    """

    private: bool = True
    public: tuple[torch.Tensor, torch.Tensor] | None = None
    public_weight: float = 0.0

    def __post_init__(self) -> None:
        a = float(self.public_weight)
        if not 0.0 <= a <= 1.0:
            raise UserError(f"public_weight must be in [0, 1], got {self.public_weight!r}")
        if self.public is None and a != 0.0:
            raise UserError("a step without a public batch must have public_weight 0")
        if not self.private and (self.public is None or a != 1.0):
            raise UserError("a step without a private batch needs a public batch with public_weight 1")
        if self.private and a == 1.0:
            raise UserError("a private step with public_weight 1 would spend budget on a gradient it discards; "
                            "make the step public only (private=False)")


class StepPlan:
    """What `fit` does at each step: private Poisson batch or not, and which public batch.

    Subclasses set `steps` (total) and `private_steps` (steps with private=True; the
    accountant calibrates `target_epsilon` for this count and the ledger records exactly
    these) and implement `iter_steps(model, optimizer)`, a generator of `PlannedStep`s. It is
    advanced lazily, after the previous step (and its evaluation) is done, so it may act on
    the model or the optimizer between steps, e.g. reset optimizer state at a switch.
    `optimizer` is the torch optimizer inside the DP optimizer. `describe()` names the plan
    in the result's config; `weight(t)` is reported in the history rows.
    """

    steps: int = 0
    private_steps: int = 0

    def iter_steps(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[PlannedStep]:
        raise NotImplementedError

    def weight(self, t: int) -> float:
        """The public weight a of step t (0-based)."""
        return 0.0

    def describe(self) -> dict[str, Any]:
        return {"plan": type(self).__name__}


@dataclass
class StepInfo:
    """What a hook sees at one logical step.

    `norms` maps each clipping group to the per-sample norms of the whole private batch
    (concatenated over physical chunks; empty tensors for an empty or absent batch; {} when
    not private). `private`: the step took a private batch (only then do `norms` describe
    private data). In `before_update` the parameters' .grad hold the released (noisy,
    mixed) gradient; after the step, a hook may change `engine` thresholds for the next step.
    `loss` is the batch's mean loss (None for an empty batch).
    """

    step: int
    epoch: float
    batch_size: int
    loss: float | None
    norms: dict[str, torch.Tensor]
    model: torch.nn.Module
    engine: Any
    optimizer: Any
    private: bool = True
    public_weight: float = 0.0


def _hook_parts(hooks: Iterable[Any]) -> tuple[list[Callable], list[Callable]]:
    """(before_update callables, after_step callables): a plain callable runs after the step."""
    before, after = [], []
    for h in hooks:
        b, a = getattr(h, "before_update", None), getattr(h, "after_step", None)
        if b is None and a is None:
            if not callable(h):
                raise UserError(f"hook {h!r} is neither callable nor has before_update/after_step")
            a = h
        if b is not None:
            before.append(b)
        if a is not None:
            after.append(a)
    return before, after


@dataclass
class TrainResult:
    """The outcome of `fit`: history rows, final metrics, and the objects that produced them.

    `steps` counts every step; `private_steps` the ones that took a private batch (equal to
    the optimizer's `steps_taken` and to the ledger's step count); `public_steps` the ones
    with a public batch.
    """

    history: list[dict[str, Any]]
    final: dict[str, Any]
    model: torch.nn.Module
    optimizer: Any
    engine: Any
    ledger: Any
    private: bool
    noise_multiplier: float | None
    sample_rate: float
    steps: int
    delta: float
    approximate: bool = False
    approximate_reason: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    private_steps: int = 0
    public_steps: int = 0

    @property
    def epsilon(self) -> float:
        """Epsilon spent, from the ledger (inf for non-private training)."""
        return self.final["epsilon"]

    def frame(self):
        """The history as a pandas DataFrame (extra plan columns after the standard ones)."""
        import pandas as pd

        extra = [k for k in (self.history[0] if self.history else {}) if k not in HISTORY_KEYS]
        return pd.DataFrame(self.history, columns=list(HISTORY_KEYS) + extra)

    def record(self, recorder, *, method: str = "", seed: int | None = None, **params: Any) -> None:
        """Add the history to a `dpbench.workbench.results.Recorder` as tidy rows (one per metric).

        Plan columns of a row (e.g. the public weight) are added as parameters.
        """
        for row in self.history:
            extra = {k: v for k, v in row.items() if k not in HISTORY_KEYS and k not in params}
            for metric in ("train_loss", "test_loss", "test_acc", "wall_time_s"):
                if row.get(metric) is None:
                    continue
                recorder.add(metric, row[metric], method=method, epsilon=row["epsilon"], delta=self.delta,
                             seed=seed, step=row["step"], epoch=row["epoch"], **extra, **params)


# --------------------------------------------------------------------------- helpers


def as_tensors(data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) from a dpbench data set (.x/.y), a TensorDataset, or an (x, y) pair."""
    if data is None:
        raise UserError("no data given; pass a dpbench data set or an (x, y) pair of tensors")
    if hasattr(data, "x") and hasattr(data, "y"):
        x, y = data.x, data.y
    elif hasattr(data, "tensors") and len(data.tensors) == 2:
        x, y = data.tensors
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
    else:
        raise UserError(f"cannot read training data of type {type(data).__name__}; pass an object with .x and .y or an (x, y) pair")
    # An image folder's x is a StreamedImages view: indexed like a tensor, decoded per batch.
    if not isinstance(x, (torch.Tensor, StreamedImages)) or not isinstance(y, torch.Tensor):
        raise UserError("data must hold tensors; convert arrays with torch.as_tensor")
    if len(x) != len(y):
        raise UserError(f"data has {len(x)} inputs but {len(y)} labels")
    if len(x) == 0:
        raise UserError("the data set is empty")
    return x, y


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The requested device; a missing GPU is an error, never a silent CPU run."""
    dev = torch.device(device or "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} was requested but CUDA is not available; pass device='cpu'")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {device!r} was requested but MPS is not available; pass device='cpu'")
    return dev


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Any, batch_size: int = 512, device: str | torch.device | None = None,
             loss_fn: Callable | None = None) -> tuple[float, float]:
    """Mean loss and accuracy of `model` on `data` (eval mode; training mode restored)."""
    x, y = as_tensors(data)
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    loss_fn = loss_fn or per_sample_cross_entropy
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    try:
        for start in range(0, len(x), batch_size):
            xb = x[start:start + batch_size].to(dev, non_blocking=True)
            yb = y[start:start + batch_size].to(dev, non_blocking=True)
            out = model(xb)
            total_loss += float(loss_fn(out, yb).sum())
            if out.dim() == 2 and yb.dim() == 1:
                correct += int((out.argmax(dim=1) == yb).sum())
    finally:
        model.train(was_training)
    return total_loss / len(x), correct / len(x)


def make_optimizer(name_or_opt: Any, params: Sequence[torch.nn.Parameter], lr: float,
                   **kwargs: Any) -> torch.optim.Optimizer:
    """"sgd" | "adam" | "adamw", a ready torch optimizer, or a callable params -> optimizer."""
    if isinstance(name_or_opt, torch.optim.Optimizer):
        return name_or_opt
    if callable(name_or_opt):
        return name_or_opt(params)
    key = str(name_or_opt).lower()
    if key not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {name_or_opt!r}; use one of {sorted(OPTIMIZERS)} or pass a torch optimizer")
    return OPTIMIZERS[key](params, lr=lr, **kwargs)


def _mark_approximate(ledger: Any, reason: str) -> None:
    """Tell the ledger that its epsilon is approximate (recorded in the manifest)."""
    if hasattr(ledger, "mark_approximate"):
        ledger.mark_approximate(reason)
    else:
        ledger.approximate = True
        ledger.approximate_reason = reason


class _EveryStepPrivate(StepPlan):
    """The default plan: every step takes a private batch (Poisson, or shuffled on request)."""

    def __init__(self, steps: int):
        self.steps = self.private_steps = int(steps)

    def iter_steps(self, model, optimizer):
        step = PlannedStep(private=True)
        for _ in range(self.steps):
            yield step

    def describe(self) -> dict[str, Any]:
        return {}


# --------------------------------------------------------------------------- the loop


def fit(
    model: torch.nn.Module,
    train_data: Any,
    *,
    batching: BatchSpec,
    privacy: PrivacySpec | None,
    clipping: ClipSpec | None = None,
    optim: OptimSpec | None = None,
    evaluation: EvalSpec | None = None,
    plan: StepPlan | None = None,
    hooks: Iterable[Any] = (),
    seed: int = 0,
    device: Any = "cpu",
    label: str = "",
) -> TrainResult:
    """Train `model` on `train_data` with DP-SGD (or, with `privacy=None`, without DP).

    `batching` (`BatchSpec`): length and sample rate q of the private Poisson batches, and
    the physical chunk size. `privacy` (`PrivacySpec`, required; None = non-private): sigma
    or a target epsilon; the ledger (created if None) records every private step, empty
    ones included, and history epsilons are read from it. `clipping` (`ClipSpec`), `optim`
    (`OptimSpec`) and `evaluation` (`EvalSpec`) default to their specs' defaults.

    `plan` (`StepPlan`, e.g. `dpbench.training.mixing.MixingPlan`): per step, a private
    Poisson batch (drawn here) or none, and a public batch with its weight; its gradient is
    computed with the engine paused and combined after the noise. None: a private batch at
    every step. Every private step goes through `DPOptimizer.step`, so the optimizer's
    `steps_taken`, the ledger and the parameters always agree.

    `hooks`: objects with `before_update(info)` (after the noise, before the optimizer step;
    .grad holds the released gradient) and/or `after_step(info)`, or plain callables (run
    after the step), each given a `StepInfo`.

    `device`: "cpu", "cuda:0", a torch.device, or a `dpbench.training.distributed.DataParallel`
    for data-parallel DP under torchrun (this rank's device is its `.device`; each rank
    samples its share of every Poisson batch, clipped sums are all-reduced, the noise is added
    once in total, the ledger records the world size; private runs without plans or hooks
    only). `label` names the run in the progress bar; pass it again to `TrainResult.record`.
    """
    if not isinstance(batching, BatchSpec):
        raise UserError("batching must be a dpbench.training.loop.BatchSpec")
    if privacy is not None and not isinstance(privacy, PrivacySpec):
        raise UserError("privacy must be a dpbench.training.loop.PrivacySpec, or None for non-private training")
    clipping = ClipSpec() if clipping is None else clipping
    optim = OptimSpec() if optim is None else optim
    evaluation = EvalSpec() if evaluation is None else evaluation
    for name, value, cls in (("clipping", clipping, ClipSpec), ("optim", optim, OptimSpec),
                             ("evaluation", evaluation, EvalSpec)):
        if not isinstance(value, cls):
            raise UserError(f"{name} must be a dpbench.training.loop.{cls.__name__} (or None for its defaults)")
    if plan is not None and not isinstance(plan, StepPlan):
        raise UserError("plan must be a dpbench.training.loop.StepPlan (or None)")
    private = privacy is not None
    distributed = device if isinstance(device, DataParallel) else None
    if distributed is not None:
        device = distributed.device if distributed.device is not None else "cpu"
    hooks = list(hooks)
    before_hooks, after_hooks = _hook_parts(hooks)

    x, y = as_tensors(train_data)
    n = len(x)
    dev = resolve_device(device)
    loss_fn = optim.loss_fn or per_sample_cross_entropy
    faults = ({k: v for k, v in (privacy.faults or {}).items() if v is not None and v is not False}
              if private else {})

    # --- batch size and length -----------------------------------------------------
    q = batching.rate(n)
    sampling = batching.sampling
    if plan is not None:
        if batching.epochs is not None or batching.steps is not None:
            raise UserError("with a plan, the plan sets the number of steps; leave BatchSpec epochs and steps None")
        if sampling != "poisson":
            raise UserError("plans draw Poisson batches; use BatchSpec(sampling='poisson') with a plan")
        if not (_is_int(plan.steps) and _is_int(plan.private_steps) and 0 <= plan.private_steps <= plan.steps):
            raise UserError(f"the plan's step counts are inconsistent: {plan.private_steps} private of {plan.steps}")
    else:
        batching.num_steps(q)  # exactly one of epochs and steps

    rank, world_size = (0, 1) if distributed is None else (distributed.rank, distributed.world_size)
    if distributed is not None and (sampling != "poisson" or not private or plan is not None):
        raise UserError("data-parallel training needs privacy, sampling='poisson' and no plan")
    if distributed is not None and hooks:
        # A hook sees only its own rank's per-sample norms: thresholds adapted from them
        # would differ between ranks, and so would the sensitivity the noise assumes.
        raise UserError("per-step hooks (e.g. adaptive clipping) are not supported in data-parallel training; "
                        "run them in a single process")
    if sampling == "poisson":
        steps = plan.steps if plan is not None else batching.num_steps(q)
        private_steps = plan.private_steps if plan is not None else steps
        sampler = PoissonSampler(n, q, private_steps, seed=seed, rank=rank, world_size=world_size)
    else:
        batch = max(1, int(round(q * n)))
        if batching.epochs is None:
            n_epochs = math.ceil(int(batching.steps) / math.ceil(n / batch))
        else:
            if int(batching.epochs) != batching.epochs:
                raise UserError(f"shuffled sampling runs whole epochs; got epochs={batching.epochs!r}")
            n_epochs = int(batching.epochs)
        # Non-private training has no accounting to invalidate, so it needs no flag.
        sampler = ShuffledSampler(n, batch, n_epochs, seed=seed, approximate=batching.approximate or not private)
        q = sampler.sample_rate
        steps = int(batching.steps) if batching.steps is not None else sampler.steps
        private_steps = steps
    plan = plan if plan is not None else _EveryStepPrivate(steps)
    expected = q * n
    max_physical_batch = batching.max_physical_batch
    if max_physical_batch is None:
        max_physical_batch = n  # no split: each logical batch is one chunk
    else:
        LogicalBatching(expected, max_physical_batch)

    # --- privacy parameters --------------------------------------------------------
    noise_multiplier = None
    ledger = None
    ledger_q = q
    if private:
        accounting.check_delta(privacy.delta, n)
        noise_multiplier = privacy.noise_multiplier
        if privacy.target_epsilon is not None:
            noise_multiplier = (accounting.noise_multiplier(privacy.target_epsilon, q, private_steps,
                                                            delta=privacy.delta, accountant=privacy.accountant)
                                if private_steps else 0.0)
        grad_sigma = noise_multiplier if privacy.gradient_noise_multiplier is None else privacy.gradient_noise_multiplier
        if grad_sigma < noise_multiplier:
            raise UserError(f"gradient_noise_multiplier ({grad_sigma:g}) below the accounted noise_multiplier "
                            f"({noise_multiplier:g}) would understate epsilon")
        ledger = privacy.ledger
        if ledger is None:
            ledger = accounting.PrivacyLedger(delta=privacy.delta, n=n, accountant=privacy.accountant,
                                              world_size=world_size)
        elif distributed is not None:
            ledger.world_size = world_size
        if getattr(sampler, "approximate", False):
            _mark_approximate(ledger, sampler.approximate_reason)
        if faults.get("fault_sample_rate") is not None:
            ledger_q = float(faults["fault_sample_rate"])

    # --- model, engine, optimizer --------------------------------------------------
    torch.manual_seed(seed)
    model.to(dev)
    model.train()
    if distributed is not None:
        distributed.broadcast_module(model)  # every rank starts from rank 0's weights
    engine = None
    engine_built_here = False
    if private:
        engine = clipping.engine
        if engine is None:
            engine = clipping.build(model)
            engine_built_here = True
        params = [p[1] if isinstance(p, tuple) else p for p in engine.trainable_parameters()]
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise UserError("the model has no trainable parameters; unfreeze at least one layer")
    try:
        inner = make_optimizer(optim.optimizer, params, optim.lr, **(optim.kwargs or {}))
        if private:
            opt_cls = DPOptimizer if distributed is None else distributed.optimizer
            opt = opt_cls(inner, engine, grad_sigma, expected, secure_rng=privacy.secure_rng,
                          seed=None if privacy.secure_rng else seed + 1, audit=privacy.audit, **faults)
        else:
            opt = inner
    except BaseException:
        if engine_built_here:
            engine.remove()
        raise
    period = evaluation.period(q, steps)
    track_epsilon = private and privacy.track_epsilon
    pause = getattr(engine, "paused", None) if private else None

    # --- the loop ------------------------------------------------------------------
    history: list[dict[str, Any]] = []
    pending = 0  # private steps taken but not yet written to the ledger
    taken = public_taken = 0
    train_time = 0.0
    loss_sum, loss_count = 0.0, 0
    group_names = list(getattr(engine, "thresholds", {}) or {}) if private else []
    with_plan_columns = not isinstance(plan, _EveryStepPrivate)

    def flush_ledger() -> None:
        nonlocal pending
        if private and pending:
            ledger.record_dpsgd(noise_multiplier, ledger_q, steps=pending)
            pending = 0

    def eval_row(step: int) -> dict[str, Any]:
        nonlocal loss_sum, loss_count
        flush_ledger()
        loss_sum = float(loss_sum)  # the one host sync for the train loss, once per evaluation
        if distributed is not None:  # the train loss of the whole logical batches
            loss_sum, loss_count = distributed.sum_floats(loss_sum, loss_count)
        eps = (float(ledger.epsilon()) if track_epsilon else None) if private else math.inf
        row = {"step": step, "epoch": taken * q,
               "train_loss": loss_sum / loss_count if loss_count else None,
               "test_loss": None, "test_acc": None, "epsilon": eps, "wall_time_s": train_time}
        if with_plan_columns:
            row["weight"] = plan.weight(max(step - 1, 0))
            row["private_steps"] = taken
        if evaluation.test_data is not None:
            row["test_loss"], row["test_acc"] = evaluate(model, evaluation.test_data, evaluation.batch_size, dev,
                                                         loss_fn)
        loss_sum, loss_count = 0.0, 0
        history.append(row)
        return row

    def public_gradient(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], float, int]:
        # The mean gradient of a public batch: no clipping, no noise. The engine is paused so
        # that it records nothing, and autograd.grad leaves .grad (the private sums) alone.
        xb, yb = batch[0].to(dev, non_blocking=True), batch[1].to(dev, non_blocking=True)
        with pause() if pause is not None else contextlib.nullcontext():
            losses = loss_fn(model(xb), yb)
            grads = torch.autograd.grad(losses.mean(), params, allow_unused=True)
        grads = tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads))
        return grads, losses.detach().sum(), len(yb)

    if evaluation.at_start:
        eval_row(0)
    bar = tqdm(total=steps, disable=not evaluation.progress, desc=label or ("dp-train" if private else "train"),
               leave=False)
    private_batches = iter(sampler)
    try:
        planned = plan.iter_steps(model, inner)
        for t in range(steps):
            ps = next(planned, None)
            if ps is None:
                raise UserError(f"the plan stopped after {t} of its {steps} steps")
            t0 = time.perf_counter()
            a = float(ps.public_weight)
            g_pub, pub_loss, pub_count = (public_gradient(ps.public) if ps.public is not None else (None, 0.0, 0))
            opt.zero_grad()
            # The loss stays on the device: a float() per physical chunk would stall a GPU.
            batch_loss, batch_size = torch.zeros((), device=dev), 0
            norms: dict[str, list[torch.Tensor]] = {}
            if ps.private:
                batch = next(private_batches, None)
                if batch is None:
                    raise UserError(f"the plan asked for more than its {private_steps} private steps")
                batch_size = len(batch)
                for chunk in split_physical(batch, max_physical_batch):
                    idx = chunk.to(x.device)
                    xb = x[idx].to(dev, non_blocking=True)
                    yb = y[idx].to(dev, non_blocking=True)
                    losses = loss_fn(model(xb), yb)
                    if private:
                        chunk_norms = opt.backward(losses)
                        if hooks and chunk_norms:
                            for k, v in chunk_norms.items():
                                norms.setdefault(k, []).append(v.detach())
                    else:
                        (losses.sum() / len(batch)).backward()
                    batch_loss = batch_loss + losses.detach().sum()
            else:
                batch_loss, batch_size = pub_loss, pub_count
            for k in group_names:
                norms.setdefault(k, [])
            wants_loss = bool(before_hooks or after_hooks) and batch_size
            info = StepInfo(step=t + 1, epoch=(taken + int(ps.private)) * q, batch_size=batch_size,
                            loss=float(batch_loss) / batch_size if wants_loss else None,
                            norms={k: torch.cat(v) if v else torch.empty(0) for k, v in norms.items()},
                            model=model, engine=engine, optimizer=opt, private=ps.private, public_weight=a)

            def before_update() -> None:
                # Runs after the noise: (1 - a) g_private_DP + a g_public is post-processing.
                if g_pub is not None:
                    for p, gp in zip(params, g_pub):
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                        p.grad.mul_(1.0 - a).add_(gp, alpha=a)
                for hook in before_hooks:
                    hook(info)

            if ps.private and private:
                opt.step(before_update=before_update)  # empty batches too: noise, a step, a ledger entry
                pending += 1
            elif ps.private:
                if batch_size or g_pub is not None:
                    before_update()
                    opt.step()
            elif private:
                opt.public_step(g_pub, before_update=lambda: [hook(info) for hook in before_hooks])
            else:
                for p, gp in zip(params, g_pub):
                    p.grad = gp.detach().clone()
                for hook in before_hooks:
                    hook(info)
                opt.step()
            taken += int(ps.private)
            public_taken += int(ps.public is not None)
            if dev.type == "cuda":  # kernels run asynchronously: the clock must wait for them
                torch.cuda.synchronize(dev)
            train_time += time.perf_counter() - t0
            loss_sum += batch_loss
            loss_count += batch_size
            bar.update(1)
            for hook in after_hooks:
                hook(info)
            if (t + 1) % period == 0 or t + 1 == steps:
                row = eval_row(t + 1)
                bar.set_postfix({k: f"{v:.3g}" for k, v in row.items()
                                 if k in ("test_acc", "epsilon") and v is not None and math.isfinite(v)})
        if steps == 0 and not history:
            eval_row(0)
    finally:
        bar.close()
        flush_ledger()  # privacy spent by steps taken counts even if training failed
        if engine_built_here:
            engine.remove()

    if private and isinstance(opt, DPOptimizer) and opt.steps_taken != taken:  # pragma: no cover - a bug guard
        raise RuntimeError(f"optimizer took {opt.steps_taken} private steps but the loop counted {taken}")
    final = dict(history[-1])
    final["steps"] = steps
    final["epsilon"] = float(ledger.epsilon()) if private else math.inf
    approx = private and bool(getattr(sampler, "approximate", False))
    return TrainResult(
        history=history, final=final, model=model, optimizer=opt, engine=engine, ledger=ledger,
        private=private, noise_multiplier=noise_multiplier, sample_rate=q, steps=steps,
        delta=privacy.delta if private else PrivacySpec.delta, approximate=approx,
        approximate_reason=getattr(sampler, "approximate_reason", "") if approx else "",
        private_steps=taken, public_steps=public_taken,
        config={"sampling": sampling, "max_physical_batch": max_physical_batch, "expected_batch_size": expected,
                "max_grad_norm": clipping.max_grad_norm if private else None, "clip_method": clipping.method,
                "clip_style": clipping.style, "clip_fn": clipping.clip_fn, "optimizer": str(optim.optimizer),
                "lr": optim.lr, "seed": seed, "device": str(dev), "accounted_sample_rate": ledger_q,
                "world_size": world_size, "label": label, **plan.describe()},
    )
