"""Verdict rules: does a claim of a paper hold in our results?

Functions over plain rows (dicts of one `metrics.csv` row each, no pandas), so the rules can
be tested exhaustively and read in one place. `judge(claim, rows)` returns a `Verdict` with
one of `VERDICTS` (or, for a `derived check`, one of `CHECK_VERDICTS`), the text of the rule
that decided it, our numbers and the rows it refused. The report
(dpbench.workbench.report) and `dpbench compare` are the callers.

What is judged is fixed by the claim row of references/paper_values.csv, written before any
run: its `kind` (claim / cited context / derived check), its `test` (superiority,
noninferiority with a `margin` and its `margin_source`, value, at_most, at_least, context),
its `setting_keys` (which of our rows are in the claim's setting) and its `combine` (how
several settings of one claim combine). Rows only supply numbers; see README "The report"
for the columns a notebook's rows must carry.

The estimand of an empirical claim is the expected paired difference over training
randomness (seeds), on the fixed test set. Its 95% t interval over seeds is shown beside an
exact sign-flip randomization test; an empirical verdict needs both to agree, at least
`MIN_SEEDS` paired seeds, and a nonzero spread.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

REPRODUCED_QUALITATIVELY = "reproduced qualitatively"
REPRODUCED_WITHIN_TOLERANCE = "reproduced within tolerance"
NOT_REPRODUCED = "not reproduced"
LEANS_AGAINST = "inconclusive (leans against)"
INCONCLUSIVE = "inconclusive"
NOT_COMPARABLE = "not comparable"
NOT_RUN = "not run"
VERDICTS = (REPRODUCED_QUALITATIVELY, REPRODUCED_WITHIN_TOLERANCE, NOT_REPRODUCED, LEANS_AGAINST, INCONCLUSIVE,
            NOT_COMPARABLE, NOT_RUN)
# The verdicts of experiments (the tally); not comparable (analogues) is counted apart.
EMPIRICAL_VERDICTS = (REPRODUCED_QUALITATIVELY, REPRODUCED_WITHIN_TOLERANCE, NOT_REPRODUCED, LEANS_AGAINST,
                      INCONCLUSIVE, NOT_RUN)
CONSISTENT = "consistent"
INCONSISTENT = "inconsistent"
CHECK_VERDICTS = (CONSISTENT, INCONSISTENT, NOT_RUN)
CONTEXT = "context (not judged)"

KINDS = ("claim", "cited context", "derived check")
TESTS = ("superiority", "noninferiority", "value", "at_most", "at_least", "context")
COMBINES = ("single", "mean over band", "difference of differences")  # and "max over <column>"
COMPARISONS = ("value", "at_most", "at_least", "difference", "analogue")
DEFAULT_REL_TOLERANCE = 0.05
CONFIDENCE = 0.95
ALPHA = (1 - CONFIDENCE) / 2  # one-sided level of each test: 2.5%
MIN_SEEDS = 6
POWER_Z = 0.8416212335729143  # 80% power
EXACT_SIGNFLIP_MAX_N = 14     # above: 16384 random sign vectors (seeded), said so in the rule

RULES: dict[str, str] = {
    "estimand": "The quantity judged is the expected paired difference over training randomness (seeds) on the "
                "fixed test set: per seed, claimed arm minus other arm (or ours minus the paper's bound), sign "
                "turned so that positive is the claimed side. Its 95% t interval over seeds is shown beside an exact "
                f"sign-flip randomization test (one-sided, level {ALPHA:.1%}; all 2^n sign vectors up to n = "
                f"{EXACT_SIGNFLIP_MAX_N}, else 16384 seeded random ones). Both must agree for an empirical verdict.",
    REPRODUCED_QUALITATIVELY: "The whole 95% CI of the claimed difference lies on the claimed side (above 0; for a "
                              "noninferiority claim above -margin) and the sign-flip test rejects the opposite at "
                              f"{ALPHA:.1%}, with >= {MIN_SEEDS} paired seeds and a nonzero spread.",
    REPRODUCED_WITHIN_TOLERANCE: "test=value, our rows in the paper's own setting (comparison=value): the whole 95% CI "
                                 "of ours lies inside the tolerance band around the paper's value (the claim's margin, "
                                 "else 5% relative), with the same seed rules.",
    NOT_REPRODUCED: "The whole 95% CI lies on the other side (below 0; for noninferiority below -margin; for a value "
                    "claim outside the band) and the sign-flip test agrees, with the same seed rules.",
    LEANS_AGAINST: "Not decided, and the point estimate is on the wrong side (below 0, below -margin, or outside the "
                   "band).",
    INCONCLUSIVE: f"Otherwise: the CI straddles, fewer than {MIN_SEEDS} paired seeds, or a zero-width interval (every "
                  "seed gave the same number: a discrete outcome decides nothing). Shown with the smallest effect the "
                  "experiment could detect (80% power) and the seeds the observed spread says would resolve it.",
    NOT_COMPARABLE: "Our rows are a small-scale analogue (comparison=analogue, the default for value and bound claims) "
                    "of a number measured in a setting we do not run: both are shown in their units (ratios to "
                    "non-private training where the units cannot match), never judged, and not in the tally.",
    NOT_RUN: "No ok row carries the claim_id, every such row failed, an arm has no rows, or every row was refused for "
             "lying outside the claim's setting (the reason is shown).",
    "settings": "The claim row names its setting keys (epsilon=8, epsilon in [1, 10], n*epsilon in [a, b], ...). A row "
                "lacking a key or outside the setting is refused with a reason, never pooled. Within an arm and seed, "
                "rows that differ in any parameter column are refused unless the claim says how they combine: "
                "'mean over band' (per seed, the average over the band's settings), 'difference of differences' "
                "(two settings joined by ' vs ': per seed, (X - Y at the first) - (X - Y at the second)) or "
                "'max over <column>' (per seed, the maximum, e.g. over models). The CI is then taken over seeds.",
    "arms": "The arms of an ordering claim ('X > Y', 'X >= Y, Z') are named in the claim. A data-chosen arm "
            "('best...', 'worst...') is chosen on rows with split=select and judged only on rows with split=evaluate "
            "(without a split column: on the later half of the seeds, chosen on the earlier half). 'X > Y, Z' must "
            "hold against every arm; the least favourable pair is shown.",
    "noninferiority": "'>=', 'matches' and 'on par' claims are tested as noninferiority: the claimed arm minus the "
                      "other is above -margin, where the margin and its source are written in paper_values.csv before "
                      "any run and never tuned afterwards.",
    "consistency": "kind=derived check (closed-form numbers, accountant properties): consistent when every row's value "
                   "meets the check (within the margin of the paper's value, or on the bound's side). These confirm the "
                   "code, not the paper's experiments, and are never counted as reproductions.",
}

# Columns that describe a measurement rather than the setting (never setting keys, never pooling evidence).
_STAT_COLUMNS = {
    "experiment", "metric", "value", "status", "reason", "claim_id", "seed", "sd", "std", "se", "n_seeds",
    "comparison", "tolerance", "abs_tolerance", "arm", "method", "setting", "step", "ci_low", "ci_high", "exact",
    "split", "selection", "unit", "reading", "paper", "_notebook",
}

_ORDERING = re.compile(r"^\s*(?P<left>[^<>=]+?)\s*(?P<op>>=|<=|>|<)\s*(?P<right>[^<>=]+?)\s*$")
_DIFF_METRIC = re.compile(r"difference|_minus_")
_DATA_CHOSEN = re.compile(r"^(best|worst)(\b|_)", re.I)

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

    def describe(self, unit: str = "") -> str:
        """E.g. "0.912 [0.899, 0.925] (95% CI, 3 seeds)", "8.51 (exact)"."""
        u = f" {unit}" if unit else ""
        if self.exact:
            text = f"{fmt(self.mean)}{u} (exact)"
        elif self.half_width is None:
            text = f"{fmt(self.mean)}{u} ({self.n} seed, spread unknown)"
        else:
            text = f"{fmt(self.mean)}{u} [{fmt(self.low)}, {fmt(self.high)}] (95% CI, {self.n} seeds)"
        return f"{text}; {self.note}" if self.note else text


@dataclass(frozen=True)
class Verdict:
    """The outcome of one claim: the verdict, the rule that decided it and our numbers.

    For the forest plot: `effect`, `low`, `high` are the claimed difference (positive = the
    claimed side) and its 95% CI, `boundary` the line it must clear (0, or -margin), or for a
    value claim `band` the tolerance band around the paper's value."""

    verdict: str
    rule: str
    ours: str = ""
    our_setting: str = ""
    estimate: Estimate | None = None
    n_rows: int = 0
    refused: tuple[str, ...] = ()
    effect: float | None = None
    low: float | None = None
    high: float | None = None
    boundary: float = 0.0
    band: tuple[float, float] | None = None
    label: str = ""
    p_value: float | None = None
    detectable: float | None = None
    seeds_needed: int | None = None


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


