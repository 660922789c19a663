"""Private hyperparameter selection: a random number of candidate runs, report the best.

A search over hyperparameters (learning rates, which layers to fine-tune, ...) that looks
at private data leaks privacy beyond any single run. Papernot & Steinke (ICLR 2022,
"Hyperparameter tuning with Renyi differential privacy", arXiv 2110.03620) bound that leak
when the NUMBER of candidate runs K is itself random: draw K, run K independent candidates
(each a DP algorithm Q that picks a random hyperparameter setting, trains and scores it),
output only the best one. With Q (lambda, eps(lambda))-RDP for every order lambda > 1:

- K ~ truncated negative binomial D_{eta,gamma} (their Theorem 2; eta > -1, 0 < gamma < 1;
  eta = 1 is geometric, eta = 0 logarithmic):
      eps'(lambda) = eps(lambda) + (1 + eta) (1 - 1/lhat) eps(lhat)
                     + (1 + eta) log(1/gamma) / lhat + log(E[K]) / (lambda - 1)
  for any order lhat >= 1 (we take the best lhat over the orders);
- K ~ Poisson(mu) (their Theorem 6): if Q is also (epshat, deltahat)-DP with
  e^epshat <= 1 + 1/(lambda - 1),
      eps'(lambda) = eps(lambda) + mu * deltahat + log(mu) / (lambda - 1);
  we take epshat = log(1 + 1/(lambda - 1)) and deltahat from Q's RDP curve.

RDP is non-decreasing in the order, so eps'(lambda) <= min over lambda' >= lambda of
eps'(lambda') (applied as a last step). The (eps, delta) guarantee then follows from the
RDP -> DP conversion of Canonne, Kamath & Steinke (2020, Prop. 12), the one
dp-accounting uses:  eps = min_lambda eps'(lambda) + log(1 - 1/lambda) - log(delta * lambda)/(lambda - 1).

The base curve eps(lambda) comes from dp-accounting's `RdpAccountant` over
`SELECTION_ORDERS` for any DpEvent (a DP-SGD run, plus e.g. the Gaussian
mechanism that privatises its validation score). Candidates must all be covered by that
one base event (every candidate run is calibrated to the same noise, rate and steps); a run
whose own ledger spends more is refused. dp-accounting's `RepeatAndSelectDpEvent` computes
the same bounds independently (for eta >= 0); the tests compare the two.

Adjacency is add/remove one example, as everywhere in dpbench.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from dpbench.errors import UserError
from dpbench.privacy import accounting
from dpbench.privacy.accounting import ADJACENCY, PrivacyLedger, check_delta

DISTRIBUTIONS = ("poisson", "truncated_negative_binomial")
BOUNDS = {
    "poisson": "Papernot & Steinke 2022, Theorem 6 (K ~ Poisson(mu))",
    "truncated_negative_binomial": "Papernot & Steinke 2022, Theorem 2 (K ~ truncated negative binomial D_{eta,gamma})",
}
CONVERSION = "RDP -> (eps, delta): Canonne, Kamath & Steinke 2020, Prop. 12"

# Orders for selection accounting: few fractional orders (each costs dp-accounting a slowly
# converging series for subsampled Gaussians), integers where the optimum usually sits, and
# a coarse tail for the small epshat of the Poisson bound. Any order set gives a valid
# bound; against dpbench.privacy.accounting.RDP_ORDERS (174 orders) this one changed the selection
# epsilon by < 0.1% in our checks and is ~20x faster, which matters inside calibration.
SELECTION_ORDERS = tuple([1.25, 1.5, 1.75] + list(range(2, 65)) + [80, 96, 128, 192, 256, 512])


# --------------------------------------------------------------------------- distributions


@dataclass(frozen=True)
class Repetitions:
    """The distribution of the number of candidate runs K.

    kind "poisson" (parameter mu > 0; K = 0 is possible and then nothing is output) or
    "truncated_negative_binomial" (eta > -1, 0 < gamma < 1; K >= 1). Build with
    `poisson(mu)`, `truncated_negative_binomial(eta, gamma)`, `geometric(gamma)` or
    `repetitions(kind, ...)`.
    """

    kind: str
    mu: float | None = None
    eta: float | None = None
    gamma: float | None = None

    def __post_init__(self) -> None:
        if self.kind == "poisson":
            if self.mu is None or not (self.mu > 0 and math.isfinite(self.mu)):
                raise UserError(f"Poisson repetitions need a mean mu > 0, got {self.mu!r}")
        elif self.kind == "truncated_negative_binomial":
            if self.eta is None or not (self.eta > -1 and math.isfinite(self.eta)):
                raise UserError(f"truncated negative binomial needs eta > -1, got {self.eta!r}")
            if self.gamma is None or not (0 < self.gamma < 1):
                raise UserError(f"truncated negative binomial needs 0 < gamma < 1, got {self.gamma!r}")
        else:
            raise UserError(f"unknown repetition distribution {self.kind!r}; choose one of: {', '.join(DISTRIBUTIONS)}")

    @property
    def mean(self) -> float:
        """E[K]: mu for Poisson; eta (1 - gamma) / (gamma (1 - gamma^eta)) for the truncated
        negative binomial ((1/gamma - 1) / log(1/gamma) when eta = 0)."""
        if self.kind == "poisson":
            return float(self.mu)
        eta, g = self.eta, self.gamma
        if eta == 0:
            return (1 / g - 1) / math.log(1 / g)
        return eta * (1 - g) / (g * -math.expm1(eta * math.log(g)))

    def pmf(self, k: int) -> float:
        """P[K = k]. Truncated negative binomial (their Definition 1), k >= 1:
        (1 - gamma)^k / (gamma^-eta - 1) * prod_{l=0}^{k-1} (l + eta)/(l + 1)
        (for eta = 0: (1 - gamma)^k / (k log(1/gamma)))."""
        k = int(k)
        if self.kind == "poisson":
            return 0.0 if k < 0 else math.exp(k * math.log(self.mu) - self.mu - math.lgamma(k + 1))
        if k < 1:
            return 0.0
        p = self._p1()
        for j in range(1, k):
            p *= (1 - self.gamma) * (j + self.eta) / (j + 1)
        return p

    def _p1(self) -> float:
        eta, g = self.eta, self.gamma
        if eta == 0:
            return (1 - g) / math.log(1 / g)
        return (1 - g) * eta / math.expm1(-eta * math.log(g))

    def sample(self, rng: np.random.Generator) -> int:
        """Draw K (inverse CDF for the truncated negative binomial)."""
        if self.kind == "poisson":
            return int(rng.poisson(self.mu))
        u = float(rng.random())
        k, p = 1, self._p1()
        cdf = p
        while cdf < u and p > 0:
            p *= (1 - self.gamma) * (k + self.eta) / (k + 1)
            k += 1
            cdf += p
            if k > 10_000_000:  # pragma: no cover - only for absurd parameters
                raise UserError("truncated negative binomial sample exceeded 1e7 runs; choose a larger gamma")
        return k

    def describe(self) -> dict[str, Any]:
        """JSON-ready parameters and mean."""
        d: dict[str, Any] = {"distribution": self.kind, "mean_runs": self.mean}
        if self.kind == "poisson":
            d["mu"] = self.mu
        else:
            d["eta"], d["gamma"] = self.eta, self.gamma
        return d


def poisson(mu: float) -> Repetitions:
    """K ~ Poisson(mu) (K = 0 is possible: then the selection outputs nothing)."""
    return Repetitions("poisson", mu=float(mu))


def truncated_negative_binomial(eta: float, gamma: float) -> Repetitions:
    """K ~ D_{eta,gamma}, the truncated negative binomial of Papernot & Steinke (K >= 1)."""
    return Repetitions("truncated_negative_binomial", eta=float(eta), gamma=float(gamma))


def geometric(gamma: float) -> Repetitions:
    """K ~ Geometric(gamma) on {1, 2, ...}: D_{1,gamma}, E[K] = 1/gamma."""
    return truncated_negative_binomial(1.0, gamma)


def repetitions(kind: str, *, mu: float | None = None, eta: float | None = None, gamma: float | None = None,
                mean: float | None = None) -> Repetitions:
    """A repetition distribution by name: "poisson" (mu, or mean), "geometric" (gamma, or
    mean = 1/gamma), "truncated_negative_binomial"/"tnb" (eta with gamma, or eta with mean)."""
    kind = {"tnb": "truncated_negative_binomial"}.get(kind, kind)
    if kind == "poisson":
        return poisson(mu if mu is not None else _need(mean, "mean or mu"))
    if kind == "geometric":
        return geometric(gamma if gamma is not None else 1 / _need(mean, "mean or gamma"))
    if kind == "truncated_negative_binomial":
        eta = _need(eta, "eta")
        if gamma is None:
            gamma = gamma_for_mean(eta, _need(mean, "mean or gamma"))
        return truncated_negative_binomial(eta, gamma)
    raise UserError(f"unknown repetition distribution {kind!r}; choose poisson, geometric or truncated_negative_binomial")


def _need(value, what):
    if value is None:
        raise UserError(f"give {what} for this repetition distribution")
    return float(value)


def gamma_for_mean(eta: float, mean: float) -> float:
    """The gamma giving E[K] = mean for the truncated negative binomial with shape eta
    (bisection; E[K] decreases in gamma from infinity to 1)."""
    if not mean > 1:
        raise UserError(f"the mean number of runs must be > 1, got {mean!r}")
    lo, hi = 1e-12, 1 - 1e-12
    for _ in range(200):
        mid = math.sqrt(lo * hi) if hi / lo > 4 else (lo + hi) / 2
        if truncated_negative_binomial(eta, mid).mean > mean:
            lo = mid
        else:
            hi = mid
    return hi


# --------------------------------------------------------------------------- RDP curves


def rdp_curve(base: Any, orders: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(orders, eps(order)) of the base algorithm from dp-accounting's `RdpAccountant`.

    base: a dp_accounting DpEvent, a `dpbench.privacy.accounting.PrivacyLedger`, a ledger dict
    (`PrivacyLedger.to_dict()`), or an (orders, rdp) pair (returned as arrays).
    orders: default SELECTION_ORDERS."""
    if isinstance(base, tuple) and len(base) == 2:
        o, r = np.asarray(base[0], dtype=float), np.asarray(base[1], dtype=float)
        if o.shape != r.shape or o.ndim != 1 or len(o) == 0:
            raise UserError("an (orders, rdp) pair needs two 1-D sequences of the same length")
        return o, r
    return accounting.event_rdp(_as_event(base), orders or SELECTION_ORDERS)


