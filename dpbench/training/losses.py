"""The per-sample loss every DP training path uses by default.

DP-SGD clips each example's gradient, so the loss must stay per example until the clipping
engine has seen it: `reduction="none"`, shape (B,). One definition here keeps the loop,
the mixing plans, the bench, the diagnostics and the last-layer solvers on the same loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sample_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each example, shape (B,): `F.cross_entropy(..., reduction="none")`."""
    return F.cross_entropy(outputs, targets, reduction="none")
