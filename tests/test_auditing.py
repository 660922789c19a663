"""Tests of dpbench.training.audit_runs: the statistics against known values and the papers' formulas,
and the mechanism audit (real ClippingEngine + DPOptimizer) catching the noise-off fault."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from dpbench.privacy import audit_bounds as B
from dpbench.training import audit_runs as A
from dpbench.errors import UserError

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- Clopper-Pearson


def test_clopper_pearson_zero_of_hundred_known_values():
    # Known values (statsmodels proportion_confint(0, 100, method="beta") and the closed form
    # 1 - (alpha)^(1/n) for k = 0): one-sided 95% upper 0.0295, two-sided 95% upper 0.0362.
    lo, hi = B.clopper_pearson(0, 100, 0.95, side="upper")
    assert lo == 0.0 and hi == pytest.approx(0.029513, abs=2e-6)
    assert hi == pytest.approx(1 - 0.05 ** (1 / 100), rel=1e-9)
    lo, hi = B.clopper_pearson(0, 100, 0.95)
    assert lo == 0.0 and hi == pytest.approx(0.036217, abs=2e-6)
    assert hi == pytest.approx(1 - 0.025 ** (1 / 100), rel=1e-9)


def test_clopper_pearson_interior_known_values():
    # statsmodels proportion_confint(5, 100, alpha=0.05, method="beta") = (0.016431, 0.112835)
    lo, hi = B.clopper_pearson(5, 100, 0.95)
    assert lo == pytest.approx(0.016431, abs=2e-6) and hi == pytest.approx(0.112835, abs=2e-6)
    # symmetric case, and the k = n edge mirrors k = 0
    lo, hi = B.clopper_pearson(50, 100)
    assert lo == pytest.approx(1 - hi, abs=1e-12)
    lo, hi = B.clopper_pearson(100, 100, side="lower")
    assert hi == 1.0 and lo == pytest.approx(0.05 ** (1 / 100), rel=1e-9)
    # vectorised
    lo, hi = B.clopper_pearson(np.array([0, 5]), np.array([100, 100]))
    assert hi[0] == pytest.approx(0.036217, abs=2e-6) and lo[1] == pytest.approx(0.016431, abs=2e-6)


def test_clopper_pearson_rejects_bad_counts():
    with pytest.raises(UserError):
        B.clopper_pearson(5, 3)
    with pytest.raises(UserError):
        B.clopper_pearson(1, 10, confidence=1.5)


# ---------------------------------------------------------------------------- rates -> epsilon


def test_epsilon_from_rates_both_directions_and_delta():
    assert B.epsilon_from_rates(0.01, 0.5) == pytest.approx(math.log(0.5 / 0.01))
    assert B.epsilon_from_rates(0.5, 0.01) == pytest.approx(math.log(0.5 / 0.01))
    assert B.epsilon_from_rates(0.01, 0.5, delta=0.1) == pytest.approx(math.log(0.4 / 0.01))
    assert B.epsilon_from_rates(0.6, 0.6) == 0.0  # no information -> 0, never negative


@pytest.mark.parametrize("n, expected", [(100, 3.3), (1_000, 5.6), (10_000, 7.9)])
def test_trial_ceiling_values(n, expected):
    # a perfect attack certifies about 3.3 / 5.6 / 7.9 with 100 / 1,000 / 10,000 per side
    assert round(B.trial_ceiling(n), 1) == expected


def test_trial_ceiling_is_reached_by_a_perfect_attack_and_not_exceeded():
    members = np.arange(2000) % 2 == 0
    scores = members.astype(float)
    b = B.epsilon_lower_bound(scores, members, selection="split", seed=3)
    assert b.fp == 0 and b.fn == 0
    assert b.epsilon == pytest.approx(B.trial_ceiling(b.n_in, b.n_out))
    assert b.epsilon == pytest.approx(b.ceiling)


# ---------------------------------------------------------------------------- many-trials bound


def _randomized_response(eps, n, rng):
    """Pure eps-DP membership test outcomes: member -> 1 with prob e^eps/(1+e^eps)."""
    members = rng.random(n) < 0.5
    p = math.exp(eps) / (1 + math.exp(eps))
    says_in = np.where(members, rng.random(n) < p, rng.random(n) < 1 - p)
    return says_in.astype(float), members


def test_many_trials_bound_is_valid_and_has_power():
    rng = np.random.default_rng(0)
    eps = 1.0
    over = 0
    for rep in range(100):
        s, m = _randomized_response(eps, 1000, rng)
        over += B.epsilon_lower_bound(s, m, seed=rep).epsilon > eps
    assert over <= 10  # <= 5% expected; 10 leaves room for chance
    s, m = _randomized_response(eps, 40_000, rng)
    assert 0.8 * eps < B.epsilon_lower_bound(s, m).epsilon <= eps


def test_split_selection_does_not_invent_leakage_from_noise():
    # Scores independent of membership: choosing the threshold on the certifying trials
    # would often report eps > 0; the held-out split must stay at ~0.
    rng = np.random.default_rng(1)
    positive = 0
    for rep in range(100):
        m = rng.random(600) < 0.5
        s = {"a": rng.normal(size=600), "b": rng.normal(size=600)}
        positive += B.epsilon_lower_bound(s, m, seed=rep).epsilon > 0
    assert positive <= 10


def test_bonferroni_selection_with_fixed_thresholds():
    m = np.arange(1000) % 2 == 0
    s = m.astype(float)
    b = B.epsilon_lower_bound(s, m, selection="bonferroni", thresholds=[0.5])
    assert b.epsilon == pytest.approx(B.trial_ceiling(500))
    b10 = B.epsilon_lower_bound(s, m, selection="bonferroni", thresholds=np.linspace(-1, 2, 10) + 0.01)
    assert b10.epsilon < b.epsilon  # paying for ten comparisons
    with pytest.raises(UserError):
        B.epsilon_lower_bound(s, m, selection="bonferroni")


# ---------------------------------------------------------------------------- one run (Steinke et al.)


def _paper_p_value(m, r, v, eps, delta):
    """The (eps, delta) p-value of Steinke, Nasr & Jagielski (2023), Theorem 5.2, written
    out from point masses: P[Bin(r,q) >= v] + 2 m delta max_i (1/i) sum_{j=v-i}^{v-1} P[Bin = j]."""
    from scipy.stats import binom

    q = 1 / (1 + math.exp(-eps))
    pmf = binom.pmf(np.arange(r + 1), r, q)
    tail = pmf[v:].sum()
    windows = np.cumsum(pmf[:v][::-1])  # i = 1..v: sum of P[Bin = v-1], ..., P[Bin = v-i]
    worst = max((windows / np.arange(1, v + 1)).max(), 0.0) if v else 0.0
    return min(tail + 2 * m * delta * worst, 1.0)


def _paper_epsilon(m, r, v, confidence, delta):
    """Largest eps with p-value <= 1 - confidence, by plain bisection on the formula above."""
    alpha = 1 - confidence
    lo, hi = 0.0, 20.0
    if _paper_p_value(m, r, v, 0.0, delta) > alpha:
        return 0.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if _paper_p_value(m, r, v, mid, delta) <= alpha:
            lo = mid
        else:
            hi = mid
    return lo


@pytest.mark.parametrize("delta", [0.0, 1e-5])
def test_one_run_bound_matches_paper_formula_on_simulated_guesses(delta):
    rng = np.random.default_rng(2)
    m, eps_true = 1000, 2.0
    p = math.exp(eps_true) / (1 + math.exp(eps_true))
    for r in (50, 200, 1000):
        v = int((rng.random(r) < p).sum())  # an eps_true-DP guesser's correct guesses
        ours = B.one_run_epsilon(m, r, v, 0.95, delta)
        ref = _paper_epsilon(m, r, v, 0.95, delta)
        assert ours == pytest.approx(ref, abs=1e-6)
        assert B.one_run_p_value(m, r, v, 1.3, delta) == pytest.approx(_paper_p_value(m, r, v, 1.3, delta), rel=1e-9)


def test_one_run_bound_is_valid_for_randomized_response():
    rng = np.random.default_rng(3)
    eps = 1.0
    p = math.exp(eps) / (1 + math.exp(eps))
    over = sum(B.one_run_epsilon(1000, 500, int((rng.random(500) < p).sum()), 0.95) > eps for _ in range(400))
    assert over <= 30  # 5% of 400 = 20 expected at most


def test_one_run_audit_on_scores():
    rng = np.random.default_rng(4)
    m = rng.random(2000) < 0.5
    perfect = B.one_run_audit(m.astype(float), m, delta=1e-5)
    assert perfect.correct == perfect.guesses and perfect.epsilon > 3
    noise = B.one_run_audit(rng.normal(size=2000), m, delta=1e-5)
    assert noise.epsilon < 0.5
    with pytest.raises(UserError):
        B.one_run_epsilon(10, 5, 6)


def test_roc_curve_auc():
    m = np.arange(100) % 2 == 0
    fpr, tpr, auc = B.roc_curve(m.astype(float), m)
    assert auc == pytest.approx(1.0) and fpr[0] == 0 and tpr[-1] == 1
    rng = np.random.default_rng(5)
    _, _, auc = B.roc_curve(rng.normal(size=20000), rng.random(20000) < 0.5)
    assert auc == pytest.approx(0.5, abs=0.02)


# ---------------------------------------------------------------------------- mechanism audit


def test_noise_off_fault_is_detected_with_the_real_optimizer():
    audit = A.audit_mechanism("fault/no_noise", 1.0, trials=300, seed=0)
    row = A.summarize(audit)
    assert row["detected"] and row["audited_lb"] > row["claimed_epsilon"] + 1.0
    correct = A.summarize(A.audit_mechanism("correct/bk", 1.0, trials=300, seed=0))
    assert not correct["detected"] and correct["audited_lb"] <= correct["claimed_epsilon"]


def test_other_faults_are_detected_and_methods_agree():
    for v in ("fault/unclipped_layer", "fault/step_every_physical"):
        row = A.summarize(A.audit_mechanism(v, 2.0, trials=300))
        assert row["detected"], v
    a = A.audit_mechanism("correct/instantiate", 1.0, trials=30)
    b = A.audit_mechanism("correct/ghost", 1.0, trials=30)
    np.testing.assert_allclose(a.scores["total"], b.scores["total"], atol=1e-9)


def test_memoised_engine_is_bit_identical_to_recomputing():
    kw = dict(trials=4, sample_rate=1.0, steps=2, seed=1)  # step 1 replays, step 2 (noisy theta) cannot
    for v in ("correct/bk", "fault/step_every_physical"):
        fast = A.audit_mechanism(v, 1.0, memoize=True, **kw)
        slow = A.audit_mechanism(v, 1.0, memoize=False, **kw)
        assert fast.engine_replays > 0 and slow.engine_replays == 0
        for k in fast.scores:
            np.testing.assert_array_equal(fast.scores[k], slow.scores[k])


def test_gradient_canary_is_clipped_to_one_unit_and_orthogonal_to_clean_data():
    a = A.audit_mechanism("fault/no_noise", 1.0, trials=40)
    s = a.scores["total"]
    np.testing.assert_allclose(s[a.members], 1.0, atol=1e-9)  # exactly C along u
    np.testing.assert_allclose(s[~a.members], 0.0, atol=1e-9)  # clean data contributes nothing


def test_q_understated_claim_uses_the_stated_rate():
    a = A.audit_mechanism("fault/q_understated", 1.0, trials=4, understate_factor=100)
    assert a.stated_sample_rate == pytest.approx(a.sample_rate / 100)
    assert a.claimed_epsilon <= 1.0 + 1e-9
    assert a.true_epsilon() > 2 * a.claimed_epsilon


def test_bad_variant_and_explanations():
    with pytest.raises(UserError):
        A.audit_mechanism("fault/typo", 1.0, trials=10)
    rows = [
        {"variant": "correct/bk", "fault": "", "canary": "gradient", "claimed_epsilon": 1.0, "audited_lb": 0.2,
         "confidence": 0.95},
        {"variant": "fault/q_understated", "fault": "q_understated", "canary": "gradient", "claimed_epsilon": 2.0,
         "audited_lb": 1.5, "detected": False, "true_epsilon": 6.0, "ceiling": 4.5, "trials": 1000, "auc": 0.8,
         "confidence": 0.95},
    ]
    text = A.explain_detection(rows)
    assert "all 1 settings" in text and "NOT detected" in text and "6.00" in text


# ---------------------------------------------------------------------------- notebook profiles


def test_smoke_profile_matches_parameters_cell():
    import ast

    import nbformat
    import yaml

    nb = nbformat.read(REPO / "notebooks" / "06_privacy_audit.ipynb", as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code")
    assert "parameters" in cell.metadata.get("tags", [])
    defaults = {}
    for node in ast.parse(cell.source).body:
        defaults[node.targets[0].id] = ast.literal_eval(node.value)
    reserved = {"profile", "output_dir", "seed", "device"}
    smoke = yaml.safe_load((REPO / "params" / "06_privacy_audit" / "smoke.yaml").read_text()) or {}
    assert smoke == {k: v for k, v in defaults.items() if k not in reserved}
    for prof in ("cpu", "gpu"):
        p = yaml.safe_load((REPO / "params" / "06_privacy_audit" / f"{prof}.yaml").read_text()) or {}
        assert set(p) - {"requires"} <= set(defaults), prof
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code")


def test_canary_scores_use_the_audited_model_with_the_engine_paused(monkeypatch):
    """No twin model: one model per audit; its engine is paused for canary directions/losses."""
    from dpbench.clipping import ClippingEngine
    from dpbench.training import audit_runs

    built, paused = [], []
    real_new, real_paused = audit_runs.AuditTask.new_model, ClippingEngine.paused

    def counting_new(self):
        built.append(1)
        return real_new(self)

    def counting_paused(self):
        paused.append(1)
        return real_paused(self)

    monkeypatch.setattr(audit_runs.AuditTask, "new_model", counting_new)
    monkeypatch.setattr(ClippingEngine, "paused", counting_paused)
    for canary in ("gradient", "input"):
        built.clear()
        audit_runs.AuditTask(canary)
        setup = len(built)  # the task's own set-up (theta_0, the canary scale)
        built.clear(), paused.clear()
        audit_runs.audit_mechanism("correct/bk", 2.0, trials=3, canary=canary, steps=2, sample_rate=0.5)
        assert len(built) == setup + 1  # the audited model, and no twin
        assert paused  # canary directions / losses ran with the engine paused
