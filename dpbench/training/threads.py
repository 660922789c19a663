"""Python threads with one torch thread each, for work that uses extra cores poorly one call at a time."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import torch


def thread_map(fn: Callable[[Any], Any], items: Sequence, workers: int | None = None) -> list:
    """`[fn(item) for item in items]` on `workers` Python threads (default
    `torch.get_num_threads()`) with one torch thread each. torch releases the GIL in its
    kernels, and the work this serves -- eigendecompositions (LAPACK's barely use a second core
    on one matrix), many small products, the optimizer's serial noise generators -- uses extra
    cores poorly one call at a time. Each item
    must draw from its own generators; then the result is the serial loop's, up to how float
    sums round with one BLAS thread instead of several. Serial when workers <= 1 (also inside
    another `thread_map`, where torch runs one thread)."""
    workers = torch.get_num_threads() if workers is None else int(workers)
    if workers <= 1 or len(items) < 2:
        return [fn(item) for item in items]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(fn, items))
    finally:
        torch.set_num_threads(threads)
