"""The noise the DP last-layer solvers actually add, not only the sensitivities they report.

Every Gaussian release goes through `symmetric_gaussian_noise` (d x d statistics) or
`_gaussian` (vectors); these tests record the scale of every call and compare it with
noise multiplier x sensitivity, so halving the noise at any call site fails here even where
the reported sensitivities stay right.
"""

import math

import pytest
import torch

from dpbench.training import linear as L

EPS, DELTA, C = 2.0, 1e-5, 1.0


@pytest.fixture
def record(monkeypatch):
    """Record (kind, scale, batch) of every noise draw the solvers make."""
    calls = []
    sym, gauss = L.symmetric_gaussian_noise, L._gaussian

    def sym_rec(d, scale, generator=None, **kw):
        calls.append(("matrix", float(scale), tuple(kw.get("batch", ()))))
        return sym(d, scale, generator, **kw)

    def gauss_rec(shape, std, gen, device):
        calls.append(("vector", float(std), tuple(shape)))
        return gauss(shape, std, gen, device)

    monkeypatch.setattr(L, "symmetric_gaussian_noise", sym_rec)
    monkeypatch.setattr(L, "_gaussian", gauss_rec)
    return calls


def _data(n=300, d=6, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 2.0  # norms above C: clipping matters
    return x, torch.randint(0, k, (n,), generator=g), k


@pytest.mark.parametrize("shared", [False, True])
def test_newton_adds_multiplier_times_sensitivity_at_every_release(record, shared):
    x, y, k = _data()
    steps, bias = 2, -1.0
    L.dp_newton(x, y, k, epsilon=EPS, delta=DELTA, clip_norm=C, steps=steps, bias=bias, hessian_fraction=0.5,
                shared_first_hessian=shared, conversion="pld", seed=3)
    s = L.calibrate_releases(EPS, DELTA, [1.0] * (2 * steps), "pld")[0]
    p0 = 1 / (1 + math.exp(-bias))
    hess, grad = math.sqrt(k) * C**2 / 4, math.sqrt(k) * C
    first = (p0 * (1 - p0) * C**2, (1,)) if shared else (hess, (k,))
    want = [("matrix", s * first[0], first[1]), ("vector", s * grad, (k, x.shape[1])),
            ("matrix", s * hess, (k,)), ("vector", s * grad, (k, x.shape[1]))]
    assert len(record) == len(want)
    for got, exp in zip(record, want):
        assert got[0] == exp[0] and got[2] == exp[2] and got[1] == pytest.approx(exp[1], rel=1e-12)


def test_least_squares_adds_multiplier_times_sensitivity(record):
    x, y, k = _data()
    L.dp_least_squares(x, y, k, epsilon=EPS, delta=DELTA, clip_norm=C, conversion="pld", seed=1)
    s_g, s_a, s_b = L.calibrate_releases(EPS, DELTA, (1.0, 1.0, 1.0), "pld")
    # the Gram, the per-class Grams (an example is in one class: C^2 for all of them) and the class sums (C)
    want = [("matrix", s_g * C**2, ()), ("matrix", s_a * C**2, (k,)), ("vector", s_b * C, (k, x.shape[1]))]
    assert [(c[0], c[2]) for c in record] == [(w[0], w[2]) for w in want]
    assert [c[1] for c in record] == pytest.approx([w[1] for w in want], rel=1e-12)


def test_dp_fc_adds_multiplier_times_sensitivity(record):
    x, y, k = _data()
    steps, grad_clip = 3, 0.5
    L.dp_fc(x, y, k, epsilon=EPS, delta=DELTA, clip_norm=C, grad_clip=grad_clip, steps=steps, conversion="pld", seed=2)
    frac = 1 / (steps + 1)
    sig = L.calibrate_releases(EPS, DELTA, [frac] + [(1 - frac) / steps] * steps, "pld")
    want = [("matrix", sig[0] * C**2)] + [("vector", sig[1] * grad_clip)] * steps
    assert [c[0] for c in record] == [w[0] for w in want]
    assert [c[1] for c in record] == pytest.approx([w[1] for w in want], rel=1e-12)
