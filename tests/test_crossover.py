"""The one-Conv2d crossover study and the notebook-01 tables: the rule's boundary, the
engine rule's two norms against a per-sample autograd reference, the sweep's rows, the
mixed rule's per-layer choices, cells and tidy rows. No assertion on speed."""

import math

import pytest
import torch
import torch.nn as nn

from conftest import ListRecorder

from dpbench.experiments import clipping_efficiency as cx
from dpbench.errors import UserError
from dpbench.training.bench import peak_extra_mb  # the one in-process probe, which the sweep uses
from dpbench.workbench.results import Recorder


def test_predicted_crossover_is_where_2T2_equals_pD():
    for cin, cout, k in [(64, 64, 3), (16, 128, 5), (3, 64, 7)]:
        s = cx.predicted_crossover_size(cin, cout, k, padding=k // 2)
        h = s + 2 * (k // 2) - k + 1
        assert 2 * (h * h) ** 2 == pytest.approx(cout * cin * k * k, rel=1e-9)
    assert cx.predicted_crossover_size(64, 64) == pytest.approx((64 * 576 / 2) ** 0.25)
    assert cx.conv_dims(32, 3, 16, 3, stride=2, padding=1) == (256, 27, 16)
    with pytest.raises(UserError, match="too small"):
        cx.conv_dims(1, 3, 3, kernel_size=5, padding=0)


def test_measured_crossover_fits_the_log_ratio():
    # ratio = size^2 / 128 (the cost model's T growth): the fit crosses 1 at sqrt(128)
    assert cx.measured_crossover([8, 16, 32], [0.5, 2.0, 8.0], [1, 1, 1]) == pytest.approx(math.sqrt(128))
    assert cx.measured_crossover([16, 8, 32], [2.0, 0.5, None], [1, 1, 1]) == pytest.approx(math.sqrt(128))
    # one noisy point (ghost "slower" at 8) does not move the answer to the first sign change
    noisy = cx.measured_crossover([8, 12, 16, 24, 32], [1.2, 0.9, 2.0, 4.5, 8.0], [1, 1, 1, 1, 1])
    assert 9 < noisy < 14
    assert cx.measured_crossover([8, 16], [0.1, 0.2], [1, 1]) is None  # ghost faster everywhere measured
    assert cx.measured_crossover([8, 16], [2.0, 3.0], [1, 1]) is None  # crosses below the smallest size
    assert cx.measured_crossover([8, 16], [2.0, 1.0], [1, 1]) is None  # ratio falls with size
    assert cx.measured_crossover([8], [0.5], [1]) is None


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0)])
def test_both_rule_norms_match_per_sample_autograd(stride, padding):
    conv, x, g = cx.conv_norm_inputs(9, 3, 5, batch_size=3, stride=stride, padding=padding, seed=1)
    conv = conv.double()
    x, g = x.double(), g.double()
    ref = []
    for i in range(3):
        w = conv.weight.detach().clone().requires_grad_(True)
        out = nn.functional.conv2d(x[i:i + 1], w, conv.bias, stride=stride, padding=padding)
        (gw,) = torch.autograd.grad((out * g[i:i + 1]).sum(), w)
        ref.append(gw.pow(2).sum())
    ref = torch.stack(ref)
    for method in cx.METHODS:
        assert torch.allclose(cx.conv_norms(method, conv, x, g), ref, rtol=1e-10), method
    with pytest.raises(UserError, match="unknown norm method"):
        cx.conv_norms("exact", conv, x, g)


