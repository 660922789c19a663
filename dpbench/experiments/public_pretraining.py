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

import functools
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from dpbench.data import load_dataset
from dpbench.errors import UserError
from dpbench.experiments import study_design
from dpbench.experiments.plots import mean_sd_band
from dpbench.models import SUBSETS, create_model, head_parameter_names, set_trainable, trainable_subset, zero_init_head
from dpbench.privacy import accounting
from dpbench.training import diagnostics, mixing
from dpbench.training.loop import BatchSpec, EvalSpec, OptimSpec, TrainResult, fit

SCHEDULES = ("only_private", "only_public", "sequential", "sample_ratio", "cosine")
RESETS = ("m", "v", "t", "none")
MODES = ("non_private", "clip_only", "noise_only", "dp")
DIAG_KEYS = ("gtg", "g_dot", "ghg", "tr_h", "tr_sigma", "tr_h_sigma")


def second_order(fn: Callable) -> Callable:
    """Run `fn` with scaled-dot-product attention on its math kernel: the fused (flash /
    memory-efficient) kernels that timm's ViTs call have no double backward, which
    Hessian-vector products (tr(H), G'HG) need, on the CPU and on CUDA alike."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with sdpa_kernel(SDPBackend.MATH):
            return fn(*args, **kwargs)

    return wrapped


@functools.lru_cache(maxsize=256)
def calibrated_sigma(epsilon: float, sample_rate: float, steps: int, delta: float) -> float:
    """The RDP noise multiplier reaching `epsilon` in `steps` Poisson-sampled steps at
    `sample_rate` (cached: one calibration serves every seed and learning rate)."""
    return accounting.noise_multiplier(float(epsilon), float(sample_rate), int(steps), delta=float(delta))


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
        # sigma for this epsilon, q and private step count, calibrated once per study (not per run)
        privacy = {"target_epsilon": self.target_epsilon}
        if mode in ("dp", "noise_only") and sched.private_steps:
            privacy = {"noise_multiplier": calibrated_sigma(self.target_epsilon, self.private_batch_size / part.n_private,
                                                            sched.private_steps, self.delta)}
        return mixing.fit_mixed(
            model, part, sched, test_data=self.test, private_batch_size=self.private_batch_size,
            public_batch_size=self.public_batch_size, optimizer="adamw", lr=self.lr,
            optimizer_kwargs={"weight_decay": self.weight_decay}, **privacy,
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
        # A fresh CPU model with the public-phase weights: a deep copy of `model` would carry the
        # clipping engine's hooks (and, before they checked their module, fed the engine activations).
        self.model = create_model(**self.arms.model_spec)
        self.model.load_state_dict(model.state_dict())
        mixing.save_public_checkpoint(model, self.path, self.arms.data, model_spec=self.arms.model_spec,
                                      extra=self.extra)


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


@second_order
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
    (DP and non-DP) with its optimum on the grid starred. The batch axis is labelled at the
    grid's sizes only (log-scale minor labels collide on a grid of less than a decade)."""
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

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
        for ax in axes[i]:
            ax.xaxis.set_major_locator(FixedLocator(list(grid)))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(ScalarFormatter())


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


# ---------------------------------------------------------------------------- a decidable study (issue 16)
# Claims judged at eps 8 (the paper's) with eps 1 beside; every schedule tuned on the same
# learning-rate grid on a validation split carved from the training data; the test set read
# once per run; comparisons fixed in the params; seed counts sized on the tuning seeds.
# The paper's sigma sqrt(d) / B, ViT-Base (d = 86M) on ImageNet-11k (10.5M images) at eps 8,
# with B = 4096 (?) and delta = 1e-8 (?): about 1.0-1.2 for 1-30 epochs (RDP); 1.1 is shown.
PAPER_NOISE_TO_SIGNAL = 1.1
CLAIM_SCRATCH, CLAIM_MIXING, CLAIM_PUBLIC = "A-public-beats-scratch", "A-sequential-beats-mixing", "A-sequential-beats-public"
CLAIM_CURVATURE, CLAIM_RESET = "A-curvature-falls", "A-reset-m-best"
NONPRIVATE_SCHEDULES = ("only_public",)  # no private step: one run per seed serves every epsilon


