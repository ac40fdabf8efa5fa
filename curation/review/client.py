"""The Argilla server: where it is (arguments, environment, the local server's credentials), a fast
liveness check with one clear error, the SDK client, and the REST calls the SDK lacks (counts, timestamps)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curation.review.config import ReviewConfig
from tomelab.errors import TomelabError


@dataclass(frozen=True)
class ArgillaTarget:
    """Where the Argilla server is and how we log in, and where that came from (for messages)."""

    url: str
    api_key: str
    origin: str


def local_server_dir() -> Path:
    """The data folder of the server that scripts/argilla.sh runs (git-ignored)."""
    env = os.environ.get("TOMELAB_ARGILLA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".argilla"


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (the credentials file scripts/argilla.sh writes)."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def resolve_target(url: str | None = None, api_key: str | None = None) -> ArgillaTarget:
    """Arguments first, then ARGILLA_API_URL / ARGILLA_API_KEY, then the local server's credentials."""
    url = url or os.environ.get("ARGILLA_API_URL")
    api_key = api_key or os.environ.get("ARGILLA_API_KEY")
    origin = "arguments/environment"
    if not api_key:
        creds_path = local_server_dir() / "credentials.env"
        if not creds_path.is_file():
            raise TomelabError(
                "no Argilla credentials: set ARGILLA_API_URL and ARGILLA_API_KEY for a real deployment, "
                f"or start the local server with `scripts/argilla.sh start` (it writes {creds_path})."
            )
        creds = read_env_file(creds_path)
        api_key = creds.get("ARGILLA_API_KEY", "")
        origin = str(creds_path)
    if not url:
        url = f"http://127.0.0.1:{os.environ.get('TOMELAB_ARGILLA_PORT', '6900')}"
    return ArgillaTarget(url=url.rstrip("/"), api_key=api_key, origin=origin)


def check_server(target: ArgillaTarget, timeout_s: float = 5.0) -> dict[str, Any]:
    """GET /api/v1/me with a short timeout: a dead server fails in seconds with a clear message."""
    import httpx

    try:
        r = httpx.get(f"{target.url}/api/v1/me", headers={"X-Argilla-Api-Key": target.api_key}, timeout=timeout_s)
    except httpx.HTTPError as e:
        raise TomelabError(
            f"cannot reach Argilla at {target.url} ({type(e).__name__}: {e}). Start the local server with "
            "`scripts/argilla.sh start`, or set ARGILLA_API_URL/ARGILLA_API_KEY to a running deployment. "
            "No local file was changed."
        ) from None
    if r.status_code in (401, 403):
        raise TomelabError(
            f"Argilla at {target.url} rejected the API key from {target.origin} (HTTP {r.status_code}). "
            "Set ARGILLA_API_KEY to a key of an owner or admin (My settings -> API key in the UI)."
        )
    if r.status_code != 200:
        raise TomelabError(f"Argilla at {target.url} answered HTTP {r.status_code} on /api/v1/me: {r.text[:200]}")
    me = _json(r, target)
    if not isinstance(me, dict):
        raise TomelabError(f"{target.url}/api/v1/me answered {type(me).__name__}, not a user: is "
                           f"ARGILLA_API_URL pointing at an Argilla server?")
    return me


def _json(r: Any, target: ArgillaTarget) -> Any:
    """The JSON body of an Argilla answer, or one clear error when the server there is not Argilla."""
    try:
        return r.json()
    except ValueError:  # json.JSONDecodeError, UnicodeDecodeError
        snippet = " ".join(r.text[:80].split())
        raise TomelabError(
            f"{target.url}{r.request.url.path} answered HTTP {r.status_code} that is not JSON ({snippet!r}): "
            f"is ARGILLA_API_URL ({target.url}) pointing at an Argilla server? No local file was changed."
        ) from None


def connect(target: ArgillaTarget | None = None, timeout_s: float = 5.0):
    """An `argilla.Argilla` client, after a fast liveness check."""
    import argilla as rg

    target = target or resolve_target()
    check_server(target, timeout_s)
    logging.getLogger("argilla.sdk").setLevel(logging.WARNING)  # it logs every field at INFO
    return rg.Argilla(api_url=target.url, api_key=target.api_key, timeout=max(int(timeout_s), 30), retries=1)


def dataset_name(cfg: ReviewConfig, variant: str) -> str:
    return f"{cfg.dataset_prefix}{variant}"


def find_dataset(client: Any, cfg: ReviewConfig, variant: str):
    """The Argilla dataset for a variant, or None."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return client.datasets(name=dataset_name(cfg, variant), workspace=_workspace(client, cfg))


def _workspace(client: Any, cfg: ReviewConfig) -> str:
    if cfg.workspace:
        return cfg.workspace
    ws = client.workspaces.list()
    if not ws:
        raise TomelabError("the Argilla user has no workspace. Create one in the UI or pass --workspace.")
    return ws[0].name


def _api(target: ArgillaTarget, timeout_s: float):
    import httpx

    return httpx.Client(base_url=target.url, headers={"X-Argilla-Api-Key": target.api_key}, timeout=max(timeout_s, 30))


def count_records(target: ArgillaTarget, dataset_id: Any, timeout_s: float = 5.0) -> int:
    with _api(target, timeout_s) as h:
        r = h.get(f"/api/v1/datasets/{dataset_id}/records", params={"limit": 1})
        r.raise_for_status()
        return int(_json(r, target)["total"])
