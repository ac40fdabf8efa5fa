"""Deduplication stages: exact (normalised text), near-dup MinHash/LSH (rensa), semantic (faiss kNN).

Every stage keeps the better row of a duplicate group: rows are visited best-first by
`quality_score`, and a row is dropped only when it duplicates a row already kept. That greedy
rule avoids the chaining of connected components (A~B~C does not remove C for A). The pairs
(dropped id -> kept id, similarity) are returned so a person can inspect them.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import polars as pl

from curation.frame import StageResult, split_result
from curation.recipe import ExactDedupConfig, MinHashConfig, SemanticDedupConfig
from curation.stage import MAP_PREFIX, Need, Stage
from tomelab.stats import Timer

log = logging.getLogger(__name__)

PAIR_SCHEMA = {"dropped_id": pl.String, "kept_id": pl.String, "similarity": pl.Float64,
               "dropped_text": pl.String, "kept_text": pl.String}


def best_first(df: pl.DataFrame) -> np.ndarray:
    """Row positions ordered best-first (quality desc, then the original order for stable ties)."""
    return np.lexsort((np.arange(len(df)), -df["quality_score"].fill_null(-1e9).to_numpy()))


def normalise(text: pl.Expr) -> pl.Expr:
    """Unicode NFKC, lower case, collapsed whitespace: copies that differ only in those are exact dups."""
    return text.str.normalize("NFKC").str.to_lowercase().str.replace_all(r"\s+", " ").str.strip_chars()


def _pairs_frame(df: pl.DataFrame, pairs: list[tuple[int, int, float]]) -> pl.DataFrame:
    if not pairs:
        return pl.DataFrame(schema=PAIR_SCHEMA)
    d, k, s = zip(*pairs)
    conv = df["conversation"]
    return pl.DataFrame({
        "dropped_id": df["id"].gather(list(d)), "kept_id": df["id"].gather(list(k)), "similarity": list(s),
        "dropped_text": conv.gather(list(d)).str.slice(0, 500), "kept_text": conv.gather(list(k)).str.slice(0, 500),
    }, schema=PAIR_SCHEMA)


def exact_dedup(df: pl.DataFrame, cfg: ExactDedupConfig) -> StageResult:
    """Drop rows whose normalised conversation equals that of a better row."""
    with Timer() as t:
        keys = df.select(normalise(pl.col("conversation")).hash().alias("k"))["k"].to_numpy()
        ids = df["id"].to_list()
        first: dict[int, int] = {}
        reason: list[str | None] = [None] * len(df)
        detail = [""] * len(df)
        pairs = []
        for i in best_first(df):
            k = int(keys[i])
            j = first.get(k)
            if j is None:
                first[k] = int(i)
            else:
                reason[i], detail[i] = "exact_duplicate", f"same normalised text as {ids[j]}"
                pairs.append((int(i), j, 1.0))
    return split_result(df, "exact_dedup", reason, detail, t.seconds, artefacts={"exact_pairs": _pairs_frame(df, pairs)})


_WORD = re.compile(r"\w+")


def shingles(text: str, n: int) -> list[str]:
    words = _WORD.findall(text.lower())
    if len(words) <= n:
        return [" ".join(words)] if words else [""]
    return [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]


def minhash_dedup(df: pl.DataFrame, cfg: MinHashConfig, *, progress: bool = False) -> StageResult:
    """Near-duplicates by MinHash over word n-gram shingles with an LSH index (rensa, Rust)."""
    from rensa import RMinHash, RMinHashLSH

    with Timer() as t:
        order = best_first(df)
        texts = df["conversation"].str.slice(0, cfg.max_chars).to_list()
        sets = (shingles(texts[i], cfg.ngram) for i in order)
        if progress:
            from tqdm import tqdm

            sets = tqdm(sets, total=len(df), desc="minhash", unit="row", leave=False)
        hashes = RMinHash.from_token_sets(sets, cfg.num_perm, cfg.seed)
        lsh = RMinHashLSH(cfg.threshold, cfg.num_perm, _bands(cfg.num_perm, cfg.threshold))
        reason: list[str | None] = [None] * len(df)
        detail = [""] * len(df)
        ids = df["id"].to_list()
        pairs = []
        # visit best-first: query against rows already kept, then index the row if it survives
        for pos, mh in enumerate(hashes):
            i = int(order[pos])
            best_j, best_s = -1, 0.0
            for key in lsh.query(mh):
                s = mh.jaccard(hashes[key])
                if s >= cfg.threshold and s > best_s:
                    best_j, best_s = key, s
            if best_j >= 0:
                j = int(order[best_j])
                reason[i], detail[i] = "near_duplicate", f"MinHash Jaccard {best_s:.2f} with {ids[j]}"
                pairs.append((i, j, round(best_s, 4)))
            else:
                lsh.insert(pos, mh)
    return split_result(df, "minhash_dedup", reason, detail, t.seconds,
                        extra={"num_perm": cfg.num_perm, "threshold": cfg.threshold, "ngram": cfg.ngram},
                        artefacts={"minhash_pairs": _pairs_frame(df, pairs)})


def _bands(num_perm: int, threshold: float) -> int:
    """The band count minimising false positive + negative probability at `threshold` (datasketch's
    rule), restricted to divisors of num_perm as rensa requires."""
    from datasketch.lsh import _false_negative_probability, _false_positive_probability

    best, best_err = 1, float("inf")
    for b in range(1, num_perm + 1):
        if num_perm % b:
            continue
        r = num_perm // b
        err = _false_positive_probability(threshold, b, r) + _false_negative_probability(threshold, b, r)
        if err < best_err:
            best, best_err = b, err
    return best


def knn(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine kNN of every row against all rows (rows are L2-normalised, so inner product).

    Exact `IndexFlatIP` up to 20k rows; above that an IVF index (nlist ~ 4 sqrt(n), nprobe 8), which
    is what keeps 100k rows in seconds rather than a minute on 2 cores.
    """
    import faiss

    n, dim = vectors.shape
    k = min(k + 1, n)
    if n <= 20_000:
        index = faiss.IndexFlatIP(dim)
    else:
        nlist = int(4 * np.sqrt(n))
        quant = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quant, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        index.train(vectors[rng.choice(n, size=min(n, nlist * 40), replace=False)])
        index.nprobe = 8
    index.add(vectors)
    sims, nbrs = index.search(vectors, k)
    return sims, nbrs


