"""CUDA-only bugs kept away on the CPU (issue 18, deliverable 7).

- Every method and style on the `meta` device: a tensor the engine creates on the CPU while
  the model is elsewhere meets a meta tensor in an elementwise op and raises. (Limits: the
  self-checks read values, so check=False; an einsum or matmul that mixes a CPU operand with
  a meta one does not raise, so this catches most, not all, misplaced tensors.)
- TF32 off around the engine's own arithmetic, and the caller's flags restored.
- Copying a model that an engine is attached to gives a clean model (no hooks, no stash).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dpbench.clipping import ClippingEngine
from dpbench.clipping.tf32 import no_tf32
from dpbench.training.optimizer import DPOptimizer

from test_clipping import CLIP_FNS, METHODS, STYLES

pytestmark = pytest.mark.usefixtures("one_thread")


class EveryRule(nn.Module):
    """One layer of every rule kind: conv, group norm, embedding, layer norm, linear, direct parameters."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.conv1d = nn.Conv1d(4, 4, 3, padding=1)
        self.emb = nn.Embedding(5, 4)
        self.pos = nn.Parameter(torch.randn(1, 16, 4))
        self.ln = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.gn(self.conv(x)))  # (B, 4, 4, 4)
        h = self.conv1d(h.flatten(2))  # (B, 4, 16)
        tok = self.emb((torch.arange(16, device=x.device) % 5).expand(x.shape[0], 16))  # (B, 16, 4)
        h = h.transpose(1, 2) + tok + self.pos
        return self.head(self.ln(h).mean(1))


def _style_kw(style):
    if style == "groups":
        return {"groups": {"convs": ["conv.*", "conv1d.*", "gn.*"], "rest": ["emb.*", "pos", "ln.*", "head.*"]}}
    return {}


@pytest.mark.parametrize("style", STYLES)
def test_every_method_and_style_runs_on_meta(style):
    for method in METHODS:
        for clip_fn in CLIP_FNS:
            model = EveryRule().to("meta")
            eng = ClippingEngine(model, max_grad_norm=1.0, method=method, style=style, clip_fn=clip_fn,
                                 check=False, **_style_kw(style))
            opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), eng, noise_multiplier=0.0,
                              expected_batch_size=3)
            x = torch.randn(3, 3, 4, 4, device="meta")
            y = torch.zeros(3, dtype=torch.long, device="meta")
            for _ in range(2):  # auto measures on the first step and follows its plan on the second
                opt.zero_grad()
                norms = opt.backward(F.cross_entropy(model(x), y, reduction="none"))
                opt.step()
                for n, p in model.named_parameters():
                    assert p.grad is not None and p.grad.is_meta, (method, style, n)
                if isinstance(norms, dict):
                    assert all(v.is_meta and v.shape == (3,) for v in norms.values()), (method, style)
            eng.remove()


def test_timm_rules_run_on_meta():
    timm_layers = pytest.importorskip("timm.layers")
    for method in METHODS:
        for same in (False, True):
            conv = timm_layers.StdConv2dSame(3, 4, 3, stride=2) if same else timm_layers.StdConv2d(3, 4, 3)
            model = nn.Sequential(conv, timm_layers.GroupNormAct(4, 2), nn.Flatten(),
                                  nn.Linear(4 * (9 if same else 36), 3)).to("meta")
            x = torch.randn(3, 3, 6, 6, device="meta")
            eng = ClippingEngine(model, method=method, check=False)
            for _ in range(2):
                model.zero_grad()
                norms = eng.backward(F.cross_entropy(model(x), torch.zeros(3, dtype=torch.long, device="meta"),
                                                     reduction="none"))
                assert norms["all"].is_meta and all(p.grad.is_meta for p in model.parameters()), method
            eng.remove()


# ------------------------------------------------------------------ TF32
def _flags():
    b = torch.backends
    return b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32


@pytest.fixture
def restore_tf32():
    before = _flags()
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("start", [(True, True), (False, True), (True, False), (False, False)])
def test_no_tf32_turns_off_and_restores(start, restore_tf32):
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = start
    with no_tf32():
        assert _flags() == (False, False)
        with no_tf32():  # nested (the engine's rules run inside its backward)
            assert _flags() == (False, False)
        assert _flags() == (False, False)
    assert _flags() == start
    with pytest.raises(ZeroDivisionError), no_tf32():
        1 / 0
    assert _flags() == start


