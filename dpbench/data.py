"""Data set registry: bundled, synthetic, torchvision and image-folder data by name.

`load_dataset(name, split)` returns an `ImageDataset`: images (N, C, H, W) normalised per
channel, long labels, and the facts a notebook records (`name`, `source`, `num_classes`,
`input_shape`).

Normalisation uses constants fixed per data set, never statistics computed from the data
at run time: a mean or standard deviation computed from private examples is itself a
release about them that no accountant sees. The torchvision sets use the published
training-set constants (MNIST's 0.1307/0.3081 and so on); `digits` uses constants computed
once from the bundled scikit-learn file and written below; `synthetic` is normalised by
the analytic mean and standard deviation of its own generator.

Memory: in-memory sets keep their pixels as stored (uint8 for the torchvision sets and
digits, float32 for synthetic) and normalise on access. `ds[idx]` / `ds.tensors(idx)`
return a normalised float batch for any index set; `ds.x` materialises the whole set as
float32 once and caches it (CIFAR-10's training set: ~600 MB). Image folders (ImageNet
layout) decode lazily, file by file, so prefer `batches()` or `ds[idx]` on large folders.

Torchvision sets are read from `data_root` (argument, else `$DPBENCH_DATA`, else
`~/.cache/dpbench/data`) and are downloaded only when `download=True` (default: when
`$DPBENCH_DOWNLOAD=1`). A set that is missing offline raises `UserError` naming the data
set, the path searched and how to provide it. Heavy imports (scikit-learn, torchvision,
scipy, PIL) happen inside the functions that need them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from dpbench.errors import UserError

__all__ = [
    "DATASETS",
    "ImageDataset",
    "batches",
    "check_available",
    "default_data_root",
    "load_dataset",
    "register_dataset",
    "split_public_private",
]


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class DatasetSpec:
    """How to load one named data set and how to check that its files are present."""

    name: str
    loader: Callable[..., "ImageDataset"]
    splits: tuple[str, ...]
    # Returns the files this split needs under data_root (empty for bundled/synthetic).
    required_files: Callable[..., list[Path]] | None = None
    # One line saying how to provide the files when they are missing.
    how_to_provide: str = ""
    description: str = ""
    # The torchvision.datasets class that downloads it ("" when torchvision does not).
    torchvision: str = ""


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(
    name: str,
    *,
    splits: Sequence[str] = ("train", "test"),
    required_files: Callable[..., list[Path]] | None = None,
    how_to_provide: str = "",
    description: str = "",
    torchvision: str = "",
):
    """Decorator registering `loader(split, data_root, download, **kw) -> ImageDataset`."""

    def wrap(loader):
        if name in DATASETS:
            raise ValueError(f"data set {name!r} is already registered")
        DATASETS[name] = DatasetSpec(
            name, loader, tuple(splits), required_files, how_to_provide, description, torchvision
        )
        return loader

    return wrap


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise UserError(
            f"unknown data set {name!r}; choose one of: {', '.join(sorted(DATASETS))}"
        )
    return DATASETS[name]


def default_data_root() -> Path:
    """Where torchvision data sets live: `$DPBENCH_DATA`, else `~/.cache/dpbench/data`."""
    env = os.environ.get("DPBENCH_DATA")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/dpbench/data").expanduser()


def _resolve_root(data_root) -> Path:
    return Path(data_root).expanduser() if data_root else default_data_root()


def _resolve_download(download) -> bool:
    if download is None:
        return os.environ.get("DPBENCH_DOWNLOAD", "0").strip() == "1"
    return bool(download)


def load_dataset(name: str, split: str = "train", data_root=None, download=None, **kw):
    """Load data set `name` (see `DATASETS`) as a normalised `ImageDataset`.

    split: "train" or "test" ("extra" also for svhn). data_root: folder holding the
    torchvision files (default `default_data_root()`). download: fetch missing torchvision
    files (default: `$DPBENCH_DOWNLOAD == "1"`). Extra keywords go to the loader
    (synthetic: n, image_shape, num_classes, seed, ...; imagefolder: root, image_size);
    `mean=` and `std=` override the per-channel normalisation constants for any set.
    """
    spec = _spec(name)
    if split not in spec.splits:
        raise UserError(
            f"data set {name!r} has no split {split!r}; choose one of: {', '.join(spec.splits)}"
        )
    mean = kw.pop("mean", None)
    std = kw.pop("std", None)
    if spec.required_files is not None and os.environ.get(STANDIN_ENV, "") == "1":
        ds = _standin(name, split, **kw)
    else:
        ds = spec.loader(split=split, data_root=data_root, download=download, **kw)
    if mean is not None or std is not None:
        ds = ds._with_stats(mean if mean is not None else ds.mean, std if std is not None else ds.std)
    return ds


def check_available(name: str, data_root=None, split: str | None = None, download=None, **kw) -> Path | None:
    """Cheap pre-flight check that data set `name` can be loaded; raises `UserError` if not.

    Checks only that the files torchvision (or the image folder) needs exist, for `split`
    or for every split when None; bundled and synthetic data are always available. When
    downloading is enabled (see `load_dataset`) missing files are not an error. Returns the
    folder searched (None for bundled/synthetic data).
    """
    spec = _spec(name)
    if spec.required_files is None or os.environ.get(STANDIN_ENV, "") == "1":
        return None
    root = _resolve_root(data_root)
    splits = [split] if split else [s for s in spec.splits if s in ("train", "test")]
    missing: list[Path] = []
    for s in splits:
        if s not in spec.splits:
            raise UserError(
                f"data set {name!r} has no split {s!r}; choose one of: {', '.join(spec.splits)}"
            )
        missing += [p for p in spec.required_files(root, s, **kw) if not p.exists()]
    if missing and not (_resolve_download(download) and name != "imagefolder"):
        raise _missing_error(spec, root, missing)
    return root


def _missing_error(spec: DatasetSpec, root: Path, missing: list[Path]) -> UserError:
    shown = ", ".join(str(p) for p in missing[:2]) + (f" (+{len(missing) - 2} more)" if len(missing) > 2 else "")
    return UserError(
        f"data set {spec.name!r} not found under {root} (missing {shown}); {spec.how_to_provide}"
    )


# --------------------------------------------------------------------------- data set object


class ImageDataset(torch.utils.data.Dataset):
    """Images (N, C, H, W) normalised per channel, with long labels.

    `ds[i]` gives (x_i, y_i); `ds[idx]` with a LongTensor/array of indices gives a batch.
    `.x` (float32, cached on first use) and `.y` hold the whole set; `subset(idx)` returns a
    new data set over those examples, with `origin_indices` pointing into the loaded split
    (record these when a checkpoint says which examples were public).

    Pixels are held as `raw` (uint8, or float for synthetic) and scaled by `1/scale` before
    normalising, so large sets stay compact until a batch is asked for. Subclasses with
    lazily decoded images override `_raw`.
    """

    def __init__(
        self,
        raw: torch.Tensor | None,
        y: torch.Tensor,
        *,
        name: str,
        source: str,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        scale: float = 255.0,
        classes: Sequence[str] | None = None,
        origin_indices: torch.Tensor | None = None,
        input_shape: tuple[int, int, int] | None = None,
    ):
        self.raw = raw
        self.y = torch.as_tensor(y, dtype=torch.long)
        self.name = name
        self.source = source
        self.num_classes = int(num_classes)
        self.scale = float(scale)
        self.classes = list(classes) if classes is not None else [str(i) for i in range(num_classes)]
        if input_shape is None:
            input_shape = tuple(int(s) for s in raw.shape[1:])
        self.input_shape = tuple(input_shape)
        c = self.input_shape[0]
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != c or len(self.std) != c or min(self.std) <= 0:
            raise UserError(
                f"{name}: normalisation needs {c} means and {c} positive stds, "
                f"got mean={self.mean} std={self.std}"
            )
        n = len(self.y)
        self.origin_indices = (
            torch.arange(n) if origin_indices is None else torch.as_tensor(origin_indices, dtype=torch.long)
        )
        self._x_cache: torch.Tensor | None = None

    # -- access
    def __len__(self) -> int:
        return int(self.y.shape[0])

    def _raw(self, idx: torch.Tensor) -> torch.Tensor:
        return self.raw[idx]

    def _normalise(self, raw: torch.Tensor) -> torch.Tensor:
        x = raw.to(torch.float32) / self.scale
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(shape)
        std = torch.tensor(self.std, dtype=torch.float32).view(shape)
        return (x - mean) / std

    def tensors(self, indices=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised (x, y) for `indices` (default: all), without caching the float copy."""
        if indices is None:
            if self._x_cache is not None:
                return self._x_cache, self.y
            indices = torch.arange(len(self))
        idx = torch.as_tensor(indices, dtype=torch.long)
        if self._x_cache is not None:
            return self._x_cache[idx], self.y[idx]
        return self._normalise(self._raw(idx)), self.y[idx]

    @property
    def x(self) -> torch.Tensor:
        """The whole set as normalised float32 (N, C, H, W); computed once and cached."""
        if self._x_cache is None:
            self._x_cache = self.tensors()[0]
        return self._x_cache

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            x, y = self.tensors(torch.tensor([int(index)]))
            return x[0], y[0]
        if isinstance(index, slice):
            index = torch.arange(len(self))[index]
        return self.tensors(index)

    def subset(self, indices) -> "ImageDataset":
        """A new data set holding the examples at `indices` (order kept)."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise UserError(f"{self.name}: subset index out of range for {len(self)} examples")
        return self._make(self._subset_storage(idx), self.y[idx], self.origin_indices[idx])

    def _subset_storage(self, idx):
        return self.raw[idx]

    def _make(self, storage, y, origin, mean=None, std=None):
        return ImageDataset(
            storage,
            y,
            name=self.name,
            source=self.source,
            num_classes=self.num_classes,
            mean=self.mean if mean is None else mean,
            std=self.std if std is None else std,
            scale=self.scale,
            classes=self.classes,
            origin_indices=origin,
            input_shape=self.input_shape,
        )

    def _with_stats(self, mean, std) -> "ImageDataset":
        if isinstance(mean, (int, float)):
            mean = (float(mean),) * self.input_shape[0]
        if isinstance(std, (int, float)):
            std = (float(std),) * self.input_shape[0]
        return self._make(self._subset_storage(slice(None)), self.y, self.origin_indices, mean, std)

    def class_counts(self) -> torch.Tensor:
        """Number of examples per class (length num_classes)."""
        return torch.bincount(self.y, minlength=self.num_classes)

    def loader(self, batch_size: int, *, indices=None, num_workers: int | None = None,
               pin_memory: bool | None = None) -> torch.utils.data.DataLoader:
        """Normalised (x, y) batches in order (all examples, or `indices`), from a DataLoader.

        Each batch is read by a worker process (`num_workers`; default: several for sets
        decoded on access, none for sets held in memory) and lands in pinned memory when CUDA
        is available (`pin_memory`), so copies to the GPU can overlap compute. Nothing but the
        batches in flight is held in memory.
        """
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        order = torch.arange(len(self)) if indices is None else torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if num_workers is None:
            num_workers = _decode_workers() if self.raw is None else 0
        # Each worker gets a whole batch of indices (ds[list]: one decode call, one normalisation).
        sampler = torch.utils.data.BatchSampler(order.tolist(), batch_size, drop_last=False)
        pin = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        return torch.utils.data.DataLoader(self, sampler=sampler, batch_size=None, num_workers=int(num_workers),
                                           pin_memory=pin)

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, n={len(self)}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes}, source={self.source!r})"
        )


def batches(dataset: ImageDataset, batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield normalised (x, y) batches over `dataset` without a DataLoader (for evaluation).

    Every example appears exactly once; with `shuffle` the order is a permutation seeded by
    `seed`. Not a private sampler: DP training uses Poisson sampling (dpbench.training.sampling).
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    n = len(dataset)
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    else:
        order = torch.arange(n)
    for start in range(0, n, batch_size):
        yield dataset.tensors(order[start : start + batch_size])


# --------------------------------------------------------------------------- splits


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


def _stratified_take(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of a `fraction` of each class; the total is round(fraction * n) exactly.

    Per-class quotas are floored and the remainder goes to the classes with the largest
    fractional parts (largest-remainder rounding), ties to the lower class label.
    """
    n = len(labels)
    classes, counts = np.unique(labels, return_counts=True)
    quotas = fraction * counts
    take = np.floor(quotas).astype(int)
    extra = int(round(fraction * n)) - int(take.sum())
    if extra > 0:
        order = np.argsort(-(quotas - take), kind="stable")
        take[order[:extra]] += 1
    chosen = []
    for c, k in zip(classes, take):
        members = np.flatnonzero(labels == c)
        chosen.append(rng.permutation(members)[:k])
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, dtype=int)


