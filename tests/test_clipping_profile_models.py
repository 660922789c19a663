"""Every model a profile names is safe to clip (issue 18, deliverable 6).

The model names are read from params/*/*.yaml when the test runs (model_name, models
entries such as "resnet18@32:256", public_model, backbone, wall_model, ...), so a model
added to a profile is checked without editing this file. Each is built at tiny size
(32 px, random weights, batch 3; a ViT or VGG narrowed where its width alone would make
the test slow: the layer types stay the same) and the engine's clipped sum is compared
with a naive loop over samples, by two methods with different norm paths (ghost, bk).
Also: subclasses of supported layers that override forward are refused, and timm's
StdConv2d / GroupNormAct (BiT's ResNet-V2) are exact under every method.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from dpbench.clipping import ClippingEngine, register_rule
from dpbench.clipping.rules import LinearRule, find_rule
from dpbench.errors import UserError
from dpbench.models import MODELS, create_model

from test_clipping import METHODS, assert_close, naive_clipped, naive_per_sample

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
#: values of model-ish keys that say where a model comes from, not which one
NOT_MODELS = {"auto", "upstream", "public", "hub", "checkpoint", "timm", "none", ""}


def profile_models() -> dict[tuple[str, str], list[str]]:
    """{(model name, its kwargs as JSON): ["NN_name/profile.yaml:key", ...]} over every profile.

    A key's kwargs are those of its sibling `<key>_kwargs` (model_name: model_kwargs), so a
    model is checked as the profile builds it (a ViT with 4 px patches, resized inputs, ...).
    """
    out: dict[tuple[str, str], list[str]] = {}
    for path in sorted(ROOT.glob("params/*/*.yaml")):
        cfg = yaml.safe_load(path.read_text()) or {}
        for key, val in cfg.items():
            if not ("model" in key or key == "backbone") or key.endswith(("_kwargs", "_prefer", "_methods")):
                continue
            kw = cfg.get(key.replace("_name", "") + "_kwargs") or {}
            for v in val if isinstance(val, list) else [val]:
                if not isinstance(v, str):
                    continue
                name = v.split("@")[0].strip()
                if name.lower() in NOT_MODELS or "/" in name or name.endswith((".pt", ".safetensors", ".pth")):
                    continue
                spec = (name, json.dumps(kw if isinstance(kw, dict) else {}, sort_keys=True))
                out.setdefault(spec, []).append(f"{path.parent.name}/{path.name}:{key}")
    return out


def _timm_kwargs(name: str) -> dict:
    # Narrowed where width or depth alone would make a CPU test slow; same layer types.
    if name.startswith(("vit_", "deit_", "beit_")):
        return {"depth": 2}
    if name.startswith("vgg"):
        return {"mlp_ratio": 1 / 64}  # the 4096-wide ConvMlp head (100M parameters)
    return {}


def build_tiny(name: str, kwargs: dict | None = None) -> nn.Module:
    torch.manual_seed(0)
    kw = {**(kwargs or {}), "zero_head": False}
    if name == "tiny_cnn":
        from dpbench.training.bench import TinyCNN

        model = TinyCNN(3)
    elif name in MODELS:
        model = create_model(name, num_classes=3, img_size=32, **kw)
    else:
        import timm

        if not timm.is_model(name):
            raise AssertionError(f"{name!r} is neither a dpbench model nor a timm model")
        model = create_model(name, num_classes=3, img_size=32, **{**_timm_kwargs(name), **kw})
    with torch.no_grad():  # timm zeroes the last norm of each block, which would zero the block's grads
        for m in model.modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(1 + 0.2 * torch.randn_like(m.weight))
                m.bias.copy_(0.1 * torch.randn_like(m.bias))
    return model.eval()


def test_profiles_name_models():
    specs = profile_models()
    # the discovery reads the real keys (a renamed key would silently shrink the check)
    assert {"resnet18", "small_cnn"} <= {n for n, _ in specs}, specs
    assert any(":models" in w for ws in specs.values() for w in ws)
    assert any(kw != "{}" for _, kw in specs)  # kwargs are read too


@pytest.mark.parametrize("name,kwargs", sorted(profile_models()), ids=lambda v: v.replace(" ", ""))
def test_profile_model_matches_naive_loop(name, kwargs):
    pytest.importorskip("timm")
    t0 = time.perf_counter()
    model = build_tiny(name, json.loads(kwargs))
    torch.manual_seed(1)
    x, y = torch.randn(3, 3, 32, 32), torch.randint(0, 3, (3,))
    ps = naive_per_sample(model, x, y)
    norms = sum(v.flatten(1).pow(2).sum(1) for v in ps.values()).sqrt()
    C = float(norms.median())  # one sample clipped, one not
    ref, _ = naive_clipped(ps, {"all": list(ps)}, {"all": C})
    for method in ("ghost", "bk"):
        model.zero_grad(set_to_none=True)
        eng = ClippingEngine(model, max_grad_norm=C, method=method, check=method == "bk")
        try:
            got = eng.backward(F.cross_entropy(model(x), y, reduction="none"))
            assert torch.allclose(got["all"], norms, rtol=1e-3), (method, got["all"], norms)
            assert_close({n: p.grad for n, p in model.named_parameters() if p.requires_grad}, ref, 2e-4)
        finally:
            eng.remove()
    assert time.perf_counter() - t0 < 60, f"{name} took too long for a tiny-size check"


# ------------------------------------------------------------------ subclasses overriding forward
class ScaledLinear(nn.Linear):
    """A Linear subclass whose forward differs from nn.Linear's: the Linear rule would be wrong."""

    def forward(self, x):
        return F.linear(x, 2 * self.weight, self.bias)


