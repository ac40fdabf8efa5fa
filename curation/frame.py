"""The working frame every stage passes along, and the result record every stage returns.

Stages work on a polars DataFrame in the canonical schema plus derived columns computed once
(`prompt`, `response`, `conversation` text, approximate token counts, `quality_score`), and return
a `StageResult`: the kept rows, one dropped row per removed row (id, source, stage, reason, detail)
and a `StageStats` whose `check()` proves rows were conserved.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import pyarrow as pa

from tomelab.stats import StageStats, count_reasons

DROPPED_SCHEMA = {"id": pl.String, "source": pl.String, "stage": pl.String, "reason": pl.String, "detail": pl.String}
HELPER_COLUMNS = ("prompt", "response", "conversation", "_row")
# Approximate tokens: words and single punctuation marks (a GPT-style pre-tokenisation); cheap in Rust.
TOKEN_PATTERN = r"\w+|[^\w\s]"


@dataclass
class StageResult:
    kept: pl.DataFrame
    dropped: pl.DataFrame
    stats: StageStats
    artefacts: dict[str, pl.DataFrame] = field(default_factory=dict)  # e.g. logged dup pairs


def _texts(role_filter: pl.Expr | None) -> pl.Expr:
    el = pl.element()
    inner = el.filter(role_filter).struct.field("content") if role_filter is not None else el.struct.field("content")
    return pl.col("messages").list.eval(inner).list.join("\n")


def prepare(table: pa.Table | pl.DataFrame) -> pl.DataFrame:
    """Canonical rows -> working frame with text views, token counts and a default quality score."""
    df = table if isinstance(table, pl.DataFrame) else pl.from_arrow(table)
    role = pl.element().struct.field("role")
    df = df.with_columns(
        _texts(role != "assistant").alias("prompt"),
        _texts(role == "assistant").alias("response"),
        _texts(None).alias("conversation"),
    ).with_columns(
        pl.col("prompt").str.count_matches(TOKEN_PATTERN).cast(pl.Int32).alias("prompt_tokens"),
        pl.col("response").str.count_matches(TOKEN_PATTERN).cast(pl.Int32).alias("response_tokens"),
    )
    return df.with_columns(source_score(df).alias("score"), pl.int_range(pl.len()).alias("_row")).with_columns(
        default_quality(pl.col("score")).alias("quality_score")
    )


def source_score(df: pl.DataFrame) -> pl.Series:
    """FineTome's own `score` (from meta) when present, else null."""
    def one(meta: str) -> float | None:
        try:
            v = json.loads(meta).get("score")
        except (ValueError, AttributeError):
            return None
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    return pl.Series("score", [one(m) for m in df["meta"].to_list()], dtype=pl.Float64)


def default_quality(score: pl.Expr) -> pl.Expr:
    """The tie-breaker that decides which row of a duplicate group survives before any model runs:
    the source's own score when it has one, else a mild preference for fuller answers
    (log response tokens), so the richer copy of a near-duplicate is kept."""
    return pl.when(score.is_not_null()).then(score).otherwise(
        (pl.col("response_tokens").cast(pl.Float64) + 1).log() / 10
    )


def dropped_frame(df: pl.DataFrame, stage: str, reasons: list[str], details: list[str]) -> pl.DataFrame:
    return pl.DataFrame(
        {"id": df["id"], "source": df["source"], "stage": [stage] * len(df), "reason": reasons, "detail": details},
        schema=DROPPED_SCHEMA,
    )


def empty_dropped() -> pl.DataFrame:
    return pl.DataFrame(schema=DROPPED_SCHEMA)


def split_result(df: pl.DataFrame, stage: str, drop_reason: list[str | None], drop_detail: list[str],
                 seconds: float, extra: dict[str, Any] | None = None,
                 artefacts: dict[str, pl.DataFrame] | None = None) -> StageResult:
    """Build a StageResult from a per-row reason list (None = keep)."""
    mask = pl.Series([r is None for r in drop_reason])
    kept = df.filter(mask)
    gone = df.filter(~mask)
    reasons = [r for r in drop_reason if r is not None]
    details = [d for r, d in zip(drop_reason, drop_detail) if r is not None]
    stats = StageStats(stage=stage, rows_in=len(df), kept=len(kept), dropped=count_reasons(reasons),
                       seconds=round(seconds, 3), extra=extra or {}).check()
    return StageResult(kept, dropped_frame(gone, stage, reasons, details), stats, artefacts or {})
