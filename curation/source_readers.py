"""Raw readers of source files: each streams (row number, record) from JSONL, parquet, a JSON array
(whole, or streamed and tolerant of a file truncated mid-record), a folder of those, or the hub.

A line or record that cannot be decoded comes back as a `_BadJson` marker instead of raising, so
the loader quarantines that one row (`bad_json`, `bad_encoding`) and the rest of the file loads.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from tomelab.errors import DataError

BATCH_ROWS = 10_000

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
                warnings.warn(truncated(), stacklevel=2)
                return
            if buf[pos] == "]":
                return
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if not eof:
                    eof = not refill()
                    continue
                warnings.warn(truncated(), stacklevel=2)
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
    yield from enumerate(ds, start=1)


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
