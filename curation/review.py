"""Human review of a variant in a real Argilla 2.x server: push, pull, apply.

`push` sends a chosen slice of a variant's rows to an Argilla dataset (record id = row id, so a
second push updates instead of duplicating), with keep/drop, a 1-5 quality rating and an optional
corrected response as questions, curation scores as metadata and suggestions, and the embedding as
a vector for similarity search in the UI. `pull` stores every submitted response in
`<variant>/review/responses.parquet`, merging with earlier pulls so no label is ever lost.
`apply` (offline) turns those labels into a new variant `<name>-reviewed`, optionally extending them
to unlabelled rows through nearest labelled neighbours, and writes its data card.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

from tomelab import paths
from tomelab.config import config_hash, load_config, to_dict
from tomelab.errors import DataError, TomelabError
from tomelab.io import read_json, write_json, write_parquet, write_text
from tomelab.schema import conversation_text, row_id
from tomelab.stats import StageStats, Timer, count_reasons

log = logging.getLogger(__name__)

Strategy = Literal["random", "low-score", "near-dup-pairs", "disagreement"]
STRATEGIES: tuple[str, ...] = ("random", "low-score", "near-dup-pairs", "disagreement")
DECISIONS = ("keep", "drop")
REVIEW_STAGE = "human_review"
# Numeric columns that are labels or counters, not scores.
NOT_SCORES = {"minhash_cluster", "cluster", "row", "n_turns"}
# Direction of known scores (+1: higher is better). Unknown scores count as higher-is-better.
SCORE_DIRECTION = {"quality_score": 1.0, "score": 1.0, "reward": 1.0, "ifd": 1.0, "nll": -1.0, "perplexity": -1.0}
RESPONSE_COLUMNS = {
    "id": pl.String,
    "record_server_id": pl.String,
    "annotator_id": pl.String,
    "annotator": pl.String,
    "status": pl.String,
    "decision": pl.String,
    "quality": pl.Int64,
    "corrected_response": pl.String,
    "inserted_at": pl.String,
    "updated_at": pl.String,
}


@dataclass
class ReviewConfig:
    """Knobs of push/pull/apply; the CLI flags override a TOML `[review]` table."""

    n: int = 200
    strategy: Strategy = "random"
    seed: int = 0
    embed_model: Literal["minilm", "m2v"] = "m2v"  # m2v: fast and shared with curation's dedup cache
    dataset_prefix: str = "tomelab-"
    workspace: str | None = None  # None: the user's first workspace
    suggest_drop_below: float = 0.25  # score percentile under which the suggestion says "drop"
    extend_k: int = 0  # >0: extend human labels to unlabelled rows by k nearest labelled neighbours
    extend_min_similarity: float = 0.8  # cosine similarity a neighbour needs to vote
    holdout_share: float = 0.2  # share of labelled rows held out to measure propagation agreement
    timeout_s: float = 5.0  # connect/read timeout for the server check, so a dead server fails fast

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError("n must be at least 1")
        if not 0.0 < self.holdout_share < 1.0:
            raise ValueError("holdout_share must be between 0 and 1 (exclusive)")
        if self.extend_k < 0:
            raise ValueError("extend_k must be >= 0")
        if not -1.0 <= self.extend_min_similarity <= 1.0:
            raise ValueError("extend_min_similarity is a cosine similarity in [-1, 1]")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"timeout_s must be a finite number of seconds > 0, got {self.timeout_s}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not 0.0 <= self.suggest_drop_below <= 1.0:
            raise ValueError("suggest_drop_below is a score percentile in [0, 1]")


def load_review_config(path: str | Path | None) -> ReviewConfig:
    """A ReviewConfig from the `[review]` table of a TOML file, or the defaults."""
    return ReviewConfig() if path is None else load_config(path, ReviewConfig, section="review")


# --------------------------------------------------------------------------------------------
# Server connection


@dataclass(frozen=True)
class ArgillaTarget:
    """Where the Argilla server is and how we log in, and where that came from (for messages)."""

    url: str
    api_key: str
    origin: str


def local_server_dir() -> Path:
    """The data folder of the server that scripts/argilla.sh runs (git-ignored)."""
    env = os.environ.get("TOMELAB_ARGILLA_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / ".argilla"


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (the credentials file scripts/argilla.sh writes)."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def resolve_target(url: str | None = None, api_key: str | None = None) -> ArgillaTarget:
    """Arguments first, then ARGILLA_API_URL / ARGILLA_API_KEY, then the local server's credentials."""
    url = url or os.environ.get("ARGILLA_API_URL")
    api_key = api_key or os.environ.get("ARGILLA_API_KEY")
    origin = "arguments/environment"
    if not api_key:
        creds_path = local_server_dir() / "credentials.env"
        if not creds_path.is_file():
            raise TomelabError(
                "no Argilla credentials: set ARGILLA_API_URL and ARGILLA_API_KEY for a real deployment, "
                f"or start the local server with `scripts/argilla.sh start` (it writes {creds_path})."
            )
        creds = read_env_file(creds_path)
        api_key = creds.get("ARGILLA_API_KEY", "")
        origin = str(creds_path)
    if not url:
        url = f"http://127.0.0.1:{os.environ.get('TOMELAB_ARGILLA_PORT', '6900')}"
    return ArgillaTarget(url=url.rstrip("/"), api_key=api_key, origin=origin)


