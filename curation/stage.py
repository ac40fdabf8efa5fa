"""One contract for a curation stage, so an executor (local or Ray) can run any of them.

A `Stage` has a `name`, its typed config (`cfg`), a `kind` and `run(frame) -> StageResult`:
- "row": row-local. `run` may be called on any slice of the frame (heuristic filters, n-gram
  decontamination, held-out removal); the executor splits, runs and `merge`s the parts.
- "global": `run` needs the whole frame (exact / semantic dedup, budget, mixing, the block draw,
  "longest" selection, quality selection). An optional row-local `map(batch)` precomputes per-row
  columns (named `__*`, e.g. embeddings) that the executor may compute elsewhere and join in first.
- "map_reduce": `map(batch)` -> per-row columns; `keys(mapped)` -> (key, _row) rows to shuffle on;
  `reduce(rows of one or more whole keys)` -> records; `finish(frame + mapped, records)` -> StageResult
  (MinHash: signatures -> band buckets -> candidate pairs -> greedy best-first clusters).

Stages never open progress bars, resolve cache paths or load models: they declare `needs()`
(an embedder, an IFD scorer) and the runner loads those once per process and hands them to `setup`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import polars as pl

from curation.frame import DROPPED_SCHEMA, StageResult
from tomelab.stats import StageStats

Kind = Literal["row", "global", "map_reduce"]
MAP_PREFIX = "__"  # columns a stage's `map` adds; the runner strips them from the kept rows


@dataclass(frozen=True)
class Need:
    """A model the runner loads for a stage: ("embedder", model name) or ("scorer", QualityConfig)."""

    what: Literal["embedder", "scorer"]
    spec: Any


class Stage:
    """Base class: subclasses set `name` and `kind`, keep their typed config in `cfg`, and implement `run`."""

    name: ClassVar[str]
    kind: ClassVar[Kind] = "global"
    fix: ClassVar[str] = ""  # what to change in the recipe when the stage would drop every row
    allow_empty: ClassVar[bool] = False

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def key(self) -> Any:
        """What the checkpoint fingerprint hashes besides the input: the config and anything else read."""
        return self.cfg

    def needs(self) -> dict[str, Need]:
        return {}

    def setup(self, **resources: Any) -> None:
        """Called once per process before any `run`/`map`, with the loaded `needs()`."""

    def run(self, frame: pl.DataFrame) -> StageResult:
        raise NotImplementedError

    # ---- row stages: the parts of a split frame are merged back in the frame's order
    def merge_extra(self, extras: list[dict[str, Any]]) -> dict[str, Any]:
        return extras[0] if extras else {}

    # ---- global stages with a row-local precompute, and map_reduce stages
    def map(self, batch: pl.DataFrame) -> pl.DataFrame | None:
        """Per-row columns (`_row` plus `__*` columns) computed from a slice of the frame, or None."""
        return None

    def keys(self, mapped: pl.DataFrame) -> pl.DataFrame:
        raise NotImplementedError

    def reduce(self, group: pl.DataFrame) -> pl.DataFrame:
        raise NotImplementedError

    def finish(self, frame: pl.DataFrame, reduced: pl.DataFrame) -> StageResult:
        raise NotImplementedError


def merge_results(stage: Stage, frame: pl.DataFrame, parts: list[StageResult], seconds: float) -> StageResult:
    """The StageResult of a row stage run on consecutive slices of `frame`, as if run on all of it."""
    if len(parts) == 1:
        return parts[0]
    kept = pl.concat([p.kept for p in parts], how="vertical_relaxed")
    dropped = pl.concat([p.dropped for p in parts]) if parts else pl.DataFrame(schema=DROPPED_SCHEMA)
    counts: dict[str, int] = {}
    for p in parts:
        for r, n in p.stats.dropped.items():
            counts[r] = counts.get(r, 0) + n
    stats = StageStats(stage=stage.name, rows_in=len(frame), kept=len(kept), dropped=counts,
                       seconds=round(seconds, 3), extra=stage.merge_extra([p.stats.extra for p in parts])).check()
    arts: dict[str, pl.DataFrame] = {}
    for p in parts:
        for k, a in p.artefacts.items():
            arts[k] = pl.concat([arts[k], a]) if k in arts else a
    return StageResult(kept, dropped, stats, arts)


def sum_extra(extras: list[dict[str, Any]], *paths: str) -> dict[str, Any]:
    """extras[0] with the numbers at the dotted `paths` (a `*` matches every key) summed over all parts."""
    import copy

    out = copy.deepcopy(extras[0]) if extras else {}

    def add(dst: dict, src: dict, parts: list[str]) -> None:
        head, rest = parts[0], parts[1:]
        for k in (list(src) if head == "*" else [head]):
            if k not in src:
                continue
            if rest:
                add(dst.setdefault(k, {}), src[k], rest)
            elif dst is not src:
                dst[k] = round(dst.get(k, 0) + src[k], 3)

    for e in extras[1:]:
        for p in paths:
            add(out, e, p.split("."))
    return out


def load_need(need: Need) -> Any:
    """Load one declared resource (runs in whichever process will use it)."""
    if need.what == "embedder":
        from tomelab.embed import Embedder

        return Embedder(need.spec)
    if need.what == "scorer":
        from curation.quality import QualityScorer

        return QualityScorer(need.spec)
    raise ValueError(f"unknown need {need.what!r}")


class Quiet:
    """A loaded resource whose progress bars the runner switches on or off (stages never pass `progress`)."""

    def __init__(self, obj: Any, progress: bool) -> None:
        self._obj, self._progress = obj, progress

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._obj, name)
        if name in ("encode", "score") and callable(attr):
            return lambda *a, **k: attr(*a, **{**k, "progress": self._progress})
        return attr
