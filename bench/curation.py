"""Curation benchmark on >= 100k rows built from the real sources, with injected duplicates of known truth.

    .venv/bin/python bench/curation.py [--rows 100000] [--skip-pipeline] [--minilm-sample 1500]

Pool: every ShareGPT conversation split into its (user, assistant) turn pairs, Alpaca-5k and GSM8K
train (all real), topped up to `--rows` with injected duplicates of random pool rows, a third each:
- exact:      case and whitespace changed (equal after normalisation),
- light edit: 1-3 words of the answer deleted or swapped,
- rewrite:    rule-based paraphrase (synonym table, a new opening phrase, one sentence dropped).

Measured in one run, on the same rows and the same 2 cores:
1. the whole `tomelab curate` pipeline (exact + MinHash + filters + decontamination + semantic dedup
   + budget), cold (no embedding cache) and warm (embeddings cached, stage checkpoints cleared);
2. semantic dedup alone, ours (model2vec distilled MiniLM + faiss) vs SemHash 0.5 with default
   settings (threshold 0.9) given the same static model (its default model needs the hub), plus
   datasketch MinHash/LSH defaults and our rensa MinHash stage: seconds, recall per injected kind,
   and precision against the injected truth (natural duplicates in the real data count as false
   positives, so precision is a lower bound);
3. agreement of the m2v fast path's dedup decisions with all-MiniLM-L6-v2 on a subsample.
Prints one markdown table per part and the ratios; writes the numbers to artifacts/bench/curation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SYNONYMS = {"important": "crucial", "use": "utilize", "help": "assist", "big": "large", "small": "little",
            "quickly": "rapidly", "show": "demonstrate", "make": "create", "get": "obtain", "good": "great",
            "example": "instance", "many": "numerous", "also": "additionally", "because": "since",
            "need": "require", "start": "begin", "buy": "purchase", "answer": "response", "idea": "notion",
            "simple": "straightforward", "different": "distinct", "often": "frequently", "find": "locate",
            "try": "attempt", "give": "provide", "keep": "maintain", "change": "modify", "end": "finish"}
OPENERS = ["Sure! ", "Certainly. ", "Of course. ", "Here you go: ", "Absolutely, "]
_SENT = re.compile(r"(?<=[.!?])\s+")


def _pairs(messages: list[dict]) -> list[list[dict]]:
    body = [m for m in messages if m["role"] != "system"]
    return [[body[i], body[i + 1]] for i in range(0, len(body) - 1, 2)
            if body[i]["role"] == "user" and body[i + 1]["role"] == "assistant"]


def inject(kind: str, msgs: list[dict], rng: random.Random) -> list[dict]:
    q, a = msgs[0]["content"], msgs[1]["content"]
    if kind == "exact":
        return [{"role": "user", "content": "  " + q.upper() + " "}, {"role": "assistant", "content": a.replace(" ", "  ")}]
    if kind == "light":
        words = a.split(" ")
        for _ in range(rng.randint(1, 3)):
            if len(words) > 3:
                i = rng.randrange(len(words) - 1)
                if rng.random() < 0.5:
                    del words[i]
                else:
                    words[i], words[i + 1] = words[i + 1], words[i]
        return [{"role": "user", "content": q}, {"role": "assistant", "content": " ".join(words)}]
    sents = _SENT.split(a)
    if len(sents) > 2:
        del sents[rng.randrange(1, len(sents))]
    a2 = " ".join(sents)
    a2 = re.sub(r"\b(" + "|".join(SYNONYMS) + r")\b", lambda m: SYNONYMS[m.group(1)], a2)
    q2 = re.sub(r"\b(" + "|".join(SYNONYMS) + r")\b", lambda m: SYNONYMS[m.group(1)], q)
    return [{"role": "user", "content": q2}, {"role": "assistant", "content": rng.choice(OPENERS) + a2}]


def build_pool(n_rows: int, seed: int, out: Path, max_base: int = 0) -> tuple[Path, pl.DataFrame]:
    """Write the pool as a messages-column parquet; return it and the truth (row -> original row, kind)."""
    from curation.pipeline import load_cached_source
    from curation.sources import SourceConfig

    rng = random.Random(seed)
    convs: list[list[dict]] = []
    origin: list[str] = []
    for name, kind, split in (("sharegpt", "sharegpt", "train"), ("alpaca", "alpaca", "train"),
                              ("gsm8k", "gsm8k", "train")):
        t = load_cached_source(SourceConfig(name=name, kind=kind, split=split), progress=False).table
        for msgs in t.column("messages").to_pylist():
            for p in _pairs(msgs):
                if p[0]["content"].strip() and p[1]["content"].strip():
                    convs.append(p)
                    origin.append(name)
    if max_base and len(convs) > max_base:  # smoke runs only
        keep = sorted(rng.sample(range(len(convs)), max_base))
        convs, origin = [convs[i] for i in keep], [origin[i] for i in keep]
    base = len(convs)
    n_inj = max(n_rows - base, n_rows // 10)
    kinds = ["exact", "light", "rewrite"]
    originals = [rng.randrange(base) for _ in range(n_inj)]  # with replacement: the real pool is < 100k
    truth_of = [-1] * base
    kind_of = ["original"] * base
    for j, o in enumerate(originals):
        k = kinds[j % 3]
        convs.append(inject(k, convs[o], rng))
        origin.append(origin[o])
        truth_of.append(o)
        kind_of.append(k)
    df = pl.DataFrame({"messages": convs, "bench_origin": origin})
    out.parent.mkdir(parents=True, exist_ok=True)
    df.write_parquet(out)
    truth = pl.DataFrame({"row": np.arange(len(convs)) + 1, "dup_of": np.array(truth_of) + 1, "kind": kind_of})
    print(f"pool: {len(convs):,} rows = {base:,} real turn pairs (ShareGPT/Alpaca/GSM8K) + {n_inj:,} injected "
          f"duplicates ({n_inj // 3:,} per kind)", flush=True)
    return out, truth


def score(dropped_rows: set[int], truth: pl.DataFrame) -> dict[str, float]:
    """Recall per injected kind and precision against the injected truth (row numbers are 1-based)."""
    inj = truth.filter(pl.col("kind") != "original")
    out = {}
    for k in ("exact", "light", "rewrite"):
        rows = set(inj.filter(pl.col("kind") == k)["row"].to_list())
        out[f"recall_{k}"] = len(rows & dropped_rows) / max(len(rows), 1)
    inj_rows = set(inj["row"].to_list())
    # a dropped original whose injected copy was kept is a correct decision too (the pair is deduplicated)
    kept_copy_of = {o for r, o in zip(inj["row"].to_list(), inj["dup_of"].to_list()) if r not in dropped_rows}
    good = len(dropped_rows & inj_rows) + len(dropped_rows & kept_copy_of)
    out["recall_all"] = len(inj_rows & dropped_rows) / max(len(inj_rows), 1)
    out["precision_lb"] = good / max(len(dropped_rows), 1)
    out["dropped"] = len(dropped_rows)
    return out


def recipe_text(name: str, data: Path, budget: int) -> str:
    return f'''name = "{name}"
budget_rows = {budget}
seed = 0
[[sources]]
name = "pool"
kind = "generic"
path = "{data}"
[sources.columns]
messages = "messages"
meta = ["bench_origin"]
[heldout]
test_rows = 300
val_rows = 100
[exact_dedup]
enabled = true
[minhash]
enabled = true
[filters]
enabled = ["length", "language", "repetition", "refusal", "broken_turns", "truncated"]
[decontam]
model = "m2v"
[[decontam.test_sets]]
name = "ifeval"
path = "shared:ifeval/input_data.jsonl"
fields = ["prompt"]
[[decontam.test_sets]]
name = "gsm8k_test"
path = "shared:gsm8k/test.jsonl"
fields = ["question", "answer"]
[semantic_dedup]
enabled = true
model = "m2v"
threshold = 0.95
'''


def run_pipeline(home: Path, data: Path, budget: int) -> dict:
    from curation.pipeline import curate
    from tomelab.io import read_json

    recipe = home / "bench-pool.toml"
    recipe.write_text(recipe_text("bench-pool", data, budget))
    res = {}
    for label, clear in (("cold", ("stages", "embeddings", "sources")), ("warm", ("stages",))):
        for sub in clear:
            shutil.rmtree(home / "cache" / sub, ignore_errors=True)
        shutil.rmtree(home / "heldout", ignore_errors=True)
        t0, c0 = time.perf_counter(), time.process_time()
        out = curate(recipe, force=True, progress=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        st = read_json(out / "stats.json")
        res[label] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "rows": st["rows"],
                      "stages": {s["stage"]: {"s": s["seconds"], "in": s["rows_in"], "kept": s["kept"]}
                                 for s in st["stages"]}}
        print(f"pipeline {label}: {wall:.1f} s wall, {cpu:.1f} s CPU (this process)", flush=True)
    return res


def semantic_compare(home: Path, data: Path, truth: pl.DataFrame) -> dict:
    from model2vec import StaticModel
    from semhash import SemHash

    from curation import dedup
    from curation.frame import prepare
    from curation.recipe import MinHashConfig, SemanticDedupConfig
    from curation.sources import ColumnMapping, SourceConfig, load_source
    from tomelab.embed import Embedder

    table = load_source(SourceConfig(name="pool", kind="generic", path=str(data),
                                     columns=ColumnMapping(messages="messages")), progress=False).table
    df = prepare(table).with_columns(pl.lit(0.0).alias("quality_score"))  # no quality preference: first wins
    rows = [json.loads(m)["row"] for m in df["meta"].to_list()]
    texts = df["conversation"].to_list()
    res: dict[str, dict] = {}

    def dropped_rows(result) -> set[int]:
        kept = set(result.kept["_row"].to_list())
        return {rows[p] for p in range(len(df)) if p not in kept}

    shutil.rmtree(home / "cache" / "embeddings", ignore_errors=True)
    emb = Embedder("m2v", cache_dir=home / "cache")
    for thr in (0.9, 0.95):
        t0 = time.perf_counter()
        r = dedup.semantic_dedup(df, SemanticDedupConfig(enabled=True, threshold=thr), emb)
        res[f"ours m2v+faiss t={thr}" + (" (cold)" if thr == 0.9 else " (warm cache)")] = {
            "seconds": round(time.perf_counter() - t0, 1), **score(dropped_rows(r), truth)}
    m2v = StaticModel.from_pretrained(str(emb._path))
    records = [{"i": str(k), "text": t[:2000]} for k, t in enumerate(texts)]  # same 2,000-char cut as ours
    t0 = time.perf_counter()
    sh = SemHash.from_records(records=records, columns=["text"], model=m2v)
    result = sh.self_deduplicate()
    secs = time.perf_counter() - t0
    res["SemHash 0.5 defaults (t=0.9, usearch), same m2v model"] = {
        "seconds": round(secs, 1), **score({rows[int(d.record["i"])] for d in result.filtered}, truth)}
    t0 = time.perf_counter()
    r = dedup.minhash_dedup(df, MinHashConfig(enabled=True))
    res["ours rensa MinHash (5-gram, J=0.8)"] = {"seconds": round(time.perf_counter() - t0, 1),
                                               **score(dropped_rows(r), truth)}
    res["datasketch MinHash defaults (words, LSH t=0.9)"] = datasketch_defaults(texts, rows, truth)
    for k, v in res.items():
        print(f"{k}: {v}", flush=True)
    return res


def datasketch_defaults(texts: list[str], rows: list[int], truth: pl.DataFrame) -> dict:
    """datasketch as its README shows it: MinHash(num_perm=128) over the set of words, MinHashLSH()
    defaults (threshold 0.9); a row is a duplicate if the index already holds a match."""
    from datasketch import MinHash, MinHashLSH

    t0 = time.perf_counter()
    sets = [[w.encode() for w in set(t[:2000].lower().split())] for t in texts]
    mhs = MinHash.bulk(sets, num_perm=128)
    lsh = MinHashLSH(threshold=0.9, num_perm=128)
    dropped = set()
    for k, mh in enumerate(mhs):
        if lsh.query(mh):
            dropped.add(rows[k])
        else:
            lsh.insert(str(k), mh)
    return {"seconds": round(time.perf_counter() - t0, 1), **score(dropped, truth)}


def minilm_agreement(home: Path, data: Path, truth: pl.DataFrame, n: int, seed: int) -> dict:
    """Dedup decisions of m2v vs MiniLM on a subsample that holds injected pairs and unrelated rows."""
    from curation import dedup
    from curation.frame import prepare
    from curation.recipe import SemanticDedupConfig
    from curation.sources import ColumnMapping, SourceConfig, load_source
    from tomelab.embed import Embedder

    rng = random.Random(seed)
    inj = truth.filter(pl.col("kind") != "original")
    pick = rng.sample(range(len(inj)), n // 3)
    chosen = set(inj["row"].gather(pick).to_list()) | set(inj["dup_of"].gather(pick).to_list())
    originals = truth.filter(pl.col("kind") == "original")["row"].to_list()
    chosen |= set(rng.sample(originals, n - len(chosen)))
    table = load_source(SourceConfig(name="pool", kind="generic", path=str(data),
                                     columns=ColumnMapping(messages="messages")), progress=False).table
    df = prepare(table)
    rows = [json.loads(m)["row"] for m in df["meta"].to_list()]
    df = df.with_columns(pl.Series("bench_row", rows), pl.lit(0.0).alias("quality_score"))
    df = df.filter(pl.col("bench_row").is_in(sorted(chosen))).with_columns(pl.int_range(pl.len()).alias("_row"))
    out = {"rows": len(df)}
    decisions = {}
    shutil.rmtree(home / "cache-agreement", ignore_errors=True)  # time cold encodes for both models
    (home / "cache-agreement").mkdir()
    (home / "cache-agreement" / "models").symlink_to(home / "cache" / "models", target_is_directory=True)
    for model in ("m2v", "minilm"):
        emb = Embedder(model, cache_dir=home / "cache-agreement")
        t0 = time.perf_counter()
        vecs = emb.encode(df["id"].to_list(), df["conversation"].to_list())
        out[f"{model}_embed_s"] = round(time.perf_counter() - t0, 1)
        out[f"{model}_texts_per_s"] = round(len(df) / max(time.perf_counter() - t0, 1e-9), 1)
        for thr in (0.9, 0.95):
            r = dedup.semantic_dedup(df, SemanticDedupConfig(enabled=True, threshold=thr), _Fixed(emb.name, vecs, df))
            decisions[(model, thr)] = set(r.dropped["id"].to_list())
    for thr in (0.9, 0.95):
        a, b = decisions[("m2v", thr)], decisions[("minilm", thr)]
        out[f"t={thr}"] = {"m2v_dropped": len(a), "minilm_dropped": len(b),
                           "decision_agreement": round(1 - len(a ^ b) / len(df), 4),
                           "dropped_jaccard": round(len(a & b) / max(len(a | b), 1), 4)}
    print(f"m2v vs MiniLM: {out}", flush=True)
    return out


def ifd_speed(n_rows: int) -> dict:
    """Seconds per row of IFD scoring (two forward passes) with the recipe defaults, fp32 vs bf16 autocast."""
    import tempfile

    import torch

    from curation.pipeline import load_cached_source
    from curation.quality import QualityScorer
    from curation.recipe import QualityConfig
    from curation.sources import SourceConfig

    msgs = load_cached_source(SourceConfig(name="sharegpt", kind="sharegpt"), progress=False).table \
        .column("messages").to_pylist()[:n_rows]
    out = {"rows": n_rows}
    cfg = QualityConfig(enabled=True)
    out["max_prompt_tokens"], out["max_answer_tokens"], out["batch_size"] = (cfg.max_prompt_tokens,
                                                                             cfg.max_answer_tokens, cfg.batch_size)
    for label, ctx in (("fp32", None), ("bf16_autocast", torch.bfloat16)):
        sc = QualityScorer(cfg, cache_dir=Path(tempfile.mkdtemp()))
        sc._load()
        ids = [f"r{i}" for i in range(len(msgs))]
        t0 = time.perf_counter()
        if ctx is None:
            sc.score(ids, msgs, progress=False)
        else:
            with torch.autocast("cpu", dtype=ctx):
                sc.score(ids, msgs, progress=False)
        out[f"{label}_s_per_row"] = round((time.perf_counter() - t0) / len(msgs), 2)
    out["bf16_over_fp32"] = round(out["bf16_autocast_s_per_row"] / out["fp32_s_per_row"], 2)
    print(f"IFD speed: {out}", flush=True)
    return out


class _Fixed:
    """Serve vectors already computed (so the MiniLM timing above counts encoding once)."""

    def __init__(self, name: str, vecs: np.ndarray, df: pl.DataFrame) -> None:
        self.name, self._v = name, vecs

    def encode(self, ids, texts, *, progress=False):
        return self._v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--budget", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minilm-sample", type=int, default=1500)
    ap.add_argument("--skip-pipeline", action="store_true")
    ap.add_argument("--ifd-rows", type=int, default=0, help="also time IFD scoring on N ShareGPT rows")
    ap.add_argument("--only-ifd", action="store_true", help="run only the IFD timing")
    ap.add_argument("--max-base", type=int, default=0, help="subsample the real rows (smoke runs only)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    home = (REPO / "artifacts" / "bench" / "home").resolve()
    real_models = (REPO / "artifacts" / "cache" / "models").resolve()
    (home / "cache").mkdir(parents=True, exist_ok=True)
    if not (home / "cache" / "models").exists() and real_models.exists():
        (home / "cache" / "models").symlink_to(real_models, target_is_directory=True)  # reuse the distilled m2v
    if not (home / "models").exists() and (REPO / "artifacts" / "models").exists():
        (home / "models").symlink_to((REPO / "artifacts" / "models").resolve(), target_is_directory=True)
    os.environ["TOMELAB_HOME"] = str(home)
    t_all = time.perf_counter()
    if args.only_ifd:
        ifd_speed(args.ifd_rows or 16)
        return
    data, truth = build_pool(args.rows, args.seed, REPO / "artifacts" / "bench" / f"pool-{args.rows}-{args.max_base}.parquet",
                             args.max_base)
    report: dict = {"rows": len(truth), "cores": os.cpu_count(), "load_avg_start": os.getloadavg()}
    if not args.skip_pipeline:
        report["pipeline"] = run_pipeline(home, data, args.budget)
    report["semantic"] = semantic_compare(home, data, truth)
    if args.minilm_sample:
        report["minilm_agreement"] = minilm_agreement(home, data, truth, args.minilm_sample, args.seed)
    if args.ifd_rows:
        report["ifd_speed"] = ifd_speed(args.ifd_rows)
    report["load_avg_end"] = os.getloadavg()
    report["bench_seconds"] = round(time.perf_counter() - t_all, 1)

    print("\n## Semantic dedup on", f"{len(truth):,} rows\n")
    print("| method | seconds | dropped | recall exact | recall light edit | recall rewrite | precision (lower bound) |")
    print("|---|---|---|---|---|---|---|")
    for k, v in report["semantic"].items():
        print(f"| {k} | {v['seconds']} | {v['dropped']:,} | {v['recall_exact']:.3f} | {v['recall_light']:.3f} | "
              f"{v['recall_rewrite']:.3f} | {v['precision_lb']:.3f} |")
    sem = report["semantic"]
    ours = sem["ours m2v+faiss t=0.9 (cold)"]
    peer = sem["SemHash 0.5 defaults (t=0.9, usearch), same m2v model"]
    print(f"\nratio SemHash seconds / ours (cold, t=0.9): {peer['seconds'] / max(ours['seconds'], 1e-9):.2f}x; "
          f"recall ours {ours['recall_all']:.3f} vs SemHash {peer['recall_all']:.3f}")
    if "pipeline" in report:
        p = report["pipeline"]
        print(f"\n## Whole pipeline on {len(truth):,} rows: cold {p['cold']['wall_s']} s, warm {p['warm']['wall_s']} s "
              f"(goal 120 s)\n")
        print("| stage | rows in | kept | cold s | warm s |\n|---|---|---|---|---|")
        for st, v in p["cold"]["stages"].items():
            print(f"| {st} | {v['in']:,} | {v['kept']:,} | {v['s']} | {p['warm']['stages'][st]['s']} |")
    if "minilm_agreement" in report:
        print(f"\n## m2v vs MiniLM decisions: {json.dumps(report['minilm_agreement'])}")
    print(f"\nload average at start {report['load_avg_start']}, at end {report['load_avg_end']}")
    out = REPO / "artifacts" / "bench" / "curation.json"
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"numbers written to {out}")


if __name__ == "__main__":
    main()
