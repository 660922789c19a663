"""The verdict rules (dpbench.workbench.verdicts) and the paper values they are applied to."""

from __future__ import annotations

import csv
import itertools
import math
import re
from pathlib import Path

import numpy as np
import pytest

from dpbench.workbench import verdicts as V
from dpbench.workbench.verdicts import (CONSISTENT, INCONCLUSIVE, INCONSISTENT, LEANS_AGAINST, NOT_COMPARABLE,
                                       NOT_REPRODUCED, NOT_RUN, REPRODUCED_QUALITATIVELY, REPRODUCED_WITHIN_TOLERANCE,
                                       Estimate)

REFERENCES = Path(__file__).resolve().parents[1] / "references" / "paper_values.csv"


def rows(values, method="m", metric="acc", seeds=None, **extra):
    """Seeded rows (seed 0..n-1 unless given), as metrics.csv would hold them (strings)."""
    seeds = range(len(values)) if seeds is None else seeds
    return [{"method": method, "metric": metric, "value": str(v), "seed": str(s), "status": "ok", **extra}
            for v, s in zip(values, seeds)]


# ---------------------------------------------------------------- statistics


@pytest.mark.parametrize("df", [1, 2, 3, 4.5, 7, 10.3, 29, 30, 31, 45.7, 100, 1000])
def test_t_quantile_matches_scipy(df):
    stats = pytest.importorskip("scipy.stats")
    assert V.t_quantile(df) == pytest.approx(stats.t.ppf(0.975, df), rel=2e-3)


def test_t_quantile_rejects_nonpositive_df():
    with pytest.raises(ValueError):
        V.t_quantile(0)


def test_estimate_from_seeds_is_a_t_interval():
    vals = [0.80, 0.82, 0.86]
    est = V.estimate(rows(vals))
    mean = sum(vals) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / 2)
    assert est.mean == pytest.approx(mean) and est.n == 3 and est.sd == pytest.approx(sd)
    assert est.half_width == pytest.approx(4.3027 * sd / math.sqrt(3), rel=1e-4)
    assert not est.exact and est.known and est.low < mean < est.high


def test_estimate_single_seed_has_unknown_spread():
    est = V.estimate(rows([0.9]))
    assert est.mean == 0.9 and est.half_width is None and not est.known and est.n == 1
    assert "spread unknown" in est.describe()


def test_estimate_unseeded_rows_are_exact_only_when_marked():
    est = V.estimate([{"value": "8.5", "seed": "", "exact": "True"}, {"value": "8.5", "seed": ""}])
    assert est.exact and est.half_width == 0 and est.mean == 8.5 and "(exact)" in est.describe()
    mean_of_seeds = V.estimate([{"value": "0.85", "seed": ""}])  # could be an average: spread unknown
    assert not mean_of_seeds.exact and mean_of_seeds.half_width is None and "not marked exact" in mean_of_seeds.note
    repeats = V.estimate([{"value": "1"}, {"value": "2"}, {"value": "3"}])
    assert not repeats.exact and repeats.n == 3 and repeats.half_width > 0


def test_estimate_uses_last_step_and_skips_failed_and_blank_rows():
    r = rows([0.1, 0.2], step="0") + rows([0.5, 0.7], step="10")
    r += [{"value": "", "seed": "5", "status": "ok"}, {"value": "0.0", "seed": "6", "status": "failed", "reason": "x"}]
    est = V.estimate(r)
    assert est.n == 2 and est.mean == pytest.approx(0.6)
    assert V.estimate([{"value": "nan", "seed": "1"}]) is None


def test_estimate_from_summary_row():
    est = V.estimate([{"value": "0.9", "sd": "0.02", "n_seeds": "4", "seed": ""}])
    assert est.mean == 0.9 and est.n == 4
    assert est.half_width == pytest.approx(3.1824 * 0.02 / 2, rel=1e-4)
    one = V.estimate([{"value": "0.9", "sd": "", "n_seeds": "1", "seed": ""}])
    assert one.half_width is None and not one.exact  # one seed summarised: still no spread


