"""Review settings and the shared vocabulary of push, pull and apply (decisions, score directions).

No polars here: the CLI imports this module to build the review flags, so `tomelab --help` stays fast."""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tomelab.config import load_config
from tomelab.stats import StageStats

Strategy = Literal["random", "low-score", "near-dup-pairs", "disagreement"]
STRATEGIES: tuple[str, ...] = ("random", "low-score", "near-dup-pairs", "disagreement")
DECISIONS = ("keep", "drop")
REVIEW_STAGE = "human_review"
# Numeric columns that are labels or counters, not scores.
NOT_SCORES = {"minhash_cluster", "cluster", "row", "n_turns"}
# Direction of known scores (+1: higher is better). Unknown scores count as higher-is-better.
SCORE_DIRECTION = {"quality_score": 1.0, "score": 1.0, "reward": 1.0, "ifd": 1.0, "nll": -1.0, "perplexity": -1.0}


@dataclass
class ReviewConfig:
    """Knobs of push/pull/apply; the CLI flags override a TOML `[review]` table."""

    n: int = 200
    strategy: Strategy = "random"
    seed: int = 0
    embed_model: Literal["minilm", "m2v"] = "m2v"  # m2v: fast and shared with curation's dedup cache
    dataset_prefix: str = "tomelab-"
    workspace: str | None = None  # None: the user's first workspace
    suggest_drop_below: float = 0.25  # score percentile under which the suggestion says "drop"
    extend_k: int = 0  # >0: extend human labels to unlabelled rows by k nearest labelled neighbours
    extend_min_similarity: float = 0.8  # cosine similarity a neighbour needs to vote
    holdout_share: float = 0.2  # share of labelled rows held out to measure propagation agreement
    timeout_s: float = 5.0  # connect/read timeout for the server check, so a dead server fails fast

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError("n must be at least 1")
        if not 0.0 < self.holdout_share < 1.0:
            raise ValueError("holdout_share must be between 0 and 1 (exclusive)")
        if self.extend_k < 0:
            raise ValueError("extend_k must be >= 0")
        if not -1.0 <= self.extend_min_similarity <= 1.0:
            raise ValueError("extend_min_similarity is a cosine similarity in [-1, 1]")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"timeout_s must be a finite number of seconds > 0, got {self.timeout_s}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not 0.0 <= self.suggest_drop_below <= 1.0:
            raise ValueError("suggest_drop_below is a score percentile in [0, 1]")


def load_review_config(path: str | Path | None) -> ReviewConfig:
    """A ReviewConfig from the `[review]` table of a TOML file, or the defaults."""
    return ReviewConfig() if path is None else load_config(path, ReviewConfig, section="review")


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def sync_stats(stage: str, rows: int, seconds: float, extra: dict[str, Any]) -> StageStats:
    """The record of a push or pull: every row it handled is kept (nothing is dropped by syncing)."""
    return StageStats(stage=stage, rows_in=rows, kept=rows, seconds=round(seconds, 2), extra=extra).check()
