"""Features for last-layer DP training: frozen backbones, an on-disk cache, synthetic features.

A frozen backbone is run once over a data set and its penultimate activations are cached
on disk (safetensors, written atomically), keyed by a hash of (model name, weights id,
data set name, split, size, transform). `cached_features` returns them with the labels and
says whether the cache was hit.

Backbones, each returned as a `Backbone` whose `.source` and `.note` say where it came from:
- `timm_backbone`: timm's pretrained weights for a timm model name, when they can be fetched
  (or are in the local Hugging Face cache); offline it returns None and the reason;
- `checkpoint_backbone`: a dpbench.models model loaded from a safetensors checkpoint path;
- `public_backbone`: a model trained non-privately here on public examples.
Which one to use, and where an upstream checkpoint lives, is the caller's decision
(`dpbench.experiments.last_layer_features.select_backbone`).

Raw normalised pixels are also offered as features (`pixel_features`).

Feature normalisation (`PublicNormalizer`) is fitted on public features only: a mean or
scale computed from the private set would be an unaccounted release about it.

`synthetic_features` draws a Gaussian-mixture feature set that resembles penultimate
activations (non-negative after a ReLU, anisotropic) for solver comparisons at large n.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save
from tqdm.auto import tqdm

from dpbench.atomic import write_atomic
from dpbench.data import StreamedImages
from dpbench.errors import UserError
from dpbench.models import create_model, find_head, load_checkpoint
from dpbench.training.loop import BatchSpec, EvalSpec, OptimSpec, fit

FEATURE_CACHE_ENV = "DPBENCH_FEATURES"
FORMAT_VERSION = 1


# ------------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """`$DPBENCH_FEATURES`, else ~/.cache/dpbench/features."""
    env = os.environ.get(FEATURE_CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "dpbench" / "features"


def cache_key(
    model_name: str,
    weights_id: str,
    dataset: str,
    split: str,
    size: int,
    transform: str | dict | None = None,
) -> str:
    """Hex key of the cache entry: sha256 of the canonical JSON of its parts (24 chars)."""
    parts = {
        "format": FORMAT_VERSION,
        "model": str(model_name),
        "weights": str(weights_id),
        "dataset": str(dataset),
        "split": str(split),
        "size": int(size),
        "transform": transform if isinstance(transform, dict) else str(transform or ""),
    }
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 (16 hex chars) of a model's state dict: names, dtypes, shapes and values."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


@dataclass
class FeatureSet:
    """Features (n, d) float32 and labels (n,) long, with where they came from."""

    features: torch.Tensor
    labels: torch.Tensor
    key: str = ""
    path: Path | None = None
    hit: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


def save_features(path: str | os.PathLike, features: torch.Tensor, labels: torch.Tensor, meta: dict | None = None) -> Path:
    """Write features and labels as safetensors, atomically (temporary file + rename)."""
    blob = save(
        {"features": features.detach().cpu().float().contiguous(), "labels": labels.detach().cpu().long().contiguous()},
        metadata={"meta": json.dumps(meta or {}, sort_keys=True, default=str)},
    )
    return write_atomic(path, blob)


def load_features(path: str | os.PathLike) -> FeatureSet:
    """Read a file written by `save_features` (safetensors: no code is executed)."""
    path = Path(path)
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads((fh.metadata() or {}).get("meta", "{}"))
        feats, labels = fh.get_tensor("features"), fh.get_tensor("labels")
    return FeatureSet(feats, labels, key=meta.get("key", ""), path=path, hit=True, meta=meta)


# ---------------------------------------------------------------------------- extraction


def _head_module(model: torch.nn.Module) -> torch.nn.Module | None:
    """The classifier whose input are the features (`dpbench.models.find_head`); None when
    the model has no head (then its output are the features, e.g. timm with num_classes=0)."""
    found = find_head(model)
    return None if found is None else found[1]


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    x: torch.Tensor,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    resize: int | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Penultimate features of `model` (eval mode) for inputs `x` (N, C, H, W), batch by
    batch: the input of the classifier head, flattened. `resize` bilinearly resizes the
    images first (e.g. 32 -> 224 for ImageNet backbones). Returns float32 on the CPU.
    An image folder's `.x` (`StreamedImages`) is streamed through `dataset.loader()`: decoded
    by DataLoader workers into pinned memory, never held whole."""
    dev = torch.device(device)
    model = model.to(dev).eval()
    head = _head_module(model)
    captured: list[torch.Tensor] = []
    hook = None
    if head is not None:
        hook = head.register_forward_pre_hook(lambda _m, inp: captured.append(inp[0].flatten(1)))
    out = []
    try:
        starts = range(0, len(x), batch_size)
        if isinstance(x, StreamedImages):  # an image folder: streamed by DataLoader workers, pinned
            batches = (xb for xb, _ in x.dataset.loader(batch_size))
        else:
            batches = (x[start:start + batch_size] for start in starts)
        for xb in tqdm(batches, total=len(starts), desc="features", disable=not progress or len(starts) < 2,
                       leave=False):
            xb = xb.to(dev, dtype=torch.float32, non_blocking=True)
            if resize is not None and xb.shape[-1] != resize:
                xb = torch.nn.functional.interpolate(xb, size=(resize, resize), mode="bilinear", align_corners=False)
            captured.clear()
            y = model(xb)
            feats = captured[-1] if head is not None else y.flatten(1)
            out.append(feats.float().cpu())
    finally:
        if hook is not None:
            hook.remove()
    return torch.cat(out) if out else torch.empty(0, 0)


