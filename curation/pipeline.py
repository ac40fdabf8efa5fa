"""Recipe -> variant: load sources, split the held-out set, run the enabled stages, write the outputs.

`curate(recipe)` builds `artifacts/variants/<name>/` (train.parquet, dropped.parquet, dup_pairs.parquet,
stats.json) and `data_cards/<name>.md` + `_funnel.png`. Each stage's result is checkpointed under
artifacts/cache/stages/ by a fingerprint of its input and config; a re-run (of this or any other
variant sharing the same prefix of stages) skips every stage whose fingerprint is unchanged, and
since each checkpoint is written atomically (marker last), a kill -9 at any point loses at most the
stage that was running.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import polars as pl
import pyarrow as pa

from curation.frame import HELPER_COLUMNS, StageResult, empty_dropped, prepare, split_result
from curation.recipe import Recipe, load_recipe
from curation.sources import SourceConfig, load_source
from tomelab import paths
from tomelab.config import config_hash, to_dict
from tomelab.errors import DataError, TomelabError
from tomelab.io import read_json, read_parquet_or_none, write_json, write_parquet
from tomelab.schema import ROW_SCHEMA
from tomelab.stats import StageStats, Timer

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump to invalidate every checkpoint when stage semantics change


def cards_dir() -> Path:
    """data_cards/ beside the artefact home (./data_cards for the default ./artifacts)."""
    return paths.home().parent / "data_cards"


def heldout_root() -> Path:
    return paths.home() / "heldout"


# ---------------------------------------------------------------- sources


def _file_stamp(cfg: SourceConfig) -> str:
    """Cheap change detector for a source's file: path, size and mtime (hub ids: the id + split)."""
    from curation.sources import _default_path, sharegpt_package_file

    path = cfg.path or _default_path(cfg.kind, cfg.split)
    if cfg.kind == "sharegpt" and not cfg.path:
        path = str(sharegpt_package_file())
    p = Path(path).expanduser()
    if p.exists():
        st = p.stat()
        return f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return f"hub:{path}:{cfg.split}"


@dataclass
class SourceData:
    name: str
    table: pa.Table
    fingerprint: str  # content hash of the loaded rows' ids
    origin: str
    stats: dict[str, Any]


def load_cached_source(cfg: SourceConfig, *, progress: bool = True, force: bool = False) -> SourceData:
    """Load a source once into artifacts/cache/sources/; later runs read the parquet (`force`: reload).
    A cache file that is truncated or not parquet is rebuilt rather than trusted."""
    import hashlib

    key = config_hash({"cfg": to_dict(cfg), "file": _file_stamp(cfg), "v": FORMAT_VERSION})
    base = paths.cache_dir() / "sources" / f"{cfg.name}-{key}"
    pq_path, meta_path = base.with_suffix(".parquet"), base.with_suffix(".json")
    if not force and pq_path.exists() and meta_path.exists():
        meta = read_json(meta_path)
        table = read_parquet_or_none(pq_path)
        if table is not None:
            return SourceData(cfg.name, table, meta["fingerprint"], meta["origin"], meta["stats"])
        log.warning("source cache %s is unreadable (truncated?): loading %s again", pq_path, cfg.name)
    loaded = load_source(cfg, progress=progress)
    if loaded.table.num_rows == 0:
        raise DataError(f"source {cfg.name!r} ({loaded.origin}) has no usable rows: all "
                        f"{loaded.stats.rows_in} were quarantined ({loaded.stats.dropped}). Check the file and `kind`.")
    fp = hashlib.sha256("\n".join(loaded.table.column("id").to_pylist()).encode()).hexdigest()[:16]
    write_parquet(pq_path, loaded.table)
    write_json(meta_path, {"fingerprint": fp, "origin": loaded.origin, "stats": loaded.stats.to_dict()})
    return SourceData(cfg.name, loaded.table, fp, loaded.origin, loaded.stats.to_dict())


# ---------------------------------------------------------------- held-out split