def test_difference_paired_welch_and_exact():
    a = V.estimate(rows([1.0, 2.0, 3.0]))
    b = V.estimate(rows([0.9, 1.9, 2.9]))
    paired = V.difference(a, b)
    assert paired.mean == pytest.approx(0.1) and paired.half_width == pytest.approx(0.0, abs=1e-12)
    assert "paired" in paired.note
    # different seeds -> Welch: the large between-seed spread swamps the 0.1 shift
    b2 = V.estimate(rows([0.9, 1.9, 2.9], seeds=[10, 11, 12]))
    welch = V.difference(a, b2)
    assert welch.mean == pytest.approx(0.1) and welch.half_width > 1 and "Welch" in welch.note
    se = math.sqrt(1 / 3 + 1 / 3)
    assert welch.half_width == pytest.approx(V.t_quantile(4) * se, rel=1e-6)  # equal variances: df = 4
    ex = V.difference(Estimate(3.0, 0.0, exact=True), Estimate(1.0, 0.0, exact=True))
    assert ex.exact and ex.mean == 2.0
    unknown = V.difference(V.estimate(rows([1.0])), b)
    assert unknown.half_width is None
    half = V.difference(a, Estimate(0.5, 0.0, exact=True))  # an exact arm adds no variance
    assert half.half_width == pytest.approx(a.half_width)


# ---------------------------------------------------------------- the paired test


def test_sign_flip_p_is_exact():
    """The sign-flip p-value equals a brute-force count over all 2^n sign vectors."""
    rng = np.random.default_rng(3)
    for n in (2, 5, 6, 9):
        d = rng.normal(0.3, 1.0, size=n)
        st = V.paired_stats(d)
        obs = d.sum()
        count = sum(sum(s * x for s, x in zip(signs, d)) >= obs - 1e-12 for signs in itertools.product((-1, 1), repeat=n))
        assert float(st["p_up"]) == pytest.approx(count / 2**n)
    # six positive differences: the smallest possible p is 1/64 < 2.5%
    assert float(V.paired_stats(np.array([1, 2, 3, 4, 5, 6.0]))["p_up"]) == pytest.approx(1 / 64)


def test_paired_stats_is_a_t_interval_and_vectorised():
    d = np.array([[0.1, 0.3, 0.2, 0.4, 0.25, 0.35], [-0.1, 0.1, 0.0, 0.05, -0.05, 0.02]])
    st = V.paired_stats(d)
    sd = d.std(axis=1, ddof=1)
    assert np.allclose(st["half_width"], V.t_quantile(5) * sd / math.sqrt(6))
    assert list(V.decide(st)) == [REPRODUCED_QUALITATIVELY, INCONCLUSIVE]


def _null_rate(d: np.ndarray) -> float:
    return float(np.mean(V.decide(V.paired_stats(d)) == REPRODUCED_QUALITATIVELY))


MC = 3 * math.sqrt(V.ALPHA * (1 - V.ALPHA) / 2000)  # three Monte Carlo standard errors at 2,000 trials


@pytest.mark.parametrize("n", [6, 10])
def test_null_effects_are_reproduced_at_most_nominally(n):
    """2,000 simulated null effects (normal, and accuracy on 359 test images) come out
    'reproduced' at most 2.5% of the time, plus Monte Carlo error."""
    rng = np.random.default_rng(n)
    assert _null_rate(rng.normal(0, 1, size=(2000, n))) <= V.ALPHA + MC
    acc = rng.binomial(359, 0.9, size=(2000, 2, n)) / 359  # discrete outcomes, with ties
    assert _null_rate(acc[:, 0] - acc[:, 1]) <= V.ALPHA + MC


def test_best_against_worst_of_seven_equal_arms_is_not_reproduced():
    """7 equal arms, 12 seeds: best and worst chosen on the first 6 seeds and judged on the
    other 6 stay at the nominal rate; chosen and judged on the same runs they would not."""
    rng = np.random.default_rng(7)
    sims, arms, seeds = 2000, 7, 12
    acc = rng.binomial(359, 0.9, size=(sims, arms, seeds)) / 359 + rng.normal(0, 0.01, size=(sims, 1, seeds))  # seed effect shared by the arms
    best, worst = V.select_extremes(acc[..., :6])
    idx = np.arange(sims)
    fresh = acc[idx, best, 6:] - acc[idx, worst, 6:]
    assert _null_rate(fresh) <= V.ALPHA + MC
    same = acc[idx, best, :6] - acc[idx, worst, :6]
    assert _null_rate(same) > 4 * V.ALPHA  # the control: selection on the judged runs is badly biased
    # the claim-level path (judge) reaches the same verdicts as the vectorised one
    claim = {"claim_id": "D-x", "method": "best_subset > worst_subset", "value": ""}
    fast = V.decide(V.paired_stats(fresh[:40]))
    for i in range(40):
        r = [row for a in range(arms) for row in rows(acc[i, a], method=f"subset{a}", epsilon="2")]
        assert V.judge(claim, r).verdict == fast[i]


