"""`pull`: every submitted response into `<variant>/review/responses.parquet`, merged with earlier pulls
so no label is ever lost."""

from __future__ import annotations

from typing import Any

import polars as pl

from curation.review.client import ArgillaTarget, _api, _json, connect, dataset_name, find_dataset, resolve_target
from curation.review.config import ReviewConfig, sync_stats
from curation.review.data import review_dir, variant_dir
from tomelab import paths
from tomelab.errors import DataError, TomelabError
from tomelab.io import write_parquet
from tomelab.stats import StageStats, Timer

# The columns of <variant>/review/responses.parquet: one row per (record, annotator).
RESPONSE_COLUMNS = {
    "id": pl.String,
    "record_server_id": pl.String,
    "annotator_id": pl.String,
    "annotator": pl.String,
    "status": pl.String,
    "decision": pl.String,
    "quality": pl.Int64,
    "corrected_response": pl.String,
    "inserted_at": pl.String,
    "updated_at": pl.String,
}


def fetch_responses(target: ArgillaTarget, dataset_id: Any, timeout_s: float = 5.0) -> pl.DataFrame:
    """Every submitted response of a dataset, one row per (record, annotator), with its times.

    Uses the REST list endpoint because the SDK's Response objects carry no timestamps."""
    rows = []
    with _api(target, timeout_s) as h:
        users = {}
        r = h.get("/api/v1/users")
        if r.status_code == 200:
            users = {u["id"]: u["username"] for u in _json(r, target)["items"]}
        offset, limit = 0, 1000
        while True:
            r = h.get(f"/api/v1/datasets/{dataset_id}/records", params={"include": "responses", "offset": offset, "limit": limit})
            r.raise_for_status()
            page = _json(r, target)
            for rec in page["items"]:
                for resp in rec.get("responses") or []:
                    if resp.get("status") != "submitted":
                        continue
                    values = resp.get("values") or {}
                    get = lambda q, values=values: (values.get(q) or {}).get("value")
                    corrected = get("corrected_response")
                    rows.append(
                        {
                            "id": rec.get("external_id") or rec["id"],
                            "record_server_id": rec["id"],
                            "annotator_id": resp["user_id"],
                            "annotator": users.get(resp["user_id"], resp["user_id"]),
                            "status": resp["status"],
                            "decision": get("decision"),
                            "quality": get("quality"),
                            "corrected_response": corrected if corrected and corrected.strip() else None,
                            "inserted_at": resp.get("inserted_at"),
                            "updated_at": resp.get("updated_at"),
                        }
                    )
            offset += len(page["items"])
            if not page["items"] or offset >= page["total"]:
                break
    return pl.DataFrame(rows, schema=RESPONSE_COLUMNS)


def merge_responses(old: pl.DataFrame, new: pl.DataFrame) -> pl.DataFrame:
    """Union by (id, annotator_id): the newer response wins, responses missing upstream are kept."""
    both = pl.concat([old.select(list(RESPONSE_COLUMNS)), new.select(list(RESPONSE_COLUMNS))], how="vertical_relaxed")
    return (
        both.sort(["id", "annotator_id", "updated_at"], nulls_last=False)
        .unique(subset=["id", "annotator_id"], keep="last", maintain_order=True)
        .sort(["id", "annotator_id"])
    )


def pull(variant: str, cfg: ReviewConfig, target: ArgillaTarget | None = None) -> StageStats:
    """Store every submitted response in `<variant>/review/responses.parquet` (merge; idempotent)."""
    with Timer() as t:
        target = target or resolve_target()
        client = connect(target, cfg.timeout_s)
        if not variant_dir(variant).is_dir():
            raise DataError(f"variant {variant!r} not found under {paths.variants_dir()}: check the name with `ls {paths.variants_dir()}`.")
        dataset = find_dataset(client, cfg, variant)
        if dataset is None:
            raise TomelabError(f"no Argilla dataset {dataset_name(cfg, variant)!r} at {target.url}: run `tomelab review push --variant {variant}` first.")
        fresh = fetch_responses(target, dataset.id, cfg.timeout_s)
        out = review_dir(variant) / "responses.parquet"
        old = pl.read_parquet(out) if out.is_file() else pl.DataFrame(schema=RESPONSE_COLUMNS)
        merged = merge_responses(old, fresh)
        key = ["id", "annotator_id", "updated_at"]
        n_new = merged.join(old.select(key), on=key, how="anti").height
        only_local = old.join(fresh.select("id", "annotator_id"), on=["id", "annotator_id"], how="anti").height
        if n_new or not out.is_file():
            write_parquet(out, merged)
    return sync_stats("review_pull", merged.height, t.seconds, {
        "path": str(out), "new_or_updated": n_new, "kept_from_earlier_pulls_only": only_local, "dataset": dataset.name})
