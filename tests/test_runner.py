"""The papermill runner: parameter checks, pre-flight, caching, atomic results, dependencies.

The fake repository (see conftest.fake_repo) has a tiny notebook 00_tiny that writes a
metrics.csv and a figure, and 01_down that reads 00_tiny's results through
`dpbench.workbench.runner.upstream_dir`. A few tests execute them for real with papermill.
"""

from __future__ import annotations

import json

import pytest
from conftest import read_json, tree_snapshot, write_notebook

from dpbench.workbench import params, runner, scheduling
from dpbench.workbench.cli import main
from dpbench.errors import UserError
from dpbench.workbench.results import COLUMNS, load_metrics

# ---------------------------------------------------------------- parameters (no kernel)


def test_parameters_cell_parses_literals(fake_repo):
    cell = params.parameters_cell(fake_repo / "notebooks" / "00_tiny.ipynb")
    assert cell == {"profile": "smoke", "output_dir": "", "seed": 0, "device": "cpu", "n": 3,
                      "scale": 1.0, "label": "", "fail": False, "dataset": "digits"}


@pytest.mark.parametrize("source", ["x = 1 + len('a')", "import os", "x = y", "x, y = 1, 2", "x = ("])
def test_parameters_cell_rejects_non_literals(source):
    with pytest.raises(UserError):
        params.parse_parameters(source)


def test_notebook_without_parameters_tag_is_a_user_error(fake_repo):
    import nbformat

    path = fake_repo / "notebooks" / "02_untagged.ipynb"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    nbformat.write(nb, str(path))
    with pytest.raises(UserError, match="parameters"):
        params.parameters_cell(path)


@pytest.mark.parametrize(
    "value, default, expected",
    [
        (3, 1.0, 3.0),  # int accepted where float expected
        ("1e-3", 1.0, 1e-3),  # YAML reads 1e-3 as text; it spells a float
        ("x", "", "x"),
        (True, False, True),
        ([1, 2], [0.5], [1.0, 2.0]),
        ([1, 2], (3, 4), (1, 2)),
        ({"a": 1}, {}, {"a": 1}),
        ("anything", None, "anything"),
    ],
)
def test_coerce_value_accepts(value, default, expected):
    out = params.coerce_value("k", value, default)
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize(
    "value, default",
    [(1.5, 3), (True, 3), (1, True), ("yes", False), (3, "text"), ("abc", 1.0), (1, [1]), (["a"], [1]), (None, 1)],
)
def test_coerce_value_rejects(value, default):
    with pytest.raises(UserError, match=r"'k(\[0\])?'"):
        params.coerce_value("k", value, default)


def test_resolve_merges_yaml_overrides_and_reserved(fake_repo):
    spec = params.resolve(fake_repo, "00_tiny", "cpu", [("scale", "0.5"), ("label", "abc"), ("seed", "7")])
    assert spec.params == {"profile": "cpu", "seed": 7, "device": "cpu", "n": 4, "scale": 0.5, "label": "abc"}
    assert isinstance(spec.params["scale"], float)
    down = params.resolve(fake_repo, "01_down", "cpu")
    assert down.requires == ["00_tiny"] and "requires" not in down.params


@pytest.mark.parametrize(
    "overrides, match",
    [
        ([("nope", "1")], r"unknown parameter 'nope'.*valid parameters: .*dataset.*n.*scale"),
        ([("n", "2.5")], r"'n'.*int"),
        ([("fail", "maybe")], r"'fail'.*bool"),
        ([("output_dir", "/tmp/x")], "set by the runner"),
        ([("profile", "gpu")], "set by the runner"),
        ([("requires", "[00_tiny]")], "profile yaml"),
    ],
)
def test_resolve_rejects_bad_overrides(fake_repo, overrides, match):
    with pytest.raises(UserError, match=match):
        params.resolve(fake_repo, "00_tiny", "cpu", overrides)


def test_malformed_yaml_names_file_and_line(fake_repo):
    (fake_repo / "params" / "00_tiny" / "cpu.yaml").write_text("n: 4\nscale: [1, 2\nlabel: x\n")
    with pytest.raises(UserError, match=r"cpu\.yaml line \d+"):
        params.resolve(fake_repo, "00_tiny", "cpu")