def check_server(target: ArgillaTarget, timeout_s: float = 5.0) -> dict[str, Any]:
    """GET /api/v1/me with a short timeout: a dead server fails in seconds with a clear message."""
    import httpx

    try:
        r = httpx.get(f"{target.url}/api/v1/me", headers={"X-Argilla-Api-Key": target.api_key}, timeout=timeout_s)
    except httpx.HTTPError as e:
        raise TomelabError(
            f"cannot reach Argilla at {target.url} ({type(e).__name__}: {e}). Start the local server with "
            "`scripts/argilla.sh start`, or set ARGILLA_API_URL/ARGILLA_API_KEY to a running deployment. "
            "No local file was changed."
        ) from None
    if r.status_code in (401, 403):
        raise TomelabError(
            f"Argilla at {target.url} rejected the API key from {target.origin} (HTTP {r.status_code}). "
            "Set ARGILLA_API_KEY to a key of an owner or admin (My settings -> API key in the UI)."
        )
    if r.status_code != 200:
        raise TomelabError(f"Argilla at {target.url} answered HTTP {r.status_code} on /api/v1/me: {r.text[:200]}")
    me = _json(r, target)
    if not isinstance(me, dict):
        raise TomelabError(f"{target.url}/api/v1/me answered {type(me).__name__}, not a user: is "
                           f"ARGILLA_API_URL pointing at an Argilla server?")
    return me


def _json(r: Any, target: ArgillaTarget) -> Any:
    """The JSON body of an Argilla answer, or one clear error when the server there is not Argilla."""
    try:
        return r.json()
    except ValueError:  # json.JSONDecodeError, UnicodeDecodeError
        snippet = " ".join(r.text[:80].split())
        raise TomelabError(
            f"{target.url}{r.request.url.path} answered HTTP {r.status_code} that is not JSON ({snippet!r}): "
            f"is ARGILLA_API_URL ({target.url}) pointing at an Argilla server? No local file was changed."
        ) from None


def connect(target: ArgillaTarget | None = None, timeout_s: float = 5.0):
    """An `argilla.Argilla` client, after a fast liveness check."""
    import argilla as rg

    target = target or resolve_target()
    check_server(target, timeout_s)
    logging.getLogger("argilla.sdk").setLevel(logging.WARNING)  # it logs every field at INFO
    return rg.Argilla(api_url=target.url, api_key=target.api_key, timeout=max(int(timeout_s), 30), retries=1)


def dataset_name(cfg: ReviewConfig, variant: str) -> str:
    return f"{cfg.dataset_prefix}{variant}"


