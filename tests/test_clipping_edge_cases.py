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
    reflect = nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")
    yield "reflect", AddInPlace(reflect, nn.Conv2d(2, 2, 1), 50), (2, 5, 5)
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


@pytest.mark.parametrize("use,shape,xshape", [
    (lambda x, p: x * p, (3, 1, 1), (3, 2, 2)),                               # (C, 1, 1) onto (B, C, H, W)
    (lambda x, p: torch.cat([p.expand(x.shape[0], -1, -1), x], 1), (1, 1, 4), (2, 4)),  # cls token
    (lambda x, p: x.clone().add_(p[:, :2]), (1, 3, 4), (2, 4)),               # in place onto the batch
    (lambda x, p: torch.where(x > 0, x, p * 2.0), (1, 2, 4), (2, 4)),
    (lambda x, p: x * (p[0] + 1).exp() - p.transpose(1, 2).reshape(1, 2, 3).mean(), (1, 3, 2), (3, 2)),
    (lambda x, p: x + p.expand_as(x) + p, (1, 2, 3), (2, 3)),
])
def test_direct_parameter_broadcasting_uses_are_exact(use, shape, xshape):
    torch.manual_seed(0)
    x, y = data(xshape)
    with torch.no_grad():
        feat = use(x, torch.randn(*shape, dtype=torch.float64)).flatten(1).shape[1]
    check_all(Direct(shape, use, feat).double(), x, y)


def test_direct_parameter_used_twice_and_module_called_twice_is_exact():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.d = Direct((1, 3, 4), lambda x, p: x + p[0] * x, 12)

        def forward(self, x):
            return self.d(x) + self.d(x * 0.5)

    torch.manual_seed(0)
    check_all(Twice().double(), *data((3, 4)))


@pytest.mark.parametrize("use,shape", [
    (lambda x, p: x @ p[0], (1, 4, 4)),
    (lambda x, p: F.linear(x, p[0]), (1, 4, 4)),
    (lambda x, p: x + p.repeat(x.shape[0], 1, 1), (1, 3, 4)),
    (lambda x, p: x + p.mul_(1.0), (1, 3, 4)),
    (lambda x, p: (x.transpose(0, 1) + p).transpose(0, 1), (1, 1, 4)),  # batch on axis 1, B != 3
])
def test_unsupported_direct_parameter_uses_are_refused_at_the_forward_pass(use, shape):
    torch.manual_seed(0)
    model = Direct(shape, use, 12).double()
    x, y = data((3, 4), B=4)
    eng = ClippingEngine(model)
    try:
        with pytest.raises(UserError) as info:
            model(x)  # refused by the forward pass, before any backward
        msg = str(info.value)
        assert "direct parameter 'p' of module '<root>' (Direct)" in msg and "dpbench.models.freeze" in msg
        assert isinstance(model.p, nn.Parameter) and model.p.grad is None  # restored, untouched
    finally:
        eng.remove()


def test_direct_parameter_broadcast_over_a_batch_axis_that_is_not_first_is_caught_by_the_check():
    # x.transpose(0, 1) + p with B equal to the token count: the shapes cannot tell that the
    # batch moved to axis 1; the first step's per-sample check refuses it.
    torch.manual_seed(0)
    model = Direct((1, 3, 4), lambda x, p: (x.transpose(0, 1) + p).transpose(0, 1), 12).double()
    x, y = data((3, 4), B=3)
    eng = ClippingEngine(model)
    try:
        with pytest.raises(UserError, match=r"'p' \(module '<root>', Direct\).*per-sample reference"):
            eng.backward(F.cross_entropy(model(x), y, reduction="none"))
    finally:
        eng.remove()


def test_direct_parameter_returned_alone_is_refused():
    class Table(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(1, 3, 4))

        def forward(self, x):
            return self.w * 2

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.t = Table()
            self.head = nn.Linear(12, 3)

        def forward(self, x):
            return self.head((x + self.t(x)).flatten(1))

    model = Net().double()
    eng = ClippingEngine(model)
    try:
        with pytest.raises(UserError, match="'t.w' of module 't'.*returned by its module"):
            model(data((3, 4))[0])
    finally:
        eng.remove()


# ---------------------------------------------------------------- the per-sample self-check
def test_self_check_sees_per_sample_misattribution_and_check_false_skips_it():
    from dpbench.clipping import LayerRule, register_rule
    from dpbench.clipping.rules import _RULES

    class Gain(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.ones(4) * 1.5)

        def forward(self, x):
            return x * self.g

    @register_rule(Gain)
    class ShiftedRule(LayerRule):
        """Right sum, wrong attribution: each sample gets its neighbour's gradient."""
        param_names = ("g",)

        def per_sample(self, module, acts, grads, names):
            ps = sum((a * g).reshape(g.shape[0], -1, g.shape[-1]).sum(1) for a, g in zip(acts, grads))
            return {"g": ps.roll(1, 0)}

    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 4), Gain(), nn.Tanh(), nn.Linear(4, 3)).double()
        x, y = data((5,), B=5)
        eng = ClippingEngine(model)
        with pytest.raises(UserError, match=r"'1\.g' \(module '1', Gain\).*per-sample reference"):
            eng.backward(F.cross_entropy(model(x), y, reduction="none"))
        eng.remove()
        eng = ClippingEngine(model, check=False)  # documented: nothing is checked
        eng.backward(F.cross_entropy(model(x), y, reduction="none"))
        eng.remove()
    finally:
        _RULES.pop(Gain, None)


