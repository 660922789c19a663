"""The shared training loop, end to end with the real clipping engine and accountant."""

import math

import pytest
import torch
from torch import nn

from dpbench.privacy import accounting
from dpbench.errors import UserError
from dpbench.training.loop import (BatchSpec, ClipSpec, EvalSpec, OptimSpec, PlannedStep, PrivacySpec, StepPlan,
                                   TrainResult, evaluate, fit, specs_from_flat)


def blobs(n=600, d=10, k=4, seed=0):
    """k Gaussian clusters in d dimensions: easy to learn, chance accuracy 1/k."""
    g = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(k, d, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    x = centres[y] + torch.randn(n, d, generator=g)
    return x, y


def mlp(seed=0, d=10, k=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, k))


TRAIN, TEST = blobs(600, seed=0), blobs(300, seed=0)
QUIET = EvalSpec(progress=False)


def test_private_training_learns_and_matches_the_ledger():
    res = fit(mlp(), TRAIN, batching=BatchSpec(steps=60, sample_rate=0.1),
              privacy=PrivacySpec(noise_multiplier=0.8, delta=1e-5), clipping=ClipSpec(max_grad_norm=1.0),
              optim=OptimSpec(lr=0.5), evaluation=EvalSpec(test_data=TEST, progress=False), seed=0)
    assert isinstance(res, TrainResult) and res.private
    assert res.final["test_acc"] > 0.6  # chance is 0.25
    assert res.steps == 60 == res.ledger.steps == res.optimizer.steps_taken
    expected_eps = accounting.epsilon(0.8, 0.1, 60, delta=1e-5)
    assert res.epsilon == pytest.approx(res.ledger.epsilon()) == pytest.approx(expected_eps, rel=1e-6)
    assert res.history[-1]["epsilon"] == pytest.approx(expected_eps, rel=1e-6)
    # history: evaluated about once an epoch (1/q = 10 steps), epsilon grows with the step
    assert [r["step"] for r in res.history] == [10, 20, 30, 40, 50, 60]
    eps = [r["epsilon"] for r in res.history]
    assert all(a < b for a, b in zip(eps, eps[1:]))
    assert res.history[2]["epsilon"] == pytest.approx(accounting.epsilon(0.8, 0.1, 30, delta=1e-5), rel=1e-6)
    for r in res.history:
        assert r["epoch"] == pytest.approx(r["step"] * 0.1)
    assert not res.approximate and not res.ledger.approximate


def test_target_epsilon_is_calibrated():
    res = fit(mlp(), TRAIN, batching=BatchSpec(epochs=2, expected_batch_size=60),
              privacy=PrivacySpec(target_epsilon=2.0), optim=OptimSpec(lr=0.5), evaluation=QUIET)
    assert res.steps == 20
    assert res.noise_multiplier > 0
    assert res.epsilon <= 2.0 and res.epsilon == pytest.approx(2.0, rel=0.02)


def test_nonprivate_path():
    res = fit(mlp(), TRAIN, batching=BatchSpec(epochs=3, expected_batch_size=60), privacy=None,
              optim=OptimSpec(lr=0.5), evaluation=EvalSpec(test_data=TEST, progress=False))
    assert res.final["test_acc"] > 0.9
    assert math.isinf(res.epsilon) and res.ledger is None and res.engine is None
    assert isinstance(res.optimizer, torch.optim.SGD)


def test_physical_chunks_give_the_same_model_as_one_chunk():
    """Noise once per logical batch: splitting into chunks changes nothing (same seed)."""
    finals = []
    for physical in (None, 7):
        model = mlp(seed=3)
        res = fit(model, TRAIN, batching=BatchSpec(steps=5, sample_rate=0.05, max_physical_batch=physical),
                  privacy=PrivacySpec(noise_multiplier=1.0, track_epsilon=False), optim=OptimSpec(lr=0.5),
                  evaluation=QUIET, seed=4)
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        assert res.history[-1]["epsilon"] is None and res.epsilon > 0  # final epsilon always computed
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-4, atol=1e-5)


def test_empty_batches_are_steps_too():
    sizes = []
    res = fit(mlp(), TRAIN, batching=BatchSpec(steps=40, sample_rate=0.002), privacy=PrivacySpec(noise_multiplier=1.0),
              evaluation=QUIET, hooks=[lambda info: sizes.append(info.batch_size)])
    assert 0 in sizes  # with E[B] = 1.2 about 30% of the batches are empty
    assert len(sizes) == 40 == res.ledger.steps == res.optimizer.steps_taken


