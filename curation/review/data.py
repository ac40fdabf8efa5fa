"""A variant's rows as review sees them: loading, which numeric columns are scores, the primary score,
rendering a conversation for the UI, and row embeddings through the project's cached embedder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from curation.review.config import NOT_SCORES, SCORE_DIRECTION
from tomelab.artifacts import Variant
from tomelab.errors import DataError
from tomelab.schema import conversation_text


def variant_dir(name: str) -> Path:
    return Variant(name).dir


def review_dir(name: str) -> Path:
    """Review state of a variant: pushed ids and pulled responses."""
    return Variant(name).review_dir


def pushed_variants() -> list[str]:
    """Variants that `push` has sent to Argilla (they have review/pushed.parquet)."""
    return [v.name for v in Variant.all("review/pushed.parquet")]


def load_variant(name: str) -> tuple[pl.DataFrame, dict[str, Any]]:
    """train.parquet and stats.json of a variant, with clear errors when absent or malformed."""
    v = Variant(name)
    train = v.train
    if not train.is_file():
        raise DataError(f"variant {name!r} not found: {train} does not exist. Build it with `tomelab curate`.")
    df = pl.read_parquet(train)
    for col in ("id", "source", "messages", "meta"):
        if col not in df.columns:
            raise DataError(f"{train}: missing column `{col}`; a variant must have the canonical schema (id, source, messages, meta).")
    dup = df.filter(pl.col("id").is_duplicated())
    if dup.height:
        raise DataError(f"{train}: row id {dup['id'][0]!r} appears more than once; ids must be unique. Rebuild the variant.")
    stats = v.stats() if v.stats_path.is_file() else {"variant": name, "stages": []}
    return df, stats


def numeric_metadata_columns(df: pl.DataFrame) -> list[str]:
    """Numeric columns worth filtering on in the UI: scores and lengths (not ids or cluster labels)."""
    return [
        c
        for c, t in df.schema.items()
        if t.is_numeric() and c not in NOT_SCORES and not c.endswith(("_cluster", "_id")) and not c.startswith("human_")
    ]


def score_columns(df: pl.DataFrame) -> list[str]:
    """Numeric curation scores: the metadata columns minus token counts, which measure length, not quality."""
    return [c for c in numeric_metadata_columns(df) if not c.endswith("_tokens")]


def primary_score(df: pl.DataFrame) -> pl.Series | None:
    """The score that ranks rows for `low-score` and for suggestions: quality_score, else score,
    else meta.score, else the first numeric score (oriented so that higher is better)."""
    cols = score_columns(df)
    for c in ("quality_score", "score"):
        if c in cols:
            return df[c].cast(pl.Float64)
    meta_scores = [_meta_score(m) for m in df["meta"].to_list()]
    if any(s is not None for s in meta_scores):
        return pl.Series("meta_score", meta_scores, dtype=pl.Float64)
    if cols:
        return df[cols[0]].cast(pl.Float64) * SCORE_DIRECTION.get(cols[0], 1.0)
    return None


def _meta_score(meta: str | None) -> float | None:
    try:
        v = json.loads(meta or "{}").get("score")
        return float(v) if v is not None else None
    except (ValueError, TypeError, AttributeError):
        return None


def _percentile(values: np.ndarray) -> np.ndarray:
    """Rank percentile in [0, 1]; NaN stays NaN."""
    out = np.full(len(values), np.nan)
    ok = ~np.isnan(values)
    if ok.sum() == 0:
        return out
    ranks = values[ok].argsort(kind="stable").argsort(kind="stable")
    out[ok] = ranks / max(ok.sum() - 1, 1)
    return out


def last_assistant(messages: list[dict[str, str]]) -> str:
    return messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" else ""


def render_prompt(messages: list[dict[str, str]]) -> str:
    """Every turn before the final response, as markdown with the speaker in bold."""
    turns = messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages
    return "\n\n".join(f"**{m['role']}:**\n\n{m['content']}" for m in turns)


# --------------------------------------------------------------------------------------------
# Embeddings


def variant_embeddings(df: pl.DataFrame, embedder: Any) -> np.ndarray:
    """L2-normalised embeddings of rows' whole conversations, through `tomelab.embed.Embedder`.

    The key is the plain row id with the conversation text, the same view curation's semantic
    dedup embeds, so vectors computed there are reused from the shared cache."""
    ids = df["id"].to_list()
    texts = [conversation_text(m) for m in df["messages"].to_list()]
    return embedder.encode(ids, texts, progress=len(ids) > 2000)


def make_embedder(model: str):
    """The project's embedder (cached by row id under artifacts/cache/embeddings/)."""
    from tomelab.embed import Embedder

    return Embedder(model=model)
