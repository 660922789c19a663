"""The speed/memory harness: every (model, method) cell gives a row, ok or failed with a
reason; the JSON schema; the CLI. Not a timed test: no assertion on speed."""

import json

import pytest

from dpbench.training import bench
from dpbench.errors import UserError


def check_row(row):
    assert set(row) == set(bench.ROW_KEYS)
    assert row["status"] in ("ok", "failed")
    if row["status"] == "ok":
        assert row["step_time_s"] > 0 and row["baseline_step_time_s"] > 0
        assert row["ratio_to_nonprivate"] > 0
    else:
        assert row["reason"], row


@pytest.mark.slow
def test_quick_profile_covers_every_model_and_method():
    rows = bench.run_benchmark("quick", isolate=False, progress=False)
    cells = {(r["model"], r["method"]) for r in rows}
    models = {m for m, _, _ in bench.PROFILES["quick"]["models"]}
    assert cells == {(m, meth) for m in models for meth in bench.METHODS}
    assert len(rows) == len(cells)
    for r in rows:
        check_row(r)
        assert r["peak_mem_mb"] is None  # no CPU peak memory without a child process
    by_method = {r["method"]: r for r in rows}
    assert by_method["nonprivate"]["ratio_to_nonprivate"] == 1.0
    for m in bench.DPBENCH_METHODS:  # dpbench's own methods must run on the tiny model
        assert by_method[m]["status"] == "ok", by_method[m]["reason"]


@pytest.mark.slow
def test_child_process_cells_measure_memory_and_write_json(tmp_path):
    path = tmp_path / "out" / "bench.json"
    rows = bench.run_benchmark("quick", methods=["nonprivate", "bk"], json_path=path, progress=False)
    stored = json.loads(path.read_text())
    assert stored == rows and len(rows) == 2
    for r in stored:
        check_row(r)
        assert r["status"] == "ok", r["reason"]
        assert r["peak_mem_mb"] > r["base_rss_mb"] > 0
        assert r["step_mem_mb"] == pytest.approx(r["peak_mem_mb"] - r["base_rss_mb"])
        assert r["mem_ratio_to_nonprivate"] > 0
        assert r["live_mem_mb"] > 0 and r["live_mem_ratio"] > 0
    assert [r["method"] for r in rows] == ["nonprivate", "bk"]
    assert rows[0]["live_mem_ratio"] == 1.0


def test_a_failing_cell_says_why():
    row = bench.run_cell(bench.Cell(model="no_such_model_xyz", resolution=16, batch_size=4, method="bk"))
    check_row(row)
    assert row["status"] == "failed" and "model" in row["reason"]
    table = bench.format_table([row])
    assert "failed: no_such_model_xyz@16 bk" in table


