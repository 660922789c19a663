"""Per-mechanism canary audits: whole DP-SGD runs, adaptive counts, linear solvers, distributed noise.

Each audit runs dpbench's real mechanism with canaries, scores what it released, and returns
a `CanaryAudit` (members, scores, the claimed epsilon, the analytic epsilon of what really
ran, the threat model). `summarize` turns it into one row: the audited lower bound (many-trials
Clopper-Pearson and/or Steinke et al.'s one-run bound, from `dpbench.privacy.audit_bounds`),
the trial ceiling, and a status: detected / not detected / undetectable at this trial count.

Canaries are "Dirac" gradient canaries (Nasr et al. 2023): canary j's per-sample gradient
is a large multiple of the unit vector e_j of a trainable embedding row that no other
example touches, so clipping cuts it to exactly C along e_j. Clean examples live on another
row. With SGD (no momentum) every released coordinate j depends only on canary j's
membership, its sampling and the noise on coordinate j, so the m canaries of ONE run are m
independent trials: the many-trials bound is valid on them (stated per audit as
`independent`), and the one-run bound (valid without independence) is computed beside it.

Planted faults live here, never in the audited modules: a documented subclass or a
monkeypatch inside the audit run that calls the mechanism's public building blocks with the
wrong noise scale. Each fault's analytic true epsilon is computed beside the claim.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from dpbench.errors import UserError
from dpbench.privacy import accounting
from dpbench.privacy.audit_bounds import (
    epsilon_lower_bound,
    gaussian_epsilon,
    one_run_audit,
    projected_trials,
    shuffle_max_test_epsilon,
    simulated_trials,
)
from dpbench.clipping import ClippingEngine
from dpbench.clipping.adaptive import AdaptiveClipping, centered_count
from dpbench.training import linear
from dpbench.training.distributed import DataParallel, DistributedDPOptimizer, free_port
from dpbench.training.loop import BatchSpec, ClipSpec, EvalSpec, OptimSpec, PrivacySpec, fit
from dpbench.training.optimizer import DPOptimizer
from dpbench.training.sampling import PoissonSampler

__all__ = [
    "CanaryAudit", "THREAT_MODELS", "MECHANISM_VARIANTS", "summarize",
    "audit_dpsgd_run", "audit_adaptive_counts", "audit_linear", "audit_pipeline_noise", "audit_data_parallel",
    "run_mechanism_audits",
]

THREAT_MODELS = {
    "all_iterates": "white-box, all iterates: the adversary knows the canary gradients and sees every "
                    "released update (the model DP-SGD's accounting covers)",
    "statistics": "white-box, released statistics: the adversary knows the clean data and sees the noisy "
                  "sufficient statistics (the released matrices; vectors recovered from the released head)",
    "counts": "white-box, released counts: the adversary knows the clean norms and sees the noisy quantile "
              "counts of one step",
    "one_step_sum": "white-box, one released noisy sum: the adversary knows the canary gradients and sees "
                    "the summed update of one step",
}

# mechanism -> its variants ("correct" first); faults are planted in this module
MECHANISM_VARIANTS = {
    "dpsgd_run": ("correct", "shuffled_batches", "ledger_half_steps"),
    "adaptive_counts": ("correct", "unnoised_counts"),
    "least_squares": ("correct", "sensitivity_c"),
    "newton": ("correct",),
    "dp_fc": ("correct",),
    "pipeline_noise": ("correct", "per_stage_sigma_ck"),
    "data_parallel": ("correct_rank0", "correct_shares", "no_rank_noise", "shares_var_over_w2"),
}
# over-noising variants: more private than claimed, so no lower bound can catch them (unit-tested by variance)
OVER_NOISING = {"data_parallel": ("overnoise_every_rank",)}
FAULT_TEXT = {
    "shuffled_batches": "batches drawn by shuffling with a fixed size; the accountant is fed q as if Poisson",
    "ledger_half_steps": "the ledger counts half of the steps",
    "unnoised_counts": "the quantile counts released without noise",
    "sensitivity_c": "DP least squares noise calibrated to sensitivity C where C^2 applies (C = clip_norm)",
    "per_stage_sigma_ck": "each stage adds sigma*C_k instead of sigma*C_total (K equal stages)",
    "no_rank_noise": "data-parallel noise that no rank adds",
    "shares_var_over_w2": "noise shares of variance sigma^2 C^2 / W^2 instead of / W",
    "overnoise_every_rank": "every rank adds the full sigma*C (W times the variance; more private)",
}


@dataclass
class CanaryAudit:
    """Scores of one audited mechanism variant and what it claims.

    `true_epsilon` is the analytic epsilon of what actually ran (`true_relation` ">=" when it
    is only a known lower bound, e.g. shuffled batches). `independent`: the trials are
    independent, so the many-trials bound applies; otherwise only the one-run bound.
    `model_scores(n, rng)` draws (member, non-member) scores of the chosen score from the
    mechanism's analytic model, for projecting the trials an audit would need.
    """

    mechanism: str
    variant: str
    threat_model: str
    claimed_epsilon: float
    true_epsilon: float
    delta: float
    members: np.ndarray
    scores: dict
    independent: bool = True
    true_relation: str = "="
    model_scores: Callable | None = None
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)
    simulate_up_to: int = 4_000_000  # largest simulated audit for `trials_needed` (memory bound)

    @property
    def fault(self) -> str:
        return "" if self.variant.startswith("correct") else self.variant

    @property
    def trials(self) -> int:
        return int(self.members.size)


def summarize(a: CanaryAudit, confidence: float = 0.95, seed: int = 0, project: bool = True) -> dict[str, Any]:
    """One row: claim, analytic true epsilon, audited bound with its confidence, ceiling, status.

    With independent trials, the many-trials and one-run bounds are each computed at
    (1 + confidence) / 2 and the larger is reported (a bound at `confidence`); otherwise the
    one-run bound alone at `confidence`. Status: "sound" (correct variant, bound <= claim),
    "CLAIM REFUTED" (correct variant above its claim), "detected" (fault, bound > claim),
    "no gap" (the fault's known epsilon is not above the claim: nothing to detect),
    "undetectable: ceiling below claim" (even a perfect attack at this trial count could not
    pass the claim) or "not detected". For the last two, `trials_needed` says how many trials
    the many-trials bound would need: found by simulating the whole audit on the analytic
    model up to `a.simulate_up_to` trials ("simulated", within a factor 2), else the expected-count projection
    with the best threshold known in advance ("lower estimate").
    """
    c_each = 1 - (1 - confidence) / 2 if a.independent else confidence
    one = one_run_audit(a.scores, a.members, c_each, a.delta)
    best, trials_b = one, None
    if a.independent:
        trials_b = epsilon_lower_bound(a.scores, a.members, c_each, a.delta, seed=seed)
        best = trials_b if trials_b.epsilon >= one.epsilon else one
    ceiling = max(one.ceiling, trials_b.ceiling if trials_b is not None else 0.0)
    claim, true = a.claimed_epsilon, a.true_epsilon
    needed, needed_how = None, ""
    if not a.fault:
        status = "sound" if best.epsilon <= claim else "CLAIM REFUTED"
    elif best.epsilon > claim:
        status = "detected"
    elif true <= claim:
        status = "no gap"
    else:
        status = "undetectable: ceiling below claim" if ceiling <= claim else "not detected"
        if project and a.model_scores is not None:
            # simulate the whole audit on the analytic model up to `simulate_up_to` trials;
            # beyond, the expected-count projection (oracle threshold: a lower estimate)
            needed = simulated_trials(a.model_scores, claim, c_each, a.delta, start=max(1000, a.trials),
                                      max_trials=a.simulate_up_to, seed=seed + 99)
            needed_how = "simulated"
            if needed is None:
                s_in, s_out = a.model_scores(400_000, np.random.default_rng(seed + 99))
                needed = projected_trials(s_in, s_out, claim, c_each, a.delta)
                needed_how = "lower estimate"
    return {
        "mechanism": a.mechanism, "variant": a.variant, "fault": a.fault, "threat_model": a.threat_model,
        "claimed_epsilon": claim, "true_epsilon": true, "true_relation": a.true_relation,
        "audited_lb": best.epsilon, "method": best.method, "score": best.score, "confidence": confidence,
        "trials_lb": trials_b.epsilon if trials_b is not None else float("nan"), "one_run_lb": one.epsilon,
        "ceiling": ceiling, "trials": a.trials, "independent": a.independent, "status": status,
        "detected": bool(a.fault and best.epsilon > claim), "trials_needed": needed, "trials_needed_how": needed_how, "seconds": a.seconds,
        "delta": a.delta, **{f"setting_{k}": v for k, v in a.settings.items()},
    }


# ---------------------------------------------------------------------------- Dirac canaries


def _dirac_loss(scale: float):
    """Per-sample loss scale * out: the gradient on the example's embedding row is `scale`."""
    def loss(out, target):
        return scale * out[:, 0]
    return loss


def _members(m: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 7877]).random(int(m)) < 0.5


