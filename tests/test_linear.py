"""DP last-layer solvers: closed forms without noise, calibration, accounting, noise helpers."""

import math

import numpy as np
import pytest
import torch

from dpbench.training import linear as L
from dpbench.errors import UserError


def _data(n=600, d=8, classes=3, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, d, generator=g) * 1.5
    y = torch.randint(0, classes, (n,), generator=g)
    x = (means[y] + torch.randn(n, d, generator=g)) * scale
    return x.double(), y


# ----------------------------------------------------------------------- noise helpers


def test_symmetric_noise_is_symmetric_with_stated_scales():
    g = torch.Generator().manual_seed(1)
    z = L.symmetric_gaussian_noise(40, 2.0, g, batch=(50,))
    assert z.shape == (50, 40, 40)
    assert torch.equal(z, z.transpose(-1, -2))
    diag = torch.diagonal(z, dim1=-2, dim2=-1)
    off = z[:, torch.triu_indices(40, 40, 1)[0], torch.triu_indices(40, 40, 1)[1]]
    assert abs(float(diag.std()) - 2.0) < 0.1
    assert abs(float(off.std()) - 2.0 / math.sqrt(2)) < 0.05


def test_symmetric_noise_is_seeded():
    a = L.symmetric_gaussian_noise(5, 1.0, torch.Generator().manual_seed(3))
    b = L.symmetric_gaussian_noise(5, 1.0, torch.Generator().manual_seed(3))
    c = L.symmetric_gaussian_noise(5, 1.0, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_project_psd_yields_psd_and_keeps_psd_matrices():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 20, 20, generator=g, dtype=torch.float64)
    m = m + m.transpose(-1, -2)
    assert float(torch.linalg.eigvalsh(m).min()) < -1  # really indefinite
    p = L.project_psd(m)
    assert torch.allclose(p, p.transpose(-1, -2))
    assert float(torch.linalg.eigvalsh(p).min()) > -1e-10
    a = torch.randn(20, 5, generator=g, dtype=torch.float64)
    psd = a @ a.T
    assert torch.allclose(L.project_psd(psd), psd, atol=1e-10)
    # nearest PSD matrix: positive part of the spectrum is kept, negative part dropped
    evals = torch.linalg.eigvalsh(m[0])
    assert math.isclose(float(torch.linalg.eigvalsh(p[0]).sum()), float(evals.clamp_min(0).sum()), rel_tol=1e-9)


def test_project_psd_in_float32_at_large_d_matches_float64():
    g = torch.Generator().manual_seed(1)
    d = L.PSD_FLOAT32_DIM
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    m = 1e3 * (a @ a.T) / d + torch.randn(2, d, d, generator=g, dtype=torch.float64) * 30  # big PSD part + noise
    sym = (m + m.transpose(-1, -2)) / 2
    evals, evecs = torch.linalg.eigh(sym)
    ref = (evecs * evals.clamp_min(0).unsqueeze(-2)) @ evecs.transpose(-1, -2)
    out = L.project_psd(m)
    assert out.dtype == torch.float64 and torch.allclose(out, out.transpose(-1, -2))
    # error far below the noise (std 30) and the clamped spectrum (hundreds)
    assert float((out - ref).abs().max()) < 1e-2 * 30
    assert float(torch.linalg.eigvalsh(out).min()) > -1e-3


def test_clip_features_remembers_a_clipped_tensor_until_it_changes():
    x = torch.tensor([[0.6, 0.8], [0.3, 0.4]])
    assert L.clip_features(x, 1.0) is x  # inside: checked once, remembered
    x[1, 0] = 3.0  # an in-place write bumps the version counter: checked again, and clipped
    out = L.clip_features(x, 1.0)
    assert out is not x and float(out.norm(dim=1).max()) <= 1.0 + 1e-6
    v = x[0:1]
    assert L.clip_features(v, 1.0) is v
    x[0, 0] = 5.0  # a write through the base tensor also changes the view's version
    assert float(L.clip_features(v, 1.0).norm(dim=1).max()) <= 1.0 + 1e-6
    y = torch.tensor([[0.6, 0.8]])
    assert L.clip_features(y, 1.0) is y
    assert float(L.clip_features(y, 0.5).norm(dim=1).max()) <= 0.5 + 1e-6  # a smaller norm is checked anew


