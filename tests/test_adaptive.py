"""Adaptive per-group clipping thresholds (dpbench.clipping.adaptive): the update rule by
hand, the noise split and its accounting (one event per step; the separate-events
accounting understates epsilon), convergence to the target quantile, refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from dpbench.privacy import accounting
from dpbench.clipping import ClippingEngine
from dpbench.clipping.adaptive import (
    AdaptiveClipping, adaptive_noise, centered_count, noisy_fractions, renormalize, separate_events_epsilon,
    threshold_update,
)
from dpbench.errors import UserError
from dpbench.training.adaptive import fit_adaptive
from dpbench.training.loop import BatchSpec, ClipSpec, EvalSpec, PlannedStep, PrivacySpec, StepPlan, fit


class StubEngine:
    """The part of ClippingEngine's contract adaptive clipping uses."""

    def __init__(self, thresholds, clip_fn="abadi"):
        self._t = dict(thresholds)
        self.clip_fn = clip_fn

    @property
    def thresholds(self):
        return dict(self._t)

    def set_thresholds(self, t):
        self._t.update({k: float(v) for k, v in t.items()})

    @property
    def sensitivity(self):
        return math.sqrt(sum(c * c for c in self._t.values()))


# ---------------------------------------------------------------------------- the rule


def test_centered_count_and_fraction_by_hand():
    norms = torch.tensor([0.5, 1.5, 0.9, 3.0, 1.0])
    assert centered_count(norms, 1.0) == 3 - 2.5  # 0.5, 0.9 and 1.0 (<=) are under
    assert centered_count(torch.empty(0), 1.0) == 0.0
    # bhat = (b + noise) / E[B] + 1/2
    assert noisy_fractions({"a": 0.5}, {"a": 6.3}, 32.0)["a"] == pytest.approx(6.8 / 32 + 0.5)


def test_threshold_update_by_hand():
    new = threshold_update({"a": 1.0, "b": 2.0}, {"a": 0.8, "b": 0.3}, target_quantile=0.5, lr=0.2)
    assert new["a"] == pytest.approx(math.exp(-0.2 * 0.3))  # too many under: shrink
    assert new["b"] == pytest.approx(2.0 * math.exp(0.2 * 0.2))  # too few under: grow
    r = renormalize({"a": 3.0, "b": 4.0}, total=1.0)
    assert r == pytest.approx({"a": 0.6, "b": 0.8})


def test_update_step_by_hand_with_the_seeded_noise():
    eng = StubEngine({"l1": 1.0, "l2": 0.5})
    ad = AdaptiveClipping(eng, noise_multiplier=1.0, expected_batch_size=8.0, target_quantile=0.6, lr=0.3,
                          count_fraction=0.2, seed=7)
    assert ad.sigma_b == pytest.approx(math.sqrt(2) * 1.0 / (2 * math.sqrt(0.2)))
    norms = {"l1": torch.tensor([0.2, 0.4, 2.0, 3.0, 0.9, 1.1]), "l2": torch.tensor([0.1, 0.2, 0.3, 0.4, 0.6, 5.0])}
    z = torch.randn(2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    b1 = 3 - 3 + float(z[0]) * ad.sigma_b  # 0.2, 0.4, 0.9 under 1.0
    b2 = 4 - 3 + float(z[1]) * ad.sigma_b  # 0.1..0.4 under 0.5
    f1, f2 = b1 / 8 + 0.5, b2 / 8 + 0.5
    new = ad.update(norms)
    assert new["l1"] == pytest.approx(1.0 * math.exp(-0.3 * (f1 - 0.6)))
    assert new["l2"] == pytest.approx(0.5 * math.exp(-0.3 * (f2 - 0.6)))
    assert eng.thresholds == pytest.approx(new)
    assert ad.history[-1]["fractions"] == pytest.approx({"l1": f1, "l2": f2})
    # an empty batch still releases (noise-only) counts and moves the thresholds
    ad.update({"l1": torch.empty(0), "l2": torch.empty(0)})
    assert ad.steps == 2 and eng.thresholds != pytest.approx(new)


def test_renormalize_keeps_the_total():
    eng = StubEngine({"a": 1.0, "b": 1.0, "c": 1.0})
    ad = AdaptiveClipping(eng, 1.0, 64.0, renormalize=True, total=2.0, seed=0)
    assert eng.sensitivity == pytest.approx(2.0)  # applied at construction
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        ad.update({k: torch.rand(64, generator=g) * s for k, s in zip("abc", (0.1, 1.0, 10.0))})
        assert eng.sensitivity == pytest.approx(2.0)
    t = eng.thresholds
    assert t["a"] < t["b"] < t["c"]  # the split follows the norms


# ---------------------------------------------------------------------------- privacy


@pytest.mark.parametrize("sigma,k,r", [(0.7, 1, 0.01), (1.3, 7, 0.01), (2.0, 12, 0.1), (5.0, 3, 0.5)])
def test_budget_split_gives_sigma_eff_equal_sigma(sigma, k, r):
    sg, sb = adaptive_noise(sigma, k, r)
    assert sg == pytest.approx(sigma / math.sqrt(1 - r)) and sg > sigma
    assert sb == pytest.approx(math.sqrt(k) * sigma / (2 * math.sqrt(r)))
    assert accounting.combined_noise_multiplier(sg, sb, k) == pytest.approx(sigma, rel=1e-12)


N_TRAIN, Q, STEPS, EPS = 300, 0.1, 25, 3.0


@pytest.fixture(scope="module")
def adaptive_run():
    torch.manual_seed(0)
    x = torch.randn(N_TRAIN, 1, 6, 6)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, 2))
    res, ad = fit_adaptive(model, (x, y), target_epsilon=EPS, steps=STEPS, sample_rate=Q, clip_style="layer",
                           max_grad_norm=1.0, target_quantile=0.5, count_fraction=0.01, lr=0.5, seed=3,
                           progress=False, track_epsilon=False, eval_every=1000)
    return res, ad


