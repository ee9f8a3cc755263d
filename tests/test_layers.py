"""The import layers of pyproject.toml hold, and the contract catches an import that breaks them."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

if shutil.which("lint-imports") is None and importlib.util.find_spec("importlinter") is None:
    pytest.skip("import-linter is not installed (the `dev` extra)", allow_module_level=True)


def _lint_module():  # scripts/ is not a package: load the script by path
    spec = importlib.util.spec_from_file_location("lint_imports", ROOT / "scripts/lint_imports.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tree_keeps_its_layers() -> None:
    result = _lint_module().lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_leaf_importing_a_higher_layer_breaks_the_contract(tmp_path: Path) -> None:
    """`bnexport/ort.py` (a leaf under parity) importing `bnexport.parity` is reported, by chain."""
    lint = _lint_module()
    package = lint.stage(ROOT, tmp_path)
    ort = package / "ort.py"
    ort.write_text(ort.read_text() + "\nimport bnexport.parity  # a forbidden import\n")
    result = lint.lint(ROOT, staged=package)
    assert result.returncode == 1
    assert "1 broken" in result.stdout
    assert "bnexport.ort -> bnexport.parity" in result.stdout