def test_batched_eigh_on_threads_gives_the_bits_of_one_call():
    g = torch.Generator().manual_seed(2)
    m = torch.randn(5, 40, 40, generator=g)
    m = m + m.transpose(-1, -2)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        evals, evecs = L._batched_eigh(m)  # split across 2 Python threads, one torch thread each
        assert torch.get_num_threads() == 2  # restored
        torch.set_num_threads(1)
        refs = [torch.linalg.eigh(m[i]) for i in range(5)]
    finally:
        torch.set_num_threads(old)
    for i, (ref_vals, ref_vecs) in enumerate(refs):
        assert torch.equal(evals[i], ref_vals) and torch.equal(evecs[i], ref_vecs)


def test_clip_features():
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    c = L.clip_features(x, 1.0)
    assert torch.allclose(c.norm(dim=1), torch.tensor([1.0, 0.5, 0.0]))
    assert torch.allclose(c[0], torch.tensor([0.6, 0.8]))
    with pytest.raises(UserError):
        L.clip_features(x, 0.0)


def test_conjugate_gradient_matches_solve():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 30, generator=g, dtype=torch.float64)
    a = a @ a.T + 0.5 * torch.eye(30, dtype=torch.float64)
    b = torch.randn(30, 4, generator=g, dtype=torch.float64)
    x = L.conjugate_gradient(lambda v: a @ v, b, tol=1e-12)
    assert torch.allclose(x, torch.linalg.solve(a, b), atol=1e-8)


# --------------------------------------------------------------- classic conversion values


@pytest.mark.parametrize("eps,ref", [(0.1, 83.3), (1.0, 8.5), (8.0, 1.20)])
def test_dp_ls_classic_noise_matches_paper(eps, ref):
    x, y = _data(n=200)
    res = L.dp_least_squares(x, y, 3, epsilon=eps, delta=1e-5, conversion="classic")
    sig = res.noise_multipliers
    assert sig["gram"] == sig["class_gram"] == sig["class_sum"]
    assert abs(sig["gram"] - ref) / ref < 0.02


@pytest.mark.parametrize("eps,ref", [(0.1, 159.5), (1.0, 16.3), (8.0, 2.29)])
def test_dp_fc_classic_noise_matches_paper(eps, ref):
    x, y = _data(n=200)
    res = L.dp_fc(x, y, 3, epsilon=eps, delta=1e-5, steps=10, conversion="classic")
    assert math.isclose(res.noise_multipliers["covariance"], res.noise_multipliers["gradient"], rel_tol=1e-9)
    assert abs(res.noise_multipliers["gradient"] - ref) / ref < 0.02


def test_dp_accounting_needs_less_noise_than_classic():
    cl = L.calibrate_releases(1.0, 1e-5, [1, 1, 1], "classic")[0]
    for conv in ("rdp", "pld"):
        assert L.calibrate_releases(1.0, 1e-5, [1, 1, 1], conv)[0] < cl


# ------------------------------------------------------------------- noise off = closed form


def test_least_squares_noise_off_matches_weighted_lstsq():
    x, y = _data()
    alpha, lam = 2.0, 0.5
    res = L.dp_least_squares(x, y, 3, epsilon=None, alpha=alpha, lam=lam, clip_norm=1e9, dtype=torch.float64)
    assert res.epsilon == math.inf and not res.private
    d = x.shape[1]
    for cls in range(3):
        # sum_{i in l}(t'x_i - 1)^2 + alpha sum_i (t'x_i)^2 + lam |t|^2 as one stacked lstsq
        a = torch.cat([x[y == cls], math.sqrt(alpha) * x, math.sqrt(lam) * torch.eye(d, dtype=x.dtype)])
        b = torch.cat([torch.ones(int((y == cls).sum()), dtype=x.dtype), torch.zeros(len(x) + d, dtype=x.dtype)])
        ref = torch.linalg.lstsq(a, b.unsqueeze(1)).solution.squeeze(1)
        assert torch.allclose(res.weights[cls], ref, atol=1e-8)


