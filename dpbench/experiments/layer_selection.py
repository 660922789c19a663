"""Arms, sweeps and tables of notebook 04 (which layers to fine-tune under DP).

Cattan et al. (2022): DP fine-tuning of named trainable subsets of a public backbone at several
epsilons, then the search for the best subset, naive (unaccounted) against Papernot & Steinke's
private selection (accounted). The pieces, in notebook order:

* `resolve_upstream` / `split_public` / `build_backbone` / `prepare`: where the backbone comes
  from and which examples are public (the public and the private examples are always disjoint);
* `finetune` / `run_grid`: DP fine-tuning of every subset at every epsilon (tidy rows);
* `grid_tables` / `best_rows` / `difference_rows`: the tables and claim rows;
* `run_private_selection` / `baseline_rows` / `selection_summary`: the search comparison;
* `plot_*`: the notebook's figures (matplotlib is imported inside them).

Rows are written through `add(metric, value, **columns)`, e.g. a `Recorder.add` with the
backbone's columns bound (`functools.partial`).
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

from dpbench import models as M
from dpbench.data import load_dataset, split_public_private
from dpbench.errors import UserError
from dpbench.privacy import accounting
from dpbench.privacy import selection as tuning
from dpbench.training import mixing
from dpbench.training.loop import BatchSpec, ClipSpec, EvalSpec, OptimSpec, PrivacySpec, evaluate, fit

BACKBONES = ("auto", "upstream", "public", "hub")
CHECKPOINT_NAME = "public_checkpoint.safetensors"  # what notebook 03 writes into its results folder
SELECTIONS = ("poisson", "geometric", "truncated_negative_binomial")


# --------------------------------------------------------------------------- the backbone


def subsets_missing(model: torch.nn.Module, subsets: Sequence[str]) -> dict[str, str]:
    """Requested subsets the model's family does not define (e.g. norms+head for an MLP),
    mapped to the reason."""
    missing = {}
    for s in subsets:
        try:
            M.trainable_subset(model, s)
        except UserError as e:
            missing[s] = str(e)
    return missing


def resolve_upstream(backbone: str, upstream: str | Path | None, *, dataset: str, public_dataset: str = "",
                     upstream_error: str = "") -> tuple[mixing.PublicCheckpointInfo | None, str]:
    """The upstream public checkpoint to use, as (info or None, note why not).

    `upstream`: the upstream notebook's results folder (holding `public_checkpoint.safetensors`),
    or None when it has no successful run (`upstream_error` then says why). Only backbones
    "auto" and "upstream" without a separate `public_dataset` look at it. "upstream" raises
    when the checkpoint is missing or was pretrained on another data set; "auto" returns the
    note instead.
    """
    if backbone not in BACKBONES:
        raise UserError(f"backbone must be auto, upstream, public or hub, got {backbone!r}")
    if backbone not in ("auto", "upstream") or public_dataset:
        return None, ""
    try:
        if upstream is None:
            raise UserError(upstream_error or "the upstream notebook has no results")
        info = mixing.read_public_metadata(Path(upstream) / CHECKPOINT_NAME)
        if info.dataset != dataset:
            raise UserError(f"03's checkpoint was pretrained on {info.dataset}, not {dataset}")
    except UserError as e:
        if backbone == "upstream":
            raise
        return None, str(e)
    return info, ""


def split_public(train: Any, *, dataset: str, upstream_info: mixing.PublicCheckpointInfo | None = None,
                 public_fraction: float = 0.1, seed: int = 0, public_set: Any = None,
                 public_name: str = "") -> tuple[Any, Any, str]:
    """Decide which examples are public: returns (public_set, private_set, description).

    A separate `public_set` (named `public_name`) leaves all of `train` private. Otherwise the
    public examples are those of the upstream checkpoint (its recorded origin indices), or a
    stratified `public_fraction` drawn with `seed`; the private set is the complement within
    `train`, so the two never share an example.
    """
    if public_set is not None:
        return public_set, train, f"{public_name} train ({len(public_set)} examples, a separate data set)"
    if upstream_info is not None:
        pos = upstream_info.private_complement(len(train), train.origin_indices)
        pub_pos = torch.nonzero(torch.isin(train.origin_indices, upstream_info.public_indices)).reshape(-1)
        desc = f"03's {len(pub_pos)} public examples of {dataset} (from the checkpoint's metadata)"
    else:
        pub_pos, pos = split_public_private(train.y, public_fraction=public_fraction, seed=seed)
        desc = f"a stratified {public_fraction:.0%} of {dataset} train ({len(pub_pos)} examples)"
    return train.subset(pub_pos), train.subset(pos), desc


@dataclass
class PublicTraining:
    """How a backbone is pretrained here, non-privately with Adam, when 03's cannot be used."""

    model: str = "small_cnn"
    model_kwargs: dict = field(default_factory=dict)
    epochs: float = 10.0
    batch_size: int = 32
    lr: float = 0.003


