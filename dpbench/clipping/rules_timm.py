"""Clipping rules for timm's layers that subclass a supported layer but change its forward.

The engine refuses a subclass of a supported layer that overrides `forward` unless a rule
is registered for that exact class (rules.check_forward): the parent's rule would give
silently wrong per-sample gradients. These rules are registered by qualified class name,
so timm is never imported here (it is imported only inside a rule, when a timm module is
already being clipped). A timm version that moves a class gets the clear refusal, never a
wrong rule.

- StdConv2d / StdConv2dSame (weight standardisation, BiT's ResNet-V2): the convolution
  uses w_hat = (w - mean(w_o)) / sqrt(var(w_o) + eps) per output channel o. Per-sample
  gradients are formed w.r.t. w_hat by the Conv2d rule and mapped to w through the
  standardisation's Jacobian, which is the same for every sample (it depends on w only):
  J' g = (g - mean(g) - w_hat * mean(g * w_hat)) / sqrt(var + eps), per output channel.
  It is linear, so clipped sums are J' (sum_i c_i g_hat_i): exact, one map per step; ghost
  norms follow from the Jacobian's closed form (see StdConv2dRule).
- GroupNormAct / GroupNorm1Act (GroupNorm, dropout, activation in one module): the hook
  sees the gradient after the activation; the affine parameters' per-sample gradients need
  the one before it, which is recomputed here from the stored input by a vector-Jacobian
  product through the activation.
- timm's LayerNorm, LayerNorm2d, GroupNorm, GroupNorm1 and Linear compute what their torch
  parents compute (optionally by a fused kernel): the parents' rules.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import UserError
from .rules import (Conv2dRule, GroupNormRule, LayerNormRule, LinearRule, _chunks, _per_sample_sq,
                    _stable_ghost, _work_dtype, register_rule)

_T = "timm.layers."


def _std_vjp(module, g: torch.Tensor) -> torch.Tensor:
    """J' g: a gradient w.r.t. the standardised weight (shape (*lead, *weight)) -> w.r.t. the raw weight."""
    w = module.weight.detach()
    out = w.shape[0]
    lead = g.shape[:g.dim() - w.dim()]
    v = w.to(g.dtype).reshape(out, -1)
    mu = v.mean(1, keepdim=True)
    sigma = (v.var(1, unbiased=False, keepdim=True) + module.eps).sqrt()
    w_hat = (v - mu) / sigma
    gf = g.reshape(*lead, out, v.shape[1])
    res = (gf - gf.mean(-1, keepdim=True) - w_hat * (gf * w_hat).mean(-1, keepdim=True)) / sigma
    return res.reshape(g.shape)


