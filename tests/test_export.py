"""`tomelab export --out`: it may only ever replace an earlier export, never a user's folder.

Regression tests for issue 16: `--out ..` used to empty the parent folder (rmtree, rc 0). These
cases fail before any model is loaded, so they run in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tomelab.errors import TomelabError

REPO = Path(__file__).resolve().parent.parent
TOMELAB = REPO / ".venv" / "bin" / "tomelab"


def _fake_run(home: Path) -> Path:
    """A finished-looking run folder (enough for export's argument checks, which come before the model)."""
    rd = home / "runs" / "tiny" / "smollm2-135m-instruct" / "0"
    (rd / "adapter").mkdir(parents=True)
    (rd / "adapter" / "adapter_config.json").write_text("{}")
    (rd / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (rd / "config.json").write_text(json.dumps({"base": "smollm2-135m-instruct", "variant": "tiny", "seed": 0}))
    (rd / "metrics.json").write_text("{}")
    return rd


def _export(home: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TOMELAB_HOME=str(home), HF_HUB_OFFLINE="1")
    return subprocess.run([str(TOMELAB), "export", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)  # generous: a busy machine is slow, not wrong


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("out", ["..", ".", "mine", "empty", "a-file.txt", "almost-export"])
def test_export_refuses_to_replace_anything_but_an_earlier_export(tmp_path: Path, out: str) -> None:
    home = tmp_path / "home"
    rd = _fake_run(home)
    work = tmp_path / "work" / "cwd"
    (work / "mine").mkdir(parents=True)
    (work / "mine" / "notes.txt").write_text("precious")
    (work / "empty").mkdir()
    (work / "a-file.txt").write_text("precious too")
    (work / "almost-export").mkdir()
    (work / "almost-export" / "config.json").write_text("{}")  # looks like a model, is not our export
    (tmp_path / "work" / "sibling.txt").write_text("parent's file")
    before = _tree(tmp_path)
    for flags in ([], ["--force"]):  # --force never widens what may be replaced
        r = _export(home, work, str(rd), "--out", out, *flags)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "not an earlier export" in r.stderr and "refusing" in r.stderr
    assert _tree(tmp_path) == before
    assert {p.name for p in work.parent.iterdir()} == {"cwd", "sibling.txt"}


def test_an_earlier_export_of_other_weights_needs_force(tmp_path: Path) -> None:
    home = tmp_path / "home"
    rd = _fake_run(home)
    old = tmp_path / "old-export"
    old.mkdir()
    (old / "tomelab_export.json").write_text(json.dumps({"adapter_digest": "other", "dtype": "float32"}))
    (old / "model.safetensors").write_bytes(b"old")
    r = _export(home, tmp_path, str(rd), "--out", str(old))
    assert r.returncode == 2 and "--force" in r.stderr and "Traceback" not in r.stderr
    assert (old / "model.safetensors").read_bytes() == b"old"


def test_check_out_dir_accepts_only_new_paths_and_earlier_exports(tmp_path: Path) -> None:
    from training.export import _check_out_dir

    _check_out_dir(tmp_path / "new")  # does not exist: fine
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "tomelab_export.json").write_text("{}")
    _check_out_dir(tmp_path / "exp")  # an earlier export: the caller decides (--force or up to date)
    (tmp_path / "link").symlink_to(tmp_path / "exp")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for bad in ("link", "dangling"):
        with pytest.raises(TomelabError, match="not an earlier export"):
            _check_out_dir(tmp_path / bad)