def prepare_split(*, dataset: str, data_root: str | None, model_name: str, model_kwargs: dict,
                  public_fraction: float, public_fractions: Sequence[float], validation_fraction: float, seed: int,
                  **settings: Any) -> tuple[Arms, Any]:
    """`prepare` on the fit part of the training data: a stratified `validation_fraction`
    is carved off first (seed `seed`), then the fit part is split public/private. The
    returned `Arms` evaluates on the validation part (its `test`); the real test set is
    returned beside it, to be read once per run through `study_design.HeldOutTest`."""
    train = load_dataset(dataset, "train", data_root=data_root)
    test = load_dataset(dataset, "test", data_root=data_root)
    fit_part, val = study_design.carve_validation(train, validation_fraction, seed)
    C, H, _ = train.input_shape
    spec = {"name": model_name, "num_classes": train.num_classes, "in_chans": C, "img_size": H, **model_kwargs}
    fractions = sorted(set(public_fractions) | {public_fraction})
    splits = {f: mixing.split_dataset(fit_part, public_fraction=f, seed=seed) for f in fractions}
    arms = Arms(train=fit_part, test=val, model_spec=spec, splits=splits, public_fraction=public_fraction,
                dataset=dataset, model_name=model_name, **settings)
    return arms, test


def regime_rows(arms: Arms, epsilons: Sequence[float], rec: Any, seed: int) -> list[dict[str, Any]]:
    """`noise_scale` at each epsilon, with the paper's sigma sqrt(d) / B beside ours."""
    rows = []
    for eps in epsilons:
        for r in noise_scale(replace(arms, target_epsilon=eps), rec, seed):
            rows.append({"epsilon": eps, **r, "paper sigma*sqrt(d)/B": PAPER_NOISE_TO_SIGNAL})
    return rows


def run_at(arms: Arms, schedule: str, seed: int, *, lr: float, epsilon: float, **kw: Any) -> TrainResult:
    """`Arms.run` at learning rate `lr` and target `epsilon`."""
    return replace(arms, lr=lr, target_epsilon=epsilon).run(schedule, seed, **kw)


def tune_schedules(arms: Arms, schedules: Sequence[str], epsilons: Sequence[float], lr_grid: Sequence[float],
                   seeds: Sequence[int], rec: Any) -> dict[float, study_design.Tuning]:
    """Per epsilon, the same learning-rate grid and tuning seeds for every schedule, scored
    by validation accuracy (an equal budget). A schedule without private steps is trained
    once per (lr, seed) and its score reused at every epsilon."""
    cache: dict[tuple, float] = {}

    def score_at(eps):
        def score(schedule, lr, s):
            key = (schedule, lr, s) if schedule in NONPRIVATE_SCHEDULES else (schedule, lr, s, eps)
            if key not in cache:
                cache[key] = run_at(arms, schedule, s, lr=lr, epsilon=eps).final["test_acc"]  # validation part
            return cache[key]
        return score

    return {eps: study_design.tune(schedules, lr_grid, score_at(eps), seeds, rec=rec, metric="validation_acc",
                                   epsilon=eps, study="tuning") for eps in epsilons}


def pilot_sizing(tunings: dict[float, study_design.Tuning], comparisons: dict[str, tuple[str, str]], epsilon: float,
                 targets: dict[str, float], *, min_seeds: int = 6, max_seeds: int = 40) -> list[dict[str, Any]]:
    """Per pre-registered comparison at `epsilon`: the tuning seeds' paired validation
    differences at the chosen rates and the seeds that bring the 95% half-width under the
    claim's target (`study_design.pilot_sizing` of that epsilon's tuning)."""
    return study_design.pilot_sizing(tunings[epsilon], comparisons, targets, min_seeds=min_seeds, max_seeds=max_seeds)