def pretrain_public(public_data: Any, num_classes: int, cfg: PublicTraining, *, in_chans: int, img_size: int,
                    seed: int = 0, device: Any = "cpu") -> torch.nn.Module:
    """Non-private Adam on the public data (Poisson batches of `cfg.batch_size`, at most the
    whole set): the fallback backbone. The model is created after `torch.manual_seed(seed)`."""
    torch.manual_seed(seed)
    m = M.create_model(cfg.model, num_classes, in_chans=in_chans, img_size=img_size, **cfg.model_kwargs)
    fit(m, public_data,
        batching=BatchSpec(epochs=cfg.epochs, expected_batch_size=min(cfg.batch_size, len(public_data.y))),
        privacy=None, optim=OptimSpec(optimizer="adam", lr=cfg.lr),
        evaluation=EvalSpec(every=None, progress=True), seed=seed, device=device)  # minutes at the cpu profile
    return m


def build_backbone(backbone: str, *, upstream_info: mixing.PublicCheckpointInfo | None, upstream_note: str,
                   public_set: Any, private_set: Any, dataset: str, num_classes: int, subsets: Sequence[str],
                   public: PublicTraining, in_chans: int, img_size: int, public_dataset: str = "", seed: int = 0,
                   device: Any = "cpu") -> tuple[torch.nn.Module, str]:
    """The model every subset is fine-tuned from, and where it came from (`backbone_source`).

    "hub": timm's pretrained weights of `public.model`. With an upstream checkpoint: that model
    (its loader refuses a private set that overlaps its public examples), unless it lacks a
    requested subset under "auto", when `public.model` is pretrained here on the same public
    examples. Otherwise `public.model` is pretrained here on `public_set`; a public task with
    other classes gets a fresh, zero-initialised head for the private task.
    """
    if backbone == "hub":
        model = M.create_model(public.model, num_classes, in_chans=in_chans, img_size=img_size, pretrained=True,
                               **public.model_kwargs)
        return model, f"timm hub weights of {public.model}"
    kw = dict(in_chans=in_chans, img_size=img_size, seed=seed, device=device)
    if upstream_info is not None:
        candidate, _ = mixing.load_public_checkpoint(upstream_info.path, private_set, dataset=dataset)
        missing = subsets_missing(candidate, subsets)
        if not missing or backbone == "upstream":
            return candidate, f"03 checkpoint ({upstream_info.model.get('name')})"
        why = (f"trained here on 03's public examples: 03's {upstream_info.model.get('name')} checkpoint "
               f"does not define {', '.join(missing)}")
        return pretrain_public(public_set, num_classes, public, **kw), why
    if public_dataset:
        why = f"trained here on {public_dataset}"
    elif backbone == "public":
        why = "trained here (backbone='public')"
    else:
        why = "trained here: no 03 checkpoint (" + (upstream_note.split(";")[0] or "not run") + ")"
    pub_classes = public_set.num_classes
    model = pretrain_public(public_set, pub_classes, public, **kw)
    if pub_classes != num_classes:  # a new head for the private task, zero-initialised
        head = set(M.head_parameter_names(model))
        body = {k: v for k, v in model.state_dict().items() if k not in head}
        model = M.create_model(public.model, num_classes, in_chans=in_chans, img_size=img_size, **public.model_kwargs)
        model.load_state_dict(body, strict=False)
    return model, why


