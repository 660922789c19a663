"""Config consistency of every profile of every notebook (issue 18): keys are parameters of the
notebook, `requires` is neither dangling nor stale, and backbones, checkpoints and resizing
fit together (a network runs at the image size it was trained at; a checkpoint loads into the
architecture and class count it was saved from)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dpbench.workbench import params

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = params.list_notebooks(REPO)
PROFILE_FILES = sorted(REPO.glob("params/*/*.yaml"))
CLASSES = {"digits": 10, "mnist": 10, "fashion_mnist": 10, "cifar10": 10, "svhn": 10, "cifar100": 100}
TRAINED_HERE_PX = 32  # what notebook 03 and the public backbones train at (the data sets' size)


def _source(nb: str) -> str:
    cells = json.loads((REPO / "notebooks" / f"{nb}.ipynb").read_text())["cells"]
    return "\n".join("".join(c["source"]) if isinstance(c["source"], list) else c["source"]
                     for c in cells if c["cell_type"] == "code")


def _merged(nb: str, profile: str) -> dict:
    p = params.parameters_cell(REPO / "notebooks" / f"{nb}.ipynb")
    p.update(params.load_yaml(REPO / "params" / nb / f"{profile}.yaml"))
    return p


def _profiles():
    return [(nb, prof) for nb in NOTEBOOKS for prof in params.list_profiles(REPO, nb) if not prof.endswith("-dryrun")]


def test_every_profile_file_belongs_to_a_notebook():
    assert PROFILE_FILES
    for path in PROFILE_FILES:
        assert path.parent.name in NOTEBOOKS, f"{path} belongs to no notebook"


@pytest.mark.parametrize("path", PROFILE_FILES, ids=lambda p: f"{p.parent.name[:2]}-{p.stem}")
def test_every_key_is_a_parameter_of_the_notebook(path):
    defaults = params.parameters_cell(REPO / "notebooks" / f"{path.parent.name}.ipynb")
    allowed = set(defaults) - {"profile", "output_dir"} | set(params.META_KEYS) | set(params.USER_SETTABLE_RESERVED)
    unknown = sorted(set(params.load_yaml(path)) - allowed)
    assert not unknown, f"{path.relative_to(REPO)}: not parameters of the notebook: {unknown}"
    if not path.stem.endswith("-dryrun"):
        params.resolve(REPO, path.parent.name, path.stem)  # types and ranges too


@pytest.mark.parametrize("nb,profile", _profiles())
def test_requires_names_notebooks_whose_outputs_are_read(nb, profile):
    raw = params.load_yaml(REPO / "params" / nb / f"{profile}.yaml")
    requires = raw.get("requires", []) or []
    read = set(re.findall(r"upstream_dir\(\s*profile\s*,\s*[\"']([^\"']+)[\"']", _source(nb)))
    for up in requires:
        assert up in NOTEBOOKS, f"{nb} [{profile}] requires {up!r}, which is no notebook"
        assert up in read, f"{nb} [{profile}] requires {up} but never reads its outputs (upstream_dir)"
        assert profile in params.list_profiles(REPO, up), f"{up} has no {profile} profile for {nb} to require"
    p = _merged(nb, profile)
    # notebook 04's backbones: "upstream" needs 03's checkpoint; "hub" and "public" never read it
    if p.get("backbone") == "upstream" and not p.get("public_dataset"):
        assert read & set(requires), f"{nb} [{profile}]: backbone upstream reads 03's checkpoint: add `requires`"
    if p.get("backbone") in ("hub", "public") and "backbone_prefer" not in p:
        assert not requires, f"{nb} [{profile}]: `requires: {requires}` is stale (backbone {p['backbone']} reads no upstream)"


def _input_px(model: str) -> int:
    """The image size timm's pretrained weights for `model` were trained at."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model)
    return int((cfg.input_size if cfg else (3, 224, 224))[-1])


@pytest.mark.parametrize("nb,profile", _profiles())
def test_backbones_checkpoints_and_resize_fit_together(nb, profile):
    p = _merged(nb, profile)
    weights = params.weight_names(p)
    kwargs = p.get("public_model_kwargs") or {}
    # hub weights run at the size they were trained at; a network trained here, at the data's 32 px
    if p.get("backbone") == "hub":
        from dpbench.workbench import prepare

        prepare.weights_source(p["public_model"])  # a timm model that has hub weights
        px = kwargs.get("resize_to") or kwargs.get("img_size") or TRAINED_HERE_PX
        assert px == _input_px(p["public_model"]), (
            f"{nb} [{profile}]: {p['public_model']}'s hub weights were trained at {_input_px(p['public_model'])} px, "
            f"the profile runs them at {px} px")
    elif "backbone" in p and "backbone_prefer" not in p:  # notebook 04 with a backbone trained here or in 03
        assert (kwargs.get("resize_to") or TRAINED_HERE_PX) == TRAINED_HERE_PX, (
            f"{nb} [{profile}]: backbone {p['backbone']} is trained at {TRAINED_HERE_PX} px, not resized")
    if p.get("backbone") in ("upstream", "auto") and not p.get("public_dataset") and "backbone_prefer" not in p:
        up = _merged("03_public_pretraining", profile) if profile in params.list_profiles(REPO, "03_public_pretraining") else None
        if up is not None:  # 03's checkpoint loads into public_model and was trained on this data set's classes
            assert up["model_name"] == p["public_model"], (
                f"{nb} [{profile}]: 03's checkpoint is a {up['model_name']}, loaded into public_model {p['public_model']}")
            assert CLASSES.get(up["dataset"]) == CLASSES.get(p["dataset"]), (
                f"{nb} [{profile}]: 03's checkpoint has {CLASSES.get(up['dataset'])} classes, {p['dataset']} "
                f"{CLASSES.get(p['dataset'])}")
    # notebook 05's feature backbone: timm weights at their own size; a resize is meant for them only
    prefer = p.get("backbone_prefer") or []
    if prefer and p.get("backbone") not in ("pixels", ""):
        if prefer[0] == "timm" and p["backbone"] in weights:
            assert p.get("resize", 0) in (0, _input_px(p["backbone"])), (
                f"{nb} [{profile}]: {p['backbone']}'s weights were trained at {_input_px(p['backbone'])} px, "
                f"resize is {p.get('resize')}")
        if "timm" not in prefer:
            assert not p.get("resize"), f"{nb} [{profile}]: resize {p['resize']} without hub weights (trained at 32 px)"
