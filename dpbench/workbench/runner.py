"""Run notebooks with papermill: profiles, parameter checks, pre-flight, caching, provenance.

A run of notebook NB on profile P reads `params/NB/P.yaml`, applies `-p KEY VALUE`
overrides, checks every key and type against the notebook's `parameters` cell, checks the
device and the data sets, and only then starts a kernel. The notebook executes into a
temporary folder `results/P/.tmp-NB-*`; on success a `manifest.json` is written there and
the folder replaces `results/P/NB` atomically; on failure it goes to `results/P/.failed/NB`
and the last good results stay as they were. A rerun whose cache key (notebook, params,
dpbench source, environment, upstream manifests) matches an `ok` manifest is skipped.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from dpbench.workbench import provenance
from dpbench.errors import UserError

PROFILES = ("smoke", "cpu", "gpu")
RESERVED = ("profile", "output_dir", "seed", "device")
# Keys the user may set in a profile or with -p among the reserved ones; the runner owns
# `profile` (the chosen profile) and `output_dir` (the run folder).
USER_SETTABLE_RESERVED = ("seed", "device")
META_KEYS = ("requires", "exclusive")
KERNEL_NAME = "dpbench"
FAILED_DIR = ".failed"
RESULTS_ENV = "DPBENCH_RESULTS"
RESULTS_ROOT_ENV = "DPBENCH_RESULTS_ROOT"
ROOT_ENV = "DPBENCH_ROOT"


# --------------------------------------------------------------------------- locations


def find_repo(start: str | os.PathLike | None = None) -> Path:
    """The repository root: `$DPBENCH_ROOT`, else the first folder from `start` (default
    the current directory) upwards that holds both `notebooks/` and `params/`."""
    env = os.environ.get(ROOT_ENV)
    if env:
        root = Path(env).expanduser().resolve()
        if not (root / "notebooks").is_dir() or not (root / "params").is_dir():
            raise UserError(f"${ROOT_ENV}={env} has no notebooks/ and params/ folders; point it at the dpbench checkout")
        return root
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "notebooks").is_dir() and (folder / "params").is_dir():
            return folder
    raise UserError(
        f"no dpbench checkout (a folder with notebooks/ and params/) at or above {here}; "
        f"cd into the repository or set ${ROOT_ENV}"
    )


def results_root(repo: str | os.PathLike | None = None) -> Path:
    """Where results land: `$DPBENCH_RESULTS`, else `<repo>/results`."""
    env = os.environ.get(RESULTS_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return Path(repo or find_repo()) / "results"


def upstream_dir(profile: str, notebook: str) -> Path:
    """The results folder of an upstream notebook, for a notebook that uses its outputs
    (e.g. 03's public checkpoint). Inside a runner-started kernel the results root comes
    from `$DPBENCH_RESULTS_ROOT`; interactively it is found like the runner finds it.
    Raises UserError when that notebook has no successful run on `profile`."""
    root = os.environ.get(RESULTS_ROOT_ENV)
    base = Path(root) if root else results_root()
    path = base / profile / notebook
    manifest = read_manifest(path)
    if not manifest or manifest.get("status") != "ok":
        raise UserError(
            f"no successful results of {notebook} on profile {profile} at {path}; "
            f"run `dpbench run {notebook} --profile {profile}` first"
        )
    return path


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest.json in `folder`, or None when there is none (or it is unreadable)."""
    path = Path(folder) / "manifest.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- discovery


def list_notebooks(repo: str | os.PathLike) -> list[str]:
    """Names (file stems) of `notebooks/*.ipynb`, sorted."""
    return sorted(p.stem for p in (Path(repo) / "notebooks").glob("*.ipynb"))


def list_profiles(repo: str | os.PathLike, notebook: str) -> list[str]:
    """The profiles that `params/<notebook>/` has a yaml file for (known ones first)."""
    folder = Path(repo) / "params" / notebook
    names = {p.stem for p in folder.glob("*.yaml")} if folder.is_dir() else set()
    return [p for p in PROFILES if p in names] + sorted(names - set(PROFILES))


def check_notebook(repo: str | os.PathLike, notebook: str) -> Path:
    """The path of `notebooks/<notebook>.ipynb`; UserError listing the valid names if absent."""
    name = notebook[:-6] if notebook.endswith(".ipynb") else notebook
    name = Path(name).name
    path = Path(repo) / "notebooks" / f"{name}.ipynb"
    if not path.is_file():
        valid = ", ".join(list_notebooks(repo)) or "(none)"
        raise UserError(f"unknown notebook {notebook!r}; valid notebooks: {valid}")
    return path


def check_profile(profile: str) -> str:
    """`profile` if it is one of smoke, cpu, gpu; else UserError listing them."""
    if profile not in PROFILES:
        raise UserError(f"unknown profile {profile!r}; valid profiles: {', '.join(PROFILES)}")
    return profile


# --------------------------------------------------------------------------- parameters


def parameters_cell(nb_path: str | os.PathLike) -> dict[str, Any]:
    """The defaults of a notebook's `parameters` cell (the first code cell tagged
    "parameters"), parsed with ast: every statement must be `name = <literal>`."""
    nb_path = Path(nb_path)
    try:
        nb = json.loads(nb_path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read notebook {nb_path}: {exc}") from None
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            source = cell.get("source", "")
            source = "".join(source) if isinstance(source, list) else source
            return parse_parameters(source, where=str(nb_path))
    raise UserError(f"{nb_path} has no code cell tagged 'parameters'; tag its first code cell 'parameters'")


def parse_parameters(source: str, where: str = "parameters cell") -> dict[str, Any]:
    """Parse `name = literal` assignments (comments allowed) into a dict, in order."""
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise UserError(f"{where}: the parameters cell is not valid Python (line {exc.lineno}): {exc.msg}") from None
    out: dict[str, Any] = {}
    for stmt in tree.body:
        target = None
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            target, value = stmt.targets[0].id, stmt.value
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
            target, value = stmt.target.id, stmt.value
        if target is None:
            raise UserError(f"{where}: line {stmt.lineno} of the parameters cell is not a `name = literal` assignment")
        try:
            out[target] = ast.literal_eval(value)
        except ValueError:
            raise UserError(f"{where}: parameter {target!r} (line {stmt.lineno}) is not a literal value") from None
    return out


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A profile yaml as a dict (empty file -> {}); malformed YAML is a UserError with the
    file and line."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"malformed YAML in {path}{line}: {problem}; fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path} must be a mapping of parameter: value, not a {type(data).__name__}")
    return data


def parse_value(text: str, key: str = "") -> Any:
    """A `-p KEY VALUE` value, parsed as YAML so numbers, bools and lists work."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # A list, mapping or quoted value that does not parse is a typo, not a string.
        if text.lstrip()[:1] in ("[", "{", "'", '"'):
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise UserError(f"malformed YAML in -p {key or 'KEY'} {text!r}: {problem}; "
                            f"close every bracket and quote, e.g. -p {key or 'KEY'} '[1, 2]'") from None
        # Anything else that is not valid YAML (e.g. "a: b: c") is taken as the plain string.
        return text


# Value ranges of the parameters whose meaning is fixed by their name, checked before any
# kernel starts so that a bad value never reaches the notebook. (predicate, what it must be)
def _in_open_unit(v: float) -> bool:
    return 0 < v < 1


RANGE_RULES: list[tuple[Any, Any, str]] = [
    (lambda k: k == "delta" or k.endswith("_delta"), _in_open_unit, "in (0, 1)"),
    (lambda k: k == "confidence" or k.endswith("_confidence"), _in_open_unit, "in (0, 1)"),
    (lambda k: "epsilon" in k, lambda v: v > 0, "> 0"),
    (lambda k: "fraction" in k, lambda v: 0 <= v <= 1, "in [0, 1]"),
    (lambda k: k.endswith("_rate") and "lr" not in k, lambda v: 0 < v <= 1, "in (0, 1]"),
    (lambda k: k in ("lr", "max_grad_norm", "clip_norm") or k.endswith("_lr"), lambda v: v > 0, "> 0"),
    (lambda k: k.endswith("seeds"), lambda v: v >= 1, ">= 1"),
    (lambda k: k in ("steps", "epochs", "repeats") or k.startswith(("n_", "num_"))
     or k.endswith(("_steps", "_epochs", "_repeats", "batch_size", "_batch", "_examples", "_probes", "_sizes", "_grid")),
     lambda v: v >= 0, ">= 0"),
]


def check_range(key: str, value: Any, where: str = "") -> None:
    """UserError when a known parameter (delta, epsilons, fractions, rates, counts) is out
    of range; each element of a list is checked. Other keys are not range-checked."""
    if key in RESERVED:
        return
    for applies, ok, want in RANGE_RULES:
        if not applies(key):
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not ok(v):
                src = f" ({where})" if where else ""
                raise UserError(f"parameter {key!r}{src} must be {want}, got {v!r}; fix the value")
        return


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def coerce_value(key: str, value: Any, default: Any, where: str = "") -> Any:
    """`value` checked against the type of the parameter's `default` (int accepted where a
    float is expected, a list where a tuple is; a None default accepts anything). Strings
    that spell a float (YAML reads "1e-3" as text) become floats. UserError on mismatch."""
    src = f" ({where})" if where else ""
    if default is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    elif isinstance(default, (list, tuple)):
        if isinstance(value, (list, tuple)):
            if default:
                # Elements follow the defaults' element type; mixed int/float defaults are floats.
                proto = 0.0 if any(isinstance(d, float) for d in default) else default[0]
                value = [coerce_value(f"{key}[{i}]", v, proto, where) for i, v in enumerate(value)]
            return type(default)(value)
    elif isinstance(default, dict):
        if isinstance(value, dict):
            return value
    elif type(value) is type(default):
        return value
    raise UserError(
        f"parameter {key!r}{src} must be {_type_name(default)} like its default {default!r}, "
        f"got {_type_name(value)} {value!r}"
    )


@dataclass
class RunSpec:
    """A validated, resolved run: everything needed to start a kernel."""

    notebook: str
    profile: str
    nb_path: Path
    params_path: Path | None
    params: dict[str, Any]  # resolved, including profile/seed/device (output_dir added at run time)
    requires: list[str] = field(default_factory=list)
    exclusive: bool = False  # a timing notebook: `exclusive: true` in its params runs it alone

    @property
    def device(self) -> str:
        return str(self.params.get("device", "cpu"))


def resolve(
    repo: str | os.PathLike,
    notebook: str,
    profile: str,
    overrides: Iterable[tuple[str, str]] | dict[str, Any] = (),
) -> RunSpec:
    """Read `params/<notebook>/<profile>.yaml`, apply overrides (strings parsed as YAML),
    check every key and type against the parameters cell, and inject the reserved keys."""
    repo = Path(repo)
    check_profile(profile)
    nb_path = check_notebook(repo, notebook)
    notebook = nb_path.stem
    defaults = parameters_cell(nb_path)
    params_path = repo / "params" / notebook / f"{profile}.yaml"
    if not params_path.is_file():
        have = ", ".join(list_profiles(repo, notebook)) or "none"
        raise UserError(
            f"{notebook} has no {profile} profile (params/{notebook}/{profile}.yaml); its profiles: {have}"
        )
    raw = load_yaml(params_path)
    requires = raw.pop("requires", []) or []
    if isinstance(requires, str):
        requires = [requires]
    if not isinstance(requires, list) or not all(isinstance(r, str) for r in requires):
        raise UserError(f"{params_path}: `requires` must be a list of notebook names")
    for up in requires:
        check_notebook(repo, up)
    exclusive = raw.pop("exclusive", False)
    if not isinstance(exclusive, bool):
        raise UserError(f"{params_path}: `exclusive` must be true or false (true: the notebook times things and runs alone)")

    items = overrides.items() if isinstance(overrides, dict) else overrides
    sources = {k: (v, f"params/{notebook}/{profile}.yaml") for k, v in raw.items()}
    for key, text in items:
        value = parse_value(text, key) if isinstance(text, str) else text
        sources[key] = (value, "-p")

    valid = sorted(set(defaults) - set(RESERVED)) + list(USER_SETTABLE_RESERVED)
    params: dict[str, Any] = {}
    for key, (value, where) in sources.items():
        if key in ("profile", "output_dir"):
            raise UserError(f"parameter {key!r} ({where}) is set by the runner; remove it")
        if key in META_KEYS:
            raise UserError(f"{key!r} ({where}) can only be set in the profile yaml")
        if key not in defaults and key not in USER_SETTABLE_RESERVED:
            raise UserError(f"unknown parameter {key!r} ({where}) for {notebook}; valid parameters: {', '.join(valid)}")
        default = defaults.get(key, 0 if key == "seed" else "cpu")
        params[key] = coerce_value(key, value, default, where)
        check_range(key, params[key], where)

    resolved = {
        "profile": profile,
        "seed": params.pop("seed", defaults.get("seed", 0)),
        "device": params.pop("device", defaults.get("device", "cpu")),
    }
    resolved.update(params)
    return RunSpec(notebook, profile, nb_path, params_path, resolved, list(requires), exclusive)


# --------------------------------------------------------------------------- pre-flight


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (a function so tests can stand in for hardware)."""
    import torch

    return torch.cuda.is_available()