def find_dataset(client: Any, cfg: ReviewConfig, variant: str):
    """The Argilla dataset for a variant, or None."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return client.datasets(name=dataset_name(cfg, variant), workspace=_workspace(client, cfg))


def _workspace(client: Any, cfg: ReviewConfig) -> str:
    if cfg.workspace:
        return cfg.workspace
    ws = client.workspaces.list()
    if not ws:
        raise TomelabError("the Argilla user has no workspace. Create one in the UI or pass --workspace.")
    return ws[0].name


# --------------------------------------------------------------------------------------------
# Variant data


def variant_dir(name: str) -> Path:
    return paths.variants_dir() / name


def review_dir(name: str) -> Path:
    """Review state of a variant: pushed ids and pulled responses."""
    return variant_dir(name) / "review"


def pushed_variants() -> list[str]:
    """Variants that `push` has sent to Argilla (they have review/pushed.parquet)."""
    d = paths.variants_dir()
    return sorted(p.parent.parent.name for p in d.glob("*/review/pushed.parquet")) if d.is_dir() else []


def load_variant(name: str) -> tuple[pl.DataFrame, dict[str, Any]]:
    """train.parquet and stats.json of a variant, with clear errors when absent or malformed."""
    d = variant_dir(name)
    train = d / "train.parquet"
    if not train.is_file():
        raise DataError(f"variant {name!r} not found: {train} does not exist. Build it with `tomelab curate`.")
    df = pl.read_parquet(train)
    for col in ("id", "source", "messages", "meta"):
        if col not in df.columns:
            raise DataError(f"{train}: missing column `{col}`; a variant must have the canonical schema (id, source, messages, meta).")
    dup = df.filter(pl.col("id").is_duplicated())
    if dup.height:
        raise DataError(f"{train}: row id {dup['id'][0]!r} appears more than once; ids must be unique. Rebuild the variant.")
    stats_path = d / "stats.json"
    stats = read_json(stats_path) if stats_path.is_file() else {"variant": name, "stages": []}
    return df, stats


def numeric_metadata_columns(df: pl.DataFrame) -> list[str]:
    """Numeric columns worth filtering on in the UI: scores and lengths (not ids or cluster labels)."""
    return [
        c
        for c, t in df.schema.items()
        if t.is_numeric() and c not in NOT_SCORES and not c.endswith(("_cluster", "_id")) and not c.startswith("human_")
    ]


def score_columns(df: pl.DataFrame) -> list[str]:
    """Numeric curation scores: the metadata columns minus token counts, which measure length, not quality."""
    return [c for c in numeric_metadata_columns(df) if not c.endswith("_tokens")]


def primary_score(df: pl.DataFrame) -> pl.Series | None:
    """The score that ranks rows for `low-score` and for suggestions: quality_score, else score,
    else meta.score, else the first numeric score (oriented so that higher is better)."""
    cols = score_columns(df)
    for c in ("quality_score", "score"):
        if c in cols:
            return df[c].cast(pl.Float64)
    meta_scores = [_meta_score(m) for m in df["meta"].to_list()]
    if any(s is not None for s in meta_scores):
        return pl.Series("meta_score", meta_scores, dtype=pl.Float64)
    if cols:
        return df[cols[0]].cast(pl.Float64) * SCORE_DIRECTION.get(cols[0], 1.0)
    return None


def _meta_score(meta: str | None) -> float | None:
    try:
        v = json.loads(meta or "{}").get("score")
        return float(v) if v is not None else None
    except (ValueError, TypeError, AttributeError):
        return None


def _percentile(values: np.ndarray) -> np.ndarray:
    """Rank percentile in [0, 1]; NaN stays NaN."""
    out = np.full(len(values), np.nan)
    ok = ~np.isnan(values)
    if ok.sum() == 0:
        return out
    ranks = values[ok].argsort(kind="stable").argsort(kind="stable")
    out[ok] = ranks / max(ok.sum() - 1, 1)
    return out


def last_assistant(messages: list[dict[str, str]]) -> str:
    return messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" else ""


def render_prompt(messages: list[dict[str, str]]) -> str:
    """Every turn before the final response, as markdown with the speaker in bold."""
    turns = messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages
    return "\n\n".join(f"**{m['role']}:**\n\n{m['content']}" for m in turns)


# --------------------------------------------------------------------------------------------
# Embeddings


def variant_embeddings(df: pl.DataFrame, embedder: Any) -> np.ndarray:
    """L2-normalised embeddings of rows' whole conversations, through `curation.embed.Embedder`.

    The key is the plain row id with the conversation text, the same view curation's semantic
    dedup embeds, so vectors computed there are reused from the shared cache."""
    ids = df["id"].to_list()
    texts = [conversation_text(m) for m in df["messages"].to_list()]
    return embedder.encode(ids, texts, progress=len(ids) > 2000)


def make_embedder(model: str):
    """The project's embedder (cached by row id under artifacts/cache/embeddings/)."""
    from curation.embed import Embedder

    return Embedder(model=model)


# --------------------------------------------------------------------------------------------
# Which rows to review


def select_rows(df: pl.DataFrame, cfg: ReviewConfig, embeddings: np.ndarray | None = None) -> pl.DataFrame:
    """The rows to push, with `flagged_by` (the strategy) and `flag_detail` (why this row)."""
    n = min(cfg.n, df.height)
    if cfg.strategy == "random":
        rng = np.random.default_rng(cfg.seed)
        idx = np.sort(rng.choice(df.height, size=n, replace=False))
        detail = ["random sample"] * n
    elif cfg.strategy == "low-score":
        score = primary_score(df)
        if score is None:
            raise DataError("strategy low-score needs a score column (quality_score, score or meta.score); this variant has none.")
        vals = score.to_numpy().astype(float)
        order = np.argsort(np.where(np.isnan(vals), np.inf, vals), kind="stable")
        idx = order[:n]
        detail = [f"{score.name}={vals[i]:.3g}" for i in idx]
    elif cfg.strategy == "near-dup-pairs":
        if embeddings is None:
            raise ValueError("near-dup-pairs needs embeddings of every row")
        idx, detail = _near_dup_pairs(df, embeddings, n)
    elif cfg.strategy == "disagreement":
        idx, detail = _disagreement(df, n)
    else:
        raise TomelabError(f"unknown strategy {cfg.strategy!r}; choose one of {', '.join(STRATEGIES)}.")
    return df[list(map(int, idx))].with_columns(
        pl.lit(cfg.strategy).alias("flagged_by"), pl.Series("flag_detail", detail, dtype=pl.String)
    )


def _near_dup_pairs(df: pl.DataFrame, emb: np.ndarray, n: int) -> tuple[list[int], list[str]]:
    """Both rows of the most similar pairs first, so a reviewer sees the pair side by side."""
    import faiss

    if df.height < 2:
        return list(range(df.height)), ["no pair"] * df.height
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(np.ascontiguousarray(emb, dtype=np.float32))
    sims, nbrs = index.search(np.ascontiguousarray(emb, dtype=np.float32), 2)
    ids = df["id"].to_list()
    pairs = []
    for i in range(df.height):
        j = int(nbrs[i, 1]) if nbrs[i, 0] == i else int(nbrs[i, 0])
        s = float(sims[i, 1]) if nbrs[i, 0] == i else float(sims[i, 0])
        pairs.append((s, min(i, j), max(i, j)))
    chosen: list[int] = []
    detail: dict[int, str] = {}
    for s, i, j in sorted(set(pairs), key=lambda p: (-p[0], p[1], p[2])):
        for a, b in ((i, j), (j, i)):
            if a not in detail and len(chosen) < n:
                chosen.append(a)
                detail[a] = f"cos={s:.3f} with {ids[b]}"
        if len(chosen) >= n:
            break
    return chosen, [detail[i] for i in chosen]


