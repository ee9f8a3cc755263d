"""Check the import layers of pyproject.toml's ``[tool.importlinter]`` with import-linter.

`cli/` is installed as ``bnexport.cli`` (pyproject's ``package-dir``), which import-linter cannot
see from the source tree: the tree is staged in a temporary folder as it is installed
(``bnexport/`` with ``cli/`` inside it) and import-linter runs on that copy. Exit code: 0 when
every contract is kept, 1 when one is broken (import-linter's report names the import chain).

Usage: ``.venv/bin/python scripts/lint_imports.py`` (``make lint`` runs it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def stage(root: Path, into: Path) -> Path:
    """Copy bnexport/ and cli/ of ``root`` into ``into`` as installed; returns the package."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "sample")
    package = into / "bnexport"
    shutil.copytree(root / "bnexport", package, ignore=ignore)
    shutil.copytree(root / "cli", package / "cli", ignore=ignore)
    return package


def lint(root: Path = ROOT, staged: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run import-linter on ``root`` (or on an already ``staged`` copy of it)."""
    lint_imports = Path(sys.executable).with_name("lint-imports")
    with tempfile.TemporaryDirectory(prefix="bnexport-lint-") as tmp:
        where = staged.parent if staged is not None else stage(root, Path(tmp)).parent
        env = {**os.environ, "PYTHONPATH": str(where)}  # ahead of the editable install's finder
        return subprocess.run(
            [str(lint_imports), "--no-cache", str(root / "pyproject.toml")],
            cwd=where,
            env=env,
            capture_output=True,
            text=True,
        )


if __name__ == "__main__":
    result = lint()
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    sys.exit(result.returncode)
