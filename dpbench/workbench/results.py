"""Tidy metrics rows, figures and atomic writes: everything a notebook records goes here.

A notebook makes one `Recorder(output_dir)`, adds rows with `add(...)`, saves figures with
`figure(fig, name)` and finally calls `save()`. Rows follow the tidy schema in `COLUMNS`,
plus any parameter columns (``step``, ``batch_size``, ...).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from dpbench.atomic import write_atomic
from dpbench.errors import UserError

COLUMNS = [
    "experiment",
    "method",
    "epsilon",
    "delta",
    "seed",
    "metric",
    "value",
    "status",
    "reason",
    "claim_id",
]
STATUSES = ("ok", "failed")
STYLE_FILE = Path(__file__).resolve().parent.parent / "dpbench.mplstyle"


def scratch_dir(name: str = "interactive") -> Path:
    """The folder a notebook writes to when run interactively with no `output_dir`."""
    # The repository's .scratch/ (git-ignored), wherever the kernel was started (nbval and
    # JupyterLab start it in notebooks/); outside a checkout, the current folder's.
    default = Path.cwd() / ".scratch"
    for folder in (Path.cwd(), *Path.cwd().parents):
        if (folder / "pyproject.toml").is_file() and (folder / "notebooks").is_dir():
            default = folder / ".scratch"
            break
    root = Path(os.environ.get("DPBENCH_SCRATCH", default))
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def use_style() -> None:
    """Apply dpbench's one matplotlib style to every figure that follows."""
    import matplotlib.pyplot as plt

    plt.style.use(str(STYLE_FILE))


