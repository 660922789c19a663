"""Tests for dpbench.privacy.selection: Papernot & Steinke (2022) private selection and its accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dpbench.privacy import accounting
from dpbench.privacy import selection as T
from dpbench.errors import UserError

SIGMA = 3.0
ORDERS = [1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0, 128.0]
DELTA = 1e-5


def gaussian_rdp(order, sigma=SIGMA):
    """RDP of the Gaussian mechanism with sensitivity 1 (Mironov 2017): order / (2 sigma^2)."""
    return order / (2 * sigma**2)


def hand_delta(eps, orders, sigma=SIGMA):
    """delta(eps) from the Gaussian's RDP curve, written out: CKS 2020 Prop. 12 and the TV bound."""
    log_best = 0.0  # delta <= 1
    for a in orders:
        r = gaussian_rdp(a, sigma)
        log_best = min(log_best, 0.5 * math.log(1 - math.exp(-r)))
        if a > 1:
            log_best = min(log_best, (a - 1) * (r - eps + math.log(1 - 1 / a)) - math.log(a))
    return math.exp(log_best)


def hand_epsilon(curve, orders, delta=DELTA):
    return min(curve[i] + math.log(1 - 1 / a) - math.log(delta * a) / (a - 1) for i, a in enumerate(orders))


# --------------------------------------------------------------------------- distributions


@pytest.mark.parametrize("eta,gamma", [(-0.5, 0.2), (0.0, 0.1), (1.0, 0.25), (2.5, 0.3)])
def test_truncated_negative_binomial_pmf_and_mean(eta, gamma):
    d = T.truncated_negative_binomial(eta, gamma)
    ks = np.arange(1, 400)  # the tails decay like (1 - gamma)^k: 400 terms leave < 1e-12
    p = np.array([d.pmf(k) for k in ks])
    assert d.pmf(0) == 0.0
    assert p.sum() == pytest.approx(1.0, abs=1e-9)
    assert (ks * p).sum() == pytest.approx(d.mean, rel=1e-9)
    rng = np.random.default_rng(0)
    draws = np.array([d.sample(rng) for _ in range(10000)])
    assert draws.min() >= 1
    assert np.mean(draws == 1) == pytest.approx(d.pmf(1), abs=0.02)
    assert draws.mean() == pytest.approx(d.mean, rel=0.06)


def test_geometric_and_poisson_closed_forms():
    g = T.geometric(0.25)
    assert g.mean == pytest.approx(4.0)
    assert [g.pmf(k) for k in (1, 2, 3)] == pytest.approx([0.25, 0.25 * 0.75, 0.25 * 0.75**2])
    # eta = 0 is the logarithmic distribution: (1 - gamma)^k / (k log(1/gamma))
    lg = T.truncated_negative_binomial(0.0, 0.1)
    assert lg.pmf(3) == pytest.approx(0.9**3 / (3 * math.log(10)))
    assert lg.mean == pytest.approx((1 / 0.1 - 1) / math.log(10))
    p = T.poisson(3.0)
    assert p.pmf(0) == pytest.approx(math.exp(-3)) and p.pmf(2) == pytest.approx(9 / 2 * math.exp(-3))
    rng = np.random.default_rng(1)
    assert np.mean([p.sample(rng) for _ in range(20000)]) == pytest.approx(3.0, rel=0.03)
    assert T.repetitions("tnb", eta=0.5, mean=5.0).mean == pytest.approx(5.0, rel=1e-6)
    assert T.repetitions("geometric", mean=8).gamma == pytest.approx(0.125)


@pytest.mark.parametrize("kw", [dict(kind="poisson", mu=0), dict(kind="truncated_negative_binomial", eta=-1, gamma=0.5),
                                dict(kind="truncated_negative_binomial", eta=1, gamma=1.0), dict(kind="binomial")])
def test_bad_distributions_are_user_errors(kw):
    with pytest.raises(UserError):
        T.Repetitions(**kw)
    with pytest.raises(UserError, match="poisson"):
        T.repetitions("uniform", mean=3)


# --------------------------------------------------------------------------- the bounds


