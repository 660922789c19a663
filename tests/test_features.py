"""Feature extraction, the on-disk feature cache, public-only normalisation, backbones."""

import torch

from dpbench.training import features as F
from dpbench.errors import UserError

import pytest


class _Net(torch.nn.Module):
    """Tiny backbone with a linear head; counts forward calls."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5), torch.nn.ReLU())
        self.head = torch.nn.Linear(5, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.head(self.body(x))


def _images(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 2, 2, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_cache_key_depends_on_every_part():
    base = dict(model_name="m", weights_id="w", dataset="d", split="train", size=10, transform="t")
    k = F.cache_key(**base)
    assert k == F.cache_key(**base) and len(k) == 24
    for part, other in [("model_name", "m2"), ("weights_id", "w2"), ("dataset", "d2"), ("split", "test"),
                        ("size", 11), ("transform", "t2")]:
        assert F.cache_key(**dict(base, **{part: other})) != k, part


def test_extract_features_returns_head_input():
    net = _Net()
    x, _ = _images()
    feats = F.extract_features(net, x, batch_size=7, progress=False)
    assert feats.shape == (20, 5)
    assert torch.allclose(feats, net.body(x), atol=1e-6)
    assert (feats >= 0).all()  # after the ReLU


def test_cache_miss_then_hit_and_key_changes(tmp_path):
    net = _Net()
    x, y = _images()
    kw = dict(model_name="net", dataset="toy", split="train", cache_dir=tmp_path, progress=False)
    first = F.cached_features(net, (x, y), **kw)
    assert not first.hit and first.path.exists() and first.path.suffix == ".safetensors"
    calls = net.calls
    second = F.cached_features(net, (x, y), **kw)
    assert second.hit and net.calls == calls  # served from disk, backbone not run
    assert torch.equal(second.features, first.features) and torch.equal(second.labels, y)
    assert second.key == first.key and second.meta["dataset"] == "toy"
    # another split, another transform or changed weights: a different entry
    other_split = F.cached_features(net, (x, y), **dict(kw, split="test"))
    assert not other_split.hit and other_split.key != first.key
    other_t = F.cached_features(net, (x, y), **dict(kw, transform="resize224"))
    assert not other_t.hit and other_t.key != first.key
    with torch.no_grad():
        net.body[1].weight.add_(1.0)
    changed = F.cached_features(net, (x, y), **kw)
    assert not changed.hit and changed.key != first.key
    assert not torch.allclose(changed.features, first.features)
    # refresh recomputes even on a hit
    again = F.cached_features(net, (x, y), **dict(kw, refresh=True))
    assert not again.hit
    # atomic writes leave no temporary files behind
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_weights_hash_tracks_values():
    a, b = _Net(), _Net()
    assert F.weights_hash(a) == F.weights_hash(b)
    with torch.no_grad():
        b.head.bias.add_(1e-3)
    assert F.weights_hash(a) != F.weights_hash(b)


def test_save_load_roundtrip(tmp_path):
    feats, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    path = F.save_features(tmp_path / "f.safetensors", feats, labels, {"note": "x"})
    back = F.load_features(path)
    assert torch.equal(back.features, feats) and torch.equal(back.labels, labels)
    assert back.meta["note"] == "x"


def test_public_normalizer_uses_public_statistics_only():
    pub = torch.randn(500, 4) * 3 + 5
    priv = torch.randn(500, 4) * 3 - 100  # very different: must not influence the fit
    nz = F.PublicNormalizer().fit(pub)
    z = nz.transform(pub)
    assert z.mean(0).abs().max() < 1e-4
    assert abs(float(z.norm(dim=1).median()) - 1.0) < 1e-4
    assert nz.transform(priv).mean() < -10  # private data shifted by the public mean only
    with pytest.raises(UserError):
        F.PublicNormalizer().transform(pub)


def test_pixel_features():
    x, y = _images()
    fs = F.pixel_features((x, y))
    assert fs.features.shape == (20, 12) and torch.equal(fs.labels, y)


def test_synthetic_features_are_seeded_and_shaped():
    a = F.synthetic_features(300, 16, 4, n_test=50, n_public=40, seed=1)
    b = F.synthetic_features(300, 16, 4, n_test=50, n_public=40, seed=1)
    c = F.synthetic_features(300, 16, 4, n_test=50, n_public=40, seed=2)
    assert a.train.features.shape == (300, 16) and a.test.features.shape == (50, 16) and len(a.public) == 40
    assert torch.equal(a.train.features, b.train.features) and not torch.equal(a.train.features, c.train.features)
    assert (a.train.features >= 0).all()  # relu features
    assert set(a.train.labels.tolist()) <= set(range(4))
    assert not torch.equal(a.train.features[:50], a.test.features)  # independent streams


def test_public_backbone_trains_on_public_examples_only():
    from dpbench.data import load_dataset

    ds = load_dataset("digits", "train")
    pub = (ds.x[:200], ds.y[:200])
    bb = F.public_backbone("small_cnn", pub, 10, epochs=1)
    assert bb.source == "public" and bb.note == "small_cnn trained non-privately on 200 public examples"
    assert bb.info["public_examples"] == 200 and bb.weights_id == F.weights_hash(bb.model)
    assert not any(p.requires_grad for p in bb.model.parameters()) and not bb.model.training
    feats = F.extract_features(bb.model, ds.x[:10], progress=False)
    assert feats.shape[0] == 10 and feats.shape[1] == bb.model.num_features
    # seeded: the same public examples and seed give the same weights, another seed does not
    assert F.public_backbone("small_cnn", pub, 10, epochs=1).weights_id == bb.weights_id
    assert F.public_backbone("small_cnn", pub, 10, epochs=1, seed=1).weights_id != bb.weights_id


def test_checkpoint_backbone_loads_the_saved_weights(tmp_path):
    from dpbench.models import create_model, save_checkpoint

    model = create_model("small_cnn", num_classes=10, in_chans=1, img_size=8, zero_head=False)
    path = save_checkpoint(model, tmp_path / "public.safetensors")
    x = torch.randn(4, 1, 8, 8)
    bb = F.checkpoint_backbone("small_cnn", path, num_classes=10, public=(x, torch.zeros(4, dtype=torch.long)))
    assert bb.source == "checkpoint" and bb.weights_id == F.weights_hash(model)
    assert bb.info["path"] == str(path) and str(path) in bb.note
    assert not any(p.requires_grad for p in bb.model.parameters())
    with pytest.raises(Exception):
        F.checkpoint_backbone("small_cnn", tmp_path / "missing.safetensors", num_classes=10)


def test_timm_weights_from_local_cache(tmp_path, monkeypatch):
    """timm_backbone loads safetensors weights from the local hub cache without the network."""
    import timm
    from safetensors.torch import save_file

    ref = timm.create_model("test_resnet", pretrained=False, num_classes=1000)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    monkeypatch.setattr(F, "_timm_cached_safetensors", lambda name: str(path))
    monkeypatch.setattr(F, "_hub_reachable", lambda *a, **k: pytest.fail("must not touch the network"))
    bb, note = F.timm_backbone("test_resnet")
    assert bb.source == "timm" and "local cache" in note and bb.note == note
    x = torch.randn(2, 3, 32, 32)
    feats = F.extract_features(bb.model, x, progress=False)
    ref.reset_classifier(0)
    assert torch.allclose(feats, ref.eval()(x), atol=1e-5)


def test_timm_offline_is_a_note_not_an_error(monkeypatch):
    monkeypatch.setattr(F, "_timm_cached_safetensors", lambda name: None)
    monkeypatch.setattr(F, "_hub_reachable", lambda *a, **k: False)
    bb, note = F.timm_backbone("test_resnet")
    assert bb is None and "unreachable" in note
    bb, note = F.timm_backbone("small_cnn")
    assert bb is None and "not a timm model" in note
