"""Privacy accounting: epsilon <-> noise, over dp-accounting's DpEvent algebra.

Every mechanism is described once as a `dp_accounting` event and handed to an accountant:

- ``"rdp"``: Renyi DP (`dp_accounting.rdp.RdpAccountant`) over a dense list of orders,
  with the improved RDP -> (eps, delta) conversion of dp-accounting.
- ``"pld"``: privacy loss distributions (`dp_accounting.pld.PLDAccountant`), pessimistic
  estimate: a valid upper bound at any discretization, tighter when finer.
- ``"gdp_clt"``: the central-limit Gaussian-DP approximation of DP-SGD
  (mu = q sqrt(T (e^{1/sigma^2} - 1)), Bu et al. 2020). It is an *approximation*, not a
  bound; it is offered for plots only and `PrivacyLedger` refuses it.

Adjacency is add/remove one example throughout; delta defaults to 1e-5 and must be < 1/n.
DP-SGD steps are Poisson-subsampled Gaussian mechanisms (noise multiplier sigma,
sensitivity 1 after clipping); unsampled releases (sufficient statistics, counts) are
plain Gaussian mechanisms with sensitivity 1.

Results are memoised in one process-wide cache keyed by the event (`repr` of the DpEvent,
which spells out every noise multiplier, rate and count), the accountant and delta or the
epsilon target: `event_epsilon`, `event_rdp`, `epsilon`, `epsilon_curve`, `noise_multiplier`,
`calibrate_gaussian_releases` and `PrivacyLedger.epsilon` all share it, so sweeps that repeat
a mechanism for every seed account it once (`cache_info`, `clear_cache`).

Calibration (epsilon -> noise) is `calibrate_noise_scale`: dp-accounting's
`calibrate_dp_mechanism` on the log of the noise scale, inside a bracket found from a warm
start (the closed-form CLT estimate for DP-SGD, the exact Gaussian mechanism for unsampled
releases). Private selection (`dpbench.privacy.selection`) calibrates through it too.

`import dpbench.privacy.accounting` does not import dp_accounting or scipy: they are imported
inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from dpbench.atomic import write_json_atomic
from dpbench.errors import UserError

DEFAULT_DELTA = 1e-5
ADJACENCY = "add/remove one example"
ACCOUNTANTS = ("rdp", "pld")  # accountants that give a valid upper bound on epsilon
APPROXIMATE_ACCOUNTANTS = ("gdp_clt",)  # for plots only: not a guarantee

# Dense RDP orders: steps of 0.1 where the optimum sits for typical DP-SGD settings
# (alpha in 1.1..11), 0.5 up to 20, then integers and a coarse tail for
# small-epsilon / large-sigma regimes (up to 512). Fractional orders cost a series each (the bulk
# of the time), and a 0.05 grid changed epsilon by < 0.2% in our checks; orders below
# ~1.05 rarely converge for subsampled Gaussians and only matter at very large epsilon.
RDP_ORDERS = tuple(
    [1.05]
    + [1 + x / 10 for x in range(1, 100)]
    + [11 + x / 2 for x in range(0, 19)]
    + list(range(21, 64))
    + [64, 72, 80, 96, 112, 128, 160, 192, 256, 320, 384, 512]
)

# PLD discretization: the pessimistic PLD's excess epsilon grows roughly like
# T * interval^2, so the automatic interval shrinks as 1/sqrt(total compositions);
# 0.03/sqrt(T) keeps the excess near 1e-3 in epsilon (measured against finer grids).
PLD_MAX_INTERVAL = 1e-3
PLD_MIN_INTERVAL = 1e-5
PLD_AUTO_CONSTANT = 0.03
# Unsampled Gaussian releases: the grid may also be this fraction of epsilon. At epsilon in the
# hundreds (notebook 05 tunes on a public draw at the private run's n·eps) the automatic grid has
# millions of points and takes seconds per evaluation; epsilon / 5000 keeps ~50,000, still a
# pessimistic bound, and for equal multipliers it matches the exact Gaussian to ~1e-12 (tested).
PLD_RELATIVE_INTERVAL = 2e-4

SIGMA_MAX = 1e5  # noise multipliers beyond this are refused as impossible targets
SIGMA_MIN = 1e-3

CACHE_SIZE = 8192  # accounting results kept (least recently used dropped first)


# ---------------------------------------------------------------------------- validation


def _check_accountant(accountant: str, allow_approximate: bool = True) -> str:
    allowed = ACCOUNTANTS + (APPROXIMATE_ACCOUNTANTS if allow_approximate else ())
    if accountant not in allowed:
        raise UserError(f"unknown accountant {accountant!r}; use one of {list(allowed)}")
    return accountant


def _check_sigma(noise_multiplier: float, name: str = "noise_multiplier") -> float:
    s = float(noise_multiplier)
    if math.isnan(s) or s < 0:
        raise UserError(f"{name} must be >= 0, got {noise_multiplier!r}")
    return s


def _check_rate(sample_rate: float) -> float:
    q = float(sample_rate)
    if math.isnan(q) or not 0.0 <= q <= 1.0:
        raise UserError(f"sample_rate must be in [0, 1], got {sample_rate!r}")
    return q


def _check_steps(steps: int) -> int:
    if isinstance(steps, float) and steps.is_integer():
        steps = int(steps)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise UserError(f"steps must be a non-negative integer, got {steps!r}")
    return steps


def _check_delta_value(delta: float) -> float:
    d = float(delta)
    if not 0.0 < d < 1.0:
        raise UserError(f"delta must be in (0, 1), got {delta!r}; the usual choice is 1e-5 (< 1/n)")
    return d


def check_delta(delta: float, n: int | None) -> float:
    """Validate delta for a private data set of `n` examples: 0 < delta < 1/n.

    Raises `UserError` otherwise (delta >= 1/n permits releasing an example outright).
    With ``n=None`` only 0 < delta < 1 is checked. Returns delta as a float.
    """
    d = _check_delta_value(delta)
    if n is None:
        return d
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise UserError(f"the private data set size n must be a positive integer, got {n!r}")
    if d >= 1.0 / n:
        raise UserError(
            f"delta={d:g} is not below 1/n = 1/{int(n)} = {1.0 / n:.3g}; "
            f"choose delta < 1/n (e.g. {10 ** math.floor(math.log10(0.1 / n)):g})"
        )
    return d


@contextlib.contextmanager
def _quiet_absl():
    """dp-accounting logs a warning per RDP order it drops (e.g. orders near 1 whose series
    does not converge for small sigma); the order is simply excluded, so silence that."""
    try:
        import absl.logging as absl_logging
    except ImportError:  # pragma: no cover - absl comes with dp_accounting
        yield
        return
    old = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(old)


def steps_for_epochs(epochs: float, sample_rate: float) -> int:
    """Number of Poisson-sampled steps that make `epochs` expected passes over the data:
    the nearest integer to epochs / q (Python's `round`), and at least 1 when epochs > 0.

    The one definition of this conversion: the training loop, the samplers, the last-layer
    solvers and notebook 00's curves all use it, so an "epochs" setting means the same number
    of compositions everywhere. Raises `UserError` for epochs < 0 or q outside (0, 1].
    """
    e, q = float(epochs), float(sample_rate)
    if math.isnan(e) or e < 0 or math.isinf(e):
        raise UserError(f"epochs must be a finite number >= 0, got {epochs!r}")
    if math.isnan(q) or not 0.0 < q <= 1.0:
        raise UserError(f"sample_rate must be in (0, 1] to count steps per epoch, got {sample_rate!r}")
    if e == 0:
        return 0
    return max(1, int(round(e / q)))


# ---------------------------------------------------------------------------- cache


class _AccountingCache:
    """Process-wide memo of accounting results; the least recently used entry goes first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: OrderedDict[tuple, Any] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple, compute: Callable[[], Any]) -> Any:
        if key in self.entries:
            self.hits += 1
            self.entries.move_to_end(key)
            return self.entries[key]
        self.misses += 1
        value = compute()
        self.entries[key] = value
        if len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return value