_PART = re.compile(r"_\d+$")


def _group_keys(table: pa.Table) -> list[str]:
    """Rows from one original conversation share a group (ShareGPT splits them as <id>_0, <id>_1)."""
    import json

    out = []
    for rid, meta in zip(table.column("id").to_pylist(), table.column("meta").to_pylist()):
        orig = json.loads(meta).get("orig_id")
        out.append(_PART.sub("", str(orig)) if orig else rid)
    return out


def make_heldout(recipe: Recipe, sources: dict[str, SourceData]) -> Path:
    """The held-out split for this recipe's held-out config and sources, made once from the raw pool.

    The key hashes the held-out config and the held-out sources' configs and content, so every
    variant sharing them (whatever its curation) reads the very same rows.
    """
    import numpy as np

    h = recipe.heldout
    names = [*h.sources, *[n for n in h.reference_rows if n not in h.sources]]
    src_cfgs = {s.name: to_dict(s) for s in recipe.sources if s.name in names}
    key = config_hash({"heldout": {k: v for k, v in to_dict(h).items() if v or k != "reference_rows"},
                       "sources": src_cfgs, "content": {n: sources[n].fingerprint for n in names}})
    d = heldout_root() / key
    if (d / "meta.json").exists():
        return d
    table = pa.concat_tables([sources[n].table for n in h.sources])
    groups = _group_keys(table)
    uniq = sorted(set(groups))
    rng = np.random.default_rng(h.seed)
    order = [uniq[i] for i in rng.permutation(len(uniq))]
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    test_idx: list[int] = []
    val_idx: list[int] = []
    used: list[str] = []
    for g in order:
        if len(test_idx) < h.test_rows:
            test_idx += by_group[g]
        elif len(val_idx) < h.val_rows:
            val_idx += by_group[g]
        else:
            break
        used.append(g)
    if len(test_idx) + len(val_idx) >= table.num_rows:
        raise TomelabError(f"held-out split would take every row of {h.sources}: lower heldout.test_rows / val_rows.")
    write_parquet(d / "test.parquet", table.take(sorted(test_idx)))
    write_parquet(d / "val.parquet", table.take(sorted(val_idx)))
    refs: dict[str, list[str]] = {}
    for n, k in sorted(h.reference_rows.items()):  # reference sets: a seeded sample no pool may train on
        t = sources[n].table
        take = sorted(np.random.default_rng(h.seed).permutation(t.num_rows)[: min(k, t.num_rows - 1)].tolist())
        write_parquet(d / f"ref-{n}.parquet", t.take(take))
        refs[n] = t.take(take).column("id").to_pylist()
    write_json(d / "meta.json", {"key": key, "config": to_dict(h), "sources": src_cfgs,
                                 "content": {n: sources[n].fingerprint for n in names},
                                 "test_rows": len(test_idx), "val_rows": len(val_idx), "groups": used,
                                 "reference_ids": refs})
    return d


def remove_heldout(df: pl.DataFrame, heldout_dir: Path, heldout_sources: list[str]) -> StageResult:
    """Drop held-out rows (and other parts of the same original conversation) from the training pool."""
    with Timer() as t:
        meta = read_json(heldout_dir / "meta.json")
        groups = set(meta["groups"])
        test_ids = set(pl.read_parquet(heldout_dir / "test.parquet", columns=["id"])["id"].to_list())
        val_ids = set(pl.read_parquet(heldout_dir / "val.parquet", columns=["id"])["id"].to_list())
        ref_of = {rid: n for n, ids in meta.get("reference_ids", {}).items() for rid in ids}
        gkeys = _group_keys(df.select(list(ROW_SCHEMA.names)).to_arrow())
        reason: list[str | None] = []
        detail: list[str] = []
        for rid, src, g in zip(df["id"].to_list(), df["source"].to_list(), gkeys):
            if rid in ref_of:
                reason.append("heldout")
                detail.append(f"in the {ref_of[rid]} reference set (never trained on)")
            elif rid in test_ids or rid in val_ids:
                reason.append("heldout")
                detail.append("in the held-out " + ("test" if rid in test_ids else "val") + " split")
            elif src in heldout_sources and g in groups:
                reason.append("heldout")
                detail.append(f"another part of held-out conversation {g}")
            else:
                reason.append(None)
                detail.append("")
    return split_result(df, "heldout", reason, detail, t.seconds, extra={"heldout_dir": str(heldout_dir)})


