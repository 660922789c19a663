"""The one training and evaluation loop every notebook shares, private or not.

`fit` runs Poisson-sampled logical batches, splits each into physical chunks, lets the
clipping engine accumulate clipped per-sample sums, and lets `DPOptimizer` add noise once
per logical batch. It keeps the privacy ledger in step with the optimizer (every logical
step, empty ones included, is one recorded subsampled-Gaussian step), evaluates on a
schedule, and returns a `TrainResult` with tidy history rows. `private=False` runs the same
loop without clipping or noise, for non-private baselines.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from dpbench.errors import UserError
from dpbench.training.optimizer import DPOptimizer, LogicalBatching
from dpbench.training.sampling import PoissonSampler, ShuffledSampler, split_physical, steps_for_epochs

HISTORY_KEYS = ("step", "epoch", "train_loss", "test_loss", "test_acc", "epsilon", "wall_time_s")


@dataclass
class StepInfo:
    """What a per-step callback sees, after the optimizer step of one logical batch.

    `norms` maps each clipping group to the per-sample norms of the whole logical batch
    (concatenated over physical chunks; empty tensors for an empty batch; {} when not
    private). A callback may change `engine` thresholds (adaptive clipping) for the next step.
    """

    step: int
    epoch: float
    batch_size: int
    loss: float | None
    norms: dict[str, torch.Tensor]
    model: torch.nn.Module
    engine: Any
    optimizer: Any


@dataclass
class TrainResult:
    """The outcome of `fit`: history rows, final metrics, and the objects that produced them."""

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

    @property
    def epsilon(self) -> float:
        """Epsilon spent, from the ledger (inf for non-private training)."""
        return self.final["epsilon"]

    def frame(self):
        """The history as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.history, columns=list(HISTORY_KEYS))

    def record(self, recorder, *, method: str = "", seed: int | None = None, **params: Any) -> None:
        """Add the history to a `dpbench.workbench.results.Recorder` as tidy rows (one per metric)."""
        for row in self.history:
            for metric in ("train_loss", "test_loss", "test_acc", "wall_time_s"):
                if row.get(metric) is None:
                    continue
                recorder.add(metric, row[metric], method=method, epsilon=row["epsilon"], delta=self.delta,
                             seed=seed, step=row["step"], epoch=row["epoch"], **params)


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
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
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


def _per_sample_ce(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Any, batch_size: int = 512, device: str | torch.device | None = None,
             loss_fn: Callable | None = None) -> tuple[float, float]:
    """Mean loss and accuracy of `model` on `data` (eval mode; training mode restored)."""
    x, y = as_tensors(data)
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    loss_fn = loss_fn or _per_sample_ce
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
    table = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    key = str(name_or_opt).lower()
    if key not in table:
        raise UserError(f"unknown optimizer {name_or_opt!r}; use one of {sorted(table)} or pass a torch optimizer")
    return table[key](params, lr=lr, **kwargs)


def _mark_approximate(ledger: Any, reason: str) -> None:
    """Tell the ledger that its epsilon is approximate (recorded in the manifest)."""
    if hasattr(ledger, "mark_approximate"):
        ledger.mark_approximate(reason)
    else:
        ledger.approximate = True
        ledger.approximate_reason = reason