def test_fit_adaptive_spends_exactly_the_target_epsilon(adaptive_run):
    res, ad = adaptive_run
    sigma = res.noise_multiplier
    # one Poisson-sampled Gaussian with sigma per step: a single merged dpsgd event
    assert res.ledger.events == [{"type": "dpsgd", "noise_multiplier": sigma, "sample_rate": Q, "steps": STEPS}]
    assert res.optimizer.noise_multiplier == pytest.approx(ad.sigma_g) and ad.sigma_g > sigma
    assert accounting.combined_noise_multiplier(ad.sigma_g, ad.sigma_b, len(ad.groups)) == pytest.approx(sigma)
    eps = res.ledger.epsilon()
    assert EPS * (1 - 5e-3) <= eps <= EPS * (1 + 1e-9)  # calibration tolerance 1e-3 on sigma
    # the thresholds were adapted every step, from the engine's real per-sample norms
    assert len(ad.groups) == 2 and ad.steps == STEPS and len(ad.history) == STEPS + 1
    assert ad.history[-1]["thresholds"] != pytest.approx(ad.history[0]["thresholds"])
    assert ad.history[0]["thresholds"] == pytest.approx({g: 1 / math.sqrt(2) for g in ad.groups})


def test_separately_sampled_events_understate_epsilon(adaptive_run):
    res, ad = adaptive_run
    right = res.ledger.epsilon()
    k = len(ad.groups)
    wrong = separate_events_epsilon(ad.sigma_g, ad.sigma_b, k, Q, STEPS)
    assert wrong < right - 3e-3 * EPS  # beyond the calibration tolerance, even at r = 0.01
    # with a larger count budget the error is large
    sg, sb = adaptive_noise(res.noise_multiplier, k, 0.5)
    assert separate_events_epsilon(sg, sb, k, Q, STEPS) < 0.9 * right
    assert accounting.epsilon(accounting.combined_noise_multiplier(sg, sb, k), Q, STEPS) == pytest.approx(right)


def test_optimizer_with_the_full_sigma_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    x, y = torch.randn(50, 4), torch.randint(0, 2, (50,))
    engine = ClippingEngine(model, style="layer")
    ad = AdaptiveClipping(engine, noise_multiplier=1.0, expected_batch_size=10, seed=0)
    with pytest.raises(UserError, match="gradient_noise_multiplier"):
        fit(model, (x, y), batching=BatchSpec(steps=2, sample_rate=0.2),
            privacy=PrivacySpec(noise_multiplier=1.0, track_epsilon=False), clipping=ClipSpec(engine=engine),
            evaluation=EvalSpec(progress=False), hooks=[ad])
    engine.remove()


def test_the_clipping_layer_imports_no_training_code():
    import ast
    import inspect

    import dpbench.clipping.adaptive as mod

    tree = ast.parse(inspect.getsource(mod))
    names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in names if "training" in m or "workbench" in m or "experiments" in m]