def test_no_tf32_with_the_new_precision_api():
    # torch refuses to read the legacy flags once the new fp32_precision API was used, so this
    # runs in a fresh interpreter (it would leave this one in that state)
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from dpbench.clipping.tf32 import no_tf32\n"
        "m, c = torch.backends.cuda.matmul, torch.backends.cudnn.conv\n"
        "if not hasattr(m, 'fp32_precision'): raise SystemExit(0)\n"
        "m.fp32_precision = 'tf32'; c.fp32_precision = 'tf32'\n"
        "with no_tf32():\n"
        "    assert m.fp32_precision == 'ieee' and c.fp32_precision != 'tf32', (m.fp32_precision, c.fp32_precision)\n"
        "    x = torch.randn(4, 4); x @ x  # no mixed-API error inside\n"
        "assert (m.fp32_precision, c.fp32_precision) == ('tf32', 'tf32')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_engine_runs_rules_without_tf32_and_restores(restore_tf32, monkeypatch):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    from dpbench.clipping import rules

    seen = []

    def spy_on(name):
        orig = getattr(rules.Conv2dRule, name)

        def spy(self, *a, **k):
            seen.append((name, _flags()))
            return orig(self, *a, **k)

        monkeypatch.setattr(rules.Conv2dRule, name, spy)

    spy_on("sq_norms")
    spy_on("weighted_sum")  # the clipped sums (_emit) too
    for method in METHODS:
        model = EveryRule()
        eng = ClippingEngine(model, method=method)
        for _ in range(2):  # the first step has the self-checks, the second not
            model.zero_grad()
            eng.backward(F.cross_entropy(model(torch.randn(3, 3, 4, 4)), torch.tensor([0, 1, 2]), reduction="none"))
            assert _flags() == (True, True), method
        eng.remove()
    assert {n for n, _ in seen} == {"sq_norms", "weighted_sum"}
    assert all(f == (False, False) for _, f in seen)


# ------------------------------------------------------------------ copies of a hooked model
def _step(model, eng):
    model.zero_grad()
    eng.backward(F.cross_entropy(model(torch.randn(3, 3, 4, 4)), torch.tensor([0, 1, 2]), reduction="none"))


def test_deepcopy_of_a_hooked_model_is_clean():
    model = EveryRule()
    eng = ClippingEngine(model, method="bk")
    _step(model, eng)
    out = model(torch.randn(3, 3, 4, 4))  # a recorded forward pass, not yet backpropagated
    twin = copy.deepcopy(model)
    for _ in range(3):
        # the copy's forward and backward passes store nothing in the engine (before the fix,
        # every forward of a copy added its activations to the engine's layers)
        twin(torch.randn(3, 3, 4, 4)).sum().backward()
    assert max(len(l.uses) for l in eng._layers) == 1  # only the one forward on the original
    # the original still clips its recorded forward with its engine
    eng.backward(F.cross_entropy(out, torch.tensor([0, 1, 2]), reduction="none"))
    _step(model, eng)
    assert all(not l.uses for l in eng._layers)
    # the copy gets its own engine, which clips it; the original's engine stays untouched
    eng2 = ClippingEngine(twin, method="bk")
    _step(twin, eng2)
    assert all(not l.uses for l in eng._layers) and all(not l.uses for l in eng2._layers)
    eng2.remove()
    eng.remove()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_deepcopy_keeps_values():
    model = EveryRule()
    eng = ClippingEngine(model)
    twin = copy.deepcopy(model)
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q) and p is not q, n
    eng.remove()


def test_public_checkpoint_saver_keeps_a_hook_free_copy(tmp_path):
    """Notebook 03's on_switch callback copies the model that the engine clips."""
    from dpbench.experiments import public_pretraining as pp

    arms = pp.prepare(dataset="digits", data_root=None, model_name="mlp", model_kwargs={"hidden": [16]},
                      public_fraction=0.1, public_fractions=[], seed=0, steps=2, switch_step=1,
                      private_batch_size=8, public_batch_size=8, lr=0.01, target_epsilon=2.0, eval_every=2)
    model = pp.create_model(**arms.model_spec)
    eng = ClippingEngine(model)
    saver = pp.PublicCheckpointSaver(arms, tmp_path / "public.safetensors", {})
    saver(model, None)
    copy_ = saver.model
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in copy_.modules())
    for (n, p), q in zip(model.named_parameters(), copy_.parameters()):
        assert torch.equal(p.detach().cpu(), q.detach()) and p is not q, n
    copy_(torch.randn(4, 64)).sum().backward()
    assert all(not l.uses for l in eng._layers)
    eng.remove()
