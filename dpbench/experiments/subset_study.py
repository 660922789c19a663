"""Layer selection judged on fresh runs (issue 17; PAPERS.md D; the notebook 04 study).

Cattan et al. (2022): which layers are DP fine-tuned should be chosen per epsilon. A sound
check of that claim separates the runs that choose from the runs that are judged:

1. **select** (`select_runs`): every candidate subset is DP fine-tuned at every epsilon with
   every learning rate of one shared grid (`tuning_grid`: the same budget for every subset)
   on `select_seeds`; each run is scored on the private *validation* part only.
2. **choose** (`choose`): per (subset, epsilon) the learning rate with the best mean
   validation accuracy; per epsilon the subset whose tuned score is best ("selected").
3. **evaluate** (`evaluate_runs`): every subset at its tuned learning rate, on fresh
   `eval_seeds` that never took part in the choice (`check_disjoint`), scored on the test set.

Claim rows (`claim_rows`) use only evaluate runs for the judged values; the pre-registered
comparisons are selected vs all at eps 1, selected vs head at eps 8, the epsilon interaction
(head - all at eps 1) - (head - all at eps 8), and best vs worst at eps 2 with best and worst
chosen on the select runs (split=select) and judged on the evaluate runs (split=evaluate).
The search itself is not private (clean validation scores); `layer_selection`'s private
selection shows what an accounted search costs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import numpy as np

from dpbench import models as M
from dpbench.errors import UserError
from dpbench.experiments import layer_selection as ls

SELECTED = "selected"


def distinct_subsets(model, subsets: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The requested subsets the model defines, with duplicates dropped (a subset training
    exactly the same parameters as an earlier one, e.g. last_block+head of a one-block MLP,
    which is `all`). Returns (kept, {dropped: why})."""
    kept, seen, dropped = [], {}, {}
    # "head" and "all" are the pre-registered baselines: they keep their names over any duplicate
    for s in sorted(subsets, key=lambda k: (k not in ("head", "all"), list(subsets).index(k))):
        try:
            names = frozenset(M.trainable_subset(model, s))
        except UserError as e:
            dropped[s] = str(e).split(";")[0][:160]
            continue
        if names in seen:
            dropped[s] = f"trains exactly the parameters of {seen[names]}"
            continue
        seen[names] = s
        kept.append(s)
    return [s for s in subsets if s in kept], dropped


def tuning_grid(subsets: Sequence[str], lrs: Sequence[float]) -> list[tuple[str, float]]:
    """Every (subset, learning rate) pair: each subset is tuned over the same grid, so every
    subset gets the same number of runs per epsilon and seed."""
    if not lrs or min(lrs) <= 0:
        raise UserError(f"learning rates must be a non-empty list of positive numbers, got {list(lrs)!r}")
    return [(s, float(lr)) for s in subsets for lr in lrs]


def budget_per_subset(grid: Sequence[tuple[str, float]]) -> dict[str, int]:
    """Runs per subset in a tuning grid (per epsilon and seed)."""
    out: dict[str, int] = {}
    for s, _ in grid:
        out[s] = out.get(s, 0) + 1
    return out


def check_disjoint(select_seeds: Sequence[int], eval_seeds: Sequence[int]) -> None:
    """Refuse evaluation seeds that also chose: a run that chose is never judged."""
    both = sorted(set(select_seeds) & set(eval_seeds))
    if both:
        raise UserError(f"seeds {both} are both selection and evaluation seeds; evaluation needs fresh seeds")


def seeds_for(seed: int, n_select: int, n_eval: int) -> tuple[list[int], list[int]]:
    """Selection seeds seed..seed+n_select-1 and fresh evaluation seeds after them."""
    if n_select < 1 or n_eval < 1:
        raise UserError(f"need >= 1 selection and >= 1 evaluation seed, got {n_select}, {n_eval}")
    sel = [seed + i for i in range(n_select)]
    ev = [seed + n_select + i for i in range(n_eval)]
    check_disjoint(sel, ev)
    return sel, ev


def _run(setup: ls.Setup, subset: str, lr: float, sigma: float, seed: int) -> dict[str, Any]:
    r = ls.finetune(dataclasses.replace(setup, lr=float(lr)), subset, sigma, seed)
    return {k: v for k, v in r.items() if k != "ledger"}