def test_sweep_rows_and_the_memory_cap():
    rows = cx.crossover_sweep([6, 10], 4, 4, batch_size=2, repeats=1, progress=False)
    assert [(r["size"], r["method"]) for r in rows] == [(6, "ghost"), (6, "instantiate"), (10, "ghost"),
                                                         (10, "instantiate")]
    for r in rows:
        assert r["status"] == "ok" and r["time_s"] > 0 and r["rel_diff"] < 1e-5
        assert (r["T"], r["D"], r["p"]) == (r["size"] ** 2, 36, 4)
        assert r["ghost_cheaper_predicted"] == (2 * r["T"] ** 2 < 144)
    capped = cx.crossover_sweep([10], 4, 4, batch_size=2, repeats=1, progress=False, max_tmp_mb=0.01)
    by = {r["method"]: r for r in capped}
    assert by["ghost"]["status"] == "failed" and "skipped" in by["ghost"]["reason"]  # 2 B T^2 floats > cap
    assert by["instantiate"]["status"] == "ok"  # B p D floats = 2.3 kB, under the cap
    summary = cx.crossover_summary(rows, 4, 4)
    assert summary["predicted_size"] == pytest.approx(cx.predicted_crossover_size(4, 4))
    assert summary["max_rel_diff"] < 1e-5
    with pytest.raises(UserError, match="sizes"):
        cx.crossover_sweep([], progress=False)


def test_peak_extra_memory_sees_a_large_allocation():
    mb = peak_extra_mb(lambda: torch.ones(16 * 2**20))  # 64 MB, touched
    if mb is None:
        pytest.skip("this platform cannot reset the resident-set high-water mark")
    assert 40 < mb < 400


def test_layer_decisions_follow_the_mixed_rule():
    rows = cx.layer_decisions("tiny_cnn", 16)
    by = {r["layer"]: r for r in rows}
    assert set(by) == {"conv", "norm", "head"}
    assert (by["conv"]["T"], by["conv"]["D"], by["conv"]["p"]) == (256, 27, 8)
    assert by["conv"]["method"] == "instantiate"  # 2 * 256^2 > 8 * 27
    assert by["head"]["method"] == "ghost" and by["head"]["T"] == 1
    assert by["norm"]["T"] is None
    for r in rows:
        if r["T"] is not None:
            assert (r["method"] == "ghost") == (r["two_T2"] < r["pD"])


def test_notebook_cells_and_bad_input():
    assert cx.parse_model_spec("resnet18@32:256") == ("resnet18", 32, 256)
    assert cx.parse_model_spec(["vgg11", 32, 8]) == ("vgg11", 32, 8)
    for bad in ["resnet18@32", "resnet18", "@32:8", "resnet18@x:8", "resnet18@32:0"]:
        with pytest.raises(UserError, match="name@resolution:batch|>= 1"):
            cx.parse_model_spec(bad)
    cells = cx.notebook_cells(["tiny_cnn@16:8", "small_cnn@32:4"], ["nonprivate", "bk"],
                              layer_style_model="small_cnn", layer_style_methods=["bk"])
    assert [(c.model, c.method, c.style) for c in cells] == [
        ("tiny_cnn", "nonprivate", "flat"), ("tiny_cnn", "bk", "flat"), ("small_cnn", "nonprivate", "flat"),
        ("small_cnn", "bk", "flat"), ("small_cnn", "bk", "layer")]
    with pytest.raises(UserError, match="unknown methods"):
        cx.notebook_cells(["tiny_cnn@16:8"], ["fastest"])
    with pytest.raises(UserError, match="not in models"):
        cx.notebook_cells(["tiny_cnn@16:8"], ["bk"], layer_style_model="vgg11", layer_style_methods=["bk"])
    with pytest.raises(UserError, match="not dpbench methods"):
        cx.notebook_cells(["tiny_cnn@16:8"], ["bk"], layer_style_model="tiny_cnn",
                          layer_style_methods=["opacus_hooks"])
    with pytest.raises(UserError, match="name@resolution:batch"):
        cx.notebook_cells(["tiny_cnn@16"], ["bk"])