def _disagreement(df: pl.DataFrame, n: int) -> tuple[list[int], list[str]]:
    """Rows whose curation scores disagree most (largest spread of oriented rank percentiles)."""
    cols = score_columns(df)
    if len(cols) < 2:
        raise DataError(f"strategy disagreement needs at least two score columns; this variant has {cols or 'none'}.")
    pct = np.stack(
        [_percentile(df[c].cast(pl.Float64).fill_null(float("nan")).to_numpy() * SCORE_DIRECTION.get(c, 1.0)) for c in cols],
        axis=1,
    )
    spread = np.nanmax(pct, axis=1) - np.nanmin(pct, axis=1)
    spread = np.where(np.isnan(spread), -1.0, spread)
    order = np.argsort(-spread, kind="stable")[:n]
    detail = []
    for i in order:
        hi, lo = cols[int(np.nanargmax(pct[i]))], cols[int(np.nanargmin(pct[i]))]
        detail.append(f"spread={spread[i]:.2f} ({hi} high, {lo} low)")
    return list(order), detail


# --------------------------------------------------------------------------------------------
# push


def build_settings(scores: list[str], dim: int):
    """The Argilla dataset settings: conversation fields, the three questions, scores as metadata."""
    import argilla as rg

    return rg.Settings(
        guidelines=(
            "Judge whether this conversation should stay in the fine-tuning set. "
            "decision: keep or drop. quality: 1 (useless) to 5 (excellent). "
            "corrected_response: optional; a better final answer replaces the assistant's response."
        ),
        fields=[
            rg.TextField(name="prompt", title="Conversation so far", use_markdown=True),
            rg.TextField(name="response", title="Assistant response", use_markdown=True),
            # the reviewer sees why this row was picked (the scores or the near-duplicate it matches)
            rg.TextField(name="why_flagged", title="Why tomelab picked this row", required=False),
        ],
        questions=[
            rg.LabelQuestion(name="decision", title="Keep or drop?", labels=list(DECISIONS)),
            rg.RatingQuestion(name="quality", title="Quality (1-5)", values=[1, 2, 3, 4, 5], required=False),
            rg.TextQuestion(name="corrected_response", title="Corrected response (optional)", required=False, use_markdown=True),
        ],
        metadata=[
            rg.TermsMetadataProperty(name="source"),
            rg.TermsMetadataProperty(name="flagged_by", title="selected by"),
            *[rg.FloatMetadataProperty(name=c) for c in scores],
        ],
        vectors=[rg.VectorField(name="embedding", dimensions=dim)],
        allow_extra_metadata=False,
    )


def suggestions_for(df: pl.DataFrame, cfg: ReviewConfig) -> tuple[list[str | None], list[int | None], list[float | None]]:
    """Pre-filled decision and quality from the curation scores: bottom percentiles -> drop, 1..5 by percentile."""
    score = primary_score(df)
    if score is None:
        return [None] * df.height, [None] * df.height, [None] * df.height
    pct = _percentile(score.to_numpy().astype(float))
    decisions, ratings, conf = [], [], []
    for p in pct:
        if np.isnan(p):
            decisions.append(None), ratings.append(None), conf.append(None)
            continue
        decisions.append("drop" if p < cfg.suggest_drop_below else "keep")
        ratings.append(int(min(5, 1 + math.floor(p * 5))))
        conf.append(round(float(abs(p - cfg.suggest_drop_below) / max(cfg.suggest_drop_below, 1 - cfg.suggest_drop_below)), 4))
    return decisions, ratings, conf


