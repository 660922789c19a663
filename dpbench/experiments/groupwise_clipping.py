"""Group-wise clipping (He et al., ICLR 2023): flat, per-layer (fixed and adaptive) and per-device.

The arms, one run per (arm, epsilon, seed), and the tables and claim rows built from them:

- `flat`: one threshold C for the whole gradient;
- `layer`: per-layer, fixed C_k = C / sqrt(K) (the same total sensitivity C);
- `layer-adaptive-q<q>[-renorm]`: per-layer thresholds that track the q-quantile of their
  layer's per-sample norms (`fit_adaptive`), optionally rescaled to the fixed total C;
- `device`: per-device clipping, the model's two halves by parameter count standing for two
  pipeline stages (`two_stage_placement`);
- `nonprivate`: the same model and optimizer without clipping or noise.

Every private arm at one epsilon must record the same ledger (one Poisson-sampled Gaussian
with the calibrated sigma per step), adaptive arms included: `check_privacy` verifies it and
shows beside it the smaller, wrong epsilon of accounting the counts as a separate event.
The differences between arms are read by `compare_means` (2 standard errors), and the
report's claim rows are per-seed differences (`record_claim_rows`).

Everything takes a `Study` (data on the device, model, sampling, calibrated sigmas and the
training recipe) built by `make_study`; recording goes to any object with the Recorder's
`add(metric, value, **columns)`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from dpbench.clipping.adaptive import separate_events_epsilon
from dpbench.data import load_dataset
from dpbench.experiments import study_design
from dpbench.experiments.plots import legend_once, plain_log_ticks
from dpbench.errors import UserError
from dpbench.models import create_model
from dpbench.privacy import accounting
from dpbench.training.adaptive import fit_adaptive
from dpbench.training.bench import peak_extra_mb
from dpbench.training.loop import BatchSpec, ClipSpec, EvalSpec, OptimSpec, PrivacySpec, fit, resolve_device
from dpbench.training.sampling import steps_for_epochs

STYLES = ("flat", "layer", "device", "nonprivate")
NONPRIVATE = "nonprivate"
STAGES = ("stage0", "stage1")
CLAIM_FIXED = "B-perlayer-fixed-below-flat"
CLAIM_ADAPTIVE = "B-adaptive-matches-flat"
CLAIM_WALL_TIME = "B-adaptive-less-wall-time"


# ---------------------------------------------------------------------------- arms
def parse_arm(arm: str) -> dict[str, Any]:
    """'flat' | 'layer' | 'device' | 'nonprivate' | '<style>-adaptive-q<q>[-renorm]' -> settings:
    style, adaptive, q (target quantile or None), renorm, private."""
    parts = arm.split("-")
    spec = {"style": parts[0], "adaptive": False, "q": None, "renorm": False, "private": parts[0] != NONPRIVATE}
    if spec["style"] not in STYLES:
        raise UserError(f"unknown arm {arm!r}; use flat, layer, device, nonprivate or e.g. 'layer-adaptive-q0.5'")
    if len(parts) > 1:
        bad = parts[1] != "adaptive" or len(parts) < 3 or not parts[2].startswith("q") or parts[3:] not in ([], ["renorm"])
        try:
            q = float(parts[2][1:]) if not bad else None
        except ValueError:
            bad = True
        if bad or spec["style"] == NONPRIVATE:
            raise UserError(f"unknown arm {arm!r}; e.g. 'layer-adaptive-q0.5' or 'layer-adaptive-q0.5-renorm'")
        spec.update(adaptive=True, q=q, renorm=parts[3:] == ["renorm"])
    return spec


def adaptive_arms(arms: Sequence[str], style: str | None = None) -> list[str]:
    """The adaptive arms of `arms` (of one clipping `style`, if given), in order."""
    return [a for a in arms if parse_arm(a)["adaptive"] and (style is None or parse_arm(a)["style"] == style)]


def two_stage_placement(model: torch.nn.Module) -> dict[str, str]:
    """Stand-in for a two-stage pipeline: the first layers up to about half the parameters on
    'stage0', the rest on 'stage1' (whole layers, in module order). Maps every trainable
    parameter's name to its stage."""
    params = [(name, p.numel()) for name, p in model.named_parameters() if p.requires_grad]
    total, running, placement = sum(c for _, c in params), 0, {}
    stage_of_layer: dict[str, str] = {}
    for name, count in params:
        layer = name.rsplit(".", 1)[0]
        if layer not in stage_of_layer:
            stage_of_layer[layer] = STAGES[0] if running < total / 2 else STAGES[1]
        running += count
        placement[name] = stage_of_layer[layer]
    return placement


def stage_layers(placement: dict[str, str]) -> dict[str, list[str]]:
    """{stage: sorted layer names} of a parameter placement."""
    return {st: sorted({name.rsplit(".", 1)[0] for name, s in placement.items() if s == st}) for st in STAGES}


# ---------------------------------------------------------------------------- the setting
@dataclass
class Study:
    """What every run of the study shares: data (already on `device`), the model, Poisson
    sampling (q, steps), the calibrated sigma per target epsilon, and the training recipe."""

    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    model_spec: dict[str, Any]
    sample_rate: float
    steps: int
    sigmas: dict[float, float]
    delta: float
    device: torch.device
    optimizer: str = "adam"
    lr: float = 0.02
    max_grad_norm: float = 1.0
    clip_method: str = "auto"
    threshold_lr: float = 0.2
    count_fraction: float = 0.01
    eval_batch_size: int = 1024
    max_physical_batch: int = 0
    n_params: int = 0
    layer_names: list[str] = field(default_factory=list)
    description: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.train[0])

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)