def run_verdict(arms: Arms, schedules: Sequence[str], lrs: dict[float, dict[str, float]], seeds: Sequence[int],
                test: study_design.HeldOutTest, rec: Any, *, fraction: float | None = None,
                on_switch: Callable | None = None) -> list[dict[str, Any]]:
    """Every schedule at every epsilon of `lrs` ({eps: {schedule: lr}}) and seed, on the split
    at `fraction` (default: the main one); each final model evaluated once on the test set.
    Runs go to `arms.runs[("verdict", fraction, eps, schedule, seed)]` (a schedule without
    private steps is run once per seed and listed at every epsilon); histories (validation)
    and final test rows go to `rec`. `on_switch` is called by the sequential arm of the first
    seed at the first epsilon (the public checkpoint). Returns one dict per (eps, schedule, seed)."""
    fraction = arms.public_fraction if fraction is None else fraction
    out, shared = [], {}
    for i, eps in enumerate(lrs):
        for name in schedules:
            for s in seeds:
                cb = on_switch if (name == "sequential" and s == seeds[0] and i == 0) else None
                if name in NONPRIVATE_SCHEDULES and (name, s) in shared:
                    r, (loss, acc) = shared[(name, s)]
                else:
                    r = run_at(arms, name, s, lr=lrs[eps][name], epsilon=eps, fraction=fraction, on_switch=cb)
                    loss, acc = test.evaluate(r.model, (fraction, name, s) if name in NONPRIVATE_SCHEDULES
                                              else (fraction, eps, name, s))
                    r.record(rec, method=name, seed=s, study="verdict", public_fraction=fraction,
                             epsilon_target=eps, split="validation")
                    if name in NONPRIVATE_SCHEDULES:
                        shared[(name, s)] = (r, (loss, acc))
                arms.runs[("verdict", fraction, eps, name, s)] = r
                out.append({"epsilon": eps, "schedule": name, "seed": s, "public_fraction": fraction,
                            "lr": lrs[eps][name], "test_acc": acc, "test_loss": loss, "epsilon_spent": r.epsilon,
                            "private_steps": r.private_steps, "sigma": r.noise_multiplier})
                rec.add("final_test_acc", acc, method=name, seed=s, epsilon=eps, public_fraction=fraction,
                        study="verdict", lr=lrs[eps][name])
                rec.add("final_test_loss", loss, method=name, seed=s, epsilon=eps, public_fraction=fraction,
                        study="verdict", lr=lrs[eps][name])
    return out


def record_comparisons(rec: Any, final: Sequence[dict[str, Any]], comparisons: dict[str, tuple[str, str]],
                       epsilon: float, fraction: float, setting: str, *, tag: bool = True) -> list[dict[str, Any]]:
    """Per pre-registered comparison and seed, the test-accuracy difference X - Y at
    (`epsilon`, `fraction`) as a `test_acc_difference` row, tagged with its claim when `tag`
    (the claims' own setting), untagged otherwise (shown beside). When tagged, the sequential
    arm's mean test accuracy is also recorded as the small-scale analogue of the paper's headline
    (A-imagenet11k-eps8: shown, never judged). Returns per claim: the mean, 95% half-width and seeds."""
    by = {(r["schedule"], r["seed"]): r["test_acc"] for r in final
          if r["epsilon"] == epsilon and r["public_fraction"] == fraction}
    seeds = sorted({s for _, s in by})
    out = []
    seq = [by[("sequential", s)] for s in seeds if ("sequential", s) in by]
    if tag and seq:
        rec.add("final_test_acc_percent", 100 * float(np.mean(seq)), method="sequential", epsilon=epsilon,
                study="verdict", sd=100 * float(np.std(seq, ddof=1)) if len(seq) > 1 else 0.0, n_seeds=len(seq),
                comparison="analogue", claim_id="A-imagenet11k-eps8", setting=setting, public_fraction=fraction)
    for claim, (x, y) in comparisons.items():
        d = {s: by[(x, s)] - by[(y, s)] for s in seeds if (x, s) in by and (y, s) in by}
        for s, v in d.items():
            cols = dict(claim_id=claim, setting=setting) if tag else {}
            rec.add("test_acc_difference", v, method=f"{x} - {y}", epsilon=epsilon, seed=s, comparison="difference",
                    public_fraction=fraction, study="verdict", **cols)
        out.append({"claim": claim, "epsilon": epsilon, "public_fraction": fraction, "pair": f"{x} - {y}",
                    "mean": float(np.mean(list(d.values()))), "halfwidth": study_design.halfwidth(list(d.values())),
                    "seeds": len(d)})
    return out


