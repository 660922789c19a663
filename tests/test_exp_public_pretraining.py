"""dpbench.experiments.public_pretraining (notebook 03): the arms, the public checkpoint written
at the switch, the claim rows and tables, figure 5's rows."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from conftest import ListRecorder

from dpbench.errors import UserError
from dpbench.experiments import public_pretraining as pp
from dpbench.experiments import study_design
from dpbench.models import create_model
from dpbench.privacy import accounting


@pytest.fixture(scope="module")
def arms():
    return pp.prepare(dataset="digits", data_root=None, model_name="mlp", model_kwargs={"hidden": [16]},
                      public_fraction=0.1, public_fractions=[0.05], seed=0, steps=6, switch_step=2,
                      private_batch_size=64, public_batch_size=16, lr=0.01, target_epsilon=2.0, eval_every=3)


def test_prepare_splits_every_fraction(arms):
    assert sorted(arms.splits) == [0.05, 0.1] and arms.data is arms.splits[0.1]
    for f, part in arms.splits.items():
        pub, priv = set(part.public_indices.tolist()), set(part.private_indices.tolist())
        assert pub.isdisjoint(priv) and len(pub | priv) == len(arms.train.y)
        assert part.n_public == round(f * len(arms.train.y))
    assert arms.model_spec == {"name": "mlp", "num_classes": 10, "in_chans": 1, "img_size": 8, "hidden": [16]}
    assert arms.num_params == (64 * 16 + 16) + (16 * 10 + 10)
    assert arms.model_name == "mlp" and arms.dataset == "digits"


def test_noise_scale_rows(arms):
    rec = ListRecorder()
    rows = pp.noise_scale(arms, rec, seed=0)
    by = {r["schedule"]: r for r in rows}
    assert by["only_private"]["private_steps"] == 6 and by["sequential"]["private_steps"] == 4
    q = 64 / arms.data.n_private
    for r in rows:
        assert accounting.epsilon(r["sigma"], q, r["private_steps"], delta=arms.delta) == pytest.approx(2.0, rel=0.01)
        assert r["sigma*sqrt(d)/B"] == pytest.approx(r["sigma"] * arms.num_params ** 0.5 / 64)
    assert by["sequential"]["sigma"] < by["only_private"]["sigma"]  # fewer private steps, less noise
    assert len(rec.get("noise_scale")) == 2 and len(rec.get("n_times_epsilon")) == 2


def _stub(acc, loss=1.0, eps=2.0, sigma=1.5, steps=4):
    return SimpleNamespace(final={"test_acc": acc, "test_loss": loss}, epsilon=eps, noise_multiplier=sigma,
                           private_steps=steps, record=lambda *a, **k: None)


def test_improvement_vs_batch_rows(arms):
    arms.runs.clear()
    arms.runs[("only_private", 0)] = _stub(0.5, steps=6)
    torch.manual_seed(1)
    public = create_model(**arms.model_spec)
    rec = ListRecorder()
    fig5 = pp.improvement_vs_batch(arms, public, rec, batch_grid=[4, 64, 100000], diag_examples=32, diag_probes=2,
                                   diag_var_samples=4, diag_accountant="gdp_clt", seed=0)
    assert fig5.grid.tolist() == [4.0, 64.0]  # batches above the private set's size are dropped
    assert fig5.n_examples == 32 and fig5.epochs == pytest.approx(6 * 64 / arms.data.n_private)
    assert [imp.label for imp in fig5.improvements] == ["initialisation", "public checkpoint"]
    for k in ("signal", "sampling", "noise"):
        assert len(rec.get(f"term_{k}")) == 2 * 2
    assert len(rec.get("optimal_batch_size")) == 4 and len(rec.get("diag_tr_h")) == 4
    # sigma(B) reaches the target at each B for the same number of epochs
    n = arms.data.n_private
    for b, s in zip(fig5.grid, fig5.sigma):
        steps = max(1, round(fig5.epochs * n / b))
        assert accounting.epsilon(s, b / n, steps, delta=arms.delta, accountant="gdp_clt") == pytest.approx(2.0, rel=0.02)
    table = pp.improvement_table(fig5.improvements)
    assert len(table) == 4 and set(table.gradients) == {"clipped (DP)", "raw (non-DP)"}


def test_unknown_fraction_is_refused(arms):
    with pytest.raises(UserError, match="public fraction 0.33 was not split"):
        arms.run("sequential", 0, fraction=0.33)
    with pytest.raises(UserError, match="unknown schedule"):
        arms.run("warmup", 0)


# ---------------------------------------------------------------------------- the decidable study (issue 16)
@pytest.fixture(scope="module")
def split_arms():
    arms, test = pp.prepare_split(dataset="digits", data_root=None, model_name="small_cnn",
                                  model_kwargs={"width": 4, "depth": 2, "zero_head": False}, public_fraction=0.1,
                                  public_fractions=[0.05], validation_fraction=0.2, seed=0, steps=6, switch_step=2,
                                  private_batch_size=64, public_batch_size=16, eval_every=None)
    return arms, test


def test_prepare_split_holds_validation_apart_from_public_and_private(split_arms):
    arms, test = split_arms
    val_origin = set(arms.test.origin_indices.tolist())
    for part in arms.splits.values():
        assert not val_origin & set(part.public_indices.tolist())
        assert not val_origin & set(part.private_indices.tolist())
    assert len(arms.test) + len(arms.train) == 1438 and len(test) == 359


def test_public_checkpoint_model_has_every_subset_notebook_04_names(split_arms):
    from dpbench.models import SUBSETS, create_model, trainable_subset

    model = create_model(**split_arms[0].model_spec)
    for subset in SUBSETS:
        assert trainable_subset(model, subset).num_params > 0


def test_tuning_is_equal_and_verdict_runs_use_the_test_set_once(split_arms):
    arms, test = split_arms
    arms.runs.clear()
    rec = ListRecorder()
    scheds = ["only_private", "only_public", "sequential"]
    tun = pp.tune_schedules(arms, scheds, [8.0], [0.01, 0.03], [50, 51], rec)
    assert tun[8.0].budget() == {s: 4 for s in scheds}
    held = study_design.HeldOutTest(test)
    lrs = {8.0: tun[8.0].chosen, 1.0: tun[8.0].chosen}
    final = pp.run_verdict(arms, scheds, lrs, [0, 1], held, rec)
    # only_public has no private step: one run and one test look per seed, listed at both epsilons
    assert len(held.used) == 2 * 2 * 2 + 2 and len(final) == 12
    for r in final:  # the cached calibration spends each DP arm's target epsilon for its own private steps
        if r["private_steps"]:
            assert r["epsilon_spent"] == pytest.approx(r["epsilon"], rel=0.01)
            assert r["sigma"] == pytest.approx(accounting.noise_multiplier(r["epsilon"], 64 / arms.data.n_private,
                                                                           r["private_steps"], delta=1e-5), rel=1e-6)
    op = [r for r in final if r["schedule"] == "only_public"]
    assert {r["epsilon"] for r in op} == {8.0, 1.0} and len({(r["seed"], r["test_acc"]) for r in op}) == 2
    comps = {pp.CLAIM_PUBLIC: ("sequential", "only_public"), pp.CLAIM_SCRATCH: ("sequential", "only_private")}
    pp.record_comparisons(rec, final, comps, 8.0, 0.1, "tiny")
    pp.record_comparisons(rec, final, comps, 1.0, 0.1, "tiny", tag=False)
    tagged = rec.get("test_acc_difference", claim_id=pp.CLAIM_PUBLIC)
    assert len(tagged) == 2 and all(r["epsilon"] == 8.0 for r in tagged)
    assert len([r for r in rec.get("test_acc_difference") if "claim_id" not in r]) == 4
    head = rec.get("final_test_acc_percent", claim_id="A-imagenet11k-eps8")
    assert len(head) == 1 and head[0]["comparison"] == "analogue" and head[0]["epsilon"] == 8.0
    cv = pp.curvature_claim(arms, [0, 1], 8.0, 0.01, rec, n_examples=32, n_probes=2)
    assert {(r["seed"], r["when"]) for r in cv} == {(s, w) for s in (0, 1) for w in ("early", "late")}
    assert len(rec.get("trace_hessian", claim_id=pp.CLAIM_CURVATURE)) == 4
    resets = pp.reset_claim(arms, [0, 1], 8.0, 0.01, held, rec, final)
    assert {r["reset"] for r in resets} == set(pp.RESETS)
    rows = rec.get("final_test_loss", claim_id=pp.CLAIM_RESET)
    assert {r["method"] for r in rows} == {f"reset_{r}" for r in pp.RESETS} and len(rows) == 8
    assert len(held.used) == 10 + 2 * 3  # reset m reuses the verdict's sequential run


def test_curvature_trajectory_replays_the_run_prefix(split_arms):
    arms, _ = split_arms
    rec = ListRecorder()
    traj = pp.curvature_trajectory(arms, 0, 8.0, 0.01, [0, 3], rec, n_examples=32, n_probes=2)
    assert [t["step"] for t in traj] == [0, 3] and all(math.isfinite(t["tr_h"]) for t in traj)


def test_reset_and_curvature_figures_pass_the_figure_check_and_differences_are_to_reset_m():
    import pandas as pd

    from dpbench.workbench.results import check_figure

    rows = [{"seed": s, "reset": r, "test_loss": 1.0 + 0.1 * i + 0.01 * s} for s in range(3)
            for i, r in enumerate(pp.RESETS)]
    fig, diff = pp.plot_reset_ablation(pd.DataFrame(rows))
    assert not check_figure(fig)
    assert list(diff.columns) == [r for r in sorted(pp.RESETS) if r != "m"]
    assert diff.loc["mean", "v"] == pytest.approx(0.1) and diff.loc["mean", "none"] == pytest.approx(0.3)
    traj = pd.DataFrame({"step": [0, 5, 10], "tr_h": [3.0, 9.0, 4.0]})
    assert not check_figure(pp.plot_curvature_trajectory(traj, 8.0, 0))