def make_study(*, dataset: str, model_name: str, model_kwargs: dict | None = None, data_root: str = "",
               batch_size: int, epochs: float, target_epsilons: Sequence[float], delta: float = 1e-5,
               device: str | torch.device = "cpu", **recipe: Any) -> Study:
    """Load `dataset` onto the device, fix q = batch_size / n and the step count for `epochs`,
    check delta < 1/n, and calibrate sigma for each target epsilon (RDP, Poisson sampling).

    `recipe`: optimizer, lr, max_grad_norm, clip_method, threshold_lr, count_fraction,
    eval_batch_size, max_physical_batch (the `Study` fields of the same names).
    """
    unknown = sorted(set(recipe) - {"optimizer", "lr", "max_grad_norm", "clip_method", "threshold_lr",
                                    "count_fraction", "eval_batch_size", "max_physical_batch"})
    if unknown:
        raise UserError(f"unknown training settings {unknown}")
    if not target_epsilons:
        raise UserError("target_epsilons is empty; give at least one epsilon, e.g. [8.0]")
    dev = resolve_device(device)
    train = load_dataset(dataset, "train", data_root=data_root or None)
    test = load_dataset(dataset, "test", data_root=data_root or None)
    c_in, h, _ = train.input_shape
    model_spec = {"name": model_name, "num_classes": train.num_classes, "in_chans": c_in, "img_size": h,
                  **(model_kwargs or {})}
    n = len(train)
    q = batch_size / n
    steps = steps_for_epochs(epochs, q)
    accounting.check_delta(delta, n)
    probe = create_model(**model_spec)
    n_params = sum(p.numel() for p in probe.parameters() if p.requires_grad)
    layer_names = [name for name, m in probe.named_modules() if any(True for _ in m.parameters(recurse=False))]
    t0 = time.perf_counter()
    # bisection over RDP, seconds per epsilon: a bar, so the cell is not silent
    sigmas = {eps: accounting.noise_multiplier(eps, q, steps, delta=delta)
              for eps in tqdm(list(target_epsilons), desc="calibrating sigma", unit="ε")}
    description = {"dataset": dataset, "source": train.source, "n_test": len(test), "model_name": model_name,
                   "model_kwargs": dict(model_kwargs or {}), "batch_size": batch_size, "epochs": epochs,
                   "calibration_s": time.perf_counter() - t0, "placement": two_stage_placement(probe)}
    return Study(train=(train.x.to(dev), train.y.to(dev)), test=(test.x.to(dev), test.y.to(dev)),
                 model_spec=model_spec, sample_rate=q, steps=steps, sigmas=sigmas, delta=delta, device=dev,
                 n_params=n_params, layer_names=layer_names, description=description, **recipe)


def study_text(study: Study) -> str:
    """Data, model, sampling and calibration time in two lines."""
    d = study.description
    return (f"{d['dataset']} ({d['source']}): n = {study.n} train / {d['n_test']} test; {d['model_name']} "
            f"d = {study.n_params:,} parameters in K = {study.num_layers} layers\n"
            f"q = {study.sample_rate:.4f} (expected batch {d['batch_size']}), {study.steps} steps = "
            f"{d['epochs']:g} epochs; sigma calibrated in {d['calibration_s']:.1f} s")


def noise_scale_rows(study: Study, rec=None) -> list[dict[str, float]]:
    """Per target epsilon: sigma, the noise-to-signal ratio sigma sqrt(d) / B (B the expected
    batch) and n epsilon; also added to `rec` as noise_multiplier,
    noise_to_signal_sigma_sqrt_d_over_B and n_times_epsilon rows."""
    rows = []
    batch = study.description.get("batch_size", study.sample_rate * study.n)
    for eps, s in study.sigmas.items():
        ratio = s * math.sqrt(study.n_params) / batch
        rows.append({"epsilon": eps, "sigma": s, "sigma*sqrt(d)/B": ratio, "n*epsilon": study.n * eps})
        if rec is not None:
            rec.add("noise_multiplier", s, method="all_private", epsilon=eps, steps=study.steps,
                    sample_rate=study.sample_rate)
            rec.add("noise_to_signal_sigma_sqrt_d_over_B", ratio, method="all_private", epsilon=eps, d=study.n_params)
            rec.add("n_times_epsilon", study.n * eps, method="all_private", epsilon=eps)
    return rows


# ---------------------------------------------------------------------------- one run
def train_arm(study: Study, arm: str, epsilon: float | None, seed: int, *, data=None, test_data=None,
              steps: int | None = None, sample_rate: float | None = None, sigma: float | None = None,
              eval_every: int | str | None = "epoch"):
    """Train one fresh model (seeded by `seed`) as `arm`; returns (TrainResult, AdaptiveClipping or None).

    Defaults: the study's training data, step count, q and the sigma calibrated for `epsilon`.
    `eval_every`: "epoch", a number of steps, or None (final evaluation only). Epsilon is
    not read during training (only the final one is computed).
    """
    spec = parse_arm(arm)
    torch.manual_seed(seed)
    model = create_model(**study.model_spec)
    options = {"placement": two_stage_placement(model)} if spec["style"] == "device" else None
    data = study.train if data is None else data
    steps = study.steps if steps is None else steps
    q = study.sample_rate if sample_rate is None else sample_rate
    physical = study.max_physical_batch or None
    if not spec["private"]:
        return fit(model, data, batching=BatchSpec(steps=steps, sample_rate=q, max_physical_batch=physical),
                   privacy=None, optim=OptimSpec(optimizer=study.optimizer, lr=study.lr),
                   evaluation=EvalSpec(test_data=test_data, every=eval_every, batch_size=study.eval_batch_size,
                                       progress=False),
                   seed=seed, device=study.device, label=arm), None
    sigma = study.sigmas[epsilon] if sigma is None else sigma
    if spec["adaptive"]:
        return fit_adaptive(
            model, data, clip_style=spec["style"], engine_kwargs=options, target_quantile=spec["q"],
            threshold_lr=study.threshold_lr, count_fraction=study.count_fraction, renormalize=spec["renorm"],
            test_data=test_data, steps=steps, sample_rate=q, optimizer=study.optimizer, lr=study.lr,
            delta=study.delta, seed=seed, device=study.device, progress=False, track_epsilon=False,
            eval_batch_size=study.eval_batch_size, eval_every=_flat_eval_every(eval_every, steps),
            max_physical_batch=physical, noise_multiplier=sigma, max_grad_norm=study.max_grad_norm,
            clip_method=study.clip_method, label=arm)
    return fit(model, data, batching=BatchSpec(steps=steps, sample_rate=q, max_physical_batch=physical),
               privacy=PrivacySpec(noise_multiplier=sigma, delta=study.delta, track_epsilon=False),
               clipping=ClipSpec(max_grad_norm=study.max_grad_norm, method=study.clip_method, style=spec["style"],
                                 options=options),
               optim=OptimSpec(optimizer=study.optimizer, lr=study.lr),
               evaluation=EvalSpec(test_data=test_data, every=eval_every, batch_size=study.eval_batch_size,
                                   progress=False),
               seed=seed, device=study.device, label=arm), None