def test_rdp_curve_of_gaussian_is_order_over_two_sigma_squared():
    import dp_accounting as dpa

    o, r = T.rdp_curve(dpa.GaussianDpEvent(SIGMA), ORDERS)
    assert list(o) == ORDERS
    assert r == pytest.approx([gaussian_rdp(a) for a in ORDERS], rel=1e-12)


def test_poisson_bound_matches_hand_evaluation_of_theorem_6():
    """Base: one Gaussian mechanism (sigma = 3); K ~ Poisson(mu = 5). Theorem 6, at each order
    lambda: eps' = lambda/(2 sigma^2) + mu * deltahat + log(mu)/(lambda - 1), with deltahat the
    base's delta at epshat = log(1 + 1/(lambda - 1)); then the RDP -> DP conversion."""
    import dp_accounting as dpa

    mu = 5.0
    curve = []
    for lam in ORDERS:
        eps_hat = math.log(1 + 1 / (lam - 1))
        curve.append(gaussian_rdp(lam) + mu * hand_delta(eps_hat, ORDERS) + math.log(mu) / (lam - 1))
    expected = hand_epsilon(curve, ORDERS)
    got = T.selection_epsilon(dpa.GaussianDpEvent(SIGMA), T.poisson(mu), DELTA, orders=ORDERS, monotone=False)
    assert got.epsilon == pytest.approx(expected, rel=1e-10)
    assert got.rdp == pytest.approx(curve, rel=1e-10)
    # sanity of magnitudes: more than one run, far less than 5 composed runs
    base = hand_epsilon([gaussian_rdp(a) for a in ORDERS], ORDERS)
    assert got.base_epsilon == pytest.approx(base, rel=1e-10)
    assert base < got.epsilon < T.composition_epsilon(dpa.GaussianDpEvent(SIGMA), 5)
    # monotone envelope can only help
    assert T.selection_epsilon(dpa.GaussianDpEvent(SIGMA), T.poisson(mu), DELTA, orders=ORDERS).epsilon <= got.epsilon + 1e-12


def test_geometric_bound_matches_hand_evaluation_of_theorem_2():
    """K ~ Geometric(gamma = 0.2) = D_{1, 0.2}, E[K] = 5. Theorem 2: eps' = eps(lambda) +
    (1 + eta) min_lhat [(1 - 1/lhat) eps(lhat) + log(1/gamma)/lhat] + log(E[K])/(lambda - 1)."""
    import dp_accounting as dpa

    eta, gamma = 1.0, 0.2
    c = (1 + eta) * min((1 - 1 / a) * gaussian_rdp(a) + math.log(1 / gamma) / a for a in ORDERS)
    curve = [gaussian_rdp(lam) + c + math.log(1 / gamma) / (lam - 1) for lam in ORDERS]
    got = T.selection_epsilon(dpa.GaussianDpEvent(SIGMA), T.geometric(gamma), DELTA, orders=ORDERS, monotone=False)
    assert got.epsilon == pytest.approx(hand_epsilon(curve, ORDERS), rel=1e-10)


def test_pure_dp_limit_is_liu_talwar():
    """A pure eps0-DP base (RDP eps0 at every order): at huge orders the bound tends to
    (2 + eta) eps0, i.e. 3 eps0 for the geometric distribution (Liu & Talwar 2019)."""
    eps0 = 0.5
    orders = [2.0, 10.0, 1e2, 1e3, 1e4, 1e5, 1e6]
    rdp = [eps0] * len(orders)
    for eta, gamma in [(1.0, 0.1), (0.0, 0.1), (3.0, 0.3)]:
        sel = T.selection_rdp(orders, rdp, T.truncated_negative_binomial(eta, gamma))
        assert sel[-1] == pytest.approx((2 + eta) * eps0, rel=1e-4)
        assert np.all(np.diff(sel) >= -1e-12)  # monotone in the order


@pytest.mark.parametrize("dist,shape", [(T.poisson(4.0), math.inf), (T.geometric(0.1), 1.0),
                                        (T.truncated_negative_binomial(0.5, 0.05), 0.5),
                                        (T.truncated_negative_binomial(0.0, 0.1), 0.0)])
