"""Second-order diagnostics: HVP, Hutchinson trace, per-sample statistics, improvement formula."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dpbench.training import diagnostics as D
from dpbench.errors import UserError


class Quadratic(nn.Module):
    """Model whose 'loss' is 0.5 w'Aw + b'w per example: Hessian A exactly."""

    def __init__(self, A, b):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(A.shape[0], dtype=A.dtype))
        self.register_buffer("A", A)
        self.register_buffer("b", b)

    def forward(self, x):  # x only sets the batch size; per-sample loss returned as "logits"
        val = 0.5 * self.w @ self.A @ self.w + self.b @ self.w
        return val.expand(x.shape[0]) + 0.0 * x.sum(dim=1)


def quad_loss(out, y):
    return out


def test_hutchinson_trace_matches_exact_trace_on_quadratic():
    torch.manual_seed(0)
    d = 30
    M = torch.randn(d, d, dtype=torch.float64)
    A = M @ M.T / d + torch.diag(torch.linspace(0.5, 3.0, d, dtype=torch.float64))
    model = Quadratic(A, torch.zeros(d, dtype=torch.float64))
    x = torch.zeros(4, 1, dtype=torch.float64)
    op = D.HessianOperator(model, x, torch.zeros(4), quad_loss)
    k = 400
    est, se = D.hutchinson_trace(op.hvp, op.dim, n_probes=k, seed=3, dtype=torch.float64)
    exact = float(torch.trace(A))
    # Rademacher variance per probe: 2 * sum_{i != j} A_ij^2.
    off = A - torch.diag(torch.diag(A))
    sd_theory = math.sqrt(2 * float((off ** 2).sum()) / k)
    assert abs(est - exact) < 4 * sd_theory
    assert se == pytest.approx(sd_theory, rel=0.3)
    # a diagonal Hessian is recovered exactly by every Rademacher probe
    diag = Quadratic(torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64)), torch.zeros(5, dtype=torch.float64))
    op2 = D.HessianOperator(diag, x, torch.zeros(4), quad_loss)
    est2, se2 = D.hutchinson_trace(op2.hvp, op2.dim, n_probes=3, dtype=torch.float64)
    assert est2 == pytest.approx(15.0) and se2 == pytest.approx(0.0, abs=1e-12)


def test_hvp_matches_explicit_hessian_on_tiny_model():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(7, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (7,))
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(flat):
        params, pos = {}, 0
        for n, s in zip(names, shapes):
            k = int(np.prod(s))
            params[n] = flat[pos:pos + k].view(s)
            pos += k
        out = torch.func.functional_call(model, params, (x,))
        return F.cross_entropy(out, y)

    H = torch.autograd.functional.hessian(loss_of, flat0)
    op = D.HessianOperator(model, x, y)
    v = torch.randn(flat0.numel(), dtype=torch.float64)
    assert torch.allclose(op.hvp(v), H @ v, atol=1e-10)
    assert op.quadratic(v) == pytest.approx(float(v @ H @ v), rel=1e-9)


def test_per_sample_gradients_match_loop_and_stats_are_consistent():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    x = torch.randn(12, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    ps = D.per_sample_gradients(model, x, y, chunk=5)
    for i in (0, 7, 11):
        g = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), list(model.parameters()))
        assert torch.allclose(ps[i], torch.cat([t.reshape(-1) for t in g]), atol=1e-12)
    st = D.curvature_stats(model, x, y, n_probes=4, n_var_samples=12, seed=0)
    # without clipping Ghat = G = mean of per-sample gradients
    G = ps.mean(0)
    assert st.gtg == pytest.approx(float(G @ G), rel=1e-9)
    assert st.g_dot == pytest.approx(st.gtg, rel=1e-9)
    assert st.tr_sigma == pytest.approx(float(torch.cov(ps.T).trace()), rel=1e-9)
    # tr(H Sigma) over all 12 samples equals the trace of H times the unbiased covariance
    op = D.HessianOperator(model, x, y)
    H = torch.stack([op.hvp(e) for e in torch.eye(op.dim, dtype=torch.float64)])
    assert st.tr_h_sigma == pytest.approx(float(torch.trace(H @ torch.cov(ps.T))), rel=1e-8)
    # automatic clipping: per-sample norms C ||g|| / (||g|| + gamma) < C, so Ghat shrinks
    stc = D.curvature_stats(model, x, y, clip_fn="automatic", max_grad_norm=1.0, gamma=0.01, n_probes=2)
    clipped = ps * (1.0 / (ps.norm(dim=1) + 0.01))[:, None]
    assert stc.g_dot == pytest.approx(float(G @ clipped.mean(0)), rel=1e-9)
    assert stc.gtg == pytest.approx(st.gtg, rel=1e-9)
    assert model.training  # restored


def test_improvement_formula_hand_case():
    # G'G = 2, G'HG = 1, tr(H Sigma) = 4, tr(H) = 8, sigma = 1, C = 1
    # B = 2: denom = 1 + 4/2 + 8/4 = 5 -> improvement 4 / 10 = 0.4, per sample 0.2, lr* = 2/5
    imp = D.predicted_improvement(2.0, 1.0, 4.0, 8.0, [2.0, 4.0], noise_multiplier=1.0)
    assert imp[0] == pytest.approx(0.4)
    assert imp[1] == pytest.approx(4.0 / (2 * (1 + 1 + 0.5)))
    assert D.optimal_learning_rate(2.0, 1.0, 4.0, 8.0, 2.0, 1.0) == pytest.approx(0.4)
    assert D.per_sample_improvement(2.0, 1.0, 4.0, 8.0, 2.0, 1.0) == pytest.approx(0.2)
    # non-DP: no noise term
    assert D.predicted_improvement(2.0, 1.0, 4.0, 8.0, 2.0) == pytest.approx(4.0 / (2 * 3.0))
    terms = D.denominator_terms(1.0, 4.0, 8.0, np.array([1.0, 2.0]), noise_multiplier=np.array([1.0, 2.0]))
    assert terms["noise"].tolist() == pytest.approx([8.0, 8.0])
    assert terms["sampling"].tolist() == pytest.approx([4.0, 2.0])
    # optimum: B* = sigma C sqrt(tr H / G'HG) = sqrt(8); it beats its neighbours on a grid
    bstar = D.optimal_batch_size(1.0, 8.0, 1.0)
    assert bstar == pytest.approx(math.sqrt(8.0))
    grid = np.linspace(0.5, 20, 2000)
    b_grid, _ = D.best_on_grid(D.per_sample_improvement(2.0, 1.0, 4.0, 8.0, grid, 1.0), grid)
    assert b_grid == pytest.approx(bstar, abs=0.02)
    # negative curvature: no optimal learning rate
    assert np.isnan(D.predicted_improvement(1.0, -5.0, 0.0, 0.0, 10.0))
    assert math.isnan(D.optimal_batch_size(-1.0, 8.0, 1.0))
    with pytest.raises(UserError):
        D.denominator_terms(1.0, 1.0, 1.0, [0.0])


def test_clip_fn_errors_and_abadi_clipping():
    # diagnostics clip with dpbench.clipping.clipfns (no copy of its own): an unknown name is
    # refused before any gradient work, and abadi clipping caps every per-sample norm at C
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    with pytest.raises(UserError, match="unknown clip_fn"):
        D.curvature_stats(model, x, y, clip_fn="bogus")
    ps = D.per_sample_gradients(model, x, y)
    C = float(ps.norm(dim=1).median())
    st = D.curvature_stats(model, x, y, clip_fn="abadi", max_grad_norm=C, n_probes=2)
    clipped = ps * torch.clamp(C / ps.norm(dim=1), max=1.0)[:, None]
    assert st.g_dot == pytest.approx(float(ps.mean(0) @ clipped.mean(0)), rel=1e-9)
    with pytest.raises(UserError):
        D.hutchinson_trace(lambda v: v, 3, n_probes=0)
