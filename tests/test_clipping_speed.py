"""The speed paths of the clipping rules and the optimizer give the reference results.

Fast unfold (a strided window copy) against F.unfold; the unfolded inputs a ghost norm keeps
for the clipped sum are never reused for another batch; chunked in-place noise has the
right law and a seed that fixes it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dpbench.clipping import ClippingEngine
from dpbench.clipping.rules import _unfold
from dpbench.training.optimizer import DPOptimizer

from test_clipping import assert_close, naive_clipped, naive_per_sample

pytestmark = pytest.mark.usefixtures("one_thread")


def _matches_naive(model, x, y, C):
    """The engine's .grad (flat clipping at C) against the naive per-sample loop."""
    ps = naive_per_sample(model, x, y)
    ref, _ = naive_clipped(ps, {"all": list(ps)}, {"all": C})
    assert_close({n: p.grad for n, p in model.named_parameters()}, ref, 1e-4)


def _step_matches_naive(model, x, y, method, clip=0.3):
    """One engine step (flat clipping at `clip`, `method`) on (x, y): .grad against the naive loop."""
    eng = ClippingEngine(model, max_grad_norm=clip, method=method)
    try:
        eng.backward(F.cross_entropy(model(x), y, reduction="none"))
        _matches_naive(model, x, y, clip)
    finally:
        eng.remove()


@pytest.mark.parametrize("shape,k,d,s", [
    ((2, 3, 9, 11), (3, 3), (1, 1), (1, 1)),    # long rows: strided copy
    ((2, 3, 20, 21), (3, 2), (2, 1), (2, 3)),   # dilation and stride
    ((2, 4, 3, 3), (3, 3), (1, 1), (1, 1)),     # one position: strided copy
    ((2, 4, 4, 4), (3, 3), (1, 1), (1, 1)),     # short rows: im2col
    ((2, 3, 32, 33), (5, 3), (2, 2), (1, 2)),
])
def test_fast_unfold_equals_f_unfold(shape, k, d, s):
    x = torch.randn(shape)
    for t in (x, x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2), torch.randn(3, *shape[1:])[1:]):
        assert torch.equal(_unfold(t, k, d, s), F.unfold(t, k, dilation=d, stride=s))


