"""Plotting helpers shared by the notebooks: bars with failed cells marked, one legend entry
per label. They draw on axes the caller made (matplotlib stays the caller's import), so a
notebook keeps its figure layout and this module stays free of pyplot state.

Helpers for other notebooks may be appended here; keep each one independent of any notebook.
"""

from __future__ import annotations

import math
from typing import Any, Sequence


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


NOT_MEASURED = "not measured"
FAILED = "fails"


def group_label(row: dict[str, Any]) -> str:
    """"model@resolution, batch B" of a bench row (the batch only when the row has one)."""
    bs = row.get("batch_size")
    return f"{row['model']}@{row['resolution']}" + (f", batch {bs}" if bs is not None else "")


def grouped_bars(ax, rows: Sequence[dict[str, Any]], key: str, ylabel: str, *,
                 spread_key: str | None = None) -> set[str]:
    """One group of bars per "model@resolution, batch B" of `rows`, one bar per method (colour Cj).

    A failed row (status != "ok") is drawn as the word "fails", an ok row without `key` as
    "not measured", both as rotated text at the bar's place so that no cell vanishes. With
    `spread_key` (a row's list of repeated values, e.g. the bench's `pair_ratios`), a whisker
    spans their minimum to maximum. Each method's label is given once, for `legend_once`.
    Returns the in-bar words drawn, so that a title explains only the words the figure shows.
    """
    keys = list(dict.fromkeys(group_label(r) for r in rows))
    meths = list(dict.fromkeys(r["method"] for r in rows))
    w = 0.8 / max(len(meths), 1)
    drawn: set[str] = set()
    for j, m in enumerate(meths):
        for i, k in enumerate(keys):
            r = next((r for r in rows if group_label(r) == k and r["method"] == m), None)
            x = i + (j - (len(meths) - 1) / 2) * w
            if r is None:
                continue
            if r["status"] != "ok" or r.get(key) is None:
                word = FAILED if r["status"] != "ok" else NOT_MEASURED
                drawn.add(word)
                ax.text(x, 0.02, word, rotation=90, ha="center", va="bottom",
                        fontsize=7, transform=ax.get_xaxis_transform(), color="C%d" % j)
            else:
                spread = [v for v in (r.get(spread_key) or []) if not _missing(v)] if spread_key else []
                err = ([[max(r[key] - min(spread), 0.0)], [max(max(spread) - r[key], 0.0)]]
                       if len(spread) > 1 else None)
                ax.bar(x, r[key], w, color="C%d" % j, yerr=err, capsize=2 if err else 0,
                       label=m if i == 0 or m not in ax.get_legend_handles_labels()[1] else None)
    ax.set_xticks(range(len(keys)), keys, rotation=15 if len(keys) > 3 else 0, ha="right" if len(keys) > 3 else "center")
    ax.set_xlim(-0.5, len(keys) - 0.5)
    ax.set_xlabel("model@input size (pixels), batch")
    ax.set_ylabel(ylabel)
    return drawn


def legend_once(target, source=None, *, one_row: bool = False, **kwargs):
    """A legend on `target` (an Axes or a Figure) with one entry per label of `source`'s
    artists (default: `target`, which must then be an Axes); later duplicates are dropped.
    `one_row`: as many columns as entries. Other keywords go to `legend`."""
    handles, labels = (source or target).get_legend_handles_labels()
    by = dict(zip(labels, handles))
    if one_row:
        kwargs["ncol"] = max(len(by), 1)
    return target.legend(list(by.values()), list(by.keys()), **kwargs)


def bars_marking_missing(ax, labels: Sequence[str], values: Sequence[float | None], *,
                         missing_text: str = "not measured or failed", yerr: Sequence[float] | None = None,
                         ranges: Sequence[Sequence[float] | None] | None = None,
                         colors: Sequence[str] | None = None, rotation: float = 20) -> None:
    """One bar per label; a missing value (None or NaN) gets a zero-height bar and
    `missing_text` written upwards at its place, so that it reads as absent, not as zero.
    Whiskers: `yerr` (symmetric) or `ranges` (per bar, the values whose minimum to maximum
    the whisker spans, e.g. repeated measurements; fewer than two: no whisker)."""
    vals = [float("nan") if _missing(v) else float(v) for v in values]
    colors = list(colors) if colors is not None else ["C%d" % i for i in range(len(vals))]
    err = None if yerr is None else [0.0 if _missing(e) else e for e in yerr]
    if ranges is not None:
        lo, hi = [], []
        for v, r in zip(vals, ranges):
            r = [x for x in (r or []) if not _missing(x)]
            ok = len(r) > 1 and not math.isnan(v)
            lo.append(max(v - min(r), 0.0) if ok else 0.0)
            hi.append(max(max(r) - v, 0.0) if ok else 0.0)
        err = [lo, hi] if any(lo) or any(hi) else None  # no spread anywhere: no zero-length whiskers
    ax.bar(range(len(vals)), [0.0 if math.isnan(v) else v for v in vals], color=colors,
           yerr=err, capsize=0 if err is None else 3)
    for i, v in enumerate(vals):
        if math.isnan(v):
            ax.text(i, 0.02, missing_text, rotation=90, ha="center", va="bottom", fontsize=7,
                    transform=ax.get_xaxis_transform())
    ax.set_xticks(range(len(vals)), list(labels), rotation=rotation, ha="right", rotation_mode="anchor")


def plain_log_ticks(axis) -> None:
    """Label a log-scale axis at 1, 2, 5 x 10^k in plain numbers ("0.5", "2", "20"), with no
    minor labels: easier to read than "6x10^0"-style labels, and they do not crowd."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def mean_sd_band(ax, df, metric: str, label: str, x: str = "step", **kwargs):
    """The mean of `metric` over the rows sharing each `x` (e.g. seeds) as a line, with a
    ±1 sd band in the line's colour (no band where one row: sd 0). Keywords go to `plot`."""
    g = df.groupby(x)[metric]
    m, sd = g.mean(), g.std().fillna(0.0)
    line, = ax.plot(m.index, m.values, label=label, **kwargs)
    ax.fill_between(m.index, (m - sd).values, (m + sd).values, alpha=0.2, color=line.get_color())
    return line
