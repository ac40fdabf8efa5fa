"""Small canonical variants built from the real shared Alpaca slice, for tests, demos and the benchmark.

Curation is a separate stage; these let training be exercised without it, in the exact on-disk
layout curation writes (train.parquet, stats.json with heldout_dir, <heldout>/val.parquet).
"""

from __future__ import annotations

import json
from pathlib import Path

from tomelab import paths
from tomelab.artifacts import Variant
from tomelab.errors import TomelabError
from tomelab.io import write_json, write_parquet
from tomelab.schema import make_row, rows_to_table


def alpaca_rows(n: int, *, offset: int = 0, max_chars: int = 1200) -> list[dict]:
    """Canonical rows from ../shared/data/alpaca/alpaca_5000.json (skipping very long ones)."""
    src = paths.shared_data_dir() / "alpaca" / "alpaca_5000.json"
    if not src.is_file():
        raise TomelabError(f"{src} not found: the repo must sit beside ../shared (or set TOMELAB_SHARED_DATA).")
    rows = []
    for i, r in enumerate(json.loads(src.read_text(encoding="utf-8"))[offset:], start=offset):
        user = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        if not r["output"].strip() or len(user) + len(r["output"]) > max_chars:
            continue
        rows.append(make_row("alpaca", [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}],
                             {"row": i}))
        if len(rows) == n:
            break
    return rows


def write_variant(name: str, train_rows: list[dict], val_rows: list[dict], *, heldout_key: str = "fixture") -> Path:
    """Write a variant folder in curation's layout under the current artefact home."""
    v = Variant(name)
    hdir = paths.home() / "heldout" / heldout_key
    write_parquet(hdir / "val.parquet", rows_to_table(val_rows))
    write_parquet(v.train, rows_to_table(train_rows))
    write_json(v.stats_path, {"variant": name, "config_hash": "fixture", "heldout_dir": str(hdir), "stages": []})
    return v.dir


def alpaca_variant(name: str, n_train: int, n_val: int = 16) -> Path:
    """A variant of `n_train` Alpaca rows with a disjoint `n_val`-row validation slice."""
    rows = alpaca_rows(n_train + n_val)
    return write_variant(name, rows[n_val:], rows[:n_val])