def _as_event(base: Any):
    import dp_accounting as dpa

    if isinstance(base, dpa.DpEvent):
        return base
    if isinstance(base, PrivacyLedger):
        return base.dp_event()
    if isinstance(base, dict) and "events" in base:
        return PrivacyLedger.from_dict(base).dp_event()
    raise UserError(f"cannot read a base mechanism from {type(base).__name__}; pass a dp_accounting DpEvent, "
                    "a PrivacyLedger (or its to_dict()), or an (orders, rdp) pair")


def rdp_to_epsilon(orders: Sequence[float], rdp: Sequence[float], delta: float) -> tuple[float, float]:
    """(eps, best order) at `delta` from an RDP curve (Canonne, Kamath & Steinke 2020, Prop. 12):
    eps = min over orders a > 1 of rdp(a) + log(1 - 1/a) - log(delta * a) / (a - 1)."""
    if not 0 < delta < 1:
        raise UserError(f"delta must be in (0, 1), got {delta!r}")
    best, best_a = math.inf, float("nan")
    for a, r in zip(orders, rdp):
        if a <= 1 or not math.isfinite(r):
            continue
        e = r + math.log1p(-1 / a) - math.log(delta * a) / (a - 1)
        if e < best:
            best, best_a = e, float(a)
    return max(best, 0.0), best_a


