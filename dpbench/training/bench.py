"""Speed and memory of DP training steps: dpbench's methods beside Opacus and non-private.

`dpbench bench --profile cpu|gpu` (and notebook 01) measures, for each model of a profile,
one full training step (forward, per-sample clipping, noise, optimizer step) of:
non-private SGD, Opacus hooks, Opacus ghost clipping, and dpbench's instantiate, ghost,
mixed and bk methods. One row per (model, resolution, batch size, method).

How it measures:
- Time: each cell's steps alternate with non-private steps on an identical copy of the
  model (baseline, method, baseline, method, ...); `step_time_s` is the median method step
  and `ratio_to_nonprivate` the median of the per-pair ratios, so drifts in machine load
  hit both sides of every ratio.
- Peak memory: every cell runs in a fresh child process (`python -m dpbench.training.bench --cell
  ...`), because a process's resident-set peak only ever rises. On CPU `peak_mem_mb` is the
  child's raw peak RSS (VmHWM, or ru_maxrss where /proc is missing). It includes the
  interpreter and the libraries (about 0.7-0.9 GB for a CUDA build of torch), so the child
  first imports what the cell needs, resets the high-water mark (/proc/self/clear_refs) and
  records that RSS as `base_rss_mb`; `step_mem_mb = peak_mem_mb - base_rss_mb` is what the
  model, data and training step add. On GPU both are torch.cuda.max_memory_allocated after
  a reset. Memory is taken before the baseline copy is built, so it is the method's alone.
  `mem_ratio_to_nonprivate` is step_mem_mb over the non-private cell's of the same model.
  `steady_mem_mb` is the same for one more step after the warm-up, on its own (peak reset
  first): the steady state, without the first step's one-off self-checks and measurements;
  `steady_mem_ratio` is it over the non-private cell's.
- Live-tensor memory: RSS also counts freed memory that the C allocator keeps (glibc holds
  on to freed heap pages, so a step's RSS peak depends on what ran before it). `live_mem_mb`
  is one more step's peak of live tensor bytes, model, gradients and data included: the CPU's
  counterpart of torch.cuda.max_memory_allocated (`live_peak_mb`: the tensors live before the
  step plus torch.profiler's allocation events; on GPU the CUDA allocator's own counters).
  `live_mem_ratio` is it over the non-private cell's. Valid in-process too (`--no-isolate`).
- In-process probe: `peak_extra_mb(fn, device)` is the one memory probe for a single call
  inside a running process (notebooks 01 and 02): the peak above what was live before it.
- A cell that fails (e.g. Opacus on timm's resnet18) is a row with status "failed" and the
  exception's one-line reason: never dropped.
- gpu profile: also the largest batch that runs (`largest_batch`: doubling, then bisection to
  within MAX_BATCH_REL_TOL), under a memory cap that emulates a smaller card
  (`max_batch_cap_gb`, via torch.cuda.set_per_process_memory_fraction: `max_batch_size`) and on
  the whole card (`max_batch_size_card`).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from dpbench.atomic import write_json_atomic
from dpbench.clipping import ClippingEngine
from dpbench.errors import EXIT_USER_ERROR, UserError
from dpbench.models import create_model
from dpbench.training.losses import per_sample_cross_entropy
from dpbench.training.optimizer import DPOptimizer

NONPRIVATE = "nonprivate"
OPACUS_METHODS = ("opacus_hooks", "opacus_ghost")
DPBENCH_METHODS = ("instantiate", "ghost", "mixed", "bk")
METHODS = (NONPRIVATE,) + OPACUS_METHODS + DPBENCH_METHODS
EXTRA_METHODS = ("auto",)  # accepted on request, not in the default set

ROW_KEYS = (
    "model", "resolution", "batch_size", "method", "style", "step_time_s", "peak_mem_mb", "ratio_to_nonprivate",
    "step_mem_mb", "mem_ratio_to_nonprivate", "baseline_step_time_s", "base_rss_mb", "peak_reset",
    "max_batch_size", "max_batch_size_card", "max_batch_cap_gb", "status", "reason", "device", "profile", "repeats", "threads", "torch_version",
    "pair_ratios", "steady_mem_mb", "steady_mem_ratio", "live_mem_mb", "live_mem_ratio",
)
_RESULT_MARK = "DPBENCH_CELL_RESULT "

# (model, resolution, batch size) per profile
PROFILES: dict[str, dict[str, Any]] = {
    "quick": {"models": [("tiny_cnn", 16, 8)], "repeats": 2, "warmup": 1, "device": "cpu", "max_batch": False},
    "cpu": {
        "models": [("small_cnn", 32, 64), ("vit_tiny_patch16_224", 64, 64), ("resnet18", 32, 64)],
        "repeats": 5, "warmup": 2, "device": "cpu", "max_batch": False,
    },
    "gpu": {
        "models": [
            ("resnet18", 32, 256), ("resnet18", 224, 64), ("resnet50", 32, 256), ("resnet50", 224, 64),
            ("vgg11", 32, 256), ("vgg16", 32, 256),
            ("vit_small_patch16_224", 224, 64), ("vit_base_patch16_224", 224, 64),
        ],
        "repeats": 10, "warmup": 3, "device": "cuda", "max_batch": True,
    },
}
MAX_BATCH_LIMIT = {32: 32768, 64: 8192, 224: 4096}
MAX_BATCH_REL_TOL = 1 / 32  # bisection stops within ~3% of the largest batch: each probe is a full step


@dataclass
class Cell:
    """One measurement: a model at a resolution and batch size, under one method."""

    model: str
    resolution: int
    batch_size: int
    method: str
    device: str = "cpu"
    repeats: int = 5
    warmup: int = 2
    num_classes: int = 10
    seed: int = 0
    max_batch: bool = False
    max_batch_cap_gb: float = 0.0  # > 0: the largest batch under this much CUDA memory too (a 16 GB card)
    profile: str = ""
    isolated: bool = False  # True in a child process: CPU peak memory is meaningful
    style: str = "flat"  # clipping style of dpbench's methods: flat, layer (per-layer, He et al.), ...


# ---------------------------------------------------------------------------- models
class TinyCNN(nn.Module):
    """A few-thousand-parameter conv net (Conv2d, GroupNorm, Linear) for the quick profile."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, width, 3, padding=1)
        self.norm = nn.GroupNorm(2, width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        x = F.relu(self.norm(self.conv(x)))
        return self.head(x.mean(dim=(2, 3)))


def build_model(name: str, resolution: int, num_classes: int = 10) -> nn.Module:
    """`tiny_cnn`, or any name `dpbench.models.create_model` knows (GroupNorm, random head)."""
    if name == "tiny_cnn":
        return TinyCNN(num_classes)
    return create_model(name, num_classes, in_chans=3, img_size=resolution, norm="group", zero_head=False)


# ---------------------------------------------------------------------------- steps
def make_step(method: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
              max_grad_norm: float = 1.0, noise_multiplier: float = 1.0, lr: float = 1e-3,
              style: str = "flat") -> tuple[Callable[[], None], Callable[[], None]]:
    """A closure running one full training step of `method` on (x, y), and a cleanup.

    Every private method clips per sample at `max_grad_norm`, adds Gaussian noise and
    steps SGD, so the steps do the same work as in training. `style` is the clipping style
    of dpbench's methods ("layer": per-layer thresholds C/sqrt(K)); Opacus and non-private
    steps ignore it.
    """
    B = x.shape[0]
    if method == NONPRIVATE:
        opt = torch.optim.SGD(model.parameters(), lr=lr)

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        return step, lambda: None

    if method in OPACUS_METHODS:
        try:
            from opacus import PrivacyEngine
        except ImportError as e:
            raise RuntimeError(f"opacus is not installed ({e}); pip install 'dpbench[bench]'") from e
        # Opacus warns about its insecure RNG and, on every step, about full backward
        # hooks firing on inputs that need no gradient: neither matters for a timing.
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        # Opacus's module hooks break on in-place activations (timm's ResNets and VGGs use
        # ReLU(inplace=True): "Output 0 of BackwardHookFunction is a view and is being modified
        # inplace"), so its copy of the model computes them out of place (a little more memory).
        for m in model.modules():
            if getattr(m, "inplace", None) is True:
                m.inplace = False
        loader = DataLoader(TensorDataset(x, y), batch_size=B)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = PrivacyEngine(accountant="rdp")
            if method == "opacus_hooks":
                module, dp_opt, _ = engine.make_private(
                    module=model, optimizer=opt, data_loader=loader, noise_multiplier=noise_multiplier,
                    max_grad_norm=max_grad_norm, poisson_sampling=False, grad_sample_mode="hooks")

                def step():
                    dp_opt.zero_grad(set_to_none=True)
                    F.cross_entropy(module(x), y).backward()
                    dp_opt.step()
            else:
                module, dp_opt, criterion, _ = engine.make_private(
                    module=model, optimizer=opt, data_loader=loader, criterion=nn.CrossEntropyLoss(),
                    noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, poisson_sampling=False,
                    grad_sample_mode="ghost")

                def step():
                    dp_opt.zero_grad(set_to_none=True)
                    criterion(module(x), y).backward()
                    dp_opt.step()

        def cleanup():
            if hasattr(module, "_close"):
                module._close()

        return step, cleanup

    if method in DPBENCH_METHODS + EXTRA_METHODS:
        engine = ClippingEngine(model, max_grad_norm=max_grad_norm, method=method, style=style)
        dp_opt = DPOptimizer(torch.optim.SGD(engine.trainable_parameters(), lr=lr), engine, noise_multiplier, B, seed=0)

        def step():
            dp_opt.zero_grad()
            dp_opt.backward(per_sample_cross_entropy(model(x), y))
            dp_opt.step()

        return step, engine.remove

    raise UserError(f"unknown method {method!r}; use one of {', '.join(METHODS + EXTRA_METHODS)}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step: Callable[[], None], device: str | torch.device = "cpu") -> float:
    """Wall-clock seconds of one call of `step`, synchronising the GPU on both sides."""
    dev = torch.device(device)
    _sync(dev)
    t0 = time.perf_counter()
    step()
    _sync(dev)
    return time.perf_counter() - t0


def interleaved_times(baseline: Callable[[], None], method: Callable[[], None], repeats: int,
                      device: str | torch.device = "cpu") -> tuple[list[float], list[float]]:
    """Alternate baseline and method steps `repeats` times; returns both lists of seconds."""
    tb, tm = [], []
    for _ in range(repeats):
        tb.append(time_step(baseline, device))
        tm.append(time_step(method, device))
    return tb, tm


def _proc_status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    """Peak RSS of this process in MB: VmHWM where /proc has it, else ru_maxrss."""
    hwm = _proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def _malloc_trim() -> None:
    """Return freed heap pages to the system (glibc), so that an earlier call's freed memory
    does not hide the next call's peak; a no-op where libc has no malloc_trim."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_extra_mb(fn: Callable[[], Any], device: str | torch.device = "cpu") -> float | None:
    """Extra memory (MB) that `fn()` needs at its peak, above what was live before the call.

    The one in-process memory probe (the bench's cells measure whole child processes
    instead). CUDA: `torch.cuda.max_memory_allocated` after a reset, minus the memory
    allocated before. CPU (Linux): growth of the resident-set high-water mark (VmHWM) over
    the RSS before the call, after garbage collection, `malloc_trim` and a reset of the mark
    through /proc/self/clear_refs; coarse (a few MB of noise). Returns None where the mark
    cannot be reset or read (no /proc). `fn`'s result is dropped before measuring.
    """
    dev = torch.device(device)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        out = fn()
        torch.cuda.synchronize(dev)
        del out
        return (torch.cuda.max_memory_allocated(dev) - before) / 2**20
    _malloc_trim()
    if not _reset_peak_rss():
        return None
    before = _proc_status_mb("VmRSS")
    out = fn()
    del out
    peak = _proc_status_mb("VmHWM")
    return None if before is None or peak is None else max(0.0, peak - before)


def _live_cpu_tensor_bytes() -> int:
    """Bytes of the CPU storages of every tensor the garbage collector can see (each storage once)."""
    seen, total = set(), 0
    objs = gc.get_objects()  # containers; a tensor is found through what refers to it
    for obj in [*objs, *(r for o in objs for r in gc.get_referents(o))]:
        # type(), not isinstance(): the latter reads __class__, which deprecated lazy objects warn on
        if issubclass(type(obj), torch.Tensor) and obj.device.type == "cpu" and obj.layout == torch.strided:
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def live_peak_mb(fn: Callable[[], Any], device: str | torch.device = "cpu") -> float | None:
    """Peak MB of live tensor memory on `device` while `fn()` runs: everything live, the
    model, its gradients and the data included, like torch.cuda.max_memory_allocated.

    CUDA: torch.cuda.max_memory_allocated after a reset, on a second call. CPU: the tensors
    live before the call (found through the garbage collector) plus the running sum of
    torch.profiler's allocation events (profile_memory=True) during it. Two calls run under
    the profiler and the second is measured, so that every block it frees was allocated under
    the profiler and has a known size. Unlike the RSS it ignores freed memory that the C
    allocator keeps. None where the profiler recorded nothing (another one was running).
    """
    dev = torch.device(device)
    gc.collect()
    if dev.type == "cuda":
        fn()
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) / 2**20
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
        gc.collect()
        before = _live_cpu_tensor_bytes()
        with record_function("dpbench::measured_call"):
            fn()
    events = prof.profiler.kineto_results.events()
    mark = next((e for e in events if e.name() == "dpbench::measured_call"), None)
    if mark is None:
        return None
    start, end = mark.start_ns(), mark.start_ns() + mark.duration_ns()
    cpu = torch.autograd.DeviceType.CPU
    live = peak = before
    for e in sorted((e for e in events if e.name() == "[memory]" and e.device_type() == cpu
                     and start <= e.start_ns() < end), key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def _preimport(cell: "Cell") -> None:
    """Import the libraries a cell uses before the memory baseline, so that their code and
    tables count in base_rss_mb rather than in the method's memory."""
    names = ["dpbench.training.optimizer", "dpbench.clipping"]
    if cell.model != "tiny_cnn":
        names += ["timm", "dpbench.models"]
    if cell.method in OPACUS_METHODS:
        names += ["opacus"]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # the cell itself reports the failure
    # The first forward/backward pass and the first optimizer (which imports torch._dynamo,
    # ~150 MB) cost memory once per process; pay for them on a throwaway net so that they
    # do not count as the method's memory.
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(144, 2))
    F.cross_entropy(net(torch.randn(2, 3, 8, 8)), torch.tensor([0, 1])).backward()
    torch.optim.SGD(net.parameters(), lr=0.0).step()


def _reason(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    first = msg[0] if msg else ""
    return f"{type(exc).__name__}: {first}"[:300]


def _batch(cell: Cell, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(cell.seed)
    x = torch.randn(batch_size, 3, cell.resolution, cell.resolution, generator=g)
    y = torch.randint(0, cell.num_classes, (batch_size,), generator=g)
    return x.to(device), y.to(device)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` says the device ran out of memory (CUDA's OutOfMemoryError, or a
    RuntimeError saying "out of memory", as older torch and other backends raise)."""
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    return (bool(oom) and isinstance(exc, oom)) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def largest_batch(fits: Callable[[int], Any], start: int, limit: int,
                  rel_tol: float = 0.0) -> tuple[int | None, str]:
    """Largest batch b <= limit for which `fits(b)` returns without an out-of-memory error,
    assuming that memory grows with b: doubling from `start` up to the first failure, then
    bisection between the last batch that ran and the first that did not, until they are
    within `rel_tol` of each other (0: exact). Returns (b or None when not even 1 runs, and a
    note: "" or why the search stopped). Any other exception propagates: it is a bug, not a size."""
    if start < 1 or limit < 1:
        raise UserError(f"largest_batch needs start >= 1 and limit >= 1, got {start} and {limit}")

    def ok(b: int) -> bool:
        try:
            fits(b)
            return True
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            return False

    lo, hi = 0, None  # lo runs (0: none known), hi does not
    b = min(start, limit)
    while hi is None:
        if ok(b):
            lo = b
            if b >= limit:
                return lo, f"reached the search limit {limit}"
            b = min(2 * b, limit)
        else:
            hi = b
    while hi - lo > max(1, int(lo * rel_tol)):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return (lo or None), ""


def _max_batch(cell: Cell, reference: nn.Module, device: torch.device) -> int | None:
    """Largest batch whose step runs (see `largest_batch`); None if none does."""

    def fits(b: int) -> None:
        model = step = cleanup = None
        try:
            model = copy.deepcopy(reference).to(device)
            x, y = _batch(cell, b, device)
            step, cleanup = make_step(cell.method, model, x, y, style=cell.style)
            step()
            step()
        finally:
            if cleanup is not None:
                cleanup()
            del model, step
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    best, _ = largest_batch(fits, cell.batch_size, MAX_BATCH_LIMIT.get(cell.resolution, 4096), MAX_BATCH_REL_TOL)
    return best


def _max_batches(cell: Cell, reference: nn.Module, device: torch.device) -> dict[str, Any]:
    """The row's max-batch fields: under `cell.max_batch_cap_gb` of CUDA memory (when set, on
    CUDA) and on the whole card. The cap only limits torch's allocator (the CUDA context is
    outside it), so it emulates a card of that size from above."""
    out: dict[str, Any] = {}
    if cell.max_batch_cap_gb > 0 and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cell.max_batch_cap_gb * 2**30 / total), device)
        try:
            out["max_batch_size"] = _max_batch(cell, reference, device)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        out["max_batch_cap_gb"] = cell.max_batch_cap_gb
        out["max_batch_size_card"] = _max_batch(cell, reference, device)
    else:  # no cap (or not on CUDA, where it cannot be set): the whole device
        out["max_batch_size"] = out["max_batch_size_card"] = _max_batch(cell, reference, device)
    return out


def run_cell(cell: Cell) -> dict[str, Any]:
    """Measure one cell in this process (memory first, then interleaved timing).

    Call it in a fresh process for a meaningful CPU peak (what `run_benchmark` does).
    """
    dev = torch.device(cell.device)
    row = _empty_row(cell)
    _preimport(cell)
    if dev.type == "cpu" and cell.isolated:
        row["peak_reset"] = _reset_peak_rss()
        row["base_rss_mb"] = _proc_status_mb("VmRSS")
    torch.manual_seed(cell.seed)
    try:
        reference = build_model(cell.model, cell.resolution, cell.num_classes)
    except Exception as e:
        return {**row, "status": "failed", "reason": f"model: {_reason(e)}"}
    x, y = _batch(cell, cell.batch_size, dev)

    # 1. the method alone: warm-up steps, then its peak memory
    cleanup = failed = None
    try:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        model = copy.deepcopy(reference).to(dev)
        step, cleanup = make_step(cell.method, model, x, y, style=cell.style)
        for _ in range(max(1, cell.warmup)):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            row["peak_mem_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
            row["step_mem_mb"] = row["peak_mem_mb"]
        elif cell.isolated:
            row["peak_mem_mb"] = _peak_rss_mb()
            if row["base_rss_mb"] is not None:
                row["step_mem_mb"] = row["peak_mem_mb"] - row["base_rss_mb"]
        # One more step on its own: the steady-state peak, without the first step's one-off
        # costs (the engine's self-checks, auto's measurements, allocator warm-up).
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            step()
            torch.cuda.synchronize(dev)
            row["steady_mem_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
        elif cell.isolated and row["base_rss_mb"] is not None:
            gc.collect()
            _malloc_trim()
            if _reset_peak_rss():
                step()
                row["steady_mem_mb"] = _peak_rss_mb() - row["base_rss_mb"]
        row["live_mem_mb"] = live_peak_mb(step, dev)

        # 2. time, interleaved with the non-private baseline on an identical copy
        if cell.method == NONPRIVATE:
            times = [time_step(step, dev) for _ in range(cell.repeats)]
            row["step_time_s"] = statistics.median(times)
            row["baseline_step_time_s"] = row["step_time_s"]
            row["ratio_to_nonprivate"] = 1.0
        else:
            base_model = copy.deepcopy(reference).to(dev)
            base_step, _ = make_step(NONPRIVATE, base_model, x, y)
            for _ in range(max(1, cell.warmup)):
                base_step()
            tb, tm = interleaved_times(base_step, step, cell.repeats, dev)
            row["step_time_s"] = statistics.median(tm)
            row["baseline_step_time_s"] = statistics.median(tb)
            row["ratio_to_nonprivate"] = statistics.median(m / b for m, b in zip(tm, tb))
            row["pair_ratios"] = [m / b for m, b in zip(tm, tb)]  # the spread behind the median (error bars)
            del base_model, base_step
    except Exception as e:
        failed = {"step_time_s": None, "ratio_to_nonprivate": None, "baseline_step_time_s": None,
                  "status": "failed", "reason": _reason(e), "oom": is_out_of_memory(e)}
    finally:
        if cleanup is not None:
            try:
                cleanup()
            except Exception:
                pass
    if failed:
        # Out of memory at this batch (Opacus at 256, say): a smaller batch may still run, and the
        # largest one is the paper's comparison. Searched here, after the failed step's memory is freed.
        if failed.pop("oom") and cell.max_batch:
            model = step = None
            gc.collect()
            failed.update(_max_batches(cell, reference, dev))
        return {**row, **failed}

    # 3. the largest batch that fits (GPU profile)
    if cell.max_batch:
        del model, step
        row.update(_max_batches(cell, reference, dev))
    row["status"] = "ok"
    return row


def _empty_row(cell: Cell) -> dict[str, Any]:
    row = {k: None for k in ROW_KEYS}
    row.update(model=cell.model, resolution=cell.resolution, batch_size=cell.batch_size, method=cell.method,
               style=cell.style, status="failed", reason="", device=_device_name(cell.device), profile=cell.profile,
               repeats=cell.repeats, threads=torch.get_num_threads(), torch_version=torch.__version__)
    return row


def _device_name(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(dev)}"
    if dev.type == "cpu":
        return f"cpu:{platform.processor() or platform.machine()} x{os.cpu_count()}"
    return str(dev)


def run_cell_subprocess(cell: Cell, timeout: float = 900.0) -> dict[str, Any]:
    """Run `run_cell` in a fresh `python -m dpbench.training.bench --cell` process."""
    cmd = [sys.executable, "-m", "dpbench.training.bench", "--cell", json.dumps({**asdict(cell), "isolated": True})]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**_empty_row(cell), "status": "failed", "reason": f"timed out after {timeout:g} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_MARK):
            return json.loads(line[len(_RESULT_MARK):])
    tail = [l for l in (proc.stderr or "").strip().splitlines() if l.strip()]
    why = tail[-1] if tail else f"exit code {proc.returncode}"
    return {**_empty_row(cell), "status": "failed", "reason": f"child process died (exit {proc.returncode}): {why}"[:300]}


# ---------------------------------------------------------------------------- runs
def profile_cells(profile: str, models: Sequence[str] | None = None, methods: Sequence[str] | None = None,
                  batch_size: int | None = None, repeats: int | None = None, device: str | None = None) -> list[Cell]:
    """The cells of a profile, optionally narrowed to some models/methods or overridden."""
    if profile not in PROFILES:
        raise UserError(f"unknown profile {profile!r}; use one of {', '.join(PROFILES)}")
    spec = PROFILES[profile]
    methods = list(methods) if methods else list(METHODS)
    bad = [m for m in methods if m not in METHODS + EXTRA_METHODS]
    if bad:
        raise UserError(f"unknown methods {bad}; use some of {', '.join(METHODS + EXTRA_METHODS)}")
    entries = spec["models"]
    if models:
        known = {m for m, _, _ in entries}
        entries = [e for e in entries if e[0] in models]
        extra = [m for m in models if m not in known]
        res = entries[0][1] if entries else spec["models"][0][1]
        entries += [(m, res, spec["models"][0][2]) for m in extra]  # any model name, at the profile's size
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if repeats is not None and repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {repeats}")
    cells = []
    for name, res, bs in entries:
        for m in methods:
            cells.append(Cell(model=name, resolution=res, batch_size=batch_size or bs, method=m,
                              device=device or spec["device"], repeats=repeats or spec["repeats"],
                              warmup=spec["warmup"], max_batch=spec["max_batch"], profile=profile))
    return cells


def run_benchmark(profile: str | Sequence[Cell] = "cpu", *, models: Sequence[str] | None = None,
                  methods: Sequence[str] | None = None, batch_size: int | None = None, repeats: int | None = None,
                  device: str | None = None, isolate: bool = True, json_path: str | os.PathLike | None = None,
                  progress: bool = True, cell_timeout: float = 900.0) -> list[dict[str, Any]]:
    """Measure every cell of a profile (or a list of `Cell`s); one row dict per cell.

    isolate=True runs each cell in its own child process (needed for a meaningful CPU peak
    memory); isolate=False runs them here (CPU peak memory is then not measured: None). With `json_path`,
    the rows are written there atomically.
    """
    if isinstance(profile, str):
        cells = profile_cells(profile, models, methods, batch_size, repeats, device)
    else:
        cells = list(profile)
    for c in cells:
        if torch.device(c.device).type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"the benchmark asks for device {c.device!r} but CUDA is not available; use --profile cpu")
    # models in the given order; within one, the non-private cell first (memory ratios)
    first = {}
    for c in cells:
        first.setdefault((c.model, c.resolution, c.batch_size), len(first))
    order = {m: i for i, m in enumerate(METHODS + EXTRA_METHODS)}
    key = lambda r: (first[(r["model"], r["resolution"], r["batch_size"])], order.get(r["method"], 99))  # noqa: E731
    cells.sort(key=lambda c: key(asdict(c)))
    rows: list[dict[str, Any]] = []
    bar = tqdm(cells, disable=not progress, desc="bench", unit="cell")  # left in the output: the log keeps the total time
    for c in bar:
        bar.set_postfix_str(f"{c.model}@{c.resolution} {c.method}")
        rows.append(run_cell_subprocess(c, cell_timeout) if isolate else run_cell(c))
        _fill_memory_ratios(rows)
        if json_path:  # after every cell, so a long run that stops keeps what it measured
            write_json_atomic(json_path, rows)
    return rows


def _fill_memory_ratios(rows: list[dict[str, Any]]) -> None:
    """mem_ratio_to_nonprivate = step_mem_mb / the non-private cell's step_mem_mb (and
    steady_mem_ratio from steady_mem_mb, live_mem_ratio from live_mem_mb likewise)."""
    for mem, ratio in (("step_mem_mb", "mem_ratio_to_nonprivate"), ("steady_mem_mb", "steady_mem_ratio"),
                       ("live_mem_mb", "live_mem_ratio")):
        base = {(r["model"], r["resolution"], r["batch_size"]): r.get(mem) for r in rows
                if r["method"] == NONPRIVATE and r["status"] == "ok"}
        for r in rows:
            b = base.get((r["model"], r["resolution"], r["batch_size"]))
            if r.get(mem) is not None and b and b > 0:
                r[ratio] = r[mem] / b


def format_table(rows: Iterable[dict[str, Any]]) -> str:
    """A fixed-width text table of the main columns; failed cells show their reason."""
    cols = [("model", "model"), ("resolution", "px"), ("batch_size", "batch"), ("method", "method"),
            ("step_time_s", "step s"), ("baseline_step_time_s", "base s"), ("time_over_base", "step/base"),
            ("ratio_to_nonprivate", "x time (median of pairs)"), ("peak_mem_mb", "peak MB"),
            ("step_mem_mb", "step MB"), ("mem_ratio_to_nonprivate", "x mem"), ("steady_mem_ratio", "x mem later"), ("live_mem_ratio", "x live mem"), ("max_batch_size", "max batch"), ("status", "status")]
    rows = list(rows)
    if rows and all(r.get("max_batch_size") is None for r in rows):
        cols = [c for c in cols if c[0] != "max_batch_size"]

    def fmt(k, v):
        if v is None:
            return "-"
        if k in ("step_time_s", "baseline_step_time_s"):
            return f"{v:.4f}"
        if k in ("ratio_to_nonprivate", "mem_ratio_to_nonprivate", "time_over_base", "steady_mem_ratio",
                 "live_mem_ratio"):
            return f"{v:.2f}"
        if k in ("peak_mem_mb", "step_mem_mb"):
            return f"{v:.0f}"
        return str(v)

    def value(r, k):  # step/base: the ratio of the two medians, beside the median of the per-pair ratios
        if k != "time_over_base":
            return r.get(k)
        s, b = r.get("step_time_s"), r.get("baseline_step_time_s")
        return s / b if s is not None and b else None

    table = [[h for _, h in cols]] + [[fmt(k, value(r, k)) for k, _ in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    lines = ["  ".join(s.ljust(w) for s, w in zip(line, widths)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"failed: {r['model']}@{r['resolution']} {r['method']}: {r.get('reason')}")
    if rows:
        lines.append("step s, base s: median seconds per step of the method and of its interleaved non-private twin; "
                     "step/base: their ratio; x time: the median of the per-pair ratios (robust to load drifts, "
                     "so it need not equal step/base)")
        lines.append("x mem: step memory peak over the warm-up steps (the first one included: the engine's self-checks, "
                     "auto's measurements) / non-private's; x mem later: the peak of one later step / non-private's "
                     "(both RSS, which keeps freed heap pages); x live mem: one later step's peak of live tensor "
                     "bytes / non-private's")
        lines.append(f"device: {rows[0].get('device')}, torch {rows[0].get('torch_version')}, "
                     f"threads {rows[0].get('threads')}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- step breakdown
BREAKDOWN_PARTS = ("forward", "pass1_autograd", "norms", "clipped_sums", "engine_python", "noise", "optimizer",
                   "other")


class _SelfTimer:
    """Wall-clock self time per label (a label's time excludes the labelled calls inside it)."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self._stack: list[list[float]] = []

    def wrap(self, label: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            with torch.profiler.record_function(f"dpbench::{label}"):
                self._stack.append([0.0])
                t0 = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    dt = time.perf_counter() - t0
                    child = self._stack.pop()[0]
                    self.totals[label] = self.totals.get(label, 0.0) + dt - child
                    if self._stack:
                        self._stack[-1][0] += dt

        return timed


def step_breakdown(model_name: str = "resnet18", resolution: int = 32, batch_size: int = 64, method: str = "bk",
                   repeats: int = 5, warmup: int = 2, style: str = "flat", seed: int = 0,
                   profiler_rows: int = 0) -> dict[str, Any]:
    """Where a DP step's time goes, beside the non-private step, measured in one process.

    Steps alternate (non-private, DP, non-private, ...) on identical models; each DP step is
    split by wrappers around the engine's calls: `forward` (model with hooks), `pass1_autograd`
    (the backward pass itself, without the engine's hooks), `norms` (rules' per-sample squared
    norms), `clipped_sums` (rules' clipped sums, and the second backward where a method uses
    one), `engine_python` (the engine's own per-layer bookkeeping), `noise`, `optimizer`, and
    `other` (losses, zero_grad, the rest). Medians over `repeats` steps, in seconds, and as
    fractions of the median non-private step. `profiler_rows` > 0 also runs one DP step under
    torch.profiler and returns its top operators by self CPU time as text.
    """
    import dpbench.clipping.engine as engine_mod

    torch.manual_seed(seed)
    reference = build_model(model_name, resolution)
    x = torch.randn(batch_size, 3, resolution, resolution)
    y = torch.randint(0, 10, (batch_size,))
    base_model = copy.deepcopy(reference)
    base_opt = torch.optim.SGD(base_model.parameters(), lr=1e-3)
    base = []  # the non-private steps' timings

    def base_step():
        t0 = time.perf_counter()
        base_opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(base_model(x), y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        base_opt.step()
        t3 = time.perf_counter()
        return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, "total": t3 - t0}

    model = copy.deepcopy(reference)
    engine = ClippingEngine(model, max_grad_norm=1.0, method=method, style=style)
    dp_opt = DPOptimizer(torch.optim.SGD(engine.trainable_parameters(), lr=1e-3), engine, 1.0, batch_size, seed=0)
    timer = _SelfTimer()
    # Wrap the engine's and rules' entry points on these instances only.
    for l in engine._layers:
        l.rule.sq_norms = timer.wrap("norms", l.rule.sq_norms)
        l.rule.weighted_sum = timer.wrap("clipped_sums", l.rule.weighted_sum)
    engine._process = timer.wrap("engine_python", engine._process)
    engine._emit = timer.wrap("engine_python", engine._emit)
    engine._on_grad = timer.wrap("engine_python", engine._on_grad)
    dp_opt.add_noise = timer.wrap("noise", dp_opt.add_noise)
    dp_opt.optimizer.step = timer.wrap("optimizer", dp_opt.optimizer.step)
    real_grad, real_backward = torch.autograd.grad, torch.autograd.backward

    class _Autograd:  # the engine module's view of torch.autograd: timed pass 1 and second backward
        grad = staticmethod(timer.wrap("pass1_autograd", real_grad))
        backward = staticmethod(timer.wrap("clipped_sums", real_backward))

        def __getattr__(self, name):
            return getattr(torch.autograd, name)

    class _Torch:
        autograd = _Autograd()

        def __getattr__(self, name):
            return getattr(torch, name)

    dp = []

    def dp_step():
        timer.totals = {}
        t0 = time.perf_counter()
        dp_opt.zero_grad()
        out = timer.wrap("forward", model)(x)
        dp_opt.backward(per_sample_cross_entropy(out, y))
        dp_opt.step()
        total = time.perf_counter() - t0
        parts = dict(timer.totals)
        parts["other"] = total - sum(parts.values())
        parts["total"] = total
        return parts

    saved = engine_mod.torch
    engine_mod.torch = _Torch()
    try:
        for _ in range(warmup):
            base_step()
            dp_step()
        for _ in range(repeats):
            base.append(base_step())
            dp.append(dp_step())
        table = None
        if profiler_rows:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                dp_step()
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=profiler_rows)
    finally:
        engine_mod.torch = saved
        engine.remove()
    med = lambda rows, k: statistics.median(r.get(k, 0.0) for r in rows)  # noqa: E731
    base_med = {k: med(base, k) for k in ("forward", "backward", "optimizer", "total")}
    dp_med = {k: med(dp, k) for k in BREAKDOWN_PARTS + ("total",)}
    return {"model": model_name, "resolution": resolution, "batch_size": batch_size, "method": method,
            "style": style, "repeats": repeats, "threads": torch.get_num_threads(), "nonprivate": base_med,
            "dp": dp_med, "ratio": statistics.median(d["total"] / b["total"] for d, b in zip(dp, base)),
            "profiler_table": table}


def format_breakdown(res: dict[str, Any]) -> str:
    """A text table of `step_breakdown`'s result: ms and fraction of the non-private step."""
    b, d = res["nonprivate"], res["dp"]
    ref = b["total"]
    lines = [f"{res['model']} {res['resolution']} px, batch {res['batch_size']}, method {res['method']} "
             f"({res['style']}), {res['threads']} threads, median of {res['repeats']} interleaved steps; "
             f"median pair ratio {res['ratio']:.2f}x",
             f"{'part':<16}{'non-private ms':>16}{'DP ms':>10}{'DP / non-private step':>24}"]
    base_of = {"forward": b["forward"], "pass1_autograd": b["backward"], "optimizer": b["optimizer"]}
    for k in BREAKDOWN_PARTS + ("total",):
        bv = b["total"] if k == "total" else base_of.get(k)
        lines.append(f"{k:<16}{'' if bv is None else f'{bv * 1e3:.1f}':>16}{d[k] * 1e3:>10.1f}{d[k] / ref:>24.3f}")
    if res.get("profiler_table"):
        lines += ["", "torch.profiler, one DP step, top operators by self CPU time:", res["profiler_table"]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- CLI
def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `dpbench bench` (dpbench.workbench.cli adds them to its sub-command)."""
    parser.add_argument("--profile", default="cpu", choices=sorted(PROFILES),
                        help="cpu: small CNN, resnet18-GN, vit_tiny@64 at batch 64; gpu: the paper's models; "
                             "quick: a tiny model, batch 8, 2 repeats (a smoke test)")
    parser.add_argument("--json", metavar="FILE", help="write the rows to FILE as JSON (atomically)")
    parser.add_argument("--models", nargs="+", metavar="NAME", help="only these models (any timm name works)")
    parser.add_argument("--methods", nargs="+", metavar="METHOD",
                        help=f"only these methods, from: {', '.join(METHODS + EXTRA_METHODS)}")
    parser.add_argument("--batch-size", type=int, help="override the profile's batch size")
    parser.add_argument("--repeats", type=int, help="timed (baseline, method) pairs per cell")
    parser.add_argument("--device", help="override the profile's device (e.g. cuda:1)")
    parser.add_argument("--no-isolate", action="store_true",
                        help="run cells in this process (faster; no CPU peak memory)")
    parser.add_argument("--profile-step", action="store_true",
                        help="instead of the table: where one DP step's time goes (forward, backward pass, norms, "
                             "clipped sums, noise, optimizer, engine Python) beside the non-private step, per model "
                             "of the profile and dpbench method (default bk), plus torch.profiler's top operators")
    parser.add_argument("--cell", help=argparse.SUPPRESS)  # internal: run one cell as a child process


def cli(args: argparse.Namespace) -> int:
    """Run `dpbench bench` from parsed arguments; returns the exit code."""
    if getattr(args, "cell", None):
        row = run_cell(Cell(**json.loads(args.cell)))
        print(_RESULT_MARK + json.dumps(row), flush=True)
        return 0
    if getattr(args, "profile_step", False):
        for c in profile_cells(args.profile, args.models, args.methods or ["bk"], args.batch_size, args.repeats,
                               args.device):
            if c.method not in DPBENCH_METHODS + EXTRA_METHODS:
                continue
            if c.device != "cpu":
                raise UserError("--profile-step runs on the CPU only; use --device cpu")
            res = step_breakdown(c.model, c.resolution, c.batch_size, c.method, repeats=c.repeats,
                                 warmup=c.warmup, style=c.style, profiler_rows=15)
            print(format_breakdown(res) + "\n", flush=True)
        return 0
    rows = run_benchmark(args.profile, models=args.models, methods=args.methods, batch_size=args.batch_size,
                         repeats=args.repeats, device=args.device, isolate=not args.no_isolate,
                         json_path=args.json)
    print(format_table(rows))
    if args.json:
        print(f"wrote {len(rows)} rows to {args.json}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpbench.training.bench", description=__doc__.splitlines()[0])
    add_cli_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cli(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
