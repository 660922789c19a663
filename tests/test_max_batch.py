"""The largest-batch search of the bench (doubling, then bisection) against a fake
out-of-memory error: no GPU needed, the step function fails above a chosen threshold."""

from __future__ import annotations

import pytest
import torch

from dpbench.errors import UserError
from dpbench.training.bench import Cell, _max_batches, is_out_of_memory, largest_batch


def fake_step(threshold, error="cuda", calls=None):
    """A step that runs up to `threshold` and raises an out-of-memory error above it."""

    def fits(b):
        if calls is not None:
            calls.append(b)
        if b > threshold:
            if error == "cuda":
                raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {b} MiB")
            raise RuntimeError(f"[enforce fail at alloc_cpu.cpp:83] DefaultCPUAllocator: out of memory: {b}")

    return fits


@pytest.mark.parametrize("error", ["cuda", "runtime"])
@pytest.mark.parametrize("threshold", [1, 2, 3, 255, 256, 257, 1000, 1500, 3150, 32767])
def test_bisection_finds_the_threshold_exactly(threshold, error):
    calls = []
    best, note = largest_batch(fake_step(threshold, error, calls), start=64, limit=32768)
    assert best == threshold and note == ""
    # doubling then bisection: logarithmic, never a linear scan
    assert len(calls) <= 2 * (threshold.bit_length() + 8)
    assert len(set(calls)) == len(calls)  # no size probed twice


def test_relative_tolerance_stops_early_but_never_overshoots():
    calls = []
    best, _ = largest_batch(fake_step(3150, calls=calls), start=256, limit=32768, rel_tol=1 / 32)
    assert 3150 * (1 - 1 / 32) <= best <= 3150
    exact = []
    largest_batch(fake_step(3150, calls=exact), start=256, limit=32768)
    assert len(calls) < len(exact)


def test_nothing_fits_and_limit_reached():
    assert largest_batch(fake_step(0), start=16, limit=1024) == (None, "")
    best, note = largest_batch(fake_step(10**9), start=16, limit=1000)
    assert best == 1000 and "limit 1000" in note


def test_other_errors_are_not_taken_for_out_of_memory():
    def broken(b):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    with pytest.raises(RuntimeError, match="shapes"):
        largest_batch(broken, start=8, limit=64)
    with pytest.raises(UserError):
        largest_batch(fake_step(4), start=0, limit=64)


def test_max_batches_without_cuda_fills_both_fields(monkeypatch):
    # On the CPU the cap cannot be set: both fields are the whole device's, from the same search.
    import dpbench.training.bench as bench

    monkeypatch.setattr(bench, "_max_batch", lambda cell, ref, dev: 48)
    cell = Cell(model="tiny_cnn", resolution=16, batch_size=8, method="mixed", max_batch=True, max_batch_cap_gb=16.0)
    out = _max_batches(cell, torch.nn.Linear(2, 2), torch.device("cpu"))
    assert out == {"max_batch_size": 48, "max_batch_size_card": 48}


def test_a_cell_out_of_memory_at_its_batch_still_gets_its_largest_batch(monkeypatch):
    # Opacus at batch 256 runs out of memory in the paper; its largest batch (~170) is still a result.
    import dpbench.training.bench as bench

    real = bench.make_step

    def make_step(method, model, x, y, style="flat"):
        step, cleanup = real(method, model, x, y, style=style)

        def limited():
            if x.shape[0] > 5:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
            step()

        return limited, cleanup

    monkeypatch.setattr(bench, "make_step", make_step)
    cell = Cell(model="tiny_cnn", resolution=8, batch_size=8, method="mixed", repeats=1, warmup=1, max_batch=True)
    row = bench.run_cell(cell)
    assert row["status"] == "failed" and "out of memory" in row["reason"]
    assert row["max_batch_size"] == 5 and row["max_batch_size_card"] == 5
    ok = bench.run_cell(Cell(model="tiny_cnn", resolution=8, batch_size=4, method="mixed", repeats=1, warmup=1,
                             max_batch=True))
    assert ok["status"] == "ok" and ok["max_batch_size"] == 5
