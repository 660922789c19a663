"""Shared test fixtures: the `gpu` mark and a throw-away dpbench repository."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

GPU_SKIP_REASON = "needs a CUDA device"


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu` (with a reason) when torch sees no CUDA device."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in gpu_items:
        item.add_marker(skip)


def write_notebook(path: Path, parameters: str, *cells: str) -> Path:
    """Write a notebook whose first code cell (tagged `parameters`) is `parameters` and
    whose other code cells are `cells`, without outputs, kernel "python3"."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    first = nbformat.v4.new_code_cell(parameters)
    first.metadata["tags"] = ["parameters"]
    nb.cells = [first] + [nbformat.v4.new_code_cell(src) for src in cells]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path


TINY_PARAMETERS = '''profile = "smoke"
output_dir = ""
seed = 0
device = "cpu"
n = 3
scale = 1.0
label = ""
fail = False
dataset = "digits"
'''

# Writes a tidy metrics.csv and one figure; raises on request so tests can see a failure.
TINY_BODY = '''import os
from dpbench.workbench.results import Recorder
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
if fail:
    raise RuntimeError("boom on request")
rec = Recorder(output_dir, experiment="00_tiny")
for i in range(n):
    rec.add("value", i * scale, method=label or "m", seed=seed, step=i)
fig, ax = plt.subplots()
ax.plot(range(n), [i * scale for i in range(n)])
ax.set_xlabel("i"); ax.set_ylabel("value")  # the recorder's figure check wants labelled axes
rec.figure(fig, "line")
rec.save()
'''

# Reads the upstream's metrics through dpbench.workbench.runner.upstream_dir and records their count.
DOWN_BODY = '''from dpbench.workbench.results import Recorder, load_metrics
from dpbench.workbench.runner import upstream_dir
up = upstream_dir(profile, "00_tiny")
rec = Recorder(output_dir, experiment="01_down")
rec.add("upstream_rows", len(load_metrics(up)), seed=seed)
rec.save()
'''


@pytest.fixture
def fake_repo(tmp_path, monkeypatch):
    """A tiny dpbench checkout: notebooks 00_tiny (metrics + a figure) and 01_down
    (requires 00_tiny), with smoke/cpu/gpu params. DPBENCH_ROOT points at it and results
    land in <repo>/results; DPBENCH_DATA is an empty folder."""
    repo = tmp_path / "repo"
    write_notebook(repo / "notebooks" / "00_tiny.ipynb", TINY_PARAMETERS, TINY_BODY)
    write_notebook(
        repo / "notebooks" / "01_down.ipynb",
        'profile = "smoke"\noutput_dir = ""\nseed = 0\ndevice = "cpu"\n',
        DOWN_BODY,
    )
    p = repo / "params"
    (p / "00_tiny").mkdir(parents=True)
    (p / "00_tiny" / "smoke.yaml").write_text("n: 3\nscale: 1.0\nlabel: ''\nfail: false\ndataset: digits\n")
    (p / "00_tiny" / "cpu.yaml").write_text("n: 4\nscale: 2\n")
    (p / "00_tiny" / "gpu.yaml").write_text("n: 4\ndevice: cuda\ndataset: cifar10\n")
    (p / "01_down").mkdir(parents=True)
    (p / "01_down" / "smoke.yaml").write_text("")
    (p / "01_down" / "cpu.yaml").write_text("requires: [00_tiny]\n")
    (p / "01_down" / "gpu.yaml").write_text("requires: [00_tiny]\ndevice: cuda\n")
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setenv("DPBENCH_ROOT", str(repo))
    monkeypatch.delenv("DPBENCH_RESULTS", raising=False)
    monkeypatch.delenv("DPBENCH_RESULTS_ROOT", raising=False)
    monkeypatch.setenv("DPBENCH_DATA", str(data))
    monkeypatch.chdir(repo)
    return repo


def tree_snapshot(folder: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under `folder` (empty when it is absent)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def read_json(path: Path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny tensor ops on one thread: no oversubscription on a busy 2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class ListRecorder:
    """A stand-in for `workbench.results.Recorder` in experiments tests: `add` collects tidy
    rows (the one method the experiments call), `get` filters them by metric and columns."""

    def __init__(self):
        self.rows = []

    def add(self, metric, value, **kw):
        self.rows.append({"metric": metric, "value": value, **kw})

    def get(self, metric, **match):
        return [r for r in self.rows if r["metric"] == metric and all(r.get(k) == v for k, v in match.items())]
