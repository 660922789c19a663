"""DPOptimizer: noise once per logical batch, division by E[B], accumulation, empty batches,
fault flags, secure noise. A naive per-sample engine stands in for the real one here so that
these tests check the optimizer alone; test_train.py runs the real engine end to end."""

import math

import pytest
import torch
from torch import nn

from dpbench.errors import UserError
from dpbench.training.optimizer import DPOptimizer, LogicalBatching, secure_gaussian


class NaiveEngine:
    """Reference engine: a loop over samples, flat abadi clipping (the engine contract)."""

    def __init__(self, model, max_grad_norm=1.0, sensitivity=None):
        self.model = model
        self.max_grad_norm = max_grad_norm
        self.thresholds = {"all": max_grad_norm}
        self._sensitivity = sensitivity

    @property
    def sensitivity(self):
        return self._sensitivity if self._sensitivity is not None else self.max_grad_norm

    def trainable_parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def backward(self, losses):
        params = self.trainable_parameters()
        norms = []
        for i in range(losses.shape[0]):
            grads = torch.autograd.grad(losses[i], params, retain_graph=i < losses.shape[0] - 1)
            norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
            factor = torch.clamp(self.max_grad_norm / (norm + 1e-12), max=1.0)
            for p, g in zip(params, grads):
                p.grad = g * factor if p.grad is None else p.grad + g * factor
            norms.append(norm)
        return {"all": torch.stack(norms)}

    def remove(self):
        pass


def make(sigma=1.0, expected=8.0, seed=0, lr=0.1, momentum=0.0, sensitivity=None, model=None, **kw):
    torch.manual_seed(0)
    model = model or nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    engine = NaiveEngine(model, max_grad_norm=0.5, sensitivity=sensitivity)
    inner = torch.optim.SGD(engine.trainable_parameters(), lr=lr, momentum=momentum)
    return model, engine, DPOptimizer(inner, engine, sigma, expected, seed=seed, **kw)


def data(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def losses(model, x, y):
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


def run_logical(model, opt, x, y, chunk):
    opt.zero_grad()
    for s in range(0, len(x), chunk):
        opt.backward(losses(model, x[s:s + chunk], y[s:s + chunk]))
    opt.add_noise()


@pytest.mark.parametrize("sensitivity", [None, 2.5])
def test_noise_std_matches_sigma_times_total_sensitivity(sensitivity):
    model = nn.Linear(300, 100)  # 30,100 coordinates
    engine = NaiveEngine(model, max_grad_norm=0.7, sensitivity=sensitivity)
    sigma, expected = 1.3, 10.0
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), engine, sigma, expected, seed=3)
    opt.zero_grad()  # no data: the gradient is pure noise / E[B]
    opt.add_noise()
    noise = torch.cat([p.grad.flatten() for p in model.parameters()]) * expected
    target = sigma * engine.sensitivity
    assert abs(noise.std().item() / target - 1) < 0.03
    assert abs(noise.mean().item()) < 4 * target / math.sqrt(noise.numel())


def test_division_by_expected_batch_size_without_noise():
    model, engine, opt = make(sigma=0.0, expected=37.0)
    x, y = data()
    opt.zero_grad()
    engine.backward(losses(model, x, y))
    clipped_sum = grads(model)
    opt.zero_grad()
    opt.backward(losses(model, x, y))
    opt.add_noise()
    for g, s in zip(grads(model), clipped_sum):
        torch.testing.assert_close(g, s / 37.0)


def test_noise_added_once_per_logical_batch_regardless_of_chunks():
    x, y = data(16)
    results = {}
    for chunk in (16, 4, 1):
        model, _, opt = make(sigma=2.0, seed=5)
        run_logical(model, opt, x, y, chunk)
        results[chunk] = grads(model)
    model, _, opt = make(sigma=0.0)
    run_logical(model, opt, x, y, 16)
    clean = grads(model)
    model, _, opt = make(sigma=2.0, seed=5)
    opt.zero_grad()
    opt.add_noise()  # the noise alone, same seed
    noise = grads(model)
    for chunk in (4, 1):
        for a, b in zip(results[chunk], results[16]):
            torch.testing.assert_close(a, b)
    for r, c, z in zip(results[16], clean, noise):
        torch.testing.assert_close(r, c + z)  # exactly one noise draw on top of the clean sum