def semantic_dedup(df: pl.DataFrame, cfg: SemanticDedupConfig, embedder, *, progress: bool = False) -> StageResult:
    """Drop rows whose embedding has cosine >= threshold with a better row that is kept."""
    with Timer() as t_all:
        col = "conversation" if cfg.text == "conversation" else "prompt"
        keys = df["id"].to_list() if col == "conversation" else [f"{i}:prompt" for i in df["id"].to_list()]
        with Timer() as t_emb:
            vecs = embedder.encode(keys, df[col].to_list(), progress=progress)
        with Timer() as t_knn:
            sims, nbrs = knn(vecs, cfg.k) if len(df) else (np.zeros((0, 1)), np.zeros((0, 1), dtype=int))
        order = best_first(df)
        kept_mask = np.zeros(len(df), dtype=bool)
        ids = df["id"].to_list()
        reason: list[str | None] = [None] * len(df)
        detail = [""] * len(df)
        pairs = []
        for i in order:
            dup_of, dup_sim = -1, 0.0
            for s, j in zip(sims[i], nbrs[i]):
                if j < 0 or j == i or s < cfg.threshold:
                    continue
                if kept_mask[j] and s > dup_sim:
                    dup_of, dup_sim = int(j), float(s)
            if dup_of >= 0:
                reason[i], detail[i] = "semantic_duplicate", f"cosine {dup_sim:.3f} with {ids[dup_of]}"
                pairs.append((int(i), dup_of, round(dup_sim, 4)))
            else:
                kept_mask[i] = True
    extra = {"model": embedder.name, "threshold": cfg.threshold, "k": cfg.k,
             "embed_seconds": round(t_emb.seconds, 3), "knn_seconds": round(t_knn.seconds, 3)}
    return split_result(df, "semantic_dedup", reason, detail, t_all.seconds, extra=extra,
                        artefacts={"semantic_pairs": _pairs_frame(df, pairs)})


# ---------------------------------------------------------------- stage contract (curation.stage)

class ExactDedupStage(Stage):
    name = "exact_dedup"
    kind = "global"

    def run(self, frame: pl.DataFrame) -> StageResult:
        return exact_dedup(frame, self.cfg)