def check_device(spec: RunSpec) -> None:
    """Refuse a run that needs CUDA on a machine without it (never fall back quietly):
    device "cuda"/"cuda:N", or the gpu profile unless the device is "auto"."""
    device = spec.device
    if device == "auto":
        return
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", device):
        raise UserError(f"{spec.notebook}: unknown device {device!r}; use cpu, cuda, cuda:N, mps or auto")
    if (device.startswith("cuda") or spec.profile == "gpu") and not cuda_available():
        raise UserError(
            f"{spec.notebook}: profile {spec.profile} asks for device {device!r} but no CUDA device is available; "
            f"run on a GPU machine, use --profile cpu, or set `-p device auto`"
        )


def dataset_names(params: dict[str, Any]) -> list[str]:
    """Data set names a run needs: params `dataset`, `*_dataset`, and lists `datasets`/`*_datasets`."""
    names: list[str] = []
    for key, value in params.items():
        if key == "dataset" or key.endswith("_dataset"):
            values = [value]
        elif key == "datasets" or key.endswith("_datasets"):
            values = value if isinstance(value, (list, tuple)) else [value]
        else:
            continue
        names += [v for v in values if isinstance(v, str) and v and v not in names]
    return names


def check_datasets(spec: RunSpec) -> None:
    """Ask dpbench.data whether every data set the run needs is available (offline and
    missing -> its UserError). Skipped when dpbench.data is not installed."""
    names = dataset_names(spec.params)
    if not names:
        return
    try:
        from dpbench import data
    except ModuleNotFoundError as exc:
        if exc.name in ("dpbench.data",):
            return
        raise
    root = spec.params.get("data_root") or None
    # A notebook with a `download` parameter may fetch missing data; otherwise the data
    # module's own default decides.
    kw = {"download": spec.params["download"]} if "download" in spec.params else {}
    for name in names:
        data.check_available(name, root, **kw)