def test_accumulation_equals_one_big_batch():
    """A 32-example logical batch from 8-example chunks gives the same update (noise off)."""
    x, y = data(32, seed=4)
    finals = []
    for chunk in (32, 8):
        model, _, opt = make(sigma=0.0, expected=32.0, momentum=0.9)
        for _ in range(2):
            opt.zero_grad()
            for s in range(0, 32, chunk):
                opt.backward(losses(model, x[s:s + chunk], y[s:s + chunk]))
            opt.step()
        finals.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*finals):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_empty_batch_still_steps_and_counts():
    model, _, opt = make(sigma=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    opt.step()
    assert opt.steps_taken == 1
    assert all(p.grad is not None for p in model.parameters())
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    opt.zero_grad()
    opt.step()
    assert opt.steps_taken == 2


def test_seeded_noise_is_reproducible_and_seed_dependent():
    outs = []
    for seed in (1, 1, 2):
        model, _, opt = make(sigma=1.0, seed=seed)
        opt.zero_grad()
        opt.add_noise()
        outs.append(grads(model)[0])
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_secure_gaussian_statistics():
    z = secure_gaussian((200_000,), dtype=torch.float64)
    assert z.dtype == torch.float64 and torch.isfinite(z).all()
    assert abs(z.mean().item()) < 0.012 and abs(z.std().item() - 1) < 0.01
    # Gaussian tails: P(|z| > 2) = 0.0455
    assert abs((z.abs() > 2).double().mean().item() - 0.0455) < 0.003
    assert secure_gaussian((3, 4), chunk=5).shape == (3, 4)  # odd chunks stitched together


def test_secure_rng_optimizer():
    model = nn.Linear(200, 50)
    engine = NaiveEngine(model, max_grad_norm=1.0)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), engine, 2.0, 4.0, secure_rng=True)
    opt.zero_grad()
    opt.add_noise()
    first = grads(model)
    noise = torch.cat([g.flatten() for g in first]) * 4.0
    assert abs(noise.std().item() / 2.0 - 1) < 0.05
    opt.zero_grad()
    opt.add_noise()
    assert not torch.equal(first[0], grads(model)[0])  # fresh randomness each step
    with pytest.raises(UserError, match="seed"):
        DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), engine, 1.0, 4.0, secure_rng=True, seed=1)


@pytest.mark.parametrize("fault", [dict(fault_no_noise=True), dict(fault_step_every_physical=True),
                                   dict(fault_sample_rate=0.01)])
def test_fault_flags_refused_without_audit(fault):
    with pytest.raises(UserError, match="audit=True"):
        make(**fault)
    make(audit=True, **fault)  # accepted in an audit


def test_fault_no_noise_removes_noise():
    x, y = data()
    model, _, opt = make(sigma=5.0, audit=True, fault_no_noise=True)
    run_logical(model, opt, x, y, 16)
    faulty = grads(model)
    model, _, opt = make(sigma=0.0)
    run_logical(model, opt, x, y, 16)
    for a, b in zip(faulty, grads(model)):
        torch.testing.assert_close(a, b)


def test_fault_step_every_physical_steps_per_chunk_but_noises_once():
    x, y = data(16)
    model, _, opt = make(sigma=0.0, audit=True, fault_step_every_physical=True)
    calls = []
    inner_step = opt.optimizer.step
    opt.optimizer.step = lambda *a, **k: (calls.append(1), inner_step(*a, **k))
    noise_calls = []
    add_noise = opt.add_noise
    opt.add_noise = lambda: (noise_calls.append(1), add_noise())
    opt.zero_grad()
    for s in range(0, 16, 4):
        opt.backward(losses(model, x[s:s + 4], y[s:s + 4]))
    opt.step()
    assert len(calls) == 5 and opt.physical_steps == 4 and len(noise_calls) == 1
    assert opt.steps_taken == 1
    # the released parameters differ from one correct step: the fault is observable
    ref, _, ropt = make(sigma=0.0)
    ropt.zero_grad()
    ropt.backward(losses(ref, x, y))
    ropt.step()
    assert not torch.allclose(model[0].weight, ref[0].weight)


def test_fault_sample_rate_is_exposed():
    _, _, opt = make(audit=True, fault_sample_rate=0.01)
    assert opt.stated_sample_rate_fault == 0.01
    assert "FAULTS" in repr(opt)