def test_data_chosen_arms_follow_the_split_column():
    claim = {"claim_id": "D-x", "method": "best_subset > worst_subset", "value": ""}
    sel = rows([0.9] * 3, method="a", split="select") + rows([0.5] * 3, method="b", split="select")
    ev = rows([0.6, 0.61, 0.62, 0.6, 0.63, 0.61], method="a", seeds=range(10, 16), split="evaluate")
    ev += rows([0.8, 0.82, 0.81, 0.83, 0.8, 0.84], method="b", seeds=range(10, 16), split="evaluate")
    v = V.judge(claim, sel + ev)  # a was best on the selection runs; b is better on the fresh ones
    assert v.verdict == NOT_REPRODUCED and "best = a, worst = b" in v.rule and "split=select" in v.rule


# ---------------------------------------------------------------- whole claims

ORDER = {"claim_id": "X-a-beats-b", "method": "a > b", "value": "", "metric": "accuracy"}
RNG_A = [0.80, 0.82, 0.81, 0.83, 0.79, 0.84, 0.80, 0.82]
NOISE2 = (-0.001, 0.002, 0.0, 0.003, -0.002, 0.001, -0.003, 0.001)


def pair(a, shift, noise=(0.002, -0.001, 0.003, -0.002, 0.001, 0.0, -0.003, 0.002), **extra):
    return rows(a, method="a", **extra) + rows([x - shift + e for x, e in zip(a, noise)], method="b", **extra)


def test_ordering_claim_reproduced_and_not_reproduced():
    v = V.judge(ORDER, pair(RNG_A, 0.02))
    assert v.verdict == REPRODUCED_QUALITATIVELY, v.rule
    assert v.effect == pytest.approx(0.02 - sum((0.002, -0.001, 0.003, -0.002, 0.001, 0.0, -0.003, 0.002)) / 8)
    assert "sign-flip" in v.rule and v.low > 0
    v = V.judge(ORDER, pair(RNG_A, -0.02))
    assert v.verdict == NOT_REPRODUCED and v.high < 0


def test_small_wrong_sign_effect_leans_against():
    noise = (0.01, -0.012, 0.008, -0.006, 0.011, -0.009, 0.004, -0.007)
    v = V.judge(ORDER, pair(RNG_A, -0.002, noise))
    assert v.verdict == LEANS_AGAINST, v.rule
    assert v.effect < 0 < v.high and "contains 0" in v.rule
    # an inconclusive verdict says what the experiment could have detected and what would resolve it
    assert "smallest detectable effect" in v.rule and v.detectable > 0
    assert v.seeds_needed and v.seeds_needed > 8 and f"about {v.seeds_needed} seeds" in v.rule


def test_fewer_than_six_seeds_decide_nothing():
    big = pair(RNG_A[:5], 0.2, noise=(0.001, -0.002, 0.003, 0.0, 0.002))
    v = V.judge(ORDER, big)
    assert v.verdict == INCONCLUSIVE and "fewer than 6 paired seeds" in v.rule
    assert V.judge(ORDER, pair(RNG_A[:5], -0.2, noise=(0.001, -0.002, 0.003, 0.0, 0.002))).verdict == LEANS_AGAINST
    assert V.judge(ORDER, rows([0.9], method="a") + rows([0.1], method="b")).verdict == INCONCLUSIVE


def test_zero_variance_difference_decides_nothing():
    """reset_m - reset_t was exactly 2 test images in every seed: a zero-width interval."""
    diff = rows([2 / 359] * 8, metric="acc_difference", comparison="difference")
    v = V.judge(ORDER, diff)
    assert v.verdict == INCONCLUSIVE and "zero-width interval" in v.rule and "more seeds will not help" in v.rule
    assert V.judge(ORDER, rows([-2 / 359] * 8, metric="acc_difference", comparison="difference")).verdict == LEANS_AGAINST
    st = V.paired_stats(np.full(8, 0.0056))
    assert float(st["low"]) == float(st["high"]) and V.decide(st) == INCONCLUSIVE


