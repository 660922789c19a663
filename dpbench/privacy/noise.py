"""Gaussian noise from the operating system's CSPRNG, for every private release.

`secure_gaussian` turns `os.urandom` uniforms into standard normals by Box-Muller in
float64. The DP optimizer (`dpbench.training.optimizer`, `secure_rng=True`) and adaptive
clipping's noisy counts (`dpbench.clipping.adaptive`) both draw from it, so it lives below
both of them. Like every floating-point Gaussian sampler it is not a discrete Gaussian: the
known attacks on the low-order bits (Mironov 2012; Jin et al. 2021) are not ruled out.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch


def secure_gaussian(shape: torch.Size | tuple, *, dtype=torch.float32, device="cpu", chunk: int = 1 << 22) -> torch.Tensor:
    """Standard normal samples from os.urandom via Box-Muller in float64.

    Uniforms use 53 random bits each and lie in (0, 1], so log() is finite. Generated in
    chunks to bound the temporary memory for large models.
    """
    numel = int(math.prod(shape))
    out = np.empty(numel, dtype=np.float64)
    scale = 1.0 / (1 << 53)
    pos = 0
    while pos < numel:
        m = min(chunk, numel - pos)
        pairs = (m + 1) // 2
        raw = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64)
        u = ((raw >> np.uint64(11)).astype(np.float64) + 1.0) * scale  # (0, 1]
        u1, u2 = u[:pairs], u[pairs:]
        r = np.sqrt(-2.0 * np.log(u1))
        z = np.concatenate([r * np.cos(2 * math.pi * u2), r * np.sin(2 * math.pi * u2)])
        out[pos:pos + m] = z[:m]
        pos += m
    return torch.from_numpy(out).reshape(tuple(shape)).to(dtype=dtype, device=device)
