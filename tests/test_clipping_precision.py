"""Mixed precision, hidden copies and .grad handling of the clipping engine (issue 21).

- Under torch.autocast (bfloat16, CPU) every method gives the fp32 naive loop's clipped sum
  within bfloat16 tolerance.
- A .half() model: per-sample norms above 256 (whose square overflows float16) and below
  6e-8 (whose square underflows) come out right, so clip factors are neither 0 nor 1 by
  accident.
- No rule allocates a per-sample copy of a weight (B x the weight's size).
- .grad written by the engine can be zeroed in place after a plain backward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dpbench.clipping import ClippingEngine

from test_clipping import METHODS, assert_close, naive_clipped, naive_per_sample, rel_err

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """Conv, GroupNorm, Conv1d-free CNN with a 3-D Linear and an Embedding-free head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.gn = nn.GroupNorm(2, 6)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, groups=2)
        self.tok = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.gn(self.conv(x)))
        x = self.conv2(x)  # (B, 8, 3, 3)
        x = self.tok(x.flatten(2).transpose(1, 2))  # (B, 9, 8): Linear over tokens
        return self.head(F.relu(x).mean(1))


class GramNet(nn.Module):
    """A conv on a 4x4 map with 32 channels: its ghost norm takes the pixel Gram matrix path."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(32, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.conv2(F.relu(self.conv(x))).mean((2, 3)))


def _data(B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 8, 8, generator=g), torch.randint(0, 4, (B,), generator=g)


@pytest.mark.parametrize("method,net", [(m, Net) for m in METHODS] + [(m, GramNet) for m in ("ghost", "bk")])
def test_bf16_autocast_matches_fp32_naive_loop(method, net):
    """Within bf16 tolerance of the fp32 naive loop, and close to the same loop under autocast.

    bf16 tolerance: twice the error that bf16 itself puts in each parameter's summed
    per-sample gradient (a naive loop under autocast against fp32), plus 2e-2.
    """
    torch.manual_seed(0)
    model = net()
    x, y = _data()
    ps = naive_per_sample(model, x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ps_bf = {n: v.float() for n, v in naive_per_sample(model, x, y).items()}
    C = 0.5 * float(torch.stack([v.flatten(1).pow(2).sum(1) for v in ps.values()]).sum(0).sqrt().median())
    ref, ref_norms = naive_clipped(ps, {"all": list(ps)}, {"all": C})
    ref_bf, ref_bf_norms = naive_clipped(ps_bf, {"all": list(ps)}, {"all": C})
    eng = ClippingEngine(model, max_grad_norm=C, method=method)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            assert out.dtype == torch.bfloat16  # the forward really ran in bf16
            losses = F.cross_entropy(out.float(), y, reduction="none")
        norms = eng.backward(losses)
    finally:
        eng.remove()
    assert norms["all"].dtype == torch.float32
    assert rel_err(norms["all"], ref_norms["all"]) < 5e-2
    assert rel_err(norms["all"], ref_bf_norms["all"]) < 2e-2
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g.dtype == torch.float32 for g in grads.values())
    for n in ref:
        bf16_error = rel_err(ps_bf[n].sum(0), ps[n].sum(0))
        assert rel_err(grads[n], ref[n]) <= 2 * bf16_error + 2e-2, (n, rel_err(grads[n], ref[n]), bf16_error)
        assert rel_err(grads[n], ref_bf[n]) <= 3e-2, (n, rel_err(grads[n], ref_bf[n]))


@pytest.mark.parametrize("method", ["instantiate", "ghost", "bk", "auto"])
@pytest.mark.parametrize("case", ["big", "small"])
def test_half_model_norms_neither_overflow_nor_underflow(method, case):
    """loss_i = k * sum(W x_i): the per-sample gradient is k 1 x_i', of norm k sqrt(3) ||x_i||."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 3, bias=False).half()
    x_scale, k = (2000.0, 1.0) if case == "big" else (1e-3, 1e-4)
    x = (torch.randn(5, 16) * x_scale).half()
    ref = k * 3 ** 0.5 * x.double().norm(dim=1)
    if case == "big":
        assert float(ref.min()) > 256  # the squared norm overflows float16 (max 65504)
    else:
        assert float(ref.pow(2).max()) < 6e-8  # the squared norm underflows float16
    eng = ClippingEngine(lin, max_grad_norm=1.0, method=method)
    try:
        norms = eng.backward(k * lin(x).sum(1))
    finally:
        eng.remove()
    got = norms["all"].double()
    assert torch.isfinite(got).all() and float(got.min()) > 0
    assert float(((got - ref) / ref).abs().max()) < 1e-2
    # the clipped sum: sum_i min(1, 1/||g_i||) k 1 x_i' (clip factor neither 0 from inf nor 1 from 0)
    c = torch.clamp(1.0 / ref, max=1.0)
    want = k * torch.ones(3, 1, dtype=torch.float64) * (c[:, None] * x.double()).sum(0)[None]
    assert lin.weight.grad.dtype == torch.float16
    if case == "big":
        assert rel_err(lin.weight.grad.double(), want) < 1e-2
    else:  # .grad is float16: its entries (~1e-7) are float16 subnormals, spaced 6e-8
        assert float((lin.weight.grad.double() - want).abs().max()) <= 6e-8


