"""Review logic that needs no server: row selection, suggestions, apply (exact rows), label
propagation, bad input, and fast failure with no local change when the server is down."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from curation.review.apply import apply_review
from curation.review.client import resolve_target
from curation.review.config import ReviewConfig, load_review_config
from curation.review.data import (
    load_variant,
    make_embedder,
    numeric_metadata_columns,
    score_columns,
    variant_embeddings,
)
from curation.review.labels import knn_vote
from curation.review.pull import RESPONSE_COLUMNS, merge_responses
from curation.review.selection import select_rows, suggestions_for
from test_review_fixtures import make_variant, write_responses
from tomelab import paths
from tomelab.errors import DataError, TomelabError
from tomelab.schema import row_id


@pytest.fixture
def variant(tmp_home: Path, shared_data: Path):
    return "v", make_variant("v", shared_data, n=24)


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_low_score_picks_lowest_quality(variant):
    _, df = variant
    picked = select_rows(df, ReviewConfig(n=5, strategy="low-score"))
    assert picked["id"].to_list() == df.sort("quality_score")["id"].to_list()[:5]
    assert set(picked["flagged_by"]) == {"low-score"}
    assert picked["flag_detail"][0].startswith("quality_score=")


def test_random_is_seeded_and_unique(variant):
    _, df = variant
    a = select_rows(df, ReviewConfig(n=10, seed=3))["id"].to_list()
    b = select_rows(df, ReviewConfig(n=10, seed=3))["id"].to_list()
    c = select_rows(df, ReviewConfig(n=10, seed=4))["id"].to_list()
    assert a == b and len(set(a)) == 10 and a != c
    assert select_rows(df, ReviewConfig(n=500)).height == df.height


def test_disagreement_ranks_rows_whose_scores_conflict(variant):
    _, df = variant
    two = df.drop("nll")
    picked = select_rows(two, ReviewConfig(n=4, strategy="disagreement"))
    # the fixture inverts ifd against quality_score on every 4th row; the top picks must be among them
    conflicting = {df["id"][i] for i in range(df.height) if i % 4 == 0}
    assert set(picked["id"]) <= conflicting
    assert "quality_score" in picked["flag_detail"][0] and "ifd" in picked["flag_detail"][0]
    # with nll as well, every pick still has a positive spread, largest first
    spreads = [float(d.split()[0].split("=")[1]) for d in select_rows(df, ReviewConfig(n=6, strategy="disagreement"))["flag_detail"]]
    assert spreads == sorted(spreads, reverse=True) and spreads[0] > 0.5
    # token counts are metadata for the UI, not scores: they never drive disagreement
    with_len = two.with_columns(pl.Series("response_tokens", list(range(df.height)), dtype=pl.Int64))
    assert score_columns(with_len) == ["quality_score", "ifd"]
    assert numeric_metadata_columns(with_len) == ["quality_score", "ifd", "response_tokens"]
    with pytest.raises(DataError, match="at least two score columns"):
        select_rows(df.select("id", "source", "messages", "meta", "quality_score"), ReviewConfig(strategy="disagreement"))


def test_near_dup_pairs_come_first_and_together(variant):
    _, df = variant
    embedder = make_embedder("minilm")
    emb = variant_embeddings(df, embedder)
    assert emb.shape == (df.height, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    picked = select_rows(df, ReviewConfig(n=2, strategy="near-dup-pairs", embed_model="minilm"), emb)
    # the fixture appends a near-copy of row 3 (one extra "!"): that pair must be the first pair
    assert set(picked["id"]) == {df["id"][3], df["id"][df.height - 1]}
    assert "cos=" in picked["flag_detail"][0]
    # vectors are cached by row id in the shared embedding cache: a fresh embedder reads them back
    assert any((paths.cache_dir() / "embeddings" / "minilm").glob("shard-*.npz"))
    assert np.allclose(variant_embeddings(df[::-1], make_embedder("minilm")), emb[::-1])


def test_suggestions_follow_scores(variant):
    _, df = variant
    dec, rating, _ = suggestions_for(df, ReviewConfig(suggest_drop_below=0.25))
    worst = int(np.argmin(df["quality_score"].to_numpy()))
    best = int(np.argmax(df["quality_score"].to_numpy()))
    assert dec[worst] == "drop" and rating[worst] == 1
    assert dec[best] == "keep" and rating[best] == 5
    assert dec.count("drop") == sum(1 for p in range(df.height) if p / (df.height - 1) < 0.25)


def test_apply_drops_and_corrects_exact_rows(variant, tmp_home):
    _, df = variant
    ids = df["id"].to_list()
    write_responses(
        "v",
        [
            {"id": ids[0], "annotator_id": "a1", "decision": "drop", "quality": 1},
            # two annotators disagree on ids[1]; the tie goes to the most recent (drop)
            {"id": ids[1], "annotator_id": "a1", "decision": "keep", "updated_at": "2026-01-01T00:00:00"},
            {"id": ids[1], "annotator_id": "a2", "decision": "drop", "updated_at": "2026-01-02T00:00:00"},
            {"id": ids[2], "annotator_id": "a1", "decision": "keep", "quality": 4, "corrected_response": "Fixed."},
            {"id": ids[3], "annotator_id": "a1", "decision": "keep", "quality": 5},
            {"id": ids[4], "annotator_id": "a1", "decision": None, "quality": 2},
        ],
    )
    st = apply_review("v", ReviewConfig(), cards_dir=tmp_home / "cards")
    out = paths.variants_dir() / "v-reviewed"
    train = pl.read_parquet(out / "train.parquet")
    dropped = pl.read_parquet(out / "dropped.parquet")
    stats = json.loads((out / "stats.json").read_text())

    assert dropped.filter(pl.col("stage") == "human_review")["id"].sort().to_list() == sorted([ids[0], ids[1]])
    assert "deadbeefdeadbeef" in dropped["id"].to_list()  # the parent's drops are carried over
    assert train.height == df.height - 2 and st.kept == df.height - 2 and st.dropped == {"human_drop": 2}
    fixed = train.filter(pl.col("human_label") == "corrected")
    assert fixed.height == 1 and fixed["messages"][0][-1]["content"] == "Fixed."
    assert fixed["id"][0] == row_id(fixed["messages"][0]) != ids[2]
    assert json.loads(fixed["meta"][0])["review_parent_id"] == ids[2]
    assert train.filter(pl.col("id") == ids[4])["human_quality"].to_list() == [2.0]
    # untouched rows are identical to the parent
    rest = [i for i in ids[5:]]
    assert train.filter(pl.col("id").is_in(rest)).drop("human_quality", "human_label").equals(df.filter(pl.col("id").is_in(rest)))
    assert stats["heldout_dir"].endswith("heldout/fixture") and stats["parent"] == "v"
    assert [s["stage"] for s in stats["stages"]] == ["load", "human_review"]
    assert st.extra["changes"] == {"human_drop": 2, "human_correction": 1, "human_keep_unchanged": 1, "propagated_drop": 0, "propagated_keep": 0, "quality_only": 1}
    card = (tmp_home / "cards" / "v-reviewed.md").read_text()
    assert "| human: drop | 2 |" in card and "| human: corrected response | 1 |" in card

    # re-running with the same labels resumes (no rewrite); --force rebuilds
    mtime = (out / "train.parquet").stat().st_mtime_ns
    apply_review("v", ReviewConfig(), cards_dir=tmp_home / "cards")
    assert (out / "train.parquet").stat().st_mtime_ns == mtime
    apply_review("v", ReviewConfig(), cards_dir=tmp_home / "cards", force=True)
    assert (out / "train.parquet").stat().st_mtime_ns != mtime


def test_apply_extends_labels_to_near_duplicates(variant, tmp_home):
    _, df = variant
    ids = df["id"].to_list()
    dup = ids[-1]  # near-copy of ids[3]
    labels = [{"id": ids[i], "annotator_id": "a1", "decision": "keep"} for i in range(4, 16)]
    labels.append({"id": ids[3], "annotator_id": "a1", "decision": "drop"})
    write_responses("v", labels)
    cfg = ReviewConfig(extend_k=1, extend_min_similarity=0.95, holdout_share=0.25, embed_model="minilm")
    st = apply_review("v", cfg, cards_dir=tmp_home / "cards")
    dropped = pl.read_parquet(paths.variants_dir() / "v-reviewed" / "dropped.parquet")
    review_drops = dict(zip(*dropped.filter(pl.col("stage") == "human_review").select("id", "reason").to_dict(as_series=False).values()))
    assert review_drops == {ids[3]: "human_drop", dup: "propagated_drop"}
    agreement = st.extra["propagation_agreement"]
    assert agreement["held_out"] == round(13 * 0.25)
    assert agreement["covered"] <= agreement["held_out"]
    card = (tmp_home / "cards" / "v-reviewed.md").read_text()
    assert "propagated (k=1" in card and "Label propagation agreement" in card


def test_knn_vote_respects_threshold():
    train = np.eye(3, dtype=np.float32)
    q = np.array([[1, 0, 0], [0, 0.6, 0.8]], dtype=np.float32)
    assert knn_vote(train, ["drop", "keep", "keep"], q, k=1, min_sim=0.9) == ["drop", None]
    assert knn_vote(train, ["drop", "keep", "keep"], q, k=2, min_sim=0.5) == ["drop", "keep"]


def test_bad_input_is_named(variant, tmp_home):
    with pytest.raises(DataError, match="run `tomelab review pull"):
        apply_review("v", ReviewConfig())
    write_responses("v", [{"id": variant[1]["id"][0], "annotator_id": "a1", "decision": "maybe"}])
    with pytest.raises(DataError, match=r"annotator=a1: field `decision` is 'maybe'"):
        apply_review("v", ReviewConfig())
    with pytest.raises(DataError, match="variant 'nope' not found"):
        load_variant("nope")
    with pytest.raises(ValueError, match="holdout_share"):
        ReviewConfig(holdout_share=1.5)


def test_config_from_toml(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[review]\nn = 50\nstrategy = "low-score"\n')
    cfg = load_review_config(p)
    assert cfg.n == 50 and cfg.strategy == "low-score"
    p.write_text('[review]\nstrategy = "worst"\n')
    with pytest.raises(TomelabError, match="strategy"):
        load_review_config(p)


def test_target_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("TOMELAB_ARGILLA_DIR", str(tmp_path))
    monkeypatch.delenv("ARGILLA_API_URL", raising=False)
    monkeypatch.delenv("ARGILLA_API_KEY", raising=False)
    with pytest.raises(TomelabError, match="scripts/argilla.sh start"):
        resolve_target()
    (tmp_path / "credentials.env").write_text("# c\nARGILLA_API_KEY=k1\n")
    t = resolve_target()
    assert (t.url, t.api_key) == ("http://127.0.0.1:6900", "k1")
    monkeypatch.setenv("ARGILLA_API_URL", "https://me-argilla.hf.space/")
    monkeypatch.setenv("ARGILLA_API_KEY", "k2")
    t = resolve_target()
    assert (t.url, t.api_key) == ("https://me-argilla.hf.space", "k2")


def test_server_down_fails_fast_and_changes_nothing(variant, tmp_home, monkeypatch, capsys):
    from tomelab.cli import main

    write_responses("v", [{"id": variant[1]["id"][0], "annotator_id": "a1", "decision": "drop"}])
    monkeypatch.setenv("ARGILLA_API_URL", f"http://127.0.0.1:{_unused_port()}")
    monkeypatch.setenv("ARGILLA_API_KEY", "whatever")

    def snapshot() -> dict[str, bytes]:
        return {str(p): p.read_bytes() for p in sorted(tmp_home.rglob("*")) if p.is_file() and "models" not in p.parts}

    # "fast" without a wall clock (the machine may be busy): one request, with the short liveness timeout
    import httpx

    calls: list[float] = []
    real_get = httpx.get

    def spy_get(url, *a, **kw):
        calls.append(kw.get("timeout"))
        return real_get(url, *a, **kw)

    monkeypatch.setattr(httpx, "get", spy_get)
    before = snapshot()
    for cmd in (["push", "--variant", "v", "--n", "5"], ["pull", "--variant", "v"]):
        calls.clear()
        rc = main(["review", *cmd])
        assert calls == [ReviewConfig().timeout_s]
        assert rc == 2
        err = capsys.readouterr().err
        assert "cannot reach Argilla" in err and "scripts/argilla.sh start" in err and "No local file was changed" in err
    assert snapshot() == before


def test_merge_responses_keeps_every_label_and_takes_the_newest():
    def resp(rid, who, decision, at):
        return {"id": rid, "record_server_id": None, "annotator_id": who, "annotator": who, "status": "submitted",
                "decision": decision, "quality": None, "corrected_response": None, "inserted_at": at, "updated_at": at}

    old = pl.DataFrame([resp("r1", "a", "keep", "2026-01-01"), resp("r2", "a", "drop", "2026-01-01")], schema=RESPONSE_COLUMNS)
    # upstream: r1 was changed later, r2 has vanished (e.g. the record was deleted), r3 is new
    new = pl.DataFrame([resp("r1", "a", "drop", "2026-01-02"), resp("r3", "b", "keep", "2026-01-02")], schema=RESPONSE_COLUMNS)
    merged = merge_responses(old, new)
    assert merged.select("id", "annotator_id", "decision").rows() == [("r1", "a", "drop"), ("r2", "a", "drop"), ("r3", "b", "keep")]
    assert merge_responses(merged, new).equals(merged)  # idempotent
