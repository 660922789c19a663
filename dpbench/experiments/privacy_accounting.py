"""Curves and figures of notebook 00 (privacy accounting).

The computations return tidy rows (one dict per plotted point) so tests and the notebook's
metrics share them; the plot functions only draw those rows. Accountants are named as in
`dpbench.privacy.accounting`: "rdp", "pld" and the approximation "gdp_clt".
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

from tqdm.auto import tqdm

from dpbench.privacy import accounting as acct
from dpbench.privacy.accounting import steps_for_epochs
from dpbench.errors import UserError

LABELS = {"rdp": "RDP", "pld": "PLD", "gdp_clt": "GDP (CLT approx.)"}
LINESTYLES = {"rdp": "-", "pld": "--", "gdp_clt": ":"}


def _progress(items: list, desc: str, progress: bool):
    if not progress:
        return items
    return tqdm(items, desc=desc)  # left in the output: the executed notebook and the log keep the time


def log_grid(lo: float, hi: float, num: int, integer: bool = False) -> list:
    """`num` log-spaced values from lo to hi (unique, sorted; rounded when `integer`)."""
    if not (lo > 0 and hi >= lo and num >= 1):
        raise UserError(f"log_grid needs 0 < lo <= hi and num >= 1, got lo={lo}, hi={hi}, num={num}")
    if num == 1:
        vals = [hi]
    else:
        vals = [lo * (hi / lo) ** (i / (num - 1)) for i in range(num)]
    if integer:
        vals = [int(round(v)) for v in vals]
    return sorted(set(vals))


def epsilon_vs_steps(
    noise_multipliers: Sequence[float],
    sample_rate: float,
    steps_list: Iterable[int],
    delta: float = acct.DEFAULT_DELTA,
    accountants: Sequence[str] = ("rdp", "pld"),
    progress: bool = True,
) -> list[dict]:
    """Epsilon after each number of steps, per noise multiplier and accountant."""
    steps_list = list(steps_list)
    rows = []
    jobs = [(a, s) for s in noise_multipliers for a in accountants]
    for accountant, sigma in _progress(jobs, "epsilon vs steps", progress):
        eps = acct.epsilon_curve(sigma, sample_rate, steps_list, delta, accountant)
        for t, e in zip(steps_list, eps):
            rows.append(dict(accountant=accountant, noise_multiplier=float(sigma), sample_rate=float(sample_rate),
                             steps=int(t), delta=delta, epsilon=float(e)))
    return rows


def noise_vs_sample_rate(
    target_epsilons: Sequence[float],
    epochs: float,
    sample_rates: Iterable[float],
    delta: float = acct.DEFAULT_DELTA,
    accountants: Sequence[str] = ("rdp", "pld"),
    tol: float = 1e-3,
    progress: bool = True,
) -> list[dict]:
    """Noise multiplier needed for each target epsilon at a fixed number of epochs
    (steps = `steps_for_epochs(epochs, q)`), as a function of the sampling rate q."""
    rows = []
    jobs = [(e, q, a) for e in target_epsilons for q in sample_rates for a in accountants]
    for eps, q, accountant in _progress(jobs, "noise vs sample rate", progress):
        steps = steps_for_epochs(epochs, q)
        sigma = acct.noise_multiplier(eps, q, steps, delta, accountant, tol=tol)
        rows.append(dict(accountant=accountant, target_epsilon=float(eps), epochs=float(epochs),
                         sample_rate=float(q), steps=steps, delta=delta, noise_multiplier=sigma))
    return rows


def noise_level_vs_batch_size(
    target_epsilon: float,
    epochs: float,
    n: int,
    batch_sizes: Iterable[int],
    delta: float = acct.DEFAULT_DELTA,
    accountants: Sequence[str] = ("rdp", "pld", "gdp_clt"),
    tol: float = 1e-3,
    progress: bool = True,
) -> list[dict]:
    """Noise level sigma(B)^2 / B against the expected batch size B = q n at fixed epsilon
    and epochs (steps = `steps_for_epochs(epochs, B / n)`), as in Bu et al. 2024 (PAPERS.md A, figure 3).

    sigma(B)^2 / B is the variance of the noise in the averaged gradient in units of C^2 B.
    """
    acct.check_delta(delta, n)
    rows = []
    batch_sizes = [int(b) for b in batch_sizes]
    if any(not 1 <= b <= n for b in batch_sizes):
        raise UserError(f"batch sizes must lie in [1, n={n}], got {batch_sizes}")
    jobs = [(b, a) for b in batch_sizes for a in accountants]
    for b, accountant in _progress(jobs, "noise level vs batch size", progress):
        q = b / n
        steps = steps_for_epochs(epochs, q)
        sigma = acct.noise_multiplier(target_epsilon, q, steps, delta, accountant, tol=tol)
        rows.append(dict(accountant=accountant, target_epsilon=float(target_epsilon), epochs=float(epochs), n=int(n),
                         batch_size=b, sample_rate=q, steps=steps, delta=delta, noise_multiplier=sigma,
                         noise_level=sigma**2 / b))
    return rows


def inverse_reference(batch_sizes: Sequence[float], anchor_batch: float, anchor_value: float) -> list[float]:
    """The O(1/B) reference line through (anchor_batch, anchor_value)."""
    return [anchor_value * anchor_batch / b for b in batch_sizes]


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log y against log x (e.g. -1 for an exact 1/B law)."""
    lx = [math.log(x) for x in xs]
    ly = [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / den if den else float("nan")


def local_loglog_slopes(xs: Sequence[float], ys: Sequence[float]) -> list[float]:
    """Slopes of log y against log x between consecutive points (sorted by x). All of them
    negative means y falls everywhere on the grid, not just on average as a fitted slope says."""
    pts = sorted(zip(xs, ys))
    return [(math.log(y2) - math.log(y1)) / (math.log(x2) - math.log(x1))
            for (x1, y1), (x2, y2) in zip(pts, pts[1:]) if x2 > x1]


def max_local_slope(rows: list[dict], key: str = "noise_level") -> float:
    """The largest local log-log slope of `key` against batch size over every accountant's
    curve in `rows` (noise_level_vs_batch_size rows): <= 0 means that, for every accountant,
    the noise level never rises between neighbouring batch sizes. NaN with fewer than two
    batch sizes per accountant."""
    slopes = []
    for (_,), grp in _by(rows, "accountant").items():
        slopes += local_loglog_slopes([g["batch_size"] for g in grp], [g[key] for g in grp])
    return max(slopes) if slopes else float("nan")


# ---------------------------------------------------------------------------- figures


def _by(rows: list[dict], *keys: str) -> dict:
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return groups


def _lines(rows: list[dict], key: str, x: str, y: str, label: Callable[[str, Any], str], **style):
    """A log-log figure with one line per (accountant, rows[key]): colour by `key`, line
    style by accountant; points with x <= 0 are left out (log axis)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    colors = {v: f"C{i}" for i, v in enumerate(sorted({r[key] for r in rows}))}
    for (accountant, value), grp in _by(rows, "accountant", key).items():
        grp = sorted((g for g in grp if g[x] > 0), key=lambda g: g[x])
        ax.plot([g[x] for g in grp], [g[y] for g in grp], LINESTYLES.get(accountant, "-"), color=colors[value],
                label=label(accountant, value), **style)
    ax.set(xscale="log", yscale="log")
    return fig, ax


def _finish(fig, ax, **legend):
    ax.legend(fontsize="small", **legend)
    fig.tight_layout()
    return fig


def plot_epsilon_vs_steps(rows: list[dict]):
    """Figure 1: epsilon against steps, one colour per sigma, one line style per accountant."""
    fig, ax = _lines(rows, "noise_multiplier", "steps", "epsilon",
                     lambda a, s: f"{LABELS.get(a, a)}, $\\sigma$={s:g}")
    q = rows[0]["sample_rate"] if rows else float("nan")
    ax.set(xlabel="steps", ylabel="epsilon",
           title=f"DP-SGD epsilon vs steps (q={q:g}, delta={rows[0]['delta']:g})" if rows else "")
    return _finish(fig, ax, ncol=2)


def plot_noise_vs_sample_rate(rows: list[dict]):
    """Figure 2: noise multiplier needed against the sampling rate, per epsilon and accountant."""
    fig, ax = _lines(rows, "target_epsilon", "sample_rate", "noise_multiplier",
                     lambda a, e: f"{LABELS.get(a, a)}, $\\varepsilon$={e:g}", marker=".")
    epochs = rows[0]["epochs"] if rows else float("nan")
    ax.set(xlabel="sampling rate q", ylabel="noise multiplier $\\sigma$",
           title=f"Noise needed at {epochs:g} epochs (delta={rows[0]['delta']:g})" if rows else "")
    return _finish(fig, ax, ncol=2)


def plot_noise_level_vs_batch_size(rows: list[dict], reference_accountant: str = "rdp"):
    """Figure 3: sigma(B)^2 / B against B per accountant, with an O(1/B) reference line
    anchored at the smallest batch of `reference_accountant`."""
    fig, ax = _lines(rows, "accountant", "batch_size", "noise_level", lambda a, _: LABELS.get(a, a),
                     marker="o", ms=3)
    ref_rows = sorted((r for r in rows if r["accountant"] == reference_accountant), key=lambda g: g["batch_size"])
    if ref_rows:
        bs = [r["batch_size"] for r in ref_rows]
        ax.plot(bs, inverse_reference(bs, bs[0], ref_rows[0]["noise_level"]), color="grey", lw=1, alpha=0.8,
                label="O(1/B) reference")
    if rows:
        r0 = rows[0]
        ax.set_title(f"Noise level at $\\varepsilon$={r0['target_epsilon']:g}, {r0['epochs']:g} epochs, n={r0['n']}")
    ax.set(xlabel="expected batch size B", ylabel="$\\sigma(B)^2 / B$")
    return _finish(fig, ax)