def _poisson_lr(y: np.ndarray, q: float, sigma: float) -> np.ndarray:
    """Log-likelihood ratio of 'canary Poisson-sampled at rate q' for per-step releases y (T, m)
    in units of C: sum_t log(1 - q + q exp((y_t - 1/2) / sigma^2))."""
    z = (y - 0.5) / sigma**2
    return np.sum(np.logaddexp(math.log1p(-q) if q < 1 else -np.inf, math.log(q) + z), axis=0)


def _shuffle_lr(y: np.ndarray, batches: int, sigma: float) -> np.ndarray:
    """Log-likelihood ratio of 'canary in exactly one batch per epoch' (shuffling)."""
    T = y.shape[0]
    out = np.zeros(y.shape[1])
    for start in range(0, T, batches):
        z = (y[start:start + batches] - 0.5) / sigma**2
        out += np.logaddexp.reduce(z, axis=0) - math.log(z.shape[0])
    return out


class _HalfLedger(accounting.PrivacyLedger):
    """FAULT (audit only): a ledger that records half of the steps it is told about."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._seen = 0
        self._kept = 0

    def record_dpsgd(self, noise_multiplier, sample_rate, steps=1):
        self._seen += int(steps)
        keep = self._seen // 2 - self._kept
        self._kept += keep
        if keep:
            super().record_dpsgd(noise_multiplier, sample_rate, keep)


def _dpsgd_scores(y: np.ndarray, q: float, sigma: float, batches: int) -> dict[str, np.ndarray]:
    return {"poisson_lr": _poisson_lr(y, q, sigma), "shuffle_lr": _shuffle_lr(y, batches, sigma),
            "sum": y.sum(0), "max": y.max(0)}


def audit_dpsgd_run(variant: str = "correct", *, canaries: int = 20_000, sample_rate: float = 0.1, steps: int = 10,
                    noise_multiplier: float = 1.0, max_grad_norm: float = 1.0, lr: float = 1.0,
                    delta: float = 1e-5, accountant: str = "pld", method: str = "ghost", seed: int = 0) -> CanaryAudit:
    """A T-step DP-SGD run of `dpbench.training.loop.fit` (real sampler, engine, optimizer, ledger)
    with `canaries` Dirac canaries, each in the data with probability 1/2; every iterate is read.

    Variants: "correct" (Poisson, q < 1); "shuffled_batches" (fit's fixed-size shuffled batches,
    approximate=True: the ledger is fed q as if Poisson, Chua et al. 2024); "ledger_half_steps"
    (Poisson run, a ledger subclass that records half of the steps). The claim is the run's
    ledger epsilon. Release y_tj = -(w_t - w_{t-1})_j (q m/2) / (lr C) ~ 1[j in batch t] + N(0, sigma^2)
    (scaled by the public m/2, not the realised n: within about 1/sqrt(m) of that).
    """
    if variant not in MECHANISM_VARIANTS["dpsgd_run"]:
        raise UserError(f"unknown dpsgd_run variant {variant!r}; use {MECHANISM_VARIANTS['dpsgd_run']}")
    if not 0 < sample_rate < 1:
        raise UserError(f"the whole-run audit needs subsampling, 0 < q < 1; got {sample_rate!r}")
    t0 = time.perf_counter()
    m = int(canaries)
    members = _members(m, seed)
    idx = torch.as_tensor(np.flatnonzero(members), dtype=torch.long)
    n = len(idx)
    torch.manual_seed(seed)
    model = torch.nn.Embedding(m, 1).double()
    torch.nn.init.zeros_(model.weight)
    iterates = [model.weight.detach()[:, 0].clone()]

    def record(info):
        iterates.append(info.model.weight.detach()[:, 0].clone())

    ledger = (_HalfLedger if variant == "ledger_half_steps" else accounting.PrivacyLedger)(
        delta=delta, n=n, accountant=accountant)
    shuffled = variant == "shuffled_batches"
    batching = BatchSpec(steps=int(steps), sample_rate=sample_rate, sampling="shuffle" if shuffled else "poisson",
                         approximate=shuffled)
    res = fit(model, (idx, torch.zeros(n, dtype=torch.long)), batching=batching,
              privacy=PrivacySpec(noise_multiplier=noise_multiplier, delta=delta, accountant=accountant, ledger=ledger),
              clipping=ClipSpec(max_grad_norm=max_grad_norm, method=method),
              optim=OptimSpec("sgd", lr, loss_fn=_dirac_loss(1e3 * max_grad_norm)),
              evaluation=EvalSpec(every=None, progress=False), hooks=[record], seed=seed)
    w = torch.stack(iterates).numpy()
    q, sigma, T = float(res.sample_rate), float(noise_multiplier), int(steps)
    # Undo the optimizer's 1/(q n) with the PUBLIC constant q m / 2 (the expected n), not the
    # realised n, which depends on the memberships: a score must be a function of the release.
    y = -(w[1:] - w[:-1]) * (q * m / 2) / (lr * max_grad_norm)
    batches = max(1, int(round(1 / q)))
    claim = float(ledger.epsilon())
    if variant == "correct":
        true, rel = claim, "="
    elif variant == "ledger_half_steps":
        true, rel = float(accounting.epsilon(sigma, q, T, delta, accountant)), "="
    else:  # one epoch's max-test bound (more epochs only add)
        true, rel = shuffle_max_test_epsilon(sigma, batches, delta), ">="

    def model_scores(k, rng):
        incl = rng.random((T, k)) < q
        y_in = incl + sigma * rng.normal(size=(T, k))
        y_out = sigma * rng.normal(size=(T, k))
        return _poisson_lr(y_in, q, sigma), _poisson_lr(y_out, q, sigma)

    return CanaryAudit("dpsgd_run", variant, "all_iterates", claim, true, delta, members,
                       _dpsgd_scores(y, q, sigma, batches), independent=not shuffled, true_relation=rel,
                       model_scores=None if shuffled else model_scores, seconds=time.perf_counter() - t0,
                       settings={"q": q, "steps": T, "sigma": sigma, "canaries": m},
                       simulate_up_to=max(1000, 4_000_000 // T))


# ---------------------------------------------------------------------------- adaptive clipping's counts


def audit_adaptive_counts(variant: str = "correct", *, trials: int = 20_000, noise_multiplier: float = 2.0,
                          count_fraction: float = 0.5, n_clean: int = 16, delta: float = 1e-5,
                          seed: int = 0) -> CanaryAudit:
    """The K noisy centred counts that `AdaptiveClipping.update` releases for one batch.

    A per-layer `ClippingEngine` on a small MLP gives the clean examples' per-sample norms;
    the canary has a zero gradient (norm 0 <= every threshold), so when included it adds 1/2
    to each of the K centred counts. Each trial resets the thresholds and calls the real
    `update`; the score is sum_k (released fraction_k - clean fraction_k) E[B] (the adversary
    knows the clean norms). Claim: one full-batch step with the accounted sigma (gradient and
    counts together). Fault "unnoised_counts": the tracker's count noise replaced by zeros (a
    monkeypatch on the instance), true epsilon infinite.
    """
    if variant not in MECHANISM_VARIANTS["adaptive_counts"]:
        raise UserError(f"unknown adaptive_counts variant {variant!r}")
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).double()
    x = torch.randn(n_clean, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n_clean,), generator=g)
    engine = ClippingEngine(model, max_grad_norm=1.0, style="layer")
    try:
        losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
        clean = {k: v.detach().clone() for k, v in engine.backward(losses).items()}
        for p in model.parameters():
            p.grad = None
        start = dict(engine.thresholds)
        expected = float(n_clean + 1)  # q = 1 on n_clean + 1 examples: a public constant
        tracker = AdaptiveClipping(engine, noise_multiplier, expected, count_fraction=count_fraction, seed=seed + 5)
        if variant == "unnoised_counts":  # FAULT: planted on this instance only
            tracker._count_noise = lambda: {grp: 0.0 for grp in tracker.groups}
        with_canary = {k: torch.cat([v, torch.zeros(1, dtype=v.dtype)]) for k, v in clean.items()}
        base = {k: centered_count(v.float(), start[k]) for k, v in clean.items()}
        members = _members(trials, seed)
        scores = np.empty(int(trials))
        for i, member in enumerate(members):
            engine.set_thresholds(start)
            tracker.update(with_canary if member else clean)
            frac = tracker.history[-1]["fractions"]
            scores[i] = sum((frac[k] - 0.5) * expected - base[k] for k in frac)
            tracker.history.pop()
        engine.set_thresholds(start)
    finally:
        engine.remove()
    K, sigma_b = len(start), tracker.sigma_b
    claim = float(accounting.gaussian_mechanism_epsilon(noise_multiplier, delta))
    true = claim if variant == "correct" else math.inf
    mu = math.sqrt(K) / (2 * sigma_b)

    def model_scores(k, rng):
        return mu + rng.normal(size=k), rng.normal(size=k)

    return CanaryAudit("adaptive_counts", variant, "counts", claim, true, delta, members, {"count_sum": scores},
                       model_scores=model_scores, seconds=time.perf_counter() - t0,
                       settings={"groups": K, "sigma": noise_multiplier, "sigma_b": sigma_b,
                                 "count_fraction": count_fraction, "counts_only_epsilon": gaussian_epsilon(mu, delta)})


# ---------------------------------------------------------------------------- linear solvers


@contextlib.contextmanager
def _capture_psd(linear_module):
    """Record every (input, output) of `linear.project_psd` during a solver call.

    The input is the released noisy symmetric statistic (statistic + symmetric Gaussian
    noise); the projection is post-processing. Monkeypatch of the module attribute for the
    duration of the call only (the solvers look it up at call time)."""
    real = linear_module.project_psd
    seen = []

    def spy(m, *a, **k):
        out = real(m, *a, **k)
        seen.append((m.detach().clone(), out.detach().clone()))
        return out

    linear_module.project_psd = spy
    try:
        yield seen
    finally:
        linear_module.project_psd = real


def _faulty_least_squares(linear, x, y, num_classes, *, epsilon, delta, clip_norm, alpha, lam, seed):
    """FAULT (audit only): DP least squares from linear.py's public building blocks, with the
    two matrix releases calibrated to sensitivity C instead of C^2 (noise s*C, not s*C^2)."""
    x = linear.clip_features(torch.as_tensor(x, dtype=torch.float64), clip_norm)
    n, d = x.shape
    mat = linear.MAT
    yy = linear.one_hot(y, num_classes, torch.float64)
    gram = (x.T @ x).to(mat)
    per_class = torch.stack([x[y == c].T @ x[y == c] for c in range(num_classes)]).to(mat)
    sums = (yy.T @ x).to(mat)
    s_g, s_a, s_b = linear.calibrate_releases(epsilon, delta, (1.0, 1.0, 1.0), "pld")
    gen = torch.Generator().manual_seed(int(seed))
    wrong = clip_norm  # should be clip_norm ** 2
    gram_n = linear.project_psd(gram + linear.symmetric_gaussian_noise(d, s_g * wrong, gen, dtype=mat))
    per_class_n = linear.project_psd(per_class + linear.symmetric_gaussian_noise(d, s_a * wrong, gen, dtype=mat,
                                                                                batch=(num_classes,)))
    sums_n = sums + torch.randn(sums.shape, generator=gen, dtype=mat) * s_b * clip_norm
    a = per_class_n + alpha * gram_n + lam * torch.eye(d, dtype=mat)
    theta = torch.linalg.solve(a, sums_n.unsqueeze(-1)).squeeze(-1)
    return theta, {"gram": s_g, "class_gram": s_a, "class_sum": s_b}, lam


def audit_linear(solver: str = "least_squares", variant: str = "correct", *, trials: int = 4000,
                 epsilon: float = 1.0, delta: float = 1e-5, clip_norm: float = 4.0, n_clean: int = 12, d: int = 4,
                 num_classes: int = 2, seed: int = 0) -> CanaryAudit:
    """DP least squares / DP Newton (1 step) / DP-FC (1 step) with a canary (x_c, label 0).

    x_c has norm `clip_norm` along a fixed direction u. Per trial the solver runs on the clean
    data plus (if a member) the canary, with a fresh noise seed. Observed: the released noisy
    matrices (via `_capture_psd`) and the released head, from which the noisy vector release
    is recovered exactly (b_l = (A_l + alpha G + ridge I) theta_l for least squares; the
    gradient from one Newton / DP-FC step). Scores: each release's shift along the canary
    (u'(M - M_clean)u, u.(v - v_clean)) over its claimed noise std, summed ("all"), and the
    matrices or vectors alone. Fault "sensitivity_c" (least squares): true epsilon from the
    actual multipliers s/C (matrices) and s (vector), composed.
    """
    if solver not in ("least_squares", "newton", "dp_fc") or variant not in MECHANISM_VARIANTS[solver]:
        raise UserError(f"unknown linear audit {solver!r}/{variant!r}; see MECHANISM_VARIANTS")
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    C = float(clip_norm)
    x = torch.randn(n_clean, d, generator=g, dtype=torch.float64)
    x = linear.clip_features(x * (0.5 * C / math.sqrt(d)), C)
    y = torch.randint(0, num_classes, (n_clean,), generator=g)
    u = torch.zeros(d, dtype=torch.float64)
    u[0] = 1.0
    x_c, y_c = C * u, 0
    members = _members(trials, seed)
    names = ("matrices", "vector")
    raw = {k: np.empty(int(trials)) for k in names}
    L = num_classes
    for i, member in enumerate(members):
        xs = torch.cat([x, x_c[None]]) if member else x
        ys = torch.cat([y, torch.tensor([y_c])]) if member else y
        s = int(seed) * 1_000_003 + i
        with _capture_psd(linear) as seen:
            if solver == "least_squares" and variant == "sensitivity_c":
                theta, sig, ridge = _faulty_least_squares(linear, xs, ys, L, epsilon=epsilon, delta=delta,
                                                          clip_norm=C, alpha=2.0, lam=3e-4, seed=s)
                info = {"alpha": 2.0}
            elif solver == "least_squares":
                res = linear.dp_least_squares(xs, ys, L, epsilon=epsilon, delta=delta, clip_norm=C, seed=s,
                                              dtype=torch.float64)
                theta, sig, ridge, info = res.weights, res.noise_multipliers, res.info["ridge"], res.info
            elif solver == "newton":
                res = linear.dp_newton(xs, ys, L, epsilon=epsilon, delta=delta, clip_norm=C, steps=1, seed=s,
                                       dtype=torch.float64)
                theta, sig, ridge, info = res.weights, res.noise_multipliers, res.info["ridge"], res.info
            else:
                res = linear.dp_fc(xs, ys, L, epsilon=epsilon, delta=delta, clip_norm=C, steps=1, seed=s,
                                   dtype=torch.float64, cg_tol=1e-12)
                theta, sig, ridge, info = res.weights, res.noise_multipliers, res.info["ridge"], res.info
        eye = torch.eye(d, dtype=torch.float64)
        if solver == "least_squares":
            (g_in, g_out), (a_in, a_out) = seen
            b = ((a_out + info["alpha"] * g_out + ridge * eye) @ theta.unsqueeze(-1)).squeeze(-1)
            z_g = float(u @ (g_in - x.T @ x) @ u) / (sig["gram"] * C**2)
            a_clean = x[y == y_c].T @ x[y == y_c]
            z_a = float(u @ (a_in[y_c] - a_clean) @ u) / (sig["class_gram"] * C**2)
            z_b = float(u @ (b[y_c] - x[y == y_c].sum(0))) / (sig["class_sum"] * C)
            raw["matrices"][i], raw["vector"][i] = z_g + z_a, z_b
        elif solver == "newton":
            ((h_in, h_out),) = seen
            h_std = sig["hessian"] * math.sqrt(L) * C**2 / 4
            g_std = sig["gradient"] * math.sqrt(L) * C
            grad = -((h_out + ridge * eye) @ theta.unsqueeze(-1)).squeeze(-1) / info["lr"]  # w0 = 0, bias 0
            yy = linear.one_hot(y, L, torch.float64)
            h_clean = 0.25 * x.T @ x
            g_clean = (0.5 - yy).T @ x
            sign = torch.tensor([-1.0 if l == y_c else 1.0 for l in range(L)], dtype=torch.float64)  # 0.5 - y_l
            raw["matrices"][i] = sum(float(u @ (h_in[l] - h_clean) @ u) for l in range(L)) / h_std
            raw["vector"][i] = float(sign @ ((grad - g_clean) @ u)) / g_std
        else:
            ((f_in, f_out),) = seen
            lr, bias = info["lr"], info["bias"]
            grad = ((f_out + ridge * eye) @ (-theta.T / lr)).T  # w1 = -lr (F + ridge)^-1 g
            yy = linear.one_hot(y, L, torch.float64)
            resid = torch.sigmoid(torch.full((n_clean, L), bias, dtype=torch.float64)) - yy
            g_clean = linear.clipped_gradient_sum(x, resid, C)[0]
            p = 1 / (1 + math.exp(-bias))
            sign = torch.tensor([p - 1.0 if l == y_c else p for l in range(L)], dtype=torch.float64)
            raw["matrices"][i] = float(u @ (f_in - x.T @ x) @ u) / (sig["covariance"] * C**2)
            raw["vector"][i] = float(sign @ ((grad - g_clean) @ u)) / (sig["gradient"] * C * float(sign.norm()))
    # claimed multipliers and the shift of each normalised score for a member
    if solver == "least_squares":
        s = sig["gram"]
        mu_m, mu_v = math.sqrt(2) / s, 1 / s  # two matrices (sum of two unit-variance z) and one vector
        scores = {"matrices": raw["matrices"] / math.sqrt(2), "vector": raw["vector"]}
        sig_list = [sig["gram"], sig["class_gram"], sig["class_sum"]]
    elif solver == "newton":
        s = sig["hessian"]
        mu_m, mu_v = 1 / s, 0.5 / s
        scores = {"matrices": raw["matrices"] / math.sqrt(L), "vector": raw["vector"] / math.sqrt(L)}
        sig_list = [s, s]
    else:
        mu_m, mu_v = 1 / sig["covariance"], 1 / sig["gradient"]
        scores = {"matrices": raw["matrices"], "vector": raw["vector"]}
        sig_list = [sig["covariance"], sig["gradient"]]
    scores["all"] = (mu_m * scores["matrices"] + mu_v * scores["vector"]) / math.hypot(mu_m, mu_v)
    claim = float(linear.composition_epsilon(sig_list, delta, "pld"))
    if variant == "sensitivity_c":
        true_list = [sig_list[0] / C, sig_list[1] / C, sig_list[2]]
        true = float(linear.composition_epsilon(true_list, delta, "pld"))
        mu_true = math.sqrt(sum(1 / v**2 for v in true_list))
    else:
        true, mu_true = claim, math.hypot(mu_m, mu_v)

    def model_scores(k, rng):
        return mu_true + rng.normal(size=k), rng.normal(size=k)

    return CanaryAudit(solver, variant, "statistics", claim, true, delta, members, scores,
                       model_scores=model_scores, seconds=time.perf_counter() - t0,
                       settings={"clip_norm": C, "epsilon_target": epsilon, "n_clean": n_clean, "d": d})


# ---------------------------------------------------------------------------- per-device (pipeline) noise


class _DiracStages(torch.nn.Module):
    """K stages, each an embedding over the canaries: canary j's gradient is e_j on every stage."""

    def __init__(self, m: int, stages: int):
        super().__init__()
        self.stages = torch.nn.ModuleList(torch.nn.Embedding(m, 1).double() for _ in range(stages))
        for s in self.stages:
            torch.nn.init.zeros_(s.weight)

    def forward(self, idx):
        return sum(s(idx) for s in self.stages)


def _stage_of(name: str) -> str:
    return f"stage{name.split('.')[1]}"


def audit_pipeline_noise(variant: str = "correct", *, canaries: int = 20_000, stages: int = 4,
                         noise_multiplier: float = 3.0, max_grad_norm: float = 1.0, lr: float = 1.0,
                         delta: float = 1e-5, seed: int = 0) -> CanaryAudit:
    """Per-device clipping with K equal stages, simulated in one process (as
    `dpbench.training.pipeline` documents: equal to one process with style="device").

    A real `ClippingEngine(style="device")` clips each stage's block to C_k = C/sqrt(K) and the
    real `DPOptimizer` adds N(0, sigma^2 C_total^2) to every coordinate (what each PipelineDP
    stage adds). One full-batch step; canary j's released stage coordinates are summed.
    Fault "per_stage_sigma_ck": a DPOptimizer subclass adding sigma*C_k per stage, i.e. the
    effective multiplier sigma/sqrt(K).
    """
    if variant not in MECHANISM_VARIANTS["pipeline_noise"]:
        raise UserError(f"unknown pipeline_noise variant {variant!r}")
    t0 = time.perf_counter()
    m, K, C = int(canaries), int(stages), float(max_grad_norm)
    members = _members(m, seed)
    idx = torch.as_tensor(np.flatnonzero(members), dtype=torch.long)
    model = _DiracStages(m, K)
    placement = {name: _stage_of(name) for name, _ in model.named_parameters()}
    ck = C / math.sqrt(K)
    # ghost norms: exact for embeddings and never instantiate a (batch x canaries) gradient
    engine = ClippingEngine(model, max_grad_norm=C, method="ghost", style="device", placement=placement,
                            thresholds={f"stage{k}": ck for k in range(K)})

    class _PerStageNoise(DPOptimizer):
        """FAULT (audit only): noise sigma * C_k on stage k instead of sigma * C_total."""

        def add_noise(self):
            self._fill_missing_grads()
            gen = self._generator(torch.device("cpu"))
            for (name, p) in model.named_parameters():
                std = self.noise_multiplier * engine.thresholds[_stage_of(name)]
                p.grad.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype), alpha=std)
            for p in self.params:
                p.grad.div_(self.expected_batch_size)

    try:
        inner = torch.optim.SGD(engine.trainable_parameters(), lr=lr)
        cls = _PerStageNoise if variant == "per_stage_sigma_ck" else DPOptimizer
        expected = float(len(idx))  # q = 1
        opt = cls(inner, engine, noise_multiplier, expected, seed=seed + 11, audit=True)
        opt.zero_grad()
        opt.backward(1e3 * C * model(idx)[:, 0])
        opt.step()
    finally:
        engine.remove()
    w = torch.stack([s.weight.detach()[:, 0] for s in model.stages]).numpy()  # (K, m)
    y = -w * (m / 2) / (lr * C)  # public scale m/2 ~ n: stage k gets C_k/C * 1[member] + N(0, sigma^2)
    score = y.sum(0) / math.sqrt(K)  # mean 1 for a member, noise std sigma (correct)
    claim = float(accounting.gaussian_mechanism_epsilon(noise_multiplier, delta))
    sig_true = noise_multiplier if variant == "correct" else noise_multiplier / math.sqrt(K)
    true = float(accounting.gaussian_mechanism_epsilon(sig_true, delta))

    def model_scores(k, rng):
        return (1 + sig_true * rng.normal(size=k)), sig_true * rng.normal(size=k)

    return CanaryAudit("pipeline_noise", variant, "one_step_sum", claim, true, delta, members, {"sum": score},
                       model_scores=model_scores, seconds=time.perf_counter() - t0,
                       settings={"stages": K, "sigma": noise_multiplier, "canaries": m})