def preflight(spec: RunSpec) -> None:
    """Everything checked before a kernel starts (parameters were checked by `resolve`)."""
    check_device(spec)
    check_datasets(spec)


# --------------------------------------------------------------------------- execution


@dataclass
class RunResult:
    """Outcome of one notebook: status is ok, skipped (cached) or failed."""

    notebook: str
    profile: str
    status: str
    path: Path
    duration_s: float = 0.0
    error: dict[str, str] | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "skipped")


def kernel_name() -> str:
    """The "dpbench" kernel when `make venv` registered it in this environment, else
    "python3" (which jupyter_client maps to this interpreter)."""
    spec = Path(sys.prefix) / "share" / "jupyter" / "kernels" / KERNEL_NAME / "kernel.json"
    return KERNEL_NAME if spec.is_file() else "python3"


class Runner:
    """Runs notebooks of one repository, with one results root."""

    def __init__(self, repo: str | os.PathLike | None = None, results: str | os.PathLike | None = None,
                 progress: bool = True, out=None):
        self.repo = Path(repo).resolve() if repo else find_repo()
        self.results = Path(results) if results else results_root(self.repo)
        self.progress = progress
        self.out = out or sys.stderr
        self._env: dict[str, Any] | None = None
        self._source: str | None = None

    # -- paths
    def result_dir(self, profile: str, notebook: str) -> Path:
        return self.results / profile / notebook

    def failed_dir(self, profile: str, notebook: str) -> Path:
        return self.results / profile / FAILED_DIR / notebook

    # -- planning
    def plan(self, notebooks: list[str], profile: str, overrides=(), run_missing_upstream: bool = True) -> list[RunSpec]:
        """Resolve and pre-flight `notebooks` plus (when `run_missing_upstream`) every
        upstream without an ok result; return them in dependency order. Overrides apply to
        the named notebooks only. Raises UserError before anything runs."""
        check_profile(profile)
        specs: dict[str, RunSpec] = {}
        explicit = [check_notebook(self.repo, nb).stem for nb in notebooks]

        def visit(nb: str, chain: tuple[str, ...]) -> None:
            if nb in chain:
                raise UserError(f"dependency cycle in `requires`: {' -> '.join(chain + (nb,))}; break the cycle")
            if nb in specs:
                return
            spec = resolve(self.repo, nb, profile, overrides if nb in explicit else ())
            for up in spec.requires:
                manifest = read_manifest(self.result_dir(profile, up))
                have = manifest is not None and manifest.get("status") == "ok"
                if up in explicit or not have:
                    if not run_missing_upstream and not have:
                        raise UserError(f"{nb} requires {up}, which has no ok results on profile {profile}")
                    visit(up, chain + (nb,))
            specs[nb] = spec

        for nb in explicit:
            visit(nb, ())
        ordered = topological(specs)
        for spec in ordered:
            preflight(spec)
        return ordered

    # -- cache
    def environment(self) -> dict[str, Any]:
        if self._env is None:
            self._env = provenance.environment()
        return self._env

    def source_hash(self) -> str:
        if self._source is None:
            self._source = provenance.source_hash()
        return self._source

    def upstream_hashes(self, spec: RunSpec) -> dict[str, str]:
        """sha256 of each upstream's manifest.json (a rerun upstream changes the key)."""
        out = {}
        for up in spec.requires:
            path = self.result_dir(spec.profile, up) / "manifest.json"
            manifest = read_manifest(path.parent)
            if not manifest or manifest.get("status") != "ok":
                raise UserError(f"{spec.notebook} requires {up}, which has no ok results on profile {spec.profile}")
            out[up] = provenance.sha256_file(path)
        return out

    def hashes(self, spec: RunSpec) -> dict[str, Any]:
        return {
            "notebook": provenance.sha256_file(spec.nb_path),
            "params_file": provenance.sha256_file(spec.params_path) if spec.params_path else None,
            "params": provenance.sha256_json(spec.params),
            "dpbench_source": self.source_hash(),
            "environment": provenance.sha256_json(self.environment()),
        }

    def cache_key(self, spec: RunSpec, hashes: dict[str, Any], upstream: dict[str, str]) -> str:
        return provenance.sha256_json(
            {k: hashes[k] for k in ("notebook", "params", "dpbench_source", "environment")} | {"upstream": upstream}
        )

    # -- running
    def run(self, spec: RunSpec, force: bool = False) -> RunResult:
        """Execute one resolved, pre-flighted notebook (or skip it when cached)."""
        dest = self.result_dir(spec.profile, spec.notebook)
        upstream = self.upstream_hashes(spec)
        hashes = self.hashes(spec)
        key = self.cache_key(spec, hashes, upstream)
        old = read_manifest(dest)
        if not force and old and old.get("status") == "ok" and old.get("cache_key") == key:
            self._say(f"{spec.notebook} [{spec.profile}]: up to date, skipped (use --force to rerun)")
            return RunResult(spec.notebook, spec.profile, "skipped", dest)

        import papermill as pm
        from traitlets.config import Config

        profile_dir = self.results / spec.profile
        profile_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{spec.notebook}-", dir=profile_dir))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; results are ordinary files
        params = dict(spec.params, output_dir=str(tmp))
        kernel = kernel_name()
        started, t0 = provenance.now_iso(), time.perf_counter()
        error = None
        self._say(f"{spec.notebook} [{spec.profile}]: running")
        saved_env = os.environ.get(RESULTS_ROOT_ENV)
        os.environ[RESULTS_ROOT_ENV] = str(self.results)
        sockets = Path(tempfile.mkdtemp(prefix="dpbench-kernel-"))  # short: Unix socket paths are capped
        try:
            pm.execute_notebook(
                str(spec.nb_path),
                str(tmp / "executed.ipynb"),
                parameters=params,
                kernel_name=kernel,
                progress_bar=self.progress,
                cwd=str(spec.nb_path.parent),
                log_output=False,
                config=_kernel_config(Config, sockets),
            )
        except KeyboardInterrupt:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except Exception as exc:  # any notebook/kernel failure is recorded, not raised
            error = error_info(exc)
        finally:
            shutil.rmtree(sockets, ignore_errors=True)
            if saved_env is None:
                os.environ.pop(RESULTS_ROOT_ENV, None)
            else:
                os.environ[RESULTS_ROOT_ENV] = saved_env
        duration = time.perf_counter() - t0
        status = "ok" if error is None else "failed"
        final = dest if status == "ok" else self.failed_dir(spec.profile, spec.notebook)
        manifest = provenance.build_manifest(
            notebook=spec.notebook,
            profile=spec.profile,
            status=status,
            params=dict(spec.params, output_dir=str(final)),
            cache_key=key,
            hashes=hashes,
            upstream=upstream,
            repo=self.repo,
            env=self.environment(),
            device=spec.device,
            seed=spec.params.get("seed"),
            started=started,
            duration_s=duration,
            kernel=kernel,
            output_dir=tmp,
            error=error,
        )
        # The notebook wrote into a temporary folder that is renamed into place; record both.
        manifest["run_dir"] = str(final)
        manifest["executed_in"] = str(tmp)
        from dpbench.atomic import write_json_atomic

        write_json_atomic(tmp / "manifest.json", manifest)
        swap_in(tmp, final)
        if error:
            self._say(f"{spec.notebook} [{spec.profile}]: FAILED {error['name']}: {error['message']} (see {final})")
        else:
            self._say(f"{spec.notebook} [{spec.profile}]: ok in {duration:.1f} s -> {final}")
        return RunResult(spec.notebook, spec.profile, status, final, duration, error)

    def run_many(self, specs: list[RunSpec], force: bool = False, forced: Iterable[str] = ()) -> list[RunResult]:
        """Run specs in order; a notebook whose upstream failed is not started (failed
        with the reason). `force` reruns everything, `forced` only the named notebooks."""
        from tqdm.auto import tqdm

        forced = set(forced)
        results: list[RunResult] = []
        failed: set[str] = set()
        bar = tqdm(specs, desc="notebooks", unit="nb", disable=not self.progress or len(specs) < 2, file=self.out)
        for spec in bar:
            bar.set_postfix_str(spec.notebook)
            bad = [up for up in spec.requires if up in failed]
            if bad:
                err = {"name": "UpstreamFailed", "message": f"upstream {', '.join(bad)} failed"}
                self._say(f"{spec.notebook} [{spec.profile}]: not run, {err['message']}")
                results.append(RunResult(spec.notebook, spec.profile, "failed", self.failed_dir(spec.profile, spec.notebook), 0.0, err))
                failed.add(spec.notebook)
                continue
            res = self.run(spec, force=force or spec.notebook in forced)
            results.append(res)
            if not res.ok:
                failed.add(spec.notebook)
        return results

    def _say(self, msg: str) -> None:
        print(msg, file=self.out, flush=True)

    # -- status
    def status(self, profile: str, notebook: str) -> str:
        """Last run's status of a notebook on a profile: ok, failed, ok (last attempt
        failed), or "-" when never run."""
        good = read_manifest(self.result_dir(profile, notebook))
        bad = read_manifest(self.failed_dir(profile, notebook))
        if bad and (not good or str(bad.get("started", "")) > str(good.get("started", ""))):
            return "failed" if not good or good.get("status") != "ok" else "ok (last attempt failed)"
        if good:
            return str(good.get("status", "?"))
        return "-"