def push(variant: str, cfg: ReviewConfig, target: ArgillaTarget | None = None) -> StageStats:
    """Create or update the variant's Argilla dataset with `cfg.n` rows chosen by `cfg.strategy`."""
    import argilla as rg

    with Timer() as t:
        target = target or resolve_target()
        client = connect(target, cfg.timeout_s)  # fail fast before any local work
        df, _ = load_variant(variant)
        embedder = make_embedder(cfg.embed_model)
        full_emb = variant_embeddings(df, embedder) if cfg.strategy == "near-dup-pairs" else None
        picked = select_rows(df, cfg, full_emb)
        emb = variant_embeddings(picked, embedder)
        dataset = find_dataset(client, cfg, variant)
        scores = numeric_metadata_columns(df)  # every curation score, plus token counts
        created = dataset is None
        if created:
            dataset = rg.Dataset(
                name=dataset_name(cfg, variant),
                workspace=_workspace(client, cfg),
                settings=build_settings(scores, emb.shape[1]),
                client=client,
            ).create()
            log.info("created Argilla dataset %s", dataset.name)
        vec = dataset.settings.vectors["embedding"]
        if vec is not None and vec.dimensions != emb.shape[1]:
            raise TomelabError(
                f"Argilla dataset {dataset.name!r} stores {vec.dimensions}-d vectors but embed_model "
                f"{cfg.embed_model!r} gives {emb.shape[1]}-d. Push with the model used first, or delete the dataset in Argilla."
            )
        known_meta = {m.name for m in dataset.settings.metadata}
        has_why = "why_flagged" in {f.name for f in dataset.settings.fields}  # datasets made before it lack it
        skipped = [c for c in scores if c not in known_meta]
        if skipped:
            log.warning("score columns %s are not in the existing dataset's metadata; not sent", skipped)
        decisions, ratings, conf = suggestions_for(df, cfg)
        pos = {rid: i for i, rid in enumerate(df["id"].to_list())}
        records = []
        for k, row in enumerate(picked.iter_rows(named=True)):
            i = pos[row["id"]]
            meta: dict[str, Any] = {"source": row["source"], "flagged_by": row["flagged_by"]}
            for c in scores:
                if c in known_meta and row[c] is not None and not (isinstance(row[c], float) and math.isnan(row[c])):
                    meta[c] = float(row[c])
            sugg = []
            if decisions[i] is not None:
                sugg.append(rg.Suggestion("decision", decisions[i], score=conf[i], agent="tomelab-curation"))
                sugg.append(rg.Suggestion("quality", ratings[i], agent="tomelab-curation"))
            records.append(
                rg.Record(
                    id=row["id"],
                    fields={"prompt": render_prompt(row["messages"]) or "(empty)",
                            "response": last_assistant(row["messages"]) or "(empty)",
                            **({"why_flagged": f"{row['flagged_by']}: {row['flag_detail']}"} if has_why else {})},
                    metadata=meta,
                    vectors={"embedding": emb[k].tolist()},
                    suggestions=sugg,
                )
            )
        dataset.records.log(records)
        total = count_records(target, dataset.id, cfg.timeout_s)
        pushed_path = review_dir(variant) / "pushed.parquet"
        now = _now()
        new = picked.select("id", "flagged_by", "flag_detail").with_columns(
            pl.lit(dataset.name).alias("dataset"), pl.lit(now).alias("pushed_at")
        )
        if pushed_path.is_file() and not created:  # a new dataset starts a new push history
            old = pl.read_parquet(pushed_path)
            new = pl.concat([old.filter(~pl.col("id").is_in(new["id"].implode())), new], how="vertical_relaxed")
        write_parquet(pushed_path, new)
    return StageStats(
        stage="review_push",
        rows_in=picked.height,
        kept=picked.height,
        seconds=round(t.seconds, 2),
        extra={"dataset": dataset.name, "url": f"{target.url}/dataset/{dataset.id}/annotation-mode", "records_in_dataset": total, "strategy": cfg.strategy},
    ).check()


# --------------------------------------------------------------------------------------------
# pull


def _api(target: ArgillaTarget, timeout_s: float):
    import httpx

    return httpx.Client(base_url=target.url, headers={"X-Argilla-Api-Key": target.api_key}, timeout=max(timeout_s, 30))


def count_records(target: ArgillaTarget, dataset_id: Any, timeout_s: float = 5.0) -> int:
    with _api(target, timeout_s) as h:
        r = h.get(f"/api/v1/datasets/{dataset_id}/records", params={"limit": 1})
        r.raise_for_status()
        return int(_json(r, target)["total"])


def fetch_responses(target: ArgillaTarget, dataset_id: Any, timeout_s: float = 5.0) -> pl.DataFrame:
    """Every submitted response of a dataset, one row per (record, annotator), with its times.

    Uses the REST list endpoint because the SDK's Response objects carry no timestamps."""
    rows = []
    with _api(target, timeout_s) as h:
        users = {}
        r = h.get("/api/v1/users")
        if r.status_code == 200:
            users = {u["id"]: u["username"] for u in _json(r, target)["items"]}
        offset, limit = 0, 1000
        while True:
            r = h.get(f"/api/v1/datasets/{dataset_id}/records", params={"include": "responses", "offset": offset, "limit": limit})
            r.raise_for_status()
            page = _json(r, target)
            for rec in page["items"]:
                for resp in rec.get("responses") or []:
                    if resp.get("status") != "submitted":
                        continue
                    values = resp.get("values") or {}
                    get = lambda q: (values.get(q) or {}).get("value")  # noqa: E731
                    corrected = get("corrected_response")
                    rows.append(
                        {
                            "id": rec.get("external_id") or rec["id"],
                            "record_server_id": rec["id"],
                            "annotator_id": resp["user_id"],
                            "annotator": users.get(resp["user_id"], resp["user_id"]),
                            "status": resp["status"],
                            "decision": get("decision"),
                            "quality": get("quality"),
                            "corrected_response": corrected if corrected and corrected.strip() else None,
                            "inserted_at": resp.get("inserted_at"),
                            "updated_at": resp.get("updated_at"),
                        }
                    )
            offset += len(page["items"])
            if not page["items"] or offset >= page["total"]:
                break
    return pl.DataFrame(rows, schema=RESPONSE_COLUMNS)


