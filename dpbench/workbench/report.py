"""The HTML report of one profile: our numbers beside the papers', every notebook's figures.

`write_report(profile)` reads `results/<profile>/<NB>/` (manifest.json, metrics.csv,
figures/*.png), `results/<profile>/.failed/<NB>/` and `references/paper_values.csv`, and
writes `results/<profile>/report.html`: one self-contained file (images embedded as base64,
no scripts, no external resources) that opens offline. It holds, in order,

* a forest plot of every empirical claim (our effect with its 95% CI, the claimed side and
  any margin marked, coloured by verdict, grouped by paper) and the tally: one line per
  verdict, analogues, consistency checks and cited context counted apart;
* the claims table: per claim the paper's value and setting in the paper's unit, ours (in
  the paper's unit, or both as ratios to non-private training where units cannot match)
  and our setting, and the verdict decided by `dpbench.workbench.verdicts` with its rule;
* the consistency checks (closed-form numbers, accountant properties) in their own table,
  and the numbers the papers cite from earlier work;
* the verdict rules, written out;
* one section per notebook: status, manifest summary (commit, device, duration), its
  claims, its figures, its failed rows and its last failed attempt with the error.

Reading uses only the standard library (csv, json) plus numpy; matplotlib is imported only
to draw the forest plot.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpbench.workbench import params, runner, verdicts
from dpbench.workbench.results import STYLE_FILE
from dpbench.errors import UserError
from dpbench.workbench.provenance import now_iso
from dpbench.atomic import write_atomic

CLAIM_COLUMNS = ["claim_id", "paper", "figure_or_table", "setting", "method", "metric", "value", "unit", "epsilon",
                 "delta", "kind", "test", "margin", "margin_source", "setting_keys", "combine", "ratio_to", "source"]
REFERENCES = Path("references") / "paper_values.csv"
VERDICT_CLASS = {
    verdicts.REPRODUCED_QUALITATIVELY: "v-qual",
    verdicts.REPRODUCED_WITHIN_TOLERANCE: "v-tol",
    verdicts.NOT_REPRODUCED: "v-no",
    verdicts.LEANS_AGAINST: "v-lean",
    verdicts.INCONCLUSIVE: "v-unres",
    verdicts.NOT_COMPARABLE: "v-analogue",
    verdicts.NOT_RUN: "v-notrun",
    verdicts.CONSISTENT: "v-tol",
    verdicts.INCONSISTENT: "v-no",
    verdicts.CONTEXT: "v-analogue",
}
# Forest-plot colours, one per verdict (the badges use lighter versions of the same hues).
VERDICT_COLOUR = {
    verdicts.REPRODUCED_QUALITATIVELY: "#2e7d32",
    verdicts.REPRODUCED_WITHIN_TOLERANCE: "#1b5e20",
    verdicts.NOT_REPRODUCED: "#c62828",
    verdicts.LEANS_AGAINST: "#ef6c00",
    verdicts.INCONCLUSIVE: "#f9a825",
    verdicts.NOT_COMPARABLE: "#78909c",
    verdicts.NOT_RUN: "#9e9e9e",
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
.v-lean { background: #ffe0b2; } .v-no { background: #ffcdd2; } .v-notrun { background: #e0e0e0; }
.v-analogue { background: #eceff1; }
figure.forest img { max-width: 100%; }
table.tally td { padding: 1px 10px 1px 0; } table.tally td.n { text-align: right; font-weight: bold; }
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
    """One claim row: the paper's claim, our verdict, the notebooks our rows came from, and
    (for a claim with `ratio_to`) both sides as ratios to the paper's own baseline row."""

    claim: dict[str, str]
    verdict: verdicts.Verdict
    notebooks: list[str]
    ratio: str = ""

    @property
    def claim_id(self) -> str:
        return self.claim["claim_id"]

    @property
    def kind(self) -> str:
        return (self.claim.get("kind") or "claim").strip() or "claim"

    @property
    def section(self) -> str:
        """Where the claim is counted: experiment, analogue, check or context."""
        if self.kind == "derived check":
            return "check"
        if self.kind == "cited context":
            return "context"
        return "analogue" if self.verdict.verdict == verdicts.NOT_COMPARABLE else "experiment"


