"""Adaptive per-group clipping thresholds by private quantile tracking.

He et al. (ICLR 2023, "Exploring the limits of differentially private deep learning with
group-wise clipping") adapt each layer's threshold in the style of Andrew et al. (2021,
"Differentially private learning with adaptive clipping"). For every clipping group k of a
`ClippingEngine` (per layer, per device, named groups, or the single flat group), each step:

1. centred count of the batch's samples under the threshold (the threshold used this step):
   b_k = sum_i (1[||g_i^(k)|| <= C_k] - 1/2) + N(0, sigma_b^2).
   Adding or removing one example changes the sum by exactly 1/2 (sensitivity 1/2; an
   uncentred count would have sensitivity 1 and need twice the noise).
2. fraction under the threshold: bhat_k = b_k / E[B] + 1/2, with E[B] = q n the *expected*
   batch size. The realised size |B| is private, so it cannot be the divisor; in
   expectation b_k / E[B] + 1/2 = (count under - |B|/2) / E[B] + 1/2 ~ count under / E[B],
   the same estimator as Andrew et al.'s uncentred count / E[B].
3. geometric update towards the target quantile q_target with learning rate eta:
   C_k <- C_k * exp(-eta (bhat_k - q_target)): too many samples under -> shrink.
4. optionally, renormalise to a fixed total: C_k <- C_k * C_total / sqrt(sum_j C_j^2), so
   the sensitivity (and the gradient noise) stays constant and only the split adapts.

Privacy (the part that is easy to get wrong). The noisy clipped gradient sum and the K
counts are computed from the *same* Poisson-sampled batch. Together they are one Gaussian
mechanism on that batch: in units of the noise, the gradient moves by at most 1/sigma_g and
each count by 1/(2 sigma_b), so the joint L2 sensitivity is sqrt(sigma_g^-2 + K / (4
sigma_b^2)) = 1/sigma_eff. One step is therefore ONE Poisson-sampled Gaussian with noise
multiplier sigma_eff, and that is what the ledger records. Accounting the gradient and the
counts as two separately sampled mechanisms (`separate_events_epsilon`) pretends that the
counts saw an independent sample; it gives a smaller, wrong epsilon.

To spend exactly the budget of plain DP-SGD with noise multiplier sigma (the accountant's
sigma for the target epsilon), `dpbench.privacy.accounting.split_noise_for_counts` gives the counts
the fraction r of the 1/sigma^2 budget: sigma_g = sigma / sqrt(1 - r) (what the optimizer
must add), sigma_b = sqrt(K) sigma / (2 sqrt(r)); then sigma_eff == sigma.

Only `abadi` clipping (min(1, C/||g||)) has a threshold whose quantile means something;
`automatic` clipping (C/(||g|| + gamma)) rescales every sample, so adaptation is refused.

    adaptive = AdaptiveClipping(engine, noise_multiplier=sigma, expected_batch_size=q * n,
                                target_quantile=0.5, lr=0.2, count_fraction=0.01)
    fit(model, data, batching=..., clipping=ClipSpec(engine=engine),
        privacy=PrivacySpec(noise_multiplier=sigma, gradient_noise_multiplier=adaptive.sigma_g),
        hooks=[adaptive])

or simply `dpbench.training.adaptive.fit_adaptive(model, data, ...)`, which does exactly
that. This module holds only the thresholds and their private tracking; it imports nothing
from the training layer (the tracker reads fit's `StepInfo` by its attributes).
"""

from __future__ import annotations

import math
import secrets
import time
from typing import Any, Mapping

import torch

from dpbench.errors import UserError
from dpbench.privacy import accounting
from dpbench.privacy.noise import secure_gaussian

__all__ = [
    "AdaptiveClipping", "threshold_update", "renormalize", "centered_count",
    "noisy_fractions", "adaptive_noise", "separate_events_epsilon",
]


# ---------------------------------------------------------------------------- the rule


def centered_count(norms: torch.Tensor, threshold: float) -> float:
    """sum_i (1[||g_i|| <= C] - 1/2): sensitivity 1/2 under add/remove one example."""
    norms = torch.as_tensor(norms)
    if norms.numel() == 0:
        return 0.0
    return float((norms <= threshold).sum().item()) - 0.5 * norms.numel()


def noisy_fractions(centered_counts: Mapping[str, float], noise: Mapping[str, float],
                    expected_batch_size: float) -> dict[str, float]:
    """bhat_k = (b_k + noise_k) / E[B] + 1/2 for centred counts b_k (noise already drawn)."""
    eb = float(expected_batch_size)
    return {k: (float(b) + float(noise[k])) / eb + 0.5 for k, b in centered_counts.items()}


def threshold_update(thresholds: Mapping[str, float], fractions: Mapping[str, float],
                     target_quantile: float, lr: float) -> dict[str, float]:
    """Geometric step towards the target quantile: C_k * exp(-lr * (bhat_k - q))."""
    return {k: float(c) * math.exp(-float(lr) * (float(fractions[k]) - float(target_quantile)))
            for k, c in thresholds.items()}


def renormalize(thresholds: Mapping[str, float], total: float) -> dict[str, float]:
    """Rescale the thresholds so that sqrt(sum_k C_k^2) == total (keeps their ratios)."""
    norm = math.sqrt(sum(float(c) ** 2 for c in thresholds.values()))
    return {k: float(c) * float(total) / norm for k, c in thresholds.items()}


_renormalize = renormalize  # AdaptiveClipping's `renormalize` flag shadows the name


# ---------------------------------------------------------------------------- privacy


def adaptive_noise(noise_multiplier: float, num_groups: int, count_fraction: float) -> tuple[float, float]:
    """(sigma_g, sigma_b) for K = num_groups counts taking the fraction r of the budget.

    sigma_g is the gradient's noise multiplier (std sigma_g * C_total, what the optimizer
    adds); sigma_b is the std of each centred count's noise. Checked so that the combined
    one-step mechanism has exactly the multiplier `noise_multiplier` the ledger records.
    """
    sigma_g, sigma_b = accounting.split_noise_for_counts(noise_multiplier, num_groups, count_fraction)
    eff = accounting.combined_noise_multiplier(sigma_g, sigma_b, num_groups)
    if not math.isclose(eff, float(noise_multiplier), rel_tol=1e-9):  # pragma: no cover - a bug guard
        raise RuntimeError(f"noise split is inconsistent: sigma_eff {eff} != sigma {noise_multiplier}")
    return sigma_g, sigma_b


def separate_events_epsilon(sigma_g: float, sigma_b: float, num_groups: int, sample_rate: float, steps: int,
                            delta: float = 1e-5, accountant: str = "rdp") -> float:
    """WRONG ON PURPOSE (for demonstrations and tests): epsilon if the gradient and the K
    counts were accounted as two separately Poisson-sampled Gaussian mechanisms per step.

    K counts of sensitivity 1/2 with std sigma_b are one Gaussian with multiplier
    2 sigma_b / sqrt(K). They were computed from the same sampled batch as the gradient,
    so this accounting understates epsilon; the correct value is
    `epsilon(combined_noise_multiplier(sigma_g, sigma_b, K), q, steps)`.
    """
    sigma_counts = 2.0 * float(sigma_b) / math.sqrt(int(num_groups))
    return accounting.sampled_composition_epsilon(
        [(sigma_g, sample_rate, steps), (sigma_counts, sample_rate, steps)], delta, accountant)


# ---------------------------------------------------------------------------- the callback


