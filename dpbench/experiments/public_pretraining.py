"""Arms, sweeps, claim rows and tables of notebook 03 (DP training after a little public data).

Bu et al. (2024): every arm is one update rule g_t = a_t g_public + (1 - a_t) g_private_DP
(`dpbench.training.mixing.fit_mixed`) under a schedule of a_t. An `Arms` holds the setting
all arms share and runs one arm; the functions below run the notebook's studies in order:

* `noise_scale`: sigma, sigma*sqrt(d)/B and n*eps of the setting;
* `run_schedules` / `schedule_table` / `record_schedule_claims` / `schedule_verdict`: the five
  schedules (figure 7), with the public checkpoint written at the sequential arm's switch;
* `run_reset_ablation` / `reset_table`: which optimizer state to reset at the switch (figure 8);
* `run_clip_vs_noise`: non-private / clipped only / noise only / DP arms (figure 1);
* `improvement_vs_batch` / `plot_improvement`: the one-step improvement against B (figure 5);
* `fraction_sweep`: accuracy against the public fraction;
* `check_checkpoint` / `record_ledger`: the public checkpoint's provenance and the run's ledger.

Rows are written through a recorder (anything with `add(metric, value, **columns)`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from dpbench.data import load_dataset
from dpbench.errors import UserError
from dpbench.models import create_model
from dpbench.privacy import accounting
from dpbench.training import diagnostics, mixing
from dpbench.training.loop import TrainResult

SCHEDULES = ("only_private", "only_public", "sequential", "sample_ratio", "cosine")
RESETS = ("m", "v", "t", "none")
MODES = ("non_private", "clip_only", "noise_only", "dp")
# figure 1: (start label, schedule) - from scratch is the only-private arm, the public checkpoint the sequential one
STARTS = (("from scratch", "only_private"), ("from public checkpoint", "sequential"))
DIAG_KEYS = ("gtg", "g_dot", "ghg", "tr_h", "tr_sigma", "tr_h_sigma")


@dataclass
class Arms:
    """The setting every arm of notebook 03 shares (data splits, model, optimizer, privacy).

    `splits` maps each public fraction to its `PublicPrivateData` (stratified with the
    notebook's seed); `public_fraction` is the main one. DP arms are calibrated to
    `target_epsilon` for their own number of private steps.
    """

    train: Any
    test: Any
    model_spec: dict[str, Any]
    splits: dict[float, mixing.PublicPrivateData]
    public_fraction: float
    steps: int
    switch_step: int
    private_batch_size: float = 128
    public_batch_size: int = 32
    lr: float = 0.01
    weight_decay: float = 0.01
    target_epsilon: float = 1.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    gamma: float = 0.01
    reset: str = "m"
    max_physical_batch: int | None = None
    eval_every: int | None = 10
    eval_batch_size: int = 512
    device: Any = "cpu"
    dataset: str = ""
    model_name: str = ""
    runs: dict[tuple, TrainResult] = field(default_factory=dict)  # every arm run so far, by key

    @property
    def data(self) -> mixing.PublicPrivateData:
        """The split at the main public fraction."""
        return self.splits[self.public_fraction]

    @property
    def num_params(self) -> int:
        """d, the number of model parameters."""
        return sum(p.numel() for p in create_model(**self.model_spec).parameters())

    def run(self, schedule: str, seed: int, *, fraction: float | None = None, mode: str = "dp",
            reset: str | None = None, on_switch: Callable | None = None, method: str = "") -> TrainResult:
        """One arm: a fresh model (created after `torch.manual_seed(seed)`) trained by
        `fit_mixed` on the split at `fraction` (default: the main one) under `schedule`."""
        fraction = self.public_fraction if fraction is None else fraction
        if fraction not in self.splits:
            raise UserError(f"public fraction {fraction:g} was not split; add it to public_fractions")
        part = self.splits[fraction]
        sched = mixing.make_schedule(schedule, self.steps, switch_step=self.switch_step,
                                     n_public=part.n_public, n_private=part.n_private)
        torch.manual_seed(seed)
        model = create_model(**self.model_spec)
        return mixing.fit_mixed(
            model, part, sched, test_data=self.test, private_batch_size=self.private_batch_size,
            public_batch_size=self.public_batch_size, optimizer="adamw", lr=self.lr,
            optimizer_kwargs={"weight_decay": self.weight_decay}, target_epsilon=self.target_epsilon,
            delta=self.delta, max_grad_norm=self.max_grad_norm, clip_fn="automatic", gamma=self.gamma, mode=mode,
            reset=self.reset if reset is None else reset, max_physical_batch=self.max_physical_batch,
            eval_every=self.eval_every, eval_batch_size=self.eval_batch_size, seed=seed, device=self.device,
            on_switch=on_switch, method=method or schedule, progress=False)

    def curves(self, keys: Sequence[tuple]):
        """The histories of the arms `keys` as one DataFrame (step, test_loss, test_acc, ..., seed);
        a key's last element is its seed."""
        import pandas as pd

        return pd.concat([self.runs[k].frame().assign(seed=k[-1]) for k in keys], ignore_index=True)


def prepare(*, dataset: str, data_root: str | None, model_name: str, model_kwargs: dict, public_fraction: float,
            public_fractions: Sequence[float], seed: int, **settings: Any) -> Arms:
    """Load the data, split it at every public fraction (stratified, seed `seed`) and return the
    `Arms` (`settings`: its other fields, e.g. steps, switch_step, lr)."""
    train = load_dataset(dataset, "train", data_root=data_root)
    test = load_dataset(dataset, "test", data_root=data_root)
    C, H, _ = train.input_shape
    spec = {"name": model_name, "num_classes": train.num_classes, "in_chans": C, "img_size": H, **model_kwargs}
    fractions = sorted(set(public_fractions) | {public_fraction})
    splits = {f: mixing.split_dataset(train, public_fraction=f, seed=seed) for f in fractions}
    return Arms(train=train, test=test, model_spec=spec, splits=splits, public_fraction=public_fraction,
                dataset=dataset, model_name=model_name, **settings)


def noise_scale(arms: Arms, rec: Any, seed: int) -> list[dict[str, Any]]:
    """sigma, sigma*sqrt(d)/B (the noise norm relative to a clipped gradient) and n*eps of the
    only-private and sequential arms; rows `noise_scale` and `n_times_epsilon`."""
    rows, d, data, B = [], arms.num_params, arms.data, arms.private_batch_size
    for name in ("only_private", "sequential"):
        sched = mixing.make_schedule(name, arms.steps, switch_step=arms.switch_step)
        q = B / data.n_private
        sigma = accounting.noise_multiplier(arms.target_epsilon, q, sched.private_steps, delta=arms.delta)
        rows.append({"schedule": name, "private_steps": sched.private_steps, "q": q, "sigma": sigma,
                     "sigma*sqrt(d)/B": sigma * math.sqrt(d) / B, "n*epsilon": data.n_private * arms.target_epsilon})
        rec.add("noise_scale", sigma * math.sqrt(d) / B, method=name, epsilon=arms.target_epsilon, seed=seed,
                sigma=sigma, sample_rate=q, private_steps=sched.private_steps, d=d, study="setting")
        rec.add("n_times_epsilon", data.n_private * arms.target_epsilon, method=name, epsilon=arms.target_epsilon,
                seed=seed, study="setting")
    return rows


class PublicCheckpointSaver:
    """`on_switch` callback: keeps a CPU copy of the public-phase model (`.model`) and writes it,
    with the public examples in its metadata, as the public checkpoint at `path`."""

    def __init__(self, arms: Arms, path: str | Path, extra: dict[str, Any]):
        self.arms, self.path, self.extra = arms, Path(path), extra
        self.model: torch.nn.Module | None = None

    def __call__(self, model: torch.nn.Module, optimizer: Any) -> None:
        self.model = copy.deepcopy(model).cpu()
        mixing.save_public_checkpoint(model, self.path, self.arms.data, model_spec=self.arms.model_spec,
                                      extra=self.extra)


def run_schedules(arms: Arms, seeds: Sequence[int], rec: Any, checkpoint: str | Path) -> PublicCheckpointSaver:
    """Figure 7: every schedule at every seed (`arms.runs[(schedule, seed)]`, histories recorded
    with study "schedules"). The sequential arm of the first seed writes the public checkpoint
    at its switch; returns that saver (its `.model` is the public-phase model)."""
    saver = PublicCheckpointSaver(arms, checkpoint, {"public_steps": arms.switch_step, "lr": arms.lr,
                                                     "optimizer": "adamw",
                                                     "public_batch_size": arms.public_batch_size, "seed": seeds[0]})
    for name, s in tqdm([(n, s) for n in SCHEDULES for s in seeds], desc="schedules", unit="run"):  # bar kept in the log
        r = arms.run(name, s, on_switch=saver if (name == "sequential" and s == seeds[0]) else None)
        arms.runs[(name, s)] = r
        r.record(rec, method=name, seed=s, study="schedules")
    return saver


def schedule_table(arms: Arms, seeds: Sequence[int]):
    """Final test accuracy (mean, sd), loss, epsilon, sigma and private steps per schedule."""
    import pandas as pd

    final = pd.DataFrame([{"schedule": n, "seed": s, "test_acc": arms.runs[(n, s)].final["test_acc"],
                           "test_loss": arms.runs[(n, s)].final["test_loss"], "epsilon": arms.runs[(n, s)].epsilon,
                           "sigma": arms.runs[(n, s)].noise_multiplier,
                           "private_steps": arms.runs[(n, s)].private_steps}
                          for n in SCHEDULES for s in seeds])
    return final.groupby("schedule", sort=False).agg(
        acc_mean=("test_acc", "mean"), acc_sd=("test_acc", "std"), loss_mean=("test_loss", "mean"),
        epsilon=("epsilon", "max"), sigma=("sigma", "first"), private_steps=("private_steps", "first"))


def record_schedule_claims(arms: Arms, table, seeds: Sequence[int], rec: Any) -> str:
    """`final_test_acc_mean` per schedule, and the claim rows: the sequential arm's accuracy as
    a small-scale analogue of the paper's headline (A-imagenet11k-eps8, never judged against
    it) and per-seed paired differences for the two ordering claims of Table 2 / Fig. 7
    (A-public-beats-scratch, A-sequential-beats-mixing). Returns the setting text."""
    eps = arms.target_epsilon
    for name, row in table.iterrows():
        rec.add("final_test_acc_mean", row.acc_mean, method=name, epsilon=row.epsilon, seed=None, study="schedules",
                sd=row.acc_sd, n_seeds=len(seeds))
    setting = (f"{arms.dataset}, {arms.model_name}, {arms.public_fraction:.0%} public, eps={eps:g}, {arms.steps} steps "
               f"(switch at {arms.switch_step}), {len(seeds)} seeds")
    seq = table.loc["sequential"]
    rec.add("final_test_acc_percent", 100 * seq.acc_mean, method="sequential", epsilon=eps, study="schedules",
            sd=100 * seq.acc_sd, n_seeds=len(seeds), comparison="analogue", setting=setting,
            claim_id="A-imagenet11k-eps8")
    for s in seeds:
        fin = {n: arms.runs[(n, s)].final["test_acc"] for n in SCHEDULES}
        rec.add("sequential_minus_only_private", fin["sequential"] - fin["only_private"], method="sequential",
                epsilon=eps, seed=s, study="schedules", comparison="difference", setting=setting,
                claim_id="A-public-beats-scratch")
        rec.add("sequential_minus_sample_ratio", fin["sequential"] - fin["sample_ratio"], method="sequential",
                epsilon=eps, seed=s, study="schedules", comparison="difference", setting=setting,
                claim_id="A-sequential-beats-mixing")
    return setting


def schedule_verdict(table, n_seeds: int) -> str:
    """One sentence: did the sequential arm beat only-private, sample-ratio and cosine (means)?"""
    acc = table["acc_mean"]
    parts = []
    for other, what in (("only_private", "only-private"), ("sample_ratio", "sample-ratio mixing"),
                        ("cosine", "cosine")):
        gain = acc["sequential"] - acc[other]
        parts.append(f"{'beat' if gain > 0 else 'did NOT beat'} {what} by {gain:+.3f}")
    return (f"sequential {parts[0]} accuracy; {parts[1]}; {parts[2]} "
            f"(mean over {n_seeds} seeds; sd in the table above)")


def run_reset_ablation(arms: Arms, seeds: Sequence[int], rec: Any) -> None:
    """Figure 8: the sequential arm resetting m, v, t or nothing at the switch
    (`arms.runs[("reset", r, seed)]`; the main reset reuses the schedule run)."""
    for r_, s in tqdm([(r_, s) for r_ in RESETS for s in seeds], desc="reset ablation", unit="run"):
        if r_ == arms.reset and ("sequential", s) in arms.runs:
            arms.runs[("reset", r_, s)] = arms.runs[("sequential", s)]
        else:
            arms.runs[("reset", r_, s)] = arms.run("sequential", s, reset=r_, method=f"reset_{r_}")
        arms.runs[("reset", r_, s)].record(rec, method=f"reset_{r_}", seed=s, study="reset", reset=r_)


def reset_table(arms: Arms, seeds: Sequence[int], rec: Any):
    """Final accuracy per reset (mean, sd) with `final_test_acc_mean` rows, and per-seed
    `final_test_acc` rows of the ordering claim A-reset-m-best."""
    import pandas as pd

    df = pd.DataFrame([{"reset": r_, "seed": s, "test_acc": arms.runs[("reset", r_, s)].final["test_acc"],
                        "test_loss": arms.runs[("reset", r_, s)].final["test_loss"]} for r_ in RESETS for s in seeds])
    table = df.groupby("reset", sort=False).agg(acc_mean=("test_acc", "mean"), acc_sd=("test_acc", "std"),
                                                loss_mean=("test_loss", "mean"))
    for r_, row in table.iterrows():
        rec.add("final_test_acc_mean", row.acc_mean, method=f"reset_{r_}", epsilon=arms.target_epsilon,
                study="reset", sd=row.acc_sd, n_seeds=len(seeds))
        for s in seeds:
            rec.add("final_test_acc", arms.runs[("reset", r_, s)].final["test_acc"], method=f"reset_{r_}", seed=s,
                    epsilon=arms.target_epsilon, study="reset",
                    setting=f"{arms.dataset}, {arms.model_name}, switch at {arms.switch_step}", claim_id="A-reset-m-best")
    return table


def run_clip_vs_noise(arms: Arms, seeds: Sequence[int], rec: Any) -> list[tuple[str, str, Any]]:
    """Figure 1: the private gradient four ways (MODES), from scratch (only-private) and from
    the public checkpoint (sequential); the DP arm reuses the schedule run. Records every
    history and a `final_test_loss_mean` per arm; returns (start, mode, curves) per arm, the
    sequential curves from the switch on."""
    out = []
    bar = tqdm(total=len(STARTS) * len(MODES) * len(seeds), desc="clipping vs noise", unit="run")
    for start, sched in STARTS:
        for mode in MODES:
            keys = []
            for s in seeds:
                key = ("fig1", sched, mode, s)
                arms.runs[key] = (arms.runs[(sched, s)] if mode == "dp"
                                  else arms.run(sched, s, mode=mode, method=f"{mode}_{sched}"))
                arms.runs[key].record(rec, method=f"{mode}:{sched}", seed=s, study="fig1", mode=mode, start=start)
                keys.append(key)
                bar.update()
            df = arms.curves(keys)
            if sched == "sequential":
                df = df[df.step >= arms.switch_step]
            out.append((start, mode, df))
            rec.add("final_test_loss_mean", float(np.mean([arms.runs[k].final["test_loss"] for k in keys])),
                    method=f"{mode}:{sched}", epsilon=arms.runs[keys[0]].epsilon, study="fig1", mode=mode,
                    start=start)
    bar.close()
    return out


@dataclass
class Improvement:
    """Figure 5 at one checkpoint: curvature statistics (clipped and raw gradients), the
    denominator terms and the per-sample improvement (DP and non-DP) on the batch grid."""

    label: str
    clipped: diagnostics.CurvatureStats
    raw: diagnostics.CurvatureStats
    terms: dict[str, np.ndarray]
    dp: np.ndarray
    nondp: np.ndarray


@dataclass
class Figure5:
    """The batch grid, sigma(B) on it, the main run's private epochs, the examples used and one
    `Improvement` per checkpoint."""

    grid: np.ndarray
    sigma: np.ndarray
    epochs: float
    n_examples: int
    improvements: list[Improvement]


IMPROVEMENT_LABELS = (("dp", "DP (clipped + noise)"), ("nondp", "non-DP"))
TERM_LABELS = (("signal", "Ĝ'HĜ"), ("sampling", "tr(HΣ)/B"), ("noise", "σ(B)² C² tr(H)/B²"))


def improvement_vs_batch(arms: Arms, public_model: torch.nn.Module, rec: Any, *, batch_grid: Sequence[int],
                         diag_examples: int, diag_probes: int, diag_var_samples: int, diag_accountant: str,
                         seed: int) -> Figure5:
    """Figure 5 at the initialisation (a fresh model after `torch.manual_seed(seed)`) and at
    `public_model`: the three terms of the predicted one-step improvement and the per-sample
    improvement against B, with sigma(B) reaching the target epsilon in as many epochs as the
    only-private run with `seed` at each B (accountant `diag_accountant`), estimated on the
    first `diag_examples` private examples. Records term_*, optimal_batch_size (failed where
    the curvature is not positive), per_sample_improvement and diag_* rows."""
    data, C, eps = arms.data, arms.max_grad_norm, arms.target_epsilon
    dx, dy = data.private.tensors(torch.arange(min(diag_examples, data.n_private)))
    dx, dy = dx.to(arms.device), dy.to(arms.device)
    torch.manual_seed(seed)
    checkpoints = {"initialisation": create_model(**arms.model_spec), "public checkpoint": public_model}
    epochs = arms.runs[("only_private", seed)].private_steps * arms.private_batch_size / data.n_private
    grid = np.asarray(batch_grid, dtype=float)
    grid = grid[grid <= data.n_private]
    sig = np.array([accounting.noise_multiplier(eps, b / data.n_private, max(1, round(epochs * data.n_private / b)),
                                                delta=arms.delta, accountant=diag_accountant) for b in grid])
    out = Figure5(grid, sig, epochs, len(dx), [])
    for label, m in tqdm(checkpoints.items(), desc="curvature diagnostics", unit="checkpoint"):
        m = m.to(arms.device)
        st = diagnostics.curvature_stats(m, dx, dy, clip_fn="automatic", max_grad_norm=C, gamma=arms.gamma,
                                         n_probes=diag_probes, n_var_samples=diag_var_samples, seed=seed)
        raw = diagnostics.curvature_stats(m, dx, dy, clip_fn=None, n_probes=diag_probes,
                                          n_var_samples=diag_var_samples, seed=seed)
        imp = Improvement(label, st, raw, diagnostics.denominator_terms(st.ghg, st.tr_h_sigma, st.tr_h, grid, sig, C),
                          diagnostics.per_sample_improvement(st.g_dot, st.ghg, st.tr_h_sigma, st.tr_h, grid, sig, C),
                          diagnostics.per_sample_improvement(raw.g_dot, raw.ghg, raw.tr_h_sigma, raw.tr_h, grid))
        out.improvements.append(imp)
        for k, _ in TERM_LABELS:
            for b, v in zip(grid, imp.terms[k]):
                rec.add(f"term_{k}", float(v), method=label, epsilon=eps, study="fig5", batch_size=float(b))
        for attr, lab in IMPROVEMENT_LABELS:
            vals = getattr(imp, attr)
            b_opt, _ = diagnostics.best_on_grid(vals, grid)
            ok = not math.isnan(b_opt)
            rec.add("optimal_batch_size", b_opt, method=f"{label}:{lab}", epsilon=eps, study="fig5",
                    status="ok" if ok else "failed",
                    reason="" if ok else "non-positive curvature: no optimal learning rate")
            for b, v in zip(grid, vals):
                if not math.isnan(v):
                    rec.add("per_sample_improvement", float(v), method=f"{label}:{lab}", epsilon=eps,
                            study="fig5", batch_size=float(b))
        for k in DIAG_KEYS:
            rec.add(f"diag_{k}", getattr(st, k), method=label, study="fig5", gradients="clipped")
            rec.add(f"diag_{k}", getattr(raw, k), method=label, study="fig5", gradients="raw")
    return out


def improvement_table(improvements: Sequence[Improvement]):
    """The curvature statistics of every checkpoint, clipped and raw, as a DataFrame."""
    import pandas as pd

    rows = []
    for imp in improvements:
        rows += [{"checkpoint": imp.label, "gradients": "clipped (DP)", **imp.clipped.to_dict()},
                 {"checkpoint": imp.label, "gradients": "raw (non-DP)", **imp.raw.to_dict()}]
    cols = ["checkpoint", "gradients", "loss", "gtg", "g_dot", "ghg", "tr_h", "tr_h_se", "tr_sigma", "tr_h_sigma"]
    return pd.DataFrame(rows)[cols]


def plot_improvement(axes, fig5: Figure5) -> None:
    """Per checkpoint (a row of `axes`): |terms| against B, and the per-sample improvement
    (DP and non-DP) with its optimum on the grid starred."""
    grid = fig5.grid
    for i, imp in enumerate(fig5.improvements):
        ax = axes[i, 0]
        for k, lab in TERM_LABELS:
            ax.plot(grid, np.abs(imp.terms[k]), marker="o", label=lab)
        ax.set_xscale("log"); ax.set_yscale("log"); ax.set_xlabel("batch size B"); ax.set_ylabel("|term|")
        ax.set_title(f"{imp.label}: denominator terms (DP)"); ax.legend(fontsize=8)
        ax = axes[i, 1]
        for attr, lab in IMPROVEMENT_LABELS:
            vals = getattr(imp, attr)
            line, = ax.plot(grid, vals, marker="o", label=lab)
            b_opt, v_opt = diagnostics.best_on_grid(vals, grid)
            if not math.isnan(b_opt):
                ax.plot([b_opt], [v_opt], marker="*", ms=14, color=line.get_color())
        ax.set_xscale("log"); ax.set_yscale("log"); ax.set_xlabel("batch size B")
        ax.set_ylabel("predicted improvement / B")
        ax.set_title(f"{imp.label}: per-sample improvement (★ = optimum on grid)")
        ax.legend(fontsize=8)


def fraction_sweep(arms: Arms, fractions: Sequence[float], seeds: Sequence[int], rec: Any):
    """Final accuracy of the sequential arm against the public fraction (mean, std per
    fraction; the main fraction reuses the schedule runs). Records new histories and one
    `final_test_acc_mean` row per fraction."""
    import pandas as pd

    rows = []
    for f, s in tqdm([(f, s) for f in fractions for s in seeds], desc="public fractions", unit="run"):
        key = ("sequential", s) if f == arms.public_fraction else ("fraction", f, s)
        if key not in arms.runs:
            arms.runs[key] = arms.run("sequential", s, fraction=f, method=f"sequential_{f:g}")
            arms.runs[key].record(rec, method="sequential", seed=s, study="public_fraction", public_fraction=f)
        rows.append({"public_fraction": f, "seed": s, "test_acc": arms.runs[key].final["test_acc"]})
    ft = pd.DataFrame(rows).groupby("public_fraction").test_acc.agg(["mean", "std"])
    for f, row in ft.iterrows():
        rec.add("final_test_acc_mean", row["mean"], method="sequential", epsilon=arms.target_epsilon,
                study="public_fraction", public_fraction=f, sd=row["std"], n_seeds=len(seeds))
    return ft


def check_checkpoint(path: str | Path, private: Any, whole: Any) -> tuple[mixing.PublicCheckpointInfo, str]:
    """Read the public checkpoint's provenance, check that `private` passes the overlap check
    and that `whole` (which contains the public examples) is refused. Returns (info, the
    refusal message); AssertionError if the overlap goes undetected."""
    info = mixing.read_public_metadata(path)
    mixing.check_no_overlap(info, private)
    try:
        mixing.check_no_overlap(info, whole)
    except UserError as e:
        return info, str(e)
    raise AssertionError("overlap not detected")


def record_ledger(arms: Arms, seed: int, rec: Any, path: str | Path):
    """Save the privacy ledger of the sequential run with `seed` (private steps only) to `path`
    and record its `epsilon_spent`. Returns the ledger."""
    ledger = arms.runs[("sequential", seed)].ledger
    ledger.save(path)
    rec.add("epsilon_spent", ledger.epsilon(), method="sequential", epsilon=ledger.epsilon(), seed=seed,
            private_steps=ledger.steps, public_steps=arms.switch_step, study="ledger")
    return ledger


def reset_differences(arms: Arms, seeds: Sequence[int], reference: str = "m"):
    """Figure 8 as differences: each reset's test loss and accuracy minus the `reference` reset's,
    paired by seed at every evaluation step (columns reset, step, d_loss, d_loss_sd, d_acc, d_acc_sd;
    sd over seeds, NaN with one seed). Arms that coincide show as exact zeros instead of hiding
    under each other."""
    import pandas as pd

    ref = arms.curves([("reset", reference, s) for s in seeds])[["step", "seed", "test_loss", "test_acc"]]
    parts = []
    for r_ in RESETS:
        if r_ == reference:
            continue
        cur = arms.curves([("reset", r_, s) for s in seeds])[["step", "seed", "test_loss", "test_acc"]]
        m = cur.merge(ref, on=["step", "seed"], suffixes=("", "_ref"))
        m = m.assign(d_loss=m.test_loss - m.test_loss_ref, d_acc=m.test_acc - m.test_acc_ref)
        g = m.groupby("step").agg(d_loss=("d_loss", "mean"), d_loss_sd=("d_loss", "std"),
                                  d_acc=("d_acc", "mean"), d_acc_sd=("d_acc", "std")).reset_index()
        parts.append(g.assign(reset=r_))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["reset", "step", "d_loss", "d_loss_sd", "d_acc", "d_acc_sd"])


