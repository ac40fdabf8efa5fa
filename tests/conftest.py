"""Shared fixtures: an isolated artefact home per test, the real shared data, the real base model."""

from __future__ import annotations

from pathlib import Path

import pytest

from tomelab import paths

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def tmp_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point TOMELAB_HOME at a temp dir, but keep the (expensive) converted models shared."""
    real_models = paths.models_dir()
    home = tmp_path / "artifacts"
    home.mkdir()
    if real_models.exists():
        (home / "models").symlink_to(real_models, target_is_directory=True)
    monkeypatch.setenv("TOMELAB_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = paths.shared_data_dir()
    if not d.is_dir():
        pytest.fail(f"real shared data not found at {d}: the repo must sit beside ../shared")
    return d


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct, converted once from its PyPI GGUF (make models)."""
    from tomelab.models import resolve_model

    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def m2v_models_dir() -> Path:
    """The distilled model2vec embedder, made once in the real cache (curation.embed distils on first use)."""
    from curation.embed import Embedder

    real_cache = paths.cache_dir()
    Embedder("m2v", cache_dir=real_cache)
    return real_cache / "models"


@pytest.fixture
def curation_home(tmp_home: Path, m2v_models_dir: Path) -> Path:
    """tmp_home plus the shared distilled embedder, so curation tests never re-distil it."""
    (tmp_home / "cache").mkdir(exist_ok=True)
    (tmp_home / "cache" / "models").symlink_to(m2v_models_dir, target_is_directory=True)
    return tmp_home
