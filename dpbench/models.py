"""Model registry: small nets for the CPU, any timm model by name, and the surgery DP needs.

- `create_model(name, num_classes, ...)`: "small_cnn" and "mlp" (registered here with
  `@register_model`), or any timm model name (timm is imported only then).
- BatchNorm mixes the examples of a batch, so one example's gradient depends on the others
  and per-example clipping no longer bounds its influence. `norm="group"` (default)
  replaces every BatchNorm by GroupNorm; `norm="batch"` keeps it, and
  `assert_no_batchnorm` (called by the engine) then refuses the model.
- Zero-initialised classifier heads (`zero_init_head`): a zero head makes the first noisy
  steps start from a neutral classifier, which helps DP fine-tuning.
- Freezing by fnmatch patterns on parameter names (`set_trainable`, `freeze`, `unfreeze`,
  `resolve_patterns`); named trainable subsets (`trainable_subset`, `apply_subset`: head,
  last_block+head, ..., all; Cattan et al. 2022) turn into fnmatch patterns per model family
  and are resolved with `resolve_patterns`.
- Weights: timm's hub when online, or a local file (safetensors, or a torch state_dict read
  with `weights_only=True`; nothing else is ever unpickled). `save_checkpoint` writes
  safetensors atomically with JSON metadata (e.g. which examples were public).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from dpbench.atomic import write_atomic
from dpbench.errors import UserError

__all__ = [
    "MODELS",
    "SUBSETS",
    "SubsetNames",
    "apply_subset",
    "assert_no_batchnorm",
    "convert_batchnorm_to_groupnorm",
    "count_trainable",
    "create_model",
    "find_head",
    "freeze",
    "group_norm_groups",
    "head_parameter_names",
    "load_checkpoint",
    "register_model",
    "resolve_patterns",
    "save_checkpoint",
    "set_trainable",
    "subset_family",
    "subset_patterns",
    "subset_table",
    "trainable_names",
    "trainable_subset",
    "unfreeze",
    "zero_init_head",
]

NORMS = ("group", "batch", "none")

# --------------------------------------------------------------------------- registry

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Decorator registering `builder(num_classes, in_chans, img_size, norm, **kw) -> nn.Module`."""

    def wrap(fn):
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = fn
        return fn

    return wrap


def group_norm_groups(num_channels: int, max_groups: int = 32) -> int:
    """Largest divisor of `num_channels` that is at most `max_groups` (32 as in Wu & He 2018)."""
    for g in range(min(max_groups, num_channels), 0, -1):
        if num_channels % g == 0:
            return g
    return 1


def _norm2d(norm: str, channels: int) -> nn.Module:
    if norm == "group":
        return nn.GroupNorm(group_norm_groups(channels), channels)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


def _activation(act: str) -> nn.Module:
    acts = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "elu": nn.ELU}
    if act not in acts:
        raise UserError(f"unknown activation {act!r}; choose one of: {', '.join(acts)}")
    return acts[act]()


class ConvBlock(nn.Module):
    """conv3x3 -> norm -> activation -> optional 2x2 max-pool."""

    def __init__(self, cin, cout, norm, act, pool):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none")
        self.norm = _norm2d(norm, cout)
        self.act = _activation(act)
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x):
        return self.pool(self.act(self.norm(self.conv(x))))


class SmallCNN(nn.Module):
    """A few conv blocks (channels width, 2*width, 4*width, ...), adaptive pooling, linear head.

    Parameter names: blocks.<i>.conv.*, blocks.<i>.norm.*, head.*. Every block but the last
    halves the resolution while it is at least 2; the adaptive average pool to
    `pool_size` x `pool_size` then accepts any input size (8x8 digits, 32x32 CIFAR, ...).
    """

    def __init__(self, num_classes, in_chans=3, img_size=32, norm="group", width=16, depth=3,
                 act="relu", pool_size=2):
        super().__init__()
        chans = [in_chans] + [width * 2 ** min(i, 2) for i in range(depth)]
        size = img_size
        blocks = []
        for i in range(depth):
            pool = i < depth - 1 and size >= 2
            blocks.append(ConvBlock(chans[i], chans[i + 1], norm, act, pool))
            size = size // 2 if pool else size
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.num_features = chans[-1] * pool_size * pool_size
        self.head = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x):
        return torch.flatten(self.pool(self.blocks(x)), 1)

    def forward(self, x):
        return self.head(self.forward_features(x))

    def get_classifier(self):
        return self.head