def cached_features(
    model: torch.nn.Module,
    data: Any,
    *,
    model_name: str,
    dataset: str,
    split: str,
    weights_id: str | None = None,
    transform: str | dict | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    resize: int | None = None,
    refresh: bool = False,
    progress: bool = True,
) -> FeatureSet:
    """Features of `data` ((x, y) or a dataset with .x/.y) under the frozen `model`, from the
    cache when present, else computed once and cached.

    The key hashes model_name, weights_id (default: `weights_hash(model)`), dataset, split,
    the number of examples and `transform` (plus `resize`). `refresh=True` recomputes.
    """
    x, y = _xy(data)
    weights_id = weights_id or weights_hash(model)
    tdesc = {"transform": transform if isinstance(transform, dict) else str(transform or ""), "resize": resize}
    key = cache_key(model_name, weights_id, dataset, split, len(y), tdesc)
    path = Path(cache_dir) if cache_dir else default_cache_dir()
    path = path / f"{key}.safetensors"
    if path.exists() and not refresh:
        fs = load_features(path)
        if len(fs) == len(y) and torch.equal(fs.labels, y.long().cpu()):
            fs.key = key
            return fs
    feats = extract_features(model, x, batch_size=batch_size, device=device, resize=resize, progress=progress)
    meta = {"key": key, "model": model_name, "weights": weights_id, "dataset": dataset, "split": split,
            "size": len(y), "transform": tdesc}
    save_features(path, feats, y, meta)
    return FeatureSet(feats, y.long().cpu(), key=key, path=path, hit=False, meta=meta)


def pixel_features(data: Any) -> FeatureSet:
    """Raw normalised pixels, flattened, as features (no backbone)."""
    x, y = _xy(data)
    return FeatureSet(x.flatten(1).float(), y.long(), meta={"model": "pixels"})