class Recorder:
    """Collects tidy metric rows and figures for one notebook run under `output_dir`.

    Every row carries `delta` (default from the recorder) and a `status` of ``ok`` or
    ``failed`` with a `reason`. `claim_id` names a row of `references/paper_values.csv`.
    """

    def __init__(self, output_dir: str | os.PathLike | None, experiment: str = "", delta: float | None = None):
        self.output_dir = Path(output_dir) if output_dir else scratch_dir(experiment or "interactive")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.figures_dir = self.output_dir / "figures"
        self.experiment = experiment
        self.delta = delta
        self.rows: list[dict[str, Any]] = []

    def add(
        self,
        metric: str,
        value: float | None,
        *,
        method: str = "",
        experiment: str | None = None,
        epsilon: float | None = None,
        delta: float | None = None,
        seed: int | None = None,
        status: str = "ok",
        reason: str = "",
        claim_id: str = "",
        **params: Any,
    ) -> dict[str, Any]:
        """Append one tidy row; extra keyword arguments become parameter columns."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        if status == "failed" and not reason:
            raise ValueError("a failed row needs a reason")
        if value is not None and isinstance(value, float) and math.isnan(value) and status == "ok":
            raise ValueError(f"metric {metric!r} is NaN: record it with status='failed' and a reason")
        row = {
            "experiment": self.experiment if experiment is None else experiment,
            "method": method,
            "epsilon": epsilon,
            "delta": self.delta if delta is None else delta,
            "seed": seed,
            "metric": metric,
            "value": None if value is None else float(value),
            "status": status,
            "reason": reason,
            "claim_id": claim_id,
        }
        clash = set(params) & set(row)
        if clash:
            raise ValueError(f"parameter columns clash with the tidy schema: {sorted(clash)}")
        row.update(params)
        self.rows.append(row)
        return row

    def figure(self, fig, name: str) -> Path:
        """Save a matplotlib figure as `figures/<name>.png` (atomically) and return its path.

        Every figure then goes through `check_figure` (overlapping text, unlabelled axes,
        placeholders); a figure that fails raises `FigureCheckError` after it was saved, so the
        PNG is there to look at.
        """
        import io

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
        path = write_atomic(self.figures_dir / f"{name}.png", buf.getvalue())
        problems = check_figure(fig)
        if problems:
            shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
            raise FigureCheckError(f"figure {name!r} fails the figure check ({len(problems)} problem(s); "
                                   f"saved anyway to {path}): {shown}")
        return path

    def frame(self):
        """The rows as a pandas DataFrame with the tidy columns first."""
        import pandas as pd

        df = pd.DataFrame(self.rows)
        if df.empty:
            return pd.DataFrame(columns=COLUMNS)
        extra = [c for c in df.columns if c not in COLUMNS]
        return df[COLUMNS + extra]

    def save(self, name: str = "metrics.csv") -> Path:
        """Write the rows to `metrics.csv` (atomically) and return its path."""
        return write_atomic(self.output_dir / name, self.frame().to_csv(index=False))


def load_metrics(path: str | os.PathLike):
    """Read a `metrics.csv` (or a results folder holding one) back as a DataFrame."""
    import pandas as pd

    path = Path(path)
    if path.is_dir():
        path = path / "metrics.csv"
    df = pd.read_csv(path, keep_default_na=False, na_values=[""])
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path} is not a tidy metrics file: missing columns {missing}")
    return df


# ---------------------------------------------------------------------------------------------
# The figure check: every figure a notebook saves goes through it (Recorder.figure), at every
# profile. It measures with matplotlib's own renderer extents, so what it reports is what the PNG
# shows.

class FigureCheckError(UserError):
    """A saved figure has overlapping text, an unlabelled axis or a placeholder in a label."""


# Text may touch: boxes overlapping by at most this many pixels (at the figure's dpi) pass.
OVERLAP_TOLERANCE_PX = 1.0
_PLACEHOLDERS = (
    (re.compile(r"\bTODO\b|\bFIXME\b"), "a TODO"),
    (re.compile(r"(?<![\w/])n/m(?![\w/])", re.IGNORECASE), "'n/m' (say what is not measured, or leave it out)"),
    (re.compile(r"\{[^{}]*\}"), "an unformatted '{...}' (a missing f-prefix or .format)"),
)
_MATHTEXT = re.compile(r"(?<!\\)\$.*?(?<!\\)\$")


def _short(text: str, n: int = 30) -> str:
    text = " ".join(text.replace("\\mathdefault", "").replace("$", "").split())
    return repr(text if len(text) <= n else text[: n - 1] + "…")


def _all_axes(fig) -> list:
    """The figure's axes and, after each, its child axes (secondary_xaxis/yaxis, inset axes)."""
    out = []
    for ax in fig.axes:
        out.append(ax)
        out.extend(a for a in getattr(ax, "child_axes", []) if a not in fig.axes)
    return out


def _axes_name(fig, ax) -> str:
    if ax not in fig.axes:  # a child: named after its parent
        parent = next((p for p in fig.axes if ax in getattr(p, "child_axes", [])), None)
        return f"the secondary axes of {_axes_name(fig, parent)}" if parent is not None else "a secondary axes"
    title = next((t.get_text() for t in (ax.title, ax._left_title, ax._right_title) if t.get_text().strip()), "")
    where = f"axes {fig.axes.index(ax) + 1}"
    return f"{where} {_short(title)}" if title else where


def _drawn_ticks(axis):
    """The ticks matplotlib draws (inside the view interval), major and minor."""
    update = getattr(axis, "_update_ticks", None)
    if update is not None:
        return list(update())
    lo, hi = sorted(axis.get_view_interval())
    return [t for t in axis.get_major_ticks() + axis.get_minor_ticks() if lo <= t.get_loc() <= hi]


