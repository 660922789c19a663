"""`dpbench compare A B`: metric differences between two results folders, with spread.

A and B are results folders: a profile folder (`results/cpu`, holding one folder per
notebook), one notebook's folder (`results/cpu/NN_name`), a colleague's copy
of either, or just a profile name (`cpu`). Rows of the two sides are matched on
(experiment, metric, method, epsilon) plus every parameter column that both folders have,
so each swept value (a batch size, a data-set size) is its own line and values that only
one side ran are counted as "only in A" / "only in B", never pooled. Measurement columns
(`sd`, `se`, `step`, ...) are not keys. Columns that only one folder has are listed; where
such a column takes several values within one matched quantity, that quantity is not
compared (its rows would pool different settings) and is listed with the reason. Each
matched quantity gets a mean per side across seeds, and B - A with its 95% confidence
interval (paired by seed when both sides have the same seeds, so B - A is the difference of
the two means; else Welch; see dpbench.workbench.verdicts). A difference is flagged only
when its interval excludes 0.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from dpbench.workbench import params, runner, verdicts
from dpbench.errors import UserError
from dpbench.atomic import write_atomic
from dpbench.workbench.results import STYLE_FILE

BASE_KEY = ("experiment", "metric", "method", "epsilon")
# Measurements and bookkeeping, never keys (the verdicts' list of non-setting columns, less the base key).
NOT_KEYS = (set(verdicts._STAT_COLUMNS) | {"value", "seed", "status", "reason", "claim_id", "_notebook"}) - set(BASE_KEY)


@dataclass
class Side:
    """One side of the comparison: where it came from and its ok rows."""

    label: str
    path: Path
    rows: list[dict[str, Any]]
    notebooks: list[str]
    failed: int = 0


@dataclass
class Line:
    """One matched quantity: its key, the estimate on each side and B - A."""

    key: dict[str, str]
    a: verdicts.Estimate
    b: verdicts.Estimate
    diff: verdicts.Estimate

    @property
    def relative(self) -> float | None:
        return self.diff.mean / abs(self.a.mean) if self.a.mean else None

    @property
    def flag(self) -> str:
        """"*" the 95% CI of B - A excludes 0; "=" identical; "?" spread unknown; "~" a
        zero-width interval from seeds (every seed moved by the same amount: decides nothing);
        "" otherwise."""
        if self.diff.mean == 0 and (self.diff.half_width or 0) == 0:
            return "="
        if not self.diff.known:
            return "?"
        if self.diff.half_width == 0 and not self.diff.exact:
            return "~"
        return "*" if self.diff.low > 0 or self.diff.high < 0 else ""

    @property
    def significant(self) -> bool:
        return self.flag == "*"


@dataclass
class Comparison:
    """The result of comparing two sides."""

    a: Side
    b: Side
    lines: list[Line]
    only_a: int
    only_b: int
    differing: dict[str, dict[str, tuple[list[str], list[str]]]] = field(default_factory=dict)
    one_side: dict[str, dict[str, str]] = field(default_factory=dict)  # experiment -> {column: "A" or "B"}
    skipped: list[str] = field(default_factory=list)  # quantities not compared, with the reason


# --------------------------------------------------------------------------- reading


def _norm(x: Any) -> str:
    """A cell as comparable text: numbers in one spelling ("8", "8.0" -> "8"), blanks -> ""."""
    if x is None:
        return ""
    text = str(x).strip()
    if text.lower() in ("", "nan", "none"):
        return ""
    try:
        v = float(text)
    except ValueError:
        return text
    if math.isfinite(v) and v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


def resolve_side(arg: str, repo: str | os.PathLike | None = None) -> Path:
    """A results folder from a path, or from a profile name under the results root."""
    path = Path(arg).expanduser()
    if path.is_dir():
        return path.resolve()
    if arg in params.PROFILES:
        try:
            root = runner.results_root(repo)
        except UserError:
            root = None
        if root is not None and (root / arg).is_dir():
            return (root / arg).resolve()
    raise UserError(f"no results folder {arg!r}; give a results folder (results/cpu, results/cpu/NB, a copy) "
                    f"or a profile name that has results")


def read_side(path: str | os.PathLike, label: str | None = None) -> Side:
    """The ok rows of a notebook folder (metrics.csv) or of every notebook folder in a
    profile folder. UserError when there is no metrics.csv at all."""
    path = Path(path)
    if (path / "metrics.csv").is_file():
        files = [(path.name, path / "metrics.csv")]
    else:
        files = [(p.name, p / "metrics.csv") for p in sorted(path.iterdir())
                 if p.is_dir() and not p.name.startswith(".") and (p / "metrics.csv").is_file()] if path.is_dir() else []
    if not files:
        raise UserError(f"no metrics.csv in {path} or its notebook folders; point at results/<profile> or results/<profile>/<NB>")
    rows, failed = [], 0
    for nb, f in files:
        try:
            with open(f, newline="") as fh:
                for r in csv.DictReader(fh):
                    r = dict(r)
                    r["_notebook"] = nb
                    if not (r.get("experiment") or "").strip():
                        r["experiment"] = nb
                    if (r.get("status") or "ok").strip() == "failed" or verdicts._num(r.get("value")) is None:
                        failed += 1
                        continue
                    rows.append(r)
        except (OSError, csv.Error, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read {f}: {exc}") from None
    return Side(label or _label(path), path, rows, [nb for nb, _ in files], failed)


def _label(path: Path) -> str:
    parts = path.resolve().parts
    return "/".join(parts[-2:]) if len(parts) >= 2 else str(path)


# --------------------------------------------------------------------------- comparing


def key_columns(a_rows: Sequence[dict], b_rows: Sequence[dict], by: Sequence[str] = ()) -> tuple[list[str], dict[str, tuple[list[str], list[str]]]]:
    """The key columns of one experiment: BASE_KEY, the `by` columns, and every parameter
    column that both sides have (so sweeps stay apart and only equal settings match); plus,
    for information, the shared columns whose sets of values differ between the sides
    (name -> (A values, B values), a few of each): their unmatched values are "only in A/B"."""
    cols_a = {k for r in a_rows for k in r}
    cols_b = {k for r in b_rows for k in r}
    keys = list(BASE_KEY) + [c for c in by if c not in BASE_KEY]
    differing = {}
    for col in sorted((cols_a & cols_b) - NOT_KEYS - set(keys)):
        keys.append(col)
        va = {_norm(r.get(col)) for r in a_rows}
        vb = {_norm(r.get(col)) for r in b_rows}
        if va != vb:
            differing[col] = (_shown(va), _shown(vb))
    return keys, differing


def one_side_columns(a_rows: Sequence[dict], b_rows: Sequence[dict]) -> dict[str, str]:
    """Parameter columns that only one side has: name -> "A" or "B"."""
    cols_a = {k for r in a_rows for k in r} - NOT_KEYS - set(BASE_KEY)
    cols_b = {k for r in b_rows for k in r} - NOT_KEYS - set(BASE_KEY)
    out = {c: "A" for c in cols_a - cols_b}
    out.update({c: "B" for c in cols_b - cols_a})
    return dict(sorted(out.items()))


def _shown(values: set[str], limit: int = 4) -> list[str]:
    """A few values of a column, numbers in 4 significant digits, blanks as "(blank)"."""
    out = []
    for v in sorted(values)[:limit]:
        num = verdicts._num(v)
        out.append("(blank)" if v == "" else verdicts.fmt(num) if num is not None else v)
    return out + (["..."] if len(values) > limit else [])


def compare(a: Side, b: Side, by: Sequence[str] = (), metrics: Sequence[str] = ()) -> Comparison:
    """Match the rows of two sides and estimate B - A for every matched quantity.
    `metrics`: keep only metrics whose name contains one of these strings."""
    def keep(r):
        return not metrics or any(m in r.get("metric", "") for m in metrics)

    a_rows = [r for r in a.rows if keep(r)]
    b_rows = [r for r in b.rows if keep(r)]
    lines: list[Line] = []
    only_a = only_b = 0
    differing: dict[str, dict] = {}
    one_side: dict[str, dict[str, str]] = {}
    skipped: list[str] = []
    for exp in sorted({r["experiment"] for r in a_rows} | {r["experiment"] for r in b_rows}):
        ea = [r for r in a_rows if r["experiment"] == exp]
        eb = [r for r in b_rows if r["experiment"] == exp]
        if not ea or not eb:
            only_a += len({_key(r, BASE_KEY) for r in ea})
            only_b += len({_key(r, BASE_KEY) for r in eb})
            continue
        keys, diff_cols = key_columns(ea, eb, by)
        if diff_cols:
            differing[exp] = diff_cols
        lone = one_side_columns(ea, eb)
        if lone:
            one_side[exp] = lone
        ga, gb = _group(ea, keys), _group(eb, keys)
        only_a += len(ga.keys() - gb.keys())
        only_b += len(gb.keys() - ga.keys())
        for k in sorted(ga.keys() & gb.keys()):
            # a column only one side has must not vary within the quantity: that would pool settings
            pooled = [f"{side}'s rows take several values of {c} ({', '.join(_shown({_norm(r.get(c)) for r in rs}))})"
                      for side, rs in (("A", ga[k]), ("B", gb[k])) for c, who in lone.items()
                      if who == side and len({_norm(r.get(c)) for r in rs}) > 1]
            if pooled:
                skipped.append(f"{_full_label(dict(zip(keys, k)))}: {'; '.join(pooled)}, a column the other side lacks")
                continue
            ea_est, eb_est = verdicts.estimate(ga[k]), verdicts.estimate(gb[k])
            if ea_est is None or eb_est is None:
                continue
            lines.append(Line(dict(zip(keys, k)), ea_est, eb_est, verdicts.difference(eb_est, ea_est)))
    return Comparison(a, b, lines, only_a, only_b, differing, one_side, skipped)


def _key(row: dict, keys: Sequence[str]) -> tuple[str, ...]:
    return tuple(_norm(row.get(k)) for k in keys)


def _group(rows: Sequence[dict], keys: Sequence[str]) -> dict[tuple[str, ...], list[dict]]:
    out: dict[tuple[str, ...], list[dict]] = {}
    for r in rows:
        out.setdefault(_key(r, keys), []).append(r)
    return out


def ordered(lines: Sequence[Line]) -> list[Line]:
    """Significant differences first, then by the size of the relative difference."""
    def size(line: Line) -> float:
        rel = line.relative
        return abs(rel) if rel is not None else abs(line.diff.mean)
    return sorted(lines, key=lambda ln: (not ln.significant, -size(ln)))


# --------------------------------------------------------------------------- output


def _short_key(key: dict[str, str]) -> str:
    # delta is part of the key (and of the CSV) but the same almost everywhere: not shown here
    extra = [f"{k}={v}" for k, v in key.items() if k not in BASE_KEY and k != "delta" and v != ""]
    return ", ".join(extra)


def _est(e: verdicts.Estimate) -> str:
    if e.exact:
        return verdicts.fmt(e.mean)
    if e.half_width is None:
        return f"{verdicts.fmt(e.mean)} (n={e.n})"
    return f"{verdicts.fmt(e.mean)} +/- {verdicts.fmt(e.half_width)} (n={e.n})"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def format_table(cmp: Comparison, top: int | None = 30) -> str:
    """The printed report: the two sides, the settings that differ, and the differences."""
    sig = sum(ln.significant for ln in cmp.lines)
    out = [
        f"A: {cmp.a.path} ({len(cmp.a.rows)} ok rows, {len(cmp.a.notebooks)} notebook folders, {cmp.a.failed} failed rows)",
        f"B: {cmp.b.path} ({len(cmp.b.rows)} ok rows, {len(cmp.b.notebooks)} notebook folders, {cmp.b.failed} failed rows)",
    ]
    for exp, cols in cmp.differing.items():
        text = "; ".join(f"{c}: A {','.join(va) or '-'} / B {','.join(vb) or '-'}" for c, (va, vb) in cols.items())
        out.append(f"  {exp}: matched per value; values only one side ran are not compared: {text}")
    for exp, cols in cmp.one_side.items():
        text = ", ".join(f"{c} (only {who})" for c, who in cols.items())
        out.append(f"  {exp}: columns only one folder has: {text}")
    out.append(f"{len(cmp.lines)} matched quantities, {sig} differ beyond their 95% CI (*); "
               f"{cmp.only_a} only in A, {cmp.only_b} only in B"
               + (f"; {len(cmp.skipped)} not compared (settings would pool)" if cmp.skipped else ""))
    out += [f"  not compared: {s}" for s in cmp.skipped]
    if not cmp.lines:
        return "\n".join(out)
    lines = ordered(cmp.lines)
    shown = lines if top is None else lines[:top]
    w_exp = max(len("experiment"), *(len(ln.key["experiment"]) for ln in shown))
    w_met = max(len("metric"), *(len(ln.key["metric"]) for ln in shown))
    w_meth = max(len("method"), *(len(ln.key["method"]) for ln in shown))
    header = (f"{'experiment':<{w_exp}} {'metric':<{w_met}} {'method':<{w_meth}} {'eps':>6}  {'A mean +/- 95% CI':<26} "
              f"{'B mean +/- 95% CI':<26} {'B - A [95% CI]':<28} {'rel':>8}   other keys")
    out += [header, "-" * len(header)]
    for ln in shown:
        k = ln.key
        d = ln.diff
        dtext = verdicts.fmt(d.mean) + ("" if d.half_width in (None, 0) else
                                        f" [{verdicts.fmt(d.low)}, {verdicts.fmt(d.high)}]")
        rel = "-" if ln.relative is None else f"{100 * ln.relative:+.1f}%"
        out.append(f"{k['experiment']:<{w_exp}} {k['metric']:<{w_met}} {k['method']:<{w_meth}} "
                   f"{k['epsilon']:>6}  {_est(ln.a):<26} {_est(ln.b):<26} "
                   f"{dtext:<28} {rel:>8} {ln.flag:1} {_short_key(k)}")
    if len(shown) < len(lines):
        out.append(f"... {len(lines) - len(shown)} more (use --all or --csv FILE)")
    out.append("* the 95% CI of B - A excludes 0;  = identical;  ? spread unknown (a single seed);  "
               "~ zero-width interval over seeds (decides nothing)")
    return "\n".join(out)


def to_csv(cmp: Comparison) -> str:
    """Every matched quantity as CSV (key columns, both sides, the difference)."""
    keys = list(BASE_KEY) + sorted({k for ln in cmp.lines for k in ln.key} - set(BASE_KEY))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(keys + ["a_mean", "a_ci_half_width", "a_n", "b_mean", "b_ci_half_width", "b_n",
                       "diff", "diff_ci_low", "diff_ci_high", "relative", "flag"])
    for ln in ordered(cmp.lines):
        w.writerow([ln.key.get(k, "") for k in keys] + [
            ln.a.mean, ln.a.half_width, ln.a.n, ln.b.mean, ln.b.half_width, ln.b.n,
            ln.diff.mean, ln.diff.low, ln.diff.high, ln.relative, ln.flag])
    return buf.getvalue()


def _full_label(k: dict[str, str]) -> str:
    """Every key of a matched quantity, nothing cut."""
    extra = _short_key(k)
    eps = f" eps={k['epsilon']}" if k.get("epsilon") else ""
    return f"{k['experiment']} {k['metric']} {k['method']}{eps}" + (f" ({extra})" if extra else "")


def _line_label(ln: Line, width: int = 60) -> str:
    """The plot's label of a line: the full label, wrapped (never cut)."""
    return "\n".join(textwrap.wrap(_full_label(ln.key), width)) or "-"