def select_runs(setup: ls.Setup, grid: Sequence[tuple[str, float]], epsilons: Sequence[float],
                seeds: Sequence[int], sigmas: dict[float, float]) -> list[dict[str, Any]]:
    """The selection runs: every (subset, lr) of the grid at every epsilon and selection
    seed; each keeps its validation accuracy (what chooses) and its test accuracy (recorded,
    never used to choose)."""
    return [dict(subset=s, lr=lr, eps=e, seed=k, split="select", **_run(setup, s, lr, sigmas[e], k))
            for e in epsilons for k in seeds for s, lr in grid]


def choose(sel_rows: Sequence[dict[str, Any]]) -> tuple[dict, dict]:
    """From the selection runs only: ({(subset, eps): lr} the tuned learning rates,
    {eps: subset} the selected subset), both by mean validation accuracy over seeds."""
    import pandas as pd

    df = pd.DataFrame(sel_rows)
    if (df.split != "select").any():
        raise UserError("choose() takes selection runs only")
    val = df.groupby(["subset", "eps", "lr"]).val_acc.mean()
    best_lr, score = {}, {}
    for (s, e), g in val.groupby(level=["subset", "eps"]):
        i = g.values.argmax()
        best_lr[(s, e)] = float(g.index.get_level_values("lr")[i])
        score[(s, e)] = float(g.values[i])
    selected = {}
    for e in sorted({e for _, e in score}):
        cands = {s: v for (s, ee), v in score.items() if ee == e}
        selected[e] = max(cands, key=cands.get)
    return best_lr, selected


def evaluate_runs(setup: ls.Setup, subsets: Sequence[str], epsilons: Sequence[float], seeds: Sequence[int],
                  sigmas: dict[float, float], best_lr: dict) -> list[dict[str, Any]]:
    """Every subset at its tuned learning rate on fresh seeds: the judged runs."""
    return [dict(subset=s, lr=best_lr[(s, e)], eps=e, seed=k, split="evaluate", **_run(setup, s, best_lr[(s, e)],
                                                                                      sigmas[e], k))
            for e in epsilons for k in seeds for s in subsets]


def record_runs(rows: Sequence[dict[str, Any]], add: Callable[..., Any]) -> None:
    """Every run as `val_acc` and `test_acc` rows (study=subset_study, with split and lr)."""
    for r in rows:
        common = dict(method=r["subset"], epsilon=r["eps"], seed=r["seed"], split=r["split"], lr=r["lr"],
                      study="subset_study", trained_params=r["trained_params"])
        add("val_acc", r["val_acc"], **common)
        add("test_acc", r["test_acc"], **common)


# claim id -> (epsilons it uses, arms)
CLAIMS = {
    "D-selected-beats-all-eps1": ((1.0,), (SELECTED, "all")),
    "D-selected-beats-head-eps8": ((8.0,), (SELECTED, "head")),
    "D-eps-interaction": ((1.0, 8.0), ("head", "all")),
}


def claim_rows(sel_rows: Sequence[dict], eval_rows: Sequence[dict], selected: dict, add: Callable[..., Any], *,
               setting: str, choice_eps: float = 2.0) -> int:
    """Tagged rows of the pre-registered D claims (test accuracy of evaluate runs only; the
    selected arm is the subset chosen on the selection runs, judged on its fresh runs), and of
    D-layer-choice-matters at `choice_eps` (every candidate: split=select rows carry the
    validation accuracy that chooses best and worst, split=evaluate rows the judged test
    accuracy). Also the D-cifar100-eps2 analogue: the selected subset's mean test accuracy
    on fresh runs at `choice_eps` (shown, not judged). Returns the number of rows added."""
    count = 0
    for claim, (eps_list, arms) in CLAIMS.items():
        for r in eval_rows:
            if r["eps"] not in eps_list:
                continue
            names = [a for a in arms if a == r["subset"]]
            if arms[0] == SELECTED and r["subset"] == selected.get(r["eps"]):
                names.append(SELECTED)
            for arm in names:
                add("test_acc", r["test_acc"], method=arm, epsilon=r["eps"], seed=r["seed"], split="evaluate",
                    claim_id=claim, unit="fraction", chosen=r["subset"] if arm == SELECTED else "",
                    setting=setting, study=f"claim {claim}")
                count += 1
    tuned = {(r["subset"], r["eps"]): r["lr"] for r in eval_rows}
    for r in sel_rows:  # the candidates' select rows at their tuned lr: what picks best and worst
        if r["eps"] == choice_eps and tuned.get((r["subset"], r["eps"])) == r["lr"]:
            add("val_acc", r["val_acc"], method=r["subset"], epsilon=r["eps"], seed=r["seed"], split="select",
                claim_id="D-layer-choice-matters", unit="fraction", setting=setting, study="claim choice")
            count += 1
    for r in eval_rows:
        if r["eps"] == choice_eps:
            add("test_acc", r["test_acc"], method=r["subset"], epsilon=r["eps"], seed=r["seed"], split="evaluate",
                claim_id="D-layer-choice-matters", unit="fraction", setting=setting, study="claim choice")
            count += 1
    if choice_eps in selected:
        accs = [r["test_acc"] for r in eval_rows if r["eps"] == choice_eps and r["subset"] == selected[choice_eps]]
        add("best_subset_test_acc", float(np.mean(accs)), method=selected[choice_eps], epsilon=choice_eps,
            claim_id="D-cifar100-eps2", comparison="analogue", unit="fraction", study="analogue",
            setting=f"{setting}; subset chosen on validation accuracy of separate runs, mean test accuracy of "
                    f"{len(accs)} fresh runs")
        count += 1
    return count


