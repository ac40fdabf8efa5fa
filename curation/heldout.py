"""The held-out split (made once from the raw pool, before any curation) and the stage that removes it.

`make_heldout` writes artifacts/heldout/<key>/{test,val,ref-*}.parquet + meta.json; the key hashes the
held-out config and the held-out sources' configs and content, so every variant sharing them reads the
very same rows. `HeldoutStage` (row-local) drops those rows, their reference sets, and the other parts
of a held-out ShareGPT conversation (`<id>_1`, ...) from the training pool.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import pyarrow as pa

from curation.frame import StageResult, split_result
from curation.stage import Stage
from tomelab import paths
from tomelab.config import config_hash, to_dict
from tomelab.errors import TomelabError
from tomelab.io import read_json, write_json, write_parquet
from tomelab.schema import ROW_SCHEMA
from tomelab.stats import Timer

if TYPE_CHECKING:
    from curation.recipe import HeldoutSplitConfig, Recipe

_PART = re.compile(r"_\d+$")


def heldout_root() -> Path:
    return paths.home() / "heldout"


def _group_keys(table: pa.Table) -> list[str]:
    """Rows from one original conversation share a group (ShareGPT splits them as <id>_0, <id>_1)."""
    out = []
    for rid, meta in zip(table.column("id").to_pylist(), table.column("meta").to_pylist()):
        orig = json.loads(meta).get("orig_id")
        out.append(_PART.sub("", str(orig)) if orig else rid)
    return out


def make_heldout(recipe: Recipe, sources: dict[str, Any]) -> Path:
    """The held-out split for this recipe's held-out config and sources (`SourceData` by name), made
    once from the raw pool."""
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


class HeldoutStage(Stage):
    """Row-local: each row is checked against the split's ids and conversation groups alone. `setup`
    reads the split once per process; the checkpoint key is the held-out config (the split's own key is
    already part of the pipeline's input fingerprint)."""

    name = "heldout"
    kind = "row"

    def __init__(self, cfg: HeldoutSplitConfig, heldout_dir: Path) -> None:
        super().__init__(cfg)
        self.heldout_dir = Path(heldout_dir)

    def setup(self, **_: Any) -> None:
        d = self.heldout_dir
        meta = read_json(d / "meta.json")
        self.groups = set(meta["groups"])
        self.test_ids = set(pl.read_parquet(d / "test.parquet", columns=["id"])["id"].to_list())
        self.val_ids = set(pl.read_parquet(d / "val.parquet", columns=["id"])["id"].to_list())
        self.ref_of = {rid: n for n, ids in meta.get("reference_ids", {}).items() for rid in ids}

    def run(self, frame: pl.DataFrame) -> StageResult:
        with Timer() as t:
            gkeys = _group_keys(frame.select(list(ROW_SCHEMA.names)).to_arrow())
            reason: list[str | None] = []
            detail: list[str] = []
            for rid, src, g in zip(frame["id"].to_list(), frame["source"].to_list(), gkeys):
                if rid in self.ref_of:
                    reason.append("heldout")
                    detail.append(f"in the {self.ref_of[rid]} reference set (never trained on)")
                elif rid in self.test_ids or rid in self.val_ids:
                    reason.append("heldout")
                    detail.append("in the held-out " + ("test" if rid in self.test_ids else "val") + " split")
                elif src in self.cfg.sources and g in self.groups:
                    reason.append("heldout")
                    detail.append(f"another part of held-out conversation {g}")
                else:
                    reason.append(None)
                    detail.append("")
        return split_result(frame, "heldout", reason, detail, t.seconds, extra={"heldout_dir": str(self.heldout_dir)})