@dataclass
class Setup:
    """Everything the fine-tuning runs share: the backbone, the data parts and the DP-SGD setting."""

    model: torch.nn.Module
    source: str  # backbone_source: where the backbone came from (a column of every row)
    public_desc: str
    public_set: Any
    private_set: Any  # private_train + private_val
    private_train: Any
    private_val: Any
    test: Any
    missing: dict[str, str]  # requested subsets the backbone does not define -> why
    backbone_acc: float  # test accuracy before fine-tuning
    delta: float
    device: Any
    eval_batch_size: int = 512
    steps: int = 0
    sample_rate: float = 0.0
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    max_grad_norm: float = 1.0
    max_physical_batch: int | None = None

    @property
    def n_private(self) -> int:
        """Examples in the private set (fine-tuning + validation): the n of delta's check."""
        return len(self.private_set.y)

    @property
    def n_train(self) -> int:
        """Examples DP fine-tuning samples from."""
        return len(self.private_train.y)

    @property
    def n_val(self) -> int:
        """Validation examples that score the candidates."""
        return len(self.private_val.y)

    def describe(self) -> str:
        """Three printable lines: the backbone, the public and the private examples."""
        return (f"backbone: {self.source}\npublic: {self.public_desc}\n"
                f"private: {self.n_private} examples = {self.n_train} for DP fine-tuning + {self.n_val} validation "
                f"(scores); backbone test accuracy before fine-tuning: {self.backbone_acc:.4f}")


def prepare(*, dataset: str, train: Any, test: Any, backbone: str, upstream: str | Path | None, upstream_error: str = "",
            public_dataset: str = "", data_root: str | None = None, public_fraction: float = 0.1,
            public: PublicTraining | None = None, subsets: Sequence[str] = ("head",), val_fraction: float = 0.2,
            delta: float = 1e-5, epochs: float = 2.0, batch_size: float = 256, optimizer: str = "sgd",
            lr: float = 0.1, momentum: float = 0.9, max_grad_norm: float = 1.0, max_physical_batch: int = 0,
            eval_batch_size: int = 512, seed: int = 0, device: Any = "cpu") -> Setup:
    """The backbone, the public/private/validation parts and the DP-SGD length of notebook 04.

    `upstream`: notebook 03's results folder or None (`upstream_error` says why). The private
    set (everything not public) is split into a fine-tuning part and a validation part
    (`val_fraction`, stratified, seed `seed`) that scores the candidates of the search.
    Every run has q = batch_size / n_train and steps_for_epochs(epochs, q) steps.
    """
    public = public or PublicTraining()
    info, note = resolve_upstream(backbone, upstream, dataset=dataset, public_dataset=public_dataset,
                                  upstream_error=upstream_error)
    separate = load_dataset(public_dataset, "train", data_root=data_root) if public_dataset else None
    public_set, private_set, desc = split_public(train, dataset=dataset, upstream_info=info,
                                                 public_fraction=public_fraction, seed=seed, public_set=separate,
                                                 public_name=public_dataset)
    C, H, _ = train.input_shape
    model, source = build_backbone(backbone, upstream_info=info, upstream_note=note, public_set=public_set,
                                   private_set=private_set, dataset=dataset, num_classes=train.num_classes,
                                   subsets=subsets, public=public, in_chans=C, img_size=H,
                                   public_dataset=public_dataset, seed=seed, device=device)
    if backbone == "hub":
        desc = "the data behind timm's weights (not checked for overlap)"
    model = model.to(device)
    val_pos, tr_pos = split_public_private(private_set.y, public_fraction=val_fraction, seed=seed)
    private_train, private_val = private_set.subset(tr_pos), private_set.subset(val_pos)
    accounting.check_delta(delta, len(private_set.y))
    _, acc0 = evaluate(model, test, eval_batch_size, device)
    q = batch_size / len(private_train.y)
    return Setup(model=model, source=source, public_desc=desc, public_set=public_set, private_set=private_set,
                 private_train=private_train, private_val=private_val, test=test,
                 missing=subsets_missing(model, subsets), backbone_acc=acc0, delta=delta, device=device,
                 eval_batch_size=eval_batch_size, steps=accounting.steps_for_epochs(epochs, q), sample_rate=q,
                 optimizer=optimizer, lr=lr, momentum=momentum, max_grad_norm=max_grad_norm,
                 max_physical_batch=max_physical_batch or None)


