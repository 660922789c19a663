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