@dataclass
class Report:
    """Everything on the page, before rendering."""

    profile: str
    entries: list[NotebookResult]
    claims: list[ClaimResult]
    references: Path | None
    unknown_claims: dict[str, list[str]] = field(default_factory=dict)  # claim_id -> notebooks

    def of(self, section: str) -> list[ClaimResult]:
        return [c for c in self.claims if c.section == section]

    def counts(self) -> dict[str, int]:
        """The tally of experiments: one count per empirical verdict (analogues, consistency
        checks and cited context are counted apart, see `tally`)."""
        exp = self.of("experiment")
        return {v: sum(c.verdict.verdict == v for c in exp) for v in verdicts.EMPIRICAL_VERDICTS}

    def tally(self) -> list[str]:
        """The tally as lines: experiments one line per verdict, then the rest apart."""
        exp, checks = self.of("experiment"), self.of("check")
        lines = [f"{len(exp)} claims judged as experiments:"]
        lines += [f"  {n:3d}  {v}" for v, n in self.counts().items()]
        lines.append(f"{len(self.of('analogue'))} analogues: not comparable (small-scale stand-ins for a number "
                     "measured in a setting we do not run; shown, outside the tally)")
        c = {v: sum(x.verdict.verdict == v for x in checks) for v in verdicts.CHECK_VERDICTS}
        lines.append(f"{len(checks)} consistency checks (closed forms, accountant properties; never counted as "
                     f"reproductions): " + ", ".join(f"{n} {v}" for v, n in c.items()))
        lines.append(f"{len(self.of('context'))} cited context (earlier results the papers cite; not judged)")
        return lines


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
    names = set(params.list_notebooks(repo))
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
        for col in ("value", "epsilon", "delta", "margin"):
            text = (row.get(col) or "").strip()
            if text:
                try:
                    float(text)
                except ValueError:
                    raise UserError(f"{path} line {line}: {col} {text!r} of {cid} is not a number") from None
        try:
            verdicts.claim_spec(row)
        except ValueError as exc:
            raise UserError(f"{path} line {line}: {cid}: {exc}") from None
        row["claim_id"] = cid
    ids = {r["claim_id"]: r for r in rows}
    for line, row in enumerate(rows, start=2):
        base = (row.get("ratio_to") or "").strip()
        if base and (base not in ids or not (ids[base].get("value") or "").strip()):
            raise UserError(f"{path} line {line}: ratio_to {base!r} of {row['claim_id']} is not a claim with a value")
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
    by_id = {c.claim_id: c for c in out}
    for c in out:
        c.ratio = _ratio_text(c, by_id.get((c.claim.get("ratio_to") or "").strip()))
    known = {c["claim_id"] for c in claims}
    unknown = {cid: sorted({nb for nb, _ in pairs}) for cid, pairs in sorted(tagged.items()) if cid not in known}
    return out, unknown


def _ratio_text(c: ClaimResult, base: ClaimResult | None) -> str:
    """Both sides as unitless ratios to the baseline claim (the paper's own table row, e.g.
    non-DP time per epoch): the paper's from its two values, ours from the two estimates."""
    if base is None:
        return ""
    try:
        paper = float(c.claim["value"]) / float(base.claim["value"])
    except (ValueError, ZeroDivisionError):
        return ""
    a, b = c.verdict.estimate, base.verdict.estimate
    ours = (f"{verdicts.fmt(a.mean / b.mean)}x (ratio of our means)" if a is not None and b is not None and b.mean
            else "not measured")
    return f"as ratios to {base.claim_id}: paper {verdicts.fmt(paper)}x, ours {ours}"


