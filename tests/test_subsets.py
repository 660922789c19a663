"""Named trainable subsets (dpbench.models.trainable_subset / apply_subset), issue 7."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dpbench import models as M
from dpbench.errors import UserError


@pytest.fixture(scope="module")
def resnet():
    return M.create_model("resnet18", 10, norm="group")


@pytest.fixture(scope="module")
def vit():
    return M.create_model("vit_tiny_patch16_224", 10, img_size=32)


def _block(prefix, names):
    return [f"{prefix}.{n}" for n in names]


BASIC = ["conv1.weight", "bn1.weight", "bn1.bias", "conv2.weight", "bn2.weight", "bn2.bias"]
VIT_BLOCK = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
             "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]


def test_resnet18_subsets_exact_names(resnet):
    assert M.subset_family(resnet) == "resnet"
    assert M.trainable_subset(resnet, "head") == ["fc.weight", "fc.bias"]
    assert M.trainable_subset(resnet, "head").num_params == 512 * 10 + 10
    assert M.trainable_subset(resnet, "last_block+head") == _block("layer4.1", BASIC) + ["fc.weight", "fc.bias"]
    assert M.trainable_subset(resnet, "last_block+head").patterns == ["layer4.1.*", "fc.*"]
    assert M.trainable_subset(resnet, "last_two_blocks+head") == (
        _block("layer4.0", BASIC) + ["layer4.0.downsample.0.weight", "layer4.0.downsample.1.weight",
                                     "layer4.0.downsample.1.bias"]
        + _block("layer4.1", BASIC) + ["fc.weight", "fc.bias"])
    assert M.trainable_subset(resnet, "first_conv+head") == ["conv1.weight", "fc.weight", "fc.bias"]
    norms = set(M.trainable_subset(resnet, "norms+head"))
    expected_norms = {"bn1.weight", "bn1.bias", "fc.weight", "fc.bias"}
    for stage in range(1, 5):
        for b in range(2):
            for k in ("bn1", "bn2"):
                expected_norms |= {f"layer{stage}.{b}.{k}.weight", f"layer{stage}.{b}.{k}.bias"}
    for stage in (2, 3, 4):
        expected_norms |= {f"layer{stage}.0.downsample.1.weight", f"layer{stage}.0.downsample.1.bias"}
    assert norms == expected_norms
    bias = M.trainable_subset(resnet, "bias+head")
    assert set(bias) == {n for n in expected_norms if n.endswith(".bias")} | {"fc.weight"}
    everything = M.trainable_subset(resnet, "all")
    assert everything == [n for n, _ in resnet.named_parameters()]
    assert everything.num_params == sum(p.numel() for p in resnet.parameters())


def test_vit_subsets_exact_names(vit):
    assert M.subset_family(vit) == "vit"
    assert M.trainable_subset(vit, "head") == ["head.weight", "head.bias"]
    assert M.trainable_subset(vit, "last_block+head") == (
        _block("blocks.11", VIT_BLOCK) + ["norm.weight", "norm.bias", "head.weight", "head.bias"])
    assert M.trainable_subset(vit, "last_two_blocks+head") == (
        _block("blocks.10", VIT_BLOCK) + _block("blocks.11", VIT_BLOCK)
        + ["norm.weight", "norm.bias", "head.weight", "head.bias"])
    assert M.trainable_subset(vit, "first_conv+head") == [
        "patch_embed.proj.weight", "patch_embed.proj.bias", "head.weight", "head.bias"]
    norms = set(M.trainable_subset(vit, "norms+head"))
    assert norms == ({f"blocks.{i}.{k}.{w}" for i in range(12) for k in ("norm1", "norm2") for w in ("weight", "bias")}
                     | {"norm.weight", "norm.bias", "head.weight", "head.bias"})
    bias = M.trainable_subset(vit, "bias+head")
    assert "cls_token" not in bias and "pos_embed" not in bias and "head.weight" in bias
    assert len(bias) == 12 * 6 + 4  # 6 biases per block, patch_embed, norm, head bias and weight
    assert M.trainable_subset(vit, "head").num_params == 192 * 10 + 10
    assert {"cls_token", "pos_embed"} <= set(M.trainable_subset(vit, "all"))


def test_small_nets_subsets():
    cnn = M.create_model("small_cnn", 10, in_chans=1, img_size=8)
    assert M.trainable_subset(cnn, "last_block+head") == ["blocks.2.conv.weight", "blocks.2.norm.weight",
                                                          "blocks.2.norm.bias", "head.weight", "head.bias"]
    assert M.trainable_subset(cnn, "first_conv+head") == ["blocks.0.conv.weight", "head.weight", "head.bias"]
    assert M.trainable_subset(cnn, "bias+head") == ["blocks.0.norm.bias", "blocks.1.norm.bias", "blocks.2.norm.bias",
                                                    "head.weight", "head.bias"]
    sizes = {r["subset"]: r["params"] for r in M.subset_table(cnn)}
    assert sizes["head"] < sizes["bias+head"] < sizes["norms+head"] < sizes["last_block+head"] < sizes["all"]
    assert sizes["all"] == sum(p.numel() for p in cnn.parameters())
    mlp = M.create_model("mlp", 10, in_chans=1, img_size=8, hidden=(32, 16))
    assert M.trainable_subset(mlp, "last_block+head") == ["blocks.1.fc.weight", "blocks.1.fc.bias",
                                                          "head.weight", "head.bias"]
    assert M.trainable_subset(mlp, "last_two_blocks+head") == [n for n, _ in mlp.named_parameters()]
    with pytest.raises(UserError, match="no normalisation"):
        M.trainable_subset(mlp, "norms+head")
    with pytest.raises(UserError, match="no convolution"):
        M.trainable_subset(mlp, "first_conv+head")


def test_unknown_subset_or_family_lists_valid_names():
    cnn = M.create_model("small_cnn", 3, in_chans=1, img_size=8)
    with pytest.raises(UserError, match=r"head, last_block\+head, last_two_blocks\+head, norms\+head, bias\+head"):
        M.trainable_subset(cnn, "last_layer")
    with pytest.raises(UserError, match="supported families: small_cnn, mlp"):
        M.trainable_subset(nn.Sequential(nn.Linear(3, 2)), "head")


def test_apply_subset_sets_requires_grad(resnet):
    model = M.create_model("small_cnn", 10, in_chans=1, img_size=8)
    names = M.apply_subset(model, "norms+head")
    assert M.trainable_names(model) == list(names)
    assert M.count_trainable(model) == names.num_params
    M.apply_subset(model, "all")
    assert M.count_trainable(model) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,subset,kw,size", [
    ("resnet18", "last_block+head", dict(norm="group"), 16),
    ("vit_tiny_patch16_224", "norms+head", dict(img_size=32), 32),
])
def test_frozen_parameters_unchanged_after_dp_training(name, subset, kw, size):
    """DP fine-tuning through the shared loop (engine + DPOptimizer) never moves a frozen weight."""
    from dpbench.training.loop import BatchSpec, ClipSpec, EvalSpec, OptimSpec, PrivacySpec, fit

    torch.manual_seed(0)
    model = M.create_model(name, 4, zero_head=False, **kw)
    trained = set(M.apply_subset(model, subset))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.randn(8, 3, size, size), torch.randint(0, 4, (8,))
    res = fit(model, (x, y), batching=BatchSpec(steps=2, expected_batch_size=4),
              privacy=PrivacySpec(noise_multiplier=1.0, delta=1e-3), clipping=ClipSpec(max_grad_norm=1.0),
              optim=OptimSpec(lr=0.5), evaluation=EvalSpec(progress=False), seed=0)
    assert res.steps == 2 and res.ledger.steps == 2
    for n, p in model.named_parameters():
        if n in trained:
            assert not torch.equal(p.detach(), before[n]), f"{n} was trained but did not move"
        else:
            assert torch.equal(p.detach(), before[n]), f"frozen {n} changed"
            assert p.grad is None
