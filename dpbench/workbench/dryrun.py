"""`dpbench run NB --profile gpu --dry-run`: a notebook's gpu code path at toy size on the CPU.

`dryrun_params` maps a profile's parameters to dry-run parameters by rules, so the dry run
follows whatever the profile says:
- code paths are kept: strings, booleans, dicts and lists of strings (models, methods, arms,
  variants, data set names, backbones) come from the profile unchanged;
- sizes shrink: a numeric size (steps, epochs, batches, seeds, repeats, examples, trials, n,
  threads, ...) takes the smoke profile's value when that is smaller (the smoke profile is
  known to run in seconds), else `SIZE_CAPS`; a numeric sweep keeps one value (the smoke
  profile's list when shorter); image sizes are at most 32 px (`"model@224:64"` becomes
  `"model@32:4"`);
- device is "cpu";
- `params/NB/<profile>-dryrun.yaml`, when present, is applied last (a notebook whose sizes
  must stay consistent with each other says so there).
A zero is never shrunk or raised (zero means "off" or "all" in these notebooks).

The kernel runs with stand-ins, never the real files: data sets backed by files are replaced
by small synthetic sets of the real name, shape and class count (`dpbench.data.STANDIN_ENV`;
torchvision's md5 checks make fake files in the real format impossible), and every pretrained
weight the profile names is a local file of random weights in a temporary Hugging Face cache,
in the hub's layout, so the loading code is the real one (`HF_HUB_OFFLINE=1`, no network).
CUDA is hidden. Results go to `results/dryrun/<profile>/NB`, never `results/gpu/`. What the
CPU cannot exercise is printed and kept in the manifest (`dry_run.not_exercised`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

from dpbench.errors import UserError
from dpbench.workbench import params as P
from dpbench.workbench.runner import RESULTS_ROOT_ENV, Runner
from dpbench.workbench.scheduling import run_in_order, topological, upstream_failed

MAX_PX = 32
EXAMPLES_KEY = r"^(synthetic|regime)_(n|test|public|public_val)$"
TINY_EXAMPLES = 1000
TINY_EPOCHS = 0.25  # training epochs at most this (a few steps on the stand-in sets)
TINY_BATCH = 32  # training batches at most this (physical chunks half of it, so chunking still happens)
# Upper bounds for sizes the smoke profile does not bound (key pattern, cap).
SIZE_CAPS = [(r"(^|_)batch(_size)?$|^max_physical_batch$", 16), (r"(^|_)(steps|epochs)$", 4),
             (r"seeds$", 2), (r"(^|_)(repeats|warmup)$", 1), (r"(trials|canaries)$", 500),
             (r"(^|_)n$|_n$|_(test|public|public_val)$|examples$", 512), (r"num_threads$", 1), (r"(^|_)num_", 3)]
SIZE_KEY = re.compile(
    r"(^|_)(steps|step|epochs|batch|batch_size|seeds|repeats|warmup|examples|probes|samples|trials|canaries|n|test|"
    r"public|public_val|threads|pool_size|stages|dim|var_samples)$|^max_physical_batch$|^n_|(^|_)num_"
)
TOL_KEY = re.compile(r"(^|_)(tol|tolerance)$")  # a looser tolerance: fewer search iterations
PX_KEY = re.compile(r"(^|_)(img_size|image_size|resize|resize_to|px)$|^size$")
MODEL_SPEC = re.compile(r"^(?P<name>[^@:]+)@(?P<px>\d+)(:(?P<batch>\d+))?$")  # notebook 01's "name@px:batch"


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _shrink_number(key: str, value, smoke) -> Any:
    if value == 0:
        return value
    if TOL_KEY.search(key):
        return max(value, smoke) if _is_num(smoke) else value
    if PX_KEY.search(key):
        return min(value, MAX_PX) if not _is_num(smoke) or smoke == 0 else min(value, max(smoke, 1), MAX_PX)
    if not SIZE_KEY.search(key):
        return value
    if _is_num(smoke) and smoke > 0:
        out = min(value, smoke)
    else:
        out = value
        for pattern, cap in SIZE_CAPS:
            if re.search(pattern, key):
                out = min(out, cap)
                break
    if re.search(r"(^|_)num_(?!threads)", key):  # points of a grid (rates, batches, steps, seeds): two show the path
        out = min(out, 2)
    if re.search(EXAMPLES_KEY, key):  # example counts of synthetic tasks: a few hundred run every path
        out = min(out, TINY_EXAMPLES)
    if re.search(r"(^|_)epochs$", key) and not key.startswith("fig"):  # training, not accounting grids
        out = min(out, TINY_EPOCHS)
    if re.search(r"(^|_)batch_size$|^max_physical_batch$", key):
        out = min(out, TINY_BATCH if key != "max_physical_batch" else TINY_BATCH // 2)
    return type(value)(out) if isinstance(value, int) else float(out)


def _family(spec: str) -> str:
    """A model's family: its name without digits and size words (resnet18/resnet50 -> resnet)."""
    name = spec.split("@", 1)[0]
    return re.sub(r"\d+|(^|_)(tiny|small|base|large|huge)(?=_|$)", "", name)