_CACHE = _AccountingCache(CACHE_SIZE)


def _cached(kind: str, event, accountant: str, target: float, extra: tuple, compute: Callable[[], Any]) -> Any:
    """`compute()`, memoised under (kind, repr(event), accountant, target, extra).

    A DpEvent's repr names its class and every field (floats round-trip exactly), so two
    events with the same repr are the same mechanism; `target` is delta for an epsilon and
    the epsilon target for a calibration."""
    return _CACHE.get((kind, repr(event), accountant, float(target), extra), compute)


def cache_info() -> dict[str, int]:
    """Hits, misses and entries of the shared accounting cache (see the module docstring)."""
    return {"hits": _CACHE.hits, "misses": _CACHE.misses, "entries": len(_CACHE.entries), "size": _CACHE.size}


def clear_cache() -> None:
    """Empty the shared accounting cache (results are pure functions of their key, so this
    only costs time; tests use it to count accountant calls)."""
    _CACHE.entries.clear()
    _CACHE.hits = _CACHE.misses = 0


# ---------------------------------------------------------------------------- events


def dpsgd_event(noise_multiplier: float, sample_rate: float, steps: int):
    """The dp_accounting event of `steps` DP-SGD steps: a Poisson-subsampled Gaussian
    mechanism self-composed `steps` times (plain Gaussian when sample_rate == 1)."""
    import dp_accounting as dpa

    s, q, t = _check_sigma(noise_multiplier), _check_rate(sample_rate), _check_steps(steps)
    if t == 0 or q == 0.0:
        return dpa.NoOpDpEvent()
    if s == 0.0:
        return dpa.NonPrivateDpEvent()
    base = dpa.GaussianDpEvent(s)
    if q < 1.0:
        base = dpa.PoissonSampledDpEvent(q, base)
    return base if t == 1 else dpa.SelfComposedDpEvent(base, t)


def gaussian_event(noise_multiplier: float, count: int = 1):
    """`count` unsampled Gaussian releases of sensitivity 1 and noise multiplier sigma."""
    return dpsgd_event(noise_multiplier, 1.0, count)


