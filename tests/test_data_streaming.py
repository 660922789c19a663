"""Image folders stream (issue 18, deliverable 7 "Scale"): `.x` is decoded batch by batch,
never whole; feature extraction goes through a DataLoader with workers; training and
evaluation index the streamed view like a tensor. On a tiny image folder in tmp_path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from dpbench import data as D
from dpbench.training.features import extract_features
from dpbench.training.loop import BatchSpec, PrivacySpec, evaluate, fit

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, k in {"a": 5, "b": 4, "c": 3}.items():
        (tmp_path / "imgs" / "train" / cls).mkdir(parents=True)
        for i in range(k):
            Image.fromarray(rng.integers(0, 256, (12, 18, 3), dtype=np.uint8)).save(
                tmp_path / "imgs" / "train" / cls / f"{i}.png")
    return D.load_dataset("imagefolder", data_root=tmp_path, root="imgs", image_size=8)


@pytest.fixture
def decodes(monkeypatch):
    """The number of images each _raw call decodes (in this process)."""
    sizes: list[int] = []
    orig = D.ImageFolderDataset._raw

    def spy(self, idx):
        sizes.append(int(idx.numel()))
        return orig(self, idx)

    monkeypatch.setattr(D.ImageFolderDataset, "_raw", spy)
    return sizes


def _serial(ds):
    return torch.stack([ds._normalise(ds._decode(p).unsqueeze(0))[0] for p in ds.paths])


def test_x_is_a_streamed_view_decoded_on_access(folder, decodes, monkeypatch):
    x = folder.x
    assert isinstance(x, D.StreamedImages) and decodes == []  # nothing decoded yet
    assert x.shape == (12, 3, 8, 8) and len(x) == 12 and x.dim() == 4 and x.dtype == torch.float32
    ref = _serial(folder)
    for workers in ("1", "4"):  # serial and thread-pool decoding give the same pixels
        monkeypatch.setenv("DPBENCH_DECODE_WORKERS", workers)
        assert torch.equal(x[torch.tensor([11, 0, 5])], ref[[11, 0, 5]])
        assert torch.equal(x[2:6], ref[2:6]) and torch.equal(x[3], ref[3])
    assert max(decodes) == 4  # never the whole set
    sub = folder.subset([7, 1])
    assert torch.equal(sub.x[:], ref[[7, 1]])


def test_streamed_view_takes_boolean_masks_as_masks(folder):
    """A boolean mask selects rows, as on a tensor (a cast to long would read rows 0 and 1 over and over)."""
    x, ref = folder.x, _serial(folder)
    mask = torch.zeros(12, dtype=torch.bool)
    mask[[2, 7, 11]] = True
    assert torch.equal(x[mask], ref[mask])
    assert torch.equal(x[mask.numpy()], ref[mask])
    assert torch.equal(x[[4, 9]], ref[[4, 9]])
    with pytest.raises(IndexError):
        x[torch.ones(5, dtype=torch.bool)]


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_streams_in_order_through_workers(folder, workers):
    ref = _serial(folder)
    got = list(folder.loader(5, num_workers=workers))
    assert [len(b[1]) for b in got] == [5, 5, 2]
    assert torch.equal(torch.cat([b[0] for b in got]), ref) and torch.equal(torch.cat([b[1] for b in got]), folder.y)
    part = list(folder.loader(2, indices=[9, 3, 4], num_workers=workers))
    assert torch.equal(torch.cat([b[0] for b in part]), ref[[9, 3, 4]])
    assert not folder.loader(4, num_workers=workers).pin_memory or torch.cuda.is_available()


def test_features_stream_and_match_the_in_memory_tensor(folder, decodes, monkeypatch):
    monkeypatch.setattr(D, "_decode_workers", lambda: 0)  # loader workers in this process: counted
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6), nn.ReLU(), nn.Linear(6, 3))
    model.get_classifier = lambda: model[3]
    streamed = extract_features(model, folder.x, batch_size=5, progress=False)
    assert max(decodes) == 5 and sum(decodes) == 12  # batch by batch, each image once
    ref = extract_features(model, _serial(folder), batch_size=5, progress=False)
    assert streamed.shape == (12, 6) and torch.allclose(streamed, ref, atol=1e-6)


def test_training_and_evaluation_on_a_streamed_folder(folder, decodes):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    res = fit(model, folder, batching=BatchSpec(steps=3, expected_batch_size=4),
              privacy=PrivacySpec(noise_multiplier=1.0), seed=0)
    assert res is not None and max(decodes) < 12  # Poisson batches, decoded as drawn
    decodes.clear()
    loss, acc = evaluate(model, folder, batch_size=5)
    assert max(decodes) == 5 and np.isfinite(loss) and 0 <= acc <= 1
    assert (loss, acc) == pytest.approx(evaluate(model, (_serial(folder), folder.y)))
