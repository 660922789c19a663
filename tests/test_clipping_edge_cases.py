"""The examples of issue 22, each against a naive per-sample loop.

In-place ops on view outputs (A), `x += layer(x)` when autograd keeps a copy of the input (B),
an in-place LayerScale on a tensor without history (C), direct parameters indexed or
broadcast onto more dimensions (D, E), ghost-norm cancellation (F) and the order of a list of
thresholds for style="groups" (G). Every case must give the naive loop's answer or a clear
refusal that names the construct and the module.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dpbench.clipping import ClippingEngine
from dpbench.errors import UserError

from test_clipping import assert_close, naive_clipped, naive_per_sample, rel_err

pytestmark = pytest.mark.usefixtures("one_thread")

ALL_METHODS = ["instantiate", "ghost", "mixed", "bk"]


class LayerScale(nn.Module):
    """timm's LayerScale (matched by class name), with its in-place option."""

    def __init__(self, dim, inplace=False):
        super().__init__()
        self.inplace = inplace
        self.gamma = nn.Parameter(1 + 0.3 * torch.randn(dim))

    def forward(self, x):
        return x.mul_(self.gamma) if self.inplace else x * self.gamma


def check_all(model, x, y, styles=("flat", "layer"), clip_fns=("abadi", "automatic"), tol=1e-8, C=None):
    """Every method x style x clip function equals the naive loop (flat and per-layer groups)."""
    ps = naive_per_sample(model, x, y)
    names = list(ps)
    if C is None:
        C = float(sum(v.flatten(1).pow(2).sum(1) for v in ps.values()).sqrt().median())
    for style in styles:
        if style == "flat":
            groups, thr = {"all": names}, {"all": C}
        else:
            groups = {}
            for n in names:
                groups.setdefault(n.rsplit(".", 1)[0] if "." in n else "<root>", []).append(n)
            thr = {g: C for g in groups}
        for clip_fn in clip_fns:
            ref, ref_norms = naive_clipped(ps, groups, thr, clip_fn)
            for method in ALL_METHODS:
                for p in model.parameters():
                    p.grad = None
                kw = {} if style == "flat" else {"thresholds": C}
                eng = ClippingEngine(model, max_grad_norm=C, method=method, style=style, clip_fn=clip_fn,
                                     gamma=0.05, **kw)
                try:
                    norms = eng.backward(F.cross_entropy(model(x), y, reduction="none"))
                finally:
                    eng.remove()
                grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
                assert_close(grads, ref, tol)
                for g in groups:
                    assert rel_err(norms[g], ref_norms[g]) < tol, (method, style, g)


def data(shape, B=4, classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, *shape, generator=g, dtype=torch.float64),
            torch.randint(0, classes, (B,), generator=g))


# ---------------------------------------------------------------- G
def test_groups_threshold_list_follows_the_mapping_as_written():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    eng = ClippingEngine(model, style="groups", groups={"head": ["2.*"], "body": ["0.*"]}, thresholds=[0.1, 5.0])
    try:
        assert eng.thresholds == {"head": 0.1, "body": 5.0}
        assert list(eng.groups) == ["head", "body"]
    finally:
        eng.remove()
    x, y = data((5,))
    ps = naive_per_sample(model, x, y)
    groups = {"head": ["2.weight", "2.bias"], "body": ["0.weight", "0.bias"]}
    ref, _ = naive_clipped(ps, groups, {"head": 0.1, "body": 5.0})
    for p in model.parameters():
        p.grad = None
    eng = ClippingEngine(model, style="groups", groups={"head": ["2.*"], "body": ["0.*"]}, thresholds=[0.1, 5.0])
    try:
        eng.backward(F.cross_entropy(model(x), y, reduction="none"))
    finally:
        eng.remove()
    assert_close({n: p.grad for n, p in model.named_parameters()}, ref, 1e-10)


def exact_or_refused(model, x, y, match, **kw):
    """The naive loop's answer, or a UserError whose message matches `match` (construct + module)."""
    eng = ClippingEngine(model)
    try:
        eng.backward(F.cross_entropy(model(x), y, reduction="none"))
    except UserError as e:
        assert match(str(e)), str(e)
        assert "outside its module" not in str(e)
        return "refused"
    finally:
        eng.remove()
    check_all(model, x, y, **kw)
    return "exact"