@pytest.mark.parametrize("method", ["ghost", "bk"])
def test_patch_embedding_clipped_sum_is_one_gemm_on_the_kept_unfolded_input(method, monkeypatch):
    """A conv whose patches do not overlap (kernel = stride, no padding: a ViT's patch
    embedding) keeps the ghost norm's unfolded input for its clipped sum at any number of
    positions (T = 16 here): no weight-gradient convolution, and the naive loop's result."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 4, stride=4), nn.Flatten(), nn.Linear(1024, 3))  # bk: ghost
    x, y = torch.randn(5, 3, 16, 16), torch.randint(0, 3, (5,))
    real = torch.ops.aten.convolution_backward
    calls = []
    monkeypatch.setattr(torch.ops.aten, "convolution_backward", lambda *a: (calls.append(1), real(*a))[1])
    eng = ClippingEngine(model, max_grad_norm=0.3, method=method)
    try:
        eng.backward(F.cross_entropy(model(x), y, reduction="none"))
        assert eng.layer_table()[0]["method"] == "ghost" and eng.layer_table()[0]["T"] == 16
        assert not calls  # the clipped sum never ran the weight-gradient convolution
        _matches_naive(model, x, y, 0.3)
    finally:
        eng.remove()


@pytest.mark.parametrize("method", ["ghost", "bk", "mixed"])
def test_kept_unfolded_inputs_never_serve_another_batch(method):
    """Convs with <= 4 output positions keep the ghost norm's unfolded input for the clipped
    sum; over several steps of different data every step must match the naive loop."""
    torch.manual_seed(0)
    # T = 9, then T = 4 (kept for the clipped sum), then T = 1 (kept)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 6, 2), nn.ReLU(),
                          nn.Conv2d(6, 5, 2), nn.Flatten(), nn.Linear(5, 3))
    eng = ClippingEngine(model, max_grad_norm=0.3, method=method)
    try:
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(5, 3, 7, 7, generator=g), torch.randint(0, 3, (5,), generator=g)
            for p in model.parameters():
                p.grad = None
            eng.backward(F.cross_entropy(model(x), y, reduction="none"))
            _matches_naive(model, x, y, 0.3)
        assert not any("_kept" in l.rule.__dict__ for l in eng._layers)  # nothing held between steps
    finally:
        eng.remove()


class _Sens:
    sensitivity = 1.0

    def __init__(self, params):
        self.params = params

    def trainable_parameters(self):
        return self.params

    def backward(self, losses):
        return {}


def test_chunked_noise_law_and_seed(monkeypatch):
    """Noise drawn piece by piece through a small scratch buffer: N(0, std^2), reproducible per seed."""
    monkeypatch.setattr(DPOptimizer, "NOISE_CHUNK", 1000)  # several pieces per parameter

    def draw(seed):
        params = [nn.Parameter(torch.zeros(2500)), nn.Parameter(torch.zeros(40, 30)), nn.Parameter(torch.zeros(7))]
        opt = DPOptimizer(torch.optim.SGD(params, lr=1.0), _Sens(params), 2.0, 1.0, seed=seed)
        opt.zero_grad()
        opt.add_noise()
        return torch.cat([p.grad.flatten() for p in params])

    a, b, c = draw(1), draw(1), draw(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs(a.std().item() / 2.0 - 1) < 0.05 and abs(a.mean().item()) < 0.1
    # pieces are independent draws: no repeated block across the scratch buffer's boundaries
    assert not torch.equal(a[:1000], a[1000:2000])


def test_noise_streams_give_the_same_noise_on_any_number_of_threads(monkeypatch):
    """The CPU noise is dealt to CPU_STREAMS generators drawn on parallel threads: a seed gives
    the same bits with one torch thread (serial) or two (threaded), and the streams differ."""
    monkeypatch.setattr(DPOptimizer, "NOISE_CHUNK", 1000)  # 23 pieces: threaded (>= 4 pieces)
    import dpbench.training.optimizer as optimizer_mod
    workers = []
    real_map = optimizer_mod.thread_map
    monkeypatch.setattr(optimizer_mod, "thread_map", lambda fn, items, n: (workers.append(n), real_map(fn, items, n))[1])

    def draw(threads):
        params = [nn.Parameter(torch.zeros(20000)), nn.Parameter(torch.zeros(30, 100)), nn.Parameter(torch.zeros(5))]
        opt = DPOptimizer(torch.optim.SGD(params, lr=1.0), _Sens(params), 1.0, 1.0, seed=7)
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            opt.zero_grad()
            opt.add_noise()
        finally:
            torch.set_num_threads(old)
        return torch.cat([p.grad.flatten() for p in params])

    one, two = draw(1), draw(2)
    assert torch.equal(one, two) and workers == [1, 2]
    # dealt by size: alternating pieces would give one stream all of a ViT block's large weights
    sizes = [10, 40000, 10, 40000, 10, 40000, 10, 40000]
    params = [nn.Parameter(torch.zeros(n)) for n in sizes]
    opt = DPOptimizer(torch.optim.SGD(params, lr=1.0), _Sens(params), 1.0, 1.0, seed=7)
    monkeypatch.setattr(DPOptimizer, "NOISE_CHUNK", 1 << 18)
    dealt = []
    monkeypatch.setattr(optimizer_mod, "thread_map", lambda fn, items, n: dealt.extend(items))
    opt.zero_grad()
    opt.add_noise()
    loads = [sum(t.numel() for t in pieces) for _, _, pieces in dealt]
    assert len(loads) == 2 and max(loads) - min(loads) <= 40000 // 2
    assert DPOptimizer.CPU_STREAMS == 2
    # pieces 0 and 1 come from different streams: different draws, uncorrelated
    assert abs(torch.corrcoef(one[:2000].view(2, 1000))[0, 1].item()) < 0.15
    # stream 0's second piece continues stream 0 (piece 2), not a restart
    assert not torch.equal(one[:1000], one[2000:3000])


@pytest.mark.parametrize("sigma", [0.0, 1.5])
def test_division_by_the_expected_batch_inside_the_noise_pass_is_the_separate_division(monkeypatch, sigma):
    """add_noise divides each piece right after its noise: the same bits as noise everywhere,
    then a division of every gradient (contiguous, non-contiguous, sigma 0 alike)."""
    monkeypatch.setattr(DPOptimizer, "NOISE_CHUNK", 1000)

    def grads(opt_fn):
        params = [nn.Parameter(torch.zeros(6000)), nn.Parameter(torch.zeros(30, 40)), nn.Parameter(torch.zeros(3))]
        opt = DPOptimizer(torch.optim.SGD(params, lr=1.0), _Sens(params), sigma, 7.0, seed=5)
        g = torch.Generator().manual_seed(1)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        params[1].grad = torch.randn(40, 30, generator=g).t()  # non-contiguous
        opt_fn(opt)
        return torch.cat([p.grad.flatten() for p in params])

    def separate(opt):
        opt._add_gaussian(opt.noise_std)
        for p in opt.params:
            p.grad.div_(opt.expected_batch_size)

    fused = grads(lambda opt: opt.add_noise())
    assert torch.equal(fused, grads(separate))
    assert (sigma == 0) == torch.equal(fused, grads(lambda opt: None) / 7.0)


def test_chunked_noise_pieces_never_repeat_across_parameters_or_steps(monkeypatch):
    """Every piece of every parameter's noise, over two steps, is a fresh draw: no piece of the
    scratch buffer is added twice (equal blocks) and neighbouring pieces are uncorrelated."""
    monkeypatch.setattr(DPOptimizer, "NOISE_CHUNK", 500)
    params = [nn.Parameter(torch.zeros(1700)), nn.Parameter(torch.zeros(30, 40)), nn.Parameter(torch.zeros(500))]
    opt = DPOptimizer(torch.optim.SGD(params, lr=1.0), _Sens(params), 1.0, 1.0, seed=3)
    steps = []
    for _ in range(2):
        opt.zero_grad(set_to_none=False)  # the gradient buffers are reused too
        opt.add_noise()
        steps.append(torch.cat([p.grad.flatten() for p in params]).clone())
    noise = torch.cat(steps)
    pieces = [noise[i:i + 200] for i in range(0, noise.numel() - 199, 100)]
    first = {tuple(q[:4].tolist()) for q in pieces}
    assert len(first) == len(pieces)  # no block of noise appears twice
    # consecutive 500-element blocks (the scratch size) are uncorrelated
    blocks = noise[: noise.numel() // 500 * 500].view(-1, 500)
    corr = torch.corrcoef(blocks)
    off = corr - torch.diag(torch.diag(corr))
    assert off.abs().max() < 0.25
    assert abs(noise.std().item() - 1.0) < 0.05


@pytest.mark.parametrize("method", ["instantiate", "bk"])
def test_inputs_and_output_grads_released_once_a_layer_is_processed(method):
    """A processed layer's uses no longer hold A and G (the stash keeps what the clipped sum
    needs): with per-sample gradients stashed, its activations are free before pass 1 ends."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    eng = ClippingEngine(model, max_grad_norm=0.3, method=method)
    held = []
    real_emit = eng._emit

    def emit(l):
        held.extend((l.name, u.act is not None or u.grad is not None) for u in l.uses)
        return real_emit(l)

    eng._emit = emit
    try:
        x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
        eng.backward(F.cross_entropy(model(x), y, reduction="none"))
        _matches_naive(model, x, y, 0.3)
    finally:
        eng.remove()
    assert held and not any(h for _, h in held)


