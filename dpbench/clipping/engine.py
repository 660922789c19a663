"""The clipping engine: per-sample gradient norms and clipped sums for one model.

How one `backward(losses)` works
--------------------------------
Forward hooks on every module that owns trainable parameters keep its input A (no copy;
autograd keeps the same tensor) and register a hook on its *output tensor*, which receives
the output gradient G. Tensor hooks (unlike `register_full_backward_hook`) survive in-place
ops that follow the module, such as timm ResNet's `ReLU(inplace=True)` and `x += shortcut`:
a hook registered before an in-place op receives the gradient of the pre-op value. That
holds for outputs that are not views; an in-place op on a view (`F.linear` with a bias on a
3-D input returns one) moves it onto a new autograd node, so for a view output the hook goes
on its base's current node and G is cut out of the base's gradient. Whether a layer's output
is an anchor (below: nothing under it needs gradients) is decided by a forward pre-hook,
before the module runs, since an in-place module (LayerScale(inplace=True)) gives its input
a history. A kept input A that is changed in place later (`x += layer(x)` where autograd
saved a copy) is detected by its version counter and refused at the end of the forward pass.
Direct parameters (held by a module without a rule) are followed op by op during their
module's forward pass (`_DirectUses`): supported broadcasting uses are exact, others refused.

Pass 1 is `torch.autograd.grad(sum_i loss_i, anchors)`, where the anchors are the gradient
edges of the lowest hooked layers' outputs (and the per-sample leaves of direct parameters). It propagates output gradients through the network
but computes no parameter gradient and writes nothing into `.grad`, so raw gradients never
appear. As each layer's G arrives, its rule gives per-sample squared norms (ghost norm or
instantiation), added to its group's accumulator. When every layer of a group is done, the
group's clip factors are known and each of its layers' clipped sums sum_i c_i g_i is formed
from the stored A and G (one GEMM / one weight-gradient convolution) and added to `.grad`;
A and G are then freed. With per-layer (or per-device) groups this happens as soon as
backpropagation leaves the layer (He et al. 2023); with flat clipping at the end of pass 1.
That is book-keeping (Bu et al.): one backward pass.

Methods
-------
- instantiate: per-sample gradients for every layer; norms and the clipped sum from them.
- ghost: ghost norms for every layer that has a matmul form; in the flat style a second
  backward of sum_i c_i loss_i forms the clipped sum (the classic ghost clipping); in the
  other styles a single loss weight cannot express per-group factors, so the clipped sums
  are formed from A and G as above.
- mixed: like ghost, but per layer ghost only when 2 T^2 < p D (decided on the first batch).
- bk: the mixed norm rule, clipped sums from A and G, no second backward.
- auto: like bk (one backward pass), but on the first logical batch it *measures*, per
  layer, the time and the stashed memory of each rule (ghost norm + clipped sum from A and G;
  instantiated per-sample gradients, which are then all it stashes) and keeps the fastest.
  With `memory_budget` (bytes of stashed A, G or per-sample gradients, over all layers) it
  switches layers to rules that stash less, losing the least time per byte saved; in the flat
  style a layer may finally stash nothing and get its clipped sum from a second backward
  restricted to such layers. `layer_table()` shows the choice and the measurements. A rule
  whose temporaries would exceed MEASURE_SLACK x the layer's stash (and 1 MiB) or the budget is
  not measured, so that measuring never sets the run's memory peak. The choice is cached per
  process by architecture (model class, trainable layers and their input shapes, batch size
  rounded up to a power of two, style, budget, autocast, device type): an engine built later
  on the same architecture reuses it without measuring (`layer_table()` shows the first
  engine's measurements). `dpbench.clipping.engine.clear_auto_cache()` forgets it.

Mixed precision: squared norms and clip factors are float32 (at least); A and G are cast to
one dtype, float32 when it is a 16-bit float, so norms neither overflow above 256 nor
underflow below 6e-8 in float16. Forward passes under torch.autocast are supported; the
self-checks replay them under the same autocast and allow bfloat16-sized errors.

Parameters used more than once in a forward pass (a module called twice) are exact: the
rules sum per-sample gradients over uses before the norm (ghost norms include the cross
terms). A parameter owned by two modules (tied weights) is refused.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.utils.parametrize  # noqa: F401 (ParametrizationList, for a clear refusal)
from torch.autograd.graph import get_gradient_edge
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import UserError
from .clipfns import check_clip_fn, clip_factors
from .grouping import STYLES, make_groups, resolve_thresholds, _check_positive
from .rules import HALF, DirectParamsRule, check_forward, find_rule, ghost_is_cheaper
from .tf32 import no_tf32
from .rules import CHUNK_BYTES

METHODS = ("auto", "instantiate", "ghost", "mixed", "bk")
ROOT = "<root>"
#: auto's candidates: ghost norms and instantiation (both stash for the clipped sum), and in
#: the flat style "recompute" (no stash; clipped sum by a second backward over such layers)
RECOMPUTE = "recompute"
_clock = time.perf_counter  # auto's timer (tests replace it)
#: auto measures a rule on a layer only if its temporaries stay within this many times the
#: layer's stashed A and G (or 1 MiB)
MEASURE_SLACK = 8
#: auto's choices per architecture and input shapes, shared by the engines of this process:
#: {signature: {layer name: (method, pass2, measured, dims)}}. A new engine on the same model
#: class, trainable layers, input shapes, batch-size bucket, style and budget reuses the
#: choice instead of measuring again. clear_auto_cache() empties it.
_AUTO_CACHE: dict[tuple, dict[str, tuple]] = {}


def clear_auto_cache() -> None:
    """Forget auto's cached per-layer choices (the next engine measures again)."""
    _AUTO_CACHE.clear()


def _subnormal_atol(p: torch.Tensor) -> float:
    """The error a float16 gradient of p may carry in norm from entries below float16's normal range."""
    return 6.1e-5 * math.sqrt(p.numel()) * 2 ** -10 if p.dtype == torch.float16 else 0.0


def _only(module, hook):
    """`hook`, run only when called on `module` itself.

    copy.deepcopy (or copy.copy) of a model copies its hook dictionaries, and with them these
    hooks, which still point at this engine: a copy's forward passes would store activations
    in the engine's layers (they pile up, and corrupt its next backward). On a copy they do
    nothing, so a copied model is a plain model; give it its own engine to clip it.
    """

    def run(mod, *args, **kwargs):
        if mod is module:
            return hook(mod, *args, **kwargs)
        return None

    return run


class _Use:
    """One call of a hooked module during the forward pass."""

    __slots__ = ("act", "grad", "leaves", "anchor", "view", "version", "mode")

    def __init__(self, act=None):
        self.act = act
        self.grad = None
        self.leaves: list = []
        self.anchor = None
        self.view = None  # (base size, base stride, size, stride, offset) when G is cut from a base
        self.version = None  # the kept input's version counter when the module started
        self.mode = None  # _DirectUses of a direct-parameter call


