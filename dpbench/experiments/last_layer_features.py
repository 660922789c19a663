"""Last-layer DP training on fixed features: the arms, sweeps, claim rows and tables of the
last-layer experiment (Mehta et al. 2022 a, b; PAPERS.md E).

The solvers live in `dpbench.training.linear`, the feature cache and backbones in
`dpbench.training.features`; this module decides what to run and what to record:
- `SolverConfig`: the per-solver settings of one run, and the releases each solver makes;
- `noise_multiplier_rows`: calibrated noise multipliers beside PAPERS.md E's reference values,
  tagged with their claim ids where the setting is the paper's own;
- `synthetic_task` / `real_feature_task`: normalised (train, test) features, the normaliser
  always fitted on public examples only; `select_backbone` picks the frozen backbone for
  real data (timm weights, an upstream checkpoint folder passed in by the caller, or a
  model trained here on the public split);
- `sweep`, `init_ablation`, `batch_size_ablation`: the runs, as DataFrames;
- `*_metrics` / `*_rows` functions: the tidy rows to record, as dicts with `metric` and
  `value` plus the recorder's keyword columns (`record(rec, rows)` adds them);
- tables (`summary`, `accuracy_table`, `noise_table`) and figures (`plot_*`).

No recorder or runner is imported here: callers pass the recorder and the upstream folder in.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from dpbench.data import load_dataset, split_public_private
from dpbench.errors import UserError
from dpbench.training import features as F
from dpbench.training import linear as L
from dpbench.training import mixing

NICE = {"least_squares": "least squares (DP-LS)", "newton": "DP Newton", "dp_fc": "DP-FC",
        "dp_sgd": "DP-SGD", "dp_adam": "DP-Adam"}

# PAPERS.md E: one common noise multiplier per solver at delta = 1e-5, classic conversion.
PAPER_SIGMA = {("least_squares", 0.1): 83.3, ("least_squares", 1.0): 8.5, ("least_squares", 8.0): 1.20,
               ("dp_fc", 0.1): 159.5, ("dp_fc", 1.0): 16.3, ("dp_fc", 8.0): 2.29}
PAPER_DELTA = 1e-5
PAPER_FC_STEPS = 10  # DP-FC's reference values are for T = 10 (11 releases)
PAPER_EPSILONS = (0.1, 1.0, 8.0)

BACKBONE_OPTIONS = ("timm", "checkpoint", "public")


def record(rec: Any, rows: Iterable[dict[str, Any]]) -> int:
    """Add each row (`metric`, `value` and keyword columns) to a recorder with an `add`
    method like `dpbench.workbench.results.Recorder.add`; returns how many were added."""
    count = 0
    for row in rows:
        rec.add(**row)
        count += 1
    return count


# ------------------------------------------------------------------------------- settings


@dataclass
class SolverConfig:
    """Settings of every solver in one run (fixed, not tuned per epsilon).

    `sgd_batch_size` 0 means the full batch for DP-SGD/DP-Adam (then every step is an
    unsampled Gaussian release)."""

    clip_norm: float = 1.0
    ls_alpha: float = 2.0
    ls_lam: float = 1.0
    lam_noise: float = 1.0
    newton_steps: int = 3
    newton_lr: float = 1.0
    newton_lam: float = 1.0
    fc_steps: int = 10
    fc_lr: float = 0.2
    fc_lam: float = 100.0
    fc_bias: float = -10.0
    sgd_steps: int = 10
    sgd_lr: float = 4.0
    adam_lr: float = 0.1
    sgd_batch_size: int = 0

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "SolverConfig":
        """The config from a namespace holding every field by name (a notebook's parameters)."""
        return cls(**{name: params[name] for name in cls.__dataclass_fields__})

    def batch_size(self, n_private: int) -> int | None:
        """DP-SGD's expected batch size on `n_private` examples; None for the full batch."""
        return None if self.sgd_batch_size == 0 else min(int(self.sgd_batch_size), int(n_private))

    def settings(self, n_private: int, fc_lam: float | None = None) -> dict[str, dict[str, Any]]:
        """Keyword settings per solver for `linear.run_grid`; `fc_lam` overrides DP-FC's ridge
        (the real-data runs use their own)."""
        bs = self.batch_size(n_private)
        c = self.clip_norm
        return {
            "least_squares": dict(alpha=self.ls_alpha, lam=self.ls_lam, lam_noise=self.lam_noise, clip_norm=c),
            "newton": dict(steps=self.newton_steps, lr=self.newton_lr, lam=self.newton_lam,
                           lam_noise=self.lam_noise, clip_norm=c),
            "dp_fc": dict(steps=self.fc_steps, lr=self.fc_lr, lam=self.fc_lam if fc_lam is None else fc_lam,
                          lam_noise=self.lam_noise, bias=self.fc_bias, clip_norm=c),
            "dp_sgd": dict(steps=self.sgd_steps, lr=self.sgd_lr, batch_size=bs, clip_norm=c),
            "dp_adam": dict(steps=self.sgd_steps, lr=self.adam_lr, batch_size=bs, clip_norm=c),
        }

    def releases(self) -> dict[str, int]:
        """Unsampled Gaussian releases per solver; DP-SGD only when it runs full-batch (a
        sampled run is not a fixed number of unsampled releases)."""
        out = {"least_squares": L.num_releases("least_squares"), "dp_fc": L.num_releases("dp_fc", self.fc_steps),
               "newton": L.num_releases("newton", self.newton_steps)}
        if self.sgd_batch_size == 0:
            out["dp_sgd"] = L.num_releases("dp_sgd", self.sgd_steps)
        return out


# ------------------------------------------------------------------------ noise multipliers


def paper_claim(solver: str, epsilon: float, conversion: str, delta: float, fc_steps: int) -> str:
    """The claim id of a noise-multiplier row when it is PAPERS.md E's own setting (same
    solver releases, epsilon, delta and classic conversion), else ""."""
    if delta != PAPER_DELTA or conversion != "classic" or (solver, epsilon) not in PAPER_SIGMA:
        return ""
    if solver == "dp_fc" and fc_steps != PAPER_FC_STEPS:
        return ""
    return f"E-{'dpls' if solver == 'least_squares' else 'dpfc'}-sigma-eps{epsilon:g}"


def noise_multiplier_rows(epsilons: Sequence[float], cfg: SolverConfig, delta: float) -> list[dict[str, Any]]:
    """Calibrated noise multipliers of each solver's releases under every conversion, at the
    papers' epsilons and at `epsilons`; each row also holds `paper` (the reference value when
    the row is a claim, else None) and `claim_id`."""
    table_eps = sorted(set(PAPER_EPSILONS) | {float(e) for e in epsilons})
    rows = L.noise_multiplier_table(table_eps, cfg.releases(), delta=delta)
    for r in rows:
        r["claim_id"] = paper_claim(r["solver"], r["epsilon"], r["conversion"], delta, cfg.fc_steps)
        r["paper"] = PAPER_SIGMA[(r["solver"], r["epsilon"])] if r["claim_id"] else None
    return rows


def noise_multiplier_metrics(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Recorder rows for `noise_multiplier_rows`; a claim row is deterministic and compared
    as a value (exact)."""
    out = []
    for r in rows:
        tag = dict(claim_id=r["claim_id"], comparison="value", exact=True) if r.get("claim_id") else {}
        out.append(dict(metric="noise_multiplier", value=r["noise_multiplier"], method=r["solver"],
                        epsilon=r["epsilon"], conversion=r["conversion"], releases=r["releases"],
                        feature_set="none", **tag))
    return out


def noise_table(rows: Sequence[dict[str, Any]], fc_steps: int):
    """Wide table: one line per (solver, releases, epsilon), a column per conversion, the
    paper's value where it applies (DP-FC only at T = 10) and classic / paper."""
    import pandas as pd

    wide = pd.DataFrame(rows).pivot_table(index=["solver", "releases", "epsilon"], columns="conversion",
                                          values="noise_multiplier")
    wide = wide[["classic", "rdp", "pld"]]
    wide["paper (classic)"] = [PAPER_SIGMA.get((s, e)) if (s != "dp_fc" or fc_steps == PAPER_FC_STEPS) else None
                               for s, _, e in wide.index]
    wide["classic / paper"] = wide["classic"] / wide["paper (classic)"]
    return wide


# ---------------------------------------------------------------------------- feature sets


@dataclass
class FeatureTask:
    """Normalised private training features, test features and what to say about them."""

    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    num_classes: int
    notes: list[str] = field(default_factory=list)
    backbone: str = ""
    backbone_source: str = ""

    @property
    def n_private(self) -> int:
        return int(self.train[1].shape[0])


def synthetic_task(
    n: int,
    dim: int,
    num_classes: int,
    *,
    n_test: int,
    n_public: int,
    separation: float,
    label_noise: float,
    seed: int,
) -> FeatureTask:
    """`features.synthetic_features`, normalised with statistics of its public split only
    (the public split is used for nothing else)."""
    syn = F.synthetic_features(n, dim, num_classes, n_test=n_test, n_public=n_public, separation=separation,
                               label_noise=label_noise, seed=seed)
    norm = F.PublicNormalizer().fit(syn.public.features)
    notes = [syn.description,
             f"n_private={len(syn.train)}  n_test={len(syn.test)}  n_public={len(syn.public)} "
             "(public only fits the normaliser)"]
    return FeatureTask((norm.transform(syn.train.features), syn.train.labels),
                       (norm.transform(syn.test.features), syn.test.labels), syn.num_classes, notes,
                       backbone="synthetic", backbone_source="synthetic")


def find_checkpoint(folder: str | os.PathLike | None, missing_note: str = "") -> tuple[Path | None, str]:
    """The first *.safetensors file under an upstream results `folder` (sorted), and a note.
    `folder` None: (None, `missing_note`), the caller's reason why there is no folder."""
    if folder is None:
        return None, missing_note or "no upstream checkpoint folder given"
    found = sorted(Path(folder).rglob("*.safetensors"))
    if not found:
        return None, f"the upstream results at {folder} hold no *.safetensors checkpoint"
    return found[0], f"public checkpoint {found[0]}"


def checkpoint_fit(path: str | os.PathLike, name: str, resize: int | None) -> tuple[str, int | None]:
    """Whether the checkpoint at `path` may back `name`'s features: (why not, "" when it may; the
    resize to use). It must record the same architecture (03's 10-class resnet18 is no resnet50),
    and it sees images at the size it was trained at: `resize` (meant for hub weights) is dropped
    for a net trained at another size. A checkpoint without dpbench's metadata is left to the
    strict load, at `resize`."""
    try:
        spec = mixing.read_public_metadata(path).model
    except UserError:
        return "", resize
    if spec.get("name") and spec["name"] != name:
        return f"it holds a {spec['name']} ({spec.get('num_classes', '?')} classes), not {name}", None
    if resize and spec.get("img_size") and int(spec["img_size"]) != int(resize):
        return "", None
    return "", resize


def select_backbone(
    name: str,
    *,
    num_classes: int,
    public: Any = None,
    prefer: Sequence[str] = BACKBONE_OPTIONS,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_note: str = "",
    public_model: str = "small_cnn",
    public_epochs: float = 20.0,
    public_model_kwargs: dict | None = None,
    resize: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> F.Backbone:
    """A frozen backbone for feature extraction: the first option of `prefer` that works.

    "timm": timm's pretrained weights for `name`; "checkpoint": `checkpoint` (a file) or the
    first safetensors file under `checkpoint_dir` (an upstream notebook's results folder,
    found by the caller; `checkpoint_note` says why there is none), loaded into
    dpbench.models `name`; "public": `public_model` trained here on `public` ((x, y) or a
    data set). The returned note lists why earlier options were skipped. Raises UserError
    when none works.
    """
    notes: list[str] = []
    for option in prefer:
        if option == "timm":
            bb, note = F.timm_backbone(name, resize=resize)
        elif option == "checkpoint":
            if checkpoint:
                path = Path(checkpoint)
                path, note = (path, f"checkpoint {path}") if path.exists() else (None, f"checkpoint {path} does not exist")
            else:
                path, note = find_checkpoint(checkpoint_dir, checkpoint_note)
            bb = None
            why, ckpt_resize = checkpoint_fit(path, name, resize) if path is not None else ("", None)
            if why:
                note, path = f"{note} not used: {why}", None
            if path is not None:
                try:
                    bb = F.checkpoint_backbone(name, path, num_classes=num_classes, public=public, resize=ckpt_resize,
                                               note=note)
                except Exception as exc:  # a wrong architecture or a corrupt file: say so, try the next option
                    note = f"{note} could not be loaded into {name!r} ({type(exc).__name__}: {str(exc)[:200]})"
        elif option == "public":
            bb, note = None, "no public data given to train a backbone on"
            if public is not None:
                # trained here at the data's own size: `resize` is for hub weights, never for this net
                bb = F.public_backbone(public_model, public, num_classes, epochs=public_epochs,
                                       model_kwargs=public_model_kwargs, resize=None, seed=seed, device=device)
                note = bb.note
        else:
            raise UserError(f"unknown backbone option {option!r}; use one of {', '.join(BACKBONE_OPTIONS)}")
        if bb is not None:
            bb.note = "; ".join(notes + [note])
            return bb
        notes.append(note)
    raise UserError("no backbone available: " + "; ".join(notes) + ". Provide public data or a checkpoint")


def real_feature_task(
    dataset: str,
    *,
    backbone: str,
    prefer: Sequence[str] = BACKBONE_OPTIONS,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_note: str = "",
    public_fraction: float = 0.2,
    public_model: str = "small_cnn",
    public_pool_size: int = 1,
    public_epochs: float = 20.0,
    resize: int = 0,
    feature_cache: str = "",
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> FeatureTask:
    """Features of a real data set's private training part and its test split.

    The training split is cut into a stratified public part (`public_fraction`, drawn with
    `seed`) and a private part. Features are raw normalised pixels (`backbone="pixels"`) or
    come from the frozen backbone of `select_backbone` (cached on disk, `feature_cache` ""
    uses the default folder); timm weights get their own input normalisation constants. The
    normaliser is fitted on the public part's features only; the private part is the
    solvers' training set.
    """
    train_ds, test_ds = load_dataset(dataset, "train"), load_dataset(dataset, "test")
    pub_idx, priv_idx = split_public_private(train_ds.y, public_fraction=public_fraction, seed=seed)
    if backbone == "pixels":
        fs_train, fs_test = F.pixel_features(train_ds), F.pixel_features(test_ds)
        bb_name, bb_source = "pixels", "raw normalised pixels"
        notes = [f"[{dataset}] features: raw normalised pixels, d={fs_train.dim}"]
    else:
        kwargs = {"pool_size": public_pool_size} if public_model == "small_cnn" else None
        bb = select_backbone(backbone, num_classes=train_ds.num_classes, public=train_ds.subset(pub_idx),
                             prefer=prefer, checkpoint_dir=checkpoint_dir, checkpoint_note=checkpoint_note,
                             public_model=public_model, public_epochs=public_epochs, public_model_kwargs=kwargs,
                             resize=resize or None, seed=seed, device=device)
        bb_name, bb_source = bb.name, bb.source
        notes = [f"[{dataset}] backbone: {bb.name} from {bb.source} -- {bb.note}"]
        cfg = getattr(bb.model, "pretrained_cfg", None) or {}
        if bb.source == "timm" and cfg.get("mean") and len(cfg["mean"]) == train_ds.input_shape[0]:
            # ImageNet weights expect their own input normalisation (fixed constants, not data statistics)
            train_ds = load_dataset(dataset, "train", mean=cfg["mean"], std=cfg["std"])
            test_ds = load_dataset(dataset, "test", mean=cfg["mean"], std=cfg["std"])
        kw = dict(model_name=bb.name, weights_id=bb.weights_id, dataset=dataset, cache_dir=feature_cache or None,
                  device=device, resize=bb.resize, transform=f"{train_ds.source}|mean={train_ds.mean}|std={train_ds.std}")
        fs_train = F.cached_features(bb.model, train_ds, split="train", **kw)
        fs_test = F.cached_features(bb.model, test_ds, split="test", **kw)
        notes.append(f"[{dataset}] features d={fs_train.dim}: train cache {'hit' if fs_train.hit else 'miss'}, "
                     f"test cache {'hit' if fs_test.hit else 'miss'} ({fs_train.path.parent})")
    nz = F.PublicNormalizer().fit(fs_train.features[pub_idx])
    return FeatureTask((nz.transform(fs_train.features[priv_idx]), fs_train.labels[priv_idx]),
                       (nz.transform(fs_test.features), fs_test.labels), train_ds.num_classes, notes,
                       backbone=bb_name, backbone_source=bb_source)


# ---------------------------------------------------------------------------------- sweeps


def sweep(
    task: FeatureTask,
    *,
    methods: Sequence[str],
    epsilons: Sequence[float],
    seeds: Sequence[int],
    settings: dict[str, dict[str, Any]],
    delta: float,
    conversion: str,
    baseline: bool = True,
    device: str | torch.device | None = None,
):
    """`linear.run_grid` on the task as a DataFrame (one row per run; the non-private
    baseline has target_epsilon inf), with an `n_epsilon` column."""
    import pandas as pd

    rows = L.run_grid(task.train, task.test, task.num_classes, methods=methods, epsilons=epsilons, seeds=seeds,
                      settings=settings, delta=delta, conversion=conversion, baseline=baseline, device=device)
    df = pd.DataFrame(rows)
    if not df.empty:
        df["n_epsilon"] = df["n"] * df["target_epsilon"]
    return df


def sweep_metrics(df, feature_set: str, accounting: bool = True) -> list[dict[str, Any]]:
    """Recorder rows of a sweep: test accuracy per run and, with `accounting`, the accounted
    epsilon and the noise multiplier of each private run."""
    out = []
    for r in df.itertuples():
        eps = r.target_epsilon
        common = dict(method=r.method, epsilon=eps, seed=r.seed, feature_set=feature_set, n=r.n,
                      n_epsilon=r.n * eps, conversion=r.conversion)
        out.append(dict(metric="test_accuracy", value=r.accuracy, **common))
        if accounting and math.isfinite(eps):
            out.append(dict(metric="accounted_epsilon", value=r.epsilon, **common))
            out.append(dict(metric="noise_multiplier", value=r.noise_multiplier, **common))
    return out


def summary(df):
    """Median, min and max test accuracy over seeds per (method, private epsilon), with n*eps."""
    import pandas as pd

    priv = df[np.isfinite(df.target_epsilon)]
    g = priv.groupby(["method", "target_epsilon"]).accuracy
    out = pd.DataFrame({"median": g.median(), "min": g.min(), "max": g.max()}).reset_index()
    out["n_epsilon"] = out.target_epsilon * df.n.iloc[0]
    return out


def non_private(df):
    """The non-private baseline accuracy per method (a Series indexed by method)."""
    return df[~np.isfinite(df.target_epsilon)].set_index("method").accuracy


def accuracy_table(df, methods: Sequence[str]):
    """Median test accuracy over seeds: a line per epsilon (with n*epsilon) and the
    non-private line, a column per method."""
    n = int(df.n.iloc[0])
    t = summary(df).pivot(index="target_epsilon", columns="method", values="median")[list(methods)]
    t.insert(0, "n*epsilon", t.index * n)
    base = non_private(df)
    t.loc["non-private"] = [np.nan] + [base[m] for m in methods]
    return t


def _sweep_runs(df, method: str, epsilons: Sequence[float]) -> list[dict[str, Any]]:
    """Runs of the main sweep for `method` at these epsilons (identical settings and seeds)."""
    return df[(df.method == method) & df.target_epsilon.isin(list(epsilons))].to_dict("records")


def init_ablation(
    task: FeatureTask,
    sweep_df,
    cfg: SolverConfig,
    *,
    epsilons: Sequence[float],
    seeds: Sequence[int],
    delta: float,
    conversion: str,
    fc_lam: float | None = None,
    device: str | torch.device | None = None,
):
    """DP-SGD with a zero against a random (PyTorch default, seeded) head initialisation,
    everything else as in the sweep. Zero init is the sweep's own setting, so its runs are
    reused from `sweep_df`. Returns (DataFrame with an `init` column, recorder rows tagged
    E-zero-init-helps with arms zero_init / random_init)."""
    import pandas as pd

    runs, metrics = [], []
    for init in ("zero", "random"):
        st = cfg.settings(task.n_private, fc_lam)
        st["dp_sgd"]["init"] = init
        rows = _sweep_runs(sweep_df, "dp_sgd", epsilons) if init == "zero" else []
        todo = [e for e in epsilons if e not in {r["target_epsilon"] for r in rows}]
        if todo:
            rows += L.run_grid(task.train, task.test, task.num_classes, methods=["dp_sgd"], epsilons=todo,
                               seeds=seeds, settings=st, delta=delta, conversion=conversion, baseline=False,
                               device=device)
        for r in rows:
            r["init"] = init
            metrics.append(dict(metric="test_accuracy", value=r["accuracy"], method="dp_sgd",
                                epsilon=r["target_epsilon"], seed=r["seed"], feature_set="synthetic",
                                ablation="init", init=init, n=r["n"], n_epsilon=r["n"] * r["target_epsilon"],
                                claim_id="E-zero-init-helps", arm=f"{init}_init"))
        runs += rows
    return pd.DataFrame(runs), metrics


# --------------------------------------------------------------------------------- figures


def _log_ticks(ax, values: Sequence[float], fmt: str = "{:g}") -> None:
    """A log x axis whose ticks are exactly `values` (no minor ticks)."""
    import matplotlib.pyplot as plt

    ax.set_xscale("log")
    ax.set_xticks(list(values), [fmt.format(v) for v in values])
    ax.xaxis.set_minor_locator(plt.NullLocator())


def plot_accuracy_vs_epsilon(df, methods: Sequence[str], title: str, *, delta: float):
    """Test accuracy against epsilon (log): median line and min-max band over seeds per
    method; each method's non-private accuracy as its own marker in a "non-private" column right
    of the grid (full-width lines of five methods lie on top of each other); n*epsilon on the
    top axis."""
    import matplotlib.pyplot as plt

    sumdf, base, n = summary(df), non_private(df), int(df.n.iloc[0])
    fig, ax = plt.subplots(figsize=(7.5, 4.8), layout="constrained")
    grid = sorted(sumdf.target_epsilon.unique())
    x_np = grid[-1] * max((grid[-1] / grid[0]) ** 0.22, 3.0) if len(grid) > 1 else grid[-1] * 3  # non-private column
    shown = [m for m in methods if m in base.index]
    for i, m in enumerate(methods):
        d = sumdf[sumdf.method == m].sort_values("target_epsilon")
        if d.empty:
            continue
        color = f"C{i}"
        ax.plot(d.target_epsilon, d["median"], "o-", color=color, label=NICE.get(m, m))
        ax.fill_between(d.target_epsilon, d["min"], d["max"], color=color, alpha=0.2)
        if m in base.index:  # dodged sideways so equal accuracies stay apart
            k = shown.index(m) - (len(shown) - 1) / 2
            ax.plot([x_np * (x_np / grid[-1]) ** (0.12 * k)], [base[m]], "D", color=color, ms=6, mec="k", mew=0.5)
    if shown:
        ax.plot([], [], "D", color="0.6", mec="k", mew=0.5, label="non-private (same method, no noise)")
    ax.set_xscale("log")
    ticks = grid + ([x_np] if shown else [])
    ax.set_xticks(ticks, [f"{v:g}" for v in grid] + (["non-\nprivate"] if shown else []))
    ax.xaxis.set_minor_locator(plt.NullLocator())
    if shown:
        ax.axvline(grid[-1] * (x_np / grid[-1]) ** 0.35, color="0.7", lw=0.8)  # the grid ends here
    ax.set_xlabel("epsilon (delta = %g)" % delta)
    ax.set_ylabel("test accuracy")
    ax.set_title(title, pad=8)
    top = ax.secondary_xaxis("top", functions=(lambda e: e * n, lambda v: v / n))
    top.set_xticks([e * n for e in grid], [f"{e * n:,.0f}" for e in grid], fontsize=7)
    top.xaxis.set_minor_locator(plt.NullLocator())
    top.set_xlabel("n * epsilon")
    seeds = df[np.isfinite(df.target_epsilon)].seed.nunique()
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              title=f"line: median, band: min-max\nover {seeds} seed{'s' if seeds != 1 else ''}", title_fontsize=8)
    return fig


def plot_init_ablation(df, epsilons: Sequence[float]):
    """Median and min-max accuracy per epsilon for zero and random head initialisation."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for k, init in enumerate(("zero", "random")):
        d = df[df.init == init].groupby("target_epsilon").accuracy
        med, lo, hi = d.median(), d.min(), d.max()
        ax.errorbar(med.index * (1.0 + 0.06 * (k - 0.5)), med, yerr=[med - lo, hi - med], fmt="o-", capsize=3,
                    label=f"{init} init")
    _log_ticks(ax, epsilons)
    ax.set_xlabel("epsilon")
    ax.set_ylabel("test accuracy")
    seeds = df.seed.nunique() if "seed" in df else None
    ax.set_title("DP-SGD head: zero vs random initialisation\n"
                 + (f"median, whiskers min-max over {seeds} seed{'s' if seeds != 1 else ''}" if seeds else
                    "median, whiskers min-max over seeds"), fontsize=10)
    ax.legend()
    return fig




def real_features_sweep(task: FeatureTask, dataset: str, rec, *, methods: Sequence[str], epsilons: Sequence[float],
                        settings: dict[str, dict[str, Any]], delta: float, **run: Any):
    """Every solver on one real data set's features at each epsilon: the sweep's rows (with
    dataset, backbone and where the backbone came from) are recorded in `rec`; returns
    (the sweep DataFrame, its accuracy-vs-epsilon figure)."""
    df = sweep(task, methods=methods, epsilons=epsilons, settings=settings, delta=delta, **run)
    df["dataset"], df["backbone"], df["backbone_source"] = dataset, task.backbone, task.backbone_source
    record(rec, sweep_metrics(df, f"{dataset}:{task.backbone}:{task.backbone_source}", accounting=False))
    fig = plot_accuracy_vs_epsilon(
        df, methods, f"{dataset} features ({task.backbone}, {task.backbone_source}): n_private={task.n_private}",
        delta=delta)
    return df, fig
