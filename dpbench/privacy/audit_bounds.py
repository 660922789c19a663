"""Empirical privacy auditing: lower bounds on epsilon from membership-inference trials.

An (epsilon, delta)-DP mechanism limits every membership test: with false positive rate
FPR and false negative rate FNR, FPR + e^eps FNR >= 1 - delta and FNR + e^eps FPR >= 1 - delta
(add/remove adjacency, both directions). So upper confidence bounds on the two rates give
a lower bound on epsilon,

    eps_lb = max( log((1 - delta - FNR_ub) / FPR_ub), log((1 - delta - FPR_ub) / FNR_ub) ),

valid with probability >= `confidence` over the trials. If a library's claimed epsilon is
below eps_lb, the claim is false (or we were unlucky, with probability <= 1 - confidence).

Statistics (all here; scipy is imported inside the functions that use it):

- `clopper_pearson`: exact binomial confidence intervals. The two rates are bounded
  jointly by a union bound: each one-sided upper bound at level 1 - alpha/2, which is the
  upper end of the two-sided Clopper-Pearson interval at 1 - alpha. With zero errors this
  gives the trial-count ceiling `trial_ceiling`: a perfect attack certifies at most
  ~3.3 (100 trials per side), ~5.6 (1,000) and ~7.9 (10,000) at 95% confidence.
- `epsilon_lower_bound`: the many-trials bound. Choosing the threshold (and the score) on
  the same trials that certify the bound would overstate it, so by default the trials are
  split at random: the first part chooses (score, threshold), the held-out part certifies
  the bound at that one choice (no correction needed). Alternatively `selection=
  "bonferroni"` takes thresholds fixed before seeing the scores and divides alpha by
  their number (times the number of scores).
- `one_run_epsilon` / `one_run_audit`: Steinke, Nasr and Jagielski (2023), "Privacy
  auditing with one (1) training run". m canaries are each included independently with
  probability 1/2; the auditor guesses r of them (abstaining on the rest) and v guesses
  are right. Under (eps, 0)-DP, v is stochastically dominated by Binomial(r, e^eps / (1 +
  e^eps)) (their Theorem 3.1 / Proposition 5.1); for (eps, delta)-DP the tail gains a term
  2 m delta max_{1<=i<=v} P[v - i <= Binomial(r, p) < v] / i (their Theorem 5.2, which is
  what their published reference code computes). The pure-DP bound is the Clopper-Pearson
  lower bound on the success probability, mapped through logit. The number of guesses is
  chosen from a grid fixed in advance, with a Bonferroni correction over the grid.

Canaries and the mechanism-level audit runner (real `ClippingEngine` + `DPOptimizer` in
the loop) live in `dpbench.training.audit_runs`, which feeds its scores to these bounds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from dpbench.errors import UserError
from dpbench.privacy import accounting

__all__ = [
    "AuditBound",
    "clopper_pearson",
    "epsilon_from_rates",
    "epsilon_from_counts",
    "trial_ceiling",
    "epsilon_lower_bound",
    "one_run_p_value",
    "one_run_epsilon",
    "one_run_audit",
    "roc_curve",
    "gaussian_epsilon",
    "shuffle_max_test_epsilon",
    "projected_trials",
    "simulated_trials",
]


# ---------------------------------------------------------------------------- validation


def _check_confidence(confidence: float) -> float:
    c = float(confidence)
    if not 0.0 < c < 1.0:
        raise UserError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence!r}")
    return c


def _check_delta(delta: float) -> float:
    d = float(delta)
    if not 0.0 <= d < 1.0:
        raise UserError(f"delta must be in [0, 1), e.g. 1e-5; got {delta!r}")
    return d


# ---------------------------------------------------------------------------- Clopper-Pearson


def clopper_pearson(k, n, confidence: float = 0.95, side: str = "two-sided"):
    """Exact (Clopper-Pearson) confidence interval for a binomial proportion k / n.

    `side="two-sided"`: alpha/2 in each tail (e.g. 0 of 100 at 95% -> upper 0.0362);
    `"upper"`: a one-sided upper bound at level `confidence` (0 of 100 -> 0.0295), lower 0;
    `"lower"`: a one-sided lower bound, upper 1. Works elementwise on arrays.
    Returns (lower, upper) as floats or arrays.
    """
    from scipy.stats import beta

    c = _check_confidence(confidence)
    if side not in ("two-sided", "upper", "lower"):
        raise UserError(f"side must be 'two-sided', 'upper' or 'lower', got {side!r}")
    k = np.asarray(k, dtype=float)
    n = np.asarray(n, dtype=float)
    if np.any(n < 0) or np.any(k < 0) or np.any(k > n) or np.any(k != np.round(k)):
        raise UserError(f"need integer counts 0 <= k <= n, got k={k!r}, n={n!r}")
    alpha = 1.0 - c
    tail = alpha / 2 if side == "two-sided" else alpha
    with np.errstate(invalid="ignore", divide="ignore"):
        lo = np.where(k > 0, beta.ppf(tail, np.maximum(k, 1), n - k + 1), 0.0)
        hi = np.where(k < n, beta.ppf(1 - tail, k + 1, np.maximum(n - k, 1)), 1.0)
    if side == "upper":
        lo = np.zeros_like(hi)
    elif side == "lower":
        hi = np.ones_like(lo)
    if lo.ndim == 0:
        return float(lo), float(hi)
    return lo, hi


def _upper_bounds(k, n, alpha_each: float):
    """One-sided upper Clopper-Pearson bounds at level 1 - alpha_each, elementwise."""
    from scipy.stats import beta

    k = np.asarray(k, dtype=float)
    n = np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(k < n, beta.ppf(1 - alpha_each, k + 1, np.maximum(n - k, 1)), 1.0)


def epsilon_from_rates(fpr_ub, fnr_ub, delta: float = 0.0):
    """The epsilon lower bound implied by upper bounds on FPR and FNR (elementwise).

    max(log((1 - delta - FNR) / FPR), log((1 - delta - FPR) / FNR), 0); a bound whose
    numerator is <= 0 says nothing and counts as 0.
    """
    d = _check_delta(delta)
    fpr = np.asarray(fpr_ub, dtype=float)
    fnr = np.asarray(fnr_ub, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where((1 - d - fnr > 0), np.log(np.maximum(1 - d - fnr, 1e-300)) - np.log(fpr), 0.0)
        b = np.where((1 - d - fpr > 0), np.log(np.maximum(1 - d - fpr, 1e-300)) - np.log(fnr), 0.0)
    out = np.maximum(np.maximum(a, b), 0.0)
    return float(out) if out.ndim == 0 else out


def epsilon_from_counts(fp, n_out, fn, n_in, confidence: float = 0.95, delta: float = 0.0, comparisons: int = 1):
    """Epsilon lower bound from error counts of ONE pre-chosen test (elementwise).

    `fp` of `n_out` non-member trials were called members, `fn` of `n_in` member trials were
    missed. Both rates are bounded jointly at `confidence` (each at 1 - alpha/2, a union
    bound); `comparisons` > 1 divides alpha further (Bonferroni over tests fixed in advance).
    """
    c = _check_confidence(confidence)
    if int(comparisons) < 1:
        raise UserError(f"comparisons must be >= 1, got {comparisons!r}")
    alpha_each = (1 - c) / (2 * int(comparisons))
    return epsilon_from_rates(_upper_bounds(fp, n_out, alpha_each), _upper_bounds(fn, n_in, alpha_each), delta)


def trial_ceiling(n_in: int, n_out: int | None = None, confidence: float = 0.95, delta: float = 0.0) -> float:
    """The largest epsilon that `n_in` member and `n_out` non-member trials can certify.

    A perfect attack (no errors at all) gives FPR_ub = 1 - (alpha/2)^(1/n_out); no attack
    can certify more. At 95%: ~3.3 for 100 per side, ~5.6 for 1,000, ~7.9 for 10,000.
    """
    n_out = n_in if n_out is None else n_out
    if int(n_in) < 1 or int(n_out) < 1:
        raise UserError(f"need at least one trial per side, got n_in={n_in!r}, n_out={n_out!r}")
    return float(epsilon_from_counts(0, int(n_out), 0, int(n_in), confidence, delta))


# ---------------------------------------------------------------------------- many-trials bound


@dataclass
class AuditBound:
    """One certified lower bound on epsilon and how it was obtained.

    `epsilon` holds with probability >= `confidence` over the audit's randomness (the
    trials, and the split when `selection == "split"`). `ceiling` is the most that the
    certifying trials could have given (a perfect attack). Counts refer to the certifying
    trials only (the held-out part under a split).
    """

    epsilon: float
    confidence: float
    delta: float
    method: str  # "trials" or "one_run"
    selection: str  # "split", "bonferroni", "grid" (one-run)
    score: str = ""
    threshold: float = float("nan")
    n_in: int = 0
    n_out: int = 0
    fp: int = 0
    fn: int = 0
    fpr_ub: float = float("nan")
    fnr_ub: float = float("nan")
    guesses: int = 0  # one-run: r
    correct: int = 0  # one-run: v
    canaries: int = 0  # one-run: m
    ceiling: float = float("nan")
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_score_dict(scores) -> dict[str, np.ndarray]:
    if isinstance(scores, Mapping):
        out = {str(k): np.asarray(v, dtype=float).ravel() for k, v in scores.items()}
    else:
        out = {"score": np.asarray(scores, dtype=float).ravel()}
    if not out:
        raise UserError("no scores given; pass an array or a dict name -> array")
    return out


def _check_scores(scores: dict[str, np.ndarray], members) -> np.ndarray:
    m = np.asarray(members).astype(bool).ravel()
    for name, s in scores.items():
        if s.shape != m.shape:
            raise UserError(f"score {name!r} has {s.size} entries but members has {m.size}; give one score per trial")
        if not np.all(np.isfinite(s)):
            raise UserError(f"score {name!r} has non-finite values; replace them before auditing")
    if m.all() or not m.any():
        raise UserError("the audit needs both member and non-member trials")
    return m


def _counts(s_in: np.ndarray, s_out: np.ndarray, thresholds: np.ndarray):
    """Errors of the test 'member iff score >= t' at each threshold t."""
    s_in, s_out = np.sort(s_in), np.sort(s_out)
    fn = np.searchsorted(s_in, thresholds, side="left")  # members below t
    fp = s_out.size - np.searchsorted(s_out, thresholds, side="left")  # non-members at or above t
    return fp, fn


def _midpoints(values: np.ndarray, max_candidates: int | None = None) -> np.ndarray:
    """Candidate thresholds between consecutive distinct values, plus both ends.

    With more than `max_candidates` distinct values, the candidates are the values at a grid
    of quantiles plus the 256 most extreme values at each end (where epsilon bounds come from);
    any rule fixed before the certifying trials are seen keeps the bound valid."""
    u = np.unique(values)
    if max_candidates is not None and u.size > max_candidates:
        grid = np.quantile(u, np.linspace(0.0, 1.0, max_candidates))
        u = np.unique(np.concatenate([grid, u[:256], u[-256:]]))
    mids = (u[:-1] + u[1:]) / 2 if u.size > 1 else np.empty(0)
    return np.concatenate([[-np.inf], mids, [np.inf]])


def epsilon_lower_bound(
    scores,
    members,
    confidence: float = 0.95,
    delta: float = 0.0,
    *,
    selection: str = "split",
    split_fraction: float = 0.5,
    thresholds: Sequence[float] | None = None,
    seed: int = 0,
    max_candidates: int | None = 4096,
) -> AuditBound:
    """Many-trials lower bound on epsilon from membership scores (higher = more likely in).

    Args:
        scores: one score per trial (array), or a dict name -> array of several candidate
            score functions; the test is "member iff score >= threshold".
        members: bool per trial, True where the canary was included.
        confidence: probability that the returned bound is valid.
        delta: the delta of the claim being audited.
        selection: "split" (default): a random `split_fraction` of the trials chooses the
            score and threshold with the largest bound there; the other trials certify it.
            "bonferroni": `thresholds` fixed before seeing the scores; every (score,
            threshold) is evaluated on all trials with alpha divided by their number.
        seed: seed of the random split.
        max_candidates: "split" tries at most about this many thresholds on the selection part
            (quantiles plus both tails; None: every midpoint), for large trial counts.
    """
    c = _check_confidence(confidence)
    d = _check_delta(delta)
    sd = _as_score_dict(scores)
    m = _check_scores(sd, members)
    if selection == "split":
        if not 0.0 < split_fraction < 1.0:
            raise UserError(f"split_fraction must be in (0, 1), got {split_fraction!r}")
        rng = np.random.default_rng(seed)
        perm = rng.permutation(m.size)
        cut = int(round(split_fraction * m.size))
        sel, ev = perm[:cut], perm[cut:]
        if not (m[sel].any() and (~m[sel]).any() and m[ev].any() and (~m[ev]).any()):
            raise UserError("too few trials to split into a selection and a certification part; run more trials")
        best = (-1.0, None, None)
        for name, s in sd.items():
            s_in, s_out = s[sel][m[sel]], s[sel][~m[sel]]
            cand = _midpoints(s[sel], max_candidates)
            fp, fn = _counts(s_in, s_out, cand)
            eps = epsilon_from_counts(fp, s_out.size, fn, s_in.size, c, d)
            i = int(np.argmax(eps))
            if eps[i] > best[0]:
                best = (float(eps[i]), name, float(cand[i]))
        _, name, t = best
        s = sd[name]
        s_in, s_out = s[ev][m[ev]], s[ev][~m[ev]]
        fp, fn = _counts(s_in, s_out, np.array([t]))
        fp, fn = int(fp[0]), int(fn[0])
        alpha_each = (1 - c) / 2
        fpr_ub = float(_upper_bounds(fp, s_out.size, alpha_each))
        fnr_ub = float(_upper_bounds(fn, s_in.size, alpha_each))
        return AuditBound(
            epsilon=float(epsilon_from_rates(fpr_ub, fnr_ub, d)), confidence=c, delta=d, method="trials",
            selection="split", score=name, threshold=t, n_in=int(s_in.size), n_out=int(s_out.size), fp=fp, fn=fn,
            fpr_ub=fpr_ub, fnr_ub=fnr_ub, ceiling=trial_ceiling(s_in.size, s_out.size, c, d),
            extra={"selection_epsilon": best[0], "split_fraction": split_fraction},
        )
    if selection == "bonferroni":
        if thresholds is None or len(thresholds) == 0:
            raise UserError("selection='bonferroni' needs thresholds fixed before seeing the scores")
        ts = np.asarray(thresholds, dtype=float)
        k = ts.size * len(sd)
        best = None
        for name, s in sd.items():
            s_in, s_out = s[m], s[~m]
            fp, fn = _counts(s_in, s_out, ts)
            eps = epsilon_from_counts(fp, s_out.size, fn, s_in.size, c, d, comparisons=k)
            i = int(np.argmax(eps))
            if best is None or eps[i] > best.epsilon:
                alpha_each = (1 - c) / (2 * k)
                best = AuditBound(
                    epsilon=float(eps[i]), confidence=c, delta=d, method="trials", selection="bonferroni",
                    score=name, threshold=float(ts[i]), n_in=int(s_in.size), n_out=int(s_out.size),
                    fp=int(fp[i]), fn=int(fn[i]), fpr_ub=float(_upper_bounds(fp[i], s_out.size, alpha_each)),
                    fnr_ub=float(_upper_bounds(fn[i], s_in.size, alpha_each)),
                    ceiling=float(epsilon_from_counts(0, s_out.size, 0, s_in.size, c, d, comparisons=k)),
                    extra={"comparisons": k},
                )
        return best
    raise UserError(f"selection must be 'split' or 'bonferroni', got {selection!r}")


# ---------------------------------------------------------------------------- one run (Steinke et al. 2023)


def _check_guess_counts(m: int, r: int, v: int) -> tuple[int, int, int]:
    if not (int(m) == m and int(r) == r and int(v) == v and 0 <= v <= r <= m):
        raise UserError(f"need integers 0 <= correct <= guesses <= canaries, got v={v!r}, r={r!r}, m={m!r}")
    return int(m), int(r), int(v)


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float = 0.0) -> float:
    """P-value of >= v correct out of r guesses among m canaries under (epsilon, delta)-DP.

    Steinke, Nasr and Jagielski (2023): with p = e^eps / (1 + e^eps),
    P[W >= v] <= P[Binomial(r, p) >= v] + 2 m delta max_{1<=i<=v} P[v - i <= Binomial(r, p) < v] / i.
    """
    from scipy.stats import binom

    m, r, v = _check_guess_counts(m, r, v)
    d = _check_delta(delta)
    if epsilon < 0:
        raise UserError(f"epsilon must be >= 0, got {epsilon!r}")
    p = 1.0 / (1.0 + math.exp(-float(epsilon)))
    tail = float(binom.sf(v - 1, r, p))  # P[Bin >= v]
    if d == 0.0 or v == 0:
        return min(tail, 1.0)
    i = np.arange(1, v + 1)
    # P[v - i <= Bin <= v - 1] = cdf(v - 1) - cdf(v - i - 1)
    window = binom.cdf(v - 1, r, p) - binom.cdf(v - i - 1, r, p)
    return min(tail + 2.0 * m * d * float(np.max(window / i)), 1.0)


def one_run_epsilon(m: int, r: int, v: int, confidence: float = 0.95, delta: float = 0.0) -> float:
    """The largest epsilon that v correct of r guesses (m canaries) refute at `confidence`.

    delta == 0: closed form, logit of the one-sided Clopper-Pearson lower bound on the
    success probability. delta > 0: bisection on `one_run_p_value` (the p-value grows with
    epsilon). Never below 0.
    """
    from scipy.stats import beta

    m, r, v = _check_guess_counts(m, r, v)
    c = _check_confidence(confidence)
    d = _check_delta(delta)
    alpha = 1.0 - c
    if v == 0:
        return 0.0
    if d == 0.0:
        p_lb = float(beta.ppf(alpha, v, r - v + 1))
        return max(0.0, math.log(p_lb) - math.log1p(-p_lb)) if p_lb < 1 else math.inf
    if one_run_p_value(m, r, v, 0.0, d) > alpha:
        return 0.0
    from scipy.optimize import brentq

    lo, hi = 0.0, 1.0
    while one_run_p_value(m, r, v, hi, d) <= alpha:
        lo, hi = hi, 2 * hi
        if hi > 1e3:
            return math.inf
    # the p-value is continuous and increasing in epsilon: its crossing of alpha is the bound
    return float(brentq(lambda e: one_run_p_value(m, r, v, e, d) - alpha, lo, hi, xtol=1e-7))


DEFAULT_GUESS_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def _one_run_ceiling(n: int, n_in: int, fractions: Sequence[float], confidence: float, delta: float) -> float:
    """The best one-run bound a perfect attack could reach on these canaries: all guesses
    right, which needs the k top guesses to be members and the k bottom ones not."""
    best = 0.0
    for f in fractions:
        k = min(max(1, int(round(f * n / 2))), n // 2)
        if k <= min(n_in, n - n_in):
            best = max(best, one_run_epsilon(n, 2 * k, 2 * k, confidence, delta))
    return best


def one_run_audit(
    scores,
    members,
    confidence: float = 0.95,
    delta: float = 0.0,
    *,
    guess_fractions: Sequence[float] = DEFAULT_GUESS_FRACTIONS,
) -> AuditBound:
    """One-run bound from m canaries, each a member with probability 1/2 independently.

    For each score (an array, or a dict name -> array of candidate scores fixed in advance)
    and each fraction f of a grid fixed in advance, guess the round(f m / 2) highest scores
    "in" and as many lowest "out" (abstain on the rest). The best bound is returned, with
    alpha divided by (number of scores x grid size) (Bonferroni). Only valid when
    membership was drawn independently with probability 1/2 per canary, as the theorem
    assumes.
    """
    c = _check_confidence(confidence)
    d = _check_delta(delta)
    sd = _as_score_dict(scores)
    mem = _check_scores(sd, members)
    fr = [float(f) for f in guess_fractions]
    if not fr or any(not 0 < f <= 1 for f in fr):
        raise UserError(f"guess_fractions must be in (0, 1], got {guess_fractions!r}")
    n = mem.size
    c_each = 1 - (1 - c) / (len(fr) * len(sd))
    cands = []
    for name, s in sd.items():
        order = np.argsort(s, kind="stable")
        for f in fr:
            k = min(max(1, int(round(f * n / 2))), n // 2)
            low, high = order[:k], order[n - k:]
            v = int(mem[high].sum() + (~mem[low]).sum())
            # the pure-DP bound (closed form) is an upper bound on the delta > 0 one
            cands.append((one_run_epsilon(n, 2 * k, v, c_each, 0.0), name, f, 2 * k, v))
    cands.sort(key=lambda x: -x[0])
    best = None
    for pure, name, f, r, v in cands:
        if best is not None and pure <= best.epsilon:
            break  # no remaining candidate can beat the best
        eps = pure if d == 0.0 else one_run_epsilon(n, r, v, c_each, d)
        if best is None or eps > best.epsilon:
            best = AuditBound(epsilon=eps, confidence=c, delta=d, method="one_run", selection="grid", score=name,
                              guesses=r, correct=v, canaries=n,
                              ceiling=_one_run_ceiling(n, int(mem.sum()), fr, c_each, d),
                              extra={"grid": fr, "fraction": f, "comparisons": len(fr) * len(sd)})
    return best


# ---------------------------------------------------------------------------- ROC


def roc_curve(scores, members) -> tuple[np.ndarray, np.ndarray, float]:
    """ROC of the test "member iff score >= t" over all thresholds: (fpr, tpr, auc)."""
    sd = _as_score_dict(scores)
    mem = _check_scores(sd, members)
    (_, s), = list(sd.items())[:1]
    t = _midpoints(s)[::-1]  # from +inf down to -inf: rates rise from 0 to 1
    fp, fn = _counts(s[mem], s[~mem], t)
    fpr = fp / (~mem).sum()
    tpr = 1 - fn / mem.sum()
    auc = float(np.trapezoid(tpr, fpr)) if hasattr(np, "trapezoid") else float(np.trapz(tpr, fpr))
    return fpr, tpr, auc


# ---------------------------------------------------------------------------- analytic epsilons and projections


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon(delta) of one Gaussian mechanism whose output shifts by `mu` noise
    standard deviations (mu-GDP), through dp-accounting (`accounting.gaussian_mechanism_epsilon`
    with noise multiplier 1/mu); infinite for an infinite shift (no noise)."""
    mu = float(mu)
    if mu < 0:
        raise UserError(f"the shift mu must be >= 0, got {mu!r}")
    if math.isinf(mu):
        return math.inf
    if mu == 0.0:
        return 0.0
    return float(accounting.gaussian_mechanism_epsilon(1.0 / mu, _check_delta(delta)))