class MLPBlock(nn.Module):
    def __init__(self, din, dout, act):
        super().__init__()
        self.fc = nn.Linear(din, dout)
        self.act = _activation(act)

    def forward(self, x):
        return self.act(self.fc(x))


class MLP(nn.Module):
    """Flatten -> hidden Linear+activation blocks -> linear head. Names: blocks.<i>.fc.*, head.*.

    The input size is fixed: in_chans * img_size * img_size (img_size may be (H, W)).
    """

    def __init__(self, num_classes, in_chans=3, img_size=32, hidden=(256,), act="relu"):
        super().__init__()
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        dims = [in_chans * h * w] + [int(d) for d in hidden]
        self.blocks = nn.Sequential(*[MLPBlock(dims[i], dims[i + 1], act) for i in range(len(hidden))])
        self.num_features = dims[-1]
        self.head = nn.Linear(dims[-1], num_classes)

    def forward_features(self, x):
        return self.blocks(torch.flatten(x, 1))

    def forward(self, x):
        return self.head(self.forward_features(x))

    def get_classifier(self):
        return self.head


@register_model("small_cnn")
def _small_cnn(num_classes, in_chans=3, img_size=32, norm="group", width=16, depth=3, act="relu", pool_size=2):
    """Small CNN for the CPU (see `SmallCNN`); ~25k parameters at width 16."""
    if depth < 1 or width < 1:
        raise UserError(f"small_cnn needs depth >= 1 and width >= 1, got depth={depth} width={width}")
    size = img_size if isinstance(img_size, int) else min(img_size)
    return SmallCNN(num_classes, in_chans, size, norm, width, depth, act, pool_size)


@register_model("mlp")
def _mlp(num_classes, in_chans=3, img_size=32, norm="group", hidden=(256,), act="relu"):
    """Multi-layer perceptron on flattened pixels (no normalisation layers; `norm` unused)."""
    if isinstance(hidden, int):
        hidden = (hidden,)
    return MLP(num_classes, in_chans, img_size, tuple(hidden), act)


