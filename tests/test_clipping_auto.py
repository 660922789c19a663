"""`auto` measures: per layer the fastest rule on the first batch, within a memory budget.

The measurements are replaced by fakes (ClippingEngine._measure), so the tests check that
the choice follows the measurement and the budget, not the speed of this machine; every
choice must still give the naive loop's clipped sum.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dpbench.clipping import ClippingEngine
from dpbench.clipping import engine as engine_mod
from dpbench.errors import UserError

from test_clipping import assert_close, naive_clipped, naive_per_sample

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _fresh_auto_cache():
    """Each test measures (or fakes) afresh: auto's per-architecture cache would replay another test's choice."""
    engine_mod.clear_auto_cache()
    yield
    engine_mod.clear_auto_cache()

MB = 1 << 20


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.Flatten(),
                         nn.Linear(6 * 4 * 4, 3))


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(5, 3, 8, 8, generator=g), torch.randint(0, 3, (5,), generator=g)


def _fake(table):
    """_measure returning table[layer name] = {rule: (seconds, bytes)} (all candidates run for real elsewhere)."""

    def measure(self, l, acts, grads):
        out = dict(table[l.name])
        if not l.rule.ghost_capable:
            out.pop("ghost", None)
        if self.style != "flat":
            out.pop("recompute", None)
        return out

    return measure


def _run(model, steps=2, **kw):
    eng = ClippingEngine(model, max_grad_norm=0.5, method="auto", **kw)
    try:
        for s in range(steps):
            for p in model.parameters():
                p.grad = None
            x, y = _data(s)
            eng.backward(F.cross_entropy(model(x), y, reduction="none"))
            ps = naive_per_sample(model, x, y)
            ref, _ = naive_clipped(ps, {"all": list(ps)}, {"all": 0.5})
            assert_close({n: p.grad for n, p in model.named_parameters()}, ref, 1e-4)
        return {r["layer"]: r for r in eng.layer_table()}
    finally:
        eng.remove()


TABLE = {
    "0": {"ghost": (3e-3, 2 * MB), "instantiate": (1e-3, 4 * MB), "recompute": (5e-3, 0)},
    "1": {"instantiate": (1e-4, 1 * MB), "recompute": (2e-4, 0)},
    "3": {"ghost": (1e-3, 1 * MB), "instantiate": (2e-3, 8 * MB), "recompute": (2e-3, 0)},
    "5": {"ghost": (2e-3, 1 * MB), "instantiate": (1e-3, 1 * MB), "recompute": (4e-3, 0)},
}


def test_auto_picks_the_fastest_measured_rule_and_keeps_it(monkeypatch):
    monkeypatch.setattr(ClippingEngine, "_measure", _fake(TABLE))
    rows = _run(_model())
    assert {n: rows[n]["method"] for n in TABLE} == {"0": "instantiate", "1": "instantiate", "3": "ghost",
                                                     "5": "instantiate"}
    assert all("second backward" not in rows[n]["note"] for n in TABLE)
    assert "ghost 3 ms 2 MiB" in rows["0"]["measured"] and "instantiate 1 ms 4 MiB" in rows["0"]["measured"]


def test_auto_follows_the_measurement_not_the_flop_rule(monkeypatch):
    flipped = {n: {k: ((1e-3 if k == "ghost" else 5e-3), b) if k != "recompute" else (t, b) for k, (t, b) in d.items()}
               for n, d in TABLE.items()}
    monkeypatch.setattr(ClippingEngine, "_measure", _fake(flipped))
    rows = _run(_model())
    assert rows["0"]["method"] == "ghost" and rows["5"]["method"] == "ghost" and rows["1"]["method"] == "instantiate"


def test_memory_budget_falls_back_to_rules_that_stash_less(monkeypatch):
    monkeypatch.setattr(ClippingEngine, "_measure", _fake(TABLE))
    # fastest: 4 + 1 + 1 + 1 = 7 MiB; 5 MiB: layer 0 goes to ghost (2 MiB, the least time lost per byte)
    rows = _run(_model(), memory_budget=5 * MB)
    assert rows["0"]["method"] == "ghost" and rows["3"]["method"] == "ghost"
    assert "second backward" not in rows["0"]["note"]
    # 2 MiB: layers also stop stashing, clipped sums by a second backward (still exact)
    rows = _run(_model(), memory_budget=2 * MB, steps=3)
    recomputed = [n for n in TABLE if "second backward" in rows[n]["note"]]
    kept = sum(TABLE[n][rows[n]["method"]][1] for n in TABLE if n not in recomputed)
    assert recomputed and kept <= 2 * MB
    assert all("cannot be met" not in rows[n]["note"] for n in TABLE)


def test_a_cached_second_backward_keeps_tf32_off_in_pass_1(monkeypatch):
    """With check=False, an engine replaying a cached choice with recomputed layers must know
    it before pass 1, which then runs inside no_tf32 (as the second backward's G must match)."""
    monkeypatch.setattr(ClippingEngine, "_measure", _fake(TABLE))
    _run(_model(), memory_budget=2 * MB)  # measures; the choice (with recomputed layers) is cached
    depth, seen = [0], []

    @contextlib.contextmanager
    def counting():
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    real = ClippingEngine._backward

    def spy(self, *a):
        seen.append(depth[0])
        return real(self, *a)

    monkeypatch.setattr(engine_mod, "no_tf32", counting)
    monkeypatch.setattr(ClippingEngine, "_backward", spy)
    rows = _run(_model(), memory_budget=2 * MB, check=False, steps=1)
    assert any("second backward" in r["note"] for r in rows.values())
    assert seen == [1]


def test_memory_budget_that_cannot_be_met_is_reported(monkeypatch):
    monkeypatch.setattr(ClippingEngine, "_measure", _fake(TABLE))
    # non-flat styles cannot recompute: the least-memory rules, and the table says so
    eng = ClippingEngine(_model(), max_grad_norm=0.5, method="auto", style="layer", memory_budget=1)
    try:
        x, y = _data()
        eng.backward(F.cross_entropy(eng.model(x), y, reduction="none"))
        rows = {r["layer"]: r for r in eng.layer_table()}
    finally:
        eng.remove()
    assert rows["0"]["method"] == "ghost" and rows["3"]["method"] == "ghost"
    assert all("cannot be met" in rows[n]["note"] for n in TABLE)


def test_auto_measures_with_the_timer(monkeypatch):
    """The real _measure reads engine._clock: a fake clock on which ghost norms take 10 s, instantiation 1 s."""
    from dpbench.clipping import rules

    state = {"t": 0.0}
    monkeypatch.setattr(engine_mod, "_clock", lambda: state["t"])
    for name, cost in (("ghost_sq_norms", 10.0), ("per_sample", 1.0)):
        real = getattr(rules.MatmulRule, name)

        def timed(self, *a, real=real, cost=cost, **k):
            state["t"] += cost
            return real(self, *a, **k)

        monkeypatch.setattr(rules.MatmulRule, name, timed)
    model = _model()
    eng = ClippingEngine(model, max_grad_norm=0.5, method="auto")
    try:
        x, y = _data()
        eng.backward(F.cross_entropy(model(x), y, reduction="none"))
        rows = {r["layer"]: r for r in eng.layer_table()}
    finally:
        eng.remove()
    for n in ("0", "3", "5"):  # the matmul layers: ghost measured slower, so instantiated
        assert rows[n]["method"] == "instantiate", rows[n]
        assert "ghost 1e+04 ms" in rows[n]["measured"] and "instantiate 1e+03 ms" in rows[n]["measured"]


def test_memory_budget_needs_auto():
    with pytest.raises(UserError, match="memory_budget"):
        ClippingEngine(_model(), method="bk", memory_budget=MB)
    with pytest.raises(UserError):
        ClippingEngine(_model(), method="auto", memory_budget=-1)


def test_auto_choice_is_cached_per_architecture(monkeypatch):
    """A second engine on the same architecture and shapes reuses the choice; clear_auto_cache forgets it."""
    calls = []
    fake = _fake(TABLE)

    def counting(self, l, acts, grads):
        calls.append(l.name)
        return fake(self, l, acts, grads)

    monkeypatch.setattr(ClippingEngine, "_measure", counting)
    first = _run(_model())
    n = len(calls)
    assert n > 0
    second = _run(_model())  # a new engine, a new model object of the same architecture
    assert len(calls) == n, "re-measured although the architecture was cached"
    assert {k: r["method"] for k, r in second.items()} == {k: r["method"] for k, r in first.items()}
    assert second["0"]["measured"] == first["0"]["measured"]  # the table still shows the measurement
    _run(_model(), memory_budget=5 * MB)  # another budget: another cache entry, measured
    assert len(calls) == 2 * n
    engine_mod.clear_auto_cache()
    _run(_model())
    assert len(calls) == 3 * n


def test_auto_skips_rules_whose_temporaries_would_set_the_peak():
    """A stem conv with T = 1024 output positions and a tiny weight: its ghost T x T products
    (MiBs per sample) are never measured; instantiation (a few KiB per sample) is."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 32 * 32, 3))
    eng = ClippingEngine(model, max_grad_norm=0.5, method="auto")
    try:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 3, (4,), generator=g)
        eng.backward(F.cross_entropy(model(x), y, reduction="none"))
        rows = {r["layer"]: r for r in eng.layer_table()}
        ps = naive_per_sample(model, x, y)
        ref, _ = naive_clipped(ps, {"all": list(ps)}, {"all": 0.5})
        assert_close({n: p.grad for n, p in model.named_parameters()}, ref, 1e-4)
    finally:
        eng.remove()
    assert rows["0"]["T"] == 1024 and rows["0"]["method"] == "instantiate"
    assert "ghost" not in rows["0"]["measured"] and "instantiate" in rows["0"]["measured"]
