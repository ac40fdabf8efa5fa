"""Joining or starting Ray, for curation's `RayExecutor` and the ablation grid (`eval/ablate_ray.py`).

One place decides which `address` forms are valid, how a missing Ray is reported, how a cluster is
joined (else $RAY_ADDRESS, else a local Ray on this machine's cores; a Ray the caller started is used as
is) and which environment reaches the workers (the absolute artefact home and shared data, offline
switches), so the two executors cannot drift apart.
"""

from __future__ import annotations

import os
import re
from typing import Any

from tomelab import paths
from tomelab.errors import ConfigError

ADDRESS = re.compile(r"|auto|local|(ray://)?[A-Za-z0-9_.\-]+:\d+")
ADDRESS_FORMS = '"" (a local Ray, or $RAY_ADDRESS), "auto", "ray://HOST:PORT" or "HOST:PORT"'
PASSED_ENV = ("TOMELAB_PRECISION", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "TRANSFORMERS_OFFLINE",
              "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS")


def address_problem(address: str) -> str | None:
    """Why `address` is not one of the accepted forms (None when it is)."""
    return None if ADDRESS.fullmatch(address) else f"must be {ADDRESS_FORMS}, got {address!r}"


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("executor = \"ray\" needs Ray: pip install 'tomelab[scale]' (or `pip install -e \".[scale]\"` "
                          "in a checkout), or use executor = \"local\"") from None
    return ray


def connect(address: str = "", *, num_cpus: int | None = None, hint: str = "`address` or $RAY_ADDRESS") -> bool:
    """Join the cluster at `address` (else $RAY_ADDRESS, else start a local Ray on `num_cpus` / all cores).
    Returns whether this call started Ray (so the caller shuts it down)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS", "")
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address!r}" if address else "a local Ray"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"cannot start or reach {where} ({first}): check the {hint}") from None
    return True


def worker_env(**extra: str) -> dict[str, str]:
    """Environment for Ray workers: the absolute artefact home and shared data, the offline and precision
    switches of this process, then `extra`."""
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    env.update(TOMELAB_HOME=str(paths.home().resolve()), TOMELAB_SHARED_DATA=str(paths.shared_data_dir().resolve()))
    env.update(extra)
    return env
