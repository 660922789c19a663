"""The package's shape: layers import only downward, and the one training loop stays small."""

from __future__ import annotations

import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_fit_has_at_most_12_parameters():
    from dpbench.training.loop import fit

    params = inspect.signature(fit).parameters
    assert len(params) <= 12, list(params)


def test_import_layers_contract_is_kept():
    """`lint-imports` (import-linter) checks the layers contract in pyproject.toml."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    proc = subprocess.run([exe], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_contract_has_no_ignored_imports():
    text = (REPO / "pyproject.toml").read_text()
    assert "[tool.importlinter]" in text and "ignore_imports" not in text
