"""DP training of a last layer from fixed features: least squares, Newton, DP-FC, DP-SGD.

Mehta, Thakurta, Kurakin, Cutkosky (2022, arXiv 2205.02973) and Mehta, Krichene, Thakurta,
Kurakin, Cutkosky (2022, arXiv 2211.13403); ../shared/PAPERS.md section E.

Every solver takes a feature matrix X (n x d, float) and labels y (n, long), clips each
feature vector to L2 norm `clip_norm` (C), starts from zero weights, uses one-vs-all
targets (DP-SGD can use softmax instead, see `dp_sgd_logistic`), calibrates its noise to a
target (epsilon, delta) and returns a `LinearResult` holding the weights, the noise
multipliers it used and the accounted epsilon (with a `PrivacyLedger`). `epsilon=None`
switches the noise off: the non-private baseline of the same algorithm.

Privacy model: add/remove one example (x, label). The releases of the closed-form solvers
are Gaussian mechanisms without subsampling, each with a stated L2 sensitivity:

- DP least squares (3 releases, each with noise multiplier s when weights are equal):
  G = sum_i x_i x_i' (sensitivity ||x x'||_F = ||x||^2 <= C^2);
  {A_l}_l with A_l = sum_{i in class l} x_i x_i' -- one example changes exactly one A_l,
  so the joint release of all L matrices has sensitivity C^2, not sqrt(L) C^2;
  {b_l}_l with b_l = sum_{i in class l} x_i -- again one block changes: sensitivity C.
  With replace-one adjacency the label could move between classes and the last two
  sensitivities would be sqrt(2) larger; we use add/remove as everywhere in dpbench.
- DP Newton (2 releases per step, T steps): one example enters every class's Hessian
  (weight p(1-p) <= 1/4) and gradient (weight |p - y| <= 1), so the joint sensitivity is
  sqrt(L) C^2 / 4 for the L Hessians and sqrt(L) C for the L gradients. At the first step
  (W = 0, fixed bias) all L Hessians are the same p0(1-p0) X'X: optionally released once,
  sensitivity p0(1-p0) C^2. Later Hessians may be summed over a Poisson subsample (`hessian_fraction`),
  accounted as unsampled Gaussians (an upper bound; no amplification is claimed).
- DP-FC (1 + T releases): F = sum_i clipFro(x_i x_i', C^2) (sensitivity C^2), then T
  full-batch gradient sums with per-example gradients clipped to `grad_clip`.

Symmetric noise: a full d x d Gaussian matrix Z (iid N(0, scale^2)) is added and the result
symmetrised, which is (Z + Z')/2 added to a symmetric statistic: the Gaussian mechanism on
the d^2-vector (Frobenius sensitivity) followed by post-processing. Diagonal entries get
std `scale`, off-diagonal ones `scale / sqrt(2)`.

Accounting (`conversion`): the releases compose to a Gaussian mechanism with
1/s_eff^2 = sum_j 1/s_j^2 (exact for Gaussians). "pld" and "rdp" account the composition
with dp-accounting through `dpbench.privacy.accounting`; "classic" is the authors' own formula,
eps = min_alpha alpha*beta/2 + log(1/delta)/(alpha - 1) with beta = sum_j 1/s_j^2, i.e.
eps = beta/2 + sqrt(2 beta log(1/delta)). Results carry epsilon under all three.
Calibration therefore searches one number, s_eff, for the target epsilon; the solver's
`PrivacyLedger` then records the actual releases and the tests check that its epsilon equals
the target. Sweeps repeat the same releases for every seed: `dpbench.privacy.accounting`
memoises every epsilon and calibration by its DpEvent, so they are computed once.

Regularisation strengths (`lam`) are absolute, in the units of the unnormalised sums
(n is not treated as public). `lam_noise` adds a data-independent ridge proportional to
the expected spectral norm of the noise on the matrix it regularises (2 sqrt(d) times the
noise std), which costs no privacy.

Precision: the pass over the data runs in `dtype` (float32 by default); the d x d algebra
(noise, PSD projection, solves) in float64. Everything runs on `device` (e.g. "cuda").
"""

from __future__ import annotations

import functools
import math
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from dpbench.errors import UserError
from dpbench.privacy import accounting
from dpbench.training.loop import BatchSpec, ClipSpec, EvalSpec, OptimSpec, PrivacySpec, fit
from dpbench.training.losses import per_sample_cross_entropy
from dpbench.training.threads import thread_map

CONVERSIONS = ("pld", "rdp", "classic")
MAT = torch.float64  # d x d algebra (noise, PSD projection, solves) runs in double precision


# ----------------------------------------------------------------------------- helpers


_VERIFIED: list = []  # [(weakref to a tensor, its version counter, max_norm)] found inside the norm last


