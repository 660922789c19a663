"""Every notebook's parameters cell agrees with its params/NB/{smoke,cpu,gpu}.yaml.

The parameters-cell defaults ARE the smoke profile (what nbval runs), so smoke.yaml must
equal them minus the reserved keys; cpu.yaml and gpu.yaml may only set keys the cell
defines, with values of the same type. Checked statically: no kernel starts here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpbench.workbench import params

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
IDS = [p.stem for p in NOTEBOOKS]


def _yaml(nb: Path, profile: str) -> dict:
    path = REPO / "params" / nb.stem / f"{profile}.yaml"
    assert path.is_file(), f"{nb.stem} needs params/{nb.stem}/{profile}.yaml"
    return params.load_yaml(path)


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=IDS)
def test_parameters_cell_is_literals_with_reserved_keys(nb):
    defaults = params.parameters_cell(nb)  # raises UserError on anything but `name = literal`
    assert list(defaults)[:4] == list(params.RESERVED), "the cell starts with profile, output_dir, seed, device"
    assert defaults["profile"] == "smoke" and defaults["output_dir"] == ""
    assert isinstance(defaults["seed"], int) and isinstance(defaults["device"], str)


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=IDS)
def test_smoke_yaml_equals_cell_defaults(nb):
    defaults = params.parameters_cell(nb)
    smoke = {k: v for k, v in _yaml(nb, "smoke").items() if k not in params.META_KEYS}
    expected = {k: v for k, v in defaults.items() if k not in params.RESERVED}
    assert smoke == expected


# Notebooks whose gpu profile runs on the CPU on purpose (a GPU would not speed them up).
CPU_IN_GPU_PROFILE = {"06_privacy_audit"}


@pytest.mark.parametrize("profile", ["smoke", "cpu", "gpu", "gpu-quick"])
@pytest.mark.parametrize("nb", NOTEBOOKS, ids=IDS)
def test_profile_keys_exist_with_matching_types(nb, profile):
    defaults = params.parameters_cell(nb)
    if profile == "gpu-quick" and not (REPO / "params" / nb.stem / "gpu-quick.yaml").is_file():
        pytest.skip("gpu-quick is optional (notebook 01 only)")
    profile_values = _yaml(nb, profile)
    for key, value in profile_values.items():
        if key == "exclusive":
            assert isinstance(value, bool), "exclusive: true or false"
            continue
        if key == "requires":
            names = [value] if isinstance(value, str) else value
            for up in names:
                assert (REPO / "notebooks" / f"{up}.ipynb").is_file(), f"requires unknown notebook {up}"
            continue
        assert key not in ("profile", "output_dir"), f"{key} is injected by the runner"
        assert key in defaults, f"{profile}.yaml key {key!r} is not in the parameters cell"
        params.coerce_value(key, value, defaults[key], f"{profile}.yaml")  # UserError on a type mismatch
    # The whole resolution path (the one `dpbench run` takes) accepts it too.
    spec = params.resolve(REPO, nb.stem, profile)
    if profile in params.GPU_PROFILES:
        assert spec.device == "auto" or spec.device.startswith("cuda") or (
            nb.stem in CPU_IN_GPU_PROFILE and spec.device == "cpu")
    else:
        assert spec.device == "cpu"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=IDS)
def test_notebook_stored_without_outputs(nb):
    data = json.loads(nb.read_text())
    assert data["metadata"].get("kernelspec", {}).get("name") == "python3"
    for cell in data["cells"]:
        if cell["cell_type"] == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, "strip outputs before committing"


MAX_CODE_LINES = 150


def _code_lines(nb: Path) -> list[str]:
    cells = json.loads(nb.read_text())["cells"]
    lines = []
    for cell in cells:
        if cell["cell_type"] == "code":
            src = "".join(cell["source"])
            lines += [ln for ln in src.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return lines


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=IDS)
def test_notebook_is_thin(nb):
    """Logic lives in dpbench (where tests reach it); a notebook calls it and plots."""
    lines = _code_lines(nb)
    assert len(lines) <= MAX_CODE_LINES, f"{nb.stem} has {len(lines)} code lines (at most {MAX_CODE_LINES})"
    defs = [ln.strip() for ln in lines if ln.lstrip().startswith(("def ", "class ", "async def "))]
    assert not defs, f"{nb.stem} defines {defs}: move them into dpbench.experiments"


def test_no_library_module_names_a_notebook():
    """Notebooks pass paths and names in; the library never names one."""
    names = [p.stem for p in NOTEBOOKS]
    offenders = []
    for path in (REPO / "dpbench").rglob("*.py"):
        text = path.read_text()
        offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n in text]
    assert not offenders, offenders