def test_unknown_notebook_and_profile_list_valid_ones(fake_repo):
    with pytest.raises(UserError, match="valid notebooks: 00_tiny, 01_down"):
        params.resolve(fake_repo, "07_missing", "cpu")
    with pytest.raises(UserError, match="valid profiles: smoke, cpu, gpu"):
        params.resolve(fake_repo, "00_tiny", "laptop")


# ---------------------------------------------------------------- pre-flight (no kernel)


def _spec(profile, device, **values):
    return params.RunSpec("nb", profile, None, None, {"profile": profile, "seed": 0, "device": device, **values})


def test_device_check(monkeypatch):
    monkeypatch.setattr(params, "cuda_available", lambda: False)
    params.check_device(_spec("cpu", "cpu"))
    params.check_device(_spec("gpu", "auto"))  # auto is allowed to fall back, by request
    params.check_device(_spec("gpu", "cpu"))  # a gpu profile may choose the CPU (06: a GPU gains it nothing)
    for spec in (_spec("gpu", "cuda"), _spec("cpu", "cuda:0"), _spec("gpu", "mps"), _spec("gpu-quick", "cuda")):
        with pytest.raises(UserError, match="no CUDA device"):
            params.check_device(spec)
    with pytest.raises(UserError, match="unknown device"):
        params.check_device(_spec("cpu", "tpu"))
    monkeypatch.setattr(params, "cuda_available", lambda: True)
    params.check_device(_spec("gpu", "cuda"))


def test_dataset_names_and_check(monkeypatch):
    values = {"dataset": "cifar10", "public_dataset": "svhn", "datasets": ["mnist", "cifar10"], "other": "x", "n": 1}
    assert params.dataset_names(values) == ["cifar10", "svhn", "mnist"]
    seen = []

    class FakeData:
        @staticmethod
        def check_available(name, data_root=None):
            seen.append((name, data_root))
            if name == "svhn":
                raise UserError("svhn missing")

    import dpbench

    monkeypatch.setitem(__import__("sys").modules, "dpbench.data", FakeData)
    monkeypatch.setattr(dpbench, "data", FakeData, raising=False)
    with pytest.raises(UserError, match="svhn missing"):
        params.check_datasets(_spec("cpu", "cpu", data_root="/d", **values))
    assert seen == [("cifar10", "/d"), ("svhn", "/d")]


def test_dependency_order_and_cycles(fake_repo):
    specs = {n: params.RunSpec(n, "cpu", None, None, {}, req) for n, req in
             [("a", ["c"]), ("b", []), ("c", ["b"]), ("d", ["a", "b"])]}
    assert [s.notebook for s in scheduling.topological(specs)] == ["b", "c", "a", "d"]
    (fake_repo / "params" / "00_tiny" / "cpu.yaml").write_text("requires: [01_down]\n")
    with pytest.raises(UserError, match="cycle"):
        scheduling.plan(runner.Runner(fake_repo), ["01_down"], "cpu")


def test_swap_in_replaces_folder(tmp_path):
    dest, new = tmp_path / "nb", tmp_path / ".tmp-nb"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    runner.swap_in(new, dest)
    assert [p.name for p in tmp_path.iterdir()] == ["nb"]
    assert [p.name for p in dest.iterdir()] == ["new.txt"]


def test_upstream_dir_requires_ok_results(fake_repo, monkeypatch):
    monkeypatch.setenv("DPBENCH_RESULTS_ROOT", str(fake_repo / "elsewhere"))
    with pytest.raises(UserError, match="dpbench run 00_tiny --profile cpu"):
        runner.upstream_dir("cpu", "00_tiny")
    folder = fake_repo / "elsewhere" / "cpu" / "00_tiny"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"status": "ok"}))
    assert runner.upstream_dir("cpu", "00_tiny") == folder


def test_cache_key_covers_params_notebook_and_upstream(fake_repo):
    r = runner.Runner(fake_repo, progress=False)
    up = r.result_dir("cpu", "00_tiny")
    up.mkdir(parents=True)
    (up / "manifest.json").write_text(json.dumps({"status": "ok", "started": "1"}))

    def key(nb, overrides=()):
        spec = params.resolve(fake_repo, nb, "cpu", overrides)
        return r.cache_key(spec, r.hashes(spec), r.upstream_hashes(spec))

    base, down = key("00_tiny"), key("01_down")
    assert key("00_tiny") == base
    assert key("00_tiny", [("n", "5")]) != base
    (up / "manifest.json").write_text(json.dumps({"status": "ok", "started": "2"}))
    assert key("01_down") != down  # a rerun upstream invalidates the downstream
    nb = fake_repo / "notebooks" / "00_tiny.ipynb"
    nb.write_text(nb.read_text().replace("range(n)", "range(n) "))
    assert key("00_tiny") != base