class WideBasicBlock(nn.Module):
    """Pre-activation wide-ResNet block: norm-relu-conv3x3, norm-relu-conv3x3, plus a 1x1
    projection shortcut when the shape changes (Zagoruyko & Komodakis 2016)."""

    def __init__(self, cin, cout, stride, norm):
        super().__init__()
        self.norm1 = _norm2d(norm, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm2 = _norm2d(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
                         if stride != 1 or cin != cout else None)

    def forward(self, x):
        o = F.relu(self.norm1(x))
        # the projection takes the pre-activated input, as in the original WRN code
        short = x if self.shortcut is None else self.shortcut(o)
        o = self.conv1(o)
        o = self.conv2(F.relu(self.norm2(o)))
        return o + short


class WideResNet(nn.Module):
    """WRN-depth-k for 32 px images: stem conv3x3(16), three stages of (depth-4)/6 blocks at
    16k, 32k, 64k channels (strides 1, 2, 2), norm-relu, global average pool, linear head.

    WRN16-4 (~2.7M parameters) with GroupNorm is the model of He et al. (2023) for CIFAR-10.
    Names: stem.*, stages.<s>.<b>.*, norm.*, head.*; stages are the blocks of `apply_subset`.
    """

    def __init__(self, num_classes, in_chans=3, depth=16, widen=4, norm="group"):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise UserError(f"wide ResNet depth must be 6n+4 >= 10 (10, 16, 22, 28, ...), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        stages = []
        for s in range(3):
            blocks = [WideBasicBlock(widths[s] if b == 0 else widths[s + 1], widths[s + 1],
                                     (1 if s == 0 else 2) if b == 0 else 1, norm) for b in range(n)]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.norm = _norm2d(norm, widths[3])
        self.num_features = widths[3]
        self.head = nn.Linear(widths[3], num_classes)

    def forward_features(self, x):
        x = F.relu(self.norm(self.stages(self.stem(x))))
        return x.mean(dim=(2, 3))

    def forward(self, x):
        return self.head(self.forward_features(x))

    def get_classifier(self):
        return self.head


@register_model("wrn16_4")
def _wrn16_4(num_classes, in_chans=3, img_size=32, norm="group", depth=16, widen=4):
    """Wide ResNet 16-4 (see `WideResNet`); any input size (global pooling); `img_size` unused."""
    return WideResNet(num_classes, in_chans, depth, widen, norm)


# --------------------------------------------------------------------------- create_model


def create_model(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    img_size: int = 32,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    norm: str = "group",
    zero_head: bool = True,
    resize_to: int = 0,
    **kw,
) -> nn.Module:
    """Build model `name` ("small_cnn", "mlp" or any timm name) ready for DP training.

    norm: "group" replaces BatchNorm by GroupNorm (affine weights copied), "batch" keeps it
    (the clipping engine will refuse it), "none" uses no normalisation (small nets) or
    replaces BatchNorm by identity (timm). zero_head zeroes the classifier unless its
    weights came from `pretrained` weights for the same classes. pretrained: timm hub
    weights (needs the network). checkpoint: a local .safetensors file or torch
    state_dict, loaded strictly except for a head of another shape, which is skipped.
    img_size goes to timm only for models that take it (ViTs). resize_to > 0: every input is
    resized (bilinear) to resize_to x resize_to px before the model, which is then built for that
    size (a net pretrained at 224 px fed 32 px CIFAR images); per-example, so clipping is unaffected.
    Notes about loading are kept in `model.dpbench_notes`.
    """
    if norm not in NORMS:
        raise UserError(f"unknown norm {norm!r}; choose one of: {', '.join(NORMS)}")
    if int(num_classes) < 1:
        raise UserError(f"num_classes must be >= 1, got {num_classes}")
    notes: list[str] = []
    head_from_weights = False
    if int(resize_to) < 0:
        raise UserError(f"resize_to must be >= 0 (0: no resizing), got {resize_to}")
    if resize_to:
        img_size = int(resize_to)
    if name in MODELS:
        if pretrained:
            raise UserError(
                f"{name!r} has no hub weights; train it (e.g. notebook 03) and pass checkpoint=PATH"
            )
        try:
            model = MODELS[name](num_classes, in_chans=in_chans, img_size=img_size, norm=norm, **kw)
        except TypeError as e:
            raise UserError(f"bad argument for model {name!r}: {e}") from e
    else:
        model = _create_timm(name, num_classes, in_chans, img_size, pretrained, **kw)
        if pretrained:
            cfg = getattr(model, "pretrained_cfg", {}) or {}
            head_from_weights = cfg.get("num_classes") == num_classes
            notes.append(f"weights: timm hub {cfg.get('hf_hub_id') or cfg.get('url') or name}")

    if zero_head and not head_from_weights:
        zero_init_head(model)

    state = None
    if checkpoint is not None:
        state, _ = _read_checkpoint(checkpoint)
        # A checkpoint with BatchNorm statistics was saved from a BN model: load it before
        # conversion so the affine weights travel into the GroupNorm layers.
        if any(k.endswith(".running_mean") for k in state) and _has_batchnorm(model):
            notes += _apply_state(model, state, strict=True, skip_head_mismatch=True, where=str(checkpoint))
            state = None

    if norm == "group":
        convert_batchnorm_to_groupnorm(model)
    elif norm == "none":
        _replace_batchnorm(model, lambda bn, qual: nn.Identity())

    if state is not None:
        notes += _apply_state(model, state, strict=True, skip_head_mismatch=True, where=str(checkpoint))
    if checkpoint is not None:
        notes.append(f"weights: {checkpoint}")
    if resize_to:
        model.register_forward_pre_hook(ResizeInput(int(resize_to)))
        notes.append(f"inputs resized to {int(resize_to)} px")
    model.dpbench_notes = notes
    return model


class ResizeInput:
    """Forward pre-hook resizing a batch of images to size x size (bilinear; no-op when it
    already is). A class, not a lambda, so that models holding it can be copied and pickled."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, module: nn.Module, args: tuple) -> tuple | None:
        x = args[0]
        if x.dim() != 4 or tuple(x.shape[-2:]) == (self.size, self.size):
            return None
        return (F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False),) + tuple(args[1:])


def _create_timm(name, num_classes, in_chans, img_size, pretrained, **kw):
    import timm

    if ":" not in name and not timm.is_model(name):  # "hf-hub:org/name" goes straight to timm
        raise UserError(
            f"unknown model {name!r}: use one of {', '.join(sorted(MODELS))} or a timm model name "
            f"(list them with timm.list_models('resnet*'))"
        )
    args = dict(num_classes=int(num_classes), in_chans=int(in_chans), **kw)
    try:
        try:
            return timm.create_model(name, pretrained=pretrained, img_size=img_size, **args)
        except TypeError as e:
            # Only some timm families (ViTs, ...) take img_size; the others are size-agnostic.
            if "img_size" not in str(e):
                raise
            return timm.create_model(name, pretrained=pretrained, **args)
    except TypeError as e:
        raise UserError(f"bad argument for timm model {name!r}: {e}") from e
    except Exception as e:  # hub download failures come as OSError, HTTP and hub errors
        if not pretrained:
            raise
        raise UserError(
            f"could not fetch timm weights for {name} (offline?): pass checkpoint=PATH to a local "
            f"file (.safetensors or a torch state_dict loaded with weights_only=True) "
            f"[{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}]"
        ) from e


# --------------------------------------------------------------------------- BatchNorm


def _is_batchnorm(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


def _has_batchnorm(model: nn.Module) -> bool:
    return any(_is_batchnorm(m) for m in model.modules())


def _replace_batchnorm(model: nn.Module, make: Callable[[nn.Module, str], nn.Module]) -> int:
    """Replace every BatchNorm module (in place, recursively) by make(bn, qualified_name)."""
    count = 0
    for qual, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if _is_batchnorm(child):
                full = f"{qual}.{child_name}" if qual else child_name
                setattr(module, child_name, make(child, full))
                count += 1
    return count


def convert_batchnorm_to_groupnorm(model: nn.Module, num_groups: int | Callable[[int], int] | None = None) -> nn.Module:
    """Replace every BatchNorm in `model` (in place) by GroupNorm over the same channels.

    num_groups: None (largest divisor of C up to 32), an int (must divide every C), or a
    function C -> groups. Affine weight and bias are copied, so a pretrained network keeps
    its per-channel scales; running statistics are dropped (GroupNorm has none). timm's
    BatchNormAct2d becomes GroupNormAct with the same activation and drop layers.
    Returns the model.
    """

    def groups_for(c: int, qual: str) -> int:
        g = group_norm_groups(c) if num_groups is None else (num_groups(c) if callable(num_groups) else int(num_groups))
        if g < 1 or c % g:
            raise UserError(f"num_groups={g} does not divide the {c} channels of {qual}; pass num_groups=None")
        return g

    def make(bn: nn.Module, qual: str) -> nn.Module:
        c = bn.num_features
        g = groups_for(c, qual)
        gn = None
        if hasattr(bn, "act") and hasattr(bn, "drop"):  # timm BatchNormAct2d
            from timm.layers import GroupNormAct

            gn = GroupNormAct(c, g, eps=bn.eps, affine=bn.affine)
            gn.act, gn.drop = bn.act, bn.drop
        else:
            gn = nn.GroupNorm(g, c, eps=bn.eps, affine=bn.affine)
        if bn.affine:
            with torch.no_grad():
                gn.weight.copy_(bn.weight)
                gn.bias.copy_(bn.bias)
            gn.weight.requires_grad_(bn.weight.requires_grad)
            gn.bias.requires_grad_(bn.bias.requires_grad)
        ref = next(iter(bn.parameters()), None)
        return gn if ref is None else gn.to(device=ref.device, dtype=ref.dtype)

    _replace_batchnorm(model, make)
    return model


def assert_no_batchnorm(model: nn.Module) -> None:
    """Raise UserError naming the first BatchNorm module: it mixes examples, breaking DP."""
    for qual, m in model.named_modules():
        if _is_batchnorm(m):
            raise UserError(
                f"model has BatchNorm module {qual or '<root>'!r} ({type(m).__name__}), which mixes "
                f"the examples of a batch and breaks per-example privacy; create the model with "
                f'norm="group" or call dpbench.models.convert_batchnorm_to_groupnorm(model)'
            )


# --------------------------------------------------------------------------- heads


def find_head(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(qualified name, module) of the classifier head: timm's/our `get_classifier()`, else
    the last nn.Linear. None when the model has no head (e.g. timm with num_classes=0)."""
    head = None
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        if isinstance(head, nn.Identity) or not any(True for _ in head.parameters()):
            return None
    else:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    if head is None:
        return None
    for qual, m in model.named_modules():
        if m is head:
            return qual, head
    return None  # pragma: no cover - get_classifier returns a submodule


def head_parameter_names(model: nn.Module) -> list[str]:
    """Names of the classifier head's parameters (e.g. ["fc.weight", "fc.bias"])."""
    found = find_head(model)
    if found is None:
        return []
    qual, head = found
    return [f"{qual}.{n}" if qual else n for n, _ in head.named_parameters()]


def zero_init_head(model: nn.Module) -> nn.Module | None:
    """Set the classifier head's weights and biases to zero; returns the head (or None)."""
    found = find_head(model)
    if found is None:
        return None
    with torch.no_grad():
        for p in found[1].parameters():
            p.zero_()
    return found[1]


# --------------------------------------------------------------------------- freezing


def _patterns(patterns) -> list[str]:
    if isinstance(patterns, str):
        return [patterns]
    pats = list(patterns)
    if not pats or not all(isinstance(p, str) for p in pats):
        raise UserError(f"patterns must be a non-empty list of strings, got {patterns!r}")
    return pats


def resolve_patterns(model: nn.Module, patterns: str | Iterable[str]) -> list[str]:
    """Parameter names matching any fnmatch pattern (case-sensitive), in model order.

    A pattern that matches nothing is a UserError listing a few valid names: a typo must
    never silently train (or freeze) the wrong set.
    """
    names = [n for n, _ in model.named_parameters()]
    pats = _patterns(patterns)
    for p in pats:
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            shown = ", ".join(names if len(names) <= 6 else names[:4] + ["..."] + names[-2:])
            raise UserError(
                f"pattern {p!r} matches no parameter of {type(model).__name__}; "
                f"names look like: {shown} (fnmatch syntax, e.g. 'layer4.*' or '*.bias')"
            )
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats)]