def test_callbacks_see_per_sample_norms_of_the_logical_batch():
    seen = []

    def cb(info):
        seen.append((info.step, info.batch_size, {k: v.shape[0] for k, v in info.norms.items()}))

    fit(mlp(), TRAIN, batching=BatchSpec(steps=4, sample_rate=0.05, max_physical_batch=10),
        privacy=PrivacySpec(noise_multiplier=1.0), clipping=ClipSpec(style="layer"), evaluation=QUIET, hooks=[cb])
    assert [s for s, _, _ in seen] == [1, 2, 3, 4]
    for _, b, norms in seen:
        assert len(norms) == 2  # one group per trainable layer
        assert all(count == b for count in norms.values())


def test_shuffle_needs_approximate_and_is_recorded():
    with pytest.raises(UserError, match="approximate=True"):
        fit(mlp(), TRAIN, batching=BatchSpec(epochs=1, expected_batch_size=60, sampling="shuffle"),
            privacy=PrivacySpec(noise_multiplier=1.0), evaluation=QUIET)
    res = fit(mlp(), TRAIN, batching=BatchSpec(epochs=1, expected_batch_size=60, sampling="shuffle", approximate=True),
              privacy=PrivacySpec(noise_multiplier=1.0), evaluation=QUIET)
    assert res.approximate and res.ledger.approximate
    assert "Poisson" in res.ledger.to_dict()["approximate_reason"]
    assert res.steps == 10 == res.ledger.steps
    # without DP there is no accounting to invalidate: shuffling needs no flag
    res = fit(mlp(), TRAIN, batching=BatchSpec(epochs=1, expected_batch_size=60, sampling="shuffle"), privacy=None,
              evaluation=QUIET)
    assert res.steps == 10 and not res.approximate


def test_existing_ledger_keeps_composing():
    ledger = accounting.PrivacyLedger(delta=1e-5, n=600)
    for _ in range(2):
        res = fit(mlp(), TRAIN, batching=BatchSpec(steps=5, sample_rate=0.1),
                  privacy=PrivacySpec(noise_multiplier=1.0, ledger=ledger), evaluation=QUIET)
    assert ledger.steps == 10
    assert res.epsilon == pytest.approx(accounting.epsilon(1.0, 0.1, 10, delta=1e-5), rel=1e-6)


def test_fault_sample_rate_is_what_the_ledger_records():
    with pytest.raises(UserError, match="audit=True"):
        PrivacySpec(noise_multiplier=1.0, faults={"fault_sample_rate": 0.01})
    res = fit(mlp(), TRAIN, batching=BatchSpec(steps=3, sample_rate=0.1),
              privacy=PrivacySpec(noise_multiplier=1.0, faults={"fault_sample_rate": 0.01}, audit=True),
              evaluation=QUIET)
    assert res.ledger.events[0]["sample_rate"] == 0.01
    assert res.epsilon < accounting.epsilon(1.0, 0.1, 3, delta=1e-5)


def test_recorder_rows(tmp_path):
    from dpbench.workbench.results import Recorder

    rec = Recorder(tmp_path, experiment="t")
    res = fit(mlp(), TRAIN, batching=BatchSpec(steps=10, sample_rate=0.1), privacy=PrivacySpec(noise_multiplier=1.0),
              evaluation=EvalSpec(test_data=TEST, progress=False), label="dp-sgd")
    res.record(rec, method="dp-sgd")
    df = rec.frame()
    assert set(df["metric"]) == {"train_loss", "test_loss", "test_acc", "wall_time_s"}
    assert (df["method"] == "dp-sgd").all() and (df["delta"] == 1e-5).all()
    assert df["step"].max() == 10


def test_evaluate():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    y = torch.tensor([0, 1, 1])
    loss, acc = evaluate(model, (x, y), batch_size=2)
    assert acc == pytest.approx(2 / 3)
    expected = nn.functional.cross_entropy(model(x), y).item()
    assert loss == pytest.approx(expected, rel=1e-6)
    assert model.training