def rdp_to_delta(orders: Sequence[float], rdp: Sequence[float], epsilon: float) -> float:
    """The smallest delta such that the RDP curve implies (epsilon, delta)-DP: the dual of
    `rdp_to_epsilon` (CKS 2020 Prop. 12), and the total-variation bound
    delta <= sqrt(1 - exp(-rdp(a))) (KL <= any Renyi divergence of order >= 1)."""
    best = 0.0  # log delta; delta <= 1 always
    for a, r in zip(orders, rdp):
        if a < 1 or not math.isfinite(r):
            continue
        if r <= 0:
            return 0.0
        cand = 0.5 * math.log1p(-math.exp(-r))
        if a > 1:
            cand = min(cand, (a - 1) * (r - epsilon + math.log1p(-1 / a)) - math.log(a))
        best = min(best, cand)
    return min(1.0, math.exp(best))


def selection_rdp(orders: Sequence[float], rdp: Sequence[float], dist: Repetitions,
                  monotone: bool = True) -> np.ndarray:
    """eps'(order) of "run K ~ dist candidates, output the best" from the base curve.

    Poisson (Theorem 6): eps + mu * deltahat + log(mu)/(order - 1), deltahat the base
    delta at epshat = log(1 + 1/(order - 1)). Truncated negative binomial (Theorem 2):
    eps + (1 + eta) min_lhat [(1 - 1/lhat) eps(lhat) + log(1/gamma)/lhat] + log(E[K])/(order - 1).
    Orders <= 1 get inf. monotone: replace eps'(a) by min over a' >= a of eps'(a')."""
    o = np.asarray(orders, dtype=float)
    r = np.asarray(rdp, dtype=float)
    out = np.full_like(o, np.inf)
    valid = o > 1
    if dist.kind == "poisson":
        for i in np.nonzero(valid)[0]:
            eps_hat = math.log1p(1 / (o[i] - 1))
            delta_hat = rdp_to_delta(o, r, eps_hat)
            out[i] = r[i] + dist.mu * delta_hat + math.log(dist.mu) / (o[i] - 1)
    else:
        hat = o >= 1
        c = (1 + dist.eta) * np.min((1 - 1 / o[hat]) * r[hat] + math.log(1 / dist.gamma) / o[hat])
        out[valid] = r[valid] + c + math.log(dist.mean) / (o[valid] - 1)
    if monotone:
        out = np.minimum.accumulate(out[::-1])[::-1]
    return out


