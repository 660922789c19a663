"""Study design shared by the comparison notebooks (02, 03): what makes a claim decidable.

- `carve_validation`: a validation split carved from the training data (stratified, seeded);
  tuning reads it, never the test set;
- `tune`: every arm gets the same grid (an equal tuning budget), each value scored on the
  validation split over the same tuning seeds; `Tuning.chosen` is the value per arm;
- `HeldOutTest`: the test set, evaluated once per (arm, seed) for the final number;
  a second look at the same run is a UserError;
- `halfwidth` / `seeds_needed` / `fresh_seeds`: size the verdict's seed count on pilot
  differences so that the 95% CI half-width is below the effect the paper reports, then
  draw seeds the pilots did not use;
- `check_comparisons`: the claims' arms and pairs, fixed in the params before the run;
- `noise_to_signal`: sigma sqrt(d) / B, the noise norm of the averaged gradient relative
  to a clipped per-sample gradient, printed beside the paper's.

Tuning cost is not accounted in epsilon (as in both papers); `dpbench.privacy.selection`
accounts a private search where that matters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from dpbench.data import split_public_private
from dpbench.errors import UserError
from dpbench.training.loop import as_tensors, evaluate


# ---------------------------------------------------------------------------- data
def _take(data: Any, idx: torch.Tensor) -> Any:
    if hasattr(data, "subset"):
        return data.subset(idx)
    x, y = as_tensors(data)
    return (x[idx], y[idx])


def carve_validation(train: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """(fit part, validation part) of `train` (a dpbench data set or an (x, y) pair): a
    stratified `fraction` of the examples, drawn with `seed`, is held out for tuning."""
    if not 0 < fraction < 1:
        raise UserError(f"validation_fraction must be strictly between 0 and 1, got {fraction!r}")
    _, y = as_tensors(train)
    val_idx, fit_idx = split_public_private(y, public_fraction=fraction, seed=seed)
    if len(val_idx) == 0 or len(fit_idx) == 0:
        raise UserError(f"validation_fraction {fraction:g} of {len(y)} examples leaves an empty part; "
                        "use a fraction that keeps both parts non-empty")
    return _take(train, fit_idx), _take(train, val_idx)


# ---------------------------------------------------------------------------- tuning
@dataclass
class Tuning:
    """Validation scores of every (arm, value, seed) and the value chosen per arm (the
    highest mean score; ties go to the first value of the grid)."""

    grid: tuple
    seeds: tuple
    rows: list[dict[str, Any]] = field(default_factory=list)
    chosen: dict[str, Any] = field(default_factory=dict)

    def budget(self) -> dict[str, int]:
        """Runs spent per arm."""
        out: dict[str, int] = {}
        for r in self.rows:
            out[r["arm"]] = out.get(r["arm"], 0) + 1
        return out

    def scores(self, arm: str, value: Any | None = None) -> dict[int, float]:
        """{seed: validation score} of `arm` at `value` (default: its chosen value)."""
        value = self.chosen[arm] if value is None else value
        return {r["seed"]: r["score"] for r in self.rows if r["arm"] == arm and r["value"] == value}

    def table(self):
        """Mean validation score per (arm, value) as a DataFrame (arms x values), chosen marked by `chosen`."""
        import pandas as pd

        df = pd.DataFrame(self.rows)
        return df.groupby(["arm", "value"], sort=False)["score"].mean().unstack("value")


def tune(arms: Sequence[str], grid: Sequence[Any], score: Callable[[str, Any, int], float],
         seeds: Sequence[int], *, rec=None, metric: str = "validation_score", **columns: Any) -> Tuning:
    """Score every arm at every grid value over the same tuning `seeds` (`score(arm, value,
    seed)` trains on the fit part and returns a validation score, higher is better) and choose
    per arm the value with the best mean. Every arm gets len(grid) * len(seeds) runs: an equal
    budget. Rows (`metric`, split="validation") go to `rec` with `columns`."""
    if len(grid) < 1 or not len(seeds):
        raise UserError("tuning needs a non-empty grid and at least one tuning seed")
    if len(set(map(str, grid))) != len(grid):
        raise UserError(f"the tuning grid repeats a value: {list(grid)}")
    t = Tuning(tuple(grid), tuple(seeds))
    for arm in arms:
        means = []
        for v in grid:
            vals = []
            for s in seeds:
                sc = float(score(arm, v, s))
                vals.append(sc)
                t.rows.append({"arm": arm, "value": v, "seed": s, "score": sc})
                if rec is not None:
                    rec.add(metric, sc, method=arm, seed=s, tuned_value=v, split="validation", **columns)
            means.append(np.mean(vals) if all(np.isfinite(vals)) else -np.inf)
        t.chosen[arm] = grid[int(np.argmax(means))]
    check_equal_budget(t)
    return t


def check_equal_budget(tuning: Tuning) -> None:
    """Raise UserError unless every arm was scored at every grid value on every tuning seed."""
    want = {(v, s) for v in map(str, tuning.grid) for s in tuning.seeds}
    for arm in {r["arm"] for r in tuning.rows}:
        got = [(str(r["value"]), r["seed"]) for r in tuning.rows if r["arm"] == arm]
        if sorted(got) != sorted(want):
            raise UserError(f"arm {arm!r} got {len(got)} tuning runs, the others {len(want)}: the tuning budget "
                            "must be equal across arms")


# ---------------------------------------------------------------------------- the test set
class HeldOutTest:
    """The test set, looked at once per (arm, seed, ...) key: `evaluate(model, key)` returns
    (loss, accuracy) and refuses a second evaluation under the same key."""

    def __init__(self, data: Any, batch_size: int = 1024):
        self.data, self.batch_size = data, batch_size
        self.used: list[tuple] = []

    def __len__(self) -> int:
        return len(as_tensors(self.data)[1])

    def evaluate(self, model: torch.nn.Module, key: tuple) -> tuple[float, float]:
        """Test loss and accuracy of `model`, the final number of run `key`."""
        if key in self.used:
            raise UserError(f"the test set was already used for {key}; it is used once per run, for the final "
                            "number (tune on the validation split)")
        self.used.append(key)
        return evaluate(model, self.data, batch_size=self.batch_size)


# ---------------------------------------------------------------------------- seeds
def t_quantile(df: int, level: float = 0.95) -> float:
    """Two-sided Student t quantile (e.g. 2.262 for df = 9)."""
    from scipy import stats

    return float(stats.t.ppf(0.5 + level / 2, df))


def halfwidth(values: Sequence[float], level: float = 0.95) -> float:
    """Half-width of the t interval of the mean of `values` (nan for fewer than 2)."""
    v = np.asarray(values, float)
    if len(v) < 2:
        return float("nan")
    return t_quantile(len(v) - 1, level) * float(v.std(ddof=1)) / math.sqrt(len(v))


def seeds_needed(pilot_diffs: Sequence[float], target: float, *, min_seeds: int = 6, max_seeds: int = 100,
                 level: float = 0.95) -> int:
    """The smallest seed count n in [min_seeds, max_seeds] whose expected CI half-width,
    t(n-1) sd / sqrt(n) with sd from the pilot differences, is below `target`; max_seeds
    when even that is not enough (the caller reports it)."""
    if target <= 0:
        raise UserError(f"the target half-width must be > 0, got {target!r}")
    d = np.asarray(pilot_diffs, float)
    if len(d) < 2:
        raise UserError("sizing the seed count needs at least 2 pilot differences")
    sd = float(d.std(ddof=1))
    for n in range(max(min_seeds, 2), max_seeds + 1):
        if t_quantile(n - 1, level) * sd / math.sqrt(n) < target:
            return n
    return max_seeds


def pilot_sizing(tuning: Tuning, comparisons: Mapping[str, Sequence[str]], targets: Mapping[str, float], *,
                 min_seeds: int = 6, max_seeds: int = 40) -> list[dict[str, Any]]:
    """Per pre-registered comparison {claim_id: (X, Y)}: the pilot's paired validation
    differences X - Y at the chosen values (the tuning seeds), their sd, and the seeds
    `seeds_needed` says bring the 95% half-width under the claim's target."""
    rows = []
    for claim, (x, y) in comparisons.items():
        a, b = tuning.scores(x), tuning.scores(y)
        d = [a[s] - b[s] for s in a if s in b]
        rows.append({"claim": claim, "pair": f"{x} - {y}", "pilot_mean": float(np.mean(d)),
                     "pilot_sd": float(np.std(d, ddof=1)), "target_halfwidth": targets[claim],
                     "seeds_needed": seeds_needed(d, targets[claim], min_seeds=min_seeds, max_seeds=max_seeds)})
    return rows


def fresh_seeds(n: int, avoid: Sequence[int], start: int = 1000) -> list[int]:
    """`n` seeds from `start` on that are not in `avoid` (the pilot / tuning seeds)."""
    bad = set(avoid)
    out, s = [], start
    while len(out) < n:
        if s not in bad:
            out.append(s)
        s += 1
    return out


# ---------------------------------------------------------------------------- pre-registration
def check_comparisons(comparisons: Mapping[str, Sequence[str]], arms: Sequence[str]) -> dict[str, tuple[str, str]]:
    """The pre-registered comparisons {claim_id: [X, Y]} (X claimed above Y, or X the arm of
    a noninferiority claim) as tuples; UserError when an arm is not among `arms`."""
    out = {}
    for claim, pair in comparisons.items():
        if len(pair) != 2 or pair[0] == pair[1]:
            raise UserError(f"comparison {claim!r} must name two different arms, got {pair!r}")
        missing = [a for a in pair if a not in arms]
        if missing:
            raise UserError(f"comparison {claim!r} names arms {missing} that are not run; arms: {list(arms)}")
        out[claim] = (pair[0], pair[1])
    return out