def _flat_eval_every(every: int | str | None, steps: int) -> int | None:
    """The flat `eval_every` keyword of `fit_adaptive`: None is about once per epoch there,
    and "never" is a period past the last step."""
    if every == "epoch":
        return None
    return steps + 1 if every is None else int(every)


# ---------------------------------------------------------------------------- all runs
@dataclass
class Runs:
    """One dict per run (arm, epsilon, seed, test_acc, test_loss, wall_time_s, s_per_step,
    epsilon_spent, events, ledger, adaptive), the evaluation curves and the adaptive arms'
    threshold trajectories (tidy rows), and the wall time of all runs."""

    runs: list[dict[str, Any]]
    curves: list[dict[str, Any]]
    trajectories: list[dict[str, Any]]
    elapsed_s: float = 0.0

    def frames(self):
        """(runs, curves, trajectories) as pandas DataFrames (runs without ledger objects)."""
        import pandas as pd

        runs = pd.DataFrame([{k: v for k, v in r.items() if k not in ("events", "ledger", "adaptive")}
                             for r in self.runs])
        return runs, pd.DataFrame(self.curves), pd.DataFrame(self.trajectories)


def jobs(arms: Sequence[str], target_epsilons: Sequence[float], seeds: Sequence[int],
         nonprivate_reference: bool = True) -> list[tuple[str, float | None, int]]:
    """(arm, epsilon, seed) of every run: the non-private reference per seed first (epsilon
    None), then per epsilon, per arm, per seed."""
    out: list[tuple[str, float | None, int]] = [(a, e, s) for e in target_epsilons for a in arms for s in seeds]
    return ([(NONPRIVATE, None, s) for s in seeds] + out) if nonprivate_reference else out


# ---------------------------------------------------------------------------- privacy check
class PrivacyCheckError(AssertionError):
    """The arms' ledgers disagree, or an arm did not spend its target epsilon: a DP bug."""


def check_privacy(study: Study, runs: Sequence[dict[str, Any]], arms: Sequence[str],
                  target_epsilons: Sequence[float], rec=None):
    """Every private arm at one epsilon recorded the same ledger (one Poisson-sampled
    Gaussian with the calibrated sigma for all the study's steps) and spent epsilon within
    1%; raises `PrivacyCheckError` otherwise.

    Returns a DataFrame per (epsilon, arm; the first seed's run): epsilon spent, sigma of
    the ledger, the gradient's sigma_g and the counts' sigma_b and K of adaptive arms, and
    the epsilon that accounting gradient and counts as separate events would (wrongly)
    give, also added to `rec` as `epsilon_separate_events_wrong`.
    """
    import pandas as pd

    rows, wrong_cache = [], {}
    for eps in target_epsilons:
        private = [r for r in runs if r["epsilon"] == eps]
        if not private:
            raise PrivacyCheckError(f"eps={eps}: no private runs")
        reference = private[0]["events"]
        if not all(r["events"] == reference for r in private):
            raise PrivacyCheckError(f"eps={eps}: the arms recorded different ledgers")
        if len(reference) != 1 or reference[0]["steps"] != study.steps:
            raise PrivacyCheckError(f"eps={eps}: expected one event of {study.steps} steps, got {reference}")
        for arm in arms:
            r = next(r for r in private if r["arm"] == arm)
            ad = r["adaptive"]
            wrong = None
            if ad is not None:  # the same (sigma_g, sigma_b, K) for every adaptive arm at this epsilon
                key = (ad.sigma_g, ad.sigma_b, len(ad.groups))
                if key not in wrong_cache:
                    wrong_cache[key] = separate_events_epsilon(*key, study.sample_rate, study.steps, study.delta)
                wrong = wrong_cache[key]
            rows.append({"arm": arm, "target_eps": eps, "epsilon_spent": r["epsilon_spent"],
                         "sigma (ledger)": study.sigmas[eps], "sigma_g (gradient)": ad.sigma_g if ad else study.sigmas[eps],
                         "sigma_b (counts)": ad.sigma_b if ad else None, "K": len(ad.groups) if ad else None,
                         "eps if separate events (WRONG)": wrong})
            if wrong is not None and rec is not None:
                rec.add("epsilon_separate_events_wrong", wrong, method=arm, epsilon=eps, seed=r["seed"],
                        reason="accounting error shown on purpose: understates epsilon")
        off = [r["arm"] for r in private if abs(r["epsilon_spent"] - eps) > 0.01 * eps]
        if off:
            raise PrivacyCheckError(f"eps={eps}: arms {off} spent an epsilon more than 1% away from the target")
    return pd.DataFrame(rows)


def representative_ledger(runs: Sequence[dict[str, Any]], target_epsilons: Sequence[float]):
    """The ledger of the first adaptive run at the largest epsilon (identical to every
    private arm's there, by `check_privacy`), or None without adaptive arms."""
    top = max(target_epsilons)
    return next((r["ledger"] for r in runs if r["epsilon"] == top and parse_arm(r["arm"])["adaptive"]), None)