class PlainLinear(nn.Linear):
    """A subclass that keeps nn.Linear's forward: the Linear rule is exact for it."""


def _net(layer):
    torch.manual_seed(0)
    return nn.Sequential(layer, nn.ReLU(), nn.Linear(4, 3)).double()


def test_subclass_overriding_forward_is_refused_at_build():
    model = _net(ScaledLinear(5, 4))
    with pytest.raises(UserError, match=r"'0' .*ScaledLinear.* overrides forward.*register a rule") as e:
        ClippingEngine(model, check=False)
    assert "\n" not in str(e.value)
    ClippingEngine(_net(PlainLinear(5, 4))).remove()  # same forward: accepted


class ScaledConv(nn.Conv2d):
    """Overrides _conv_forward (which nn.Conv2d's forward calls), not forward: the Conv2d rule would be wrong."""

    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, 2 * weight, bias)


def test_subclass_overriding_conv_forward_is_refused_at_build():
    torch.manual_seed(0)
    model = nn.Sequential(ScaledConv(3, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 3)).double()
    with pytest.raises(UserError, match=r"'0' .*ScaledConv.* overrides _conv_forward.*register a rule"):
        ClippingEngine(model, check=False)


def test_subclass_with_its_own_rule_is_accepted():
    from dpbench.clipping import rules

    @register_rule(ScaledLinear)
    class ScaledLinearRule(LinearRule):
        def capture(self, module, inputs, output, names):
            return 2 * inputs[0]  # y = (2W) x: the weight's gradient is G' (2x)

    try:
        model = _net(ScaledLinear(5, 4))
        assert find_rule(model[0]) is ScaledLinearRule
        x, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
        ps = naive_per_sample(model, x, y)
        ref, _ = naive_clipped(ps, {"all": list(ps)}, {"all": 0.5})
        for method in METHODS:
            model.zero_grad(set_to_none=True)
            eng = ClippingEngine(model, max_grad_norm=0.5, method=method)
            eng.backward(F.cross_entropy(model(x), y, reduction="none"))
            assert_close({n: p.grad for n, p in model.named_parameters()}, ref, 1e-9)
            eng.remove()
    finally:
        rules._RULES.pop(ScaledLinear)