NI = dict(ORDER, method="a >= b", margin="0.01", margin_source="fixed before the run")


def test_noninferiority_holds_and_fails():
    holds = V.judge(NI, pair(RNG_A, -0.004))  # a is 0.4 points below b: within the 1-point margin
    assert holds.verdict == REPRODUCED_QUALITATIVELY and holds.effect < 0 and holds.low > -0.01
    assert "noninferiority, margin 0.01" in holds.rule and "fixed before the run" in holds.rule
    assert holds.boundary == -0.01
    fails = V.judge(NI, pair(RNG_A, -0.03))
    assert fails.verdict == NOT_REPRODUCED and fails.high < -0.01
    # superiority would not have confirmed the match
    assert V.judge(dict(ORDER, method="a > b"), pair(RNG_A, -0.004)).verdict != REPRODUCED_QUALITATIVELY
    near = V.judge(NI, pair(RNG_A, -0.0105))  # mean just beyond the margin, CI straddling it
    assert near.verdict == LEANS_AGAINST


def test_rows_from_two_epsilons_are_refused_not_pooled():
    r = pair(RNG_A, 0.02, epsilon="8") + pair(RNG_A, -0.05, epsilon="2")
    v = V.judge(ORDER, r)  # the claim declares no setting: two settings per seed cannot be pooled
    assert v.verdict == NOT_RUN and "refused, not pooled" in v.rule and "epsilon: 2, 8" in v.rule
    at8 = V.judge(dict(ORDER, setting_keys="epsilon=8"), r)
    assert at8.verdict == REPRODUCED_QUALITATIVELY and at8.effect == pytest.approx(V.judge(ORDER, pair(RNG_A, 0.02)).effect)
    assert at8.refused == ("16 rows lie outside the setting epsilon=8 (epsilon=2)",)
    missing = V.judge(dict(ORDER, setting_keys="epsilon=8"), pair(RNG_A, 0.02))
    assert missing.verdict == NOT_RUN and "lack setting key epsilon" in missing.rule


def test_band_mean_and_difference_of_differences():
    # per seed, the mean over the band's epsilons; a row outside the band is refused
    band = dict(ORDER, setting_keys="epsilon in [1, 10]", combine="mean over band")
    r = pair(RNG_A, 0.01, epsilon="1") + pair(RNG_A, 0.03, epsilon="8") + pair(RNG_A, -0.5, epsilon="0.5")
    v = V.judge(band, r)
    assert v.verdict == REPRODUCED_QUALITATIVELY and v.effect == pytest.approx(0.02, abs=0.002)
    assert "mean over the band" in v.rule and "(epsilon=0.5)" in v.refused[0]
    # a seed missing one of the band's settings would make the per-seed means incomparable: refused
    gap = [x for x in r if not (x["seed"] == "3" and x["epsilon"] == "8")]
    assert V.judge(band, gap).verdict == NOT_RUN and "seeds cover different settings" in V.judge(band, gap).rule
    # n*epsilon keys: the product of two columns
    keyed = dict(band, setting_keys="n*epsilon in [1000, 20000]")
    assert V.judge(keyed, [dict(x, n="1000") for x in r]).verdict == REPRODUCED_QUALITATIVELY
    # (a - b at eps 1) - (a - b at eps 8) > 0
    dod = dict(ORDER, setting_keys="epsilon=1 vs epsilon=8", combine="difference of differences")
    v = V.judge(dod, pair(RNG_A, 0.03, epsilon="1") + pair(RNG_A, 0.01, NOISE2, epsilon="8"))
    assert v.verdict == REPRODUCED_QUALITATIVELY and v.effect == pytest.approx(0.02, abs=0.001) and "difference of differences" in v.rule
    assert V.judge(dod, pair(RNG_A, 0.01, epsilon="1") + pair(RNG_A, 0.03, NOISE2, epsilon="8")).verdict == NOT_REPRODUCED


