"""Tests for dpbench.data: bundled and synthetic sets, splits, and torchvision loaders driven
over tiny files written in the real on-disk formats (no network)."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpbench import data as D
from dpbench.errors import UserError


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    # Never download, and never read the user's real data folder.
    monkeypatch.setenv("DPBENCH_DOWNLOAD", "0")
    monkeypatch.setenv("DPBENCH_DATA", str(tmp_path / "default_root"))


@pytest.fixture
def md5_skipped(monkeypatch):
    """torchvision checks CIFAR's and SVHN's MD5 sums; our tiny files cannot match them.

    Replace the check by an existence test inside torchvision's modules for this test only.
    """
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.svhn as svhn

    def exists(fpath, md5=None):
        return os.path.isfile(fpath)

    monkeypatch.setattr(cifar, "check_integrity", exists)
    monkeypatch.setattr(svhn, "check_integrity", exists)


# --------------------------------------------------------------------------- digits, synthetic


@pytest.fixture(scope="module")
def digits():
    return D.load_dataset("digits"), D.load_dataset("digits", "test")


def test_digits_shapes_and_split(digits):
    train, test = digits
    assert train.x.shape == (1438, 1, 8, 8) and test.x.shape == (359, 1, 8, 8)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.long
    assert train.num_classes == 10 and train.input_shape == (1, 8, 8)
    assert train.source.startswith("bundled")
    # the split is a partition of the 1797 bundled images, stratified by class
    origin = torch.cat([train.origin_indices, test.origin_indices])
    assert sorted(origin.tolist()) == list(range(1797))
    frac = test.class_counts().float() / (train.class_counts() + test.class_counts()).float()
    assert torch.all((frac - 0.2).abs() < 0.02)
    # fixed constants make the whole set roughly standardised
    assert abs(float(train.x.mean())) < 0.05 and abs(float(train.x.std()) - 1) < 0.05


def test_digits_deterministic_and_values(digits):
    from sklearn.datasets import load_digits

    train, _ = digits
    again = D.load_dataset("digits")
    assert torch.equal(train.x, again.x) and torch.equal(train.y, again.y)
    raw = load_digits()
    i = int(train.origin_indices[5])
    expected = (torch.as_tensor(raw.images[i], dtype=torch.float32) / 16 - D.DIGITS_MEAN[0]) / D.DIGITS_STD[0]
    assert torch.allclose(train.x[5, 0], expected, atol=1e-6)
    assert int(train.y[5]) == int(raw.target[i])


def test_dataset_indexing_subset_and_batches(digits):
    train, _ = digits
    x0, y0 = train[0]
    assert x0.shape == (1, 8, 8) and y0.dim() == 0
    idx = torch.tensor([3, 1, 4])
    xb, yb = train[idx]
    assert torch.equal(xb, train.x[idx]) and torch.equal(yb, train.y[idx])
    sub = train.subset(idx)
    assert len(sub) == 3 and torch.equal(sub.x, train.x[idx])
    assert torch.equal(sub.origin_indices, train.origin_indices[idx])
    with pytest.raises(UserError):
        train.subset([len(train)])
    seen = torch.cat([y for _, y in D.batches(train, 100, shuffle=True, seed=1)])
    assert len(seen) == len(train) and torch.equal(seen.sort().values, train.y.sort().values)
    first = next(D.batches(train, 7, shuffle=True, seed=1))[1]
    assert torch.equal(first, next(D.batches(train, 7, shuffle=True, seed=1))[1])
    # mean/std override
    raw_scale = D.load_dataset("digits", mean=0.0, std=1.0)
    assert torch.allclose(raw_scale.x * 1.0, train.x * D.DIGITS_STD[0] + D.DIGITS_MEAN[0], atol=1e-5)


def test_synthetic_shapes_determinism_and_learnable():
    kw = dict(n=600, image_shape=(3, 12, 10), num_classes=4, seed=3)
    a = D.load_dataset("synthetic", **kw)
    b = D.load_dataset("synthetic", **kw)
    c = D.load_dataset("synthetic", **{**kw, "seed": 4})
    assert a.x.shape == (600, 3, 12, 10) and a.num_classes == 4 and a.input_shape == (3, 12, 10)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)
    assert torch.equal(a.class_counts(), torch.tensor([150] * 4))
    test = D.load_dataset("synthetic", "test", **{**kw, "n": 200})
    assert not torch.equal(test.x[:10], a.x[:10])
    # learnable: nearest class mean (from train) classifies held-out data far above chance
    means = torch.stack([a.x[a.y == k].mean(0) for k in range(4)]).flatten(1)
    pred = torch.cdist(test.x.flatten(1), means).argmin(1)
    assert (pred == test.y).float().mean() > 0.6
    # analytic normalisation keeps the data standardised
    assert abs(float(a.x.std()) - 1) < 0.1


@pytest.mark.parametrize(
    "kw",
    [dict(image_shape=(8, 8)), dict(num_classes=1), dict(n=0), dict(signal=0.0, noise=0.0)],
)
def test_synthetic_bad_input(kw):
    with pytest.raises(UserError):
        D.load_dataset("synthetic", **kw)


def test_unknown_name_and_split():
    with pytest.raises(UserError, match="choose one of"):
        D.load_dataset("imagenet22k")
    with pytest.raises(UserError, match="no split"):
        D.load_dataset("digits", "extra")


# --------------------------------------------------------------------------- public/private


def test_split_by_fraction_stratified():
    labels = torch.arange(1000) % 7
    pub, priv = D.split_public_private(labels, public_fraction=0.1, seed=5)
    assert len(set(pub.tolist()) & set(priv.tolist())) == 0
    assert sorted(pub.tolist() + priv.tolist()) == list(range(1000))
    assert len(pub) == 100
    counts = torch.bincount(labels[pub], minlength=7)
    assert counts.max() - counts.min() <= 1
    again = D.split_public_private(labels, public_fraction=0.1, seed=5)
    other = D.split_public_private(labels, public_fraction=0.1, seed=6)
    assert torch.equal(pub, again[0]) and not torch.equal(pub, other[0])


def test_split_by_classes():
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 9])
    pub, priv = D.split_public_private(labels, public_classes=[1, 9])
    assert pub.tolist() == [1, 5, 8] and priv.tolist() == [0, 2, 3, 4, 6, 7]


@pytest.mark.parametrize(
    "args",
    [
        dict(n_or_labels=10),  # neither
        dict(n_or_labels=10, public_fraction=0.5, public_classes=[0]),  # both
        dict(n_or_labels=10, public_fraction=1.5),
        dict(n_or_labels=10, public_classes=[0]),  # classes need labels
        dict(n_or_labels=[0, 1, 1], public_classes=[5]),  # absent class
        dict(n_or_labels=[0, 1, 1], public_classes=[0, 1]),  # nothing private
        dict(n_or_labels=-1, public_fraction=0.5),
    ],
)
def test_split_bad_input(args):
    with pytest.raises(UserError):
        D.split_public_private(**args)


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 5), min_size=0, max_size=80),
    fraction=st.floats(0, 1),
    seed=st.integers(0, 2**31),
    stratify=st.booleans(),
    use_count=st.booleans(),
)
def test_split_property_disjoint_covering(labels, fraction, seed, stratify, use_count):
    arg = len(labels) if use_count else torch.tensor(labels, dtype=torch.long)
    pub, priv = D.split_public_private(arg, public_fraction=fraction, seed=seed, stratify=stratify)
    assert pub.dtype == torch.long and priv.dtype == torch.long
    assert not set(pub.tolist()) & set(priv.tolist())
    assert sorted(pub.tolist() + priv.tolist()) == list(range(len(labels)))
    assert len(pub) == round(fraction * len(labels))


@settings(max_examples=40, deadline=None)
@given(labels=st.lists(st.integers(0, 4), min_size=2, max_size=60), data=st.data())
def test_split_property_classes(labels, data):
    present = sorted(set(labels))
    if len(present) < 2:
        return
    chosen = data.draw(st.lists(st.sampled_from(present), min_size=1, max_size=len(present) - 1, unique=True))
    pub, priv = D.split_public_private(labels, public_classes=chosen)
    lab = torch.tensor(labels)
    assert all(int(lab[i]) in chosen for i in pub) and all(int(lab[i]) not in chosen for i in priv)
    assert len(pub) + len(priv) == len(labels)


# --------------------------------------------------------------------------- torchvision formats


def _write_idx(path: Path, array: np.ndarray) -> None:
    """IDX ("Pascal Vincent") file: magic 0x0000 08 nd (uint8), big-endian dims, data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_family_real_format(tmp_path, name, folder):
    rng = np.random.default_rng(0)
    raw = tmp_path / folder / "raw"
    imgs = {"train": rng.integers(0, 256, (6, 28, 28)), "t10k": rng.integers(0, 256, (4, 28, 28))}
    labs = {"train": np.array([0, 1, 2, 3, 4, 9]), "t10k": np.array([5, 6, 7, 8])}
    for p in ("train", "t10k"):
        _write_idx(raw / f"{p}-images-idx3-ubyte", imgs[p])
        _write_idx(raw / f"{p}-labels-idx1-ubyte", labs[p])
    assert D.check_available(name, data_root=tmp_path) == tmp_path
    tr = D.load_dataset(name, "train", data_root=tmp_path)
    te = D.load_dataset(name, "test", data_root=tmp_path)
    assert tr.x.shape == (6, 1, 28, 28) and te.x.shape == (4, 1, 28, 28)
    assert tr.y.tolist() == [0, 1, 2, 3, 4, 9] and te.y.tolist() == [5, 6, 7, 8]
    assert tr.source == f"torchvision:{tmp_path}"
    spec_mean = 0.1307 if name == "mnist" else 0.2860
    spec_std = 0.3081 if name == "mnist" else 0.3530
    expected = (torch.as_tensor(imgs["t10k"][2], dtype=torch.float32) / 255 - spec_mean) / spec_std
    assert torch.allclose(te.x[2, 0], expected, atol=1e-5)


