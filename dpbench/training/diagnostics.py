"""Second-order diagnostics of one training step: why DP noise hurts most early in training.

Bu et al. (2024, arXiv 2402.18752, PAPERS.md A) expand the loss along one step with update
direction g and learning rate lr:

    L(w - lr g) - L(w)  ~  -lr G'E[g] + lr^2 / 2 E[g' H g],

where G is the full gradient and H the Hessian. For a minibatch of B examples whose
(possibly clipped) per-sample gradients have mean Ghat and covariance Sigma, plus Gaussian
noise of std sigma * C on the sum (divided by B),

    E[g' H g] = Ghat' H Ghat + tr(H Sigma) / B + sigma^2 C^2 tr(H) / B^2,

and with the best learning rate lr* = G'Ghat / E[g'Hg] the predicted one-step improvement is

    (G'Ghat)^2 / (2 [Ghat'HGhat + tr(H Sigma)/B + sigma^2 C^2 tr(H)/B^2]).

Without clipping Ghat = G; without noise sigma = 0. This is our best reading of the paper's
analysis (marked (?) in PAPERS.md): the formula is spelled out here so that it can be
checked, and every ingredient is estimated from the model itself:

- G'G and Ghat'HGhat from an exact gradient and a Hessian-vector product (double backward);
- tr(H) by Hutchinson's estimator with Rademacher probes, with its standard error;
- tr(Sigma) and tr(H Sigma) from per-sample gradients (the latter with one HVP per sample).

All quantities refer to the mean loss over the examples passed in (the "diagnostic set").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from dpbench.clipping.clipfns import check_clip_fn, clip_factors
from dpbench.errors import UserError
from dpbench.training.losses import per_sample_cross_entropy

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("the model has no trainable parameters; unfreeze at least one layer")
    return params


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflat(vec: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out, pos = [], 0
    for t in like:
        n = t.numel()
        out.append(vec[pos:pos + n].view_as(t))
        pos += n
    return out


class HessianOperator:
    """Hessian-vector products of the mean loss over a fixed batch, by double backward.

    The gradient graph is built once (`create_graph=True`) and reused for every product,
    so k products cost one forward, one backward and k extra backward passes.
    """

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn | None = None):
        self.params = _trainable(model)
        loss_fn = loss_fn or per_sample_cross_entropy
        losses = loss_fn(model(x), y)
        if losses.dim() != 1:
            raise UserError(f"loss_fn must return per-sample losses of shape (B,), got {tuple(losses.shape)}")
        self.loss = losses.mean()
        self.grads = torch.autograd.grad(self.loss, self.params, create_graph=True)
        self.gradient = _flat([g.detach() for g in self.grads])
        self.dim = self.gradient.numel()

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """H v for a flat vector v (same length as the flattened trainable parameters)."""
        if v.numel() != self.dim:
            raise ValueError(f"vector has {v.numel()} entries, the parameters have {self.dim}")
        vs = _unflat(v.to(self.gradient), self.params)
        hv = torch.autograd.grad(self.grads, self.params, grad_outputs=vs, retain_graph=True, allow_unused=True)
        return _flat([torch.zeros_like(p) if h is None else h for p, h in zip(self.params, hv)]).detach()

    def quadratic(self, v: torch.Tensor) -> float:
        """v' H v."""
        return float(torch.dot(v.to(self.gradient), self.hvp(v)))


def hutchinson_trace(hvp: Callable[[torch.Tensor], torch.Tensor], dim: int, n_probes: int = 32,
                     seed: int = 0, device: torch.device | str = "cpu", dtype=torch.float32) -> tuple[float, float]:
    """Hutchinson's estimate of tr(H) with Rademacher probes z: mean of z'Hz.

    Returns (estimate, standard error of the mean over probes). Unbiased for any symmetric
    H; its variance is 2 * sum_{i != j} H_ij^2 per probe.
    """
    if n_probes < 1:
        raise UserError(f"n_probes must be >= 1, got {n_probes!r}")
    gen = torch.Generator().manual_seed(int(seed))
    vals = []
    for _ in range(int(n_probes)):
        z = (torch.randint(0, 2, (dim,), generator=gen) * 2 - 1).to(device=device, dtype=dtype)
        vals.append(float(torch.dot(z, hvp(z))))
    arr = np.asarray(vals)
    se = float(arr.std(ddof=1) / math.sqrt(len(arr))) if len(arr) > 1 else float("nan")
    return float(arr.mean()), se