# ---------------------------------------------------------------- A: in-place op on a view output
def test_inplace_relu_on_linear_view_output_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(12, 3)).double()
    check_all(model, *data((3, 5)))


def test_inplace_layerscale_on_linear_view_output_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), LayerScale(4, inplace=True), nn.ReLU(inplace=True), nn.Flatten(),
                          nn.Linear(12, 3)).double()
    check_all(model, *data((3, 5)))


class InplaceOnPartialView(nn.Module):
    """An in-place op on a slice of a layer's view output, and a layer whose output is a slice."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        h[:, :, :2].mul_(3.0)
        h = torch.tanh(h)
        return self.b(h).sum(1)


def test_inplace_op_on_part_of_a_view_output_is_exact():
    torch.manual_seed(0)
    check_all(InplaceOnPartialView().double(), *data((3, 5)))


# ---------------------------------------------------------------- B: x += layer(x)
class AddInPlace(nn.Module):
    def __init__(self, layer, pre, head_in):
        super().__init__()
        self.pre, self.layer, self.head = pre, layer, nn.Linear(head_in, 3)

    def forward(self, x):
        h = self.pre(x)
        h += self.layer(h)
        return self.head(torch.tanh(h).flatten(1))


def _b_models():
    yield "reflect", AddInPlace(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), nn.Conv2d(2, 2, 1), 50), (2, 5, 5)
    yield "same_even", AddInPlace(nn.Conv2d(2, 2, 4, padding="same"), nn.Conv2d(2, 2, 1), 50), (2, 5, 5)

    class Permuted(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre, self.layer, self.head = nn.Linear(4, 4), nn.Linear(3, 3), nn.Linear(12, 3)

        def forward(self, x):
            h = self.pre(x).transpose(1, 2)  # (B, 4, 3), not contiguous
            h += self.layer(h)
            return self.head(torch.tanh(h).flatten(1))

    yield "permuted", Permuted(), (3, 4)


@pytest.mark.parametrize("which", ["reflect", "same_even", "permuted"])
def test_add_in_place_onto_a_layer_input_is_exact_or_refused(which):
    torch.manual_seed(0)
    name, model, shape = next(m for m in _b_models() if m[0] == which)
    out = exact_or_refused(model.double(), *data(shape),
                           match=lambda msg: "in place" in msg and "'layer'" in msg)
    assert out in ("exact", "refused")


# ---------------------------------------------------------------- C: in-place LayerScale without history
def test_inplace_layerscale_above_a_frozen_stem_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), LayerScale(4, inplace=True), nn.Tanh(), nn.Flatten(),
                          nn.Linear(12, 3)).double()
    model[0].requires_grad_(False)
    check_all(model, *data((3, 5)))


def test_inplace_layerscale_on_a_frozen_view_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4, bias=True), LayerScale(4, inplace=True), nn.Flatten(),
                          nn.Linear(12, 3)).double()
    model[0].requires_grad_(False)
    check_all(model, *data((3, 5)))


# ---------------------------------------------------------------- D, E: direct parameters
class Direct(nn.Module):
    """A module holding a parameter directly, used by `use(x, p)`, then a Linear head."""

    def __init__(self, shape, use, feat):
        super().__init__()
        self.p = nn.Parameter(torch.randn(*shape))
        self.use = use
        self.head = nn.Linear(feat, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.use(x, self.p)).flatten(1))


def test_direct_parameter_indexed_before_use_is_exact():
    torch.manual_seed(0)
    model = Direct((1, 3, 4), lambda x, p: x + p[0], 12).double()
    check_all(model, *data((3, 4)))


@pytest.mark.parametrize("B,C", [(4, 2), (2, 2), (3, 3)])
def test_direct_parameter_broadcast_onto_more_dimensions_is_exact(B, C):
    torch.manual_seed(0)
    model = Direct((1, 3, 3), lambda x, p: x * p, C * 9).double()
    check_all(model, *data((C, 3, 3), B=B))
