"""The gpu and gpu-quick profiles, checked on the CPU: how `gpu-quick` resolves (notebook 01
only, said clearly for the others), that a gpu profile may run a notebook on the CPU on purpose
(06), where results of a gpu profile go without CUDA, and that each notebook's gpu settings are
consistent with the code that reads them (models build, shapes agree, no stale `requires`)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from conftest import ListRecorder

from dpbench.errors import UserError
from dpbench.experiments import clipping_efficiency as cx
from dpbench.experiments import last_layer_features as llf
from dpbench.models import assert_no_batchnorm, create_model
from dpbench.workbench import params, runner, scheduling

REPO = Path(__file__).resolve().parents[1]
NB01 = "01_clipping_efficiency"


def _gpu(nb, profile="gpu"):
    return params.load_yaml(REPO / "params" / nb / f"{profile}.yaml")


# ------------------------------------------------------------------ gpu-quick resolution
def test_gpu_quick_is_a_profile_and_resolves_for_notebook_01_only():
    assert "gpu-quick" in params.PROFILES and set(params.GPU_PROFILES) == {"gpu", "gpu-quick"}
    assert params.check_profile("gpu-quick") == "gpu-quick"
    spec = params.resolve(REPO, NB01, "gpu-quick")
    assert spec.device == "cuda" and spec.exclusive and spec.params["profile"] == "gpu-quick"
    covered = [nb for nb in params.list_notebooks(REPO) if "gpu-quick" in params.list_profiles(REPO, nb)]
    assert covered == [NB01]
    with pytest.raises(UserError, match=r"no gpu-quick profile.*covers only: 01_clipping_efficiency"):
        params.resolve(REPO, "02_groupwise_clipping", "gpu-quick")


def test_gpu_quick_needs_cuda_like_gpu(monkeypatch):
    monkeypatch.setattr(params, "cuda_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA device"):
        params.check_device(params.resolve(REPO, NB01, "gpu-quick"))
    monkeypatch.setattr(params, "cuda_available", lambda: True)
    params.check_device(params.resolve(REPO, NB01, "gpu-quick"))


def test_a_gpu_profile_may_choose_the_cpu(monkeypatch):
    # notebook 06 gains nothing on a GPU: `device: cpu` in its gpu profile is accepted, even without CUDA
    monkeypatch.setattr(params, "cuda_available", lambda: False)
    spec = params.resolve(REPO, "06_privacy_audit", "gpu")
    assert spec.device == "cpu"
    params.check_device(spec)
    with pytest.raises(UserError, match="no CUDA device"):  # any other device still needs CUDA
        params.check_device(params.resolve(REPO, "06_privacy_audit", "gpu", {"device": "cuda"}))


def test_gpu_quick_without_cuda_never_writes_the_gpu_results(monkeypatch, tmp_path):
    monkeypatch.setattr(params, "cuda_available", lambda: False)
    r = runner.Runner(REPO, results=tmp_path, progress=False, out=io.StringIO())
    assert r.result_dir("gpu-quick", NB01) == tmp_path / runner.GPU_WITHOUT_CUDA_DIR / "gpu-quick" / NB01
    monkeypatch.setattr(params, "cuda_available", lambda: True)
    assert r.result_dir("gpu-quick", NB01) == tmp_path / "gpu-quick" / NB01


def test_reproduce_gpu_quick_says_which_notebooks_it_leaves_out(monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(scheduling, "plan", lambda runner, names, profile: seen.setdefault("names", names) and [])
    monkeypatch.setattr(scheduling, "run_in_order", lambda runner, specs, force=False: [])
    scheduling.reproduce("gpu-quick", repo=REPO, progress=False)
    assert seen["names"] == [NB01]
    err = capsys.readouterr().err
    assert f"runs {NB01}" in err and "02_groupwise_clipping" in err and "no params/NB/gpu-quick.yaml" in err


# ------------------------------------------------------------------ per-notebook gpu settings
def test_01_headline_ratios_for_vgg19():
    claims = cx.load_paper_values()
    base = dict(model="vgg19_bn", resolution=32, batch_size=256, style="flat", device="cuda:x", reason="")
    rows = [dict(base, method="opacus_hooks", status="ok", step_time_s=0.9, max_batch_size=20),
            dict(base, method="mixed", status="ok", step_time_s=0.3, max_batch_size=360)]
    rec = ListRecorder()
    cx.record_headline_ratios(rec, rows, claims)
    speed, batch = rec.get("speedup_vs_opacus"), rec.get("max_batch_ratio_vs_opacus")
    assert speed[0]["value"] == pytest.approx(3.0) and speed[0]["claim_id"] == "C-vgg19-speedup-vs-opacus"
    assert batch[0]["value"] == pytest.approx(18.0) and batch[0]["claim_id"] == "C-vgg19-maxbatch-vs-opacus"
    rows[0].update(status="failed", reason="OutOfMemoryError: CUDA out of memory", step_time_s=None)
    rec = ListRecorder()
    cx.record_headline_ratios(rec, rows, claims)
    failed = rec.get("speedup_vs_opacus")[0]
    assert failed["value"] is None and failed["status"] == "failed" and "out of memory" in failed["reason"]
    rec = ListRecorder()
    cx.record_headline_ratios(rec, [dict(r, model="resnet18") for r in rows], claims)
    assert not rec.rows


def test_01_max_batch_cap_reaches_the_cells():
    p = _gpu(NB01)
    cells = cx.notebook_cells(p["models"], p["methods"], device="cuda", max_batch=True,
                              max_batch_cap_gb=p["max_batch_cap_gb"], max_batch_methods=p["max_batch_methods"],
                              layer_style_model=p["layer_style_model"], layer_style_methods=p["layer_style_methods"])
    assert {c.method for c in cells if c.max_batch} == set(p["max_batch_methods"])
    assert all(c.max_batch_cap_gb == 16.0 for c in cells)
    with pytest.raises(UserError, match="max_batch_methods"):
        cx.notebook_cells(["tiny_cnn@16:8"], ["mixed"], max_batch_methods=["bk"])
    with pytest.raises(UserError, match="max_batch_cap_gb"):
        cx.notebook_cells(["tiny_cnn@16:8"], ["mixed"], max_batch_cap_gb=-1)


def test_02_gpu_is_wrn16_4_with_dp_sgd():
    p = _gpu("02_groupwise_clipping")
    assert p["model_name"] == "wrn16_4" and p["dataset"] == "cifar10" and p["momentum"] > 0
    m = create_model(p["model_name"], 10, img_size=32, **p["model_kwargs"])
    assert 2.6e6 < sum(q.numel() for q in m.parameters()) < 2.9e6
    assert p["min_seeds"] >= 5


def test_03_gpu_is_a_vit_with_a_downstream_step():
    p = _gpu("03_public_pretraining")
    m = create_model(p["model_name"], 10, img_size=32, **p["model_kwargs"])
    assert type(m).__name__ == "VisionTransformer" and m.patch_embed.num_patches == 64
    assert p["downstream_dataset"] == "cifar100" and set(p["downstream_lrs"]) == {"linear_probe", "fine_tune"}
    assert set(p["downstream_arms"]) <= set(p["schedules"]) and "sequential" in p["downstream_arms"]
    assert max(p["trajectory_steps"]) <= p["steps"] and p["switch_step"] < p["steps"]


def test_04_gpu_fine_tunes_cifar100_from_a_net_without_batchnorm():
    p = _gpu("04_layer_selection")
    assert "requires" not in p  # the hub backbone reads nothing of notebook 03
    assert p["backbone"] == "hub" and p["dataset"] == "cifar100" and p["epsilons"] == [1.0, 2.0, 4.0, 8.0]
    assert p["eval_seeds"] >= 3
    m = create_model(p["public_model"], 100, img_size=32, **p["public_model_kwargs"])  # random weights offline
    assert_no_batchnorm(m)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 100)  # 32 px CIFAR resized inside the model


def test_06_gpu_runs_on_the_cpu():
    assert _gpu("06_privacy_audit")["device"] == "cpu"


# ------------------------------------------------------------------ notebook 05's offline fallback
@pytest.fixture()
def public_ckpt(tmp_path):
    from dpbench.data import load_dataset
    from dpbench.training import mixing

    ds = load_dataset("digits", "train")
    part = mixing.split_dataset(ds, public_fraction=0.2, seed=0)
    spec = {"name": "small_cnn", "num_classes": 10, "in_chans": 1, "img_size": 8}
    model = create_model(**spec, zero_head=False)
    path = tmp_path / "public_checkpoint.safetensors"
    mixing.save_public_checkpoint(model, path, part, model_spec=spec)
    return path, (ds.x[:100], ds.y[:100])


def test_05_fallback_never_loads_another_architecture(public_ckpt, monkeypatch):
    from dpbench.training import features as F

    monkeypatch.setattr(F, "_hub_reachable", lambda *a, **k: False)
    path, pub = public_ckpt
    assert llf.checkpoint_fit(path, "resnet50", 224)[0].startswith("it holds a small_cnn (10 classes)")
    bb = llf.select_backbone("mlp", num_classes=10, public=pub, checkpoint=path, prefer=("checkpoint", "public"),
                             public_epochs=1, resize=224)
    assert bb.source == "public" and "not used: it holds a small_cnn" in bb.note
    assert bb.resize is None  # a net trained here at 8 px is never fed 224 px images


def test_05_fallback_feeds_a_checkpoint_its_own_image_size(public_ckpt):
    path, pub = public_ckpt
    assert llf.checkpoint_fit(path, "small_cnn", 224) == ("", None)
    assert llf.checkpoint_fit(path, "small_cnn", 8) == ("", 8)
    bb = llf.select_backbone("small_cnn", num_classes=10, public=pub, checkpoint=path, prefer=("checkpoint",),
                             resize=224)
    assert bb.source == "checkpoint" and bb.resize is None


def test_list_shows_gpu_quick_only_where_a_notebook_has_it(capsys, monkeypatch):
    from dpbench.workbench.cli import main

    monkeypatch.chdir(REPO)
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["notebook", "smoke", "cpu", "gpu", "gpu-quick"]
    row02 = next(line for line in lines if line.startswith("02_groupwise_clipping"))
    assert row02.rstrip().endswith("(no params)")
    row01 = next(line for line in lines if line.startswith(NB01))
    assert not row01.rstrip().endswith("(no params)")