class _PublicThenPrivate(StepPlan):
    def __init__(self, xy):
        self.xy, self.steps, self.private_steps = xy, 4, 2

    def iter_steps(self, model, optimizer):
        for t in range(4):
            yield PlannedStep(private=False, public=self.xy, public_weight=1.0) if t < 2 else PlannedStep()


def test_adaptive_hook_releases_counts_only_on_private_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x, y = torch.randn(60, 4), torch.randint(0, 2, (60,))
    engine = ClippingEngine(model, style="layer")
    ad = AdaptiveClipping(engine, noise_multiplier=1.0, expected_batch_size=12, seed=0)
    res = fit(model, (x, y), batching=BatchSpec(sample_rate=0.2),
              privacy=PrivacySpec(noise_multiplier=1.0, gradient_noise_multiplier=ad.sigma_g),
              clipping=ClipSpec(engine=engine), evaluation=EvalSpec(progress=False), hooks=[ad],
              plan=_PublicThenPrivate((x[:10], y[:10])))
    engine.remove()
    assert ad.steps == 2 == res.ledger.steps == res.optimizer.steps_taken


# ---------------------------------------------------------------------------- convergence


def _lognormal_norms(gen, mus, size, s=0.5):
    return {k: torch.exp(mu + s * torch.randn(size, generator=gen)) for k, mu in mus.items()}


@pytest.mark.parametrize("q", [0.5, 0.7])
def test_thresholds_track_the_target_quantile(q):
    from scipy.stats import norm as gauss

    mus = {"small": -3.0, "mid": 0.0, "large": 1.5}
    eng = StubEngine({k: 1 / math.sqrt(3) for k in mus})
    ad = AdaptiveClipping(eng, noise_multiplier=1.0, expected_batch_size=256, target_quantile=q, lr=0.2,
                          count_fraction=0.01, seed=1)
    gen = torch.Generator().manual_seed(2)
    under = {k: [] for k in mus}
    for step in range(400):
        norms = _lognormal_norms(gen, mus, 256)
        if step >= 300:
            for k in mus:
                under[k].append(float((norms[k] <= eng.thresholds[k]).float().mean()))
        ad.update(norms)
    for k, mu in mus.items():
        assert abs(np.mean(under[k]) - q) < 0.04, (k, np.mean(under[k]))
        true_quantile = math.exp(mu + 0.5 * gauss.ppf(q))
        assert abs(math.log(eng.thresholds[k] / true_quantile)) < 0.15
    # renormalised: total fixed, and the groups end at a common fraction under the threshold
    eng = StubEngine({k: 1 / math.sqrt(3) for k in mus})
    ad = AdaptiveClipping(eng, 1.0, 256, target_quantile=q, lr=0.2, renormalize=True, seed=1)
    fr = {k: [] for k in mus}
    for step in range(400):
        norms = _lognormal_norms(gen, mus, 256)
        if step >= 300:
            for k in mus:
                fr[k].append(float((norms[k] <= eng.thresholds[k]).float().mean()))
        ad.update(norms)
    means = [np.mean(v) for v in fr.values()]
    assert max(means) - min(means) < 0.06 and eng.sensitivity == pytest.approx(1.0)


# ---------------------------------------------------------------------------- refusals


def test_automatic_clipping_is_refused():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    engine = ClippingEngine(model, style="layer", clip_fn="automatic")
    with pytest.raises(UserError, match="abadi"):
        AdaptiveClipping(engine, 1.0, 10)
    engine.remove()
    with pytest.raises(UserError, match="abadi"):
        fit_adaptive(model, (torch.randn(20, 4), torch.randint(0, 2, (20,))), clip_fn="automatic",
                     noise_multiplier=1.0, steps=1, sample_rate=0.5)


@pytest.mark.parametrize("kwargs,match", [
    ({"target_quantile": 1.0}, "target_quantile"),
    ({"lr": 0.0}, "learning rate"),
    ({"count_fraction": 0.0}, "count_fraction"),
    ({"count_fraction": 1.0}, "count_fraction"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(UserError, match=match):
        AdaptiveClipping(StubEngine({"a": 1.0, "b": 1.0}), 1.0, 10, **kwargs)


def test_renormalize_with_one_group_is_refused():
    with pytest.raises(UserError, match="single clipping group"):
        AdaptiveClipping(StubEngine({"all": 1.0}), 1.0, 10, renormalize=True)