def merge_responses(old: pl.DataFrame, new: pl.DataFrame) -> pl.DataFrame:
    """Union by (id, annotator_id): the newer response wins, responses missing upstream are kept."""
    both = pl.concat([old.select(list(RESPONSE_COLUMNS)), new.select(list(RESPONSE_COLUMNS))], how="vertical_relaxed")
    return (
        both.sort(["id", "annotator_id", "updated_at"], nulls_last=False)
        .unique(subset=["id", "annotator_id"], keep="last", maintain_order=True)
        .sort(["id", "annotator_id"])
    )


def pull(variant: str, cfg: ReviewConfig, target: ArgillaTarget | None = None) -> StageStats:
    """Store every submitted response in `<variant>/review/responses.parquet` (merge; idempotent)."""
    with Timer() as t:
        target = target or resolve_target()
        client = connect(target, cfg.timeout_s)
        if not variant_dir(variant).is_dir():
            raise DataError(f"variant {variant!r} not found under {paths.variants_dir()}: check the name with `ls {paths.variants_dir()}`.")
        dataset = find_dataset(client, cfg, variant)
        if dataset is None:
            raise TomelabError(f"no Argilla dataset {dataset_name(cfg, variant)!r} at {target.url}: run `tomelab review push --variant {variant}` first.")
        fresh = fetch_responses(target, dataset.id, cfg.timeout_s)
        out = review_dir(variant) / "responses.parquet"
        old = pl.read_parquet(out) if out.is_file() else pl.DataFrame(schema=RESPONSE_COLUMNS)
        merged = merge_responses(old, fresh)
        key = ["id", "annotator_id", "updated_at"]
        n_new = merged.join(old.select(key), on=key, how="anti").height
        only_local = old.join(fresh.select("id", "annotator_id"), on=["id", "annotator_id"], how="anti").height
        if n_new or not out.is_file():
            write_parquet(out, merged)
    return StageStats(
        stage="review_pull",
        rows_in=merged.height,
        kept=merged.height,
        seconds=round(t.seconds, 2),
        extra={"path": str(out), "new_or_updated": n_new, "kept_from_earlier_pulls_only": only_local, "dataset": dataset.name},
    ).check()


# --------------------------------------------------------------------------------------------
# apply