def per_sample_gradients(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                         loss_fn: LossFn | None = None, chunk: int = 64) -> torch.Tensor:
    """Per-sample gradients of the trainable parameters, one flat row per example (n x d).

    Uses torch.func (vmap over grad) in chunks; falls back to one backward per example when
    a model is not vmap-compatible. Meant for diagnostic sets of a few hundred examples.
    """
    loss_fn = loss_fn or per_sample_cross_entropy
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b for n, b in model.named_buffers()}
    try:
        from torch.func import functional_call, grad, vmap

        def one(p, xi, yi):
            out = functional_call(model, {**p, **frozen, **buffers}, (xi.unsqueeze(0),))
            return loss_fn(out, yi.unsqueeze(0)).sum()

        per = vmap(grad(one), in_dims=(None, 0, 0))
        rows = []
        for s in range(0, x.shape[0], chunk):
            g = per(params, x[s:s + chunk], y[s:s + chunk])
            rows.append(torch.cat([g[n].reshape(g[n].shape[0], -1) for n in names], dim=1))
        return torch.cat(rows).detach()
    except Exception:  # noqa: BLE001 -- any vmap incompatibility: the slow exact path
        plist = _trainable(model)
        rows = []
        for i in range(x.shape[0]):
            loss = loss_fn(model(x[i:i + 1]), y[i:i + 1]).sum()
            rows.append(_flat(torch.autograd.grad(loss, plist)).detach())
        return torch.stack(rows)


@dataclass
class CurvatureStats:
    """Ingredients of the one-step improvement at one checkpoint (see module docstring).

    `g_dot` is G'Ghat (= G'G without clipping), `ghg` is Ghat'H Ghat, `tr_sigma` and
    `tr_h_sigma` refer to the covariance of the (clipped) per-sample gradients.
    """

    loss: float
    gtg: float
    g_dot: float
    ghg: float
    tr_h: float
    tr_h_se: float
    tr_sigma: float
    tr_h_sigma: float
    clip_fn: str
    max_grad_norm: float
    n_examples: int
    n_probes: int
    n_var_samples: int
    dim: int

    def to_dict(self) -> dict:
        return asdict(self)


def curvature_stats(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                    loss_fn: LossFn | None = None, clip_fn: str | None = None,
                    max_grad_norm: float = 1.0, gamma: float = 0.01, n_probes: int = 32,
                    n_var_samples: int = 32, seed: int = 0) -> CurvatureStats:
    """Estimate G'G, G'Ghat, Ghat'HGhat, tr(H), tr(Sigma), tr(H Sigma) on the examples (x, y).

    H and G are those of the mean loss over (x, y). With `clip_fn`, Ghat and Sigma are the
    mean and covariance of the clipped per-sample gradients (DP training's update
    direction); otherwise of the raw ones. tr(H Sigma) is averaged over `n_var_samples`
    randomly chosen centred per-sample gradients (one HVP each), with the (n-1) correction
    so that it estimates the covariance's trace exactly as tr(Sigma) does. The model is put
    in eval mode for the estimate and restored afterwards. `clip_fn` is None (or "none")
    or a name of `dpbench.clipping.clipfns.CLIP_FNS`.
    """
    unclipped = clip_fn in (None, "none")
    if not unclipped:
        check_clip_fn(clip_fn, gamma)
    was_training = model.training
    model.eval()
    try:
        op = HessianOperator(model, x, y, loss_fn)
        G = op.gradient
        ps = per_sample_gradients(model, x, y, loss_fn)
        n = ps.shape[0]
        if n < 2:
            raise UserError("curvature_stats needs at least 2 examples to estimate a covariance")
        if not unclipped:
            ps = ps * clip_factors(ps.norm(dim=1), max_grad_norm, clip_fn, gamma)[:, None]
        Ghat = G if unclipped else ps.mean(0)
        centred = ps - ps.mean(0)
        corr = n / (n - 1)
        tr_sigma = float(centred.pow(2).sum(1).mean()) * corr
        gen = torch.Generator().manual_seed(int(seed) + 1)
        pick = torch.randperm(n, generator=gen)[: min(int(n_var_samples), n)]
        tr_h_sigma = float(np.mean([op.quadratic(centred[i]) for i in pick.tolist()])) * corr
        tr_h, tr_h_se = hutchinson_trace(op.hvp, op.dim, n_probes, seed=seed, device=G.device, dtype=G.dtype)
        return CurvatureStats(
            loss=float(op.loss.detach()), gtg=float(G @ G), g_dot=float(G @ Ghat), ghg=op.quadratic(Ghat),
            tr_h=tr_h, tr_h_se=tr_h_se, tr_sigma=tr_sigma, tr_h_sigma=tr_h_sigma,
            clip_fn=str(clip_fn or "none"), max_grad_norm=float(max_grad_norm), n_examples=int(n),
            n_probes=int(n_probes), n_var_samples=int(len(pick)), dim=int(op.dim),
        )
    finally:
        model.train(was_training)