def _compose(events: list):
    import dp_accounting as dpa

    events = [e for e in events if not isinstance(e, dpa.NoOpDpEvent)]
    if not events:
        return dpa.NoOpDpEvent()
    if len(events) == 1:
        return events[0]
    return dpa.ComposedDpEvent(events)


def _count_compositions(event) -> int:
    """Number of elementary mechanisms in an event (sets the automatic PLD grid)."""
    import dp_accounting as dpa

    if isinstance(event, dpa.SelfComposedDpEvent):
        return event.count * _count_compositions(event.event)
    if isinstance(event, dpa.ComposedDpEvent):
        return sum(_count_compositions(e) for e in event.events)
    return 1


def pld_interval(total_compositions: int) -> float:
    """Automatic PLD value-discretization interval for `total_compositions` mechanisms."""
    t = max(int(total_compositions), 1)
    return min(PLD_MAX_INTERVAL, max(PLD_MIN_INTERVAL, PLD_AUTO_CONSTANT / math.sqrt(t)))


def _gaussian_pld_interval(count: int, epsilon: float) -> float:
    """PLD grid for `count` unsampled Gaussian releases at about `epsilon`: the automatic
    interval, or PLD_RELATIVE_INTERVAL * epsilon where that is coarser."""
    return max(pld_interval(count), PLD_RELATIVE_INTERVAL * float(epsilon))


def _new_accountant(accountant: str, pld_discretization: float | None):
    """A fresh dp-accounting accountant: RDP over RDP_ORDERS, or PLD at this interval."""
    import dp_accounting as dpa

    if accountant == "rdp":
        return dpa.rdp.RdpAccountant(orders=list(RDP_ORDERS))
    return dpa.pld.PLDAccountant(value_discretization_interval=float(pld_discretization))


def event_epsilon(event, delta: float = DEFAULT_DELTA, accountant: str = "rdp", pld_discretization: float | None = None) -> float:
    """Epsilon at `delta` of any dp_accounting event under the RDP or PLD accountant
    (memoised in the shared cache: see `cache_info`)."""
    import dp_accounting as dpa

    _check_accountant(accountant, allow_approximate=False)
    d = _check_delta_value(delta)
    if isinstance(event, dpa.NoOpDpEvent):
        return 0.0
    interval = None
    if accountant == "pld":
        interval = float(pld_discretization or pld_interval(_count_compositions(event)))

    def compute() -> float:
        with _quiet_absl():
            acc = _new_accountant(accountant, interval).compose(event)
            return max(float(acc.get_epsilon(d)), 0.0)

    return _cached("epsilon", event, accountant, d, (interval,), compute)


def event_rdp(event, orders: Sequence[float]):
    """(orders, RDP epsilon at each order) of a dp_accounting event, from dp-accounting's
    `RdpAccountant` and its public `orders`/`rdp` (memoised in the shared cache; fresh
    arrays each call)."""
    orders = tuple(float(a) for a in orders)

    def compute() -> tuple[tuple[float, ...], tuple[float, ...]]:
        import dp_accounting as dpa

        with _quiet_absl():
            acc = dpa.rdp.RdpAccountant(orders=list(orders)).compose(event)
        return tuple(float(a) for a in acc.orders), tuple(float(r) for r in acc.rdp)

    o, r = _cached("rdp", event, "rdp", 0.0, orders, compute)
    return np.asarray(o, dtype=float), np.asarray(r, dtype=float)


# ---------------------------------------------------------------------------- closed forms


def gaussian_delta(epsilon: float, noise_multiplier: float) -> float:
    """Exact delta(eps) of one Gaussian mechanism with sensitivity 1 and noise multiplier s
    (Balle and Wang 2018): Phi(1/(2s) - eps s) - e^eps Phi(-1/(2s) - eps s)."""
    from scipy.special import log_ndtr, ndtr

    s, e = float(noise_multiplier), float(epsilon)
    if s == 0.0:
        return 1.0
    if math.isinf(s):
        return 0.0
    a = 1.0 / (2.0 * s)
    return float(ndtr(a - e * s) - math.exp(e + log_ndtr(-a - e * s)))


def gaussian_mechanism_epsilon(noise_multiplier: float, delta: float = DEFAULT_DELTA) -> float:
    """Exact (tightest) epsilon of one Gaussian mechanism, sensitivity 1, at `delta`.

    `k` releases with noise multiplier s compose exactly to one with s / sqrt(k); a
    mu-GDP mechanism is this with s = 1 / mu.
    """
    import dp_accounting as dpa

    s, d = _check_sigma(noise_multiplier), _check_delta_value(delta)
    if s == 0.0:
        return math.inf
    return float(dpa.get_epsilon_gaussian(s, d))


def gdp_clt_mu(noise_multiplier: float, sample_rate: float, steps: int) -> float:
    """mu of the CLT Gaussian-DP approximation of DP-SGD: q sqrt(T (e^{1/sigma^2} - 1))."""
    s, q, t = _check_sigma(noise_multiplier), _check_rate(sample_rate), _check_steps(steps)
    if t == 0 or q == 0.0:
        return 0.0
    if s == 0.0 or 1.0 / s**2 > 700:  # e^{1/s^2} overflows: effectively no privacy
        return math.inf
    return q * math.sqrt(t * math.expm1(1.0 / s**2))