def build(profile: str, repo: str | os.PathLike | None = None, results: str | os.PathLike | None = None,
          references: str | os.PathLike | None = None) -> Report:
    """Read everything the report of `profile` shows. Without a references file the
    summary is empty (and says so)."""
    params.check_profile(profile)
    repo = Path(repo) if repo else runner.find_repo()
    # where this machine's runs of the profile went (a gpu profile without CUDA: not results/gpu/)
    root = runner.profile_root(Path(results) if results else runner.results_root(repo), profile)
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
    unit = c.get("unit", "").strip()
    head = (f"<b>{_e(value)}</b> {_e(unit) + ' ' if unit else ''}<span class=\"small\">{_e(c.get('metric'))}</span>"
            if value else f"<b>{_e(c.get('method'))}</b> ({_e(c.get('metric'))}{', ' + _e(unit) if unit else ''})")
    priv = []
    if c.get("epsilon", "").strip():
        priv.append(f"eps={c['epsilon'].strip()}")
    if c.get("delta", "").strip():
        priv.append(f"delta={c['delta'].strip()}")
    method = "" if not value else f"{_e(c.get('method'))}; "
    judged = []
    test = (c.get("test") or "").strip()
    if test:
        judged.append(f"test: {test}")
    if (c.get("margin") or "").strip():
        judged.append(f"margin {c['margin'].strip()} (source: {c.get('margin_source', '').strip()})")
    if (c.get("setting_keys") or "").strip():
        judged.append(f"judged at: {c['setting_keys'].strip()}")
    if (c.get("combine") or "single").strip() not in ("", "single"):
        judged.append(f"combine: {c['combine'].strip()}")
    return (f"{head}<br><span class=\"small\">{method}{_e(c.get('setting'))}"
            f"{'; ' + _e(', '.join(priv)) if priv else ''}</span>"
            + (f"<br><span class=\"small\"><i>{_e('; '.join(judged))}</i></span>" if judged else ""))


def _ours_cell(cr: ClaimResult, profile: str) -> str:
    v = cr.verdict
    if not v.ours and not v.our_setting:
        return '<span class="small">-</span>'
    where = ", ".join(f'<a href="#{_e(nb)}">{_e(nb)}</a>' for nb in cr.notebooks)
    ratio = f"<br><b>{_e(cr.ratio)}</b>" if cr.ratio else ""
    refused = (f"<br><span class=\"small\">refused: {_e('; '.join(v.refused))}</span>" if v.refused else "")
    return (f"{_e(v.ours)}{ratio}<br><span class=\"small\">{_e(v.our_setting)}"
            f"{' (' + where + ', profile ' + _e(profile) + ')' if where else ''}</span>{refused}")


def _paper_group(c: dict[str, str]) -> str:
    """Group label of a claim: its letter prefix ("A", "B", ...) or its paper."""
    cid = c["claim_id"]
    return cid.split("-", 1)[0] if "-" in cid else c.get("paper", "")


def _claim_rows(rep: Report, items: list[ClaimResult]) -> str:
    rows, group = [], None
    for cr in items:
        c = cr.claim
        g = _paper_group(c)
        if g != group:
            group = g
            papers = sorted({x.claim.get("paper", "") for x in items if _paper_group(x.claim) == g})
            rows.append(f'<tr class="paper"><th colspan="4">{_e(" / ".join(papers))}</th></tr>')
        rows.append(
            f'<tr id="claim-{_e(cr.claim_id)}"><td><code>{_e(cr.claim_id)}</code><br>'
            f'<span class="small">{_e(cr.kind)}; {_e(c.get("figure_or_table"))}; source: {_e(c.get("source"))}</span></td>'
            f"<td>{_paper_cell(c)}</td><td>{_ours_cell(cr, rep.profile)}</td>"
            f"<td>{_badge(cr.verdict.verdict)}<br><span class=\"small\">{_e(cr.verdict.rule)}</span></td></tr>"
        )
    return "".join(rows)


def _table(rep: Report, items: list[ClaimResult], ours: str = "ours (value, setting)") -> str:
    return ('<table class="claims"><tr><th>claim</th><th>paper (value in its unit, setting, how judged)</th>'
            f"<th>{_e(ours)}</th><th>verdict and the rule that decided it</th></tr>{_claim_rows(rep, items)}</table>")


def render_tally(rep: Report) -> str:
    """The tally: one line per verdict of the experiments; the rest counted apart."""
    counts = rep.counts()
    exp = rep.of("experiment")
    body = "".join(f"<tr><td class=\"n\">{n}</td><td>{_badge(v)}</td></tr>" for v, n in counts.items())
    checks = rep.of("check")
    cc = ", ".join(f"{sum(x.verdict.verdict == v for x in checks)} {v}" for v in verdicts.CHECK_VERDICTS)
    return (f'<p id="tally"><b>{len(exp)} claims judged as experiments</b> (from <code>{_e(REFERENCES)}</code>):</p>'
            f'<table class="tally">{body}</table>'
            f"<p>Counted apart: <b>{len(rep.of('analogue'))}</b> analogues ({_badge(verdicts.NOT_COMPARABLE)}: "
            "small-scale stand-ins for numbers measured in settings we do not run); "
            f"<b>{len(checks)}</b> <a href=\"#checks\">consistency checks</a> ({_e(cc)}; they test our code against "
            "closed forms, never count as reproductions); "
            f"<b>{len(rep.of('context'))}</b> <a href=\"#context\">cited context</a> rows (earlier results the "
            "papers cite).</p>")