def subset_sizes(setup: Setup, subsets: Sequence[str], add: Callable[..., Any], seed: int = 0) -> list[dict]:
    """Tensors and trained parameters of every defined subset (one `trained_params` row each)."""
    rows = []
    for s in subsets:
        if s in setup.missing:
            continue
        names = M.trainable_subset(setup.model, s)
        rows.append({"subset": s, "tensors": len(names), "trained_params": names.num_params,
                     "patterns": " ".join(names.patterns[:4]) + (" ..." if len(names.patterns) > 4 else "")})
        add("trained_params", names.num_params, method=s, seed=seed, study="subsets")
    return rows


# --------------------------------------------------------------------------- DP fine-tuning


def finetune(setup: Setup, subset: str, sigma: float | None, run_seed: int, private: bool = True) -> dict[str, Any]:
    """Fine-tune `subset` of a copy of the backbone (DP-SGD with noise multiplier `sigma`, or
    without DP when not `private`); returns test/validation accuracies, the validation count,
    the trained parameters, epsilon and the run's ledger (None without DP)."""
    m = copy.deepcopy(setup.model)
    names = M.apply_subset(m, subset)
    privacy = None
    if private:
        ledger = accounting.PrivacyLedger(delta=setup.delta, n=setup.n_private)
        privacy = PrivacySpec(noise_multiplier=sigma, delta=setup.delta, ledger=ledger)
    kwargs = {"momentum": setup.momentum} if setup.optimizer == "sgd" else {}
    res = fit(m, setup.private_train,
              batching=BatchSpec(steps=setup.steps, sample_rate=setup.sample_rate,
                                 max_physical_batch=setup.max_physical_batch),
              privacy=privacy, clipping=ClipSpec(max_grad_norm=setup.max_grad_norm),
              optim=OptimSpec(optimizer=setup.optimizer, lr=setup.lr, kwargs=kwargs),
              evaluation=EvalSpec(every=None, progress=False), seed=run_seed, device=setup.device)
    _, test_acc = evaluate(m, setup.test, setup.eval_batch_size, setup.device)
    _, val_acc = evaluate(m, setup.private_val, setup.eval_batch_size, setup.device)
    return {"test_acc": test_acc, "val_acc": val_acc, "val_correct": int(round(val_acc * setup.n_val)),
            "trained_params": names.num_params, "epsilon": res.epsilon, "ledger": res.ledger if private else None}


def noise_multipliers(setup: Setup, epsilons: Sequence[float]) -> dict[float, float]:
    """The DP-SGD noise multiplier reaching each epsilon at the setup's q, steps and delta."""
    return {eps: accounting.noise_multiplier(eps, setup.sample_rate, setup.steps, delta=setup.delta)
            for eps in tqdm(list(epsilons), desc="calibrating sigma", unit="ε")}