def gdp_clt_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float = DEFAULT_DELTA) -> float:
    """Epsilon of DP-SGD under the CLT Gaussian-DP approximation (an approximation that is
    accurate for small q and many steps, not an upper bound)."""
    mu = gdp_clt_mu(noise_multiplier, sample_rate, steps)
    if mu == 0.0:
        return 0.0
    if math.isinf(mu):
        return math.inf
    return gaussian_mechanism_epsilon(1.0 / mu, delta)


def classic_rdp_epsilon(beta: float, delta: float = DEFAULT_DELTA) -> float:
    """Classic RDP -> (eps, delta) conversion for a Gaussian composition with total RDP
    alpha * beta / 2 (beta = sum_j 1/s_j^2): min over alpha of
    alpha beta / 2 + log(1/delta) / (alpha - 1), at alpha = 1 + sqrt(2 log(1/delta) / beta).

    This is the conversion the DP-LS / DP-FC papers use (Mehta et al. 2022); it is looser
    than dp-accounting's. Equals beta/2 + sqrt(2 beta log(1/delta)).
    """
    b, d = float(beta), _check_delta_value(delta)
    if b < 0 or math.isnan(b):
        raise UserError(f"beta must be >= 0, got {beta!r}")
    if b == 0.0:
        return 0.0
    if math.isinf(b):
        return math.inf
    log_inv_delta = math.log(1.0 / d)
    alpha = 1.0 + math.sqrt(2.0 * log_inv_delta / b)
    return alpha * b / 2.0 + log_inv_delta / (alpha - 1.0)


def classic_epsilon(noise_multipliers: Sequence[float], delta: float = DEFAULT_DELTA) -> float:
    """Classic-conversion epsilon of unsampled Gaussian releases with these noise multipliers."""
    sigmas = [_check_sigma(s) for s in noise_multipliers]
    if any(s == 0.0 for s in sigmas):
        return math.inf
    return classic_rdp_epsilon(sum(1.0 / s**2 for s in sigmas), delta)


def classic_noise_multiplier(target_epsilon: float, num_releases: int, delta: float = DEFAULT_DELTA) -> float:
    """Common noise multiplier s for `num_releases` Gaussian releases under the classic
    conversion (beta = num_releases / s^2), as in the DP-LS / DP-FC papers.

    Solved in closed form: with x = sqrt(beta), x^2/2 + sqrt(2 L) x = eps, L = log(1/delta).
    DP-LS (3 releases), delta 1e-5: s = 83.3 / 8.5 / 1.20 at eps 0.1 / 1 / 8.
    """
    eps = _check_target(target_epsilon)
    k = _check_steps(num_releases)
    if k == 0:
        return 0.0
    two_l = 2.0 * math.log(1.0 / _check_delta_value(delta))
    x = math.sqrt(two_l + 2.0 * eps) - math.sqrt(two_l)
    return math.sqrt(k) / x


# ---------------------------------------------------------------------------- epsilon


def epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float = DEFAULT_DELTA,
    accountant: str = "rdp",
    pld_discretization: float | None = None,
) -> float:
    """Epsilon at `delta` of `steps` DP-SGD steps with Poisson sampling at `sample_rate`
    and Gaussian noise multiplier `noise_multiplier` (add/remove adjacency).

    sample_rate == 1 is the plain Gaussian mechanism; steps == 0 (or sample_rate == 0)
    gives 0; noise_multiplier == 0 gives inf. `accountant` is "rdp", "pld" or the
    approximation "gdp_clt". `pld_discretization=None` picks the PLD grid automatically.
    """
    _check_accountant(accountant)
    s, q, t = _check_sigma(noise_multiplier), _check_rate(sample_rate), _check_steps(steps)
    d = _check_delta_value(delta)
    if t == 0 or q == 0.0:
        return 0.0
    if s == 0.0:
        return math.inf
    if accountant == "gdp_clt":
        return gdp_clt_epsilon(s, q, t, d)
    return event_epsilon(dpsgd_event(s, q, t), d, accountant, pld_discretization)


def epsilon_curve(
    noise_multiplier: float,
    sample_rate: float,
    steps_list: Iterable[int],
    delta: float = DEFAULT_DELTA,
    accountant: str = "rdp",
    pld_discretization: float | None = None,
) -> list[float]:
    """Epsilon after each number of steps in `steps_list`, same as calling `epsilon` for
    each; RDP computes the per-step RDP curve once and scales it (RDP composes linearly)."""
    steps_list = [_check_steps(t) for t in steps_list]
    if accountant != "rdp" or noise_multiplier == 0 or sample_rate == 0:
        return [epsilon(noise_multiplier, sample_rate, t, delta, accountant, pld_discretization) for t in steps_list]
    import dp_accounting as dpa

    d = _check_delta_value(delta)
    step = dpsgd_event(noise_multiplier, sample_rate, 1)

    def compute() -> list[float]:
        with _quiet_absl():
            per_step = _new_accountant("rdp", None).compose(step).rdp
            out = []
            for t in steps_list:
                eps = dpa.rdp.compute_epsilon(list(RDP_ORDERS), per_step * t, d)[0] if t else 0.0
                out.append(max(float(eps), 0.0))
        return out

    return list(_cached("curve", step, "rdp", d, tuple(steps_list), compute))