def _kernel_config(config_cls, socket_dir: Path):
    """Kernels talk to the runner over Unix sockets in a private folder of their own
    instead of loopback TCP: nothing listens on a port, parallel jobs cannot cross wires,
    and ipykernel no longer warns that TCP traffic is unencrypted."""
    config = config_cls()
    config.KernelManager.transport = "ipc"
    config.KernelManager.ip = str(socket_dir / "kernel")
    return config


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def error_info(exc: BaseException) -> dict[str, str]:
    """Error name and first message line; papermill's execution error carries the
    notebook's exception as `ename`/`evalue`."""
    name = getattr(exc, "ename", None) or type(exc).__name__
    text = str(getattr(exc, "evalue", None) or exc).strip()
    return {"name": str(name), "message": text.splitlines()[0][:2000] if text else ""}


def topological(specs: dict[str, RunSpec]) -> list[RunSpec]:
    """Specs ordered so every upstream (among them) comes first; ties by name."""
    order: list[RunSpec] = []
    done: set[str] = set()

    def visit(name: str) -> None:
        if name in done or name not in specs:
            return
        done.add(name)
        for up in specs[name].requires:
            visit(up)
        order.append(specs[name])

    for name in sorted(specs):
        visit(name)
    return order


def swap_in(src: Path, dest: Path) -> None:
    """Replace folder `dest` with `src`: rename the old one aside, rename the new one in,
    then delete the old one; readers see either the old or the new folder, never a mix."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if dest.exists():
        old = dest.with_name(f".old-{dest.name}-{os.getpid()}-{time.time_ns()}")
        os.rename(dest, old)
    try:
        os.rename(src, dest)
    except BaseException:
        if old is not None:
            os.rename(old, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- entry points


def run_notebook(notebook: str, profile: str, overrides=(), force: bool = False, repo=None, progress: bool = True) -> list[RunResult]:
    """`dpbench run`: pre-flight the notebook and any missing upstreams, then run them."""
    runner = Runner(repo, progress=progress)
    specs = runner.plan([notebook], profile, overrides)
    name = check_notebook(runner.repo, notebook).stem
    return runner.run_many(specs, forced=[name] if force else ())


def reproduce(profile: str, force: bool = False, repo=None, progress: bool = True, jobs: int = 1) -> list[RunResult]:
    """`dpbench reproduce`: every notebook that has this profile, in dependency order,
    continuing after failures. All pre-flight checks happen before the first kernel.
    `jobs` > 1 runs independent notebooks at once (see `run_parallel`)."""
    if isinstance(jobs, bool) or int(jobs) != jobs or jobs < 1:
        raise UserError(f"--jobs must be a positive integer, got {jobs!r}")
    runner = Runner(repo, progress=progress)
    check_profile(profile)
    names = [nb for nb in list_notebooks(runner.repo) if profile in list_profiles(runner.repo, nb)]
    if not names:
        raise UserError(f"no notebook has a {profile} profile (params/NB/{profile}.yaml)")
    specs = runner.plan(names, profile)
    if jobs > 1:
        return run_parallel(runner, specs, int(jobs), force=force)
    return runner.run_many(specs, force=force)


# --------------------------------------------------------------------------- parallel runs

# Notebooks that measure time or memory: they run alone, never beside another job.
JOB_RESULT_TAG = "DPBENCH_JOB_RESULT "
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
ADDRESS_IN_USE = "Address already in use"


def _gpu_count() -> int:
    if not cuda_available():
        return 0
    import torch

    return torch.cuda.device_count()


def job_env(spec: RunSpec, jobs: int, runtime_dir: str, gpu: int | None = None, cores: int | None = None) -> dict[str, str]:
    """Environment of one isolated job: its own Jupyter runtime folder (connection files),
    its share of the CPU threads (cores / jobs; all cores for an exclusive notebook) and,
    for a CUDA notebook, its own GPU."""
    env = dict(os.environ)
    cores = cores or os.cpu_count() or 1
    threads = cores if spec.exclusive else max(1, cores // jobs)
    for k in THREAD_ENV:
        env[k] = str(threads)
    env["JUPYTER_RUNTIME_DIR"] = runtime_dir
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return env


def _run_job(runner: Runner, spec: RunSpec, jobs: int, force: bool, gpu: int | None, retries: int = 2) -> RunResult:
    """Run one notebook in a child process (`python -m dpbench.workbench.runner --job ...`)."""
    import subprocess

    cmd = [sys.executable, "-m", "dpbench.workbench.runner", "--job", spec.notebook, spec.profile,
           "--repo", str(runner.repo), "--results", str(runner.results)] + (["--force"] if force else [])
    t0 = time.perf_counter()
    for attempt in range(retries + 1):
        with tempfile.TemporaryDirectory(prefix=f"dpbench-kernel-{spec.notebook}-") as rt:
            proc = subprocess.run(cmd, env=job_env(spec, jobs, rt, gpu), capture_output=True, text=True,
                                  cwd=str(runner.repo))
        line = next((l for l in reversed(proc.stdout.splitlines()) if l.startswith(JOB_RESULT_TAG)), None)
        if line is not None:
            d = json.loads(line[len(JOB_RESULT_TAG):])
            res = RunResult(d["notebook"], d["profile"], d["status"], Path(d["path"]), d["duration_s"], d["error"])
            # A kernel that could not bind its ports never ran the notebook: start it again.
            if res.status == "failed" and ADDRESS_IN_USE in json.dumps(res.error) and attempt < retries:
                continue
            return res
        tail = " ".join((proc.stderr or proc.stdout or "").split())[-1000:]
        if ADDRESS_IN_USE in tail and attempt < retries:
            continue
        err = {"name": "JobCrashed", "message": f"job process exited with code {proc.returncode}: {tail}"}
        return RunResult(spec.notebook, spec.profile, "failed", runner.failed_dir(spec.profile, spec.notebook),
                         time.perf_counter() - t0, err)
    raise AssertionError("unreachable")


def run_parallel(runner: Runner, specs: list[RunSpec], jobs: int, force: bool = False) -> list[RunResult]:
    """Run planned specs with up to `jobs` child processes at once.

    A notebook starts when all its upstreams finished ok (it fails as UpstreamFailed when
    one failed); notebooks whose params say `exclusive: true` start only on an idle machine and keep it to
    themselves. Each job is a separate process with its own Jupyter runtime folder, so
    kernels never share connection files, and a crash is that job's failure only. CUDA
    notebooks get one GPU each (at most one job per GPU). Results come back in plan order.
    """
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    names = {s.notebook for s in specs}
    pending = list(specs)
    done: dict[str, RunResult] = {}
    running: dict[Any, tuple[RunSpec, int | None]] = {}
    n_gpu = _gpu_count()
    free_gpus = list(range(n_gpu))
    self_say = runner._say
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending or running:
            started = True
            while started:
                started = False
                exclusive_running = any(s.exclusive for s, _ in running.values())
                for spec in list(pending):
                    ups = [u for u in spec.requires if u in names]
                    bad = [u for u in ups if u in done and not done[u].ok]
                    if bad:
                        err = {"name": "UpstreamFailed", "message": f"upstream {', '.join(bad)} failed"}
                        self_say(f"{spec.notebook} [{spec.profile}]: not run, {err['message']}")
                        done[spec.notebook] = RunResult(spec.notebook, spec.profile, "failed",
                                                        runner.failed_dir(spec.profile, spec.notebook), 0.0, err)
                        pending.remove(spec)
                        started = True
                        continue
                    if not all(u in done for u in ups) or len(running) >= jobs or exclusive_running:
                        continue
                    if spec.exclusive and running:
                        continue
                    gpu = None
                    if spec.device.startswith("cuda") and n_gpu:
                        if not free_gpus:
                            continue
                        gpu = free_gpus.pop(0)
                    self_say(f"{spec.notebook} [{spec.profile}]: started (job {len(running) + 1} of {jobs})")
                    fut = pool.submit(_run_job, runner, spec, jobs, force, gpu)
                    running[fut] = (spec, gpu)
                    pending.remove(spec)
                    started = True
                    if spec.exclusive:
                        break
            if not running:
                if pending:  # cannot happen with a topological plan; never spin
                    raise UserError(f"cannot schedule {[s.notebook for s in pending]}: upstreams missing from the plan")
                break
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                spec, gpu = running.pop(fut)
                if gpu is not None:
                    free_gpus.append(gpu)
                try:
                    res = fut.result()
                except Exception as exc:  # the job machinery itself failed: still only this job
                    res = RunResult(spec.notebook, spec.profile, "failed",
                                    runner.failed_dir(spec.profile, spec.notebook), 0.0, error_info(exc))
                done[spec.notebook] = res
                if res.ok:
                    self_say(f"{spec.notebook} [{spec.profile}]: {res.status} ({res.duration_s:.1f} s)")
                else:
                    err = res.error or {}
                    self_say(f"{spec.notebook} [{spec.profile}]: FAILED {err.get('name', '')}: {err.get('message', '')}")
    return [done[s.notebook] for s in specs]


def _job_main(argv: list[str] | None = None) -> int:
    """Child side of `run_parallel`: run one notebook, print its RunResult as one JSON line."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m dpbench.workbench.runner")
    ap.add_argument("--job", nargs=2, metavar=("NOTEBOOK", "PROFILE"), required=True)
    ap.add_argument("--repo", required=True)
    ap.add_argument("--results", required=True)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    nb, profile = a.job
    runner = Runner(a.repo, a.results, progress=False)
    try:
        spec = resolve(runner.repo, nb, profile)
        preflight(spec)
        res = runner.run(spec, force=a.force)
    except UserError as exc:
        res = RunResult(nb, profile, "failed", runner.failed_dir(profile, nb), 0.0,
                        {"name": "UserError", "message": " ".join(str(exc).split())})
    print(JOB_RESULT_TAG + json.dumps({"notebook": res.notebook, "profile": res.profile, "status": res.status,
                                       "path": str(res.path), "duration_s": res.duration_s, "error": res.error}),
          flush=True)
    return 0


def failure_summary(results: list[RunResult]) -> str:
    """A few lines naming each failed notebook, its error and where its executed copy is."""
    failed = [r for r in results if not r.ok]
    ok = sum(r.status == "ok" for r in results)
    skipped = sum(r.status == "skipped" for r in results)
    lines = [f"{ok} ran ok, {skipped} up to date, {len(failed)} failed"]
    for r in failed:
        err = r.error or {}
        lines.append(f"  FAILED {r.notebook} [{r.profile}]: {err.get('name', '')}: {err.get('message', '')} ({r.path})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(_job_main())
