"""Tidy metrics rows, figures and atomic writes: everything a notebook records goes here.

A notebook makes one `Recorder(output_dir)`, adds rows with `add(...)`, saves figures with
`figure(fig, name)` and finally calls `save()`. Rows follow the tidy schema in `COLUMNS`,
plus any parameter columns (``step``, ``batch_size``, ...).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from dpbench.atomic import write_atomic, write_json_atomic

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
        """Save a matplotlib figure as `figures/<name>.png` (atomically) and return its path."""
        import io

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
        return write_atomic(self.figures_dir / f"{name}.png", buf.getvalue())

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
