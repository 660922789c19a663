"""Per-mechanism canary audits (dpbench.training.audit_mechanisms): every planted fault is caught,
or reported undetectable at the trial count with a projection of the trials it would need; every
correct mechanism stays under its claim; over-noising is covered by noise-variance checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dpbench.errors import UserError
from dpbench.privacy import accounting
from dpbench.privacy import audit_bounds as B
from dpbench.training import audit_mechanisms as M


def _caught_or_reported(row):
    """A fault row is acceptable iff it is detected, or it is not, with an honest reason:
    no gap (true <= claim), or a projection of more trials than were run."""
    if row["status"] == "detected":
        return row["audited_lb"] > row["claimed_epsilon"]
    if row["status"] == "no gap":
        return row["true_epsilon"] <= row["claimed_epsilon"]
    return row["trials_needed"] is None or row["trials_needed"] > row["trials"]


# ---------------------------------------------------------------------------- statistics cross-checks


@pytest.mark.parametrize("mu", [0.3, 1.0, 2.5])
def test_gaussian_epsilon_matches_the_balle_wang_formula_in_scipy(mu):
    from scipy.stats import norm

    eps = B.gaussian_epsilon(mu, 1e-5)
    # Balle and Wang (2018): delta(eps) = Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu)
    delta = norm.cdf(mu / 2 - eps / mu) - math.exp(eps) * norm.cdf(-mu / 2 - eps / mu)
    assert delta == pytest.approx(1e-5, rel=1e-3)
    assert B.gaussian_epsilon(0.0, 1e-5) == 0.0 and B.gaussian_epsilon(math.inf, 1e-5) == math.inf


def test_shuffle_bound_reduces_to_the_gaussian_with_one_batch_and_shrinks_with_more():
    one = B.shuffle_max_test_epsilon(1.0, 1, 1e-5)
    assert one == pytest.approx(B.gaussian_epsilon(1.0, 1e-5), rel=1e-3)
    assert B.shuffle_max_test_epsilon(1.0, 10, 1e-5) < one
    with pytest.raises(UserError):
        B.shuffle_max_test_epsilon(0.0, 10, 1e-5)


def test_projected_trials_grow_with_the_claim_and_refuse_the_impossible():
    rng = np.random.default_rng(0)
    s_in, s_out = 1.5 + rng.normal(size=200_000), rng.normal(size=200_000)
    low, high = B.projected_trials(s_in, s_out, 0.5), B.projected_trials(s_in, s_out, 1.5)
    assert low is not None and high is not None and low < high
    assert B.projected_trials(rng.normal(size=50_000), rng.normal(size=50_000), 0.5, max_trials=10**6) is None


def test_candidate_cap_keeps_the_bound_valid_and_close():
    rng = np.random.default_rng(1)
    m = rng.random(40_000) < 0.5
    s = m * 2.0 + rng.normal(size=m.size)
    full = B.epsilon_lower_bound(s, m, max_candidates=None)
    capped = B.epsilon_lower_bound(s, m, max_candidates=512)
    assert capped.epsilon <= B.gaussian_epsilon(2.0, 0.0 + 1e-12) and abs(full.epsilon - capped.epsilon) < 0.15


# ---------------------------------------------------------------------------- whole DP-SGD run


@pytest.fixture(scope="module")
def whole_runs():
    kw = dict(canaries=6000, sample_rate=0.2, steps=6, noise_multiplier=1.0, delta=1e-5, seed=0)
    return {v: M.audit_dpsgd_run(v, **kw) for v in M.MECHANISM_VARIANTS["dpsgd_run"]}


def test_whole_run_releases_one_clipped_canary_per_sampled_step(whole_runs):
    a = whole_runs["correct"]
    s = a.scores["sum"]
    # a member contributes exactly C in each step it is sampled: mean q T; the noise sums to N(0, T sigma^2)
    assert s[a.members].mean() == pytest.approx(0.2 * 6, abs=5 * math.sqrt(6 / a.members.sum()))
    assert s[~a.members].mean() == pytest.approx(0.0, abs=5 * math.sqrt(6 / (~a.members).sum()))
    assert s[~a.members].std() == pytest.approx(math.sqrt(6), rel=0.05)
    assert a.claimed_epsilon == pytest.approx(accounting.epsilon(1.0, 0.2, 6, 1e-5, "pld"), rel=1e-6)
    row = M.summarize(a)
    assert row["status"] == "sound" and row["independent"] and row["threat_model"] == "all_iterates"


def test_half_ledger_is_caught_or_reported_with_the_trials_it_needs(whole_runs):
    a = whole_runs["ledger_half_steps"]
    a.simulate_up_to = 50_000  # keep the test short: beyond it, the expected-count lower estimate
    assert a.claimed_epsilon == pytest.approx(accounting.epsilon(1.0, 0.2, 3, 1e-5, "pld"), rel=1e-6)
    assert a.true_epsilon == pytest.approx(accounting.epsilon(1.0, 0.2, 6, 1e-5, "pld"), rel=1e-6)
    row = M.summarize(a)
    assert row["status"] in ("detected", "not detected") and _caught_or_reported(row)
    if row["status"] != "detected":
        assert row["trials_needed"] is None or row["trials_needed"] > 6000


def test_shuffled_batches_run_through_fit_and_are_reported_without_a_known_gap(whole_runs):
    a = whole_runs["shuffled_batches"]
    assert not a.independent and a.true_relation == ">="
    row = M.summarize(a)
    assert row["method"] == "one_run" and np.isnan(row["trials_lb"])
    # one epoch of 5 batches: the max-test bound stays under the Poisson claim -> nothing to catch
    assert row["status"] == "no gap" and _caught_or_reported(row)


def test_whole_run_refuses_full_batches():
    with pytest.raises(UserError):
        M.audit_dpsgd_run("correct", canaries=100, sample_rate=1.0)
    with pytest.raises(UserError):
        M.run_mechanism_audits(include=("dpsgd_run",), run_steps=21)


# ---------------------------------------------------------------------------- adaptive counts


def test_unnoised_counts_are_caught_and_noisy_ones_stay_under_the_claim():
    bad = M.summarize(M.audit_adaptive_counts("unnoised_counts", trials=1500))
    assert bad["status"] == "detected" and bad["true_epsilon"] == math.inf
    good_audit = M.audit_adaptive_counts("correct", trials=4000)
    good = M.summarize(good_audit)
    assert good["status"] == "sound"
    # the canary moves each of the K centred counts by exactly 1/2 (noise std sigma_b)
    s, m = good_audit.scores["count_sum"], good_audit.members
    K = good_audit.settings["groups"]
    sigma_b = good_audit.settings["sigma_b"]
    se = math.sqrt(K) * sigma_b * math.sqrt(1 / m.sum() + 1 / (~m).sum())
    assert s[m].mean() - s[~m].mean() == pytest.approx(K / 2, abs=5 * se)
    assert good_audit.settings["counts_only_epsilon"] <= good["claimed_epsilon"]


# ---------------------------------------------------------------------------- last-layer solvers


def test_least_squares_with_sensitivity_c_is_caught_at_c4():
    row = M.summarize(M.audit_linear("least_squares", "sensitivity_c", trials=2500, epsilon=2.0, clip_norm=4.0))
    assert row["status"] == "detected" and row["true_epsilon"] > 3 * row["claimed_epsilon"]


def test_least_squares_fault_is_no_fault_at_c1():
    a = M.audit_linear("least_squares", "sensitivity_c", trials=40, epsilon=2.0, clip_norm=1.0)
    assert a.true_epsilon == pytest.approx(a.claimed_epsilon, rel=1e-6)


@pytest.mark.parametrize("solver, trials", [("least_squares", 800), ("newton", 600), ("dp_fc", 600)])
def test_correct_solvers_release_the_claimed_signal_and_stay_sound(solver, trials):
    a = M.audit_linear(solver, "correct", trials=trials, epsilon=2.0, clip_norm=4.0)
    row = M.summarize(a, project=False)
    assert row["status"] == "sound" and row["claimed_epsilon"] == pytest.approx(2.0, rel=0.02)
    # the observed statistics carry exactly the claimed shift (unit-variance scores)
    s, m = a.scores["all"], a.members
    mu = a.model_scores(1, np.random.default_rng(0))[0][0] - a.model_scores(1, np.random.default_rng(0))[1][0]
    se = math.sqrt(1 / m.sum() + 1 / (~m).sum())
    assert s[m].mean() - s[~m].mean() == pytest.approx(mu, abs=5 * se)
    assert s[~m].std() == pytest.approx(1.0, rel=0.15)


# ---------------------------------------------------------------------------- per-device noise


def test_per_stage_sigma_ck_is_caught_and_noise_variances_are_right():
    good = M.audit_pipeline_noise("correct", canaries=50_000, stages=4, noise_multiplier=2.0)
    bad = M.audit_pipeline_noise("per_stage_sigma_ck", canaries=120_000, stages=4, noise_multiplier=2.0)
    assert good.scores["sum"][~good.members].std() == pytest.approx(2.0, rel=0.03)
    assert bad.scores["sum"][~bad.members].std() == pytest.approx(1.0, rel=0.03)  # sigma / sqrt(K)
    assert M.summarize(good)["status"] == "sound"
    row = M.summarize(bad)
    assert row["status"] == "detected" and row["true_epsilon"] == pytest.approx(
        accounting.gaussian_mechanism_epsilon(1.0, 1e-5))


# ---------------------------------------------------------------------------- data-parallel noise


def test_data_parallel_noise_on_two_gloo_ranks():
    variants = M.MECHANISM_VARIANTS["data_parallel"] + M.OVER_NOISING["data_parallel"]
    audits = {a.variant: a for a in M.audit_data_parallel(variants, canaries=20_000, noise_multiplier=2.0)}
    sd = {v: a.scores["coordinate"][~a.members].std() for v, a in audits.items()}
    # unit tests of the summed noise: sigma, sigma, 0, sigma/sqrt(W), sigma*sqrt(W)
    assert sd["correct_rank0"] == pytest.approx(2.0, rel=0.03)
    assert sd["correct_shares"] == pytest.approx(2.0, rel=0.03)
    assert sd["no_rank_noise"] == 0.0
    assert sd["shares_var_over_w2"] == pytest.approx(2.0 / math.sqrt(2), rel=0.03)
    assert sd["overnoise_every_rank"] == pytest.approx(2.0 * math.sqrt(2), rel=0.03)
    audits["shares_var_over_w2"].simulate_up_to = 100_000  # keep the test short
    rows = {v: M.summarize(a) for v, a in audits.items()}
    assert rows["correct_rank0"]["status"] == rows["correct_shares"]["status"] == "sound"
    assert rows["no_rank_noise"]["status"] == "detected"
    assert rows["overnoise_every_rank"]["status"] == "no gap"  # more private: no lower bound can catch it
    w2 = rows["shares_var_over_w2"]
    assert _caught_or_reported(w2) and w2["true_epsilon"] > w2["claimed_epsilon"]


# ---------------------------------------------------------------------------- statuses


def _synthetic(variant, scores, members, claim, true, independent=True):
    return M.CanaryAudit("x", variant, "counts", claim, true, 1e-5, members, {"s": scores}, independent=independent,
                         model_scores=lambda k, rng: (3 + rng.normal(size=k), rng.normal(size=k)),
                         simulate_up_to=50_000)


def test_status_rules():
    rng = np.random.default_rng(3)
    m = rng.random(4000) < 0.5
    perfect = m.astype(float)
    assert M.summarize(_synthetic("fault_a", perfect, m, 1.0, math.inf))["status"] == "detected"
    assert M.summarize(_synthetic("correct", perfect, m, 1.0, 1.0))["status"] == "CLAIM REFUTED"
    above = M.summarize(_synthetic("fault_b", perfect, m, 50.0, 60.0))
    assert above["status"] == "undetectable: ceiling below claim" and above["trials_needed"] is None
    noise = rng.normal(size=m.size)
    missed = M.summarize(_synthetic("fault_c", noise, m, 1.0, 5.0))
    assert missed["status"] == "not detected" and missed["trials_needed"] > 0
    assert M.summarize(_synthetic("fault_d", noise, m, 1.0, 0.5))["status"] == "no gap"
    one = M.summarize(_synthetic("fault_e", perfect, m, 1.0, math.inf, independent=False))
    assert one["method"] == "one_run" and one["confidence"] == 0.95


def test_simulated_trials_include_the_cost_of_choosing_the_threshold():
    def draw(k, rng):
        return 1.5 + rng.normal(size=k), rng.normal(size=k)

    rng = np.random.default_rng(0)
    oracle = B.projected_trials(*draw(200_000, rng), 1.0, 0.975, 1e-5)
    sim = B.simulated_trials(draw, 1.0, 0.975, 1e-5, start=500, max_trials=200_000)
    assert sim is not None and sim >= oracle / 2  # never far below the oracle's lower estimate
    assert B.simulated_trials(lambda k, r: (r.normal(size=k), r.normal(size=k)), 0.5, max_trials=4000) is None