# ---------------------------------------------------------------------------- reading the runs
def compare_means(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, str]:
    """mean(a) - mean(b), its standard error (unpaired; a single value adds no variance) and a
    reading: "within noise" when |difference| <= 2 standard errors, else "higher" / "lower"."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if not len(a) or not len(b):
        raise UserError("compare_means needs at least one value on each side")
    diff = float(a.mean() - b.mean())
    se = math.sqrt((a.var(ddof=1) / len(a) if len(a) > 1 else 0.0) + (b.var(ddof=1) / len(b) if len(b) > 1 else 0.0))
    word = "within noise" if abs(diff) <= 2 * se else ("higher" if diff > 0 else "lower")
    return diff, se, word


def accuracy_table(runs_df, arms: Sequence[str], rec=None):
    """Mean, sd and count of test accuracy per (epsilon, private arm), with a "mean ± sd"
    text column; `test_acc_mean` rows go to `rec`. Returns (table, non-private accuracies)."""
    private = runs_df[runs_df.arm != NONPRIVATE]
    table = private.groupby(["epsilon", "arm"], sort=False)["test_acc"].agg(["mean", "std", "count"]).reset_index()
    table["std"] = table["std"].fillna(0.0)
    table["acc (mean ± sd)"] = [f"{m:.3f} ± {s:.3f}" for m, s in zip(table["mean"], table["std"])]
    if rec is not None:
        for _, row in table.iterrows():
            rec.add("test_acc_mean", row["mean"], method=row["arm"], epsilon=row["epsilon"], sd=row["std"],
                    n_seeds=int(row["count"]))
    return table, runs_df[runs_df.arm == NONPRIVATE]["test_acc"]


def accuracies(runs_df, arm: str, epsilon: float) -> np.ndarray:
    """Test accuracies of one (arm, epsilon) over its seeds."""
    return runs_df[(runs_df.arm == arm) & (runs_df.epsilon == epsilon)]["test_acc"].to_numpy()


def ordering_table(runs_df, arms: Sequence[str], target_epsilons: Sequence[float], rec=None):
    """The paper's orderings per epsilon, each as mean difference, standard error and reading
    (`compare_means`): flat - per-layer fixed, each per-layer adaptive arm - flat, device -
    per-layer fixed. Rows go to `rec` as acc_diff_flat_minus_fixed,
    acc_diff_adaptive_minus_flat and acc_diff_device_minus_layer."""
    import pandas as pd

    rows = []

    def add(eps, comparison, a, b, metric, method):
        diff, se, word = compare_means(accuracies(runs_df, a, eps), accuracies(runs_df, b, eps))
        rows.append({"epsilon": eps, "comparison": comparison, "diff": diff, "se": se, "reading": word})
        if rec is not None:
            rec.add(metric, diff, method=method, epsilon=eps, se=se, reading=word)

    for eps in target_epsilons:
        if "flat" in arms and "layer" in arms:
            add(eps, "flat - per-layer fixed", "flat", "layer", "acc_diff_flat_minus_fixed", "flat-vs-layer")
        for arm in adaptive_arms(arms, "layer"):
            if "flat" in arms:
                add(eps, f"{arm} - flat", arm, "flat", "acc_diff_adaptive_minus_flat", arm)
        if "device" in arms and "layer" in arms:
            add(eps, "device - per-layer fixed", "device", "layer", "acc_diff_device_minus_layer", "device-vs-layer")
    return pd.DataFrame(rows, columns=["epsilon", "comparison", "diff", "se", "reading"])


def mean_curve(curves_df, arm: str, epsilon: float | None):
    """An arm's test accuracy against wall time, averaged over seeds per evaluation step
    (columns step, acc, sd, t); `epsilon` None selects the non-private runs."""
    sel = curves_df.epsilon.isna() if epsilon is None else curves_df.epsilon == epsilon
    sub = curves_df[(curves_df.arm == arm) & sel]
    return sub.groupby("step").agg(acc=("test_acc", "mean"), sd=("test_acc", "std"), t=("wall_time_s", "mean")).reset_index()


def mean_thresholds(traj_df, arm: str, epsilon: float):
    """(thresholds, total): each group's threshold per step, averaged over seeds (a DataFrame,
    steps x groups), and the total sensitivity sqrt(sum_k C_k^2) per step, averaged over seeds."""
    sub = traj_df[(traj_df.arm == arm) & (traj_df.epsilon == epsilon)]
    mean = sub.groupby(["group", "step"])["threshold"].mean().unstack(0)
    total = sub.assign(sq=sub.threshold ** 2).groupby(["seed", "step"])["sq"].sum().pow(0.5).groupby("step").mean()
    return mean, total


def final_thresholds(traj_df):
    """Each adaptive arm's last-step thresholds per (arm, epsilon), averaged over seeds."""
    last = traj_df[traj_df.step == traj_df.step.max()]
    return last.groupby(["arm", "epsilon", "group"])["threshold"].mean().unstack("group")


# ---------------------------------------------------------------------------- time and memory
def peak_memory_mb(study: Study, arm: str, *, batch_size: int, steps: int = 1, seed: int = 0) -> float | None:
    """Peak memory (MB) of `steps` full-batch steps of `arm` on the first `batch_size`
    training examples, above the level before them (sigma 1, no evaluation).

    The bench's one in-process probe (`dpbench.training.bench.peak_extra_mb`): GPU:
    max_memory_allocated; CPU: the resident-set high-water mark after freed heap is returned
    to the system (coarse, a few MB of noise). None where the platform cannot reset the mark.
    """
    data = (study.train[0][:batch_size], study.train[1][:batch_size])
    eps = max(study.sigmas)
    return peak_extra_mb(lambda: train_arm(study, arm, eps, seed, data=data, steps=steps, sample_rate=1.0,
                                           sigma=1.0, eval_every=None), study.device)


