"""TF32 off around the clipping engine's own arithmetic (a no-op on the CPU).

On Ampere and later GPUs, cuDNN convolutions (and matmuls, when enabled) may round float32
inputs to TF32 (10-bit mantissa). If a per-sample norm is computed one way (a ghost norm by
matmuls) and the clipped sum another (a weight-gradient convolution), the two disagree by
about 1e-3 and a sample's clipped contribution can exceed C by about 0.1%: the sensitivity
the noise is calibrated to no longer holds. The engine therefore runs its rules (norms,
clipped sums) with TF32 off, and restores the caller's settings afterwards, through the
API the caller used (the legacy `allow_tf32` flags, or the newer `fp32_precision`
settings): torch refuses a mix of the two.
"""

from __future__ import annotations

import contextlib

import torch


def _flags():
    """(legacy holder, new-API holder) for cuBLAS matmuls and cuDNN convolutions."""
    b = torch.backends
    return ((b.cuda.matmul, b.cuda.matmul), (b.cudnn, getattr(b.cudnn, "conv", None)))


def _turn_off(legacy, new):
    """Turn TF32 off on one backend; return how to restore it (None when it was off).

    Through the API the caller used: torch raises (here, in torch.compile, in CUDA kernels'
    flag checks) once the legacy and the new settings disagree. The legacy flag is readable
    while they agree; then its setter keeps both in step (it sets the new one to "none",
    torch's own "not TF32"). Otherwise the new API is in use: "ieee", restored after.
    """
    try:
        on = legacy.allow_tf32
    except RuntimeError:  # the new fp32_precision API was used
        old = new.fp32_precision
        if old == "ieee":
            return None
        new.fp32_precision = "ieee"
        return new, "fp32_precision", old
    if not on:
        return None
    legacy.allow_tf32 = False
    return legacy, "allow_tf32", True


@contextlib.contextmanager
def no_tf32():
    """Inside: float32 matmuls and convolutions in full float32 precision; restored after (also on error)."""
    saved = [s for s in (_turn_off(legacy, new) for legacy, new in _flags()) if s is not None]
    try:
        yield
    finally:
        for holder, attr, value in reversed(saved):
            setattr(holder, attr, value)