def plot(cmp: Comparison, path: str | os.PathLike, top: int = 25) -> Path:
    """Write a PNG: left, B - A relative to |A| with its 95% CI for the largest
    differences; right, B against A for every matched quantity (log axes, y = x)."""
    import matplotlib.style
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    lines = [ln for ln in ordered(cmp.lines) if ln.relative is not None][:top][::-1]
    n_label_lines = sum(_line_label(ln).count("\n") + 1 for ln in lines)
    with matplotlib.style.context(str(STYLE_FILE)):
        fig = Figure(figsize=(15, max(4.5, 0.14 * n_label_lines + 0.18 * len(lines) + 1.5)))
        FigureCanvasAgg(fig)
        ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.6, 1]})
        if lines:
            y = list(range(len(lines)))
            rel = [100 * ln.relative for ln in lines]
            err = [0 if ln.diff.half_width is None else 100 * ln.diff.half_width / abs(ln.a.mean) for ln in lines]
            colors = ["#c62828" if ln.significant else "#757575" for ln in lines]
            ax.barh(y, rel, xerr=err, color=colors, alpha=0.8, capsize=2)
            labels = [_line_label(ln) for ln in lines]
            ax.set_yticks(y, labels, fontsize=7)
            ax.axvline(0, color="black", lw=0.8)
            ax.set_xlabel("(B - A) / |A|, % (bars: 95% CI; red: CI excludes 0)")
        else:
            ax.text(0.5, 0.5, "no matched quantity with a nonzero A", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"largest differences, B vs A ({len(cmp.lines)} matched)")
        pos = [ln for ln in cmp.lines if ln.a.mean > 0 and ln.b.mean > 0]
        if pos:
            xs, ys = [ln.a.mean for ln in pos], [ln.b.mean for ln in pos]
            ax2.scatter(xs, ys, s=12, c=["#c62828" if ln.significant else "#1565c0" for ln in pos], alpha=0.7)
            lo, hi = min(xs + ys), max(xs + ys)
            ax2.plot([lo, hi], [lo, hi], color="gray", ls="--", lw=1)
            ax2.set_xscale("log")
            ax2.set_yscale("log")
            for axis in (ax2.xaxis, ax2.yaxis):  # plain numbers, not 2x10^0
                axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                axis.set_minor_formatter(NullFormatter())
        else:
            ax2.text(0.5, 0.5, "no positive values to draw", ha="center", va="center", transform=ax2.transAxes)
        ax2.set_xlabel(f"A: {_clip(cmp.a.label, 40)}")
        ax2.set_ylabel(f"B: {_clip(cmp.b.label, 40)}")
        ax2.set_title("every matched quantity (mean across seeds)")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
    return write_atomic(Path(path), buf.getvalue())