def memory_rows(study: Study, arms: Sequence[str], rec=None, *, batch_size: int, steps: int = 1, seed: int = 0,
                progress: bool = True) -> list[dict[str, Any]]:
    """`peak_memory_mb` of every arm ({arm, peak_mem_mb}, NaN where not measurable), with a
    `peak_mem_mb` row per arm in `rec` (failed, with the reason, where not measurable)."""
    rows = []
    for arm in tqdm(list(arms), desc="memory", disable=not progress):
        try:
            mb, why = peak_memory_mb(study, arm, batch_size=batch_size, steps=steps, seed=seed), ""
        except OSError as exc:
            mb, why = None, f"cannot read process memory: {exc}"
        if mb is None:
            why = why or "cannot read process memory: the resident-set high-water mark cannot be reset here"
            rows.append({"arm": arm, "peak_mem_mb": float("nan")})
            if rec is not None:
                rec.add("peak_mem_mb", None, method=arm, status="failed", reason=why)
        else:
            rows.append({"arm": arm, "peak_mem_mb": mb})
            if rec is not None:
                rec.add("peak_mem_mb", mb, method=arm, batch_size=batch_size, device_type=study.device.type)
    return rows


def speed_memory_summary(runs_df, mem_rows: Sequence[dict[str, Any]], rec=None):
    """Per arm (in `mem_rows` order): peak memory, mean and sd of seconds per step over its
    runs, and time relative to the non-private arm when present; `seconds_per_step_mean`
    rows go to `rec`."""
    import pandas as pd

    mem_df = pd.DataFrame(mem_rows, columns=["arm", "peak_mem_mb"])
    speed = runs_df.groupby("arm", sort=False)["s_per_step"].agg(["mean", "std"]).reindex(mem_df["arm"])
    if rec is not None:
        for arm, row in speed.iterrows():
            rec.add("seconds_per_step_mean", row["mean"], method=arm, sd=row["std"])
    summary = mem_df.set_index("arm").join(speed.rename(columns={"mean": "s_per_step", "std": "s_per_step_sd"}))
    if NONPRIVATE in summary.index:
        summary["time_vs_nonprivate"] = summary["s_per_step"] / summary.loc[NONPRIVATE, "s_per_step"]
    return summary


# ---------------------------------------------------------------------------- figures
# Each returns a matplotlib Figure for `Recorder.figure` (matplotlib is imported here: an optional
# dependency of the library). Colours: arm i of `arms` is C<i>, the non-private reference black.

def _arm_color(arm: str, arms: Sequence[str]) -> str:
    return "k" if arm == NONPRIVATE else f"C{list(arms).index(arm) % 10}"


def plot_accuracy_per_arm(runs_df, arms: Sequence[str], target_epsilons: Sequence[float], nonpriv, *,
                          dataset: str, n_seeds: int):
    """Final test accuracy per arm and epsilon: mean with ± 1 sd whiskers over the seeds, each
    seed as a faint dot, the non-private mean as a dashed line."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.2), layout="constrained")
    width = 0.8 / max(len(target_epsilons), 1)
    for j, eps in enumerate(target_epsilons):
        for i, arm in enumerate(arms):
            vals = accuracies(runs_df, arm, eps)
            x = i + (j - (len(target_epsilons) - 1) / 2) * width
            ax.errorbar([x], [vals.mean()], yerr=[vals.std(ddof=1) if len(vals) > 1 else 0.0], fmt="o",
                        color=f"C{j}", capsize=4, label=f"ε = {eps:g}" if i == 0 else None)
            ax.scatter(np.full(len(vals), x + width * 0.25), vals, s=10, color=f"C{j}", alpha=0.4)
    if len(nonpriv):
        ax.axhline(float(np.mean(nonpriv)), color="k", ls="--", lw=1, label="non-private (mean)")
    ax.set_xticks(range(len(arms)), list(arms), rotation=20, ha="right", rotation_mode="anchor")
    ax.set_xlabel("clipping arm")
    ax.set_ylabel("final test accuracy")
    ax.set_title(f"{dataset}: mean ± 1 sd over {n_seeds} seed{'s' if n_seeds != 1 else ''} (dots: single seeds)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def plot_accuracy_vs_wall_time(curves_df, arms: Sequence[str], target_epsilons: Sequence[float], *,
                               nonprivate_reference: bool, n_seeds: int):
    """Test accuracy against training wall time, one panel per epsilon, one line per arm (mean
    over seeds). The spread is one ± 1 sd whisker at each arm's last evaluation, not a band per
    line (eight overlapping bands hide the lines); one legend for both panels, below them."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(target_epsilons), figsize=(5.5 * len(target_epsilons), 4.4), squeeze=False,
                             sharey=True, layout="constrained")
    shown = ([NONPRIVATE] if nonprivate_reference else []) + list(arms)
    for ax, eps in zip(axes[0], target_epsilons):
        for arm in shown:
            g = mean_curve(curves_df, arm, None if arm == NONPRIVATE else eps)
            if g.empty:
                continue
            color = _arm_color(arm, arms)
            ax.plot(g["t"], g["acc"], marker=".", color=color, ls="--" if arm == NONPRIVATE else "-", label=arm)
            last = g.iloc[-1]
            if n_seeds > 1 and not math.isnan(last["sd"]):
                ax.errorbar([last["t"]], [last["acc"]], yerr=[last["sd"]], color=color, capsize=3, lw=1)
        ax.set_xlabel("training wall time (s, mean over seeds)")
        ax.set_title(f"ε = {eps:g}")
    axes[0][0].set_ylabel("validation accuracy")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 4))
    fig.suptitle("Validation accuracy against wall time: " + (f"mean over {n_seeds} seeds; whisker at the last evaluation: "
                                                          "± 1 sd" if n_seeds > 1 else "one seed"))
    return fig