def test_least_squares_clips_features():
    x, y = _data(scale=10.0)
    big = L.dp_least_squares(x, y, 3, epsilon=None, clip_norm=1e9, dtype=torch.float64)
    clipped = L.dp_least_squares(x, y, 3, epsilon=None, clip_norm=1.0, dtype=torch.float64)
    ref = L.dp_least_squares(L.clip_features(x, 1.0), y, 3, epsilon=None, clip_norm=1e9, dtype=torch.float64)
    assert torch.allclose(clipped.weights, ref.weights) and not torch.allclose(big.weights, ref.weights)


def _ova_objective_grad(x, y, w, bias, lam, classes):
    w = w.clone().requires_grad_(True)
    yy = torch.nn.functional.one_hot(y, classes).to(x.dtype)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w.T + bias, yy, reduction="sum")
    (loss + lam / 2 * (w**2).sum()).backward()
    return w.grad


def test_newton_noise_off_reaches_regularised_logistic_optimum():
    x, y = _data()
    x = L.clip_features(x, 1.0)
    res = L.dp_newton(x, y, 3, epsilon=None, steps=12, lam=0.5, dtype=torch.float64)
    grad = _ova_objective_grad(x, y, res.weights, 0.0, 0.5, 3)
    assert float(grad.norm()) < 1e-8
    # and it is a real optimum, not the start: the data are learnable
    assert res.accuracy(x, y) > 0.8


def _fc_reference(x, y, classes, steps, lr, lam, bias, grad_clip):
    """Plain numpy DP-FC iteration without noise: explicit per-example clipping, direct solve."""
    x, y = x.numpy(), y.numpy()
    yy = np.eye(classes)[y]
    f = x.T @ x + lam * np.eye(x.shape[1])
    w = np.zeros((classes, x.shape[1]))
    for _ in range(steps):
        g = np.zeros_like(w)
        for i in range(len(x)):
            p = 1 / (1 + np.exp(-(w @ x[i] + bias)))
            gi = np.outer(p - yy[i], x[i])
            g += gi * min(1.0, grad_clip / max(np.linalg.norm(gi), 1e-30))
        w = w - lr * np.linalg.solve(f, g.T).T
    return w


def test_dp_fc_noise_off_matches_reference_iteration():
    x, y = _data(n=300)
    x = L.clip_features(x, 1.0)
    res = L.dp_fc(x, y, 3, epsilon=None, steps=4, lr=0.2, lam=5.0, bias=-2.0, grad_clip=0.5, dtype=torch.float64)
    ref = _fc_reference(x, y, 3, 4, 0.2, 5.0, -2.0, 0.5)
    assert np.allclose(res.weights.numpy(), ref, atol=1e-7)
    assert torch.equal(res.bias, torch.full((3,), -2.0, dtype=torch.float64))


def test_dp_sgd_noise_off_matches_plain_gradient_descent():
    x, y = _data(n=200)
    res = L.dp_sgd_logistic(x, y, 3, epsilon=None, steps=5, lr=0.5, batch_size=None)
    xc = L.clip_features(x.float(), 1.0)
    head = torch.nn.Linear(x.shape[1], 3)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(xc), y).backward()
        opt.step()
    assert torch.allclose(res.weights, head.weight.detach(), atol=1e-6)
    assert torch.allclose(res.bias, head.bias.detach(), atol=1e-6)


