"""Poisson and shuffled batch selection: distribution, determinism, world-size independence."""

import numpy as np
import pytest
import torch

from dpbench.errors import UserError
from dpbench.training.sampling import (
    PoissonSampler,
    ShuffledSampler,
    inclusion_uniforms,
    split_physical,
    steps_for_epochs,
)


def test_batch_sizes_are_binomial():
    from scipy import stats

    n, q, steps = 1000, 0.05, 3000
    sizes = np.array([len(b) for b in PoissonSampler(n, q, steps, seed=7)])
    mean, var = n * q, n * q * (1 - q)
    # mean within 4 standard errors, variance within 15% (sd of the sample variance ~2.6%)
    assert abs(sizes.mean() - mean) < 4 * np.sqrt(var / steps)
    assert abs(sizes.var(ddof=1) / var - 1) < 0.15
    # chi-square goodness of fit against Binomial(n, q), tails pooled
    edges = np.arange(int(mean - 2.5 * np.sqrt(var)), int(mean + 2.5 * np.sqrt(var)) + 1)
    cdf = stats.binom.cdf(edges, n, q)
    probs = np.diff(np.concatenate([[0.0], cdf, [1.0]]))
    observed = np.bincount(np.searchsorted(edges, sizes, side="left"), minlength=len(probs))
    chi2, p = stats.chisquare(observed, probs * steps)
    assert p > 1e-3, (chi2, p)


def test_inclusion_is_independent_per_example_and_step():
    n, q, steps = 400, 0.3, 400
    m = np.zeros((steps, n), dtype=bool)
    for t, b in enumerate(PoissonSampler(n, q, steps, seed=3)):
        m[t, b.numpy()] = True
    per_example = m.mean(axis=0)  # each example joins with probability q
    assert abs(per_example.mean() - q) < 0.01
    assert per_example.std() < 3 * np.sqrt(q * (1 - q) / steps)
    # neighbouring steps and neighbouring examples are uncorrelated
    a = m.astype(float) - q
    assert abs((a[1:] * a[:-1]).mean()) / (q * (1 - q)) < 0.03
    assert abs((a[:, 1:] * a[:, :-1]).mean()) / (q * (1 - q)) < 0.03


def test_uniforms_in_unit_interval():
    u = inclusion_uniforms(0, 0, np.arange(200_000))
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002


def test_deterministic_and_seed_dependent():
    a = [b.tolist() for b in PoissonSampler(500, 0.1, 20, seed=1)]
    b = [b.tolist() for b in PoissonSampler(500, 0.1, 20, seed=1)]
    c = [b.tolist() for b in PoissonSampler(500, 0.1, 20, seed=2)]
    assert a == b
    assert a != c
    s = PoissonSampler(500, 0.1, 20, seed=1)
    assert s.batch(13).tolist() == a[13]  # random access equals iteration
    assert len(s) == 20 and s.expected_batch_size == pytest.approx(50.0)


@pytest.mark.parametrize("world_size", [2, 3, 8])
def test_union_of_ranks_equals_single_process(world_size):
    n, q, steps, seed = 1001, 0.07, 15, 11
    single = [set(b.tolist()) for b in PoissonSampler(n, q, steps, seed=seed)]
    per_rank = [[set(b.tolist()) for b in PoissonSampler(n, q, steps, seed=seed, rank=r, world_size=world_size)]
                for r in range(world_size)]
    for t in range(steps):
        parts = [per_rank[r][t] for r in range(world_size)]
        assert set().union(*parts) == single[t]
        assert sum(len(p) for p in parts) == len(single[t])  # disjoint
        for r, p in enumerate(parts):
            assert all(i % world_size == r for i in p)


def test_empty_batches_occur_at_tiny_rate():
    n, q, steps = 100, 0.001, 500
    batches = list(PoissonSampler(n, q, steps, seed=0))
    assert len(batches) == steps  # empty batches are yielded, not skipped
    empty = sum(len(b) == 0 for b in batches)
    p_empty = (1 - q) ** n  # ~0.905
    assert abs(empty / steps - p_empty) < 4 * np.sqrt(p_empty * (1 - p_empty) / steps)
    e = next(b for b in batches if len(b) == 0)
    assert e.dtype == torch.long and e.shape == (0,)


def test_split_physical():
    idx = torch.arange(10)
    chunks = split_physical(idx, 4)
    assert [len(c) for c in chunks] == [4, 4, 2]
    assert torch.equal(torch.cat(chunks), idx)
    assert split_physical(torch.empty(0, dtype=torch.long), 4) == []
    with pytest.raises(UserError):
        split_physical(idx, 0)


def test_steps_for_epochs():
    assert steps_for_epochs(3, 0.01) == 300
    with pytest.raises(UserError):
        steps_for_epochs(-1, 0.1)


@pytest.mark.parametrize("kwargs", [dict(n=0, sample_rate=0.1, steps=1), dict(n=10, sample_rate=0.0, steps=1),
                                    dict(n=10, sample_rate=1.5, steps=1), dict(n=10, sample_rate=0.1, steps=-1),
                                    dict(n=10, sample_rate=0.1, steps=1, rank=2, world_size=2)])
def test_poisson_rejects_bad_input(kwargs):
    with pytest.raises(UserError):
        PoissonSampler(**kwargs)


def test_shuffled_needs_explicit_flag_and_says_why():
    with pytest.raises(UserError, match="approximate=True"):
        ShuffledSampler(100, 10, 1, seed=0)
    s = ShuffledSampler(103, 10, 2, seed=0, approximate=True)
    assert s.approximate and "Poisson" in s.approximate_reason
    batches = list(s)
    assert len(batches) == len(s) == 2 * 11
    assert sorted(torch.cat(batches[:11]).tolist()) == list(range(103))  # each epoch covers every example once
    assert {len(b) for b in batches} == {10, 3}
    assert s.sample_rate == pytest.approx(10 / 103)
    assert not PoissonSampler(10, 0.1, 1).approximate