@second_order
def trace_h(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, n_probes: int, seed: int) -> float:
    """Hutchinson estimate of tr(H) of the mean loss on (x, y) (eval mode)."""
    was = model.training
    model.eval()
    try:
        op = diagnostics.HessianOperator(model, x, y)
        dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return float(diagnostics.hutchinson_trace(op.hvp, dim, n_probes=n_probes, seed=seed)[0])
    finally:
        model.train(was)


@second_order
def curvature_claim(arms: Arms, seeds: Sequence[int], epsilon: float, lr: float, rec: Any, *, n_examples: int,
                    n_probes: int) -> list[dict[str, Any]]:
    """A-curvature-falls: per seed, tr(H) on the first `n_examples` private examples at the
    random-head initialisation of the only_private run ("early") and at its final model
    ("late"; from `arms.runs`), rows `trace_hessian` tagged with the claim."""
    x, y = arms.data.private.tensors(torch.arange(min(n_examples, arms.data.n_private)))
    out = []
    for s in seeds:
        torch.manual_seed(s)
        init = create_model(**arms.model_spec)
        final = arms.runs[("verdict", arms.public_fraction, epsilon, "only_private", s)].model
        for label, m in (("early", init), ("late", final)):
            tr = trace_h(m.to(arms.device), x.to(arms.device), y.to(arms.device), n_probes=n_probes, seed=s)
            out.append({"seed": s, "when": label, "tr_h": tr})
            rec.add("trace_hessian", tr, method=label, seed=s, epsilon=epsilon, study="curvature",
                    claim_id=CLAIM_CURVATURE, lr=lr,
                    setting=f"Hutchinson tr(H), {n_probes} probes on {len(y)} private examples: random-head "
                            f"initialisation (early) vs the end of only_private at eps={epsilon:g} (late)")
    return out


@second_order
def curvature_trajectory(arms: Arms, seed: int, epsilon: float, lr: float, checkpoints: Sequence[int], rec: Any, *,
                         n_examples: int, n_probes: int) -> list[dict[str, Any]]:
    """tr(H) along the only_private trajectory of `seed`: the run repeated for each step count
    in `checkpoints` with the full run's sigma (the same seed and plan replay the same first
    steps), tr(H) of each prefix's model. Rows `trace_hessian_trajectory` (never judged)."""
    x, y = arms.data.private.tensors(torch.arange(min(n_examples, arms.data.n_private)))
    sigma = arms.runs[("verdict", arms.public_fraction, epsilon, "only_private", seed)].noise_multiplier
    part, out = arms.data, []
    for k in checkpoints:
        torch.manual_seed(seed)
        model = create_model(**arms.model_spec)
        if k > 0:
            sched = mixing.make_schedule("only_private", k, switch_step=0, n_public=part.n_public,
                                         n_private=part.n_private)
            model = mixing.fit_mixed(
                model, part, sched, private_batch_size=arms.private_batch_size, public_batch_size=arms.public_batch_size,
                optimizer="adamw", lr=lr, optimizer_kwargs={"weight_decay": arms.weight_decay}, noise_multiplier=sigma,
                delta=arms.delta, max_grad_norm=arms.max_grad_norm, clip_fn="automatic", gamma=arms.gamma,
                eval_every=None, eval_at_start=False, seed=seed, device=arms.device, progress=False).model
        tr = trace_h(model.to(arms.device), x.to(arms.device), y.to(arms.device), n_probes=n_probes, seed=seed)
        out.append({"step": k, "tr_h": tr})
        rec.add("trace_hessian_trajectory", tr, method="only_private", seed=seed, step=k, epsilon=epsilon,
                study="curvature")
    return out