def _xy(data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return torch.as_tensor(data[0]), torch.as_tensor(data[1])
    if hasattr(data, "x") and hasattr(data, "y"):
        return data.x, data.y
    raise UserError("data must be an (x, y) pair or a data set with .x and .y")


# --------------------------------------------------------------------------- normalisation


class PublicNormalizer:
    """Centre and scale features with statistics of PUBLIC features only.

    `fit(public)` stores the public mean and the public median norm of the centred
    features; `transform(x)` = (x - mean) / median_norm * target_norm. Fitting on private
    features would release statistics of them outside the accountant.
    """

    def __init__(self, center: bool = True, scale: bool = True, target_norm: float = 1.0):
        self.center, self.scale, self.target_norm = center, scale, float(target_norm)
        self.mean: torch.Tensor | None = None
        self.norm: float = 1.0

    def fit(self, public_features: torch.Tensor) -> "PublicNormalizer":
        x = torch.as_tensor(public_features).float()
        if x.ndim != 2 or len(x) == 0:
            raise UserError("PublicNormalizer.fit needs a non-empty (n, d) matrix of public features")
        self.mean = x.mean(0) if self.center else torch.zeros(x.shape[1])
        self.norm = float((x - self.mean).norm(dim=1).median()) if self.scale else 1.0
        self.norm = self.norm if self.norm > 0 else 1.0
        return self

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            raise UserError("PublicNormalizer: call fit(public_features) before transform")
        x = torch.as_tensor(x).float()
        return (x - self.mean.to(x.device)) / self.norm * self.target_norm


# ------------------------------------------------------------------------------ backbones


@dataclass
class Backbone:
    """A frozen feature extractor and the facts a notebook reports about it."""

    model: torch.nn.Module
    name: str
    source: str  # "timm" | "checkpoint" | "public"
    weights_id: str
    note: str
    resize: int | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether the weights host answers a TCP connection within `timeout` seconds."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _timm_cached_safetensors(name: str) -> str | None:
    """Path of the model's safetensors weights in the local Hugging Face cache, if any."""
    try:
        from huggingface_hub import try_to_load_from_cache
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
        hub_id = getattr(cfg, "hf_hub_id", None)
        if not hub_id:
            return None
        path = try_to_load_from_cache(hub_id, "model.safetensors")
        return path if isinstance(path, str) else None
    except Exception:  # no cfg for this name, old hub client, ...: treat as not cached
        return None


def _try_timm(name: str) -> tuple[torch.nn.Module | None, str]:
    """timm's pretrained `name` without its classifier: from the local Hugging Face cache,
    else downloaded when the hub is reachable; (None, why not) otherwise."""
    try:
        import timm
    except ImportError as exc:  # pragma: no cover - timm is a dependency
        return None, f"timm not importable ({exc})"
    if not timm.is_model(name):
        return None, f"{name!r} is not a timm model, so there are no hub weights for it"
    cached = _timm_cached_safetensors(name)
    kw: dict[str, Any] = {"pretrained_cfg_overlay": {"file": cached}} if cached else {}
    if not cached and not _hub_reachable():
        return None, f"timm pretrained weights for {name!r} are not in the local cache and huggingface.co is unreachable (offline)"
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0, **kw)
    except Exception as exc:  # missing weights, network errors, ...: say why and move on
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return None, f"timm pretrained weights for {name!r} unavailable ({type(exc).__name__}: {msg})"
    where = f"local cache {cached}" if cached else "downloaded from the Hugging Face hub"
    return model, f"timm pretrained weights for {name!r} ({where})"


def timm_backbone(name: str, *, resize: int | None = None) -> tuple[Backbone | None, str]:
    """timm's pretrained `name` without its classifier, frozen, from the local Hugging Face
    cache or downloaded when the hub is reachable; (None, why not) otherwise."""
    model, note = _try_timm(name)
    if model is None:
        return None, note
    return Backbone(_freeze(model), name, "timm", f"timm:{name}", note, resize=resize), note


def checkpoint_backbone(
    name: str,
    path: str | os.PathLike,
    *,
    num_classes: int,
    public: Any = None,
    resize: int | None = None,
    note: str = "",
) -> Backbone:
    """dpbench.models `name` with the weights of the safetensors checkpoint at `path`, frozen.
    `public` ((x, y) or a data set) gives the input channels and image size, when known.
    Raises whatever building or loading raises (a missing file, a shape mismatch)."""
    x, _ = _xy(public) if public is not None else (None, None)
    kw = {} if x is None else {"in_chans": x.shape[1], "img_size": x.shape[-1]}
    model = create_model(name, num_classes=num_classes, **kw)
    load_checkpoint(model, path)
    return Backbone(_freeze(model), name, "checkpoint", weights_hash(model), note or f"checkpoint {path}",
                    resize=resize, info={"path": str(path)})