def _pickle(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def test_cifar10_real_format(tmp_path, md5_skipped):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    batches = []
    for i in range(1, 6):
        data = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        labels = [(2 * i) % 10, (2 * i + 1) % 10]
        batches.append((data, labels))
        _pickle(folder / f"data_batch_{i}", {"data": data, "labels": labels, "batch_label": f"b{i}"})
    test = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    _pickle(folder / "test_batch", {"data": test, "labels": [7, 8, 9]})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _pickle(folder / "batches.meta", {"label_names": names, "num_vis": 3072})

    tr = D.load_dataset("cifar10", data_root=tmp_path)
    te = D.load_dataset("cifar10", "test", data_root=tmp_path)
    assert tr.x.shape == (10, 3, 32, 32) and te.x.shape == (3, 3, 32, 32)
    assert tr.raw.dtype == torch.uint8  # kept compact until asked for
    assert tr.y.tolist() == [l for _, ls in batches for l in ls]
    assert te.y.tolist() == [7, 8, 9] and tr.classes == names
    # CIFAR rows are channel-major 3x32x32
    expected = (torch.as_tensor(test[1].reshape(3, 32, 32), dtype=torch.float32) / 255
                - torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)) / torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    assert torch.allclose(te.x[1], expected, atol=1e-5)