@register_rule(_T + "std_conv.StdConv2d")
@register_rule(_T + "std_conv.StdConv2dSame")
class StdConv2dRule(Conv2dRule):
    """timm's StdConv2d / StdConv2dSame: the Conv2d rule on w_hat, mapped to w by J' (exact).

    Ghost norms without per-sample gradients: with g = g_io (sample i's gradient w.r.t. row o
    of w_hat, length n), J' g = (g - (1.g)/n 1 - (w_hat.g)/n w_hat) / sigma_o and, as
    1.w_hat = 0, ||J' g||^2 = (||g||^2 - (1.g)^2/n - (w_hat.g)^2 (2/n - |w_hat|^2/n^2)) / sigma_o^2.
    ||g||^2 / sigma_o^2 summed over o is the ghost norm of (A, G / sigma); 1.g = sum_t G_to
    (sum_d A_td) and w_hat.g = sum_t G_to (A w_hat')_to. Samples where these terms cancel are
    recomputed by instantiation, as for the other ghost norms.
    """

    def _same(self, module, x):
        if getattr(module, "same_pad", False):  # StdConv2dSame pads the input in its forward
            from timm.layers.padding import pad_same

            x = pad_same(x, module.kernel_size, module.stride, module.dilation)
        return x

    def _padded(self, module, x):
        return super()._padded(module, self._same(module, x))

    def _conv_args(self, module, x):
        if module.padding_mode == "zeros" and not isinstance(module.padding, str):
            return self._same(module, x), list(module.padding)
        return self._padded(module, x), [0] * self.nd

    def per_sample(self, module, acts, grads, names):
        res = super().per_sample(module, acts, grads, names)
        if "weight" in res:
            res["weight"] = _std_vjp(module, res["weight"])
        return res

    def weight_sum(self, module, acts, grads, c):
        return _std_vjp(module, super().weight_sum(module, acts, grads, c))

    def ghost_sq_norms(self, module, acts, grads, names):
        res = {}
        if "bias" in names:
            res["bias"] = _per_sample_sq(self._bias(module, grads))
        if "weight" not in names:
            return res
        B = grads[0].shape[0]
        dt = _work_dtype(*acts, *grads)
        ng = module.groups
        v = module.weight.detach().to(dt).reshape(module.weight.shape[0], -1)
        n = v.shape[1]
        sigma = (v.var(1, unbiased=False) + module.eps).sqrt()
        w_hat = ((v - v.mean(1, keepdim=True)) / sigma[:, None]).view(ng, -1, n)  # (groups, p, D)
        proj = (2.0 / n - w_hat.pow(2).sum(-1) / n ** 2)  # (groups, p)
        inv = (1.0 / sigma).view(1, ng, 1, -1)
        parts = []
        for rows in _chunks(B, self._sample_bytes(module, acts, grads, ghost=True)):
            A, G = self._cat(module, acts, grads, rows)  # (b, groups, T, D), (b, groups, T, p)
            Gs = G * inv
            prod = torch.matmul(A, A.transpose(-1, -2)).mul_(torch.matmul(Gs, Gs.transpose(-1, -2)))
            one_g = torch.einsum("bnt,bntp->bnp", A.sum(-1), Gs)  # (1.g_o) / sigma_o
            wh_g = (Gs * torch.matmul(A, w_hat.transpose(-1, -2))).sum(2)  # (w_hat_o.g_o) / sigma_o
            terms = one_g.pow(2).sum((1, 2)) / n + (proj * wh_g.pow(2)).sum((1, 2))
            # cancelling terms: those samples are instantiated
            parts.append(_stable_ghost(prod, (1, 2, 3), lambda idx, rows=rows: _per_sample_sq(self.per_sample(
                module, [a[rows][idx] for a in acts], [g[rows][idx] for g in grads], ["weight"])["weight"]),
                minus=terms))
        res["weight"] = parts[0] if len(parts) == 1 else torch.cat(parts)
        return res


@register_rule(_T + "norm_act.GroupNormAct")
@register_rule(_T + "norm_act.GroupNorm1Act")
class GroupNormActRule(GroupNormRule):
    """timm's GroupNormAct: y = act(drop(group_norm(x) * w + b)); G is dL/dy."""

    def check(self, module, names):
        if not isinstance(module.drop, nn.Identity):
            raise UserError(f"{type(module).__name__} with a dropout layer ({type(module.drop).__name__}) is not "
                            "supported by the clipping engine (its mask cannot be replayed); build it without drop_layer")

    def capture(self, module, inputs, output, names):
        return inputs[0]  # the bias's gradient also needs x: the activation's derivative depends on it

    def affine_grad(self, module, a, g, names):
        """x_hat, and the gradient before the activation: a vector-Jacobian product at the recomputed z."""
        xhat = self.normalised(module, a)
        z = xhat
        if module.weight is not None:
            shape = (1, -1) + (1,) * (a.dim() - 2)
            z = z * module.weight.detach().to(a.dtype).view(shape) + module.bias.detach().to(a.dtype).view(shape)
        with torch.enable_grad():
            z0 = z.detach().requires_grad_(True)
            y = module.act(z0.clone())  # clone: the activation may work in place
            gz = torch.autograd.grad(y, z0, g)[0] if y.requires_grad else torch.zeros_like(z)
        return xhat, gz


register_rule(_T + "norm.LayerNorm")(LayerNormRule)
register_rule(_T + "norm.LayerNorm2d")(LayerNormRule)
register_rule(_T + "norm.GroupNorm")(GroupNormRule)
register_rule(_T + "norm.GroupNorm1")(GroupNormRule)
register_rule(_T + "linear.Linear")(LinearRule)  # nn.Linear's forward (a dtype cast only when scripted)

__all__ = ["StdConv2dRule", "GroupNormActRule"]