def set_trainable(model: nn.Module, patterns: str | Iterable[str]) -> list[str]:
    """Make exactly the parameters matching `patterns` trainable; freeze all others.

    Returns the trainable names."""
    chosen = set(resolve_patterns(model, patterns))
    for n, p in model.named_parameters():
        p.requires_grad_(n in chosen)
    return trainable_names(model)


def freeze(model: nn.Module, patterns: str | Iterable[str]) -> list[str]:
    """Freeze the parameters matching `patterns` (others unchanged); returns the trainable names."""
    return _set_matching(model, patterns, False)


def unfreeze(model: nn.Module, patterns: str | Iterable[str]) -> list[str]:
    """Make the parameters matching `patterns` trainable (others unchanged); returns trainable names."""
    return _set_matching(model, patterns, True)


def _set_matching(model: nn.Module, patterns: str | Iterable[str], trainable: bool) -> list[str]:
    """Set requires_grad on the parameters matching `patterns`; returns the trainable names."""
    chosen = set(resolve_patterns(model, patterns))
    for n, p in model.named_parameters():
        if n in chosen:
            p.requires_grad_(trainable)
    return trainable_names(model)


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters with requires_grad, in model order."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def count_trainable(model: nn.Module) -> int:
    """Number of trainable scalars (sum of numel over parameters with requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- named subsets

# Cattan, Choquette-Choo, Papernot & Thakurta (2022, arXiv 2210.02156): which layers of a
# pretrained network are fine-tuned under DP is a hyperparameter. The named subsets below
# are the candidates; each is turned into fnmatch patterns for the model's family and
# resolved with `resolve_patterns`, so the exact parameter names are visible and testable.
SUBSETS = (
    "head",
    "last_block+head",
    "last_two_blocks+head",
    "norms+head",
    "bias+head",
    "first_conv+head",
    "all",
)

# family -> regex matching the qualified names of its "blocks" (in model order)
_BLOCK_RE = {
    "small_cnn": r"blocks\.\d+",
    "mlp": r"blocks\.\d+",
    "resnet": r"layer\d+\.\d+",  # residual blocks (BasicBlock / Bottleneck), not whole stages
    "vit": r"blocks\.\d+",
}
_NORM_TYPES = (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._BatchNorm)


class SubsetNames(list):
    """The parameter names a named subset trains (a list, in model order), with
    `.subset` (its name), `.patterns` (the fnmatch patterns it was resolved from) and
    `.num_params` (trainable scalars)."""

    def __init__(self, names, subset: str, patterns: list[str], num_params: int):
        super().__init__(names)
        self.subset = subset
        self.patterns = list(patterns)
        self.num_params = int(num_params)

    def __repr__(self) -> str:
        return f"SubsetNames({self.subset!r}: {len(self)} tensors, {self.num_params} parameters)"


def subset_family(model: nn.Module) -> str:
    """The model family named subsets understand: "small_cnn", "mlp", "resnet" (timm
    ResNet) or "vit" (timm VisionTransformer and its subclasses); UserError otherwise."""
    if isinstance(model, SmallCNN):
        return "small_cnn"
    if isinstance(model, MLP):
        return "mlp"
    mro = {(c.__module__.split(".")[0], c.__name__) for c in type(model).__mro__}
    if ("timm", "ResNet") in mro:
        return "resnet"
    if ("timm", "VisionTransformer") in mro:
        return "vit"
    raise UserError(
        f"named trainable subsets do not know models of type {type(model).__name__}; supported families: "
        f"small_cnn, mlp, timm ResNet (resnet18, resnet50, ...), timm VisionTransformer (vit_*, deit_*); "
        f"for other models choose parameters with set_trainable(model, patterns)"
    )


def _blocks(model: nn.Module, family: str) -> list[str]:
    rx = re.compile(_BLOCK_RE[family])
    return [n for n, _ in model.named_modules() if rx.fullmatch(n)]


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _tail_modules(model: nn.Module, family: str) -> list[str]:
    """Modules with parameters between the last block and the head (a ViT's final norm):
    they belong to "the last block" for the block subsets."""
    if family != "vit":
        return []
    return [n for n in ("norm", "fc_norm") if hasattr(model, n) and _has_params(getattr(model, n))]


def subset_patterns(model: nn.Module, subset: str) -> list[str]:
    """The fnmatch patterns (on parameter names) that make up named subset `subset` of
    `model` (see SUBSETS); e.g. resnet18 "last_block+head" -> ["layer4.1.*", "fc.*"]."""
    if subset not in SUBSETS:
        raise UserError(f"unknown trainable subset {subset!r}; choose one of: {', '.join(SUBSETS)}")
    family = subset_family(model)
    if subset == "all":
        return ["*"]
    head = find_head(model)
    if head is None:
        raise UserError(f"{type(model).__name__} has no classifier head (num_classes=0?); every subset but 'all' trains it")
    pats = [f"{head[0]}.*"]
    part = subset.split("+")[0]
    if part == "head":
        return pats
    if part in ("last_block", "last_two_blocks"):
        blocks = _blocks(model, family)
        k = 1 if part == "last_block" else 2
        if len(blocks) < k:
            raise UserError(f"{type(model).__name__} has {len(blocks)} block(s); subset {subset!r} needs {k}")
        return [f"{b}.*" for b in blocks[-k:]] + [f"{t}.*" for t in _tail_modules(model, family)] + pats
    if part == "norms":
        norms = [n for n, m in model.named_modules() if isinstance(m, _NORM_TYPES) and _has_params(m)]
        if not norms:
            raise UserError(f"{type(model).__name__} ({family}) has no normalisation layers with parameters; "
                            f"subset 'norms+head' would only train the head: use 'head'")
        return [f"{n}.*" for n in norms] + pats
    if part == "bias":
        if not any(n.endswith(".bias") for n, _ in model.named_parameters()):
            raise UserError(f"{type(model).__name__} has no bias parameters; subset 'bias+head' is undefined for it")
        return ["*.bias"] + pats
    # first_conv: the first Conv2d in model order (ResNet stem, ViT patch embedding)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise UserError(f"{type(model).__name__} ({family}) has no convolution; subset 'first_conv+head' is undefined for it")
    return [f"{convs[0]}.*"] + pats


def trainable_subset(model: nn.Module, subset: str) -> SubsetNames:
    """Parameter names of named subset `subset` (a `SubsetNames` list in model order, with
    `.num_params`). Subsets (SUBSETS): head (the classifier); last_block+head and
    last_two_blocks+head (the last one or two blocks: small nets' `blocks.<i>`, ResNet
    residual blocks `layerS.B`, ViT `blocks.<i>` plus its final norm); norms+head (every
    GroupNorm/LayerNorm/BatchNorm affine); bias+head (BiTFiT: every bias, plus the head's
    weight); first_conv+head (the first Conv2d: ResNet `conv1`, ViT `patch_embed.proj`);
    all. Unknown subsets or model families raise UserError listing the valid ones."""
    pats = subset_patterns(model, subset)
    params = dict(model.named_parameters())
    names = resolve_patterns(model, pats)  # every pattern must match something
    return SubsetNames(names, subset, pats, sum(params[n].numel() for n in names))


def apply_subset(model: nn.Module, subset: str) -> SubsetNames:
    """Make exactly named subset `subset` trainable (requires_grad) and freeze the rest;
    returns its `SubsetNames` (names and `.num_params`)."""
    names = trainable_subset(model, subset)
    chosen = set(names)
    for n, p in model.named_parameters():
        p.requires_grad_(n in chosen)
    return names


def subset_table(model: nn.Module, subsets: Iterable[str] = SUBSETS) -> list[dict]:
    """One row per subset: subset, tensors, params (trained scalars), fraction of all."""
    total = sum(p.numel() for p in model.parameters())
    rows = []
    for s in subsets:
        names = trainable_subset(model, s)
        rows.append({"subset": s, "tensors": len(names), "params": names.num_params,
                     "fraction": names.num_params / total if total else 0.0})
    return rows


# --------------------------------------------------------------------------- checkpoints

# safetensors metadata is a flat str -> str map. String values are stored verbatim (other
# tools can read them with safe_open(...).metadata()); any other JSON value is stored as
# JSON text and its key listed under _JSON_KEYS so load_checkpoint restores its type.
_JSON_KEYS = "__dpbench_json_keys__"


def save_checkpoint(model: nn.Module, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write the model's state_dict to `path` as safetensors, atomically, with JSON metadata.

    metadata: a dict with string keys and JSON-serialisable values (e.g.
    {"public_indices": [...], "data": "digits"}); string values are stored verbatim as
    safetensors metadata, others as JSON text. `load_checkpoint` returns the same dict.
    """
    from safetensors.torch import save

    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"checkpoints are written as safetensors: name the file *.safetensors, got {path}")
    meta: dict[str, str] = {}
    json_keys = []
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or k == _JSON_KEYS:
            raise UserError(f"checkpoint metadata keys must be strings other than {_JSON_KEYS!r}, got {k!r}")
        if isinstance(v, str):
            meta[k] = v
            continue
        try:
            meta[k] = json.dumps(v, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise UserError(f"checkpoint metadata {k!r} must be a string or JSON-serialisable: {e}") from e
        json_keys.append(k)
    if json_keys:
        meta[_JSON_KEYS] = json.dumps(sorted(json_keys))
    # clone: safetensors refuses tensors sharing storage (tied weights, views)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, save(state, metadata=meta))
    return path


def _read_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, metadata) from a .safetensors file or a torch file read with weights_only."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass the path of a .safetensors or torch state_dict file")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                raw_meta = f.metadata() or {}
        except Exception as e:
            raise UserError(f"could not read safetensors checkpoint {path}: {e}") from e
        meta = dict(raw_meta)
        for k in json.loads(meta.pop(_JSON_KEYS, "[]")):
            if k in meta:
                meta[k] = json.loads(meta[k])
        return state, meta
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for anything beyond tensors and containers
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"refusing to load {path}: it is not a plain state_dict readable with "
            f"torch.load(weights_only=True) ({first}); re-save it as safetensors or as "
            f"torch.save(model.state_dict())"
        ) from e
    # unwrap common containers: {"state_dict": ...}, {"model": ...}
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} does not hold a state_dict (a dict of tensors)")
    return dict(obj), {}