def shuffle_max_test_epsilon(noise_multiplier: float, batches: int, delta: float) -> float:
    """Chua et al. (2024) lower bound on epsilon of ONE epoch of shuffled fixed-size batches.

    With b batches per epoch, the differing example is in exactly one of them: the pair is
    P = (1/b) sum_t N(e_t / sigma, I_b) against Q = N(0, I_b) (outputs in units of the noise).
    The max over coordinates is a post-processing of both, so the epsilon(delta) of the
    1-D pair (max under P, max under Q) lower-bounds the epsilon of the shuffled mechanism.
    Computed by numerical integration of the hockey-stick divergence (both directions).
    """
    from scipy.optimize import brentq
    from scipy.stats import norm

    s, b, d = float(noise_multiplier), int(batches), _check_delta(delta)
    if s <= 0 or b < 1:
        raise UserError(f"need noise_multiplier > 0 and batches >= 1, got {noise_multiplier!r}, {batches!r}")
    mu = 1.0 / s
    x = np.linspace(-12.0, 12.0 + mu, 200_001)
    dx = x[1] - x[0]
    log_cdf = norm.logcdf(x)
    f_q = b * norm.pdf(x) * np.exp((b - 1) * log_cdf)
    f_p = norm.pdf(x - mu) * np.exp((b - 1) * log_cdf)
    if b > 1:
        f_p = f_p + (b - 1) * norm.pdf(x) * norm.cdf(x - mu) * np.exp((b - 2) * log_cdf)

    def hockey(e: float) -> float:
        w = math.exp(e)
        return max(float(np.sum(np.maximum(f_p - w * f_q, 0.0)) * dx), float(np.sum(np.maximum(f_q - w * f_p, 0.0)) * dx))

    if hockey(0.0) <= d:
        return 0.0
    hi = 1.0
    while hockey(hi) > d:
        hi *= 2.0
        if hi > 1e3:
            return math.inf
    return float(brentq(lambda e: hockey(e) - d, 0.0, hi, xtol=1e-6))


