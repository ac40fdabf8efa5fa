"""Clean / rejected labels for the held-out items: the training pool's own filters, applied to the test.

The held-out split is raw (it is drawn before any curation), so about one item in six is exactly what
curation removes: truncated answers, other languages, refusals, near-duplicates. Scoring every variant on
such items rewards the raw `random` baseline for matching that noise. `label_heldout` runs a recipe's exact
dedup, MinHash dedup and heuristic filters over the held-out test and validation items (nothing else:
no decontamination, no budget, no model) and records, per item, whether it passes, and if not which
stage and reason removed it. The ablation's primary metric is NLL on the items that pass.
"""

from __future__ import annotations

import logging
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from curation.frame import prepare
from curation.recipe import load_recipe
from tomelab.config import config_hash, to_dict
from tomelab.io import write_parquet

log = logging.getLogger(__name__)

# the prefix an eval item id carries per held-out split (eval/sets.py load_nll_extras)
SPLIT_PREFIX = {"test": "", "val": "val:"}


def label_heldout(heldout_dir: str | Path, recipe_path: str | Path) -> Path:
    """labels-<hash>.parquet in `heldout_dir`: item id (as eval names it), split, clean, stage, reason."""
    from curation import dedup, filters

    hdir = Path(heldout_dir)
    recipe = load_recipe(recipe_path)
    stages = {"exact_dedup": recipe.exact_dedup, "minhash_dedup": recipe.minhash, "filters": recipe.filters}
    key = config_hash({k: to_dict(v) for k, v in stages.items()} | {"v": 1})
    out = hdir / f"labels-{key}.parquet"
    if out.is_file():
        return out
    frames = []
    for split, prefix in SPLIT_PREFIX.items():
        df = prepare(pq.read_table(hdir / f"{split}.parquet"))
        ids = df["id"].to_list()
        why: dict[int, tuple[str, str]] = {}  # by row position: exact duplicates share an id, not a verdict
        for stage, cfg in stages.items():
            if not cfg.enabled:
                continue
            res = (dedup.exact_dedup(df, cfg) if stage == "exact_dedup" else dedup.minhash_dedup(df, cfg)
                   if stage == "minhash_dedup" else filters.heuristic_filters(df, cfg))
            kept = set(res.kept["_row"].to_list())
            gone = [r for r in df["_row"].to_list() if r not in kept]  # split_result keeps input order
            for r, (st, reason) in zip(gone, res.dropped.select("stage", "reason").iter_rows()):
                why[r] = (st, reason)
            df = res.kept
        frames.append(pl.DataFrame({
            "id": [prefix + i for i in ids], "split": [split] * len(ids), "clean": [k not in why for k in range(len(ids))],
            "stage": [why.get(k, ("", ""))[0] for k in range(len(ids))],
            "reason": [why.get(k, ("", ""))[1] for k in range(len(ids))]}))
    labels = pl.concat(frames)
    write_parquet(out, labels)
    log.info("held-out labels by %s: %d of %d test items clean", Path(recipe_path).name,
             labels.filter((pl.col("split") == "test") & pl.col("clean")).height,
             labels.filter(pl.col("split") == "test").height)
    return out


def read_labels(path: str | Path) -> dict[str, bool]:
    """Eval item id -> passes the clean recipe's filters."""
    t = pl.read_parquet(path, columns=["id", "clean"])
    return dict(zip(t["id"].to_list(), t["clean"].to_list()))
