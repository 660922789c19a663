"""The verdict rules (dpbench.workbench.verdicts) and the paper values they are applied to."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import pytest

from dpbench.workbench import verdicts as V
from dpbench.workbench.verdicts import (NOT_REPRODUCED, NOT_RESOLVED, NOT_RUN, REPRODUCED_QUALITATIVELY,
                              REPRODUCED_WITHIN_TOLERANCE, Estimate)

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


# ---------------------------------------------------------------- single rules


@pytest.mark.parametrize(
    "est, op, expected",
    [
        (Estimate(0.5, 0.2, 3, 0.1), ">", REPRODUCED_QUALITATIVELY),
        (Estimate(0.5, 0.6, 3, 0.1), ">", NOT_RESOLVED),
        (Estimate(-0.5, 0.2, 3, 0.1), ">", NOT_REPRODUCED),
        (Estimate(-0.5, 0.2, 3, 0.1), "<", REPRODUCED_QUALITATIVELY),
        (Estimate(0.5, 0.2, 3, 0.1), "<=", NOT_REPRODUCED),
        (Estimate(0.5, None, 1), ">", NOT_RESOLVED),
        (Estimate(0.01, 0.0, exact=True), ">", REPRODUCED_QUALITATIVELY),
        (Estimate(0.0, 0.0, exact=True), ">", NOT_REPRODUCED),
        (Estimate(0.0, 0.0, exact=True), ">=", REPRODUCED_QUALITATIVELY),
        (Estimate(-1.0, 0.0, exact=True), ">=", NOT_REPRODUCED),
    ],
)
def test_judge_sign(est, op, expected):
    assert V.judge_sign(est, op)[0] == expected


def test_judge_sign_is_symmetric_under_negation():
    for mean in (-1.0, -0.1, 0.0, 0.1, 1.0):
        for hw in (0.05, 0.5):
            d, neg = Estimate(mean, hw, 3, 0.1), Estimate(-mean, hw, 3, 0.1)
            assert V.judge_sign(d, ">")[0] == V.judge_sign(neg, "<")[0]


@pytest.mark.parametrize(
    "est, kw, expected",
    [
        (Estimate(8.4, 0.0, exact=True), {}, REPRODUCED_WITHIN_TOLERANCE),  # 1.2% off, 5% default
        (Estimate(9.5, 0.0, exact=True), {}, NOT_REPRODUCED),
        (Estimate(9.5, 0.0, exact=True), {"rel_tol": 0.2}, REPRODUCED_WITHIN_TOLERANCE),
        (Estimate(8.9, 0.0, exact=True), {"abs_tol": 0.5}, REPRODUCED_WITHIN_TOLERANCE),
        (Estimate(8.6, 0.3, 3, 0.1), {}, REPRODUCED_WITHIN_TOLERANCE),
        (Estimate(9.2, 0.5, 3, 0.1), {}, NOT_RESOLVED),  # CI overlaps the band, mean outside
        (Estimate(10.0, 0.5, 3, 0.1), {}, NOT_REPRODUCED),
        (Estimate(8.5, None, 1), {}, NOT_RESOLVED),  # one seed: no CI even when it lands on the value
    ],
)
def test_judge_value(est, kw, expected):
    assert V.judge_value(est, 8.5, **kw)[0] == expected


@pytest.mark.parametrize(
    "est, comparison, expected",
    [
        (Estimate(1.5, 0.2, 3, 0.1), "at_most", REPRODUCED_QUALITATIVELY),
        (Estimate(1.9, 0.2, 3, 0.1), "at_most", NOT_RESOLVED),
        (Estimate(2.5, 0.2, 3, 0.1), "at_most", NOT_REPRODUCED),
        (Estimate(2.5, 0.2, 3, 0.1), "at_least", REPRODUCED_QUALITATIVELY),
        (Estimate(1.5, 0.0, exact=True), "at_least", NOT_REPRODUCED),
        (Estimate(1.5, None, 1), "at_most", NOT_RESOLVED),
    ],
)
def test_judge_bound(est, comparison, expected):
    assert V.judge_bound(est, 2.0, comparison)[0] == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("sequential > only_private", ("sequential", ">", ["only_private"])),
        ("reset_m > reset_v, reset_t, reset_none", ("reset_m", ">", ["reset_v", "reset_t", "reset_none"])),
        ("dp_fc >= least_squares, newton", ("dp_fc", ">=", ["least_squares", "newton"])),
        ("perlayer_adaptive < flat", ("perlayer_adaptive", "<", ["flat"])),
        ("mixed / non-DP", None),
        ("DP least squares (3 releases)", None),
        ("", None),
    ],
)
def test_parse_ordering(text, expected):
    assert V.parse_ordering(text) == expected


# ---------------------------------------------------------------- whole claims


ORDER = {"claim_id": "X-a-beats-b", "method": "a > b", "value": "", "metric": "accuracy"}


def test_ordering_claim_paired_by_seed_is_reproduced():
    r = rows([0.80, 0.85, 0.90], method="a") + rows([0.70, 0.76, 0.79], method="b")
    v = V.judge(ORDER, r)
    assert v.verdict == REPRODUCED_QUALITATIVELY, v.rule
    assert "a - b" in v.ours and "paired" in v.ours and v.estimate.mean == pytest.approx(0.1)


def test_ordering_claim_reversed_is_not_reproduced_and_noise_is_not_resolved():
    r = rows([0.70, 0.76, 0.79], method="a") + rows([0.80, 0.85, 0.90], method="b")
    assert V.judge(ORDER, r).verdict == NOT_REPRODUCED
    noisy = rows([0.80, 0.60, 0.90], method="a") + rows([0.70, 0.75, 0.72], method="b")
    v = V.judge(ORDER, noisy)
    assert v.verdict == NOT_RESOLVED and "contains 0" in v.rule


def test_ordering_claim_with_one_seed_is_not_resolved():
    v = V.judge(ORDER, rows([0.9], method="a") + rows([0.1], method="b"))
    assert v.verdict == NOT_RESOLVED and "fewer than 2 seeds" in v.rule


def test_ordering_claim_uses_arm_column_and_untagged_context_rows():
    tagged = rows([0.9, 0.91, 0.92], method="sgd", arm="a", experiment="nb", claim_id="X-a-beats-b")
    assert V.judge(ORDER, tagged).verdict == NOT_RUN  # arm b missing and no context
    context = tagged + rows([0.5, 0.52, 0.51], method="b", experiment="nb", claim_id="")
    context += rows([0.99, 0.99, 0.99], method="b", experiment="other", claim_id="")  # other experiment: ignored
    v = V.judge(ORDER, tagged, context)
    assert v.verdict == REPRODUCED_QUALITATIVELY and "not tagged with this claim" in v.ours


def test_ordering_against_several_arms_needs_every_one():
    claim = dict(ORDER, method="a > b, c")
    base = rows([0.9, 0.91, 0.92], method="a") + rows([0.5, 0.5, 0.52], method="b")
    assert V.judge(claim, base + rows([0.6, 0.61, 0.6], method="c")).verdict == REPRODUCED_QUALITATIVELY
    assert V.judge(claim, base + rows([0.8, 0.95, 0.99], method="c")).verdict == NOT_RESOLVED
    assert V.judge(claim, base + rows([0.99, 0.99, 0.995], method="c")).verdict == NOT_REPRODUCED


def test_difference_rows_decide_an_ordering_claim():
    diff = rows([0.05, 0.07, 0.06], method="a", metric="a_minus_b")
    assert V.judge(ORDER, diff).verdict == REPRODUCED_QUALITATIVELY
    lower = dict(ORDER, method="a < b")
    assert V.judge(lower, diff).verdict == NOT_REPRODUCED
    explicit = rows([0.05, -0.07, 0.06], method="a", metric="gain", comparison="difference")
    assert V.judge({"claim_id": "X", "method": "anything", "value": ""}, explicit).verdict == NOT_RESOLVED
    single = [{"metric": "sequential_minus_only_private", "value": "-0.2", "seed": "", "status": "ok"}]
    v = V.judge(ORDER, single)  # a difference of means without spread decides nothing
    assert v.verdict == NOT_RESOLVED and "fewer than 2 seeds" in v.rule
    assert V.judge(ORDER, [dict(single[0], exact="true")]).verdict == NOT_REPRODUCED


VALUE = {"claim_id": "E-x-sigma", "method": "DP-LS", "value": "8.5", "metric": "noise multiplier"}


def test_value_claim_needs_an_explicit_comparison():
    exact = [{"value": "8.51", "seed": "", "status": "ok", "method": "least_squares", "exact": "True"}]
    v = V.judge(VALUE, exact)
    assert v.verdict == NOT_RESOLVED and "analogue" in v.rule and "8.51" in v.ours
    v = V.judge(VALUE, [dict(exact[0], comparison="value")])
    assert v.verdict == REPRODUCED_WITHIN_TOLERANCE and "5% relative" in v.rule
    far = [dict(exact[0], value="9.5", comparison="value")]
    assert V.judge(VALUE, far).verdict == NOT_REPRODUCED
    assert V.judge(VALUE, [dict(far[0], tolerance="0.2")]).verdict == REPRODUCED_WITHIN_TOLERANCE
    assert V.judge(VALUE, [dict(far[0], abs_tolerance="1.5")]).verdict == REPRODUCED_WITHIN_TOLERANCE
    unmarked = [dict(exact[0], comparison="value", exact="")]  # no seed, not exact: spread unknown
    assert V.judge(VALUE, unmarked).verdict == NOT_RESOLVED


def test_bound_claim_and_missing_paper_value():
    claim = {"claim_id": "C-slowdown", "method": "mixed / non-DP", "value": "2.0"}
    fast = rows([1.4, 1.5, 1.45], comparison="at_most")
    assert V.judge(claim, fast).verdict == REPRODUCED_QUALITATIVELY
    slow = rows([2.4, 2.5, 2.45], comparison="at_most")
    assert V.judge(claim, slow).verdict == NOT_REPRODUCED
    v = V.judge(dict(claim, value=""), fast)
    assert v.verdict == NOT_RESOLVED and "no value" in v.rule


def test_not_run_and_failed_and_bad_comparison():
    assert V.judge(VALUE, []).verdict == NOT_RUN
    failed = [{"value": "", "seed": "0", "status": "failed", "reason": "out of memory"}]
    v = V.judge(VALUE, failed)
    assert v.verdict == NOT_RUN and "out of memory" in v.rule
    v = V.judge(VALUE, [{"value": "1", "seed": "", "status": "ok", "comparison": "roughly"}])
    assert v.verdict == NOT_RESOLVED and "unknown comparison 'roughly'" in v.rule


def test_difference_rows_without_spread_defer_to_arm_rows():
    """Notebook 02's pattern: per-seed arm rows tagged with different ids, plus an unseeded
    difference-of-means row tagged with the claim."""
    claim = {"claim_id": "B-x", "method": "flat > layer", "value": ""}
    flat = rows([0.80, 0.82, 0.81], method="flat", metric="test_acc", experiment="02", claim_id="B-flat")
    layer = rows([0.75, 0.76, 0.74], method="layer", metric="test_acc", experiment="02", claim_id="B-x")
    diff = [{"experiment": "02", "method": "flat-vs-layer", "metric": "acc_diff_flat_minus_fixed", "value": "0.06",
             "seed": "", "status": "ok", "claim_id": "B-x"}]
    v = V.judge(claim, layer + diff, flat + layer + diff)
    assert v.verdict == REPRODUCED_QUALITATIVELY and "not tagged with this claim" in v.ours
    v = V.judge(claim, diff, flat + layer + diff)  # only the difference row: no spread
    assert v.verdict == NOT_RESOLVED and "fewer than 2 seeds" in v.rule


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
    assert header == ["claim_id", "paper", "figure_or_table", "setting", "method", "metric", "value",
                      "epsilon", "delta", "source"]
    assert len(claims) >= 12
    ids = [c["claim_id"] for c in claims]
    assert len(ids) == len(set(ids))
    for c in claims:
        assert re.fullmatch(r"[A-E]-[a-z0-9][a-z0-9.-]*", c["claim_id"]), c["claim_id"]
        assert c["paper"].startswith(c["claim_id"][0] + ":"), c["claim_id"]
        assert c["source"] and c["figure_or_table"] and c["setting"] and c["metric"], c["claim_id"]
        for col in ("value", "epsilon", "delta"):
            if c[col]:
                float(c[col])
        # every claim is either an ordering between named arms or has a number to compare with
        assert V.parse_ordering(c["method"]) or c["value"], c["claim_id"]


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
    # the C table: 20 cells per metric minus the OOM ones
    assert sum(cid.startswith("C-t4-") and cid.endswith("-time-s") for cid in by_id) == 20