def _figure_texts(fig):
    """(text artist, description, role) for every visible, non-empty text of `fig`.

    Roles: "tick" (tick labels), "label" (titles, axis labels, legend texts: the placeholder
    rule applies to these) and "text" (free texts and annotations, offset texts).
    """
    out, seen = [], set()

    def add(t, desc, role):  # once per artist (the suptitle is also among fig.texts)
        if t is not None and id(t) not in seen and t.get_visible() and t.get_text().strip():
            seen.add(id(t))
            out.append((t, desc, role))

    add(fig._suptitle, "suptitle", "label")
    add(getattr(fig, "_supxlabel", None), "figure x label", "label")
    add(getattr(fig, "_supylabel", None), "figure y label", "label")
    for t in fig.texts:
        add(t, f"figure text {_short(t.get_text())}", "text")
    legends = [(lg, "figure legend") for lg in fig.legends]
    for ax in _all_axes(fig):
        if not ax.get_visible():
            continue
        name = _axes_name(fig, ax)
        where = f"axes {fig.axes.index(ax) + 1}" if ax in fig.axes else name
        for t, kind in ((ax.title, "title"), (ax._left_title, "left title"), (ax._right_title, "right title")):
            add(t, f"{kind} {_short(t.get_text())} of {where}", "label")
        for t in ax.texts:
            add(t, f"text {_short(t.get_text())} in {name}", "text")
        if ax.get_legend() is not None:
            legends.append((ax.get_legend(), f"legend of {name}"))
        if not ax.axison:
            continue
        for letter, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            if not axis.get_visible():
                continue
            add(axis.label, f"{letter} label {_short(axis.label.get_text())} of {name}", "label")
            add(axis.get_offset_text(), f"{letter} offset text of {name}", "text")
            for tick in _drawn_ticks(axis):
                if not tick.get_visible():
                    continue
                for lab in (tick.label1, tick.label2):
                    add(lab, f"{letter} tick label {_short(lab.get_text(), 16)} of {name}", f"tick {letter} {id(ax)}")
    for lg, where in legends:
        if not lg.get_visible():
            continue
        add(lg.get_title(), f"legend title {_short(lg.get_title().get_text())} ({where})", "label")
        for t in lg.get_texts():
            add(t, f"legend text {_short(t.get_text())} ({where})", "label")
    return out


def _oriented_box(text, renderer):
    """(center, unit x axis, unit y axis, half width, half height) of `text`'s rotated box."""
    import numpy as np

    bb = text.get_window_extent(renderer)
    center = np.array([(bb.x0 + bb.x1) / 2, (bb.y0 + bb.y1) / 2])
    angle = text.get_rotation() % 180.0
    if min(angle % 90.0, 90.0 - angle % 90.0) < 1e-6:  # axis-aligned: the extent is the box
        return center, np.array([1.0, 0.0]), np.array([0.0, 1.0]), bb.width / 2, bb.height / 2
    # The extent of a rotated text is the bounding box of its rotated rectangle, centred on it;
    # the rectangle's own size is the extent of the same text unrotated.
    text.set_rotation(0.0)
    try:
        flat = text.get_window_extent(renderer)
    finally:
        text.set_rotation(angle)
    a = math.radians(angle)
    u, v = np.array([math.cos(a), math.sin(a)]), np.array([-math.sin(a), math.cos(a)])
    return center, u, v, flat.width / 2, flat.height / 2


def _boxes_overlap(b1, b2, tol: float) -> bool:
    """Separating-axis test on two oriented rectangles, each shrunk by `tol`/2 on every side."""
    import numpy as np

    (c1, u1, v1, w1, h1), (c2, u2, v2, w2, h2) = b1, b2
    w1, h1, w2, h2 = (max(x - tol / 2, 0.0) for x in (w1, h1, w2, h2))
    d = c2 - c1
    for n in (u1, v1, u2, v2):
        r1 = w1 * abs(np.dot(u1, n)) + h1 * abs(np.dot(v1, n))
        r2 = w2 * abs(np.dot(u2, n)) + h2 * abs(np.dot(v2, n))
        if abs(np.dot(d, n)) >= r1 + r2:
            return False
    return True


def _placeholder(text: str) -> str | None:
    plain = _MATHTEXT.sub("", text)  # "$10^{-5}$" is mathtext, not a format field
    for pattern, what in _PLACEHOLDERS:
        if pattern.search(plain):
            return what
    return None


