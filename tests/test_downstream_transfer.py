"""Notebook 03's downstream step (`public_pretraining.downstream_transfer`): linear probe and
fine-tune of a pre-trained model on another data set, an image folder (Places365 / iNaturalist
layout) or a registered set of the same shape (CIFAR-100 after CIFAR-10: the stand-in)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import ListRecorder

from dpbench.errors import UserError
from dpbench.experiments import public_pretraining as pp
from dpbench.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = {"name": "small_cnn", "num_classes": 10, "in_chans": 3, "img_size": 8, "width": 4, "depth": 2}


def _pretrained():
    torch.manual_seed(0)
    return create_model(**{**SPEC, "zero_head": False})


def _folder(root, classes=3, per_class=6, size=10):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                # class c is bright in channel c: learnable by a linear probe
                img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
                img[..., c] = 200
                Image.fromarray(img).save(d / f"{i}.png")


def test_transfer_model_copies_the_features_and_trains_the_right_parameters():
    src = _pretrained()
    probe = pp.transfer_model(src, SPEC, 7, "linear_probe")
    assert probe.head.out_features == 7 and probe is not src
    trainable = [n for n, p in probe.named_parameters() if p.requires_grad]
    assert trainable == ["head.weight", "head.bias"]
    assert torch.equal(probe.blocks[0].conv.weight, src.blocks[0].conv.weight)  # features kept
    assert probe.head.weight.abs().sum() == 0  # a fresh zero head
    tuned = pp.transfer_model(src, SPEC, 7, "fine_tune")
    assert all(p.requires_grad for p in tuned.parameters())
    assert not tuned._forward_hooks and not any(m._forward_hooks or m._backward_hooks for m in tuned.modules())
    with pytest.raises(UserError, match="downstream mode"):
        pp.transfer_model(src, SPEC, 7, "probe")


def test_transfer_of_a_timm_vit_replaces_its_head():
    spec = {"name": "vit_tiny_patch16_224", "num_classes": 10, "in_chans": 3, "img_size": 16, "patch_size": 8}
    src = create_model(**{**spec, "zero_head": False})
    m = pp.transfer_model(src, spec, 5, "linear_probe")
    assert m(torch.randn(2, 3, 16, 16)).shape == (2, 5)
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]


def test_downstream_on_an_image_folder_records_the_claim_only_for_the_papers_set(tmp_path):
    _folder(tmp_path / "places365")
    rec = ListRecorder()
    rows = pp.downstream_transfer({"sequential": _pretrained(), "only_private": _pretrained()}, SPEC,
                                  dataset="imagefolder", root="places365", data_root=str(tmp_path), epochs=3.0,
                                  lrs={"linear_probe": 0.05, "fine_tune": 0.01}, batch_size=8, seed=0, rec=rec,
                                  epsilon=8.0)
    assert [(r["pretrained"], r["mode"]) for r in rows] == [
        ("sequential", "linear_probe"), ("sequential", "fine_tune"), ("only_private", "linear_probe"),
        ("only_private", "fine_tune")]
    assert all(r["dataset"] == "places365" and r["classes"] == 3 and 0 <= r["test_acc"] <= 1 for r in rows)
    probe, tune = rows[0], rows[1]
    assert probe["trainable"] < tune["trainable"]
    assert len(rec.get("transfer_test_acc")) == 4
    claims = rec.get("transfer_test_acc_percent")
    assert len(claims) == 1 and claims[0]["claim_id"] == "A-places365-transfer-acc"
    assert claims[0]["value"] == pytest.approx(100 * probe["test_acc"])


def test_a_stand_in_data_set_is_labelled_and_never_tagged(tmp_path):
    _folder(tmp_path / "other")
    rec = ListRecorder()
    rows = pp.downstream_transfer({"sequential": _pretrained()}, SPEC, dataset="imagefolder", root="other",
                                  data_root=str(tmp_path), modes=["linear_probe"], epochs=1.0,
                                  lrs={"linear_probe": 0.05}, batch_size=8, rec=rec)
    assert rows[0]["role"].startswith("stand-in")
    assert not rec.get("transfer_test_acc_percent") and len(rec.get("transfer_test_acc")) == 1


def test_downstream_refuses_a_shape_mismatch_and_missing_settings(tmp_path):
    _folder(tmp_path / "places365")
    with pytest.raises(UserError, match="shape"):  # digits are 1x8x8; the model takes 3x8x8
        pp.downstream_transfer({"s": _pretrained()}, SPEC, dataset="digits", data_root=None, epochs=1.0,
                               lrs={"linear_probe": 0.1, "fine_tune": 0.1}, batch_size=8)
    with pytest.raises(UserError, match="fine_tune"):
        pp.downstream_transfer({"s": _pretrained()}, SPEC, dataset="imagefolder", root="places365",
                               data_root=str(tmp_path), epochs=1.0, lrs={"linear_probe": 0.1}, batch_size=8,
                               modes=["linear_probe", "fine_tune"])
    with pytest.raises(UserError, match="downstream_root"):
        pp.load_downstream("imagefolder", str(tmp_path), image_size=8, in_chans=3)
    with pytest.raises(UserError, match="no pre-trained model"):
        pp.downstream_transfer({}, SPEC, dataset="digits", data_root=None, epochs=1.0, lrs={}, batch_size=8)


def test_curvature_of_a_vit_needs_no_fused_attention_double_backward():
    # timm's ViTs call F.scaled_dot_product_attention, whose fused kernels have no double backward:
    # the Hessian-vector products of notebook 03 (tr(H)) run them on the math kernel.
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", 3, img_size=16, patch_size=8, depth=1, zero_head=False)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 3, (4,))
    tr = pp.trace_h(model, x, y, n_probes=2, seed=0)
    assert np.isfinite(tr)


@pytest.mark.parametrize("grid", [[4.0, 16.0, 32.0], [64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0]])
def test_figure5_batch_axis_passes_the_figure_check_on_narrow_and_wide_grids(grid):
    # a grid of less than a decade (the dry run's) used to get colliding log-scale minor labels
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dpbench.workbench.results import check_figure

    from types import SimpleNamespace

    g = np.array(grid)
    imp = SimpleNamespace(label="initialisation", terms={k: g / 10 for k in ("signal", "sampling", "noise")},
                          dp=1 / g, nondp=2 / g)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained", squeeze=False)
    pp.plot_improvement(axes, SimpleNamespace(grid=g, improvements=[imp]))
    assert not check_figure(fig)
    plt.close(fig)