def plot_reset_differences(diff, *, switch_step: int, reference: str, n_seeds: int):
    """Two panels (test loss, test accuracy): each reset minus the reference reset against the
    step, with a ± 1 sd band over the paired seeds when there are several; an arm identical to
    the reference at every evaluation says so in the legend."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")
    for (r_, g), ls in zip(diff.groupby("reset", sort=False), ["-", "--", "-.", ":"]):
        same = bool((g[["d_loss", "d_acc"]].abs().max() == 0).all())
        for ax, col in zip(axes, ["d_loss", "d_acc"]):
            line, = ax.plot(g["step"], g[col], ls=ls, marker=".",
                            label=f"reset {r_}" + (" (identical to the reference)" if same else ""))
            if n_seeds > 1:
                sd = g[f"{col}_sd"].fillna(0.0)
                ax.fill_between(g["step"], g[col] - sd, g[col] + sd, color=line.get_color(), alpha=0.15)
    for ax, lab in zip(axes, ["test loss", "test accuracy"]):
        ax.axhline(0, color="k", lw=0.8)
        ax.axvline(switch_step, color="k", ls=":", lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{lab} minus reset {reference}'s")
    axes[1].legend()
    spread = f"band: ± 1 sd over {n_seeds} paired seeds" if n_seeds > 1 else "one seed, no spread"
    fig.suptitle(f"Which state to reset at the switch (step {switch_step}): difference to resetting {reference} "
                 f"(the paper's choice; {spread})")
    return fig
