"""Per-layer rules: from a layer's input A and output gradient G, per-sample gradient norms
(by ghost norm or by instantiation) and the clip-weighted sum of per-sample gradients.

A rule never runs a backward pass; the engine calls it with what its hooks captured.
Every method receives *lists* (one entry per call of the module in the forward pass), so a
module used several times is handled exactly: matmul-type rules concatenate the uses along
the token axis T (the per-sample gradient is sum_u G_u' A_u = [G_1; G_2]' [A_1; A_2], so the
ghost norm of the concatenation includes the cross terms between uses); elementwise rules
sum their per-sample gradients over uses.

Register a rule for a new module type with::

    @dpbench.clipping.register_rule(MyModule)
    class MyRule(dpbench.clipping.LayerRule):
        param_names = ("weight",)
        def capture(self, module, inputs, output, names): ...
        def per_sample(self, module, acts, grads, names): ...   # {name: (B, *param.shape)}

`sq_norms` and `weighted_sum` default to instantiating per-sample gradients; override them
for speed (ghost norms, weighted sums without per-sample gradients).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError

_RULES: dict[Any, type] = {}


def register_rule(module_type: type | str) -> Callable[[type], type]:
    """Class decorator: use this LayerRule subclass for `module_type` (and its subclasses).

    `module_type` may also be a class name (str), matched against `type(module).__name__`
    anywhere in the MRO, or a qualified name ("timm.layers.norm_act.GroupNormAct"), for
    modules of optional libraries that dpbench must not import.
    """

    def deco(rule_cls: type) -> type:
        if not (isinstance(rule_cls, type) and issubclass(rule_cls, LayerRule)):
            raise UserError("register_rule decorates a subclass of dpbench.clipping.LayerRule")
        _RULES[module_type] = rule_cls
        return rule_cls

    return deco


def rule_owner(module: nn.Module) -> "tuple[type | None, type | None]":
    """(rule class, the class in `module`'s MRO it was registered for): by type, qualified
    name ("timm.layers.std_conv.StdConv2d") or class name, exact type first."""
    for cls in type(module).__mro__:
        for key in (cls, f"{cls.__module__}.{cls.__qualname__}", cls.__name__):
            if key in _RULES:
                return _RULES[key], cls
    return None, None


def find_rule(module: nn.Module) -> type | None:
    """The rule class for `module`: exact type, then base classes, by type or class name."""
    return rule_owner(module)[0]


#: methods whose override changes what a supported layer computes
_FORWARD_METHODS = ("forward", "_conv_forward")


def check_forward(module: nn.Module, name: str) -> None:
    """Refuse a subclass of a supported layer that overrides `forward` without its own rule.

    A rule registered for nn.Conv2d knows nn.Conv2d's forward, not a subclass's (timm's
    StdConv2d standardises its weight first): its per-sample gradients would be silently wrong.
    """
    rule, owner = rule_owner(module)
    t = type(module)
    if rule is None or owner is t:
        return
    # forward, and the helpers torch's forwards delegate to (nn.Conv2d.forward is _conv_forward)
    changed = [m for m in _FORWARD_METHODS if getattr(t, m, None) is not getattr(owner, m, None)]
    if not changed:
        return
    raise UserError(
        f"module {name!r} ({t.__module__}.{t.__qualname__}) subclasses {owner.__name__} but overrides {changed[0]}, so "
        f"the {owner.__name__} clipping rule may not match it; register a rule for this exact class "
        f"(@dpbench.clipping.register_rule({t.__name__}), or register_rule({t.__name__})({rule.__name__}) if "
        "its forward computes the same function) or freeze its parameters")


#: 16-bit floats: squared norms and per-sample gradients are formed in float32 from them (a
#: squared norm in float16 overflows above a norm of 256 and underflows below about 2.4e-4).
HALF = (torch.float16, torch.bfloat16)

#: Bytes that one chunk of a rule's per-sample temporaries (unfolded inputs, T x T ghost
#: products) may take; larger batches are processed in chunks of samples.
CHUNK_BYTES = 64 << 20


def _work_dtype(*ts) -> torch.dtype:
    """One dtype for A and G: their promotion, float32 when that is a 16-bit float."""
    dt = ts[0].dtype
    for t in ts[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return torch.float32 if dt in HALF else dt


def _cast(t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dt else t.to(dt)


def _per_sample_sq(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(t.shape[0], -1)
    return (t.float() if t.dtype in HALF else t).pow(2).sum(1)


def _chunks(B: int, per_sample_bytes: int):
    """Slices of the batch whose temporaries take at most CHUNK_BYTES (at least one sample)."""
    step = max(1, CHUNK_BYTES // max(1, per_sample_bytes))
    return [slice(i, min(B, i + step)) for i in range(0, B, step)]


def _dense(t: torch.Tensor) -> torch.Tensor:
    """t with row-major strides, including its size-1 axes (is_contiguous ignores those)."""
    want, acc = [], 1
    for n in reversed(t.shape):
        want.append(acc)
        acc *= n
    return t if tuple(reversed(want)) == t.stride() else t.clone(memory_format=torch.contiguous_format)


#: A ghost norm sum_ts (A A')_ts (G G')_ts whose terms cancel by more than this factor
#: (sum |terms| > CANCELLATION * |sum|) is recomputed by instantiation for that sample, so
#: its rounding error stays below about CANCELLATION * T * eps relative.
CANCELLATION = 1e3


def _stable_ghost(prod: torch.Tensor, dims, exact, minus: torch.Tensor | None = None) -> torch.Tensor:
    """sum of `prod` over `dims` (less `minus`, per sample); samples where it cancels get `exact(idx)` instead."""
    sq = prod.sum(dims)
    mag = prod.abs().sum(dims)
    if minus is not None:
        sq, mag = sq - minus, mag + minus.abs()
    bad = mag > CANCELLATION * sq.abs()
    if not prod.is_meta and bool(bad.any()):  # meta tensors (device tests) hold no values to check
        idx = bad.nonzero().squeeze(1)
        sq = sq.index_copy(0, idx, exact(idx).to(sq.dtype))
    return sq


class LayerRule:
    """Base class of a layer rule. One instance per hooked module.

    acts: what `capture` returned, one per use; grads: the gradient of the summed loss with
    respect to the module's output, one per use (B, ...); names: the module's trainable
    parameter names (local, e.g. "weight"). Per-sample tensors have batch dimension first.
    """

    #: local names of the parameters this rule knows
    param_names: tuple[str, ...] = ("weight", "bias")
    #: True when `ghost_sq_norms` can give weight norms without per-sample gradients
    ghost_capable: bool = False
    #: capture from the forward pre-hook (the module modifies its input in place)
    capture_before: bool = False

    def check(self, module: nn.Module, names: list[str]) -> None:
        """Raise UserError when this module's configuration is not supported."""

    def capture(self, module: nn.Module, inputs: tuple, output: Any, names: list[str]) -> Any:
        """What to keep from the forward pass (default: the first input)."""
        return inputs[0]

    def dims(self, module: nn.Module, acts: list, grads: list) -> tuple[int, int, int] | None:
        """(T, D, p) of the weight's matmul form, for the mixed rule; None when elementwise."""
        return None

    def per_sample(self, module: nn.Module, acts: list, grads: list, names: list[str]) -> dict[str, torch.Tensor]:
        """Per-sample gradients {name: (B, *param.shape)}, summed over uses."""
        raise NotImplementedError

    def ghost_sq_norms(self, module: nn.Module, acts: list, grads: list, names: list[str]) -> dict[str, torch.Tensor]:
        """Per-sample squared norms {name: (B,)} without instantiating weight gradients."""
        raise NotImplementedError

    def sq_norms(self, module, acts, grads, names, ghost: bool):
        """({name: squared norms (B,)}, {name: per-sample grads} or {} when not instantiated)."""
        if ghost and self.ghost_capable:
            return self.ghost_sq_norms(module, acts, grads, names), {}
        ps = self.per_sample(module, acts, grads, names)
        return {n: _per_sample_sq(g) for n, g in ps.items()}, ps

    def weighted_sum(self, module, acts, grads, coef: dict[str, torch.Tensor], names, per_sample=None):
        """{name: sum_i coef[name]_i * g_i[name]} (shape of the parameter)."""
        ps = per_sample if per_sample else self.per_sample(module, acts, grads, names)
        return {n: _weighted(coef[n], ps[n]) for n in names}


def _scale_smaller(c: torch.Tensor, a: torch.Tensor, g: torch.Tensor):
    """(a, g) of one use (batch first, same dtype) with c_i applied per sample to the smaller of
    the two: sum_i c_i G_i' A_i = G' (c A) = (c G)' A, one pass over fewer floats."""
    cv = c.to(g.dtype).view(-1, *([1] * (g.dim() - 1)))
    return (a * cv, g) if a.numel() < g.numel() else (a, g * cv)


def _weighted(c: torch.Tensor, ps: torch.Tensor) -> torch.Tensor:
    """sum_i c_i ps_i over the batch axis: one matrix-vector product."""
    return (c.to(ps.dtype) @ ps.reshape(ps.shape[0], -1)).reshape(ps.shape[1:])


class MatmulRule(LayerRule):
    """Layers whose weight gradient is sum_t G_t' A_t (per group of channels).

    Subclasses give `matrices(module, act, grad) -> (A (B, n, T, D), G (B, n, T, p))` with n
    weight groups (conv groups; 1 otherwise) and `bias_ps(module, grad) -> (B, out)`.
    """

    ghost_capable = True

    def capture(self, module, inputs, output, names):
        # The bias gradient needs only G, so keep the input only when the weight trains.
        return inputs[0] if "weight" in names else None

    def matrices(self, module, act, grad):
        raise NotImplementedError

    def bias_ps(self, module, grad):
        raise NotImplementedError

    def _reuses_matrices(self, module, acts, grads) -> bool:
        """True when `weight_sum` forms its sum from (A, G) too: ghost norms then keep them for it."""
        return False

    def _cat(self, module, acts, grads, rows=None):
        """(A, G) of all uses concatenated along T, in one dtype (_work_dtype); `rows`: a slice of samples."""
        kept = self.__dict__.pop("_kept", None)
        if rows is None and kept is not None and len(kept[0]) == len(acts) + len(grads) and all(
                a is b for a, b in zip(kept[0], (*acts, *grads))):
            return kept[1]  # the unfolded inputs of the ghost norms, kept for the clipped sum
        dt = _work_dtype(*acts, *grads)
        if rows is not None:
            acts, grads = [a[rows] for a in acts], [g[rows] for g in grads]
        mats = [self.matrices(module, _cast(a, dt), _cast(g, dt)) for a, g in zip(acts, grads)]
        if len(mats) == 1:
            return mats[0]
        return torch.cat([m[0] for m in mats], dim=2), torch.cat([m[1] for m in mats], dim=2)

    def _sample_bytes(self, module, acts, grads, ghost):
        """Bytes of one sample's temporaries: (A, G) in matmul form, plus T x T products for ghost."""
        T, D, p = self.dims(module, acts, grads)
        n = getattr(module, "groups", 1)
        return 4 * n * (T * (D + p) + (3 * T * T if ghost else p * D))

    def _per_shapes(self, slot: str, acts, grads, compute):
        """compute(), cached in `slot` for the uses' shapes past the batch axis (asked every step)."""
        key = tuple((tuple(a.shape[1:]), tuple(g.shape[1:])) for a, g in zip(acts, grads))
        hit = self.__dict__.get(slot)
        if hit is None or hit[0] != key:
            hit = self.__dict__[slot] = (key, compute())
        return hit[1]

    def dims(self, module, acts, grads):
        if acts[0] is None:
            return None

        def compute():
            A, G = self._cat(module, acts, grads, rows=slice(0, 1))
            return A.shape[2], A.shape[3], G.shape[3]

        return self._per_shapes("_dims_cache", acts, grads, compute)

    def _gram_bytes(self, module, acts, grads) -> int:
        """Bytes per sample of `_gram_aa`'s temporaries where it is cheaper than A A' by unfolding; 0: unfold."""
        return 0

    def _bias(self, module, grads):
        dt = _work_dtype(*grads)
        out = self.bias_ps(module, _cast(grads[0], dt))
        for g in grads[1:]:
            out = out + self.bias_ps(module, _cast(g, dt))
        return out

    def per_sample(self, module, acts, grads, names):
        res = {}
        if "weight" in names:
            # One batched matmul G' A per chunk of samples, written into one (B, *weight) tensor:
            # the unfolded inputs of a conv exist for one chunk at a time.
            B = grads[0].shape[0]
            w = module.weight
            out = torch.empty(B, *w.shape, dtype=_work_dtype(*acts, *grads), device=grads[0].device)
            flat = out.view(B, -1)
            for rows in _chunks(B, self._sample_bytes(module, acts, grads, ghost=False)):
                A, G = self._cat(module, acts, grads, rows)
                T, p = G.shape[2], G.shape[3]
                if T >= 8 * max(p, A.shape[3]):
                    # long thin products (a stem conv: T = 1024, p = 16, D = 27): the CPU GEMM
                    # was 2-6x faster for (D x T)(T x p), transposed back on the copy below
                    gw = torch.matmul(A.transpose(-1, -2), G).transpose(-1, -2)
                    flat[rows] = gw.reshape(gw.shape[0], -1)
                else:  # (b, n, p, D), written in place into this chunk's rows (no copy)
                    torch.matmul(G.transpose(-1, -2), A, out=flat[rows].view(G.shape[0], G.shape[1], p, A.shape[3]))
            res["weight"] = out
        if "bias" in names:
            res["bias"] = self._bias(module, grads)
        return res

    def ghost_sq_norms(self, module, acts, grads, names):
        res = {}
        # The bias gradient is sum_t G_t, so its squared norm is the sum of G G' (formed for
        # the weight anyway): no second pass over G.
        bias_parts = [] if "bias" in names and "weight" in names else None
        if "weight" in names:
            B = grads[0].shape[0]
            parts = []
            gram = self._gram_bytes(module, acts, grads)
            chunks = _chunks(B, gram or self._sample_bytes(module, acts, grads, ghost=True))
            for rows in chunks:
                if gram:  # A A' from the input's pixel Gram matrix: no unfolded copy of the input
                    aa, G = self._gram_aa(module, acts, grads, rows)
                    exact = lambda i, rows=rows: _per_sample_sq(self.per_sample(  # noqa: E731
                        module, [a[rows][i] for a in acts], [g[rows][i] for g in grads], ["weight"])["weight"])
                else:
                    A, G = self._cat(module, acts, grads, rows)
                    if len(chunks) == 1 and self._reuses_matrices(module, acts, grads):
                        self._kept = ([*acts, *grads], (A, G))
                    if A.shape[2] == 1:  # one token: ||g_i||^2 = ||a_i||^2 ||g_i||^2
                        gsq = G.pow(2).sum(-1)
                        parts.append((A.pow(2).sum(-1) * gsq).sum((1, 2)))
                        if bias_parts is not None:
                            bias_parts.append(gsq.sum((1, 2)))
                        continue
                    aa = torch.matmul(A, A.transpose(-1, -2))  # (b, n, T, T)
                    exact = lambda i, A=A, G=G: _per_sample_sq(torch.matmul(G[i].transpose(-1, -2), A[i]))  # noqa: E731
                gg = torch.matmul(G, G.transpose(-1, -2))
                if bias_parts is not None:
                    bias_parts.append(_stable_ghost(gg, (1, 2, 3), lambda i, G=G: _per_sample_sq(G[i].sum(2))))
                parts.append(_stable_ghost(aa.mul_(gg), (1, 2, 3), exact))
            res["weight"] = parts[0] if len(parts) == 1 else torch.cat(parts)
        if bias_parts:
            res["bias"] = bias_parts[0] if len(bias_parts) == 1 else torch.cat(bias_parts)
        elif "bias" in names:
            res["bias"] = _per_sample_sq(self._bias(module, grads))
        return res

    def weighted_sum(self, module, acts, grads, coef, names, per_sample=None):
        if per_sample:
            return super().weighted_sum(module, acts, grads, coef, names, per_sample)
        res = {}
        if "weight" in names:
            res["weight"] = self.weight_sum(module, acts, grads, coef["weight"])
        if "bias" in names:
            c = coef["bias"]
            dt = _work_dtype(*grads)
            res["bias"] = sum(torch.einsum("b,bo->o", c.to(dt), self.bias_ps(module, _cast(g, dt))) for g in grads)
        return res

    def weight_sum(self, module, acts, grads, c):
        """sum_i c_i G_i' A_i without per-sample gradients (one matmul over all samples)."""
        A, G = self._cat(module, acts, grads)
        B, n, T, p = G.shape
        Gc = G * c.to(G.dtype).view(B, 1, 1, 1)
        # (n, p, B*T) @ (n, B*T, D): one GEMM per weight group (einsum was up to 2x slower)
        gw = torch.matmul(Gc.permute(1, 3, 0, 2).reshape(n, p, B * T), A.transpose(0, 1).reshape(n, B * T, -1))
        return gw.reshape(module.weight.shape)


@register_rule(nn.Linear)
class LinearRule(MatmulRule):
    """nn.Linear on inputs (B, *, D): T is the product of the middle dimensions."""

    def matrices(self, module, act, grad):
        B = grad.shape[0]
        return act.reshape(B, 1, -1, act.shape[-1]), grad.reshape(B, 1, -1, grad.shape[-1])

    def bias_ps(self, module, grad):
        return grad.reshape(grad.shape[0], -1, grad.shape[-1]).sum(1)

    def weight_sum(self, module, acts, grads, c):
        # (B*T, p)' @ (B*T, D): a single GEMM, as in the non-private backward.
        out = None
        dt = _work_dtype(*acts, *grads)
        for a, g in zip(acts, grads):
            a, g = _scale_smaller(c, _cast(a, dt), _cast(g, dt))
            w = g.reshape(-1, g.shape[-1]).t() @ a.reshape(-1, a.shape[-1])
            out = w if out is None else out + w
        return out


def _unfold(x: torch.Tensor, k, d, s) -> torch.Tensor:
    """F.unfold(x, k, dilation=d, stride=s) of a padded (B, C, H, W) input: (B, C*k0*k1, L).

    Where the output rows are long (>= 8 positions) or there is one position, one strided
    copy of a window view is 1.2-6x faster than im2col on CPU; im2col where rows are short.
    """
    B, C, H, W = x.shape
    Ho = (H - d[0] * (k[0] - 1) - 1) // s[0] + 1
    Wo = (W - d[1] * (k[1] - 1) - 1) // s[1] + 1
    if Ho < 1 or Wo < 1 or (Wo < 8 and Ho * Wo > 1):
        return F.unfold(x, k, dilation=d, stride=s)
    sb, sc, sh, sw = x.stride()
    win = x.as_strided((B, C, k[0], k[1], Ho, Wo), (sb, sc, d[0] * sh, d[1] * sw, s[0] * sh, s[1] * sw))
    return win.reshape(B, C * k[0] * k[1], Ho * Wo)


def _unfold_rows(x: torch.Tensor, k, s) -> torch.Tensor:
    """F.unfold(x, k, stride=s).transpose(1, 2) of a padded (B, C, H, W) input, undilated: (B, L, C*k0*k1).

    Copied in (position, channel, kernel row, kernel column) order: runs of k1 contiguous
    floats, 10x faster than im2col for a ViT's 16x16 patches (k1 >= 8).
    """
    B, C, H, W = x.shape
    Ho, Wo = (H - k[0]) // s[0] + 1, (W - k[1]) // s[1] + 1
    sb, sc, sh, sw = x.stride()
    win = x.as_strided((B, Ho, Wo, C, k[0], k[1]), (sb, s[0] * sh, s[1] * sw, sc, sh, sw))
    return win.reshape(B, Ho * Wo, C * k[0] * k[1])


def _shift_sum(t: torch.Tensor, axes, k: int, d: int, s: int, n: int, pad: int, size: int) -> torch.Tensor:
    """sum over j < k of t's block at offset j*d - pad, stride s, n long on both `axes` (a new tensor).

    `t` holds a map of `size` positions on both axes, seen as padded by `pad` zeros in front
    (and enough behind): a block's positions outside the map contribute nothing.
    """
    shape = list(t.shape)
    shape[axes[0]] = shape[axes[1]] = n
    out = None
    for j in range(k):
        lo = max(0, -((j * d - pad) // s))  # the first output position whose input lies in the map
        hi = min(n, (size - 1 + pad - j * d) // s + 1)
        if hi <= lo:
            continue
        start = lo * s + j * d - pad
        src, dst = [slice(None)] * t.dim(), [slice(None)] * t.dim()
        src[axes[0]] = src[axes[1]] = slice(start, start + s * (hi - lo - 1) + 1, s)
        dst[axes[0]] = dst[axes[1]] = slice(lo, hi)
        blk = t[tuple(src)]
        if out is None and (lo, hi) == (0, n):  # a full block: the first term itself, no zeros
            out = blk.clone(memory_format=torch.contiguous_format)
            continue
        if out is None:
            out = t.new_zeros(shape)
        out[tuple(dst)].add_(blk)
    return t.new_zeros(shape) if out is None else out


class _ConvRule(MatmulRule):
    """nn.Conv1d / nn.Conv2d with stride, padding (any mode, 'same'), dilation and groups.

    For ghost norms A is the unfolded (im2col) input, D = c_in/groups * prod(kernel), T =
    output positions, computed in the backward hook from the stored input (the forward keeps
    no extra copy), a chunk of samples at a time. Where it is cheaper (stride 1, many channels,
    small maps), A A' comes from the padded input's pixel Gram matrix instead, without
    unfolding (`_gram_aa`). Per-sample gradients are one batched matmul
    G' A per chunk (the grouped weight-gradient convolution with the batch folded into the
    groups was up to 76x slower on CPU); clipped sums use the framework's own
    weight-gradient convolution, fed with c_i-scaled output gradients.
    """

    nd = 2

    def _padded(self, module, x):
        pads = module._reversed_padding_repeated_twice
        if any(pads):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, pads, mode=mode)
        return x

    def matrices(self, module, act, grad):
        x = self._padded(module, act)
        if self.nd == 1:
            x = x.unsqueeze(2)
        k, s, d = self._kernel2d(module)
        n = module.groups
        if d == (1, 1) and k[1] >= 8:  # long kernel rows (patch embeddings): (B, L, D) order
            rows = _unfold_rows(x, k, s)
            B, L = rows.shape[0], rows.shape[1]
            A = rows.view(B, L, n, -1).transpose(1, 2)
        else:
            cols = _unfold(x, k, d, s)  # (B, C*prod(k), L)
            B, L = cols.shape[0], cols.shape[2]
            A = cols.view(B, n, -1, L).transpose(2, 3)
        G = grad.reshape(B, n, -1, L).transpose(2, 3)
        return A, G

    def bias_ps(self, module, grad):
        return grad.reshape(grad.shape[0], grad.shape[1], -1).sum(2)

    def _conv_args(self, module, x):
        """(input, padding) for the framework's convolution_backward: padded by hand unless zeros."""
        if module.padding_mode == "zeros" and not isinstance(module.padding, str):
            return x, list(module.padding)
        return self._padded(module, x), [0] * self.nd

    #: at most this many output positions, the clipped sum is one GEMM on the unfolded input:
    #: the CPU weight-gradient convolution is up to 3x slower there (512 channels at 1x1)
    GEMM_MAX_T = 4

    def _reuses_matrices(self, module, acts, grads):
        # Few positions, or patches that do not overlap (a ViT's patch embedding: the unfolded
        # input is the input reordered, no larger; the GEMM took 1.1 ms where the weight-gradient
        # convolution took 1.8 on 16x16 patches). Not where the ghost norms take the Gram-matrix
        # path: they never unfold A to keep it.
        T = sum(int(torch.Size(g.shape[2:]).numel()) for g in grads)
        k, s, d = self._kernel2d(module)
        patches = k == s and d == (1, 1) and not any(module._reversed_padding_repeated_twice)
        return (T <= self.GEMM_MAX_T or patches) and not self._gram_bytes(module, acts, grads)

    def _kernel2d(self, module):
        """(kernel, stride, dilation) of the conv seen as 2-D (a Conv1d on a height-1 map)."""
        k, s, d = module.kernel_size, module.stride, module.dilation
        return ((1, k[0]), (1, s[0]), (1, d[0])) if self.nd == 1 else (k, s, d)

    def _geometry(self, module, act):
        """(kernel, stride, dilation, padded (H, W), output (H, W)) of a 2-D view of the conv on `act`."""
        k, s, d = self._kernel2d(module)
        pads = module._reversed_padding_repeated_twice
        size = act.shape[2:]
        if self.nd == 1:
            Hp, Wp = 1, size[0] + pads[0] + pads[1]
        else:
            Hp, Wp = size[0] + pads[2] + pads[3], size[1] + pads[0] + pads[1]
        Ho = (Hp - d[0] * (k[0] - 1) - 1) // s[0] + 1
        Wo = (Wp - d[1] * (k[1] - 1) - 1) // s[1] + 1
        return k, s, d, (Hp, Wp), (Ho, Wo)

    #: cost of copying (or strided adding) one float, in multiply-adds (CPU, ~1 ns at ~40 GFLOP/s)
    COPY_COST = 16

    def _gram_bytes(self, module, acts, grads):
        # One use only (several would need cross-use blocks). Per sample and group, unfolding
        # costs T^2 D multiply-adds for A A' plus a copy of A (T D); the pixel Gram matrix
        # (H W)^2 C/n plus strided adds (k1 blocks of (H Wo)^2, k0 of T^2), on the map itself
        # with zero padding (Hp, Wp padded with other modes). The Gram matrix
        # wins at stride 1 on small maps with a few dozen channels (a ResNet's 8x8 to 2x2
        # stages, the small CNN's last conv: 2-4x faster norms); unfolding at stride 2.
        if len(acts) != 1 or acts[0] is None or type(self)._padded is not _ConvRule._padded:
            return 0  # (a subclass that pads its own way, StdConv2dSame: its padded size is not known here)
        return self._per_shapes("_gram_cache", acts, grads, lambda: self._gram_cost(module, acts[0], grads[0]))

    def _gram_cost(self, module, a, g) -> int:
        """`_gram_bytes` of one use (input a, output gradient g), by the cost model above."""
        k, s, d, _, (Ho, Wo) = self._geometry(module, a)
        (Hp, Wp), _ = self._gram_grid(module, a)
        T, HW = Ho * Wo, Hp * Wp
        if T <= 1:
            return 0
        Cg = a.shape[1] // module.groups
        D = Cg * k[0] * k[1]
        gram = HW * HW * Cg + self.COPY_COST * (k[1] * (Hp * Wo) ** 2 + k[0] * T * T)
        unfold = T * T * D + self.COPY_COST * T * D
        if gram >= unfold:
            return 0
        n, p = module.groups, g.shape[1] // module.groups
        return 4 * n * (HW * HW + (Hp * Wo) ** 2 + 2 * T * T + T * p)

    def _gram_grid(self, module, act):
        """((H, W), (top, left)) of the pixel grid `_gram_aa` works on: with zero padding the map
        itself, the padding left to the shift sums (zero pixels add nothing: no padded copy, and
        (H W)^2 products instead of (Hp Wp)^2); with other modes the padded map, offsets 0."""
        if module.padding_mode == "zeros":
            pads = module._reversed_padding_repeated_twice
            if self.nd == 1:
                return (1, act.shape[2]), (0, pads[0])
            return tuple(act.shape[2:]), (pads[2], pads[0])
        return self._geometry(module, act)[3], (0, 0)

    def _gram_aa(self, module, acts, grads, rows):
        """(A A' (b, n, T, T), G (b, n, T, p)) for the samples `rows`, A A' without unfolding A.

        (A A')_ts = sum_k <x_{t+k}, x_{s+k}> over kernel offsets k, where x_u is the padded
        input's pixel vector: the pixel Gram matrix X' X, summed over k shifted blocks.
        """
        a, g = acts[0][rows], grads[0][rows]
        dt = _work_dtype(a, g)
        k, s, d, _, (Ho, Wo) = self._geometry(module, acts[0])
        (H, W), (top, left) = self._gram_grid(module, a)
        x = _cast(a, dt) if module.padding_mode == "zeros" else self._padded(module, _cast(a, dt))
        b, n = x.shape[0], module.groups
        xf = x.reshape(b, n, x.shape[1] // n, H * W)
        P = torch.matmul(xf.transpose(-1, -2), xf).view(b, n, H, W, H, W)
        # The shifts are separable: the k1 width shifts first (b, n, H, Wo, H, Wo), then the
        # k0 height shifts; 2-3x faster than k0 k1 strided adds of T x T blocks.
        aa = _shift_sum(_shift_sum(P, (3, 5), k[1], d[1], s[1], Wo, left, W), (2, 4), k[0], d[0], s[0], Ho, top, H)
        T = Ho * Wo
        G = _cast(g, dt).reshape(b, n, -1, T).transpose(2, 3)
        return aa.view(b, n, T, T), G

    def weight_sum(self, module, acts, grads, c):
        if self._reuses_matrices(module, acts, grads):
            return super().weight_sum(module, acts, grads, c)  # on the unfolded input the norms kept
        # The framework's own weight-gradient convolution, c_i on the smaller of input and output grads.
        out = None
        zeros = [0] * self.nd
        dt = _work_dtype(*acts, *grads)
        w = module.weight
        # The weight enters only through its shape and dtype: a zero-stride view, no copy.
        wv = w.new_zeros((), dtype=dt).expand(w.shape)
        for a, g in zip(acts, grads):
            xc, gc = _scale_smaller(c, _cast(a, dt), _cast(g, dt))
            x, pad = self._conv_args(module, _dense(xc))
            gw = torch.ops.aten.convolution_backward(
                _dense(gc), x, wv, None, list(module.stride), pad,
                list(module.dilation), False, zeros, module.groups, [False, True, False])[1]
            out = gw if out is None else out + gw
        return out


@register_rule(nn.Conv2d)
class Conv2dRule(_ConvRule):
    nd = 2


@register_rule(nn.Conv1d)
class Conv1dRule(_ConvRule):
    nd = 1


@register_rule(nn.Embedding)
class EmbeddingRule(LayerRule):
    """nn.Embedding: A is the one-hot token matrix, never materialised.

    Ghost: (A A')_{ts} = [idx_t == idx_s]; instantiation and weighted sums by index_add.
    Tokens equal to padding_idx get no gradient, as in PyTorch.
    """

    param_names = ("weight",)
    ghost_capable = True

    def check(self, module, names):
        if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
            raise UserError(
                "Embedding with max_norm, scale_grad_by_freq or sparse=True is not supported by the clipping "
                "engine (they mix samples or edit weights in the forward pass); build it without them")

    def _flat(self, module, acts, grads):
        B = grads[0].shape[0]
        idx = torch.cat([a.reshape(B, -1) for a in acts], 1)
        dt = _work_dtype(*grads)
        G = torch.cat([_cast(g, dt).reshape(B, -1, g.shape[-1]) for g in grads], 1)
        if module.padding_idx is not None:
            G = G * (idx != module.padding_idx).unsqueeze(-1).to(G.dtype)
        return idx, G

    def dims(self, module, acts, grads):
        idx, G = self._flat(module, acts, grads)
        return idx.shape[1], module.num_embeddings, module.embedding_dim

    def ghost_sq_norms(self, module, acts, grads, names):
        idx, G = self._flat(module, acts, grads)
        same = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(G.dtype)
        gg = torch.matmul(G, G.transpose(1, 2))
        return {"weight": _stable_ghost(same * gg, (1, 2), lambda i: _per_sample_sq(
            self.per_sample(module, [a[i] for a in acts], [g[i] for g in grads], names)["weight"]))}

    def per_sample(self, module, acts, grads, names):
        idx, G = self._flat(module, acts, grads)
        B, T, p = G.shape
        V = module.num_embeddings
        rows = (idx + V * torch.arange(B, device=idx.device).unsqueeze(1)).reshape(-1)
        out = torch.zeros(B * V, p, dtype=G.dtype, device=G.device).index_add_(0, rows, G.reshape(-1, p))
        return {"weight": out.view(B, V, p)}

    def weighted_sum(self, module, acts, grads, coef, names, per_sample=None):
        if per_sample:
            return super().weighted_sum(module, acts, grads, coef, names, per_sample)
        idx, G = self._flat(module, acts, grads)
        Gc = G * coef["weight"].to(G.dtype).view(-1, 1, 1)
        out = torch.zeros_like(module.weight, dtype=G.dtype).index_add_(0, idx.reshape(-1), Gc.reshape(-1, G.shape[-1]))
        return {"weight": out}


class _NormRule(LayerRule):
    """Affine normalisation: per-sample grads from the normalised input (recomputed here)."""

    def capture(self, module, inputs, output, names):
        return inputs[0] if "weight" in names else None

    def normalised(self, module, x):
        raise NotImplementedError

    def reduce(self, module, t):
        """Sum an elementwise product over every axis except batch and the parameter's."""
        raise NotImplementedError

    def affine_grad(self, module, a, g, names):
        """(normalised input, or None when the weight does not train; gradient at the affine output) of one use."""
        return (self.normalised(module, a) if "weight" in names else None), g

    def per_sample(self, module, acts, grads, names):
        res = {}
        dt = _work_dtype(*[a for a in acts if a is not None], *grads)
        for a, g in zip(acts, grads):
            a = None if a is None else _cast(a, dt)
            xhat, g = self.affine_grad(module, a, _cast(g, dt), names)
            if "weight" in names:
                # x_hat is this call's own temporary (not a view of A): multiplied in place, one
                # activation-sized buffer less (and its page faults on the CPU)
                own = not xhat._is_view() and xhat.untyped_storage().data_ptr() not in (
                    a.untyped_storage().data_ptr(), g.untyped_storage().data_ptr())
                w = self.reduce(module, xhat.mul_(g) if own else xhat * g)
                res["weight"] = res["weight"] + w if "weight" in res else w
            if "bias" in names:
                b = self.reduce(module, g)
                res["bias"] = res["bias"] + b if "bias" in res else b
        return res


@register_rule(nn.LayerNorm)
class LayerNormRule(_NormRule):
    """nn.LayerNorm (and timm's LayerNorm / LayerNorm2d, which normalises channels of NCHW)."""

    def _channels_last(self, module):
        return type(module).__name__ == "LayerNorm2d"

    def _unit_affine(self, shape, x):
        """(ones, zeros) of `shape` like x, cached: the CPU layer_norm kernel with an affine
        transform is 2-3x faster than without one, and x * 1 + 0 is exact."""
        key = (tuple(shape), x.dtype, x.device)
        hit = self.__dict__.get("_units")
        if hit is None or hit[0] != key:
            hit = self._units = (key, (torch.ones(shape, dtype=x.dtype, device=x.device),
                                       torch.zeros(shape, dtype=x.dtype, device=x.device)))
        return hit[1]

    def normalised(self, module, x):
        if self._channels_last(module):
            x = x.permute(0, 2, 3, 1)
        y = F.layer_norm(x, module.normalized_shape, *self._unit_affine(module.normalized_shape, x), module.eps)
        return y.permute(0, 3, 1, 2) if self._channels_last(module) else y

    def reduce(self, module, t):
        if self._channels_last(module):
            return t.sum((2, 3))
        k = len(module.normalized_shape)
        t = t.reshape(t.shape[0], -1, *t.shape[t.dim() - k:])
        return t.sum(1)


@register_rule(nn.GroupNorm)
class GroupNormRule(_NormRule):
    """nn.GroupNorm on (B, C, *): weight and bias are per channel."""

    def normalised(self, module, x):
        return F.group_norm(x, module.num_groups, None, None, module.eps)

    def reduce(self, module, t):
        return t.reshape(t.shape[0], t.shape[1], -1).sum(2)


@register_rule("LayerScale")
class LayerScaleRule(LayerRule):
    """timm's LayerScale: y = x * gamma over the last axis (x may be scaled in place)."""

    param_names = ("gamma",)
    capture_before = True

    def check(self, module, names):
        # Matched by class name: a "LayerScale" of another library that scales channels of NCHW
        # (gamma of shape (C, 1, 1)) is not timm's, and this rule would misread it.
        g = getattr(module, "gamma", None)
        if not isinstance(g, torch.Tensor) or g.dim() != 1:
            raise UserError(f"{type(module).__module__}.{type(module).__qualname__} is named LayerScale but its gamma "
                            f"is not a vector over the last axis; register a rule for it (@dpbench.clipping.register_rule)")

    def capture(self, module, inputs, output, names):
        x = inputs[0]
        return x.detach().clone() if getattr(module, "inplace", False) else x

    def per_sample(self, module, acts, grads, names):
        out = None
        dt = _work_dtype(*acts, *grads)
        for a, g in zip(acts, grads):
            if a.shape != g.shape or g.shape[-1] != module.gamma.numel():
                raise UserError(f"LayerScale {type(module).__qualname__}: input {tuple(a.shape)} and output "
                                f"{tuple(g.shape)} are not x * gamma over the last axis; register a rule for it")
            t = (_cast(a, dt) * _cast(g, dt)).reshape(g.shape[0], -1, g.shape[-1]).sum(1)
            out = t if out is None else out + t
        return {"gamma": out}


class DirectParamsRule(LayerRule):
    """Parameters held directly by a module and used in its forward code (a ViT's cls_token,
    pos_embed; a (1, H, W) or (C, 1, 1) map added to features).

    During the forward pass the engine follows each such parameter p (engine._DirectUses):
    it sees a detached copy, and a per-sample leaf L of shape (B, *p.shape) (an expanded
    view, no copy) stands for B copies of it. Computations from p alone (indexing, reshapes,
    arithmetic with constants) are mapped over L with torch.func.vmap; where the result meets
    the batch in a broadcasting op (x + p, x * p[0], p.expand(B, ...), torch.where) that
    broadcasts it over the batch axis, sample i gets copy i. Any other use is refused at the
    forward pass. The gradient of L is the per-sample gradient, so `grads` holds
    {name: (B, *p.shape)} per use.
    """

    param_names = ()

    @staticmethod
    def supports(p: torch.Tensor) -> bool:
        # One-dimensional parameters of unknown modules (PReLU, custom scales) are refused when
        # the engine is built: they are usually used by a functional op (F.prelu) that has no rule.
        return p.dim() >= 2

    def capture(self, module, inputs, output, names):
        return None

    def per_sample(self, module, acts, grads, names):
        res = {}
        for g in grads:
            for n in names:
                if n in g:
                    res[n] = res[n] + g[n] if n in res else g[n]
        B = next(iter(res.values())).shape[0] if res else 0
        for n in names:
            p = getattr(module, n)
            if n not in res:  # this parameter did not reach the loss
                res[n] = torch.zeros(B, *p.shape, dtype=p.dtype, device=p.device)
        return res

    def weighted_sum(self, module, acts, grads, coef, names, per_sample=None):
        ps = per_sample if per_sample else self.per_sample(module, acts, grads, names)
        return {n: _weighted(coef[n], ps[n]) for n in names}


def ghost_is_cheaper(T: int, D: int, p: int) -> bool:
    """Bu, Mao and Xu's mixed rule: ghost norm when 2 T^2 < p D (per weight group)."""
    return 2 * T * T < p * D


__all__ = [
    "LayerRule", "MatmulRule", "register_rule", "find_rule", "rule_owner", "check_forward", "DirectParamsRule", "ghost_is_cheaper",
    "LinearRule", "Conv1dRule", "Conv2dRule", "EmbeddingRule", "LayerNormRule", "GroupNormRule",
    "LayerScaleRule",
]

