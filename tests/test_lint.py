"""ruff over the whole tree with the pyproject.toml config (`[tool.ruff]`): unused imports, undefined names,
import order, likely bugs. A second test plants a bad file in a temporary copy of the config to prove
the check can fail. `ruff check --fix .` repairs most findings (import order, unused imports)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _ruff() -> str:
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if exe is None:
        pytest.fail("ruff is not installed: `pip install -e '.[test]'` (it is in the test extra)")
    return exe


def _check(root: Path, *paths: str) -> subprocess.CompletedProcess:
    # --no-cache: nothing is written into the repo
    return subprocess.run([_ruff(), "check", "--no-cache", "--output-format", "concise", *paths], cwd=root,
                          capture_output=True, text=True, timeout=300)


def test_tree_is_clean() -> None:
    r = _check(REPO, ".")
    assert r.returncode == 0, f"ruff findings (fix them, or `ruff check --fix .`):\n{r.stdout}{r.stderr}"


def test_a_planted_finding_is_reported(tmp_path: Path) -> None:
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "bad.py").write_text("import os\n\n\ndef f():\n    return undefined_name\n")
    r = _check(tmp_path, ".")
    assert r.returncode == 1
    assert "pkg/bad.py:1:8: F401" in r.stdout and "F821" in r.stdout
