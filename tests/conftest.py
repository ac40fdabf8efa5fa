"""Shared fixtures: an isolated artefact home per test, the real shared data, the real base model, a local Ray."""

from __future__ import annotations

import shutil
import tempfile
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
    """The distilled model2vec embedder, made once in the real cache (tomelab.embed distils on first use)."""
    from tomelab.embed import Embedder

    real_cache = paths.cache_dir()
    Embedder("m2v", cache_dir=real_cache)
    return real_cache / "models"


@pytest.fixture
def curation_home(tmp_home: Path, m2v_models_dir: Path) -> Path:
    """tmp_home plus the shared distilled embedder, so curation tests never re-distil it."""
    (tmp_home / "cache").mkdir(exist_ok=True)
    (tmp_home / "cache" / "models").symlink_to(m2v_models_dir, target_is_directory=True)
    return tmp_home


@pytest.fixture
def ray_cluster(monkeypatch: pytest.MonkeyPatch):
    """A small local Ray (2 CPUs, 100 MB object store, no dashboard) whose files stay in a temp dir
    (short: Ray's socket paths must fit in 107 bytes); shut down and removed whatever the test does.
    No auth token: a loopback test cluster needs none, and Ray would write it to ~/.ray."""
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("RAY_worker_register_timeout_seconds", "600")  # starved workers start slowly
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    try:
        for attempt in (1, 2):
            try:
                ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                         object_store_memory=100 * 2**20, _temp_dir=tmp)
                break
            except Exception as e:  # Ray gives its raylet a fixed 30 s to register with its GCS
                ray.shutdown()
                if attempt == 2:
                    pytest.skip(f"a local Ray could not start on this machine (twice): {e}. Ray waits a fixed "
                                f"30 s for its raylet, which a CPU starved by other jobs can miss; re-run when idle")
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


class Killed(Exception):
    """Raised from a training `on_step` callback: the run stops unsaved, as a kill -9 would."""


def kill_after(step: int):
    """An `on_step` callback for `train_run` that 'kills' the run once it has finished optimiser step `step`."""

    def on_step(record: dict) -> None:
        if record["step"] >= step:
            raise Killed(f"killed after step {record['step']}")

    return on_step