def test_bad_input():
    with pytest.raises(UserError, match="noise_multiplier"):
        make(sigma=-0.1)
    with pytest.raises(UserError, match="expected_batch_size"):
        make(expected=0)
    model = nn.Linear(3, 2)
    other = nn.Linear(3, 2)
    with pytest.raises(UserError, match="differ"):
        DPOptimizer(torch.optim.SGD(other.parameters(), lr=0.1), NaiveEngine(model), 1.0, 4.0)
    with pytest.raises(UserError, match="differ"):  # an optimizer missing a trainable parameter
        DPOptimizer(torch.optim.SGD([model.weight], lr=0.1), NaiveEngine(model), 1.0, 4.0)
    with pytest.raises(UserError, match="smaller than the physical"):
        LogicalBatching(64, 256)
    LogicalBatching(4096, 256)
    _, _, opt = make()
    with pytest.raises(UserError, match="closure"):
        opt.step(lambda: 0.0)


# --------------------------------------------------------------------------- the paused engine


def _real(seed=0):
    from dpbench.clipping import ClippingEngine

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    engine = ClippingEngine(model, max_grad_norm=0.5)
    opt = DPOptimizer(torch.optim.SGD(engine.trainable_parameters(), lr=0.1), engine, 0.0, 8.0, seed=0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)
    return model, engine, opt, x, y


def _losses(model, x, y):
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def test_paused_pass_records_nothing_and_leaves_no_engine_state():
    model, engine, opt, x, y = _real()
    handles = len(engine._handles)
    opt.zero_grad()
    opt.backward(_losses(model, x, y))
    reference = [p.grad.clone() for p in model.parameters()]
    opt.zero_grad()
    with engine.paused():
        assert engine._handles == []
        grads = torch.autograd.grad(_losses(model, x, y).mean(), list(model.parameters()))
        assert all(not l.uses for l in engine._layers)  # no activation kept
    assert len(engine._handles) == handles
    assert all(not l.uses and l.stash is None and l.pending is None for l in engine._layers)
    assert all(p.grad is None for p in model.parameters())  # autograd.grad writes no .grad
    # the public gradient is the plain mean gradient, and the next private pass is unaffected
    ref_mean = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    for a, b in zip(grads, ref_mean):
        torch.testing.assert_close(a, b)
    opt.backward(_losses(model, x, y))
    for p, r in zip(model.parameters(), reference):
        torch.testing.assert_close(p.grad, r)


def test_raw_gradients_written_while_paused_are_refused_until_cleared_or_consumed():
    model, engine, opt, x, y = _real()
    with engine.paused():
        _losses(model, x, y).mean().backward()  # raw, unclipped .grad
    with pytest.raises(UserError, match="paused"):
        opt.backward(_losses(model, x, y))
    with pytest.raises(UserError, match="paused"):
        opt.step()  # the empty-batch path too: noise must not be added to raw gradients
    assert opt.steps_taken == 0
    opt.zero_grad()  # cleared: fine again
    opt.backward(_losses(model, x, y))
    opt.step()
    assert opt.steps_taken == 1
    # consumed by a public step: fine again, and not counted as a private step
    with engine.paused():
        _losses(model, x, y).mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.public_step()
    assert opt.public_steps == 1 and opt.steps_taken == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    opt.backward(_losses(model, x, y))
    opt.step()
    assert opt.steps_taken == 2


def test_raw_gradients_added_to_a_partial_private_sum_are_refused():
    model, engine, opt, x, y = _real()
    opt.zero_grad()
    opt.backward(_losses(model, x[:4], y[:4]))  # clipped sum of the first chunk
    with engine.paused():
        _losses(model, x, y).sum().backward()  # accumulates raw gradients on top
    with pytest.raises(UserError, match="raw gradients"):
        opt.backward(_losses(model, x[4:], y[4:]))
    with pytest.raises(UserError, match="raw gradients"):
        opt.step()
    opt.zero_grad()
    opt.backward(_losses(model, x, y))
    opt.step()
    assert opt.steps_taken == 1


def test_gradients_zeroed_in_place_count_as_cleared():
    model, engine, opt, x, y = _real()
    with engine.paused():
        _losses(model, x, y).mean().backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None for p in model.parameters())
    opt.backward(_losses(model, x, y))
    opt.step()
    assert opt.steps_taken == 1


def test_pausing_with_a_recorded_forward_is_refused_and_nesting_is_harmless():
    model, engine, opt, x, y = _real()
    losses = _losses(model, x, y)
    with pytest.raises(UserError, match="not backpropagated"):
        with engine.paused():
            pass
    opt.backward(losses)
    with engine.paused():
        with engine.paused():
            torch.autograd.grad(_losses(model, x, y).sum(), list(model.parameters()))
        assert engine._handles == []
    assert engine._handles