def load_responses(variant: str) -> pl.DataFrame:
    path = review_dir(variant) / "responses.parquet"
    if not path.is_file():
        raise DataError(f"{path} does not exist: run `tomelab review pull --variant {variant}` first.")
    df = pl.read_parquet(path)
    missing = [c for c in ("id", "annotator_id", "decision", "corrected_response", "updated_at") if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing columns {missing}; delete it and run `tomelab review pull` again.")
    bad = df.filter(pl.col("decision").is_not_null() & ~pl.col("decision").is_in(list(DECISIONS)))
    if bad.height:
        r = bad.row(0, named=True)
        raise DataError(f"{path}: row id={r['id']} annotator={r['annotator_id']}: field `decision` is {r['decision']!r}, expected keep or drop. Fix the label in Argilla and pull again.")
    return df


def resolve_labels(responses: pl.DataFrame) -> pl.DataFrame:
    """One label per row: majority decision (ties: the most recent response), the most recent
    non-empty correction, the mean quality."""
    r = responses.sort("updated_at", nulls_last=False)
    out = []
    for (rid,), g in r.group_by(["id"], maintain_order=True):
        decisions = [d for d in g["decision"].to_list() if d]
        decision = None
        if decisions:
            counts = {d: decisions.count(d) for d in DECISIONS}
            top = max(counts.values())
            leaders = [d for d in DECISIONS if counts[d] == top]
            decision = leaders[0] if len(leaders) == 1 else decisions[-1]
        corrections = [c for c in g["corrected_response"].to_list() if c and c.strip()]
        qualities = [q for q in g["quality"].to_list() if q is not None] if "quality" in g.columns else []
        out.append(
            {
                "id": rid,
                "decision": decision,
                "corrected_response": corrections[-1] if corrections else None,
                "quality": float(np.mean(qualities)) if qualities else None,
                "n_annotators": g["annotator_id"].n_unique(),
            }
        )
    return pl.DataFrame(out, schema={"id": pl.String, "decision": pl.String, "corrected_response": pl.String, "quality": pl.Float64, "n_annotators": pl.Int64})


def knn_vote(train_emb: np.ndarray, train_labels: list[str], query_emb: np.ndarray, k: int, min_sim: float) -> list[str | None]:
    """Similarity-weighted vote of the k nearest labelled neighbours above `min_sim`; None if none qualifies."""
    import faiss

    if len(train_labels) == 0 or len(query_emb) == 0:
        return [None] * len(query_emb)
    index = faiss.IndexFlatIP(train_emb.shape[1])
    index.add(np.ascontiguousarray(train_emb, dtype=np.float32))
    sims, nbrs = index.search(np.ascontiguousarray(query_emb, dtype=np.float32), min(k, len(train_labels)))
    out: list[str | None] = []
    for srow, nrow in zip(sims, nbrs):
        votes: dict[str, float] = {}
        for s, j in zip(srow, nrow):
            if j >= 0 and s >= min_sim:
                votes[train_labels[j]] = votes.get(train_labels[j], 0.0) + float(s)
        out.append(max(sorted(votes), key=votes.get) if votes else None)
    return out


def propagation_agreement(emb: np.ndarray, labels: list[str], cfg: ReviewConfig) -> dict[str, Any]:
    """Hold out a share of the human-labelled rows, predict them from the rest, report agreement."""
    n = len(labels)
    n_hold = int(round(n * cfg.holdout_share))
    if n < 4 or n_hold < 1:
        return {"held_out": 0, "covered": 0, "agreement": None, "note": "too few labelled rows to hold any out"}
    rng = np.random.default_rng(cfg.seed)
    perm = rng.permutation(n)
    hold, rest = perm[:n_hold], perm[n_hold:]
    pred = knn_vote(emb[rest], [labels[i] for i in rest], emb[hold], cfg.extend_k, cfg.extend_min_similarity)
    pairs = [(p, labels[i]) for p, i in zip(pred, hold) if p is not None]
    agree = sum(p == y for p, y in pairs)
    return {
        "held_out": int(n_hold),
        "covered": len(pairs),
        "agreement": round(agree / len(pairs), 4) if pairs else None,
        "majority_baseline": round(max(labels.count(d) for d in DECISIONS) / n, 4),
    }


def apply_review(variant: str, cfg: ReviewConfig, *, cards_dir: Path | None = None, force: bool = False) -> StageStats:
    """Write variant `<variant>-reviewed`: human drops removed, corrections applied, labels
    optionally extended by nearest neighbours; plus its data card. Offline: needs no server."""
    out_name = f"{variant}-reviewed"
    out_dir = variant_dir(out_name)
    cards_dir = Path(cards_dir) if cards_dir is not None else paths.home().parent / "data_cards"
    with Timer() as t:
        df, parent_stats = load_variant(variant)
        responses = load_responses(variant)
        labels = resolve_labels(responses)
        unknown = labels.filter(~pl.col("id").is_in(df["id"].implode()))
        if unknown.height:
            log.warning("%d labelled ids are not in variant %s (ignored), e.g. %s", unknown.height, variant, unknown["id"][0])
        labels = labels.filter(pl.col("id").is_in(df["id"].implode()))
        resp_hash = hashlib.sha256(responses.sort(["id", "annotator_id"]).write_csv().encode()).hexdigest()[:12]
        chash = config_hash({"parent": parent_stats.get("config_hash"), "responses": resp_hash, "review": to_dict(cfg)})
        stats_path = out_dir / "stats.json"
        if not force and stats_path.is_file() and (out_dir / "train.parquet").is_file():
            prev = read_json(stats_path)
            if prev.get("config_hash") == chash:
                log.info("%s is up to date (config_hash %s); use --force to rebuild", out_name, chash)
                return StageStats.from_dict(prev["stages"][-1])

        human = {r["id"]: r for r in labels.iter_rows(named=True)}
        decision = {rid: r["decision"] for rid, r in human.items() if r["decision"]}
        origin = {rid: "human" for rid in decision}
        agreement: dict[str, Any] | None = None
        if cfg.extend_k > 0 and decision:
            emb = variant_embeddings(df, make_embedder(cfg.embed_model))
            ids = df["id"].to_list()
            lab_idx = [i for i, rid in enumerate(ids) if rid in decision]
            lab = [decision[ids[i]] for i in lab_idx]
            agreement = propagation_agreement(emb[lab_idx], lab, cfg)
            unl_idx = [i for i, rid in enumerate(ids) if rid not in decision]
            pred = knn_vote(emb[lab_idx], lab, emb[unl_idx], cfg.extend_k, cfg.extend_min_similarity)
            for i, p in zip(unl_idx, pred):
                if p is not None:
                    decision[ids[i]] = p
                    origin[ids[i]] = "propagated"

        kept_rows, dropped_rows = [], []
        changes = {"human_drop": 0, "human_correction": 0, "human_keep_unchanged": 0, "propagated_drop": 0, "propagated_keep": 0, "quality_only": 0}
        for row in df.iter_rows(named=True):
            rid = row["id"]
            d, how = decision.get(rid), origin.get(rid)
            h = human.get(rid)
            if d == "drop":
                changes[f"{how}_drop"] += 1
                who = f"{h['n_annotators']} annotator(s)" if how == "human" else f"k={cfg.extend_k} nearest labelled rows"
                dropped_rows.append({"id": rid, "source": row["source"], "stage": REVIEW_STAGE, "reason": f"{how}_drop", "detail": f"labelled drop by {who}"})
                continue
            row = dict(row)
            row["human_quality"] = h["quality"] if h else None
            row["human_label"] = None
            if d == "keep":
                row["human_label"] = "keep" if how == "human" else "propagated_keep"
                if how == "propagated":
                    changes["propagated_keep"] += 1
            if h and h["corrected_response"] and row["messages"] and row["messages"][-1]["role"] == "assistant":
                msgs = [dict(m) for m in row["messages"]]
                msgs[-1]["content"] = h["corrected_response"]
                meta = json.loads(row["meta"] or "{}")
                meta["review_parent_id"] = rid
                meta["review_original_response"] = row["messages"][-1]["content"]
                row.update(messages=msgs, id=row_id(msgs), meta=json.dumps(meta, ensure_ascii=False), human_label="corrected")
                changes["human_correction"] += 1
            elif d == "keep" and how == "human":
                changes["human_keep_unchanged"] += 1
            elif h and h["quality"] is not None and not d:
                changes["quality_only"] += 1
            kept_rows.append(row)

        schema = dict(df.schema) | {"human_quality": pl.Float64, "human_label": pl.String}
        out_train = pl.DataFrame(kept_rows, schema=schema)
        if out_train["id"].is_duplicated().any():
            dup = out_train.filter(pl.col("id").is_duplicated())["id"][0]
            raise DataError(f"a corrected response made row {dup} identical to another row; fix the correction in Argilla and pull again.")
        parent_dropped_path = variant_dir(variant) / "dropped.parquet"
        drop_schema = {"id": pl.String, "source": pl.String, "stage": pl.String, "reason": pl.String, "detail": pl.String}
        parent_dropped = pl.read_parquet(parent_dropped_path) if parent_dropped_path.is_file() else pl.DataFrame(schema=drop_schema)
        new_dropped = pl.DataFrame(dropped_rows, schema=drop_schema)
        all_dropped = pl.concat([parent_dropped, new_dropped], how="diagonal_relaxed")

    st = StageStats(
        stage=REVIEW_STAGE,
        rows_in=df.height,
        kept=out_train.height,
        dropped=count_reasons([r["reason"] for r in dropped_rows]),
        seconds=round(t.seconds, 2),
        extra={
            "parent": variant,
            "labelled_rows": labels.height,
            "responses": responses.height,
            "annotators": responses["annotator_id"].n_unique(),
            "changes": changes,
            "extend_k": cfg.extend_k,
            "propagation_agreement": agreement,
        },
    ).check()
    write_parquet(out_dir / "train.parquet", out_train)
    write_parquet(out_dir / "dropped.parquet", all_dropped)
    stats = {
        "variant": out_name,
        "parent": variant,
        "config_hash": chash,
        "heldout_dir": parent_stats.get("heldout_dir"),
        "review": to_dict(cfg),
        "stages": [*parent_stats.get("stages", []), st.to_dict()],
        "rows": out_train.height,
        "created_at": _now(),
    }
    write_text(cards_dir / f"{out_name}.md", data_card(out_name, variant, st, changes, agreement, cfg))
    write_json(stats_path, stats)  # last: its presence marks the variant complete
    return st


def data_card(name: str, parent: str, st: StageStats, changes: dict[str, int], agreement: dict[str, Any] | None, cfg: ReviewConfig) -> str:
    """A short HF-style card: what each human decision changed, and propagation agreement."""
    command = f"tomelab review apply --variant {parent}"
    if cfg.extend_k > 0:
        command += f" --extend-k {cfg.extend_k} --extend-min-similarity {cfg.extend_min_similarity} --holdout-share {cfg.holdout_share}"
    lines = [
        "---",
        "tags: [tomelab, human-review, argilla]",
        "---",
        f"# {name}",
        "",
        f"Variant `{parent}` after human review in Argilla (`{command}`).",
        f"Rows: {st.rows_in} in, {st.kept} kept, {st.n_dropped} dropped by review; "
        f"{st.extra['labelled_rows']} rows labelled by {st.extra['annotators']} annotator(s).",
        "",
        "## What each decision changed",
        "",
        "| decision | rows changed |",
        "|---|---|",
        f"| human: drop | {changes['human_drop']} |",
        f"| human: corrected response | {changes['human_correction']} |",
        f"| human: keep (unchanged) | {changes['human_keep_unchanged']} |",
        f"| human: quality rating only | {changes['quality_only']} |",
    ]
    if cfg.extend_k > 0:
        lines += [
            f"| propagated (k={cfg.extend_k}, cos>={cfg.extend_min_similarity}): drop | {changes['propagated_drop']} |",
            f"| propagated: keep | {changes['propagated_keep']} |",
            "",
            "## Label propagation agreement",
            "",
        ]
        if agreement and agreement.get("agreement") is not None:
            lines.append(
                f"On a held-out {cfg.holdout_share:.0%} of the human-labelled rows ({agreement['held_out']} rows, "
                f"{agreement['covered']} with a neighbour above the similarity threshold), the nearest-neighbour vote "
                f"agreed with the human label on **{agreement['agreement']:.1%}** (always-majority baseline: "
                f"{agreement['majority_baseline']:.1%})."
            )
        else:
            lines.append(f"Not measured: {(agreement or {}).get('note', 'no held-out row had a neighbour above the threshold')}.")
    lines += [
        "",
        "Dropped rows are in `dropped.parquet` with `stage = human_review`; corrected rows get a new id "
        "(the content hash) and keep the old one in `meta.review_parent_id`.",
        "",
    ]
    return "\n".join(lines)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
