"""Where stages run: `LocalExecutor` (this process, today's behaviour) or `RayExecutor` (Ray Data).

Executors only launch work; what a stage computes is the same wherever it runs:
- row stages: the frame is cut into Arrow blocks; each block goes through `stage.run` (Ray:
  `map_batches` on an actor pool when the stage `needs` a model, so its `setup`, and the model, run once
  per actor; as plain Ray tasks on the pooled workers otherwise);
- global stages: `stage.run` on the whole frame in this process (the driver), after any row-local
  `map` (embeddings) has been computed block by block;
- map_reduce stages: locally `stage.run` in one process; on Ray `map` -> `keys` -> shuffle
  (`groupby` on a hash partition of the key, `map_groups`) -> `reduce`, then `finish` on the driver.
The executor also loads what a stage `needs` (embedders, scorers) and owns the progress display.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import polars as pl
import pyarrow as pa

from curation.frame import StageResult, split_result
from curation.stage import MAP_PREFIX, Quiet, Stage, load_need, merge_results
from tomelab.config import config_hash
from tomelab.errors import ConfigError
from tomelab.ray_cluster import connect, import_ray, worker_env
from tomelab.stats import Timer

log = logging.getLogger(__name__)

BLOCK_ROWS = 10_000  # rows per block handed to one `run`/`map` call
PART = "__part"  # the shuffle partition column of a map_reduce stage's keys


def _has_map(stage: Stage) -> bool:
    return type(stage).map is not Stage.map


def _slices(frame: pl.DataFrame, rows: int) -> list[pl.DataFrame]:
    return [frame.slice(s, rows) for s in range(0, len(frame), rows)] or [frame]


class LocalExecutor:
    """Runs every stage in this process; resources are loaded once per curate and shared by stages."""

    name = "local"

    def __init__(self, *, progress: bool = False, block_rows: int = BLOCK_ROWS) -> None:
        self.progress, self.block_rows = progress, block_rows
        self._loaded: dict[tuple[str, str], Any] = {}

    def _setup(self, stage: Stage) -> None:
        res = {}
        for arg, need in stage.needs().items():
            key = (need.what, config_hash(need.spec))  # specs may be (unhashable) config dataclasses
            if key not in self._loaded:
                self._loaded[key] = load_need(need)
            res[arg] = Quiet(self._loaded[key], self.progress)
        stage.setup(**res)

    def _blocks(self, stage: Stage, frame: pl.DataFrame) -> list[pl.DataFrame]:
        parts = _slices(frame, self.block_rows)
        if self.progress and len(parts) > 1:
            from tqdm import tqdm

            return tqdm(parts, desc=stage.name, unit="block", leave=False)
        return parts

    def run(self, stage: Stage, frame: pl.DataFrame) -> StageResult:
        self._setup(stage)
        if stage.kind == "row":
            with Timer() as t:
                parts = [stage.run(b) for b in self._blocks(stage, frame)]
            return merge_results(stage, frame, parts, t.seconds)
        return stage.run(frame)  # global and map_reduce: one process holds the whole frame

    def close(self) -> None:
        self._loaded.clear()


# ---------------------------------------------------------------- Ray Data


class _StageActor:
    """A Ray Data callable class: loads the stage's needs and runs `setup` once per actor, then maps blocks.
    (Stages that need no model run as plain tasks instead, see `_task`: no process to start per stage.)"""

    def __init__(self, stage: Stage, mode: str, env: dict[str, str]) -> None:
        os.environ.update(env)
        self.stage, self.mode = stage, mode
        stage.setup(**{arg: Quiet(load_need(n), False) for arg, n in stage.needs().items()})

    def __call__(self, batch: pa.Table) -> pa.Table:
        df = pl.from_arrow(batch)
        if self.mode == "map":
            return _arrow(self.stage.map(df))
        res = self.stage.run(df)
        if set(res.kept.columns) - set(df.columns):
            raise NotImplementedError(f"row stage {self.stage.name} adds columns; give it a `map` instead")
        kept = set(res.kept["_row"].to_list())
        gone = iter(zip(res.dropped["reason"].to_list(), res.dropped["detail"].to_list()))  # in frame order
        per_row = [(None, "") if r in kept else next(gone) for r in df["_row"].to_list()]
        stats = [json.dumps(res.stats.extra)] + [None] * (len(df) - 1)
        return pa.table({"_row": pa.array(df["_row"].to_list(), pa.int64()),
                         "reason": pa.array([r for r, _ in per_row], pa.string()),
                         "detail": pa.array([d for _, d in per_row], pa.string()),
                         "_extra": pa.array(stats[:len(df)], pa.string())})


def _task(batch: pa.Table, stage: Stage, mode: str, env: dict[str, str]) -> pa.Table:
    """A Ray task on a pooled worker: `setup` per block is cheap for stages that load no model."""
    return _StageActor(stage, mode, env)(batch)


def _arrow(df: pl.DataFrame) -> pa.Table:
    return df.to_arrow(compat_level=pl.CompatLevel.oldest())


def _keys_fn(batch: pa.Table, stage: Stage, parts: int) -> pa.Table:
    """The stage's (key, _row) rows plus the shuffle partition of each key (a hash, the same in every process)."""
    keys = stage.keys(pl.from_arrow(batch))
    return _arrow(keys.with_columns((pl.col("key").hash(seed=0) % parts).cast(pl.Int64).alias(PART)))


