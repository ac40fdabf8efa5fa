"""`push`: a chosen slice of a variant's rows into an Argilla dataset (record id = row id, so a second
push updates instead of duplicating), with questions, scores as metadata and suggestions, and vectors."""

from __future__ import annotations

import logging
import math
from typing import Any

import polars as pl

from curation.review.client import (
    ArgillaTarget,
    _workspace,
    connect,
    count_records,
    dataset_name,
    find_dataset,
    resolve_target,
)
from curation.review.config import DECISIONS, ReviewConfig, _now, sync_stats
from curation.review.data import (
    last_assistant,
    load_variant,
    make_embedder,
    numeric_metadata_columns,
    render_prompt,
    review_dir,
    variant_embeddings,
)
from curation.review.selection import select_rows, suggestions_for
from tomelab.errors import TomelabError
from tomelab.io import write_parquet
from tomelab.stats import StageStats, Timer

log = logging.getLogger(__name__)

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
    return sync_stats("review_push", picked.height, t.seconds, {
        "dataset": dataset.name, "url": f"{target.url}/dataset/{dataset.id}/annotation-mode",
        "records_in_dataset": total, "strategy": cfg.strategy})
