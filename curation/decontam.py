"""Decontamination against every evaluation set: word n-gram overlap plus prompt-embedding similarity.

A training row is dropped as `contaminated:<test set>` when it shares any word `ngram` (13 by
default, as in GPT-3 / datatrove) with a test item, or when its prompt embedding has cosine >=
`embed_threshold` with a test prompt (catches paraphrases and short prompts with no 13-gram).
The held-out test split is always one of the test sets when `include_heldout` is on.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from curation.frame import StageResult, split_result
from curation.recipe import DecontamConfig, resolve_data_path
from curation.stage import Need, Stage, sum_extra
from tomelab.errors import DataError
from tomelab.stats import Timer

_WORD = re.compile(r"\w+")
MAX_CHARS = 20_000  # n-grams are taken over at most this much of each training row


@dataclass
class TestItem:
    test_set: str
    key: str
    text: str


def load_test_set(name: str, path: Path, fields: list[str]) -> list[TestItem]:
    """Items of a JSONL / JSON / parquet test set; each listed field becomes one text."""
    if not path.exists():
        raise DataError(f"decontamination test set {name!r}: {path} does not exist. Fix its `path` in the recipe.")
    if path.suffix == ".parquet":
        records = pl.read_parquet(path).to_dicts()
    elif path.suffix == ".json":
        records = json.loads(path.read_text(encoding="utf-8"))
    else:
        records = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    items = []
    for n, rec in enumerate(records, start=1):
        for f in fields:
            if f not in rec:
                raise DataError(f"{path}: row {n} has no field {f!r} (test set {name!r}). "
                                f"Set `fields` of that test set to columns it has: {sorted(rec)}.")
            items.append(TestItem(name, f"{name}:{n}:{f}", str(rec[f])))
    if not items:
        raise DataError(f"decontamination test set {name!r} ({path}) is empty.")
    return items


def heldout_items(test_parquet: Path) -> list[TestItem]:
    """The held-out split's prompts as test items.

    Prompts only: ChatGPT-style answers share stock 13-grams ("let me know if you have any further
    questions") with thousands of unrelated rows, which would flag boilerplate, not contamination.
    """
    df = pl.read_parquet(test_parquet)
    items = []
    for rid, msgs in zip(df["id"].to_list(), df["messages"].to_list()):
        prompt = "\n".join(m["content"] for m in msgs if m["role"] != "assistant")
        items.append(TestItem("heldout", f"heldout:{rid}:prompt", prompt))
    return items


def test_set_stamps(cfg: DecontamConfig) -> list[str]:
    """Size and mtime of each test set file, so an edited test set re-runs decontamination."""
    out = []
    for ts in cfg.test_sets:
        p = resolve_data_path(ts.path)
        st = p.stat() if p.exists() else None
        out.append(f"{ts.name}:{p}:{st.st_size}:{st.st_mtime_ns}" if st else f"{ts.name}:{p}:missing")
    return out


def collect_test_items(cfg: DecontamConfig, heldout_test: Path | None) -> list[TestItem]:
    items: list[TestItem] = []
    if cfg.include_heldout and heldout_test is not None:
        items += heldout_items(heldout_test)
    for ts in cfg.test_sets:
        items += load_test_set(ts.name, resolve_data_path(ts.path), ts.fields)
    return items


_MIX = np.uint64(1099511628211)  # FNV prime: the rolling combiner of word hashes into n-gram hashes
CHUNK_ROWS = 5_000  # rows per vectorised batch, bounding memory at ~100 MB per batch


def ngram_hashes(texts: list[str], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every word n-gram of every text as a 64-bit hash, vectorised (polars words + numpy rolling mix).

    Returns (row index, hash, word offset) per n-gram; n-grams never straddle two texts.
    Words are `\\w+` runs of the lower-cased text (its first MAX_CHARS characters).
    """
    words = (pl.Series(texts, dtype=pl.String).fill_null("").str.slice(0, MAX_CHARS)
             .str.to_lowercase().str.extract_all(r"\w+"))
    lens = words.list.len().fill_null(0).to_numpy().astype(np.int64)
    flat = words.explode(empty_as_null=False, keep_nulls=False).hash(seed=7).to_numpy()
    m = len(flat) - n + 1
    if m <= 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, np.zeros(0, dtype=np.uint64), empty
    rows = np.repeat(np.arange(len(lens)), lens)
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            h = h * _MIX + flat[k:k + m]
    valid = rows[:m] == rows[n - 1:]
    row_start = np.concatenate([[0], np.cumsum(lens)[:-1]])
    r = rows[:m][valid]
    return r, h[valid], np.nonzero(valid)[0] - row_start[r]


def _ngram_text(text: str, offset: int, n: int) -> str:
    words = _WORD.findall(text[:MAX_CHARS].lower())
    return " ".join(words[offset:offset + n])


@dataclass
class TestIndex:
    """What decontamination compares rows with, built once per process: test n-gram hashes (and their
    owning test set) and, with an embedder, the test prompts' vectors."""

    items: list[TestItem]
    hashes: np.ndarray
    owner: dict[int, str]
    prompts: list[TestItem]
    vecs: np.ndarray | None


def build_index(cfg: DecontamConfig, items: list[TestItem], embedder=None) -> TestIndex:
    t_rows, t_hash, _ = ngram_hashes([it.text for it in items], cfg.ngram)
    owner: dict[int, str] = {}
    for r, h in zip(t_rows.tolist(), t_hash.tolist()):
        owner.setdefault(h, items[r].test_set)
    prompts = [it for it in items if not it.key.endswith(":answer")]  # answers: n-grams only
    vecs = None
    if embedder is not None and cfg.embed_threshold < 1 and items:
        vecs = embedder.encode(["t:" + hashlib.sha256(it.text.encode()).hexdigest()[:16] for it in prompts],
                               [it.text for it in prompts])
    return TestIndex(items, np.unique(t_hash), owner, prompts, vecs)


def decontaminate(df: pl.DataFrame, cfg: DecontamConfig, items: list[TestItem], embedder=None,
                  *, progress: bool = False, index: TestIndex | None = None) -> StageResult:
    """Drop rows overlapping any test item; the stats' `extra.by_test_set` counts rows per test set."""
    with Timer() as t:
        index = index or build_index(cfg, items, embedder if len(df) else None)
        items, owner, test_hashes = index.items, index.owner, index.hashes
        reason: list[str | None] = [None] * len(df)
        detail = [""] * len(df)
        texts = df["conversation"].to_list()
        starts = range(0, len(df), CHUNK_ROWS)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc=f"decontam {cfg.ngram}-grams", unit="chunk", leave=False)
        for s in starts:
            rows, hashes, offsets = ngram_hashes(texts[s:s + CHUNK_ROWS], cfg.ngram)
            hit = np.isin(hashes, test_hashes)
            seen: set[int] = set()
            for r, h, o in zip(rows[hit].tolist(), hashes[hit].tolist(), offsets[hit].tolist()):
                if r in seen:
                    continue  # first shared n-gram of each row is enough
                seen.add(r)
                i = s + r
                name = owner[h]
                reason[i] = f"contaminated:{name}"
                detail[i] = f"shares the {cfg.ngram}-gram {_ngram_text(texts[i], o, cfg.ngram)!r} with {name}"
        n_embed = 0
        if embedder is not None and cfg.embed_threshold < 1 and len(df) and items and index.vecs is not None:
            import faiss

            prompts, tvecs = index.prompts, index.vecs
            qvecs = embedder.encode([f"{i}:prompt" for i in df["id"].to_list()], df["prompt"].to_list(),
                                    progress=progress)
            index_f = faiss.IndexFlatIP(tvecs.shape[1])
            index_f.add(tvecs)
            sims, nbrs = index_f.search(qvecs, 1)
            for i in np.nonzero(sims[:, 0] >= cfg.embed_threshold)[0]:
                if reason[i] is None:
                    it = prompts[int(nbrs[i, 0])]
                    reason[i] = f"contaminated:{it.test_set}"
                    detail[i] = f"prompt cosine {sims[i, 0]:.3f} with {it.key}"
                    n_embed += 1
    by_set: dict[str, int] = {}
    for r in reason:
        if r is not None:
            by_set[r.split(":", 1)[1]] = by_set.get(r.split(":", 1)[1], 0) + 1
    test_sets = sorted({it.test_set for it in items})
    extra = {"ngram": cfg.ngram, "embed_threshold": cfg.embed_threshold, "test_sets": test_sets,
             "test_items": len(items), "by_test_set": {s: by_set.get(s, 0) for s in test_sets},
             "by_embedding": n_embed}
    return split_result(df, "decontam", reason, detail, t.seconds, extra=extra)


class DecontamStage(Stage):
    """Row-local: each row is compared with the test sets alone. `setup` loads the test sets and
    builds their index once per process; `key` adds the held-out split and the test files' stamps."""

    name = "decontam"
    kind = "row"
    fix = "Raise [decontam] embed_threshold or ngram."

    def __init__(self, cfg: DecontamConfig, heldout_test: Path | None) -> None:
        super().__init__(cfg)
        self.heldout_test = heldout_test

    def key(self) -> Any:
        return (self.cfg, self.heldout_test.parent.name if self.heldout_test else None, test_set_stamps(self.cfg))

    def needs(self) -> dict[str, Need]:
        return {"embedder": Need("embedder", self.cfg.model)} if self.cfg.embed_threshold < 1 else {}

    def setup(self, embedder=None, **_: Any) -> None:
        self.embedder = embedder
        self.index = build_index(self.cfg, collect_test_items(self.cfg, self.heldout_test), embedder)

    def run(self, frame: pl.DataFrame) -> StageResult:
        return decontaminate(frame, self.cfg, self.index.items, self.embedder, index=self.index)

    def merge_extra(self, extras: list[dict[str, Any]]) -> dict[str, Any]:
        return sum_extra(extras, "by_test_set.*", "by_embedding")