# --------------------------------------------------------------------------- the guarantee


@dataclass
class SelectionPrivacy:
    """The privacy of a private selection: its epsilon at delta and how it was obtained."""

    epsilon: float
    delta: float
    order: float
    base_epsilon: float
    repetitions: Repetitions
    orders: np.ndarray = field(repr=False)
    base_rdp: np.ndarray = field(repr=False)
    rdp: np.ndarray = field(repr=False)
    base_events: list[dict[str, Any]] = field(default_factory=list, repr=False)
    base_description: str = ""
    n: int | None = None
    runs: int | None = None  # realised K, once the selection ran

    @property
    def bound(self) -> str:
        return BOUNDS[self.repetitions.kind]

    def to_dict(self) -> dict[str, Any]:
        """A dict with the keys of `PrivacyLedger.to_dict()` (events, dp_event, accountant,
        delta, n, adjacency, world_size, approximate, approximate_reason, steps, epsilon)
        plus the selection's details, for manifests and ledgers.json."""
        event = {"type": "private_selection", **self.repetitions.describe(), "runs": self.runs,
                 "bound": self.bound, "conversion": CONVERSION, "base_events": [dict(e) for e in self.base_events],
                 "base_epsilon": self.base_epsilon}
        steps = sum(int(e.get("steps", 0)) for e in self.base_events if e.get("type") == "dpsgd")
        return {
            "events": [event],
            "dp_event": f"RepeatAndSelect({self.base_description}, {self.repetitions.describe()})",
            "accountant": "rdp",
            "delta": self.delta,
            "n": self.n,
            "adjacency": ADJACENCY,
            "world_size": 1,
            "approximate": False,
            "approximate_reason": "",
            "steps": steps,
            "epsilon": self.epsilon,
            "order": self.order,
        }


