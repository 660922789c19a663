"""The report in a real browser: headless Chromium renders it offline with no broken image
and no console message, and a screenshot is kept as a test artifact.

Chromium comes from Debian's package (`.ci/run` installs it); `$DPBENCH_CHROMIUM` may name
another binary. Without one the tests are skipped with that reason, never passed.

How it checks: a copy of the report gets a small probe script (the report itself has no
scripts) that, after the load event, writes into the DOM how many images there are, which
failed to decode, and which resources were fetched from anywhere but a data: URI;
`--dump-dom` returns that DOM. Console messages and page errors are read from Chromium's
log (`--enable-logging=stderr`). Name resolution is switched off, so anything that tried
the network would fail loudly. Two control pages (a broken image, a console error) prove
the probe and the log check can fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from dpbench.workbench import report

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "results" / "test-artifacts"  # git-ignored (results/*)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--hide-scrollbars", "--host-resolver-rules=MAP * ~NOTFOUND"]

PROBE = """<script>
window.__dpbenchErrors = [];
window.addEventListener("error", function (e) { window.__dpbenchErrors.push(String(e.message || e.type)); }, true);
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                   .map(function (i) { return i.alt || "(no alt)"; });
  var fetched = performance.getEntriesByType("resource").map(function (r) { return r.name; })
                   .filter(function (n) { return n.indexOf("data:") !== 0; });
  var out = document.createElement("pre");
  out.id = "dpbench-probe";
  var forest = document.querySelector("figure.forest img");
  out.textContent = JSON.stringify({images: imgs.length, broken: broken, fetched: fetched,
                                    errors: window.__dpbenchErrors, title: document.title,
                                    forest: forest ? [forest.naturalWidth, forest.naturalHeight] : null,
                                    forestFirst: !!forest && imgs[0] === forest});
  document.body.appendChild(out);
});
</script>"""


def chromium() -> str | None:
    """The Chromium binary: $DPBENCH_CHROMIUM, /usr/bin/chromium, or chromium on PATH."""
    for cand in (os.environ.get("DPBENCH_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return None


CHROMIUM = chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium not found (/usr/bin/chromium, PATH or $DPBENCH_CHROMIUM); "
           "install it with `apt-get install chromium` (.ci/run does) to run the browser test",
)


def run_chromium(page: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    profile = tmp / f"chromium-profile-{len(list(tmp.glob('chromium-profile-*')))}"
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *extra, page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, cwd=tmp)


def console_messages(stderr: str) -> list[str]:
    """Lines of Chromium's log that come from the page's console (or its uncaught errors)."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def probe(page_html: str, tmp: Path, name: str) -> tuple[dict, list[str]]:
    """Load `page_html` with the probe; return the probe's findings and console lines."""
    path = tmp / f"{name}.probe.html"
    path.write_text(page_html.replace("<head>", "<head>" + PROBE, 1) if "<head>" in page_html else PROBE + page_html)
    res = run_chromium(path, tmp, "--virtual-time-budget=5000", "--dump-dom")
    assert res.returncode == 0, res.stderr[-2000:]
    m = re.search(r'<pre id="dpbench-probe">(.*?)</pre>', res.stdout, re.S)
    assert m, f"the probe did not report (load event never fired?):\n{res.stdout[-1000:]}"
    import html

    return json.loads(html.unescape(m.group(1))), console_messages(res.stderr)


@pytest.fixture
def report_page(fake_repo):
    """A report with the forest plot, figures, claims, failures and a failed attempt (see test_report)."""
    from test_report import CLAIMS, PAIRS, row, write_claims, write_run

    write_claims(fake_repo / "references" / "paper_values.csv")
    rows = []
    for s, (a, b) in enumerate(PAIRS):
        rows += [row("acc", a, "a", s, CLAIMS[0][0]), row("acc", b, "b", s, CLAIMS[0][0])]
    rows.append(row("acc", "", "c", 0, status="failed", reason="diverged"))
    base = fake_repo / "results" / "cpu"
    write_run(base / "00_tiny", rows, figures=("curve", "bars", "heatmap"))
    write_run(base / ".failed" / "01_down", [], figures=(), status="failed", error={"name": "E", "message": "boom"})
    return report.write_report("cpu")


def test_report_renders_offline_without_errors(report_page, tmp_path):
    found, console = probe(report_page.read_text(), tmp_path, "report")
    assert found["images"] == 4, found  # the forest plot and three figures
    assert found["broken"] == [], found
    # the forest plot decodes, is a real picture, and is the first image on the page
    assert found["forest"] and found["forest"][0] >= 800 and found["forest"][1] >= 200, found
    assert found["forestFirst"], found
    assert found["fetched"] == [], f"the report fetched external resources: {found['fetched']}"
    assert found["errors"] == [] and console == [], (found["errors"], console)
    assert found["title"] == "dpbench report: cpu"

    shot = tmp_path / "report.png"
    res = run_chromium(report_page, tmp_path, "--window-size=1280,2400", f"--screenshot={shot}")
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a rendered page, not a blank one
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "report-screenshot.png")
    shutil.copy(report_page, ARTIFACTS / "report.html")


def test_probe_catches_broken_images_and_console_errors(tmp_path):
    """Controls: the checks above would fail on a broken image or a console error."""
    bad = ('<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>'
           '<img alt="broken" src="data:image/png;base64,AAAA">'
           '<script>console.error("dpbench-control-error");</script></body></html>')
    found, console = probe(bad, tmp_path, "control")
    assert found["images"] == 1 and found["broken"] == ["broken"]
    assert any("dpbench-control-error" in line for line in console)