def run_grid(setup: Setup, subsets: Sequence[str], epsilons: Sequence[float], seeds: Sequence[int],
             sigmas: dict[float, float], add: Callable[..., Any]) -> list[dict[str, Any]]:
    """DP fine-tune every subset at every epsilon and seed (rows: subset, eps, seed, accuracies,
    epsilon, ...). Undefined subsets are recorded as failed `test_acc` rows."""
    rows = []
    bar = tqdm(total=len(epsilons) * len(seeds) * len(subsets), desc="fine-tuning grid", unit="run")
    for eps in epsilons:
        for s in seeds:
            for subset in subsets:
                bar.update()
                if subset in setup.missing:
                    add("test_acc", None, method=subset, epsilon=eps, seed=s, study="grid", status="failed",
                        reason=setup.missing[subset][:200])
                    continue
                r = finetune(setup, subset, sigmas[eps], s)
                rows.append({"subset": subset, "eps": eps, "seed": s, **{k: v for k, v in r.items() if k != "ledger"}})
                add("test_acc", r["test_acc"], method=subset, epsilon=r["epsilon"], seed=s, study="grid",
                    target_epsilon=eps, trained_params=r["trained_params"], sigma=sigmas[eps], steps=setup.steps,
                    sample_rate=setup.sample_rate)
                add("val_acc", r["val_acc"], method=subset, epsilon=r["epsilon"], seed=s, study="grid",
                    target_epsilon=eps)
    bar.close()
    return rows


def nonprivate_reference(setup: Setup, seeds: Sequence[int], add: Callable[..., Any]) -> float:
    """Mean test accuracy of fine-tuning all layers without DP (recorded at epsilon = inf)."""
    acc = float(np.mean([finetune(setup, "all", None, s, private=False)["test_acc"]
                         for s in tqdm(list(seeds), desc="non-private reference", unit="run")]))
    add("test_acc", acc, method="all (non-private)", epsilon=math.inf, study="reference")
    return acc


# --------------------------------------------------------------------------- tables and claims


def grid_tables(grid, order: Sequence[str]):
    """(mean, sd, best): mean and sd (NaN with one seed) of the test accuracy by subset (rows,
    in `order`) and epsilon (columns), and the best subset per epsilon."""
    mean = grid.pivot_table(index="subset", columns="eps", values="test_acc", aggfunc="mean").reindex(order)
    sd = grid.groupby(["subset", "eps"]).test_acc.std().unstack().reindex(index=order, columns=mean.columns)
    return mean, sd, mean.idxmax(axis=0)


def record_means(mean, sd, sizes, n_seeds: int, add: Callable[..., Any]) -> None:
    """One `test_acc_mean` row per (subset, epsilon) of the heatmap."""
    for s in mean.index:
        for e in mean.columns:
            add("test_acc_mean", mean.loc[s, e], method=s, epsilon=e, study="grid", sd=sd.loc[s, e], n_seeds=n_seeds,
                trained_params=int(sizes.loc[s, "trained_params"]))


# --------------------------------------------------------------------------- the search


def selection_distribution(kind: str, mean: float, eta: float = 1.0) -> tuning.Repetitions:
    """The distribution of K, the number of candidate runs of the private selection."""
    if kind == "poisson":
        return tuning.poisson(mean)
    if kind == "geometric":
        return tuning.repetitions("geometric", mean=mean)
    if kind == "truncated_negative_binomial":
        return tuning.repetitions("truncated_negative_binomial", eta=eta, mean=mean)
    raise UserError(f"selection must be one of {', '.join(SELECTIONS)}, got {kind!r}")


