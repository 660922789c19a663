"""`dpbench compare A B` on two synthetic results folders."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from dpbench.workbench import compare as C
from dpbench.workbench import verdicts as V
from dpbench.workbench.cli import main
from dpbench.errors import UserError


def write_metrics(folder: Path, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(folder / "metrics.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def r(exp, metric, value, method="", seed="", epsilon="8.0", **extra):
    return {"experiment": exp, "method": method, "epsilon": epsilon, "delta": "1e-05", "seed": seed, "metric": metric,
            "value": value, "status": "ok", "reason": "", "claim_id": "", **extra}


def make_side(root: Path, shift: float, n: int, extra_metric: bool) -> Path:
    """A profile folder with two notebooks. `shift` moves one arm's accuracy; `n` is a
    setting (a key: sides with different n do not match); `sd` is a measurement, not a key."""
    a = []
    for bs in (64, 128):
        for s in range(3):
            a.append(r("03_x", "acc", 0.80 + 0.01 * s + bs / 10000 + shift * (1 + 0.1 * s), "seq", s, batch_size=bs, n=n,
                       sd=0.1 * s + shift))
            a.append(r("03_x", "acc", 0.70 + 0.02 * s, "priv", s, batch_size=bs, n=n, sd=0.3))
    if not extra_metric:
        a.append(r("03_x", "loss", 0.5, "seq", 0, batch_size=64, n=n))
    a.append(r("03_x", "acc", "", "seq", 9, batch_size=64, n=n, status="failed", reason="diverged"))
    write_metrics(root / "cpu" / "03_x", a)
    b = [r("05_y", "sigma", 8.5 + (0.1 if shift else 0.0), "least_squares", exact=True)]
    seeds = range(10, 13) if shift else range(3)
    b += [r("05_y", "time", 1.0 + 0.2 * i + (0.01 if shift else 0), "solver", s) for i, s in enumerate(seeds)]
    if extra_metric:
        b.append(r("05_y", "extra", 1.0, "solver"))
    write_metrics(root / "cpu" / "05_y", b)
    (root / "cpu" / ".failed" / "06_z").mkdir(parents=True)  # hidden folders are not notebooks
    return root / "cpu"


@pytest.fixture
def sides(tmp_path):
    return make_side(tmp_path / "colleague", 0.0, 1000, False), make_side(tmp_path / "mine", 0.05, 1000, True)


def test_compare_matches_rows_and_estimates_differences(sides):
    a, b = (C.read_side(p) for p in sides)
    assert a.notebooks == ["03_x", "05_y"] and a.failed == 1 and len(a.rows) == 12 + 1 + 1 + 3
    cmp = C.compare(a, b)
    by = {(ln.key["experiment"], ln.key["metric"], ln.key["method"], ln.key.get("batch_size", "")): ln for ln in cmp.lines}
    assert set(by) == {("03_x", "acc", "seq", "64"), ("03_x", "acc", "seq", "128"), ("03_x", "acc", "priv", "64"),
                       ("03_x", "acc", "priv", "128"), ("05_y", "sigma", "least_squares", ""), ("05_y", "time", "solver", "")}
    seq = by[("03_x", "acc", "seq", "64")]
    assert seq.diff.mean == pytest.approx(0.055) and seq.flag == "*" and "paired" in seq.diff.note
    assert seq.a.n == 3 and seq.a.mean == pytest.approx(0.8164)
    assert by[("03_x", "acc", "priv", "128")].flag == "="
    sigma = by[("05_y", "sigma", "least_squares", "")]
    assert sigma.diff.exact and sigma.diff.mean == pytest.approx(0.1) and sigma.flag == "*"
    time = by[("05_y", "time", "solver", "")]
    assert "Welch" in time.diff.note and time.flag == ""  # different seeds, tiny shift: not significant
    assert cmp.only_a == 1 and cmp.only_b == 1  # loss only in A, extra only in B
    assert "03_x" not in cmp.differing  # sd differs too, but it is a measurement, not a setting
    for ln in cmp.lines:  # B - A is the difference of the two means shown
        assert ln.diff.mean == pytest.approx(ln.b.mean - ln.a.mean)
    ordered = C.ordered(cmp.lines)
    assert ordered[0].significant and not ordered[-1].significant
    text = C.format_table(cmp)
    assert "6 matched quantities, 3 differ beyond their 95% CI (*); 1 only in A, 1 only in B" in text
    assert "batch_size=64" in text
    assert C.compare(a, b, metrics=["sigma"]).lines[0].key["metric"] == "sigma"
    assert len(C.compare(a, b, metrics=["sigma"]).lines) == 1


def test_a_setting_that_differs_is_never_pooled(tmp_path):
    """Sides that ran different n: nothing of 03_x matches, and the header says why."""
    a = C.read_side(make_side(tmp_path / "a", 0.0, 1000, False))
    b = C.read_side(make_side(tmp_path / "b", 0.05, 500, True))
    cmp = C.compare(a, b)
    assert {ln.key["experiment"] for ln in cmp.lines} == {"05_y"}
    assert cmp.differing["03_x"] == {"n": (["1000"], ["500"])} and cmp.only_a == 5 and cmp.only_b == 5
    assert "03_x: matched per value; values only one side ran are not compared: n: A 1000 / B 500" in C.format_table(cmp)


def sweep_side(folder: Path, shift: float, sizes=(4, 16, 64, 256, 1024), with_bs=True) -> Path:
    rows = []
    for bs in sizes:
        for s in range(3):
            extra = {"batch_size": bs} if with_bs else {}
            rows.append(r("01_bench", "step_time_s", 0.001 * bs * (1 + shift) + 0.0001 * s, "mixed", s, **extra))
    write_metrics(folder / "01_bench", rows)
    return folder


def test_swept_parameter_gives_one_row_per_value(tmp_path):
    """The review's case: batch sizes 4...1024 were pooled as if they were seeds."""
    a = C.read_side(sweep_side(tmp_path / "a", 0.0))
    b = C.read_side(sweep_side(tmp_path / "b", 0.1))
    cmp = C.compare(a, b)
    assert sorted(int(ln.key["batch_size"]) for ln in cmp.lines) == [4, 16, 64, 256, 1024]
    for ln in cmp.lines:
        bs = int(ln.key["batch_size"])
        assert ln.a.n == ln.b.n == 3 and ln.a.mean == pytest.approx(0.001 * bs + 0.0001)
        assert ln.diff.mean == pytest.approx(ln.b.mean - ln.a.mean) and ln.relative == pytest.approx(0.1, rel=0.05)
        assert ln.flag == "~" and not ln.significant  # the same shift in every seed: a zero-width interval
    # a sweep only one side ran: its rows would pool batch sizes, so they are not compared
    b2 = C.read_side(sweep_side(tmp_path / "b2", 0.1, with_bs=False, sizes=(4,)))
    cmp2 = C.compare(a, b2)
    assert cmp2.lines == [] and cmp2.one_side == {"01_bench": {"batch_size": "A"}}
    text = C.format_table(cmp2)
    assert "columns only one folder has: batch_size (only A)" in text
    assert "not compared: 01_bench step_time_s mixed eps=8: A's rows take several values of batch_size" in text