def fit(
    model: torch.nn.Module,
    train_data: Any,
    *,
    test_data: Any = None,
    epochs: float | None = None,
    steps: int | None = None,
    sample_rate: float | None = None,
    expected_batch_size: float | None = None,
    max_physical_batch: int | None = None,
    optimizer: Any = "sgd",
    lr: float = 0.1,
    optimizer_kwargs: dict | None = None,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    delta: float = 1e-5,
    accountant: str = "rdp",
    max_grad_norm: float = 1.0,
    clip_method: str = "auto",
    clip_style: str = "flat",
    clip_fn: str = "abadi",
    engine_kwargs: dict | None = None,
    engine: Any = None,
    private: bool = True,
    sampling: str = "poisson",
    approximate: bool = False,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    eval_every: int | None = None,
    eval_at_start: bool = False,
    eval_batch_size: int = 512,
    seed: int = 0,
    device: str | torch.device | None = "cpu",
    ledger: Any = None,
    recorder: Any = None,
    method: str = "",
    callbacks: Iterable[Callable[[StepInfo], Any]] = (),
    gradient_noise_multiplier: float | None = None,
    secure_rng: bool = False,
    audit: bool = False,
    faults: dict | None = None,
    track_epsilon: bool = True,
    progress: bool = True,
    distributed: Any = None,
) -> TrainResult:
    """Train `model` on `train_data` with DP-SGD (or, with private=False, without DP).

    Length: `steps`, or `epochs` (steps = round(epochs / q)). Batch: `sample_rate` q, or
    `expected_batch_size` (q = B / n). Each logical batch is Poisson-sampled
    (`sampling="shuffle"` needs `approximate=True` and marks the ledger approximate), cut
    into chunks of at most `max_physical_batch`, and stepped once.

    Privacy: `noise_multiplier`, or `target_epsilon` (calibrated with
    `dpbench.privacy.accounting.noise_multiplier` for this q, step count and delta). The ledger
    (created if None) records every logical step; history epsilons are read from it.
    `gradient_noise_multiplier` (>= noise_multiplier) is the noise the optimizer adds when a
    callback releases further statistics of the same batch, e.g. adaptive clipping, whose
    combined mechanism has the effective multiplier `noise_multiplier` the ledger records.

    Clipping: an `engine` you built, or one built here from `max_grad_norm`, `clip_method`,
    `clip_style`, `clip_fn` and `engine_kwargs` (detached again when fit returns).
    `optimizer`: "sgd" | "adam" | "adamw" (with `lr` and `optimizer_kwargs`), a torch
    optimizer over the trainable parameters, or a callable params -> optimizer.
    `faults` (audit only): DPOptimizer fault flags, e.g. {"fault_no_noise": True}.

    Evaluation every `eval_every` steps (default: about once per epoch) and at the end;
    each evaluation also reads epsilon from the ledger (about a second per RDP evaluation
    on a slow CPU): `track_epsilon=False` leaves it None in the history and computes only
    the final epsilon.
    `distributed`: a `dpbench.training.distributed.DataParallel` for data-parallel DP under torchrun
    (each rank samples its share of every Poisson batch, clipped sums are all-reduced, the
    noise is added once in total, the ledger records the world size; private runs only;
    per-step callbacks are refused).
    `callbacks` are called with a `StepInfo` after every logical step. Returns a
    `TrainResult`; with a `recorder`, its history is also added as tidy rows.
    """
    from tqdm.auto import tqdm

    x, y = as_tensors(train_data)
    n = len(x)
    dev = resolve_device(device)
    loss_fn = loss_fn or _per_sample_ce
    faults = dict(faults or {})

    # --- batch size and length -----------------------------------------------------
    if (sample_rate is None) == (expected_batch_size is None):
        raise UserError("give exactly one of sample_rate (q) and expected_batch_size (q * n)")
    q = float(sample_rate) if sample_rate is not None else float(expected_batch_size) / n
    if not (0.0 < q <= 1.0):
        raise UserError(f"sample rate q = {q:g} must be in (0, 1]; expected_batch_size must be in (0, n={n}]")
    if (epochs is None) == (steps is None):
        raise UserError("give exactly one of epochs and steps")
    if steps is None:
        if sampling == "shuffle":
            steps = None  # set by the shuffled sampler (whole epochs)
        else:
            steps = steps_for_epochs(epochs, q)
    elif int(steps) != steps or steps < 0:
        raise UserError(f"steps must be a non-negative integer, got {steps!r}")

    rank, world_size = (0, 1) if distributed is None else (distributed.rank, distributed.world_size)
    if distributed is not None and (sampling != "poisson" or not private):
        raise UserError("data-parallel training (distributed=) needs private=True and sampling='poisson'")
    if distributed is not None and callbacks:
        # A callback sees only its own rank's per-sample norms: thresholds adapted from them
        # would differ between ranks, and so would the sensitivity the noise assumes.
        raise UserError("per-step callbacks (e.g. adaptive clipping) are not supported with distributed=; "
                        "run them in a single process")
    if sampling == "poisson":
        sampler = PoissonSampler(n, q, int(steps), seed=seed, rank=rank, world_size=world_size)
    elif sampling == "shuffle":
        batch = max(1, int(round(q * n)))
        if epochs is None:
            per_epoch = math.ceil(n / batch)
            n_epochs = math.ceil(int(steps) / per_epoch)
        else:
            if int(epochs) != epochs:
                raise UserError(f"shuffled sampling runs whole epochs; got epochs={epochs!r}")
            n_epochs = int(epochs)
        # Non-private training has no accounting to invalidate, so it needs no flag.
        sampler = ShuffledSampler(n, batch, n_epochs, seed=seed, approximate=approximate or not private)
        q = sampler.sample_rate
        if steps is None:
            steps = sampler.steps
    else:
        raise UserError(f"sampling must be 'poisson' or 'shuffle', got {sampling!r}")
    steps = int(steps)
    expected = q * n
    if max_physical_batch is None:
        max_physical_batch = n  # no split: each logical batch is one chunk
    else:
        LogicalBatching(expected, max_physical_batch)

    # --- privacy parameters --------------------------------------------------------
    engine_built_here = False
    ledger_q = q
    if private:
        from dpbench.privacy import accounting

        accounting.check_delta(delta, n)
        if (noise_multiplier is None) == (target_epsilon is None):
            raise UserError("private training needs exactly one of noise_multiplier and target_epsilon")
        if target_epsilon is not None:
            if target_epsilon <= 0:
                raise UserError(f"target_epsilon must be > 0, got {target_epsilon!r}")
            noise_multiplier = accounting.noise_multiplier(target_epsilon, q, max(steps, 1), delta=delta,
                                                           accountant=accountant)
        if noise_multiplier < 0:
            raise UserError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
        grad_sigma = noise_multiplier if gradient_noise_multiplier is None else gradient_noise_multiplier
        if grad_sigma < noise_multiplier:
            raise UserError(
                f"gradient_noise_multiplier ({grad_sigma:g}) below the accounted noise_multiplier "
                f"({noise_multiplier:g}) would understate epsilon"
            )
        if ledger is None:
            ledger = accounting.PrivacyLedger(delta=delta, n=n, accountant=accountant, world_size=world_size)
        elif distributed is not None:
            ledger.world_size = world_size
        if getattr(sampler, "approximate", False):
            _mark_approximate(ledger, sampler.approximate_reason)
        if faults.get("fault_sample_rate") is not None:
            ledger_q = float(faults["fault_sample_rate"])
    elif faults:
        raise UserError("fault flags apply to private training only")
    if faults and not audit:
        raise UserError(f"{', '.join(sorted(faults))} breaks differential privacy on purpose; pass audit=True only in privacy audits")

    # --- model, engine, optimizer --------------------------------------------------
    torch.manual_seed(seed)
    model.to(dev)
    model.train()
    if distributed is not None:
        distributed.broadcast_module(model)  # every rank starts from rank 0's weights
    if private:
        if engine is None:
            from dpbench.clipping import ClippingEngine

            engine = ClippingEngine(model, max_grad_norm=max_grad_norm, method=clip_method, style=clip_style,
                                    clip_fn=clip_fn, **(engine_kwargs or {}))
            engine_built_here = True
        params = [p[1] if isinstance(p, tuple) else p for p in engine.trainable_parameters()]
        inner = make_optimizer(optimizer, params, lr, **(optimizer_kwargs or {}))
        opt_cls = DPOptimizer if distributed is None else distributed.optimizer
        opt = opt_cls(inner, engine, grad_sigma, expected, secure_rng=secure_rng,
                      seed=None if secure_rng else seed + 1, audit=audit, **faults)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise UserError("the model has no trainable parameters; unfreeze at least one layer")
        opt = make_optimizer(optimizer, params, lr, **(optimizer_kwargs or {}))
    callbacks = list(callbacks)
    if eval_every is None:
        eval_every = max(1, int(round(1.0 / q)))

    # --- the loop ------------------------------------------------------------------
    history: list[dict[str, Any]] = []
    pending = 0  # steps taken but not yet written to the ledger
    train_time = 0.0
    loss_sum, loss_count = 0.0, 0
    group_names = list(getattr(engine, "thresholds", {}) or {}) if private else []

    def flush_ledger() -> None:
        nonlocal pending
        if private and pending:
            ledger.record_dpsgd(noise_multiplier, ledger_q, steps=pending)
            pending = 0

    def eval_row(step: int) -> dict[str, Any]:
        nonlocal loss_sum, loss_count
        flush_ledger()
        if distributed is not None:  # the train loss of the whole logical batches
            loss_sum, loss_count = distributed.sum_floats(loss_sum, loss_count)
        eps = (float(ledger.epsilon()) if track_epsilon else None) if private else math.inf
        row = {"step": step, "epoch": step * q,
               "train_loss": loss_sum / loss_count if loss_count else None,
               "test_loss": None, "test_acc": None, "epsilon": eps, "wall_time_s": train_time}
        if test_data is not None:
            row["test_loss"], row["test_acc"] = evaluate(model, test_data, eval_batch_size, dev, loss_fn)
        loss_sum, loss_count = 0.0, 0
        history.append(row)
        return row

    if eval_at_start:
        eval_row(0)
    bar = tqdm(total=steps, disable=not progress, desc=method or ("dp-train" if private else "train"), leave=False)
    try:
        for t, batch in enumerate(itertools.islice(sampler, steps)):
            t0 = time.perf_counter()
            opt.zero_grad()
            batch_loss = 0.0
            norms: dict[str, list[torch.Tensor]] = {}
            for chunk in split_physical(batch, max_physical_batch):
                idx = chunk.to(x.device)
                xb = x[idx].to(dev, non_blocking=True)
                yb = y[idx].to(dev, non_blocking=True)
                losses = loss_fn(model(xb), yb)
                if private:
                    chunk_norms = opt.backward(losses)
                    if callbacks and chunk_norms:
                        for k, v in chunk_norms.items():
                            norms.setdefault(k, []).append(v.detach())
                else:
                    (losses.sum() / len(batch)).backward()
                batch_loss += float(losses.detach().sum())
            if private:
                opt.step()  # empty batches too: noise, a step, a ledger entry
                pending += 1
            elif len(batch):
                opt.step()
            train_time += time.perf_counter() - t0
            loss_sum += batch_loss
            loss_count += len(batch)
            bar.update(1)
            if callbacks:
                if private:
                    for k in group_names:
                        norms.setdefault(k, [])
                info = StepInfo(
                    step=t + 1, epoch=(t + 1) * q, batch_size=len(batch),
                    loss=batch_loss / len(batch) if len(batch) else None,
                    norms={k: torch.cat(v) if v else torch.empty(0) for k, v in norms.items()},
                    model=model, engine=engine, optimizer=opt)
                for cb in callbacks:
                    cb(info)
            if (t + 1) % eval_every == 0 or t + 1 == steps:
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

    final = dict(history[-1])
    final["steps"] = steps
    final["epsilon"] = float(ledger.epsilon()) if private else math.inf
    approx = private and bool(getattr(sampler, "approximate", False))
    result = TrainResult(
        history=history, final=final, model=model, optimizer=opt, engine=engine, ledger=ledger,
        private=private, noise_multiplier=noise_multiplier if private else None, sample_rate=q,
        steps=steps, delta=delta, approximate=approx,
        approximate_reason=getattr(sampler, "approximate_reason", "") if approx else "",
        config={"sampling": sampling, "max_physical_batch": max_physical_batch, "expected_batch_size": expected,
                "max_grad_norm": max_grad_norm if private else None, "clip_method": clip_method,
                "clip_style": clip_style, "clip_fn": clip_fn, "optimizer": str(optimizer), "lr": lr,
                "seed": seed, "device": str(dev), "accounted_sample_rate": ledger_q, "world_size": world_size},
    )
    if recorder is not None:
        result.record(recorder, method=method, seed=seed)
    return result