def run_private_selection(setup: Setup, candidates: Sequence[str], epsilons: Sequence[float], seeds: Sequence[int],
                          dist: tuning.Repetitions, score_noise_multiplier: float,
                          add: Callable[..., Any]) -> tuple[list[dict], list[dict]]:
    """Papernot & Steinke's private selection over `candidates` at each target epsilon.

    Each candidate run's DP-SGD noise is calibrated so that the whole selection (K ~ dist runs,
    each also releasing its validation count with Gaussian noise `score_noise_multiplier`)
    costs the target epsilon at delta. Returns (rows, ledgers); an epsilon the calibration
    cannot reach is recorded as failed rows.
    """
    rows, ledgers = [], []
    q, steps, delta, n = setup.sample_rate, setup.steps, setup.delta, setup.n_private
    for eps in tqdm(list(epsilons), desc="private selection", unit="ε"):
        try:
            sigma_sel = tuning.calibrate_selection_noise(eps, q, steps, dist, delta=delta,
                                                         score_noise_multiplier=score_noise_multiplier, n=n)
        except UserError as e:
            for s in seeds:
                add("test_acc", None, method="private selection", epsilon=eps, seed=s, study="selection",
                    status="failed", reason=str(e)[:200])
            print(f"eps {eps:g}: private selection impossible: {e}")
            continue
        base = tuning.dpsgd_base(sigma_sel, q, steps, score_noise_multiplier=score_noise_multiplier, delta=delta, n=n)
        for s in seeds:
            rng = np.random.default_rng([s, int(eps * 1000), 4])

            def run(subset: str, i: int, s: int = s, rng: np.random.Generator = rng) -> dict[str, Any]:
                """Candidate run i: DP fine-tuning, then its noisy validation score (a second release)."""
                r = finetune(setup, subset, sigma_sel, s * 1000 + i + 1)
                r["ledger"].record_gaussian(score_noise_multiplier, 1, label="validation score")
                r["score"] = tuning.noisy_accuracy(r["val_correct"], setup.n_val, score_noise_multiplier, rng=rng)
                return r

            res = tuning.private_selection(candidates, run, dist, base=base, delta=delta,
                                           seed=s * 1000 + list(epsilons).index(eps), n=n, progress=False)
            ledgers.append({"target_epsilon": eps, "seed": s, **res.privacy.to_dict()})
            chosen = res.best["candidate"] if res.best else None
            rows.append({"eps": eps, "seed": s, "method": "private selection", "epsilon": res.epsilon, "K": res.k,
                         "chosen": chosen, "test_acc": res.best["test_acc"] if res.best else np.nan,
                         "sigma": sigma_sel, "base_epsilon": res.privacy.base_epsilon})
            add("test_acc", res.best["test_acc"] if res.best else None, method="private selection",
                epsilon=res.epsilon, seed=s, study="selection", target_epsilon=eps, chosen=chosen or "", runs=res.k,
                sigma=sigma_sel, per_run_epsilon=res.privacy.base_epsilon,
                score_noise_multiplier=score_noise_multiplier, status="ok" if res.best else "failed",
                reason="" if res.best else ("K = 0 candidate runs were drawn: the selection output nothing "
                                            "(its cost is still paid)"),
                **dist.describe())
    return rows, ledgers


def baseline_rows(setup: Setup, grid, sigmas: dict[float, float], default_subset: str,
                  add: Callable[..., Any]) -> list[dict]:
    """The naive search (the subset with the best *clean* validation accuracy, claiming eps;
    its training runs alone compose to `composed_epsilon`) and the fixed `default_subset`
    (no search, exactly eps), per (eps, seed) of the grid."""
    rows = []
    q, steps, delta = setup.sample_rate, setup.steps, setup.delta
    for (eps, s), g in grid.groupby(["eps", "seed"]):
        pick = g.loc[g.val_acc.idxmax()]
        composed = tuning.composition_epsilon(accounting.dpsgd_event(sigmas[eps], q, steps), len(g), delta=delta,
                                              n=setup.n_private)
        rows.append({"eps": eps, "seed": s, "method": "naive search", "epsilon": eps, "K": len(g),
                     "chosen": pick.subset, "test_acc": pick.test_acc, "sigma": sigmas[eps],
                     "composed_epsilon": composed})
        add("test_acc", pick.test_acc, method="naive search", epsilon=eps, seed=s, study="selection",
            target_epsilon=eps, chosen=pick.subset, runs=len(g), composed_training_epsilon=composed,
            reason="claims eps; clean validation scores are not DP, and its training runs alone compose to "
                   "composed_training_epsilon")
        if default_subset in set(g.subset):
            fixed = g[g.subset == default_subset].iloc[0]
            rows.append({"eps": eps, "seed": s, "method": f"fixed: {default_subset}", "epsilon": eps, "K": 1,
                         "chosen": default_subset, "test_acc": fixed.test_acc, "sigma": sigmas[eps]})
            add("test_acc", fixed.test_acc, method=f"fixed: {default_subset}", epsilon=eps, seed=s,
                study="selection", target_epsilon=eps, chosen=default_subset)
    return rows


