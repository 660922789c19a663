"""Study design helpers: validation split, equal tuning budgets, the held-out test set, seed sizing."""

import math

import numpy as np
import pytest
import torch

from conftest import ListRecorder

from dpbench.errors import UserError
from dpbench.experiments import study_design as sd


def _data(n=100, classes=4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, generator=g), torch.arange(n) % classes


def test_carve_validation_is_disjoint_stratified_and_seeded():
    x, y = _data()
    (fx, fy), (vx, vy) = sd.carve_validation((x, y), 0.2, seed=1)
    assert len(vy) == 20 and len(fy) == 80
    assert torch.bincount(vy).tolist() == [5, 5, 5, 5]  # stratified
    rows = {tuple(r.tolist()) for r in fx} & {tuple(r.tolist()) for r in vx}
    assert not rows  # disjoint
    (_, _), (vx2, _) = sd.carve_validation((x, y), 0.2, seed=1)
    assert torch.equal(vx, vx2)
    (_, _), (vx3, _) = sd.carve_validation((x, y), 0.2, seed=2)
    assert not torch.equal(vx, vx3)
    with pytest.raises(UserError):
        sd.carve_validation((x, y), 1.0, seed=0)


def test_tune_gives_every_arm_the_same_grid_and_seeds_and_picks_the_best_mean():
    calls = []

    def score(arm, lr, seed):
        calls.append((arm, lr, seed))
        best = {"a": 0.1, "b": 1.0}[arm]
        return -abs(math.log(lr / best)) + 0.01 * seed

    t = sd.tune(["a", "b"], [0.1, 0.3, 1.0], score, seeds=[0, 1])
    assert t.chosen == {"a": 0.1, "b": 1.0}
    assert t.budget() == {"a": 6, "b": 6}
    assert sorted(c for c in calls if c[0] == "a") == sorted((("a", v, s) for v in (0.1, 0.3, 1.0) for s in (0, 1)))
    assert t.scores("a") == {0: pytest.approx(0.0), 1: pytest.approx(0.01)}
    sd.check_equal_budget(t)
    t.rows.pop()  # one arm one run short: unequal budget
    with pytest.raises(UserError, match="budget"):
        sd.check_equal_budget(t)


def test_tune_records_validation_rows_and_rejects_a_repeated_grid_value():
    rec = ListRecorder()
    sd.tune(["a"], [1, 2, 3], lambda a, v, s: v, seeds=[5], rec=rec, epsilon=2.0)
    assert len(rec.rows) == 3 and all(r["split"] == "validation" and r["epsilon"] == 2.0 for r in rec.rows)
    with pytest.raises(UserError):
        sd.tune(["a"], [1, 1, 2], lambda a, v, s: v, seeds=[0])


def test_held_out_test_is_used_once_per_run():
    x, y = _data(40)
    test = sd.HeldOutTest((x, y))
    model = torch.nn.Linear(3, 4)
    loss, acc = test.evaluate(model, ("flat", 0))
    assert 0 <= acc <= 1 and loss > 0
    test.evaluate(model, ("flat", 1))
    with pytest.raises(UserError, match="already used"):
        test.evaluate(model, ("flat", 0))
    assert test.used == [("flat", 0), ("flat", 1)]


def test_halfwidth_and_seed_sizing():
    d = np.array([0.01, -0.01, 0.02, 0.0, 0.015, -0.005])
    hw = sd.halfwidth(d)
    assert hw == pytest.approx(2.5706 * d.std(ddof=1) / math.sqrt(6), rel=1e-3)
    n = sd.seeds_needed(d, target=0.005)
    assert sd.t_quantile(n - 1) * d.std(ddof=1) / math.sqrt(n) < 0.005
    assert sd.t_quantile(n - 2) * d.std(ddof=1) / math.sqrt(n - 1) >= 0.005 or n == 6
    assert sd.seeds_needed(d, target=10.0) == 6  # never below the verdict's minimum
    assert sd.seeds_needed(d, target=1e-6, max_seeds=30) == 30
    with pytest.raises(UserError):
        sd.seeds_needed([0.1], target=0.01)


def test_fresh_seeds_avoid_the_pilot_seeds():
    assert sd.fresh_seeds(3, avoid=[0, 1], start=0) == [2, 3, 4]
    s = sd.fresh_seeds(20, avoid=range(1000, 1005), start=1000)
    assert len(set(s)) == 20 and not set(s) & set(range(1000, 1005))


def test_check_comparisons():
    got = sd.check_comparisons({"X": ["flat", "layer"]}, ["flat", "layer", "device"])
    assert got == {"X": ("flat", "layer")}
    with pytest.raises(UserError, match="not run"):
        sd.check_comparisons({"X": ["flat", "nope"]}, ["flat"])
    with pytest.raises(UserError):
        sd.check_comparisons({"X": ["flat", "flat"]}, ["flat"])


