"""The HTML report of one profile: our numbers beside the papers', every notebook's figures.

`write_report(profile)` reads `results/<profile>/<NB>/` (manifest.json, metrics.csv,
figures/*.png), `results/<profile>/.failed/<NB>/` and `references/paper_values.csv`, and
writes `results/<profile>/report.html`: one self-contained file (images embedded as base64,
no scripts, no external resources) that opens offline. It holds

* a summary table with one row per claim of paper_values.csv: the paper's value and
  setting, ours (mean and 95% CI across seeds) and our setting, and a verdict decided by
  `dpbench.workbench.verdicts` from the metrics rows that carry the claim's `claim_id`;
* the verdict rules, written out;
* one section per notebook: status, manifest summary (commit, device, duration), its
  claims, its figures, its failed rows and its last failed attempt with the error.

Reading uses only the standard library (csv, json), so `dpbench report` is quick.
"""

from __future__ import annotations

import base64
import csv
import html
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpbench.workbench import runner
from dpbench.workbench import verdicts
from dpbench.errors import UserError
from dpbench.workbench.provenance import now_iso
from dpbench.atomic import write_atomic

CLAIM_COLUMNS = ["claim_id", "paper", "figure_or_table", "setting", "method", "metric", "value", "epsilon",
                 "delta", "source"]
