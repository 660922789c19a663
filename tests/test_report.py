"""The HTML report: summary of claims with verdicts, notebook sections, self-containment,
`dpbench report --summary`, and `make reproduce` printing the summary.

Results folders are written directly (manifest.json, metrics.csv, figures) so no kernel
runs here; the runner's own test covers a report after real executions.
"""

from __future__ import annotations

import base64
import csv
import json
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from dpbench.workbench import report
from dpbench.workbench import verdicts
from dpbench.workbench.cli import main

REPO = Path(__file__).resolve().parents[1]


def png_bytes(width: int = 40, height: int = 30, rgb=(30, 120, 200)) -> bytes:
    """A valid RGB PNG of one colour, built by hand (no plotting library needed)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


CLAIMS = [
    # claim_id, method, metric, value, extra judging columns
    ("X-a-beats-b", "a > b", "test accuracy", "", {"unit": "test accuracy (fraction)", "setting_keys": "epsilon=1"}),
    ("X-sigma-eps1", "DP-LS", "noise multiplier", "8.5", {"kind": "derived check", "test": "value", "margin": "0.05",
                                                         "margin_source": "rounding"}),
    ("X-imagenet-acc", "big model", "top-1 accuracy (%)", "88.0", {"unit": "%", "test": "value"}),
    ("X-never-run", "c > d", "test accuracy", "", {}),
    ("X-time-s", "mixed", "seconds per epoch", "37", {"unit": "s/epoch", "ratio_to": "X-nondp-time-s"}),
    ("X-nondp-time-s", "non-DP", "seconds per epoch", "14", {"unit": "s/epoch"}),
    ("X-prev-best", "previous best", "top-1 accuracy (%)", "94.8", {"unit": "%", "kind": "cited context"}),
]


def write_claims(path: Path, claims=CLAIMS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=report.CLAIM_COLUMNS)
        w.writeheader()
        for cid, method, metric, value, extra in claims:
            w.writerow({"claim_id": cid, "paper": "X: Someone 2024", "figure_or_table": "Table 1",
                        "setting": "ImageNet, ViT-B", "method": method, "metric": metric, "value": value, "epsilon": "1",
                        "delta": "1e-5", "source": "Table 1", **extra})
    return path


def write_run(folder: Path, rows: list[dict], figures=("curve",), status="ok", error=None, started="2024-01-01T00:00:00"):
    """A results folder as the runner leaves it."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"status": status, "error": error, "started": started, "duration_s": 12.34, "seed": 0,
                "git": {"commit": "abc123def", "dirty": True}, "cache_key": "k" * 64,
                "device": {"requested": "cpu", "cpu": "Test CPU", "gpu_name": None}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    if rows:
        cols = list(dict.fromkeys(k for r in rows for k in r))
        with open(folder / "metrics.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
    for i, name in enumerate(figures):
        (folder / "figures").mkdir(exist_ok=True)
        (folder / "figures" / f"{name}.png").write_bytes(png_bytes(rgb=(40 * i % 255, 100, 150)))


def row(metric, value, method="", seed="", claim_id="", status="ok", reason="", **extra):
    return {"experiment": "00_tiny", "method": method, "epsilon": "1.0", "delta": "1e-05", "seed": seed,
            "metric": metric, "value": value, "status": status, "reason": reason, "claim_id": claim_id, **extra}


PAIRS = [(0.90, 0.80), (0.92, 0.81), (0.91, 0.83), (0.93, 0.82), (0.90, 0.84), (0.92, 0.80)]


@pytest.fixture
def results(fake_repo):
    """Fake repo with claims, a good run of 00_tiny feeding them, and a failed 01_down."""
    write_claims(fake_repo / "references" / "paper_values.csv")
    rows = []
    for s, (a, b) in enumerate(PAIRS):
        rows.append(row("acc", a, "a", s, "X-a-beats-b", dataset="digits"))
        rows.append(row("acc", b, "b", s, "X-a-beats-b", dataset="digits"))
        rows.append(row("acc", 0.5 + s / 100, "big", s, "X-imagenet-acc", dataset="digits"))
    rows.append(row("step_time_s", 0.3, "mixed", 0, "X-time-s"))
    rows.append(row("step_time_s", 0.2, "nonprivate", 0, "X-nondp-time-s"))
    rows.append(row("noise_multiplier", 8.47, "least_squares", claim_id="X-sigma-eps1", comparison="value", exact=True))
    rows.append(row("acc", 0.3, "typo", 0, "X-typo-claim"))
    rows.append(row("acc", "", "c", 0, status="failed", reason="diverged: loss is NaN"))
    base = fake_repo / "results" / "cpu"
    write_run(base / "00_tiny", rows, figures=("curve", "bars"))
    write_run(base / ".failed" / "01_down", [], figures=(), status="failed",
              error={"name": "RuntimeError", "message": "boom in 01_down"})
    return fake_repo


def test_summary_verdicts_and_sections(results):
    rep = report.build("cpu")
    by_id = {c.claim_id: c for c in rep.claims}
    assert list(by_id) == [c[0] for c in CLAIMS]
    assert by_id["X-a-beats-b"].verdict.verdict == verdicts.REPRODUCED_QUALITATIVELY
    assert by_id["X-sigma-eps1"].verdict.verdict == verdicts.CONSISTENT and by_id["X-sigma-eps1"].section == "check"
    assert by_id["X-imagenet-acc"].verdict.verdict == verdicts.NOT_COMPARABLE  # analogue, never judged
    assert by_id["X-never-run"].verdict.verdict == verdicts.NOT_RUN
    assert by_id["X-prev-best"].section == "context"
    assert by_id["X-a-beats-b"].notebooks == ["00_tiny"]
    assert rep.unknown_claims == {"X-typo-claim": ["00_tiny"]}
    # the tally counts experiments only; analogues, checks and cited context apart
    assert rep.counts()[verdicts.REPRODUCED_QUALITATIVELY] == 1 and rep.counts()[verdicts.NOT_RUN] == 1
    assert sum(rep.counts().values()) == 2 and len(rep.of("analogue")) == 3
    # units that cannot match become ratios to non-private training, the paper's from its own table
    assert by_id["X-time-s"].ratio == "as ratios to X-nondp-time-s: paper 2.643x, ours 1.5x (ratio of our means)"

    path = report.write(rep)
    assert path == results / "results" / "cpu" / "report.html"
    page = path.read_text()
    for cid, *_ in CLAIMS:
        assert f'id="claim-{cid}"' in page
    assert page.count('class="verdict v-qual"') >= 1 and page.count('class="verdict v-notrun"') >= 1
    assert "sign-flip" in page and "analogue: our rows come from" in page
    assert "X-typo-claim" in page  # unknown ids are listed, not silently dropped
    for text in verdicts.RULES.values():
        assert html_text(text)[:60] in page
    # notebook sections: manifest summary, failures with their errors, figures
    assert "abc123def (dirty)" in page and "12.3 s" in page and "Test CPU" in page
    assert "RuntimeError: boom in 01_down" in page
    assert "diverged: loss is NaN" in page and "1 of 23 metric rows failed" in page
    assert page.count("data:image/png;base64,") == 3  # the forest plot and two figures
    # the picture and the tally open the report, before every table
    assert page.index('id="forest"') < page.index('id="tally"') < page.index('id="summary"') \
        < page.index('id="checks"') < page.index('id="context"') < page.index('id="rules"') < page.index('id="00_tiny"')
    assert 'alt="forest plot of the empirical claims"' in page


def html_text(s: str) -> str:
    import html

    return html.escape(s)


def test_report_is_self_contained(results):
    page = report.write_report("cpu").read_text()
    assert "<script" not in page.lower() and "<link" not in page.lower() and "@import" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//|file:)""", page, re.I)
    assert "url(" not in page
    srcs = re.findall(r'<img[^>]*src="([^"]+)"', page)
    assert len(srcs) == 3
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    hrefs = re.findall(r'href="([^"]+)"', page)
    ids = set(re.findall(r'id="([^"]+)"', page))
    assert hrefs and all(h.startswith("#") and h[1:] in ids for h in hrefs)  # in-page links only, none dangling


def test_report_cli_summary_and_output(results, capsys, tmp_path):
    assert main(["report", "--profile", "cpu", "--summary"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    path = results / "results" / "cpu" / "report.html"
    assert out[0] == str(path) and out[-1] == f"report: {path}"
    table = "\n".join(out)
    for cid, *_ in CLAIMS:
        line = next(ln for ln in out if ln.startswith(cid + " "))
        assert any(v in line for v in verdicts.VERDICTS + verdicts.CHECK_VERDICTS + (verdicts.CONTEXT,)), line
    # the tally: one line per verdict, analogues, consistency checks and cited context apart
    assert "2 claims judged as experiments:" in table
    for v in verdicts.EMPIRICAL_VERDICTS:
        assert any(ln.strip().endswith(v) and ln.strip().split()[0].isdigit() for ln in out), v
    assert "3 analogues: not comparable" in table
    assert "paper 2.643x, ours 1.5x" in next(ln for ln in out if ln.startswith("X-time-s "))
    assert "1 consistency checks (closed forms, accountant properties; never counted as reproductions): 1 consistent" in table
    assert "1 cited context" in table
    assert "X-typo-claim" in table
    other = tmp_path / "elsewhere" / "r.html"
    assert main(["report", "--profile", "cpu", "-o", str(other)]) == 0
    assert capsys.readouterr().out.strip() == str(other) and other.read_text().startswith("<!DOCTYPE html>")


@pytest.mark.parametrize(
    "content, match",
    [
        ("claim_id,paper\nA-x,p\n", "must have the columns"),
        (",".join(report.CLAIM_COLUMNS) + "\nA-x,p,f,s,m,acc,1,%,,,,,,,,,,src\nA-x,p,f,s,m,acc,2,%,,,,,,,,,,src\n",
         "duplicate claim_id 'A-x'"),
        (",".join(report.CLAIM_COLUMNS) + "\nA-x,p,f,s,m,acc,high,%,,,,,,,,,,src\n", "value 'high' of A-x is not a number"),
        (",".join(report.CLAIM_COLUMNS) + "\n,p,f,s,m,acc,1,%,,,,,,,,,,src\n", "line 2: empty claim_id"),
        (",".join(report.CLAIM_COLUMNS) + "\nA-x,p,f,s,a >= b,acc,,%,,,claim,noninferiority,,,,,,src\n",
         "A-x: a noninferiority claim needs a margin"),
        (",".join(report.CLAIM_COLUMNS) + "\nA-x,p,f,s,m,acc,1,%,,,,,,,,,A-y,src\n", "ratio_to 'A-y' of A-x"),
    ],
)
def test_bad_references_are_one_line_errors(results, capsys, content, match):
    bad = results / "bad.csv"
    bad.write_text(content)
    assert main(["report", "--profile", "cpu", "--references", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]
    assert main(["report", "--profile", "cpu", "--references", str(results / "nope.csv")]) == 2
    assert "not found" in capsys.readouterr().err


def test_real_references_give_one_row_per_claim(fake_repo):
    dest = fake_repo / "references" / "paper_values.csv"
    dest.parent.mkdir()
    shutil.copy(REPO / "references" / "paper_values.csv", dest)
    rep = report.build("cpu")
    with open(dest, newline="") as fh:
        n = sum(1 for _ in csv.DictReader(fh))
    assert len(rep.claims) == n >= 12
    assert all(c.verdict.verdict in (verdicts.NOT_RUN, verdicts.CONTEXT) for c in rep.claims)
    page = report.render("cpu", rep.entries, rep)
    assert all(f'id="claim-{c.claim_id}"' in page for c in rep.claims)
    text = report.text_summary(rep)
    n_exp = len(rep.of("experiment"))
    assert all(c.claim_id in text for c in rep.claims) and f"{n_exp} claims judged as experiments:" in text
    assert f"  {n_exp:3d}  not run" in text and "7 consistency checks" in text and "2 cited context" in text


def test_report_without_references_still_lists_notebooks(fake_repo):
    rep = report.build("cpu")
    assert rep.references is None and rep.claims == []
    page = report.render("cpu", rep.entries, rep)
    assert "no claims to compare" in page and 'id="00_tiny"' in page and 'id="01_down"' in page


def test_make_reproduce_prints_report_path_and_summary():
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    # -n prints the recipe without running it; the venv stamp may be stale, which only adds lines
    out = subprocess.run(["make", "-n", "-C", str(REPO), "reproduce", "PROFILE=smoke"], capture_output=True,
                         text=True, timeout=30).stdout
    recipe = out[out.index("reproduce --profile smoke"):]
    assert "report --profile smoke --summary" in recipe