def test_dp_sgd_huge_clip_tiny_noise_is_close_to_gradient_descent():
    x, y = _data(n=200)
    exact = L.dp_sgd_logistic(x, y, 3, epsilon=None, steps=5, lr=0.5)
    # classic conversion at a huge epsilon: closed-form calibration, sigma ~ 0.1
    dp = L.dp_sgd_logistic(x, y, 3, epsilon=200.0, delta=1e-3, steps=5, lr=0.5, grad_clip=10.0,
                           conversion="classic")
    assert dp.noise_multipliers["gradient"] < 0.2
    # clipping is inactive (per-example norms <= 2 < 10); noise std per step sigma * 10 / 200
    assert torch.allclose(dp.weights, exact.weights, atol=0.05)
    assert not torch.equal(dp.weights, exact.weights)


def test_zero_and_random_init_differ():
    x, y = _data(n=200)
    z = L.dp_sgd_logistic(x, y, 3, epsilon=None, steps=1, lr=0.0, init="zero")
    r = L.dp_sgd_logistic(x, y, 3, epsilon=None, steps=1, lr=0.0, init="random", seed=3)
    assert float(z.weights.abs().sum()) == 0.0 and float(r.weights.abs().sum()) > 0


# ------------------------------------------------------------------------------ accounting


CLOSED_FORM_CASES = [
    ("least_squares", {}, 0.1),
    ("least_squares", {}, 2.0),
    ("newton", {"steps": 3}, 0.5),
    ("dp_fc", {"steps": 4}, 1.0),
    ("dp_fc", {"steps": 4, "cov_fraction": 0.5}, 3.0),
]


@pytest.mark.parametrize("conversion", ["pld", "rdp", "classic"])
@pytest.mark.parametrize("method,kw,eps", CLOSED_FORM_CASES)
def test_accounted_epsilon_equals_target(method, kw, eps, conversion):
    x, y = _data(n=300)
    res = L.solve(method, x, y, 3, epsilon=eps, conversion=conversion, **kw)
    assert res.conversion == conversion
    assert res.epsilon <= eps * 1.002 and res.epsilon >= eps * 0.99, (res.epsilon, eps)
    # the conversions agree on the ordering classic >= rdp >= pld for the same releases
    e = res.epsilons
    assert e["classic"] >= e["rdp"] * 0.999 and e["rdp"] >= e["pld"] * 0.999
    if conversion != "classic":
        assert math.isclose(res.ledger.epsilon(), res.epsilon, rel_tol=2e-3)
        n_rel = sum(ev["count"] for ev in res.ledger.to_dict()["events"])
        assert n_rel == res.info["releases"]


@pytest.mark.parametrize("batch_size", [None, 50])
def test_dp_sgd_accounted_epsilon_equals_target(batch_size):
    x, y = _data(n=300)
    res = L.dp_sgd_logistic(x, y, 3, epsilon=1.0, steps=6, batch_size=batch_size, conversion="rdp")
    assert 0.99 <= res.epsilon <= 1.0 + 1e-6
    assert res.ledger.steps == 6
    assert res.info["sample_rate"] == (1.0 if batch_size is None else 50 / 300)


def test_dp_sgd_classic_needs_full_batch():
    x, y = _data(n=300)
    with pytest.raises(UserError, match="full batch"):
        L.dp_sgd_logistic(x, y, 3, epsilon=1.0, steps=3, batch_size=50, conversion="classic")
    res = L.dp_sgd_logistic(x, y, 3, epsilon=1.0, steps=3, conversion="classic")
    assert abs(res.epsilon - 1.0) < 1e-6
    assert math.isclose(res.noise_multipliers["gradient"], L.calibrate_releases(1.0, 1e-5, [1] * 3, "classic")[0])


