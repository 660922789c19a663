"""The dry run of the gpu profiles (`dpbench run NB --profile gpu --dry-run`): the mapping rules,
where results go, and every notebook's gpu code path executed at toy size on the CPU."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from dpbench.workbench import dryrun, params, runner

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = [nb for nb in params.list_notebooks(REPO) if "gpu" in params.list_profiles(REPO, nb)]


def test_rules_keep_code_paths_and_shrink_sizes():
    gpu = {"device": "cuda", "dataset": "cifar10", "model_name": "resnet18", "model_kwargs": {"width": 32},
           "steps": 300, "epochs": 25.0, "batch_size": 1024, "max_physical_batch": 256, "eval_every": 0,
           "lr_grid": [0.1, 0.3, 1.0], "methods": ["ghost", "bk"], "resize": 224, "isolate": True,
           "models": ["resnet18@32:256", "resnet18@224:64", "resnet50@224:64", "vit_small_patch16_224@224:64"],
           "min_seeds": 6, "trials": 4000}
    smoke = {"steps": 8, "epochs": 0.5, "batch_size": 96, "lr_grid": [0.03, 0.1]}
    dry, changes = dryrun.dryrun_params(gpu, smoke, {"isolate": False})
    assert dry["device"] == "cpu"
    for key in ("dataset", "model_name", "model_kwargs", "methods", "eval_every"):  # code paths, and 0 = off
        assert dry[key] == gpu[key]
    assert dry["steps"] == 8 and dry["epochs"] == dryrun.TINY_EPOCHS and isinstance(dry["steps"], int)
    assert dry["batch_size"] <= dryrun.TINY_BATCH and 0 < dry["max_physical_batch"] < dry["batch_size"]
    assert dry["lr_grid"] == [0.03, 0.1] and dry["resize"] == 32 and dry["isolate"] is False
    assert dry["models"] == ["resnet18@32:4", "vit_small_patch16_224@32:4"]  # one per family at <= 32 px
    assert dry["min_seeds"] <= 2 and dry["trials"] <= 500
    assert changes["steps"] == (300, 8) and "dataset" not in changes
    assert "resnet50@224:64" in dryrun._folded(changes)["models"]


@pytest.mark.parametrize("nb", NOTEBOOKS)
def test_dry_spec_is_small_and_says_what_is_not_exercised(nb):
    spec = dryrun.resolve(REPO, nb, "gpu")
    p = spec.params
    assert p["device"] == "cpu" and spec.dry_run["from_profile"] == "gpu"
    for key, value in p.items():
        if dryrun.PX_KEY.search(key) and isinstance(value, int):
            assert value <= dryrun.MAX_PX, key
        if key.endswith("batch_size") and key != "eval_batch_size" and isinstance(value, int):
            assert value <= dryrun.TINY_BATCH, key
    for m in p.get("models", []) or []:
        assert int(dryrun.MODEL_SPEC.match(m)["px"]) <= dryrun.MAX_PX
    gpu = params.resolve(REPO, nb, "gpu")
    if str(gpu.device).startswith("cuda"):
        assert any("CUDA" in line for line in spec.dry_run["not_exercised"])
    for name in spec.dry_run["stand_in_datasets"] + spec.dry_run["random_weights"]:
        assert any(name in line for line in spec.dry_run["not_exercised"])


def test_gpu_results_folder_is_written_only_on_cuda(tmp_path, monkeypatch):
    """results/gpu/ holds runs on CUDA only: a dry run writes results/dryrun/, a gpu profile
    without CUDA results/gpu-profile-on-cpu/ (run, reproduce and the report alike)."""
    from dpbench.workbench import report

    monkeypatch.setattr(params, "cuda_available", lambda: False)
    r = runner.Runner(REPO, tmp_path)
    assert r.result_dir("gpu", "x") == tmp_path / runner.GPU_WITHOUT_CUDA_DIR / "gpu" / "x"
    assert runner.Runner(REPO, tmp_path, dry_run=True).result_dir("gpu", "x") == tmp_path / "dryrun" / "gpu" / "x"
    rep = report.build("gpu", REPO, tmp_path)
    assert report.write(rep, None, REPO, tmp_path) == tmp_path / runner.GPU_WITHOUT_CUDA_DIR / "gpu" / "report.html"
    assert not (tmp_path / "gpu").exists()
    monkeypatch.setattr(params, "cuda_available", lambda: True)
    assert runner.Runner(REPO, tmp_path).result_dir("gpu", "x") == tmp_path / "gpu" / "x"
    assert runner.Runner(REPO, tmp_path, dry_run=True).result_dir("gpu", "x") == tmp_path / "dryrun" / "gpu" / "x"


def test_dry_run_of_every_notebook(tmp_path, capsys):
    """Every notebook's gpu code path at toy size, in one go (upstreams first): all must finish
    ok, under results/dryrun/ only, with what the CPU could not exercise in the output and the
    manifest. Nothing is skipped: a notebook that needs data gets its stand-in."""
    t0 = time.perf_counter()
    results = dryrun.run(NOTEBOOKS, "gpu", repo=REPO, results=tmp_path, progress=False, jobs=2)
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    failed = {r.notebook: r.error for r in results if r.status != "ok"}
    assert not failed, failed
    assert sorted(r.notebook for r in results) == sorted(NOTEBOOKS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dryrun"]  # never results/gpu/
    for nb in NOTEBOOKS:
        m = json.loads((tmp_path / "dryrun" / "gpu" / nb / "manifest.json").read_text())
        assert m["status"] == "ok" and m["params"]["device"] == "cpu" and m["dry_run"]["from_profile"] == "gpu"
        assert f"{nb} [gpu dry run]: not exercised on the CPU" in err
    print(f"dry run of {len(NOTEBOOKS)} notebooks: {elapsed:.0f} s")


def test_cli_dry_run_runs_upstreams_and_fails_on_a_crash(fake_repo, capsys):
    """`dpbench run NB --profile gpu --dry-run` on a CPU machine: the upstream runs first, both
    land under results/dryrun/ with the list of what was not exercised; a crash fails it."""
    from dpbench.workbench.cli import main

    assert main(["run", "01_down", "--profile", "gpu", "--dry-run", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "00_tiny [gpu dry run]: not exercised on the CPU" in err and "cifar10 replaced by synthetic" in err
    for nb in ("00_tiny", "01_down"):
        m = json.loads((fake_repo / "results" / "dryrun" / "gpu" / nb / "manifest.json").read_text())
        assert m["status"] == "ok" and m["params"]["device"] == "cpu"
    assert m["dry_run"]["changes"]["device"] == {"profile": "cuda", "dry_run": "cpu"}
    assert not (fake_repo / "results" / "gpu").exists() and not (fake_repo / "results" / runner.GPU_WITHOUT_CUDA_DIR).exists()
    assert main(["run", "00_tiny", "--profile", "gpu", "--dry-run", "-p", "n", "2"]) == 2  # no overrides
    assert main(["run", "00_tiny", "--profile", "smoke", "--dry-run"]) == 2  # only gpu profiles have a dry run
    assert "--dry-run is for the gpu profiles" in capsys.readouterr().err
    (fake_repo / "params" / "00_tiny" / "gpu.yaml").write_text("n: 4\ndevice: cuda\nfail: true\n")
    assert main(["run", "00_tiny", "--profile", "gpu", "--dry-run", "--no-progress"]) == 1
    assert "boom on request" in capsys.readouterr().err


def test_a_caught_exception_in_the_metrics_fails_the_dry_run(tmp_path):
    folder = tmp_path / "nb"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"status": "ok"}))
    (folder / "metrics.csv").write_text("method,metric,status,reason\nbk,t,ok,\nx,t,failed,not measured: needs CUDA\n")
    r = runner.RunResult("nb", "gpu", "ok", folder)
    assert dryrun._check_rows(runner.Runner(REPO, tmp_path), r).status == "ok"  # a CPU limit is no crash
    with open(folder / "metrics.csv", "a") as f:
        f.write("opacus_hooks,t,failed,RuntimeError: view modified inplace\n")
    assert dryrun._check_rows(runner.Runner(REPO, tmp_path), r).status == "ok"  # a peer's failure is a finding
    with open(folder / "metrics.csv", "a") as f:
        f.write("ghost,t,failed,RuntimeError: view modified inplace\n")
    r = dryrun._check_rows(runner.Runner(REPO, tmp_path), r)
    assert r.status == "failed" and "RuntimeError" in r.error["message"]
    assert json.loads((folder / "manifest.json").read_text())["status"] == "failed"
