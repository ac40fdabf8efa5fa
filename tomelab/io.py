"""Atomic writes: every artefact appears whole or not at all, so a kill -9 never leaves a
half-written file that a resumed run would mistake for a finished stage."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process umask: from /proc (thread-safe), else by setting it and straight back."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; give the file the mode a plain open() would have had.
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def exclusive(target: str | Path, what: str = "work on") -> Iterator[None]:
    """Hold an exclusive lock for `target` (a file `.<name>.lock` beside it) while the block runs.

    Two processes that share outputs (an ablation and a sweep reusing its runs) then take turns: the
    second waits, and finds the work finished. The lock dies with its process, so a kill -9 never
    leaves a stale one behind.
    """
    import fcntl
    import logging

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logging.getLogger(__name__).info("another process is busy with %s; waiting to %s it", target, what)
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty `<path>.partial` folder to fill; it replaces `path` only if the block succeeds.

    For folders written by libraries (`save_pretrained`): a killed writer leaves a `.partial`
    (cleared by the next attempt), never a half-written `path` that a reader would take as whole.
    """
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_parquet(path: str | Path, table: Any) -> Path:
    """Write a pyarrow Table or polars DataFrame atomically."""
    import pyarrow as pa  # here, not at the top: every CLI command imports this module, and `--help` stays fast
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = table.to_arrow()
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> Path:
    with atomic_path(path) as tmp:
        with tmp.open("w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
    return Path(path)


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (plots are PNG artefacts, never windows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Save a matplotlib figure atomically (temp name in the same folder, then os.replace).

    The format is taken from `path`'s suffix, since the temp name ends in `.tmp`.
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=fmt)
    return path


def read_parquet_or_none(path: str | Path, *, as_polars: bool = False) -> Any:
    """Read a parquet cache (a pyarrow Table, or a polars DataFrame with `as_polars`), or None when
    it is missing, truncated or not parquet at all.

    For caches that can be rebuilt: the caller recomputes instead of crashing on a half-file
    (a disk-full or a copy from elsewhere can leave one even though our own writes are atomic).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError):
        return None
    if as_polars:
        import polars as pl

        return pl.from_arrow(table)
    return table
