"""Mixing and budget: per-source targets from the recipe's shares, then a seeded sample.

Every variant of one ablation samples the same budget, so a gain comes from which rows, not how
many. The budget is `budget_rows` rows, or, when `budget_tokens` > 0, that many prompt + response
tokens (so a source of long rows does not take more compute than its share); `budget_rows` then
caps the total rows. If a source cannot fill its share, the shortfall goes to the other sources in
proportion and a warning says so; if the whole pool is smaller than the budget, a loud warning names it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import polars as pl

from curation.frame import StageResult, split_result
from curation.recipe import Recipe
from curation.stage import Stage
from tomelab.stats import Timer

log = logging.getLogger(__name__)


def row_tokens(df: pl.DataFrame) -> pl.Series:
    """Tokens a row costs in training: its approximate prompt + response tokens (from `prepare`)."""
    return df.select((pl.col("prompt_tokens").cast(pl.Int64) + pl.col("response_tokens")).alias("tokens")).to_series()


def _pool_shares(recipe: Recipe, available: dict[str, int]) -> dict[str, float]:
    """The `mix` shares; with no `mix` and several pool sources, shares in proportion to `available`."""
    shares = recipe.shares() or {s: 1.0 / len(recipe.pool_sources) for s in recipe.pool_sources}
    if not recipe.mix and len(recipe.pool_sources) > 1:  # no stated ratios: proportional to what is there
        total = sum(available.get(s, 0) for s in recipe.pool_sources) or 1
        shares = {s: available.get(s, 0) / total for s in recipe.pool_sources}
    return shares


def _allocate(shares: dict[str, float], budget: int, available: dict[str, int],
              unit: str) -> tuple[dict[str, int], list[str]]:
    """Split `budget` (<= what is available) by `shares`, refilling a short source from the others."""
    notes: list[str] = []
    targets = _largest_remainder({s: shares[s] * budget for s in shares}, budget)  # sums exactly to the budget
    for _ in range(len(targets)):
        short = {s: targets[s] - available.get(s, 0) for s in targets if targets[s] > available.get(s, 0)}
        if not short:
            break
        for s, n in short.items():
            notes.append(f"source {s} has {available.get(s, 0)} {unit} for a share of {targets[s]}; "
                         f"the other sources fill the {n} missing")
            targets[s] -= n
        spare = {s: available.get(s, 0) - targets[s] for s in targets if available.get(s, 0) > targets[s]}
        missing = sum(short.values())
        tot = sum(spare.values()) or 1
        for s in spare:
            add = min(spare[s], int(round(missing * spare[s] / tot)))
            targets[s] += add
        leftover = budget - sum(targets.values())
        for s in spare:
            if leftover <= 0:
                break
            add = min(leftover, available.get(s, 0) - targets[s])
            targets[s] += add
            leftover -= add
    return targets, notes


def _budget_targets(recipe: Recipe, available: dict[str, int], wanted: int,
                    unit: Literal["rows", "tokens"]) -> tuple[dict[str, int], list[str]]:
    """`wanted` units split over the pool sources (sums to min(wanted, pool)), plus warnings."""
    shares = _pool_shares(recipe, available)
    budget = min(wanted, sum(available.get(s, 0) for s in shares))
    notes: list[str] = []
    if budget < wanted:
        fmt = "," if unit == "tokens" else ""  # token counts are large: thousands separators
        loud = "WARNING: " if unit == "tokens" else ""
        notes.append(f"{loud}only {budget:{fmt}} {unit} survive curation, fewer than budget_{unit} = {wanted:{fmt}}: "
                     f"lower budget_{unit} for every variant of this ablation, or loosen the stages")
    targets, short = _allocate(shares, budget, available, unit)
    return targets, notes + short


def source_targets(recipe: Recipe, available: dict[str, int]) -> tuple[dict[str, int], list[str]]:
    """Rows to take from each pool source (sums to min(budget, pool)), plus warnings."""
    return _budget_targets(recipe, available, recipe.budget_rows, "rows")


def source_token_targets(recipe: Recipe, available_tokens: dict[str, int]) -> tuple[dict[str, int], list[str]]:
    """Tokens to take from each pool source (sums to min(budget_tokens, pool tokens)), plus warnings."""
    return _budget_targets(recipe, available_tokens, recipe.budget_tokens, "tokens")


@dataclass
class BudgetPlan:
    """What the quality and budget stages aim for, decided once from the rows that reach them.

    `row_targets` are the row budget's targets, or, for a token budget, ceil(token target / mean
    tokens per row of the source): the rows the quality stage scores candidates for and keeps.
    """

    unit: Literal["rows", "tokens"]
    row_targets: dict[str, int]
    token_targets: dict[str, int] = field(default_factory=dict)  # empty for a row budget
    notes: list[str] = field(default_factory=list)


def plan_budget(recipe: Recipe, df: pl.DataFrame) -> BudgetPlan:
    """Per-source targets in the recipe's budget unit, from the rows (and their tokens) in `df`."""
    per_source = (df.with_columns(row_tokens(df)).group_by("source")
                  .agg(pl.len().alias("rows"), pl.col("tokens").sum()).rows_by_key("source", named=True, unique=True))
    rows = {s: int(v["rows"]) for s, v in per_source.items()}
    if recipe.budget_unit == "rows":
        targets, notes = source_targets(recipe, rows)
        return BudgetPlan("rows", targets, notes=notes)
    tokens = {s: int(v["tokens"]) for s, v in per_source.items()}
    token_targets, notes = source_token_targets(recipe, tokens)
    row_targets = {s: min(rows[s], -(-t * rows[s] // tokens[s])) if t and tokens.get(s) else 0  # integer ceil
                   for s, t in token_targets.items()}
    return BudgetPlan("tokens", row_targets, token_targets, notes)


def sample_budget(df: pl.DataFrame, targets: dict[str, int], seed: int, notes: list[str]) -> StageResult:
    """Seeded sample of `targets[source]` rows per source; the rest are dropped as over_budget."""
    with Timer() as t:
        rng = np.random.default_rng(seed)
        reason: list[str | None] = [None] * len(df)
        detail = [""] * len(df)
        src = df["source"].to_list()
        notes = list(notes)
        for s in sorted(set(src)):
            pos = [i for i, x in enumerate(src) if x == s]
            n = targets.get(s, 0)
            if len(pos) < n:
                notes.append(f"source {s}: only {len(pos)} rows reach the budget stage for a target of {n} "
                             f"(an earlier stage dropped more than expected): loosen it or lower budget_rows")
            keep = set(rng.choice(len(pos), size=min(n, len(pos)), replace=False).tolist()) if n else set()
            for k, i in enumerate(pos):
                if k not in keep:
                    reason[i] = "over_budget" if s in targets else "not_in_mix"
                    detail[i] = f"{s}: sampled {min(n, len(pos))} of {len(pos)}"
    for n in notes:
        log.warning("%s", n)
    return split_result(df, "budget", reason, detail, t.seconds, extra={"targets": targets, "warnings": notes})


def sample_token_budget(df: pl.DataFrame, token_targets: dict[str, int], seed: int, notes: list[str],
                        max_rows: int) -> StageResult:
    """Per source, rows in a seeded random order until its token target is reached (so it overshoots
    by less than one row); then, if more than `max_rows` rows were taken, each source keeps the first
    rows of its order in proportion. The rest are dropped as over_budget (not_in_mix outside the mix)."""
    with Timer() as t:
        rng = np.random.default_rng(seed)
        src = df["source"].to_list()
        tokens = row_tokens(df).to_list()
        notes = list(notes)
        orders: dict[str, list[int]] = {}  # source -> its row positions in seeded order
        take: dict[str, int] = {}  # source -> rows taken (a prefix of its order)
        for s in sorted(set(src)):
            pos = [i for i, x in enumerate(src) if x == s]
            target = token_targets.get(s, 0)
            orders[s] = [pos[k] for k in rng.permutation(len(pos)).tolist()] if target else pos
            cum = np.cumsum([tokens[i] for i in orders[s]]) if target else np.zeros(0, dtype=np.int64)
            take[s] = min(int(np.searchsorted(cum, target)) + 1, len(pos)) if target else 0
            if target and (not len(cum) or cum[-1] < target):
                notes.append(f"source {s}: only {int(cum[-1]) if len(cum) else 0:,} tokens reach the budget stage "
                             f"for a target of {target:,} (an earlier stage dropped more than expected): "
                             f"loosen it or lower budget_tokens")
        wanted = sum(take.values())
        if wanted > max_rows:
            capped = _largest_remainder({s: n * max_rows / wanted for s, n in take.items()}, max_rows)
            notes.append(f"budget_rows = {max_rows:,} caps the rows: the token targets wanted {wanted:,} rows, so "
                         f"every source keeps {max_rows / wanted:.0%} of its rows and misses its token target; "
                         f"raise budget_rows to let budget_tokens decide")
            take = capped
        reason: list[str | None] = [None] * len(df)
        detail = [""] * len(df)
        tokens_taken: dict[str, int] = {}
        for s, order in orders.items():
            n = take[s]
            tokens_taken[s] = sum(tokens[i] for i in order[:n])
            why = (f"{s}: {tokens_taken[s]:,} of {token_targets[s]:,} tokens target reached with {n:,} of "
                   f"{len(order):,} rows" if s in token_targets else f"{s}: not in the mix")
            for i in order[n:]:
                reason[i] = "over_budget" if s in token_targets else "not_in_mix"
                detail[i] = why
    for n in notes:
        log.warning("%s", n)
    return split_result(df, "budget", reason, detail, t.seconds,
                        extra={"budget": "tokens", "token_targets": token_targets, "tokens_taken": tokens_taken,
                               "rows_taken": take, "max_rows": max_rows, "warnings": notes})


def _largest_remainder(raw: dict[str, float], total: int) -> dict[str, int]:
    """Round `raw` down, then give the units left to the largest remainders so the sum is `total`."""
    out = {s: int(math.floor(v)) for s, v in raw.items()}
    for s in sorted(raw, key=lambda s: raw[s] - out[s], reverse=True)[: total - sum(out.values())]:
        out[s] += 1
    return out


def draw_block(df: pl.DataFrame, rows: int, seed: int) -> StageResult:
    """A block's own sample of the raw pool: `rows` rows per source, drawn with `seed`.

    Every variant of one ablation block is curated from the same draw, so a block's variants differ only
    in curation, and the block-to-block spread measures which rows the pool happened to offer."""
    with Timer() as t:
        rng = np.random.default_rng(seed)
        reason: list[str | None] = [None] * len(df)
        detail = [""] * len(df)
        src = df["source"].to_list()
        for s in sorted(set(src)):
            pos = [i for i, x in enumerate(src) if x == s]
            keep = set(rng.choice(len(pos), size=min(rows, len(pos)), replace=False).tolist())
            for k, i in enumerate(pos):
                if k not in keep:
                    reason[i], detail[i] = "not_drawn", f"block draw (seed {seed}): {min(rows, len(pos))} of {len(pos)} {s} rows"
    return split_result(df, "draw", reason, detail, t.seconds, extra={"rows": rows, "seed": seed})


def select_longest(df: pl.DataFrame, targets: dict[str, int], fit_tokens: int) -> StageResult:
    """Per source, the `targets[source]` rows with the longest answers among rows that fit `fit_tokens`
    ("Long Is More for Alignment", Zhao et al. 2024); ties broken by id so the choice is deterministic."""
    with Timer() as t:
        tokens = row_tokens(df).to_list()
        resp = df["response_tokens"].to_list()
        ids, src = df["id"].to_list(), df["source"].to_list()
        reason: list[str | None] = [None] * len(df)
        detail = [""] * len(df)
        for s in sorted(set(src)):
            pos = [i for i, x in enumerate(src) if x == s]
            fits = [i for i in pos if not fit_tokens or tokens[i] <= fit_tokens]
            ranked = sorted(fits, key=lambda i: (-resp[i], ids[i]))
            keep = set(ranked[: targets.get(s, 0)])
            floor = min((resp[i] for i in keep), default=0)
            for i in pos:
                if i in keep:
                    continue
                if fit_tokens and tokens[i] > fit_tokens:
                    reason[i], detail[i] = "too_long_to_fit", f"{tokens[i]} > fit_tokens {fit_tokens}"
                else:
                    reason[i], detail[i] = "shorter_answer", f"answer ~{resp[i]} tokens < kept minimum {floor}"
    return split_result(df, "longest", reason, detail, t.seconds, extra={"targets": targets, "fit_tokens": fit_tokens})


# ---------------------------------------------------------------- stage contract (curation.stage)

@dataclass(frozen=True)
class DrawConfig:
    rows: int
    seed: int


@dataclass(frozen=True)
class BudgetConfig:
    """A row budget (`token_targets` empty) or a token budget capped at `budget_rows` rows."""

    budget_rows: int
    targets: dict[str, int]
    seed: int
    notes: tuple[str, ...] = ()
    budget_tokens: int = 0
    token_targets: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class LongestConfig:
    targets: dict[str, int]
    fit_tokens: int


class DrawStage(Stage):
    name = "draw"
    kind = "global"

    def key(self):
        return (self.cfg.rows, self.cfg.seed)  # the pre-contract checkpoint key, so old checkpoints match

    def run(self, frame: pl.DataFrame) -> StageResult:
        return draw_block(frame, self.cfg.rows, self.cfg.seed)


class BudgetStage(Stage):
    name = "budget"
    kind = "global"

    def key(self):
        c = self.cfg
        if c.budget_tokens:
            return (c.budget_rows, c.budget_tokens, c.token_targets, c.seed)
        return (c.budget_rows, c.targets, c.seed)  # the same key as before token budgets existed

    def run(self, frame: pl.DataFrame) -> StageResult:
        c = self.cfg
        if c.budget_tokens:
            return sample_token_budget(frame, c.token_targets, c.seed, list(c.notes), max_rows=c.budget_rows)
        return sample_budget(frame, c.targets, c.seed, list(c.notes))


class LongestStage(Stage):
    name = "longest"
    kind = "global"

    def key(self):
        return (self.cfg.targets, self.cfg.fit_tokens)

    def run(self, frame: pl.DataFrame) -> StageResult:
        return select_longest(frame, self.cfg.targets, self.cfg.fit_tokens)