def render_summary(rep: Report) -> str:
    """The claims table (experiments and analogues), the consistency checks and the cited context."""
    if rep.references is None:
        return ('<section id="summary"><h2>Summary: our numbers beside the papers\'</h2>'
                f"<p>No {_e(REFERENCES)} in this checkout: no claims to compare.</p></section>")
    unknown = ""
    if rep.unknown_claims:
        items = "".join(f"<li><code>{_e(cid)}</code> in {_e(', '.join(nbs))}</li>" for cid, nbs in rep.unknown_claims.items())
        unknown = (f"<p>Rows tagged with claim ids that {_e(REFERENCES)} does not have (not judged):</p>"
                   f"<ul>{items}</ul>")
    claims = [c for c in rep.claims if c.section in ("experiment", "analogue")]
    checks, context = rep.of("check"), rep.of("context")
    return (
        '<section id="summary"><h2>Summary: our numbers beside the papers\'</h2>'
        "<p>Ours come from this profile's metrics rows carrying the claim's <code>claim_id</code>, in the claim's "
        'setting only; see <a href="#rules">how verdicts are decided</a>. A paper value is never replaced by ours: '
        "the two columns are different settings unless the verdict says otherwise. The estimand is the expected "
        "paired difference over training randomness (seeds) on the fixed test set.</p>"
        + _table(rep, claims) + unknown + "</section>"
        + '<section id="checks"><h2>Consistency checks</h2><p>Closed-form quantities and mathematical properties '
          "(noise multipliers from the authors' accountant, monotonicity of the accountant). They check that our code "
          "computes what the paper's formulas say; they are not experiments and never count as reproductions.</p>"
        + (_table(rep, checks) if checks else "<p>None.</p>") + "</section>"
        + '<section id="context"><h2>Cited context</h2><p>Numbers the papers cite from earlier work: shown for '
          "context, never judged.</p>" + (_table(rep, context) if context else "<p>None.</p>") + "</section>"
    )


def render_rules() -> str:
    """The verdict rules, as text (they are the rules dpbench.workbench.verdicts applies)."""
    items = "".join(f"<dt>{_badge(k) if k in VERDICT_CLASS else _e(k)}</dt><dd>{_e(v)}</dd>"
                    for k, v in verdicts.RULES.items())
    return (
        '<section id="rules"><h2>How verdicts are decided</h2>'
        f"<p>An empirical verdict needs at least {verdicts.MIN_SEEDS} paired seeds, a nonzero spread, and a 95% t "
        "interval and an exact sign-flip test that agree. The rules:</p>"
        f'<dl class="rules">{items}</dl></section>'
    )


def forest_claims(rep: Report) -> list[ClaimResult]:
    """The claims the forest plot shows: every empirical claim (kind claim, not an analogue)
    with a test of direction or bound, plus value claims that were judged."""
    out = []
    for c in rep.of("experiment"):
        test = (c.claim.get("test") or "").strip()
        if test in ("superiority", "noninferiority", "at_most", "at_least") or c.verdict.effect is not None:
            out.append(c)
    return out