def summary(eval_rows: Sequence[dict], selected: dict):
    """Mean test accuracy ± 95% t half-width per (subset, eps) of the evaluate runs, the tuned
    lr, and which subset the selection runs chose."""
    import pandas as pd
    from scipy import stats as st

    df = pd.DataFrame(eval_rows)
    g = df.groupby(["eps", "subset"])
    out = pd.DataFrame({"lr": g.lr.first(), "mean": g.test_acc.mean(), "sd": g.test_acc.std(), "k": g.test_acc.count()})
    out["ci95"] = out.sd.fillna(0) * st.t.ppf(0.975, (out.k - 1).clip(lower=1)) / np.sqrt(out.k)
    out["selected"] = [selected.get(e) == s for e, s in out.index]
    return out


def interaction(eval_rows: Sequence[dict], lo: float = 1.0, hi: float = 8.0) -> dict[str, float]:
    """(head - all at lo) - (head - all at hi) per evaluation seed, its mean and 95% t interval
    (NaN when a seed lacks an arm)."""
    from scipy import stats as st

    acc = {(r["subset"], r["eps"], r["seed"]): r["test_acc"] for r in eval_rows}
    seeds = sorted({r["seed"] for r in eval_rows})
    vals = []
    for k in seeds:
        try:
            vals.append((acc[("head", lo, k)] - acc[("all", lo, k)]) - (acc[("head", hi, k)] - acc[("all", hi, k)]))
        except KeyError:
            continue
    if len(vals) < 2:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": len(vals)}
    v = np.array(vals)
    half = v.std(ddof=1) * st.t.ppf(0.975, len(v) - 1) / math.sqrt(len(v))
    return {"mean": float(v.mean()), "lo": float(v.mean() - half), "hi": float(v.mean() + half), "n": len(v)}


def plot_evaluation(ax, summ, selected: dict) -> None:
    """Mean test accuracy (95% CI over fresh seeds) per subset against epsilon; the subset
    chosen on the selection runs is starred at each epsilon."""
    subsets = list(dict.fromkeys(summ.index.get_level_values("subset")))
    eps = sorted(set(summ.index.get_level_values("eps")))
    for i, s in enumerate(subsets):
        d = summ.xs(s, level="subset")
        off = 1 + 0.04 * (i - (len(subsets) - 1) / 2)  # small horizontal offsets keep error bars apart
        ax.errorbar(np.array(d.index) * off, d["mean"], yerr=d["ci95"], marker="o", capsize=3, label=s)
    for e in eps:
        s = selected.get(e)
        if s is not None and (e, s) in summ.index:
            ax.plot([e], [summ.loc[(e, s), "mean"]], marker="*", ms=15, color="k", zorder=5)
    ax.set_xscale("log", base=2)
    ax.set_xticks(eps, [f"{e:g}" for e in eps])
    ax.set_xlabel("ε")
    ax.set_ylabel("test accuracy (fresh seeds)")
    ax.legend(fontsize=8, title="★ chosen on selection runs", title_fontsize=7)
