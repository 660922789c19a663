"""Privacy audit of dpbench's own mechanisms: the rows, the computed explanation and the
figures of the audit experiment.

Two parts. (1) One DP-SGD step of the real engine and optimizer in every clipping method and
four faults (`dpbench.training.audit_runs`). (2) Every mechanism with its own canaries
(`dpbench.training.audit_mechanisms`): a whole T-step Poisson-subsampled run, adaptive
clipping's counts, the three last-layer solvers, per-device and data-parallel noise, each
with its planted faults; `mechanism_table` is the table of claims, analytic true epsilons and
audited bounds, `explain_mechanisms` the computed text.

The audits themselves (canary trials through the real engine and optimizer, faults, the
summary of each audit) are `dpbench.training.audit_runs`; the bounds are
`dpbench.privacy.audit_bounds`. This module turns audit summaries into recorder rows, says
what the audit detected and why (from the numbers), and draws the claimed-vs-audited and
ROC figures. The recorder is passed in (anything with `Recorder.add`'s signature).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dpbench.atomic import write_atomic
from dpbench.privacy import audit_bounds
from dpbench.training import audit_mechanisms, audit_runs

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


# ---------------------------------------------------------------------------- every mechanism

MECHANISM_METRICS = {"claimed_epsilon": "claimed_epsilon", "true_epsilon": "true_epsilon",
                     "audited_epsilon_lb": "audited_lb", "ceiling": "ceiling", "detected": "detected",
                     "seconds": "seconds"}


def run_mechanisms(*, confidence: float = 0.95, seed: int = 0, progress: bool = True,
                   **sizes: Any) -> tuple[list, list[dict[str, Any]]]:
    """Audit every mechanism and variant (`audit_mechanisms.run_mechanism_audits` with `sizes`);
    returns (audits, one `audit_mechanisms.summarize` row per audit at `confidence`)."""
    audits = audit_mechanisms.run_mechanism_audits(seed=seed, progress=progress, **sizes)
    return audits, [audit_mechanisms.summarize(a, confidence, seed=seed) for a in audits]


def _fmt_eps(value: float, relation: str = "=") -> str:
    text = "inf" if value == float("inf") else f"{value:.2f}"
    return text if relation == "=" else f"{relation} {text}"


def mechanism_table(rows: Sequence[dict[str, Any]]):
    """The acceptance table: per mechanism and variant, the claimed epsilon, the analytic true
    epsilon, the audited lower bound with its confidence and method, the ceiling, the trials,
    the status and (when not detected) the projected trials needed."""
    import pandas as pd

    out = []
    for r in rows:
        needed = r.get("trials_needed")
        out.append({
            "mechanism": r["mechanism"], "variant": r["variant"], "threat model": r["threat_model"],
            "claimed eps": round(r["claimed_epsilon"], 3), "true eps": _fmt_eps(r["true_epsilon"], r["true_relation"]),
            "audited lb": round(r["audited_lb"], 3), "confidence": r["confidence"], "bound": r["method"],
            "score": r["score"], "ceiling": round(r["ceiling"], 2), "trials": r["trials"], "status": r["status"],
            "trials needed": "" if needed is None else (">= ~" if r.get("trials_needed_how") == "lower estimate"
                                                        else "~") + f"{needed:,}",
            "seconds": round(r["seconds"], 1),
        })
    return pd.DataFrame(out)


def record_mechanisms(rec: Any, rows: Sequence[dict[str, Any]], *, seed: int) -> int:
    """One recorder row per mechanism audit and metric of `MECHANISM_METRICS` (infinite true
    epsilons are recorded as inf); returns how many rows were added."""
    count = 0
    for r in rows:
        for metric, key in MECHANISM_METRICS.items():
            rec.add(metric, float(r[key]), method=f"{r['mechanism']}/{r['variant']}", epsilon=r["claimed_epsilon"],
                    seed=seed, fault=r["fault"], threat_model=r["threat_model"], trials=r["trials"],
                    confidence=r["confidence"], audit_status=r["status"])
            count += 1
    return count


def explain_mechanisms(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown computed from the rows: the threat model of each bound, whether every correct
    mechanism stayed under its claim, and for each fault what was caught, or why not and
    how many trials it would need."""
    lines = ["**Threat models** (each bound holds for an adversary with at most this view):"]
    for tm in sorted({r["threat_model"] for r in rows}):
        mechs = ", ".join(sorted({r["mechanism"] for r in rows if r["threat_model"] == tm}))
        lines.append(f"- *{tm}* ({mechs}): {audit_mechanisms.THREAT_MODELS[tm]}.")
    correct = [r for r in rows if not r["fault"]]
    refuted = [r for r in correct if r["audited_lb"] > r["claimed_epsilon"]]
    if correct:
        lines.append(f"- **Correct mechanisms:** {len(correct) - len(refuted)} of {len(correct)} have their audited "
                     "bound at or below the claim" + ("." if not refuted else "; REFUTED: " + ", ".join(
                         f"{r['mechanism']}/{r['variant']} ({r['audited_lb']:.2f} > {r['claimed_epsilon']:.2f})"
                         for r in refuted) + "."))
    for r in rows:
        if not r["fault"]:
            continue
        what = audit_mechanisms.FAULT_TEXT.get(r["fault"], r["fault"])
        head = (f"- **{r['mechanism']}/{r['fault']}** ({what}): claimed {r['claimed_epsilon']:.2f}, true "
                f"{_fmt_eps(r['true_epsilon'], r['true_relation'])}, audited >= {r['audited_lb']:.2f} "
                f"({r['method']}, {r['trials']:,} trials, ceiling {r['ceiling']:.2f}): ")
        if r["status"] == "detected":
            head += "**detected**."
        elif r["status"] == "no gap":
            head += ("not detectable here: the best known epsilon of what ran is not above the claim"
                     + (" (a lower bound only: shuffling within at most 20 steps per epoch stays under the Poisson "
                        "claim; Chua et al.'s gap needs far more batches per epoch)" if r["true_relation"] != "=" else "")
                     + ".")
        else:
            needed = r.get("trials_needed")
            how = ("at least about" if r.get("trials_needed_how") == "lower estimate" else "about")
            head += (f"{r['status']} at {r['trials']:,} trials; on the analytic model the many-trials bound "
                     + (f"needs {how} {needed:,} trials" if needed else "needs more than 10^8 trials")
                     + " to pass the claim.")
        lines.append(head)
    return "\n".join(lines)


def save_mechanism_table(rows: Sequence[dict[str, Any]], output_dir: str) -> Any:
    """Write `mechanism_table(rows)` as mechanism_audit.csv in `output_dir` (atomically);
    returns the path, or None without an output directory."""
    if not output_dir:
        return None
    path = Path(output_dir) / "mechanism_audit.csv"
    write_atomic(path, mechanism_table(rows).to_csv(index=False))
    return path