def projected_trials(scores_in: np.ndarray, scores_out: np.ndarray, claim: float, confidence: float = 0.95,
                     delta: float = 0.0, *, certify_fraction: float = 0.25, max_trials: int = 10**8) -> int | None:
    """Trials a many-trials audit would need for its bound to pass `claim` (a projection).

    `scores_in` / `scores_out`: large samples of the chosen score under the mechanism's
    analytic model (member / non-member). For N trials, each side of the certifying part
    holds about `certify_fraction` N trials (a 1/2 member rate and a 1/2 split); the expected
    error counts at every threshold go through the same Clopper-Pearson bound as the audit.
    Returns the smallest N on a doubling-then-bisection search whose best threshold beats
    the claim, or None when even `max_trials` does not (e.g. the model's own epsilon is at
    or below the claim). Thresholds are resolved only as far as the samples reach.
    """
    c = _check_confidence(confidence)
    d = _check_delta(delta)
    s_in, s_out = np.sort(np.asarray(scores_in, float)), np.sort(np.asarray(scores_out, float))
    ts = np.quantile(np.concatenate([s_in, s_out]), np.linspace(0.0005, 0.9995, 400))
    ts = np.unique(np.concatenate([ts, s_out[-50:]]))
    fnr = np.searchsorted(s_in, ts, side="left") / s_in.size
    fpr = (s_out.size - np.searchsorted(s_out, ts, side="left")) / s_out.size

    def bound(n: int) -> float:
        k = max(1, int(certify_fraction * n))
        return float(np.max(epsilon_from_counts(np.round(fpr * k), k, np.round(fnr * k), k, c, d)))

    n = 100
    while bound(n) <= claim:
        n *= 2
        if n > max_trials:
            return None
    lo, hi = n // 2, n
    while hi - lo > max(1, lo // 50):
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if bound(mid) > claim else (mid, hi)
    return int(hi)


def simulated_trials(draw, claim: float, confidence: float = 0.95, delta: float = 0.0, *, start: int = 1000,
                     max_trials: int = 1_000_000, reps: int = 3, seed: int = 0) -> int | None:
    """Trials the many-trials audit (`epsilon_lower_bound`, held-out split) needs to pass
    `claim`, by running it on simulated trials: `draw(k, rng)` returns k member and k
    non-member scores from the mechanism's analytic model. N doubles from `start`; the first N
    at which all of `reps` simulated audits exceed the claim is returned (within a factor 2; with
    3 reps, an audit of that size succeeds with probability about 0.8 or more), or None past
    `max_trials`. Unlike `projected_trials` this includes the cost of
    choosing the threshold on noisy data."""
    rng = np.random.default_rng(seed)
    n = int(start)
    while n <= max_trials:
        got = []
        for r in range(int(reps)):
            s_in, s_out = draw(n // 2, rng)
            members = np.concatenate([np.ones(s_in.size, bool), np.zeros(s_out.size, bool)])
            got.append(epsilon_lower_bound(np.concatenate([s_in, s_out]), members, confidence, delta,
                                           seed=seed + r).epsilon)
        if min(got) > claim:
            return n
        n *= 2
    return None