def test_cli_returns_zero_and_prints_a_table(tmp_path, capsys):
    from dpbench.workbench.cli import main

    path = tmp_path / "rows.json"
    code = main(["bench", "--profile", "quick", "--no-isolate", "--methods", "nonprivate", "instantiate",
                 "--repeats", "1", "--json", str(path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "instantiate" in out and "x time" in out
    rows = json.loads(path.read_text())
    assert {r["method"] for r in rows} == {"nonprivate", "instantiate"}
    assert all(r["repeats"] == 1 and r["profile"] == "quick" for r in rows)


def test_bad_input():
    with pytest.raises(UserError, match="profile"):
        bench.profile_cells("laptop")
    with pytest.raises(UserError, match="methods"):
        bench.profile_cells("quick", methods=["fastest"])
    with pytest.raises(UserError, match="repeats"):
        bench.profile_cells("quick", repeats=0)
    from dpbench.workbench.cli import main

    assert main(["bench", "--profile", "quick", "--methods", "fastest"]) == 2


def test_profiles_hold_the_issue_models():
    cpu = bench.profile_cells("cpu")
    assert {(c.model, c.resolution, c.batch_size) for c in cpu} == {
        ("small_cnn", 32, 64), ("resnet18", 32, 64), ("vit_tiny_patch16_224", 64, 64)}
    assert {c.method for c in cpu} == set(bench.METHODS)
    gpu = bench.profile_cells("gpu")
    assert all(c.device == "cuda" and c.max_batch for c in gpu)


def test_peak_extra_mb_sees_a_call_that_touches_memory():
    import os

    import torch

    if not os.path.exists("/proc/self/clear_refs"):
        assert bench.peak_extra_mb(lambda: torch.ones(10)) is None
        return
    big = bench.peak_extra_mb(lambda: torch.ones(64 * 2**20 // 4).sum())  # touches 64 MB, then frees it
    small = bench.peak_extra_mb(lambda: torch.ones(16).sum())
    assert big is not None and small is not None
    assert 48 <= big <= 200  # coarse: RSS pages, allocator slack
    assert small < 16 < big


def test_live_peak_mb_counts_live_tensors_exactly_and_ignores_what_the_allocator_keeps():
    import torch

    def two_at_once():  # 4 MiB and 8 MiB live together, then freed; 1 MiB after
        a, b = torch.empty(1 << 20), torch.empty(1 << 21)
        a.fill_(1.0), b.fill_(2.0)
        del a, b
        return torch.empty(1 << 18).fill_(0.0).sum()

    kept = torch.empty(1 << 20)  # live throughout: counted in every measure (found by the garbage collector)
    base = bench.live_peak_mb(lambda: None)  # what is live in this process
    assert base >= 4.0 and kept.numel()
    assert bench.live_peak_mb(two_at_once) - base == 12.0
    held = []  # blocks kept from the first (unmeasured) call count as live at the start
    assert bench.live_peak_mb(lambda: held.append(torch.empty(1 << 20))) - base == 8.0
    held.clear()
    # a large block freed earlier (pages the C allocator may keep) leaves the measure unchanged
    torch.ones(64 * 2**20 // 4).sum()
    assert bench.live_peak_mb(two_at_once) - base == 12.0


def test_table_shows_the_median_of_pair_ratios_beside_the_ratio_of_medians():
    # Pairs (method, baseline) = (3, 1), (4, 2), (50, 10): median ratio 3.0, ratio of medians 4 / 2 = 2.0.
    row = {k: None for k in bench.ROW_KEYS}
    row.update(model="m", resolution=8, batch_size=2, method="bk", status="ok", step_time_s=4.0,
               baseline_step_time_s=2.0, ratio_to_nonprivate=3.0, pair_ratios=[3.0, 2.0, 5.0])
    lines = bench.format_table([row]).splitlines()
    at = lambda name: lines[2][lines[0].index(name):].split()[0]  # noqa: E731  (the value under a header)
    assert at("step/base") == "2.00" and at("x time (median of pairs)") == "3.00" and at("base s") == "2.0000"
    assert any("median of the per-pair ratios" in line for line in lines)


def test_step_breakdown_splits_a_dp_step_and_restores_the_engine():
    """--profile-step: every part measured, parts add up to the step, the engine module untouched after."""
    import dpbench.clipping.engine as engine_mod
    from dpbench.training.bench import BREAKDOWN_PARTS, format_breakdown, step_breakdown

    torch_before = engine_mod.torch
    res = step_breakdown("tiny_cnn", 16, 4, "bk", repeats=2, warmup=1, profiler_rows=3)
    assert engine_mod.torch is torch_before
    d = res["dp"]
    assert set(BREAKDOWN_PARTS) <= set(d) and d["total"] > 0
    assert d["forward"] > 0 and d["pass1_autograd"] > 0 and d["norms"] > 0 and d["clipped_sums"] > 0
    assert abs(sum(d[k] for k in BREAKDOWN_PARTS) - d["total"]) < 0.05 * d["total"] + 1e-3
    assert res["nonprivate"]["total"] > 0 and res["ratio"] > 0
    text = format_breakdown(res)
    assert "norms" in text and "torch.profiler" in text