def test_long_thin_per_sample_products_match_the_naive_loop():
    """A stem-like conv (T = 256 >= 8 max(p, D)) takes the transposed per-sample product."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 16 * 16, 3))
    _step_matches_naive(model, torch.randn(5, 3, 16, 16), torch.randint(0, 3, (5,)), "instantiate")


@pytest.mark.parametrize("conv,size,natural", [
    (nn.Conv2d(32, 6, 3, padding=1), (4, 4), True),  # ResNet-stage-like: many channels, small map
    (nn.Conv2d(32, 5, 3, padding=1, bias=False), (2, 2), True),  # T = 4: clipped sum by the conv, not the GEMM
    (nn.Conv2d(4, 6, 3, stride=2, padding=1), (7, 7), False),
    (nn.Conv2d(4, 6, (3, 2), stride=(1, 2), padding=(2, 1), dilation=(2, 1), groups=2), (6, 7), False),
    (nn.Conv2d(2, 3, 4, padding="same", padding_mode="reflect"), (5, 5), False),
    (nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), (11,), False),
    (nn.Conv2d(3, 4, 4, padding="same"), (5, 6), False),  # zeros, uneven: 1 before, 2 after
    (nn.Conv2d(3, 4, 3, padding=3), (4, 4), False),  # border outputs see only padding
])
def test_gram_ghost_norms_equal_the_per_sample_norms(conv, size, natural, monkeypatch):
    """Ghost norms whose A A' comes from the input's pixel Gram matrix (no unfolding), where the
    cost model picks it and forced on strides, dilation, groups, padding modes and Conv1d."""
    from dpbench.clipping.rules import _ConvRule

    torch.manual_seed(0)
    conv = conv.double()
    x = torch.randn(5, conv.in_channels, *size, dtype=torch.float64)
    g = torch.randn_like(conv(x))
    rule = type(ClippingEngine(nn.Sequential(conv), check=False)._layers[0].rule)()
    assert bool(rule._gram_bytes(conv, [x], [g])) == natural
    if not natural:
        monkeypatch.setattr(_ConvRule, "_gram_bytes", lambda self, m, a, gr: 1 << 20)
    names = [n for n in ("weight", "bias") if getattr(conv, n) is not None]
    ps = rule.per_sample(conv, [x], [g], names)
    ghost = rule.ghost_sq_norms(conv, [x], [g], names)
    for n in names:
        ref = ps[n].flatten(1).pow(2).sum(1)
        assert torch.allclose(ghost[n], ref, rtol=1e-10, atol=0), n
    c = torch.rand(5, dtype=torch.float64)
    ref = torch.einsum("b,b...->...", c, ps["weight"])
    assert torch.allclose(rule.weight_sum(conv, [x], [g], c), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["ghost", "bk", "mixed"])
def test_gram_ghost_norms_in_the_engine_match_the_naive_loop(method):
    """A ResNet-like stack whose 4x4 and 2x2 convs take Gram-matrix ghost norms, over two steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 8, 3, padding=1), nn.Flatten(), nn.Linear(32, 3)).double()
    eng = ClippingEngine(model, max_grad_norm=0.3, method=method)
    used = {}
    for l in eng._layers:
        real = l.rule._gram_aa if hasattr(l.rule, "_gram_aa") else None
        if real is not None:
            l.rule._gram_aa = lambda *a, _real=real, _name=l.name, **k: (used.__setitem__(_name, True),
                                                                        _real(*a, **k))[1]
    try:
        for step in range(2):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
            for p in model.parameters():
                p.grad = None
            eng.backward(F.cross_entropy(model(x), y, reduction="none"))
            _matches_naive(model, x, y, 0.3)
    finally:
        eng.remove()
    # the stride-1 convs on 4x4 and 2x2 maps, and the stride-2 conv on the 4x4 map (the Gram
    # matrix of the map itself, without its padding: 16 pixels, not 36)
    assert set(used) == {"2", "4", "6"}