def gaussian_composition_epsilon(noise_multipliers: Sequence[float], delta: float = DEFAULT_DELTA, accountant: str = "rdp", pld_discretization: float | None = None) -> float:
    """Epsilon of a composition of unsampled Gaussian releases of sensitivity 1 with the
    given (possibly different) noise multipliers. Equal multipliers are grouped."""
    sigmas = [_check_sigma(s) for s in noise_multipliers]
    if accountant == "pld" and pld_discretization is None and sigmas and min(sigmas) > 0:
        exact = gaussian_mechanism_epsilon(sum(s**-2 for s in sigmas) ** -0.5, delta)  # they compose to one Gaussian
        pld_discretization = _gaussian_pld_interval(len(sigmas), exact)
    return sampled_composition_epsilon([(s, 1.0, 1) for s in sigmas], delta, accountant, pld_discretization)


def sampled_composition_epsilon(phases: Sequence[tuple[float, float, int]], delta: float = DEFAULT_DELTA, accountant: str = "rdp", pld_discretization: float | None = None) -> float:
    """Epsilon of heterogeneous DP-SGD phases, each `(noise_multiplier, sample_rate, steps)`,
    composed in sequence (e.g. a change of batch size or noise mid-training)."""
    _check_accountant(accountant)
    d = _check_delta_value(delta)
    grouped: dict[tuple[float, float], int] = {}
    for phase in phases:
        if len(phase) != 3:
            raise UserError(f"each phase must be (noise_multiplier, sample_rate, steps), got {phase!r}")
        s, q, t = _check_sigma(phase[0]), _check_rate(phase[1]), _check_steps(phase[2])
        if t == 0 or q == 0.0:
            continue
        if s == 0.0:
            return math.inf
        grouped[(s, q)] = grouped.get((s, q), 0) + t  # composition is order-free
    if not grouped:
        return 0.0
    if accountant == "gdp_clt":
        # CLT mu's compose as sqrt of the sum of squares (Gaussian DP composition)
        mu = math.sqrt(sum(gdp_clt_mu(s, q, t) ** 2 for (s, q), t in grouped.items()))
        return math.inf if math.isinf(mu) else gaussian_mechanism_epsilon(1.0 / mu, d)
    event = _compose([dpsgd_event(s, q, t) for (s, q), t in grouped.items()])
    return event_epsilon(event, d, accountant, pld_discretization)


# ---------------------------------------------------------------------------- calibration


def _check_target(target_epsilon: float) -> float:
    e = float(target_epsilon)
    if math.isnan(e) or e <= 0 or math.isinf(e):
        raise UserError(f"target epsilon must be a finite number > 0, got {target_epsilon!r}")
    return e


def _calibration_accountant(epsilon_of: Callable[[Any, float], float]):
    """A dp-accounting `PrivacyAccountant` for `calibrate_dp_mechanism` whose epsilon is
    `epsilon_of(event, delta)` of what it composed (e.g. `event_epsilon`, so every point the
    search visits -- bracket ends, Brent's iterates, the final check -- goes through the
    shared cache).

    An infinite epsilon is reported as a large finite one: Brent's method only needs the sign
    of epsilon - target, and a finite value keeps its interpolation defined."""
    import dp_accounting as dpa

    class _Calibration(dpa.PrivacyAccountant):
        def __init__(self) -> None:
            super().__init__(dpa.NeighboringRelation.ADD_OR_REMOVE_ONE)

        def _maybe_compose(self, event, count, do_compose):
            return None  # everything is kept in `ledger` by the base class

        def get_epsilon(self, target_delta: float) -> float:
            return min(epsilon_of(self.ledger, target_delta), 1e6)

    return _Calibration()