def _norm(x: Any) -> str:
    """A cell as comparable text ("8", "8.0" -> "8"; blanks -> "")."""
    t = _text(x)
    if t.lower() in ("nan", "none"):
        return ""
    v = _num(t)
    if v is not None:
        return str(int(v)) if v == int(v) and abs(v) < 1e15 else repr(v)
    return t


def ok_rows(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Rows with status ok (or no status) and a finite value."""
    return [r for r in rows if _text(r.get("status")) in ("", "ok") and _num(r.get("value")) is not None]


def is_exact(row: Mapping[str, Any]) -> bool:
    """Whether a row marks itself as a deterministic quantity (`exact` = true/1/yes)."""
    return _text(row.get("exact")).lower() in ("true", "1", "1.0", "yes")


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
        by_seed, note = _last_step_by_seed(seeded)
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


def _last_step_by_seed(seeded: Sequence[Mapping[str, Any]]) -> tuple[dict[Any, float], str]:
    per_seed: dict[Any, list[tuple[float, float]]] = {}
    for r in seeded:
        per_seed.setdefault(_seed(r), []).append((_num(r.get("step")) or 0.0, float(r["value"])))
    note, out = "", {}
    for s, items in per_seed.items():
        steps = {st for st, _ in items}
        last = max(steps)
        vals = [v for st, v in items if st == last]
        out[s] = sum(vals) / len(vals)
        if len(steps) > 1:
            note = "last step of each seed"
        elif len(items) > 1:
            note = "rows of a seed averaged"
    return out, note


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
    """The estimate of a - b: paired by seed when both have the same two or more seeds (so
    the difference of the means is the mean of the differences), exact when both are exact,
    Welch's interval when both spreads are known, else spread unknown."""
    mean = a.mean - b.mean
    if len(a.by_seed) >= 2 and set(a.by_seed) == set(b.by_seed) and not a.exact and not b.exact:
        return from_samples({s: a.by_seed[s] - b.by_seed[s] for s in a.by_seed}, note=f"paired over {len(a.by_seed)} seeds")
    if a.exact and b.exact:
        return Estimate(mean, 0.0, 0, 0.0, exact=True)
    if not a.known or not b.known:
        return Estimate(mean, None, max(a.n, b.n), None, note="spread of an arm unknown")
    va = 0.0 if a.exact else (a.sd or 0.0) ** 2 / a.n
    vb = 0.0 if b.exact else (b.sd or 0.0) ** 2 / b.n
    se2 = va + vb
    if se2 == 0:
        return Estimate(mean, 0.0, max(a.n, b.n), 0.0, note="no spread in either arm")
    den = (va**2 / (a.n - 1) if va else 0.0) + (vb**2 / (b.n - 1) if vb else 0.0)
    df = se2**2 / den
    return Estimate(mean, t_quantile(df) * math.sqrt(se2), min(x for x in (a.n, b.n) if x) or 0,
                    math.sqrt(se2), note=f"Welch, df={df:.1f}")


# --------------------------------------------------------------------------- paired statistics (vectorised)


def _sign_matrix(n: int) -> tuple[np.ndarray, bool]:
    """All 2^n sign vectors (exact) up to EXACT_SIGNFLIP_MAX_N, else 16384 seeded random ones
    with the identity first."""
    if n <= EXACT_SIGNFLIP_MAX_N:
        idx = np.arange(2**n)[:, None] >> np.arange(n)[None, :]
        return 1.0 - 2.0 * (idx & 1), True
    rng = np.random.default_rng(20221209)
    s = rng.choice([-1.0, 1.0], size=(16384, n))
    s[0] = 1.0
    return s, False


def paired_stats(d: np.ndarray, boundary: float = 0.0) -> dict[str, np.ndarray]:
    """Statistics of per-seed differences `d` (shape (..., n), n >= 2) against `boundary`.

    Returns arrays over the leading axes: mean, sd, half_width (95% t), low, high, p_up (sign-flip
    p-value of H0 "mean <= boundary"), p_down (of H0 "mean >= boundary"), detectable (smallest
    effect beyond the boundary found with 80% power at this n and spread)."""
    d = np.asarray(d, dtype=float)
    n = d.shape[-1]
    mean = d.mean(axis=-1)
    sd = d.std(axis=-1, ddof=1)
    hw = t_quantile(n - 1) * sd / math.sqrt(n)
    x = d - boundary
    signs, _ = _sign_matrix(n)
    obs = x.sum(axis=-1)
    flips = x @ signs.T  # (..., 2^n)
    tol = 1e-12 * (np.abs(x).sum(axis=-1) + 1.0)
    p_up = (flips >= (obs - tol)[..., None]).mean(axis=-1)
    p_down = (flips <= (obs + tol)[..., None]).mean(axis=-1)
    detectable = (t_quantile(n - 1) + POWER_Z) * sd / math.sqrt(n)
    return {"mean": mean, "sd": sd, "half_width": hw, "low": mean - hw, "high": mean + hw, "p_up": p_up,
            "p_down": p_down, "detectable": detectable, "n": np.full(mean.shape, n)}


def decide(stats: Mapping[str, np.ndarray], boundary: float = 0.0) -> np.ndarray:
    """The verdict of each set of paired differences from `paired_stats` (an array of
    verdict strings): reproduced only when the t interval and the sign-flip test agree, with
    >= MIN_SEEDS seeds and a nonzero spread; leans against when the mean is below `boundary`."""
    mean, sd, lo, hi = (np.asarray(stats[k]) for k in ("mean", "sd", "low", "high"))
    n = np.asarray(stats["n"])
    usable = (n >= MIN_SEEDS) & (sd > 0)
    up = usable & (lo > boundary) & (np.asarray(stats["p_up"]) <= ALPHA)
    down = usable & (hi < boundary) & (np.asarray(stats["p_down"]) <= ALPHA)
    out = np.where(mean < boundary, LEANS_AGAINST, INCONCLUSIVE).astype(object)
    out[up] = REPRODUCED_QUALITATIVELY
    out[down] = NOT_REPRODUCED
    return out


def seeds_needed(effect: float, sd: float, boundary: float = 0.0) -> int | None:
    """Seeds that would resolve an effect of this size at this spread (80% power, t-corrected);
    None when the spread is zero or unknown, or the effect sits on the boundary."""
    gap = abs(effect - boundary)
    if not sd or sd <= 0 or gap == 0 or not math.isfinite(sd):
        return None
    n = max(MIN_SEEDS, math.ceil(((1.96 + POWER_Z) * sd / gap) ** 2))
    while n < 100000 and (t_quantile(n - 1) + POWER_Z) * sd / math.sqrt(n) > gap:
        n += 1
    return n


def select_extremes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the best and worst arm (largest and smallest mean over the last axis);
    values has shape (..., arms, seeds)."""
    m = np.asarray(values, dtype=float).mean(axis=-1)
    return m.argmax(axis=-1), m.argmin(axis=-1)


# --------------------------------------------------------------------------- the claim row


@dataclass(frozen=True)
class Condition:
    """One setting condition: `key` (a column, or `a*b` for a product of columns) `op` values."""

    key: str
    op: str               # "=", "in", "<", "<=", ">", ">="
    values: tuple = ()    # "=": (v,); "in": a set of values, or a range (lo, hi, lo_closed, hi_closed)
    is_range: bool = False

    def text(self) -> str:
        if self.op == "in" and self.is_range:
            lo, hi, lc, hc = self.values
            return f"{self.key} in {'[' if lc else '('}{fmt(lo)}, {fmt(hi)}{']' if hc else ')'}"
        if self.op == "in":
            return f"{self.key} in {{{', '.join(_show(v) for v in self.values)}}}"
        return f"{self.key}{self.op}{_show(self.values[0])}"

    def value_of(self, row: Mapping[str, Any]) -> Any:
        if "*" in self.key:
            parts = [_num(row.get(k.strip())) for k in self.key.split("*")]
            return None if any(p is None for p in parts) else math.prod(parts)
        v = _num(row.get(self.key))
        return v if v is not None else (_text(row.get(self.key)) or None)

    def holds(self, v: Any) -> bool:
        if self.op == "=":
            return _same(v, self.values[0])
        if self.op == "in" and self.is_range:
            lo, hi, lc, hc = self.values
            return isinstance(v, float) and (lo < v or (lc and lo == v)) and (v < hi or (hc and v == hi))
        if self.op == "in":
            return any(_same(v, x) for x in self.values)
        if not isinstance(v, float):
            return False
        b = self.values[0]
        return {"<": v < b, "<=": v <= b, ">": v > b, ">=": v >= b}[self.op]


def _show(v: Any) -> str:
    return fmt(v) if isinstance(v, float) else str(v)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return str(a) == str(b)


_COND = re.compile(r"^\s*(?P<key>[A-Za-z_][\w.*]*)\s*(?P<op>>=|<=|=|<|>|\bin\b)\s*(?P<rest>.+?)\s*$")


def parse_setting(text: str) -> list[list[Condition]]:
    """`setting_keys` -> sides of conditions. "epsilon=8" -> [[eps = 8]]; "epsilon in [1, 10];
    model=resnet18" -> one side, two conditions; "epsilon in (0, 1) vs epsilon in [1, 10]" -> two
    sides (for 'difference of differences'). ValueError on anything else."""
    text = _text(text)
    if not text:
        return []
    sides = []
    for side in text.split(" vs "):
        conds = []
        for part in side.split(";"):
            if not part.strip():
                continue
            m = _COND.match(part)
            if not m:
                raise ValueError(f"cannot read setting condition {part.strip()!r}; write key=value, key in [lo, hi], "
                                 "key in {a, b} or key<value")
            key, op, rest = m.group("key"), m.group("op"), m.group("rest")
            if op == "in":
                rm = re.fullmatch(r"([\[(])\s*([^,]+?)\s*,\s*([^,]+?)\s*([\])])", rest)
                sm = re.fullmatch(r"\{(.*)\}", rest)
                if rm and _num(rm.group(2)) is not None and _num(rm.group(3)) is not None:
                    conds.append(Condition(key, "in", (_num(rm.group(2)), _num(rm.group(3)), rm.group(1) == "[",
                                                       rm.group(4) == "]"), True))
                elif sm:
                    vals = tuple(_num(v) if _num(v) is not None else v.strip() for v in sm.group(1).split(",") if v.strip())
                    conds.append(Condition(key, "in", vals))
                else:
                    raise ValueError(f"cannot read {part.strip()!r}: 'in' takes [lo, hi], (lo, hi) or {{a, b}}")
            else:
                v = _num(rest)
                if op != "=" and v is None:
                    raise ValueError(f"{part.strip()!r}: {op} needs a number")
                conds.append(Condition(key, op, (v if v is not None else rest.strip(),)))
        if not conds:
            raise ValueError(f"empty side in setting {text!r}")
        sides.append(conds)
    return sides


def parse_ordering(method: str) -> tuple[str, str, list[str]] | None:
    """`"X > Y"` -> ("X", ">", ["Y"]); `"X > Y, Z"` -> ("X", ">", ["Y", "Z"]); else None."""
    m = _ORDERING.match(method or "")
    if not m:
        return None
    rights = [r.strip() for r in m.group("right").split(",") if r.strip()]
    return (m.group("left").strip(), m.group("op"), rights) if rights else None


@dataclass(frozen=True)
class ClaimSpec:
    """What a paper_values.csv row says about how it is judged."""

    kind: str
    test: str
    margin: float | None
    margin_source: str
    sides: list
    combine: str
    unit: str
    ordering: tuple | None
    paper: float | None

    @property
    def max_over(self) -> str:
        return self.combine[len("max over "):].strip() if self.combine.startswith("max over ") else ""


def claim_spec(claim: Mapping[str, Any]) -> ClaimSpec:
    """Read (and check) a claim row's judging columns; ValueError names what is wrong.
    Blank `kind` is claim; blank `test` follows the method ('>'/'<': superiority, '>='/'<=':
    noninferiority) or the value (value)."""
    ordering = parse_ordering(_text(claim.get("method")))
    kind = _text(claim.get("kind")).lower() or "claim"
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    test = _text(claim.get("test")).lower()
    if not test:
        if kind == "cited context":
            test = "context"
        elif ordering:
            test = "noninferiority" if ordering[1] in (">=", "<=") else "superiority"
        else:
            test = "value"
    if test not in TESTS:
        raise ValueError(f"test {test!r} is not one of {', '.join(TESTS)}")
    if test in ("superiority", "noninferiority") and not ordering:
        raise ValueError(f"test {test} needs an ordering 'X > Y' in the method column")
    margin = _num(claim.get("margin"))
    if _text(claim.get("margin")) and margin is None:
        raise ValueError(f"margin {claim.get('margin')!r} is not a number")
    if test == "noninferiority" and (margin is None or margin < 0 or not _text(claim.get("margin_source"))):
        raise ValueError("a noninferiority claim needs a margin >= 0 and its margin_source")
    combine = _text(claim.get("combine")).lower() or "single"
    if combine not in COMBINES and not re.fullmatch(r"max over \w+", combine):
        raise ValueError(f"combine {combine!r} is not one of {', '.join(COMBINES)} or 'max over <column>'")
    sides = parse_setting(_text(claim.get("setting_keys")))
    if combine == "difference of differences" and len(sides) != 2:
        raise ValueError("combine 'difference of differences' needs two settings joined by ' vs ' in setting_keys")
    if combine != "difference of differences" and len(sides) > 1:
        raise ValueError("settings joined by ' vs ' need combine 'difference of differences'")
    return ClaimSpec(kind, test, margin, _text(claim.get("margin_source")), sides, combine,
                     _text(claim.get("unit")), ordering, _num(claim.get("value")))


# --------------------------------------------------------------------------- rows in the claim's setting


def is_difference_row(row: Mapping[str, Any]) -> bool:
    """A row whose value is already a difference between arms."""
    comp = _text(row.get("comparison")).lower()
    return comp == "difference" or (not comp and bool(_DIFF_METRIC.search(_text(row.get("metric")).lower())))


def arm_of(row: Mapping[str, Any]) -> str:
    """The arm a row belongs to: its `arm` column, else its `method`."""
    return _text(row.get("arm")) or _text(row.get("method"))


def split_by_setting(spec: ClaimSpec, rows: Sequence[Mapping[str, Any]]) -> tuple[list[list], list[str]]:
    """Our rows of each side of the claim's setting, and the reasons rows were refused
    (grouped: "3 rows lack setting key epsilon")."""
    if not spec.sides:
        return [list(rows)], []
    kept: list[list] = [[] for _ in spec.sides]
    refused: dict[str, int] = {}
    for r in rows:
        side = None
        for i, conds in enumerate(spec.sides):
            vals = [c.value_of(r) for c in conds]
            missing = [c.key for c, v in zip(conds, vals) if v is None]
            if missing:
                why = f"lack setting key {', '.join(missing)}"
                break
            if all(c.holds(v) for c, v in zip(conds, vals)):
                side = i
                break
            why = "lie outside the setting " + " vs ".join("; ".join(c.text() for c in s) for s in spec.sides) + \
                  " (" + ", ".join(f"{c.key}={_show(v)}" for c, v in zip(conds, vals)) + ")"
        if side is None:
            refused[why] = refused.get(why, 0) + 1
        else:
            kept[side].append(r)
    return kept, [f"{n} row{'s' if n > 1 else ''} {why}" for why, n in refused.items()]


def _varying(rows: Sequence[Mapping[str, Any]], ignore: set[str] = frozenset()) -> list[str]:
    """Parameter columns whose values differ among `rows`."""
    cols = {k for r in rows for k in r} - _STAT_COLUMNS - set(ignore)
    return sorted(c for c in cols if len({_norm(r.get(c)) for r in rows}) > 1)


def per_seed(rows: Sequence[Mapping[str, Any]], spec: ClaimSpec) -> tuple[dict[Any, float], str, str]:
    """One number per seed for the rows of one arm (or one difference) on one side of the
    setting: (values by seed, note, refusal). Rows of a seed that differ in a parameter column
    are combined only as the claim's `combine` says; otherwise the whole arm is refused."""
    seeded: dict[Any, list] = {}
    for r in rows:
        seeded.setdefault(_seed(r), []).append(r)
    keys = {c.key for side in spec.sides for c in side}
    conds = [c for side in spec.sides for c in side]
    out: dict[Any, float] = {}
    notes = set()
    if spec.combine in ("mean over band", "difference of differences") and conds:
        # a per-seed mean over a band compares like with like only when every seed covers the same settings
        covered = {s: frozenset(tuple(_norm(c.value_of(r)) for c in conds) for r in rs) for s, rs in seeded.items()}
        if len(set(covered.values())) > 1:
            return {}, "", ("seeds cover different settings of the band (" + "; ".join(
                f"seed {s}: {len(v)} settings" for s, v in list(covered.items())[:4]) + "): refused, not averaged")
    for s, rs in seeded.items():
        steps = [_num(r.get("step")) for r in rs]
        if any(st is not None for st in steps):  # the last step of a curve
            last = max(st for st in steps if st is not None)
            rs = [r for r, st in zip(rs, steps) if st == last or st is None]
        vals = [float(r["value"]) for r in rs]
        if len(rs) == 1:
            out[s] = vals[0]
            continue
        if spec.max_over:
            # per value of the column (a model, with its own resolution and batch), one setting; then the maximum
            col, groups = spec.max_over, {}
            for r in rs:
                groups.setdefault(_norm(r.get(col)), []).append(r)
            differ = sorted({c for g in groups.values() for c in _varying(g)})
            if differ:
                return {}, "", f"seed {s}: rows of one {col} differ in {', '.join(differ)}: refused, not pooled"
            out[s] = max(sum(float(r["value"]) for r in g) / len(g) for g in groups.values())
            notes.add(f"max over {col} ({len(groups)} values) per seed")
            continue
        differ = _varying(rs)
        if not differ:
            out[s] = sum(vals) / len(vals)
            notes.add("identical-setting rows of a seed averaged")
            continue
        if spec.combine in ("mean over band", "difference of differences") and not (set(differ) - keys - _derived(keys)):
            out[s] = sum(vals) / len(vals)
            notes.add(f"per seed, mean over the band's {', '.join(differ)} values")
            continue
        vals_text = "; ".join(f"{c}: {', '.join(sorted({_norm(r.get(c)) for r in rs}))}" for c in differ)
        return {}, "", (f"rows of one arm and seed ({s!r}) come from different settings ({vals_text}) and the claim "
                        f"declares no way to combine them (combine={spec.combine!r}): refused, not pooled")
    return out, "; ".join(sorted(notes)), ""


def _derived(keys: set[str]) -> set[str]:
    """Columns that move with a declared key (the parts of an a*b key)."""
    return {p.strip() for k in keys if "*" in k for p in k.split("*")}


# --------------------------------------------------------------------------- judging


def _unit_note(rows: Sequence[Mapping[str, Any]], unit: str) -> tuple[float, str]:
    """The factor that puts our values in the claim's unit: x100 for accuracies recorded as
    fractions when the paper's unit is %, else 1."""
    ours = {_text(r.get("unit")).lower() for r in rows} - {""}
    if unit.strip() == "%":
        if ours == {"fraction"} or (not ours and all("acc" in _text(r.get("metric")).lower() for r in rows)
                                    and all(0 <= float(r["value"]) <= 1 for r in rows)):
            return 100.0, "fractions shown in %"
    return 1.0, ""


def _empirical(diffs: dict[Any, float], boundary: float, label: str, unit: str = "") -> tuple[str, str, dict]:
    """Verdict and rule text for per-seed claimed differences (positive = claimed side)."""
    n = len(diffs)
    vals = np.array(list(diffs.values()), dtype=float)
    mean = float(vals.mean()) if n else float("nan")
    info = {"effect": mean, "n": n}
    u = f" {unit}" if unit else ""
    line = f"{fmt(boundary)}" if boundary else "0"
    if n < 2:
        why = f"{label}: {n} paired seed{'s' if n != 1 else ''}: no interval (needs >= {MIN_SEEDS})"
        v = LEANS_AGAINST if n and mean < boundary else INCONCLUSIVE
        return v, why, info
    st = {k: float(np.asarray(x)) for k, x in paired_stats(vals, boundary).items()}
    verdict = str(decide(st, boundary))
    p = st["p_up"]
    ci = f"[{fmt(st['low'])}, {fmt(st['high'])}]"
    info.update(low=st["low"], high=st["high"], p=p, sd=st["sd"])
    base = f"{label} = {fmt(mean)}{u}, 95% CI {ci}, sign-flip p (claimed side) = {fmt(p)}, {n} paired seeds"
    if verdict == REPRODUCED_QUALITATIVELY:
        return verdict, f"{base}: CI entirely above {line} and the sign-flip test agrees", info
    if verdict == NOT_REPRODUCED:
        return verdict, (f"{base}: CI entirely below {line} and the sign-flip test agrees "
                         f"(p of the opposite side = {fmt(st['p_down'])})"), info
    if n < MIN_SEEDS:
        reason = f"fewer than {MIN_SEEDS} paired seeds"
    elif st["sd"] == 0:
        reason = "zero-width interval: every seed gave the same difference, which decides nothing"
    elif st["low"] > boundary or st["high"] < boundary:
        reason = "the t interval and the sign-flip test disagree"
    else:
        reason = f"CI contains {line}"
    det = st["detectable"]
    need = seeds_needed(mean, st["sd"], boundary)
    info.update(detectable=det, seeds_needed=need)
    if st["sd"] > 0:
        extra = (f"; smallest detectable effect at this n: {fmt(det)}{u} (80% power); "
                 + (f"about {need} seeds would resolve the observed effect" if need else "the observed effect sits on the line"))
    else:
        extra = "; more seeds will not help, a finer measure (more test examples, a continuous metric) would"
    return verdict, f"{base}: {reason}{extra}", info


def _arm_values(arm: str, side_rows: Sequence, spec: ClaimSpec) -> tuple[dict, str, str]:
    rows = [r for r in side_rows if arm_of(r) == arm and not is_difference_row(r)]
    if not rows:
        return {}, "", f"no rows for arm {arm!r}"
    return per_seed(rows, spec)


def _seed_order(s: Any) -> tuple:
    return (0, s, "") if isinstance(s, (int, float)) else (1, 0, str(s))


def _data_chosen(spec: ClaimSpec, side_rows: Sequence) -> tuple[dict[Any, float], str, str]:
    """best - worst (per evaluation seed) among the candidate arms, chosen on other runs."""
    rows = [r for r in side_rows if not is_difference_row(r) and _seed(r) is not None]
    splits = {_text(r.get("split")).lower() for r in rows} - {""}
    if splits:
        sel = [r for r in rows if _text(r.get("split")).lower() == "select"]
        ev = [r for r in rows if _text(r.get("split")).lower() == "evaluate"]
        how = "chosen on split=select rows, judged on split=evaluate rows"
    else:
        seeds = sorted({_seed(r) for r in rows}, key=_seed_order)
        half = set(seeds[: len(seeds) // 2])
        sel = [r for r in rows if _seed(r) in half]
        ev = [r for r in rows if _seed(r) not in half]
        how = f"chosen on the first {len(half)} seeds, judged on the other {len(seeds) - len(half)}"
    arms = sorted({arm_of(r) for r in sel} & {arm_of(r) for r in ev})
    if len(arms) < 2:
        return {}, "", "a data-chosen arm needs >= 2 candidate arms with both select and evaluate runs"
    sel_vals = []
    for a in arms:
        v, _, why = per_seed([r for r in sel if arm_of(r) == a], spec)
        if why:
            return {}, "", why
        sel_vals.append(sum(v.values()) / len(v))
    best, worst = arms[int(np.argmax(sel_vals))], arms[int(np.argmin(sel_vals))]
    vb, _, wb = per_seed([r for r in ev if arm_of(r) == best], spec)
    vw, _, ww = per_seed([r for r in ev if arm_of(r) == worst], spec)
    if wb or ww:
        return {}, "", wb or ww
    common = sorted(set(vb) & set(vw), key=_seed_order)
    left, _, rights = spec.ordering
    m = _DATA_CHOSEN.match(left) or _DATA_CHOSEN.match(rights[0])
    sign = -1 if (m.string == left) == (m.group(1).lower() == "worst") else 1
    return ({s: sign * (vb[s] - vw[s]) for s in common},
            f"best = {best}, worst = {worst} ({how}, {len(arms)} candidates)", "")


def judge(claim: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
          context: Sequence[Mapping[str, Any]] = ()) -> Verdict:
    """The verdict of one claim (a paper_values.csv row) from the metrics rows tagged with
    its claim_id. `context` are the other rows of the same notebooks, used only to find an
    arm of an ordering claim that the notebook did not tag (same experiment and metric)."""
    rows = list(rows)
    try:
        spec = claim_spec(claim)
    except ValueError as exc:
        return Verdict(INCONCLUSIVE, f"cannot judge: the claim row is malformed: {exc}", n_rows=len(rows))
    if spec.test == "context":
        return Verdict(CONTEXT, "cited context: a number the paper cites from earlier work, shown, never judged",
                       n_rows=len(rows))
    good = ok_rows(rows)
    failed = [r for r in rows if _text(r.get("status")) == "failed"]
    not_run = NOT_RUN
    if not good:
        if failed:
            reasons = sorted({_text(r.get("reason")) for r in failed} - {""})
            return Verdict(not_run, f"all {len(failed)} rows failed: " + "; ".join(reasons)[:300], n_rows=len(rows))
        return Verdict(not_run, "no rows with this claim_id in this profile", n_rows=0)
    sides, refused = split_by_setting(spec, good)
    refused_t = tuple(refused)
    kept = [r for s in sides for r in s]
    setting = our_setting(kept or good)
    refusal = ("; refused: " + "; ".join(refused)) if refused else ""
    if not kept:
        return Verdict(not_run, "no rows in the claim's setting" + refusal, our_setting=setting, n_rows=len(rows),
                       refused=refused_t)
    if spec.kind == "derived check":
        return _judge_check(spec, kept, setting, refused_t, len(rows))
    if spec.test in ("superiority", "noninferiority"):
        ctx_sides, _ = split_by_setting(spec, ok_rows(context)) if context else ([[] for _ in sides], [])
        return _judge_ordering(spec, sides, ctx_sides, setting, refused_t, len(rows), refusal)
    return _judge_number(spec, kept, setting, refused_t, len(rows), refusal)


def _judge_ordering(spec, sides, ctx_sides, setting, refused, n_rows, refusal) -> Verdict:
    left, op, rights = spec.ordering
    sign = 1 if op.startswith(">") else -1
    boundary = -(spec.margin or 0.0) if spec.test == "noninferiority" else 0.0
    kind_text = (f"noninferiority, margin {fmt(spec.margin)}{' ' + spec.unit if spec.unit else ''} "
                 f"(source: {spec.margin_source})" if spec.test == "noninferiority" else "superiority")
    pairs = []  # (label, diffs by seed, note) per right arm
    chosen = bool(_DATA_CHOSEN.match(left) or any(_DATA_CHOSEN.match(r) for r in rights))
    for right in rights:
        per_side = []
        for i, side_rows in enumerate(sides):
            side_rows = list(side_rows)
            diff_rows = [r for r in side_rows if is_difference_row(r)]
            if chosen:
                d, note, why = _data_chosen(spec, side_rows)
            elif diff_rows and not any(arm_of(r) in (left, right) for r in side_rows if not is_difference_row(r)):
                d, note, why = per_seed(diff_rows, spec)
                d = {s: sign * v for s, v in d.items()}
                note = ("difference rows" + (f"; {note}" if note else ""))
            else:
                if any(_text(r.get("split")) for r in side_rows):  # judged only on runs that did not choose
                    side_rows = [r for r in side_rows if _text(r.get("split")).lower() != "select"]
                pool = side_rows
                for arm in (left, right):
                    if not any(arm_of(r) == arm for r in side_rows if not is_difference_row(r)):
                        keys = {(_text(r.get("experiment")), _text(r.get("metric"))) for r in side_rows}
                        extra = [r for r in ctx_sides[i] if arm_of(r) == arm and not is_difference_row(r)
                                 and (_text(r.get("experiment")), _text(r.get("metric"))) in keys]
                        pool = list(pool) + extra
                a, na, wa = _arm_values(left, pool, spec)
                b, nb, wb = _arm_values(right, pool, spec)
                why = wa or wb
                common = [s for s in a if s in b and s is not None]
                d = {s: sign * (a[s] - b[s]) for s in common}
                note = "; ".join(x for x in (na, nb) if x)
                if pool is not side_rows:
                    note = (note + "; " if note else "") + "an arm taken from rows not tagged with this claim"
            if why:
                found = ", ".join(sorted({arm_of(r) for s in sides for r in s})) or "none"
                return Verdict(NOT_RUN, f"{why} (arms found: {found}){refusal}", our_setting=setting, n_rows=n_rows,
                               refused=refused)
            per_side.append((d, note))
        if len(per_side) == 2:
            (d0, n0), (d1, n1) = per_side
            d = {s: d0[s] - d1[s] for s in d0 if s in d1}
            note = "difference of differences (first setting minus second)" + (f"; {n0}" if n0 else "")
        else:
            d, note = per_side[0]
        label = (f"{left} - {right}" if sign > 0 else f"{right} - {left}")
        pairs.append((label, d, note))
    outcomes = []
    for label, d, note in pairs:
        v, why, info = _empirical(d, boundary, label, spec.unit)
        outcomes.append((v, why + (f" ({note})" if note else ""), info, label))
    order = [REPRODUCED_QUALITATIVELY, INCONCLUSIVE, LEANS_AGAINST, NOT_REPRODUCED]
    final = max((o[0] for o in outcomes), key=order.index)
    if len(outcomes) > 1 and final != REPRODUCED_QUALITATIVELY and any(o[0] == NOT_REPRODUCED for o in outcomes):
        final = NOT_REPRODUCED
    # the least favourable pair is the one the plot shows
    worst = min(outcomes, key=lambda o: (o[2].get("low", o[2]["effect"]) if o[2]["n"] else -math.inf))
    info = worst[2]
    rule = f"{kind_text}: " + "; ".join(o[1] for o in outcomes) + refusal
    ours = " | ".join(f"{o[3]} = {fmt(o[2]['effect'])}" + (f" [{fmt(o[2]['low'])}, {fmt(o[2]['high'])}]"
                                                            if "low" in o[2] else "") + f" ({o[2]['n']} seeds)"
                      for o in outcomes)
    est = None
    if info["n"]:
        est = Estimate(info["effect"], None if "low" not in info else info["high"] - info["effect"], info["n"],
                       info.get("sd"))
    return Verdict(final, rule, ours, setting, est, n_rows, refused, info["effect"] if info["n"] else None,
                   info.get("low"), info.get("high"), boundary, None, worst[3], info.get("p"),
                   info.get("detectable"), info.get("seeds_needed"))


def _judge_number(spec, kept, setting, refused, n_rows, refusal) -> Verdict:
    """test value / at_most / at_least against the paper's number."""
    comps = {_text(r.get("comparison")).lower() for r in kept} - {""}
    factor, unit_note = _unit_note(kept, spec.unit)
    by_seed, note, why = per_seed([r for r in kept if _seed(r) is not None], spec)
    est = None if why else from_samples(by_seed, note) if by_seed else estimate(kept)
    if est is not None and factor != 1:
        est = Estimate(est.mean * factor, None if est.half_width is None else est.half_width * factor, est.n,
                       None if est.sd is None else est.sd * factor, est.exact,
                       {s: v * factor for s, v in est.by_seed.items()}, est.note)
    same_setting = comps & {"value", "at_most", "at_least"}
    # the paper's unit only where ours is known to be in it; else our metric's name (s/step is not s/epoch)
    row_units = {_text(r.get("unit")) for r in kept} - {""}
    metrics = sorted({_text(r.get("metric")) for r in kept} - {""})
    if unit_note or (same_setting and "analogue" not in comps) or row_units == {spec.unit}:
        our_unit = spec.unit
    elif len(row_units) == 1:
        our_unit = row_units.pop()
    else:
        our_unit = f"({', '.join(metrics)})" if metrics else ""
    ours = (est.describe(our_unit) if est else "-") + (f"; {unit_note}" if unit_note else "")
    if not same_setting or "analogue" in comps:
        return Verdict(NOT_COMPARABLE, "analogue: our rows come from a smaller or different setting than the paper's "
                       "(rows say comparison=value only in the paper's own setting); shown beside it, not judged"
                       + refusal, ours, setting, est, n_rows, refused)
    if why:
        return Verdict(NOT_RUN, why + refusal, ours, setting, None, n_rows, refused)
    if spec.paper is None:
        return Verdict(INCONCLUSIVE, f"cannot judge test={spec.test}: paper_values.csv gives no value" + refusal,
                       ours, setting, est, n_rows, refused)
    by_seed = {s: v * factor for s, v in by_seed.items()}
    paper = spec.paper
    if spec.test == "value":
        tol = spec.margin if spec.margin is not None else DEFAULT_REL_TOLERANCE * abs(paper)
        band = (paper - tol, paper + tol)
        tol_text = f"+/- {fmt(tol)}" + (f" (source: {spec.margin_source})" if spec.margin_source else
                                        " (default 5% relative)")
        if len(by_seed) < 2:
            return Verdict(INCONCLUSIVE if est is None or band[0] <= est.mean <= band[1] else LEANS_AGAINST,
                           f"value: {len(by_seed)} seed(s), no interval (needs >= {MIN_SEEDS}); band "
                           f"[{fmt(band[0])}, {fmt(band[1])}]" + refusal, ours, setting, est, n_rows, refused)
        # equivalence (two one-sided tests): inside iff above the lower edge and below the upper edge
        d_lo = {s: v - band[0] for s, v in by_seed.items()}
        d_hi = {s: band[1] - v for s, v in by_seed.items()}
        v1, w1, i1 = _empirical(d_lo, 0.0, "ours - lower edge", spec.unit)
        v2, w2, i2 = _empirical(d_hi, 0.0, "upper edge - ours", spec.unit)
        if v1 == v2 == REPRODUCED_QUALITATIVELY:
            verdict = REPRODUCED_WITHIN_TOLERANCE
        elif NOT_REPRODUCED in (v1, v2):
            verdict = NOT_REPRODUCED
        elif LEANS_AGAINST in (v1, v2):
            verdict = LEANS_AGAINST
        else:
            verdict = INCONCLUSIVE
        info = i1 if i1.get("low", 0) < i2.get("low", 0) else i2
        return Verdict(verdict, f"value within {tol_text}: {w1}; {w2}" + refusal, ours, setting, est, n_rows,
                       refused, est.mean, est.low, est.high, 0.0, band, "ours", info.get("p"),
                       info.get("detectable"), info.get("seeds_needed"))
    at_most = spec.test == "at_most"
    d = {s: (paper - v) if at_most else (v - paper) for s, v in by_seed.items()}
    label = f"{fmt(paper)} - ours" if at_most else f"ours - {fmt(paper)}"
    verdict, why2, info = _empirical(d, 0.0, label, spec.unit)
    return Verdict(verdict, f"bound ({spec.test} {fmt(paper)}): {why2}" + refusal, ours, setting, est, n_rows,
                   refused, info["effect"] if info["n"] else None, info.get("low"), info.get("high"), 0.0, None,
                   label, info.get("p"), info.get("detectable"), info.get("seeds_needed"))


def _judge_check(spec, kept, setting, refused, n_rows) -> Verdict:
    """A derived check: every row's value meets it (no statistics: these are deterministic)."""
    vals = [float(r["value"]) for r in kept]
    ours = ", ".join(fmt(v) for v in vals[:6]) + (f" ... ({len(vals)} rows)" if len(vals) > 6 else "")
    paper = spec.paper
    if paper is None:
        return Verdict(INCONSISTENT, "derived check without a value in paper_values.csv", ours, setting,
                       n_rows=n_rows, refused=refused)
    if spec.test == "value":
        tol = spec.margin if spec.margin is not None else DEFAULT_REL_TOLERANCE * abs(paper)
        ok = all(abs(v - paper) <= tol + 1e-12 * abs(paper) for v in vals)
        rule = f"every value within +/- {fmt(tol)} of {fmt(paper)}" + (f" ({spec.margin_source})" if spec.margin_source else "")
    else:
        ok = all((v <= paper) if spec.test == "at_most" else (v >= paper) for v in vals)
        rule = f"every value {'<=' if spec.test == 'at_most' else '>='} {fmt(paper)}"
    est = Estimate(vals[0], 0.0, 0, 0.0, exact=True) if len(set(vals)) == 1 else None
    return Verdict(CONSISTENT if ok else INCONSISTENT, f"consistency check: {rule}: {'holds' if ok else 'fails'}",
                   ours, setting, est, n_rows, refused)


def our_setting(rows: Sequence[Mapping[str, Any]], max_items: int = 8) -> str:
    """Our setting in words: the rows' `setting` column, else epsilon, method and every
    parameter column that has one value across the rows."""
    texts = sorted({_text(r.get("setting")) for r in rows} - {""})
    if texts:
        return "; ".join(texts)
    parts = []
    seeds = {_seed(r) for r in rows} - {None}
    for key in ["experiment", "epsilon", "method"] + sorted({k for r in rows for k in r} - _STAT_COLUMNS - {"epsilon"}):
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