PAPER_CSV = """claim_id,paper,figure_or_table,setting,method,metric,value,epsilon,delta,source
C-t4-resnet18-ghost-time-s,C,T4,"CIFAR-10; OOM: opacus",GhostClip,s,59,,,x
C-t4-resnet18-ghost-mem-gb,C,T4,"CIFAR-10; OOM: opacus",GhostClip,GB,4.0,,,x
C-t4-resnet18-nondp-time-s,C,T4,"CIFAR-10; OOM: opacus",non-DP,s,14,,,x
C-t4-resnet18-nondp-mem-gb,C,T4,"CIFAR-10; OOM: opacus",non-DP,GB,3.3,,,x
C-slowdown-max,C,abstract,x,mixed,ratio,2.0,,,x
C-resnet18-ghost-maxbatch,C,bars,x,GhostClip,max batch,800,,,x
"""


def _row(model, method, status="ok", res=32, mem=100.0, style="flat"):
    return {"model": model, "resolution": res, "batch_size": 8, "method": method, "style": style,
            "step_time_s": 0.2 if status == "ok" else None, "step_mem_mb": mem if status == "ok" else None,
            "ratio_to_nonprivate": 2.0 if status == "ok" else None,
            "mem_ratio_to_nonprivate": 1.5 if status == "ok" and mem else None, "max_batch_size": None,
            "status": status, "reason": "" if status == "ok" else "RuntimeError: view modified inplace",
            "device": "cpu"}


def test_paper_ratios_tables_and_tidy_rows(tmp_path):
    path = tmp_path / "paper_values.csv"
    path.write_text(PAPER_CSV)
    claims = cx.load_paper_values(path)
    ratios = cx.paper_ratios("resnet18", claims)
    assert ratios["ghost"]["time"] == pytest.approx(59 / 14) and ratios["ghost"]["mem"] == pytest.approx(4 / 3.3)
    assert ratios["opacus_hooks"] == {"oom": True} and "mixed" not in ratios
    assert cx.paper_ratios("vit_tiny_patch16_224", claims) == {}

    rows = [_row("resnet18", "nonprivate"), _row("resnet18", "opacus_hooks", "failed"), _row("resnet18", "ghost"),
            _row("resnet18", "mixed", mem=None), _row("resnet18", "bk", style="layer")]
    table = cx.ratio_table(rows, claims)
    opacus = table[table.method == "opacus_hooks"].iloc[0]
    assert opacus["status"].startswith("fails: RuntimeError") and opacus["x time (paper)"] == "OOM"
    assert table[table.method == "ghost"].iloc[0]["x time (paper)"] == pytest.approx(59 / 14)
    assert table[table["style"] == "layer"].iloc[0]["x time (paper)"] is None  # the paper has no per-layer column
    wide = cx.wide_table(rows)
    assert wide.loc["resnet18@32 (B=8)", "opacus_hooks"].startswith("fails: ")
    assert wide.loc["resnet18@32 (B=8)", "bk (layer)"] == "2.00"

    rec = Recorder(tmp_path / "out", experiment="01_clipping_efficiency")
    cx.record_bench_rows(rec, rows, claims)
    df = rec.frame()
    assert set(df.method) == {r["method"] for r in rows}
    failed = df[df.status == "failed"]
    assert (failed.reason.str.len() > 0).all()
    assert set(failed[failed.method == "opacus_hooks"].metric) == {m for m in cx.BENCH_METRICS if not m.startswith("max_batch")}
    assert "not measured" in failed[(failed.method == "mixed") & (failed.metric == "step_mem_mb")].reason.iloc[0]
    cid = df.set_index(["method", "metric", "style"]).claim_id
    assert cid[("ghost", "step_time_s", "flat")] == "C-t4-resnet18-ghost-time-s"
    assert cid[("mixed", "ratio_to_nonprivate", "flat")] == "C-slowdown-max"
    assert cid[("bk", "step_time_s", "layer")] == ""


def _xrow(size, method, status="ok", time_s=0.1, mem_mb=1.0, reason=""):
    return {"size": size, "method": method, "T": size * size, "D": 36, "p": 4, "batch_size": 2, "time_s": time_s,
            "mem_mb": mem_mb, "status": status, "reason": reason}