class MinHashStage(Stage):
    """Near-dup MinHash. In one process `run` is the rensa LSH loop above; spread out it is
    map (signatures) -> shuffle by band key -> reduce (candidate pairs per bucket) -> `finish`
    (the same greedy best-first rule over those pairs, on the driver)."""

    name = "minhash_dedup"
    kind = "map_reduce"
    fix = "Raise [minhash] threshold."
    SIG = MAP_PREFIX + "sig"

    def run(self, frame: pl.DataFrame) -> StageResult:
        return minhash_dedup(frame, self.cfg)

    def map(self, batch: pl.DataFrame) -> pl.DataFrame:
        from rensa import RMinHash

        cfg = self.cfg
        texts = batch["conversation"].str.slice(0, cfg.max_chars).to_list()
        hashes = RMinHash.from_token_sets((shingles(t, cfg.ngram) for t in texts), cfg.num_perm, cfg.seed)
        return pl.DataFrame({"_row": batch["_row"], self.SIG: [h.digest() for h in hashes]},
                            schema={"_row": pl.Int64, self.SIG: pl.List(pl.UInt64)})

    def keys(self, mapped: pl.DataFrame) -> pl.DataFrame:
        """One (band, band values) key per row and band: rows sharing a key are LSH candidates."""
        b = _bands(self.cfg.num_perm, self.cfg.threshold)
        r = self.cfg.num_perm // b
        sig = np.asarray(mapped[self.SIG].to_list(), dtype=np.uint64).reshape(len(mapped), self.cfg.num_perm)
        rows = mapped["_row"].to_list()
        keys, out_rows = [], []
        for k in range(b):
            band = np.ascontiguousarray(sig[:, k * r:(k + 1) * r])
            keys += [f"{k}:{band[i].tobytes().hex()}" for i in range(len(rows))]
            out_rows += rows
        return pl.DataFrame({"key": keys, "_row": out_rows}, schema={"key": pl.String, "_row": pl.Int64})

    def reduce(self, group: pl.DataFrame) -> pl.DataFrame:
        """Candidate pairs (a < b) among the rows that share a band key, for every key in `group`."""
        buckets = (group.select("key", "_row").unique().group_by("key").agg(pl.col("_row").sort())
                   .filter(pl.col("_row").list.len() > 1))
        a: list[int] = []
        b: list[int] = []
        for rows in buckets["_row"].to_list():
            for i, x in enumerate(rows):
                a += [x] * (len(rows) - i - 1)
                b += rows[i + 1:]
        return pl.DataFrame({"a": a, "b": b}, schema={"a": pl.Int64, "b": pl.Int64})

    def finish(self, frame: pl.DataFrame, reduced: pl.DataFrame) -> StageResult:
        cfg = self.cfg
        with Timer() as t:
            order = best_first(frame)
            pos_of = {int(r): p for p, r in enumerate(frame["_row"].to_list())}
            sig = np.asarray(frame[self.SIG].to_list(), dtype=np.uint64).reshape(len(frame), cfg.num_perm)
            pairs_ab = reduced.unique().to_numpy() if len(reduced) else np.zeros((0, 2), dtype=np.int64)
            nbrs: dict[int, list[tuple[int, float]]] = {}
            for ra, rb in pairs_ab.tolist():
                i, j = pos_of[ra], pos_of[rb]
                s = float((sig[i] == sig[j]).sum()) / cfg.num_perm
                if s >= cfg.threshold:
                    nbrs.setdefault(i, []).append((j, s))
                    nbrs.setdefault(j, []).append((i, s))
            rank = np.empty(len(frame), dtype=np.int64)
            rank[order] = np.arange(len(frame))
            kept = np.zeros(len(frame), dtype=bool)
            ids = frame["id"].to_list()
            reason: list[str | None] = [None] * len(frame)
            detail = [""] * len(frame)
            pairs = []
            for i in order.tolist():
                best_j, best_s = -1, 0.0
                for j, s in sorted(nbrs.get(i, []), key=lambda js: rank[js[0]]):  # ties: the better row
                    if kept[j] and s > best_s:
                        best_j, best_s = j, s
                if best_j >= 0:
                    reason[i], detail[i] = "near_duplicate", f"MinHash Jaccard {best_s:.2f} with {ids[best_j]}"
                    pairs.append((i, best_j, round(best_s, 4)))
                else:
                    kept[i] = True
        plain = frame.drop(self.SIG)
        return split_result(plain, "minhash_dedup", reason, detail, t.seconds,
                            extra={"num_perm": cfg.num_perm, "threshold": cfg.threshold, "ngram": cfg.ngram},
                            artefacts={"minhash_pairs": _pairs_frame(plain, pairs)})


class _Precomputed:
    """Vectors a map step already computed, behind the embedder interface semantic_dedup expects."""

    def __init__(self, name: str, vecs: np.ndarray) -> None:
        self.name, self._vecs = name, vecs

    def encode(self, ids: list[str], texts: list[str], **_: object) -> np.ndarray:
        return self._vecs


class SemanticDedupStage(Stage):
    """Global (kNN over every row), with a row-local map: the embeddings."""

    name = "semantic_dedup"
    kind = "global"
    fix = "Raise [semantic_dedup] threshold."
    EMB = MAP_PREFIX + "emb"

    def needs(self) -> dict[str, Need]:
        return {"embedder": Need("embedder", self.cfg.model)}

    def setup(self, embedder=None, **_: object) -> None:
        self.embedder = embedder

    def map(self, batch: pl.DataFrame) -> pl.DataFrame:
        col = "conversation" if self.cfg.text == "conversation" else "prompt"
        ids = batch["id"].to_list()
        keys = ids if col == "conversation" else [f"{i}:prompt" for i in ids]
        vecs = self.embedder.encode(keys, batch[col].to_list())
        return pl.DataFrame({"_row": batch["_row"], self.EMB: vecs.astype(np.float32).tolist()},
                            schema={"_row": pl.Int64, self.EMB: pl.List(pl.Float32)})

    def run(self, frame: pl.DataFrame) -> StageResult:
        if self.EMB not in frame.columns:
            return semantic_dedup(frame, self.cfg, self.embedder)
        dim = len(frame[self.EMB][0]) if len(frame) else 1
        vecs = np.asarray(frame[self.EMB].to_list(), dtype=np.float32).reshape(len(frame), dim)
        from tomelab.embed import Embedder

        name = self.cfg.model if self.cfg.model in ("m2v", "minilm") else Embedder(self.cfg.model).name
        return semantic_dedup(frame.drop(self.EMB), self.cfg, _Precomputed(name, vecs))