def calibrate_noise_scale(
    make_event: Callable[[float], Any],
    target_epsilon: float,
    delta: float,
    epsilon_of: Callable[[Any, float], float],
    *,
    tol: float = 1e-3,
    start: float = 1.0,
    factor: float = 2.0,
    what: str = "calibration",
    hint: str = "raise epsilon or delta, or lower the sampling rate or steps",
    floor: float | None = None,
) -> float:
    """Smallest noise scale s (to relative `tol`) such that `epsilon_of(make_event(s), delta)`
    is at most `target_epsilon`; the epsilon must decrease in s. The one calibration routine:
    `noise_multiplier`, `calibrate_gaussian_releases` and private selection use it.

    The bracket is found on log s from the warm start `start` by steps of `factor` (a good
    warm start and a small factor save accountant calls); dp-accounting's
    `calibrate_dp_mechanism` then solves inside it (Brent's method on log s, tolerance
    log(1 + tol) / 4, as the hand-written search before it), and returns a point whose
    epsilon it has checked to be <= target. A target that needs s > SIGMA_MAX is a
    `UserError` naming `what` and the `hint`.

    `floor`, when given, is a scale below which no valid accountant reaches the target (the
    exact Gaussian mechanism's, for unsampled Gaussian releases). When the floor, or the floor
    one Brent tolerance step up, already meets the target, that is the answer to within the
    tolerance and the search is skipped: one or two accountant calls instead of ~10, which at
    large epsilon (a PLD with a wide support) take seconds each.
    """
    import dp_accounting as dpa

    target = _check_target(target_epsilon)

    def eps_at(log_s: float) -> float:
        return epsilon_of(make_event(math.exp(log_s)), delta)

    if floor is not None and SIGMA_MIN <= floor <= SIGMA_MAX:
        for log_s in (math.log(floor), math.log(floor) + math.log1p(tol) / 4):
            if eps_at(log_s) <= target:
                return math.exp(log_s)

    step = math.log(factor)
    lo = hi = math.log(min(max(start, SIGMA_MIN), SIGMA_MAX))
    if eps_at(hi) > target:
        while eps_at(hi) > target:
            lo, hi = hi, hi + step
            if hi > math.log(SIGMA_MAX):
                raise UserError(f"{what}: no noise multiplier up to {SIGMA_MAX:g} reaches epsilon {target:g}; "
                                f"the target is too small for these settings ({hint})")
    else:
        while eps_at(lo) <= target:
            hi, lo = lo, lo - step
            if lo < math.log(SIGMA_MIN):
                return math.exp(hi)  # any noise >= this reaches the target
    with _quiet_absl():
        log_s = dpa.calibrate_dp_mechanism(
            lambda: _calibration_accountant(epsilon_of),
            lambda x: make_event(math.exp(x)),
            target, delta, dpa.ExplicitBracketInterval(lo, hi), tol=math.log1p(tol) / 4,
        )
    return math.exp(log_s)


def _accountant_epsilon(accountant: str, make_event: Callable[[float], Any], pld_discretization: float | None = None):
    """`epsilon_of` for `calibrate_noise_scale` under "rdp" or "pld" (through the cache); the
    PLD grid is fixed once for the whole search, as the event's size does not depend on s."""
    if accountant == "pld":
        pld_discretization = float(pld_discretization or pld_interval(_count_compositions(make_event(1.0))))
    return lambda event, delta: event_epsilon(event, delta, accountant, pld_discretization)


def gdp_clt_noise_multiplier(target_epsilon: float, sample_rate: float, steps: int, delta: float = DEFAULT_DELTA) -> float:
    """The noise multiplier at which the CLT Gaussian-DP approximation of DP-SGD gives
    `target_epsilon`, in closed form: mu is the GDP parameter of the exact Gaussian
    mechanism at (eps, delta) (dp-accounting's `get_sigma_gaussian`, mu = 1/sigma), and
    q sqrt(T (e^{1/s^2} - 1)) = mu gives s = (log(1 + mu^2 / (q^2 T)))^-1/2.

    An approximation (see `gdp_clt_epsilon`); also the warm start of `noise_multiplier`.
    Returns 0.0 when no step touches the data."""
    import dp_accounting as dpa

    eps = _check_target(target_epsilon)
    q, t, d = _check_rate(sample_rate), _check_steps(steps), _check_delta_value(delta)
    if t == 0 or q == 0.0:
        return 0.0
    mu = 1.0 / float(dpa.get_sigma_gaussian(eps, d))
    s = 1.0 / math.sqrt(math.log1p(mu**2 / (q**2 * t)))
    for _ in range(60):  # root-finding leaves ~1e-12 of slack: step to the safe side
        if gdp_clt_epsilon(s, q, t, d) <= eps:
            break
        s *= 1.0 + 1e-9
    return s


def noise_multiplier(
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float = DEFAULT_DELTA,
    accountant: str = "rdp",
    tol: float = 1e-3,
    pld_discretization: float | None = None,
) -> float:
    """The smallest noise multiplier (to relative `tol`) such that `steps` DP-SGD steps at
    `sample_rate` are (target_epsilon, delta)-DP under `accountant`. The returned value
    always satisfies the target (epsilon(result) <= target_epsilon). Memoised in the
    shared cache.

    Raises `UserError` for a non-positive target or one that needs sigma > 1e5.
    Returns 0.0 when no step touches the data (steps == 0 or sample_rate == 0).
    """
    eps = _check_target(target_epsilon)
    _check_accountant(accountant)
    q, t, d = _check_rate(sample_rate), _check_steps(steps), _check_delta_value(delta)
    if t == 0 or q == 0.0:
        return 0.0
    what = f"noise_multiplier(eps={eps:g}, q={q:g}, steps={t}, delta={d:g}, {accountant})"
    if accountant == "gdp_clt":
        sigma = gdp_clt_noise_multiplier(eps, q, t, d)
        if sigma > SIGMA_MAX:
            raise UserError(f"{what}: the noise multiplier {sigma:.3g} is above {SIGMA_MAX:g}; the target is too small "
                            "for these settings (raise epsilon or delta, or lower the sampling rate or steps)")
        return sigma

    def compute() -> float:
        # The CLT approximation is cheap and usually within ~10% of the RDP/PLD answer:
        # start there and bracket with small steps to save expensive accountant calls.
        start = min(gdp_clt_noise_multiplier(eps, q, t, d), SIGMA_MAX)

        def make_event(s: float):
            return dpsgd_event(s, q, t)

        return calibrate_noise_scale(make_event, eps, d, _accountant_epsilon(accountant, make_event, pld_discretization),
                                     tol=tol, start=start, factor=1.15, what=what)

    return _cached("noise_multiplier", dpsgd_event(1.0, q, t), accountant, eps, (d, float(tol), pld_discretization),
                   compute)