def plot_threshold_trajectories(traj_df, adaptive: Sequence[str], target_epsilons: Sequence[float], *,
                                max_grad_norm: float, n_seeds: int):
    """Each adaptive arm's per-layer thresholds C_k over training (mean over seeds, one panel per
    arm and epsilon, one log scale for all), the total sensitivity sqrt(sum C_k^2) and the fixed
    per-layer threshold C/sqrt(K); one legend below the panels."""
    import matplotlib.pyplot as plt


    fig, axes = plt.subplots(len(adaptive), len(target_epsilons),
                             figsize=(5.5 * len(target_epsilons), 2.6 * len(adaptive) + 1.2),
                             squeeze=False, sharex=True, sharey=True, layout="constrained")
    for i, arm in enumerate(adaptive):
        for j, eps in enumerate(target_epsilons):
            ax = axes[i][j]
            mean, total = mean_thresholds(traj_df, arm, eps)
            for k, group in enumerate(mean.columns):
                ax.plot(mean.index, mean[group], lw=1.2, label=f"C_k of {group}", color=f"C{k % 10}")
            ax.plot(total.index, total.values, "k--", lw=1, label="total √Σ C_k²")
            ax.axhline(max_grad_norm / math.sqrt(max(len(mean.columns), 1)), color="0.6", ls=":", lw=1,
                       label="fixed per-layer C/√K")
            ax.set_yscale("log")
            ax.set_title(f"{arm}, ε = {eps:g}", fontsize=9)
            if j == 0:
                ax.set_ylabel("threshold (log)")
            if i == len(adaptive) - 1:
                ax.set_xlabel("step")
    plain_log_ticks(axes[0][0].yaxis)
    legend_once(fig, axes[0][0], loc="outside lower center", ncol=4)
    fig.suptitle(f"Per-layer thresholds of the adaptive arms (mean over {n_seeds} seed{'s' if n_seeds != 1 else ''})")
    return fig


def plot_step_time_and_memory(summary, arms: Sequence[str], *, batch_size: int, mem_batch_size: int, device: str,
                              n_seeds: int, n_epsilons: int):
    """Seconds per step (mean ± 1 sd over an arm's runs) and peak memory per arm, side by side."""
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")
    x = np.arange(len(summary))
    colors = [_arm_color(a, arms) for a in summary.index]  # as in the other figures
    ax1.bar(x, summary["s_per_step"] * 1e3, yerr=summary["s_per_step_sd"].fillna(0) * 1e3, color=colors, capsize=3)
    ax1.set_ylabel(f"ms per step (expected batch {batch_size})")
    ax1.set_title(f"time per step: mean ± 1 sd over each arm's runs\n({n_seeds} seeds x {n_epsilons} ε; "
                  f"non-private: {n_seeds} seeds)", fontsize=9)
    ax2.bar(x, summary["peak_mem_mb"], color=colors)
    ax2.set_ylabel("peak memory above baseline (MB)")
    ax2.set_title(f"peak memory, batch {mem_batch_size}, {device} (one measurement per arm)", fontsize=9)
    for ax in (ax1, ax2):
        ax.set_xticks(x, list(summary.index), rotation=25, ha="right", rotation_mode="anchor")
        ax.set_xlabel("arm")
    return fig


# ---------------------------------------------------------------------------- a decidable study (issue 16)
# The claims are judged where they can be decided: at the paper's noise-to-signal ratio, with
# every arm tuned on the same grid on a validation split carved from the training data, the
# test set looked at once per run, and comparisons fixed in the params before the run.
PAPER_NOISE_TO_SIGNAL = 1.2  # He et al., CIFAR-10 WRN16-4: sigma ~ 3 (?), d = 2.8M, B = 4096 (De et al.'s recipe (?))


@dataclass
class SplitStudy(Study):
    """A `Study` whose `train` is the fit part of the training data, with the `validation`
    part carved from it (tuning and curves read it; the test set is read once per run, by
    `run_verdict` through a `HeldOutTest`) and DP-SGD with `momentum`."""

    validation: tuple[torch.Tensor, torch.Tensor] | None = None
    momentum: float = 0.9


def make_split_study(*, dataset: str, model_name: str, model_kwargs: dict | None = None, data_root: str = "",
                     batch_size: int, epochs: float, epsilon: float, validation_fraction: float, split_seed: int = 0,
                     delta: float = 1e-5, device: str | torch.device = "cpu", momentum: float = 0.9,
                     **recipe: Any) -> SplitStudy:
    """`make_study` on the fit part of `dataset`'s training data: a stratified
    `validation_fraction` is carved off with `split_seed`; q = batch_size / n_fit, the steps
    of `epochs` over the fit part and sigma for `epsilon` are computed on it. The optimizer is
    SGD with `momentum` (the learning rate is tuned per arm). `recipe`: max_grad_norm,
    clip_method, threshold_lr, count_fraction, eval_batch_size, max_physical_batch."""
    base = make_study(dataset=dataset, model_name=model_name, model_kwargs=model_kwargs, data_root=data_root,
                      batch_size=batch_size, epochs=epochs, target_epsilons=[epsilon], delta=delta, device=device,
                      optimizer="sgd", **recipe)
    fit_part, val = study_design.carve_validation(base.train, validation_fraction, split_seed)
    n = len(fit_part[1])
    accounting.check_delta(delta, n)
    q = batch_size / n
    steps = steps_for_epochs(epochs, q)
    sigma = accounting.noise_multiplier(epsilon, q, steps, delta=delta)
    desc = dict(base.description, n_validation=len(val[1]), validation_fraction=validation_fraction,
                momentum=momentum)
    fields_ = {f: getattr(base, f) for f in Study.__dataclass_fields__}
    fields_.update(train=fit_part, sample_rate=q, steps=steps, sigmas={epsilon: sigma}, description=desc)
    return SplitStudy(**fields_, validation=val, momentum=momentum)


def regime_rows(study: Study, rec=None) -> list[dict[str, Any]]:
    """`noise_scale_rows` with the paper's sigma sqrt(d) / B beside ours."""
    rows = noise_scale_rows(study, rec)
    for r in rows:
        r["paper sigma*sqrt(d)/B"] = PAPER_NOISE_TO_SIGNAL
    return rows


