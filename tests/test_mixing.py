"""Public/private mixing: schedules, optimizer-state reset, budget-free public steps, q, overlap."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from dpbench.privacy import accounting
from dpbench.training import mixing
from dpbench.errors import UserError


def toy_data(n=200, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=g) * 2
    y = torch.arange(n) % classes
    x = centres[y] + torch.randn(n, d, generator=g)
    return x, y


class Toy:
    """A minimal data set with the attributes dpbench data sets carry."""

    def __init__(self, x, y, name="toy", origin=None):
        self.x, self.y, self.name = x, y, name
        self.origin_indices = torch.arange(len(y)) if origin is None else origin

    def subset(self, idx):
        return Toy(self.x[idx], self.y[idx], self.name, self.origin_indices[idx])


def mlp(d=6, classes=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, classes))


# --------------------------------------------------------------------- schedules


def test_schedule_values():
    T = 10
    assert mixing.make_schedule("only_private", T).weights().tolist() == [0.0] * T
    assert mixing.make_schedule("only_public", T).weights().tolist() == [1.0] * T
    seq = mixing.make_schedule("sequential", T, switch_step=4)
    assert seq.weights().tolist() == [1.0] * 4 + [0.0] * 6
    assert (seq.private_steps, seq.public_steps) == (6, 4)
    assert [t for t in range(T) if seq.is_switch(t)] == [4]
    sr = mixing.make_schedule("sample_ratio", T, n_public=20, n_private=180)
    assert np.allclose(sr.weights(), 0.1) and sr.private_steps == T and sr.public_steps == T
    cos = mixing.make_schedule("cosine", T, decay_steps=4)
    assert cos.weights().tolist() == pytest.approx([1.0, 0.5 + 0.5 * math.cos(math.pi / 4), 0.5,
                                                    0.5 - 0.5 * math.cos(math.pi / 4), 0, 0, 0, 0, 0, 0])
    assert cos.private_steps == 9 and cos.public_steps == 4 and not any(cos.is_switch(t) for t in range(T))
    # cosine defaults to decaying over the sequential switch step
    assert mixing.make_schedule("cosine", T, switch_step=5).decay_steps == 5
    assert mixing.make_schedule("sequential", T, switch_step=0).private_steps == T
    with pytest.raises(UserError):
        mixing.make_schedule("sequential", T)
    with pytest.raises(UserError):
        mixing.make_schedule("sequential", T, switch_step=11)
    with pytest.raises(UserError):
        mixing.make_schedule("bogus", T)
    with pytest.raises(UserError):
        mixing.make_schedule("sample_ratio", T, n_public=0, n_private=5)


# --------------------------------------------------------------------- optimizer state


def adam_after_steps(amsgrad=False):
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, amsgrad=amsgrad)
    x, y = toy_data(20)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return opt


def snapshot(opt):
    return [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()} for s in opt.state.values()]


@pytest.mark.parametrize("reset,cleared", [
    ("m", {"exp_avg"}), ("v", {"exp_avg_sq"}), ("t", {"step"}), ("none", set()), ("mv", {"exp_avg", "exp_avg_sq"}),
])
def test_reset_optimizer_state_clears_only_the_chosen_parts(reset, cleared):
    opt = adam_after_steps()
    before = snapshot(opt)
    touched = mixing.reset_optimizer_state(opt, reset)
    assert set(touched) == cleared
    for old, new in zip(before, opt.state.values()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in cleared:
                assert float(new[key].abs().sum()) == 0.0
            else:
                assert torch.equal(old[key], new[key]) and float(old[key].abs().sum()) > 0


def test_reset_unwraps_dp_optimizer_and_handles_sgd_and_amsgrad():
    opt = adam_after_steps(amsgrad=True)

    class Wrapper:
        optimizer = opt

    assert set(mixing.reset_optimizer_state(Wrapper(), "v")) == {"exp_avg_sq", "max_exp_avg_sq"}
    model = mlp()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = toy_data(20)
    nn.functional.cross_entropy(model(x), y).backward()
    sgd.step()
    assert mixing.reset_optimizer_state(sgd, "m") == ["momentum_buffer"]
    assert all(float(s["momentum_buffer"].abs().sum()) == 0 for s in sgd.state.values())
    with pytest.raises(UserError):
        mixing.reset_optimizer_state(sgd, "x")


# --------------------------------------------------------------------- data


def test_split_and_separate_datasets():
    x, y = toy_data(100)
    ds = Toy(x, y, origin=torch.arange(1000, 1100))
    data = mixing.split_dataset(ds, public_fraction=0.1, seed=0)
    assert data.n_public == 10 and data.n_private == 90
    assert not set(data.public_indices.tolist()) & set(data.private_indices.tolist())
    assert int(data.public_indices.min()) >= 1000  # origin indices, not positions
    by_class = mixing.split_dataset(ds, public_classes=[0])
    assert (by_class.public.y == 0).all() and (by_class.private.y != 0).all()
    with pytest.raises(UserError):
        mixing.separate_datasets(ds, ds)
    sep = mixing.separate_datasets(Toy(x, y, name="a"), Toy(x, y, name="b"))
    assert (sep.dataset, sep.private_dataset) == ("a", "b")
    with pytest.raises(UserError):
        mixing.split_dataset(ds, public_fraction=0.0)


def test_public_batches_cover_each_epoch():
    it = iter(mixing.PublicBatches(10, 3, seed=1))
    first = torch.cat([next(it) for _ in range(3)])
    assert len(set(first.tolist())) == 9  # 3 full batches per epoch, tail dropped
    assert all(len(next(it)) == 3 for _ in range(5))


# --------------------------------------------------------------------- the mixed loop


@pytest.fixture(scope="module")
def split():
    x, y = toy_data(300)
    return mixing.split_dataset(Toy(x, y), public_fraction=0.2, seed=0), Toy(*toy_data(90, seed=5))


def test_public_steps_spend_no_budget_and_q_uses_private_size(split):
    data, test = split
    T, s, B = 30, 12, 24
    sched = mixing.make_schedule("sequential", T, switch_step=s)
    res = mixing.fit_mixed(mlp(), data, sched, test_data=test, private_batch_size=B, public_batch_size=16,
                           noise_multiplier=1.1, delta=1e-3, eval_every=10, progress=False)
    assert res.sample_rate == pytest.approx(B / data.n_private)
    assert res.sample_rate != pytest.approx(B / (data.n_public + data.n_private))
    assert res.private_steps == T - s and res.ledger.steps == T - s
    alone = accounting.epsilon(1.1, B / data.n_private, T - s, delta=1e-3)
    assert res.epsilon == pytest.approx(alone, rel=1e-9)
    assert res.epsilon < accounting.epsilon(1.1, B / data.n_private, T, delta=1e-3)
    # epsilon stays 0 through the public phase and grows afterwards
    eps = {row["step"]: row["epsilon"] for row in res.history}
    assert eps[0] == 0.0 and eps[10] == 0.0 and eps[20] > 0.0
    only_pub = mixing.fit_mixed(mlp(), data, mixing.make_schedule("only_public", 10), private_batch_size=B,
                                noise_multiplier=1.0, delta=1e-3, progress=False)
    assert only_pub.epsilon == 0.0 and only_pub.ledger.steps == 0


def test_target_epsilon_calibrates_on_private_steps(split):
    data, test = split
    sched = mixing.make_schedule("sample_ratio", 20, n_public=data.n_public, n_private=data.n_private)
    res = mixing.fit_mixed(mlp(), data, sched, private_batch_size=30, target_epsilon=2.0, delta=1e-3,
                           progress=False)
    assert res.ledger.steps == 20
    assert res.epsilon <= 2.0 and res.epsilon > 1.9


def test_mixed_gradient_is_the_weighted_combination(split):
    """With no noise and plain SGD, one sample-ratio step moves the weights by
    lr * (a g_pub + (1 - a) clipped_mean_private)."""
    data, _ = split
    sched = mixing.make_schedule("sample_ratio", 1, n_public=1, n_private=3)  # a = 0.25
    n = data.n_private
    base = mlp()
    start = [p.detach().clone() for p in base.parameters()]
    res = mixing.fit_mixed(base, data, sched, private_batch_size=n, public_batch_size=data.n_public,
                           optimizer="sgd", lr=0.5, mode="non_private", eval_at_start=False, progress=False)
    ref = mlp()
    px, py = data.private.x, data.private.y
    # q = 1: the Poisson batch is the whole private set
    g_priv = torch.autograd.grad(nn.functional.cross_entropy(ref(px), py, reduction="sum") / n, list(ref.parameters()))
    g_pub = torch.autograd.grad(nn.functional.cross_entropy(ref(data.public.x), data.public.y), list(ref.parameters()))
    for p0, p1, gv, gu in zip(start, res.model.parameters(), g_priv, g_pub):
        assert torch.allclose(p1.detach(), p0 - 0.5 * (0.75 * gv + 0.25 * gu), atol=1e-5)
    assert res.epsilon == math.inf


def test_reset_applied_at_switch(split, monkeypatch):
    data, _ = split
    calls = []
    real = mixing.reset_optimizer_state

    def spy(opt, reset):
        calls.append(tuple(reset))
        return real(opt, reset)

    monkeypatch.setattr(mixing, "reset_optimizer_state", spy)
    sched = mixing.make_schedule("sequential", 8, switch_step=3)
    mixing.fit_mixed(mlp(), data, sched, private_batch_size=20, noise_multiplier=1.0, delta=1e-3,
                     reset="m", progress=False)
    assert calls == [("m",)]
    calls.clear()
    mixing.fit_mixed(mlp(), data, sched, private_batch_size=20, noise_multiplier=1.0, delta=1e-3,
                     reset="none", progress=False)
    assert calls == []


def test_modes_and_errors(split):
    data, _ = split
    sched = mixing.make_schedule("only_private", 3)
    for mode in ("clip_only", "noise_only", "non_private"):
        r = mixing.fit_mixed(mlp(), data, sched, private_batch_size=20, noise_multiplier=1.0, delta=1e-3,
                             mode=mode, progress=False)
        assert r.epsilon == math.inf and r.ledger is None
    with pytest.raises(UserError):
        mixing.fit_mixed(mlp(), data, sched, private_batch_size=20, progress=False)  # no sigma, no eps
    with pytest.raises(UserError):
        mixing.fit_mixed(mlp(), data, sched, private_batch_size=10_000, noise_multiplier=1.0, progress=False)
    with pytest.raises(UserError):
        mixing.fit_mixed(mlp(), data, sched, private_batch_size=20, noise_multiplier=1.0, delta=0.5,
                         progress=False)  # delta >= 1/n


def test_every_private_step_is_a_dp_optimizer_step_and_everything_agrees(split, monkeypatch):
    """steps_taken, the ledger, the planned private steps and the inner optimizer's steps agree."""
    data, _ = split
    inner_steps = []
    real_step = torch.optim.AdamW.step

    def counting_step(self, *a, **kw):
        inner_steps.append(1)
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)
    sched = mixing.make_schedule("cosine", 12, decay_steps=5)  # public-only, mixed and private steps
    res = mixing.fit_mixed(mlp(), data, sched, private_batch_size=20, public_batch_size=16, noise_multiplier=1.0,
                           delta=1e-3, progress=False)
    assert res.optimizer.steps_taken == res.ledger.steps == res.private_steps == sched.private_steps == 11
    assert res.optimizer.public_steps == 1 and res.public_steps == sched.public_steps == 5
    assert len(inner_steps) == sched.steps == 12
    assert res.epsilon == pytest.approx(accounting.epsilon(1.0, 20 / data.n_private, 11, delta=1e-3), rel=1e-9)
    assert res.config["schedule"] == "cosine" and {r["schedule"] for r in res.history} == {"cosine"}
    # the engine built for the run is detached: no copy of the model was needed for public passes
    assert res.engine._handles == []


