"""The `dpbench` command line: bad input is one line, exit code 2, and results/ untouched."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest
from conftest import tree_snapshot

import dpbench
import dpbench.training
from dpbench.workbench import params
from dpbench.workbench.cli import main
from dpbench.errors import UserError


def _fake_data_module(monkeypatch, available=("digits", "synthetic")):
    """Stand in for dpbench.data: only `available` data sets are present."""

    def check_available(name, data_root=None):
        if name not in available:
            raise UserError(f"data set {name!r} not found under {data_root or '$DPBENCH_DATA'}; download it")

    fake = types.ModuleType("dpbench.data")
    fake.check_available = check_available
    monkeypatch.setitem(sys.modules, "dpbench.data", fake)
    monkeypatch.setattr(dpbench, "data", fake, raising=False)


def _bad(fake_repo, capsys, argv, match):
    """Run the CLI on bad input: exit 2, one `dpbench: error:` line, results/ unchanged."""
    results = fake_repo / "results"
    before = tree_snapshot(results)
    existed = results.exists()
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("dpbench: error: "), err
    assert match in lines[0], lines[0]
    assert tree_snapshot(results) == before and results.exists() == existed
    return lines[0]


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(params, "cuda_available", lambda: False)


@pytest.fixture(params=["empty", "with_results"])
def repo(request, fake_repo):
    """The fake repo with no results, or with a previous good run of both notebooks."""
    if request.param == "with_results":
        for nb in ("00_tiny", "01_down"):
            folder = fake_repo / "results" / "cpu" / nb
            folder.mkdir(parents=True)
            (folder / "manifest.json").write_text(json.dumps({"status": "ok", "started": "x"}))
            (folder / "metrics.csv").write_text("experiment\n")
    return fake_repo


@pytest.mark.parametrize(
    "argv, match",
    [
        (["run", "99_nope", "--profile", "cpu"], "unknown notebook '99_nope'; valid notebooks: 00_tiny, 01_down"),
        (["run", "00_tiny", "--profile", "laptop"], "unknown profile 'laptop'; valid profiles: smoke, cpu, gpu"),
        (["reproduce", "--profile", "laptop"], "unknown profile 'laptop'"),
        (["report", "--profile", "laptop"], "unknown profile 'laptop'"),
        (["run", "00_tiny", "--profile", "cpu", "-p", "epochs", "3"], "unknown parameter 'epochs'"),
        (["run", "00_tiny", "--profile", "cpu", "-p", "n", "three"], "parameter 'n' (-p) must be int"),
        (["run", "00_tiny", "--profile", "cpu", "-p", "scale", "[1]"], "parameter 'scale' (-p) must be float"),
        (["run", "00_tiny", "--profile", "cpu", "-p", "output_dir", "/tmp"], "set by the runner"),
        (["run", "00_tiny", "--profile", "gpu"], "no CUDA device"),
        (["run", "01_down", "--profile", "gpu"], "no CUDA device"),
        (["reproduce", "--profile", "gpu"], "no CUDA device"),
        (["run", "00_tiny", "--profile", "cpu", "-p", "device", "cuda"], "no CUDA device"),
        (["run", "00_tiny", "--profile", "cpu", "-p", "dataset", "cifar10"], "data set 'cifar10' not found"),
        (["run", "00_tiny"], "--profile"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input(repo, capsys, no_cuda, monkeypatch, argv, match):
    _fake_data_module(monkeypatch)
    _bad(repo, capsys, argv, match)


def test_unknown_parameter_lists_valid_ones(fake_repo, capsys):
    line = _bad(fake_repo, capsys, ["run", "00_tiny", "--profile", "cpu", "-p", "epochs", "3"], "valid parameters:")
    for key in ("n", "scale", "label", "fail", "dataset", "seed", "device"):
        assert f" {key}" in line


def test_wrong_type_in_yaml(fake_repo, capsys):
    (fake_repo / "params" / "00_tiny" / "cpu.yaml").write_text("n: many\n")
    _bad(fake_repo, capsys, ["run", "00_tiny", "--profile", "cpu"], "parameter 'n' (params/00_tiny/cpu.yaml) must be int")


def test_malformed_yaml(fake_repo, capsys):
    (fake_repo / "params" / "00_tiny" / "cpu.yaml").write_text("n: 4\nscale: [1, 2\nlabel: x\n")
    line = _bad(fake_repo, capsys, ["run", "00_tiny", "--profile", "cpu"], "malformed YAML in ")
    assert "cpu.yaml line " in line


def test_reproduce_preflights_every_notebook_first(fake_repo, capsys, monkeypatch):
    # 01_down is fine but 00_tiny's gpu data set is missing: nothing may start.
    monkeypatch.setattr(params, "cuda_available", lambda: True)
    _fake_data_module(monkeypatch)
    _bad(fake_repo, capsys, ["reproduce", "--profile", "gpu"], "data set 'cifar10' not found")


def test_missing_dataset_with_real_data_module(fake_repo, capsys):
    pytest.importorskip("dpbench.data")
    # DPBENCH_DATA is an empty folder (fake_repo); cifar10 is not there and tests are offline.
    _bad(fake_repo, capsys, ["run", "00_tiny", "--profile", "cpu", "-p", "dataset", "cifar10"], "cifar10")


def test_list_shows_profiles_and_status(fake_repo, capsys):
    folder = fake_repo / "results" / "cpu" / "00_tiny"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"status": "ok", "started": "2024-01-01T00:00:00"}))
    failed = fake_repo / "results" / "smoke" / ".failed" / "00_tiny"
    failed.mkdir(parents=True)
    (failed / "manifest.json").write_text(json.dumps({"status": "failed", "started": "2024-01-02T00:00:00"}))
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["notebook", "smoke", "cpu", "gpu"]
    tiny = next(line for line in lines if line.startswith("00_tiny"))
    assert tiny.split() == ["00_tiny", "failed", "ok", "-"]
    down = next(line for line in lines if line.startswith("01_down"))
    assert down.split() == ["01_down", "-", "-", "-"]


def test_bench_is_delegated_lazily(monkeypatch, capsys):
    seen = {}
    fake = types.ModuleType("dpbench.training.bench")
    fake.add_cli_arguments = lambda parser: parser.add_argument("--profile", required=True)
    fake.cli = lambda args: seen.setdefault("profile", args.profile) and 0
    monkeypatch.setitem(sys.modules, "dpbench.training.bench", fake)
    # `from dpbench.training import bench` reads the package attribute once the module was imported
    monkeypatch.setattr(dpbench.training, "bench", fake, raising=False)
    assert main(["bench", "--profile", "cpu"]) == 0
    assert seen == {"profile": "cpu"}
    assert main(["bench"]) == 2
    assert "dpbench: error: the following arguments are required: --profile" in capsys.readouterr().err


def test_bench_missing_module_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "dpbench.training.bench", None)  # import raises ModuleNotFoundError
    monkeypatch.delattr(dpbench.training, "bench", raising=False)
    assert main(["bench", "--profile", "cpu"]) == 2
    assert "dpbench/training/bench.py is missing" in capsys.readouterr().err


def test_parser_and_runner_import_no_heavy_modules():
    # Whatever `import dpbench` itself needs is allowed; the CLI and runner add nothing heavy.
    code = (
        "import sys, dpbench; base = set(sys.modules); "
        "from dpbench.workbench.cli import build_parser; import dpbench.workbench.runner, dpbench.workbench.params, dpbench.workbench.scheduling, dpbench.workbench.report; "
        "build_parser().parse_args(['run', 'x', '--profile', 'cpu']); "
        "heavy = ('torch', 'papermill', 'yaml', 'pandas', 'matplotlib', 'timm', 'dp_accounting'); "
        "print(sorted(m for m in heavy if m in sys.modules and m not in base))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_help_returns_zero(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("list", "run", "reproduce", "report", "bench"):
        assert command in out