def train_tuned(study: SplitStudy, arm: str, seed: int, lr: float, *, eval_every: int | str | None = None):
    """One run of `arm` (fresh model, seed `seed`) on the fit part with DP-SGD + momentum at
    `lr`, evaluated on the validation part (every `eval_every`; always at the end).
    Returns (TrainResult, AdaptiveClipping or None)."""
    spec = parse_arm(arm)
    eps = next(iter(study.sigmas))
    torch.manual_seed(seed)
    model = create_model(**study.model_spec)
    options = {"placement": two_stage_placement(model)} if spec["style"] == "device" else None
    physical = study.max_physical_batch or None
    kw = {"momentum": study.momentum}
    evaluation = EvalSpec(test_data=study.validation, every=eval_every, batch_size=study.eval_batch_size,
                          progress=False)
    batching = BatchSpec(steps=study.steps, sample_rate=study.sample_rate, max_physical_batch=physical)
    if not spec["private"]:
        return fit(model, study.train, batching=batching, privacy=None, optim=OptimSpec("sgd", lr, kw),
                   evaluation=evaluation, seed=seed, device=study.device, label=arm), None
    sigma = study.sigmas[eps]
    if spec["adaptive"]:
        return fit_adaptive(
            model, study.train, clip_style=spec["style"], engine_kwargs=options, target_quantile=spec["q"],
            threshold_lr=study.threshold_lr, count_fraction=study.count_fraction, renormalize=spec["renorm"],
            test_data=study.validation, steps=study.steps, sample_rate=study.sample_rate, optimizer="sgd", lr=lr,
            optimizer_kwargs=kw, delta=study.delta, seed=seed, device=study.device, progress=False,
            track_epsilon=False, eval_batch_size=study.eval_batch_size,
            eval_every=_flat_eval_every(eval_every, study.steps), max_physical_batch=physical,
            noise_multiplier=sigma, max_grad_norm=study.max_grad_norm, clip_method=study.clip_method, label=arm)
    return fit(model, study.train, batching=batching,
               privacy=PrivacySpec(noise_multiplier=sigma, delta=study.delta, track_epsilon=False),
               clipping=ClipSpec(max_grad_norm=study.max_grad_norm, method=study.clip_method, style=spec["style"],
                                 options=options),
               optim=OptimSpec("sgd", lr, kw), evaluation=evaluation, seed=seed, device=study.device,
               label=arm), None


def tune_arms(study: SplitStudy, arms: Sequence[str], lr_grid: Sequence[float], seeds: Sequence[int], rec=None,
              *, progress: bool = True) -> study_design.Tuning:
    """The same learning-rate grid for every arm in `arms`, each value scored by validation
    accuracy over the tuning `seeds` (`study_design.tune`: an equal budget)."""
    bar = tqdm(total=len(arms) * len(lr_grid) * len(seeds), desc="tuning", disable=not progress)

    def score(arm, lr, seed):
        res, _ = train_tuned(study, arm, seed, lr)
        bar.update()
        return res.final["test_acc"]  # fit's "test" here is the validation part

    try:
        return study_design.tune(arms, lr_grid, score, seeds, rec=rec, metric="validation_acc",
                                 epsilon=next(iter(study.sigmas)))
    finally:
        bar.close()


def arm_learning_rates(tuning: study_design.Tuning, arms: Sequence[str]) -> dict[str, float]:
    """Each arm's learning rate: its tuned one, or, for an adaptive arm that was not tuned
    (q = 0.6, 0.7 shown beside q = 0.5), that of the tuned adaptive arm of the same style."""
    out = {}
    for arm in arms:
        if arm in tuning.chosen:
            out[arm] = tuning.chosen[arm]
            continue
        spec = parse_arm(arm)
        twin = next((a for a in tuning.chosen if parse_arm(a)["adaptive"] and parse_arm(a)["style"] == spec["style"]),
                    None)
        if not spec["adaptive"] or twin is None:
            raise UserError(f"arm {arm!r} was not tuned; add it to tuned_arms")
        out[arm] = tuning.chosen[twin]
    return out


def pilot_sizing(tuning: study_design.Tuning, comparisons: dict[str, tuple[str, str]],
                 targets: dict[str, float], *, min_seeds: int = 6, max_seeds: int = 40) -> list[dict[str, Any]]:
    """Per pre-registered comparison: the pilot's paired validation differences X - Y at the
    chosen learning rates and the seeds that bring the 95% half-width under the claim's
    target (the paper's effect or margin); `study_design.pilot_sizing`."""
    return study_design.pilot_sizing(tuning, comparisons, targets, min_seeds=min_seeds, max_seeds=max_seeds)


def run_verdict(study: SplitStudy, lrs: dict[str, float], jobs_: Sequence[tuple[str, int]],
                test: study_design.HeldOutTest, rec=None, *, eval_every: int | str | None = "epoch",
                progress: bool = True) -> Runs:
    """Train every (arm, seed) of `jobs_` at its learning rate and evaluate its final model
    once on the held-out test set. Curves are validation accuracy against wall time. Rows per
    run: test_acc, test_loss, wall_time_s, seconds_per_step, epsilon_spent, lr; `threshold`
    rows for adaptive arms. Wall time includes the adaptive threshold updates."""
    eps = next(iter(study.sigmas))
    runs, curves, trajectories = [], [], []
    t_all = time.perf_counter()
    for arm, s in tqdm(list(jobs_), desc="verdict runs", disable=not progress):
        res, ad = train_tuned(study, arm, s, lrs[arm], eval_every=eval_every)
        loss, acc = test.evaluate(res.model, (arm, s))
        extra = ad.time_s if ad is not None else 0.0
        wall = res.history[-1]["wall_time_s"] + extra
        private = res.private
        spent = res.ledger.epsilon() if private else math.inf
        e_col = eps if private else None
        runs.append({"arm": arm, "epsilon": e_col, "seed": s, "lr": lrs[arm], "test_acc": acc, "test_loss": loss,
                     "wall_time_s": wall, "s_per_step": wall / res.steps, "epsilon_spent": spent,
                     "events": res.ledger.events if private else None, "ledger": res.ledger if private else None,
                     "adaptive": ad})
        if rec is not None:
            for metric, value in (("test_acc", acc), ("test_loss", loss), ("wall_time_s", wall),
                                  ("seconds_per_step", wall / res.steps)):
                rec.add(metric, value, method=arm, epsilon=eps if private else math.inf, seed=s, lr=lrs[arm],
                        steps=res.steps)
            if private:
                rec.add("epsilon_spent", spent, method=arm, epsilon=eps, seed=s, steps=res.steps)
        for h in res.history:
            curves.append({"arm": arm, "epsilon": e_col, "seed": s, "step": h["step"], "test_acc": h["test_acc"],
                           "wall_time_s": h["wall_time_s"] + extra * h["step"] / res.steps})
        if ad is not None:
            for row in ad.trajectories():
                trajectories.append({"arm": arm, "epsilon": eps, "seed": s, **row})
                if rec is not None:
                    rec.add("threshold", row["threshold"], method=arm, epsilon=eps, seed=s, step=row["step"],
                            group=row["group"])
    return Runs(runs, curves, trajectories, time.perf_counter() - t_all)


