"""Grouping styles: which trainable parameters share one per-sample norm and threshold.

- flat: one group "all" (threshold C);
- layer: one group per trainable layer (module), in module order (default C/sqrt(K));
- groups: named groups from fnmatch patterns on parameter names;
- device: one group per pipeline stage / device, from a placement map or param.device.

The total sensitivity is sqrt(sum_k C_k^2): each group's clipped contribution has norm at
most C_k, and the groups are disjoint blocks of the gradient.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Mapping, Sequence

import torch

from ..errors import UserError

STYLES = ("flat", "layer", "groups", "device")


def make_groups(style: str, params: "dict[str, torch.Tensor]", layer_of: "dict[str, str]",
                groups: Mapping[str, Sequence[str]] | None = None,
                placement: Mapping[str, object] | None = None) -> "dict[str, list[str]]":
    """Map group name -> parameter names (every trainable parameter in exactly one group).

    params: trainable name -> parameter, in model order; layer_of: name -> layer name.
    Group order: style="groups" follows the groups= mapping as written (so does a list of
    thresholds); the other styles follow model order.
    """
    if style not in STYLES:
        raise UserError(f"unknown style {style!r}; use one of {', '.join(STYLES)}")
    if style != "groups" and groups is not None:
        raise UserError(f"groups= is only used with style='groups' (style is {style!r})")
    if style != "device" and placement is not None:
        raise UserError(f"placement= is only used with style='device' (style is {style!r})")
    out: dict[str, list[str]] = {}
    if style == "flat":
        out["all"] = list(params)
    elif style == "layer":
        for name in params:
            out.setdefault(layer_of[name], []).append(name)
    elif style == "groups":
        if not groups:
            raise UserError("style='groups' needs groups={group_name: [fnmatch patterns on parameter names]}")
        for name in params:
            hits = [g for g, pats in groups.items() if any(fnmatch.fnmatchcase(name, p) for p in _patterns(pats, g))]
            if len(hits) != 1:
                what = "no group" if not hits else f"several groups ({', '.join(hits)})"
                raise UserError(f"trainable parameter {name!r} matches {what}; every trainable parameter must "
                                f"match exactly one group's patterns")
            out.setdefault(hits[0], []).append(name)
        empty = [g for g in groups if g not in out]
        if empty:
            raise UserError(f"groups {', '.join(map(repr, empty))} match no trainable parameter; remove them")
        # The order of the groups= mapping as written: a list of thresholds follows it.
        out = {g: out[g] for g in groups}
    else:  # device
        for name, p in params.items():
            if placement is None:
                stage = str(p.device)
            elif name in placement:
                stage = str(placement[name])
            else:
                hits = [k for k in placement if fnmatch.fnmatchcase(name, k)]
                if not hits:
                    raise UserError(f"trainable parameter {name!r} has no entry in placement; map every "
                                    f"parameter name (or an fnmatch pattern) to its stage or device")
                stage = str(placement[hits[0]])
            out.setdefault(stage, []).append(name)
    return out


def _patterns(pats, group):
    if isinstance(pats, str):
        return [pats]
    try:
        return list(pats)
    except TypeError:
        raise UserError(f"groups[{group!r}] must be a list of fnmatch patterns") from None


def resolve_thresholds(style: str, names: list[str], max_grad_norm: float, thresholds) -> "dict[str, float]":
    """Per-group thresholds: flat -> C; otherwise None -> C/sqrt(K), a float, a list or a dict.

    A list is matched to `names` in order (make_groups' order: for style="groups" the order of
    the groups= mapping as written).
    """
    _check_positive("max_grad_norm", max_grad_norm)
    K = len(names)
    if style == "flat":
        if thresholds is not None:
            raise UserError("thresholds= is for the layer/groups/device styles; flat clipping uses max_grad_norm")
        return {"all": float(max_grad_norm)}
    if thresholds is None:
        out = {g: max_grad_norm / math.sqrt(K) for g in names}
    elif isinstance(thresholds, (int, float)):
        out = {g: float(thresholds) for g in names}
    elif isinstance(thresholds, Mapping):
        missing = [g for g in names if g not in thresholds]
        extra = [g for g in thresholds if g not in names]
        if missing or extra:
            raise UserError(f"thresholds dict must name exactly the groups {names}; missing {missing}, unknown {extra}")
        out = {g: float(thresholds[g]) for g in names}
    else:
        vals = list(thresholds)
        if len(vals) != K:
            raise UserError(f"thresholds list has {len(vals)} entries but there are {K} groups ({names})")
        out = {g: float(v) for g, v in zip(names, vals)}
    for g, c in out.items():
        _check_positive(f"threshold of group {g!r}", c)
    return out


def _check_positive(what, value):
    try:
        ok = float(value) > 0 and math.isfinite(float(value))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UserError(f"{what} must be a positive number (got {value!r})")
