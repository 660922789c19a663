"""Privacy audit of dpbench's own DP-SGD step: the rows, the computed explanation and the
figures of the audit experiment.

The audits themselves (canary trials through the real engine and optimizer, faults, the
summary of each audit) are `dpbench.training.audit_runs`; the bounds are
`dpbench.privacy.audit_bounds`. This module turns audit summaries into recorder rows, says
what the audit detected and why (from the numbers), and draws the claimed-vs-audited and
ROC figures. The recorder is passed in (anything with `Recorder.add`'s signature).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from dpbench.privacy import audit_bounds
from dpbench.training import audit_runs

# recorded metric -> key of an `audit_runs.summarize` row
AUDIT_METRICS = {
    "claimed_epsilon": "claimed_epsilon", "audited_epsilon_lb": "audited_lb", "trials_epsilon_lb": "trials_lb",
    "one_run_epsilon_lb": "one_run_lb", "ceiling": "ceiling", "true_epsilon": "true_epsilon", "auc": "auc",
    "detected": "detected", "seconds": "seconds",
}
MARKERS = {"correct/instantiate": "o", "correct/ghost": "s", "correct/mixed": "D", "correct/bk": "^",
           "fault/no_noise": "X", "fault/unclipped_layer": "P", "fault/q_understated": "v",
           "fault/step_every_physical": "*"}
CANARY_TITLES = {"gradient": "white-box gradient", "input": "black-box input"}


def run(variants: Sequence[str], epsilons: Sequence[float], *, blackbox_variants: Sequence[str] = (),
        confidence: float = 0.95, seed: int = 0, **common: Any) -> tuple[list, list[dict[str, Any]]]:
    """Audit every variant at every target epsilon with the white-box gradient canary, and
    `blackbox_variants` also with the black-box input canary; returns (audits, one
    `audit_runs.summarize` row per audit at `confidence`). `common`: the keywords of
    `audit_runs.run_audits` (trials, steps, sample_rate, ...)."""
    audits = audit_runs.run_audits(variants, epsilons, canary="gradient", seed=seed, **common)
    if blackbox_variants:
        audits += audit_runs.run_audits(blackbox_variants, epsilons, canary="input", seed=seed, **common)
    return audits, [audit_runs.summarize(a, confidence, seed=seed) for a in audits]


def record_audits(rec: Any, rows: Sequence[dict[str, Any]], *, confidence: float, seed: int) -> int:
    """One recorder row per audit and metric of `AUDIT_METRICS`, with the audit's setting as
    columns; returns how many rows were added."""
    count = 0
    for r in rows:
        for metric, key in AUDIT_METRICS.items():
            rec.add(metric, float(r[key]), method=r["variant"], epsilon=r["claimed_epsilon"], seed=seed,
                    canary=r["canary"], fault=r["fault"], target_epsilon=r["target_epsilon"], trials=r["trials"],
                    noise_multiplier=r["noise_multiplier"], sample_rate=r["sample_rate"],
                    stated_sample_rate=r["stated_sample_rate"], steps=r["steps"], confidence=confidence,
                    trials_score=r["trials_score"], one_run_score=r["one_run_score"])
            count += 1
    return count


def max_score_diff_vs_bk(audits: Sequence[Any]) -> float | None:
    """The largest difference of the `total` canary scores between any correct clipping
    method and correct/bk at the same target epsilon (gradient canary; same noise seed, so a
    correct method changes no released update). None without correct/bk to compare with."""
    bk = {(a.canary, a.target_epsilon): a for a in audits if a.variant == "correct/bk"}
    diffs = [float(np.max(np.abs(a.scores["total"] - bk[(a.canary, a.target_epsilon)].scores["total"])))
             for a in audits if a.variant.startswith("correct/") and a.canary == "gradient"
             and (a.canary, a.target_epsilon) in bk]
    return max(diffs) if diffs else None


def explain(audits: Sequence[Any], rows: Sequence[dict[str, Any]], *, confidence: float, delta: float,
            seed: int, rec: Any = None) -> str:
    """Markdown computed from this run's numbers: which faults were detected and why
    (`audit_runs.explain_detection`), whether the clipping methods agree, what the trials
    cost and why no bound can pass the trial ceiling. With `rec`, the score agreement is
    recorded as one `max_score_diff_vs_bk` row (on the first correct gradient-canary audit)."""
    import pandas as pd

    table = pd.DataFrame(list(rows))
    text = [audit_runs.explain_detection(rows)]
    diff = max_score_diff_vs_bk(audits)
    if diff is not None:
        text.append(f"- **Clipping methods:** the four correct methods released updates whose canary scores differ "
                    f"by at most {diff:.1e} (same noise seed): the method is a setting, not a change of result, "
                    "so their audits agree.")
        first = next((r for r in rows if r["variant"].startswith("correct/") and r["canary"] == "gradient"), None)
        if rec is not None and first is not None:
            rec.add("max_score_diff_vs_bk", diff, method=first["variant"], epsilon=first["claimed_epsilon"],
                    seed=seed, canary=first["canary"], target_epsilon=first["target_epsilon"])
    calls, replays = int(table["engine_calls"].sum()), int(table["engine_replays"].sum())
    text.append(f"- **Cost:** {int(table['trials'].sum())} trials in {table['seconds'].sum():.0f} s; the engine ran "
                f"{calls} times and {replays} identical computations were replayed from its cache.")
    n_in, n_out = int(table["trials_n_in"].median()), int(table["trials_n_out"].median())
    ceil_trials = audit_bounds.trial_ceiling(n_in, n_out, 1 - (1 - confidence) / 2, delta)
    text.append(f"- **Why a ceiling:** with about {n_in} held-out member and "
                f"non-member trials each, even a perfect attack certifies at most {ceil_trials:.2f} by the "
                f"many-trials bound (one-run: {table['one_run_ceiling'].max():.2f}); a correct mechanism's bound "
                f"sits far below its claim because a Gaussian mechanism's worst case lives in tails that "
                f"{int(table['trials'].max())} trials cannot resolve. Faults that release something noise-free "
                "reach the ceiling; a fault that only shrinks the noise (q understated) must shrink it enough for "
                "the finite-sample bound to pass the claim.")
    return "\n".join(text)


def canaries(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The canary kinds present, gradient first."""
    return [c for c in ("gradient", "input") if any(r["canary"] == c for r in rows)]


