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


def grouped_bars(ax, rows: Sequence[dict[str, Any]], key: str, ylabel: str) -> None:
    """One group of bars per "model@resolution" of `rows`, one bar per method (colour Cj).

    A failed row (status != "ok") is drawn as the word "fails", an ok row without `key` as
    "n/m" (not measured), both as rotated text at the bar's place so that no cell vanishes.
    Each method's label is given once, for `legend_once`.
    """
    keys = list(dict.fromkeys(f"{r['model']}@{r['resolution']}" for r in rows))
    meths = list(dict.fromkeys(r["method"] for r in rows))
    w = 0.8 / max(len(meths), 1)
    for j, m in enumerate(meths):
        for i, k in enumerate(keys):
            r = next((r for r in rows if f"{r['model']}@{r['resolution']}" == k and r["method"] == m), None)
            x = i + (j - (len(meths) - 1) / 2) * w
            if r is None:
                continue
            if r["status"] != "ok" or r.get(key) is None:
                ax.text(x, 0.02, "fails" if r["status"] != "ok" else "n/m", rotation=90, ha="center", va="bottom",
                        fontsize=7, transform=ax.get_xaxis_transform(), color="C%d" % j)
            else:
                ax.bar(x, r[key], w, color="C%d" % j,
                       label=m if i == 0 or m not in ax.get_legend_handles_labels()[1] else None)
    ax.set_xticks(range(len(keys)), keys)
    ax.set_xlim(-0.5, len(keys) - 0.5)
    ax.set_ylabel(ylabel)


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
                         missing_text: str = "n/m or fails", yerr: Sequence[float] | None = None,
                         colors: Sequence[str] | None = None, rotation: float = 20) -> None:
    """One bar per label; a missing value (None or NaN) gets a zero-height bar and
    `missing_text` written upwards at its place, so that it reads as absent, not as zero."""
    vals = [float("nan") if _missing(v) else float(v) for v in values]
    colors = list(colors) if colors is not None else ["C%d" % i for i in range(len(vals))]
    ax.bar(range(len(vals)), [0.0 if math.isnan(v) else v for v in vals], color=colors,
           yerr=None if yerr is None else [0.0 if _missing(e) else e for e in yerr], capsize=0 if yerr is None else 3)
    for i, v in enumerate(vals):
        if math.isnan(v):
            ax.text(i, 0.02, missing_text, rotation=90, ha="center", va="bottom", fontsize=7,
                    transform=ax.get_xaxis_transform())
    ax.set_xticks(range(len(vals)), list(labels), rotation=rotation, ha="right")


def mean_sd_band(ax, df, metric: str, label: str, x: str = "step", **kwargs):
    """The mean of `metric` over the rows sharing each `x` (e.g. seeds) as a line, with a
    ±1 sd band in the line's colour (no band where one row: sd 0). Keywords go to `plot`."""
    g = df.groupby(x)[metric]
    m, sd = g.mean(), g.std().fillna(0.0)
    line, = ax.plot(m.index, m.values, label=label, **kwargs)
    ax.fill_between(m.index, (m - sd).values, (m + sd).values, alpha=0.2, color=line.get_color())
    return line
