"""Label resolution: one decision per row from every annotator's responses, and the nearest-neighbour
vote that extends human labels to unlabelled rows (with its measured agreement)."""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from curation.review.config import DECISIONS, ReviewConfig
from curation.review.data import review_dir
from tomelab.errors import DataError


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