def test_mixed_dp_step_adds_the_noise_of_the_private_part_only(split):
    """One sample-ratio step at q = 1: dp minus clip_only (same seed, same batches) is exactly
    lr (1 - a) N(0, sigma^2 C^2) / E[B] per coordinate (plain SGD): the mixing is the paper's rule
    in distribution, not only in expectation."""
    data, _ = split
    n = data.n_private
    sched = mixing.make_schedule("sample_ratio", 1, n_public=1, n_private=3)  # a = 0.25
    sigma, C, lr, a = 2.0, 0.5, 0.5, 0.25
    z = []
    for seed in range(4):
        runs = {mode: mixing.fit_mixed(mlp(), data, sched, private_batch_size=n, public_batch_size=16,
                                       optimizer="sgd", lr=lr, noise_multiplier=sigma, max_grad_norm=C, delta=1e-3,
                                       mode=mode, eval_at_start=False, seed=seed, progress=False)
                for mode in ("dp", "clip_only")}
        diff = torch.cat([(p - q).detach().flatten() for p, q in zip(runs["dp"].model.parameters(),
                                                                       runs["clip_only"].model.parameters())])
        z.append(diff / (-lr * (1 - a) * sigma * C / n))
    z = torch.cat(z)
    assert len(z) > 600
    assert abs(float(z.mean())) < 0.15 and 0.9 < float(z.std()) < 1.1


