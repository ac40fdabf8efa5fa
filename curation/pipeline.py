"""Recipe -> variant: load sources, split the held-out set, run the enabled stages, write the outputs.

`curate(recipe)` builds `artifacts/variants/<name>/` (train.parquet, dropped.parquet, dup_pairs.parquet,
stats.json) and `data_cards/<name>.md` + `_funnel.png`. The recipe becomes a list of `Stage` objects
(`pool_stages`, then `budget_stages` once the budget plan is known) that `StageRunner` runs through an
executor (`LocalExecutor`, or `RayExecutor` with `executor = "ray"`). Each stage's result is checkpointed under
artifacts/cache/stages/ by a fingerprint of its input and config; a re-run (of this or any other
variant sharing the same prefix of stages) skips every stage whose fingerprint is unchanged, and
since each checkpoint is written atomically (marker last), a kill -9 at any point loses at most the
stage that was running.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from curation.frame import HELPER_COLUMNS, empty_dropped, prepare
from curation.heldout import make_heldout
from curation.mixing import BudgetPlan, plan_budget, row_tokens
from curation.recipe import Recipe, load_recipe, recipe_dict
from curation.sources import SourceConfig, load_source
from curation.stage import MAP_PREFIX, Stage
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


# ---------------------------------------------------------------- stage checkpoints


class StageRunner:
    """Runs `Stage`s in order through an executor, checkpointing each stage's result under a fingerprint
    of its input and its `key()` (config). The runner alone owns order, progress, checkpoints and
    model loading (the executor loads what a stage `needs`, only when the stage really runs).

    Checkpoints live in artifacts/cache/stages/ and are shared by every variant: `dedup-filter-ifd`
    resumes from the stages `dedup-filter` already ran when their fingerprints match. A checkpoint
    holds the kept rows' `_row` positions (plus any score columns the stage added), the dropped rows,
    the stage's artefacts and, written last, the stats marker, so a kill -9 leaves a stage either
    whole or absent. A stage's `seconds` is the runner's clock around it (loading what it needs, then
    the executor's run), the same measure under every executor; a reused stage keeps its earlier seconds.
    """

    def __init__(self, root: Path, fingerprint: str, force: bool, executor: Any = None, *,
                 progress: bool = False) -> None:
        from curation.executors import LocalExecutor

        self.root, self.fp, self.force, self.progress = root, fingerprint, force, progress
        self.executor = executor if executor is not None else LocalExecutor(progress=progress)
        self.stats: list[StageStats] = []
        self.dropped: list[pl.DataFrame] = []
        self.artefacts: dict[str, pl.DataFrame] = {}

    def run_all(self, stages: list[Stage], df: pl.DataFrame) -> pl.DataFrame:
        from tqdm import tqdm

        bar = tqdm(stages, desc="curate", unit="stage", leave=False, disable=not self.progress)
        for stage in bar:
            bar.set_postfix_str(stage.name)
            df = self.run(stage, df)
        return df

    def run(self, stage: Stage, df: pl.DataFrame) -> pl.DataFrame:
        name = stage.name
        fp = config_hash({"in": self.fp, "stage": name, "cfg": to_dict(stage.key()), "v": FORMAT_VERSION})
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
            cpu0 = time.process_time()
            with Timer() as t:  # the whole stage as the runner sees it: loading its needs, then the executor's run
                res = self.executor.run(stage, df)
            kept, dropped, arts, stats = res.kept, res.dropped, res.artefacts, res.stats
            stats.seconds = round(t.seconds, 3)  # one clock for every stage and executor (bench/scale.py sizes by it)
            # CPU of this process, all its threads (Ray: the driver's share only); load inflates it far less than wall
            stats.extra = {**stats.extra, "cpu_seconds": round(time.process_time() - cpu0, 3)}
            kept = kept.drop([c for c in kept.columns if c.startswith(MAP_PREFIX)])
            if len(kept) == 0 and len(df) > 0 and not stage.allow_empty:
                raise TomelabError(
                    f"stage {name!r} would drop all {len(df)} rows ({stats.dropped}). Nothing was written for "
                    f"this stage; earlier stages stay checkpointed. {stage.fix or 'Loosen its settings in the recipe.'}")
            added = [c for c in kept.columns if c not in df.columns]
            write_parquet(base.with_suffix(".kept.parquet"), kept.select(["_row", *added]))
            write_parquet(base.with_suffix(".dropped.parquet"), dropped)
            for k, a in arts.items():
                write_parquet(Path(f"{base}-{k}.parquet"), a)
            write_json(marker, {"fingerprint": fp, "stage": name, "stats": stats.to_dict(), "artefacts": sorted(arts)})
            log.info("stage %s: %d in, %d kept, dropped %s in %.1fs (%s)", name, stats.rows_in, stats.kept,
                     stats.dropped, stats.seconds, self.executor.name)
        self.fp = fp
        self.stats.append(stats)
        self.dropped.append(dropped)
        for k, a in arts.items():
            self.artefacts[k] = a
        return kept


# ---------------------------------------------------------------- the recipe as a list of stages


def pool_stages(recipe: Recipe, heldout_dir: Path) -> list[Stage]:
    """The stages the recipe switches on, up to the budget plan (which needs the rows they leave)."""
    from curation.decontam import DecontamStage
    from curation.dedup import ExactDedupStage, MinHashStage, SemanticDedupStage
    from curation.filters import FiltersStage
    from curation.heldout import HeldoutStage
    from curation.mixing import DrawConfig, DrawStage

    r = recipe
    return [HeldoutStage(r.heldout, heldout_dir),
            *([DrawStage(DrawConfig(r.draw_rows, r.draw_seed))] if r.draw_rows else []),
            *([ExactDedupStage(r.exact_dedup)] if r.exact_dedup.enabled else []),
            *([MinHashStage(r.minhash)] if r.minhash.enabled else []),
            *([FiltersStage(r.filters)] if r.filters.enabled else []),
            *([DecontamStage(r.decontam, heldout_dir / "test.parquet")] if r.decontam.enabled else []),
            *([SemanticDedupStage(r.semantic_dedup)] if r.semantic_dedup.enabled else [])]


def budget_stages(recipe: Recipe, plan: BudgetPlan, recipe_path: str | Path) -> list[Stage]:
    """Quality selection (optional), then the row budget, the token budget or "longest" selection."""
    from curation.mixing import BudgetConfig, BudgetStage, LongestConfig, LongestStage
    from curation.quality import QualityStage

    r, targets = recipe, plan.row_targets
    out: list[Stage] = [QualityStage(r.quality, targets, r.seed)] if r.quality.enabled else []
    if r.select == "longest":
        if plan.unit != "rows":
            raise TomelabError(f"{recipe_path}: select = \"longest\" budgets by rows; remove budget_tokens.")
        return [*out, LongestStage(LongestConfig(targets, r.fit_tokens))]
    if plan.unit == "rows":  # the same checkpoint key as before token budgets (BudgetStage.key)
        return [*out, BudgetStage(BudgetConfig(r.budget_rows, targets, r.seed, tuple(plan.notes)))]
    return [*out, BudgetStage(BudgetConfig(r.budget_rows, targets, r.seed, tuple(plan.notes),
                                           budget_tokens=r.budget_tokens, token_targets=plan.token_targets))]


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
           overrides: dict[str, Any] | None = None, executor: Any = None) -> Path:
    """Build the variant a recipe describes; returns artifacts/variants/<name>/.
    `overrides` replace top-level recipe keys (an ablation block's name, seed and draw; `executor`);
    `executor` (a LocalExecutor / RayExecutor the caller made, and closes) replaces the recipe's."""
    from curation.card import write_card
    from curation.executors import make_executor

    recipe = load_recipe(recipe_path, overrides)
    _refuse_name_clash(recipe.name, Path(recipe_path))
    ex = executor if executor is not None else make_executor(recipe.executor, recipe.address, progress=progress)
    try:
        with Timer() as total:
            out = paths.variants_dir() / recipe.name
            wanted = set(recipe.pool_sources) | set(recipe.heldout.sources) | set(recipe.heldout.reference_rows)
            needed = [s for s in recipe.sources if s.name in wanted]
            sources = {s.name: load_cached_source(s, progress=progress, force=force) for s in needed}
            heldout_dir = make_heldout(recipe, sources)
            df = prepare(pa.concat_tables([sources[n].table for n in recipe.pool_sources]))
            fp0 = config_hash({"sources": {n: sources[n].fingerprint for n in recipe.pool_sources},
                               "pool": recipe.pool_sources, "heldout": heldout_dir.name, "seed": recipe.seed})
            runner = StageRunner(paths.cache_dir() / "stages", fp0, force, ex, progress=progress)
            load_stats = [StageStats(stage=f"load:{n}", rows_in=sources[n].stats["rows_in"],
                                     kept=sources[n].table.num_rows, dropped=sources[n].stats["dropped"],
                                     seconds=sources[n].stats["seconds"], extra={"origin": sources[n].origin})
                          for n in recipe.pool_sources]
            df = runner.run_all(pool_stages(recipe, heldout_dir), df)
            plan = plan_budget(recipe, df)
            df = runner.run_all(budget_stages(recipe, plan, recipe_path), df)

            train = df.drop([c for c in HELPER_COLUMNS if c in df.columns])
            train = train.select([*ROW_SCHEMA.names, *_score_columns(df)])
            dropped = pl.concat(runner.dropped) if runner.dropped else empty_dropped()
            pairs = [a.with_columns(pl.lit(k.removesuffix("_pairs")).alias("stage"))
                     for k, a in runner.artefacts.items()]
            all_stats = load_stats + runner.stats
    finally:
        if executor is None:
            ex.close()
    stats = {
        "variant": recipe.name,
        "description": recipe.description,
        "config_hash": config_hash(recipe_dict(recipe)),
        "recipe_file": str(recipe_path),
        "heldout_dir": str(heldout_dir),
        "budget_rows": recipe.budget_rows,
        "budget_tokens": recipe.budget_tokens,
        "budget_unit": plan.unit,
        "rows": len(train),
        "sources": {n: {"origin": sources[n].origin, "fingerprint": sources[n].fingerprint,
                        "rows": sources[n].table.num_rows} for n in sources},
        "mix": {s: int(n) for s, n in train.group_by("source").len().iter_rows()},
        "targets": plan.row_targets,
        "token_targets": plan.token_targets,
        "tokens": {s: int(n) for s, n in train.with_columns(row_tokens(train)).group_by("source")
                   .agg(pl.col("tokens").sum()).iter_rows()},
        "warnings": runner.stats[-1].extra.get("warnings", plan.notes),
        "seconds": round(total.seconds, 2),
        "stages": [s.to_dict() for s in all_stats],
        "executor": ex.name,
        "recipe": recipe_dict(recipe),
    }
    write_parquet(out / "train.parquet", train)
    write_parquet(out / "dropped.parquet", dropped)
    if pairs:
        write_parquet(out / "dup_pairs.parquet", pl.concat(pairs, how="diagonal"))
    write_json(out / "stats.json", stats)
    write_card(recipe, stats, train, cards_dir())
    log.info("variant %s: %d rows -> %s (%.1fs)", recipe.name, len(train), out, total.seconds)
    return out