def check_figure(fig, *, tolerance_px: float = OVERLAP_TOLERANCE_PX) -> list[str]:
    """The problems of a drawn figure, one sentence each with what to fix (empty: it passes).

    Rules, measured with matplotlib's renderer extents (`get_window_extent`) at the figure's dpi:
    1. **No two texts overlap.** Texts are every visible, non-empty title, suptitle, axis label,
       drawn tick label (major and minor; tick labels of one axis count against each other),
       offset text, free text or annotation, and legend text or title. Two overlap when their
       rotated boxes intersect by more than `tolerance_px` in every direction.
    2. **A plotted axis has a label.** An x or y axis of visible Axes that holds data (lines,
       bars, collections, images: `Axes.has_data`) and draws tick labels needs a label (its own,
       or the figure's `supxlabel`/`supylabel`). Axes switched off, hidden axes (`twinx`) and
       shared axes whose tick labels are hidden need none.
    3. **No placeholder in a title or label** (titles, axis labels, legend texts): `TODO`,
       `FIXME`, `n/m`, or a `{...}` left by a missing f-string (mathtext `$...$` is exempt).
    """
    fig.draw_without_rendering()  # tick labels and layout as the PNG has them
    renderer = fig.canvas.get_renderer()
    problems: list[str] = []
    texts = _figure_texts(fig)

    # Rule 3: placeholders.
    for t, desc, role in texts:
        what = _placeholder(t.get_text()) if role == "label" else None
        if what:
            problems.append(f"placeholder: the {desc} holds {what}")

    # Rule 2: unlabelled plotted axes.
    sup = {"x": bool(getattr(fig, "_supxlabel", None) and fig._supxlabel.get_text().strip()),
           "y": bool(getattr(fig, "_supylabel", None) and fig._supylabel.get_text().strip())}
    for ax in fig.axes:
        if not (ax.get_visible() and ax.axison and ax.has_data()):
            continue
        for letter, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            if not axis.get_visible() or axis.label.get_text().strip() or sup[letter]:
                continue
            shows = any(lab.get_visible() and lab.get_text().strip()
                        for tick in _drawn_ticks(axis) if tick.get_visible() for lab in (tick.label1, tick.label2))
            if shows:
                problems.append(f"unlabelled axis: the {letter} axis of {_axes_name(fig, ax)} plots data but has no "
                                f"label (call ax.set_{letter}label with the quantity and unit)")

    # Rule 1: overlapping texts (axis-aligned extents first, the rotated test only where they meet).
    # Tick labels of one axis that collide among themselves are reported once, with a count.
    extents = [t.get_window_extent(renderer) for t, _, _ in texts]
    boxes: dict[int, Any] = {}
    same_axis: dict[str, list[tuple[int, int]]] = {}
    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            a, b = extents[i], extents[j]
            if (min(a.x1, b.x1) - max(a.x0, b.x0) <= tolerance_px
                    or min(a.y1, b.y1) - max(a.y0, b.y0) <= tolerance_px):
                continue
            for k in (i, j):
                if k not in boxes:
                    boxes[k] = _oriented_box(texts[k][0], renderer)
            if not _boxes_overlap(boxes[i], boxes[j], tolerance_px):
                continue
            if texts[i][2] == texts[j][2] and texts[i][2].startswith("tick"):
                same_axis.setdefault(texts[i][2], []).append((i, j))
                continue
            hint = "move or shorten one, or give the figure more room (a larger figsize, layout='constrained')"
            problems.append(f"overlapping text: the {texts[i][1]} and the {texts[j][1]} overlap ({hint})")
    for pairs in same_axis.values():
        i, j = pairs[0]
        problems.append(f"overlapping tick labels: {len(pairs)} pair(s) of neighbouring tick labels overlap, e.g. the "
                        f"{texts[i][1]} and the {texts[j][1]} (use fewer ticks, rotate or shorten the labels, "
                        f"or widen the figure)")
    return problems