@pytest.mark.parametrize("build, match", [
    (lambda: fit(mlp(), TRAIN, batching=BatchSpec(steps=5, sample_rate=0.1, max_physical_batch=100),
                 privacy=PrivacySpec(noise_multiplier=1.0), evaluation=QUIET), "smaller than the physical"),
    (lambda: fit(mlp(), TRAIN, batching=BatchSpec(steps=5, sample_rate=0.1),
                 privacy=PrivacySpec(noise_multiplier=1.0, delta=0.01), evaluation=QUIET), "1/n"),
    (lambda: fit(mlp(), TRAIN, batching=BatchSpec(sample_rate=0.1), privacy=PrivacySpec(noise_multiplier=1.0)),
     "exactly one of epochs"),
    (lambda: BatchSpec(steps=5, epochs=1, sample_rate=0.1), "only one of epochs"),
    (lambda: BatchSpec(steps=5, sample_rate=0.1, expected_batch_size=60), "exactly one of sample_rate"),
    (lambda: BatchSpec(steps=5, sample_rate=1.5), "sample_rate"),
    (lambda: BatchSpec(steps=2.5, sample_rate=0.1), "steps"),
    (lambda: BatchSpec(steps=5, sample_rate=0.1, sampling="random"), "sampling"),
    (lambda: BatchSpec(steps=5, sample_rate=0.1, max_physical_batch=0), "max_physical_batch"),
    (lambda: PrivacySpec(), "noise_multiplier and target_epsilon"),
    (lambda: PrivacySpec(noise_multiplier=-1.0), "noise_multiplier"),
    (lambda: PrivacySpec(target_epsilon=0.0), "target_epsilon"),
    (lambda: PrivacySpec(noise_multiplier=1.0, delta=1.0), "delta"),
    (lambda: PrivacySpec(noise_multiplier=1.0, accountant="moments"), "accountant"),
    (lambda: PrivacySpec(noise_multiplier=1.0, gradient_noise_multiplier=0.5), "understate"),
    (lambda: PrivacySpec(noise_multiplier=1.0, faults={"fault_typo": True}, audit=True), "unknown fault"),
    (lambda: ClipSpec(max_grad_norm=0), "max_grad_norm"),
    (lambda: ClipSpec(method="fast"), "method"),
    (lambda: ClipSpec(style="diagonal"), "style"),
    (lambda: ClipSpec(clip_fn="tanh"), "clip_fn"),
    (lambda: OptimSpec(optimizer="lbfgs"), "optimizer"),
    (lambda: OptimSpec(lr=-1), "lr"),
    (lambda: EvalSpec(every=0), "every"),
    (lambda: EvalSpec(every="sometimes"), "every"),
    (lambda: fit(mlp(), TRAIN, batching=BatchSpec(steps=1, sample_rate=0.1), privacy={"noise_multiplier": 1.0}),
     "PrivacySpec"),
])
def test_bad_input(build, match):
    with pytest.raises(UserError, match=match):
        build()


def test_privacy_is_a_required_keyword_and_fit_has_at_most_12_parameters():
    import inspect

    params = inspect.signature(fit).parameters
    assert len(params) <= 12
    assert params["privacy"].default is inspect.Parameter.empty
    with pytest.raises(TypeError):
        fit(mlp(), TRAIN, batching=BatchSpec(steps=1, sample_rate=0.1))


def test_every_none_evaluates_only_at_the_end_and_epoch_is_the_default():
    never = fit(mlp(), TRAIN, batching=BatchSpec(steps=25, sample_rate=0.1), privacy=None,
                evaluation=EvalSpec(every=None, progress=False))
    assert [r["step"] for r in never.history] == [25]
    start = fit(mlp(), TRAIN, batching=BatchSpec(steps=25, sample_rate=0.1), privacy=None,
                evaluation=EvalSpec(every=None, at_start=True, progress=False))
    assert [r["step"] for r in start.history] == [0, 25]
    every7 = fit(mlp(), TRAIN, batching=BatchSpec(steps=15, sample_rate=0.1), privacy=None,
                 evaluation=EvalSpec(every=7, progress=False))
    assert [r["step"] for r in every7.history] == [7, 14, 15]
    assert never.config["label"] == ""


class _Probe:
    """Hook with both phases: records the released gradient and the parameters around the step."""

    def __init__(self):
        self.before, self.after = [], []

    def before_update(self, info):
        self.before.append((info.step, [p.grad.clone() for p in info.model.parameters()],
                            [p.detach().clone() for p in info.model.parameters()]))

    def after_step(self, info):
        self.after.append((info.step, [p.detach().clone() for p in info.model.parameters()]))


def test_hooks_run_between_noise_and_step_and_after_the_step():
    """before_update sees the noisy gradient / E[B] and the old weights; SGD then moves by lr * that."""
    probe = _Probe()
    lr = 0.3
    res = fit(mlp(), TRAIN, batching=BatchSpec(steps=4, sample_rate=0.05), privacy=PrivacySpec(noise_multiplier=5.0),
              optim=OptimSpec(lr=lr), evaluation=QUIET, hooks=[probe])
    assert [s for s, _, _ in probe.before] == [1, 2, 3, 4] == [s for s, _ in probe.after]
    for (_, grads, old), (_, new) in zip(probe.before, probe.after):
        for g, o, w in zip(grads, old, new):
            torch.testing.assert_close(w, o - lr * g)
    # with sigma = 5, C = 1 and E[B] = 30 the noise std per coordinate is 1/6: far above any clipped mean
    g_all = torch.cat([g.flatten() for g in probe.before[0][1]])
    assert 0.1 < float(g_all.std()) < 0.25
    assert res.optimizer.steps_taken == res.ledger.steps == 4


