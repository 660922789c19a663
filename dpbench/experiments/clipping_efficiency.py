"""Where ghost norm beats instantiation: the complexity crossover of Bu, Mao and Xu (2022).

For a layer whose weight gradient is sum_t G_t' A_t, with A (B x T x D) and G (B x T x p):
- ghost norm: ||g_i||^2 = sum_{t,s} (A_i A_i')_{ts} (G_i G_i')_{ts}; time ~ B T^2 (D + p),
  memory ~ B T^2;
- instantiation: g_i = G_i' A_i and its norm; time ~ B T p D, memory ~ B p D.
The mixed rule takes ghost norm iff 2 T^2 < p D. For a Conv2d, T = h_out * w_out and
D = c_in * k_h * k_w, so the predicted crossover is the input size where 2 T^2 = p D.

This module measures both sides with the engine's own rule code (`Conv2dRule` of
`dpbench.clipping.rules`: `ghost_sq_norms` for ghost, `per_sample` for instantiation) on
one Conv2d swept over input sizes, finds the measured crossover, and lists the mixed rule's
per-layer decisions for whole models (`engine.layer_table()`).

Timing uses `dpbench.training.bench.time_step` (GPU-synchronised), memory the bench's one
in-process probe `dpbench.training.bench.peak_extra_mb` (on CUDA the allocator's peak above
what was allocated before the call; on CPU the growth of the resident-set high-water mark
after freed heap is returned to the system), so it measures what the call itself touches.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from dpbench.clipping import ClippingEngine
from dpbench.clipping.rules import Conv2dRule
from dpbench.errors import UserError
from dpbench.experiments.plots import FAILED, NOT_MEASURED, bars_marking_missing, grouped_bars, legend_once, plain_log_ticks
from dpbench.training import bench
from dpbench.training.bench import Cell, DPBENCH_METHODS, EXTRA_METHODS, METHODS as BENCH_METHODS

METHODS = ("ghost", "instantiate")


# ---------------------------------------------------------------------------- analysis
def conv_dims(size: int, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
              padding: int = 1) -> tuple[int, int, int]:
    """(T, D, p) of a square Conv2d on a size x size input: output positions, c_in k^2, c_out."""
    out = (size + 2 * padding - kernel_size) // stride + 1
    if out < 1:
        raise UserError(f"input size {size} is too small for kernel {kernel_size} with padding {padding}; "
                        "use a larger size or more padding")
    return out * out, in_channels * kernel_size * kernel_size, out_channels


def predicted_crossover_size(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                             padding: int = 1) -> float:
    """The input size at which 2 T^2 = p D (ghost norm is cheaper below it).

    T = h_out^2, so h_out* = (p D / 2)^(1/4) and size = (h_out* - 1) stride + k - 2 padding
    (a real number: the rule's boundary, not necessarily a valid integer size).
    """
    D, p = in_channels * kernel_size * kernel_size, out_channels
    h_out = (p * D / 2.0) ** 0.25
    return (h_out - 1.0) * stride + kernel_size - 2 * padding


def predicted_cost(method: str, batch_size: int, T: int, D: int, p: int) -> dict[str, float]:
    """The paper's leading-order cost of one method: flops ~ B T^2 (D+p) or B T p D, and the
    number of float elements of the big intermediate (B T^2, or B p D)."""
    if method == "ghost":
        return {"flops": 2.0 * batch_size * T * T * (D + p), "elements": 2.0 * batch_size * T * T}
    if method == "instantiate":
        return {"flops": 2.0 * batch_size * T * p * D, "elements": float(batch_size * p * D)}
    raise UserError(f"unknown norm method {method!r}; use one of {', '.join(METHODS)}")


def measured_crossover(sizes: Sequence[float], ghost_times: Sequence[float | None],
                       inst_times: Sequence[float | None]) -> float | None:
    """The input size where ghost norm stops being faster than instantiation.

    The cost model says t_ghost / t_inst grows like T ~ size^2, so log(t_ghost / t_inst) is
    fitted as a line in log(size) over every measured size (least squares: robust to a noisy
    point, unlike the first change of sign) and the crossover is where the line crosses 0.
    None when the fitted ratio does not grow with size, or crosses 1 outside the measured sizes.
    """
    pts = [(math.log(s), math.log(g / i)) for s, g, i in zip(sizes, ghost_times, inst_times)
           if g is not None and i is not None and g > 0 and i > 0]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx
    if slope <= 0:
        return None
    x0 = mx - my / slope
    lo, hi = min(x for x, _ in pts), max(x for x, _ in pts)
    return float(math.exp(x0)) if lo <= x0 <= hi else None


# ---------------------------------------------------------------------------- measurement
def conv_norm_inputs(size: int, in_channels: int, out_channels: int, batch_size: int, kernel_size: int = 3,
                     stride: int = 1, padding: int = 1, device: str | torch.device = "cpu", seed: int = 0):
    """A Conv2d, an input A and an output gradient G (random, seeded) for the norm rules."""
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.1)
    x = torch.randn(batch_size, in_channels, size, size, generator=g)
    out_size = (size + 2 * padding - kernel_size) // stride + 1
    grad = torch.randn(batch_size, out_channels, out_size, out_size, generator=g)
    return conv.to(device), x.to(device), grad.to(device)


def conv_norms(method: str, conv: nn.Conv2d, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Per-sample squared weight-gradient norms (B,) by the engine's Conv2d rule.

    ghost: `Conv2dRule.ghost_sq_norms` (im2col, A A' and G G'); instantiate:
    `Conv2dRule.per_sample` (one grouped weight-gradient convolution) then the squared norm,
    exactly what the engine does for a layer under each method.
    """
    rule = Conv2dRule()
    if method == "ghost":
        return rule.ghost_sq_norms(conv, [x], [grad], ["weight"])["weight"]
    if method == "instantiate":
        sq, _ = rule.sq_norms(conv, [x], [grad], ["weight"], ghost=False)
        return sq["weight"]
    raise UserError(f"unknown norm method {method!r}; use one of {', '.join(METHODS)}")


def crossover_sweep(sizes: Sequence[int], in_channels: int = 64, out_channels: int = 64, batch_size: int = 4,
                    kernel_size: int = 3, stride: int = 1, padding: int = 1, device: str | torch.device = "cpu",
                    repeats: int = 3, seed: int = 0, max_tmp_mb: float | None = None,
                    progress: bool = True) -> list[dict[str, Any]]:
    """Time and memory of ghost norm and instantiation on one Conv2d at each input size.

    One row per (size, method): size, T, D, p, time_s (the fastest of `repeats` after one
    warm-up), mem_mb, rel_diff (max relative difference of the two norms, on the ghost
    row), status and reason. A method whose leading intermediate (4 bytes x the element
    count of `predicted_cost`) exceeds `max_tmp_mb` is not run: its row is failed with the
    reason, never dropped.
    """
    if not sizes:
        raise UserError("crossover sizes are empty; give at least two input sizes, e.g. [8, 16, 32]")
    if repeats < 1 or batch_size < 1:
        raise UserError(f"repeats and batch_size must be >= 1, got {repeats} and {batch_size}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for but CUDA is not available; use device='cpu'")
    rows = []
    for size in tqdm(list(sizes), desc="crossover", unit="size", disable=not progress):
        T, D, p = conv_dims(size, in_channels, out_channels, kernel_size, stride, padding)
        conv, x, grad = conv_norm_inputs(size, in_channels, out_channels, batch_size, kernel_size, stride,
                                         padding, dev, seed)
        norms = {}
        for method in METHODS:
            cost = predicted_cost(method, batch_size, T, D, p)
            row = {"size": size, "method": method, "T": T, "D": D, "p": p, "batch_size": batch_size,
                   "pred_flops": cost["flops"], "pred_mb": 4 * cost["elements"] / 2**20,
                   "ghost_cheaper_predicted": 2 * T * T < p * D, "time_s": None, "mem_mb": None,
                   "rel_diff": None, "status": "ok", "reason": ""}
            if max_tmp_mb is not None and row["pred_mb"] > max_tmp_mb:
                row.update(status="failed", reason=f"skipped: needs ~{row['pred_mb']:.0f} MB of intermediates "
                                                   f"> max_tmp_mb={max_tmp_mb:g}")
                rows.append(row)
                continue
            try:
                with torch.no_grad():
                    fn = lambda m=method: conv_norms(m, conv, x, grad)  # noqa: E731
                    norms[method] = fn()  # warm-up, and the value for the agreement check
                    row["mem_mb"] = bench.peak_extra_mb(fn, dev)
                    # the fastest repeat: load on a shared machine only ever adds time
                    row["time_s"] = min(bench.time_step(fn, dev) for _ in range(repeats))
            except (RuntimeError, MemoryError) as e:  # out of memory is a result, not a crash
                row.update(status="failed", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
        if len(norms) == 2:
            a, b = norms["ghost"].double().sqrt(), norms["instantiate"].double().sqrt()
            diff = float(((a - b).abs() / b.clamp_min(1e-30)).max())
            for r in rows[-2:]:
                r["rel_diff"] = diff
        del conv, x, grad, norms
    return rows


def crossover_summary(rows: Sequence[dict[str, Any]], in_channels: int, out_channels: int, kernel_size: int = 3,
                      stride: int = 1, padding: int = 1) -> dict[str, Any]:
    """Measured and predicted crossover sizes, and how well the two norms agree."""
    by = {(r["size"], r["method"]): r for r in rows}
    sizes = sorted({r["size"] for r in rows})
    tg = [by[(s, "ghost")]["time_s"] if (s, "ghost") in by else None for s in sizes]
    ti = [by[(s, "instantiate")]["time_s"] if (s, "instantiate") in by else None for s in sizes]
    diffs = [r["rel_diff"] for r in rows if r.get("rel_diff") is not None]
    measured = measured_crossover(sizes, tg, ti)
    predicted = predicted_crossover_size(in_channels, out_channels, kernel_size, stride, padding)
    T_m = None
    ratio = None
    if measured is not None:
        h = (measured + 2 * padding - kernel_size) / stride + 1
        T_m = h * h
        _, D, p = conv_dims(sizes[0], in_channels, out_channels, kernel_size, stride, padding)
        ratio = 2 * T_m * T_m / (p * D)
    return {"measured_size": measured, "predicted_size": predicted, "measured_T": T_m,
            "measured_2T2_over_pD": ratio, "max_rel_diff": max(diffs) if diffs else None}


CROSSOVER_CLAIM = "C-ghost-instantiate-crossover"
NO_CROSSOVER = "the fitted ghost/instantiate time ratio does not cross 1 within the measured sizes"


def record_crossover(rec, rows: Sequence[dict[str, Any]], summary: dict[str, Any], claims: dict | None = None, *,
                     seed: int | None = None, device: str = "cpu") -> None:
    """Add the crossover sweep's tidy rows to a Recorder (anything with `add(metric, value, **kw)`).

    Per (size, method): `norm_time_s` and `norm_mem_mb`, failed with the row's reason (or "not
    measured on this platform") when absent. Then the norms' agreement, the predicted size
    and the measured size and 2T^2/pD; the last carries the claim id `C-ghost-instantiate-crossover`
    when `claims` has it, and is failed with a reason when the measured ratio never crosses 1.
    """
    claims = claims or {}
    for r in rows:
        params = dict(size=r["size"], T=r["T"], D=r["D"], p=r["p"], batch_size=r["batch_size"], device=device)
        for metric, key in (("norm_time_s", "time_s"), ("norm_mem_mb", "mem_mb")):
            if r["status"] == "ok" and r[key] is not None:
                rec.add(metric, r[key], method=r["method"], seed=seed, **params)
            else:
                rec.add(metric, None, method=r["method"], seed=seed, status="failed",
                        reason=r["reason"] or "not measured on this platform", **params)
    if summary["max_rel_diff"] is not None:
        rec.add("norms_max_rel_diff", summary["max_rel_diff"], method="ghost_vs_instantiate", seed=seed)
    rec.add("crossover_size_predicted", summary["predicted_size"], method="mixed_rule", seed=seed)
    cid = CROSSOVER_CLAIM if CROSSOVER_CLAIM in claims else ""
    if summary["measured_size"] is None:
        rec.add("crossover_size_measured", None, method="measured", seed=seed, status="failed", reason=NO_CROSSOVER)
        rec.add("crossover_2T2_over_pD_measured", None, method="measured", seed=seed, status="failed",
                reason=NO_CROSSOVER, claim_id=cid)
    else:
        rec.add("crossover_size_measured", summary["measured_size"], method="measured", seed=seed)
        rec.add("crossover_2T2_over_pD_measured", summary["measured_2T2_over_pD"], method="measured", seed=seed,
                claim_id=cid)


# ---------------------------------------------------------------------------- per-layer decisions
def layer_decisions(model_name: str, resolution: int, num_classes: int = 10, batch_size: int = 2,
                    device: str | torch.device = "cpu", seed: int = 0) -> list[dict[str, Any]]:
    """The mixed rule's choice for every trainable layer of a model: `engine.layer_table()`
    after one backward pass at this resolution (T, D, p are known only then).

    The model is built like `dpbench bench` builds it (`dpbench.training.bench.build_model`: GroupNorm).
    Rows gain `model`, `resolution`, `two_T2` and `pD` (the two sides of the rule).
    """
    torch.manual_seed(seed)
    model = bench.build_model(model_name, resolution, num_classes).to(device)
    engine = ClippingEngine(model, max_grad_norm=1.0, method="mixed", check=False)
    try:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch_size, 3, resolution, resolution, generator=g).to(device)
        y = torch.randint(0, num_classes, (batch_size,), generator=g).to(device)
        engine.backward(F.cross_entropy(model(x), y, reduction="none"))
        table = engine.layer_table()
    finally:
        engine.remove()
    for r in table:
        r.update(model=model_name, resolution=resolution)
        if r["T"] is not None:
            r["two_T2"], r["pD"] = 2 * r["T"] ** 2, r["p"] * r["D"]
        else:
            r["two_T2"] = r["pD"] = None
    return table


LAYER_COLUMNS = ["layer", "type", "T", "D", "p", "two_T2", "pD", "method"]


def model_layer_decisions(rec, models: Sequence, *, device: str | torch.device = "cpu",
                          seed: int = 0) -> list[dict[str, Any]]:
    """`layer_decisions` for every "name@resolution:batch" of `models`, with tidy rows.

    A model the engine refuses is a finding, not a crash: its `layers_ghost` row is failed
    with the exception's one-line reason. Every model that ran gets `layers_ghost` and
    `layers_instantiate` (how many layers the mixed rule sends each way). Returns all
    models' layer rows.
    """
    rows: list[dict[str, Any]] = []
    for name, res, _ in map(parse_model_spec, models):
        try:
            rows += layer_decisions(name, res, device=device, seed=seed)
        except Exception as e:  # noqa: BLE001 -- any failure of a model is recorded, with its reason
            rec.add("layers_ghost", None, method="mixed", status="failed", reason=f"{type(e).__name__}: {e}"[:300],
                    model=name, resolution=res)
    for (name, res), group in _by_model(rows).items():
        rec.add("layers_ghost", sum(r["method"] == "ghost" for r in group), method="mixed", model=name,
                resolution=res)
        rec.add("layers_instantiate", sum(r["method"] == "instantiate" for r in group), method="mixed", model=name,
                resolution=res)
    return rows


def _by_model(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    out: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault((r["model"], r["resolution"]), []).append(r)
    return out


def layer_decision_text(rows: Sequence[dict[str, Any]]) -> str:
    """Per model: a heading (layer count, how many the mixed rule sends to ghost norm) and
    the table of T, D, p, 2T^2, pD and the choice for each layer."""
    import pandas as pd

    parts = []
    for (name, res), group in _by_model(rows).items():
        n_ghost = sum(r["method"] == "ghost" for r in group)
        table = pd.DataFrame(group)[LAYER_COLUMNS].to_string(index=False)
        parts.append(f"\n{name}@{res}: {len(group)} trainable layers, mixed picks ghost for {n_ghost}\n{table}")
    return "\n".join(parts)


# ---------------------------------------------------------------------------- notebook 01 tables
# Our bench names -> the paper's Table 4 names (claim ids C-t4-<model>-<method>-time-s/-mem-gb).
# dpbench "instantiate" has no paper column: FastGradClip instantiates and then runs a second
# backward, ours forms the clipped sum from the stored per-sample gradients (Opacus's way).
PAPER_MODELS = {"small_cnn": "smallcnn", "resnet18": "resnet18", "resnet50": "resnet50", "vgg11": "vgg11",
                "vgg16": "vgg16", "vgg11_bn": "vgg11", "vgg16_bn": "vgg16", "vgg19_bn": "vgg19"}
PAPER_METHODS = {"nonprivate": "nondp", "opacus_hooks": "opacus", "ghost": "ghost", "mixed": "mixed"}
PAPER_RESOLUTION = 32  # CIFAR-10


def load_paper_values(path=None) -> dict[str, dict[str, Any]]:
    """Rows of references/paper_values.csv keyed by claim_id (value as float or None).

    Default: the checkout's references/paper_values.csv (this module is
    dpbench/experiments/, two levels below the repository root)."""
    path = Path(path) if path else Path(__file__).resolve().parents[2] / "references" / "paper_values.csv"
    if not path.is_file():
        # Without it no row could carry its claim id; never drop the tags silently.
        raise UserError(f"paper values not found at {path}; pass path= to references/paper_values.csv")
    out = {}
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            try:
                r["value"] = float(r["value"]) if r.get("value") not in (None, "") else None
            except ValueError:
                r["value"] = None
            out[r["claim_id"]] = r
    return out


def claim_for(model: str, method: str, kind: str, resolution: int, claims: dict) -> str:
    """The paper claim a measurement corresponds to, or "" (kind: time, mem, maxbatch)."""
    m, meth = PAPER_MODELS.get(model), PAPER_METHODS.get(method)
    if m is None or meth is None or resolution != PAPER_RESOLUTION:
        return ""
    cid = {"time": f"C-t4-{m}-{meth}-time-s", "mem": f"C-t4-{m}-{meth}-mem-gb",
           "maxbatch": f"C-{m}-{meth}-maxbatch"}[kind]
    return cid if cid in claims else ""


def paper_ratios(model: str, claims: dict) -> dict[str, dict[str, Any]]:
    """The paper's Table 4 ratios to non-DP for one of our models: {method: {time, mem} or
    {"oom": True}}; {} when the paper has no such model."""
    m = PAPER_MODELS.get(model)
    if m is None:
        return {}
    base_t, base_m = claims.get(f"C-t4-{m}-nondp-time-s"), claims.get(f"C-t4-{m}-nondp-mem-gb")
    if not base_t or not base_m or not base_t["value"] or not base_m["value"]:
        return {}
    oom = base_t.get("setting", "").split("OOM:")[-1] if "OOM:" in base_t.get("setting", "") else ""
    out = {}
    for ours, theirs in PAPER_METHODS.items():
        t, mm = claims.get(f"C-t4-{m}-{theirs}-time-s"), claims.get(f"C-t4-{m}-{theirs}-mem-gb")
        if t and mm and t["value"] is not None and mm["value"] is not None:
            out[ours] = {"time": t["value"] / base_t["value"], "mem": mm["value"] / base_m["value"]}
        elif theirs in [s.strip() for s in oom.split(",")]:
            out[ours] = {"oom": True}
    return out


def ratio_table(rows: Sequence[dict[str, Any]], claims: dict | None = None):
    """Table 4 laid out per (model, method): our step time, memory and their ratios to
    non-private beside the paper's ratios. A failed cell says "fails: <reason>"."""
    import pandas as pd

    claims = claims or {}
    out = []
    for r in rows:
        flat = (r.get("style") or "flat") == "flat"  # the paper's columns are all flat clipping
        paper = paper_ratios(r["model"], claims).get(r["method"], {}) \
            if flat and r["resolution"] == PAPER_RESOLUTION else {}
        ok = r["status"] == "ok"
        out.append({
            "model": f"{r['model']}@{r['resolution']}", "batch": r["batch_size"], "method": r["method"],
            "style": r.get("style") or "flat",
            "step s": r["step_time_s"] if ok else None, "step MB": r["step_mem_mb"] if ok else None,
            "x time (ours)": r["ratio_to_nonprivate"] if ok else None,
            "x time (paper)": "OOM" if paper.get("oom") else paper.get("time"),
            "x mem (ours)": r["mem_ratio_to_nonprivate"] if ok else None,
            "x mem (paper)": "OOM" if paper.get("oom") else paper.get("mem"),
            "status": "ok" if ok else f"fails: {r['reason']}",
        })
    return pd.DataFrame(out)


def wide_table(rows: Sequence[dict[str, Any]], value: str = "ratio_to_nonprivate", fmt: str = "{:.2f}"):
    """Models x methods (the paper's layout) of one bench column; failed cells read
    "fails: <reason>" and unmeasured ones "n/m"."""
    import pandas as pd

    table: dict[str, dict[str, str]] = {}
    methods: list[str] = []
    for r in rows:
        key = f"{r['model']}@{r['resolution']} (B={r['batch_size']})"
        col = r["method"] if (r.get("style") or "flat") == "flat" else f"{r['method']} ({r['style']})"
        if col not in methods:
            methods.append(col)
        if r["status"] != "ok":
            cell = f"fails: {r['reason']}"
        elif r.get(value) is None:
            cell = "n/m"
        else:
            cell = fmt.format(r[value])
        table.setdefault(key, {})[col] = cell
    return pd.DataFrame(table).T.reindex(columns=methods)


def parse_model_spec(spec: str | Sequence) -> tuple[str, int, int]:
    """"name@resolution:batch" (e.g. "resnet18@32:256"), or [name, resolution, batch]."""
    if isinstance(spec, str):
        name, _, rest = spec.partition("@")
        res, _, bs = rest.partition(":")
        entry: Sequence = (name, res, bs)
    else:
        entry = spec
    try:
        if len(entry) != 3 or not str(entry[0]):
            raise ValueError
        name, res, bs = str(entry[0]), int(entry[1]), int(entry[2])
    except (TypeError, ValueError):
        raise UserError(f"model entry {spec!r} is not 'name@resolution:batch' (e.g. 'resnet18@32:256')") from None
    if res < 1 or bs < 1:
        raise UserError(f"model entry {spec!r}: resolution and batch size must be >= 1")
    return name, res, bs


def notebook_cells(models: Sequence, methods: Sequence[str], *, device: str = "cpu", repeats: int = 3,
                   warmup: int = 1, max_batch: bool = False, seed: int = 0, profile: str = "",
                   layer_style_model: str = "", layer_style_methods: Sequence[str] = (),
                   max_batch_cap_gb: float = 0.0, max_batch_methods: Sequence[str] = ()) -> list:
    """The `dpbench.training.bench.Cell`s notebook 01 measures: every (model, method) of `models`
    ("name@resolution:batch" each, see `parse_model_spec`) and, for claim B.1, `layer_style_methods` of
    `layer_style_model` again with per-layer clipping (style="layer"). With `max_batch`, the largest
    batch is searched under `max_batch_cap_gb` of CUDA memory (> 0; the paper's 16 GB card) and on the
    whole card, for the methods in `max_batch_methods` (empty: every method)."""
    if max_batch_cap_gb < 0:
        raise UserError(f"max_batch_cap_gb must be >= 0 (0: no cap), got {max_batch_cap_gb}")
    if not models:
        raise UserError("models is empty; give at least one [name, resolution, batch_size]")
    bad = [m for m in methods if m not in BENCH_METHODS + EXTRA_METHODS]
    if bad:
        raise UserError(f"unknown methods {bad}; use some of {', '.join(BENCH_METHODS + EXTRA_METHODS)}")
    bad = [m for m in max_batch_methods if m not in methods]
    if bad:
        raise UserError(f"max_batch_methods {bad} are not in methods {list(methods)}; pick some of those")
    cells = []
    specs = [parse_model_spec(m) for m in models]
    for name, res, bs in specs:
        common = dict(model=name, resolution=res, batch_size=bs, device=device, repeats=repeats, warmup=warmup,
                      max_batch=max_batch, seed=seed, profile=profile, max_batch_cap_gb=float(max_batch_cap_gb))
        cells += [Cell(method=m, **{**common, "max_batch": max_batch and (not max_batch_methods or m in max_batch_methods)})
                  for m in methods]
        if name == layer_style_model:
            bad = [m for m in layer_style_methods if m not in DPBENCH_METHODS + EXTRA_METHODS]
            if bad:
                raise UserError(f"layer_style_methods {bad} are not dpbench methods; use some of "
                                f"{', '.join(DPBENCH_METHODS)}")
            cells += [Cell(method=m, style="layer", **{**common, "max_batch": False}) for m in layer_style_methods]
    if layer_style_model and layer_style_model not in [n for n, _, _ in specs]:
        raise UserError(f"layer_style_model {layer_style_model!r} is not in models; pick one of "
                        f"{[n for n, _, _ in specs]}")
    return cells


BENCH_METRICS = ("step_time_s", "step_mem_mb", "ratio_to_nonprivate", "mem_ratio_to_nonprivate", "max_batch_size",
                 "max_batch_size_card")


def record_bench_rows(rec, rows: Sequence[dict[str, Any]], claims: dict | None = None, seed: int | None = None) -> None:
    """Add one tidy row per (cell, metric) to a `dpbench.workbench.results.Recorder`.

    A failed cell gives its metrics as failed rows with the cell's reason; a metric this
    run did not measure (CPU memory in-process, max batch off the gpu profile) is a failed
    row saying why, so every (model, method) is present. Rows that correspond to a paper
    claim carry its claim_id.
    """
    claims = claims or {}
    want_max_batch = any(r.get("max_batch_size") is not None for r in rows)
    for r in rows:
        params = dict(model=r["model"], resolution=r["resolution"], batch_size=r["batch_size"],
                      style=r.get("style") or "flat", device=r.get("device"))
        for metric in BENCH_METRICS:
            if metric.startswith("max_batch") and (not want_max_batch or params["style"] != "flat"
                                                   or (r["status"] == "ok" and r.get(metric) is None)):
                continue  # not asked for in this profile (or for this method: max_batch_methods)
            cid = ""
            if params["style"] == "flat":
                kind = {"step_time_s": "time", "step_mem_mb": "mem", "max_batch_size": "maxbatch"}.get(metric)
                if kind:
                    cid = claim_for(r["model"], r["method"], kind, r["resolution"], claims)
                elif r["method"] == "mixed":
                    cid = {"ratio_to_nonprivate": "C-slowdown-max",
                           "mem_ratio_to_nonprivate": "C-memory-overhead-max"}.get(metric, "")
                    cid = cid if cid in claims else ""
            v = r.get(metric)
            if r["status"] != "ok":
                rec.add(metric, None, method=r["method"], seed=seed, status="failed", reason=r["reason"] or "failed",
                        claim_id=cid, **params)
            elif v is None:
                why = ("CPU peak memory needs a fresh process per cell (isolate=True)"
                       if "mem" in metric else f"{metric} not measured")
                rec.add(metric, None, method=r["method"], seed=seed, status="failed", reason=f"not measured: {why}",
                        claim_id=cid, **params)
            else:
                rec.add(metric, v, method=r["method"], seed=seed, claim_id=cid, **params)
    record_headline_ratios(rec, rows, claims, seed=seed)


# The abstract's VGG19 headline: mixed ghost clipping 3x faster than Opacus, with an 18x larger batch.
HEADLINE_RATIOS = (("speedup_vs_opacus", "step_time_s", "opacus_hooks", "mixed", "C-{m}-speedup-vs-opacus"),
                   ("max_batch_ratio_vs_opacus", "max_batch_size", "mixed", "opacus_hooks", "C-{m}-maxbatch-vs-opacus"))


def record_headline_ratios(rec, rows: Sequence[dict[str, Any]], claims: dict | None = None,
                           seed: int | None = None) -> None:
    """For every paper model with a ratio claim against Opacus (VGG19) at CIFAR size: Opacus's step
    time over mixed's, and mixed's largest batch over Opacus's (under the memory cap). A ratio whose
    parts did not run is a failed row saying which part is missing."""
    claims = claims or {}
    flat = {(r["model"], r["resolution"], r["method"]): r for r in rows if (r.get("style") or "flat") == "flat"}
    first: dict[tuple, dict[str, Any]] = {}
    for (model, res, _), r in flat.items():
        first.setdefault((model, res), r)
    for (model, res), _r in first.items():
        m = PAPER_MODELS.get(model)
        if m is None or res != PAPER_RESOLUTION:
            continue
        for metric, key, num, den, pattern in HEADLINE_RATIOS:
            cid = pattern.format(m=m)
            if cid not in claims:
                continue
            parts = [flat.get((model, res, meth)) for meth in (num, den)]
            vals = [p.get(key) if p and p.get("status") == "ok" else None for p in parts]
            params = dict(model=model, resolution=res, batch_size=_r["batch_size"], style="flat",
                          device=_r.get("device"))
            if None in vals or not vals[1]:
                missing = [meth for meth, v in zip((num, den), vals) if v is None]
                why = "; ".join(f"{meth}: {(p or {}).get('reason') or 'not measured'}"
                                for meth, p in zip((num, den), parts) if meth in missing) or "zero denominator"
                rec.add(metric, None, method="mixed", seed=seed, status="failed", reason=f"no ratio: {why}",
                        claim_id=cid, **params)
            else:
                rec.add(metric, vals[0] / vals[1], method="mixed", seed=seed, claim_id=cid, **params)


ONE_PASS_METHODS = ("bk", "auto", "instantiate")


def backward_passes(row: dict[str, Any]) -> int:
    """Backward passes of one bench cell's step: two for flat clipping with ghost or mixed
    norms (norms first, then the backward of sum_i c_i loss_i), one otherwise (non-private,
    book-keeping, instantiation, and every per-layer style: a layer clips as backprop leaves it)."""
    style = row.get("style") or "flat"
    one = row["method"] == "nonprivate" or row["method"] in ONE_PASS_METHODS or style != "flat"
    return 1 if one else 2


def arm_label(row: dict[str, Any]) -> str:
    """"<method> <style> (<n> pass[es])" of a bench row; the non-private arm has no style."""
    style = row.get("style") or "flat"
    passes = "1 pass" if backward_passes(row) == 1 else "2 passes"
    return f"{row['method']} {style if row['method'] != 'nonprivate' else ''} ({passes})".replace("  ", " ")


def flat_vs_layer_table(rows: Sequence[dict[str, Any]], model: str, methods: Sequence[str]):
    """Claim B.1's arms of one model: non-private and `methods` in every style the bench ran,
    labelled by `arm_label`, with time and memory ratios to non-private, the step's seconds
    and MB, status and reason (a DataFrame, in the bench's row order)."""
    import pandas as pd

    sel = [r for r in rows if r["model"] == model and (r["method"] == "nonprivate" or r["method"] in methods)]
    return pd.DataFrame([{"arm": arm_label(r), "x time": r["ratio_to_nonprivate"], "x mem": r["mem_ratio_to_nonprivate"],
                          "step s": r["step_time_s"], "step MB": r["step_mem_mb"], "status": r["status"],
                          "reason": r["reason"], "pair ratios": r.get("pair_ratios")} for r in sel],
                        columns=["arm", "x time", "x mem", "step s", "step MB", "status", "reason", "pair ratios"])


# ---------------------------------------------------------------------------- notebook 01 figures
# Each returns a matplotlib Figure for `Recorder.figure`; matplotlib is imported here (an optional
# dependency of the library, a notebook's import).

FLOAT32_RESOLUTION = 2.0 ** -23  # relative spacing of float32 numbers near 1


def _status_of(row: dict[str, Any]) -> str:
    return "skipped" if row["reason"].startswith("skipped") else "failed"


def plot_crossover(rows: Sequence[dict[str, Any]], summary: dict[str, Any], *, in_channels: int, out_channels: int,
                   batch_size: int, device: str, max_tmp_mb: float | None = None):
    """Section 1's figure: time, memory and norm agreement of ghost norm and instantiation on one
    Conv2d against the input size. Skipped or failed sizes are marked (x on the axis), never
    dropped; an exact agreement (difference 0) is marked on the axis, not drawn at a fake value."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, axes = plt.subplots(1, 3, figsize=(15, 5.2), layout="constrained")
    sizes = sorted({r["size"] for r in rows})
    styles = {"ghost": ("o-", "C0"), "instantiate": ("s-", "C1")}
    for m, (mk, color) in styles.items():
        mine = [r for r in rows if r["method"] == m]
        ok = [r for r in mine if r["status"] == "ok" and r["time_s"] is not None]
        axes[0].plot([r["size"] for r in ok], [r["time_s"] for r in ok], mk, color=color, label=m)
        ok_mem = [r for r in ok if r["mem_mb"] is not None]
        axes[1].plot([r["size"] for r in ok_mem], [r["mem_mb"] for r in ok_mem], mk, color=color, label=f"{m} (measured)")
        what = "2BT^2, Gram matrices" if m == "ghost" else "BpD, flat: no T in it"
        axes[1].plot([r["size"] for r in mine], [r["pred_mb"] for r in mine], "--", color=color, alpha=0.6,
                     label=f"{m} (predicted: 4 bytes x {what})")
        for status in ("skipped", "failed"):
            gone = [r["size"] for r in mine if r["status"] != "ok" and _status_of(r) == status]
            if not gone:
                continue
            why = (f"skipped: intermediates > {max_tmp_mb:g} MB" if status == "skipped" and max_tmp_mb is not None
                   else status)
            for ax in axes[:2]:
                ax.plot(gone, [0.04] * len(gone), "x", color=color, ms=8, mew=2, transform=ax.get_xaxis_transform(),
                        clip_on=False, label=f"{m} {why}")
    for ax in axes[:2]:
        ax.axvline(summary["predicted_size"], color="k", ls=":", label="predicted crossover 2T^2 = pD")
        if summary["measured_size"]:
            ax.axvline(summary["measured_size"], color="C4", ls="--", label="measured crossover (time)")
        ax.set_yscale("log")
    diffs = [r for r in rows if r["method"] == "ghost" and r.get("rel_diff") is not None]
    pos = [r for r in diffs if r["rel_diff"] > 0]
    axes[2].plot([r["size"] for r in pos], [r["rel_diff"] for r in pos], "o-", color="C0", label="ghost vs instantiated")
    zero = [r["size"] for r in diffs if r["rel_diff"] == 0]
    if zero:
        axes[2].plot(zero, [0.04] * len(zero), "v", color="C0", ms=7, transform=axes[2].get_xaxis_transform(),
                     clip_on=False, label="identical norms (difference 0)")
    if pos:
        axes[2].axhline(FLOAT32_RESOLUTION, color="0.5", ls=":", label="float32 resolution (2^-23)")
        axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlim(min(sizes) / 1.15, max(sizes) * 1.15)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("input size (pixels)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1)
    axes[0].set_ylabel("seconds per norm computation (fastest repeat)")
    axes[0].set_title("time")
    axes[1].set_ylabel("extra memory (MB)")
    axes[1].set_title("memory")
    axes[2].set_ylabel("max relative difference of the norms")
    axes[2].set_title("agreement of the two norms")
    fig.suptitle(f"One Conv2d {in_channels}->{out_channels}, 3x3, batch {batch_size}, {device}: "
                 "ghost norm vs instantiated per-sample gradients")
    return fig


def _ratio_axis(ax) -> None:
    ax.set_yscale("log")
    plain_log_ticks(ax.yaxis)
    ax.axhline(1, color="k", lw=0.8)


def _marks_text(drawn: set[str]) -> str:
    parts = []
    if FAILED in drawn:
        parts.append('"fails": the method could not run (reason in the table)')
    if NOT_MEASURED in drawn:
        parts.append('"not measured": CPU memory needs a fresh process per cell (isolate=True)')
    return ("\n" + "; ".join(parts)) if parts else ""


def plot_step_ratios(flat_rows: Sequence[dict[str, Any]], device: str, repeats: int):
    """Section 3's figure: step time and step memory of every method as ratios to non-private, on
    the same log scale; whiskers span the per-pair time ratios of the interleaved repeats."""
    import matplotlib.pyplot as plt


    fig, axes = plt.subplots(1, 2, figsize=(15, 5), layout="constrained")
    drawn = grouped_bars(axes[0], flat_rows, "ratio_to_nonprivate", "step time / non-private step time (log scale)",
                         spread_key="pair_ratios")
    drawn |= grouped_bars(axes[1], flat_rows, "mem_ratio_to_nonprivate", "step memory / non-private (log scale)")
    for ax in axes:
        _ratio_axis(ax)
    axes[0].set_title("time: median of the per-pair ratios" +
                      (f" (whiskers: min-max over {repeats} interleaved pairs, one seed)" if repeats > 1 else ""))
    axes[1].set_title("memory: one measurement per cell")
    legend_once(fig, axes[0], one_row=True, loc="outside lower center")
    fig.suptitle(f"{device}: ratios to non-private" + _marks_text(drawn))
    return fig


def plot_fixed_batch(flat_rows: Sequence[dict[str, Any]], device: str, max_batch: bool):
    """Section 4's figure: the largest batch (gpu; under the memory cap when one was set), or the step's memory at each
    model's own batch (cpu: resident-set peak above the process baseline)."""
    import matplotlib.pyplot as plt


    fig, ax = plt.subplots(figsize=(12, 4.5), layout="constrained")
    key = "max_batch_size" if max_batch else "step_mem_mb"
    caps = {r.get("max_batch_cap_gb") for r in flat_rows if r.get("max_batch_cap_gb")}
    under = f" under {caps.pop():g} GB" if len(caps) == 1 else ""
    label = f"largest batch that runs{under}" if max_batch else "step memory above the process baseline (MB)"
    drawn = grouped_bars(ax, flat_rows, key, label)
    if max_batch:
        ax.set_yscale("log", base=2)
    legend_once(ax, fontsize=8, ncol=4)
    title = (f"largest batch that fits{under} (doubling, then bisection)" if max_batch
             else "memory of one training step at each model's own batch (named under its group)")
    ax.set_title(f"{title} ({device})" + _marks_text(drawn))
    return fig


def plot_flat_vs_layer(table, model: str, device: str, repeats: int):
    """Section 5's figure: time and memory ratios of the flat and per-layer arms of claim B.1,
    with the per-pair time ratios' range as whiskers."""
    import matplotlib.pyplot as plt


    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    bars_marking_missing(axes[0], table["arm"], table["x time"], ranges=list(table["pair ratios"]))
    bars_marking_missing(axes[1], table["arm"], table["x mem"])
    axes[0].set_ylabel("step time / non-private (median of pairs)")
    axes[1].set_ylabel("step memory / non-private")
    axes[0].set_title(f"time (whiskers: min-max over {repeats} interleaved pairs, one seed)" if repeats > 1
                      else "time (one pair: no spread)")
    axes[1].set_title("memory (one measurement per arm)")
    for ax in axes:
        ax.axhline(1, color="k", lw=0.8)
        ax.set_xlabel("clipping arm (backward passes)")
    fig.suptitle(f"Flat vs per-layer clipping: {model} ({device})")
    return fig


def flat_vs_layer_note(table) -> str:
    """One sentence comparing bk flat (one backward pass) with mixed flat (two), from the table."""
    def ratio(prefix: str):
        hit = table[table["arm"].str.startswith(prefix) & (table["status"] == "ok")]["x time"].dropna()
        return float(hit.iloc[0]) if len(hit) else None

    bk, mixed = ratio("bk flat"), ratio("mixed flat")
    if bk is None or mixed is None:
        return "bk flat or mixed flat did not run: no comparison of one backward pass against two."
    if bk <= mixed:
        return (f"bk flat (1 pass) took {bk:.2f}x non-private, mixed flat (2 passes) {mixed:.2f}x: "
                "saving the second backward pass pays, as book-keeping predicts.")
    return (f"bk flat (1 pass) took {bk:.2f}x non-private, more than mixed flat (2 passes) at {mixed:.2f}x: "
            "here forming every layer's clipped sum from the stored activations and output gradients costs "
            "more than the second backward pass it saves (see the note below).")
