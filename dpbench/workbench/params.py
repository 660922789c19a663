"""Notebook parameters: profiles, the `parameters` cell, `params/NB/<profile>.yaml`,
`-p KEY VALUE` overrides, type and range checks, and the pre-flight checks (device, data
sets) that run before any kernel starts. Everything here raises `UserError` with one line.
"""

from __future__ import annotations

import ast
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from dpbench.errors import UserError


PROFILES = ("smoke", "cpu", "gpu", "gpu-quick")


# Profiles meant for CUDA. gpu-quick (~6 minutes on one GPU, for short loans of a GPU) exists only
# for the notebooks that have a params/NB/gpu-quick.yaml; `reproduce --profile gpu-quick` runs those.
GPU_PROFILES = ("gpu", "gpu-quick")


RESERVED = ("profile", "output_dir", "seed", "device")


# Keys the user may set in a profile or with -p among the reserved ones; the runner owns
# `profile` (the chosen profile) and `output_dir` (the run folder).
USER_SETTABLE_RESERVED = ("seed", "device")


META_KEYS = ("requires", "exclusive")


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
    """`profile` if it is one of `PROFILES`; else UserError listing them."""
    if profile not in PROFILES:
        raise UserError(f"unknown profile {profile!r}; valid profiles: {', '.join(PROFILES)}")
    return profile


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
    import yaml  # not at module level: `dpbench --help` and the parser stay light

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
    dry_run: dict[str, Any] | None = None  # set by dpbench.workbench.dryrun: what changed, what is not exercised

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
        covered = [nb for nb in list_notebooks(repo) if profile in list_profiles(repo, nb)]
        scope = f"; the {profile} profile covers only: {', '.join(covered)}" if profile != "gpu" and covered else ""
        raise UserError(
            f"{notebook} has no {profile} profile (params/{notebook}/{profile}.yaml); its profiles: {have}{scope}"
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


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (a function so tests can stand in for hardware)."""
    import torch

    return torch.cuda.is_available()


def check_device(spec: RunSpec) -> None:
    """Refuse a run that needs CUDA on a machine without it (never fall back quietly):
    device "cuda"/"cuda:N", or a gpu profile (`GPU_PROFILES`) unless its device is "auto" or
    "cpu" (a notebook that gains nothing on a GPU says `device: cpu` in its gpu profile)."""
    device = spec.device
    if device == "auto":
        return
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", device):
        raise UserError(f"{spec.notebook}: unknown device {device!r}; use cpu, cuda, cuda:N, mps or auto")
    if (device.startswith("cuda") or (spec.profile in GPU_PROFILES and device != "cpu")) and not cuda_available():
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


def weight_names(params: dict[str, Any]) -> list[str]:
    """timm model names whose pretrained (hub) weights a run asks for, by the notebooks'
    conventions: `backbone: hub` loads `public_model`'s hub weights; a `backbone` whose
    `backbone_prefer` starts with "timm" wants that model's hub weights; `pretrained: true`
    (or `*_pretrained: true`) wants the weights of `model_name` (or the matching `*_model`);
    `pretrained_model(s)` / `hub_model(s)` name them directly."""
    names: list[str] = []

    def add(value: Any) -> None:
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, str) and v and v not in names:
                names.append(v)

    if params.get("backbone") == "hub":
        add(params.get("public_model"))
    prefer = params.get("backbone_prefer")
    if isinstance(prefer, (list, tuple)) and prefer and prefer[0] == "timm" and params.get("backbone") not in ("", "pixels", None):
        add(params.get("backbone"))
    for key, value in params.items():
        if value is True and (key == "pretrained" or key.endswith("_pretrained")):
            stem = key[: -len("_pretrained")] if key != "pretrained" else ""
            add(params.get(f"{stem}_model") or params.get(f"{stem}_model_name") if stem else params.get("model_name"))
        if key in ("pretrained_model", "pretrained_models", "hub_model", "hub_models") or key.endswith("_hub_model"):
            add(value)
    return names


def check_weights(spec: RunSpec) -> None:
    """Refuse a run whose pretrained weights are not in the local timm / Hugging Face cache,
    unless downloading is enabled (`--download`): one line naming the weights, where they
    were looked for, and `dpbench prepare`."""
    names = weight_names(spec.params)
    if not names or os.environ.get("DPBENCH_DOWNLOAD", "0").strip() == "1":
        return
    from dpbench.workbench import prepare  # imports timm's registry; only when weights are named

    for name in names:
        where = prepare.weights_path(name)
        if where.path is None:
            raise UserError(
                f"{spec.notebook}: pretrained weights {name} ({where.source}) are not in the local cache "
                f"({where.cache}); run `dpbench prepare --profile {spec.profile}` (with network), or --download, "
                f"or choose other weights (e.g. -p backbone_prefer '[checkpoint, public]')"
            )


def preflight(spec: RunSpec) -> None:
    """Everything checked before a kernel starts (parameters were checked by `resolve`)."""
    check_device(spec)
    check_datasets(spec)
    check_weights(spec)