def test_cifar100_real_format(tmp_path, md5_skipped):
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar-100-python"
    tr_data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    _pickle(folder / "train", {"data": tr_data, "fine_labels": [0, 50, 99, 3], "coarse_labels": [0, 1, 2, 3]})
    _pickle(folder / "test", {"data": tr_data[:2], "fine_labels": [98, 1], "coarse_labels": [0, 1]})
    _pickle(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": []})
    tr = D.load_dataset("cifar100", data_root=tmp_path)
    te = D.load_dataset("cifar100", "test", data_root=tmp_path)
    assert tr.num_classes == 100 and tr.y.tolist() == [0, 50, 99, 3] and te.y.tolist() == [98, 1]
    assert tr.x.shape == (4, 3, 32, 32)


def test_cifar_md5_check_stays_in_library(tmp_path):
    """Without the test patch, torchvision's checksum refuses our fake files: a UserError."""
    folder = tmp_path / "cifar-100-python"
    for f in ("train", "test", "meta"):
        _pickle(folder / f, {"data": np.zeros((1, 3072), np.uint8), "fine_labels": [0]})
    with pytest.raises(UserError, match="corrupted"):
        D.load_dataset("cifar100", data_root=tmp_path)


@pytest.mark.parametrize("nested", [True, False])
def test_svhn_real_format(tmp_path, md5_skipped, nested):
    from scipy.io import savemat

    rng = np.random.default_rng(3)
    root = tmp_path / "svhn" if nested else tmp_path
    root.mkdir(exist_ok=True)
    X = rng.integers(0, 256, (32, 32, 3, 5), dtype=np.uint8)  # H x W x C x N
    y = np.array([[10], [1], [2], [10], [9]], dtype=np.uint8)  # label 10 is digit 0
    savemat(root / "train_32x32.mat", {"X": X, "y": y})
    savemat(root / "test_32x32.mat", {"X": X[..., :2], "y": y[:2]})
    tr = D.load_dataset("svhn", data_root=tmp_path)
    assert tr.x.shape == (5, 3, 32, 32) and tr.y.tolist() == [0, 1, 2, 0, 9]
    assert tr.source == f"torchvision:{root}"
    got = tr.raw[3]
    assert torch.equal(got, torch.as_tensor(X[..., 3]).permute(2, 0, 1))
    assert len(D.load_dataset("svhn", "test", data_root=tmp_path)) == 2


def test_imagefolder(tmp_path):
    from PIL import Image

    base = tmp_path / "places"
    rng = np.random.default_rng(4)
    layout = {"train": {"cat": 3, "dog": 2, "eel": 1}, "val": {"dog": 1, "cat": 2}}
    for split, classes in layout.items():
        for cls, k in classes.items():
            (base / split / cls).mkdir(parents=True)
            for i in range(k):
                arr = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
                ext = "png" if i % 2 == 0 else "jpg"
                Image.fromarray(arr).save(base / split / cls / f"{i}.{ext}")
    (base / "train" / "cat" / "notes.txt").write_text("not an image")

    D.check_available("imagefolder", data_root=tmp_path, root="places")
    tr = D.load_dataset("imagefolder", data_root=tmp_path, root="places", image_size=16)
    te = D.load_dataset("imagefolder", "test", root=str(base), image_size=16)  # absolute root, val fallback
    assert tr.classes == ["cat", "dog", "eel"] and tr.num_classes == 3
    assert tr.y.tolist() == [0, 0, 0, 1, 1, 2] and sorted(te.y.tolist()) == [0, 0, 1]
    assert tr.x.shape == (6, 3, 16, 16) and tr.input_shape == (3, 16, 16)
    sub = tr.subset([5, 0])
    assert torch.equal(sub.x[:], tr.x[[5, 0]]) and sub.y.tolist() == [2, 0]
    with pytest.raises(UserError, match="imagefolder"):
        D.load_dataset("imagefolder", data_root=tmp_path, root="nowhere")


# --------------------------------------------------------------------------- missing offline


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "cifar100", "svhn"])
def test_missing_offline_is_a_clear_error(tmp_path, name):
    for call in (
        lambda: D.check_available(name, data_root=tmp_path),
        lambda: D.load_dataset(name, data_root=tmp_path),
    ):
        with pytest.raises(UserError) as err:
            call()
        msg = str(err.value)
        assert repr(name) in msg and str(tmp_path) in msg
        assert "DPBENCH_DATA" in msg and "--download" in msg
        assert "\n" not in msg


def test_default_root_and_download_flag(monkeypatch, tmp_path):
    monkeypatch.setenv("DPBENCH_DATA", str(tmp_path / "x"))
    assert D.default_data_root() == tmp_path / "x"
    with pytest.raises(UserError, match=str(tmp_path / "x")):
        D.check_available("cifar10")
    monkeypatch.delenv("DPBENCH_DATA")
    assert D.default_data_root() == Path("~/.cache/dpbench/data").expanduser()
    # with downloading on, missing files are not a pre-flight error (they will be fetched)
    monkeypatch.setenv("DPBENCH_DOWNLOAD", "1")
    assert D.check_available("cifar10", data_root=tmp_path) == tmp_path
    assert D.check_available("digits") is None and D.check_available("synthetic") is None
