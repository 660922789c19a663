"""Verdict rules: does a claim of a paper hold in our results?

Pure functions over plain rows (dicts of one `metrics.csv` row each), no pandas, so the
rules can be tested exhaustively and read in one place. `judge(claim, rows)` returns a
`Verdict` with one of `VERDICTS`, the text of the rule that decided it, our value and our
setting. The report (dpbench.workbench.report) and `dpbench compare` are the callers.

How a notebook feeds a claim (the convention; see RULES for the exact tests):

* Tag the rows with `claim_id` = a row id of references/paper_values.csv, one row per seed
  (a `seed` value), or one row with `exact=True` and no seed for a deterministic quantity
  (accounting). A row with neither (e.g. a mean over seeds) has an unknown spread.
* Ordering claims ("X > Y", written in the paper_values.csv `method` column): record the
  per-seed value of every arm, with the arm's name in `method` (or in an `arm` column when
  `method` holds something else), or record per-seed differences X - Y with
  `comparison="difference"` (a metric name containing "difference" or "_minus_" counts too).
* Other claims say how they compare with a `comparison` column: `value` (the same setting
  as the paper: compared within `tolerance`, relative, default 5%, or `abs_tolerance`),
  `at_most` / `at_least` (the paper's value is a bound), `difference` (positive supports
  the claim), or `analogue` (the default: a small-scale stand-in, shown, never judged).
* Optional columns: `setting` (our setting in words), `sd` + `n_seeds` (a row that already
  summarises several seeds), `step` (only the last step of each seed is used).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

REPRODUCED_QUALITATIVELY = "reproduced qualitatively"
REPRODUCED_WITHIN_TOLERANCE = "reproduced within tolerance"
NOT_RESOLVED = "not resolved at this scale"
NOT_REPRODUCED = "not reproduced"
NOT_RUN = "not run"
VERDICTS = (REPRODUCED_QUALITATIVELY, REPRODUCED_WITHIN_TOLERANCE, NOT_RESOLVED, NOT_REPRODUCED, NOT_RUN)

COMPARISONS = ("value", "at_most", "at_least", "difference", "analogue")
DEFAULT_REL_TOLERANCE = 0.05
CONFIDENCE = 0.95

# The rules, as the report prints them (one entry per way a verdict can be reached).
RULES: dict[str, str] = {
    "not run": "No ok row in this profile's metrics carries the claim's claim_id (or every such row "
               "failed, or an arm of an ordering claim has no rows).",
    "spread": "Seeds: rows are grouped by `seed` (the last `step` of each seed; duplicates averaged). "
              "With n >= 2 seeds the 95% confidence interval is mean +/- t(0.975, n-1) sd / sqrt(n); a row "
              "with `sd` and `n_seeds` columns is such a summary already. A row without a seed is exact only "
              "when it says so (`exact=True`: a deterministic quantity such as an accountant's noise "
              "multiplier); otherwise it may be a mean over seeds, so like a single seeded value its spread "
              "is unknown and it can never resolve a claim.",
    "ordering": "Ordering claim 'X > Y' (paper_values.csv `method`): the difference X - Y is estimated paired "
                "by seed when both arms share >= 2 seeds, otherwise with Welch's interval. Reproduced "
                "qualitatively when the 95% CI lies entirely on the claimed side of 0; not reproduced when it "
                "lies entirely on the other side; not resolved at this scale when it contains 0 or the spread "
                "is unknown. 'X > Y, Z' must hold against every arm; '>=' and '<=' differ only in that an exact "
                "tie counts as reproduced. An arm the notebook did not tag is taken from its rows with the same "
                "experiment and metric as the tagged arm (shown as 'rows not tagged with this claim').",
    "difference": "Difference rows (comparison='difference' or a metric named *difference* / *_minus_*): "
                  "the per-seed differences must be positive (for 'X < Y' claims: negative) with the whole "
                  "95% CI on that side of 0, as for ordering claims. Difference rows without a spread (one "
                  "unseeded row) leave the decision to the arms' own rows when there are any.",
    "value": "comparison='value' (our setting is the paper's): reproduced within tolerance when our mean lies "
             "within the tolerance band around the paper's value (relative `tolerance`, default 5%, or "
             "`abs_tolerance`) and the spread is known (exact, or >= 2 seeds); not reproduced when the whole "
             "95% CI lies outside the band; otherwise not resolved at this scale.",
    "bound": "comparison='at_most' / 'at_least' (the paper's value is a bound, e.g. '< 2x slowdown'): "
             "reproduced qualitatively when the whole 95% CI is on the claimed side of the bound; not "
             "reproduced when it is entirely on the other side; otherwise not resolved at this scale.",
    "analogue": "comparison='analogue' (the default): our number comes from a smaller setting than the "
                "paper's (other data, model or scale), so it is shown beside the paper's for context and "
                "the verdict is not resolved at this scale. A small-scale number is never presented as "
                "the paper's.",
}

# Columns that describe a measurement rather than the setting (left out of "our setting").
_STAT_COLUMNS = {
    "experiment", "metric", "value", "status", "reason", "claim_id", "seed", "sd", "std", "n_seeds",
    "comparison", "tolerance", "abs_tolerance", "arm", "setting", "step", "ci_low", "ci_high", "delta", "exact",
}

_ORDERING = re.compile(r"^\s*(?P<left>[^<>=]+?)\s*(?P<op>>=|<=|>|<)\s*(?P<right>[^<>=]+?)\s*$")
_DIFF_METRIC = re.compile(r"difference|_minus_")

# Two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom.
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


def t_quantile(df: float) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (df > 0; fractional df,
    as Welch's interval gives, are interpolated in 1/df). Beyond 30 a Cornish-Fisher
    expansion around the normal quantile is accurate to about 1e-4."""
    if not df > 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if df > 30:
        z = 1.959963984540054
        return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2) \
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    lo = max(1, math.floor(df))
    if lo == df or lo >= 30:
        return _T975[int(lo) - 1]
    hi = lo + 1
    # Interpolating linearly in 1/df is close to exact between neighbouring integers.
    w = (1 / lo - 1 / df) / (1 / lo - 1 / hi)
    return _T975[lo - 1] + w * (_T975[hi - 1] - _T975[lo - 1])