def calibrate_gaussian_releases(
    target_epsilon: float,
    weights_or_count: int | Sequence[float],
    delta: float = DEFAULT_DELTA,
    accountant: str = "rdp",
    tol: float = 1e-3,
) -> list[float]:
    """Noise multipliers for unsampled Gaussian releases (sensitivity 1 each) that together
    are (target_epsilon, delta)-DP under "rdp" or "pld". Memoised in the shared cache.

    `weights_or_count` is either a number of releases (all get the same multiplier) or a
    list of budget weights w_j: release j gets the fraction w_j / sum(w) of the total
    1/sigma^2 budget, i.e. sigma_j = s * sqrt(sum(w) / w_j) for one common scale s.
    """
    if isinstance(weights_or_count, (int,)) and not isinstance(weights_or_count, bool):
        weights = [1.0] * _check_steps(weights_or_count)
    else:
        weights = [float(w) for w in weights_or_count]
    if not weights:
        return []
    if any(not w > 0 for w in weights):
        raise UserError(f"release weights must be > 0, got {weights}")
    _check_accountant(accountant, allow_approximate=False)
    d = _check_delta_value(delta)
    total = sum(weights)
    shape = [math.sqrt(total / w) for w in weights]
    eps = _check_target(target_epsilon)

    groups = Counter(shape)  # equal multipliers compose as one self-composed Gaussian

    def make_event(scale: float):
        return _compose([gaussian_event(scale * c, k) for c, k in groups.items()])

    def compute() -> float:
        # Warm start: the exact Gaussian mechanism (the releases compose to one Gaussian with
        # 1/s_eff^2 = sum_j 1/(s c_j)^2); no valid accountant needs less noise than that.
        import dp_accounting as dpa

        start = float(dpa.get_sigma_gaussian(eps, d)) * math.sqrt(sum(c**-2 for c in shape))
        what = f"calibrate_gaussian_releases(eps={eps:g}, releases={len(weights)})"
        grid = _gaussian_pld_interval(len(weights), eps) if accountant == "pld" else None
        return calibrate_noise_scale(make_event, eps, d, _accountant_epsilon(accountant, make_event, grid), tol=tol,
                                     start=min(start, SIGMA_MAX), factor=1.15, what=what, floor=start)

    scale = _cached("gaussian_releases", make_event(1.0), accountant, eps, (d, float(tol)), compute)
    return [scale * c for c in shape]


def calibrate_common_noise(target_epsilon: float, num_releases: int, delta: float = DEFAULT_DELTA, accountant: str = "rdp", tol: float = 1e-3) -> float:
    """One noise multiplier shared by `num_releases` unsampled Gaussian releases
    (sensitivity 1) so that together they are (target_epsilon, delta)-DP."""
    sigmas = calibrate_gaussian_releases(target_epsilon, int(num_releases), delta, accountant, tol)
    return sigmas[0] if sigmas else 0.0


# ---------------------------------------------------------------------------- adaptive clipping


def combined_noise_multiplier(sigma_g: float, sigma_b: float, num_counts: int) -> float:
    """Effective noise multiplier of one step that releases the noisy clipped gradient sum
    (noise multiplier sigma_g, sensitivity 1 in units of C) and `num_counts` centred
    below-threshold counts (sensitivity 1/2 each, noise std sigma_b) from the same sampled
    batch: (sigma_g^-2 + K / (4 sigma_b^2))^-1/2. Account the step as ONE subsampled
    Gaussian with this multiplier (He et al. 2023; Andrew et al. 2021)."""
    sg, sb = _check_sigma(sigma_g, "sigma_g"), _check_sigma(sigma_b, "sigma_b")
    k = _check_steps(num_counts)
    if sg == 0.0 or (k > 0 and sb == 0.0):
        return 0.0
    inv = 1.0 / sg**2 + (k / (4.0 * sb**2) if k > 0 and not math.isinf(sb) else 0.0)
    return 1.0 / math.sqrt(inv)


def split_noise_for_counts(noise_multiplier: float, num_counts: int, count_fraction: float) -> tuple[float, float]:
    """Split a step's noise multiplier sigma between the gradient and K centred counts,
    giving the fraction r of the 1/sigma^2 budget to the counts:
    sigma_g = sigma / sqrt(1 - r), sigma_b = sqrt(K) sigma / (2 sqrt(r)). Then
    `combined_noise_multiplier(sigma_g, sigma_b, K) == sigma`."""
    s = _check_sigma(noise_multiplier)
    k = _check_steps(num_counts)
    r = float(count_fraction)
    if not 0.0 < r < 1.0:
        raise UserError(f"count_fraction must be in (0, 1), got {count_fraction!r} (e.g. 0.01)")
    if k == 0:
        raise UserError("num_counts must be >= 1 to split noise for counts")
    return s / math.sqrt(1.0 - r), math.sqrt(k) * s / (2.0 * math.sqrt(r))