# ---------------------------------------------------------------- stage checkpoints


class StageRunner:
    """Runs stages in order, checkpointing each stage's result under a fingerprint of its input and config.

    Checkpoints live in artifacts/cache/stages/ and are shared by every variant: `dedup-filter-ifd`
    resumes from the stages `dedup-filter` already ran when their fingerprints match. A checkpoint
    holds the kept rows' `_row` positions (plus any score columns the stage added), the dropped rows,
    the stage's artefacts and, written last, the stats marker, so a kill -9 leaves a stage either
    whole or absent.
    """

    def __init__(self, root: Path, fingerprint: str, force: bool) -> None:
        self.root, self.fp, self.force = root, fingerprint, force
        self.stats: list[StageStats] = []
        self.dropped: list[pl.DataFrame] = []
        self.artefacts: dict[str, pl.DataFrame] = {}

    def run(self, name: str, cfg: Any, df: pl.DataFrame, fn: Callable[[pl.DataFrame], StageResult],
            *, allow_empty: bool = False, fix: str = "") -> pl.DataFrame:
        fp = config_hash({"in": self.fp, "stage": name, "cfg": to_dict(cfg), "v": FORMAT_VERSION})
        base = self.root / f"{name}-{fp}"
        marker = base.with_suffix(".json")
        saved = read_json(marker) if not self.force and marker.exists() else None
        rows = read_parquet_or_none(base.with_suffix(".kept.parquet"), as_polars=True) if saved else None
        dropped_saved = read_parquet_or_none(base.with_suffix(".dropped.parquet"), as_polars=True) if saved else None
        if saved and (rows is None or dropped_saved is None):
            log.warning("stage %s: checkpoint %s is unreadable (truncated?): running the stage again", name, base)
            saved = None
        if saved:
            kept = df.filter(pl.col("_row").is_in(rows["_row"].implode()))
            added = [c for c in rows.columns if c != "_row"]
            if added:
                kept = kept.join(rows, on="_row", how="left", maintain_order="left")
            dropped = dropped_saved
            arts = {k: pl.read_parquet(Path(f"{base}-{k}.parquet")) for k in saved.get("artefacts", [])}
            stats = StageStats.from_dict(saved["stats"])
            stats.extra = {**stats.extra, "resumed": True}
            if len(kept) != stats.kept:
                raise TomelabError(f"checkpoint {marker} does not match its input ({len(kept)} rows, expected "
                                   f"{stats.kept}): delete it or re-run with --force.")
            log.info("stage %s: unchanged, reusing checkpoint (%d kept)", name, len(kept))
        else:
            res = fn(df)
            kept, dropped, arts, stats = res.kept, res.dropped, res.artefacts, res.stats
            if len(kept) == 0 and len(df) > 0 and not allow_empty:
                raise TomelabError(
                    f"stage {name!r} would drop all {len(df)} rows ({stats.dropped}). Nothing was written for "
                    f"this stage; earlier stages stay checkpointed. {fix or 'Loosen its settings in the recipe.'}")
            added = [c for c in kept.columns if c not in df.columns]
            write_parquet(base.with_suffix(".kept.parquet"), kept.select(["_row", *added]))
            write_parquet(base.with_suffix(".dropped.parquet"), dropped)
            for k, a in arts.items():
                write_parquet(Path(f"{base}-{k}.parquet"), a)
            write_json(marker, {"fingerprint": fp, "stage": name, "stats": stats.to_dict(), "artefacts": sorted(arts)})
            log.info("stage %s: %d in, %d kept, dropped %s in %.1fs", name, stats.rows_in, stats.kept,
                     stats.dropped, stats.seconds)
        self.fp = fp
        self.stats.append(stats)
        self.dropped.append(dropped)
        for k, a in arts.items():
            self.artefacts[k] = a
        return kept


