"""Last-layer solvers in the papers' regime: n·eps keying, public-draw tuning, claim rows
(issue 17; PAPERS.md E; the notebook 05 study).

At the papers' scale (ImageNet, n = 1.28M, d = 768-2048) what decides which solver wins is
the noise relative to the data, keyed by n·eps (`dpbench.experiments.neps`). This module runs
the solvers of `dpbench.training.linear` on a large synthetic feature set (n ~ 200,000,
d >= 512) at epsilons whose n·eps spans ImageNet's eps from 0.1 to 8, with:

- each solver's hyperparameters tuned, per epsilon, on a separate *public* synthetic draw
  (same distribution and size; scored on a public validation draw), with the same number
  of configurations for every solver (`equal_budget`): tuning costs no privacy;
- each solver's non-private ceiling (its best public-tuned configuration without noise);
- sufficient statistics computed once: DP least squares and DP-FC add fresh noise per
  (epsilon, seed) to statistics computed once (`ls_noisy` / `fc_runs` reproduce
  `linear.dp_least_squares` / `linear.dp_fc` exactly, same generator order; tested); DP Newton's
  first Hessian (at W = 0 it is p0(1-p0) X'X) comes from the same X'X, its later Hessians from a
  Poisson subsample of the private set (n d^2 L multiply-adds per full Hessian, 5e11 at the cpu
  setting, is what kept Newton off the cpu profile), the subsampling accounted;
- claim rows keyed by n and epsilon, averaged per seed only within one n·eps band, never
  across bands; their columns hold nothing that varies within a band except epsilon.
DP-SGD / DP-Adam on the head run in closed form (`logistic_runs`, the mechanism of
`linear.dp_sgd_logistic` without the general loop, which takes ~13 s per run at this n), many
runs per pass over the data.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from dpbench.errors import UserError
from dpbench.experiments import neps
from dpbench.privacy import accounting
from dpbench.training import features as F
from dpbench.training import linear as L
from dpbench.training.threads import thread_map

MAT = L.MAT
FAST = ("least_squares", "dp_fc", "newton")  # solvers run here on statistics computed once
LOGISTIC = ("dp_sgd", "dp_adam")


# ------------------------------------------------------------------------------- the data


@dataclass
class Split:
    """Clipped features (float32) and labels of one part of the synthetic draw."""

    x: torch.Tensor
    y: torch.Tensor

    @property
    def n(self) -> int:
        return int(self.y.shape[0])


@dataclass
class RegimeTask:
    """The private training set, the test set and the public draw (train/validation) used only
    for tuning and the normaliser; all clipped to `clip_norm` after public-only normalisation."""

    private: Split
    test: Split
    public: Split
    public_val: Split
    num_classes: int
    clip_norm: float
    notes: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return self.private.n

    @property
    def dim(self) -> int:
        return int(self.private.x.shape[1])


def regime_task(n: int, dim: int, num_classes: int, *, n_test: int, n_public: int, n_public_val: int,
                separation: float, label_noise: float, clip_norm: float = 1.0, seed: int = 0) -> RegimeTask:
    """A synthetic feature task: `features.synthetic_features` with a public draw of
    `n_public` training and `n_public_val` validation examples from the same distribution
    (used only for tuning and for the normaliser, which is fitted on the public draw)."""
    syn = F.synthetic_features(n, dim, num_classes, n_test=n_test, n_public=n_public + n_public_val,
                               separation=separation, label_noise=label_noise, seed=seed, dtype=np.float32)
    pub_x, pub_y = syn.public.features, syn.public.labels
    norm = F.PublicNormalizer().fit(pub_x[:n_public])

    def part(x, y):
        return Split(L.clip_features(norm.transform(x), clip_norm).contiguous(), y.long())

    return RegimeTask(part(syn.train.features, syn.train.labels), part(syn.test.features, syn.test.labels),
                      part(pub_x[:n_public], pub_y[:n_public]), part(pub_x[n_public:], pub_y[n_public:]),
                      syn.num_classes, clip_norm,
                      [syn.description, f"private n={n:,}, d={dim}; test {n_test:,}; public draw {n_public:,} (tuning, at "
                                        f"the same n·eps) + {n_public_val:,} (public validation); normaliser fitted on "
                                        f"the public draw"])


# ------------------------------------------------------------------------ sufficient statistics


@dataclass
class Stats:
    """sum_i x_i x_i', the per-class sums of x x', and the per-class sums of x (float64)."""

    gram: torch.Tensor
    per_class: torch.Tensor
    sums: torch.Tensor
    n: int
    clip_norm: float


def sufficient_stats(split: Split, num_classes: int, clip_norm: float) -> Stats:
    """The statistics DP least squares and DP-FC release, computed once per data set (the
    features are already clipped)."""
    x, y = split.x, split.y
    per_class, gram = L.class_grams(x, y, num_classes)
    sums = (L.one_hot(y, num_classes, x.dtype).T @ x).to(MAT)
    return Stats(gram, per_class, sums, split.n, float(clip_norm))


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


@dataclass
class NoisyLS:
    """The three noisy releases of DP least squares for one (epsilon, seed), PSD-projected."""

    gram: torch.Tensor
    per_class: torch.Tensor
    sums: torch.Tensor
    noise_g: float  # noise std on the gram (s_g C^2); 0 without DP
    noise_a: float
    sigmas: tuple = ()


def ls_noisy(stats: Stats, epsilon: float | None, delta: float, conversion: str, seed: int) -> NoisyLS:
    """Noise on the statistics exactly as `linear.dp_least_squares` draws it (same generator
    order: G, then the L class matrices, then the class sums); `epsilon=None`: no noise."""
    if epsilon is None:
        return NoisyLS(stats.gram, stats.per_class, stats.sums, 0.0, 0.0)
    c2 = stats.clip_norm ** 2
    s_g, s_a, s_b = L.calibrate_releases(epsilon, delta, (1.0, 1.0, 1.0), conversion)
    gram, per_class, sums = L.least_squares_releases(stats.gram, stats.per_class, stats.sums, (s_g, s_a, s_b),
                                                     stats.clip_norm, _gen(seed))
    return NoisyLS(gram, per_class, sums, s_g * c2, s_a * c2, (s_g, s_a, s_b))


def ls_solve(noisy: NoisyLS, *, alpha: float, lam: float, lam_noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """theta_l = (A_l + alpha G + ridge I)^-1 b_l (as `linear.dp_least_squares`); returns
    (weights, zero bias)."""
    d = noisy.gram.shape[0]
    ridge = lam + (L.noise_ridge(lam_noise, d, noisy.noise_a + alpha * noisy.noise_g) if noisy.noise_a else 0.0)
    a = noisy.per_class + alpha * noisy.gram + ridge * torch.eye(d, dtype=MAT)
    theta = L.spd_solve(a, noisy.sums)
    return theta, torch.zeros(theta.shape[0], dtype=MAT)


def accuracy(w: torch.Tensor, b: torch.Tensor, split: Split) -> float:
    """Top-1 accuracy of the linear head (w, b) on clipped features."""
    return float(((split.x @ w.float().T + b.float()).argmax(1) == split.y).float().mean())


def fc_runs(split: Split, stats: Stats, num_classes: int, runs: Sequence[dict[str, Any]], *, steps: int,
            bias: float, delta: float, conversion: str, chunk_rows: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """DP-FC (as `linear.dp_fc`, one noise multiplier for the T + 1 releases) for several runs
    at once: each run is a dict with `epsilon` (None: no noise), `seed`, `lr`, `lam` and
    `lam_noise`. The covariance release reuses `stats.gram`; one pass over the data per step
    serves every run; the fixed preconditioner is factorised once per run (Cholesky, where
    `linear.dp_fc` runs conjugate gradient each step: the same solution). Returns (weights,
    bias) per run."""
    x, c = split.x, stats.clip_norm
    d, nc, c2 = x.shape[1], num_classes, c ** 2
    yy = L.one_hot(split.y, nc, x.dtype)
    xnorm = x.norm(dim=1)
    frac = 1.0 / (int(steps) + 1)
    state = []
    for r in runs:
        if r["epsilon"] is None:
            cov, gen, s_grad, ridge = stats.gram, None, 0.0, float(r["lam"])
        else:
            sig = L.calibrate_releases(r["epsilon"], delta, [frac] + [(1 - frac) / steps] * int(steps), conversion)
            gen = _gen(r["seed"])
            cov = L.project_psd(stats.gram + L.symmetric_gaussian_noise(d, sig[0] * c2, gen, dtype=MAT))
            s_grad, ridge = sig[1], float(r["lam"]) + L.noise_ridge(r["lam_noise"], d, sig[0] * c2)
        chol = torch.linalg.cholesky(cov + ridge * torch.eye(d, dtype=MAT))  # PSD + ridge > 0
        state.append(dict(chol=chol, gen=gen, s=s_grad, lr=float(r["lr"]),
                          w=torch.zeros(nc, d, dtype=MAT)))
    b = torch.full((nc,), float(bias), dtype=MAT)
    # rows per block: the (rows, runs, L) temporaries stay small (default ~4M entries)
    chunk = int(chunk_rows) if chunk_rows else max(1024, int(2**22 // (len(state) * nc)))
    for _ in range(int(steps)):
        wall = torch.cat([s["w"] for s in state]).float()  # (R L, d)
        g_all = torch.zeros(len(state) * nc, d)
        for lo in range(0, len(x), chunk):
            xc = x[lo:lo + chunk]
            resid = torch.sigmoid_(torch.addmm(torch.full((1,), float(bias)), xc, wall.T)).view(len(xc), len(state), nc)
            resid = resid.sub_(yy[lo:lo + chunk].unsqueeze(1))
            factor = torch.clamp(c / (resid.norm(dim=2) * xnorm[lo:lo + chunk].unsqueeze(1)).clamp_min(1e-30), max=1.0)
            g_all.addmm_(resid.mul_(factor.unsqueeze(2)).reshape(len(xc), -1).T, xc)
        g_all = g_all.to(MAT).view(len(state), nc, d)
        for s, g in zip(state, g_all):
            if s["gen"] is not None:
                g = g + torch.randn(g.shape, generator=s["gen"], dtype=MAT) * (s["s"] * c)
            s["w"] = s["w"] - s["lr"] * torch.cholesky_solve(g.T, s["chol"]).T
    return [(s["w"], b) for s in state]


def head_gradient_norms(resid: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-example gradient norms of a linear softmax head with bias: the gradient of the
    cross-entropy of example i with respect to (W, b) is (p_i - y_i) [x_i, 1]', whose
    Frobenius norm is ||p_i - y_i|| * sqrt(||x_i||^2 + 1) (no per-example tensor is formed)."""
    return resid.norm(dim=1) * torch.sqrt(x.pow(2).sum(1) + 1.0)


