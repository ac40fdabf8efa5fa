"""Which rows to review (random, low-score, near-duplicate pairs, score disagreement), and the
pre-filled suggestions from the curation scores."""

from __future__ import annotations

import math

import numpy as np
import polars as pl

from curation.review.config import SCORE_DIRECTION, STRATEGIES, ReviewConfig
from curation.review.data import _percentile, primary_score, score_columns
from tomelab.errors import DataError, TomelabError


def select_rows(df: pl.DataFrame, cfg: ReviewConfig, embeddings: np.ndarray | None = None) -> pl.DataFrame:
    """The rows to push, with `flagged_by` (the strategy) and `flag_detail` (why this row)."""
    n = min(cfg.n, df.height)
    if cfg.strategy == "random":
        rng = np.random.default_rng(cfg.seed)
        idx = np.sort(rng.choice(df.height, size=n, replace=False))
        detail = ["random sample"] * n
    elif cfg.strategy == "low-score":
        score = primary_score(df)
        if score is None:
            raise DataError("strategy low-score needs a score column (quality_score, score or meta.score); this variant has none.")
        vals = score.to_numpy().astype(float)
        order = np.argsort(np.where(np.isnan(vals), np.inf, vals), kind="stable")
        idx = order[:n]
        detail = [f"{score.name}={vals[i]:.3g}" for i in idx]
    elif cfg.strategy == "near-dup-pairs":
        if embeddings is None:
            raise ValueError("near-dup-pairs needs embeddings of every row")
        idx, detail = _near_dup_pairs(df, embeddings, n)
    elif cfg.strategy == "disagreement":
        idx, detail = _disagreement(df, n)
    else:
        raise TomelabError(f"unknown strategy {cfg.strategy!r}; choose one of {', '.join(STRATEGIES)}.")
    return df[list(map(int, idx))].with_columns(
        pl.lit(cfg.strategy).alias("flagged_by"), pl.Series("flag_detail", detail, dtype=pl.String)
    )


def _near_dup_pairs(df: pl.DataFrame, emb: np.ndarray, n: int) -> tuple[list[int], list[str]]:
    """Both rows of the most similar pairs first, so a reviewer sees the pair side by side."""
    import faiss

    if df.height < 2:
        return list(range(df.height)), ["no pair"] * df.height
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(np.ascontiguousarray(emb, dtype=np.float32))
    sims, nbrs = index.search(np.ascontiguousarray(emb, dtype=np.float32), 2)
    ids = df["id"].to_list()
    pairs = []
    for i in range(df.height):
        j = int(nbrs[i, 1]) if nbrs[i, 0] == i else int(nbrs[i, 0])
        s = float(sims[i, 1]) if nbrs[i, 0] == i else float(sims[i, 0])
        pairs.append((s, min(i, j), max(i, j)))
    chosen: list[int] = []
    detail: dict[int, str] = {}
    for s, i, j in sorted(set(pairs), key=lambda p: (-p[0], p[1], p[2])):
        for a, b in ((i, j), (j, i)):
            if a not in detail and len(chosen) < n:
                chosen.append(a)
                detail[a] = f"cos={s:.3f} with {ids[b]}"
        if len(chosen) >= n:
            break
    return chosen, [detail[i] for i in chosen]


def _disagreement(df: pl.DataFrame, n: int) -> tuple[list[int], list[str]]:
    """Rows whose curation scores disagree most (largest spread of oriented rank percentiles)."""
    cols = score_columns(df)
    if len(cols) < 2:
        raise DataError(f"strategy disagreement needs at least two score columns; this variant has {cols or 'none'}.")
    pct = np.stack(
        [_percentile(df[c].cast(pl.Float64).fill_null(float("nan")).to_numpy() * SCORE_DIRECTION.get(c, 1.0)) for c in cols],
        axis=1,
    )
    spread = np.nanmax(pct, axis=1) - np.nanmin(pct, axis=1)
    spread = np.where(np.isnan(spread), -1.0, spread)
    order = np.argsort(-spread, kind="stable")[:n]
    detail = []
    for i in order:
        hi, lo = cols[int(np.nanargmax(pct[i]))], cols[int(np.nanargmin(pct[i]))]
        detail.append(f"spread={spread[i]:.2f} ({hi} high, {lo} low)")
    return list(order), detail


def suggestions_for(df: pl.DataFrame, cfg: ReviewConfig) -> tuple[list[str | None], list[int | None], list[float | None]]:
    """Pre-filled decision and quality from the curation scores: bottom percentiles -> drop, 1..5 by percentile."""
    score = primary_score(df)
    if score is None:
        return [None] * df.height, [None] * df.height, [None] * df.height
    pct = _percentile(score.to_numpy().astype(float))
    decisions, ratings, conf = [], [], []
    for p in pct:
        if np.isnan(p):
            decisions.append(None), ratings.append(None), conf.append(None)
            continue
        decisions.append("drop" if p < cfg.suggest_drop_below else "keep")
        ratings.append(int(min(5, 1 + math.floor(p * 5))))
        conf.append(round(float(abs(p - cfg.suggest_drop_below) / max(cfg.suggest_drop_below, 1 - cfg.suggest_drop_below)), 4))
    return decisions, ratings, conf
