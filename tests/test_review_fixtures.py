"""Helpers (no tests) for the review tests: a small variant dir built from the real Alpaca slice."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from tomelab import paths
from tomelab.io import write_json, write_parquet
from tomelab.schema import make_row


def make_variant(name: str, shared_data: Path, n: int = 24, near_dup_of: int | None = 3) -> pl.DataFrame:
    """Write artifacts/variants/<name>/ (train, dropped, stats) from the first `n` real Alpaca rows,
    with deterministic score columns; optionally one near-duplicate of row `near_dup_of`."""
    alpaca = json.loads((shared_data / "alpaca" / "alpaca_5000.json").read_text(encoding="utf-8"))[:n]
    rows = []
    for i, ex in enumerate(alpaca):
        user = ex["instruction"] + (f"\n\n{ex['input']}" if ex["input"] else "")
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": ex["output"]}]
        rows.append(make_row("alpaca", msgs, {"row": i, "score": round(5 - (i % 5) * 0.5, 2)}))
    if near_dup_of is not None:
        base = rows[near_dup_of]
        msgs = [dict(m) for m in base["messages"]]
        msgs[-1]["content"] += "!"
        rows.append(make_row("alpaca", msgs, {"row": n, "score": 3.0}))
    df = pl.DataFrame(rows).with_columns(
        pl.Series("quality_score", [((i * 7) % len(rows)) / len(rows) for i in range(len(rows))], dtype=pl.Float64),
        # Deliberately disagrees with quality_score for rows whose quality is high.
        pl.Series("ifd", [1.0 - ((i * 7) % len(rows)) / len(rows) if i % 4 == 0 else ((i * 7) % len(rows)) / len(rows) for i in range(len(rows))], dtype=pl.Float64),
        pl.Series("nll", [1.0 + (i % 3) for i in range(len(rows))], dtype=pl.Float64),
        pl.Series("minhash_cluster", list(range(len(rows))), dtype=pl.Int64),
    )
    d = paths.variants_dir() / name
    write_parquet(d / "train.parquet", df)
    write_parquet(
        d / "dropped.parquet",
        pl.DataFrame(
            [{"id": "deadbeefdeadbeef", "source": "alpaca", "stage": "dedup", "reason": "exact_dup", "detail": "fixture"}]
        ),
    )
    write_json(
        d / "stats.json",
        {
            "variant": name,
            "config_hash": "fixture000000",
            "heldout_dir": str(paths.home() / "heldout" / "fixture"),
            "stages": [{"stage": "load", "rows_in": len(rows) + 1, "kept": len(rows), "dropped": {"exact_dup": 1}, "seconds": 0.0, "extra": {}}],
        },
    )
    return df


def write_responses(variant: str, rows: list[dict]) -> Path:
    """A responses.parquet as `tomelab review pull` writes it, for offline apply tests."""
    from curation.review.data import review_dir
    from curation.review.pull import RESPONSE_COLUMNS

    full = [
        {
            "record_server_id": None,
            "annotator": r.get("annotator_id"),
            "status": "submitted",
            "quality": None,
            "corrected_response": None,
            "inserted_at": "2026-01-01T00:00:00",
            "updated_at": "2026-01-01T00:00:00",
            **r,
        }
        for r in rows
    ]
    path = review_dir(variant) / "responses.parquet"
    write_parquet(path, pl.DataFrame(full, schema=RESPONSE_COLUMNS))
    return path