def test_maximum_over_models():
    claim = {"claim_id": "C-slow", "method": "mixed / non-DP", "value": "2.0", "test": "at_most",
             "combine": "max over model"}
    small = rows([1.2, 1.25, 1.22, 1.21, 1.23, 1.24], model="small", resolution="32", comparison="at_most")
    big = rows([1.9, 1.95, 1.97, 1.96, 1.93, 1.94], model="big", resolution="224", comparison="at_most")
    v = V.judge(claim, small + big)
    assert v.estimate.mean == pytest.approx(sum([1.9, 1.95, 1.97, 1.96, 1.93, 1.94]) / 6)  # the maximum, not the mean
    assert v.verdict == REPRODUCED_QUALITATIVELY and "max over model" in v.ours
    slow = rows([2.3, 2.4, 2.35, 2.45, 2.3, 2.38], model="big", resolution="224", comparison="at_most")
    assert V.judge(claim, small + slow).verdict == NOT_REPRODUCED
    # pooled with the old rule (the mean over models) it would have held
    assert sum([1.2, 2.3]) / 2 < 2.0
    # without the claim saying so, two models per seed are refused
    assert V.judge(dict(claim, combine=""), small + big).verdict == NOT_RUN
    # rows without comparison=at_most are analogues
    assert V.judge(claim, [dict(x, comparison="") for x in small + big]).verdict == NOT_COMPARABLE


VALUE = {"claim_id": "E-x-acc", "method": "last layer", "value": "85.0", "unit": "%", "metric": "top-1 (%)",
         "test": "value", "margin": "1.0", "margin_source": "stated tolerance"}


def test_value_claims_within_tolerance_and_analogues():
    same = rows([0.852, 0.849, 0.851, 0.848, 0.853, 0.850], metric="test_acc", comparison="value")
    v = V.judge(VALUE, same)
    assert v.verdict == REPRODUCED_WITHIN_TOLERANCE and "fractions shown in %" in v.ours
    assert v.estimate.mean == pytest.approx(85.05) and v.band == (84.0, 86.0)
    far = rows([0.80, 0.81, 0.805, 0.802, 0.808, 0.803], metric="test_acc", comparison="value")
    assert V.judge(VALUE, far).verdict == NOT_REPRODUCED
    analogue = V.judge(VALUE, rows([0.95] * 6, metric="test_acc"))  # no comparison: a small-scale stand-in
    assert analogue.verdict == NOT_COMPARABLE and "95 %" in analogue.ours


def test_ours_carries_the_papers_unit_only_when_it_is_in_it():
    claim = {"claim_id": "C-t4-x-time-s", "method": "Mixed", "value": "37", "unit": "s/epoch", "test": "value"}
    v = V.judge(claim, rows([0.21, 0.2, 0.22], metric="step_time_s"))
    assert v.verdict == NOT_COMPARABLE and "(step_time_s)" in v.ours and "s/epoch" not in v.ours
    declared = V.judge(claim, rows([0.21, 0.2, 0.22], metric="step_time_s", unit="s/step"))
    assert "s/step" in declared.ours and "s/epoch" not in declared.ours


def test_consistency_checks_and_cited_context():
    check = {"claim_id": "E-sigma", "method": "DP-LS", "value": "8.5", "kind": "derived check", "test": "value",
             "margin": "0.05", "margin_source": "rounding", "setting_keys": "epsilon=1"}
    exact = [{"value": "8.488", "seed": "", "status": "ok", "exact": "True", "epsilon": "1"}]
    assert V.judge(check, exact).verdict == CONSISTENT
    assert V.judge(check, [dict(exact[0], value="8.6")]).verdict == INCONSISTENT
    assert V.judge(check, [dict(exact[0], epsilon="8")]).verdict == NOT_RUN
    slope = {"claim_id": "A-slope", "method": "x", "value": "0", "kind": "derived check", "test": "at_most"}
    assert V.judge(slope, [{"value": "-0.4", "exact": "True"}, {"value": "-0.1", "exact": "True"}]).verdict == CONSISTENT
    assert V.judge(slope, [{"value": "-0.4"}, {"value": "0.1"}]).verdict == INCONSISTENT
    ctx = {"claim_id": "C-prev", "method": "previous best", "value": "94.8", "kind": "cited context"}
    assert V.judge(ctx, rows([0.9] * 6)).verdict == V.CONTEXT


def test_not_run_and_failed_rows():
    assert V.judge(ORDER, []).verdict == NOT_RUN
    failed = [{"value": "", "seed": "0", "status": "failed", "reason": "out of memory"}]
    v = V.judge(ORDER, failed)
    assert v.verdict == NOT_RUN and "out of memory" in v.rule
    v = V.judge(ORDER, rows(RNG_A, method="a"))
    assert v.verdict == NOT_RUN and "no rows for arm 'b'" in v.rule