def reset_claim(arms: Arms, seeds: Sequence[int], epsilon: float, lr: float, test: study_design.HeldOutTest,
                rec: Any, final: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """A-reset-m-best on test loss: the sequential arm at `lr` resetting m, v, t or nothing at
    the switch, each final model evaluated once on the test set (reset m is the verdict's
    sequential run, taken from `final`, `run_verdict`'s rows). Rows `final_test_loss` (method reset_<r>) tagged with the claim."""
    out = []
    for r_ in RESETS:
        for s in seeds:
            if r_ == arms.reset:
                loss = next(r["test_loss"] for r in final if r["schedule"] == "sequential" and r["seed"] == s
                            and r["epsilon"] == epsilon and r["public_fraction"] == arms.public_fraction)
            else:
                run = run_at(arms, "sequential", s, lr=lr, epsilon=epsilon, reset=r_, method=f"reset_{r_}")
                arms.runs[("reset", r_, s)] = run
                loss, _ = test.evaluate(run.model, ("reset", r_, s))
            out.append({"reset": r_, "seed": s, "test_loss": loss})
            rec.add("final_test_loss", loss, method=f"reset_{r_}", seed=s, epsilon=epsilon, study="reset",
                    claim_id=CLAIM_RESET, lr=lr,
                    setting=f"{arms.dataset}, {arms.model_name}, switch at {arms.switch_step} of {arms.steps} steps")
    return out



def plot_schedules(arms: Arms, schedules: Sequence[str], epsilons: Sequence[float], seeds: Sequence[int]):
    """Figure 7: validation loss against step per schedule (mean ± sd over `seeds`), one panel
    per epsilon, the switch dotted; from the verdict runs in `arms.runs`. Returns the figure."""
    import matplotlib.pyplot as plt

    fraction = arms.public_fraction
    fig, axes = plt.subplots(1, len(epsilons), figsize=(5.5 * len(epsilons), 4), squeeze=False)
    for ax, eps in zip(axes[0], epsilons):
        for name in schedules:
            mean_sd_band(ax, arms.curves([("verdict", fraction, eps, name, s) for s in seeds]), "test_loss", name)
        ax.axvline(arms.switch_step, color="k", ls=":", lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        ax.set_title(f"ε = {eps:g}")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"{arms.dataset}, {fraction:.0%} public: mean ± sd over {len(seeds)} seeds (switch dotted)")
    return fig


def subset_sizes(arms: Arms) -> dict[str, int]:
    """Trainable parameters of each of notebook 04's named subsets on this study's model."""
    probe = create_model(**arms.model_spec)
    return {s: trainable_subset(probe, s).num_params for s in SUBSETS}


def verdict_models(arms: Arms, names: Sequence[str], epsilon: float, seed: int) -> dict[str, torch.nn.Module]:
    """The final models of the verdict runs `names` at (`epsilon`, `seed`, main public fraction):
    the pre-trained models of the downstream step ("sequential" is DP continual pre-training)."""
    keys = {n: ("verdict", arms.public_fraction, epsilon, n, seed) for n in names}
    missing = [n for n, k in keys.items() if k not in arms.runs]
    if missing:
        raise UserError(f"downstream_arms {missing} did not run in the verdict; pick some of the schedules")
    return {n: arms.runs[k].model for n, k in keys.items()}


def plot_curvature_trajectory(traj, epsilon: float, seed: int):
    """tr(H) (Hutchinson) against the only-private step, one seed; returns the figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(traj["step"], traj["tr_h"], marker="o")
    ax.set_xlabel("only-private step")
    ax.set_ylabel("tr(H) (Hutchinson)")
    ax.set_title(f"tr(H) along only-private, ε = {epsilon:g}, seed {seed}")
    return fig


def plot_reset_ablation(resets):
    """Test loss per optimizer-state reset (one column per reset in RESETS, a dot per seed,
    mean ± 95% half-width in black) from `reset_claim` rows; returns (figure, the per-seed
    differences to reset m summarised as mean and 95% half-width)."""
    import matplotlib.pyplot as plt

    wide = resets.pivot(index="seed", columns="reset", values="test_loss")
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for i, r in enumerate(RESETS):
        ax.scatter(np.full(len(wide), i), wide[r], s=12, alpha=0.5)
        ax.errorbar([i], [wide[r].mean()], yerr=[study_design.halfwidth(wide[r])], fmt="o", color="k", capsize=4)
    ax.set_xticks(range(len(RESETS)), [f"reset {r}" for r in RESETS])
    ax.set_xlabel("optimizer state reset at the switch")
    ax.set_ylabel("test loss")
    ax.set_title(f"reset at the switch: mean ± 95% half-width, {len(wide)} seeds")
    differences = wide.drop(columns="m").sub(wide["m"], axis=0).agg(["mean", study_design.halfwidth])
    return fig, differences


# --------------------------------------------------------------------------- downstream transfer
# The paper's transfer step: a DP (continually) pre-trained feature extractor, then non-private
# linear probing and fine-tuning on another data set (Places365, iNaturalist-2021). Here the
# pre-trained models are the verdict's arms (the sequential one is DP continual pre-training).
DOWNSTREAM_MODES = ("linear_probe", "fine_tune")
TRANSFER_CLAIMS = {"places365": "A-places365-transfer-acc", "inat2021": "A-inat2021-transfer-acc"}


def load_downstream(dataset: str, data_root: str | None, *, root: str = "", image_size: int,
                    in_chans: int) -> tuple[Any, Any, str]:
    """The downstream data set's train and test parts at the pre-trained model's input shape,
    and its label: "imagefolder" reads `root` (e.g. "places365", "inat2021": <data_root>/<root>/
    {train,val}/<class>/*) at `image_size` px; any other name is a registered data set that must
    already have that shape (CIFAR-100 after a CIFAR-10 pre-training: the default stand-in)."""
    if dataset == "imagefolder":
        if not root:
            raise UserError("downstream_dataset imagefolder needs downstream_root, e.g. places365 or inat2021 "
                            "(a folder <data_root>/<root>/{train,val}/<class>/)")
        kw = {"root": root, "image_size": int(image_size)}
        label = Path(root).name
    else:
        kw, label = {}, dataset
    train = load_dataset(dataset, "train", data_root=data_root, **kw)
    test = load_dataset(dataset, "test", data_root=data_root, **kw)
    want = (int(in_chans), int(image_size), int(image_size))
    if tuple(train.input_shape) != want:
        raise UserError(f"downstream data set {label} has images of shape {tuple(train.input_shape)}, but the "
                        f"pre-trained model takes {want}; pick a data set of that shape (or an imagefolder)")
    return train, test, label


def transfer_model(pretrained: torch.nn.Module, model_spec: dict[str, Any], num_classes: int,
                   mode: str) -> torch.nn.Module:
    """A fresh copy of `pretrained` (built from `model_spec`, weights copied: no training hooks
    travel with it) with a new zero-initialised head for `num_classes`; `mode` "linear_probe"
    trains only that head, "fine_tune" every parameter."""
    if mode not in DOWNSTREAM_MODES:
        raise UserError(f"unknown downstream mode {mode!r}; choose from {', '.join(DOWNSTREAM_MODES)}")
    model = create_model(**{**model_spec, "zero_head": False})
    model.load_state_dict(pretrained.state_dict())
    if hasattr(model, "reset_classifier"):  # timm
        model.reset_classifier(int(num_classes))
    else:  # dpbench's small nets: head is a Linear on num_features
        model.head = torch.nn.Linear(model.num_features, int(num_classes))
    zero_init_head(model)
    head = head_parameter_names(model)
    if not head:
        raise UserError(f"{type(model).__name__}: no classifier head found to retrain")
    set_trainable(model, head if mode == "linear_probe" else "*")
    return model.to(next(pretrained.parameters()).device)


def downstream_transfer(pretrained: dict[str, torch.nn.Module], model_spec: dict[str, Any], *, dataset: str,
                        data_root: str | None, root: str = "", modes: Sequence[str] | None = None,
                        epochs: float, lrs: dict[str, float], batch_size: int, eval_batch_size: int = 512,
                        weight_decay: float = 0.0, device: Any = "cpu", seed: int = 0, rec: Any = None,
                        epsilon: float | None = None) -> list[dict[str, Any]]:
    """Non-private transfer of each pre-trained model in `pretrained` ({arm name: model}) to
    `dataset`: per mode (linear probe, fine-tune; default: the keys of `lrs`), AdamW at `lrs[mode]` for `epochs` on the
    downstream train part, then its test accuracy (read once per run). Rows go to `rec` as
    `transfer_test_acc` (claim A-places365/A-inat2021 only when the data set is that one; any
    other data set is a stand-in, labelled so); returns one dict per (arm, mode)."""
    if not pretrained:
        raise UserError("no pre-trained model to transfer; name some arms in downstream_arms")
    modes = list(lrs) if modes is None else list(modes)
    missing = [m for m in modes if m not in lrs]
    if missing:
        raise UserError(f"downstream_lrs has no learning rate for {missing}; give one per mode, e.g. "
                        "{linear_probe: 0.01, fine_tune: 0.0003}")
    train, test, label = load_downstream(dataset, data_root, root=root, image_size=model_spec.get("img_size", 32),
                                         in_chans=model_spec.get("in_chans", 3))
    claim = TRANSFER_CLAIMS.get(label.lower(), "")
    kind = "the paper's data set" if claim else "stand-in for Places365 / iNaturalist-2021"
    out = []
    for arm, source in pretrained.items():
        for mode in modes:
            torch.manual_seed(seed)
            model = transfer_model(source, model_spec, train.num_classes, mode)
            r = fit(model, train, batching=BatchSpec(epochs=float(epochs), expected_batch_size=float(batch_size)),
                    privacy=None, optim=OptimSpec("adamw", float(lrs[mode]), {"weight_decay": float(weight_decay)}),
                    evaluation=EvalSpec(test_data=test, every=None, batch_size=eval_batch_size, progress=False),
                    seed=seed, device=device, label=f"{arm}/{mode}")
            acc = float(r.final["test_acc"])
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            out.append({"pretrained": arm, "mode": mode, "dataset": label, "role": kind, "test_acc": acc,
                        "trainable": trainable, "steps": r.steps, "lr": float(lrs[mode]), "classes": train.num_classes})
            if rec is None:
                continue
            setting = f"{label} ({kind}), {mode}, {epochs:g} epochs, pre-trained: {arm} at eps={epsilon}"
            rec.add("transfer_test_acc", acc, method=f"{arm}/{mode}", seed=seed, study="downstream", dataset=label,
                    epsilon=epsilon, setting=setting)
            if claim and arm == "sequential" and mode == "linear_probe":  # (?) the abstract does not say which
                rec.add("transfer_test_acc_percent", 100 * acc, method=f"{arm}/{mode}", seed=seed, study="downstream",
                        dataset=label, epsilon=epsilon, comparison="analogue", claim_id=claim, setting=setting)
    return out