def test_crossover_rows_keep_every_cell_and_tag_the_claim():
    rows = [_xrow(6, "ghost", mem_mb=None), _xrow(6, "instantiate"),
            _xrow(10, "ghost", "failed", None, None, "skipped: needs ~9 MB"), _xrow(10, "instantiate")]
    summary = {"max_rel_diff": 1e-7, "predicted_size": 5.5, "measured_size": 8.0, "measured_2T2_over_pD": 0.7}
    rec = ListRecorder()
    cx.record_crossover(rec, rows, summary, {cx.CROSSOVER_CLAIM: {}}, seed=3, device="cpu")
    assert len(rec.get("norm_time_s")) == len(rec.get("norm_mem_mb")) == 4
    (unmeasured,) = rec.get("norm_mem_mb", size=6, method="ghost")
    assert unmeasured["value"] is None and unmeasured["status"] == "failed" and "not measured" in unmeasured["reason"]
    (skipped,) = rec.get("norm_time_s", size=10, method="ghost")
    assert skipped["status"] == "failed" and skipped["reason"].startswith("skipped")
    assert rec.get("norm_time_s", size=10, method="instantiate")[0]["value"] == 0.1
    (ratio,) = rec.get("crossover_2T2_over_pD_measured")
    assert ratio["value"] == 0.7 and ratio["claim_id"] == cx.CROSSOVER_CLAIM and ratio["seed"] == 3
    assert rec.get("crossover_size_predicted")[0]["value"] == 5.5

    rec = ListRecorder()  # no crossover inside the sizes, and no paper values: failed rows, no claim id
    cx.record_crossover(rec, rows, {**summary, "measured_size": None, "max_rel_diff": None}, {})
    (ratio,) = rec.get("crossover_2T2_over_pD_measured")
    assert ratio["status"] == "failed" and ratio["reason"] == cx.NO_CROSSOVER and ratio["claim_id"] == ""
    assert rec.get("crossover_size_measured")[0]["status"] == "failed" and not rec.get("norms_max_rel_diff")


def test_model_layer_decisions_count_layers_and_record_a_refused_model():
    rec = ListRecorder()
    rows = cx.model_layer_decisions(rec, ["tiny_cnn@16:8", "no_such_model_xyz@8:2"])
    assert {r["model"] for r in rows} == {"tiny_cnn"}
    (bad,) = rec.get("layers_ghost", model="no_such_model_xyz")
    assert bad["status"] == "failed" and bad["value"] is None and bad["reason"] and bad["resolution"] == 8
    ghost = rec.get("layers_ghost", model="tiny_cnn")[0]["value"]
    inst = rec.get("layers_instantiate", model="tiny_cnn")[0]["value"]
    assert ghost == sum(r["method"] == "ghost" for r in rows) == 1  # the head (T = 1)
    assert inst == sum(r["method"] == "instantiate" for r in rows) == 2  # the conv (2 T^2 > p D) and the norm
    text = cx.layer_decision_text(rows)
    assert "tiny_cnn@16: 3 trainable layers, mixed picks ghost for 1" in text and "two_T2" in text
    assert cx.layer_decision_text([]) == ""


def test_flat_vs_layer_arms_and_their_backward_passes():
    rows = [_row("m", "nonprivate"), _row("m", "mixed"), _row("m", "mixed", style="layer"), _row("m", "bk"),
            _row("m", "ghost"), _row("other", "mixed"), _row("m", "opacus_hooks", "failed")]
    assert [cx.backward_passes(r) for r in rows[:5]] == [1, 2, 1, 1, 2]
    table = cx.flat_vs_layer_table(rows, "m", ["mixed", "bk"])
    assert list(table["arm"]) == ["nonprivate (1 pass)", "mixed flat (2 passes)", "mixed layer (1 pass)",
                                  "bk flat (1 pass)"]
    assert list(table["x time"]) == [2.0] * 4 and set(table["status"]) == {"ok"}
    assert len(cx.flat_vs_layer_table(rows, "absent", ["mixed"])) == 0


