"""dpbench.experiments.layer_selection (notebook 04): which examples are public, the backbone
fallback, DP fine-tuning of subsets, the claim rows and the search comparison."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from dpbench import models as M
from dpbench.data import load_dataset
from dpbench.errors import UserError
from dpbench.experiments import layer_selection as ls
from dpbench.experiments import subset_study as ss
from dpbench.privacy import selection as tuning
from dpbench.training import mixing
from dpbench.privacy.accounting import steps_for_epochs


class Rows:
    """A stand-in recorder: `add` collects rows."""

    def __init__(self):
        self.rows = []

    def __call__(self, metric, value, **kw):
        self.rows.append({"metric": metric, "value": value, **kw})

    def of(self, metric):
        return [r for r in self.rows if r["metric"] == metric]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, digits):
    """A notebook-03-like results folder: an MLP public checkpoint over a 10% public split."""
    train, _ = digits
    folder = tmp_path_factory.mktemp("nb03")
    data = mixing.split_dataset(train, public_fraction=0.1, seed=3)
    spec = {"name": "mlp", "num_classes": 10, "in_chans": 1, "img_size": 8, "hidden": [16]}
    mixing.save_public_checkpoint(M.create_model(**spec), folder / ls.CHECKPOINT_NAME, data, model_spec=spec)
    return folder, data


def _origins(ds):
    return set(ds.origin_indices.tolist())


# --------------------------------------------------------------------------- which examples are public


def test_stratified_split_is_disjoint_and_covers_train(digits):
    train, _ = digits
    pub, priv, desc = ls.split_public(train, dataset="digits", public_fraction=0.1, seed=0)
    assert _origins(pub).isdisjoint(_origins(priv))
    assert _origins(pub) | _origins(priv) == _origins(train)
    assert len(pub.y) == round(0.1 * len(train.y))
    assert torch.equal(torch.bincount(pub.y, minlength=10) > 0, torch.ones(10, dtype=torch.bool))  # stratified
    assert "stratified 10%" in desc
    pub2, _, _ = ls.split_public(train, dataset="digits", public_fraction=0.1, seed=1)
    assert _origins(pub2) != _origins(pub)  # the seed matters


def test_upstream_public_examples_are_the_checkpoints_and_private_is_the_rest(digits, upstream):
    train, _ = digits
    folder, data = upstream
    info, note = ls.resolve_upstream("auto", folder, dataset="digits")
    assert info is not None and note == ""
    pub, priv, desc = ls.split_public(train, dataset="digits", upstream_info=info, public_fraction=0.5, seed=0)
    # the checkpoint's origin indices decide (public_fraction is ignored), not positions in `train`
    assert _origins(pub) == set(info.public_indices.tolist()) == set(data.public_indices.tolist())
    assert _origins(pub).isdisjoint(_origins(priv))
    assert _origins(pub) | _origins(priv) == _origins(train)
    mixing.check_no_overlap(info, priv)  # the loader's own check passes
    assert f"03's {len(pub.y)} public examples" in desc


def test_separate_public_set_leaves_all_of_train_private(digits):
    train, test = digits
    pub, priv, desc = ls.split_public(train, dataset="digits", public_set=test, public_name="other")
    assert pub is test and priv is train and "separate data set" in desc


# --------------------------------------------------------------------------- the upstream checkpoint


def test_resolve_upstream_modes(upstream, tmp_path):
    folder, _ = upstream
    with pytest.raises(UserError, match="backbone must be"):
        ls.resolve_upstream("imagenet", folder, dataset="digits")
    for backbone in ("public", "hub"):  # never look at 03's checkpoint
        assert ls.resolve_upstream(backbone, folder, dataset="digits") == (None, "")
    assert ls.resolve_upstream("auto", folder, dataset="digits", public_dataset="cifar100") == (None, "")
    # missing upstream: auto notes why, upstream refuses
    info, note = ls.resolve_upstream("auto", None, dataset="digits", upstream_error="no successful results; run it")
    assert info is None and note == "no successful results; run it"
    with pytest.raises(UserError, match="no successful results"):
        ls.resolve_upstream("upstream", None, dataset="digits", upstream_error="no successful results; run it")
    with pytest.raises(UserError, match="does not exist"):
        ls.resolve_upstream("upstream", tmp_path, dataset="digits")
    # pretrained on another data set
    info, note = ls.resolve_upstream("auto", folder, dataset="cifar10")
    assert info is None and "pretrained on digits, not cifar10" in note
    with pytest.raises(UserError, match="not cifar10"):
        ls.resolve_upstream("upstream", folder, dataset="cifar10")


FAST = ls.PublicTraining(model="small_cnn", epochs=1.0, batch_size=32, lr=0.003)


def test_backbone_falls_back_when_checkpoint_lacks_a_subset(digits, upstream):
    train, _ = digits
    folder, _ = upstream
    info, _ = ls.resolve_upstream("auto", folder, dataset="digits")
    pub, priv, _ = ls.split_public(train, dataset="digits", upstream_info=info)
    kw = dict(upstream_info=info, upstream_note="", public_set=pub, private_set=priv, dataset="digits",
              num_classes=10, public=FAST, in_chans=1, img_size=8)
    # the MLP defines head and all: the checkpoint itself
    model, source = ls.build_backbone("auto", subsets=["head", "all"], **kw)
    assert source == "03 checkpoint (mlp)" and M.subset_family(model) == "mlp"
    # it lacks norms+head: pretrain small_cnn here, on the same public examples
    model, source = ls.build_backbone("auto", subsets=["head", "norms+head"], **kw)
    assert source.startswith("trained here on 03's public examples") and "norms+head" in source
    assert M.subset_family(model) == "small_cnn" and not ls.subsets_missing(model, ["head", "norms+head"])
    # "upstream" keeps the checkpoint even then; the subset is reported missing
    model, source = ls.build_backbone("upstream", subsets=["head", "norms+head"], **kw)
    assert source == "03 checkpoint (mlp)" and set(ls.subsets_missing(model, ["head", "norms+head"])) == {"norms+head"}
    # a private set that contains public examples is refused by the loader
    with pytest.raises(UserError, match="were public"):
        ls.build_backbone("auto", subsets=["head"], **{**kw, "private_set": train})


def test_backbone_without_checkpoint_says_why_and_gets_a_new_head(digits):
    train, _ = digits
    pub, priv, _ = ls.split_public(train, dataset="digits", public_fraction=0.1, seed=0)
    kw = dict(upstream_info=None, public_set=pub, private_set=priv, dataset="digits", subsets=["head"],
              public=FAST, in_chans=1, img_size=8)
    _, source = ls.build_backbone("auto", upstream_note="no results of 03; run it first", num_classes=10, **kw)
    assert source == "trained here: no 03 checkpoint (no results of 03)"
    _, source = ls.build_backbone("auto", upstream_note="", num_classes=10, **kw)
    assert source == "trained here: no 03 checkpoint (not run)"
    _, source = ls.build_backbone("public", upstream_note="", num_classes=10, **kw)
    assert source == "trained here (backbone='public')"
    # a private task with other classes than the public one: a new head, the body kept
    model, _ = ls.build_backbone("public", upstream_note="", num_classes=3, **kw)
    assert model.head.out_features == 3
    torch.manual_seed(0)
    again = ls.pretrain_public(pub, 10, FAST, in_chans=1, img_size=8, seed=0)
    body = [n for n in again.state_dict() if n not in M.head_parameter_names(again)]
    assert all(torch.equal(model.state_dict()[n], again.state_dict()[n]) for n in body)  # seeded: same pretraining


# --------------------------------------------------------------------------- fine-tuning and rows


@pytest.fixture(scope="module")
def setup(digits):
    train, test = digits
    return ls.prepare(dataset="digits", train=train, test=test, backbone="public", upstream=None,
                      public=FAST, subsets=["head", "all", "norms+head"], val_fraction=0.2, epochs=0.5,
                      batch_size=128, lr=0.1, seed=0)


def test_prepare_parts_are_disjoint(setup, digits):
    train, _ = digits
    parts = [_origins(setup.public_set), _origins(setup.private_train), _origins(setup.private_val)]
    assert sum(len(p) for p in parts) == len(set().union(*parts)) == len(train.y)  # disjoint and covering
    assert setup.n_private == setup.n_train + setup.n_val and setup.n_val == round(0.2 * setup.n_private)
    assert setup.sample_rate == pytest.approx(128 / setup.n_train)
    assert setup.steps == steps_for_epochs(0.5, setup.sample_rate) >= 1
    assert setup.missing == {}  # small_cnn defines all three
    assert "backbone: trained here (backbone='public')" in setup.describe()


def test_grid_reaches_target_epsilon_and_records_missing(setup):
    add = Rows()
    stub = ls.Setup(**{**setup.__dict__, "missing": {"norms+head": "no norms"}})
    sigmas = ls.noise_multipliers(stub, [2.0])
    rows = ls.run_grid(stub, ["head", "norms+head"], [2.0], [0], sigmas, add)
    assert [r["subset"] for r in rows] == ["head"]
    assert rows[0]["epsilon"] == pytest.approx(2.0, rel=0.02)
    assert rows[0]["trained_params"] == M.trainable_subset(setup.model, "head").num_params
    assert 0 <= rows[0]["val_correct"] <= stub.n_val
    failed = [r for r in add.of("test_acc") if r.get("status") == "failed"]
    assert [r["method"] for r in failed] == ["norms+head"] and failed[0]["reason"] == "no norms"
    # the backbone itself is untouched by fine-tuning a copy
    before = {n: p.clone() for n, p in setup.model.state_dict().items()}
    ls.finetune(setup, "all", sigmas[2.0], 1)
    assert all(torch.equal(before[n], p) for n, p in setup.model.state_dict().items())
    ref = ls.finetune(setup, "all", None, 0, private=False)
    assert ref["ledger"] is None and ref["epsilon"] == math.inf


def _grid():
    # test accuracies chosen so that the validation pick differs from the test ranking
    rows = []
    for eps, vals in ((1.0, {"head": (0.5, 0.9), "all": (0.7, 0.2), "mid": (0.6, 0.5)}),
                      (2.0, {"head": (0.4, 0.3), "all": (0.8, 0.8), "mid": (0.6, 0.5)})):
        for seed in (0, 1):
            for subset, (test, val) in vals.items():
                rows.append({"subset": subset, "eps": eps, "seed": seed, "test_acc": test + 0.01 * seed,
                             "val_acc": val})
    return pd.DataFrame(rows)


def test_baseline_rows_naive_picks_by_clean_validation(setup):
    grid = _grid()
    add = Rows()
    rows = ls.baseline_rows(setup, grid, {1.0: 3.0, 2.0: 2.0}, "mid", add)
    naive = [r for r in rows if r["method"] == "naive search"]
    assert [(r["eps"], r["chosen"]) for r in naive] == [(1.0, "head"), (1.0, "head"), (2.0, "all"), (2.0, "all")]
    # three runs compose to more than one run's epsilon
    one = tuning.composition_epsilon(ls.accounting.dpsgd_event(3.0, setup.sample_rate, setup.steps), 1,
                                     delta=setup.delta, n=setup.n_private)
    assert naive[0]["composed_epsilon"] > one
    fixed = [r for r in rows if r["method"] == "fixed: mid"]
    assert len(fixed) == 4 and all(r["K"] == 1 for r in fixed)
    assert ls.selection_summary(pd.DataFrame(rows)).loc[("naive search", 1.0), "runs"] == 3


def test_selection_distribution():
    assert ls.selection_distribution("poisson", 2.0).kind == "poisson"
    assert ls.selection_distribution("geometric", 2.0).mean == pytest.approx(2.0, rel=1e-3)
    assert ls.selection_distribution("truncated_negative_binomial", 3.0, eta=0.5).mean == pytest.approx(3.0, rel=1e-3)
    with pytest.raises(UserError, match="selection must be one of"):
        ls.selection_distribution("uniform", 2.0)


def test_private_selection_costs_the_target(setup):
    add = Rows()
    dist = ls.selection_distribution("poisson", 1.0)
    rows, ledgers = ls.run_private_selection(setup, ["head"], [4.0], [0], dist, 8.0, add)
    assert len(ledgers) == 1 and ledgers[0]["target_epsilon"] == 4.0
    (row,) = rows
    assert row["epsilon"] <= 4.0 * 1.01 and row["base_epsilon"] < row["epsilon"]
    assert row["chosen"] in (None, "head") and (row["K"] > 0) == (row["chosen"] == "head")
    (rec,) = add.of("test_acc")
    assert rec["method"] == "private selection" and rec["status"] == ("ok" if row["K"] else "failed")
    assert np.isfinite(rec["per_run_epsilon"])


# ----------------------------------------------------------------------- the issue-17 study design


def test_selection_and_evaluation_seeds_are_disjoint():
    sel, ev = ss.seeds_for(5, 3, 6)
    assert not set(sel) & set(ev) and len(sel) == 3 and len(ev) == 6
    with pytest.raises(UserError):
        ss.check_disjoint([1, 2], [2, 3])


def test_every_subset_gets_the_same_tuning_budget():
    grid = ss.tuning_grid(["head", "bias+head", "all"], [0.03, 0.1, 0.3])
    assert set(ss.budget_per_subset(grid).values()) == {3}
    with pytest.raises(UserError):
        ss.tuning_grid(["head"], [])


def _fake_runs(split, seeds, val, test):
    return [dict(subset=s, lr=lr, eps=e, seed=k, split=split, val_acc=val(s, lr, e, k), test_acc=test(s, lr, e, k),
                 trained_params=1) for e in (1.0, 2.0, 8.0) for k in seeds for s in ("head", "all") for lr in (0.1, 1.0)]


def test_choice_uses_validation_of_selection_runs_only():
    # validation prefers head at eps 1 and all at eps 8 (lr 1.0); test accuracy would say the opposite
    sel = _fake_runs("select", [0, 1], lambda s, lr, e, k: (0.9 if (s == "head") == (e < 4) else 0.5) + 0.01 * lr,
                     lambda s, lr, e, k: 0.0 if (s == "head") == (e < 4) else 1.0)
    best_lr, selected = ss.choose(sel)
    assert selected == {1.0: "head", 2.0: "head", 8.0: "all"}
    assert best_lr[("head", 1.0)] == 1.0
    with pytest.raises(UserError):
        ss.choose(sel + [dict(sel[0], split="evaluate")])


def test_claim_rows_judge_only_evaluation_runs_and_the_interaction():
    sel = _fake_runs("select", [0, 1], lambda s, lr, e, k: 0.9 if (s == "head") == (e < 4) else 0.5,
                     lambda *a: 0.5)
    _, selected = ss.choose(sel)
    ev = [dict(r, split="evaluate", seed=r["seed"] + 10, lr=0.1,
               test_acc=(0.8 if r["subset"] == "head" else 0.7) if r["eps"] == 1.0 else
               (0.6 if r["subset"] == "head" else 0.9)) for r in sel if r["lr"] == 0.1]
    rows = []
    ss.claim_rows(sel, ev, selected, lambda metric, value, **kw: rows.append(dict(metric=metric, value=value, **kw)),
                  setting="test")
    judged = [r for r in rows if r["claim_id"] != "D-layer-choice-matters" and r.get("comparison") != "analogue"]
    assert judged and all(r["split"] == "evaluate" and r["seed"] >= 10 for r in judged)
    choice = [r for r in rows if r["claim_id"] == "D-layer-choice-matters"]
    assert {r["split"] for r in choice} == {"select", "evaluate"}
    assert all(r["metric"] == "val_acc" for r in choice if r["split"] == "select")
    it = ss.interaction(ev)
    assert it["mean"] == pytest.approx((0.8 - 0.7) - (0.6 - 0.9)) and it["n"] == 2
    assert {r["method"] for r in rows if r["claim_id"] == "D-selected-beats-all-eps1"} == {"selected", "all"}