def forest_plot(rep: Report) -> bytes | None:
    """A PNG: one row per empirical claim, grouped by paper; our claimed difference (positive =
    the claimed side) with its 95% CI, coloured by verdict; the claimed side shaded, 0 drawn,
    a noninferiority margin dashed; each row on its own scale (units differ between claims)."""
    items = forest_claims(rep)
    if not items:
        return None
    import matplotlib.style
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    layout = []  # ("head", paper) or ("claim", ClaimResult)
    group = None
    for c in items:
        g = _paper_group(c.claim)
        if g != group:
            group = g
            papers = list(dict.fromkeys(x.claim.get("paper", g) for x in items if _paper_group(x.claim) == g))
            layout.append(("head", " / ".join(papers)))
        layout.append(("claim", c))
    with matplotlib.style.context(str(STYLE_FILE)):
        height = 0.42 * len(layout) + 1.3
        fig = Figure(figsize=(11, height))
        FigureCanvasAgg(fig)
        axes = fig.subplots(len(layout), 1, squeeze=False)[:, 0]
        # margins in inches (legend above, the last row's tick labels below), whatever the number of rows
        fig.subplots_adjust(left=0.30, right=0.70, top=1 - 0.75 / height, bottom=0.35 / height, hspace=0.9)
        for ax, (what, item) in zip(axes, layout):
            ax.set_yticks([])
            ax.grid(False)
            for side in ("left", "right", "top"):
                ax.spines[side].set_visible(False)
            if what == "head":
                ax.axis("off")
                ax.text(-0.43, 0.2, str(item), transform=ax.transAxes, fontsize=8.5, fontweight="bold", ha="left")
                continue
            v = item.verdict
            colour = VERDICT_COLOUR.get(v.verdict, "#9e9e9e")
            ax.text(-0.02, 0.5, item.claim_id, transform=ax.transAxes, ha="right", va="center", fontsize=7.5)
            ax.text(1.02, 0.5, f"{v.verdict}" + (f"  [{item.claim.get('unit', '')}]" if item.claim.get("unit") else ""),
                    transform=ax.transAxes, ha="left", va="center", fontsize=7, color=colour)
            ax.tick_params(axis="x", labelsize=6, length=2, pad=1)
            if v.effect is None:
                ax.set_xlim(-1, 1)
                ax.set_xticks([])
                ax.spines["bottom"].set_visible(False)
                ax.text(0.5, 0.5, v.verdict if v.verdict == verdicts.NOT_RUN else "no estimate", transform=ax.transAxes,
                        ha="center", va="center", fontsize=7, color="#757575")
                continue
            lo = v.low if v.low is not None else v.effect
            hi = v.high if v.high is not None else v.effect
            if v.band is not None:  # a value claim: the tolerance band around the paper's value
                pts = [lo, hi, v.effect, *v.band]
                ax.axvspan(v.band[0], v.band[1], color="#c8e6c9", alpha=0.7, lw=0)
                ax.axvline(sum(v.band) / 2, color="#424242", lw=0.8)
            else:
                pts = [lo, hi, v.effect, 0.0, v.boundary]
                span = max(pts) - min(pts) or abs(v.effect) or 1.0
                ax.axvspan(v.boundary, max(pts) + span, color="#c8e6c9", alpha=0.6, lw=0)  # the claimed side
                ax.axvline(0.0, color="#424242", lw=0.8)
                if v.boundary:
                    ax.axvline(v.boundary, color="#424242", lw=0.8, ls="--")
            span = (max(pts) - min(pts)) or abs(v.effect) or 1.0
            ax.set_xlim(min(pts) - 0.15 * span, max(pts) + 0.15 * span)
            ax.set_ylim(-1, 1)
            ax.plot([lo, hi], [0, 0], color=colour, lw=2.2, solid_capstyle="butt")
            ax.plot([v.effect], [0], "o", color=colour, ms=5)
        legend = [Patch(color=c, label=k) for k, c in VERDICT_COLOUR.items()
                  if k not in (verdicts.NOT_COMPARABLE,)]
        legend.append(Patch(color="#c8e6c9", label="claimed side / tolerance band"))
        fig.legend(handles=legend, loc="upper center", ncol=4, fontsize=7, frameon=False)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def render_forest(rep: Report) -> str:
    """The picture that opens the report, and the tally beside it."""
    if rep.references is None:
        return ""
    try:
        png = forest_plot(rep)
    except Exception as exc:  # a report without its picture is still a report: say why
        png, why = None, f"the forest plot could not be drawn: {type(exc).__name__}: {exc}"
    else:
        why = "no empirical claims to draw"
    if png:
        data = base64.b64encode(png).decode("ascii")
        pic = (f'<figure class="forest"><img alt="forest plot of the empirical claims" '
               f'src="data:image/png;base64,{data}"><figcaption>Each row is one empirical claim: our claimed '
               "difference (positive = the side the paper claims; for a bound, the bound minus ours or ours minus "
               "the bound) with its 95% CI over seeds, on its own scale. Shaded: the claimed side (or the tolerance "
               "band of a value claim); solid line: 0; dashed: the noninferiority margin. Colour: the verdict."
               "</figcaption></figure>")
    else:
        pic = f"<p>{_e(why)}.</p>"
    return f'<section id="forest"><h2>Where the project stands</h2>{pic}{render_tally(rep)}</section>'


