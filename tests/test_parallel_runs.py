"""`dpbench reproduce --jobs N`: parallel, isolated notebook jobs on a tiny fake repository.

Three probe notebooks: a and c are independent, b requires a. Each sleeps, then writes when
it ran and what environment its kernel saw (thread count, Jupyter runtime folder, pid).
"""

from __future__ import annotations

import json
import os

import pytest

from conftest import write_notebook
from dpbench.workbench import scheduling

PARAMS = 'profile = "smoke"\noutput_dir = ""\nseed = 0\ndevice = "cpu"\nsleep = 0.0\nfail = False\n'
PROBE = '''import json, os, time
from dpbench.workbench.results import Recorder
t0 = time.time()
time.sleep(sleep)
if fail:
    raise RuntimeError("probe failed on request")
info = {"start": t0, "end": time.time(), "omp": os.environ.get("OMP_NUM_THREADS"),
        "runtime": os.environ.get("JUPYTER_RUNTIME_DIR"), "pid": os.getpid()}
with open(os.path.join(output_dir, "probe.json"), "w") as f:
    json.dump(info, f)
rec = Recorder(output_dir, experiment="probe")
rec.add("slept", sleep, seed=seed)
rec.save()
'''
NAMES = ("10_a", "11_b", "12_c")


@pytest.fixture
def probe_repo(fake_repo):
    for nb in ("00_tiny", "01_down"):  # only the probes in this repository
        (fake_repo / "notebooks" / f"{nb}.ipynb").unlink()
    for nb in NAMES:
        write_notebook(fake_repo / "notebooks" / f"{nb}.ipynb", PARAMS, PROBE)
        d = fake_repo / "params" / nb
        d.mkdir(parents=True, exist_ok=True)
        (d / "smoke.yaml").write_text("sleep: 0.0\nfail: false\n")
        (d / "cpu.yaml").write_text("sleep: 4.0\n" + ("requires: [10_a]\n" if nb == "11_b" else ""))
    return fake_repo


def _probe(repo, nb):
    return json.loads((repo / "results" / "cpu" / nb / "probe.json").read_text())


def test_jobs_run_in_parallel_isolated_in_dependency_order(probe_repo, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 4)  # so the per-job share is visible: 4 / 2
    results = scheduling.reproduce("cpu", jobs=2, progress=False)
    assert [r.notebook for r in results] == list(NAMES)
    assert all(r.status == "ok" for r in results), [r.error for r in results]
    a, b, c = (_probe(probe_repo, nb) for nb in NAMES)
    assert a["start"] < c["end"] and c["start"] < a["end"]  # a and c overlapped
    assert b["start"] >= a["end"]  # b waited for its upstream
    assert {a["omp"], b["omp"], c["omp"]} == {"2"}  # cores / jobs threads each
    assert len({a["runtime"], b["runtime"], c["runtime"]}) == 3  # own connection-file folder each
    assert len({a["pid"], c["pid"]}) == 2
    # a second reproduce finds everything cached
    again = scheduling.reproduce("cpu", jobs=2, progress=False)
    assert [r.status for r in again] == ["skipped"] * 3


def test_failure_is_isolated_and_exclusive_notebook_runs_alone(probe_repo, monkeypatch):
    (probe_repo / "params" / "10_a" / "cpu.yaml").write_text("sleep: 0.0\nfail: true\n")
    (probe_repo / "params" / "12_c" / "cpu.yaml").write_text("sleep: 4.0\nexclusive: true\n")
    write_notebook(probe_repo / "notebooks" / "13_d.ipynb", PARAMS, PROBE)
    (probe_repo / "params" / "13_d").mkdir()
    (probe_repo / "params" / "13_d" / "smoke.yaml").write_text("sleep: 0.0\nfail: false\n")
    (probe_repo / "params" / "13_d" / "cpu.yaml").write_text("sleep: 3.0\n")
    results = {r.notebook: r for r in scheduling.reproduce("cpu", jobs=2, progress=False)}
    assert results["10_a"].status == "failed" and "probe failed on request" in results["10_a"].error["message"]
    assert results["11_b"].status == "failed" and results["11_b"].error["name"] == "UpstreamFailed"
    assert results["12_c"].status == "ok" and results["13_d"].status == "ok"
    assert (probe_repo / "results" / "cpu" / ".failed" / "10_a" / "executed.ipynb").is_file()
    c, d = _probe(probe_repo, "12_c"), _probe(probe_repo, "13_d")
    assert c["end"] <= d["start"] or d["end"] <= c["start"]  # the exclusive one never shared the machine
    assert c["omp"] == str(os.cpu_count())  # and it had every core
    assert scheduling.failure_summary(list(results.values())).startswith("2 ran ok, 0 up to date, 2 failed")


def test_jobs_must_be_positive(probe_repo):
    from dpbench.errors import UserError

    with pytest.raises(UserError, match="--jobs"):
        scheduling.reproduce("cpu", jobs=0, progress=False)