def record_comparisons(rec, runs: Sequence[dict[str, Any]], comparisons: dict[str, tuple[str, str]],
                       seeds: Sequence[int], setting: str) -> list[dict[str, Any]]:
    """Per pre-registered comparison {claim_id: (X, Y)} and seed: the test-accuracy
    difference X - Y as a `test_acc_difference` row tagged with the claim (the report's
    paired verdict). Returns per claim: mean, 95% half-width and seeds."""
    by = {(r["arm"], r["seed"]): r for r in runs}
    eps = next(r["epsilon"] for r in runs if r["epsilon"] is not None)
    out = []
    for claim, (x, y) in comparisons.items():
        pairs = {s: by[(x, s)]["test_acc"] - by[(y, s)]["test_acc"] for s in seeds if (x, s) in by and (y, s) in by}
        d = list(pairs.values())
        for s, v in pairs.items():  # keyed by seed: a seed missing one arm must not shift the others' labels
            rec.add("test_acc_difference", v, method=f"{x} - {y}", epsilon=eps, seed=s, comparison="difference",
                    claim_id=claim, setting=f"test acc of {x} minus {y}; {setting}")
        out.append({"claim": claim, "pair": f"{x} - {y}", "mean": float(np.mean(d)),
                    "halfwidth": study_design.halfwidth(d), "seeds": len(d)})
    return out


WALL_ARMS = (("flat-ghost", "flat", "ghost", None), ("flat-bk", "flat", "auto", None),
             ("layer-adaptive-q0.5", "layer", "ghost", 0.5))


def wall_time_pairs(*, model_name: str, img_size: int, batch_size: int, steps: int, repeats: int, epsilon: float,
                    rec=None, num_classes: int = 10, seed: int = 0, progress: bool = True):
    """B-adaptive-less-wall-time where the second backward costs something: `steps` full
    batches of `batch_size` random images through `model_name` (e.g. resnet18, GroupNorm),
    per repeat the arms interleaved: flat ghost clipping (two backward passes), flat
    book-keeping (`auto`, one pass) and per-layer adaptive clipping (ghost norms, clipped sums
    from the stored activations, one pass, threshold updates included). Returns (per-repeat
    DataFrame of seconds per step, the engine's layer table of each arm). `rec` gets
    `seconds_per_step` rows and per-repeat `wall_time_difference_s` rows (adaptive per-layer
    minus flat ghost, claim B-adaptive-less-wall-time) at `epsilon` (the noise level does not
    change the work)."""
    import pandas as pd

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, img_size, img_size, generator=g)
    y = torch.randint(0, num_classes, (batch_size,), generator=g)
    spec = {"name": model_name, "num_classes": num_classes, "in_chans": 3, "img_size": img_size}
    rows, tables = [], {}
    for r in tqdm(range(repeats), desc="wall time", disable=not progress):
        for name, style, method, q in WALL_ARMS:
            torch.manual_seed(seed)
            model = create_model(**spec)
            common = dict(steps=steps, sample_rate=1.0, noise_multiplier=1.0, seed=seed + r)
            if q is None:
                clip = ClipSpec(max_grad_norm=1.0, method=method, style=style)
                engine = clip.build(model)
                res = fit(model, (x, y), batching=BatchSpec(steps=steps, sample_rate=1.0),
                          privacy=PrivacySpec(noise_multiplier=1.0, track_epsilon=False),
                          clipping=ClipSpec(max_grad_norm=1.0, method=method, style=style, engine=engine),
                          optim=OptimSpec("sgd", 0.01), evaluation=EvalSpec(every=None, progress=False),
                          seed=seed + r)
                extra, table = 0.0, engine.layer_table()
                engine.remove()
            else:
                res, ad = fit_adaptive(model, (x, y), clip_style=style, clip_method=method, target_quantile=q,
                                       optimizer="sgd", lr=0.01, progress=False, track_epsilon=False,
                                       eval_every=steps + 1, **common)
                extra, table = ad.time_s, None
            # first step excluded: the mixed rule decides per layer on the first batch
            h = res.history
            wall = h[-1]["wall_time_s"] + extra
            rows.append({"arm": name, "repeat": r, "s_per_step": wall / steps})
            if table is not None:
                tables[name] = table
    df = pd.DataFrame(rows)
    if rec is not None:
        for row in rows:
            rec.add("seconds_per_step", row["s_per_step"], method=row["arm"], seed=row["repeat"], model=model_name,
                    batch_size=batch_size, study="wall_time")
        wide = df.pivot(index="repeat", columns="arm", values="s_per_step")
        for r_, v in (wide["layer-adaptive-q0.5"] - wide["flat-ghost"]).items():
            rec.add("wall_time_difference_s", float(v * steps), method="layer-adaptive-q0.5 - flat-ghost",
                    epsilon=epsilon, seed=int(r_), comparison="difference", claim_id=CLAIM_WALL_TIME, study="wall_time",
                    setting=f"{model_name} (GroupNorm) at {img_size} px, batch {batch_size}, {steps} steps per repeat, "
                            "per-layer adaptive (one backward pass) minus flat ghost clipping (two backward passes), "
                            "interleaved repeats on the CPU")
    return df, tables