def plot_claimed_vs_audited(rows: Sequence[dict[str, Any]], *, confidence: float):
    """One panel per canary: each variant's audited lower bound against its claimed epsilon
    (variants spread sideways), the y = x line, the refuted region and the trial ceiling."""
    import matplotlib.pyplot as plt
    import pandas as pd

    table = pd.DataFrame(list(rows))
    kinds = canaries(rows)
    max_eps = float(table["target_epsilon"].max())
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.2 * len(kinds), 6), squeeze=False)
    hi = max(table["ceiling"].max(), table["claimed_epsilon"].max()) * 1.1
    for ax, canary in zip(axes[0], kinds):
        sub = table[table["canary"] == canary]
        names = list(dict.fromkeys(sub["variant"]))
        for j, v in enumerate(names):
            d = sub[sub["variant"] == v]
            jitter = (j - (len(names) - 1) / 2) * 0.025 * max_eps
            ax.scatter(d["claimed_epsilon"] + jitter, d["audited_lb"], marker=MARKERS.get(v, "o"), s=60,
                       label=v, zorder=3, edgecolor="black", linewidth=0.4)
        ax.plot([0, hi], [0, hi], color="gray", ls="--", lw=1, label="y = x (claim)")
        ax.fill_between([0, hi], [0, hi], [hi, hi], color="red", alpha=0.06, label="claim refuted")
        ceil = sub["ceiling"].max()
        ax.axhline(ceil, color="black", ls=":", lw=1.2, label=f"ceiling, {int(sub['trials'].max())} trials ({ceil:.2f})")
        ax.set_xlim(0, max_eps * 1.25 + 0.1)
        ax.set_ylim(-0.1, hi)
        ax.set_xlabel("claimed epsilon (accountant, nominal sigma and stated q; variants spread sideways)")
        ax.set_ylabel(f"audited lower bound ({confidence:.0%} confidence)")
        ax.set_title(f"{CANARY_TITLES[canary]} canary")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    fig.tight_layout()
    return fig


def plot_roc(audits: Sequence[Any], rows: Sequence[dict[str, Any]], *, epsilon: float, trials: int):
    """One panel per canary: the ROC (log axes) of the score the many-trials bound selected,
    for each variant at the target epsilon nearest `epsilon`; rates of 0 are drawn at half of
    one trial."""
    import matplotlib.pyplot as plt

    kinds = canaries(rows)
    target = min({a.target_epsilon for a in audits}, key=lambda e: abs(e - epsilon))
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.6 * len(kinds), 5), squeeze=False)
    for ax, canary in zip(axes[0], kinds):
        for a, r in zip(audits, rows):
            if a.canary != canary or a.target_epsilon != target:
                continue
            fpr, tpr, auc = audit_bounds.roc_curve(a.scores[r["trials_score"]], a.members)
            floor_f, floor_t = 0.5 / (~a.members).sum(), 0.5 / a.members.sum()
            ax.plot(np.maximum(fpr, floor_f), np.maximum(tpr, floor_t), drawstyle="steps-post",
                    label=f"{a.variant} [{r['trials_score']}] AUC {auc:.2f}")
        lo = 0.5 / (trials / 2)
        ax.plot([lo, 1], [lo, 1], color="gray", ls="--", lw=1, label="chance")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(f"{CANARY_TITLES[canary]} canary, target eps {target:g}")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig
