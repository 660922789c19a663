"""n·epsilon keying: how a small run's privacy regime maps onto ImageNet's (PAPERS.md E).

For a solver that releases sums over n examples with Gaussian noise, what decides accuracy is
the noise relative to the sum, sigma(eps, delta) / n. For small epsilon sigma is close to
proportional to 1/eps, so the regime is set by the product n·eps: a run with n = 200,000 at
eps = 6.4 sees the same relative noise as ImageNet-1k (n = 1,281,167) at eps = 1. Claims of
the last-layer papers are therefore judged per n·eps band (`BANDS`, the same intervals as the
`setting_keys` of references/paper_values.csv), never at our raw epsilon.

Two conversions are given:
- `imagenet_epsilon` (linear): eps_ImageNet = n·eps / n_ImageNet, the keying the claims use;
- `noise_matched_imagenet_epsilon`: the ImageNet epsilon whose Gaussian noise multiplier
  (at ImageNet's delta) gives the same sigma / n as ours; it departs from the linear one at
  large epsilon, where sigma no longer falls like 1/eps. Shown beside the linear one.
"""

from __future__ import annotations

import math
from typing import Sequence

from dpbench.errors import UserError
from dpbench.privacy import accounting

IMAGENET_N = 1_281_167  # ImageNet-1k training images
IMAGENET_DELTA = 8e-7  # the delta of 2211.13403's ImageNet results

# The n·eps bands of the claims (references/paper_values.csv, setting_keys), with the
# ImageNet epsilons they stand for. Lower bounds closed unless stated; (lo_closed, hi_closed).
BANDS = {
    "ImageNet eps < 1": (0.0, float(IMAGENET_N), False, False),
    "ImageNet eps in [1, 10]": (float(IMAGENET_N), 10.0 * IMAGENET_N, True, True),
}


def n_epsilon(n: int, epsilon: float) -> float:
    """The product n·eps (examples times epsilon) that keys every claim."""
    if n < 1 or not epsilon > 0:
        raise UserError(f"n·eps needs n >= 1 and epsilon > 0, got n={n!r}, epsilon={epsilon!r}")
    return float(n) * float(epsilon)


def imagenet_epsilon(n: int, epsilon: float, n_ref: int = IMAGENET_N) -> float:
    """The ImageNet-equivalent epsilon under the linear keying: n·eps / n_ImageNet."""
    return n_epsilon(n, epsilon) / float(n_ref)


def epsilon_for_imagenet(imagenet_eps: float, n: int, n_ref: int = IMAGENET_N) -> float:
    """Our epsilon at n examples that has the same n·eps as ImageNet at `imagenet_eps`."""
    if not imagenet_eps > 0 or n < 1:
        raise UserError(f"need imagenet_eps > 0 and n >= 1, got {imagenet_eps!r}, {n!r}")
    return float(imagenet_eps) * float(n_ref) / float(n)


def epsilon_grid(imagenet_epsilons: Sequence[float], n: int, digits: int = 4) -> list[float]:
    """Our epsilons for a list of ImageNet-equivalent epsilons (linear keying), rounded up to
    `digits` significant digits so that a band's closed lower edge is never missed by rounding."""
    out = []
    for e in imagenet_epsilons:
        v = epsilon_for_imagenet(e, n)
        scale = 10 ** (digits - 1 - math.floor(math.log10(v)))
        out.append(math.ceil(v * scale) / scale)
    return out


def band_of(n: int, epsilon: float) -> str:
    """The name of the n·eps band (`BANDS`) holding (n, epsilon), or "" when none does."""
    v = n_epsilon(n, epsilon)
    for name, (lo, hi, lc, hc) in BANDS.items():
        if (lo < v or (lc and v == lo)) and (v < hi or (hc and v == hi)):
            return name
    return ""


def band_setting(name: str) -> str:
    """The `setting_keys` text of a band (as in references/paper_values.csv)."""
    lo, hi, lc, hc = BANDS[name]
    return f"n*epsilon in {'[' if lc else '('}{lo:.0f}, {hi:.0f}{']' if hc else ')'}"


def noise_matched_imagenet_epsilon(n: int, epsilon: float, delta: float, *, n_ref: int = IMAGENET_N,
                                   delta_ref: float = IMAGENET_DELTA) -> float:
    """The ImageNet epsilon (at `delta_ref`) whose Gaussian noise multiplier, divided by
    n_ImageNet, equals ours divided by n: sigma_ref = sigma(eps, delta) * n_ref / n.

    Any fixed set of equal Gaussian releases composes to one Gaussian, so the match holds for
    every solver that makes a fixed number of unsampled releases (least squares, DP-FC, Newton,
    full-batch DP-SGD)."""
    sigma = accounting.calibrate_common_noise(float(epsilon), 1, float(delta), accountant="pld", tol=1e-4)
    return float(accounting.gaussian_composition_epsilon([sigma * n_ref / n], float(delta_ref), accountant="pld"))


def add_imagenet_axis(ax, n: int, epsilons: Sequence[float], n_ref: int = IMAGENET_N) -> None:
    """A top x axis on a log-epsilon plot showing the ImageNet-equivalent epsilon (linear
    keying, n·eps / n_ImageNet) at the plotted epsilons."""
    import matplotlib.pyplot as plt

    f = float(n) / float(n_ref)
    top = ax.secondary_xaxis("top", functions=(lambda e: e * f, lambda v: v / f))
    top.set_xticks([e * f for e in epsilons], [f"{e * f:.3g}" for e in epsilons], fontsize=7)
    top.xaxis.set_minor_locator(plt.NullLocator())
    top.set_xlabel(f"ImageNet-equivalent ε = n·ε / {n_ref:,} (n = {n:,})")