def test_self_check_replays_dropout():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 3)).double().train()
    x, y = data((5,), B=6)
    eng = ClippingEngine(model, max_grad_norm=0.1)
    try:
        eng.backward(F.cross_entropy(model(x), y, reduction="none"))  # no false alarm
        assert eng._checked
    finally:
        eng.remove()


# ---------------------------------------------------------------- F: cancellation in ghost norms
class Cancel(nn.Module):
    """Two identical tokens whose output gradients nearly cancel: G'A is tiny, A A' * G G' is not."""

    def __init__(self, eps):
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)
        self.eps = eps

    def forward(self, x):
        h = self.lin(torch.stack([x, x], 1))
        return self.head(h[:, 0] - (1 - self.eps) * h[:, 1])


@pytest.mark.parametrize("eps", [1e-4, 1e-7])
def test_ghost_norm_under_cancellation_matches_instantiation(eps):
    torch.manual_seed(0)
    model = Cancel(eps).double()
    x, y = data((6,), B=5)
    ps = naive_per_sample(model, x, y)
    ref = ps["lin.weight"].flatten(1).norm(dim=1)
    out = {}
    for method in ("ghost", "instantiate"):
        eng = ClippingEngine(model, method=method, style="layer", max_grad_norm=1.0)
        try:
            out[method] = eng.backward(F.cross_entropy(model(x), y, reduction="none"))["lin"]
        finally:
            eng.remove()
        for p in model.parameters():
            p.grad = None
    ref_layer = (ref.pow(2) + ps["lin.bias"].pow(2).sum(1)).sqrt()
    for method in out:
        assert rel_err(out[method], ref_layer) < 1e-9, (method, rel_err(out[method], ref_layer))


# ---------------------------------------------------------------- found by the property test
class EmbedConv1d(nn.Module):
    """Conv1d on a transposed embedding with one token: the CPU weight-gradient kernel refused
    the odd strides of its size-1 axes ("grad_weight must be contiguous")."""

    def __init__(self):
        super().__init__()
        self.e, self.c, self.h = nn.Embedding(3, 2), nn.Conv1d(2, 1, 2, padding=1), nn.Linear(2, 3)

    def forward(self, x):
        return self.h(self.c(self.e(x).transpose(1, 2)).transpose(1, 2).flatten(1))


def test_conv1d_on_a_transposed_single_token_input():
    torch.manual_seed(0)
    check_all(EmbedConv1d().double(), torch.tensor([[1], [0], [2]]), torch.tensor([2, 0, 1]))


@pytest.mark.parametrize("kw", [{"dynamic_img_size": True}, {"reg_tokens": 2, "no_embed_class": True}])
def test_timm_vit_token_variants_are_exact(kw):
    # dynamic_img_size resamples pos_embed with F.interpolate (an op on the parameter alone,
    # followed per sample); reg_tokens + no_embed_class add, then concatenate, the tokens.
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, depth=1,
                              **kw).double().eval()
    check_all(model, *data((3, 32, 32), B=3), styles=("flat",), clip_fns=("abadi",))


class _Checkpointed(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.a, self.b, self.reentrant = nn.Linear(5, 8), nn.Linear(8, 3), reentrant

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(lambda t: self.b(torch.tanh(t)), self.a(x), use_reentrant=self.reentrant)


def test_activation_checkpointing_exact_or_one_line_refusal():
    """Non-reentrant checkpointing is exact; the reentrant one (incompatible with autograd.grad) is a UserError."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    model = _Checkpointed(False).double()
    ps = naive_per_sample(model, x, y)
    ref, _ = naive_clipped(ps, {"all": list(ps)}, {"all": 0.5})
    eng = ClippingEngine(model, max_grad_norm=0.5, method="bk")
    eng.backward(F.cross_entropy(model(x), y, reduction="none"))
    assert_close({n: p.grad for n, p in model.named_parameters()}, ref, 1e-9)
    eng.remove()
    model.reentrant = True
    model.zero_grad(set_to_none=True)
    eng = ClippingEngine(model, max_grad_norm=0.5, method="bk")
    with pytest.raises(UserError, match="use_reentrant=False") as e:
        eng.backward(F.cross_entropy(model(x), y, reduction="none"))
    assert "\n" not in str(e.value)


def test_parametrized_weight_is_refused_at_build_in_one_line():
    conv = nn.Conv2d(3, 4, 3)
    torch.nn.utils.parametrizations.weight_norm(conv)
    with pytest.raises(UserError, match=r"'0.parametrizations.weight.original0' is reparametrised.*remove_parametrizations") as e:
        ClippingEngine(nn.Sequential(conv))
    assert "\n" not in str(e.value)


class _ChannelScale(nn.Module):
    """Another library's 'LayerScale' over the channels of NCHW: same name as timm's, different forward."""

    def __init__(self, c):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((c, 1, 1), 0.5))

    def forward(self, x):
        return x * self.gamma


_ChannelScale.__name__ = _ChannelScale.__qualname__ = "LayerScale"


def test_a_layerscale_by_name_that_is_not_timms_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _ChannelScale(4), nn.Flatten(), nn.Linear(4 * 36, 2))
    with pytest.raises(UserError, match="named LayerScale but its gamma"):
        ClippingEngine(model, check=False)