def _shrink_list(key: str, value: list, smoke) -> list:
    if key.endswith("_datasets") and len(value) > 1 and all(isinstance(v, str) for v in value):
        return value[:1]  # a sweep over data sets of one loader is one code path (the others are listed)
    if not value or not all(_is_num(v) for v in value):
        out: list = []
        for v in value:
            v = _shrink_model(v) if isinstance(v, str) else v
            # notebook 01's "name@px:batch" specs: one model per family and size is one code path
            if isinstance(v, str) and MODEL_SPEC.match(v):
                if any(isinstance(o, str) and _family(o) == _family(v) and o.split("@")[1] == v.split("@")[1] for o in out):
                    continue
            if v not in out:
                out.append(v)
        return out
    if PX_KEY.search(key.rstrip("s")) or key.endswith("_sizes"):
        small = sorted({min(v, MAX_PX) for v in value})
        return small[:2]
    if isinstance(smoke, list) and smoke and len(smoke) < len(value) and all(_is_num(v) for v in smoke):
        return list(smoke)
    return value[:1]


def _shrink_model(spec: str) -> str:
    m = MODEL_SPEC.match(spec)
    if not m:
        return spec
    out = f"{m['name']}@{min(int(m['px']), MAX_PX)}"
    return out + (f":{min(int(m['batch']), 4)}" if m["batch"] else "")


def _folded(changes: dict[str, tuple[Any, Any]]) -> dict[str, list[str]]:
    """Model specs of a sweep that the dry run folded into another of their family."""
    out = {}
    for key, (old, new) in changes.items():
        if isinstance(old, list) and isinstance(new, list) and all(isinstance(v, str) and MODEL_SPEC.match(v) for v in old):
            gone = [v for v in old if _shrink_model(v) not in new]
            if gone:
                out[key] = gone
    return out


def dryrun_params(gpu: dict[str, Any], smoke: dict[str, Any] | None = None,
                  override: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, tuple[Any, Any]]]:
    """(dry-run parameters, {key: (profile value, dry-run value)} for every change) from a
    profile's parameters, the smoke profile's (sizes known to be small) and the override file."""
    smoke = smoke or {}
    out: dict[str, Any] = {}
    for key, value in gpu.items():
        if key in P.META_KEYS:
            continue
        if key == "device":
            new = "cpu"
        elif _is_num(value):
            new = _shrink_number(key, value, smoke.get(key))
        elif isinstance(value, list):
            new = _shrink_list(key, value, smoke.get(key))
        elif isinstance(value, str):
            new = _shrink_model(value)
        elif isinstance(value, dict):  # model kwargs: image sizes inside them shrink too (resize_to: 224)
            new = {k: min(v, MAX_PX) if PX_KEY.search(k) and _is_num(v) and v > 0 else v for k, v in value.items()}
        else:
            new = value
        out[key] = new
    out["device"] = "cpu"
    out.update({k: v for k, v in (override or {}).items() if k not in P.META_KEYS})
    changes = {k: (gpu.get(k), v) for k, v in out.items() if gpu.get(k) != v}
    return out, changes