class _TwoPhase(StepPlan):
    """k public steps, then private ones, then mixed ones with weight a."""

    def __init__(self, public, private, mixed, a, pub_xy):
        self.k, self.p, self.m, self.a, self.xy = public, private, mixed, a, pub_xy
        self.steps, self.private_steps = public + private + mixed, private + mixed

    def weight(self, t):
        return 1.0 if t < self.k else (0.0 if t < self.k + self.p else self.a)

    def iter_steps(self, model, optimizer):
        for t in range(self.steps):
            w = self.weight(t)
            yield PlannedStep(private=w < 1, public=self.xy if w > 0 else None, public_weight=w)


def test_a_plan_spends_budget_only_on_private_steps_and_everything_agrees():
    pub = blobs(50, seed=5)
    plan = _TwoPhase(3, 4, 2, 0.25, pub)
    before = [p.detach().clone() for p in mlp().parameters()]
    res = fit(mlp(), TRAIN, batching=BatchSpec(sample_rate=0.1), privacy=PrivacySpec(noise_multiplier=1.0),
              evaluation=EvalSpec(every=1, progress=False), plan=plan)
    assert res.steps == 9 and res.private_steps == 6 == res.optimizer.steps_taken == res.ledger.steps
    assert res.public_steps == 5 and res.optimizer.public_steps == 3
    assert res.epsilon == pytest.approx(accounting.epsilon(1.0, 0.1, 6, delta=1e-5), rel=1e-6)
    assert [r["private_steps"] for r in res.history] == [0, 0, 0, 1, 2, 3, 4, 5, 6]
    assert [r["weight"] for r in res.history] == [1, 1, 1, 0, 0, 0, 0, 0.25, 0.25]
    assert any(not torch.equal(a, b) for a, b in zip(before, res.model.parameters()))
    # the engine recorded nothing during the public passes and was removed at the end
    assert res.engine._handles == [] and all(not l.uses for l in res.engine._layers)


def test_a_public_only_plan_is_plain_sgd_on_the_public_mean():
    pub = blobs(40, seed=6)
    model = mlp(seed=2)
    ref = mlp(seed=2)
    fit(model, TRAIN, batching=BatchSpec(sample_rate=0.1), privacy=PrivacySpec(noise_multiplier=1.0),
        optim=OptimSpec(lr=0.2), evaluation=QUIET, plan=_TwoPhase(3, 0, 0, 0.0, pub))
    opt = torch.optim.SGD(ref.parameters(), lr=0.2)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(ref(pub[0]), pub[1]).backward()
        opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)


def test_plan_and_batch_length_conflict():
    with pytest.raises(UserError, match="plan sets the number of steps"):
        fit(mlp(), TRAIN, batching=BatchSpec(steps=3, sample_rate=0.1), privacy=PrivacySpec(noise_multiplier=1.0),
            plan=_TwoPhase(1, 1, 0, 0.0, blobs(10)))
    with pytest.raises(UserError, match="public_weight"):
        PlannedStep(private=True, public=None, public_weight=0.5)


def test_missing_gpu_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(UserError, match="CUDA"):
        fit(mlp(), TRAIN, batching=BatchSpec(steps=1, sample_rate=0.1), privacy=PrivacySpec(noise_multiplier=1.0),
            evaluation=QUIET, device="cuda")


def test_specs_from_flat_names():
    specs = specs_from_flat({"steps": 5, "sample_rate": 0.1, "noise_multiplier": 1.0, "clip_method": "ghost",
                             "clip_style": "layer", "engine_kwargs": {"gamma": 0.1}, "lr": 0.5,
                             "optimizer_kwargs": {"momentum": 0.9}, "eval_every": 3, "progress": False,
                             "seed": 2, "label": "x"})
    assert specs["batching"] == BatchSpec(steps=5, sample_rate=0.1)
    assert specs["privacy"].noise_multiplier == 1.0
    assert specs["clipping"] == ClipSpec(method="ghost", style="layer", options={"gamma": 0.1})
    assert specs["optim"] == OptimSpec(lr=0.5, kwargs={"momentum": 0.9})
    assert specs["evaluation"] == EvalSpec(every=3, progress=False)
    assert (specs["seed"], specs["label"]) == (2, "x")
    off = specs_from_flat({"epochs": 1, "sample_rate": 0.1, "private": False, "track_epsilon": False,
                           "eval_every": None})
    assert off["privacy"] is None and off["evaluation"].every == "epoch"
    with pytest.raises(UserError, match="no privacy settings"):
        specs_from_flat({"steps": 1, "sample_rate": 0.1, "private": False, "noise_multiplier": 1.0})
    with pytest.raises(UserError, match="unknown training settings"):
        specs_from_flat({"steps": 1, "sample_rate": 0.1, "noise_multiplier": 1.0, "epoch": 3})