def test_untagged_arm_from_context_rows_in_the_setting():
    tagged = rows(RNG_A, method="a", experiment="nb", claim_id="X-a-beats-b", epsilon="8")
    other = rows([x - 0.02 + e for x, e in zip(RNG_A, NOISE2)], method="b", experiment="nb", epsilon="8")
    wrong_eps = rows([x + 0.5 for x in RNG_A], method="b", experiment="nb", epsilon="2")
    claim = dict(ORDER, setting_keys="epsilon=8")
    v = V.judge(claim, tagged, tagged + other + wrong_eps)
    assert v.verdict == REPRODUCED_QUALITATIVELY and "not tagged with this claim" in v.rule


def test_several_arms_must_all_hold():
    claim = dict(ORDER, method="a > b, c")
    base = pair(RNG_A, 0.03)
    c_low = rows([x - 0.04 + e for x, e in zip(RNG_A, NOISE2)], method="c")
    assert V.judge(claim, base + c_low).verdict == REPRODUCED_QUALITATIVELY
    c_high = rows([x + 0.04 + 0.001 * i for i, x in enumerate(RNG_A)], method="c")
    v = V.judge(claim, base + c_high)
    assert v.verdict == NOT_REPRODUCED and v.label == "a - c"  # the least favourable pair is shown


def test_less_than_claims_flip_the_sign():
    claim = dict(ORDER, method="a < b")
    v = V.judge(claim, pair(RNG_A, 0.02))  # a is above b
    assert v.verdict == NOT_REPRODUCED and v.label == "b - a"


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"method": "a >= b"}, "needs a margin"),
        ({"setting_keys": "epsilon ~ 8"}, "cannot read setting condition"),
        ({"combine": "average"}, "combine 'average'"),
        ({"setting_keys": "epsilon=1 vs epsilon=8"}, "difference of differences"),
        ({"kind": "guess"}, "kind 'guess'"),
    ],
)
def test_malformed_claim_rows(extra, match):
    with pytest.raises(ValueError, match=match):
        V.claim_spec(dict(ORDER, **extra))
    assert "malformed" in V.judge(dict(ORDER, **extra), pair(RNG_A, 0.02)).rule


def test_parse_setting():
    (side,) = V.parse_setting("epsilon in [1, 10]; model=resnet18")
    assert [c.text() for c in side] == ["epsilon in [1, 10]", "model=resnet18"]
    assert side[0].holds(1.0) and side[0].holds(10.0) and not side[0].holds(0.5)
    (open_,) = V.parse_setting("epsilon in (0, 1)")
    assert not open_[0].holds(1.0) and open_[0].holds(0.5)
    (s,) = V.parse_setting("epsilon in {1, 8}")
    assert s[0].holds(8.0) and not s[0].holds(2.0)
    two = V.parse_setting("epsilon<1 vs epsilon>=1")
    assert len(two) == 2 and two[0][0].holds(0.5) and two[1][0].holds(1.0)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("sequential > only_private", ("sequential", ">", ["only_private"])),
        ("reset_m > reset_v, reset_t, reset_none", ("reset_m", ">", ["reset_v", "reset_t", "reset_none"])),
        ("dp_fc >= least_squares, newton", ("dp_fc", ">=", ["least_squares", "newton"])),
        ("perlayer_adaptive < flat", ("perlayer_adaptive", "<", ["flat"])),
        ("mixed / non-DP", None),
        ("", None),
    ],
)
def test_parse_ordering(text, expected):
    assert V.parse_ordering(text) == expected


def test_our_setting_from_rows():
    r = rows([0.9, 0.8], method="sequential", epsilon="8.0", dataset="digits", lr="0.001", sd="0.1")
    text = V.our_setting(r)
    assert "eps=8" in text and "dataset=digits" in text and "lr=0.001" in text and "seeds=2" in text
    assert "sd" not in text
    assert V.our_setting(rows([1.0], setting="digits, MLP, 10% public")) == "digits, MLP, 10% public"


# ---------------------------------------------------------------- the reference values