def not_exercised(spec_params: dict[str, Any], profile_params: dict[str, Any], weights: list[str],
                  datasets: list[str], exclusive: bool) -> list[str]:
    """What the CPU dry run cannot exercise for this notebook (listed, never skipped silently)."""
    device = str(profile_params.get("device", "cpu"))
    notes = []
    if device.startswith("cuda") or device == "auto":
        notes.append("CUDA kernels and their numerics (cuDNN/TF32 convolutions, device placement on a GPU): ran on the CPU")
    if exclusive or any(k in profile_params for k in ("repeats", "wall_repeats", "crossover_repeats")):
        notes.append("GPU timings and memory peaks (torch.cuda.max_memory_allocated, cuda.synchronize): CPU timings instead")
    if profile_params.get("max_batch"):
        notes.append("largest batch under a CUDA memory cap (torch.cuda.set_per_process_memory_fraction): "
                     "the bisection runs only in its unit test, against a fake out-of-memory error")
    mech = " ".join(str(m) for m in profile_params.get("mechanisms", []) or [])
    if "data_parallel" in mech or "pipeline" in mech:
        notes.append("NCCL collectives (data-parallel and pipeline noise run over gloo on the CPU)")
    if datasets:
        notes.append("real data: " + ", ".join(datasets) + " replaced by synthetic stand-ins of the same name, shape "
                     "and classes (accuracies are meaningless)")
    if weights:
        notes.append("pretrained weights: " + ", ".join(weights) + " replaced by local random weights in a temporary "
                     "hub cache (the loading code is the real one)")
    big = {k: v for k, v in profile_params.items() if PX_KEY.search(k) and _is_num(v) and v > MAX_PX}
    big.update({f"{k}.{kk}": vv for k, v in profile_params.items() if isinstance(v, dict)
                for kk, vv in v.items() if PX_KEY.search(kk) and _is_num(vv) and vv > MAX_PX})
    big_models = [m for m in profile_params.get("models", []) or [] if isinstance(m, str) and MODEL_SPEC.match(m)
                  and int(MODEL_SPEC.match(m)["px"]) > MAX_PX]
    if big or big_models:
        notes.append(f"images above {MAX_PX} px ({', '.join([f'{k}={v}' for k, v in big.items()] + big_models)}): "
                     f"run at {MAX_PX} px")
    return notes


def resolve(repo: str | os.PathLike, notebook: str, profile: str = "gpu") -> P.RunSpec:
    """The dry-run spec of `notebook`'s `profile`: resolved like a normal run (every key checked
    against the parameters cell), then mapped by `dryrun_params`, then checked again."""
    repo = Path(repo)
    real = P.resolve(repo, notebook, profile)
    nb = real.notebook
    smoke_path = repo / "params" / nb / "smoke.yaml"
    smoke = P.load_yaml(smoke_path) if smoke_path.is_file() else {}
    override_path = repo / "params" / nb / f"{profile}-dryrun.yaml"
    override = P.load_yaml(override_path) if override_path.is_file() else {}
    user = {k: v for k, v in real.params.items() if k != "profile"}
    dry, changes = dryrun_params(user, smoke, override)
    # The same type and range checks as any run; strings go JSON-quoted so that "" stays "".
    spec = P.resolve(repo, nb, profile, {k: json.dumps(v) if isinstance(v, str) else v for k, v in dry.items()})
    names = P.dataset_names(spec.params)
    from dpbench import data

    file_backed = [n for n in names if (data.DATASETS.get(n.split(":", 1)[0]) or data.DATASETS["synthetic"]).required_files]
    weights = P.weight_names(spec.params)
    spec.dry_run = {
        "from_profile": profile,
        "override_file": str(override_path.relative_to(repo)) if override else None,
        "changes": {k: {"profile": a, "dry_run": b} for k, (a, b) in changes.items()},
        "stand_in_datasets": file_backed,
        "random_weights": weights,
        "not_exercised": not_exercised(spec.params, user, weights, file_backed, real.exclusive)
        + [f"{k}: {', '.join(gone)} not run (each has a model of its family at {MAX_PX} px that runs)"
           for k, gone in _folded(changes).items()]
        + [f"{k}: {', '.join(a[1:])} not run ({a[0]} runs the same loader and code)"
           for k, (a, b) in changes.items() if k.endswith("_datasets") and isinstance(a, list) and b == a[:1]]
        + [f"{k}: {user.get(k)!r} of the profile, set to {v!r} by {override_path.relative_to(repo)}"
           for k, v in override.items() if user.get(k) != v],
    }
    return spec