def selection_summary(sel):
    """Mean test accuracy, sd, epsilon, sigma and runs per (method, eps) of the search comparison."""
    summary = sel.groupby(["method", "eps"], sort=False).agg(test_acc=("test_acc", "mean"), sd=("test_acc", "std"),
                                                             epsilon=("epsilon", "max"), sigma=("sigma", "first"),
                                                             runs=("K", "mean"))
    if "composed_epsilon" in sel:
        summary["naive_composed_eps"] = sel.groupby(["method", "eps"], sort=False).composed_epsilon.first()
    return summary


# --------------------------------------------------------------------------- figures


def plot_heatmap(ax, mean, best, title: str):
    """Mean test accuracy by subset and epsilon; the best subset of each column boxed."""
    import matplotlib.pyplot as plt

    order = list(mean.index)
    im = ax.imshow(mean.values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(mean.columns)), [f"{e:g}" for e in mean.columns])
    ax.set_yticks(range(len(order)), order)
    ax.set_xlabel("ε")
    ax.set_ylabel("trained subset")
    ax.set_title(title)
    for i, s in enumerate(order):
        for j, e in enumerate(mean.columns):
            v = mean.loc[s, e]
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=8,
                    color="white" if v < np.nanmean(mean.values) else "black",
                    fontweight="bold" if best[e] == s else "normal")
            if best[e] == s:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=2))
    return im


def plot_accuracy_vs_params(ax, mean, sd, trained_params, n_seeds: int | None = None) -> None:
    """Accuracy per subset, the subsets ordered by their number of trained parameters (a tick
    each, named with its count, so subsets of equal size stay apart), one colour per epsilon
    dodged sideways; whiskers ± 1 sd over the seeds."""
    order = sorted(mean.index, key=lambda k: (float(trained_params.loc[k]), k))
    width = 0.8 / max(len(mean.columns), 1)
    for j, e in enumerate(mean.columns):
        xs = [i + (j - (len(mean.columns) - 1) / 2) * width for i in range(len(order))]
        ax.errorbar(xs, mean.loc[order, e], yerr=sd.loc[order, e].fillna(0), marker="o", ls="", capsize=3,
                    label=f"ε={e:g}")
    ax.set_xticks(range(len(order)), [f"{s} ({_count(trained_params.loc[s])})" for s in order], rotation=25,
                  ha="right", rotation_mode="anchor")
    ax.set_xlabel("trained subset (trained parameters), smallest first")
    ax.set_ylabel("test accuracy" + (f" (mean ± 1 sd, {n_seeds} seed{'s' if n_seeds != 1 else ''})"
                                     if n_seeds else " (mean ± 1 sd over seeds)"))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _count(n) -> str:
    n = float(n)
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}k" if n >= 1e3 else f"{n:.0f}"


def plot_selection(ax, sel, epsilons: Sequence[float]) -> None:
    """Test accuracy against the claimed total epsilon: private selection, naive search (with
    the epsilon its runs really compose to) and the fixed subset."""
    n_seeds = sel["seed"].nunique() if "seed" in sel else None
    for method, g in sel.groupby("method", sort=False):
        st = g.groupby("eps").test_acc.agg(["mean", "std"])
        label = method
        if method == "naive search":  # what its runs really compose to, in the legend (annotations crowd the lines)
            composed = g.groupby("eps").composed_epsilon.first()
            label += " (claims ε, not DP; its runs compose to ε = " + ", ".join(f"{v:.3g}" for v in composed) + ")"
        ax.errorbar(st.index, st["mean"], yerr=st["std"].fillna(0), marker="o", capsize=3,
                    ls="--" if method == "naive search" else "-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(epsilons), [f"{e:g}" for e in epsilons])
    ax.minorticks_off()
    ax.set_xlabel("total ε of the published model (as claimed)")
    ax.set_ylabel("test accuracy" + (f" (mean ± 1 sd, {n_seeds} seed{'s' if n_seeds != 1 else ''})" if n_seeds else ""))
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22))