def test_norm_rules_multiply_only_their_own_temporaries_in_place():
    """_NormRule.per_sample multiplies x_hat by G in place only when x_hat is its own buffer: a
    rule whose `normalised` returns its input (or a view of it) leaves A and G untouched."""
    from dpbench.clipping.rules import GroupNormRule

    class Passthrough(GroupNormRule):
        def normalised(self, module, x):
            return x

    class Viewing(GroupNormRule):
        def normalised(self, module, x):
            return x.view(x.shape)

    torch.manual_seed(0)
    gn = nn.GroupNorm(2, 4)
    x, g = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    for rule in (Passthrough(), Viewing()):
        a0, g0 = x.clone(), g.clone()
        ps = rule.per_sample(gn, [x], [g], ["weight", "bias"])
        assert torch.equal(x, a0) and torch.equal(g, g0)
        assert torch.allclose(ps["weight"], (a0 * g0).sum(2))
    ps = GroupNormRule().per_sample(gn, [x], [g], ["weight"])  # the usual rule: its x_hat is a fresh buffer
    assert torch.allclose(ps["weight"], (F.group_norm(x, 2) * g).sum(2), atol=1e-6)


@pytest.mark.parametrize("shape,k,s", [((2, 3, 32, 32), (16, 16), (16, 16)), ((2, 4, 20, 23), (3, 8), (2, 3)),
                                       ((2, 2, 1, 40), (1, 9), (1, 1))])
