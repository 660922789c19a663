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
  It is linear, so clipped sums are J' (sum_i c_i g_hat_i): exact, one map per step.
- GroupNormAct / GroupNorm1Act (GroupNorm, dropout, activation in one module): the hook
  sees the gradient after the activation; the affine parameters' per-sample gradients need
  the one before it, which is recomputed here from the stored input by a vector-Jacobian
  product through the activation.
- timm's LayerNorm, LayerNorm2d, GroupNorm and GroupNorm1 compute what nn.LayerNorm /
  nn.GroupNorm compute (optionally by a fused kernel): the parents' rules.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import UserError
from .rules import Conv2dRule, GroupNormRule, LayerNormRule, _cast, _work_dtype, register_rule

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

    No ghost norm: the per-channel Jacobian does not fit the (A A')(G G') form, so norms come
    from instantiated per-sample gradients under every method.
    """

    ghost_capable = False

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

    def per_sample(self, module, acts, grads, names):
        res = {}
        dt = _work_dtype(*acts, *grads)
        shape = (1, -1) + (1,) * (acts[0].dim() - 2)
        for a, g in zip(acts, grads):
            xhat = self.normalised(module, _cast(a, dt))
            z = xhat
            if module.weight is not None:
                z = z * module.weight.detach().to(dt).view(shape) + module.bias.detach().to(dt).view(shape)
            with torch.enable_grad():
                z0 = z.detach().requires_grad_(True)
                y = module.act(z0.clone())  # clone: the activation may work in place
                gz = torch.autograd.grad(y, z0, _cast(g, dt))[0] if y.requires_grad else torch.zeros_like(z)
            if "weight" in names:
                w = self.reduce(module, xhat * gz)
                res["weight"] = res["weight"] + w if "weight" in res else w
            if "bias" in names:
                b = self.reduce(module, gz)
                res["bias"] = res["bias"] + b if "bias" in res else b
        return res


register_rule(_T + "norm.LayerNorm")(LayerNormRule)
register_rule(_T + "norm.LayerNorm2d")(LayerNormRule)
register_rule(_T + "norm.GroupNorm")(GroupNormRule)
register_rule(_T + "norm.GroupNorm1")(GroupNormRule)

__all__ = ["StdConv2dRule", "GroupNormActRule"]