def test_newton_noise_uses_joint_sensitivity():
    x, y = _data(n=300, classes=4)
    res = L.dp_newton(x, y, 4, epsilon=1.0, steps=2, clip_norm=2.0, conversion="classic")
    assert res.noise_multipliers["hessian"] == res.noise_multipliers["gradient"]
    assert "hessian_first" not in res.noise_multipliers  # the authors' L releases at the first step too
    assert math.isclose(res.sensitivities["hessian"], math.sqrt(4) * 4.0 / 4)
    assert math.isclose(res.sensitivities["gradient"], math.sqrt(4) * 2.0)
    # 2T = 4 equal releases under the classic conversion
    assert math.isclose(res.noise_multipliers["gradient"], L.calibrate_releases(1.0, 1e-5, [1] * 4, "classic")[0])


def test_newton_hessian_and_gradient_sensitivities_hold_on_neighbours():
    # add/remove one example: the joint change of the L class Hessians is at most sqrt(L) C^2/4, of the
    # L gradients at most sqrt(L) C, and of the first Hessian (W = 0: p0(1-p0) X'X) p0(1-p0) C^2
    x, y = _data(n=200, d=6, classes=4, scale=3.0)
    c, nc = 1.5, 4
    xc = L.clip_features(x, c)
    yy = L.one_hot(y, nc, x.dtype)
    g = torch.Generator().manual_seed(0)
    res = L.dp_newton(x, y, nc, epsilon=1.0, steps=2, clip_norm=c, bias=-1.0, dtype=torch.float64,
                      shared_first_hessian=True)
    for _ in range(5):
        w, b = torch.randn(nc, 6, generator=g, dtype=torch.float64), torch.randn(nc, generator=g, dtype=torch.float64)
        _, resid, curv = L._ova_stats(xc, w, b, yy)
        full_h, full_g = L.class_hessians(xc, curv), resid.T @ xc
        for i in (0, 7, 99):
            keep = torch.arange(len(y)) != i
            dh = (full_h - L.class_hessians(xc[keep], curv[keep])).norm()
            dg = (full_g - resid[keep].T @ xc[keep]).norm()
            assert dh <= res.sensitivities["hessian"] * (1 + 1e-9) and dg <= res.sensitivities["gradient"] * (1 + 1e-9)
    p0 = 1 / (1 + math.exp(1.0))
    assert math.isclose(res.sensitivities["hessian_first"], p0 * (1 - p0) * c**2)
    _, _, curv0 = L._ova_stats(xc, torch.zeros(nc, 6, dtype=torch.float64), torch.full((nc,), -1.0, dtype=torch.float64), yy)
    assert torch.allclose(L.class_hessians(xc, curv0), (p0 * (1 - p0) * xc.T @ xc).expand(nc, 6, 6))
    assert float(xc[0].norm()) ** 2 * p0 * (1 - p0) <= res.sensitivities["hessian_first"] * (1 + 1e-9)


def test_newton_first_step_from_the_gram_matches_per_class_hessians():
    x, y = _data(n=300, classes=4)
    a = L.dp_newton(x, y, 4, epsilon=None, steps=3, lam=0.5, dtype=torch.float64)
    xc = L.clip_features(x, 1.0)
    b = L.dp_newton(x, y, 4, epsilon=None, steps=3, lam=0.5, dtype=torch.float64, gram=xc.T @ xc)
    assert torch.allclose(a.weights, b.weights)
    with pytest.raises(UserError, match="gram"):
        L.dp_newton(x, y, 4, epsilon=None, steps=2, gram=torch.eye(3))


