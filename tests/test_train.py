"""The shared training loop, end to end with the real clipping engine and accountant."""

import math

import pytest
import torch
from torch import nn

from dpbench.privacy import accounting
from dpbench.errors import UserError
from dpbench.training.loop import TrainResult, evaluate, fit


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


def test_private_training_learns_and_matches_the_ledger():
    res = fit(mlp(), TRAIN, test_data=TEST, steps=60, sample_rate=0.1, noise_multiplier=0.8, max_grad_norm=1.0,
              lr=0.5, delta=1e-5, seed=0, progress=False)
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
    res = fit(mlp(), TRAIN, epochs=2, expected_batch_size=60, target_epsilon=2.0, max_grad_norm=1.0,
              lr=0.5, progress=False)
    assert res.steps == 20
    assert res.noise_multiplier > 0
    assert res.epsilon <= 2.0 and res.epsilon == pytest.approx(2.0, rel=0.02)


def test_nonprivate_path():
    res = fit(mlp(), TRAIN, test_data=TEST, epochs=3, expected_batch_size=60, private=False, lr=0.5,
              progress=False)
    assert res.final["test_acc"] > 0.9
    assert math.isinf(res.epsilon) and res.ledger is None and res.engine is None
    assert isinstance(res.optimizer, torch.optim.SGD)


def test_physical_chunks_give_the_same_model_as_one_chunk():
    """Noise once per logical batch: splitting into chunks changes nothing (same seed)."""
    finals = []
    for physical in (None, 7):
        model = mlp(seed=3)
        res = fit(model, TRAIN, steps=5, sample_rate=0.05, noise_multiplier=1.0, max_physical_batch=physical,
                  lr=0.5, seed=4, progress=False, track_epsilon=False)
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        assert res.history[-1]["epsilon"] is None and res.epsilon > 0  # final epsilon always computed
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-4, atol=1e-5)


def test_empty_batches_are_steps_too():
    sizes = []
    res = fit(mlp(), TRAIN, steps=40, sample_rate=0.002, noise_multiplier=1.0, lr=0.1, progress=False,
              callbacks=[lambda info: sizes.append(info.batch_size)])
    assert 0 in sizes  # with E[B] = 1.2 about 30% of the batches are empty
    assert len(sizes) == 40 == res.ledger.steps == res.optimizer.steps_taken


def test_callbacks_see_per_sample_norms_of_the_logical_batch():
    seen = []

    def cb(info):
        seen.append((info.step, info.batch_size, {k: v.shape[0] for k, v in info.norms.items()}))

    fit(mlp(), TRAIN, steps=4, sample_rate=0.05, noise_multiplier=1.0, max_physical_batch=10, lr=0.1,
        clip_style="layer", progress=False, callbacks=[cb])
    assert [s for s, _, _ in seen] == [1, 2, 3, 4]
    for _, b, norms in seen:
        assert len(norms) == 2  # one group per trainable layer
        assert all(count == b for count in norms.values())


def test_shuffle_needs_approximate_and_is_recorded():
    with pytest.raises(UserError, match="approximate=True"):
        fit(mlp(), TRAIN, epochs=1, expected_batch_size=60, noise_multiplier=1.0, sampling="shuffle",
            progress=False)
    res = fit(mlp(), TRAIN, epochs=1, expected_batch_size=60, noise_multiplier=1.0, sampling="shuffle",
              approximate=True, progress=False)
    assert res.approximate and res.ledger.approximate
    assert "Poisson" in res.ledger.to_dict()["approximate_reason"]
    assert res.steps == 10 == res.ledger.steps
    # without DP there is no accounting to invalidate: shuffling needs no flag
    res = fit(mlp(), TRAIN, epochs=1, expected_batch_size=60, private=False, sampling="shuffle", progress=False)
    assert res.steps == 10 and not res.approximate


def test_existing_ledger_keeps_composing():
    ledger = accounting.PrivacyLedger(delta=1e-5, n=600)
    fit(mlp(), TRAIN, steps=5, sample_rate=0.1, noise_multiplier=1.0, ledger=ledger, progress=False)
    res = fit(mlp(), TRAIN, steps=5, sample_rate=0.1, noise_multiplier=1.0, ledger=ledger, progress=False)
    assert ledger.steps == 10
    assert res.epsilon == pytest.approx(accounting.epsilon(1.0, 0.1, 10, delta=1e-5), rel=1e-6)


def test_fault_sample_rate_is_what_the_ledger_records():
    with pytest.raises(UserError, match="audit=True"):
        fit(mlp(), TRAIN, steps=3, sample_rate=0.1, noise_multiplier=1.0, faults={"fault_sample_rate": 0.01},
            progress=False)
    res = fit(mlp(), TRAIN, steps=3, sample_rate=0.1, noise_multiplier=1.0, faults={"fault_sample_rate": 0.01},
              audit=True, progress=False)
    assert res.ledger.events[0]["sample_rate"] == 0.01
    assert res.epsilon < accounting.epsilon(1.0, 0.1, 3, delta=1e-5)


def test_recorder_rows(tmp_path):
    from dpbench.workbench.results import Recorder

    rec = Recorder(tmp_path, experiment="t")
    fit(mlp(), TRAIN, test_data=TEST, steps=10, sample_rate=0.1, noise_multiplier=1.0, progress=False,
        recorder=rec, method="dp-sgd")
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


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=5, sample_rate=0.1, noise_multiplier=1.0, max_physical_batch=100), "smaller than the physical"),
    (dict(steps=5, sample_rate=0.1, noise_multiplier=1.0, delta=0.01), "1/n"),
    (dict(steps=5, epochs=1, sample_rate=0.1, noise_multiplier=1.0), "exactly one of epochs"),
    (dict(steps=5, sample_rate=0.1), "noise_multiplier and target_epsilon"),
    (dict(steps=5, sample_rate=0.1, noise_multiplier=-1.0), "noise_multiplier"),
    (dict(steps=5, sample_rate=0.1, expected_batch_size=60, noise_multiplier=1.0), "exactly one of sample_rate"),
    (dict(steps=5, sample_rate=0.1, noise_multiplier=1.0, gradient_noise_multiplier=0.5), "understate"),
    (dict(steps=5, sample_rate=0.1, noise_multiplier=1.0, sampling="random"), "sampling"),
    (dict(steps=5, sample_rate=0.1, noise_multiplier=1.0, optimizer="lbfgs"), "optimizer"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(UserError, match=match):
        fit(mlp(), TRAIN, progress=False, **kwargs)


def test_missing_gpu_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(UserError, match="CUDA"):
        fit(mlp(), TRAIN, steps=1, sample_rate=0.1, noise_multiplier=1.0, device="cuda", progress=False)