# ---------------------------------------------------------------- curate


def _score_columns(df: pl.DataFrame) -> list[str]:
    return [c for c in df.columns if c not in ROW_SCHEMA.names and c not in HELPER_COLUMNS]


def _refuse_name_clash(name: str, recipe_path: Path) -> None:
    """Two recipe files with the same `name` would overwrite each other's variant silently."""
    st = paths.variants_dir() / name / "stats.json"
    if not st.is_file():
        return
    prev = read_json(st).get("recipe_file")
    if prev and Path(prev).is_file() and Path(prev).resolve() != recipe_path.resolve():
        raise TomelabError(f"{recipe_path}: variant name {name!r} is already built from {prev}; two recipes may not "
                           f"share a name. Rename one (`name = ...`), or delete {st.parent} to rebuild it from this file.")


def curate(recipe_path: str | Path, *, force: bool = False, progress: bool = True,
           overrides: dict[str, Any] | None = None) -> Path:
    """Build the variant a recipe describes; returns artifacts/variants/<name>/.
    `overrides` replace top-level recipe keys (an ablation block's name, seed and draw)."""
    from curation import dedup, filters
    from curation.card import write_card
    from curation.decontam import collect_test_items, decontaminate, test_set_stamps
    from curation.embed import Embedder
    from curation.mixing import draw_block, plan_budget, row_tokens, sample_budget, sample_token_budget, select_longest
    from curation.quality import select_by_quality

    recipe = load_recipe(recipe_path, overrides)
    _refuse_name_clash(recipe.name, Path(recipe_path))
    with Timer() as total:
        out = paths.variants_dir() / recipe.name
        wanted = set(recipe.pool_sources) | set(recipe.heldout.sources) | set(recipe.heldout.reference_rows)
        needed = [s for s in recipe.sources if s.name in wanted]
        sources = {s.name: load_cached_source(s, progress=progress, force=force) for s in needed}
        heldout_dir = make_heldout(recipe, sources)
        pool_tables = [sources[n].table for n in recipe.pool_sources]
        df = prepare(pa.concat_tables(pool_tables))
        fp0 = config_hash({"sources": {n: sources[n].fingerprint for n in recipe.pool_sources},
                           "pool": recipe.pool_sources, "heldout": heldout_dir.name, "seed": recipe.seed})
        runner = StageRunner(paths.cache_dir() / "stages", fp0, force)
        load_stats = [StageStats(stage=f"load:{n}", rows_in=sources[n].stats["rows_in"], kept=sources[n].table.num_rows,
                                 dropped=sources[n].stats["dropped"], seconds=sources[n].stats["seconds"],
                                 extra={"origin": sources[n].origin}) for n in recipe.pool_sources]

        df = runner.run("heldout", recipe.heldout, df, lambda d: remove_heldout(d, heldout_dir, recipe.heldout.sources))
        if recipe.draw_rows:
            df = runner.run("draw", (recipe.draw_rows, recipe.draw_seed), df,
                            lambda d: draw_block(d, recipe.draw_rows, recipe.draw_seed))
        if recipe.exact_dedup.enabled:
            df = runner.run("exact_dedup", recipe.exact_dedup, df, lambda d: dedup.exact_dedup(d, recipe.exact_dedup))
        if recipe.minhash.enabled:
            df = runner.run("minhash_dedup", recipe.minhash, df,
                            lambda d: dedup.minhash_dedup(d, recipe.minhash, progress=progress),
                            fix="Raise [minhash] threshold.")
        if recipe.filters.enabled:
            df = runner.run("filters", recipe.filters, df,
                            lambda d: filters.heuristic_filters(d, recipe.filters, progress=progress),
                            fix="Loosen the bounds in [filters] or remove a name from [filters] enabled.")
        if recipe.decontam.enabled:
            dc = recipe.decontam
            emb = Embedder(dc.model) if dc.embed_threshold < 1 else None
            df = runner.run("decontam", (dc, heldout_dir.name, test_set_stamps(dc)), df,
                            lambda d: decontaminate(d, dc, collect_test_items(dc, heldout_dir / "test.parquet"),
                                                    emb, progress=progress),
                            fix="Raise [decontam] embed_threshold or ngram.")
        if recipe.semantic_dedup.enabled:
            sd = recipe.semantic_dedup
            df = runner.run("semantic_dedup", sd, df,
                            lambda d: dedup.semantic_dedup(d, sd, Embedder(sd.model), progress=progress),
                            fix="Raise [semantic_dedup] threshold.")
        plan = plan_budget(recipe, df)
        targets, notes = plan.row_targets, plan.notes
        if recipe.quality.enabled:
            q = recipe.quality
            df = runner.run("quality", (q, targets), df,
                            lambda d: select_by_quality(d, q, targets, recipe.seed, progress=progress),
                            fix="Raise [quality] max_ifd, or lower min_score.")
        if recipe.select == "longest":
            if plan.unit != "rows":
                raise TomelabError(f"{recipe_path}: select = \"longest\" budgets by rows; remove budget_tokens.")
            df = runner.run("longest", (targets, recipe.fit_tokens), df,
                            lambda d: select_longest(d, targets, recipe.fit_tokens))
        elif plan.unit == "rows":  # the same stage config as before token budgets, so old checkpoints still match
            df = runner.run("budget", (recipe.budget_rows, targets, recipe.seed), df,
                            lambda d: sample_budget(d, targets, recipe.seed, notes))
        else:
            df = runner.run("budget", (recipe.budget_rows, recipe.budget_tokens, plan.token_targets, recipe.seed), df,
                            lambda d: sample_token_budget(d, plan.token_targets, recipe.seed, notes,
                                                          max_rows=recipe.budget_rows))

        train = df.drop([c for c in HELPER_COLUMNS if c in df.columns])
        train = train.select([*ROW_SCHEMA.names, *_score_columns(df)])
        dropped = pl.concat(runner.dropped) if runner.dropped else empty_dropped()
        pairs = [a.with_columns(pl.lit(k.removesuffix("_pairs")).alias("stage")) for k, a in runner.artefacts.items()]
        all_stats = load_stats + runner.stats
    stats = {
        "variant": recipe.name,
        "description": recipe.description,
        "config_hash": config_hash(recipe),
        "recipe_file": str(recipe_path),
        "heldout_dir": str(heldout_dir),
        "budget_rows": recipe.budget_rows,
        "budget_tokens": recipe.budget_tokens,
        "budget_unit": plan.unit,
        "rows": len(train),
        "sources": {n: {"origin": sources[n].origin, "fingerprint": sources[n].fingerprint,
                        "rows": sources[n].table.num_rows} for n in sources},
        "mix": {s: int(n) for s, n in train.group_by("source").len().iter_rows()},
        "targets": targets,
        "token_targets": plan.token_targets,
        "tokens": {s: int(n) for s, n in train.with_columns(row_tokens(train)).group_by("source")
                   .agg(pl.col("tokens").sum()).iter_rows()},
        "warnings": runner.stats[-1].extra.get("warnings", notes),
        "seconds": round(total.seconds, 2),
        "stages": [s.to_dict() for s in all_stats],
        "recipe": to_dict(recipe),
    }
    write_parquet(out / "train.parquet", train)
    write_parquet(out / "dropped.parquet", dropped)
    if pairs:
        write_parquet(out / "dup_pairs.parquet", pl.concat(pairs, how="diagonal"))
    write_json(out / "stats.json", stats)
    write_card(recipe, stats, train, cards_dir())
    log.info("variant %s: %d rows -> %s (%.1fs)", recipe.name, len(train), out, total.seconds)
    return out
