"""Where artefacts live. Everything generated goes under one git-ignored folder,
`artifacts/` in the working directory, or $TOMELAB_HOME when set."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("TOMELAB_HOME", "artifacts")).resolve()


def models_dir() -> Path:
    return home() / "models"


def variants_dir() -> Path:
    return home() / "variants"


def runs_dir() -> Path:
    return home() / "runs"


def cache_dir() -> Path:
    return home() / "cache"


def shared_data_dir() -> Path:
    """The real data that ships beside the repo (../shared/data), or $TOMELAB_SHARED_DATA."""
    env = os.environ.get("TOMELAB_SHARED_DATA")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve().parent.parent
    return (here.parent / "shared" / "data").resolve()