# create_model's own keywords; the others in a `*model_kwargs` dict go to timm (the architecture)
DPBENCH_MODEL_KEYS = {"num_classes", "in_chans", "img_size", "pretrained", "checkpoint", "norm", "zero_head", "resize_to"}


def arch_kwargs(params: dict[str, Any], name: str) -> dict[str, Any]:
    """The timm architecture keywords a run builds weights' model `name` with (from
    `public_model_kwargs` or `model_kwargs`), so the random weights fit the model they load into."""
    for model_key, kwargs_key in (("public_model", "public_model_kwargs"), ("model_name", "model_kwargs")):
        kw = params.get(kwargs_key)
        if params.get(model_key) == name and isinstance(kw, dict):
            return {k: v for k, v in kw.items() if k not in DPBENCH_MODEL_KEYS}
    return {}


@contextlib.contextmanager
def environment(weights: dict[str, dict[str, Any]] | list[str]) -> Iterator[Path]:
    """The dry run's process environment: stand-in data, CUDA hidden, an offline hub cache in a
    temporary folder holding random weights for `weights` (name -> timm architecture keywords).
    Restored afterwards."""
    keys = ("DPBENCH_STANDIN_DATA", "CUDA_VISIBLE_DEVICES", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "DPBENCH_DOWNLOAD",
            "DPBENCH_FEATURES")
    saved = {k: os.environ.get(k) for k in keys}
    with tempfile.TemporaryDirectory(prefix="dpbench-dryrun-") as tmp:
        cache = Path(tmp) / "hub"
        os.environ.update({"DPBENCH_STANDIN_DATA": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_CACHE": str(cache),
                           "HF_HUB_OFFLINE": "1", "DPBENCH_DOWNLOAD": "0",
                           # features of stand-in data never enter the real feature cache
                           "DPBENCH_FEATURES": str(Path(tmp) / "features")})
        try:
            for name in weights:
                write_random_weights(name, cache, **(weights.get(name) or {} if isinstance(weights, dict) else {}))
            yield cache
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def write_random_weights(name: str, cache: Path, **arch: Any) -> Path:
    """A safetensors file of timm `name`'s randomly initialised weights (its default config, as
    the hub file would be, or the architecture keywords `arch` the dry run builds it with),
    placed where the hub cache keeps the real one."""
    import timm
    from safetensors.torch import save_file

    from dpbench.workbench.prepare import WEIGHT_FILES, _repo_folder, weights_source

    source, _ = weights_source(name)
    if source.startswith("http"):
        raise UserError(f"dry run: {name}'s weights are not on the Hugging Face hub ({source}); "
                        f"the dry run can stand in only for hub weights")
    folder = cache / _repo_folder(source)
    snap = folder / "snapshots" / "dryrun"
    snap.mkdir(parents=True, exist_ok=True)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text("dryrun")
    model = timm.create_model(name, pretrained=False, **arch)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = snap / WEIGHT_FILES[0]
    save_file(state, str(path))
    return path


def run(notebooks: list[str], profile: str = "gpu", *, repo=None, results=None, force: bool = True,
        progress: bool = True, out=None, jobs: int = 1):
    """Dry-run `notebooks` (and any upstream they require) in dependency order; returns the
    RunResults in that order. Fails like a real run on any crash, shape error or missing key.
    `jobs` > 1 runs up to that many kernels at once (one CPU thread each), a notebook only
    after its upstreams finished ok."""
    if profile not in P.GPU_PROFILES:
        raise UserError(f"--dry-run is for the gpu profiles ({', '.join(P.GPU_PROFILES)}), not "
                        f"{profile!r}: run the {profile} profile itself, it already runs on the CPU")
    runner = Runner(repo, results, progress=progress, out=out, dry_run=True)
    specs: dict[str, P.RunSpec] = {}

    def visit(nb: str, chain: tuple[str, ...]) -> None:
        if nb in chain:
            raise UserError(f"dependency cycle in `requires`: {' -> '.join(chain + (nb,))}; break the cycle")
        if nb in specs:
            return
        spec = resolve(runner.repo, nb, profile)
        specs[spec.notebook] = spec
        for up in spec.requires:
            visit(up, chain + (spec.notebook,))

    for nb in notebooks:
        visit(P.check_notebook(runner.repo, nb).stem, ())
    ordered = topological(specs)
    weights: dict[str, dict] = {}
    for s in ordered:
        for w in s.dry_run["random_weights"]:
            weights.setdefault(w, arch_kwargs(s.params, w))
    with environment(weights):
        for spec in ordered:
            P.check_datasets(spec)  # the stand-ins and random weights are in place: the real pre-flight
            P.check_weights(spec)
            lines = spec.dry_run["not_exercised"] or ["(nothing: the CPU runs this notebook's whole gpu path)"]
            runner._say(f"{spec.notebook} [{profile} dry run]: not exercised on the CPU:\n  - " + "\n  - ".join(lines))
        # upstream_dir() in the kernels looks here; set once, so parallel runs agree on it
        os.environ[RESULTS_ROOT_ENV] = str(runner.root_for(profile))
        try:
            results = run_in_order(runner, ordered, force=force) if jobs <= 1 else _run_jobs(runner, ordered, force, jobs)
        finally:
            os.environ.pop(RESULTS_ROOT_ENV, None)
    return [_check_rows(runner, r) for r in results]