MASK_STREAM = 0x5EED0000  # Poisson batches come from a stream of the run's seed separate from its noise


def _sgd_sigma(epsilon: float | None, q: float, steps: int, delta: float, conversion: str) -> float:
    """DP-SGD's noise multiplier: `steps` unsampled Gaussian releases (q = 1) or Poisson-subsampled ones."""
    if epsilon is None:
        return 0.0
    if q == 1.0:
        return L.calibrate_releases(epsilon, delta, [1.0] * int(steps), conversion)[0]
    # A PLD grid finer than eps/1000 only costs time at the large epsilons here (tens of seconds
    # per calibration at eps ~ 200); a coarser pessimistic grid still bounds epsilon from above.
    grid = max(accounting.pld_interval(int(steps)), float(epsilon) / 1000) if conversion == "pld" else None
    return accounting.noise_multiplier(epsilon, q, int(steps), delta=delta, accountant=conversion, tol=1e-4,
                                       pld_discretization=grid)


def logistic_runs(split: Split, num_classes: int, runs: Sequence[dict[str, Any]], *, delta: float,
                  conversion: str = "pld", grad_clip: float = 1.0, betas: tuple = (0.9, 0.999), adam_eps: float = 1e-8,
                  max_columns: int = 20_000_000, chunk_rows: int = 2048, workers: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """DP-SGD / DP-Adam of zero-initialised linear softmax heads, in closed form, for many runs.

    Each run is a dict with `epsilon` (None: no clipping, no noise), `seed`, `batch_fraction`
    (q; None = the full batch), `steps`, `lr` and `optimizer` ("sgd" or "adam"). The mechanism of
    `linear.dp_sgd_logistic` (which runs the shared loop; too slow for the regime study's runs at
    n = 200,000): each step takes a Poisson batch of rate q, clips every example's gradient of
    (W, b) to `grad_clip` (norms by `head_gradient_norms`), adds N(0, sigma^2 grad_clip^2) once
    to the sum, divides by the expected batch q n and steps; sigma is calibrated for (epsilon,
    delta) over `steps` subsampled (q < 1) or unsampled (q = 1) Gaussian releases.

    Runs with the same (q, steps) -- and, when sampled, the same seed -- share their batches and
    one pass over the data per step. Batches come from a stream of the seed apart from the noise
    (each run on its own is the mechanism above; runs at other epsilons, step sizes or optimizers
    see the same batches: common random numbers). Each step's sums run over blocks of
    `chunk_rows` batch rows (the same sums, added in another order), and the groups run on
    `workers` threads (`threads.thread_map`; default: torch's thread count). Returns (W, b) per run."""
    x, y = split.x, split.y
    n, d = x.shape
    yy = L.one_hot(y, num_classes, x.dtype)
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(runs):
        q = 1.0 if r.get("batch_fraction") is None else float(r["batch_fraction"])
        if not 0 < q <= 1 or int(r["steps"]) < 1 or r.get("optimizer", "sgd") not in ("sgd", "adam"):
            raise UserError(f"need batch_fraction in (0, 1], steps >= 1 and optimizer sgd|adam, got {r!r}")
        groups.setdefault((q, int(r["steps"]), int(r["seed"]) if q < 1 else None), []).append(i)
    out: list = [None] * len(runs)
    root = torch.sqrt(torch.linalg.vector_norm(x, dim=1) ** 2 + 1.0)  # ||[x_i, 1]||, once (head_gradient_norms)
    parts = []
    for (q, steps, mask_seed), members in groups.items():
        per_chunk = max(1, int(max_columns // (max(1, round(q * n)) * num_classes)))
        parts += [(q, steps, mask_seed, members[lo:lo + per_chunk]) for lo in range(0, len(members), per_chunk)]

    def run_part(part):
        q, steps, mask_seed, chunk = part
        return _logistic_group(x, yy, root, [runs[i] for i in chunk], q, steps, mask_seed, delta=delta,
                               conversion=conversion, grad_clip=grad_clip, betas=betas, adam_eps=adam_eps,
                               chunk_rows=int(chunk_rows))

    for (_, _, _, chunk), heads in zip(parts, thread_map(run_part, parts, workers)):
        for i, head in zip(chunk, heads):
            out[i] = head
    return out


def _logistic_group(x, yy, root, runs, q, steps, mask_seed, *, delta, conversion, grad_clip, betas, adam_eps,
                    chunk_rows):
    """`logistic_runs` for runs that share (q, steps) and, when q < 1, the batch stream;
    each step's sums run over blocks of `chunk_rows` batch rows."""
    n, d = x.shape
    nc, k = yy.shape[1], len(runs)
    sig = torch.tensor([_sgd_sigma(r["epsilon"], q, steps, delta, conversion) for r in runs]).view(k, 1, 1)
    private = torch.tensor([r["epsilon"] is not None for r in runs])
    adam = torch.tensor([r.get("optimizer", "sgd") == "adam" for r in runs]).view(k, 1, 1)
    lr = torch.tensor([float(r["lr"]) for r in runs]).view(k, 1, 1)
    gens = [_gen(r["seed"]) for r in runs]
    batches = _gen(MASK_STREAM + mask_seed) if q < 1 else None
    w = torch.zeros(k, nc, d + 1)  # [W, b] per run
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    for t in range(1, int(steps) + 1):
        idx = torch.nonzero(torch.rand(n, generator=batches) < q).reshape(-1) if batches is not None else None
        g = torch.zeros(k, nc, d + 1)
        # Blocks of rows: the gathered batch rows are used by both products while still in
        # cache (gathering a 20,000-row batch whole is most of a step on this machine's memory bus)
        for lo in range(0, n if idx is None else len(idx), chunk_rows):
            rows = slice(lo, lo + chunk_rows) if idx is None else idx[lo:lo + chunk_rows]
            xb, yb, rb = x[rows], yy[rows], root[rows]
            logits = torch.addmm(w[:, :, d].reshape(1, k * nc), xb, w[:, :, :d].reshape(k * nc, d).T).view(-1, k, nc)
            # softmax by hand: torch.softmax over a last dimension of 10 is ~10x slower on CPU here
            p = (logits - logits.amax(dim=2, keepdim=True)).exp_()
            resid = p.div_(p.sum(dim=2, keepdim=True)).sub_(yb.unsqueeze(1))  # (B, k, L)
            norms = resid.norm(dim=2) * rb.unsqueeze(1)  # head_gradient_norms per run
            factor = torch.where(private, torch.clamp(grad_clip / norms.clamp_min(1e-30), max=1.0),
                                 torch.ones_like(norms))
            resid = resid.mul_(factor.unsqueeze(2))
            g[:, :, :d] += (resid.reshape(len(xb), k * nc).T @ xb).view(k, nc, d)
            g[:, :, d] += resid.sum(0)
        noise = torch.stack([torch.randn((nc, d + 1), generator=gen) for gen in gens])
        g = (g + noise * sig * grad_clip) / (q * n)  # sigma = 0 without DP; divided by the expected batch, as DPOptimizer
        m = torch.where(adam, betas[0] * m + (1 - betas[0]) * g, m)
        v = torch.where(adam, betas[1] * v + (1 - betas[1]) * g * g, v)
        adam_step = (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + adam_eps)
        w = w - lr * torch.where(adam, adam_step, g)
    return [(w[j, :, :d].to(MAT), w[j, :, d].to(MAT)) for j in range(k)]


def dp_sgd_head(split: Split, num_classes: int, *, epsilon: float | None, delta: float, batch_fraction: float | None,
                steps: int, lr: float, optimizer: str = "sgd", grad_clip: float = 1.0, conversion: str = "pld",
                seed: int = 0, betas: tuple = (0.9, 0.999), adam_eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """One DP-SGD / DP-Adam run of `logistic_runs`; returns (W, b)."""
    run = dict(epsilon=epsilon, seed=seed, batch_fraction=batch_fraction, steps=steps, lr=lr, optimizer=optimizer)
    return logistic_runs(split, num_classes, [run], delta=delta, conversion=conversion, grad_clip=grad_clip,
                         betas=betas, adam_eps=adam_eps)[0]


def newton_runs(split: Split, stats: Stats, num_classes: int, runs: Sequence[dict[str, Any]], *, steps: int,
                hessian_fraction: float, delta: float, conversion: str,
                workers: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`linear.dp_newton` for each run (a dict with `epsilon`, `seed`, `lr`, `lam`, `lam_noise`),
    its first Hessian from `stats.gram` (computed once) and released once for all classes
    (`shared_first_hessian`), later Hessians on a Poisson subsample of rate `hessian_fraction`;
    the runs go on `workers` threads (`threads.thread_map`). Returns (weights, bias) per run."""
    def one(r):
        res = L.dp_newton(split.x, split.y, num_classes, epsilon=r["epsilon"], delta=delta, clip_norm=stats.clip_norm,
                          steps=steps, lr=r["lr"], lam=r["lam"], lam_noise=r["lam_noise"],
                          hessian_fraction=hessian_fraction, shared_first_hessian=True, gram=stats.gram,
                          conversion=conversion, seed=r["seed"])
        return res.weights, res.bias

    return thread_map(one, list(runs), workers)


# ----------------------------------------------------------------------------- tuning grids


def default_grids(n: int) -> dict[str, list[dict[str, Any]]]:
    """The configurations each solver may choose from on the public draw: the same number
    for every solver (`equal_budget`). DP-SGD / DP-Adam choose batch size, steps and learning
    rate under a budget of 10 epochs; least squares its alpha and noise ridge; DP-FC its step
    size and noise ridge (T = 10 and bias -10 as in the paper); Newton its step size and noise
    ridge (its steps and Hessian subsample are fixed by the caller)."""
    sgd_shapes = [(None, 10), (0.1, 100)]  # (batch as a fraction of the training set, None = full; steps): 10 epochs
    return {
        "least_squares": [dict(alpha=a, lam=1.0, lam_noise=ln) for a, ln in itertools.product((1.0, 4.0), (0.1, 0.5))],
        "dp_fc": [dict(lr=lr, lam=1.0, lam_noise=ln) for lr, ln in itertools.product((0.1, 0.5), (0.1, 0.5))],
        "newton": [dict(lr=lr, lam=1.0, lam_noise=ln) for lr, ln in itertools.product((0.5, 1.0), (0.1, 0.5))],
        "dp_sgd": [dict(batch_fraction=b, steps=t, lr=lr) for (b, t), lr in itertools.product(sgd_shapes, (8.0, 64.0))],
        "dp_adam": [dict(batch_fraction=b, steps=t, lr=lr) for (b, t), lr in itertools.product(sgd_shapes, (0.01, 0.1))],
    }


def equal_budget(grids: dict[str, Sequence[dict[str, Any]]]) -> int:
    """The number of configurations every solver is tuned over; UserError when solvers get
    different budgets (an unequal search favours the solver searched more)."""
    sizes = {m: len(g) for m, g in grids.items()}
    if len(set(sizes.values())) != 1:
        raise UserError(f"unequal tuning budgets {sizes}: give every solver the same number of configurations")
    return next(iter(sizes.values()))


# --------------------------------------------------------------------------------- running


class Runner:
    """Runs any solver on one data split with statistics cached, for a list of configs."""

    def __init__(self, task: RegimeTask, train: Split, *, delta: float, conversion: str, fc_steps: int = 10,
                 fc_bias: float = -10.0, newton_steps: int = 2, hessian_fraction: float = 0.1, device: Any = "cpu"):
        self.task, self.train, self.delta, self.conversion = task, train, delta, conversion
        self.fc_steps, self.fc_bias, self.device = fc_steps, fc_bias, device
        self.newton_steps, self.hessian_fraction = newton_steps, hessian_fraction
        self.stats = sufficient_stats(train, task.num_classes, task.clip_norm)

    def run(self, method: str, jobs: Sequence[tuple[float | None, int, dict[str, Any]]],
            evaluate: Split) -> list[float]:
        """Accuracy on `evaluate` of each job (epsilon or None, seed, config)."""
        if method == "least_squares":
            out, cache = [], {}
            for eps, seed, cfg in jobs:
                key = (eps, seed)
                if key not in cache:  # the noise does not depend on the config: draw it once
                    cache = {key: ls_noisy(self.stats, eps, self.delta, self.conversion, seed)}
                out.append(accuracy(*ls_solve(cache[key], **cfg), evaluate))
            return out
        if method == "dp_fc":
            runs = [dict(epsilon=eps, seed=seed, **cfg) for eps, seed, cfg in jobs]
            heads = fc_runs(self.train, self.stats, self.task.num_classes, runs, steps=self.fc_steps, bias=self.fc_bias,
                            delta=self.delta, conversion=self.conversion)
            return [accuracy(w, b, evaluate) for w, b in heads]
        if method == "newton":
            conv = "pld" if self.conversion == "classic" and self.hessian_fraction < 1 else self.conversion
            heads = newton_runs(self.train, self.stats, self.task.num_classes,
                                [dict(epsilon=eps, seed=seed, **cfg) for eps, seed, cfg in jobs],
                                steps=self.newton_steps, hessian_fraction=self.hessian_fraction, delta=self.delta,
                                conversion=conv)
            return [accuracy(w, b, evaluate) for w, b in heads]
        if method in LOGISTIC:
            conv = "pld" if self.conversion == "classic" else self.conversion
            heads = logistic_runs(self.train, self.task.num_classes,
                                  [dict(epsilon=eps, seed=seed, optimizer=method[3:], **cfg) for eps, seed, cfg in jobs],
                                  delta=self.delta, conversion=conv)
            return [accuracy(w, b, evaluate) for w, b in heads]
        raise UserError(f"solver {method!r} is not run by this study; choose from {FAST + LOGISTIC}")


def public_epsilon(epsilon: float | None, n: int, n_public: int) -> float | None:
    """The epsilon at which the public draw (n_public examples) is tuned for our `epsilon` at n:
    the same n·eps, so the tuning sees the private run's noise-to-data ratio."""
    return None if epsilon is None else float(epsilon) * n / n_public


def tune(public: Runner, task: RegimeTask, methods: Sequence[str], epsilons: Sequence[float | None],
         grids: dict[str, Sequence[dict[str, Any]]], seed: int) -> tuple[dict, list[dict]]:
    """Per solver and epsilon (None: the non-private ceiling), the configuration with the best
    public-validation accuracy after training on the public draw at the same n·eps
    (`public_epsilon`; one run per configuration, seed `seed`, never a private example).
    Returns (chosen: {(method, eps): config}, rows)."""
    equal_budget({m: grids[m] for m in methods})
    chosen, rows = {}, []
    for m in methods:  # one call per solver: every epsilon's configurations share passes over the data
        pub_eps = [public_epsilon(eps, task.n, task.public.n) for eps in epsilons]
        all_accs = public.run(m, [(e_pub, seed, cfg) for e_pub in pub_eps for cfg in grids[m]], task.public_val)
        for k, (eps, e_pub) in enumerate(zip(epsilons, pub_eps)):
            accs = all_accs[k * len(grids[m]):(k + 1) * len(grids[m])]
            best = int(np.argmax(accs))
            chosen[(m, eps)] = dict(grids[m][best])
            for i, (cfg, a) in enumerate(zip(grids[m], accs)):
                rows.append(dict(method=m, epsilon=math.inf if eps is None else eps, config=i, public_val_acc=a,
                                 public_epsilon=math.inf if e_pub is None else e_pub,
                                 chosen=i == best, **dict(cfg)))
    return chosen, rows


def tuning_metric_rows(tune_rows: Sequence[dict]) -> list[dict[str, Any]]:
    """Recorder rows (`public_val_acc`, study=tuning) of every configuration tried on the public draw."""
    return [dict(metric="public_val_acc", value=r["public_val_acc"], study="tuning",
                 **{k: v for k, v in r.items() if k != "public_val_acc"}) for r in tune_rows]


def evaluate_private(private: Runner, task: RegimeTask, methods: Sequence[str], epsilons: Sequence[float],
                     chosen: dict, seeds: Sequence[int], only: dict[str, Sequence[float]] | None = None) -> list[dict]:
    """Each solver at each epsilon (`only[method]`, where given, restricts a solver's epsilons)
    with its public-tuned configuration, on the private set, for every seed; plus its
    non-private ceiling (the config tuned without noise), once."""
    rows = []
    for m in methods:
        t0 = time.perf_counter()
        jobs = [(e, s, chosen[(m, e)]) for e in (only or {}).get(m, epsilons) for s in seeds]
        jobs.append((None, seeds[0], chosen[(m, None)]))  # the ceiling, in the same call: it shares passes
        accs = private.run(m, jobs, task.test)
        rows += [dict(method=m, epsilon=math.inf if e is None else e, seed=s, accuracy=a)
                 for (e, s, _), a in zip(jobs, accs)]
        print(f"{m}: {len(jobs)} runs in {time.perf_counter() - t0:.1f}s")
    return rows


@dataclass
class Study:
    """What `regime_study` returns: the chosen configurations, every tuning row, the private
    results (with the "logistic" arm) and which logistic solver is that arm per epsilon."""

    chosen: dict
    tune_rows: list[dict]
    results: list[dict]
    choice: dict[float, str]


def regime_study(task: RegimeTask, methods: Sequence[str], epsilons: Sequence[float], seeds: Sequence[int], *,
                 tune_seed: int, grids: dict | None = None, **runner_kw: Any) -> Study:
    """Tune every solver on the public draw (`tune`, equal budgets, at each epsilon and without
    noise), then run the chosen configurations on the private set for `seeds` (`evaluate_private`)
    and add the logistic arm chosen on the public draw. DP-SGD and DP-Adam run privately only at
    the epsilons where the public draw chose them as the logistic arm (the other's private runs
    feed no claim); both ceilings run. `runner_kw` go to both `Runner`s."""
    grids = default_grids(task.n) if grids is None else grids
    print(f"tuning budget: {equal_budget({m: grids[m] for m in methods})} configurations per solver and eps")
    chosen, tune_rows = tune(Runner(task, task.public, **runner_kw), task, methods, list(epsilons) + [None], grids,
                             seed=tune_seed)
    choice = logistic_choice(tune_rows)
    print("logistic arm per eps (chosen on the public draw):", choice)
    only = {m: [e for e in epsilons if choice.get(e) == m] for m in LOGISTIC}
    results = evaluate_private(Runner(task, task.private, **runner_kw), task, methods, epsilons, chosen, seeds, only)
    return Study(chosen, tune_rows, with_logistic_arm(results, choice), choice)


def logistic_choice(tune_rows: Sequence[dict]) -> dict[float, str]:
    """Per private epsilon, the logistic solver (DP-SGD or DP-Adam) whose chosen configuration
    scored best on the public validation draw: the "logistic regression" arm, chosen without
    private or test data."""
    best: dict[float, tuple[float, str]] = {}
    for r in tune_rows:
        if r["method"] in LOGISTIC and r["chosen"] and math.isfinite(r["epsilon"]):
            if r["epsilon"] not in best or r["public_val_acc"] > best[r["epsilon"]][0]:
                best[r["epsilon"]] = (r["public_val_acc"], r["method"])
    return {e: m for e, (_, m) in best.items()}


def with_logistic_arm(results: Sequence[dict], choice: dict[float, str]) -> list[dict]:
    """`results` plus a copy of the chosen logistic solver's runs under method "logistic"."""
    extra = [dict(r, method="logistic", solver=r["method"]) for r in results
             if math.isfinite(r["epsilon"]) and choice.get(r["epsilon"]) == r["method"]]
    return list(results) + extra


# ------------------------------------------------------------------------------ claim rows

# claim id -> (arms, band); the csv fixes the ordering and the setting (n*epsilon band)
CLAIMS = {
    "E-ls-beats-logistic-low-eps": (("least_squares", "logistic"), "ImageNet eps < 1"),
    "E-ls-beats-logistic": (("least_squares", "logistic"), "ImageNet eps in [1, 10]"),
    "E-newton-beats-ls-high-eps": (("newton", "least_squares"), "ImageNet eps in [1, 10]"),
    "E-dpfc-best": (("dp_fc", "least_squares", "newton"), "ImageNet eps < 1"),
    "E-dpfc-best-high-eps": (("dp_fc", "least_squares", "newton"), "ImageNet eps in [1, 10]"),
}


def claim_rows(results: Sequence[dict], n: int, *, setting: str) -> list[dict[str, Any]]:
    """Recorder rows of the E ordering claims: one `test_accuracy` row per arm, seed and
    epsilon inside the claim's n·eps band, with columns n and epsilon (the report averages a
    seed's rows within the band, never across bands). A claim whose claimed arm, or every
    compared arm, was not run gets no rows (it stays "not run")."""
    out = []
    ran = {r["method"] for r in results}
    for claim, (arms, band) in CLAIMS.items():
        if arms[0] not in ran or not ran & set(arms[1:]):
            continue  # the claimed arm or every compared arm was not run: the claim stays "not run"
        for r in results:
            if r["method"] in arms and math.isfinite(r["epsilon"]) and neps.band_of(n, r["epsilon"]) == band:
                out.append(dict(metric="test_accuracy", value=r["accuracy"], method=r["method"], epsilon=r["epsilon"],
                                n=n, seed=r["seed"], claim_id=claim, unit="fraction", feature_set="synthetic-regime",
                                setting=f"{setting}; {band} (n*eps band), per seed the mean over its epsilons"))
    return out


def result_rows(results: Sequence[dict], n: int, delta: float) -> list[dict[str, Any]]:
    """Every run as a `test_accuracy` row (no claim id) with n, n_epsilon, the ImageNet-equivalent
    epsilon (linear keying) and the band."""
    out = []
    for r in results:
        e = r["epsilon"]
        extra = dict(n_epsilon=n * e, imagenet_epsilon=neps.imagenet_epsilon(n, e), band=neps.band_of(n, e)) \
            if math.isfinite(e) else dict(band="non-private ceiling")
        out.append(dict(metric="test_accuracy", value=r["accuracy"], method=r["method"], epsilon=e, seed=r["seed"], n=n,
                        delta=delta, feature_set="synthetic-regime", study="regime", **extra))
    return out


def regime_table(results: Sequence[dict], n: int, delta: float):
    """Mean ± 95% t-half-width of test accuracy per (epsilon, solver), with n·eps, the linear
    and the noise-matched ImageNet epsilon and the band; the non-private ceiling as the last line."""
    import pandas as pd
    from scipy import stats as st

    df = pd.DataFrame(results)
    g = df.groupby(["epsilon", "method"]).accuracy
    k = g.count()
    half = g.std().fillna(0) * st.t.ppf(0.975, (k - 1).clip(lower=1)) / np.sqrt(k)
    cell = (g.mean().map("{:.4f}".format) + " ± " + half.map("{:.4f}".format)).unstack()
    cell.insert(0, "band", [neps.band_of(n, e) if math.isfinite(e) else "ceiling" for e in cell.index])
    cell.insert(0, "ImageNet eps (noise-matched)",
                [f"{neps.noise_matched_imagenet_epsilon(n, e, delta):.3g}" if math.isfinite(e) else "" for e in cell.index])
    cell.insert(0, "ImageNet eps (n·eps)", [f"{neps.imagenet_epsilon(n, e):.3g}" if math.isfinite(e) else "" for e in cell.index])
    cell.insert(0, "n·eps", [f"{n * e:,.0f}" if math.isfinite(e) else "" for e in cell.index])
    return cell


# ------------------------------------------------------------------------ full-batch ablation


def _ablation_arms(n: int, small_batch: int, epochs: float) -> dict[str, tuple[float | None, int]]:
    """(batch fraction, steps) of the ablation's arms at a fixed number of epochs: the full
    batch and a Poisson batch of expected size `small_batch` (`accounting.steps_for_epochs`)."""
    return {"full_batch": (None, accounting.steps_for_epochs(epochs, 1.0)),
            "small_batch": (small_batch / n, accounting.steps_for_epochs(epochs, small_batch / n))}


def batch_ablation(task: RegimeTask, *, epsilon: float, small_batch: int, epochs: float, lr_full: float, lr_small: float,
                   seeds: Sequence[int], delta: float, conversion: str = "pld", device: Any = "cpu") -> list[dict]:
    """DP-SGD full batch against a small Poisson batch at the same epsilon, at a fixed number
    of epochs (equal compute: the full batch takes `epochs` steps, the small batch
    epochs·n/B) and at a fixed number of steps (both take `epochs` steps: the full batch then
    gets n/B times the compute). The full-batch run is the same in both budgets."""
    n = task.n
    shape = _ablation_arms(n, small_batch, epochs)
    full_steps, small_steps = shape["full_batch"][1], shape["small_batch"][1]
    arms = [("full_batch", None, full_steps, lr_full, ("fixed epochs", "fixed steps")),
            ("small_batch", small_batch, small_steps, lr_small, ("fixed epochs",)),
            ("small_batch", small_batch, full_steps, lr_small, ("fixed steps",))]
    jobs = [(arm, b, steps, lr, budgets, s) for arm, b, steps, lr, budgets in arms for s in seeds]
    heads = logistic_runs(task.private, task.num_classes,
                          [dict(epsilon=epsilon, seed=s, batch_fraction=None if b is None else b / n, steps=steps, lr=lr)
                           for _, b, steps, lr, _, s in jobs], delta=delta, conversion=conversion)
    rows = []
    for (arm, b, steps, lr, budgets, s), head in zip(jobs, heads):
        acc = accuracy(*head, task.test)
        rows.extend(dict(arm=arm, budget=budget, batch_size=b or n, steps=steps, lr=lr, seed=s, accuracy=acc)
                    for budget in budgets)
    return rows


def ablation_lrs(task: RegimeTask, epsilon: float, *, small_batch: int, epochs: float, tune_seeds: Sequence[int],
                 delta: float, conversion: str = "pld",
                 lrs: Sequence[float] | None = None) -> tuple[float, float, list[dict]]:
    """DP-SGD learning rates for the batch ablation at our `epsilon`, chosen on the public draw
    (at the same n·eps, `public_epsilon`; no private or test example): each arm (the full batch
    for `epochs` steps, the sampled batch at rate small_batch / n for epochs·n / small_batch
    steps) runs every learning rate in `lrs` (default: those of the DP-SGD tuning grid,
    `default_grids`) once per public seed in `tune_seeds`, and takes the
    one with the best *mean* public-validation accuracy. Both arms get the same grid and seeds.

    One public run per configuration is not enough here: a large step size can be unstable (at
    lr 64 the sampled arm's public accuracy jumped between 0.68 and 0.90 when only the order of
    float sums changed), and a choice that a rounding difference flips cannot decide the claim.
    Returns (lr_full, lr_small, rows of every tuning run)."""
    n, n_pub = task.n, task.public.n
    lrs = sorted({float(c["lr"]) for c in default_grids(n)["dp_sgd"]}) if lrs is None else [float(lr) for lr in lrs]
    if not lrs or not tune_seeds:
        raise UserError("the batch ablation's tuning needs at least one learning rate and one public seed")
    pub_eps = public_epsilon(epsilon, n, n_pub)
    arms = _ablation_arms(n, small_batch, epochs)
    jobs = [(arm, lr, s) for arm in arms for lr in lrs for s in tune_seeds]
    heads = logistic_runs(task.public, task.num_classes,
                          [dict(epsilon=pub_eps, seed=s, batch_fraction=arms[arm][0], steps=arms[arm][1], lr=lr)
                           for arm, lr, s in jobs], delta=delta, conversion=conversion)
    rows = [dict(arm=arm, lr=lr, seed=s, public_epsilon=pub_eps, public_val_acc=accuracy(*head, task.public_val))
            for (arm, lr, s), head in zip(jobs, heads)]
    best = {}
    for arm in arms:
        means = {lr: float(np.mean([r["public_val_acc"] for r in rows if r["arm"] == arm and r["lr"] == lr]))
                 for lr in lrs}
        best[arm] = max(lrs, key=lambda lr: means[lr])
    return best["full_batch"], best["small_batch"], rows


def ablation_tuning_rows(rows: Sequence[dict], epsilon: float) -> list[dict[str, Any]]:
    """Recorder rows (`public_val_acc`, study=ablation_tuning) of `ablation_lrs`' public runs."""
    return [dict(metric="public_val_acc", value=r["public_val_acc"], study="ablation_tuning", method="dp_sgd",
                 epsilon=epsilon, **{k: v for k, v in r.items() if k != "public_val_acc"}) for r in rows]


def batch_ablation_rows(rows: Sequence[dict], n: int, epsilon: float, claim_budget: str = "fixed epochs") -> list[dict]:
    """Recorder rows of the ablation; only the `claim_budget` rows carry E-full-batch-helps
    (the other budget is shown, not judged: rows of two budgets are never pooled)."""
    out = []
    for r in rows:
        tag = dict(claim_id="E-full-batch-helps") if r["budget"] == claim_budget else {}
        out.append(dict(metric="test_accuracy", value=r["accuracy"], method="dp_sgd", arm=r["arm"], epsilon=epsilon,
                        n=n, seed=r["seed"], budget=r["budget"], unit="fraction", ablation="batch_size",
                        setting=f"DP-SGD at eps {epsilon:g}, n={n:,}: full batch vs expected batch "
                                f"{min(x['batch_size'] for x in rows):,}, {r['budget']}", **tag))
    return out


# ---------------------------------------------------------------------------------- figure


def plot_regime(results: Sequence[dict], methods: Sequence[str], n: int, title: str):
    """Test accuracy against epsilon (mean and 95% CI over seeds) per solver, each solver's
    non-private ceiling as a dotted line in its colour, the band boundary at ImageNet eps 1,
    and the ImageNet-equivalent epsilon on the top axis."""
    import matplotlib.pyplot as plt
    import pandas as pd
    from scipy import stats as st

    df = pd.DataFrame(results)
    fig, ax = plt.subplots(figsize=(8, 4.8))
    eps = sorted(e for e in df.epsilon.unique() if math.isfinite(e))
    for i, m in enumerate(methods):
        d = df[(df.method == m) & np.isfinite(df.epsilon)].groupby("epsilon").accuracy
        if not len(d):
            continue
        mean, sem, k = d.mean(), d.sem().fillna(0), d.count()
        half = sem * st.t.ppf(0.975, (k - 1).clip(lower=1))
        ax.errorbar(mean.index, mean, yerr=half, fmt="o-", capsize=3, color=f"C{i}", label=m)
        ceil = df[(df.method == m) & ~np.isfinite(df.epsilon)].accuracy
        if len(ceil):
            ax.axhline(float(ceil.mean()), color=f"C{i}", ls=":", lw=1)
    ax.axvline(neps.epsilon_for_imagenet(1.0, n), color="gray", ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_xticks(eps, [f"{e:g}" for e in eps])
    ax.xaxis.set_minor_locator(plt.NullLocator())
    ax.set_xlabel(f"our ε (n = {n:,})")
    ax.set_ylabel("test accuracy")
    neps.add_imagenet_axis(ax, n, eps)
    ax.set_title(title, fontsize=9, pad=8)
    ax.legend(fontsize=8, loc="lower right", title="dotted: non-private ceiling; dashed: ImageNet ε = 1",
              title_fontsize=7)
    return fig