def train_public_backbone(
    model_name: str,
    public: Any,
    num_classes: int,
    *,
    epochs: float = 20.0,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
    model_kwargs: dict | None = None,
) -> torch.nn.Module:
    """Train `model_name` (dpbench.models, built with `model_kwargs`) non-privately on the
    public examples only."""
    x, y = _xy(public)
    torch.manual_seed(seed)
    model = create_model(model_name, num_classes=num_classes, in_chans=x.shape[1], img_size=x.shape[-1],
                         zero_head=False, **(model_kwargs or {}))
    fit(model, (x, y), batching=BatchSpec(epochs=epochs, expected_batch_size=min(batch_size, len(y))), privacy=None,
        optim=OptimSpec(optimizer="adam", lr=lr), evaluation=EvalSpec(every=None, progress=progress), seed=seed,
        device=device)
    return model


def public_backbone(
    model_name: str,
    public: Any,
    num_classes: int,
    *,
    epochs: float = 20.0,
    model_kwargs: dict | None = None,
    resize: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> Backbone:
    """`train_public_backbone` on the public examples, frozen, as a Backbone."""
    model = train_public_backbone(model_name, public, num_classes, epochs=epochs, seed=seed, device=device,
                                  model_kwargs=model_kwargs)
    n = len(_xy(public)[1])
    return Backbone(_freeze(model), model_name, "public", weights_hash(model),
                    f"{model_name} trained non-privately on {n} public examples", resize=resize,
                    info={"public_examples": n})


# ------------------------------------------------------------------------------ synthetic


@dataclass
class SyntheticFeatures:
    """Train (private), test and public splits of a synthetic feature set."""

    train: FeatureSet
    test: FeatureSet
    public: FeatureSet
    num_classes: int
    description: str


def synthetic_features(
    n: int = 20000,
    d: int = 128,
    num_classes: int = 10,
    *,
    n_test: int = 5000,
    n_public: int = 2000,
    separation: float = 1.0,
    spectrum_decay: float = 1.0,
    label_noise: float = 0.05,
    relu: bool = True,
    seed: int = 0,
    dtype: Any = np.float64,
) -> SyntheticFeatures:
    """A Gaussian-mixture feature set that looks like penultimate activations.

    Latent z = mu_y + Sigma^1/2 eps with class means mu_k = separation * u_k (u_k random
    unit-variance directions, scaled by sqrt(d)) and an anisotropic covariance with
    eigenvalues j^-spectrum_decay (normalised to trace d) in a random basis; features are
    relu(z) when `relu` (non-negative, non-Gaussian, like CNN features) and a fraction
    `label_noise` of labels is replaced by a uniformly random class. Neither linear model
    is Bayes-optimal for it; the public split comes from the same distribution. `dtype`
    (numpy) is the precision of the draw: np.float32 halves the time of large draws (another
    sample of the same distribution).
    """
    if n < 1 or d < 1 or num_classes < 2:
        raise UserError(f"synthetic_features needs n >= 1, d >= 1, num_classes >= 2; got {n}, {d}, {num_classes}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xFEA7]))
    eig = np.arange(1, d + 1, dtype=np.float64) ** (-float(spectrum_decay))
    eig *= d / eig.sum()
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    root = basis * np.sqrt(eig)  # Sigma^1/2 = basis diag(sqrt eig)
    means = rng.standard_normal((num_classes, d)) * separation

    def draw(m: int, stream: int) -> FeatureSet:
        r = np.random.default_rng(np.random.SeedSequence([int(seed), 0xFEA7, stream]))
        y = r.integers(0, num_classes, size=m)
        z = means[y].astype(dtype) + r.standard_normal((m, d), dtype=dtype) @ root.T.astype(dtype)
        x = np.maximum(z, 0.0) if relu else z
        flip = r.random(m) < label_noise
        y = np.where(flip, r.integers(0, num_classes, size=m), y)
        return FeatureSet(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long),
                          meta={"model": "synthetic", "stream": stream})

    desc = (f"synthetic Gaussian mixture: d={d}, classes={num_classes}, separation={separation}, "
            f"spectrum j^-{spectrum_decay}, relu={relu}, label_noise={label_noise}, seed={seed}")
    return SyntheticFeatures(draw(n, 1), draw(n_test, 2), draw(n_public, 3), num_classes, desc)