def test_mixing_plan_refuses_missing_public_data():
    with pytest.raises(UserError, match="public data"):
        mixing.MixingPlan(mixing.make_schedule("only_public", 3), None)


# --------------------------------------------------------------------- checkpoints


def test_public_checkpoint_records_indices_and_refuses_overlap(split, tmp_path):
    data, _ = split
    model = mlp()
    path = mixing.save_public_checkpoint(model, tmp_path / "public.safetensors", data,
                                         model_spec={"name": "mlp"}, extra={"steps": 3})
    info = mixing.read_public_metadata(path)
    assert info.dataset == "toy" and info.split == "train"
    assert torch.equal(info.public_indices, data.public_indices)
    assert info.model == {"name": "mlp"}
    # the private part of the same split is fine
    fresh = mlp()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    loaded, _ = mixing.load_public_checkpoint(path, data.private, model=fresh)
    for a, b in zip(loaded.parameters(), model.parameters()):
        assert torch.equal(a, b)
    # any overlap is refused: the whole data set, or indices including a public one
    x, y = toy_data(300)
    with pytest.raises(UserError, match="were public"):
        mixing.load_public_checkpoint(path, Toy(x, y), model=mlp())
    with pytest.raises(UserError, match="were public"):
        mixing.check_no_overlap(info, data.public_indices[:1])
    # another data set or split cannot overlap
    mixing.check_no_overlap(info, data.public_indices, dataset="other")
    mixing.check_no_overlap(info, data.public_indices, split="test")
    with pytest.raises(UserError):
        mixing.check_no_overlap(info, None)
    assert torch.equal(info.private_complement(300), data.private_indices)
    with pytest.raises(UserError):
        mixing.read_public_metadata(tmp_path / "missing.safetensors")