def test_newton_subsampled_hessians_are_accounted_without_amplification():
    x, y = _data(n=400, classes=3)
    full = L.dp_newton(x, y, 3, epsilon=2.0, steps=3, conversion="classic")
    sub = L.dp_newton(x, y, 3, epsilon=2.0, steps=3, hessian_fraction=0.2, conversion="classic")
    # the subsample changes the computation, never the accounting: the same 2T releases and s
    assert sub.noise_multipliers == full.noise_multipliers and sub.epsilons == full.epsilons
    assert 2.0 * 0.99 <= sub.epsilon <= 2.0 * 1.002
    assert not torch.equal(sub.weights, full.weights)
    # the noise ridge of a later step sees the noise on the estimate divided by q
    a = L.dp_newton(x, y, 3, epsilon=2.0, steps=3, hessian_fraction=0.2, lam_noise=1.0, conversion="classic")
    b = L.dp_newton(x, y, 3, epsilon=2.0, steps=3, lam_noise=1.0, conversion="classic")
    assert a.info["ridges"][0] == pytest.approx(b.info["ridges"][0])
    assert a.info["ridges"][1] - 1.0 == pytest.approx((b.info["ridges"][1] - 1.0) / 0.2)
    # one release of the shared first Hessian: same accounting, less noise on it
    sh = L.dp_newton(x, y, 3, epsilon=2.0, steps=3, lam_noise=1.0, conversion="classic", shared_first_hessian=True)
    assert sh.epsilons == b.epsilons and sh.info["ridges"][0] < b.info["ridges"][0]
    with pytest.raises(UserError, match="hessian_fraction"):
        L.dp_newton(x, y, 3, epsilon=2.0, steps=3, hessian_fraction=0.0)


def test_dp_fc_budget_split():
    x, y = _data(n=300)
    res = L.dp_fc(x, y, 3, epsilon=1.0, steps=4, cov_fraction=0.5, conversion="classic")
    s_cov, s_g = res.noise_multipliers["covariance"], res.noise_multipliers["gradient"]
    # 1/s_cov^2 is half of beta, the 4 gradient releases share the other half
    assert math.isclose(1 / s_cov**2, 4 / s_g**2, rel_tol=1e-9)


def test_private_solvers_are_seeded():
    x, y = _data(n=300)
    for method in ("least_squares", "newton", "dp_fc"):
        a = L.solve(method, x, y, 3, epsilon=1.0, seed=1)
        b = L.solve(method, x, y, 3, epsilon=1.0, seed=1)
        c = L.solve(method, x, y, 3, epsilon=1.0, seed=2)
        assert torch.equal(a.weights, b.weights) and not torch.equal(a.weights, c.weights)


def test_private_least_squares_is_accurate_at_large_epsilon():
    x, y = _data(n=4000, d=8)
    clean = L.dp_least_squares(x, y, 3, epsilon=None, lam=1.0)
    noisy = L.dp_least_squares(x, y, 3, epsilon=8.0, lam=1.0, lam_noise=1.0)
    tiny = L.dp_least_squares(x, y, 3, epsilon=0.001, lam=1.0, lam_noise=1.0)
    assert clean.accuracy(x, y) > 0.85
    assert noisy.accuracy(x, y) > clean.accuracy(x, y) - 0.05
    assert tiny.accuracy(x, y) < noisy.accuracy(x, y)


def test_bad_inputs_raise_user_error():
    x, y = _data(n=100)
    with pytest.raises(UserError, match="delta"):
        L.dp_least_squares(x, y, 3, epsilon=1.0, delta=0.02)
    with pytest.raises(UserError, match="conversion"):
        L.dp_least_squares(x, y, 3, epsilon=1.0, conversion="gdp")
    with pytest.raises(UserError, match="labels"):
        L.dp_least_squares(x, y + 5, 3, epsilon=1.0)
    with pytest.raises(UserError, match="unknown solver"):
        L.solve("svm", x, y, 3, epsilon=1.0)


@pytest.mark.gpu
def test_solvers_run_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x, y = _data(n=500)
    for method, kw in [("least_squares", {}), ("newton", {"steps": 2}), ("dp_fc", {"steps": 2}),
                       ("dp_sgd", {"steps": 2})]:
        res = L.solve(method, x, y, 3, epsilon=1.0, device="cuda", **kw)
        assert res.weights.device.type == "cuda"
        cpu = L.solve(method, x, y, 3, epsilon=None, **kw)
        gpu = L.solve(method, x, y, 3, epsilon=None, device="cuda", **kw)
        assert torch.allclose(cpu.weights.float(), gpu.weights.float().cpu(), atol=1e-4)
