"""Tests for dpbench.privacy.accounting: against Opacus's RDP accountant (an independent
implementation), the exact Gaussian mechanism, PLD <= RDP, inversion and the ledger."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from dpbench.privacy import accounting as A
from dpbench.errors import UserError

SETTINGS = [  # (sigma, q, steps)
    (1.0, 0.01, 1000),
    (0.8, 0.004, 5000),
    (2.0, 0.1, 100),
    (1.1, 0.001, 20000),
    (5.0, 1.0, 10),
]


def test_import_does_not_load_dp_accounting():
    code = "import sys, dpbench.privacy.accounting; assert 'dp_accounting' not in sys.modules; assert 'scipy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def _opacus_epsilon(sigma, q, steps, delta=1e-5):
    from opacus.accountants.analysis import rdp as opacus_rdp

    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512]
    rdp = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
    eps, _ = opacus_rdp.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


@pytest.mark.parametrize("sigma,q,steps", SETTINGS)
def test_rdp_matches_opacus(sigma, q, steps):
    pytest.importorskip("opacus")
    ours = A.epsilon(sigma, q, steps, accountant="rdp")
    ref = _opacus_epsilon(sigma, q, steps)
    assert ours == pytest.approx(ref, rel=0.01)
    # our order grid is denser, so it can only be tighter than Opacus's (up to float rounding)
    assert ours <= ref * (1 + 1e-5)


def test_rdp_matches_opacus_accountant_object():
    opacus = pytest.importorskip("opacus")
    acc = opacus.accountants.RDPAccountant()
    acc.history = [(1.0, 0.01, 1000), (2.0, 0.02, 200)]
    ref = acc.get_epsilon(delta=1e-5)
    ours = A.sampled_composition_epsilon([(1.0, 0.01, 1000), (2.0, 0.02, 200)], 1e-5, "rdp")
    assert ours == pytest.approx(ref, rel=0.01)


@pytest.mark.parametrize("sigma,q,steps", SETTINGS)
def test_pld_at_most_rdp(sigma, q, steps):
    rdp = A.epsilon(sigma, q, steps, accountant="rdp")
    pld = A.epsilon(sigma, q, steps, accountant="pld")
    assert 0 < pld <= rdp * 1.001
    # and PLD is really tighter in these regimes, not an accidental copy of RDP
    assert pld < 0.97 * rdp


@pytest.mark.parametrize("sigma", [0.7, 1.0, 2.0, 5.0, 20.0])
def test_pure_gaussian_matches_closed_form(sigma):
    delta = 1e-5
    exact = A.gaussian_mechanism_epsilon(sigma, delta)
    # the closed form really solves delta(eps) = delta
    assert A.gaussian_delta(exact, sigma) == pytest.approx(delta, rel=1e-6)
    pld = A.epsilon(sigma, 1.0, 1, delta, accountant="pld")
    rdp = A.epsilon(sigma, 1.0, 1, delta, accountant="rdp")
    assert pld == pytest.approx(exact, rel=2e-3, abs=2e-4)
    assert pld >= exact * (1 - 1e-6)  # pessimistic PLD is still an upper bound
    assert rdp >= exact
    assert rdp < exact * 1.5


def test_gaussian_delta_known_value():
    # sigma = 1, eps = 0: delta = Phi(1/2) - Phi(-1/2) = 0.382924922548...
    assert A.gaussian_delta(0.0, 1.0) == pytest.approx(0.3829249225480262, rel=1e-12)


def test_self_composed_gaussian_is_one_gaussian():
    # k releases with sigma compose exactly to one release with sigma / sqrt(k)
    exact = A.gaussian_mechanism_epsilon(4.0 / math.sqrt(9), 1e-5)
    assert A.epsilon(4.0, 1.0, 9, accountant="pld") == pytest.approx(exact, rel=2e-3)


def test_edge_cases():
    assert A.epsilon(1.0, 0.01, 0) == 0.0
    assert A.epsilon(1.0, 0.0, 100) == 0.0
    assert A.epsilon(0.0, 0.01, 100) == math.inf
    assert A.epsilon(0.0, 0.01, 100, accountant="pld") == math.inf
    assert A.epsilon(1.0, 1.0, 1) == pytest.approx(A.epsilon(1.0, 1.0, 1, accountant="rdp"))
    with pytest.raises(UserError):
        A.epsilon(1.0, 1.5, 10)
    with pytest.raises(UserError):
        A.epsilon(-1.0, 0.1, 10)
    with pytest.raises(UserError):
        A.epsilon(1.0, 0.1, -3)
    with pytest.raises(UserError, match="unknown accountant"):
        A.epsilon(1.0, 0.1, 10, accountant="prv")


def test_epsilon_monotone():
    e = [A.epsilon(1.0, 0.01, t) for t in (10, 100, 1000)]
    assert e[0] < e[1] < e[2]
    e = [A.epsilon(s, 0.01, 1000, accountant="pld") for s in (0.8, 1.0, 2.0)]
    assert e[0] > e[1] > e[2]


def test_epsilon_curve_equals_pointwise():
    steps = [0, 1, 50, 500, 3000]
    for acc in ("rdp", "pld"):
        curve = A.epsilon_curve(1.2, 0.02, steps, accountant=acc)
        point = [A.epsilon(1.2, 0.02, t, accountant=acc) for t in steps]
        assert curve == pytest.approx(point, rel=1e-9)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_noise_multiplier_inverts_epsilon(accountant):
    q, steps, target = 0.01, 1000, 2.0
    sigma = A.noise_multiplier(target, q, steps, accountant=accountant, tol=1e-3)
    eps = A.epsilon(sigma, q, steps, accountant=accountant)
    assert eps <= target
    assert eps > target * 0.99  # and it is not wastefully large
    assert A.epsilon(sigma * 0.99, q, steps, accountant=accountant) > target


def test_noise_multiplier_pld_below_rdp_and_gdp_clt():
    rdp = A.noise_multiplier(1.0, 0.004, 2500, accountant="rdp")
    pld = A.noise_multiplier(1.0, 0.004, 2500, accountant="pld")
    gdp = A.noise_multiplier(1.0, 0.004, 2500, accountant="gdp_clt")
    assert pld < rdp
    assert gdp == pytest.approx(pld, rel=0.1)  # CLT is a close approximation at small q


def test_noise_multiplier_refuses_impossible_targets():
    with pytest.raises(UserError, match="target epsilon"):
        A.noise_multiplier(0.0, 0.01, 100)
    with pytest.raises(UserError, match="target epsilon"):
        A.noise_multiplier(-1.0, 0.01, 100)
    with pytest.raises(UserError, match="too small"):
        A.noise_multiplier(1e-9, 1.0, 100)
    assert A.noise_multiplier(1.0, 0.01, 0) == 0.0


def test_heterogeneous_composition_equals_self_composition():
    for acc in ("rdp", "pld"):
        het = A.gaussian_composition_epsilon([3.0, 3.0, 3.0, 3.0], 1e-5, acc)
        assert het == pytest.approx(A.epsilon(3.0, 1.0, 4, accountant=acc), rel=1e-6)
        phases = A.sampled_composition_epsilon([(1.0, 0.01, 300), (1.0, 0.01, 700)], 1e-5, acc)
        assert phases == pytest.approx(A.epsilon(1.0, 0.01, 1000, accountant=acc), rel=1e-6)
    # heterogeneous Gaussians = one Gaussian with sigma^-2 = sum sigma_j^-2 (exact)
    sigmas = [2.0, 3.0, 6.0]
    eff = sum(s**-2 for s in sigmas) ** -0.5
    exact = A.gaussian_mechanism_epsilon(eff, 1e-5)
    assert A.gaussian_composition_epsilon(sigmas, 1e-5, "pld") == pytest.approx(exact, rel=3e-3)
    assert A.gaussian_composition_epsilon(sigmas, 1e-5, "rdp") >= exact
    # composition adds privacy loss
    assert A.sampled_composition_epsilon([(1.0, 0.01, 500), (2.0, 0.05, 200)], 1e-5) > A.epsilon(1.0, 0.01, 500)


def test_calibrate_common_noise_and_weights():
    for acc in ("rdp", "pld"):
        s = A.calibrate_common_noise(1.0, 3, 1e-5, acc)
        assert A.gaussian_composition_epsilon([s] * 3, 1e-5, acc) <= 1.0
        assert A.gaussian_composition_epsilon([s * 0.99] * 3, 1e-5, acc) > 1.0
    sig = A.calibrate_gaussian_releases(1.0, [1.0, 10.0], 1e-5, "rdp")
    assert sig[0] / sig[1] == pytest.approx(math.sqrt(10.0))
    assert A.gaussian_composition_epsilon(sig, 1e-5, "rdp") <= 1.0
    # dp-accounting's conversion needs less noise than the classic one
    assert A.calibrate_common_noise(1.0, 3) < A.classic_noise_multiplier(1.0, 3)


@pytest.mark.parametrize(
    "releases,eps,expected",
    [(3, 0.1, 83.3), (3, 1.0, 8.5), (3, 8.0, 1.20), (11, 0.1, 159.5), (11, 1.0, 16.3), (11, 8.0, 2.29)],
)
def test_classic_reference_values(releases, eps, expected):
    # DP-LS (3 releases) and DP-FC with T = 10 (11 releases), delta = 1e-5 (Mehta et al.)
    s = A.classic_noise_multiplier(eps, releases, 1e-5)
    assert s == pytest.approx(expected, rel=0.02)
    assert A.classic_rdp_epsilon(releases / s**2, 1e-5) == pytest.approx(eps, rel=1e-9)


def test_classic_closed_form_is_the_minimum_over_alpha():
    beta, delta = 0.05, 1e-5
    grid = [1 + i / 100 for i in range(1, 20000)]
    brute = min(a * beta / 2 + math.log(1 / delta) / (a - 1) for a in grid)
    assert A.classic_rdp_epsilon(beta, delta) == pytest.approx(brute, rel=1e-4)
    assert A.classic_rdp_epsilon(beta, delta) <= brute


def test_check_delta():
    assert A.check_delta(1e-5, 50_000) == 1e-5
    assert A.check_delta(1e-5, None) == 1e-5
    with pytest.raises(UserError, match="1/n"):
        A.check_delta(1e-3, 1000)
    with pytest.raises(UserError, match="1/n"):
        A.check_delta(1e-2, 1000)
    with pytest.raises(UserError):
        A.check_delta(0.0, 1000)
    with pytest.raises(UserError):
        A.check_delta(-1e-5, 1000)
    with pytest.raises(UserError):
        A.check_delta(1e-5, 0)


def test_combined_noise_multiplier_and_split():
    for sigma, k, r in [(1.0, 4, 0.01), (2.5, 10, 0.1), (0.7, 1, 0.5)]:
        sg, sb = A.split_noise_for_counts(sigma, k, r)
        assert sg > sigma and sb > 0
        assert A.combined_noise_multiplier(sg, sb, k) == pytest.approx(sigma, rel=1e-12)
    assert A.combined_noise_multiplier(1.3, math.inf, 5) == pytest.approx(1.3)
    # two equal sources of information combine like sigma / sqrt(2)
    assert A.combined_noise_multiplier(1.0, 0.5, 1) == pytest.approx(1 / math.sqrt(2))
    with pytest.raises(UserError):
        A.split_noise_for_counts(1.0, 4, 0.0)
    with pytest.raises(UserError):
        A.split_noise_for_counts(1.0, 4, 1.0)


def test_ledger_records_merges_and_matches_epsilon(tmp_path):
    ledger = A.PrivacyLedger(delta=1e-5, n=50_000, accountant="rdp")
    for _ in range(10):
        ledger.record_dpsgd(1.0, 0.01)
    ledger.record_dpsgd(1.0, 0.01, steps=990)
    assert len(ledger.events) == 1 and ledger.steps == 1000
    assert ledger.epsilon() == pytest.approx(A.epsilon(1.0, 0.01, 1000), rel=1e-12)
    assert ledger.epsilon("pld") == pytest.approx(A.epsilon(1.0, 0.01, 1000, accountant="pld"), rel=1e-12)

    ledger.record_dpsgd(2.0, 0.02, steps=100)
    ledger.record_gaussian(5.0, count=2, label="feature covariance")
    assert ledger.steps == 1100 and len(ledger.events) == 3
    expected = A.event_epsilon(
        A._compose([A.dpsgd_event(1.0, 0.01, 1000), A.dpsgd_event(2.0, 0.02, 100), A.gaussian_event(5.0, 2)])
    )
    assert ledger.epsilon() == pytest.approx(expected, rel=1e-12)
    assert ledger.epsilon() > A.epsilon(1.0, 0.01, 1000)

    ledger.mark_approximate("shuffled batches, not Poisson")
    d = ledger.to_dict()
    assert d["adjacency"] == "add/remove one example"
    assert d["delta"] == 1e-5 and d["n"] == 50_000 and d["world_size"] == 1
    assert d["approximate"] is True and "shuffled" in d["approximate_reason"]
    assert d["epsilon"] == pytest.approx(ledger.epsilon())

    path = ledger.save(tmp_path / "ledger.json")
    assert json.loads(open(path).read())["steps"] == 1100
    again = A.PrivacyLedger.load(path)
    assert again.events == ledger.events
    assert again.approximate and again.approximate_reasons == ledger.approximate_reasons
    assert again.epsilon() == pytest.approx(ledger.epsilon(), rel=1e-12)
    assert again.to_dict() == d


def test_ledger_validates():
    with pytest.raises(UserError, match="1/n"):
        A.PrivacyLedger(delta=1e-3, n=1000)
    with pytest.raises(UserError, match="accountant"):
        A.PrivacyLedger(accountant="gdp_clt")
    with pytest.raises(UserError):
        A.PrivacyLedger(world_size=0)
    empty = A.PrivacyLedger()
    assert empty.epsilon() == 0.0 and empty.steps == 0
    nonprivate = A.PrivacyLedger()
    nonprivate.record_dpsgd(0.0, 0.1, 5)
    assert nonprivate.epsilon() == math.inf


# ---------------------------------------------------------------- notebook 00 curves


def test_curve_helpers():
    from dpbench.experiments import privacy_accounting as ap

    assert ap.log_grid(10, 1000, 3, integer=True) == [10, 100, 1000]
    assert ap.steps_for_epochs(10, 0.01) == 1000
    assert ap.steps_for_epochs(5, 0.3) == 17
    assert ap.inverse_reference([10, 20, 40], 10, 4.0) == [4.0, 2.0, 1.0]
    assert ap.loglog_slope([1, 10, 100], [5, 0.5, 0.05]) == pytest.approx(-1.0)
    with pytest.raises(UserError):
        ap.steps_for_epochs(10, 0.0)


def test_local_slopes_catch_a_rise_that_the_fitted_slope_hides():
    from dpbench.experiments import privacy_accounting as ap

    # unsorted input; falls 1/B, then rises by a factor 2 over the last decade
    xs, ys = [100, 1, 10, 1000], [0.1, 10.0, 1.0, 0.2]
    assert ap.local_loglog_slopes(xs, ys) == pytest.approx([-1.0, -1.0, math.log10(2)])
    assert ap.loglog_slope(xs, ys) < 0  # the fit alone would call this curve falling
    rows = [dict(accountant=a, batch_size=b, noise_level=v) for a, pts in
            {"rdp": [(1, 4.0), (10, 0.4)], "pld": list(zip(xs, ys))}.items() for b, v in pts]
    assert ap.max_local_slope(rows) == pytest.approx(math.log10(2))
    assert ap.max_local_slope([r for r in rows if r["accountant"] == "rdp"]) == pytest.approx(-1.0)
    assert math.isnan(ap.max_local_slope(rows[:1]))


def test_notebook_curves_and_figures():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dpbench.experiments import privacy_accounting as ap

    rows1 = ap.epsilon_vs_steps([1.0], 0.05, [10, 100], 1e-5, ["rdp", "pld"], progress=False)
    assert len(rows1) == 4
    by = {(r["accountant"], r["steps"]): r["epsilon"] for r in rows1}
    assert by[("rdp", 100)] == pytest.approx(A.epsilon(1.0, 0.05, 100))
    assert by[("pld", 100)] <= by[("rdp", 100)]

    rows3 = ap.noise_level_vs_batch_size(4.0, 2.0, 10_000, [1000, 10_000], 1e-5, ["rdp", "gdp_clt"], tol=1e-2, progress=False)
    assert {r["steps"] for r in rows3} == {20, 2}
    for r in rows3:
        assert r["noise_level"] == pytest.approx(r["noise_multiplier"] ** 2 / r["batch_size"])
        if r["accountant"] == "rdp":
            assert A.epsilon(r["noise_multiplier"], r["sample_rate"], r["steps"]) <= 4.0
    rdp = sorted((r["batch_size"], r["noise_level"]) for r in rows3 if r["accountant"] == "rdp")
    assert rdp[1][1] < rdp[0][1]  # larger batches: less noise per averaged gradient
    with pytest.raises(UserError, match="1/n"):
        ap.noise_level_vs_batch_size(4.0, 2.0, 1000, [100], 1e-2, ["rdp"], progress=False)

    rows2 = ap.noise_vs_sample_rate([2.0], 1.0, [0.1, 1.0], 1e-5, ["rdp"], tol=1e-2, progress=False)
    assert rows2[0]["noise_multiplier"] < rows2[1]["noise_multiplier"]
    for fig in (ap.plot_epsilon_vs_steps(rows1), ap.plot_noise_vs_sample_rate(rows2), ap.plot_noise_level_vs_batch_size(rows3)):
        assert fig.axes[0].get_lines()
        plt.close(fig)


# ---------------------------------------------------------------- the shared cache and calibration


def test_cache_is_keyed_by_the_event_and_shared_by_the_ledger():
    A.clear_cache()
    e1 = A.epsilon(1.3, 0.02, 400)
    assert A.cache_info()["misses"] == 1
    assert A.epsilon(1.3, 0.02, 400) == e1 and A.cache_info()["hits"] == 1
    # a ledger with the same mechanism is the same event: no new accountant call
    led = A.PrivacyLedger()
    led.record_dpsgd(1.3, 0.02, 400)
    assert led.epsilon() == e1 and A.cache_info()["misses"] == 1
    # a different delta, accountant or event is a different entry with a different value
    assert A.epsilon(1.3, 0.02, 400, delta=1e-6) > e1
    assert A.epsilon(1.3, 0.02, 401) > e1
    assert A.epsilon(1.3, 0.02, 400, accountant="pld") < e1
    assert A.cache_info()["misses"] == 4
    sigma = A.noise_multiplier(2.0, 0.02, 400, tol=1e-3)
    misses = A.cache_info()["misses"]
    assert A.noise_multiplier(2.0, 0.02, 400, tol=1e-3) == sigma and A.cache_info()["misses"] == misses
    A.clear_cache()
    assert A.cache_info() == {"hits": 0, "misses": 0, "entries": 0, "size": A.CACHE_SIZE}


def test_gdp_clt_noise_multiplier_is_the_closed_form_inverse():
    for q, steps, target in [(0.004, 2500, 1.0), (0.05, 200, 4.0), (1.0, 3, 0.5)]:
        s = A.gdp_clt_noise_multiplier(target, q, steps)
        assert A.gdp_clt_epsilon(s, q, steps) <= target
        assert A.gdp_clt_epsilon(s, q, steps) == pytest.approx(target, rel=1e-6)
        assert A.noise_multiplier(target, q, steps, accountant="gdp_clt") == s
    with pytest.raises(UserError, match="too small"):
        A.noise_multiplier(1e-9, 1.0, 100, accountant="gdp_clt")


def test_calibration_counts_few_accountant_calls_from_the_warm_start():
    # the CLT warm start and a 1.15 bracket: a handful of accountant evaluations, not dozens
    A.clear_cache()
    A.noise_multiplier(2.0, 0.01, 300, accountant="rdp", tol=1e-3)
    assert A.cache_info()["misses"] <= 12


@pytest.mark.parametrize("eps", [0.5, 8.0, 60.0])
def test_gaussian_release_calibration_from_the_exact_floor_matches_the_full_search(eps):
    # the exact Gaussian mechanism's scale is a floor no accountant beats: starting there (one or
    # two accountant calls) gives the full search's answer to within its tolerance, on the safe side
    import dp_accounting as dpa

    weights = [1.0, 1.0, 3.0]
    shape = [math.sqrt(sum(weights) / w) for w in weights]
    make_event = lambda s: A._compose([A.gaussian_event(s * c) for c in shape])  # noqa: E731
    eps_of = A._accountant_epsilon("pld", make_event)
    floor = float(dpa.get_sigma_gaussian(eps, 1e-6)) * math.sqrt(sum(c**-2 for c in shape))
    full = A.calibrate_noise_scale(make_event, eps, 1e-6, eps_of, start=floor, factor=1.15)
    A.clear_cache()
    fast = A.calibrate_noise_scale(make_event, eps, 1e-6, eps_of, start=floor, factor=1.15, floor=floor)
    assert fast == pytest.approx(full, rel=1e-3) and fast >= floor
    assert A.event_epsilon(make_event(fast), 1e-6, "pld") <= eps
    assert A.calibrate_gaussian_releases(eps, weights, 1e-6, "pld")[0] / shape[0] == pytest.approx(full, rel=1e-3)


@pytest.mark.parametrize("eps", [2.0, 400.0])
def test_pld_of_gaussian_releases_on_a_grid_relative_to_epsilon_stays_a_tight_upper_bound(eps):
    # at large epsilon the PLD grid is PLD_RELATIVE_INTERVAL * epsilon: still pessimistic, still tight
    s = 2.0 * A.calibrate_common_noise(eps, 1, 1e-6, "pld")
    exact = A.gaussian_mechanism_epsilon(s / 2, 1e-6)  # four releases at s compose to one at s / 2
    got = A.gaussian_composition_epsilon([s] * 4, 1e-6, "pld")
    assert exact * (1 - 1e-9) <= got <= exact * (1 + 1e-4)


def test_calibrate_gaussian_releases_refuses_the_clt_approximation():
    with pytest.raises(UserError, match="unknown accountant"):
        A.calibrate_gaussian_releases(1.0, 3, 1e-5, "gdp_clt")
