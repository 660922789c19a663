"""The model families the gpu profiles add, at tiny size, against the naive per-sample loop:
WRN16-4 (notebook 02, GroupNorm), timm's VGG with GroupNorm (notebook 01: vgg*_bn converted),
and a ViT whose inputs are resized inside the model (notebook 04: ImageNet weights on 32 px
CIFAR). Every clipping method must give the naive loop's clipped sum."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dpbench.clipping import ClippingEngine
from dpbench.errors import UserError
from dpbench.models import assert_no_batchnorm, create_model

from test_clipping import METHODS, assert_close, naive_clipped, naive_per_sample

pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise_norms(model):
    # GroupNorm starts at weight 1, bias 0 (and timm zeroes some): random affine values make
    # every layer's per-sample gradient non-trivial.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(1 + 0.2 * torch.randn_like(m.weight))
                m.bias.copy_(0.1 * torch.randn_like(m.bias))
    return model.to(torch.float64).eval()


def _check_against_naive(model, x, y):
    ps = naive_per_sample(model, x, y)
    names = list(ps)
    C = float(sum(v.flatten(1).pow(2).sum(1) for v in ps.values()).sqrt().median())
    ref, _ = naive_clipped(ps, {"all": names}, {"all": C})
    for method in METHODS:
        model.zero_grad(set_to_none=True)
        eng = ClippingEngine(model, max_grad_norm=C, method=method)
        try:
            eng.backward(F.cross_entropy(model(x), y, reduction="none"))
            grads = {n: p.grad for n, p in model.named_parameters()}
            assert_close(grads, ref, 1e-6)
        finally:
            eng.remove()


def test_wrn16_4_shape_parameters_and_groupnorm():
    m = create_model("wrn16_4", 10)
    n = sum(p.numel() for p in m.parameters())
    assert 2.6e6 < n < 2.9e6  # He et al.'s WRN16-4: ~2.7M parameters
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert_no_batchnorm(m)
    assert sum(isinstance(x, torch.nn.GroupNorm) for x in m.modules()) == 2 * 6 + 1  # 2 per block, 6 blocks, final
    assert create_model("wrn16_4", 10, norm="batch").stages[0][0].norm1.__class__.__name__ == "BatchNorm2d"
    with pytest.raises(UserError, match="6n\\+4"):
        create_model("wrn16_4", 10, depth=12)


def test_wide_resnet_matches_the_naive_loop():
    torch.manual_seed(0)
    model = _randomise_norms(create_model("wrn16_4", 3, depth=10, widen=1, zero_head=False))  # same code, tiny
    torch.manual_seed(1)
    _check_against_naive(model, torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (3,)))


def test_timm_vgg_with_groupnorm_matches_the_naive_loop():
    # timm's VGG class (vgg*_bn layout: conv, BatchNorm -> GroupNorm, ReLU; ConvMlp pre-logits), narrowed
    from timm.models.vgg import VGG

    from dpbench.models import convert_batchnorm_to_groupnorm

    torch.manual_seed(0)
    # 64 channels: 32 groups of 2 (with one channel per group a conv bias before GroupNorm gets no gradient)
    net = VGG([64, "M", 64, "M"], num_classes=3, norm_layer=torch.nn.BatchNorm2d, mlp_ratio=1 / 512)
    model = _randomise_norms(convert_batchnorm_to_groupnorm(net))
    assert_no_batchnorm(model)
    torch.manual_seed(1)
    _check_against_naive(model, torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (3,)))


@pytest.mark.parametrize("name", ["vgg11_bn", "vgg16_bn", "vgg19_bn"])
def test_profile_vgg_names_build_with_groupnorm(name):
    m = create_model(name, 10, img_size=32, norm="group", mlp_ratio=1 / 64)  # narrowed head, the paper's conv stack
    assert_no_batchnorm(m)
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_resized_vit_matches_the_naive_loop_and_keeps_its_names():
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", 3, img_size=8, resize_to=16, patch_size=8, zero_head=False,
                         depth=1, embed_dim=16, num_heads=2)
    assert model.patch_embed.img_size == (16, 16) and "inputs resized to 16 px" in model.dpbench_notes
    assert "blocks.0.attn.qkv.weight" in dict(model.named_parameters())  # subsets see timm's names
    model = _randomise_norms(model)
    torch.manual_seed(1)
    _check_against_naive(model, torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (3,)))
    with pytest.raises(UserError, match="resize_to"):
        create_model("vit_tiny_patch16_224", 3, resize_to=-1)


@pytest.mark.parametrize("method", ["opacus_hooks", "opacus_ghost"])
def test_opacus_cells_run_on_timm_vgg_despite_inplace_relu(method):
    # notebook 01's VGG19 headline is mixed against Opacus: its cells must run on timm's VGG,
    # whose ReLU(inplace=True) breaks Opacus's module hooks unless the bench turns it off.
    pytest.importorskip("opacus")
    from timm.models.vgg import VGG

    from dpbench.models import convert_batchnorm_to_groupnorm
    from dpbench.training.bench import make_step

    torch.manual_seed(0)
    model = convert_batchnorm_to_groupnorm(VGG([64, "M", 64, "M"], num_classes=3, norm_layer=torch.nn.BatchNorm2d,
                                               mlp_ratio=1 / 512))
    assert any(getattr(m, "inplace", False) for m in model.modules())
    step, cleanup = make_step(method, model, torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2,)))
    try:
        step()
        step()
    finally:
        cleanup()
    assert all(p.grad is not None for p in model.parameters())