def _run_jobs(runner: Runner, specs: list[P.RunSpec], force: bool, jobs: int) -> list:
    """Run `specs` on `jobs` threads (each drives its own kernel), in their (dependency) order; a
    notebook whose upstream failed is failed without running, as in `run_in_order`."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    done: dict[str, Any] = {}
    pending = list(specs)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        running: dict[Any, P.RunSpec] = {}
        while pending or running:
            for spec in list(pending):
                if len(running) >= jobs:
                    break
                ups = [u for u in spec.requires if u in {s.notebook for s in specs}]
                bad = [u for u in ups if u in done and not done[u].ok]
                if bad:
                    done[spec.notebook] = upstream_failed(runner, spec, bad)
                    pending.remove(spec)
                elif all(u in done for u in ups):
                    running[pool.submit(runner.run, spec, force)] = spec
                    pending.remove(spec)
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                done[running.pop(fut).notebook] = fut.result()
    return [done[s.notebook] for s in specs]


# A row whose reason is an exception ("RuntimeError: ...") is a crash the notebook caught and
# recorded; in a dry run it fails the notebook. Rows a CPU cannot measure ("not measured: ...")
# are not crashes, and neither are a peer library's own failures (Opacus on timm's ResNets, whose
# in-place residual add its hooks reject): those are the bench's findings, listed, not dpbench bugs.
CRASH_REASON = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b")


def _check_rows(runner: Runner, result):
    """`result`, turned failed when its metrics.csv holds rows that recorded a caught exception
    (the manifest says so too)."""
    import csv

    from dpbench.atomic import write_json_atomic

    path = Path(result.path) / "metrics.csv"
    if result.status != "ok" or not path.is_file():
        return result
    from dpbench.training.bench import OPACUS_METHODS as PEER_METHODS  # the bench's peer baselines
    with open(path, newline="") as f:
        caught = [r for r in csv.DictReader(f) if r.get("status") == "failed" and CRASH_REASON.match(r.get("reason") or "")]
    crashed = [r for r in caught if r.get("method") not in PEER_METHODS]
    peers = sorted({f"{r['method']}{' on ' + r['model'] if r.get('model') else ''}: {r['reason'][:120]}"
                    for r in caught if r.get("method") in PEER_METHODS})
    if peers:
        runner._say(f"{result.notebook} [{result.profile} dry run]: peer baselines failed (recorded as findings, "
                    f"not dpbench errors): " + " | ".join(peers[:4]))
    if not crashed:
        return result
    kinds = sorted({f"{r.get('method') or '?'}{' on ' + r['model'] if r.get('model') else ''}: {r['reason'][:160]}" for r in crashed})
    msg = f"{len(crashed)} metrics rows recorded a caught exception: " + " | ".join(kinds[:4])
    manifest = json.loads((Path(result.path) / "manifest.json").read_text())
    manifest["status"] = "failed"
    manifest["error"] = {"name": "DryRunCaughtException", "message": msg}
    write_json_atomic(Path(result.path) / "manifest.json", manifest)
    runner._say(f"{result.notebook} [{result.profile} dry run]: FAILED {msg}")
    result.status, result.error = "failed", manifest["error"]
    return result