# Broadcasting ops through which a direct parameter may meet the batch (see _DirectUses).
_BCAST = {"add", "sub", "mul", "div", "true_divide", "multiply", "subtract", "where", "addcmul", "addcdiv",
          "maximum", "minimum", "lerp", "expand", "expand_as", "broadcast_to", "__add__", "__radd__", "__sub__",
          "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__", "rsub"}
_BCAST_INPLACE = {"add_", "sub_", "mul_", "div_", "__iadd__", "__isub__", "__imul__", "__itruediv__"}
_INPLACE_DUNDER = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__ipow__", "__imatmul__",
                   "__iand__", "__ior__", "__ixor__", "__imod__", "__ilshift__", "__irshift__"}


class _DirectUses(TorchFunctionMode):
    """Follows a module's direct parameters through its forward pass, op by op.

    Each parameter p is seen as a detached tensor (no raw gradient can reach p) and stands
    for B per-sample copies, held as `rep` = a (B, *p.shape) leaf. An op on tensors computed
    from p alone (and constants) is mapped over the copies with torch.func.vmap. A broadcasting
    op (_BCAST) whose result has the batch first, and in which each p-derived operand is
    broadcast over that axis, gets copy i for sample i: exact per-sample gradients. Any other
    op that mixes p with the batch, or changes p in place, is refused with a UserError.
    """

    def __init__(self, engine, layer, B):
        super().__init__()
        self.engine, self.layer, self.B = engine, layer, B
        self.tracked: dict[int, tuple] = {}  # id(seen tensor) -> (tensor, rep (B, *shape), param name)
        self.suspended: list[bool] = []  # per running child: was the mode popped for it

    def add(self, seen, rep, pname):
        self.tracked[id(seen)] = (seen, rep, pname)

    def _get(self, a):
        e = self.tracked.get(id(a))
        return e if e is not None and e[0] is a else None

    def _touches(self, args, kwargs):
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor):
                if self._get(a) is not None:
                    return True
            elif isinstance(a, (list, tuple)):
                if any(isinstance(b, torch.Tensor) and self._get(b) is not None for b in a):
                    return True
        return False

    def refuse(self, pname, what):
        l = self.layer
        full = l.full.get(pname, pname)
        raise UserError(
            f"direct parameter {full!r} of module {l.name!r} ({type(l.module).__name__}) is {what}; per-sample "
            "gradients can follow a direct parameter only through ops on it alone (indexing, reshapes, arithmetic "
            "with constants) and then broadcasting ops over the batch axis (x + p, x * p, p.expand(B, ...), "
            "torch.where); rewrite the forward that way, freeze it with dpbench.models.freeze(model, "
            f"[{full!r}]), or move it into a module with a rule (@dpbench.clipping.register_rule)")

    def _aligned(self, t, rep, R):
        # rep is (B, *t.shape); t broadcasts over the batch axis of an R-dim result.
        if t.dim() == R:
            return rep.reshape(self.B, *t.shape[1:])
        return rep.reshape(self.B, *([1] * (R - t.dim() - 1)), *t.shape)

    def _broadcasts(self, t, R):
        return t.dim() < R or (t.dim() == R and t.shape[0] == 1)

    def _substitute(self, flat, spec, hits, R):
        new = list(flat)
        for i in hits:
            new[i] = self._aligned(flat[i], self._get(flat[i])[1], R)
        return tree_unflatten(new, spec)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._touches(args, kwargs):
            return func(*args, **kwargs)
        flat, spec = tree_flatten((args, kwargs))
        hits = [i for i, a in enumerate(flat) if isinstance(a, torch.Tensor) and self._get(a) is not None]
        others = [a for i, a in enumerate(flat) if isinstance(a, torch.Tensor) and i not in hits]
        pname = self._get(flat[hits[0]])[2]
        name = getattr(func, "__name__", str(func))
        if name in _BCAST_INPLACE and hits[0] != 0 and isinstance(flat[0], torch.Tensor):
            target = flat[0]  # x += p: in place on a batch tensor
            R = target.dim()
            if R >= 1 and target.shape[0] == self.B and all(self._broadcasts(flat[i], R) for i in hits):
                a, k = self._substitute(flat, spec, hits, R)
                return func(*a, **k)
            self.refuse(pname, f"added in place by {name} to a tensor whose first axis is not the batch")
        if name == "__setitem__":
            self.refuse(pname, "written by an indexed assignment (x[...] = ...)")
        if (name.endswith("_") and not name.endswith("__")) or name in _INPLACE_DUNDER or "out" in kwargs:
            self.refuse(pname, f"changed in place by {name}")
        res = func(*args, **kwargs)
        outs, out_spec = tree_flatten(res)
        if not any(isinstance(t, torch.Tensor) for t in outs):
            return res
        if name in _BCAST and len(outs) == 1 and isinstance(outs[0], torch.Tensor):
            R = outs[0].dim()
            if R >= 1 and outs[0].shape[0] == self.B and all(self._broadcasts(flat[i], R) for i in hits):
                a, k = self._substitute(flat, spec, hits, R)
                return func(*a, **k)
        if any(t.requires_grad or (t.dim() >= 1 and t.shape[0] == self.B) for t in others):
            self.refuse(pname, f"combined with the batch by {name}, which does not broadcast it over the batch axis")

        def per_copy(*vals):
            new = list(flat)
            for i, v in zip(hits, vals):
                new[i] = v
            a, k = tree_unflatten(new, spec)
            return func(*a, **k)

        try:
            reps = torch.func.vmap(per_copy)(*[self._get(flat[i])[1] for i in hits])
        except UserError:
            raise
        except Exception as e:  # an op vmap cannot map: refuse rather than guess
            self.refuse(pname, f"used by {name}, which cannot be followed per sample ({type(e).__name__})")
        for t, r in zip(outs, tree_flatten(reps)[0]):
            if isinstance(t, torch.Tensor):
                self.add(t, r, pname)
        return res


class _Layer:
    """A module that owns trainable parameters, with its rule and per-step state."""

    def __init__(self, name, module, rule, params: dict, kind: str):
        self.name = name
        self.module = module
        self.rule = rule
        self.params = params  # local name -> Parameter (trainable only)
        self.names = list(params)
        self.kind = kind  # "rule" | "direct"
        self.full = {n: (f"{name}.{n}" if name != ROOT else n) for n in self.names}
        self.method: str | None = None
        self.dims: tuple | None = None
        self.uses: list[_Use] = []
        self.processed = False
        self.stash = None
        self.groups: set[str] = set()
        self.clipped: list[str] = []
        self.max_uses = 0
        self.pending = None
        self.pre = None  # (input had no history, input, its version) from the forward pre-hook
        self.pass2 = False  # clipped sum by the second backward (auto under a memory budget)
        self.measured: dict | None = None  # auto: {rule: (seconds, stashed bytes)} on the first batch

    def complete(self) -> bool:
        if self.kind == "direct":
            return all(u.grad is not None and len(u.grad) == len(self.names) for u in self.uses)
        return all(u.grad is not None for u in self.uses)