class _Spy(torch.overrides.TorchFunctionMode):
    """Records the largest tensor (elements) produced by expand/repeat/reshape-like ops."""

    def __init__(self):
        super().__init__()
        self.created = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.created.append((getattr(func, "__name__", str(func)), out))
        return out


@pytest.mark.parametrize("method", ["instantiate", "ghost", "bk", "mixed", "auto"])
def test_no_rule_makes_a_per_sample_copy_of_a_weight(method):
    """No tensor B x the size of a weight is made from the weight (expand + reshape copies it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.GroupNorm(1, 5), nn.Conv2d(5, 4, 3, groups=1), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3))
    x, y = torch.randn(7, 3, 8, 8), torch.randint(0, 3, (7,))
    weights = {id(p): p for n, p in model.named_parameters() if n.endswith("weight")}
    eng = ClippingEngine(model, max_grad_norm=1.0, method=method, check=False)
    try:
        losses = F.cross_entropy(model(x), y, reduction="none")
        spy = _Spy()
        with spy:
            eng.backward(losses)
    finally:
        eng.remove()
    for name, t in spy.created:
        # a copy of a weight's values has a storage of >= B x its size and stems from it
        for w in weights.values():
            if t.dim() and t.untyped_storage().nbytes() >= 7 * w.numel() * w.element_size() and \
                    t.untyped_storage().data_ptr() != 0 and t.numel() == 7 * w.numel():
                # per-sample gradients have this size legitimately: they must not equal copies of w
                flat = t.reshape(7, -1)
                assert not torch.equal(flat[0], w.detach().reshape(-1).to(flat.dtype)), (name, tuple(t.shape))


def test_conv_clipped_sum_passes_the_weight_as_a_zero_stride_view(monkeypatch):
    """convolution_backward gets a stride-0 stand-in of the weight's shape, never a copy."""
    seen = []
    real = torch.ops.aten.convolution_backward

    class Wrap:
        def __call__(self, *a, **k):
            seen.append(a[2])
            return real(*a, **k)

    from dpbench.clipping import rules
    monkeypatch.setattr(rules.torch.ops.aten, "convolution_backward", Wrap(), raising=False)
    conv = nn.Conv2d(16, 16, 3)  # T = 16, D = 144, p = 16: bk takes ghost norms and the conv clipped sum
    eng = ClippingEngine(conv, max_grad_norm=1.0, method="bk", check=False)
    try:
        eng.backward(conv(torch.randn(5, 16, 6, 6)).flatten(1).sum(1))
    finally:
        eng.remove()
    assert seen and all(w.shape == conv.weight.shape and set(w.stride()) == {0} for w in seen)


@pytest.mark.parametrize("method", ["bk", "instantiate", "ghost", "auto"])
def test_grad_zeroed_in_place_after_a_plain_backward(method):
    """engine.backward, a plain loss.backward(), .grad zeroed in place, engine.backward again."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    eng = ClippingEngine(model, max_grad_norm=1.0, method=method)
    try:
        eng.backward(F.cross_entropy(model(x), y, reduction="none"))
        with eng.paused():
            F.cross_entropy(model(x), y).backward()
        for p in model.parameters():
            p.grad.zero_()
        eng.backward(F.cross_entropy(model(x), y, reduction="none"))
        ps = naive_per_sample(model, x, y)
        ref, _ = naive_clipped(ps, {"all": list(ps)}, {"all": 1.0})
        assert_close({n: p.grad for n, p in model.named_parameters()}, ref, 1e-4)
    finally:
        eng.remove()
