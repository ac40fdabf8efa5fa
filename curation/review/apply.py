"""`apply` (offline): the human labels turned into a new variant `<name>-reviewed`, optionally extended to
unlabelled rows through nearest labelled neighbours, with its data card (curation.card.review_card)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import polars as pl

from curation.card import review_card
from curation.review.config import REVIEW_STAGE, ReviewConfig, _now
from curation.review.data import load_variant, make_embedder, variant_dir, variant_embeddings
from curation.review.labels import knn_vote, load_responses, propagation_agreement, resolve_labels
from tomelab import paths
from tomelab.config import config_hash, to_dict
from tomelab.errors import DataError
from tomelab.io import read_json, write_json, write_parquet, write_text
from tomelab.schema import row_id
from tomelab.stats import StageStats, Timer, count_reasons

log = logging.getLogger(__name__)

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
    write_text(cards_dir / f"{out_name}.md", review_card(out_name, variant, st, changes, agreement, cfg))
    write_json(stats_path, stats)  # last: its presence marks the variant complete
    return st