class ClippingEngine:
    """Per-sample clipping for one model. See the module docstring for how it works.

    Args:
        model: the network; BatchNorm is refused (it mixes samples).
        max_grad_norm: C. Flat style: the threshold. Other styles: default per-group
            threshold C/sqrt(K) for K groups (K counts trainable layers for style="layer").
        method: "auto" (bk, with each layer's rule measured on the first batch and cached per
            architecture), "instantiate", "ghost", "mixed" or "bk". All give the same
            gradients up to float error.
        style: "flat", "layer", "groups" or "device".
        clip_fn: "abadi" (min(1, C/||g||)) or "automatic" (C/(||g|| + gamma)).
        gamma: the automatic clipping stability constant.
        thresholds: per-group thresholds (non-flat styles): a float for every group, a list in
            group order or a dict {group: C_k}. Default C/sqrt(K).
        groups: style="groups": {group_name: [fnmatch patterns on parameter names]}.
        placement: style="device": {parameter name or pattern: stage}; None groups by
            `param.device`. Each group's norm is computed on its own device.
        audit: enables fault flags for privacy auditing (never for real training).
        unclipped_layer: with audit=True, this layer's per-sample gradients are summed without
            clipping and left out of every norm.
        check: on the first backward, (1) compare the sum of per-sample gradients with
            autograd's gradient (one extra backward), to catch parameters used where their
            module's hooks do not see them, and (2) compare every clipped parameter's
            per-sample norm on up to 3 samples with a reference that replays the forward pass
            on the bare model (one extra forward, two small backwards per sample), to catch
            per-sample misattribution. check=False skips both: a rule that does not match a
            module's forward then gives silently wrong per-sample gradients.
        memory_budget: method="auto" only: bytes that the stashed A, G or per-sample
            gradients of all layers may take; auto then picks rules that stash less (in the
            flat style, down to none: a second backward). None: no bound.
    """

    def __init__(self, model: nn.Module, max_grad_norm: float = 1.0, method: str = "auto", style: str = "flat",
                 clip_fn: str = "abadi", gamma: float = 0.01, thresholds=None,
                 groups: Mapping[str, Sequence[str]] | None = None, placement: Mapping[str, Any] | None = None,
                 audit: bool = False, unclipped_layer: str | None = None, check: bool = True,
                 memory_budget: float | None = None):
        if method not in METHODS:
            raise UserError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
        if style not in STYLES:
            raise UserError(f"unknown style {style!r}; use one of {', '.join(STYLES)}")
        check_clip_fn(clip_fn, gamma)
        _check_positive("max_grad_norm", max_grad_norm)
        if memory_budget is not None:
            if method != "auto":
                raise UserError(f"memory_budget applies to method='auto' only (got method={method!r}); drop it or use auto")
            _check_positive("memory_budget", memory_budget)
        self.memory_budget = memory_budget
        self._low_precision = False
        if unclipped_layer is not None and not audit:
            raise UserError("unclipped_layer is a fault for privacy auditing; it needs audit=True")
        self.model = model
        self.max_grad_norm = float(max_grad_norm)
        self.method = method
        self.resolved_method = "bk" if method == "auto" else method
        self.style = style
        self.clip_fn = clip_fn
        self.gamma = float(gamma)
        self.audit = bool(audit)
        self.unclipped_layer = unclipped_layer
        self.check = bool(check)
        self._checked = False
        self._muted = False  # True while the self-check replays the forward pass on the bare model
        self._replay: list[dict] = []
        self._handles: list = []
        self._phase = 0
        self._bns = self._check_batchnorm(model)

        self._params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self._params:
            raise UserError("the model has no trainable parameters; unfreeze at least one layer "
                            "(dpbench.models.unfreeze(model, [pattern]))")
        self._layers = self._find_layers(model)
        layer_of = {full: l.name for l in self._layers for full in l.full.values()}
        if unclipped_layer is not None and unclipped_layer not in {l.name for l in self._layers}:
            raise UserError(f"unclipped_layer {unclipped_layer!r} is not a trainable layer; "
                            f"choose one of {[l.name for l in self._layers]}")
        clipped = {n: p for n, p in self._params.items() if layer_of[n] != unclipped_layer}
        if not clipped:
            raise UserError("unclipped_layer leaves no clipped parameter; choose another layer")
        self._groups = make_groups(style, clipped, layer_of, groups, placement)
        self._group_of = {n: g for g, names in self._groups.items() for n in names}
        self._thresholds = resolve_thresholds(style, list(self._groups), self.max_grad_norm, thresholds)
        self._group_layers: dict[str, list[_Layer]] = {g: [] for g in self._groups}
        for l in self._layers:
            l.clipped = [n for n in l.names if l.full[n] in self._group_of]
            l.groups = {self._group_of[l.full[n]] for n in l.clipped}
            for g in l.groups:
                self._group_layers[g].append(l)
        self._two_pass = self.resolved_method in ("ghost", "mixed") and style == "flat"
        self._register_hooks()

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _check_batchnorm(model):
        bns = []
        for name, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                trainable = any(p.requires_grad for p in m.parameters(recurse=False))
                if trainable or m.training:
                    raise UserError(
                        f"BatchNorm module {name or ROOT!r} mixes samples, so per-sample clipping is meaningless; "
                        "replace it with dpbench.models.create_model(..., norm='group') or "
                        "dpbench.models.convert_batchnorm_to_groupnorm(model)")
                bns.append((name, m))
        return bns

    def _find_layers(self, model) -> list[_Layer]:
        owners: dict[int, list[str]] = {}
        layers = []
        for mname, m in model.named_modules():
            own = {n: p for n, p in m._parameters.items() if p is not None and p.requires_grad}
            for n, p in own.items():
                owners.setdefault(id(p), []).append(f"{mname}.{n}" if mname else n)
            if not own:
                continue  # frozen or parameter-free: no hooks, no cost
            name = mname or ROOT
            if isinstance(m, torch.nn.utils.parametrize.ParametrizationList):
                full = next(iter(own))
                full = f"{mname}.{full}" if mname else full
                raise UserError(
                    f"trainable parameter {full!r} is reparametrised by torch.nn.utils.parametrize (weight_norm, "
                    "spectral_norm, ...), which the clipping engine has no rule for; remove it with "
                    f"torch.nn.utils.parametrize.remove_parametrizations or freeze it (dpbench.models.freeze(model, [{full!r}]))")
            rule_cls = find_rule(m)
            if rule_cls is not None:
                check_forward(m, name)  # a subclass with its own forward needs its own rule
                rule = rule_cls()
                unknown = [n for n in own if n not in rule.param_names]
                if unknown:
                    self._unsupported(name, unknown[0], m)
                rule.check(m, list(own))
                layers.append(_Layer(name, m, rule, own, "rule"))
            else:
                for n, p in own.items():
                    if not DirectParamsRule.supports(p):
                        self._unsupported(name, n, m)
                layers.append(_Layer(name, m, DirectParamsRule(), own, "direct"))
        tied = [v for v in owners.values() if len(v) > 1]
        if tied:
            raise UserError(f"parameter shared by several modules (tied weights): {', '.join(tied[0])}; per-sample "
                            "norms of tied weights are not supported: untie them, or freeze them with "
                            f"dpbench.models.freeze(model, {tied[0]!r})")
        return layers

    @staticmethod
    def _unsupported(layer, pname, module):
        full = pname if layer == ROOT else f"{layer}.{pname}"
        t = type(module).__name__
        raise UserError(
            f"trainable parameter {full!r} of {t} has no per-sample clipping rule; freeze it with "
            f"dpbench.models.freeze(model, [{full!r}]) or register a rule with "
            f"@dpbench.clipping.register_rule({t})")

    def _register_hooks(self):
        for l in self._layers:
            m = l.module
            if l.kind == "direct":
                self._handles.append(m.register_forward_pre_hook(_only(
                    m, lambda mod, args, kwargs, l=l: self._pre_direct(l, mod, args, kwargs)), with_kwargs=True))
                self._handles.append(m.register_forward_hook(_only(
                    m, lambda mod, args, out, l=l: self._post_direct(l, out)), always_call=True))
                # A child called without a tracked tensor cannot reach one: run it without the
                # mode (a ViT's blocks would otherwise pay ~30 us of dispatch per op).
                for child in m.children():
                    self._handles.append(child.register_forward_pre_hook(_only(
                        child, lambda mod, args, kwargs, l=l: self._suspend(l, args, kwargs)), with_kwargs=True))
                    self._handles.append(child.register_forward_hook(_only(
                        child, lambda mod, args, out, l=l: self._resume(l)), always_call=True))
                continue
            self._handles.append(m.register_forward_pre_hook(_only(
                m, lambda mod, args, l=l: self._pre_capture(l, mod, args))))
            self._handles.append(m.register_forward_hook(_only(
                m, lambda mod, args, out, l=l: self._fwd(l, mod, args, out))))
        # The whole model: in-place changes are checked when its forward pass ends, and the
        # first step's inputs and outputs are kept for the per-sample self-check.
        self._handles.append(self.model.register_forward_pre_hook(_only(self.model, self._root_pre), with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(_only(self.model, self._root_post), always_call=True))

    # ------------------------------------------------------------------ hooks
    def _pre_capture(self, l, mod, args):
        if not torch.is_grad_enabled() or self._muted:
            return
        x = args[0] if args else None
        # Decided before the module runs: an in-place module gives its input a history.
        nohist = not isinstance(x, torch.Tensor) or x.grad_fn is None
        l.pre = (nohist, x, x._version if isinstance(x, torch.Tensor) else None)
        if l.rule.capture_before:
            l.pending = l.rule.capture(mod, args, None, l.names)

    def _fwd(self, l, mod, args, out):
        pre, l.pre = l.pre, None
        if not torch.is_grad_enabled() or self._muted or not isinstance(out, torch.Tensor) or not out.requires_grad:
            l.pending = None
            return
        act = l.pending if l.rule.capture_before else l.rule.capture(mod, args, out, l.names)
        l.pending = None
        use = _Use(act)
        x = args[0] if args else None
        nohist = pre[0] if pre is not None else (not isinstance(x, torch.Tensor) or x.grad_fn is None)
        if pre is not None and isinstance(act, torch.Tensor) and act is pre[1]:
            use.version = pre[2]  # the input is kept by reference: it must not change until backward
        target = out
        base = out._base if out._is_view() else None
        if base is not None and base.grad_fn is not None:
            # An in-place op on a view replaces the view's node, and the hook with it; the
            # base's current node stays in the graph, so hook it and cut G out of its gradient.
            target = base
            use.view = (base.size(), base.stride(), out.size(), out.stride(),
                        out.storage_offset() - base.storage_offset())
        if nohist:
            # Nothing below this layer leads back to an anchor, so pass 1 stops here: at the
            # gradient edge of this output, taken now, before any later in-place op moves it.
            # Autograd then returns G without computing this layer's weight gradient.
            use.anchor = get_gradient_edge(target)
        l.uses.append(use)
        target.register_hook(lambda g, l=l, use=use: self._on_grad(l, use, g))

    @staticmethod
    def _cut(g, view):
        bsize, bstride, size, stride, offset = view
        if tuple(g.size()) != tuple(bsize):
            return g
        if g.stride() != bstride:
            g = torch.empty_strided(bsize, bstride, dtype=g.dtype, device=g.device).copy_(g)
        return g.as_strided(size, stride, g.storage_offset() + offset)

    def _on_grad(self, l, use, g):
        if self._phase != 1:
            return
        use.grad = self._cut(g, use.view) if use.view is not None else g
        if not l.processed and l.complete():
            self._process(l)

    def _check_versions(self):
        """Refuse kept inputs changed in place since their layer ran (their per-sample grads would be wrong)."""
        for l in self._layers:
            for u in l.uses:
                if u.version is not None and u.act._version != u.version:
                    self._clear_uses()
                    raise UserError(
                        f"the input of layer {l.name!r} ({type(l.module).__name__}) was changed in place after the "
                        "layer read it (for example `x += layer(x)` or an in-place activation on it); the engine keeps "
                        "that input for per-sample gradients, so write it out of place (`x = x + layer(x)`)")

    def _clear_uses(self):
        for l in self._layers:
            l.uses, l.pending, l.pre = [], None, None
            if l.kind == "direct":
                self._restore(l)

    def _root_pre(self, mod, args, kwargs):
        if not torch.is_grad_enabled() or self._muted:
            return
        if self.check and not self._checked and len(self._replay) < 2:  # two calls: no replay (see _per_sample_check)
            # Inputs (copied: a forward may change them in place) and RNG states, to replay
            # this forward pass for the per-sample self-check.
            cp = lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t  # noqa: E731
            flat, spec = tree_flatten((args, kwargs))
            cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
            amp = [(d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
            self._replay.append({"inputs": tree_unflatten([cp(t) for t in flat], spec),
                                 "rng": (torch.get_rng_state(), cuda), "out": None, "amp": amp})

    def _root_post(self, mod, args, out):
        if not torch.is_grad_enabled() or self._muted:
            return
        if self._replay and self._replay[-1]["out"] is None:
            self._replay[-1]["out"] = out
        self._check_versions()

    def _pre_direct(self, l, mod, args, kwargs):
        if not torch.is_grad_enabled() or self._muted:
            return
        x = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if x is None or x.dim() == 0:
            raise UserError(f"cannot find the batch dimension of {l.name!r}'s input, needed for per-sample "
                            f"gradients of {', '.join(l.full.values())}; pass the batch as a tensor argument")
        B = x.shape[0]
        use = _Use()
        use.grad = None
        use.mode = _DirectUses(self, l, B)
        for n in l.names:
            p = l.params[n]
            # B copies of p as one (B, *p.shape) leaf (an expanded view, no copy); the module
            # sees a detached p, so no raw gradient can reach p.
            leaf = p.detach().expand(B, *p.shape).requires_grad_(True)
            leaf.register_hook(lambda g, l=l, use=use, n=n: self._on_direct_grad(l, use, n, g))
            use.leaves.append(leaf)
            seen = p.detach()
            use.mode.add(seen, leaf, n)
            mod._parameters[n] = seen
        l.uses.append(use)
        use.mode.__enter__()

    @staticmethod
    def _active_mode(l):
        return l.uses[-1].mode if l.uses and l.uses[-1].mode is not None else None

    def _suspend(self, l, args, kwargs):
        mode = self._active_mode(l)
        if mode is None:
            return
        popped = False
        n = torch._C._len_torch_function_stack()
        if n and torch._C._get_function_stack_at(n - 1) is mode and not mode._touches(args, kwargs):
            torch._C._pop_torch_function_stack()
            popped = True
        mode.suspended.append(popped)

    def _resume(self, l):
        mode = self._active_mode(l)
        if mode is not None and mode.suspended and mode.suspended.pop():
            torch._C._push_on_torch_function_stack(mode)

    def _post_direct(self, l, out):
        use = l.uses[-1] if l.uses and l.uses[-1].mode is not None else None
        if use is not None:
            mode, use.mode = use.mode, None
            mode.__exit__(None, None, None)
            self._restore(l)
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and mode._get(t) is not None:
                    pname = mode._get(t)[2]
                    self._clear_uses()
                    mode.refuse(pname, "returned by its module without meeting the batch")
        else:
            self._restore(l)

    def _restore(self, l):
        for n, p in l.params.items():
            l.module._parameters[n] = p

    def _on_direct_grad(self, l, use, n, g):
        if self._phase != 1:
            return
        if use.grad is None:
            use.grad = {}
        use.grad[n] = g
        if not l.processed and l.complete():
            self._process(l)

    # ------------------------------------------------------------------ backward
    def backward(self, per_sample_losses: torch.Tensor) -> dict[str, torch.Tensor]:
        """Add sum_i clip(g_i) to every trainable parameter's .grad; return per-sample norms.

        per_sample_losses: shape (B,), from a loss with reduction="none", after one forward
        pass of the model with gradients enabled. Returns {group: norms (B,)} ("all" for flat).
        """
        losses = per_sample_losses
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise UserError(f"per_sample_losses must have shape (B,) (use reduction='none'); got {shape}")
        if not losses.requires_grad:
            raise UserError("per_sample_losses do not require grad: run the forward pass with gradients enabled "
                            "(not under torch.no_grad()) before engine.backward")
        self._check_state()
        self.check_no_raw_gradients()
        self._check_versions()
        B = losses.shape[0]
        try:
            if B == 0:
                return {g: torch.zeros(0) for g in self._groups}
            if not any(l.uses for l in self._layers):
                raise UserError("no forward pass was recorded: call model(x) with gradients enabled, then "
                                "engine.backward(losses)")
            # auto's cached choices first: they decide whether this step has a second backward
            if self.method == "auto" and any(l.method is None and l.uses for l in self._layers):
                self._auto_key = self._auto_signature(B)
                cached = _AUTO_CACHE.get(self._auto_key)
                if cached is not None:
                    for l in self._layers:
                        if l.name in cached and l.method is None:
                            l.method, l.pass2, l.measured, l.dims = cached[l.name]
            # TF32 stays off in the rules (tf32.py); on a step with a second backward or the
            # self-checks, also in pass 1, so that every G they compare comes from one precision.
            exact = self._two_pass or any(l.pass2 for l in self._layers) or (self.check and not self._checked)
            with no_tf32() if exact else contextlib.nullcontext():
                return self._backward(losses, B)
        finally:
            self._phase = 0
            for l in self._layers:
                l.uses, l.stash, l.processed, l.pending, l.pre = [], None, False, None, None
                l.rule.__dict__.pop("_kept", None)  # matrices a rule kept for a clipped sum not taken
                self._restore(l) if l.kind == "direct" else None
            self._replay = []
            for p in self._params.values():
                if p.grad is None:  # unused this step: its clipped sum is zero
                    p.grad = torch.zeros_like(p)

    def _backward(self, losses, B):
        anchors, seen = [], set()
        for l in self._layers:
            for u in l.uses:
                for t in (u.leaves if l.kind == "direct" else [u.anchor]):
                    if t is not None and id(t) not in seen:
                        seen.add(id(t))
                        anchors.append(t)
        checking = self.check and not self._checked
        self._B = B
        # Squared norms and clip factors in float32 at least (float16 overflows above a norm of 256).
        sq_dtype = torch.promote_types(losses.dtype, torch.float32)
        self._sq = {g: torch.zeros(B, dtype=sq_dtype, device=self._group_device(g)) for g in self._groups}
        self._remaining = {g: len(ls) for g, ls in self._group_layers.items()}
        self._coef: dict[str, torch.Tensor] = {}
        self._check_sums = {} if checking else None
        self._check_sq = {} if checking else None
        total = losses.sum()
        self._phase = 1
        recompute = any(l.pass2 for l in self._layers)
        if anchors:
            try:
                torch.autograd.grad(total, anchors, retain_graph=self._two_pass or recompute or checking,
                                    allow_unused=True)
            except RuntimeError as e:
                if "use_reentrant=True" not in str(e):
                    raise
                raise UserError("torch.utils.checkpoint(..., use_reentrant=True) cannot run under the clipping "
                                "engine (its pass 1 is torch.autograd.grad); use use_reentrant=False") from None
        self._phase = 0
        with no_tf32():  # _complete emits clipped sums (inside _process, TF32 is off already)
            for l in self._layers:  # layers whose output gradient never came (unused, or stale forwards)
                if not l.processed:
                    self._process(l)
            for g in self._groups:
                if g not in self._coef:
                    self._complete(g)
        if checking:
            self._self_check(total, retain=True)
            self._per_sample_check(losses)
            self._checked = True
        if self.method == "auto" and any(l.measured is not None and l.pass2 is None for l in self._layers):
            self._plan_auto()
            if getattr(self, "_auto_key", None) is not None and not getattr(self, "_over_budget", False):
                _AUTO_CACHE[self._auto_key] = {l.name: (l.method, l.pass2, l.measured, l.dims)
                                               for l in self._layers if l.method is not None}
        if self._two_pass or recompute:
            c = self._coef["all"].to(device=losses.device, dtype=losses.dtype)
            params = [p for l in self._layers if self._in_pass2(l) and l.uses for p in l.params.values()]
            if params:
                torch.autograd.backward((losses * c.detach()).sum(), inputs=params)
        return {g: self._sq[g].sqrt() for g in self._groups}

    def _auto_signature(self, B):
        """auto's cache key: model class, trainable layers with their input shapes, batch bucket, settings."""
        layers = tuple((l.name, type(l.module).__qualname__, tuple(l.names), tuple(
            (tuple(u.act.shape[1:]), str(u.act.dtype)) if isinstance(u.act, torch.Tensor) else None for u in l.uses))
            for l in self._layers)
        bucket = 1 << max(0, B - 1).bit_length()  # Poisson batches vary: one entry per power of two
        return (type(self.model).__qualname__, layers, bucket, self.style, self.memory_budget, self.unclipped_layer,
                torch.is_autocast_enabled("cpu"), next(iter(self._params.values())).device.type)

    def _in_pass2(self, l):
        return l.kind == "rule" and l.name != self.unclipped_layer and (self._two_pass or bool(l.pass2))

    def _group_device(self, g):
        return self._params[self._groups[g][0]].device

    def _decide(self, l, acts, grads):
        dims = l.rule.dims(l.module, acts, grads) if l.rule.ghost_capable else None
        l.dims = dims
        if self.method == "auto" and l.kind == "rule" and l.clipped:
            l.measured = self._measure(l, acts, grads)
            l.pass2 = None  # decided with the whole model's measurements, after pass 1
            return min(("ghost", "instantiate"), key=lambda m: l.measured[m][0] if m in l.measured else math.inf)
        if dims is None or self.resolved_method == "instantiate":
            return "instantiate"
        if self.resolved_method == "ghost":
            return "ghost"
        T, D, p = dims
        return "ghost" if ghost_is_cheaper(T, D, p) else "instantiate"

    def _measure(self, l, acts, grads) -> dict:
        """{rule: (seconds, stashed bytes)}: norms and clipped sum of this layer, timed on this batch.

        ghost stashes A and G; instantiate stashes only the per-sample gradients; recompute
        (flat style) stashes nothing and costs about a clipped sum more (the second backward).
        Called from _process, so TF32 is already off.
        """
        ones = {n: torch.ones(self._B, dtype=torch.float32, device=l.params[n].device) for n in l.names}
        nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))  # noqa
        out = {}
        cands = ["ghost", "instantiate"] if l.rule.ghost_capable else ["instantiate"]
        if l.rule.ghost_capable:
            # A rule is not even tried where its temporaries would exceed the budget or
            # MEASURE_SLACK x ghost's stash (and 1 MiB): measuring it would set the run's peak
            # memory. Instantiation: a ResNet's 512-channel convs (600 MB at B = 64); ghost:
            # the T x T products of a stem conv at T = 1024 (64 MiB chunks on the small CNN).
            stash = nbytes([*acts, *grads])
            cap = min(max(MEASURE_SLACK * stash, 1 << 20), self.memory_budget or math.inf)
            ps_bytes = self._B * sum(p.numel() * max(p.element_size(), 4) for p in l.params.values())
            if ps_bytes > cap:
                cands.remove("instantiate")
            T = l.dims[0] if l.dims else 0
            ghost_bytes = min(self._B * 12 * T * T * getattr(l.module, "groups", 1), CHUNK_BYTES)
            if ghost_bytes > cap and "instantiate" in cands:
                cands.remove("ghost")
        for m in cands:
            best = math.inf
            for _ in range(2):  # the first run pays for allocations
                t0 = _clock()
                sq, ps = l.rule.sq_norms(l.module, acts, grads, l.clipped, ghost=m == "ghost")
                t1 = _clock()
                l.rule.weighted_sum(l.module, acts, grads, ones, l.names,
                                    per_sample=ps if ps and all(n in ps for n in l.names) else None)
                t2 = _clock()
                best = min(best, t2 - t0)
            keep = list(ps.values()) if ps and all(n in ps for n in l.names) else [*acts, *grads]
            out[m] = (best, nbytes(keep), t1 - t0, t2 - t1)
        if self.style == "flat" and l.name != self.unclipped_layer:
            norm = min(v[2] for v in out.values())
            out[RECOMPUTE] = (norm + min(v[3] for v in out.values()), 0, norm, 0.0)
        return {m: v[:2] for m, v in out.items()}

    def _plan_auto(self):
        """Fix auto's rule per layer: the fastest measured, then within memory_budget if set."""
        todo = [l for l in self._layers if l.measured is not None and l.pass2 is None]
        choice = {id(l): min(("ghost", "instantiate"), key=lambda m: l.measured.get(m, (math.inf,))[0]) for l in todo}
        total = lambda: sum(l.measured[choice[id(l)]][1] for l in todo)  # noqa: E731
        if self.memory_budget is not None:
            while total() > self.memory_budget:
                best = None
                for l in todo:
                    t0, b0 = l.measured[choice[id(l)]]
                    for m, (t, b) in l.measured.items():
                        if b < b0:
                            score = (b0 - b) / max(t - t0, 1e-9)  # bytes saved per second lost
                            if best is None or score > best[0]:
                                best = (score, l, m)
                if best is None:
                    break  # nothing stashes less: the budget cannot be met (layer_table says so)
                choice[id(best[1])] = best[2]
        self._over_budget = self.memory_budget is not None and total() > self.memory_budget
        for l in todo:
            m = choice[id(l)]
            l.pass2 = m == RECOMPUTE
            if l.pass2:  # norms by the faster rule; the clipped sum by the second backward
                m = min(("ghost", "instantiate"), key=lambda k: l.measured.get(k, (math.inf,))[0])
            l.method = m

    @no_tf32()
    @torch.no_grad()  # rules record no autograd graph (the tail after pass 1 runs with grad mode on)
    def _process(self, l: _Layer):
        l.processed = True
        l.max_uses = max(l.max_uses, len(l.uses))
        if l.kind == "direct":
            uses = [u for u in l.uses if u.grad]
        else:
            uses = [u for u in l.uses if u.grad is not None]
        if uses:
            acts, grads = [u.act for u in uses], [u.grad for u in uses]
            if any(isinstance(t, torch.Tensor) and t.dtype in HALF for t in (*acts, *grads)):
                self._low_precision = True
            for g in grads:
                b = next(iter(g.values())).shape[0] if isinstance(g, dict) else g.shape[0]
                if b != self._B:
                    raise UserError(f"layer {l.name!r} saw a batch of {b} but the losses have {self._B} entries; "
                                    "pass one loss per sample of the last forward pass")
            if l.method is None:
                l.method = self._decide(l, acts, grads)
            ps = {}
            if l.clipped:
                sq, ps = l.rule.sq_norms(l.module, acts, grads, l.clipped, ghost=l.method == "ghost")
                for n, v in sq.items():
                    g = self._group_of[l.full[n]]
                    self._sq[g] += v.to(self._sq[g].dtype).to(self._sq[g].device)
                    if self._check_sq is not None:
                        self._check_sq[l.full[n]] = v.detach()
            if self._check_sums is not None and l.kind == "rule":
                ones = {n: torch.ones(self._B, dtype=self._sq_dtype(), device=l.params[n].device) for n in l.names}
                for n, s in l.rule.weighted_sum(l.module, acts, grads, ones, l.names).items():
                    self._check_sums[l.full[n]] = s
            if self._in_pass2(l):
                l.stash = None
            elif ps and all(n in ps for n in l.names):
                l.stash = (None, None, ps)  # the clipped sum needs only the per-sample gradients
            else:
                l.stash = (acts, grads, ps)
            # The uses no longer hold A and G: what the clipped sum needs is in the stash, so a
            # layer that stashes per-sample gradients (or nothing) frees them now, not at the end.
            for u in uses:
                u.act = u.grad = u.version = None
        for g in l.groups:
            self._remaining[g] -= 1
            if self._remaining[g] == 0:
                self._complete(g)
        if not l.groups:
            self._emit(l)

    def _sq_dtype(self):
        return next(iter(self._sq.values())).dtype

    def _complete(self, g):
        norms = self._sq[g].clamp_min(0).sqrt()
        self._coef[g] = clip_factors(norms, self._thresholds[g], self.clip_fn, self.gamma)
        for l in self._group_layers[g]:
            if l.processed and l.stash is not None and all(x in self._coef for x in l.groups):
                self._emit(l)

    def _emit(self, l: _Layer):
        # Called only under no_tf32 (from _process, or _backward's tail): not toggled again per layer.
        if l.stash is None:
            return
        acts, grads, ps = l.stash
        l.stash = None
        coef = {}
        for n in l.names:
            full = l.full[n]
            if full in self._group_of:
                # the group's factors live on its first device; this layer's gradients may not
                coef[n] = self._coef[self._group_of[full]].to(l.params[n].device)
            else:
                coef[n] = torch.ones(self._B, dtype=self._sq_dtype(), device=l.params[n].device)
        use_ps = ps if ps and all(n in ps for n in l.names) else None
        with torch.no_grad():
            sums = l.rule.weighted_sum(l.module, acts, grads, coef, l.names, per_sample=use_ps)
            for n, s in sums.items():
                p = l.params[n]
                s = s.reshape(p.shape).to(p.dtype)
                if p.grad is None:
                    # Never a view: a later in-place change of .grad (zero_, a plain backward
                    # adding into it) would fail on a view created in no-grad mode.
                    # detach() gives a non-view alias (a clone cost a copy of every weight per step).
                    p.grad = s.detach() if s._is_view() else s
                else:
                    p.grad.add_(s)

    def _self_check(self, total, retain):
        names = [n for l in self._layers if l.kind == "rule" and l.uses for n in l.full.values()]
        params = [self._params[n] for n in names]
        if not params:
            return
        ref = torch.autograd.grad(total, params, retain_graph=retain, allow_unused=True)
        for n, p, r in zip(names, params, ref):
            ours = self._check_sums.get(n)
            r = torch.zeros_like(p) if r is None else r
            ours = torch.zeros_like(p) if ours is None else ours.reshape(p.shape).to(p.dtype)
            tol = 1e-9 if p.dtype == torch.float64 else (1e-3 if p.dtype == torch.float32 else 3e-2)
            tol = max(tol, 3e-2) if self._low_precision else tol
            err = (ours - r).norm() / (r.norm() + 1e-12)
            if err > tol and (ours - r).norm() > 1e-7 + _subnormal_atol(p):
                raise UserError(
                    f"per-sample gradients of {n!r} do not add up to its gradient (relative error {float(err):.2e}): "
                    "the parameter is used where its module's hooks do not see it (e.g. weights tied through a "
                    "functional call such as F.linear(x, layer.weight)) or its module's rule does not match its "
                    f"forward; freeze it with dpbench.models.freeze(model, [{n!r}]) or register a rule with "
                    "@dpbench.clipping.register_rule")
        self._check_sums = None

    def _replay_forward(self, rec, rows, B):
        """The recorded forward on the bare model (hooks muted, same RNG), on `rows` or all."""
        take = lambda t: t[rows] if rows is not None and isinstance(t, torch.Tensor) and t.dim() and \
            t.shape[0] == B else t  # noqa: E731
        flat, spec = tree_flatten(rec["inputs"])
        args, kwargs = tree_unflatten([take(t) for t in flat], spec)
        cpu, cuda = rec["rng"]
        devices = list(range(len(cuda))) if cuda is not None else []
        self._muted = True
        try:
            with torch.random.fork_rng(devices=devices), torch.enable_grad(), contextlib.ExitStack() as amp:
                for dev, dt in rec.get("amp", ()):  # the same autocast as the recorded forward
                    amp.enter_context(torch.autocast(dev, dtype=dt))
                torch.set_rng_state(cpu)
                if cuda is not None:
                    torch.cuda.set_rng_state_all(cuda)
                out = self.model(*args, **kwargs)
        except Exception:  # noqa: BLE001 - a forward that cannot run on a subset: no reference from it
            return None
        finally:
            self._muted = False
        return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.requires_grad]

    def _per_sample_check(self, losses):
        """Per-sample norms of every clipped parameter on a few samples against a reference.

        The reference replays the recorded forward pass on the bare model (hooks muted, same
        inputs and RNG state) for the checked samples only (the whole batch when the rows do
        not reproduce, e.g. under dropout), so direct parameters and every rule are bypassed,
        and takes one sample's gradient through it: d loss_i / d out from the recorded graph,
        then through the replayed graph to the parameters. This sees per-sample misattribution
        (e.g. one sample credited with the whole batch's gradient), which a sum cannot.
        """
        sq, self._check_sq = self._check_sq, None
        if len(self._replay) != 1 or self._replay[0]["out"] is None or not sq:
            return  # the losses do not come from exactly one call of the whole model: nothing to replay
        rec = self._replay[0]
        outs = [t for t in tree_flatten(rec["out"])[0] if isinstance(t, torch.Tensor) and t.requires_grad]
        if not outs:
            return
        names = [n for n in sq if n in self._params]
        params = [self._params[n] for n in names]
        B = losses.shape[0]
        idx = sorted({0, B // 2, B - 1})
        # Replay only the checked samples (little memory); a forward whose rows depend on the
        # batch (dropout masks) is replayed whole instead.
        for rows in (idx, None):
            ref_outs = self._replay_forward(rec, rows, B)
            mine = [o if rows is None else o[rows] for o in outs]
            if ref_outs is not None and len(ref_outs) == len(mine) and all(
                    a.shape == b.shape and torch.allclose(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
                    for a, b in zip(mine, ref_outs)):
                break
        else:
            return  # not reproducible (e.g. a random op outside torch's RNG): no reference
        dtype = next(iter(sq.values())).dtype
        tol = 1e-6 if dtype == torch.float64 else (1e-3 if dtype == torch.float32 else 3e-2)
        tol = max(tol, 3e-2) if self._low_precision else tol
        for i in idx:
            go = torch.autograd.grad(losses[i], outs, retain_graph=True, allow_unused=True)
            go = [g if g is None or rows is None else g[rows] for g in go]
            pairs = [(o, g) for o, g in zip(ref_outs, go) if g is not None]
            if not pairs:
                continue
            ref = torch.autograd.grad([o for o, _ in pairs], params, [g for _, g in pairs], retain_graph=True,
                                      allow_unused=True)
            ref_sq = {n: (r.detach().double().pow(2).sum() if r is not None else torch.zeros((), dtype=torch.float64))
                      for n, r in zip(names, ref)}
            scale = float(sum(ref_sq.values()).sqrt()) + 1e-12
            for n in names:
                ours = float(sq[n][i].double().clamp_min(0).sqrt())
                theirs = float(ref_sq[n].sqrt())
                # a float16 reference loses per-sample entries below its subnormal spacing
                if abs(ours - theirs) > tol * scale + 1e-9 + _subnormal_atol(self._params[n]):
                    l = next(l for l in self._layers if n in l.full.values())
                    raise UserError(
                        f"per-sample gradient of {n!r} (module {l.name!r}, {type(l.module).__name__}) has norm "
                        f"{ours:.4g} for sample {i} but {theirs:.4g} by a per-sample reference: the engine does not "
                        "follow how this parameter is used; freeze it with dpbench.models.freeze(model, "
                        f"[{n!r}]) or register a rule with @dpbench.clipping.register_rule")

    def _check_state(self):
        for name, m in self._bns:
            if m.training:
                raise UserError(f"BatchNorm module {name or ROOT!r} is in training mode and mixes samples; replace "
                                "it with GroupNorm (dpbench.models.convert_batchnorm_to_groupnorm) or call .eval() on it")
        if any(not p.requires_grad for p in self._params.values()) or \
                sum(1 for p in self.model.parameters() if p.requires_grad) != len(self._params):
            raise UserError("the set of trainable parameters changed after the ClippingEngine was built; "
                            "call engine.remove() and build a new engine after freezing or unfreezing layers")

    # ------------------------------------------------------------------ API
    @property
    def sensitivity(self) -> float:
        """C_total = sqrt(sum_k C_k^2): the L2 sensitivity of the clipped sum (flat: C)."""
        return math.sqrt(sum(c * c for c in self._thresholds.values()))

    @property
    def thresholds(self) -> dict[str, float]:
        """Group name -> threshold C_k (a copy; change it with set_thresholds)."""
        return dict(self._thresholds)

    def set_thresholds(self, thresholds: Mapping[str, float]) -> None:
        """Update some or all group thresholds (used by adaptive clipping)."""
        unknown = [g for g in thresholds if g not in self._thresholds]
        if unknown:
            raise UserError(f"unknown groups {unknown}; the groups are {list(self._thresholds)}")
        for g, c in thresholds.items():
            _check_positive(f"threshold of group {g!r}", c)
        for g, c in thresholds.items():
            self._thresholds[g] = float(c)

    @property
    def groups(self) -> dict[str, list[str]]:
        """Group name -> parameter names (the audit's unclipped layer is in no group)."""
        return {g: list(v) for g, v in self._groups.items()}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters the engine writes gradients to, in model order."""
        return list(self._params.values())

    def layer_table(self) -> list[dict]:
        """One row per trainable layer: layer, type, T, D, p, method, measured and a note.

        T, D, p (the layer's matmul form, per conv group) and the method are known after the
        first backward; before it they are None. `measured` (auto only): each candidate rule's
        time for norms plus clipped sum, and the bytes it stashes, on the first batch.
        """
        rows = []
        for l in self._layers:
            T, D, p = l.dims if l.dims else (None, None, None)
            notes = []
            if l.kind == "direct":
                notes.append("direct parameters: per-sample leaf view")
            elif not l.rule.ghost_capable:
                notes.append("elementwise: instantiated (small)")
            if l.max_uses > 1:
                notes.append(f"used {l.max_uses}x per forward: exact")
            if l.name == self.unclipped_layer:
                notes.append("AUDIT FAULT: unclipped")
            if self._in_pass2(l):
                notes.append("clipped sum by second backward")
            measured = None
            if l.measured is not None:
                measured = "; ".join(f"{m} {t * 1e3:.3g} ms {b / 2 ** 20:.3g} MiB" for m, (t, b) in l.measured.items())
                if getattr(self, "_over_budget", False):
                    notes.append("memory_budget cannot be met")
            rows.append({"layer": l.name, "type": type(l.module).__name__, "params": ",".join(l.names),
                         "T": T, "D": D, "p": p, "method": l.method, "measured": measured, "note": "; ".join(notes)})
        return rows

    @contextlib.contextmanager
    def paused(self):
        """Record nothing inside: forward and backward passes run as on the bare model.

        Like Opacus's `disable_hooks`, for public-data gradients or canary scoring on the
        model this engine clips, without a copy of the model. A backward pass inside writes
        raw (unclipped) gradients into `.grad`; they must never reach a private step, so
        `backward` (and `DPOptimizer.step`) refuse while a parameter still holds them, until
        they are cleared (`zero_grad`) or consumed (`DPOptimizer.public_step`).
        `torch.autograd.grad` writes no .grad and needs no clearing. Nested use is a no-op.
        """
        if getattr(self, "_paused", False):
            yield self
            return
        if any(l.uses for l in self._layers):
            raise UserError("a forward pass was recorded but not backpropagated; call engine.backward(losses) "
                            "before pausing the engine")
        hooked = bool(self._handles)
        for h in self._handles:
            h.remove()
        self._handles = []
        # References (not ids) to the current gradients, so that a replaced or updated
        # .grad is told apart from an untouched one.
        before = {n: (p.grad, None if p.grad is None else p.grad._version) for n, p in self._params.items()}
        self._paused = True
        try:
            yield self
        finally:
            self._paused = False
            for l in self._layers:
                l.uses, l.stash, l.pending = [], None, None
            if hooked:
                self._register_hooks()
            raw = getattr(self, "_raw_grads", set())
            for n, p in self._params.items():
                g, v = before[n]
                if p.grad is not g or (g is not None and g._version != v):
                    raw.add(n)
            self._raw_grads = raw

    def check_no_raw_gradients(self) -> None:
        """Raise UserError if a parameter holds raw gradients written while the engine was paused."""
        raw = getattr(self, "_raw_grads", None)
        if not raw:
            return
        left = [n for n in raw if self._params[n].grad is not None and bool(self._params[n].grad.any())]
        if left:
            raise UserError(f"{len(left)} parameters (e.g. {left[0]!r}) hold raw gradients written while the engine "
                            "was paused; clear them (optimizer.zero_grad()) or consume them in a public step "
                            "(DPOptimizer.public_step) before a private step")
        raw.clear()

    def remove(self) -> None:
        """Detach every hook and restore any parameter swapped during a forward pass."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for l in self._layers:
            if l.kind == "direct":
                self._restore(l)
            l.uses, l.stash = [], None

    def __repr__(self):
        return (f"ClippingEngine(method={self.method!r}, style={self.style!r}, clip_fn={self.clip_fn!r}, "
                f"groups={len(self._groups)}, layers={len(self._layers)}, sensitivity={self.sensitivity:.4g})")