def clip_features(x: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale each row of `x` to L2 norm at most `max_norm` (rows already inside are kept).

    The last tensor found already inside is remembered by identity and version counter (which
    every in-place write to it or to any view of its storage bumps), so a solver called many
    times on the same clipped features skips the pass over the data that checks them."""
    if not max_norm > 0:
        raise UserError(f"clip_norm must be > 0, got {max_norm!r}")
    if _VERIFIED:
        ref, version, norm = _VERIFIED[0]
        if ref() is x and x._version == version and norm <= max_norm:
            return x
    norms = x.norm(dim=1, keepdim=True)
    if bool((norms <= max_norm).all()):
        _VERIFIED[:] = [(weakref.ref(x), x._version, float(max_norm))]
        return x  # already inside (e.g. clipped before): no copy of a large feature matrix
    factor = torch.clamp(max_norm / norms.clamp_min(1e-30), max=1.0)
    return x * factor


def symmetric_gaussian_noise(
    d: int,
    scale: float,
    generator: torch.Generator | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
    batch: Sequence[int] = (),
) -> torch.Tensor:
    """Symmetric noise (Z + Z')/2 with Z a d x d matrix of iid N(0, scale^2) entries.

    Adding it to a symmetric statistic S is the Gaussian mechanism on S (Frobenius
    sensitivity) followed by symmetrisation. Diagonal std is `scale`, off-diagonal
    `scale/sqrt(2)`. `batch` prepends dimensions (one matrix per class).
    """
    if generator is not None and device is None:
        device = generator.device
    z = torch.randn(*batch, d, d, generator=generator, device=device, dtype=dtype) * scale
    return (z + z.transpose(-1, -2)) / 2


PSD_FLOAT32_DIM = 128  # from this d on, the PSD projection's eigendecomposition runs in float32


def _batched_eigh(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.linalg.eigh` of a batch of CPU matrices, split across threads (`thread_map`; a
    batch of 10 at d = 512 ran 217 -> 128 ms on 2 cores); each matrix's result is the bits of
    `torch.linalg.eigh` on that matrix alone with one torch thread."""
    parts = min(torch.get_num_threads(), m.shape[0] if m.dim() == 3 else 1)
    if parts < 2 or m.device.type != "cpu":
        return torch.linalg.eigh(m)
    out = thread_map(torch.linalg.eigh, torch.tensor_split(m, parts), parts)
    return torch.cat([v for v, _ in out]), torch.cat([e for _, e in out])


def project_psd(m: torch.Tensor, min_eigenvalue: float = 0.0) -> torch.Tensor:
    """The nearest (Frobenius) symmetric matrix with eigenvalues >= `min_eigenvalue`.

    Symmetrises first, then clamps the eigenvalues; works on batches (..., d, d). For d >=
    `PSD_FLOAT32_DIM` the eigendecomposition runs in float32 (half the time of float64 at
    d = 512, where the regime study makes hundreds) and only the clamped part of the spectrum,
    V (min(lambda, c) - lambda) V', is added to the float64 matrix: that correction has the size
    of the noise, and float32's relative error on it stays far below the noise itself.
    """
    sym = (m + m.transpose(-1, -2)) / 2
    if sym.shape[-1] >= PSD_FLOAT32_DIM and sym.dtype == torch.float64:
        evals, evecs = _batched_eigh(sym.float())
        evals, evecs = evals.double(), evecs.double()
        out = sym + (evecs * (evals.clamp_min(min_eigenvalue) - evals).unsqueeze(-2)) @ evecs.transpose(-1, -2)
        return (out + out.transpose(-1, -2)) / 2
    evals, evecs = torch.linalg.eigh(sym)
    evals = evals.clamp_min(min_eigenvalue)
    out = (evecs * evals.unsqueeze(-2)) @ evecs.transpose(-1, -2)
    return (out + out.transpose(-1, -2)) / 2


def spd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve a x = b for symmetric positive definite a (..., d, d) and b (..., d) by Cholesky
    (the solvers' matrices are PSD plus a ridge); falls back to LU where a is singular. (Batched
    LU solves in float64 also fail with some multi-threaded MKL builds; Cholesky does not.)"""
    chol, info = torch.linalg.cholesky_ex(a)
    if bool((info == 0).all()):
        return torch.cholesky_solve(b.unsqueeze(-1), chol).squeeze(-1)
    return torch.linalg.solve(a, b.unsqueeze(-1)).squeeze(-1)


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    x0: torch.Tensor | None = None,
    tol: float = 1e-10,
    max_iter: int | None = None,
) -> torch.Tensor:
    """Solve A X = B for symmetric positive definite A given by `matvec`, all columns of
    B (d x k) at once (each column keeps its own step sizes). Stops when every residual
    is below `tol` times its right-hand side's norm, or after `max_iter` (default 2 d)."""
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - matvec(x)
    p = r.clone()
    rs = (r * r).sum(0)
    target = (tol * b.norm(dim=0)) ** 2
    for _ in range(max_iter or 2 * b.shape[0]):
        if bool((rs <= target).all()):
            break
        ap = matvec(p)
        denom = (p * ap).sum(0)
        alpha = torch.where(denom > 0, rs / denom.clamp_min(1e-300), torch.zeros_like(rs))
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = (r * r).sum(0)
        beta = torch.where(rs > 0, rs_new / rs.clamp_min(1e-300), torch.zeros_like(rs))
        p = r + beta * p
        rs = rs_new
    return x


def one_hot(y: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """One-vs-all targets: an (n, L) matrix of 0/1."""
    return torch.nn.functional.one_hot(y.long(), num_classes).to(dtype)


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(0 if seed is None else int(seed))
    return g


def _prepare(x, y, num_classes, clip_norm, device, dtype, *, conversion, delta, steps=None):
    """Validate the settings every solver shares (conversion, steps, delta < 1/n) and the
    data, move the data to `device`/`dtype` and clip the features."""
    _check_conversion(conversion)
    if steps is not None and int(steps) < 1:
        raise UserError(f"steps must be >= 1, got {steps!r}")
    x = torch.as_tensor(x)
    y = torch.as_tensor(y)
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise UserError(f"need features (n, d) and labels (n,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise UserError("no training examples")
    num_classes = int(num_classes if num_classes is not None else int(y.max()) + 1)
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise UserError(f"labels must lie in [0, {num_classes}); got range [{int(y.min())}, {int(y.max())}]")
    accounting.check_delta(delta, x.shape[0])
    device = torch.device(device) if device is not None else x.device
    x = clip_features(x.to(device=device, dtype=dtype), clip_norm)
    return x, y.to(device).long(), num_classes, device


def _gaussian(shape, std: float, gen: torch.Generator, device) -> torch.Tensor:
    """Gaussian noise N(0, std^2) of `shape` in the d x d algebra's precision."""
    return torch.randn(shape, generator=gen, device=device, dtype=MAT) * std


def _start_weights(num_classes: int, d: int, bias: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero weights (L, d) and a fixed bias (L,), in the d x d algebra's precision."""
    return (torch.zeros(num_classes, d, dtype=MAT, device=device),
            torch.full((num_classes,), float(bias), dtype=MAT, device=device))


# -------------------------------------------------------------------------- accounting


def composition_epsilon(noise_multipliers: Sequence[float], delta: float, conversion: str = "pld") -> float:
    """Epsilon of composed Gaussian releases (sensitivity 1, noise multipliers s_j), through
    `dpbench.privacy.accounting` (memoised there by the event)."""
    _check_conversion(conversion)
    sig = [float(s) for s in noise_multipliers]
    if not sig:
        return 0.0
    if conversion == "classic":
        return float(accounting.classic_epsilon(sig, delta))
    return float(accounting.gaussian_composition_epsilon(sig, delta, accountant=conversion))


def _check_conversion(conversion: str) -> None:
    if conversion not in CONVERSIONS:
        raise UserError(f"conversion must be one of {CONVERSIONS}, got {conversion!r}")


def _effective_sigma(target_epsilon: float, delta: float, conversion: str) -> float:
    """Noise multiplier of ONE Gaussian release that spends `target_epsilon` exactly.

    Composing Gaussians with 1/s_eff^2 = sum_j 1/s_j^2 is exactly a Gaussian with s_eff, so
    calibrating a set of releases reduces to this one-dimensional search.
    """
    if conversion == "classic":
        return float(accounting.classic_noise_multiplier(target_epsilon, 1, delta))
    return float(accounting.calibrate_common_noise(target_epsilon, 1, delta, accountant=conversion, tol=1e-4))


def calibrate_releases(
    target_epsilon: float, delta: float, weights: Sequence[float], conversion: str = "pld"
) -> list[float]:
    """Noise multipliers s_j for Gaussian releases whose composition spends `target_epsilon`.

    Release j gets the share weights[j]/sum(weights) of beta = 1/s_eff^2 (its 1/s_j^2);
    equal weights give every release the same s = s_eff sqrt(m), as in the authors' code.
    """
    _check_conversion(conversion)
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise UserError(f"epsilon must be a positive finite number, got {target_epsilon!r}")
    if not (0 < delta < 1):
        raise UserError(f"delta must be in (0, 1), got {delta!r}")
    w = [float(v) for v in weights]
    if not w or min(w) <= 0:
        raise UserError("release weights must be positive")
    s_eff = _effective_sigma(float(target_epsilon), float(delta), conversion)
    total = sum(w)
    return [s_eff * math.sqrt(total / wj) for wj in w]


# ----------------------------------------------------------------------------- results


@dataclass
class LinearResult:
    """What every solver returns.

    `weights` is (L, d) and `bias` (L,) -- predictions are x @ weights.T + bias on clipped
    features (use `predict`). `noise_multipliers` maps each release to its multiplier s
    (noise std = s * sensitivity); `epsilon` is the accounted epsilon under `conversion`,
    `epsilons` the same releases under every conversion that applies.
    """

    method: str
    weights: torch.Tensor
    bias: torch.Tensor
    clip_norm: float
    epsilon: float
    delta: float
    conversion: str
    noise_multipliers: dict[str, float] = field(default_factory=dict)
    sensitivities: dict[str, float] = field(default_factory=dict)
    epsilons: dict[str, float] = field(default_factory=dict)
    ledger: Any = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def private(self) -> bool:
        return math.isfinite(self.epsilon)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Scores (n, L) of the features `x`, clipped to the training clip norm first."""
        x = clip_features(torch.as_tensor(x).to(self.weights), self.clip_norm)
        return x @ self.weights.T + self.bias

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Top-1 accuracy on (x, y)."""
        pred = self.predict(x).argmax(1).cpu()
        return float((pred == torch.as_tensor(y).cpu()).float().mean())


def _ledger(delta: float, n: int, conversion: str, releases: list[tuple[float, int]]):
    """A PrivacyLedger holding the Gaussian releases (the classic conversion is reported
    beside it; the ledger itself uses dp-accounting's RDP then)."""
    ledger = accounting.PrivacyLedger(delta=delta, n=n, accountant="pld" if conversion == "pld" else "rdp")
    for sigma, count in releases:
        ledger.record_gaussian(sigma, count=count)
    return ledger


def _finish_private(method, w, b, clip_norm, target_epsilon, delta, conversion, noise, sens, releases, n, info):
    """Account the releases under every conversion and build the result."""
    flat = [s for s, c in releases for _ in range(c)]
    epsilons = {conv: composition_epsilon(flat, delta, conv) for conv in CONVERSIONS}
    # The ledger holds the same releases for the manifest; its epsilon (same accountant)
    # equals epsilons[conversion] -- tests check it -- so the cached value is reported.
    ledger = _ledger(delta, n, conversion, releases)
    eps = epsilons[conversion]
    info = dict(info, target_epsilon=target_epsilon, n=n, releases=len(flat))
    return LinearResult(method, w, b, clip_norm, eps, delta, conversion, noise, sens, epsilons, ledger, info)


def _non_private(method, w, b, clip_norm, delta, conversion, info):
    return LinearResult(method, w, b, clip_norm, math.inf, delta, conversion, {}, {}, {}, None, dict(info))


def noise_ridge(lam_noise: float, d: int, noise_std: float) -> float:
    """Ridge that dominates the noise on a d x d matrix: lam_noise * 2 sqrt(d) * std
    (2 sqrt(d) std is the spectral norm of a large Gaussian Wigner matrix)."""
    return float(lam_noise) * 2.0 * math.sqrt(d) * float(noise_std)


# ------------------------------------------------------------------------ least squares


def class_grams(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-class sums of x x' (L, d, d) and their sum X'X (d, d), in the d x d precision:
    one pass over the data serves both."""
    per_class = torch.stack([x[y == cls].T @ x[y == cls] for cls in range(num_classes)]).to(MAT)
    return per_class, per_class.sum(0)


def least_squares_releases(gram: torch.Tensor, per_class: torch.Tensor, sums: torch.Tensor,
                           sigmas: Sequence[float], clip_norm: float, gen: torch.Generator,
                           device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three noisy releases of `dp_least_squares` from its statistics (G, {A_l}, {b_l}) and
    noise multipliers (s_g, s_a, s_b): G and A_l get symmetric noise of std s C^2 and are
    projected to PSD, b_l gets N(0, (s_b C)^2); drawn from `gen` in that order."""
    s_g, s_a, s_b = sigmas
    d, c2 = gram.shape[0], clip_norm**2
    gram_n = project_psd(gram + symmetric_gaussian_noise(d, s_g * c2, gen, device=device, dtype=MAT))
    per_class_n = project_psd(
        per_class + symmetric_gaussian_noise(d, s_a * c2, gen, device=device, dtype=MAT, batch=(per_class.shape[0],))
    )
    return gram_n, per_class_n, sums + _gaussian(sums.shape, s_b * clip_norm, gen, device)


def dp_least_squares(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int | None = None,
    *,
    epsilon: float | None,
    delta: float = 1e-5,
    clip_norm: float = 1.0,
    alpha: float = 2.0,
    lam: float = 3e-4,
    lam_noise: float = 0.0,
    conversion: str = "pld",
    weights: Sequence[float] = (1.0, 1.0, 1.0),
    seed: int | None = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> LinearResult:
    """DP least squares by sufficient-statistics perturbation (one-vs-all, per class).

    theta_l = (A_l + alpha G + lam I)^-1 b_l minimises, per class l,
    sum_{i in l} (theta'x_i - 1)^2 + alpha sum_i (theta'x_i)^2 + lam ||theta||^2:
    positives pulled to 1, all examples (weight alpha) to 0. Noisy G and A_l are
    symmetrised and projected to PSD. `weights` split the budget between the releases
    (G, {A_l}, {b_l}); equal weights = one noise multiplier s for all three, as in the paper.
    `epsilon=None` gives the exact non-private solution.
    """
    x, y, num_classes, device = _prepare(x, y, num_classes, clip_norm, device, dtype, conversion=conversion,
                                         delta=delta)
    n, d = x.shape
    yy = one_hot(y, num_classes, dtype)
    per_class, gram = class_grams(x, y, num_classes)
    sums = (yy.T @ x).to(MAT)  # (L, d)
    info = dict(alpha=alpha, lam=lam, lam_noise=lam_noise, d=d, num_classes=num_classes)
    c2 = clip_norm**2
    if epsilon is None:
        ridge = lam
        a = per_class + alpha * gram + ridge * torch.eye(d, dtype=MAT, device=device)
        theta = spd_solve(a, sums)
        return _non_private("least_squares", theta, torch.zeros(num_classes, dtype=MAT, device=device),
                            clip_norm, delta, conversion, info)
    if len(weights) != 3:
        raise UserError("dp_least_squares takes 3 release weights (G, A_l, b_l)")
    s_g, s_a, s_b = calibrate_releases(epsilon, delta, weights, conversion)
    gram_n, per_class_n, sums_n = least_squares_releases(gram, per_class, sums, (s_g, s_a, s_b), clip_norm,
                                                         _generator(seed, device), device)
    # The ridge sees the noise of A_l plus alpha times that of G (their spectra add at most).
    ridge = lam + noise_ridge(lam_noise, d, s_a * c2 + alpha * s_g * c2)
    a = per_class_n + alpha * gram_n + ridge * torch.eye(d, dtype=MAT, device=device)
    theta = spd_solve(a, sums_n)
    info["ridge"] = ridge
    return _finish_private(
        "least_squares", theta, torch.zeros(num_classes, dtype=MAT, device=device), clip_norm, epsilon, delta,
        conversion, {"gram": s_g, "class_gram": s_a, "class_sum": s_b},
        {"gram": c2, "class_gram": c2, "class_sum": clip_norm}, [(s_g, 1), (s_a, 1), (s_b, 1)], n, info,
    )


# ------------------------------------------------------------------------------ Newton


def _ova_stats(x, w, bias, yy):
    """Probabilities, residuals (p - y) and Hessian weights p(1-p) of the one-vs-all loss."""
    p = torch.sigmoid(x @ w.T + bias)
    return p, p - yy, p * (1 - p)


def class_hessians(x: torch.Tensor, curv: torch.Tensor) -> torch.Tensor:
    """The L per-class Hessians sum_i curv_il x_i x_i' (L, d, d) in the d x d precision."""
    return torch.stack([(x * curv[:, cls : cls + 1]).T @ x for cls in range(curv.shape[1])]).to(MAT)


def dp_newton(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int | None = None,
    *,
    epsilon: float | None,
    delta: float = 1e-5,
    clip_norm: float = 1.0,
    steps: int = 5,
    lr: float = 1.0,
    lam: float = 1.0,
    lam_noise: float = 0.0,
    bias: float = 0.0,
    hessian_fraction: float = 1.0,
    shared_first_hessian: bool = False,
    gram: torch.Tensor | None = None,
    conversion: str = "pld",
    seed: int | None = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> LinearResult:
    """DP Newton on the one-vs-all logistic loss sum_i sum_l BCE(w_l'x_i + bias, y_il) +
    lam/2 ||W||^2, with a fixed bias; w_l <- w_l - lr (H_l + ridge I)^-1 (g_l + lam w_l).

    Releases (one noise multiplier s for all 2T, as the authors):
    - step 1 (W = 0): every example has the Hessian weight p0(1-p0), p0 = sigmoid(bias), in
      every class, so the L class Hessians all equal p0(1-p0) X'X (computed from `gram` = X'X
      of the clipped features when given). Released as the authors do, L noisy copies (joint
      sensitivity sqrt(L) C^2/4), or with `shared_first_hessian` once (sensitivity
      p0(1-p0) C^2: less noise for the same budget, and one PSD projection instead of L);
    - steps 2..T: the L per-class Hessians sum_i p(1-p) x x' (joint sensitivity sqrt(L) C^2/4),
      summed over a Poisson subsample of rate `hessian_fraction` (q; 1 = every example) and
      divided by q (to save compute: n d^2 L multiply-adds per full step). Accounted as an
      unsampled Gaussian, an upper bound on the subsampled one (we do not claim the
      amplification: at the regime study's epsilons it lowers s by at most ~13% and its PLD
      calibration takes minutes), so the noise on the estimate is s sqrt(L) C^2 / (4 q);
    - every step: the L gradients sum_i (p - y) x (joint sensitivity sqrt(L) C).
    Noisy Hessians are symmetric-noised and projected to PSD; the ridge adds `lam_noise` times
    the spectral norm of the noise on the Hessian estimate of that step. `epsilon=None`: the
    same iteration without noise (exact regularised Newton when q = 1).
    """
    x, y, num_classes, device = _prepare(x, y, num_classes, clip_norm, device, dtype, conversion=conversion,
                                         delta=delta, steps=steps)
    n, d = x.shape
    q = float(hessian_fraction)
    if not 0 < q <= 1:
        raise UserError(f"hessian_fraction must be in (0, 1], got {hessian_fraction!r}")
    yy = one_hot(y, num_classes, dtype)
    eye = torch.eye(d, dtype=MAT, device=device)
    w, b = _start_weights(num_classes, d, bias, device)
    private = epsilon is not None
    info = dict(steps=steps, lr=lr, lam=lam, lam_noise=lam_noise, bias=bias, hessian_fraction=q,
                shared_first_hessian=bool(shared_first_hessian), d=d, num_classes=num_classes)
    p0 = 1.0 / (1.0 + math.exp(-float(bias)))
    c2, root_l = clip_norm**2, math.sqrt(num_classes)
    first_sens, hess_sens, grad_sens = p0 * (1 - p0) * c2, root_l * c2 / 4, root_l * clip_norm
    s = calibrate_releases(epsilon, delta, [1.0] * (2 * int(steps)), conversion)[0] if private else 0.0
    gen = _generator(seed, device)
    if gram is None:
        gram = (x.T @ x).to(MAT)
    elif tuple(gram.shape) != (d, d):
        raise UserError(f"gram must be the ({d}, {d}) matrix X'X of the clipped features, got {tuple(gram.shape)}")
    ridges = []
    for t in range(int(steps)):
        _, resid, curv = _ova_stats(x, w.to(dtype), b.to(dtype), yy)
        grad = (resid.T @ x).to(MAT)  # (L, d)
        if t == 0:  # W = 0: one Hessian for every class
            hess = (p0 * (1 - p0)) * gram.to(device=device, dtype=MAT).unsqueeze(0)
            copies, sens = (1, first_sens) if shared_first_hessian else (num_classes, hess_sens)
            if private:
                hess = project_psd(hess.expand(copies, d, d) + symmetric_gaussian_noise(
                    d, s * sens, gen, device=device, dtype=MAT, batch=(copies,)))
            noise_std = s * sens
        else:
            if q < 1:
                keep = torch.rand(n, generator=gen, device=device) < q
                hess = class_hessians(x[keep], curv[keep])
            else:
                hess = class_hessians(x, curv)
            if private:
                hess = project_psd(hess + symmetric_gaussian_noise(d, s * hess_sens, gen, device=device, dtype=MAT,
                                                                   batch=(num_classes,)))
            noise_std, hess = s * hess_sens / q, hess / q
        if private:
            grad = grad + _gaussian(grad.shape, s * grad_sens, gen, device)
        ridge = lam + (noise_ridge(lam_noise, d, noise_std) if private else 0.0)
        ridges.append(ridge)
        step = spd_solve(hess + ridge * eye, grad + lam * w)
        w = w - lr * step
    info["ridge"], info["ridges"] = ridges[0], ridges
    if not private:
        return _non_private("newton", w, b, clip_norm, delta, conversion, info)
    sens, noise = {"gradient": grad_sens}, {"gradient": s}
    if shared_first_hessian:
        sens["hessian_first"], noise["hessian_first"] = first_sens, s
    if int(steps) > 1 or not shared_first_hessian:
        sens["hessian"], noise["hessian"] = hess_sens, s
    return _finish_private("newton", w, b, clip_norm, epsilon, delta, conversion, noise, sens, [(s, 2 * int(steps))],
                           n, info)


# ------------------------------------------------------------------------------- DP-FC


def clipped_gradient_sum(x, resid, grad_clip: float | None):
    """sum_i clip(g_i, grad_clip) for the linear one-vs-all loss, g_i = (p_i - y_i) x_i'.

    ||g_i||_F = ||p_i - y_i|| * ||x_i|| exactly, so no per-example gradient is formed.
    Returns (L, d) and the per-example norms.
    """
    norms = resid.norm(dim=1) * x.norm(dim=1)
    if grad_clip is None:
        factor = torch.ones_like(norms)
    else:
        factor = torch.clamp(grad_clip / norms.clamp_min(1e-30), max=1.0)
    return (resid * factor.unsqueeze(1)).T @ x, norms


def dp_fc(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int | None = None,
    *,
    epsilon: float | None,
    delta: float = 1e-5,
    clip_norm: float = 1.0,
    grad_clip: float | None = None,
    steps: int = 10,
    lr: float = 0.2,
    lam: float = 100.0,
    lam_noise: float = 0.0,
    bias: float = -10.0,
    cov_fraction: float | None = None,
    conversion: str = "pld",
    cg_tol: float = 1e-8,
    seed: int | None = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> LinearResult:
    """DP-FC: one-vs-all logistic regression preconditioned by a privatised feature covariance.

    Releases F = sum_i clipFro(x_i x_i', C^2) once (features are already clipped to C, so
    the Frobenius clip is the identity; sensitivity C^2), then runs T full-batch steps
    W <- W - lr (F + ridge I)^-1 (sum_i clip(g_i, grad_clip) + N(0, s^2 grad_clip^2)),
    each solve by conjugate gradient, with the bias fixed at `bias`. The covariance takes
    `cov_fraction` of the budget (of beta = 1/s_eff^2); default 1/(T+1), i.e. one noise
    multiplier for all T+1 releases. `grad_clip` defaults to `clip_norm`.
    `epsilon=None`: the same iteration without noise (gradients still clipped).
    """
    x, y, num_classes, device = _prepare(x, y, num_classes, clip_norm, device, dtype, conversion=conversion,
                                         delta=delta, steps=steps)
    n, d = x.shape
    grad_clip = clip_norm if grad_clip is None else float(grad_clip)
    frac = 1.0 / (int(steps) + 1) if cov_fraction is None else float(cov_fraction)
    if not 0 < frac < 1:
        raise UserError(f"cov_fraction must be in (0, 1), got {cov_fraction!r}")
    yy = one_hot(y, num_classes, dtype)
    c2 = clip_norm**2
    cov = (x.T @ x).to(MAT)
    private = epsilon is not None
    info = dict(steps=steps, lr=lr, lam=lam, lam_noise=lam_noise, bias=bias, cov_fraction=frac,
                grad_clip=grad_clip, d=d, num_classes=num_classes)
    if private:
        sig = calibrate_releases(epsilon, delta, [frac] + [(1 - frac) / steps] * int(steps), conversion)
        s_cov, s_grad = sig[0], sig[1]
        gen = _generator(seed, device)
        cov = project_psd(cov + symmetric_gaussian_noise(d, s_cov * c2, gen, device=device, dtype=MAT))
        ridge = lam + noise_ridge(lam_noise, d, s_cov * c2)
    else:
        ridge = lam
    precond = cov + ridge * torch.eye(d, dtype=MAT, device=device)
    w, b = _start_weights(num_classes, d, bias, device)
    for _ in range(int(steps)):
        _, resid, _ = _ova_stats(x, w.to(dtype), b.to(dtype), yy)
        g = clipped_gradient_sum(x, resid, grad_clip)[0].to(MAT)
        if private:
            g = g + _gaussian(g.shape, s_grad * grad_clip, gen, device)
        step = conjugate_gradient(lambda v: precond @ v, g.T, tol=cg_tol)
        w = w - lr * step.T
    info["ridge"] = ridge
    if not private:
        return _non_private("dp_fc", w, b, clip_norm, delta, conversion, info)
    return _finish_private(
        "dp_fc", w, b, clip_norm, epsilon, delta, conversion, {"covariance": s_cov, "gradient": s_grad},
        {"covariance": c2, "gradient": grad_clip}, [(s_cov, 1), (s_grad, int(steps))], n, info,
    )


# ---------------------------------------------------------------------- DP-SGD / DP-Adam


def dp_sgd_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int | None = None,
    *,
    epsilon: float | None,
    delta: float = 1e-5,
    clip_norm: float = 1.0,
    grad_clip: float = 1.0,
    batch_size: int | None = None,
    epochs: float = 10.0,
    steps: int | None = None,
    lr: float = 1.0,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    loss: str = "softmax",
    init: str = "zero",
    conversion: str = "rdp",
    seed: int | None = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> LinearResult:
    """DP-SGD or DP-Adam logistic regression of a linear head (nn.Linear with bias).

    Runs `dpbench.training.loop.fit` (the shared loop): Poisson batches of expected size
    `batch_size` (None = full batch, q = 1), per-example clipping by the clipping engine to
    `grad_clip`, noise once per logical batch by `DPOptimizer`; `steps` defaults to epochs / q.
    `loss`: "softmax" (cross-entropy) or "ova" (one-vs-all sigmoid).
    `init`: "zero" or "random" (PyTorch's default nn.Linear init, seeded).
    `conversion`: "rdp"/"pld" through dpbench.privacy.accounting (Poisson-subsampled Gaussian);
    "classic" only for full batch (then the steps are plain Gaussian releases).
    `epsilon=None`: the same loop with no clipping and no noise.
    """
    if optimizer not in ("sgd", "adam"):
        raise UserError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    if loss not in ("softmax", "ova"):
        raise UserError(f"loss must be 'softmax' or 'ova', got {loss!r}")
    if init not in ("zero", "random"):
        raise UserError(f"init must be 'zero' or 'random', got {init!r}")
    x, y, num_classes, device = _prepare(x, y, num_classes, clip_norm, device, dtype, conversion=conversion,
                                         delta=delta)
    n, d = x.shape
    bs = n if batch_size is None else int(batch_size)
    if not 1 <= bs <= n:
        raise UserError(f"batch_size must be in [1, n={n}], got {batch_size!r}")
    q = bs / n
    steps = int(steps) if steps is not None else accounting.steps_for_epochs(epochs, q)
    if conversion == "classic" and q < 1:
        raise UserError("the classic conversion covers unsampled Gaussian releases only; use batch_size=None "
                        "(full batch) or conversion='rdp'/'pld'")
    seed = 0 if seed is None else int(seed)
    torch.manual_seed(seed)
    head = torch.nn.Linear(d, num_classes).to(device=device, dtype=dtype)
    if init == "zero":
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)

    def per_example_loss(out, target):
        if loss == "softmax":
            return per_sample_cross_entropy(out, target)
        onehot = one_hot(target, num_classes, out.dtype)
        return torch.nn.functional.binary_cross_entropy_with_logits(out, onehot, reduction="none").sum(1)

    info = dict(batch_size=bs, sample_rate=q, steps=steps, lr=lr, optimizer=optimizer, loss=loss, init=init,
                grad_clip=grad_clip, d=d, num_classes=num_classes)
    method = f"dp_{optimizer}"
    common = dict(batching=BatchSpec(steps=steps, sample_rate=q),
                  optim=OptimSpec(optimizer=optimizer, lr=lr, loss_fn=per_example_loss,
                                  kwargs={"momentum": momentum} if optimizer == "sgd" else None),
                  evaluation=EvalSpec(every=None, progress=False), seed=seed, device=device)
    if epsilon is None:
        fit(head, (x, y), privacy=None, **common)
        return _non_private(method, head.weight.detach().clone(), head.bias.detach().clone(), clip_norm,
                            delta, conversion, info)
    if q == 1.0:  # full batch: every step is one unsampled Gaussian release
        sigma = calibrate_releases(epsilon, delta, [1.0] * steps, conversion)[0]
    else:
        sigma = accounting.noise_multiplier(epsilon, q, steps, delta=delta, accountant=conversion, tol=1e-4)
    ledger = accounting.PrivacyLedger(delta=delta, n=n, accountant="pld" if conversion == "pld" else "rdp")
    fit(head, (x, y), privacy=PrivacySpec(noise_multiplier=sigma, delta=delta, ledger=ledger,
                                          accountant=ledger.accountant),
        clipping=ClipSpec(max_grad_norm=grad_clip), **common)
    if q == 1.0:
        epsilons = {conv: composition_epsilon([sigma] * steps, delta, conv) for conv in CONVERSIONS}
    else:
        epsilons = {conv: accounting.epsilon(sigma, q, steps, delta=delta, accountant=conv) for conv in ("rdp", "pld")}
    eps = epsilons["classic"] if conversion == "classic" else float(ledger.epsilon())
    info = dict(info, target_epsilon=epsilon, n=n)
    return LinearResult(method, head.weight.detach().clone(), head.bias.detach().clone(), clip_norm, eps, delta,
                        conversion, {"gradient": sigma}, {"gradient": grad_clip}, epsilons, ledger, info)


SOLVERS: dict[str, Callable[..., LinearResult]] = {
    "least_squares": dp_least_squares,
    "newton": dp_newton,
    "dp_fc": dp_fc,
    "dp_sgd": functools.partial(dp_sgd_logistic, optimizer="sgd"),
    "dp_adam": functools.partial(dp_sgd_logistic, optimizer="adam"),
}


def solve(method: str, x, y, num_classes=None, **kw) -> LinearResult:
    """Run solver `method` (a key of SOLVERS) with keyword settings."""
    if method not in SOLVERS:
        raise UserError(f"unknown solver {method!r}; choose one of {sorted(SOLVERS)}")
    return SOLVERS[method](x, y, num_classes, **kw)


# ------------------------------------------------------------------------------ sweeps


def num_releases(method: str, steps: int | None = None) -> int:
    """How many unsampled Gaussian releases a closed-form solver makes (PAPERS.md E):
    least squares 3, DP-FC T + 1, Newton 2T, full-batch DP-SGD T."""
    if method == "least_squares":
        return 3
    if steps is None or int(steps) < 1:
        raise UserError(f"{method} needs steps >= 1 to count its releases")
    return {"dp_fc": int(steps) + 1, "newton": 2 * int(steps), "dp_sgd": int(steps), "dp_adam": int(steps)}[method]


def noise_multiplier_table(
    epsilons: Sequence[float],
    releases: dict[str, int],
    delta: float = 1e-5,
    conversions: Sequence[str] = CONVERSIONS,
) -> list[dict[str, Any]]:
    """Rows (solver, releases, epsilon, conversion, noise_multiplier): the common noise
    multiplier s of `releases[solver]` equal Gaussian releases spending each epsilon."""
    rows = []
    for solver, count in releases.items():
        for eps in epsilons:
            for conv in conversions:
                s = calibrate_releases(float(eps), delta, [1.0] * int(count), conv)[0]
                rows.append({"solver": solver, "releases": int(count), "epsilon": float(eps),
                             "conversion": conv, "noise_multiplier": s})
    return rows


def run_grid(
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    *,
    methods: Sequence[str],
    epsilons: Sequence[float],
    seeds: Sequence[int],
    settings: dict[str, dict[str, Any]] | None = None,
    delta: float = 1e-5,
    conversion: str = "pld",
    baseline: bool = True,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train every solver at every epsilon and seed; one dict per run with the test
    accuracy, the accounted epsilon (and under each conversion), the noise multipliers
    and the wall time. `baseline` adds each solver's non-private run (epsilon = inf).
    `settings[method]` are keyword settings for that solver."""
    settings = settings or {}
    xtr, ytr = train
    xte, yte = test
    jobs = [(m, None, int(seeds[0])) for m in methods] if baseline else []
    jobs += [(m, float(e), int(s)) for m in methods for e in epsilons for s in seeds]
    rows = []
    for method, eps, s in tqdm(jobs, desc="solvers", disable=not progress, leave=False):
        kw = dict(settings.get(method, {}))
        kw.setdefault("conversion", conversion)
        t0 = time.perf_counter()
        res = solve(method, xtr, ytr, num_classes, epsilon=eps, delta=delta, seed=s, device=device, **kw)
        wall = time.perf_counter() - t0
        row = {"method": method, "target_epsilon": math.inf if eps is None else eps, "seed": s,
               "accuracy": res.accuracy(xte, yte), "epsilon": res.epsilon, "n": int(len(ytr)),
               "noise_multiplier": max(res.noise_multipliers.values()) if res.noise_multipliers else 0.0,
               "conversion": res.conversion, "wall_s": wall}
        row.update({f"epsilon_{k}": v for k, v in res.epsilons.items()})
        row.update({f"sigma_{k}": v for k, v in res.noise_multipliers.items()})
        rows.append(row)
    return rows