def selection_epsilon(base: Any, dist: Repetitions, delta: float = 1e-5, orders: Sequence[float] | None = None,
                      n: int | None = None, monotone: bool = True) -> SelectionPrivacy:
    """Epsilon at `delta` of private selection over candidates covered by `base` (see
    `rdp_curve` for what `base` may be), with the number of runs drawn from `dist`."""
    check_delta(delta, n)
    o, r = rdp_curve(base, orders)
    sel = selection_rdp(o, r, dist, monotone=monotone)
    eps, order = rdp_to_epsilon(o, sel, delta)
    base_eps, _ = rdp_to_epsilon(o, r, delta)
    events = _events_of(base)
    return SelectionPrivacy(epsilon=eps, delta=delta, order=order, base_epsilon=base_eps, repetitions=dist,
                            orders=o, base_rdp=r, rdp=sel, base_events=events or [],
                            base_description=_describe(base), n=n)


def _events_of(base: Any) -> list[dict[str, Any]] | None:
    if isinstance(base, PrivacyLedger):
        return [dict(e) for e in base.events]
    if isinstance(base, dict) and "events" in base:
        return [dict(e) for e in base["events"]]
    return None


def _describe(base: Any) -> str:
    try:
        return str(_as_event(base))
    except UserError:
        return "rdp curve"


def composition_epsilon(base: Any, runs: int, delta: float = 1e-5, n: int | None = None) -> float:
    """Epsilon of `runs` runs of the base mechanism composed (what a search that runs every
    candidate and publishes the best really spends), with dp-accounting's RDP accountant."""
    import dp_accounting as dpa

    check_delta(delta, n)
    if int(runs) < 1:
        raise UserError(f"runs must be >= 1, got {runs!r}")
    return accounting.event_epsilon(dpa.SelfComposedDpEvent(_as_event(base), int(runs)), delta, "rdp")


def dpsgd_base(noise_multiplier: float, sample_rate: float, steps: int, *, score_noise_multiplier: float | None = None,
               delta: float = 1e-5, n: int | None = None):
    """The ledger of one candidate run: DP-SGD, plus (optionally) one Gaussian release of
    its validation score (a count of correct predictions, sensitivity 1)."""
    led = PrivacyLedger(delta=delta, n=n)
    led.record_dpsgd(noise_multiplier, sample_rate, steps)
    if score_noise_multiplier is not None:
        led.record_gaussian(score_noise_multiplier, 1, label="validation score")
    return led


def calibrate_selection_noise(target_epsilon: float, sample_rate: float, steps: int, dist: Repetitions, *,
                              delta: float = 1e-5, score_noise_multiplier: float | None = None, n: int | None = None,
                              rtol: float = 2e-3) -> float:
    """The DP-SGD noise multiplier per candidate run such that the whole selection (K ~
    dist runs, the best published) costs `target_epsilon` at `delta`, to relative `rtol`
    (`dpbench.privacy.accounting.calibrate_noise_scale`: dp-accounting's
    `calibrate_dp_mechanism` on log sigma; the result's selection epsilon is <= target).

    With `score_noise_multiplier`, each run also releases its noisy validation score, whose
    cost is fixed; a target below what the score releases alone allow is a UserError."""
    if not target_epsilon > 0:
        raise UserError(f"target_epsilon must be > 0, got {target_epsilon!r}")
    check_delta(delta, n)

    def make_event(sigma: float):
        return dpsgd_base(sigma, sample_rate, steps, score_noise_multiplier=score_noise_multiplier, delta=delta,
                          n=n).dp_event()

    def epsilon_of(event, d: float) -> float:
        return selection_epsilon(event, dist, d, n=n).epsilon

    score = f", score noise {score_noise_multiplier:g}" if score_noise_multiplier else ""
    return accounting.calibrate_noise_scale(
        make_event, target_epsilon, delta, epsilon_of, tol=rtol, what=f"selection (E[K] = {dist.mean:.3g}{score})",
        hint="raise the target, lower the expected number of runs or add more score noise")