def _reduce_fn(group: pa.Table, stage: Stage) -> pa.Table:
    return _arrow(stage.reduce(pl.from_arrow(group).drop(PART)))


class RayExecutor:
    """Runs row-local work and map/shuffle/reduce on a Ray cluster; global steps stay on the driver.

    `address`: an existing cluster (`ray://host:10001`, `auto`), else $RAY_ADDRESS, else a local
    Ray on this machine's cores (`num_cpus`). A Ray already initialised by the caller is used as is.
    """

    name = "ray"

    def __init__(self, address: str = "", *, workers: int = 2, num_cpus: int | None = None,
                 block_rows: int = BLOCK_ROWS, progress: bool = False) -> None:
        ray = import_ray()
        self.workers, self.block_rows, self.progress = workers, block_rows, progress
        self._owns = connect(address, num_cpus=num_cpus, hint="recipe's `address` or $RAY_ADDRESS")
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        self.local = LocalExecutor(progress=progress)  # global steps on the driver

    def _dataset(self, frame: pl.DataFrame):
        import ray

        rows = max(1, min(self.block_rows, -(-len(frame) // (2 * self.workers))))
        return ray.data.from_arrow([_arrow(b) for b in _slices(frame, rows)])

    def _map(self, stage: Stage, ds, mode: str):
        import ray

        env = worker_env()
        if not stage.needs():  # Ray tasks on the worker processes it already has
            return ds.map_batches(_task, fn_kwargs={"stage": stage, "mode": mode, "env": env}, batch_format="pyarrow",
                                  batch_size=None, compute=ray.data.TaskPoolStrategy(size=self.workers))
        return ds.map_batches(_StageActor, fn_constructor_args=(stage, mode, env), batch_format="pyarrow",
                              batch_size=None, compute=ray.data.ActorPoolStrategy(size=self.workers))

    @staticmethod
    def _collect(ds) -> pl.DataFrame:
        import ray

        tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
        return pl.from_arrow(pa.concat_tables(tables, promote_options="default")) if tables else pl.DataFrame()

    def run(self, stage: Stage, frame: pl.DataFrame) -> StageResult:
        if len(frame) == 0:
            return self.local.run(stage, frame)
        if stage.kind == "row":
            return self._row(stage, frame)
        if stage.kind != "map_reduce" and not _has_map(stage):
            return self.local.run(stage, frame)
        with Timer() as t:
            if stage.kind == "map_reduce":
                res = self._map_reduce(stage, frame)
            else:  # e.g. semantic dedup: embeddings on the actors, kNN on the driver
                mapped = self._collect(self._map(stage, self._dataset(frame), "map"))
                res = stage.run(frame.join(mapped, on="_row", how="left", maintain_order="left"))
        res.stats.seconds = round(t.seconds, 3)  # the whole stage, not only its driver-side part
        return res

    def _row(self, stage: Stage, frame: pl.DataFrame) -> StageResult:
        with Timer() as t:
            out = self._collect(self._map(stage, self._dataset(frame), "row"))
        by_row = {r: (why, d) for r, why, d in zip(out["_row"].to_list(), out["reason"].to_list(),
                                                   out["detail"].to_list())}
        reasons = [by_row[r][0] for r in frame["_row"].to_list()]
        details = [by_row[r][1] or "" for r in frame["_row"].to_list()]
        extras = [json.loads(e) for e in out["_extra"].to_list() if e is not None]
        return split_result(frame, stage.name, reasons, details, t.seconds, extra=stage.merge_extra(extras))

    def _map_reduce(self, stage: Stage, frame: pl.DataFrame) -> StageResult:
        mapped_ds = self._map(stage, self._dataset(frame), "map").materialize()
        parts = 4 * self.workers  # one reduce call per partition (one per key would be a call per band bucket)
        keys = mapped_ds.map_batches(_keys_fn, fn_kwargs={"stage": stage, "parts": parts}, batch_format="pyarrow")
        reduced = self._collect(keys.groupby(PART).map_groups(_reduce_fn, fn_kwargs={"stage": stage},
                                                             batch_format="pyarrow"))
        mapped = self._collect(mapped_ds)
        if not len(reduced):
            reduced = pl.DataFrame(schema={"a": pl.Int64, "b": pl.Int64})
        res = stage.finish(frame.join(mapped, on="_row", how="left", maintain_order="left"), reduced)
        res.kept = res.kept.drop([c for c in res.kept.columns if c.startswith(MAP_PREFIX)])
        return res

    def close(self) -> None:
        import ray

        if self._owns and ray.is_initialized():
            ray.shutdown()


def make_executor(kind: str, address: str = "", *, progress: bool = False):
    if kind == "local":
        return LocalExecutor(progress=progress)
    if kind == "ray":
        return RayExecutor(address, progress=progress)
    raise ConfigError(f'unknown executor {kind!r}: use "local" or "ray"')