def test_shared_plot_helpers_mark_missing_cells():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dpbench.experiments import plots

    rows = [_row("a", "nonprivate"), _row("a", "ghost", "failed"), _row("a", "mixed", mem=None),
            _row("b", "nonprivate"), _row("b", "ghost")]
    fig, (ax1, ax2) = plt.subplots(1, 2)
    drawn = plots.grouped_bars(ax1, rows, "mem_ratio_to_nonprivate", "memory")
    assert len(ax1.patches) == 3  # a/nonprivate, b/nonprivate, b/ghost
    assert sorted(t.get_text() for t in ax1.texts) == ["fails", "not measured"] == sorted(drawn)
    assert [t.get_text() for t in ax1.get_xticklabels()] == ["a@32, batch 8", "b@32, batch 8"]
    legend = plots.legend_once(fig, ax1, one_row=True)
    assert [t.get_text() for t in legend.get_texts()] == ["nonprivate", "ghost"]
    plots.bars_marking_missing(ax2, ["x", "y", "z"], [1.0, None, float("nan")], missing_text="gone")
    assert [p.get_height() for p in ax2.patches] == [1.0, 0.0, 0.0]
    assert [t.get_text() for t in ax2.texts] == ["gone", "gone"]
    plt.close(fig)


def test_notebook_01_figures_pass_the_figure_check(tmp_path):
    """The four figures of notebook 01 from synthetic rows (a skipped ghost size, a zero norm
    difference, a failed cell, unmeasured memory) pass the recorder's figure check."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dpbench.workbench.results import Recorder, check_figure

    xrows = cx.crossover_sweep([4, 8, 16], 8, 8, 2, repeats=1, max_tmp_mb=0.01, progress=False)
    assert any(r["status"] == "failed" and r["reason"].startswith("skipped") for r in xrows)
    fig = cx.plot_crossover(xrows, cx.crossover_summary(xrows, 8, 8), in_channels=8, out_channels=8, batch_size=2,
                            device="cpu", max_tmp_mb=0.01)
    assert any(line.get_label().startswith("ghost skipped") for line in fig.axes[0].lines)
    rows = [_row("m", "nonprivate"), _row("m", "mixed"), _row("m", "mixed", style="layer"), _row("m", "bk"),
            _row("m", "opacus_hooks", "failed"), _row("m", "ghost", mem=None)]
    rows[1]["pair_ratios"] = [1.5, 2.0, 3.0]
    flat = [r for r in rows if r["style"] == "flat"]
    table = cx.flat_vs_layer_table(rows, "m", ["mixed", "bk"])
    figs = [fig, cx.plot_step_ratios(flat, "cpu", 3), cx.plot_fixed_batch(flat, "cpu", False),
            cx.plot_flat_vs_layer(table, "m", "cpu", 3)]
    assert "not measured" in figs[1]._suptitle.get_text() and "fails" in figs[1]._suptitle.get_text()
    assert "2.00x" in cx.flat_vs_layer_note(table)
    rec = Recorder(tmp_path, experiment="01")
    for i, f in enumerate(figs):
        assert check_figure(f) == []
        rec.figure(f, f"fig{i}")
    plt.close("all")


def test_the_default_paper_values_are_found_and_name_the_bench_claims():
    claims = cx.load_paper_values()  # the checkout's references/paper_values.csv
    assert {"C-slowdown-max", "C-memory-overhead-max", "C-ghost-instantiate-crossover"} <= set(claims)


def test_missing_paper_values_are_an_error_not_an_empty_table(tmp_path):
    with pytest.raises(UserError, match="paper values not found"):
        cx.load_paper_values(tmp_path / "nope.csv")