def test_plot_labels_are_never_cut(tmp_path):
    long = "03_public_pretraining_with_a_long_name"
    ln = C.Line({"experiment": long, "metric": "test_accuracy_at_the_end", "method": "sequential",
                 "epsilon": "8", "learning_rate": "0.001"}, *(V.Estimate(1.0, 0.1, 3, 0.1),) * 3)
    label = C._line_label(ln)
    assert label.replace("\n", " ") == f"{long} test_accuracy_at_the_end sequential eps=8 (learning_rate=0.001)"
    assert all(len(part) <= 60 for part in label.split("\n"))


def test_by_forces_a_key_column(sides):
    a, b = (C.read_side(p) for p in sides)
    cmp = C.compare(a, b, by=["reading"])  # a column neither side has: every row keyed on a blank
    assert len(cmp.lines) == 6


def test_cli_prints_table_and_writes_plot_and_csv(sides, tmp_path, capsys):
    out, table = tmp_path / "plots" / "cmp.png", tmp_path / "cmp.csv"
    assert main(["compare", str(sides[0]), str(sides[1]), "-o", str(out), "--csv", str(table), "--top", "3"]) == 0
    text = capsys.readouterr().out
    assert f"plot: {out}" in text and f"table: {table}" in text and "... 3 more" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    with open(table, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and rows[0]["flag"] == "*" and {"a_mean", "b_mean", "diff_ci_low", "batch_size"} <= set(rows[0])
    # one notebook's folder against another's
    assert main(["compare", str(sides[0] / "05_y"), str(sides[1] / "05_y"), "-o", str(tmp_path / "one.png")]) == 0
    assert "2 matched quantities" in capsys.readouterr().out


def test_profile_name_and_default_output(sides, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DPBENCH_RESULTS", str(tmp_path / "mine"))
    assert main(["compare", str(sides[0]), "cpu"]) == 0
    text = capsys.readouterr().out
    plot = Path(text.strip().splitlines()[-1].split("plot: ", 1)[1])
    assert plot.parent == tmp_path / "mine" / "compare" and plot.is_file()


@pytest.mark.parametrize(
    "argv, match",
    [
        (["compare", "{tmp}/missing", "{a}"], "no results folder"),
        (["compare", "{a}", "{a}"], "same folder"),
        (["compare", "{a}", "{b}", "-o", "{tmp}/x.jpg"], "must end in .png"),
        (["compare", "{tmp}/empty", "{b}"], "no metrics.csv"),
        (["compare", "{a}", "{b}", "--top", "0"], "--top must be at least 1"),
        (["compare", "{a}"], "required"),
    ],
)
def test_bad_input(sides, tmp_path, capsys, argv, match):
    (tmp_path / "empty").mkdir()
    argv = [x.format(tmp=tmp_path, a=sides[0], b=sides[1]) for x in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]


def test_resolve_side_errors_are_user_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("DPBENCH_RESULTS", str(tmp_path))
    with pytest.raises(UserError, match="no results folder 'gpu'"):
        C.resolve_side("gpu")