# ---------------------------------------------------------------------------- data-parallel noise (gloo)


def _dp_worker(rank: int, world: int, port: int, out_path: str, variants: Sequence[str], canaries: int,
               noise_multiplier: float, max_grad_norm: float, lr: float, seed: int) -> None:
    """One rank: joins ONE gloo group, runs one full-batch step per variant, rank 0 saves releases."""
    import torch.distributed as dist


    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)

    class _NoRankNoise(DistributedDPOptimizer):
        """FAULT (audit only): every rank assumes another adds the noise."""

        @property
        def noise_share_std(self):
            return 0.0

    class _SharesOverW2(DistributedDPOptimizer):
        """FAULT (audit only): shares of std sigma C / W (variance / W^2) instead of / sqrt(W)."""

        @property
        def noise_share_std(self):
            return self.noise_std / self.distributed.world_size

    class _FullOnEveryRank(DistributedDPOptimizer):
        """OVER-NOISING (audit only): every rank adds the full sigma C."""

        @property
        def noise_share_std(self):
            return self.noise_std

    try:
        out = {}
        members = _members(canaries, seed)
        idx = torch.as_tensor(np.flatnonzero(members), dtype=torch.long)
        for v in variants:
            mode = "shares" if v in ("correct_shares", "shares_var_over_w2", "overnoise_every_rank") else "rank0"
            group = DataParallel(noise=mode)
            cls = {"no_rank_noise": _NoRankNoise, "shares_var_over_w2": _SharesOverW2,
                   "overnoise_every_rank": _FullOnEveryRank}.get(v, DistributedDPOptimizer)
            model = torch.nn.Embedding(canaries, 1).double()
            torch.nn.init.zeros_(model.weight)
            engine = ClippingEngine(model, max_grad_norm=max_grad_norm, method="ghost")  # no (B x m) per-sample grads
            try:
                inner = torch.optim.SGD(engine.trainable_parameters(), lr=lr)
                opt = cls(inner, engine, noise_multiplier, float(len(idx)), distributed=group, seed=seed + 13)
                rows = idx[PoissonSampler(len(idx), 1.0, 1, seed=seed, rank=rank, world_size=world).batch(0)]
                opt.zero_grad()
                opt.backward(1e3 * max_grad_norm * model(rows)[:, 0])
                opt.step()
            finally:
                engine.remove()
            out[v] = -model.weight.detach()[:, 0].numpy() * (canaries / 2) / (lr * max_grad_norm)  # public scale
        if rank == 0:
            np.savez(out_path, **out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def audit_data_parallel(variants: Sequence[str] = MECHANISM_VARIANTS["data_parallel"], *, canaries: int = 20_000,
                        world_size: int = 2, noise_multiplier: float = 3.0, max_grad_norm: float = 1.0,
                        lr: float = 1.0, delta: float = 1e-5, seed: int = 0) -> list[CanaryAudit]:
    """Data-parallel noise on `world_size` gloo ranks (one persistent group for all variants).

    Each rank holds its share of the Dirac canaries (the real rank split of `PoissonSampler`),
    clips with its own `ClippingEngine`; `DistributedDPOptimizer` adds its noise share and
    all-reduces. One full-batch step per variant. Faults are optimizer subclasses with the
    wrong share: none at all ("no_rank_noise", true epsilon infinite) or std sigma C / W
    ("shares_var_over_w2": total variance sigma^2 C^2 / W, multiplier sigma / sqrt(W)).
    """
    import torch.multiprocessing as mp


    bad = [v for v in variants if v not in MECHANISM_VARIANTS["data_parallel"] + OVER_NOISING["data_parallel"]]
    if bad:
        raise UserError(f"unknown data_parallel variants {bad}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "releases.npz")
        mp.start_processes(_dp_worker, args=(world_size, free_port(), path, list(variants), int(canaries),
                                             float(noise_multiplier), float(max_grad_norm), float(lr), int(seed)),
                           nprocs=world_size, join=True, start_method="spawn")
        with np.load(path) as f:
            releases = {k: f[k] for k in f.files}
    members = _members(canaries, seed)
    seconds = (time.perf_counter() - t0) / len(variants)
    claim = float(accounting.gaussian_mechanism_epsilon(noise_multiplier, delta))
    out = []
    for v in variants:
        sig_true = {"no_rank_noise": 0.0, "shares_var_over_w2": noise_multiplier / math.sqrt(world_size),
                    "overnoise_every_rank": noise_multiplier * math.sqrt(world_size)}.get(v, noise_multiplier)
        true = math.inf if sig_true == 0 else float(accounting.gaussian_mechanism_epsilon(sig_true, delta))

        def model_scores(k, rng, s=sig_true):
            return 1 + s * rng.normal(size=k), s * rng.normal(size=k)

        out.append(CanaryAudit("data_parallel", v, "one_step_sum", claim, true, delta, members,
                               {"coordinate": releases[v]}, model_scores=model_scores, seconds=seconds,
                               settings={"world_size": world_size, "sigma": noise_multiplier, "canaries": canaries}))
    return out


# ---------------------------------------------------------------------------- all of them


def run_mechanism_audits(*, include: Sequence[str] = tuple(MECHANISM_VARIANTS), run_canaries: int = 20_000,
                         run_steps: int = 10, run_sample_rate: float = 0.1, run_sigma: float = 1.0,
                         noise_canaries: int = 50_000, distributed_sigma: float = 2.0, stages: int = 4,
                         count_trials: int = 20_000, linear_trials: int = 3000, linear_epsilon: float = 2.0,
                         clip_norm: float = 4.0, delta: float = 1e-5, seed: int = 0,
                         progress: bool = False) -> list[CanaryAudit]:
    """Every variant (MECHANISM_VARIANTS) of every mechanism in `include`, at these sizes.

    run_*: the whole DP-SGD run (Dirac canaries, steps, q, sigma); noise_canaries and
    distributed_sigma: the pipeline and data-parallel one-step audits; count_trials: adaptive
    counts; linear_trials, linear_epsilon, clip_norm: the three last-layer solvers.
    """
    from tqdm.auto import tqdm

    if int(run_steps) > 20:
        raise UserError(f"run_steps={run_steps!r}: audited runs take at most 20 steps (the notebook's budget)")
    jobs: list[tuple[str, Callable[[], Any]]] = []
    for mech in include:
        if mech not in MECHANISM_VARIANTS:
            raise UserError(f"unknown mechanism {mech!r}; use {list(MECHANISM_VARIANTS)}")
        if mech == "data_parallel":
            jobs.append((mech, lambda: audit_data_parallel(canaries=noise_canaries, noise_multiplier=distributed_sigma,
                                                           delta=delta, seed=seed)))
            continue
        for v in MECHANISM_VARIANTS[mech]:
            if mech == "dpsgd_run":
                job = (lambda v=v: audit_dpsgd_run(v, canaries=run_canaries, sample_rate=run_sample_rate,
                                                   steps=run_steps, noise_multiplier=run_sigma, delta=delta, seed=seed))
            elif mech == "adaptive_counts":
                job = (lambda v=v: audit_adaptive_counts(v, trials=count_trials, delta=delta, seed=seed))
            elif mech in ("least_squares", "newton", "dp_fc"):
                job = (lambda v=v, m=mech: audit_linear(m, v, trials=linear_trials, epsilon=linear_epsilon,
                                                        clip_norm=clip_norm, delta=delta, seed=seed))
            else:
                job = (lambda v=v: audit_pipeline_noise(v, canaries=noise_canaries, stages=stages,
                                                        noise_multiplier=distributed_sigma, delta=delta, seed=seed))
            jobs.append((f"{mech}/{v}", job))
    out: list[CanaryAudit] = []
    for _, job in tqdm(jobs, desc="mechanism audits", disable=not progress):
        r = job()
        out.extend(r if isinstance(r, list) else [r])
    return out