def test_row_order_unfold_equals_f_unfold(shape, k, s):
    from dpbench.clipping.rules import _unfold_rows

    x = torch.randn(shape)
    for t in (x, x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)):
        assert torch.equal(_unfold_rows(t, k, s), F.unfold(t, k, stride=s).transpose(1, 2))


@pytest.mark.parametrize("method", ["instantiate", "ghost", "bk"])
def test_patch_embedding_convs_match_the_naive_loop(method, monkeypatch):
    """Kernels with rows of >= 8 (a ViT's patch embedding, a long Conv1d, groups) unfold in row order."""
    import dpbench.clipping.rules as rules

    calls = []
    real = rules._unfold_rows
    monkeypatch.setattr(rules, "_unfold_rows", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 8, stride=8, groups=2), nn.Flatten(), nn.Linear(6 * 16, 3))
    _step_matches_naive(model, torch.randn(5, 4, 32, 32), torch.randint(0, 3, (5,)), method)
    model = nn.Sequential(nn.Conv1d(3, 4, 9, stride=2, padding=2), nn.Flatten(), nn.Linear(4 * 14, 3))
    _step_matches_naive(model, torch.randn(5, 3, 31), torch.randint(0, 3, (5,)), method)
    assert calls  # the row-order path ran


@pytest.mark.parametrize("method", ["bk", "ghost"])
def test_clipped_sums_scale_the_smaller_factor(method):
    """Clipped sums put c_i on A where A is smaller than G (a widening Linear or conv), on G otherwise."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 3, 3, stride=2), nn.Flatten(),
                          nn.Linear(3 * 9, 40), nn.Tanh(), nn.Linear(40, 3))
    eng = ClippingEngine(model, max_grad_norm=0.3, method=method, style="layer")
    try:
        x, y = torch.randn(5, 2, 8, 8, dtype=torch.float64), torch.randint(0, 3, (5,))
        model.double()
        eng.backward(F.cross_entropy(model(x), y, reduction="none"))
        ps = naive_per_sample(model, x, y)
        groups = {n: [f"{n}.weight", f"{n}.bias"] for n in ("0", "2", "4", "6")}
        ref, _ = naive_clipped(ps, groups, {g: eng.thresholds[g] for g in groups})
        assert_close({n: p.grad for n, p in model.named_parameters()}, ref, 1e-9)
    finally:
        eng.remove()