def render(profile: str, entries: list[NotebookResult], rep: Report | None = None) -> str:
    """The whole page."""
    rep = rep or Report(profile, entries, [], None)
    counts = {s: sum(e.status == s for e in entries) for s in ("ok", "failed", "missing")}
    toc = "".join(f'<li><a href="#{html.escape(e.notebook)}">{html.escape(e.notebook)}</a> '
                  f'<span class="status {e.status}">{e.status}</span></li>' for e in entries)
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    forest = render_forest(rep)
    links = ('<li><a href="#forest">forest plot and tally</a></li>' if forest else "") + \
        '<li><a href="#summary">claims</a></li>' + \
        ('<li><a href="#checks">consistency checks</a></li><li><a href="#context">cited context</a></li>'
         if rep.references is not None else "")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>dpbench report: {html.escape(profile)}</title><style>{CSS}</style></head><body>"
        f"<h1>dpbench report: profile <code>{html.escape(profile)}</code></h1>"
        f"<p>Generated {html.escape(now_iso())}. Notebooks: {summary}.</p>"
        + forest
        + f'<ul>{links}<li><a href="#rules">verdict rules</a></li>{toc}</ul>'
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
    if v.effect is not None and v.band is None:
        ci = f" [{verdicts.fmt(v.low)}, {verdicts.fmt(v.high)}]" if v.low is not None else ""
        n = v.estimate.n if v.estimate is not None else 0
        return f"{verdicts.fmt(v.effect)}{ci} (n={n})"
    est = v.estimate
    if est is None:
        return v.ours or "-"
    if est.exact:
        return f"{verdicts.fmt(est.mean)} (exact)"
    if est.half_width is None:
        return f"{verdicts.fmt(est.mean)} (n={est.n}, no CI)"
    return f"{verdicts.fmt(est.mean)} +/- {verdicts.fmt(est.half_width)} (n={est.n})"


def text_summary(rep: Report) -> str:
    """The summary table and the tally as plain text, for the terminal (`dpbench report
    --summary`, which `make reproduce` prints)."""
    if rep.references is None:
        return f"no {REFERENCES}: no claims to compare"
    w_id = max([len("claim"), *(len(c.claim_id) for c in rep.claims)])
    lines = [f"{'claim':<{w_id}}  {'paper':<24}  {'ours':<34}  verdict", "-" * (w_id + 94)]
    for section, title in (("experiment", "experiments"), ("analogue", "analogues (not comparable)"),
                           ("check", "consistency checks"), ("context", "cited context")):
        items = rep.of(section)
        if not items:
            continue
        lines.append(f"[{title}]")
        for cr in items:
            c = cr.claim
            paper = (f"{c.get('value', '').strip()} {c.get('unit', '').strip()}".strip()
                     if c.get("value", "").strip() else c.get("method", ""))
            ours = cr.ratio.split(": ", 1)[1] if cr.ratio else _short_ours(cr.verdict)  # units that cannot match
            lines.append(f"{cr.claim_id:<{w_id}}  {_clip(paper, 24):<24}  {_clip(ours, 34):<34}  "
                         f"{cr.verdict.verdict}")
    lines.append("-" * (w_id + 94))
    lines += rep.tally()
    if rep.unknown_claims:
        lines.append("claim ids in metrics but not in paper_values.csv: " + ", ".join(rep.unknown_claims))
    return "\n".join(lines)


# --------------------------------------------------------------------------- writing


def write(rep: Report, output: str | os.PathLike | None = None, repo=None, results=None) -> Path:
    """Render `rep` and write it (atomically) to `output` or results/<profile>/report.html."""
    if output is None:
        root = Path(results) if results else runner.results_root(Path(repo) if repo else runner.find_repo())
        output = runner.profile_root(root, rep.profile) / rep.profile / "report.html"
    return write_atomic(Path(output), render(rep.profile, rep.entries, rep))


def write_report(profile: str, repo: str | os.PathLike | None = None, results: str | os.PathLike | None = None,
                 references: str | os.PathLike | None = None, output: str | os.PathLike | None = None) -> Path:
    """Write `results/<profile>/report.html` (or `output`), atomically, and return its path."""
    rep = build(profile, repo, results, references)
    return write(rep, output, repo, results)
