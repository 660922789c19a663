"""The privacy-audit experiment's rows, explanation and figures (dpbench.experiments.privacy_audit)."""

from __future__ import annotations

import dataclasses

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from conftest import ListRecorder

from dpbench.experiments import privacy_audit as pa
from dpbench.workbench.results import Recorder

SMALL = dict(trials=60, steps=1, sample_rate=1.0, understate_factor=1000.0, max_physical_batch=4, n_clean=7,
             delta=1e-5, device="cpu", progress=False)


@pytest.fixture(scope="module")
def audited():
    """A small real audit: two correct methods and one fault with the gradient canary, the
    fault also with the input canary, at two target epsilons."""
    return pa.run(["correct/bk", "correct/ghost", "fault/no_noise"], [1.0, 4.0], blackbox_variants=["fault/no_noise"],
                  confidence=0.95, seed=0, **SMALL)


def test_run_audits_every_setting_once(audited):
    audits, rows = audited
    assert len(audits) == len(rows) == 3 * 2 + 2
    assert [(r["variant"], r["canary"]) for r in rows[-2:]] == [("fault/no_noise", "input")] * 2
    assert all(r["trials"] == 60 and r["confidence"] == 0.95 for r in rows)


def test_record_audits_one_row_per_metric(audited, tmp_path):
    _, rows = audited
    rec = Recorder(tmp_path, experiment="t", delta=1e-5)
    assert pa.record_audits(rec, rows, confidence=0.95, seed=3) == len(rows) * len(pa.AUDIT_METRICS)
    df = rec.frame()
    assert set(df.metric) == set(pa.AUDIT_METRICS) and set(df.seed) == {3}
    detected = df[(df.metric == "detected")].set_index(["method", "canary", "target_epsilon"]).value
    assert detected[("fault/no_noise", "gradient", 1.0)] == 1.0  # no noise: members separate perfectly
    claimed = df[df.metric == "claimed_epsilon"]
    assert (claimed.value == claimed.epsilon).all()


def test_score_agreement_between_correct_methods(audited):
    audits, _ = audited
    diff = pa.max_score_diff_vs_bk(audits)
    assert diff is not None and diff < 1e-9  # same noise seed: the clipping method changes no release
    assert pa.max_score_diff_vs_bk([a for a in audits if a.variant != "correct/bk"]) is None
    # a correct method that released something else shows up, faults and input canaries do not count
    ghost = next(a for a in audits if a.variant == "correct/ghost" and a.target_epsilon == 1.0)
    shifted = dataclasses.replace(ghost, scores={**ghost.scores, "total": ghost.scores["total"] + 0.25})
    assert pa.max_score_diff_vs_bk(list(audits) + [shifted]) == pytest.approx(0.25)


def test_explain_is_computed_from_the_rows(audited):
    audits, rows = audited
    rec = ListRecorder()
    text = pa.explain(audits, rows, confidence=0.95, delta=1e-5, seed=0, rec=rec)
    assert "**Clipping methods:**" in text and f"{8 * 60} trials" in text and "**no_noise**" in text
    assert [r["metric"] for r in rec.rows] == ["max_score_diff_vs_bk"]
    assert rec.rows[0]["method"] == "correct/bk" and rec.rows[0]["canary"] == "gradient"
    no_bk = [i for i, a in enumerate(audits) if a.variant != "correct/bk"]
    rec = ListRecorder()
    text = pa.explain([audits[i] for i in no_bk], [rows[i] for i in no_bk], confidence=0.95, delta=1e-5, seed=0,
                      rec=rec)
    assert "Clipping methods" not in text and not rec.rows


def test_figures_one_panel_per_canary(audited):
    audits, rows = audited
    fig = pa.plot_claimed_vs_audited(rows, confidence=0.95)
    assert len(fig.axes) == 2 and "white-box" in fig.axes[0].get_title()
    fig = pa.plot_roc(audits, rows, epsilon=3.0, trials=60)
    assert [ax.get_title().endswith("target eps 4") for ax in fig.axes] == [True, True]  # nearest target
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert len(labels) == 3 + 1 and labels[-1] == "chance"
    only_gradient = [r for r in rows if r["canary"] == "gradient"]
    assert pa.canaries(only_gradient) == ["gradient"] and np.size(pa.plot_claimed_vs_audited(
        only_gradient, confidence=0.95).axes) == 1


# ---------------------------------------------------------------------------- every mechanism


def _mech_rows():
    from dpbench.training import audit_mechanisms as M

    rng = np.random.default_rng(0)
    m = rng.random(2000) < 0.5
    audits = [
        M.CanaryAudit("pipeline_noise", "correct", "one_step_sum", 1.3, 1.3, 1e-5, m, {"sum": rng.normal(size=2000)}),
        M.CanaryAudit("data_parallel", "no_rank_noise", "one_step_sum", 1.3, float("inf"), 1e-5, m,
                      {"coordinate": m.astype(float)}),
        M.CanaryAudit("dpsgd_run", "shuffled_batches", "all_iterates", 2.8, 2.2, 1e-5, m,
                      {"sum": rng.normal(size=2000)}, independent=False, true_relation=">="),
        M.CanaryAudit("dpsgd_run", "ledger_half_steps", "all_iterates", 2.3, 2.8, 1e-5, m,
                      {"sum": rng.normal(size=2000)},
                      model_scores=lambda k, r: (0.8 + r.normal(size=k), r.normal(size=k)), simulate_up_to=20_000),
    ]
    return [M.summarize(a) for a in audits]


def test_mechanism_table_and_explanation_are_computed_from_the_rows(tmp_path):
    rows = _mech_rows()
    table = pa.mechanism_table(rows)
    assert list(table["status"]) == ["sound", "detected", "no gap", "not detected"]
    assert list(table["true eps"]) == ["1.30", "inf", ">= 2.20", "2.80"]
    assert "~" in table["trials needed"].iloc[3] and table["trials needed"].iloc[0] == ""
    text = pa.explain_mechanisms(rows)
    assert "*all_iterates*" in text and "*one_step_sum*" in text
    assert "1 of 1 have their audited bound at or below the claim" in text
    assert "**data_parallel/no_rank_noise**" in text and "**detected**" in text
    assert "Chua et al." in text and "to pass the claim" in text
    rec = ListRecorder()
    assert pa.record_mechanisms(rec, rows, seed=2) == len(rows) * len(pa.MECHANISM_METRICS)
    assert {r["audit_status"] for r in rec.rows} == {"sound", "detected", "no gap", "not detected"}
    path = pa.save_mechanism_table(rows, str(tmp_path))
    assert path.read_text().splitlines()[0].startswith("mechanism,variant,threat model,claimed eps")
    assert pa.save_mechanism_table(rows, "") is None