@dataclass(frozen=True)
class Estimate:
    """A value measured across seeds: mean, 95% half-width and where they came from.

    `half_width` is 0 for an exact value and None when the spread is unknown (one seed)."""

    mean: float
    half_width: float | None
    n: int = 0
    sd: float | None = None
    exact: bool = False
    by_seed: Mapping[Any, float] = field(default_factory=dict)
    note: str = ""

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width

    @property
    def known(self) -> bool:
        """Whether a confidence interval exists (exact, or two or more seeds)."""
        return self.half_width is not None

    def describe(self) -> str:
        """E.g. "0.912 [0.899, 0.925] (95% CI, 3 seeds)", "8.51 (exact)"."""
        if self.exact:
            text = f"{fmt(self.mean)} (exact)"
        elif self.half_width is None:
            text = f"{fmt(self.mean)} ({self.n} seed, spread unknown)"
        else:
            text = f"{fmt(self.mean)} [{fmt(self.low)}, {fmt(self.high)}] (95% CI, {self.n} seeds)"
        return f"{text}; {self.note}" if self.note else text


@dataclass(frozen=True)
class Verdict:
    """The outcome of one claim: the verdict, the rule that decided it and our numbers."""

    verdict: str
    rule: str
    ours: str = ""
    our_setting: str = ""
    estimate: Estimate | None = None
    n_rows: int = 0


def fmt(x: float | None) -> str:
    """A number in 4 significant digits (None -> "-")."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 1e5 or abs(x) < 1e-3:
        return f"{x:.3g}"
    return f"{x:.4g}"


# --------------------------------------------------------------------------- row helpers


def _num(x: Any) -> float | None:
    """A finite float, or None for blanks, NaN and non-numbers."""
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _text(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return str(x).strip()


def _seed(row: Mapping[str, Any]) -> Any:
    """The row's seed as an int when it is a whole number, else the text, else None."""
    v = _num(row.get("seed"))
    if v is not None:
        return int(v) if v == int(v) else v
    t = _text(row.get("seed"))
    return t or None