def test_kernel_name_prefers_registered_dpbench_kernel(tmp_path, monkeypatch):
    monkeypatch.setattr(runner.sys, "prefix", str(tmp_path))
    assert runner.kernel_name() == "python3"
    spec = tmp_path / "share" / "jupyter" / "kernels" / "dpbench" / "kernel.json"
    spec.parent.mkdir(parents=True)
    spec.write_text("{}")
    assert runner.kernel_name() == "dpbench"


def test_manifest_reads_privacy_ledger(tmp_path):
    assert runner.provenance.read_ledger(tmp_path) is None
    (tmp_path / "ledger.json").write_text(json.dumps({"accountant": "rdp", "delta": 1e-5, "events": []}))
    assert runner.provenance.read_ledger(tmp_path)["accountant"] == "rdp"


def test_source_hash_tracks_python_files(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    h = runner.provenance.source_hash(tmp_path)
    (tmp_path / "pkg" / "notes.txt").write_text("not source")
    assert runner.provenance.source_hash(tmp_path) == h
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")
    assert runner.provenance.source_hash(tmp_path) != h


def test_source_hash_covers_every_layer_of_the_package():
    """The cache key must change when any layer changes, not only the workbench."""
    root = runner.provenance.package_dir()
    assert (root / "__init__.py").is_file()
    for layer in ("workbench", "experiments", "training", "clipping", "privacy"):
        assert (root / layer / "__init__.py").is_file(), layer


# ---------------------------------------------------------------- real executions


@pytest.fixture
def pinned_source(monkeypatch):
    """Others may edit dpbench/ while these tests run; pin the source hash so the cache
    behaviour under test is not disturbed (test_source_hash_tracks_python_files covers it)."""
    monkeypatch.setattr(runner.provenance, "source_hash", lambda root=None: "pinned")


def test_run_cache_dependencies_failure_and_report(fake_repo, pinned_source, capsys):
    """One scenario (five kernel runs) through run, cache, --force, reproduce, failure, list, report."""
    results = fake_repo / "results" / "cpu"
    tiny, down = results / "00_tiny", results / "01_down"

    # run the downstream notebook: its missing upstream runs first
    assert main(["run", "01_down", "--profile", "cpu", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.index("00_tiny [cpu]: running") < err.index("01_down [cpu]: running")
    assert sorted(p.name for p in tiny.iterdir()) == ["executed.ipynb", "figures", "manifest.json", "metrics.csv"]
    assert (tiny / "figures" / "line.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    df = load_metrics(tiny)
    assert list(df.columns[: len(COLUMNS)]) == COLUMNS and "step" in df.columns
    assert df["value"].tolist() == [0.0, 2.0, 4.0, 6.0]  # cpu.yaml: n=4, scale=2
    assert load_metrics(down)["value"].tolist() == [4.0]  # read through upstream_dir

    m = read_json(tiny / "manifest.json")
    assert m["status"] == "ok" and m["error"] is None and m["profile"] == "cpu" and m["notebook"] == "00_tiny"
    assert m["params"] == {"profile": "cpu", "seed": 0, "device": "cpu", "n": 4, "scale": 2.0, "output_dir": str(tiny)}
    assert set(m["hashes"]) >= {"notebook", "params_file", "dpbench_source", "environment"}
    assert m["hashes"]["notebook"] == runner.provenance.sha256_file(fake_repo / "notebooks" / "00_tiny.ipynb")
    assert {"torch", "numpy", "papermill"} <= set(m["packages"]) and m["python"]
    assert {"requested", "torch", "gpu_name", "cpu"} <= set(m["device"]) and m["device"]["requested"] == "cpu"
    assert m["seed"] == 0 and m["duration_s"] > 0 and m["started"] <= m["finished"]
    assert set(m["git"]) == {"commit", "dirty"} and m["privacy"] is None and m["kernel"] == runner.kernel_name()
    dm = read_json(down / "manifest.json")
    assert dm["upstream"] == {"00_tiny": runner.provenance.sha256_file(tiny / "manifest.json")}
    assert not list(results.glob(".tmp-*")) and not list(results.glob(".old-*"))

    # identical reruns are skipped and rewrite nothing
    before = tree_snapshot(results)
    assert main(["run", "00_tiny", "--profile", "cpu", "--no-progress"]) == 0
    assert "0 ran ok, 1 up to date" in capsys.readouterr().err
    assert main(["reproduce", "--profile", "cpu", "--no-progress"]) == 0
    assert "0 ran ok, 2 up to date, 0 failed" in capsys.readouterr().err
    assert tree_snapshot(results) == before

    # --force reruns the named notebook only, with the same cache key
    assert main(["run", "01_down", "--profile", "cpu", "--force", "--no-progress"]) == 0
    assert "1 ran ok, 0 up to date" in capsys.readouterr().err
    assert read_json(down / "manifest.json")["cache_key"] == dm["cache_key"]
    assert tree_snapshot(tiny) == {k.split("/", 1)[1]: v for k, v in before.items() if k.startswith("00_tiny/")}

    # upstream fails in reproduce: good results kept, failure in .failed, its dependant not
    # started, an independent notebook still runs, exit 1 with a summary
    write_notebook(fake_repo / "notebooks" / "02_indep.ipynb",
                   'profile = "smoke"\noutput_dir = ""\nseed = 0\ndevice = "cpu"\n',
                   "open(output_dir + '/done.txt', 'w').write('yes')")
    (fake_repo / "params" / "02_indep").mkdir()
    (fake_repo / "params" / "02_indep" / "cpu.yaml").write_text("seed: 3\n")
    (fake_repo / "params" / "00_tiny" / "cpu.yaml").write_text("n: 4\nscale: 2\nfail: true\n")
    good_tiny, good_down = tree_snapshot(tiny), tree_snapshot(down)
    assert main(["reproduce", "--profile", "cpu", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "1 ran ok, 0 up to date, 2 failed" in err
    assert "FAILED 00_tiny [cpu]: RuntimeError: boom on request" in err
    assert "FAILED 01_down [cpu]: UpstreamFailed: upstream 00_tiny failed" in err
    assert tree_snapshot(tiny) == good_tiny and tree_snapshot(down) == good_down
    failed = results / ".failed" / "00_tiny"
    fm = read_json(failed / "manifest.json")
    assert fm["status"] == "failed" and fm["error"] == {"name": "RuntimeError", "message": "boom on request"}
    assert fm["params"]["fail"] is True
    assert "boom on request" in (failed / "executed.ipynb").read_text()
    assert (results / "02_indep" / "done.txt").read_text() == "yes"
    assert read_json(results / "02_indep" / "manifest.json")["seed"] == 3

    assert main(["list"]) == 0
    tiny_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("00_tiny"))
    assert "ok (last attempt failed)" in tiny_line

    assert main(["report", "--profile", "cpu"]) == 0
    report = results / "report.html"
    assert capsys.readouterr().out.strip() == str(report)
    page = report.read_text()
    assert page.count("data:image/png;base64,") == 1 and "RuntimeError: boom on request" in page
    assert m["cache_key"][:12] in page and "02_indep" in page and f"{m['duration_s']:.1f} s" in page


def test_gpu_profile_without_cuda_never_writes_results_gpu(fake_repo, pinned_source, monkeypatch, capsys):
    """results/gpu/ is committed and holds runs on CUDA only; `device: auto` on a CPU
    machine runs the gpu profile but writes it elsewhere, and says so."""
    monkeypatch.setattr(params, "cuda_available", lambda: False)
    argv = ["run", "00_tiny", "--profile", "gpu", "-p", "device", "auto", "-p", "dataset", "digits", "--no-progress"]
    assert main(argv) == 0
    assert "never to results/gpu/" in capsys.readouterr().err
    assert not (fake_repo / "results" / "gpu").exists()
    m = read_json(fake_repo / "results" / runner.GPU_WITHOUT_CUDA_DIR / "gpu" / "00_tiny" / "manifest.json")
    assert m["status"] == "ok" and m["profile"] == "gpu"
    # with CUDA the same profile goes to results/gpu/ (only the folder choice is checked here)
    monkeypatch.setattr(params, "cuda_available", lambda: True)
    assert runner.Runner(fake_repo).result_dir("gpu", "00_tiny") == fake_repo / "results" / "gpu" / "00_tiny"