def _apply_state(model, state, strict=True, skip_head_mismatch=False, where="checkpoint") -> list[str]:
    """Load `state` into `model`; returns notes. Raises UserError on mismatches when strict.

    skip_head_mismatch: classifier-head tensors of another shape (other num_classes) are left
    as initialised and noted, instead of failing.
    """
    own = model.state_dict()
    # checkpoints saved from DataParallel/DDP prefix every key with "module."
    if state and all(k.startswith("module.") for k in state) and not any(k.startswith("module.") for k in own):
        state = {k[len("module."):]: v for k, v in state.items()}
    head = set(head_parameter_names(model))
    notes, problems, load = [], [], {}
    for k, v in state.items():
        if k not in own:
            problems.append(f"unexpected key {k}")
        elif own[k].shape != v.shape:
            if skip_head_mismatch and k in head:
                notes.append(f"skipped head tensor {k}: checkpoint shape {tuple(v.shape)} != model {tuple(own[k].shape)}")
            else:
                problems.append(f"shape of {k}: checkpoint {tuple(v.shape)} != model {tuple(own[k].shape)}")
        else:
            load[k] = v
    missing = [k for k in own if k not in state]
    problems += [f"missing key {k}" for k in missing]
    if problems and strict:
        more = f" (+{len(problems) - 4} more)" if len(problems) > 4 else ""
        raise UserError(
            f"{where} does not fit {type(model).__name__}: {'; '.join(problems[:4])}{more}; "
            f"check the model name, num_classes and norm, or load with strict=False"
        )
    notes += problems
    model.load_state_dict(load, strict=False)
    return notes


def load_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True,
                    skip_head_mismatch: bool = False) -> dict:
    """Load weights from `path` into `model` and return the checkpoint's metadata dict.

    .safetensors files are read with safetensors; anything else with
    torch.load(weights_only=True), so a file that needs arbitrary code is refused.
    strict: every key must match in name and shape; skip_head_mismatch leaves a classifier
    head of another shape as initialised. Notes land in `model.dpbench_notes`.
    """
    state, meta = _read_checkpoint(path)
    notes = _apply_state(model, state, strict=strict, skip_head_mismatch=skip_head_mismatch, where=str(path))
    model.dpbench_notes = list(getattr(model, "dpbench_notes", [])) + notes
    return meta