REFERENCES = Path("references") / "paper_values.csv"
VERDICT_CLASS = {
    verdicts.REPRODUCED_QUALITATIVELY: "v-qual",
    verdicts.REPRODUCED_WITHIN_TOLERANCE: "v-tol",
    verdicts.NOT_RESOLVED: "v-unres",
    verdicts.NOT_REPRODUCED: "v-no",
    verdicts.NOT_RUN: "v-notrun",
}

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
table.meta { border-collapse: collapse; font-size: 0.9em; }
table.meta td, table.meta th { text-align: left; padding: 2px 12px 2px 0; vertical-align: top; }
table.claims { border-collapse: collapse; font-size: 0.85em; width: 100%; }
table.claims th, table.claims td { border-bottom: 1px solid #ddd; padding: 4px 6px; text-align: left; vertical-align: top; }
table.claims tr.paper th { background: #f3f3f3; font-size: 1.05em; padding-top: 10px; }
table.claims td.num { white-space: nowrap; }
table.claims .small, .small { color: #555; font-size: 0.9em; }
table.rows { border-collapse: collapse; font-size: 0.85em; }
table.rows td, table.rows th { border-bottom: 1px solid #eee; padding: 2px 8px; text-align: left; }
.status { font-weight: bold; padding: 1px 8px; border-radius: 4px; color: white; }
.ok { background: #2e7d32; } .failed { background: #c62828; } .missing { background: #757575; }
.verdict { font-weight: bold; padding: 1px 6px; border-radius: 4px; white-space: nowrap; }
.v-qual { background: #c8e6c9; } .v-tol { background: #a5d6a7; } .v-unres { background: #fff3c4; }
.v-no { background: #ffcdd2; } .v-notrun { background: #e0e0e0; }
figure { display: inline-block; margin: 0.5em 1em 0.5em 0; vertical-align: top; }
figure img { max-width: 540px; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
pre.error { background: #fbe9e7; padding: 0.5em; white-space: pre-wrap; }
dl.rules dt { font-weight: bold; margin-top: 0.5em; } dl.rules dd { margin-left: 1.5em; }
"""


# --------------------------------------------------------------------------- reading


@dataclass
class NotebookResult:
    """What the report shows for one notebook: its last good run and last failed attempt."""

    notebook: str
    folder: Path
    manifest: dict[str, Any] | None
    failed_manifest: dict[str, Any] | None
    figures: list[Path] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def status(self) -> str:
        if self.manifest and self.manifest.get("status") == "ok":
            return "ok"
        return "failed" if self.failed_manifest else "missing"

    @property
    def failed_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if str(r.get("status", "")).strip() == "failed"]


@dataclass
class ClaimResult:
    """One summary row: the paper's claim, our verdict, the notebooks our rows came from."""

    claim: dict[str, str]
    verdict: verdicts.Verdict
    notebooks: list[str]

    @property
    def claim_id(self) -> str:
        return self.claim["claim_id"]


@dataclass
class Report:
    """Everything on the page, before rendering."""

    profile: str
    entries: list[NotebookResult]
    claims: list[ClaimResult]
    references: Path | None
    unknown_claims: dict[str, list[str]] = field(default_factory=dict)  # claim_id -> notebooks

    def counts(self) -> dict[str, int]:
        return {v: sum(c.verdict.verdict == v for c in self.claims) for v in verdicts.VERDICTS}


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.csv as dicts of strings (blank cells -> "")."""
    try:
        with open(path, newline="") as fh:
            return [dict(r) for r in csv.DictReader(fh)]
    except (OSError, csv.Error, UnicodeDecodeError):
        return []


def collect(profile: str, repo: str | os.PathLike | None = None, results: str | os.PathLike | None = None) -> list[NotebookResult]:
    """One entry per notebook of the repository (plus result folders of notebooks that no
    longer exist), in name order, with the rows of its last good run."""
    repo = Path(repo) if repo else runner.find_repo()
    root = Path(results) if results else runner.results_root(repo)
    base = root / profile
    names = set(runner.list_notebooks(repo))
    if base.is_dir():
        names |= {p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")}
    out = []
    for nb in sorted(names):
        folder = base / nb
        figures = sorted((folder / "figures").glob("*.png")) if (folder / "figures").is_dir() else []
        manifest = runner.read_manifest(folder)
        rows = read_rows(folder / "metrics.csv") if manifest and manifest.get("status") == "ok" else []
        out.append(NotebookResult(nb, folder, manifest, runner.read_manifest(base / runner.FAILED_DIR / nb), figures, rows))
    return out


def load_claims(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of references/paper_values.csv, checked: exactly CLAIM_COLUMNS, unique
    non-empty claim ids, numbers where numbers belong. UserError names the file and line."""
    path = Path(path)
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            rows = list(reader)
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if header != CLAIM_COLUMNS:
        raise UserError(f"{path} must have the columns {','.join(CLAIM_COLUMNS)}; it has {','.join(header)}")
    seen: set[str] = set()
    for line, row in enumerate(rows, start=2):
        cid = (row.get("claim_id") or "").strip()
        if not cid:
            raise UserError(f"{path} line {line}: empty claim_id; give every row an id")
        if cid in seen:
            raise UserError(f"{path} line {line}: duplicate claim_id {cid!r}; claim ids must be unique")
        seen.add(cid)
        for col in ("value", "epsilon", "delta"):
            text = (row.get(col) or "").strip()
            if text:
                try:
                    float(text)
                except ValueError:
                    raise UserError(f"{path} line {line}: {col} {text!r} of {cid} is not a number") from None
        row["claim_id"] = cid
    return rows


def judge_claims(claims: list[dict[str, str]], entries: list[NotebookResult]) -> tuple[list[ClaimResult], dict[str, list[str]]]:
    """Verdicts of every claim from the rows that carry its claim_id, and the claim ids used
    in the metrics that paper_values.csv does not know (claim_id -> notebooks)."""
    tagged: dict[str, list[tuple[str, dict]]] = {}
    for e in entries:
        for r in e.rows:
            cid = str(r.get("claim_id") or "").strip()
            if cid:
                tagged.setdefault(cid, []).append((e.notebook, r))
    by_nb = {e.notebook: e.rows for e in entries}
    out = []
    for claim in claims:
        pairs = tagged.get(claim["claim_id"], [])
        nbs = sorted({nb for nb, _ in pairs})
        context = [r for nb in nbs for r in by_nb[nb]]
        out.append(ClaimResult(claim, verdicts.judge(claim, [r for _, r in pairs], context), nbs))
    known = {c["claim_id"] for c in claims}
    unknown = {cid: sorted({nb for nb, _ in pairs}) for cid, pairs in sorted(tagged.items()) if cid not in known}
    return out, unknown


def build(profile: str, repo: str | os.PathLike | None = None, results: str | os.PathLike | None = None,
          references: str | os.PathLike | None = None) -> Report:
    """Read everything the report of `profile` shows. Without a references file the
    summary is empty (and says so)."""
    runner.check_profile(profile)
    repo = Path(repo) if repo else runner.find_repo()
    root = Path(results) if results else runner.results_root(repo)
    entries = collect(profile, repo, root)
    ref = Path(references) if references else repo / REFERENCES
    if references and not ref.is_file():
        raise UserError(f"references file {ref} not found; pass an existing paper_values.csv")
    claims = load_claims(ref) if ref.is_file() else []
    results_, unknown = judge_claims(claims, entries)
    return Report(profile, entries, results_, ref if ref.is_file() else None, unknown)


# --------------------------------------------------------------------------- HTML


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    name = html.escape(path.stem)
    return (f'<figure><img alt="{name}" src="data:image/png;base64,{data}">'
            f"<figcaption>{name}</figcaption></figure>")


def _meta_rows(m: dict[str, Any]) -> list[tuple[str, str]]:
    git = m.get("git") or {}
    commit = git.get("commit") or "unknown"
    if git.get("dirty"):
        commit += " (dirty)"
    dev = m.get("device") or {}
    device = str(dev.get("requested", ""))
    if dev.get("gpu_name"):
        device += f" ({dev['gpu_name']})"
    elif dev.get("cpu"):
        device += f" ({dev['cpu']})"
    rows = [
        ("status", str(m.get("status", ""))),
        ("commit", commit),
        ("device", device),
        ("started", str(m.get("started", ""))),
        ("duration", f"{float(m.get('duration_s') or 0):.1f} s"),
        ("seed", str(m.get("seed", ""))),
        ("cache key", str(m.get("cache_key", ""))[:12]),
    ]
    privacy = m.get("privacy")
    if isinstance(privacy, dict) and privacy.get("accountant"):
        rows.append(("privacy ledger", f"accountant {privacy.get('accountant')}, delta {privacy.get('delta')}"))
    if m.get("error"):
        rows.append(("error", f"{m['error'].get('name', '')}: {m['error'].get('message', '')}"))
    return rows


def _meta_table(m: dict[str, Any]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in _meta_rows(m))
    return f'<table class="meta">{body}</table>'


def _badge(verdict: str) -> str:
    return f'<span class="verdict {VERDICT_CLASS.get(verdict, "v-notrun")}">{_e(verdict)}</span>'


def _failed_rows_table(rows: list[dict[str, Any]], limit: int = 50) -> str:
    cols = ["metric", "method", "epsilon", "seed", "reason"]
    head = "".join(f"<th>{c}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_e(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows[:limit])
    more = f"<p class=\"small\">... and {len(rows) - limit} more failed rows in metrics.csv.</p>" if len(rows) > limit else ""
    return f'<table class="rows"><tr>{head}</tr>{body}</table>{more}'


def render_notebook(r: NotebookResult, profile: str, claims: list[ClaimResult] = ()) -> str:
    """The section of one notebook: status badge, manifest facts, its claims, figures,
    failed rows and last failed attempt."""
    parts = [f'<h2 id="{html.escape(r.notebook)}">{html.escape(r.notebook)} '
             f'<span class="status {r.status}">{r.status}</span></h2>']
    if r.manifest:
        parts.append(_meta_table(r.manifest))
    else:
        parts.append(f"<p>No successful run. Run <code>dpbench run {html.escape(r.notebook)} "
                     f"--profile {html.escape(profile)}</code>.</p>")
    fm = r.failed_manifest
    if fm and (not r.manifest or str(fm.get("started", "")) > str(r.manifest.get("started", ""))):
        err = fm.get("error") or {}
        parts.append(f'<p>Last attempt failed ({html.escape(str(fm.get("started", "")))}), executed copy in '
                     f'<code>.failed/{html.escape(r.notebook)}/</code>:</p>'
                     f'<pre class="error">{html.escape(str(err.get("name", "")))}: '
                     f'{html.escape(str(err.get("message", "")))}</pre>')
    mine = [c for c in claims if r.notebook in c.notebooks]
    if mine:
        items = "".join(f'<li><a href="#claim-{_e(c.claim_id)}">{_e(c.claim_id)}</a> {_badge(c.verdict.verdict)}</li>'
                        for c in mine)
        parts.append(f"<p>Claims fed by this notebook:</p><ul>{items}</ul>")
    failed = r.failed_rows
    if failed:
        parts.append(f"<p>{len(failed)} of {len(r.rows)} metric rows failed:</p>" + _failed_rows_table(failed))
    if r.figures:
        parts.append("<div>" + "".join(_img(p) for p in r.figures) + "</div>")
    elif r.manifest:
        parts.append("<p>No figures.</p>")
    return "<section>" + "\n".join(parts) + "</section>"


def _paper_cell(c: dict[str, str]) -> str:
    value = c.get("value", "").strip()
    head = f"<b>{_e(value)}</b> {_e(c.get('metric'))}" if value else f"<b>{_e(c.get('method'))}</b> ({_e(c.get('metric'))})"
    priv = []
    if c.get("epsilon", "").strip():
        priv.append(f"eps={c['epsilon'].strip()}")
    if c.get("delta", "").strip():
        priv.append(f"delta={c['delta'].strip()}")
    method = "" if not value else f"{_e(c.get('method'))}; "
    return (f"{head}<br><span class=\"small\">{method}{_e(c.get('setting'))}"
            f"{'; ' + _e(', '.join(priv)) if priv else ''}</span>")


def _ours_cell(cr: ClaimResult, profile: str) -> str:
    v = cr.verdict
    if not v.ours and not v.our_setting:
        return '<span class="small">-</span>'
    where = ", ".join(f'<a href="#{_e(nb)}">{_e(nb)}</a>' for nb in cr.notebooks)
    return (f"{_e(v.ours)}<br><span class=\"small\">{_e(v.our_setting)}"
            f"{' (' + where + ', profile ' + _e(profile) + ')' if where else ''}</span>")


def _paper_group(c: dict[str, str]) -> str:
    """Group label of a claim: its letter prefix ("A", "B", ...) or its paper."""
    cid = c["claim_id"]
    return cid.split("-", 1)[0] if "-" in cid else c.get("paper", "")


def render_summary(rep: Report) -> str:
    """The summary table: one row per claim, grouped by paper."""
    if rep.references is None:
        return ('<section id="summary"><h2>Summary: our numbers beside the papers\'</h2>'
                f"<p>No {_e(REFERENCES)} in this checkout: no claims to compare.</p></section>")
    counts = rep.counts()
    count_text = ", ".join(f"{_badge(v)} {n}" for v, n in counts.items())
    rows = []
    group = None
    for cr in rep.claims:
        c = cr.claim
        g = _paper_group(c)
        if g != group:
            group = g
            papers = sorted({x.claim.get("paper", "") for x in rep.claims if _paper_group(x.claim) == g})
            rows.append(f'<tr class="paper"><th colspan="4">{_e(" / ".join(papers))}</th></tr>')
        rows.append(
            f'<tr id="claim-{_e(cr.claim_id)}"><td><code>{_e(cr.claim_id)}</code><br>'
            f'<span class="small">{_e(c.get("figure_or_table"))}; source: {_e(c.get("source"))}</span></td>'
            f"<td>{_paper_cell(c)}</td><td>{_ours_cell(cr, rep.profile)}</td>"
            f"<td>{_badge(cr.verdict.verdict)}<br><span class=\"small\">{_e(cr.verdict.rule)}</span></td></tr>"
        )
    unknown = ""
    if rep.unknown_claims:
        items = "".join(f"<li><code>{_e(cid)}</code> in {_e(', '.join(nbs))}</li>" for cid, nbs in rep.unknown_claims.items())
        unknown = (f"<p>Rows tagged with claim ids that {_e(REFERENCES)} does not have (not judged):</p>"
                   f"<ul>{items}</ul>")
    return (
        '<section id="summary"><h2>Summary: our numbers beside the papers\'</h2>'
        f"<p>{len(rep.claims)} claims from <code>{_e(REFERENCES)}</code>: {count_text}. "
        'Ours come from this profile\'s metrics rows carrying the claim\'s <code>claim_id</code>; '
        'see <a href="#rules">how verdicts are decided</a>. A paper value is never replaced by ours: the two '
        "columns are different settings unless the rule says <i>value</i>.</p>"
        '<table class="claims"><tr><th>claim</th><th>paper (value, setting)</th><th>ours (value, setting)</th>'
        f"<th>verdict and the rule that decided it</th></tr>{''.join(rows)}</table>{unknown}</section>"
    )


def render_rules() -> str:
    """The verdict rules, as text (they are the rules dpbench.workbench.verdicts applies)."""
    items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in verdicts.RULES.items())
    names = "".join(f"<li>{_badge(v)}</li>" for v in verdicts.VERDICTS)
    return (
        '<section id="rules"><h2>How verdicts are decided</h2>'
        f"<p>Verdicts:</p><ul>{names}</ul>"
        "<p>A difference between arms counts only when it exceeds its 95% confidence interval across seeds; "
        "otherwise the verdict is <i>not resolved at this scale</i>. The rules:</p>"
        f'<dl class="rules">{items}</dl></section>'
    )


def render(profile: str, entries: list[NotebookResult], rep: Report | None = None) -> str:
    """The whole page."""
    rep = rep or Report(profile, entries, [], None)
    counts = {s: sum(e.status == s for e in entries) for s in ("ok", "failed", "missing")}
    toc = "".join(f'<li><a href="#{html.escape(e.notebook)}">{html.escape(e.notebook)}</a> '
                  f'<span class="status {e.status}">{e.status}</span></li>' for e in entries)
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>dpbench report: {html.escape(profile)}</title><style>{CSS}</style></head><body>"
        f"<h1>dpbench report: profile <code>{html.escape(profile)}</code></h1>"
        f"<p>Generated {html.escape(now_iso())}. Notebooks: {summary}.</p>"
        f'<ul><li><a href="#summary">summary of claims</a></li><li><a href="#rules">verdict rules</a></li>{toc}</ul>'
        + render_summary(rep)
        + render_rules()
        + "\n".join(render_notebook(e, profile, rep.claims) for e in entries)
        + "</body></html>\n"
    )


# --------------------------------------------------------------------------- text


def _clip(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _short_ours(v: verdicts.Verdict) -> str:
    est = v.estimate
    if est is None:
        return v.ours or "-"
    if est.exact:
        return f"{verdicts.fmt(est.mean)} (exact)"
    if est.half_width is None:
        return f"{verdicts.fmt(est.mean)} (n={est.n}, no CI)"
    return f"{verdicts.fmt(est.mean)} +/- {verdicts.fmt(est.half_width)} (n={est.n})"


def text_summary(rep: Report) -> str:
    """The summary table as plain text, for the terminal (`dpbench report --summary`)."""
    if rep.references is None:
        return f"no {REFERENCES}: no claims to compare"
    w_id = max([len("claim"), *(len(c.claim_id) for c in rep.claims)])
    lines = [f"{'claim':<{w_id}}  {'paper':<24}  {'ours':<30}  verdict", "-" * (w_id + 90)]
    for cr in rep.claims:
        c = cr.claim
        paper = c.get("value", "").strip() or c.get("method", "")
        lines.append(f"{cr.claim_id:<{w_id}}  {_clip(paper, 24):<24}  {_clip(_short_ours(cr.verdict), 30):<30}  "
                     f"{cr.verdict.verdict}")
    counts = ", ".join(f"{n} {v}" for v, n in rep.counts().items())
    lines.append("-" * (w_id + 90))
    lines.append(f"{len(rep.claims)} claims: {counts}")
    if rep.unknown_claims:
        lines.append("claim ids in metrics but not in paper_values.csv: " + ", ".join(rep.unknown_claims))
    return "\n".join(lines)


# --------------------------------------------------------------------------- writing


def write(rep: Report, output: str | os.PathLike | None = None, repo=None, results=None) -> Path:
    """Render `rep` and write it (atomically) to `output` or results/<profile>/report.html."""
    if output is None:
        root = Path(results) if results else runner.results_root(Path(repo) if repo else runner.find_repo())
        output = root / rep.profile / "report.html"
    return write_atomic(Path(output), render(rep.profile, rep.entries, rep))


def write_report(profile: str, repo: str | os.PathLike | None = None, results: str | os.PathLike | None = None,
                 references: str | os.PathLike | None = None, output: str | os.PathLike | None = None) -> Path:
    """Write `results/<profile>/report.html` (or `output`), atomically, and return its path."""
    rep = build(profile, repo, results, references)
    return write(rep, output, repo, results)