def denominator_terms(ghg: float, tr_h_sigma: float, tr_h: float, batch_size, noise_multiplier=0.0,
                      max_grad_norm: float = 1.0) -> dict[str, np.ndarray]:
    """The three terms of E[g'Hg] against B: Ghat'HGhat, tr(H Sigma)/B, sigma^2 C^2 tr(H)/B^2.

    `noise_multiplier` may be a scalar or an array matching `batch_size` (e.g. the sigma
    that reaches a fixed epsilon at each B).
    """
    B = np.asarray(batch_size, dtype=float)
    if np.any(B <= 0):
        raise UserError("batch sizes must be positive")
    sigma = np.broadcast_to(np.asarray(noise_multiplier, dtype=float), B.shape)
    return {
        "signal": np.full(B.shape, float(ghg)),
        "sampling": float(tr_h_sigma) / B,
        "noise": sigma ** 2 * float(max_grad_norm) ** 2 * float(tr_h) / B ** 2,
    }


def predicted_improvement(g_dot: float, ghg: float, tr_h_sigma: float, tr_h: float, batch_size,
                          noise_multiplier=0.0, max_grad_norm: float = 1.0) -> np.ndarray:
    """One-step loss decrease with the optimal learning rate:
    (G'Ghat)^2 / (2 [Ghat'HGhat + tr(H Sigma)/B + sigma^2 C^2 tr(H)/B^2]).

    Where the denominator is not positive (negative curvature along the step) the quadratic
    model has no optimal learning rate and the value is NaN.
    """
    terms = denominator_terms(ghg, tr_h_sigma, tr_h, batch_size, noise_multiplier, max_grad_norm)
    denom = terms["signal"] + terms["sampling"] + terms["noise"]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, float(g_dot) ** 2 / (2.0 * denom), np.nan)


def optimal_learning_rate(g_dot: float, ghg: float, tr_h_sigma: float, tr_h: float, batch_size,
                          noise_multiplier=0.0, max_grad_norm: float = 1.0) -> np.ndarray:
    """lr* = G'Ghat / E[g'Hg] (NaN where E[g'Hg] <= 0)."""
    terms = denominator_terms(ghg, tr_h_sigma, tr_h, batch_size, noise_multiplier, max_grad_norm)
    denom = terms["signal"] + terms["sampling"] + terms["noise"]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, float(g_dot) / denom, np.nan)


def per_sample_improvement(g_dot, ghg, tr_h_sigma, tr_h, batch_size, noise_multiplier=0.0,
                           max_grad_norm: float = 1.0) -> np.ndarray:
    """Predicted improvement divided by B: the loss decrease per example processed."""
    B = np.asarray(batch_size, dtype=float)
    return predicted_improvement(g_dot, ghg, tr_h_sigma, tr_h, B, noise_multiplier, max_grad_norm) / B


def optimal_batch_size(ghg: float, tr_h: float, noise_multiplier: float, max_grad_norm: float = 1.0) -> float:
    """The B maximising the per-sample improvement for a fixed noise multiplier.

    improvement / B = (G'Ghat)^2 / (2 [ghg B + tr(H Sigma) + sigma^2 C^2 tr(H) / B]), so the
    optimum minimises ghg B + sigma^2 C^2 tr(H) / B: B* = sigma C sqrt(tr(H) / ghg),
    independent of tr(H Sigma). Without noise B* -> 0: non-private training gains most per
    example from the smallest batches. Returns NaN when ghg <= 0 or tr(H) < 0.
    """
    if ghg <= 0 or tr_h < 0:
        return float("nan")
    return float(noise_multiplier) * float(max_grad_norm) * math.sqrt(float(tr_h) / float(ghg))


def best_on_grid(values: np.ndarray, grid) -> tuple[float, float]:
    """(argmax, max) of `values` over `grid`, ignoring NaNs (for sigma that varies with B)."""
    v = np.asarray(values, dtype=float)
    if np.all(np.isnan(v)):
        return float("nan"), float("nan")
    i = int(np.nanargmax(v))
    return float(np.asarray(grid)[i]), float(v[i])
