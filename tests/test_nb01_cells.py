"""Notebook 01's metrics hold every (model, method) cell: measured, or failed with a reason.

Runs the functions the notebook runs (dpbench.experiments.clipping_efficiency.notebook_cells ->
dpbench.training.bench.run_benchmark -> dpbench.experiments.clipping_efficiency.record_bench_rows) on the smoke profile's
settings, in-process, and checks the tidy frame. The cpu and gpu profiles are checked
statically: their cells cover every method of the issue and the gpu models it names."""

from pathlib import Path

import pytest

from dpbench.training import bench
from dpbench.experiments import clipping_efficiency as cx
from dpbench.workbench import params
from dpbench.workbench.results import Recorder

REPO = Path(__file__).resolve().parents[1]
NB = "01_clipping_efficiency"
ISSUE_METHODS = {"nonprivate", "opacus_hooks", "opacus_ghost", "instantiate", "ghost", "mixed", "bk"}


def _params(profile):
    return params.load_yaml(REPO / "params" / NB / f"{profile}.yaml")


def _cells(p, device="cpu"):
    return cx.notebook_cells(p["models"], p["methods"], device=p.get("device", device), repeats=p["repeats"],
                             warmup=p["warmup"], max_batch=p["max_batch"],
                             layer_style_model=p["layer_style_model"], layer_style_methods=p["layer_style_methods"],
                             max_batch_cap_gb=p.get("max_batch_cap_gb", 0.0),
                             max_batch_methods=p.get("max_batch_methods", []))


def _check_every_cell_present(df, cells):
    for c in cells:
        sub = df[(df.model == c.model) & (df.resolution == c.resolution) & (df.method == c.method)
                 & (df["style"] == c.style)]
        assert len(sub), f"no rows for {c.model}@{c.resolution} {c.method} {c.style}"
        for metric in ("step_time_s", "ratio_to_nonprivate", "step_mem_mb", "mem_ratio_to_nonprivate"):
            m = sub[sub.metric == metric]
            assert len(m) == 1, (c, metric)
            row = m.iloc[0]
            if row.status == "ok":
                assert row.value is not None and row.value > 0
            else:
                assert row.status == "failed" and isinstance(row.reason, str) and row.reason.strip(), (c, metric)


@pytest.mark.slow
def test_smoke_profile_metrics_cover_every_model_and_method(tmp_path):
    p = _params("smoke")
    cells = _cells(p)
    rows = bench.run_benchmark(cells, isolate=p["isolate"], progress=False)
    rec = Recorder(tmp_path, experiment=NB)
    cx.record_bench_rows(rec, rows, cx.load_paper_values())
    df = rec.frame()
    _check_every_cell_present(df, cells)
    ok = df[(df.status == "ok") & (df.metric == "step_time_s")]
    assert set(bench.DPBENCH_METHODS) <= set(ok.method)  # the engine runs on the smoke model
    assert set(df.method) == ISSUE_METHODS


def test_a_model_that_cannot_be_built_is_failed_in_every_cell(tmp_path):
    cells = cx.notebook_cells(["no_such_model_xyz@16:4"], sorted(ISSUE_METHODS))
    rows = [bench.run_cell(c) for c in cells]
    rec = Recorder(tmp_path, experiment=NB)
    cx.record_bench_rows(rec, rows)
    df = rec.frame()
    _check_every_cell_present(df, cells)
    assert (df.status == "failed").all() and df.reason.str.contains("model").all()


@pytest.mark.parametrize("profile", ["smoke", "cpu", "gpu", "gpu-quick"])
def test_profiles_cover_every_method(profile):
    p = _params(profile)
    assert set(p["methods"]) == ISSUE_METHODS
    cells = _cells(p)
    assert {c.style for c in cells} == {"flat", "layer"}  # claim B.1 arms are in every profile
    if profile == "gpu":
        # the paper's models (VGG with GroupNorm: timm's *_bn converted), each at 32 and 224 px
        models = {"resnet18", "resnet50", "vgg11_bn", "vgg16_bn", "vgg19_bn", "vit_small_patch16_224",
                  "vit_base_patch16_224"}
        assert {(c.model, c.resolution) for c in cells} >= {(m, r) for m in models for r in (32, 224)}
        assert all(c.batch_size == 256 for c in cells if c.resolution == 32)  # the paper's table
        assert p["max_batch"] and p["device"] == "cuda" and max(p["crossover_sizes"]) == 224
        searched = [c for c in cells if c.max_batch]
        assert {c.max_batch_cap_gb for c in searched} == {16.0}
        assert {c.method for c in searched} >= {"nonprivate", "opacus_hooks", "ghost", "mixed"}  # the paper's bars
        assert all(c.style == "flat" for c in searched)
    elif profile == "gpu-quick":
        assert {c.model for c in cells} == {"resnet18", "vgg11_bn", "vit_small_patch16_224"}
        assert {c.resolution for c in cells} == {32, 224}
        assert p["device"] == "cuda" and not p["max_batch"]
    else:
        assert max(p["crossover_sizes"]) <= 128 and p.get("device", "cpu") == "cpu"