def test_matches_dp_accounting_repeat_and_select(dist, shape):
    """dp-accounting implements the same theorems independently (RepeatAndSelectDpEvent)."""
    import dp_accounting as dpa
    from dp_accounting.dp_event import RepeatAndSelectDpEvent

    base = accounting.dpsgd_event(1.5, 0.05, 200)
    ours = T.selection_epsilon(base, dist, DELTA, monotone=(shape != math.inf))
    acc = dpa.rdp.RdpAccountant(orders=list(T.SELECTION_ORDERS))
    acc.compose(RepeatAndSelectDpEvent(base, dist.mean, shape))
    assert ours.epsilon == pytest.approx(acc.get_epsilon(DELTA), rel=1e-6)
    assert ours.epsilon > ours.base_epsilon


def test_calibrate_selection_noise_hits_target():
    dist = T.poisson(3.0)
    sigma = T.calibrate_selection_noise(2.0, 0.1, 30, dist, delta=DELTA, score_noise_multiplier=10.0)
    base = T.dpsgd_base(sigma, 0.1, 30, score_noise_multiplier=10.0)
    eps = T.selection_epsilon(base, dist, DELTA).epsilon
    assert 2.0 * 0.99 < eps <= 2.0
    # a single run at that sigma costs less than the target; more runs need more noise
    assert T.selection_epsilon(base, dist, DELTA).base_epsilon < 2.0
    assert T.calibrate_selection_noise(2.0, 0.1, 30, T.poisson(10.0), score_noise_multiplier=10.0) > sigma
    with pytest.raises(UserError, match="no noise multiplier"):
        T.calibrate_selection_noise(0.05, 0.1, 30, dist, score_noise_multiplier=1.0)


# --------------------------------------------------------------------------- running a selection


def test_private_selection_returns_best_and_checks_ledgers():
    base = T.dpsgd_base(2.0, 0.1, 10)
    scores = {"a": 0.1, "b": 0.9, "c": 0.5}
    seen = []

    def run(cand, i):
        seen.append(cand)
        return {"score": scores[cand], "ledger": T.dpsgd_base(2.0, 0.1, 10).to_dict()}

    res = T.private_selection(list(scores), run, T.geometric(0.2), base=base, seed=3, progress=False)
    assert res.k == len(seen) == len(res.runs) >= 1
    assert res.best["score"] == max(scores[c] for c in seen)
    assert res.privacy.runs == res.k
    # same seed, same K and candidates
    again = T.private_selection(list(scores), lambda c, i: {"score": scores[c]}, T.geometric(0.2), base=base,
                                seed=3, progress=False)
    assert [r["candidate"] for r in again.runs] == seen
    d = res.privacy.to_dict()
    assert set(accounting.PrivacyLedger().to_dict()) <= set(d)
    assert d["events"][0]["type"] == "private_selection" and d["events"][0]["runs"] == res.k
    assert d["epsilon"] == pytest.approx(res.epsilon) and d["steps"] == 10

    def greedy(cand, i):  # spends more than the base accounts for
        return {"score": 1.0, "ledger": T.dpsgd_base(1.0, 0.1, 10)}

    with pytest.raises(UserError, match="spent"):
        T.private_selection(["a"], greedy, T.geometric(0.01), base=base, seed=0, progress=False)


def test_private_selection_with_zero_runs_outputs_nothing():
    base = T.dpsgd_base(2.0, 0.1, 10)
    res = T.private_selection(["a"], lambda c, i: {"score": 1.0}, T.poisson(1e-3), base=base, seed=0, progress=False)
    assert res.k == 0 and res.best is None and res.runs == []
    assert res.epsilon > 0  # the guarantee holds (and is paid) whatever K turns out to be


def test_noisy_accuracy_and_composition():
    vals = [T.noisy_accuracy(50, 100, 5.0, seed=s) for s in range(2000)]
    assert np.mean(vals) == pytest.approx(0.5, abs=0.01) and np.std(vals) == pytest.approx(0.05, rel=0.1)
    with pytest.raises(UserError):
        T.noisy_accuracy(5, 10, 0.0)
    base = accounting.dpsgd_event(1.0, 0.1, 20)
    assert T.composition_epsilon(base, 1) == pytest.approx(accounting.epsilon(1.0, 0.1, 20), rel=1e-6)
    assert T.composition_epsilon(base, 7) > T.selection_epsilon(base, T.poisson(7.0)).base_epsilon