# ---------------------------------------------------------------------------- ledger


@dataclass
class PrivacyLedger:
    """Every privacy-relevant release of one run, for the manifest.

    Events are DP-SGD phases (Poisson-subsampled Gaussian, consecutive identical steps
    merged) and unsampled Gaussian releases. `epsilon()` composes them through
    dp-accounting. `save(path)` writes `to_dict()` atomically as JSON; the runner copies
    `output_dir/ledger.json` into the manifest.
    """

    delta: float = DEFAULT_DELTA
    n: int | None = None
    accountant: str = "rdp"
    world_size: int = 1
    events: list[dict[str, Any]] = field(default_factory=list)
    approximate: bool = False
    approximate_reasons: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.delta = check_delta(self.delta, self.n)
        _check_accountant(self.accountant, allow_approximate=False)
        if isinstance(self.world_size, bool) or int(self.world_size) != self.world_size or self.world_size < 1:
            raise UserError(f"world_size must be a positive integer, got {self.world_size!r}")
        self.world_size = int(self.world_size)

    # -- recording
    def record_dpsgd(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record `steps` DP-SGD steps (merged into the previous event if identical)."""
        s, q, t = _check_sigma(noise_multiplier), _check_rate(sample_rate), _check_steps(steps)
        if t == 0:
            return
        last = self.events[-1] if self.events else None
        if last and last["type"] == "dpsgd" and last["noise_multiplier"] == s and last["sample_rate"] == q:
            last["steps"] += t
        else:
            self.events.append({"type": "dpsgd", "noise_multiplier": s, "sample_rate": q, "steps": t})

    def record_gaussian(self, noise_multiplier: float, count: int = 1, label: str = "") -> None:
        """Record `count` unsampled Gaussian releases of sensitivity 1 (e.g. sufficient
        statistics of a linear solver)."""
        s, c = _check_sigma(noise_multiplier), _check_steps(count)
        if c == 0:
            return
        last = self.events[-1] if self.events else None
        if last and last["type"] == "gaussian" and last["noise_multiplier"] == s and last["label"] == label:
            last["count"] += c
        else:
            self.events.append({"type": "gaussian", "noise_multiplier": s, "count": c, "label": str(label)})

    def mark_approximate(self, reason: str) -> None:
        """Flag the guarantee as approximate (e.g. shuffled instead of Poisson batches)."""
        self.approximate = True
        if reason and reason not in self.approximate_reasons:
            self.approximate_reasons.append(str(reason))

    # -- queries
    @property
    def steps(self) -> int:
        """Number of DP-SGD steps recorded."""
        return sum(e["steps"] for e in self.events if e["type"] == "dpsgd")

    def dp_event(self):
        """The whole run as one dp_accounting event (ComposedDpEvent of the records)."""
        parts = []
        for e in self.events:
            if e["type"] == "dpsgd":
                parts.append(dpsgd_event(e["noise_multiplier"], e["sample_rate"], e["steps"]))
            else:
                parts.append(gaussian_event(e["noise_multiplier"], e["count"]))
        return _compose(parts)

    def epsilon(self, accountant: str | None = None) -> float:
        """Epsilon at the ledger's delta of everything recorded so far (through
        `event_epsilon`, so ledgers with the same events share one cached result)."""
        acc = _check_accountant(accountant or self.accountant, allow_approximate=False)
        return event_epsilon(self.dp_event(), self.delta, acc)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: events, accountant, delta, n, adjacency, world size,
        approximate flag and reason, DP-SGD steps and epsilon."""
        return {
            "events": [dict(e) for e in self.events],
            "dp_event": str(self.dp_event()),
            "accountant": self.accountant,
            "delta": self.delta,
            "n": self.n,
            "adjacency": ADJACENCY,
            "world_size": self.world_size,
            "approximate": self.approximate,
            "approximate_reason": "; ".join(self.approximate_reasons),
            "steps": self.steps,
            "epsilon": self.epsilon(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PrivacyLedger":
        """Rebuild a ledger from `to_dict()` output."""
        ledger = cls(delta=data["delta"], n=data.get("n"), accountant=data.get("accountant", "rdp"), world_size=data.get("world_size", 1))
        ledger.events = [dict(e) for e in data.get("events", [])]
        if data.get("approximate"):
            reasons = [r for r in str(data.get("approximate_reason", "")).split("; ") if r]
            ledger.approximate = True
            ledger.approximate_reasons = reasons
        return ledger

    def save(self, path: str | os.PathLike) -> str:
        """Write `to_dict()` as JSON to `path` atomically; returns the path."""
        return str(write_json_atomic(path, self.to_dict()))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PrivacyLedger":
        """Read a ledger saved with `save`."""
        with open(path) as fh:
            return cls.from_dict(json.load(fh))