class AdaptiveClipping:
    """Per-step private quantile tracking of a ClippingEngine's group thresholds.

    Use it as a `dpbench.training.loop.fit` hook (it reads the per-sample norms of the step's
    logical batch from `StepInfo.norms` and sets the engine's thresholds for the next step),
    or call `update(norms)` yourself after each optimizer step.

    Args:
        engine: the ClippingEngine (clip_fn="abadi"); its groups are tracked.
        noise_multiplier: sigma, the one multiplier the ledger records per step.
        expected_batch_size: q * n, the divisor of the counts (never the realised size).
        target_quantile: q_target in (0, 1): fraction of samples under each threshold.
        lr: eta > 0, the geometric learning rate (0.2 in the paper).
        count_fraction: r in (0, 1), the part of the 1/sigma^2 budget spent on the counts.
        renormalize: keep sqrt(sum C_k^2) fixed at `total` (default: its initial value).
        total: the fixed total for `renormalize`.
        seed: seed of the count-noise generator (None: random); `secure_rng=True` draws the
            noise from the OS CSPRNG instead (dpbench.privacy.noise.secure_gaussian).
        min_threshold: floor on every threshold (all-zero gradients would shrink it forever).
    """

    def __init__(self, engine: Any, noise_multiplier: float, expected_batch_size: float, *,
                 target_quantile: float = 0.5, lr: float = 0.2, count_fraction: float = 0.01,
                 renormalize: bool = False, total: float | None = None, seed: int | None = None,
                 secure_rng: bool = False, min_threshold: float = 1e-6):
        clip_fn = getattr(engine, "clip_fn", "abadi")
        if clip_fn != "abadi":
            raise UserError(f"adaptive thresholds need clip_fn='abadi' (the engine uses {clip_fn!r}): automatic "
                            "clipping rescales every sample, so no quantile of the norms is 'under the threshold'; "
                            "build the engine with clip_fn='abadi' or drop adaptive clipping")
        if not 0.0 < float(target_quantile) < 1.0:
            raise UserError(f"target_quantile must be in (0, 1), got {target_quantile!r} (e.g. 0.5)")
        if not (float(lr) > 0 and math.isfinite(float(lr))):
            raise UserError(f"the threshold learning rate must be > 0, got {lr!r} (e.g. 0.2)")
        if not (float(noise_multiplier) > 0 and math.isfinite(float(noise_multiplier))):
            raise UserError(f"adaptive clipping needs a noise multiplier > 0, got {noise_multiplier!r}")
        if not float(expected_batch_size) > 0:
            raise UserError(f"expected_batch_size must be > 0 (q * n), got {expected_batch_size!r}")
        if not float(min_threshold) > 0:
            raise UserError(f"min_threshold must be > 0, got {min_threshold!r}")
        if secure_rng and seed is not None:
            raise UserError("secure_rng=True draws from the OS and cannot be seeded; drop seed or secure_rng")
        self.engine = engine
        self.groups = list(engine.thresholds)
        if renormalize and len(self.groups) == 1:
            raise UserError("renormalize=True with a single clipping group keeps its threshold fixed; "
                            "use a per-layer/device/groups style or renormalize=False")
        self.noise_multiplier = float(noise_multiplier)
        self.expected_batch_size = float(expected_batch_size)
        self.target_quantile = float(target_quantile)
        self.lr = float(lr)
        self.count_fraction = float(count_fraction)
        self.sigma_g, self.sigma_b = adaptive_noise(self.noise_multiplier, len(self.groups), self.count_fraction)
        self.renormalize = bool(renormalize)
        self.total = float(total) if total is not None else float(engine.sensitivity)
        if self.renormalize and not (self.total > 0 and math.isfinite(self.total)):
            raise UserError(f"the renormalisation total must be > 0, got {total!r}")
        self.secure_rng = bool(secure_rng)
        self.min_threshold = float(min_threshold)
        self._gen = None
        if not self.secure_rng:
            self._gen = torch.Generator().manual_seed(int(seed) if seed is not None else secrets.randbits(62))
        self.steps = 0
        self.time_s = 0.0  # time spent in updates (fit's wall time does not include callbacks)
        self._checked_optimizer = False
        self.history: list[dict[str, Any]] = [self._row(0, self.engine.thresholds, {})]
        if self.renormalize:
            self.engine.set_thresholds(_renormalize(self.engine.thresholds, self.total))
            self.history[0] = self._row(0, self.engine.thresholds, {})

    # -- noise
    def _count_noise(self) -> dict[str, float]:
        k = len(self.groups)
        if self.secure_rng:
            z = secure_gaussian((k,), dtype=torch.float64)
        else:
            z = torch.randn(k, generator=self._gen, dtype=torch.float64)
        return {g: float(v) * self.sigma_b for g, v in zip(self.groups, z)}

    def _row(self, step: int, thresholds: Mapping[str, float], fractions: Mapping[str, float]) -> dict[str, Any]:
        return {"step": step, "thresholds": dict(thresholds), "fractions": dict(fractions),
                "sensitivity": math.sqrt(sum(c * c for c in thresholds.values()))}

    def check_optimizer(self, optimizer: Any) -> None:
        """Refuse an optimizer whose gradient noise is below sigma_g (epsilon would be understated)."""
        s = getattr(optimizer, "noise_multiplier", None)
        if s is not None and float(s) < self.sigma_g * (1 - 1e-9):
            raise UserError(f"the optimizer adds noise multiplier {float(s):.6g} but adaptive clipping spends part "
                            f"of the budget on counts and needs sigma_g = {self.sigma_g:.6g} on the gradient; pass "
                            f"PrivacySpec(gradient_noise_multiplier=adaptive.sigma_g) to dpbench.training.loop.fit")

    # -- the step
    def update(self, norms: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Release the K noisy centred counts of this step's norms and update the thresholds.

        `norms` maps every group to the per-sample norms of the whole logical batch (empty
        tensors for an empty batch: the noisy counts are still released). Returns the new
        thresholds (also set on the engine).
        """
        t0 = time.perf_counter()
        unknown = [g for g in norms if g not in self.groups]
        missing = [g for g in self.groups if g not in norms]
        if unknown or missing:
            raise UserError(f"per-sample norms for groups {sorted(norms)} do not match the engine's groups "
                            f"{self.groups}; build AdaptiveClipping from the engine that clips this model")
        current = self.engine.thresholds
        counts = {g: centered_count(norms[g].detach().float().cpu(), current[g]) for g in self.groups}
        fractions = noisy_fractions(counts, self._count_noise(), self.expected_batch_size)
        new = threshold_update(current, fractions, self.target_quantile, self.lr)
        if self.renormalize:
            new = _renormalize(new, self.total)
        new = {g: max(c, self.min_threshold) for g, c in new.items()}
        self.engine.set_thresholds(new)
        self.steps += 1
        self.history.append(self._row(self.steps, new, fractions))
        self.time_s += time.perf_counter() - t0
        return new

    def __call__(self, info: Any) -> None:
        """`dpbench.training.loop.fit` hook: update from `info.norms` after each private step.

        A step without a private batch (a public step of a plan) releases no counts.
        """
        if not getattr(info, "private", True):
            return
        if not self._checked_optimizer:
            self.check_optimizer(info.optimizer)
            if info.engine is not None and info.engine is not self.engine:
                raise UserError("fit uses a different ClippingEngine than AdaptiveClipping; pass engine= to fit")
            self._checked_optimizer = True
        self.update(info.norms)

    # -- results
    def trajectories(self) -> list[dict[str, Any]]:
        """Tidy rows (step, group, threshold, noisy fraction under it) for plots."""
        rows = []
        for h in self.history:
            for g, c in h["thresholds"].items():
                rows.append({"step": h["step"], "group": g, "threshold": c, "fraction": h["fractions"].get(g)})
        return rows

    def __repr__(self) -> str:
        return (f"AdaptiveClipping(groups={len(self.groups)}, q={self.target_quantile:g}, lr={self.lr:g}, "
                f"r={self.count_fraction:g}, sigma={self.noise_multiplier:.4g}, sigma_g={self.sigma_g:.4g}, "
                f"sigma_b={self.sigma_b:.4g}, renormalize={self.renormalize})")