def split_public_private(
    n_or_labels,
    public_fraction: float | None = None,
    public_classes: Sequence[int] | None = None,
    seed: int = 0,
    stratify: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split examples into (public_idx, private_idx): sorted, disjoint LongTensors covering 0..n-1.

    n_or_labels: the number of examples, or their labels (needed for `public_classes` and
    for stratification). Give exactly one of:
      public_fraction: share of examples made public (0 <= f <= 1), drawn with `seed`;
        stratified by class when labels are given and `stratify` (the public part then has
        round(f * n) examples and each class contributes its share, up to rounding);
      public_classes: every example of these classes is public, the rest private.
    """
    if isinstance(n_or_labels, (int, np.integer)):
        n, labels = int(n_or_labels), None
        if n < 0:
            raise UserError(f"split_public_private: n must be >= 0, got {n}")
    else:
        labels = torch.as_tensor(n_or_labels).detach().cpu().numpy()
        if labels.ndim != 1:
            raise UserError(f"split_public_private: labels must be 1-D, got shape {labels.shape}")
        n = len(labels)
    if (public_fraction is None) == (public_classes is None):
        raise UserError("split_public_private: give exactly one of public_fraction or public_classes")

    if public_fraction is not None:
        f = float(public_fraction)
        if not (0.0 <= f <= 1.0) or math.isnan(f):
            raise UserError(f"public_fraction must be in [0, 1], got {public_fraction}")
        rng = _rng(seed, 0x5EED)
        if labels is not None and stratify:
            public = _stratified_take(labels, f, rng)
        else:
            public = np.sort(rng.permutation(n)[: int(round(f * n))])
    else:
        if labels is None:
            raise UserError("public_classes needs labels: pass the label tensor, not the count")
        wanted = np.asarray(list(public_classes)).reshape(-1)
        if wanted.size == 0:
            raise UserError("public_classes is empty; list at least one class")
        present = set(np.unique(labels).tolist())
        absent = [int(c) for c in wanted if int(c) not in present]
        if absent:
            raise UserError(
                f"public_classes {absent} do not occur in the labels; present classes: {sorted(present)}"
            )
        mask = np.isin(labels, wanted)
        if mask.all():
            raise UserError(
                "public_classes cover every class, leaving no private examples; make fewer classes public"
            )
        public = np.flatnonzero(mask)

    is_public = np.zeros(n, dtype=bool)
    is_public[public] = True
    return (
        torch.as_tensor(np.flatnonzero(is_public), dtype=torch.long),
        torch.as_tensor(np.flatnonzero(~is_public), dtype=torch.long),
    )


# --------------------------------------------------------------------------- bundled: digits

# Mean and std of the pixel values / 16 over all 1797 bundled images, computed once and
# fixed here (like MNIST's published 0.1307/0.3081), so nothing is estimated at run time.
DIGITS_MEAN = (0.3053,)
DIGITS_STD = (0.3760,)
DIGITS_TEST_FRACTION = 0.2


@register_dataset("digits", description="scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes)")
def _load_digits(split, data_root=None, download=None, split_seed: int = 0):
    """Train/test is a fixed stratified 80/20 split (seed `split_seed`) of the 1797 images."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.as_tensor(d.images.astype(np.uint8)).unsqueeze(1)  # values 0..16
    labels = torch.as_tensor(d.target, dtype=torch.long)
    test_idx, train_idx = split_public_private(labels, public_fraction=DIGITS_TEST_FRACTION, seed=split_seed)
    idx = train_idx if split == "train" else test_idx
    return ImageDataset(
        images[idx],
        labels[idx],
        name="digits",
        source="bundled:sklearn.datasets.load_digits",
        num_classes=10,
        mean=DIGITS_MEAN,
        std=DIGITS_STD,
        scale=16.0,
        origin_indices=idx,
    )


# --------------------------------------------------------------------------- synthetic


@register_dataset("synthetic", description="seeded class templates plus noise, any size and shape")
def _load_synthetic(
    split,
    data_root=None,
    download=None,
    n: int | None = None,
    image_shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
    seed: int = 0,
    signal: float = 1.0,
    noise: float = 1.0,
    max_shift: int | None = None,
):
    """Learnable synthetic images: x = signal * shift(T_y) + noise * N(0, 1).

    Each class has a smooth random template T_k (unit variance, drawn from `seed`, shared by
    train and test); each example shifts it by up to `max_shift` pixels (default H // 8) in
    each direction, so a linear model does worse than a small CNN. n defaults to 2000 for
    train and 500 for test; the split picks an independent stream of the same distribution.
    The data are normalised by the analytic mean 0 and std sqrt(signal^2 + noise^2).
    """
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise UserError(f"synthetic image_shape must be (C, H, W) with positive sizes, got {image_shape}")
    if int(num_classes) < 2:
        raise UserError(f"synthetic num_classes must be >= 2, got {num_classes}")
    if n is None:
        n = 2000 if split == "train" else 500
    if int(n) < 1:
        raise UserError(f"synthetic n must be >= 1, got {n}")
    if signal < 0 or noise < 0 or signal + noise == 0:
        raise UserError(f"synthetic signal and noise must be >= 0 and not both 0, got {signal}, {noise}")
    n, num_classes = int(n), int(num_classes)
    c, h, w = shape
    shift = h // 8 if max_shift is None else int(max_shift)

    trng = _rng(seed, 1)
    coarse = torch.as_tensor(trng.standard_normal((num_classes, c, max(1, math.ceil(h / 4)), max(1, math.ceil(w / 4)))), dtype=torch.float32)
    templates = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    templates = templates - templates.mean(dim=(1, 2, 3), keepdim=True)
    templates = templates / templates.flatten(1).std(dim=1).clamp_min(1e-6).view(-1, 1, 1, 1)

    srng = _rng(seed, 2, {"train": 0, "test": 1}.get(split, 2))
    y = torch.as_tensor(srng.permutation(np.arange(n) % num_classes), dtype=torch.long)
    dy = srng.integers(-shift, shift + 1, size=n)
    dx = srng.integers(-shift, shift + 1, size=n)
    eps = torch.as_tensor(srng.standard_normal((n, c, h, w)), dtype=torch.float32)
    x = torch.empty(n, c, h, w)
    for i in range(n):  # cheap: one roll per example
        x[i] = torch.roll(templates[y[i]], shifts=(int(dy[i]), int(dx[i])), dims=(1, 2))
    x = signal * x + noise * eps
    sd = math.sqrt(signal**2 + noise**2)
    return ImageDataset(
        x,
        y,
        name="synthetic",
        source=f"synthetic:seed={seed},shape={c}x{h}x{w},classes={num_classes},signal={signal},noise={noise}",
        num_classes=num_classes,
        mean=(0.0,) * c,
        std=(sd,) * c,
        scale=1.0,
    )


# --------------------------------------------------------------------------- dry-run stand-ins

# `dpbench run NB --profile gpu --dry-run` sets this: every file-backed set (torchvision,
# image folders) is then replaced by a small synthetic set of the real name, shape and class
# count, so the gpu code path runs on the CPU without the real files (their checksums cannot
# be faked). Never set in a real run; the data set's `source` says "stand-in".
STANDIN_ENV = "DPBENCH_STANDIN_DATA"
_STANDIN_SHAPES = {"mnist": ((1, 28, 28), 10), "fashion_mnist": ((1, 28, 28), 10), "cifar10": ((3, 32, 32), 10),
                   "cifar100": ((3, 32, 32), 100), "svhn": ((3, 32, 32), 10)}


def _standin(name: str, split: str, image_size: int = 32, **_) -> "ImageDataset":
    """A synthetic stand-in for file-backed data set `name` (see STANDIN_ENV)."""
    shape, k = _STANDIN_SHAPES.get(name, ((3, min(int(image_size), 32), min(int(image_size), 32)), 10))
    n = max(2 * k, 160) if split == "train" else max(k, 64)
    ds = _load_synthetic(split, n=n, image_shape=shape, num_classes=k, seed=len(name))
    ds.name, ds.source = name, f"stand-in for {name} (dry run): {ds.source}"
    return ds


# --------------------------------------------------------------------------- torchvision sets

_TV_PROVIDE = (
    "set DPBENCH_DATA or pass data_root to the folder holding the torchvision files "
    "({layout}), copy an existing torchvision download there, or, when online, download it with "
    "`dpbench run NB --profile P --download` (download=True or DPBENCH_DOWNLOAD=1 in Python)"
)


def _tv_spec(name, cls_name, mean, std, files, layout, num_classes, splits=("train", "test"), subdir=None):
    """Register a torchvision-backed data set.

    files(split) lists the file names relative to the torchvision root; `subdir` is a
    folder below data_root used as that root (SVHN keeps its .mat files flat in its root).
    """

    def root_for(data_root: Path) -> Path:
        if subdir is None:
            return data_root
        # Prefer data_root/<subdir>; accept files lying directly in data_root as
        # torchvision's own examples put them.
        nested = data_root / subdir
        if not nested.exists() and any((data_root / f).exists() for s in splits for f in files(s)):
            return data_root
        return nested

    def required(data_root: Path, split: str, **_) -> list[Path]:
        root = root_for(data_root)
        return [root / f for f in files(split)]

    @register_dataset(
        name,
        splits=splits,
        required_files=required,
        how_to_provide=_TV_PROVIDE.format(layout=layout),
        description=f"torchvision {cls_name}",
        torchvision=cls_name,
    )
    def loader(split, data_root=None, download=None):
        import torchvision

        base = _resolve_root(data_root)
        root = root_for(base)
        want_download = _resolve_download(download)
        missing = [p for p in required(base, split) if not p.exists()]
        if missing and not want_download:
            raise _missing_error(DATASETS[name], base, missing)
        cls = getattr(torchvision.datasets, cls_name)
        kwargs = {"split": split} if cls_name == "SVHN" else {"train": split == "train"}
        try:
            if want_download:
                root.mkdir(parents=True, exist_ok=True)
            ds = cls(str(root), download=want_download, **kwargs)
        except RuntimeError as e:  # "Dataset not found or corrupted" / "Error downloading"
            raise UserError(
                f"torchvision could not load data set {name!r} under {root} ({e}); the files "
                f"may be incomplete or corrupted (checksums are checked): delete them and "
                f"download again (--download) or copy a good torchvision download"
            ) from e
        except OSError as e:  # download failures (offline, DNS, HTTP)
            raise UserError(
                f"could not download data set {name!r} into {root} ({type(e).__name__}: {e}); "
                + _TV_PROVIDE.format(layout=layout)
            ) from e
        images, labels = _tv_tensors(ds, cls_name)
        return ImageDataset(
            images,
            labels,
            name=name,
            source=f"torchvision:{root}",
            num_classes=num_classes,
            mean=mean,
            std=std,
            scale=255.0,
            classes=getattr(ds, "classes", None) if len(getattr(ds, "classes", []) or []) == num_classes else None,
        )

    return loader


def _tv_tensors(ds, cls_name) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, C, H, W) pixels and long labels from a torchvision data set object."""
    if cls_name in ("MNIST", "FashionMNIST"):
        images = torch.as_tensor(ds.data, dtype=torch.uint8).unsqueeze(1)
        labels = torch.as_tensor(ds.targets, dtype=torch.long)
    elif cls_name in ("CIFAR10", "CIFAR100"):
        images = torch.as_tensor(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)), dtype=torch.uint8)
        labels = torch.as_tensor(ds.targets, dtype=torch.long)
    elif cls_name == "SVHN":
        images = torch.as_tensor(np.ascontiguousarray(ds.data), dtype=torch.uint8)  # already N, C, H, W
        labels = torch.as_tensor(ds.labels, dtype=torch.long)
    else:  # pragma: no cover - registry and converter are kept in step
        raise ValueError(cls_name)
    return images.contiguous(), labels


def _mnist_files(folder):
    def files(split):
        p = "train" if split == "train" else "t10k"
        return [f"{folder}/raw/{p}-images-idx3-ubyte", f"{folder}/raw/{p}-labels-idx1-ubyte"]

    return files


_tv_spec("mnist", "MNIST", (0.1307,), (0.3081,), _mnist_files("MNIST"),
         "<data_root>/MNIST/raw/*-ubyte", 10)
_tv_spec("fashion_mnist", "FashionMNIST", (0.2860,), (0.3530,), _mnist_files("FashionMNIST"),
         "<data_root>/FashionMNIST/raw/*-ubyte", 10)
_tv_spec(
    "cifar10", "CIFAR10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
    lambda s: ([f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)] if s == "train" else ["cifar-10-batches-py/test_batch"])
    + ["cifar-10-batches-py/batches.meta"],
    "<data_root>/cifar-10-batches-py/", 10,
)
_tv_spec(
    "cifar100", "CIFAR100", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
    lambda s: [f"cifar-100-python/{'train' if s == 'train' else 'test'}", "cifar-100-python/meta"],
    "<data_root>/cifar-100-python/", 100,
)
_tv_spec(
    "svhn", "SVHN", (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
    lambda s: [f"{s}_32x32.mat"],
    "<data_root>/svhn/{train,test}_32x32.mat", 10, splits=("train", "test", "extra"), subdir="svhn",
)


# --------------------------------------------------------------------------- image folders

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _folder_root(data_root: Path, root) -> Path:
    r = Path(root).expanduser()
    return r if r.is_absolute() else data_root / r


def _folder_split_dir(base: Path, split: str) -> Path:
    # ImageNet and Places365 call their held-out split "val".
    if split == "test" and not (base / "test").is_dir() and (base / "val").is_dir():
        return base / "val"
    return base / split


def _imagefolder_required(data_root: Path, split: str, root="imagefolder", **_):
    return [_folder_split_dir(_folder_root(data_root, root), split)]


def _decode_workers() -> int:
    """Decoding workers: the CPUs this process may use, at most 8 (DPBENCH_DECODE_WORKERS overrides)."""
    env = os.environ.get("DPBENCH_DECODE_WORKERS")
    if env:
        return max(0, int(env))
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, n))


class StreamedImages:
    """An image folder's normalised images as a read-only, tensor-like view, decoded on access.

    It stands for the float32 (N, C, H, W) tensor that `ImageDataset.x` holds for in-memory
    sets, which for an image folder is never built (ImageNet's would take about 770 GB):
    `view[idx]` (an int, a slice, or indices) decodes, resizes and normalises just those
    images, in parallel (threads: PIL releases the GIL while decoding and resizing), into
    pinned memory when CUDA is available. `len()`, `.shape`, `.dtype`, `.device` and `.dim()`
    describe the tensor it stands for, so the training loop and evaluation index it like one;
    sequential passes (feature extraction) use `dataset.loader()` (DataLoader workers).
    """

    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, dataset: "ImageFolderDataset"):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.dataset),) + tuple(self.dataset.input_shape))

    def dim(self) -> int:
        return 1 + len(self.dataset.input_shape)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, (int, np.integer)):
            return self[torch.tensor([int(index)])][0]
        if isinstance(index, slice):
            index = torch.arange(len(self))[index]
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:  # a mask selects rows, as on a tensor (a cast to long would read rows 0/1)
            index = torch.arange(len(self), device=index.device)[index]
        x = self.dataset.tensors(index.long().reshape(-1))[0]
        return x.pin_memory() if torch.cuda.is_available() else x

    def __repr__(self) -> str:
        return f"StreamedImages({self.dataset.name!r}, shape={tuple(self.shape)})"


class ImageFolderDataset(ImageDataset):
    """Lazily decoded image folder: files are read, resized and centre-cropped on access.

    `.x` is a `StreamedImages` view (decoded batch by batch, never the whole set); batches of
    several images are decoded by a pool of threads (`DPBENCH_DECODE_WORKERS`, default the
    usable CPUs up to 8), and `loader()` streams the set through DataLoader workers.
    """

    def __init__(self, paths: list[str], y, *, image_size: int, origin_indices=None, **kw):
        self.paths = list(paths)
        self.image_size = int(image_size)
        super().__init__(None, y, input_shape=(3, self.image_size, self.image_size),
                         origin_indices=origin_indices, scale=255.0, **kw)

    def _decode(self, path: str) -> torch.Tensor:
        from PIL import Image
        from torchvision.transforms import functional as TF

        with Image.open(path) as im:
            im = im.convert("RGB")
            im = TF.resize(im, self.image_size)
            im = TF.center_crop(im, [self.image_size, self.image_size])
            return TF.pil_to_tensor(im)

    @property
    def x(self) -> StreamedImages:
        """The whole set as a `StreamedImages` view: decoded on access, batch by batch."""
        return StreamedImages(self)

    def _pool(self, workers: int):
        # One pool per process: a DataLoader worker forked from this one has none of its threads.
        pool = getattr(self, "_decode_pool", None)
        if pool is None or pool[0] != os.getpid():
            from concurrent.futures import ThreadPoolExecutor

            pool = (os.getpid(), ThreadPoolExecutor(workers, thread_name_prefix="dpbench-decode"))
            self._decode_pool = pool
        return pool[1]

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_decode_pool", None)  # threads do not travel to worker processes
        return state

    def _raw(self, idx: torch.Tensor) -> torch.Tensor:
        idx = idx.reshape(-1).tolist()
        out = torch.empty((len(idx),) + self.input_shape, dtype=torch.uint8)
        workers = _decode_workers()
        if len(idx) > 1 and workers > 1:
            def fill(j):
                out[j] = self._decode(self.paths[idx[j]])

            jobs = self._pool(workers).map(fill, range(len(idx)))
            if len(idx) > 2000:
                jobs = tqdm(jobs, total=len(idx), desc=f"decoding {self.name}", leave=False)
            for _ in jobs:  # re-raises a decoding error
                pass
            return out
        for j, i in enumerate(idx):
            out[j] = self._decode(self.paths[i])
        return out

    def _subset_storage(self, idx):
        if isinstance(idx, slice):
            return self.paths[idx]
        return [self.paths[i] for i in idx.tolist()]

    def _make(self, storage, y, origin, mean=None, std=None):
        return ImageFolderDataset(
            storage, y, image_size=self.image_size, origin_indices=origin, name=self.name,
            source=self.source, num_classes=self.num_classes,
            mean=self.mean if mean is None else mean, std=self.std if std is None else std,
            classes=self.classes,
        )


@register_dataset(
    "imagefolder",
    splits=("train", "val", "test"),
    required_files=_imagefolder_required,
    how_to_provide=(
        "arrange the images as <root>/<split>/<class>/<image> (ImageNet, Places365 and "
        "iNaturalist layout; 'test' falls back to 'val') and pass root= (absolute, or "
        "relative to data_root / DPBENCH_DATA)"
    ),
    description="images in <root>/<split>/<class>/*.jpg, resized to image_size",
)
def _load_imagefolder(split, data_root=None, download=None, root="imagefolder", image_size: int = 224):
    """Image folder in the ImageNet layout; classes are the sorted folder names of `train`.

    Images are converted to RGB, resized (shorter side) and centre-cropped to `image_size`,
    and normalised with the ImageNet constants (override with mean=/std=). Nothing is
    downloaded: these sets come with their own licences and must be placed by hand.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    base_root = _resolve_root(data_root)
    base = _folder_root(base_root, root)
    split_dir = _folder_split_dir(base, split)
    if not split_dir.is_dir():
        raise _missing_error(DATASETS["imagefolder"], base_root, [split_dir])
    class_dir = base / "train" if (base / "train").is_dir() else split_dir
    classes = sorted(e.name for e in os.scandir(class_dir) if e.is_dir())
    if not classes:
        raise UserError(f"image folder {class_dir} has no class sub-folders; expected <root>/<split>/<class>/<image>")
    class_to_idx = {c: i for i, c in enumerate(classes)}
    present = {e.name for e in os.scandir(split_dir) if e.is_dir()}
    unknown = sorted(present - set(classes))
    if unknown:
        raise UserError(f"{split_dir} has classes not in {class_dir}: {unknown[:5]}; use the same class folders in every split")
    samples = make_dataset(str(split_dir), {c: i for c, i in class_to_idx.items() if c in present},
                           extensions=IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise UserError(f"no images found under {split_dir} (extensions {', '.join(IMG_EXTENSIONS)})")
    paths = [p for p, _ in samples]
    y = torch.tensor([t for _, t in samples], dtype=torch.long)
    return ImageFolderDataset(
        paths, y, image_size=image_size, name="imagefolder", source=f"imagefolder:{base}",
        num_classes=len(classes), mean=IMAGENET_MEAN, std=IMAGENET_STD, classes=classes,
    )