def default_output(a: Side, b: Side) -> Path:
    """results/compare/<A>-vs-<B>.png in a checkout, else ./compare-<A>-vs-<B>.png."""
    def slug(s: str) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_") or "x"
    name = f"{slug(a.label)}-vs-{slug(b.label)}.png"
    try:
        return runner.results_root() / "compare" / name
    except UserError:
        return Path.cwd() / f"compare-{name}"


def add_cli_arguments(parser) -> None:
    """The arguments of `dpbench compare`."""
    parser.add_argument("a", metavar="A", help="results folder (results/cpu, results/cpu/NB, a copy) or profile name")
    parser.add_argument("b", metavar="B", help="the folder to compare against A (differences are B - A)")
    parser.add_argument("-o", "--output", help="where to write the plot (PNG); default results/compare/A-vs-B.png")
    parser.add_argument("--csv", help="also write every matched quantity to this CSV file")
    parser.add_argument("--metric", action="append", default=[], help="only metrics containing this text (repeatable)")
    parser.add_argument("--by", action="append", default=[], help="also match on this column (repeatable)")
    parser.add_argument("--top", type=int, default=30, help="rows to print (default 30)")
    parser.add_argument("--all", action="store_true", help="print every matched quantity")


def cli(args) -> int:
    """Run `dpbench compare` from parsed arguments; prints the table and the plot path."""
    if args.top < 1:
        raise UserError(f"--top must be at least 1, got {args.top}")
    a = read_side(resolve_side(args.a))
    b = read_side(resolve_side(args.b))
    if a.path == b.path:
        raise UserError(f"A and B are the same folder ({a.path}); give two different results folders")
    if a.label == b.label:
        a.label, b.label = f"A_{a.label}", f"B_{b.label}"
    out = Path(args.output) if args.output else default_output(a, b)
    if out.suffix.lower() != ".png":
        raise UserError(f"--output {out} must end in .png")
    cmp = compare(a, b, by=args.by, metrics=args.metric)
    print(format_table(cmp, top=None if args.all else args.top))
    if args.csv:
        print(f"table: {write_atomic(Path(args.csv), to_csv(cmp))}")
    print(f"plot: {plot(cmp, out)}")
    return 0