def _claims():
    with open(REFERENCES, newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def test_paper_values_csv_is_well_formed():
    header, claims = _claims()
    assert header == ["claim_id", "paper", "figure_or_table", "setting", "method", "metric", "value", "unit",
                      "epsilon", "delta", "kind", "test", "margin", "margin_source", "setting_keys", "combine",
                      "ratio_to", "source"]
    ids = {c["claim_id"] for c in claims}
    assert len(ids) == len(claims) >= 12
    for c in claims:
        assert re.fullmatch(r"[A-E]-[a-z0-9][a-z0-9.-]*", c["claim_id"]), c["claim_id"]
        assert c["paper"].startswith(c["claim_id"][0] + ":"), c["claim_id"]
        assert c["source"] and c["figure_or_table"] and c["setting"] and c["metric"] and c["unit"], c["claim_id"]
        assert c["kind"] in V.KINDS and c["test"] in V.TESTS, c["claim_id"]
        spec = V.claim_spec(c)  # every judging column parses
        if spec.test == "noninferiority":
            assert float(c["margin"]) > 0 and c["margin_source"], c["claim_id"]
        if c["ratio_to"]:
            assert c["ratio_to"] in ids, c["claim_id"]
        assert V.parse_ordering(c["method"]) or c["value"], c["claim_id"]


def test_paper_values_fixes_of_the_review():
    _, claims = _claims()
    by_id = {c["claim_id"]: c for c in claims}
    # least squares beats logistic regression is 2211.13403's finding
    for cid in ("E-ls-beats-logistic", "E-ls-beats-logistic-low-eps"):
        assert "2211.13403" in by_id[cid]["paper"], cid
    assert float(by_id["E-imagenet-eps4to10-acc"]["delta"]) == 1e-6
    assert "21k" in by_id["A-imagenet11k-eps8"]["setting"] and "11k-class" in by_id["A-imagenet11k-eps8"]["setting"]
    assert {c["claim_id"] for c in claims if c["kind"] == "cited context"} == {
        "C-prevbest-cifar10-eps1-acc", "C-prevbest-cifar100-eps1-acc"}
    checks = {c["claim_id"] for c in claims if c["kind"] == "derived check"}
    assert checks == {"A-noise-level-falls-with-batch"} | {f"E-{m}-sigma-eps{e}" for m in ("dpls", "dpfc")
                                                           for e in ("0.1", "1", "8")}
    # ">=" claims are noninferiority tests; the C-t4 cells can be shown as ratios to non-DP
    assert by_id["B-adaptive-matches-flat"]["test"] == "noninferiority"
    assert by_id["C-t4-resnet18-mixed-time-s"]["ratio_to"] == "C-t4-resnet18-nondp-time-s"
    assert by_id["C-slowdown-max"]["combine"] == "max over model"
    assert by_id["C-t4-vgg16-mixed-mem-gb"]["unit"] == "GB" and by_id["D-cifar100-eps2"]["unit"] == "%"


def test_paper_values_hold_the_headline_numbers():
    _, claims = _claims()
    by_id = {c["claim_id"]: c for c in claims}
    expect = {
        "A-imagenet11k-eps8": 41.5, "A-places365-transfer-acc": 55.7, "A-inat2021-transfer-acc": 60.0,
        "C-beit-cifar10-eps1-acc": 96.7, "C-beit-cifar100-eps1-acc": 83.0, "C-t4-resnet18-mixed-time-s": 37,
        "C-t4-resnet18-nondp-time-s": 14, "C-t4-vgg16-mixed-mem-gb": 2.84, "C-resnet18-opacus-maxbatch": 170,
        "D-cifar100-eps2": 77.9, "E-imagenet-eps8-acc": 88.0, "E-imagenet-eps0.1-acc": 84.3,
        "E-imagenet-eps4to10-acc": 81.7, "E-dpls-sigma-eps0.1": 83.3, "E-dpls-sigma-eps1": 8.5,
        "E-dpls-sigma-eps8": 1.20, "E-dpfc-sigma-eps0.1": 159.5, "E-dpfc-sigma-eps1": 16.3, "E-dpfc-sigma-eps8": 2.29,
    }
    for cid, value in expect.items():
        assert float(by_id[cid]["value"]) == pytest.approx(value), cid
    assert by_id["D-cifar100-eps2"]["epsilon"] == "2" and float(by_id["D-cifar100-eps2"]["delta"]) == 1e-5
    assert float(by_id["E-imagenet-eps8-acc"]["delta"]) == 8e-7
    assert sum(cid.startswith("C-t4-") and cid.endswith("-time-s") for cid in by_id) == 20