def ok_rows(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Rows with status ok (or no status) and a finite value."""
    return [r for r in rows if _text(r.get("status")) in ("", "ok") and _num(r.get("value")) is not None]


def estimate(rows: Sequence[Mapping[str, Any]]) -> Estimate | None:
    """The estimate of one quantity from its ok rows (None when there are none).

    A row with finite `sd` and `n_seeds` is a summary of n seeds. Seeded rows give one value
    per seed (the row with the largest `step` when there is a step column, else the mean of
    a seed's rows). Unseeded rows that agree are exact when a row says `exact=True`, else one
    value of unknown spread; unseeded rows that differ are treated as repeated measurements."""
    rows = ok_rows(rows)
    if not rows:
        return None
    if len(rows) == 1 and (_num(rows[0].get("n_seeds")) or 0) >= 1:
        r = rows[0]
        mean, sd, n = float(r["value"]), _num(r.get("sd")), int(_num(r["n_seeds"]))
        hw = t_quantile(n - 1) * sd / math.sqrt(n) if n >= 2 and sd is not None else None
        return Estimate(mean, hw, n, sd, note="from a summary row (sd, n_seeds)")

    seeded = [r for r in rows if _seed(r) is not None]
    if seeded:
        per_seed: dict[Any, list[tuple[float, float]]] = {}
        for r in seeded:
            per_seed.setdefault(_seed(r), []).append((_num(r.get("step")) or 0.0, float(r["value"])))
        note = ""
        by_seed: dict[Any, float] = {}
        for s, items in per_seed.items():
            steps = {st for st, _ in items}
            if len(items) > 1 and len(steps) > 1:
                last = max(steps)
                by_seed[s] = sum(v for st, v in items if st == last) / sum(1 for st, _ in items if st == last)
                note = "last step of each seed"
            else:
                by_seed[s] = sum(v for _, v in items) / len(items)
                if len(items) > 1:
                    note = "rows of a seed averaged"
        if len(seeded) < len(rows):
            note = (note + "; " if note else "") + f"{len(rows) - len(seeded)} unseeded rows ignored"
        return from_samples(by_seed, note=note)

    values = [float(r["value"]) for r in rows]
    if max(values) == min(values):
        if any(is_exact(r) for r in rows):
            return Estimate(values[0], 0.0, 0, 0.0, exact=True)
        # An unseeded number may be a mean over seeds: without exact=True its spread is unknown.
        return Estimate(values[0], None, 1, None, note="no seed and not marked exact: spread unknown")
    return from_samples(dict(enumerate(values)), note=f"{len(values)} unseeded rows treated as repeats")


def is_exact(row: Mapping[str, Any]) -> bool:
    """Whether a row marks itself as a deterministic quantity (`exact` = true/1/yes)."""
    return _text(row.get("exact")).lower() in ("true", "1", "1.0", "yes")


def from_samples(by_seed: Mapping[Any, float], note: str = "") -> Estimate:
    """Mean and t-interval of per-seed values (spread unknown with a single seed)."""
    vals = list(by_seed.values())
    n = len(vals)
    mean = sum(vals) / n
    if n < 2:
        return Estimate(mean, None, n, None, by_seed=dict(by_seed), note=note)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    return Estimate(mean, t_quantile(n - 1) * sd / math.sqrt(n), n, sd, by_seed=dict(by_seed), note=note)


def difference(a: Estimate, b: Estimate) -> Estimate:
    """The estimate of a - b: paired by seed when both share two or more seeds, exact when
    both are exact, Welch's interval when both spreads are known, else spread unknown."""
    mean = a.mean - b.mean
    common = [s for s in a.by_seed if s in b.by_seed]
    if len(common) >= 2 and not a.exact and not b.exact:
        d = {s: a.by_seed[s] - b.by_seed[s] for s in common}
        est = from_samples(d, note=f"paired over {len(common)} seeds")
        return est
    if a.exact and b.exact:
        return Estimate(mean, 0.0, 0, 0.0, exact=True)
    if not a.known or not b.known:
        n = max(a.n, b.n)
        return Estimate(mean, None, n, None, note="spread of an arm unknown")
    va = 0.0 if a.exact else (a.sd or 0.0) ** 2 / a.n
    vb = 0.0 if b.exact else (b.sd or 0.0) ** 2 / b.n
    se2 = va + vb
    if se2 == 0:
        return Estimate(mean, 0.0, max(a.n, b.n), 0.0, note="no spread in either arm")
    den = (va**2 / (a.n - 1) if va else 0.0) + (vb**2 / (b.n - 1) if vb else 0.0)
    df = se2**2 / den
    return Estimate(mean, t_quantile(df) * math.sqrt(se2), min(x for x in (a.n, b.n) if x) or 0,
                    math.sqrt(se2), note=f"Welch, df={df:.1f}")


# --------------------------------------------------------------------------- the rules


def judge_sign(d: Estimate, op: str = ">") -> tuple[str, str]:
    """Verdict for a difference whose claimed sign is given by `op` (">", ">=", "<", "<=")."""
    sign = 1 if op.startswith(">") else -1
    side = "> 0" if sign > 0 else "< 0"
    if d.exact:
        s = d.mean * sign
        if s > 0 or (s == 0 and op.endswith("=")):
            return REPRODUCED_QUALITATIVELY, f"exact difference {fmt(d.mean)} is {side}"
        return NOT_REPRODUCED, f"exact difference {fmt(d.mean)} is not {side}"
    if not d.known:
        return NOT_RESOLVED, f"difference {fmt(d.mean)} has no confidence interval (fewer than 2 seeds)"
    # the interval on the claimed scale: positive means the claim's direction
    lo, hi = (d.low, d.high) if sign > 0 else (-d.high, -d.low)
    ci = f"[{fmt(d.low)}, {fmt(d.high)}]"
    if lo > 0:
        return REPRODUCED_QUALITATIVELY, f"95% CI of the difference {ci} lies entirely {side}"
    if hi < 0:
        return NOT_REPRODUCED, f"95% CI of the difference {ci} lies entirely on the opposite side of 0"
    return NOT_RESOLVED, f"95% CI of the difference {ci} contains 0"


def judge_value(est: Estimate, paper: float, rel_tol: float | None = None, abs_tol: float | None = None) -> tuple[str, str]:
    """Verdict for a value measured in the paper's own setting (comparison='value')."""
    if rel_tol is None and abs_tol is None:
        rel_tol = DEFAULT_REL_TOLERANCE
    tol = max(abs_tol or 0.0, (rel_tol or 0.0) * abs(paper))
    lo_band, hi_band = paper - tol, paper + tol
    band = f"[{fmt(lo_band)}, {fmt(hi_band)}]"
    tol_text = f"{rel_tol:.0%} relative" if rel_tol and tol == rel_tol * abs(paper) else f"+/- {fmt(tol)}"
    inside = lo_band <= est.mean <= hi_band
    if inside and est.known:
        return REPRODUCED_WITHIN_TOLERANCE, f"ours {fmt(est.mean)} is within the {tol_text} band {band}"
    if est.known and (est.high < lo_band or est.low > hi_band):
        what = "ours" if est.exact else "the 95% CI of ours"
        return NOT_REPRODUCED, f"{what} lies outside the {tol_text} band {band} around {fmt(paper)}"
    if not est.known:
        return NOT_RESOLVED, f"one seeded value ({fmt(est.mean)}) has no confidence interval; band {band}"
    return NOT_RESOLVED, f"the 95% CI [{fmt(est.low)}, {fmt(est.high)}] overlaps the band {band} but the mean is outside"


def judge_bound(est: Estimate, paper: float, comparison: str) -> tuple[str, str]:
    """Verdict for comparison='at_most' / 'at_least': the paper's value bounds ours."""
    at_most = comparison == "at_most"
    rel = "<=" if at_most else ">="
    if not est.known:
        return NOT_RESOLVED, f"one seeded value ({fmt(est.mean)}) has no confidence interval"
    near, far = (est.high, est.low) if at_most else (est.low, est.high)
    holds = (lambda x: x <= paper) if at_most else (lambda x: x >= paper)
    what = f"ours {fmt(est.mean)}" if est.exact else f"the 95% CI [{fmt(est.low)}, {fmt(est.high)}]"
    if holds(near):
        return REPRODUCED_QUALITATIVELY, f"{what} is {rel} {fmt(paper)}"
    if not holds(far):
        return NOT_REPRODUCED, f"{what} is entirely beyond the bound {fmt(paper)}"
    return NOT_RESOLVED, f"{what} straddles the bound {fmt(paper)}"


def parse_ordering(method: str) -> tuple[str, str, list[str]] | None:
    """`"X > Y"` -> ("X", ">", ["Y"]); `"X > Y, Z"` -> ("X", ">", ["Y", "Z"]); else None."""
    m = _ORDERING.match(method or "")
    if not m:
        return None
    rights = [r.strip() for r in m.group("right").split(",") if r.strip()]
    return (m.group("left").strip(), m.group("op"), rights) if rights else None


def is_difference_row(row: Mapping[str, Any]) -> bool:
    """A row whose value is already a difference between arms."""
    comp = _text(row.get("comparison")).lower()
    return comp == "difference" or (not comp and bool(_DIFF_METRIC.search(_text(row.get("metric")).lower())))


def arm_of(row: Mapping[str, Any]) -> str:
    """The arm a row belongs to: its `arm` column, else its `method`."""
    return _text(row.get("arm")) or _text(row.get("method"))


def comparison_of(rows: Sequence[Mapping[str, Any]]) -> str:
    """The declared comparison of a claim's rows (the most common non-blank value), or analogue."""
    counts: dict[str, int] = {}
    for r in rows:
        c = _text(r.get("comparison")).lower()
        if c:
            counts[c] = counts.get(c, 0) + 1
    if not counts:
        return "difference" if rows and all(is_difference_row(r) for r in rows) else "analogue"
    comp = max(counts, key=counts.get)
    if comp not in COMPARISONS:
        raise ValueError(f"unknown comparison {comp!r}; use one of {', '.join(COMPARISONS)}")
    return comp


def our_setting(rows: Sequence[Mapping[str, Any]], max_items: int = 8) -> str:
    """Our setting in words: the rows' `setting` column, else epsilon, method and every
    parameter column that has one value across the rows."""
    texts = sorted({_text(r.get("setting")) for r in rows} - {""})
    if texts:
        return "; ".join(texts)
    parts = []
    seeds = {_seed(r) for r in rows} - {None}
    for key in ["experiment", "epsilon", "method"] + sorted({k for r in rows for k in r} - _STAT_COLUMNS - {"epsilon", "method"}):
        vals = {_text(r.get(key)) for r in rows}
        vals.discard("")
        if not vals:
            continue
        if len(vals) == 1:
            v = vals.pop()
            num = _num(v)
            parts.append(f"{'eps' if key == 'epsilon' else key}={fmt(num) if num is not None and key != 'experiment' else v}")
        elif key in ("method", "epsilon"):
            parts.append(f"{key}={'/'.join(sorted(vals))}")
        if len(parts) >= max_items:
            break
    if seeds:
        parts.append(f"seeds={len(seeds)}")
    return ", ".join(parts)


def _paper_value(claim: Mapping[str, Any]) -> float | None:
    return _num(claim.get("value"))


def _rows_for_arm(arm: str, tagged: Sequence[Mapping[str, Any]], context: Sequence[Mapping[str, Any]]):
    """Rows of one arm: tagged rows first; else (fallback) the arm's rows of the same
    experiment and metric as the tagged ones (untagged, or tagged for another claim), so a
    notebook that tagged only one arm of a sweep still gets judged against the others."""
    own = [r for r in tagged if arm_of(r) == arm]
    if own or not tagged:
        return own, False
    keys = {(_text(r.get("experiment")), _text(r.get("metric"))) for r in tagged}
    other = [r for r in ok_rows(context) if arm_of(r) == arm and not is_difference_row(r)
             and (_text(r.get("experiment")), _text(r.get("metric"))) in keys]
    return other, bool(other)


def judge(claim: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
          context: Sequence[Mapping[str, Any]] = ()) -> Verdict:
    """The verdict of one claim (a paper_values.csv row) from the metrics rows tagged with
    its claim_id. `context` are the other rows of the same notebooks, used only to find an
    arm of an ordering claim that the notebook did not tag."""
    rows = list(rows)
    good = ok_rows(rows)
    failed = [r for r in rows if _text(r.get("status")) == "failed"]
    if not good:
        if failed:
            reasons = sorted({_text(r.get("reason")) for r in failed} - {""})
            return Verdict(NOT_RUN, f"all {len(failed)} rows failed: " + "; ".join(reasons)[:300], n_rows=len(rows))
        return Verdict(NOT_RUN, "no rows with this claim_id in this profile", n_rows=0)
    setting = our_setting(good)
    paper = _paper_value(claim)
    ordering = parse_ordering(_text(claim.get("method")))

    try:
        comp = comparison_of(good)
    except ValueError as exc:
        return Verdict(NOT_RESOLVED, f"cannot judge: {exc}", our_setting=setting, n_rows=len(rows))

    if ordering or comp == "difference":
        op = ordering[1] if ordering else ">"
        diff_rows = [r for r in good if is_difference_row(r)]
        diff_verdict = None
        if diff_rows or not ordering:
            est = estimate(diff_rows or good)
            verdict, why = judge_sign(est, op)
            label = f"{ordering[0]} - {', '.join(ordering[2])}" if ordering else "difference"
            diff_verdict = Verdict(verdict, f"ordering/difference rule: {why}", f"{label} = {est.describe()}",
                                   setting, est, len(rows))
            # Difference rows without spread decide nothing; per-seed arm rows may still.
            if est.known or not ordering:
                return diff_verdict
        arm_rows = [r for r in good if not is_difference_row(r)]
        left, _, rights = ordering

        def missing_arm(arm):
            found = ", ".join(sorted({arm_of(r) for r in good})) or "none"
            return Verdict(NOT_RUN, f"no rows for arm {arm!r} (arms found: {found})", our_setting=setting,
                           n_rows=len(rows))

        left_rows, left_fb = _rows_for_arm(left, arm_rows, context)
        if not left_rows:
            return diff_verdict or missing_arm(left)
        a = estimate(left_rows)
        tag_note = " (rows not tagged with this claim)"
        outcomes, parts, ests, diffs = [], [f"{left}{tag_note if left_fb else ''} {a.describe()}"], [], []
        for right in rights:
            right_rows, fb = _rows_for_arm(right, arm_rows, context)
            if not right_rows:
                return diff_verdict or missing_arm(right)
            b = estimate(right_rows)
            d = difference(a, b)
            ests.append(d)
            verdict, why = judge_sign(d, op)
            outcomes.append((verdict, f"{left} vs {right}: {why}"))
            src = tag_note if fb else ""
            parts.append(f"{right}{src} {b.describe()}")
            diffs.append(f"{left} - {right} = {d.describe()}")
        verdicts = [v for v, _ in outcomes]
        if NOT_REPRODUCED in verdicts:
            final = NOT_REPRODUCED
        elif all(v == REPRODUCED_QUALITATIVELY for v in verdicts):
            final = REPRODUCED_QUALITATIVELY
        else:
            final = NOT_RESOLVED
        rule = "ordering rule: " + "; ".join(w for _, w in outcomes)
        return Verdict(final, rule, " | ".join(diffs + ["; ".join(parts)]), setting, ests[0] if len(ests) == 1 else None, len(rows))

    est = estimate(good)
    methods = sorted({arm_of(r) for r in good} - {""})
    ours = est.describe() + (f"; methods pooled: {', '.join(methods)}" if len(methods) > 1 else "")
    if comp == "analogue":
        return Verdict(NOT_RESOLVED, "analogue rule: our rows come from a different (smaller) setting than the "
                       "paper's; shown for context, not judged (tag comparison='value' only for the paper's own setting)",
                       ours, setting, est, len(rows))
    if paper is None:
        return Verdict(NOT_RESOLVED, f"cannot judge comparison={comp!r}: paper_values.csv gives no value for this claim",
                       ours, setting, est, len(rows))
    if comp == "value":
        tols = [(_num(r.get("tolerance")), _num(r.get("abs_tolerance"))) for r in good]
        rel = next((t for t, _ in tols if t is not None), None)
        ab = next((t for _, t in tols if t is not None), None)
        verdict, why = judge_value(est, paper, rel, ab)
        return Verdict(verdict, f"value rule: {why}", ours, setting, est, len(rows))
    verdict, why = judge_bound(est, paper, comp)
    return Verdict(verdict, f"bound rule ({comp}): {why}", ours, setting, est, len(rows))