# --------------------------------------------------------------------------- running a selection


@dataclass
class SelectionResult:
    """What `private_selection` did: every run (internal, NOT to be published), the best
    one (the only output), K, and the selection's privacy."""

    runs: list[dict[str, Any]]
    best: dict[str, Any] | None
    k: int
    privacy: SelectionPrivacy

    @property
    def epsilon(self) -> float:
        return self.privacy.epsilon

    def frame(self):
        """The runs as a pandas DataFrame (for the notebook's own diagnostics)."""
        import pandas as pd

        return pd.DataFrame(self.runs)


def private_selection(candidates: Sequence[Any], run: Callable[[Any, int], dict[str, Any]], dist: Repetitions, *,
                      base: Any, delta: float = 1e-5, seed: int = 0, n: int | None = None,
                      score_key: str = "score", progress: bool = True) -> SelectionResult:
    """Papernot & Steinke's random search: draw K ~ dist, run K candidates drawn uniformly
    (with replacement) from `candidates`, return the run with the highest `score_key`.

    run(candidate, i) -> dict with at least `score_key` (a DP release: e.g. a noisy
    validation count; a score computed on private data without noise is NOT covered) and
    optionally "ledger" (that run's PrivacyLedger or its to_dict()): its events must equal
    `base`'s, so no candidate can spend more than the accounting assumes. Ties go to the
    earlier run (runs are i.i.d., so that is a data-independent rule). With Poisson, K = 0
    happens (probability e^-mu): then `best` is None. The privacy is `selection_epsilon(base,
    dist, delta)` whatever K turns out to be."""
    if not len(candidates):
        raise UserError("private_selection needs at least one candidate")
    privacy = selection_epsilon(base, dist, delta, n=n)
    base_events = _events_of(base)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5E1EC7]))
    k = dist.sample(rng)
    picks = rng.integers(0, len(candidates), size=k)
    runs: list[dict[str, Any]] = []
    best = None
    for i, j in enumerate(tqdm(picks, desc="private selection", disable=not progress, leave=False)):
        cand = candidates[int(j)]
        out = dict(run(cand, i))
        if score_key not in out:
            raise UserError(f"run() must return a dict with the score {score_key!r}; got keys {sorted(out)}")
        led = out.pop("ledger", None)
        if led is not None and base_events is not None:
            got = _events_of(led)
            if got != base_events:
                raise UserError(f"candidate run {i} ({cand!r}) spent {got}, not the base mechanism {base_events} "
                                "the selection is accounted for; calibrate every candidate to the same noise, rate and steps")
        row = {"run": i, "candidate": cand, **out}
        runs.append(row)
        if best is None or float(row[score_key]) > float(best[score_key]):
            best = row
    privacy.runs = int(k)
    return SelectionResult(runs=runs, best=best, k=int(k), privacy=privacy)


def noisy_accuracy(correct: int, n: int, noise_multiplier: float, rng: np.random.Generator | None = None,
                   seed: int | None = None) -> float:
    """A DP release of an accuracy: (correct + N(0, sigma^2)) / n, the count having
    sensitivity 1 under add/remove (n is treated as public, e.g. a fixed validation size)."""
    if noise_multiplier <= 0:
        raise UserError(f"noise_multiplier must be > 0 for a private score, got {noise_multiplier!r}")
    rng = rng or np.random.default_rng(seed)
    return (float(correct) + float(rng.normal(0.0, noise_multiplier))) / max(int(n), 1)