# ------------------------------------------------------------------ timm's weight-standardised conv, norm+act
def _bit_net(same=False):
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    conv = timm_layers.StdConv2dSame(3, 8, 3, stride=2, bias=True) if same else timm_layers.StdConv2d(3, 8, 3)
    side = 4 if same else 8
    model = nn.Sequential(conv, timm_layers.GroupNormAct(8, 4), nn.Flatten(), nn.Linear(8 * side * side, 3))
    with torch.no_grad():
        model[1].weight.copy_(1 + 0.3 * torch.randn(8))
        model[1].bias.copy_(0.3 * torch.randn(8))
    return model.double()


@pytest.mark.parametrize("same", [False, True])
@pytest.mark.parametrize("style", ["flat", "layer"])
def test_stdconv_groupnormact_every_method_exact(same, style):
    model = _bit_net(same)
    torch.manual_seed(1)
    x, y = torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2])
    ps = naive_per_sample(model, x, y)
    names = list(ps)
    C = float(sum(v.flatten(1).pow(2).sum(1) for v in ps.values()).sqrt().median())
    if style == "flat":
        groups, thr = {"all": names}, {"all": C}
    else:
        layers = {}
        for n in names:
            layers.setdefault(n.rsplit(".", 1)[0], []).append(n)
        groups, thr = layers, {g: C / len(layers) ** 0.5 for g in layers}
    ref, _ = naive_clipped(ps, groups, thr)
    for method in METHODS:  # check=True: the engine's own self-checks pass too
        model.zero_grad(set_to_none=True)
        eng = ClippingEngine(model, max_grad_norm=C, method=method, style=style)
        eng.backward(F.cross_entropy(model(x), y, reduction="none"))
        assert_close({n: p.grad for n, p in model.named_parameters()}, ref, 1e-9)
        eng.remove()


def test_groupnormact_with_dropout_is_refused():
    timm_layers = pytest.importorskip("timm.layers")
    model = nn.Sequential(nn.Conv2d(3, 8, 3), timm_layers.GroupNormAct(8, 4, drop_layer=nn.Dropout))
    with pytest.raises(UserError, match="dropout"):
        ClippingEngine(model)


def test_other_timm_subclasses_are_refused():
    timm_layers = pytest.importorskip("timm.layers")
    # ScaledStdConv2d standardises with a learned gain: no rule, so refused (not the Conv2d rule)
    model = nn.Sequential(timm_layers.ScaledStdConv2d(3, 4, 3), nn.Flatten())
    with pytest.raises(UserError, match="ScaledStdConv2d"):
        ClippingEngine(model)


@pytest.mark.parametrize("groups,same", [(1, False), (2, False), (2, True)])
def test_stdconv_ghost_norms_match_instantiation(groups, same):
    timm_layers = pytest.importorskip("timm.layers")
    from dpbench.clipping.rules_timm import StdConv2dRule

    torch.manual_seed(3)
    cls = timm_layers.StdConv2dSame if same else timm_layers.StdConv2d
    conv = cls(4, 6, 3, stride=2, groups=groups, bias=True).double()
    x = torch.randn(5, 4, 9, 9, dtype=torch.float64)
    g = torch.randn_like(conv(x))
    rule = StdConv2dRule()
    ghost = rule.ghost_sq_norms(conv, [x], [g], ["weight", "bias"])
    inst = rule.per_sample(conv, [x], [g], ["weight", "bias"])
    for n in ("weight", "bias"):
        assert torch.allclose(ghost[n], inst[n].flatten(1).pow(2).sum(1), rtol=1e-10), n
    # the instantiated per-sample gradient is autograd's, one sample at a time
    for i in range(2):
        ref = torch.autograd.grad(conv(x[i:i + 1]), conv.weight, g[i:i + 1])[0]
        assert torch.allclose(inst["weight"][i], ref, rtol=1e-10, atol=1e-12)
    # the engine's ghost method takes this path (no per-sample gradients) and gets the same norms
    model = nn.Sequential(conv)
    eng = ClippingEngine(model, method="ghost", check=False)
    norms = eng.backward(model(x).mul(g).flatten(1).sum(1))
    assert eng.layer_table()[0]["method"] == "ghost"
    ref = (inst["weight"].flatten(1).pow(2).sum(1) + inst["bias"].pow(2).sum(1)).sqrt()
    assert torch.allclose(norms["all"], ref, rtol=1e-10)
    eng.remove()
