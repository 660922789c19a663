"""Per-sample gradient clipping: the engine every DP training run goes through.

    from dpbench.clipping import ClippingEngine
    engine = ClippingEngine(model, max_grad_norm=1.0, method="auto", style="flat")
    losses = F.cross_entropy(model(x), y, reduction="none")
    norms = engine.backward(losses)      # .grad += sum_i clip(g_i); norms["all"] is (B,)

Modules: `engine` (ClippingEngine), `rules` (layer-rule registry), `grouping` (flat / layer /
groups / device), `clipfns` (abadi, automatic), `rules_timm` (timm's StdConv2d, GroupNormAct, ...).
"""

from .clipfns import CLIP_FNS, clip_factors
from .engine import METHODS, ClippingEngine
from .grouping import STYLES
from .rules import DirectParamsRule, LayerRule, MatmulRule, find_rule, register_rule
from .rules_timm import GroupNormActRule, StdConv2dRule  # registers timm's layers by name; imports no timm

__all__ = ["ClippingEngine", "LayerRule", "MatmulRule", "DirectParamsRule", "register_rule", "find_rule",
           "clip_factors", "METHODS", "STYLES", "CLIP_FNS", "StdConv2dRule", "GroupNormActRule"]
