"""Adaptive per-group clipping as a hook over `dpbench.training.loop.fit`.

The thresholds and their private quantile tracking live in `dpbench.clipping.adaptive`
(`AdaptiveClipping`, the update rule, the noise split); this module only wires them into
the one training loop: `fit_adaptive` builds the engine and the tracker, gives the
optimizer the gradient noise sigma_g, lets the ledger record one Poisson-sampled Gaussian
with the accounted sigma per step, and passes the tracker to `fit` as an after-step hook.

    res, adaptive = fit_adaptive(model, data, target_epsilon=3.0, steps=500, sample_rate=0.01,
                                 clip_style="layer", target_quantile=0.5)

is, spelled out with specs,

    engine = ClipSpec(style="layer").build(model)
    adaptive = AdaptiveClipping(engine, sigma, q * n, target_quantile=0.5)
    fit(model, data, batching=BatchSpec(steps=500, sample_rate=0.01),
        privacy=PrivacySpec(noise_multiplier=sigma, gradient_noise_multiplier=adaptive.sigma_g),
        clipping=ClipSpec(engine=engine), hooks=[adaptive])
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Iterable

import torch

from dpbench.clipping.adaptive import AdaptiveClipping
from dpbench.errors import UserError
from dpbench.privacy import accounting
from dpbench.training.loop import BatchSpec, ClipSpec, TrainResult, as_tensors, fit, resolve_device, specs_from_flat

__all__ = ["fit_adaptive"]


def fit_adaptive(model: torch.nn.Module, train_data: Any, *, target_quantile: float = 0.5, threshold_lr: float = 0.2,
                 count_fraction: float = 0.01, renormalize: bool = False, total: float | None = None,
                 clip_style: str = "layer", max_grad_norm: float = 1.0, clip_method: str = "auto",
                 clip_fn: str = "abadi", engine_kwargs: dict | None = None,
                 noise_multiplier: float | None = None, target_epsilon: float | None = None,
                 epochs: float | None = None, steps: int | None = None, sample_rate: float | None = None,
                 expected_batch_size: float | None = None, delta: float = 1e-5, accountant: str = "rdp",
                 seed: int = 0, secure_rng: bool = False, callbacks: Iterable[Callable] = (),
                 **fit_kwargs: Any) -> tuple[TrainResult, AdaptiveClipping]:
    """`fit` with adaptive thresholds; returns (TrainResult, AdaptiveClipping).

    Builds the ClippingEngine (`clip_style`, `max_grad_norm` (initial thresholds
    C/sqrt(K)), `clip_method`, `engine_kwargs`), takes sigma from `noise_multiplier` or
    calibrates it for `target_epsilon` at this q and step count, and trains with the
    gradient noise sigma_g while the ledger records one Poisson-sampled Gaussian with sigma
    per step. `callbacks` run after the tracker at every step. Other keyword arguments are
    `fit` settings by their flat names (`dpbench.training.loop.specs_from_flat`: test_data,
    optimizer, lr, optimizer_kwargs, max_physical_batch, eval_every, eval_batch_size,
    track_epsilon, progress, device, label, ...).
    """
    if clip_fn != "abadi":
        raise UserError(f"adaptive thresholds need clip_fn='abadi', got {clip_fn!r}: automatic clipping has no "
                        "threshold quantile to track; use clip_fn='abadi' or train without adaptation")
    if fit_kwargs.get("private", True) is False:
        raise UserError("adaptive clipping is for private training; call dpbench.training.loop.fit(privacy=None)")
    for key in ("engine", "gradient_noise_multiplier", "private"):
        if key in fit_kwargs:
            raise UserError(f"fit_adaptive sets {key} itself; build AdaptiveClipping and call fit for custom set-ups")
    n = len(as_tensors(train_data)[0])
    batching = BatchSpec(epochs=epochs, steps=steps, sample_rate=sample_rate, expected_batch_size=expected_batch_size)
    q = batching.rate(n)
    steps = batching.num_steps(q)
    if (noise_multiplier is None) == (target_epsilon is None):
        raise UserError("give exactly one of noise_multiplier and target_epsilon")
    if noise_multiplier is None:
        accounting.check_delta(delta, n)
        noise_multiplier = accounting.noise_multiplier(target_epsilon, q, max(steps, 1), delta=delta,
                                                       accountant=accountant)
    specs = specs_from_flat(dict(fit_kwargs, steps=steps, sample_rate=q, noise_multiplier=noise_multiplier,
                                 delta=delta, accountant=accountant, secure_rng=secure_rng, seed=seed))
    device = specs.pop("device", "cpu")
    if device is not None and not hasattr(device, "world_size"):
        model.to(resolve_device(device))
    clipping = ClipSpec(max_grad_norm=max_grad_norm, method=clip_method, style=clip_style, clip_fn=clip_fn,
                        options=engine_kwargs)
    engine = clipping.build(model)
    try:
        adaptive = AdaptiveClipping(engine, noise_multiplier, q * n, target_quantile=target_quantile,
                                    lr=threshold_lr, count_fraction=count_fraction, renormalize=renormalize,
                                    total=total, seed=None if secure_rng else seed + 2, secure_rng=secure_rng)
        specs["privacy"] = replace(specs["privacy"], gradient_noise_multiplier=adaptive.sigma_g)
        specs["clipping"] = replace(clipping, engine=engine)
        result = fit(model, train_data, hooks=[adaptive, *callbacks], device=device, **specs)
    finally:
        engine.remove()
    return result, adaptive
