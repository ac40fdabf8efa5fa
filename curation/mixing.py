"""Mixing and budget: per-source row targets from the recipe's shares, then a seeded sample.

Every variant of one ablation samples the same `budget_rows`, so a gain comes from which rows, not
how many. If a source cannot fill its share, the shortfall goes to the other sources in proportion
and a warning says so; if the whole pool is smaller than the budget, a loud warning names it.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import polars as pl

from curation.frame import StageResult, split_result
from curation.recipe import Recipe
from tomelab.stats import Timer

log = logging.getLogger(__name__)


def source_targets(recipe: Recipe, available: dict[str, int]) -> tuple[dict[str, int], list[str]]:
    """Rows to take from each pool source (sums to min(budget, pool)), plus warnings."""
    notes: list[str] = []
    shares = recipe.shares() or {s: 1.0 / len(recipe.pool_sources) for s in recipe.pool_sources}
    if not recipe.mix and len(recipe.pool_sources) > 1:  # no stated ratios: proportional to what is there
        total = sum(available.get(s, 0) for s in recipe.pool_sources) or 1
        shares = {s: available.get(s, 0) / total for s in recipe.pool_sources}
    budget = min(recipe.budget_rows, sum(available.get(s, 0) for s in shares))
    if budget < recipe.budget_rows:
        notes.append(f"only {budget} rows survive curation, fewer than budget_rows = {recipe.budget_rows}: "
                     f"lower budget_rows for every variant of this ablation, or loosen the stages")
    raw = {s: shares[s] * budget for s in shares}
    targets = {s: int(math.floor(v)) for s, v in raw.items()}
    for s in sorted(raw, key=lambda s: raw[s] - targets[s], reverse=True)[: budget - sum(targets.values())]:
        targets[s] += 1  # largest remainders, so targets sum exactly to the budget
    for _ in range(len(targets)):
        short = {s: targets[s] - available.get(s, 0) for s in targets if targets[s] > available.get(s, 0)}
        if not short:
            break
        for s, n in short.items():
            notes.append(f"source {s} has {available.get(s, 0)} rows for a share of {targets[s]}; "
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
